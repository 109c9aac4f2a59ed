/* tt-devsim: simulated gateway devices speaking the device protocol (API.md 8).
 *
 * One process runs one device or a fleet of them (about a thousand), each on
 * its own paho MQTTAsync client with the credentials the server issued. A
 * device "sends" every SMS the server hands it on P/send, reports it on
 * P/report, never sends an id twice (it re-reports instead), publishes inbound
 * SMS until the server acknowledges them on P/ack, and keeps its retained
 * P/status and Last Will. Events go to stdout as one JSON object per line, so
 * tests and benchmarks can follow what the device saw; diagnostics go to
 * stderr.
 *
 * --misbehave makes a device break the protocol on purpose (garbage payloads,
 * reports for ids it was never given, repeated or reordered reports, a storm
 * of abrupt reconnects), so tests can check that the server survives a broken
 * or hostile device. Each act prints a "misbehave" event.
 *
 * Threads: paho runs every callback on its own two threads while holding its
 * global lock, and any API call from another thread takes that lock. So a
 * device's mutex is only ever taken briefly and never held across a paho
 * call, or a callback waiting for it would deadlock with our thread waiting
 * for paho. The main thread runs the timers: delayed reports, inbound
 * re-publishing, the exit conditions and the orderly shutdown. */
#define _GNU_SOURCE
#include "devsim_seen.h"

#include <MQTTAsync.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define SEEN_MAX 100000          /* ids remembered per device */
#define UNSETTLED_MAX 100000     /* failed report publishes kept for a retry */
#define INBOUND_REPEAT_MS 30000  /* re-publish unacknowledged inbound SMS */
#define SHUTDOWN_WAIT_MS 5000    /* per shutdown step */
#define DROP_WAIT_MS 10000       /* --drop-after: longest wait for PUBACKs */
#define FAIL_ERROR_MAX 200
#define INBOUND_ID_MAX 64        /* API.md 8: 1 to 64 printable ASCII */
#define UNKNOWN_ID_OFFSET 1000000 /* --misbehave unknown-ids: id + this */
#define REPEAT_COPIES 3          /* --misbehave repeat */
#define STORM_DEFAULT 5          /* --misbehave storm without --storm N */
#define STORM_HOLD_MS 50         /* storm: time online before the drop */
#define STORM_GAP_MS 50          /* storm: time offline before reconnecting */
#define STORM_IO_TIMEOUT_S 5     /* storm: socket send/receive timeout */

enum report_mode { REPORT_DELIVERED, REPORT_SENT, REPORT_FAILED, REPORT_NONE };

/* --misbehave modes, a bit each. */
enum {
    MIS_GARBAGE = 1 << 0,
    MIS_UNKNOWN_IDS = 1 << 1,
    MIS_FOREIGN_IDS = 1 << 2,
    MIS_REPEAT = 1 << 3,
    MIS_OUT_OF_ORDER = 1 << 4,
    MIS_STORM = 1 << 5,
};

static const struct {
    const char *name;
    int bit;
} mis_modes[] = {
    { "garbage", MIS_GARBAGE },
    { "unknown-ids", MIS_UNKNOWN_IDS },
    { "foreign-ids", MIS_FOREIGN_IDS },
    { "repeat", MIS_REPEAT },
    { "out-of-order", MIS_OUT_OF_ORDER },
    { "storm", MIS_STORM },
};

struct inbound {
    char id[INBOUND_ID_MAX + 1];
    char *from, *message;
    char received_at[32];
    int acked;
    int announced;       /* its "inbound" event was printed */
    int64_t last_pub_ms; /* monotonic; 0 = never published */
};

struct device {
    int64_t id;
    char *url, *client_id, *username, *password, *prefix;
    char *t_status, *t_send, *t_pins, *t_ack, *t_report, *t_inbound;
    MQTTAsync client;
    int created;
    MQTTAsync_willOptions will;

    pthread_mutex_t mu; /* guards the fields below; never held across a paho call */
    struct seen_set seen;
    int online;         /* subscribed and announced online */
    int connect_failures;
    int connects;       /* paho connections announced online so far */
    struct inbound *inb;
    size_t n_inb;
    int64_t *unsettled; /* ids whose last report publish failed */
    size_t n_unsettled, cap_unsettled;
};

struct inbound_spec {
    char *from, *text;
    const char *id; /* --inbound-id, or NULL for a generated one */
};

/* Configuration: written by main before any client exists, read-only after. */
static struct {
    struct device *devs;
    size_t n_devs;
    const char *url;
    enum report_mode report;
    const char *fail_error;
    char *fail_error_json; /* the error text as a JSON string literal */
    long report_delay_ms;
    long drop_after, exit_after; /* 0 = off */
    double duration_s;
    int quiet;
    struct inbound_spec *inbound;
    size_t n_inbound;
    long inbound_repeat;  /* copies of each inbound at its first publish */
    int misbehave;        /* MIS_* bits */
    long foreign_id;      /* --foreign-id, 0 = unset */
    long storm;           /* abrupt drops at start, 0 = no storm */
} cfg;

/* Tallies for the summary: relaxed, nothing is published through them. */
static atomic_long n_dups, n_reports, n_inbound_pub, n_acks, n_pins;
/* Distinct sends handled, process-wide; the --drop-after/--exit-after limit
 * is claimed on it (sequentially consistent, see n_owed). */
static atomic_long n_sends;
/* Reports owed to the broker: publishes awaiting their PUBACK, failed ones
 * waiting in a retry list for a reconnect, delayed ones in the heap, and the
 * ones of a send being handled right now. Every step takes its unit before it
 * gives up the previous one, so the count reaches 0 only when everything
 * reported was acknowledged. Sequentially consistent, together with n_sends:
 * a send takes its unit here before it counts itself in n_sends, so once the
 * main thread sees the send limit reached it cannot miss that send's unit. */
static atomic_long n_owed;
/* Set once no new send may be handled (shutdown, --drop-after/--exit-after
 * reached). Relaxed: a send racing with the flag is harmless either way. */
static atomic_int stopping;
/* Shutdown publishes and disconnects not yet completed: only waited on,
 * nothing is published through it, so relaxed. */
static atomic_long shutdown_pending;
static volatile sig_atomic_t got_signal;

static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

/* Delayed reports, a min-heap on due time, owned under heap_mu. */
struct timed_report {
    int64_t due_ms;
    struct device *d;
    int64_t id;
};
static pthread_mutex_t heap_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t heap_cv;
static struct timed_report *heap;
static size_t heap_len, heap_cap;

/* ---------------------------------------------------------------- helpers */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* RFC 3339 UTC with milliseconds, as the API writes times. buf >= 32 bytes. */
static void rfc3339_now(char *buf, size_t len)
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, len - n, ".%03ldZ", ts.tv_nsec / 1000000);
}

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char ts[32], line[1024];
    va_list ap;
    rfc3339_now(ts, sizeof ts);
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s tt-devsim: %s\n", ts, line);
}

/* Per-device chatter: silenced by --quiet (warnings are not). */
#define LOG_INFO(...) do { if (!cfg.quiet) logmsg(__VA_ARGS__); } while (0)

static char *xstrdup(const char *s)
{
    return s ? strdup(s) : NULL;
}

static char *join(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *s = malloc(la + lb + 1);
    if (s) {
        memcpy(s, a, la);
        memcpy(s + la, b, lb + 1);
    }
    return s;
}

