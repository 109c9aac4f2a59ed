/* mailbox.c: bounded MPSC mailboxes built from one SPSC ring per producer.
 *
 * Each producing thread gets a Concurrency Kit SPSC ring of its own the first
 * time it pushes to a mailbox, so no producer ever waits on another (a
 * preempted producer stalls only its own ring). The rings of a mailbox form a
 * lock-free singly linked list: a new ring is prepended with one CAS and a
 * ring is never unlinked before rt_mailbox_free. To keep a push from walking
 * that list (a cache miss per ring), each thread keeps a cache from mailbox
 * to ring: a small open-addressed table on the heap (thread-local storage
 * would come out of the thread's stack, and civetweb's are 100 KiB), which
 * grows with the number of mailboxes the thread feeds, up to a cap at which
 * it is simply emptied and refilled. The cache key is the mailbox's 64-bit
 * id, drawn from a global counter and never reused, so an entry left behind
 * by a freed mailbox can never match again and is never dereferenced.
 *
 * Scheduling rides on one signed pending count per mailbox (see mailbox.h).
 * A producer increments it after its envelope is committed to the ring, so a
 * consumer may pop (and count as done) an envelope whose increment has not
 * happened yet: the count then dips below zero until the producer catches
 * up. Only the transition 0 -> 1 wakes, and "more pending" means the count
 * after the consumer's subtraction is still above zero; either way every
 * envelope is counted in exactly once and out exactly once, and the one push
 * that finds 0 after the consumer went idle is the one that wakes it.
 *
 * ThreadSanitizer cannot see ck's ring indices (inline assembly), so under
 * TT_TSAN every slot hand-over is annotated: the producer acquires the slot
 * (the consumer's earlier read of it, one lap ago), writes it and releases it
 * before committing; the consumer, having seen the commit, acquires the slot,
 * dequeues and releases it for the producer's next lap. That is why the
 * producer uses ck's reserve/commit pair (exactly ck_ring_enqueue_spsc split
 * in two, so the annotation can sit between the slot write and the commit).
 * No TSan suppressions are needed. */
#include "runtime/mailbox.h"

#include <errno.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <ck_pr.h>
#include <ck_ring.h>

#if defined(TT_TSAN) && TT_TSAN
#include <sanitizer/tsan_interface.h>
#define MB_TSAN_ACQUIRE(p) __tsan_acquire(p)
#define MB_TSAN_RELEASE(p) __tsan_release(p)
#else
#define MB_TSAN_ACQUIRE(p) ((void)(p))
#define MB_TSAN_RELEASE(p) ((void)(p))
#endif

#ifdef RT_MAILBOX_TEST_HOOKS
/* Test builds only (tests/runtime/test_window.c compiles this file on its
 * own with the macro): called between a push's commit and its count, so a
 * test can hold a producer inside that window. */
void (*rt_mailbox_test_after_commit)(rt_mailbox *mb);
#define MB_AFTER_COMMIT(mb)                                 \
    do {                                                    \
        if (rt_mailbox_test_after_commit != NULL)           \
            rt_mailbox_test_after_commit(mb);               \
    } while (0)
#else
#define MB_AFTER_COMMIT(mb) ((void)(mb))
#endif

#define MB_CACHELINE 64
#define MB_MAX_CAPACITY (1u << 24)
#define MB_TCACHE_MIN 64            /* entries per thread at first; a power of two */
#define MB_TCACHE_MAX (1u << 16)    /* 1 MiB: at this size it is emptied instead */

/* One producer's ring. Everything but the ring indices and slots is written
 * by the producer before the ring is published and is immutable after. */
typedef struct mb_ring {
    ck_ring_t ring;                 /* ck keeps c_head and p_tail on separate lines */
    uint64_t owner;                 /* producing thread's id (mb_thread_self) */
    struct mb_ring *next;           /* older ring, or NULL */
    ck_ring_buffer_t buf[];         /* ring.size slots */
} mb_ring;

struct rt_mailbox {
    /* Written by every push and by the consumer: alone on its line. */
    alignas(MB_CACHELINE) _Atomic int64_t pending;

