/* test_sms.c: SMS encoding and segment counting (API.md section 1, "Message
 * text"), and strict UTF-8 validation. */
#include <errno.h>
#include <stdlib.h>

#include "check.h"
#include "util/sms.h"

/* A malloc'd string of `count` copies of `unit`. */
static char *repeat(const char *unit, size_t count)
{
    size_t ul = strlen(unit);
    char *s = malloc(ul * count + 1);
    for (size_t i = 0; i < count; i++)
        memcpy(s + i * ul, unit, ul);
    s[ul * count] = '\0';
    return s;
}

static char *concat3(const char *a, const char *b, const char *c)
{
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    char *s = malloc(la + lb + lc + 1);
    memcpy(s, a, la);
    memcpy(s + la, b, lb);
    memcpy(s + la + lb, c, lc + 1);
    return s;
}

static tt_sms_info analyze(const char *s)
{
    tt_sms_info info;
    memset(&info, 0xAB, sizeof info);
    int rc = tt_sms_analyze(s, strlen(s), &info);
    CHECK_EQ_INT(rc, 0);
    return info;
}

static void expect(const char *s, tt_encoding enc, size_t cps, size_t units, size_t segs,
                   int line)
{
    tt_sms_info i = analyze(s);
    if (i.encoding != enc || i.codepoints != cps || i.units != units || i.segments != segs)
        fprintf(stderr, "line %d: got %s cps=%zu units=%zu segs=%zu\n", line,
                tt_encoding_name(i.encoding), i.codepoints, i.units, i.segments);
    CHECK_EQ_INT(i.encoding, enc);
    CHECK_EQ_INT(i.codepoints, cps);
    CHECK_EQ_INT(i.units, units);
    CHECK_EQ_INT(i.segments, segs);
}

/* Checks a repeated unit, freeing the string. */
static void expect_rep(const char *unit, size_t n, tt_encoding enc, size_t cps, size_t units,
                       size_t segs, int line)
{
    char *s = repeat(unit, n);
    expect(s, enc, cps, units, segs, line);
    free(s);
}

#define GSM TT_ENC_GSM7
#define UCS TT_ENC_UCS2

static void test_gsm_segments(void)
{
    expect("", GSM, 0, 0, 0, __LINE__);
    expect("Hello, world!", GSM, 13, 13, 1, __LINE__);
    expect_rep("a", 1, GSM, 1, 1, 1, __LINE__);
    expect_rep("a", 160, GSM, 160, 160, 1, __LINE__);
    expect_rep("a", 161, GSM, 161, 161, 2, __LINE__);
    expect_rep("a", 306, GSM, 306, 306, 2, __LINE__);
    expect_rep("a", 307, GSM, 307, 307, 3, __LINE__);
    expect_rep("a", 459, GSM, 459, 459, 3, __LINE__);
    expect_rep("a", 460, GSM, 460, 460, 4, __LINE__);
    expect_rep("a", 1600, GSM, 1600, 1600, 11, __LINE__);
    /* Non-ASCII basic-table characters are one septet and one code point. */
    expect_rep("\xC3\xA9", 160, GSM, 160, 160, 1, __LINE__); /* é */
    expect_rep("\xCE\x94", 161, GSM, 161, 161, 2, __LINE__); /* Δ */
}

static void test_gsm_extension(void)
{
    /* Extension characters count two septets. */
    expect("\xE2\x82\xAC", GSM, 1, 2, 1, __LINE__); /* € */
    expect("{}", GSM, 2, 4, 1, __LINE__);
    expect("\f^{}\\[~]|\xE2\x82\xAC", GSM, 10, 20, 1, __LINE__);
    expect_rep("{", 80, GSM, 80, 160, 1, __LINE__);
    expect_rep("[", 81, GSM, 81, 162, 2, __LINE__);
    char *s = repeat("a", 159);
    char *t = concat3(s, "\xE2\x82\xAC", ""); /* 159 + 2 = 161 septets */
    expect(t, GSM, 160, 161, 2, __LINE__);
    free(t);
    free(s);

    /* 152 septets then an escape pair: the pair does not fit in the first
     * part's last septet, so it moves to the next part. */
    char *a152 = repeat("a", 152);
    char *a151 = repeat("a", 151);
    char *a152b = repeat("a", 152);
    t = concat3(a152, "[", a151); /* 152 | 2+151 = 153 */
    expect(t, GSM, 304, 305, 2, __LINE__);
    free(t);
    t = concat3(a152, "[", a152b); /* 152 | 153 | 1: division would say 2 */
    expect(t, GSM, 305, 306, 3, __LINE__);
    free(t);
    char *a153 = repeat("a", 153);
    t = concat3(a153, "[", a151); /* 153 | 2+151 = 153: exactly fits */
    expect(t, GSM, 305, 306, 2, __LINE__);
    free(t);
    char *a150 = repeat("a", 150);
    t = concat3(a150, "\xE2\x82\xAC", a150); /* 152 | 151: the pair fits */
    expect(t, GSM, 301, 302, 2, __LINE__);
    free(t);
    t = concat3(a152, "\xE2\x82\xAC", a152b); /* the euro sign moves too */
    expect(t, GSM, 305, 306, 3, __LINE__);
    free(t);
    /* Only extension characters: 153 pairs = 306 septets. A part holds 76
     * pairs (152 septets), so 3 parts where dividing by 153 would give 2. */
    expect_rep("~", 153, GSM, 153, 306, 3, __LINE__);
    free(a152);
    free(a151);
    free(a152b);
    free(a153);
    free(a150);
}

