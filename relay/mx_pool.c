/*
 * mx_pool: per-destination connection reuse with a cap; see mx_pool.h.
 *
 * Bookkeeping per destination domain (struct mx_dest): connections
 * counted against the cap (connecting + busy + idle), the idle ones (most
 * recently used first, so that surplus connections age out), and the
 * requests waiting in FIFO order. mx_dest_kick() is the one place that
 * matches waiting requests with idle connections and starts new
 * connections while the cap allows.
 *
 * Requests that have their answer go to a ready list that a zero timer
 * delivers, so callbacks never run inside mx_pool_get() or
 * mx_pool_put(). A second timer, running only while connections are idle,
 * closes those idle for longer than idle_timeout.
 *
 * Memory. A struct mx_conn lives while it is counted in its destination;
 * the smtp_client under it frees itself after smtp_client_quit()/close()
 * and tells the pool through smtp_client_on_free(), which is how
 * mx_pool_close() knows when everything is gone.
 */
#include "relay/mx_pool.h"

#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/conn.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

#define MX_DEST_BUCKETS 256
#define MX_SWEEP_MS 1000

struct mx_dest;

struct mx_conn {
    struct mx_conn *next;             /* idle list */
    struct mx_pool *p;
    struct mx_dest *d;
    struct smtp_client *c;
    char host[256];
    char peer[INET6_ADDRSTRLEN + 10];
    char tls[16];
    unsigned uses;
    uint64_t idle_since;              /* uv_now() ms */
    int busy;
};

struct mx_wait {
    struct mx_wait *next;
    struct mx_pool *p;
    struct mx_dest *d;
    mx_pool_cb cb;                    /* NULL once cancelled */
    void *arg;
    int ready;                        /* on the pool's ready list */
    struct mx_conn *mc;               /* the answer, or NULL with err */
    char err[400];
    struct mx_target targets[MX_TARGETS_MAX];
    size_t ntargets;
};

/* One connection being made, address after address. */
struct mx_attempt {
    struct mx_attempt *next, *prev;   /* the pool's attempts */
    struct smtp_client *c;            /* the client connecting now */
    struct mx_pool *p;
    struct mx_dest *d;
    struct mx_target targets[MX_TARGETS_MAX];
    size_t ntargets, i;
    int plaintext;                    /* retrying targets[i] without TLS */
    char last_err[400];
};

struct mx_dest {
    struct mx_dest *next;             /* hash chain */
    char domain[256];
    unsigned nconns;                  /* connecting + busy + idle */
    unsigned nconnecting;
    unsigned refs;                    /* requests on the ready list, and
                                         mx_dest_kick() running */
    struct mx_conn *idle;
    struct mx_wait *waiters, **waiters_tail;
};

struct mx_pool {
    uv_loop_t *loop;
    struct mx_pool_opts o;
    char *helo;
    struct sockaddr_storage src4, src6;
    int has_src4, has_src6;
    struct mx_dest *buckets[MX_DEST_BUCKETS];
    struct mx_wait *ready, **ready_tail;
    struct mx_attempt *attempts;
    uv_timer_t deliver, sweep;
    int timers_closing, timers_closed;
    size_t nconns;                    /* counted connections, all domains */
    size_t nidle;
    size_t nclients;                  /* smtp_client objects not yet freed */
    int delivering;
    int closing;
    void (*closed)(void *arg);
    void *closed_arg;
};

static void mx_dest_kick(struct mx_pool *p, struct mx_dest *d);
static void mx_on_deliver(uv_timer_t *t);
static void mx_maybe_done(struct mx_pool *p);

/* ---- destinations ------------------------------------------------------------ */

static unsigned mx_dest_hash(const char *s)
{
    unsigned h = 2166136261u;

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % MX_DEST_BUCKETS;
}

static struct mx_dest *mx_dest_get(struct mx_pool *p, const char *domain)
{
    unsigned b = mx_dest_hash(domain);
    struct mx_dest *d;

