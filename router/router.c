#include "router/router.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "lib/log.h"
#include "lib/queue.h"
#include "lib/xmalloc.h"
#include "router/job.h"
#include "router/policy_load.h"

#define ROUTER_RETRY_READ_MS 500
#define ROUTER_PROMOTE_MS 500
#define ROUTER_DEPTH_MS 2000      /* queue depth gauges refresh */

/* One route's transport and the health this router last saw. */
struct router_route {
    const struct transport_ops *ops;
    struct transport *t;
    int healthy;
    char why[128];
    int reported;                 /* health written to Redis since start */
    int closed;
};

struct router {
    uv_loop_t *loop;
    const struct mf_config *cfg;
    struct store *store;
    struct queue *bounces;            /* writes DSNs into the queue */
    struct policy_config *base;       /* from the file */
    struct policy_config *live;       /* base + <prefix>policy */
    char live_sig[64];                /* FNV of the applied overrides */
    struct router_route *routes;
    size_t nroutes;
    struct store_route_snapshot *snap;   /* per route, last snapshot */
    int have_snapshot;

    struct job **jobs;
    size_t njobs, jobs_cap;
    int reading;
    int read_own_done;
    int claiming;
    int snapshotting;
    int depth_reading;
    struct router_metrics metrics;
    uv_timer_t t_read, t_claim, t_promote, t_snapshot, t_touch, t_depth;
    int timers_open;

    int closing;
    size_t transports_open;
    void (*done)(void *arg);
    void *done_arg;
};

static void router_read(struct router *r);
static void router_maybe_closed(struct router *r);
static void router_metrics_routes(struct router *r);
static void router_on_read_timer(uv_timer_t *t);

static int64_t router_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

struct store *router_store(struct router *r) { return r->store; }
const struct mf_config *router_config(struct router *r) { return r->cfg; }
uv_loop_t *router_loop(struct router *r) { return r->loop; }
const struct router_metrics *router_metrics(struct router *r) { return &r->metrics; }

/* ---- metrics ------------------------------------------------------------------ */

/* Delivery transactions: 10 ms to 5 minutes. */
static const double router_delivery_buckets[] = {
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
};

static void router_metrics_register(struct router_metrics *m)
{
    struct metrics *reg = metrics_default();

    m->decisions = metrics_counter(reg, "mailferry_routing_decisions_total",
                                   "Routing decisions for a destination domain's recipients of "
                                   "a message, by route (\"hold\" when held) and reason.",
                                   "route,reason");
    m->deliveries = metrics_counter(reg, "mailferry_deliveries_total",
                                    "Recipients' delivery attempt outcomes, by route, result "
                                    "(delivered, deferred, failed) and message class.",
                                    "route,result,class");
    m->delivery_seconds = metrics_histogram(reg, "mailferry_delivery_seconds",
                                            "Duration of one delivery transaction through a "
                                            "route's transport.", "route",
                                            router_delivery_buckets,
                                            sizeof(router_delivery_buckets) / sizeof(double));
    m->breaker = metrics_gauge(reg, "mailferry_breaker_state",
                               "Route-wide circuit breaker: 0 closed, 1 half open, 2 open.",
                               "route");
    m->healthy = metrics_gauge(reg, "mailferry_route_healthy",
                               "Whether the route's transport reports itself healthy (1) or "
                               "not (0).", "route");
    m->queue = metrics_gauge(reg, "mailferry_queue_messages",
                             "Messages in the shared queue by state (ready, inflight, retry, "
                             "dead), as this router last read them from Redis.", "state");
}

/* Breaker and health gauges of every route, from the last snapshot and
 * the health this router saw. */
static void router_metrics_routes(struct router *r)
{
    if (!r->have_snapshot)
        return;
    for (size_t i = 0; i < r->nroutes && i < policy_route_count(r->live); i++) {
        struct policy_route_info info;
        enum policy_breaker_state st = r->snap[i].breaker.state;

        policy_route_info(r->live, i, &info);
        metric_set(metric_labels(r->metrics.breaker, info.name),
                   st == POLICY_BREAKER_OPEN ? 2 : st == POLICY_BREAKER_HALF_OPEN ? 1 : 0);
        metric_set(metric_labels(r->metrics.healthy, info.name),
                   r->routes[i].healthy && !r->routes[i].closed);
    }
}

static void router_on_depth(const struct store_depth *d, int status, void *arg)
{
    struct router *r = arg;

    r->depth_reading = 0;
    if (r->closing) {
        router_maybe_closed(r);
        return;
    }
    if (status != 0)
        return;
    metric_set(metric_labels(r->metrics.queue, "ready"), (double)d->ready);
    metric_set(metric_labels(r->metrics.queue, "inflight"), (double)d->inflight);
    metric_set(metric_labels(r->metrics.queue, "retry"), (double)d->retry);
    metric_set(metric_labels(r->metrics.queue, "dead"), (double)d->dead);
}

