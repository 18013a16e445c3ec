/*
 * queue: the Redis queue client (hiredis 0.14 async API on the libuv loop).
 *
 * The schema this module writes is documented in docs/queue.md.
 *
 * Life of the connection. One redisAsyncContext exists at a time. The
 * module moves through the states in queue_state_names[]:
 *
 *   wait -> connecting -> handshake -> ready
 *     ^          |             |          |
 *     +----------+-------------+----------+   (loss, error or timeout)
 *
 * "wait" is the backoff pause (100 ms doubling to 5 s) before the next
 * attempt. "handshake" runs AUTH, SELECT, CONFIG GET appendonly and XGROUP
 * CREATE; only when all of them succeeded is the queue ready and accepts
 * enqueues. hiredis 0.14 has no timeouts of its own, so a watchdog timer
 * abandons a connect, a handshake or an in-flight enqueue older than
 * [queue] timeout by freeing the context.
 *
 * hiredis lifetime rules this file relies on (hiredis 0.14 async.c):
 *  - redisAsyncFree() runs every pending reply callback with a NULL reply,
 *    then the disconnect callback (only if the connection had completed),
 *    then frees the context. Called inside a reply callback it only sets a
 *    flag and the free happens when the callback returns.
 *  - A failed connect calls the connect callback with REDIS_ERR and then
 *    frees the context without calling the disconnect callback.
 *  - The connect callback runs outside hiredis's "in callback" guard, so
 *    freeing the context there would be a use after free. Decisions to drop
 *    the connection that are taken inside any hiredis callback are therefore
 *    deferred to the idle handle (queue_drop_later), and queue_drop() is only
 *    called from timers, the idle handle and the public functions, which
 *    never run inside a hiredis callback because this module calls user
 *    code only from its idle handle.
 *  - The libuv adapter closes its uv_poll_t with uv_close() and frees it in
 *    the close callback, one loop iteration after the context is gone. The
 *    module replaces the adapter's cleanup hook with an equivalent one that
 *    also counts those handles, so on_closed() is called only after they are
 *    closed and uv_loop_close() succeeds right after it.
 *
 * Exactly-once callbacks. Each enqueue is a struct queue_req. A request is
 * "finished" once its outcome is known (a reply, a NULL reply on
 * disconnect, or an immediate failure); it then moves to the done list and
 * its user callback is called from the idle handle. The request's memory is
 * released when the callback was delivered and no hiredis callback still
 * points to it (refs == 0).
 *
 * Status codes given to the user callback are negative errno values:
 * -ENOTCONN (not connected), -ETIMEDOUT (timeout), -ECONNRESET (connection
 * lost), -EIO (Redis answered with an error, or WAIT fell short),
 * -ECANCELED (queue closed) and -EINVAL (a recipient is not UTF-8).
 */
#include "lib/queue.h"

#include <assert.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <jansson.h>
#include <openssl/rand.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"

#define QUEUE_BACKOFF_MIN_MS 100
#define QUEUE_BACKOFF_MAX_MS 5000
#define QUEUE_WATCHDOG_MS 100
#define QUEUE_DEFAULT_TIMEOUT_S 5
#define QUEUE_ERR_MAX 256
/* Per-argument framing of the RESP request ("$<len>\r\n...\r\n"), counted
 * into queue_pending_bytes() on top of the argument bytes. */
#define QUEUE_ARG_OVERHEAD 16

enum queue_state {
    QS_WAIT = 0,      /* no context; reconnect timer running */
    QS_CONNECTING,    /* TCP connect in progress */
    QS_HANDSHAKE,     /* AUTH / SELECT / CONFIG GET / XGROUP CREATE sent */
    QS_READY,         /* accepts enqueues */
    QS_CLOSED,        /* queue_close() called and the context is gone */
};

static const char *const queue_state_names[] = {
    [QS_WAIT] = "wait",
    [QS_CONNECTING] = "connecting",
    [QS_HANDSHAKE] = "handshake",
    [QS_READY] = "ready",
    [QS_CLOSED] = "closed",
};

/* What the logs last said about the link, so that connected/disconnected
 * are logged once per transition and not on every failed retry. */
enum queue_link { QL_UNKNOWN = 0, QL_UP, QL_DOWN };

/* Handshake commands, in the order they are sent. The address of an entry
 * is the privdata of its reply callback. */
enum queue_hs_cmd { HS_AUTH = 0, HS_SELECT, HS_CONFIG, HS_XGROUP, HS_N };
static const int queue_hs_tags[HS_N] = {HS_AUTH, HS_SELECT, HS_CONFIG, HS_XGROUP};

/* Commands of one enqueue, in the order they are sent; replies arrive in
 * the same order, so the count of replies seen names the command. */
enum queue_step { ST_MULTI = 0, ST_HSET, ST_XADD, ST_EXEC, ST_WAIT };