/* Prints one event line (steals ev). Events are built only when not quiet. */
static void emit(json_t *ev)
{
    if (!ev)
        return;
    char *s = json_dumps(ev, JSON_COMPACT);
    json_decref(ev);
    if (!s)
        return;
    pthread_mutex_lock(&out_mu);
    fputs(s, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    pthread_mutex_unlock(&out_mu);
    free(s);
}

static void emit_simple(const char *event, const struct device *d)
{
    if (!cfg.quiet)
        emit(json_pack("{s:s,s:I}", "event", event, "device_id", (json_int_t)d->id));
}

/* Prints {"event":"misbehave","device_id":..,"mode":..,"detail":..}. */
static void misbehave_event(const struct device *d, const char *mode, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void misbehave_event(const struct device *d, const char *mode, const char *fmt, ...)
{
    if (cfg.quiet)
        return;
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    emit(json_pack("{s:s,s:I,s:s,s:s}", "event", "misbehave", "device_id", (json_int_t)d->id, "mode",
                   mode, "detail", detail));
}

static const char *status_name(int st)
{
    switch (st) {
    case SEEN_SENT: return "sent";
    case SEEN_DELIVERED: return "delivered";
    case SEEN_FAILED: return "failed";
    default: return "none";
    }
}

/* The status a fresh send ends in under --report. */
static int final_status(void)
{
    switch (cfg.report) {
    case REPORT_DELIVERED: return SEEN_DELIVERED;
    case REPORT_SENT: return SEEN_SENT;
    case REPORT_FAILED: return SEEN_FAILED;
    default: return SEEN_NONE;
    }
}

/* Records a report that did not reach the broker, to re-publish on reconnect.
 * Its unit of n_owed stays taken while the id waits in the list. */
static void unsettled_add(struct device *d, int64_t id)
{
    pthread_mutex_lock(&d->mu);
    if (d->n_unsettled == d->cap_unsettled && d->cap_unsettled < UNSETTLED_MAX) {
        size_t cap = d->cap_unsettled ? d->cap_unsettled * 2 : 16;
        int64_t *p = realloc(d->unsettled, cap * sizeof *p);
        if (p) {
            d->unsettled = p;
            d->cap_unsettled = cap;
        }
    }
    int kept = d->n_unsettled < d->cap_unsettled;
    if (kept)
        d->unsettled[d->n_unsettled++] = id;
    pthread_mutex_unlock(&d->mu);
    if (!kept) {
        atomic_fetch_sub(&n_owed, 1);
        logmsg("device %" PRId64 ": report for %" PRId64 " lost (retry list full)", d->id, id);
    }
}

/* ------------------------------------------------------------- publishing */

struct report_ctx {
    struct device *d;
    int64_t id;
};

static void on_report_ok(void *context, MQTTAsync_successData *resp)
{
    free(context);
    atomic_fetch_sub(&n_owed, 1);
}

static void on_report_fail(void *context, MQTTAsync_failureData *resp)
{
    struct report_ctx *rc = context;
    LOG_INFO("device %" PRId64 ": report for %" PRId64 " failed (%d), will re-publish",
             rc->d->id, rc->id, resp ? resp->code : 0);
    unsettled_add(rc->d, rc->id); /* keeps the unit */
    free(rc);
}

/* Publishes one report for id with status st (QoS 1) and prints its event.
 * Must not be called with d->mu held. Takes a unit of n_owed that the PUBACK
 * returns; a publish paho refuses (disconnected) goes to the retry list. */
static void publish_report_once(struct device *d, int64_t id, int st)
{
    char payload[FAIL_ERROR_MAX * 6 + 96];
    int len;
    if (st == SEEN_FAILED)
        len = snprintf(payload, sizeof payload, "{\"id\":%" PRId64 ",\"status\":\"failed\",\"error\":%s}",
                       id, cfg.fail_error_json);
    else
        len = snprintf(payload, sizeof payload, "{\"id\":%" PRId64 ",\"status\":\"%s\"}", id,
                       status_name(st));

    atomic_fetch_add(&n_owed, 1);
    struct report_ctx *ctx = malloc(sizeof *ctx);
    if (!ctx) {
        unsettled_add(d, id);
        return;
    }
    ctx->d = d;
    ctx->id = id;
    MQTTAsync_message msg = MQTTAsync_message_initializer;
    msg.payload = payload;
    msg.payloadlen = len;
    msg.qos = 1;
    msg.retained = 0;
    MQTTAsync_responseOptions opts = MQTTAsync_responseOptions_initializer;
    opts.onSuccess = on_report_ok;
    opts.onFailure = on_report_fail;
    opts.context = ctx;
    int rc = MQTTAsync_sendMessage(d->client, d->t_report, &msg, &opts);
    if (rc != MQTTASYNC_SUCCESS) {
        LOG_INFO("device %" PRId64 ": report for %" PRId64 " not published (%d), will re-publish",
                 d->id, id, rc);
        unsettled_add(d, id);
        free(ctx);
        return;
    }
    atomic_fetch_add_explicit(&n_reports, 1, memory_order_relaxed);
    if (!cfg.quiet) {
        json_t *ev = json_pack("{s:s,s:I,s:I,s:s}", "event", "report", "device_id", (json_int_t)d->id,
                               "id", (json_int_t)id, "status", status_name(st));
        if (ev && st == SEEN_FAILED)
            json_object_set_new(ev, "error", json_string(cfg.fail_error));
        emit(ev);
    }
}

/* Publishes a report: once, or REPEAT_COPIES times under --misbehave repeat
 * (every copy its own QoS 1 publish, event and unit of n_owed). */
static void publish_report(struct device *d, int64_t id, int st)
{
    int copies = (cfg.misbehave & MIS_REPEAT) ? REPEAT_COPIES : 1;
    for (int i = 0; i < copies; i++)
        publish_report_once(d, id, st);
    if (copies > 1)
        misbehave_event(d, "repeat", "report %" PRId64 " %s published %d times", id, status_name(st),
                        copies);
}

/* Publishes the reports of a fresh send in order: sent, then its outcome
 * (under --misbehave out-of-order: delivered first, then sent). */
static void publish_report_sequence(struct device *d, int64_t id, int final)
{
    if (final == SEEN_DELIVERED && (cfg.misbehave & MIS_OUT_OF_ORDER)) {
        publish_report(d, id, SEEN_DELIVERED);
        publish_report(d, id, SEEN_SENT);
        misbehave_event(d, "out-of-order", "report %" PRId64 " delivered published before sent", id);
        return;
    }
    if (final == SEEN_DELIVERED)
        publish_report(d, id, SEEN_SENT);
    publish_report(d, id, final);
}

/* Reports an id this device was never given as delivered (unknown-ids,
 * foreign-ids). It is not remembered, so a retry after a failed publish
 * finds no status for it and drops it. */
static void publish_stray_report(struct device *d, int64_t id, const char *mode)
{
    publish_report(d, id, SEEN_DELIVERED);
    misbehave_event(d, mode, "reported id %" PRId64 " as delivered", id);
}

static int publish_simple(struct device *d, const char *topic, const char *payload, int retained,
                          MQTTAsync_responseOptions *opts)
{
    MQTTAsync_message msg = MQTTAsync_message_initializer;
    msg.payload = (void *)payload;
    msg.payloadlen = (int)strlen(payload);
    msg.qos = 1;
    msg.retained = retained;
    return MQTTAsync_sendMessage(d->client, topic, &msg, opts);
}

/* Publishes inbound SMS number i of d (the first time --inbound-repeat
 * copies back to back). Must not be called with d->mu held; copies what it
 * needs under the lock. */
static void publish_inbound(struct device *d, size_t i)
{
    pthread_mutex_lock(&d->mu);
    struct inbound *in = &d->inb[i];
    if (in->acked) {
        pthread_mutex_unlock(&d->mu);
        return;
    }
    json_t *p = json_pack("{s:s,s:s,s:s,s:s}", "id", in->id, "from", in->from, "message", in->message,
                          "received_at", in->received_at);
    int first = !in->announced;
    in->announced = 1;
    in->last_pub_ms = mono_ms();
    json_t *ev = NULL;
    if (first && !cfg.quiet)
        ev = json_pack("{s:s,s:I,s:s,s:s,s:s}", "event", "inbound", "device_id", (json_int_t)d->id, "id",
                       in->id, "from", in->from, "message", in->message);
    pthread_mutex_unlock(&d->mu);

    char *payload = p ? json_dumps(p, JSON_COMPACT) : NULL;
    json_decref(p);
    if (!payload) {
        json_decref(ev);
        return;
    }
    long copies = first && cfg.inbound_repeat > 1 ? cfg.inbound_repeat : 1, done = 0;
    for (long k = 0; k < copies; k++) {
        int rc = publish_simple(d, d->t_inbound, payload, 0, NULL);
        if (rc != MQTTASYNC_SUCCESS) {
            LOG_INFO("device %" PRId64 ": inbound publish refused (%d), will retry", d->id, rc);
            break;
        }
        atomic_fetch_add_explicit(&n_inbound_pub, 1, memory_order_relaxed);
        done++;
    }
    free(payload);
    if (done && !first)
        LOG_INFO("device %" PRId64 ": re-published inbound %s", d->id, d->inb[i].id);
    emit(ev);
    if (copies > 1)
        misbehave_event(d, "inbound-repeat", "inbound %s published %ld of %ld times at once",
                        d->inb[i].id, done, copies);
}

/* --misbehave garbage: payloads the server must reject without harm. None of
 * them is a valid report, status or inbound SMS; the inbound ones that carry
 * an id get one of their own (the server acknowledges those, API.md 8). */
static const char *const garbage_report[] = {
    "not json",
    "",
    "{\"id\":12,\"sta",
    "[]",
    "{}",
    "{\"id\":\"x\"}",
    "{\"id\":\"x\",\"status\":\"sent\"}",
    "{\"id\":1,\"status\":\"bogus\"}",
    "{\"id\":0,\"status\":\"sent\"}",
    "{\"id\":-1,\"status\":\"delivered\"}",
    "{\"id\":1.5,\"status\":\"sent\"}",
    "{\"id\":99999999999999999999999,\"status\":\"sent\"}",
    "{\"status\":\"delivered\"}",
    "\xff\xfe{\"id\":1}",
};
/* Never "online":false-like, and never empty (an empty P/status looks like a
 * cleared retained message): a server that takes any of these as offline is
 * reading garbage, and the check is that the device stays online. */
static const char *const garbage_status[] = {
    "not json", "[]", "null", "{\"online\":\"yes\"}", "{\"online\":true",
};
/* %s is the device's garbage id stem. */
static const char *const garbage_inbound[] = {
    "not json",
    "[]",
    "{}",
    "{\"message\":\"garbage: no id, no from\"}",
    "{\"id\":\"%s-nofrom\",\"message\":\"garbage: id but no from\"}",
    "{\"id\":\"%s-nomessage\",\"from\":\"+639170000000\"}",
    "{\"id\":\"%s-badfrom\",\"from\":\"+63 not a number!\",\"message\":\"garbage: bad from\"}",
};

/* Writes payload into buf as printable ASCII (others as \xNN), for events. */
static void printable(char *buf, size_t size, const char *payload, size_t len)
{
    size_t o = 0;
    for (size_t i = 0; i < len && o + 5 < size; i++) {
        unsigned char ch = (unsigned char)payload[i];
        if (ch >= 0x20 && ch < 0x7f)
            buf[o++] = (char)ch;
        else
            o += (size_t)snprintf(buf + o, size - o, "\\x%02x", ch);
    }
    buf[o] = '\0';
}

static void publish_garbage_one(struct device *d, const char *topic, const char *name,
                                const char *payload, int retained)
{
    char shown[256];
    int rc = publish_simple(d, topic, payload, retained, NULL);
    if (*payload)
        printable(shown, sizeof shown, payload, strlen(payload));
    else
        snprintf(shown, sizeof shown, "(empty)");
    if (rc != MQTTASYNC_SUCCESS)
        LOG_INFO("device %" PRId64 ": garbage publish on %s refused (%d)", d->id, topic, rc);
    else
        misbehave_event(d, "garbage", "P/%s: %s", name, shown);
}

/* Publishes every garbage payload once (QoS 1, none retained). Not tracked
 * for retries: garbage lost to a dropped connection is simply lost. */
static void publish_garbage(struct device *d)
{
    char stem[32], payload[256];
    uint32_t r = 0;
    if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
        r = (uint32_t)rand() ^ (uint32_t)mono_ms();
    snprintf(stem, sizeof stem, "garbage-%08" PRIx32, r);
    for (size_t i = 0; i < sizeof garbage_report / sizeof *garbage_report; i++)
        publish_garbage_one(d, d->t_report, "report", garbage_report[i], 0);
    for (size_t i = 0; i < sizeof garbage_status / sizeof *garbage_status; i++)
        publish_garbage_one(d, d->t_status, "status", garbage_status[i], 0);
    for (size_t i = 0; i < sizeof garbage_inbound / sizeof *garbage_inbound; i++) {
        snprintf(payload, sizeof payload, garbage_inbound[i], stem);
        publish_garbage_one(d, d->t_inbound, "inbound", payload, 0);
    }
}

/* ------------------------------------------------------------ delay queue */

/* Queues the reports of id for later. Holds a unit of n_owed until they fire. */
static void heap_push(int64_t due, struct device *d, int64_t id)
{
    atomic_fetch_add(&n_owed, 1);
    pthread_mutex_lock(&heap_mu);
    if (heap_len == heap_cap) {
        size_t cap = heap_cap ? heap_cap * 2 : 1024;
        struct timed_report *h = realloc(heap, cap * sizeof *h);
        if (!h) {
            pthread_mutex_unlock(&heap_mu);
            logmsg("out of memory: report for %" PRId64 " published now", id);
            publish_report_sequence(d, id, final_status());
            atomic_fetch_sub(&n_owed, 1);
            return;
        }
        heap = h;
        heap_cap = cap;
    }
    size_t i = heap_len++;
    while (i > 0 && heap[(i - 1) / 2].due_ms > due) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = (struct timed_report){ due, d, id };
    if (i == 0)
        pthread_cond_signal(&heap_cv);
    pthread_mutex_unlock(&heap_mu);
}

/* Pops the earliest report if due by now. 1 when *out was filled. Locked. */
static int heap_pop_due(int64_t now, struct timed_report *out)
{
    if (heap_len == 0 || heap[0].due_ms > now)
        return 0;
    *out = heap[0];
    struct timed_report last = heap[--heap_len];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= heap_len)
            break;
        if (c + 1 < heap_len && heap[c + 1].due_ms < heap[c].due_ms)
            c++;
        if (heap[c].due_ms >= last.due_ms)
            break;
        heap[i] = heap[c];
        i = c;
    }
    if (heap_len > 0)
        heap[i] = last;
    return 1;
}

