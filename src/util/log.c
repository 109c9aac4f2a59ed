/* log.c: levelled logging, one line per event, to a replaceable sink.
 *
 * A host embedding the library can route log events into its own logger with
 * tt_log_set_sink; otherwise each event becomes one line on stderr, written
 * with a single write(2) so lines from concurrent threads never interleave.
 * Formatting uses small fixed buffers (civetweb worker stacks are 100 KiB),
 * so a very long message is truncated and ends in "...". */
#include "util/log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "util/clock.h"

/* Longest message kept, in bytes, before truncation. */
#define LOG_MSG_MAX 1024
/* Timestamp (24) + space + level (5) + space + message + newline. */
#define LOG_LINE_MAX (LOG_MSG_MAX + 32)

int tt_log_level = TT_LOG_INFO;

/* The sink and its argument change together, so a mutex guards the pair;
 * callers copy it out and call the sink without holding the lock (a sink may
 * itself log). Logging is not on a hot path, so the lock is cheap enough. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static tt_log_sink log_sink;
static void *log_sink_arg;

static const char *level_name(int level)
{
    switch (level) {
    case TT_LOG_DEBUG: return "DEBUG";
    case TT_LOG_INFO: return "INFO ";
    case TT_LOG_WARN: return "WARN ";
    case TT_LOG_ERROR: return "ERROR";
    default: return level < TT_LOG_DEBUG ? "DEBUG" : "ERROR";
    }
}

/* Writes "<time> <LEVEL> <line>\n" to stderr in one write(2). */
static void log_stderr(int level, const char *line)
{
    char out[LOG_LINE_MAX];
    char ts[25];
    int n = snprintf(out, sizeof out, "%s %s %s\n", tt_time_format(tt_now_ms(), ts),
                     level_name(level), line);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof out ? (size_t)n : sizeof out - 1;
    if ((size_t)n >= sizeof out)
        out[len - 1] = '\n';
    ssize_t w;
    do {
        w = write(STDERR_FILENO, out, len);
    } while (w < 0 && errno == EINTR);
    /* A failed or short write to stderr has nowhere better to be reported. */
}

void tt_log_set_sink(tt_log_sink sink, void *arg)
{
    pthread_mutex_lock(&log_lock);
    log_sink = sink;
    log_sink_arg = arg;
    pthread_mutex_unlock(&log_lock);
}

/* Formats the message, replaces control line breaks (CR, LF) with spaces so
 * one event stays one line, and hands it to the sink. The sink receives the
 * message text only; the level is its own argument. The level filter is the
 * caller's (TT_LOG), so a direct call always emits. */
void tt_log_write(int level, const char *fmt, ...)
{
    char msg[LOG_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = strlen(msg);
    if ((size_t)n >= sizeof msg) {
        /* Truncated: step back to a UTF-8 character boundary, then mark it. */
        size_t cut = sizeof msg - 4;
        while (cut > 0 && ((unsigned char)msg[cut] & 0xC0) == 0x80)
            cut--;
        memcpy(msg + cut, "...", 4);
        len = cut + 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (msg[i] == '\n' || msg[i] == '\r')
            msg[i] = ' ';
    }

    pthread_mutex_lock(&log_lock);
    tt_log_sink sink = log_sink;
    void *arg = log_sink_arg;
    pthread_mutex_unlock(&log_lock);
    if (sink != NULL)
        sink(level, msg, arg);
    else
        log_stderr(level, msg);
}
