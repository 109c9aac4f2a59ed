/* devsim_seen.h: the simulated device's memory of the message ids it handled.
 *
 * A device must not send an SMS twice when the server hands it the same id
 * again (API.md 8), so it remembers each id and the last status it reported.
 * The memory is bounded: past `max` ids the oldest is forgotten (FIFO), so a
 * long benchmark cannot grow a device without limit, while the bound is far
 * above any window of re-sends. Not thread-safe: the caller locks. */
#ifndef TT_BENCH_DEVSIM_SEEN_H
#define TT_BENCH_DEVSIM_SEEN_H

#include <stddef.h>
#include <stdint.h>

/* Last status reported for an id. SEEN_NONE: handled, nothing reported yet. */
enum { SEEN_NONE = 0, SEEN_SENT = 1, SEEN_DELIVERED = 2, SEEN_FAILED = 3 };

struct seen_slot {
    int64_t id; /* 0 marks an empty slot (message ids are positive) */
    uint8_t status;
};

struct seen_set {
    struct seen_slot *slots; /* open addressing, linear probing */
    size_t mask;             /* slot count - 1 (a power of two), 0 when empty */
    size_t count;
    size_t max;              /* ids kept before the oldest is forgotten */
    int64_t *fifo;           /* ids in insertion order, a ring once full */
    size_t fifo_cap, fifo_head;
};

void seen_init(struct seen_set *s, size_t max);
void seen_free(struct seen_set *s);
/* Looks id up. Returns 1 and sets *status when present, else 0. */
int seen_get(const struct seen_set *s, int64_t id, int *status);
/* Sets the status of an id already present. 0, or -ENOENT. */
int seen_set_status(struct seen_set *s, int64_t id, int status);
/* Inserts an id not present, forgetting the oldest when at `max`.
 * 0, -EEXIST when present, -EINVAL for id <= 0, -ENOMEM. */
int seen_add(struct seen_set *s, int64_t id, int status);

#endif
