/* test_http_server.c: the HTTP edge framework against a real civetweb on a
 * free loopback port, driven with raw sockets.
 *
 * Asserts what a client sees (status, Content-Type, the problem's code,
 * headers) for the order of checks of API.md section 1 and for garbage:
 * unknown methods, oversized heads, huge and endless bodies, deep JSON,
 * invalid UTF-8, truncated requests. After every hostile request the server
 * must still answer a normal one. */
#define _GNU_SOURCE /* memmem */
#include "http/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "util/log.h"

static int failures;
static int port;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);     \
            failures++;                                                                  \
        }                                                                                \
    } while (0)

/* ------------------------------------------------------------------ */
/* Server side: routes, auth, on_response                              */

/* Every on_response call, in the order the hook ran. */
#define MAX_RECORDS 16384
static pthread_mutex_t rec_mu = PTHREAD_MUTEX_INITIALIZER;
static struct record {
    char route[64], method[16];
    int status;
} records[MAX_RECORDS];
static long nrecords;

static void on_response(void *app, const char *route, const char *method, int status)
{
    pthread_mutex_lock(&rec_mu);
    if (nrecords < MAX_RECORDS) {
        struct record *rec = &records[nrecords];
        snprintf(rec->route, sizeof(rec->route), "%s", route);
        snprintf(rec->method, sizeof(rec->method), "%s", method);
        rec->status = status;
    }
    nrecords++;
    pthread_mutex_unlock(&rec_mu);
}

static long records_mark(void)
{
    long n;
    pthread_mutex_lock(&rec_mu);
    n = nrecords;
    pthread_mutex_unlock(&rec_mu);
    return n;
}

static int auth(void *app, const char *token, uint64_t *account_id, uint64_t *token_id)
{
    if (strcmp(token, "tt_good") != 0)
        return -1;
    *account_id = 7;
    *token_id = 9;
    return 0;
}

static void h_echo(http_req *r)
{
    json_t *o = json_object(), *p = json_array();
    char q[64];
    int i;

    for (i = 0; i < r->nparams; i++)
        json_array_append_new(p, json_string(r->params[i]));
    json_object_set_new(o, "route", json_string(r->route));
    json_object_set_new(o, "method", json_string(r->method));
    json_object_set_new(o, "params", p);
    json_object_set_new(o, "account", json_integer((json_int_t)r->account_id));
    json_object_set_new(o, "token", json_integer((json_int_t)r->token_id));
    json_object_set(o, "body", r->body ? r->body : json_null());
    if (http_query(r, "to", q, sizeof(q)))
        json_object_set_new(o, "to", json_string(q));
    if (http_header(r, "X-Test"))
        json_object_set_new(o, "x_test", json_string(http_header(r, "X-Test")));
    http_reply_json(r, 200, o, "X-Echo: 1\r\n");
}

static void h_noreply(http_req *r) { (void)r; }

static void h_twice(http_req *r)
{
    http_reply_json(r, 200, json_pack("{s:b}", "first", 1), NULL);
    http_reply_problem(r, 500, "internal", "second");
}

static void h_validate(http_req *r)
{
    http_reply_validation(r, json_pack("[{s:s,s:s}]", "field", "to", "message",
                                       "must be a phone number"));
}

static void h_busy(http_req *r)
{
    http_reply_problem_ex(r, 503, "overloaded", "try again", NULL, "Retry-After: 1\r\n");
}

static void h_empty(http_req *r) { http_reply_empty(r, 204); }

static void h_text(http_req *r) { http_reply_text(r, 200, "text/plain", "hello", 5); }

static const http_route routes[] = {
    {"GET", "/healthz", h_echo, 0, 0},
    {"GET", "/open/{a}/{b}", h_echo, 0, 0},
    {"GET", "/private", h_echo, 1, 0},
    {"POST", "/api/v1/messages", h_echo, 1, 1024},
    {"GET", "/api/v1/messages", h_echo, 1, 0},
    {"GET", "/api/v1/messages/{id}", h_echo, 1, 0},
    {"DELETE", "/api/v1/messages/{id}", h_echo, 1, 0},
    {"POST", "/api/v1/messages/batch", h_echo, 1, 2 * 1024 * 1024},
    {"POST", "/api/v1/devices/{id}/messages", h_echo, 1, 65536},
    {"GET", "/api/v1/noreply", h_noreply, 1, 0},
    {"GET", "/api/v1/twice", h_twice, 1, 0},
    {"POST", "/api/v1/validate", h_validate, 1, 1024},
    {"GET", "/api/v1/busy", h_busy, 1, 0},
    {"DELETE", "/api/v1/thing", h_empty, 1, 0},
    {"GET", "/api/v1/text", h_text, 1, 0},
};

/* ------------------------------------------------------------------ */
/* Client side: a minimal HTTP/1.1 client over raw sockets             */

typedef struct conn {
    int fd;
    char *buf;
    size_t len, cap;
    int eof;
} conn;

typedef struct resp {
    int status;     /* 0: no response (closed or reset) */
    char *head;     /* status line and headers */
    char *body;
    size_t body_len;
} resp;

static void resp_free(resp *r)
{
    free(r->head);
    free(r->body);
    memset(r, 0, sizeof(*r));
}

static int conn_open(conn *c)
{
    struct sockaddr_in a;
    struct timeval tv = {10, 0};
    int one = 1;

    memset(c, 0, sizeof(*c));
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0)
        return -errno;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(c->fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        int e = errno;
        close(c->fd);
        return -e;
    }
    c->cap = 65536;
    c->buf = malloc(c->cap);
    return 0;
}

static void conn_close(conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c->buf);
    c->fd = -1;
    c->buf = NULL;
}

