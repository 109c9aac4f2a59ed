/* taratxtd.c: the daemon's main: flags, signals, nothing else.
 *
 * One table drives the flags, their environment variables, defaults, bounds,
 * validation and --help (the way redis's config.c does). */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "taratxt/taratxt.h"

typedef enum { OPT_STR, OPT_INT, OPT_LINKS, OPT_LEVEL } opt_kind;

typedef struct opt {
    const char *flag;     /* without "--" */
    const char *env;
    const char *arg;      /* metavariable for --help */
    opt_kind kind;
    size_t offset;        /* into tt_server_options */
    long min, max;
    const char *help;
} opt;

#define OFF(f) offsetof(tt_server_options, f)

static const opt opts[] = {
    {"listen", "TARATXT_LISTEN", "ADDR:PORT", OPT_STR, OFF(listen), 0, 0, "HTTP API address (default 127.0.0.1:8080)"},
    {"data", "TARATXT_DATA", "DIR", OPT_STR, OFF(data_dir), 0, 0, "data directory (default ./data)"},
    {"mqtt-url", "TARATXT_MQTT_URL", "URL", OPT_STR, OFF(mqtt_url), 0, 0, "broker URL (default tcp://127.0.0.1:1883)"},
    {"mqtt-username", "TARATXT_MQTT_USERNAME", "USER", OPT_STR, OFF(mqtt_username), 0, 0, "the server's broker user"},
    {"mqtt-password", "TARATXT_MQTT_PASSWORD", "PASSWORD", OPT_STR, OFF(mqtt_password), 0, 0, "the server's broker password"},
    {"mqtt-client-prefix", "TARATXT_MQTT_CLIENT_PREFIX", "PREFIX", OPT_STR, OFF(mqtt_client_prefix), 0, 0,
     "broker client ids are PREFIX-link-N (default taratxt)"},
    {"topic-root", "TARATXT_TOPIC_ROOT", "ROOT", OPT_STR, OFF(topic_root), 0, 0, "topic root (default taratxt/v1)"},
    {"mqtt-links", "TARATXT_MQTT_LINKS", "N|per-device", OPT_LINKS, OFF(mqtt_links), 1, 64,
     "broker connections shared by the devices, or one per device (default 4)"},
    {"device-mqtt-url", "TARATXT_DEVICE_MQTT_URL", "URL", OPT_STR, OFF(device_mqtt_url), 0, 0,
     "broker URL given to devices (default: --mqtt-url)"},
    {"http-threads", "TARATXT_HTTP_THREADS", "N", OPT_INT, OFF(http_threads), 1, 4096,
     "HTTP worker threads = concurrent keep-alive clients (default 192)"},
    {"scheduler-threads", "TARATXT_SCHEDULER_THREADS", "N", OPT_INT, OFF(sched_threads), 0, 256,
     "actor scheduler threads, 0 = one per core (default 0)"},
    {"window", "TARATXT_WINDOW", "N", OPT_INT, OFF(window), 1, 1000, "unreported messages per device (default 16)"},
    {"dispatch-timeout", "TARATXT_DISPATCH_TIMEOUT", "SECONDS", OPT_INT, OFF(dispatch_timeout_s), 1, 86400,
     "re-send when a device has not reported within this (default 120)"},
    {"otp-template", "TARATXT_OTP_TEMPLATE", "TEXT", OPT_STR, OFF(otp_template), 0, 0,
     "OTP text with {code} and {minutes} (default \"Your verification code is {code}. It expires in {minutes} minutes.\")"},
    {"pin-cache", "TARATXT_PIN_CACHE", "N", OPT_INT, OFF(pin_cache_entries), 1, 100000000,
     "pins the router keeps in memory; the rest are read from the store (default 262144)"},
    {"log-level", "TARATXT_LOG_LEVEL", "LEVEL", OPT_LEVEL, OFF(log_level), 0, 3, "debug, info, warn or error (default info)"},
    {"test-clock", "TARATXT_TEST_CLOCK", "0|1", OPT_INT, OFF(test_clock), 0, 1,
     "tests only: POST /api/v1/_test/clock moves the server's clock (default 0)"},
};
#define NOPTS (sizeof(opts) / sizeof(opts[0]))

static void usage(FILE *f)
{
    fprintf(f,
            "Usage:\n"
            "  taratxtd serve [options]         run the gateway\n"
            "  taratxtd account create --data DIR --name NAME\n"
            "                                   create an account (server stopped); prints its id and token\n"
            "  taratxtd --version | --help\n\n"
            "serve options (each also read from the environment variable shown):\n");
    for (size_t i = 0; i < NOPTS; i++) {
        char left[64];
        snprintf(left, sizeof(left), "--%s %s", opts[i].flag, opts[i].arg);
        fprintf(f, "  %-34s %s [%s]\n", left, opts[i].help, opts[i].env);
    }
    fprintf(f, "\nOn a fresh data directory the server creates the account \"default\" and prints\n"
               "its API token once (also written to DIR/initial-token, mode 0600).\n"
               "SIGTERM or SIGINT: stop accepting, finish what was accepted, flush, exit 0.\n");
}

