/*
 * policy: the routing policy, as a pure module.
 *
 * Given the operator's thresholds (a policy_config), the live state of every
 * route (a policy_state the router fills from Redis and from its transports),
 * the facts about one message for one destination domain (a policy_msg), a
 * random number and the time, policy_decide() picks one route or HOLD, with
 * a short reason. The module does no I/O, reads no clock and draws no random
 * numbers: time and randomness are arguments, so every router sharing one
 * Redis computes the same answer from the same inputs, and the tests can
 * replay any situation. docs/policy.md describes the model, the precedence of
 * the rules and every key with its default, for operators.
 *
 * Configuration is a set of string keys (the same strings in the INI file,
 * in the Redis hash <prefix>policy and in `mailferryctl policy set`):
 *
 *   route.<name>.<key>        per-route keys; in the file they are the keys
 *                             of the section [route <name>], handed over with
 *                             policy_config_set_route()
 *   pin.sender.<domain>       target for mail from that sender domain
 *   pin.rcpt.<domain>         target for mail to that recipient domain
 *   pin.class.<class>         target for that X-Mailferry-Class
 *   split.class.<class>       weighted target for that class
 *   split.default             weighted target for everything else
 *   never_via.sender          sender domains that never leave via a third party
 *   throttle.patterns         what a "rate limited" 4xx reply looks like
 *
 * A target is "hold", or a comma list of "route[:weight]" items, optionally
 * with the item "strict" (no overflow away from the chosen route), e.g.
 * "relay", "relay:90,api:10", "relay,strict". "none" or "" removes a pin or
 * split.
 *
 * The router's life cycle, in order:
 *   1. cfg = policy_config_new(); for each [route NAME] key:
 *      policy_config_set_route(); a key that answers POLICY_E_NOT_POLICY
 *      belongs to the transport. Global keys (the [policy] section) go
 *      through policy_config_set().
 *   2. policy_config_check(): cross-key validation (references, bounds).
 *   3. policy_config_freeze_routes(): the file fixed the set of routes.
 *   4. Every second: live = policy_config_clone(base); apply every field of
 *      <prefix>policy with policy_config_set(); policy_config_check(); on
 *      success swap live in, else keep the previous config and log the
 *      error. Nothing of a rejected key is ever applied.
 *   5. Per (message, destination domain): fill a policy_state for the
 *      config in use, call policy_decide(), log and count the reason.
 *
 * Ownership: a policy_config owns every string in it. Pointers returned by
 * accessors (route names) stay valid until the config is freed or reset.
 * policy_state, policy_msg and everything they point to are borrowed for the
 * duration of one call only. A policy_decision holds no pointers. A config
 * is not modified by any function taking it const, so one config may be
 * read from several threads at once.
 */
#ifndef MF_POLICY_H
#define MF_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Hard limits; exceeding them is a configuration error. */
#define POLICY_MAX_ROUTES 32          /* routes in one config */
#define POLICY_ROUTE_NAME_MAX 32      /* bytes of a route name, [A-Za-z0-9_-] */
#define POLICY_REASON_MAX 288         /* policy_decision.text, with its NUL */

/* Return codes of the configuration functions. */
#define POLICY_OK 0
#define POLICY_E_INVALID (-1)         /* bad key or value; nothing applied */
#define POLICY_E_NOT_POLICY (-2)      /* not a policy key (e.g. a transport
                                         setting); nothing applied */

/* The index of a route, or POLICY_HOLD in a decision. */
#define POLICY_HOLD (-1)

enum policy_transport {
    POLICY_TRANSPORT_NONE = 0,        /* route.<name>.transport not set yet */
    POLICY_TRANSPORT_RELAY,
    POLICY_TRANSPORT_API,
    POLICY_TRANSPORT_SMTP,
};

struct policy_config;

/* ---- Configuration ---------------------------------------------------- */

/* Creates a config holding the built-in defaults and no routes. */
struct policy_config *policy_config_new(void);

/* Frees cfg and everything in it. NULL is allowed. */
void policy_config_free(struct policy_config *cfg);

/* Returns a deep copy (including the frozen flag); the router overlays the
 * live overrides on a copy of the file's config. */
