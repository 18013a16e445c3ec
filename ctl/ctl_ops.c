#include "ctl/ctl_ops.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl/ctl_msg.h"
#include "lib/buf.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"

/* Entries read per XRANGE of the dead stream. */
#define CTL_DEAD_PAGE "1000"
#define CTL_DEAD_PAGE_N 1000

/* Retry members moved per script call by `queue retry --all`. */
#define CTL_RETRY_BATCH 500

/* Optimistic transactions are tried this many times. */
#define CTL_OPS_ATTEMPTS 10

/*
 * Moves one member from the retry set to the ready stream, both in one
 * script so that the id is never in neither (the router's own promotion
 * script does the same). KEYS: retry, ready. ARGV: id. Returns 1, or 0
 * when the id was not in the retry set.
 */
static const char ctl_lua_retry_one[] =
    "if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end\n"
    "redis.call('XADD', KEYS[2], '*', 'id', ARGV[1])\n"
    "return 1\n";

/* The same for the first ARGV[1] members, due first. Returns how many
 * were moved. */
static const char ctl_lua_retry_batch[] =
    "local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)\n"
    "for _, id in ipairs(ids) do\n"
    "  redis.call('XADD', KEYS[2], '*', 'id', id)\n"
    "  redis.call('ZREM', KEYS[1], id)\n"
    "end\n"
    "return #ids\n";

/* One entry of the dead stream. */
struct ctl_dead {
    char entry[64];
    int64_t t;                /* when it was written (the entry id) */
    char *id, *reason, *from;
};

struct ctl_deads {
    struct ctl_dead *v;
    size_t n, cap;
};

static void ctl_deads_free(struct ctl_deads *d)
{
    for (size_t i = 0; i < d->n; i++) {
        free(d->v[i].id);
        free(d->v[i].reason);
        free(d->v[i].from);
    }
    free(d->v);
    memset(d, 0, sizeof(*d));
}

static char *ctl_field_str(const redisReply *fields, const char *name)
{
    const redisReply *f = ctl_reply_field(fields, name);

    return f != NULL && f->type == REDIS_REPLY_STRING ? xstrndup(f->str, f->len) : xstrdup("");
}

/* Adds the entries of an XRANGE / XREVRANGE reply whose message is id
 * (every entry when id is NULL). Writes the id of the last entry into
 * last (size n), "" when the reply was empty. */
static void ctl_deads_add(struct ctl_deads *d, const redisReply *r, const char *id, char *last,
                          size_t n)
{
    last[0] = '\0';
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        const redisReply *e = r->element[i], *f;
        struct ctl_dead *x;
        if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        snprintf(last, n, "%s", e->element[0]->str);
        f = ctl_reply_field(e->element[1], SCHEMA_F_ID);
        if (id != NULL && (f == NULL || f->type != REDIS_REPLY_STRING || strcmp(f->str, id) != 0))
            continue;
        if (d->n == d->cap) {
            d->cap = d->cap ? d->cap * 2 : 16;
            d->v = xrealloc(d->v, d->cap * sizeof(*d->v));
        }
        x = &d->v[d->n++];
        snprintf(x->entry, sizeof(x->entry), "%s", e->element[0]->str);
        if (ctl_stream_id_ms(x->entry, &x->t) < 0)
            x->t = 0;
        x->id = ctl_field_str(e->element[1], SCHEMA_F_ID);
        x->reason = ctl_field_str(e->element[1], "reason");
        x->from = ctl_field_str(e->element[1], SCHEMA_F_FROM);
    }
}

/*
 * Reads the whole dead stream, oldest first, keeping the entries of
 * message id (all of them when id is NULL). The stream has no index by
 * message: this reads every entry, at most its cap (100000, router/store.c)
 * in pages of CTL_DEAD_PAGE. Returns 0 or CTL_EXIT_RUNTIME.
 */
