/* device.c: the device actor (see device.h for what it owns). */
#include "actors/device.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <sodium.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "actors/persist.h"
#include "actors/proto.h"
#include "server.h"
#include "util/clock.h"
#include "http/metrics.h"
#include "util/log.h"
#include "util/phone.h"
#include "util/safeword.h"
#include "util/sms.h"
#include "util/vec.h"

#define QCAP 256          /* messages held in memory beyond the window */
#define QREFILL 64        /* refill from the store when fewer remain */
#define MAX_TIMEOUTS 3
#define RECENT 512
#define INBOUND_ID_TTL_MS (7LL * 24 * 3600 * 1000)
#define SENTC 128         /* sent messages kept in memory for their delivery report */

typedef struct strvec {
    char **v;
    size_t n, cap;
} strvec;

static int strvec_add(strvec *sv, const char *str)
{
    if (TT_VEC_RESERVE(sv->v, sv->cap, sv->n + 1, 8) != 0)
        return -ENOMEM;
    if (!(sv->v[sv->n] = strdup(str)))
        return -ENOMEM;
    sv->n++;
    return 0;
}

static void strvec_clear(strvec *sv)
{
    for (size_t i = 0; i < sv->n; i++)
        free(sv->v[i]);
    sv->n = 0;
}

static int strvec_has(const strvec *sv, const char *str)
{
    for (size_t i = 0; i < sv->n; i++)
        if (!strcmp(sv->v[i], str))
            return 1;
    return 0;
}

typedef struct reply_post {
    rt_mailbox *to;
    uint64_t corr;
    uint16_t type;
    char *payload;
    size_t len;
} reply_post;

typedef struct post_vec {
    reply_post *v;
    size_t n, cap;
} post_vec;

typedef struct witem {
    msg_rec *rec;
    int64_t deadline;     /* report due by (only counts while online) */
    int timeouts;
    int resend;           /* waiting to be handed over again */
} witem;

typedef struct device {
    tt_server *srv;
    dev_handle *h;
    msg_rec **q;          /* pending, sorted by (priority, id) */
    size_t qn;
    int overflow;         /* the store holds pending messages that q does not */
    witem *win;
    size_t wn, wcap;
    int64_t *sends;       /* ring of recent hand-over times, for pacing */
    size_t sends_cap, sends_n, sends_head;
    int online;
    preq *wr;             /* writes not yet sent to persist */
    rt_envelope *wr_env;  /* built, but persist's mailbox was full */
    int wr_inflight;
    int64_t timer_due;
    uint64_t recent[RECENT]; /* recently finished ids: late notifications are ignored */
    size_t recent_i;
    /* Messages reported sent, awaiting delivered/failed. Their newest state
     * may still be on its way to disk, so reports must not re-read it from
     * the store; the oldest are evicted (by then long committed). */
    msg_rec *sentc[SENTC];
    size_t sentc_i;
    /* Inbound SMS ids to acknowledge on P/ack once stored: those in the
     * write being gathered, and those in the write on its way to disk. */
    strvec acks_next, acks_inflight;
    /* Replies to HTTP requests, sent with the next write's commit. */
    post_vec replies;
    strvec pin_backlog;   /* P/pins payloads not yet published (link down) */
    int deleted;
} device;

static void msg_free(msg_rec *r)
{
    if (!r)
        return;
    rt_codec_free(&msg_schema, r);
    free(r);
}

/* ---- writes ----------------------------------------------------------------- */

static preq *wr(device *d)
{
    if (!d->wr)
        d->wr = preq_new();
    return d->wr;
}

/* Queues the message's new state for the store; dequeue also removes it from
 * the device's store queue (it is no longer pending). */
static void write_msg(device *d, const msg_rec *r, int dequeue)
{
    if (dequeue || r->status != ST_PENDING)
        metrics_message(r->direction == DIR_INBOUND, r->status);
    char *val;
    size_t vlen;
    preq *q = wr(d);
    if (!q || store_encode(&msg_schema, r, &val, &vlen) != 0) {
        LOG_ERROR("device %" PRIu64 ": out of memory recording message %" PRIu64, d->h->id, r->id);
        return;
    }
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64(k, K_MESSAGE, r->id), val, vlen);
    free(val);
    if (dequeue)
        preq_del(q, k, key_queue(k, d->h->id, r->priority, r->id));
}

static void arm(device *d, int64_t due);

/* Sends the accumulated writes when none is outstanding. */
static void flush_writes(device *d)
{
    if (d->wr_inflight)
        return;
    if (!d->wr_env && d->wr && preq_nops(d->wr) > 0) {
        for (size_t i = 0; i < d->replies.n; i++) {
            reply_post *rp = &d->replies.v[i];
            preq_post(d->wr, rp->to, rp->corr, rp->type, REPLY_STORE_FAILED, rp->payload, rp->len);
            free(rp->payload);
        }
        d->replies.n = 0;
        preq_post(d->wr, rt_actor_mailbox(d->h->actor), 0, DEV_PERSISTED, DEV_PERSIST_FAILED, NULL, 0);
        d->wr_env = preq_finish(d->wr);
        d->wr = NULL;
        /* The acks gathered so far ride on this write. */
        strvec t = d->acks_inflight;
        d->acks_inflight = d->acks_next;
        d->acks_next = t;
    }
    if (!d->wr_env)
        return;
    if (rt_send(d->srv->persist, d->wr_env) == 0) {
        d->wr_env = NULL;
        d->wr_inflight = 1;
    } else {
        arm(d, tt_now_ms() + 10);
    }
}

/* ---- queue ------------------------------------------------------------------ */

static int key_less(const msg_rec *a, const msg_rec *b)
{
    return a->priority < b->priority || (a->priority == b->priority && a->id < b->id);
}

