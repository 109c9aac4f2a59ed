/* test_http_unit.c: the pure parts of the HTTP edge framework, no sockets.
 *
 * The JSON depth check (the guard that keeps jansson's recursion off
 * civetweb's 100 KiB worker stacks), status titles, problem objects and
 * query-string decoding. */
#include "http/http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                        \
        }                                                                      \
    } while (0)

static int depth_ok(const char *s, int max)
{
    return http_json_depth_ok(s, strlen(s), max);
}

/* n opening brackets of kind open, then n closing ones, on the heap. */
static char *nested(int n, const char *open, const char *close)
{
    size_t ol = strlen(open), cl = strlen(close);
    char *b = malloc((size_t)n * (ol + cl) + 1);
    char *p = b;
    int i;

    for (i = 0; i < n; i++, p += ol)
        memcpy(p, open, ol);
    for (i = 0; i < n; i++, p += cl)
        memcpy(p, close, cl);
    *p = '\0';
    return b;
}

static void test_depth(void)
{
    char *b;

    CHECK(depth_ok("", 64));
    CHECK(depth_ok("{}", 1));
    CHECK(!depth_ok("{}", 0));
    CHECK(depth_ok("{\"a\":[1,2,{\"b\":3}]}", 3));
    CHECK(!depth_ok("{\"a\":[1,2,{\"b\":3}]}", 2));
    /* Sequential containers do not add up. */
    CHECK(depth_ok("[[1],[2],[3],{\"a\":1}]", 2));

    /* Brackets inside strings do not count, escapes included. */
    CHECK(depth_ok("{\"a\":\"[[[[[[[[\"}", 1));
    CHECK(depth_ok("{\"a\":\"\\\"[[[[\"}", 1));   /* \" does not end the string */
    CHECK(depth_ok("{\"a\":\"\\\\\"}", 1));        /* \\ then the real end */
    CHECK(!depth_ok("{\"a\":\"\\\\\",\"b\":[[]]}", 2)); /* after "\\" brackets count again */
    CHECK(depth_ok("{\"\\u005b\":1}", 1));

    /* Exactly the limit passes, one more fails. */
    b = nested(64, "[", "]");
    CHECK(depth_ok(b, 64));
    free(b);
    b = nested(65, "[", "]");
    CHECK(!depth_ok(b, 64));
    free(b);
    b = nested(64, "{\"a\":", "}");
    CHECK(depth_ok(b, 64));
    free(b);
    b = nested(65, "{\"a\":", "}");
    CHECK(!depth_ok(b, 64));
    free(b);

    /* Hostile inputs: deep, unterminated, closers first. */
    b = nested(100000, "[", "");
    CHECK(!depth_ok(b, 64));
    free(b);
    CHECK(depth_ok("]]]]]]]]]][", 1));
    CHECK(depth_ok("\"unterminated [[[[[[[[", 1));
    CHECK(depth_ok("\"ends in backslash\\", 1));
    /* Embedded NUL is just a byte. */
    CHECK(!http_json_depth_ok("[\0[[", 4, 2));
}

static void test_titles(void)
{
    CHECK(strcmp(http_status_title(400), "Bad Request") == 0);
    CHECK(strcmp(http_status_title(401), "Unauthorized") == 0);
    CHECK(strcmp(http_status_title(404), "Not Found") == 0);
    CHECK(strcmp(http_status_title(405), "Method Not Allowed") == 0);
    CHECK(strcmp(http_status_title(409), "Conflict") == 0);
    CHECK(strcmp(http_status_title(413), "Content Too Large") == 0);
    CHECK(strcmp(http_status_title(422), "Unprocessable Content") == 0);
    CHECK(strcmp(http_status_title(429), "Too Many Requests") == 0);
    CHECK(strcmp(http_status_title(431), "Request Header Fields Too Large") == 0);
    CHECK(strcmp(http_status_title(500), "Internal Server Error") == 0);
    CHECK(strcmp(http_status_title(503), "Service Unavailable") == 0);
    CHECK(http_status_title(499) != NULL);
    CHECK(http_status_title(-1) != NULL);
}

static void test_problem(void)
{
    json_t *p = http_problem_json(409, "device_offline", "device 7 is offline");
    char *s;

    CHECK(p != NULL);
    s = json_dumps(p, JSON_COMPACT);
    CHECK(s != NULL && strcmp(s, "{\"type\":\"about:blank\",\"title\":\"Conflict\",\"status\":409,"
                                 "\"code\":\"device_offline\",\"detail\":\"device 7 is offline\"}") == 0);
    free(s);
    json_decref(p);

    /* A detail that is not UTF-8 still makes a valid problem. */
    p = http_problem_json(400, "invalid_json", "near '\xff\xfe'");
    CHECK(p != NULL);
    CHECK(p && json_is_string(json_object_get(p, "detail")));
    json_decref(p);
}

static void test_query(void)
{
    http_req r;
    char buf[16];

    memset(&r, 0, sizeof(r));
    CHECK(http_query(&r, "a", buf, sizeof(buf)) == NULL);

    r.query = "to=%2B63917&limit=5&flag&empty=&sp=a%20b&plus=+1&bad=%zz&long=0123456789abcdefghij";
    CHECK(http_query(&r, "to", buf, sizeof(buf)) && strcmp(buf, "+63917") == 0);
    CHECK(http_query(&r, "limit", buf, sizeof(buf)) && strcmp(buf, "5") == 0);
    CHECK(http_query(&r, "flag", buf, sizeof(buf)) && strcmp(buf, "") == 0);
    CHECK(http_query(&r, "empty", buf, sizeof(buf)) && strcmp(buf, "") == 0);
    CHECK(http_query(&r, "sp", buf, sizeof(buf)) && strcmp(buf, "a b") == 0);
    CHECK(http_query(&r, "plus", buf, sizeof(buf)) && strcmp(buf, "+1") == 0);
    /* Present but undecodable or too long: "" so validation rejects it. */
    CHECK(http_query(&r, "bad", buf, sizeof(buf)) && strcmp(buf, "") == 0);
    CHECK(http_query(&r, "long", buf, sizeof(buf)) && strcmp(buf, "") == 0);
    CHECK(http_query(&r, "lim", buf, sizeof(buf)) == NULL);
    CHECK(http_query(&r, "missing", buf, sizeof(buf)) == NULL);

    r.query = "a=1&a=2";
    CHECK(http_query(&r, "a", buf, sizeof(buf)) && strcmp(buf, "1") == 0);
    r.query = "";
    CHECK(http_query(&r, "a", buf, sizeof(buf)) == NULL);
    r.query = "&&=x&a=%00";
    CHECK(http_query(&r, "a", buf, sizeof(buf)) && strcmp(buf, "") == 0);
}

int main(void)
{
    test_depth();
    test_titles();
    test_problem();
    test_query();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("test_http_unit: all checks passed\n");
    return 0;
}
