/* server.c: the embeddable server: options, data directory, start and stop.
 *
 * Owns the order of things: the store and server key first, then the actor
 * scheduler, the persistence actor, the MQTT links, the router (which loads
 * and spawns the device actors), and the HTTP listener last; stopping runs
 * the other way: stop accepting, let the actors finish and flush, disconnect,
 * close the store.
 *
 * Before the actors exist (a fresh data directory's first account, or
 * `taratxtd account create` with the server stopped) this file writes to the
 * store directly, with sync=true; afterwards only the persistence actor
 * writes. */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "actors/device.h"
#include "actors/persist.h"
#include "actors/otp.h"
#include "actors/proto.h"
#include "actors/router.h"
#include "http/handlers.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/vec.h"
#include <sodium.h>

/* ---- device registry ---------------------------------------------------------- */

dev_handle *devreg_get(devreg *r, uint64_t id)
{
    uint64_t c = id >> DEVREG_CHUNK_BITS;
    if (c >= DEVREG_CHUNKS)
        return NULL;
    /* acquire: pairs with the release in devreg_put, so the handle's fields
     * are seen initialised. */
    dev_handle **chunk = atomic_load_explicit(&r->chunks[c], memory_order_acquire);
    if (!chunk)
        return NULL;
    return __atomic_load_n(&chunk[id & ((1u << DEVREG_CHUNK_BITS) - 1)], __ATOMIC_ACQUIRE);
}

int devreg_put(devreg *r, uint64_t id, dev_handle *h)
{
    uint64_t c = id >> DEVREG_CHUNK_BITS;
    if (c >= DEVREG_CHUNKS)
        return -ERANGE;
    dev_handle **chunk = atomic_load_explicit(&r->chunks[c], memory_order_acquire);
    if (!chunk) {
        chunk = calloc((size_t)1 << DEVREG_CHUNK_BITS, sizeof(*chunk));
        if (!chunk)
            return -ENOMEM;
        atomic_store_explicit(&r->chunks[c], chunk, memory_order_release);
    }
    __atomic_store_n(&chunk[id & ((1u << DEVREG_CHUNK_BITS) - 1)], h, __ATOMIC_RELEASE);
    return 0;
}

static void devreg_free(devreg *r)
{
    for (size_t i = 0; i < DEVREG_CHUNKS; i++)
        free(atomic_load_explicit(&r->chunks[i], memory_order_relaxed));
}

/* ---- accounts and tokens (direct writes, before the actors run) --------------- */

static int direct_write(tt_store *st, rocksdb_writebatch_t *wb)
{
    rocksdb_writeoptions_t *wo = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(wo, 1);
    char *err = NULL;
    rocksdb_write(store_db(st), wo, wb, &err);
    rocksdb_writeoptions_destroy(wo);
    if (err) {
        LOG_ERROR("store write failed: %s", err);
        free(err);
        return -EIO;
    }
    return 0;
}

static int batch_put_rec(rocksdb_writebatch_t *wb, const uint8_t *k, size_t klen, const rt_schema *s, const void *rec)
{
    char *val;
    size_t vlen;
    if (store_encode(s, rec, &val, &vlen) != 0)
        return -ENOMEM;
    rocksdb_writebatch_put(wb, (const char *)k, klen, val, vlen);
    free(val);
    return 0;
}

/* Creates an account and its first token in one synced batch. */
static int account_create(tt_store *st, const char *name, uint64_t *account_id, char token[TT_TOKEN_LEN + 1])
{
    int64_t now = tt_now_ms();
    acct_rec a = {1, store_last_id(st, K_ACCOUNT) + 1, (char *)name, now};
    tt_token_new(token);
    uint8_t hash[TT_HASH_BYTES];
    tt_hash(NULL, token, TT_TOKEN_LEN, hash);
    char prefix[8];
    memcpy(prefix, token, 7);
    prefix[7] = 0;
    tok_rec t = {1, store_high_water(st, K_TOKEN, "last_token_id") + 1, a.id, "initial", prefix, now, 0,
                 {hash, sizeof(hash)}};
    rocksdb_writebatch_t *wb = rocksdb_writebatch_create();
    uint8_t k[KEY_MAX], idv[8];
    int rc = batch_put_rec(wb, k, key_u64(k, K_ACCOUNT, a.id), &acct_schema, &a);
    rc |= batch_put_rec(wb, k, key_u64(k, K_TOKEN, t.id), &tok_schema, &t);
    key_put_u64(idv, t.id);
    rocksdb_writebatch_put(wb, (const char *)k, key_tokhash(k, hash), (const char *)idv, 8);
    rocksdb_writebatch_put(wb, (const char *)k, key_meta(k, "last_token_id"), (const char *)idv, 8);
    if (rc == 0)
        rc = direct_write(st, wb);
    rocksdb_writebatch_destroy(wb);
    if (rc == 0)
        *account_id = a.id;
    return rc;
}

