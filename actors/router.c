/* router.c: the router actor (see router.h). */
#include "actors/router.h"

#include <errno.h>
#include <jansson.h>
#include <msgpack.h>
#include <stdarg.h>
#include <stdio.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "actors/device.h"
#include "actors/pincache.h"
#include "actors/persist.h"
#include "actors/proto.h"
#include "server.h"
#include "util/clock.h"
#include "util/crypto.h"
#include "http/handlers.h"
#include "http/metrics.h"
#include "util/log.h"
#include "util/safeword.h"
#include "util/vec.h"
#include <sodium.h>

typedef struct acct_devs {
    uint64_t account_id;
    uint64_t *ids;        /* ascending */
    size_t n, cap;
} acct_devs;

typedef struct router {
    tt_server *srv;
    acct_devs *accts;
    size_t nacct, capacct;
    uint64_t last_device_id;
    uint64_t last_token_id;
    pincache *pins;
    int made_pin;         /* the last route_one made a new pin */
    uint64_t revoked[64]; /* recently deleted tokens: a flush must not write them back */
    size_t revoked_i;
    rt_actor *self;
    /* The router's writes, like a device's, go to the persistence actor one
     * request at a time: what it routes while one is on its way is gathered
     * into the next. So its writes land in the order it made them (the
     * router runs on whichever pool thread, and mailboxes keep order only
     * per thread), and the persistence actor gets one request per batch. */
    preq *wr;             /* gathered, not sent */
    size_t wr_ops;
    rt_envelope *wr_env;  /* built, but persist's mailbox was full */
    int wr_inflight;
    int flush_armed;
    /* Device records as last written, by id: the router is their only
     * writer, so changes start from here, not from the store (which may not
     * hold the previous change yet). */
    struct devrec { char *val; size_t len; } *recs;
    size_t caprecs;
} router;

#define ROUTER_WR_MAX_OPS 200000 /* past this, new writes are refused (503) */

#define TOKEN_FLUSH_MS 60000

static acct_devs *acct_get(router *rt, uint64_t account_id, int create)
{
    for (size_t i = 0; i < rt->nacct; i++)
        if (rt->accts[i].account_id == account_id)
            return &rt->accts[i];
    if (!create)
        return NULL;
    if (TT_VEC_RESERVE(rt->accts, rt->capacct, rt->nacct + 1, 8) != 0)
        return NULL;
    acct_devs *a = &rt->accts[rt->nacct++];
    *a = (acct_devs){account_id, NULL, 0, 0};
    return a;
}

static int acct_add(router *rt, uint64_t account_id, uint64_t device_id)
{
    acct_devs *a = acct_get(rt, account_id, 1);
    if (!a)
        return -ENOMEM;
    if (TT_VEC_RESERVE(a->ids, a->cap, a->n + 1, 8) != 0)
        return -ENOMEM;
    a->ids[a->n++] = device_id; /* ids only grow, so the list stays sorted */
    return 0;
}

static void acct_remove(router *rt, uint64_t account_id, uint64_t device_id)
{
    acct_devs *a = acct_get(rt, account_id, 0);
    for (size_t i = 0; a && i < a->n; i++)
        if (a->ids[i] == device_id) {
            memmove(a->ids + i, a->ids + i + 1, (a->n - i - 1) * sizeof(*a->ids));
            a->n--;
            return;
        }
}

/* A device of this account, or NULL. */
static dev_handle *own_device(router *rt, uint64_t account_id, uint64_t device_id)
{
    dev_handle *h = devreg_get(&rt->srv->reg, device_id);
    if (!h || h->account_id != account_id || atomic_load_explicit(&h->deleted, memory_order_relaxed))
        return NULL;
    return h;
}

/* The outcome of routing one message, for a single send or a batch item. */
typedef struct outcome {
    int status;           /* 202, or the problem's status */
    const char *code;
    char detail[160];
} outcome;

static int fail(outcome *o, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(outcome *o, int status, const char *code, const char *fmt, ...)
{
    o->status = status;
    o->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->detail, sizeof(o->detail), fmt, ap);
    va_end(ap);
    return -1;
}

static void reply_outcome(const rt_envelope *env, const outcome *o)
{
    proto_reply_problem(env, o->status, o->code, "%s", o->detail);
}

/* ---- pins ------------------------------------------------------------------- */

/* The pin of (account, number): the cache, else the store (then cached). */
static pin_entry *pin_lookup(router *rt, uint64_t account_id, const char *number)
{
    pin_entry *e = pincache_get(rt->pins, account_id, number);
    if (e)
        return e;
    pin_rec p = {0};
    uint8_t k[KEY_MAX];
    if (store_get(rt->srv->store, k, key_u64_str(k, K_PIN, account_id, number), &pin_schema, &p) != 0)
        return NULL;
    pin_entry n = {.account_id = account_id, .device_id = p.device_id, .created_at = p.created_at,
                   .last_used_at = p.last_used_at};
    snprintf(n.number, sizeof(n.number), "%s", p.number);
    snprintf(n.safe_word, sizeof(n.safe_word), "%s", p.safe_word);
    rt_codec_free(&pin_schema, &p);
    return pincache_put(rt->pins, &n);
}

static void pin_to_rec(const pin_entry *e, pin_rec *p)
{
    *p = (pin_rec){1, (char *)e->number, e->device_id, (char *)e->safe_word, e->created_at, e->last_used_at};
}

/* Writes the pin; with_index also its entry in the device's pin list (only
 * needed when the pin is new: the list holds no data). */
static int pin_write(preq *q, const pin_entry *e, int with_index)
{
    pin_rec p;
    pin_to_rec(e, &p);
    char *val;
    size_t vlen;
    if (store_encode(&pin_schema, &p, &val, &vlen) != 0)
        return -ENOMEM;
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64_str(k, K_PIN, e->account_id, e->number), val, vlen);
    if (with_index)
        preq_put(q, k, key_u64_str(k, K_DEVPIN, e->device_id, e->number), "", 0);
    free(val);
    return 0;
}

