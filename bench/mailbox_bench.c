/* mailbox_bench.c: mailbox throughput with many producer threads.
 *
 * For 2, 16 and 128 producer threads pushing into one consumer, prints one
 * line per configuration with the envelopes consumed per second:
 *
 *   mailbox  one actor on a one-thread scheduler, fed through rt_send (one
 *            SPSC ring per producer, the pending-count wake rule);
 *   mpsc     for comparison, one ck_ring shared by all producers
 *            (ck_ring_enqueue_mpsc) with the same pending-count wake rule
 *            and a consumer thread sleeping on a semaphore.
 *
 * Envelopes are preallocated (each producer pushes the same one over and
 * over) so that malloc is not what gets measured. A full ring is retried
 * with sched_yield, as a real sender would. Each configuration runs for a
 * fixed time (default 1.5 s, at most 3 s: argv[1]). The time reported runs
 * until every producer has finished its last push after the stop signal:
 * with the shared MPSC ring and many more producers than cores, that tail
 * alone takes seconds (each push waits for every earlier ticket's commit,
 * and their owners must be scheduled in order), which is the point of the
 * comparison. The whole run ends by itself in about 20 s.
 *
 * Usage: tt-mailbox-bench [seconds-per-configuration] */
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <ck_ring.h>

#include "runtime/actor.h"

#define MAX_PRODUCERS 128
#define MAILBOX_RING 256            /* slots per producer ring */
#define MPSC_RING 4096              /* slots in the shared ring */
#define CONSUMER_BATCH 64

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Shared by producers of both kinds. Relaxed loads of the flags: they only
 * tell a loop when to stop, and the joins order everything else. */
static _Atomic int go;
static _Atomic int halt;

typedef struct producer {
    pthread_t th;
    rt_envelope *env;               /* pushed over and over */
    uint64_t pushed;
    uint64_t retries;
} producer;

static producer producers[MAX_PRODUCERS];

/* ---- mailbox: one actor on the scheduler -------------------------------- */

typedef struct sink {
    alignas(64) uint64_t consumed;  /* the actor's state: one thread at a time */
} sink;

static rt_actor *target;

static void sink_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    (void)self;
    (void)env;                      /* preallocated: owned by its producer */
    ((sink *)state)->consumed++;
}

static const rt_actor_ops sink_ops = { sink_dispatch, NULL, NULL };

static void *mailbox_producer(void *arg)
{
    producer *p = arg;

    while (!atomic_load_explicit(&go, memory_order_acquire))
        sched_yield();
    while (!atomic_load_explicit(&halt, memory_order_relaxed)) {
        if (rt_send(target, p->env) == 0) {
            p->pushed++;
        } else {
            p->retries++;
            sched_yield();
        }
    }
    return NULL;
}

/* ---- mpsc: one shared ck_ring ------------------------------------------- */

static struct {
    alignas(64) ck_ring_t ring;
    ck_ring_buffer_t *buf;
    alignas(64) _Atomic int64_t pending;
    alignas(64) sem_t wake;
    uint64_t consumed;              /* consumer thread only */
    _Atomic int done;
} mp;

static void *mpsc_producer(void *arg)
{
    producer *p = arg;

    while (!atomic_load_explicit(&go, memory_order_acquire))
        sched_yield();
    while (!atomic_load_explicit(&halt, memory_order_relaxed)) {
        if (ck_ring_enqueue_mpsc(&mp.ring, mp.buf, p->env)) {
            p->pushed++;
            /* seq_cst: the same Dekker rule as the mailbox. */
            if (atomic_fetch_add_explicit(&mp.pending, 1, memory_order_seq_cst) == 0)
                sem_post(&mp.wake);
        } else {
            p->retries++;
            sched_yield();
        }
    }
    return NULL;
}

static void *mpsc_consumer(void *arg)
{
    void *item;

    (void)arg;
    for (;;) {
        sem_wait(&mp.wake);
        if (atomic_load_explicit(&mp.done, memory_order_acquire))
            return NULL;
        for (;;) {
            int64_t n = 0, left;

            while (n < CONSUMER_BATCH && ck_ring_dequeue_mpsc(&mp.ring, mp.buf, &item))
                n++;
            mp.consumed += (uint64_t)n;
            left = atomic_fetch_sub_explicit(&mp.pending, n, memory_order_seq_cst) - n;
            if (left <= 0)
                break;
        }
    }
}

