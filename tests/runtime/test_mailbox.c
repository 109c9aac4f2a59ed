/* test_mailbox.c: mailbox capacity and -EAGAIN, the wake rule (exactly one
 * wake per empty -> non-empty transition, "more pending" from done), per
 * producer order across threads, round-robin pops, freeing with envelopes
 * still queued, and thread caches that never outlive a freed mailbox. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/mailbox.h"
#include "rt_check.h"

static _Atomic int wakes;

static void count_wake(void *arg)
{
    (void)arg;
    atomic_fetch_add(&wakes, 1);
}

static rt_envelope *mk(uint64_t corr)
{
    rt_envelope *e = rt_envelope_new(1, 1, NULL, 0);

    e->corr = corr;
    return e;
}

/* Pushes one more envelope and expects the ring to be full (the caller
 * keeps the envelope on -EAGAIN, so it is freed here). */
static int push_full(rt_mailbox *mb)
{
    rt_envelope *e = mk(UINT64_MAX);
    int rc = rt_mailbox_push(mb, e);

    if (rc == -EAGAIN)
        rt_envelope_free(e);
    return rc == -EAGAIN;
}

static void test_capacity(void)
{
    const struct { uint32_t asked, usable; } cases[] = {
        { 0, 3 }, { 1, 3 }, { 4, 3 }, { 5, 7 }, { 8, 7 }, { 100, 127 },
    };

    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        rt_mailbox *mb = rt_mailbox_new(cases[c].asked, NULL, NULL);
        rt_envelope *e;
        uint32_t i;

        for (i = 0; i < cases[c].usable; i++)
            RT_CHECK_EQ(rt_mailbox_push(mb, mk(i)), 0);
        e = mk(999);
        RT_CHECK_EQ(rt_mailbox_push(mb, e), -EAGAIN);
        RT_CHECK_EQ(rt_mailbox_depth(mb), cases[c].usable);
        /* After one pop there is room for exactly one more. */
        {
            rt_envelope *out[1];
            RT_CHECK_EQ(rt_mailbox_pop(mb, out, 1), 1);
            RT_CHECK_EQ(out[0]->corr, 0);
            rt_envelope_free(out[0]);
            RT_CHECK_EQ(rt_mailbox_done(mb, 1), 1);
        }
        RT_CHECK_EQ(rt_mailbox_push(mb, e), 0);
        RT_CHECK(push_full(mb));
        /* Freed with envelopes inside: the leak checker sees none left. */
        rt_mailbox_free(mb);
    }
}

static void test_wake_rule(void)
{
    rt_mailbox *mb = rt_mailbox_new(16, count_wake, NULL);
    rt_envelope *out[16];

    atomic_store(&wakes, 0);
    RT_CHECK_EQ(rt_mailbox_pop(mb, out, 16), 0);
    RT_CHECK_EQ(rt_mailbox_done(mb, 0), 0);
    RT_CHECK_EQ(rt_mailbox_push(mb, mk(1)), 0);
    RT_CHECK_EQ(atomic_load(&wakes), 1);
    RT_CHECK_EQ(rt_mailbox_push(mb, mk(2)), 0);
    RT_CHECK_EQ(rt_mailbox_push(mb, mk(3)), 0);
    RT_CHECK_EQ(atomic_load(&wakes), 1);           /* only the first push wakes */

    RT_CHECK_EQ(rt_mailbox_pop(mb, out, 2), 2);
    RT_CHECK_EQ(out[0]->corr, 1);
    RT_CHECK_EQ(out[1]->corr, 2);
    rt_envelope_free(out[0]);
    rt_envelope_free(out[1]);
    RT_CHECK_EQ(rt_mailbox_done(mb, 2), 1);        /* one left: run again */
    RT_CHECK_EQ(rt_mailbox_push(mb, mk(4)), 0);
    RT_CHECK_EQ(atomic_load(&wakes), 1);           /* still non-empty: no wake */
    RT_CHECK_EQ(rt_mailbox_pop(mb, out, 16), 2);
    RT_CHECK_EQ(out[0]->corr, 3);
    RT_CHECK_EQ(out[1]->corr, 4);
    rt_envelope_free(out[0]);
    rt_envelope_free(out[1]);
    RT_CHECK_EQ(rt_mailbox_done(mb, 2), 0);        /* drained: idle */
    RT_CHECK_EQ(rt_mailbox_depth(mb), 0);
    RT_CHECK_EQ(rt_mailbox_push(mb, mk(5)), 0);
    RT_CHECK_EQ(atomic_load(&wakes), 2);           /* empty -> non-empty again */
    rt_mailbox_free(mb);
}

/* ---- threads ------------------------------------------------------------ */

typedef struct prod_arg {
    rt_mailbox *mb;
    uint32_t id;
    uint32_t count;
    sem_t *go;
} prod_arg;

static void *producer(void *p)
{
    prod_arg *a = p;

    if (a->go != NULL)
        sem_wait(a->go);
    for (uint32_t i = 0; i < a->count; i++) {
        rt_envelope *e = mk(((uint64_t)a->id << 32) | i);

        while (rt_mailbox_push(a->mb, e) == -EAGAIN)
            sched_yield();
    }
    return NULL;
}

/* A consumer woken by a semaphore, following the wake rule exactly as the
 * scheduler does; checks per-producer order. */
typedef struct cons_state {
    sem_t wake;
} cons_state;

static void sem_wake(void *arg)
{
    sem_post(&((cons_state *)arg)->wake);
}