static int set_opt(tt_server_options *o, const opt *d, const char *val, const char *from)
{
    void *p = (char *)o + d->offset;
    char *end;
    long v;
    switch (d->kind) {
    case OPT_STR:
        *(const char **)p = val;
        return 0;
    case OPT_LINKS:
        if (!strcmp(val, "per-device")) {
            *(int *)p = 0;
            return 0;
        }
        /* fall through */
    case OPT_INT:
        errno = 0;
        v = strtol(val, &end, 10);
        if (errno || !*val || *end || v < d->min || v > d->max) {
            fprintf(stderr, "taratxtd: %s: %s must be %s%ld to %ld, not \"%s\"\n", from, d->flag,
                    d->kind == OPT_LINKS ? "per-device or " : "", d->min, d->max, val);
            return -1;
        }
        *(int *)p = (int)v;
        return 0;
    case OPT_LEVEL: {
        static const char *names[] = {"debug", "info", "warn", "error"};
        for (int i = 0; i < 4; i++)
            if (!strcmp(val, names[i])) {
                *(int *)p = i;
                return 0;
            }
        fprintf(stderr, "taratxtd: %s: log-level must be debug, info, warn or error\n", from);
        return -1;
    }
    }
    return -1;
}

/* Environment first, then flags (flags win). */
static int parse_serve(int argc, char **argv, tt_server_options *o)
{
    for (size_t i = 0; i < NOPTS; i++) {
        const char *v = getenv(opts[i].env);
        if (v && *v && set_opt(o, &opts[i], v, opts[i].env) != 0)
            return -1;
    }
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "taratxtd: unexpected argument \"%s\" (see --help)\n", a);
            return -1;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const opt *d = NULL;
        for (size_t j = 0; j < NOPTS; j++)
            if (strlen(opts[j].flag) == nlen && !strncmp(opts[j].flag, name, nlen))
                d = &opts[j];
        if (!d) {
            fprintf(stderr, "taratxtd: unknown option \"%s\" (see --help)\n", a);
            return -1;
        }
        const char *val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!val) {
            fprintf(stderr, "taratxtd: %s needs a value (see --help)\n", a);
            return -1;
        }
        if (set_opt(o, d, val, "command line") != 0)
            return -1;
    }
    return 0;
}

static int cmd_serve(int argc, char **argv)
{
    tt_server_options o = TT_SERVER_OPTIONS_INIT;
    o.print_initial_token = 1;
    if (parse_serve(argc, argv, &o) != 0)
        return 2;
    /* Block the stop signals in every thread; main waits for them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    tt_server *srv = NULL;
    int rc = tt_server_create(&o, &srv);
    if (rc == 0)
        rc = tt_server_start(srv);
    if (rc != 0) {
        fprintf(stderr, "taratxtd: cannot start: %s\n", tt_strerror(rc));
        tt_server_destroy(srv);
        return 1;
    }
    int sig = 0;
    sigwait(&set, &sig);
    fprintf(stderr, "taratxtd: %s received; finishing accepted work\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    tt_server_stop(srv);
    tt_server_destroy(srv);
    return 0;
}

static int cmd_account(int argc, char **argv)
{
    if (argc < 1 || strcmp(argv[0], "create") != 0) {
        fprintf(stderr, "taratxtd: usage: taratxtd account create --data DIR --name NAME\n");
        return 2;
    }
    const char *data = getenv("TARATXT_DATA"), *name = NULL;
    if (!data || !*data)
        data = "./data";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--data") && i + 1 < argc)
            data = argv[++i];
        else if (!strncmp(argv[i], "--data=", 7))
            data = argv[i] + 7;
        else if (!strcmp(argv[i], "--name") && i + 1 < argc)
            name = argv[++i];
        else if (!strncmp(argv[i], "--name=", 7))
            name = argv[i] + 7;
        else {
            fprintf(stderr, "taratxtd: account create: unexpected \"%s\"\n", argv[i]);
            return 2;
        }
    }
    if (!name || !*name || strlen(name) > 100) {
        fprintf(stderr, "taratxtd: account create needs --name NAME (1 to 100 characters)\n");
        return 2;
    }
    uint64_t id;
    char token[36];
    int rc = tt_account_create(data, name, &id, token);
    if (rc) {
        fprintf(stderr, "taratxtd: cannot create the account in %s: %s\n", data, tt_strerror(rc));
        return 1;
    }
    printf("{\"account_id\":%llu,\"token\":\"%s\"}\n", (unsigned long long)id, token);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
        printf("taratxtd %s\n", tt_version());
        return 0;
    }
    if (!strcmp(argv[1], "serve"))
        return cmd_serve(argc - 2, argv + 2);
    if (!strcmp(argv[1], "account"))
        return cmd_account(argc - 2, argv + 2);
    fprintf(stderr, "taratxtd: unknown command \"%s\" (see --help)\n", argv[1]);
    return 2;
}
