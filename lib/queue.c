/*
 * queue: the gateway's durable write into the Redis queue, a thin layer on
 * top of lib/redis.c. The schema it writes is documented in docs/queue.md;
 * the contract is in lib/queue.h.
 *
 * lib/redis.c owns the connection: connect, AUTH and SELECT, reconnect
 * with backoff, the timeout watchdog, backpressure accounting and the
 * exactly-once, never-synchronous callbacks. This file adds what is
 * specific to the queue:
 *   - a ready hook, run after every (re)connect: CONFIG GET appendonly (a
 *     warning when it is "no") and XGROUP CREATE of the ready stream's
 *     consumer group;
 *   - the message itself: one MULTI/EXEC (HSET of the message hash, XADD
 *     to the ready stream), then WAIT when [queue] wait_replicas > 0, both
 *     pipelined on the same connection;
 *   - negative errno status codes for the callers' logs and decisions.
 *
 * One enqueue is one struct queue_req holding the outcomes of its one or
 * two Redis requests (the transaction, the WAIT). redis.c calls back once
 * per request; the user callback is made as soon as the outcome is decided
 * (the first failure, or every result in), and the request is freed when
 * both Redis callbacks have come. Every user callback is therefore made
 * from inside a redis.c callback: from the loop, never from inside
 * queue_enqueue().
 *
 * Status codes: -ENOTCONN (not connected), -ETIMEDOUT (no answer within
 * [queue] timeout), -ECONNRESET (connection lost), -ECANCELED (queue
 * closed), -EIO (Redis answered with an error, or WAIT fell short) and
 * -EINVAL (a recipient is not UTF-8).
 */
#include "lib/queue.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/rand.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/redis.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"

#define QUEUE_DEFAULT_TIMEOUT_S 5
#define QUEUE_ERR_MAX 256
/* HSET key + ten field/value pairs. */
#define QUEUE_HSET_ARGC 22

struct queue {
    const struct mf_config *cfg;
    struct redis *r;
    char *ready_key;                 /* <prefix>ready */
    char *msg_prefix;                /* <prefix>msg: */
    char gateway[256];               /* value of the hash's gateway field */
    uint64_t timeout_ns;             /* [queue] timeout */
    long long wait_ms;               /* WAIT's timeout */
    int closing;
    void (*on_closed)(void *arg);
    void *closed_arg;
};

/* Outcome of one of the Redis requests of an enqueue. */
enum queue_res { QR_PENDING = 0, QR_OK, QR_FAILED };

struct queue_req {
    struct queue *q;
    queue_enqueue_cb cb;
    void *arg;
    char id[QUEUE_ID_LEN + 1];
    uint64_t started;                /* uv_hrtime() at queue_enqueue() */
    int refs;                        /* redis.c callbacks still to come */
    int delivered;                   /* user callback made */
    int local_status;                /* failure found before sending, or 0 */
    enum queue_res exec, wait;
    int exec_status, wait_status;
    char exec_err[QUEUE_ERR_MAX];
    char wait_err[QUEUE_ERR_MAX];
};

static uint64_t queue_epoch_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- the ready hook ------------------------------------------------------------ */

static void queue_on_config(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    const char *e = redis_reply_error(reply);
    char eq[QUEUE_ERR_MAX];

    (void)r;
    (void)err;
    (void)arg;
    /* A lost connection is handled by redis.c and the hook runs again. */
    if (reply == NULL)
        return;
    if (e != NULL) {
        /* CONFIG is often renamed or disabled on managed Redis: not being
         * able to check is not a reason to refuse mail. */
        log_debug("event=redis_config_refused name=queue reason=%s",
                  log_quote(eq, sizeof(eq), e, (size_t)reply->len));
        return;
    }
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
        reply->element[1]->type == REDIS_REPLY_STRING && reply->element[1]->len == 2 &&
        memcmp(reply->element[1]->str, "no", 2) == 0)
        log_warn("event=redis_appendonly_off name=queue reason=\"appendonly is no: acknowledged "
                 "mail is lost if Redis restarts between snapshots\"");
}

static void queue_on_group(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    const char *e = redis_reply_error(reply);
    char eq[QUEUE_ERR_MAX];

    (void)err;
    (void)arg;
    if (reply == NULL) {
        /* The connection is gone; redis.c logged why and reconnects. */
        redis_hook_done(r, -1);
        return;
    }
    /* BUSYGROUP: the group exists, which is the normal case. */
    if (e && strncmp(e, "BUSYGROUP", 9) != 0) {
        log_warn("event=redis_group_failed name=queue reason=%s",
                 log_quote(eq, sizeof(eq), e, (size_t)reply->len));
        redis_hook_done(r, -1);
        return;
    }
    redis_hook_done(r, 0);
}