static int ctl_deads_read(struct ctl *c, const char *id, struct ctl_deads *d)
{
    char *dead = ctl_key(c, SCHEMA_DEAD);
    char start[80] = "-", last[64];
    int rc = 0;

    for (;;) {
        redisReply *r = ctl_redis_ok(c, "XRANGE", dead, start, "+", "COUNT", CTL_DEAD_PAGE, NULL);
        size_t got;
        if (r == NULL) {
            rc = CTL_EXIT_RUNTIME;
            break;
        }
        got = r->type == REDIS_REPLY_ARRAY ? r->elements : 0;
        ctl_deads_add(d, r, id, last, sizeof(last));
        freeReplyObject(r);
        if (got < CTL_DEAD_PAGE_N || last[0] == '\0')
            break;
        snprintf(start, sizeof(start), "(%s", last);
    }
    free(dead);
    return rc;
}

/* Queues XDEL of the dead entries v[0..n) inside a transaction. */
static int ctl_queue_xdel(struct ctl *c, const char *dead, const struct ctl_dead *const *v,
                          size_t n)
{
    const char **argv;
    int rc;

    if (n == 0)
        return 0;
    argv = xcalloc(n + 2, sizeof(*argv));
    argv[0] = "XDEL";
    argv[1] = dead;
    for (size_t i = 0; i < n; i++)
        argv[2 + i] = v[i]->entry;
    rc = ctl_multi_queue(c, ctl_redis_cmdv(c, n + 2, argv));
    free(argv);
    return rc;
}

/* ---- queue delete ----------------------------------------------------------- */

static void ctl_delete_print(const struct ctl *c, const char *id, const struct ctl_msg *m,
                             bool retry_removed, size_t ndead)
{
    if (c->json) {
        json_t *o = json_object();
        json_object_set_new(o, "id", ctl_json_string(id));
        json_object_set_new(o, "deleted", json_boolean(m->found));
        json_object_set_new(o, "retry_removed", json_boolean(retry_removed));
        json_object_set_new(o, "dead_entries_removed", json_integer((json_int_t)ndead));
        ctl_json_print(o);
        return;
    }
    if (m->found)
        printf("deleted message %s (from %s, %zu recipient%s, %zu not final)", id,
               ctl_sender(m->from), m->nrcpts, m->nrcpts == 1 ? "" : "s", ctl_msg_open(m));
    else
        printf("message %s was already gone", id);
    if (retry_removed)
        printf("; removed from the retry set");
    if (ndead > 0)
        printf("; removed %zu dead entr%s", ndead, ndead == 1 ? "y" : "ies");
    printf("\n");
}

/* One attempt at deleting id. Returns CTL_EXIT_*, or -1 when the message
 * changed under the WATCH. */
static int ctl_delete_once(struct ctl *c, const char *id, const char *key, const char *retry,
                           const char *dead)
{
    struct ctl_deads d = {0};
    struct ctl_msg m;
    const struct ctl_dead **dv = NULL;
    redisReply *r, *exec = NULL;
    bool in_retry;
    long long zrem = 0;
    int rc;

    r = ctl_redis_ok(c, "WATCH", key, NULL);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    freeReplyObject(r);
    ctl_msg_init(&m, id);
    rc = ctl_msg_load(c, &m, 1);
    if (rc != 0)
        goto out_unwatch;
    r = ctl_redis_ok(c, "ZSCORE", retry, id, NULL);
    if (r == NULL) {
        rc = CTL_EXIT_RUNTIME;
        goto out_unwatch;
    }
    in_retry = r->type == REDIS_REPLY_STRING;
    freeReplyObject(r);
    /* Only a message with nothing left to try can have dead entries (a
     * requeue removes them), so a live message skips the search. */
    if (!m.found || ctl_msg_open(&m) == 0) {
        rc = ctl_deads_read(c, id, &d);
        if (rc != 0)
            goto out_unwatch;
    }
    if (!m.found && !in_retry && d.n == 0) {
        ctl_error("no such message: %s", id);
        rc = CTL_EXIT_NOT_FOUND;
        goto out_unwatch;
    }
    dv = xcalloc(d.n ? d.n : 1, sizeof(*dv));
    for (size_t i = 0; i < d.n; i++)
        dv[i] = &d.v[i];

    rc = ctl_multi_begin(c);
    if (rc != 0)
        goto out;
    rc = ctl_multi_queue(c, ctl_redis_cmd(c, "DEL", key, NULL));
    if (rc == 0)
        rc = ctl_multi_queue(c, ctl_redis_cmd(c, "ZREM", retry, id, NULL));
    if (rc == 0)
        rc = ctl_queue_xdel(c, dead, dv, d.n);
    rc = ctl_multi_end(c, rc, &exec);
    if (rc == CTL_EXIT_OK) {
        if (exec->elements >= 2)
            ctl_reply_int(exec->element[1], &zrem);
        freeReplyObject(exec);
        ctl_delete_print(c, id, &m, zrem > 0, d.n);
    }
    goto out;

out_unwatch:
    ctl_unwatch(c);
out:
    free(dv);
    ctl_deads_free(&d);
    ctl_msg_clear(&m);
    return rc;
}

