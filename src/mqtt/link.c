/* link.c: paho MQTTAsync clients shared by device actors.
 *
 * Each link owns one paho client, the set of device ids bound to it, and its
 * connection state. paho runs callbacks on its own threads under a global
 * lock; they only flip state and call the app's non-blocking hooks. A
 * supervisor thread (re)connects links that are down, with backoff. */
#include "mqtt/link.h"

#include <MQTTAsync.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/clock.h"
#include "util/log.h"
#include "util/vec.h"

enum { LS_DOWN = 0, LS_CONNECTING = 1, LS_UP = 2 };

typedef struct link {
    mqtt_links *owner;
    int index;
    uint64_t solo_device;       /* per-device mode: the one device, else 0 */
    MQTTAsync client;
    int client_version;         /* the protocol version client was made for */
    int mqtt_version;           /* 5, or 4 (3.1.1) after the broker refused 5 */
    _Atomic int state;
    int64_t next_attempt_ms;    /* supervisor's backoff schedule */
    int backoff_ms;
    int logged_down;
    pthread_mutex_t mu;         /* guards devices */
    uint64_t *devices;
    size_t ndev, capdev;
} link;

struct mqtt_links {
    links_config cfg;
    char *url, *username, *password, *prefix, *root;
    pthread_mutex_t mu;          /* guards links array growth (per-device mode) */
    link **links;
    size_t nlinks, caplinks;
    pthread_t supervisor;
    pthread_mutex_t sup_mu;
    pthread_cond_t sup_cv;
    int stopping;
    int started;
};

static char *dupstr(const char *s) { return s ? strdup(s) : NULL; }

static link *link_for(mqtt_links *l, uint64_t device_id, int create);

/* ---- device sets ---------------------------------------------------------- */

static int link_add_device(link *k, uint64_t id)
{
    pthread_mutex_lock(&k->mu);
    for (size_t i = 0; i < k->ndev; i++)
        if (k->devices[i] == id) {
            pthread_mutex_unlock(&k->mu);
            return 0;
        }
    if (TT_VEC_RESERVE(k->devices, k->capdev, k->ndev + 1, 16) != 0) {
        pthread_mutex_unlock(&k->mu);
        return -ENOMEM;
    }
    k->devices[k->ndev++] = id;
    pthread_mutex_unlock(&k->mu);
    return 0;
}

static void link_remove_device(link *k, uint64_t id)
{
    pthread_mutex_lock(&k->mu);
    for (size_t i = 0; i < k->ndev; i++)
        if (k->devices[i] == id) {
            k->devices[i] = k->devices[--k->ndev];
            break;
        }
    pthread_mutex_unlock(&k->mu);
}

/* Copies the bound ids so callbacks can run without the lock. */
static uint64_t *link_snapshot(link *k, size_t *n)
{
    pthread_mutex_lock(&k->mu);
    uint64_t *v = malloc((k->ndev ? k->ndev : 1) * sizeof(*v));
    *n = 0;
    if (v && k->ndev) {
        memcpy(v, k->devices, k->ndev * sizeof(*v));
        *n = k->ndev;
    }
    pthread_mutex_unlock(&k->mu);
    return v;
}

/* ---- topics ----------------------------------------------------------------- */

static const char *const kinds[] = {"status", "report", "inbound"};

static void topic_for(const mqtt_links *l, uint64_t id, const char *suffix, char *buf, size_t len)
{
    snprintf(buf, len, "%s/devices/%" PRIu64 "/%s", l->root, id, suffix);
}

/* Parses "<root>/devices/<id>/<kind>". 0 or -EINVAL. */
static int topic_parse(const mqtt_links *l, const char *t, size_t tlen, uint64_t *id, int *kind)
{
    size_t rl = strlen(l->root);
    if (tlen < rl + 10 || memcmp(t, l->root, rl) != 0 || memcmp(t + rl, "/devices/", 9) != 0)
        return -EINVAL;
    const char *p = t + rl + 9, *end = t + tlen;
    uint64_t v = 0;
    int digits = 0;
    while (p < end && *p >= '0' && *p <= '9' && digits < 19) {
        v = v * 10 + (uint64_t)(*p - '0');
        p++;
        digits++;
    }
    if (!digits || p >= end || *p != '/')
        return -EINVAL;
    p++;
    for (int k = 0; k < 3; k++) {
        size_t kl = strlen(kinds[k]);
        if ((size_t)(end - p) == kl && memcmp(p, kinds[k], kl) == 0) {
            *id = v;
            *kind = k;
            return 0;
        }
    }
    return -EINVAL;
}