/* ---- data directory --------------------------------------------------------------- */

/* Creates dir and its missing parents (like mkdir -p). */
static int ensure_dir(const char *dir)
{
    char path[4096];
    if (snprintf(path, sizeof(path), "%s", dir) >= (int)sizeof(path))
        return -ENAMETOOLONG;
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        if (mkdir(path, 0700) != 0 && errno != EEXIST) {
            LOG_ERROR("cannot create the data directory %s: %s", path, strerror(errno));
            return -errno;
        }
        *p = '/';
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        LOG_ERROR("cannot create the data directory %s: %s", dir, strerror(errno));
        return -errno;
    }
    return 0;
}

static int open_data(const char *data_dir, tt_store **st, char **db_dir)
{
    int rc = ensure_dir(data_dir);
    if (rc)
        return rc;
    size_t n = strlen(data_dir) + 8;
    *db_dir = malloc(n);
    if (!*db_dir)
        return -ENOMEM;
    snprintf(*db_dir, n, "%s/db", data_dir);
    rc = store_open(*db_dir, st);
    if (rc) {
        free(*db_dir);
        *db_dir = NULL;
    }
    return rc;
}

static int write_initial_token(const char *data_dir, const char *token)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/initial-token", data_dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    fchmod(fd, 0600);
    size_t len = strlen(token);
    int rc = write(fd, token, len) == (ssize_t)len && write(fd, "\n", 1) == 1 ? 0 : -EIO;
    fsync(fd);
    close(fd);
    return rc;
}

/* ---- options ---------------------------------------------------------------------- */

static char *own(tt_server *srv, int slot, const char *s)
{
    srv->owned[slot] = s ? strdup(s) : NULL;
    return srv->owned[slot];
}

static int check_options(const tt_server_options *o)
{
    if (!o || o->version != TT_SERVER_OPTIONS_VERSION)
        return -EINVAL;
    if (!o->listen || !o->data_dir || !o->mqtt_url || !o->topic_root || !*o->topic_root)
        return -EINVAL;
    if (o->mqtt_links < 0 || o->mqtt_links > 64 || o->http_threads < 1 || o->http_threads > 4096 ||
        o->window < 1 || o->window > 1000 || o->dispatch_timeout_s < 1 || o->dispatch_timeout_s > 86400 ||
        o->sched_threads < 0 || o->sched_threads > 256 || o->pin_cache_entries < 1)
        return -ERANGE;
    if (!o->otp_template || !strstr(o->otp_template, "{code}") || strlen(o->otp_template) > 1000) {
        LOG_ERROR("the OTP template must contain {code} and be at most 1000 characters");
        return -EINVAL;
    }
    return 0;
}

