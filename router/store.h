/*
 * store: the router's side of the queue in Redis (lib/schema.h,
 * docs/queue.md). Every Redis command the router sends is built here, so
 * the rest of the router deals in messages, recipients and routes.
 *
 * Two connections: one for blocking stream reads (XREADGROUP ... BLOCK),
 * which would otherwise hold up everything queued behind them, and one for
 * all other commands.
 *
 * Every callback is called exactly once, from the loop. status is 0 on
 * success, or -1 with err describing a Redis failure (the caller retries
 * later: nothing here is half-applied, each write is one MULTI/EXEC or
 * one script).
 */
#ifndef MF_STORE_H
#define MF_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "lib/config.h"
#include "router/policy.h"

struct store;

/* The state of one recipient, as kept in field st:<i> of the message. */
enum store_rcpt_state {
    STORE_RCPT_PENDING = 0,      /* never tried */
    STORE_RCPT_DEFERRED,         /* tried, will be tried again */
    STORE_RCPT_DELIVERED,        /* final */
    STORE_RCPT_FAILED,           /* final */
};

struct store_rcpt {
    char *addr;
    enum store_rcpt_state state;
    int code;
    char enh[16];
    char *text;                  /* last reply text, may be NULL */
    char *route;                 /* route of the last attempt, may be NULL */
    char *remote;                /* who answered, may be NULL */
    int64_t t;                   /* time of the last attempt, ms */
    int attempts;
    int bounced;                 /* a DSN for this failure was queued */
    /* Route this recipient must be retried through, or NULL: set when a
     * delivery ended ambiguously (the first route may have delivered it)
     * and that route does not allow resending elsewhere. */
    char *pin;
    int dirty;                   /* changed since loaded: written by the
                                    finish functions */
};

/* One message as loaded from msg:<id>. */
struct store_msg {
    char id[64];
    char *from;                  /* "" for the null sender */
    char *data;
    size_t len;
    char *cls;                   /* "" when none */
    int64_t created;
    int attempts;
    struct store_rcpt *rcpts;
    size_t nrcpts;
};

void store_msg_free(struct store_msg *m);

/* A queue entry: stream entry id and message id. */
struct store_entry {
    char stream_id[48];
    char msg_id[64];
};

struct store *store_new(uv_loop_t *loop, const struct mf_config *cfg);
void store_close(struct store *s, void (*closed)(void *arg), void *arg);
int store_ready(const struct store *s);

typedef void (*store_entries_cb)(struct store_entry *v, size_t n, int status, void *arg);

/* XREADGROUP: new entries (own_pending 0) or this consumer's own unacked
 * entries from an earlier life (own_pending 1), at most count, blocking
 * up to block_ms for new ones. */
void store_read(struct store *s, int count, int block_ms, int own_pending,
                store_entries_cb cb, void *arg);

/* XAUTOCLAIM: entries idle longer than [router] claim_idle. */
void store_claim(struct store *s, int count, store_entries_cb cb, void *arg);

/* Resets the idle time of entries this router is working on (XCLAIM
 * JUSTID), so that no other router claims them while they are alive. */
void store_touch(struct store *s, const char *const *stream_ids, size_t n);

/* Moves messages whose retry time has come from <prefix>retry to
 * <prefix>ready (one script, atomic). */
void store_promote(struct store *s, int64_t now_ms);

typedef void (*store_msg_cb)(struct store_msg *m, int status, const char *err, void *arg);

/* Loads msg:<id>. m is NULL with status 0 when the message does not exist
 * (deleted); the callee owns m and frees it with store_msg_free(). */
void store_load(struct store *s, const char *id, store_msg_cb cb, void *arg);

/*
 * Queue depth, for metrics, read atomically: ready counts entries of
 * <prefix>ready that no router has read yet (the consumer group's lag),
 * inflight entries read and not acknowledged, retry the members of
 * <prefix>retry, dead the entries of <prefix>dead. All zero with status
 * -1 on a Redis failure.
 */
struct store_depth {
    long long ready, inflight, retry, dead;
};

typedef void (*store_depth_cb)(const struct store_depth *d, int status, void *arg);

void store_depth(struct store *s, store_depth_cb cb, void *arg);

/* ---- policy inputs ---- */

typedef void (*store_reserve_cb)(int ok, const struct policy_counts *route,
                                 const struct policy_counts *domain, int status, void *arg);

/* Atomically checks every cap and, when the group fits, adds nrcpt to the
 * route's and the route+domain's minute/hour/day counters. ok 0 means a
 * cap is spent; the counts are the current ones either way. */
