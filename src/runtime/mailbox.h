/* mailbox.h: bounded multi-producer, single-consumer mailboxes.
 *
 * Built from Concurrency Kit SPSC rings, one per producing thread, created
 * the first time that thread pushes to the mailbox. A preempted producer can
 * stall nobody: it owns its ring alone. (ck_ring's MPSC enqueue commits in
 * order, so with many more threads than cores every producer spins behind a
 * preempted one.)
 *
 * One atomic count of pending envelopes per mailbox drives scheduling (the
 * Pony runtime's rule): the push whose increment finds 0 calls the wake
 * function; the consumer subtracts what it handled and, if anything is left,
 * runs again on its own. The increment is sequentially consistent, which is
 * the full fence between publishing an envelope and reading the consumer's
 * state, so no wake-up is lost.
 *
 * Envelopes from one producer thread arrive in the order pushed; envelopes
 * from different producers have no order. */
#ifndef TT_RUNTIME_MAILBOX_H
#define TT_RUNTIME_MAILBOX_H

#include <stddef.h>
#include <stdint.h>
#include "runtime/envelope.h"

/* Called (by the pushing thread) when a mailbox goes from empty to non-empty. */
typedef void (*rt_wake_fn)(void *arg);

/* ring_capacity: slots per producer ring, rounded up to a power of two, at
 * least 4. Each producer can have that many envelopes pending, minus one. */
rt_mailbox *rt_mailbox_new(uint32_t ring_capacity, rt_wake_fn wake, void *arg);
/* Frees the mailbox, its rings and any envelope still in them. Only when no
 * thread can push any more. */
void rt_mailbox_free(rt_mailbox *mb);

/* Pushes env. 0 on success (the mailbox owns env), -EAGAIN when this
 * thread's ring is full (the caller still owns env), -ENOMEM. */
int rt_mailbox_push(rt_mailbox *mb, rt_envelope *env);

/* Consumer side; one consumer at a time. Pops up to max envelopes, visiting
 * rings round-robin so that no producer starves another. Does not change the
 * pending count: call rt_mailbox_done with what was popped. */
size_t rt_mailbox_pop(rt_mailbox *mb, rt_envelope **out, size_t max);
/* Subtracts n handled envelopes. Returns 1 when envelopes remain pending (the
 * consumer must run again; no wake will come for them), else 0. */
int rt_mailbox_done(rt_mailbox *mb, size_t n);

/* Pending envelopes (approximate while producers run). */
uint64_t rt_mailbox_depth(const rt_mailbox *mb);

#endif
