/* test_actor.c: the scheduler runs pooled actors in bounded batches with
 * batch_end after each, dedicated actors on their own thread only after
 * start, drains (including what actors send each other while draining)
 * before stopping and calls each stopped hook once; timers arrive in due
 * order with the promised envelope, survive a full mailbox and follow
 * tt_now_ms; depths aggregate per kind; waiters get their reply, drop stale
 * ones and time out. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/actor.h"
#include "util/clock.h"
#include "rt_check.h"

static void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* Sends, retrying while the target's ring is full, as a real sender does. */
static void send_retry(rt_actor *to, rt_envelope *env)
{
    while (rt_send(to, env) == -EAGAIN)
        sched_yield();
}

static rt_envelope *mk(uint16_t type, uint64_t corr)
{
    rt_envelope *e = rt_envelope_new(type, 1, NULL, 0);

    e->corr = corr;
    return e;
}

/* ---- counting actors ---------------------------------------------------- */

typedef struct counter {
    _Atomic int running;            /* set while dispatching */
    uint64_t next;                  /* expected corr */
    uint64_t handled;
    uint64_t in_batch, max_batch, batches;
    int stopped;
    bool order_ok;
    pthread_t thread;               /* dedicated: the one thread it ran on */
    bool thread_ok;
    rt_actor *forward;              /* chain test: where to pass tokens */
    _Atomic uint64_t *hops;
} counter;

static void counter_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    counter *c = state;

    (void)self;
    RT_CHECK_EQ(atomic_exchange(&c->running, 1), 0);
    if (c->handled == 0)
        c->thread = pthread_self();
    else if (!pthread_equal(c->thread, pthread_self()))
        c->thread_ok = false;
    if (env->corr != c->next)
        c->order_ok = false;
    c->next = env->corr + 1;
    c->handled++;
    c->in_batch++;
    atomic_store(&c->running, 0);
    rt_envelope_free(env);
}

static void counter_batch_end(rt_actor *self, void *state)
{
    counter *c = state;

    (void)self;
    RT_CHECK_EQ(atomic_exchange(&c->running, 1), 0);
    if (c->in_batch > c->max_batch)
        c->max_batch = c->in_batch;
    c->in_batch = 0;
    c->batches++;
    atomic_store(&c->running, 0);
}

static void counter_stopped(rt_actor *self, void *state)
{
    (void)self;
    ((counter *)state)->stopped++;
}

static const rt_actor_ops counter_ops = { counter_dispatch, counter_batch_end, counter_stopped };

static void counter_init(counter *c)
{
    memset(c, 0, sizeof *c);
    atomic_init(&c->running, 0);
    c->order_ok = true;
    c->thread_ok = true;
}

typedef struct depth_seen {
    const char *kinds[8];
    uint64_t depths[8];
    int n;
} depth_seen;

static void depth_cb(const char *kind, uint64_t depth, void *arg)
{
    depth_seen *d = arg;

    if (d->n < 8) {
        d->kinds[d->n] = kind;
        d->depths[d->n] = depth;
        d->n++;
    }
}

static uint64_t depth_of(const depth_seen *d, const char *kind)
{
    for (int i = 0; i < d->n; i++)
        if (strcmp(d->kinds[i], kind) == 0)
            return d->depths[i];
    return UINT64_MAX;
}