struct queue_req {
    struct queue_req *prev, *next;   /* in q->inflight or q->done */
    struct queue *q;
    queue_enqueue_cb cb;
    void *arg;
    char *id;
    size_t bytes;                    /* counted in q->pending_bytes while in flight */
    uint64_t sent_at;                /* uv_now() when sent */
    int refs;                        /* hiredis callbacks still pointing here */
    int nreplies;                    /* replies (or NULL replies) seen */
    int inflight;                    /* 1 while in q->inflight */
    int finished;                    /* outcome decided */
    int delivered;                   /* user callback called */
    int exec_ok;                     /* EXEC returned both results */
    int status;
    char err[QUEUE_ERR_MAX];
    char queued_err[QUEUE_ERR_MAX];  /* first error answered to HSET/XADD */
};

struct queue_list {
    struct queue_req *head, *tail;
};

/* A callback for an enqueue made after the queue's own handles started
 * closing: it gets a timer of its own so that it still runs from the loop
 * and before on_closed. */
struct queue_late {
    uv_timer_t timer;
    struct queue_req *req;
};

struct queue {
    uv_loop_t *loop;
    const struct mf_config *cfg;
    const char *host;
    int port;
    char *ready_key;                 /* <prefix>ready */
    char *msg_prefix;                /* <prefix>msg: */
    char gateway[256];               /* value of the hash's gateway field */
    uint64_t timeout_ms;
    long long wait_ms;

    redisAsyncContext *ac;
    enum queue_state state;
    enum queue_link link;
    uint64_t state_since;            /* uv_now() at the last state change */
    uint64_t backoff_ms;             /* delay before the next attempt */
    unsigned attempts;               /* failed attempts since the last ready */
    unsigned gone_count;             /* incremented each time a context is gone */
    int hs_failed;

    /* Why the current context is being dropped (logs) and what its pending
     * requests are failed with. Empty / 0 when hiredis itself saw the loss. */
    char drop_reason[QUEUE_ERR_MAX];
    int fail_status;
    const char *fail_err;
    int drop_later;                  /* drop from the idle handle */
    char drop_later_reason[QUEUE_ERR_MAX];
    int drop_later_status;
    const char *drop_later_err;

    struct queue_list inflight;      /* sent, ordered by sent_at */
    struct queue_list done;          /* finished, callback not yet called */
    size_t pending_bytes;

    size_t high_water, low_water;
    void (*bp_cb)(int paused, void *arg);
    void *bp_arg;
    int bp_paused;                   /* current state */
    int bp_reported;                 /* state last given to bp_cb */

    uv_timer_t reconnect_timer;
    uv_timer_t watchdog;
    uv_idle_t idle;

    int closing;                     /* queue_close() was called */
    int handles_closing;             /* our own handles are being closed */
    int handles_open;
    unsigned ev_closing;             /* hiredis poll handles being closed */
    unsigned late;                   /* struct queue_late in flight */
    void (*on_closed)(void *arg);
    void *closed_arg;
};

static void queue_connect(struct queue *q);
static void queue_on_reconnect_timer(uv_timer_t *t);
static void queue_on_watchdog(uv_timer_t *t);
static void queue_kick(struct queue *q);
static void queue_maybe_closed(struct queue *q);

/* ---- small helpers ----------------------------------------------------------- */

static void queue_list_push(struct queue_list *l, struct queue_req *r)
{
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail)
        l->tail->next = r;
    else
        l->head = r;
    l->tail = r;
}

static void queue_list_remove(struct queue_list *l, struct queue_req *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
}

static uint64_t queue_epoch_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* The watchdog runs only while something can time out: a connect, a
 * handshake or an enqueue in flight. */
static int queue_watch_needed(const struct queue *q)
{
    return !q->closing && q->ac != NULL &&
           (q->state == QS_CONNECTING || q->state == QS_HANDSHAKE ||
            (q->state == QS_READY && q->inflight.head != NULL));
}

static void queue_watchdog_arm(struct queue *q)
{
    if (queue_watch_needed(q) && !uv_is_active((uv_handle_t *)&q->watchdog))
        uv_timer_start(&q->watchdog, queue_on_watchdog, QUEUE_WATCHDOG_MS, QUEUE_WATCHDOG_MS);
}

static void queue_enter_state(struct queue *q, enum queue_state st)
{
    if (q->state != st)
        log_debug("event=redis_state host=%s port=%d from=%s to=%s", q->host, q->port,
                  queue_state_names[q->state], queue_state_names[st]);
    q->state = st;
    q->state_since = uv_now(q->loop);
    queue_watchdog_arm(q);
}

static void queue_free_req(struct queue_req *r)
{
    free(r->id);
    free(r);
}

/* ---- backpressure -------------------------------------------------------------- */

/* Re-evaluates the paused state after pending_bytes changed. The callback
 * itself is called from the idle handle, with the state current then. */
static void queue_bp_update(struct queue *q)
{
    if (q->bp_cb == NULL || q->high_water == 0)
        return;
    if (!q->bp_paused && q->pending_bytes >= q->high_water) {
        q->bp_paused = 1;
        queue_kick(q);
    } else if (q->bp_paused && q->pending_bytes < q->low_water) {
        q->bp_paused = 0;
        queue_kick(q);
    }
}

/* ---- request completion ---------------------------------------------------------- */

/* Decides a request's outcome (the first decision wins) and queues its
 * user callback for the idle handle. */
