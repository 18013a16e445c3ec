/*
 * redis: one asynchronous Redis connection (hiredis 0.14 async API on the
 * libuv loop), with reconnection, a handshake hook, timeouts, scripts,
 * MULTI/EXEC groups and exactly-once callbacks. The contract is in
 * lib/redis.h.
 *
 * Life of the connection. One redisAsyncContext exists at a time. The
 * module moves through the states in rd_state_names[]:
 *
 *   wait -> connecting -> handshake -> hook -> ready
 *     ^          |            |          |        |
 *     +----------+------------+----------+--------+  (loss, error or timeout)
 *
 * "wait" is the backoff pause (100 ms doubling to 5 s) before the next
 * attempt. "handshake" runs AUTH (when the URL has a password) and SELECT,
 * pipelined. "hook" runs the caller's hook, which issues its own commands
 * and ends with redis_hook_done(). Only "ready" accepts other commands:
 * there is no queue, a command issued in any other state fails with
 * "redis: not connected". hiredis 0.14 has no timeouts of its own, so a
 * watchdog timer drops the connection when a connect, handshake, hook or
 * command has taken longer than opts.timeout.
 *
 * hiredis 0.14 lifetime rules this file relies on (async.c):
 *  - redisAsyncFree() runs every pending reply callback with a NULL reply,
 *    then the event library's cleanup hook, then the disconnect callback
 *    (only when the connection had completed), then frees the context.
 *    Called inside a reply callback (REDIS_IN_CALLBACK) it only sets a flag
 *    and the free happens when the callback returns.
 *  - A failed connect calls the connect callback with REDIS_ERR and frees
 *    the context when it returns, without a disconnect callback.
 *  - The connect callback runs outside the REDIS_IN_CALLBACK guard and
 *    hiredis goes on writing after it returns, so the context must not be
 *    freed there.
 *  Hence: the context is freed only by rd_drop(), and rd_drop() is never
 *  run inside a hiredis callback. A drop decided inside one (a handshake
 *  error, redis_hook_done(r, -1) or redis_close() from a user's reply
 *  callback) is deferred to the idle handle (rd_drop_later()).
 *  - The libuv adapter's cleanup hook uv_close()s its uv_poll_t and frees
 *    it in the close callback, one loop iteration after the context is
 *    gone. The module installs an equivalent hook that also counts those
 *    handles, so closed() runs only after they are closed and
 *    uv_loop_close() succeeds right after it.
 *  - The adapter ignores poll errors, and libuv reports a refused connect
 *    as one (POLLERR): redisLibuvAttach() sets up the adapter's data, and
 *    the module then installs its own add/del hooks whose poll callback
 *    hands errors to hiredis (rd_ev_poll()).
 *  - hiredis writes with write(2), not send(MSG_NOSIGNAL): the process must
 *    ignore SIGPIPE.
 *
 * Requests and callbacks. Every user command (a single command, a
 * MULTI/EXEC group, an EVALSHA) is one struct rd_req. Replies are handed to
 * the user from the hiredis reply callback, since hiredis owns and frees
 * the reply when that callback returns. Failures (a lost connection, a
 * timeout, redis_close(), a command issued while not ready) are decided
 * with no reply to pass and the user is called from the idle handle, never
 * from inside the public function that issued the command nor from inside
 * hiredis's teardown. A request is "finished" once its outcome is decided;
 * the first decision wins. Its memory is released once its callback was
 * made and no hiredis callback still points to it (refs == 0).
 *
 * Outcome of a MULTI/EXEC group. Only the EXEC reply matters. To tell
 * "EXEC never reached the socket" (nothing applied: the connection loss is
 * reported as such) from "EXEC was written and no reply came" (outcome
 * unknown), the module counts the bytes it appended to the context's
 * output buffer (conn_out); bytes written = conn_out - sdslen(obuf).
 */
#include "lib/redis.h"

#include <assert.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/adapters/libuv.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <hiredis/sds.h>
#include <openssl/sha.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

#define RD_BACKOFF_MIN_MS 100
#define RD_BACKOFF_MAX_MS 5000
#define RD_WATCHDOG_MS 250
#define RD_DEFAULT_TIMEOUT_S 5
#define RD_ERR_MAX 512
/* Room for a Redis error text inside one of our messages. */
#define RD_REPLY_ERR_MAX (RD_ERR_MAX - 64)

/* Error texts given to callbacks; the header lists them. */
static const char RD_E_NOT_CONNECTED[] = "redis: not connected";
static const char RD_E_LOST[] = "redis: connection lost";
static const char RD_E_TIMEOUT[] = "redis: timeout";
static const char RD_E_CLOSED[] = "redis: closed";
static const char RD_E_UNKNOWN[] = "redis: outcome unknown";
static const char RD_E_BAD_COMMAND[] = "redis: cannot format command";

enum rd_state {
    RS_WAIT = 0,      /* no context; reconnect timer running */
    RS_CONNECTING,    /* TCP connect in progress */
    RS_HANDSHAKE,     /* AUTH / SELECT sent */
    RS_HOOK,          /* the caller's hook runs */
    RS_READY,         /* accepts commands */
    RS_CLOSED,        /* redis_close() called and the context is gone */
};

static const char *const rd_state_names[] = {
    [RS_WAIT] = "wait",
    [RS_CONNECTING] = "connecting",
    [RS_HANDSHAKE] = "handshake",
    [RS_HOOK] = "hook",
    [RS_READY] = "ready",
    [RS_CLOSED] = "closed",
};

/* What the logs last said about the link, so that connected/disconnected
 * are logged once per transition and not on every failed retry. */
enum rd_link { RL_UNKNOWN = 0, RL_UP, RL_DOWN };

/* Handshake commands; the address of an entry is the privdata of its
 * reply callback. */
enum rd_hs_cmd { HS_AUTH = 0, HS_SELECT, HS_N };
static const int rd_hs_tags[HS_N] = {HS_AUTH, HS_SELECT};
static const char *const rd_hs_names[HS_N] = {"AUTH", "SELECT"};

