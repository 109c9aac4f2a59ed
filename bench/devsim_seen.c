/* devsim_seen.c: bounded id -> last-status set for the device simulator.
 *
 * Open addressing with linear probing and backward-shift deletion (no
 * tombstones, so lookups stay short however many ids were forgotten). The
 * table grows by doubling and keeps its load at or under one half; a FIFO of
 * ids says which one to forget once `max` are held. Memory grows with use, so
 * a fleet of a thousand mostly idle devices costs little. */
#include "devsim_seen.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define SEEN_MIN_SLOTS 64

static size_t seen_hash(int64_t id)
{
    uint64_t x = (uint64_t)id * UINT64_C(0x9E3779B97F4A7C15);
    return (size_t)(x ^ (x >> 29));
}

void seen_init(struct seen_set *s, size_t max)
{
    memset(s, 0, sizeof *s);
    s->max = max ? max : 1;
}

void seen_free(struct seen_set *s)
{
    free(s->slots);
    free(s->fifo);
    memset(s, 0, sizeof *s);
}

/* Index of id's slot, or of the empty slot where it would go. */
static size_t seen_find(const struct seen_set *s, int64_t id)
{
    size_t i = seen_hash(id) & s->mask;
    while (s->slots[i].id != 0 && s->slots[i].id != id)
        i = (i + 1) & s->mask;
    return i;
}

int seen_get(const struct seen_set *s, int64_t id, int *status)
{
    if (!s->slots || id <= 0)
        return 0;
    size_t i = seen_find(s, id);
    if (s->slots[i].id != id)
        return 0;
    *status = s->slots[i].status;
    return 1;
}

int seen_set_status(struct seen_set *s, int64_t id, int status)
{
    if (!s->slots || id <= 0)
        return -ENOENT;
    size_t i = seen_find(s, id);
    if (s->slots[i].id != id)
        return -ENOENT;
    s->slots[i].status = (uint8_t)status;
    return 0;
}

static int seen_rehash(struct seen_set *s, size_t nslots)
{
    struct seen_slot *old = s->slots;
    size_t oldn = old ? s->mask + 1 : 0;
    struct seen_slot *slots = calloc(nslots, sizeof *slots);
    if (!slots)
        return -ENOMEM;
    s->slots = slots;
    s->mask = nslots - 1;
    for (size_t i = 0; i < oldn; i++)
        if (old[i].id != 0)
            s->slots[seen_find(s, old[i].id)] = old[i];
    free(old);
    return 0;
}

/* Removes the entry at slot i, shifting later members of its probe run back
 * so that every remaining id is still reachable from its home slot. */
static void seen_remove_at(struct seen_set *s, size_t i)
{
    size_t j = i;
    for (;;) {
        j = (j + 1) & s->mask;
        if (s->slots[j].id == 0)
            break;
        size_t home = seen_hash(s->slots[j].id) & s->mask;
        /* The entry at j may move to i unless its home lies cyclically in (i, j]. */
        int stays = (i <= j) ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            s->slots[i] = s->slots[j];
            i = j;
        }
    }
    s->slots[i].id = 0;
    s->slots[i].status = 0;
    s->count--;
}

int seen_add(struct seen_set *s, int64_t id, int status)
{
    if (id <= 0)
        return -EINVAL;
    if (s->slots && s->slots[seen_find(s, id)].id == id)
        return -EEXIST;

    if (s->count < s->max) {
        /* Not full yet: nothing is forgotten, the FIFO is a plain array. */
        size_t want = s->slots ? s->mask + 1 : SEEN_MIN_SLOTS;
        while ((s->count + 1) * 2 > want)
            want *= 2;
        if (!s->slots || want != s->mask + 1) {
            int rc = seen_rehash(s, want);
            if (rc)
                return rc;
        }
        if (s->count == s->fifo_cap) {
            size_t cap = s->fifo_cap ? s->fifo_cap * 2 : 64;
            if (cap > s->max)
                cap = s->max;
            int64_t *f = realloc(s->fifo, cap * sizeof *f);
            if (!f)
                return -ENOMEM;
            s->fifo = f;
            s->fifo_cap = cap;
        }
        s->fifo[s->count] = id;
    } else {
        /* Full: forget the oldest id and reuse its FIFO cell. */
        int64_t old = s->fifo[s->fifo_head];
        size_t i = seen_find(s, old);
        if (s->slots[i].id == old)
            seen_remove_at(s, i);
        s->fifo[s->fifo_head] = id;
        s->fifo_head = (s->fifo_head + 1) % s->max;
    }
    size_t i = seen_find(s, id);
    s->slots[i].id = id;
    s->slots[i].status = (uint8_t)status;
    s->count++;
    return 0;
}
