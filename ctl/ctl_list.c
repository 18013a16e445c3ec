#include "ctl/ctl_list.h"

#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ctl/ctl_msg.h"
#include "lib/buf.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"

/* Entries and members read per command while walking the queue. */
#define CTL_WALK_PAGE 100
#define CTL_WALK_PAGE_S "100"

/* Events are written by the router after the message was created; its
 * clock may be a little behind Redis', so the history search starts this
 * much before the message's created time. */
#define CTL_CLOCK_SKEW_MS 60000

/* The FROM column is cut to this many characters (JSON has it whole). */
#define CTL_FROM_COL_MAX 40

enum ctl_where { CTL_IN_FLIGHT = 0, CTL_READY, CTL_RETRY };

static const char *const ctl_where_names[] = {
    [CTL_IN_FLIGHT] = "in_flight", [CTL_READY] = "ready", [CTL_RETRY] = "retry"};

/* Where a message id was found while walking the queue. */
struct ctl_qentry {
    char *msg_id;             /* "" when the stream entry has none (deleted) */
    enum ctl_where where;
    char stream_id[64];       /* in flight, ready */
    int64_t due_ms;           /* retry */
    char consumer[128];       /* in flight: the router that read it */
    long long idle_ms;        /* in flight: since it was last read or touched */
    long long deliveries;     /* in flight: times it was read */
};

enum ctl_phase { PH_PENDING = 0, PH_UNREAD, PH_RETRY, PH_DONE };

/* A walk over the queue: pending entries of the group, then unread
 * entries, then retry members. Not atomic: an entry a router reads or
 * acknowledges during the walk may be seen twice or not at all. */
struct ctl_walk {
    char *ready, *retry;
    enum ctl_phase phase;
    char cursor[80];          /* pending: next start ("-" or "(<id>") */
    char unread[80];          /* unread: next start */
    long long offset;         /* retry: next rank */
    long long scanned;        /* entries and members examined */
    bool no_retry;            /* end the walk before the retry members */
};

static void ctl_qentries_free(struct ctl_qentry *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(v[i].msg_id);
    free(v);
}

/* Sets up a walk: finds the group's last-delivered-id. Returns 0 or
 * CTL_EXIT_RUNTIME. */
static int ctl_walk_init(struct ctl *c, struct ctl_walk *w)
{
    redisReply *r;
    const redisReply *g = NULL, *v;

    memset(w, 0, sizeof(*w));
    w->ready = ctl_key(c, SCHEMA_READY);
    w->retry = ctl_key(c, SCHEMA_RETRY);
    snprintf(w->cursor, sizeof(w->cursor), "-");
    r = ctl_redis_cmd(c, "XINFO", "GROUPS", w->ready, NULL);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_ERROR) {
        int rc = 0;
        if (strstr(r->str, "no such key") != NULL) {
            /* No stream: nothing was ever queued through it. */
            w->phase = PH_RETRY;
        } else {
            ctl_error("Redis at %s: XINFO GROUPS %s: %s", c->where, w->ready, r->str);
            rc = CTL_EXIT_RUNTIME;
        }
        freeReplyObject(r);
        return rc;
    }
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
        v = ctl_reply_field(r->element[i], "name");
        if (v != NULL && v->type == REDIS_REPLY_STRING && strcmp(v->str, SCHEMA_GROUP) == 0)
            g = r->element[i];
    }
    if (g == NULL) {
        /* No router joined yet: every entry is unread. */
        w->phase = PH_UNREAD;
        snprintf(w->unread, sizeof(w->unread), "-");
    } else {
        v = ctl_reply_field(g, "last-delivered-id");
        w->phase = PH_PENDING;
        snprintf(w->unread, sizeof(w->unread), "(%s",
                 v != NULL && v->type == REDIS_REPLY_STRING ? v->str : "0-0");
    }
    freeReplyObject(r);
    return 0;
}

static void ctl_walk_free(struct ctl_walk *w)
{
    free(w->ready);
    free(w->retry);
}

/* Reads the message ids of n stream entries (one pipelined XRANGE each). */
static int ctl_walk_msg_ids(struct ctl *c, struct ctl_walk *w, struct ctl_qentry *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const char *argv[4] = {"XRANGE", w->ready, v[i].stream_id, v[i].stream_id};
        if (ctl_redis_append(c, 4, argv) != 0)
            return CTL_EXIT_RUNTIME;
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *r = ctl_redis_reply(c);
        const redisReply *f = NULL;
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
            r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements == 2)
            f = ctl_reply_field(r->element[0]->element[1], SCHEMA_F_ID);
        v[i].msg_id = xstrdup(f != NULL && f->type == REDIS_REPLY_STRING ? f->str : "");
        freeReplyObject(r);
    }
    return 0;
}

