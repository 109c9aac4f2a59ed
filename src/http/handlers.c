/* handlers.c: the REST routes of API.md, over the HTTP edge framework.
 *
 * A handler validates its input, then either reads the store directly (GETs)
 * or sends an envelope to an actor and waits for the answer on the worker
 * thread's own reply mailbox. A full mailbox is a 503, never a wait. */
#include "http/handlers.h"

#include <errno.h>
#include <sodium.h>
#include <msgpack.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/device.h"
#include "actors/proto.h"
#include "server.h"
#include "util/clock.h"
#include "util/crypto.h"
#include "http/metrics.h"
#include "util/log.h"
#include "util/phone.h"
#include "util/safeword.h"
#include "util/sms.h"
#include "util/vec.h"

#define BODY_MAX (64 * 1024)
#define TEXT_MAX_CP 1600

/* ---- talking to actors ------------------------------------------------------ */

/* Each HTTP worker thread has its own reply mailbox (a waiter). An actor may
 * still be inside its push of a reply when the worker has the reply and
 * exits, so waiters are freed only after the scheduler has stopped
 * (handlers_free_waiters), never at thread exit. */
static __thread rt_waiter *thread_w;
static __thread uint64_t corr_seq;
static pthread_mutex_t waiters_mu = PTHREAD_MUTEX_INITIALIZER;
static rt_waiter **waiters;
static size_t nwaiters, capwaiters;

static rt_waiter *thread_waiter(void)
{
    if (thread_w)
        return thread_w;
    rt_waiter *w = rt_waiter_new();
    if (!w)
        return NULL;
    pthread_mutex_lock(&waiters_mu);
    if (TT_VEC_RESERVE(waiters, capwaiters, nwaiters + 1, 64) != 0) {
        pthread_mutex_unlock(&waiters_mu);
        rt_waiter_free(w);
        return NULL;
    }
    waiters[nwaiters++] = w;
    pthread_mutex_unlock(&waiters_mu);
    return thread_w = w;
}

void handlers_free_waiters(void)
{
    pthread_mutex_lock(&waiters_mu);
    for (size_t i = 0; i < nwaiters; i++)
        rt_waiter_free(waiters[i]);
    free(waiters);
    waiters = NULL;
    nwaiters = capwaiters = 0;
    pthread_mutex_unlock(&waiters_mu);
}

/* Sends env to actor and waits for the reply. On NULL the response (503) was
 * already sent. */
static rt_envelope *call(http_req *r, rt_actor *actor, rt_envelope *env)
{
    rt_waiter *w = thread_waiter();
    if (!w || !env) {
        if (env)
            rt_envelope_free(env);
        http_reply_problem_ex(r, 503, "overloaded", "out of memory", NULL, "Retry-After: 1\r\n");
        return NULL;
    }
    env->reply = rt_waiter_mailbox(w);
    env->corr = ++corr_seq;
    uint64_t corr = env->corr;
    if (rt_send(actor, env) != 0) {
        rt_envelope_free(env);
        http_reply_problem_ex(r, 503, "overloaded", "the server is busy; retry shortly", NULL, "Retry-After: 1\r\n");
        return NULL;
    }
    /* The actors always answer (API.md 1). The limit only guards a worker
     * against a bug: it is far above any commit or queue time. */
    rt_envelope *rep = rt_waiter_wait(w, corr, 120000);
    if (!rep) {
        LOG_ERROR("no answer from the %s actor within 120 s", rt_actor_kind(actor));
        http_reply_problem(r, 500, "internal_error", "the request got no answer in time; its outcome is unknown");
    }
    return rep;
}

/* Sends a REPLY_PROBLEM / REPLY_STORE_FAILED reply as the response. Returns 1
 * when env was such a reply (and frees it). */
static int reply_if_problem(http_req *r, rt_envelope *env)
{
    if (env->type == REPLY_STORE_FAILED) {
        rt_envelope_free(env);
        http_reply_problem_ex(r, 503, "store_unavailable", "the write could not be stored; nothing was kept",
                              NULL, "Retry-After: 1\r\n");
        return 1;
    }
    if (env->type != REPLY_PROBLEM)
        return 0;
    problem p = {0};
    if (rt_codec_decode_env(&problem_schema, PROTO_V1, env, &p) != 0) {
        http_reply_problem(r, 500, "internal_error", "malformed reply");
    } else if (p.status == 503) {
        http_reply_problem_ex(r, 503, p.code, p.detail, NULL, "Retry-After: 1\r\n");
    } else if (p.retry_after) {
        char hdr[48];
        snprintf(hdr, sizeof(hdr), "Retry-After: %" PRIu64 "\r\n", p.retry_after);
        http_reply_problem_ex(r, (int)p.status, p.code, p.detail, NULL, hdr);
    } else {
        http_reply_problem_ex(r, (int)p.status, p.code, p.detail, NULL, NULL);
    }
    rt_codec_free(&problem_schema, &p);
    rt_envelope_free(env);
    return 1;
}

/* ---- JSON views ------------------------------------------------------------------ */

static json_t *jtime(int64_t ms)
{
    char buf[25];
    return ms ? json_string(tt_time_format(ms, buf)) : json_null();
}

static json_t *jstr_or_null(const char *s) { return s ? json_string(s) : json_null(); }

json_t *view_message(const msg_rec *m)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_integer((json_int_t)m->id));
    json_object_set_new(o, "direction", json_string(m->direction == DIR_INBOUND ? "inbound" : "outbound"));
    json_object_set_new(o, "status", json_string(msg_status_name(m->status)));
    json_object_set_new(o, "to", jstr_or_null(m->to));
    json_object_set_new(o, "from", jstr_or_null(m->from));
    json_object_set_new(o, "message", json_string(m->text));
    json_object_set_new(o, "device_id", json_integer((json_int_t)m->device_id));
    if (m->direction == DIR_OUTBOUND) {
        json_object_set_new(o, "routing", jstr_or_null(msg_routing_name(m->routing)));
        json_object_set_new(o, "forced", json_boolean(m->forced));
        json_object_set_new(o, "priority", json_string(m->priority == PRIO_HIGH ? "high" : "normal"));
    }
    json_object_set_new(o, "encoding", json_string(tt_encoding_name((tt_encoding)m->encoding)));
    json_object_set_new(o, "segments", json_integer((json_int_t)m->segments));
    if (m->direction == DIR_OUTBOUND) {
        json_object_set_new(o, "attempts", json_integer((json_int_t)m->attempts));
        json_object_set_new(o, "created_at", jtime(m->created_at));
        json_object_set_new(o, "dispatched_at", jtime(m->dispatched_at));
        json_object_set_new(o, "sent_at", jtime(m->sent_at));
        json_object_set_new(o, "delivered_at", jtime(m->delivered_at));
        json_object_set_new(o, "failed_at", jtime(m->failed_at));
        json_object_set_new(o, "expires_at", jtime(m->expires_at));
        json_object_set_new(o, "error", jstr_or_null(m->error));
    } else {
        json_object_set_new(o, "created_at", jtime(m->created_at));
        json_object_set_new(o, "received_at", jtime(m->received_at));
        json_object_set_new(o, "safe_word_verified", json_boolean(m->safe_word_verified == 1));
    }
    return o;
}