static void router_on_depth_timer(uv_timer_t *t)
{
    struct router *r = t->data;

    if (r->closing || r->depth_reading || !store_ready(r->store))
        return;
    r->depth_reading = 1;
    store_depth(r->store, router_on_depth, r);
}

/* ---- configuration ---------------------------------------------------------- */

/* Creates every route's transport on loop. */
static int router_make_transports(uv_loop_t *loop, const struct policy_config *pc,
                                  const struct policy_load_route_keys *kv,
                                  struct router_route *routes, char *err, size_t errlen)
{
    for (size_t i = 0; i < policy_route_count(pc); i++) {
        struct policy_route_info info;
        const char *tname;
        char why[512];

        policy_route_info(pc, i, &info);
        tname = policy_transport_name(info.transport);
        routes[i].ops = transport_find(tname);
        if (routes[i].ops == NULL) {
            snprintf(err, errlen, "[route %s] transport: \"%s\" is not available in this build",
                     info.name, tname);
            return -1;
        }
        routes[i].t = routes[i].ops->create(loop, info.name, kv[i].v, kv[i].n, why, sizeof(why));
        if (routes[i].t == NULL) {
            snprintf(err, errlen, "[route %s] %s", info.name, why);
            return -1;
        }
        routes[i].healthy = 1;
    }
    return 0;
}

static void router_count_closed(void *arg)
{
    size_t *left = arg;
    (*left)--;
}

int router_check(const struct mf_config *cfg, char *err, size_t errlen)
{
    struct policy_load_route_keys *kv = NULL;
    struct policy_config *pc = policy_load(cfg, &kv, err, errlen);
    struct router_route *routes;
    uv_loop_t loop;
    size_t n, left = 0;
    int rc;

    if (pc == NULL)
        return -1;
    n = policy_route_count(pc);
    routes = xcalloc(n ? n : 1, sizeof(*routes));
    uv_loop_init(&loop);
    rc = router_make_transports(&loop, pc, kv, routes, err, errlen);
    for (size_t i = 0; i < n; i++) {
        if (routes[i].t) {
            left++;
            routes[i].ops->close(routes[i].t, router_count_closed, &left);
        }
    }
    while (left > 0 && uv_run(&loop, UV_RUN_ONCE))
        ;
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    free(routes);
    policy_load_keys_free(kv, n);
    policy_config_free(pc);
    return rc;
}

/* ---- jobs ---------------------------------------------------------------- */

static void router_start_entries(struct router *r, struct store_entry *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (v[i].msg_id[0] == '\0') {
            /* The entry's fields are gone (trimmed); nothing to route. */
            store_ack(r->store, v[i].stream_id);
            continue;
        }
        /* A claim may return an entry this router is already working on. */
        int busy = 0;
        for (size_t k = 0; k < r->njobs && !busy; k++)
            busy = strcmp(job_stream_id(r->jobs[k]), v[i].stream_id) == 0;
        if (busy)
            continue;
        if (r->njobs == r->jobs_cap) {
            r->jobs_cap = r->jobs_cap ? r->jobs_cap * 2 : 64;
            r->jobs = xrealloc(r->jobs, r->jobs_cap * sizeof(*r->jobs));
        }
        /* job_start() never calls back before it returns. */
        r->jobs[r->njobs++] = job_start(r, &v[i]);
    }
}

void router_job_done(struct router *r, void *job)
{
    for (size_t i = 0; i < r->njobs; i++) {
        if (r->jobs[i] == job) {
            r->jobs[i] = r->jobs[--r->njobs];
            break;
        }
    }
    if (r->closing)
        router_maybe_closed(r);
    else
        router_read(r);
}

static size_t router_room(const struct router *r)
{
    size_t max = (size_t)r->cfg->router.concurrency;
    return r->njobs >= max ? 0 : max - r->njobs;
}

/* ---- reading -------------------------------------------------------------- */

static void router_on_read(struct store_entry *v, size_t n, int status, void *arg)
{
    struct router *r = arg;

    r->reading = 0;
    if (r->closing) {
        router_maybe_closed(r);
        return;
    }
    if (status != 0) {
        uv_timer_start(&r->t_read, router_on_read_timer, ROUTER_RETRY_READ_MS, 0);
        return;
    }
    if (!r->read_own_done) {
        r->read_own_done = 1;
        if (n > 0)
            log_info("event=resume_own_pending count=%zu", n);
    }
    router_start_entries(r, v, n);
    router_read(r);
}

static void router_on_read_timer(uv_timer_t *t)
{
    router_read(t->data);
}

/* Keeps one stream read outstanding while there is room for more jobs.
 * The first read takes this consumer's own unacknowledged entries (a
 * restart after a crash resumes them at once). */
static void router_read(struct router *r)
{
    size_t room = router_room(r);

    if (r->closing || r->reading || room == 0)
        return;
    if (!store_ready(r->store) || !r->have_snapshot) {
        uv_timer_start(&r->t_read, router_on_read_timer, ROUTER_RETRY_READ_MS, 0);
        return;
    }
    if (room > (size_t)r->cfg->router.batch)
        room = (size_t)r->cfg->router.batch;
    r->reading = 1;
    store_read(r->store, (int)room, 1000, !r->read_own_done, router_on_read, r);
}