static void queue_finish(struct queue_req *r, int status, const char *err)
{
    struct queue *q = r->q;

    if (r->finished)
        return;
    r->finished = 1;
    r->status = status;
    snprintf(r->err, sizeof(r->err), "%s", err ? err : "");
    if (r->inflight) {
        queue_list_remove(&q->inflight, r);
        r->inflight = 0;
        assert(q->pending_bytes >= r->bytes);
        q->pending_bytes -= r->bytes;
        queue_bp_update(q);
    }
    if (status == 0)
        log_debug("id=%s event=redis_stored bytes=%zu", r->id, r->bytes);
    else {
        char eq[QUEUE_ERR_MAX + 16];
        log_debug("id=%s event=redis_store_failed status=%d reason=%s", r->id, status,
                  log_quote(eq, sizeof(eq), r->err, strlen(r->err)));
    }
    queue_list_push(&q->done, r);
    queue_kick(q);
}

/* Copies a Redis error reply's text, which is not NUL-safe to print. */
static void queue_reply_err(char *out, size_t n, const redisReply *reply)
{
    size_t len = reply->str ? (size_t)reply->len : 0;

    if (len >= n)
        len = n - 1;
    if (len)
        memcpy(out, reply->str, len);
    out[len] = '\0';
}

/* Reply callback of every command of an enqueue (privdata: the request). */
static void queue_on_req_reply(redisAsyncContext *ac, void *rp, void *privdata)
{
    struct queue_req *r = privdata;
    struct queue *q = r->q;
    redisReply *reply = rp;
    int step = r->nreplies++;
    char err[QUEUE_ERR_MAX];

    (void)ac;
    assert(r->refs > 0);
    r->refs--;

    if (reply == NULL) {
        /* The context is going away: hiredis flushes every callback. */
        queue_finish(r, q->fail_status ? q->fail_status : -ECONNRESET,
                     q->fail_err ? q->fail_err : "redis: connection lost");
    } else if (!r->finished) {
        switch (step) {
        case ST_MULTI:
        case ST_HSET:
        case ST_XADD:
            /* Errors here are found while queueing (OOM, syntax): EXEC will
             * answer EXECABORT, and this message is the useful one. */
            if (reply->type == REDIS_REPLY_ERROR && r->queued_err[0] == '\0')
                queue_reply_err(r->queued_err, sizeof(r->queued_err), reply);
            break;
        case ST_EXEC:
            if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
                reply->element[0]->type == REDIS_REPLY_INTEGER &&
                reply->element[1]->type == REDIS_REPLY_STRING) {
                r->exec_ok = 1;
                if (q->cfg->queue.wait_replicas <= 0)
                    queue_finish(r, 0, NULL);
            } else if (reply->type == REDIS_REPLY_ERROR) {
                if (r->queued_err[0])
                    queue_finish(r, -EIO, r->queued_err);
                else {
                    queue_reply_err(err, sizeof(err), reply);
                    queue_finish(r, -EIO, err);
                }
            } else if (reply->type == REDIS_REPLY_NIL) {
                queue_finish(r, -EIO, "redis: transaction aborted");
            } else if (reply->type == REDIS_REPLY_ARRAY) {
                /* Runtime error inside the transaction (e.g. WRONGTYPE). */
                const char *msg = "redis: unexpected EXEC reply";
                for (size_t i = 0; i < reply->elements; i++) {
                    if (reply->element[i]->type == REDIS_REPLY_ERROR) {
                        queue_reply_err(err, sizeof(err), reply->element[i]);
                        msg = err;
                        break;
                    }
                }
                queue_finish(r, -EIO, msg);
            } else {
                queue_finish(r, -EIO, "redis: unexpected EXEC reply");
            }
            break;
        case ST_WAIT:
            if (!r->exec_ok)
                break;
            if (reply->type == REDIS_REPLY_INTEGER &&
                reply->integer >= (long long)q->cfg->queue.wait_replicas) {
                queue_finish(r, 0, NULL);
            } else if (reply->type == REDIS_REPLY_INTEGER) {
                snprintf(err, sizeof(err), "redis: WAIT reached %lld of %d replicas",
                         reply->integer, q->cfg->queue.wait_replicas);
                queue_finish(r, -EIO, err);
            } else if (reply->type == REDIS_REPLY_ERROR) {
                queue_reply_err(err, sizeof(err), reply);
                queue_finish(r, -EIO, err);
            } else {
                queue_finish(r, -EIO, "redis: unexpected WAIT reply");
            }
            break;
        default:
            break;
        }
    }
    if (r->refs == 0 && r->delivered)
        queue_free_req(r);
}

/* ---- connection ------------------------------------------------------------------ */

/* Called exactly once per context, when it is gone (failed connect,
 * disconnect callback, or freed before it connected). Every reply callback
 * of the context has run by then. */