/* Runs after every connect, before the connection accepts enqueues. Both
 * commands are pipelined; the group's reply comes last and decides. The
 * group starts at id 0, so that entries written before it existed are
 * routed too. */
static void queue_hook(struct redis *r, void *arg)
{
    struct queue *q = arg;

    redis_commandf(r, queue_on_config, q, "CONFIG GET appendonly");
    redis_commandf(r, queue_on_group, q, "XGROUP CREATE %s %s 0 MKSTREAM", q->ready_key,
                   SCHEMA_GROUP);
}

/* ---- enqueue outcomes ------------------------------------------------------------ */

/* Maps a failure text of redis.c (lib/redis.h) to a status code. After a
 * loss with the outcome unknown, the queue's own state tells why: it was
 * closed, or the enqueue waited for the whole timeout (the watchdog
 * dropped the connection), or the connection was lost. */
static int queue_status_of(const struct queue_req *req, const char *err)
{
    const struct queue *q = req->q;

    if (strcmp(err, "redis: not connected") == 0)
        return -ENOTCONN;
    if (strcmp(err, "redis: timeout") == 0)
        return -ETIMEDOUT;
    if (strcmp(err, "redis: closed") == 0)
        return -ECANCELED;
    if (strcmp(err, "redis: connection lost") == 0 || strcmp(err, "redis: outcome unknown") == 0) {
        if (q->closing)
            return -ECANCELED;
        if (uv_hrtime() - req->started >= q->timeout_ns)
            return -ETIMEDOUT;
        return -ECONNRESET;
    }
    return -EIO;
}

static void queue_deliver(struct queue_req *req, int status, const char *err)
{
    char eq[QUEUE_ERR_MAX + 16];

    req->delivered = 1;
    if (status == 0) {
        log_debug("id=%s event=redis_stored", req->id);
        req->cb(0, NULL, req->arg);
        return;
    }
    log_debug("id=%s event=redis_store_failed status=%d reason=%s", req->id, status,
              log_quote(eq, sizeof(eq), err, strlen(err)));
    req->cb(status, err, req->arg);
}

/* Makes the user callback once the outcome is known: the transaction's
 * failure wins; after its success, WAIT's result (when one was sent). The
 * results may come in either order (a WAIT refused before sending fails
 * from the loop before a transaction dropped with the connection). */
static void queue_decide(struct queue_req *req)
{
    if (req->delivered)
        return;
    if (req->exec == QR_FAILED)
        queue_deliver(req, req->exec_status, req->exec_err);
    else if (req->exec == QR_OK && req->wait == QR_FAILED)
        queue_deliver(req, req->wait_status, req->wait_err);
    else if (req->exec == QR_OK && req->wait == QR_OK)
        queue_deliver(req, 0, NULL);
}

static void queue_req_release(struct queue_req *req)
{
    if (--req->refs == 0)
        free(req);
}

/* Copies an error reply's text (counted, maybe not NUL-safe). */
static void queue_copy_err(char *out, size_t n, const redisReply *reply)
{
    size_t len = reply->str ? (size_t)reply->len : 0;

    if (len >= n)
        len = n - 1;
    if (len)
        memcpy(out, reply->str, len);
    out[len] = '\0';
}

/* Result of MULTI HSET XADD EXEC: success is an array holding the HSET
 * integer and the XADD entry id. A runtime error inside the transaction
 * (WRONGTYPE) is the corresponding element of the array. */
static void queue_on_exec(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct queue_req *req = arg;

    (void)r;
    if (reply == NULL) {
        req->exec = QR_FAILED;
        if (req->local_status != 0 && strcmp(err, "redis: cannot format command") == 0) {
            /* The empty command of a local failure (queue_enqueue()); the
             * reasons of redis.c (closed, not connected) come first. */
            req->exec_status = req->local_status;
            snprintf(req->exec_err, sizeof(req->exec_err), "queue: recipient is not valid UTF-8");
        } else {
            req->exec_status = queue_status_of(req, err);
            snprintf(req->exec_err, sizeof(req->exec_err), "%s", err);
        }
    } else if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
               reply->element[0]->type == REDIS_REPLY_INTEGER &&
               reply->element[1]->type == REDIS_REPLY_STRING) {
        req->exec = QR_OK;
        if (req->q->cfg->queue.wait_replicas <= 0)
            req->wait = QR_OK;
    } else {
        req->exec = QR_FAILED;
        req->exec_status = -EIO;
        snprintf(req->exec_err, sizeof(req->exec_err), "redis: unexpected EXEC reply");
        for (size_t i = 0; reply->type == REDIS_REPLY_ARRAY && i < reply->elements; i++) {
            if (reply->element[i]->type == REDIS_REPLY_ERROR) {
                queue_copy_err(req->exec_err, sizeof(req->exec_err), reply->element[i]);
                break;
            }
        }
    }
    queue_decide(req);
    queue_req_release(req);
}