/* ---- paho callbacks ----------------------------------------------------------- */

static int on_arrived(void *ctx, char *topic, int topiclen, MQTTAsync_message *m)
{
    link *k = ctx;
    mqtt_links *l = k->owner;
    size_t tlen = topiclen > 0 ? (size_t)topiclen : strlen(topic);
    uint64_t id;
    int kind;
    if (topic_parse(l, topic, tlen, &id, &kind) == 0) {
        if (!l->cfg.on_message(l->cfg.app, id, kind, m->payload, (size_t)m->payloadlen))
            return 0; /* paho offers it again later; nothing is freed */
    } else {
        LOG_WARN("mqtt: ignoring a packet on unexpected topic %.*s", (int)tlen, topic);
    }
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

static void notify_devices(link *k, int up)
{
    size_t n;
    uint64_t *ids = link_snapshot(k, &n);
    for (size_t i = 0; ids && i < n; i++)
        k->owner->cfg.on_link(k->owner->cfg.app, ids[i], up);
    free(ids);
}

static void on_lost(void *ctx, char *cause)
{
    link *k = ctx;
    LOG_WARN("mqtt: link %d lost its connection%s%s; reconnecting", k->index, cause ? ": " : "",
             cause ? cause : "");
    /* The backoff fields first: the release store of state publishes them
     * to the supervisor, which reads them after seeing DOWN. */
    k->backoff_ms = 1000;
    k->next_attempt_ms = tt_mono_ms() + k->backoff_ms;
    atomic_store_explicit(&k->state, LS_DOWN, memory_order_release);
    notify_devices(k, 0);
}

/* MQTT 5: the broker closed the session with a DISCONNECT packet (for
 * example an administrative disconnect when our broker role changes). paho
 * reports that here, not as a lost connection. */
static void on_disconnected5(void *ctx, MQTTProperties *props, enum MQTTReasonCodes rc)
{
    link *k = ctx;
    char why[64];
    snprintf(why, sizeof(why), "the broker disconnected it (reason %d)", (int)rc);
    on_lost(k, why);
}

static void subscribe_ids(link *k, const uint64_t *ids, size_t n)
{
    /* Subscribe in chunks: each device has three topics. */
    enum { CHUNK = 64 };
    char *topics[CHUNK * 3];
    int qos[CHUNK * 3];
    for (size_t base = 0; base < n; base += CHUNK) {
        size_t cnt = n - base < CHUNK ? n - base : CHUNK;
        size_t t = 0;
        for (size_t i = 0; i < cnt; i++)
            for (int kd = 0; kd < 3; kd++) {
                topics[t] = malloc(128);
                if (!topics[t])
                    continue;
                topic_for(k->owner, ids[base + i], kinds[kd], topics[t], 128);
                qos[t] = 1;
                t++;
            }
        MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
        int rc = MQTTAsync_subscribeMany(k->client, (int)t, topics, qos, &ro);
        if (rc != MQTTASYNC_SUCCESS)
            LOG_WARN("mqtt: link %d could not subscribe %zu devices (paho %d)", k->index, cnt, rc);
        for (size_t i = 0; i < t; i++)
            free(topics[i]);
    }
}

static void on_connected(link *k)
{
    if (k->logged_down)
        LOG_INFO("mqtt: link %d connected to %s", k->index, k->owner->url);
    else
        LOG_DEBUG("mqtt: link %d connected to %s", k->index, k->owner->url);
    k->backoff_ms = 1000;
    k->logged_down = 0;
    atomic_store_explicit(&k->state, LS_UP, memory_order_release);
    size_t n;
    uint64_t *ids = link_snapshot(k, &n);
    if (ids && n)
        subscribe_ids(k, ids, n);
    free(ids);
    notify_devices(k, 1);
}

static void on_connect_ok5(void *ctx, MQTTAsync_successData5 *r) { on_connected(ctx); }
static void on_connect_ok(void *ctx, MQTTAsync_successData *r) { on_connected(ctx); }

static void connect_failed(link *k, int code, int reason, const char *msg)
{
    if (k->mqtt_version == MQTTVERSION_5 &&
        (reason == MQTTREASONCODE_UNSUPPORTED_PROTOCOL_VERSION ||
         code == 1 /* 3.1.1 CONNACK: unacceptable protocol version */)) {
        LOG_WARN("mqtt: broker refuses MQTT 5 on link %d; using 3.1.1", k->index);
        k->mqtt_version = MQTTVERSION_3_1_1;
        k->backoff_ms = 0;
    }
    if (!k->logged_down) {
        LOG_WARN("mqtt: link %d cannot connect to %s (%s); retrying with backoff", k->index,
                 k->owner->url, msg ? msg : "connection refused");
        k->logged_down = 1;
    }
    k->next_attempt_ms = tt_mono_ms() + k->backoff_ms;
    k->backoff_ms = k->backoff_ms ? (k->backoff_ms * 2 > 30000 ? 30000 : k->backoff_ms * 2) : 1000;
    atomic_store_explicit(&k->state, LS_DOWN, memory_order_release);
}

static void on_connect_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
    connect_failed(ctx, r ? r->code : -1, r ? (int)r->reasonCode : 0, r ? r->message : NULL);
}

