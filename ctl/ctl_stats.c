#include "ctl/ctl_stats.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl/ctl_policy.h"
#include "lib/buf.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"
#include "router/policy.h"

#define MS_MINUTE ((int64_t)60000)
#define MS_HOUR ((int64_t)3600000)
#define MS_DAY ((int64_t)86400000)

enum { RATE_BOUNCE = 0, RATE_DEFERRAL, RATE_COMPLAINT, RATE__COUNT };

static const char *const ctl_rate_keys[RATE__COUNT] = {
    [RATE_BOUNCE] = "bounce_rate_max",
    [RATE_DEFERRAL] = "deferral_rate_max",
    [RATE_COMPLAINT] = "complaint_rate_max",
};

static const char *const ctl_rate_names[RATE__COUNT] = {
    [RATE_BOUNCE] = "bounce", [RATE_DEFERRAL] = "deferral", [RATE_COMPLAINT] = "complaint"};

enum { CAP_MINUTE = 0, CAP_HOUR, CAP_DAY };

/* Everything shown about one route. */
struct ctl_rstats {
    struct policy_route_info info;
    long long delivered, deferred, bounced;
    struct policy_window w;          /* the reputation window now */
    int64_t bucket_ms;
    int nbuckets;
    double max[RATE__COUNT];         /* 0: that rate is not judged */
    long long min_samples;
    int64_t cooldown_ms;             /* breaker_cooldown */
    long long used[3];               /* cap counters: minute, hour, day */
    int64_t cap[3];                  /* 0: no cap */
    int warmup_day;
    char breaker_raw[160];           /* "" when the key is absent */
    struct policy_breaker brk;
    bool breaker_bad;                /* present but unreadable */
    bool have_health;
    bool healthy;
    char *why, *health_router;
    int64_t health_t;
};

struct ctl_stats_info {
    int64_t now;
    int hours;
    int64_t hour;                    /* current UTC hour, hours since the epoch */
    struct ctl_rstats *r;
    size_t n;
    long long held;
    char split[512];                 /* split.default of the effective policy */
};

/* Reputation windows are kept in buckets of a twelfth of the window, at
 * least a minute (router/store.c, store_bucket_ms()). */
static int64_t ctl_bucket_ms(int64_t window_ms)
{
    int64_t b = window_ms / 12;

    return b < MS_MINUTE ? MS_MINUTE : b;
}

/* A route key of the effective policy as text. */
static void ctl_route_key(const struct policy_config *pc, const char *route, const char *key,
                          char *out, size_t n)
{
    struct buf k = BUF_INIT;

    buf_appendf(&k, "route.%s.%s", route, key);
    if (policy_config_get(pc, k.data, out, n) != POLICY_OK)
        snprintf(out, n, "0");
    buf_free(&k);
}

/* Fills the thresholds and caps of route i from the effective policy. */
static void ctl_thresholds(const struct policy_config *pc, size_t i, int64_t now,
                           struct ctl_rstats *s)
{
    struct policy_caps caps;
    char v[64];
    long long ll;

    policy_route_info(pc, i, &s->info);
    for (int k = 0; k < RATE__COUNT; k++) {
        ctl_route_key(pc, s->info.name, ctl_rate_keys[k], v, sizeof(v));
        s->max[k] = strtod(v, NULL);
    }
    ctl_route_key(pc, s->info.name, "min_samples", v, sizeof(v));
    s->min_samples = ctl_parse_count(v, 0, 1000000000, &ll) == 0 ? ll : 0;
    ctl_route_key(pc, s->info.name, "breaker_cooldown", v, sizeof(v));
    s->cooldown_ms = ctl_parse_count(v, 0, 86400 * 7, &ll) == 0 ? ll * 1000 : 0;
    policy_route_caps(pc, i, "", now, &caps);
    s->cap[CAP_MINUTE] = caps.minute;
    s->cap[CAP_HOUR] = caps.hour;
    s->cap[CAP_DAY] = caps.day;
    s->warmup_day = policy_warmup_day(pc, i, now);
    s->bucket_ms = ctl_bucket_ms(s->info.window_ms);
}

/* Queues a command of up to 8 arguments given as strings. */
static int ctl_append(struct ctl *c, size_t argc, const char *a0, const char *a1, const char *a2,
                      const char *a3, const char *a4, const char *a5, const char *a6)
{
    const char *argv[7] = {a0, a1, a2, a3, a4, a5, a6};

    return ctl_redis_append(c, argc, argv);
}

