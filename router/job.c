#include "router/job.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/xmalloc.h"
#include "router/dsn.h"

/* One destination domain's recipients within the message: one routing
 * decision, one transaction. */
struct job_group {
    struct job *job;
    char domain[256];
    size_t *idx;                 /* recipient indexes in the message */
    const char **addrs;          /* their addresses, for the transport */
    size_t n;
    struct router_choice choice;
    int64_t started;
    int64_t due;                 /* held: when to try again */
    int attempted;               /* handed to a transport */
    char pin[POLICY_ROUTE_NAME_MAX + 8];  /* the recipients' pinned route */
    int64_t retry_after_ms;      /* the peer's "not before" (Retry-After) */
    char provider_id[128];
};

struct job {
    struct router *r;
    struct store_entry e;
    struct store_msg *m;
    struct job_group *g;
    size_t ng;
    size_t left;                 /* groups not done yet */
    int aborted;                 /* a Redis write failed: leave the entry */
    int expired;
    char dead[160];              /* reason for <prefix>dead, "" for none */
    size_t *bounce_idx;          /* failures reported by the DSN in flight */
    size_t nbounce;
};

static void job_finalize(struct job *j);
static void job_end(struct job *j);

static int64_t job_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

const char *job_stream_id(const struct job *j)
{
    return j->e.stream_id;
}

static int job_pending(const struct store_rcpt *r)
{
    return r->state == STORE_RCPT_PENDING || r->state == STORE_RCPT_DEFERRED;
}

/* The domain of an address in lower case ("" for a bare Postmaster). */
static void job_domain(const char *addr, char *out, size_t n)
{
    const char *at = strrchr(addr, '@');
    size_t i = 0;

    if (at)
        for (at++; *at && i + 1 < n; at++)
            out[i++] = (char)tolower((unsigned char)*at);
    out[i] = '\0';
}

static void job_group_free(struct job_group *g)
{
    free(g->idx);
    free(g->addrs);
}

static void job_end(struct job *j)
{
    router_job_done(j->r, j);
    for (size_t i = 0; i < j->ng; i++)
        job_group_free(&j->g[i]);
    free(j->g);
    free(j->bounce_idx);
    store_msg_free(j->m);
    free(j);
}

static void job_group_done(struct job_group *g)
{
    struct job *j = g->job;

    if (--j->left == 0)
        job_finalize(j);
}

/* ---- outcome of one group ---------------------------------------------------- */

static void job_on_recorded(int status, void *arg)
{
    struct job_group *g = arg;

    if (status != 0)
        g->job->aborted = 1;
    job_group_done(g);
}

static void job_record(struct job_group *g)
{
    struct job *j = g->job;
    struct store_outcome o;

    memset(&o, 0, sizeof(o));
    o.route = g->choice.route == POLICY_HOLD ? "hold" : g->choice.route_name;
    o.domain = g->domain;
    o.reason = g->choice.reason;
    o.idx = g->idx;
    o.n = g->n;
    o.latency_ms = g->attempted ? job_now() - g->started : 0;
    o.window_ms = g->choice.window_ms;
    o.probe_route = g->choice.probe_route;
    o.probe_domain = g->choice.probe_domain;
    o.probe_route_since = g->choice.probe_route_since;
    o.probe_domain_since = g->choice.probe_domain_since;
    o.provider_id = g->provider_id;
    store_record(router_store(j->r), j->m, &o, job_on_recorded, g);
}

static const char *const job_result_names[] = {
    [STORE_RCPT_PENDING] = "pending", [STORE_RCPT_DEFERRED] = "deferred",
    [STORE_RCPT_DELIVERED] = "delivered", [STORE_RCPT_FAILED] = "failed",
};

