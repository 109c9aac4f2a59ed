/* test_safeword.c: the embedded word list, safe word generation, validation
 * of user-chosen safe words and recognition in inbound texts (API.md 5). */
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "util/crypto.h"
#include "util/safeword.h"
#include "util/words.h"

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A sorted copy of the list, for duplicate checks and lookups. */
static const char *sorted_words[TT_WORDS_COUNT];

static long word_index(const char *w)
{
    const char *const *hit = bsearch(&w, sorted_words, TT_WORDS_COUNT, sizeof sorted_words[0], cmp_str_ptr);
    return hit == NULL ? -1 : (long)(hit - sorted_words);
}

static int well_formed(const char *w)
{
    size_t n = strlen(w);
    if (n < 3 || n > 8)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (w[i] < 'a' || w[i] > 'z')
            return 0;
    return 1;
}

/* Words that sound alike: at most one of each group may be in the list. */
static const char *const homophones[][3] = {
    {"sea", "see", NULL},       {"sun", "son", NULL},         {"flower", "flour", NULL},
    {"bear", "bare", NULL},     {"pair", "pear", "pare"},     {"knight", "night", NULL},
    {"right", "write", "rite"}, {"road", "rode", "rowed"},    {"sail", "sale", NULL},
    {"tail", "tale", NULL},     {"mail", "male", NULL},       {"main", "mane", NULL},
    {"meat", "meet", NULL},     {"peace", "piece", "peas"},   {"plain", "plane", NULL},
    {"rain", "reign", "rein"},  {"rose", "rows", NULL},       {"stair", "stare", NULL},
    {"steal", "steel", NULL},   {"tea", "tee", NULL},         {"weak", "week", NULL},
    {"wait", "weight", NULL},   {"wear", "ware", "where"},    {"which", "witch", NULL},
    {"wood", "would", NULL},    {"hour", "our", NULL},        {"hole", "whole", NULL},
    {"heal", "heel", NULL},     {"hair", "hare", NULL},       {"deer", "dear", NULL},
    {"fair", "fare", NULL},     {"flea", "flee", NULL},       {"four", "for", "fore"},
    {"great", "grate", NULL},   {"horse", "hoarse", NULL},    {"new", "knew", "gnu"},
    {"missed", "mist", NULL},   {"moose", "mousse", NULL},    {"morning", "mourning", NULL},
    {"oar", "ore", NULL},       {"one", "won", NULL},         {"pail", "pale", NULL},
    {"pain", "pane", NULL},     {"pause", "paws", NULL},      {"peak", "peek", NULL},
    {"pole", "poll", NULL},     {"praise", "prays", "preys"}, {"ring", "wring", NULL},
    {"roll", "role", NULL},     {"root", "route", NULL},      {"suite", "sweet", NULL},
    {"tide", "tied", NULL},     {"toe", "tow", NULL},         {"waist", "waste", NULL},
    {"berry", "bury", NULL},    {"board", "bored", NULL},     {"bread", "bred", NULL},
    {"cereal", "serial", NULL}, {"cord", "chord", NULL},      {"course", "coarse", NULL},
    {"dew", "due", NULL},       {"fur", "fir", NULL},         {"gate", "gait", NULL},
    {"herd", "heard", NULL},    {"muscle", "mussel", NULL},   {"nose", "knows", NULL},
    {"petal", "pedal", "peddle"}, {"plum", "plumb", NULL},    {"real", "reel", NULL},
    {"scene", "seen", NULL},    {"size", "sighs", NULL},      {"team", "teem", NULL},
    {"turn", "tern", NULL},     {"time", "thyme", NULL},      {"wheel", "weal", NULL},
    {"whale", "wail", NULL},    {"world", "whirled", NULL},   {"cellar", "seller", NULL},
    {"metal", "medal", NULL},   {"pen", "pin", NULL},         {"ferry", "fairy", NULL},
    {"rider", "writer", NULL},  {"minor", "miner", NULL},     {"beach", "beech", NULL},
    {"blue", "blew", NULL},     {"symbol", "cymbal", NULL},   {"links", "lynx", NULL},
};