    /* Read by producers on a cache miss and by the consumer on each pop;
     * written only when a ring is added. */
    alignas(MB_CACHELINE) _Atomic(mb_ring *) rings;
    uint64_t id;                    /* never reused: keys the thread caches */
    uint32_t capacity;              /* slots per ring, a power of two */
    rt_wake_fn wake;
    void *wake_arg;

    /* Consumer only. */
    alignas(MB_CACHELINE) mb_ring *cursor;  /* where the next pop starts */
};

typedef struct mb_cache_ent {
    uint64_t id;                    /* mailbox id, 0 = empty */
    mb_ring *ring;
} mb_cache_ent;

/* A thread's mailbox -> ring cache: linear probing, no deletions (stale ids
 * never match), at most half full. */
typedef struct mb_tcache {
    uint32_t mask;                  /* entries - 1 */
    uint32_t used;
    mb_cache_ent ent[];
} mb_tcache;

static _Thread_local mb_tcache *mb_tc;
/* True while mb_tc holds every ring this thread ever created: then a miss
 * proves the thread has no ring in that mailbox yet, and the list need not
 * be walked (with P producers, first pushes would otherwise cost O(P) cache
 * misses each). Cleared for good once an entry is dropped. */
static _Thread_local bool mb_tc_lossy;
static _Thread_local uint64_t mb_self_id;
static pthread_key_t mb_tc_key;     /* only to free mb_tc at thread exit */
static pthread_once_t mb_tc_once = PTHREAD_ONCE_INIT;
static bool mb_tc_key_ok;

/* Both counters only hand out unique numbers; nothing is ordered by them, so
 * relaxed increments suffice. */
static _Atomic uint64_t mb_next_thread_id = 1;
static _Atomic uint64_t mb_next_mailbox_id = 1;

static uint64_t mb_thread_self(void)
{
    if (mb_self_id == 0)
        mb_self_id = atomic_fetch_add_explicit(&mb_next_thread_id, 1, memory_order_relaxed);
    return mb_self_id;
}

/* Thread exit. Should the thread push again from a later destructor, it
 * must not find the freed table, nor trust a fresh one to be complete. */
static void mb_tc_destroy(void *p)
{
    if (mb_tc == p) {
        mb_tc = NULL;
        mb_tc_lossy = true;
    }
    free(p);
}

static void mb_tc_key_init(void)
{
    mb_tc_key_ok = pthread_key_create(&mb_tc_key, mb_tc_destroy) == 0;
}

static inline size_t mb_tc_slot(uint64_t id, uint32_t mask)
{
    return (size_t)((id * UINT64_C(0x9E3779B97F4A7C15)) >> 32) & mask;
}

static inline mb_ring *mb_tc_lookup(uint64_t id)
{
    mb_tcache *tc = mb_tc;
    size_t i;

    if (tc == NULL)
        return NULL;
    for (i = mb_tc_slot(id, tc->mask); tc->ent[i].id != 0; i = (i + 1) & tc->mask)
        if (tc->ent[i].id == id)
            return tc->ent[i].ring;
    return NULL;
}

/* Remembers id -> ring for this thread; best effort (a failed allocation
 * only means the next push walks the list again). */