static void job_on_sent(const struct transport_result *res, void *arg)
{
    struct job_group *g = arg;
    struct job *j = g->job;
    int64_t now = job_now();
    const struct router_metrics *mx = router_metrics(j->r);
    const char *cls = j->m->cls && j->m->cls[0] ? j->m->cls : "none";

    for (size_t k = 0; k < g->n; k++) {
        struct store_rcpt *r = &j->m->rcpts[g->idx[k]];
        const struct transport_rcpt_result *rr = k < res->nrcpts ? &res->rcpt[k] : NULL;
        char q[600], qa[300];

        r->t = now;
        r->attempts++;
        free(r->route);
        r->route = xstrdup(g->choice.route_name);
        free(r->remote);
        r->remote = res->remote[0] ? xstrdup(res->remote) : NULL;
        free(r->text);
        if (rr == NULL) {
            r->code = 451;
            snprintf(r->enh, sizeof(r->enh), "4.3.0");
            r->text = xstrdup("transport returned no result");
            r->state = STORE_RCPT_DEFERRED;
        } else {
            r->code = rr->code;
            snprintf(r->enh, sizeof(r->enh), "%s", rr->enhanced);
            r->text = xstrdup(rr->text);
            if (rr->code >= 200 && rr->code < 300)
                r->state = STORE_RCPT_DELIVERED;
            else if (rr->final && rr->code >= 500)
                r->state = STORE_RCPT_FAILED;
            else
                r->state = STORE_RCPT_DEFERRED;
        }
        /* An ambiguous outcome (the route may have delivered it) stays on
         * that route unless the route allows resending elsewhere. */
        if (rr && rr->ambiguous && !res->resend_ambiguous && r->state == STORE_RCPT_DEFERRED) {
            if (r->pin == NULL)
                r->pin = xstrdup(g->choice.route_name);
        } else if (r->state != STORE_RCPT_DEFERRED) {
            free(r->pin);
            r->pin = NULL;
        }
        log_info("id=%s event=delivery rcpt=%s route=%s reason=%s result=%s code=%d enh=%s "
                 "remote=%s latency_ms=%" PRId64 " text=%s",
                 j->m->id, log_quote(qa, sizeof(qa), r->addr, strlen(r->addr)),
                 g->choice.route_name, g->choice.reason, job_result_names[r->state], r->code,
                 r->enh[0] ? r->enh : "-", res->remote[0] ? res->remote : "-",
                 now - g->started, log_quote(q, sizeof(q), r->text, strlen(r->text)));
        metric_inc(metric_labels(mx->deliveries, g->choice.route_name,
                                 job_result_names[r->state], cls));
    }
    metric_observe(metric_labels(mx->delivery_seconds, g->choice.route_name),
                   (double)(now - g->started) / 1000.0);
    g->retry_after_ms = res->retry_after_ms;
    snprintf(g->provider_id, sizeof(g->provider_id), "%s", res->provider_id);
    router_outcome(j->r, &g->choice, g->domain, res);
    job_record(g);
}

/* Whether the message needs the SMTPUTF8 extension (RFC 6531): a
 * non-ASCII address. And whether its body has 8-bit octets (RFC 6152). */
static int job_has_8bit(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] & 0x80)
            return 1;
    return 0;
}