int tt_server_create(const tt_server_options *opts, tt_server **out)
{
    int rc = check_options(opts);
    if (rc)
        return rc;
    if (opts->log_fn)
        tt_log_set_sink(opts->log_fn, opts->log_arg);
    tt_log_level = opts->log_level;
    if (tt_crypto_init() != 0)
        return -EIO;
    tt_server *srv = calloc(1, sizeof(*srv));
    if (!srv)
        return -ENOMEM;
    srv->o = *opts;
    srv->o.listen = own(srv, 0, opts->listen);
    srv->o.data_dir = own(srv, 1, opts->data_dir);
    srv->o.mqtt_url = own(srv, 2, opts->mqtt_url);
    srv->o.mqtt_username = own(srv, 3, opts->mqtt_username);
    srv->o.mqtt_password = own(srv, 4, opts->mqtt_password);
    srv->o.mqtt_client_prefix = own(srv, 5, opts->mqtt_client_prefix ? opts->mqtt_client_prefix : "taratxt");
    srv->o.topic_root = own(srv, 6, opts->topic_root);
    srv->o.device_mqtt_url = own(srv, 7, opts->device_mqtt_url);
    srv->o.otp_template = own(srv, 8, opts->otp_template);
    atomic_init(&srv->store_ok, 1);

    rc = open_data(srv->o.data_dir, &srv->store, &srv->db_dir);
    if (rc)
        goto fail;
    char path[4096];
    snprintf(path, sizeof(path), "%s/server.key", srv->o.data_dir);
    rc = tt_key_load_or_create(path, srv->key);
    if (rc) {
        LOG_ERROR("cannot load or create the server key %s: %s", path, strerror(-rc));
        goto fail;
    }
    if (store_last_id(srv->store, K_ACCOUNT) == 0) {
        char token[TT_TOKEN_LEN + 1];
        uint64_t id;
        rc = account_create(srv->store, "default", &id, token);
        if (rc)
            goto fail;
        srv->initial_token = strdup(token);
        if (write_initial_token(srv->o.data_dir, token) != 0)
            LOG_WARN("could not write %s/initial-token", srv->o.data_dir);
        LOG_INFO("fresh data directory %s: created account \"default\"; its token is in %s/initial-token",
                 srv->o.data_dir, srv->o.data_dir);
        if (opts->print_initial_token) {
            printf("Account \"default\" created. Its API token (shown once, also in %s/initial-token):\n%s\n",
                   srv->o.data_dir, token);
            fflush(stdout);
        }
    }
    atomic_init(&srv->next_message_id, store_last_id(srv->store, K_MESSAGE) + 1);
    *out = srv;
    return 0;
fail:
    tt_server_destroy(srv);
    return rc;
}

static int on_packet(void *app, uint64_t device_id, int kind, const void *payload, size_t len)
{
    return device_offer_packet(app, device_id, kind, payload, len);
}

static void on_link(void *app, uint64_t device_id, int up) { device_link_changed(app, device_id, up); }

typedef struct devlist {
    tt_server *srv;
    dynsec_device *v;
    size_t n, cap;
} devlist;

static int collect_device(const uint8_t *key, size_t klen, const char *val, size_t vlen, void *arg)
{
    devlist *l = arg;
    dev_rec d = {0};
    if (klen != 9 || rt_codec_decode(&dev_schema, val, vlen, &d) != 0)
        return 0;
    uint8_t *pw = NULL;
    size_t pwlen = 0;
    if (tt_unseal(l->srv->key, d.password_sealed.ptr, d.password_sealed.len, &pw, &pwlen) == 0) {
        if (TT_VEC_RESERVE(l->v, l->cap, l->n + 1, 64) != 0) {
            free(pw);
            rt_codec_free(&dev_schema, &d);
            return 1;
        }
        l->v[l->n++] = (dynsec_device){d.id, (char *)pw};
    } else {
        LOG_ERROR("device %" PRIu64 ": its sealed password does not open with this server key", d.id);
    }
    rt_codec_free(&dev_schema, &d);
    return 0;
}

/* dynsec's reconciliation: every device with its password (unsealed). */
static int list_devices(void *app, dynsec_device **out, size_t *n)
{
    devlist l = {app, NULL, 0, 0};
    uint8_t prefix[1] = {K_DEVICE};
    int rc = store_scan(l.srv->store, prefix, 1, NULL, 0, SIZE_MAX, collect_device, &l);
    if (rc < 0) {
        for (size_t i = 0; i < l.n; i++)
            free(l.v[i].password);
        free(l.v);
        return rc;
    }
    *out = l.v;
    *n = l.n;
    return 0;
}