/* One page of pending entries (XPENDING, extended form). */
static int ctl_walk_pending(struct ctl *c, struct ctl_walk *w, struct ctl_qentry **out,
                            size_t *n)
{
    redisReply *r = ctl_redis_ok(c, "XPENDING", w->ready, SCHEMA_GROUP, w->cursor, "+",
                                 CTL_WALK_PAGE_S, NULL);
    struct ctl_qentry *v;
    size_t k = 0;
    int rc;

    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        freeReplyObject(r);
        w->phase = PH_UNREAD;
        return 0;
    }
    v = xcalloc(r->elements, sizeof(*v));
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 4 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        v[k].where = CTL_IN_FLIGHT;
        snprintf(v[k].stream_id, sizeof(v[k].stream_id), "%s", e->element[0]->str);
        if (e->element[1]->type == REDIS_REPLY_STRING)
            snprintf(v[k].consumer, sizeof(v[k].consumer), "%s", e->element[1]->str);
        ctl_reply_int(e->element[2], &v[k].idle_ms);
        ctl_reply_int(e->element[3], &v[k].deliveries);
        k++;
    }
    if (k > 0)
        snprintf(w->cursor, sizeof(w->cursor), "(%s", v[k - 1].stream_id);
    if (k == 0 || r->elements < CTL_WALK_PAGE)
        w->phase = PH_UNREAD;
    freeReplyObject(r);
    rc = ctl_walk_msg_ids(c, w, v, k);
    if (rc != 0) {
        ctl_qentries_free(v, k);
        return rc;
    }
    *out = v;
    *n = k;
    return 0;
}

/* One page of entries no router has read. */
static int ctl_walk_unread(struct ctl *c, struct ctl_walk *w, struct ctl_qentry **out,
                           size_t *n)
{
    redisReply *r = ctl_redis_ok(c, "XRANGE", w->ready, w->unread, "+", "COUNT",
                                 CTL_WALK_PAGE_S, NULL);
    struct ctl_qentry *v;
    size_t k = 0;

    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        freeReplyObject(r);
        w->phase = PH_RETRY;
        return 0;
    }
    v = xcalloc(r->elements, sizeof(*v));
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i], *f;
        if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
            e->element[0]->type != REDIS_REPLY_STRING)
            continue;
        v[k].where = CTL_READY;
        snprintf(v[k].stream_id, sizeof(v[k].stream_id), "%s", e->element[0]->str);
        f = ctl_reply_field(e->element[1], SCHEMA_F_ID);
        v[k].msg_id = xstrdup(f != NULL && f->type == REDIS_REPLY_STRING ? f->str : "");
        k++;
    }
    if (k > 0)
        snprintf(w->unread, sizeof(w->unread), "(%s", v[k - 1].stream_id);
    if (k == 0 || r->elements < CTL_WALK_PAGE)
        w->phase = PH_RETRY;
    freeReplyObject(r);
    *out = v;
    *n = k;
    return 0;
}

/* One page of retry members, due first. */
static int ctl_walk_retry(struct ctl *c, struct ctl_walk *w, struct ctl_qentry **out, size_t *n)
{
    char start[32], stop[32];
    redisReply *r;
    struct ctl_qentry *v;
    size_t k = 0;

    snprintf(start, sizeof(start), "%lld", w->offset);
    snprintf(stop, sizeof(stop), "%lld", w->offset + CTL_WALK_PAGE - 1);
    r = ctl_redis_ok(c, "ZRANGE", w->retry, start, stop, "WITHSCORES", NULL);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 2) {
        freeReplyObject(r);
        w->phase = PH_DONE;
        return 0;
    }
    v = xcalloc(r->elements / 2, sizeof(*v));
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        if (r->element[i]->type != REDIS_REPLY_STRING)
            continue;
        v[k].where = CTL_RETRY;
        v[k].msg_id = xstrdup(r->element[i]->str);
        if (r->element[i + 1]->type != REDIS_REPLY_STRING ||
            ctl_parse_ms(r->element[i + 1]->str, &v[k].due_ms) < 0)
            v[k].due_ms = 0;
        k++;
    }
    w->offset += (long long)(r->elements / 2);
    if (r->elements / 2 < CTL_WALK_PAGE)
        w->phase = PH_DONE;
    freeReplyObject(r);
    *out = v;
    *n = k;
    return 0;
}

/* The next non-empty page of the walk; *n is 0 at the end. Returns 0 or
 * CTL_EXIT_RUNTIME. */
static int ctl_walk_next(struct ctl *c, struct ctl_walk *w, struct ctl_qentry **out, size_t *n)
{
    int rc = 0;

    *out = NULL;
    *n = 0;
    while (rc == 0 && *n == 0 && w->phase != PH_DONE) {
        switch (w->phase) {
        case PH_PENDING:
            rc = ctl_walk_pending(c, w, out, n);
            break;
        case PH_UNREAD:
            rc = ctl_walk_unread(c, w, out, n);
            break;
        case PH_RETRY:
            rc = ctl_walk_retry(c, w, out, n);
            break;
        case PH_DONE:
            break;
        }
        if (rc == 0 && *n == 0) {
            free(*out);
            *out = NULL;
        }
        if (w->no_retry && w->phase == PH_RETRY)
            w->phase = PH_DONE;
    }
    w->scanned += (long long)*n;
    return rc;
}

/* ---- queue list ------------------------------------------------------------- */

/* One line of the list: the message and where it was found. */
struct ctl_row {
    struct ctl_msg m;
    struct ctl_qentry e;
};

