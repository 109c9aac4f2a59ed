/* dynsec.c: keeps mosquitto's dynamic-security plugin in step with the
 * server's devices (API.md section 8, "Broker access").
 *
 * One thread owns one paho client (id "<prefix>-admin", MQTT 5 with a 3.1.1
 * fallback, clean session) and does everything in order: connect with
 * backoff, learn whether the broker can be managed, ensure the server's role,
 * reconcile the broker's "device-<id>" clients with the app's devices, then
 * apply the queued puts and deletes. Callers only append to the queue.
 *
 * Plugin commands go out in batches (one publish with a "commands" array);
 * each command carries a correlationData "<tag>-<seq>-<index>" and the thread
 * waits for the answer on the response topic with a timeout. paho callbacks
 * run on paho's threads: they only record results under d->mu and signal
 * d->cv; the thread never calls paho while holding d->mu.
 *
 * Facts about mosquitto 2.0.11's plugin this code is shaped by (checked
 * against the broker): every command that changes something rewrites the
 * whole JSON file (about 45 ms at 3,000 devices); adding an ACL to a role or
 * a role to a client disconnects every connection of the affected clients,
 * the sender included, before the answer is sent; setClientPassword,
 * modifyClient with a password and deleteClient disconnect the device;
 * deleting a role that a client still holds leaves a dangling pointer that
 * crashes the broker on the next verbose listClients (so roles are taken
 * off their clients, or their clients deleted, first).
 *
 * So changes are made only where the broker differs: each device client's
 * textdescription holds a salted argon2id check value of its password, and a
 * password is set again only when the app's password does not match it (a
 * reconnect or restart of the server does not disconnect every device). The
 * one change that disconnects the server's own connections (its links too)
 * is giving its user the server role, done once per broker. */
#include "mqtt/dynsec.h"

#include <MQTTAsync.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/log.h"

#define DS_TOPIC "$CONTROL/dynamic-security/v1"
#define DS_RESPONSE_TOPIC "$CONTROL/dynamic-security/v1/response"
#define DS_SERVER_ROLE "taratxt-server"
#define DS_TIMEOUT_MS 5000        /* the answer to a probe must come within this */
#define DS_PER_COMMAND_MS 100     /* extra patience per command of a batch */
#define DS_BATCH 64               /* commands per publish */
#define DS_OPS_PER_ROUND 16       /* queued changes taken per round */
#define DS_PAGE 250               /* clients or roles per list command */
#define DS_RECONCILE_RETRY_MS 30000
#define DS_BACKOFF_MIN_MS 1000
#define DS_BACKOFF_MAX_MS 30000
#define DS_CHECK_PREFIX "taratxt-pw1 "

enum { OP_PUT = 1, OP_DELETE = 2 };

typedef struct ds_op {
    struct ds_op *next;
    uint64_t id;
    int kind;
    char *password;   /* OP_PUT only */
} ds_op;

/* Outcome of waiting for a paho request. */
enum { W_PENDING = 0, W_OK = 1, W_FAILED = 2, W_REFUSED = 3 };

struct dynsec {
    dynsec_config cfg;
    char *url, *username, *password, *client_id, *root;
    char tag[12];                 /* random, so our answers are told apart from other admins' */
    uint64_t seq;                 /* batch counter (dynsec thread only) */

    MQTTAsync client;
    int mqtt_version;             /* MQTTVERSION_5, or 3.1.1 after the broker refused 5 */
    int client_version;
    int server_client_warned;     /* logged that cfg->username is not a plugin client */

    /* Read by any thread through dynsec_state; written by the dynsec thread. */
    _Atomic int state;

    pthread_t thread;
    int started;

    pthread_mutex_t mu;           /* guards everything below */
    pthread_cond_t cv;
    int stopping;
    int connected;                /* the session is up (cleared by connection loss) */
    int conn_result;              /* W_* of the connect in flight */
    int conn_code, conn_reason;
    int sub_result;               /* W_* of the subscribe in flight */
    MQTTAsync_token refused_token; /* last publish the broker refused (MQTT 5) */
    char want_corr[48];           /* "<tag>-<seq>-" of the batch awaiting its answer */
    json_t *answer;               /* its "responses" array, once arrived */
    ds_op *head, *tail;           /* queued changes, oldest first, one per device */
};

static char *dupstr(const char *s) { return s ? strdup(s) : NULL; }

static void op_free(ds_op *o)
{
    if (!o)
        return;
    if (o->password) {
        sodium_memzero(o->password, strlen(o->password));
        free(o->password);
    }
    free(o);
}

static void ds_set_state(dynsec *d, int st, const char *why)
{
    /* Relaxed is enough: the state is a standalone answer for /healthz and
     * publishes no other data; only this thread writes it. */
    int old = atomic_exchange_explicit(&d->state, st, memory_order_relaxed);
    if (old == st)
        return;
    if (st == DYNSEC_UNMANAGED)
        LOG_WARN("dynsec: the broker's access control is not managed by this server (%s); "
                 "devices are not restricted to their own topics", why);
    else if (st == DYNSEC_MANAGED)
        LOG_INFO("dynsec: managing the broker's device access through its dynamic-security plugin");
}

/* ---- paho callbacks (paho threads) ----------------------------------------- */

