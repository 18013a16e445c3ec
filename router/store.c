#include "router/store.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/redis.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"

#define MS_MINUTE ((int64_t)60000)
#define MS_HOUR ((int64_t)3600000)
#define MS_DAY ((int64_t)86400000)
/* Counter keys outlive their bucket a little, for late readers. */
#define TTL_MINUTE 120
#define TTL_HOUR 7200
#define TTL_DAY 172800
#define TTL_STATS 172800
#define DEAD_MAXLEN 100000
#define PROMOTE_BATCH 500

struct store {
    uv_loop_t *loop;
    const struct mf_config *cfg;
    struct redis *cmd;           /* everything but blocking reads */
    struct redis *rd;            /* XREADGROUP ... BLOCK */
    char consumer[128];
    char claim_cursor[48];
    struct redis_script reserve, promote, cas, depth;
    int closing;
    int open_conns;
    void (*closed)(void *arg);
    void *closed_arg;
};

/*
 * Atomic cap check and count (policy.h, policy_route_caps): a group fits a
 * bucket when the bucket is empty or count + n <= cap. KEYS: the route's
 * minute, hour, day counters, then the route+domain's. ARGV: n, six caps
 * (0 = none), six TTLs. Returns {ok, first spent cap or 0, six counts}.
 */
static const char store_lua_reserve[] =
    "local n = tonumber(ARGV[1])\n"
    "local c = {}\n"
    "for i = 1, 6 do c[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end\n"
    "for i = 1, 6 do\n"
    "  local cap = tonumber(ARGV[1 + i])\n"
    "  if cap > 0 and c[i] > 0 and (c[i] >= cap or n > cap - c[i]) then\n"
    "    return {0, i, c[1], c[2], c[3], c[4], c[5], c[6]}\n"
    "  end\n"
    "end\n"
    "for i = 1, 6 do\n"
    "  c[i] = redis.call('INCRBY', KEYS[i], n)\n"
    "  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[7 + i]))\n"
    "end\n"
    "return {1, 0, c[1], c[2], c[3], c[4], c[5], c[6]}\n";

/* Due retries back into the ready stream. KEYS: retry, ready. ARGV: now,
 * batch. */
static const char store_lua_promote[] =
    "local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))\n"
    "for _, id in ipairs(ids) do\n"
    "  redis.call('XADD', KEYS[2], '*', 'id', id)\n"
    "  redis.call('ZREM', KEYS[1], id)\n"
    "end\n"
    "return #ids\n";

/*
 * Queue depth, read in one step. KEYS: ready, retry, dead. ARGV: group,
 * fallback cap. Ready is the group's lag (entries no router has read);
 * where Redis cannot compute it (deletions inside the stream) the entries
 * after last-delivered-id are counted, at most the cap. Without the group
 * every entry waits. Returns {ready, in flight, retry, dead}.
 */
static const char store_lua_depth[] =
    "local ready, pending = 0, 0\n"
    "local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])\n"
    "if type(groups) == 'table' and groups.err == nil then\n"
    "  ready = redis.call('XLEN', KEYS[1])\n"
    "  for _, g in ipairs(groups) do\n"
    "    local f = {}\n"
    "    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end\n"
    "    if f['name'] == ARGV[1] then\n"
    "      pending = f['pending']\n"
    "      if type(f['lag']) == 'number' then ready = f['lag']\n"
    "      else ready = #redis.call('XRANGE', KEYS[1], '(' .. f['last-delivered-id'], '+',\n"
    "                               'COUNT', tonumber(ARGV[2])) end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return {ready, pending, redis.call('ZCARD', KEYS[2]), redis.call('XLEN', KEYS[3])}\n";

/* Compare and set. KEYS: key. ARGV: expected ("" = absent), new. */
static const char store_lua_cas[] =
    "local cur = redis.call('GET', KEYS[1]) or ''\n"
    "if cur ~= ARGV[1] then return 0 end\n"
    "redis.call('SET', KEYS[1], ARGV[2])\n"
    "return 1\n";

struct cmds;
static void store_ack_cmds(struct store *s, struct cmds *c, const char *stream_id);

/* ---- small helpers ------------------------------------------------------- */