static void job_on_choice(const struct router_choice *c, int status, void *arg)
{
    struct job_group *g = arg;
    struct job *j = g->job;
    struct transport_msg tm;
    char qd[300];

    if (status != 0) {
        j->aborted = 1;
        job_group_done(g);
        return;
    }
    g->choice = *c;
    if (c->route == POLICY_HOLD) {
        const struct mf_config *cfg = router_config(j->r);
        int64_t now = job_now();
        g->due = c->retry_at_ms > now ? c->retry_at_ms : now + (int64_t)cfg->router.hold_retry * 1000;
        log_info("id=%s event=hold domain=%s nrcpt=%zu reason=%s retry_in_s=%" PRId64, j->m->id,
                 log_quote(qd, sizeof(qd), g->domain, strlen(g->domain)), g->n, c->reason,
                 (g->due - now) / 1000);
        job_record(g);
        return;
    }
    memset(&tm, 0, sizeof(tm));
    tm.id = j->m->id;
    tm.from = j->m->from;
    tm.rcpts = g->addrs;
    tm.nrcpts = g->n;
    tm.data = j->m->data;
    tm.len = j->m->len;
    tm.smtputf8 = job_has_8bit(j->m->from, strlen(j->m->from));
    for (size_t k = 0; k < g->n; k++)
        tm.smtputf8 |= job_has_8bit(g->addrs[k], strlen(g->addrs[k]));
    tm.body8bit = job_has_8bit(j->m->data, j->m->len);
    g->attempted = 1;
    g->started = job_now();
    log_debug("id=%s event=route domain=%s nrcpt=%zu route=%s reason=%s", j->m->id,
              log_quote(qd, sizeof(qd), g->domain, strlen(g->domain)), g->n, c->route_name,
              c->reason);
    c->ops->send(c->transport, &tm, job_on_sent, g);
}

/* ---- the end: bounces, retry or done ---------------------------------------------- */

static void job_on_finished(int status, void *arg)
{
    struct job *j = arg;

    if (status != 0)
        log_warn("id=%s event=finish_failed reason=redis", j->m->id);
    job_end(j);
}

/* Schedules the next attempt, or ends the message. */
static void job_finish(struct job *j)
{
    const struct mf_config *cfg = router_config(j->r);
    int64_t now = job_now(), due = 0, expiry;
    int pending = 0, attempted = 0;

    for (size_t i = 0; i < j->m->nrcpts; i++)
        pending |= job_pending(&j->m->rcpts[i]);
    if (!pending) {
        int delivered = 0, failed = 0;
        for (size_t i = 0; i < j->m->nrcpts; i++) {
            delivered += j->m->rcpts[i].state == STORE_RCPT_DELIVERED;
            failed += j->m->rcpts[i].state == STORE_RCPT_FAILED;
        }
        log_info("id=%s event=done delivered=%d failed=%d%s%s", j->m->id, delivered, failed,
                 j->dead[0] ? " dead=" : "", j->dead[0] ? j->dead : "");
        store_finish_done(router_store(j->r), j->m, j->e.stream_id, j->dead[0] ? j->dead : NULL,
                          job_on_finished, j);
        return;
    }
    for (size_t i = 0; i < j->ng; i++)
        attempted |= j->g[i].attempted;
    if (attempted)
        j->m->attempts++;
    /* Deferred groups wait for the retry schedule (RFC 5321 section
     * 4.5.4.1); held groups for the time the policy named. */
    for (size_t i = 0; i < j->ng; i++) {
        struct job_group *g = &j->g[i];
        int64_t t;
        int still = 0;
        for (size_t k = 0; k < g->n; k++)
            still |= job_pending(&j->m->rcpts[g->idx[k]]);
        if (!still)
            continue;
        if (g->attempted) {
            size_t step = j->m->attempts > 0 ? (size_t)j->m->attempts - 1 : 0;
            if (step >= cfg->router.nretry)
                step = cfg->router.nretry - 1;
            t = now + (int64_t)cfg->router.retry[step] * 1000;
            /* The peer said when to come back (HTTP Retry-After): never
             * earlier than that. */
            if (g->retry_after_ms > 0 && now + g->retry_after_ms > t)
                t = now + g->retry_after_ms;
        } else {
            t = g->due;
        }
        if (due == 0 || t < due)
            due = t;
    }
    if (due == 0)
        due = now + (int64_t)cfg->router.hold_retry * 1000;
    /* Never wait past the end of the queue lifetime: the message expires
     * (and bounces) on time. */
    expiry = j->m->created + (int64_t)cfg->router.max_queue_lifetime * 1000;
    if (due > expiry)
        due = expiry;
    log_info("id=%s event=deferred attempts=%d retry_in_s=%" PRId64, j->m->id, j->m->attempts,
             (due - now + 999) / 1000);
    store_finish_retry(router_store(j->r), j->m, j->e.stream_id, due, job_on_finished, j);
}