    for (d = p->buckets[b]; d; d = d->next)
        if (strcmp(d->domain, domain) == 0)
            return d;
    d = xcalloc(1, sizeof(*d));
    snprintf(d->domain, sizeof(d->domain), "%s", domain);
    d->waiters_tail = &d->waiters;
    d->next = p->buckets[b];
    p->buckets[b] = d;
    return d;
}

/* Frees a destination nothing refers to any more. */
static void mx_dest_maybe_free(struct mx_pool *p, struct mx_dest *d)
{
    struct mx_dest **pp;

    if (d->nconns > 0 || d->waiters != NULL || d->refs > 0)
        return;
    for (pp = &p->buckets[mx_dest_hash(d->domain)]; *pp; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            free(d);
            return;
        }
    }
}

/* ---- clients ------------------------------------------------------------------- */

static void mx_on_client_free(void *arg)
{
    struct mx_pool *p = arg;

    p->nclients--;
    mx_maybe_done(p);
}

/* Uncounts a connection and closes its client. */
static void mx_conn_drop(struct mx_conn *mc, int polite)
{
    struct mx_pool *p = mc->p;
    struct mx_dest *d = mc->d;

    if (polite && smtp_client_idle(mc->c))
        smtp_client_quit(mc->c);
    else
        smtp_client_close(mc->c);
    d->nconns--;
    p->nconns--;
    free(mc);
}

static void mx_on_sweep(uv_timer_t *t)
{
    struct mx_pool *p = t->data;
    uint64_t now = uv_now(p->loop), limit = (uint64_t)p->o.idle_timeout * 1000;

    for (size_t b = 0; b < MX_DEST_BUCKETS; b++) {
        struct mx_dest *d = p->buckets[b];

        while (d != NULL) {
            struct mx_dest *dnext = d->next;
            struct mx_conn **pp = &d->idle;

            while (*pp) {
                struct mx_conn *mc = *pp;

                if (now - mc->idle_since >= limit || !smtp_client_idle(mc->c)) {
                    *pp = mc->next;
                    p->nidle--;
                    log_debug("event=mx_idle_close domain=%s peer=%s reason=%s", d->domain,
                              mc->peer, smtp_client_idle(mc->c) ? "idle_timeout" : "closed");
                    mx_conn_drop(mc, 1);
                } else {
                    pp = &mc->next;
                }
            }
            mx_dest_kick(p, d);
            mx_dest_maybe_free(p, d);
            d = dnext;
        }
    }
    if (p->nidle == 0)
        uv_timer_stop(&p->sweep);
}

/* An idle connection goes to the first waiter, or rests. */
static void mx_conn_idle(struct mx_conn *mc)
{
    struct mx_pool *p = mc->p;

    mc->busy = 0;
    mc->idle_since = uv_now(p->loop);
    mc->next = mc->d->idle;
    mc->d->idle = mc;
    p->nidle++;
    if (!uv_is_active((uv_handle_t *)&p->sweep))
        uv_timer_start(&p->sweep, mx_on_sweep, MX_SWEEP_MS, MX_SWEEP_MS);
    mx_dest_kick(p, mc->d);
}

/* ---- requests ------------------------------------------------------------------ */

/* Moves the first waiter of d to the ready list with answer mc (or a
 * failure, mc NULL and err). */
static void mx_answer_first(struct mx_pool *p, struct mx_dest *d, struct mx_conn *mc,
                            const char *err)
{
    struct mx_wait *w = d->waiters;

    d->waiters = w->next;
    if (d->waiters == NULL)
        d->waiters_tail = &d->waiters;
    w->next = NULL;
    w->ready = 1;
    d->refs++;
    w->mc = mc;
    if (mc != NULL)
        mc->busy = 1;
    else
        snprintf(w->err, sizeof(w->err), "%s", err);
    *p->ready_tail = w;
    p->ready_tail = &w->next;
    uv_timer_start(&p->deliver, mx_on_deliver, 0, 0);
}

