/* persist.c: the persistence actor (group commit).
 *
 * Owns the RocksDB WriteBatch of the batch in progress and the list of posts
 * waiting for it. It runs on a dedicated thread because rocksdb_write with
 * sync=true blocks for the fsync. */
#include "actors/persist.h"

#include <errno.h>
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "actors/proto.h"
#include "util/clock.h"
#include "http/metrics.h"
#include "util/log.h"
#include "util/vec.h"

/* ---- request builder ---------------------------------------------------- */

struct preq {
    msgpack_sbuffer ops, posts;
    msgpack_packer opk, ppk;
    uint32_t nops, nposts;
};

preq *preq_new(void)
{
    preq *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    msgpack_sbuffer_init(&q->ops);
    msgpack_sbuffer_init(&q->posts);
    msgpack_packer_init(&q->opk, &q->ops, msgpack_sbuffer_write);
    msgpack_packer_init(&q->ppk, &q->posts, msgpack_sbuffer_write);
    return q;
}

void preq_free(preq *q)
{
    if (!q)
        return;
    msgpack_sbuffer_destroy(&q->ops);
    msgpack_sbuffer_destroy(&q->posts);
    free(q);
}

int preq_put(preq *q, const void *key, size_t klen, const void *val, size_t vlen)
{
    int rc = msgpack_pack_array(&q->opk, 2);
    rc |= msgpack_pack_bin(&q->opk, klen);
    rc |= msgpack_pack_bin_body(&q->opk, key, klen);
    rc |= msgpack_pack_bin(&q->opk, vlen);
    rc |= msgpack_pack_bin_body(&q->opk, val, vlen);
    q->nops++;
    return rc ? -ENOMEM : 0;
}

int preq_del(preq *q, const void *key, size_t klen)
{
    int rc = msgpack_pack_array(&q->opk, 2);
    rc |= msgpack_pack_bin(&q->opk, klen);
    rc |= msgpack_pack_bin_body(&q->opk, key, klen);
    rc |= msgpack_pack_nil(&q->opk);
    q->nops++;
    return rc ? -ENOMEM : 0;
}

int preq_post(preq *q, rt_mailbox *to, uint64_t corr, uint16_t type, uint16_t fail_type,
              const void *payload, size_t len)
{
    int rc = msgpack_pack_array(&q->ppk, 5);
    rc |= msgpack_pack_uint64(&q->ppk, (uint64_t)(uintptr_t)to);
    rc |= msgpack_pack_uint64(&q->ppk, corr);
    rc |= msgpack_pack_uint64(&q->ppk, type);
    rc |= msgpack_pack_uint64(&q->ppk, fail_type);
    rc |= msgpack_pack_bin(&q->ppk, len);
    rc |= msgpack_pack_bin_body(&q->ppk, payload, len);
    q->nposts++;
    return rc ? -ENOMEM : 0;
}

size_t preq_nops(const preq *q) { return q->nops; }

int preq_append(preq *dst, preq *src)
{
    size_t ops = dst->ops.size, posts = dst->posts.size;
    int rc = msgpack_sbuffer_write(&dst->ops, src->ops.data, src->ops.size);
    if (rc == 0)
        rc = msgpack_sbuffer_write(&dst->posts, src->posts.data, src->posts.size);
    if (rc == 0) {
        dst->nops += src->nops;
        dst->nposts += src->nposts;
    } else { /* back to what dst held */
        dst->ops.size = ops;
        dst->posts.size = posts;
    }
    preq_free(src);
    return rc ? -ENOMEM : 0;
}

rt_envelope *preq_finish(preq *q)
{
    msgpack_sbuffer head;
    msgpack_packer hp;
    msgpack_sbuffer_init(&head);
    msgpack_packer_init(&hp, &head, msgpack_sbuffer_write);
    msgpack_pack_array(&hp, 2);
    msgpack_pack_array(&hp, q->nops);
    size_t mid = head.size;
    msgpack_pack_array(&hp, q->nposts);
    size_t tail = head.size - mid;
    size_t len = head.size + q->ops.size + q->posts.size;
    rt_envelope *env = rt_envelope_alloc(PERSIST_WRITE, PROTO_V1, len);
    if (env) {
        char *p = env->data;
        memcpy(p, head.data, mid);
        p += mid;
        if (q->ops.size)
            memcpy(p, q->ops.data, q->ops.size);
        p += q->ops.size;
        memcpy(p, head.data + mid, tail);
        p += tail;
        if (q->posts.size)
            memcpy(p, q->posts.data, q->posts.size);
    }
    msgpack_sbuffer_destroy(&head);
    preq_free(q);
    return env;
}

/* ---- the actor ------------------------------------------------------------ */