static void mb_tc_insert(uint64_t id, mb_ring *r)
{
    mb_tcache *tc = mb_tc;
    size_t i;

    if (tc == NULL || tc->used + 1 > (tc->mask + 1) / 2) {
        uint32_t size = tc == NULL ? MB_TCACHE_MIN : (tc->mask + 1) * 2;
        mb_tcache *ntc;

        if (size > MB_TCACHE_MAX)
            size = MB_TCACHE_MAX;   /* full at the cap: start over, empty */
        ntc = calloc(1, sizeof *ntc + (size_t)size * sizeof ntc->ent[0]);
        if (ntc == NULL) {
            mb_tc_lossy = true;
            return;
        }
        ntc->mask = size - 1;
        if (tc != NULL && size == tc->mask + 1)
            mb_tc_lossy = true;     /* emptied at the cap */
        if (tc != NULL && size > tc->mask + 1) {
            for (size_t k = 0; k <= tc->mask; k++) {
                if (tc->ent[k].id == 0)
                    continue;
                for (i = mb_tc_slot(tc->ent[k].id, ntc->mask); ntc->ent[i].id != 0;
                     i = (i + 1) & ntc->mask)
                    ;
                ntc->ent[i] = tc->ent[k];
                ntc->used++;
            }
        }
        free(tc);
        mb_tc = tc = ntc;
        pthread_once(&mb_tc_once, mb_tc_key_init);
        if (mb_tc_key_ok)
            (void)pthread_setspecific(mb_tc_key, tc);
    }
    for (i = mb_tc_slot(id, tc->mask); tc->ent[i].id != 0; i = (i + 1) & tc->mask)
        ;
    tc->ent[i].id = id;
    tc->ent[i].ring = r;
    tc->used++;
}

static void *mb_alloc_aligned(size_t size)
{
    size = (size + MB_CACHELINE - 1) & ~(size_t)(MB_CACHELINE - 1);
    return aligned_alloc(MB_CACHELINE, size);
}

rt_mailbox *rt_mailbox_new(uint32_t ring_capacity, rt_wake_fn wake, void *arg)
{
    rt_mailbox *mb;
    uint32_t cap = 4;

    if (ring_capacity > MB_MAX_CAPACITY)
        ring_capacity = MB_MAX_CAPACITY;
    while (cap < ring_capacity)
        cap <<= 1;
    mb = mb_alloc_aligned(sizeof *mb);
    if (mb == NULL)
        return NULL;
    memset(mb, 0, sizeof *mb);
    atomic_init(&mb->pending, 0);
    atomic_init(&mb->rings, NULL);
    mb->id = atomic_fetch_add_explicit(&mb_next_mailbox_id, 1, memory_order_relaxed);
    mb->capacity = cap;
    mb->wake = wake;
    mb->wake_arg = arg;
    mb->cursor = NULL;
    return mb;
}

/* Consumer side: moves one envelope out of r. Under TSan the slot is
 * acquired only once the commit is visible, i.e. after the producer's
 * release on it. */
static inline bool mb_ring_pop(mb_ring *r, rt_envelope **out)
{
#if defined(TT_TSAN) && TT_TSAN
    unsigned int c = r->ring.c_head;        /* the consumer's own index */
    void *slot;
    bool ok;

    if (c == ck_pr_load_uint(&r->ring.p_tail))
        return false;
    slot = &r->buf[c & r->ring.mask];
    MB_TSAN_ACQUIRE(slot);
    ok = ck_ring_dequeue_spsc(&r->ring, r->buf, out);
    MB_TSAN_RELEASE(slot);
    return ok;
#else
    return ck_ring_dequeue_spsc(&r->ring, r->buf, out);
#endif
}

void rt_mailbox_free(rt_mailbox *mb)
{
    mb_ring *r, *next;
    rt_envelope *env;

    if (mb == NULL)
        return;
    for (r = atomic_load_explicit(&mb->rings, memory_order_acquire); r != NULL; r = next) {
        next = r->next;
        while (mb_ring_pop(r, &env))
            rt_envelope_free(env);
        free(r);
    }
    free(mb);
}

/* Returns the calling thread's ring in mb, creating and publishing it on the
 * thread's first push; NULL when out of memory. */