static void test_pooled(void)
{
    enum { NA = 200, NB = 3, PER = 100 };
    rt_sched *s = rt_sched_new(2);
    counter *cs = calloc(NA + NB, sizeof *cs);
    rt_actor *as[NA + NB];
    depth_seen d = { .n = 0 };

    for (int i = 0; i < NA + NB; i++) {
        counter_init(&cs[i]);
        as[i] = rt_actor_new(s, i < NA ? "worker" : "other", 128, &counter_ops, &cs[i]);
        RT_CHECK(as[i] != NULL);
    }
    RT_CHECK(strcmp(rt_actor_kind(as[0]), "worker") == 0);
    RT_CHECK(rt_actor_state(as[0]) == &cs[0]);
    RT_CHECK(rt_actor_mailbox(as[0]) != NULL);
    /* Queued before start: nothing runs yet, so depths are exact. */
    for (int i = 0; i < NA + NB; i++)
        for (uint64_t k = 0; k < PER; k++)
            RT_CHECK_EQ(rt_send(as[i], mk(1, k)), 0);
    rt_sched_depths(s, depth_cb, &d);
    RT_CHECK_EQ(d.n, 2);
    RT_CHECK_EQ(depth_of(&d, "worker"), (uint64_t)NA * PER);
    RT_CHECK_EQ(depth_of(&d, "other"), (uint64_t)NB * PER);

    RT_CHECK_EQ(rt_sched_start(s), 0);
    /* More while running, from two threads' worth of rings. */
    for (int i = 0; i < NA + NB; i++)
        for (uint64_t k = PER; k < 2 * PER; k++)
            send_retry(as[i], mk(1, k));
    rt_sched_stop(s);

    for (int i = 0; i < NA + NB; i++) {
        RT_CHECK_EQ(cs[i].handled, 2 * PER);
        RT_CHECK(cs[i].order_ok);
        RT_CHECK(cs[i].max_batch <= 64);
        RT_CHECK(cs[i].batches >= 4);      /* 200 envelopes, 64 a batch */
        RT_CHECK_EQ(cs[i].in_batch, 0);    /* batch_end after every batch */
        RT_CHECK_EQ(cs[i].stopped, 1);
    }
    d.n = 0;
    rt_sched_depths(s, depth_cb, &d);
    RT_CHECK_EQ(depth_of(&d, "worker"), 0);
    rt_sched_stop(s);                      /* idempotent: hooks not rerun */
    RT_CHECK_EQ(cs[0].stopped, 1);
    rt_sched_free(s);
    free(cs);
}

/* ---- drain with actor-to-actor traffic ---------------------------------- */

static void chain_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    counter *c = state;

    (void)self;
    RT_CHECK_EQ(atomic_exchange(&c->running, 1), 0);
    c->handled++;
    atomic_fetch_add(c->hops, 1);
    atomic_store(&c->running, 0);
    if (env->corr > 0) {
        env->corr--;
        send_retry(c->forward, env);   /* forwarded: ownership moves on */
    } else {
        rt_envelope_free(env);
    }
}

static const rt_actor_ops chain_ops = { chain_dispatch, NULL, counter_stopped };

static void test_drain_chain(void)
{
    enum { N = 10, TOKENS = 50, HOPS = 2000 };
    rt_sched *s = rt_sched_new(2);
    counter cs[N + 1];
    rt_actor *as[N + 1];
    _Atomic uint64_t hops = 0;
    uint64_t handled = 0;

    for (int i = 0; i <= N; i++) {
        counter_init(&cs[i]);
        cs[i].hops = &hops;
        if (i < N)
            as[i] = rt_actor_new(s, "chain", 64, &chain_ops, &cs[i]);
        else        /* one dedicated actor in the ring too */
            as[i] = rt_actor_new_dedicated(s, "chain-d", 64, 8, &chain_ops, &cs[i]);
    }
    for (int i = 0; i <= N; i++)
        cs[i].forward = as[(i + 1) % (N + 1)];
    RT_CHECK_EQ(rt_sched_start(s), 0);
    for (int t = 0; t < TOKENS; t++)
        send_retry(as[t % (N + 1)], mk(1, HOPS));
    /* Stop at once: it must still wait for every hop of every token. */
    rt_sched_stop(s);
    RT_CHECK_EQ(atomic_load(&hops), (uint64_t)TOKENS * (HOPS + 1));
    for (int i = 0; i <= N; i++) {
        handled += cs[i].handled;
        RT_CHECK_EQ(cs[i].stopped, 1);
    }
    RT_CHECK_EQ(handled, (uint64_t)TOKENS * (HOPS + 1));
    rt_sched_free(s);
}

