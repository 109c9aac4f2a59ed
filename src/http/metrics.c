/* metrics.c: the process-wide counters and histograms behind GET /metrics,
 * and their rendering as Prometheus text (exposition format 0.0.4).
 *
 * Recording is lock-free and cheap, because it sits on every request and on
 * every status change: each count is an independent _Atomic uint64_t bumped
 * with a relaxed fetch_add (no other memory is published through a count, so
 * no ordering is needed; a scrape only wants each number eventually right).
 *
 * The one table with open-ended keys, http_requests_total{route,method,
 * status}, is a fixed open-addressing table. Lookups never lock; the first
 * time a key is seen its insertion takes a small mutex, so inserts are
 * serialised and a slot goes from empty to published exactly once (key
 * written, then a release store of `used`). The table is bounded: once it is
 * full, new keys count into one overflow series with route="other".
 *
 * Gauges (mailbox depths, devices online, store and link state) are not
 * stored here: metrics_render reads them from the server at scrape time. */
#include "http/metrics.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/device.h"
#include "mqtt/link.h"
#include "runtime/actor.h"
#include "server.h"
#include "store/store.h"

/* ---- http_requests_total ------------------------------------------------ */

#define HTTP_SLOTS 1024u            /* power of two */
#define HTTP_MAX_KEYS (HTTP_SLOTS * 3u / 4u) /* keep probe chains short */

static const char *const http_methods[] = {"GET", "POST", "PATCH", "DELETE", "PUT", "HEAD",
                                           "OPTIONS", "OTHER"};
#define METHOD_COUNT (sizeof http_methods / sizeof http_methods[0])
#define METHOD_OTHER (METHOD_COUNT - 1)

typedef struct http_slot {
    /* 0 empty, 1 key published. Written once, under http_mu, with release
     * after the key fields; read with acquire so the key is seen whole. */
    _Atomic int used;
    uint16_t method;
    uint16_t status;
    uint32_t hash;
    char *route;                    /* owned copy, never freed (bounded) */
    _Atomic uint64_t count;
} http_slot;

static http_slot http_table[HTTP_SLOTS];
static pthread_mutex_t http_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned http_keys;          /* under http_mu */
static _Atomic uint64_t http_overflow;

/* FNV-1a over the route, mixed with method and status. */
static uint32_t http_hash(const char *route, unsigned method, unsigned status)
{
    uint32_t h = 2166136261u;

    for (const unsigned char *p = (const unsigned char *)route; *p; p++)
        h = (h ^ *p) * 16777619u;
    h = (h ^ method) * 16777619u;
    h = (h ^ (status & 0xff)) * 16777619u;
    h = (h ^ (status >> 8)) * 16777619u;
    return h;
}

static unsigned http_method_index(const char *method)
{
    if (method == NULL)
        return METHOD_OTHER;
    for (unsigned i = 0; i < METHOD_OTHER; i++)
        if (strcmp(method, http_methods[i]) == 0)
            return i;
    return METHOD_OTHER;
}

static bool http_slot_is(const http_slot *s, uint32_t h, const char *route, unsigned method,
                         unsigned status)
{
    return s->hash == h && s->method == method && s->status == status &&
           strcmp(s->route, route) == 0;
}

/* Finds the key's slot, or NULL when it is not in the table yet. Safe without
 * the mutex: a slot's key never changes once `used` is seen set. */
static http_slot *http_find(uint32_t h, const char *route, unsigned method, unsigned status)
{
    for (unsigned i = 0; i < HTTP_SLOTS; i++) {
        http_slot *s = &http_table[(h + i) & (HTTP_SLOTS - 1)];

        /* acquire: pairs with the release in http_insert, so route, method,
         * status and hash are read as written. */
        if (!atomic_load_explicit(&s->used, memory_order_acquire))
            return NULL;
        if (http_slot_is(s, h, route, method, status))
            return s;
    }
    return NULL;
}

/* Slow path, once per key: under the mutex, looks again (another thread may
 * have inserted it meanwhile) and inserts. NULL when the table is full or the
 * route cannot be copied: the caller counts into the overflow series. */
static http_slot *http_insert(uint32_t h, const char *route, unsigned method, unsigned status)
{
    http_slot *found = NULL;

    pthread_mutex_lock(&http_mu);
    for (unsigned i = 0; i < HTTP_SLOTS; i++) {
        http_slot *s = &http_table[(h + i) & (HTTP_SLOTS - 1)];

        /* relaxed: only this mutex's holder ever sets `used`. */
        if (atomic_load_explicit(&s->used, memory_order_relaxed)) {
            if (http_slot_is(s, h, route, method, status)) {
                found = s;
                break;
            }
            continue;
        }
        if (http_keys >= HTTP_MAX_KEYS)
            break;
        s->route = strdup(route);
        if (s->route == NULL)
            break;
        s->hash = h;
        s->method = (uint16_t)method;
        s->status = (uint16_t)status;
        http_keys++;
        /* release: publishes the key fields to lock-free readers. */
        atomic_store_explicit(&s->used, 1, memory_order_release);
        found = s;
        break;
    }
    pthread_mutex_unlock(&http_mu);
    return found;
}

