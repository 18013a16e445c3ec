/*
 * mx_resolve: where a domain's mail goes, found with lib/dns (c-ares) on
 * the libuv loop, and cached.
 *
 * RFC 5321 section 5.1: the domain's MX records, tried in order of
 * preference and at random among equal preferences (relay/mx.c); with no
 * MX record (NODATA) the domain itself is the "implicit MX" and its own
 * A/AAAA records are used; a null MX (RFC 7505) refuses the domain; an
 * address literal names the host directly. Every MX host's A and AAAA
 * records are looked up at once, and the result is a flat list of
 * addresses to try in order (hosts in MX order, each host's addresses with
 * the preferred family first).
 *
 * Cache. A lookup that succeeded, or failed for good (NXDOMAIN, null MX,
 * no address), is kept for cache_seconds (lib/dns does not report TTLs,
 * so this is a short fixed time); a temporary failure is not kept.
 * Concurrent lookups of one domain share one set of DNS queries. The MX
 * order among equal preferences is drawn anew for every lookup, also from
 * the cache.
 *
 * Callbacks are made exactly once per lookup, from the loop, never from
 * inside mx_resolve(), unless the lookup is cancelled first. The route
 * passed to a callback is valid only during it.
 */
#ifndef MF_RELAY_MX_RESOLVE_H
#define MF_RELAY_MX_RESOLVE_H

#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

#include "lib/dns.h"
#include "relay/mx.h"

/* One address to connect to. */
struct mx_target {
    char host[256];                   /* the MX host (or the domain, for an
                                         implicit MX or a literal) */
    struct sockaddr_storage ss;       /* port 0; the pool sets the port */
    socklen_t len;
    char ip[INET6_ADDRSTRLEN];
};

/* At most this many addresses are tried for one destination. */
#define MX_TARGETS_MAX 16

struct mx_route {
    const char *domain;               /* normalised (lower case, no dot) */
    int failed;                       /* 1: see failure, no targets */
    struct mx_failure failure;
    int implicit;                     /* no MX records: the domain's own
                                         addresses (RFC 5321 section 5.1) */
    const struct mx_target *targets;  /* in the order to try */
    size_t ntargets;
};

typedef void (*mx_resolve_cb)(const struct mx_route *route, void *arg);

struct mx_resolver_opts {
    /* Address families that can be used (the relay's source addresses),
     * and the one tried first for each host: AF_INET or AF_INET6. */
    int use_v4, use_v6;
    int prefer;
    unsigned cache_seconds;           /* 0: no cache */
};

struct mx_resolver;
struct mx_lookup;

/* dns must outlive the resolver (it is closed after it, see
 * mx_resolver_close()). */
struct mx_resolver *mx_resolver_new(uv_loop_t *loop, struct dns *dns,
                                    const struct mx_resolver_opts *opts);

/*
 * Looks up the route for domain (an ASCII domain or an address literal as
 * written after the '@'). Returns a handle for mx_resolve_cancel(), valid
 * until the callback has been made or the lookup is cancelled.
 */
struct mx_lookup *mx_resolve(struct mx_resolver *r, const char *domain, mx_resolve_cb cb,
                             void *arg);

/* No callback is made for l after this call. */
void mx_resolve_cancel(struct mx_lookup *l);

/*
 * Starts the teardown: pending lookups are cancelled (no callbacks). The
 * resolver frees itself once the DNS queries it started have completed,
 * which dns_close() forces; call dns_close() afterwards.
 */
void mx_resolver_close(struct mx_resolver *r);

#endif