static int known(device *d, uint64_t id)
{
    for (size_t i = 0; i < d->wn; i++)
        if (d->win[i].rec->id == id)
            return 1;
    for (size_t i = 0; i < d->qn; i++)
        if (d->q[i]->id == id)
            return 1;
    for (size_t i = 0; i < RECENT; i++)
        if (d->recent[i] == id)
            return 1;
    for (size_t i = 0; i < SENTC; i++)
        if (d->sentc[i] && d->sentc[i]->id == id)
            return 1;
    return 0;
}

/* Inserts r in order; when full, the largest key goes back to the store only. */
static void q_insert(device *d, msg_rec *r)
{
    if (d->qn == QCAP) {
        if (!key_less(r, d->q[QCAP - 1])) {
            d->overflow = 1;
            msg_free(r);
            return;
        }
        msg_free(d->q[--d->qn]);
        d->overflow = 1;
    }
    size_t i = d->qn;
    while (i > 0 && key_less(r, d->q[i - 1])) {
        d->q[i] = d->q[i - 1];
        i--;
    }
    d->q[i] = r;
    d->qn++;
}

static msg_rec *q_pop(device *d)
{
    if (!d->qn)
        return NULL;
    msg_rec *r = d->q[0];
    memmove(d->q, d->q + 1, (d->qn - 1) * sizeof(*d->q));
    d->qn--;
    return r;
}

static int q_remove(device *d, uint64_t id)
{
    for (size_t i = 0; i < d->qn; i++)
        if (d->q[i]->id == id) {
            msg_free(d->q[i]);
            memmove(d->q + i, d->q + i + 1, (d->qn - i - 1) * sizeof(*d->q));
            d->qn--;
            return 1;
        }
    return 0;
}

/* Loads message id from the store into the queue when it is this device's
 * and in status want. Returns 1 once the queue is full (stop scanning). */
static int load_queued(device *d, uint64_t id, uint64_t want)
{
    if (known(d, id))
        return 0;
    msg_rec *r = calloc(1, sizeof(*r));
    uint8_t k[KEY_MAX];
    if (!r || store_get(d->srv->store, k, key_u64(k, K_MESSAGE, id), &msg_schema, r) != 0) {
        free(r);
        return 0;
    }
    if (r->status != want || r->device_id != d->h->id) {
        msg_free(r);
        return 0;
    }
    q_insert(d, r);
    return d->qn >= QCAP;
}

static int refill_one(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    return klen == 18 ? load_queued(arg, key_get_u64(key + 10), ST_PENDING) : 0;
}

/* Loads pending messages from the store queue into memory. */
static void refill(device *d)
{
    if (!d->overflow || d->qn >= QREFILL)
        return;
    uint8_t prefix[KEY_MAX];
    key_u64(prefix, K_QUEUE, d->h->id);
    d->overflow = 0;
    size_t limit = QCAP + d->wn + d->qn + 1;
    int n = store_scan(d->srv->store, prefix, 9, NULL, 0, limit, refill_one, d);
    if (n < 0 || d->qn >= QCAP || (size_t)n >= limit)
        d->overflow = 1;
}

/* ---- finishing ---------------------------------------------------------------- */

static void remember(device *d, uint64_t id)
{
    d->recent[d->recent_i] = id;
    d->recent_i = (d->recent_i + 1) % RECENT;
}

static msg_rec *sentc_find(device *d, uint64_t id, size_t *slot)
{
    for (size_t i = 0; i < SENTC; i++)
        if (d->sentc[i] && d->sentc[i]->id == id) {
            *slot = i;
            return d->sentc[i];
        }
    return NULL;
}

/* Keeps a copy of a sent message (takes ownership of r). */
static void sentc_put(device *d, msg_rec *r)
{
    msg_free(d->sentc[d->sentc_i]);
    d->sentc[d->sentc_i] = r;
    d->sentc_i = (d->sentc_i + 1) % SENTC;
}

static msg_rec *msg_copy(const msg_rec *r)
{
    char *buf;
    size_t len;
    msg_rec *c = calloc(1, sizeof(*c));
    if (!c || rt_codec_encode(&msg_schema, r, &buf, &len) != 0) {
        free(c);
        return NULL;
    }
    int rc = rt_codec_decode(&msg_schema, buf, len, c);
    free(buf);
    if (rc) {
        free(c);
        return NULL;
    }
    return c;
}

/* The message leaves pending: records it and updates the counters. */
static void leave_pending(device *d, msg_rec *r)
{
    write_msg(d, r, 1);
    if (msg_status_final(r->status))
        remember(d, r->id);
    if (r->status == ST_SENT && d->wr) {
        uint8_t k[KEY_MAX];
        preq_put(d->wr, k, key_u64x2(k, K_SENT, d->h->id, r->id), "", 0);
    }
    atomic_fetch_sub_explicit(&d->h->queued, 1, memory_order_relaxed);
    if (r->status == ST_SENT) {
        msg_rec *c = msg_copy(r);
        if (c)
            sentc_put(d, c);
    }
}

/* Records a message that was sent; once final it leaves the sent index. */
static void write_sent(device *d, const msg_rec *r)
{
    write_msg(d, r, 0);
    if (msg_status_final(r->status))
        remember(d, r->id);
    if (msg_status_final(r->status) && d->wr) {
        uint8_t k[KEY_MAX];
        preq_del(d->wr, k, key_u64x2(k, K_SENT, d->h->id, r->id));
    }
}

static void fail_msg(device *d, msg_rec *r, const char *error, int64_t now)
{
    int was_sent = r->status == ST_SENT;
    r->status = ST_FAILED;
    r->failed_at = now;
    free(r->error);
    r->error = strdup(error);
    if (was_sent)
        write_sent(d, r);
    else
        leave_pending(d, r);
    LOG_INFO("message %" PRIu64 " failed on device %" PRIu64 ": %s", r->id, d->h->id, error);
}

