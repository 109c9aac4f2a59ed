/* proto.h: the message types actors exchange, and their payload schemas.
 *
 * Every envelope's type id is one of these; each actor's dispatch switches on
 * it. Payloads are msgpack arrays described by rt_schema tables (decoding
 * checks every field's type). Replies to an HTTP thread carry the request's
 * correlation id. */
#ifndef TT_ACTORS_PROTO_H
#define TT_ACTORS_PROTO_H

#include <stdbool.h>
#include <stdint.h>
#include "runtime/actor.h"
#include "runtime/codec.h"
#include "store/store.h"

enum {
    /* replies to an HTTP thread */
    REPLY_MESSAGE = 1,      /* msg_rec */
    REPLY_DEVICE = 2,       /* dev_reply */
    REPLY_PROBLEM = 3,      /* problem */
    REPLY_OK = 4,           /* no payload */
    REPLY_STORE_FAILED = 5, /* the write could not be made durable */
    REPLY_PIN = 6,          /* pin_rec */
    REPLY_BATCH = 7,        /* batch results, see router.c */
    REPLY_OTP = 8,          /* otp_reply */
    REPLY_VERIFY = 9,       /* verify_reply */
    REPLY_TOKEN = 10,       /* token_reply */

    /* persist */
    PERSIST_WRITE = 100,    /* ops + posts, see persist.h */
    PERSIST_RETRY = 101,    /* timer: retry deferred posts */

    /* router */
    ROUTER_SUBMIT = 200,    /* submit */
    ROUTER_DEVICE_CREATE = 201, /* device_create */
    ROUTER_PIN_OP = 202,    /* pin_op */
    ROUTER_PIN_INBOUND = 203, /* pin_op (op PIN_INBOUND): an inbound SMS from an unpinned number */
    ROUTER_DEVICE_PATCH = 204, /* device_patch */
    ROUTER_DEVICE_DELETE = 205, /* device_patch (only ids) */
    ROUTER_DEVICE_ROTATE = 206, /* device_patch (only ids) */
    ROUTER_BATCH = 207,     /* array of submit payloads (bin) */
    ROUTER_TOKEN_CREATE = 208, /* token_op */
    ROUTER_TOKEN_DELETE = 209, /* token_op */
    ROUTER_TICK = 210,      /* timer: flush token last-use times */
    ROUTER_PERSISTED = 211, /* its last write is on disk (or failed) */
    ROUTER_FLUSH = 212,     /* timer: send the gathered writes again */

    /* otp */
    OTP_SEND = 400,         /* otp_send */
    OTP_VERIFY = 401,       /* otp_verify */

    /* device */
    DEV_MESSAGE = 300,      /* msg_rec: a new message committed for this device */
    DEV_MQTT = 301,         /* dev_mqtt: a packet from the device */
    DEV_LINK = 302,         /* dev_link: the link went up or down */
    DEV_TICK = 303,         /* timer */
    DEV_PERSISTED = 304,    /* its last write is on disk */
    DEV_PERSIST_FAILED = 305,
    DEV_START = 306,        /* load backlog, subscribe */
    DEV_PIN_PUBLISH = 308,  /* dev_text: a P/pins payload to publish */
    DEV_DELETE = 309,       /* the device was deleted: fail its messages, then reply */
    DEV_KICK = 310,         /* credentials rotated: the device is offline until it reconnects */
    DEV_CANCEL = 311,       /* dev_cancel */
};

#define PROTO_V1 1

typedef struct problem {
    uint64_t status;
    char *code;
    char *detail;
    uint64_t retry_after;  /* seconds for a Retry-After header; 0: none */
} problem;
extern const rt_schema problem_schema;

typedef struct submit {
    uint64_t account_id;
    uint64_t device_id;   /* 0: route automatically */
    bool direct;          /* POST /devices/{id}/messages */
    bool force;
    char *to;
    char *text;
    uint64_t priority;
    int64_t ttl_s;
    uint64_t encoding;
    uint64_t segments;
    char *idem_key;       /* Idempotency-Key, or NULL */
    uint64_t idem_route;
    rt_bin idem_hash;     /* hash of the request body as parsed JSON */
    bool idem_failures_only; /* the caller stores the success response itself (OTP) */
    rt_bin sealed;        /* OTP: the real text sealed; `text` is the masked one */
} submit;
extern const rt_schema submit_schema;

typedef struct device_create {
    uint64_t account_id;
    char *name;
    uint64_t rate_per_minute;
} device_create;
extern const rt_schema device_create_schema;