/* Whether message m passes the filters of o. */
static bool ctl_list_match(const struct ctl_list_opts *o, const struct ctl_msg *m, int64_t now)
{
    if (o->older_ms > 0 && (m->created <= 0 || now - m->created < o->older_ms))
        return false;
    if (o->route != NULL) {
        for (size_t i = 0; i < m->nrcpts; i++)
            if (strcasecmp(m->rcpts[i].route, o->route) == 0)
                return true;
        return false;
    }
    return true;
}

/* The distinct last routes of m's recipients, comma-separated, the most
 * recent first ("-" when none was tried). */
static char *ctl_routes_text(const struct ctl_msg *m)
{
    struct buf b = BUF_INIT;
    const char *last = ctl_msg_last_route(m);

    if (last[0] == '\0')
        return xstrdup("-");
    buf_appends(&b, last);
    for (size_t i = 0; i < m->nrcpts; i++) {
        const char *r = m->rcpts[i].route;
        bool seen = r[0] == '\0' || strcmp(r, last) == 0;
        for (size_t j = 0; j < i && !seen; j++)
            seen = strcmp(m->rcpts[j].route, r) == 0;
        if (!seen) {
            buf_appends(&b, ",");
            buf_appends(&b, r);
        }
    }
    return buf_steal(&b, NULL);
}

static json_t *ctl_routes_json(const struct ctl_msg *m)
{
    json_t *a = json_array();
    const char *last = ctl_msg_last_route(m);

    if (last[0] != '\0')
        json_array_append_new(a, ctl_json_string(last));
    for (size_t i = 0; i < m->nrcpts; i++) {
        const char *r = m->rcpts[i].route;
        bool seen = r[0] == '\0' || strcmp(r, last) == 0;
        for (size_t j = 0; j < i && !seen; j++)
            seen = strcmp(m->rcpts[j].route, r) == 0;
        if (!seen)
            json_array_append_new(a, ctl_json_string(r));
    }
    return a;
}

/* The NEXT ATTEMPT cell. */
static void ctl_next_text(const struct ctl_row *row, int64_t now, char *out, size_t n)
{
    char d[32];

    switch (row->e.where) {
    case CTL_IN_FLIGHT:
        snprintf(out, n, "running");
        break;
    case CTL_READY:
        snprintf(out, n, "now");
        break;
    case CTL_RETRY:
        if (row->e.due_ms <= now) {
            snprintf(out, n, "now");
        } else {
            ctl_fmt_duration(row->e.due_ms - now, d, sizeof(d));
            snprintf(out, n, "in %s", d);
        }
        break;
    }
}

static void ctl_list_text(const struct ctl_row *rows, size_t n, int64_t now, bool truncated,
                          long long stale, const struct ctl_list_opts *o)
{
    static const char *const where_text[] = {
        [CTL_IN_FLIGHT] = "in-flight", [CTL_READY] = "ready", [CTL_RETRY] = "retry"};
    int wid = 2, wfrom = 4;
    char **from = xcalloc(n ? n : 1, sizeof(char *));
    char **routes = xcalloc(n ? n : 1, sizeof(char *));

    for (size_t i = 0; i < n; i++) {
        const char *f = ctl_sender(rows[i].m.from);
        int l;
        from[i] = xstrdup(f);
        if (strlen(f) > CTL_FROM_COL_MAX)
            memcpy(from[i] + CTL_FROM_COL_MAX - 3, "...", 4);
        routes[i] = ctl_routes_text(&rows[i].m);
        if ((l = (int)strlen(rows[i].m.id)) > wid)
            wid = l;
        if ((l = (int)strlen(from[i])) > wfrom)
            wfrom = l;
    }
    printf("%-*s  %7s  %-9s  %-12s  %-*s  %7s  %s\n", wid, "ID", "AGE", "WHERE", "NEXT ATTEMPT",
           wfrom, "FROM", "RCPTS", "LAST ROUTE");
    for (size_t i = 0; i < n; i++) {
        const struct ctl_row *row = &rows[i];
        char age[32], next[48], rc[48];
        if (row->m.created > 0)
            ctl_fmt_duration(now - row->m.created, age, sizeof(age));
        else
            snprintf(age, sizeof(age), "?");
        ctl_next_text(row, now, next, sizeof(next));
        snprintf(rc, sizeof(rc), "%zu/%zu", ctl_msg_open(&row->m), row->m.nrcpts);
        printf("%-*s  %7s  %-9s  %-12s  %-*s  %7s  %s\n", wid, row->m.id, age,
               where_text[row->e.where], next, wfrom, from[i], rc, routes[i]);
    }
    if (n == 0)
        printf("(no queued message%s)\n",
               o->route != NULL || o->older_ms > 0 ? " matches" : "");
    if (truncated)
        printf("(first %zu shown; more match: use --limit)\n", n);
    if (stale > 0)
        printf("(%lld queue entr%s without a message: deleted; routers acknowledge them)\n",
               stale, stale == 1 ? "y" : "ies");
    for (size_t i = 0; i < n; i++) {
        free(from[i]);
        free(routes[i]);
    }
    free(from);
    free(routes);
}