int ctl_queue_delete(struct ctl *c, const char *id)
{
    char *key, *retry, *dead;
    int rc;

    rc = ctl_redis_connect(c);
    if (rc != 0)
        return rc;
    key = ctl_keyf(c, SCHEMA_MSG "%s", id);
    retry = ctl_key(c, SCHEMA_RETRY);
    dead = ctl_key(c, SCHEMA_DEAD);
    rc = -1;
    for (int attempt = 0; attempt < CTL_OPS_ATTEMPTS && rc == -1; attempt++)
        rc = ctl_delete_once(c, id, key, retry, dead);
    if (rc == -1) {
        ctl_error("%s changed during each of %d attempts; nothing deleted, try again", key,
                  CTL_OPS_ATTEMPTS);
        rc = CTL_EXIT_RUNTIME;
    }
    free(key);
    free(retry);
    free(dead);
    return rc;
}

/* ---- queue retry ------------------------------------------------------------ */

/* Runs a script on the retry set and the ready stream; *out gets its
 * integer reply. */
static int ctl_retry_eval(struct ctl *c, const char *script, const char *arg, long long *out)
{
    char *retry = ctl_key(c, SCHEMA_RETRY), *ready = ctl_key(c, SCHEMA_READY);
    redisReply *r = ctl_redis_ok(c, "EVAL", script, "2", retry, ready, arg, NULL);
    int rc = 0;

    free(retry);
    free(ready);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (ctl_reply_int(r, out) < 0) {
        ctl_error("Redis at %s: EVAL: unexpected reply", c->where);
        rc = CTL_EXIT_RUNTIME;
    }
    freeReplyObject(r);
    return rc;
}

/* Why id could not be retried: it is not in the retry set. */
static int ctl_retry_not_waiting(struct ctl *c, const char *id)
{
    struct ctl_msg m;
    int rc;

    ctl_msg_init(&m, id);
    rc = ctl_msg_load(c, &m, 1);
    if (rc == 0 && !m.found) {
        ctl_error("no such message: %s", id);
        rc = CTL_EXIT_NOT_FOUND;
    } else if (rc == 0 && ctl_msg_open(&m) == 0) {
        ctl_error("message %s is not waiting for a retry: every recipient is final (failed "
                  "messages: mailferryctl dead requeue %s)", id, id);
        rc = CTL_EXIT_NOT_FOUND;
    } else if (rc == 0) {
        ctl_error("message %s is not waiting for a retry: it is ready or in flight already "
                  "(mailferryctl queue show %s)", id, id);
        rc = CTL_EXIT_NOT_FOUND;
    }
    ctl_msg_clear(&m);
    return rc;
}