/* prefix + formatted rest, in a fresh string the caller frees. */
static char *store_key(const struct store *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static char *store_key(const struct store *s, const char *fmt, ...)
{
    struct buf b = BUF_INIT;
    va_list ap;

    buf_appends(&b, s->cfg->queue.prefix);
    va_start(ap, fmt);
    buf_vappendf(&b, fmt, ap);
    va_end(ap);
    return buf_steal(&b, NULL);
}

/* A list of commands built argument by argument; every argument is a
 * private copy, freed by cmds_free() once handed to redis (which copies). */
struct cmd {
    int argc;
    char **argv;
    size_t *lens;
};

struct cmds {
    struct cmd *v;
    int n;
};

static void cmds_begin(struct cmds *c)
{
    c->v = xrealloc(c->v, (size_t)(c->n + 1) * sizeof(*c->v));
    memset(&c->v[c->n], 0, sizeof(c->v[0]));
    c->n++;
}

static void cmds_argn(struct cmds *c, const char *p, size_t len)
{
    struct cmd *cmd = &c->v[c->n - 1];
    char *copy = xmalloc(len + 1);

    memcpy(copy, p, len);
    copy[len] = '\0';
    cmd->argv = xrealloc(cmd->argv, (size_t)(cmd->argc + 1) * sizeof(char *));
    cmd->lens = xrealloc(cmd->lens, (size_t)(cmd->argc + 1) * sizeof(size_t));
    cmd->argv[cmd->argc] = copy;
    cmd->lens[cmd->argc] = len;
    cmd->argc++;
}

static void cmds_arg(struct cmds *c, const char *s)
{
    cmds_argn(c, s, strlen(s));
}

static void cmds_argf(struct cmds *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void cmds_argf(struct cmds *c, const char *fmt, ...)
{
    struct buf b = BUF_INIT;
    va_list ap;

    va_start(ap, fmt);
    buf_vappendf(&b, fmt, ap);
    va_end(ap);
    cmds_argn(c, b.data ? b.data : "", b.len);
    buf_free(&b);
}

/* Adds an argument that is a key: prefix + formatted rest. */
static void cmds_keyf(struct cmds *c, const struct store *s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void cmds_keyf(struct cmds *c, const struct store *s, const char *fmt, ...)
{
    struct buf b = BUF_INIT;
    va_list ap;

    buf_appends(&b, s->cfg->queue.prefix);
    va_start(ap, fmt);
    buf_vappendf(&b, fmt, ap);
    va_end(ap);
    cmds_argn(c, b.data, b.len);
    buf_free(&b);
}

static void cmds_free(struct cmds *c)
{
    for (int i = 0; i < c->n; i++) {
        for (int j = 0; j < c->v[i].argc; j++)
            free(c->v[i].argv[j]);
        free(c->v[i].argv);
        free(c->v[i].lens);
    }
    free(c->v);
    c->v = NULL;
    c->n = 0;
}

/* Sends the list as one MULTI/EXEC and frees it. */
static void cmds_multi(struct store *s, struct cmds *c, redis_cb cb, void *arg)
{
    int *argcs = xcalloc((size_t)c->n, sizeof(int));
    const char *const **argvs = xcalloc((size_t)c->n, sizeof(*argvs));
    const size_t **lenss = xcalloc((size_t)c->n, sizeof(*lenss));

    for (int i = 0; i < c->n; i++) {
        argcs[i] = c->v[i].argc;
        argvs[i] = (const char *const *)c->v[i].argv;
        lenss[i] = c->v[i].lens;
    }
    redis_multi(s->cmd, cb, arg, c->n, argcs, (const char *const *const *)argvs,
                (const size_t *const *)lenss);
    free(argcs);
    free(argvs);
    free(lenss);
    cmds_free(c);
}

/* Sends one command of the list (the only one) and frees it. */
static void cmds_single(struct redis *r, struct cmds *c, redis_cb cb, void *arg)
{
    redis_command(r, cb, arg, c->v[0].argc, (const char **)c->v[0].argv, c->v[0].lens);
    cmds_free(c);
}

static long long store_reply_int(const redisReply *r)
{
    if (r == NULL)
        return 0;
    if (r->type == REDIS_REPLY_INTEGER)
        return r->integer;
    if (r->type == REDIS_REPLY_STRING)
        return strtoll(r->str, NULL, 10);
    return 0;
}

/* A plain completion: status for the caller. */
struct store_done {
    void (*cb)(int status, void *arg);
    void *arg;
    const char *what;
};

static void store_on_done(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct store_done *d = arg;
    int status = 0;

    if (reply == NULL || redis_reply_error(reply)) {
        log_warn("event=redis_write_failed what=%s reason=\"%s\"", d->what,
                 reply ? redis_reply_error(reply) : err);
        status = -1;
    }
    if (d->cb)
        d->cb(status, d->arg);
    free(d);
}

static struct store_done *store_done_new(void (*cb)(int, void *), void *arg, const char *what)
{
    struct store_done *d = xcalloc(1, sizeof(*d));
    d->cb = cb;
    d->arg = arg;
    d->what = what;
    return d;
}

/* ---- connection ---------------------------------------------------------- */

static void store_on_group(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    const char *e = reply ? redis_reply_error(reply) : err;

    /* BUSYGROUP: the group exists, which is the normal case. */
    if (reply == NULL || (e && strncmp(e, "BUSYGROUP", 9) != 0)) {
        log_warn("event=redis_group_failed reason=\"%s\"", e ? e : "?");
        redis_hook_done(r, -1);
        return;
    }
    redis_hook_done(r, 0);
}

/* After each connect: make sure the consumer group exists. It starts at
 * id 0 so that entries written before the group existed are routed too. */
static void store_hook(struct redis *r, void *arg)
{
    struct store *s = arg;
    char *ready = store_key(s, SCHEMA_READY);

    redis_commandf(r, store_on_group, s, "XGROUP CREATE %s %s 0 MKSTREAM", ready, SCHEMA_GROUP);
    free(ready);
}

struct store *store_new(uv_loop_t *loop, const struct mf_config *cfg)
{
    struct store *s = xcalloc(1, sizeof(*s));
    struct redis_opts o;

    s->loop = loop;
    s->cfg = cfg;
    if (cfg->router.consumer && cfg->router.consumer[0])
        snprintf(s->consumer, sizeof(s->consumer), "%s", cfg->router.consumer);
    else
        snprintf(s->consumer, sizeof(s->consumer), "%s-%d", cfg->router.hostname, (int)getpid());
    snprintf(s->claim_cursor, sizeof(s->claim_cursor), "0-0");
    redis_script_init(&s->reserve, store_lua_reserve);
    redis_script_init(&s->promote, store_lua_promote);
    redis_script_init(&s->cas, store_lua_cas);
    redis_script_init(&s->depth, store_lua_depth);

    memset(&o, 0, sizeof(o));
    o.url = &cfg->queue.url;
    o.timeout = cfg->queue.timeout;
    o.name = "router";
    o.hook = store_hook;
    o.hook_arg = s;
    s->cmd = redis_new(loop, &o);
    o.name = "router-read";
    /* A blocking read may legitimately last its block time. */
    o.timeout = cfg->queue.timeout + 2;
    s->rd = redis_new(loop, &o);
    s->open_conns = 2;
    return s;
}

static void store_conn_closed(void *arg)
{
    struct store *s = arg;

    if (--s->open_conns > 0)
        return;
    if (s->closed)
        s->closed(s->closed_arg);
    free(s);
}

void store_close(struct store *s, void (*closed)(void *arg), void *arg)
{
    s->closing = 1;
    s->closed = closed;
    s->closed_arg = arg;
    redis_close(s->rd, store_conn_closed, s);
    redis_close(s->cmd, store_conn_closed, s);
}

int store_ready(const struct store *s)
{
    return redis_ready(s->cmd) && redis_ready(s->rd);
}

const char *store_prefix(const struct store *s)
{
    return s->cfg->queue.prefix;
}

/* ---- stream -------------------------------------------------------------- */

struct store_entries_req {
    struct store *s;
    store_entries_cb cb;
    void *arg;
    int claim;
};

/* Collects entries from an XREADGROUP stream body or an XAUTOCLAIM entry
 * list: [[stream-id, [field, value, ...]], ...]. Entries whose fields were
 * deleted (nil) are returned with an empty msg_id and acknowledged by the
 * caller. */
static size_t store_collect(const redisReply *list, struct store_entry **out)
{
    struct store_entry *v;
    size_t n = 0;

    if (list == NULL || list->type != REDIS_REPLY_ARRAY || list->elements == 0) {
        *out = NULL;
        return 0;
    }
    v = xcalloc(list->elements, sizeof(*v));
    for (size_t i = 0; i < list->elements; i++) {
        const redisReply *e = list->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        snprintf(v[n].stream_id, sizeof(v[n].stream_id), "%s", e->element[0]->str);
        const redisReply *f = e->element[1];
        if (f->type == REDIS_REPLY_ARRAY) {
            for (size_t j = 0; j + 1 < f->elements; j += 2) {
                if (f->element[j]->type == REDIS_REPLY_STRING &&
                    strcmp(f->element[j]->str, SCHEMA_F_ID) == 0 &&
                    f->element[j + 1]->type == REDIS_REPLY_STRING)
                    snprintf(v[n].msg_id, sizeof(v[n].msg_id), "%s", f->element[j + 1]->str);
            }
        }
        n++;
    }
    *out = v;
    return n;
}

static void store_on_entries(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct store_entries_req *q = arg;
    struct store_entry *v = NULL;
    size_t n = 0;
    int status = 0;

    if (reply == NULL || redis_reply_error(reply)) {
        log_warn("event=redis_read_failed what=%s reason=\"%s\"", q->claim ? "claim" : "read",
                 reply ? redis_reply_error(reply) : err);
        status = -1;
    } else if (q->claim) {
        /* XAUTOCLAIM: [next-cursor, entries, deleted ids] (Redis 7). */
        if (reply->type == REDIS_REPLY_ARRAY && reply->elements >= 2) {
            if (reply->element[0]->type == REDIS_REPLY_STRING)
                snprintf(q->s->claim_cursor, sizeof(q->s->claim_cursor), "%s",
                         reply->element[0]->str);
            n = store_collect(reply->element[1], &v);
        }
    } else if (reply->type == REDIS_REPLY_ARRAY && reply->elements > 0) {
        /* XREADGROUP: [[stream, entries]] or nil when the block timed out. */
        const redisReply *st = reply->element[0];
        if (st->type == REDIS_REPLY_ARRAY && st->elements == 2)
            n = store_collect(st->element[1], &v);
    }
    q->cb(v, n, status, q->arg);
    free(v);
    free(q);
}

void store_read(struct store *s, int count, int block_ms, int own_pending, store_entries_cb cb,
                void *arg)
{
    struct store_entries_req *q = xcalloc(1, sizeof(*q));
    struct cmds c = {0};

    q->s = s;
    q->cb = cb;
    q->arg = arg;
    cmds_begin(&c);
    cmds_arg(&c, "XREADGROUP");
    cmds_arg(&c, "GROUP");
    cmds_arg(&c, SCHEMA_GROUP);
    cmds_arg(&c, s->consumer);
    cmds_arg(&c, "COUNT");
    cmds_argf(&c, "%d", count);
    if (!own_pending) {
        cmds_arg(&c, "BLOCK");
        cmds_argf(&c, "%d", block_ms);
    }
    cmds_arg(&c, "STREAMS");
    cmds_keyf(&c, s, SCHEMA_READY);
    cmds_arg(&c, own_pending ? "0" : ">");
    cmds_single(own_pending ? s->cmd : s->rd, &c, store_on_entries, q);
}

void store_claim(struct store *s, int count, store_entries_cb cb, void *arg)
{
    struct store_entries_req *q = xcalloc(1, sizeof(*q));
    struct cmds c = {0};

    q->s = s;
    q->cb = cb;
    q->arg = arg;
    q->claim = 1;
    cmds_begin(&c);
    cmds_arg(&c, "XAUTOCLAIM");
    cmds_keyf(&c, s, SCHEMA_READY);
    cmds_arg(&c, SCHEMA_GROUP);
    cmds_arg(&c, s->consumer);
    cmds_argf(&c, "%lld", (long long)s->cfg->router.claim_idle * 1000);
    cmds_arg(&c, s->claim_cursor);
    cmds_arg(&c, "COUNT");
    cmds_argf(&c, "%d", count);
    cmds_single(s->cmd, &c, store_on_entries, q);
}

static void store_on_ignore(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    const char *what = arg;

    if (reply == NULL || redis_reply_error(reply))
        log_debug("event=redis_command_failed what=%s reason=\"%s\"", what,
                  reply ? redis_reply_error(reply) : err);
}

void store_touch(struct store *s, const char *const *stream_ids, size_t n)
{
    struct cmds c = {0};

    if (n == 0)
        return;
    cmds_begin(&c);
    cmds_arg(&c, "XCLAIM");
    cmds_keyf(&c, s, SCHEMA_READY);
    cmds_arg(&c, SCHEMA_GROUP);
    cmds_arg(&c, s->consumer);
    cmds_arg(&c, "0");
    for (size_t i = 0; i < n; i++)
        cmds_arg(&c, stream_ids[i]);
    cmds_arg(&c, "JUSTID");
    cmds_single(s->cmd, &c, store_on_ignore, (void *)"touch");
}

static void store_on_promoted(struct redis *r, const redisReply *reply, const char *err,
                              void *arg)
{
    if (reply == NULL || redis_reply_error(reply)) {
        log_debug("event=redis_command_failed what=promote reason=\"%s\"",
                  reply ? redis_reply_error(reply) : err);
        return;
    }
    if (reply->type == REDIS_REPLY_INTEGER && reply->integer > 0)
        log_debug("event=retry_due count=%lld", reply->integer);
}

void store_promote(struct store *s, int64_t now_ms)
{
    char *keys[2] = {store_key(s, SCHEMA_RETRY), store_key(s, SCHEMA_READY)};
    char now[32], batch[16];
    const char *argv[4] = {keys[0], keys[1], now, batch};
    size_t lens[4];

    snprintf(now, sizeof(now), "%" PRId64, now_ms);
    snprintf(batch, sizeof(batch), "%d", PROMOTE_BATCH);
    for (int i = 0; i < 4; i++)
        lens[i] = strlen(argv[i]);
    redis_eval(s->cmd, &s->promote, store_on_promoted, NULL, 2, 4, argv, lens);
    free(keys[0]);
    free(keys[1]);
}

struct store_depth_req {
    store_depth_cb cb;
    void *arg;
};

static void store_on_depth(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct store_depth_req *q = arg;
    struct store_depth d;

    memset(&d, 0, sizeof(d));
    if (reply == NULL || redis_reply_error(reply) || reply->type != REDIS_REPLY_ARRAY ||
        reply->elements != 4) {
        log_debug("event=redis_command_failed what=depth reason=\"%s\"",
                  reply ? (redis_reply_error(reply) ? redis_reply_error(reply) : "bad reply")
                        : err);
        q->cb(&d, -1, q->arg);
        free(q);
        return;
    }
    d.ready = store_reply_int(reply->element[0]);
    d.inflight = store_reply_int(reply->element[1]);
    d.retry = store_reply_int(reply->element[2]);
    d.dead = store_reply_int(reply->element[3]);
    q->cb(&d, 0, q->arg);
    free(q);
}

void store_depth(struct store *s, store_depth_cb cb, void *arg)
{
    struct store_depth_req *q = xcalloc(1, sizeof(*q));
    char *keys[3] = {store_key(s, SCHEMA_READY), store_key(s, SCHEMA_RETRY),
                     store_key(s, SCHEMA_DEAD)};
    const char *argv[5] = {keys[0], keys[1], keys[2], SCHEMA_GROUP, "10000"};

    q->cb = cb;
    q->arg = arg;
    redis_eval(s->cmd, &s->depth, store_on_depth, q, 3, 5, argv, NULL);
    for (int i = 0; i < 3; i++)
        free(keys[i]);
}

void store_ack(struct store *s, const char *stream_id)
{
    struct cmds c = {0};

    store_ack_cmds(s, &c, stream_id);
    cmds_multi(s, &c, store_on_ignore, (void *)"ack");
}

/* ---- messages -------------------------------------------------------------- */

void store_msg_free(struct store_msg *m)
{
    if (m == NULL)
        return;
    free(m->from);
    free(m->data);
    free(m->cls);
    for (size_t i = 0; i < m->nrcpts; i++) {
        free(m->rcpts[i].addr);
        free(m->rcpts[i].text);
        free(m->rcpts[i].route);
        free(m->rcpts[i].remote);
        free(m->rcpts[i].pin);
    }
    free(m->rcpts);
    free(m);
}

static const char *const store_state_names[] = {
    [STORE_RCPT_PENDING] = "pending", [STORE_RCPT_DEFERRED] = "deferred",
    [STORE_RCPT_DELIVERED] = "delivered", [STORE_RCPT_FAILED] = "failed",
};

static void store_parse_rcpt_state(struct store_rcpt *r, const char *json, size_t len)
{
    json_error_t jerr;
    json_t *o = json_loadb(json, len, 0, &jerr);
    const char *st;

    if (o == NULL || !json_is_object(o)) {
        json_decref(o);
        return;
    }
    st = json_string_value(json_object_get(o, "s"));
    for (int i = 0; st && i <= STORE_RCPT_FAILED; i++)
        if (strcmp(st, store_state_names[i]) == 0)
            r->state = (enum store_rcpt_state)i;
    r->code = (int)json_integer_value(json_object_get(o, "code"));
    snprintf(r->enh, sizeof(r->enh), "%s",
             json_string_value(json_object_get(o, "enh")) ? json_string_value(json_object_get(o, "enh")) : "");
    if (json_string_value(json_object_get(o, "text")))
        r->text = xstrdup(json_string_value(json_object_get(o, "text")));
    if (json_string_value(json_object_get(o, "route")))
        r->route = xstrdup(json_string_value(json_object_get(o, "route")));
    if (json_string_value(json_object_get(o, "remote")))
        r->remote = xstrdup(json_string_value(json_object_get(o, "remote")));
    r->t = (int64_t)json_integer_value(json_object_get(o, "t"));
    r->attempts = (int)json_integer_value(json_object_get(o, "n"));
    r->bounced = json_is_true(json_object_get(o, "b"));
    if (json_string_value(json_object_get(o, "pin")))
        r->pin = xstrdup(json_string_value(json_object_get(o, "pin")));
    json_decref(o);
}

struct store_load_req {
    store_msg_cb cb;
    void *arg;
    char id[64];
};

/* Parses an HGETALL reply into a message. Returns NULL for an empty reply
 * (no such key) or a message without the required fields. */
static struct store_msg *store_parse_msg(const redisReply *reply, const char *id, int *bad)
{
    struct store_msg *m;
    const redisReply *rcpts = NULL;

    *bad = 0;
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements == 0)
        return NULL;
    m = xcalloc(1, sizeof(*m));
    snprintf(m->id, sizeof(m->id), "%s", id);
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const redisReply *k = reply->element[i], *v = reply->element[i + 1];
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        if (strcmp(k->str, SCHEMA_F_FROM) == 0)
            m->from = xstrndup(v->str, v->len);
        else if (strcmp(k->str, SCHEMA_F_DATA) == 0) {
            m->data = xmemdup(v->str, v->len + 1);
            m->len = v->len;
        } else if (strcmp(k->str, SCHEMA_F_CLASS) == 0)
            m->cls = xstrndup(v->str, v->len);
        else if (strcmp(k->str, SCHEMA_F_CREATED) == 0)
            m->created = strtoll(v->str, NULL, 10);
        else if (strcmp(k->str, SCHEMA_F_ATTEMPTS) == 0)
            m->attempts = (int)strtol(v->str, NULL, 10);
        else if (strcmp(k->str, SCHEMA_F_RCPTS) == 0)
            rcpts = v;
    }
    if (rcpts) {
        json_error_t jerr;
        json_t *a = json_loadb(rcpts->str, rcpts->len, 0, &jerr);
        if (a && json_is_array(a) && json_array_size(a) > 0) {
            m->nrcpts = json_array_size(a);
            m->rcpts = xcalloc(m->nrcpts, sizeof(*m->rcpts));
            for (size_t i = 0; i < m->nrcpts; i++) {
                const char *addr = json_string_value(json_array_get(a, i));
                m->rcpts[i].addr = xstrdup(addr ? addr : "");
            }
        }
        json_decref(a);
    }
    if (m->from == NULL || m->data == NULL || m->nrcpts == 0) {
        *bad = 1;
        store_msg_free(m);
        return NULL;
    }
    if (m->cls == NULL)
        m->cls = xstrdup("");
    /* Per-recipient state: st:<index>. */
    for (size_t i = 0; i + 1 < reply->elements; i += 2) {
        const redisReply *k = reply->element[i], *v = reply->element[i + 1];
        size_t pl = sizeof(SCHEMA_F_RCPT_STATE) - 1;
        char *end;
        unsigned long idx;
        if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
            strncmp(k->str, SCHEMA_F_RCPT_STATE, pl) != 0)
            continue;
        idx = strtoul(k->str + pl, &end, 10);
        if (*end == '\0' && idx < m->nrcpts)
            store_parse_rcpt_state(&m->rcpts[idx], v->str, v->len);
    }
    return m;
}

