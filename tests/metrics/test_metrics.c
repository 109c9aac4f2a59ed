/* test_metrics.c: the /metrics text, checked line by line and by promtool.
 *
 * Records a spread of values (concurrent recorders on shared and new keys, a
 * route that needs escaping, out-of-range input, a full http table), renders
 * them against a zeroed server with a few devices in its registry and an
 * unstarted scheduler with queued envelopes, asserts exact lines for a number
 * of series, then runs `promtool check metrics` on the text: it must exit 0
 * and print nothing (no lint warning either).
 * The counters are process-wide and cannot be reset, so every expected value
 * below follows from everything recorded before it in this one process. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "actors/device.h"
#include "http/metrics.h"
#include "runtime/actor.h"
#include "runtime/envelope.h"
#include "server.h"
#include "store/store.h"

static int failures;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                              \
        }                                                                            \
    } while (0)

/* 1 when text holds `line` as a whole line. */
static int has_line(const char *text, const char *line)
{
    size_t n = strlen(line);

    for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return 1;
    return 0;
}

static void expect_line(const char *text, const char *line)
{
    if (!has_line(text, line)) {
        fprintf(stderr, "missing line: %s\n", line);
        failures++;
    }
}

static void expect_no(const char *text, const char *needle)
{
    if (strstr(text, needle) != NULL) {
        fprintf(stderr, "unexpected text: %s\n", needle);
        failures++;
    }
}

/* ---- concurrent recording --------------------------------------------------- */

#define THREADS 4
#define PER_THREAD 20000
#define CONC_ROUTES 8

static void *recorder(void *arg)
{
    char route[32];

    (void)arg;
    for (int i = 0; i < PER_THREAD; i++) {
        snprintf(route, sizeof route, "/conc/%d", i % CONC_ROUTES);
        metrics_http(route, "GET", 200);
        metrics_message(0, ST_PENDING);
        metrics_commit(1, 100);
    }
    return NULL;
}

static void record_concurrently(void)
{
    pthread_t t[THREADS];

    for (int i = 0; i < THREADS; i++)
        CHECK(pthread_create(&t[i], NULL, recorder, NULL) == 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
}

/* ---- promtool ------------------------------------------------------------------- */

/* Writes text to a temporary file and runs promtool on it. 0 when it passes
 * silently; otherwise prints why and returns -1. */
static int promtool_check(const char *text, size_t len)
{
    char path[] = "/tmp/tt-metrics-XXXXXX";
    char cmd[128], line[512];
    int fd, status, lines = 0;
    FILE *p;

    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        fprintf(stderr, "promtool not found on PATH: install the Debian package `prometheus` "
                        "(scripts/test does) to run this test\n");
        return -1;
    }
    fd = mkstemp(path);
    if (fd < 0) {
        perror("mkstemp");
        return -1;
    }
    if (write(fd, text, len) != (ssize_t)len) {
        perror("write");
        close(fd);
        unlink(path);
        return -1;
    }
    close(fd);
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s 2>&1", path);
    p = popen(cmd, "r");
    if (p == NULL) {
        perror("popen");
        unlink(path);
        return -1;
    }
    while (fgets(line, sizeof line, p) != NULL) {
        fprintf(stderr, "promtool: %s", line);
        lines++;
    }
    status = pclose(p);
    unlink(path);
    if (status != 0 || lines != 0) {
        fprintf(stderr, "promtool check metrics: status %d, %d line(s) of output\n", status,
                lines);
        return -1;
    }
    return 0;
}

/* ---- mailbox depths ---------------------------------------------------------------- */

static void drop_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    (void)self;
    (void)state;
    rt_envelope_free(env);
}

static const rt_actor_ops drop_ops = {.dispatch = drop_dispatch};

/* A scheduler that is never started, so queued envelopes stay queued and the
 * depths are exact: two "device" actors with 3 and 4 envelopes, a "router"
 * with 1, and a kind that needs escaping with 2. */