/* ----------------------------------------------------------- paho callbacks */

/* Largest number of distinct sends this process may handle (0 = no limit). */
static long send_limit(void)
{
    long a = cfg.drop_after, b = cfg.exit_after;
    if (a && b)
        return a < b ? a : b;
    return a ? a : b;
}

static void handle_send(struct device *d, const char *payload, int len)
{
    json_error_t jerr;
    json_t *root = json_loadb(payload, (size_t)len, 0, &jerr);
    json_t *jid = root ? json_object_get(root, "id") : NULL;
    if (!json_is_object(root) || !json_is_integer(jid) || json_integer_value(jid) <= 0) {
        logmsg("device %" PRId64 ": ignoring P/send without a positive integer id: %.*s", d->id,
               len > 200 ? 200 : len, payload);
        json_decref(root);
        return;
    }
    int64_t id = json_integer_value(jid);
    if (atomic_load_explicit(&stopping, memory_order_relaxed)) {
        json_decref(root);
        return;
    }

    int st = SEEN_NONE, dup, final = final_status();
    pthread_mutex_lock(&d->mu);
    dup = seen_get(&d->seen, id, &st);
    if (!dup) {
        long limit = send_limit();
        /* A placeholder unit of n_owed, taken before the send counts, keeps
         * the exit checks waiting until this send's event and reports are
         * out. Then claim a place under the limit. */
        atomic_fetch_add(&n_owed, 1);
        long k = atomic_fetch_add(&n_sends, 1) + 1;
        if (limit && k > limit) {
            atomic_fetch_sub(&n_sends, 1);
            atomic_fetch_sub(&n_owed, 1);
            pthread_mutex_unlock(&d->mu);
            json_decref(root);
            return;
        }
        if (limit && k == limit)
            atomic_store_explicit(&stopping, 1, memory_order_relaxed);
        /* The status is set before publishing so a repeat re-reports it;
         * a delayed report sets it when it fires. */
        int rc = seen_add(&d->seen, id, cfg.report_delay_ms > 0 ? SEEN_NONE : final);
        if (rc)
            logmsg("device %" PRId64 ": cannot remember id %" PRId64 " (%s)", d->id, id, strerror(-rc));
    }
    pthread_mutex_unlock(&d->mu);

    if (!cfg.quiet) {
        json_t *to = json_object_get(root, "to"), *msg = json_object_get(root, "message");
        json_t *sw = json_object_get(root, "safe_word"), *att = json_object_get(root, "attempt");
        emit(json_pack("{s:s,s:I,s:I,s:O,s:O,s:O,s:O,s:b}", "event", "send", "device_id",
                       (json_int_t)d->id, "id", (json_int_t)id, "to", to ? to : json_null(), "message",
                       msg ? msg : json_null(), "safe_word", sw ? sw : json_null(), "attempt",
                       att ? att : json_null(), "duplicate", dup));
    }
    json_decref(root);

    if (dup) {
        atomic_fetch_add_explicit(&n_dups, 1, memory_order_relaxed);
        if (st != SEEN_NONE)
            publish_report(d, id, st);
        return;
    }
    if (cfg.report != REPORT_NONE) {
        if (cfg.report_delay_ms > 0)
            heap_push(mono_ms() + cfg.report_delay_ms, d, id);
        else
            publish_report_sequence(d, id, final);
    }
    if (cfg.misbehave & MIS_UNKNOWN_IDS)
        publish_stray_report(d, id + UNKNOWN_ID_OFFSET, "unknown-ids");
    atomic_fetch_sub(&n_owed, 1); /* the placeholder */
}