struct policy_config *policy_config_clone(const struct policy_config *cfg);

/* Returns cfg to the state of policy_config_new(): no routes, no pins, no
 * splits, default global keys, not frozen. */
void policy_config_reset(struct policy_config *cfg);

/*
 * Validates one key and value and applies them. Leading and trailing
 * blanks of key and value are ignored; domain, class and route names in
 * keys are case-insensitive (stored in lower case).
 *
 * Returns POLICY_OK; POLICY_E_INVALID with one line in err naming the key
 * and why, e.g. `route.relay.cap_minute: must be an integer between 0 and
 * 1000000000000, got "lots"`, and nothing applied; or POLICY_E_NOT_POLICY
 * when the key is not the policy's: a route key the policy does not own
 * (route.<name>.host, ...), which the router hands to the transport, or a
 * key outside the policy's namespaces. err may be NULL when errlen is 0.
 *
 * Any route.<name>.* policy key creates the route if it does not exist,
 * unless the config is frozen (then an unknown route is POLICY_E_INVALID,
 * and so is a change of route.<name>.transport). References to routes in
 * overflow, pins and splits are checked here once frozen, and by
 * policy_config_check() in any case.
 */
int policy_config_set(struct policy_config *cfg, const char *key, const char *value,
                      char *err, size_t errlen);

/* policy_config_set() of "route.<route>.<key>": for the keys of an INI
 * section [route <route>]. */
int policy_config_set_route(struct policy_config *cfg, const char *route, const char *key,
                            const char *value, char *err, size_t errlen);

/*
 * Checks the config as a whole: at least one route; every route has a
 * transport; overflow, pins and splits name existing routes;
 * breaker_cooldown_max >= breaker_cooldown; throttle_backoff_max >=
 * throttle_backoff; warmup_start and warmup_caps set together. Returns
 * POLICY_OK or POLICY_E_INVALID with the first problem in err.
 */
int policy_config_check(const struct policy_config *cfg, char *err, size_t errlen);

/* From now on policy_config_set() refuses to create routes or to change a
 * route's transport: live overrides can tune routes but not invent them. */
void policy_config_freeze_routes(struct policy_config *cfg);

/*
 * Writes the current value of key into out (size n, truncated to fit),
 * in the canonical form policy_config_set() accepts. Pins and splits that
 * are not set read as "none". Returns POLICY_OK, POLICY_E_INVALID (bad
 * key, unknown route; message in out) or POLICY_E_NOT_POLICY.
 */
int policy_config_get(const struct policy_config *cfg, const char *key, char *out, size_t n);

/*
 * Calls fn once per key with its canonical value, in a stable order (global
 * keys, pins and splits sorted by key, then every key of every route in
 * route order), including keys that hold their default; is_set is true when
 * the key was set explicitly rather than left at its default. The strings
 * are valid during the call only. This is `mailferryctl policy get`.
 */
void policy_config_list(const struct policy_config *cfg,
                        void (*fn)(void *ctx, const char *key, const char *value, bool is_set),
                        void *ctx);

/* ---- Routes ----------------------------------------------------------- */

/* Routes are indexed 0..count-1 in the order they were created; the index
 * is stable for the life of the config and is preserved by clone (so a
 * state filled for the base config fits its live copies). */
size_t policy_route_count(const struct policy_config *cfg);

/* Index of the route called name (case-insensitive), or -1. */
int policy_route_find(const struct policy_config *cfg, const char *name);

/* What the router needs to know about a route (values resolved: defaults
 * applied). name points into cfg. */
struct policy_route_info {
    const char *name;
    enum policy_transport transport;
    int priority;
    bool enabled;
    bool third_party;
    bool domain_breaker;      /* per destination domain breakers in use */
    int64_t window_ms;        /* the sliding window of policy_window */
};

/* Fills *out for route index i < policy_route_count(cfg). */
void policy_route_info(const struct policy_config *cfg, size_t i, struct policy_route_info *out);

/* Name of a transport ("relay", "api", "smtp", "none"). */
const char *policy_transport_name(enum policy_transport t);