static void on_lost(void *ctx, char *cause)
{
    dynsec *d = ctx;
    pthread_mutex_lock(&d->mu);
    d->connected = 0;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

/* The broker sent DISCONNECT (MQTT 5), e.g. 0x98 "administrative action"
 * when a command changed this user's roles: paho reports that here, not
 * through connectionLost. */
static void on_disconnected(void *ctx, MQTTProperties *props, enum MQTTReasonCodes reason)
{
    on_lost(ctx, NULL);
}

/* Takes an answer on the response topic if it belongs to the batch being
 * waited for (its first correlationData starts with want_corr). */
static int on_arrived(void *ctx, char *topic, int topiclen, MQTTAsync_message *m)
{
    dynsec *d = ctx;
    size_t tl = topiclen > 0 ? (size_t)topiclen : strlen(topic);
    if (tl == strlen(DS_RESPONSE_TOPIC) && memcmp(topic, DS_RESPONSE_TOPIC, tl) == 0 &&
        m->payloadlen > 0) {
        json_t *root = json_loadb(m->payload, (size_t)m->payloadlen, 0, NULL);
        json_t *rs = json_incref(json_object_get(root, "responses"));
        /* Drop the document first, so that rs has one owner when it is handed
         * over: the dynsec thread then frees it alone (jansson's refcounts
         * are atomic, but sanitizers do not see into the library). */
        json_decref(root);
        const char *corr = json_string_value(json_object_get(json_array_get(rs, 0), "correlationData"));
        if (json_is_array(rs) && corr) {
            pthread_mutex_lock(&d->mu);
            size_t wl = strlen(d->want_corr);
            if (wl && !d->answer && strncmp(corr, d->want_corr, wl) == 0) {
                d->answer = rs;
                rs = NULL;
                pthread_cond_broadcast(&d->cv);
            }
            pthread_mutex_unlock(&d->mu);
        }
        json_decref(rs);
    }
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

static void conn_done(dynsec *d, int result, int code, int reason)
{
    pthread_mutex_lock(&d->mu);
    d->conn_result = result;
    d->conn_code = code;
    d->conn_reason = reason;
    if (result == W_OK)
        d->connected = 1;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

static void on_conn_ok5(void *ctx, MQTTAsync_successData5 *r) { conn_done(ctx, W_OK, 0, 0); }
static void on_conn_ok(void *ctx, MQTTAsync_successData *r) { conn_done(ctx, W_OK, 0, 0); }
static void on_conn_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
    conn_done(ctx, W_FAILED, r ? r->code : -1, r ? (int)r->reasonCode : 0);
}
static void on_conn_fail(void *ctx, MQTTAsync_failureData *r)
{
    conn_done(ctx, W_FAILED, r ? r->code : -1, 0);
}

static void sub_done(dynsec *d, int result)
{
    pthread_mutex_lock(&d->mu);
    d->sub_result = result;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

/* A single-topic SUBACK: the MQTT 5 reason code is the granted QoS or a
 * refusal (0x80 and up); under 3.1.1 a refusal is the granted QoS 0x80. */
static void on_sub_ok5(void *ctx, MQTTAsync_successData5 *r)
{
    sub_done(ctx, r && (int)r->reasonCode >= 0x80 ? W_REFUSED : W_OK);
}
static void on_sub_ok(void *ctx, MQTTAsync_successData *r)
{
    sub_done(ctx, r && r->alt.qos >= 0x80 ? W_REFUSED : W_OK);
}
static void on_sub_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
    sub_done(ctx, r && (int)r->reasonCode >= 0x80 ? W_REFUSED : W_FAILED);
}
static void on_sub_fail(void *ctx, MQTTAsync_failureData *r) { sub_done(ctx, W_FAILED); }

static void pub_refused(dynsec *d, MQTTAsync_token token)
{
    pthread_mutex_lock(&d->mu);
    d->refused_token = token;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

/* A PUBACK with a reason code of 0x80 or more: the broker refused the
 * publish (0x87, not authorised, when the user may not use $CONTROL). */
static void on_pub_ok5(void *ctx, MQTTAsync_successData5 *r)
{
    if (r && (int)r->reasonCode >= 0x80)
        pub_refused(ctx, r->token);
}
static void on_pub_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
    if (r && (int)r->reasonCode >= 0x80)
        pub_refused(ctx, r->token);
}

/* ---- waiting ---------------------------------------------------------------- */

static void deadline_ts(int64_t deadline_mono, struct timespec *ts)
{
    /* The condvar uses CLOCK_MONOTONIC (set in dynsec_new). */
    int64_t ms = deadline_mono;
    ts->tv_sec = (time_t)(ms / 1000);
    ts->tv_nsec = (long)(ms % 1000) * 1000000L;
}

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits on d->cv (d->mu held) until signalled or the deadline; returns
 * nonzero once the deadline has passed. */
static int wait_until(dynsec *d, int64_t deadline)
{
    if (mono_ms() >= deadline)
        return 1;
    if (deadline == INT64_MAX) { /* no deadline */
        pthread_cond_wait(&d->cv, &d->mu);
        return 0;
    }
    struct timespec ts;
    deadline_ts(deadline, &ts);
    pthread_cond_timedwait(&d->cv, &d->mu, &ts);
    return mono_ms() >= deadline;
}

/* Sleeps up to ms unless stopping. Returns nonzero when stopping. */
static int ds_sleep(dynsec *d, int ms)
{
    int64_t deadline = mono_ms() + ms;
    pthread_mutex_lock(&d->mu);
    while (!d->stopping && !wait_until(d, deadline)) {
    }
    int stop = d->stopping;
    pthread_mutex_unlock(&d->mu);
    return stop;
}

/* ---- connection --------------------------------------------------------------- */

static int ds_create_client(dynsec *d)
{
    if (d->client)
        MQTTAsync_destroy(&d->client);
    MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
    co.MQTTVersion = d->mqtt_version;
    int rc = MQTTAsync_createWithOptions(&d->client, d->url, d->client_id, MQTTCLIENT_PERSISTENCE_NONE,
                                         NULL, &co);
    if (rc != MQTTASYNC_SUCCESS) {
        LOG_ERROR("dynsec: cannot create an MQTT client for %s (paho %d)", d->url, rc);
        d->client = NULL;
        return -EINVAL;
    }
    MQTTAsync_setCallbacks(d->client, d, on_lost, on_arrived, NULL);
    MQTTAsync_setDisconnected(d->client, d, on_disconnected);
    d->client_version = d->mqtt_version;
    return 0;
}

/* Connects and waits for the outcome. 0, -ECANCELED when stopping, or
 * -ECONNREFUSED (the caller backs off). Falls back to 3.1.1 when the broker
 * refuses MQTT 5. */
static int ds_connect(dynsec *d, int *logged_down)
{
    if ((!d->client || d->client_version != d->mqtt_version) && ds_create_client(d) != 0)
        return -ECONNREFUSED;
    pthread_mutex_lock(&d->mu);
    d->conn_result = W_PENDING;
    d->connected = 0;
    pthread_mutex_unlock(&d->mu);

    int rc;
    if (d->mqtt_version == MQTTVERSION_5) {
        MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer5;
        o.cleanstart = 1;
        o.keepAliveInterval = 30;
        o.connectTimeout = 10;
        o.username = d->username;
        o.password = d->password;
        o.onSuccess5 = on_conn_ok5;
        o.onFailure5 = on_conn_fail5;
        o.context = d;
        rc = MQTTAsync_connect(d->client, &o);
    } else {
        MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer;
        o.cleansession = 1;
        o.keepAliveInterval = 30;
        o.connectTimeout = 10;
        o.username = d->username;
        o.password = d->password;
        o.onSuccess = on_conn_ok;
        o.onFailure = on_conn_fail;
        o.context = d;
        rc = MQTTAsync_connect(d->client, &o);
    }
    if (rc != MQTTASYNC_SUCCESS) {
        if (!*logged_down)
            LOG_WARN("dynsec: cannot connect to %s (paho %d); retrying with backoff", d->url, rc);
        *logged_down = 1;
        return -ECONNREFUSED;
    }

    pthread_mutex_lock(&d->mu);
    while (d->conn_result == W_PENDING && !d->stopping)
        pthread_cond_wait(&d->cv, &d->mu);
    int result = d->conn_result, code = d->conn_code, reason = d->conn_reason;
    int stop = d->stopping;
    pthread_mutex_unlock(&d->mu);
    if (stop)
        return -ECANCELED;
    if (result == W_OK) {
        *logged_down = 0;
        return 0;
    }
    if (d->mqtt_version == MQTTVERSION_5 &&
        (reason == MQTTREASONCODE_UNSUPPORTED_PROTOCOL_VERSION || code == 1)) {
        LOG_INFO("dynsec: broker refuses MQTT 5; using 3.1.1");
        d->mqtt_version = MQTTVERSION_3_1_1;
    }
    if (!*logged_down)
        LOG_WARN("dynsec: cannot connect to %s (code %d, reason %d); retrying with backoff", d->url,
                 code, reason);
    *logged_down = 1;
    return -ECONNREFUSED;
}

static void ds_disconnect(dynsec *d)
{
    if (!d->client || !MQTTAsync_isConnected(d->client))
        return;
    MQTTAsync_disconnectOptions o = MQTTAsync_disconnectOptions_initializer;
    o.timeout = 1000;
    MQTTAsync_disconnect(d->client, &o);
    for (int i = 0; i < 150 && MQTTAsync_isConnected(d->client); i++) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&d->mu);
    d->connected = 0;
    pthread_mutex_unlock(&d->mu);
}

/* Subscribes to the plugin's response topic. 0, -EACCES when the broker
 * refuses the subscription, -ENOTCONN, -ETIMEDOUT or -ECANCELED. */
static int ds_subscribe(dynsec *d)
{
    pthread_mutex_lock(&d->mu);
    d->sub_result = W_PENDING;
    pthread_mutex_unlock(&d->mu);
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    ro.context = d;
    if (d->client_version == MQTTVERSION_5) {
        ro.onSuccess5 = on_sub_ok5;
        ro.onFailure5 = on_sub_fail5;
    } else {
        ro.onSuccess = on_sub_ok;
        ro.onFailure = on_sub_fail;
    }
    if (MQTTAsync_subscribe(d->client, DS_RESPONSE_TOPIC, 1, &ro) != MQTTASYNC_SUCCESS)
        return -ENOTCONN;
    int64_t deadline = mono_ms() + DS_TIMEOUT_MS;
    int rc = 0;
    pthread_mutex_lock(&d->mu);
    for (;;) {
        if (d->stopping) { rc = -ECANCELED; break; }
        if (d->sub_result == W_OK) { rc = 0; break; }
        if (d->sub_result == W_REFUSED) { rc = -EACCES; break; }
        if (d->sub_result == W_FAILED || !d->connected) { rc = -ENOTCONN; break; }
        if (wait_until(d, deadline)) { rc = -ETIMEDOUT; break; }
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

/* ---- commands ------------------------------------------------------------------ */

/* Sends cmds (an array of at most DS_BATCH command objects; each gets its
 * correlationData) in one publish and waits for the plugin's answer.
 * On 0, *answers[i] is the response to cmds[i] (borrowed from *holder,
 * which the caller decrefs; NULL when the plugin left one out).
 * -EACCES: the broker refused the publish; -ETIMEDOUT: no answer in time;
 * -ENOTCONN: the connection went; -ECANCELED: stopping; -ENOMEM. */
static int ds_exec(dynsec *d, json_t *cmds, json_t **answers, json_t **holder, int timeout_ms)
{
    size_t n = json_array_size(cmds);
    char prefix[48], corr[96];
    snprintf(prefix, sizeof(prefix), "%s-%" PRIu64 "-", d->tag, ++d->seq);
    for (size_t i = 0; i < n; i++) {
        snprintf(corr, sizeof(corr), "%s%zu", prefix, i);
        json_object_set_new(json_array_get(cmds, i), "correlationData", json_string(corr));
        answers[i] = NULL;
    }
    *holder = NULL;
    json_t *body = json_pack("{s:O}", "commands", cmds);
    char *payload = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!payload)
        return -ENOMEM;

    pthread_mutex_lock(&d->mu);
    snprintf(d->want_corr, sizeof(d->want_corr), "%s", prefix);
    json_decref(d->answer);
    d->answer = NULL;
    pthread_mutex_unlock(&d->mu);

    MQTTAsync_message m = MQTTAsync_message_initializer;
    m.payload = payload;
    m.payloadlen = (int)strlen(payload);
    m.qos = 1;
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    ro.context = d;
    if (d->client_version == MQTTVERSION_5) {
        ro.onSuccess5 = on_pub_ok5;
        ro.onFailure5 = on_pub_fail5;
    }
    int prc = MQTTAsync_sendMessage(d->client, DS_TOPIC, &m, &ro);
    free(payload);
    MQTTAsync_token token = ro.token;

    int rc = 0;
    int64_t deadline = mono_ms() + timeout_ms;
    pthread_mutex_lock(&d->mu);
    if (prc != MQTTASYNC_SUCCESS)
        rc = d->stopping ? -ECANCELED : -ENOTCONN;
    while (rc == 0) {
        if (d->answer) break;
        if (d->stopping) { rc = -ECANCELED; break; }
        if (token && d->refused_token == token) { rc = -EACCES; break; }
        if (!d->connected) { rc = -ENOTCONN; break; }
        if (wait_until(d, deadline)) { rc = d->answer ? 0 : -ETIMEDOUT; break; }
    }
    json_t *rs = d->answer;
    d->answer = NULL;
    d->want_corr[0] = '\0';
    pthread_mutex_unlock(&d->mu);

    if (rc != 0) {
        json_decref(rs);
        return rc;
    }
    size_t pl = strlen(prefix), k;
    json_t *r;
    json_array_foreach(rs, k, r) {
        const char *c = json_string_value(json_object_get(r, "correlationData"));
        if (!c || strncmp(c, prefix, pl) != 0)
            continue;
        char *end;
        unsigned long i = strtoul(c + pl, &end, 10);
        if (*end == '\0' && i < n)
            answers[i] = r;
    }
    *holder = rs;
    return 0;
}

static int batch_timeout(size_t n) { return DS_TIMEOUT_MS + (int)n * DS_PER_COMMAND_MS; }

static const char *answer_error(json_t *a)
{
    if (!a)
        return "no answer";
    return json_string_value(json_object_get(a, "error"));
}

static int is_not_found(const char *err) { return err && strstr(err, "not found") != NULL; }

/* Result handler for ds_run: called per command with its answer; returns 0
 * or a negative errno that stops the run. */
typedef int (*ds_result_fn)(dynsec *d, json_t *cmd, json_t *answer, void *arg);

static int log_failures(dynsec *d, json_t *cmd, json_t *answer, void *arg)
{
    const char *err = answer_error(answer);
    if (err)
        LOG_WARN("dynsec: %s %s failed: %s",
                 json_string_value(json_object_get(cmd, "command")),
                 json_string_value(json_object_get(cmd, json_object_get(cmd, "username") ? "username"
                                                                                         : "rolename")),
                 err);
    return 0;
}

/* Runs a list of commands in batches of DS_BATCH, in order, calling fn on
 * each answer (log_failures when NULL). Stops at the first batch that fails
 * and returns ds_exec's error. */
static int ds_run(dynsec *d, json_t *cmds, ds_result_fn fn, void *arg)
{
    size_t n = json_array_size(cmds);
    json_t **answers = calloc(DS_BATCH, sizeof(*answers));
    if (!answers)
        return -ENOMEM;
    int rc = 0;
    for (size_t base = 0; base < n && rc == 0; base += DS_BATCH) {
        size_t m = n - base < DS_BATCH ? n - base : DS_BATCH;
        json_t *chunk = json_array();
        if (!chunk) {
            rc = -ENOMEM;
            break;
        }
        for (size_t i = 0; i < m; i++)
            json_array_append(chunk, json_array_get(cmds, base + i));
        json_t *holder;
        rc = ds_exec(d, chunk, answers, &holder, batch_timeout(m));
        for (size_t i = 0; rc == 0 && i < m; i++)
            rc = (fn ? fn : log_failures)(d, json_array_get(chunk, i), answers[i], arg);
        json_decref(holder);
        json_decref(chunk);
    }
    free(answers);
    return rc;
}

static int push(json_t *cmds, json_t *cmd)
{
    if (!cmd)
        return -ENOMEM;
    return json_array_append_new(cmds, cmd) == 0 ? 0 : -ENOMEM;
}

/* ---- ACL sets ---------------------------------------------------------------- */

typedef struct acl {
    const char *type;
    char topic[192];
} acl;

/* The server's role: send to every device's inbound topics, read every
 * device's outbound topics. Returns the count (at most 12). */
static size_t server_acls(const dynsec *d, acl out[12])
{
    static const char *const to_dev[] = {"send", "pins", "ack"};
    static const char *const from_dev[] = {"status", "report", "inbound"};
    size_t n = 0;
    for (int i = 0; i < 3; i++) {
        out[n].type = "publishClientSend";
        snprintf(out[n++].topic, sizeof(out[0].topic), "%s/devices/+/%s", d->root, to_dev[i]);
    }
    static const char *const read_types[] = {"subscribePattern", "subscribeLiteral", "publishClientReceive"};
    for (int t = 0; t < 3; t++)
        for (int i = 0; i < 3; i++) {
            out[n].type = read_types[t];
            snprintf(out[n++].topic, sizeof(out[0].topic), "%s/devices/+/%s", d->root, from_dev[i]);
        }
    return n;
}

/* A device's role: publish its own status/report/inbound; subscribe to (and
 * receive) its own send/pins/ack. Returns the count (at most 9). */
static size_t device_acls(const dynsec *d, uint64_t id, acl out[9])
{
    static const char *const from_dev[] = {"status", "report", "inbound"};
    static const char *const to_dev[] = {"send", "pins", "ack"};
    size_t n = 0;
    for (int i = 0; i < 3; i++) {
        out[n].type = "publishClientSend";
        snprintf(out[n++].topic, sizeof(out[0].topic), "%s/devices/%" PRIu64 "/%s", d->root, id,
                 from_dev[i]);
    }
    static const char *const read_types[] = {"subscribeLiteral", "publishClientReceive"};
    for (int t = 0; t < 2; t++)
        for (int i = 0; i < 3; i++) {
            out[n].type = read_types[t];
            snprintf(out[n++].topic, sizeof(out[0].topic), "%s/devices/%" PRIu64 "/%s", d->root, id,
                     to_dev[i]);
        }
    return n;
}

static json_t *acls_json(const acl *a, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++)
        if (json_array_append_new(arr, json_pack("{s:s,s:s,s:b}", "acltype", a[i].type, "topic",
                                                 a[i].topic, "allow", 1)) != 0) {
            json_decref(arr);
            return NULL;
        }
    return arr;
}

static int acl_matches(json_t *have, const acl *want)
{
    return json_is_true(json_object_get(have, "allow")) &&
           json_string_value(json_object_get(have, "acltype")) &&
           json_string_value(json_object_get(have, "topic")) &&
           strcmp(json_string_value(json_object_get(have, "acltype")), want->type) == 0 &&
           strcmp(json_string_value(json_object_get(have, "topic")), want->topic) == 0;
}

/* Appends an addRoleACL for each ACL of want that role's list (have: the
 * plugin's "acls" array) lacks; ACLs it has beyond want are left alone. */
static int role_acl_add_missing(json_t *cmds, const char *role, json_t *have, const acl *want,
                                size_t nwant)
{
    int rc = 0;
    for (size_t w = 0; w < nwant && rc == 0; w++) {
        int present = 0;
        size_t i;
        json_t *h;
        json_array_foreach(have, i, h) {
            if (acl_matches(h, &want[w])) {
                present = 1;
                break;
            }
        }
        if (!present)
            rc = push(cmds, json_pack("{s:s,s:s,s:s,s:s,s:b}", "command", "addRoleACL", "rolename", role,
                                      "acltype", want[w].type, "topic", want[w].topic, "allow", 1));
    }
    return rc;
}

/* 1 when have (the plugin's "acls" array) is exactly want, as allow ACLs. */
static int role_acls_equal(json_t *have, const acl *want, size_t nwant)
{
    if (json_array_size(have) != nwant)
        return 0;
    for (size_t w = 0; w < nwant; w++) {
        int present = 0;
        size_t i;
        json_t *h;
        json_array_foreach(have, i, h) {
            if (acl_matches(h, &want[w])) {
                present = 1;
                break;
            }
        }
        if (!present)
            return 0;
    }
    return 1;
}

/* ---- password check values ---------------------------------------------------- */

#define CHECK_SALT crypto_pwhash_argon2id_SALTBYTES
#define CHECK_HASH 32

static int check_hash(const char *password, const unsigned char *salt, unsigned char out[CHECK_HASH])
{
    /* Minimum cost on purpose: the broker's own file keeps a PBKDF2 hash
     * of the same password beside it; this only has to be no weaker. */
    return crypto_pwhash(out, CHECK_HASH, password, strlen(password), salt,
                         crypto_pwhash_argon2id_OPSLIMIT_MIN, crypto_pwhash_argon2id_MEMLIMIT_MIN,
                         crypto_pwhash_ALG_ARGON2ID13) == 0 ? 0 : -ENOMEM;
}

/* Makes "taratxt-pw1 <salt> <hash>" (base64) for password into buf. */
static int check_make(const char *password, char *buf, size_t len)
{
    unsigned char salt[CHECK_SALT], h[CHECK_HASH];
    randombytes_buf(salt, sizeof(salt));
    if (check_hash(password, salt, h) != 0)
        return -ENOMEM;
    char s64[64], h64[64];
    sodium_bin2base64(s64, sizeof(s64), salt, sizeof(salt), sodium_base64_VARIANT_ORIGINAL_NO_PADDING);
    sodium_bin2base64(h64, sizeof(h64), h, sizeof(h), sodium_base64_VARIANT_ORIGINAL_NO_PADDING);
    snprintf(buf, len, DS_CHECK_PREFIX "%s %s", s64, h64);
    return 0;
}

/* 1 when desc is a check value made from password, else 0. */
static int check_verify(const char *desc, const char *password)
{
    if (!desc || !password || strncmp(desc, DS_CHECK_PREFIX, strlen(DS_CHECK_PREFIX)) != 0)
        return 0;
    const char *s = desc + strlen(DS_CHECK_PREFIX);
    const char *sp = strchr(s, ' ');
    if (!sp)
        return 0;
    unsigned char salt[CHECK_SALT], want[CHECK_HASH], got[CHECK_HASH];
    size_t sl = 0, hl = 0;
    if (sodium_base642bin(salt, sizeof(salt), s, (size_t)(sp - s), NULL, &sl, NULL,
                          sodium_base64_VARIANT_ORIGINAL_NO_PADDING) != 0 || sl != sizeof(salt))
        return 0;
    if (sodium_base642bin(want, sizeof(want), sp + 1, strlen(sp + 1), NULL, &hl, NULL,
                          sodium_base64_VARIANT_ORIGINAL_NO_PADDING) != 0 || hl != sizeof(want))
        return 0;
    if (check_hash(password, salt, got) != 0)
        return 0;
    return sodium_memcmp(got, want, sizeof(got)) == 0;
}

/* ---- device commands ----------------------------------------------------------- */

static void device_name(uint64_t id, char buf[32]) { snprintf(buf, 32, "device-%" PRIu64, id); }

/* "device-<digits>" → id. 0 or -EINVAL. */
static int parse_device_name(const char *s, uint64_t *id)
{
    if (!s || strncmp(s, "device-", 7) != 0 || s[7] < '0' || s[7] > '9')
        return -EINVAL;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s + 7, &end, 10);
    if (errno || *end != '\0')
        return -EINVAL;
    char back[32];
    device_name((uint64_t)v, back);
    if (strcmp(back, s) != 0) /* no leading zeros: one id, one name */
        return -EINVAL;
    *id = (uint64_t)v;
    return 0;
}