int ctl_queue_retry(struct ctl *c, const char *id)
{
    long long moved = 0, total = 0, n;
    redisReply *r;
    char *retry;
    int rc;

    rc = ctl_redis_connect(c);
    if (rc != 0)
        return rc;
    if (id != NULL) {
        rc = ctl_retry_eval(c, ctl_lua_retry_one, id, &moved);
        if (rc == 0 && moved == 0)
            return ctl_retry_not_waiting(c, id);
    } else {
        /* Members added while this runs (routers keep deferring) are
         * not chased: at most the members present at the start move. */
        retry = ctl_key(c, SCHEMA_RETRY);
        r = ctl_redis_ok(c, "ZCARD", retry, NULL);
        free(retry);
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        if (ctl_reply_int(r, &total) < 0)
            total = 0;
        freeReplyObject(r);
        while (rc == 0 && moved < total) {
            char batch[32];
            snprintf(batch, sizeof(batch), "%lld",
                     total - moved < CTL_RETRY_BATCH ? total - moved : CTL_RETRY_BATCH);
            rc = ctl_retry_eval(c, ctl_lua_retry_batch, batch, &n);
            if (rc != 0 || n == 0)
                break;
            moved += n;
        }
    }
    if (rc != 0)
        return rc;
    if (c->json) {
        json_t *o = json_object();
        if (id != NULL)
            json_object_set_new(o, "id", ctl_json_string(id));
        json_object_set_new(o, "moved", json_integer(moved));
        ctl_json_print(o);
    } else if (id != NULL) {
        printf("message %s moved from the retry set to the ready stream: routers try it now\n",
               id);
    } else {
        printf("moved %lld message%s from the retry set to the ready stream\n", moved,
               moved == 1 ? "" : "s");
    }
    return 0;
}

/* ---- dead list -------------------------------------------------------------- */

int ctl_dead_list(struct ctl *c, long long limit)
{
    struct ctl_deads d = {0};
    char *dead, count[32], last[64];
    redisReply *r;
    long long total = 0;
    bool *kept = NULL, truncated;
    int64_t now = 0;
    int rc;

    rc = ctl_redis_connect(c);
    if (rc != 0)
        return rc;
    rc = ctl_redis_time(c, &now);
    if (rc != 0)
        return rc;
    dead = ctl_key(c, SCHEMA_DEAD);
    r = ctl_redis_ok(c, "XLEN", dead, NULL);
    if (r == NULL) {
        free(dead);
        return CTL_EXIT_RUNTIME;
    }
    ctl_reply_int(r, &total);
    freeReplyObject(r);
    snprintf(count, sizeof(count), "%lld", limit);
    r = ctl_redis_ok(c, "XREVRANGE", dead, "+", "-", "COUNT", count, NULL);
    free(dead);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    ctl_deads_add(&d, r, NULL, last, sizeof(last));
    freeReplyObject(r);
    truncated = total > (long long)d.n;

    /* Whether each message is still there: one pipelined EXISTS each. */
    kept = xcalloc(d.n ? d.n : 1, sizeof(*kept));
    for (size_t i = 0; i < d.n && rc == 0; i++) {
        char *key = ctl_keyf(c, SCHEMA_MSG "%s", d.v[i].id);
        const char *argv[2] = {"EXISTS", key};
        if (ctl_redis_append(c, 2, argv) != 0)
            rc = CTL_EXIT_RUNTIME;
        free(key);
    }
    for (size_t i = 0; i < d.n && rc == 0; i++) {
        long long v = 0;
        r = ctl_redis_reply(c);
        if (r == NULL) {
            rc = CTL_EXIT_RUNTIME;
            break;
        }
        kept[i] = ctl_reply_int(r, &v) == 0 && v > 0;
        freeReplyObject(r);
    }
    if (rc == 0 && c->json) {
        json_t *o = json_object(), *a = json_array();
        json_object_set_new(o, "now_ms", json_integer(now));
        json_object_set_new(o, "total", json_integer(total));
        for (size_t i = 0; i < d.n; i++) {
            json_t *e = json_object();
            json_object_set_new(e, "entry", json_string(d.v[i].entry));
            json_object_set_new(e, "time_ms", json_integer(d.v[i].t));
            json_object_set_new(e, "id", ctl_json_string(d.v[i].id));
            json_object_set_new(e, "from", ctl_json_string(d.v[i].from));
            json_object_set_new(e, "reason", ctl_json_string(d.v[i].reason));
            json_object_set_new(e, "message", json_boolean(kept[i]));
            json_array_append_new(a, e);
        }
        json_object_set_new(o, "entries", a);
        json_object_set_new(o, "truncated", json_boolean(truncated));
        ctl_json_print(o);
    } else if (rc == 0) {
        int wid = 2, wfrom = 4;
        for (size_t i = 0; i < d.n; i++) {
            int l = (int)strlen(d.v[i].id);
            if (l > wid)
                wid = l;
            if ((l = (int)strlen(ctl_sender(d.v[i].from))) > wfrom)
                wfrom = l;
        }
        printf("%-19s  %-*s  %-*s  %-7s  %s\n", "TIME (UTC)", wid, "ID", wfrom, "FROM",
               "MESSAGE", "REASON");
        for (size_t i = 0; i < d.n; i++) {
            char t[32];
            ctl_fmt_time(d.v[i].t, t, sizeof(t));
            printf("%-19s  %-*s  %-*s  %-7s  %s\n", t, wid, d.v[i].id, wfrom,
                   ctl_sender(d.v[i].from), kept[i] ? "kept" : "gone", d.v[i].reason);
        }
        if (d.n == 0)
            printf("(no dead messages)\n");
        else if (truncated)
            printf("(newest %zu of %lld shown: use --limit)\n", d.n, total);
    }
    free(kept);
    ctl_deads_free(&d);
    return rc;
}

