/* otp.c: the OTP actor (see otp.h). */
#include "actors/otp.h"

#include <errno.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/persist.h"
#include "actors/proto.h"
#include "server.h"
#include "util/clock.h"
#include "util/crypto.h"
#include "util/log.h"
#include "util/phone.h"
#include "util/sms.h"

#define MAX_ATTEMPTS 5
#define COOLDOWN_MS 30000
#define WINDOW_MS 3600000
#define MAX_SENDS 5

/* What is stored per (account, number). */
typedef struct otp_rec {
    uint64_t v;
    rt_bin hash;          /* keyed hash of the code; empty: no code */
    int64_t expires_at;
    uint64_t attempts;    /* wrong tries */
    bool used;
    uint64_t length;
    rt_bin sends;         /* up to MAX_SENDS send times (int64, oldest first) */
} otp_rec;

static const rt_field otp_fields[] = {
    RT_FIELD(otp_rec, v, RT_F_U64),
    RT_FIELD(otp_rec, hash, RT_F_BIN),
    RT_FIELD(otp_rec, expires_at, RT_F_I64),
    RT_FIELD(otp_rec, attempts, RT_F_U64),
    RT_FIELD(otp_rec, used, RT_F_BOOL),
    RT_FIELD(otp_rec, length, RT_F_U64),
    RT_FIELD(otp_rec, sends, RT_F_BIN),
};
static const rt_schema otp_schema = RT_SCHEMA("otp", otp_fields);

typedef struct entry {
    uint64_t account_id;
    char number[TT_PHONE_MAX];
    uint8_t hash[TT_HASH_BYTES];
    int has_code;
    int64_t expires_at;
    uint32_t attempts;
    int used;
    uint32_t length;
    int64_t sends[MAX_SENDS];
    uint32_t nsends;
    int sending;          /* a send waits for the router */
    int64_t touched;
    struct entry *next;
} entry;

/* A send waiting for the router to store its message. */
typedef struct pending {
    uint64_t corr;
    entry *e;
    rt_mailbox *reply;
    uint64_t reply_corr;
    uint8_t hash[TT_HASH_BYTES];
    int64_t expires_at;
    uint32_t length;
    char *idem_key;
    uint8_t idem_hash[TT_HASH_BYTES];
    int has_idem;
    struct pending *next;
} pending;

typedef struct otp {
    tt_server *srv;
    rt_actor *self;
    entry **buckets;
    size_t nbuckets, size;
    size_t sweep_at;      /* entries in memory that trigger forgetting idle ones */
    pending *waiting;
    uint64_t next_corr;
} otp;

/* ---- entries ------------------------------------------------------------- */

static uint64_t ehash(uint64_t account_id, const char *number)
{
    uint64_t h = 1469598103934665603ULL ^ account_id;
    for (const unsigned char *p = (const unsigned char *)number; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return h;
}

static int grow(otp *o)
{
    size_t n = o->nbuckets ? o->nbuckets * 2 : 1024;
    entry **b = calloc(n, sizeof(*b));
    if (!b)
        return -ENOMEM;
    for (size_t i = 0; i < o->nbuckets; i++)
        for (entry *e = o->buckets[i], *nx; e; e = nx) {
            nx = e->next;
            size_t j = ehash(e->account_id, e->number) & (n - 1);
            e->next = b[j];
            b[j] = e;
        }
    free(o->buckets);
    o->buckets = b;
    o->nbuckets = n;
    return 0;
}

#define IDLE_MS (10 * 60000)

/* Forgets entries idle for ten minutes (their state is on disk long since;
 * a later request loads it again), so memory follows recent activity, not
 * every number ever seen. */
static void sweep(otp *o, int64_t now)
{
    for (size_t i = 0; i < o->nbuckets; i++)
        for (entry **pe = &o->buckets[i]; *pe;) {
            entry *e = *pe;
            if (!e->sending && now - e->touched > IDLE_MS) {
                *pe = e->next;
                sodium_memzero(e, sizeof(*e));
                free(e);
                o->size--;
            } else {
                pe = &e->next;
            }
        }
    o->sweep_at = o->size * 2 > 4096 ? o->size * 2 : 4096;
}

/* The entry of (account, number): in memory, else loaded from the store,
 * else new. NULL on ENOMEM. */
static entry *get_entry(otp *o, uint64_t account_id, const char *number)
{
    for (entry *e = o->buckets[ehash(account_id, number) & (o->nbuckets - 1)]; e; e = e->next)
        if (e->account_id == account_id && !strcmp(e->number, number))
            return e;
    if (o->size >= o->sweep_at)
        sweep(o, tt_now_ms());
    if (o->size * 2 >= o->nbuckets && grow(o) != 0)
        return NULL;
    entry *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->account_id = account_id;
    snprintf(e->number, sizeof(e->number), "%s", number);
    otp_rec r = {0};
    uint8_t k[KEY_MAX];
    if (store_get(o->srv->store, k, key_u64_str(k, K_OTP, account_id, number), &otp_schema, &r) == 0) {
        if (r.hash.len == TT_HASH_BYTES) {
            memcpy(e->hash, r.hash.ptr, TT_HASH_BYTES);
            e->has_code = 1;
        }
        e->expires_at = r.expires_at;
        e->attempts = (uint32_t)r.attempts;
        e->used = r.used;
        e->length = (uint32_t)r.length;
        e->nsends = (uint32_t)(r.sends.len / sizeof(int64_t));
        if (e->nsends > MAX_SENDS)
            e->nsends = MAX_SENDS;
        if (e->nsends)
            memcpy(e->sends, r.sends.ptr, e->nsends * sizeof(int64_t));
        rt_codec_free(&otp_schema, &r);
    }
    size_t j = ehash(account_id, number) & (o->nbuckets - 1);
    e->next = o->buckets[j];
    o->buckets[j] = e;
    o->size++;
    return e;
}

static int write_entry(preq *q, const entry *e)
{
    otp_rec r = {1, {e->has_code ? (void *)e->hash : NULL, e->has_code ? TT_HASH_BYTES : 0}, e->expires_at,
                 e->attempts, e->used, e->length, {(void *)e->sends, e->nsends * sizeof(int64_t)}};
    char *val;
    size_t vlen;
    if (rt_codec_encode(&otp_schema, &r, &val, &vlen) != 0)
        return -ENOMEM;
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64_str(k, K_OTP, e->account_id, e->number), val, vlen);
    free(val);
    return 0;
}