static void ctl_list_json(const struct ctl_row *rows, size_t n, int64_t now, bool truncated,
                          long long stale, long long scanned)
{
    json_t *o = json_object(), *a = json_array();

    json_object_set_new(o, "now_ms", json_integer(now));
    for (size_t i = 0; i < n; i++) {
        const struct ctl_row *row = &rows[i];
        json_t *e = json_object();
        json_object_set_new(e, "id", ctl_json_string(row->m.id));
        json_object_set_new(e, "where", json_string(ctl_where_names[row->e.where]));
        json_object_set_new(e, "created_ms",
                            row->m.created > 0 ? json_integer(row->m.created) : json_null());
        json_object_set_new(e, "age_ms", row->m.created > 0 ? json_integer(now - row->m.created)
                                                            : json_null());
        json_object_set_new(e, "from", ctl_json_string(row->m.from));
        json_object_set_new(e, "rcpts", json_integer((json_int_t)row->m.nrcpts));
        json_object_set_new(e, "pending", json_integer((json_int_t)ctl_msg_open(&row->m)));
        json_object_set_new(e, "next_attempt_ms",
                            row->e.where == CTL_RETRY   ? json_integer(row->e.due_ms)
                            : row->e.where == CTL_READY ? json_integer(now)
                                                        : json_null());
        json_object_set_new(e, "last_route",
                            ctl_msg_last_route(&row->m)[0]
                                ? ctl_json_string(ctl_msg_last_route(&row->m))
                                : json_null());
        json_object_set_new(e, "routes", ctl_routes_json(&row->m));
        json_object_set_new(e, "attempts", json_integer(row->m.attempts));
        json_object_set_new(e, "size", json_integer(row->m.size));
        json_object_set_new(e, "class", ctl_json_string(row->m.cls));
        if (row->e.where != CTL_RETRY)
            json_object_set_new(e, "stream_id", json_string(row->e.stream_id));
        if (row->e.where == CTL_IN_FLIGHT) {
            json_object_set_new(e, "consumer", ctl_json_string(row->e.consumer));
            json_object_set_new(e, "idle_ms", json_integer(row->e.idle_ms));
            json_object_set_new(e, "deliveries", json_integer(row->e.deliveries));
        }
        json_array_append_new(a, e);
    }
    json_object_set_new(o, "messages", a);
    json_object_set_new(o, "truncated", json_boolean(truncated));
    json_object_set_new(o, "stale_entries", json_integer(stale));
    json_object_set_new(o, "scanned", json_integer(scanned));
    ctl_json_print(o);
}

int ctl_queue_list(struct ctl *c, const struct ctl_list_opts *o)
{
    struct ctl_set seen = {0};
    struct ctl_walk w;
    struct ctl_row *rows = NULL;
    size_t nrows = 0, caprows = 0;
    long long stale = 0;
    bool truncated = false;
    int64_t now = 0;
    int rc;

    rc = ctl_redis_connect(c);
    if (rc != 0)
        return rc;
    rc = ctl_redis_time(c, &now);
    if (rc != 0)
        return rc;
    rc = ctl_walk_init(c, &w);
    while (rc == 0 && !truncated) {
        struct ctl_qentry *v;
        struct ctl_msg *msgs;
        bool *load;
        size_t n, nm = 0;

        rc = ctl_walk_next(c, &w, &v, &n);
        if (rc != 0 || n == 0)
            break;
        msgs = xcalloc(n, sizeof(*msgs));
        load = xcalloc(n, sizeof(*load));
        for (size_t i = 0; i < n; i++) {
            if (v[i].msg_id[0] == '\0') {
                stale++;
            } else if (ctl_set_add(&seen, v[i].msg_id)) {
                ctl_msg_init(&msgs[nm++], v[i].msg_id);
                load[i] = true;
            }
            /* Else seen already: the walk is not atomic, or a duplicate. */
        }
        rc = ctl_msg_load(c, msgs, nm);
        for (size_t i = 0, k = 0; rc == 0 && i < n; i++) {
            struct ctl_msg *m;
            if (!load[i])
                continue;
            m = &msgs[k++];
            if (!m->found) {
                stale++;
                continue;
            }
            if (!ctl_list_match(o, m, now))
                continue;
            if ((long long)nrows == o->limit) {
                truncated = true;
                break;
            }
            if (nrows == caprows) {
                caprows = caprows ? caprows * 2 : 64;
                rows = xrealloc(rows, caprows * sizeof(*rows));
            }
            rows[nrows].m = *m;
            rows[nrows].e = v[i];
            v[i].msg_id = NULL;
            memset(m, 0, sizeof(*m));
            nrows++;
        }
        for (size_t k = 0; k < nm; k++)
            ctl_msg_clear(&msgs[k]);
        free(msgs);
        free(load);
        ctl_qentries_free(v, n);
    }
    if (rc == 0) {
        if (c->json)
            ctl_list_json(rows, nrows, now, truncated, stale, w.scanned);
        else
            ctl_list_text(rows, nrows, now, truncated, stale, o);
    }
    for (size_t i = 0; i < nrows; i++) {
        ctl_msg_clear(&rows[i].m);
        free(rows[i].e.msg_id);
    }
    free(rows);
    ctl_set_free(&seen);
    ctl_walk_free(&w);
    return rc;
}

/* ---- queue show -------------------------------------------------------------- */