static void test_list(void)
{
    CHECK_EQ_INT(tt_safeword_list_size(), 2048);
    CHECK_EQ_INT(TT_WORDS_COUNT, 2048);
    CHECK(tt_word_at(TT_WORDS_COUNT) == NULL);
    CHECK(tt_word_at(SIZE_MAX) == NULL);

    int missing = 0, malformed = 0;
    for (size_t i = 0; i < TT_WORDS_COUNT; i++) {
        const char *w = tt_word_at(i);
        sorted_words[i] = w != NULL ? w : "";
        if (w == NULL) {
            fprintf(stderr, "word %zu missing\n", i);
            missing++;
        } else if (!well_formed(w)) {
            fprintf(stderr, "word %zu \"%s\" is not 3 to 8 letters a-z\n", i, w);
            malformed++;
        }
    }
    CHECK_EQ_INT(missing, 0);
    CHECK_EQ_INT(malformed, 0);

    qsort(sorted_words, TT_WORDS_COUNT, sizeof sorted_words[0], cmp_str_ptr);
    int dups = 0;
    for (size_t i = 1; i < TT_WORDS_COUNT; i++)
        if (strcmp(sorted_words[i - 1], sorted_words[i]) == 0) {
            fprintf(stderr, "duplicate word \"%s\"\n", sorted_words[i]);
            dups++;
        }
    CHECK_EQ_INT(dups, 0);

    int clashes = 0;
    for (size_t g = 0; g < sizeof homophones / sizeof homophones[0]; g++) {
        int present = 0;
        for (int j = 0; j < 3 && homophones[g][j] != NULL; j++)
            present += word_index(homophones[g][j]) >= 0;
        if (present > 1) {
            fprintf(stderr, "sound-alike words both listed: \"%s\"/\"%s\"\n", homophones[g][0], homophones[g][1]);
            clashes++;
        }
    }
    CHECK_EQ_INT(clashes, 0);
    CHECK(word_index("amber") >= 0); /* the example in API.md */
}

/* 1 when s is exactly four list words joined by single spaces; their
 * indices (into sorted_words) go to idx. */
static int parse_generated(const char *s, long idx[4])
{
    char buf[TT_SAFEWORD_MAX];
    size_t n = strlen(s);
    if (n >= sizeof buf)
        return 0;
    memcpy(buf, s, n + 1);
    char *p = buf;
    for (int i = 0; i < 4; i++) {
        char *sp = strchr(p, ' ');
        if (i < 3) {
            if (sp == NULL)
                return 0;
            *sp = '\0';
        } else if (sp != NULL) {
            return 0;
        }
        idx[i] = word_index(p); /* "" (from a double space) is not a word */
        if (idx[i] < 0)
            return 0;
        p = sp + 1;
    }
    return 1;
}

#define GENERATIONS 20000

