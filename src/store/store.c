/* store.c: RocksDB open/close, key builders, record schemas and reads.
 *
 * Writes never happen here: they go through the persistence actor's group
 * commit (actors/persist.c). Reads are safe from any thread. */
#include "store/store.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "util/log.h"

struct tt_store {
    rocksdb_t *db;
    rocksdb_options_t *opts;
    rocksdb_readoptions_t *ropts;
    rocksdb_cache_t *cache;
    rocksdb_block_based_table_options_t *topts;
};

static const rt_field msg_fields[] = {
    RT_FIELD(msg_rec, v, RT_F_U64),
    RT_FIELD(msg_rec, id, RT_F_U64),
    RT_FIELD(msg_rec, account_id, RT_F_U64),
    RT_FIELD(msg_rec, device_id, RT_F_U64),
    RT_FIELD(msg_rec, direction, RT_F_U64),
    RT_FIELD(msg_rec, status, RT_F_U64),
    RT_FIELD(msg_rec, to, RT_F_NSTR),
    RT_FIELD(msg_rec, from, RT_F_NSTR),
    RT_FIELD(msg_rec, text, RT_F_STR),
    RT_FIELD(msg_rec, routing, RT_F_U64),
    RT_FIELD(msg_rec, forced, RT_F_BOOL),
    RT_FIELD(msg_rec, priority, RT_F_U64),
    RT_FIELD(msg_rec, encoding, RT_F_U64),
    RT_FIELD(msg_rec, segments, RT_F_U64),
    RT_FIELD(msg_rec, attempts, RT_F_U64),
    RT_FIELD(msg_rec, created_at, RT_F_I64),
    RT_FIELD(msg_rec, dispatched_at, RT_F_I64),
    RT_FIELD(msg_rec, sent_at, RT_F_I64),
    RT_FIELD(msg_rec, delivered_at, RT_F_I64),
    RT_FIELD(msg_rec, failed_at, RT_F_I64),
    RT_FIELD(msg_rec, expires_at, RT_F_I64),
    RT_FIELD(msg_rec, received_at, RT_F_I64),
    RT_FIELD(msg_rec, error, RT_F_NSTR),
    RT_FIELD(msg_rec, safe_word_verified, RT_F_I64),
    RT_FIELD(msg_rec, safe_word, RT_F_NSTR),
    RT_FIELD(msg_rec, inbound_id, RT_F_NSTR),
    RT_FIELD(msg_rec, sealed, RT_F_BIN),
};
const rt_schema msg_schema = RT_SCHEMA("message", msg_fields);

static const rt_field dev_fields[] = {
    RT_FIELD(dev_rec, v, RT_F_U64),
    RT_FIELD(dev_rec, id, RT_F_U64),
    RT_FIELD(dev_rec, account_id, RT_F_U64),
    RT_FIELD(dev_rec, name, RT_F_STR),
    RT_FIELD(dev_rec, rate_per_minute, RT_F_U64),
    RT_FIELD(dev_rec, created_at, RT_F_I64),
    RT_FIELD(dev_rec, password_sealed, RT_F_BIN),
};
const rt_schema dev_schema = RT_SCHEMA("device", dev_fields);

static const rt_field devlive_fields[] = {
    RT_FIELD(devlive_rec, v, RT_F_U64),
    RT_FIELD(devlive_rec, last_seen_at, RT_F_I64),
    RT_FIELD(devlive_rec, info, RT_F_NSTR),
};
const rt_schema devlive_schema = RT_SCHEMA("devlive", devlive_fields);

static const rt_field pin_fields[] = {
    RT_FIELD(pin_rec, v, RT_F_U64),
    RT_FIELD(pin_rec, number, RT_F_STR),
    RT_FIELD(pin_rec, device_id, RT_F_U64),
    RT_FIELD(pin_rec, safe_word, RT_F_STR),
    RT_FIELD(pin_rec, created_at, RT_F_I64),
    RT_FIELD(pin_rec, last_used_at, RT_F_I64),
};
const rt_schema pin_schema = RT_SCHEMA("pin", pin_fields);

