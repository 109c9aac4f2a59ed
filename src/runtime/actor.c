/* actor.c: the M:N scheduler, dedicated actors, timers and reply waiters.
 *
 * Pooled actors run on a fixed pool of threads fed by one run queue (a
 * mutex, a condition variable and an intrusive FIFO). The queue is touched
 * only when a mailbox goes from empty to non-empty (the push that takes the
 * pending count from 0 to 1 calls sched_wake_pooled) and when an actor that
 * still has work after a batch goes to the back of the line. Because only
 * that one push schedules an actor, and the actor itself decides after each
 * batch whether to run again, an actor is never queued twice and never runs
 * on two threads at once.
 *
 * A dedicated actor owns a thread that sleeps on its own condition variable.
 * The handshake cannot lose a wake-up: the mailbox's seq_cst pending count
 * decides who wakes whom (see mailbox.c), and the wake itself is a flag set
 * under the actor's mutex, which the thread tests under the same mutex
 * before it sleeps.
 *
 * The scheduler counts actors that are queued, running or signalled
 * (`active`): incremented by every wake, decremented when an actor finds its
 * mailbox drained. rt_sched_stop waits for that count and every mailbox to
 * reach zero. An actor that sends to another during its run wakes it (and
 * so counts it) before its own run ends, so the count cannot touch zero
 * while actor-to-actor traffic is still in flight.
 *
 * Timers live in a binary min-heap ordered by (due, sequence) served by one
 * thread. The thread delivers the earliest due timer while holding the heap
 * lock, so a timer whose target mailbox is full simply gets a later due time
 * in place: no allocation is needed to retry it, and it can never be lost. */
#define _GNU_SOURCE
#include "runtime/actor.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "util/clock.h"

#define POOL_BATCH 64              /* envelopes per pooled actor run */
#define SCHED_TIMER_RETRY_MS 10     /* redelivery delay when a mailbox is full */
#define SCHED_TIMER_POLL_MS 50      /* longest timer sleep: notices clock moves */
#define WAITER_BATCH 16

typedef struct sched_timer {
    int64_t due;
    uint64_t seq;                   /* FIFO among equal due times */
    rt_actor *to;
    uint64_t arg;
    uint16_t type;
} sched_timer;

struct rt_actor {
    rt_sched *s;
    const char *kind;
    rt_actor_ops ops;
    void *state;
    rt_mailbox *mb;
    rt_actor *run_next;             /* run queue link, under s->rq_mu */
    rt_actor *all_next;             /* every actor, under s->actors_mu */
    bool dedicated;

    /* Dedicated actors only. */
    uint32_t batch;
    rt_envelope **buf;
    pthread_t thread;
    bool has_thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool signaled;                  /* under mu: a wake arrived */
    bool stop;                      /* under mu: leave the thread */
};

struct rt_sched {
    int nthreads;
    pthread_t *threads;
    int nrunning;                   /* pool threads created */
    bool started;                   /* caller's thread only */
    bool stopped;                   /* caller's thread only */

    /* The run queue. */
    alignas(64) pthread_mutex_t rq_mu;
    pthread_cond_t rq_cv;
    rt_actor *rq_head, *rq_tail;
    int rq_idle;                    /* pool threads waiting on rq_cv */
    bool rq_stop;

    /* Actors queued, running or signalled; see the top of the file. */
    alignas(64) _Atomic int64_t active;

    /* Read by dedicated threads under their own mutex. Release store in
     * rt_sched_start, acquire load in the thread: the thread then sees
     * everything set up before the start. */
    alignas(64) _Atomic bool go;

    pthread_mutex_t actors_mu;
    rt_actor *actors_head, *actors_tail;

    /* Timers. */
    pthread_mutex_t tm_mu;
    pthread_cond_t tm_cv;           /* CLOCK_MONOTONIC */
    sched_timer *heap;
    size_t heap_len, heap_cap;
    uint64_t tm_seq;
    bool tm_stop;
    bool tm_has_thread;
    pthread_t tm_thread;
};