static void on_connect_fail(void *ctx, MQTTAsync_failureData *r)
{
    connect_failed(ctx, r ? r->code : -1, 0, r ? r->message : NULL);
}

/* Creates the paho client for k's current MQTT version. */
static int link_create_client(link *k)
{
    mqtt_links *l = k->owner;
    char cid[96];
    if (k->solo_device)
        snprintf(cid, sizeof(cid), "%s-dev-%" PRIu64, l->prefix, k->solo_device);
    else
        snprintf(cid, sizeof(cid), "%s-link-%d", l->prefix, k->index);
    if (k->client)
        MQTTAsync_destroy(&k->client);
    MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
    co.MQTTVersion = k->mqtt_version;
    int rc = MQTTAsync_createWithOptions(&k->client, l->url, cid, MQTTCLIENT_PERSISTENCE_NONE, NULL, &co);
    if (rc != MQTTASYNC_SUCCESS) {
        LOG_ERROR("mqtt: cannot create a client for %s (paho %d)", l->url, rc);
        k->client = NULL;
        return -EINVAL;
    }
    MQTTAsync_setCallbacks(k->client, k, on_lost, on_arrived, NULL);
    if (k->mqtt_version == MQTTVERSION_5)
        MQTTAsync_setDisconnected(k->client, k, on_disconnected5);
    k->client_version = k->mqtt_version;
    return 0;
}

static void link_connect(link *k)
{
    mqtt_links *l = k->owner;
    if (atomic_load_explicit(&k->state, memory_order_acquire) != LS_DOWN)
        return;
    /* The client is made once, and again only to change protocol version. */
    if ((!k->client || k->client_version != k->mqtt_version) && link_create_client(k) != 0)
        return;
    if (MQTTAsync_isConnected(k->client))
        return;
    atomic_store_explicit(&k->state, LS_CONNECTING, memory_order_release);
    int rc;
    if (k->mqtt_version == MQTTVERSION_5) {
        MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer5;
        MQTTProperties props = MQTTProperties_initializer;
        MQTTProperty p = {.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL};
        p.value.integer4 = 7 * 24 * 3600;
        MQTTProperties_add(&props, &p);
        o.cleanstart = 0;
        o.connectProperties = &props;
        o.keepAliveInterval = 20;
        o.maxInflight = 65535;
        o.username = l->username;
        o.password = l->password;
        o.context = k;
        o.onSuccess5 = on_connect_ok5;
        o.onFailure5 = on_connect_fail5;
        o.connectTimeout = 5;
        rc = MQTTAsync_connect(k->client, &o);
        MQTTProperties_free(&props);
    } else {
        MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer;
        o.cleansession = 0;
        o.keepAliveInterval = 20;
        o.maxInflight = 65535;
        o.username = l->username;
        o.password = l->password;
        o.context = k;
        o.onSuccess = on_connect_ok;
        o.onFailure = on_connect_fail;
        o.connectTimeout = 5;
        rc = MQTTAsync_connect(k->client, &o);
    }
    if (rc != MQTTASYNC_SUCCESS)
        connect_failed(k, rc, 0, "connect call failed");
}

