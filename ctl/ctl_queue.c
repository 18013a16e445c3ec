#include "ctl/ctl_queue.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/schema.h"
#include "lib/xmalloc.h"
#include "router/policy.h"

#define MS_HOUR ((int64_t)3600000)

/* Entries read per XRANGE when the group's lag has to be counted. */
#define CTL_COUNT_PAGE "1000"

/* Outcomes of one route over the hours shown (hash stats:<route>:<hour>). */
struct ctl_route_stats {
    char name[POLICY_ROUTE_NAME_MAX + 8];
    long long delivered, deferred, bounced, held;
};

struct ctl_queue_info {
    int64_t now_ms;                 /* Redis' clock (TIME) */
    bool have_group;                /* the consumer group "routers" exists */
    long long ready;                /* not yet read by a router */
    long long in_flight;            /* read, not acknowledged */
    long long consumers;
    char last_delivered[64];        /* the group's last-delivered-id */
    long long retry;
    bool have_next_due;
    int64_t next_due_ms;
    long long dead;
    bool have_oldest;
    int64_t oldest_ms;              /* created, ms since the epoch */
    char oldest_id[128];            /* queue id of that message */
    const char *oldest_where;       /* "ready", "in flight" or "retry" */
    struct ctl_route_stats *routes; /* configured routes, then "hold" */
    size_t nroutes;
    int64_t hour;                   /* current UTC hour, hours since the epoch */
};

/* An integer-valued command (XLEN, ZCARD, ...). Returns 0 or CTL_EXIT_RUNTIME. */
static int ctl_int_cmd(struct ctl *c, const char *cmd, const char *key, long long *out)
{
    redisReply *r = ctl_redis_ok(c, cmd, key, NULL);
    int rc = 0;

    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (ctl_reply_int(r, out) < 0) {
        ctl_error("Redis at %s: %s %s: unexpected reply", c->where, cmd, key);
        rc = CTL_EXIT_RUNTIME;
    }
    freeReplyObject(r);
    return rc;
}

/*
 * Counts the entries after the group's last-delivered-id page by page:
 * the fallback for servers whose XINFO GROUPS has no lag (before Redis
 * 7.0) or cannot compute it (after deletions in the middle of the stream).
 */
static int ctl_count_after(struct ctl *c, const char *stream, const char *last, long long *out)
{
    char start[64];
    long long n = 0;

    if (ctl_stream_id_next(last, start, sizeof(start)) < 0) {
        ctl_error("Redis at %s: %s: bad last-delivered-id \"%s\"", c->where, stream, last);
        return CTL_EXIT_RUNTIME;
    }
    for (;;) {
        redisReply *r = ctl_redis_ok(c, "XRANGE", stream, start, "+", "COUNT", CTL_COUNT_PAGE,
                                     NULL);
        const redisReply *tail;
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
            freeReplyObject(r);
            break;
        }
        n += (long long)r->elements;
        tail = r->element[r->elements - 1];
        if (tail->type != REDIS_REPLY_ARRAY || tail->elements < 1 ||
            tail->element[0]->type != REDIS_REPLY_STRING ||
            ctl_stream_id_next(tail->element[0]->str, start, sizeof(start)) < 0) {
            freeReplyObject(r);
            break;
        }
        freeReplyObject(r);
    }
    *out = n;
    return 0;
}