static void mx_on_deliver(uv_timer_t *t)
{
    struct mx_pool *p = t->data;
    struct mx_wait *w;

    p->delivering = 1;
    while ((w = p->ready) != NULL) {
        struct mx_dest *d = w->d;

        p->ready = w->next;
        if (p->ready == NULL)
            p->ready_tail = &p->ready;
        if (w->cb == NULL || p->closing) {
            if (w->mc != NULL)
                mx_pool_put(w->mc, 1);
        } else {
            if (w->mc != NULL)
                log_debug("event=mx_conn domain=%s peer=%s uses=%u", d->domain, w->mc->peer,
                          w->mc->uses);
            w->cb(w->mc, w->mc ? NULL : w->err, w->arg);
        }
        free(w);
        d->refs--;
        mx_dest_maybe_free(p, d);
    }
    p->delivering = 0;
    mx_maybe_done(p);
}

static void mx_attempt_next(struct mx_attempt *a);

/* A connection attempt has ended: with a client, or with every target
 * failed. */
static void mx_attempt_done(struct mx_attempt *a, struct smtp_client *c)
{
    struct mx_pool *p = a->p;
    struct mx_dest *d = a->d;

    if (a->prev)
        a->prev->next = a->next;
    else
        p->attempts = a->next;
    if (a->next)
        a->next->prev = a->prev;
    d->nconnecting--;
    if (c != NULL && !p->closing) {
        struct mx_conn *mc = xcalloc(1, sizeof(*mc));
        const struct mx_target *t = &a->targets[a->i];
        struct conn *cn = smtp_client_conn(c);

        mc->p = p;
        mc->d = d;
        mc->c = c;
        snprintf(mc->host, sizeof(mc->host), "%s", t->host);
        snprintf(mc->peer, sizeof(mc->peer), t->ss.ss_family == AF_INET6 ? "[%s]:%u" : "%s:%u",
                 t->ip, p->o.port);
        snprintf(mc->tls, sizeof(mc->tls), "%s", cn && conn_is_tls(cn) ? conn_tls_version(cn) : "");
        log_info("event=mx_connected domain=%s host=%s peer=%s tls=%s", d->domain, mc->host,
                 mc->peer, mc->tls[0] ? mc->tls : "no");
        if (d->waiters != NULL)
            mx_answer_first(p, d, mc, NULL);
        else
            mx_conn_idle(mc);
    } else {
        if (c != NULL)
            smtp_client_close(c);
        d->nconns--;
        p->nconns--;
        if (!p->closing && d->waiters != NULL) {
            char why[480];

            snprintf(why, sizeof(why), "%s", a->last_err[0] ? a->last_err : "no address to try");
            /* With nothing else under way for this domain every waiter
             * gets the failure; otherwise one does, and the rest wait for
             * the connections that are busy or still being made. */
            if (d->nconns == 0) {
                while (d->waiters != NULL)
                    mx_answer_first(p, d, NULL, why);
            } else {
                mx_answer_first(p, d, NULL, why);
            }
        }
        if (!p->closing)
            mx_dest_kick(p, d);
    }
    free(a);
    mx_dest_maybe_free(p, d);
    mx_maybe_done(p);
}

static void mx_on_ready(struct smtp_client *c, int status, const struct smtp_reply *reply,
                        const char *err, void *arg)
{
    struct mx_attempt *a = arg;
    struct mx_pool *p = a->p;
    const struct mx_target *t = &a->targets[a->i];
    char q[400];

    (void)reply;
    a->c = NULL;
    if (status == 0) {
        mx_attempt_done(a, c);
        return;
    }
    /* The client has released itself (smtp_client.h). */
    snprintf(a->last_err, sizeof(a->last_err), "%s%s%s:%u: %s",
             t->ss.ss_family == AF_INET6 ? "[" : "", t->ip,
             t->ss.ss_family == AF_INET6 ? "]" : "", p->o.port, err ? err : "failed");
    log_info("event=mx_connect_failed domain=%s host=%s ip=%s tls=%s reason=%s", a->d->domain,
             t->host, t->ip, a->plaintext ? "no" : "opportunistic",
             log_quote(q, sizeof(q), err ? err : "failed", err ? strlen(err) : 6));
    if (p->closing) {
        mx_attempt_done(a, NULL);
        return;
    }
    if (!a->plaintext && !p->o.tls_verify && err != NULL && strncmp(err, "TLS", 3) == 0) {
        /* Opportunistic TLS that failed: once more in plaintext. */
        a->plaintext = 1;
    } else {
        a->plaintext = 0;
        a->i++;
    }
    mx_attempt_next(a);
}