static const rt_field acct_fields[] = {
    RT_FIELD(acct_rec, v, RT_F_U64),
    RT_FIELD(acct_rec, id, RT_F_U64),
    RT_FIELD(acct_rec, name, RT_F_STR),
    RT_FIELD(acct_rec, created_at, RT_F_I64),
};
const rt_schema acct_schema = RT_SCHEMA("account", acct_fields);

static const rt_field tok_fields[] = {
    RT_FIELD(tok_rec, v, RT_F_U64),
    RT_FIELD(tok_rec, id, RT_F_U64),
    RT_FIELD(tok_rec, account_id, RT_F_U64),
    RT_FIELD(tok_rec, name, RT_F_STR),
    RT_FIELD(tok_rec, prefix, RT_F_STR),
    RT_FIELD(tok_rec, created_at, RT_F_I64),
    RT_FIELD(tok_rec, last_used_at, RT_F_I64),
    RT_FIELD(tok_rec, hash, RT_F_BIN),
};
const rt_schema tok_schema = RT_SCHEMA("token", tok_fields);

const char *msg_status_name(uint64_t st)
{
    static const char *names[] = {"pending", "sent", "delivered", "failed", "cancelled", "received"};
    return st < sizeof(names) / sizeof(names[0]) ? names[st] : "unknown";
}

const char *msg_routing_name(uint64_t r)
{
    static const char *names[] = {"direct", "pinned", "auto", NULL};
    return r < 3 ? names[r] : NULL;
}

int store_open(const char *dir, tt_store **out)
{
    tt_store *st = calloc(1, sizeof(*st));
    if (!st)
        return -ENOMEM;
    st->opts = rocksdb_options_create();
    rocksdb_options_set_create_if_missing(st->opts, 1);
    rocksdb_options_increase_parallelism(st->opts, 2);
    rocksdb_options_set_max_background_jobs(st->opts, 2);
    rocksdb_options_set_write_buffer_size(st->opts, 64u << 20);
    rocksdb_options_set_keep_log_file_num(st->opts, 4);
    st->cache = rocksdb_cache_create_lru(64u << 20);
    st->topts = rocksdb_block_based_options_create();
    rocksdb_block_based_options_set_block_cache(st->topts, st->cache);
    rocksdb_options_set_block_based_table_factory(st->opts, st->topts);
    char *err = NULL;
    st->db = rocksdb_open(st->opts, dir, &err);
    if (!st->db) {
        LOG_ERROR("cannot open the store at %s: %s", dir, err ? err : "unknown error");
        free(err);
        rocksdb_options_destroy(st->opts);
        rocksdb_block_based_options_destroy(st->topts);
        rocksdb_cache_destroy(st->cache);
        free(st);
        return -EIO;
    }
    st->ropts = rocksdb_readoptions_create();
    *out = st;
    return 0;
}

void store_close(tt_store *st)
{
    if (!st)
        return;
    rocksdb_close(st->db);
    rocksdb_readoptions_destroy(st->ropts);
    rocksdb_options_destroy(st->opts);
    rocksdb_block_based_options_destroy(st->topts);
    rocksdb_cache_destroy(st->cache);
    free(st);
}

rocksdb_t *store_db(tt_store *st) { return st->db; }

void key_put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

uint64_t key_get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

size_t key_u64(uint8_t *out, char tag, uint64_t a)
{
    out[0] = (uint8_t)tag;
    key_put_u64(out + 1, a);
    return 9;
}

size_t key_u64x2(uint8_t *out, char tag, uint64_t a, uint64_t b)
{
    out[0] = (uint8_t)tag;
    key_put_u64(out + 1, a);
    key_put_u64(out + 9, b);
    return 17;
}

size_t key_queue(uint8_t *out, uint64_t device, uint64_t prio, uint64_t id)
{
    out[0] = K_QUEUE;
    key_put_u64(out + 1, device);
    out[9] = (uint8_t)prio;
    key_put_u64(out + 10, id);
    return 18;
}

/* Newest first: the id is stored inverted, so a forward scan meets the
 * highest id first. */
size_t key_acctmsg(uint8_t *out, uint64_t account, uint64_t id)
{
    return key_u64x2(out, K_ACCTMSG, account, ~id);
}

size_t key_u64_str(uint8_t *out, char tag, uint64_t a, const char *s)
{
    size_t n = strlen(s);
    if (n > 64)
        n = 64;
    out[0] = (uint8_t)tag;
    key_put_u64(out + 1, a);
    memcpy(out + 9, s, n);
    return 9 + n;
}