/* Ready and in-flight counts from the consumer group of the ready stream. */
static int ctl_read_group(struct ctl *c, const char *ready, struct ctl_queue_info *q)
{
    redisReply *r = ctl_redis_cmd(c, "XINFO", "GROUPS", ready, NULL);
    const redisReply *g = NULL, *v;
    int rc = 0;

    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_ERROR) {
        if (strstr(r->str, "no such key") != NULL) {
            /* No stream yet: nothing was ever queued. */
            freeReplyObject(r);
            return 0;
        }
        ctl_error("Redis at %s: XINFO GROUPS %s: %s", c->where, ready, r->str);
        freeReplyObject(r);
        return CTL_EXIT_RUNTIME;
    }
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        v = ctl_reply_field(r->element[i], "name");
        if (v != NULL && v->type == REDIS_REPLY_STRING && strcmp(v->str, SCHEMA_GROUP) == 0)
            g = r->element[i];
    }
    if (g == NULL) {
        /* The stream exists but no router created the group yet: every
         * entry waits. */
        freeReplyObject(r);
        return ctl_int_cmd(c, "XLEN", ready, &q->ready);
    }
    q->have_group = true;
    v = ctl_reply_field(g, "last-delivered-id");
    if (v != NULL && v->type == REDIS_REPLY_STRING)
        snprintf(q->last_delivered, sizeof(q->last_delivered), "%s", v->str);
    else
        snprintf(q->last_delivered, sizeof(q->last_delivered), "0-0");
    if (ctl_reply_int(ctl_reply_field(g, "pending"), &q->in_flight) < 0)
        q->in_flight = 0;
    if (ctl_reply_int(ctl_reply_field(g, "consumers"), &q->consumers) < 0)
        q->consumers = 0;
    if (ctl_reply_int(ctl_reply_field(g, "lag"), &q->ready) < 0)
        rc = ctl_count_after(c, ready, q->last_delivered, &q->ready);
    freeReplyObject(r);
    return rc;
}

/*
 * Reads the message id of stream entry id (field "id", lib/schema.h) into
 * out. Returns 0, 1 when the entry is gone, or CTL_EXIT_RUNTIME.
 */
static int ctl_entry_msg(struct ctl *c, const char *stream, const char *id, char *out, size_t n)
{
    redisReply *r = ctl_redis_ok(c, "XRANGE", stream, id, id, NULL);
    const redisReply *e, *f;
    int rc = 1;

    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 1) {
        e = r->element[0];
        if (e->type == REDIS_REPLY_ARRAY && e->elements == 2) {
            f = ctl_reply_field(e->element[1], SCHEMA_F_ID);
            if (f != NULL && f->type == REDIS_REPLY_STRING) {
                snprintf(out, n, "%s", f->str);
                rc = 0;
            }
        }
    }
    freeReplyObject(r);
    return rc;
}

/*
 * Considers message msg_id as the oldest: its created field, or
 * fallback_ms when the hash or the field is missing (fallback_ms < 0: not
 * considered then). Returns 0 or CTL_EXIT_RUNTIME.
 */
static int ctl_consider(struct ctl *c, struct ctl_queue_info *q, const char *msg_id,
                        int64_t fallback_ms, const char *where)
{
    char *key;
    redisReply *r;
    long long created;
    int64_t t = fallback_ms;

    if (msg_id != NULL && msg_id[0] != '\0') {
        key = ctl_keyf(c, SCHEMA_MSG "%s", msg_id);
        r = ctl_redis_ok(c, "HGET", key, SCHEMA_F_CREATED, NULL);
        free(key);
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        if (ctl_reply_int(r, &created) == 0 && created > 0)
            t = (int64_t)created;
        freeReplyObject(r);
    }
    if (t < 0)
        return 0;
    if (!q->have_oldest || t < q->oldest_ms) {
        q->have_oldest = true;
        q->oldest_ms = t;
        snprintf(q->oldest_id, sizeof(q->oldest_id), "%s", msg_id ? msg_id : "");
        q->oldest_where = where;
    }
    return 0;
}

/* The first entry no router has read. */
static int ctl_oldest_unread(struct ctl *c, const char *ready, struct ctl_queue_info *q)
{
    char start[64], msg[128] = "";
    const redisReply *e, *f;
    redisReply *r;
    int64_t ms = -1;
    int rc;

    if (q->ready <= 0)
        return 0;
    if (!q->have_group)
        snprintf(start, sizeof(start), "-");
    else if (ctl_stream_id_next(q->last_delivered, start, sizeof(start)) < 0)
        return 0;
    r = ctl_redis_ok(c, "XRANGE", ready, start, "+", "COUNT", "1", NULL);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 1) {
        e = r->element[0];
        if (e->type == REDIS_REPLY_ARRAY && e->elements == 2 &&
            e->element[0]->type == REDIS_REPLY_STRING) {
            if (ctl_stream_id_ms(e->element[0]->str, &ms) < 0)
                ms = -1;
            f = ctl_reply_field(e->element[1], SCHEMA_F_ID);
            if (f != NULL && f->type == REDIS_REPLY_STRING)
                snprintf(msg, sizeof(msg), "%s", f->str);
        }
    }
    freeReplyObject(r);
    rc = ctl_consider(c, q, msg, ms, "ready");
    return rc;
}