static void win_remove(device *d, size_t i)
{
    d->win[i] = d->win[--d->wn];
    atomic_store_explicit(&d->h->inflight, (int64_t)d->wn, memory_order_relaxed);
}

/* ---- dispatch ----------------------------------------------------------------- */

static int64_t rate_wait(device *d, int64_t now)
{
    uint32_t rate = atomic_load_explicit(&d->h->rate_per_minute, memory_order_relaxed);
    if (rate == 0)
        rate = 1;
    if (rate != d->sends_cap) {
        /* The rate changed: keep the most recent hand-overs that still fit. */
        int64_t *v = calloc(rate, sizeof(*v));
        if (!v)
            return now + 1000;
        size_t keep = d->sends_n < rate ? d->sends_n : rate;
        for (size_t i = 0; i < keep; i++) {
            size_t src = (d->sends_head + d->sends_cap - keep + i) % (d->sends_cap ? d->sends_cap : 1);
            v[i] = d->sends[src];
        }
        free(d->sends);
        d->sends = v;
        d->sends_cap = rate;
        d->sends_n = keep;
        d->sends_head = keep % rate;
    }
    if (d->sends_n < d->sends_cap)
        return 0;
    /* Full ring: the oldest of the last `rate` hand-overs must be a minute old. */
    int64_t oldest = d->sends[d->sends_head];
    return oldest + 60000 > now ? oldest + 60000 : 0;
}

static void rate_note(device *d, int64_t now)
{
    d->sends[d->sends_head] = now;
    d->sends_head = (d->sends_head + 1) % d->sends_cap;
    if (d->sends_n < d->sends_cap)
        d->sends_n++;
}

/* Publishes P/send for w. 0, or -ENOTCONN/-EAGAIN (try again later). */
static int hand_over(device *d, witem *w, int64_t now)
{
    msg_rec *r = w->rec;
    /* An OTP's text is stored sealed (the record shows it masked); only the
     * device gets the code. */
    uint8_t *plain = NULL;
    size_t plen = 0;
    if (r->sealed.len) {
        int urc = tt_unseal(d->srv->key, r->sealed.ptr, r->sealed.len, &plain, &plen);
        if (urc == -EINVAL) {
            LOG_ERROR("message %" PRIu64 ": its sealed text does not open with this server key", r->id);
            return -EBADMSG;
        }
        if (urc)
            return -EAGAIN;
    }
    json_t *o = json_pack("{sIssss}", "id", (json_int_t)r->id, "to", r->to ? r->to : "", "message",
                          plain ? (const char *)plain : r->text);
    if (plain) {
        sodium_memzero(plain, plen);
        free(plain);
    }
    if (!o)
        return -EAGAIN;
    if (r->safe_word)
        json_object_set_new(o, "safe_word", json_string(r->safe_word));
    json_object_set_new(o, "attempt", json_integer((json_int_t)r->attempts + 1));
    char *body = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!body)
        return -EAGAIN;
    int rc = links_publish(d->srv->links, d->h->id, "send", body, strlen(body), 0);
    free(body);
    if (rc)
        return rc;
    r->attempts++;
    r->dispatched_at = now;
    w->deadline = now + (int64_t)d->srv->o.dispatch_timeout_s * 1000;
    w->resend = 0;
    rate_note(d, now);
    write_msg(d, r, 0);
    return 0;
}

static void pump(device *d)
{
    int64_t now = tt_now_ms();
    size_t window = (size_t)d->srv->o.window;
    if (d->online) {
        /* Re-sends first: they are already in the window. */
        for (size_t i = 0; i < d->wn; i++) {
            if (!d->win[i].resend)
                continue;
            int64_t wait = rate_wait(d, now);
            if (wait) {
                arm(d, wait);
                goto done;
            }
            int rc = hand_over(d, &d->win[i], now);
            if (rc != 0) {
                if (rc != -ENOTCONN)
                    arm(d, now + 250);
                goto done;
            }
        }
        while (d->wn < window) {
            if (!d->qn) {
                refill(d);
                if (!d->qn)
                    break;
            }
            msg_rec *head = d->q[0];
            if (head->status == ST_PENDING && head->expires_at && head->expires_at <= now) {
                q_pop(d);
                fail_msg(d, head, "expired", now);
                msg_free(head);
                continue;
            }
            int64_t wait = rate_wait(d, now);
            if (wait) {
                arm(d, wait);
                break;
            }
            if (TT_VEC_RESERVE(d->win, d->wcap, d->wn + 1, 16) != 0)
                break;
            witem *w = &d->win[d->wn];
            *w = (witem){head, 0, 0, 1};
            int rc = hand_over(d, w, now);
            if (rc == -EBADMSG) { /* its text cannot be read back: it can never be sent */
                q_pop(d);
                fail_msg(d, head, "unreadable", now);
                msg_free(head);
                continue;
            }
            if (rc != 0) {
                if (rc != -ENOTCONN) /* the link refused for now: try again shortly */
                    arm(d, now + 250);
                break;
            }
            q_pop(d);
            d->wn++;
            atomic_store_explicit(&d->h->inflight, (int64_t)d->wn, memory_order_relaxed);
        }
    }
done:
    refill(d);
}

/* ---- timers ------------------------------------------------------------------- */

static void arm(device *d, int64_t due)
{
    if (d->timer_due && d->timer_due <= due)
        return;
    if (rt_timer_at(d->srv->sched, d->h->actor, due, DEV_TICK, 0) == 0)
        d->timer_due = due;
}

static void rearm(device *d)
{
    int64_t due = 0;
    if (d->online)
        for (size_t i = 0; i < d->wn; i++)
            if (!d->win[i].resend && (!due || d->win[i].deadline < due))
                due = d->win[i].deadline;
    for (size_t i = 0; i < d->qn; i++)
        if (d->q[i]->expires_at && (!due || d->q[i]->expires_at < due))
            due = d->q[i]->expires_at;
    if (due)
        arm(d, due);
}

