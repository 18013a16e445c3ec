#include "ctl/ctl_msg.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"

/* Messages per pipelined round trip. */
#define CTL_MSG_BATCH 100

/* The fields read by the first HMGET, in this order. */
enum {
    F_FROM, F_RCPTS, F_SIZE, F_CREATED, F_CLIENT_IP, F_HELO, F_AUTH_USER, F_CLASS, F_GATEWAY,
    F_ATTEMPTS, F_NEXT, F__COUNT
};

static const char *const ctl_msg_fields[F__COUNT] = {
    [F_FROM] = SCHEMA_F_FROM,           [F_RCPTS] = SCHEMA_F_RCPTS,
    [F_SIZE] = SCHEMA_F_SIZE,           [F_CREATED] = SCHEMA_F_CREATED,
    [F_CLIENT_IP] = SCHEMA_F_CLIENT_IP, [F_HELO] = SCHEMA_F_HELO,
    [F_AUTH_USER] = SCHEMA_F_AUTH_USER, [F_CLASS] = SCHEMA_F_CLASS,
    [F_GATEWAY] = SCHEMA_F_GATEWAY,     [F_ATTEMPTS] = SCHEMA_F_ATTEMPTS,
    [F_NEXT] = SCHEMA_F_NEXT,
};

void ctl_msg_init(struct ctl_msg *m, const char *id)
{
    memset(m, 0, sizeof(*m));
    m->id = xstrdup(id);
}

static void ctl_rcpt_clear(struct ctl_rcpt *r)
{
    free(r->addr);
    free(r->raw);
    free(r->enh);
    free(r->text);
    free(r->route);
    free(r->remote);
}

void ctl_msg_clear(struct ctl_msg *m)
{
    free(m->id);
    free(m->from);
    free(m->client_ip);
    free(m->helo);
    free(m->auth_user);
    free(m->cls);
    free(m->gateway);
    for (size_t i = 0; i < m->nrcpts; i++)
        ctl_rcpt_clear(&m->rcpts[i]);
    free(m->rcpts);
    memset(m, 0, sizeof(*m));
}

/* A string reply as a new string ("" for NIL and other types). */
static char *ctl_str(const redisReply *r)
{
    if (r != NULL && r->type == REDIS_REPLY_STRING)
        return xstrndup(r->str, r->len);
    return xstrdup("");
}

static long long ctl_ll(const redisReply *r)
{
    long long v;

    return ctl_reply_int(r, &v) == 0 ? v : 0;
}

/* A string member of a JSON object as a new string ("" when absent). */
static char *ctl_json_str(const json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));

    return xstrdup(s ? s : "");
}

/* Fills r from its st:<i> field, as the router's store_parse_rcpt_state()
 * reads it. */
static void ctl_rcpt_parse(struct ctl_rcpt *r, const redisReply *v)
{
    json_error_t jerr;
    const char *s;
    json_t *o;

    snprintf(r->state, sizeof(r->state), "pending");
    if (v == NULL || v->type != REDIS_REPLY_STRING) {
        r->enh = xstrdup("");
        r->text = xstrdup("");
        r->route = xstrdup("");
        r->remote = xstrdup("");
        return;
    }
    r->raw = xstrndup(v->str, v->len);
    o = json_loadb(v->str, v->len, 0, &jerr);
    if (o == NULL || !json_is_object(o)) {
        snprintf(r->state, sizeof(r->state), "?");
        json_decref(o);
        r->enh = xstrdup("");
        r->text = xstrdup("");
        r->route = xstrdup("");
        r->remote = xstrdup("");
        return;
    }
    s = json_string_value(json_object_get(o, "s"));
    if (s != NULL && (strcmp(s, "pending") == 0 || strcmp(s, "deferred") == 0 ||
                      strcmp(s, "delivered") == 0 || strcmp(s, "failed") == 0))
        snprintf(r->state, sizeof(r->state), "%s", s);
    else
        snprintf(r->state, sizeof(r->state), "?");
    r->code = (long long)json_integer_value(json_object_get(o, "code"));
    r->enh = ctl_json_str(o, "enh");
    r->text = ctl_json_str(o, "text");
    r->route = ctl_json_str(o, "route");
    r->remote = ctl_json_str(o, "remote");
    r->t = (int64_t)json_integer_value(json_object_get(o, "t"));
    r->attempts = (long long)json_integer_value(json_object_get(o, "n"));
    r->bounced = json_is_true(json_object_get(o, "b"));
    json_decref(o);
}

/* Fills m from the reply of the first HMGET. */
static void ctl_msg_fill(struct ctl_msg *m, const redisReply *r)
{
    const redisReply *rc;
    json_error_t jerr;
    json_t *a;

    if (r->type != REDIS_REPLY_ARRAY || r->elements != F__COUNT)
        return;
    rc = r->element[F_RCPTS];
    m->found = rc->type == REDIS_REPLY_STRING;
    m->from = ctl_str(r->element[F_FROM]);
    m->client_ip = ctl_str(r->element[F_CLIENT_IP]);
    m->helo = ctl_str(r->element[F_HELO]);
    m->auth_user = ctl_str(r->element[F_AUTH_USER]);
    m->cls = ctl_str(r->element[F_CLASS]);
    m->gateway = ctl_str(r->element[F_GATEWAY]);
    m->size = ctl_ll(r->element[F_SIZE]);
    m->created = (int64_t)ctl_ll(r->element[F_CREATED]);
    m->attempts = ctl_ll(r->element[F_ATTEMPTS]);
    if (ctl_parse_ms(r->element[F_NEXT]->type == REDIS_REPLY_STRING ? r->element[F_NEXT]->str
                                                                    : NULL,
                     &m->next_attempt) < 0)
        m->next_attempt = 0;
    if (!m->found)
        return;
    a = json_loadb(rc->str, rc->len, 0, &jerr);
    if (a != NULL && json_is_array(a) && json_array_size(a) > 0) {
        m->nrcpts = json_array_size(a);
        m->rcpts = xcalloc(m->nrcpts, sizeof(*m->rcpts));
        for (size_t i = 0; i < m->nrcpts; i++) {
            const char *addr = json_string_value(json_array_get(a, i));
            m->rcpts[i].addr = xstrdup(addr ? addr : "");
        }
    }
    json_decref(a);
}