static void store_on_load(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct store_load_req *q = arg;
    struct store_msg *m = NULL;
    int bad = 0;

    if (reply == NULL || redis_reply_error(reply)) {
        q->cb(NULL, -1, reply ? redis_reply_error(reply) : err, q->arg);
        free(q);
        return;
    }
    m = store_parse_msg(reply, q->id, &bad);
    if (bad)
        log_error("id=%s event=bad_message reason=\"missing from, data or rcpts\"", q->id);
    q->cb(m, 0, NULL, q->arg);
    free(q);
}

void store_load(struct store *s, const char *id, store_msg_cb cb, void *arg)
{
    struct store_load_req *q = xcalloc(1, sizeof(*q));
    char *key = store_key(s, SCHEMA_MSG "%s", id);

    q->cb = cb;
    q->arg = arg;
    snprintf(q->id, sizeof(q->id), "%s", id);
    redis_commandf(s->cmd, store_on_load, q, "HGETALL %s", key);
    free(key);
}

/* ---- caps ------------------------------------------------------------------ */

struct store_reserve_req {
    store_reserve_cb cb;
    void *arg;
};

static void store_on_reserve(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct store_reserve_req *q = arg;
    struct policy_counts rc = {0}, dc = {0};

    if (reply == NULL || redis_reply_error(reply) || reply->type != REDIS_REPLY_ARRAY ||
        reply->elements != 8) {
        log_warn("event=redis_command_failed what=reserve reason=\"%s\"",
                 reply ? (redis_reply_error(reply) ? redis_reply_error(reply) : "bad reply") : err);
        q->cb(0, &rc, &dc, -1, q->arg);
        free(q);
        return;
    }
    rc.minute = (uint64_t)store_reply_int(reply->element[2]);
    rc.hour = (uint64_t)store_reply_int(reply->element[3]);
    rc.day = (uint64_t)store_reply_int(reply->element[4]);
    dc.minute = (uint64_t)store_reply_int(reply->element[5]);
    dc.hour = (uint64_t)store_reply_int(reply->element[6]);
    dc.day = (uint64_t)store_reply_int(reply->element[7]);
    q->cb(store_reply_int(reply->element[0]) == 1, &rc, &dc, 0, q->arg);
    free(q);
}

