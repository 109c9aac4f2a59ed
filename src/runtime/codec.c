/* codec.c: schema-driven msgpack encoding and checked decoding of messages.
 *
 * Encoding walks the schema's field table and packs a msgpack array with
 * msgpack-c's packer, writing straight into a growable buffer (for an
 * envelope, the buffer starts with room for the envelope header, so the
 * payload is never copied a second time).
 *
 * Decoding is in two steps. A shape check first walks the raw bytes: the
 * input must be one array of exactly nfields elements, each a scalar, string
 * or binary whose declared length fits in what is left of the input, and
 * nothing may follow the array. Only then does msgpack-c unpack it, so a
 * hostile header (an array or string claiming four billion elements in five
 * bytes) can never make the unpacker allocate more than the input's size.
 * Then every field's msgpack type is checked against the schema; on any
 * mismatch every string or bin already copied is freed again. */
#include "runtime/codec.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <msgpack.h>

/* ---- encoding ---------------------------------------------------------- */

/* A growable output buffer for msgpack_packer. */
typedef struct codec_buf {
    char *p;
    size_t len;
    size_t cap;
} codec_buf;

static int codec_buf_write(void *data, const char *b, size_t n)
{
    codec_buf *cb = data;

    if (n > cb->cap - cb->len) {
        size_t cap = cb->cap ? cb->cap : 64;
        char *np;

        while (n > cap - cb->len) {
            if (cap > SIZE_MAX / 2)
                return -1;
            cap *= 2;
        }
        np = realloc(cb->p, cap);
        if (np == NULL)
            return -1;
        cb->p = np;
        cb->cap = cap;
    }
    memcpy(cb->p + cb->len, b, n);
    cb->len += n;
    return 0;
}

/* Packs *obj as described by s. 0, -EINVAL (a NULL in a non-nullable
 * string field, or a string or bin longer than msgpack's 32-bit lengths),
 * or -ENOMEM (the writer failed). */
static int codec_pack(const rt_schema *s, const void *obj, msgpack_packer *pk)
{
    const char *base = obj;

    if (msgpack_pack_array(pk, s->nfields) != 0)
        return -ENOMEM;
    for (size_t i = 0; i < s->nfields; i++) {
        const rt_field *f = &s->fields[i];
        const void *at = base + f->offset;
        int rc = 0;

        switch (f->type) {
        case RT_F_U64: {
            uint64_t v;
            memcpy(&v, at, sizeof v);
            rc = msgpack_pack_uint64(pk, v);
            break;
        }
        case RT_F_I64: {
            int64_t v;
            memcpy(&v, at, sizeof v);
            rc = msgpack_pack_int64(pk, v);
            break;
        }
        case RT_F_BOOL: {
            bool v;
            memcpy(&v, at, sizeof v);
            rc = v ? msgpack_pack_true(pk) : msgpack_pack_false(pk);
            break;
        }
        case RT_F_STR:
        case RT_F_NSTR: {
            const char *str;
            size_t n;
            memcpy(&str, at, sizeof str);
            if (str == NULL) {
                if (f->type == RT_F_STR)
                    return -EINVAL;
                rc = msgpack_pack_nil(pk);
                break;
            }
            n = strlen(str);
            if (n > UINT32_MAX)
                return -EINVAL;
            rc = msgpack_pack_str(pk, n);
            if (rc == 0)
                rc = msgpack_pack_str_body(pk, str, n);
            break;
        }
        case RT_F_BIN: {
            rt_bin b;
            memcpy(&b, at, sizeof b);
            if (b.ptr == NULL) {
                rc = msgpack_pack_nil(pk);
                break;
            }
            if (b.len > UINT32_MAX)
                return -EINVAL;
            rc = msgpack_pack_bin(pk, b.len);
            if (rc == 0)
                rc = msgpack_pack_bin_body(pk, b.ptr, b.len);
            break;
        }
        default:
            return -EINVAL;
        }
        if (rc != 0)
            return -ENOMEM;
    }
    return 0;
}

