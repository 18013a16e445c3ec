/*
 * Unit tests for router/policy: table-driven decisions (each row: config
 * lines, route state, message, rnd, now -> route and reason), breaker
 * transitions and hysteresis, warm-up days, throttle backoff, reply
 * classification, configuration validation, get/list/clone.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "lib/buf.h"
#include "router/policy.h"

/* 2024-05-10 12:30:15 UTC, and the ends of its minute, hour and day. */
#define NOW INT64_C(1715344215000)
#define NEXT_MINUTE INT64_C(1715344260000)
#define NEXT_HOUR INT64_C(1715346000000)
#define NEXT_DAY INT64_C(1715385600000)
#define SEC INT64_C(1000)

/* rnd values whose probe draw, frac(rnd * 65536), is 0.05 (a probe at the
 * default probe_fraction 0.1) or 0.5 (not a probe); both fall at about
 * 0.61 on a split. */
#define RND_PROBE ((40000.0 + 0.05) / 65536.0)
#define RND_NOPROBE ((40000.0 + 0.5) / 65536.0)

#define MAXLINES 24
#define MAXROUTES 4

/* ---- Helpers ------------------------------------------------------------ */

/* policy_config_set() of key must accept value. */
static void set_ok(struct policy_config *cfg, const char *key, const char *value)
{
    char err[256];
    int rc = policy_config_set(cfg, key, value, err, sizeof(err));

    if (rc != POLICY_OK)
        fail_msg("\"%s\" = \"%s\": rc %d: %s", key, value, rc, err);
}

/* policy_config_get() of key must succeed and give want. */
static void assert_get(const struct policy_config *cfg, const char *key, const char *want)
{
    char val[256];

    assert_int_equal(policy_config_get(cfg, key, val, sizeof(val)), POLICY_OK);
    assert_string_equal(val, want);
}

/* Applies "key = value" lines; every one must be accepted. */
static void apply_lines(struct policy_config *cfg, const char *const *lines)
{
    char key[512];

    for (size_t i = 0; i < MAXLINES && lines[i]; i++) {
        const char *eq = strchr(lines[i], '=');
        size_t klen;

        assert_non_null(eq);
        klen = (size_t)(eq - lines[i]);
        assert_true(klen < sizeof(key));
        memcpy(key, lines[i], klen);
        key[klen] = '\0';
        set_ok(cfg, key, eq + 1);
    }
}

static struct policy_config *config_from(const char *const *lines)
{
    struct policy_config *cfg = policy_config_new();
    char err[256];

    apply_lines(cfg, lines);
    if (policy_config_check(cfg, err, sizeof(err)) != POLICY_OK)
        fail_msg("check: %s", err);
    return cfg;
}

/* One route's state in a table row. healthy unless down. */
struct rstate {
    const char *route;
    bool down;
    uint64_t m, h, d;               /* route counters */
    uint64_t dm, dh, dd;            /* route+domain counters */
    enum policy_breaker_state br;
    int64_t br_since;
    enum policy_breaker_state dbr;
    int64_t dbr_since;
    int64_t throttle_until;
};

static void build_state(const struct policy_config *cfg, const struct rstate *rs,
                        struct policy_route_state *routes, struct policy_state *st)
{
    size_t n = policy_route_count(cfg);

    assert_true(n <= MAXROUTES);
    memset(routes, 0, sizeof(*routes) * MAXROUTES);
    for (size_t i = 0; i < n; i++)
        routes[i].healthy = true;
    for (size_t i = 0; i < MAXROUTES && rs[i].route; i++) {
        int idx = policy_route_find(cfg, rs[i].route);
        struct policy_route_state *r;
        if (idx < 0)
            fail_msg("state names unknown route %s", rs[i].route);
        r = &routes[idx];
        r->healthy = !rs[i].down;
        r->sent = (struct policy_counts){rs[i].m, rs[i].h, rs[i].d};
        r->domain_sent = (struct policy_counts){rs[i].dm, rs[i].dh, rs[i].dd};
        r->breaker.state = rs[i].br;
        r->breaker.since_ms = rs[i].br_since;
        r->domain_breaker.state = rs[i].dbr;
        r->domain_breaker.since_ms = rs[i].dbr_since;
        r->throttle.until_ms = rs[i].throttle_until;
        r->throttle.level = rs[i].throttle_until ? 1 : 0;
    }
    st->routes = routes;
    st->nroutes = n;
}

static void assert_breaker_equal(const struct policy_breaker *a, const struct policy_breaker *b)
{
    assert_int_equal(a->state, b->state);
    assert_int_equal(a->since_ms, b->since_ms);
    assert_int_equal(a->cooldown_ms, b->cooldown_ms);
    assert_int_equal(a->trips, b->trips);
    assert_int_equal(a->cause, b->cause);
}

/* ---- Decisions ---------------------------------------------------------- */

struct decide_case {
    const char *name;
    const char *config[MAXLINES];
    struct rstate state[MAXROUTES];
    struct policy_msg msg;
    double rnd;
    int64_t now;                    /* 0: NOW */
    const char *route;              /* expected route name or "hold" */
    const char *text;               /* expected reason text */
    int64_t retry_at;               /* expected for holds; -1: don't check */
    int probe;                      /* 1 route probe, 2 domain probe, 3 both */
};

#define RELAY "route.relay.transport = relay", "route.relay.priority = 10"
#define API "route.api.transport = api", "route.api.priority = 20"
#define SMTP "route.smtp.transport = smtp", "route.smtp.priority = 30"
#define GMAIL {.sender_domain = "shop.example", .rcpt_domain = "gmail.com", .nrcpt = 1}
#define BANK {.sender_domain = "bank.example", .rcpt_domain = "gmail.com", .nrcpt = 1}
#define BULK {.sender_domain = "shop.example", .rcpt_domain = "gmail.com", \
              .msg_class = "bulk", .nrcpt = 1}

