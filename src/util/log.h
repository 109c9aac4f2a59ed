/* log.h: levelled logging, one line per event, to a replaceable sink.
 *
 * TT_LOG does not evaluate its arguments when the level is filtered out.
 * The default sink writes "2026-12-04T15:00:00.123Z INFO  message" to stderr. */
#ifndef TT_UTIL_LOG_H
#define TT_UTIL_LOG_H

enum { TT_LOG_DEBUG = 0, TT_LOG_INFO = 1, TT_LOG_WARN = 2, TT_LOG_ERROR = 3 };

/* A sink gets the formatted message only (no time or level prefix; the level
 * is its own argument), with CR and LF replaced by spaces and at most about
 * 1 KiB long. It may be called from any thread, concurrently. */
typedef void (*tt_log_sink)(int level, const char *line, void *arg);

extern int tt_log_level;
void tt_log_set_sink(tt_log_sink sink, void *arg); /* NULL restores stderr */
void tt_log_write(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define TT_LOG(level, ...) \
    do { if ((level) >= tt_log_level) tt_log_write((level), __VA_ARGS__); } while (0)
#define LOG_DEBUG(...) TT_LOG(TT_LOG_DEBUG, __VA_ARGS__)
#define LOG_INFO(...) TT_LOG(TT_LOG_INFO, __VA_ARGS__)
#define LOG_WARN(...) TT_LOG(TT_LOG_WARN, __VA_ARGS__)
#define LOG_ERROR(...) TT_LOG(TT_LOG_ERROR, __VA_ARGS__)

#endif