static json_t *view_device(tt_server *srv, uint64_t id, const char *name, uint64_t rate, int64_t created_at)
{
    dev_handle *h = devreg_get(&srv->reg, id);
    int online = h ? atomic_load_explicit(&h->online, memory_order_relaxed) : 0;
    int64_t queued = h ? atomic_load_explicit(&h->queued, memory_order_relaxed) : 0;
    int64_t inflight = h ? atomic_load_explicit(&h->inflight, memory_order_relaxed) : 0;
    int64_t seen = h ? atomic_load_explicit(&h->last_seen_at, memory_order_relaxed) : 0;
    json_t *info = NULL;
    devlive_rec lr = {0};
    uint8_t k[KEY_MAX];
    if (store_get(srv->store, k, key_u64(k, K_DEVLIVE, id), &devlive_schema, &lr) == 0) {
        if (!seen)
            seen = lr.last_seen_at;
        if (lr.info)
            info = json_loads(lr.info, 0, NULL);
        rt_codec_free(&devlive_schema, &lr);
    }
    if (!info)
        info = json_object();
    /* pending: accepted and not yet handed over; in_flight: handed over and
     * not yet reported. `queued` counts both. */
    int64_t pending = queued - inflight;
    json_t *o = json_object();
    json_object_set_new(o, "id", json_integer((json_int_t)id));
    json_object_set_new(o, "name", json_string(name));
    json_object_set_new(o, "online", json_boolean(online));
    json_object_set_new(o, "last_seen_at", jtime(seen));
    json_object_set_new(o, "created_at", jtime(created_at));
    json_object_set_new(o, "queue", json_pack("{sIsI}", "pending", (json_int_t)(pending > 0 ? pending : 0),
                                              "in_flight", (json_int_t)inflight));
    json_object_set_new(o, "pins", json_integer(h ? (json_int_t)atomic_load_explicit(&h->pins, memory_order_relaxed) : 0));
    json_object_set_new(o, "rate_per_minute", json_integer((json_int_t)rate));
    json_object_set_new(o, "info", info);
    return o;
}

static json_t *view_mqtt(tt_server *srv, uint64_t id, const char *password)
{
    char cid[32], prefix[256];
    snprintf(cid, sizeof(cid), "device-%" PRIu64, id);
    snprintf(prefix, sizeof(prefix), "%s/devices/%" PRIu64, srv->o.topic_root, id);
    return json_pack("{ssssssssss}", "url", srv->o.device_mqtt_url ? srv->o.device_mqtt_url : srv->o.mqtt_url,
                     "client_id", cid, "username", cid, "password", password, "topic_prefix", prefix);
}

/* ---- validation helpers ------------------------------------------------------------ */

static void field_error(json_t *errs, const char *field, const char *msg)
{
    json_array_append_new(errs, json_pack("{ssss}", "field", field, "message", msg));
}

/* Parses a positive integer id path parameter; 0 when it is not one. */
static uint64_t parse_id(const char *s)
{
    if (!s || !*s || strlen(s) > 16)
        return 0;
    uint64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return 0;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    return v < (1ULL << 53) ? v : 0;
}


/* ---- idempotency (API.md 1) -------------------------------------------------------- */

/* Requests running under a key, so that a second one gets 409 rather than
 * creating twice. Small: at most one per HTTP worker. */
static pthread_mutex_t idem_mu = PTHREAD_MUTEX_INITIALIZER;
static char **idem_running;
static size_t idem_nrunning, idem_caprunning;

typedef struct idem_ctx {
    const char *key;           /* NULL: no Idempotency-Key */
    uint8_t route;
    uint8_t hash[TT_HASH_BYTES];
    char *slot;                /* our entry in idem_running */
} idem_ctx;

static char *idem_slot_name(uint64_t account, uint8_t route, const char *key)
{
    size_t n = strlen(key) + 48;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%" PRIu64 "/%u/%s", account, (unsigned)route, key);
    return s;
}

static int idem_claim(char *name)
{
    pthread_mutex_lock(&idem_mu);
    for (size_t i = 0; i < idem_nrunning; i++)
        if (!strcmp(idem_running[i], name)) {
            pthread_mutex_unlock(&idem_mu);
            return -EBUSY;
        }
    if (TT_VEC_RESERVE(idem_running, idem_caprunning, idem_nrunning + 1, 64) != 0) {
        pthread_mutex_unlock(&idem_mu);
        return -ENOMEM;
    }
    idem_running[idem_nrunning++] = name;
    pthread_mutex_unlock(&idem_mu);
    return 0;
}

static void idem_end(idem_ctx *ic)
{
    if (!ic->slot)
        return;
    pthread_mutex_lock(&idem_mu);
    for (size_t i = 0; i < idem_nrunning; i++)
        if (idem_running[i] == ic->slot) {
            idem_running[i] = idem_running[--idem_nrunning];
            break;
        }
    pthread_mutex_unlock(&idem_mu);
    free(ic->slot);
    ic->slot = NULL;
}

static void render_batch(http_req *r, const char *payload, size_t len);
static void reply_message(http_req *r, const msg_rec *m);
static void reply_otp(http_req *r, const char *payload, size_t len);

/* Answers again what a stored first response said. */
static void idem_replay(http_req *r, const idem_rec *rec)
{
    msg_rec m = {0};
    problem p = {0};
    switch (rec->reply_type) {
    case REPLY_MESSAGE:
        if (rt_codec_decode(&msg_schema, rec->payload.ptr, rec->payload.len, &m) == 0) {
            reply_message(r, &m);
            rt_codec_free(&msg_schema, &m);
            return;
        }
        break;
    case REPLY_BATCH:
        render_batch(r, rec->payload.ptr, rec->payload.len);
        return;
    case REPLY_OTP:
        reply_otp(r, rec->payload.ptr, rec->payload.len);
        return;
    case REPLY_PROBLEM:
        if (rt_codec_decode(&problem_schema, rec->payload.ptr, rec->payload.len, &p) == 0) {
            http_reply_problem_ex(r, (int)rec->status, p.code, p.detail, NULL, NULL);
            rt_codec_free(&problem_schema, &p);
            return;
        }
        break;
    }
    http_reply_problem(r, 500, "internal_error", "a stored response could not be read");
}

/* Before a request runs: validates the Idempotency-Key header, refuses a key
 * in use or reused with another body, and replays a stored first response.
 * Returns 0 to run the request (ic->key set when it has a key), or 1 when a
 * response was sent. */
static int idem_begin(http_req *r, uint8_t route, idem_ctx *ic)
{
    tt_server *srv = r->app;
    memset(ic, 0, sizeof(*ic));
    const char *key = http_header(r, "Idempotency-Key");
    if (!key)
        return 0;
    size_t n = strlen(key);
    int ok = n >= 1 && n <= 255;
    for (size_t i = 0; ok && i < n; i++)
        ok = key[i] >= 0x20 && key[i] <= 0x7e;
    if (!ok) {
        json_t *errs = json_array();
        field_error(errs, "Idempotency-Key", "must be 1 to 255 printable ASCII characters");
        http_reply_validation(r, errs);
        return 1;
    }
    char *canon = json_dumps(r->body, JSON_COMPACT | JSON_SORT_KEYS);
    if (!canon) {
        http_reply_problem_ex(r, 503, "overloaded", "out of memory", NULL, "Retry-After: 1\r\n");
        return 1;
    }
    tt_hash(NULL, canon, strlen(canon), ic->hash);
    free(canon);
    ic->key = key;
    ic->route = route;
    ic->slot = idem_slot_name(r->account_id, route, key);
    int rc = ic->slot ? idem_claim(ic->slot) : -ENOMEM;
    if (rc) {
        free(ic->slot);
        ic->slot = NULL;
        if (rc == -EBUSY)
            http_reply_problem(r, 409, "idempotency_key_in_use",
                               "a request with this Idempotency-Key is still running; retry when it has finished");
        else
            http_reply_problem_ex(r, 503, "overloaded", "out of memory", NULL, "Retry-After: 1\r\n");
        return 1;
    }
    idem_rec rec = {0};
    uint8_t k[IDEM_KEY_MAX];
    if (store_get(srv->store, k, key_idem(k, r->account_id, route, key), &idem_schema, &rec) == 0) {
        int fresh = rec.created_at + IDEM_TTL_MS > tt_now_ms();
        if (fresh && (rec.hash.len != TT_HASH_BYTES || !tt_equal_ct(rec.hash.ptr, ic->hash, TT_HASH_BYTES)))
            http_reply_problem(r, 422, "idempotency_key_reused",
                               "this Idempotency-Key was used with a different request body");
        else if (fresh)
            idem_replay(r, &rec);
        rt_codec_free(&idem_schema, &rec);
        if (fresh) {
            idem_end(ic);
            return 1;
        }
    }
    return 0;
}

static void idem_fill(const idem_ctx *ic, submit *s)
{
    if (!ic->key)
        return;
    s->idem_key = (char *)ic->key;
    s->idem_route = ic->route;
    s->idem_hash = (rt_bin){(void *)ic->hash, TT_HASH_BYTES};
}

/* ---- messages ------------------------------------------------------------------------ */