enum rd_kind { RK_COMMAND = 0, RK_MULTI, RK_EVAL };

struct rd_req {
    struct rd_req *prev, *next;  /* in r->inflight or r->done */
    struct redis *r;
    redis_cb cb;
    void *arg;
    enum rd_kind kind;
    int hook;                    /* issued by the hook (sent before ready) */
    int refs;                    /* hiredis reply callbacks still pointing here */
    int nsent;                   /* commands handed to hiredis */
    int nreplies;                /* replies (or NULL replies) seen */
    int inflight;                /* 1 while in r->inflight */
    int finished;                /* outcome decided */
    int delivered;               /* user callback made */
    size_t bytes;                /* counted in r->pending_bytes while in flight */
    uint64_t sent_at;            /* rd_now_ms() when sent */

    /* RK_MULTI: the context's conn_out once EXEC was appended. */
    uint64_t exec_end;
    char queued_err[RD_REPLY_ERR_MAX]; /* first error answered while queueing */

    /* RK_EVAL: "numkeys keys... args..." as RESP bulk strings, kept until
     * the request is done so that NOSCRIPT can be answered with EVAL. */
    const struct redis_script *script;
    char *eval_args;
    size_t eval_args_len;
    int eval_nargs;
    int eval_fallback;           /* EVAL was sent */

    char err[RD_ERR_MAX];        /* failure text, when finished without reply */
};

struct rd_list {
    struct rd_req *head, *tail;
};

/* A callback for a command issued after the module's own handles started
 * closing: it gets a timer of its own so that it still runs from the loop
 * and before closed(). */
struct rd_late {
    uv_timer_t timer;
    struct rd_req *req;
};

struct redis {
    uv_loop_t *loop;
    char *name;                  /* for logs */
    char *host;
    char *password;              /* NULL when none */
    char *addr;                  /* "host:port" for logs */
    int port;
    int db;
    uint64_t timeout_ms;
    redis_ready_hook hook;
    void *hook_arg;

    redisAsyncContext *ac;
    enum rd_state state;
    enum rd_link link;
    uint64_t state_since;        /* rd_now_ms() at the last state change */
    uint64_t backoff_ms;         /* delay before the next attempt */
    unsigned attempts;           /* attempts since the last ready */
    unsigned gone_count;         /* incremented each time a context is gone */
    uint64_t conn_out;           /* bytes appended to the context's output */
    int hs_dropping;             /* a handshake step failed; ignore the rest */

    /* Why the current context is being dropped (logs) and what its pending
     * requests fail with; empty / NULL when hiredis itself saw the loss. */
    char drop_reason[RD_ERR_MAX];
    const char *fail_err;
    int drop_later;              /* drop from the idle handle */
    char drop_later_reason[RD_ERR_MAX];
    const char *drop_later_err;

    int hook_pending;            /* call the hook from the idle handle */
    int hook_depth;              /* > 0 while hook code runs */
    int in_reply;                /* > 0 while a user callback runs inside hiredis */

    struct rd_list inflight;     /* sent, ordered by sent_at */
    struct rd_list done;         /* failed, callback not yet made */
    size_t pending_bytes;

    size_t high_water, low_water;
    void (*bp_cb)(int paused, void *arg);
    void *bp_arg;
    int bp_paused;               /* current state */
    int bp_reported;             /* state last given to bp_cb */

    uv_timer_t reconnect_timer;
    uv_timer_t watchdog;
    uv_idle_t idle;

    int closing;                 /* redis_close() was called */
    int handles_closing;         /* our own handles are being closed */
    int handles_open;
    unsigned ev_closing;         /* hiredis poll handles being closed */
    unsigned late;               /* struct rd_late in flight */
    void (*closed)(void *arg);
    void *closed_arg;
};

static void rd_connect(struct redis *r);
static void rd_drop(struct redis *r, const char *reason, const char *err);
static void rd_kick(struct redis *r);
static void rd_maybe_closed(struct redis *r);
static void rd_on_watchdog(uv_timer_t *t);

/* ---- small helpers ---------------------------------------------------------------- */

static void rd_list_push(struct rd_list *l, struct rd_req *q)
{
    q->next = NULL;
    q->prev = l->tail;
    if (l->tail)
        l->tail->next = q;
    else
        l->head = q;
    l->tail = q;
}

static void rd_list_remove(struct rd_list *l, struct rd_req *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        l->head = q->next;
    if (q->next)
        q->next->prev = q->prev;
    else
        l->tail = q->prev;
    q->prev = q->next = NULL;
}

/* Copies the text of an error (or status) reply, which is counted, not
 * NUL-terminated by contract. */
static void rd_copy_reply_str(char *out, size_t n, const redisReply *reply)
{
    size_t len = reply->str ? (size_t)reply->len : 0;

    if (len >= n)
        len = n - 1;
    if (len)
        memcpy(out, reply->str, len);
    out[len] = '\0';
}

static int rd_reply_is(const redisReply *reply, const char *prefix)
{
    size_t n = strlen(prefix);

    return reply->type == REDIS_REPLY_ERROR && reply->str && (size_t)reply->len >= n &&
           memcmp(reply->str, prefix, n) == 0;
}

/* Milliseconds of the monotonic clock. Not uv_now(): the loop's cached time
 * lags behind when a callback ran long, and a command stamped with it would
 * look older than it is. */
static uint64_t rd_now_ms(void)
{
    return uv_hrtime() / 1000000u;
}

/* The watchdog runs only while something can time out. */
static int rd_watch_needed(const struct redis *r)
{
    return !r->closing && r->ac != NULL &&
           (r->state == RS_CONNECTING || r->state == RS_HANDSHAKE || r->state == RS_HOOK ||
            r->inflight.head != NULL);
}

static void rd_watchdog_arm(struct redis *r)
{
    if (rd_watch_needed(r) && !uv_is_active((uv_handle_t *)&r->watchdog))
        uv_timer_start(&r->watchdog, rd_on_watchdog, RD_WATCHDOG_MS, RD_WATCHDOG_MS);
}