/* createRole "device-<id>" with the device's ACLs. */
static int push_create_role(dynsec *d, json_t *cmds, uint64_t id)
{
    char name[32];
    device_name(id, name);
    acl a[9];
    size_t n = device_acls(d, id, a);
    json_t *arr = acls_json(a, n);
    if (!arr)
        return -ENOMEM;
    return push(cmds, json_pack("{s:s,s:s,s:o}", "command", "createRole", "rolename", name, "acls", arr));
}

/* createRole (unless the role exists) and createClient for a new device.
 * The client id is bound to the username (API.md gives devices
 * "client_id":"device-<id>"): no device can connect under another's id and
 * take over its session. */
static int push_create_device(dynsec *d, json_t *cmds, uint64_t id, const char *password, int with_role)
{
    char name[32], check[160];
    device_name(id, name);
    if (check_make(password, check, sizeof(check)) != 0)
        return -ENOMEM;
    int rc = with_role ? push_create_role(d, cmds, id) : 0;
    if (rc == 0)
        rc = push(cmds, json_pack("{s:s,s:s,s:s,s:s,s:s,s:[{s:s}]}", "command", "createClient",
                                  "username", name, "clientid", name, "password", password,
                                  "textdescription", check, "roles", "rolename", name));
    return rc;
}

