/* test_stress.c: 128 producer threads send millions of envelopes to
 * thousands of actors (pooled, plus a few dedicated), and actors forward
 * some of them to a dedicated sink while the producers run; then a second,
 * "hot" phase aims all 128 producers at two actors, where consumers keep
 * popping envelopes whose producer has not counted them yet. Proves:
 *
 *  - no envelope lost and none duplicated: every (producer, actor) pair
 *    carries its own sequence number, checked in order on receipt (one
 *    producer's envelopes stay in order) and checked complete at the end;
 *  - no actor runs on two threads at once: an atomic "running" flag per
 *    actor is taken with an exchange on entry to dispatch and batch_end;
 *  - rt_sched_stop drains everything, including the forwards that actors
 *    send while draining.
 *
 * Producers retry -EAGAIN with sched_yield, as a real sender would; small
 * rings make that path hot. The message count defaults to 4,000,000 (less
 * under ThreadSanitizer, which is an order of magnitude slower); the
 * environment variable TT_STRESS_MSGS overrides it. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/actor.h"
#include "util/clock.h"
#include "rt_check.h"

#if defined(TT_TSAN) && TT_TSAN
#define STRESS_DEFAULT_MSGS 1000000
#else
#define STRESS_DEFAULT_MSGS 4000000
#endif

enum {
    NPROD = 128,
    NACT = 2000,
    NDEDICATED = 4,                 /* actors 0..3 run on their own threads */
    RING = 8,                       /* 7 in flight per producer per actor */
    FORWARD_EVERY = 32,             /* 1 in 32 envelopes is forwarded to the sink */
    MSG_DATA = 1,
    MSG_FORWARD = 2,
};

typedef struct actor_state {
    alignas(64) _Atomic int running;
    uint32_t expect[NPROD];         /* next sequence number per producer */
    uint64_t handled;
    uint64_t forwarded;
    uint64_t errors;
    int stopped;
} actor_state;

typedef struct sink_state {
    alignas(64) _Atomic int running;
    uint64_t handled;
    uint64_t errors;
} sink_state;

typedef struct producer_arg {
    int id;
    uint64_t count;
    uint32_t *sent;                 /* per actor */
    uint64_t forwards;
    uint64_t retries;
} producer_arg;

static rt_actor *actors[NACT];
static int nactors;
static actor_state *states;
static rt_actor *sink;
static sink_state sink_st;
static _Atomic int start_flag;
static _Atomic int ready;

static void send_retry(rt_actor *to, rt_envelope *env, uint64_t *retries)
{
    while (rt_send(to, env) == -EAGAIN) {
        (*retries)++;
        sched_yield();
    }
}

static void actor_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    actor_state *st = state;
    uint32_t p = (uint32_t)(env->corr >> 32), seq = (uint32_t)env->corr;

    (void)self;
    if (atomic_exchange_explicit(&st->running, 1, memory_order_acq_rel) != 0)
        st->errors++;
    if (p >= NPROD || seq != st->expect[p]) {
        st->errors++;
        if (st->errors < 5)
            fprintf(stderr, "actor %ld: producer %u seq %u, expected %u\n",
                    (long)(st - states), p, seq, p < NPROD ? st->expect[p] : 0);
    }
    if (p < NPROD)
        st->expect[p] = seq + 1;
    st->handled++;
    atomic_store_explicit(&st->running, 0, memory_order_release);

    if (env->type == MSG_FORWARD) {
        uint64_t retries = 0;

        /* Reuse the envelope: ownership moves on with it. */
        st->forwarded++;
        send_retry(sink, env, &retries);
    } else {
        rt_envelope_free(env);
    }
}

static void actor_batch_end(rt_actor *self, void *state)
{
    actor_state *st = state;

    (void)self;
    if (atomic_exchange_explicit(&st->running, 1, memory_order_acq_rel) != 0)
        st->errors++;
    atomic_store_explicit(&st->running, 0, memory_order_release);
}

static void actor_stopped(rt_actor *self, void *state)
{
    (void)self;
    ((actor_state *)state)->stopped++;
}

static void sink_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    sink_state *st = state;

    (void)self;
    if (atomic_exchange_explicit(&st->running, 1, memory_order_acq_rel) != 0)
        st->errors++;
    if (env->type != MSG_FORWARD)
        st->errors++;
    st->handled++;
    atomic_store_explicit(&st->running, 0, memory_order_release);
    rt_envelope_free(env);
}

static const rt_actor_ops actor_ops = { actor_dispatch, actor_batch_end, actor_stopped };
static const rt_actor_ops sink_ops = { sink_dispatch, NULL, NULL };

