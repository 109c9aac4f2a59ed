/* actor.h: actors and the M:N scheduler they run on.
 *
 * An actor is state plus a mailbox plus a dispatch function. Pooled actors
 * run on a small pool of scheduler threads (about one per core): an actor is
 * put on the run queue only when its mailbox goes from empty to non-empty,
 * runs a bounded batch of envelopes, then yields (and re-queues itself when
 * more is pending). So an actor's state is touched by one thread at a time
 * and thousands of actors need no thousands of threads. A dedicated actor
 * (for work that blocks, like fsync) has a thread of its own that sleeps until
 * its mailbox wakes it.
 *
 * After each batch the runtime calls batch_end, so an actor can finish work
 * that spans a batch (the persistence actor commits its WriteBatch there).
 *
 * Timers: rt_timer_at delivers an envelope of the given type to an actor at a
 * time (milliseconds on tt_now_ms's clock); a timer is never lost: if the
 * mailbox is full at that moment, delivery is retried shortly after. */
#ifndef TT_RUNTIME_ACTOR_H
#define TT_RUNTIME_ACTOR_H

#include <stdint.h>
#include "runtime/envelope.h"
#include "runtime/mailbox.h"

typedef struct rt_sched rt_sched;
typedef struct rt_actor rt_actor;

typedef struct rt_actor_ops {
    /* Handles one envelope; owns it (frees or forwards it). */
    void (*dispatch)(rt_actor *self, void *state, rt_envelope *env);
    /* Optional: called after each batch of dispatches. */
    void (*batch_end)(rt_actor *self, void *state);
    /* Optional: called once from rt_sched_stop after the actor is drained. */
    void (*stopped)(rt_actor *self, void *state);
} rt_actor_ops;

/* nthreads <= 0 means one per online core. */
rt_sched *rt_sched_new(int nthreads);
int rt_sched_start(rt_sched *s);
/* Drains: returns once every mailbox is empty and no actor runs, then stops
 * the pool threads, dedicated threads and the timer thread. Envelopes sent
 * while draining are still handled. Pending timers are dropped.
 * Sends between actors are tracked; threads that are not actors should stop
 * sending first. Not from an actor; calling it again does nothing. */
void rt_sched_stop(rt_sched *s);
/* Frees the scheduler and every actor made on it (after rt_sched_stop, which
 * it calls if needed), with any envelope still queued. Only once no thread
 * can send to those actors any more. */
void rt_sched_free(rt_sched *s);

/* kind: a short static label (for metrics: "router", "device", ...). */
rt_actor *rt_actor_new(rt_sched *s, const char *kind, uint32_t ring_capacity,
                       const rt_actor_ops *ops, void *state);
/* Same, but the actor runs on a dedicated thread; batch is the most envelopes
 * it takes per batch. */
rt_actor *rt_actor_new_dedicated(rt_sched *s, const char *kind, uint32_t ring_capacity,
                                 uint32_t batch, const rt_actor_ops *ops, void *state);

/* 0, or -EAGAIN when the actor's mailbox is full (caller keeps env). */
int rt_send(rt_actor *to, rt_envelope *env);
rt_mailbox *rt_actor_mailbox(rt_actor *a);
const char *rt_actor_kind(const rt_actor *a);
void *rt_actor_state(rt_actor *a);

/* Delivers an envelope {type, version 1, no payload, corr = arg} at due_ms.
 * Timers due at the same time are sent in the order set, unless a full
 * mailbox made one wait for its retry. 0 or -ENOMEM. */
int rt_timer_at(rt_sched *s, rt_actor *to, int64_t due_ms, uint16_t type, uint64_t arg);

/* Sum of mailbox depths per kind, for metrics: calls fn(kind, depth) once per
 * kind. Safe from any thread. */
void rt_sched_depths(rt_sched *s, void (*fn)(const char *kind, uint64_t depth, void *arg), void *arg);

/* A reply mailbox for a thread that is not an actor (an HTTP worker): it
 * pushes requests naming rt_waiter_mailbox() as reply and blocks in
 * rt_waiter_wait until the reply with its correlation id arrives. Replies
 * with another corr (answers to earlier requests given up on) are freed. */
typedef struct rt_waiter rt_waiter;
rt_waiter *rt_waiter_new(void);
/* Only once no actor can push to it any more, e.g. after rt_sched_stop.
 * Having received every reply is not enough: the actor that pushed the last
 * one may still be inside that push (waking the waiter) when the waiting
 * thread returns with it. */
void rt_waiter_free(rt_waiter *w);
rt_mailbox *rt_waiter_mailbox(rt_waiter *w);
/* Returns the reply, or NULL after timeout_ms (timeout_ms < 0: no limit). */
rt_envelope *rt_waiter_wait(rt_waiter *w, uint64_t corr, int timeout_ms);

#endif
