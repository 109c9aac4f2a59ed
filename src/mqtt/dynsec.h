/* dynsec.h: broker-enforced device access through mosquitto's
 * dynamic-security plugin (API.md section 8, "Broker access").
 *
 * A dedicated admin connection (its own paho client, id "<prefix>-admin",
 * the server's broker credentials) publishes plugin commands to
 * "$CONTROL/dynamic-security/v1" and reads the answers on
 * "$CONTROL/dynamic-security/v1/response". When the broker answers, the
 * state is MANAGED: the server's own user gets a role granting the server's
 * topics, and every device gets one broker client (username = client id =
 * "device-<id>", the password of POST /devices) with a role "device-<id>"
 * that may publish only P/status, P/report, P/inbound and subscribe only
 * P/send, P/pins, P/ack of its own P. When the broker refuses the commands or
 * does not answer, the state is UNMANAGED (one warning is logged).
 *
 * At every (re)connect it reconciles: lists the broker's clients, creates
 * the missing device clients (with the passwords the app supplies), and
 * deletes "device-<id>" clients the app no longer has. Changes made while the
 * broker is down are applied when it returns (reconciliation covers them).
 * Deleting a client or setting its password makes the broker disconnect that
 * device without its Last Will. */
#ifndef TT_MQTT_DYNSEC_H
#define TT_MQTT_DYNSEC_H

#include <stddef.h>
#include <stdint.h>

typedef struct dynsec dynsec;

enum { DYNSEC_UNKNOWN = 0, DYNSEC_MANAGED = 1, DYNSEC_UNMANAGED = 2 };

typedef struct dynsec_device {
    uint64_t id;
    char *password;   /* plaintext, malloc'd; freed by dynsec */
} dynsec_device;

typedef struct dynsec_config {
    const char *url;
    const char *username;      /* the server's broker user (may be NULL) */
    const char *password;
    const char *client_prefix; /* admin client id "<prefix>-admin" */
    const char *topic_root;    /* "taratxt/v1" */
    /* Called on dynsec's own thread at each reconciliation: fills a malloc'd
     * array of every live device with its password. 0 or negative errno. */
    int (*list_devices)(void *app, dynsec_device **out, size_t *n);
    void *app;
} dynsec_config;

int dynsec_new(const dynsec_config *cfg, dynsec **out);
int dynsec_start(dynsec *d);
void dynsec_free(dynsec *d);
int dynsec_state(dynsec *d);

/* Queue a change (applied in order on dynsec's thread; never blocks the
 * caller). Create-or-re-key a device's client; delete it. 0 or -ENOMEM. */
int dynsec_put_device(dynsec *d, uint64_t id, const char *password);
int dynsec_delete_device(dynsec *d, uint64_t id);

#endif