/* Where the message is: the result of the search of queue show. */
struct ctl_status {
    bool found;
    struct ctl_qentry e;      /* in flight, ready, retry */
    bool dead;
    char dead_entry[64];
    char *dead_reason;
    long long scanned;        /* queue entries examined */
    bool complete;            /* the whole queue was examined */
};

/* One attempt of the message, from <prefix>events. */
struct ctl_event {
    char entry[64];
    int64_t t;
    char *rcpt, *route, *reason, *result, *code, *enh, *text, *remote, *latency, *attempt;
};

struct ctl_history {
    struct ctl_event *v;
    size_t n, cap;
    long long scanned;
    bool complete;            /* reached the start of the search range */
};

/* Finds id in the queue: its retry member (ZSCORE), else the pending and
 * unread entries of the ready stream, examining at most scan of them. */
static int ctl_find(struct ctl *c, const char *id, long long scan, struct ctl_status *st)
{
    char *retry = ctl_key(c, SCHEMA_RETRY);
    redisReply *r = ctl_redis_ok(c, "ZSCORE", retry, id, NULL);
    struct ctl_walk w;
    int rc;

    free(retry);
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type == REDIS_REPLY_STRING && ctl_parse_ms(r->str, &st->e.due_ms) == 0) {
        st->found = true;
        st->e.where = CTL_RETRY;
        st->complete = true;
        freeReplyObject(r);
        return 0;
    }
    freeReplyObject(r);
    rc = ctl_walk_init(c, &w);
    /* The retry set was asked directly. */
    w.no_retry = true;
    if (w.phase == PH_RETRY)
        w.phase = PH_DONE;
    while (rc == 0 && !st->found) {
        struct ctl_qentry *v;
        size_t n;
        if (w.scanned >= scan)
            break;
        rc = ctl_walk_next(c, &w, &v, &n);
        if (rc != 0)
            break;
        for (size_t i = 0; i < n && !st->found; i++) {
            if (strcmp(v[i].msg_id, id) == 0) {
                st->found = true;
                st->e = v[i];
                st->e.msg_id = NULL;
            }
        }
        ctl_qentries_free(v, n);
        if (n == 0) {
            st->complete = true;
            break;
        }
    }
    st->scanned = w.scanned;
    ctl_walk_free(&w);
    return rc;
}

/* Looks for id in <prefix>dead, newest entries first, examining at most
 * scan of them. */
static int ctl_find_dead(struct ctl *c, const char *id, long long scan, struct ctl_status *st)
{
    char *dead = ctl_key(c, SCHEMA_DEAD);
    char end[80] = "+";
    long long seen = 0;
    int rc = 0;

    while (seen < scan && !st->dead) {
        redisReply *r = ctl_redis_ok(c, "XREVRANGE", dead, end, "-", "COUNT", CTL_WALK_PAGE_S,
                                     NULL);
        if (r == NULL) {
            rc = CTL_EXIT_RUNTIME;
            break;
        }
        if (r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
            freeReplyObject(r);
            break;
        }
        for (size_t i = 0; i < r->elements && !st->dead; i++) {
            const redisReply *e = r->element[i], *f;
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
                e->element[0]->type != REDIS_REPLY_STRING)
                continue;
            snprintf(end, sizeof(end), "(%s", e->element[0]->str);
            seen++;
            f = ctl_reply_field(e->element[1], SCHEMA_F_ID);
            if (f == NULL || f->type != REDIS_REPLY_STRING || strcmp(f->str, id) != 0)
                continue;
            st->dead = true;
            snprintf(st->dead_entry, sizeof(st->dead_entry), "%s", e->element[0]->str);
            f = ctl_reply_field(e->element[1], "reason");
            st->dead_reason = xstrdup(f != NULL && f->type == REDIS_REPLY_STRING ? f->str : "");
        }
        if (r->elements < CTL_WALK_PAGE) {
            freeReplyObject(r);
            break;
        }
        freeReplyObject(r);
    }
    free(dead);
    return rc;
}

static char *ctl_event_field(const redisReply *fields, const char *name)
{
    const redisReply *f = ctl_reply_field(fields, name);

    return f != NULL && f->type == REDIS_REPLY_STRING ? xstrndup(f->str, f->len) : xstrdup("");
}

static void ctl_history_free(struct ctl_history *h)
{
    for (size_t i = 0; i < h->n; i++) {
        struct ctl_event *e = &h->v[i];
        free(e->rcpt);
        free(e->route);
        free(e->reason);
        free(e->result);
        free(e->code);
        free(e->enh);
        free(e->text);
        free(e->remote);
        free(e->latency);
        free(e->attempt);
    }
    free(h->v);
}

/*
 * The attempt history: the events of the message, searched from the
 * newest entry of <prefix>events back to the message's created time (less
 * CTL_CLOCK_SKEW_MS), at most scan entries. The stream has no index by
 * message, so the cost is one entry read per event written since the
 * message was created; the stream is capped ([router] events_maxlen), so
 * the history of an old message may be gone.
 */
static int ctl_history(struct ctl *c, const char *id, int64_t created, long long scan,
                       struct ctl_history *h)
{
    char *events = ctl_key(c, SCHEMA_EVENTS);
    char end[80] = "+", start[40] = "-";
    int rc = 0;