void metrics_http(const char *route, const char *method, int status)
{
    unsigned m = http_method_index(method);
    http_slot *s;
    uint32_t h;

    if (route == NULL)
        route = "unmatched";
    if (status < 100 || status > 599) {
        /* Not an HTTP status: it has no series of its own. */
        atomic_fetch_add_explicit(&http_overflow, 1, memory_order_relaxed);
        return;
    }
    h = http_hash(route, m, (unsigned)status);
    s = http_find(h, route, m, (unsigned)status);
    if (s == NULL)
        s = http_insert(h, route, m, (unsigned)status);
    /* relaxed: an independent count (see the file comment). */
    if (s != NULL)
        atomic_fetch_add_explicit(&s->count, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&http_overflow, 1, memory_order_relaxed);
}

/* ---- fixed-label counters ------------------------------------------------- */

static const char *const msg_directions[2] = {"outbound", "inbound"};
/* Indexed by the ST_* values of store.h. */
static const char *const msg_statuses[] = {"pending", "sent", "delivered", "failed", "cancelled",
                                           "received"};
#define MSG_STATUS_COUNT (sizeof msg_statuses / sizeof msg_statuses[0])
_Static_assert(ST_PENDING == 0 && ST_SENT == 1 && ST_DELIVERED == 2 && ST_FAILED == 3 &&
                   ST_CANCELLED == 4 && ST_RECEIVED == 5,
               "msg_statuses follows the ST_* numbering");
static _Atomic uint64_t msg_counts[2][MSG_STATUS_COUNT];

/* The series each direction always shows (others show once nonzero). */
static bool msg_natural(unsigned dir, unsigned st)
{
    return dir == 0 ? st != ST_RECEIVED : st == ST_RECEIVED;
}

void metrics_message(int inbound, uint64_t status)
{
    if (status >= MSG_STATUS_COUNT)
        return;                     /* no such status: nothing to label it with */
    /* relaxed: an independent count. */
    atomic_fetch_add_explicit(&msg_counts[inbound ? 1 : 0][status], 1, memory_order_relaxed);
}

/* A small closed label set; the last name is "other", for anything else. */
typedef struct label_counter {
    const char *const *names;
    unsigned n;
    _Atomic uint64_t *counts;
} label_counter;

static const char *const reject_kinds[] = {"status", "report", "inbound", "other"};
static _Atomic uint64_t reject_counts[4];
static const label_counter rejects = {reject_kinds, 4, reject_counts};

static const char *const ignore_reasons[] = {"late", "unknown", "other"};
static _Atomic uint64_t ignore_counts[3];
static const label_counter ignores = {ignore_reasons, 3, ignore_counts};

static void label_counter_add(const label_counter *c, const char *name)
{
    unsigned i = c->n - 1;          /* "other" unless named */

    for (unsigned k = 0; name != NULL && k < c->n - 1; k++)
        if (strcmp(name, c->names[k]) == 0) {
            i = k;
            break;
        }
    /* relaxed: an independent count. */
    atomic_fetch_add_explicit(&c->counts[i], 1, memory_order_relaxed);
}

void metrics_device_rejected(const char *kind)
{
    label_counter_add(&rejects, kind);
}

void metrics_report_ignored(const char *reason)
{
    label_counter_add(&ignores, reason);
}

/* ---- histograms ------------------------------------------------------------ */

#define HIST_BOUNDS 11              /* finite bounds; one more bucket is +Inf */

typedef struct histogram {
    uint64_t bounds[HIST_BOUNDS];   /* upper bounds, inclusive, internal units */
    const char *le[HIST_BOUNDS];    /* the same bounds as rendered */
    _Atomic uint64_t buckets[HIST_BOUNDS + 1]; /* per bucket, not cumulative */
    _Atomic uint64_t sum;           /* internal units */
} histogram;

static histogram batch_hist = {
    .bounds = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024},
    .le = {"1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024"},
};

/* Microseconds inside, seconds outside. */
static histogram commit_hist = {
    .bounds = {500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000},
    .le = {"0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
           "1"},
};

