/*
 * mx_resolve: MX, implicit MX and address lookups with a small cache; see
 * mx_resolve.h.
 *
 * Each domain has one cache entry, which is either being resolved (with
 * the lookups waiting for it) or done (hosts with their addresses, or a
 * failure). Answers are put together once every query of the entry has
 * come back. Waiting lookups are then moved to a ready list that a zero
 * timer delivers from, so that no callback runs inside mx_resolve() or
 * inside another lookup's callback chain, and cancelling stays simple (a
 * cancelled lookup just loses its callback).
 */
#include "relay/mx_resolve.h"

#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/xmalloc.h"

#define MX_CACHE_BUCKETS 1024
/* Entries kept at most; past it, expired ones are dropped, and when that
 * is not enough a new result is used once and not kept. */
#define MX_CACHE_MAX 10000

struct mx_host {
    unsigned preference;
    char *name;
    struct dns_addr *addrs;
    size_t naddrs;
    int temp_error;                   /* an address lookup failed for now */
};

struct mx_entry {
    struct mx_entry *next;            /* hash chain */
    char domain[256];
    int resolving;
    uint64_t expires;                 /* uv_now() ms; valid when done */
    int failed;
    struct mx_failure failure;
    int implicit;
    struct mx_host *hosts;
    size_t nhosts;
    unsigned pending;                 /* DNS queries outstanding */
    unsigned refs;                    /* lookups on the ready list */
    struct mx_lookup *waiters, **waiters_tail;
};

struct mx_lookup {
    struct mx_lookup *next;
    struct mx_resolver *r;
    struct mx_entry *entry;           /* NULL for an address literal */
    mx_resolve_cb cb;                 /* NULL once cancelled */
    void *arg;
    char domain[256];
    int literal;                      /* 1 valid literal, -1 malformed */
    struct mx_target target;          /* the literal's address */
};

/* One DNS query in flight. */
struct mx_query {
    struct mx_resolver *r;
    struct mx_entry *e;
    size_t host;                      /* index into e->hosts (addresses) */
};

struct mx_resolver {
    uv_loop_t *loop;
    struct dns *dns;
    struct mx_resolver_opts opts;
    struct mx_entry *buckets[MX_CACHE_BUCKETS];
    size_t nentries;
    struct mx_lookup *ready, **ready_tail;
    uv_timer_t timer;
    unsigned pending;                 /* DNS queries outstanding, all entries */
    uint64_t rnd;
    int delivering;
    int closing;
    int timer_closed;
};

/* ---- helpers ---------------------------------------------------------------- */

/* xorshift64*: only spreads load among equal MX preferences. */
static unsigned mx_rand(void *arg, unsigned n)
{
    struct mx_resolver *r = arg;

    r->rnd ^= r->rnd >> 12;
    r->rnd ^= r->rnd << 25;
    r->rnd ^= r->rnd >> 27;
    return (unsigned)((r->rnd * 2685821657736338717ULL) >> 33) % n;
}

static unsigned mx_hash(const char *s)
{
    unsigned h = 2166136261u;

    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 16777619u;
    return h % MX_CACHE_BUCKETS;
}

static void mx_entry_clear_hosts(struct mx_entry *e)
{
    for (size_t i = 0; i < e->nhosts; i++) {
        free(e->hosts[i].name);
        free(e->hosts[i].addrs);
    }
    free(e->hosts);
    e->hosts = NULL;
    e->nhosts = 0;
}

static void mx_entry_free(struct mx_entry *e)
{
    mx_entry_clear_hosts(e);
    free(e);
}

static void mx_maybe_free(struct mx_resolver *r)
{
    if (!r->closing || r->pending > 0 || !r->timer_closed || r->delivering)
        return;
    for (size_t b = 0; b < MX_CACHE_BUCKETS; b++) {
        while (r->buckets[b]) {
            struct mx_entry *e = r->buckets[b];

            r->buckets[b] = e->next;
            while (e->waiters) {
                struct mx_lookup *l = e->waiters;

                e->waiters = l->next;
                free(l);
            }
            mx_entry_free(e);
        }
    }
    while (r->ready) {
        struct mx_lookup *l = r->ready;

        r->ready = l->next;
        free(l);
    }
    free(r);
}

/* ---- delivery ---------------------------------------------------------------- */

static void mx_on_timer(uv_timer_t *t);

static void mx_ready(struct mx_resolver *r, struct mx_lookup *l)
{
    if (l->entry != NULL)
        l->entry->refs++;
    l->next = NULL;
    *r->ready_tail = l;
    r->ready_tail = &l->next;
    if (!r->closing)
        uv_timer_start(&r->timer, mx_on_timer, 0, 0);
}

/* Builds the route of a done entry for one lookup: hosts in MX order
 * (equal preferences shuffled for this lookup), each host's addresses with
 * the preferred family first. */