/* ---- dedicated actors --------------------------------------------------- */

static void test_dedicated(void)
{
    rt_sched *s = rt_sched_new(1);
    counter c;
    rt_actor *a;

    counter_init(&c);
    a = rt_actor_new_dedicated(s, "persist", 256, 5, &counter_ops, &c);
    RT_CHECK(a != NULL);
    for (uint64_t k = 0; k < 100; k++)
        RT_CHECK_EQ(rt_send(a, mk(1, k)), 0);
    sleep_ms(50);
    RT_CHECK_EQ(c.handled, 0);             /* nothing runs before start */
    RT_CHECK_EQ(rt_sched_start(s), 0);
    for (uint64_t k = 100; k < 1000; k++)
        send_retry(a, mk(1, k));
    rt_sched_stop(s);
    RT_CHECK_EQ(c.handled, 1000);
    RT_CHECK(c.order_ok);
    RT_CHECK(c.thread_ok);
    RT_CHECK(!pthread_equal(c.thread, pthread_self()));
    RT_CHECK(c.max_batch <= 5);
    RT_CHECK(c.batches >= 200);
    RT_CHECK_EQ(c.stopped, 1);
    rt_sched_free(s);

    /* Made after start: its thread runs straight away. */
    s = rt_sched_new(1);
    RT_CHECK_EQ(rt_sched_start(s), 0);
    counter_init(&c);
    a = rt_actor_new_dedicated(s, "late", 16, 0, &counter_ops, &c);
    for (uint64_t k = 0; k < 100; k++)
        send_retry(a, mk(1, k));
    rt_sched_stop(s);
    RT_CHECK_EQ(c.handled, 100);
    rt_sched_free(s);

    /* Never started: stop and free release everything still queued. */
    s = rt_sched_new(2);
    counter_init(&c);
    a = rt_actor_new_dedicated(s, "idle", 16, 0, &counter_ops, &c);
    RT_CHECK_EQ(rt_send(a, mk(1, 0)), 0);
    a = rt_actor_new(s, "idle2", 16, &counter_ops, &c);
    RT_CHECK_EQ(rt_send(a, mk(1, 0)), 0);
    rt_sched_free(s);
    RT_CHECK_EQ(c.handled, 0);
}

/* ---- timers ------------------------------------------------------------- */

typedef struct timer_log {
    pthread_mutex_t mu;
    int n;
    uint64_t corr[64];
    int64_t at[64];
    bool fields_ok;
    sem_t *block;                   /* if set, the first dispatch waits on it */
} timer_log;

static void timer_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    timer_log *t = state;

    (void)self;
    if (t->block != NULL) {
        sem_t *b = t->block;
        t->block = NULL;
        sem_wait(b);
    }
    pthread_mutex_lock(&t->mu);
    if (env->type != 7 || env->version != 1 || env->len != 0 || env->reply != NULL)
        t->fields_ok = false;
    if (t->n < 64) {
        t->corr[t->n] = env->corr;
        t->at[t->n] = tt_now_ms();
        t->n++;
    }
    pthread_mutex_unlock(&t->mu);
    rt_envelope_free(env);
}

static const rt_actor_ops timer_ops = { timer_dispatch, NULL, NULL };

static int timer_count(timer_log *t)
{
    int n;

    pthread_mutex_lock(&t->mu);
    n = t->n;
    pthread_mutex_unlock(&t->mu);
    return n;
}

static bool wait_count(timer_log *t, int want, int timeout_ms)
{
    int64_t end = tt_mono_ms() + timeout_ms;

    while (timer_count(t) < want) {
        if (tt_mono_ms() > end)
            return false;
        sleep_ms(2);
    }
    return true;
}

static void timer_log_init(timer_log *t)
{
    memset(t, 0, sizeof *t);
    pthread_mutex_init(&t->mu, NULL);
    t->fields_ok = true;
}