static void rd_enter_state(struct redis *r, enum rd_state st)
{
    if (r->state != st)
        log_debug("event=redis_state name=%s addr=%s from=%s to=%s", r->name, r->addr,
                  rd_state_names[r->state], rd_state_names[st]);
    r->state = st;
    r->state_since = rd_now_ms();
    rd_watchdog_arm(r);
}

/* ---- backpressure ------------------------------------------------------------------ */

/* Re-evaluates the paused state after pending_bytes changed; the callback
 * is made from the idle handle with the state current then. */
static void rd_bp_update(struct redis *r)
{
    if (r->bp_cb == NULL || r->high_water == 0)
        return;
    if (!r->bp_paused && r->pending_bytes >= r->high_water) {
        r->bp_paused = 1;
        rd_kick(r);
    } else if (r->bp_paused && r->pending_bytes < r->low_water) {
        r->bp_paused = 0;
        rd_kick(r);
    }
}

/* ---- requests ------------------------------------------------------------------------ */

static struct rd_req *rd_req_new(struct redis *r, enum rd_kind kind, redis_cb cb, void *arg)
{
    struct rd_req *q = xcalloc(1, sizeof(*q));

    q->r = r;
    q->kind = kind;
    q->cb = cb;
    q->arg = arg;
    return q;
}

static void rd_req_free(struct rd_req *q)
{
    free(q->eval_args);
    free(q);
}

/* Records the outcome of q (the caller checked !q->finished) and takes it
 * out of the in-flight accounting. */
static void rd_req_settle(struct rd_req *q, const char *err)
{
    struct redis *r = q->r;

    assert(!q->finished);
    q->finished = 1;
    if (err)
        snprintf(q->err, sizeof(q->err), "%s", err);
    if (q->inflight) {
        rd_list_remove(&r->inflight, q);
        q->inflight = 0;
        assert(r->pending_bytes >= q->bytes);
        r->pending_bytes -= q->bytes;
        rd_bp_update(r);
    }
}

/* Makes the user callback from inside a hiredis reply callback, where the
 * reply is valid. Drops requested by the user meanwhile are deferred
 * (r->in_reply). */
static void rd_req_complete(struct rd_req *q, const redisReply *reply, const char *err)
{
    struct redis *r = q->r;

    rd_req_settle(q, err);
    q->delivered = 1;
    r->in_reply++;
    if (q->hook)
        r->hook_depth++;
    q->cb(r, reply, err, q->arg);
    if (q->hook)
        r->hook_depth--;
    r->in_reply--;
}

/* Decides a failure whose callback is made later from the idle handle. */
static void rd_req_fail(struct rd_req *q, const char *err)
{
    struct redis *r = q->r;

    rd_req_settle(q, err);
    rd_list_push(&r->done, q);
    rd_kick(r);
}

static void rd_late_closed(uv_handle_t *h)
{
    struct rd_late *l = h->data;
    struct redis *r = l->req->r;

    rd_req_free(l->req);
    free(l);
    r->late--;
    rd_maybe_closed(r);
}

static void rd_on_late(uv_timer_t *t)
{
    struct rd_late *l = t->data;
    struct rd_req *q = l->req;

    q->delivered = 1;
    q->cb(q->r, NULL, q->err, q->arg);
    uv_close((uv_handle_t *)&l->timer, rd_late_closed);
}

/* Fails a request that was never sent, from the loop. */
static void rd_fail_unsent(struct rd_req *q, const char *err)
{
    struct redis *r = q->r;

    if (r->handles_closing) {
        struct rd_late *l = xcalloc(1, sizeof(*l));
        rd_req_settle(q, err);
        l->req = q;
        uv_timer_init(r->loop, &l->timer);
        l->timer.data = l;
        r->late++;
        uv_timer_start(&l->timer, rd_on_late, 0, 0);
        return;
    }
    rd_req_fail(q, err);
}

/* Returns 1 when q may be sent now; otherwise fails it asynchronously and
 * returns 0. While the hook runs, only the hook's own commands (issued from
 * the hook or from callbacks of its commands) are sent. */
static int rd_req_admit(struct rd_req *q)
{
    struct redis *r = q->r;

    if (r->closing) {
        rd_fail_unsent(q, RD_E_CLOSED);
        return 0;
    }
    if (r->ac != NULL && !r->drop_later &&
        (r->state == RS_READY || (r->state == RS_HOOK && r->hook_depth > 0))) {
        q->hook = r->state == RS_HOOK;
        return 1;
    }
    rd_fail_unsent(q, RD_E_NOT_CONNECTED);
    return 0;
}

/* Puts an admitted request in flight; its commands follow with rd_req_send(). */
static void rd_req_begin(struct rd_req *q)
{
    struct redis *r = q->r;

    q->sent_at = rd_now_ms();
    q->inflight = 1;
    rd_list_push(&r->inflight, q);
}

static void rd_on_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* Appends one formatted command to the context's output. hiredis copies it.
 * Returns 0, or -1 when hiredis refused it (context disconnecting). */
static int rd_send_raw(struct redis *r, redisCallbackFn *fn, void *privdata, const char *cmd,
                       size_t len)
{
    if (redisAsyncFormattedCommand(r->ac, fn, privdata, cmd, len) != REDIS_OK)
        return -1;
    r->conn_out += len;
    return 0;
}

static int rd_req_send(struct rd_req *q, const char *cmd, size_t len)
{
    struct redis *r = q->r;

    if (rd_send_raw(r, rd_on_reply, q, cmd, len) != 0)
        return -1;
    q->refs++;
    q->nsent++;
    q->bytes += len;
    r->pending_bytes += len;
    return 0;
}

/* Called after the last rd_req_send() of a request, rc being the result of
 * the sends: arms the watchdog and handles a refusal. */
static void rd_req_sent(struct rd_req *q, int rc)
{
    struct redis *r = q->r;

    if (rc != 0) {
        if (q->refs == 0) {
            /* Nothing reached hiredis. */
            rd_req_fail(q, RD_E_LOST);
        } else {
            /* Part of a group is queued: drop the connection so that Redis
             * discards it (an open MULTI is never executed). The request
             * fails when hiredis flushes its callbacks. */
            rd_drop(r, "command refused by client", RD_E_LOST);
        }
        return;
    }
    rd_bp_update(r);
    rd_watchdog_arm(r);
}

