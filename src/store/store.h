/* store.h: the RocksDB store: key layout, record encodings and reads.
 *
 * Only the persistence actor writes (through a write batch it commits with
 * sync=true); any thread may read. Keys are binary: a one-byte tag, then
 * big-endian integers, so that RocksDB's bytewise order is the order we list
 * and scan in. docs/STORAGE.md explains each key family. */
#ifndef TT_STORE_STORE_H
#define TT_STORE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <rocksdb/c.h>
#include "runtime/codec.h"

/* Key tags. */
#define K_MESSAGE 'M'   /* M id                 -> msg_rec */
#define K_QUEUE   'Q'   /* Q device prio id     -> "" (unfinished outbound messages per device) */
#define K_ACCTMSG 'A'   /* A account ~id        -> "" (an account's messages, newest first) */
#define K_DEVICE  'D'   /* D device             -> dev_rec */
#define K_ACCTDEV 'd'   /* d account device     -> "" */
#define K_ACCOUNT 'C'   /* C account            -> acct_rec */
#define K_TOKEN   'K'   /* K token_id           -> tok_rec */
#define K_TOKHASH 'T'   /* T hash(32)           -> token_id (8) */
#define K_DEVLIVE 'I'   /* I device             -> devlive_rec (written by the device actor) */
#define K_SENT    'S'   /* S device id          -> "" (sent, awaiting a final report) */
#define K_PIN     'P'   /* P account number     -> pin_rec */
#define K_DEVPIN  'p'   /* p device number      -> "" (a device's pins, by number) */
#define K_INBOUND 'N'   /* N device inbound-id  -> message id (8), inbound dedupe */
#define K_OTP     'O'   /* O account number     -> otp_rec (written by the OTP actor) */
#define K_META    'Z'   /* Z name               -> value */

#define KEY_MAX 80

typedef struct tt_store tt_store;

enum { DIR_OUTBOUND = 0, DIR_INBOUND = 1 };
enum { ST_PENDING = 0, ST_SENT = 1, ST_DELIVERED = 2, ST_FAILED = 3, ST_CANCELLED = 4, ST_RECEIVED = 5 };
enum { RT_DIRECT = 0, RT_PINNED = 1, RT_AUTO = 2, RT_NONE = 3 };
enum { PRIO_HIGH = 0, PRIO_NORMAL = 1 };

typedef struct msg_rec {
    uint64_t v;            /* record version, 1 */
    uint64_t id;
    uint64_t account_id;
    uint64_t device_id;
    uint64_t direction;
    uint64_t status;
    char *to;              /* outbound: the number */
    char *from;            /* inbound: the sender */
    char *text;
    uint64_t routing;
    bool forced;
    uint64_t priority;
    uint64_t encoding;     /* tt_encoding */
    uint64_t segments;
    uint64_t attempts;
    int64_t created_at;    /* ms; 0 means null for the optional times */
    int64_t dispatched_at;
    int64_t sent_at;
    int64_t delivered_at;
    int64_t failed_at;
    int64_t expires_at;
    int64_t received_at;
    char *error;
    int64_t safe_word_verified; /* -1 not applicable, 0 false, 1 true */
    char *safe_word;       /* carried in P/send when pinned to this device */
    char *inbound_id;      /* device's id for an inbound SMS */
    rt_bin sealed;         /* OTP: the real text, sealed with the server key; `text` is masked */
} msg_rec;

typedef struct dev_rec {
    uint64_t v;
    uint64_t id;
    uint64_t account_id;
    char *name;
    uint64_t rate_per_minute;
    int64_t created_at;
    rt_bin password_sealed;
} dev_rec;

/* What the device actor learns from the device itself; kept apart from
 * dev_rec (owned by the router) so that each key has one writer. */
typedef struct devlive_rec {
    uint64_t v;
    int64_t last_seen_at;
    char *info;            /* last online status payload (JSON text), or NULL */
} devlive_rec;

typedef struct pin_rec {
    uint64_t v;
    char *number;
    uint64_t device_id;
    char *safe_word;
    int64_t created_at;
    int64_t last_used_at;  /* 0: never */
} pin_rec;

typedef struct acct_rec {
    uint64_t v;
    uint64_t id;
    char *name;
    int64_t created_at;
} acct_rec;

typedef struct tok_rec {
    uint64_t v;
    uint64_t id;
    uint64_t account_id;
    char *name;
    char *prefix;
    int64_t created_at;
    int64_t last_used_at;
    rt_bin hash;
} tok_rec;

extern const rt_schema msg_schema;
extern const rt_schema dev_schema;
extern const rt_schema acct_schema;
extern const rt_schema devlive_schema;
extern const rt_schema pin_schema;
extern const rt_schema tok_schema;

const char *msg_status_name(uint64_t st);
const char *msg_routing_name(uint64_t r);
static inline bool msg_status_final(uint64_t st)
{
    return st == ST_DELIVERED || st == ST_FAILED || st == ST_CANCELLED || st == ST_RECEIVED;
}

/* Opens (creating if missing) the database at dir. 0 or -EIO with a logged
 * reason (including "already in use by another process"). */
int store_open(const char *dir, tt_store **out);
void store_close(tt_store *st);
rocksdb_t *store_db(tt_store *st);

/* Key builders; return the key length. */
size_t key_u64(uint8_t *out, char tag, uint64_t a);
size_t key_u64x2(uint8_t *out, char tag, uint64_t a, uint64_t b);
size_t key_queue(uint8_t *out, uint64_t device, uint64_t prio, uint64_t id);
size_t key_acctmsg(uint8_t *out, uint64_t account, uint64_t id);
size_t key_tokhash(uint8_t *out, const uint8_t hash[32]);
/* tag + u64 + string (number or inbound id, at most 64 bytes). */
size_t key_u64_str(uint8_t *out, char tag, uint64_t a, const char *s);
uint64_t key_get_u64(const uint8_t *p);
void key_put_u64(uint8_t *p, uint64_t v);

/* Reads and decodes one record: 0, -ENOENT, -EIO, or -EINVAL (corrupt). */
int store_get(tt_store *st, const uint8_t *key, size_t klen, const rt_schema *s, void *out);
/* Raw get: *val malloc'd. 0, -ENOENT or -EIO. */
int store_get_raw(tt_store *st, const uint8_t *key, size_t klen, char **val, size_t *vlen);
/* The largest id under a one-byte tag whose keys are tag+u64 (0 if none). */
uint64_t store_last_id(tt_store *st, char tag);

/* Z name: a meta key. */
size_t key_meta(uint8_t *out, const char *name);
/* The largest id ever handed out for tag: the larger of the last key and the
 * high-water mark stored under meta key name (ids of deleted records are
 * never reused). */
uint64_t store_high_water(tt_store *st, char tag, const char *name);

/* Iterates keys with the given prefix starting at start (>= prefix); calls fn
 * for each until it returns nonzero or limit items were visited. Returns the
 * number visited, or a negative error. */
typedef int (*store_iter_fn)(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg);
int store_scan(tt_store *st, const uint8_t *prefix, size_t plen, const uint8_t *start, size_t slen,
               size_t limit, store_iter_fn fn, void *arg);

/* Encodes a record into a malloc'd value. */
int store_encode(const rt_schema *s, const void *rec, char **val, size_t *vlen);

#endif