/*
 * The IP warm-up day of route i at now_ms: 1 on the UTC day of warmup_start
 * (and on days before it: a schedule that has not started yet already
 * limits the route to its first day), N on the last listed day, 0 when the
 * route has no warm-up or it is over.
 */
int policy_warmup_day(const struct policy_config *cfg, size_t i, int64_t now_ms);

/* The daily cap of route i at now_ms: the warm-up day's cap (or cap_day if
 * lower and not 0) during warm-up, else cap_day. 0 means no cap. */
uint64_t policy_route_day_cap(const struct policy_config *cfg, size_t i, int64_t now_ms);

/* Every cap of route i that applies to mail for rcpt_domain at now_ms
 * (0 = no cap): the route's minute, hour and day caps (the day cap with the
 * warm-up applied) and the destination domain's (domain_caps.<domain> for
 * the domain or a parent, else domain_cap_*). The router enforces these
 * atomically in Redis with the same rule as policy_decide(): a group fits
 * when the bucket is empty or count + nrcpt <= cap. */
struct policy_caps {
    int64_t minute, hour, day;
    int64_t domain_minute, domain_hour, domain_day;
};
void policy_route_caps(const struct policy_config *cfg, size_t i, const char *rcpt_domain,
                       int64_t now_ms, struct policy_caps *out);

/* ---- Live state -------------------------------------------------------- */

/*
 * Deliveries counted in fixed UTC buckets: the current minute
 * (floor(now/60 s)), hour and day (UTC midnight). The router increments the
 * route's and the route+domain's counters by the number of recipients when
 * it commits to a decision (not when the delivery ends), so that concurrent
 * routers overshoot a cap by as little as possible.
 */
struct policy_counts {
    uint64_t minute;
    uint64_t hour;
    uint64_t day;
};

enum policy_breaker_state {
    POLICY_BREAKER_CLOSED = 0,  /* traffic flows */
    POLICY_BREAKER_OPEN,        /* no traffic until the cool-down ends */
    POLICY_BREAKER_HALF_OPEN,   /* probe_fraction of traffic, as probes */
};

/* Why a breaker opened. */
enum policy_cause {
    POLICY_CAUSE_NONE = 0,
    POLICY_CAUSE_BOUNCE,        /* bounce rate above bounce_rate_max */
    POLICY_CAUSE_DEFERRAL,      /* deferral rate above deferral_rate_max */
    POLICY_CAUSE_COMPLAINT,     /* complaint rate above complaint_rate_max */
    POLICY_CAUSE_PROBE,         /* a probe failed while half open */
    POLICY_CAUSE_HEALTH,        /* the route's transport turned unhealthy
                                   (policy_breaker_trip) */
};

/*
 * A circuit breaker, persisted by the router (policy_breaker_format/parse)
 * once per route and once per (route, destination domain). The all-zero
 * value is a closed breaker that never tripped.
 */
struct policy_breaker {
    enum policy_breaker_state state;
    int64_t since_ms;           /* when the current state was entered */
    int64_t cooldown_ms;        /* cool-down of the current open period; 0 =
                                   breaker_cooldown */
    uint32_t trips;             /* times it opened (closed->open, half_open->open) */
    enum policy_cause cause;    /* why it last opened; NONE when closed */
};

/*
 * Outcomes over the route's sliding window (policy_route_info.window_ms),
 * for the route as a whole or for the route and one destination domain.
 * sent counts finished attempts (delivered, deferred or bounced); the rates
 * are bounced/sent, deferred/sent and complained/sent, and are only judged
 * when sent >= min_samples.
 *
 * probe_ok and probe_bad count probe outcomes (policy_decision.probe_*)
 * since the breaker entered half_open: a probe is good when its reply
 * classifies as POLICY_REPLY_OK, bad otherwise. The router keeps them in
 * counters keyed by the breaker's since_ms, so they start from zero in
 * each half-open period and every router reads the same values.
 */
struct policy_window {
    uint64_t sent;
    uint64_t bounced;
    uint64_t deferred;
    uint64_t complained;
    uint64_t probe_ok;
    uint64_t probe_bad;
};

