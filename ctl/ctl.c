#include "ctl/ctl.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

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