static void pin_delete(preq *q, uint64_t account_id, uint64_t device_id, const char *number)
{
    uint8_t k[KEY_MAX];
    preq_del(q, k, key_u64_str(k, K_PIN, account_id, number));
    preq_del(q, k, key_u64_str(k, K_DEVPIN, device_id, number));
}

/* Posts a P/pins payload for the device to publish once the change is stored. */
static void pin_notify(preq *q, dev_handle *h, json_t *payload)
{
    char *text = json_dumps(payload, JSON_COMPACT);
    json_decref(payload);
    dev_text t = {text};
    char *buf;
    size_t len;
    if (text && rt_codec_encode(&dev_text_schema, &t, &buf, &len) == 0) {
        preq_post(q, rt_actor_mailbox(h->actor), 0, DEV_PIN_PUBLISH, 0, buf, len);
        free(buf);
    }
    free(text);
}

static json_t *pin_payload(const pin_entry *e)
{
    return json_pack("{ssss}", "number", e->number, "safe_word", e->safe_word);
}

/* Creates a pin (number -> device) with a new safe word. */
static pin_entry *pin_create(router *rt, preq *q, uint64_t account_id, const char *number, dev_handle *h, int64_t now,
                             int used)
{
    pin_entry n = {.account_id = account_id, .device_id = h->id, .created_at = now, .last_used_at = used ? now : 0};
    snprintf(n.number, sizeof(n.number), "%s", number);
    tt_safeword_new(n.safe_word);
    pin_entry *e = pincache_put(rt->pins, &n);
    if (!e || pin_write(q, e, 1) != 0)
        return NULL;
    pin_notify(q, h, pin_payload(e));
    atomic_fetch_add_explicit(&h->pins, 1, memory_order_relaxed);
    return e;
}

/* ---- routing ---------------------------------------------------------------- */

/* Auto routing: the online device with the fewest queued messages (ties: the
 * lowest id); with force and none online, the most recently seen. */
static dev_handle *pick_device(router *rt, uint64_t account_id, int force, outcome *o)
{
    acct_devs *a = acct_get(rt, account_id, 0);
    dev_handle *best = NULL, *recent = NULL;
    int64_t best_q = 0, recent_seen = -1;
    size_t live = 0;
    for (size_t i = 0; a && i < a->n; i++) {
        dev_handle *h = own_device(rt, account_id, a->ids[i]);
        if (!h)
            continue;
        live++;
        int64_t seen = atomic_load_explicit(&h->last_seen_at, memory_order_relaxed);
        if (seen > recent_seen) {
            recent = h;
            recent_seen = seen;
        }
        if (!atomic_load_explicit(&h->online, memory_order_relaxed))
            continue;
        int64_t qd = atomic_load_explicit(&h->queued, memory_order_relaxed);
        if (!best || qd < best_q) {
            best = h;
            best_q = qd;
        }
    }
    if (best)
        return best;
    if (!live) {
        fail(o, 409, "no_devices", "the account has no devices; create one with POST /api/v1/devices");
        return NULL;
    }
    if (!force) {
        fail(o, 409, "no_device_online", "no device of the account is online; pass force=true to queue");
        return NULL;
    }
    return recent;
}

/* Routes one message: chooses the device (and pin), adds the message's keys
 * and its device's notification to q. On success *val is the encoded message
 * (malloc'd) and *hout its device, whose queued count was incremented. */
static int route_one(router *rt, const submit *s, preq *q, char **val, size_t *vlen, dev_handle **hout, outcome *o)
{
    int64_t now = tt_now_ms();
    dev_handle *h;
    uint64_t routing;
    const char *safe_word = NULL;
    pin_entry *pin = pin_lookup(rt, s->account_id, s->to);
    if (pin && !own_device(rt, s->account_id, pin->device_id))
        pin = NULL; /* a pin of a deleted device (they go with it) */
    if (s->device_id) {
        h = own_device(rt, s->account_id, s->device_id);
        if (!h)
            return fail(o, 404, "not_found", "device %" PRIu64 " not found", s->device_id);
        if (!s->force && !atomic_load_explicit(&h->online, memory_order_relaxed))
            return fail(o, 409, "device_offline", "device %" PRIu64 " is offline; pass force=true to queue", h->id);
        routing = RT_DIRECT;
        if (pin && pin->device_id == h->id) {
            /* A direct send neither creates nor moves a pin; through the
             * pinned device itself it carries the safe word. */
            safe_word = pin->safe_word;
        }
    } else if (pin) {
        h = own_device(rt, s->account_id, pin->device_id);
        if (!s->force && !atomic_load_explicit(&h->online, memory_order_relaxed))
            return fail(o, 409, "device_offline",
                        "%s is pinned to device %" PRIu64 ", which is offline; pass force=true to queue", s->to, h->id);
        routing = RT_PINNED;
        safe_word = pin->safe_word;
    } else {
        h = pick_device(rt, s->account_id, s->force, o);
        if (!h)
            return -1;
        routing = RT_AUTO;
    }
    size_t mark = preq_nops(q);
    (void)mark;
    rt->made_pin = routing == RT_AUTO;
    if (routing == RT_AUTO) {
        pin = pin_create(rt, q, s->account_id, s->to, h, now, 1);
        if (!pin)
            return fail(o, 503, "overloaded", "out of memory");
        safe_word = pin->safe_word;
    } else if (routing == RT_PINNED || safe_word) {
        pin->last_used_at = now;
        pin_write(q, pin, 0);
    }
    msg_rec r = {0};
    r.v = 1;
    r.id = atomic_fetch_add_explicit(&rt->srv->next_message_id, 1, memory_order_relaxed);
    r.account_id = s->account_id;
    r.device_id = h->id;
    r.direction = DIR_OUTBOUND;
    r.status = ST_PENDING;
    r.to = s->to;
    r.text = s->text;
    r.routing = routing;
    r.forced = s->force;
    r.priority = s->priority;
    r.encoding = s->encoding;
    r.segments = s->segments;
    r.created_at = now;
    r.expires_at = now + s->ttl_s * 1000;
    r.safe_word_verified = -1;
    r.safe_word = (char *)safe_word;
    r.sealed = s->sealed;
    if (store_encode(&msg_schema, &r, val, vlen) != 0)
        return fail(o, 503, "overloaded", "out of memory");
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64(k, K_MESSAGE, r.id), *val, *vlen);
    preq_put(q, k, key_queue(k, h->id, r.priority, r.id), "", 0);
    preq_put(q, k, key_acctmsg(k, s->account_id, r.id), "", 0);
    preq_post(q, rt_actor_mailbox(h->actor), 0, DEV_MESSAGE, 0, *val, *vlen);
    atomic_fetch_add_explicit(&h->queued, 1, memory_order_relaxed);
    metrics_message(0, ST_PENDING);
    *hout = h;
    return 0;
}