size_t key_tokhash(uint8_t *out, const uint8_t hash[32])
{
    out[0] = K_TOKHASH;
    memcpy(out + 1, hash, 32);
    return 33;
}

int store_get_raw(tt_store *st, const uint8_t *key, size_t klen, char **val, size_t *vlen)
{
    char *err = NULL;
    size_t len = 0;
    char *v = rocksdb_get(st->db, st->ropts, (const char *)key, klen, &len, &err);
    if (err) {
        LOG_ERROR("store read failed: %s", err);
        free(err);
        return -EIO;
    }
    if (!v)
        return -ENOENT;
    *val = v;
    *vlen = len;
    return 0;
}

int store_get(tt_store *st, const uint8_t *key, size_t klen, const rt_schema *s, void *out)
{
    char *v;
    size_t len;
    int rc = store_get_raw(st, key, klen, &v, &len);
    if (rc)
        return rc;
    rc = rt_codec_decode(s, v, len, out);
    rocksdb_free(v);
    if (rc) {
        LOG_ERROR("corrupt %s record in the store", s->name);
        return -EINVAL;
    }
    return 0;
}

uint64_t store_last_id(tt_store *st, char tag)
{
    rocksdb_iterator_t *it = rocksdb_create_iterator(st->db, st->ropts);
    uint8_t upper[1] = {(uint8_t)(tag + 1)};
    rocksdb_iter_seek_for_prev(it, (const char *)upper, 1);
    uint64_t id = 0;
    /* seek_for_prev lands on the last key < tag+1 (or equal, which has
     * length 1 and is never one of ours). */
    while (rocksdb_iter_valid(it)) {
        size_t klen;
        const uint8_t *k = (const uint8_t *)rocksdb_iter_key(it, &klen);
        if (klen < 1 || k[0] != (uint8_t)tag)
            break;
        if (klen >= 9) {
            id = key_get_u64(k + 1);
            break;
        }
        rocksdb_iter_prev(it);
    }
    rocksdb_iter_destroy(it);
    return id;
}

size_t key_meta(uint8_t *out, const char *name)
{
    size_t n = strlen(name);
    if (n > KEY_MAX - 1)
        n = KEY_MAX - 1;
    out[0] = K_META;
    memcpy(out + 1, name, n);
    return n + 1;
}

uint64_t store_high_water(tt_store *st, char tag, const char *name)
{
    uint64_t last = store_last_id(st, tag), stored = 0;
    uint8_t k[KEY_MAX];
    char *v;
    size_t vl;
    if (store_get_raw(st, k, key_meta(k, name), &v, &vl) == 0) {
        if (vl == 8)
            stored = key_get_u64((const uint8_t *)v);
        rocksdb_free(v);
    }
    return stored > last ? stored : last;
}

int store_scan(tt_store *st, const uint8_t *prefix, size_t plen, const uint8_t *start, size_t slen,
               size_t limit, store_iter_fn fn, void *arg)
{
    rocksdb_iterator_t *it = rocksdb_create_iterator(st->db, st->ropts);
    if (start && slen)
        rocksdb_iter_seek(it, (const char *)start, slen);
    else
        rocksdb_iter_seek(it, (const char *)prefix, plen);
    int n = 0;
    while (rocksdb_iter_valid(it) && (size_t)n < limit) {
        size_t klen, vlen;
        const char *k = rocksdb_iter_key(it, &klen);
        if (klen < plen || memcmp(k, prefix, plen) != 0)
            break;
        const char *v = rocksdb_iter_value(it, &vlen);
        n++;
        if (fn((const uint8_t *)k, klen, v, vlen, arg))
            break;
        rocksdb_iter_next(it);
    }
    char *err = NULL;
    rocksdb_iter_get_error(it, &err);
    rocksdb_iter_destroy(it);
    if (err) {
        LOG_ERROR("store scan failed: %s", err);
        free(err);
        return -EIO;
    }
    return n;
}

int store_encode(const rt_schema *s, const void *rec, char **val, size_t *vlen)
{
    return rt_codec_encode(s, rec, val, vlen);
}
