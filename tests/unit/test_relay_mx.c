/*
 * Unit tests for relay/mx.c: null MX detection (RFC 7505), the order of MX
 * hosts (RFC 5321 section 5.1: preference, then random among equals),
 * duplicates and empty hosts, the cap, address literals, and the replies
 * for failed lookups. Table-driven.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relay/mx.h"

/* A deterministic "random" source: returns the values of a script in
 * turn (each taken modulo n). */
struct script {
    const unsigned *v;
    size_t n, i;
};

static unsigned scripted(void *arg, unsigned n)
{
    struct script *s = arg;
    unsigned v = s->n ? s->v[s->i++ % s->n] : 0;
    return v % n;
}

static unsigned lcg_state = 12345;

static unsigned lcg(void *arg, unsigned n)
{
    (void)arg;
    lcg_state = lcg_state * 1103515245u + 12345u;
    return (lcg_state >> 16) % n;
}

static void test_null_mx(void **state)
{
    static const struct {
        struct dns_mx mx[3];
        size_t n;
        int null;
    } cases[] = {
        {{{0, ""}}, 1, 1},
        {{{0, "."}}, 1, 1},
        {{{10, ""}}, 1, 0},              /* RFC 7505: preference must be 0 */
        {{{0, ""}, {10, "mx.example"}}, 2, 0},
        {{{0, "mx.example"}}, 1, 0},
        {{{0, NULL}}, 0, 0},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        assert_int_equal(mx_is_null(cases[i].mx, cases[i].n), cases[i].null);
}

/* Hosts in the order mx_order() gives, joined with spaces. */
static void order_str(const struct dns_mx *mx, size_t n, size_t max, mx_rand_fn rnd, void *arg,
                      char *out, size_t outlen)
{
    size_t order[32], k, off = 0;

    k = mx_order(mx, n, order, max, rnd, arg);
    out[0] = '\0';
    for (size_t i = 0; i < k; i++)
        off += (size_t)snprintf(out + off, outlen - off, "%s%s", i ? " " : "", mx[order[i]].host);
}

static void test_order(void **state)
{
    static const unsigned zero[] = {0};
    static const struct {
        struct dns_mx mx[6];
        size_t n, max;
        const char *want;        /* with rnd always 0 */
    } cases[] = {
        /* Sorted by preference. */
        {{{20, "b"}, {10, "a"}, {30, "c"}}, 3, 10, "a b c"},
        /* Empty hosts (a null MX mixed with real ones) are skipped. */
        {{{0, ""}, {10, "a"}}, 2, 10, "a"},
        /* A duplicate keeps its best preference. */
        {{{30, "a"}, {10, "b"}, {5, "A."}}, 3, 10, "A. b"},
        /* The cap keeps the preferred hosts. */
        {{{50, "e"}, {40, "d"}, {10, "a"}, {30, "c"}, {20, "b"}}, 5, 3, "a b c"},
        {{{10, "a"}}, 1, 0, ""},
        /* Ties with rnd 0: Fisher-Yates swaps each last element with the
         * first of its run. */
        {{{10, "a"}, {10, "b"}, {10, "c"}, {5, "z"}}, 4, 10, "z b c a"},
    };
    struct script s = {zero, 1, 0};
    char got[256];

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        order_str(cases[i].mx, cases[i].n, cases[i].max, scripted, &s, got, sizeof(got));
        if (strcmp(got, cases[i].want) != 0)
            fail_msg("case %zu: got \"%s\", want \"%s\"", i, got, cases[i].want);
    }
}

/* Equal preferences are spread: over many draws each host of a tie comes
 * first a fair share of the time, and never one of a worse preference. */
static void test_order_random(void **state)
{
    static const struct dns_mx mx[] = {
        {10, "a"}, {10, "b"}, {10, "c"}, {20, "backup"},
    };
    unsigned first[3] = {0, 0, 0};
    size_t order[4];

    (void)state;
    for (int i = 0; i < 3000; i++) {
        size_t k = mx_order(mx, 4, order, 4, lcg, NULL);

        assert_int_equal(k, 4);
        assert_string_equal(mx[order[3]].host, "backup");
        assert_true(order[0] < 3);
        first[order[0]]++;
    }
    for (int h = 0; h < 3; h++)
        assert_true(first[h] > 800 && first[h] < 1200);
}

static void test_literal(void **state)
{
    static const struct {
        const char *domain;
        int rc;
        int family;
        const char *addr;
    } cases[] = {
        {"example.com", 0, 0, NULL},
        {"[192.0.2.1]", 1, AF_INET, "192.0.2.1"},
        {"[IPv6:2001:db8::1]", 1, AF_INET6, "2001:db8::1"},
        {"[ipv6:::1]", 1, AF_INET6, "::1"},
        {"[192.0.2.300]", -1, 0, NULL},
        {"[2001:db8::1]", -1, 0, NULL},       /* IPv6 needs the tag */
        {"[192.0.2.1", -1, 0, NULL},
        {"[]", -1, 0, NULL},
    };
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct sockaddr_storage ss;
        socklen_t len = 0;
        char text[INET6_ADDRSTRLEN];
        int rc = mx_literal(cases[i].domain, &ss, &len);

        if (rc != cases[i].rc)
            fail_msg("%s: rc %d, want %d", cases[i].domain, rc, cases[i].rc);
        if (rc != 1)
            continue;
        assert_int_equal(ss.ss_family, cases[i].family);
        if (cases[i].family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, text, sizeof(text));
        else
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, text, sizeof(text));
        assert_string_equal(text, cases[i].addr);
    }
}

static void test_failures(void **state)
{
    static const struct {
        int st;
        int code;
        const char *enh;
    } cases[] = {
        {DNS_ENOTFOUND, 550, "5.1.2"},
        {DNS_ETIMEOUT, 451, "4.4.3"},
        {DNS_ESERVFAIL, 451, "4.4.3"},
        {DNS_EREFUSED, 451, "4.4.3"},
        {DNS_ECONNREFUSED, 451, "4.4.3"},
    };
    struct mx_failure f;

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        mx_dns_failure(cases[i].st, "example.org", &f);
        assert_int_equal(f.code, cases[i].code);
        assert_string_equal(f.enhanced, cases[i].enh);
        assert_non_null(strstr(f.text, "example.org"));
    }
    mx_null_failure("null.example", &f);
    assert_int_equal(f.code, 556);
    assert_string_equal(f.enhanced, "5.1.10");
    mx_noaddr_failure("x.example", 0, &f);
    assert_int_equal(f.code, 550);
    assert_string_equal(f.enhanced, "5.4.4");
    mx_noaddr_failure("x.example", 1, &f);
    assert_int_equal(f.code, 451);
}

static void test_normalize(void **state)
{
    char d1[] = "Example.COM.", d2[] = ".", d3[] = "a.b";

    (void)state;
    mx_domain_normalize(d1);
    mx_domain_normalize(d2);
    mx_domain_normalize(d3);
    assert_string_equal(d1, "example.com");
    assert_string_equal(d2, ".");
    assert_string_equal(d3, "a.b");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_null_mx),
        cmocka_unit_test(test_order),
        cmocka_unit_test(test_order_random),
        cmocka_unit_test(test_literal),
        cmocka_unit_test(test_failures),
        cmocka_unit_test(test_normalize),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
