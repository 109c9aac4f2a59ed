/* test_codec.c: the schema codec round-trips every field type and rejects,
 * without crashing or leaking, every payload that is not exactly the
 * schema: wrong msgpack types, wrong array lengths, truncations, nil where
 * not nullable, hostile length headers and random garbage. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <msgpack.h>

#include "runtime/codec.h"
#include "rt_check.h"

typedef struct msg {
    uint64_t id;
    int64_t delta;
    bool flag;
    char *name;
    char *note;
    rt_bin blob;
} msg;

static const rt_field msg_fields[] = {
    RT_FIELD(msg, id, RT_F_U64),
    RT_FIELD(msg, delta, RT_F_I64),
    RT_FIELD(msg, flag, RT_F_BOOL),
    RT_FIELD(msg, name, RT_F_STR),
    RT_FIELD(msg, note, RT_F_NSTR),
    RT_FIELD(msg, blob, RT_F_BIN),
};
static const rt_schema msg_schema = RT_SCHEMA("msg", msg_fields);

/* True when every pointer field of m is NULL (what a failed decode leaves). */
static bool msg_is_clear(const msg *m)
{
    return m->id == 0 && m->delta == 0 && !m->flag && m->name == NULL &&
           m->note == NULL && m->blob.ptr == NULL && m->blob.len == 0;
}

static void test_round_trip(void)
{
    static const unsigned char bytes[] = { 0, 1, 2, 0xff, 0 };
    const int64_t deltas[] = { 0, -1, 1, INT64_MIN, INT64_MAX, -32, -33, 127, 128 };
    const uint64_t ids[] = { 0, 1, 127, 128, 255, 65535, 65536, UINT32_MAX, UINT64_MAX };

    for (size_t i = 0; i < sizeof deltas / sizeof deltas[0]; i++) {
        msg in = { ids[i], deltas[i], i % 2 == 0, "h\xc3\xa9llo", NULL,
                   { (void *)bytes, sizeof bytes } }, out;
        char *buf = NULL;
        size_t len = 0;

        if (i % 3 == 1)
            in.note = "";
        if (i % 3 == 2)
            in.note = "a note";
        RT_CHECK_EQ(rt_codec_encode(&msg_schema, &in, &buf, &len), 0);
        memset(&out, 0xab, sizeof out);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, buf, len, &out), 0);
        RT_CHECK(out.id == in.id);
        RT_CHECK(out.delta == in.delta);
        RT_CHECK(out.flag == in.flag);
        RT_CHECK(out.name != NULL && strcmp(out.name, in.name) == 0);
        if (in.note == NULL)
            RT_CHECK(out.note == NULL);
        else
            RT_CHECK(out.note != NULL && strcmp(out.note, in.note) == 0);
        RT_CHECK(out.blob.len == sizeof bytes && memcmp(out.blob.ptr, bytes, sizeof bytes) == 0);
        rt_codec_free(&msg_schema, &out);
        RT_CHECK(out.name == NULL && out.note == NULL && out.blob.ptr == NULL && out.blob.len == 0);
        free(buf);
    }

    /* Bins: NULL is nil and comes back NULL; empty stays distinct from nil. */
    {
        msg in = { 1, 2, true, "", NULL, { NULL, 0 } }, out;
        char *buf;
        size_t len;

        RT_CHECK_EQ(rt_codec_encode(&msg_schema, &in, &buf, &len), 0);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, buf, len, &out), 0);
        RT_CHECK(out.blob.ptr == NULL && out.blob.len == 0);
        RT_CHECK(out.name != NULL && out.name[0] == '\0');
        rt_codec_free(&msg_schema, &out);
        free(buf);

        in.blob.ptr = "";
        RT_CHECK_EQ(rt_codec_encode(&msg_schema, &in, &buf, &len), 0);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, buf, len, &out), 0);
        RT_CHECK(out.blob.ptr != NULL && out.blob.len == 0);
        rt_codec_free(&msg_schema, &out);
        free(buf);
    }

    /* A long string (str16/str32 headers) and a long bin. */
    {
        size_t n = 100000;
        char *big = malloc(n + 1);
        msg in = { 1, 2, true, big, big, { big, n } }, out;
        char *buf;
        size_t len;

        memset(big, 'x', n);
        big[n] = '\0';
        RT_CHECK_EQ(rt_codec_encode(&msg_schema, &in, &buf, &len), 0);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, buf, len, &out), 0);
        RT_CHECK(out.name != NULL && strlen(out.name) == n);
        RT_CHECK(out.note != NULL && strcmp(out.note, big) == 0);
        RT_CHECK(out.blob.len == n && memcmp(out.blob.ptr, big, n) == 0);
        rt_codec_free(&msg_schema, &out);
        free(buf);
        free(big);
    }
}