static const struct decide_case decide_cases[] = {
    /* Priority. */
    {"primary is the lowest priority", {RELAY, API}, {{0}}, GMAIL, 0.5, 0, "relay", "primary", -1, 0},
    {"priority, not creation order", {RELAY, API, "route.api.priority = 5"}, {{0}}, GMAIL, 0.5, 0,
     "api", "primary", -1, 0},
    {"NULL message fields", {RELAY, API}, {{0}}, {0}, 0.5, 0, "relay", "primary", -1, 0},

    /* Health. */
    {"unhealthy overflows at once", {RELAY, API}, {{"relay", .down = true}}, GMAIL, 0.5, 0, "api",
     "overflow:unhealthy", -1, 0},
    {"all unhealthy holds, no retry time", {RELAY, API},
     {{"relay", .down = true}, {"api", .down = true}}, GMAIL, 0.5, 0, "hold", "hold:no_route", 0, 0},
    {"unhealthy beats breaker in the reason", {RELAY, API},
     {{"relay", .down = true, .br = POLICY_BREAKER_OPEN, .br_since = NOW}}, GMAIL, 0.5, 0, "api",
     "overflow:unhealthy", -1, 0},

    /* Route caps. */
    {"cap_minute spent overflows", {RELAY, API, "route.relay.cap_minute = 100"}, {{"relay", .m = 100}},
     GMAIL, 0.5, 0, "api", "overflow:cap_minute", -1, 0},
    {"cap_minute with room", {RELAY, API, "route.relay.cap_minute = 100"}, {{"relay", .m = 99}},
     GMAIL, 0.5, 0, "relay", "primary", -1, 0},
    {"group larger than the room left", {RELAY, API, "route.relay.cap_minute = 100"},
     {{"relay", .m = 99}}, {.rcpt_domain = "gmail.com", .nrcpt = 2}, 0.5, 0, "api",
     "overflow:cap_minute", -1, 0},
    {"empty bucket takes an oversize group", {RELAY, API, "route.relay.cap_minute = 10"},
     {{"relay", .m = 0}}, {.rcpt_domain = "gmail.com", .nrcpt = 50}, 0.5, 0, "relay", "primary", -1, 0},
    {"cap_hour", {RELAY, API, "route.relay.cap_hour = 1000"}, {{"relay", .h = 1000}}, GMAIL, 0.5, 0,
     "api", "overflow:cap_hour", -1, 0},
    {"cap_day", {RELAY, API, "route.relay.cap_day = 5000"}, {{"relay", .d = 5000}}, GMAIL, 0.5, 0,
     "api", "overflow:cap_day", -1, 0},
    {"day reported before minute", {RELAY, API, "route.relay.cap_minute = 10", "route.relay.cap_day = 50"},
     {{"relay", .m = 10, .d = 50}}, GMAIL, 0.5, 0, "api", "overflow:cap_day", -1, 0},
    {"0 is no cap", {RELAY, API}, {{"relay", .m = 1000000, .h = 1000000, .d = 1000000}}, GMAIL, 0.5,
     0, "relay", "primary", -1, 0},
    {"all capped holds until the next minute",
     {RELAY, API, "route.relay.cap_minute = 10", "route.api.cap_minute = 10"},
     {{"relay", .m = 10}, {"api", .m = 10}}, GMAIL, 0.5, 0, "hold", "hold:all_capped", NEXT_MINUTE, 0},
    {"all capped: retry at the earliest route, latest bucket of each",
     {RELAY, API, "route.relay.cap_minute = 10", "route.relay.cap_day = 10",
      "route.api.cap_hour = 10"},
     {{"relay", .m = 10, .d = 10}, {"api", .h = 10}}, GMAIL, 0.5, 0, "hold", "hold:all_capped",
     NEXT_HOUR, 0},

    /* Per-domain caps. */
    {"domain_cap_minute", {RELAY, API, "route.relay.domain_cap_minute = 20"}, {{"relay", .dm = 20}},
     GMAIL, 0.5, 0, "api", "overflow:domain_cap_minute", -1, 0},
    {"domain_cap_hour", {RELAY, API, "route.relay.domain_cap_hour = 200"}, {{"relay", .dh = 200}},
     GMAIL, 0.5, 0, "api", "overflow:domain_cap_hour", -1, 0},
    {"domain_cap_day", {RELAY, API, "route.relay.domain_cap_day = 2000"}, {{"relay", .dd = 2000}},
     GMAIL, 0.5, 0, "api", "overflow:domain_cap_day", -1, 0},
    {"route cap reported before domain cap",
     {RELAY, API, "route.relay.domain_cap_minute = 5", "route.relay.cap_minute = 5"},
     {{"relay", .m = 5, .dm = 5}}, GMAIL, 0.5, 0, "api", "overflow:cap_minute", -1, 0},
    {"domain_caps override for the domain",
     {RELAY, API, "route.relay.domain_cap_minute = 1000", "route.relay.domain_caps.gmail.com = 20,0,0"},
     {{"relay", .dm = 20}}, GMAIL, 0.5, 0, "api", "overflow:domain_cap_minute", -1, 0},
    {"domain_caps override covers subdomains",
     {RELAY, API, "route.relay.domain_caps.gmail.com = 20,0,0"}, {{"relay", .dm = 20}},
     {.rcpt_domain = "EU.Gmail.COM"}, 0.5, 0, "api", "overflow:domain_cap_minute", -1, 0},
    {"domain_caps override lifts the default",
     {RELAY, API, "route.relay.domain_cap_minute = 10", "route.relay.domain_caps.gmail.com = 0,0,0"},
     {{"relay", .dm = 500}}, GMAIL, 0.5, 0, "relay", "primary", -1, 0},
    {"other domains keep the default",
     {RELAY, API, "route.relay.domain_cap_minute = 10", "route.relay.domain_caps.gmail.com = 0,0,0"},
     {{"relay", .dm = 10}}, {.rcpt_domain = "yahoo.com"}, 0.5, 0, "api",
     "overflow:domain_cap_minute", -1, 0},

    /* Warm-up: day 3 of 50,100,200 on NOW. */
    {"warm-up day 3 with room",
     {RELAY, API, "route.relay.warmup_start = 2024-05-08", "route.relay.warmup_caps = 50,100,200"},
     {{"relay", .d = 199}}, GMAIL, 0.5, 0, "relay", "primary", -1, 0},
    {"warm-up day 3 cap spent",
     {RELAY, API, "route.relay.warmup_start = 2024-05-08", "route.relay.warmup_caps = 50,100,200"},
     {{"relay", .d = 200}}, GMAIL, 0.5, 0, "api", "overflow:warmup_cap", -1, 0},
    {"warm-up over: cap_day applies",
     {RELAY, API, "route.relay.warmup_start = 2024-05-01", "route.relay.warmup_caps = 50,100,200",
      "route.relay.cap_day = 10000"},
     {{"relay", .d = 9999}}, GMAIL, 0.5, 0, "relay", "primary", -1, 0},
    {"warm-up over: cap_day spent",
     {RELAY, API, "route.relay.warmup_start = 2024-05-01", "route.relay.warmup_caps = 50,100,200",
      "route.relay.cap_day = 10000"},
     {{"relay", .d = 10000}}, GMAIL, 0.5, 0, "api", "overflow:cap_day", -1, 0},
    {"warm-up not started: day 1 cap",
     {RELAY, API, "route.relay.warmup_start = 2024-06-01", "route.relay.warmup_caps = 50,100,200"},
     {{"relay", .d = 50}}, GMAIL, 0.5, 0, "api", "overflow:warmup_cap", -1, 0},
    {"warm-up hold until UTC midnight",
     {RELAY, "route.relay.warmup_start = 19853", "route.relay.warmup_caps = 50"},
     {{"relay", .d = 50}}, GMAIL, 0.5, 0, "hold", "hold:all_capped", NEXT_DAY, 0},

    /* Overflow chains. */
    {"explicit overflow skips the next by priority",
     {RELAY, API, SMTP, "route.relay.overflow = smtp", "route.relay.cap_minute = 1"},
     {{"relay", .m = 1}}, GMAIL, 0.5, 0, "smtp", "overflow:cap_minute", -1, 0},
    {"chain of three, reason from the intended route",
     {RELAY, API, SMTP, "route.relay.cap_minute = 1"}, {{"relay", .m = 1}, {"api", .down = true}},
     GMAIL, 0.5, 0, "smtp", "overflow:cap_minute", -1, 0},
    {"overflow = none ends the chain",
     {RELAY, API, "route.relay.overflow = none", "route.relay.cap_minute = 1"}, {{"relay", .m = 1}},
     GMAIL, 0.5, 0, "hold", "hold:all_capped", NEXT_MINUTE, 0},
    {"overflow cycle terminates",
     {RELAY, API, "route.relay.overflow = api", "route.api.overflow = relay"},
     {{"relay", .down = true}, {"api", .down = true}}, GMAIL, 0.5, 0, "hold", "hold:no_route", 0, 0},
    {"auto overflow returns to a lower priority number",
     {RELAY, API, "pin.rcpt.gmail.com = api"}, {{"api", .down = true}}, GMAIL, 0.5, 0, "relay",
     "overflow:unhealthy", -1, 0},
    {"disabled route", {RELAY, API, "route.relay.enabled = no"}, {{0}}, GMAIL, 0.5, 0, "api",
     "overflow:disabled", -1, 0},
    {"disabled routes do not spoil all_capped",
     {RELAY, API, "route.api.enabled = no", "route.relay.cap_minute = 3"}, {{"relay", .m = 3}},
     GMAIL, 0.5, 0, "hold", "hold:all_capped", NEXT_MINUTE, 0},
    {"mixed causes hold as no_route with the known time",
     {RELAY, API, "route.api.cap_minute = 3"}, {{"relay", .down = true}, {"api", .m = 3}}, GMAIL,
     0.5, 0, "hold", "hold:no_route", NEXT_MINUTE, 0},
    {"max_size", {RELAY, API, "route.relay.max_size = 10m"}, {{0}},
     {.rcpt_domain = "gmail.com", .size = 20u << 20}, 0.5, 0, "api", "overflow:too_big", -1, 0},
    {"max_size fits", {RELAY, API, "route.relay.max_size = 10m"}, {{0}},
     {.rcpt_domain = "gmail.com", .size = 10u << 20}, 0.5, 0, "relay", "primary", -1, 0},
    {"overflow_after_attempts reached", {RELAY, API, "route.relay.overflow_after_attempts = 3"},
     {{0}}, {.rcpt_domain = "gmail.com", .attempts = 3}, 0.5, 0, "api", "overflow:attempts", -1, 0},
    {"overflow_after_attempts not yet", {RELAY, API, "route.relay.overflow_after_attempts = 3"},
     {{0}}, {.rcpt_domain = "gmail.com", .attempts = 2}, 0.5, 0, "relay", "primary", -1, 0},

    /* Pins, precedence among them, strict and hold. */
    {"sender pin", {RELAY, API, "pin.sender.shop.example = api"}, {{0}}, GMAIL, 0.5, 0, "api",
     "pin:sender_domain", -1, 0},
    {"sender pin covers subdomains", {RELAY, API, "pin.sender.example = api"}, {{0}},
     {.sender_domain = "Mail.Shop.Example"}, 0.5, 0, "api", "pin:sender_domain", -1, 0},
    {"sender pin needs a label boundary", {RELAY, API, "pin.sender.op.example = api"}, {{0}},
     {.sender_domain = "shop.example"}, 0.5, 0, "relay", "primary", -1, 0},
    {"most specific pin wins",
     {RELAY, API, "pin.sender.example = api", "pin.sender.shop.example = relay"},
     {{0}}, GMAIL, 0.5, 0, "relay", "pin:sender_domain", -1, 0},
    {"rcpt pin", {RELAY, API, "pin.rcpt.gmail.com = api"}, {{0}}, GMAIL, 0.5, 0, "api",
     "pin:rcpt_domain", -1, 0},
    {"class pin, case-insensitive", {RELAY, API, "pin.class.bulk = api"}, {{0}},
     {.rcpt_domain = "gmail.com", .msg_class = "BULK"}, 0.5, 0, "api", "pin:class", -1, 0},
    {"sender pin beats rcpt pin",
     {RELAY, API, "pin.sender.shop.example = relay", "pin.rcpt.gmail.com = api"}, {{0}}, GMAIL, 0.5,
     0, "relay", "pin:sender_domain", -1, 0},
    {"rcpt pin beats class pin", {RELAY, API, "pin.rcpt.gmail.com = relay", "pin.class.bulk = api"},
     {{0}}, BULK, 0.5, 0, "relay", "pin:rcpt_domain", -1, 0},
    {"class pin beats class split",
     {RELAY, API, "pin.class.bulk = api", "split.class.bulk = relay:100,api:0"}, {{0}}, BULK, 0.5,
     0, "api", "pin:class", -1, 0},
    {"class split beats default split",
     {RELAY, API, "split.class.bulk = api", "split.default = relay"}, {{0}}, BULK, 0.5, 0, "api",
     "split:class", -1, 0},
    {"pin to an unhealthy route overflows (soft pin)", {RELAY, API, "pin.sender.shop.example = api"},
     {{"api", .down = true}}, GMAIL, 0.5, 0, "relay", "overflow:unhealthy", -1, 0},
    {"strict pin to an unhealthy route holds",
     {RELAY, API, "pin.sender.shop.example = api,strict"}, {{"api", .down = true}}, GMAIL, 0.5, 0,
     "hold", "hold:strict", 0, 0},
    {"strict pin to a capped route holds as capped",
     {RELAY, API, "pin.sender.shop.example = relay,strict", "route.relay.cap_hour = 5"},
     {{"relay", .h = 5}}, GMAIL, 0.5, 0, "hold", "hold:all_capped", NEXT_HOUR, 0},
    {"strict pin that can deliver", {RELAY, API, "pin.sender.shop.example = api,strict"}, {{0}},
     GMAIL, 0.5, 0, "api", "pin:sender_domain", -1, 0},
    {"pin to hold", {RELAY, API, "pin.rcpt.gmail.com = hold"}, {{0}}, GMAIL, 0.5, 0, "hold",
     "hold:rule:pin:rcpt_domain", 0, 0},
    {"default split to hold", {RELAY, API, "split.default = hold"}, {{0}}, GMAIL, 0.5, 0, "hold",
     "hold:rule:split", 0, 0},

    /* Splits. */
    {"split low side", {RELAY, API, "split.default = relay:90,api:10"}, {{0}}, GMAIL, 0.5, 0,
     "relay", "split", -1, 0},
    {"split high side", {RELAY, API, "split.default = relay:90,api:10"}, {{0}}, GMAIL, 0.95, 0,
     "api", "split", -1, 0},
    {"split boundary belongs to the next route", {RELAY, API, "split.default = relay:9,api:1"},
     {{0}}, GMAIL, 0.9, 0, "api", "split", -1, 0},
    {"split rnd 0", {RELAY, API, "split.default = relay:90,api:10"}, {{0}}, GMAIL, 0.0, 0, "relay",
     "split", -1, 0},
    {"split rnd out of range is clamped", {RELAY, API, "split.default = relay:90,api:10"}, {{0}},
     GMAIL, 7.0, 0, "api", "split", -1, 0},
    {"split weight 0 never chosen", {RELAY, API, "split.default = relay:0,api:5"}, {{0}}, GMAIL, 0.0,
     0, "api", "split", -1, 0},
    {"split equal weights without numbers", {RELAY, API, "split.default = api,relay"}, {{0}}, GMAIL,
     0.6, 0, "relay", "split", -1, 0},
    {"class split applies to its class only",
     {RELAY, API, "split.class.bulk = api:50,relay:50", "split.default = relay"}, {{0}},
     {.rcpt_domain = "gmail.com", .msg_class = "transactional"}, 0.1, 0, "relay", "split", -1, 0},
    {"split side that can't take it overflows", {RELAY, API, "split.default = relay:90,api:10"},
     {{"relay", .down = true}}, GMAIL, 0.5, 0, "api", "overflow:unhealthy", -1, 0},

    /* never_via. */
    {"never_via sender uses the relay", {RELAY, API, "never_via.sender = bank.example"}, {{0}}, BANK,
     0.5, 0, "relay", "primary", -1, 0},
    {"never_via holds rather than use the api", {RELAY, API, "never_via.sender = bank.example"},
     {{"relay", .down = true}}, BANK, 0.5, 0, "hold", "hold:never_via", 0, 0},
    {"never_via beats all_capped",
     {RELAY, API, "never_via.sender = bank.example", "route.relay.cap_minute = 1"},
     {{"relay", .m = 1}}, BANK, 0.5, 0, "hold", "hold:never_via", NEXT_MINUTE, 0},
    {"never_via covers subdomains", {RELAY, API, "never_via.sender = bank.example"},
     {{"relay", .down = true}}, {.sender_domain = "mail.bank.example", .rcpt_domain = "x.org"}, 0.5,
     0, "hold", "hold:never_via", 0, 0},
    {"never_via skips a pinned third party",
     {RELAY, API, "never_via.sender = bank.example", "pin.sender.bank.example = api"}, {{0}}, BANK,
     0.5, 0, "relay", "overflow:never_via", -1, 0},
    {"never_via skips a split to the api",
     {RELAY, API, "never_via.sender = bank.example", "split.default = relay:50,api:50"}, {{0}}, BANK,
     0.9, 0, "relay", "overflow:never_via", -1, 0},
    {"api with third_party = no is allowed",
     {RELAY, API, "never_via.sender = bank.example", "route.api.third_party = no"},
     {{"relay", .down = true}}, BANK, 0.5, 0, "api", "overflow:unhealthy", -1, 0},
    {"smtp is not a third party by default", {RELAY, SMTP, "never_via.sender = bank.example"},
     {{"relay", .down = true}}, BANK, 0.5, 0, "smtp", "overflow:unhealthy", -1, 0},
    {"smtp declared third party",
     {RELAY, SMTP, "never_via.sender = bank.example", "route.smtp.third_party = yes"},
     {{"relay", .down = true}}, BANK, 0.5, 0, "hold", "hold:never_via", 0, 0},
    {"never_via does not touch other senders", {RELAY, API, "never_via.sender = bank.example"},
     {{"relay", .down = true}}, GMAIL, 0.5, 0, "api", "overflow:unhealthy", -1, 0},

    /* Breakers. */
    {"breaker open", {RELAY, API}, {{"relay", .br = POLICY_BREAKER_OPEN, .br_since = NOW - 10 * SEC}},
     GMAIL, 0.5, 0, "api", "overflow:breaker_open", -1, 0},
    {"all breakers open: retry at the first cool-down end", {RELAY, API},
     {{"relay", .br = POLICY_BREAKER_OPEN, .br_since = NOW - 100 * SEC},
      {"api", .br = POLICY_BREAKER_OPEN, .br_since = NOW - 10 * SEC}},
     GMAIL, 0.5, 0, "hold", "hold:no_route", NOW + 200 * SEC, 0},
    {"half open: probe", {RELAY, API}, {{"relay", .br = POLICY_BREAKER_HALF_OPEN}}, GMAIL,
     RND_PROBE, 0, "relay", "probe", -1, 1},
    {"half open: not a probe", {RELAY, API}, {{"relay", .br = POLICY_BREAKER_HALF_OPEN}}, GMAIL,
     RND_NOPROBE, 0, "api", "overflow:breaker_half_open", -1, 0},
    {"probe_fraction 1 probes everything", {RELAY, API, "route.relay.probe_fraction = 1"},
     {{"relay", .br = POLICY_BREAKER_HALF_OPEN}}, GMAIL, RND_NOPROBE, 0, "relay", "probe", -1, 1},
    {"probe draw independent of the split", {RELAY, API, "split.default = api:50,relay:50"},
     {{"relay", .br = POLICY_BREAKER_HALF_OPEN}}, GMAIL, RND_PROBE, 0, "relay", "probe", -1, 1},
    {"a probe still respects caps", {RELAY, API, "route.relay.cap_minute = 1"},
     {{"relay", .m = 1, .br = POLICY_BREAKER_HALF_OPEN}}, GMAIL, RND_PROBE, 0, "api",
     "overflow:cap_minute", -1, 0},
    {"probe on the overflow route", {RELAY, API, "route.relay.cap_minute = 1"},
     {{"relay", .m = 1}, {"api", .br = POLICY_BREAKER_HALF_OPEN}}, GMAIL, RND_PROBE, 0, "api",
     "probe", -1, 1},
    {"domain breaker open", {RELAY, API},
     {{"relay", .dbr = POLICY_BREAKER_OPEN, .dbr_since = NOW}}, GMAIL, 0.5, 0, "api",
     "overflow:domain_breaker_open", -1, 0},
    {"domain breaker half open, not a probe", {RELAY, API},
     {{"relay", .dbr = POLICY_BREAKER_HALF_OPEN}}, GMAIL, RND_NOPROBE, 0, "api",
     "overflow:domain_breaker_half_open", -1, 0},
    {"domain breaker probe", {RELAY, API}, {{"relay", .dbr = POLICY_BREAKER_HALF_OPEN}}, GMAIL,
     RND_PROBE, 0, "relay", "probe", -1, 2},
    {"both breakers probe together", {RELAY, API},
     {{"relay", .br = POLICY_BREAKER_HALF_OPEN, .dbr = POLICY_BREAKER_HALF_OPEN}}, GMAIL, RND_PROBE,
     0, "relay", "probe", -1, 3},
    {"domain_breaker = no ignores the domain breaker", {RELAY, API, "route.relay.domain_breaker = no"},
     {{"relay", .dbr = POLICY_BREAKER_OPEN, .dbr_since = NOW}}, GMAIL, 0.5, 0, "relay", "primary", -1, 0},
    {"breaker beats throttle in the reason", {RELAY, API},
     {{"relay", .br = POLICY_BREAKER_OPEN, .br_since = NOW, .throttle_until = NOW + 60 * SEC}},
     GMAIL, 0.5, 0, "api", "overflow:breaker_open", -1, 0},

    /* Destination throttling. */
    {"throttled domain overflows", {RELAY, API}, {{"relay", .throttle_until = NOW + 60 * SEC}},
     GMAIL, 0.5, 0, "api", "throttled:gmail.com", -1, 0},
    {"expired backoff", {RELAY, API}, {{"relay", .throttle_until = NOW}}, GMAIL, 0.5, 0, "relay",
     "primary", -1, 0},
    {"throttle beats caps in the reason", {RELAY, API, "route.relay.cap_minute = 1"},
     {{"relay", .m = 1, .throttle_until = NOW + 1}}, GMAIL, 0.5, 0, "api", "throttled:gmail.com",
     -1, 0},
    {"throttle_overflow = no waits for the route", {RELAY, API, "route.relay.throttle_overflow = no"},
     {{"relay", .throttle_until = NOW + 60 * SEC}}, GMAIL, 0.5, 0, "hold",
     "hold:throttled:gmail.com", NOW + 60 * SEC, 0},
    {"throttled everywhere", {RELAY, API},
     {{"relay", .throttle_until = NOW + 60 * SEC}, {"api", .throttle_until = NOW + 30 * SEC}},
     GMAIL, 0.5, 0, "hold", "hold:throttled:gmail.com", NOW + 30 * SEC, 0},
};