    if (created > CTL_CLOCK_SKEW_MS)
        snprintf(start, sizeof(start), "%" PRId64, created - CTL_CLOCK_SKEW_MS);
    for (;;) {
        long long want = scan - h->scanned < CTL_WALK_PAGE ? scan - h->scanned : CTL_WALK_PAGE;
        char count[32];
        redisReply *r;

        if (want <= 0)
            break;
        snprintf(count, sizeof(count), "%lld", want);
        r = ctl_redis_ok(c, "XREVRANGE", events, end, start, "COUNT", count, NULL);
        if (r == NULL) {
            rc = CTL_EXIT_RUNTIME;
            break;
        }
        if (r->type != REDIS_REPLY_ARRAY || r->elements < (size_t)want)
            h->complete = true;
        for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
            const redisReply *e = r->element[i], *f;
            struct ctl_event *ev;
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
                e->element[0]->type != REDIS_REPLY_STRING)
                continue;
            snprintf(end, sizeof(end), "(%s", e->element[0]->str);
            h->scanned++;
            f = ctl_reply_field(e->element[1], SCHEMA_F_ID);
            if (f == NULL || f->type != REDIS_REPLY_STRING || strcmp(f->str, id) != 0)
                continue;
            if (h->n == h->cap) {
                h->cap = h->cap ? h->cap * 2 : 16;
                h->v = xrealloc(h->v, h->cap * sizeof(*h->v));
            }
            ev = &h->v[h->n++];
            memset(ev, 0, sizeof(*ev));
            snprintf(ev->entry, sizeof(ev->entry), "%s", e->element[0]->str);
            if (ctl_stream_id_ms(ev->entry, &ev->t) < 0)
                ev->t = 0;
            ev->rcpt = ctl_event_field(e->element[1], "rcpt");
            ev->route = ctl_event_field(e->element[1], "route");
            ev->reason = ctl_event_field(e->element[1], "reason");
            ev->result = ctl_event_field(e->element[1], "result");
            ev->code = ctl_event_field(e->element[1], "code");
            ev->enh = ctl_event_field(e->element[1], "enh");
            ev->text = ctl_event_field(e->element[1], "text");
            ev->remote = ctl_event_field(e->element[1], "remote");
            ev->latency = ctl_event_field(e->element[1], "latency_ms");
            ev->attempt = ctl_event_field(e->element[1], "attempt");
        }
        freeReplyObject(r);
        if (h->complete)
            break;
    }
    free(events);
    return rc;
}

/* "-" for an empty string, for table cells. */
static const char *ctl_dash(const char *s)
{
    return s == NULL || s[0] == '\0' ? "-" : s;
}

static void ctl_status_text(const struct ctl_status *st, const struct ctl_msg *m, int64_t now,
                            char *out, size_t n)
{
    char d[32], t[32];

    if (st->found && st->e.where == CTL_RETRY) {
        ctl_fmt_time(st->e.due_ms, t, sizeof(t));
        if (st->e.due_ms <= now) {
            snprintf(out, n, "waiting for a retry, due now (%s UTC)", t);
        } else {
            ctl_fmt_duration(st->e.due_ms - now, d, sizeof(d));
            snprintf(out, n, "waiting for a retry in %s (%s UTC)", d, t);
        }
    } else if (st->found && st->e.where == CTL_IN_FLIGHT) {
        ctl_fmt_duration(st->e.idle_ms, d, sizeof(d));
        snprintf(out, n, "in flight: read by router %s (idle %s, read %lld time%s)",
                 st->e.consumer, d, st->e.deliveries, st->e.deliveries == 1 ? "" : "s");
    } else if (st->found) {
        snprintf(out, n, "ready: waiting for a router");
    } else if (st->dead) {
        snprintf(out, n, "dead: %s; to try again: mailferryctl dead requeue %s",
                 ctl_dash(st->dead_reason), m->id);
    } else if (ctl_msg_open(m) == 0) {
        snprintf(out, n, "finished, not in the queue");
    } else if (st->complete) {
        snprintf(out, n, "not in the queue (no ready entry, no retry)");
    } else {
        snprintf(out, n, "not found in the first %lld queue entries", st->scanned);
    }
}