/* ---- dead requeue ----------------------------------------------------------- */

/* The outcome of requeueing one message. */
enum ctl_requeue_result {
    RQ_DONE = 0,
    RQ_GONE,                  /* no message */
    RQ_QUEUED,                /* recipients still open: it is in the queue */
    RQ_NOTHING,               /* no failed recipient */
};

/* The state st:<i> of a failed recipient made pending again: the same
 * JSON with "s" set to "pending" and without "b" (the router must report
 * a new failure again). NULL when raw is not a JSON object. */
static char *ctl_reopen_state(const char *raw)
{
    json_error_t jerr;
    json_t *o = json_loads(raw, 0, &jerr);
    char *s;

    if (o == NULL || !json_is_object(o)) {
        json_decref(o);
        return NULL;
    }
    json_object_set_new(o, "s", json_string("pending"));
    json_object_del(o, "b");
    s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return s;
}

/*
 * One attempt at requeueing message id, whose dead entries are dv[0..nd):
 * under WATCH of the message, its failed recipients are reset and the id
 * is added to the ready stream, its retry member removed and the dead
 * entries deleted, in one MULTI/EXEC. Returns CTL_EXIT_*, or -1 when the
 * message changed meanwhile. *res and *nreset tell what happened.
 */
static int ctl_requeue_once(struct ctl *c, const char *id, const struct ctl_dead *const *dv,
                            size_t nd, enum ctl_requeue_result *res, size_t *nreset,
                            int64_t *created)
{
    char *key = ctl_keyf(c, SCHEMA_MSG "%s", id);
    char *ready = ctl_key(c, SCHEMA_READY), *retry = ctl_key(c, SCHEMA_RETRY);
    char *dead = ctl_key(c, SCHEMA_DEAD);
    char now_s[32];
    struct ctl_msg m;
    redisReply *r;
    int64_t now = 0;
    int rc;

    *nreset = 0;
    ctl_msg_init(&m, id);
    r = ctl_redis_ok(c, "WATCH", key, NULL);
    if (r == NULL) {
        rc = CTL_EXIT_RUNTIME;
        goto out;
    }
    freeReplyObject(r);
    rc = ctl_redis_time(c, &now);
    if (rc == 0)
        rc = ctl_msg_load(c, &m, 1);
    if (rc != 0)
        goto out_unwatch;
    *created = m.created;
    if (!m.found) {
        *res = RQ_GONE;
        goto out_unwatch;
    }
    if (ctl_msg_open(&m) > 0) {
        *res = RQ_QUEUED;
        goto out_unwatch;
    }
    if (ctl_msg_count(&m, "failed") == 0) {
        *res = RQ_NOTHING;
        goto out_unwatch;
    }

    snprintf(now_s, sizeof(now_s), "%" PRId64, now);
    rc = ctl_multi_begin(c);
    if (rc != 0)
        goto out;
    for (size_t i = 0; i < m.nrcpts && rc == 0; i++) {
        struct buf field = BUF_INIT;
        char *st;
        if (strcmp(m.rcpts[i].state, "failed") != 0)
            continue;
        st = ctl_reopen_state(m.rcpts[i].raw);
        if (st == NULL)
            continue;
        buf_appendf(&field, SCHEMA_F_RCPT_STATE "%zu", i);
        rc = ctl_multi_queue(c, ctl_redis_cmd(c, "HSET", key, field.data, st, NULL));
        buf_free(&field);
        free(st);
        (*nreset)++;
    }
    if (rc == 0)
        rc = ctl_multi_queue(c, ctl_redis_cmd(c, "HSET", key, SCHEMA_F_NEXT, now_s, NULL));
    if (rc == 0)
        rc = ctl_multi_queue(c, ctl_redis_cmd(c, "ZREM", retry, id, NULL));
    if (rc == 0)
        rc = ctl_queue_xdel(c, dead, dv, nd);
    if (rc == 0)
        rc = ctl_multi_queue(c, ctl_redis_cmd(c, "XADD", ready, "*", SCHEMA_F_ID, id, NULL));
    rc = ctl_multi_end(c, rc, NULL);
    if (rc == CTL_EXIT_OK)
        *res = RQ_DONE;
    goto out;

out_unwatch:
    ctl_unwatch(c);
out:
    ctl_msg_clear(&m);
    free(key);
    free(ready);
    free(retry);
    free(dead);
    return rc;
}

