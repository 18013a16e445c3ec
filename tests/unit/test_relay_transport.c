/*
 * Unit tests of the relay transport's pure parts (transports/relay.h):
 * the EHLO keyword X-MAILFERRY-STATUS and the XSTATUS reply, table-driven
 * with the texts docs/relay.md shows, the route keys create() refuses, and
 * the breaker trip the router applies when the relay turns unhealthy
 * (policy_breaker_trip).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "lib/config.h"
#include "lib/smtp_reply.h"
#include "router/policy.h"
#include "transports/relay.h"

struct kw_case {
    const char *params;
    int rc;
    enum relay_status_state state;
    const char *failing;
};

static void test_keyword(void **state)
{
    static const struct kw_case cases[] = {
        {"ok", 0, RELAY_STATUS_OK, ""},
        {"pending", 0, RELAY_STATUS_PENDING, ""},
        {"degraded ptr", 0, RELAY_STATUS_DEGRADED, "ptr"},
        {"degraded ptr,dnsbl:zen.spamhaus.org", 0, RELAY_STATUS_DEGRADED,
         "ptr,dnsbl:zen.spamhaus.org"},
        {"degraded spf:example.net,dnsbl:bl.test", 0, RELAY_STATUS_DEGRADED,
         "spf:example.net,dnsbl:bl.test"},
        /* Malformed: no list, empty names, spaces, unknown words. */
        {"degraded", -1, RELAY_STATUS_UNKNOWN, ""},
        {"degraded ", -1, RELAY_STATUS_UNKNOWN, ""},
        {"degraded ptr,,dnsbl:x", -1, RELAY_STATUS_UNKNOWN, ""},
        {"degraded ptr,", -1, RELAY_STATUS_UNKNOWN, ""},
        {"degraded ptr dnsbl:x", -1, RELAY_STATUS_UNKNOWN, ""},
        {"ok extra", -1, RELAY_STATUS_UNKNOWN, ""},
        {"OK", -1, RELAY_STATUS_UNKNOWN, ""},
        {"", -1, RELAY_STATUS_UNKNOWN, ""},
        {"fine", -1, RELAY_STATUS_UNKNOWN, ""},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct relay_status st;
        int rc = relay_status_parse_keyword(cases[i].params, &st);

        if (rc != cases[i].rc || st.state != cases[i].state ||
            strcmp(st.failing, cases[i].failing) != 0)
            fail_msg("\"%s\": rc %d state %s failing \"%s\"", cases[i].params, rc,
                     relay_status_name(st.state), st.failing);
    }
    assert_int_equal(relay_status_parse_keyword(NULL, &(struct relay_status){0}), -1);
}

struct xs_case {
    const char *reply;         /* the raw reply, CRLF line ends */
    int rc;
    enum relay_status_state state;
    const char *failing;
    const char *reason;
    long long checked;
};

/* Runs the raw reply through lib/smtp_reply, as the client does, so the
 * parser sees exactly the text it gets in production. */