void store_reserve(struct store *s, const char *route, const char *domain, int64_t now_ms,
                   uint32_t nrcpt, const struct policy_caps *caps, store_reserve_cb cb,
                   void *arg)
{
    struct store_reserve_req *q = xcalloc(1, sizeof(*q));
    char *argv[19];
    size_t lens[19];
    long long b[3] = {now_ms / MS_MINUTE, now_ms / MS_HOUR, now_ms / MS_DAY};
    static const char per[3] = {'m', 'h', 'd'};
    int64_t capv[6] = {caps->minute, caps->hour, caps->day,
                       caps->domain_minute, caps->domain_hour, caps->domain_day};
    static const int ttl[3] = {TTL_MINUTE, TTL_HOUR, TTL_DAY};
    struct buf t = BUF_INIT;

    q->cb = cb;
    q->arg = arg;
    for (int i = 0; i < 3; i++) {
        argv[i] = store_key(s, SCHEMA_COUNT "%s:%c:%lld", route, per[i], b[i]);
        argv[3 + i] = store_key(s, SCHEMA_COUNT "%s:%s:%c:%lld", route, domain, per[i], b[i]);
    }
    buf_appendf(&t, "%u", nrcpt);
    argv[6] = buf_steal(&t, NULL);
    for (int i = 0; i < 6; i++) {
        buf_appendf(&t, "%" PRId64, capv[i]);
        argv[7 + i] = buf_steal(&t, NULL);
        buf_appendf(&t, "%d", ttl[i % 3]);
        argv[13 + i] = buf_steal(&t, NULL);
    }
    for (int i = 0; i < 19; i++)
        lens[i] = strlen(argv[i]);
    redis_eval(s->cmd, &s->reserve, store_on_reserve, q, 6, 19, (const char **)argv, lens);
    for (int i = 0; i < 19; i++)
        free(argv[i]);
}