/* Sends everything; a peer that closed early is not an error here (the
 * server may answer and close before a huge request is fully sent). */
static int conn_send(conn *c, const void *data, size_t n)
{
    const char *p = data;

    while (n > 0) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int conn_fill(conn *c)
{
    ssize_t n;

    if (c->eof)
        return 0;
    if (c->len == c->cap) {
        c->cap *= 2;
        c->buf = realloc(c->buf, c->cap);
    }
    do {
        n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        c->eof = 1;
        return 0;
    }
    c->len += (size_t)n;
    return (int)n;
}

static void conn_consume(conn *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
}

/* Finds a header in a response head (case-insensitive name); copies its
 * value into out. Returns out or NULL. */
static const char *hdr(const resp *r, const char *name, char *out, size_t outlen)
{
    const char *p;
    size_t n = strlen(name);

    if (r->head == NULL)
        return NULL;
    p = strstr(r->head, "\r\n");
    while (p != NULL && p[2] != '\0') {
        const char *line = p + 2, *end = strstr(line, "\r\n");
        if (end == NULL)
            end = line + strlen(line);
        if ((size_t)(end - line) > n && strncasecmp(line, name, n) == 0 && line[n] == ':') {
            const char *v = line + n + 1;
            size_t vlen;
            while (*v == ' ')
                v++;
            vlen = (size_t)(end - v);
            if (vlen >= outlen)
                vlen = outlen - 1;
            memcpy(out, v, vlen);
            out[vlen] = '\0';
            return out;
        }
        p = end;
        if (*p == '\0')
            break;
    }
    return NULL;
}

/* Reads one response. head_only: the request was HEAD (no body follows). */
static void conn_read(conn *c, resp *r, int head_only)
{
    char *end;
    char v[64];
    size_t hlen, blen = 0;
    int has_len = 0;

    memset(r, 0, sizeof(*r));
    for (;;) {
        if (c->len > 0) {
            /* conn buffers are not NUL-terminated: search a bounded copy */
            end = memmem(c->buf, c->len, "\r\n\r\n", 4);
            if (end != NULL)
                break;
        }
        if (conn_fill(c) == 0)
            return;
    }
    hlen = (size_t)(end - c->buf) + 4;
    r->head = malloc(hlen - 1);
    memcpy(r->head, c->buf, hlen - 2);
    r->head[hlen - 2] = '\0';
    conn_consume(c, hlen);
    if (sscanf(r->head, "HTTP/%*d.%*d %d", &r->status) != 1)
        r->status = -1;
    if (hdr(r, "Content-Length", v, sizeof(v))) {
        has_len = 1;
        blen = (size_t)strtoull(v, NULL, 10);
    }
    if (head_only || r->status / 100 == 1 || r->status == 204 || r->status == 304)
        blen = 0, has_len = 1;
    if (has_len) {
        while (c->len < blen && conn_fill(c) > 0)
            ;
        if (c->len < blen)
            blen = c->len;
    } else {
        while (conn_fill(c) > 0)
            ;
        blen = c->len;
    }
    r->body = malloc(blen + 1);
    memcpy(r->body, c->buf, blen);
    r->body[blen] = '\0';
    r->body_len = blen;
    conn_consume(c, blen);
}

/* One request on a fresh connection; the raw bytes are sent as given. */
static resp raw_request(const void *data, size_t n)
{
    conn c;
    resp r;

    memset(&r, 0, sizeof(r));
    if (conn_open(&c) != 0) {
        r.status = -2;
        return r;
    }
    conn_send(&c, data, n);
    conn_read(&c, &r, 0);
    conn_close(&c);
    return r;
}

/* A request built from parts; token NULL: no Authorization. */
static resp request(const char *method, const char *path, const char *token, const char *extra,
                    const char *body, size_t body_len)
{
    size_t cap = 1024 + (extra ? strlen(extra) : 0) + body_len;
    char *b = malloc(cap);
    size_t n;
    resp r;

    n = (size_t)snprintf(b, cap, "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n",
                         method, path);
    if (token)
        n += (size_t)snprintf(b + n, cap - n, "Authorization: Bearer %s\r\n", token);
    if (extra)
        n += (size_t)snprintf(b + n, cap - n, "%s", extra);
    if (body)
        n += (size_t)snprintf(b + n, cap - n, "Content-Length: %zu\r\n", body_len);
    n += (size_t)snprintf(b + n, cap - n, "\r\n");
    if (body) {
        memcpy(b + n, body, body_len);
        n += body_len;
    }
    r = raw_request(b, n);
    free(b);
    return r;
}

static resp get(const char *path, const char *token)
{
    return request("GET", path, token, NULL, NULL, 0);
}

static resp post(const char *path, const char *token, const char *body)
{
    return request("POST", path, token, NULL, body, strlen(body));
}

/* ------------------------------------------------------------------ */
/* Assertions                                                          */

static int check_problem_at(const resp *r, int status, const char *code, int line)
{
    char ct[128], cl[32];
    json_t *j;
    json_error_t err;
    int ok = 1;

#define P_FAIL(...)                                                                      \
    do {                                                                                 \
        fprintf(stderr, "%s:%d: ", __FILE__, line);                                      \
        fprintf(stderr, __VA_ARGS__);                                                    \
        fprintf(stderr, "\n  head: %s\n  body: %s\n", r->head ? r->head : "(none)",     \
                r->body ? r->body : "(none)");                                           \
        failures++;                                                                      \
        return 0;                                                                        \
    } while (0)

    if (r->status != status)
        P_FAIL("status %d, want %d", r->status, status);
    if (!hdr(r, "Content-Type", ct, sizeof(ct)) || strcmp(ct, "application/problem+json") != 0)
        P_FAIL("Content-Type is not application/problem+json");
    if (!hdr(r, "Content-Length", cl, sizeof(cl)) || strtoul(cl, NULL, 10) != r->body_len)
        P_FAIL("Content-Length missing or wrong");
    j = json_loadb(r->body, r->body_len, 0, &err);
    if (j == NULL)
        P_FAIL("problem body is not JSON: %s", err.text);
    if (!json_is_string(json_object_get(j, "type")) ||
        strcmp(json_string_value(json_object_get(j, "type")), "about:blank") != 0 ||
        !json_is_string(json_object_get(j, "title")) ||
        strcmp(json_string_value(json_object_get(j, "title")), http_status_title(status)) != 0 ||
        json_integer_value(json_object_get(j, "status")) != status ||
        !json_is_string(json_object_get(j, "code")) ||
        (code && strcmp(json_string_value(json_object_get(j, "code")), code) != 0) ||
        !json_is_string(json_object_get(j, "detail")))
        ok = 0;
    json_decref(j);
    if (!ok)
        P_FAIL("problem fields wrong (want code %s)", code ? code : "(any)");
#undef P_FAIL
    return 1;
}
#define CHECK_PROBLEM(r, status, code) check_problem_at(&(r), status, code, __LINE__)

/* The body of a 200 echo, parsed. */
static json_t *echo_body(const resp *r, int line)
{
    char ct[64];
    json_t *j;

    if (r->status != 200 || !hdr(r, "Content-Type", ct, sizeof(ct)) ||
        strcmp(ct, "application/json") != 0) {
        fprintf(stderr, "%s:%d: want 200 application/json, got %d\n  head: %s\n  body: %s\n",
                __FILE__, line, r->status, r->head ? r->head : "(none)",
                r->body ? r->body : "(none)");
        failures++;
        return NULL;
    }
    j = json_loadb(r->body, r->body_len, 0, NULL);
    if (j == NULL) {
        fprintf(stderr, "%s:%d: echo body is not JSON\n", __FILE__, line);
        failures++;
    }
    return j;
}

static void check_alive_at(int line)
{
    resp r = get("/healthz", NULL);
    if (r.status != 200) {
        fprintf(stderr, "%s:%d: server did not answer /healthz afterwards (status %d)\n",
                __FILE__, line, r.status);
        failures++;
    }
    resp_free(&r);
}
#define CHECK_ALIVE() check_alive_at(__LINE__)

/* Checks that on_response reported (route, method, status) for a request
 * made after mark. The hook runs after the response is on the wire, on the
 * worker's thread, so wait up to 2 s for it. */
static void check_seen_at(long mark, const char *route, const char *method, int status, int line)
{
    int i, ok = 0;
    long j;

    for (i = 0; i < 2000 && !ok; i++) {
        pthread_mutex_lock(&rec_mu);
        for (j = mark; j < nrecords && j < MAX_RECORDS && !ok; j++)
            ok = strcmp(records[j].route, route) == 0 && strcmp(records[j].method, method) == 0 &&
                 records[j].status == status;
        pthread_mutex_unlock(&rec_mu);
        if (!ok)
            usleep(1000);
    }
    if (!ok) {
        fprintf(stderr, "%s:%d: on_response never reported (%s, %s, %d)\n", __FILE__, line, route,
                method, status);
        failures++;
    }
}
#define CHECK_SEEN(mark, route, method, status) check_seen_at(mark, route, method, status, __LINE__)

/* ------------------------------------------------------------------ */
/* Tests                                                               */

static void test_auth(void)
{
    resp r;
    char v[64];
    static const char *const bad[] = {
        NULL,
        "Authorization: Bearer tt_bad\r\n",
        "Authorization: Basic dXNlcjpwYXNz\r\n",
        "Authorization: Bearer\r\n",
        "Authorization: Bearer \r\n",
        "Authorization: Bearertt_good\r\n",
        "Authorization: Bearer tt_good extra\r\n",
        "Authorization: tt_good\r\n",
    };
    size_t i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        r = request("GET", "/api/v1/messages", NULL, bad[i], NULL, 0);
        if (CHECK_PROBLEM(r, 401, "unauthorized"))
            CHECK(hdr(&r, "WWW-Authenticate", v, sizeof(v)) && strcmp(v, "Bearer") == 0);
        resp_free(&r);
    }
    /* Auth comes before routing, method and size checks. */
    r = get("/api/v1/nothing/here", NULL);
    if (CHECK_PROBLEM(r, 401, "unauthorized"))
        CHECK(hdr(&r, "WWW-Authenticate", v, sizeof(v)) && strcmp(v, "Bearer") == 0);
    resp_free(&r);
    r = get("/api/v1", "tt_bad");
    CHECK_PROBLEM(r, 401, "unauthorized");
    resp_free(&r);
    r = request("PUT", "/api/v1/messages/5", NULL, NULL, NULL, 0);
    CHECK_PROBLEM(r, 401, "unauthorized");
    resp_free(&r);
    r = request("POST", "/api/v1/messages", NULL, "Content-Length: 99999999\r\n", NULL, 0);
    CHECK_PROBLEM(r, 401, "unauthorized");
    resp_free(&r);
    /* A route outside the prefix that asks for a token. */
    r = get("/private", NULL);
    CHECK_PROBLEM(r, 401, "unauthorized");
    resp_free(&r);
    r = get("/private", "tt_good");
    CHECK(r.status == 200);
    resp_free(&r);
    /* "/api/v10" is not under "/api/v1": plain 404, no auth asked. */
    r = get("/api/v10/messages", NULL);
    CHECK_PROBLEM(r, 404, "not_found");
    resp_free(&r);

    /* The scheme is case-insensitive; the handler sees the ids. */
    r = request("GET", "/api/v1/messages", NULL, "Authorization: bearer   tt_good  \r\n", NULL, 0);
    {
        json_t *j = echo_body(&r, __LINE__);
        CHECK(j && json_integer_value(json_object_get(j, "account")) == 7);
        CHECK(j && json_integer_value(json_object_get(j, "token")) == 9);
        json_decref(j);
    }
    resp_free(&r);
}