static void test_envelope(void)
{
    msg in = { 42, -7, true, "name", "note", { "ab", 2 } }, out;
    rt_envelope *env = rt_codec_envelope(9, 3, &msg_schema, &in);

    RT_CHECK(env != NULL);
    if (env == NULL)
        return;
    RT_CHECK_EQ(env->type, 9);
    RT_CHECK_EQ(env->version, 3);
    RT_CHECK_EQ(env->corr, 0);
    RT_CHECK(env->reply == NULL);
    RT_CHECK(env->len > 0);
    RT_CHECK_EQ(rt_codec_decode_env(&msg_schema, 3, env, &out), 0);
    RT_CHECK(out.id == 42 && out.delta == -7 && out.flag);
    RT_CHECK(strcmp(out.name, "name") == 0 && strcmp(out.note, "note") == 0);
    rt_codec_free(&msg_schema, &out);
    /* The wrong version is refused and leaves nothing allocated. */
    RT_CHECK_EQ(rt_codec_decode_env(&msg_schema, 4, env, &out), -EINVAL);
    RT_CHECK(msg_is_clear(&out));
    rt_envelope_free(env);

    /* A NULL in a non-nullable string cannot be encoded. */
    in.name = NULL;
    RT_CHECK(rt_codec_envelope(9, 3, &msg_schema, &in) == NULL);
    {
        char *buf = NULL;
        size_t len = 0;
        RT_CHECK_EQ(rt_codec_encode(&msg_schema, &in, &buf, &len), -EINVAL);
    }

    /* Plain envelopes. */
    env = rt_envelope_new(1, 2, "xyz", 3);
    RT_CHECK(env != NULL && env->len == 3 && memcmp(env->data, "xyz", 3) == 0);
    RT_CHECK(env != NULL && env->corr == 0 && env->reply == NULL);
    rt_envelope_free(env);
    env = rt_envelope_new(1, 2, NULL, 0);
    RT_CHECK(env != NULL && env->len == 0);
    rt_envelope_free(env);
}

/* ---- hand-built payloads ------------------------------------------------ */

/* What to put in one field of a hand-built payload. */
typedef enum { V_U, V_NEG, V_TRUE, V_NIL, V_STR, V_BIN, V_FLOAT, V_ARRAY, V_MAP,
               V_STR_NUL, V_U_HUGE } vkind;

static void pack_value(msgpack_packer *pk, vkind k)
{
    switch (k) {
    case V_U: msgpack_pack_uint64(pk, 5); break;
    case V_U_HUGE: msgpack_pack_uint64(pk, UINT64_MAX); break;
    case V_NEG: msgpack_pack_int64(pk, -5); break;
    case V_TRUE: msgpack_pack_true(pk); break;
    case V_NIL: msgpack_pack_nil(pk); break;
    case V_STR: msgpack_pack_str(pk, 3); msgpack_pack_str_body(pk, "abc", 3); break;
    case V_STR_NUL: msgpack_pack_str(pk, 3); msgpack_pack_str_body(pk, "a\0c", 3); break;
    case V_BIN: msgpack_pack_bin(pk, 2); msgpack_pack_bin_body(pk, "\x01\x02", 2); break;
    case V_FLOAT: msgpack_pack_double(pk, 1.5); break;
    case V_ARRAY: msgpack_pack_array(pk, 1); msgpack_pack_uint64(pk, 1); break;
    case V_MAP: msgpack_pack_map(pk, 1); msgpack_pack_uint64(pk, 1); msgpack_pack_uint64(pk, 2); break;
    }
}

/* Decodes an array of n hand-picked values; returns the decode result and
 * checks that a failure leaves the object clear. */
static int decode_values(const vkind *v, size_t n)
{
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msg out;
    int rc;

    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, n);
    for (size_t i = 0; i < n; i++)
        pack_value(&pk, v[i]);
    memset(&out, 0x5a, sizeof out);
    rc = rt_codec_decode(&msg_schema, sb.data, sb.size, &out);
    if (rc == 0)
        rt_codec_free(&msg_schema, &out);
    else
        RT_CHECK(msg_is_clear(&out));
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

static void test_wrong_types(void)
{
    /* The good shape: u64, i64, bool, str, nstr, bin. */
    const vkind good[6] = { V_U, V_NEG, V_TRUE, V_STR, V_STR, V_BIN };
    /* For each field, values of the wrong msgpack type. */
    static const vkind bad[6][8] = {
        { V_NEG, V_TRUE, V_NIL, V_STR, V_BIN, V_FLOAT, V_ARRAY, V_MAP },
        { V_U_HUGE, V_TRUE, V_NIL, V_STR, V_BIN, V_FLOAT, V_ARRAY, V_MAP },
        { V_U, V_NEG, V_NIL, V_STR, V_BIN, V_FLOAT, V_ARRAY, V_MAP },
        { V_U, V_NEG, V_TRUE, V_NIL, V_BIN, V_FLOAT, V_STR_NUL, V_MAP },
        { V_U, V_NEG, V_TRUE, V_ARRAY, V_BIN, V_FLOAT, V_STR_NUL, V_MAP },
        { V_U, V_NEG, V_TRUE, V_STR, V_ARRAY, V_FLOAT, V_MAP, V_STR },
    };
    vkind v[8];

    RT_CHECK_EQ(decode_values(good, 6), 0);
    /* Nullable fields take nil; u64 given to i64 is fine. */
    memcpy(v, good, sizeof good);
    v[4] = V_NIL;
    v[5] = V_NIL;
    v[1] = V_U;
    RT_CHECK_EQ(decode_values(v, 6), 0);

    for (size_t f = 0; f < 6; f++) {
        for (size_t b = 0; b < 8; b++) {
            memcpy(v, good, sizeof good);
            v[f] = bad[f][b];
            int rc = decode_values(v, 6);

            if (rc != -EINVAL)
                fprintf(stderr, "field %zu: bad value %zu gave %d\n", f, b, rc);
            RT_CHECK_EQ(rc, -EINVAL);
        }
    }

    /* Wrong array lengths: fewer and more fields. */
    memcpy(v, good, sizeof good);
    v[6] = V_U;
    v[7] = V_U;
    for (size_t n = 0; n <= 8; n++)
        if (n != 6)
            RT_CHECK_EQ(decode_values(v, n), -EINVAL);
}

