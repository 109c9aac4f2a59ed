/* test_dynsec.c: src/mqtt/dynsec.c against a real mosquitto.
 *
 * Starts mosquitto 2.0 with the dynamic-security plugin on a free loopback
 * port (a first admin written by `mosquitto_ctrl dynsec init`), lets dynsec
 * manage it with that admin's credentials, and checks what the broker then
 * enforces, through plain MQTT 5 clients: a device reaches only its own
 * topics, the server's user reaches every device's, re-keying and deleting
 * take effect, and after the broker loses its plugin file the devices are
 * recreated on reconnect. Then a broker without the plugin: dynsec must say
 * UNMANAGED, warn once and keep running. */
#include <MQTTAsync.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mqtt/dynsec.h"
#include "util/log.h"

#define ROOT "taratxt/v1"
#define TT_XSTR(x) #x
#define TT_STR(x) TT_XSTR(x)
#define PLUGIN "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"

#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fprintf(stderr, "\n");                                                        \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
    va_list ap;
    static int64_t t0;
    if (!t0)
        t0 = now_ms();
    va_start(ap, fmt);
    fprintf(stderr, "-- %6.2fs ", (double)(now_ms() - t0) / 1000.0);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}


/* ---- brokers ----------------------------------------------------------------- */

typedef struct broker {
    char dir[64];
    int port;
    int plugin;
    pid_t pid;
} broker;

static broker *brokers[4];
static int nbrokers;

static void broker_stop(broker *b)
{
    if (b->pid <= 0)
        return;
    kill(b->pid, SIGTERM);
    int st;
    for (int i = 0; i < 500 && waitpid(b->pid, &st, WNOHANG) == 0; i++)
        sleep_ms(10);
    if (waitpid(b->pid, &st, WNOHANG) == 0) {
        kill(b->pid, SIGKILL);
        waitpid(b->pid, &st, 0);
    }
    b->pid = 0;
}

static void cleanup(void)
{
    for (int i = 0; i < nbrokers; i++) {
        broker_stop(brokers[i]);
        if (getenv("TT_KEEP_TMP") == NULL && brokers[i]->dir[0]) {
            char cmd[128];
            snprintf(cmd, sizeof(cmd), "rm -rf '%s'", brokers[i]->dir);
            if (system(cmd) != 0)
                fprintf(stderr, "cannot remove %s\n", brokers[i]->dir);
        }
    }
}

static int free_port(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    CHECK(s >= 0 && bind(s, (struct sockaddr *)&a, sizeof(a)) == 0 &&
              getsockname(s, (struct sockaddr *)&a, &len) == 0,
          "no free port: %s", strerror(errno));
    close(s);
    return ntohs(a.sin_port);
}

static int port_open(int port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int ok = connect(s, (struct sockaddr *)&a, sizeof(a)) == 0;
    close(s);
    return ok;
}