/* ---- small helpers ------------------------------------------------------ */

/* Absolute CLOCK_MONOTONIC time ms from now, for pthread_cond_timedwait. */
static struct timespec sched_deadline(int64_t ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static int sched_cond_init_mono(pthread_cond_t *cv)
{
    pthread_condattr_t attr;
    int rc;

    rc = pthread_condattr_init(&attr);
    if (rc != 0)
        return -rc;
    rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(cv, &attr);
    pthread_condattr_destroy(&attr);
    return -rc;
}

static void sched_set_name(pthread_t t, const char *prefix, const char *what)
{
    char name[16];              /* the kernel's limit, NUL included */
    size_t n = 0;

    for (; *prefix != '\0' && n < sizeof name - 1; prefix++)
        name[n++] = *prefix;
    for (; *what != '\0' && n < sizeof name - 1; what++)
        name[n++] = *what;
    name[n] = '\0';
    (void)pthread_setname_np(t, name);
}

/* Runs one batch of at most max envelopes. Returns 1 when the mailbox still
 * has pending envelopes afterwards (nobody will wake the actor for them). */
static int sched_run_batch(rt_actor *a, rt_envelope **buf, size_t max)
{
    size_t n = rt_mailbox_pop(a->mb, buf, max);

    for (size_t i = 0; i < n; i++)
        a->ops.dispatch(a, a->state, buf[i]);
    if (n > 0 && a->ops.batch_end != NULL)
        a->ops.batch_end(a, a->state);
    return rt_mailbox_done(a->mb, n);
}

/* An actor found its mailbox drained and goes idle. Release: the stopping
 * thread's acquire load of 0 then sees everything the run did. */
static void sched_idle(rt_sched *s)
{
    atomic_fetch_sub_explicit(&s->active, 1, memory_order_release);
}

/* A wake makes one more actor active. Relaxed: the counter carries no data;
 * program order puts this before the run that later decrements it. */
static void sched_busy(rt_sched *s)
{
    atomic_fetch_add_explicit(&s->active, 1, memory_order_relaxed);
}

/* ---- pooled actors ------------------------------------------------------ */

static void sched_rq_append(rt_sched *s, rt_actor *a)
{
    a->run_next = NULL;
    if (s->rq_tail != NULL)
        s->rq_tail->run_next = a;
    else
        s->rq_head = a;
    s->rq_tail = a;
}

/* Wake function of a pooled actor's mailbox: called by the push that made
 * it non-empty, on the pushing thread. */
static void sched_wake_pooled(void *arg)
{
    rt_actor *a = arg;
    rt_sched *s = a->s;

    sched_busy(s);
    pthread_mutex_lock(&s->rq_mu);
    sched_rq_append(s, a);
    int idle = s->rq_idle > 0;
    pthread_mutex_unlock(&s->rq_mu);
    /* Signalled after the unlock, so the woken thread does not block at once
     * on the mutex we still hold. Not lost: the actor is on the queue, which
     * an idle thread checks under the mutex before it waits. */
    if (idle)
        pthread_cond_signal(&s->rq_cv);
}

static void *sched_pool_main(void *arg)
{
    rt_sched *s = arg;
    rt_envelope *buf[POOL_BATCH];
    rt_actor *a;

    pthread_mutex_lock(&s->rq_mu);
    for (;;) {
        while (s->rq_head == NULL && !s->rq_stop) {
            s->rq_idle++;
            pthread_cond_wait(&s->rq_cv, &s->rq_mu);
            s->rq_idle--;
        }
        if (s->rq_head == NULL)
            break;                  /* stopping and nothing left */
        a = s->rq_head;
        s->rq_head = a->run_next;
        if (s->rq_head == NULL)
            s->rq_tail = NULL;
        pthread_mutex_unlock(&s->rq_mu);

        if (sched_run_batch(a, buf, POOL_BATCH)) {
            /* More pending: to the back of the line, behind the others. */
            pthread_mutex_lock(&s->rq_mu);
            sched_rq_append(s, a);
        } else {
            sched_idle(s);
            pthread_mutex_lock(&s->rq_mu);
        }
    }
    pthread_mutex_unlock(&s->rq_mu);
    return NULL;
}

/* ---- dedicated actors --------------------------------------------------- */

static void sched_wake_dedicated(void *arg)
{
    rt_actor *a = arg;

    sched_busy(a->s);
    pthread_mutex_lock(&a->mu);
    a->signaled = true;
    pthread_mutex_unlock(&a->mu);
    /* After the unlock (see sched_wake_pooled); the flag is set under the
     * mutex, which the thread checks before it waits. */
    pthread_cond_signal(&a->cv);
}

static void *sched_dedicated_main(void *arg)
{
    rt_actor *a = arg;
    rt_sched *s = a->s;

    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (!a->stop &&
               !(a->signaled && atomic_load_explicit(&s->go, memory_order_acquire)))
            pthread_cond_wait(&a->cv, &a->mu);
        if (a->stop)
            break;
        a->signaled = false;
        pthread_mutex_unlock(&a->mu);

        while (sched_run_batch(a, a->buf, a->batch))
            ;
        sched_idle(s);
        pthread_mutex_lock(&a->mu);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* ---- timers ------------------------------------------------------------- */

static bool sched_timer_before(const sched_timer *x, const sched_timer *y)
{
    return x->due < y->due || (x->due == y->due && x->seq < y->seq);
}

static void sched_heap_up(sched_timer *h, size_t i)
{
    while (i > 0) {
        size_t p = (i - 1) / 2;
        sched_timer t;

        if (!sched_timer_before(&h[i], &h[p]))
            break;
        t = h[i];
        h[i] = h[p];
        h[p] = t;
        i = p;
    }
}

static void sched_heap_down(sched_timer *h, size_t len, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        sched_timer t;

        if (l < len && sched_timer_before(&h[l], &h[m]))
            m = l;
        if (r < len && sched_timer_before(&h[r], &h[m]))
            m = r;
        if (m == i)
            break;
        t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Tries to deliver timer t now. 0 or a negative errno (the caller retries). */
static int sched_timer_deliver(const sched_timer *t)
{
    rt_envelope *env = rt_envelope_new(t->type, 1, NULL, 0);
    int rc;

    if (env == NULL)
        return -ENOMEM;
    env->corr = t->arg;
    rc = rt_send(t->to, env);
    if (rc != 0)
        rt_envelope_free(env);
    return rc;
}

static void *sched_timer_main(void *arg)
{
    rt_sched *s = arg;

    pthread_mutex_lock(&s->tm_mu);
    while (!s->tm_stop) {
        int64_t now, wait;
        struct timespec ts;

        if (s->heap_len == 0) {
            pthread_cond_wait(&s->tm_cv, &s->tm_mu);
            continue;
        }
        now = tt_now_ms();
        if (s->heap[0].due <= now) {
            /* Delivered under the lock (see the top of the file); the push
             * never blocks, and its wake takes only run-queue or actor
             * locks, which are never held while taking tm_mu. */
            if (sched_timer_deliver(&s->heap[0]) == 0) {
                s->heap[0] = s->heap[--s->heap_len];
            } else {
                s->heap[0].due = now + SCHED_TIMER_RETRY_MS;
                s->heap[0].seq = s->tm_seq++;
            }
            sched_heap_down(s->heap, s->heap_len, 0);
            continue;
        }
        wait = s->heap[0].due - now;
        if (wait > SCHED_TIMER_POLL_MS)
            wait = SCHED_TIMER_POLL_MS;
        ts = sched_deadline(wait);
        pthread_cond_timedwait(&s->tm_cv, &s->tm_mu, &ts);
    }
    pthread_mutex_unlock(&s->tm_mu);
    return NULL;
}

int rt_timer_at(rt_sched *s, rt_actor *to, int64_t due_ms, uint16_t type, uint64_t arg)
{
    sched_timer *t;
    uint64_t seq;

    if (s == NULL || to == NULL)
        return -EINVAL;
    pthread_mutex_lock(&s->tm_mu);
    if (s->heap_len == s->heap_cap) {
        size_t cap = s->heap_cap ? s->heap_cap * 2 : 64;
        sched_timer *h = realloc(s->heap, cap * sizeof *h);

        if (h == NULL) {
            pthread_mutex_unlock(&s->tm_mu);
            return -ENOMEM;
        }
        s->heap = h;
        s->heap_cap = cap;
    }
    t = &s->heap[s->heap_len];
    t->due = due_ms;
    t->seq = seq = s->tm_seq++;
    t->to = to;
    t->arg = arg;
    t->type = type;
    sched_heap_up(s->heap, s->heap_len++);
    if (s->heap[0].seq == seq)     /* new earliest: the thread sleeps too long */
        pthread_cond_signal(&s->tm_cv);
    pthread_mutex_unlock(&s->tm_mu);
    return 0;
}

/* ---- scheduler ---------------------------------------------------------- */

rt_sched *rt_sched_new(int nthreads)
{
    rt_sched *s;

    if (nthreads <= 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nthreads = n > 0 ? (int)n : 1;
    }
    s = aligned_alloc(64, (sizeof *s + 63) & ~(size_t)63);
    if (s == NULL)
        return NULL;
    memset(s, 0, sizeof *s);
    s->nthreads = nthreads;
    s->threads = calloc((size_t)nthreads, sizeof *s->threads);
    if (s->threads == NULL)
        goto fail_threads;
    atomic_init(&s->active, 0);
    atomic_init(&s->go, false);
    if (pthread_mutex_init(&s->rq_mu, NULL) != 0)
        goto fail_rq_mu;
    if (pthread_cond_init(&s->rq_cv, NULL) != 0)
        goto fail_rq_cv;
    if (pthread_mutex_init(&s->actors_mu, NULL) != 0)
        goto fail_actors_mu;
    if (pthread_mutex_init(&s->tm_mu, NULL) != 0)
        goto fail_tm_mu;
    if (sched_cond_init_mono(&s->tm_cv) != 0)
        goto fail_tm_cv;
    return s;

fail_tm_cv:
    pthread_mutex_destroy(&s->tm_mu);
fail_tm_mu:
    pthread_mutex_destroy(&s->actors_mu);
fail_actors_mu:
    pthread_cond_destroy(&s->rq_cv);
fail_rq_cv:
    pthread_mutex_destroy(&s->rq_mu);
fail_rq_mu:
    free(s->threads);
fail_threads:
    free(s);
    return NULL;
}

int rt_sched_start(rt_sched *s)
{
    rt_actor *a;
    int rc;

    if (s == NULL || s->started || s->stopped)
        return -EINVAL;
    s->started = true;

    rc = pthread_create(&s->tm_thread, NULL, sched_timer_main, s);
    if (rc != 0)
        return -rc;
    s->tm_has_thread = true;
    sched_set_name(s->tm_thread, "tt-", "timer");

    for (int i = 0; i < s->nthreads; i++) {
        char num[12];

        rc = pthread_create(&s->threads[i], NULL, sched_pool_main, s);
        if (rc != 0)
            return -rc;             /* rt_sched_stop joins those started */
        s->nrunning++;
        snprintf(num, sizeof num, "%d", i);
        sched_set_name(s->threads[i], "tt-pool-", num);
    }

    /* Dedicated threads exist from their actor's creation but run nothing
     * before this; release pairs with their acquire load of go. */
    atomic_store_explicit(&s->go, true, memory_order_release);
    pthread_mutex_lock(&s->actors_mu);
    for (a = s->actors_head; a != NULL; a = a->all_next) {
        if (!a->dedicated)
            continue;
        pthread_mutex_lock(&a->mu);
        pthread_cond_signal(&a->cv);
        pthread_mutex_unlock(&a->mu);
    }
    pthread_mutex_unlock(&s->actors_mu);
    return 0;
}

/* True when no actor is queued, running or signalled and no mailbox holds
 * a counted envelope. */
static bool sched_quiescent(rt_sched *s)
{
    bool idle;

    if (atomic_load_explicit(&s->active, memory_order_acquire) != 0)
        return false;
    idle = true;
    pthread_mutex_lock(&s->actors_mu);
    for (rt_actor *a = s->actors_head; a != NULL && idle; a = a->all_next)
        if (rt_mailbox_depth(a->mb) != 0)
            idle = false;
    pthread_mutex_unlock(&s->actors_mu);
    return idle && atomic_load_explicit(&s->active, memory_order_acquire) == 0;
}

void rt_sched_stop(rt_sched *s)
{
    rt_actor *a, *first;

    if (s == NULL || s->stopped)
        return;
    s->stopped = true;

    /* Timers first: pending ones are dropped, and none can arrive while
     * draining. */
    pthread_mutex_lock(&s->tm_mu);
    s->tm_stop = true;
    pthread_cond_signal(&s->tm_cv);
    pthread_mutex_unlock(&s->tm_mu);
    if (s->tm_has_thread)
        pthread_join(s->tm_thread, NULL);

    /* Drain: actors keep running, and keep handling what they send each
     * other, until everything is idle. Polled: stopping is rare, and a
     * millisecond of latency here costs nothing. */
    if (s->nrunning == s->nthreads) {
        const struct timespec ms = { 0, 1000000L };
        while (!sched_quiescent(s))
            nanosleep(&ms, NULL);
    }

    pthread_mutex_lock(&s->rq_mu);
    s->rq_stop = true;
    pthread_cond_broadcast(&s->rq_cv);
    pthread_mutex_unlock(&s->rq_mu);
    for (int i = 0; i < s->nrunning; i++)
        pthread_join(s->threads[i], NULL);

    /* Actors are not created once stopping has begun, so the list is fixed
     * from here on and can be walked without the lock (which a stopped hook
     * might want, through rt_sched_depths). */
    pthread_mutex_lock(&s->actors_mu);
    first = s->actors_head;
    pthread_mutex_unlock(&s->actors_mu);
    for (a = first; a != NULL; a = a->all_next) {
        if (!a->dedicated || !a->has_thread)
            continue;
        pthread_mutex_lock(&a->mu);
        a->stop = true;
        pthread_cond_signal(&a->cv);
        pthread_mutex_unlock(&a->mu);
    }
    for (a = first; a != NULL; a = a->all_next) {
        if (a->dedicated && a->has_thread) {
            pthread_join(a->thread, NULL);
            a->has_thread = false;
        }
    }
    /* Every thread that ran an actor is joined: its state is ours now. */
    for (a = first; a != NULL; a = a->all_next)
        if (a->ops.stopped != NULL)
            a->ops.stopped(a, a->state);
}

static void sched_actor_destroy(rt_actor *a)
{
    rt_mailbox_free(a->mb);
    if (a->dedicated) {
        pthread_cond_destroy(&a->cv);
        pthread_mutex_destroy(&a->mu);
        free(a->buf);
    }
    free(a);
}

void rt_sched_free(rt_sched *s)
{
    rt_actor *a, *next;

    if (s == NULL)
        return;
    rt_sched_stop(s);
    for (a = s->actors_head; a != NULL; a = next) {
        next = a->all_next;
        sched_actor_destroy(a);
    }
    pthread_cond_destroy(&s->tm_cv);
    pthread_mutex_destroy(&s->tm_mu);
    pthread_mutex_destroy(&s->actors_mu);
    pthread_cond_destroy(&s->rq_cv);
    pthread_mutex_destroy(&s->rq_mu);
    free(s->heap);
    free(s->threads);
    free(s);
}

/* ---- actors ------------------------------------------------------------- */

static rt_actor *sched_actor_alloc(rt_sched *s, const char *kind, uint32_t ring_capacity,
                                   const rt_actor_ops *ops, void *state, rt_wake_fn wake)
{
    rt_actor *a;

    if (s == NULL || ops == NULL || ops->dispatch == NULL)
        return NULL;
    a = calloc(1, sizeof *a);
    if (a == NULL)
        return NULL;
    a->s = s;
    a->kind = kind != NULL ? kind : "actor";
    a->ops = *ops;
    a->state = state;
    a->mb = rt_mailbox_new(ring_capacity, wake, a);
    if (a->mb == NULL) {
        free(a);
        return NULL;
    }
    return a;
}

static void sched_actor_link(rt_sched *s, rt_actor *a)
{
    a->all_next = NULL;
    if (s->actors_tail != NULL)
        s->actors_tail->all_next = a;
    else
        s->actors_head = a;
    s->actors_tail = a;
}

rt_actor *rt_actor_new(rt_sched *s, const char *kind, uint32_t ring_capacity,
                       const rt_actor_ops *ops, void *state)
{
    rt_actor *a = sched_actor_alloc(s, kind, ring_capacity, ops, state, sched_wake_pooled);

    if (a == NULL)
        return NULL;
    pthread_mutex_lock(&s->actors_mu);
    sched_actor_link(s, a);
    pthread_mutex_unlock(&s->actors_mu);
    return a;
}

rt_actor *rt_actor_new_dedicated(rt_sched *s, const char *kind, uint32_t ring_capacity,
                                 uint32_t batch, const rt_actor_ops *ops, void *state)
{
    rt_actor *a = sched_actor_alloc(s, kind, ring_capacity, ops, state, sched_wake_dedicated);

    if (a == NULL)
        return NULL;
    a->dedicated = true;
    a->batch = batch > 0 ? batch : POOL_BATCH;
    a->buf = malloc((size_t)a->batch * sizeof *a->buf);
    if (a->buf == NULL)
        goto fail_buf;
    if (pthread_mutex_init(&a->mu, NULL) != 0)
        goto fail_mu;
    if (pthread_cond_init(&a->cv, NULL) != 0)
        goto fail_cv;

    /* Created and linked under actors_mu. rt_sched_start sets go, then
     * walks the list under that lock: either it finds this actor and
     * signals its thread, or it walked before the actor was linked, and
     * then go is already set when the thread first looks. */
    pthread_mutex_lock(&s->actors_mu);
    if (pthread_create(&a->thread, NULL, sched_dedicated_main, a) != 0) {
        pthread_mutex_unlock(&s->actors_mu);
        goto fail_thread;
    }
    a->has_thread = true;
    sched_actor_link(s, a);
    pthread_mutex_unlock(&s->actors_mu);
    sched_set_name(a->thread, "tt-", a->kind);
    return a;

fail_thread:
    pthread_cond_destroy(&a->cv);
fail_cv:
    pthread_mutex_destroy(&a->mu);
fail_mu:
    free(a->buf);
fail_buf:
    rt_mailbox_free(a->mb);
    free(a);
    return NULL;
}

int rt_send(rt_actor *to, rt_envelope *env)
{
    return rt_mailbox_push(to->mb, env);
}

rt_mailbox *rt_actor_mailbox(rt_actor *a)
{
    return a->mb;
}

const char *rt_actor_kind(const rt_actor *a)
{
    return a->kind;
}

void *rt_actor_state(rt_actor *a)
{
    return a->state;
}

void rt_sched_depths(rt_sched *s, void (*fn)(const char *kind, uint64_t depth, void *arg), void *arg)
{
    struct kd { const char *kind; uint64_t depth; } *kd = NULL;
    size_t n = 0, cap = 0;

    pthread_mutex_lock(&s->actors_mu);
    for (rt_actor *a = s->actors_head; a != NULL; a = a->all_next) {
        size_t i;

        for (i = 0; i < n; i++)
            if (kd[i].kind == a->kind || strcmp(kd[i].kind, a->kind) == 0)
                break;
        if (i == n) {
            if (n == cap) {
                size_t ncap = cap ? cap * 2 : 8;
                struct kd *nk = realloc(kd, ncap * sizeof *nk);

                if (nk == NULL)
                    break;          /* report what we have */
                kd = nk;
                cap = ncap;
            }
            kd[n].kind = a->kind;
            kd[n].depth = 0;
            n++;
        }
        kd[i].depth += rt_mailbox_depth(a->mb);
    }
    pthread_mutex_unlock(&s->actors_mu);
    for (size_t i = 0; i < n; i++)
        fn(kd[i].kind, kd[i].depth, arg);
    free(kd);
}

/* ---- waiters ------------------------------------------------------------ */

/* The wake-up is a semaphore: one atomic and, only when the waiter sleeps,
 * one futex call on each side (a mutex and condition variable cost a lock
 * round-trip more, on the path every HTTP request takes). A post is never
 * lost: it is counted until a wait takes it; a spare post only costs the
 * waiter one more look at an empty mailbox. */
struct rt_waiter {
    rt_mailbox *mb;
    sem_t sem;
    rt_envelope *buf[WAITER_BATCH];
};

static void waiter_wake(void *arg)
{
    rt_waiter *w = arg;

    sem_post(&w->sem);
}

rt_waiter *rt_waiter_new(void)
{
    rt_waiter *w = calloc(1, sizeof *w);

    if (w == NULL)
        return NULL;
    if (sem_init(&w->sem, 0, 0) != 0)
        goto fail_sem;
    /* Replies come from a handful of actor threads; a small ring each. */
    w->mb = rt_mailbox_new(16, waiter_wake, w);
    if (w->mb == NULL)
        goto fail_mb;
    return w;

fail_mb:
    sem_destroy(&w->sem);
fail_sem:
    free(w);
    return NULL;
}

void rt_waiter_free(rt_waiter *w)
{
    if (w == NULL)
        return;
    rt_mailbox_free(w->mb);
    sem_destroy(&w->sem);
    free(w);
}

rt_mailbox *rt_waiter_mailbox(rt_waiter *w)
{
    return w->mb;
}

/* The waiting thread is the mailbox's one consumer. Each round pops what is
 * there (a reply may be pending without a wake: a previous wait may have
 * returned with more left), keeps the match and frees the rest; only when
 * rt_mailbox_done reports nothing pending does it sleep, and the next push
 * then takes the count from 0 and sets the flag. */
rt_envelope *rt_waiter_wait(rt_waiter *w, uint64_t corr, int timeout_ms)
{
    struct timespec deadline = sched_deadline(timeout_ms > 0 ? timeout_ms : 0);
    rt_envelope *found = NULL;

    for (;;) {
        size_t n = rt_mailbox_pop(w->mb, w->buf, WAITER_BATCH);
        int more;

        for (size_t i = 0; i < n; i++) {
            if (found == NULL && w->buf[i]->corr == corr)
                found = w->buf[i];
            else
                rt_envelope_free(w->buf[i]);
        }
        more = rt_mailbox_done(w->mb, n);
        if (found != NULL)
            return found;
        if (more)
            continue;

        int rc;
        do
            rc = timeout_ms < 0 ? sem_wait(&w->sem) : sem_clockwait(&w->sem, CLOCK_MONOTONIC, &deadline);
        while (rc != 0 && errno == EINTR);
        if (rc != 0)
            return NULL; /* ETIMEDOUT */
    }
}
