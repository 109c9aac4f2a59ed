/* router.c: the router actor (see router.h). */
#include "actors/router.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "actors/device.h"
#include "actors/persist.h"
#include "actors/proto.h"
#include "server.h"
#include "util/clock.h"
#include "util/crypto.h"
#include "util/log.h"
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
} router;

static acct_devs *acct_get(router *rt, uint64_t account_id, int create)
{
    for (size_t i = 0; i < rt->nacct; i++)
        if (rt->accts[i].account_id == account_id)
            return &rt->accts[i];
    if (!create)
        return NULL;
    if (rt->nacct == rt->capacct) {
        size_t cap = rt->capacct ? rt->capacct * 2 : 8;
        acct_devs *v = realloc(rt->accts, cap * sizeof(*v));
        if (!v)
            return NULL;
        rt->accts = v;
        rt->capacct = cap;
    }
    acct_devs *a = &rt->accts[rt->nacct++];
    *a = (acct_devs){account_id, NULL, 0, 0};
    return a;
}

static int acct_add(router *rt, uint64_t account_id, uint64_t device_id)
{
    acct_devs *a = acct_get(rt, account_id, 1);
    if (!a)
        return -ENOMEM;
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 8;
        uint64_t *v = realloc(a->ids, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        a->ids = v;
        a->cap = cap;
    }
    a->ids[a->n++] = device_id; /* ids only grow, so the list stays sorted */
    return 0;
}

/* A device of this account, or NULL. */
static dev_handle *own_device(router *rt, uint64_t account_id, uint64_t device_id)
{
    dev_handle *h = devreg_get(&rt->srv->reg, device_id);
    if (!h || h->account_id != account_id || atomic_load_explicit(&h->deleted, memory_order_relaxed))
        return NULL;
    return h;
}

/* Auto routing: the online device with the fewest queued messages (ties: the
 * lowest id); with force and none online, the most recently seen. */
static dev_handle *pick_device(router *rt, const rt_envelope *env, uint64_t account_id, int force)
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
        int64_t q = atomic_load_explicit(&h->queued, memory_order_relaxed);
        if (!best || q < best_q) {
            best = h;
            best_q = q;
        }
    }
    if (best)
        return best;
    if (!live) {
        proto_reply_problem(env, 409, "no_devices", "the account has no devices; create one with POST /api/v1/devices");
        return NULL;
    }
    if (!force) {
        proto_reply_problem(env, 409, "no_device_online", "no device of the account is online; pass force=true to queue");
        return NULL;
    }
    return recent;
}

static void on_submit(router *rt, rt_envelope *env)
{
    submit s = {0};
    if (rt_codec_decode_env(&submit_schema, PROTO_V1, env, &s) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed submit");
        return;
    }
    dev_handle *h;
    uint64_t routing;
    if (s.device_id) {
        h = own_device(rt, s.account_id, s.device_id);
        if (!h) {
            proto_reply_problem(env, 404, "not_found", "device %" PRIu64 " not found", s.device_id);
            goto out;
        }
        if (!s.force && !atomic_load_explicit(&h->online, memory_order_relaxed)) {
            proto_reply_problem(env, 409, "device_offline", "device %" PRIu64 " is offline; pass force=true to queue",
                                s.device_id);
            goto out;
        }
        routing = RT_DIRECT;
    } else {
        h = pick_device(rt, env, s.account_id, s.force);
        if (!h)
            goto out;
        routing = RT_AUTO;
    }
    int64_t now = tt_now_ms();
    msg_rec r = {0};
    r.v = 1;
    r.id = atomic_fetch_add_explicit(&rt->srv->next_message_id, 1, memory_order_relaxed);
    r.account_id = s.account_id;
    r.device_id = h->id;
    r.direction = DIR_OUTBOUND;
    r.status = ST_PENDING;
    r.to = s.to;
    r.text = s.text;
    r.routing = routing;
    r.forced = s.force;
    r.priority = s.priority;
    r.encoding = s.encoding;
    r.segments = s.segments;
    r.created_at = now;
    r.expires_at = now + s.ttl_s * 1000;
    r.safe_word_verified = -1;

    char *val = NULL;
    size_t vlen = 0;
    preq *q = preq_new();
    if (!q || store_encode(&msg_schema, &r, &val, &vlen) != 0) {
        preq_free(q);
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64(k, K_MESSAGE, r.id), val, vlen);
    preq_put(q, k, key_queue(k, h->id, r.priority, r.id), "", 0);
    preq_put(q, k, key_acctmsg(k, s.account_id, r.id), "", 0);
    preq_post(q, env->reply, env->corr, REPLY_MESSAGE, REPLY_STORE_FAILED, val, vlen);
    preq_post(q, rt_actor_mailbox(h->actor), 0, DEV_MESSAGE, 0, val, vlen);
    free(val);
    rt_envelope *w = preq_finish(q);
    atomic_fetch_add_explicit(&h->queued, 1, memory_order_relaxed);
    if (!w || rt_send(rt->srv->persist, w) != 0) {
        atomic_fetch_sub_explicit(&h->queued, 1, memory_order_relaxed);
        if (w)
            rt_envelope_free(w);
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
    }
out:
    rt_codec_free(&submit_schema, &s);
}