/* A post waiting for its commit: the envelope is built when the request is
 * applied, so delivering it is one push (its type becomes fail_type when the
 * commit fails). */
typedef struct post {
    rt_mailbox *to;
    uint16_t type, fail_type;
    rt_envelope *env;
} post;

typedef struct postvec {
    post *v;
    size_t n, cap;
} postvec;

typedef struct persist {
    rt_sched *sched;
    rt_actor *self;
    tt_store *store;
    rocksdb_writebatch_t *wb;
    rocksdb_writeoptions_t *wopts;
    size_t batch_requests;
    size_t batch_ops;     /* keys written in the batch */
    postvec posts;      /* waiting for the current batch's commit */
    postvec deferred;   /* committed, but their mailbox was full */
    int retry_armed;
    msgpack_zone *zone;   /* for decoding requests */
    _Atomic int *store_ok;
} persist;

static int postvec_add(postvec *pv, const post *p)
{
    if (TT_VEC_RESERVE(pv->v, pv->cap, pv->n + 1, 64) != 0)
        return -ENOMEM;
    pv->v[pv->n++] = *p;
    return 0;
}

/* Applies one request to the batch. The whole request is validated before
 * anything of it is added, so a malformed request leaves no half record. */
static int apply_request(persist *ps, const rt_envelope *env, size_t *nops)
{
    size_t off = 0;
    int rc = -EINVAL;
    msgpack_object root;
    /* One zone, cleared after each request: no allocation per request. */
    if (msgpack_unpack(env->data, env->len, &off, ps->zone, &root) != MSGPACK_UNPACK_SUCCESS)
        goto out;
    if (root.type != MSGPACK_OBJECT_ARRAY || root.via.array.size != 2)
        goto out;
    msgpack_object ops = root.via.array.ptr[0], posts = root.via.array.ptr[1];
    if (ops.type != MSGPACK_OBJECT_ARRAY || posts.type != MSGPACK_OBJECT_ARRAY)
        goto out;
    for (uint32_t i = 0; i < ops.via.array.size; i++) {
        msgpack_object op = ops.via.array.ptr[i];
        if (op.type != MSGPACK_OBJECT_ARRAY || op.via.array.size != 2 ||
            op.via.array.ptr[0].type != MSGPACK_OBJECT_BIN ||
            (op.via.array.ptr[1].type != MSGPACK_OBJECT_BIN && op.via.array.ptr[1].type != MSGPACK_OBJECT_NIL))
            goto out;
    }
    for (uint32_t i = 0; i < posts.via.array.size; i++) {
        msgpack_object p = posts.via.array.ptr[i];
        if (p.type != MSGPACK_OBJECT_ARRAY || p.via.array.size != 5)
            goto out;
        for (int j = 0; j < 4; j++)
            if (p.via.array.ptr[j].type != MSGPACK_OBJECT_POSITIVE_INTEGER)
                goto out;
        if (p.via.array.ptr[4].type != MSGPACK_OBJECT_BIN)
            goto out;
    }
    /* Posts first: they are the part that can fail (memory), and a failure
     * must leave nothing of this request in the batch. */
    size_t mark = ps->posts.n;
    for (uint32_t i = 0; i < posts.via.array.size; i++) {
        msgpack_object *f = posts.via.array.ptr[i].via.array.ptr;
        post p = {(rt_mailbox *)(uintptr_t)f[0].via.u64, (uint16_t)f[2].via.u64, (uint16_t)f[3].via.u64, NULL};
        p.env = rt_envelope_new(p.type, PROTO_V1, f[4].via.bin.ptr, f[4].via.bin.size);
        if (p.env)
            p.env->corr = f[1].via.u64;
        if (!p.env || postvec_add(&ps->posts, &p)) {
            rt_envelope_free(p.env);
            while (ps->posts.n > mark)
                rt_envelope_free(ps->posts.v[--ps->posts.n].env);
            rc = -ENOMEM;
            goto out;
        }
    }
    for (uint32_t i = 0; i < ops.via.array.size; i++) {
        msgpack_object *kv = ops.via.array.ptr[i].via.array.ptr;
        if (kv[1].type == MSGPACK_OBJECT_NIL)
            rocksdb_writebatch_delete(ps->wb, kv[0].via.bin.ptr, kv[0].via.bin.size);
        else
            rocksdb_writebatch_put(ps->wb, kv[0].via.bin.ptr, kv[0].via.bin.size, kv[1].via.bin.ptr,
                                   kv[1].via.bin.size);
    }
    *nops = ops.via.array.size;
    rc = 0;
out:
    msgpack_zone_clear(ps->zone);
    return rc;
}

/* Tries to deliver p; 0 when delivered (or dropped for good), -EAGAIN when
 * the target mailbox is full. */