static void handle_ack(struct device *d, const char *payload, int len)
{
    json_t *root = json_loadb(payload, (size_t)len, 0, NULL);
    const char *iid = json_string_value(json_object_get(root, "inbound"));
    if (!iid) {
        logmsg("device %" PRId64 ": ignoring P/ack without \"inbound\": %.*s", d->id,
               len > 200 ? 200 : len, payload);
        json_decref(root);
        return;
    }
    pthread_mutex_lock(&d->mu);
    for (size_t i = 0; i < d->n_inb; i++)
        if (strcmp(d->inb[i].id, iid) == 0)
            d->inb[i].acked = 1;
    pthread_mutex_unlock(&d->mu);
    atomic_fetch_add_explicit(&n_acks, 1, memory_order_relaxed);
    if (!cfg.quiet)
        emit(json_pack("{s:s,s:I,s:s}", "event", "ack", "device_id", (json_int_t)d->id, "inbound", iid));
    json_decref(root);
}

static void handle_pins(struct device *d, const char *payload, int len)
{
    atomic_fetch_add_explicit(&n_pins, 1, memory_order_relaxed);
    if (cfg.quiet)
        return;
    json_t *p = json_loadb(payload, (size_t)len, 0, NULL);
    if (!p)
        p = json_stringn_nocheck(payload, (size_t)len);
    emit(json_pack("{s:s,s:I,s:o}", "event", "pins", "device_id", (json_int_t)d->id, "payload",
                   p ? p : json_null()));
}