static void mx_deliver_entry(struct mx_resolver *r, struct mx_lookup *l, struct mx_entry *e)
{
    struct mx_target targets[MX_TARGETS_MAX];
    struct mx_route route;
    struct dns_mx recs[MX_HOSTS_MAX];
    size_t order[MX_HOSTS_MAX], k, nt = 0;

    memset(&route, 0, sizeof(route));
    route.domain = e->domain;
    route.implicit = e->implicit;
    if (e->failed) {
        route.failed = 1;
        route.failure = e->failure;
        l->cb(&route, l->arg);
        return;
    }
    for (size_t i = 0; i < e->nhosts; i++) {
        recs[i].preference = e->hosts[i].preference;
        recs[i].host = e->hosts[i].name;
    }
    k = mx_order(recs, e->nhosts, order, MX_HOSTS_MAX, mx_rand, r);
    for (size_t i = 0; i < k && nt < MX_TARGETS_MAX; i++) {
        const struct mx_host *h = &e->hosts[order[i]];

        for (int pass = 0; pass < 2; pass++) {
            int fam = pass == 0 ? r->opts.prefer
                                : (r->opts.prefer == AF_INET ? AF_INET6 : AF_INET);

            if ((fam == AF_INET && !r->opts.use_v4) || (fam == AF_INET6 && !r->opts.use_v6))
                continue;
            for (size_t a = 0; a < h->naddrs && nt < MX_TARGETS_MAX; a++) {
                struct mx_target *t = &targets[nt];

                if (h->addrs[a].family != fam)
                    continue;
                memset(t, 0, sizeof(*t));
                snprintf(t->host, sizeof(t->host), "%s", h->name);
                snprintf(t->ip, sizeof(t->ip), "%s", h->addrs[a].text);
                if (fam == AF_INET) {
                    struct sockaddr_in *s4 = (struct sockaddr_in *)&t->ss;

                    s4->sin_family = AF_INET;
                    s4->sin_addr = h->addrs[a].u.v4;
                    t->len = sizeof(*s4);
                } else {
                    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&t->ss;

                    s6->sin6_family = AF_INET6;
                    s6->sin6_addr = h->addrs[a].u.v6;
                    t->len = sizeof(*s6);
                }
                nt++;
            }
        }
    }
    route.targets = targets;
    route.ntargets = nt;
    if (nt == 0) {
        /* Every address is of a family the relay cannot send from. */
        route.failed = 1;
        mx_noaddr_failure(e->domain, 0, &route.failure);
        snprintf(route.failure.text, sizeof(route.failure.text),
                 "no mail host of %s has an address of a family this relay sends from",
                 e->domain);
    }
    l->cb(&route, l->arg);
}

static void mx_deliver_literal(struct mx_lookup *l)
{
    struct mx_route route;

    memset(&route, 0, sizeof(route));
    route.domain = l->domain;
    if (l->literal < 0) {
        route.failed = 1;
        route.failure.code = 501;
        route.failure.enhanced = "5.1.2";
        snprintf(route.failure.text, sizeof(route.failure.text),
                 "malformed address literal %s", l->domain);
    } else {
        route.targets = &l->target;
        route.ntargets = 1;
    }
    l->cb(&route, l->arg);
}

static void mx_on_timer(uv_timer_t *t)
{
    struct mx_resolver *r = t->data;
    struct mx_lookup *l;

    r->delivering = 1;
    while ((l = r->ready) != NULL) {
        r->ready = l->next;
        if (r->ready == NULL)
            r->ready_tail = &r->ready;
        if (l->entry != NULL)
            l->entry->refs--;
        if (l->entry != NULL && l->entry->resolving && l->cb != NULL && !r->closing) {
            /* The entry expired and is being resolved again since this
             * lookup was queued: it gets the new result. */
            l->next = NULL;
            *l->entry->waiters_tail = l;
            l->entry->waiters_tail = &l->next;
            continue;
        }
        if (l->cb != NULL && !r->closing) {
            if (l->entry != NULL)
                mx_deliver_entry(r, l, l->entry);
            else
                mx_deliver_literal(l);
        }
        free(l);
    }
    r->delivering = 0;
    mx_maybe_free(r);
}

/* ---- resolution ---------------------------------------------------------------- */

/* Drops expired entries nobody waits for, when the cache is over its cap. */
static void mx_purge(struct mx_resolver *r)
{
    uint64_t now = uv_now(r->loop);

    for (size_t b = 0; b < MX_CACHE_BUCKETS && r->nentries > MX_CACHE_MAX; b++) {
        struct mx_entry **pp = &r->buckets[b];

        while (*pp) {
            struct mx_entry *e = *pp;

            if (!e->resolving && e->expires <= now && e->waiters == NULL && e->refs == 0) {
                *pp = e->next;
                r->nentries--;
                mx_entry_free(e);
            } else {
                pp = &e->next;
            }
        }
    }
}