static void queue_gone(struct queue *q, const char *reason)
{
    char rq[QUEUE_ERR_MAX + 16];

    q->gone_count++;
    q->ac = NULL;
    /* hiredis ran every reply callback with NULL before this point. */
    assert(q->inflight.head == NULL);

    log_quote(rq, sizeof(rq), reason, strlen(reason));
    if (q->closing) {
        log_debug("event=redis_closed host=%s port=%d", q->host, q->port);
    } else if (q->link != QL_DOWN) {
        log_warn("event=redis_disconnected host=%s port=%d state=%s reason=%s", q->host,
                 q->port, queue_state_names[q->state], rq);
    } else {
        log_debug("event=redis_connect_failed host=%s port=%d attempt=%u state=%s reason=%s",
                  q->host, q->port, q->attempts, queue_state_names[q->state], rq);
    }
    if (!q->closing)
        q->link = QL_DOWN;

    q->drop_reason[0] = '\0';
    q->fail_status = 0;
    q->fail_err = NULL;
    q->drop_later = 0;
    q->hs_failed = 0;

    if (q->closing) {
        queue_enter_state(q, QS_CLOSED);
        queue_kick(q);
        return;
    }
    queue_enter_state(q, QS_WAIT);
    log_debug("event=redis_reconnect_scheduled host=%s port=%d delay_ms=%llu", q->host, q->port,
              (unsigned long long)q->backoff_ms);
    uv_timer_start(&q->reconnect_timer, queue_on_reconnect_timer, q->backoff_ms, 0);
}

/*
 * Drops the current context now: every pending request fails with
 * (status, err), and the module reconnects after the backoff (or finishes
 * closing). Must not be called from inside a hiredis callback.
 */
static void queue_drop(struct queue *q, const char *reason, int status, const char *err)
{
    unsigned gen = q->gone_count;

    if (q->ac == NULL)
        return;
    snprintf(q->drop_reason, sizeof(q->drop_reason), "%s", reason);
    q->fail_status = status;
    q->fail_err = err;
    redisAsyncFree(q->ac);
    /* A context that never completed its connect gets no disconnect
     * callback: it is gone now all the same. */
    if (q->gone_count == gen) {
        char why[QUEUE_ERR_MAX];
        snprintf(why, sizeof(why), "%s", reason);
        queue_gone(q, why);
    }
}

/* Asks the idle handle to drop the connection; for decisions taken inside
 * hiredis callbacks. The first reason wins. */
static void queue_drop_later(struct queue *q, const char *reason, int status, const char *err)
{
    if (q->drop_later)
        return;
    q->drop_later = 1;
    snprintf(q->drop_later_reason, sizeof(q->drop_later_reason), "%s", reason);
    q->drop_later_status = status;
    q->drop_later_err = err;
    queue_kick(q);
}

static void queue_on_disconnect(const redisAsyncContext *ac, int status)
{
    struct queue *q = ac->data;
    char why[QUEUE_ERR_MAX];

    if (q->drop_reason[0])
        snprintf(why, sizeof(why), "%s", q->drop_reason);
    else if (status != REDIS_OK && ac->errstr)
        snprintf(why, sizeof(why), "%s", ac->errstr);
    else if (ac->c.err)
        snprintf(why, sizeof(why), "%s", ac->c.errstr);
    else
        snprintf(why, sizeof(why), "disconnected");
    queue_gone(q, why);
}

static void queue_hs_fail(struct queue *q, const char *what, const redisReply *reply)
{
    char err[QUEUE_ERR_MAX / 2], why[QUEUE_ERR_MAX];

    queue_reply_err(err, sizeof(err), reply);
    snprintf(why, sizeof(why), "%s: %s", what, err);
    q->hs_failed = 1;
    queue_drop_later(q, why, -ECONNRESET, "redis: connection lost");
}

/* Reply callback of the handshake commands (privdata: &queue_hs_tags[i]). */
static void queue_on_hs_reply(redisAsyncContext *ac, void *rp, void *privdata)
{
    struct queue *q = ac->data;
    redisReply *reply = rp;
    int cmd = *(const int *)privdata;
    char eq[QUEUE_ERR_MAX + 16];

    if (reply == NULL || q->hs_failed || q->state != QS_HANDSHAKE)
        return;

    switch (cmd) {
    case HS_AUTH:
        if (reply->type == REDIS_REPLY_ERROR)
            queue_hs_fail(q, "AUTH failed", reply);
        break;
    case HS_SELECT:
        if (reply->type == REDIS_REPLY_ERROR)
            queue_hs_fail(q, "SELECT failed", reply);
        break;
    case HS_CONFIG:
        /* CONFIG is often renamed or disabled on managed Redis: not being
         * able to check is not a reason to refuse mail. */
        if (reply->type == REDIS_REPLY_ERROR) {
            log_debug("event=redis_config_refused host=%s port=%d reason=%s", q->host, q->port,
                      log_quote(eq, sizeof(eq), reply->str ? reply->str : "",
                                reply->str ? (size_t)reply->len : 0));
        } else if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
                   reply->element[1]->type == REDIS_REPLY_STRING &&
                   reply->element[1]->len == 2 &&
                   memcmp(reply->element[1]->str, "no", 2) == 0) {
            log_warn("event=redis_appendonly_off host=%s port=%d "
                     "reason=\"appendonly is no: acknowledged mail is lost if Redis restarts "
                     "between snapshots\"",
                     q->host, q->port);
        }
        break;
    case HS_XGROUP:
        if (reply->type == REDIS_REPLY_ERROR &&
            !(reply->len >= 9 && memcmp(reply->str, "BUSYGROUP", 9) == 0)) {
            queue_hs_fail(q, "XGROUP CREATE failed", reply);
            break;
        }
        /* Last handshake reply, every earlier one succeeded. */
        queue_enter_state(q, QS_READY);
        q->backoff_ms = QUEUE_BACKOFF_MIN_MS;
        q->attempts = 0;
        if (q->link != QL_UP)
            log_info("event=redis_connected host=%s port=%d db=%d", q->host, q->port,
                     q->cfg->queue.url.db);
        q->link = QL_UP;
        break;
    default:
        break;
    }
}

