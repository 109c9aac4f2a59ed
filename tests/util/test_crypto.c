/* test_crypto.c: randomness, tokens, hashing, sealing and the key file. */
#define _GNU_SOURCE /* memmem */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "util/crypto.h"

static const char alphabet[] =
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

static void test_base62(void)
{
    enum { DRAWS = 1000, LEN = 620 }; /* 620,000 characters, 10,000 expected each */
    long counts[256] = { 0 };
    char *buf = malloc(LEN + 1);
    int only_base62 = 1;
    for (int d = 0; d < DRAWS; d++) {
        memset(buf, '#', LEN + 1);
        tt_random_base62(buf, LEN);
        if (buf[LEN] != '\0' || strlen(buf) != LEN)
            only_base62 = 0;
        for (int i = 0; i < LEN; i++) {
            unsigned char c = (unsigned char)buf[i];
            if (c == 0 || strchr(alphabet, c) == NULL)
                only_base62 = 0;
            counts[c]++;
        }
    }
    free(buf);
    CHECK(only_base62);

    /* Every character appears, each near 1/62 of the draws, and the whole
     * distribution passes a chi-square test (61 degrees of freedom; 130 is
     * far beyond the 99.999th percentile, so a uniform source fails with
     * negligible probability while a modulo bias of 256 % 62 fails surely). */
    double expected = (double)DRAWS * LEN / 62, chi2 = 0;
    int all_seen = 1, near = 1;
    for (int i = 0; i < 62; i++) {
        long c = counts[(unsigned char)alphabet[i]];
        if (c == 0)
            all_seen = 0;
        if (c < expected * 0.92 || c > expected * 1.08)
            near = 0;
        chi2 += (c - expected) * (c - expected) / expected;
    }
    CHECK(all_seen);
    CHECK(near);
    if (chi2 >= 130)
        fprintf(stderr, "chi-square %.1f\n", chi2);
    CHECK(chi2 < 130);

    char small[2] = { 'x', 'x' };
    tt_random_base62(small, 0);
    CHECK_EQ_INT(small[0], '\0');
    tt_random_base62(small, 1);
    CHECK(small[0] != 0 && strchr(alphabet, small[0]) != NULL && small[1] == '\0');
}

static void test_tokens_and_uniform(void)
{
    char a[TT_TOKEN_LEN + 1], b[TT_TOKEN_LEN + 1];
    tt_token_new(a);
    tt_token_new(b);
    CHECK_EQ_INT(strlen(a), TT_TOKEN_LEN);
    CHECK_EQ_INT(strlen(a), 35);
    CHECK(strncmp(a, "tt_", 3) == 0);
    CHECK(strspn(a + 3, alphabet) == 32);
    CHECK(strcmp(a, b) != 0);

    int seen[10] = { 0 }, in_range = 1;
    for (int i = 0; i < 10000; i++) {
        uint32_t v = tt_random_uniform(10);
        if (v >= 10)
            in_range = 0;
        else
            seen[v]++;
    }
    CHECK(in_range);
    for (int i = 0; i < 10; i++)
        CHECK(seen[i] > 800 && seen[i] < 1200);
    CHECK_EQ_INT(tt_random_uniform(1), 0);
    CHECK(tt_random_uniform(UINT32_MAX) < UINT32_MAX);
}

static void hex(const uint8_t *p, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++)
        sprintf(out + 2 * i, "%02x", p[i]);
}

static void test_hash(void)
{
    uint8_t h1[TT_HASH_BYTES], h2[TT_HASH_BYTES], h3[TT_HASH_BYTES];
    char hx[2 * TT_HASH_BYTES + 1];
    /* BLAKE2b-256 of the empty string. */
    tt_hash(NULL, "", 0, h1);
    hex(h1, sizeof h1, hx);
    CHECK_EQ_STR(hx, "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8");

    uint8_t k1[TT_KEY_BYTES], k2[TT_KEY_BYTES];
    memset(k1, 1, sizeof k1);
    memset(k2, 2, sizeof k2);
    const char *tok = "tt_abc";
    tt_hash(k1, tok, strlen(tok), h1);
    tt_hash(k1, tok, strlen(tok), h2);
    CHECK(memcmp(h1, h2, sizeof h1) == 0); /* deterministic */
    tt_hash(k2, tok, strlen(tok), h3);
    CHECK(memcmp(h1, h3, sizeof h1) != 0); /* key matters */
    tt_hash(NULL, tok, strlen(tok), h3);
    CHECK(memcmp(h1, h3, sizeof h1) != 0);
    tt_hash(k1, "tt_abd", 6, h3);
    CHECK(memcmp(h1, h3, sizeof h1) != 0); /* data matters */

    CHECK_EQ_INT(tt_equal_ct(h1, h2, sizeof h1), 1);
    CHECK_EQ_INT(tt_equal_ct(h1, h3, sizeof h1), 0);
    CHECK_EQ_INT(tt_equal_ct("abc", "abd", 3), 0);
    CHECK_EQ_INT(tt_equal_ct("abc", "abd", 2), 1);
}

