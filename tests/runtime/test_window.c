/* test_window.c: the pending count when a consumer pops an envelope whose
 * producer has committed it but not yet counted it.
 *
 * Under real load that window is a couple of instructions wide and almost
 * never hit, so this test holds a producer inside it: mailbox.c is compiled
 * into this executable with RT_MAILBOX_TEST_HOOKS, which calls a hook
 * between the commit and the count. The count then goes below zero, and the
 * wake rule must still hold: no wake for envelopes already consumed, exactly
 * one wake for envelopes still pending, and "more pending" only when there
 * really is more. */
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "runtime/mailbox.h"
#include "rt_check.h"

extern void (*rt_mailbox_test_after_commit)(rt_mailbox *mb);

static _Atomic int wakes;
static sem_t committed, resume;
static _Thread_local bool pause_here;

static void count_wake(void *arg)
{
    (void)arg;
    atomic_fetch_add(&wakes, 1);
}

static void hold_after_commit(rt_mailbox *mb)
{
    (void)mb;
    if (pause_here) {
        sem_post(&committed);
        sem_wait(&resume);
    }
}

typedef struct pusher {
    pthread_t th;
    rt_mailbox *mb;
    uint64_t corr;
    bool pause;
} pusher;

static void *pusher_main(void *p)
{
    pusher *a = p;
    rt_envelope *e = rt_envelope_new(1, 1, NULL, 0);

    e->corr = a->corr;
    pause_here = a->pause;
    RT_CHECK_EQ(rt_mailbox_push(a->mb, e), 0);
    return NULL;
}

/* Starts a pusher; a pausing one is returned held inside the window. */
static void start(pusher *a, rt_mailbox *mb, uint64_t corr, bool pause)
{
    a->mb = mb;
    a->corr = corr;
    a->pause = pause;
    pthread_create(&a->th, NULL, pusher_main, a);
    if (pause)
        sem_wait(&committed);
}

/* Pops everything; returns how many, checking the first corr if given. */
static size_t pop_all(rt_mailbox *mb, uint64_t first_corr, size_t *out_n)
{
    rt_envelope *out[8];
    size_t n = rt_mailbox_pop(mb, out, 8);

    if (n > 0 && first_corr != 0)
        RT_CHECK_EQ(out[0]->corr, first_corr);
    for (size_t i = 0; i < n; i++)
        rt_envelope_free(out[i]);
    if (out_n != NULL)
        *out_n = n;
    return n;
}

/* A's envelope is consumed inside the window: A's late count must not
 * wake, and the next push must. */
static void test_consumed_early(void)
{
    rt_mailbox *mb = rt_mailbox_new(8, count_wake, NULL);
    pusher a;

    atomic_store(&wakes, 0);
    start(&a, mb, 1, true);
    RT_CHECK_EQ(pop_all(mb, 1, NULL), 1);
    RT_CHECK_EQ(rt_mailbox_done(mb, 1), 0);        /* count is -1: idle */
    RT_CHECK_EQ(rt_mailbox_depth(mb), 0);
    sem_post(&resume);
    pthread_join(a.th, NULL);
    RT_CHECK_EQ(atomic_load(&wakes), 0);           /* -1 -> 0: nothing to do */
    RT_CHECK_EQ(pop_all(mb, 0, NULL), 0);

    start(&a, mb, 2, false);
    pthread_join(a.th, NULL);
    RT_CHECK_EQ(atomic_load(&wakes), 1);           /* 0 -> 1 again */
    RT_CHECK_EQ(pop_all(mb, 2, NULL), 1);
    RT_CHECK_EQ(rt_mailbox_done(mb, 1), 0);
    rt_mailbox_free(mb);
}

/* While the count is -1, B pushes (-1 -> 0: no wake); A's late count then
 * takes it 0 -> 1 and wakes, and B's envelope is found. */
static void test_late_count_wakes_for_other(void)
{
    rt_mailbox *mb = rt_mailbox_new(8, count_wake, NULL);
    pusher a, b;

    atomic_store(&wakes, 0);
    start(&a, mb, 1, true);
    RT_CHECK_EQ(pop_all(mb, 1, NULL), 1);
    RT_CHECK_EQ(rt_mailbox_done(mb, 1), 0);
    start(&b, mb, 2, false);
    pthread_join(b.th, NULL);
    RT_CHECK_EQ(atomic_load(&wakes), 0);
    sem_post(&resume);
    pthread_join(a.th, NULL);
    RT_CHECK_EQ(atomic_load(&wakes), 1);
    RT_CHECK_EQ(pop_all(mb, 2, NULL), 1);
    RT_CHECK_EQ(rt_mailbox_done(mb, 1), 0);
    RT_CHECK_EQ(rt_mailbox_depth(mb), 0);
    rt_mailbox_free(mb);
}

/* B wakes the consumer, which pops A's uncounted envelope too: done must
 * not report more (the count is -1), and A's late count must not wake. */
static void test_popped_with_others(void)
{
    rt_mailbox *mb = rt_mailbox_new(8, count_wake, NULL);
    pusher a, b;
    size_t n;

    atomic_store(&wakes, 0);
    start(&a, mb, 1, true);
    start(&b, mb, 2, false);
    pthread_join(b.th, NULL);
    RT_CHECK_EQ(atomic_load(&wakes), 1);
    pop_all(mb, 0, &n);
    RT_CHECK_EQ(n, 2);
    RT_CHECK_EQ(rt_mailbox_done(mb, 2), 0);
    sem_post(&resume);
    pthread_join(a.th, NULL);
    RT_CHECK_EQ(atomic_load(&wakes), 1);
    RT_CHECK_EQ(pop_all(mb, 0, NULL), 0);
    RT_CHECK_EQ(rt_mailbox_depth(mb), 0);
    rt_mailbox_free(mb);
}

int main(void)
{
    sem_init(&committed, 0, 0);
    sem_init(&resume, 0, 0);
    rt_mailbox_test_after_commit = hold_after_commit;
    test_consumed_early();
    test_late_count_wakes_for_other();
    test_popped_with_others();
    sem_destroy(&committed);
    sem_destroy(&resume);
    return rt_check_finish("test_window");
}