/* A destination domain's backoff on a route. All zero: no backoff. */
struct policy_throttle {
    int64_t until_ms;           /* backoff ends; no backoff when <= now */
    uint32_t level;             /* consecutive throttles, 1 = first */
};

/* The live state of one route as seen for one message's destination
 * domain. Zero-initialise it, then fill what is known: note that healthy
 * must be set, a route whose health is unknown is treated as down. */
struct policy_route_state {
    bool healthy;                       /* transport up, self-check passing */
    struct policy_counts sent;          /* the route's counters */
    struct policy_counts domain_sent;   /* the route's counters for rcpt_domain */
    struct policy_breaker breaker;      /* route-wide breaker */
    struct policy_breaker domain_breaker;  /* (route, rcpt_domain) breaker */
    struct policy_throttle throttle;    /* (route, rcpt_domain) backoff */
};

/* routes[i] is the state of route i of the config passed to
 * policy_decide(); nroutes must equal policy_route_count(cfg). */
struct policy_state {
    const struct policy_route_state *routes;
    size_t nroutes;
};

/* ---- Decisions --------------------------------------------------------- */

/* One message for one destination domain. All strings may be NULL or "". */
struct policy_msg {
    const char *sender_domain;  /* envelope sender's domain; "" for <> */
    const char *rcpt_domain;    /* destination domain of this recipient group */
    const char *msg_class;      /* X-Mailferry-Class, e.g. "bulk" */
    uint64_t size;              /* bytes */
    uint32_t nrcpt;             /* recipients in the group; 0 counts as 1 */
    uint32_t attempts;          /* delivery attempts already made */
};

/*
 * Why a decision was made. The names (policy_reason_name) form a small,
 * fixed set, fit for a metrics label; policy_decision.text is the name,
 * followed for some reasons by ":" and a detail for logs (the throttled
 * domain, the rule that holds).
 */
enum policy_reason {
    POLICY_R_PRIMARY = 0,       /* "primary": first route by priority */
    POLICY_R_PIN_SENDER,        /* "pin:sender_domain" */
    POLICY_R_PIN_RCPT,          /* "pin:rcpt_domain" */
    POLICY_R_PIN_CLASS,         /* "pin:class" */
    POLICY_R_SPLIT_CLASS,       /* "split:class" */
    POLICY_R_SPLIT,             /* "split" */
    POLICY_R_PROBE,             /* "probe": a half-open breaker's probe */
    /* The chosen route is not the intended one; why the intended one
     * (the first in the chain) could not take the message: */
    POLICY_R_OVERFLOW_DISABLED,           /* "overflow:disabled" */
    POLICY_R_OVERFLOW_NEVER_VIA,          /* "overflow:never_via" */
    POLICY_R_OVERFLOW_UNHEALTHY,          /* "overflow:unhealthy" */
    POLICY_R_OVERFLOW_TOO_BIG,            /* "overflow:too_big" */
    POLICY_R_OVERFLOW_ATTEMPTS,           /* "overflow:attempts" */
    POLICY_R_OVERFLOW_BREAKER_OPEN,       /* "overflow:breaker_open" */
    POLICY_R_OVERFLOW_BREAKER_HALF_OPEN,  /* "overflow:breaker_half_open" */
    POLICY_R_OVERFLOW_DOMAIN_BREAKER_OPEN,       /* "overflow:domain_breaker_open" */
    POLICY_R_OVERFLOW_DOMAIN_BREAKER_HALF_OPEN,  /* "overflow:domain_breaker_half_open" */
    POLICY_R_THROTTLED,                   /* "throttled" (text "throttled:<domain>") */
    POLICY_R_OVERFLOW_CAP_DAY,            /* "overflow:cap_day" */
    POLICY_R_OVERFLOW_WARMUP_CAP,         /* "overflow:warmup_cap" */
    POLICY_R_OVERFLOW_CAP_HOUR,           /* "overflow:cap_hour" */
    POLICY_R_OVERFLOW_CAP_MINUTE,         /* "overflow:cap_minute" */
    POLICY_R_OVERFLOW_DOMAIN_CAP_DAY,     /* "overflow:domain_cap_day" */
    POLICY_R_OVERFLOW_DOMAIN_CAP_HOUR,    /* "overflow:domain_cap_hour" */
    POLICY_R_OVERFLOW_DOMAIN_CAP_MINUTE,  /* "overflow:domain_cap_minute" */
    /* HOLD: keep the message queued and retry later. */
    POLICY_R_HOLD_RULE,         /* "hold:rule": a pin or split says hold (text
                                   "hold:rule:pin:sender_domain", "hold:rule:split") */
    POLICY_R_HOLD_NEVER_VIA,    /* "hold:never_via": only third parties left */
    POLICY_R_HOLD_ALL_CAPPED,   /* "hold:all_capped": every route's cap is spent */
    POLICY_R_HOLD_THROTTLED,    /* "hold:throttled" (text "hold:throttled:<domain>") */
    POLICY_R_HOLD_STRICT,       /* "hold:strict": a strict pin's route can't */
    POLICY_R_HOLD_NO_ROUTE,     /* "hold:no_route": nothing can take it */
    POLICY_R__COUNT
};