/* Result of WAIT: the number of replicas that acknowledged the write. */
static void queue_on_wait(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct queue_req *req = arg;
    int want = req->q->cfg->queue.wait_replicas;

    (void)r;
    req->wait = QR_FAILED;
    req->wait_status = -EIO;
    if (reply == NULL) {
        req->wait_status = queue_status_of(req, err);
        snprintf(req->wait_err, sizeof(req->wait_err), "%s", err);
    } else if (reply->type == REDIS_REPLY_INTEGER && reply->integer >= (long long)want) {
        req->wait = QR_OK;
    } else if (reply->type == REDIS_REPLY_INTEGER) {
        snprintf(req->wait_err, sizeof(req->wait_err), "redis: WAIT reached %lld of %d replicas",
                 reply->integer, want);
    } else if (reply->type == REDIS_REPLY_ERROR) {
        queue_copy_err(req->wait_err, sizeof(req->wait_err), reply);
    } else {
        snprintf(req->wait_err, sizeof(req->wait_err), "redis: unexpected WAIT reply");
    }
    queue_decide(req);
    queue_req_release(req);
}

/* ---- public interface ------------------------------------------------------------- */

struct queue *queue_new(uv_loop_t *loop, const struct mf_config *cfg)
{
    struct queue *q = xcalloc(1, sizeof(*q));
    const char *prefix = cfg->queue.prefix ? cfg->queue.prefix : "mf:";
    int timeout_s = cfg->queue.timeout > 0 ? cfg->queue.timeout : QUEUE_DEFAULT_TIMEOUT_S;
    struct redis_opts o;
    struct buf b = BUF_INIT;

    q->cfg = cfg;
    buf_appendf(&b, "%s%s", prefix, SCHEMA_READY);
    q->ready_key = buf_steal(&b, NULL);
    buf_appendf(&b, "%s%s", prefix, SCHEMA_MSG);
    q->msg_prefix = buf_steal(&b, NULL);

    if (cfg->gateway.hostname && cfg->gateway.hostname[0])
        snprintf(q->gateway, sizeof(q->gateway), "%s", cfg->gateway.hostname);
    else if (gethostname(q->gateway, sizeof(q->gateway) - 1) != 0)
        snprintf(q->gateway, sizeof(q->gateway), "unknown");
    q->gateway[sizeof(q->gateway) - 1] = '\0';

    q->timeout_ns = (uint64_t)timeout_s * 1000000000u;
    /* WAIT blocks on the server for its timeout (forever for 0), and
     * redis.c drops the connection at [queue] timeout: keep WAIT's timeout
     * below it so that a missing replica is a clean failure. */
    q->wait_ms = cfg->queue.wait_timeout;
    if (cfg->queue.wait_replicas > 0 &&
        (q->wait_ms <= 0 || q->wait_ms >= (long long)timeout_s * 1000)) {
        q->wait_ms = (long long)timeout_s * 500;
        log_warn("event=redis_wait_timeout_adjusted wait_timeout_ms=%d used_ms=%lld "
                 "reason=\"must be between 1 and [queue] timeout\"",
                 cfg->queue.wait_timeout, q->wait_ms);
    }

    memset(&o, 0, sizeof(o));
    o.url = &cfg->queue.url;
    o.timeout = timeout_s;
    o.name = "queue";
    o.hook = queue_hook;
    o.hook_arg = q;
    q->r = redis_new(loop, &o);
    return q;
}

static void queue_on_redis_closed(void *arg)
{
    struct queue *q = arg;
    void (*cb)(void *) = q->on_closed;
    void *cb_arg = q->closed_arg;

    free(q->ready_key);
    free(q->msg_prefix);
    free(q);
    if (cb)
        cb(cb_arg);
}

void queue_close(struct queue *q, void (*on_closed)(void *arg), void *arg)
{
    q->closing = 1;
    q->on_closed = on_closed;
    q->closed_arg = arg;
    redis_close(q->r, queue_on_redis_closed, q);
}