/* Keyed hash of a code, bound to its account and number. */
static void code_hash(const otp *o, const entry *e, const char *code, uint8_t out[TT_HASH_BYTES])
{
    char buf[96];
    int n = snprintf(buf, sizeof(buf), "%" PRIu64 "|%s|%s", e->account_id, e->number, code);
    tt_hash(o->srv->key, buf, (size_t)n, out);
    sodium_memzero(buf, sizeof(buf));
}

/* ---- send ---------------------------------------------------------------- */

/* The template with {code} and {minutes} filled in. */
static char *render(const char *tpl, const char *code, uint64_t minutes)
{
    size_t cap = strlen(tpl) + 64, n = 0;
    char *out = malloc(cap);
    if (!out)
        return NULL;
    for (const char *p = tpl; *p;) {
        char tmp[32];
        const char *ins = NULL;
        if (!strncmp(p, "{code}", 6)) {
            ins = code;
            p += 6;
        } else if (!strncmp(p, "{minutes}", 9)) {
            snprintf(tmp, sizeof(tmp), "%" PRIu64, minutes);
            ins = tmp;
            p += 9;
        }
        size_t add = ins ? strlen(ins) : 1;
        if (n + add + 1 > cap) {
            cap = (n + add + 1) * 2;
            char *v = realloc(out, cap);
            if (!v) {
                free(out);
                return NULL;
            }
            out = v;
        }
        if (ins) {
            memcpy(out + n, ins, add);
        } else {
            out[n] = *p++;
        }
        n += add;
    }
    out[n] = 0;
    return out;
}

/* Seconds until a send would be allowed, or 0 when allowed now. */
static int64_t limited_for(const entry *e, int64_t now)
{
    int64_t wait = 0;
    if (e->nsends) {
        int64_t last = e->sends[e->nsends - 1];
        if (now - last < COOLDOWN_MS)
            wait = last + COOLDOWN_MS - now;
    }
    uint32_t in_window = 0;
    for (uint32_t i = 0; i < e->nsends; i++)
        in_window += now - e->sends[i] < WINDOW_MS;
    if (in_window >= MAX_SENDS) {
        int64_t oldest = e->sends[e->nsends - MAX_SENDS];
        int64_t w = oldest + WINDOW_MS - now;
        if (w > wait)
            wait = w;
    }
    return wait > 0 ? (wait + 999) / 1000 : 0;
}