static void on_tick(device *d)
{
    int64_t now = tt_now_ms();
    d->timer_due = 0;
    if (d->online) {
        for (size_t i = 0; i < d->wn;) {
            witem *w = &d->win[i];
            if (w->resend || w->deadline > now) {
                i++;
                continue;
            }
            w->timeouts++;
            if (w->rec->status == ST_SENT && w->timeouts >= MAX_TIMEOUTS) {
                /* A re-query nobody answered: it stays sent. */
                msg_rec *r = w->rec;
                win_remove(d, i);
                sentc_put(d, r);
                continue;
            }
            if (w->timeouts >= MAX_TIMEOUTS) {
                msg_rec *r = w->rec;
                win_remove(d, i);
                fail_msg(d, r, "device_timeout", now);
                msg_free(r);
                continue;
            }
            LOG_INFO("message %" PRIu64 ": no report from device %" PRIu64 " in time; sending again",
                     w->rec->id, d->h->id);
            w->resend = 1;
            i++;
        }
    }
    /* Expired messages that were never handed over. */
    for (size_t i = 0; i < d->qn;) {
        msg_rec *r = d->q[i];
        if (r->status == ST_PENDING && r->expires_at && r->expires_at <= now) {
            memmove(d->q + i, d->q + i + 1, (d->qn - i - 1) * sizeof(*d->q));
            d->qn--;
            fail_msg(d, r, "expired", now);
            msg_free(r);
            continue;
        }
        i++;
    }
    pump(d);
}

/* ---- packets from the device ---------------------------------------------- */

static void retry_pin_backlog(device *d);

static void set_online(device *d, int online, int64_t now)
{
    if (online == d->online)
        return;
    d->online = online;
    atomic_store_explicit(&d->h->online, online, memory_order_relaxed);
    LOG_INFO("device %" PRIu64 " is %s", d->h->id, online ? "online" : "offline");
    if (online) {
        retry_pin_backlog(d);
        /* Unreported hand-overs go again on reconnect (not a timeout). */
        for (size_t i = 0; i < d->wn; i++)
            d->win[i].resend = 1;
        pump(d);
    }
}

static void save_live(device *d, const char *info, int64_t now)
{
    devlive_rec lr = {1, now, (char *)info};
    char *val;
    size_t vlen;
    preq *q = wr(d);
    if (!q || store_encode(&devlive_schema, &lr, &val, &vlen) != 0)
        return;
    uint8_t k[KEY_MAX];
    preq_put(q, k, key_u64(k, K_DEVLIVE, d->h->id), val, vlen);
    free(val);
}

static void on_status(device *d, const char *payload, size_t len)
{
    int64_t now = tt_now_ms();
    if (len == 0) { /* a cleared retained status */
        set_online(d, 0, now);
        return;
    }
    json_error_t e;
    json_t *o = json_loadb(payload, len, 0, &e);
    json_t *on = o ? json_object_get(o, "online") : NULL;
    if (!o || !json_is_object(o) || !json_is_boolean(on)) {
        LOG_WARN("device %" PRIu64 ": ignoring a status that is not {\"online\":true|false,...}", d->h->id);
        metrics_device_rejected("status");
        json_decref(o);
        return;
    }
    int online = json_is_true(on);
    atomic_store_explicit(&d->h->last_seen_at, now, memory_order_relaxed);
    if (online) {
        char *info = json_dumps(o, JSON_COMPACT);
        save_live(d, info, now);
        free(info);
    }
    json_decref(o);
    set_online(d, online, now);
}

static int parse_status(const char *s, uint64_t *st)
{
    if (!strcmp(s, "sent"))
        *st = ST_SENT;
    else if (!strcmp(s, "delivered"))
        *st = ST_DELIVERED;
    else if (!strcmp(s, "failed"))
        *st = ST_FAILED;
    else
        return -EINVAL;
    return 0;
}

/* Applies a report to r (any state); returns 1 when r changed. Status only
 * moves forward: pending -> sent|delivered|failed, sent -> delivered|failed. */
static int apply_report(msg_rec *r, uint64_t st, const char *error, int64_t now)
{
    if (msg_status_final(r->status) || r->status == st)
        return 0;
    if (r->status == ST_SENT && st == ST_SENT)
        return 0;
    r->status = st;
    if (st == ST_SENT)
        r->sent_at = now;
    else if (st == ST_DELIVERED) {
        r->delivered_at = now;
        if (!r->sent_at)
            r->sent_at = now;
    } else {
        r->failed_at = now;
        free(r->error);
        r->error = strdup(error && *error ? error : "failed");
    }
    return 1;
}