/* Encodes into a new buffer that starts with `reserve` unused bytes. */
static int codec_encode_reserved(const rt_schema *s, const void *obj, size_t reserve,
                                 codec_buf *cb)
{
    msgpack_packer pk;
    int rc;

    cb->p = NULL;
    cb->len = 0;
    cb->cap = 0;
    if (reserve > 0) {
        cb->cap = reserve + 64;
        cb->p = malloc(cb->cap);
        if (cb->p == NULL)
            return -ENOMEM;
        cb->len = reserve;
    }
    msgpack_packer_init(&pk, cb, codec_buf_write);
    rc = codec_pack(s, obj, &pk);
    if (rc != 0) {
        free(cb->p);
        cb->p = NULL;
    }
    return rc;
}

int rt_codec_encode(const rt_schema *s, const void *obj, char **out, size_t *outlen)
{
    codec_buf cb;
    int rc = codec_encode_reserved(s, obj, 0, &cb);

    if (rc != 0)
        return rc;
    *out = cb.p;
    *outlen = cb.len;
    return 0;
}

rt_envelope *rt_codec_envelope(uint16_t type, uint16_t version, const rt_schema *s, const void *obj)
{
    const size_t hdr = offsetof(rt_envelope, data);
    codec_buf cb;
    rt_envelope *env;

    if (codec_encode_reserved(s, obj, hdr, &cb) != 0)
        return NULL;
    if (cb.len - hdr > UINT32_MAX) {
        free(cb.p);
        return NULL;
    }
    env = (rt_envelope *)(void *)cb.p;
    env->type = type;
    env->version = version;
    env->len = (uint32_t)(cb.len - hdr);
    env->corr = 0;
    env->reply = NULL;
    return env;
}

/* ---- shape check ------------------------------------------------------- */

