/* http.c: the HTTP edge framework on civetweb (contract in http.h).
 *
 * One begin_request callback sees every request civetweb has parsed and runs
 * the checks of API.md section 1 in order: auth (401) -> route (404) ->
 * method (405) -> size (413) -> JSON (400), then calls the route's handler
 * with a parsed, authenticated request. civetweb's own error pages (methods
 * it does not know, oversized headers, malformed request lines) go through
 * the http_error callback and come out as problem+json too.
 *
 * civetweb worker threads have 100 KiB stacks: bodies live on the heap, the
 * JSON nesting depth is checked without recursion before jansson (which
 * recurses once per level) ever sees the text, and nothing here keeps a
 * large buffer on the stack. The server holds no mutable state shared
 * between requests: everything a request needs lives in its own frame or
 * heap blocks, and the config copy is written once before civetweb starts
 * its threads. */
#include "http/http.h"

#include <civetweb.h>
#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "util/clock.h"
#include "util/log.h"

#define HTTP_JSON_MAX_DEPTH 64
#define HTTP_MAX_HEADER_BYTES "16384"
#define HTTP_REQUEST_TIMEOUT_MS "30000"
#define HTTP_KEEP_ALIVE_TIMEOUT_MS "10000"
#define HTTP_BODY_CHUNK 16384 /* first heap allocation for a body of unknown length */

struct http_server {
    struct mg_context *ctx;
    http_config cfg;    /* copy; listen and auth_prefix point into the fields below */
    char *listen;
    char *auth_prefix;
    size_t auth_prefix_len;
    int port;
    /* Why the listening socket failed, as civetweb logged it during
     * mg_start2 (it reports only "Failed to setup server ports"). */
    atomic_int start_errno;
    /* Graceful stop: once draining, new requests get 503 and http_stop waits
     * for the requests already running to finish and write their responses
     * (civetweb stops writing once its own stop flag is set). */
    atomic_int draining;
    atomic_int inflight;
};

/* ------------------------------------------------------------------ */
/* Status titles and problem objects                                   */

const char *http_status_title(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    default: break;
    }
    if (status >= 500 && status < 600)
        return "Server Error";
    if (status >= 400 && status < 500)
        return "Client Error";
    return "Unknown";
}

/* A JSON string from arbitrary bytes. Text that is not valid UTF-8 (an
 * error message quoting client input, say) has its non-ASCII bytes replaced
 * by '?', so a problem body is always valid JSON. NULL only on OOM. */
static json_t *http_json_text(const char *s)
{
    json_t *j;
    char *copy;
    size_t i, n;

    if (s == NULL)
        s = "";
    j = json_string(s);
    if (j != NULL)
        return j;
    n = strlen(s);
    copy = malloc(n + 1);
    if (copy == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        copy[i] = (c >= 0x80 || c < 0x20) ? '?' : (char)c;
    }
    copy[n] = '\0';
    j = json_string(copy);
    free(copy);
    return j;
}