static void test_xstatus(void **state)
{
    static const struct xs_case cases[] = {
        {"250-ptr ok 203.0.113.25 -> mail.example.net -> 203.0.113.25\r\n"
         "250-dnsbl:zen.spamhaus.org fail 203.0.113.25 listed in zen.spamhaus.org (127.0.0.2): "
         "https://www.spamhaus.org/query/ip/203.0.113.25\r\n"
         "250-dnsbl:bl.spamcop.net ok not listed in bl.spamcop.net\r\n"
         "250-spf:example.net ok pass: ip4:203.0.113.0/24 matched in example.net\r\n"
         "250 2.0.0 status degraded checked=1717171717\r\n",
         0, RELAY_STATUS_DEGRADED, "dnsbl:zen.spamhaus.org",
         "203.0.113.25 listed in zen.spamhaus.org (127.0.0.2): "
         "https://www.spamhaus.org/query/ip/203.0.113.25",
         1717171717LL},
        {"250-ptr fail 192.0.2.10 -> relay.test, not other.test\r\n"
         "250-dnsbl:clean.test ok not listed in clean.test\r\n"
         "250-spf:badspf.test fail fail: -all matched in badspf.test\r\n"
         "250 2.0.0 status degraded checked=5\r\n",
         0, RELAY_STATUS_DEGRADED, "ptr,spf:badspf.test", "192.0.2.10 -> relay.test, not other.test",
         5},
        {"250-ptr ok fine\r\n250 2.0.0 status ok checked=1700000000\r\n", 0, RELAY_STATUS_OK, "",
         "", 1700000000LL},
        {"250-ptr pending not checked yet\r\n250 2.0.0 status pending checked=0\r\n", 0,
         RELAY_STATUS_PENDING, "", "", 0},
        /* No checks configured: the status line is the first line, whose
         * enhanced code the reply parser removes. */
        {"250 2.0.0 status ok checked=42\r\n", 0, RELAY_STATUS_OK, "", "", 42},
        /* A check line without a reason, and a line from a newer relay. */
        {"250-ptr fail\r\n250-something new here\r\n250 2.0.0 status degraded checked=1\r\n", 0,
         RELAY_STATUS_DEGRADED, "ptr", "", 1},
        /* checked= missing: still a status. */
        {"250 2.0.0 status ok\r\n", 0, RELAY_STATUS_OK, "", "", 0},
        /* Not a status reply. */
        {"250 2.0.0 Ok\r\n", -1, RELAY_STATUS_UNKNOWN, "", "", 0},
        {"250-ptr ok x\r\n250 2.0.0 status fine checked=1\r\n", -1, RELAY_STATUS_UNKNOWN, "", "",
         0},
        {"250 status\r\n", -1, RELAY_STATUS_UNKNOWN, "", "", 0},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct smtp_reply r;
        struct relay_status st;
        ssize_t n = smtp_reply_parse(cases[i].reply, strlen(cases[i].reply), &r);
        int rc;

        assert_true(n > 0);
        rc = relay_status_parse_xstatus(r.text, &st);
        if (rc != cases[i].rc || st.state != cases[i].state ||
            strcmp(st.failing, cases[i].failing) != 0 || strcmp(st.reason, cases[i].reason) != 0 ||
            st.checked != cases[i].checked)
            fail_msg("case %zu: rc %d state %s failing \"%s\" reason \"%s\" checked %lld\n"
                     "text: %s", i, rc, relay_status_name(st.state), st.failing, st.reason,
                     st.checked, r.text);
    }
}

/* Many failing checks: the list is cut with "..." rather than overrun. */
static void test_xstatus_long_list(void **state)
{
    char text[8192];
    size_t o = 0;
    struct relay_status st;

    (void)state;
    for (int i = 0; i < 40; i++)
        o += (size_t)snprintf(text + o, sizeof(text) - o,
                              "dnsbl:zone-number-%02d.example.org fail listed\n", i);
    snprintf(text + o, sizeof(text) - o, "2.0.0 status degraded checked=9");
    assert_int_equal(relay_status_parse_xstatus(text, &st), 0);
    assert_int_equal(st.state, RELAY_STATUS_DEGRADED);
    assert_true(strlen(st.failing) < sizeof(st.failing));
    assert_non_null(strstr(st.failing, "dnsbl:zone-number-00.example.org,"));
    assert_string_equal(st.failing + strlen(st.failing) - 3, "...");
    assert_string_equal(st.reason, "listed");
}

struct key_case {
    const char *keys[8][2];
    const char *error;         /* start of the error text */
};