/* Requeues one message, retrying the optimistic transaction. */
static int ctl_requeue(struct ctl *c, const char *id, const struct ctl_dead *const *dv, size_t nd,
                       enum ctl_requeue_result *res, size_t *nreset, int64_t *created)
{
    int rc = -1;

    for (int attempt = 0; attempt < CTL_OPS_ATTEMPTS && rc == -1; attempt++)
        rc = ctl_requeue_once(c, id, dv, nd, res, nreset, created);
    if (rc == -1) {
        ctl_error("message %s changed during each of %d attempts; not requeued, try again", id,
                  CTL_OPS_ATTEMPTS);
        rc = CTL_EXIT_RUNTIME;
    }
    return rc;
}

/* Warns when the routers will expire a requeued message at once. */
static void ctl_requeue_expiry(const struct ctl *c, const char *id, int64_t created, int64_t now)
{
    int64_t life = (int64_t)c->cfg.router.max_queue_lifetime * 1000;

    if (created > 0 && life > 0 && now - created >= life)
        ctl_error("warning: message %s is older than [router] max_queue_lifetime (%d s): "
                  "routers expire it again at once", id, c->cfg.router.max_queue_lifetime);
}

static int ctl_requeue_single(struct ctl *c, const char *id)
{
    struct ctl_deads d = {0};
    const struct ctl_dead **dv;
    enum ctl_requeue_result res = RQ_GONE;
    size_t nreset = 0;
    int64_t created = 0, now = 0;
    int rc;

    rc = ctl_deads_read(c, id, &d);
    if (rc != 0)
        return rc;
    dv = xcalloc(d.n ? d.n : 1, sizeof(*dv));
    for (size_t i = 0; i < d.n; i++)
        dv[i] = &d.v[i];
    rc = ctl_requeue(c, id, dv, d.n, &res, &nreset, &created);
    if (rc == 0) {
        switch (res) {
        case RQ_GONE:
            if (d.n > 0)
                ctl_error("no such message: %s (its dead entry remains; remove it with "
                          "mailferryctl queue delete %s)", id, id);
            else
                ctl_error("no such message: %s", id);
            rc = CTL_EXIT_NOT_FOUND;
            break;
        case RQ_QUEUED:
            ctl_error("message %s is still queued (recipients not final): nothing to requeue",
                      id);
            rc = CTL_EXIT_NOT_FOUND;
            break;
        case RQ_NOTHING:
            ctl_error("message %s has no failed recipient: nothing to requeue", id);
            rc = CTL_EXIT_NOT_FOUND;
            break;
        case RQ_DONE:
            break;
        }
    }
    if (rc == 0 && ctl_redis_time(c, &now) == 0)
        ctl_requeue_expiry(c, id, created, now);
    if (rc == 0 && c->json) {
        json_t *o = json_object();
        json_object_set_new(o, "id", ctl_json_string(id));
        json_object_set_new(o, "recipients_reset", json_integer((json_int_t)nreset));
        json_object_set_new(o, "dead_entries_removed", json_integer((json_int_t)d.n));
        ctl_json_print(o);
    } else if (rc == 0) {
        printf("message %s requeued: %zu failed recipient%s reset to pending; routers try "
               "%s now\n", id, nreset, nreset == 1 ? "" : "s", nreset == 1 ? "it" : "them");
    }
    free(dv);
    ctl_deads_free(&d);
    return rc;
}