static void test_timers(void)
{
    rt_sched *s = rt_sched_new(2);
    timer_log t, full;
    rt_actor *a, *b;
    int64_t now;
    sem_t block;

    timer_log_init(&t);
    timer_log_init(&full);
    a = rt_actor_new(s, "timed", 16, &timer_ops, &t);
    b = rt_actor_new(s, "blocked", 4, &timer_ops, &full);
    RT_CHECK_EQ(rt_sched_start(s), 0);

    /* Due order, whatever the order of scheduling; past due fires now. */
    now = tt_now_ms();
    RT_CHECK_EQ(rt_timer_at(s, a, now + 120, 7, 11), 0);
    RT_CHECK_EQ(rt_timer_at(s, a, now + 60, 7, 22), 0);
    RT_CHECK_EQ(rt_timer_at(s, a, now - 10, 7, 33), 0);
    RT_CHECK_EQ(rt_timer_at(s, a, now + 60, 7, 23), 0);
    RT_CHECK(wait_count(&t, 4, 3000));
    RT_CHECK_EQ(t.corr[0], 33);
    RT_CHECK_EQ(t.corr[1], 22);
    RT_CHECK_EQ(t.corr[2], 23);
    RT_CHECK_EQ(t.corr[3], 11);
    RT_CHECK(t.at[1] >= now + 60);
    RT_CHECK(t.at[3] >= now + 120);
    RT_CHECK(t.fields_ok);

    /* A full mailbox: the target blocks in its first dispatch while twenty
     * timers come due; its ring (3 usable slots) fills and the rest must
     * be retried until they fit. */
    sem_init(&block, 0, 0);
    full.block = &block;
    now = tt_now_ms();
    for (uint64_t k = 0; k < 20; k++)
        RT_CHECK_EQ(rt_timer_at(s, b, now, 7, 100 + k), 0);
    sleep_ms(150);
    RT_CHECK(timer_count(&full) <= 1);
    sem_post(&block);
    RT_CHECK(wait_count(&full, 20, 5000));
    /* Each exactly once (a retried timer may be overtaken by a later one
     * that found room). */
    {
        int seen[20] = { 0 };
        for (int k = 0; k < 20; k++)
            if (full.corr[k] >= 100 && full.corr[k] < 120)
                seen[full.corr[k] - 100]++;
        for (int k = 0; k < 20; k++)
            RT_CHECK_EQ(seen[k], 1);
    }
    RT_CHECK(full.fields_ok);

    /* Timers follow tt_now_ms, including a test's advance of it. */
    now = tt_now_ms();
    RT_CHECK_EQ(rt_timer_at(s, a, now + 3600 * 1000, 7, 44), 0);
    sleep_ms(80);
    RT_CHECK_EQ(timer_count(&t), 4);
    tt_clock_advance(3600 * 1000);
    RT_CHECK(wait_count(&t, 5, 2000));
    RT_CHECK_EQ(t.corr[4], 44);

    /* Pending timers are dropped at stop (and freed without a leak). */
    RT_CHECK_EQ(rt_timer_at(s, a, tt_now_ms() + 60000, 7, 55), 0);
    rt_sched_stop(s);
    RT_CHECK_EQ(timer_count(&t), 5);
    rt_sched_free(s);
    sem_destroy(&block);
    pthread_mutex_destroy(&t.mu);
    pthread_mutex_destroy(&full.mu);
}

/* ---- waiters ------------------------------------------------------------ */

/* Echoes each request to its reply mailbox; type 3 first sleeps 100 ms. */
static void echo_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    rt_envelope *r;

    (void)self;
    (void)state;
    if (env->type == 3)
        sleep_ms(100);
    r = mk(2, env->corr);
    while (rt_mailbox_push(env->reply, r) == -EAGAIN)
        sched_yield();
    rt_envelope_free(env);
}

static const rt_actor_ops echo_ops = { echo_dispatch, NULL, NULL };