void store_reserve(struct store *s, const char *route, const char *domain, int64_t now_ms,
                   uint32_t nrcpt, const struct policy_caps *caps, store_reserve_cb cb,
                   void *arg);

/* The per-route part of the live state, for every route, from one read:
 * counters, route-wide breaker and reputation window (for breaker steps);
 * and the live policy hash. Refreshed by the router every policy_refresh. */
struct store_route_snapshot {
    struct policy_counts sent;
    struct policy_breaker breaker;
    char breaker_raw[160];       /* as stored, for compare-and-set */
    struct policy_window window;
};

struct store_snapshot {
    struct store_route_snapshot *routes;   /* one per route, in config order */
    size_t nroutes;
    char **policy_keys;                    /* <prefix>policy fields */
    char **policy_values;
    size_t npolicy;
};

void store_snapshot_free(struct store_snapshot *sn);

typedef void (*store_snapshot_cb)(struct store_snapshot *sn, int status, void *arg);

/* Reads the snapshot for the routes of cfg (names) at now_ms. */
void store_snapshot(struct store *s, const struct policy_config *cfg, int64_t now_ms,
                    store_snapshot_cb cb, void *arg);

/* The per-destination part: for each route, its counters for domain, the
 * (route, domain) breaker and the (route, domain) throttle. */
struct store_domain_state {
    struct policy_counts sent;
    struct policy_breaker breaker;
    char breaker_raw[160];
    struct policy_throttle throttle;
};

typedef void (*store_domain_cb)(struct store_domain_state *v, size_t n, int status, void *arg);

void store_domain(struct store *s, const struct policy_config *cfg, const char *domain,
                  int64_t now_ms, store_domain_cb cb, void *arg);

/* Reads the reputation window of (route, domain), domain NULL for the
 * route as a whole, with the probe counters of the half-open period that
 * began at probe_since_ms. */
typedef void (*store_window_cb)(const struct policy_window *w, int status, void *arg);
void store_window(struct store *s, const char *route, const char *domain, int64_t window_ms,
                  int64_t probe_since_ms, int64_t now_ms, store_window_cb cb, void *arg);

/* Replaces a breaker only if it still reads as old (another router may
 * have stepped it first). */
void store_breaker_cas(struct store *s, const char *route, const char *domain,
                       const char *old_raw, const char *new_raw);

/* Sets a (route, domain) throttle backoff, kept until it has ended. */
void store_throttle_set(struct store *s, const char *route, const char *domain,
                        const struct policy_throttle *t, int64_t now_ms);

/* ---- results ---- */

/* The outcome of one attempt for the recipients of one group. */
struct store_outcome {
    const char *route;           /* "hold" for held groups */
    const char *domain;
    const char *reason;          /* policy decision text */
    const size_t *idx;           /* recipient indexes in the message */
    size_t n;
    int64_t latency_ms;
    int64_t window_ms;           /* the route's reputation window */
    int probe_route;             /* count probe outcomes ... */
    int probe_domain;
    int64_t probe_route_since;   /* ... under these half-open periods */
    int64_t probe_domain_since;
    const char *provider_id;     /* API message id, "" or NULL when none */
};

/* Writes the new states of the group's recipients (already updated in
 * m->rcpts), one event per recipient, and the window, stats and probe
 * counters, in one MULTI/EXEC. Held groups (route "hold") only write
 * events and stats. */
void store_record(struct store *s, const struct store_msg *m, const struct store_outcome *o,
                  void (*cb)(int status, void *arg), void *arg);

/* Final step while recipients remain deferred: the state of recipients
 * marked dirty, attempts and next attempt time on the message,
 * <prefix>retry at due_ms, and the stream entry acknowledged, in one
 * MULTI/EXEC. */
void store_finish_retry(struct store *s, const struct store_msg *m, const char *stream_id,
                        int64_t due_ms, void (*cb)(int status, void *arg), void *arg);

/* Final step when every recipient is final: acknowledges the entry and
 * deletes the message; with dead_reason non-NULL the message is kept (with
 * its dirty recipient states written) and an entry goes to <prefix>dead
 * instead. */
void store_finish_done(struct store *s, const struct store_msg *m, const char *stream_id,
                       const char *dead_reason, void (*cb)(int status, void *arg), void *arg);

/* Acknowledges an entry whose message no longer exists. */
void store_ack(struct store *s, const char *stream_id);

/* Records a route's health as this router sees it (for mailferryctl). */
void store_health(struct store *s, const char *route, int healthy, const char *why,
                  int64_t now_ms);

/* Redis key helper: prefix + parts joined (for callers that log keys). */
const char *store_prefix(const struct store *s);

#endif