static void mx_attempt_next(struct mx_attempt *a)
{
    struct mx_pool *p = a->p;
    struct smtp_client_opts o;
    struct sockaddr_storage ss;
    struct smtp_client *c;

    for (; a->i < a->ntargets; a->i++, a->plaintext = 0) {
        const struct mx_target *t = &a->targets[a->i];
        int v6 = t->ss.ss_family == AF_INET6;

        /* The resolver only gives families the relay can send from, but
         * a literal may name any. */
        if ((v6 && !p->has_src6 && p->has_src4) || (!v6 && !p->has_src4 && p->has_src6)) {
            snprintf(a->last_err, sizeof(a->last_err), "%s: no source address of its family",
                     t->ip);
            continue;
        }
        memcpy(&ss, &t->ss, sizeof(ss));
        if (v6)
            ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)p->o.port);
        else
            ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)p->o.port);
        memset(&o, 0, sizeof(o));
        o.helo = p->helo;
        o.tls = a->plaintext || p->o.tls_ctx == NULL
                    ? SMTP_CLIENT_TLS_NONE
                    : SMTP_CLIENT_TLS_OPPORTUNISTIC;
        o.tls_ctx = p->o.tls_ctx;
        o.servername = t->host[0] != '[' ? t->host : NULL;
        o.source = v6 ? (p->has_src6 ? (struct sockaddr *)&p->src6 : NULL)
                      : (p->has_src4 ? (struct sockaddr *)&p->src4 : NULL);
        o.connect_timeout = p->o.connect_timeout;
        c = smtp_client_connect(p->loop, (struct sockaddr *)&ss, &o, mx_on_ready, a);
        a->c = c;
        p->nclients++;
        smtp_client_on_free(c, mx_on_client_free, p);
        return;
    }
    mx_attempt_done(a, NULL);
}

/* Matches waiters with idle connections, and starts connections for the
 * waiters left while the cap allows. */
static void mx_dest_kick(struct mx_pool *p, struct mx_dest *d)
{
    if (p->closing)
        return;
    d->refs++;
    while (d->waiters != NULL && d->idle != NULL) {
        struct mx_conn *mc = d->idle;

        d->idle = mc->next;
        mc->next = NULL;
        p->nidle--;
        if (!smtp_client_idle(mc->c)) {
            /* The server closed it while it rested. */
            mx_conn_drop(mc, 0);
            continue;
        }
        mx_answer_first(p, d, mc, NULL);
    }
    while (d->waiters != NULL && d->nconns < p->o.max_per_domain) {
        unsigned waiting = 0;
        struct mx_attempt *a;

        for (struct mx_wait *w = d->waiters; w; w = w->next)
            waiting++;
        if (waiting <= d->nconnecting)
            break;
        a = xcalloc(1, sizeof(*a));
        a->p = p;
        a->d = d;
        a->ntargets = d->waiters->ntargets;
        memcpy(a->targets, d->waiters->targets, a->ntargets * sizeof(a->targets[0]));
        d->nconns++;
        d->nconnecting++;
        p->nconns++;
        a->next = p->attempts;
        if (p->attempts)
            p->attempts->prev = a;
        p->attempts = a;
        mx_attempt_next(a);
    }
    d->refs--;
}

