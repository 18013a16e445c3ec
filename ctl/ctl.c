#include "ctl/ctl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "lib/buf.h"
#include "lib/xmalloc.h"

/* Commands never take more arguments than this through the varargs form. */
#define CTL_MAX_ARGS 32

void ctl_error(const char *fmt, ...)
{
    va_list ap;

    fputs("mailferryctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* Reports the failure of the context (connection lost, timeout) once. */
static void ctl_redis_failed(struct ctl *c)
{
    ctl_error("Redis at %s: %s", c->where,
              c->redis && c->redis->errstr[0] ? c->redis->errstr : "connection lost");
}

/* Sends one command as given, without reporting anything. */
static redisReply *ctl_send(struct ctl *c, size_t argc, const char **argv)
{
    size_t lens[4];

    for (size_t i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    return redisCommandArgv(c->redis, (int)argc, argv, lens);
}

/* Sends AUTH, SELECT or PING during connection set-up. Returns 0, or -1
 * after printing why. */
static int ctl_handshake(struct ctl *c, size_t argc, const char **argv)
{
    redisReply *r = ctl_send(c, argc, argv);

    if (r == NULL) {
        /* hiredis reports a read timeout as EAGAIN's text. */
        if (c->redis->err == REDIS_ERR_IO && (errno == EAGAIN || errno == EWOULDBLOCK))
            ctl_error("cannot reach Redis at %s: no answer within %d s", c->where,
                      CTL_CONNECT_TIMEOUT_S);
        else
            ctl_error("cannot reach Redis at %s: %s", c->where,
                      c->redis->errstr[0] ? c->redis->errstr : "connection lost");
        return -1;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        ctl_error("Redis at %s: %s failed: %s", c->where, argv[0], r->str);
        freeReplyObject(r);
        return -1;
    }
    freeReplyObject(r);
    return 0;
}

int ctl_redis_connect(struct ctl *c)
{
    const struct config_redis *u = &c->cfg.queue.url;
    struct timeval tv = {CTL_CONNECT_TIMEOUT_S, 0};
    const char *ping[1] = {"PING"};
    char db[24];

    if (c->redis != NULL)
        return 0;
    if (strchr(u->host, ':') != NULL)
        snprintf(c->where, sizeof(c->where), "[%s]:%d", u->host, u->port);
    else
        snprintf(c->where, sizeof(c->where), "%s:%d", u->host, u->port);

    c->redis = redisConnectWithTimeout(u->host, u->port, tv);
    if (c->redis == NULL || c->redis->err) {
        ctl_error("cannot reach Redis at %s: %s", c->where,
                  c->redis ? c->redis->errstr : "out of memory");
        if (c->redis)
            redisFree(c->redis);
        c->redis = NULL;
        return CTL_EXIT_RUNTIME;
    }
    /* The set-up has the connection's time limit: a peer that accepts
     * but does not answer is as unreachable as one that refuses. */
    if (redisSetTimeout(c->redis, tv) != REDIS_OK) {
        ctl_error("cannot reach Redis at %s: %s", c->where, c->redis->errstr);
        goto fail;
    }
    if (u->password != NULL) {
        const char *argv[2] = {"AUTH", u->password};
        if (ctl_handshake(c, 2, argv) != 0)
            goto fail;
    }
    if (u->db != 0) {
        const char *argv[2] = {"SELECT", db};
        snprintf(db, sizeof(db), "%d", u->db);
        if (ctl_handshake(c, 2, argv) != 0)
            goto fail;
    }
    if (ctl_handshake(c, 1, ping) != 0)
        goto fail;
    tv.tv_sec = c->cfg.queue.timeout > 0 ? c->cfg.queue.timeout : CTL_CONNECT_TIMEOUT_S;
    if (redisSetTimeout(c->redis, tv) != REDIS_OK) {
        ctl_error("cannot reach Redis at %s: %s", c->where, c->redis->errstr);
        goto fail;
    }
    return 0;

fail:
    redisFree(c->redis);
    c->redis = NULL;
    return CTL_EXIT_RUNTIME;
}

void ctl_close(struct ctl *c)
{
    if (c->redis)
        redisFree(c->redis);
    c->redis = NULL;
    config_free(&c->cfg);
}

redisReply *ctl_redis_cmdv(struct ctl *c, size_t argc, const char **argv)
{
    size_t *lens = xmalloc((argc ? argc : 1) * sizeof(*lens));
    redisReply *r;

    for (size_t i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    r = redisCommandArgv(c->redis, (int)argc, argv, lens);
    free(lens);
    if (r == NULL)
        ctl_redis_failed(c);
    return r;
}

/* Collects the arguments of the varargs forms. Returns their number. */
static size_t ctl_collect(const char **argv, const char *arg0, va_list ap)
{
    size_t argc = 0;
    const char *a = arg0;

    while (a != NULL) {
        if (argc == CTL_MAX_ARGS) {
            /* A programming error: commands here are short. */
            abort();
        }
        argv[argc++] = a;
        a = va_arg(ap, const char *);
    }
    return argc;
}

redisReply *ctl_redis_cmd(struct ctl *c, const char *arg0, ...)
{
    const char *argv[CTL_MAX_ARGS];
    size_t argc;
    va_list ap;

    va_start(ap, arg0);
    argc = ctl_collect(argv, arg0, ap);
    va_end(ap);
    return ctl_redis_cmdv(c, argc, argv);
}

redisReply *ctl_redis_ok(struct ctl *c, const char *arg0, ...)
{
    const char *argv[CTL_MAX_ARGS];
    redisReply *r;
    size_t argc;
    va_list ap;

    va_start(ap, arg0);
    argc = ctl_collect(argv, arg0, ap);
    va_end(ap);
    r = ctl_redis_cmdv(c, argc, argv);
    if (r != NULL && r->type == REDIS_REPLY_ERROR) {
        ctl_error("Redis at %s: %s: %s", c->where, argv[0], r->str);
        freeReplyObject(r);
        r = NULL;
    }
    return r;
}

char *ctl_key(const struct ctl *c, const char *name)
{
    struct buf b = BUF_INIT;

    buf_appends(&b, c->cfg.queue.prefix);
    buf_appends(&b, name);
    return buf_steal(&b, NULL);
}

char *ctl_keyf(const struct ctl *c, const char *fmt, ...)
{
    struct buf b = BUF_INIT;
    va_list ap;

    buf_appends(&b, c->cfg.queue.prefix);
    va_start(ap, fmt);
    buf_vappendf(&b, fmt, ap);
    va_end(ap);
    return buf_steal(&b, NULL);
}

/* A copy of s with bytes outside printable ASCII replaced by '?'. */
static char *ctl_ascii(const char *s)
{
    char *d = xstrdup(s);

    for (char *p = d; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e)
            *p = '?';
    return d;
}

json_t *ctl_json_string(const char *s)
{
    json_t *j = json_string(s);
    char *a;

    if (j != NULL)
        return j;
    a = ctl_ascii(s);
    j = json_string(a);
    free(a);
    return j;
}

void ctl_json_set(json_t *o, const char *key, json_t *v)
{
    /* json_string() is the public UTF-8 check; json_object_set_new()
     * would drop v for a key that fails it. */
    json_t *probe = json_string(key);
    char *a;

    if (probe != NULL) {
        json_decref(probe);
        json_object_set_new(o, key, v);
        return;
    }
    a = ctl_ascii(key);
    json_object_set_new(o, a, v);
    free(a);
}

/* Parses all of s as a decimal integer. */
static int ctl_parse_ll(const char *s, long long *out)
{
    char *end;
    long long v;

    if (s == NULL || *s == '\0')
        return -1;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

int ctl_reply_int(const redisReply *r, long long *out)
{
    if (r == NULL)
        return -1;
    if (r->type == REDIS_REPLY_INTEGER) {
        *out = r->integer;
        return 0;
    }
    if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS)
        return ctl_parse_ll(r->str, out);
    return -1;
}

/* Splits "<ms>-<seq>" into its two unsigned numbers. */
static int ctl_stream_id_parse(const char *id, uint64_t *ms, uint64_t *seq)
{
    const char *dash = strchr(id, '-');
    char *end;

    if (dash == NULL || dash == id || id[0] < '0' || id[0] > '9' || dash[1] < '0' ||
        dash[1] > '9')
        return -1;
    errno = 0;
    *ms = strtoull(id, &end, 10);
    if (errno != 0 || end != dash)
        return -1;
    *seq = strtoull(dash + 1, &end, 10);
    if (errno != 0 || *end != '\0')
        return -1;
    return 0;
}

int ctl_stream_id_ms(const char *id, int64_t *ms)
{
    uint64_t m, s;

    if (ctl_stream_id_parse(id, &m, &s) < 0 || m > INT64_MAX)
        return -1;
    *ms = (int64_t)m;
    return 0;
}

int ctl_stream_id_next(const char *id, char *out, size_t n)
{
    uint64_t ms, seq;

    if (ctl_stream_id_parse(id, &ms, &seq) < 0)
        return -1;
    if (seq == UINT64_MAX) {
        if (ms == UINT64_MAX)
            return -1;
        ms++;
        seq = 0;
    } else {
        seq++;
    }
    snprintf(out, n, "%" PRIu64 "-%" PRIu64, ms, seq);
    return 0;
}

const redisReply *ctl_reply_field(const redisReply *r, const char *name)
{
    if (r == NULL || r->type != REDIS_REPLY_ARRAY)
        return NULL;
    for (size_t i = 0; i + 1 < r->elements; i += 2)
        if ((r->element[i]->type == REDIS_REPLY_STRING ||
             r->element[i]->type == REDIS_REPLY_STATUS) &&
            strcmp(r->element[i]->str, name) == 0)
            return r->element[i + 1];
    return NULL;
}

int ctl_redis_time(struct ctl *c, int64_t *now_ms)
{
    redisReply *r = ctl_redis_ok(c, "TIME", NULL);
    long long sec, usec;
    int rc = 0;

    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
        ctl_reply_int(r->element[0], &sec) < 0 || ctl_reply_int(r->element[1], &usec) < 0) {
        ctl_error("Redis at %s: TIME: unexpected reply", c->where);
        rc = CTL_EXIT_RUNTIME;
    } else {
        *now_ms = (int64_t)sec * 1000 + usec / 1000;
    }
    freeReplyObject(r);
    return rc;
}

int ctl_redis_append(struct ctl *c, size_t argc, const char **argv)
{
    size_t *lens = xmalloc((argc ? argc : 1) * sizeof(*lens));
    int rc;

    for (size_t i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    rc = redisAppendCommandArgv(c->redis, (int)argc, argv, lens);
    free(lens);
    if (rc != REDIS_OK) {
        ctl_redis_failed(c);
        return -1;
    }
    return 0;
}

redisReply *ctl_redis_reply(struct ctl *c)
{
    void *r = NULL;

    if (redisGetReply(c->redis, &r) != REDIS_OK || r == NULL) {
        ctl_redis_failed(c);
        return NULL;
    }
    return r;
}

/* ---- transactions ---------------------------------------------------------- */

int ctl_multi_begin(struct ctl *c)
{
    redisReply *r = ctl_redis_ok(c, "MULTI", NULL);

    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    freeReplyObject(r);
    return 0;
}

int ctl_multi_queue(struct ctl *c, redisReply *r)
{
    int rc = 0;

    if (r == NULL)
        return -1;
    if (r->type == REDIS_REPLY_ERROR) {
        ctl_error("Redis at %s: %s", c->where, r->str);
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

void ctl_unwatch(struct ctl *c)
{
    redisReply *r = ctl_redis_cmd(c, "UNWATCH", NULL);

    if (r)
        freeReplyObject(r);
}

int ctl_multi_end(struct ctl *c, int queued, redisReply **exec)
{
    redisReply *r;

    if (exec != NULL)
        *exec = NULL;
    if (queued != 0) {
        r = ctl_redis_cmd(c, "DISCARD", NULL);
        if (r)
            freeReplyObject(r);
        return CTL_EXIT_RUNTIME;
    }
    r = ctl_redis_cmd(c, "EXEC", NULL);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_NIL) {
        /* A watched key changed: nothing was executed. */
        freeReplyObject(r);
        return -1;
    }
    if (r->type != REDIS_REPLY_ARRAY) {
        ctl_error("Redis at %s: EXEC: %s", c->where,
                  r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        freeReplyObject(r);
        return CTL_EXIT_RUNTIME;
    }
    for (size_t i = 0; i < r->elements; i++) {
        if (r->element[i]->type == REDIS_REPLY_ERROR) {
            ctl_error("Redis at %s: %s", c->where, r->element[i]->str);
            freeReplyObject(r);
            return CTL_EXIT_RUNTIME;
        }
    }
    if (exec != NULL)
        *exec = r;
    else
        freeReplyObject(r);
    return CTL_EXIT_OK;
}

/* ---- parsing and formatting -------------------------------------------------- */

int ctl_parse_ms(const char *s, int64_t *out)
{
    char *end;
    double d;

    if (s == NULL || *s == '\0')
        return -1;
    errno = 0;
    d = strtod(s, &end);
    if (errno != 0 || *end != '\0' || d != d || d < -9.2e18 || d > 9.2e18)
        return -1;
    *out = (int64_t)d;
    return 0;
}

int ctl_parse_count(const char *s, long long min, long long max, long long *out)
{
    long long v;

    if (s == NULL || *s < '0' || *s > '9' || ctl_parse_ll(s, &v) < 0 || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int ctl_parse_duration(const char *s, int64_t *ms)
{
    /* Ten years: long enough for any queue, short enough not to overflow. */
    static const long long max_s = 10LL * 366 * 86400;
    long long v, unit = 1;
    size_t len;
    char num[32];

    if (s == NULL)
        return -1;
    len = strlen(s);
    if (len == 0 || len >= sizeof(num))
        return -1;
    memcpy(num, s, len + 1);
    switch (num[len - 1]) {
    case 's':
        unit = 1;
        break;
    case 'm':
        unit = 60;
        break;
    case 'h':
        unit = 3600;
        break;
    case 'd':
        unit = 86400;
        break;
    case 'w':
        unit = 7 * 86400;
        break;
    default:
        if (num[len - 1] < '0' || num[len - 1] > '9')
            return -1;
        len++;
        break;
    }
    num[len - 1] = '\0';
    if (ctl_parse_count(num, 0, max_s, &v) < 0 || v > max_s / unit)
        return -1;
    *ms = (int64_t)(v * unit) * 1000;
    return 0;
}

void ctl_fmt_duration(int64_t ms, char *out, size_t n)
{
    int64_t s = ms < 0 ? 0 : ms / 1000;

    if (s < 60)
        snprintf(out, n, "%" PRId64 "s", s);
    else if (s < 3600)
        snprintf(out, n, "%" PRId64 "m%02" PRId64 "s", s / 60, s % 60);
    else if (s < 86400)
        snprintf(out, n, "%" PRId64 "h%02" PRId64 "m", s / 3600, (s % 3600) / 60);
    else
        snprintf(out, n, "%" PRId64 "d%02" PRId64 "h", s / 86400, (s % 86400) / 3600);
}

void ctl_fmt_time(int64_t ms, char *out, size_t n)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;

    if (ms < 0 || gmtime_r(&t, &tm) == NULL || strftime(out, n, "%Y-%m-%d %H:%M:%S", &tm) == 0)
        snprintf(out, n, "-");
}

void ctl_json_print(json_t *o)
{
    /* 15 significant digits: 0.05 rather than 0.050000000000000003. */
    char *s = json_dumps(o, JSON_PRESERVE_ORDER | JSON_INDENT(2) | JSON_REAL_PRECISION(15));

    if (s != NULL) {
        printf("%s\n", s);
        free(s);
    }
    json_decref(o);
}

/* ---- a set of strings ------------------------------------------------------- */

/* FNV-1a: ids are short and not chosen by an adversary who could make the
 * tool slow other than by filling the queue. */
static size_t ctl_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;

    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return (size_t)h;
}

static void ctl_set_grow(struct ctl_set *s)
{
    struct ctl_set n;

    n.cap = s->cap ? s->cap * 2 : 64;
    n.v = xcalloc(n.cap, sizeof(char *));
    n.n = 0;
    for (size_t i = 0; i < s->cap; i++) {
        size_t j;
        if (s->v[i] == NULL)
            continue;
        for (j = ctl_hash(s->v[i]) & (n.cap - 1); n.v[j] != NULL; j = (j + 1) & (n.cap - 1))
            ;
        n.v[j] = s->v[i];
        n.n++;
    }
    free(s->v);
    *s = n;
}

int ctl_set_add(struct ctl_set *s, const char *str)
{
    size_t j;

    /* Kept at most half full, so that probes stay short. */
    if ((s->n + 1) * 2 > s->cap)
        ctl_set_grow(s);
    for (j = ctl_hash(str) & (s->cap - 1); s->v[j] != NULL; j = (j + 1) & (s->cap - 1))
        if (strcmp(s->v[j], str) == 0)
            return 0;
    s->v[j] = xstrdup(str);
    s->n++;
    return 1;
}

void ctl_set_free(struct ctl_set *s)
{
    for (size_t i = 0; i < s->cap; i++)
        free(s->v[i]);
    free(s->v);
    memset(s, 0, sizeof(*s));
}