static void *supervisor_main(void *arg)
{
    mqtt_links *l = arg;
    pthread_mutex_lock(&l->sup_mu);
    while (!l->stopping) {
        pthread_mutex_unlock(&l->sup_mu);
        int64_t now = tt_mono_ms();
        pthread_mutex_lock(&l->mu);
        size_t n = l->nlinks;
        pthread_mutex_unlock(&l->mu);
        for (size_t i = 0; i < n; i++) {
            pthread_mutex_lock(&l->mu);
            link *k = l->links[i];
            pthread_mutex_unlock(&l->mu);
            if (k && atomic_load_explicit(&k->state, memory_order_acquire) == LS_UP && k->client &&
                !MQTTAsync_isConnected(k->client))
                on_lost(k, "the connection is gone");
            if (k && atomic_load_explicit(&k->state, memory_order_acquire) == LS_DOWN &&
                now >= k->next_attempt_ms)
                link_connect(k);
        }
        pthread_mutex_lock(&l->sup_mu);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 200 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        if (!l->stopping)
            pthread_cond_timedwait(&l->sup_cv, &l->sup_mu, &ts);
    }
    pthread_mutex_unlock(&l->sup_mu);
    return NULL;
}

/* ---- public --------------------------------------------------------------------- */

static link *link_new(mqtt_links *l, int index, uint64_t solo)
{
    link *k = calloc(1, sizeof(*k));
    if (!k)
        return NULL;
    k->owner = l;
    k->index = index;
    k->solo_device = solo;
    k->mqtt_version = MQTTVERSION_5;
    k->backoff_ms = 1000;
    pthread_mutex_init(&k->mu, NULL);
    atomic_init(&k->state, LS_DOWN);
    return k;
}

int links_new(const links_config *cfg, mqtt_links **out)
{
    mqtt_links *l = calloc(1, sizeof(*l));
    if (!l)
        return -ENOMEM;
    l->cfg = *cfg;
    l->url = dupstr(cfg->url);
    l->username = dupstr(cfg->username);
    l->password = dupstr(cfg->password);
    l->prefix = dupstr(cfg->client_prefix ? cfg->client_prefix : "taratxt");
    l->root = dupstr(cfg->topic_root ? cfg->topic_root : "taratxt/v1");
    pthread_mutex_init(&l->mu, NULL);
    pthread_mutex_init(&l->sup_mu, NULL);
    pthread_cond_init(&l->sup_cv, NULL);
    if (cfg->nlinks > 0) {
        l->links = calloc((size_t)cfg->nlinks, sizeof(link *));
        l->caplinks = l->nlinks = (size_t)cfg->nlinks;
        for (int i = 0; l->links && i < cfg->nlinks; i++)
            l->links[i] = link_new(l, i, 0);
    }
    *out = l;
    return 0;
}

int links_start(mqtt_links *l)
{
    if (pthread_create(&l->supervisor, NULL, supervisor_main, l) != 0)
        return -EAGAIN;
    l->started = 1;
    return 0;
}

void links_free(mqtt_links *l)
{
    if (!l)
        return;
    if (l->started) {
        pthread_mutex_lock(&l->sup_mu);
        l->stopping = 1;
        pthread_cond_signal(&l->sup_cv);
        pthread_mutex_unlock(&l->sup_mu);
        pthread_join(l->supervisor, NULL);
    }
    for (size_t i = 0; i < l->nlinks; i++) {
        link *k = l->links[i];
        if (!k)
            continue;
        if (k->client) {
            if (MQTTAsync_isConnected(k->client)) {
                MQTTAsync_disconnectOptions d = MQTTAsync_disconnectOptions_initializer;
                d.timeout = 1000;
                MQTTAsync_disconnect(k->client, &d);
                for (int w = 0; w < 100 && MQTTAsync_isConnected(k->client); w++) {
                    struct timespec ts = {0, 10 * 1000000L};
                    nanosleep(&ts, NULL);
                }
            }
            MQTTAsync_destroy(&k->client);
        }
        free(k->devices);
        pthread_mutex_destroy(&k->mu);
        free(k);
    }
    free(l->links);
    free(l->url);
    free(l->username);
    free(l->password);
    free(l->prefix);
    free(l->root);
    free(l);
}

