/* metrics.h: counters and histograms for GET /metrics (Prometheus text).
 *
 * Process-wide, lock-free (relaxed atomics: each is an independent count, no
 * ordering with other memory is needed). Anything may record; the HTTP edge
 * renders. Families (all prefixed taratxt_):
 *   http_requests_total{route,method,status}      counter
 *   messages_total{direction,status}             counter: messages entering a status
 *   device_payloads_rejected_total{kind}         counter: bad status/report/inbound payloads
 *   reports_ignored_total{reason}                counter: late (final message) / unknown id
 *   mailbox_depth{actor}                         gauge, from the scheduler at scrape time
 *   devices{state}                               gauge online/offline, from the registry at scrape
 *   store_commit_batch_size                      histogram: keys written per group commit
 *   store_commit_seconds                         histogram: fsync'd write latency
 *   store_up                                     gauge 1/0
 *   mqtt_links{state}                            gauge up/down */
#ifndef TT_HTTP_METRICS_H
#define TT_HTTP_METRICS_H

#include <stddef.h>
#include <stdint.h>

struct tt_server;

void metrics_http(const char *route, const char *method, int status);
void metrics_message(int inbound, uint64_t status);   /* status: ST_* of store.h */
void metrics_device_rejected(const char *kind);       /* "status", "report", "inbound" */
void metrics_report_ignored(const char *reason);      /* "late", "unknown" */
void metrics_commit(size_t keys, int64_t latency_us);
/* Renders everything as Prometheus text into a malloc'd buffer. 0 or -ENOMEM. */
int metrics_render(struct tt_server *srv, char **out, size_t *len);

#endif