static void histogram_observe(histogram *h, uint64_t v)
{
    unsigned i = 0;

    while (i < HIST_BOUNDS && v > h->bounds[i])
        i++;
    /* relaxed: independent counts; a scrape may see the bucket before the
     * sum or the other way round, which Prometheus tolerates. */
    atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum, v, memory_order_relaxed);
}

void metrics_commit(size_t requests, int64_t latency_us)
{
    histogram_observe(&batch_hist, (uint64_t)requests);
    histogram_observe(&commit_hist, latency_us > 0 ? (uint64_t)latency_us : 0);
}

/* ---- rendering ---------------------------------------------------------------- */

/* A growing text buffer; `err` sticks at the first failure. */
typedef struct outbuf {
    char *p;
    size_t len, cap;
    int err;
} outbuf;

static int ob_reserve(outbuf *b, size_t more)
{
    size_t ncap;
    char *np;

    if (b->err)
        return b->err;
    if (b->len + more + 1 <= b->cap)
        return 0;
    ncap = b->cap ? b->cap : 4096;
    while (ncap < b->len + more + 1)
        ncap *= 2;
    np = realloc(b->p, ncap);
    if (np == NULL) {
        b->err = -ENOMEM;
        return b->err;
    }
    b->p = np;
    b->cap = ncap;
    return 0;
}

__attribute__((format(printf, 2, 3))) static void ob_printf(outbuf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (b->err)
        return;
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->err = -EINVAL;
        return;
    }
    if (ob_reserve(b, (size_t)n) != 0)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Appends s as a label value: backslash, double quote and newline escaped. */
static void ob_label(outbuf *b, const char *s)
{
    size_t n = strlen(s);

    if (ob_reserve(b, 2 * n) != 0)
        return;
    for (; *s; s++) {
        if (*s == '\\' || *s == '"') {
            b->p[b->len++] = '\\';
            b->p[b->len++] = *s;
        } else if (*s == '\n') {
            b->p[b->len++] = '\\';
            b->p[b->len++] = 'n';
        } else {
            b->p[b->len++] = *s;
        }
    }
    b->p[b->len] = '\0';
}

static void ob_family(outbuf *b, const char *name, const char *type, const char *help)
{
    ob_printf(b, "# HELP taratxt_%s %s\n# TYPE taratxt_%s %s\n", name, help, name, type);
}

/* A sample with one label: taratxt_<name>{<label>="<value>"} <v>. */
static void ob_sample1(outbuf *b, const char *name, const char *label, const char *value,
                       uint64_t v)
{
    ob_printf(b, "taratxt_%s{%s=\"", name, label);
    ob_label(b, value);
    ob_printf(b, "\"} %" PRIu64 "\n", v);
}

static void render_http(outbuf *b)
{
    uint64_t over;

    ob_family(b, "http_requests_total", "counter",
              "HTTP requests answered, by route pattern, method and status.");
    for (unsigned i = 0; i < HTTP_SLOTS; i++) {
        http_slot *s = &http_table[i];

        /* acquire: pairs with the release in http_insert (key fields). */
        if (!atomic_load_explicit(&s->used, memory_order_acquire))
            continue;
        ob_printf(b, "taratxt_http_requests_total{route=\"");
        ob_label(b, s->route);
        ob_printf(b, "\",method=\"%s\",status=\"%u\"} %" PRIu64 "\n", http_methods[s->method],
                  (unsigned)s->status,
                  atomic_load_explicit(&s->count, memory_order_relaxed));
    }
    over = atomic_load_explicit(&http_overflow, memory_order_relaxed);
    if (over != 0)
        ob_printf(b,
                  "taratxt_http_requests_total{route=\"other\",method=\"OTHER\",status=\"other\"} "
                  "%" PRIu64 "\n",
                  over);
}

static void render_messages(outbuf *b)
{
    ob_family(b, "messages_total", "counter",
              "Messages entering a status, by direction and status.");
    for (unsigned d = 0; d < 2; d++)
        for (unsigned st = 0; st < MSG_STATUS_COUNT; st++) {
            uint64_t v = atomic_load_explicit(&msg_counts[d][st], memory_order_relaxed);

            if (v != 0 || msg_natural(d, st))
                ob_printf(b,
                          "taratxt_messages_total{direction=\"%s\",status=\"%s\"} %" PRIu64 "\n",
                          msg_directions[d], msg_statuses[st], v);
        }
}

static void render_label_counter(outbuf *b, const label_counter *c, const char *name,
                                 const char *label, const char *help)
{
    ob_family(b, name, "counter", help);
    for (unsigned i = 0; i < c->n; i++)
        ob_sample1(b, name, label, c->names[i],
                   atomic_load_explicit(&c->counts[i], memory_order_relaxed));
}

