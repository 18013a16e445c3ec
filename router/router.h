/*
 * router: takes messages from the queue (consumer group "routers" of
 * <prefix>ready), asks the routing policy where each destination domain's
 * recipients go, hands them to that route's transport, and records every
 * outcome in Redis: per-recipient state, events, counters, breakers,
 * throttles. Deferred recipients are retried on [router] retry_schedule,
 * failures bounce (RFC 3464) to the sender, messages that cannot bounce go
 * to <prefix>dead.
 *
 * Any number of routers share one Redis: caps are enforced by atomic
 * scripts, breakers are stepped with compare-and-set, and an entry whose
 * router died is claimed by another after [router] claim_idle seconds.
 * Delivery is at-least-once: a recipient whose outcome was written is never
 * sent again; one that was in flight when its router died may be.
 */
#ifndef MF_ROUTER_H
#define MF_ROUTER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "lib/config.h"
#include "lib/metrics.h"
#include "router/policy.h"
#include "router/store.h"
#include "transports/transport.h"

struct router;

/*
 * Builds the policy from the [route NAME] and [policy] sections of cfg and
 * creates each route's transport from the route's remaining keys. Used by
 * --check-config (loop NULL: nothing is started) and at start. Returns 0 or
 * -1 with a message naming the section and key in err.
 */
int router_check(const struct mf_config *cfg, char *err, size_t errlen);

/* Creates the router and starts consuming. cfg must outlive it. Returns
 * NULL with a message in err. */
struct router *router_new(uv_loop_t *loop, const struct mf_config *cfg, char *err,
                          size_t errlen);

/* Stops taking new work, lets deliveries in flight finish (transports fail
 * what they cannot finish with temporary results, which are recorded),
 * closes everything and calls done(arg) from the loop. */
void router_shutdown(struct router *r, void (*done)(void *arg), void *arg);

/*
 * SIGHUP: re-reads the routing policy from the configuration file at path
 * (thresholds, pins, splits: every [route NAME] and [policy] policy key)
 * and applies it, with the live overrides on top, from the next decision
 * on. The set of routes and their transports cannot change without a
 * restart: such a file is refused, as is any invalid one, and the running
 * policy stays. Returns 0 or -1 (logged).
 */
int router_reload(struct router *r, const char *path);

/* ---- for jobs (router/job.c) ---- */

struct store *router_store(struct router *r);
const struct mf_config *router_config(struct router *r);
uv_loop_t *router_loop(struct router *r);

/* The router's metric families in the default registry (lib/metrics.h,
 * docs/metrics.md), registered by router_new(); for jobs. */
struct router_metrics {
    struct metric_family *decisions;         /* counter {route, reason} */
    struct metric_family *deliveries;        /* counter {route, result, class} */
    struct metric_family *delivery_seconds;  /* histogram {route} */
    struct metric_family *breaker;           /* gauge {route} */
    struct metric_family *healthy;           /* gauge {route} */
    struct metric_family *queue;             /* gauge {state} */
};
const struct router_metrics *router_metrics(struct router *r);

/* The routing decision for one group, after the cap reservation. */
struct router_choice {
    int route;                   /* index, or POLICY_HOLD */
    char route_name[POLICY_ROUTE_NAME_MAX + 8];
    char reason[POLICY_REASON_MAX];
    int64_t retry_at_ms;         /* HOLD: earliest useful retry, 0 unknown */
    int probe_route, probe_domain;
    int64_t probe_route_since, probe_domain_since;
    int64_t window_ms;
    const struct transport_ops *ops;
    struct transport *transport; /* NULL for HOLD */
    /* The (route, domain) state the decision saw, for router_outcome(). */
    struct policy_throttle throttle;
    struct policy_breaker domain_breaker;
    char domain_breaker_raw[160];
};

typedef void (*router_choice_cb)(const struct router_choice *c, int status, void *arg);

/* Decides where the n recipients of domain in message m go, and reserves
 * the route's caps; status -1 on a Redis failure. */
void router_choose(struct router *r, const struct store_msg *m, const char *domain, uint32_t n,
                   router_choice_cb cb, void *arg);

/* The choice for a group whose recipients must go through one route (an
 * earlier ambiguous delivery): that route if it can take mail now, else
 * HOLD. Caps are reserved as for router_choose(). */
void router_choose_pinned(struct router *r, const struct store_msg *m, const char *domain,
                          uint32_t n, const char *route, router_choice_cb cb, void *arg);

/* After a group's outcome was recorded: throttle and breaker follow-up. */
void router_outcome(struct router *r, const struct router_choice *c, const char *domain,
                    const struct transport_result *res);

/* Enqueues a bounce message (null sender) to rcpt. cb(status, arg). */
void router_enqueue_bounce(struct router *r, const char *rcpt, const char *data, size_t len,
                           void (*cb)(int status, void *arg), void *arg);

/* Called by a job when it is over (whatever the outcome). */
void router_job_done(struct router *r, void *job);

#endif