static void job_on_bounced(int status, void *arg)
{
    struct job *j = arg;

    if (status != 0) {
        log_warn("id=%s event=bounce_failed reason=redis", j->m->id);
        job_end(j);
        return;
    }
    for (size_t k = 0; k < j->nbounce; k++) {
        j->m->rcpts[j->bounce_idx[k]].bounced = 1;
        j->m->rcpts[j->bounce_idx[k]].dirty = 1;
    }
    job_finish(j);
}

/*
 * Failures not yet reported go to the sender in one DSN (RFC 3464); a
 * message that must not bounce (null sender, itself a DSN) keeps its
 * failures for the dead-letter stream instead.
 */
static void job_finalize(struct job *j)
{
    const struct mf_config *cfg = router_config(j->r);
    struct dsn_rcpt *dr;
    struct dsn_input in;
    struct buf out = BUF_INIT;
    char err[256];

    if (j->aborted) {
        log_warn("id=%s event=job_aborted reason=redis stream_id=%s", j->m->id, j->e.stream_id);
        job_end(j);
        return;
    }
    j->bounce_idx = xcalloc(j->m->nrcpts, sizeof(size_t));
    for (size_t i = 0; i < j->m->nrcpts; i++)
        if (j->m->rcpts[i].state == STORE_RCPT_FAILED && !j->m->rcpts[i].bounced)
            j->bounce_idx[j->nbounce++] = i;
    if (j->nbounce == 0) {
        job_finish(j);
        return;
    }
    if (!dsn_should_bounce(j->m->from, j->m->data, j->m->len)) {
        snprintf(j->dead, sizeof(j->dead), "failed, no bounce (null sender or a bounce)");
        for (size_t k = 0; k < j->nbounce; k++) {
            j->m->rcpts[j->bounce_idx[k]].bounced = 1;
            j->m->rcpts[j->bounce_idx[k]].dirty = 1;
        }
        job_finish(j);
        return;
    }
    dr = xcalloc(j->nbounce, sizeof(*dr));
    for (size_t k = 0; k < j->nbounce; k++) {
        const struct store_rcpt *r = &j->m->rcpts[j->bounce_idx[k]];
        dr[k].rcpt = r->addr;
        dr[k].action = "failed";
        dr[k].code = r->code;
        dr[k].enhanced = r->enh;
        dr[k].diagnostic = r->text;
        dr[k].remote_mta = r->remote;
        dr[k].last_attempt_ms = r->t;
    }
    memset(&in, 0, sizeof(in));
    in.queue_id = j->m->id;
    in.reporting_mta = cfg->router.hostname;
    in.envelope_from = j->m->from;
    in.orig_data = j->m->data;
    in.orig_len = j->m->len;
    in.rcpts = dr;
    in.nrcpts = j->nbounce;
    in.arrival_ms = j->m->created;
    in.now_ms = job_now();
    in.reason = j->expired ? "expired" : NULL;
    if (dsn_build(&in, &out, err, sizeof(err)) != 0) {
        log_error("id=%s event=bounce_failed reason=\"%s\"", j->m->id, err);
        snprintf(j->dead, sizeof(j->dead), "bounce failed: %.140s", err);
        free(dr);
        buf_free(&out);
        job_on_bounced(0, j);
        return;
    }
    free(dr);
    log_info("id=%s event=bounce to=%s nrcpt=%zu", j->m->id, j->m->from, j->nbounce);
    router_enqueue_bounce(j->r, j->m->from, out.data, out.len, job_on_bounced, j);
    buf_free(&out);
}

/* ---- start ------------------------------------------------------------------- */

/* Fails every pending recipient: the message outlived
 * [router] max_queue_lifetime (RFC 3463 4.4.7, delivery time expired). */
