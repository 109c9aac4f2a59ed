/* pincache.h: the router's bounded cache of pins.
 *
 * Pins live in RocksDB; the router, their only writer, keeps the most
 * recently used ones here (a hash table with an LRU list), so that ten
 * million pins need not fit in memory. Because every pin change goes through
 * the router, an entry here is never stale. Not thread-safe: router only. */
#ifndef TT_ACTORS_PINCACHE_H
#define TT_ACTORS_PINCACHE_H

#include <stddef.h>
#include <stdint.h>
#include "util/phone.h"
#include "util/safeword.h"

typedef struct pin_entry {
    uint64_t account_id;
    char number[TT_PHONE_MAX];
    uint64_t device_id;
    char safe_word[TT_SAFEWORD_MAX];
    int64_t created_at;
    int64_t last_used_at;
    struct pin_entry *hnext;          /* hash chain */
    struct pin_entry *prev, *next;    /* LRU list, most recent first */
} pin_entry;

typedef struct pincache pincache;

pincache *pincache_new(size_t capacity);
void pincache_free(pincache *c);
/* The entry, moved to the front; NULL when not cached. */
pin_entry *pincache_get(pincache *c, uint64_t account_id, const char *number);
/* Inserts or replaces (copying e's fields); evicts the least recently used
 * entry when full. Returns the cached entry or NULL on ENOMEM. */
pin_entry *pincache_put(pincache *c, const pin_entry *e);
void pincache_remove(pincache *c, uint64_t account_id, const char *number);
/* Removes every entry of a device, calling fn (if not NULL) on each first. */
void pincache_remove_device(pincache *c, uint64_t device_id, void (*fn)(const pin_entry *e, void *arg), void *arg);

#endif
