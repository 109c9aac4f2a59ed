/* test_embed.c: an appliance embeds the gateway through the public header.
 *
 * Creates a server on a temp data directory and a free port, starts it,
 * checks that /healthz answers and that the first token authenticates, stops
 * it, and starts it again on the same directory (no second token). Uses only
 * include/taratxt/taratxt.h. The broker URL points at a closed port: a
 * missing broker must not keep the server from serving. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "taratxt/taratxt.h"

#define CHECK(c)                                                                   \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #c); \
            exit(1);                                                               \
        }                                                                          \
    } while (0)

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
    CHECK(getsockname(fd, (struct sockaddr *)&a, &len) == 0);
    int port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* Sends one request, returns the status code and copies the response. */
static int http(int port, const char *req, char *resp, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0);
    CHECK(write(fd, req, strlen(req)) == (ssize_t)strlen(req));
    size_t n = 0;
    ssize_t r;
    while (n + 1 < cap && (r = read(fd, resp + n, cap - 1 - n)) > 0)
        n += (size_t)r;
    resp[n] = 0;
    close(fd);
    int status = 0;
    sscanf(resp, "HTTP/1.%*d %d", &status);
    return status;
}

int main(void)
{
    char dir[] = "/tmp/tt-embed-XXXXXX";
    CHECK(mkdtemp(dir));
    char listen[32], url[64], req[512], resp[8192];
    int port = free_port();
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", port);
    snprintf(url, sizeof(url), "tcp://127.0.0.1:%d", free_port());

    tt_server_options o = TT_SERVER_OPTIONS_INIT;
    o.listen = listen;
    o.data_dir = dir;
    o.mqtt_url = url;
    o.http_threads = 8;
    tt_server *srv = NULL;
    CHECK(tt_server_create(&o, &srv) == 0);
    CHECK(tt_server_initial_token(srv) != NULL);
    char token[64];
    snprintf(token, sizeof(token), "%s", tt_server_initial_token(srv));
    CHECK(strncmp(token, "tt_", 3) == 0 && strlen(token) == 35);
    CHECK(tt_server_start(srv) == 0);

    CHECK(http(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", resp, sizeof(resp)) == 200);
    CHECK(strstr(resp, "\"status\":\"ok\"") != NULL);
    CHECK(strstr(resp, "\"mqtt\":\"disconnected\"") != NULL);
    snprintf(req, sizeof(req),
             "GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n", token);
    CHECK(http(port, req, resp, sizeof(resp)) == 200);
    CHECK(strstr(resp, "\"data\":[]") != NULL);
    CHECK(http(port, "GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tt_nope\r\nConnection: close\r\n\r\n",
               resp, sizeof(resp)) == 401);

    CHECK(tt_server_stop(srv) == 0);
    tt_server_destroy(srv);

    /* Same directory again: the account exists, no new initial token. */
    srv = NULL;
    CHECK(tt_server_create(&o, &srv) == 0);
    CHECK(tt_server_initial_token(srv) == NULL);
    CHECK(tt_server_start(srv) == 0);
    CHECK(http(port, req, resp, sizeof(resp)) == 200);
    tt_server_destroy(srv);

    /* Bad options are an error, never an exit. */
    tt_server_options bad = TT_SERVER_OPTIONS_INIT;
    bad.window = 0;
    CHECK(tt_server_create(&bad, &srv) < 0);

    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    puts("embed: ok");
    return 0;
}
