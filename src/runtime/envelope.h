/* envelope.h: the one message type actors exchange.
 *
 * An envelope carries a type id and a schema version chosen by the receiving
 * actor's protocol, a msgpack payload, a correlation id that a reply echoes,
 * and the mailbox a reply goes to. Ownership moves with the envelope: whoever
 * pops it frees it (or forwards it). */
#ifndef TT_RUNTIME_ENVELOPE_H
#define TT_RUNTIME_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

typedef struct rt_mailbox rt_mailbox;

typedef struct rt_envelope {
    uint16_t type;      /* message type id, defined by the receiver's protocol */
    uint16_t version;   /* payload schema version */
    uint32_t len;       /* payload length in bytes */
    uint64_t corr;      /* correlation id; a reply carries the request's */
    rt_mailbox *reply;  /* where the receiver answers, or NULL */
    char data[];        /* msgpack payload */
} rt_envelope;

/* Allocates an envelope and copies len bytes of payload (data may be NULL
 * when len is 0). Returns NULL when out of memory. */
rt_envelope *rt_envelope_new(uint16_t type, uint16_t version, const void *data, size_t len);
/* Allocates an envelope with room for len bytes of payload, left for the
 * caller to fill (saves a copy when the payload is assembled in place). */
rt_envelope *rt_envelope_alloc(uint16_t type, uint16_t version, size_t len);
void rt_envelope_free(rt_envelope *env);

#endif