static void ctl_show_text(const struct ctl_msg *m, const struct ctl_status *st,
                          const struct ctl_history *h, int64_t now, long long scan)
{
    char status[512], t[32], d[32];
    int wr = 9, wroute = 5;

    ctl_status_text(st, m, now, status, sizeof(status));
    printf("%-12s %s\n", "message", m->id);
    printf("%-12s %s\n", "status", status);
    printf("%-12s %s\n", "from", ctl_sender(m->from));
    printf("%-12s %zu (%zu pending, %zu deferred, %zu delivered, %zu failed)\n", "recipients",
           m->nrcpts, ctl_msg_count(m, "pending"), ctl_msg_count(m, "deferred"),
           ctl_msg_count(m, "delivered"), ctl_msg_count(m, "failed"));
    printf("%-12s %lld bytes\n", "size", m->size);
    if (m->created > 0) {
        ctl_fmt_time(m->created, t, sizeof(t));
        ctl_fmt_duration(now - m->created, d, sizeof(d));
        printf("%-12s %s UTC (%s ago)\n", "created", t, d);
    } else {
        printf("%-12s -\n", "created");
    }
    printf("%-12s %s\n", "class", ctl_dash(m->cls));
    printf("%-12s %s\n", "client ip", ctl_dash(m->client_ip));
    printf("%-12s %s\n", "helo", ctl_dash(m->helo));
    printf("%-12s %s\n", "auth user", ctl_dash(m->auth_user));
    printf("%-12s %s\n", "gateway", ctl_dash(m->gateway));
    printf("%-12s %lld\n", "attempts", m->attempts);
    if (m->next_attempt > 0) {
        ctl_fmt_time(m->next_attempt, t, sizeof(t));
        printf("%-12s %s UTC\n", "next attempt", t);
    } else {
        printf("%-12s -\n", "next attempt");
    }

    for (size_t i = 0; i < m->nrcpts; i++) {
        int l = (int)strlen(m->rcpts[i].addr);
        if (l > wr)
            wr = l;
        if ((l = (int)strlen(m->rcpts[i].route)) > wroute)
            wroute = l;
    }
    for (size_t i = 0; i < h->n; i++) {
        int l = (int)strlen(h->v[i].rcpt);
        if (l > wr)
            wr = l;
        if ((l = (int)strlen(h->v[i].route)) > wroute)
            wroute = l;
    }
    printf("\n%-*s  %-9s  %4s  %-7s  %-*s  %3s  %-19s  %s\n", wr, "RECIPIENT", "STATE", "CODE",
           "ENH", wroute, "ROUTE", "N", "LAST ATTEMPT", "REPLY");
    for (size_t i = 0; i < m->nrcpts; i++) {
        const struct ctl_rcpt *r = &m->rcpts[i];
        char code[16];
        if (r->t > 0)
            ctl_fmt_time(r->t, t, sizeof(t));
        else
            snprintf(t, sizeof(t), "-");
        if (r->code > 0)
            snprintf(code, sizeof(code), "%lld", r->code);
        else
            snprintf(code, sizeof(code), "-");
        printf("%-*s  %-9s  %4s  %-7s  %-*s  %3lld  %-19s  %s%s%s%s\n", wr, r->addr, r->state,
               code, ctl_dash(r->enh), wroute, ctl_dash(r->route), r->attempts, t,
               ctl_dash(r->text), r->remote[0] ? " [" : "", r->remote, r->remote[0] ? "]" : "");
    }

    printf("\nattempt history: %zu event%s", h->n, h->n == 1 ? "" : "s");
    if (h->complete)
        printf(" (searched the %lld events since the message was created)\n", h->scanned);
    else
        printf(" (searched the newest %lld events only: use --scan N to search more than %lld)\n",
               h->scanned, scan);
    if (h->n == 0)
        return;
    printf("%-19s  %-*s  %-*s  %-9s  %4s  %-7s  %7s  %-20s  %s\n", "TIME", wr, "RECIPIENT",
           wroute, "ROUTE", "RESULT", "CODE", "ENH", "LATENCY", "REASON", "REPLY");
    for (size_t i = h->n; i-- > 0;) {
        const struct ctl_event *e = &h->v[i];
        char lat[32];
        long long ms;
        ctl_fmt_time(e->t, t, sizeof(t));
        if (ctl_parse_count(e->latency, 0, LLONG_MAX, &ms) == 0 && ms > 0)
            snprintf(lat, sizeof(lat), "%lldms", ms);
        else
            snprintf(lat, sizeof(lat), "-");
        printf("%-19s  %-*s  %-*s  %-9s  %4s  %-7s  %7s  %-20s  %s\n", t, wr, e->rcpt, wroute,
               ctl_dash(e->route), ctl_dash(e->result),
               strcmp(e->code, "0") == 0 ? "-" : ctl_dash(e->code), ctl_dash(e->enh), lat,
               ctl_dash(e->reason), ctl_dash(e->text));
    }
}

/* A decimal string as a JSON integer, null when it is not one. */
static json_t *ctl_json_int_text(const char *s)
{
    long long v;

    if (ctl_parse_count(s, 0, LLONG_MAX, &v) == 0)
        return json_integer(v);
    return json_null();
}