/* ---- windows ---------------------------------------------------------------- */

/* Reputation windows are kept in buckets of a twelfth of the window (at
 * least a minute); a window is the sum of the buckets it covers. */
static int64_t store_bucket_ms(int64_t window_ms)
{
    int64_t b = window_ms / 12;
    return b < MS_MINUTE ? MS_MINUTE : b;
}

/* Appends HMGETs for every bucket of the window, then one for the probe
 * counters. Returns the number of commands added. */
static int store_window_cmds(struct store *s, struct cmds *c, const char *route,
                             const char *domain, int64_t window_ms, int64_t probe_since,
                             int64_t now_ms)
{
    int64_t bms = store_bucket_ms(window_ms);
    int64_t last = now_ms / bms, first = (now_ms - window_ms) / bms + 1;
    int n = 0;

    for (int64_t i = first; i <= last; i++) {
        cmds_begin(c);
        cmds_arg(c, "HMGET");
        if (domain)
            cmds_keyf(c, s, SCHEMA_WINDOW "%s:%s:%" PRId64 ":%" PRId64, route, domain, bms, i);
        else
            cmds_keyf(c, s, SCHEMA_WINDOW "%s:%" PRId64 ":%" PRId64, route, bms, i);
        cmds_arg(c, "sent");
        cmds_arg(c, "bounced");
        cmds_arg(c, "deferred");
        cmds_arg(c, "complained");
        n++;
    }
    cmds_begin(c);
    cmds_arg(c, "HMGET");
    if (domain)
        cmds_keyf(c, s, SCHEMA_PROBE "%s:%s:%" PRId64, route, domain, probe_since);
    else
        cmds_keyf(c, s, SCHEMA_PROBE "%s:%" PRId64, route, probe_since);
    cmds_arg(c, "ok");
    cmds_arg(c, "bad");
    return n + 1;
}

/* Sums the replies written by store_window_cmds() starting at element at. */
static void store_window_sum(const redisReply *exec, size_t at, int ncmds, struct policy_window *w)
{
    memset(w, 0, sizeof(*w));
    for (int i = 0; i < ncmds && at + (size_t)i < exec->elements; i++) {
        const redisReply *h = exec->element[at + (size_t)i];
        if (h->type != REDIS_REPLY_ARRAY)
            continue;
        if (i == ncmds - 1) {
            if (h->elements == 2) {
                w->probe_ok = (uint64_t)store_reply_int(h->element[0]);
                w->probe_bad = (uint64_t)store_reply_int(h->element[1]);
            }
            continue;
        }
        if (h->elements == 4) {
            w->sent += (uint64_t)store_reply_int(h->element[0]);
            w->bounced += (uint64_t)store_reply_int(h->element[1]);
            w->deferred += (uint64_t)store_reply_int(h->element[2]);
            w->complained += (uint64_t)store_reply_int(h->element[3]);
        }
    }
}

struct store_window_req {
    store_window_cb cb;
    void *arg;
    int ncmds;
};

static void store_on_window(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct store_window_req *q = arg;
    struct policy_window w;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        memset(&w, 0, sizeof(w));
        q->cb(&w, -1, q->arg);
    } else {
        store_window_sum(reply, 0, q->ncmds, &w);
        q->cb(&w, 0, q->arg);
    }
    free(q);
}

void store_window(struct store *s, const char *route, const char *domain, int64_t window_ms,
                  int64_t probe_since_ms, int64_t now_ms, store_window_cb cb, void *arg)
{
    struct store_window_req *q = xcalloc(1, sizeof(*q));
    struct cmds c = {0};

    q->cb = cb;
    q->arg = arg;
    q->ncmds = store_window_cmds(s, &c, route, domain, window_ms, probe_since_ms, now_ms);
    cmds_multi(s, &c, store_on_window, q);
}

/* ---- snapshot -------------------------------------------------------------- */

void store_snapshot_free(struct store_snapshot *sn)
{
    if (sn == NULL)
        return;
    for (size_t i = 0; i < sn->npolicy; i++) {
        free(sn->policy_keys[i]);
        free(sn->policy_values[i]);
    }
    free(sn->policy_keys);
    free(sn->policy_values);
    free(sn->routes);
    free(sn);
}

struct store_snapshot_req {
    store_snapshot_cb cb;
    void *arg;
    size_t nroutes;
    int *nwin;                   /* window commands per route */
};

static void store_copy_str(char *out, size_t n, const redisReply *r)
{
    if (r && r->type == REDIS_REPLY_STRING)
        snprintf(out, n, "%.*s", (int)r->len, r->str);
    else
        out[0] = '\0';
}

