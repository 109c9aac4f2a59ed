/* crypto.c: randomness, API token secrets, hashing, sealing and the server's
 * key file, all on libsodium.
 *
 * Secrets are never stored in clear (DESIGN.md invariant 6): callers keep
 * tt_hash of a token, and seal what must be recoverable under the key that
 * tt_key_load_or_create keeps on disk. */
#include "util/crypto.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/log.h"

static const char base62_alphabet[] =
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

_Static_assert(crypto_generichash_BYTES == TT_HASH_BYTES, "hash size");
_Static_assert(crypto_secretbox_KEYBYTES == TT_KEY_BYTES, "key size");
_Static_assert(crypto_generichash_KEYBYTES_MIN <= TT_KEY_BYTES &&
               crypto_generichash_KEYBYTES_MAX >= TT_KEY_BYTES, "hash key size");

/* Idempotent (sodium_init returns 1 when already initialised). */
int tt_crypto_init(void)
{
    return sodium_init() < 0 ? -EIO : 0;
}

/* Rejection sampling over random bytes: a byte below 248 (= 4 * 62) maps to
 * byte % 62 with every character equally likely; 248..255 are discarded. */
void tt_random_base62(char *out, size_t n)
{
    unsigned char pool[64];
    size_t avail = 0, pos = 0, i = 0;
    while (i < n) {
        if (pos == avail) {
            randombytes_buf(pool, sizeof pool);
            avail = sizeof pool;
            pos = 0;
        }
        unsigned char b = pool[pos++];
        if (b < 248)
            out[i++] = base62_alphabet[b % 62];
    }
    out[n] = '\0';
    sodium_memzero(pool, sizeof pool);
}

void tt_token_new(char buf[TT_TOKEN_LEN + 1])
{
    memcpy(buf, "tt_", 3);
    tt_random_base62(buf + 3, TT_TOKEN_LEN - 3);
}

/* upper 0 or 1 gives 0. */
uint32_t tt_random_uniform(uint32_t upper)
{
    return randombytes_uniform(upper);
}

void tt_hash(const uint8_t key[TT_KEY_BYTES], const void *data, size_t len, uint8_t out[TT_HASH_BYTES])
{
    crypto_generichash(out, TT_HASH_BYTES, data, len, key, key != NULL ? TT_KEY_BYTES : 0);
}

/* 1 when the n bytes are equal, else 0; the time taken depends only on n. */
int tt_equal_ct(const void *a, const void *b, size_t n)
{
    return sodium_memcmp(a, b, n) == 0;
}

int tt_seal(const uint8_t key[TT_KEY_BYTES], const void *plain, size_t len, uint8_t **out, size_t *outlen)
{
    const size_t over = crypto_secretbox_NONCEBYTES + crypto_secretbox_MACBYTES;
    if (len > SIZE_MAX - over)
        return -ENOMEM;
    uint8_t *box = malloc(len + over);
    if (box == NULL)
        return -ENOMEM;
    randombytes_buf(box, crypto_secretbox_NONCEBYTES);
    crypto_secretbox_easy(box + crypto_secretbox_NONCEBYTES, plain, len, box, key);
    *out = box;
    *outlen = len + over;
    return 0;
}

int tt_unseal(const uint8_t key[TT_KEY_BYTES], const uint8_t *box, size_t len, uint8_t **out, size_t *outlen)
{
    const size_t over = crypto_secretbox_NONCEBYTES + crypto_secretbox_MACBYTES;
    if (box == NULL || len < over)
        return -EINVAL;
    size_t plen = len - over;
    uint8_t *plain = malloc(plen + 1);
    if (plain == NULL)
        return -ENOMEM;
    if (crypto_secretbox_open_easy(plain, box + crypto_secretbox_NONCEBYTES,
                                   len - crypto_secretbox_NONCEBYTES, box, key) != 0) {
        free(plain);
        return -EINVAL;
    }
    plain[plen] = '\0';
    *out = plain;
    *outlen = plen;
    return 0;
}

/* Reads the key from an open file that must be a regular file of exactly
 * TT_KEY_BYTES bytes. */
static int key_read(int fd, const char *path, uint8_t key[TT_KEY_BYTES])
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return -errno;
    if (!S_ISREG(st.st_mode) || st.st_size != TT_KEY_BYTES)
        return -EINVAL;
    if ((st.st_mode & 077) != 0)
        LOG_WARN("key file %s is accessible to other users (mode %03o)", path,
                 (unsigned)(st.st_mode & 0777));
    size_t got = 0;
    while (got < TT_KEY_BYTES) {
        ssize_t r = read(fd, key + got, TT_KEY_BYTES - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return -EINVAL; /* shrank under us */
        got += (size_t)r;
    }
    return 0;
}

static int key_load(const char *path, uint8_t key[TT_KEY_BYTES])
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int rc = key_read(fd, path, key);
    close(fd);
    return rc;
}

static int fsync_parent_dir(const char *path)
{
    char *copy = strdup(path);
    if (copy == NULL)
        return -ENOMEM;
    char *slash = strrchr(copy, '/');
    const char *dir = ".";
    if (slash == copy)
        dir = "/";
    else if (slash != NULL) {
        *slash = '\0';
        dir = copy;
    }
    int rc = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0)
        rc = -errno;
    if (fd >= 0)
        close(fd);
    free(copy);
    return rc;
}

static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -errno;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Creates the key file so that it appears all at once: a new random key is
 * written to a private temporary file (O_CREAT|O_EXCL, mode 0600) beside it,
 * fsync'd, then hard-linked to path, which fails with EEXIST if another
 * process created the key first. A crash at any point leaves either no key
 * file or a complete one, never an empty or short one. */
static int key_create(const char *path, uint8_t key[TT_KEY_BYTES])
{
    size_t tlen = strlen(path) + 32;
    char *tmp = malloc(tlen);
    if (tmp == NULL)
        return -ENOMEM;
    snprintf(tmp, tlen, "%s.tmp.%ld.%08x", path, (long)getpid(), (unsigned)randombytes_random());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        int rc = -errno;
        free(tmp);
        return rc;
    }
    uint8_t fresh[TT_KEY_BYTES];
    randombytes_buf(fresh, sizeof fresh);
    int rc = write_all(fd, fresh, sizeof fresh);
    if (rc == 0 && fsync(fd) != 0)
        rc = -errno;
    if (close(fd) != 0 && rc == 0)
        rc = -errno;
    if (rc == 0 && link(tmp, path) != 0)
        rc = -errno;
    unlink(tmp);
    free(tmp);
    if (rc == 0)
        rc = fsync_parent_dir(path);
    if (rc == 0)
        memcpy(key, fresh, sizeof fresh);
    sodium_memzero(fresh, sizeof fresh);
    return rc;
}

int tt_key_load_or_create(const char *path, uint8_t key[TT_KEY_BYTES])
{
    if (path == NULL || *path == '\0' || key == NULL)
        return -EINVAL;
    int rc = key_load(path, key);
    if (rc != -ENOENT)
        return rc;
    rc = key_create(path, key);
    if (rc == -EEXIST) /* lost a race with another creator: use its key */
        rc = key_load(path, key);
    return rc;
}