static void *producer_main(void *p)
{
    producer_arg *a = p;
    uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(a->id + 1);

    atomic_fetch_add(&ready, 1);
    while (!atomic_load_explicit(&start_flag, memory_order_acquire))
        sched_yield();
    for (uint64_t i = 0; i < a->count; i++) {
        uint32_t to;
        uint16_t type;
        rt_envelope *env;

        /* xorshift64 */
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        to = (uint32_t)(x % (uint64_t)nactors);
        type = (x >> 40) % FORWARD_EVERY == 0 ? MSG_FORWARD : MSG_DATA;
        env = rt_envelope_new(type, 1, NULL, 0);
        if (env == NULL) {
            RT_CHECK(env != NULL);
            return NULL;
        }
        env->corr = ((uint64_t)a->id << 32) | a->sent[to]++;
        if (type == MSG_FORWARD)
            a->forwards++;
        send_retry(actors[to], env, &a->retries);
    }
    return NULL;
}

/* One phase: NPROD producers spread `total` envelopes over nact actors (the
 * first ndedicated of them on their own threads), then the scheduler
 * drains and everything is checked. */
static void run_phase(const char *name, int nact, int ndedicated, uint64_t total)
{
    uint64_t per = total / NPROD, handled = 0, forwarded = 0, forwards_sent = 0, errors = 0;
    uint64_t retries = 0, mismatched = 0;
    pthread_t th[NPROD];
    producer_arg *pa = calloc(NPROD, sizeof *pa);
    rt_sched *s = rt_sched_new(0);
    int64_t t0, t1, t2;

    total = per * NPROD;
    nactors = nact;
    states = aligned_alloc(64, sizeof *states * (size_t)nact);
    memset(states, 0, sizeof *states * (size_t)nact);
    memset(&sink_st, 0, sizeof sink_st);
    atomic_store(&start_flag, 0);
    atomic_store(&ready, 0);
    for (int i = 0; i < nact; i++) {
        if (i < ndedicated)
            actors[i] = rt_actor_new_dedicated(s, "dedicated", RING, 16, &actor_ops, &states[i]);
        else
            actors[i] = rt_actor_new(s, "pooled", RING, &actor_ops, &states[i]);
        RT_CHECK(actors[i] != NULL);
    }
    sink = rt_actor_new_dedicated(s, "sink", 256, 256, &sink_ops, &sink_st);
    RT_CHECK(sink != NULL);
    RT_CHECK_EQ(rt_sched_start(s), 0);

    for (int i = 0; i < NPROD; i++) {
        pa[i].id = i;
        pa[i].count = per;
        pa[i].sent = calloc((size_t)nact, sizeof *pa[i].sent);
        RT_CHECK_EQ(pthread_create(&th[i], NULL, producer_main, &pa[i]), 0);
    }
    while (atomic_load(&ready) < NPROD)
        sched_yield();
    t0 = tt_mono_ms();
    atomic_store_explicit(&start_flag, 1, memory_order_release);
    for (int i = 0; i < NPROD; i++)
        pthread_join(th[i], NULL);
    t1 = tt_mono_ms();
    rt_sched_stop(s);
    t2 = tt_mono_ms();

    for (int a = 0; a < nact; a++) {
        handled += states[a].handled;
        forwarded += states[a].forwarded;
        errors += states[a].errors;
        RT_CHECK_EQ(states[a].stopped, 1);
        for (int p = 0; p < NPROD; p++)
            if (states[a].expect[p] != pa[p].sent[a])
                mismatched++;
    }
    for (int p = 0; p < NPROD; p++) {
        forwards_sent += pa[p].forwards;
        retries += pa[p].retries;
    }
    RT_CHECK_EQ(errors, 0);
    RT_CHECK_EQ(mismatched, 0);
    RT_CHECK_EQ(handled, total);
    RT_CHECK_EQ(forwarded, forwards_sent);
    RT_CHECK_EQ(sink_st.handled, forwards_sent);
    RT_CHECK_EQ(sink_st.errors, 0);
    fprintf(stderr,
            "stress %s: %d producers, %d actors (%d dedicated), %llu envelopes + %llu forwards "
            "in %lld ms (%.0f/s), drain %lld ms, %llu -EAGAIN retries\n",
            name, NPROD, nact, ndedicated, (unsigned long long)total,
            (unsigned long long)forwards_sent, (long long)(t1 - t0),
            (double)total * 1000.0 / (double)(t1 - t0 > 0 ? t1 - t0 : 1),
            (long long)(t2 - t1), (unsigned long long)retries);

    rt_sched_free(s);
    for (int i = 0; i < NPROD; i++)
        free(pa[i].sent);
    free(pa);
    free(states);
    states = NULL;
}

int main(void)
{
    const char *env_msgs = getenv("TT_STRESS_MSGS");
    uint64_t total = env_msgs != NULL ? strtoull(env_msgs, NULL, 10) : STRESS_DEFAULT_MSGS;

    /* Spread: thousands of mailboxes, a few producers each at a time. */
    run_phase("spread", NACT, NDEDICATED, total);
    /* Hot: every producer on the same two mailboxes, so consumers are busy
     * while producers are preempted between commit and count, and pop
     * envelopes not yet counted (the pending count dips below zero). */
    run_phase("hot", 2, 1, total / 4);
    return rt_check_finish("test_stress");
}