static int ctl_dead_cmp(const void *a, const void *b)
{
    const struct ctl_dead *x = a, *y = b;
    int k = strcmp(x->id, y->id);

    return k != 0 ? k : strcmp(x->entry, y->entry);
}

static int ctl_requeue_all(struct ctl *c)
{
    struct ctl_deads d = {0};
    const struct ctl_dead **dv;
    size_t requeued = 0, reset = 0, gone = 0, skipped = 0, expired = 0;
    int64_t now = 0;
    int rc;

    rc = ctl_redis_time(c, &now);
    if (rc == 0)
        rc = ctl_deads_read(c, NULL, &d);
    if (rc != 0) {
        ctl_deads_free(&d);
        return rc;
    }
    /* Group the entries by message: a message is requeued once, and all
     * its entries go. */
    qsort(d.v, d.n, sizeof(*d.v), ctl_dead_cmp);
    dv = xcalloc(d.n ? d.n : 1, sizeof(*dv));
    for (size_t i = 0; i < d.n && rc == 0;) {
        enum ctl_requeue_result res = RQ_GONE;
        size_t j = i, nreset = 0;
        int64_t created = 0;
        while (j < d.n && strcmp(d.v[j].id, d.v[i].id) == 0) {
            dv[j - i] = &d.v[j];
            j++;
        }
        if (d.v[i].id[0] == '\0') {
            gone++;
        } else {
            rc = ctl_requeue(c, d.v[i].id, dv, j - i, &res, &nreset, &created);
            if (rc == 0 && res == RQ_DONE) {
                int64_t life = (int64_t)c->cfg.router.max_queue_lifetime * 1000;
                requeued++;
                reset += nreset;
                expired += created > 0 && life > 0 && now - created >= life;
            } else if (rc == 0 && res == RQ_GONE) {
                gone++;
            } else if (rc == 0) {
                skipped++;
            }
        }
        i = j;
    }
    if (rc == 0 && expired > 0)
        ctl_error("warning: %zu requeued message%s older than [router] max_queue_lifetime "
                  "(%d s): routers expire %s again at once", expired,
                  expired == 1 ? " is" : "s are", c->cfg.router.max_queue_lifetime,
                  expired == 1 ? "it" : "them");
    if (rc == 0 && c->json) {
        json_t *o = json_object();
        json_object_set_new(o, "requeued", json_integer((json_int_t)requeued));
        json_object_set_new(o, "recipients_reset", json_integer((json_int_t)reset));
        json_object_set_new(o, "gone", json_integer((json_int_t)gone));
        json_object_set_new(o, "skipped", json_integer((json_int_t)skipped));
        ctl_json_print(o);
    } else if (rc == 0) {
        printf("requeued %zu message%s (%zu failed recipient%s reset to pending)", requeued,
               requeued == 1 ? "" : "s", reset, reset == 1 ? "" : "s");
        if (gone > 0)
            printf("; %zu dead message%s gone (entries kept; mailferryctl queue delete ID "
                   "removes them)", gone, gone == 1 ? "" : "s");
        if (skipped > 0)
            printf("; %zu skipped (queued again already, or nothing failed)", skipped);
        printf("\n");
    }
    free(dv);
    ctl_deads_free(&d);
    return rc;
}

int ctl_dead_requeue(struct ctl *c, const char *id)
{
    int rc = ctl_redis_connect(c);

    if (rc != 0)
        return rc;
    return id != NULL ? ctl_requeue_single(c, id) : ctl_requeue_all(c);
}