static void test_malformed(void)
{
    msg in = { 99, -99, true, "some name", "a note", { "blob", 4 } }, out;
    char *buf;
    size_t len;

    RT_CHECK_EQ(rt_codec_encode(&msg_schema, &in, &buf, &len), 0);

    /* Every truncation fails cleanly. */
    for (size_t n = 0; n < len; n++) {
        memset(&out, 0x77, sizeof out);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, buf, n, &out), -EINVAL);
        RT_CHECK(msg_is_clear(&out));
    }
    /* Trailing bytes after the array. */
    {
        char *longer = malloc(len + 1);
        memcpy(longer, buf, len);
        longer[len] = (char)0xc0;
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, longer, len + 1, &out), -EINVAL);
        RT_CHECK(msg_is_clear(&out));
        free(longer);
    }
    RT_CHECK_EQ(rt_codec_decode(&msg_schema, NULL, 0, &out), -EINVAL);

    /* Hostile headers: an array, a string and a bin claiming far more than
     * the input holds must be refused before anything is allocated. */
    {
        static const unsigned char arr32[] = { 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01 };
        static const unsigned char arr6_str32[] = { 0x96, 0x01, 0x01, 0xc3, 0xdb, 0xff, 0xff, 0xff, 0xf0, 'a' };
        static const unsigned char arr6_bin32[] = { 0x96, 0x01, 0x01, 0xc3, 0xa1, 'a', 0xc0, 0xc6, 0x7f, 0xff, 0xff, 0xff };
        static const unsigned char arr6_nested[] = { 0x96, 0x01, 0x01, 0xc3, 0xa1, 'a', 0xc0, 0xdd, 0xff, 0xff, 0xff, 0xff };
        static const unsigned char map[] = { 0x81, 0x01, 0x02 };
        static const unsigned char never_used[] = { 0x96, 0xc1, 0x01, 0xc3, 0xa1, 'a', 0xc0, 0xc0 };
        static const unsigned char ext[] = { 0x96, 0xd4, 0x01, 0x00, 0x01, 0xc3, 0xa1, 'a', 0xc0, 0xc0 };

        RT_CHECK_EQ(rt_codec_decode(&msg_schema, arr32, sizeof arr32, &out), -EINVAL);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, arr6_str32, sizeof arr6_str32, &out), -EINVAL);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, arr6_bin32, sizeof arr6_bin32, &out), -EINVAL);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, arr6_nested, sizeof arr6_nested, &out), -EINVAL);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, map, sizeof map, &out), -EINVAL);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, never_used, sizeof never_used, &out), -EINVAL);
        RT_CHECK_EQ(rt_codec_decode(&msg_schema, ext, sizeof ext, &out), -EINVAL);
        RT_CHECK(msg_is_clear(&out));
    }

    /* Random corruption of a valid payload: never a crash or a leak; a
     * payload that still decodes is well formed and is freed. */
    {
        unsigned int seed = 12345;
        char *copy = malloc(len);
        int accepted = 0;

        for (int iter = 0; iter < 200000; iter++) {
            size_t flips = 1 + (size_t)(rand_r(&seed) % 3);

            memcpy(copy, buf, len);
            for (size_t k = 0; k < flips; k++)
                copy[(size_t)rand_r(&seed) % len] = (char)(rand_r(&seed) & 0xff);
            if (rt_codec_decode(&msg_schema, copy, (size_t)rand_r(&seed) % (len + 1), &out) == 0) {
                accepted++;
                RT_CHECK(out.name != NULL);
                rt_codec_free(&msg_schema, &out);
            } else {
                RT_CHECK(msg_is_clear(&out));
            }
        }
        fprintf(stderr, "fuzz: %d of 200000 corrupted payloads still well formed\n", accepted);
        free(copy);
    }
    free(buf);
}

int main(void)
{
    test_round_trip();
    test_envelope();
    test_wrong_types();
    test_malformed();
    return rt_check_finish("test_codec");
}