/* modifyClient: new password and its check value, and the client id bound
 * to the username (the broker disconnects the device). */
static int push_rekey_device(json_t *cmds, uint64_t id, const char *password)
{
    char name[32], check[160];
    device_name(id, name);
    if (check_make(password, check, sizeof(check)) != 0)
        return -ENOMEM;
    return push(cmds, json_pack("{s:s,s:s,s:s,s:s,s:s}", "command", "modifyClient", "username", name,
                                "clientid", name, "password", password, "textdescription", check));
}

static int push_delete_device(json_t *cmds, uint64_t id, int client, int role)
{
    char name[32];
    device_name(id, name);
    int rc = 0;
    if (client)
        rc = push(cmds, json_pack("{s:s,s:s}", "command", "deleteClient", "username", name));
    if (rc == 0 && role)
        rc = push(cmds, json_pack("{s:s,s:s}", "command", "deleteRole", "rolename", name));
    return rc;
}

/* ---- probe and server role ----------------------------------------------------- */

/* Learns whether the broker can be managed and makes sure the server's role
 * exists with its ACLs and belongs to cfg->username. 0 when managed;
 * -EACCES when not manageable (state set UNMANAGED); other errors from
 * ds_exec (a change to the server's own role or client disconnects this
 * connection: the next session finds it done). */
