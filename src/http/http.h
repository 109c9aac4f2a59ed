/* http.h: the HTTP edge framework on civetweb.
 *
 * Owns everything between a socket and a route handler: the route table
 * (patterns with {param} segments), the order of checks of API.md section 1
 * (auth 401 -> route 404 -> method 405 -> size 413 -> JSON 400), reading the
 * body into a heap buffer with a limit, checking JSON nesting depth before
 * jansson parses it, problem+json errors (RFC 9457) and turning civetweb's own
 * error pages (unknown methods, oversized headers) into problem+json.
 * Handlers (src/http/handlers.c) only see a parsed, authenticated request. */
#ifndef TT_HTTP_HTTP_H
#define TT_HTTP_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

struct mg_connection;
typedef struct http_server http_server;

#define HTTP_MAX_PARAMS 4

typedef struct http_req {
    struct mg_connection *conn;
    const char *method;
    const char *route;                 /* matched pattern, e.g. "/api/v1/messages/{id}" */
    char *params[HTTP_MAX_PARAMS];     /* URL-decoded {param} values, in order */
    int nparams;
    const char *query;                 /* raw query string, or NULL */
    uint64_t account_id;               /* set when the route requires auth */
    uint64_t token_id;                 /* the token that authenticated */
    json_t *body;                      /* parsed JSON object when the route reads a body; {} for empty */
    void *app;                         /* http_config.app */
    int status;                        /* status of the response sent */
} http_req;

typedef void (*http_handler_fn)(http_req *r);

typedef struct http_route {
    const char *method;   /* "GET", "POST", "PATCH", "DELETE" */
    const char *pattern;  /* "/api/v1/devices/{id}/messages"; {x} matches one non-empty segment */
    http_handler_fn fn;
    int auth;             /* 1: requires Authorization: Bearer */
    size_t max_body;      /* 0: body not read; else limit in bytes (413 above it), parsed as a JSON object */
} http_route;

/* Returns 0 and sets ids when token is valid, else nonzero. */
typedef int (*http_auth_fn)(void *app, const char *token, uint64_t *account_id, uint64_t *token_id);

typedef struct http_config {
    const char *listen;          /* "127.0.0.1:8080"; port 0 picks a free port */
    int threads;                 /* civetweb worker threads */
    const http_route *routes;
    size_t nroutes;
    const char *auth_prefix;     /* paths under this prefix need auth before routing ("/api/v1") */
    http_auth_fn auth;
    void *app;
    /* Optional: called after every response (metrics). route is the matched
     * pattern or "unmatched". */
    void (*on_response)(void *app, const char *route, const char *method, int status);
} http_config;

/* Starts listening. 0, or a negative errno (-EADDRINUSE etc.) with a logged reason. */
int http_start(const http_config *cfg, http_server **out);
/* Stops accepting, waits for requests in progress, frees. */
void http_stop(http_server *s);
/* The bound port (useful with port 0). */
int http_port(const http_server *s);

/* Responses. Each sends exactly one response and records r->status. */
void http_reply_json(http_req *r, int status, json_t *obj /* stolen */, const char *extra_headers);
void http_reply_empty(http_req *r, int status);
void http_reply_text(http_req *r, int status, const char *content_type, const char *body, size_t len);
/* problem+json with title from the status, the given code and detail. */
void http_reply_problem(http_req *r, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Full control: errors (array, stolen, may be NULL), extra_headers may be NULL
 * ("Retry-After: 1\r\n"). */
void http_reply_problem_ex(http_req *r, int status, const char *code, const char *detail,
                           json_t *errors, const char *extra_headers);
/* 422 validation_failed with errors [{field, message}] (stolen). */
void http_reply_validation(http_req *r, json_t *errors);
/* The problem object itself (for batch entries). */
json_t *http_problem_json(int status, const char *code, const char *detail);
/* Standard title for a status ("Conflict", "Unprocessable Content", ...). */
const char *http_status_title(int status);

/* Query parameter (URL-decoded) into buf; returns buf, or NULL when absent. */
const char *http_query(const http_req *r, const char *name, char *buf, size_t len);
/* Request header value or NULL. */
const char *http_header(const http_req *r, const char *name);

/* Checks that JSON text nests no deeper than max_depth, without recursion. */
int http_json_depth_ok(const char *buf, size_t len, int max_depth);

#endif