static void on_report(device *d, const char *payload, size_t len)
{
    int64_t now = tt_now_ms();
    atomic_store_explicit(&d->h->last_seen_at, now, memory_order_relaxed);
    json_error_t e;
    json_t *o = json_loadb(payload, len, 0, &e);
    json_t *jid = o ? json_object_get(o, "id") : NULL;
    json_t *jst = o ? json_object_get(o, "status") : NULL;
    json_t *jerr = o ? json_object_get(o, "error") : NULL;
    uint64_t st;
    if (!json_is_object(o) || !json_is_integer(jid) || json_integer_value(jid) <= 0 || !json_is_string(jst) ||
        parse_status(json_string_value(jst), &st) != 0 || (jerr && !json_is_string(jerr) && !json_is_null(jerr))) {
        LOG_WARN("device %" PRIu64 ": ignoring a malformed report", d->h->id);
        metrics_device_rejected("report");
        json_decref(o);
        return;
    }
    uint64_t id = (uint64_t)json_integer_value(jid);
    const char *error = json_is_string(jerr) ? json_string_value(jerr) : NULL;

    for (size_t i = 0; i < d->wn; i++) {
        msg_rec *r = d->win[i].rec;
        if (r->id != id)
            continue;
        win_remove(d, i);
        if (r->status == ST_SENT) { /* a re-query after a restart */
            if (apply_report(r, st, error, now))
                write_sent(d, r);
            if (msg_status_final(r->status))
                msg_free(r);
            else
                sentc_put(d, r);
        } else {
            apply_report(r, st, error, now);
            leave_pending(d, r);
            msg_free(r);
        }
        json_decref(o);
        pump(d);
        return;
    }
    /* A later report for a message reported sent. */
    size_t slot;
    msg_rec *sr = sentc_find(d, id, &slot);
    if (sr) {
        if (apply_report(sr, st, error, now))
            write_sent(d, sr);
        if (msg_status_final(sr->status)) {
            msg_free(sr);
            d->sentc[slot] = NULL;
        }
        json_decref(o);
        return;
    }
    /* Finished here a moment ago: its final state may not be on disk yet. */
    for (size_t i = 0; i < RECENT; i++)
        if (d->recent[i] == id) {
            LOG_INFO("device %" PRIu64 ": late %s report for message %" PRIu64 ", which is final; ignored", d->h->id,
                     json_string_value(jst), id);
            metrics_report_ignored("late");
            json_decref(o);
            return;
        }
    /* Not in memory: a report for a message in the store queue (handed over
     * before a restart), for a sent message evicted from memory, or a stray. */
    msg_rec r = {0};
    uint8_t k[KEY_MAX];
    int rc = store_get(d->srv->store, k, key_u64(k, K_MESSAGE, id), &msg_schema, &r);
    if (rc != 0 || r.device_id != d->h->id || r.direction != DIR_OUTBOUND) {
        LOG_WARN("device %" PRIu64 ": report for message %" PRIu64 " which it does not own; ignored", d->h->id, id);
        metrics_report_ignored("unknown");
    } else if (msg_status_final(r.status)) {
        LOG_INFO("device %" PRIu64 ": late %s report for message %" PRIu64 " which is already %s; ignored",
                 d->h->id, json_string_value(jst), id, msg_status_name(r.status));
        metrics_report_ignored("late");
    } else if (r.status == ST_PENDING) {
        q_remove(d, id);
        if (apply_report(&r, st, error, now))
            leave_pending(d, &r);
    } else if (apply_report(&r, st, error, now)) {
        write_sent(d, &r);
    }
    rt_codec_free(&msg_schema, &r);
    json_decref(o);
    pump(d);
}


/* ---- inbound SMS ------------------------------------------------------------------ */

static void publish_ack(device *d, const char *id)
{
    json_t *o = json_pack("{ss}", "inbound", id);
    char *body = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (body && links_publish(d->srv->links, d->h->id, "ack", body, strlen(body), 0) != 0)
        LOG_DEBUG("device %" PRIu64 ": could not acknowledge inbound %s now; the device will repeat it", d->h->id, id);
    free(body);
}

static int inbound_id_ok(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64)
        return 0;
    for (const char *p = s; *p; p++)
        if (*p < 0x21 || *p > 0x7e)
            return 0;
    return 1;
}

static void ask_router_to_pin(device *d, const char *number)
{
    pin_op p = {d->h->account_id, d->h->id, PIN_INBOUND, (char *)number, NULL};
    rt_envelope *env = rt_codec_envelope(ROUTER_PIN_INBOUND, PROTO_V1, &pin_op_schema, &p);
    if (env && rt_send(d->srv->router, env) != 0) {
        rt_envelope_free(env);
        LOG_WARN("device %" PRIu64 ": router busy; %s not pinned now (its next SMS will pin it)", d->h->id, number);
    }
}