/* Reads a big-endian unsigned of n bytes (1, 2 or 4) at p. */
static uint32_t codec_be(const unsigned char *p, size_t n)
{
    uint32_t v = 0;

    for (size_t i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Skips one non-container msgpack value at buf[*off]. 0, or -EINVAL when it
 * is truncated, is a container or extension, or is the never-used 0xc1. */
static int codec_skip_scalar(const unsigned char *buf, size_t len, size_t *off)
{
    size_t left = len - *off, need = 0;
    unsigned char b;

    if (left < 1)
        return -EINVAL;
    b = buf[*off];
    left--;
    if (b <= 0x7f || b >= 0xe0 || (b >= 0xc0 && b <= 0xc3 && b != 0xc1)) {
        need = 0;                               /* fixint, nil, bool */
    } else if (b >= 0xa0 && b <= 0xbf) {
        need = b & 0x1f;                        /* fixstr */
    } else {
        size_t hdr = 0;                         /* length bytes of a str/bin */

        switch (b) {
        case 0xcc: case 0xd0: need = 1; break;  /* 8-bit ints */
        case 0xcd: case 0xd1: need = 2; break;
        case 0xca: case 0xce: case 0xd2: need = 4; break;
        case 0xcb: case 0xcf: case 0xd3: need = 8; break;
        case 0xc4: case 0xd9: hdr = 1; break;   /* bin8, str8 */
        case 0xc5: case 0xda: hdr = 2; break;   /* bin16, str16 */
        case 0xc6: case 0xdb: hdr = 4; break;   /* bin32, str32 */
        default:
            return -EINVAL;     /* map, array, ext, 0xc1: no field is one */
        }
        if (hdr > 0) {
            if (left < hdr)
                return -EINVAL;
            need = hdr + codec_be(buf + *off + 1, hdr);
        }
    }
    if (need > left)
        return -EINVAL;
    *off += 1 + need;
    return 0;
}

/* Checks that buf is exactly one array of nfields scalars/strings/bins. */
static int codec_check_shape(const unsigned char *buf, size_t len, size_t nfields)
{
    size_t off, count;

    if (len < 1)
        return -EINVAL;
    if (buf[0] >= 0x90 && buf[0] <= 0x9f) {
        count = buf[0] & 0x0f;
        off = 1;
    } else if (buf[0] == 0xdc && len >= 3) {
        count = codec_be(buf + 1, 2);
        off = 3;
    } else if (buf[0] == 0xdd && len >= 5) {
        count = codec_be(buf + 1, 4);
        off = 5;
    } else {
        return -EINVAL;
    }
    if (count != nfields)
        return -EINVAL;
    for (size_t i = 0; i < count; i++)
        if (codec_skip_scalar(buf, len, &off) != 0)
            return -EINVAL;
    return off == len ? 0 : -EINVAL;
}

/* ---- decoding ---------------------------------------------------------- */

static void codec_zero_field(const rt_field *f, char *at)
{
    switch (f->type) {
    case RT_F_U64: memset(at, 0, sizeof(uint64_t)); break;
    case RT_F_I64: memset(at, 0, sizeof(int64_t)); break;
    case RT_F_BOOL: memset(at, 0, sizeof(bool)); break;
    case RT_F_STR:
    case RT_F_NSTR: { char *nul = NULL; memcpy(at, &nul, sizeof nul); break; }
    case RT_F_BIN: { rt_bin z = { NULL, 0 }; memcpy(at, &z, sizeof z); break; }
    }
}

/* Decodes one field from o into at. 0, -EINVAL or -ENOMEM. */
static int codec_field(const rt_field *f, const msgpack_object *o, char *at)
{
    switch (f->type) {
    case RT_F_U64:
        if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            return -EINVAL;
        memcpy(at, &o->via.u64, sizeof(uint64_t));
        return 0;
    case RT_F_I64: {
        int64_t v;
        if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            if (o->via.u64 > (uint64_t)INT64_MAX)
                return -EINVAL;
            v = (int64_t)o->via.u64;
        } else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
            v = o->via.i64;
        } else {
            return -EINVAL;
        }
        memcpy(at, &v, sizeof v);
        return 0;
    }
    case RT_F_BOOL:
        if (o->type != MSGPACK_OBJECT_BOOLEAN)
            return -EINVAL;
        memcpy(at, &o->via.boolean, sizeof(bool));
        return 0;
    case RT_F_STR:
    case RT_F_NSTR: {
        char *str;
        if (o->type == MSGPACK_OBJECT_NIL && f->type == RT_F_NSTR)
            return 0;                   /* already NULL */
        if (o->type != MSGPACK_OBJECT_STR)
            return -EINVAL;
        /* An embedded NUL would make the C string silently shorter than the
         * value sent: reject instead of misreading. */
        if (o->via.str.size > 0 && memchr(o->via.str.ptr, 0, o->via.str.size) != NULL)
            return -EINVAL;
        str = malloc((size_t)o->via.str.size + 1);
        if (str == NULL)
            return -ENOMEM;
        if (o->via.str.size > 0)
            memcpy(str, o->via.str.ptr, o->via.str.size);
        str[o->via.str.size] = '\0';
        memcpy(at, &str, sizeof str);
        return 0;
    }
    case RT_F_BIN: {
        rt_bin b = { NULL, 0 };
        if (o->type == MSGPACK_OBJECT_NIL)
            return 0;
        if (o->type != MSGPACK_OBJECT_BIN)
            return -EINVAL;
        /* An empty bin still gets a pointer, so it stays distinct from nil. */
        b.ptr = malloc(o->via.bin.size ? o->via.bin.size : 1);
        if (b.ptr == NULL)
            return -ENOMEM;
        if (o->via.bin.size > 0)
            memcpy(b.ptr, o->via.bin.ptr, o->via.bin.size);
        b.len = o->via.bin.size;
        memcpy(at, &b, sizeof b);
        return 0;
    }
    }
    return -EINVAL;
}