struct mx_wait *mx_pool_get(struct mx_pool *p, const struct mx_route *route, mx_pool_cb cb,
                            void *arg)
{
    struct mx_dest *d = mx_dest_get(p, route->domain);
    struct mx_wait *w = xcalloc(1, sizeof(*w));

    w->p = p;
    w->d = d;
    w->cb = cb;
    w->arg = arg;
    w->ntargets = route->ntargets < MX_TARGETS_MAX ? route->ntargets : MX_TARGETS_MAX;
    memcpy(w->targets, route->targets, w->ntargets * sizeof(w->targets[0]));
    *d->waiters_tail = w;
    d->waiters_tail = &w->next;
    if (w->ntargets == 0) {
        /* Nothing to connect to: answered at once (from the loop). */
        struct mx_wait **pp;

        for (pp = &d->waiters; *pp != w; pp = &(*pp)->next)
            ;
        *pp = NULL;
        d->waiters_tail = pp;
        w->ready = 1;
        d->refs++;
        snprintf(w->err, sizeof(w->err), "no address to try");
        *p->ready_tail = w;
        p->ready_tail = &w->next;
        uv_timer_start(&p->deliver, mx_on_deliver, 0, 0);
        return w;
    }
    mx_dest_kick(p, d);
    return w;
}

void mx_pool_cancel(struct mx_wait *w)
{
    struct mx_pool *p;
    struct mx_dest *d;
    struct mx_wait **pp;

    if (w == NULL)
        return;
    if (w->ready) {
        w->cb = NULL;
        return;
    }
    p = w->p;
    d = w->d;
    for (pp = &d->waiters; *pp; pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    }
    d->waiters_tail = &d->waiters;
    while (*d->waiters_tail)
        d->waiters_tail = &(*d->waiters_tail)->next;
    free(w);
    mx_dest_maybe_free(p, d);
}

/* ---- giving back ------------------------------------------------------------ */

static void mx_on_rset(struct smtp_client *c, int status, const struct smtp_reply *r, void *arg)
{
    struct mx_conn *mc = arg;

    (void)c;
    if (status == 0 && smtp_reply_class(r) == 2 && smtp_client_idle(mc->c) && !mc->p->closing) {
        struct mx_dest *d = mc->d;

        mx_conn_idle(mc);
        mx_dest_maybe_free(mc->p, d);
        return;
    }
    {
        struct mx_pool *p = mc->p;
        struct mx_dest *d = mc->d;

        mx_conn_drop(mc, 1);
        mx_dest_kick(p, d);
        mx_dest_maybe_free(p, d);
        mx_maybe_done(p);
    }
}

void mx_pool_put(struct mx_conn *mc, int reusable)
{
    struct mx_pool *p = mc->p;
    struct mx_dest *d = mc->d;

    mc->busy = 0;
    mc->uses++;
    if (reusable && !p->closing && smtp_client_in_transaction(mc->c)) {
        /* RFC 5321 section 4.1.1.5: RSET ends the transaction the last
         * user left open; the connection rests once the server agrees. */
        mc->busy = 1;
        if (smtp_client_rset(mc->c, mx_on_rset, mc) == 0)
            return;
        mc->busy = 0;
        reusable = 0;
    }
    if (reusable && !p->closing && smtp_client_idle(mc->c)) {
        mx_conn_idle(mc);
        return;
    }
    mx_conn_drop(mc, 1);
    mx_dest_kick(p, d);
    mx_dest_maybe_free(p, d);
    mx_maybe_done(p);
}

struct smtp_client *mx_conn_client(const struct mx_conn *mc)
{
    return mc->c;
}

const char *mx_conn_host(const struct mx_conn *mc)
{
    return mc->host;
}

const char *mx_conn_peer(const struct mx_conn *mc)
{
    return mc->peer;
}

const char *mx_conn_tls(const struct mx_conn *mc)
{
    return mc->tls;
}

unsigned mx_conn_uses(const struct mx_conn *mc)
{
    return mc->uses;
}

size_t mx_pool_size(const struct mx_pool *p)
{
    return p->nconns;
}