static void router_on_claimed(struct store_entry *v, size_t n, int status, void *arg)
{
    struct router *r = arg;

    r->claiming = 0;
    if (r->closing) {
        router_maybe_closed(r);
        return;
    }
    if (status != 0)
        return;
    if (n > 0)
        log_info("event=claimed count=%zu idle_s=%d", n, r->cfg->router.claim_idle);
    router_start_entries(r, v, n);
}

static void router_on_claim_timer(uv_timer_t *t)
{
    struct router *r = t->data;
    size_t room = router_room(r);

    if (r->closing || r->claiming || room == 0 || !store_ready(r->store) || !r->have_snapshot)
        return;
    r->claiming = 1;
    store_claim(r->store, (int)(room > 100 ? 100 : room), router_on_claimed, r);
}

static void router_on_promote_timer(uv_timer_t *t)
{
    struct router *r = t->data;

    if (!r->closing && store_ready(r->store))
        store_promote(r->store, router_now());
}

/* Heartbeat: keeps the idle time of our entries low, so that no other
 * router claims a message this one is still delivering. */
static void router_on_touch_timer(uv_timer_t *t)
{
    struct router *r = t->data;
    const char **ids;

    if (r->njobs == 0 || !store_ready(r->store))
        return;
    ids = xcalloc(r->njobs, sizeof(char *));
    for (size_t i = 0; i < r->njobs; i++)
        ids[i] = job_stream_id(r->jobs[i]);
    store_touch(r->store, ids, r->njobs);
    free(ids);
}

/* ---- snapshot, live policy, breakers, health ------------------------------------ */

static uint64_t router_fnv(uint64_t h, const char *s)
{
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return (h ^ 0xff) * 1099511628211ULL;
}

/* Applies the live overrides on a copy of the file's policy. A rejected
 * key keeps the previous policy in force (mailferryctl validates before it
 * writes, so this only happens when Redis was written by hand). */
static void router_apply_policy(struct router *r, const struct store_snapshot *sn)
{
    uint64_t h = 1469598103934665603ULL;
    char sig[64], why[512];
    struct policy_config *pc;

    for (size_t i = 0; i < sn->npolicy; i++) {
        h = router_fnv(h, sn->policy_keys[i]);
        h = router_fnv(h, sn->policy_values[i]);
    }
    snprintf(sig, sizeof(sig), "%016" PRIx64 ":%zu", h, sn->npolicy);
    if (strcmp(sig, r->live_sig) == 0)
        return;
    snprintf(r->live_sig, sizeof(r->live_sig), "%s", sig);
    pc = policy_config_clone(r->base);
    for (size_t i = 0; i < sn->npolicy; i++) {
        if (policy_config_set(pc, sn->policy_keys[i], sn->policy_values[i], why, sizeof(why)) !=
            POLICY_OK) {
            char q[600];
            log_error("event=policy_rejected key=%s reason=%s", sn->policy_keys[i],
                      log_quote(q, sizeof(q), why, strlen(why)));
            policy_config_free(pc);
            return;
        }
    }
    if (policy_config_check(pc, why, sizeof(why)) != POLICY_OK) {
        char q[600];
        log_error("event=policy_rejected reason=%s", log_quote(q, sizeof(q), why, strlen(why)));
        policy_config_free(pc);
        return;
    }
    policy_config_free(r->live);
    r->live = pc;
    log_info("event=policy_applied overrides=%zu", sn->npolicy);
}

/* Persists a breaker transition (compare-and-set: one router wins). */
static void router_breaker_step(struct router *r, size_t i, const char *domain,
                                const struct policy_breaker *cur, const char *cur_raw,
                                const struct policy_window *w)
{
    struct policy_breaker next;
    enum policy_transition tr;
    char raw[160];
    struct policy_route_info info;

    if (i >= policy_route_count(r->live))
        return;
    policy_route_info(r->live, i, &info);
    tr = policy_breaker_step(r->live, i, domain ? POLICY_SCOPE_DOMAIN : POLICY_SCOPE_ROUTE, cur,
                             w, router_now(), &next);
    if (tr == POLICY_T_NONE)
        return;
    policy_breaker_format(&next, raw, sizeof(raw));
    log_warn("event=breaker route=%s%s%s transition=%s cause=%s sent=%" PRIu64
             " bounced=%" PRIu64 " deferred=%" PRIu64 " complained=%" PRIu64
             " probe_ok=%" PRIu64 " probe_bad=%" PRIu64,
             info.name, domain ? " domain=" : "", domain ? domain : "",
             policy_transition_name(tr), policy_cause_name(next.cause), w->sent, w->bounced,
             w->deferred, w->complained, w->probe_ok, w->probe_bad);
    store_breaker_cas(r->store, info.name, domain, cur_raw, raw);
    /* Act on the transition at once rather than at the next snapshot. If
     * another router won the compare-and-set, the snapshot corrects it. */
    if (domain == NULL && i < r->nroutes) {
        r->snap[i].breaker = next;
        snprintf(r->snap[i].breaker_raw, sizeof(r->snap[i].breaker_raw), "%s", raw);
        router_metrics_routes(r);
    }
}