/* Formats "<verb> <body> <eval_args...>" (EVAL source or EVALSHA sha1). */
static void rd_eval_format(struct buf *b, const struct rd_req *q, const char *verb,
                           const char *body, size_t bodylen)
{
    buf_appendf(b, "*%d\r\n$%zu\r\n%s\r\n$%zu\r\n", q->eval_nargs + 2, strlen(verb), verb,
                bodylen);
    buf_append(b, body, bodylen);
    buf_append(b, "\r\n", 2);
    buf_append(b, q->eval_args, q->eval_args_len);
}

/* Answers NOSCRIPT by sending the same call as EVAL with the source; Redis
 * caches the script, so later EVALSHA calls find it. Runs inside the
 * reply callback of the EVALSHA. */
static void rd_eval_fallback(struct rd_req *q)
{
    struct redis *r = q->r;
    struct buf b = BUF_INIT;
    const char *src = q->script->source;
    size_t oldbytes = q->bytes;
    int rc;

    log_debug("event=redis_script_load name=%s sha1=%s", r->name, q->script->sha1);
    rd_eval_format(&b, q, "EVAL", src, strlen(src));
    q->eval_fallback = 1;
    rc = rd_req_send(q, b.data, b.len);
    buf_free(&b);
    if (rc != 0) {
        rd_req_complete(q, NULL, RD_E_LOST);
        return;
    }
    /* The EVALSHA was answered; only the EVAL is pending now. */
    q->bytes -= oldbytes;
    r->pending_bytes -= oldbytes;
    rd_bp_update(r);
}

/* The EXEC reply decides a MULTI group. */
static void rd_multi_exec_reply(struct rd_req *q, const redisReply *reply)
{
    char msg[RD_REPLY_ERR_MAX], err[RD_ERR_MAX];

    if (reply->type == REDIS_REPLY_ARRAY) {
        rd_req_complete(q, reply, NULL);
        return;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        /* EXECABORT says only that an earlier command was refused while
         * queueing; that command's error is the useful text. */
        if (q->queued_err[0])
            snprintf(msg, sizeof(msg), "%s", q->queued_err);
        else
            rd_copy_reply_str(msg, sizeof(msg), reply);
    } else if (reply->type == REDIS_REPLY_NIL) {
        snprintf(msg, sizeof(msg), "aborted (a watched key changed)");
    } else {
        snprintf(msg, sizeof(msg), "unexpected EXEC reply type %d", reply->type);
    }
    snprintf(err, sizeof(err), "redis: transaction failed: %s", msg);
    rd_req_complete(q, NULL, err);
}

/* Whether the EXEC of a MULTI group reached the socket, judged from inside
 * hiredis's teardown, when the output buffer still exists. */
static int rd_exec_written(const redisAsyncContext *ac, const struct redis *r,
                           const struct rd_req *q)
{
    size_t unsent = ac->c.obuf ? sdslen(ac->c.obuf) : 0;

    return q->exec_end != 0 && r->conn_out - unsent >= q->exec_end;
}

/* Reply callback of every user command (privdata: the request). */
static void rd_on_reply(redisAsyncContext *ac, void *rp, void *privdata)
{
    struct rd_req *q = privdata;
    struct redis *r = q->r;
    const redisReply *reply = rp;
    int step = q->nreplies++;

    assert(q->refs > 0);
    q->refs--;

    if (reply == NULL) {
        /* The context is going away: hiredis flushes every callback. */
        if (!q->finished) {
            const char *err = r->fail_err ? r->fail_err : RD_E_LOST;
            if (q->kind == RK_MULTI && rd_exec_written(ac, r, q))
                err = RD_E_UNKNOWN;
            rd_req_fail(q, err);
        }
    } else if (!q->finished) {
        switch (q->kind) {
        case RK_COMMAND:
            rd_req_complete(q, reply, NULL);
            break;
        case RK_EVAL:
            if (!q->eval_fallback && rd_reply_is(reply, "NOSCRIPT"))
                rd_eval_fallback(q);
            else
                rd_req_complete(q, reply, NULL);
            break;
        case RK_MULTI:
            if (step < q->nsent - 1) {
                /* MULTI and QUEUED answers; an error here (arity, unknown
                 * command, OOM) makes EXEC answer EXECABORT. */
                if (reply->type == REDIS_REPLY_ERROR && q->queued_err[0] == '\0')
                    rd_copy_reply_str(q->queued_err, sizeof(q->queued_err), reply);
            } else {
                rd_multi_exec_reply(q, reply);
            }
            break;
        }
    }
    if (q->refs == 0 && q->delivered)
        rd_req_free(q);
}

/* ---- connection --------------------------------------------------------------------- */

static void rd_on_reconnect_timer(uv_timer_t *t)
{
    struct redis *r = t->data;
    uint64_t next = r->backoff_ms * 2;

    r->backoff_ms = next > RD_BACKOFF_MAX_MS ? RD_BACKOFF_MAX_MS : next;
    if (!r->closing && r->ac == NULL)
        rd_connect(r);
}

/* Called exactly once per context, when it is gone (failed connect,
 * disconnect callback, or freed before it connected). Every reply callback
 * of the context has run by then. */