static void ctl_show_json(const struct ctl_msg *m, const struct ctl_status *st,
                          const struct ctl_history *h, int64_t now)
{
    json_t *o = json_object(), *s = json_object(), *a = json_array(), *ha = json_array();

    json_object_set_new(o, "id", ctl_json_string(m->id));
    json_object_set_new(o, "now_ms", json_integer(now));
    if (st->found) {
        json_object_set_new(s, "where", json_string(ctl_where_names[st->e.where]));
        if (st->e.where == CTL_RETRY)
            json_object_set_new(s, "due_ms", json_integer(st->e.due_ms));
        else
            json_object_set_new(s, "stream_id", json_string(st->e.stream_id));
        if (st->e.where == CTL_IN_FLIGHT) {
            json_object_set_new(s, "consumer", ctl_json_string(st->e.consumer));
            json_object_set_new(s, "idle_ms", json_integer(st->e.idle_ms));
            json_object_set_new(s, "deliveries", json_integer(st->e.deliveries));
        }
    } else if (st->dead) {
        json_object_set_new(s, "where", json_string("dead"));
        json_object_set_new(s, "dead_entry", json_string(st->dead_entry));
        json_object_set_new(s, "reason", ctl_json_string(st->dead_reason));
    } else {
        json_object_set_new(s, "where", json_string(ctl_msg_open(m) == 0 ? "finished"
                                                    : st->complete        ? "none"
                                                                          : "unknown"));
    }
    json_object_set_new(o, "status", s);
    json_object_set_new(o, "from", ctl_json_string(m->from));
    json_object_set_new(o, "size", json_integer(m->size));
    json_object_set_new(o, "created_ms", m->created > 0 ? json_integer(m->created) : json_null());
    json_object_set_new(o, "age_ms", m->created > 0 ? json_integer(now - m->created)
                                                    : json_null());
    json_object_set_new(o, "class", ctl_json_string(m->cls));
    json_object_set_new(o, "client_ip", ctl_json_string(m->client_ip));
    json_object_set_new(o, "helo", ctl_json_string(m->helo));
    json_object_set_new(o, "auth_user", ctl_json_string(m->auth_user));
    json_object_set_new(o, "gateway", ctl_json_string(m->gateway));
    json_object_set_new(o, "attempts", json_integer(m->attempts));
    json_object_set_new(o, "next_attempt_ms",
                        m->next_attempt > 0 ? json_integer(m->next_attempt) : json_null());
    for (size_t i = 0; i < m->nrcpts; i++) {
        const struct ctl_rcpt *r = &m->rcpts[i];
        json_t *e = json_object();
        json_object_set_new(e, "rcpt", ctl_json_string(r->addr));
        json_object_set_new(e, "state", json_string(r->state));
        json_object_set_new(e, "code", r->code > 0 ? json_integer(r->code) : json_null());
        json_object_set_new(e, "enh", ctl_json_string(r->enh));
        json_object_set_new(e, "text", ctl_json_string(r->text));
        json_object_set_new(e, "route", r->route[0] ? ctl_json_string(r->route) : json_null());
        json_object_set_new(e, "remote", ctl_json_string(r->remote));
        json_object_set_new(e, "attempts", json_integer(r->attempts));
        json_object_set_new(e, "last_attempt_ms", r->t > 0 ? json_integer(r->t) : json_null());
        json_object_set_new(e, "bounced", json_boolean(r->bounced));
        json_array_append_new(a, e);
    }
    json_object_set_new(o, "recipients", a);
    for (size_t i = h->n; i-- > 0;) {
        const struct ctl_event *ev = &h->v[i];
        json_t *e = json_object();
        json_object_set_new(e, "time_ms", json_integer(ev->t));
        json_object_set_new(e, "entry", json_string(ev->entry));
        json_object_set_new(e, "rcpt", ctl_json_string(ev->rcpt));
        json_object_set_new(e, "route", ctl_json_string(ev->route));
        json_object_set_new(e, "reason", ctl_json_string(ev->reason));
        json_object_set_new(e, "result", ctl_json_string(ev->result));
        json_object_set_new(e, "code", ctl_json_int_text(ev->code));
        json_object_set_new(e, "enh", ctl_json_string(ev->enh));
        json_object_set_new(e, "text", ctl_json_string(ev->text));
        json_object_set_new(e, "remote", ctl_json_string(ev->remote));
        json_object_set_new(e, "latency_ms", ctl_json_int_text(ev->latency));
        json_object_set_new(e, "attempt", ctl_json_int_text(ev->attempt));
        json_array_append_new(ha, e);
    }
    json_object_set_new(o, "history", ha);
    json_object_set_new(o, "history_scanned", json_integer(h->scanned));
    json_object_set_new(o, "history_complete", json_boolean(h->complete));
    ctl_json_print(o);
}

int ctl_queue_show(struct ctl *c, const char *id, long long scan)
{
    struct ctl_status st;
    struct ctl_history h;
    struct ctl_msg m;
    int64_t now = 0;
    int rc;

    memset(&st, 0, sizeof(st));
    memset(&h, 0, sizeof(h));
    rc = ctl_redis_connect(c);
    if (rc != 0)
        return rc;
    rc = ctl_redis_time(c, &now);
    if (rc != 0)
        return rc;
    ctl_msg_init(&m, id);
    rc = ctl_msg_load(c, &m, 1);
    if (rc == 0 && !m.found) {
        ctl_error("no such message: %s (delivered, deleted or never queued)", id);
        rc = CTL_EXIT_NOT_FOUND;
    }
    if (rc == 0)
        rc = ctl_find(c, id, scan, &st);
    if (rc == 0 && !st.found)
        rc = ctl_find_dead(c, id, scan, &st);
    if (rc == 0)
        rc = ctl_history(c, id, m.created, scan, &h);
    if (rc == 0) {
        if (c->json)
            ctl_show_json(&m, &st, &h, now);
        else
            ctl_show_text(&m, &st, &h, now, scan);
    }
    ctl_history_free(&h);
    free(st.dead_reason);
    ctl_msg_clear(&m);
    return rc;
}