/* The metrics name of a reason, e.g. "overflow:cap_minute". */
const char *policy_reason_name(enum policy_reason r);

struct policy_decision {
    int route;                  /* route index, or POLICY_HOLD */
    int intended;               /* first route of the chain; -1 if none */
    enum policy_reason reason;
    char text[POLICY_REASON_MAX];  /* reason for the log line */
    bool probe_route;           /* the delivery probes the route breaker */
    bool probe_domain;          /* ... and/or the (route, domain) breaker */
    int64_t retry_at_ms;        /* HOLD: earliest time a route of the chain
                                   frees up (cap bucket, backoff or cool-down
                                   end); 0 when none is known */
};

/*
 * Decides where m goes. rnd is a number in [0, 1) that the router derives
 * from a hash of the queue id, so that retries of a message fall on the
 * same side of a split (values outside are clamped). now_ms is the time
 * in milliseconds since the epoch. The half-open probe draw uses the
 * fractional part of rnd * 65536, which does not depend on the side of a
 * split rnd fell on.
 *
 * Precedence (docs/policy.md): the intended route is the first of sender
 * pin, recipient pin, class pin, class split, default split, lowest
 * priority. From there the chain is walked: a route that cannot take the
 * message (disabled, third party for a never_via sender, unhealthy, too
 * big, attempts, breaker, domain breaker, throttled, cap, domain cap -- in
 * that order) hands over to its overflow route, unless the pin is strict
 * or the throttled route has throttle_overflow = no; then HOLD.
 *
 * Returns 0 and fills *out, or -1 when st does not fit cfg (nroutes).
 */
int policy_decide(const struct policy_config *cfg, const struct policy_state *st,
                  const struct policy_msg *m, double rnd, int64_t now_ms,
                  struct policy_decision *out);

/* ---- Breakers ---------------------------------------------------------- */

enum policy_transition {
    POLICY_T_NONE = 0,          /* "none" */
    POLICY_T_OPEN,              /* "closed->open": a rate crossed its maximum */
    POLICY_T_HALF_OPEN,         /* "open->half_open": the cool-down ended */
    POLICY_T_CLOSE,             /* "half_open->closed": probes good, rates low */
    POLICY_T_REOPEN,            /* "half_open->open": a probe failed, cool-down doubled */
};

enum policy_scope {
    POLICY_SCOPE_ROUTE = 0,     /* the route-wide breaker */
    POLICY_SCOPE_DOMAIN,        /* a (route, destination domain) breaker */
};

const char *policy_transition_name(enum policy_transition t);
const char *policy_breaker_state_name(enum policy_breaker_state s);
const char *policy_cause_name(enum policy_cause c);

