/* safeword.h: per-number safe words (API.md section 5).
 *
 * A safe word is four words drawn uniformly (libsodium's CSPRNG) from an
 * embedded list of 2,048 common English words, separated by single spaces:
 * 44 bits of entropy, easy to type and to read aloud. */
#ifndef TT_UTIL_SAFEWORD_H
#define TT_UTIL_SAFEWORD_H

#include <stddef.h>

#define TT_SAFEWORD_MAX 65 /* 64 characters and a NUL */

/* Writes a new safe word (NUL-terminated) into out. */
void tt_safeword_new(char out[TT_SAFEWORD_MAX]);
/* Number of words in the embedded list. */
size_t tt_safeword_list_size(void);
/* 1 when s is an acceptable user-chosen safe word: 4 to 64 characters of
 * ASCII letters, digits, '-', '_' and space. */
int tt_safeword_valid(const char *s);
/* 1 when text contains safe_word as API.md 5 defines it: both lower-cased,
 * every run of characters that are not letters or digits becomes one space,
 * and the safe word then appears with a space or the text's edge on each
 * side. Letters and digits are ASCII [A-Za-z0-9]; every other byte (including
 * non-ASCII UTF-8) counts as a separator. */
int tt_safeword_matches(const char *text, size_t len, const char *safe_word);

#endif