static void rd_gone(struct redis *r, const char *reason)
{
    char rq[RD_ERR_MAX + 16];

    r->gone_count++;
    r->ac = NULL;
    assert(r->inflight.head == NULL);

    log_quote(rq, sizeof(rq), reason, strlen(reason));
    if (r->closing) {
        log_debug("event=redis_closed name=%s addr=%s", r->name, r->addr);
    } else if (r->link != RL_DOWN) {
        log_warn("event=redis_disconnected name=%s addr=%s reason=%s", r->name, r->addr, rq);
        r->link = RL_DOWN;
    } else {
        log_debug("event=redis_connect_failed name=%s addr=%s attempt=%u state=%s reason=%s",
                  r->name, r->addr, r->attempts, rd_state_names[r->state], rq);
    }

    r->drop_reason[0] = '\0';
    r->fail_err = NULL;
    r->drop_later = 0;
    r->hs_dropping = 0;
    r->hook_pending = 0;

    if (r->closing) {
        rd_enter_state(r, RS_CLOSED);
        rd_kick(r);
        return;
    }
    rd_enter_state(r, RS_WAIT);
    log_debug("event=redis_reconnect_scheduled name=%s addr=%s delay_ms=%llu", r->name, r->addr,
              (unsigned long long)r->backoff_ms);
    uv_timer_start(&r->reconnect_timer, rd_on_reconnect_timer, r->backoff_ms, 0);
}

/* Asks the idle handle to drop the connection; for decisions taken inside
 * hiredis callbacks. The first reason wins. */
static void rd_drop_later(struct redis *r, const char *reason, const char *err)
{
    if (r->drop_later)
        return;
    r->drop_later = 1;
    snprintf(r->drop_later_reason, sizeof(r->drop_later_reason), "%s", reason);
    r->drop_later_err = err;
    rd_kick(r);
}

/*
 * Drops the current context: every pending request fails with err (the
 * requests of a MULTI group whose EXEC was written with "redis: outcome
 * unknown"), and the module reconnects after the backoff, or finishes
 * closing. Inside a user's reply callback the drop is deferred.
 */
static void rd_drop(struct redis *r, const char *reason, const char *err)
{
    unsigned gen = r->gone_count;

    if (r->ac == NULL)
        return;
    if (r->in_reply > 0) {
        rd_drop_later(r, reason, err);
        return;
    }
    if (r->closing)
        err = RD_E_CLOSED;
    snprintf(r->drop_reason, sizeof(r->drop_reason), "%s", reason);
    r->fail_err = err;
    redisAsyncFree(r->ac);
    /* A context that never completed its connect gets no disconnect
     * callback: it is gone now all the same. */
    if (r->gone_count == gen) {
        char why[RD_ERR_MAX];
        snprintf(why, sizeof(why), "%s", reason);
        rd_gone(r, why);
    }
}

static void rd_on_disconnect(const redisAsyncContext *ac, int status)
{
    struct redis *r = ac->data;
    char why[RD_ERR_MAX];

    if (r->drop_reason[0])
        snprintf(why, sizeof(why), "%s", r->drop_reason);
    else if (status != REDIS_OK && ac->errstr && ac->errstr[0])
        snprintf(why, sizeof(why), "%s", ac->errstr);
    else if (ac->c.err)
        snprintf(why, sizeof(why), "%s", ac->c.errstr);
    else
        snprintf(why, sizeof(why), "disconnected");
    rd_gone(r, why);
}

static void rd_enter_ready(struct redis *r)
{
    rd_enter_state(r, RS_READY);
    r->backoff_ms = RD_BACKOFF_MIN_MS;
    r->attempts = 0;
    if (r->link != RL_UP)
        log_info("event=redis_connected name=%s addr=%s", r->name, r->addr);
    r->link = RL_UP;
}

/* Reply callback of AUTH and SELECT (privdata: &rd_hs_tags[i]). */
static void rd_on_hs_reply(redisAsyncContext *ac, void *rp, void *privdata)
{
    struct redis *r = ac->data;
    const redisReply *reply = rp;
    int cmd = *(const int *)privdata;

    if (reply == NULL || r->hs_dropping || r->state != RS_HANDSHAKE || ac != r->ac)
        return;
    if (reply->type == REDIS_REPLY_ERROR) {
        char err[RD_REPLY_ERR_MAX], why[RD_ERR_MAX];
        rd_copy_reply_str(err, sizeof(err), reply);
        snprintf(why, sizeof(why), "%s failed: %s", rd_hs_names[cmd], err);
        r->hs_dropping = 1;
        rd_drop_later(r, why, RD_E_LOST);
        return;
    }
    if (cmd != HS_SELECT)
        return;
    /* SELECT is the last handshake command and every earlier one
     * succeeded. The hook is user code: it runs from the idle handle. */
    if (r->hook) {
        rd_enter_state(r, RS_HOOK);
        r->hook_pending = 1;
        rd_kick(r);
    } else {
        rd_enter_ready(r);
    }
}

static int rd_send_hs(struct redis *r, int cmd, int argc, const char **argv)
{
    size_t lens[2];
    char *buf;
    int len, rc;

    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    len = redisFormatCommandArgv(&buf, argc, argv, lens);
    if (len < 0)
        return -1;
    rc = rd_send_raw(r, rd_on_hs_reply, (void *)&rd_hs_tags[cmd], buf, (size_t)len);
    redisFreeCommand(buf);
    return rc;
}

static void rd_on_connect(const redisAsyncContext *cac, int status)
{
    struct redis *r = cac->data;
    char db[16];
    const char *auth[2] = {"AUTH", r->password};
    const char *sel[2] = {"SELECT", db};
    int rc = 0;

    if (status != REDIS_OK) {
        /* hiredis frees the context when this callback returns and makes
         * no disconnect call. */
        char why[RD_ERR_MAX];
        snprintf(why, sizeof(why), "connect: %s", cac->c.errstr[0] ? cac->c.errstr : "failed");
        rd_gone(r, why);
        return;
    }
    rd_enter_state(r, RS_HANDSHAKE);
    snprintf(db, sizeof(db), "%d", r->db);
    /* Pipelined; replies come back in order and SELECT's is the last. */
    if (r->password)
        rc = rd_send_hs(r, HS_AUTH, 2, auth);
    if (rc == 0)
        rc = rd_send_hs(r, HS_SELECT, 2, sel);
    if (rc != 0) {
        /* Freeing the context inside its connect callback is not allowed. */
        r->hs_dropping = 1;
        rd_drop_later(r, "handshake: command refused by client", RD_E_LOST);
    }
}

