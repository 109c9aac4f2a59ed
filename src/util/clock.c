/* clock.c: wall and monotonic time, and RFC 3339 formatting and parsing.
 *
 * Every timestamp the server stores or returns comes through tt_now_ms, so a
 * test can move time forward (tt_clock_advance) to exercise expiry and rate
 * limits without sleeping. Calendar conversion uses our own days-from-civil
 * arithmetic: it is thread-safe, needs no TZ lookup and has no locale. */
#include "util/clock.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <time.h>

/* Offset added to the real clock. Relaxed ordering suffices: the value is a
 * self-contained number that publishes no other memory, and callers that
 * advance it from a test thread synchronise with the code under test by other
 * means (mailboxes, joins). */
static _Atomic int64_t clock_offset_ms;

#define MS_PER_DAY INT64_C(86400000)
/* 0000-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z, the range a four-digit
 * year can show. */
#define CLOCK_MIN_MS INT64_C(-62167219200000)
#define CLOCK_MAX_MS INT64_C(253402300799999)

int64_t tt_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000 +
           atomic_load_explicit(&clock_offset_ms, memory_order_relaxed);
}

int64_t tt_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void tt_clock_advance(int64_t delta_ms)
{
    /* Relaxed: see clock_offset_ms. */
    atomic_fetch_add_explicit(&clock_offset_ms, delta_ms, memory_order_relaxed);
}

/* Floor division and modulo, so instants before 1970 convert correctly. */
static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
        q--;
    return q;
}

/* Days since 1970-01-01 of the proleptic Gregorian date y-m-d. Works in
 * 400-year eras that start on March 1st, so February (and its leap day) is
 * the last month of each computed year. */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = floor_div(y, 400);
    int64_t yoe = y - era * 400;                          /* [0, 399] */
    int64_t mp = (m + 9) % 12;                            /* March = 0 */
    int64_t doy = (153 * mp + 2) / 5 + d - 1;             /* [0, 365] */
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;  /* [0, 146096] */
    return era * 146097 + doe - 719468;
}

/* Inverse of days_from_civil. */
static void civil_from_days(int64_t z, int64_t *y, int *m, int *d)
{
    z += 719468;
    int64_t era = floor_div(z, 146097);
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *d = (int)(doy - (153 * mp + 2) / 5 + 1);
    *m = (int)(mp < 10 ? mp + 3 : mp - 9);
    *y = yoe + era * 400 + (*m <= 2);
}

static bool is_leap(int64_t y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int days_in_month(int64_t y, int m)
{
    static const int dim[12] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    return m == 2 && is_leap(y) ? 29 : dim[m - 1];
}

static void put_digits(char *p, int64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--) {
        p[i] = (char)('0' + v % 10);
        v /= 10;
    }
}

/* Instants outside years 0000..9999 are clamped to that range, so the
 * output always has the fixed 24-character shape. */
char *tt_time_format(int64_t ms, char buf[25])
{
    if (ms < CLOCK_MIN_MS)
        ms = CLOCK_MIN_MS;
    if (ms > CLOCK_MAX_MS)
        ms = CLOCK_MAX_MS;
    int64_t days = floor_div(ms, MS_PER_DAY);
    int64_t rem = ms - days * MS_PER_DAY; /* [0, MS_PER_DAY) */
    int64_t y;
    int mo, d;
    civil_from_days(days, &y, &mo, &d);

    put_digits(buf, y, 4);
    buf[4] = '-';
    put_digits(buf + 5, mo, 2);
    buf[7] = '-';
    put_digits(buf + 8, d, 2);
    buf[10] = 'T';
    put_digits(buf + 11, rem / 3600000, 2);
    buf[13] = ':';
    put_digits(buf + 14, rem / 60000 % 60, 2);
    buf[16] = ':';
    put_digits(buf + 17, rem / 1000 % 60, 2);
    buf[19] = '.';
    put_digits(buf + 20, rem % 1000, 3);
    buf[23] = 'Z';
    buf[24] = '\0';
    return buf;
}

/* Reads exactly n decimal digits at *p into *v and advances *p. */
static bool read_digits(const char **p, int n, int *v)
{
    int acc = 0;
    for (int i = 0; i < n; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9')
            return false;
        acc = acc * 10 + (c - '0');
    }
    *p += n;
    *v = acc;
    return true;
}

static bool expect(const char **p, char c)
{
    if (**p != c)
        return false;
    (*p)++;
    return true;
}

/* Accepts RFC 3339 date-time: YYYY-MM-DDTHH:MM:SS, an optional fraction of 1
 * to 9 digits (truncated to milliseconds), then 'Z' or +HH:MM / -HH:MM. 'T'
 * and 'Z' may be lowercase. A leap second (:60) is rejected, as is anything
 * after the offset. */
int tt_time_parse(const char *s, int64_t *ms)
{
    if (s == NULL || ms == NULL)
        return -EINVAL;
    const char *p = s;
    int year, mon, day, hour, min, sec;
    if (!read_digits(&p, 4, &year) || !expect(&p, '-') ||
        !read_digits(&p, 2, &mon) || !expect(&p, '-') ||
        !read_digits(&p, 2, &day))
        return -EINVAL;
    if (*p != 'T' && *p != 't')
        return -EINVAL;
    p++;
    if (!read_digits(&p, 2, &hour) || !expect(&p, ':') ||
        !read_digits(&p, 2, &min) || !expect(&p, ':') ||
        !read_digits(&p, 2, &sec))
        return -EINVAL;
    if (mon < 1 || mon > 12 || day < 1 || day > days_in_month(year, mon) ||
        hour > 23 || min > 59 || sec > 59)
        return -EINVAL;

    int frac_ms = 0;
    if (*p == '.') {
        p++;
        int ndig = 0;
        while (*p >= '0' && *p <= '9') {
            if (ndig < 3)
                frac_ms = frac_ms * 10 + (*p - '0');
            ndig++;
            p++;
        }
        if (ndig == 0 || ndig > 9)
            return -EINVAL;
        for (int i = ndig; i < 3; i++)
            frac_ms *= 10;
    }

    int64_t offset_min = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p == '-' ? -1 : 1;
        int oh, om;
        p++;
        if (!read_digits(&p, 2, &oh) || !expect(&p, ':') || !read_digits(&p, 2, &om))
            return -EINVAL;
        if (oh > 23 || om > 59)
            return -EINVAL;
        offset_min = sign * (oh * 60 + om);
    } else {
        return -EINVAL;
    }
    if (*p != '\0')
        return -EINVAL;

    int64_t days = days_from_civil(year, mon, day);
    int64_t t = days * MS_PER_DAY + (int64_t)hour * 3600000 + (int64_t)min * 60000 +
                (int64_t)sec * 1000 + frac_ms;
    *ms = t - offset_min * 60000;
    return 0;
}
