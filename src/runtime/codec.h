/* codec.h: schema-driven msgpack encoding of actor messages.
 *
 * A message is a C struct described by a table of fields. It is encoded as a
 * msgpack array in table order; decoding checks the array length and the
 * msgpack type of every field, so a wrongly typed payload is rejected, never
 * misread. Strings decode to malloc'd NUL-terminated copies (rt_codec_free
 * releases them); a NULL string encodes as msgpack nil when the field is
 * nullable (RT_F_NSTR), and nil decodes to NULL. */
#ifndef TT_RUNTIME_CODEC_H
#define TT_RUNTIME_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include "runtime/envelope.h"

typedef enum {
    RT_F_U64,   /* uint64_t: msgpack positive integer */
    RT_F_I64,   /* int64_t: msgpack integer (positive or negative) */
    RT_F_BOOL,  /* bool: msgpack boolean */
    RT_F_STR,   /* char *: msgpack str, never nil */
    RT_F_NSTR,  /* char *: msgpack str or nil */
    RT_F_BIN,   /* rt_bin: msgpack bin (or nil: ptr NULL, len 0) */
} rt_ftype;

typedef struct rt_bin {
    void *ptr;
    size_t len;
} rt_bin;

typedef struct rt_field {
    const char *name;
    rt_ftype type;
    size_t offset;
} rt_field;

typedef struct rt_schema {
    const char *name;
    const rt_field *fields;
    size_t nfields;
} rt_schema;

#define RT_FIELD(st, member, ftype) { #member, ftype, offsetof(st, member) }
#define RT_SCHEMA(nm, arr) { nm, arr, sizeof(arr) / sizeof((arr)[0]) }

/* Encodes *obj into a malloc'd buffer (*out, *outlen). 0 or -ENOMEM
 * (-EINVAL for a NULL in an RT_F_STR field: a caller's bug, not nil). */
int rt_codec_encode(const rt_schema *s, const void *obj, char **out, size_t *outlen);
/* Decodes buf into *obj (which it zeroes first). 0, or -EINVAL when the
 * payload is not an array of exactly the schema's fields with their types;
 * on error nothing is left allocated in *obj. */
int rt_codec_decode(const rt_schema *s, const void *buf, size_t len, void *obj);
/* Frees the strings and bins of a decoded object and zeroes those fields. */
void rt_codec_free(const rt_schema *s, void *obj);

/* Convenience: encode obj and wrap it in a new envelope. NULL on ENOMEM
 * (or on the -EINVAL above). */
rt_envelope *rt_codec_envelope(uint16_t type, uint16_t version, const rt_schema *s, const void *obj);
/* Convenience: decode an envelope's payload, checking its version too. */
int rt_codec_decode_env(const rt_schema *s, uint16_t version, const rt_envelope *env, void *obj);

#endif