static void rd_ev_closed(uv_handle_t *h)
{
    struct redis *r = h->data;
    redisLibuvEvents *p =
        (redisLibuvEvents *)(void *)((char *)h - offsetof(redisLibuvEvents, handle));

    free(p); /* allocated with malloc() by redisLibuvAttach() */
    assert(r->ev_closing > 0);
    r->ev_closing--;
    rd_maybe_closed(r);
}

/*
 * Poll callback used instead of the adapter's redisLibuvPoll(). libuv
 * reports POLLERR as status UV_EBADF and stops the handle; the hiredis 0.14
 * adapter ignores such a status, which leaves a refused connect (or a reset
 * connection with no command in flight) hanging until the watchdog, or
 * forever. Here hiredis is let to find the socket error itself: through
 * getsockopt(SO_ERROR) while connecting, through read(2) once connected.
 */
static void rd_ev_poll(uv_poll_t *h, int status, int events)
{
    redisLibuvEvents *p = h->data;

    if (p->context == NULL)
        return;
    if (status < 0) {
        if (!(p->context->c.flags & REDIS_CONNECTED))
            redisAsyncHandleWrite(p->context);
        else
            redisAsyncHandleRead(p->context);
        return;
    }
    if (events & UV_READABLE)
        redisAsyncHandleRead(p->context);
    /* The read may have freed the context (the cleanup hook clears it). */
    if (p->context != NULL && (events & UV_WRITABLE))
        redisAsyncHandleWrite(p->context);
}

/* The adapter's add/del hooks, starting the poll with rd_ev_poll(). */
static void rd_ev_update(redisLibuvEvents *p, int add, int del)
{
    p->events = (p->events | add) & ~del;
    if (p->events)
        uv_poll_start(&p->handle, p->events, rd_ev_poll);
    else
        uv_poll_stop(&p->handle);
}

static void rd_ev_add_read(void *privdata)
{
    rd_ev_update(privdata, UV_READABLE, 0);
}

static void rd_ev_del_read(void *privdata)
{
    rd_ev_update(privdata, 0, UV_READABLE);
}

static void rd_ev_add_write(void *privdata)
{
    rd_ev_update(privdata, UV_WRITABLE, 0);
}

static void rd_ev_del_write(void *privdata)
{
    rd_ev_update(privdata, 0, UV_WRITABLE);
}

/* Replaces the adapter's redisLibuvCleanup(): same work, but the close of
 * the poll handle is counted so that redis_close() can wait for it. */
static void rd_ev_cleanup(void *privdata)
{
    redisLibuvEvents *p = privdata;
    struct redis *r = p->context->data;

    p->context->ev.cleanup = NULL;
    p->context = NULL;
    p->handle.data = r;
    r->ev_closing++;
    uv_close((uv_handle_t *)&p->handle, rd_ev_closed);
}

/* Starts one connection attempt. Failures that hiredis reports at once
 * (refused on loopback, bad address) go straight to rd_gone(). */
static void rd_connect(struct redis *r)
{
    redisAsyncContext *ac;
    char why[RD_ERR_MAX];

    r->attempts++;
    r->conn_out = 0;
    rd_enter_state(r, RS_CONNECTING);
    log_debug("event=redis_connecting name=%s addr=%s attempt=%u", r->name, r->addr,
              r->attempts);
    /* hiredis resolves names with a blocking getaddrinfo(); configure an
     * address, or a name /etc/hosts answers, where that matters. */
    ac = redisAsyncConnect(r->host, r->port);
    if (ac == NULL) {
        log_error("event=oom where=redisAsyncConnect");
        abort();
    }
    if (ac->err) {
        snprintf(why, sizeof(why), "connect: %s", ac->errstr ? ac->errstr : "failed");
        redisAsyncFree(ac);
        rd_gone(r, why);
        return;
    }
    if (redisLibuvAttach(ac, r->loop) != REDIS_OK) {
        /* The adapter set its hooks before failing; unset them so that the
         * free does not call them without event data. */
        ac->ev.addRead = ac->ev.delRead = ac->ev.addWrite = ac->ev.delWrite = NULL;
        ac->ev.cleanup = NULL;
        redisAsyncFree(ac);
        rd_gone(r, "connect: cannot watch the socket");
        return;
    }
    ac->data = r;
    ac->ev.addRead = rd_ev_add_read;
    ac->ev.delRead = rd_ev_del_read;
    ac->ev.addWrite = rd_ev_add_write;
    ac->ev.delWrite = rd_ev_del_write;
    ac->ev.cleanup = rd_ev_cleanup;
    /* Dead peers behind a silent network are found by keepalive even when
     * no command is in flight. */
    redisEnableKeepAlive(&ac->c);
    r->ac = ac;
    redisAsyncSetDisconnectCallback(ac, rd_on_disconnect);
    redisAsyncSetConnectCallback(ac, rd_on_connect);
    rd_watchdog_arm(r);
}

/* Drops a connect, handshake, hook or command older than the timeout. */
static void rd_on_watchdog(uv_timer_t *t)
{
    struct redis *r = t->data;
    uint64_t now = rd_now_ms();
    char why[RD_ERR_MAX];

    if (!rd_watch_needed(r)) {
        uv_timer_stop(&r->watchdog);
        return;
    }
    if ((r->state == RS_CONNECTING || r->state == RS_HANDSHAKE || r->state == RS_HOOK) &&
        now - r->state_since >= r->timeout_ms) {
        snprintf(why, sizeof(why), "timeout: %s took %llu ms", rd_state_names[r->state],
                 (unsigned long long)(now - r->state_since));
        rd_drop(r, why, RD_E_TIMEOUT);
    } else if (r->inflight.head && now - r->inflight.head->sent_at >= r->timeout_ms) {
        snprintf(why, sizeof(why), "timeout: command waited %llu ms",
                 (unsigned long long)(now - r->inflight.head->sent_at));
        rd_drop(r, why, RD_E_TIMEOUT);
    }
}

/* ---- the idle handle: deferred callbacks, drops and the hook ----------------------- */

static void rd_handle_closed(uv_handle_t *h)
{
    struct redis *r = h->data;

    r->handles_open--;
    rd_maybe_closed(r);
}