/* Validates one message request (a POST body or a batch item) into s; the
 * strings point into b and into to. Errors go to errs. */
static void parse_submit(json_t *b, int allow_device, submit *s, char to[TT_PHONE_MAX], json_t *errs)
{
    s->priority = PRIO_NORMAL;
    s->ttl_s = 86400;
    json_t *jto = json_object_get(b, "to");
    if (!json_is_string(jto))
        field_error(errs, "to", jto ? "must be a string" : "is required");
    else if (tt_phone_normalize(json_string_value(jto), to) != 0)
        field_error(errs, "to", "must be a phone number");

    json_t *jm = json_object_get(b, "message");
    tt_sms_info info = {0};
    if (!json_is_string(jm))
        field_error(errs, "message", jm ? "must be a string" : "is required");
    else if (tt_sms_analyze(json_string_value(jm), json_string_length(jm), &info) != 0)
        field_error(errs, "message", "must be valid UTF-8 text");
    else if (info.codepoints < 1 || info.codepoints > TEXT_MAX_CP)
        field_error(errs, "message", "must be 1 to 1600 characters");

    if (allow_device) {
        json_t *jd = json_object_get(b, "device_id");
        if (jd && !json_is_null(jd)) {
            if (!json_is_integer(jd) || json_integer_value(jd) < 1)
                field_error(errs, "device_id", "must be a positive integer");
            else
                s->device_id = (uint64_t)json_integer_value(jd);
        }
    }
    json_t *jf = json_object_get(b, "force");
    if (jf && !json_is_null(jf)) {
        if (!json_is_boolean(jf))
            field_error(errs, "force", "must be true or false");
        else
            s->force = json_is_true(jf);
    }
    json_t *jp = json_object_get(b, "priority");
    if (jp && !json_is_null(jp)) {
        const char *p = json_is_string(jp) ? json_string_value(jp) : NULL;
        if (p && !strcmp(p, "high"))
            s->priority = PRIO_HIGH;
        else if (!p || strcmp(p, "normal") != 0)
            field_error(errs, "priority", "must be \"normal\" or \"high\"");
    }
    json_t *jt = json_object_get(b, "ttl");
    if (jt && !json_is_null(jt)) {
        if (!json_is_integer(jt) || json_integer_value(jt) < 10 || json_integer_value(jt) > 604800)
            field_error(errs, "ttl", "must be an integer from 10 to 604800 (seconds)");
        else
            s->ttl_s = json_integer_value(jt);
    }
    s->to = to;
    s->text = json_is_string(jm) ? (char *)json_string_value(jm) : NULL;
    s->encoding = info.encoding;
    s->segments = info.segments;
}

static void reply_message(http_req *r, const msg_rec *m)
{
    char loc[96];
    snprintf(loc, sizeof(loc), "Location: /api/v1/messages/%" PRIu64 "\r\n", m->id);
    http_reply_json(r, 202, view_message(m), loc);
}

static void send_message(http_req *r, uint64_t path_device)
{
    tt_server *srv = r->app;
    idem_ctx ic;
    if (idem_begin(r, path_device ? IDEM_DEVICE_MESSAGES : IDEM_MESSAGES, &ic))
        return;
    json_t *errs = json_array();
    submit s = {0};
    char to[TT_PHONE_MAX];
    s.account_id = r->account_id;
    parse_submit(r->body, !path_device, &s, to, errs);
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        goto out;
    }
    json_decref(errs);
    if (path_device) {
        s.device_id = path_device;
        s.direct = true;
    }
    idem_fill(&ic, &s);
    rt_envelope *rep = call(r, srv->router, rt_codec_envelope(ROUTER_SUBMIT, PROTO_V1, &submit_schema, &s));
    if (!rep || reply_if_problem(r, rep))
        goto out;
    msg_rec m = {0};
    if (rep->type != REPLY_MESSAGE || rt_codec_decode_env(&msg_schema, PROTO_V1, rep, &m) != 0) {
        rt_envelope_free(rep);
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
        goto out;
    }
    rt_envelope_free(rep);
    reply_message(r, &m);
    rt_codec_free(&msg_schema, &m);
out:
    idem_end(&ic);
}

#define BATCH_MAX_ITEMS 1000

/* Renders a REPLY_BATCH payload as the 207 response. */
static void render_batch(http_req *r, const char *payload, size_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    msgpack_object_array res = {0, NULL};
    if (msgpack_unpack_next(&u, payload, len, &off) == MSGPACK_UNPACK_SUCCESS && u.data.type == MSGPACK_OBJECT_ARRAY)
        res = u.data.via.array;
    json_t *data = json_array();
    for (size_t i = 0; i < res.size; i++) {
        msgpack_object *e = res.ptr[i].type == MSGPACK_OBJECT_ARRAY && res.ptr[i].via.array.size == 2
                                ? res.ptr[i].via.array.ptr
                                : NULL;
        json_t *item = NULL;
        if (e && e[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER && e[1].type == MSGPACK_OBJECT_BIN) {
            int status = (int)e[0].via.u64;
            const char *b = e[1].via.bin.ptr;
            size_t bl = e[1].via.bin.size;
            msg_rec m = {0};
            problem p = {0};
            json_t *errs;
            if (status == 202 && rt_codec_decode(&msg_schema, b, bl, &m) == 0) {
                item = json_pack("{siso}", "status", 202, "message", view_message(&m));
                rt_codec_free(&msg_schema, &m);
            } else if (status == 422 && (errs = json_loadb(b, bl, 0, NULL))) {
                json_t *pj = http_problem_json(422, "validation_failed", "the message is not valid");
                json_object_set_new(pj, "errors", errs);
                item = json_pack("{siso}", "status", 422, "error", pj);
            } else if (rt_codec_decode(&problem_schema, b, bl, &p) == 0) {
                item = json_pack("{siso}", "status", status, "error", http_problem_json(status, p.code, p.detail));
                rt_codec_free(&problem_schema, &p);
            }
        }
        if (!item)
            item = json_pack("{siso}", "status", 500, "error", http_problem_json(500, "internal_error", "no result"));
        json_array_append_new(data, item);
    }
    msgpack_unpacked_destroy(&u);
    http_reply_json(r, 207, json_pack("{so}", "data", data), NULL);
}

/* POST /messages/batch: items are validated here; the router routes the
 * valid ones in order in one commit and echoes the invalid ones' errors, so
 * the 207 lists one result per item (and a replay can render it again). */
static void h_post_batch(http_req *r)
{
    tt_server *srv = r->app;
    json_t *items = json_object_get(r->body, "messages");
    json_t *errs = json_array();
    idem_ctx ic;
    if (idem_begin(r, IDEM_BATCH, &ic)) {
        json_decref(errs);
        return;
    }
    if (!json_is_array(items))
        field_error(errs, "messages", items ? "must be an array" : "is required");
    else if (json_array_size(items) < 1 || json_array_size(items) > BATCH_MAX_ITEMS)
        field_error(errs, "messages", "must hold 1 to 1000 messages");
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        idem_end(&ic);
        return;
    }
    json_decref(errs);
    size_t n = json_array_size(items);
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 5);
    msgpack_pack_uint64(&pk, r->account_id);
    if (ic.key) {
        msgpack_pack_str(&pk, strlen(ic.key));
        msgpack_pack_str_body(&pk, ic.key, strlen(ic.key));
        msgpack_pack_bin(&pk, TT_HASH_BYTES);
        msgpack_pack_bin_body(&pk, ic.hash, TT_HASH_BYTES);
    } else {
        msgpack_pack_nil(&pk);
        msgpack_pack_nil(&pk);
    }
    msgpack_pack_uint64(&pk, IDEM_BATCH);
    msgpack_pack_array(&pk, n);
    for (size_t i = 0; i < n; i++) {
        json_t *it = json_array_get(items, i);
        json_t *e = json_array();
        submit s = {0};
        char to[TT_PHONE_MAX];
        s.account_id = r->account_id;
        if (!json_is_object(it))
            field_error(e, "messages[]", "must be an object");
        else
            parse_submit(it, 1, &s, to, e);
        char *buf = NULL;
        size_t len = 0;
        int invalid = json_array_size(e) > 0;
        if (invalid)
            buf = json_dumps(e, JSON_COMPACT), len = buf ? strlen(buf) : 0;
        else if (rt_codec_encode(&submit_schema, &s, &buf, &len) != 0)
            len = 0;
        json_decref(e);
        msgpack_pack_array(&pk, 2);
        msgpack_pack_uint64(&pk, invalid ? 1 : 0);
        msgpack_pack_bin(&pk, len);
        msgpack_pack_bin_body(&pk, buf, len);
        free(buf);
    }
    rt_envelope *rep = call(r, srv->router, rt_envelope_new(ROUTER_BATCH, PROTO_V1, sb.data, sb.size));
    msgpack_sbuffer_destroy(&sb);
    if (rep && !reply_if_problem(r, rep)) {
        if (rep->type == REPLY_BATCH)
            render_batch(r, rep->data, rep->len);
        else
            http_reply_problem(r, 500, "internal_error", "unexpected reply");
        rt_envelope_free(rep);
    }
    idem_end(&ic);
}