/* The oldest entry read by a router and not acknowledged. */
static int ctl_oldest_pending(struct ctl *c, const char *ready, struct ctl_queue_info *q)
{
    char id[64] = "", msg[128] = "";
    redisReply *r;
    int64_t ms = -1;
    int rc;

    if (!q->have_group || q->in_flight <= 0)
        return 0;
    r = ctl_redis_ok(c, "XPENDING", ready, SCHEMA_GROUP, NULL);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 2 &&
        r->element[1]->type == REDIS_REPLY_STRING)
        snprintf(id, sizeof(id), "%s", r->element[1]->str);
    freeReplyObject(r);
    if (id[0] == '\0')
        return 0;
    if (ctl_stream_id_ms(id, &ms) < 0)
        ms = -1;
    rc = ctl_entry_msg(c, ready, id, msg, sizeof(msg));
    if (rc == CTL_EXIT_RUNTIME)
        return rc;
    return ctl_consider(c, q, msg, ms, "in flight");
}

/* The retry member due first: its due time, and its message's age. */
static int ctl_read_retry(struct ctl *c, const char *retry, struct ctl_queue_info *q)
{
    char msg[128] = "";
    redisReply *r;
    int rc;

    rc = ctl_int_cmd(c, "ZCARD", retry, &q->retry);
    if (rc != 0 || q->retry <= 0)
        return rc;
    r = ctl_redis_ok(c, "ZRANGE", retry, "0", "0", "WITHSCORES", NULL);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_STRING && r->element[1]->type == REDIS_REPLY_STRING) {
        snprintf(msg, sizeof(msg), "%s", r->element[0]->str);
        if (ctl_parse_ms(r->element[1]->str, &q->next_due_ms) == 0)
            q->have_next_due = true;
    }
    freeReplyObject(r);
    if (msg[0] == '\0')
        return 0;
    return ctl_consider(c, q, msg, -1, "retry");
}

/* Adds the value of one HMGET element to *sum. */
static void ctl_add(const redisReply *r, long long *sum)
{
    long long v;

    if (ctl_reply_int(r, &v) == 0 && v > 0)
        *sum += v;
}

/* The routes of the configuration file, in file order, then "hold". */
static void ctl_route_names(const struct ctl *c, struct ctl_queue_info *q)
{
    q->routes = xcalloc(c->cfg.nnamed + 1, sizeof(*q->routes));
    for (size_t i = 0; i < c->cfg.nnamed; i++) {
        const struct config_named *e = &c->cfg.named[i];
        char name[sizeof(q->routes[0].name)];
        bool seen = false;
        size_t j;

        if (strcmp(e->kind, "route") != 0 || e->name[0] == '\0')
            continue;
        /* Route names are case-insensitive and stored in lower case by the
         * policy; the router's stats keys use that form. */
        for (j = 0; e->name[j] != '\0' && j + 1 < sizeof(name); j++)
            name[j] = (e->name[j] >= 'A' && e->name[j] <= 'Z') ? (char)(e->name[j] + 32)
                                                                : e->name[j];
        name[j] = '\0';
        for (j = 0; j < q->nroutes; j++)
            if (strcmp(q->routes[j].name, name) == 0)
                seen = true;
        if (!seen)
            snprintf(q->routes[q->nroutes++].name, sizeof(q->routes[0].name), "%s", name);
    }
    snprintf(q->routes[q->nroutes++].name, sizeof(q->routes[0].name), "hold");
}