/* Runs argv with stdout and stderr appended to log; returns its exit code. */
static int run(char *const argv[], const char *log)
{
    pid_t pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A fresh dynsec.json holding only the first admin (admin/adminpass). */
static void dynsec_file_init(broker *b)
{
    char file[128], log[128];
    snprintf(file, sizeof(file), "%s/dynsec.json", b->dir);
    snprintf(log, sizeof(log), "%s/ctrl.log", b->dir);
    unlink(file);
    char *argv[] = {"mosquitto_ctrl", "dynsec", "init", file, "admin", "adminpass", NULL};
    CHECK(run(argv, log) == 0, "mosquitto_ctrl dynsec init failed (see %s)", log);
}

static void broker_start(broker *b)
{
    char conf[128], log[128];
    snprintf(conf, sizeof(conf), "%s/mosquitto.conf", b->dir);
    snprintf(log, sizeof(log), "%s/mosquitto.log", b->dir);
    FILE *f = fopen(conf, "w");
    CHECK(f, "cannot write %s", conf);
    fprintf(f, "listener %d 127.0.0.1\n", b->port);
    /* As root, mosquitto would switch to the mosquitto user (which then
     * needs the plugin's directory) and lose the parent-death signal that
     * stops it when this test is killed: keep it root here. */
    if (geteuid() == 0)
        fprintf(f, "user root\n");
    if (b->plugin) {
        fprintf(f, "allow_anonymous false\n");
        fprintf(f, "plugin %s\n", PLUGIN);
        fprintf(f, "plugin_opt_config_file %s/dynsec.json\n", b->dir);
    } else {
        fprintf(f, "allow_anonymous true\n");
    }
    fclose(f);
    pid_t pid = fork();
    CHECK(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* no broker outlives a killed test */
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execlp("mosquitto", "mosquitto", "-c", conf, "-v", (char *)NULL);
        _exit(127);
    }
    b->pid = pid;
    int64_t deadline = now_ms() + 5000;
    while (!port_open(b->port)) {
        int st;
        CHECK(waitpid(pid, &st, WNOHANG) == 0, "mosquitto exited (see %s)", log);
        CHECK(now_ms() < deadline, "mosquitto does not listen on %d (see %s)", b->port, log);
        sleep_ms(20);
    }
}

static void check_alive(broker *b)
{
    int st;
    CHECK(b->pid > 0 && waitpid(b->pid, &st, WNOHANG) == 0, "mosquitto died (see %s/mosquitto.log)", b->dir);
}

static broker *broker_new(int plugin)
{
    broker *b = calloc(1, sizeof(*b));
    CHECK(b, "oom");
    snprintf(b->dir, sizeof(b->dir), "/tmp/tt-dynsec-XXXXXX");
    CHECK(mkdtemp(b->dir), "mkdtemp: %s", strerror(errno));
    chmod(b->dir, 0755);
    b->port = free_port();
    b->plugin = plugin;
    brokers[nbrokers++] = b;
    if (plugin)
        dynsec_file_init(b);
    broker_start(b);
    return b;
}

static char *url_of(const broker *b)
{
    static char url[4][64];
    static int next;
    char *u = url[next++ % 4];
    snprintf(u, 64, "tcp://127.0.0.1:%d", b->port);
    return u;
}

/* ---- a small synchronous MQTT 5 client -------------------------------------- */

#define TC_MAX_MSGS 256

typedef struct tc {
    MQTTAsync c;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done, rc;
    int lost;
    int nmsgs;
    char *topics[TC_MAX_MSGS];
} tc;

static void tc_finish(tc *t, int rc)
{
    pthread_mutex_lock(&t->mu);
    t->done = 1;
    t->rc = rc;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

static void tc_ok5(void *ctx, MQTTAsync_successData5 *r) { tc_finish(ctx, r ? (int)r->reasonCode : 0); }
static void tc_fail5(void *ctx, MQTTAsync_failureData5 *r)
{
    int rc = r && (int)r->reasonCode ? (int)r->reasonCode : (r && r->code ? r->code : -1);
    tc_finish(ctx, rc ? rc : -1);
}

static void tc_lost(void *ctx, char *cause)
{
    tc *t = ctx;
    pthread_mutex_lock(&t->mu);
    t->lost = 1;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

/* The broker's DISCONNECT (MQTT 5) comes here, not to connectionLost. */
static void tc_disconnected(void *ctx, MQTTProperties *props, enum MQTTReasonCodes reason)
{
    tc_lost(ctx, NULL);
}

static int tc_arrived(void *ctx, char *topic, int len, MQTTAsync_message *m)
{
    tc *t = ctx;
    pthread_mutex_lock(&t->mu);
    if (t->nmsgs < TC_MAX_MSGS)
        t->topics[t->nmsgs++] = strdup(topic);
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    MQTTAsync_freeMessage(&m);
    MQTTAsync_free(topic);
    return 1;
}

/* Waits for the request in flight; returns its code (-ETIMEDOUT after 5 s). */
static int tc_wait(tc *t)
{
    int64_t deadline = now_ms() + 5000;
    pthread_mutex_lock(&t->mu);
    while (!t->done && now_ms() < deadline) {
        pthread_mutex_unlock(&t->mu);
        sleep_ms(5);
        pthread_mutex_lock(&t->mu);
    }
    int rc = t->done ? t->rc : -ETIMEDOUT;
    t->done = 0;
    pthread_mutex_unlock(&t->mu);
    return rc;
}

static void tc_destroy(tc *t)
{
    if (t->c) {
        if (MQTTAsync_isConnected(t->c)) {
            MQTTAsync_disconnectOptions o = MQTTAsync_disconnectOptions_initializer5;
            MQTTAsync_disconnect(t->c, &o);
            for (int i = 0; i < 100 && MQTTAsync_isConnected(t->c); i++)
                sleep_ms(5);
        }
        MQTTAsync_destroy(&t->c);
    }
    for (int i = 0; i < t->nmsgs; i++)
        free(t->topics[i]);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t);
}

/* Connects; *out is the client on 0, else the refusal's code is returned. */
static int tc_open(const broker *b, const char *cid, const char *user, const char *pass, tc **out)
{
    tc *t = calloc(1, sizeof(*t));
    CHECK(t, "oom");
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    MQTTAsync_createOptions co = MQTTAsync_createOptions_initializer;
    co.MQTTVersion = MQTTVERSION_5;
    CHECK(MQTTAsync_createWithOptions(&t->c, url_of(b), cid, MQTTCLIENT_PERSISTENCE_NONE, NULL, &co) ==
              MQTTASYNC_SUCCESS, "paho create");
    MQTTAsync_setCallbacks(t->c, t, tc_lost, tc_arrived, NULL);
    MQTTAsync_setDisconnected(t->c, t, tc_disconnected);
    MQTTAsync_connectOptions o = MQTTAsync_connectOptions_initializer5;
    o.cleanstart = 1;
    o.connectTimeout = 5;
    o.username = user;
    o.password = pass;
    o.onSuccess5 = tc_ok5;
    o.onFailure5 = tc_fail5;
    o.context = t;
    int rc = MQTTAsync_connect(t->c, &o);
    if (rc == MQTTASYNC_SUCCESS)
        rc = tc_wait(t);
    if (rc != 0) {
        tc_destroy(t);
        *out = NULL;
        return rc;
    }
    *out = t;
    return 0;
}

/* Publishes at QoS 1; returns the PUBACK reason code (0x87: refused). */
static int tc_pub(tc *t, const char *topic, const char *payload)
{
    MQTTAsync_message m = MQTTAsync_message_initializer;
    m.payload = (void *)payload;
    m.payloadlen = (int)strlen(payload);
    m.qos = 1;
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    ro.onSuccess5 = tc_ok5;
    ro.onFailure5 = tc_fail5;
    ro.context = t;
    int rc = MQTTAsync_sendMessage(t->c, topic, &m, &ro);
    return rc == MQTTASYNC_SUCCESS ? tc_wait(t) : rc;
}

/* Subscribes at QoS 1; returns the SUBACK reason code (granted QoS, or 0x80+). */
static int tc_sub(tc *t, const char *filter)
{
    MQTTAsync_responseOptions ro = MQTTAsync_responseOptions_initializer;
    ro.onSuccess5 = tc_ok5;
    ro.onFailure5 = tc_fail5;
    ro.context = t;
    int rc = MQTTAsync_subscribe(t->c, filter, 1, &ro);
    return rc == MQTTASYNC_SUCCESS ? tc_wait(t) : rc;
}

/* How many messages arrived on topic. */
static int tc_count(tc *t, const char *topic)
{
    int n = 0;
    pthread_mutex_lock(&t->mu);
    for (int i = 0; i < t->nmsgs; i++)
        n += strcmp(t->topics[i], topic) == 0;
    pthread_mutex_unlock(&t->mu);
    return n;
}

/* Waits up to ms for at least one message on topic. */
static int tc_await(tc *t, const char *topic, int ms)
{
    int64_t deadline = now_ms() + ms;
    while (tc_count(t, topic) == 0 && now_ms() < deadline)
        sleep_ms(10);
    return tc_count(t, topic) > 0;
}

static int tc_was_lost(tc *t)
{
    pthread_mutex_lock(&t->mu);
    int l = t->lost;
    pthread_mutex_unlock(&t->mu);
    return l;
}

/* 1 when the broker accepts user/pass (client id = user, as devices are
 * told to connect). A separate mosquitto_pub (MQTT
 * 3.1.1, empty QoS 0 message): its exit code is the CONNACK's verdict, and
 * it connects at once, where a new paho client in a process that already has
 * connected ones can wait up to a second for paho's socket loop. */
static int can_login_as(const broker *b, const char *cid, const char *user, const char *pass)
{
    char port[16], log[128];
    snprintf(port, sizeof(port), "%d", b->port);
    snprintf(log, sizeof(log), "%s/login.log", b->dir);
    char *argv[] = {"mosquitto_pub", "-V", "311", "-h", "127.0.0.1", "-p", port, "-i", (char *)cid,
                    "-u", (char *)user, "-P", (char *)pass, "-t", "tt/probe", "-n", NULL};
    return run(argv, log) == 0;
}

static int can_login(const broker *b, const char *user, const char *pass)
{
    return can_login_as(b, user, user, pass);
}

static int await_login(const broker *b, const char *user, const char *pass, int want, int ms)
{
    int64_t deadline = now_ms() + ms;
    for (;;) {
        int ok = can_login(b, user, pass);
        if (ok == want)
            return 1;
        if (now_ms() >= deadline)
            return 0;
        sleep_ms(100);
    }
}

/* ---- the app side: its devices and log ---------------------------------------- */

#define MAX_DEV 320
static pthread_mutex_t app_mu = PTHREAD_MUTEX_INITIALIZER;
static char *app_pw[MAX_DEV + 1];   /* index = device id; NULL = no such device */
static atomic_int list_calls;

static void app_set(uint64_t id, const char *pw)
{
    pthread_mutex_lock(&app_mu);
    free(app_pw[id]);
    app_pw[id] = pw ? strdup(pw) : NULL;
    pthread_mutex_unlock(&app_mu);
}

static atomic_int list_fails;

static int app_list(void *app, dynsec_device **out, size_t *n)
{
    atomic_fetch_add(&list_calls, 1);
    if (atomic_load(&list_fails))
        return -EIO;
    dynsec_device *v = calloc(MAX_DEV + 1, sizeof(*v));
    if (!v)
        return -ENOMEM;
    size_t k = 0;
    pthread_mutex_lock(&app_mu);
    for (uint64_t id = 1; id <= MAX_DEV; id++)
        if (app_pw[id]) {
            v[k].id = id;
            v[k].password = strdup(app_pw[id]);
            k++;
        }
    pthread_mutex_unlock(&app_mu);
    *out = v;
    *n = k;
    return 0;
}

static atomic_int unmanaged_warnings;

static atomic_int reconcile_runs; /* reconciliations that changed something */
static pthread_mutex_t last_mu = PTHREAD_MUTEX_INITIALIZER;
static char last_reconcile[256];

static void sink(int level, const char *line, void *arg)
{
    if (strstr(line, "dynsec: reconciling")) {
        pthread_mutex_lock(&last_mu);
        snprintf(last_reconcile, sizeof(last_reconcile), "%s", line);
        pthread_mutex_unlock(&last_mu);
        atomic_fetch_add(&reconcile_runs, 1);
    }
    if (level >= TT_LOG_WARN && strstr(line, "not managed by this server"))
        atomic_fetch_add(&unmanaged_warnings, 1);
    fprintf(stderr, "   [dynsec %s] %s\n", level >= TT_LOG_WARN ? "warn" : "info", line);
}

static dynsec *start_dynsec_root(const broker *b, const char *user, const char *pass,
                                 const char *prefix, const char *root)
{
    dynsec_config cfg = {
        .url = url_of(b),
        .username = user,
        .password = pass,
        .client_prefix = prefix,
        .topic_root = root,
        .list_devices = app_list,
        .app = NULL,
    };
    dynsec *d;
    CHECK(dynsec_new(&cfg, &d) == 0, "dynsec_new");
    CHECK(dynsec_start(d) == 0, "dynsec_start");
    return d;
}

static dynsec *start_dynsec(const broker *b, const char *user, const char *pass, const char *prefix)
{
    return start_dynsec_root(b, user, pass, prefix, ROOT);
}

static int await_state(dynsec *d, int want, int ms)
{
    int64_t deadline = now_ms() + ms;
    while (dynsec_state(d) != want && now_ms() < deadline)
        sleep_ms(20);
    return dynsec_state(d) == want;
}

static const char *topic(uint64_t id, const char *kind)
{
    static char buf[8][96];
    static int next;
    char *t = buf[next++ % 8];
    snprintf(t, 96, ROOT "/devices/%" PRIu64 "/%s", id, kind);
    return t;
}

/* ---- the cases ---------------------------------------------------------------- */

/* Device 1's connection may use only its own topics. */
static void check_device_isolation(const broker *b, const char *pw1, tc *watch)
{
    tc *dev;
    CHECK(tc_open(b, "device-1", "device-1", pw1, &dev) == 0, "device-1 cannot connect");

    int rc = tc_pub(dev, topic(1, "status"), "{\"online\":true}");
    CHECK(rc == 0, "device-1 publishing its own status got reason %d", rc);
    CHECK(tc_await(watch, topic(1, "status"), 3000), "its status did not reach a subscriber");
    rc = tc_pub(dev, topic(1, "report"), "{\"id\":1,\"status\":\"sent\"}");
    CHECK(rc == 0, "device-1 publishing its own report got reason %d", rc);

    int before = tc_count(watch, topic(2, "report"));
    rc = tc_pub(dev, topic(2, "report"), "{\"id\":9,\"status\":\"delivered\"}");
    CHECK(rc >= 0x80, "device-1 publishing device 2's report got reason %d, want a refusal", rc);
    rc = tc_pub(dev, topic(1, "send"), "{}");
    CHECK(rc >= 0x80, "device-1 publishing its own send topic got reason %d, want a refusal", rc);

    rc = tc_sub(dev, topic(1, "send"));
    CHECK(rc == 1 || rc == 0, "device-1 subscribing to its own send got reason %d", rc);
    rc = tc_sub(dev, topic(1, "pins"));
    CHECK(rc == 1 || rc == 0, "device-1 subscribing to its own pins got reason %d", rc);
    rc = tc_sub(dev, topic(2, "send"));
    CHECK(rc >= 0x80, "device-1 subscribing to device 2's send got reason %d, want a refusal", rc);
    rc = tc_sub(dev, ROOT "/devices/+/send");
    CHECK(rc >= 0x80, "device-1 subscribing to every send got reason %d, want a refusal", rc);
    rc = tc_sub(dev, "#");
    CHECK(rc >= 0x80, "device-1 subscribing to # got reason %d, want a refusal", rc);

    /* The server's user (admin, given the server role) sends to both. */
    tc *srv;
    CHECK(tc_open(b, "tt-server", "admin", "adminpass", &srv) == 0, "admin cannot connect");
    rc = tc_pub(srv, topic(2, "send"), "{\"id\":2}");
    CHECK(rc == 0, "the server user publishing device 2's send got reason %d", rc);
    rc = tc_pub(srv, topic(1, "send"), "{\"id\":1}");
    CHECK(rc == 0, "the server user publishing device 1's send got reason %d", rc);
    rc = tc_pub(srv, topic(1, "ack"), "{\"inbound\":\"x\"}");
    CHECK(rc == 0, "the server user publishing device 1's ack got reason %d", rc);
    CHECK(tc_await(dev, topic(1, "send"), 3000), "device-1 did not get its own send");
    sleep_ms(500);
    CHECK(tc_count(dev, topic(2, "send")) == 0, "device-1 received device 2's send");
    CHECK(tc_count(watch, topic(2, "report")) == before, "device-1's publish into device 2's report was delivered");
    tc_destroy(srv);
    tc_destroy(dev);

    CHECK(!can_login(b, "device-1", "wrong-password"), "a wrong password is accepted");
    {
        /* Its own credentials under another client id: refused, so it cannot
         * take over device 2's session. */
        CHECK(!can_login_as(b, "device-2", "device-1", pw1), "device-1 connected as client device-2");
        CHECK(!can_login_as(b, "tt-other", "device-1", pw1), "device-1 connected as client tt-other");
    }
}

static void case_managed(void)
{
    note("managed broker");
    broker *b = broker_new(1);
    dynsec *d = start_dynsec(b, "admin", "adminpass", "tt-test");
    CHECK(await_state(d, DYNSEC_MANAGED, 15000), "state %d, want MANAGED", dynsec_state(d));

    app_set(1, "pw-one");
    app_set(2, "pw-two");
    CHECK(dynsec_put_device(d, 1, "pw-one") == 0, "put 1");
    CHECK(dynsec_put_device(d, 2, "pw-two") == 0, "put 2");
    CHECK(await_login(b, "device-1", "pw-one", 1, 10000), "device-1 is not created");
    CHECK(await_login(b, "device-2", "pw-two", 1, 10000), "device-2 is not created");

    /* The server's role reaches the admin after the broker kicked its
     * connections once: poll until a publish to a device topic passes. */
    {
        int64_t deadline = now_ms() + 10000;
        int rc = -1;
        while (now_ms() < deadline) {
            tc *srv;
            if (tc_open(b, "tt-server", "admin", "adminpass", &srv) == 0) {
                rc = tc_pub(srv, topic(1, "pins"), "{\"removed_all\":true}");
                tc_destroy(srv);
                if (rc == 0)
                    break;
            }
            sleep_ms(200);
        }
        CHECK(rc == 0, "the server's user cannot publish to a device topic (reason %d)", rc);
    }

    /* The server's own subscription: status of every device. */
    tc *srvsub, *watch;
    CHECK(tc_open(b, "tt-server-sub", "admin", "adminpass", &srvsub) == 0, "admin cannot connect");
    int rc = tc_sub(srvsub, ROOT "/devices/+/status");
    CHECK(rc == 1, "the server user subscribing to every status got reason %d", rc);
    CHECK(tc_open(b, "tt-watch", "admin", "adminpass", &watch) == 0, "admin cannot connect");
    CHECK(tc_sub(watch, "#") == 1, "watcher cannot subscribe to #");

    note("device isolation");
    check_device_isolation(b, "pw-one", watch);
    {
        tc *dev2;
        CHECK(tc_open(b, "device-2", "device-2", "pw-two", &dev2) == 0, "device-2 cannot connect");
        CHECK(tc_pub(dev2, topic(2, "status"), "{\"online\":true}") == 0, "device-2 status refused");
        tc_destroy(dev2);
    }
    CHECK(tc_await(srvsub, topic(1, "status"), 3000), "the server did not get device 1's status");
    CHECK(tc_await(srvsub, topic(2, "status"), 3000), "the server did not get device 2's status");

    note("re-key device 1");
    app_set(1, "pw-one-b");
    CHECK(dynsec_put_device(d, 1, "pw-one-b") == 0, "put 1 again");
    CHECK(await_login(b, "device-1", "pw-one-b", 1, 10000), "the new password is refused");
    CHECK(!can_login(b, "device-1", "pw-one"), "the old password still works");

    note("put with an unchanged password, then delete device 2");
    {
        tc *dev1;
        CHECK(tc_open(b, "device-1", "device-1", "pw-one-b", &dev1) == 0, "device-1 cannot connect");
        CHECK(dynsec_put_device(d, 1, "pw-one-b") == 0, "put 1, same password");
        app_set(2, NULL);
        CHECK(dynsec_delete_device(d, 2) == 0, "delete 2");
        /* Changes apply in order: once device 2 is gone, the put is done. */
        CHECK(await_login(b, "device-2", "pw-two", 0, 10000), "device-2's password still works");
        sleep_ms(200);
        CHECK(!tc_was_lost(dev1), "a put with the same password disconnected the device");
        tc_destroy(dev1);
    }
    CHECK(can_login(b, "device-1", "pw-one-b"), "device-1 broke");

    note("broker restarts with an empty plugin file; device 3 is added meanwhile");
    tc_destroy(watch);
    tc_destroy(srvsub);
    broker_stop(b);
    dynsec_file_init(b);
    app_set(3, "pw-three");
    CHECK(dynsec_put_device(d, 3, "pw-three") == 0, "put 3");
    sleep_ms(1500);
    broker_start(b);
    CHECK(await_login(b, "device-1", "pw-one-b", 1, 40000), "device-1 is not recreated");
    CHECK(await_login(b, "device-3", "pw-three", 1, 10000), "device-3 is not created");
    CHECK(!can_login(b, "device-2", "pw-two"), "device-2 came back");
    CHECK(dynsec_state(d) == DYNSEC_MANAGED, "state %d after the restart", dynsec_state(d));
    CHECK(tc_open(b, "tt-watch", "admin", "adminpass", &watch) == 0, "admin cannot connect");
    CHECK(tc_sub(watch, "#") == 1, "watcher cannot subscribe to #");
    /* The admin's role, again: wait until the server role is back on it. */
    {
        int64_t deadline = now_ms() + 10000;
        rc = -1;
        while (now_ms() < deadline) {
            tc *srv;
            if (tc_open(b, "tt-server", "admin", "adminpass", &srv) == 0) {
                rc = tc_pub(srv, topic(1, "pins"), "{\"removed_all\":true}");
                tc_destroy(srv);
                if (rc == 0)
                    break;
            }
            sleep_ms(200);
        }
        CHECK(rc == 0, "the server's user lost its role after the restart (reason %d)", rc);
    }
    /* The watcher was kicked by that role change; connect it again. */
    tc_destroy(watch);
    CHECK(tc_open(b, "tt-watch", "admin", "adminpass", &watch) == 0, "admin cannot connect");
    CHECK(tc_sub(watch, "#") == 1, "watcher cannot subscribe to #");
    check_device_isolation(b, "pw-one-b", watch);
    tc_destroy(watch);

    note("server restart: reconciliation re-keys only what changed and deletes strays");
    dynsec_free(d);
    /* A stray device client made behind the server's back. */
    {
        tc *adm;
        CHECK(tc_open(b, "tt-admin", "admin", "adminpass", &adm) == 0, "admin cannot connect");
        rc = tc_pub(adm, "$CONTROL/dynamic-security/v1",
                    "{\"commands\":[{\"command\":\"createClient\",\"username\":\"device-7\","
                    "\"password\":\"pw-seven\"}]}");
        CHECK(rc == 0, "admin's createClient refused (%d)", rc);
        tc_destroy(adm);
        CHECK(await_login(b, "device-7", "pw-seven", 1, 5000), "device-7 was not made");
    }
    tc *dev3;
    CHECK(tc_open(b, "device-3", "device-3", "pw-three", &dev3) == 0, "device-3 cannot connect");
    app_set(1, "pw-one-c");  /* changed while the server was down */
    int calls = atomic_load(&list_calls);
    d = start_dynsec(b, "admin", "adminpass", "tt-test");
    CHECK(await_state(d, DYNSEC_MANAGED, 15000), "state %d, want MANAGED", dynsec_state(d));
    CHECK(await_login(b, "device-1", "pw-one-c", 1, 10000), "device-1 is not re-keyed");
    CHECK(await_login(b, "device-7", "pw-seven", 0, 10000), "the stray device-7 is not deleted");
    CHECK(atomic_load(&list_calls) > calls, "list_devices was not called");
    CHECK(!tc_was_lost(dev3), "device-3 was disconnected although its password did not change");
    check_alive(b);
    CHECK(can_login(b, "device-3", "pw-three"), "device-3 broke");
    tc_destroy(dev3);

    note("the topic root changes: device roles are rebuilt");
    dynsec_free(d);
    d = start_dynsec_root(b, "admin", "adminpass", "tt-test", "other/v1");
    {
        int64_t deadline = now_ms() + 15000;
        rc = -1;
        while (rc != 0 && now_ms() < deadline) {
            tc *dev;
            if (tc_open(b, "device-3", "device-3", "pw-three", &dev) == 0) {
                rc = tc_pub(dev, "other/v1/devices/3/status", "{\"online\":true}");
                tc_destroy(dev);
            }
            if (rc != 0)
                sleep_ms(200);
        }
        CHECK(rc == 0, "device-3 cannot publish under the new root (reason %d)", rc);
        CHECK(tc_open(b, "device-3", "device-3", "pw-three", &dev3) == 0, "device-3 cannot connect");
        rc = tc_pub(dev3, topic(3, "status"), "{\"online\":true}");
        CHECK(rc >= 0x80, "device-3 still publishes under the old root (reason %d)", rc);
        tc_destroy(dev3);
    }
    dynsec_free(d);
    d = start_dynsec(b, "admin", "adminpass", "tt-test");
    CHECK(await_state(d, DYNSEC_MANAGED, 15000), "state %d, want MANAGED", dynsec_state(d));
    CHECK(await_login(b, "device-9", "nobody", 0, 100), "device-9 exists");
    {
        /* Roles rebuilt back to the first root: device-3 publishes there again. */
        int64_t deadline = now_ms() + 15000;
        rc = -1;
        while (rc != 0 && now_ms() < deadline) {
            tc *dev;
            if (tc_open(b, "device-3", "device-3", "pw-three", &dev) == 0) {
                rc = tc_pub(dev, topic(3, "status"), "{\"online\":true}");
                tc_destroy(dev);
            }
            if (rc != 0)
                sleep_ms(200);
        }
        CHECK(rc == 0, "device-3 cannot publish under the first root again (reason %d)", rc);
    }
    check_alive(b);

    note("the app cannot list its devices: queued changes still apply");
    dynsec_free(d);
    atomic_store(&list_fails, 1);
    calls = atomic_load(&list_calls);
    d = start_dynsec(b, "admin", "adminpass", "tt-test");
    CHECK(await_state(d, DYNSEC_MANAGED, 15000), "state %d, want MANAGED", dynsec_state(d));
    app_set(4, "pw-four");
    CHECK(dynsec_put_device(d, 4, "pw-four") == 0, "put 4");
    CHECK(await_login(b, "device-4", "pw-four", 1, 10000), "device-4 is not created");
    CHECK(atomic_load(&list_calls) > calls, "list_devices was not called");
    atomic_store(&list_fails, 0);

    note("many devices: listings span several pages");
    dynsec_free(d);
    char pw[32];
    for (uint64_t id = 10; id <= MAX_DEV; id++) {
        snprintf(pw, sizeof(pw), "pw-%" PRIu64, id);
        app_set(id, pw);
    }
    d = start_dynsec(b, "admin", "adminpass", "tt-test");
    snprintf(pw, sizeof(pw), "pw-%d", MAX_DEV);
    CHECK(await_login(b, "device-" TT_STR(MAX_DEV), pw, 1, 60000), "device-%d is not created", MAX_DEV);
    CHECK(await_login(b, "device-10", "pw-10", 1, 5000), "device-10 is not created");
    /* Again, with one device more: the reconciliation creates it and
     * touches nothing else. */
    dynsec_free(d);
    int runs = atomic_load(&reconcile_runs);
    app_set(5, "pw-five");
    d = start_dynsec(b, "admin", "adminpass", "tt-test");
    CHECK(await_login(b, "device-5", "pw-five", 1, 15000), "device-5 is not created");
    pthread_mutex_lock(&last_mu);
    int same = strstr(last_reconcile, "1 to create, 0 to re-key, 0 to fix, 0 to delete (2 commands)") != NULL;
    pthread_mutex_unlock(&last_mu);
    CHECK(atomic_load(&reconcile_runs) == runs + 1 && same, "the reconciliation of an unchanged fleet: %s",
          last_reconcile);
    CHECK(can_login(b, "device-200", "pw-200"), "device-200 broke");
    /* And all of them deleted by the next reconciliation. */
    dynsec_free(d);
    for (uint64_t id = 10; id <= MAX_DEV; id++)
        app_set(id, NULL);
    d = start_dynsec(b, "admin", "adminpass", "tt-test");
    CHECK(await_login(b, "device-" TT_STR(MAX_DEV), pw, 0, 60000), "device-%d is not deleted", MAX_DEV);
    CHECK(!can_login(b, "device-10", "pw-10"), "device-10 is not deleted");
    CHECK(can_login(b, "device-5", "pw-five"), "device-5 broke");
    check_alive(b);

    note("a server user without $CONTROL access is unmanaged");
    {
        int before = atomic_load(&unmanaged_warnings);
        tc *adm;
        CHECK(tc_open(b, "tt-admin", "admin", "adminpass", &adm) == 0, "admin cannot connect");
        rc = tc_pub(adm, "$CONTROL/dynamic-security/v1",
                    "{\"commands\":[{\"command\":\"createClient\",\"username\":\"plain\","
                    "\"password\":\"plainpass\"}]}");
        CHECK(rc == 0, "admin's createClient refused (%d)", rc);
        tc_destroy(adm);
        CHECK(await_login(b, "plain", "plainpass", 1, 5000), "user plain was not made");
        dynsec *u = start_dynsec(b, "plain", "plainpass", "tt-test-plain");
        CHECK(await_state(u, DYNSEC_UNMANAGED, 8000), "state %d, want UNMANAGED", dynsec_state(u));
        CHECK(dynsec_put_device(u, 5, "x") == 0, "put on unmanaged");
        dynsec_free(u);
        CHECK(atomic_load(&unmanaged_warnings) == before + 1, "%d warnings, want 1",
              atomic_load(&unmanaged_warnings) - before);
    }

    dynsec_free(d);
    check_alive(b);
    broker_stop(b);
}

static void case_unmanaged(void)
{
    note("broker without the plugin");
    broker *b = broker_new(0);
    int before = atomic_load(&unmanaged_warnings);
    int64_t t0 = now_ms();
    dynsec *d = start_dynsec(b, NULL, NULL, "tt-plain");
    CHECK(dynsec_put_device(d, 1, "pw") == 0, "put before the answer");
    CHECK(await_state(d, DYNSEC_UNMANAGED, 10000), "state %d, want UNMANAGED", dynsec_state(d));
    note("unmanaged after %" PRId64 " ms", now_ms() - t0);
    CHECK(dynsec_put_device(d, 2, "pw") == 0, "put while unmanaged");
    CHECK(dynsec_delete_device(d, 1) == 0, "delete while unmanaged");
    /* A reconnect probes again and finds the same: still one warning. */
    broker_stop(b);
    sleep_ms(500);
    broker_start(b);
    sleep_ms(8000);
    CHECK(dynsec_state(d) == DYNSEC_UNMANAGED, "state %d after reconnect", dynsec_state(d));
    CHECK(atomic_load(&unmanaged_warnings) == before + 1, "%d warnings, want exactly 1",
          atomic_load(&unmanaged_warnings) - before);
    dynsec_free(d);

    /* Stopping while the broker is down and the thread backs off. */
    d = start_dynsec(b, NULL, NULL, "tt-plain");
    broker_stop(b);
    sleep_ms(1500);
    dynsec_free(d);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    atexit(cleanup);
    tt_log_set_sink(sink, NULL);
    if (access(PLUGIN, R_OK) != 0) {
        fprintf(stderr, "FAIL: %s is missing\n", PLUGIN);
        return 1;
    }
    case_managed();
    case_unmanaged();
    for (int i = 1; i <= MAX_DEV; i++)
        app_set((uint64_t)i, NULL);
    fprintf(stderr, "ok\n");
    return 0;
}