static void job_expire(struct job *j)
{
    const struct mf_config *cfg = router_config(j->r);
    char text[200];

    snprintf(text, sizeof(text), "message expired after %d seconds in the queue",
             cfg->router.max_queue_lifetime);
    j->expired = 1;
    for (size_t i = 0; i < j->m->nrcpts; i++) {
        struct store_rcpt *r = &j->m->rcpts[i];
        if (!job_pending(r))
            continue;
        r->state = STORE_RCPT_FAILED;
        r->dirty = 1;
        /* The last reply stays as the diagnostic; without one the DSN
         * says why: expired (dsn_build derives status 4.4.7). */
        if (r->code == 0 || r->text == NULL) {
            r->code = 0;
            free(r->text);
            r->text = xstrdup(text);
            r->enh[0] = '\0';
        }
    }
    log_info("id=%s event=expired lifetime_s=%d", j->m->id, cfg->router.max_queue_lifetime);
}

static void job_on_loaded(struct store_msg *m, int status, const char *err, void *arg)
{
    struct job *j = arg;
    const struct mf_config *cfg = router_config(j->r);

    if (status != 0) {
        log_warn("event=load_failed id=%s reason=\"%s\"", j->e.msg_id, err ? err : "redis");
        job_end(j);
        return;
    }
    if (m == NULL) {
        /* Deleted (mailferryctl queue delete) or never complete: nothing
         * to deliver. */
        log_info("id=%s event=skipped reason=no_message stream_id=%s", j->e.msg_id,
                 j->e.stream_id);
        store_ack(router_store(j->r), j->e.stream_id);
        job_end(j);
        return;
    }
    j->m = m;
    if (job_now() - m->created >= (int64_t)cfg->router.max_queue_lifetime * 1000)
        job_expire(j);

    /* Group the recipients still pending by destination domain. */
    j->g = xcalloc(m->nrcpts, sizeof(*j->g));
    for (size_t i = 0; i < m->nrcpts; i++) {
        char dom[256];
        size_t gi;
        if (!job_pending(&m->rcpts[i]))
            continue;
        const char *pin = m->rcpts[i].pin ? m->rcpts[i].pin : "";
        job_domain(m->rcpts[i].addr, dom, sizeof(dom));
        for (gi = 0; gi < j->ng; gi++)
            if (strcmp(j->g[gi].domain, dom) == 0 && strcmp(j->g[gi].pin, pin) == 0)
                break;
        if (gi == j->ng) {
            j->ng++;
            j->g[gi].job = j;
            snprintf(j->g[gi].domain, sizeof(j->g[gi].domain), "%s", dom);
            snprintf(j->g[gi].pin, sizeof(j->g[gi].pin), "%s", pin);
            j->g[gi].idx = xcalloc(m->nrcpts, sizeof(size_t));
            j->g[gi].addrs = xcalloc(m->nrcpts, sizeof(char *));
        }
        j->g[gi].idx[j->g[gi].n] = i;
        j->g[gi].addrs[j->g[gi].n] = m->rcpts[i].addr;
        j->g[gi].n++;
    }
    if (j->ng == 0) {
        job_finalize(j);
        return;
    }
    j->left = j->ng;
    for (size_t gi = 0; gi < j->ng; gi++) {
        struct job_group *g = &j->g[gi];
        if (g->pin[0])
            router_choose_pinned(j->r, m, g->domain, (uint32_t)g->n, g->pin, job_on_choice, g);
        else
            router_choose(j->r, m, g->domain, (uint32_t)g->n, job_on_choice, g);
    }
}

struct job *job_start(struct router *r, const struct store_entry *e)
{
    struct job *j = xcalloc(1, sizeof(*j));

    j->r = r;
    j->e = *e;
    store_load(router_store(r), e->msg_id, job_on_loaded, j);
    return j;
}