static void h_post_messages(http_req *r) { send_message(r, 0); }

static void h_post_device_messages(http_req *r)
{
    uint64_t id = parse_id(r->params[0]);
    if (!id) {
        http_reply_problem(r, 404, "not_found", "device not found");
        return;
    }
    send_message(r, id);
}

/* Loads a message of the request's account; 404 response otherwise. */
static int load_message(http_req *r, uint64_t id, msg_rec *m)
{
    tt_server *srv = r->app;
    uint8_t k[KEY_MAX];
    int rc = id ? store_get(srv->store, k, key_u64(k, K_MESSAGE, id), &msg_schema, m) : -ENOENT;
    if (rc == 0 && m->account_id == r->account_id)
        return 0;
    if (rc == 0)
        rt_codec_free(&msg_schema, m);
    if (rc == -EIO)
        http_reply_problem(r, 503, "store_unavailable", "the store could not be read");
    else
        http_reply_problem(r, 404, "not_found", "message %s not found", r->params[0]);
    return -1;
}

static void h_get_message(http_req *r)
{
    msg_rec m = {0};
    if (load_message(r, parse_id(r->params[0]), &m) != 0)
        return;
    http_reply_json(r, 200, view_message(&m), NULL);
    rt_codec_free(&msg_schema, &m);
}

/* Cursors are the last id returned, so paging while messages arrive neither
 * skips nor repeats (new ids sort before the cursor, newest first). */
/* ?limit: 1 to 500, default 50. */
static void parse_page_limit(http_req *r, int *limit, json_t *errs)
{
    char buf[64];
    *limit = 50;
    if (http_query(r, "limit", buf, sizeof(buf))) {
        char *end;
        long v = strtol(buf, &end, 10);
        if (!*buf || *end || v < 1 || v > 500)
            field_error(errs, "limit", "must be an integer from 1 to 500");
        else
            *limit = (int)v;
    }
}

static int parse_limit(http_req *r, int *limit, uint64_t *after, json_t *errs)
{
    char buf[64];
    *after = 0;
    parse_page_limit(r, limit, errs);
    if (http_query(r, "cursor", buf, sizeof(buf))) {
        *after = parse_id(buf);
        if (!*after)
            field_error(errs, "cursor", "is not a cursor this server gave out");
    }
    return json_array_size(errs) ? -1 : 0;
}

/* One page of a list being built: items, the cursor (the last id looked
 * at), and whether the store holds more. */
typedef struct page_ctx {
    http_req *r;
    json_t *data;
    int limit, n, more;
    uint64_t last;
} page_ctx;

/* 1 when the page is full: the item at hand belongs to the next page. */
static int page_full(page_ctx *c)
{
    if (c->n < c->limit)
        return 0;
    c->more = 1;
    return 1;
}

static void page_push(page_ctx *c, json_t *item, uint64_t id)
{
    json_array_append_new(c->data, item);
    c->n++;
    c->last = id;
}

/* Parses ?limit and ?cursor into c and *after; replies 422 and returns -1
 * on a bad value (errs is consumed either way). */
static int page_begin(http_req *r, page_ctx *c, uint64_t *after, json_t *errs)
{
    c->r = r;
    parse_limit(r, &c->limit, after, errs);
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return -1;
    }
    json_decref(errs);
    c->data = json_array();
    return 0;
}

static json_t *page(json_t *data, int more, uint64_t last);

static void page_reply(page_ctx *c) { http_reply_json(c->r, 200, page(c->data, c->more, c->last), NULL); }

typedef struct list_ctx {
    page_ctx p;
    /* filters */
    int direction, status;
    uint64_t device_id;
    const char *number;
    int64_t since, until;
} list_ctx;

static int list_msg(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    list_ctx *c = arg;
    tt_server *srv = c->p.r->app;
    if (klen != 17)
        return 0;
    uint64_t id = ~key_get_u64(key + 9);
    if (page_full(&c->p))
        return 1;
    msg_rec m = {0};
    uint8_t k[KEY_MAX];
    if (store_get(srv->store, k, key_u64(k, K_MESSAGE, id), &msg_schema, &m) != 0)
        return 0;
    int keep = (c->direction < 0 || (int)m.direction == c->direction) &&
               (c->status < 0 || (int)m.status == c->status) && (!c->device_id || m.device_id == c->device_id) &&
               (!c->number || (m.to && !strcmp(m.to, c->number)) || (m.from && !strcmp(m.from, c->number))) &&
               (!c->since || m.created_at >= c->since) && (!c->until || m.created_at < c->until);
    if (keep)
        page_push(&c->p, view_message(&m), id);
    else
        c->p.last = id; /* filtered out, but the next page starts after it */
    rt_codec_free(&msg_schema, &m);
    return 0;
}

static json_t *page(json_t *data, int more, uint64_t last)
{
    char cur[32];
    snprintf(cur, sizeof(cur), "%" PRIu64, last);
    return json_pack("{soso}", "data", data, "next_cursor", more ? json_string(cur) : json_null());
}

static int status_from_name(const char *s)
{
    static const char *names[] = {"pending", "sent", "delivered", "failed", "cancelled", "received"};
    for (int i = 0; i < 6; i++)
        if (!strcmp(s, names[i]))
            return i;
    return -1;
}

static void h_list_messages(http_req *r)
{
    tt_server *srv = r->app;
    json_t *errs = json_array();
    list_ctx c = {.p = {.r = r}, .direction = -1, .status = -1};
    uint64_t after;
    parse_limit(r, &c.p.limit, &after, errs);
    char buf[64], num[TT_PHONE_MAX];
    if (http_query(r, "direction", buf, sizeof(buf))) {
        if (!strcmp(buf, "outbound"))
            c.direction = DIR_OUTBOUND;
        else if (!strcmp(buf, "inbound"))
            c.direction = DIR_INBOUND;
        else
            field_error(errs, "direction", "must be outbound or inbound");
    }
    if (http_query(r, "status", buf, sizeof(buf)) && (c.status = status_from_name(buf)) < 0)
        field_error(errs, "status", "must be pending, sent, delivered, failed, cancelled or received");
    if (http_query(r, "device_id", buf, sizeof(buf)) && !(c.device_id = parse_id(buf)))
        field_error(errs, "device_id", "must be a positive integer");
    if (http_query(r, "number", buf, sizeof(buf))) {
        if (tt_phone_normalize(buf, num) == 0)
            c.number = num;
        else
            c.number = strcpy(num, buf[0] && strlen(buf) < sizeof(num) ? buf : "-");
    }
    if (http_query(r, "since", buf, sizeof(buf)) && tt_time_parse(buf, &c.since) != 0)
        field_error(errs, "since", "must be an RFC 3339 time");
    if (http_query(r, "until", buf, sizeof(buf)) && tt_time_parse(buf, &c.until) != 0)
        field_error(errs, "until", "must be an RFC 3339 time");
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return;
    }
    json_decref(errs);
    c.p.data = json_array();
    uint8_t prefix[KEY_MAX], start[KEY_MAX];
    key_u64(prefix, K_ACCTMSG, r->account_id);
    size_t slen = 0;
    if (after) /* resume just past the cursor's id */
        slen = key_acctmsg(start, r->account_id, after - 1);
    int n = store_scan(srv->store, prefix, 9, after ? start : NULL, slen, SIZE_MAX, list_msg, &c);
    if (n < 0) {
        json_decref(c.p.data);
        http_reply_problem(r, 503, "store_unavailable", "the store could not be read");
        return;
    }
    page_reply(&c.p);
}