/* The buckets are read once each and made cumulative; _count is the +Inf
 * bucket, so the two always agree even while commits are recorded. With
 * micro set, the sum is microseconds and renders as seconds, exactly. */
static void render_histogram(outbuf *b, histogram *h, const char *name, const char *help,
                             bool micro)
{
    uint64_t cum = 0, sum;

    ob_family(b, name, "histogram", help);
    for (unsigned i = 0; i <= HIST_BOUNDS; i++) {
        cum += atomic_load_explicit(&h->buckets[i], memory_order_relaxed);
        ob_printf(b, "taratxt_%s_bucket{le=\"%s\"} %" PRIu64 "\n", name,
                  i < HIST_BOUNDS ? h->le[i] : "+Inf", cum);
    }
    sum = atomic_load_explicit(&h->sum, memory_order_relaxed);
    if (micro)
        ob_printf(b, "taratxt_%s_sum %" PRIu64 ".%06" PRIu64 "\n", name, sum / 1000000,
                  sum % 1000000);
    else
        ob_printf(b, "taratxt_%s_sum %" PRIu64 "\n", name, sum);
    ob_printf(b, "taratxt_%s_count %" PRIu64 "\n", name, cum);
}

static void depth_cb(const char *kind, uint64_t depth, void *arg)
{
    ob_sample1(arg, "mailbox_depth", "actor", kind != NULL ? kind : "unknown", depth);
}

/* Walks the registry chunk by chunk: it has no count, and ids are dense from
 * 1, so only allocated chunks are visited. */
static void count_devices(struct tt_server *srv, uint64_t *online, uint64_t *offline)
{
    *online = *offline = 0;
    for (uint64_t c = 0; c < DEVREG_CHUNKS; c++) {
        /* acquire: as in devreg_get; here only to skip absent chunks. */
        if (atomic_load_explicit(&srv->reg.chunks[c], memory_order_acquire) == NULL)
            continue;
        for (uint64_t j = 0; j < ((uint64_t)1 << DEVREG_CHUNK_BITS); j++) {
            dev_handle *h = devreg_get(&srv->reg, (c << DEVREG_CHUNK_BITS) | j);

            /* relaxed: each flag is read on its own for a gauge; nothing
             * else is read through it. */
            if (h == NULL || atomic_load_explicit(&h->deleted, memory_order_relaxed))
                continue;
            if (atomic_load_explicit(&h->online, memory_order_relaxed))
                (*online)++;
            else
                (*offline)++;
        }
    }
}

int metrics_render(struct tt_server *srv, char **out, size_t *len)
{
    outbuf b = {0};

    render_http(&b);
    render_messages(&b);
    render_label_counter(&b, &rejects, "device_payloads_rejected_total", "kind",
                         "Device payloads rejected as malformed, by payload kind.");
    render_label_counter(&b, &ignores, "reports_ignored_total", "reason",
                         "Delivery reports ignored: late (message already final) or unknown id.");

    ob_family(&b, "mailbox_depth", "gauge", "Messages waiting in actor mailboxes, by actor kind.");
    if (srv != NULL && srv->sched != NULL)
        rt_sched_depths(srv->sched, depth_cb, &b);

    if (srv != NULL) {
        uint64_t on, off;
        int up = 0, total = 0;

        count_devices(srv, &on, &off);
        ob_family(&b, "devices", "gauge", "Gateway devices, by connection state.");
        ob_sample1(&b, "devices", "state", "online", on);
        ob_sample1(&b, "devices", "state", "offline", off);

        ob_family(&b, "store_up", "gauge", "1 while the store accepts writes, 0 after a failure.");
        /* relaxed: a flag read on its own. */
        ob_printf(&b, "taratxt_store_up %d\n",
                  atomic_load_explicit(&srv->store_ok, memory_order_relaxed) ? 1 : 0);

        if (srv->links != NULL)
            links_status(srv->links, &up, &total);
        ob_family(&b, "mqtt_links", "gauge", "MQTT broker connections, by state.");
        ob_sample1(&b, "mqtt_links", "state", "up", (uint64_t)up);
        ob_sample1(&b, "mqtt_links", "state", "down", (uint64_t)(total - up));
    }

    render_histogram(&b, &batch_hist, "store_commit_batch_size",
                     "Keys written per group commit (an accepted message writes about four).", false);
    render_histogram(&b, &commit_hist, "store_commit_seconds",
                     "Latency of a synced store write, in seconds.", true);

    if (b.err == 0 && b.p == NULL)
        ob_reserve(&b, 0);
    if (b.err != 0) {
        free(b.p);
        return b.err;
    }
    *out = b.p;
    *len = b.len;
    return 0;
}