static void on_device_create(router *rt, rt_envelope *env)
{
    device_create c = {0};
    if (rt_codec_decode_env(&device_create_schema, PROTO_V1, env, &c) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed device create");
        return;
    }
    int64_t now = tt_now_ms();
    char password[33];
    tt_random_base62(password, 32);
    dev_rec d = {0};
    d.v = 1;
    d.id = rt->last_device_id + 1;
    d.account_id = c.account_id;
    d.name = c.name;
    d.rate_per_minute = c.rate_per_minute;
    d.created_at = now;
    uint8_t *sealed = NULL;
    size_t slen = 0;
    char *val = NULL, *rep = NULL;
    size_t vlen = 0, rlen = 0;
    preq *q = NULL;
    if (tt_seal(rt->srv->key, password, 32, &sealed, &slen) != 0)
        goto oom;
    d.password_sealed = (rt_bin){sealed, slen};
    dev_reply dr = {d.id, d.account_id, d.name, d.rate_per_minute, now, password};
    q = preq_new();
    if (!q || store_encode(&dev_schema, &d, &val, &vlen) != 0 || rt_codec_encode(&dev_reply_schema, &dr, &rep, &rlen) != 0)
        goto oom;
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64(k, K_DEVICE, d.id), val, vlen);
    preq_put(q, k, key_u64x2(k, K_ACCTDEV, d.account_id, d.id), "", 0);
    preq_post(q, env->reply, env->corr, REPLY_DEVICE, REPLY_STORE_FAILED, rep, rlen);
    rt_envelope *w = preq_finish(q);
    q = NULL;
    if (!w || rt_send(rt->srv->persist, w) != 0) {
        if (w)
            rt_envelope_free(w);
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        goto out;
    }
    /* Known from now on: the next request may name it before the commit's
     * reply reaches the client, and it is processed after this one. */
    rt->last_device_id = d.id;
    if (!device_spawn(rt->srv, d.id, d.account_id, (uint32_t)d.rate_per_minute, 0, 0) ||
        acct_add(rt, d.account_id, d.id) != 0)
        LOG_ERROR("device %" PRIu64 ": could not start its actor", d.id);
    else
        LOG_INFO("device %" PRIu64 " created for account %" PRIu64, d.id, d.account_id);
    goto out;
oom:
    preq_free(q);
    proto_reply_problem(env, 503, "overloaded", "out of memory");
out:
    sodium_memzero(password, sizeof(password));
    free(sealed);
    free(val);
    free(rep);
    rt_codec_free(&device_create_schema, &c);
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
    free(rt);
}

static const rt_actor_ops router_ops = {router_dispatch, NULL, router_stopped};

/* ---- start-up: load devices and count their pending messages ------------- */

typedef struct load_ctx {
    router *rt;
    int64_t *counts;     /* pending per device id */
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

static int load_device(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    load_ctx *c = arg;
    router *rt = c->rt;
    dev_rec d = {0};
    if (klen != 9 || rt_codec_decode(&dev_schema, val, vlen, &d) != 0) {
        LOG_ERROR("store: skipping a corrupt device record");
        return 0;
    }
    devlive_rec lr = {0};
    uint8_t k[KEY_MAX];
    int64_t seen = 0;
    if (store_get(rt->srv->store, k, key_u64(k, K_DEVLIVE, d.id), &devlive_schema, &lr) == 0) {
        seen = lr.last_seen_at;
        rt_codec_free(&devlive_schema, &lr);
    }
    int64_t pending = d.id < c->ncounts ? c->counts[d.id] : 0;
    if (!device_spawn(rt->srv, d.id, d.account_id, (uint32_t)d.rate_per_minute, pending, seen) ||
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
    uint64_t last = store_last_id(srv->store, K_DEVICE);
    load_ctx c = {rt, calloc(last + 1, sizeof(int64_t)), last + 1, 0};
    if (!c.counts) {
        free(rt);
        return NULL;
    }
    uint8_t prefix[1] = {K_QUEUE};
    store_scan(srv->store, prefix, 1, NULL, 0, SIZE_MAX, count_queue, &c);
    prefix[0] = K_DEVICE;
    store_scan(srv->store, prefix, 1, NULL, 0, SIZE_MAX, load_device, &c);
    free(c.counts);
    if (c.failed) {
        LOG_ERROR("router: could not load the devices");
        router_stopped(NULL, rt);
        return NULL;
    }
    rt->last_device_id = last > rt->last_device_id ? last : rt->last_device_id;
    rt_actor *a = rt_actor_new(srv->sched, "router", 1024, &router_ops, rt);
    if (!a)
        router_stopped(NULL, rt);
    return a;
}