/* A device record plus, once only, its plaintext MQTT password. */
typedef struct dev_reply {
    uint64_t id;
    uint64_t account_id;
    char *name;
    uint64_t rate_per_minute;
    int64_t created_at;
    char *password;       /* NULL except on create / rotation */
} dev_reply;
extern const rt_schema dev_reply_schema;

enum { MQ_STATUS = 0, MQ_REPORT = 1, MQ_INBOUND = 2 };
typedef struct dev_mqtt {
    uint64_t kind;
    rt_bin payload;
} dev_mqtt;
extern const rt_schema dev_mqtt_schema;

typedef struct dev_link {
    bool up;
} dev_link;
extern const rt_schema dev_link_schema;

enum { PIN_RESET_ONE = 0, PIN_RESET_ALL = 1, PIN_EDIT = 2, PIN_REGENERATE = 3, PIN_INBOUND = 4 };
typedef struct pin_op {
    uint64_t account_id;
    uint64_t device_id;
    uint64_t op;
    char *number;         /* normalised; NULL for PIN_RESET_ALL */
    char *safe_word;      /* PIN_EDIT */
} pin_op;
extern const rt_schema pin_op_schema;

typedef struct device_patch {
    uint64_t account_id;
    uint64_t device_id;
    char *name;           /* NULL: unchanged */
    uint64_t rate_per_minute; /* 0: unchanged */
} device_patch;
extern const rt_schema device_patch_schema;

typedef struct dev_text {
    char *text;
} dev_text;
extern const rt_schema dev_text_schema;

/* Where a device actor sends the HTTP reply of a request it finishes. */
typedef struct dev_reply_to {
    uint64_t mailbox;     /* rt_mailbox pointer */
    uint64_t corr;
} dev_reply_to;
extern const rt_schema dev_reply_to_schema;

typedef struct dev_cancel {
    uint64_t account_id;
    uint64_t message_id;
} dev_cancel;
extern const rt_schema dev_cancel_schema;

/* Idempotency: what a request's first response was (API.md 1). Stored under
 * X account route key, in the same commit as what the request created. */
enum { IDEM_MESSAGES = 1, IDEM_DEVICE_MESSAGES = 2, IDEM_BATCH = 3, IDEM_OTP = 4 };
typedef struct idem_rec {
    uint64_t v;
    rt_bin hash;
    uint64_t status;
    uint64_t reply_type;  /* REPLY_MESSAGE, REPLY_PROBLEM, REPLY_BATCH, ... */
    rt_bin payload;
    int64_t created_at;
} idem_rec;
extern const rt_schema idem_schema;
#define IDEM_TTL_MS (24LL * 3600 * 1000)
#define IDEM_KEY_MAX (10 + 255)
size_t key_idem(uint8_t *out, uint64_t account_id, uint64_t route, const char *key);
/* Adds the idempotency record of a finished request to q. */
int idem_put(void *q /* preq */, uint64_t account_id, uint64_t route, const char *key, const rt_bin *hash,
             uint64_t status, uint16_t reply_type, const void *payload, size_t len);

typedef struct otp_send {
    uint64_t account_id;
    char *number;
    uint64_t length;
    uint64_t minutes;
    uint64_t device_id;
    char *idem_key;
    rt_bin idem_hash;
} otp_send;
extern const rt_schema otp_send_schema;

typedef struct otp_verify {
    uint64_t account_id;
    char *number;
    char *code;
} otp_verify;
extern const rt_schema otp_verify_schema;

typedef struct otp_reply {
    char *number;
    uint64_t message_id;
    int64_t expires_at;
    uint64_t length;
} otp_reply;
extern const rt_schema otp_reply_schema;

typedef struct verify_reply {
    bool verified;
    char *reason;         /* NULL when verified */
    int64_t attempts_left; /* -1: not given */
} verify_reply;
extern const rt_schema verify_reply_schema;

typedef struct token_op {
    uint64_t account_id;
    uint64_t token_id;    /* delete */
    char *name;           /* create */
} token_op;
extern const rt_schema token_op_schema;

typedef struct token_reply {
    uint64_t id;
    char *name;
    char *prefix;
    int64_t created_at;
    char *token;          /* the secret, on create only */
} token_reply;
extern const rt_schema token_reply_schema;

/* Sends a problem reply to env's reply mailbox (if any) and frees nothing. */
void proto_reply_problem(const rt_envelope *req, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* A 429 with the seconds until a retry may succeed. */
void proto_reply_limited(const rt_envelope *req, uint64_t retry_after, const char *detail);
/* Sends a reply {type, schema-encoded obj} to req's reply mailbox. */
void proto_reply(const rt_envelope *req, uint16_t type, const rt_schema *s, const void *obj);

#endif