static void rd_maybe_closed(struct redis *r)
{
    void (*cb)(void *);
    void *arg;

    if (!r->handles_closing || r->handles_open > 0 || r->ev_closing > 0 || r->late > 0)
        return;
    cb = r->closed;
    arg = r->closed_arg;
    free(r->name);
    free(r->host);
    free(r->password);
    free(r->addr);
    free(r);
    if (cb)
        cb(arg);
}

static void rd_deliver_failure(struct rd_req *q)
{
    struct redis *r = q->r;

    q->delivered = 1;
    if (q->hook)
        r->hook_depth++;
    q->cb(r, NULL, q->err, q->arg);
    if (q->hook)
        r->hook_depth--;
    if (q->refs == 0)
        rd_req_free(q);
}

static int rd_idle_work(const struct redis *r)
{
    return r->done.head || r->drop_later || r->hook_pending ||
           (!r->closing && r->bp_cb && r->bp_reported != r->bp_paused);
}

static void rd_on_idle(uv_idle_t *h)
{
    struct redis *r = h->data;
    struct rd_list batch;
    struct rd_req *q;

    if (r->drop_later) {
        char why[RD_ERR_MAX];
        const char *err = r->drop_later_err;
        snprintf(why, sizeof(why), "%s", r->drop_later_reason);
        r->drop_later = 0;
        rd_drop(r, why, err);
    }

    /* Only the requests failed so far: a callback that retries at once
     * while Redis is down must not keep this loop spinning. */
    batch = r->done;
    r->done.head = r->done.tail = NULL;
    while ((q = batch.head) != NULL) {
        rd_list_remove(&batch, q);
        rd_deliver_failure(q);
    }

    if (r->hook_pending) {
        r->hook_pending = 0;
        if (r->state == RS_HOOK && r->ac != NULL && !r->closing && !r->drop_later) {
            r->hook_depth++;
            r->hook(r, r->hook_arg);
            r->hook_depth--;
        }
    }

    if (!r->closing && r->bp_cb && r->bp_reported != r->bp_paused) {
        r->bp_reported = r->bp_paused;
        r->bp_cb(r->bp_paused, r->bp_arg);
    }

    if (rd_idle_work(r))
        return;
    uv_idle_stop(&r->idle);

    if (r->closing && r->ac == NULL && !r->handles_closing) {
        r->handles_closing = 1;
        uv_close((uv_handle_t *)&r->reconnect_timer, rd_handle_closed);
        uv_close((uv_handle_t *)&r->watchdog, rd_handle_closed);
        uv_close((uv_handle_t *)&r->idle, rd_handle_closed);
    }
}

static void rd_kick(struct redis *r)
{
    if (!r->handles_closing)
        uv_idle_start(&r->idle, rd_on_idle);
}

/* ---- public interface ----------------------------------------------------------------- */

struct redis *redis_new(uv_loop_t *loop, const struct redis_opts *opts)
{
    struct redis *r = xcalloc(1, sizeof(*r));
    const struct config_redis *u = opts->url;
    struct buf b = BUF_INIT;

    r->loop = loop;
    r->name = xstrdup(opts->name && opts->name[0] ? opts->name : "redis");
    r->host = xstrdup(u && u->host && u->host[0] ? u->host : "127.0.0.1");
    r->port = u && u->port > 0 ? u->port : 6379;
    r->db = u ? u->db : 0;
    r->password = u && u->password && u->password[0] ? xstrdup(u->password) : NULL;
    if (strchr(r->host, ':'))
        buf_appendf(&b, "[%s]:%d", r->host, r->port);
    else
        buf_appendf(&b, "%s:%d", r->host, r->port);
    r->addr = buf_steal(&b, NULL);
    r->timeout_ms = (uint64_t)(opts->timeout > 0 ? opts->timeout : RD_DEFAULT_TIMEOUT_S) * 1000u;
    r->hook = opts->hook;
    r->hook_arg = opts->hook_arg;

    r->backoff_ms = RD_BACKOFF_MIN_MS;
    uv_timer_init(loop, &r->reconnect_timer);
    uv_timer_init(loop, &r->watchdog);
    uv_idle_init(loop, &r->idle);
    r->reconnect_timer.data = r->watchdog.data = r->idle.data = r;
    r->handles_open = 3;

    rd_connect(r);
    return r;
}

void redis_hook_done(struct redis *r, int status)
{
    if (r->state != RS_HOOK || r->ac == NULL || r->closing || r->drop_later) {
        log_debug("event=redis_hook_done_ignored name=%s addr=%s state=%s", r->name, r->addr,
                  rd_state_names[r->state]);
        return;
    }
    if (status == 0)
        rd_enter_ready(r);
    else
        rd_drop(r, "hook failed", RD_E_LOST);
}

void redis_close(struct redis *r, void (*closed)(void *arg), void *arg)
{
    assert(!r->closing);
    r->closing = 1;
    r->closed = closed;
    r->closed_arg = arg;
    r->hook_pending = 0;
    uv_timer_stop(&r->reconnect_timer);
    uv_timer_stop(&r->watchdog);
    if (r->ac)
        rd_drop(r, "closed", RD_E_CLOSED);
    else
        rd_enter_state(r, RS_CLOSED);
    rd_kick(r);
}

int redis_ready(const struct redis *r)
{
    return r->state == RS_READY && !r->closing && !r->drop_later;
}

void redis_command(struct redis *r, redis_cb cb, void *arg, int argc, const char **argv,
                   const size_t *lens)
{
    struct rd_req *q = rd_req_new(r, RK_COMMAND, cb, arg);
    char *cmd;
    int len, rc;

    if (!rd_req_admit(q))
        return;
    len = argc > 0 ? redisFormatCommandArgv(&cmd, argc, argv, lens) : -1;
    if (len < 0) {
        rd_fail_unsent(q, RD_E_BAD_COMMAND);
        return;
    }
    rd_req_begin(q);
    rc = rd_req_send(q, cmd, (size_t)len);
    redisFreeCommand(cmd);
    rd_req_sent(q, rc);
}