struct router_halfopen_req {
    struct router *r;
    size_t i;
    struct policy_breaker b;
    char raw[160];
};

static void router_on_halfopen_window(const struct policy_window *w, int status, void *arg)
{
    struct router_halfopen_req *q = arg;

    if (status == 0 && !q->r->closing)
        router_breaker_step(q->r, q->i, NULL, &q->b, q->raw, w);
    free(q);
}

/*
 * Route i's transport just turned unhealthy and asks for its breaker to
 * open (transport_ops.health_opens_breaker): open it now, so that the
 * route takes traffic back through half-open probes once it is healthy
 * again. Persisted like any transition (compare-and-set on the breaker
 * this router last read).
 */
static void router_health_trip(struct router *r, size_t i, const char *why)
{
    struct policy_breaker next;
    struct policy_route_info info;
    enum policy_transition tr;
    char raw[160], q[300];

    if (!r->have_snapshot || i >= policy_route_count(r->live))
        return;
    tr = policy_breaker_trip(r->live, i, &r->snap[i].breaker, POLICY_CAUSE_HEALTH, router_now(),
                             &next);
    if (tr == POLICY_T_NONE)
        return;
    policy_route_info(r->live, i, &info);
    policy_breaker_format(&next, raw, sizeof(raw));
    log_warn("event=breaker route=%s transition=%s cause=health cooldown_ms=%" PRId64
             " reason=%s", info.name, policy_transition_name(tr), next.cooldown_ms,
             log_quote(q, sizeof(q), why, strlen(why)));
    store_breaker_cas(r->store, info.name, NULL, r->snap[i].breaker_raw, raw);
    r->snap[i].breaker = next;
    snprintf(r->snap[i].breaker_raw, sizeof(r->snap[i].breaker_raw), "%s", raw);
}

static void router_update_health(struct router *r)
{
    int64_t now = router_now();

    for (size_t i = 0; i < r->nroutes; i++) {
        struct router_route *rt = &r->routes[i];
        char why[128] = "";
        struct policy_route_info info;
        int h;

        if (rt->t == NULL || rt->closed)
            continue;
        h = rt->ops->health(rt->t, why, sizeof(why));
        /* The first check is always recorded, so that health:<route> does
         * not keep what a previous life of the router saw. */
        if (rt->reported && h == rt->healthy && strcmp(why, rt->why) == 0)
            continue;
        policy_route_info(r->live, i, &info);
        if (h != rt->healthy)
            log_warn("event=route_health route=%s healthy=%s reason=\"%s\"", info.name,
                     h ? "yes" : "no", why);
        /* Only a change this router saw trips the breaker: a route found
         * unhealthy at start (not checked yet) has not failed. */
        if (rt->reported && rt->healthy && !h && rt->ops->health_opens_breaker)
            router_health_trip(r, i, why);
        rt->reported = 1;
        rt->healthy = h;
        snprintf(rt->why, sizeof(rt->why), "%s", why);
        store_health(r->store, info.name, h, why, now);
    }
    router_metrics_routes(r);
}

static void router_on_snapshot(struct store_snapshot *sn, int status, void *arg)
{
    struct router *r = arg;

    r->snapshotting = 0;
    if (r->closing) {
        store_snapshot_free(sn);
        router_maybe_closed(r);
        return;
    }
    if (status != 0 || sn == NULL) {
        store_snapshot_free(sn);
        return;
    }
    router_apply_policy(r, sn);
    if (sn->nroutes == r->nroutes) {
        memcpy(r->snap, sn->routes, r->nroutes * sizeof(*r->snap));
        r->have_snapshot = 1;
        for (size_t i = 0; i < r->nroutes; i++) {
            struct store_route_snapshot *rs = &r->snap[i];
            if (rs->breaker.state == POLICY_BREAKER_HALF_OPEN) {
                struct router_halfopen_req *q = xcalloc(1, sizeof(*q));
                struct policy_route_info info;
                policy_route_info(r->live, i, &info);
                q->r = r;
                q->i = i;
                q->b = rs->breaker;
                snprintf(q->raw, sizeof(q->raw), "%s", rs->breaker_raw);
                store_window(r->store, info.name, NULL, info.window_ms, rs->breaker.since_ms,
                             router_now(), router_on_halfopen_window, q);
            } else {
                router_breaker_step(r, i, NULL, &rs->breaker, rs->breaker_raw, &rs->window);
            }
        }
    }
    store_snapshot_free(sn);
    router_update_health(r);
    router_read(r);
}

static void router_on_snapshot_timer(uv_timer_t *t)
{
    struct router *r = t->data;

    if (r->closing || r->snapshotting || !store_ready(r->store))
        return;
    r->snapshotting = 1;
    store_snapshot(r->store, r->base, router_now(), router_on_snapshot, r);
}

