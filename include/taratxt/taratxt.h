/* taratxt.h: the public embedding API of libtaratxt.
 *
 * An appliance runs the whole gateway (HTTP API, actors, MQTT links, store)
 * inside its own process:
 *
 *     tt_server_options o = TT_SERVER_OPTIONS_INIT;
 *     o.data_dir = "/var/lib/myapp/sms";
 *     tt_server *srv;
 *     if (tt_server_create(&o, &srv) == 0 && tt_server_start(srv) == 0) {
 *         ...
 *         tt_server_stop(srv);   // stop accepting, finish, flush
 *     }
 *     tt_server_destroy(srv);
 *
 * Every function returns 0 or a negative errno-style code; tt_strerror
 * describes it. Nothing here calls exit() or abort(). */
#ifndef TARATXT_H
#define TARATXT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TT_VERSION_STRING "0.1.0"
#define TT_SERVER_OPTIONS_VERSION 1

typedef struct tt_server tt_server;

/* Log sink: level 0 debug, 1 info, 2 warn, 3 error; line has no newline. */
typedef void (*tt_log_fn)(int level, const char *line, void *arg);

typedef struct tt_server_options {
    int version;                 /* TT_SERVER_OPTIONS_VERSION */
    const char *listen;          /* "127.0.0.1:8080"; port 0 picks a free one */
    const char *data_dir;        /* "./data" */
    const char *mqtt_url;        /* "tcp://127.0.0.1:1883" */
    const char *mqtt_username;   /* NULL: none */
    const char *mqtt_password;
    const char *mqtt_client_prefix; /* link client ids "<prefix>-link-<i>", default "taratxt" */
    const char *topic_root;      /* "taratxt/v1" */
    int mqtt_links;              /* links to the broker (1..64); 0 means one per device */
    const char *device_mqtt_url; /* URL handed to devices; NULL: mqtt_url */
    int http_threads;            /* civetweb worker threads (default 192) */
    int sched_threads;           /* actor scheduler threads; 0: one per core */
    int window;                  /* unreported messages per device (default 16) */
    int dispatch_timeout_s;      /* seconds before a hand-over is re-sent (default 120) */
    const char *otp_template;    /* OTP message template */
    int print_initial_token;     /* print the first token on stdout (daemon: 1) */
    tt_log_fn log_fn;            /* NULL: stderr */
    void *log_arg;
    int log_level;               /* 0 debug .. 3 error (default 1) */
    int pin_cache_entries;       /* pins the router keeps in memory (default 262144) */
    int test_clock;              /* tests only: enables POST /api/v1/_test/clock */
} tt_server_options;

#define TT_SERVER_OPTIONS_INIT { TT_SERVER_OPTIONS_VERSION, "127.0.0.1:8080", "./data", \
    "tcp://127.0.0.1:1883", NULL, NULL, "taratxt", "taratxt/v1", 4, NULL, 192, 0, 16, 120, \
    "Your verification code is {code}. It expires in {minutes} minutes.", 0, NULL, NULL, 1, 262144, 0 }

/* Validates options, opens (or initialises) the data directory. */
int tt_server_create(const tt_server_options *opts, tt_server **out);
/* Starts the actors, the MQTT links and the HTTP listener. */
int tt_server_start(tt_server *srv);
/* Stops accepting requests, finishes the ones accepted, flushes the store. */
int tt_server_stop(tt_server *srv);
void tt_server_destroy(tt_server *srv);

/* The port the HTTP API listens on (after start). */
int tt_server_http_port(const tt_server *srv);
/* The token printed at first start of a fresh data directory, or NULL.
 * Valid until destroy. */
const char *tt_server_initial_token(const tt_server *srv);

/* Creates an account in a data directory whose server is stopped; writes the
 * new account's id and first token (36 bytes with the NUL). */
int tt_account_create(const char *data_dir, const char *name, uint64_t *account_id, char token[36]);

const char *tt_strerror(int err);
const char *tt_version(void);

#ifdef __cplusplus
}
#endif
#endif