static void test_decide_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(decide_cases) / sizeof(decide_cases[0]); i++) {
        const struct decide_case *c = &decide_cases[i];
        struct policy_config *cfg = config_from(c->config);
        struct policy_route_state routes[MAXROUTES];
        struct policy_state st;
        struct policy_decision d;
        const char *got;
        struct policy_route_info info;

        build_state(cfg, c->state, routes, &st);
        assert_int_equal(policy_decide(cfg, &st, &c->msg, c->rnd, c->now ? c->now : NOW, &d), 0);
        if (d.route == POLICY_HOLD) {
            got = "hold";
        } else {
            policy_route_info(cfg, (size_t)d.route, &info);
            got = info.name;
        }
        if (strcmp(got, c->route) || strcmp(d.text, c->text))
            fail_msg("case \"%s\": got %s %s, want %s %s", c->name, got, d.text, c->route, c->text);
        if (strncmp(d.text, policy_reason_name(d.reason), strlen(policy_reason_name(d.reason))))
            fail_msg("case \"%s\": text %s does not start with reason %s", c->name, d.text,
                     policy_reason_name(d.reason));
        if (c->retry_at >= 0 && d.retry_at_ms != c->retry_at)
            fail_msg("case \"%s\": retry_at %lld, want %lld", c->name, (long long)d.retry_at_ms,
                     (long long)c->retry_at);
        if ((int)d.probe_route + 2 * (int)d.probe_domain != c->probe)
            fail_msg("case \"%s\": probe flags %d/%d, want %d", c->name, d.probe_route,
                     d.probe_domain, c->probe);
        policy_config_free(cfg);
    }
}