int tt_server_start(tt_server *srv)
{
    if (srv->started)
        return -EALREADY;
    int rc = -ENOMEM;
    srv->sched = rt_sched_new(srv->o.sched_threads);
    if (!srv->sched)
        goto fail;
    srv->persist = persist_new(srv->sched, srv->store, &srv->store_ok);
    if (!srv->persist)
        goto fail;
    links_config lc = {srv->o.mqtt_url, srv->o.mqtt_username, srv->o.mqtt_password, srv->o.mqtt_client_prefix,
                       srv->o.topic_root, srv->o.mqtt_links, on_packet, on_link, srv};
    if ((rc = links_new(&lc, &srv->links)) != 0)
        goto fail;
    dynsec_config dc = {srv->o.mqtt_url, srv->o.mqtt_username, srv->o.mqtt_password, srv->o.mqtt_client_prefix,
                        srv->o.topic_root, list_devices, srv};
    if ((rc = dynsec_new(&dc, &srv->dynsec)) != 0)
        goto fail;
    rc = -EIO;
    srv->router = router_new(srv);
    if (!srv->router)
        goto fail;
    srv->otp = otp_new(srv);
    if (!srv->otp)
        goto fail;
    if ((rc = rt_sched_start(srv->sched)) != 0)
        goto fail;
    /* The listener before the broker connections, so a taken port fails
     * the start at once. */
    size_t nroutes;
    const http_route *routes = handlers_routes(&nroutes);
    http_config hc = {srv->o.listen, srv->o.http_threads, routes, nroutes, "/api/v1", handlers_auth, srv,
                      handlers_on_response};
    if ((rc = http_start(&hc, &srv->http)) != 0)
        goto fail;
    if ((rc = links_start(srv->links)) != 0 || (rc = dynsec_start(srv->dynsec)) != 0)
        goto fail;
    srv->started = 1;
    LOG_INFO("taratxt %s listening on http://%s (data %s, broker %s, %d %s)", TT_VERSION_STRING, srv->o.listen,
             srv->o.data_dir, srv->o.mqtt_url, srv->o.mqtt_links ? srv->o.mqtt_links : 1,
             srv->o.mqtt_links ? "links" : "link per device");
    return 0;
fail:
    srv->started = 1; /* so stop tears down what was made */
    tt_server_stop(srv);
    return rc;
}

int tt_server_stop(tt_server *srv)
{
    if (!srv || !srv->started)
        return 0;
    srv->started = 0;
    if (srv->http) {
        http_stop(srv->http); /* no new requests; those running got their answers */
        srv->http = NULL;
    }
    if (srv->router) { /* tokens' last use goes to disk with the drain */
        rt_envelope *tick = rt_envelope_new(ROUTER_TICK, PROTO_V1, NULL, 0);
        if (tick && rt_send(srv->router, tick) != 0)
            rt_envelope_free(tick);
    }
    if (srv->sched)
        rt_sched_stop(srv->sched); /* actors drain, persist commits */
    if (srv->dynsec) {
        dynsec_free(srv->dynsec);
        srv->dynsec = NULL;
    }
    if (srv->links) {
        links_free(srv->links);
        srv->links = NULL;
    }
    if (srv->sched) {
        rt_sched_free(srv->sched);
        srv->sched = NULL;
        srv->persist = srv->router = srv->otp = NULL;
    }
    handlers_free_waiters();
    LOG_INFO("stopped; everything accepted is on disk");
    return 0;
}

void tt_server_destroy(tt_server *srv)
{
    if (!srv)
        return;
    tt_server_stop(srv);
    store_close(srv->store);
    devreg_free(&srv->reg);
    for (size_t i = 0; i < sizeof(srv->owned) / sizeof(srv->owned[0]); i++)
        free(srv->owned[i]);
    free(srv->db_dir);
    free(srv->initial_token);
    sodium_memzero(srv->key, sizeof(srv->key));
    free(srv);
}

int tt_server_http_port(const tt_server *srv) { return srv->http ? http_port(srv->http) : -1; }
const char *tt_server_initial_token(const tt_server *srv) { return srv->initial_token; }
const char *tt_version(void) { return TT_VERSION_STRING; }

int tt_account_create(const char *data_dir, const char *name, uint64_t *account_id, char token[36])
{
    if (!data_dir || !name || !*name)
        return -EINVAL;
    if (tt_crypto_init() != 0)
        return -EIO;
    tt_store *st;
    char *db_dir;
    int rc = open_data(data_dir, &st, &db_dir);
    if (rc)
        return rc;
    rc = account_create(st, name, account_id, token);
    store_close(st);
    free(db_dir);
    return rc;
}

const char *tt_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case -EINVAL:
        return "invalid options";
    case -ERANGE:
        return "an option is out of range";
    case -EIO:
        return "the data store could not be opened or written (is another taratxtd using it?)";
    case -EADDRINUSE:
        return "the listen address is in use";
    default:
        return strerror(err < 0 ? -err : err);
    }
}