static void on_inbound(device *d, const char *payload, size_t len)
{
    int64_t now = tt_now_ms();
    atomic_store_explicit(&d->h->last_seen_at, now, memory_order_relaxed);
    json_error_t e;
    json_t *o = json_loadb(payload, len, 0, &e);
    json_t *jid = o ? json_object_get(o, "id") : NULL;
    json_t *jfrom = o ? json_object_get(o, "from") : NULL;
    json_t *jmsg = o ? json_object_get(o, "message") : NULL;
    json_t *jat = o ? json_object_get(o, "received_at") : NULL;
    const char *id = json_is_string(jid) && inbound_id_ok(json_string_value(jid)) ? json_string_value(jid) : NULL;
    char number[TT_PHONE_MAX];
    const char *from = NULL;
    int is_phone = 0;
    if (json_is_string(jfrom)) {
        if (tt_phone_normalize(json_string_value(jfrom), number) == 0) {
            from = number;
            is_phone = 1;
        } else if (tt_sender_is_alnum(json_string_value(jfrom))) {
            from = json_string_value(jfrom);
        }
    }
    tt_sms_info info = {0};
    int64_t received_at = 0;
    if (json_is_string(jat) && tt_time_parse(json_string_value(jat), &received_at) != 0)
        received_at = 0;
    if (!json_is_object(o) || (jid && !id) || !from || !json_is_string(jmsg) ||
        tt_sms_analyze(json_string_value(jmsg), json_string_length(jmsg), &info) != 0 ||
        json_string_length(jmsg) == 0) {
        LOG_WARN("device %" PRIu64 ": ignoring a malformed inbound SMS%s%s", d->h->id, id ? " " : "", id ? id : "");
        metrics_device_rejected("inbound");
        if (id)
            publish_ack(d, id); /* so a broken device does not resend it forever */
        json_decref(o);
        return;
    }
    uint8_t k[KEY_MAX];
    if (id) {
        if (strvec_has(&d->acks_next, id) || strvec_has(&d->acks_inflight, id)) {
            json_decref(o); /* stored with the write under way, acknowledged then */
            return;
        }
        char *v;
        size_t vl;
        if (store_get_raw(d->srv->store, k, key_u64_str(k, K_INBOUND, d->h->id, id), &v, &vl) == 0) {
            /* value: message id, time stored. Ids are remembered 7 days
             * (API.md 8): an older one is a new SMS that reuses the id. */
            int64_t at = vl == 16 ? (int64_t)key_get_u64((const uint8_t *)v + 8) : now;
            rocksdb_free(v);
            if (now - at < INBOUND_ID_TTL_MS) {
                publish_ack(d, id); /* a repeat of one already stored */
                json_decref(o);
                return;
            }
        }
    }
    msg_rec r = {0};
    r.v = 1;
    r.id = atomic_fetch_add_explicit(&d->srv->next_message_id, 1, memory_order_relaxed);
    r.account_id = d->h->account_id;
    r.device_id = d->h->id;
    r.direction = DIR_INBOUND;
    r.status = ST_RECEIVED;
    r.from = (char *)from;
    r.text = (char *)json_string_value(jmsg);
    r.routing = RT_NONE;
    r.priority = PRIO_NORMAL;
    r.encoding = info.encoding;
    r.segments = info.segments;
    r.created_at = now;
    r.received_at = received_at;
    r.inbound_id = (char *)id;
    r.safe_word_verified = 0;
    if (is_phone) {
        pin_rec pin = {0};
        if (store_get(d->srv->store, k, key_u64_str(k, K_PIN, d->h->account_id, from), &pin_schema, &pin) == 0) {
            r.safe_word_verified = tt_safeword_matches(r.text, json_string_length(jmsg), pin.safe_word);
            rt_codec_free(&pin_schema, &pin);
        } else {
            ask_router_to_pin(d, from);
        }
    }
    write_msg(d, &r, 0);
    preq *q = wr(d);
    if (q) {
        preq_put(q, k, key_acctmsg(k, r.account_id, r.id), "", 0);
        if (id) {
            uint8_t idv[16];
            key_put_u64(idv, r.id);
            key_put_u64(idv + 8, (uint64_t)now);
            preq_put(q, k, key_u64_str(k, K_INBOUND, d->h->id, id), idv, 16);
            strvec_add(&d->acks_next, id);
        }
    }
    LOG_INFO("device %" PRIu64 ": inbound SMS from %s stored as message %" PRIu64 "%s", d->h->id, from, r.id,
             r.safe_word_verified == 1 ? " (safe word verified)" : "");
    json_decref(o);
}

/* ---- requests from the API ------------------------------------------------------- */

static void queue_reply(device *d, rt_mailbox *to, uint64_t corr, uint16_t type,
                        const void *payload, size_t len)
{
    if (TT_VEC_RESERVE(d->replies.v, d->replies.cap, d->replies.n + 1, 4) != 0)
        return;
    reply_post *rp = &d->replies.v[d->replies.n++];
    rp->to = to;
    rp->corr = corr;
    rp->type = type;
    rp->len = len;
    rp->payload = NULL;
    if (len && (rp->payload = malloc(len)))
        memcpy(rp->payload, payload, len);
}

static void publish_pins(device *d, const char *text)
{
    if (links_publish(d->srv->links, d->h->id, "pins", text, strlen(text), 0) != 0 && d->pin_backlog.n < 10000)
        strvec_add(&d->pin_backlog, text); /* again when the link is back */
}

static void retry_pin_backlog(device *d)
{
    size_t keep = 0;
    for (size_t i = 0; i < d->pin_backlog.n; i++) {
        char *t = d->pin_backlog.v[i];
        if (keep == 0 && links_publish(d->srv->links, d->h->id, "pins", t, strlen(t), 0) == 0)
            free(t);
        else
            d->pin_backlog.v[keep++] = t;
    }
    d->pin_backlog.n = keep;
}

typedef struct failscan {
    device *d;
    int64_t now;
    size_t n;
} failscan;

/* Fails one message found in the device's store indexes (device deleted). */
static int fail_stored(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    failscan *c = arg;
    device *d = c->d;
    uint64_t id = key_get_u64(key + klen - 8);
    if (known(d, id)) /* its newest state is in memory, handled already */
        return 0;
    msg_rec r = {0};
    uint8_t k[KEY_MAX];
    preq *q = wr(d);
    if (!q)
        return 1;
    preq_del(q, key, klen);
    if (store_get(d->srv->store, k, key_u64(k, K_MESSAGE, id), &msg_schema, &r) == 0) {
        if (!msg_status_final(r.status) && r.device_id == d->h->id) {
            r.status = ST_FAILED;
            r.failed_at = c->now;
            free(r.error);
            r.error = strdup("device_deleted");
            write_msg(d, &r, 0);
            c->n++;
        }
        rt_codec_free(&msg_schema, &r);
    }
    return 0;
}