/* Sums the stats hashes of the current and the previous UTC hour. */
static int ctl_read_stats(struct ctl *c, struct ctl_queue_info *q)
{
    q->hour = q->now_ms / MS_HOUR;
    ctl_route_names(c, q);
    for (size_t i = 0; i < q->nroutes; i++) {
        struct ctl_route_stats *s = &q->routes[i];
        for (int64_t h = q->hour - 1; h <= q->hour; h++) {
            char *key = ctl_keyf(c, SCHEMA_STATS "%s:%" PRId64, s->name, h);
            redisReply *r;

            r = ctl_redis_ok(c, "HMGET", key, "delivered", "deferred", "bounced", "held", NULL);
            free(key);
            if (r == NULL)
                return CTL_EXIT_RUNTIME;
            if (r->type == REDIS_REPLY_ARRAY && r->elements == 4) {
                ctl_add(r->element[0], &s->delivered);
                ctl_add(r->element[1], &s->deferred);
                ctl_add(r->element[2], &s->bounced);
                ctl_add(r->element[3], &s->held);
            }
            freeReplyObject(r);
        }
    }
    return 0;
}

/* ---- output ---------------------------------------------------------------- */

/* The share of all deliveries in tenths of a percent, rounded; -1 when
 * nothing was delivered. */
static long long ctl_share(long long part, long long total)
{
    if (total <= 0)
        return -1;
    return (part * 1000 + total / 2) / total;
}

static long long ctl_total_delivered(const struct ctl_queue_info *q)
{
    long long t = 0;

    for (size_t i = 0; i < q->nroutes; i++)
        t += q->routes[i].delivered;
    return t;
}

static void ctl_queue_text(const struct ctl_queue_info *q)
{
    long long total = ctl_total_delivered(q);
    struct ctl_route_stats sum = {.name = "total"};
    char d[32];
    int nw = 5;

    printf("%-10s %8lld  %s\n", "ready", q->ready,
           q->have_group ? "not yet read by a router" : "no router has joined the queue yet");
    if (q->have_group)
        printf("%-10s %8lld  read by a router, not yet finished (%lld consumer%s)\n",
               "in flight", q->in_flight, q->consumers, q->consumers == 1 ? "" : "s");
    else
        printf("%-10s %8lld\n", "in flight", q->in_flight);
    if (q->have_next_due) {
        int64_t in = q->next_due_ms - q->now_ms;
        if (in <= 0) {
            ctl_fmt_duration(-in, d, sizeof(d));
            printf("%-10s %8lld  next due now (overdue by %s)\n", "retry", q->retry, d);
        } else {
            ctl_fmt_duration(in, d, sizeof(d));
            printf("%-10s %8lld  next due in %s\n", "retry", q->retry, d);
        }
    } else {
        printf("%-10s %8lld\n", "retry", q->retry);
    }
    printf("%-10s %8lld\n", "dead", q->dead);
    if (q->have_oldest) {
        ctl_fmt_duration(q->now_ms - q->oldest_ms, d, sizeof(d));
        printf("%-10s %8s  message %s (%s; approximate)\n", "oldest", d,
               q->oldest_id[0] ? q->oldest_id : "?", q->oldest_where);
    } else {
        printf("%-10s %8s\n", "oldest", "-");
    }

    for (size_t i = 0; i < q->nroutes; i++) {
        int l = (int)strlen(q->routes[i].name);
        if (l > nw)
            nw = l;
        sum.delivered += q->routes[i].delivered;
        sum.deferred += q->routes[i].deferred;
        sum.bounced += q->routes[i].bounced;
        sum.held += q->routes[i].held;
    }
    printf("\nrecipients since %02d:00 UTC (this hour and the previous one)\n",
           (int)(((q->hour - 1) % 24 + 24) % 24));
    printf("%-*s  %9s  %6s  %8s  %7s  %6s\n", nw, "ROUTE", "DELIVERED", "SHARE", "DEFERRED",
           "BOUNCED", "HELD");
    for (size_t i = 0; i <= q->nroutes; i++) {
        const struct ctl_route_stats *s = i < q->nroutes ? &q->routes[i] : &sum;
        /* The last route is "hold", which delivers nothing. */
        long long sh = i + 1 == q->nroutes ? -1 : ctl_share(s->delivered, total);
        char share[32];
        if (sh < 0)
            snprintf(share, sizeof(share), "-");
        else
            snprintf(share, sizeof(share), "%lld.%lld%%", sh / 10, sh % 10);
        printf("%-*s  %9lld  %6s  %8lld  %7lld  %6lld\n", nw, s->name, s->delivered, share,
               s->deferred, s->bounced, s->held);
    }
}