static int queue_send_hs(struct queue *q, int cmd, int argc, const char **argv)
{
    size_t lens[8];

    assert(argc <= 8);

    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    return redisAsyncCommandArgv(q->ac, queue_on_hs_reply, (void *)&queue_hs_tags[cmd], argc,
                                 argv, lens);
}

static void queue_on_connect(const redisAsyncContext *cac, int status)
{
    struct queue *q = cac->data;
    const struct config_redis *u = &q->cfg->queue.url;
    char db[16];
    const char *auth[2] = {"AUTH", u->password};
    const char *sel[2] = {"SELECT", db};
    const char *conf[3] = {"CONFIG", "GET", "appendonly"};
    const char *grp[6] = {"XGROUP", "CREATE", q->ready_key, SCHEMA_GROUP, "$", "MKSTREAM"};
    int rc = REDIS_OK;

    if (status != REDIS_OK) {
        /* hiredis frees the context when this callback returns and makes
         * no disconnect call. */
        char why[QUEUE_ERR_MAX];
        snprintf(why, sizeof(why), "connect: %s", cac->c.errstr[0] ? cac->c.errstr : "failed");
        queue_gone(q, why);
        return;
    }
    queue_enter_state(q, QS_HANDSHAKE);
    snprintf(db, sizeof(db), "%d", u->db);
    /* The handshake is pipelined; replies come back in order and XGROUP's
     * is the last, so its callback decides readiness. */
    if (u->password && u->password[0])
        rc = queue_send_hs(q, HS_AUTH, 2, auth);
    if (rc == REDIS_OK)
        rc = queue_send_hs(q, HS_SELECT, 2, sel);
    if (rc == REDIS_OK)
        rc = queue_send_hs(q, HS_CONFIG, 3, conf);
    if (rc == REDIS_OK)
        rc = queue_send_hs(q, HS_XGROUP, 6, grp);
    if (rc != REDIS_OK) {
        /* Freeing the context inside its connect callback is not allowed. */
        q->hs_failed = 1;
        queue_drop_later(q, "handshake: command refused by client", -ECONNRESET,
                         "redis: connection lost");
    }
}

static void queue_ev_closed(uv_handle_t *h)
{
    struct queue *q = h->data;
    redisLibuvEvents *p = (redisLibuvEvents *)(void *)((char *)h - offsetof(redisLibuvEvents, handle));

    free(p);   /* allocated with malloc() by redisLibuvAttach() */
    assert(q->ev_closing > 0);
    q->ev_closing--;
    queue_maybe_closed(q);
}

/*
 * Poll callback used instead of the adapter's redisLibuvPoll(). libuv
 * reports POLLERR (a connection reset by the peer, e.g. Redis killed while
 * our commands sat unread in its socket) as a negative status and stops the
 * handle; the 0.14 adapter ignores that status, so the loss would only be
 * found by the watchdog, or never on an idle connection. Reading makes
 * hiredis fetch the socket error and disconnect.
 */
static void queue_ev_poll(uv_poll_t *h, int status, int events)
{
    redisLibuvEvents *p = h->data;

    if (p->context == NULL)
        return;
    if (status < 0) {
        redisAsyncHandleRead(p->context);
        return;
    }
    if (events & UV_READABLE)
        redisAsyncHandleRead(p->context);
    /* The read may have freed the context (cleanup clears p->context). */
    if (p->context != NULL && (events & UV_WRITABLE))
        redisAsyncHandleWrite(p->context);
}

static void queue_ev_update(redisLibuvEvents *p)
{
    if (p->events)
        uv_poll_start(&p->handle, p->events, queue_ev_poll);
    else
        uv_poll_stop(&p->handle);
}

static void queue_ev_add_read(void *privdata)
{
    redisLibuvEvents *p = privdata;

    p->events |= UV_READABLE;
    queue_ev_update(p);
}

static void queue_ev_del_read(void *privdata)
{
    redisLibuvEvents *p = privdata;

    p->events &= ~UV_READABLE;
    queue_ev_update(p);
}

static void queue_ev_add_write(void *privdata)
{
    redisLibuvEvents *p = privdata;

    p->events |= UV_WRITABLE;
    queue_ev_update(p);
}

static void queue_ev_del_write(void *privdata)
{
    redisLibuvEvents *p = privdata;

    p->events &= ~UV_WRITABLE;
    queue_ev_update(p);
}

/* Replaces the adapter's redisLibuvCleanup(): same work, but the close of
 * the poll handle is counted so that queue_close() can wait for it. */
