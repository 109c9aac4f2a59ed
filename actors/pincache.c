/* pincache.c: chained hash table plus LRU list (see pincache.h). */
#include "actors/pincache.h"

#include <stdlib.h>
#include <string.h>

struct pincache {
    pin_entry **buckets;
    size_t nbuckets;    /* a power of two */
    size_t size, capacity;
    pin_entry *head, *tail;
};

static uint64_t pin_hash(uint64_t account_id, const char *number)
{
    uint64_t h = 1469598103934665603ULL ^ account_id; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)number; *p; p++) {
        h ^= *p;
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

pincache *pincache_new(size_t capacity)
{
    pincache *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    c->capacity = capacity ? capacity : 1;
    c->nbuckets = 16;
    while (c->nbuckets < c->capacity)
        c->nbuckets <<= 1;
    c->buckets = calloc(c->nbuckets, sizeof(*c->buckets));
    if (!c->buckets) {
        free(c);
        return NULL;
    }
    return c;
}

void pincache_free(pincache *c)
{
    if (!c)
        return;
    for (pin_entry *e = c->head, *n; e; e = n) {
        n = e->next;
        free(e);
    }
    free(c->buckets);
    free(c);
}

static void lru_unlink(pincache *c, pin_entry *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        c->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_front(pincache *c, pin_entry *e)
{
    e->prev = NULL;
    e->next = c->head;
    if (c->head)
        c->head->prev = e;
    c->head = e;
    if (!c->tail)
        c->tail = e;
}

static pin_entry **slot_of(pincache *c, uint64_t account_id, const char *number)
{
    pin_entry **s = &c->buckets[pin_hash(account_id, number) & (c->nbuckets - 1)];
    while (*s && !((*s)->account_id == account_id && !strcmp((*s)->number, number)))
        s = &(*s)->hnext;
    return s;
}

pin_entry *pincache_get(pincache *c, uint64_t account_id, const char *number)
{
    pin_entry *e = *slot_of(c, account_id, number);
    if (e && c->head != e) {
        lru_unlink(c, e);
        lru_front(c, e);
    }
    return e;
}

static void drop(pincache *c, pin_entry **s)
{
    pin_entry *e = *s;
    *s = e->hnext;
    lru_unlink(c, e);
    free(e);
    c->size--;
}

pin_entry *pincache_put(pincache *c, const pin_entry *src)
{
    pin_entry **s = slot_of(c, src->account_id, src->number);
    pin_entry *e = *s;
    if (!e) {
        if (c->size >= c->capacity && c->tail) {
            pin_entry *t = c->tail;
            drop(c, slot_of(c, t->account_id, t->number));
            s = slot_of(c, src->account_id, src->number);
        }
        e = malloc(sizeof(*e));
        if (!e)
            return NULL;
        *e = *src;
        e->hnext = NULL;
        e->prev = e->next = NULL;
        *s = e;
        lru_front(c, e);
        c->size++;
        return e;
    }
    pin_entry *hn = e->hnext;
    lru_unlink(c, e);
    *e = *src;
    e->hnext = hn;
    lru_front(c, e);
    return e;
}

void pincache_remove(pincache *c, uint64_t account_id, const char *number)
{
    pin_entry **s = slot_of(c, account_id, number);
    if (*s)
        drop(c, s);
}

void pincache_remove_device(pincache *c, uint64_t device_id, void (*fn)(const pin_entry *e, void *arg), void *arg)
{
    for (pin_entry *e = c->head, *n; e; e = n) {
        n = e->next;
        if (e->device_id != device_id)
            continue;
        if (fn)
            fn(e, arg);
        drop(c, slot_of(c, e->account_id, e->number));
    }
}