/* The same message decided twice gives the same answer, and the split
 * converges on its weights over many rnd values. */
static void test_decide_split_distribution(void **state)
{
    static const char *const lines[] = {RELAY, API, "split.default = relay:90,api:10", NULL};
    struct policy_config *cfg = config_from(lines);
    struct policy_route_state routes[MAXROUTES];
    struct rstate none[MAXROUTES] = {{0}};
    struct policy_state st;
    struct policy_msg m = GMAIL;
    int counts[2] = {0, 0};

    (void)state;
    build_state(cfg, none, routes, &st);
    for (int i = 0; i < 10000; i++) {
        struct policy_decision d, d2;
        double rnd = (i + 0.5) / 10000.0;
        assert_int_equal(policy_decide(cfg, &st, &m, rnd, NOW, &d), 0);
        assert_int_equal(policy_decide(cfg, &st, &m, rnd, NOW + 5000, &d2), 0);
        assert_int_equal(d.route, d2.route);
        assert_true(d.route == 0 || d.route == 1);
        counts[d.route]++;
    }
    assert_int_equal(counts[0], 9000);
    assert_int_equal(counts[1], 1000);
    policy_config_free(cfg);
}

/* About probe_fraction of the traffic of a half-open route is probes. */
static void test_decide_probe_fraction(void **state)
{
    static const char *const lines[] = {RELAY, API, "route.relay.probe_fraction = 0.25", NULL};
    struct policy_config *cfg = config_from(lines);
    struct policy_route_state routes[MAXROUTES];
    struct rstate rs[MAXROUTES] = {{"relay", .br = POLICY_BREAKER_HALF_OPEN}};
    struct policy_state st;
    struct policy_msg m = GMAIL;
    int probes = 0;

    (void)state;
    build_state(cfg, rs, routes, &st);
    for (uint32_t i = 0; i < 20000; i++) {
        struct policy_decision d;
        /* A well spread rnd, as a hash of a queue id would give. */
        double rnd = (double)((i * UINT32_C(2654435761)) >> 8) / 16777216.0;
        assert_int_equal(policy_decide(cfg, &st, &m, rnd, NOW, &d), 0);
        if (d.route == 0) {
            assert_true(d.probe_route);
            assert_string_equal(d.text, "probe");
            probes++;
        } else {
            assert_string_equal(d.text, "overflow:breaker_half_open");
        }
    }
    assert_true(probes > 4500 && probes < 5500);
    policy_config_free(cfg);
}

static void test_decide_bad_state(void **state)
{
    static const char *const lines[] = {RELAY, API, NULL};
    struct policy_config *cfg = config_from(lines);
    struct policy_route_state routes[MAXROUTES] = {{0}};
    struct policy_state st = {routes, 1};
    struct policy_msg m = GMAIL;
    struct policy_decision d;

    (void)state;
    assert_int_equal(policy_decide(cfg, &st, &m, 0.5, NOW, &d), -1);
    assert_int_equal(d.route, POLICY_HOLD);
    st.routes = NULL;
    st.nroutes = 2;
    assert_int_equal(policy_decide(cfg, &st, &m, 0.5, NOW, &d), -1);
    policy_config_free(cfg);
}

/* A throttled domain name in the reason text is sanitised for the log. */
static void test_decide_text_sanitised(void **state)
{
    static const char *const lines[] = {RELAY, API, NULL};
    struct policy_config *cfg = config_from(lines);
    struct policy_route_state routes[MAXROUTES];
    struct rstate rs[MAXROUTES] = {{"relay", .throttle_until = NOW + 1000}};
    struct policy_state st;
    struct policy_msg m = {.rcpt_domain = "Ex ample\".COM"};
    struct policy_decision d;

    (void)state;
    build_state(cfg, rs, routes, &st);
    assert_int_equal(policy_decide(cfg, &st, &m, 0.5, NOW, &d), 0);
    assert_string_equal(d.text, "throttled:ex?ample?.com");
    policy_config_free(cfg);
}

/* ---- Breakers ----------------------------------------------------------- */

#define BREAKER_CFG                                                                    \
    RELAY, "route.relay.min_samples = 100", "route.relay.bounce_rate_max = 0.05",      \
        "route.relay.deferral_rate_max = 0.3", "route.relay.complaint_rate_max = 0.003", \
        "route.relay.breaker_cooldown = 300", "route.relay.breaker_cooldown_max = 1200", \
        "route.relay.probe_successes = 3", "route.relay.recover_ratio = 0.5"

struct bstep {
    int64_t at;                     /* seconds after T */
    struct policy_window w;
    enum policy_transition want;
    enum policy_breaker_state state;
    int64_t cooldown;               /* expected cooldown_ms; -1: don't check */
    enum policy_cause cause;
};

struct bseq {
    const char *name;
    const char *config[MAXLINES];
    enum policy_scope scope;
    struct bstep steps[12];
    size_t nsteps;
};

#define T0 NOW
#define W(s, b, d, c) {.sent = (s), .bounced = (b), .deferred = (d), .complained = (c)}
#define WP(s, b, ok, bad) {.sent = (s), .bounced = (b), .probe_ok = (ok), .probe_bad = (bad)}