static void test_gsm_table(void)
{
    /* Every character of the GSM 03.38 basic table, one septet each. */
    static const char *basic[] = {
        "@", "\xC2\xA3", "$", "\xC2\xA5", "\xC3\xA8", "\xC3\xA9", "\xC3\xB9", "\xC3\xAC",
        "\xC3\xB2", "\xC3\x87", "\n", "\xC3\x98", "\xC3\xB8", "\r", "\xC3\x85", "\xC3\xA5",
        "\xCE\x94", "_", "\xCE\xA6", "\xCE\x93", "\xCE\x9B", "\xCE\xA9", "\xCE\xA0",
        "\xCE\xA8", "\xCE\xA3", "\xCE\x98", "\xCE\x9E", "\xC3\x86", "\xC3\xA6", "\xC3\x9F",
        "\xC3\x89", " ", "!", "\"", "#", "\xC2\xA4", "%", "&", "'", "(", ")", "*", "+",
        ",", "-", ".", "/", "0", "9", ":", ";", "<", "=", ">", "?", "\xC2\xA1", "A", "Z",
        "\xC3\x84", "\xC3\x96", "\xC3\x91", "\xC3\x9C", "\xC2\xA7", "\xC2\xBF", "a", "z",
        "\xC3\xA4", "\xC3\xB6", "\xC3\xB1", "\xC3\xBC", "\xC3\xA0",
    };
    for (size_t i = 0; i < sizeof basic / sizeof basic[0]; i++) {
        tt_sms_info info = analyze(basic[i]);
        if (info.encoding != GSM || info.units != 1)
            fprintf(stderr, "basic char #%zu not one GSM septet\n", i);
        CHECK(info.encoding == GSM && info.units == 1 && info.codepoints == 1);
    }
    for (char c = 'A'; c <= 'Z'; c++) {
        char s[3] = { c, (char)(c + 32), 0 };
        CHECK(analyze(s).encoding == GSM);
    }
    for (char c = '0'; c <= '9'; c++) {
        char s[2] = { c, 0 };
        CHECK(analyze(s).encoding == GSM);
    }

    /* Characters outside both tables force UCS-2 for the whole text. */
    static const char *not_gsm[] = {
        "`", "\t", "\x01", "\x7F", "\xC3\xA7" /* ç */, "\xC3\xA1" /* á */,
        "\xC3\xB3" /* ó */, "\xC3\xAD" /* í */, "\xC3\xBA" /* ú */, "\xC3\xAA" /* ê */,
        "\xC2\xA2" /* ¢ */, "\xCE\xB1" /* α */, "\xD0\xB6" /* ж */,
        "\xE2\x80\x99" /* ’ */, "\xE2\x80\x9C" /* “ */, "\xC2\xA0" /* nbsp */,
        "\xF0\x9F\x98\x80" /* 😀 */, "\xE4\xBD\xA0" /* 你 */,
    };
    for (size_t i = 0; i < sizeof not_gsm / sizeof not_gsm[0]; i++) {
        char *s = concat3("Hello ", not_gsm[i], " there");
        tt_sms_info info = analyze(s);
        if (info.encoding != UCS)
            fprintf(stderr, "non-GSM char #%zu treated as GSM\n", i);
        CHECK_EQ_INT(info.encoding, UCS);
        free(s);
    }
    CHECK_EQ_STR(tt_encoding_name(TT_ENC_GSM7), "GSM-7");
    CHECK_EQ_STR(tt_encoding_name(TT_ENC_UCS2), "UCS-2");
}