static void test_routing(void)
{
    static const char *const missing[] = {
        "/api/v1/nothing",  "/api/v1/messages/", "/api/v1//messages",  "/api/v1/messages/%zz",
        "/api/v1/messages/%00", "/api/v1/messages/%2", "/api/v1/messages/5/6", "/api/v1",
        "/api/v1/",         "/nothing",          "/",                  "/healthz/",
        "/open//b",
    };
    size_t i;
    resp r;
    char v[128];
    json_t *j;
    long mark = records_mark();

    for (i = 0; i < sizeof(missing) / sizeof(missing[0]); i++) {
        r = get(missing[i], "tt_good");
        if (!CHECK_PROBLEM(r, 404, "not_found"))
            fprintf(stderr, "  path: %s\n", missing[i]);
        resp_free(&r);
    }
    CHECK_SEEN(mark, "unmatched", "GET", 404);

    r = request("PUT", "/api/v1/messages/5", "tt_good", NULL, NULL, 0);
    if (CHECK_PROBLEM(r, 405, "method_not_allowed"))
        CHECK(hdr(&r, "Allow", v, sizeof(v)) && strcmp(v, "GET, DELETE") == 0);
    resp_free(&r);
    /* Several patterns match: their methods, each once, in table order. */
    r = request("PATCH", "/api/v1/messages/batch", "tt_good", NULL, NULL, 0);
    if (CHECK_PROBLEM(r, 405, "method_not_allowed"))
        CHECK(hdr(&r, "Allow", v, sizeof(v)) && strcmp(v, "GET, DELETE, POST") == 0);
    resp_free(&r);
    r = request("DELETE", "/api/v1/messages", "tt_good", NULL, NULL, 0);
    if (CHECK_PROBLEM(r, 405, "method_not_allowed"))
        CHECK(hdr(&r, "Allow", v, sizeof(v)) && strcmp(v, "POST, GET") == 0);
    resp_free(&r);
    /* Methods are case-sensitive. */
    r = request("Get", "/healthz", NULL, NULL, NULL, 0);
    CHECK(r.status == 405 || r.status == 400);
    CHECK(r.status == 0 || hdr(&r, "Content-Type", v, sizeof(v)));
    resp_free(&r);
    CHECK_ALIVE();

    /* Path params are URL-decoded, per segment. */
    mark = records_mark();
    r = get("/api/v1/messages/%2B63917", "tt_good");
    j = echo_body(&r, __LINE__);
    CHECK(j && strcmp(json_string_value(json_array_get(json_object_get(j, "params"), 0)),
                      "+63917") == 0);
    CHECK(j && strcmp(json_string_value(json_object_get(j, "route")),
                      "/api/v1/messages/{id}") == 0);
    json_decref(j);
    resp_free(&r);
    CHECK_SEEN(mark, "/api/v1/messages/{id}", "GET", 200);
    r = get("/open/a%2Fb/c%20d+e?x=1", NULL);
    j = echo_body(&r, __LINE__);
    CHECK(j && strcmp(json_string_value(json_array_get(json_object_get(j, "params"), 0)),
                      "a/b") == 0);
    CHECK(j && strcmp(json_string_value(json_array_get(json_object_get(j, "params"), 1)),
                      "c d+e") == 0);
    json_decref(j);
    resp_free(&r);
    r = get("/api/v1/messages/batch", "tt_good");
    j = echo_body(&r, __LINE__);
    CHECK(j && strcmp(json_string_value(json_object_get(j, "route")),
                      "/api/v1/messages/{id}") == 0);
    json_decref(j);
    resp_free(&r);

    /* Query parameters. */
    r = get("/api/v1/messages?limit=2&to=%2B639171234567", "tt_good");
    j = echo_body(&r, __LINE__);
    CHECK(j && json_is_string(json_object_get(j, "to")) &&
          strcmp(json_string_value(json_object_get(j, "to")), "+639171234567") == 0);
    json_decref(j);
    resp_free(&r);
    /* Request headers, and the handler's extra headers. */
    r = request("GET", "/healthz", NULL, "X-Test: hi\r\n", NULL, 0);
    j = echo_body(&r, __LINE__);
    CHECK(j && json_is_string(json_object_get(j, "x_test")) &&
          strcmp(json_string_value(json_object_get(j, "x_test")), "hi") == 0);
    CHECK(hdr(&r, "X-Echo", v, sizeof(v)) && strcmp(v, "1") == 0);
    json_decref(j);
    resp_free(&r);
    /* HEAD is not a route method here: 405, headers only. */
    r = request("HEAD", "/healthz", NULL, NULL, NULL, 0);
    CHECK(r.status == 405);
    CHECK(hdr(&r, "Allow", v, sizeof(v)) && strcmp(v, "GET") == 0);
    CHECK(r.body_len == 0);
    resp_free(&r);
}