/* Every query of e has come back: put the result together and wake the
 * lookups waiting for it. */
static void mx_finish(struct mx_resolver *r, struct mx_entry *e)
{
    struct mx_lookup *l, *next;
    int temporary = 0;
    size_t naddrs = 0;

    if (!e->failed) {
        for (size_t i = 0; i < e->nhosts; i++) {
            naddrs += e->hosts[i].naddrs;
            temporary |= e->hosts[i].temp_error;
        }
        if (naddrs == 0) {
            e->failed = 1;
            mx_noaddr_failure(e->domain, temporary, &e->failure);
        }
    }
    e->resolving = 0;
    /* Temporary failures are not cached: the next lookup asks again. */
    if (e->failed && e->failure.code / 100 == 4)
        e->expires = uv_now(r->loop);
    else
        e->expires = uv_now(r->loop) + (uint64_t)r->opts.cache_seconds * 1000;
    log_debug("event=mx_resolved domain=%s hosts=%zu addresses=%zu implicit=%d result=%d",
              e->domain, e->nhosts, naddrs, e->implicit, e->failed ? e->failure.code : 250);
    for (l = e->waiters; l; l = next) {
        next = l->next;
        mx_ready(r, l);
    }
    e->waiters = NULL;
    e->waiters_tail = &e->waiters;
    if (r->nentries > MX_CACHE_MAX) {
        mx_purge(r);
        /* Still full of live entries: use this result once, keep none. */
        if (r->nentries > MX_CACHE_MAX)
            e->expires = uv_now(r->loop);
    }
}

static void mx_on_addr(const struct dns_result *res, void *arg)
{
    struct mx_query *q = arg;
    struct mx_resolver *r = q->r;
    struct mx_entry *e = q->e;
    size_t idx = q->host;

    free(q);
    r->pending--;
    e->pending--;
    if (r->closing) {
        mx_maybe_free(r);
        return;
    }
    if (res->status == DNS_OK) {
        struct mx_host *h = &e->hosts[idx];

        h->addrs = xrealloc(h->addrs, (h->naddrs + res->n) * sizeof(*h->addrs));
        memcpy(h->addrs + h->naddrs, res->addrs, res->n * sizeof(*h->addrs));
        h->naddrs += res->n;
    } else if (res->status != DNS_ENOTFOUND && res->status != DNS_ENODATA) {
        e->hosts[idx].temp_error = 1;
        log_info("event=mx_lookup_failed domain=%s host=%s type=%s reason=%s", e->domain,
                 e->hosts[idx].name, res->type == DNS_T_A ? "A" : "AAAA",
                 dns_strerror(res->status));
    }
    if (e->pending == 0)
        mx_finish(r, e);
}

static void mx_query(struct mx_resolver *r, struct mx_entry *e, const char *name,
                     enum dns_type type, dns_cb cb, size_t host)
{
    struct mx_query *q = xcalloc(1, sizeof(*q));

    q->r = r;
    q->e = e;
    q->host = host;
    r->pending++;
    e->pending++;
    dns_query(r->dns, name, type, cb, q);
}

/* Asks for the A and AAAA records of every host of e (the families the
 * relay can use). */
static void mx_query_addrs(struct mx_resolver *r, struct mx_entry *e)
{
    for (size_t i = 0; i < e->nhosts; i++) {
        if (r->opts.use_v4)
            mx_query(r, e, e->hosts[i].name, DNS_T_A, mx_on_addr, i);
        if (r->opts.use_v6)
            mx_query(r, e, e->hosts[i].name, DNS_T_AAAA, mx_on_addr, i);
    }
    if (e->pending == 0)
        mx_finish(r, e);
}

static void mx_on_mx(const struct dns_result *res, void *arg)
{
    struct mx_query *q = arg;
    struct mx_resolver *r = q->r;
    struct mx_entry *e = q->e;

    free(q);
    r->pending--;
    e->pending--;
    if (r->closing) {
        mx_maybe_free(r);
        return;
    }
    if (res->status == DNS_OK && mx_is_null(res->mxs, res->n)) {
        e->failed = 1;
        mx_null_failure(e->domain, &e->failure);
    } else if (res->status == DNS_OK) {
        size_t order[MX_HOSTS_MAX], k;

        /* Sorted, deduplicated and capped here; the order among equal
         * preferences is drawn per lookup in mx_deliver_entry(). */
        k = mx_order(res->mxs, res->n, order, MX_HOSTS_MAX, mx_rand, r);
        e->hosts = xcalloc(k ? k : 1, sizeof(*e->hosts));
        for (size_t i = 0; i < k; i++) {
            e->hosts[i].preference = res->mxs[order[i]].preference;
            e->hosts[i].name = xstrdup(res->mxs[order[i]].host);
            mx_domain_normalize(e->hosts[i].name);
        }
        e->nhosts = k;
        if (k == 0) {
            e->failed = 1;
            mx_noaddr_failure(e->domain, 0, &e->failure);
        }
    } else if (res->status == DNS_ENODATA) {
        /* RFC 5321 section 5.1: no MX records, the domain is its own
         * (implicit) MX with preference 0. */
        e->implicit = 1;
        e->hosts = xcalloc(1, sizeof(*e->hosts));
        e->hosts[0].name = xstrdup(e->domain);
        e->nhosts = 1;
    } else {
        e->failed = 1;
        mx_dns_failure(res->status, e->domain, &e->failure);
        if (res->status != DNS_ENOTFOUND)
            log_info("event=mx_lookup_failed domain=%s type=MX reason=%s", e->domain,
                     dns_strerror(res->status));
    }
    if (e->failed) {
        mx_finish(r, e);
        return;
    }
    mx_query_addrs(r, e);
}