/* ---- driver ------------------------------------------------------------- */

static void start_producers(int n, void *(*fn)(void *))
{
    atomic_store(&go, 0);
    atomic_store(&halt, 0);
    for (int i = 0; i < n; i++) {
        producers[i].pushed = 0;
        producers[i].retries = 0;
        if (pthread_create(&producers[i].th, NULL, fn, &producers[i]) != 0) {
            fprintf(stderr, "pthread_create failed\n");
            exit(1);
        }
    }
}

/* Lets n producers run for secs; returns the measured wall time. */
static double run_producers(int n, double secs)
{
    struct timespec ts = { (time_t)secs, (long)((secs - (double)(time_t)secs) * 1e9) };
    double t0;

    t0 = now_s();
    atomic_store_explicit(&go, 1, memory_order_release);
    nanosleep(&ts, NULL);
    atomic_store_explicit(&halt, 1, memory_order_relaxed);
    for (int i = 0; i < n; i++)
        pthread_join(producers[i].th, NULL);
    return now_s() - t0;
}

static void report(const char *kind, int n, uint64_t consumed, double elapsed)
{
    uint64_t retries = 0;

    for (int i = 0; i < n; i++)
        retries += producers[i].retries;
    printf("%-8s producers=%-4d %12.0f msgs/s  (%llu in %.2f s, %llu full-ring retries)\n",
           kind, n, (double)consumed / elapsed, (unsigned long long)consumed, elapsed,
           (unsigned long long)retries);
    fflush(stdout);
}

static void bench_mailbox(int n, double secs)
{
    rt_sched *s = rt_sched_new(1);
    sink *st = aligned_alloc(64, sizeof *st);
    double elapsed;

    st->consumed = 0;
    target = rt_actor_new(s, "sink", MAILBOX_RING, &sink_ops, st);
    if (s == NULL || target == NULL || rt_sched_start(s) != 0) {
        fprintf(stderr, "scheduler setup failed\n");
        exit(1);
    }
    start_producers(n, mailbox_producer);
    elapsed = run_producers(n, secs);
    rt_sched_stop(s);               /* drains what was pushed */
    report("mailbox", n, st->consumed, elapsed);
    rt_sched_free(s);
    free(st);
}

static void bench_mpsc(int n, double secs)
{
    pthread_t consumer;
    double elapsed;

    mp.buf = calloc(MPSC_RING, sizeof *mp.buf);
    ck_ring_init(&mp.ring, MPSC_RING);
    atomic_store(&mp.pending, 0);
    atomic_store(&mp.done, 0);
    mp.consumed = 0;
    sem_init(&mp.wake, 0, 0);
    pthread_create(&consumer, NULL, mpsc_consumer, NULL);
    start_producers(n, mpsc_producer);
    elapsed = run_producers(n, secs);
    /* Let the consumer drain, then stop it. */
    while (atomic_load(&mp.pending) > 0)
        sched_yield();
    atomic_store_explicit(&mp.done, 1, memory_order_release);
    sem_post(&mp.wake);
    pthread_join(consumer, NULL);
    report("mpsc", n, mp.consumed, elapsed);
    sem_destroy(&mp.wake);
    free(mp.buf);
}

int main(int argc, char **argv)
{
    static const int counts[] = { 2, 16, 128 };
    double secs = argc > 1 ? atof(argv[1]) : 1.5;

    if (secs <= 0 || secs > 3)
        secs = 1.5;
    for (int i = 0; i < MAX_PRODUCERS; i++)
        producers[i].env = rt_envelope_new(1, 1, NULL, 0);
    printf("mailbox throughput, one consumer, %.1f s per configuration, %ld cores\n",
           secs, sysconf(_SC_NPROCESSORS_ONLN));
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        bench_mailbox(counts[i], secs);
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        bench_mpsc(counts[i], secs);
    for (int i = 0; i < MAX_PRODUCERS; i++)
        rt_envelope_free(producers[i].env);
    return 0;
}