static int ds_setup(dynsec *d)
{
    int rc = ds_subscribe(d);
    if (rc == -EACCES) {
        ds_set_state(d, DYNSEC_UNMANAGED, "the broker refuses a subscription to " DS_RESPONSE_TOPIC);
        return -EACCES;
    }
    if (rc != 0)
        return rc;

    json_t *probe = json_array();
    if (!probe)
        return -ENOMEM;
    rc = push(probe, json_pack("{s:s,s:s}", "command", "getRole", "rolename", DS_SERVER_ROLE));
    if (rc == 0 && d->username)
        rc = push(probe, json_pack("{s:s,s:s}", "command", "getClient", "username", d->username));
    json_t *answers[2], *holder = NULL;
    if (rc == 0)
        rc = ds_exec(d, probe, answers, &holder, DS_TIMEOUT_MS);
    json_decref(probe);
    if (rc == -EACCES || rc == -ETIMEDOUT) {
        ds_set_state(d, DYNSEC_UNMANAGED,
                     rc == -EACCES ? "the broker refuses publishes to " DS_TOPIC
                                   : "no answer on " DS_RESPONSE_TOPIC " within 5 s");
        return -EACCES;
    }
    if (rc != 0)
        return rc;

    json_t *cmds = json_array();
    const char *err = answer_error(answers[0]);
    json_t *role = json_object_get(json_object_get(answers[0], "data"), "role");
    if (!answers[0] || (err && !is_not_found(err)) || (!err && !role)) {
        char why[160];
        snprintf(why, sizeof(why), "the plugin answers getRole with \"%s\"", err ? err : "no role");
        ds_set_state(d, DYNSEC_UNMANAGED, why);
        json_decref(holder);
        json_decref(cmds);
        return -EACCES;
    }
    ds_set_state(d, DYNSEC_MANAGED, NULL);

    acl a[12];
    size_t na = server_acls(d, a);
    if (!cmds) {
        rc = -ENOMEM;
    } else if (!role) {
        json_t *arr = acls_json(a, na);
        rc = arr ? push(cmds, json_pack("{s:s,s:s,s:s,s:o}", "command", "createRole", "rolename",
                                        DS_SERVER_ROLE, "textdescription",
                                        "Topics of the taratxt server (managed by taratxt)", "acls", arr))
                 : -ENOMEM;
    } else {
        /* Extra ACLs an operator gave the server's role are left alone. */
        rc = role_acl_add_missing(cmds, DS_SERVER_ROLE, json_object_get(role, "acls"), a, na);
    }

    if (rc == 0 && d->username) {
        json_t *client = json_object_get(json_object_get(answers[1], "data"), "client");
        if (!client) {
            if (!d->server_client_warned)
                LOG_WARN("dynsec: the server's broker user \"%s\" is not a dynamic-security client "
                         "(%s); it is not given the role " DS_SERVER_ROLE, d->username,
                         answer_error(answers[1]) ? answer_error(answers[1]) : "no data");
            d->server_client_warned = 1;
        } else {
            int has = 0;
            size_t i;
            json_t *r;
            json_array_foreach(json_object_get(client, "roles"), i, r) {
                const char *rn = json_string_value(json_object_get(r, "rolename"));
                if (rn && strcmp(rn, DS_SERVER_ROLE) == 0)
                    has = 1;
            }
            if (!has) {
                LOG_INFO("dynsec: giving \"%s\" the role " DS_SERVER_ROLE
                         " (the broker disconnects that user's connections once)", d->username);
                rc = push(cmds, json_pack("{s:s,s:s,s:s}", "command", "addClientRole", "username",
                                          d->username, "rolename", DS_SERVER_ROLE));
            }
        }
    }
    json_decref(holder);
    if (rc == 0 && json_array_size(cmds) > 0)
        rc = ds_run(d, cmds, NULL, NULL);
    json_decref(cmds);
    return rc;
}

/* ---- reconciliation ------------------------------------------------------------- */

typedef struct bclient {
    uint64_t id;
    char *check;      /* textdescription, may be NULL */
    int clientid_ok;  /* its bound client id is "device-<id>" */
    int has_role;     /* holds role device-<id> */
    int wanted;       /* the app has this device */
} bclient;

typedef struct brole {
    uint64_t id;
    json_t *acls;     /* owned */
    int wanted;
} brole;

/* A client other than device-<id> that holds role device-<id>. */
typedef struct role_holder {
    char *username;
    uint64_t role_id;
} role_holder;

typedef struct inventory {
    bclient *clients;
    size_t nclients, capclients;
    brole *roles;
    size_t nroles, caproles;
    role_holder *holders;
    size_t nholders, capholders;
} inventory;

static void inventory_free(inventory *inv)
{
    for (size_t i = 0; i < inv->nclients; i++)
        free(inv->clients[i].check);
    for (size_t i = 0; i < inv->nroles; i++)
        json_decref(inv->roles[i].acls);
    for (size_t i = 0; i < inv->nholders; i++)
        free(inv->holders[i].username);
    free(inv->clients);
    free(inv->roles);
    free(inv->holders);
    memset(inv, 0, sizeof(*inv));
}

