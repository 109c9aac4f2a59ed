/* persist.h: the persistence actor, the only RocksDB writer.
 *
 * Actors send it PERSIST_WRITE envelopes built with the preq_* builder: a
 * list of key operations and a list of "posts", envelopes to deliver once
 * those operations are on disk. The actor drains its mailbox into one
 * WriteBatch, commits it with sync=true (group commit: one fsync serves every
 * request of the batch), then delivers every post of the batch. When the
 * commit fails, each post is delivered with its fail_type instead, and the
 * store is marked unhealthy. A post whose mailbox is full is retried a few
 * milliseconds later, never dropped. */
#ifndef TT_ACTORS_PERSIST_H
#define TT_ACTORS_PERSIST_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include "runtime/actor.h"
#include "store/store.h"

typedef struct preq preq;

preq *preq_new(void);
void preq_free(preq *q);
int preq_put(preq *q, const void *key, size_t klen, const void *val, size_t vlen);
int preq_del(preq *q, const void *key, size_t klen);
/* Delivers {type, payload, corr} to mailbox `to` after the commit, or
 * {fail_type, payload, corr} if it failed (fail_type 0: then nothing). */
int preq_post(preq *q, rt_mailbox *to, uint64_t corr, uint16_t type, uint16_t fail_type,
              const void *payload, size_t len);
size_t preq_nops(const preq *q);
/* Appends src's operations and posts to dst and frees src (either way).
 * 0 or -ENOMEM (dst unchanged). */
int preq_append(preq *dst, preq *src);
/* Builds the PERSIST_WRITE envelope and frees the builder; NULL on ENOMEM. */
rt_envelope *preq_finish(preq *q);


/* Creates the actor on its own thread. *store_ok is cleared on a failed write. */
rt_actor *persist_new(rt_sched *s, tt_store *st, _Atomic int *store_ok);

#endif