void queue_id_new(char out[QUEUE_ID_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char rnd[5];
    uint64_t ms = queue_epoch_ms() & 0xffffffffffffull;

    if (RAND_bytes(rnd, sizeof(rnd)) != 1)
        log_fatal("event=rand_failed reason=\"RAND_bytes failed\"");
    for (int i = 11; i >= 0; i--) {
        out[i] = hex[ms & 0xf];
        ms >>= 4;
    }
    for (size_t i = 0; i < sizeof(rnd); i++) {
        out[12 + 2 * i] = hex[rnd[i] >> 4];
        out[13 + 2 * i] = hex[rnd[i] & 0xf];
    }
    out[QUEUE_ID_LEN] = '\0';
}

/* Encodes the recipients as a compact JSON array of strings. Returns NULL
 * when one is not valid UTF-8 (JSON strings must be). */
static char *queue_rcpts_json(const struct queue_msg *m)
{
    json_t *arr = json_array();
    char *s;

    if (arr == NULL) {
        log_error("event=oom where=json_array");
        abort();
    }
    for (size_t i = 0; i < m->nrcpts; i++) {
        json_t *v = json_string(m->rcpts[i]);
        if (v == NULL) {
            json_decref(arr);
            return NULL;
        }
        json_array_append_new(arr, v);
    }
    s = json_dumps(arr, JSON_COMPACT);
    if (s == NULL) {
        log_error("event=oom where=json_dumps");
        abort();
    }
    json_decref(arr);
    return s;
}

void queue_enqueue(struct queue *q, const char *id, const struct queue_msg *m,
                   queue_enqueue_cb cb, void *arg)
{
    struct queue_req *req = xcalloc(1, sizeof(*req));
    char size[24], created[24], wn[16], wt[24];
    struct buf key = BUF_INIT;
    char *rcpts;

    req->q = q;
    req->cb = cb;
    req->arg = arg;
    req->started = uv_hrtime();
    snprintf(req->id, sizeof(req->id), "%s", id);

    rcpts = queue_rcpts_json(m);
    if (rcpts == NULL) {
        /* Nothing is sent. An empty command cannot be formatted, and
         * redis.c fails it from the loop like any other command (after
         * "closed" and "not connected"), which makes this failure
         * asynchronous without handles of our own. */
        req->refs = 1;
        req->local_status = -EINVAL;
        redis_command(q->r, queue_on_exec, req, 0, NULL, NULL);
        return;
    }

    buf_appendf(&key, "%s%s", q->msg_prefix, id);
    snprintf(size, sizeof(size), "%zu", m->datalen);
    snprintf(created, sizeof(created), "%llu", (unsigned long long)queue_epoch_ms());

    const char *hset[QUEUE_HSET_ARGC] = {
        "HSET", key.data,
        SCHEMA_F_FROM, m->from ? m->from : "",
        SCHEMA_F_RCPTS, rcpts,
        SCHEMA_F_DATA, m->data ? m->data : "",
        SCHEMA_F_SIZE, size,
        SCHEMA_F_CREATED, created,
        SCHEMA_F_CLIENT_IP, m->client_ip ? m->client_ip : "",
        SCHEMA_F_HELO, m->helo ? m->helo : "",
        SCHEMA_F_AUTH_USER, m->auth_user ? m->auth_user : "",
        SCHEMA_F_CLASS, m->msg_class ? m->msg_class : "",
        SCHEMA_F_GATEWAY, q->gateway,
    };
    size_t hset_l[QUEUE_HSET_ARGC];
    const char *xadd[5] = {"XADD", q->ready_key, "*", SCHEMA_F_ID, id};
    const char *const *argvs[2] = {hset, xadd};
    const size_t *lenss[2] = {hset_l, NULL};
    const int argcs[2] = {QUEUE_HSET_ARGC, 5};

    for (int i = 0; i < QUEUE_HSET_ARGC; i++) {
        if (i == 7)
            hset_l[i] = m->data ? m->datalen : 0;   /* binary, not NUL-terminated */
        else
            hset_l[i] = strlen(hset[i]);
    }

    /* Both requests are pipelined on the connection; WAIT then covers the
     * transaction's writes. */
    req->refs = q->cfg->queue.wait_replicas > 0 ? 2 : 1;
    redis_multi(q->r, queue_on_exec, req, 2, argcs, argvs, lenss);
    if (q->cfg->queue.wait_replicas > 0) {
        snprintf(wn, sizeof(wn), "%d", q->cfg->queue.wait_replicas);
        snprintf(wt, sizeof(wt), "%lld", q->wait_ms);
        redis_commandf(q->r, queue_on_wait, req, "WAIT %s %s", wn, wt);
    }
    free(rcpts);
    buf_free(&key);
}

int queue_ready(const struct queue *q)
{
    return !q->closing && redis_ready(q->r);
}

size_t queue_pending_bytes(const struct queue *q)
{
    return redis_pending_bytes(q->r);
}

void queue_set_backpressure(struct queue *q, size_t high_water, size_t low_water,
                            void (*on_change)(int paused, void *arg), void *arg)
{
    redis_set_backpressure(q->r, high_water, low_water, on_change, arg);
}
