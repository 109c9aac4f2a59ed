/* canned202.c: tt-canned202, civetweb answering every POST /api/v1/messages
 * with a fixed 202 and nothing else.
 *
 * It measures the ceiling the HTTP edge works under (DESIGN.md "Facts
 * measured"): the same civetweb, the same thread model and keep-alive, the
 * body read in full, but no auth, parsing, mailbox or disk. Run the load
 * script against it and against taratxtd with the same flags to see what the
 * server's own work costs. */
#include <civetweb.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const char canned_body[] = "{\"id\":1,\"status\":\"pending\"}";

/* Reads and discards the request body: a real handler must consume it, and
 * keep-alive needs the connection positioned at the next request. */
static void drain_body(struct mg_connection *conn)
{
    char buf[4096]; /* civetweb workers have 100 KiB stacks: keep this small */
    while (mg_read(conn, buf, sizeof buf) > 0) {
    }
}

/* Whether civetweb will keep this connection open after the response (it
 * decides from the request), so the Connection header we write agrees. */
static int wants_keep_alive(struct mg_connection *conn, const struct mg_request_info *ri)
{
    const char *c = mg_get_header(conn, "Connection");
    if (c && strcasecmp(c, "close") == 0)
        return 0;
    if (c && strcasecmp(c, "keep-alive") == 0)
        return 1;
    return ri->http_version && strcmp(ri->http_version, "1.1") == 0;
}

/* Writes the whole response, status line to body, in one mg_write. Going
 * through mg_response_header_send() and then mg_write() for the body costs a
 * second write and a second segment per request, which halves the rate
 * (measured here: 32k against 66k req/s at 64 connections). */
static int send_status(struct mg_connection *conn, const struct mg_request_info *ri, int status,
                       const char *reason, const char *type, const char *extra, const char *body)
{
    char buf[512]; /* small: civetweb workers have 100 KiB stacks */
    int n = snprintf(buf, sizeof buf,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
                     "Connection: %s\r\n\r\n%s",
                     status, reason, type, strlen(body), extra ? extra : "",
                     wants_keep_alive(conn, ri) ? "keep-alive" : "close", body);
    if (n > 0 && (size_t)n < sizeof buf)
        mg_write(conn, buf, (size_t)n);
    return status;
}

static int messages_handler(struct mg_connection *conn, void *cbdata)
{
    const struct mg_request_info *ri = mg_get_request_info(conn);
    drain_body(conn);
    if (strcmp(ri->local_uri, "/api/v1/messages") != 0)
        return send_status(conn, ri, 404, "Not Found", "application/problem+json", NULL,
                           "{\"type\":\"about:blank\",\"title\":\"Not Found\",\"status\":404,"
                           "\"code\":\"not_found\"}");
    if (strcmp(ri->request_method, "POST") != 0)
        return send_status(conn, ri, 405, "Method Not Allowed", "application/problem+json",
                           "Allow: POST\r\n",
                           "{\"type\":\"about:blank\",\"title\":\"Method Not Allowed\","
                           "\"status\":405,\"code\":\"method_not_allowed\"}");
    return send_status(conn, ri, 202, "Accepted", "application/json", NULL, canned_body);
}

static void usage(FILE *f)
{
    fputs("usage: tt-canned202 [--listen 127.0.0.1:8090] [--threads 128]\n"
          "Answers POST /api/v1/messages with 202 {\"id\":1,\"status\":\"pending\"}.\n"
          "SIGINT/SIGTERM stops it.\n",
          f);
}

int main(int argc, char **argv)
{
    const char *listen = "127.0.0.1:8090";
    const char *threads = "128";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
            listen = argv[++i];
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            threads = argv[++i];
            char *end;
            long n = strtol(threads, &end, 10);
            if (*end || n < 1 || n > 10000) {
                fprintf(stderr, "tt-canned202: --threads must be 1 to 10000\n");
                return 2;
            }
        } else if (strcmp(argv[i], "--help") == 0) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }

    /* Block the stop signals before civetweb starts its threads, so they
     * inherit the mask and only sigwait below receives them. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    signal(SIGPIPE, SIG_IGN);

    mg_init_library(0);
    const char *options[] = {
        "listening_ports", listen,
        "num_threads", threads,
        "enable_keep_alive", "yes",
        "keep_alive_timeout_ms", "30000",
        "request_timeout_ms", "30000",
        "listen_backlog", "1024",
        /* Responses leave in one write, so Nagle would not delay them; but a
         * response written in two pieces would wait 40 ms for the client's
         * delayed ACK (measured: 1.5k req/s). Off, as a server should be. */
        "tcp_nodelay", "1",
        NULL,
    };
    struct mg_callbacks cb;
    memset(&cb, 0, sizeof cb);
    struct mg_init_data init = { &cb, NULL, options };
    struct mg_error_data err;
    char errtext[256] = "";
    unsigned errcode = 0;
    memset(&err, 0, sizeof err);
    err.code = &errcode;
    err.text = errtext;
    err.text_buffer_size = sizeof errtext;
    struct mg_context *ctx = mg_start2(&init, &err);
    if (!ctx) {
        fprintf(stderr, "tt-canned202: cannot listen on %s: %s\n", listen, errtext);
        mg_exit_library();
        return 1;
    }
    mg_set_request_handler(ctx, "/api/v1/messages", messages_handler, NULL);
    fprintf(stderr, "tt-canned202: listening on %s with %s threads\n", listen, threads);

    int sig = 0;
    sigwait(&stop, &sig);
    fprintf(stderr, "tt-canned202: signal %d, stopping\n", sig);
    mg_stop(ctx);
    mg_exit_library();
    return 0;
}