static long long ctl_elem_ll(const redisReply *r, size_t i)
{
    long long v;

    if (r == NULL || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
        return 0;
    return ctl_reply_int(r->element[i], &v) == 0 && v > 0 ? v : 0;
}

static const redisReply *ctl_elem(const redisReply *r, size_t i)
{
    if (r == NULL || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
        return NULL;
    return r->element[i];
}

/* Queues every read of route s: stats hours, counters and breaker, health,
 * window buckets. Returns the number of commands, or -1. */
static int ctl_route_reads(struct ctl *c, const struct ctl_stats_info *q,
                           const struct ctl_rstats *s)
{
    int64_t last = q->now / s->bucket_ms;
    int64_t first = (q->now - s->info.window_ms) / s->bucket_ms + 1;
    const char *name = s->info.name;
    int n = 0, rc = 0;

    for (int64_t h = q->hour - q->hours + 1; h <= q->hour && rc == 0; h++, n++) {
        char *key = ctl_keyf(c, SCHEMA_STATS "%s:%" PRId64, name, h);
        rc = ctl_append(c, 5, "HMGET", key, "delivered", "deferred", "bounced", NULL, NULL);
        free(key);
    }
    if (rc == 0) {
        char *m = ctl_keyf(c, SCHEMA_COUNT "%s:m:%" PRId64, name, q->now / MS_MINUTE);
        char *h = ctl_keyf(c, SCHEMA_COUNT "%s:h:%" PRId64, name, q->now / MS_HOUR);
        char *d = ctl_keyf(c, SCHEMA_COUNT "%s:d:%" PRId64, name, q->now / MS_DAY);
        char *b = ctl_keyf(c, SCHEMA_BREAKER "%s", name);
        rc = ctl_append(c, 5, "MGET", m, h, d, b, NULL, NULL);
        free(m);
        free(h);
        free(d);
        free(b);
        n++;
    }
    if (rc == 0) {
        char *key = ctl_keyf(c, SCHEMA_HEALTH "%s", name);
        rc = ctl_append(c, 6, "HMGET", key, "healthy", "why", "t", "router", NULL);
        free(key);
        n++;
    }
    for (int64_t b = first; b <= last && rc == 0; b++, n++) {
        char *key = ctl_keyf(c, SCHEMA_WINDOW "%s:%" PRId64 ":%" PRId64, name, s->bucket_ms, b);
        rc = ctl_append(c, 6, "HMGET", key, "sent", "bounced", "deferred", "complained", NULL);
        free(key);
    }
    return rc == 0 ? n : -1;
}

/* Reads the replies of ctl_route_reads() into s. */
static int ctl_route_replies(struct ctl *c, const struct ctl_stats_info *q, struct ctl_rstats *s,
                             int n)
{
    int rc = 0;

    for (int k = 0; k < n; k++) {
        redisReply *r = ctl_redis_reply(c);
        const redisReply *e;
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        if (r->type == REDIS_REPLY_ERROR) {
            ctl_error("Redis at %s: %s", c->where, r->str);
            rc = CTL_EXIT_RUNTIME;
        } else if (k < q->hours) {
            s->delivered += ctl_elem_ll(r, 0);
            s->deferred += ctl_elem_ll(r, 1);
            s->bounced += ctl_elem_ll(r, 2);
        } else if (k == q->hours) {
            for (int j = 0; j < 3; j++)
                s->used[j] = ctl_elem_ll(r, (size_t)j);
            e = ctl_elem(r, 3);
            if (e != NULL && e->type == REDIS_REPLY_STRING) {
                snprintf(s->breaker_raw, sizeof(s->breaker_raw), "%s", e->str);
                if (policy_breaker_parse(s->breaker_raw, &s->brk) != 0) {
                    s->breaker_bad = true;
                    memset(&s->brk, 0, sizeof(s->brk));
                }
            }
        } else if (k == q->hours + 1) {
            long long v = 0;
            e = ctl_elem(r, 0);
            s->have_health = e != NULL && e->type == REDIS_REPLY_STRING;
            s->healthy = s->have_health && ctl_reply_int(e, &v) == 0 && v != 0;
            e = ctl_elem(r, 1);
            s->why = xstrdup(e != NULL && e->type == REDIS_REPLY_STRING ? e->str : "");
            s->health_t = (int64_t)ctl_elem_ll(r, 2);
            e = ctl_elem(r, 3);
            s->health_router = xstrdup(e != NULL && e->type == REDIS_REPLY_STRING ? e->str : "");
        } else {
            s->w.sent += (uint64_t)ctl_elem_ll(r, 0);
            s->w.bounced += (uint64_t)ctl_elem_ll(r, 1);
            s->w.deferred += (uint64_t)ctl_elem_ll(r, 2);
            s->w.complained += (uint64_t)ctl_elem_ll(r, 3);
            s->nbuckets++;
        }
        freeReplyObject(r);
    }
    return rc;
}

/* The held groups over the hours (route "hold"). */
static int ctl_read_held(struct ctl *c, struct ctl_stats_info *q)
{
    int rc = 0;

    for (int64_t h = q->hour - q->hours + 1; h <= q->hour && rc == 0; h++) {
        char *key = ctl_keyf(c, SCHEMA_STATS "hold:%" PRId64, h);
        redisReply *r = ctl_redis_ok(c, "HGET", key, "held", NULL);
        long long v;
        free(key);
        if (r == NULL)
            return CTL_EXIT_RUNTIME;
        if (ctl_reply_int(r, &v) == 0 && v > 0)
            q->held += v;
        freeReplyObject(r);
    }
    return rc;
}

static int ctl_read_all(struct ctl *c, struct ctl_stats_info *q)
{
    int rc = 0;

    for (size_t i = 0; i < q->n && rc == 0; i++) {
        int n = ctl_route_reads(c, q, &q->r[i]);
        if (n < 0)
            return CTL_EXIT_RUNTIME;
        rc = ctl_route_replies(c, q, &q->r[i], n);
    }
    if (rc == 0)
        rc = ctl_read_held(c, q);
    return rc;
}

/* ---- derived values ---------------------------------------------------------- */

static uint64_t ctl_rate_count(const struct policy_window *w, int k)
{
    return k == RATE_BOUNCE ? w->bounced : k == RATE_DEFERRAL ? w->deferred : w->complained;
}

/* Rates are judged only with min_samples outcomes in the window. */
static bool ctl_judged(const struct ctl_rstats *s)
{
    return s->w.sent >= (uint64_t)s->min_samples;
}

/* Whether rate k is above its maximum the way the breaker judges it
 * (strictly above; a maximum of 0 is off). */
static bool ctl_over(const struct ctl_rstats *s, int k)
{
    return ctl_judged(s) && s->max[k] > 0 &&
           (double)ctl_rate_count(&s->w, k) > s->max[k] * (double)s->w.sent;
}

static long long ctl_share(long long part, long long total)
{
    if (total <= 0)
        return -1;
    return (part * 1000 + total / 2) / total;
}

static long long ctl_total_delivered(const struct ctl_stats_info *q)
{
    long long t = 0;

    for (size_t i = 0; i < q->n; i++)
        t += q->r[i].delivered;
    return t;
}

/* The end of an open breaker's cool-down. */
static int64_t ctl_probe_at(const struct ctl_rstats *s)
{
    return s->brk.since_ms + (s->brk.cooldown_ms > 0 ? s->brk.cooldown_ms : s->cooldown_ms);
}

/* A rate as a percentage: two decimals below 1%, one above. */
static void ctl_pct(double r, char *out, size_t n)
{
    if (r * 100 < 1)
        snprintf(out, n, "%.2f%%", r * 100);
    else
        snprintf(out, n, "%.1f%%", r * 100);
}

/* ---- output --------------------------------------------------------------------- */

static const char *ctl_health_word(const struct ctl_rstats *s)
{
    if (!s->have_health)
        return "unknown";
    return s->healthy ? "healthy" : "down";
}

static void ctl_breaker_word(const struct ctl_rstats *s, char *out, size_t n)
{
    if (s->breaker_bad)
        snprintf(out, n, "?");
    else if (s->brk.state == POLICY_BREAKER_OPEN)
        snprintf(out, n, "open(%s)", policy_cause_name(s->brk.cause));
    else
        snprintf(out, n, "%s", policy_breaker_state_name(s->brk.state));
}

static void ctl_stats_text(const struct ctl_stats_info *q)
{
    long long total = ctl_total_delivered(q), sd = 0, sb = 0;
    int nw = 5;
    char t[32];

    for (size_t i = 0; i < q->n; i++) {
        int l = (int)strlen(q->r[i].info.name);
        if (l > nw)
            nw = l;
    }
    printf("split.default = %s\n", q->split);
    if (q->hours == 1)
        printf("recipients since %02d:00 UTC (this hour)\n", (int)(q->hour % 24));
    else if (q->hours == 2)
        printf("recipients since %02d:00 UTC (this hour and the previous one)\n",
               (int)(((q->hour - 1) % 24 + 24) % 24));
    else
        printf("recipients since %02d:00 UTC (this hour and the previous %d)\n",
               (int)(((q->hour - q->hours + 1) % 24 + 24) % 24), q->hours - 1);
    printf("%-*s  %-9s  %-7s  %-14s  %9s  %6s  %8s  %7s\n", nw, "ROUTE", "STATE", "HEALTH",
           "BREAKER", "DELIVERED", "SHARE", "DEFERRED", "BOUNCED");
    for (size_t i = 0; i <= q->n; i++) {
        const struct ctl_rstats *s = i < q->n ? &q->r[i] : NULL;
        char share[32], brk[48];
        long long sh = ctl_share(s ? s->delivered : total, total);
        if (sh < 0)
            snprintf(share, sizeof(share), "-");
        else
            snprintf(share, sizeof(share), "%lld.%lld%%", sh / 10, sh % 10);
        if (s == NULL) {
            printf("%-*s  %-9s  %-7s  %-14s  %9lld  %6s  %8lld  %7lld\n", nw, "total", "", "",
                   "", total, share, sd, sb);
            break;
        }
        ctl_breaker_word(s, brk, sizeof(brk));
        printf("%-*s  %-9s  %-7s  %-14s  %9lld  %6s  %8lld  %7lld\n", nw, s->info.name,
               s->info.enabled ? "enabled" : "suspended", ctl_health_word(s), brk, s->delivered,
               share, s->deferred, s->bounced);
        sd += s->deferred;
        sb += s->bounced;
    }
    printf("held by the policy: %lld group%s\n", q->held, q->held == 1 ? "" : "s");

    printf("\nlive rates over each route's window (judged from min_samples outcomes; "
           "! = above the maximum)\n");
    printf("%-*s  %7s  %8s  %-9s  %-18s  %-18s  %s\n", nw, "ROUTE", "WINDOW", "SENT",
           "SAMPLES", "BOUNCE/MAX", "DEFERRAL/MAX", "COMPLAINT/MAX");
    for (size_t i = 0; i < q->n; i++) {
        const struct ctl_rstats *s = &q->r[i];
        char win[32], samples[48], cell[RATE__COUNT][64];
        ctl_fmt_duration(s->info.window_ms, win, sizeof(win));
        if (ctl_judged(s))
            snprintf(samples, sizeof(samples), "judged");
        else
            snprintf(samples, sizeof(samples), "%" PRIu64 "/%lld", s->w.sent, s->min_samples);
        for (int k = 0; k < RATE__COUNT; k++) {
            char rate[32], max[32];
            if (s->w.sent > 0)
                ctl_pct((double)ctl_rate_count(&s->w, k) / (double)s->w.sent, rate,
                        sizeof(rate));
            else
                snprintf(rate, sizeof(rate), "-");
            if (s->max[k] > 0)
                ctl_pct(s->max[k], max, sizeof(max));
            else
                snprintf(max, sizeof(max), "off");
            snprintf(cell[k], sizeof(cell[k]), "%s/%s%s", rate, max, ctl_over(s, k) ? " !" : "");
        }
        printf("%-*s  %7s  %8" PRIu64 "  %-9s  %-18s  %-18s  %s\n", nw, s->info.name, win,
               s->w.sent, samples, cell[0], cell[1], cell[2]);
    }

    printf("\ncaps: used/cap in the current UTC minute, hour and day (- = no cap)\n");
    printf("%-*s  %-24s  %-24s  %s\n", nw, "ROUTE", "MINUTE", "HOUR", "DAY");
    for (size_t i = 0; i < q->n; i++) {
        const struct ctl_rstats *s = &q->r[i];
        char cell[3][64];
        for (int k = 0; k < 3; k++) {
            if (s->cap[k] > 0)
                snprintf(cell[k], sizeof(cell[k]), "%lld/%" PRId64 "%s", s->used[k], s->cap[k],
                         s->used[k] >= s->cap[k] ? " full" : "");
            else
                snprintf(cell[k], sizeof(cell[k]), "%lld/-", s->used[k]);
        }
        if (s->warmup_day > 0) {
            size_t l = strlen(cell[2]);
            snprintf(cell[2] + l, sizeof(cell[2]) - l, " (warm-up day %d)", s->warmup_day);
        }
        printf("%-*s  %-24s  %-24s  %s\n", nw, s->info.name, cell[0], cell[1], cell[2]);
    }

    /* Details only where there is something to say. */
    for (size_t i = 0; i < q->n; i++) {
        const struct ctl_rstats *s = &q->r[i];
        char d[32];
        if (s->breaker_bad) {
            printf("\n%s: breaker unreadable: \"%s\"", s->info.name, s->breaker_raw);
        } else if (s->brk.state == POLICY_BREAKER_OPEN) {
            int64_t at = ctl_probe_at(s);
            ctl_fmt_time(s->brk.since_ms, t, sizeof(t));
            printf("\n%s: breaker open since %s UTC (cause %s, tripped %u time%s); ",
                   s->info.name, t, policy_cause_name(s->brk.cause), s->brk.trips,
                   s->brk.trips == 1 ? "" : "s");
            if (at > q->now) {
                ctl_fmt_duration(at - q->now, d, sizeof(d));
                printf("probing starts in %s", d);
            } else {
                printf("cool-down over: probing starts at the next decision");
            }
        } else if (s->brk.state == POLICY_BREAKER_HALF_OPEN) {
            ctl_fmt_time(s->brk.since_ms, t, sizeof(t));
            printf("\n%s: breaker half open since %s UTC: probing (tripped %u time%s)",
                   s->info.name, t, s->brk.trips, s->brk.trips == 1 ? "" : "s");
        }
        if (s->have_health && !s->healthy) {
            ctl_fmt_time(s->health_t, t, sizeof(t));
            printf("\n%s: down since %s UTC (router %s): %s", s->info.name, t,
                   s->health_router[0] ? s->health_router : "?", s->why[0] ? s->why : "?");
        }
    }
    printf("\n");
}

static json_t *ctl_rate_json(double v, bool have)
{
    return have ? json_real(v) : json_null();
}

static void ctl_stats_json(const struct ctl_stats_info *q)
{
    long long total = ctl_total_delivered(q);
    json_t *o = json_object(), *routes = json_object();

    json_object_set_new(o, "now_ms", json_integer(q->now));
    json_object_set_new(o, "hours", json_integer(q->hours));
    json_object_set_new(o, "since_ms", json_integer((q->hour - q->hours + 1) * MS_HOUR));
    json_object_set_new(o, "split_default", ctl_json_string(q->split));
    for (size_t i = 0; i < q->n; i++) {
        const struct ctl_rstats *s = &q->r[i];
        json_t *e = json_object(), *rc = json_object(), *w = json_object(), *b, *h, *caps;
        long long sh = ctl_share(s->delivered, total);
        static const char *const cap_names[3] = {"minute", "hour", "day"};

        json_object_set_new(e, "transport", json_string(policy_transport_name(s->info.transport)));
        json_object_set_new(e, "enabled", json_boolean(s->info.enabled));
        json_object_set_new(e, "priority", json_integer(s->info.priority));

        json_object_set_new(rc, "delivered", json_integer(s->delivered));
        json_object_set_new(rc, "deferred", json_integer(s->deferred));
        json_object_set_new(rc, "bounced", json_integer(s->bounced));
        json_object_set_new(rc, "share", sh < 0 ? json_null() : json_real((double)sh / 10.0));
        json_object_set_new(e, "recipients", rc);

        json_object_set_new(w, "window_ms", json_integer(s->info.window_ms));
        json_object_set_new(w, "bucket_ms", json_integer(s->bucket_ms));
        json_object_set_new(w, "sent", json_integer((json_int_t)s->w.sent));
        json_object_set_new(w, "bounced", json_integer((json_int_t)s->w.bounced));
        json_object_set_new(w, "deferred", json_integer((json_int_t)s->w.deferred));
        json_object_set_new(w, "complained", json_integer((json_int_t)s->w.complained));
        json_object_set_new(w, "min_samples", json_integer(s->min_samples));
        json_object_set_new(w, "judged", json_boolean(ctl_judged(s)));
        for (int k = 0; k < RATE__COUNT; k++) {
            json_t *x = json_object();
            json_object_set_new(x, "rate",
                                ctl_rate_json((double)ctl_rate_count(&s->w, k) /
                                                  (double)(s->w.sent ? s->w.sent : 1),
                                              s->w.sent > 0));
            json_object_set_new(x, "max", json_real(s->max[k]));
            json_object_set_new(x, "over", json_boolean(ctl_over(s, k)));
            json_object_set_new(w, ctl_rate_names[k], x);
        }
        json_object_set_new(e, "window", w);

        b = json_object();
        json_object_set_new(b, "state", json_string(s->breaker_bad
                                                        ? "unreadable"
                                                        : policy_breaker_state_name(s->brk.state)));
        json_object_set_new(b, "since_ms", s->brk.since_ms > 0 ? json_integer(s->brk.since_ms)
                                                               : json_null());
        json_object_set_new(b, "cause", s->brk.cause != POLICY_CAUSE_NONE
                                            ? json_string(policy_cause_name(s->brk.cause))
                                            : json_null());
        json_object_set_new(b, "trips", json_integer(s->brk.trips));
        json_object_set_new(b, "probe_at_ms", s->brk.state == POLICY_BREAKER_OPEN
                                                  ? json_integer(ctl_probe_at(s))
                                                  : json_null());
        json_object_set_new(b, "raw", s->breaker_raw[0] ? ctl_json_string(s->breaker_raw)
                                                        : json_null());
        json_object_set_new(e, "breaker", b);

        if (s->have_health) {
            h = json_object();
            json_object_set_new(h, "healthy", json_boolean(s->healthy));
            json_object_set_new(h, "why", ctl_json_string(s->why));
            json_object_set_new(h, "since_ms", s->health_t > 0 ? json_integer(s->health_t)
                                                               : json_null());
            json_object_set_new(h, "router", ctl_json_string(s->health_router));
        } else {
            h = json_null();
        }
        json_object_set_new(e, "health", h);

        caps = json_object();
        for (int k = 0; k < 3; k++) {
            json_t *x = json_object();
            json_object_set_new(x, "used", json_integer(s->used[k]));
            json_object_set_new(x, "cap", s->cap[k] > 0 ? json_integer(s->cap[k]) : json_null());
            json_object_set_new(caps, cap_names[k], x);
        }
        json_object_set_new(caps, "warmup_day",
                            s->warmup_day > 0 ? json_integer(s->warmup_day) : json_null());
        json_object_set_new(e, "caps", caps);
        ctl_json_set(routes, s->info.name, e);
    }
    json_object_set_new(o, "routes", routes);
    json_object_set_new(o, "held", json_integer(q->held));
    ctl_json_print(o);
}

int ctl_stats(struct ctl *c, int hours)
{
    struct ctl_stats_info q;
    struct policy_config *pc;
    int rc;

    memset(&q, 0, sizeof(q));
    pc = ctl_policy_effective(c, &rc);
    if (pc == NULL)
        return rc;
    rc = ctl_redis_time(c, &q.now);
    if (rc == 0) {
        q.hours = hours;
        q.hour = q.now / MS_HOUR;
        q.n = policy_route_count(pc);
        q.r = xcalloc(q.n ? q.n : 1, sizeof(*q.r));
        for (size_t i = 0; i < q.n; i++)
            ctl_thresholds(pc, i, q.now, &q.r[i]);
        if (policy_config_get(pc, "split.default", q.split, sizeof(q.split)) != POLICY_OK)
            snprintf(q.split, sizeof(q.split), "none");
        rc = ctl_read_all(c, &q);
    }
    if (rc == 0) {
        if (c->json)
            ctl_stats_json(&q);
        else
            ctl_stats_text(&q);
    }
    for (size_t i = 0; i < q.n; i++) {
        free(q.r[i].why);
        free(q.r[i].health_router);
    }
    free(q.r);
    policy_config_free(pc);
    return rc;
}