static mb_ring *mb_ring_for_thread(rt_mailbox *mb)
{
    uint64_t self;
    mb_ring *head, *r = mb_tc_lookup(mb->id);

    if (r != NULL)
        return r;
    self = mb_thread_self();
    /* Acquire: pairs with the release CAS below, so the rings we walk are
     * fully initialised. Only this thread ever adds a ring with our owner
     * id, so if it is not in the list it cannot appear concurrently. */
    head = atomic_load_explicit(&mb->rings, memory_order_acquire);
    if (mb_tc_lossy) {
        for (r = head; r != NULL; r = r->next)
            if (r->owner == self)
                goto found;
    }

    r = mb_alloc_aligned(sizeof *r + (size_t)mb->capacity * sizeof(ck_ring_buffer_t));
    if (r == NULL)
        return NULL;
    ck_ring_init(&r->ring, mb->capacity);
    r->owner = self;
    memset(r->buf, 0, (size_t)mb->capacity * sizeof(ck_ring_buffer_t));
    /* Release on success publishes the initialised ring to the consumer and
     * to other producers walking the list; acquire on failure re-reads the
     * head that the next attempt links behind. */
    do {
        r->next = head;
    } while (!atomic_compare_exchange_weak_explicit(&mb->rings, &head, r,
                                                    memory_order_release,
                                                    memory_order_acquire));
found:
    mb_tc_insert(mb->id, r);
    return r;
}

int rt_mailbox_push(rt_mailbox *mb, rt_envelope *env)
{
    mb_ring *r = mb_ring_for_thread(mb);
    void *slot;

    if (r == NULL)
        return -ENOMEM;
    slot = ck_ring_enqueue_reserve_spsc(&r->ring, r->buf);
    if (slot == NULL)
        return -EAGAIN;
    MB_TSAN_ACQUIRE(slot);          /* the consumer's read of it, a lap ago */
    memcpy(slot, &env, sizeof env);
    MB_TSAN_RELEASE(slot);          /* the envelope and slot, to the consumer */
    ck_ring_enqueue_commit_spsc(&r->ring);
    MB_AFTER_COMMIT(mb);

    /* seq_cst: the full fence between publishing the envelope (the commit
     * above) and learning whether the consumer is idle; it pairs with the
     * consumer's seq_cst subtraction in rt_mailbox_done (a Dekker pattern:
     * either the consumer's subtraction sees our increment and it runs
     * again, or our increment sees its subtraction and we wake it). As an
     * RMW it also continues the release sequence of the consumer's
     * subtraction, so whoever we wake sees the actor state left by the
     * consumer's last run. */
    if (atomic_fetch_add_explicit(&mb->pending, 1, memory_order_seq_cst) == 0 && mb->wake != NULL)
        mb->wake(mb->wake_arg);
    return 0;
}

size_t rt_mailbox_pop(rt_mailbox *mb, rt_envelope **out, size_t max)
{
    mb_ring *head, *start, *r;
    size_t n = 0;

    if (max == 0)
        return 0;
    /* Acquire: pairs with the release CAS that published each ring. */
    head = atomic_load_explicit(&mb->rings, memory_order_acquire);
    if (head == NULL)
        return 0;
    start = mb->cursor != NULL ? mb->cursor : head;
    r = start;
    /* One lap over the rings, beginning where the last pop stopped; take
     * what each ring has (up to the batch), then move on. A ring that fills
     * the batch is left behind the cursor, so the next pop starts with the
     * next producer: over successive pops every producer comes first in
     * turn. Rings added meanwhile are at the head and are visited when the
     * lap wraps; the lap ends on returning to start. */
    do {
        while (n < max && mb_ring_pop(r, &out[n]))
            n++;
        r = r->next != NULL ? r->next : atomic_load_explicit(&mb->rings, memory_order_acquire);
    } while (n < max && r != start);
    mb->cursor = r;
    return n;
}

int rt_mailbox_done(rt_mailbox *mb, size_t n)
{
    int64_t left;

    /* seq_cst: the consumer's half of the Dekker pattern described in
     * rt_mailbox_push; also the release that hands this run's actor state
     * to whichever thread the next waking push schedules. */
    left = atomic_fetch_sub_explicit(&mb->pending, (int64_t)n, memory_order_seq_cst) - (int64_t)n;
    return left > 0;
}

uint64_t rt_mailbox_depth(const rt_mailbox *mb)
{
    /* Relaxed: a metric; the count may be transiently negative (see top). */
    int64_t v = atomic_load_explicit(&((rt_mailbox *)mb)->pending, memory_order_relaxed);

    return v > 0 ? (uint64_t)v : 0;
}