/* ---- decisions --------------------------------------------------------------- */

struct router_choose_req {
    struct router *r;
    char domain[256];
    char sender_domain[256];
    char cls[64];
    uint64_t size;
    uint32_t n;
    uint32_t attempts;
    double rnd;
    int tries;
    struct policy_route_state *st;
    struct store_domain_state *dom;
    size_t nroutes;
    struct policy_decision d;
    router_choice_cb cb;
    void *arg;
};

static void router_choose_free(struct router_choose_req *q)
{
    free(q->st);
    free(q->dom);
    free(q);
}

/* A number in [0, 1) from the queue id (FNV-1a), so that retries of a
 * message fall on the same side of a split. */
static double router_rnd(const char *id)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *id; id++)
        h = (h ^ (unsigned char)*id) * 1099511628211ULL;
    return (double)(h >> 11) / 9007199254740992.0;
}

static void router_choice_fill(struct router_choose_req *q, struct router_choice *c)
{
    struct router *r = q->r;

    memset(c, 0, sizeof(*c));
    c->route = q->d.route;
    snprintf(c->reason, sizeof(c->reason), "%s", q->d.text);
    c->retry_at_ms = q->d.retry_at_ms;
    if (q->d.route == POLICY_HOLD) {
        snprintf(c->route_name, sizeof(c->route_name), "hold");
        return;
    }
    struct policy_route_info info;
    size_t i = (size_t)q->d.route;
    policy_route_info(r->live, i, &info);
    snprintf(c->route_name, sizeof(c->route_name), "%s", info.name);
    c->window_ms = info.window_ms;
    c->ops = r->routes[i].ops;
    c->transport = r->routes[i].t;
    c->probe_route = q->d.probe_route;
    c->probe_domain = q->d.probe_domain;
    c->probe_route_since = q->st[i].breaker.since_ms;
    c->probe_domain_since = q->st[i].domain_breaker.since_ms;
    c->throttle = q->st[i].throttle;
    c->domain_breaker = q->st[i].domain_breaker;
    if (q->dom)
        snprintf(c->domain_breaker_raw, sizeof(c->domain_breaker_raw), "%s",
                 q->dom[i].breaker_raw);
}

static void router_decide(struct router_choose_req *q);

static void router_on_reserve(int ok, const struct policy_counts *rc,
                              const struct policy_counts *dc, int status, void *arg)
{
    struct router_choose_req *q = arg;
    struct router_choice c;

    if (status != 0) {
        memset(&c, 0, sizeof(c));
        q->cb(&c, -1, q->arg);
        router_choose_free(q);
        return;
    }
    if (ok) {
        router_choice_fill(q, &c);
        metric_inc(metric_labels(q->r->metrics.decisions, c.route_name,
                                 policy_reason_name(q->d.reason)));
        q->cb(&c, 0, q->arg);
        router_choose_free(q);
        return;
    }
    /* Another router spent the cap first: decide again with the exact
     * counts, which sends this group to the overflow route. */
    q->st[q->d.route].sent = *rc;
    q->st[q->d.route].domain_sent = *dc;
    router_decide(q);
}

static void router_decide(struct router_choose_req *q)
{
    struct router *r = q->r;
    struct policy_state st = {q->st, q->nroutes};
    struct policy_msg m;
    struct router_choice c;
    struct policy_caps caps;
    int64_t now = router_now();

    memset(&m, 0, sizeof(m));
    m.sender_domain = q->sender_domain;
    m.rcpt_domain = q->domain;
    m.msg_class = q->cls;
    m.size = q->size;
    m.nrcpt = q->n;
    m.attempts = q->attempts;
    if (q->nroutes != policy_route_count(r->live) ||
        policy_decide(r->live, &st, &m, q->rnd, now, &q->d) != 0 ||
        ++q->tries > (int)q->nroutes + 2) {
        memset(&q->d, 0, sizeof(q->d));
        q->d.route = POLICY_HOLD;
        q->d.reason = POLICY_R_HOLD_NO_ROUTE;
        snprintf(q->d.text, sizeof(q->d.text), "%s", policy_reason_name(POLICY_R_HOLD_NO_ROUTE));
    }
    if (q->d.route == POLICY_HOLD) {
        router_choice_fill(q, &c);
        metric_inc(metric_labels(r->metrics.decisions, c.route_name,
                                 policy_reason_name(q->d.reason)));
        q->cb(&c, 0, q->arg);
        router_choose_free(q);
        return;
    }
    struct policy_route_info info;
    policy_route_info(r->live, (size_t)q->d.route, &info);
    policy_route_caps(r->live, (size_t)q->d.route, q->domain, now, &caps);
    store_reserve(r->store, info.name, q->domain, now, q->n, &caps, router_on_reserve, q);
}