/* Pushes p's envelope: 0 when delivered (p no longer owns it), -EAGAIN
 * when the target mailbox is full. */
static int deliver(post *p)
{
    if (rt_mailbox_push(p->to, p->env) != 0)
        return -EAGAIN;
    p->env = NULL;
    return 0;
}

static void arm_retry(persist *ps)
{
    if (ps->retry_armed)
        return;
    if (rt_timer_at(ps->sched, ps->self, tt_now_ms() + 5, PERSIST_RETRY, 0) == 0)
        ps->retry_armed = 1;
}

static void deliver_all(persist *ps, postvec *pv, int ok)
{
    for (size_t i = 0; i < pv->n; i++) {
        post *p = &pv->v[i];
        uint16_t type = ok ? p->type : p->fail_type;
        if (!type || !p->to) {
            rt_envelope_free(p->env);
            continue;
        }
        p->env->type = type;
        if (deliver(p) == -EAGAIN && postvec_add(&ps->deferred, p) != 0) {
            LOG_ERROR("out of memory deferring a commit notification");
            rt_envelope_free(p->env);
        }
    }
    pv->n = 0;
}

static void retry_deferred(persist *ps)
{
    size_t keep = 0;
    for (size_t i = 0; i < ps->deferred.n; i++) {
        post *p = &ps->deferred.v[i];
        if (deliver(p) == -EAGAIN)
            ps->deferred.v[keep++] = *p;
    }
    ps->deferred.n = keep;
    if (keep)
        arm_retry(ps);
}

static void persist_dispatch(rt_actor *self, void *state, rt_envelope *env)
{
    persist *ps = state;
    switch (env->type) {
    case PERSIST_WRITE:
        size_t nops = 0;
        if (apply_request(ps, env, &nops) != 0) {
            LOG_ERROR("persist: malformed write request dropped");
            proto_reply_problem(env, 500, "internal_error", "malformed store request");
        } else {
            ps->batch_requests++;
            ps->batch_ops += nops;
        }
        break;
    case PERSIST_RETRY:
        ps->retry_armed = 0;
        retry_deferred(ps);
        break;
    default:
        LOG_WARN("persist: unknown message type %u", (unsigned)env->type);
    }
    rt_envelope_free(env);
}

/* Monotonic microseconds: commits take well under a millisecond. */
static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void persist_batch_end(rt_actor *self, void *state)
{
    persist *ps = state;
    if (ps->batch_requests == 0 && ps->posts.n == 0)
        return;
    int64_t t0 = mono_us();
    char *err = NULL;
    rocksdb_write(store_db(ps->store), ps->wopts, ps->wb, &err);
    int ok = err == NULL;
    if (!ok) {
        LOG_ERROR("store write failed (%zu requests): %s", ps->batch_requests, err);
        free(err);
        atomic_store_explicit(ps->store_ok, 0, memory_order_relaxed);
    } else {
        metrics_commit(ps->batch_ops, mono_us() - t0);
    }
    rocksdb_writebatch_clear(ps->wb);
    ps->batch_requests = 0;
    ps->batch_ops = 0;
    deliver_all(ps, &ps->posts, ok);
    if (ps->deferred.n)
        arm_retry(ps);
}

static void persist_stopped(rt_actor *self, void *state)
{
    persist *ps = state;
    /* Whatever is still deferred at shutdown has nobody left to read it. */
    for (size_t i = 0; i < ps->deferred.n; i++)
        rt_envelope_free(ps->deferred.v[i].env);
    free(ps->deferred.v);
    free(ps->posts.v);
    rocksdb_writebatch_destroy(ps->wb);
    rocksdb_writeoptions_destroy(ps->wopts);
    msgpack_zone_free(ps->zone);
    free(ps);
}

static const rt_actor_ops persist_ops = {persist_dispatch, persist_batch_end, persist_stopped};

rt_actor *persist_new(rt_sched *s, tt_store *st, _Atomic int *store_ok)
{
    persist *ps = calloc(1, sizeof(*ps));
    if (!ps)
        return NULL;
    ps->sched = s;
    ps->store = st;
    ps->store_ok = store_ok;
    ps->wb = rocksdb_writebatch_create();
    ps->wopts = rocksdb_writeoptions_create();
    rocksdb_writeoptions_set_sync(ps->wopts, 1);
    ps->zone = msgpack_zone_new(16384);
    ps->self = ps->zone ? rt_actor_new_dedicated(s, "persist", 4096, 2048, &persist_ops, ps) : NULL;
    if (!ps->self) {
        rocksdb_writebatch_destroy(ps->wb);
        rocksdb_writeoptions_destroy(ps->wopts);
        if (ps->zone)
            msgpack_zone_free(ps->zone);
        free(ps);
        return NULL;
    }
    return ps->self;
}