static void test_threads(void)
{
    enum { NPROD = 8, PER = 50000 };
    cons_state cs;
    rt_mailbox *mb;
    pthread_t th[NPROD];
    prod_arg args[NPROD];
    uint32_t next[NPROD] = { 0 };
    rt_envelope *out[64];
    uint64_t got = 0;
    long bad = 0;
    int wake_count = 0;

    sem_init(&cs.wake, 0, 0);
    mb = rt_mailbox_new(8, sem_wake, &cs);
    for (int i = 0; i < NPROD; i++) {
        args[i] = (prod_arg){ mb, (uint32_t)i, PER, NULL };
        pthread_create(&th[i], NULL, producer, &args[i]);
    }
    while (got < (uint64_t)NPROD * PER) {
        size_t n;
        int more;

        sem_wait(&cs.wake);
        wake_count++;
        do {
            n = rt_mailbox_pop(mb, out, 64);
            for (size_t k = 0; k < n; k++) {
                uint32_t p = (uint32_t)(out[k]->corr >> 32), seq = (uint32_t)out[k]->corr;

                if (p >= NPROD || seq != next[p])
                    bad++;
                else
                    next[p]++;
                rt_envelope_free(out[k]);
            }
            got += n;
            more = rt_mailbox_done(mb, n);
        } while (more);
        /* Idle: exactly one wake may be outstanding at a time. */
        {
            int v;
            sem_getvalue(&cs.wake, &v);
            RT_CHECK(v <= 1);
        }
    }
    for (int i = 0; i < NPROD; i++)
        pthread_join(th[i], NULL);
    RT_CHECK_EQ(bad, 0);
    RT_CHECK_EQ(got, (uint64_t)NPROD * PER);
    RT_CHECK_EQ(rt_mailbox_depth(mb), 0);
    for (int i = 0; i < NPROD; i++)
        RT_CHECK_EQ(next[i], PER);
    fprintf(stderr, "threads: %d wakes for %llu envelopes\n", wake_count,
            (unsigned long long)got);
    rt_mailbox_free(mb);
    sem_destroy(&cs.wake);
}

/* Two producers fill their rings; pops alternate which ring comes first. */
static void test_round_robin(void)
{
    rt_mailbox *mb = rt_mailbox_new(8, NULL, NULL);
    pthread_t th[2];
    prod_arg args[2];
    rt_envelope *out[8];
    uint32_t first[4];

    for (int i = 0; i < 2; i++) {
        args[i] = (prod_arg){ mb, (uint32_t)i, 7, NULL };
        pthread_create(&th[i], NULL, producer, &args[i]);
        pthread_join(th[i], NULL);
    }
    for (int round = 0; round < 4; round++) {
        size_t n = rt_mailbox_pop(mb, out, 3);

        RT_CHECK_EQ(n, 3);
        first[round] = (uint32_t)(out[0]->corr >> 32);
        for (size_t k = 0; k < n; k++)
            rt_envelope_free(out[k]);
        rt_mailbox_done(mb, n);
    }
    RT_CHECK(first[0] != first[1]);
    RT_CHECK(first[1] != first[2]);
    RT_CHECK(first[2] != first[3]);
    /* 14 - 12 = 2 left, one per ring. */
    RT_CHECK_EQ(rt_mailbox_pop(mb, out, 8), 2);
    rt_envelope_free(out[0]);
    rt_envelope_free(out[1]);
    RT_CHECK_EQ(rt_mailbox_done(mb, 2), 0);
    rt_mailbox_free(mb);
}

/* A thread's ring cache must never hand out a ring of a freed mailbox, even
 * when a new mailbox lands at the same address. Under ASan a stale ring
 * would be a use after free; here it would also show as a full ring. */
static void test_cache_after_free(void)
{
    for (int round = 0; round < 2000; round++) {
        rt_mailbox *mb = rt_mailbox_new(4, NULL, NULL);
        rt_envelope *out[4];

        for (int i = 0; i < 3; i++)
            RT_CHECK_EQ(rt_mailbox_push(mb, mk((uint64_t)round * 10 + (uint64_t)i)), 0);
        if (round % 2 == 0) {
            RT_CHECK_EQ(rt_mailbox_pop(mb, out, 4), 3);
            RT_CHECK_EQ(out[0]->corr, (uint64_t)round * 10);
            for (int i = 0; i < 3; i++)
                rt_envelope_free(out[i]);
        }
        rt_mailbox_free(mb);
    }
    /* Many live mailboxes at once: more than the cache holds. */
    {
        enum { N = 1000 };
        rt_mailbox **mbs = calloc(N, sizeof *mbs);
        rt_envelope *out[4];

        for (int i = 0; i < N; i++) {
            mbs[i] = rt_mailbox_new(4, NULL, NULL);
            RT_CHECK_EQ(rt_mailbox_push(mbs[i], mk((uint64_t)i)), 0);
        }
        for (int pass = 0; pass < 2; pass++)
            for (int i = 0; i < N; i++)
                RT_CHECK_EQ(rt_mailbox_push(mbs[i], mk((uint64_t)i)), 0);
        for (int i = 0; i < N; i++) {
            RT_CHECK(push_full(mbs[i]));
            RT_CHECK_EQ(rt_mailbox_pop(mbs[i], out, 4), 3);
            for (int k = 0; k < 3; k++) {
                RT_CHECK_EQ(out[k]->corr, (uint64_t)i);
                rt_envelope_free(out[k]);
            }
            rt_mailbox_free(mbs[i]);
        }
        free(mbs);
    }
}

int main(void)
{
    test_capacity();
    test_wake_rule();
    test_threads();
    test_round_robin();
    test_cache_after_free();
    return rt_check_finish("test_mailbox");
}
