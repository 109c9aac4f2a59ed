/* link.h: MQTT links, the paho MQTTAsync clients that carry device sessions.
 *
 * With N links (default 4), device d rides link d mod N; with per-device links
 * (nlinks 0) each device gets a client of its own, created when it binds. A
 * link subscribes to the status, report and inbound topics of exactly the
 * devices bound to it, so a packet reaches exactly one device. Links keep
 * persistent sessions (clean start off, client id "<prefix>-link-<i>") and
 * speak MQTT 5, falling back to 3.1.1 when the broker refuses 5. A supervisor
 * thread reconnects lost links with exponential backoff (1 s to 30 s).
 *
 * paho calls back on its own threads: callbacks here only hand what happened
 * to the app's functions, which must not block. */
#ifndef TT_MQTT_LINK_H
#define TT_MQTT_LINK_H

#include <stddef.h>
#include <stdint.h>

typedef struct mqtt_links mqtt_links;

enum { LINK_TOPIC_STATUS = 0, LINK_TOPIC_REPORT = 1, LINK_TOPIC_INBOUND = 2 };

typedef struct links_config {
    const char *url;
    const char *username;      /* may be NULL */
    const char *password;
    const char *client_prefix; /* "taratxt" */
    const char *topic_root;    /* "taratxt/v1" */
    int nlinks;                /* 0: one link per device */
    /* A packet from a device: return 1 when taken, 0 to have paho offer it
     * again later (the app's queue is full). */
    int (*on_message)(void *app, uint64_t device_id, int kind, const void *payload, size_t len);
    /* The link carrying device_id went up or down. */
    void (*on_link)(void *app, uint64_t device_id, int up);
    void *app;
} links_config;

int links_new(const links_config *cfg, mqtt_links **out);
/* Starts connecting (not fatal if the broker is down: the supervisor retries). */
int links_start(mqtt_links *l);
/* Disconnects every link and frees everything. */
void links_free(mqtt_links *l);

/* Subscribes device_id's topics on its link (now, or when the link connects). */
int links_bind(mqtt_links *l, uint64_t device_id);
/* Unsubscribes and forgets device_id. */
int links_unbind(mqtt_links *l, uint64_t device_id);
/* Publishes at QoS 1 on "<root>/devices/<id>/<suffix>". 0, -ENOTCONN when the
 * link is down, -EAGAIN when paho refuses for now, -EIO. */
int links_publish(mqtt_links *l, uint64_t device_id, const char *suffix, const void *payload,
                  size_t len, int retained);
/* Links connected and total (for /healthz). */
void links_status(mqtt_links *l, int *up, int *total);

#endif