static void test_generate(void)
{
    char(*made)[TT_SAFEWORD_MAX] = calloc(GENERATIONS, sizeof *made);
    const char **ptrs = calloc(GENERATIONS, sizeof *ptrs);
    unsigned *seen = calloc(TT_WORDS_COUNT, sizeof *seen);
    CHECK(made != NULL && ptrs != NULL && seen != NULL);
    if (made == NULL || ptrs == NULL || seen == NULL) {
        free(made);
        free(ptrs);
        free(seen);
        return;
    }

    int bad = 0, invalid = 0, unmatched = 0;
    size_t longest = 0;
    for (int i = 0; i < GENERATIONS; i++) {
        memset(made[i], '#', TT_SAFEWORD_MAX);
        tt_safeword_new(made[i]);
        ptrs[i] = made[i];
        size_t n = strnlen(made[i], TT_SAFEWORD_MAX);
        if (n == TT_SAFEWORD_MAX) { /* not terminated */
            made[i][TT_SAFEWORD_MAX - 1] = '\0';
            bad++;
            continue;
        }
        if (n > longest)
            longest = n;
        long idx[4];
        if (!parse_generated(made[i], idx)) {
            if (bad++ < 5)
                fprintf(stderr, "malformed safe word \"%s\"\n", made[i]);
            continue;
        }
        for (int j = 0; j < 4; j++)
            seen[idx[j]]++;
        invalid += !tt_safeword_valid(made[i]);
        unmatched += !tt_safeword_matches(made[i], n, made[i]);
    }
    CHECK_EQ_INT(bad, 0);
    CHECK_EQ_INT(invalid, 0);
    CHECK_EQ_INT(unmatched, 0);
    CHECK(longest <= 35);

    /* 20,000 draws from 2^44: a repeat has odds of about 1 in 90,000. */
    qsort(ptrs, GENERATIONS, sizeof *ptrs, cmp_str_ptr);
    int dups = 0;
    for (int i = 1; i < GENERATIONS; i++)
        if (strcmp(ptrs[i - 1], ptrs[i]) == 0)
            dups++;
    CHECK_EQ_INT(dups, 0);

    /* 80,000 words drawn, about 39 of each: every word turns up (a given one
     * is missed with odds e^-39), and none is far off the mean (each bound
     * is over five standard deviations away). */
    int never = 0, skewed = 0;
    for (size_t w = 0; w < TT_WORDS_COUNT; w++) {
        if (seen[w] == 0) {
            if (never++ < 5)
                fprintf(stderr, "\"%s\" never drawn\n", sorted_words[w]);
        } else if (seen[w] < 8 || seen[w] > 85) {
            fprintf(stderr, "\"%s\" drawn %u times of 80000\n", sorted_words[w], seen[w]);
            skewed++;
        }
    }
    CHECK_EQ_INT(never, 0);
    CHECK_EQ_INT(skewed, 0);

    free(made);
    free(ptrs);
    free(seen);
}

static int matches(const char *text, const char *safe_word)
{
    return tt_safeword_matches(text, strlen(text), safe_word);
}

static void test_matches(void)
{
    const char *sw = "amber falcon river coral";

    CHECK(matches("Amber-Falcon River coral!", sw));
    CHECK(matches("amber falcon river coral", sw));
    CHECK(matches("my word is AMBER  falcon...river__coral, ok", sw));
    CHECK(matches("amber falcon river coral is the word", sw)); /* at the start */
    CHECK(matches("the word: amber falcon river coral", sw));   /* at the end */
    CHECK(matches("\n\tAMBER FALCON RIVER CORAL\r\n", sw));
    CHECK(matches("é amber falcon river coral é", sw));
    CHECK(matches("caf\xc3\xa9" "amber falcon river coral\xe2\x80\xa6", sw)); /* UTF-8 separates */
    CHECK(matches("amber amber falcon river coral", sw));       /* restart after a false start */
    CHECK(matches("amber falcon amber falcon river coral", sw));
    CHECK(matches("amber falcon river amber falcon river coral", sw));

    CHECK(!matches("xamber falcon river coral", sw));
    CHECK(!matches("amber falcon river corals", sw));
    CHECK(!matches("amber falcon river coral2", sw));
    CHECK(!matches("amber falcon river", sw));
    CHECK(!matches("amber falcon coral river", sw));
    CHECK(!matches("amberfalcon river coral", sw));
    CHECK(!matches("amber falcon river cora", sw));
    CHECK(!matches("mber falcon river coral", sw));
    CHECK(!matches("amber falcon, not river coral", sw));

    /* the empty text, and NULL text or safe word */
    CHECK(!matches("", sw));
    CHECK(!tt_safeword_matches(NULL, 0, sw));
    CHECK(!tt_safeword_matches(NULL, 10, sw));
    CHECK(!tt_safeword_matches("amber", 5, NULL));

    /* the safe word is normalised the same way */
    CHECK(matches("amber falcon", "Amber_Falcon"));
    CHECK(matches("AMBER-FALCON!", "Amber_Falcon"));
    CHECK(matches("say amber falcon now", "  -Amber--Falcon-  "));
    CHECK(matches("Amber-Falcon River coral!", "AMBER FALCON RIVER CORAL"));
    CHECK(!matches("amberfalcon", "Amber_Falcon"));
    CHECK(!matches("amber_falconry", "Amber_Falcon"));

    /* digits are word characters */
    CHECK(matches("code 1234-abc here", "1234 abc"));
    CHECK(!matches("code a1234 abc", "1234 abc"));
    CHECK(!matches("code 12345 abc", "1234 abc"));

    /* a safe word with no letters or digits matches nothing */
    CHECK(tt_safeword_valid("----"));
    CHECK(!matches("----", "----"));
    CHECK(!matches("a - b", "- -"));

    /* only len bytes count; a NUL inside them is a separator */
    CHECK(tt_safeword_matches("amber falcon river coralx", 24, sw));
    CHECK(!tt_safeword_matches("amber falcon river coral", 23, sw));
    CHECK(tt_safeword_matches("amber\0falcon river coral", 24, sw));

    /* a safe word longer than any stored one takes the heap path */
    {
        char longw[200], text[220];
        memset(longw, 0, sizeof longw);
        for (int i = 0; i < 30; i++)
            strcat(longw, i % 2 ? "Falcon " : "amber-");
        snprintf(text, sizeof text, "> %s <", longw);
        CHECK(matches(text, longw));
        text[3] = 'X'; /* "aXber" */
        CHECK(!matches(text, longw));
    }
}

