/* test_log.c: level filtering, the sink, line shape on stderr. */
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>

#include "check.h"
#include "util/clock.h"
#include "util/log.h"

struct capture {
    int calls;
    int level;
    char line[4096];
};

static void capture_sink(int level, const char *line, void *arg)
{
    struct capture *c = arg;
    c->calls++;
    c->level = level;
    snprintf(c->line, sizeof c->line, "%s", line);
}

static int evaluated;
static int side_effect(void)
{
    evaluated++;
    return 7;
}

static void test_filter_and_sink(void)
{
    struct capture cap = { 0 };
    CHECK_EQ_INT(tt_log_level, TT_LOG_INFO); /* default */
    tt_log_set_sink(capture_sink, &cap);

    LOG_DEBUG("hidden %d", side_effect());
    CHECK_EQ_INT(cap.calls, 0);
    CHECK_EQ_INT(evaluated, 0); /* filtered arguments are not evaluated */

    LOG_INFO("shown %d", side_effect());
    CHECK_EQ_INT(cap.calls, 1);
    CHECK_EQ_INT(evaluated, 1);
    CHECK_EQ_INT(cap.level, TT_LOG_INFO);
    CHECK_EQ_STR(cap.line, "shown 7");

    LOG_WARN("w");
    CHECK_EQ_INT(cap.level, TT_LOG_WARN);
    LOG_ERROR("e");
    CHECK_EQ_INT(cap.level, TT_LOG_ERROR);
    CHECK_EQ_INT(cap.calls, 3);

    tt_log_level = TT_LOG_ERROR;
    LOG_WARN("dropped");
    CHECK_EQ_INT(cap.calls, 3);
    tt_log_level = TT_LOG_DEBUG;
    LOG_DEBUG("debug now");
    CHECK_EQ_INT(cap.calls, 4);
    CHECK_EQ_STR(cap.line, "debug now");
    tt_log_level = TT_LOG_INFO;

    /* One event is one line: line breaks become spaces. */
    LOG_INFO("a\nb\r\nc");
    CHECK_EQ_STR(cap.line, "a b  c");

    /* A very long message is truncated, marked, and kept on one line. */
    char *big = malloc(10000);
    memset(big, 'x', 9999);
    big[9999] = '\0';
    LOG_INFO("%s", big);
    size_t n = strlen(cap.line);
    CHECK(n > 500 && n < 9999);
    CHECK(n >= 3 && strcmp(cap.line + n - 3, "...") == 0);
    /* Truncation never splits a UTF-8 character. */
    for (int i = 0; i + 2 < 9999; i += 2)
        memcpy(big + i, "\xC3\xA9", 2);
    big[9998] = '\0';
    LOG_INFO("%s", big);
    n = strlen(cap.line);
    CHECK(n > 500 && (n - 3) % 2 == 0);
    free(big);

    tt_log_set_sink(NULL, NULL);
}

/* Reads what the default sink wrote to stderr, redirected into a file. */
static void test_stderr_line(void)
{
    char path[] = "/tmp/tt_test_log_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    int saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO);
    LOG_INFO("hello %s", "world");
    LOG_ERROR("two\nlines");
    LOG_DEBUG("not shown");
    dup2(saved, STDERR_FILENO);
    close(saved);

    char buf[512] = { 0 };
    ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
    close(fd);
    unlink(path);
    CHECK(r > 0);

    /* "<24-char time> INFO  hello world\n<time> ERROR two lines\n" */
    char *nl = strchr(buf, '\n');
    CHECK(nl != NULL);
    if (nl == NULL)
        return;
    *nl = '\0';
    CHECK_EQ_INT(strlen(buf), 24 + 1 + 5 + 1 + strlen("hello world"));
    int64_t ms;
    char ts[25];
    memcpy(ts, buf, 24);
    ts[24] = '\0';
    CHECK_EQ_INT(tt_time_parse(ts, &ms), 0);
    CHECK(llabs(tt_now_ms() - ms) < 5000);
    CHECK_EQ_STR(buf + 24, " INFO  hello world");

    char *second = nl + 1;
    char *nl2 = strchr(second, '\n');
    CHECK(nl2 != NULL && nl2[1] == '\0'); /* exactly two lines */
    if (nl2 == NULL)
        return;
    *nl2 = '\0';
    CHECK(strlen(second) > 24);
    if (strlen(second) > 24)
        CHECK_EQ_STR(second + 24, " ERROR two lines");
}

#define STRESS_THREADS 4
#define STRESS_LINES 500

static void *stress_thread(void *arg)
{
    int id = (int)(intptr_t)arg;
    char *body = malloc(801);
    memset(body, 'a' + id, 800);
    body[800] = '\0';
    for (int i = 0; i < STRESS_LINES; i++)
        LOG_INFO("t%d %s", id, body);
    free(body);
    return NULL;
}

/* Lines written concurrently by several threads never interleave. */
static void test_stderr_concurrent(void)
{
    char path[] = "/tmp/tt_test_log_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    int saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO);
    pthread_t th[STRESS_THREADS];
    for (int i = 0; i < STRESS_THREADS; i++)
        pthread_create(&th[i], NULL, stress_thread, (void *)(intptr_t)i);
    for (int i = 0; i < STRESS_THREADS; i++)
        pthread_join(th[i], NULL);
    dup2(saved, STDERR_FILENO);
    close(saved);

    FILE *f = fdopen(fd, "r");
    rewind(f);
    char *line = malloc(4096);
    int lines = 0, good = 0;
    while (fgets(line, 4096, f) != NULL) {
        lines++;
        /* "<time> INFO  t<id> " then 800 copies of one letter and '\n'. */
        size_t n = strlen(line);
        const char *p = line + 24 + 7;
        if (n != 24 + 7 + 3 + 800 + 1 || strncmp(line + 24, " INFO  t", 8) != 0)
            continue;
        int id = p[1] - '0';
        int ok = id >= 0 && id < STRESS_THREADS && p[2] == ' ';
        for (int k = 0; ok && k < 800; k++)
            ok = p[3 + k] == 'a' + id;
        good += ok;
    }
    free(line);
    fclose(f);
    unlink(path);
    CHECK_EQ_INT(lines, STRESS_THREADS * STRESS_LINES);
    CHECK_EQ_INT(good, STRESS_THREADS * STRESS_LINES);
}

int main(void)
{
    test_filter_and_sink();
    test_stderr_line();
    test_stderr_concurrent();
    return check_finish("test_log");
}