static void mx_start_entry(struct mx_resolver *r, struct mx_entry *e)
{
    mx_entry_clear_hosts(e);
    e->resolving = 1;
    e->failed = 0;
    e->implicit = 0;
    memset(&e->failure, 0, sizeof(e->failure));
    mx_query(r, e, e->domain, DNS_T_MX, mx_on_mx, 0);
}

struct mx_lookup *mx_resolve(struct mx_resolver *r, const char *domain, mx_resolve_cb cb,
                             void *arg)
{
    struct mx_lookup *l = xcalloc(1, sizeof(*l));
    struct mx_entry *e;
    unsigned b;

    l->r = r;
    l->cb = cb;
    l->arg = arg;
    snprintf(l->domain, sizeof(l->domain), "%s", domain);
    mx_domain_normalize(l->domain);
    l->literal = mx_literal(l->domain, &l->target.ss, &l->target.len);
    if (l->literal != 0) {
        if (l->literal > 0) {
            snprintf(l->target.host, sizeof(l->target.host), "%s", l->domain);
            if (l->target.ss.ss_family == AF_INET)
                inet_ntop(AF_INET, &((struct sockaddr_in *)&l->target.ss)->sin_addr,
                          l->target.ip, sizeof(l->target.ip));
            else
                inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&l->target.ss)->sin6_addr,
                          l->target.ip, sizeof(l->target.ip));
        }
        mx_ready(r, l);
        return l;
    }
    b = mx_hash(l->domain);
    for (e = r->buckets[b]; e; e = e->next)
        if (strcmp(e->domain, l->domain) == 0)
            break;
    if (e == NULL) {
        e = xcalloc(1, sizeof(*e));
        snprintf(e->domain, sizeof(e->domain), "%s", l->domain);
        e->waiters_tail = &e->waiters;
        e->next = r->buckets[b];
        r->buckets[b] = e;
        r->nentries++;
    }
    l->entry = e;
    if (!e->resolving && e->expires > uv_now(r->loop)) {
        mx_ready(r, l);
        return l;
    }
    l->next = NULL;
    *e->waiters_tail = l;
    e->waiters_tail = &l->next;
    if (!e->resolving)
        mx_start_entry(r, e);
    return l;
}

void mx_resolve_cancel(struct mx_lookup *l)
{
    if (l != NULL)
        l->cb = NULL;
}

struct mx_resolver *mx_resolver_new(uv_loop_t *loop, struct dns *dns,
                                    const struct mx_resolver_opts *opts)
{
    struct mx_resolver *r = xcalloc(1, sizeof(*r));

    r->loop = loop;
    r->dns = dns;
    r->opts = *opts;
    if (r->opts.prefer != AF_INET6)
        r->opts.prefer = AF_INET;
    r->ready_tail = &r->ready;
    r->rnd = uv_hrtime() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)r;
    if (r->rnd == 0)
        r->rnd = 88172645463325252ULL;
    uv_timer_init(loop, &r->timer);
    r->timer.data = r;
    return r;
}

static void mx_timer_closed(uv_handle_t *h)
{
    struct mx_resolver *r = h->data;

    r->timer_closed = 1;
    mx_maybe_free(r);
}

void mx_resolver_close(struct mx_resolver *r)
{
    if (r->closing)
        return;
    r->closing = 1;
    for (size_t b = 0; b < MX_CACHE_BUCKETS; b++)
        for (struct mx_entry *e = r->buckets[b]; e; e = e->next)
            for (struct mx_lookup *l = e->waiters; l; l = l->next)
                l->cb = NULL;
    for (struct mx_lookup *l = r->ready; l; l = l->next)
        l->cb = NULL;
    uv_timer_stop(&r->timer);
    uv_close((uv_handle_t *)&r->timer, mx_timer_closed);
}