static int on_message(void *context, char *topic, int topic_len, MQTTAsync_message *m)
{
    struct device *d = context;
    const char *payload = m->payload ? m->payload : "";
    if (strcmp(topic, d->t_send) == 0)
        handle_send(d, payload, m->payloadlen);
    else if (strcmp(topic, d->t_ack) == 0)
        handle_ack(d, payload, m->payloadlen);
    else if (strcmp(topic, d->t_pins) == 0)
        handle_pins(d, payload, m->payloadlen);
    else
        logmsg("device %" PRId64 ": message on unexpected topic %s", d->id, topic);
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

static int cmp_id(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* After SUBACK: announce online, then replay what is owed to the server. */
static void on_subscribed(void *context, MQTTAsync_successData *resp)
{
    struct device *d = context;
    if (resp && resp->alt.qosList) {
        for (int i = 0; i < 3; i++)
            if (resp->alt.qosList[i] == 0x80)
                logmsg("device %" PRId64 ": broker refused subscription %d (ACL?)", d->id, i);
    }
    int rc = publish_simple(d, d->t_status, "{\"online\":true,\"sim\":\"tt-devsim\"}", 1, NULL);
    if (rc != MQTTASYNC_SUCCESS)
        logmsg("device %" PRId64 ": status publish refused (%d)", d->id, rc);

    pthread_mutex_lock(&d->mu);
    d->online = 1;
    d->connect_failures = 0;
    int first_connect = ++d->connects == 1;
    size_t n_inb = d->n_inb;
    int64_t *retry = d->unsettled;
    size_t n_retry = d->n_unsettled;
    d->unsettled = NULL;
    d->n_unsettled = d->cap_unsettled = 0;
    pthread_mutex_unlock(&d->mu);

    LOG_INFO("device %" PRId64 ": connected", d->id);
    emit_simple("connected", d);
    if (first_connect && (cfg.misbehave & MIS_GARBAGE))
        publish_garbage(d);
    if (first_connect && (cfg.misbehave & MIS_FOREIGN_IDS))
        publish_stray_report(d, cfg.foreign_id, "foreign-ids");
    for (size_t i = 0; i < n_inb; i++)
        publish_inbound(d, i);
    if (n_retry) {
        /* One re-publish per id: a failed "sent" and "delivered" leave it twice. */
        qsort(retry, n_retry, sizeof *retry, cmp_id);
        for (size_t i = 0; i < n_retry; i++) {
            if (i > 0 && retry[i] == retry[i - 1])
                continue;
            int st = SEEN_NONE;
            pthread_mutex_lock(&d->mu);
            seen_get(&d->seen, retry[i], &st);
            pthread_mutex_unlock(&d->mu);
            if (st != SEEN_NONE)
                publish_report(d, retry[i], st);
        }
        /* The re-publishes hold their own units now; give back the list's. */
        atomic_fetch_sub(&n_owed, (long)n_retry);
    }
    free(retry);
}

static void on_subscribe_failed(void *context, MQTTAsync_failureData *resp)
{
    struct device *d = context;
    logmsg("device %" PRId64 ": subscribe failed (%d %s); not announcing online", d->id,
           resp ? resp->code : 0, resp && resp->message ? resp->message : "");
}

/* Called by paho on every successful connect, the first and each automatic
 * reconnect: the session is clean, so subscribe again. */
static void on_connected(void *context, char *cause)
{
    struct device *d = context;
    char *topics[3] = { d->t_send, d->t_pins, d->t_ack };
    int qos[3] = { 1, 1, 1 };
    MQTTAsync_responseOptions opts = MQTTAsync_responseOptions_initializer;
    opts.onSuccess = on_subscribed;
    opts.onFailure = on_subscribe_failed;
    opts.context = d;
    int rc = MQTTAsync_subscribeMany(d->client, 3, topics, qos, &opts);
    if (rc != MQTTASYNC_SUCCESS)
        logmsg("device %" PRId64 ": subscribe refused (%d)", d->id, rc);
}

static void on_connect_failed(void *context, MQTTAsync_failureData *resp)
{
    struct device *d = context;
    pthread_mutex_lock(&d->mu);
    int n = ++d->connect_failures;
    pthread_mutex_unlock(&d->mu);
    /* Retries are paho's (automatic reconnect); say so once, then rarely. */
    if (n == 1 || n % 20 == 0)
        logmsg("device %" PRId64 ": connect to %s failed (%d %s), retrying", d->id, d->url,
               resp ? resp->code : 0, resp && resp->message ? resp->message : "");
}

static void on_connection_lost(void *context, char *cause)
{
    struct device *d = context;
    pthread_mutex_lock(&d->mu);
    d->online = 0;
    pthread_mutex_unlock(&d->mu);
    logmsg("device %" PRId64 ": connection lost (%s), reconnecting", d->id, cause ? cause : "");
    emit_simple("disconnected", d);
}

static void on_shutdown_step(void *context, MQTTAsync_successData *resp)
{
    atomic_fetch_sub_explicit(&shutdown_pending, 1, memory_order_relaxed);
}

static void on_shutdown_step_fail(void *context, MQTTAsync_failureData *resp)
{
    atomic_fetch_sub_explicit(&shutdown_pending, 1, memory_order_relaxed);
}

/* ---------------------------------------------------------- credentials */

static int device_add(json_t *obj, const char *file)
{
    json_t *mqtt = json_object_get(obj, "mqtt");
    json_t *jid = json_object_get(obj, "id");
    const char *url = json_string_value(json_object_get(mqtt, "url"));
    const char *cid = json_string_value(json_object_get(mqtt, "client_id"));
    const char *user = json_string_value(json_object_get(mqtt, "username"));
    const char *pass = json_string_value(json_object_get(mqtt, "password"));
    const char *prefix = json_string_value(json_object_get(mqtt, "topic_prefix"));
    if (!json_is_integer(jid) || json_integer_value(jid) <= 0 || !json_is_object(mqtt) || !cid ||
        !prefix || (!url && !cfg.url)) {
        fprintf(stderr,
                "tt-devsim: %s: each device needs \"id\" and \"mqtt\":{\"url\",\"client_id\","
                "\"topic_prefix\",...}\n",
                file);
        return -EINVAL;
    }
    int64_t id = json_integer_value(jid);
    for (size_t i = 0; i < cfg.n_devs; i++)
        if (cfg.devs[i].id == id) {
            fprintf(stderr, "tt-devsim: device %" PRId64 " given twice\n", id);
            return -EINVAL;
        }
    struct device *devs = realloc(cfg.devs, (cfg.n_devs + 1) * sizeof *devs);
    if (!devs)
        return -ENOMEM;
    cfg.devs = devs;
    struct device *d = &devs[cfg.n_devs];
    memset(d, 0, sizeof *d);
    d->id = id;
    d->url = xstrdup(cfg.url ? cfg.url : url);
    d->client_id = xstrdup(cid);
    d->username = xstrdup(user);
    d->password = xstrdup(pass);
    d->prefix = xstrdup(prefix);
    d->t_status = join(prefix, "/status");
    d->t_send = join(prefix, "/send");
    d->t_pins = join(prefix, "/pins");
    d->t_ack = join(prefix, "/ack");
    d->t_report = join(prefix, "/report");
    d->t_inbound = join(prefix, "/inbound");
    if (!d->url || !d->client_id || !d->prefix || !d->t_status || !d->t_send || !d->t_pins ||
        !d->t_ack || !d->t_report || !d->t_inbound)
        return -ENOMEM;
    cfg.n_devs++;
    return 0;
}

static int load_credentials(const char *file)
{
    json_error_t err;
    json_t *root = json_load_file(file, 0, &err);
    if (!root) {
        fprintf(stderr, "tt-devsim: %s:%d: %s\n", file, err.line, err.text);
        return -EINVAL;
    }
    int rc = 0;
    if (json_is_array(root)) {
        size_t i;
        json_t *v;
        json_array_foreach(root, i, v) {
            if ((rc = device_add(v, file)) != 0)
                break;
        }
    } else {
        rc = device_add(root, file);
    }
    json_decref(root);
    return rc;
}

/* Makes the inbound SMS of every device from the --inbound flags. */
static int make_inbound(struct device *d)
{
    if (cfg.n_inbound == 0)
        return 0;
    d->inb = calloc(cfg.n_inbound, sizeof *d->inb);
    if (!d->inb)
        return -ENOMEM;
    for (size_t i = 0; i < cfg.n_inbound; i++) {
        struct inbound *in = &d->inb[i];
        if (cfg.inbound[i].id) {
            snprintf(in->id, sizeof in->id, "%s", cfg.inbound[i].id);
        } else {
            uint32_t r = 0;
            if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
                r = (uint32_t)rand() ^ (uint32_t)mono_ms();
            snprintf(in->id, sizeof in->id, "sim-%zu-%08" PRIx32, i + 1, r);
        }
        in->from = cfg.inbound[i].from;
        in->message = cfg.inbound[i].text;
        rfc3339_now(in->received_at, sizeof in->received_at);
    }
    d->n_inb = cfg.n_inbound;
    return 0;
}

/* ------------------------------------------------------------------ storm */

/* --misbehave storm opens and drops its connections by hand, on plain
 * sockets: paho always sends an MQTT DISCONNECT when asked to disconnect,
 * and the point of the storm is that the broker sees the connection die and
 * publishes the Last Will. Each connection is a minimal MQTT 3.1.1 client:
 * CONNECT with the device's credentials and Will, the retained online
 * status (QoS 1, waiting for its PUBACK), then close() without DISCONNECT. */

static size_t put_str(uint8_t *p, const char *s)
{
    size_t n = strlen(s);
    p[0] = (uint8_t)(n >> 8);
    p[1] = (uint8_t)(n & 0xff);
    memcpy(p + 2, s, n);
    return n + 2;
}

/* Encodes an MQTT "remaining length" (at most 268,435,455); bytes used. */
static size_t put_varint(uint8_t *p, size_t v)
{
    size_t n = 0;
    do {
        uint8_t b = v % 128;
        v /= 128;
        p[n++] = (uint8_t)(v ? b | 0x80 : b);
    } while (v && n < 4);
    return n;
}

static int send_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? -errno : -EIO;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int recv_all(int fd, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? -ETIMEDOUT : -errno;
        if (r == 0)
            return -ECONNRESET;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Reads one packet: returns its first byte (type and flags) and puts up to
 * 4 bytes of its body in body (the rest is read and dropped), or -errno. */
static int recv_packet(int fd, uint8_t body[4], size_t *len)
{
    uint8_t h, b;
    size_t v = 0, shift = 0;
    int rc = recv_all(fd, &h, 1);
    do {
        if (rc || (rc = recv_all(fd, &b, 1)))
            return rc;
        v |= (size_t)(b & 0x7f) << shift;
        shift += 7;
    } while ((b & 0x80) && shift < 28);
    *len = v;
    for (size_t i = 0; i < v; i++) {
        uint8_t skip;
        if ((rc = recv_all(fd, i < 4 ? &body[i] : &skip, 1)))
            return rc;
    }
    return h;
}

/* Splits tcp://HOST:PORT (or mqtt://, [v6]:PORT, no port = 1883). */
static int storm_parse_url(const char *url, char *host, size_t hsize, char *port, size_t psize)
{
    const char *p;
    if (strncmp(url, "tcp://", 6) == 0)
        p = url + 6;
    else if (strncmp(url, "mqtt://", 7) == 0)
        p = url + 7;
    else
        return -EPROTONOSUPPORT;
    const char *hend, *colon;
    if (*p == '[') {
        p++;
        hend = strchr(p, ']');
        if (!hend)
            return -EINVAL;
        colon = hend[1] == ':' ? hend + 1 : NULL;
    } else {
        colon = strrchr(p, ':');
        hend = colon ? colon : p + strlen(p);
    }
    size_t hl = (size_t)(hend - p);
    const char *pt = colon ? colon + 1 : "1883";
    size_t pl = strcspn(pt, "/");
    if (hl == 0 || hl >= hsize || pl == 0 || pl >= psize)
        return -EINVAL;
    memcpy(host, p, hl);
    host[hl] = '\0';
    memcpy(port, pt, pl);
    port[pl] = '\0';
    return 0;
}

static int storm_connect_socket(const struct device *d, int *out)
{
    char host[256], port[16];
    int rc = storm_parse_url(d->url, host, sizeof host, port, sizeof port);
    if (rc)
        return rc;
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &ai) != 0 || !ai)
        return -EHOSTUNREACH;
    rc = -ECONNREFUSED;
    for (struct addrinfo *a = ai; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            rc = -errno;
            continue;
        }
        /* The timeouts bound connect() too (Linux), so a dead broker cannot
         * hang the start. */
        struct timeval tv = { .tv_sec = STORM_IO_TIMEOUT_S, .tv_usec = 0 };
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
            *out = fd;
            rc = 0;
            break;
        }
        rc = -errno;
        close(fd);
    }
    freeaddrinfo(ai);
    return rc;
}

