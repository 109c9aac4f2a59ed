/* crypto.h: randomness, token secrets, hashing and sealing (libsodium).
 *
 * tt_crypto_init must run once before anything else here. */
#ifndef TT_UTIL_CRYPTO_H
#define TT_UTIL_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

#define TT_KEY_BYTES 32
#define TT_HASH_BYTES 32
#define TT_TOKEN_LEN 35 /* "tt_" + 32 base62 characters */

int tt_crypto_init(void);
/* Fills out with n random base62 characters from the CSPRNG and a NUL. */
void tt_random_base62(char *out, size_t n);
/* A new API token "tt_" + 32 base62 characters (buf holds TT_TOKEN_LEN+1). */
void tt_token_new(char buf[TT_TOKEN_LEN + 1]);
/* Uniform random integer in [0, upper). */
uint32_t tt_random_uniform(uint32_t upper);
/* Keyed hash (BLAKE2b-256) of data under key; key may be NULL (unkeyed). */
void tt_hash(const uint8_t key[TT_KEY_BYTES], const void *data, size_t len, uint8_t out[TT_HASH_BYTES]);
/* Constant-time equality of n bytes: 1 when equal, else 0. */
int tt_equal_ct(const void *a, const void *b, size_t n);
/* Seals plaintext with a fresh nonce (secretbox): *out is malloc'd
 * nonce||ciphertext, *outlen its length. 0 or -ENOMEM. */
int tt_seal(const uint8_t key[TT_KEY_BYTES], const void *plain, size_t len, uint8_t **out, size_t *outlen);
/* Opens what tt_seal made: *out is malloc'd plaintext plus a NUL (not counted
 * in *outlen). 0, -EINVAL (forged or truncated) or -ENOMEM. */
int tt_unseal(const uint8_t key[TT_KEY_BYTES], const uint8_t *box, size_t len, uint8_t **out, size_t *outlen);
/* Loads the 32-byte key at path, or creates it (mode 0600) when missing.
 * 0, or a negative errno. */
int tt_key_load_or_create(const char *path, uint8_t key[TT_KEY_BYTES]);

#endif
