/* rt_check.h: minimal assertions for the runtime tests.
 *
 * RT_CHECK records a failure with its location and keeps going, so one run
 * reports every broken expectation; main returns rt_check_finish(). The
 * counters are atomic because the stress and actor tests check from many
 * threads at once. */
#ifndef TT_TESTS_RUNTIME_RT_CHECK_H
#define TT_TESTS_RUNTIME_RT_CHECK_H

#include <stdatomic.h>
#include <stdio.h>

static _Atomic long rt_check_failures;
static _Atomic long rt_check_count;

#define RT_CHECK(cond)                                                            \
    do {                                                                          \
        atomic_fetch_add_explicit(&rt_check_count, 1, memory_order_relaxed);      \
        if (!(cond)) {                                                            \
            atomic_fetch_add_explicit(&rt_check_failures, 1, memory_order_relaxed); \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                         \
    } while (0)

#define RT_CHECK_EQ(a, b)                                                         \
    do {                                                                          \
        long long rt_a_ = (long long)(a), rt_b_ = (long long)(b);                 \
        atomic_fetch_add_explicit(&rt_check_count, 1, memory_order_relaxed);      \
        if (rt_a_ != rt_b_) {                                                     \
            atomic_fetch_add_explicit(&rt_check_failures, 1, memory_order_relaxed); \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld != %lld)\n",     \
                    __FILE__, __LINE__, #a, #b, rt_a_, rt_b_);                    \
        }                                                                         \
    } while (0)

static inline int rt_check_finish(const char *name)
{
    long f = atomic_load(&rt_check_failures), n = atomic_load(&rt_check_count);

    fprintf(stderr, "%s: %ld checks, %ld failed\n", name, n, f);
    return f == 0 ? 0 : 1;
}

#endif
