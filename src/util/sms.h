/* sms.h: SMS text analysis: UTF-8 validity, code points, encoding, segments.
 *
 * GSM-7 when every character is in the GSM 03.38 basic or extension table
 * (extension characters count two septets), else UCS-2 (one unit per UTF-16
 * code unit). Single message: 160 septets / 70 units; multipart: 153 / 67 per
 * part; an escape pair or a surrogate pair is never split across parts. */
#ifndef TT_UTIL_SMS_H
#define TT_UTIL_SMS_H

#include <stddef.h>

typedef enum { TT_ENC_GSM7 = 0, TT_ENC_UCS2 = 1 } tt_encoding;

typedef struct tt_sms_info {
    tt_encoding encoding;
    size_t codepoints;
    size_t units;     /* septets (GSM-7) or UTF-16 code units (UCS-2) */
    size_t segments;
} tt_sms_info;

/* 0, or -EINVAL when text is not valid UTF-8 (overlongs, surrogates, and
 * code points above U+10FFFF are invalid; so is an embedded NUL). */
int tt_sms_analyze(const char *text, size_t len, tt_sms_info *out);
const char *tt_encoding_name(tt_encoding e); /* "GSM-7" / "UCS-2" */

#endif