void redis_commandf(struct redis *r, redis_cb cb, void *arg, const char *fmt, ...)
{
    struct rd_req *q = rd_req_new(r, RK_COMMAND, cb, arg);
    va_list ap;
    char *cmd;
    int len, rc;

    if (!rd_req_admit(q))
        return;
    va_start(ap, fmt);
    len = redisvFormatCommand(&cmd, fmt, ap);
    va_end(ap);
    if (len < 0) {
        rd_fail_unsent(q, RD_E_BAD_COMMAND);
        return;
    }
    rd_req_begin(q);
    rc = rd_req_send(q, cmd, (size_t)len);
    redisFreeCommand(cmd);
    rd_req_sent(q, rc);
}

void redis_multi(struct redis *r, redis_cb cb, void *arg, int ncmds, const int *argcs,
                 const char *const *const *argvs, const size_t *const *lenss)
{
    struct rd_req *q = rd_req_new(r, RK_MULTI, cb, arg);
    static const char multi[] = "*1\r\n$5\r\nMULTI\r\n";
    static const char exec[] = "*1\r\n$4\r\nEXEC\r\n";
    char **cmds;
    int *lens;
    int rc = 0;

    if (!rd_req_admit(q))
        return;
    if (ncmds < 0) {
        rd_fail_unsent(q, RD_E_BAD_COMMAND);
        return;
    }
    /* Everything is formatted before anything is sent, so that a bad
     * command fails the group without opening a MULTI. */
    cmds = xcalloc((size_t)ncmds + 1, sizeof(*cmds));
    lens = xcalloc((size_t)ncmds + 1, sizeof(*lens));
    for (int i = 0; i < ncmds; i++) {
        lens[i] = argcs[i] > 0 ? redisFormatCommandArgv(&cmds[i], argcs[i],
                                                        (const char **)argvs[i],
                                                        lenss ? lenss[i] : NULL)
                               : -1;
        if (lens[i] < 0) {
            cmds[i] = NULL;
            rc = -1;
            break;
        }
    }
    if (rc == 0) {
        rd_req_begin(q);
        rc = rd_req_send(q, multi, sizeof(multi) - 1);
        for (int i = 0; rc == 0 && i < ncmds; i++)
            rc = rd_req_send(q, cmds[i], (size_t)lens[i]);
        if (rc == 0)
            rc = rd_req_send(q, exec, sizeof(exec) - 1);
        if (rc == 0)
            q->exec_end = r->conn_out;
        rd_req_sent(q, rc);
    } else {
        rd_fail_unsent(q, RD_E_BAD_COMMAND);
    }
    for (int i = 0; i < ncmds; i++)
        if (cmds[i])
            redisFreeCommand(cmds[i]);
    free(cmds);
    free(lens);
}

void redis_script_init(struct redis_script *s, const char *source)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[SHA_DIGEST_LENGTH];

    s->source = source;
    SHA1((const unsigned char *)source, strlen(source), md);
    for (size_t i = 0; i < sizeof(md); i++) {
        s->sha1[2 * i] = hex[md[i] >> 4];
        s->sha1[2 * i + 1] = hex[md[i] & 0xf];
    }
    s->sha1[40] = '\0';
}

void redis_eval(struct redis *r, struct redis_script *s, redis_cb cb, void *arg, int nkeys,
                int argc, const char **argv, const size_t *lens)
{
    struct rd_req *q = rd_req_new(r, RK_EVAL, cb, arg);
    const char **av;
    size_t *al;
    char numkeys[16], *fmt, *crlf;
    struct buf b = BUF_INIT;
    int len, rc;

    if (!rd_req_admit(q))
        return;
    if (argc < 0 || nkeys < 0 || nkeys > argc) {
        rd_fail_unsent(q, RD_E_BAD_COMMAND);
        return;
    }
    /* "numkeys keys... args..." as a RESP array; the "*<n>\r\n" header is
     * cut off and the bulk strings kept for EVALSHA now, EVAL on NOSCRIPT. */
    snprintf(numkeys, sizeof(numkeys), "%d", nkeys);
    av = xcalloc((size_t)argc + 1, sizeof(*av));
    al = xcalloc((size_t)argc + 1, sizeof(*al));
    av[0] = numkeys;
    al[0] = strlen(numkeys);
    for (int i = 0; i < argc; i++) {
        av[i + 1] = argv[i];
        al[i + 1] = lens ? lens[i] : strlen(argv[i]);
    }
    len = redisFormatCommandArgv(&fmt, argc + 1, av, al);
    free(av);
    free(al);
    if (len < 0 || (crlf = memchr(fmt, '\n', (size_t)len)) == NULL) {
        if (len >= 0)
            redisFreeCommand(fmt);
        rd_fail_unsent(q, RD_E_BAD_COMMAND);
        return;
    }
    q->script = s;
    q->eval_nargs = argc + 1;
    q->eval_args_len = (size_t)len - (size_t)(crlf + 1 - fmt);
    q->eval_args = xmemdup(crlf + 1, q->eval_args_len);
    redisFreeCommand(fmt);

    rd_eval_format(&b, q, "EVALSHA", s->sha1, 40);
    rd_req_begin(q);
    rc = rd_req_send(q, b.data, b.len);
    buf_free(&b);
    rd_req_sent(q, rc);
}

size_t redis_pending_bytes(const struct redis *r)
{
    return r->pending_bytes;
}

void redis_set_backpressure(struct redis *r, size_t high_water, size_t low_water,
                            void (*on_change)(int paused, void *arg), void *arg)
{
    if (low_water > high_water)
        low_water = high_water;
    r->high_water = high_water;
    r->low_water = low_water;
    r->bp_cb = on_change;
    r->bp_arg = arg;
    r->bp_paused = 0;
    r->bp_reported = 0;
    rd_bp_update(r);
}

const char *redis_reply_error(const redisReply *reply)
{
    if (reply == NULL || reply->type != REDIS_REPLY_ERROR)
        return NULL;
    return reply->str ? reply->str : "";
}