static void store_on_snapshot(struct redis *r, const redisReply *reply, const char *err,
                              void *arg)
{
    struct store_snapshot_req *q = arg;
    struct store_snapshot *sn;
    size_t at = 1;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY || reply->elements < 1) {
        q->cb(NULL, -1, q->arg);
        free(q->nwin);
        free(q);
        return;
    }
    sn = xcalloc(1, sizeof(*sn));
    sn->nroutes = q->nroutes;
    sn->routes = xcalloc(q->nroutes ? q->nroutes : 1, sizeof(*sn->routes));
    /* Element 0: HGETALL policy. */
    const redisReply *pol = reply->element[0];
    if (pol->type == REDIS_REPLY_ARRAY && pol->elements >= 2) {
        size_t n = pol->elements / 2;
        sn->policy_keys = xcalloc(n, sizeof(char *));
        sn->policy_values = xcalloc(n, sizeof(char *));
        for (size_t i = 0; i < n; i++) {
            const redisReply *k = pol->element[2 * i], *v = pol->element[2 * i + 1];
            if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
                continue;
            sn->policy_keys[sn->npolicy] = xstrndup(k->str, k->len);
            sn->policy_values[sn->npolicy] = xstrndup(v->str, v->len);
            sn->npolicy++;
        }
    }
    for (size_t i = 0; i < q->nroutes && at < reply->elements; i++) {
        struct store_route_snapshot *rs = &sn->routes[i];
        const redisReply *mg = reply->element[at++];
        if (mg->type == REDIS_REPLY_ARRAY && mg->elements == 4) {
            rs->sent.minute = (uint64_t)store_reply_int(mg->element[0]);
            rs->sent.hour = (uint64_t)store_reply_int(mg->element[1]);
            rs->sent.day = (uint64_t)store_reply_int(mg->element[2]);
            store_copy_str(rs->breaker_raw, sizeof(rs->breaker_raw), mg->element[3]);
            if (rs->breaker_raw[0] == '\0' ||
                policy_breaker_parse(rs->breaker_raw, &rs->breaker) != 0)
                memset(&rs->breaker, 0, sizeof(rs->breaker));
        }
        store_window_sum(reply, at, q->nwin[i], &rs->window);
        at += (size_t)q->nwin[i];
    }
    q->cb(sn, 0, q->arg);
    free(q->nwin);
    free(q);
}

void store_snapshot(struct store *s, const struct policy_config *cfg, int64_t now_ms,
                    store_snapshot_cb cb, void *arg)
{
    struct store_snapshot_req *q = xcalloc(1, sizeof(*q));
    struct cmds c = {0};
    size_t n = policy_route_count(cfg);

    q->cb = cb;
    q->arg = arg;
    q->nroutes = n;
    q->nwin = xcalloc(n ? n : 1, sizeof(int));
    cmds_begin(&c);
    cmds_arg(&c, "HGETALL");
    cmds_keyf(&c, s, SCHEMA_POLICY);
    for (size_t i = 0; i < n; i++) {
        struct policy_route_info info;

        policy_route_info(cfg, i, &info);
        cmds_begin(&c);
        cmds_arg(&c, "MGET");
        cmds_keyf(&c, s, SCHEMA_COUNT "%s:m:%" PRId64, info.name, now_ms / MS_MINUTE);
        cmds_keyf(&c, s, SCHEMA_COUNT "%s:h:%" PRId64, info.name, now_ms / MS_HOUR);
        cmds_keyf(&c, s, SCHEMA_COUNT "%s:d:%" PRId64, info.name, now_ms / MS_DAY);
        cmds_keyf(&c, s, SCHEMA_BREAKER "%s", info.name);
        /* Probe counters are read separately (store_window) for breakers
         * that are half open, keyed by the period's start. */
        q->nwin[i] = store_window_cmds(s, &c, info.name, NULL, info.window_ms, 0, now_ms);
    }
    cmds_multi(s, &c, store_on_snapshot, q);
}

/* ---- per destination ------------------------------------------------------ */

struct store_domain_req {
    store_domain_cb cb;
    void *arg;
    size_t nroutes;
};

static void store_on_domain(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct store_domain_req *q = arg;
    struct store_domain_state *v = xcalloc(q->nroutes ? q->nroutes : 1, sizeof(*v));
    int status = 0;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY ||
        reply->elements != q->nroutes * 5) {
        status = -1;
    } else {
        for (size_t i = 0; i < q->nroutes; i++) {
            const redisReply *const *e = (const redisReply *const *)reply->element + i * 5;
            char thr[160];
            v[i].sent.minute = (uint64_t)store_reply_int(e[0]);
            v[i].sent.hour = (uint64_t)store_reply_int(e[1]);
            v[i].sent.day = (uint64_t)store_reply_int(e[2]);
            store_copy_str(v[i].breaker_raw, sizeof(v[i].breaker_raw), e[3]);
            if (v[i].breaker_raw[0] == '\0' ||
                policy_breaker_parse(v[i].breaker_raw, &v[i].breaker) != 0)
                memset(&v[i].breaker, 0, sizeof(v[i].breaker));
            store_copy_str(thr, sizeof(thr), e[4]);
            if (thr[0] == '\0' || policy_throttle_parse(thr, &v[i].throttle) != 0)
                memset(&v[i].throttle, 0, sizeof(v[i].throttle));
        }
    }
    q->cb(v, q->nroutes, status, q->arg);
    free(v);
    free(q);
}

void store_domain(struct store *s, const struct policy_config *cfg, const char *domain,
                  int64_t now_ms, store_domain_cb cb, void *arg)
{
    struct store_domain_req *q = xcalloc(1, sizeof(*q));
    struct cmds c = {0};
    size_t n = policy_route_count(cfg);

    q->cb = cb;
    q->arg = arg;
    q->nroutes = n;
    cmds_begin(&c);
    cmds_arg(&c, "MGET");
    for (size_t i = 0; i < n; i++) {
        struct policy_route_info info;
        policy_route_info(cfg, i, &info);
        cmds_keyf(&c, s, SCHEMA_COUNT "%s:%s:m:%" PRId64, info.name, domain, now_ms / MS_MINUTE);
        cmds_keyf(&c, s, SCHEMA_COUNT "%s:%s:h:%" PRId64, info.name, domain, now_ms / MS_HOUR);
        cmds_keyf(&c, s, SCHEMA_COUNT "%s:%s:d:%" PRId64, info.name, domain, now_ms / MS_DAY);
        cmds_keyf(&c, s, SCHEMA_BREAKER "%s:%s", info.name, domain);
        cmds_keyf(&c, s, SCHEMA_THROTTLE "%s:%s", info.name, domain);
    }
    if (n == 0) {
        /* MGET needs a key; nothing to read. */
        cmds_free(&c);
        q->nroutes = 0;
        redis_commandf(s->cmd, store_on_domain, q, "PING");
        return;
    }
    cmds_single(s->cmd, &c, store_on_domain, q);
}

