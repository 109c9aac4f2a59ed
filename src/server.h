/* server.h: the server object shared by the actors and the HTTP edge.
 *
 * Fields are set before the actors start and read-only afterwards, except
 * the atomics (each says who writes it). */
#ifndef TT_SERVER_H
#define TT_SERVER_H

#include <stdatomic.h>
#include <stdint.h>

#include "actors/persist.h"
#include "http/http.h"
#include "mqtt/link.h"
#include "mqtt/dynsec.h"
#include "runtime/actor.h"
#include "store/store.h"
#include "taratxt/taratxt.h"
#include "util/crypto.h"

typedef struct dev_handle dev_handle;

/* Device registry: id -> handle, read by any thread (paho callbacks, HTTP),
 * written by the router only. Two levels of fixed chunks, so a reader never
 * sees a table being moved. */
#define DEVREG_CHUNK_BITS 12
#define DEVREG_CHUNKS 4096
typedef struct devreg {
    _Atomic(dev_handle **) chunks[DEVREG_CHUNKS];
} devreg;
dev_handle *devreg_get(devreg *r, uint64_t id);
int devreg_put(devreg *r, uint64_t id, dev_handle *h);

struct tt_server {
    tt_server_options o;          /* strings point into owned copies below */
    char *owned[12];
    char *db_dir;
    tt_store *store;
    uint8_t key[TT_KEY_BYTES];    /* server key: seals device passwords */
    rt_sched *sched;
    rt_actor *persist;
    rt_actor *router;
    rt_actor *otp;
    mqtt_links *links;
    struct dynsec *dynsec;        /* broker ACL management, or NULL */
    http_server *http;
    _Atomic int store_ok;         /* cleared by persist on a failed write */
    _Atomic uint64_t next_message_id; /* ids are handed out by fetch_add */
    devreg reg;
    char *initial_token;
    int started;
};


#endif