/* ---- devices ------------------------------------------------------------------------- */

/* A device of the request's account (0), or a 404 already sent (-1). */
static int load_device(http_req *r, uint64_t id, dev_rec *d)
{
    tt_server *srv = r->app;
    uint8_t k[KEY_MAX];
    dev_handle *h = id ? devreg_get(&srv->reg, id) : NULL;
    int rc = h && !atomic_load_explicit(&h->deleted, memory_order_relaxed)
                 ? store_get(srv->store, k, key_u64(k, K_DEVICE, id), &dev_schema, d)
                 : -ENOENT;
    if (rc == 0 && d->account_id == r->account_id)
        return 0;
    if (rc == 0)
        rt_codec_free(&dev_schema, d);
    http_reply_problem(r, 404, "not_found", "device %s not found", r->params[0]);
    return -1;
}

static void h_get_device(http_req *r)
{
    dev_rec d = {0};
    if (load_device(r, parse_id(r->params[0]), &d) != 0)
        return;
    dev_handle *h = devreg_get(&((tt_server *)r->app)->reg, d.id);
    uint64_t rate = h ? atomic_load_explicit(&h->rate_per_minute, memory_order_relaxed) : d.rate_per_minute;
    http_reply_json(r, 200, view_device(r->app, d.id, d.name, rate, d.created_at), NULL);
    rt_codec_free(&dev_schema, &d);
}

static int list_dev(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    page_ctx *c = arg;
    tt_server *srv = c->r->app;
    if (klen != 17)
        return 0;
    if (page_full(c))
        return 1;
    uint64_t id = key_get_u64(key + 9);
    dev_handle *h = devreg_get(&srv->reg, id);
    dev_rec d = {0};
    uint8_t k[KEY_MAX];
    if (!h || atomic_load_explicit(&h->deleted, memory_order_relaxed) ||
        store_get(srv->store, k, key_u64(k, K_DEVICE, id), &dev_schema, &d) != 0)
        return 0;
    page_push(c, view_device(srv, id, d.name, atomic_load(&h->rate_per_minute), d.created_at), id);
    rt_codec_free(&dev_schema, &d);
    return 0;
}

static void h_list_devices(http_req *r)
{
    tt_server *srv = r->app;
    page_ctx c = {0};
    uint64_t after;
    if (page_begin(r, &c, &after, json_array()) != 0)
        return;
    uint8_t prefix[KEY_MAX], start[KEY_MAX];
    key_u64(prefix, K_ACCTDEV, r->account_id);
    size_t slen = after ? key_u64x2(start, K_ACCTDEV, r->account_id, after + 1) : 0;
    store_scan(srv->store, prefix, 9, after ? start : NULL, slen, SIZE_MAX, list_dev, &c);
    page_reply(&c);
}


/* ---- device changes ------------------------------------------------------------------- */

/* Answers a REPLY_DEVICE with the device view (plus mqtt when it carries a password). */
static void reply_device(http_req *r, rt_envelope *rep, int status)
{
    tt_server *srv = r->app;
    dev_reply d = {0};
    if (rep->type != REPLY_DEVICE || rt_codec_decode_env(&dev_reply_schema, PROTO_V1, rep, &d) != 0) {
        rt_envelope_free(rep);
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
        return;
    }
    rt_envelope_free(rep);
    json_t *o = view_device(srv, d.id, d.name, d.rate_per_minute, d.created_at);
    if (d.password)
        json_object_set_new(o, "mqtt", view_mqtt(srv, d.id, d.password));
    char loc[96];
    snprintf(loc, sizeof(loc), "Location: /api/v1/devices/%" PRIu64 "\r\n", d.id);
    http_reply_json(r, status, o, status == 201 ? loc : NULL);
    rt_codec_free(&dev_reply_schema, &d);
}

static int device_rate(json_t *b, json_t *errs, uint64_t *rate)
{
    json_t *jr = json_object_get(b, "rate_per_minute");
    if (!jr || json_is_null(jr))
        return 0;
    if (!json_is_integer(jr) || json_integer_value(jr) < 1 || json_integer_value(jr) > 600)
        field_error(errs, "rate_per_minute", "must be an integer from 1 to 600");
    else
        *rate = (uint64_t)json_integer_value(jr);
    return 0;
}

static int device_name(json_t *b, json_t *errs, const char **name, int required)
{
    json_t *jn = json_object_get(b, "name");
    if (!jn || json_is_null(jn)) {
        if (required)
            field_error(errs, "name", "is required");
    } else if (!json_is_string(jn)) {
        field_error(errs, "name", "must be a string");
    } else if (json_string_length(jn) < 1 || json_string_length(jn) > 100) {
        field_error(errs, "name", "must be 1 to 100 characters");
    } else {
        *name = json_string_value(jn);
    }
    return 0;
}

/* Sends a device_patch-shaped request to the router and answers it. */
static void device_call(http_req *r, uint16_t type, const char *name, uint64_t rate)
{
    tt_server *srv = r->app;
    uint64_t id = parse_id(r->params[0]);
    if (!id) {
        http_reply_problem(r, 404, "not_found", "device %s not found", r->params[0]);
        return;
    }
    device_patch p = {r->account_id, id, (char *)name, rate};
    rt_envelope *rep = call(r, srv->router, rt_codec_envelope(type, PROTO_V1, &device_patch_schema, &p));
    if (!rep || reply_if_problem(r, rep))
        return;
    if (type == ROUTER_DEVICE_DELETE) {
        rt_envelope_free(rep);
        http_reply_empty(r, 204);
        return;
    }
    reply_device(r, rep, 200);
}

static void h_patch_device(http_req *r)
{
    json_t *errs = json_array();
    const char *name = NULL;
    uint64_t rate = 0;
    device_name(r->body, errs, &name, 0);
    device_rate(r->body, errs, &rate);
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return;
    }
    json_decref(errs);
    device_call(r, ROUTER_DEVICE_PATCH, name, rate);
}

static void h_post_devices(http_req *r)
{
    tt_server *srv = r->app;
    json_t *errs = json_array();
    device_create c = {r->account_id, NULL, 30};
    const char *name = NULL;
    device_name(r->body, errs, &name, 1);
    device_rate(r->body, errs, &c.rate_per_minute);
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return;
    }
    json_decref(errs);
    c.name = (char *)name;
    rt_envelope *rep = call(r, srv->router, rt_codec_envelope(ROUTER_DEVICE_CREATE, PROTO_V1, &device_create_schema, &c));
    if (!rep || reply_if_problem(r, rep))
        return;
    reply_device(r, rep, 201);
}

static void h_delete_device(http_req *r) { device_call(r, ROUTER_DEVICE_DELETE, NULL, 0); }
static void h_rotate_device(http_req *r) { device_call(r, ROUTER_DEVICE_ROTATE, NULL, 0); }

/* ---- pins ------------------------------------------------------------------------------- */

static json_t *view_pin(const pin_rec *p)
{
    json_t *o = json_object();
    json_object_set_new(o, "number", json_string(p->number));
    json_object_set_new(o, "device_id", json_integer((json_int_t)p->device_id));
    json_object_set_new(o, "safe_word", json_string(p->safe_word));
    json_object_set_new(o, "created_at", jtime(p->created_at));
    json_object_set_new(o, "last_used_at", jtime(p->last_used_at));
    return o;
}

/* The device of the path, of this account: its id, or 0 with a 404 sent. */
static uint64_t own_device_id(http_req *r)
{
    tt_server *srv = r->app;
    uint64_t id = parse_id(r->params[0]);
    dev_handle *h = id ? devreg_get(&srv->reg, id) : NULL;
    if (!h || h->account_id != r->account_id || atomic_load_explicit(&h->deleted, memory_order_relaxed)) {
        http_reply_problem(r, 404, "not_found", "device %s not found", r->params[0]);
        return 0;
    }
    return id;
}

