/* sms.c: SMS text analysis: strict UTF-8 decoding, code point count, the
 * GSM-7 / UCS-2 decision and the segment count.
 *
 * Segments are counted by walking characters, as a real encoder fills parts:
 * a GSM-7 extension character (escape + code, two septets) or a UCS-2
 * surrogate pair (two UTF-16 units) that does not fit in what is left of a
 * part starts the next part, so the count can exceed ceil(units / per_part). */
#include "util/sms.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#define GSM7_SINGLE 160
#define GSM7_PART 153
#define UCS2_SINGLE 70
#define UCS2_PART 67

/* Non-ASCII code points of the GSM 03.38 default (basic) alphabet. */
static const uint16_t gsm_basic_nonascii[] = {
    0x00A1, 0x00A3, 0x00A4, 0x00A5, 0x00A7, 0x00BF, 0x00C4, 0x00C5, 0x00C6,
    0x00C7, 0x00C9, 0x00D1, 0x00D6, 0x00D8, 0x00DC, 0x00DF, 0x00E0, 0x00E4,
    0x00E5, 0x00E6, 0x00E8, 0x00E9, 0x00EC, 0x00F1, 0x00F2, 0x00F6, 0x00F8,
    0x00F9, 0x00FC, 0x0393, 0x0394, 0x0398, 0x039B, 0x039E, 0x03A0, 0x03A3,
    0x03A6, 0x03A8, 0x03A9,
};

/* Septets the code point takes in GSM-7 (1 basic, 2 extension), or 0 when it
 * is not in the GSM 03.38 basic or extension table. */
static int gsm_septets(uint32_t cp)
{
    if (cp < 0x80) {
        if (cp == '\n' || cp == '\r')
            return 1;
        if (cp == '\f' || cp == '^' || cp == '{' || cp == '}' || cp == '\\' ||
            cp == '[' || cp == '~' || cp == ']' || cp == '|')
            return 2;
        if (cp < 0x20 || cp == 0x7F || cp == '`')
            return 0;
        return 1; /* the rest of printable ASCII, including @ $ _ */
    }
    if (cp == 0x20AC) /* euro sign, extension table */
        return 2;
    size_t lo = 0, hi = sizeof gsm_basic_nonascii / sizeof gsm_basic_nonascii[0];
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (gsm_basic_nonascii[mid] == cp)
            return 1;
        if (gsm_basic_nonascii[mid] < cp)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* Decodes one UTF-8 sequence at s[*i] (RFC 3629 well-formed byte ranges:
 * no overlongs, no surrogates, nothing above U+10FFFF, no truncation).
 * Returns the code point and advances *i, or -1 when ill-formed. */
static int32_t utf8_next(const unsigned char *s, size_t len, size_t *i)
{
    size_t p = *i;
    unsigned char b0 = s[p];
    if (b0 < 0x80) {
        *i = p + 1;
        return b0;
    }
    int need;
    uint32_t cp;
    unsigned char lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        need = 1;
        cp = b0 & 0x1F;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 2;
        cp = b0 & 0x0F;
        if (b0 == 0xE0)
            lo = 0xA0; /* overlong below U+0800 */
        else if (b0 == 0xED)
            hi = 0x9F; /* surrogates U+D800..U+DFFF */
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 3;
        cp = b0 & 0x07;
        if (b0 == 0xF0)
            lo = 0x90; /* overlong below U+10000 */
        else if (b0 == 0xF4)
            hi = 0x8F; /* above U+10FFFF */
    } else {
        return -1; /* continuation byte, C0/C1 overlong lead, or F5..FF */
    }
    if (len - p - 1 < (size_t)need)
        return -1;
    for (int k = 1; k <= need; k++) {
        unsigned char b = s[p + k];
        if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF))
            return -1;
        cp = (cp << 6) | (b & 0x3F);
    }
    *i = p + 1 + need;
    return (int32_t)cp;
}

/* Parts needed when characters of cost 1 or 2 are packed in order into parts
 * of `part` units, a 2-unit character never split. Walks the text again;
 * only called for multipart messages, which are at most a few KiB. */
static size_t count_parts(const unsigned char *s, size_t len, bool gsm, size_t part)
{
    size_t parts = 1, used = 0, i = 0;
    while (i < len) {
        int32_t cp = utf8_next(s, len, &i); /* already validated */
        size_t cost = gsm ? (size_t)gsm_septets((uint32_t)cp) : (cp > 0xFFFF ? 2u : 1u);
        if (used + cost > part) {
            parts++;
            used = 0;
        }
        used += cost;
    }
    return parts;
}

/* text need not be NUL-terminated; len bytes are analysed. Empty text is
 * valid: GSM-7, 0 units, 0 segments (callers reject empty messages). */
int tt_sms_analyze(const char *text, size_t len, tt_sms_info *out)
{
    if (out == NULL || (text == NULL && len > 0))
        return -EINVAL;
    const unsigned char *s = (const unsigned char *)text;
    size_t cps = 0, septets = 0, utf16 = 0, i = 0;
    bool gsm = true;
    while (i < len) {
        int32_t cp = utf8_next(s, len, &i);
        if (cp <= 0) /* ill-formed, or an embedded NUL */
            return -EINVAL;
        cps++;
        utf16 += cp > 0xFFFF ? 2 : 1;
        if (gsm) {
            int sept = gsm_septets((uint32_t)cp);
            if (sept == 0)
                gsm = false;
            septets += (size_t)sept;
        }
    }
    out->encoding = gsm ? TT_ENC_GSM7 : TT_ENC_UCS2;
    out->codepoints = cps;
    out->units = gsm ? septets : utf16;
    size_t single = gsm ? GSM7_SINGLE : UCS2_SINGLE;
    if (out->units == 0)
        out->segments = 0;
    else if (out->units <= single)
        out->segments = 1;
    else
        out->segments = count_parts(s, len, gsm, gsm ? GSM7_PART : UCS2_PART);
    return 0;
}

const char *tt_encoding_name(tt_encoding e)
{
    return e == TT_ENC_GSM7 ? "GSM-7" : "UCS-2";
}