/* ---- life cycle ---------------------------------------------------------------- */

struct mx_pool *mx_pool_new(uv_loop_t *loop, const struct mx_pool_opts *opts)
{
    struct mx_pool *p = xcalloc(1, sizeof(*p));

    p->loop = loop;
    p->o = *opts;
    p->helo = xstrdup(opts->helo != NULL ? opts->helo : "localhost");
    p->o.helo = p->helo;
    if (opts->source4 != NULL) {
        memcpy(&p->src4, opts->source4, sizeof(struct sockaddr_in));
        ((struct sockaddr_in *)&p->src4)->sin_port = 0;
        p->has_src4 = 1;
    }
    if (opts->source6 != NULL) {
        memcpy(&p->src6, opts->source6, sizeof(struct sockaddr_in6));
        ((struct sockaddr_in6 *)&p->src6)->sin6_port = 0;
        p->has_src6 = 1;
    }
    p->o.source4 = p->o.source6 = NULL;
    if (p->o.tls_ctx != NULL)
        tls_ctx_ref(p->o.tls_ctx);
    if (p->o.max_per_domain == 0)
        p->o.max_per_domain = 1;
    p->ready_tail = &p->ready;
    uv_timer_init(loop, &p->deliver);
    uv_timer_init(loop, &p->sweep);
    p->deliver.data = p->sweep.data = p;
    return p;
}

static void mx_timer_closed(uv_handle_t *h)
{
    struct mx_pool *p = h->data;

    p->timers_closed++;
    mx_maybe_done(p);
}

/* Frees the pool once it is closing, every client is gone and both
 * timers are closed. The timers close once the clients are gone. */
static void mx_maybe_done(struct mx_pool *p)
{
    void (*closed)(void *);
    void *arg;

    if (!p->closing || p->nclients > 0 || p->delivering || p->ready != NULL)
        return;
    if (!p->timers_closing) {
        p->timers_closing = 1;
        uv_timer_stop(&p->deliver);
        uv_timer_stop(&p->sweep);
        uv_close((uv_handle_t *)&p->deliver, mx_timer_closed);
        uv_close((uv_handle_t *)&p->sweep, mx_timer_closed);
        return;
    }
    if (p->timers_closed < 2)
        return;
    for (size_t b = 0; b < MX_DEST_BUCKETS; b++) {
        while (p->buckets[b]) {
            struct mx_dest *d = p->buckets[b];

            p->buckets[b] = d->next;
            while (d->waiters) {
                struct mx_wait *w = d->waiters;

                d->waiters = w->next;
                free(w);
            }
            free(d);
        }
    }
    closed = p->closed;
    arg = p->closed_arg;
    if (p->o.tls_ctx != NULL)
        tls_ctx_unref(p->o.tls_ctx);
    free(p->helo);
    free(p);
    if (closed != NULL)
        closed(arg);
}

void mx_pool_close(struct mx_pool *p, void (*closed)(void *arg), void *arg)
{
    if (p->closing)
        return;
    p->closing = 1;
    p->closed = closed;
    p->closed_arg = arg;
    log_info("event=mx_pool_close connections=%zu idle=%zu", p->nconns, p->nidle);
    for (size_t b = 0; b < MX_DEST_BUCKETS; b++) {
        for (struct mx_dest *d = p->buckets[b]; d; d = d->next) {
            while (d->idle != NULL) {
                struct mx_conn *mc = d->idle;

                d->idle = mc->next;
                p->nidle--;
                mx_conn_drop(mc, 1);
            }
            for (struct mx_wait *w = d->waiters; w; w = w->next)
                w->cb = NULL;
        }
    }
    /* Connections being made are stopped; each ends through
     * mx_on_ready() with an error. Busy ones close when given back. The
     * rest finishes from the loop. */
    for (struct mx_attempt *a = p->attempts; a; a = a->next)
        if (a->c != NULL)
            smtp_client_close(a->c);
    uv_timer_start(&p->deliver, mx_on_deliver, 0, 0);
}
