/* device.h: the device actor, one per gateway device.
 *
 * It owns that device's session as the server sees it: online state (from
 * the retained P/status and the Last Will), the priority send queue (a window
 * in memory, the backlog in RocksDB), the window of unreported messages,
 * pacing by rate_per_minute, re-sends, dispatch timeouts, and every change to
 * the state of its unfinished messages. Its writes go to the persistence
 * actor one request at a time, so they land in the order it made them.
 *
 * The handle is what other threads may read: each atomic there is written by
 * the device actor alone, except `queued`, which the router increments when it
 * routes a message here (the device actor decrements it when the message
 * leaves `pending`), and rate_per_minute, written by the router. */
#ifndef TT_ACTORS_DEVICE_H
#define TT_ACTORS_DEVICE_H

#include <stdatomic.h>
#include <stdint.h>

#include "runtime/actor.h"

struct tt_server;

typedef struct dev_handle {
    uint64_t id;
    uint64_t account_id;
    rt_actor *actor;
    _Atomic int online;
    _Atomic int64_t queued;        /* outbound messages still pending */
    _Atomic int64_t inflight;      /* handed over, not yet reported */
    _Atomic int64_t last_seen_at;  /* ms, 0 never */
    _Atomic uint32_t rate_per_minute;
    _Atomic int64_t pins;          /* pins of this device (router writes) */
    _Atomic int deleted;
} dev_handle;

/* Creates the handle and the actor, registers it, and starts it (it binds its
 * link and loads its backlog from the store). queued: pending messages the
 * store holds for it. */
dev_handle *device_spawn(struct tt_server *srv, uint64_t id, uint64_t account_id, uint32_t rate,
                         int64_t queued, int64_t last_seen_at, int64_t pins);

/* Link/paho side: hands a packet to the device's actor. 1 taken, 0 full. */
int device_offer_packet(struct tt_server *srv, uint64_t device_id, int kind, const void *payload, size_t len);
void device_link_changed(struct tt_server *srv, uint64_t device_id, int up);

#endif