/*
 * Computes the next state of a breaker of route i from its current state,
 * its window and the time; returns the transition (POLICY_T_NONE when the
 * state stays). Deterministic, so the router may run it on any router and
 * persist *next when the transition is not NONE. cur and next may point to
 * the same struct.
 *
 *   closed:    sent >= min_samples and a rate > its maximum -> open
 *   open:      now >= since + cool-down -> half_open
 *   half_open: probe_bad > 0 -> open, cool-down doubled up to
 *              breaker_cooldown_max; probe_ok >= probe_successes and
 *              (sent < min_samples or every rate < maximum * recover_ratio)
 *              -> closed. Otherwise it stays half open: the band between
 *              maximum * recover_ratio and maximum is the hysteresis that
 *              keeps a rate hovering at the maximum from flapping.
 *
 * A domain-scope breaker of a route with domain_breaker = no never changes.
 */
enum policy_transition policy_breaker_step(const struct policy_config *cfg, size_t i,
                                           enum policy_scope scope,
                                           const struct policy_breaker *cur,
                                           const struct policy_window *w, int64_t now_ms,
                                           struct policy_breaker *next);

/*
 * Opens the route-wide breaker of route i at once, for a cause found
 * outside the window (POLICY_CAUSE_HEALTH: the router saw the route's
 * transport turn unhealthy, e.g. the relay listed on a DNSBL or its tunnel
 * down), so that the route comes back through the half-open probes:
 *
 *   closed:    -> open for breaker_cooldown (POLICY_T_OPEN)
 *   half_open: -> open with the cool-down doubled up to
 *                 breaker_cooldown_max, as after a failed probe
 *                 (POLICY_T_REOPEN)
 *   open:      stays (POLICY_T_NONE)
 *
 * Deterministic like policy_breaker_step(); cur and next may be the same.
 */
enum policy_transition policy_breaker_trip(const struct policy_config *cfg, size_t i,
                                           const struct policy_breaker *cur,
                                           enum policy_cause cause, int64_t now_ms,
                                           struct policy_breaker *next);

/* Writes b as "state=open since=<ms> cooldown=<ms> trips=<n> cause=<name>"
 * into out (size n; 128 bytes always suffice). Returns out. */
const char *policy_breaker_format(const struct policy_breaker *b, char *out, size_t n);

/* Parses the format above (fields in any order, missing ones zero;
 * "state" is required). Returns 0, or -1 on anything else. */
int policy_breaker_parse(const char *s, struct policy_breaker *b);

/* ---- Destination throttling -------------------------------------------- */

enum policy_reply {
    POLICY_REPLY_OK = 0,        /* 2xx: delivered */
    POLICY_REPLY_TEMP,          /* 4xx, or a code that is not 2xx/4xx/5xx */
    POLICY_REPLY_PERM,          /* 5xx */
    POLICY_REPLY_THROTTLE,      /* 4xx matching a throttle.patterns entry */
};

const char *policy_reply_name(enum policy_reply r);

/*
 * Classifies a transport's reply (code e.g. 421; enhanced e.g. "4.7.28",
 * RFC 3463, may be NULL; text may be NULL). A 4xx reply is THROTTLE when
 * one of throttle.patterns occurs in enhanced or in text, compared without
 * regard to case; a pattern that begins (ends) with a digit must not be
 * preceded (followed) by another digit of the same code, so "4.7.2" does
 * not match "4.7.28". 5xx replies are never throttles (RFC 5321 section
 * 4.2.1: they are permanent).
 */
enum policy_reply policy_classify_reply(const struct policy_config *cfg, int code,
                                        const char *enhanced, const char *text);

/*
 * A throttle reply from the destination domain on route i arrived at
 * now_ms: computes the new backoff. While a backoff is running (now <
 * until), replies from deliveries already in flight change nothing. A
 * throttle within throttle_backoff_max after the previous backoff ended is
 * a repeat: the level grows and the backoff doubles (throttle_backoff *
 * 2^(level-1), at most throttle_backoff_max); later, the level starts over
 * at 1. cur and next may point to the same struct.
 */
void policy_throttle_hit(const struct policy_config *cfg, size_t i,
                         const struct policy_throttle *cur, int64_t now_ms,
                         struct policy_throttle *next);

/* Writes t as "until=<ms> level=<n>"; parses it back (0 or -1). */
const char *policy_throttle_format(const struct policy_throttle *t, char *out, size_t n);
int policy_throttle_parse(const char *s, struct policy_throttle *t);

#endif