/* Each thread decodes into a zone of its own, cleared after each use, so a
 * decode allocates nothing but the fields it copies out (a new 8 KiB zone
 * per decode made malloc consolidate its free lists on every message). */
static pthread_key_t zone_key;
static pthread_once_t zone_once = PTHREAD_ONCE_INIT;

static void zone_destroy(void *z) { msgpack_zone_free(z); }
static void zone_key_init(void) { pthread_key_create(&zone_key, zone_destroy); }

static msgpack_zone *thread_zone(void)
{
    pthread_once(&zone_once, zone_key_init);
    msgpack_zone *z = pthread_getspecific(zone_key);
    if (z == NULL) {
        z = msgpack_zone_new(4096);
        if (z != NULL && pthread_setspecific(zone_key, z) != 0) {
            msgpack_zone_free(z);
            z = NULL;
        }
    }
    return z;
}

int rt_codec_decode(const rt_schema *s, const void *buf, size_t len, void *obj)
{
    char *base = obj;
    msgpack_unpacked up;
    size_t off = 0;
    int rc = 0;
    msgpack_zone *zone;

    for (size_t i = 0; i < s->nfields; i++)
        codec_zero_field(&s->fields[i], base + s->fields[i].offset);
    if (buf == NULL || codec_check_shape(buf, len, s->nfields) != 0)
        return -EINVAL;

    zone = thread_zone();
    if (zone == NULL)
        return -ENOMEM;
    up.zone = NULL;
    switch (msgpack_unpack(buf, len, &off, zone, &up.data)) {
    case MSGPACK_UNPACK_SUCCESS:
        break;
    case MSGPACK_UNPACK_NOMEM_ERROR:
        rc = -ENOMEM;
        goto out;
    default:
        rc = -EINVAL;
        goto out;
    }
    /* The shape check already proved these; kept so that this function does
     * not depend on the two parsers agreeing. */
    if (off != len || up.data.type != MSGPACK_OBJECT_ARRAY ||
        up.data.via.array.size != s->nfields) {
        rc = -EINVAL;
        goto out;
    }
    for (size_t i = 0; i < s->nfields; i++) {
        const rt_field *f = &s->fields[i];

        rc = codec_field(f, &up.data.via.array.ptr[i], base + f->offset);
        if (rc != 0)
            break;
    }
    if (rc != 0) {
        /* Leave the object as it started: nothing allocated, all zero. */
        rt_codec_free(s, obj);
        for (size_t i = 0; i < s->nfields; i++)
            codec_zero_field(&s->fields[i], base + s->fields[i].offset);
    }
out:
    msgpack_zone_clear(zone);
    return rc;
}

int rt_codec_decode_env(const rt_schema *s, uint16_t version, const rt_envelope *env, void *obj)
{
    if (env == NULL || env->version != version) {
        /* Zero the object anyway, as rt_codec_decode promises. */
        for (size_t i = 0; i < s->nfields; i++)
            codec_zero_field(&s->fields[i], (char *)obj + s->fields[i].offset);
        return -EINVAL;
    }
    return rt_codec_decode(s, env->data, env->len, obj);
}

void rt_codec_free(const rt_schema *s, void *obj)
{
    char *base = obj;

    for (size_t i = 0; i < s->nfields; i++) {
        const rt_field *f = &s->fields[i];
        char *at = base + f->offset;

        if (f->type == RT_F_STR || f->type == RT_F_NSTR) {
            char *str;
            memcpy(&str, at, sizeof str);
            free(str);
            codec_zero_field(f, at);
        } else if (f->type == RT_F_BIN) {
            rt_bin b;
            memcpy(&b, at, sizeof b);
            free(b.ptr);
            codec_zero_field(f, at);
        }
    }
}
