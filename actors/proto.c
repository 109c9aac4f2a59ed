/* proto.c: payload schemas of the actor protocol and reply helpers. */
#include "actors/proto.h"

#include <stdarg.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/persist.h"
#include "util/clock.h"

#include "util/log.h"

static const rt_field problem_fields[] = {
    RT_FIELD(problem, status, RT_F_U64),
    RT_FIELD(problem, code, RT_F_STR),
    RT_FIELD(problem, detail, RT_F_STR),
    RT_FIELD(problem, retry_after, RT_F_U64),
};
const rt_schema problem_schema = RT_SCHEMA("problem", problem_fields);

static const rt_field submit_fields[] = {
    RT_FIELD(submit, account_id, RT_F_U64),
    RT_FIELD(submit, device_id, RT_F_U64),
    RT_FIELD(submit, direct, RT_F_BOOL),
    RT_FIELD(submit, force, RT_F_BOOL),
    RT_FIELD(submit, to, RT_F_STR),
    RT_FIELD(submit, text, RT_F_STR),
    RT_FIELD(submit, priority, RT_F_U64),
    RT_FIELD(submit, ttl_s, RT_F_I64),
    RT_FIELD(submit, encoding, RT_F_U64),
    RT_FIELD(submit, segments, RT_F_U64),
    RT_FIELD(submit, idem_key, RT_F_NSTR),
    RT_FIELD(submit, idem_route, RT_F_U64),
    RT_FIELD(submit, idem_hash, RT_F_BIN),
    RT_FIELD(submit, idem_failures_only, RT_F_BOOL),
    RT_FIELD(submit, sealed, RT_F_BIN),
};
const rt_schema submit_schema = RT_SCHEMA("submit", submit_fields);

static const rt_field device_create_fields[] = {
    RT_FIELD(device_create, account_id, RT_F_U64),
    RT_FIELD(device_create, name, RT_F_STR),
    RT_FIELD(device_create, rate_per_minute, RT_F_U64),
};
const rt_schema device_create_schema = RT_SCHEMA("device_create", device_create_fields);

static const rt_field dev_reply_fields[] = {
    RT_FIELD(dev_reply, id, RT_F_U64),
    RT_FIELD(dev_reply, account_id, RT_F_U64),
    RT_FIELD(dev_reply, name, RT_F_STR),
    RT_FIELD(dev_reply, rate_per_minute, RT_F_U64),
    RT_FIELD(dev_reply, created_at, RT_F_I64),
    RT_FIELD(dev_reply, password, RT_F_NSTR),
};
const rt_schema dev_reply_schema = RT_SCHEMA("dev_reply", dev_reply_fields);

static const rt_field dev_mqtt_fields[] = {
    RT_FIELD(dev_mqtt, kind, RT_F_U64),
    RT_FIELD(dev_mqtt, payload, RT_F_BIN),
};
const rt_schema dev_mqtt_schema = RT_SCHEMA("dev_mqtt", dev_mqtt_fields);

static const rt_field dev_link_fields[] = {
    RT_FIELD(dev_link, up, RT_F_BOOL),
};
const rt_schema dev_link_schema = RT_SCHEMA("dev_link", dev_link_fields);

static const rt_field pin_op_fields[] = {
    RT_FIELD(pin_op, account_id, RT_F_U64),
    RT_FIELD(pin_op, device_id, RT_F_U64),
    RT_FIELD(pin_op, op, RT_F_U64),
    RT_FIELD(pin_op, number, RT_F_NSTR),
    RT_FIELD(pin_op, safe_word, RT_F_NSTR),
};
const rt_schema pin_op_schema = RT_SCHEMA("pin_op", pin_op_fields);

static const rt_field device_patch_fields[] = {
    RT_FIELD(device_patch, account_id, RT_F_U64),
    RT_FIELD(device_patch, device_id, RT_F_U64),
    RT_FIELD(device_patch, name, RT_F_NSTR),
    RT_FIELD(device_patch, rate_per_minute, RT_F_U64),
};
const rt_schema device_patch_schema = RT_SCHEMA("device_patch", device_patch_fields);

static const rt_field dev_text_fields[] = {
    RT_FIELD(dev_text, text, RT_F_STR),
};
const rt_schema dev_text_schema = RT_SCHEMA("dev_text", dev_text_fields);

static const rt_field dev_reply_to_fields[] = {
    RT_FIELD(dev_reply_to, mailbox, RT_F_U64),
    RT_FIELD(dev_reply_to, corr, RT_F_U64),
};
const rt_schema dev_reply_to_schema = RT_SCHEMA("dev_reply_to", dev_reply_to_fields);

static const rt_field dev_cancel_fields[] = {
    RT_FIELD(dev_cancel, account_id, RT_F_U64),
    RT_FIELD(dev_cancel, message_id, RT_F_U64),
};
const rt_schema dev_cancel_schema = RT_SCHEMA("dev_cancel", dev_cancel_fields);