/* Queues the HMGET of m's state fields. */
static int ctl_msg_append_states(struct ctl *c, const struct ctl_msg *m)
{
    const char **argv = xcalloc(m->nrcpts + 2, sizeof(*argv));
    char **names = xcalloc(m->nrcpts, sizeof(*names));
    char *key = ctl_keyf(c, SCHEMA_MSG "%s", m->id);
    struct buf b = BUF_INIT;
    int rc;

    argv[0] = "HMGET";
    argv[1] = key;
    for (size_t i = 0; i < m->nrcpts; i++) {
        buf_appendf(&b, SCHEMA_F_RCPT_STATE "%zu", i);
        names[i] = buf_steal(&b, NULL);
        argv[2 + i] = names[i];
    }
    rc = ctl_redis_append(c, m->nrcpts + 2, argv);
    for (size_t i = 0; i < m->nrcpts; i++)
        free(names[i]);
    free(names);
    free(key);
    free(argv);
    return rc;
}

/* Loads one batch of at most CTL_MSG_BATCH messages: two pipelined
 * rounds. */
static int ctl_msg_load_batch(struct ctl *c, struct ctl_msg *v, size_t n)
{
    const char *argv[2 + F__COUNT];
    size_t sent = 0;
    int rc = 0;

    argv[0] = "HMGET";
    for (size_t f = 0; f < F__COUNT; f++)
        argv[2 + f] = ctl_msg_fields[f];
    for (size_t i = 0; i < n; i++) {
        char *key = ctl_keyf(c, SCHEMA_MSG "%s", v[i].id);
        argv[1] = key;
        rc = ctl_redis_append(c, 2 + F__COUNT, argv);
        free(key);
        if (rc != 0)
            return CTL_EXIT_RUNTIME;
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *r = ctl_redis_reply(c);
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        if (r->type == REDIS_REPLY_ERROR) {
            ctl_error("Redis at %s: HMGET %s%s%s: %s", c->where, c->cfg.queue.prefix, SCHEMA_MSG,
                      v[i].id, r->str);
            rc = CTL_EXIT_RUNTIME;
        } else {
            ctl_msg_fill(&v[i], r);
        }
        freeReplyObject(r);
    }
    if (rc != 0)
        return rc;

    for (size_t i = 0; i < n; i++) {
        if (v[i].nrcpts == 0)
            continue;
        if (ctl_msg_append_states(c, &v[i]) != 0)
            return CTL_EXIT_RUNTIME;
        sent++;
    }
    for (size_t i = 0; i < n && sent > 0; i++) {
        redisReply *r;
        if (v[i].nrcpts == 0)
            continue;
        sent--;
        r = ctl_redis_reply(c);
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        for (size_t k = 0; k < v[i].nrcpts; k++)
            ctl_rcpt_parse(&v[i].rcpts[k], r->type == REDIS_REPLY_ARRAY && k < r->elements
                                                ? r->element[k]
                                                : NULL);
        if (r->type == REDIS_REPLY_ERROR) {
            ctl_error("Redis at %s: HMGET %s%s%s: %s", c->where, c->cfg.queue.prefix, SCHEMA_MSG,
                      v[i].id, r->str);
            rc = CTL_EXIT_RUNTIME;
        }
        freeReplyObject(r);
    }
    return rc;
}

int ctl_msg_load(struct ctl *c, struct ctl_msg *v, size_t n)
{
    for (size_t at = 0; at < n; at += CTL_MSG_BATCH) {
        size_t k = n - at < CTL_MSG_BATCH ? n - at : CTL_MSG_BATCH;
        int rc = ctl_msg_load_batch(c, v + at, k);
        if (rc != 0)
            return rc;
    }
    return 0;
}

bool ctl_rcpt_open(const struct ctl_rcpt *r)
{
    return strcmp(r->state, "delivered") != 0 && strcmp(r->state, "failed") != 0;
}

size_t ctl_msg_count(const struct ctl_msg *m, const char *state)
{
    size_t n = 0;

    for (size_t i = 0; i < m->nrcpts; i++)
        n += strcmp(m->rcpts[i].state, state) == 0;
    return n;
}

size_t ctl_msg_open(const struct ctl_msg *m)
{
    size_t n = 0;

    for (size_t i = 0; i < m->nrcpts; i++)
        n += ctl_rcpt_open(&m->rcpts[i]);
    return n;
}

const char *ctl_msg_last_route(const struct ctl_msg *m)
{
    const struct ctl_rcpt *last = NULL;

    for (size_t i = 0; i < m->nrcpts; i++)
        if (m->rcpts[i].route[0] != '\0' && (last == NULL || m->rcpts[i].t > last->t))
            last = &m->rcpts[i];
    return last ? last->route : "";
}

const char *ctl_sender(const char *from)
{
    return from == NULL || from[0] == '\0' ? "<>" : from;
}
