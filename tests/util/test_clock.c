/* test_clock.c: tt_now_ms offsets, RFC 3339 formatting and parsing. */
#include <errno.h>
#include <time.h>

#include "check.h"
#include "util/clock.h"

static int64_t parse_ok(const char *s)
{
    int64_t ms = INT64_MIN;
    int rc = tt_time_parse(s, &ms);
    if (rc != 0)
        fprintf(stderr, "parse failed for \"%s\"\n", s);
    CHECK_EQ_INT(rc, 0);
    return ms;
}

static void test_now_and_advance(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t real = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    int64_t now = tt_now_ms();
    CHECK(now >= real && now - real < 1000);

    int64_t m0 = tt_mono_ms();
    tt_clock_advance(3600000);
    int64_t later = tt_now_ms();
    CHECK(later - now >= 3600000 && later - now < 3601000);
    /* The monotonic clock ignores the offset. */
    CHECK(tt_mono_ms() - m0 < 1000);
    tt_clock_advance(-3600000);
    CHECK(tt_now_ms() - now < 1000);
}

static void test_format(void)
{
    char buf[25];
    CHECK_EQ_STR(tt_time_format(0, buf), "1970-01-01T00:00:00.000Z");
    CHECK_EQ_STR(tt_time_format(1796396400123, buf), "2026-12-04T15:00:00.123Z");
    CHECK_EQ_STR(tt_time_format(-1, buf), "1969-12-31T23:59:59.999Z");
    CHECK_EQ_STR(tt_time_format(951782400000, buf), "2000-02-29T00:00:00.000Z");
    CHECK_EQ_STR(tt_time_format(4107542399999, buf), "2100-02-28T23:59:59.999Z");
    CHECK_EQ_STR(tt_time_format(4107542400000, buf), "2100-03-01T00:00:00.000Z");
    /* Out of the four-digit year range: clamped. */
    CHECK_EQ_STR(tt_time_format(INT64_MAX, buf), "9999-12-31T23:59:59.999Z");
    CHECK_EQ_STR(tt_time_format(INT64_MIN, buf), "0000-01-01T00:00:00.000Z");
    CHECK(tt_time_format(5, buf) == buf);
    CHECK_EQ_INT(strlen(tt_time_format(tt_now_ms(), buf)), 24);
}

static void test_parse_accepts(void)
{
    int64_t base = 1796396400000; /* 2026-12-04T15:00:00Z */
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00Z"), base);
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00.1Z"), base + 100);
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00.12Z"), base + 120);
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00.123Z"), base + 123);
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00.123456Z"), base + 123);
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00.999999999Z"), base + 999);
    CHECK_EQ_INT(parse_ok("2026-12-04t15:00:00z"), base);
    CHECK_EQ_INT(parse_ok("2026-12-04T23:00:00+08:00"), base);
    CHECK_EQ_INT(parse_ok("2026-12-04T09:30:00-05:30"), base);
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00+00:00"), base);
    CHECK_EQ_INT(parse_ok("2026-12-04T15:00:00-00:00"), base);
    CHECK_EQ_INT(parse_ok("2026-12-05T00:00:00.5+09:00"), base + 500);
    CHECK_EQ_INT(parse_ok("1970-01-01T00:00:00Z"), 0);
    CHECK_EQ_INT(parse_ok("1969-12-31T23:59:59.999Z"), -1);
    CHECK_EQ_INT(parse_ok("2024-02-29T00:00:00Z"), 1709164800000);
    CHECK_EQ_INT(parse_ok("2000-02-29T00:00:00Z"), 951782400000);
    CHECK_EQ_INT(parse_ok("9999-12-31T23:59:59.999Z"), 253402300799999);
    CHECK_EQ_INT(parse_ok("0000-01-01T00:00:00Z"), -62167219200000);
}

static void test_parse_rejects(void)
{
    static const char *bad[] = {
        "",
        "garbage",
        "2026-12-04",
        "2026-12-04T15:00",
        "2026-12-04T15:00:00",          /* no offset */
        "2026-12-04 15:00:00Z",         /* space separator */
        "2026-12-04T15:00:00ZZ",        /* trailing */
        "2026-12-04T15:00:00Z ",
        " 2026-12-04T15:00:00Z",
        "2026-12-04T15:00:00.Z",        /* empty fraction */
        "2026-12-04T15:00:00.1234567890Z",
        "2026-12-04T15:00:00+0800",
        "2026-12-04T15:00:00+08",
        "2026-12-04T15:00:00+08:00x",
        "2026-12-04T15:00:00+24:00",
        "2026-12-04T15:00:00+08:60",
        "2026-13-04T15:00:00Z",
        "2026-00-04T15:00:00Z",
        "2026-12-00T15:00:00Z",
        "2026-12-32T15:00:00Z",
        "2026-04-31T15:00:00Z",
        "2023-02-29T00:00:00Z",         /* not a leap year */
        "2100-02-29T00:00:00Z",
        "2026-12-04T24:00:00Z",
        "2026-12-04T15:60:00Z",
        "2026-12-04T15:00:60Z",
        "2026-12-4T15:00:00Z",
        "26-12-04T15:00:00Z",
        "+2026-12-04T15:00:00Z",
        "2026/12/04T15:00:00Z",
        "2026-12-04T15:00:00.12a3Z",
        "2026-12-04T1a:00:00Z",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t ms = 42;
        int rc = tt_time_parse(bad[i], &ms);
        if (rc != -EINVAL)
            fprintf(stderr, "accepted bad time \"%s\"\n", bad[i]);
        CHECK_EQ_INT(rc, -EINVAL);
    }
    int64_t ms;
    CHECK_EQ_INT(tt_time_parse(NULL, &ms), -EINVAL);
}

static void test_round_trip(void)
{
    char buf[25];
    /* Every format is parsed back to the same instant, across eras. */
    for (int64_t ms = -62167219200000; ms <= 253402300799999; ms += 7777777777 + 13) {
        int64_t back = 0;
        int rc = tt_time_parse(tt_time_format(ms, buf), &back);
        CHECK(rc == 0 && back == ms);
        if (rc != 0 || back != ms) {
            fprintf(stderr, "round trip failed at %lld (%s)\n", (long long)ms, buf);
            break;
        }
    }
    /* Day-by-day over 1999..2101 exercises every month length and leap rule. */
    int64_t prev = -1;
    for (int64_t ms = 915148800000; ms < 4133980800000; ms += 86400000) {
        int64_t back = 0;
        tt_time_format(ms, buf);
        CHECK(tt_time_parse(buf, &back) == 0 && back == ms);
        CHECK(prev < 0 || back - prev == 86400000);
        prev = back;
        if (back != ms)
            break;
    }
    int64_t now = tt_now_ms(), back = 0;
    CHECK(tt_time_parse(tt_time_format(now, buf), &back) == 0 && back == now);
}

int main(void)
{
    test_now_and_advance();
    test_format();
    test_parse_accepts();
    test_parse_rejects();
    test_round_trip();
    return check_finish("test_clock");
}