static void router_on_domain(struct store_domain_state *v, size_t n, int status, void *arg)
{
    struct router_choose_req *q = arg;
    struct router *r = q->r;

    if (status != 0 || n != r->nroutes) {
        struct router_choice c;
        memset(&c, 0, sizeof(c));
        q->cb(&c, -1, q->arg);
        router_choose_free(q);
        return;
    }
    q->nroutes = n;
    q->st = xcalloc(n ? n : 1, sizeof(*q->st));
    q->dom = xcalloc(n ? n : 1, sizeof(*q->dom));
    memcpy(q->dom, v, n * sizeof(*v));
    for (size_t i = 0; i < n; i++) {
        q->st[i].healthy = r->routes[i].healthy && !r->routes[i].closed;
        q->st[i].sent = r->snap[i].sent;
        q->st[i].breaker = r->snap[i].breaker;
        q->st[i].domain_sent = v[i].sent;
        q->st[i].domain_breaker = v[i].breaker;
        q->st[i].throttle = v[i].throttle;
    }
    router_decide(q);
}

void router_choose(struct router *r, const struct store_msg *m, const char *domain, uint32_t n,
                   router_choice_cb cb, void *arg)
{
    struct router_choose_req *q = xcalloc(1, sizeof(*q));
    const char *at = strrchr(m->from, '@');

    q->r = r;
    q->cb = cb;
    q->arg = arg;
    q->n = n;
    q->size = m->len;
    q->attempts = (uint32_t)m->attempts;
    q->rnd = router_rnd(m->id);
    snprintf(q->domain, sizeof(q->domain), "%s", domain);
    snprintf(q->sender_domain, sizeof(q->sender_domain), "%s", at ? at + 1 : "");
    snprintf(q->cls, sizeof(q->cls), "%s", m->cls);
    store_domain(r->store, r->live, domain, router_now(), router_on_domain, q);
}

/* A pinned group skips the policy's choice of route but not its limits:
 * the route must be enabled and healthy, and the caps are reserved. */
struct router_later {
    uv_timer_t timer;
    struct router_choice c;
    router_choice_cb cb;
    void *arg;
};

static void router_later_closed(uv_handle_t *h)
{
    free(h->data);
}

static void router_later_fire(uv_timer_t *t)
{
    struct router_later *l = t->data;

    l->cb(&l->c, 0, l->arg);
    uv_close((uv_handle_t *)&l->timer, router_later_closed);
}

/* Answers a choice from the loop, never from inside the caller's call. */
static void router_answer_later(struct router *r, const struct router_choice *c,
                                router_choice_cb cb, void *arg)
{
    struct router_later *l = xcalloc(1, sizeof(*l));

    l->c = *c;
    l->cb = cb;
    l->arg = arg;
    uv_timer_init(r->loop, &l->timer);
    l->timer.data = l;
    uv_timer_start(&l->timer, router_later_fire, 0, 0);
}

void router_choose_pinned(struct router *r, const struct store_msg *m, const char *domain,
                          uint32_t n, const char *route, router_choice_cb cb, void *arg)
{
    struct router_choose_req *q = xcalloc(1, sizeof(*q));
    struct policy_route_info info;
    struct policy_caps caps;
    int i = policy_route_find(r->live, route);
    int64_t now = router_now();

    q->r = r;
    q->cb = cb;
    q->arg = arg;
    q->n = n;
    snprintf(q->domain, sizeof(q->domain), "%s", domain);
    q->nroutes = r->nroutes;
    q->st = xcalloc(r->nroutes ? r->nroutes : 1, sizeof(*q->st));
    q->tries = (int)r->nroutes + 2;   /* a spent cap holds instead of overflowing */
    memset(&q->d, 0, sizeof(q->d));
    if (i >= 0)
        policy_route_info(r->live, (size_t)i, &info);
    if (i < 0 || !info.enabled || !r->routes[i].healthy || r->routes[i].closed) {
        struct router_choice c;
        q->d.route = POLICY_HOLD;
        q->d.reason = POLICY_R_HOLD_STRICT;
        snprintf(q->d.text, sizeof(q->d.text), "hold:pinned:%s", route);
        router_choice_fill(q, &c);
        router_answer_later(r, &c, cb, arg);
        router_choose_free(q);
        return;
    }
    q->d.route = i;
    q->d.reason = POLICY_R_PIN_RCPT;
    snprintf(q->d.text, sizeof(q->d.text), "pinned:ambiguous");
    policy_route_caps(r->live, (size_t)i, domain, now, &caps);
    store_reserve(r->store, info.name, domain, now, n, &caps, router_on_reserve, q);
}

/* ---- after an outcome ------------------------------------------------------------ */

struct router_domwin_req {
    struct router *r;
    size_t i;
    char domain[256];
    struct policy_breaker b;
    char raw[160];
};

static void router_on_domain_window(const struct policy_window *w, int status, void *arg)
{
    struct router_domwin_req *q = arg;

    if (status == 0 && !q->r->closing)
        router_breaker_step(q->r, q->i, q->domain, &q->b, q->raw, w);
    free(q);
}