static void ctl_queue_json(const struct ctl_queue_info *q)
{
    long long total = ctl_total_delivered(q);
    json_t *o = json_object(), *routes = json_object();
    char *s;

    json_object_set_new(o, "now_ms", json_integer(q->now_ms));
    json_object_set_new(o, "ready", json_integer(q->ready));
    json_object_set_new(o, "in_flight", json_integer(q->in_flight));
    json_object_set_new(o, "consumers", json_integer(q->have_group ? q->consumers : 0));
    json_object_set_new(o, "retry", json_integer(q->retry));
    json_object_set_new(o, "retry_next_due_ms",
                        q->have_next_due ? json_integer(q->next_due_ms) : json_null());
    json_object_set_new(o, "dead", json_integer(q->dead));
    json_object_set_new(o, "oldest_created_ms",
                        q->have_oldest ? json_integer(q->oldest_ms) : json_null());
    json_object_set_new(o, "oldest_age_ms",
                        q->have_oldest ? json_integer(q->now_ms - q->oldest_ms) : json_null());
    json_object_set_new(o, "oldest_id",
                        q->have_oldest && q->oldest_id[0] ? ctl_json_string(q->oldest_id)
                                                          : json_null());
    json_object_set_new(o, "oldest_in", q->have_oldest ? json_string(q->oldest_where)
                                                       : json_null());
    json_object_set_new(o, "stats_since_ms", json_integer((q->hour - 1) * MS_HOUR));
    for (size_t i = 0; i < q->nroutes; i++) {
        const struct ctl_route_stats *st = &q->routes[i];
        long long sh = i + 1 == q->nroutes ? -1 : ctl_share(st->delivered, total);
        json_t *e = json_object();
        json_object_set_new(e, "delivered", json_integer(st->delivered));
        json_object_set_new(e, "deferred", json_integer(st->deferred));
        json_object_set_new(e, "bounced", json_integer(st->bounced));
        json_object_set_new(e, "held", json_integer(st->held));
        json_object_set_new(e, "share", sh < 0 ? json_null() : json_real((double)sh / 10.0));
        ctl_json_set(routes, st->name, e);
    }
    json_object_set_new(o, "routes", routes);
    s = json_dumps(o, JSON_PRESERVE_ORDER | JSON_INDENT(2));
    printf("%s\n", s);
    free(s);
    json_decref(o);
}

int ctl_queue(struct ctl *c)
{
    struct ctl_queue_info q;
    char *ready, *retry, *dead;
    int rc;

    memset(&q, 0, sizeof(q));
    rc = ctl_redis_connect(c);
    if (rc != 0)
        return rc;
    ready = ctl_key(c, SCHEMA_READY);
    retry = ctl_key(c, SCHEMA_RETRY);
    dead = ctl_key(c, SCHEMA_DEAD);

    rc = ctl_redis_time(c, &q.now_ms);
    if (rc == 0)
        rc = ctl_read_group(c, ready, &q);
    if (rc == 0)
        rc = ctl_oldest_unread(c, ready, &q);
    if (rc == 0)
        rc = ctl_oldest_pending(c, ready, &q);
    if (rc == 0)
        rc = ctl_read_retry(c, retry, &q);
    if (rc == 0)
        rc = ctl_int_cmd(c, "XLEN", dead, &q.dead);
    if (rc == 0)
        rc = ctl_read_stats(c, &q);
    if (rc == 0) {
        if (c->json)
            ctl_queue_json(&q);
        else
            ctl_queue_text(&q);
    }
    free(q.routes);
    free(ready);
    free(retry);
    free(dead);
    return rc;
}