static void queue_ev_cleanup(void *privdata)
{
    redisLibuvEvents *p = privdata;
    struct queue *q = p->context->data;

    p->context->ev.cleanup = NULL;
    p->context = NULL;
    p->handle.data = q;
    q->ev_closing++;
    uv_close((uv_handle_t *)&p->handle, queue_ev_closed);
}

/* Starts one connection attempt. Failures that hiredis reports at once
 * (address resolution, refused on loopback) go straight to queue_gone(). */
static void queue_connect(struct queue *q)
{
    redisAsyncContext *ac;
    char why[QUEUE_ERR_MAX];

    q->attempts++;
    queue_enter_state(q, QS_CONNECTING);
    log_debug("event=redis_connecting host=%s port=%d attempt=%u", q->host, q->port, q->attempts);
    /* hiredis resolves names with a blocking getaddrinfo(); use an address
     * or a name /etc/hosts answers when that matters. */
    ac = redisAsyncConnect(q->host, q->port);
    if (ac == NULL) {
        log_error("event=oom where=redisAsyncConnect");
        abort();
    }
    if (ac->err) {
        snprintf(why, sizeof(why), "connect: %s", ac->errstr ? ac->errstr : "failed");
        redisAsyncFree(ac);
        q->ac = NULL;
        queue_gone(q, why);
        return;
    }
    if (redisLibuvAttach(ac, q->loop) != REDIS_OK) {
        /* The adapter set its hooks before failing; unset them so that the
         * free does not call them with no event data. */
        ac->ev.addRead = ac->ev.delRead = ac->ev.addWrite = ac->ev.delWrite = NULL;
        ac->ev.cleanup = NULL;
        redisAsyncFree(ac);
        q->ac = NULL;
        queue_gone(q, "connect: cannot watch the socket");
        return;
    }
    /* redisLibuvAttach() set up the uv_poll_t; its hooks are replaced by
     * the ones above (error status handled, close counted). */
    ac->data = q;
    ac->ev.addRead = queue_ev_add_read;
    ac->ev.delRead = queue_ev_del_read;
    ac->ev.addWrite = queue_ev_add_write;
    ac->ev.delWrite = queue_ev_del_write;
    ac->ev.cleanup = queue_ev_cleanup;
    /* Dead peers behind a silent network are found by keepalive even when
     * no command is in flight. */
    redisEnableKeepAlive(&ac->c);
    q->ac = ac;
    redisAsyncSetDisconnectCallback(ac, queue_on_disconnect);
    redisAsyncSetConnectCallback(ac, queue_on_connect);
    queue_watchdog_arm(q);
}

static void queue_on_reconnect_timer(uv_timer_t *t)
{
    struct queue *q = t->data;
    uint64_t next = q->backoff_ms * 2;

    q->backoff_ms = next > QUEUE_BACKOFF_MAX_MS ? QUEUE_BACKOFF_MAX_MS : next;
    if (!q->closing && q->ac == NULL)
        queue_connect(q);
}

/* Abandons a connect, handshake or enqueue older than [queue] timeout. */
static void queue_on_watchdog(uv_timer_t *t)
{
    struct queue *q = t->data;
    uint64_t now = uv_now(q->loop);

    if (!queue_watch_needed(q)) {
        uv_timer_stop(&q->watchdog);
        return;
    }
    if ((q->state == QS_CONNECTING || q->state == QS_HANDSHAKE) &&
        now - q->state_since >= q->timeout_ms) {
        queue_drop(q, q->state == QS_CONNECTING ? "timeout: connect" : "timeout: handshake",
                   -ETIMEDOUT, "redis: timeout");
    } else if (q->state == QS_READY && q->inflight.head &&
               now - q->inflight.head->sent_at >= q->timeout_ms) {
        char why[QUEUE_ERR_MAX];
        snprintf(why, sizeof(why), "timeout: id=%s waited %llu ms", q->inflight.head->id,
                 (unsigned long long)(now - q->inflight.head->sent_at));
        queue_drop(q, why, -ETIMEDOUT, "redis: timeout");
    }
}

/* ---- the idle handle: deferred callbacks and drops ---------------------------------- */

static void queue_handle_closed(uv_handle_t *h)
{
    struct queue *q = h->data;

    q->handles_open--;
    queue_maybe_closed(q);
}

static void queue_maybe_closed(struct queue *q)
{
    void (*cb)(void *);
    void *arg;

    if (!q->handles_closing || q->handles_open > 0 || q->ev_closing > 0 || q->late > 0)
        return;
    cb = q->on_closed;
    arg = q->closed_arg;
    free(q->ready_key);
    free(q->msg_prefix);
    free(q);
    if (cb)
        cb(arg);
}

static void queue_deliver(struct queue_req *r)
{
    r->delivered = 1;
    r->cb(r->status, r->status ? r->err : NULL, r->arg);
    if (r->refs == 0)
        queue_free_req(r);
}