/* Opens one storm connection for d and announces it online; *out is the
 * socket to drop. 0 or -errno (nothing left open). */
static int storm_open(const struct device *d, int *out)
{
    static const char online[] = "{\"online\":true,\"sim\":\"tt-devsim\"}";
    static const char offline[] = "{\"online\":false}";
    const char *user = d->username, *pass = d->username ? d->password : NULL;
    size_t l_cid = strlen(d->client_id), l_topic = strlen(d->t_status);
    size_t l_user = user ? strlen(user) : 0, l_pass = pass ? strlen(pass) : 0;
    if (l_cid > 65535 || l_topic > 65535 || l_user > 65535 || l_pass > 65535)
        return -ENAMETOOLONG;

    /* CONNECT body: protocol name, level, flags, keepalive, then the strings. */
    size_t body = 10 + 2 + l_cid + 2 + l_topic + 2 + strlen(offline) + (user ? 2 + l_user : 0) +
                  (pass ? 2 + l_pass : 0);
    size_t pub_body = 2 + l_topic + 2 + strlen(online);
    size_t cap = (body > pub_body ? body : pub_body) + 5;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return -ENOMEM;

    int fd = -1;
    int rc = storm_connect_socket(d, &fd);
    if (rc) {
        free(buf);
        return rc;
    }
    size_t n = 0;
    buf[n++] = 0x10; /* CONNECT */
    n += put_varint(buf + n, body);
    n += put_str(buf + n, "MQTT");
    buf[n++] = 4; /* 3.1.1 */
    /* clean session, Will (QoS 1, retained), username, password */
    buf[n++] = (uint8_t)(0x02 | 0x04 | 0x08 | 0x20 | (user ? 0x80 : 0) | (pass ? 0x40 : 0));
    buf[n++] = 0;
    buf[n++] = 10; /* keepalive, s */
    n += put_str(buf + n, d->client_id);
    n += put_str(buf + n, d->t_status);
    n += put_str(buf + n, offline);
    if (user)
        n += put_str(buf + n, user);
    if (pass)
        n += put_str(buf + n, pass);
    uint8_t ack[4];
    size_t alen = 0;
    if ((rc = send_all(fd, buf, n)) != 0)
        goto out;
    rc = recv_packet(fd, ack, &alen);
    if (rc >= 0 && (rc != 0x20 || alen != 2))
        rc = -EPROTO;
    else if (rc >= 0 && ack[1] != 0)
        rc = ack[1] == 4 || ack[1] == 5 ? -EACCES : -ECONNREFUSED;
    if (rc < 0)
        goto out;

    n = 0;
    buf[n++] = 0x33; /* PUBLISH, QoS 1, retained */
    n += put_varint(buf + n, pub_body);
    n += put_str(buf + n, d->t_status);
    buf[n++] = 0;
    buf[n++] = 1; /* packet id */
    memcpy(buf + n, online, strlen(online));
    n += strlen(online);
    if ((rc = send_all(fd, buf, n)) != 0)
        goto out;
    for (;;) { /* anything else the broker sends first is not ours to handle */
        rc = recv_packet(fd, ack, &alen);
        if (rc < 0 || ((rc & 0xf0) == 0x40 && alen == 2 && ack[0] == 0 && ack[1] == 1))
            break;
    }
    if (rc >= 0)
        rc = 0;
out:
    free(buf);
    if (rc) {
        close(fd);
        return rc;
    }
    *out = fd;
    return 0;
}

static void sleep_ms(long ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR && !got_signal)
        ;
}

/* Runs the storm of every device before paho connects them: --storm rounds,
 * each connecting and announcing every device, holding STORM_HOLD_MS, then
 * dropping them all and waiting STORM_GAP_MS (so the broker has published
 * the Will before the next CONNECT with the same client id). A device whose
 * storm connection fails leaves the storm and just starts normally. */
static void storm_run(void)
{
    int *fds = malloc(cfg.n_devs * sizeof *fds);
    if (!fds) {
        logmsg("out of memory: no storm");
        return;
    }
    /* fds[i]: an open storm socket, STORM_IDLE between connections, or
     * STORM_LEFT once the device left the storm. */
    enum { STORM_IDLE = -2, STORM_LEFT = -1 };
    for (size_t i = 0; i < cfg.n_devs; i++)
        fds[i] = STORM_IDLE;
    for (long k = 1; k <= cfg.storm && !got_signal; k++) {
        for (size_t i = 0; i < cfg.n_devs; i++) {
            struct device *d = &cfg.devs[i];
            if (fds[i] == STORM_LEFT)
                continue;
            int rc = storm_open(d, &fds[i]);
            if (rc) {
                fds[i] = STORM_LEFT;
                logmsg("device %" PRId64 ": storm connection %ld failed (%s)", d->id, k, strerror(-rc));
                misbehave_event(d, "storm", "connection %ld of %ld failed (%s), connecting normally", k,
                                cfg.storm, strerror(-rc));
            }
        }
        sleep_ms(STORM_HOLD_MS);
        for (size_t i = 0; i < cfg.n_devs; i++) {
            if (fds[i] < 0)
                continue;
            close(fds[i]);
            fds[i] = STORM_IDLE;
            misbehave_event(&cfg.devs[i], "storm", "connection %ld of %ld dropped without DISCONNECT", k,
                            cfg.storm);
        }
        sleep_ms(STORM_GAP_MS);
    }
    free(fds);
}

/* ------------------------------------------------------------- lifecycle */

static int device_start(struct device *d)
{
    int rc = MQTTAsync_create(&d->client, d->url, d->client_id, MQTTCLIENT_PERSISTENCE_NONE, NULL);
    if (rc != MQTTASYNC_SUCCESS) {
        logmsg("device %" PRId64 ": cannot create client for %s (%d)", d->id, d->url, rc);
        return -EINVAL;
    }
    d->created = 1;
    MQTTAsync_setCallbacks(d->client, d, on_connection_lost, on_message, NULL);
    MQTTAsync_setConnected(d->client, d, on_connected);

    MQTTAsync_willOptions will = MQTTAsync_willOptions_initializer;
    will.topicName = d->t_status;
    will.message = "{\"online\":false}";
    will.retained = 1;
    will.qos = 1;
    d->will = will;

    MQTTAsync_connectOptions co = MQTTAsync_connectOptions_initializer;
    co.keepAliveInterval = 10;
    co.cleansession = 1;
    co.will = &d->will;
    co.username = d->username;
    co.password = d->password;
    co.connectTimeout = 10;
    co.MQTTVersion = MQTTVERSION_3_1_1;
    co.automaticReconnect = 1;
    co.minRetryInterval = 1;
    co.maxRetryInterval = 5;
    co.onFailure = on_connect_failed;
    co.context = d;
    rc = MQTTAsync_connect(d->client, &co);
    if (rc != MQTTASYNC_SUCCESS) {
        logmsg("device %" PRId64 ": connect refused (%d)", d->id, rc);
        return -EIO;
    }
    return 0;
}

static void wait_pending(long ms)
{
    int64_t end = mono_ms() + ms;
    while (atomic_load_explicit(&shutdown_pending, memory_order_relaxed) > 0 && mono_ms() < end)
        usleep(5000);
}

static void print_summary(void)
{
    long sends = atomic_load(&n_sends), dups = atomic_load(&n_dups), reps = atomic_load(&n_reports);
    long inb = atomic_load(&n_inbound_pub), acks = atomic_load(&n_acks), pins = atomic_load(&n_pins);
    logmsg("summary: devices=%zu sends=%ld duplicates=%ld reports=%ld inbound=%ld acks=%ld pins=%ld",
           cfg.n_devs, sends, dups, reps, inb, acks, pins);
    if (cfg.quiet) {
        pthread_mutex_lock(&out_mu);
        printf("{\"event\":\"summary\",\"devices\":%zu,\"sends\":%ld,\"duplicates\":%ld,\"reports\":%ld,"
               "\"inbound\":%ld,\"acks\":%ld,\"pins\":%ld}\n",
               cfg.n_devs, sends, dups, reps, inb, acks, pins);
        fflush(stdout);
        pthread_mutex_unlock(&out_mu);
    }
}