static void on_send(otp *o, rt_envelope *env)
{
    otp_send s = {0};
    if (rt_codec_decode_env(&otp_send_schema, PROTO_V1, env, &s) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed OTP send");
        return;
    }
    int64_t now = tt_now_ms();
    entry *e = get_entry(o, s.account_id, s.number);
    pending *p = calloc(1, sizeof(*p));
    char code[16], mask[16];
    char *text = NULL, *masked = NULL;
    uint8_t *sealed = NULL;
    size_t slen = 0;
    if (!e || !p) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    e->touched = now;
    if (e->sending) {
        proto_reply_limited(env, COOLDOWN_MS / 1000, "a code is being sent to this number; wait before sending again");
        goto out;
    }
    int64_t wait = limited_for(e, now);
    if (wait) {
        char detail[160];
        snprintf(detail, sizeof(detail),
                 "at most one code every 30 seconds and 5 an hour per number; retry in %" PRId64 " s", wait);
        proto_reply_limited(env, (uint64_t)wait, detail);
        goto out;
    }
    /* Uniform over all digits: one CSPRNG draw per digit. */
    for (uint64_t i = 0; i < s.length; i++) {
        code[i] = (char)('0' + tt_random_uniform(10));
        mask[i] = '*';
    }
    code[s.length] = mask[s.length] = 0;
    text = render(o->srv->o.otp_template, code, s.minutes);
    masked = render(o->srv->o.otp_template, mask, s.minutes);
    tt_sms_info info = {0};
    if (!text || !masked || tt_sms_analyze(text, strlen(text), &info) != 0 ||
        tt_seal(o->srv->key, text, strlen(text), &sealed, &slen) != 0) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    code_hash(o, e, code, p->hash);
    p->corr = ++o->next_corr;
    p->e = e;
    p->reply = env->reply;
    p->reply_corr = env->corr;
    p->expires_at = now + (int64_t)s.minutes * 60000;
    p->length = (uint32_t)s.length;
    if (s.idem_key && s.idem_hash.len == TT_HASH_BYTES) {
        p->idem_key = strdup(s.idem_key);
        memcpy(p->idem_hash, s.idem_hash.ptr, TT_HASH_BYTES);
        p->has_idem = p->idem_key != NULL;
    }
    submit sub = {0};
    sub.account_id = s.account_id;
    sub.device_id = s.device_id;
    sub.to = s.number;
    sub.text = masked;
    sub.priority = PRIO_HIGH;
    sub.ttl_s = (int64_t)s.minutes * 60;
    sub.encoding = info.encoding;
    sub.segments = info.segments;
    sub.sealed = (rt_bin){sealed, slen};
    /* A failure the router answers is this request's answer too (stored
     * for the key); a success is answered, and stored, here. */
    sub.idem_key = s.idem_key;
    sub.idem_route = IDEM_OTP;
    sub.idem_hash = s.idem_hash;
    sub.idem_failures_only = true;
    rt_envelope *req = rt_codec_envelope(ROUTER_SUBMIT, PROTO_V1, &submit_schema, &sub);
    if (!req) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    req->reply = rt_actor_mailbox(o->self);
    req->corr = p->corr;
    if (rt_send(o->srv->router, req) != 0) {
        rt_envelope_free(req);
        proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        goto out;
    }
    e->sending = 1;
    p->next = o->waiting;
    o->waiting = p;
    p = NULL;
out:
    if (p) {
        free(p->idem_key);
        free(p);
    }
    sodium_memzero(code, sizeof(code));
    if (text) {
        sodium_memzero(text, strlen(text));
        free(text);
    }
    free(masked);
    free(sealed);
    rt_codec_free(&otp_send_schema, &s);
}

/* The router answered a send: stored (the code becomes current) or refused
 * (the code in place stays, no quota is used). */
static void on_router_reply(otp *o, rt_envelope *env)
{
    pending **pp = &o->waiting, *p;
    while ((p = *pp) && p->corr != env->corr)
        pp = &p->next;
    if (!p) {
        LOG_WARN("otp: an answer for no send in progress");
        return;
    }
    *pp = p->next;
    entry *e = p->e;
    e->sending = 0;
    rt_envelope fwd = *env;
    fwd.reply = p->reply;
    fwd.corr = p->reply_corr;
    msg_rec m = {0};
    if (env->type != REPLY_MESSAGE || rt_codec_decode_env(&msg_schema, PROTO_V1, env, &m) != 0) {
        /* Forward the refusal as is (a problem, or store failure). */
        rt_envelope *r = rt_envelope_new(env->type, env->version, env->data, env->len);
        if (r) {
            r->corr = p->reply_corr;
            if (rt_mailbox_push(p->reply, r) != 0)
                rt_envelope_free(r);
        }
        goto out;
    }
    int64_t now = tt_now_ms();
    memcpy(e->hash, p->hash, TT_HASH_BYTES);
    e->has_code = 1;
    e->expires_at = p->expires_at;
    e->attempts = 0;
    e->used = 0;
    e->length = p->length;
    if (e->nsends == MAX_SENDS) {
        memmove(e->sends, e->sends + 1, (MAX_SENDS - 1) * sizeof(int64_t));
        e->nsends--;
    }
    e->sends[e->nsends++] = now;
    otp_reply rep = {e->number, m.id, e->expires_at, e->length};
    char *buf = NULL;
    size_t len = 0;
    preq *q = preq_new();
    if (!q || write_entry(q, e) != 0 || rt_codec_encode(&otp_reply_schema, &rep, &buf, &len) != 0) {
        preq_free(q);
        proto_reply_problem(&fwd, 503, "overloaded", "out of memory");
        goto out_m;
    }
    if (p->has_idem) {
        rt_bin h = {p->idem_hash, TT_HASH_BYTES};
        idem_put(q, e->account_id, IDEM_OTP, p->idem_key, &h, 202, REPLY_OTP, buf, len);
    }
    preq_post(q, p->reply, p->reply_corr, REPLY_OTP, REPLY_STORE_FAILED, buf, len);
    rt_envelope *w = preq_finish(q);
    if (!w || rt_send(o->srv->persist, w) != 0) {
        if (w)
            rt_envelope_free(w);
        proto_reply_problem(&fwd, 503, "overloaded", "the server is busy; retry shortly");
    }
    free(buf);
out_m:
    rt_codec_free(&msg_schema, &m);
out:
    free(p->idem_key);
    free(p);
}