void store_breaker_cas(struct store *s, const char *route, const char *domain,
                       const char *old_raw, const char *new_raw)
{
    char *key = domain ? store_key(s, SCHEMA_BREAKER "%s:%s", route, domain)
                       : store_key(s, SCHEMA_BREAKER "%s", route);
    const char *argv[3] = {key, old_raw, new_raw};
    size_t lens[3] = {strlen(key), strlen(old_raw), strlen(new_raw)};

    redis_eval(s->cmd, &s->cas, store_on_ignore, (void *)"breaker", 1, 3, argv, lens);
    free(key);
}

void store_throttle_set(struct store *s, const char *route, const char *domain,
                        const struct policy_throttle *t, int64_t now_ms)
{
    char *key = store_key(s, SCHEMA_THROTTLE "%s:%s", route, domain);
    char val[128];
    /* Kept a day past its end, so that a repeat within the maximum backoff
     * finds the level (policy_throttle_hit). */
    long long ttl = (t->until_ms - now_ms) + MS_DAY;

    policy_throttle_format(t, val, sizeof(val));
    redis_commandf(s->cmd, store_on_ignore, (void *)"throttle", "SET %s %s PX %lld", key, val,
                   ttl > 0 ? ttl : 1000);
    free(key);
}

void store_health(struct store *s, const char *route, int healthy, const char *why,
                  int64_t now_ms)
{
    char *key = store_key(s, SCHEMA_HEALTH "%s", route);

    redis_commandf(s->cmd, store_on_ignore, (void *)"health",
                   "HSET %s healthy %d why %s t %lld router %s", key, healthy, why ? why : "",
                   (long long)now_ms, s->consumer);
    free(key);
}

/* ---- results ---------------------------------------------------------------- */

