/* phone.h: phone number normalisation (API.md section 1). */
#ifndef TT_UTIL_PHONE_H
#define TT_UTIL_PHONE_H

#include <stddef.h>

#define TT_PHONE_MAX 17 /* '+', 15 digits, NUL */

/* Strips spaces, '-', '.', '(' and ')'; the rest must match ^\+?[0-9]{3,15}$.
 * Writes the normalised form to out (TT_PHONE_MAX bytes). 0 or -EINVAL. */
int tt_phone_normalize(const char *in, char out[TT_PHONE_MAX]);
/* 1 when s is an alphanumeric sender name: 1 to 11 ASCII letters, digits and
 * spaces with at least one letter. */
int tt_sender_is_alnum(const char *s);

#endif