static const struct bseq breaker_seqs[] = {
    {"closed -> open -> half_open -> closed, with min_samples and hysteresis", {BREAKER_CFG},
     POLICY_SCOPE_ROUTE,
     {
         {0, W(99, 99, 0, 0), POLICY_T_NONE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
         {1, W(200, 10, 0, 0), POLICY_T_NONE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
         {2, W(200, 11, 0, 0), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_BOUNCE},
         {301, W(200, 11, 0, 0), POLICY_T_NONE, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_BOUNCE},
         {302, W(200, 11, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, 300000,
          POLICY_CAUSE_BOUNCE},
         {400, WP(200, 4, 2, 0), POLICY_T_NONE, POLICY_BREAKER_HALF_OPEN, -1, POLICY_CAUSE_BOUNCE},
         {500, WP(200, 5, 3, 0), POLICY_T_NONE, POLICY_BREAKER_HALF_OPEN, -1, POLICY_CAUSE_BOUNCE},
         {600, WP(200, 4, 3, 0), POLICY_T_CLOSE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
         {601, W(200, 9, 0, 0), POLICY_T_NONE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
     },
     9},
    {"half_open -> open doubles the cool-down up to the max, closing resets it", {BREAKER_CFG},
     POLICY_SCOPE_ROUTE,
     {
         {0, W(100, 0, 31, 0), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_DEFERRAL},
         {300, W(0, 0, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, 300000,
          POLICY_CAUSE_DEFERRAL},
         {310, WP(0, 0, 2, 1), POLICY_T_REOPEN, POLICY_BREAKER_OPEN, 600000, POLICY_CAUSE_PROBE},
         {909, W(0, 0, 0, 0), POLICY_T_NONE, POLICY_BREAKER_OPEN, 600000, POLICY_CAUSE_PROBE},
         {910, W(0, 0, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, 600000,
          POLICY_CAUSE_PROBE},
         {920, WP(0, 0, 0, 1), POLICY_T_REOPEN, POLICY_BREAKER_OPEN, 1200000, POLICY_CAUSE_PROBE},
         {2120, W(0, 0, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, 1200000,
          POLICY_CAUSE_PROBE},
         {2130, WP(0, 0, 0, 1), POLICY_T_REOPEN, POLICY_BREAKER_OPEN, 1200000, POLICY_CAUSE_PROBE},
         {3330, W(0, 0, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, 1200000,
          POLICY_CAUSE_PROBE},
         {3340, WP(10, 0, 3, 0), POLICY_T_CLOSE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
         {3400, W(100, 0, 0, 1), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_COMPLAINT},
     },
     11},
    {"a rate at the maximum does not trip; disabled rates never do",
     {BREAKER_CFG, "route.relay.deferral_rate_max = 0"}, POLICY_SCOPE_ROUTE,
     {
         {0, W(1000, 50, 0, 3), POLICY_T_NONE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
         {1, W(1000, 0, 1000, 0), POLICY_T_NONE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
         {2, W(1000, 0, 0, 4), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_COMPLAINT},
     },
     3},
    {"half_open waits for probe_successes", {BREAKER_CFG}, POLICY_SCOPE_ROUTE,
     {
         {0, W(100, 6, 0, 0), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_BOUNCE},
         {300, W(0, 0, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, -1, POLICY_CAUSE_BOUNCE},
         {400, WP(0, 0, 2, 0), POLICY_T_NONE, POLICY_BREAKER_HALF_OPEN, -1, POLICY_CAUSE_BOUNCE},
         {500, WP(0, 0, 3, 0), POLICY_T_CLOSE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
     },
     4},
    {"a window above the maximum in half_open does not reopen by itself", {BREAKER_CFG},
     POLICY_SCOPE_ROUTE,
     {
         {0, W(100, 6, 0, 0), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_BOUNCE},
         {300, W(100, 20, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, -1,
          POLICY_CAUSE_BOUNCE},
         {400, WP(100, 20, 5, 0), POLICY_T_NONE, POLICY_BREAKER_HALF_OPEN, -1, POLICY_CAUSE_BOUNCE},
     },
     3},
    {"domain scope uses the same thresholds", {BREAKER_CFG}, POLICY_SCOPE_DOMAIN,
     {
         {0, W(100, 6, 0, 0), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_BOUNCE},
         {300, W(0, 0, 0, 0), POLICY_T_HALF_OPEN, POLICY_BREAKER_HALF_OPEN, -1, POLICY_CAUSE_BOUNCE},
     },
     2},
    {"domain scope with domain_breaker = no never changes",
     {BREAKER_CFG, "route.relay.domain_breaker = no"}, POLICY_SCOPE_DOMAIN,
     {
         {0, W(100, 100, 0, 0), POLICY_T_NONE, POLICY_BREAKER_CLOSED, 0, POLICY_CAUSE_NONE},
     },
     1},
    {"clock behind since: the cool-down is not over", {BREAKER_CFG}, POLICY_SCOPE_ROUTE,
     {
         {1000, W(100, 6, 0, 0), POLICY_T_OPEN, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_BOUNCE},
         {900, W(0, 0, 0, 0), POLICY_T_NONE, POLICY_BREAKER_OPEN, 300000, POLICY_CAUSE_BOUNCE},
     },
     2},
};

static void test_breaker_sequences(void **state)
{
    (void)state;
    for (size_t s = 0; s < sizeof(breaker_seqs) / sizeof(breaker_seqs[0]); s++) {
        const struct bseq *q = &breaker_seqs[s];
        struct policy_config *cfg = config_from(q->config);
        struct policy_breaker b;
        uint32_t trips = 0;

        memset(&b, 0, sizeof(b));
        for (size_t i = 0; i < q->nsteps; i++) {
            const struct bstep *st = &q->steps[i];
            int64_t now = T0 + st->at * SEC;
            struct policy_breaker prev = b;
            enum policy_transition t = policy_breaker_step(cfg, 0, q->scope, &b, &st->w, now, &b);

            if (t != st->want || b.state != st->state || b.cause != st->cause ||
                (st->cooldown >= 0 && b.cooldown_ms != st->cooldown))
                fail_msg("%s, step %zu: got %s state %s cooldown %lld cause %s; want %s %s %lld %s",
                         q->name, i, policy_transition_name(t), policy_breaker_state_name(b.state),
                         (long long)b.cooldown_ms, policy_cause_name(b.cause),
                         policy_transition_name(st->want), policy_breaker_state_name(st->state),
                         (long long)st->cooldown, policy_cause_name(st->cause));
            if (t == POLICY_T_NONE) {
                assert_breaker_equal(&prev, &b);
            } else {
                assert_int_equal(b.since_ms, now);
            }
            if (t == POLICY_T_OPEN || t == POLICY_T_REOPEN)
                trips++;
            assert_int_equal(b.trips, trips);
        }
        policy_config_free(cfg);
    }
}

/*
 * A bounce rate hovering around the maximum (4.9% / 5.1%, every minute for
 * three hours, with every probe good) trips the breaker once and then
 * keeps it half open: the close threshold (5% * 0.5) is not reached, so
 * there is no closed/open flapping. Once the rate falls below 2.5%, it
 * closes, and hovering just under the maximum again does not reopen it.
 */
static void test_breaker_hysteresis(void **state)
{
    static const char *const lines[] = {BREAKER_CFG, NULL};
    struct policy_config *cfg = config_from(lines);
    struct policy_breaker b;
    int transitions = 0;
    int64_t now = T0;

    (void)state;
    memset(&b, 0, sizeof(b));
    for (int i = 0; i < 180; i++, now += 60 * SEC) {
        struct policy_window w = {.sent = 1000, .bounced = (i % 2) ? 49 : 51};
        if (b.state == POLICY_BREAKER_HALF_OPEN)
            w.probe_ok = 3;
        if (policy_breaker_step(cfg, 0, POLICY_SCOPE_ROUTE, &b, &w, now, &b) != POLICY_T_NONE)
            transitions++;
    }
    assert_int_equal(transitions, 2);   /* closed->open, open->half_open */
    assert_int_equal(b.state, POLICY_BREAKER_HALF_OPEN);
    assert_int_equal(b.trips, 1);

    {
        struct policy_window w = {.sent = 1000, .bounced = 24, .probe_ok = 3};
        assert_int_equal(policy_breaker_step(cfg, 0, POLICY_SCOPE_ROUTE, &b, &w, now, &b),
                         POLICY_T_CLOSE);
    }
    for (int i = 0; i < 60; i++, now += 60 * SEC) {
        struct policy_window w = {.sent = 1000, .bounced = (i % 2) ? 49 : 50};
        assert_int_equal(policy_breaker_step(cfg, 0, POLICY_SCOPE_ROUTE, &b, &w, now, &b),
                         POLICY_T_NONE);
    }
    assert_int_equal(b.state, POLICY_BREAKER_CLOSED);
    policy_config_free(cfg);
}

/* Two routers stepping the same persisted state with the same inputs
 * agree, and stepping twice is the same as once. */
static void test_breaker_deterministic(void **state)
{
    static const char *const lines[] = {BREAKER_CFG, NULL};
    struct policy_config *cfg = config_from(lines);
    struct policy_breaker a, b, c;
    struct policy_window w = {.sent = 500, .bounced = 40};
    char text[128];

    (void)state;
    memset(&a, 0, sizeof(a));
    assert_int_equal(policy_breaker_step(cfg, 0, POLICY_SCOPE_ROUTE, &a, &w, NOW, &b), POLICY_T_OPEN);
    policy_breaker_format(&b, text, sizeof(text));
    assert_int_equal(policy_breaker_parse(text, &c), 0);
    assert_breaker_equal(&b, &c);
    assert_int_equal(policy_breaker_step(cfg, 0, POLICY_SCOPE_ROUTE, &b, &w, NOW, &a), POLICY_T_NONE);
    assert_breaker_equal(&a, &b);
    policy_config_free(cfg);
}

static void test_breaker_format_parse(void **state)
{
    struct policy_breaker b = {POLICY_BREAKER_HALF_OPEN, NOW, 600000, 7, POLICY_CAUSE_COMPLAINT};
    struct policy_breaker p;
    char text[128];
    static const char *const bad[] = {
        "", "since=5", "state=bogus", "state=open state=open", "state=open since=-1",
        "state=open foo=1", "state=open since=12x", "state=open since=", "state=open =3",
        "state=open trips=4294967296", "state=open cause=pebkac", "open",
    };

    (void)state;
    assert_string_equal(policy_breaker_format(&b, text, sizeof(text)),
                        "state=half_open since=1715344215000 cooldown=600000 trips=7 cause=complaint");
    assert_int_equal(policy_breaker_parse(text, &p), 0);
    assert_breaker_equal(&b, &p);
    memset(&b, 0, sizeof(b));
    policy_breaker_format(&b, text, sizeof(text));
    assert_string_equal(text, "state=closed since=0 cooldown=0 trips=0 cause=none");
    assert_int_equal(policy_breaker_parse("  cause=bounce   state=open ", &p), 0);
    assert_int_equal(p.state, POLICY_BREAKER_OPEN);
    assert_int_equal(p.cause, POLICY_CAUSE_BOUNCE);
    assert_int_equal(p.since_ms, 0);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (policy_breaker_parse(bad[i], &p) != -1)
            fail_msg("parsed \"%s\"", bad[i]);
    assert_int_equal(policy_breaker_parse(NULL, &p), -1);
}

/* ---- Warm-up ------------------------------------------------------------ */

static void test_warmup_days(void **state)
{
    static const char *const lines[] = {
        RELAY, API, "route.relay.warmup_start = 2024-05-08", "route.relay.warmup_caps = 50, 100 ,200",
        "route.relay.cap_day = 5000", "route.api.cap_day = 7", NULL,
    };
    static const struct {
        int64_t now;
        int day;
        uint64_t cap;
    } rows[] = {
        {INT64_C(1715083200000), 1, 50},          /* 2024-05-07 12:00, before the start */
        {INT64_C(1715126400000), 1, 50},          /* 2024-05-08 00:00:00.000 */
        {INT64_C(1715212800000) - 1, 1, 50},      /* 2024-05-08 23:59:59.999 */
        {INT64_C(1715212800000), 2, 100},         /* 2024-05-09 00:00 */
        {NOW, 3, 200},                            /* 2024-05-10 */
        {INT64_C(1715385600000), 0, 5000},        /* 2024-05-11: over, cap_day */
    };
    struct policy_config *cfg = config_from(lines);

    (void)state;
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        assert_int_equal(policy_warmup_day(cfg, 0, rows[i].now), rows[i].day);
        assert_int_equal(policy_route_day_cap(cfg, 0, rows[i].now), rows[i].cap);
    }
    assert_int_equal(policy_warmup_day(cfg, 1, NOW), 0);
    assert_int_equal(policy_route_day_cap(cfg, 1, NOW), 7);
    /* cap_day lower than the warm-up day's cap wins. */
    set_ok(cfg, "route.relay.cap_day", "80");
    assert_int_equal(policy_route_day_cap(cfg, 0, NOW), 80);
    assert_int_equal(policy_route_day_cap(cfg, 0, INT64_C(1715126400000)), 50);
    /* A day number is the same as the date. */
    set_ok(cfg, "route.relay.warmup_start", "19851");
    assert_get(cfg, "route.relay.warmup_start", "2024-05-08");
    assert_int_equal(policy_warmup_day(cfg, 0, NOW), 3);
    policy_config_free(cfg);
}

/* ---- Throttling --------------------------------------------------------- */

static void test_throttle_backoff(void **state)
{
    static const char *const lines[] = {
        RELAY, "route.relay.throttle_backoff = 5m", "route.relay.throttle_backoff_max = 1h", NULL,
    };
    static const struct {
        struct policy_throttle cur;
        int64_t at;                 /* seconds after T */
        struct policy_throttle want;
    } rows[] = {
        {{0, 0}, 0, {T0 + 300 * SEC, 1}},                                   /* first */
        {{T0 + 300 * SEC, 1}, 100, {T0 + 300 * SEC, 1}},                    /* in flight */
        {{T0 + 300 * SEC, 1}, 300, {T0 + 900 * SEC, 2}},                    /* repeat: 600 */
        {{T0, 2}, 0, {T0 + 1200 * SEC, 3}},
        {{T0, 3}, 0, {T0 + 2400 * SEC, 4}},
        {{T0, 4}, 0, {T0 + 3600 * SEC, 5}},                                 /* max */
        {{T0, 30}, 0, {T0 + 3600 * SEC, 31}},
        {{T0, 3}, 3599, {T0 + (3599 + 2400) * SEC, 4}},                     /* still a repeat */
        {{T0, 3}, 3600, {T0 + (3600 + 300) * SEC, 1}},                      /* quiet: start over */
    };
    struct policy_config *cfg = config_from(lines);
    char text[64];
    struct policy_throttle p;

    (void)state;
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        struct policy_throttle next;
        policy_throttle_hit(cfg, 0, &rows[i].cur, T0 + rows[i].at * SEC, &next);
        if (next.until_ms != rows[i].want.until_ms || next.level != rows[i].want.level)
            fail_msg("row %zu: until %+lld s level %u; want %+lld s level %u", i,
                     (long long)(next.until_ms - T0) / 1000, next.level,
                     (long long)(rows[i].want.until_ms - T0) / 1000, rows[i].want.level);
    }
    /* In place. */
    p = (struct policy_throttle){0, 0};
    policy_throttle_hit(cfg, 0, &p, T0, &p);
    assert_int_equal(p.until_ms, T0 + 300 * SEC);
    assert_string_equal(policy_throttle_format(&p, text, sizeof(text)),
                        "until=1715344515000 level=1");
    memset(&p, 0, sizeof(p));
    assert_int_equal(policy_throttle_parse(text, &p), 0);
    assert_int_equal(p.until_ms, T0 + 300 * SEC);
    assert_int_equal(p.level, 1);
    assert_int_equal(policy_throttle_parse("", &p), -1);
    assert_int_equal(policy_throttle_parse("until=1 until=2", &p), -1);
    assert_int_equal(policy_throttle_parse("until=x", &p), -1);
    assert_int_equal(policy_throttle_parse("level=1 when=3", &p), -1);
    policy_config_free(cfg);
}

static void test_classify_reply(void **state)
{
    static const struct {
        const char *patterns;       /* NULL: defaults */
        int code;
        const char *enhanced;
        const char *text;
        enum policy_reply want;
    } rows[] = {
        {NULL, 250, "2.0.0", "OK queued", POLICY_REPLY_OK},
        {NULL, 550, "5.7.1", "Too many recipients, rate limit", POLICY_REPLY_PERM},
        {NULL, 421, "4.7.28", "Our system has detected an unusual rate", POLICY_REPLY_THROTTLE},
        {NULL, 421, NULL, "4.7.28 Try again later.", POLICY_REPLY_THROTTLE},
        {NULL, 421, NULL, "Too Many Connections from your IP", POLICY_REPLY_THROTTLE},
        {NULL, 451, "4.7.650", "The mail server has been temporarily rate limited",
         POLICY_REPLY_THROTTLE},
        {NULL, 421, "4.7.0", "[TSS04] Messages temporarily deferred", POLICY_REPLY_THROTTLE},
        {NULL, 450, "4.7.1", "Throttling: slow down", POLICY_REPLY_THROTTLE},
        {NULL, 450, "4.2.1", "Mailbox busy", POLICY_REPLY_TEMP},
        {NULL, 451, "4.7.281", "greylisted", POLICY_REPLY_TEMP},
        {NULL, 451, "4.4.7.28", "", POLICY_REPLY_TEMP},
        {NULL, 421, NULL, NULL, POLICY_REPLY_TEMP},
        {NULL, 0, NULL, "connection lost", POLICY_REPLY_TEMP},
        {NULL, 354, NULL, "go ahead", POLICY_REPLY_TEMP},
        {NULL, 600, NULL, "rate limit", POLICY_REPLY_TEMP},
        {"4.7.2", 451, "4.7.28", "", POLICY_REPLY_TEMP},
        {"4.7.2", 451, "4.7.2", "", POLICY_REPLY_THROTTLE},
        {"4.7.2", 451, NULL, "status 4.7.2.", POLICY_REPLY_THROTTLE},
        {"SLOW DOWN, 4.7.2", 452, NULL, "please slow down", POLICY_REPLY_THROTTLE},
        {"", 421, "4.7.28", "rate limit", POLICY_REPLY_TEMP},
        {"none", 421, "4.7.28", "rate limit", POLICY_REPLY_TEMP},
    };

    (void)state;
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        struct policy_config *cfg = policy_config_new();
        char err[256];
        enum policy_reply r;
        if (rows[i].patterns)
            assert_int_equal(policy_config_set(cfg, "throttle.patterns", rows[i].patterns, err,
                                               sizeof(err)), 0);
        r = policy_classify_reply(cfg, rows[i].code, rows[i].enhanced, rows[i].text);
        if (r != rows[i].want)
            fail_msg("row %zu (%d %s %s): got %s, want %s", i, rows[i].code,
                     rows[i].enhanced ? rows[i].enhanced : "-", rows[i].text ? rows[i].text : "-",
                     policy_reply_name(r), policy_reply_name(rows[i].want));
        policy_config_free(cfg);
    }
}

/* ---- Configuration ------------------------------------------------------ */

struct set_case {
    const char *key;
    const char *value;
    int rc;
    const char *err;        /* substring of the message; NULL: don't check */
};

static const struct set_case set_cases[] = {
    {"route.relay.cap_minute", "lots", POLICY_E_INVALID,
     "route.relay.cap_minute: must be an integer between 0 and 1000000000000, got \"lots\""},
    {"route.relay.cap_minute", "-5", POLICY_E_INVALID, "got \"-5\""},
    {"route.relay.cap_minute", "1e3", POLICY_E_INVALID, NULL},
    {"route.relay.cap_minute", "1000000000001", POLICY_E_INVALID, NULL},
    {"route.relay.cap_minute", "99999999999999999999999", POLICY_E_INVALID, NULL},
    {"route.relay.cap_minute", "", POLICY_E_INVALID, NULL},
    {"route.relay.cap_minute", " 100 ", POLICY_OK, NULL},
    {"ROUTE.Relay.Cap_Minute", "100", POLICY_OK, NULL},
    {"route.relay.transport", "carrier-pigeon", POLICY_E_INVALID, "relay, api or smtp"},
    {"route.relay.transport", "SMTP", POLICY_OK, NULL},
    {"route.relay.priority", "10.5", POLICY_E_INVALID, NULL},
    {"route.relay.priority", "1000001", POLICY_E_INVALID, NULL},
    {"route.relay.bounce_rate_max", "1.5", POLICY_E_INVALID, "between 0 and 1"},
    {"route.relay.bounce_rate_max", "5%", POLICY_OK, NULL},
    {"route.relay.bounce_rate_max", "0x1p-3", POLICY_E_INVALID, NULL},
    {"route.relay.bounce_rate_max", "nan", POLICY_E_INVALID, NULL},
    {"route.relay.bounce_rate_max", "-0.1", POLICY_E_INVALID, NULL},
    {"route.relay.bounce_rate_max", "0.05.1", POLICY_E_INVALID, NULL},
    {"route.relay.bounce_rate_max", "1e-2", POLICY_E_INVALID, NULL},
    {"route.relay.bounce_rate_max", "%", POLICY_E_INVALID, NULL},
    {"route.relay.bounce_rate_max", "0", POLICY_OK, NULL},
    {"route.relay.recover_ratio", "1", POLICY_E_INVALID, "greater than 0 and less than 1"},
    {"route.relay.recover_ratio", "0", POLICY_E_INVALID, NULL},
    {"route.relay.recover_ratio", "0.8", POLICY_OK, NULL},
    {"route.relay.probe_fraction", "0", POLICY_E_INVALID, NULL},
    {"route.relay.probe_fraction", "1", POLICY_OK, NULL},
    {"route.relay.probe_successes", "0", POLICY_E_INVALID, NULL},
    {"route.relay.window", "30", POLICY_E_INVALID, "between 60s and 7d"},
    {"route.relay.window", "2h", POLICY_OK, NULL},
    {"route.relay.window", "5x", POLICY_E_INVALID, NULL},
    {"route.relay.window", "5mm", POLICY_E_INVALID, NULL},
    {"route.relay.breaker_cooldown", "0", POLICY_E_INVALID, NULL},
    {"route.relay.third_party", "maybe", POLICY_E_INVALID, "yes or no"},
    {"route.relay.enabled", "off", POLICY_OK, NULL},
    {"route.relay.max_size", "30M", POLICY_OK, NULL},
    {"route.relay.max_size", "30T", POLICY_E_INVALID, NULL},
    {"route.relay.warmup_start", "2024-02-30", POLICY_E_INVALID, "YYYY-MM-DD"},
    {"route.relay.warmup_start", "2023-02-29", POLICY_E_INVALID, NULL},
    {"route.relay.warmup_start", "2024-02-29", POLICY_OK, NULL},
    {"route.relay.warmup_start", "2024-5-1", POLICY_E_INVALID, NULL},
    {"route.relay.warmup_start", "1969-12-31", POLICY_E_INVALID, NULL},
    {"route.relay.warmup_start", "19800", POLICY_OK, NULL},
    {"route.relay.warmup_start", "none", POLICY_OK, NULL},
    {"route.relay.warmup_caps", "50,,100", POLICY_E_INVALID, "comma list"},
    {"route.relay.warmup_caps", "0,10", POLICY_E_INVALID, NULL},
    {"route.relay.warmup_caps", "10,", POLICY_E_INVALID, NULL},
    {"route.relay.warmup_caps", "50, 100 ,200", POLICY_OK, NULL},
    {"route.relay.overflow", "relay", POLICY_E_INVALID, "cannot overflow to itself"},
    {"route.relay.overflow", "b@d", POLICY_E_INVALID, NULL},
    {"route.relay.overflow", "later", POLICY_OK, NULL},     /* checked by check() */
    {"route.hold.transport", "relay", POLICY_E_INVALID, "is not a route name"},
    {"route.a.b.transport", "relay", POLICY_E_NOT_POLICY, NULL}, /* route "a", key "b.transport" */
    {"route..transport", "relay", POLICY_E_INVALID, "route.<name>.<key>"},
    {"route.relay", "relay", POLICY_E_INVALID, "route.<name>.<key>"},
    {"route.relay.", "relay", POLICY_E_INVALID, NULL},
    {"route.waytoolongroutenamewaytoolongroute.priority", "1", POLICY_E_INVALID, NULL},
    {"route.relay.host", "mx.example", POLICY_E_NOT_POLICY, "route.relay.host: not a policy key"},
    {"route.relay.tls_cert", "/etc/x.pem", POLICY_E_NOT_POLICY, NULL},
    {"gateway.listen", "1", POLICY_E_NOT_POLICY, NULL},
    {"route.relay.domain_caps.gmail.com", "10,100,1000", POLICY_OK, NULL},
    {"route.relay.domain_caps.gmail.com", "10,100", POLICY_E_INVALID, "<minute>,<hour>,<day>"},
    {"route.relay.domain_caps.gmail.com", "a,b,c", POLICY_E_INVALID, NULL},
    {"route.relay.domain_caps.gmail.com", "1,2,3,4", POLICY_E_INVALID, NULL},
    {"route.relay.domain_caps", "1,2,3", POLICY_E_INVALID, "needs a domain"},
    {"route.relay.domain_caps.gm ail.com", "1,2,3", POLICY_E_INVALID, "is not a domain"},
    {"route.relay.domain_caps.gmail.com", "none", POLICY_OK, NULL},
    {"pin.sender.example.com", "relay", POLICY_OK, NULL},
    {"pin.sender.example.com", "relay:90,api:10", POLICY_OK, NULL},
    {"pin.sender.exa mple.com", "relay", POLICY_E_INVALID, "is not a domain"},
    {"pin.sender.example..com", "relay", POLICY_E_INVALID, "is not a domain"},
    {"pin.sender.", "relay", POLICY_E_INVALID, "is not a domain"},
    {"pin.sender.example.com", "relay:90,relay:10", POLICY_E_INVALID, "listed twice"},
    {"pin.sender.example.com", "hold,relay", POLICY_E_INVALID, "cannot be combined"},
    {"pin.sender.example.com", "relay:-1", POLICY_E_INVALID, "weight"},
    {"pin.sender.example.com", "relay:1000001", POLICY_E_INVALID, "weight"},
    {"pin.sender.example.com", "relay:", POLICY_E_INVALID, "weight"},
    {"pin.sender.example.com", "relay:0", POLICY_E_INVALID, "every weight is 0"},
    {"pin.sender.example.com", "relay,strict,strict", POLICY_E_INVALID, "twice"},
    {"pin.sender.example.com", "strict", POLICY_E_INVALID, "names no route"},
    {"pin.sender.example.com", "relay,,api", POLICY_E_INVALID, "empty item"},
    {"pin.sender.example.com", "re lay", POLICY_E_INVALID, "not a route name"},
    {"pin.sender.example.com", "none", POLICY_OK, NULL},
    {"pin.sender.example.com", "", POLICY_OK, NULL},
    {"pin.rcpt.gmail.com", "api,strict", POLICY_OK, NULL},
    {"pin.class.bulk", "api", POLICY_OK, NULL},
    {"pin.class.b/ulk", "api", POLICY_E_INVALID, "not a class name"},
    {"pin.helo.example.com", "api", POLICY_E_INVALID, "unknown pin kind"},
    {"split.default", "relay:90,api:10", POLICY_OK, NULL},
    {"split.default", "relay:90,", POLICY_E_INVALID, "empty item"},
    {"split.class.bulk", "relay:50,api:50", POLICY_OK, NULL},
    {"split.other", "relay", POLICY_E_INVALID, "unknown split"},
    {"never_via.sender", "bank.example, corp.example other.example", POLICY_OK, NULL},
    {"never_via.sender", "bank..example", POLICY_E_INVALID, "\"bank..example\" is not a domain"},
    {"never_via.rcpt", "x.example", POLICY_E_INVALID, "unknown never_via"},
    {"throttle.patterns", "4.7.28,,rate", POLICY_E_INVALID, "comma list"},
    {"throttle.patterns", "rate\x01limit", POLICY_E_INVALID, NULL},
    {"throttle.patterns", "", POLICY_OK, NULL},
    {"throttle.backoff", "5", POLICY_E_INVALID, "unknown throttle key"},
    {"route.relay.cap_minute", NULL, POLICY_E_INVALID, "no value"},
};

static void test_config_set_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(set_cases) / sizeof(set_cases[0]); i++) {
        const struct set_case *c = &set_cases[i];
        struct policy_config *cfg = policy_config_new();
        char err[256], before[256], after[256];
        int rc;

        /* A baseline so that "nothing applied" can be observed. */
        set_ok(cfg, "route.relay.transport", "relay");
        set_ok(cfg, "route.api.transport", "api");
        policy_config_get(cfg, c->key, before, sizeof(before));
        rc = policy_config_set(cfg, c->key, c->value, err, sizeof(err));
        if (rc != c->rc)
            fail_msg("%s = %s: rc %d (%s), want %d", c->key, c->value ? c->value : "(null)", rc,
                     err, c->rc);
        if (c->err && !strstr(err, c->err))
            fail_msg("%s = %s: message \"%s\" lacks \"%s\"", c->key, c->value, err, c->err);
        if (rc != POLICY_OK) {
            assert_true(err[0] != '\0');
            assert_non_null(strchr(err, ':'));
            policy_config_get(cfg, c->key, after, sizeof(after));
            assert_string_equal(before, after);
            assert_int_equal(policy_route_count(cfg), 2);
        }
        policy_config_free(cfg);
    }
}

/* A failed set on a new route creates no route; a NOT_POLICY key neither. */
static void test_config_nothing_applied(void **state)
{
    struct policy_config *cfg = policy_config_new();
    char err[256];

    (void)state;
    assert_int_equal(policy_config_set(cfg, "route.new.cap_minute", "lots", err, sizeof(err)),
                     POLICY_E_INVALID);
    assert_int_equal(policy_config_set(cfg, "route.new.host", "x", err, sizeof(err)),
                     POLICY_E_NOT_POLICY);
    assert_int_equal(policy_route_count(cfg), 0);
    assert_int_equal(policy_config_set_route(cfg, "New", "transport", "relay", err, sizeof(err)), 0);
    assert_int_equal(policy_route_find(cfg, "new"), 0);
    assert_int_equal(policy_route_find(cfg, "NEW"), 0);
    assert_int_equal(policy_config_set_route(cfg, "new", "user", "x", err, sizeof(err)),
                     POLICY_E_NOT_POLICY);
    set_ok(cfg, "pin.sender.a.example", "new");
    assert_int_equal(policy_config_set(cfg, "pin.sender.a.example", "new:0", err, sizeof(err)),
                     POLICY_E_INVALID);
    assert_get(cfg, "pin.sender.a.example", "new");
    policy_config_free(cfg);
}

static void test_config_frozen(void **state)
{
    static const char *const lines[] = {RELAY, API, NULL};
    struct policy_config *cfg = config_from(lines), *live;
    char err[256];

    (void)state;
    policy_config_freeze_routes(cfg);
    live = policy_config_clone(cfg);
    assert_int_equal(policy_config_set(live, "route.newone.cap_minute", "5", err, sizeof(err)),
                     POLICY_E_INVALID);
    assert_non_null(strstr(err, "no route named \"newone\""));
    assert_int_equal(policy_config_set(live, "route.newone.host", "x", err, sizeof(err)),
                     POLICY_E_INVALID);
    assert_int_equal(policy_config_set(live, "route.relay.transport", "api", err, sizeof(err)),
                     POLICY_E_INVALID);
    assert_non_null(strstr(err, "cannot change at run time"));
    set_ok(live, "route.relay.transport", "relay");
    assert_int_equal(policy_config_set(live, "pin.sender.x.example", "nosuch", err, sizeof(err)),
                     POLICY_E_INVALID);
    assert_non_null(strstr(err, "no route named \"nosuch\""));
    assert_int_equal(policy_config_set(live, "split.default", "relay:1,nosuch:1", err, sizeof(err)),
                     POLICY_E_INVALID);
    assert_int_equal(policy_config_set(live, "route.relay.overflow", "nosuch", err, sizeof(err)),
                     POLICY_E_INVALID);
    set_ok(live, "route.relay.overflow", "api");
    set_ok(live, "route.relay.cap_minute", "77");
    assert_int_equal(policy_route_count(live), 2);
    /* The clone is independent of its source. */
    assert_get(cfg, "route.relay.cap_minute", "0");
    assert_get(live, "route.relay.cap_minute", "77");
    policy_config_free(live);
    /* Reset returns to an empty, unfrozen config with the default patterns. */
    policy_config_reset(cfg);
    assert_int_equal(policy_route_count(cfg), 0);
    set_ok(cfg, "route.newone.transport", "smtp");
    assert_int_equal(policy_classify_reply(cfg, 421, "4.7.28", NULL), POLICY_REPLY_THROTTLE);
    policy_config_free(cfg);
}

struct check_case {
    const char *name;
    const char *config[MAXLINES];
    const char *err;
};

static const struct check_case check_cases[] = {
    {"no routes", {"pin.class.bulk = hold"}, "no route is configured"},
    {"transport missing", {"route.relay.priority = 5"}, "route.relay.transport: not set"},
    {"overflow to nothing", {RELAY, "route.relay.overflow = later"},
     "route.relay.overflow: no route named \"later\""},
    {"pin to nothing", {RELAY, "pin.rcpt.gmail.com = api"},
     "pin.rcpt.gmail.com: no route named \"api\""},
    {"class split to nothing", {RELAY, "split.class.bulk = relay:1,api:1"},
     "split.class.bulk: no route named \"api\""},
    {"default split to nothing", {RELAY, "split.default = smtp"}, "split.default: no route named"},
    {"cool-down max below cool-down",
     {RELAY, "route.relay.breaker_cooldown = 600", "route.relay.breaker_cooldown_max = 300"},
     "route.relay.breaker_cooldown_max: 300 is less than breaker_cooldown (600)"},
    {"backoff max below backoff", {RELAY, "route.relay.throttle_backoff_max = 10"},
     "route.relay.throttle_backoff_max: 10 is less than throttle_backoff (300)"},
    {"warm-up start without caps", {RELAY, "route.relay.warmup_start = 2024-05-01"},
     "route.relay.warmup_caps: warmup_start and warmup_caps must be set together"},
    {"warm-up caps without start", {RELAY, "route.relay.warmup_caps = 1,2"},
     "route.relay.warmup_start: warmup_start and warmup_caps must be set together"},
};

static void test_config_check_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(check_cases) / sizeof(check_cases[0]); i++) {
        struct policy_config *cfg = policy_config_new();
        char err[256];
        apply_lines(cfg, check_cases[i].config);
        assert_int_equal(policy_config_check(cfg, err, sizeof(err)), POLICY_E_INVALID);
        if (!strstr(err, check_cases[i].err))
            fail_msg("%s: \"%s\" lacks \"%s\"", check_cases[i].name, err, check_cases[i].err);
        policy_config_free(cfg);
    }
}

static void collect(void *ctx, const char *key, const char *value, bool is_set)
{
    buf_appendf(ctx, "%s = %s%s\n", key, value, is_set ? "" : " (default)");
}

static void collect_plain(void *ctx, const char *key, const char *value, bool is_set)
{
    (void)is_set;
    buf_appendf(ctx, "%s = %s\n", key, value);
}

struct reapply {
    struct policy_config *cfg;
};

static void reapply(void *ctx, const char *key, const char *value, bool is_set)
{
    struct reapply *r = ctx;
    char err[256];
    (void)is_set;
    if (policy_config_set(r->cfg, key, value, err, sizeof(err)) != POLICY_OK)
        fail_msg("listed %s = %s does not read back: %s", key, value, err);
}

static void test_config_get_list(void **state)
{
    static const char *const lines[] = {
        RELAY, API, "route.relay.cap_minute = 100", "route.relay.bounce_rate_max = 5%",
        "route.relay.window = 2h", "route.relay.max_size = 10k",
        "route.relay.warmup_start = 2024-05-08", "route.relay.warmup_caps = 50,100",
        "route.relay.domain_caps.gmail.com = 1,2,3", "route.relay.recover_ratio = 0.3333",
        "pin.sender.Shop.Example = API , strict", "pin.class.bulk = relay:3, api:1",
        "split.default = relay:90,api:10", "never_via.sender = b.example a.example,b.example",
        "throttle.patterns = 4.7.28 , Rate Limit", NULL,
    };
    struct policy_config *cfg = config_from(lines), *copy = policy_config_new();
    struct buf out = BUF_INIT, again = BUF_INIT, first = BUF_INIT;
    struct reapply ra = {copy};
    struct policy_route_info info;
    char val[256];

    (void)state;
    policy_config_list(cfg, collect, &out);
    static const char *const want[] = {
        "never_via.sender = a.example,b.example\n",
        "pin.class.bulk = relay:3,api:1\n",
        "pin.sender.shop.example = api,strict\n",
        "split.default = relay:90,api:10\n",
        "throttle.patterns = 4.7.28,rate limit\n",
        "route.relay.transport = relay\n",
        "route.relay.priority = 10\n",
        "route.relay.overflow = auto (default)\n",
        "route.relay.cap_minute = 100\n",
        "route.relay.cap_hour = 0 (default)\n",
        "route.relay.bounce_rate_max = 0.05\n",
        "route.relay.recover_ratio = 0.3333\n",
        "route.relay.window = 7200\n",
        "route.relay.max_size = 10240\n",
        "route.relay.warmup_start = 2024-05-08\n",
        "route.relay.warmup_caps = 50,100\n",
        "route.relay.domain_caps.gmail.com = 1,2,3\n",
        "route.relay.third_party = no (default)\n",
        "route.api.third_party = yes (default)\n",
        "route.api.warmup_start = none (default)\n",
        "route.api.complaint_rate_max = 0.003 (default)\n",
        "route.api.deferral_rate_max = 0.3 (default)\n",
        "route.api.probe_fraction = 0.1 (default)\n",
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++)
        if (!strstr(out.data, want[i]))
            fail_msg("list lacks \"%s\" in:\n%s", want[i], out.data);
    assert_null(strstr(out.data, "split.class."));
    assert_null(strstr(out.data, "pin.rcpt."));

    /* Every listed line reads back to the same listing. */
    policy_config_list(cfg, reapply, &ra);
    policy_config_list(cfg, collect_plain, &first);
    policy_config_list(copy, collect_plain, &again);
    assert_string_equal(first.data, again.data);

    assert_get(cfg, "route.relay.cap_minute", "100");
    assert_get(cfg, " Route.Relay.Window ", "7200");
    assert_get(cfg, "route.relay.domain_caps.gmail.com", "1,2,3");
    assert_get(cfg, "route.relay.domain_caps.yahoo.com", "none");
    assert_get(cfg, "pin.rcpt.gmail.com", "none");
    assert_get(cfg, "split.class.bulk", "none");
    assert_int_equal(policy_config_get(cfg, "route.relay.host", val, sizeof(val)),
                     POLICY_E_NOT_POLICY);
    assert_int_equal(policy_config_get(cfg, "route.nosuch.cap_minute", val, sizeof(val)),
                     POLICY_E_INVALID);
    assert_non_null(strstr(val, "no such route"));
    assert_int_equal(policy_config_get(cfg, "pin.helo.x", val, sizeof(val)), POLICY_E_INVALID);
    assert_int_equal(policy_config_get(cfg, "queue.prefix", val, sizeof(val)), POLICY_E_NOT_POLICY);

    policy_route_info(cfg, 1, &info);
    assert_string_equal(info.name, "api");
    assert_int_equal(info.transport, POLICY_TRANSPORT_API);
    assert_string_equal(policy_transport_name(info.transport), "api");
    assert_int_equal(info.priority, 20);
    assert_true(info.enabled);
    assert_true(info.third_party);
    assert_true(info.domain_breaker);
    assert_int_equal(info.window_ms, 3600 * SEC);
    policy_route_info(cfg, 0, &info);
    assert_false(info.third_party);
    assert_int_equal(info.window_ms, 7200 * SEC);

    buf_free(&out);
    buf_free(&again);
    buf_free(&first);
    policy_config_free(cfg);
    policy_config_free(copy);
}

/* Removing pins and overrides; names of every enum value. */
static void test_config_remove_and_names(void **state)
{
    static const char *const lines[] = {RELAY, API, "pin.rcpt.gmail.com = api",
                                        "pin.rcpt.yahoo.com = api", "pin.rcpt.aol.com = relay",
                                        "split.class.bulk = api", NULL};
    struct policy_config *cfg = config_from(lines);

    (void)state;
    set_ok(cfg, "pin.rcpt.yahoo.com", "none");
    set_ok(cfg, "pin.rcpt.nothere.com", "none");
    set_ok(cfg, "split.class.bulk", "");
    assert_get(cfg, "pin.rcpt.yahoo.com", "none");
    assert_get(cfg, "pin.rcpt.gmail.com", "api");
    assert_get(cfg, "pin.rcpt.aol.com", "relay");
    assert_get(cfg, "split.class.bulk", "none");

    for (int r = 0; r < POLICY_R__COUNT; r++) {
        const char *n = policy_reason_name((enum policy_reason)r);
        assert_non_null(n);
        assert_string_not_equal(n, "unknown");
    }
    assert_string_equal(policy_reason_name(POLICY_R__COUNT), "unknown");
    assert_string_equal(policy_transition_name(POLICY_T_REOPEN), "half_open->open");
    assert_string_equal(policy_breaker_state_name(POLICY_BREAKER_HALF_OPEN), "half_open");
    assert_string_equal(policy_cause_name(POLICY_CAUSE_DEFERRAL), "deferral");
    assert_string_equal(policy_reply_name(POLICY_REPLY_THROTTLE), "throttle");
    policy_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decide_table),
        cmocka_unit_test(test_decide_split_distribution),
        cmocka_unit_test(test_decide_probe_fraction),
        cmocka_unit_test(test_decide_bad_state),
        cmocka_unit_test(test_decide_text_sanitised),
        cmocka_unit_test(test_breaker_sequences),
        cmocka_unit_test(test_breaker_hysteresis),
        cmocka_unit_test(test_breaker_deterministic),
        cmocka_unit_test(test_breaker_format_parse),
        cmocka_unit_test(test_warmup_days),
        cmocka_unit_test(test_throttle_backoff),
        cmocka_unit_test(test_classify_reply),
        cmocka_unit_test(test_config_set_table),
        cmocka_unit_test(test_config_nothing_applied),
        cmocka_unit_test(test_config_frozen),
        cmocka_unit_test(test_config_check_table),
        cmocka_unit_test(test_config_get_list),
        cmocka_unit_test(test_config_remove_and_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
