/* words.h: access to the embedded safe-word list (src/util/words.c).
 *
 * Kept apart from safeword.c so the 2,048-entry table lives in one file of
 * its own; safeword.c draws from it and the unit test inspects it. */
#ifndef TT_UTIL_WORDS_H
#define TT_UTIL_WORDS_H

#include <stddef.h>

#define TT_WORDS_COUNT 2048

/* The word at index i (NUL-terminated, lowercase a-z, 3 to 8 letters), or
 * NULL when i >= TT_WORDS_COUNT. The strings are static and never change. */
const char *tt_word_at(size_t i);

#endif