static void queue_on_idle(uv_idle_t *h)
{
    struct queue *q = h->data;
    struct queue_list batch;
    struct queue_req *r;

    if (q->drop_later) {
        char why[QUEUE_ERR_MAX];
        snprintf(why, sizeof(why), "%s", q->drop_later_reason);
        q->drop_later = 0;
        queue_drop(q, why, q->drop_later_status, q->drop_later_err);
    }

    /* Only the requests finished so far: a callback that enqueues again at
     * once while Redis is down must not keep this loop spinning. */
    batch = q->done;
    q->done.head = q->done.tail = NULL;
    while ((r = batch.head) != NULL) {
        queue_list_remove(&batch, r);
        queue_deliver(r);
    }

    if (!q->closing && q->bp_cb && q->bp_reported != q->bp_paused) {
        q->bp_reported = q->bp_paused;
        q->bp_cb(q->bp_paused, q->bp_arg);
    }

    if (q->done.head || q->drop_later ||
        (!q->closing && q->bp_cb && q->bp_reported != q->bp_paused))
        return;
    uv_idle_stop(&q->idle);

    if (q->closing && q->ac == NULL && !q->handles_closing) {
        q->handles_closing = 1;
        uv_close((uv_handle_t *)&q->reconnect_timer, queue_handle_closed);
        uv_close((uv_handle_t *)&q->watchdog, queue_handle_closed);
        uv_close((uv_handle_t *)&q->idle, queue_handle_closed);
    }
}

static void queue_kick(struct queue *q)
{
    if (!q->handles_closing)
        uv_idle_start(&q->idle, queue_on_idle);
}

static void queue_late_closed(uv_handle_t *h)
{
    struct queue_late *l = h->data;
    struct queue *q = l->req->q;

    queue_free_req(l->req);
    free(l);
    q->late--;
    queue_maybe_closed(q);
}

static void queue_on_late(uv_timer_t *t)
{
    struct queue_late *l = t->data;
    struct queue_req *r = l->req;

    r->delivered = 1;
    r->cb(r->status, r->err, r->arg);
    uv_close((uv_handle_t *)&l->timer, queue_late_closed);
}

/* Fails a request that was never sent, from the loop. */
static void queue_fail_unsent(struct queue *q, struct queue_req *r, int status, const char *err)
{
    if (q->handles_closing) {
        struct queue_late *l = xcalloc(1, sizeof(*l));
        r->finished = 1;
        r->status = status;
        snprintf(r->err, sizeof(r->err), "%s", err);
        l->req = r;
        uv_timer_init(q->loop, &l->timer);
        l->timer.data = l;
        q->late++;
        uv_timer_start(&l->timer, queue_on_late, 0, 0);
        return;
    }
    queue_finish(r, status, err);
}

/* ---- public interface ------------------------------------------------------------- */

struct queue *queue_new(uv_loop_t *loop, const struct mf_config *cfg)
{
    struct queue *q = xcalloc(1, sizeof(*q));
    const char *prefix = cfg->queue.prefix ? cfg->queue.prefix : "mf:";
    struct buf b = BUF_INIT;

    q->loop = loop;
    q->cfg = cfg;
    q->host = cfg->queue.url.host && cfg->queue.url.host[0] ? cfg->queue.url.host : "127.0.0.1";
    q->port = cfg->queue.url.port > 0 ? cfg->queue.url.port : 6379;
    buf_appendf(&b, "%s%s", prefix, SCHEMA_READY);
    q->ready_key = buf_steal(&b, NULL);
    buf_appendf(&b, "%s%s", prefix, SCHEMA_MSG);
    q->msg_prefix = buf_steal(&b, NULL);

    if (cfg->gateway.hostname && cfg->gateway.hostname[0])
        snprintf(q->gateway, sizeof(q->gateway), "%s", cfg->gateway.hostname);
    else if (gethostname(q->gateway, sizeof(q->gateway) - 1) != 0)
        snprintf(q->gateway, sizeof(q->gateway), "unknown");
    q->gateway[sizeof(q->gateway) - 1] = '\0';

    q->timeout_ms = (uint64_t)(cfg->queue.timeout > 0 ? cfg->queue.timeout
                                                     : QUEUE_DEFAULT_TIMEOUT_S) * 1000u;
    /* WAIT blocks on the server for its timeout (forever for 0), and the
     * watchdog abandons the connection at [queue] timeout: keep WAIT's
     * timeout below it so that a missing replica is a clean failure. */
    q->wait_ms = cfg->queue.wait_timeout;
    if (cfg->queue.wait_replicas > 0 &&
        (q->wait_ms <= 0 || (uint64_t)q->wait_ms >= q->timeout_ms)) {
        q->wait_ms = (long long)(q->timeout_ms / 2);
        log_warn("event=redis_wait_timeout_adjusted wait_timeout_ms=%d used_ms=%lld "
                 "reason=\"must be between 1 and [queue] timeout\"",
                 cfg->queue.wait_timeout, q->wait_ms);
    }

    q->backoff_ms = QUEUE_BACKOFF_MIN_MS;
    uv_timer_init(loop, &q->reconnect_timer);
    uv_timer_init(loop, &q->watchdog);
    uv_idle_init(loop, &q->idle);
    q->reconnect_timer.data = q->watchdog.data = q->idle.data = q;
    q->handles_open = 3;