/* The path's number, normalised (the raw and the normalised form both match). */
static int path_number(http_req *r, char out[TT_PHONE_MAX])
{
    if (tt_phone_normalize(r->params[1], out) != 0) {
        http_reply_problem(r, 404, "not_found", "no pin for %s", r->params[1]);
        return -1;
    }
    return 0;
}

static void h_get_pin(http_req *r)
{
    tt_server *srv = r->app;
    char number[TT_PHONE_MAX];
    uint64_t dev = own_device_id(r);
    if (!dev || path_number(r, number) != 0)
        return;
    pin_rec p = {0};
    uint8_t k[KEY_MAX];
    if (store_get(srv->store, k, key_u64_str(k, K_PIN, r->account_id, number), &pin_schema, &p) != 0 ||
        p.device_id != dev) {
        rt_codec_free(&pin_schema, &p);
        http_reply_problem(r, 404, "not_found", "no pin for %s on device %" PRIu64, number, dev);
        return;
    }
    http_reply_json(r, 200, view_pin(&p), NULL);
    rt_codec_free(&pin_schema, &p);
}

/* A page of pins: its cursor is the last number, not an id. */
typedef struct plist_ctx {
    page_ctx p;
    char last[TT_PHONE_MAX];
} plist_ctx;

static int list_pin(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    plist_ctx *c = arg;
    tt_server *srv = c->p.r->app;
    if (klen <= 9 || klen - 9 >= TT_PHONE_MAX)
        return 0;
    if (page_full(&c->p))
        return 1;
    char number[TT_PHONE_MAX];
    memcpy(number, key + 9, klen - 9);
    number[klen - 9] = 0;
    pin_rec p = {0};
    uint8_t k[KEY_MAX];
    if (store_get(srv->store, k, key_u64_str(k, K_PIN, c->p.r->account_id, number), &pin_schema, &p) == 0) {
        page_push(&c->p, view_pin(&p), 0);
        rt_codec_free(&pin_schema, &p);
        snprintf(c->last, sizeof(c->last), "%s", number);
    }
    return 0;
}

static void h_list_pins(http_req *r)
{
    tt_server *srv = r->app;
    uint64_t dev = own_device_id(r);
    if (!dev)
        return;
    json_t *errs = json_array();
    plist_ctx c = {.p = {.r = r}};
    char buf[64];
    parse_page_limit(r, &c.p.limit, errs);
    const char *cursor = http_query(r, "cursor", buf, sizeof(buf));
    if (cursor && (!*cursor || strlen(cursor) >= TT_PHONE_MAX))
        field_error(errs, "cursor", "is not a cursor this server gave out");
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return;
    }
    json_decref(errs);
    c.p.data = json_array();
    uint8_t prefix[KEY_MAX], start[KEY_MAX];
    key_u64(prefix, K_DEVPIN, dev);
    size_t slen = 0;
    if (cursor) { /* just past the cursor's number */
        slen = key_u64_str(start, K_DEVPIN, dev, cursor);
        start[slen++] = 0;
    }
    store_scan(srv->store, prefix, 9, cursor ? start : NULL, slen, SIZE_MAX, list_pin, &c);
    json_t *o = json_pack("{soso}", "data", c.p.data, "next_cursor", c.p.more ? json_string(c.last) : json_null());
    http_reply_json(r, 200, o, NULL);
}

static void pin_call(http_req *r, uint64_t op, const char *number, const char *safe_word)
{
    tt_server *srv = r->app;
    uint64_t dev = own_device_id(r);
    if (!dev)
        return;
    pin_op p = {r->account_id, dev, op, (char *)number, (char *)safe_word};
    rt_envelope *rep = call(r, srv->router, rt_codec_envelope(ROUTER_PIN_OP, PROTO_V1, &pin_op_schema, &p));
    if (!rep || reply_if_problem(r, rep))
        return;
    if (rep->type == REPLY_OK) {
        rt_envelope_free(rep);
        http_reply_empty(r, 204);
        return;
    }
    pin_rec pr = {0};
    if (rep->type != REPLY_PIN || rt_codec_decode_env(&pin_schema, PROTO_V1, rep, &pr) != 0) {
        rt_envelope_free(rep);
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
        return;
    }
    rt_envelope_free(rep);
    http_reply_json(r, 200, view_pin(&pr), NULL);
    rt_codec_free(&pin_schema, &pr);
}

static void h_reset_pins(http_req *r) { pin_call(r, PIN_RESET_ALL, NULL, NULL); }

static void h_reset_pin(http_req *r)
{
    char number[TT_PHONE_MAX];
    if (own_device_id(r) && path_number(r, number) == 0)
        pin_call(r, PIN_RESET_ONE, number, NULL);
}

static void h_regenerate_pin(http_req *r)
{
    char number[TT_PHONE_MAX];
    if (own_device_id(r) && path_number(r, number) == 0)
        pin_call(r, PIN_REGENERATE, number, NULL);
}

static void h_patch_pin(http_req *r)
{
    json_t *sw = json_object_get(r->body, "safe_word");
    int has_alnum = 0;
    for (const char *c = json_is_string(sw) ? json_string_value(sw) : ""; *c; c++)
        has_alnum |= (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9');
    if (!json_is_string(sw) || !tt_safeword_valid(json_string_value(sw)) || !has_alnum) {
        json_t *errs = json_array();
        field_error(errs, "safe_word",
                    sw ? "must be 4 to 64 characters of letters, digits, '-', '_' and space, with a letter or digit"
                       : "is required");
        http_reply_validation(r, errs);
        return;
    }
    char number[TT_PHONE_MAX];
    if (own_device_id(r) && path_number(r, number) == 0)
        pin_call(r, PIN_EDIT, number, json_string_value(sw));
}

/* ---- cancel --------------------------------------------------------------------------- */

static void h_cancel_message(http_req *r)
{
    tt_server *srv = r->app;
    msg_rec m = {0};
    if (load_message(r, parse_id(r->params[0]), &m) != 0)
        return;
    dev_handle *h = devreg_get(&srv->reg, m.device_id);
    if (m.direction != DIR_OUTBOUND || m.status != ST_PENDING || m.dispatched_at || !h) {
        http_reply_problem(r, 409, "not_cancellable", "message %" PRIu64 " is %s%s; only a pending message not yet "
                           "handed to its device can be cancelled", m.id, msg_status_name(m.status),
                           m.status == ST_PENDING ? " and already handed to its device" : "");
        rt_codec_free(&msg_schema, &m);
        return;
    }
    dev_cancel c = {r->account_id, m.id};
    rt_codec_free(&msg_schema, &m);
    rt_envelope *rep = call(r, h->actor, rt_codec_envelope(DEV_CANCEL, PROTO_V1, &dev_cancel_schema, &c));
    if (!rep || reply_if_problem(r, rep))
        return;
    if (rep->type != REPLY_MESSAGE || rt_codec_decode_env(&msg_schema, PROTO_V1, rep, &m) != 0) {
        rt_envelope_free(rep);
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
        return;
    }
    rt_envelope_free(rep);
    http_reply_json(r, 200, view_message(&m), NULL);
    rt_codec_free(&msg_schema, &m);
}


/* ---- OTP (API.md 6) ------------------------------------------------------------------- */

static json_t *view_otp(const otp_reply *o)
{
    return json_pack("{sssIsosI}", "number", o->number, "message_id", (json_int_t)o->message_id, "expires_at",
                     jtime(o->expires_at), "length", (json_int_t)o->length);
}

static void reply_otp(http_req *r, const char *payload, size_t len)
{
    otp_reply o = {0};
    if (rt_codec_decode(&otp_reply_schema, payload, len, &o) != 0) {
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
        return;
    }
    http_reply_json(r, 202, view_otp(&o), NULL);
    rt_codec_free(&otp_reply_schema, &o);
}

/* An integer field in [lo, hi], or def when absent. */
static int64_t int_field(json_t *b, const char *name, int64_t def, int64_t lo, int64_t hi, json_t *errs,
                         const char *msg)
{
    json_t *j = json_object_get(b, name);
    if (!j || json_is_null(j))
        return def;
    if (!json_is_integer(j) || json_integer_value(j) < lo || json_integer_value(j) > hi) {
        field_error(errs, name, msg);
        return def;
    }
    return json_integer_value(j);
}

static void h_otp_send(http_req *r)
{
    tt_server *srv = r->app;
    idem_ctx ic;
    if (idem_begin(r, IDEM_OTP, &ic))
        return;
    json_t *errs = json_array();
    char number[TT_PHONE_MAX];
    otp_send s = {r->account_id, number, 6, 5, 0, NULL, {NULL, 0}};
    json_t *jn = json_object_get(r->body, "number");
    if (!json_is_string(jn))
        field_error(errs, "number", jn ? "must be a string" : "is required");
    else if (tt_phone_normalize(json_string_value(jn), number) != 0)
        field_error(errs, "number", "must be a phone number");
    s.length = (uint64_t)int_field(r->body, "length", 6, 4, 10, errs, "must be an integer from 4 to 10");
    s.minutes = (uint64_t)int_field(r->body, "expires_in", 5, 1, 60, errs, "must be an integer from 1 to 60 (minutes)");
    s.device_id = (uint64_t)int_field(r->body, "device_id", 0, 1, (1LL << 53) - 1, errs, "must be a positive integer");
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        goto out;
    }
    json_decref(errs);
    if (ic.key) {
        s.idem_key = (char *)ic.key;
        s.idem_hash = (rt_bin){ic.hash, TT_HASH_BYTES};
    }
    rt_envelope *rep = call(r, srv->otp, rt_codec_envelope(OTP_SEND, PROTO_V1, &otp_send_schema, &s));
    if (!rep || reply_if_problem(r, rep))
        goto out;
    if (rep->type == REPLY_OTP)
        reply_otp(r, rep->data, rep->len);
    else
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
    rt_envelope_free(rep);
out:
    idem_end(&ic);
}