static void ask(rt_actor *to, rt_waiter *w, uint16_t type, uint64_t corr)
{
    rt_envelope *e = mk(type, corr);

    e->reply = rt_waiter_mailbox(w);
    send_retry(to, e);
}

typedef struct client_arg {
    rt_actor *to;
    int n;
    int ok;
    rt_waiter *w;
} client_arg;

/* A client thread; its waiter outlives it and is freed after the scheduler
 * stops (an actor may still be finishing the push of the last reply). */
static void *client_main(void *p)
{
    client_arg *c = p;
    rt_waiter *w = c->w;

    for (int i = 0; i < c->n; i++) {
        rt_envelope *r;

        ask(c->to, w, 1, (uint64_t)i + 1);
        r = rt_waiter_wait(w, (uint64_t)i + 1, 5000);
        if (r != NULL && r->corr == (uint64_t)i + 1)
            c->ok++;
        rt_envelope_free(r);
    }
    return NULL;
}

static void test_waiter(void)
{
    rt_sched *s = rt_sched_new(2);
    rt_actor *echo = rt_actor_new(s, "echo", 64, &echo_ops, NULL);
    rt_actor *echo2 = rt_actor_new(s, "echo", 64, &echo_ops, NULL);
    rt_waiter *w = rt_waiter_new();
    rt_envelope *r;
    int64_t t0;

    RT_CHECK_EQ(rt_sched_start(s), 0);

    ask(echo, w, 1, 1);
    r = rt_waiter_wait(w, 1, 2000);
    RT_CHECK(r != NULL && r->corr == 1 && r->type == 2);
    rt_envelope_free(r);

    /* A reply nobody waits for any more is dropped by the next wait. */
    ask(echo, w, 1, 2);
    ask(echo, w, 1, 3);
    r = rt_waiter_wait(w, 3, 2000);
    RT_CHECK(r != NULL && r->corr == 3);
    rt_envelope_free(r);

    /* Timeouts. */
    t0 = tt_mono_ms();
    RT_CHECK(rt_waiter_wait(w, 99, 0) == NULL);
    RT_CHECK(tt_mono_ms() - t0 < 500);     /* at once (generous for busy CI) */
    t0 = tt_mono_ms();
    RT_CHECK(rt_waiter_wait(w, 99, 60) == NULL);
    RT_CHECK(tt_mono_ms() - t0 >= 59);

    /* Given up on, then answered late: the late reply is dropped. */
    ask(echo, w, 3, 5);
    RT_CHECK(rt_waiter_wait(w, 5, 10) == NULL);
    ask(echo, w, 1, 6);
    r = rt_waiter_wait(w, 6, 2000);
    RT_CHECK(r != NULL && r->corr == 6);
    rt_envelope_free(r);

    /* No limit. */
    ask(echo2, w, 1, 7);
    r = rt_waiter_wait(w, 7, -1);
    RT_CHECK(r != NULL && r->corr == 7);
    rt_envelope_free(r);

    /* Many clients at once, each with its own waiter. */
    {
        enum { NC = 8, PER = 2000 };
        pthread_t th[NC];
        client_arg ca[NC];

        for (int i = 0; i < NC; i++) {
            ca[i] = (client_arg){ i % 2 ? echo : echo2, PER, 0, rt_waiter_new() };
            pthread_create(&th[i], NULL, client_main, &ca[i]);
        }
        for (int i = 0; i < NC; i++) {
            pthread_join(th[i], NULL);
            RT_CHECK_EQ(ca[i].ok, PER);
        }
        rt_sched_stop(s);
        for (int i = 0; i < NC; i++)
            rt_waiter_free(ca[i].w);
    }
    rt_waiter_free(w);
    rt_sched_free(s);
}

int main(void)
{
    test_pooled();
    test_drain_chain();
    test_dedicated();
    test_timers();
    test_waiter();
    return rt_check_finish("test_actor");
}