void router_outcome(struct router *r, const struct router_choice *c, const char *domain,
                    const struct transport_result *res)
{
    int64_t now = router_now();
    int throttled = 0;
    struct policy_route_info info;
    size_t i;

    if (c->route < 0 || (size_t)c->route >= policy_route_count(r->live))
        return;
    i = (size_t)c->route;
    policy_route_info(r->live, i, &info);
    for (size_t k = 0; k < res->nrcpts && !throttled; k++) {
        const struct transport_rcpt_result *rr = &res->rcpt[k];
        throttled = policy_classify_reply(r->live, rr->code, rr->enhanced, rr->text) ==
                    POLICY_REPLY_THROTTLE;
    }
    /* Destination throttling: a "slow down" reply puts the domain into
     * backoff on this route. */
    if (throttled && domain[0]) {
        struct policy_throttle next;
        policy_throttle_hit(r->live, i, &c->throttle, now, &next);
        if (next.until_ms != c->throttle.until_ms) {
            log_warn("event=throttle route=%s domain=%s level=%u backoff_s=%" PRId64, info.name,
                     domain, next.level, (next.until_ms - now) / 1000);
            store_throttle_set(r->store, info.name, domain, &next, now);
        }
    }
    /* A transport failure (cannot connect, auth refused) moves traffic at
     * once: ask the transport now rather than at the next snapshot. */
    if (res->transport_failure)
        router_update_health(r);
    if (info.domain_breaker && domain[0]) {
        struct router_domwin_req *q = xcalloc(1, sizeof(*q));
        q->r = r;
        q->i = i;
        snprintf(q->domain, sizeof(q->domain), "%s", domain);
        q->b = c->domain_breaker;
        snprintf(q->raw, sizeof(q->raw), "%s", c->domain_breaker_raw);
        store_window(r->store, info.name, domain, info.window_ms, c->domain_breaker.since_ms, now,
                     router_on_domain_window, q);
    }
}

/* ---- bounces --------------------------------------------------------------------- */

struct router_bounce_req {
    void (*cb)(int status, void *arg);
    void *arg;
};

static void router_on_bounce_queued(int status, const char *err, void *arg)
{
    struct router_bounce_req *q = arg;

    if (status != 0)
        log_warn("event=bounce_enqueue_failed reason=\"%s\"", err ? err : "?");
    q->cb(status == 0 ? 0 : -1, q->arg);
    free(q);
}

void router_enqueue_bounce(struct router *r, const char *rcpt, const char *data, size_t len,
                           void (*cb)(int status, void *arg), void *arg)
{
    struct router_bounce_req *q = xcalloc(1, sizeof(*q));
    struct queue_msg m;
    char id[QUEUE_ID_LEN + 1];
    const char *rcpts[1] = {rcpt};

    q->cb = cb;
    q->arg = arg;
    memset(&m, 0, sizeof(m));
    m.from = "";
    m.rcpts = rcpts;
    m.nrcpts = 1;
    m.data = data;
    m.datalen = len;
    m.client_ip = "";
    m.helo = r->cfg->router.hostname;
    queue_id_new(id);
    queue_enqueue(r->bounces, id, &m, router_on_bounce_queued, q);
}

/* ---- life cycle ---------------------------------------------------------------------- */

static void router_timer_init(struct router *r, uv_timer_t *t)
{
    uv_timer_init(r->loop, t);
    t->data = r;
    r->timers_open++;
}

struct router *router_new(uv_loop_t *loop, const struct mf_config *cfg, char *err,
                          size_t errlen)
{
    struct router *r = xcalloc(1, sizeof(*r));
    struct policy_load_route_keys *kv = NULL;
    uint64_t claim_ms, touch_ms;

    r->loop = loop;
    r->cfg = cfg;
    r->base = policy_load(cfg, &kv, err, errlen);
    if (r->base == NULL) {
        free(r);
        return NULL;
    }
    r->nroutes = policy_route_count(r->base);
    r->routes = xcalloc(r->nroutes ? r->nroutes : 1, sizeof(*r->routes));
    r->snap = xcalloc(r->nroutes ? r->nroutes : 1, sizeof(*r->snap));
    if (router_make_transports(loop, r->base, kv, r->routes, err, errlen) != 0) {
        /* Fatal at start: the process exits, the loop is not run. */
        policy_load_keys_free(kv, r->nroutes);
        return NULL;
    }
    policy_load_keys_free(kv, r->nroutes);
    r->live = policy_config_clone(r->base);
    router_metrics_register(&r->metrics);
    r->store = store_new(loop, cfg);
    r->bounces = queue_new(loop, cfg);

    router_timer_init(r, &r->t_read);
    router_timer_init(r, &r->t_claim);
    router_timer_init(r, &r->t_promote);
    router_timer_init(r, &r->t_snapshot);
    router_timer_init(r, &r->t_touch);
    router_timer_init(r, &r->t_depth);
    claim_ms = (uint64_t)cfg->router.claim_idle * 1000 / 4;
    if (claim_ms < 250)
        claim_ms = 250;
    if (claim_ms > 5000)
        claim_ms = 5000;
    touch_ms = (uint64_t)cfg->router.claim_idle * 1000 / 3;
    if (touch_ms < 200)
        touch_ms = 200;
    uv_timer_start(&r->t_snapshot, router_on_snapshot_timer, 0, (uint64_t)cfg->router.policy_refresh);
    uv_timer_start(&r->t_claim, router_on_claim_timer, claim_ms, claim_ms);
    uv_timer_start(&r->t_promote, router_on_promote_timer, ROUTER_PROMOTE_MS, ROUTER_PROMOTE_MS);
    uv_timer_start(&r->t_touch, router_on_touch_timer, touch_ms, touch_ms);
    uv_timer_start(&r->t_depth, router_on_depth_timer, 250, ROUTER_DEPTH_MS);
    uv_timer_start(&r->t_read, router_on_read_timer, 50, 0);
    log_info("event=router_start consumer=%s routes=%zu concurrency=%d claim_idle=%d",
             cfg->router.consumer ? cfg->router.consumer : "(default)", r->nroutes,
             cfg->router.concurrency, cfg->router.claim_idle);
    return r;
}