static char *store_rcpt_json(const struct store_rcpt *r)
{
    json_t *o = json_object();
    char *s;

    json_object_set_new(o, "s", json_string(store_state_names[r->state]));
    json_object_set_new(o, "code", json_integer(r->code));
    json_object_set_new(o, "enh", json_string(r->enh));
    if (r->text)
        json_object_set_new(o, "text", json_stringn_nocheck(r->text, strlen(r->text)));
    if (r->route)
        json_object_set_new(o, "route", json_string(r->route));
    if (r->remote)
        json_object_set_new(o, "remote", json_string(r->remote));
    json_object_set_new(o, "t", json_integer(r->t));
    json_object_set_new(o, "n", json_integer(r->attempts));
    if (r->bounced)
        json_object_set_new(o, "b", json_true());
    if (r->pin)
        json_object_set_new(o, "pin", json_string(r->pin));
    s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

static void store_hincr_window(struct store *s, struct cmds *c, const struct store_outcome *o,
                               const char *domain, int64_t bucket_ms, int64_t bucket,
                               uint64_t sent, uint64_t bounced, uint64_t deferred, long ttl)
{
    const char *fields[3] = {"sent", "bounced", "deferred"};
    uint64_t vals[3] = {sent, bounced, deferred};

    for (int i = 0; i < 3; i++) {
        if (vals[i] == 0)
            continue;
        cmds_begin(c);
        cmds_arg(c, "HINCRBY");
        if (domain)
            cmds_keyf(c, s, SCHEMA_WINDOW "%s:%s:%" PRId64 ":%" PRId64, o->route, domain,
                      bucket_ms, bucket);
        else
            cmds_keyf(c, s, SCHEMA_WINDOW "%s:%" PRId64 ":%" PRId64, o->route, bucket_ms, bucket);
        cmds_arg(c, fields[i]);
        cmds_argf(c, "%" PRIu64, vals[i]);
    }
    cmds_begin(c);
    cmds_arg(c, "EXPIRE");
    if (domain)
        cmds_keyf(c, s, SCHEMA_WINDOW "%s:%s:%" PRId64 ":%" PRId64, o->route, domain, bucket_ms,
                  bucket);
    else
        cmds_keyf(c, s, SCHEMA_WINDOW "%s:%" PRId64 ":%" PRId64, o->route, bucket_ms, bucket);
    cmds_argf(c, "%ld", ttl);
}

static void store_hincr_probe(struct store *s, struct cmds *c, const char *route,
                              const char *domain, int64_t since, uint64_t ok, uint64_t bad)
{
    const char *fields[2] = {"ok", "bad"};
    uint64_t vals[2] = {ok, bad};

    for (int i = 0; i < 2; i++) {
        if (vals[i] == 0)
            continue;
        cmds_begin(c);
        cmds_arg(c, "HINCRBY");
        if (domain)
            cmds_keyf(c, s, SCHEMA_PROBE "%s:%s:%" PRId64, route, domain, since);
        else
            cmds_keyf(c, s, SCHEMA_PROBE "%s:%" PRId64, route, since);
        cmds_arg(c, fields[i]);
        cmds_argf(c, "%" PRIu64, vals[i]);
    }
    cmds_begin(c);
    cmds_arg(c, "EXPIRE");
    if (domain)
        cmds_keyf(c, s, SCHEMA_PROBE "%s:%s:%" PRId64, route, domain, since);
    else
        cmds_keyf(c, s, SCHEMA_PROBE "%s:%" PRId64, route, since);
    cmds_argf(c, "%d", TTL_DAY * 7);
}

void store_record(struct store *s, const struct store_msg *m, const struct store_outcome *o,
                  void (*cb)(int status, void *arg), void *arg)
{
    struct cmds c = {0};
    uint64_t delivered = 0, failed = 0, deferred = 0;
    int held = strcmp(o->route, "hold") == 0;
    int64_t now = 0;

    for (size_t k = 0; k < o->n; k++) {
        const struct store_rcpt *r = &m->rcpts[o->idx[k]];
        char *json = store_rcpt_json(r);

        if (r->t > now)
            now = r->t;
        cmds_begin(&c);
        cmds_arg(&c, "HSET");
        cmds_keyf(&c, s, SCHEMA_MSG "%s", m->id);
        cmds_argf(&c, SCHEMA_F_RCPT_STATE "%zu", o->idx[k]);
        cmds_arg(&c, json);
        free(json);

        cmds_begin(&c);
        cmds_arg(&c, "XADD");
        cmds_keyf(&c, s, SCHEMA_EVENTS);
        cmds_arg(&c, "MAXLEN");
        cmds_arg(&c, "~");
        cmds_argf(&c, "%d", s->cfg->router.events_maxlen);
        cmds_arg(&c, "*");
        cmds_arg(&c, "id");
        cmds_arg(&c, m->id);
        cmds_arg(&c, "rcpt");
        cmds_arg(&c, r->addr);
        cmds_arg(&c, "route");
        cmds_arg(&c, o->route);
        cmds_arg(&c, "reason");
        cmds_arg(&c, o->reason ? o->reason : "");
        cmds_arg(&c, "result");
        cmds_arg(&c, held ? "held" : store_state_names[r->state]);
        cmds_arg(&c, "code");
        cmds_argf(&c, "%d", r->code);
        cmds_arg(&c, "enh");
        cmds_arg(&c, r->enh);
        cmds_arg(&c, "text");
        cmds_arg(&c, r->text ? r->text : "");
        cmds_arg(&c, "remote");
        cmds_arg(&c, r->remote ? r->remote : "");
        cmds_arg(&c, "latency_ms");
        cmds_argf(&c, "%" PRId64, o->latency_ms);
        cmds_arg(&c, "attempt");
        cmds_argf(&c, "%d", r->attempts);
        if (o->provider_id && o->provider_id[0]) {
            cmds_arg(&c, "provider_id");
            cmds_arg(&c, o->provider_id);
        }
        if (r->pin) {
            cmds_arg(&c, "ambiguous");
            cmds_arg(&c, "1");
        }

        if (r->state == STORE_RCPT_DELIVERED)
            delivered++;
        else if (r->state == STORE_RCPT_FAILED)
            failed++;
        else
            deferred++;
    }
    if (!held) {
        int64_t bms = store_bucket_ms(o->window_ms);
        long ttl = (long)((o->window_ms + bms) / 1000 + 60);
        uint64_t sent = delivered + failed + deferred;
        store_hincr_window(s, &c, o, NULL, bms, now / bms, sent, failed, deferred, ttl);
        store_hincr_window(s, &c, o, o->domain, bms, now / bms, sent, failed, deferred, ttl);
        if (o->probe_route)
            store_hincr_probe(s, &c, o->route, NULL, o->probe_route_since, delivered,
                              failed + deferred);
        if (o->probe_domain)
            store_hincr_probe(s, &c, o->route, o->domain, o->probe_domain_since, delivered,
                              failed + deferred);
    }
    cmds_begin(&c);
    cmds_arg(&c, "HINCRBY");
    cmds_keyf(&c, s, SCHEMA_STATS "%s:%" PRId64, o->route, now / MS_HOUR);
    cmds_arg(&c, held ? "held" : "delivered");
    cmds_argf(&c, "%" PRIu64, held ? (uint64_t)o->n : delivered);
    if (!held) {
        cmds_begin(&c);
        cmds_arg(&c, "HINCRBY");
        cmds_keyf(&c, s, SCHEMA_STATS "%s:%" PRId64, o->route, now / MS_HOUR);
        cmds_arg(&c, "deferred");
        cmds_argf(&c, "%" PRIu64, deferred);
        cmds_begin(&c);
        cmds_arg(&c, "HINCRBY");
        cmds_keyf(&c, s, SCHEMA_STATS "%s:%" PRId64, o->route, now / MS_HOUR);
        cmds_arg(&c, "bounced");
        cmds_argf(&c, "%" PRIu64, failed);
    }
    cmds_begin(&c);
    cmds_arg(&c, "EXPIRE");
    cmds_keyf(&c, s, SCHEMA_STATS "%s:%" PRId64, o->route, now / MS_HOUR);
    cmds_argf(&c, "%d", TTL_STATS);
    cmds_multi(s, &c, store_on_done, store_done_new(cb, arg, "record"));
}

/* Acknowledges a stream entry and deletes it: the stream holds only
 * entries still to be routed, so it does not grow without bound (a message
 * waiting for its retry is in <prefix>retry, not in the stream). */
static void store_ack_cmds(struct store *s, struct cmds *c, const char *stream_id)
{
    cmds_begin(c);
    cmds_arg(c, "XACK");
    cmds_keyf(c, s, SCHEMA_READY);
    cmds_arg(c, SCHEMA_GROUP);
    cmds_arg(c, stream_id);
    cmds_begin(c);
    cmds_arg(c, "XDEL");
    cmds_keyf(c, s, SCHEMA_READY);
    cmds_arg(c, stream_id);
}

/* HSET of every recipient state marked dirty. */
static void store_dirty_cmds(struct store *s, struct cmds *c, const struct store_msg *m)
{
    for (size_t i = 0; i < m->nrcpts; i++) {
        char *json;
        if (!m->rcpts[i].dirty)
            continue;
        json = store_rcpt_json(&m->rcpts[i]);
        cmds_begin(c);
        cmds_arg(c, "HSET");
        cmds_keyf(c, s, SCHEMA_MSG "%s", m->id);
        cmds_argf(c, SCHEMA_F_RCPT_STATE "%zu", i);
        cmds_arg(c, json);
        free(json);
    }
}

void store_finish_retry(struct store *s, const struct store_msg *m, const char *stream_id,
                        int64_t due_ms, void (*cb)(int status, void *arg), void *arg)
{
    struct cmds c = {0};

    store_dirty_cmds(s, &c, m);
    cmds_begin(&c);
    cmds_arg(&c, "HSET");
    cmds_keyf(&c, s, SCHEMA_MSG "%s", m->id);
    cmds_arg(&c, SCHEMA_F_ATTEMPTS);
    cmds_argf(&c, "%d", m->attempts);
    cmds_arg(&c, SCHEMA_F_NEXT);
    cmds_argf(&c, "%" PRId64, due_ms);
    cmds_begin(&c);
    cmds_arg(&c, "ZADD");
    cmds_keyf(&c, s, SCHEMA_RETRY);
    cmds_argf(&c, "%" PRId64, due_ms);
    cmds_arg(&c, m->id);
    store_ack_cmds(s, &c, stream_id);
    cmds_multi(s, &c, store_on_done, store_done_new(cb, arg, "finish_retry"));
}

void store_finish_done(struct store *s, const struct store_msg *m, const char *stream_id,
                       const char *dead_reason, void (*cb)(int status, void *arg), void *arg)
{
    struct cmds c = {0};

    if (dead_reason) {
        store_dirty_cmds(s, &c, m);
        cmds_begin(&c);
        cmds_arg(&c, "XADD");
        cmds_keyf(&c, s, SCHEMA_DEAD);
        cmds_arg(&c, "MAXLEN");
        cmds_arg(&c, "~");
        cmds_argf(&c, "%d", DEAD_MAXLEN);
        cmds_arg(&c, "*");
        cmds_arg(&c, SCHEMA_F_ID);
        cmds_arg(&c, m->id);
        cmds_arg(&c, "reason");
        cmds_arg(&c, dead_reason);
        cmds_arg(&c, SCHEMA_F_FROM);
        cmds_arg(&c, m->from);
    } else {
        cmds_begin(&c);
        cmds_arg(&c, "DEL");
        cmds_keyf(&c, s, SCHEMA_MSG "%s", m->id);
    }
    cmds_begin(&c);
    cmds_arg(&c, "ZREM");
    cmds_keyf(&c, s, SCHEMA_RETRY);
    cmds_arg(&c, m->id);
    store_ack_cmds(s, &c, stream_id);
    cmds_multi(s, &c, store_on_done, store_done_new(cb, arg, "finish_done"));
}