static void h_otp_verify(http_req *r)
{
    tt_server *srv = r->app;
    json_t *errs = json_array();
    char number[TT_PHONE_MAX];
    json_t *jn = json_object_get(r->body, "number"), *jc = json_object_get(r->body, "code");
    if (!json_is_string(jn))
        field_error(errs, "number", jn ? "must be a string" : "is required");
    else if (tt_phone_normalize(json_string_value(jn), number) != 0)
        field_error(errs, "number", "must be a phone number");
    int digits = json_is_string(jc) && json_string_length(jc) >= 1 && json_string_length(jc) <= 10;
    for (const char *c = digits ? json_string_value(jc) : ""; *c; c++)
        digits &= *c >= '0' && *c <= '9';
    if (!digits)
        field_error(errs, "code", jc ? "must be a string of 1 to 10 digits" : "is required");
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return;
    }
    json_decref(errs);
    otp_verify v = {r->account_id, number, (char *)json_string_value(jc)};
    rt_envelope *rep = call(r, srv->otp, rt_codec_envelope(OTP_VERIFY, PROTO_V1, &otp_verify_schema, &v));
    if (!rep || reply_if_problem(r, rep))
        return;
    verify_reply vr = {0};
    if (rep->type != REPLY_VERIFY || rt_codec_decode_env(&verify_reply_schema, PROTO_V1, rep, &vr) != 0) {
        rt_envelope_free(rep);
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
        return;
    }
    rt_envelope_free(rep);
    json_t *o = json_pack("{sb}", "verified", vr.verified);
    if (vr.reason)
        json_object_set_new(o, "reason", json_string(vr.reason));
    if (vr.attempts_left >= 0)
        json_object_set_new(o, "attempts_left", json_integer(vr.attempts_left));
    http_reply_json(r, 200, o, NULL);
    rt_codec_free(&verify_reply_schema, &vr);
}

/* ---- tokens (API.md 7) ---------------------------------------------------------------- */

static json_t *view_token(uint64_t id, const char *name, const char *prefix, int64_t created_at, int64_t last_used)
{
    json_t *o = json_pack("{sIssss}", "id", (json_int_t)id, "name", name, "prefix", prefix);
    json_object_set_new(o, "created_at", jtime(created_at));
    json_object_set_new(o, "last_used_at", jtime(last_used));
    return o;
}

static void h_post_token(http_req *r)
{
    tt_server *srv = r->app;
    json_t *errs = json_array();
    const char *name = NULL;
    device_name(r->body, errs, &name, 1);
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return;
    }
    json_decref(errs);
    token_op t = {r->account_id, 0, (char *)name};
    rt_envelope *rep = call(r, srv->router, rt_codec_envelope(ROUTER_TOKEN_CREATE, PROTO_V1, &token_op_schema, &t));
    if (!rep || reply_if_problem(r, rep))
        return;
    token_reply tr = {0};
    if (rep->type != REPLY_TOKEN || rt_codec_decode_env(&token_reply_schema, PROTO_V1, rep, &tr) != 0) {
        rt_envelope_free(rep);
        http_reply_problem(r, 500, "internal_error", "unexpected reply");
        return;
    }
    sodium_memzero(rep->data, rep->len);
    rt_envelope_free(rep);
    json_t *o = view_token(tr.id, tr.name, tr.prefix, tr.created_at, 0);
    json_object_set_new(o, "token", json_string(tr.token ? tr.token : ""));
    if (tr.token)
        sodium_memzero(tr.token, strlen(tr.token));
    http_reply_json(r, 201, o, NULL);
    rt_codec_free(&token_reply_schema, &tr);
}

static int list_token(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    page_ctx *c = arg;
    tok_rec t = {0};
    if (klen != 9 || rt_codec_decode(&tok_schema, val, vlen, &t) != 0)
        return 0;
    if (t.account_id == c->r->account_id) {
        if (page_full(c)) {
            rt_codec_free(&tok_schema, &t);
            return 1;
        }
        int64_t used = tokens_last_used(t.id);
        page_push(c, view_token(t.id, t.name, t.prefix, t.created_at, used > t.last_used_at ? used : t.last_used_at),
                  t.id);
    }
    rt_codec_free(&tok_schema, &t);
    return 0;
}

static void h_list_tokens(http_req *r)
{
    tt_server *srv = r->app;
    page_ctx c = {0};
    uint64_t after;
    if (page_begin(r, &c, &after, json_array()) != 0)
        return;
    uint8_t prefix[1] = {K_TOKEN}, start[KEY_MAX];
    size_t slen = after ? key_u64(start, K_TOKEN, after + 1) : 0;
    store_scan(srv->store, prefix, 1, after ? start : NULL, slen, SIZE_MAX, list_token, &c);
    page_reply(&c);
}

static void h_delete_token(http_req *r)
{
    tt_server *srv = r->app;
    uint64_t id = parse_id(r->params[0]);
    if (!id) {
        http_reply_problem(r, 404, "not_found", "token %s not found", r->params[0]);
        return;
    }
    token_op t = {r->account_id, id, NULL};
    rt_envelope *rep = call(r, srv->router, rt_codec_envelope(ROUTER_TOKEN_DELETE, PROTO_V1, &token_op_schema, &t));
    if (!rep || reply_if_problem(r, rep))
        return;
    rt_envelope_free(rep);
    tokens_revoked(); /* stored now: cached entries made meanwhile go too */
    http_reply_empty(r, 204);
}

/* Tests only (TARATXT_TEST_CLOCK=1): moves the server's clock forward, so
 * expiry and rate limits are tested without sleeping. */
static void h_test_clock(http_req *r)
{
    tt_server *srv = r->app;
    if (!srv->o.test_clock) {
        http_reply_problem(r, 404, "not_found", "no such route");
        return;
    }
    json_t *errs = json_array();
    int64_t secs = int_field(r->body, "advance_seconds", -1, 0, 400LL * 86400, errs, "must be 0 to 34560000");
    if (secs < 0 && !json_array_size(errs))
        field_error(errs, "advance_seconds", "is required");
    if (json_array_size(errs)) {
        http_reply_validation(r, errs);
        return;
    }
    json_decref(errs);
    tt_clock_advance(secs * 1000);
    char buf[25];
    http_reply_json(r, 200, json_pack("{ss}", "now", tt_time_format(tt_now_ms(), buf)), NULL);
}

/* ---- operations ------------------------------------------------------------------------ */