static void test_bodies(void)
{
    resp r;
    json_t *j;
    char v[64];
    char *big;
    size_t i;

    /* Empty body is {}. */
    r = request("POST", "/api/v1/messages", "tt_good", NULL, "", 0);
    j = echo_body(&r, __LINE__);
    CHECK(j && json_is_object(json_object_get(j, "body")) &&
          json_object_size(json_object_get(j, "body")) == 0);
    json_decref(j);
    resp_free(&r);
    r = request("POST", "/api/v1/messages", "tt_good", NULL, NULL, 0); /* no Content-Length */
    j = echo_body(&r, __LINE__);
    CHECK(j && json_is_object(json_object_get(j, "body")));
    json_decref(j);
    resp_free(&r);
    /* Whatever the Content-Type, the body is JSON. */
    r = request("POST", "/api/v1/messages", "tt_good",
                "Content-Type: application/x-www-form-urlencoded\r\n", "{\"to\":\"+1\"}", 11);
    j = echo_body(&r, __LINE__);
    CHECK(j && json_is_string(json_object_get(json_object_get(j, "body"), "to")));
    json_decref(j);
    resp_free(&r);

    /* Malformed and non-object JSON. */
    {
        static const char *const bad[] = {
            "{", "{\"a\":}", "[1,2]", "\"str\"", "42", "null", "{\"a\":1}x", "{'a':1}",
            "{\"a\":\"\\ud800\"}", "{\"a\":\"\\u0000\"}",
        };
        for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
            r = post("/api/v1/messages", "tt_good", bad[i]);
            if (!CHECK_PROBLEM(r, 400, "invalid_json"))
                fprintf(stderr, "  body: %s\n", bad[i]);
            resp_free(&r);
        }
    }
    /* Invalid UTF-8 inside a string: raw 0xff, an overlong '/', a lone
     * continuation byte, a UTF-16 surrogate encoded as UTF-8. */
    {
        static const char *const bad[] = {
            "{\"a\":\"\xff\xfe\"}", "{\"a\":\"\xc0\xaf\"}", "{\"a\":\"\x80\"}",
            "{\"a\":\"\xed\xa0\x80\"}", "{\"\xff\":1}",
        };
        for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
            r = post("/api/v1/messages", "tt_good", bad[i]);
            CHECK_PROBLEM(r, 400, "invalid_json");
            resp_free(&r);
        }
    }
    CHECK_ALIVE();

    /* Depth: 64 passes, 65 and 100,000 fail without a crash. */
    big = malloc(600001);
    for (i = 0; i < 64; i++)
        big[i] = '[';
    for (i = 0; i < 64; i++)
        big[64 + i] = ']';
    big[128] = '\0';
    {
        /* {"a": ... 64 levels ... } */
        char *p = big;
        for (i = 0; i < 64; i++)
            p += sprintf(p, "{\"a\":");
        p += sprintf(p, "1");
        for (i = 0; i < 64; i++)
            *p++ = '}';
        *p = '\0';
        r = post("/api/v1/messages/batch", "tt_good", big);
        CHECK(r.status == 200);
        resp_free(&r);
        p = big;
        for (i = 0; i < 65; i++)
            p += sprintf(p, "{\"a\":");
        p += sprintf(p, "1");
        for (i = 0; i < 65; i++)
            *p++ = '}';
        *p = '\0';
        r = post("/api/v1/messages/batch", "tt_good", big);
        CHECK_PROBLEM(r, 400, "invalid_json");
        resp_free(&r);
    }
    memset(big, '[', 100000);
    big[100000] = '\0';
    r = post("/api/v1/messages/batch", "tt_good", big);
    CHECK_PROBLEM(r, 400, "invalid_json");
    resp_free(&r);
    for (i = 0; i < 100000; i++)
        memcpy(big + i * 5, "{\"a\":", 5);
    big[500000] = '\0';
    r = post("/api/v1/messages/batch", "tt_good", big);
    CHECK_PROBLEM(r, 400, "invalid_json");
    resp_free(&r);
    /* 2,000 deep inside a string is just a string. */
    memcpy(big, "{\"a\":\"", 6);
    memset(big + 6, '[', 2000);
    memcpy(big + 2006, "\"}", 3);
    r = post("/api/v1/messages/batch", "tt_good", big);
    CHECK(r.status == 200);
    resp_free(&r);
    CHECK_ALIVE();

    /* Size: a declared length over the limit is refused before the body is
     * sent (the client here never sends it). */
    r = request("POST", "/api/v1/messages", "tt_good", "Content-Length: 10000000000\r\n", NULL, 0);
    if (CHECK_PROBLEM(r, 413, "payload_too_large"))
        CHECK(hdr(&r, "Connection", v, sizeof(v)) && strcasecmp(v, "close") == 0);
    resp_free(&r);
    memset(big, ' ', 5000);
    big[0] = '{';
    big[4999] = '}';
    big[5000] = '\0';
    r = post("/api/v1/messages", "tt_good", big);
    CHECK_PROBLEM(r, 413, "payload_too_large");
    resp_free(&r);
    /* Exactly the limit is fine. */
    big[1023] = '}';
    r = request("POST", "/api/v1/messages", "tt_good", NULL, big, 1024);
    CHECK(r.status == 200);
    resp_free(&r);
    /* The size check comes after the method check. */
    r = request("PUT", "/api/v1/messages", "tt_good", "Content-Length: 10000000000\r\n", NULL, 0);
    CHECK_PROBLEM(r, 405, "method_not_allowed");
    resp_free(&r);
    CHECK_ALIVE();

    /* Chunked: a small body is read; a large one is cut off at the limit,
     * and an endless one is answered without waiting for its end. */
    {
        static const char small[] =
            "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tt_good\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            "5\r\n{\"a\":\r\n3\r\n[1]\r\n1\r\n}\r\n0\r\n\r\n";
        conn c;
        char chunk[1100];

        r = raw_request(small, sizeof(small) - 1);
        j = echo_body(&r, __LINE__);
        CHECK(j && json_is_array(json_object_get(json_object_get(j, "body"), "a")));
        json_decref(j);
        resp_free(&r);

        CHECK(conn_open(&c) == 0);
        conn_send(&c, small, strstr(small, "\r\n\r\n") + 4 - small);
        for (i = 0; i < 3; i++) {
            int n = snprintf(chunk, sizeof(chunk), "200\r\n");
            memset(chunk + n, ' ', 0x200);
            memcpy(chunk + n + 0x200, "\r\n", 2);
            conn_send(&c, chunk, (size_t)n + 0x200 + 2);
        }
        /* 1.5 KiB sent, no last chunk: the server must answer now. */
        conn_read(&c, &r, 0);
        if (CHECK_PROBLEM(r, 413, "payload_too_large"))
            CHECK(hdr(&r, "Connection", v, sizeof(v)) && strcasecmp(v, "close") == 0);
        resp_free(&r);
        conn_close(&c);
    }
    CHECK_ALIVE();

    /* Expect: 100-continue: invited when the declared size fits, refused
     * at once when it does not. */
    {
        static const char head[] =
            "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tt_good\r\n"
            "Expect: 100-continue\r\nContent-Length: 7\r\n\r\n";
        static const char head_big[] =
            "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tt_good\r\n"
            "Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n";
        conn c;

        CHECK(conn_open(&c) == 0);
        conn_send(&c, head, sizeof(head) - 1);
        conn_read(&c, &r, 0);
        CHECK(r.status == 100);
        resp_free(&r);
        conn_send(&c, "{\"a\":2}", 7);
        conn_read(&c, &r, 0);
        CHECK(r.status == 200 && r.body && strstr(r.body, "\"a\":2") != NULL);
        resp_free(&r);
        conn_close(&c);

        CHECK(conn_open(&c) == 0);
        conn_send(&c, head_big, sizeof(head_big) - 1);
        conn_read(&c, &r, 0);
        CHECK_PROBLEM(r, 413, "payload_too_large");
        resp_free(&r);
        conn_close(&c);
    }

    /* A body that stops before its declared length. */
    {
        conn c;
        static const char part[] =
            "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tt_good\r\n"
            "Content-Length: 100\r\n\r\n{\"a\":";
        CHECK(conn_open(&c) == 0);
        conn_send(&c, part, sizeof(part) - 1);
        shutdown(c.fd, SHUT_WR);
        conn_read(&c, &r, 0);
        CHECK(r.status == 0 || r.status == 400);
        resp_free(&r);
        conn_close(&c);
    }
    CHECK_ALIVE();
    free(big);
}