static rt_sched *depth_sched(void)
{
    static const struct { const char *kind; int n; } spec[] = {
        {"device", 3}, {"device", 4}, {"router", 1}, {"q\"uote\\kind", 2}};
    rt_sched *s = rt_sched_new(1);

    if (s == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof spec / sizeof spec[0]; i++) {
        rt_actor *a = rt_actor_new(s, spec[i].kind, 16, &drop_ops, NULL);

        if (a == NULL)
            goto fail;
        for (int k = 0; k < spec[i].n; k++) {
            rt_envelope *env = rt_envelope_new(1, 1, NULL, 0);

            if (env == NULL)
                goto fail;
            if (rt_send(a, env) != 0) {
                rt_envelope_free(env);
                goto fail;
            }
        }
    }
    return s;
fail:
    rt_sched_free(s);
    return NULL;
}

/* ---- the test --------------------------------------------------------------------- */

static dev_handle *fake_device(struct tt_server *srv, uint64_t id, int online, int deleted)
{
    dev_handle *h = calloc(1, sizeof *h);

    if (h == NULL)
        return NULL;
    h->id = id;
    atomic_init(&h->online, online);
    atomic_init(&h->deleted, deleted);
    if (devreg_put(&srv->reg, id, h) != 0) {
        free(h);
        return NULL;
    }
    return h;
}

