/* clock.h: the one clock the server reads.
 *
 * Wall-clock milliseconds since the Unix epoch, plus an offset that only tests
 * move (so expiry and rate limits are tested without sleeping). */
#ifndef TT_UTIL_CLOCK_H
#define TT_UTIL_CLOCK_H

#include <stdint.h>

int64_t tt_now_ms(void);
/* Monotonic milliseconds, for measuring durations (not affected by the offset). */
int64_t tt_mono_ms(void);
/* Moves tt_now_ms by delta_ms (cumulative). Tests only. */
void tt_clock_advance(int64_t delta_ms);

/* Formats ms as RFC 3339 UTC with milliseconds: 2026-12-04T15:00:00.123Z.
 * buf must hold 25 bytes. Returns buf. */
char *tt_time_format(int64_t ms, char buf[25]);
/* Parses RFC 3339 (with 'Z' or a numeric offset, optional fraction). 0 or -EINVAL. */
int tt_time_parse(const char *s, int64_t *ms);

#endif
