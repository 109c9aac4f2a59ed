/* phone.c: phone number normalisation and alphanumeric sender names.
 *
 * The normalised form (API.md section 1) is the key under which numbers are
 * stored, pinned and compared, so every path that accepts a number from a
 * user or a device goes through tt_phone_normalize. */
#include "util/phone.h"

#include <errno.h>

#define PHONE_MIN_DIGITS 3
#define PHONE_MAX_DIGITS 15
#define SENDER_MAX_CHARS 11

static int is_separator(char c)
{
    return c == ' ' || c == '-' || c == '.' || c == '(' || c == ')';
}

/* Strips the separators, then requires an optional leading '+' followed by 3
 * to 15 ASCII digits. out is written only on success. A local number (no
 * '+') is kept as dialled, including leading zeros. */
int tt_phone_normalize(const char *in, char out[TT_PHONE_MAX])
{
    if (in == NULL || out == NULL)
        return -EINVAL;
    char buf[TT_PHONE_MAX];
    size_t n = 0;
    int digits = 0;
    for (const char *p = in; *p != '\0'; p++) {
        char c = *p;
        if (is_separator(c))
            continue;
        if (c == '+') {
            if (n != 0) /* '+' only as the first kept character, only once */
                return -EINVAL;
        } else if (c >= '0' && c <= '9') {
            if (++digits > PHONE_MAX_DIGITS)
                return -EINVAL;
        } else {
            return -EINVAL;
        }
        buf[n++] = c;
    }
    if (digits < PHONE_MIN_DIGITS)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        out[i] = buf[i];
    out[n] = '\0';
    return 0;
}

int tt_sender_is_alnum(const char *s)
{
    if (s == NULL)
        return 0;
    int len = 0, letters = 0;
    for (const char *p = s; *p != '\0'; p++) {
        char c = *p;
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'))
            letters++;
        else if (!(c >= '0' && c <= '9') && c != ' ')
            return 0;
        if (++len > SENDER_MAX_CHARS)
            return 0;
    }
    return len >= 1 && letters >= 1;
}