json_t *http_problem_json(int status, const char *code, const char *detail)
{
    json_t *o = json_object();

    if (o == NULL)
        return NULL;
    if (json_object_set_new(o, "type", json_string("about:blank")) != 0 ||
        json_object_set_new(o, "title", json_string(http_status_title(status))) != 0 ||
        json_object_set_new(o, "status", json_integer(status)) != 0 ||
        json_object_set_new(o, "code", http_json_text(code ? code : "error")) != 0 ||
        json_object_set_new(o, "detail",
                            http_json_text(detail ? detail : http_status_title(status))) != 0) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* ------------------------------------------------------------------ */
/* Sending responses                                                   */

/* The Date header value (RFC 9110 IMF-fixdate) from the server's clock.
 * Written here with gmtime_r: civetweb 1.15's own response-header functions
 * format Date with gmtime(), whose static buffer is shared by all worker
 * threads (a data race under concurrent responses). */
static void http_date(char *buf, size_t len)
{
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = (time_t)(tt_now_ms() / 1000);
    struct tm tm;

    if (gmtime_r(&now, &tm) == NULL) {
        snprintf(buf, len, "Thu, 01 Jan 1970 00:00:00 GMT");
        return;
    }
    snprintf(buf, len, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday % 7], tm.tm_mday,
             months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* Whether a comma-separated header value contains token (case-insensitive). */
static int http_has_token(const char *value, const char *token)
{
    size_t n = strlen(token);

    while (value != NULL && *value != '\0') {
        size_t len;
        while (*value == ' ' || *value == '\t' || *value == ',')
            value++;
        len = strcspn(value, ",");
        while (len > 0 && (value[len - 1] == ' ' || value[len - 1] == '\t'))
            len--;
        if (len == n && strncasecmp(value, token, n) == 0)
            return 1;
        value += strcspn(value, ",");
    }
    return 0;
}

/* Whether the connection may carry another request after this response:
 * HTTP/1.1 unless the client said "Connection: close", HTTP/1.0 only when
 * it asked for keep-alive. */
static int http_keep_alive(struct mg_connection *conn)
{
    const struct mg_request_info *ri = mg_get_request_info(conn);
    const char *c = mg_get_header(conn, "Connection");

    if (ri == NULL || ri->http_version == NULL || http_has_token(c, "close"))
        return 0;
    if (strcmp(ri->http_version, "1.1") == 0)
        return 1;
    return strcmp(ri->http_version, "1.0") == 0 && http_has_token(c, "keep-alive");
}

/* Contract: sends one complete response in a single write: status line,
 * Date, Content-Type (when given), Content-Length (except for 1xx, 204 and
 * 304, where HTTP forbids it), Connection when the connection closes (close
 * != 0 forces that, for a request whose body was left unread) or an
 * HTTP/1.0 client asked to keep it, the extra header lines, then the body
 * (not for HEAD). A second reply to the same request is a handler bug: it is
 * logged and dropped, since the first one is already on the wire. */
static void http_send(http_req *r, int status, const char *ctype, const char *body, size_t len,
                      const char *extra_headers, int close)
{
    struct mg_connection *conn = r->conn;
    int no_body = (status == 204 || status == 304 || (status >= 100 && status < 200));
    int is_head = r->method != NULL && strcmp(r->method, "HEAD") == 0;
    size_t extra_len = extra_headers ? strlen(extra_headers) : 0;
    size_t cap, n;
    char date[40];
    char *out;
    int keep;

    if (r->status != 0) {
        LOG_ERROR("http: second response (%d) to %s %s dropped, %d already sent", status,
                  r->method ? r->method : "?", r->route ? r->route : "unmatched", r->status);
        return;
    }
    r->status = status;
    if (status < 100 || status > 999)
        status = 500;
    keep = !close && http_keep_alive(conn);
    if (!keep)
        mg_disable_connection_keep_alive(conn);
    if (no_body)
        len = 0;

    http_date(date, sizeof(date));
    cap = 256 + (ctype ? strlen(ctype) : 0) + extra_len + (is_head ? 0 : len);
    out = malloc(cap);
    if (out == NULL) {
        LOG_ERROR("http: out of memory sending a %d response", status);
        mg_disable_connection_keep_alive(conn);
        return;
    }
    n = (size_t)snprintf(out, cap, "HTTP/1.1 %d %s\r\nDate: %s\r\n", status,
                         http_status_title(status), date);
    if (ctype != NULL && !no_body)
        n += (size_t)snprintf(out + n, cap - n, "Content-Type: %s\r\n", ctype);
    if (!no_body)
        n += (size_t)snprintf(out + n, cap - n, "Content-Length: %zu\r\n", len);
    if (!keep)
        n += (size_t)snprintf(out + n, cap - n, "Connection: close\r\n");
    else if (strcmp(mg_get_request_info(conn)->http_version, "1.0") == 0)
        n += (size_t)snprintf(out + n, cap - n, "Connection: keep-alive\r\n");
    if (extra_len > 0) {
        memcpy(out + n, extra_headers, extra_len);
        n += extra_len;
        if (extra_len < 2 || memcmp(extra_headers + extra_len - 2, "\r\n", 2) != 0)
            n += (size_t)snprintf(out + n, cap - n, "\r\n");
    }
    n += (size_t)snprintf(out + n, cap - n, "\r\n");
    /* HEAD gets the headers of the response only: a body would be read by
     * the client as the start of the next response on a kept-alive
     * connection. */
    if (!no_body && !is_head && len > 0) {
        memcpy(out + n, body, len);
        n += len;
    }
    if (mg_write(conn, out, n) != (int)n)
        mg_disable_connection_keep_alive(conn);
    free(out);
}

/* Fallback when a problem body cannot be built (out of memory). */
static const char http_oom_body[] =
    "{\"type\":\"about:blank\",\"title\":\"Internal Server Error\",\"status\":500,"
    "\"code\":\"internal\",\"detail\":\"out of memory\"}";

/* Sends a problem+json response (errors stolen, may be NULL). */
static void http_problem_send(http_req *r, int status, const char *code, const char *detail,
                              json_t *errors, const char *extra_headers, int close)
{
    json_t *o = http_problem_json(status, code, detail);
    char *text = NULL;

    if (o != NULL && errors != NULL)
        json_object_set(o, "errors", errors);
    json_decref(errors);
    if (o != NULL)
        text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (text == NULL) {
        http_send(r, 500, "application/problem+json", http_oom_body, sizeof(http_oom_body) - 1,
                  NULL, close);
        return;
    }
    http_send(r, status, "application/problem+json", text, strlen(text), extra_headers, close);
    free(text);
}

/* The framework's own problems: printf-style detail, optional extra
 * headers, and whether the connection must close afterwards. */
static void http_problem(http_req *r, int close, int status, const char *code,
                         const char *extra_headers, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static void http_problem(http_req *r, int close, int status, const char *code,
                         const char *extra_headers, const char *fmt, ...)
{
    char detail[512]; /* small: details are one sentence */
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    http_problem_send(r, status, code, detail, NULL, extra_headers, close);
}

void http_reply_json(http_req *r, int status, json_t *obj, const char *extra_headers)
{
    char *text = NULL;

    if (obj != NULL)
        text = json_dumps(obj, JSON_COMPACT | JSON_ENCODE_ANY);
    json_decref(obj);
    if (text == NULL) {
        LOG_ERROR("http: cannot serialise a %d response to %s", status,
                  r->route ? r->route : "unmatched");
        http_send(r, 500, "application/problem+json", http_oom_body, sizeof(http_oom_body) - 1,
                  NULL, 0);
        return;
    }
    http_send(r, status, "application/json", text, strlen(text), extra_headers, 0);
    free(text);
}

void http_reply_empty(http_req *r, int status)
{
    http_send(r, status, NULL, NULL, 0, NULL, 0);
}

void http_reply_text(http_req *r, int status, const char *content_type, const char *body,
                     size_t len)
{
    http_send(r, status, content_type ? content_type : "text/plain; charset=utf-8", body, len,
              NULL, 0);
}

void http_reply_problem_ex(http_req *r, int status, const char *code, const char *detail,
                           json_t *errors, const char *extra_headers)
{
    http_problem_send(r, status, code, detail, errors, extra_headers, 0);
}

void http_reply_problem(http_req *r, int status, const char *code, const char *fmt, ...)
{
    char detail[512]; /* small: details are one sentence */
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    http_problem_send(r, status, code, detail, NULL, NULL, 0);
}

void http_reply_validation(http_req *r, json_t *errors)
{
    if (errors == NULL)
        errors = json_array();
    http_problem_send(r, 422, "validation_failed", "the request has invalid fields", errors, NULL,
                      0);
}

/* ------------------------------------------------------------------ */
/* Request helpers                                                     */

const char *http_header(const http_req *r, const char *name)
{
    return mg_get_header(r->conn, name);
}

static int http_hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decodes src[0..n) into dst (room for n + 1 bytes). '+' stays '+'
 * (RFC 3986: only HTML forms give it the meaning of a space, and a phone
 * number's '+' must survive). Returns the decoded length, or -1 when an
 * escape is malformed or decodes to a NUL byte. */
static long http_pct_decode(const char *src, size_t n, char *dst)
{
    size_t i, o = 0;

    for (i = 0; i < n; i++) {
        if (src[i] == '%') {
            int hi, lo;
            if (i + 2 >= n)
                return -1; /* truncated escape */
            hi = http_hexval((unsigned char)src[i + 1]);
            lo = http_hexval((unsigned char)src[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0))
                return -1;
            dst[o++] = (char)(hi * 16 + lo);
            i += 2;
        } else if (src[i] == '\0') {
            return -1;
        } else {
            dst[o++] = src[i];
        }
    }
    dst[o] = '\0';
    return (long)o;
}

/* Contract: the first parameter called name in the raw query string,
 * percent-decoded ('+' kept literally, see http_pct_decode) into buf.
 * Returns buf, or NULL when the parameter is absent. A present value that
 * does not decode or does not fit in buf comes back as "" so that the
 * handler's validation rejects it instead of silently ignoring it. */
const char *http_query(const http_req *r, const char *name, char *buf, size_t len)
{
    const char *q = r->query;
    size_t nlen = strlen(name);

    if (q == NULL || buf == NULL || len == 0)
        return NULL;
    while (*q != '\0') {
        const char *end = strchr(q, '&');
        const char *eq;
        size_t plen;

        if (end == NULL)
            end = q + strlen(q);
        plen = (size_t)(end - q);
        eq = memchr(q, '=', plen);
        if (eq == NULL)
            eq = end;
        if ((size_t)(eq - q) == nlen && memcmp(q, name, nlen) == 0) {
            const char *v = eq < end ? eq + 1 : end;
            size_t vlen = (size_t)(end - v);
            if (vlen + 1 > len || http_pct_decode(v, vlen, buf) < 0)
                buf[0] = '\0';
            return buf;
        }
        q = *end ? end + 1 : end;
    }
    return NULL;
}

/* Contract: returns 1 when the JSON text nests arrays and objects no deeper
 * than max_depth, else 0. One pass, constant memory: brackets inside
 * strings (including after escaped quotes) do not count. It does not
 * validate anything else; jansson does that once the depth is known safe.
 * A closing bracket without an opener leaves the depth at 0 (the text is
 * malformed and jansson rejects it without recursing). */
int http_json_depth_ok(const char *buf, size_t len, int max_depth)
{
    size_t i;
    long depth = 0;
    int in_string = 0;

    for (i = 0; i < len; i++) {
        char c = buf[i];
        if (in_string) {
            if (c == '\\')
                i++; /* skip the escaped character, whatever it is */
            else if (c == '"')
                in_string = 0;
            continue;
        }
        switch (c) {
        case '"':
            in_string = 1;
            break;
        case '[':
        case '{':
            if (++depth > max_depth)
                return 0;
            break;
        case ']':
        case '}':
            if (depth > 0)
                depth--;
            break;
        default:
            break;
        }
    }
    return 1;
}

/* ------------------------------------------------------------------ */
/* Routing                                                             */

struct http_span {
    const char *p;
    size_t n;
};

/* Contract: matches the raw path path[0..n) against a pattern whose
 * segments are literals or {name} placeholders. A placeholder matches one
 * non-empty segment, recorded in params (at most HTTP_MAX_PARAMS); an empty
 * segment anywhere ("//", a trailing '/') never matches. Returns 1 or 0. */
static int http_route_match(const char *pattern, const char *path, size_t n,
                            struct http_span *params, int *nparams)
{
    const char *pend = path + n;
    int np = 0;

    for (;;) {
        const char *ps, *qs;
        size_t plen, qlen;

        if (*pattern == '\0' && path == pend)
            break;
        if (*pattern != '/' || path == pend || *path != '/')
            return 0;
        pattern++;
        path++;
        ps = pattern;
        while (*pattern != '\0' && *pattern != '/')
            pattern++;
        plen = (size_t)(pattern - ps);
        qs = path;
        while (path < pend && *path != '/')
            path++;
        qlen = (size_t)(path - qs);
        if (qlen == 0 && plen != 0)
            return 0;
        if (plen >= 2 && ps[0] == '{' && ps[plen - 1] == '}') {
            if (np >= HTTP_MAX_PARAMS)
                return 0;
            params[np].p = qs;
            params[np].n = qlen;
            np++;
        } else if (plen != qlen || memcmp(ps, qs, plen) != 0) {
            return 0;
        }
    }
    *nparams = np;
    return 1;
}

/* Whether path is the auth prefix or below it ("/api/v1", "/api/v1/..."). */
static int http_under_prefix(const http_server *s, const char *path)
{
    size_t n = s->auth_prefix_len;

    if (s->auth_prefix == NULL || n == 0)
        return 0;
    return strncmp(path, s->auth_prefix, n) == 0 && (path[n] == '\0' || path[n] == '/');
}

/* Appends to buf the distinct methods of the routes matching path, as an
 * Allow header value ("GET, POST"). Returns how many there were. */
static int http_allowed_methods(const http_server *s, const char *path, char *buf, size_t len)
{
    struct http_span spans[HTTP_MAX_PARAMS];
    size_t i, j, used = 0;
    int count = 0, np;

    buf[0] = '\0';
    for (i = 0; i < s->cfg.nroutes; i++) {
        const http_route *rt = &s->cfg.routes[i];
        int dup = 0;
        size_t mlen;

        if (!http_route_match(rt->pattern, path, strlen(path), spans, &np))
            continue;
        for (j = 0; j < i; j++) {
            if (strcmp(s->cfg.routes[j].method, rt->method) == 0 &&
                http_route_match(s->cfg.routes[j].pattern, path, strlen(path), spans, &np)) {
                dup = 1;
                break;
            }
        }
        if (dup)
            continue;
        count++;
        mlen = strlen(rt->method);
        if (used + mlen + 3 > len)
            continue; /* never happens with real method names; stay bounded */
        if (used > 0) {
            memcpy(buf + used, ", ", 2);
            used += 2;
        }
        memcpy(buf + used, rt->method, mlen);
        used += mlen;
        buf[used] = '\0';
    }
    return count;
}

/* ------------------------------------------------------------------ */
/* Auth and body                                                       */

/* Contract: extracts the token of "Authorization: Bearer <token>" (scheme
 * case-insensitive, one or more spaces, then a token68 with no spaces,
 * optional trailing spaces) and asks the configured auth function.
 * Returns 0 with the ids set, or -EACCES for a missing, malformed or
 * refused credential. The token is copied to the heap, so a 16 KiB header
 * costs no stack. */
static int http_authenticate(const http_server *s, http_req *r)
{
    const char *h = mg_get_header(r->conn, "Authorization");
    const char *t, *e;
    char *token;
    int rc;

    if (h == NULL || s->cfg.auth == NULL)
        return -EACCES;
    if (strncasecmp(h, "Bearer", 6) != 0 || (h[6] != ' ' && h[6] != '\t'))
        return -EACCES;
    t = h + 6;
    while (*t == ' ' || *t == '\t')
        t++;
    e = t;
    while (*e > 0x20 && *e < 0x7f)
        e++;
    if (e == t)
        return -EACCES;
    {
        const char *rest = e;
        while (*rest == ' ' || *rest == '\t')
            rest++;
        if (*rest != '\0')
            return -EACCES;
    }
    token = malloc((size_t)(e - t) + 1);
    if (token == NULL)
        return -ENOMEM;
    memcpy(token, t, (size_t)(e - t));
    token[e - t] = '\0';
    rc = s->cfg.auth(s->cfg.app, token, &r->account_id, &r->token_id);
    free(token);
    return rc == 0 ? 0 : -EACCES;
}

/* Contract: reads the request body into a heap buffer (NUL-terminated) of
 * at most max bytes, with a declared Content-Length or chunked encoding.
 * Returns 0, -EMSGSIZE when the body is larger than max (a declared length
 * is refused before a byte is read; a chunked body after max + 1 bytes),
 * -EIO when the client stopped sending before the end, -ENOMEM. */
static int http_read_body(struct mg_connection *conn, size_t max, char **out, size_t *outlen)
{
    const struct mg_request_info *ri = mg_get_request_info(conn);
    long long declared = ri->content_length;
    size_t cap, len = 0;
    char *buf;

    *out = NULL;
    *outlen = 0;
    if (declared >= 0) {
        if ((unsigned long long)declared > max)
            return -EMSGSIZE;
        cap = (size_t)declared;
    } else {
        cap = max < HTTP_BODY_CHUNK ? max : HTTP_BODY_CHUNK;
    }
    buf = malloc(cap + 2);
    if (buf == NULL)
        return -ENOMEM;
    /* civetweb 1.15 does not answer "Expect: 100-continue" itself, and a
     * client that sent it (curl does above 1 MiB) would wait a second
     * before sending the body. The size check above has passed, so invite
     * the body now. */
    {
        const char *expect = mg_get_header(conn, "Expect");
        if (expect != NULL && strcasecmp(expect, "100-continue") == 0 &&
            ri->http_version != NULL && strcmp(ri->http_version, "1.1") == 0 && declared != 0)
            mg_write(conn, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    }
    for (;;) {
        int n;
        if (len == cap) {
            char *nb;
            size_t ncap;
            if (declared >= 0)
                break;
            if (cap > max) {
                free(buf);
                return -EMSGSIZE;
            }
            /* Grow towards max + 1: one byte past the limit proves the
             * body too large without reading the rest of it. */
            ncap = cap * 2 > max + 1 ? max + 1 : cap * 2;
            if (ncap <= cap)
                ncap = cap + 1;
            nb = realloc(buf, ncap + 2);
            if (nb == NULL) {
                free(buf);
                return -ENOMEM;
            }
            buf = nb;
            cap = ncap;
        }
        n = mg_read(conn, buf + len, cap - len);
        if (n < 0) {
            free(buf);
            return -EIO;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    if (declared >= 0 && len != (size_t)declared) {
        free(buf);
        return -EIO;
    }
    if (len > max) {
        free(buf);
        return -EMSGSIZE;
    }
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return 0;
}

static int http_all_space(const char *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (b[i] != ' ' && b[i] != '\t' && b[i] != '\r' && b[i] != '\n')
            return 0;
    return 1;
}

/* Contract: reads and parses the body of r as a JSON object into r->body.
 * Returns 0, or sends the 413/400 problem itself and returns -1. */
static int http_parse_body(http_req *r, size_t max)
{
    json_error_t err;
    char *buf;
    size_t len;
    int rc = http_read_body(r->conn, max, &buf, &len);

    if (rc == -EMSGSIZE) {
        /* The rest of the body is unread: the connection cannot carry
         * another request. */
        http_problem(r, 1, 413, "payload_too_large", NULL, "the body is larger than %zu bytes",
                     max);
        return -1;
    }
    if (rc == -ENOMEM) {
        http_reply_problem(r, 500, "internal", "out of memory reading the body");
        return -1;
    }
    if (rc != 0) {
        http_problem(r, 1, 400, "bad_request", NULL,
                     "the body is malformed or ended before its declared length");
        return -1;
    }
    if (http_all_space(buf, len)) {
        free(buf);
        r->body = json_object();
        if (r->body == NULL) {
            http_reply_problem(r, 500, "internal", "out of memory");
            return -1;
        }
        return 0;
    }
    if (!http_json_depth_ok(buf, len, HTTP_JSON_MAX_DEPTH)) {
        free(buf);
        http_reply_problem(r, 400, "invalid_json", "JSON nested deeper than %d levels",
                           HTTP_JSON_MAX_DEPTH);
        return -1;
    }
    r->body = json_loadb(buf, len, 0, &err);
    free(buf);
    if (r->body == NULL) {
        http_reply_problem(r, 400, "invalid_json", "malformed JSON at line %d column %d: %s",
                           err.line, err.column, err.text);
        return -1;
    }
    if (!json_is_object(r->body)) {
        json_decref(r->body);
        r->body = NULL;
        http_reply_problem(r, 400, "invalid_json", "the body must be a JSON object");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* The request pipeline                                                */

/* Contract: decodes the params of a matched route into one heap block and
 * points r->params into it. Returns 0, -EINVAL when one does not decode
 * (a 404: no route has such a segment), -ENOMEM. */
static int http_decode_params(http_req *r, const struct http_span *spans, int np, char **block)
{
    size_t total = 0;
    char *p;
    int i;

    *block = NULL;
    r->nparams = 0;
    if (np == 0)
        return 0;
    for (i = 0; i < np; i++)
        total += spans[i].n + 1;
    p = malloc(total);
    if (p == NULL)
        return -ENOMEM;
    *block = p;
    for (i = 0; i < np; i++) {
        long n = http_pct_decode(spans[i].p, spans[i].n, p);
        if (n < 0)
            return -EINVAL;
        r->params[i] = p;
        p += n + 1;
    }
    r->nparams = np;
    return 0;
}

/* Runs the checks of API.md section 1 in order and the handler; sends
 * exactly one response. */
static void http_run(http_server *s, http_req *r, const char *path)
{
    struct http_span spans[HTTP_MAX_PARAMS];
    const http_route *rt = NULL;
    int path_matches = 0, np = 0, rc;
    size_t i;
    char *block = NULL;

    if (http_under_prefix(s, path)) {
        rc = http_authenticate(s, r);
        if (rc == -ENOMEM) {
            http_reply_problem(r, 500, "internal", "out of memory");
            return;
        }
        if (rc != 0) {
            http_reply_problem_ex(r, 401, "unauthorized", "a valid bearer token is required",
                                  NULL, "WWW-Authenticate: Bearer\r\n");
            return;
        }
    }

    for (i = 0; i < s->cfg.nroutes; i++) {
        const http_route *cand = &s->cfg.routes[i];
        int cn;
        if (!http_route_match(cand->pattern, path, strlen(path), spans, &cn))
            continue;
        path_matches = 1;
        if (strcmp(cand->method, r->method) == 0) {
            rt = cand;
            np = cn;
            break;
        }
    }
    if (!path_matches) {
        http_reply_problem(r, 404, "not_found", "no such route");
        return;
    }
    if (rt == NULL) {
        char allow[128], hdr[160];
        http_allowed_methods(s, path, allow, sizeof(allow));
        snprintf(hdr, sizeof(hdr), "Allow: %s\r\n", allow);
        http_reply_problem_ex(r, 405, "method_not_allowed", "method not allowed on this route",
                              NULL, hdr);
        return;
    }
    r->route = rt->pattern;

    /* Routes outside the prefix may still ask for a token. */
    if (rt->auth && !http_under_prefix(s, path) && http_authenticate(s, r) != 0) {
        http_reply_problem_ex(r, 401, "unauthorized", "a valid bearer token is required", NULL,
                              "WWW-Authenticate: Bearer\r\n");
        return;
    }

    rc = http_decode_params(r, spans, np, &block);
    if (rc == -ENOMEM) {
        free(block);
        http_reply_problem(r, 500, "internal", "out of memory");
        return;
    }
    if (rc != 0) {
        free(block);
        r->route = NULL; /* a segment that does not decode matches no route */
        http_reply_problem(r, 404, "not_found", "no such route");
        return;
    }

    if (rt->max_body > 0 && http_parse_body(r, rt->max_body) != 0) {
        free(block);
        return;
    }

    rt->fn(r);
    if (r->status == 0) {
        LOG_ERROR("http: handler for %s %s sent no response", rt->method, rt->pattern);
        http_reply_problem(r, 500, "internal", "the handler sent no response");
    }
    json_decref(r->body);
    r->body = NULL;
    free(block);
}

/* civetweb begin_request callback: every parsed request comes here, so
 * civetweb never serves files, answers CORS preflights or picks handlers
 * itself. Returns the status sent (civetweb logs it). */
static int http_begin_request(struct mg_connection *conn)
{
    const struct mg_request_info *ri = mg_get_request_info(conn);
    http_server *s = mg_get_user_data(mg_get_context(conn));
    http_req r;
    const char *path = ri->local_uri_raw;

    memset(&r, 0, sizeof(r));
    r.conn = conn;
    r.method = ri->request_method ? ri->request_method : "";
    r.query = ri->query_string;
    r.app = s->cfg.app;

    /* seq_cst: the increment is ordered before reading draining, and
     * http_stop's store before its reads of inflight (a Dekker pair), so a
     * request either sees draining or is counted by the stopper. */
    atomic_fetch_add_explicit(&s->inflight, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&s->draining, memory_order_seq_cst)) {
        mg_disable_connection_keep_alive(conn);
        http_reply_problem_ex(&r, 503, "shutting_down", "the server is stopping; retry shortly", NULL,
                              "Retry-After: 1\r\n");
    } else if (path == NULL || path[0] != '/')
        http_reply_problem(&r, 404, "not_found", "no such route");
    else
        http_run(s, &r, path);
    atomic_fetch_sub_explicit(&s->inflight, 1, memory_order_seq_cst);

    if (r.status == 0) /* cannot happen: every branch replies */
        http_reply_problem(&r, 500, "internal", "no response");
    if (s->cfg.on_response)
        s->cfg.on_response(s->cfg.app, r.route ? r.route : "unmatched", r.method, r.status);
    return r.status;
}

/* Whether civetweb knows method (it rejects the others before parsing the
 * headers). Used to tell "unknown method" from other malformed requests. */
static int http_standard_method(const char *m)
{
    static const char *const known[] = {"GET", "HEAD", "POST", "PUT", "DELETE",
                                        "OPTIONS", "PATCH", "CONNECT", "TRACE"};
    size_t i;

    for (i = 0; i < sizeof(known) / sizeof(known[0]); i++)
        if (strcmp(m, known[i]) == 0)
            return 1;
    return 0;
}

/* Copies the path of a request-target ("/a/b?x=1" -> "/a/b") to the heap,
 * or returns NULL when it is not an origin-form path. */
static char *http_target_path(const char *uri)
{
    size_t n;
    char *p;

    if (uri == NULL || uri[0] != '/')
        return NULL;
    n = strcspn(uri, "?# \r\n");
    p = malloc(n + 1);
    if (p == NULL)
        return NULL;
    memcpy(p, uri, n);
    p[n] = '\0';
    return p;
}

/* civetweb http_error callback: civetweb's own errors, raised before a
 * request reaches http_begin_request, become problem+json. Observed with
 * civetweb 1.15:
 *  - a method it does not know (BREW, lower-case "get", 200 bytes of junk):
 *    400 with method, URI and version parsed but no header (num_headers 0);
 *    answered 405 method_not_allowed with Allow when routes match the path,
 *    else 404 not_found. Auth cannot come first here: civetweb stopped
 *    before reading the Authorization header.
 *  - a request head over max_request_size: 400 "Malformed message" with
 *    nothing parsed (civetweb reports a head containing control characters
 *    the same way and exposes nothing to tell them apart); answered 431
 *    headers_too_large, connection closed.
 *  - anything else (bad header line, bad Content-Length, unsupported
 *    Transfer-Encoding, HTTP/9.9): civetweb's status, code bad_request.
 * Only request_method, request_uri, http_version and num_headers are read:
 * civetweb resets those for each request, while local_uri_raw may still
 * hold the previous request's path when parsing failed.
 * Returns 0: handled, civetweb sends nothing more. */
static int http_on_error(struct mg_connection *conn, int status, const char *errmsg)
{
    const struct mg_request_info *ri = mg_get_request_info(conn);
    http_server *s = mg_get_user_data(mg_get_context(conn));
    http_req r;
    const char *method = ri ? ri->request_method : NULL;
    int line_parsed = ri != NULL && method != NULL && ri->request_uri != NULL &&
                      ri->http_version != NULL;

    if (status < 400 || status > 599)
        return 1; /* not an error page: let civetweb do what it does */

    memset(&r, 0, sizeof(r));
    r.conn = conn;
    r.method = line_parsed ? method : "";
    r.app = s ? s->cfg.app : NULL;

    if (status == 413 || (status == 400 && !line_parsed && method == NULL && errmsg != NULL &&
                          strcmp(errmsg, "Malformed message") == 0)) {
        http_problem(&r, 1, 431, "headers_too_large", NULL,
                     "the request head is over %s bytes or malformed", HTTP_MAX_HEADER_BYTES);
    } else if (status == 400 && line_parsed && ri->num_headers == 0 &&
               !http_standard_method(method)) {
        char allow[128], hdr[160];
        char *path = http_target_path(ri->request_uri);
        int n = 0;

        if (s != NULL && path != NULL)
            n = http_allowed_methods(s, path, allow, sizeof(allow));
        free(path);
        if (n > 0) {
            snprintf(hdr, sizeof(hdr), "Allow: %s\r\n", allow);
            http_problem(&r, 1, 405, "method_not_allowed", hdr,
                         "method not allowed on this route");
        } else {
            http_problem(&r, 1, 404, "not_found", NULL, "no such route");
        }
    } else {
        http_problem(&r, 1, status, status == 500 ? "internal" : "bad_request", NULL, "%s",
                     errmsg ? errmsg : http_status_title(status));
    }
    if (s != NULL && s->cfg.on_response)
        /* A method civetweb rejected is attacker-chosen text: report it as
         * "OTHER" so a metrics label cannot grow without bound. */
        s->cfg.on_response(s->cfg.app, "unmatched",
                           line_parsed && http_standard_method(method) ? method : "OTHER",
                           r.status);
    return 0;
}

/* civetweb's own log lines (bind failures, socket errors) go to our log.
 * A bind failure also records its errno for http_start: civetweb logs
 * "cannot bind to ADDR: 98 (Address already in use)". */
static int http_on_log(const struct mg_connection *conn, const char *message)
{
    const struct mg_context *ctx = conn ? mg_get_context(conn) : NULL;
    http_server *s = ctx ? mg_get_user_data(ctx) : NULL;
    const char *p;

    LOG_WARN("civetweb: %s", message);
    if (s != NULL && strncmp(message, "cannot bind to ", 15) == 0 &&
        (p = strstr(message, ": ")) != NULL) {
        int e = atoi(p + 2);
        /* Relaxed: written during mg_start2 by the thread that called it,
         * read by that same thread after mg_start2 returned. */
        if (e > 0)
            atomic_store_explicit(&s->start_errno, -e, memory_order_relaxed);
    }
    return 1;
}

/* ------------------------------------------------------------------ */
/* Lifecycle                                                           */

static void http_free(http_server *s)
{
    if (s == NULL)
        return;
    free(s->listen);
    free(s->auth_prefix);
    free(s);
}

/* Maps civetweb's start error text to a negative errno. */
static int http_start_errno(const char *text)
{
    if (strstr(text, "in use") != NULL || strstr(text, "EADDRINUSE") != NULL)
        return -EADDRINUSE;
    if (strstr(text, "ermission") != NULL)
        return -EACCES;
    if (strstr(text, "ssign") != NULL)
        return -EADDRNOTAVAIL;
    if (strstr(text, "emory") != NULL)
        return -ENOMEM;
    return -EINVAL;
}

int http_start(const http_config *cfg, http_server **out)
{
    struct mg_callbacks cb;
    struct mg_init_data init;
    struct mg_error_data error;
    struct mg_server_port ports[4];
    unsigned code = 0;
    char errtext[256];
    char threads[16];
    const char *options[32];
    http_server *s;
    int n = 0, nports;
    size_t i;

    *out = NULL;
    if (cfg == NULL || cfg->listen == NULL || cfg->threads <= 0 ||
        (cfg->nroutes > 0 && cfg->routes == NULL))
        return -EINVAL;
    for (i = 0; i < cfg->nroutes; i++)
        if (cfg->routes[i].method == NULL || cfg->routes[i].pattern == NULL ||
            cfg->routes[i].fn == NULL || cfg->routes[i].pattern[0] != '/')
            return -EINVAL;

    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return -ENOMEM;
    s->cfg = *cfg;
    s->listen = strdup(cfg->listen);
    s->auth_prefix = cfg->auth_prefix ? strdup(cfg->auth_prefix) : NULL;
    if (s->listen == NULL || (cfg->auth_prefix != NULL && s->auth_prefix == NULL)) {
        http_free(s);
        return -ENOMEM;
    }
    s->cfg.listen = s->listen;
    s->cfg.auth_prefix = s->auth_prefix;
    s->auth_prefix_len = s->auth_prefix ? strlen(s->auth_prefix) : 0;
    /* "/api/v1/" as a prefix means "/api/v1". */
    while (s->auth_prefix_len > 0 && s->auth_prefix[s->auth_prefix_len - 1] == '/')
        s->auth_prefix[--s->auth_prefix_len] = '\0';

    snprintf(threads, sizeof(threads), "%d", cfg->threads);
    options[n++] = "listening_ports";
    options[n++] = s->listen;
    options[n++] = "num_threads";
    options[n++] = threads;
    options[n++] = "request_timeout_ms";
    options[n++] = HTTP_REQUEST_TIMEOUT_MS;
    options[n++] = "enable_keep_alive";
    options[n++] = "yes";
    options[n++] = "keep_alive_timeout_ms";
    options[n++] = HTTP_KEEP_ALIVE_TIMEOUT_MS;
    options[n++] = "max_request_size";
    options[n++] = HTTP_MAX_HEADER_BYTES;
    options[n++] = "tcp_nodelay";
    options[n++] = "1";
    /* Paths and queries are decoded here, per segment, after routing. */
    options[n++] = "decode_url";
    options[n++] = "no";
    options[n++] = "decode_query_string";
    options[n++] = "no";
    options[n++] = "enable_directory_listing";
    options[n++] = "no";
    options[n++] = NULL;

    memset(&cb, 0, sizeof(cb));
    cb.begin_request = http_begin_request;
    cb.http_error = http_on_error;
    cb.log_message = http_on_log;

    memset(&init, 0, sizeof(init));
    init.callbacks = &cb;
    init.user_data = s;
    init.configuration_options = options;

    errtext[0] = '\0';
    memset(&error, 0, sizeof(error));
    error.code = &code;
    error.text = errtext;
    error.text_buffer_size = sizeof(errtext);

    mg_init_library(0);
    s->ctx = mg_start2(&init, &error);
    if (s->ctx == NULL) {
        int rc = atomic_load_explicit(&s->start_errno, memory_order_relaxed);
        if (rc == 0)
            rc = http_start_errno(errtext);
        LOG_ERROR("http: cannot listen on %s: %s (civetweb error %u)", cfg->listen,
                  errtext[0] ? errtext : "unknown error", code);
        mg_exit_library();
        http_free(s);
        return rc;
    }

    memset(ports, 0, sizeof(ports));
    nports = mg_get_server_ports(s->ctx, 4, ports);
    s->port = nports > 0 ? ports[0].port : 0;
    LOG_INFO("http: listening on %s (port %d, %d threads)", cfg->listen, s->port, cfg->threads);
    *out = s;
    return 0;
}

void http_stop(http_server *s)
{
    if (s == NULL)
        return;
    atomic_store_explicit(&s->draining, 1, memory_order_seq_cst);
    /* Requests that were accepted finish (their actors always answer);
     * bounded, so a stuck client cannot hold the stop forever. */
    for (int i = 0; i < 30000 && atomic_load_explicit(&s->inflight, memory_order_seq_cst) > 0; i++) {
        struct timespec ts = {0, 1000000L};
        nanosleep(&ts, NULL);
    }
    mg_stop(s->ctx);
    mg_exit_library();
    http_free(s);
}

int http_port(const http_server *s)
{
    return s ? s->port : -EINVAL;
}