static void h_healthz(http_req *r)
{
    tt_server *srv = r->app;
    int up = 0, total = 0;
    links_status(srv->links, &up, &total);
    const char *mqtt = total > 0 && up == total ? "connected" : up > 0 ? "degraded" : "disconnected";
    if (total == 0) /* per-device links and no device yet: nothing to be down */
        mqtt = "connected";
    int ok = atomic_load_explicit(&srv->store_ok, memory_order_relaxed);
    int acl = srv->dynsec ? dynsec_state(srv->dynsec) : DYNSEC_UNKNOWN;
    const char *acl_name = acl == DYNSEC_MANAGED ? "managed" : acl == DYNSEC_UNMANAGED ? "unmanaged" : "unknown";
    json_t *o = json_pack("{ssssssss}", "status", ok ? "ok" : "error", "store", ok ? "ok" : "error", "mqtt", mqtt,
                          "broker_acl", acl_name);
    http_reply_json(r, ok ? 200 : 503, o, NULL);
}

static void h_metrics(http_req *r)
{
    char *text;
    size_t len;
    if (metrics_render(r->app, &text, &len) != 0) {
        http_reply_problem(r, 500, "internal_error", "out of memory");
        return;
    }
    http_reply_text(r, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    free(text);
}

void handlers_on_response(void *app, const char *route, const char *method, int status)
{
    metrics_http(route, method, status);
}

/* ---- table ------------------------------------------------------------------------------ */

static const http_route routes[] = {
    {"GET", "/healthz", h_healthz, 0, 0},
    {"GET", "/metrics", h_metrics, 0, 0},
    {"POST", "/api/v1/messages", h_post_messages, 1, BODY_MAX},
    {"POST", "/api/v1/messages/batch", h_post_batch, 1, 2 * 1024 * 1024},
    {"GET", "/api/v1/messages", h_list_messages, 1, 0},
    {"GET", "/api/v1/messages/{id}", h_get_message, 1, 0},
    {"POST", "/api/v1/devices", h_post_devices, 1, BODY_MAX},
    {"GET", "/api/v1/devices", h_list_devices, 1, 0},
    {"GET", "/api/v1/devices/{id}", h_get_device, 1, 0},
    {"POST", "/api/v1/devices/{id}/messages", h_post_device_messages, 1, BODY_MAX},
    {"DELETE", "/api/v1/messages/{id}", h_cancel_message, 1, 0},
    {"PATCH", "/api/v1/devices/{id}", h_patch_device, 1, BODY_MAX},
    {"DELETE", "/api/v1/devices/{id}", h_delete_device, 1, 0},
    {"POST", "/api/v1/devices/{id}/credentials", h_rotate_device, 1, BODY_MAX},
    {"GET", "/api/v1/devices/{id}/pins", h_list_pins, 1, 0},
    {"DELETE", "/api/v1/devices/{id}/pins", h_reset_pins, 1, 0},
    {"GET", "/api/v1/devices/{id}/pins/{number}", h_get_pin, 1, 0},
    {"DELETE", "/api/v1/devices/{id}/pins/{number}", h_reset_pin, 1, 0},
    {"PATCH", "/api/v1/devices/{id}/pins/{number}", h_patch_pin, 1, BODY_MAX},
    {"POST", "/api/v1/devices/{id}/pins/{number}/safe-word", h_regenerate_pin, 1, BODY_MAX},
    {"POST", "/api/v1/otp/send", h_otp_send, 1, BODY_MAX},
    {"POST", "/api/v1/otp/verify", h_otp_verify, 1, BODY_MAX},
    {"GET", "/api/v1/tokens", h_list_tokens, 1, 0},
    {"POST", "/api/v1/tokens", h_post_token, 1, BODY_MAX},
    {"DELETE", "/api/v1/tokens/{id}", h_delete_token, 1, 0},
    {"POST", "/api/v1/_test/clock", h_test_clock, 1, BODY_MAX},
};

const http_route *handlers_routes(size_t *n)
{
    *n = sizeof(routes) / sizeof(routes[0]);
    return routes;
}

/* Tokens' last use, in memory: two levels of fixed chunks by token id (like
 * the device registry), so a worker records a use with one relaxed store
 * and the router flushes the times to disk once a minute. */
#define TOKUSE_CHUNK_BITS 12
#define TOKUSE_CHUNKS 1024
static _Atomic(_Atomic int64_t *) tokuse[TOKUSE_CHUNKS];

static void token_used(uint64_t id, int64_t now)
{
    uint64_t c = id >> TOKUSE_CHUNK_BITS;
    if (c >= TOKUSE_CHUNKS)
        return;
    _Atomic int64_t *chunk = atomic_load_explicit(&tokuse[c], memory_order_acquire);
    if (!chunk) {
        _Atomic int64_t *fresh = calloc((size_t)1 << TOKUSE_CHUNK_BITS, sizeof(*fresh));
        _Atomic int64_t *expected = NULL;
        if (!fresh)
            return;
        /* acq_rel: publish the zeroed chunk, or see the one that won. */
        if (atomic_compare_exchange_strong_explicit(&tokuse[c], &expected, fresh, memory_order_acq_rel,
                                                    memory_order_acquire))
            chunk = fresh;
        else {
            free(fresh);
            chunk = expected;
        }
    }
    atomic_store_explicit(&chunk[id & ((1u << TOKUSE_CHUNK_BITS) - 1)], now, memory_order_relaxed);
}

int64_t tokens_last_used(uint64_t id)
{
    uint64_t c = id >> TOKUSE_CHUNK_BITS;
    _Atomic int64_t *chunk = c < TOKUSE_CHUNKS ? atomic_load_explicit(&tokuse[c], memory_order_acquire) : NULL;
    return chunk ? atomic_load_explicit(&chunk[id & ((1u << TOKUSE_CHUNK_BITS) - 1)], memory_order_relaxed) : 0;
}

/* Each worker remembers the last token it authenticated (a keep-alive
 * client sends the same one every time), valid while no token was revoked
 * since: a revocation bumps token_gen before it is stored and again before
 * its 204 is sent, so no entry made before the revocation is on disk
 * survives it. */
static _Atomic uint64_t token_gen;
static __thread struct {
    char token[TT_TOKEN_LEN + 1];
    uint64_t account_id, token_id, gen;
} tcache;

void tokens_revoked(void)
{
    /* seq_cst: ordered with the revocation's store write and the cache
     * readers' load of token_gen. */
    atomic_fetch_add_explicit(&token_gen, 1, memory_order_seq_cst);
}

/* Token -> account. Tokens are stored as hashes (API.md 7). */
int handlers_auth(void *app, const char *token, uint64_t *account_id, uint64_t *token_id)
{
    tt_server *srv = app;
    size_t len = strlen(token);
    if (len != TT_TOKEN_LEN || strncmp(token, "tt_", 3) != 0)
        return -1;
    uint64_t gen = atomic_load_explicit(&token_gen, memory_order_seq_cst);
    if (tcache.gen == gen + 1 && tt_equal_ct(tcache.token, token, TT_TOKEN_LEN)) {
        *account_id = tcache.account_id;
        *token_id = tcache.token_id;
        token_used(*token_id, tt_now_ms());
        return 0;
    }
    uint8_t hash[TT_HASH_BYTES], k[KEY_MAX];
    tt_hash(NULL, token, len, hash);
    char *val;
    size_t vlen;
    if (store_get_raw(srv->store, k, key_tokhash(k, hash), &val, &vlen) != 0)
        return -1;
    uint64_t tid = vlen == 8 ? key_get_u64((const uint8_t *)val) : 0;
    rocksdb_free(val);
    tok_rec t = {0};
    if (!tid || store_get(srv->store, k, key_u64(k, K_TOKEN, tid), &tok_schema, &t) != 0)
        return -1;
    int ok = t.hash.len == TT_HASH_BYTES && tt_equal_ct(t.hash.ptr, hash, TT_HASH_BYTES);
    *account_id = t.account_id;
    *token_id = t.id;
    rt_codec_free(&tok_schema, &t);
    if (!ok)
        return -1;
    token_used(*token_id, tt_now_ms());
    memcpy(tcache.token, token, TT_TOKEN_LEN + 1);
    tcache.account_id = *account_id;
    tcache.token_id = *token_id;
    tcache.gen = gen + 1; /* 0 means empty */
    return 0;
}