static void test_seal(void)
{
    uint8_t key[TT_KEY_BYTES], other[TT_KEY_BYTES];
    memset(key, 7, sizeof key);
    memset(other, 8, sizeof other);
    const char *msg = "device password: s3cret";
    size_t mlen = strlen(msg);

    uint8_t *box = NULL, *box2 = NULL, *plain = NULL;
    size_t blen = 0, blen2 = 0, plen = 0;
    CHECK_EQ_INT(tt_seal(key, msg, mlen, &box, &blen), 0);
    CHECK(blen > mlen);
    CHECK(memmem(box, blen, "s3cret", 6) == NULL); /* not in clear */
    CHECK_EQ_INT(tt_seal(key, msg, mlen, &box2, &blen2), 0);
    CHECK(blen == blen2 && memcmp(box, box2, blen) != 0); /* fresh nonce */
    free(box2);

    CHECK_EQ_INT(tt_unseal(key, box, blen, &plain, &plen), 0);
    CHECK_EQ_INT(plen, mlen);
    CHECK(plain != NULL && memcmp(plain, msg, mlen) == 0 && plain[plen] == '\0');
    free(plain);

    /* Any flipped bit anywhere (nonce, tag or ciphertext) is a forgery. */
    int all_rejected = 1;
    for (size_t i = 0; i < blen; i++) {
        box[i] ^= 0x01;
        plain = NULL;
        if (tt_unseal(key, box, blen, &plain, &plen) != -EINVAL || plain != NULL)
            all_rejected = 0;
        box[i] ^= 0x01;
    }
    CHECK(all_rejected);
    CHECK_EQ_INT(tt_unseal(other, box, blen, &plain, &plen), -EINVAL); /* wrong key */
    CHECK_EQ_INT(tt_unseal(key, box, blen - 1, &plain, &plen), -EINVAL); /* truncated */
    CHECK_EQ_INT(tt_unseal(key, box, 10, &plain, &plen), -EINVAL);
    CHECK_EQ_INT(tt_unseal(key, box, 0, &plain, &plen), -EINVAL);
    free(box);

    /* The empty plaintext round-trips too. */
    CHECK_EQ_INT(tt_seal(key, "", 0, &box, &blen), 0);
    CHECK_EQ_INT(tt_unseal(key, box, blen, &plain, &plen), 0);
    CHECK(plen == 0 && plain[0] == '\0');
    free(plain);
    free(box);
}

static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d != NULL && (e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    if (d != NULL)
        closedir(d);
    return n;
}

static void write_file(const char *path, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    uint8_t zeros[64] = { 0 };
    if (fd >= 0) {
        CHECK((size_t)write(fd, zeros, n) == n);
        close(fd);
    }
}

static void test_key_file(void)
{
    char dir[] = "/tmp/tt_test_key_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char path[256], bad[256];
    snprintf(path, sizeof path, "%s/server.key", dir);

    umask(022);
    uint8_t k1[TT_KEY_BYTES], k2[TT_KEY_BYTES], zero[TT_KEY_BYTES] = { 0 };
    CHECK_EQ_INT(tt_key_load_or_create(path, k1), 0);
    struct stat st;
    CHECK_EQ_INT(stat(path, &st), 0);
    CHECK_EQ_INT(st.st_mode & 0777, 0600);
    CHECK_EQ_INT(st.st_size, TT_KEY_BYTES);
    CHECK(memcmp(k1, zero, sizeof k1) != 0);
    CHECK_EQ_INT(count_entries(dir), 1); /* no temporary file left behind */

    CHECK_EQ_INT(tt_key_load_or_create(path, k2), 0);
    CHECK(memcmp(k1, k2, sizeof k1) == 0); /* reload gives the same key */

    /* The key in the file is the key returned. */
    uint8_t disk[TT_KEY_BYTES];
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0 && read(fd, disk, sizeof disk) == (ssize_t)sizeof disk);
    if (fd >= 0)
        close(fd);
    CHECK(memcmp(k1, disk, sizeof k1) == 0);

    /* A file of the wrong size is refused, not replaced. */
    snprintf(bad, sizeof bad, "%s/short.key", dir);
    write_file(bad, 31);
    CHECK_EQ_INT(tt_key_load_or_create(bad, k2), -EINVAL);
    CHECK_EQ_INT(stat(bad, &st), 0);
    CHECK_EQ_INT(st.st_size, 31);
    unlink(bad);
    snprintf(bad, sizeof bad, "%s/long.key", dir);
    write_file(bad, 33);
    CHECK_EQ_INT(tt_key_load_or_create(bad, k2), -EINVAL);
    unlink(bad);
    snprintf(bad, sizeof bad, "%s/empty.key", dir);
    write_file(bad, 0);
    CHECK_EQ_INT(tt_key_load_or_create(bad, k2), -EINVAL);
    unlink(bad);
    CHECK_EQ_INT(tt_key_load_or_create(dir, k2), -EINVAL); /* a directory */

    snprintf(bad, sizeof bad, "%s/missing/dir.key", dir);
    CHECK_EQ_INT(tt_key_load_or_create(bad, k2), -ENOENT);
    CHECK_EQ_INT(tt_key_load_or_create("", k2), -EINVAL);

    unlink(path);
    CHECK_EQ_INT(count_entries(dir), 0);
    rmdir(dir);
}

int main(void)
{
    CHECK_EQ_INT(tt_crypto_init(), 0);
    CHECK_EQ_INT(tt_crypto_init(), 0); /* idempotent */
    test_base62();
    test_tokens_and_uniform();
    test_hash();
    test_seal();
    test_key_file();
    return check_finish("test_crypto");
}