static void on_delete(device *d, const rt_envelope *env)
{
    int64_t now = tt_now_ms();
    dev_reply_to to = {0};
    rt_codec_decode_env(&dev_reply_to_schema, PROTO_V1, env, &to);
    d->deleted = 1;
    /* In memory first (their newest state), then whatever the store holds. */
    for (size_t i = 0; i < d->wn; i++) {
        fail_msg(d, d->win[i].rec, "device_deleted", now);
        msg_free(d->win[i].rec);
    }
    d->wn = 0;
    for (size_t i = 0; i < d->qn; i++) {
        fail_msg(d, d->q[i], "device_deleted", now);
        msg_free(d->q[i]);
    }
    d->qn = 0;
    for (size_t i = 0; i < SENTC; i++)
        if (d->sentc[i]) {
            d->sentc[i]->status = ST_FAILED;
            d->sentc[i]->failed_at = now;
            free(d->sentc[i]->error);
            d->sentc[i]->error = strdup("device_deleted");
            write_sent(d, d->sentc[i]);
            msg_free(d->sentc[i]);
            d->sentc[i] = NULL;
        }
    flush_writes(d);
    failscan c = {d, now, 0};
    uint8_t prefix[KEY_MAX];
    key_u64(prefix, K_QUEUE, d->h->id);
    store_scan(d->srv->store, prefix, 9, NULL, 0, SIZE_MAX, fail_stored, &c);
    key_u64(prefix, K_SENT, d->h->id);
    store_scan(d->srv->store, prefix, 9, NULL, 0, SIZE_MAX, fail_stored, &c);
    uint8_t k[KEY_MAX];
    preq *q = wr(d);
    if (q)
        preq_del(q, k, key_u64(k, K_DEVLIVE, d->h->id)); /* also makes sure the write exists */
    atomic_store_explicit(&d->h->queued, 0, memory_order_relaxed);
    atomic_store_explicit(&d->h->inflight, 0, memory_order_relaxed);
    d->overflow = 0;
    set_online(d, 0, now);
    links_unbind(d->srv->links, d->h->id);
    if (to.mailbox)
        queue_reply(d, (rt_mailbox *)(uintptr_t)to.mailbox, env->corr, REPLY_OK, NULL, 0);
}

static void on_cancel(device *d, const rt_envelope *env)
{
    dev_cancel c = {0};
    if (rt_codec_decode_env(&dev_cancel_schema, PROTO_V1, env, &c) != 0) {
        proto_reply_problem(env, 500, "internal_error", "malformed cancel");
        return;
    }
    int64_t now = tt_now_ms();
    msg_rec *r = NULL, stored = {0};
    size_t slot;
    for (size_t i = 0; i < d->qn; i++)
        if (d->q[i]->id == c.message_id && d->q[i]->status == ST_PENDING) {
            r = d->q[i];
            memmove(d->q + i, d->q + i + 1, (d->qn - i - 1) * sizeof(*d->q));
            d->qn--;
            break;
        }
    int in_window = 0;
    for (size_t i = 0; i < d->wn; i++)
        in_window |= d->win[i].rec->id == c.message_id;
    uint8_t k[KEY_MAX];
    if (!r && !in_window && !sentc_find(d, c.message_id, &slot) &&
        store_get(d->srv->store, k, key_u64(k, K_MESSAGE, c.message_id), &msg_schema, &stored) == 0 &&
        stored.status == ST_PENDING && stored.device_id == d->h->id && !stored.dispatched_at)
        r = &stored;
    if (!r || r->account_id != c.account_id) {
        if (r == &stored || !r)
            rt_codec_free(&msg_schema, &stored);
        else
            q_insert(d, r);
        proto_reply_problem(env, 409, "not_cancellable",
                            "message %" PRIu64 " was already handed to its device or is final", c.message_id);
        return;
    }
    r->status = ST_CANCELLED;
    r->failed_at = 0;
    leave_pending(d, r);
    char *buf;
    size_t len;
    if (rt_codec_encode(&msg_schema, r, &buf, &len) == 0) {
        queue_reply(d, env->reply, env->corr, REPLY_MESSAGE, buf, len);
        free(buf);
    }
    LOG_INFO("message %" PRIu64 " cancelled", r->id);
    (void)now;
    if (r == &stored)
        rt_codec_free(&msg_schema, &stored);
    else
        msg_free(r);
}

static int requery_one(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    return klen == 17 ? load_queued(arg, key_get_u64(key + 9), ST_SENT) : 0;
}

/* At start: a report the device sent before a crash may have been lost with
 * the crash (the client library acknowledges a packet before it is stored).
 * Sent messages are handed over once more; the device does not send them
 * again, it reports their current status (API.md 8). */
static void requery_sent(device *d)
{
    uint8_t prefix[KEY_MAX];
    key_u64(prefix, K_SENT, d->h->id);
    store_scan(d->srv->store, prefix, 9, NULL, 0, QCAP, requery_one, d);
}

/* ---- dispatch -------------------------------------------------------------------- */