static const rt_field otp_send_fields[] = {
    RT_FIELD(otp_send, account_id, RT_F_U64),
    RT_FIELD(otp_send, number, RT_F_STR),
    RT_FIELD(otp_send, length, RT_F_U64),
    RT_FIELD(otp_send, minutes, RT_F_U64),
    RT_FIELD(otp_send, device_id, RT_F_U64),
    RT_FIELD(otp_send, idem_key, RT_F_NSTR),
    RT_FIELD(otp_send, idem_hash, RT_F_BIN),
};
const rt_schema otp_send_schema = RT_SCHEMA("otp_send", otp_send_fields);

static const rt_field otp_verify_fields[] = {
    RT_FIELD(otp_verify, account_id, RT_F_U64),
    RT_FIELD(otp_verify, number, RT_F_STR),
    RT_FIELD(otp_verify, code, RT_F_STR),
};
const rt_schema otp_verify_schema = RT_SCHEMA("otp_verify", otp_verify_fields);

static const rt_field otp_reply_fields[] = {
    RT_FIELD(otp_reply, number, RT_F_STR),
    RT_FIELD(otp_reply, message_id, RT_F_U64),
    RT_FIELD(otp_reply, expires_at, RT_F_I64),
    RT_FIELD(otp_reply, length, RT_F_U64),
};
const rt_schema otp_reply_schema = RT_SCHEMA("otp_reply", otp_reply_fields);

static const rt_field verify_reply_fields[] = {
    RT_FIELD(verify_reply, verified, RT_F_BOOL),
    RT_FIELD(verify_reply, reason, RT_F_NSTR),
    RT_FIELD(verify_reply, attempts_left, RT_F_I64),
};
const rt_schema verify_reply_schema = RT_SCHEMA("verify_reply", verify_reply_fields);

static const rt_field token_op_fields[] = {
    RT_FIELD(token_op, account_id, RT_F_U64),
    RT_FIELD(token_op, token_id, RT_F_U64),
    RT_FIELD(token_op, name, RT_F_NSTR),
};
const rt_schema token_op_schema = RT_SCHEMA("token_op", token_op_fields);

static const rt_field token_reply_fields[] = {
    RT_FIELD(token_reply, id, RT_F_U64),
    RT_FIELD(token_reply, name, RT_F_STR),
    RT_FIELD(token_reply, prefix, RT_F_STR),
    RT_FIELD(token_reply, created_at, RT_F_I64),
    RT_FIELD(token_reply, token, RT_F_NSTR),
};
const rt_schema token_reply_schema = RT_SCHEMA("token_reply", token_reply_fields);

static const rt_field idem_fields[] = {
    RT_FIELD(idem_rec, v, RT_F_U64),
    RT_FIELD(idem_rec, hash, RT_F_BIN),
    RT_FIELD(idem_rec, status, RT_F_U64),
    RT_FIELD(idem_rec, reply_type, RT_F_U64),
    RT_FIELD(idem_rec, payload, RT_F_BIN),
    RT_FIELD(idem_rec, created_at, RT_F_I64),
};
const rt_schema idem_schema = RT_SCHEMA("idem", idem_fields);

size_t key_idem(uint8_t *out, uint64_t account_id, uint64_t route, const char *key)
{
    size_t n = strlen(key);
    if (n > 255)
        n = 255;
    out[0] = 'X';
    key_put_u64(out + 1, account_id);
    out[9] = (uint8_t)route;
    memcpy(out + 10, key, n);
    return 10 + n;
}

int idem_put(void *q, uint64_t account_id, uint64_t route, const char *key, const rt_bin *hash, uint64_t status,
             uint16_t reply_type, const void *payload, size_t len)
{
    idem_rec r = {1, *hash, status, reply_type, {(void *)payload, len}, tt_now_ms()};
    char *val;
    size_t vlen;
    if (rt_codec_encode(&idem_schema, &r, &val, &vlen) != 0)
        return -ENOMEM;
    uint8_t k[IDEM_KEY_MAX];
    preq_put(q, k, key_idem(k, account_id, route, key), val, vlen);
    free(val);
    return 0;
}

void proto_reply(const rt_envelope *req, uint16_t type, const rt_schema *s, const void *obj)
{
    if (!req->reply)
        return;
    rt_envelope *env = s ? rt_codec_envelope(type, PROTO_V1, s, obj) : rt_envelope_new(type, PROTO_V1, NULL, 0);
    if (!env) {
        LOG_ERROR("out of memory building a reply");
        return;
    }
    env->corr = req->corr;
    /* A reply mailbox belongs to one waiting HTTP thread with one request
     * outstanding, so its ring has room; a failure here is a bug worth a log. */
    if (rt_mailbox_push(req->reply, env) != 0) {
        LOG_ERROR("reply mailbox full; dropping reply %u", (unsigned)type);
        rt_envelope_free(env);
    }
}

void proto_reply_problem(const rt_envelope *req, int status, const char *code, const char *fmt, ...)
{
    char detail[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    problem p = {(uint64_t)status, (char *)code, detail, 0};
    proto_reply(req, REPLY_PROBLEM, &problem_schema, &p);
}

void proto_reply_limited(const rt_envelope *req, uint64_t retry_after, const char *detail)
{
    problem p = {429, "rate_limited", (char *)detail, retry_after ? retry_after : 1};
    proto_reply(req, REPLY_PROBLEM, &problem_schema, &p);
}