/* Two policies have the same routes, in the same order, with the same
 * transports. */
static int router_same_routes(const struct policy_config *a, const struct policy_config *b)
{
    if (policy_route_count(a) != policy_route_count(b))
        return 0;
    for (size_t i = 0; i < policy_route_count(a); i++) {
        struct policy_route_info ia, ib;
        policy_route_info(a, i, &ia);
        policy_route_info(b, i, &ib);
        if (strcmp(ia.name, ib.name) != 0 || ia.transport != ib.transport)
            return 0;
    }
    return 1;
}

int router_reload(struct router *r, const char *path)
{
    struct mf_config cfg;
    struct policy_config *pc;
    char err[1024], q[1100];

    if (config_load(&cfg, path, err, sizeof(err)) != 0) {
        log_error("event=reload role=router result=fail reason=%s",
                  log_quote(q, sizeof(q), err, strlen(err)));
        return -1;
    }
    pc = policy_load(&cfg, NULL, err, sizeof(err));
    config_free(&cfg);
    if (pc == NULL) {
        log_error("event=reload role=router result=fail reason=%s",
                  log_quote(q, sizeof(q), err, strlen(err)));
        return -1;
    }
    if (!router_same_routes(r->base, pc)) {
        log_error("event=reload role=router result=fail reason=\"routes or transports changed; "
                  "restart the router to apply\"");
        policy_config_free(pc);
        return -1;
    }
    policy_config_free(r->base);
    r->base = pc;
    /* The current live policy stays in force until the next snapshot
     * (within policy_refresh) rebuilds it from the new base and the live
     * overrides, so overrides never lapse. */
    r->live_sig[0] = '\0';
    log_info("event=reload role=router result=ok routes=%zu", policy_route_count(pc));
    return 0;
}

static void router_timer_closed(uv_handle_t *h)
{
    struct router *r = h->data;

    r->timers_open--;
    router_maybe_closed(r);
}

static void router_store_closed(void *arg)
{
    struct router *r = arg;
    void (*done)(void *) = r->done;
    void *done_arg = r->done_arg;

    policy_config_free(r->base);
    policy_config_free(r->live);
    free(r->routes);
    free(r->snap);
    free(r->jobs);
    free(r);
    if (done)
        done(done_arg);
}

static void router_bounces_closed(void *arg)
{
    struct router *r = arg;

    store_close(r->store, router_store_closed, r);
}

static void router_transport_closed(void *arg)
{
    struct router *r = arg;

    r->transports_open--;
    router_maybe_closed(r);
}

/* The last step of the shutdown: once no job, transport, read or timer is
 * left, close the Redis connections. */
static void router_maybe_closed(struct router *r)
{
    if (!r->closing || r->njobs > 0 || r->transports_open > 0 || r->timers_open > 0 ||
        r->reading || r->claiming || r->snapshotting || r->depth_reading ||
        r->bounces == NULL)
        return;
    struct queue *q = r->bounces;
    r->bounces = NULL;
    queue_close(q, router_bounces_closed, r);
}

void router_shutdown(struct router *r, void (*done)(void *arg), void *arg)
{
    uv_timer_t *timers[] = {&r->t_read, &r->t_claim, &r->t_promote, &r->t_snapshot, &r->t_touch,
                            &r->t_depth};

    if (r->closing)
        return;
    r->closing = 1;
    r->done = done;
    r->done_arg = arg;
    log_info("event=router_shutdown jobs=%zu", r->njobs);
    for (size_t i = 0; i < sizeof(timers) / sizeof(timers[0]); i++)
        uv_close((uv_handle_t *)timers[i], router_timer_closed);
    /* Closing a transport fails what it has in flight with temporary
     * results; the jobs record them and schedule retries. */
    for (size_t i = 0; i < r->nroutes; i++) {
        if (r->routes[i].t == NULL)
            continue;
        r->routes[i].closed = 1;
        r->transports_open++;
        r->routes[i].ops->close(r->routes[i].t, router_transport_closed, r);
    }
}