    queue_connect(q);
    return q;
}

void queue_close(struct queue *q, void (*on_closed)(void *arg), void *arg)
{
    assert(!q->closing);
    q->closing = 1;
    q->on_closed = on_closed;
    q->closed_arg = arg;
    uv_timer_stop(&q->reconnect_timer);
    uv_timer_stop(&q->watchdog);
    if (q->ac)
        queue_drop(q, "queue closed", -ECANCELED, "redis: queue closed");
    else
        queue_enter_state(q, QS_CLOSED);
    queue_kick(q);
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
    json_decref(arr);
    return s;
}

static int queue_send(struct queue *q, struct queue_req *r, int argc, const char **argv,
                      const size_t *lens)
{
    int rc = redisAsyncCommandArgv(q->ac, queue_on_req_reply, r, argc, argv, lens);

    if (rc == REDIS_OK) {
        r->refs++;
        for (int i = 0; i < argc; i++)
            r->bytes += lens[i] + QUEUE_ARG_OVERHEAD;
    }
    return rc;
}

void queue_enqueue(struct queue *q, const char *id, const struct queue_msg *m,
                   queue_enqueue_cb cb, void *arg)
{
    struct queue_req *r = xcalloc(1, sizeof(*r));
    char size[24], created[24], wn[16], wt[24];
    struct buf key = BUF_INIT;
    char *rcpts;
    int rc;

    r->q = q;
    r->cb = cb;
    r->arg = arg;
    r->id = xstrdup(id);

    if (q->closing) {
        queue_fail_unsent(q, r, -ECANCELED, "redis: queue closed");
        return;
    }
    if (q->state != QS_READY || q->ac == NULL) {
        queue_fail_unsent(q, r, -ENOTCONN, "redis: not connected");
        return;
    }
    rcpts = queue_rcpts_json(m);
    if (rcpts == NULL) {
        queue_fail_unsent(q, r, -EINVAL, "queue: recipient is not valid UTF-8");
        return;
    }

    buf_appendf(&key, "%s%s", q->msg_prefix, id);
    snprintf(size, sizeof(size), "%zu", m->datalen);
    snprintf(created, sizeof(created), "%llu", (unsigned long long)queue_epoch_ms());

    const char *multi[1] = {"MULTI"};
    size_t multi_l[1] = {5};
    const char *hset[22] = {
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
    size_t hset_l[22];
    const char *xadd[5] = {"XADD", q->ready_key, "*", SCHEMA_F_ID, id};
    size_t xadd_l[5];
    const char *exec[1] = {"EXEC"};
    size_t exec_l[1] = {4};

    for (int i = 0; i < 22; i++) {
        if (i == 7)
            hset_l[i] = m->data ? m->datalen : 0;   /* binary, not NUL-terminated */
        else
            hset_l[i] = strlen(hset[i]);
    }
    for (int i = 0; i < 5; i++)
        xadd_l[i] = strlen(xadd[i]);

    r->sent_at = uv_now(q->loop);
    r->inflight = 1;
    queue_list_push(&q->inflight, r);

    rc = queue_send(q, r, 1, multi, multi_l);
    if (rc == REDIS_OK)
        rc = queue_send(q, r, 22, hset, hset_l);
    if (rc == REDIS_OK)
        rc = queue_send(q, r, 5, xadd, xadd_l);
    if (rc == REDIS_OK)
        rc = queue_send(q, r, 1, exec, exec_l);
    if (rc == REDIS_OK && q->cfg->queue.wait_replicas > 0) {
        const char *waitv[3] = {"WAIT", wn, wt};
        size_t wait_l[3];
        snprintf(wn, sizeof(wn), "%d", q->cfg->queue.wait_replicas);
        snprintf(wt, sizeof(wt), "%lld", q->wait_ms);
        wait_l[0] = 4;
        wait_l[1] = strlen(wn);
        wait_l[2] = strlen(wt);
        rc = queue_send(q, r, 3, waitv, wait_l);
    }
    free(rcpts);
    buf_free(&key);

    q->pending_bytes += r->bytes;
    queue_watchdog_arm(q);
    if (rc != REDIS_OK) {
        if (r->refs == 0) {
            /* Nothing was handed to hiredis. */
            queue_finish(r, -ECONNRESET, "redis: command refused by client");
        } else {
            /* Part of the transaction is queued without its EXEC: drop the
             * connection so that Redis discards the open MULTI. */
            queue_drop(q, "command refused by client", -ECONNRESET, "redis: connection lost");
        }
        return;
    }
    queue_bp_update(q);
}

int queue_ready(const struct queue *q)
{
    return q->state == QS_READY && !q->closing;
}

size_t queue_pending_bytes(const struct queue *q)
{
    return q->pending_bytes;
}

void queue_set_backpressure(struct queue *q, size_t high_water, size_t low_water,
                            void (*on_change)(int paused, void *arg), void *arg)
{
    if (low_water > high_water)
        low_water = high_water;
    q->high_water = high_water;
    q->low_water = low_water;
    q->bp_cb = on_change;
    q->bp_arg = arg;
    q->bp_paused = 0;
    q->bp_reported = 0;
    queue_bp_update(q);
}