static int add_holder(inventory *inv, const char *username, uint64_t role_id)
{
    if (inv->nholders == inv->capholders) {
        size_t cap = inv->capholders ? inv->capholders * 2 : 8;
        role_holder *v = realloc(inv->holders, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        inv->holders = v;
        inv->capholders = cap;
    }
    char *u = strdup(username);
    if (!u)
        return -ENOMEM;
    inv->holders[inv->nholders].username = u;
    inv->holders[inv->nholders++].role_id = role_id;
    return 0;
}

/* Records a listed client: a device-<id> client as such, and any client
 * holding some other device's role as a holder of it. */
static int list_add_client(inventory *inv, json_t *c)
{
    const char *username = json_string_value(json_object_get(c, "username"));
    uint64_t id = 0;
    int is_device = parse_device_name(username, &id) == 0;
    int has_role = 0;
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(c, "roles"), i, r) {
        uint64_t rid;
        if (parse_device_name(json_string_value(json_object_get(r, "rolename")), &rid) != 0)
            continue;
        if (is_device && rid == id)
            has_role = 1;
        else if (add_holder(inv, username, rid) != 0)
            return -ENOMEM;
    }
    if (!is_device)
        return 0;
    if (inv->nclients == inv->capclients) {
        size_t cap = inv->capclients ? inv->capclients * 2 : 64;
        bclient *v = realloc(inv->clients, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        inv->clients = v;
        inv->capclients = cap;
    }
    bclient *b = &inv->clients[inv->nclients++];
    memset(b, 0, sizeof(*b));
    b->id = id;
    b->has_role = has_role;
    b->check = dupstr(json_string_value(json_object_get(c, "textdescription")));
    const char *cid = json_string_value(json_object_get(c, "clientid"));
    b->clientid_ok = cid && strcmp(cid, username) == 0;
    return 0;
}

/* Appends removeClientRole for every holder of role device-<id> other than
 * its own client, then deleteRole. mosquitto 2.0.11 leaves a dangling
 * pointer in each client that still holds a deleted role (a later verbose
 * listClients crashes the broker), so a role is deleted only once free. */
static int push_drop_role(json_t *cmds, const inventory *inv, uint64_t id)
{
    char name[32];
    device_name(id, name);
    int rc = 0;
    for (size_t i = 0; i < inv->nholders && rc == 0; i++)
        if (inv->holders[i].role_id == id)
            rc = push(cmds, json_pack("{s:s,s:s,s:s}", "command", "removeClientRole", "username",
                                      inv->holders[i].username, "rolename", name));
    if (rc == 0)
        rc = push(cmds, json_pack("{s:s,s:s}", "command", "deleteRole", "rolename", name));
    return rc;
}

static int list_add_role(inventory *inv, json_t *r)
{
    uint64_t id;
    if (parse_device_name(json_string_value(json_object_get(r, "rolename")), &id) != 0)
        return 0;
    if (inv->nroles == inv->caproles) {
        size_t cap = inv->caproles ? inv->caproles * 2 : 64;
        brole *v = realloc(inv->roles, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        inv->roles = v;
        inv->caproles = cap;
    }
    brole *b = &inv->roles[inv->nroles++];
    b->id = id;
    b->wanted = 0;
    b->acls = json_incref(json_object_get(r, "acls"));
    return 0;
}

/* Pages through listClients or listRoles (verbose) into inv. */
static int ds_list(dynsec *d, inventory *inv, int roles)
{
    const char *command = roles ? "listRoles" : "listClients";
    const char *key = roles ? "roles" : "clients";
    for (json_int_t offset = 0;;) {
        json_t *cmds = json_array(), *answer, *holder = NULL;
        int rc = push(cmds, json_pack("{s:s,s:b,s:I,s:I}", "command", command, "verbose", 1, "count",
                                      (json_int_t)DS_PAGE, "offset", offset));
        if (rc == 0)
            rc = ds_exec(d, cmds, &answer, &holder, DS_TIMEOUT_MS);
        json_decref(cmds);
        if (rc != 0)
            return rc;
        const char *err = answer_error(answer);
        json_t *data = json_object_get(answer, "data");
        json_t *items = json_object_get(data, key);
        if (err || !json_is_array(items)) {
            LOG_WARN("dynsec: %s failed: %s", command, err ? err : "no data");
            json_decref(holder);
            return -EIO;
        }
        size_t i, n = json_array_size(items);
        json_t *it;
        json_array_foreach(items, i, it) {
            rc = roles ? list_add_role(inv, it) : list_add_client(inv, it);
            if (rc != 0)
                break;
        }
        json_int_t total = json_integer_value(json_object_get(data, "totalCount"));
        json_decref(holder);
        if (rc != 0)
            return rc;
        offset += (json_int_t)n;
        if (n == 0 || offset >= total)
            return 0;
    }
}

static int cmp_client(const void *a, const void *b)
{
    uint64_t x = ((const bclient *)a)->id, y = ((const bclient *)b)->id;
    return x < y ? -1 : x > y;
}

static int cmp_role(const void *a, const void *b)
{
    uint64_t x = ((const brole *)a)->id, y = ((const brole *)b)->id;
    return x < y ? -1 : x > y;
}

/* Brings the broker's device clients and roles in line with list_devices:
 * creates what is missing, fixes role ACLs, roles and passwords that differ
 * (a password is compared through the client's check value), and deletes
 * "device-<id>" clients and roles the app does not have. */
static int ds_reconcile(dynsec *d)
{
    if (!d->cfg.list_devices)
        return 0;
    inventory inv = {0};
    int rc = ds_list(d, &inv, 0);
    if (rc == 0)
        rc = ds_list(d, &inv, 1);
    if (rc != 0) {
        inventory_free(&inv);
        return rc;
    }
    if (inv.nclients)
        qsort(inv.clients, inv.nclients, sizeof(*inv.clients), cmp_client);
    if (inv.nroles)
        qsort(inv.roles, inv.nroles, sizeof(*inv.roles), cmp_role);

    dynsec_device *devs = NULL;
    size_t ndevs = 0;
    rc = d->cfg.list_devices(d->cfg.app, &devs, &ndevs);
    if (rc != 0) {
        LOG_WARN("dynsec: cannot list the devices to reconcile (%d)", rc);
        inventory_free(&inv);
        return rc == -ENOMEM ? -ENOMEM : -EIO;
    }

    json_t *cmds = json_array();
    size_t created = 0, rekeyed = 0, fixed = 0, deleted = 0;
    rc = cmds ? 0 : -ENOMEM;
    for (size_t i = 0; i < ndevs && rc == 0; i++) {
        uint64_t id = devs[i].id;
        const char *pw = devs[i].password;
        bclient kc = {.id = id};
        brole kr = {.id = id};
        bclient *c = inv.nclients ? bsearch(&kc, inv.clients, inv.nclients, sizeof(kc), cmp_client) : NULL;
        brole *r = inv.nroles ? bsearch(&kr, inv.roles, inv.nroles, sizeof(kr), cmp_role) : NULL;
        char name[32];
        device_name(id, name);
        if (c)
            c->wanted = 1;
        if (r) {
            r->wanted = 1;
            acl a[9];
            size_t na = device_acls(d, id, a);
            if (!role_acls_equal(r->acls, a, na)) {
                /* Rebuilt (take it off its client, delete, create, give it
                 * back) rather than edited ACL by ACL: every command rewrites
                 * the plugin's whole file, and a changed topic root would
                 * take eighteen edits. */
                if (c && c->has_role) {
                    rc = push(cmds, json_pack("{s:s,s:s,s:s}", "command", "removeClientRole",
                                              "username", name, "rolename", name));
                    c->has_role = 0;
                }
                if (rc == 0)
                    rc = push_drop_role(cmds, &inv, id);
                r = NULL;
            }
        }
        if (rc != 0)
            break;
        if (!c) {
            if (!pw) {
                LOG_WARN("dynsec: no password for device %" PRIu64 "; its broker client is not created", id);
                continue;
            }
            rc = push_create_device(d, cmds, id, pw, r == NULL);
            created++;
            continue;
        }
        if (!r) {
            /* The role is missing, or was just dropped for wrong ACLs:
             * make it and give it to the client. */
            rc = push_create_role(d, cmds, id);
            fixed++;
            if (rc == 0)
                rc = push(cmds, json_pack("{s:s,s:s,s:s}", "command", "addClientRole", "username", name,
                                          "rolename", name));
        } else if (!c->has_role) {
            rc = push(cmds, json_pack("{s:s,s:s,s:s}", "command", "addClientRole", "username", name,
                                      "rolename", name));
            fixed++;
        }
        if (rc == 0 && pw && (!c->clientid_ok || !check_verify(c->check, pw))) {
            rc = push_rekey_device(cmds, id, pw);
            rekeyed++;
        }
    }
    for (size_t i = 0; i < inv.nclients && rc == 0; i++)
        if (!inv.clients[i].wanted) {
            rc = push_delete_device(cmds, inv.clients[i].id, 1, 0);
            deleted++;
        }
    for (size_t i = 0; i < inv.nroles && rc == 0; i++)
        if (!inv.roles[i].wanted) /* after its own client's deletion above */
            rc = push_drop_role(cmds, &inv, inv.roles[i].id);

    for (size_t i = 0; i < ndevs; i++)
        if (devs[i].password) {
            sodium_memzero(devs[i].password, strlen(devs[i].password));
            free(devs[i].password);
        }
    free(devs);
    inventory_free(&inv);

    if (rc == 0 && json_array_size(cmds) > 0) {
        LOG_INFO("dynsec: reconciling %zu devices: %zu to create, %zu to re-key, %zu to fix, "
                 "%zu to delete (%zu commands)", ndevs, created, rekeyed, fixed, deleted,
                 json_array_size(cmds));
        rc = ds_run(d, cmds, NULL, NULL);
    }
    json_decref(cmds);
    return rc;
}

/* ---- queued changes ---------------------------------------------------------------- */

/* Result handler for queued changes: a "not found" on a delete and an
 * "already exists" on createRole (a role left without its client) are the
 * expected outcomes of idempotent changes. */
static int change_result(dynsec *d, json_t *cmd, json_t *answer, void *arg)
{
    const char *command = json_string_value(json_object_get(cmd, "command"));
    const char *err = answer_error(answer);
    if (command && (strcmp(command, "deleteClient") == 0 || strcmp(command, "deleteRole") == 0) &&
        is_not_found(err))
        return 0;
    if (command && strcmp(command, "createRole") == 0 && err && strstr(err, "already exists"))
        return 0;
    return log_failures(d, cmd, answer, NULL);
}

/* What getClient said about one device: found, and its check value. */
typedef struct lookup {
    size_t next;
    int *found;       /* 1: exists with the right client id; 2: exists, client id differs */
    char **check;
} lookup;

static int lookup_result(dynsec *d, json_t *cmd, json_t *answer, void *arg)
{
    lookup *lk = arg;
    size_t i = lk->next++;
    const char *err = answer_error(answer);
    json_t *client = json_object_get(json_object_get(answer, "data"), "client");
    if (client) {
        const char *cid = json_string_value(json_object_get(client, "clientid"));
        const char *username = json_string_value(json_object_get(client, "username"));
        lk->found[i] = cid && username && strcmp(cid, username) == 0 ? 1 : 2;
        lk->check[i] = dupstr(json_string_value(json_object_get(client, "textdescription")));
    } else if (is_not_found(err)) {
        lk->found[i] = 0;
    } else {
        /* Unknown: assume it exists with an unknown password, so a put
         * re-keys it (and a failure of that is logged in turn). */
        log_failures(d, cmd, answer, NULL);
        lk->found[i] = 2;
    }
    return 0;
}

/* Puts ops back at the head of the queue, unless a newer change for the
 * same device arrived meanwhile (that one wins). */
static void requeue(dynsec *d, ds_op *ops)
{
    pthread_mutex_lock(&d->mu);
    ds_op *keep = NULL, *last = NULL;
    while (ops) {
        ds_op *o = ops;
        ops = o->next;
        o->next = NULL;
        int newer = 0;
        for (ds_op *q = d->head; q && !newer; q = q->next)
            newer = q->id == o->id;
        if (newer) {
            op_free(o);
            continue;
        }
        if (last)
            last->next = o;
        else
            keep = o;
        last = o;
    }
    if (keep) {
        last->next = d->head;
        if (!d->head)
            d->tail = last;
        d->head = keep;
    }
    pthread_mutex_unlock(&d->mu);
}

static void free_ops(ds_op *ops)
{
    while (ops) {
        ds_op *n = ops->next;
        op_free(ops);
        ops = n;
    }
}

/* Applies ops in order: one batch of getClient for the puts (no file
 * write, no disconnect), then one batch of changes: create a missing
 * device, re-key one whose check value differs (a put of the password it
 * already has changes nothing), delete. 0, or an error from ds_exec (ops
 * are then back in the queue). */
static int ds_apply(dynsec *d, ds_op *ops)
{
    size_t n = 0;
    for (ds_op *o = ops; o; o = o->next)
        n++;
    json_t *gets = json_array(), *cmds = json_array();
    lookup lk = {0, calloc(n, sizeof(int)), calloc(n, sizeof(char *))};
    int rc = gets && cmds && lk.found && lk.check ? 0 : -ENOMEM;
    for (ds_op *o = ops; o && rc == 0; o = o->next)
        if (o->kind == OP_PUT) {
            char name[32];
            device_name(o->id, name);
            rc = push(gets, json_pack("{s:s,s:s}", "command", "getClient", "username", name));
        }
    if (rc == 0 && json_array_size(gets) > 0)
        rc = ds_run(d, gets, lookup_result, &lk);
    size_t k = 0;
    for (ds_op *o = ops; o && rc == 0; o = o->next) {
        if (o->kind == OP_DELETE) {
            rc = push_delete_device(cmds, o->id, 1, 1);
            continue;
        }
        size_t i = k++;
        if (!lk.found[i])
            rc = push_create_device(d, cmds, o->id, o->password, 1);
        else if (lk.found[i] != 1 || !check_verify(lk.check[i], o->password))
            rc = push_rekey_device(cmds, o->id, o->password);
    }
    if (rc == 0 && json_array_size(cmds) > 0)
        rc = ds_run(d, cmds, change_result, NULL);
    json_decref(gets);
    json_decref(cmds);
    for (size_t i = 0; lk.check && i < n; i++)
        free(lk.check[i]);
    free(lk.check);
    free(lk.found);
    if (rc == -ENOTCONN || rc == -ETIMEDOUT || rc == -ECANCELED) {
        requeue(d, ops);
        return rc;
    }
    if (rc != 0)
        LOG_WARN("dynsec: could not apply queued device changes (%d)", rc);
    free_ops(ops);
    return rc;
}

/* Takes up to max ops from the head of the queue (d->mu held). */
static ds_op *take_ops(dynsec *d, int max)
{
    ds_op *first = d->head, *last = NULL;
    for (int i = 0; i < max && d->head; i++) {
        last = d->head;
        d->head = d->head->next;
    }
    if (last)
        last->next = NULL;
    if (!d->head)
        d->tail = NULL;
    return first == d->head ? NULL : first;
}

/* ---- the thread ------------------------------------------------------------------- */

/* One connected session: setup, reconcile, then queued changes until the
 * connection goes. Returns when it should reconnect (or stop). */
static void ds_session(dynsec *d)
{
    int rc = ds_setup(d);
    if (rc == -EACCES) {
        /* Not manageable: changes cannot be applied to this broker; the
         * reconciliation of the next managed session covers them. */
        pthread_mutex_lock(&d->mu);
        for (;;) {
            ds_op *drop = d->head;
            d->head = d->tail = NULL;
            if (drop) {
                pthread_mutex_unlock(&d->mu);
                free_ops(drop);
                pthread_mutex_lock(&d->mu);
                continue;
            }
            if (!d->connected || d->stopping)
                break;
            pthread_cond_wait(&d->cv, &d->mu);
        }
        pthread_mutex_unlock(&d->mu);
        return;
    }
    if (rc != 0)
        return;
    /* A reconciliation that fails for another reason than the connection
     * (the app cannot list its devices, the plugin refuses a listing) is
     * retried every DS_RECONCILE_RETRY_MS, changes being applied meanwhile. */
    int64_t retry_at = 0;
    for (;;) {
        if (retry_at == 0 || mono_ms() >= retry_at) {
            rc = ds_reconcile(d);
            if (rc == -ETIMEDOUT)
                LOG_WARN("dynsec: the plugin stopped answering; reconnecting");
            if (rc == -ENOTCONN || rc == -ETIMEDOUT || rc == -ECANCELED)
                return;
            retry_at = rc == 0 ? INT64_MAX : mono_ms() + DS_RECONCILE_RETRY_MS;
        }
        pthread_mutex_lock(&d->mu);
        while (!d->head && d->connected && !d->stopping && !wait_until(d, retry_at)) {
        }
        int go = d->connected && !d->stopping;
        ds_op *ops = go ? take_ops(d, DS_OPS_PER_ROUND) : NULL;
        pthread_mutex_unlock(&d->mu);
        if (!go)
            return;
        if (!ops)
            continue; /* time to retry the reconciliation */
        rc = ds_apply(d, ops);
        if (rc == -ETIMEDOUT)
            LOG_WARN("dynsec: the plugin stopped answering; reconnecting");
        if (rc == -ENOTCONN || rc == -ETIMEDOUT || rc == -ECANCELED)
            return;
    }
}

static void *ds_thread(void *arg)
{
    dynsec *d = arg;
    int backoff = 0, logged_down = 0;
    for (;;) {
        if (backoff && ds_sleep(d, backoff))
            break;
        pthread_mutex_lock(&d->mu);
        int stop = d->stopping;
        pthread_mutex_unlock(&d->mu);
        if (stop)
            break;
        int rc = ds_connect(d, &logged_down);
        if (rc == -ECANCELED)
            break;
        if (rc != 0) {
            backoff = backoff ? (backoff * 2 > DS_BACKOFF_MAX_MS ? DS_BACKOFF_MAX_MS : backoff * 2)
                              : DS_BACKOFF_MIN_MS;
            continue;
        }
        ds_session(d);
        ds_disconnect(d);
        backoff = DS_BACKOFF_MIN_MS;
    }
    ds_disconnect(d);
    return NULL;
}

/* ---- public ------------------------------------------------------------------------ */

int dynsec_new(const dynsec_config *cfg, dynsec **out)
{
    *out = NULL;
    if (!cfg || !cfg->url)
        return -EINVAL;
    if (sodium_init() < 0)
        return -EIO;
    dynsec *d = calloc(1, sizeof(*d));
    if (!d)
        return -ENOMEM;
    d->cfg = *cfg;
    d->url = dupstr(cfg->url);
    d->username = dupstr(cfg->username);
    d->password = dupstr(cfg->password);
    d->root = dupstr(cfg->topic_root ? cfg->topic_root : "taratxt/v1");
    const char *prefix = cfg->client_prefix ? cfg->client_prefix : "taratxt";
    size_t cl = strlen(prefix) + sizeof("-admin");
    d->client_id = malloc(cl);
    if (d->client_id)
        snprintf(d->client_id, cl, "%s-admin", prefix);
    if (!d->url || !d->root || !d->client_id || (cfg->username && !d->username) ||
        (cfg->password && !d->password)) {
        free(d->url), free(d->username), free(d->password), free(d->root), free(d->client_id);
        free(d);
        return -ENOMEM;
    }
    /* The config's strings are copied; clear the pointers so they are not used. */
    d->cfg.url = d->cfg.username = d->cfg.password = d->cfg.client_prefix = d->cfg.topic_root = NULL;
    static const char b62[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    for (size_t i = 0; i + 1 < sizeof(d->tag); i++)
        d->tag[i] = b62[randombytes_uniform(62)];
    d->mqtt_version = MQTTVERSION_5;
    atomic_init(&d->state, DYNSEC_UNKNOWN);
    pthread_mutex_init(&d->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cv, &ca);
    pthread_condattr_destroy(&ca);
    *out = d;
    return 0;
}

int dynsec_start(dynsec *d)
{
    if (!d || d->started)
        return -EINVAL;
    int rc = pthread_create(&d->thread, NULL, ds_thread, d);
    if (rc != 0)
        return -rc;
    d->started = 1;
    return 0;
}

void dynsec_free(dynsec *d)
{
    if (!d)
        return;
    if (d->started) {
        pthread_mutex_lock(&d->mu);
        d->stopping = 1;
        pthread_cond_broadcast(&d->cv);
        pthread_mutex_unlock(&d->mu);
        pthread_join(d->thread, NULL);
    }
    if (d->client)
        MQTTAsync_destroy(&d->client);
    free_ops(d->head);
    json_decref(d->answer);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    if (d->password) {
        sodium_memzero(d->password, strlen(d->password));
        free(d->password);
    }
    free(d->url), free(d->username), free(d->root), free(d->client_id);
    free(d);
}

int dynsec_state(dynsec *d)
{
    /* Relaxed: see ds_set_state. */
    return d ? atomic_load_explicit(&d->state, memory_order_relaxed) : DYNSEC_UNKNOWN;
}

/* Queues a change for device id, replacing a change still queued for the
 * same device (only the latest matters; the queue holds one per device). */
static int ds_queue(dynsec *d, uint64_t id, int kind, const char *password)
{
    if (!d)
        return -EINVAL;
    char *pw = NULL;
    if (kind == OP_PUT) {
        if (!password)
            return -EINVAL;
        pw = strdup(password);
        if (!pw)
            return -ENOMEM;
    }
    pthread_mutex_lock(&d->mu);
    for (ds_op *q = d->head; q; q = q->next)
        if (q->id == id) {
            if (q->password) {
                sodium_memzero(q->password, strlen(q->password));
                free(q->password);
            }
            q->kind = kind;
            q->password = pw;
            pthread_cond_broadcast(&d->cv);
            pthread_mutex_unlock(&d->mu);
            return 0;
        }
    ds_op *o = calloc(1, sizeof(*o));
    if (!o) {
        pthread_mutex_unlock(&d->mu);
        free(pw);
        return -ENOMEM;
    }
    o->id = id;
    o->kind = kind;
    o->password = pw;
    if (d->tail)
        d->tail->next = o;
    else
        d->head = o;
    d->tail = o;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
    return 0;
}

int dynsec_put_device(dynsec *d, uint64_t id, const char *password)
{
    return ds_queue(d, id, OP_PUT, password);
}

int dynsec_delete_device(dynsec *d, uint64_t id)
{
    return ds_queue(d, id, OP_DELETE, NULL);
}
