/* pin_bench.c: the router's memory and routing rate with many pins.
 *
 *   tt-pin-bench [--pins N] [--cache N] [--lookups N] [--dir DIR]
 *
 * Runs the real server pieces in-process (store, persistence actor, router,
 * device actor; no HTTP, no broker needed) and drives the router directly
 * with submit envelopes, many in flight, the way HTTP workers do:
 *   1. "pin": N sends to N new numbers (force, device offline): each routes
 *      automatically, creates a pin with a safe word, and commits message and
 *      pin in one batch.
 *   2. "pinned": the same number of sends to numbers drawn at random among
 *      the N pinned ones: each is routed by its pin, from the router's cache
 *      or, on a miss, from RocksDB.
 * Prints both rates, the cache's size, and the process's resident memory.
 * Everything here uses the server's own code; only the driver is a bench. */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "actors/pincache.h"
#include "actors/proto.h"
#include "runtime/mailbox.h"
#include "server.h"
#include "taratxt/taratxt.h"
#include "util/clock.h"
#include "util/phone.h"

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int woken;

static void wake(void *arg)
{
    pthread_mutex_lock(&mu);
    woken = 1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    while (f && fgets(line, sizeof(line), f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    if (f)
        fclose(f);
    return kib;
}

/* Drains replies; returns how many were taken and counts failures. */
static size_t drain(rt_mailbox *mb, size_t *failed)
{
    rt_envelope *envs[256];
    size_t total = 0, n;
    while ((n = rt_mailbox_pop(mb, envs, 256)) > 0) {
        for (size_t i = 0; i < n; i++) {
            if (envs[i]->type != REPLY_MESSAGE)
                (*failed)++;
            rt_envelope_free(envs[i]);
        }
        rt_mailbox_done(mb, n);
        total += n;
    }
    return total;
}

static void number_for(uint64_t i, char out[TT_PHONE_MAX])
{
    snprintf(out, TT_PHONE_MAX, "+63%010u", (unsigned)(i % 1000000000u));
}

/* Sends count submits (numbers from pick), keeping up to `depth` in flight. */
static double run_phase(tt_server *srv, rt_mailbox *mb, uint64_t count, uint64_t npins, int random_pick,
                        size_t *failed)
{
    const size_t depth = 512;
    size_t outstanding = 0, done = 0;
    uint64_t sent = 0, seed = 88172645463325252ULL;
    int64_t t0 = tt_mono_ms();
    while (done < count) {
        while (sent < count && outstanding < depth) {
            char to[TT_PHONE_MAX];
            uint64_t idx = sent;
            if (random_pick) {
                seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
                idx = seed % npins;
            }
            number_for(idx, to);
            submit s = {.account_id = 1, .force = true, .to = to, .text = "bench", .priority = PRIO_NORMAL,
                        .ttl_s = 86400, .segments = 1};
            rt_envelope *env = rt_codec_envelope(ROUTER_SUBMIT, PROTO_V1, &submit_schema, &s);
            env->reply = mb;
            env->corr = sent + 1;
            if (rt_send(srv->router, env) != 0) {
                rt_envelope_free(env);
                break; /* router mailbox full: wait for replies */
            }
            sent++;
            outstanding++;
        }
        size_t got = drain(mb, failed);
        if (!got) {
            pthread_mutex_lock(&mu);
            if (!woken) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 2000000;
                if (ts.tv_nsec >= 1000000000L)
                    ts.tv_sec++, ts.tv_nsec -= 1000000000L;
                pthread_cond_timedwait(&cv, &mu, &ts);
            }
            woken = 0;
            pthread_mutex_unlock(&mu);
        }
        done += got;
        outstanding -= got;
    }
    double secs = (double)(tt_mono_ms() - t0) / 1000.0;
    return (double)count / (secs > 0 ? secs : 0.001);
}

int main(int argc, char **argv)
{
    uint64_t npins = 1000000, lookups = 0;
    int cache = 262144;
    char dir[256] = "";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--pins") && i + 1 < argc)
            npins = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--cache") && i + 1 < argc)
            cache = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--lookups") && i + 1 < argc)
            lookups = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            snprintf(dir, sizeof(dir), "%s", argv[++i]);
        else {
            fprintf(stderr, "usage: tt-pin-bench [--pins N] [--cache N] [--lookups N] [--dir DIR]\n");
            return 2;
        }
    }
    if (!lookups)
        lookups = npins;
    if (!*dir) {
        snprintf(dir, sizeof(dir), "/tmp/tt-pin-bench-XXXXXX");
        if (!mkdtemp(dir))
            return 1;
    }
    long rss0 = rss_kib();
    tt_server_options o = TT_SERVER_OPTIONS_INIT;
    o.data_dir = dir;
    o.listen = "127.0.0.1:0";
    o.mqtt_url = "tcp://127.0.0.1:1"; /* no broker: the device stays offline, sends are forced */
    o.pin_cache_entries = cache;
    o.http_threads = 2;
    o.log_level = 2;
    tt_server *srv;
    if (tt_server_create(&o, &srv) != 0 || tt_server_start(srv) != 0) {
        fprintf(stderr, "tt-pin-bench: cannot start the server in %s\n", dir);
        return 1;
    }
    /* One device for account 1, created through the router like POST /devices. */
    rt_mailbox *mb = rt_mailbox_new(1024, wake, NULL);
    device_create dc = {1, "bench", 600};
    rt_envelope *env = rt_codec_envelope(ROUTER_DEVICE_CREATE, PROTO_V1, &device_create_schema, &dc);
    env->reply = mb;
    rt_send(srv->router, env);
    size_t failed = 0;
    while (drain(mb, &failed) == 0)
        usleep(1000);
    failed = 0;
    printf("tt-pin-bench: %" PRIu64 " pins, router cache %d entries, data in %s\n", npins, cache, dir);
    fflush(stdout);
    double r1 = run_phase(srv, mb, npins, npins, 0, &failed);
    long rss1 = rss_kib();
    printf("pin:    %10.0f sends/s  (each a new number: auto route + new pin + safe word, one commit with the message)\n", r1);
    fflush(stdout);
    double r2 = run_phase(srv, mb, lookups, npins, 1, &failed);
    long rss2 = rss_kib();
    printf("pinned: %10.0f sends/s  (random pinned numbers: %.0f%% can be in the cache)\n", r2,
           100.0 * (double)cache / (double)npins > 100 ? 100.0 : 100.0 * (double)cache / (double)npins);
    size_t held = (size_t)cache < npins ? (size_t)cache : npins, buckets = 16;
    while (buckets < (size_t)cache)
        buckets <<= 1;
    printf("memory: rss %ld MiB at start, %ld MiB after pinning, %ld MiB after lookups (RocksDB memtables and\n"
           "        block cache included); the router's pin cache itself: %zu entries x %zu bytes + index = %.1f MiB;\n"
           "        failures %zu\n",
           rss0 / 1024, rss1 / 1024, rss2 / 1024, held, sizeof(pin_entry),
           (double)(held * sizeof(pin_entry) + buckets * sizeof(void *)) / 1048576.0, failed);
    tt_server_stop(srv);
    tt_server_destroy(srv);
    rt_mailbox_free(mb);
    return failed ? 1 : 0;
}
