/* safeword.c: generating, validating and recognising per-number safe words
 * (API.md section 5).
 *
 * New safe words are four uniform draws from the embedded list in words.c.
 * Recognition normalises text and safe word the same way (lower-case ASCII,
 * every run of other bytes collapsed to one space) and looks for the safe
 * word on word boundaries. Inbound texts can be up to 64 KiB and this runs on
 * whatever thread handles the inbound message, so the text is normalised as a
 * stream, one byte at a time, and never copied; only the normalised safe word
 * and its search table are materialised (on the stack when it is short, as
 * every stored safe word is, on the heap otherwise). */
#include "util/safeword.h"

#include <stdlib.h>
#include <string.h>

#include "util/crypto.h"
#include "util/words.h"

#define SAFEWORD_WORDS 4
#define SAFEWORD_MIN_CHARS 4
#define SAFEWORD_MAX_CHARS (TT_SAFEWORD_MAX - 1)
#define WORD_MAX_LETTERS 8

_Static_assert(SAFEWORD_WORDS * WORD_MAX_LETTERS + SAFEWORD_WORDS - 1 < TT_SAFEWORD_MAX,
               "a generated safe word must fit TT_SAFEWORD_MAX");

/* Normalised pattern lengths up to this use buffers on the stack: a safe word
 * of at most 64 characters plus the boundary space on each side. */
#define SMALL_PATTERN (SAFEWORD_MAX_CHARS + 2)

void tt_safeword_new(char out[TT_SAFEWORD_MAX])
{
    size_t n = 0;
    for (int i = 0; i < SAFEWORD_WORDS; i++) {
        const char *w = tt_word_at(tt_random_uniform(TT_WORDS_COUNT));
        size_t len = strlen(w);
        if (i > 0)
            out[n++] = ' ';
        memcpy(out + n, w, len);
        n += len;
    }
    out[n] = '\0';
}

size_t tt_safeword_list_size(void)
{
    return TT_WORDS_COUNT;
}

static int is_alnum_ascii(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static unsigned char lower_ascii(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c - 'A' + 'a') : c;
}

int tt_safeword_valid(const char *s)
{
    if (s == NULL)
        return 0;
    size_t n = 0;
    for (; s[n] != '\0'; n++) {
        unsigned char c = (unsigned char)s[n];
        if (n >= SAFEWORD_MAX_CHARS) /* a 65th character: too long */
            return 0;
        if (!is_alnum_ascii(c) && c != '-' && c != '_' && c != ' ')
            return 0;
    }
    return n >= SAFEWORD_MIN_CHARS;
}

/* The normalised form of a byte string, produced one character at a time:
 * a space for the leading edge, then the string lower-cased with every run
 * of bytes that are not ASCII letters or digits replaced by one space, then
 * a space for the trailing edge. Edge spaces merge with separator runs next
 * to them, so spaces never repeat. "Amber-Falcon!" streams as
 * " amber falcon ", and a string with no letters or digits as " ". */
struct norm_stream {
    const unsigned char *p;
    const unsigned char *end;
    int in_gap;  /* the last character produced was a space */
    int started; /* the leading edge space has been produced */
};

static void norm_init(struct norm_stream *s, const void *buf, size_t len)
{
    s->p = buf;
    s->end = s->p + len;
    s->in_gap = 0;
    s->started = 0;
}

/* The next normalised character, or -1 at the end. */
static int norm_next(struct norm_stream *s)
{
    if (!s->started) {
        s->started = 1;
        s->in_gap = 1;
        return ' ';
    }
    while (s->p < s->end) {
        unsigned char c = *s->p++;
        if (is_alnum_ascii(c)) {
            s->in_gap = 0;
            return lower_ascii(c);
        }
        if (!s->in_gap) {
            s->in_gap = 1;
            return ' ';
        }
    }
    if (!s->in_gap) {
        s->in_gap = 1;
        return ' ';
    }
    return -1;
}

/* With the text and the safe word both streamed with their edge spaces, "the
 * safe word appears with a space or the text's edge on each side" is exactly
 * "the normalised safe word, edge spaces included, is a substring of the
 * normalised text": the pattern's spaces can only line up with the text's
 * separators or edges, so a match never starts or ends inside a word. The
 * search is Knuth-Morris-Pratt, linear in the text and the safe word, so a
 * hostile 64 KiB text costs the same as a friendly one.
 *
 * A safe word with no letters or digits (e.g. "----", which tt_safeword_valid
 * accepts) normalises to nothing and matches no text. Returns 0 too when the
 * heap buffer for an unusually long safe word cannot be allocated: the
 * message is then stored unverified, which is the safe answer. */
int tt_safeword_matches(const char *text, size_t len, const char *safe_word)
{
    if (safe_word == NULL || text == NULL || len == 0)
        return 0; /* an empty text contains no word */
    size_t cap = strlen(safe_word) + 2; /* the pattern never exceeds this */
    char small_pat[SMALL_PATTERN];
    size_t small_fail[SMALL_PATTERN];
    char *pat = small_pat;
    size_t *fail = small_fail;
    void *heap = NULL;
    if (cap > SMALL_PATTERN) {
        heap = malloc(cap * (sizeof *fail + 1));
        if (heap == NULL)
            return 0;
        fail = heap;
        pat = (char *)(fail + cap);
    }

    struct norm_stream ns;
    norm_init(&ns, safe_word, cap - 2);
    size_t m = 0;
    for (int c; (c = norm_next(&ns)) >= 0;)
        pat[m++] = (char)c;

    int found = 0;
    if (m >= 3) { /* at least one letter or digit between the edge spaces */
        /* fail[i]: length of the longest proper prefix of pat[0..i] that is
         * also a suffix of it. */
        fail[0] = 0;
        for (size_t i = 1, k = 0; i < m; i++) {
            while (k > 0 && pat[i] != pat[k])
                k = fail[k - 1];
            if (pat[i] == pat[k])
                k++;
            fail[i] = k;
        }
        norm_init(&ns, text, len);
        size_t q = 0; /* characters of pat matched so far */
        for (int c; (c = norm_next(&ns)) >= 0;) {
            while (q > 0 && (char)c != pat[q])
                q = fail[q - 1];
            if ((char)c == pat[q])
                q++;
            if (q == m) {
                found = 1;
                break;
            }
        }
    }
    free(heap);
    return found;
}
