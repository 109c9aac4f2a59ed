/* envelope.c: allocation of the one message type actors exchange.
 *
 * An envelope is a single malloc'd block: the fixed header followed by its
 * msgpack payload, so whoever ends up owning it releases it with one free. */
#include "runtime/envelope.h"

#include <stdlib.h>
#include <string.h>

rt_envelope *rt_envelope_alloc(uint16_t type, uint16_t version, size_t len)
{
    rt_envelope *env;

    if (len > UINT32_MAX)
        return NULL;
    env = malloc(offsetof(rt_envelope, data) + len);
    if (env == NULL)
        return NULL;
    env->type = type;
    env->version = version;
    env->len = (uint32_t)len;
    env->corr = 0;
    env->reply = NULL;
    return env;
}

rt_envelope *rt_envelope_new(uint16_t type, uint16_t version, const void *data, size_t len)
{
    rt_envelope *env;

    if (len > 0 && data == NULL)
        return NULL;
    env = rt_envelope_alloc(type, version, len);
    if (env != NULL && len > 0)
        memcpy(env->data, data, len);
    return env;
}

void rt_envelope_free(rt_envelope *env)
{
    free(env);
}