/* Configuration errors are found before any file is read. */
static void test_create_errors(void **state)
{
    static const struct key_case cases[] = {
        {{{"tunnel_ca", "/x/ca.crt"}, {"client_cert", "/x/r.crt"}}, "host: required"},
        {{{"host", "relay.test:4650"}, {"client_cert", "/x/r.crt"}}, "tunnel_ca: required"},
        {{{"host", "relay.test"}, {"tunnel_ca", "/x/ca.crt"}}, "client_cert: required"},
        {{{"host", "relay.test"}, {"tls", "none"}}, "tls: not used by the relay transport"},
        {{{"host", "relay.test"}, {"auth_user", "u"}}, "auth_user: not used"},
        {{{"host", "relay.test"}, {"ca_file", "/x"}}, "ca_file: not used by the relay transport: set tunnel_ca"},
        {{{"host", "relay.test"}, {"provider", "sendgrid"}}, "provider: unknown key for the relay"},
        {{{"host", "relay.test"}, {"host", "other"}}, "host: set twice"},
        {{{"host", "relay.test:0"}, {"tunnel_ca", "/x"}, {"client_cert", "/x"}}, "host: port"},
        {{{"host", "::1"}, {"tunnel_ca", "/x"}, {"client_cert", "/x"}}, "host: an IPv6 address needs brackets"},
        {{{"host", "relay.test"}, {"tunnel_ca", "/nonexistent/ca.crt"}, {"client_cert", "/x"}},
         "tunnel_ca: "},
    };
    uv_loop_t loop;

    (void)state;
    uv_loop_init(&loop);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct config_named kv[8];
        size_t n = 0;
        char err[512] = "";
        struct transport *t;

        for (; n < 8 && cases[i].keys[n][0] != NULL; n++) {
            memset(&kv[n], 0, sizeof(kv[n]));
            kv[n].key = (char *)cases[i].keys[n][0];
            kv[n].value = (char *)cases[i].keys[n][1];
        }
        t = relay_transport_ops.create(&loop, "relay", kv, n, err, sizeof(err));
        assert_null(t);
        if (strncmp(err, cases[i].error, strlen(cases[i].error)) != 0)
            fail_msg("case %zu: got \"%s\", want \"%s...\"", i, err, cases[i].error);
    }
    assert_int_equal(uv_run(&loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void test_names(void **state)
{
    (void)state;
    assert_string_equal(relay_status_name(RELAY_STATUS_OK), "ok");
    assert_string_equal(relay_status_name(RELAY_STATUS_DEGRADED), "degraded");
    assert_string_equal(relay_status_name(RELAY_STATUS_PENDING), "pending");
    assert_string_equal(relay_status_name(RELAY_STATUS_UNKNOWN), "unknown");
    assert_string_equal(relay_status_name((enum relay_status_state)99), "unknown");
    assert_ptr_equal(transport_find("relay"), &relay_transport_ops);
    assert_int_equal(relay_transport_ops.health_opens_breaker, 1);
}

/* The way back through half-open: a trip opens a closed breaker for
 * breaker_cooldown, reopens a half-open one with the cool-down doubled up
 * to breaker_cooldown_max, and leaves an open one alone; the persisted
 * form names the cause "health". */
static void test_health_trip(void **state)
{
    struct policy_config *cfg = policy_config_new();
    struct policy_breaker b = {0}, next, parsed;
    char err[256], raw[160];

    (void)state;
    assert_int_equal(policy_config_set(cfg, "route.relay.transport", "relay", err, sizeof(err)),
                     POLICY_OK);
    assert_int_equal(policy_config_set(cfg, "route.relay.breaker_cooldown", "60", err,
                                       sizeof(err)), POLICY_OK);
    assert_int_equal(policy_config_set(cfg, "route.relay.breaker_cooldown_max", "200", err,
                                       sizeof(err)), POLICY_OK);
    assert_int_equal(policy_config_check(cfg, err, sizeof(err)), POLICY_OK);

    assert_int_equal(policy_breaker_trip(cfg, 0, &b, POLICY_CAUSE_HEALTH, 1000, &next),
                     POLICY_T_OPEN);
    assert_int_equal(next.state, POLICY_BREAKER_OPEN);
    assert_int_equal(next.since_ms, 1000);
    assert_int_equal(next.cooldown_ms, 60000);
    assert_int_equal(next.trips, 1);
    assert_int_equal(next.cause, POLICY_CAUSE_HEALTH);
    policy_breaker_format(&next, raw, sizeof(raw));
    assert_non_null(strstr(raw, "cause=health"));
    assert_int_equal(policy_breaker_parse(raw, &parsed), 0);
    assert_int_equal(parsed.cause, POLICY_CAUSE_HEALTH);
    assert_string_equal(policy_cause_name(POLICY_CAUSE_HEALTH), "health");

    /* Open stays open. */
    b = next;
    assert_int_equal(policy_breaker_trip(cfg, 0, &b, POLICY_CAUSE_HEALTH, 5000, &next),
                     POLICY_T_NONE);
    assert_memory_equal(&b, &next, sizeof(b));

    /* Half open: reopened, cool-down doubled, then capped at the maximum. */
    b.state = POLICY_BREAKER_HALF_OPEN;
    b.since_ms = 61000;
    assert_int_equal(policy_breaker_trip(cfg, 0, &b, POLICY_CAUSE_HEALTH, 70000, &next),
                     POLICY_T_REOPEN);
    assert_int_equal(next.state, POLICY_BREAKER_OPEN);
    assert_int_equal(next.cooldown_ms, 120000);
    assert_int_equal(next.trips, 2);
    next.state = POLICY_BREAKER_HALF_OPEN;
    assert_int_equal(policy_breaker_trip(cfg, 0, &next, POLICY_CAUSE_HEALTH, 200000, &next),
                     POLICY_T_REOPEN);
    assert_int_equal(next.cooldown_ms, 200000);
    policy_config_free(cfg);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keyword),
        cmocka_unit_test(test_xstatus),
        cmocka_unit_test(test_xstatus_long_list),
        cmocka_unit_test(test_create_errors),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_health_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