/* Adds q (consumed) to the router's next write. When the store is so far
 * behind that the gathered writes hit their bound, refuses (the caller
 * answers 503) and undoes the queued counts. */
static int commit(router *rt, preq *q, dev_handle **hs, size_t nh)
{
    size_t n = preq_nops(q);
    int rc = -EAGAIN;
    if (rt->wr_ops + n > ROUTER_WR_MAX_OPS || (!rt->wr && !(rt->wr = preq_new())))
        preq_free(q);
    else if ((rc = preq_append(rt->wr, q)) == 0)
        rt->wr_ops += n;
    if (rc == 0)
        return 0;
    for (size_t i = 0; i < nh; i++)
        atomic_fetch_sub_explicit(&hs[i]->queued, 1, memory_order_relaxed);
    return -EAGAIN;
}

/* Sends the gathered writes when none is on its way. */
static void flush_writes(router *rt)
{
    if (rt->wr_inflight)
        return;
    if (!rt->wr_env && rt->wr) {
        preq_post(rt->wr, rt_actor_mailbox(rt->self), 0, ROUTER_PERSISTED, ROUTER_PERSISTED, NULL, 0);
        rt->wr_env = preq_finish(rt->wr);
        rt->wr = NULL;
        rt->wr_ops = 0;
    }
    if (!rt->wr_env)
        return;
    if (rt_send(rt->srv->persist, rt->wr_env) == 0) {
        rt->wr_env = NULL;
        rt->wr_inflight = 1;
    } else if (!rt->flush_armed &&
               rt_timer_at(rt->srv->sched, rt->self, tt_now_ms() + 2, ROUTER_FLUSH, 0) == 0) {
        rt->flush_armed = 1; /* persist's mailbox is full: again shortly */
    }
}

static void router_batch_end(rt_actor *self, void *state) { flush_writes(state); }

/* Encodes an outcome as a problem payload (malloc'd). */
static int encode_outcome(const outcome *o, char **buf, size_t *len)
{
    problem p = {(uint64_t)o->status, (char *)o->code, (char *)o->detail, 0};
    return rt_codec_encode(&problem_schema, &p, buf, len);
}

/* A routing failure of an idempotent request is an answer too (API.md 1):
 * stored, then replied, unless it is a 5xx or a 429. */
static void reply_failure(router *rt, const rt_envelope *env, const submit *s, const outcome *o)
{
    char *buf;
    size_t len;
    preq *q;
    if (!s->idem_key || o->status >= 500 || o->status == 429 || encode_outcome(o, &buf, &len) != 0) {
        reply_outcome(env, o);
        return;
    }
    q = preq_new();
    if (!q || idem_put(q, s->account_id, s->idem_route, s->idem_key, &s->idem_hash, (uint64_t)o->status,
                       REPLY_PROBLEM, buf, len) != 0) {
        preq_free(q);
        reply_outcome(env, o);
    } else {
        preq_post(q, env->reply, env->corr, REPLY_PROBLEM, REPLY_STORE_FAILED, buf, len);
        if (commit(rt, q, NULL, 0) != 0)
            proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
    }
    free(buf);
}

static void on_submit(router *rt, rt_envelope *env)
{
    submit s = {0};
    outcome o;
    if (rt_codec_decode_env(&submit_schema, PROTO_V1, env, &s) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed submit");
        return;
    }
    preq *q = preq_new();
    char *val = NULL;
    size_t vlen = 0;
    dev_handle *h = NULL;
    if (!q) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
    } else if ((rt->made_pin = 0, route_one(rt, &s, q, &val, &vlen, &h, &o)) != 0) {
        /* A pin made in q before the failure is not stored: forget it
         * (only one this request made: another may be on its way to disk). */
        if (rt->made_pin)
            pincache_remove(rt->pins, s.account_id, s.to);
        preq_free(q);
        reply_failure(rt, env, &s, &o);
    } else {
        if (s.idem_key && !s.idem_failures_only)
            idem_put(q, s.account_id, s.idem_route, s.idem_key, &s.idem_hash, 202, REPLY_MESSAGE, val, vlen);
        preq_post(q, env->reply, env->corr, REPLY_MESSAGE, REPLY_STORE_FAILED, val, vlen);
        if (commit(rt, q, &h, 1) != 0) {
            if (rt->made_pin)
                pincache_remove(rt->pins, s.account_id, s.to);
            proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        }
    }
    free(val);
    rt_codec_free(&submit_schema, &s);
}