int main(void)
{
    struct tt_server *srv;
    dev_handle *devs[4];
    char *text = NULL, *empty = NULL;
    size_t len = 0, elen = 0;
    char route[32], expect[160];
    int rc;

    /* Before anything is recorded, and without a server. */
    rc = metrics_render(NULL, &empty, &elen);
    CHECK(rc == 0 && empty != NULL && elen == strlen(empty));
    if (empty != NULL) {
        expect_line(empty, "taratxt_store_commit_seconds_count 0");
        expect_line(empty, "taratxt_store_commit_seconds_sum 0.000000");
        expect_line(empty, "# TYPE taratxt_http_requests_total counter");
        CHECK(promtool_check(empty, elen) == 0);
        free(empty);
    }

    record_concurrently();

    metrics_http("/api/v1/messages", "POST", 202);
    metrics_http("/api/v1/messages", "POST", 202);
    metrics_http("/api/v1/messages/{id}", "GET", 404);
    metrics_http("unmatched", "BREW", 400);             /* unknown method: OTHER */
    metrics_http(NULL, "GET", 404);                     /* no route: unmatched */
    metrics_http("/odd\"route\\with\nbreak", "DELETE", 204);
    metrics_http("/api/v1/messages", "POST", 42);       /* not a status: overflow */

    /* Fill the table: the 8 concurrent keys and 5 above are in; 1024 slots
     * hold at most 768 keys, so 755 of these get in and 245 overflow. */
    for (int i = 0; i < 1000; i++) {
        snprintf(route, sizeof route, "/fill/%d", i);
        metrics_http(route, "PUT", 500);
    }
    /* A key already in still counts in its own series once the table is full. */
    metrics_http("/api/v1/messages", "POST", 202);
    metrics_http("/api/v1/fresh", "HEAD", 200);         /* new key, table full: overflow */

    metrics_message(0, ST_SENT);
    metrics_message(0, ST_SENT);
    metrics_message(0, ST_DELIVERED);
    metrics_message(1, ST_RECEIVED);
    metrics_message(1, ST_FAILED);                      /* odd but counted */
    metrics_message(0, 99);                             /* no such status: dropped */

    metrics_device_rejected("status");
    metrics_device_rejected("report");
    metrics_device_rejected("report");
    metrics_device_rejected("we\"ird\\kind");           /* unknown kind: other */
    metrics_device_rejected(NULL);

    metrics_report_ignored("late");
    metrics_report_ignored("unknown");
    metrics_report_ignored("unknown");
    metrics_report_ignored("bogus");

    metrics_commit(3, 300);
    metrics_commit(2000, 2000000);
    metrics_commit(5, 1200);
    metrics_commit(0, -7);                              /* clamped to 0 us */

    srv = calloc(1, sizeof *srv);
    if (srv == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    atomic_init(&srv->store_ok, 1);
    devs[0] = fake_device(srv, 1, 1, 0);
    devs[1] = fake_device(srv, 2, 0, 0);
    devs[2] = fake_device(srv, 3, 1, 1);                /* deleted: not counted */
    devs[3] = fake_device(srv, 5000, 1, 0);             /* in the second chunk */
    for (int i = 0; i < 4; i++)
        CHECK(devs[i] != NULL);

    /* First with no scheduler (before start): the family has no samples. */
    rc = metrics_render(srv, &text, &len);
    CHECK(rc == 0);
    if (rc == 0) {
        expect_line(text, "# TYPE taratxt_mailbox_depth gauge");
        expect_no(text, "taratxt_mailbox_depth{");
        CHECK(promtool_check(text, len) == 0);
        free(text);
        text = NULL;
    }

    srv->sched = depth_sched();
    CHECK(srv->sched != NULL);
    rc = metrics_render(srv, &text, &len);
    CHECK(rc == 0);
    if (rc != 0 || text == NULL) {
        fprintf(stderr, "metrics_render: %d\n", rc);
        return 1;
    }
    CHECK(len == strlen(text));
    CHECK(len > 0 && text[len - 1] == '\n');

    /* http_requests_total */
    expect_line(text, "# HELP taratxt_http_requests_total HTTP requests answered, by route "
                      "pattern, method and status.");
    expect_line(text, "# TYPE taratxt_http_requests_total counter");
    expect_line(text, "taratxt_http_requests_total{route=\"/api/v1/messages\",method=\"POST\","
                      "status=\"202\"} 3");
    expect_line(text, "taratxt_http_requests_total{route=\"/api/v1/messages/{id}\","
                      "method=\"GET\",status=\"404\"} 1");
    expect_line(text, "taratxt_http_requests_total{route=\"unmatched\",method=\"OTHER\","
                      "status=\"400\"} 1");
    expect_line(text, "taratxt_http_requests_total{route=\"unmatched\",method=\"GET\","
                      "status=\"404\"} 1");
    expect_line(text, "taratxt_http_requests_total{route=\"/odd\\\"route\\\\with\\nbreak\","
                      "method=\"DELETE\",status=\"204\"} 1");
    for (int i = 0; i < CONC_ROUTES; i++) {
        snprintf(expect, sizeof expect,
                 "taratxt_http_requests_total{route=\"/conc/%d\",method=\"GET\",status=\"200\"} "
                 "%d",
                 i, THREADS * PER_THREAD / CONC_ROUTES);
        expect_line(text, expect);
    }
    expect_line(text, "taratxt_http_requests_total{route=\"/fill/754\",method=\"PUT\","
                      "status=\"500\"} 1");
    expect_no(text, "route=\"/fill/755\"");
    expect_no(text, "route=\"/api/v1/fresh\"");
    /* 1 bad status + 245 fills + 1 fresh key */
    expect_line(text, "taratxt_http_requests_total{route=\"other\",method=\"OTHER\","
                      "status=\"other\"} 247");

    /* messages_total */
    snprintf(expect, sizeof expect,
             "taratxt_messages_total{direction=\"outbound\",status=\"pending\"} %d",
             THREADS * PER_THREAD);
    expect_line(text, expect);
    expect_line(text, "taratxt_messages_total{direction=\"outbound\",status=\"sent\"} 2");
    expect_line(text, "taratxt_messages_total{direction=\"outbound\",status=\"delivered\"} 1");
    expect_line(text, "taratxt_messages_total{direction=\"outbound\",status=\"failed\"} 0");
    expect_line(text, "taratxt_messages_total{direction=\"outbound\",status=\"cancelled\"} 0");
    expect_line(text, "taratxt_messages_total{direction=\"inbound\",status=\"received\"} 1");
    expect_line(text, "taratxt_messages_total{direction=\"inbound\",status=\"failed\"} 1");
    expect_no(text, "direction=\"inbound\",status=\"sent\"");
    expect_no(text, "direction=\"outbound\",status=\"received\"");

    /* device_payloads_rejected_total, reports_ignored_total */
    expect_line(text, "taratxt_device_payloads_rejected_total{kind=\"status\"} 1");
    expect_line(text, "taratxt_device_payloads_rejected_total{kind=\"report\"} 2");
    expect_line(text, "taratxt_device_payloads_rejected_total{kind=\"inbound\"} 0");
    expect_line(text, "taratxt_device_payloads_rejected_total{kind=\"other\"} 2");
    expect_no(text, "we\\\"ird");
    expect_line(text, "taratxt_reports_ignored_total{reason=\"late\"} 1");
    expect_line(text, "taratxt_reports_ignored_total{reason=\"unknown\"} 2");
    expect_line(text, "taratxt_reports_ignored_total{reason=\"other\"} 1");

    /* Gauges read from the server. */
    expect_line(text, "# TYPE taratxt_mailbox_depth gauge");
    expect_line(text, "taratxt_mailbox_depth{actor=\"device\"} 7");
    expect_line(text, "taratxt_mailbox_depth{actor=\"router\"} 1");
    expect_line(text, "taratxt_mailbox_depth{actor=\"q\\\"uote\\\\kind\"} 2");
    expect_line(text, "taratxt_devices{state=\"online\"} 2");
    expect_line(text, "taratxt_devices{state=\"offline\"} 1");
    expect_line(text, "taratxt_store_up 1");
    expect_line(text, "taratxt_mqtt_links{state=\"up\"} 0");
    expect_line(text, "taratxt_mqtt_links{state=\"down\"} 0");

    /* Histograms: the concurrent phase added THREADS*PER_THREAD batches of 1
     * taking 100 us each. */
    snprintf(expect, sizeof expect, "taratxt_store_commit_batch_size_bucket{le=\"1\"} %d",
             THREADS * PER_THREAD + 1);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_batch_size_bucket{le=\"4\"} %d",
             THREADS * PER_THREAD + 2);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_batch_size_bucket{le=\"1024\"} %d",
             THREADS * PER_THREAD + 3);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_batch_size_bucket{le=\"+Inf\"} %d",
             THREADS * PER_THREAD + 4);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_batch_size_sum %d",
             THREADS * PER_THREAD + 2008);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_batch_size_count %d",
             THREADS * PER_THREAD + 4);
    expect_line(text, expect);
    expect_line(text, "# TYPE taratxt_store_commit_seconds histogram");
    snprintf(expect, sizeof expect, "taratxt_store_commit_seconds_bucket{le=\"0.0005\"} %d",
             THREADS * PER_THREAD + 2);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_seconds_bucket{le=\"0.0025\"} %d",
             THREADS * PER_THREAD + 3);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_seconds_bucket{le=\"1\"} %d",
             THREADS * PER_THREAD + 3);
    expect_line(text, expect);
    snprintf(expect, sizeof expect, "taratxt_store_commit_seconds_bucket{le=\"+Inf\"} %d",
             THREADS * PER_THREAD + 4);
    expect_line(text, expect);
    /* 8,000,000 + 300 + 2,000,000 + 1,200 + 0 microseconds */
    expect_line(text, "taratxt_store_commit_seconds_sum 10.001500");

    /* Each family is described exactly once (promtool checks it too). */
    {
        int n = 0;

        for (const char *p = text; (p = strstr(p, "# TYPE taratxt_devices ")) != NULL; p++)
            n++;
        CHECK(n == 1);
    }

    CHECK(promtool_check(text, len) == 0);

    if (failures != 0)
        fprintf(stderr, "---- rendered text ----\n%s", text);
    free(text);
    if (srv->sched != NULL)
        rt_sched_free(srv->sched);
    for (int i = 0; i < 4; i++)
        free(devs[i]);
    for (size_t c = 0; c < DEVREG_CHUNKS; c++)
        free(atomic_load_explicit(&srv->reg.chunks[c], memory_order_relaxed));
    free(srv);
    if (failures != 0) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("metrics_format: ok\n");
    return 0;
}