/* ---- verify -------------------------------------------------------------- */

static void on_verify(otp *o, rt_envelope *env)
{
    otp_verify v = {0};
    if (rt_codec_decode_env(&otp_verify_schema, PROTO_V1, env, &v) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed OTP verify");
        return;
    }
    int64_t now = tt_now_ms();
    entry *e = get_entry(o, v.account_id, v.number);
    verify_reply r = {false, NULL, -1};
    int changed = 0;
    if (!e) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    e->touched = now;
    if (!e->has_code || e->used) {
        r.reason = "not_found";
    } else if (e->attempts >= MAX_ATTEMPTS) {
        r.reason = "too_many_attempts";
    } else if (now >= e->expires_at) {
        r.reason = "expired";
    } else {
        uint8_t h[TT_HASH_BYTES];
        code_hash(o, e, v.code, h);
        if (strlen(v.code) == e->length && tt_equal_ct(h, e->hash, TT_HASH_BYTES)) {
            r.verified = true;
            e->used = 1; /* a code verifies once */
        } else {
            e->attempts++;
            r.reason = "invalid_code";
            r.attempts_left = MAX_ATTEMPTS - (int64_t)e->attempts;
        }
        changed = 1;
    }
    char *buf;
    size_t len;
    if (rt_codec_encode(&verify_reply_schema, &r, &buf, &len) != 0) {
        proto_reply_problem(env, 503, "overloaded", "out of memory");
        goto out;
    }
    if (!changed) {
        proto_reply(env, REPLY_VERIFY, &verify_reply_schema, &r);
    } else {
        /* The answer waits for the new state to be on disk, so a crash
         * cannot give a used code (or a spent attempt) back. */
        preq *q = preq_new();
        rt_envelope *w = NULL;
        if (q && write_entry(q, e) == 0) {
            preq_post(q, env->reply, env->corr, REPLY_VERIFY, REPLY_STORE_FAILED, buf, len);
            w = preq_finish(q);
            q = NULL;
        }
        preq_free(q);
        if (!w || rt_send(o->srv->persist, w) != 0) {
            if (w)
                rt_envelope_free(w);
            proto_reply_problem(env, 503, "overloaded", "the server is busy; retry shortly");
        }
    }
    free(buf);
out:
    rt_codec_free(&otp_verify_schema, &v);
}

/* ---- actor --------------------------------------------------------------- */

static void otp_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    otp *o = state;
    switch (env->type) {
    case OTP_SEND:
        on_send(o, env);
        break;
    case OTP_VERIFY:
        on_verify(o, env);
        break;
    case REPLY_MESSAGE:
    case REPLY_PROBLEM:
    case REPLY_STORE_FAILED:
        on_router_reply(o, env);
        break;
    default:
        LOG_WARN("otp: unknown message type %u", (unsigned)env->type);
        proto_reply_problem(env, 500, "internal_error", "unknown request");
    }
    rt_envelope_free(env);
}

static void otp_stopped(rt_actor *self, void *state)
{
    otp *o = state;
    for (size_t i = 0; i < o->nbuckets; i++)
        for (entry *e = o->buckets[i], *n; e; e = n) {
            n = e->next;
            sodium_memzero(e, sizeof(*e));
            free(e);
        }
    for (pending *p = o->waiting, *n; p; p = n) {
        n = p->next;
        free(p->idem_key);
        free(p);
    }
    free(o->buckets);
    free(o);
}

static const rt_actor_ops otp_ops = {otp_dispatch, NULL, otp_stopped};

rt_actor *otp_new(tt_server *srv)
{
    otp *o = calloc(1, sizeof(*o));
    if (!o || grow(o) != 0) {
        free(o);
        return NULL;
    }
    o->srv = srv;
    o->sweep_at = 4096;
    rt_actor *a = rt_actor_new(srv->sched, "otp", 1024, &otp_ops, o);
    if (!a) {
        free(o->buckets);
        free(o);
        return NULL;
    }
    o->self = a;
    return a;
}