static void test_ucs2_segments(void)
{
    const char *zh = "\xD0\xB6"; /* Cyrillic zhe, U+0436 */
    const char *emoji = "\xF0\x9F\x98\x80"; /* U+1F600, a surrogate pair */
    expect_rep(zh, 70, UCS, 70, 70, 1, __LINE__);
    expect_rep(zh, 71, UCS, 71, 71, 2, __LINE__);
    expect_rep(zh, 134, UCS, 134, 134, 2, __LINE__);
    expect_rep(zh, 135, UCS, 135, 135, 3, __LINE__);
    expect_rep("\xE4\xBD\xA0", 1600, UCS, 1600, 1600, 24, __LINE__);

    /* One non-GSM character makes every character one UCS-2 unit. */
    char *a = repeat("a", 69);
    char *t = concat3(a, zh, "");
    expect(t, UCS, 70, 70, 1, __LINE__);
    free(t);
    t = concat3(a, zh, "{");
    expect(t, UCS, 71, 71, 2, __LINE__);
    free(t);
    free(a);

    /* Emoji: two units each, never split. */
    expect(emoji, UCS, 1, 2, 1, __LINE__);
    expect_rep(emoji, 35, UCS, 35, 70, 1, __LINE__);
    expect_rep(emoji, 36, UCS, 36, 72, 2, __LINE__);
    /* 33 emoji fill 66 of the first 67 units; the 34th moves on. */
    expect_rep(emoji, 67, UCS, 67, 134, 3, __LINE__);

    char *z66 = repeat(zh, 66);
    char *z65 = repeat(zh, 65);
    t = concat3(z66, emoji, z65); /* 66 | 2+65 = 67 */
    expect(t, UCS, 132, 133, 2, __LINE__);
    free(t);
    t = concat3(z66, emoji, z66); /* 66 | 67 | 1: division would say 2 */
    expect(t, UCS, 133, 134, 3, __LINE__);
    free(t);
    char *z67 = repeat(zh, 67);
    t = concat3(z67, emoji, z65); /* 67 | 67: exactly fits */
    expect(t, UCS, 133, 134, 2, __LINE__);
    free(t);
    free(z66);
    free(z65);
    free(z67);
}

static void expect_invalid(const char *s, size_t len, int line)
{
    tt_sms_info info;
    int rc = tt_sms_analyze(s, len, &info);
    if (rc != -EINVAL)
        fprintf(stderr, "line %d: invalid UTF-8 accepted\n", line);
    CHECK_EQ_INT(rc, -EINVAL);
}
#define BAD(lit) expect_invalid(lit, sizeof(lit) - 1, __LINE__)

static void test_utf8(void)
{
    BAD("\xC0\xAF");             /* overlong '/' */
    BAD("\xC1\xBF");
    BAD("\xE0\x80\xAF");         /* overlong, 3 bytes */
    BAD("\xE0\x9F\xBF");
    BAD("\xF0\x80\x80\xAF");     /* overlong, 4 bytes */
    BAD("\xF0\x8F\xBF\xBF");
    BAD("\x80");                 /* lone continuation */
    BAD("a\xBF" "b");
    BAD("\xC3\xA9\xA9");
    BAD("\xED\xA0\x80");         /* U+D800 */
    BAD("\xED\xBF\xBF");         /* U+DFFF */
    BAD("\xED\xA0\xBD\xED\xB8\x80"); /* CESU-8 surrogate pair */
    BAD("\xF4\x90\x80\x80");     /* U+110000 */
    BAD("\xF5\x80\x80\x80");
    BAD("\xF7\xBF\xBF\xBF");
    BAD("\xF8\x88\x80\x80\x80"); /* 5-byte form */
    BAD("\xFE");
    BAD("\xFF");
    BAD("\xC3");                 /* truncated */
    BAD("\xE2\x82");
    BAD("\xF0\x9F\x98");
    BAD("abc\xE2\x82");
    BAD("\xE2\x82" "abc");
    BAD("\xC3" "a");
    BAD("a\0b");                 /* embedded NUL */
    BAD("\0");
    /* Truncation by len, not by the NUL. */
    expect_invalid("\xE2\x82\xAC", 2, __LINE__);

    tt_sms_info info;
    CHECK_EQ_INT(tt_sms_analyze(NULL, 1, &info), -EINVAL);
    CHECK_EQ_INT(tt_sms_analyze("a", 1, NULL), -EINVAL);
    CHECK_EQ_INT(tt_sms_analyze(NULL, 0, &info), 0);
    CHECK_EQ_INT(info.segments, 0);

    /* Boundaries of each sequence length are valid. */
    expect("\xC2\x80", UCS, 1, 1, 1, __LINE__);             /* U+0080 */
    expect("\xDF\xBF", UCS, 1, 1, 1, __LINE__);             /* U+07FF */
    expect("\xE0\xA0\x80", UCS, 1, 1, 1, __LINE__);         /* U+0800 */
    expect("\xED\x9F\xBF", UCS, 1, 1, 1, __LINE__);         /* U+D7FF */
    expect("\xEE\x80\x80", UCS, 1, 1, 1, __LINE__);         /* U+E000 */
    expect("\xEF\xBF\xBF", UCS, 1, 1, 1, __LINE__);         /* U+FFFF */
    expect("\xF0\x90\x80\x80", UCS, 1, 2, 1, __LINE__);     /* U+10000 */
    expect("\xF4\x8F\xBF\xBF", UCS, 1, 2, 1, __LINE__);     /* U+10FFFF */

    /* Only len bytes are read. */
    CHECK_EQ_INT(tt_sms_analyze("abcdef", 3, &info), 0);
    CHECK_EQ_INT(info.codepoints, 3);
}

int main(void)
{
    test_gsm_segments();
    test_gsm_extension();
    test_gsm_table();
    test_ucs2_segments();
    test_utf8();
    return check_finish("test_sms");
}