/* Orderly exit: announce offline (retained), disconnect, free. */
static void shutdown_all(void)
{
    atomic_store_explicit(&stopping, 1, memory_order_relaxed);
    int *was_online = calloc(cfg.n_devs ? cfg.n_devs : 1, sizeof *was_online);

    for (size_t i = 0; i < cfg.n_devs; i++) {
        struct device *d = &cfg.devs[i];
        if (!d->created)
            continue;
        pthread_mutex_lock(&d->mu);
        int online = d->online;
        pthread_mutex_unlock(&d->mu);
        if (was_online)
            was_online[i] = online;
        if (!online)
            continue;
        MQTTAsync_responseOptions opts = MQTTAsync_responseOptions_initializer;
        opts.onSuccess = on_shutdown_step;
        opts.onFailure = on_shutdown_step_fail;
        atomic_fetch_add_explicit(&shutdown_pending, 1, memory_order_relaxed);
        if (publish_simple(d, d->t_status, "{\"online\":false}", 1, &opts) != MQTTASYNC_SUCCESS)
            atomic_fetch_sub_explicit(&shutdown_pending, 1, memory_order_relaxed);
    }
    wait_pending(SHUTDOWN_WAIT_MS);

    for (size_t i = 0; i < cfg.n_devs; i++) {
        struct device *d = &cfg.devs[i];
        if (!d->created)
            continue;
        MQTTAsync_disconnectOptions dopts = MQTTAsync_disconnectOptions_initializer;
        dopts.timeout = 1000;
        dopts.onSuccess = on_shutdown_step;
        dopts.onFailure = on_shutdown_step_fail;
        atomic_fetch_add_explicit(&shutdown_pending, 1, memory_order_relaxed);
        if (MQTTAsync_disconnect(d->client, &dopts) != MQTTASYNC_SUCCESS)
            atomic_fetch_sub_explicit(&shutdown_pending, 1, memory_order_relaxed);
    }
    wait_pending(SHUTDOWN_WAIT_MS);

    for (size_t i = 0; i < cfg.n_devs; i++) {
        struct device *d = &cfg.devs[i];
        if (was_online && was_online[i])
            emit_simple("disconnected", d);
        if (d->created)
            MQTTAsync_destroy(&d->client);
        d->created = 0;
    }
    free(was_online);
}

static void on_signal(int sig)
{
    got_signal = sig;
}

static void usage(FILE *f)
{
    fputs("usage: tt-devsim --credentials FILE [--credentials FILE...] [options]\n"
          "  --credentials FILE   device JSON (POST /api/v1/devices response) or an array of them\n"
          "  --url tcp://HOST:PORT   override mqtt.url of every device\n"
          "  --report delivered|sent|failed|none   (default delivered)\n"
          "  --fail-error TEXT    error of --report failed (default carrier_rejected)\n"
          "  --report-delay-ms N  wait before reporting (default 0)\n"
          "  --drop-after N       after N distinct sends (reports acknowledged), exit(3) without\n"
          "                       DISCONNECT so the broker publishes the Last Will\n"
          "  --inbound FROM:TEXT  send one inbound SMS after connecting (repeatable)\n"
          "  --exit-after N       exit 0 after N distinct sends and their reports are acknowledged\n"
          "  --duration SECONDS   exit 0 after that long\n"
          "  --quiet              no per-event output; a JSON summary line at exit\n"
          "  --inbound-id ID      fixed id (1 to 64 printable ASCII) for the next --inbound\n"
          "  --inbound-repeat N   publish each --inbound N times at once (same id) the first\n"
          "                       time, besides the re-publishing until acknowledged\n"
          "  --misbehave MODE     break the protocol on purpose (repeatable):\n"
          "     garbage           after the first connect, publish non-JSON and wrongly shaped\n"
          "                       payloads on P/report, P/status (not retained), P/inbound\n"
          "     unknown-ids       for every new send also report id + 1000000 as delivered\n"
          "     foreign-ids       report --foreign-id N as delivered once after the first connect\n"
          "     repeat            publish every report 3 times\n"
          "     out-of-order      report delivered first, then sent\n"
          "     storm             at start, connect and drop the connection without DISCONNECT\n"
          "                       (the Will fires) --storm N times, ~100 ms apart, then connect\n"
          "                       normally and stay\n"
          "  --foreign-id N       message id for foreign-ids (implies --misbehave foreign-ids)\n"
          "  --storm N            drops of the storm (implies --misbehave storm; default 5)\n"
          "Counts of --drop-after/--exit-after are totals over all devices of the process.\n"
          "Every misbehaviour prints {\"event\":\"misbehave\",\"device_id\":..,\"mode\":..,\"detail\":..}.\n",
          f);
}