static link *link_for(mqtt_links *l, uint64_t device_id, int create)
{
    if (l->cfg.nlinks > 0)
        return l->links[device_id % (uint64_t)l->cfg.nlinks];
    pthread_mutex_lock(&l->mu);
    link *found = NULL;
    /* Per-device mode: index i holds device i+1's link (ids are dense). */
    if (device_id >= 1 && device_id <= l->nlinks)
        found = l->links[device_id - 1];
    if (!found && create) {
        if (device_id > l->caplinks) {
            size_t cap = l->caplinks ? l->caplinks : 64;
            while (cap < device_id)
                cap *= 2;
            link **v = realloc(l->links, cap * sizeof(*v));
            if (v) {
                memset(v + l->caplinks, 0, (cap - l->caplinks) * sizeof(*v));
                l->links = v;
                l->caplinks = cap;
            }
        }
        if (device_id <= l->caplinks) {
            found = l->links[device_id - 1] = link_new(l, (int)(device_id - 1), device_id);
            if (l->nlinks < device_id)
                l->nlinks = device_id;
        }
    }
    pthread_mutex_unlock(&l->mu);
    return found;
}

int links_bind(mqtt_links *l, uint64_t device_id)
{
    link *k = link_for(l, device_id, 1);
    if (!k)
        return -ENOMEM;
    int rc = link_add_device(k, device_id);
    if (rc)
        return rc;
    if (atomic_load_explicit(&k->state, memory_order_acquire) == LS_UP)
        subscribe_ids(k, &device_id, 1);
    else {
        pthread_mutex_lock(&l->sup_mu);
        pthread_cond_signal(&l->sup_cv);
        pthread_mutex_unlock(&l->sup_mu);
    }
    return 0;
}

int links_unbind(mqtt_links *l, uint64_t device_id)
{
    link *k = link_for(l, device_id, 0);
    if (!k)
        return 0;
    link_remove_device(k, device_id);
    if (atomic_load_explicit(&k->state, memory_order_acquire) == LS_UP) {
        char *topics[3];
        char bufs[3][128];
        for (int i = 0; i < 3; i++) {
            topic_for(l, device_id, kinds[i], bufs[i], sizeof(bufs[i]));
            topics[i] = bufs[i];
        }
        MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
        MQTTAsync_unsubscribeMany(k->client, 3, topics, &ro);
    }
    return 0;
}

static void on_publish_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
    LOG_WARN("mqtt: the broker refused a publish (reason %d%s%s)", r ? (int)r->reasonCode : -1,
             r && r->message ? ": " : "", r && r->message ? r->message : "");
}

int links_publish(mqtt_links *l, uint64_t device_id, const char *suffix, const void *payload,
                  size_t len, int retained)
{
    link *k = link_for(l, device_id, 0);
    if (!k || !k->client || atomic_load_explicit(&k->state, memory_order_acquire) != LS_UP)
        return -ENOTCONN;
    char topic[128];
    topic_for(l, device_id, suffix, topic, sizeof(topic));
    MQTTAsync_message m = MQTTAsync_message_initializer;
    m.payload = (void *)payload;
    m.payloadlen = (int)len;
    m.qos = 1;
    m.retained = retained;
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    if (k->mqtt_version == MQTTVERSION_5)
        ro.onFailure5 = on_publish_fail5;
    int rc = MQTTAsync_sendMessage(k->client, topic, &m, &ro);
    if (rc == MQTTASYNC_SUCCESS)
        return 0;
    if (rc == MQTTASYNC_DISCONNECTED)
        return -ENOTCONN;
    if (rc == MQTTASYNC_MAX_BUFFERED_MESSAGES || rc == MQTTASYNC_MAX_MESSAGES_INFLIGHT)
        return -EAGAIN;
    LOG_WARN("mqtt: publish to %s failed (paho %d)", topic, rc);
    return -EIO;
}

void links_status(mqtt_links *l, int *up, int *total)
{
    int u = 0, t = 0;
    pthread_mutex_lock(&l->mu);
    for (size_t i = 0; i < l->nlinks; i++) {
        if (!l->links[i])
            continue;
        t++;
        if (atomic_load_explicit(&l->links[i]->state, memory_order_acquire) == LS_UP)
            u++;
    }
    pthread_mutex_unlock(&l->mu);
    *up = u;
    *total = t;
}