static void test_garbage(void)
{
    resp r;
    char v[128], *big;
    size_t i;

    /* Methods civetweb itself rejects come back as problem+json. */
    {
        static const char req1[] = "BREW /api/v1/messages HTTP/1.1\r\nHost: x\r\n\r\n";
        long mark = records_mark();
        r = raw_request(req1, sizeof(req1) - 1);
        if (CHECK_PROBLEM(r, 405, "method_not_allowed"))
            CHECK(hdr(&r, "Allow", v, sizeof(v)) && strcmp(v, "POST, GET") == 0);
        resp_free(&r);
        CHECK_SEEN(mark, "unmatched", "OTHER", 405);
    }
    {
        static const char req1[] = "BREW /coffee/pot HTTP/1.1\r\nHost: x\r\n\r\n";
        r = raw_request(req1, sizeof(req1) - 1);
        CHECK_PROBLEM(r, 404, "not_found");
        resp_free(&r);
    }
    {
        static const char req1[] =
            "PROPFIND /api/v1/messages/5 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tt_good\r\n"
            "Depth: 1\r\n\r\n";
        r = raw_request(req1, sizeof(req1) - 1);
        if (CHECK_PROBLEM(r, 405, "method_not_allowed"))
            CHECK(hdr(&r, "Allow", v, sizeof(v)) && strcmp(v, "GET, DELETE") == 0);
        resp_free(&r);
    }
    CHECK_ALIVE();
    {
        char req1[512];
        int n;
        memset(req1, 'Q', 200);
        n = 200 + snprintf(req1 + 200, sizeof(req1) - 200,
                           " /api/v1/messages/5 HTTP/1.1\r\nHost: x\r\n\r\n");
        r = raw_request(req1, (size_t)n);
        if (CHECK_PROBLEM(r, 405, "method_not_allowed"))
            CHECK(hdr(&r, "Allow", v, sizeof(v)) && strcmp(v, "GET, DELETE") == 0);
        resp_free(&r);
        /* A garbage method of non-token bytes. */
        memcpy(req1, "\x01\x02\x7f{}", 5);
        r = raw_request(req1, (size_t)n);
        CHECK(r.status == 0 || (r.status >= 400 && r.status < 500 &&
                                hdr(&r, "Content-Type", v, sizeof(v)) &&
                                strcmp(v, "application/problem+json") == 0));
        resp_free(&r);
    }
    CHECK_ALIVE();

    /* Huge headers: problem+json 4xx or a closed connection, never a crash. */
    big = malloc(200000);
    {
        int n = snprintf(big, 200000, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ");
        memset(big + n, 'a', 100000);
        n += 100000;
        n += snprintf(big + n, 200000 - (size_t)n, "\r\n\r\n");
        r = raw_request(big, (size_t)n);
        printf("100 KB header: %d\n", r.status);
        if (r.status != 0)
            CHECK_PROBLEM(r, 431, "headers_too_large");
        resp_free(&r);
        /* Just over the limit: the server has the whole head and answers. */
        n = snprintf(big, 200000, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ");
        memset(big + n, 'a', 17000);
        n += 17000;
        n += snprintf(big + n, 200000 - (size_t)n, "\r\n\r\n");
        r = raw_request(big, (size_t)n);
        CHECK_PROBLEM(r, 431, "headers_too_large");
        resp_free(&r);
        /* Many small headers. */
        n = snprintf(big, 200000, "GET /healthz HTTP/1.1\r\nHost: x\r\n");
        for (i = 0; i < 1000; i++)
            n += snprintf(big + n, 200000 - (size_t)n, "X-H%zu: v\r\n", i);
        n += snprintf(big + n, 200000 - (size_t)n, "\r\n");
        r = raw_request(big, (size_t)n);
        /* civetweb keeps the first 64 headers and ignores the rest */
        CHECK(r.status == 0 || r.status == 200 ||
              (r.status >= 400 && r.status < 500 && hdr(&r, "Content-Type", v, sizeof(v)) &&
               strcmp(v, "application/problem+json") == 0));
        resp_free(&r);
        /* A huge Authorization header on an /api/v1 route. */
        n = snprintf(big, 200000, "GET /api/v1/messages HTTP/1.1\r\nHost: x\r\n"
                                  "Authorization: Bearer ");
        memset(big + n, 't', 15000);
        n += 15000;
        n += snprintf(big + n, 200000 - (size_t)n, "\r\n\r\n");
        r = raw_request(big, (size_t)n);
        CHECK_PROBLEM(r, 401, "unauthorized");
        resp_free(&r);
    }
    CHECK_ALIVE();

    /* Assorted malformed heads. */
    {
#define J(s) {s, sizeof(s) - 1}
        static const struct {
            const char *s;
            size_t n;
        } junk[] = {
            J("GET /healthz HTTP/1.1\r\nHost x\r\n\r\n"),
            J("GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n"),
            J("GET /healthz\r\nHost: x\r\n\r\n"),
            J("GET /healthz HTTP/1.1\r\nX: a\x01" "b\r\n\r\n"),
            J("GET /heal\x80thz HTTP/1.1\r\nHost: x\r\n\r\n"),
            J("GET /healthz HTTP/1.1\r\nX: a\0b\r\n\r\n"),
            J("POST /api/v1/messages HTTP/1.1\r\nContent-Length: abc\r\n\r\n"),
            J("POST /api/v1/messages HTTP/1.1\r\nContent-Length: -5\r\n\r\n"),
            J("POST /api/v1/messages HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            J("POST /api/v1/messages HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            J("POST /api/v1/messages HTTP/1.1\r\nAuthorization: Bearer tt_good\r\n"
              "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
            J("POST /api/v1/messages HTTP/1.1\r\nAuthorization: Bearer tt_good\r\n"
              "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n{}\r\n0\r\n\r\n"),
            J("\r\n\r\n"),
            J("GET * HTTP/1.1\r\nHost: x\r\n\r\n"),
            J("GET http://elsewhere.example/healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
            J("GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"),
            J("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), /* a TLS ClientHello */
            J("\0\0\0\0\r\n\r\n"),
        };
#undef J
        for (i = 0; i < sizeof(junk) / sizeof(junk[0]); i++) {
            r = raw_request(junk[i].s, junk[i].n);
            if (r.status != 0 && r.head != NULL)
                printf("junk request %zu: %.*s\n", i, (int)strcspn(r.head, "\r"), r.head);
            else
                printf("junk request %zu: connection closed\n", i);
            if (r.status != 0 && !(r.status >= 400 && r.status < 600 &&
                                   hdr(&r, "Content-Type", v, sizeof(v)) &&
                                   strcmp(v, "application/problem+json") == 0)) {
                fprintf(stderr, "junk %zu: status %d head %s\n", i, r.status,
                        r.head ? r.head : "");
                failures++;
            }
            resp_free(&r);
            CHECK_ALIVE();
        }
    }
    /* A client that connects, sends half a head and leaves. */
    {
        conn c;
        CHECK(conn_open(&c) == 0);
        conn_send(&c, "GET /heal", 9);
        conn_close(&c);
        CHECK(conn_open(&c) == 0);
        conn_close(&c);
    }
    CHECK_ALIVE();
    free(big);
}

static void test_replies(void)
{
    resp r;
    char v[64];
    json_t *j;
    long mark = records_mark();

    r = get("/api/v1/noreply", "tt_good");
    CHECK_PROBLEM(r, 500, "internal");
    resp_free(&r);
    CHECK_SEEN(mark, "/api/v1/noreply", "GET", 500);

    r = get("/api/v1/twice", "tt_good");
    CHECK(r.status == 200 && strstr(r.body, "first") != NULL);
    resp_free(&r);
    CHECK_SEEN(mark, "/api/v1/twice", "GET", 200);

    r = post("/api/v1/validate", "tt_good", "{}");
    if (CHECK_PROBLEM(r, 422, "validation_failed")) {
        j = json_loads(r.body, 0, NULL);
        CHECK(j && json_is_array(json_object_get(j, "errors")));
        CHECK(j && strcmp(json_string_value(json_object_get(
                              json_array_get(json_object_get(j, "errors"), 0), "field")),
                          "to") == 0);
        json_decref(j);
    }
    resp_free(&r);

    r = get("/api/v1/busy", "tt_good");
    if (CHECK_PROBLEM(r, 503, "overloaded"))
        CHECK(hdr(&r, "Retry-After", v, sizeof(v)) && strcmp(v, "1") == 0);
    resp_free(&r);

    r = request("DELETE", "/api/v1/thing", "tt_good", NULL, NULL, 0);
    CHECK(r.status == 204 && r.body_len == 0);
    resp_free(&r);

    r = get("/api/v1/text", "tt_good");
    CHECK(r.status == 200 && hdr(&r, "Content-Type", v, sizeof(v)) &&
          strcmp(v, "text/plain") == 0 && r.body_len == 5 && memcmp(r.body, "hello", 5) == 0);
    CHECK(hdr(&r, "Content-Length", v, sizeof(v)) && strcmp(v, "5") == 0);
    resp_free(&r);
}

/* Several requests on one connection, one at a time and pipelined. */
static void test_keepalive(void)
{
    static const char req1[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    static const char req2[] =
        "POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tt_good\r\n"
        "Content-Length: 7\r\n\r\n{\"a\":1}";
    static const char req3[] = "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    static const char req4[] = "GET /api/v1/nothing HTTP/1.1\r\nHost: x\r\n"
                               "Authorization: Bearer tt_good\r\n\r\n";
    conn c;
    resp r;
    char v[64], pipelined[512];
    int i, n;

    CHECK(conn_open(&c) == 0);
    for (i = 0; i < 3; i++) {
        conn_send(&c, req1, sizeof(req1) - 1);
        conn_read(&c, &r, 0);
        CHECK(r.status == 200);
        CHECK(hdr(&r, "Content-Length", v, sizeof(v)) != NULL);
        CHECK(!hdr(&r, "Connection", v, sizeof(v)) || strcasecmp(v, "close") != 0);
        resp_free(&r);
        conn_send(&c, req2, sizeof(req2) - 1);
        conn_read(&c, &r, 0);
        CHECK(r.status == 200 && strstr(r.body, "\"a\":1") != NULL);
        resp_free(&r);
        conn_send(&c, req3, sizeof(req3) - 1);
        conn_read(&c, &r, 1);
        CHECK(r.status == 405);
        resp_free(&r);
        conn_send(&c, req4, sizeof(req4) - 1);
        conn_read(&c, &r, 0);
        CHECK_PROBLEM(r, 404, "not_found");
        resp_free(&r);
    }
    n = snprintf(pipelined, sizeof(pipelined), "%s%s%s", req1, req2, req4);
    conn_send(&c, pipelined, (size_t)n);
    conn_read(&c, &r, 0);
    CHECK(r.status == 200);
    resp_free(&r);
    conn_read(&c, &r, 0);
    CHECK(r.status == 200);
    resp_free(&r);
    conn_read(&c, &r, 0);
    CHECK(r.status == 404);
    resp_free(&r);
    conn_close(&c);
}

/* Good and hostile requests from several threads at once. */
static void *hammer(void *arg)
{
    long id = (long)arg;
    int i, bad = 0;
    char *deep = malloc(20001);

    memset(deep, '[', 20000);
    deep[20000] = '\0';
    for (i = 0; i < 40; i++) {
        resp r;
        switch ((i + id) % 5) {
        case 0:
            r = get("/healthz", NULL);
            bad += r.status != 200;
            break;
        case 1:
            r = post("/api/v1/devices/3/messages", "tt_good", deep);
            bad += r.status != 400;
            break;
        case 2:
            r = raw_request("BREW /x HTTP/1.1\r\n\r\n", 20);
            bad += r.status != 404;
            break;
        case 3:
            r = post("/api/v1/messages", "tt_good", "{\"to\":\"+639171234567\",\"text\":\"hi\"}");
            bad += r.status != 200;
            break;
        default:
            r = get("/api/v1/messages/1", "nope");
            bad += r.status != 401;
            break;
        }
        resp_free(&r);
    }
    free(deep);
    return (void *)(long)bad;
}

static void test_concurrent(void)
{
    pthread_t t[8];
    long i;

    for (i = 0; i < 8; i++)
        pthread_create(&t[i], NULL, hammer, (void *)i);
    for (i = 0; i < 8; i++) {
        void *bad;
        pthread_join(t[i], &bad);
        CHECK((long)bad == 0);
    }
    CHECK_ALIVE();
}

static void test_start_errors(void)
{
    http_config cfg;
    http_server *s2 = NULL;
    char listen[64];
    int rc;

    memset(&cfg, 0, sizeof(cfg));
    cfg.threads = 2;
    cfg.routes = routes;
    cfg.nroutes = sizeof(routes) / sizeof(routes[0]);
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    cfg.listen = listen;
    rc = http_start(&cfg, &s2);
    CHECK(rc == -EADDRINUSE);
    CHECK(s2 == NULL);
    if (rc == 0)
        http_stop(s2);
    cfg.listen = "not-an-address";
    rc = http_start(&cfg, &s2);
    CHECK(rc < 0 && s2 == NULL);
    if (rc == 0)
        http_stop(s2);
    cfg.listen = NULL;
    CHECK(http_start(&cfg, &s2) == -EINVAL);
}

int main(void)
{
    http_config cfg;
    http_server *s = NULL;
    int rc;

    signal(SIGPIPE, SIG_IGN);
    memset(&cfg, 0, sizeof(cfg));
    cfg.listen = "127.0.0.1:0";
    cfg.threads = 8;
    cfg.routes = routes;
    cfg.nroutes = sizeof(routes) / sizeof(routes[0]);
    cfg.auth_prefix = "/api/v1";
    cfg.auth = auth;
    cfg.on_response = on_response;
    rc = http_start(&cfg, &s);
    if (rc != 0) {
        fprintf(stderr, "http_start: %d\n", rc);
        return 1;
    }
    port = http_port(s);
    CHECK(port > 0);

    test_auth();
    test_routing();
    test_bodies();
    test_garbage();
    test_replies();
    test_keepalive();
    test_concurrent();
    test_start_errors();
    CHECK(records_mark() > 0);

    http_stop(s);
    if (failures) {
        fprintf(stderr, "test_http_server: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_http_server: all checks passed\n");
    return 0;
}