static int parse_long(const char *s, long min, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min)
        return -EINVAL;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "credentials", required_argument, NULL, 'c' },
        { "url", required_argument, NULL, 'u' },
        { "report", required_argument, NULL, 'r' },
        { "fail-error", required_argument, NULL, 'e' },
        { "report-delay-ms", required_argument, NULL, 'D' },
        { "drop-after", required_argument, NULL, 'd' },
        { "inbound", required_argument, NULL, 'i' },
        { "exit-after", required_argument, NULL, 'x' },
        { "duration", required_argument, NULL, 't' },
        { "quiet", no_argument, NULL, 'q' },
        { "inbound-id", required_argument, NULL, 'I' },
        { "inbound-repeat", required_argument, NULL, 'R' },
        { "misbehave", required_argument, NULL, 'm' },
        { "foreign-id", required_argument, NULL, 'f' },
        { "storm", required_argument, NULL, 's' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char **cred_files = calloc((size_t)argc, sizeof *cred_files);
    size_t n_cred = 0;
    cfg.inbound = calloc((size_t)argc, sizeof *cfg.inbound);
    if (!cred_files || !cfg.inbound)
        return 1;
    cfg.fail_error = "carrier_rejected";
    const char *next_inbound_id = NULL; /* --inbound-id waiting for its --inbound */
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            cred_files[n_cred++] = optarg;
            break;
        case 'u':
            cfg.url = optarg;
            break;
        case 'r':
            if (strcmp(optarg, "delivered") == 0)
                cfg.report = REPORT_DELIVERED;
            else if (strcmp(optarg, "sent") == 0)
                cfg.report = REPORT_SENT;
            else if (strcmp(optarg, "failed") == 0)
                cfg.report = REPORT_FAILED;
            else if (strcmp(optarg, "none") == 0)
                cfg.report = REPORT_NONE;
            else {
                fprintf(stderr, "tt-devsim: --report must be delivered, sent, failed or none\n");
                return 2;
            }
            break;
        case 'e':
            if (strlen(optarg) == 0 || strlen(optarg) > FAIL_ERROR_MAX) {
                fprintf(stderr, "tt-devsim: --fail-error must be 1 to %d bytes\n", FAIL_ERROR_MAX);
                return 2;
            }
            cfg.fail_error = optarg;
            break;
        case 'D':
        case 'd':
        case 'x': {
            long v;
            if (parse_long(optarg, c == 'D' ? 0 : 1, &v)) {
                fprintf(stderr, "tt-devsim: bad number for --%s: %s\n",
                        c == 'D' ? "report-delay-ms" : c == 'd' ? "drop-after" : "exit-after", optarg);
                return 2;
            }
            if (c == 'D')
                cfg.report_delay_ms = v;
            else if (c == 'd')
                cfg.drop_after = v;
            else
                cfg.exit_after = v;
            break;
        }
        case 'i': {
            char *colon = strchr(optarg, ':');
            if (!colon || colon == optarg || colon[1] == '\0') {
                fprintf(stderr, "tt-devsim: --inbound wants FROM:TEXT\n");
                return 2;
            }
            *colon = '\0';
            cfg.inbound[cfg.n_inbound].from = optarg;
            cfg.inbound[cfg.n_inbound].text = colon + 1;
            cfg.inbound[cfg.n_inbound].id = next_inbound_id;
            next_inbound_id = NULL;
            cfg.n_inbound++;
            break;
        }
        case 'I': {
            size_t n = strlen(optarg);
            int ok = n >= 1 && n <= INBOUND_ID_MAX;
            for (size_t i = 0; ok && i < n; i++)
                ok = optarg[i] >= 0x20 && optarg[i] < 0x7f;
            if (!ok) {
                fprintf(stderr, "tt-devsim: --inbound-id must be 1 to %d printable ASCII characters\n",
                        INBOUND_ID_MAX);
                return 2;
            }
            next_inbound_id = optarg;
            break;
        }
        case 'R':
        case 'f':
        case 's': {
            long v;
            if (parse_long(optarg, 1, &v)) {
                fprintf(stderr, "tt-devsim: bad number for --%s: %s\n",
                        c == 'R' ? "inbound-repeat" : c == 'f' ? "foreign-id" : "storm", optarg);
                return 2;
            }
            if (c == 'R') {
                cfg.inbound_repeat = v;
            } else if (c == 'f') {
                cfg.foreign_id = v;
                cfg.misbehave |= MIS_FOREIGN_IDS;
            } else {
                cfg.storm = v;
                cfg.misbehave |= MIS_STORM;
            }
            break;
        }
        case 'm': {
            size_t k, n = sizeof mis_modes / sizeof *mis_modes;
            for (k = 0; k < n; k++)
                if (strcmp(optarg, mis_modes[k].name) == 0)
                    break;
            if (k == n) {
                fprintf(stderr, "tt-devsim: --misbehave must be one of garbage, unknown-ids, "
                                "foreign-ids, repeat, out-of-order, storm\n");
                return 2;
            }
            cfg.misbehave |= mis_modes[k].bit;
            break;
        }
        case 't': {
            char *end;
            cfg.duration_s = strtod(optarg, &end);
            if (end == optarg || *end || cfg.duration_s <= 0) {
                fprintf(stderr, "tt-devsim: bad --duration: %s\n", optarg);
                return 2;
            }
            break;
        }
        case 'q':
            cfg.quiet = 1;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc || n_cred == 0) {
        usage(stderr);
        return 2;
    }
    if (next_inbound_id) {
        fprintf(stderr, "tt-devsim: --inbound-id must be followed by the --inbound it names\n");
        return 2;
    }
    if ((cfg.misbehave & MIS_FOREIGN_IDS) && !cfg.foreign_id) {
        fprintf(stderr, "tt-devsim: --misbehave foreign-ids needs --foreign-id N\n");
        return 2;
    }
    if ((cfg.misbehave & MIS_STORM) && !cfg.storm)
        cfg.storm = STORM_DEFAULT;
    json_t *fe = json_string(cfg.fail_error);
    cfg.fail_error_json = fe ? json_dumps(fe, JSON_ENCODE_ANY) : NULL;
    json_decref(fe);
    if (!cfg.fail_error_json) {
        fprintf(stderr, "tt-devsim: --fail-error must be UTF-8\n");
        return 2;
    }
    for (size_t i = 0; i < n_cred; i++)
        if (load_credentials(cred_files[i]))
            return 2;
    free(cred_files);

    /* A fleet holds one socket per device: take the hard limit of descriptors. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&heap_cv, &ca);
    pthread_condattr_destroy(&ca);

    for (size_t i = 0; i < cfg.n_devs; i++) {
        struct device *d = &cfg.devs[i];
        pthread_mutex_init(&d->mu, NULL);
        seen_init(&d->seen, SEEN_MAX);
        if (make_inbound(d)) {
            fprintf(stderr, "tt-devsim: out of memory\n");
            return 1;
        }
    }
    LOG_INFO("starting %zu device(s)", cfg.n_devs);
    if (cfg.storm)
        storm_run();
    for (size_t i = 0; i < cfg.n_devs; i++)
        if (device_start(&cfg.devs[i])) {
            shutdown_all();
            return 1;
        }

    int64_t start = mono_ms(), last_sweep = start, drop_since = 0;
    long limit = send_limit();
    for (;;) {
        int64_t now = mono_ms();
        if (got_signal) {
            LOG_INFO("signal %d: going offline", (int)got_signal);
            break;
        }
        if (cfg.duration_s > 0 && now - start >= (int64_t)(cfg.duration_s * 1000.0)) {
            LOG_INFO("duration reached");
            break;
        }
        if (limit && atomic_load(&n_sends) >= limit) {
            /* n_sends was read first: see n_owed for why this order is safe */
            int settled = atomic_load(&n_owed) == 0;
            if (cfg.drop_after && limit == cfg.drop_after) {
                if (!drop_since)
                    drop_since = now;
                if (settled || now - drop_since >= DROP_WAIT_MS) {
                    if (!settled)
                        logmsg("drop: reports still unacknowledged after %d ms", DROP_WAIT_MS);
                    logmsg("drop-after %ld reached: dropping the connection without DISCONNECT",
                           cfg.drop_after);
                    print_summary();
                    fflush(stdout);
                    _exit(3);
                }
            } else if (settled) {
                LOG_INFO("exit-after %ld reached", cfg.exit_after);
                break;
            }
        }

        /* Fire due delayed reports. */
        for (;;) {
            struct timed_report tr;
            pthread_mutex_lock(&heap_mu);
            int got = heap_pop_due(mono_ms(), &tr);
            pthread_mutex_unlock(&heap_mu);
            if (!got)
                break;
            int final = final_status();
            pthread_mutex_lock(&tr.d->mu);
            seen_set_status(&tr.d->seen, tr.id, final);
            pthread_mutex_unlock(&tr.d->mu);
            publish_report_sequence(tr.d, tr.id, final);
            atomic_fetch_sub(&n_owed, 1); /* the heap entry's unit */
        }

        /* Re-publish unacknowledged inbound SMS every 30 s while online. */
        if (cfg.n_inbound && now - last_sweep >= 1000) {
            last_sweep = now;
            for (size_t i = 0; i < cfg.n_devs; i++) {
                struct device *d = &cfg.devs[i];
                for (size_t j = 0; j < d->n_inb; j++) {
                    pthread_mutex_lock(&d->mu);
                    int due = d->online && !d->inb[j].acked && d->inb[j].last_pub_ms &&
                              now - d->inb[j].last_pub_ms >= INBOUND_REPEAT_MS;
                    pthread_mutex_unlock(&d->mu);
                    if (due)
                        publish_inbound(d, j);
                }
            }
        }

        /* Sleep until the next delayed report, at most 20 ms. */
        pthread_mutex_lock(&heap_mu);
        int64_t wait_ms = 20;
        if (heap_len) {
            int64_t until = heap[0].due_ms - mono_ms();
            if (until < wait_ms)
                wait_ms = until < 0 ? 0 : until;
        }
        if (wait_ms > 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += (long)(wait_ms * 1000000);
            ts.tv_sec += ts.tv_nsec / 1000000000;
            ts.tv_nsec %= 1000000000;
            pthread_cond_timedwait(&heap_cv, &heap_mu, &ts);
        }
        pthread_mutex_unlock(&heap_mu);
    }

    pthread_mutex_lock(&heap_mu);
    if (heap_len)
        logmsg("%zu delayed report(s) not published at exit", heap_len);
    pthread_mutex_unlock(&heap_mu);
    shutdown_all();
    print_summary();
    for (size_t i = 0; i < cfg.n_devs; i++) {
        struct device *d = &cfg.devs[i];
        seen_free(&d->seen);
        free(d->unsettled);
        free(d->inb);
        free(d->url), free(d->client_id), free(d->username), free(d->password), free(d->prefix);
        free(d->t_status), free(d->t_send), free(d->t_pins), free(d->t_ack), free(d->t_report),
            free(d->t_inbound);
        pthread_mutex_destroy(&d->mu);
    }
    free(cfg.devs);
    free(cfg.inbound);
    free(cfg.fail_error_json);
    free(heap);
    return 0;
}