/* A 64 KiB text: the safe word at the very end, and a text of near misses
 * (the KMP worst case for a repetitive safe word). */
static void test_large_text(void)
{
    const size_t size = 64 * 1024;
    char *text = malloc(size + 1);
    CHECK(text != NULL);
    if (text == NULL)
        return;
    const char *unit = "amber falcon river ";
    size_t ulen = strlen(unit), n = 0;
    while (n + ulen <= size - 5) {
        memcpy(text + n, unit, ulen);
        n += ulen;
    }
    memcpy(text + n, "coral", 5);
    n += 5;
    CHECK(tt_safeword_matches(text, n, "amber falcon river coral"));
    CHECK(tt_safeword_matches(text, n, "river coral"));
    CHECK(!tt_safeword_matches(text, n - 1, "amber falcon river coral"));
    CHECK(!tt_safeword_matches(text, n, "amber falcon river amber falcon coral"));

    for (size_t i = 0; i < size; i += 2) {
        text[i] = 'a';
        text[i + 1] = ' ';
    }
    CHECK(!tt_safeword_matches(text, size, "a a a a a a a a a a a a a a a a a a a a b"));
    text[size - 2] = 'b';
    CHECK(tt_safeword_matches(text, size, "a a a a a a a a a a a a a a a a a a a a b"));
    CHECK(tt_safeword_matches(text, size, "A_B"));
    free(text);
}

static void test_valid(void)
{
    CHECK(tt_safeword_valid("ab c"));
    CHECK(tt_safeword_valid("a-b_c d"));
    CHECK(tt_safeword_valid("amber falcon river coral"));
    CHECK(tt_safeword_valid("Amber_Falcon-42"));
    CHECK(!tt_safeword_valid("abc"));
    CHECK(!tt_safeword_valid(""));
    CHECK(!tt_safeword_valid(NULL));
    CHECK(!tt_safeword_valid("amber!"));
    CHECK(!tt_safeword_valid("amber\tfalcon"));
    CHECK(!tt_safeword_valid("amber.falcon"));
    CHECK(!tt_safeword_valid("caf\xc3\xa9 amber"));

    char s[80];
    memset(s, 'a', sizeof s);
    s[64] = '\0';
    CHECK(tt_safeword_valid(s)); /* 64 characters */
    s[64] = 'a';
    s[65] = '\0';
    CHECK(!tt_safeword_valid(s)); /* 65 */
    s[65] = 'a';
    s[79] = '\0';
    CHECK(!tt_safeword_valid(s));
}

int main(void)
{
    if (tt_crypto_init() != 0) {
        fprintf(stderr, "tt_crypto_init failed\n");
        return 1;
    }
    test_list();
    test_generate();
    test_matches();
    test_large_text();
    test_valid();
    return check_finish("test_safeword");
}