static void device_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    device *d = state;
    switch (env->type) {
    case DEV_START: {
        links_bind(d->srv->links, d->h->id);
        d->overflow = 1;
        refill(d);
        requery_sent(d);
        rearm(d);
        break;
    }
    case DEV_MESSAGE: {
        msg_rec *r = calloc(1, sizeof(*r));
        if (!r || rt_codec_decode_env(&msg_schema, PROTO_V1, env, r) != 0) {
            free(r);
            LOG_ERROR("device %" PRIu64 ": malformed message notification", d->h->id);
            break;
        }
        if (atomic_load_explicit(&d->h->deleted, memory_order_relaxed) || known(d, r->id) ||
            r->status != ST_PENDING) {
            msg_free(r);
            break;
        }
        if (d->overflow && d->qn == QCAP && !key_less(r, d->q[QCAP - 1])) {
            msg_free(r); /* the store has it; a refill will bring it */
            break;
        }
        int64_t expires_at = r->expires_at;
        q_insert(d, r); /* may free r: the store keeps it for a refill */
        pump(d);
        if (expires_at)
            arm(d, expires_at);
        break;
    }
    case DEV_MQTT: {
        dev_mqtt m = {0};
        if (rt_codec_decode_env(&dev_mqtt_schema, PROTO_V1, env, &m) != 0)
            break;
        if (m.kind == MQ_STATUS)
            on_status(d, m.payload.ptr, m.payload.len);
        else if (m.kind == MQ_REPORT)
            on_report(d, m.payload.ptr, m.payload.len);
        else if (m.kind == MQ_INBOUND)
            on_inbound(d, m.payload.ptr, m.payload.len);
        rt_codec_free(&dev_mqtt_schema, &m);
        break;
    }
    case DEV_LINK: {
        dev_link l = {0};
        if (rt_codec_decode_env(&dev_link_schema, PROTO_V1, env, &l) == 0) {
            if (!l.up)
                set_online(d, 0, tt_now_ms());
            else
                retry_pin_backlog(d);
        }
        break;
    }
    case DEV_TICK:
        on_tick(d);
        break;
    case DEV_PERSISTED:
        d->wr_inflight = 0;
        for (size_t i = 0; i < d->acks_inflight.n; i++)
            publish_ack(d, d->acks_inflight.v[i]);
        strvec_clear(&d->acks_inflight);
        break;
    case DEV_PERSIST_FAILED:
        /* The store is failing (the server reports it in /healthz); the
         * state stays in memory and later writes carry it again. Inbound
         * SMS are not acknowledged: the device sends them again. */
        d->wr_inflight = 0;
        strvec_clear(&d->acks_inflight);
        LOG_ERROR("device %" PRIu64 ": a state write failed", d->h->id);
        break;
    case DEV_PIN_PUBLISH: {
        dev_text t = {0};
        if (rt_codec_decode_env(&dev_text_schema, PROTO_V1, env, &t) == 0 && !d->deleted)
            publish_pins(d, t.text);
        rt_codec_free(&dev_text_schema, &t);
        break;
    }
    case DEV_DELETE:
        on_delete(d, env);
        break;
    case DEV_KICK:
        /* New credentials: the broker closed the old session without its
         * Last Will, so the device is offline until it reconnects. */
        set_online(d, 0, tt_now_ms());
        break;
    case DEV_CANCEL:
        on_cancel(d, env);
        break;
    default:
        LOG_WARN("device %" PRIu64 ": unknown message type %u", d->h->id, (unsigned)env->type);
    }
    rt_envelope_free(env);
}

static void device_batch_end(rt_actor *self, void *state)
{
    device *d = state;
    flush_writes(d);
    rearm(d);
}

static void device_stopped(rt_actor *self, void *state)
{
    device *d = state;
    for (size_t i = 0; i < d->qn; i++)
        msg_free(d->q[i]);
    for (size_t i = 0; i < d->wn; i++)
        msg_free(d->win[i].rec);
    for (size_t i = 0; i < SENTC; i++)
        msg_free(d->sentc[i]);
    strvec_clear(&d->acks_next);
    strvec_clear(&d->acks_inflight);
    strvec_clear(&d->pin_backlog);
    free(d->acks_next.v);
    free(d->acks_inflight.v);
    free(d->pin_backlog.v);
    for (size_t i = 0; i < d->replies.n; i++)
        free(d->replies.v[i].payload);
    free(d->replies.v);
    free(d->q);
    free(d->win);
    free(d->sends);
    preq_free(d->wr);
    if (d->wr_env)
        rt_envelope_free(d->wr_env);
    free(d->h);
    free(d);
}

static const rt_actor_ops device_ops = {device_dispatch, device_batch_end, device_stopped};

dev_handle *device_spawn(tt_server *srv, uint64_t id, uint64_t account_id, uint32_t rate, int64_t queued,
                         int64_t last_seen_at, int64_t pins)
{
    device *d = calloc(1, sizeof(*d));
    dev_handle *h = calloc(1, sizeof(*h));
    if (d)
        d->q = calloc(QCAP, sizeof(*d->q));
    if (!d || !h || !d->q)
        goto fail;
    h->id = id;
    h->account_id = account_id;
    atomic_init(&h->queued, queued);
    atomic_init(&h->last_seen_at, last_seen_at);
    atomic_init(&h->rate_per_minute, rate);
    atomic_init(&h->pins, pins);
    d->srv = srv;
    d->h = h;
    h->actor = rt_actor_new(srv->sched, "device", 256, &device_ops, d);
    if (!h->actor)
        goto fail;
    if (devreg_put(&srv->reg, id, h) != 0)
        goto fail; /* the actor is owned by the scheduler and freed with it */
    rt_envelope *env = rt_envelope_new(DEV_START, PROTO_V1, NULL, 0);
    if (!env || rt_send(h->actor, env) != 0) {
        if (env)
            rt_envelope_free(env);
        LOG_ERROR("device %" PRIu64 ": could not start", id);
    }
    return h;
fail:
    if (d)
        free(d->q);
    free(d);
    free(h);
    return NULL;
}

int device_offer_packet(tt_server *srv, uint64_t device_id, int kind, const void *payload, size_t len)
{
    dev_handle *h = devreg_get(&srv->reg, device_id);
    if (!h || atomic_load_explicit(&h->deleted, memory_order_relaxed))
        return 1; /* not ours (any more): drop */
    dev_mqtt m = {(uint64_t)kind, {(void *)payload, len}};
    rt_envelope *env = rt_codec_envelope(DEV_MQTT, PROTO_V1, &dev_mqtt_schema, &m);
    if (!env)
        return 0;
    if (rt_send(h->actor, env) != 0) {
        rt_envelope_free(env);
        return 0;
    }
    return 1;
}

void device_link_changed(tt_server *srv, uint64_t device_id, int up)
{
    dev_handle *h = devreg_get(&srv->reg, device_id);
    if (!h)
        return;
    dev_link l = {up != 0};
    rt_envelope *env = rt_codec_envelope(DEV_LINK, PROTO_V1, &dev_link_schema, &l);
    /* A lost "link down" would leave the device looking online while its link
     * is gone; retry briefly, the mailbox drains fast. */
    for (int i = 0; env && i < 1000; i++) {
        if (rt_send(h->actor, env) == 0)
            return;
        struct timespec ts = {0, 1000000L};
        nanosleep(&ts, NULL);
    }
    if (env) {
        rt_envelope_free(env);
        LOG_ERROR("device %" PRIu64 ": could not deliver a link change", device_id);
    }
}