/* A batch: [account, idem_key|nil, idem_hash|nil, idem_route, [[kind, bin]...]] where
 * kind 0 is an encoded submit and kind 1 an item the edge found invalid
 * (bin: its errors as JSON text, echoed back). Valid items are routed in
 * order into one commit; the reply is [[status, bin]...], one per item:
 * 202 with the message, 422 with the echoed errors, else a problem. */
static void on_batch(router *rt, rt_envelope *env)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    msgpack_object *f = NULL;
    if (msgpack_unpack_next(&u, env->data, env->len, &off) == MSGPACK_UNPACK_SUCCESS &&
        u.data.type == MSGPACK_OBJECT_ARRAY && u.data.via.array.size == 5 &&
        u.data.via.array.ptr[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        f = u.data.via.array.ptr + 1;
    uint64_t account_id = f ? u.data.via.array.ptr[0].via.u64 : 0;
    if (!f || f[3].type != MSGPACK_OBJECT_ARRAY || f[2].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
        (f[0].type != MSGPACK_OBJECT_NIL && f[0].type != MSGPACK_OBJECT_STR) ||
        (f[1].type != MSGPACK_OBJECT_NIL && f[1].type != MSGPACK_OBJECT_BIN)) {
        msgpack_unpacked_destroy(&u);
        proto_reply_problem(env, 500, "internal_error", "malformed batch");
        return;
    }
    char *idem_key = f[0].type == MSGPACK_OBJECT_STR ? strndup(f[0].via.str.ptr, f[0].via.str.size) : NULL;
    rt_bin idem_hash = {f[1].type == MSGPACK_OBJECT_BIN ? (void *)f[1].via.bin.ptr : NULL,
                        f[1].type == MSGPACK_OBJECT_BIN ? f[1].via.bin.size : 0};
    msgpack_object_array items = f[3].via.array;
    preq *q = preq_new();
    dev_handle **hs = calloc(items.size ? items.size : 1, sizeof(*hs));
    char **made = calloc(items.size ? items.size : 1, sizeof(*made));
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    size_t nh = 0;
    if (!q || !hs || !made) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    msgpack_pack_array(&pk, items.size);
    for (uint32_t i = 0; i < items.size; i++) {
        msgpack_object it = items.ptr[i];
        msgpack_object *kv = it.type == MSGPACK_OBJECT_ARRAY && it.via.array.size == 2 ? it.via.array.ptr : NULL;
        msgpack_pack_array(&pk, 2);
        if (kv && kv[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER && kv[0].via.u64 == 1 &&
            kv[1].type == MSGPACK_OBJECT_BIN) {
            msgpack_pack_uint64(&pk, 422);
            msgpack_pack_bin(&pk, kv[1].via.bin.size);
            msgpack_pack_bin_body(&pk, kv[1].via.bin.ptr, kv[1].via.bin.size);
            continue;
        }
        submit s = {0};
        outcome o = {500, "internal_error", "malformed batch item"};
        char *val = NULL;
        size_t vlen = 0;
        dev_handle *h = NULL;
        rt->made_pin = 0;
        int ok = kv && kv[1].type == MSGPACK_OBJECT_BIN &&
                 rt_codec_decode(&submit_schema, kv[1].via.bin.ptr, kv[1].via.bin.size, &s) == 0 &&
                 route_one(rt, &s, q, &val, &vlen, &h, &o) == 0;
        if (ok) {
            hs[nh] = h;
            if (rt->made_pin)
                made[nh] = strdup(s.to);
            nh++;
            msgpack_pack_uint64(&pk, 202);
            msgpack_pack_bin(&pk, vlen);
            msgpack_pack_bin_body(&pk, val, vlen);
        } else {
            char *pb = NULL;
            size_t plen = 0;
            encode_outcome(&o, &pb, &plen);
            msgpack_pack_uint64(&pk, (uint64_t)o.status);
            msgpack_pack_bin(&pk, plen);
            msgpack_pack_bin_body(&pk, pb, plen);
            free(pb);
        }
        free(val);
        rt_codec_free(&submit_schema, &s);
    }
    if (idem_key)
        idem_put(q, account_id, IDEM_BATCH, idem_key, &idem_hash, 207, REPLY_BATCH, sb.data, sb.size);
    preq_post(q, env->reply, env->corr, REPLY_BATCH, REPLY_STORE_FAILED, sb.data, sb.size);
    if (commit(rt, q, hs, nh) != 0) {
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        for (size_t i = 0; i < nh; i++) /* pins made for the batch were not stored */
            if (made[i])
                pincache_remove(rt->pins, account_id, made[i]);
    }
    q = NULL;
out:
    preq_free(q);
    for (size_t i = 0; made && i < nh; i++)
        free(made[i]);
    free(made);
    free(hs);
    free(idem_key);
    msgpack_sbuffer_destroy(&sb);
    msgpack_unpacked_destroy(&u);
}

/* ---- ids ------------------------------------------------------------------------ */

/* Device and token ids are never reused, even when the newest one was
 * deleted: the largest id handed out is kept under a meta key, written in
 * the same commit as the record that took it. */
static void put_high_water(preq *q, const char *name, uint64_t id)
{
    uint8_t k[KEY_MAX], v[8];
    key_put_u64(v, id);
    preq_put(q, k, key_meta(k, name), v, 8);
}

/* ---- devices ------------------------------------------------------------------ */

/* Keeps val (taken) as device id's record. */
static int rec_set(router *rt, uint64_t id, char *val, size_t len)
{
    size_t old = rt->caprecs;
    if (TT_VEC_RESERVE(rt->recs, rt->caprecs, id + 1, 64) != 0) {
        free(val);
        return -ENOMEM;
    }
    memset(rt->recs + old, 0, (rt->caprecs - old) * sizeof(*rt->recs));
    free(rt->recs[id].val);
    rt->recs[id] = (struct devrec){val, len};
    return 0;
}

static void rec_drop(router *rt, uint64_t id)
{
    if (id < rt->caprecs) {
        free(rt->recs[id].val);
        rt->recs[id] = (struct devrec){NULL, 0};
    }
}

/* Writes the device record to the store and keeps it as the current one. */
static int device_write(router *rt, preq *q, const dev_rec *d)
{
    char *val;
    size_t vlen;
    if (store_encode(&dev_schema, d, &val, &vlen) != 0)
        return -ENOMEM;
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64(k, K_DEVICE, d->id), val, vlen);
    return rec_set(rt, d->id, val, vlen);
}

/* Replies {device, password} after q commits. */
static int post_device_reply(preq *q, const rt_envelope *env, const dev_rec *d, const char *password)
{
    dev_reply dr = {d->id, d->account_id, d->name, d->rate_per_minute, d->created_at, (char *)password};
    char *rep;
    size_t rlen;
    if (rt_codec_encode(&dev_reply_schema, &dr, &rep, &rlen) != 0)
        return -ENOMEM;
    preq_post(q, env->reply, env->corr, REPLY_DEVICE, REPLY_STORE_FAILED, rep, rlen);
    free(rep);
    return 0;
}

/* A new random password, sealed into d. */
static int new_password(router *rt, dev_rec *d, char password[33])
{
    tt_random_base62(password, 32);
    uint8_t *sealed;
    size_t slen;
    if (tt_seal(rt->srv->key, password, 32, &sealed, &slen) != 0)
        return -ENOMEM;
    d->password_sealed = (rt_bin){sealed, slen};
    return 0;
}

static void on_device_create(router *rt, rt_envelope *env)
{
    device_create c = {0};
    if (rt_codec_decode_env(&device_create_schema, PROTO_V1, env, &c) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed device create");
        return;
    }
    char password[33];
    dev_rec d = {1, rt->last_device_id + 1, c.account_id, c.name, c.rate_per_minute, tt_now_ms(), {NULL, 0}};
    preq *q = preq_new();
    uint8_t k[KEY_MAX];
    if (!q || new_password(rt, &d, password) != 0 || device_write(rt, q, &d) != 0 ||
        post_device_reply(q, env, &d, password) != 0) {
        preq_free(q);
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    preq_put(q, k, key_u64x2(k, K_ACCTDEV, d.account_id, d.id), "", 0);
    put_high_water(q, "last_device_id", d.id);
    if (commit(rt, q, NULL, 0) != 0) {
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        goto out;
    }
    /* Known from now on: the next request may name it before the commit's
     * reply reaches the client, and it is processed after this one. */
    rt->last_device_id = d.id;
    if (!device_spawn(rt->srv, d.id, d.account_id, (uint32_t)d.rate_per_minute, 0, 0, 0) ||
        acct_add(rt, d.account_id, d.id) != 0)
        LOG_ERROR("device %" PRIu64 ": could not start its actor", d.id);
    else
        LOG_INFO("device %" PRIu64 " created for account %" PRIu64, d.id, d.account_id);
    if (rt->srv->dynsec)
        dynsec_put_device(rt->srv->dynsec, d.id, password);
out:
    sodium_memzero(password, sizeof(password));
    free(d.password_sealed.ptr);
    rt_codec_free(&device_create_schema, &c);
}

/* Loads the device record of (account, id); a 404 reply otherwise. */
static int load_own(router *rt, const rt_envelope *env, uint64_t account_id, uint64_t id, dev_handle **h, dev_rec *d)
{
    *h = own_device(rt, account_id, id);
    if (!*h || id >= rt->caprecs || !rt->recs[id].val ||
        rt_codec_decode(&dev_schema, rt->recs[id].val, rt->recs[id].len, d) != 0) {
        proto_reply_problem(env, 404, "not_found", "device %" PRIu64 " not found", id);
        return -1;
    }
    return 0;
}

static void on_device_patch(router *rt, rt_envelope *env, int rotate)
{
    device_patch p = {0};
    dev_rec d = {0};
    dev_handle *h;
    char password[33] = {0};
    if (rt_codec_decode_env(&device_patch_schema, PROTO_V1, env, &p) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed device patch");
        return;
    }
    if (load_own(rt, env, p.account_id, p.device_id, &h, &d) != 0)
        goto out;
    if (p.name) {
        free(d.name);
        d.name = strdup(p.name);
    }
    if (p.rate_per_minute)
        d.rate_per_minute = p.rate_per_minute;
    preq *q = preq_new();
    if (rotate) {
        free(d.password_sealed.ptr);
        d.password_sealed = (rt_bin){NULL, 0};
    }
    if (!q || !d.name || (rotate && new_password(rt, &d, password) != 0) || device_write(rt, q, &d) != 0 ||
        post_device_reply(q, env, &d, rotate ? password : NULL) != 0) {
        preq_free(q);
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    if (rotate)
        preq_post(q, rt_actor_mailbox(h->actor), 0, DEV_KICK, 0, NULL, 0);
    if (commit(rt, q, NULL, 0) != 0) {
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        goto out;
    }
    atomic_store_explicit(&h->rate_per_minute, (uint32_t)d.rate_per_minute, memory_order_relaxed);
    if (rotate) {
        if (rt->srv->dynsec)
            dynsec_put_device(rt->srv->dynsec, d.id, password);
        LOG_INFO("device %" PRIu64 ": credentials rotated", d.id);
    }
out:
    sodium_memzero(password, sizeof(password));
    rt_codec_free(&dev_schema, &d);
    rt_codec_free(&device_patch_schema, &p);
}

typedef struct pinscan {
    preq *q;
    uint64_t account_id, device_id;
    size_t n;
} pinscan;

static int delete_pin_key(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    pinscan *c = arg;
    char number[TT_PHONE_MAX];
    size_t nl = klen - 9 < sizeof(number) - 1 ? klen - 9 : sizeof(number) - 1;
    memcpy(number, key + 9, nl);
    number[nl] = 0;
    pin_delete(c->q, c->account_id, c->device_id, number);
    c->n++;
    return 0;
}

static void delete_cached_pin(const pin_entry *e, void *arg)
{
    pinscan *c = arg;
    pin_delete(c->q, c->account_id, c->device_id, e->number);
}

/* Deletes every pin of a device into q: those on disk, and those in the
 * cache, which include pins whose creation is still on its way to disk (the
 * router's writes land in order, so the delete comes after it). */
static void delete_device_pins(router *rt, preq *q, dev_handle *h)
{
    uint8_t prefix[KEY_MAX];
    key_u64(prefix, K_DEVPIN, h->id);
    pinscan c = {q, h->account_id, h->id, 0};
    store_scan(rt->srv->store, prefix, 9, NULL, 0, SIZE_MAX, delete_pin_key, &c);
    pincache_remove_device(rt->pins, h->id, delete_cached_pin, &c);
    atomic_store_explicit(&h->pins, 0, memory_order_relaxed);
}

static void on_device_delete(router *rt, rt_envelope *env)
{
    device_patch p = {0};
    dev_rec d = {0};
    dev_handle *h;
    if (rt_codec_decode_env(&device_patch_schema, PROTO_V1, env, &p) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed device delete");
        return;
    }
    if (load_own(rt, env, p.account_id, p.device_id, &h, &d) != 0)
        goto out;
    preq *q = preq_new();
    dev_reply_to to = {(uint64_t)(uintptr_t)env->reply, env->corr};
    char *buf;
    size_t len;
    if (!q || rt_codec_encode(&dev_reply_to_schema, &to, &buf, &len) != 0) {
        preq_free(q);
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    uint8_t k[KEY_MAX];
    preq_del(q, k, key_u64(k, K_DEVICE, d.id));
    preq_del(q, k, key_u64x2(k, K_ACCTDEV, d.account_id, d.id));
    delete_device_pins(rt, q, h);
    /* The device actor fails its unfinished messages and answers the client
     * once that is stored too. */
    preq_post(q, rt_actor_mailbox(h->actor), env->corr, DEV_DELETE, 0, buf, len);
    /* If the commit fails, the client still hears (the device answers only
     * after a commit that happened). */
    preq_post(q, env->reply, env->corr, 0, REPLY_STORE_FAILED, NULL, 0);
    free(buf);
    if (commit(rt, q, NULL, 0) != 0) {
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        goto out;
    }
    atomic_store_explicit(&h->deleted, 1, memory_order_relaxed);
    acct_remove(rt, d.account_id, d.id);
    rec_drop(rt, d.id);
    if (rt->srv->dynsec)
        dynsec_delete_device(rt->srv->dynsec, d.id);
    LOG_INFO("device %" PRIu64 " deleted", d.id);
out:
    rt_codec_free(&dev_schema, &d);
    rt_codec_free(&device_patch_schema, &p);
}

/* ---- tokens ---------------------------------------------------------------------- */

static void on_token_create(router *rt, rt_envelope *env)
{
    token_op t = {0};
    if (rt_codec_decode_env(&token_op_schema, PROTO_V1, env, &t) != 0 || !t.name) {
        proto_reply_problem(env, 500, "internal_error", "malformed token request");
        rt_codec_free(&token_op_schema, &t);
        return;
    }
    char token[TT_TOKEN_LEN + 1], prefix[8];
    uint8_t hash[TT_HASH_BYTES], k[KEY_MAX], idv[8];
    tt_token_new(token);
    tt_hash(NULL, token, TT_TOKEN_LEN, hash);
    memcpy(prefix, token, 7);
    prefix[7] = 0;
    tok_rec r = {1, rt->last_token_id + 1, t.account_id, t.name, prefix, tt_now_ms(), 0, {hash, sizeof(hash)}};
    token_reply rep = {r.id, r.name, prefix, r.created_at, token};
    char *val = NULL, *rb = NULL;
    size_t vlen, rlen;
    preq *q = preq_new();
    if (!q || store_encode(&tok_schema, &r, &val, &vlen) != 0 ||
        rt_codec_encode(&token_reply_schema, &rep, &rb, &rlen) != 0) {
        preq_free(q);
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    preq_put(q, k, key_u64(k, K_TOKEN, r.id), val, vlen);
    put_high_water(q, "last_token_id", r.id);
    key_put_u64(idv, r.id);
    preq_put(q, k, key_tokhash(k, hash), idv, 8);
    preq_post(q, env->reply, env->corr, REPLY_TOKEN, REPLY_STORE_FAILED, rb, rlen);
    if (commit(rt, q, NULL, 0) != 0)
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
    else
        rt->last_token_id = r.id;
out:
    sodium_memzero(token, sizeof(token));
    free(val);
    if (rb) {
        sodium_memzero(rb, rlen);
        free(rb);
    }
    rt_codec_free(&token_op_schema, &t);
}

static void on_token_delete(router *rt, rt_envelope *env)
{
    token_op t = {0};
    tok_rec r = {0};
    uint8_t k[KEY_MAX];
    if (rt_codec_decode_env(&token_op_schema, PROTO_V1, env, &t) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed token request");
        return;
    }
    if (store_get(rt->srv->store, k, key_u64(k, K_TOKEN, t.token_id), &tok_schema, &r) != 0 ||
        r.account_id != t.account_id || r.hash.len != TT_HASH_BYTES) {
        proto_reply_problem(env, 404, "not_found", "token %" PRIu64 " not found", t.token_id);
        goto out;
    }
    preq *q = preq_new();
    if (!q) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    preq_del(q, k, key_u64(k, K_TOKEN, r.id));
    preq_del(q, k, key_tokhash(k, r.hash.ptr));
    tokens_revoked(); /* before the write: no worker caches it from now on ... */
    preq_post(q, env->reply, env->corr, REPLY_OK, REPLY_STORE_FAILED, NULL, 0);
    if (commit(rt, q, NULL, 0) != 0)
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
    else {
        rt->revoked[rt->revoked_i++ % 64] = r.id;
        LOG_INFO("token %" PRIu64 " (%s...) of account %" PRIu64 " revoked", r.id, r.prefix, r.account_id);
    }
out:
    rt_codec_free(&tok_schema, &r);
    rt_codec_free(&token_op_schema, &t);
}

typedef struct flush_ctx {
    router *rt;
    preq *q;
    size_t n;
} flush_ctx;

static int flush_token(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    flush_ctx *c = arg;
    tok_rec r = {0};
    if (klen != 9 || rt_codec_decode(&tok_schema, val, vlen, &r) != 0)
        return 0;
    int64_t used = tokens_last_used(r.id);
    for (size_t i = 0; i < 64; i++)
        if (c->rt->revoked[i] == r.id)
            used = 0; /* its delete may not be on disk yet */
    if (used > r.last_used_at) {
        r.last_used_at = used;
        char *v;
        size_t vl;
        if (store_encode(&tok_schema, &r, &v, &vl) == 0) {
            preq_put(c->q, key, klen, v, vl);
            free(v);
            c->n++;
        }
    }
    rt_codec_free(&tok_schema, &r);
    return 0;
}

/* Writes the tokens' last-use times gathered in memory (a request does not
 * write to disk just to say a token was used). */
static void flush_token_use(router *rt)
{
    flush_ctx c = {rt, preq_new(), 0};
    if (!c.q)
        return;
    uint8_t prefix[1] = {K_TOKEN};
    store_scan(rt->srv->store, prefix, 1, NULL, 0, SIZE_MAX, flush_token, &c);
    if (c.n == 0)
        preq_free(c.q);
    else
        commit(rt, c.q, NULL, 0);
}

/* ---- pin operations ------------------------------------------------------------ */

static void reply_pin(preq *q, const rt_envelope *env, const pin_entry *e)
{
    pin_rec p;
    pin_to_rec(e, &p);
    char *buf;
    size_t len;
    if (rt_codec_encode(&pin_schema, &p, &buf, &len) == 0) {
        preq_post(q, env->reply, env->corr, REPLY_PIN, REPLY_STORE_FAILED, buf, len);
        free(buf);
    }
}

static void on_pin_op(router *rt, rt_envelope *env)
{
    pin_op p = {0};
    if (rt_codec_decode_env(&pin_op_schema, PROTO_V1, env, &p) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed pin operation");
        return;
    }
    int64_t now = tt_now_ms();
    dev_handle *h = own_device(rt, p.account_id, p.device_id);
    preq *q = NULL;
    if (!h) {
        if (p.op != PIN_INBOUND)
            proto_reply_problem(env, 404, "not_found", "device %" PRIu64 " not found", p.device_id);
        goto out;
    }
    q = preq_new();
    if (!q)
        goto oom;
    if (p.op == PIN_INBOUND) {
        /* An inbound SMS from an unpinned number pins it to that device. */
        if (!p.number || pin_lookup(rt, p.account_id, p.number))
            goto out;
        if (!pin_create(rt, q, p.account_id, p.number, h, now, 0))
            goto oom;
        if (commit(rt, q, NULL, 0) != 0)
            pincache_remove(rt->pins, p.account_id, p.number);
        q = NULL;
        goto out;
    }
    if (p.op == PIN_RESET_ALL) {
        delete_device_pins(rt, q, h);
        pin_notify(q, h, json_pack("{sb}", "removed_all", 1));
        preq_post(q, env->reply, env->corr, REPLY_OK, REPLY_STORE_FAILED, NULL, 0);
    } else {
        pin_entry *e = p.number ? pin_lookup(rt, p.account_id, p.number) : NULL;
        if (!e || e->device_id != h->id) {
            proto_reply_problem(env, 404, "not_found", "no pin for %s on device %" PRIu64, p.number ? p.number : "?",
                                h->id);
            goto out;
        }
        if (p.op == PIN_RESET_ONE) {
            pin_delete(q, p.account_id, h->id, e->number);
            pin_notify(q, h, json_pack("{sssb}", "number", e->number, "removed", 1));
            preq_post(q, env->reply, env->corr, REPLY_OK, REPLY_STORE_FAILED, NULL, 0);
            pincache_remove(rt->pins, p.account_id, p.number);
            atomic_fetch_sub_explicit(&h->pins, 1, memory_order_relaxed);
        } else {
            if (p.op == PIN_EDIT)
                snprintf(e->safe_word, sizeof(e->safe_word), "%s", p.safe_word ? p.safe_word : "");
            else
                tt_safeword_new(e->safe_word);
            if (pin_write(q, e, 0) != 0)
                goto oom;
            pin_notify(q, h, pin_payload(e));
            reply_pin(q, env, e);
        }
    }
    if (commit(rt, q, NULL, 0) != 0)
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
    q = NULL;
    goto out;
oom:
    proto_reply_problem(env, 503, "overloaded", "out of memory");
out:
    preq_free(q);
    rt_codec_free(&pin_op_schema, &p);
}

static void router_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    router *rt = state;
    switch (env->type) {
    case ROUTER_SUBMIT:
        on_submit(rt, env);
        break;
    case ROUTER_DEVICE_CREATE:
        on_device_create(rt, env);
        break;
    case ROUTER_BATCH:
        on_batch(rt, env);
        break;
    case ROUTER_PIN_OP:
    case ROUTER_PIN_INBOUND:
        on_pin_op(rt, env);
        break;
    case ROUTER_DEVICE_PATCH:
        on_device_patch(rt, env, 0);
        break;
    case ROUTER_DEVICE_ROTATE:
        on_device_patch(rt, env, 1);
        break;
    case ROUTER_DEVICE_DELETE:
        on_device_delete(rt, env);
        break;
    case ROUTER_TOKEN_CREATE:
        on_token_create(rt, env);
        break;
    case ROUTER_TOKEN_DELETE:
        on_token_delete(rt, env);
        break;
    case ROUTER_PERSISTED:
        rt->wr_inflight = 0; /* a failure reached each request through its own post */
        break;
    case ROUTER_FLUSH:
        rt->flush_armed = 0;
        break;
    case ROUTER_TICK:
        flush_token_use(rt);
        rt_timer_at(rt->srv->sched, self, tt_now_ms() + TOKEN_FLUSH_MS, ROUTER_TICK, 0);
        break;
    default:
        LOG_WARN("router: unknown message type %u", (unsigned)env->type);
        proto_reply_problem(env, 500, "internal_error", "unknown request");
    }
    rt_envelope_free(env);
}

static void router_stopped(rt_actor *self, void *state)
{
    router *rt = state;
    for (size_t i = 0; i < rt->nacct; i++)
        free(rt->accts[i].ids);
    free(rt->accts);
    pincache_free(rt->pins);
    preq_free(rt->wr);
    if (rt->wr_env)
        rt_envelope_free(rt->wr_env);
    for (size_t i = 0; i < rt->caprecs; i++)
        free(rt->recs[i].val);
    free(rt->recs);
    free(rt);
}

static const rt_actor_ops router_ops = {router_dispatch, router_batch_end, router_stopped};

/* ---- start-up: load devices and count their pending messages ------------- */

typedef struct load_ctx {
    router *rt;
    int64_t *counts;     /* pending per device id */
    int64_t *pins;       /* pins per device id */
    size_t ncounts;
    int failed;
} load_ctx;

static int count_queue(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    load_ctx *c = arg;
    if (klen != 18)
        return 0;
    uint64_t dev = key_get_u64(key + 1);
    if (dev < c->ncounts)
        c->counts[dev]++;
    return 0;
}

static int count_pins(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    load_ctx *c = arg;
    uint64_t dev = klen > 9 ? key_get_u64(key + 1) : 0;
    if (dev && dev < c->ncounts)
        c->pins[dev]++;
    return 0;
}

static int load_device(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    load_ctx *c = arg;
    router *rt = c->rt;
    dev_rec d = {0};
    if (klen != 9 || rt_codec_decode(&dev_schema, val, vlen, &d) != 0) {
        LOG_ERROR("store: skipping a corrupt device record");
        return 0;
    }
    char *copy = malloc(vlen ? vlen : 1);
    if (!copy || (memcpy(copy, val, vlen), rec_set(rt, d.id, copy, vlen)) != 0) {
        c->failed = 1;
        rt_codec_free(&dev_schema, &d);
        return 1;
    }
    devlive_rec lr = {0};
    uint8_t k[KEY_MAX];
    int64_t seen = 0;
    if (store_get(rt->srv->store, k, key_u64(k, K_DEVLIVE, d.id), &devlive_schema, &lr) == 0) {
        seen = lr.last_seen_at;
        rt_codec_free(&devlive_schema, &lr);
    }
    int64_t pending = d.id < c->ncounts ? c->counts[d.id] : 0;
    int64_t pins = d.id < c->ncounts ? c->pins[d.id] : 0;
    if (!device_spawn(rt->srv, d.id, d.account_id, (uint32_t)d.rate_per_minute, pending, seen, pins) ||
        acct_add(rt, d.account_id, d.id) != 0) {
        c->failed = 1;
        rt_codec_free(&dev_schema, &d);
        return 1;
    }
    if (d.id > rt->last_device_id)
        rt->last_device_id = d.id;
    rt_codec_free(&dev_schema, &d);
    return 0;
}

rt_actor *router_new(tt_server *srv)
{
    router *rt = calloc(1, sizeof(*rt));
    if (!rt)
        return NULL;
    rt->srv = srv;
    rt->pins = pincache_new((size_t)srv->o.pin_cache_entries);
    uint64_t last = store_high_water(srv->store, K_DEVICE, "last_device_id");
    load_ctx c = {rt, calloc(last + 1, sizeof(int64_t)), calloc(last + 1, sizeof(int64_t)), last + 1, 0};
    if (!c.counts || !c.pins || !rt->pins) {
        free(c.counts);
        free(c.pins);
        router_stopped(NULL, rt);
        return NULL;
    }
    uint8_t prefix[1] = {K_QUEUE};
    store_scan(srv->store, prefix, 1, NULL, 0, SIZE_MAX, count_queue, &c);
    prefix[0] = K_DEVPIN;
    store_scan(srv->store, prefix, 1, NULL, 0, SIZE_MAX, count_pins, &c);
    prefix[0] = K_DEVICE;
    store_scan(srv->store, prefix, 1, NULL, 0, SIZE_MAX, load_device, &c);
    free(c.counts);
    free(c.pins);
    if (c.failed) {
        LOG_ERROR("router: could not load the devices");
        router_stopped(NULL, rt);
        return NULL;
    }
    rt->last_device_id = last > rt->last_device_id ? last : rt->last_device_id;
    rt->last_token_id = store_high_water(srv->store, K_TOKEN, "last_token_id");
    rt_actor *a = rt_actor_new(srv->sched, "router", 1024, &router_ops, rt);
    if (!a) {
        router_stopped(NULL, rt);
        return NULL;
    }
    rt->self = a;
    rt_timer_at(srv->sched, a, tt_now_ms() + TOKEN_FLUSH_MS, ROUTER_TICK, 0);
    return a;
}
