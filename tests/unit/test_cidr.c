/*
 * Unit tests for lib/cidr.c: parsing network lists and matching peers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cmocka.h>

#include "lib/cidr.h"

struct parse_case {
    const char *in;
    int ok;
    size_t n;             /* elements, when ok */
    const char *first;    /* first network as "addr/prefix", when ok and n > 0 */
    const char *err;      /* substring of the message, when not ok */
};

static const struct parse_case parse_cases[] = {
    {"", 1, 0, NULL, NULL},
    {"   ", 1, 0, NULL, NULL},
    {",", 1, 0, NULL, NULL},
    {" , ,\t,\n", 1, 0, NULL, NULL},
    {"127.0.0.0/8", 1, 1, "127.0.0.0/8", NULL},
    {"127.0.0.0/8, ::1, 10.0.0.0/8", 1, 3, "127.0.0.0/8", NULL},
    {"127.0.0.0/8,::1,10.0.0.0/8", 1, 3, "127.0.0.0/8", NULL},
    {"127.0.0.0/8 ::1\t10.0.0.0/8\n", 1, 3, "127.0.0.0/8", NULL},
    {",,127.0.0.1,,  ,::1,", 1, 2, "127.0.0.1/32", NULL},
    {"192.0.2.7", 1, 1, "192.0.2.7/32", NULL},
    {"2001:db8::1", 1, 1, "2001:db8::1/128", NULL},
    {"0.0.0.0/0", 1, 1, "0.0.0.0/0", NULL},
    {"::/0", 1, 1, "::/0", NULL},
    {"192.0.2.128/25", 1, 1, "192.0.2.128/25", NULL},
    {"10.0.0.0/08", 1, 1, "10.0.0.0/8", NULL},
    {"2001:db8::/32", 1, 1, "2001:db8::/32", NULL},
    {"2001:DB8::/32", 1, 1, "2001:db8::/32", NULL},
    {"::ffff:10.0.0.0/104", 1, 1, "::ffff:10.0.0.0/104", NULL},
    {"fe80::/10", 1, 1, "fe80::/10", NULL},

    {"10.0.0.1/8", 0, 0, NULL, "host bits set (the network is 10.0.0.0/8)"},
    {"192.0.2.1/0", 0, 0, NULL, "host bits set"},
    {"2001:db8::1/64", 0, 0, NULL, "host bits set (the network is 2001:db8::/64)"},
    {"fe80::/8", 0, 0, NULL, "host bits set (the network is fe00::/8)"},
    {"10.0.0.0/33", 0, 0, NULL, "out of range"},
    {"::/129", 0, 0, NULL, "out of range"},
    {"10.0.0.0/999", 0, 0, NULL, "out of range"},
    {"10.0.0.0/1000", 0, 0, NULL, "bad prefix length"},
    {"10.0.0.0/", 0, 0, NULL, "bad prefix length"},
    {"10.0.0.0/-1", 0, 0, NULL, "bad prefix length"},
    {"10.0.0.0/+8", 0, 0, NULL, "bad prefix length"},
    {"10.0.0.0/8/8", 0, 0, NULL, "bad prefix length"},
    {"10.0.0.0/x", 0, 0, NULL, "bad prefix length"},
    {"/8", 0, 0, NULL, "not an IPv4 address"},
    {"10.0.0", 0, 0, NULL, "not an IPv4 address"},
    {"10.0.0.256", 0, 0, NULL, "not an IPv4 address"},
    {"010.0.0.1", 0, 0, NULL, "not an IPv4 address"},
    {"localhost", 0, 0, NULL, "not an IPv4 address"},
    {"1:2:3:4:5:6:7:8:9", 0, 0, NULL, "not an IPv6 address"},
    {"fe80::1%eth0", 0, 0, NULL, "not an IPv6 address"},
    {"[::1]", 0, 0, NULL, "not an IPv6 address"},
    {"127.0.0.1, garbage, ::1", 0, 0, NULL, "bad network \"garbage\""},
    {"127.0.0.1;::1", 0, 0, NULL, "bad network \"127.0.0.1;::1\""},
    /* The longest text form is accepted, one character more is not. */
    {"ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128", 1, 1,
     "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", NULL},
    {"ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/0128", 0, 0, NULL, "too long"},
    {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
     0, 0, NULL, "too long"},
};

static void format_cidr(const struct cidr *c, char *s, size_t n)
{
    char a[INET6_ADDRSTRLEN];

    assert_non_null(inet_ntop(c->family, c->addr, a, sizeof(a)));
    snprintf(s, n, "%s/%u", a, c->prefix);
}

static void test_parse_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(parse_cases) / sizeof(parse_cases[0]); i++) {
        const struct parse_case *c = &parse_cases[i];
        struct cidr_list l = {NULL, 0};
        char err[256] = "unset";
        char got[80];
        int rc = cidr_list_parse(c->in, &l, err, sizeof(err));

        if (rc != (c->ok ? 0 : -1))
            fail_msg("\"%s\": got %d (%s)", c->in, rc, err);
        if (c->ok) {
            assert_int_equal(l.n, c->n);
            if (c->n) {
                format_cidr(&l.v[0], got, sizeof(got));
                if (strcmp(got, c->first) != 0)
                    fail_msg("\"%s\": first is %s, want %s", c->in, got, c->first);
            }
        } else {
            assert_null(l.v);
            assert_int_equal(l.n, 0);
            if (strstr(err, c->err) == NULL)
                fail_msg("\"%s\": message \"%s\" lacks \"%s\"", c->in, err, c->err);
        }
        cidr_list_free(&l);
    }
}

/* A new parse replaces the old list; a failed one leaves it empty. */
static void test_parse_replaces(void **state)
{
    struct cidr_list l = {NULL, 0};
    char err[128];

    (void)state;
    assert_int_equal(cidr_list_parse("10.0.0.0/8, 192.168.0.0/16", &l, err, sizeof(err)), 0);
    assert_int_equal(l.n, 2);
    assert_int_equal(cidr_list_parse("::1", &l, err, sizeof(err)), 0);
    assert_int_equal(l.n, 1);
    assert_int_equal(l.v[0].family, AF_INET6);
    assert_int_equal(l.v[0].prefix, 128);
    assert_int_equal(cidr_list_parse("::1, bad", &l, err, sizeof(err)), -1);
    assert_null(l.v);
    assert_int_equal(l.n, 0);
    /* A NULL or tiny error buffer is fine. */
    assert_int_equal(cidr_list_parse("bad", &l, NULL, 0), -1);
    assert_int_equal(cidr_list_parse("bad", &l, err, 1), -1);
    assert_string_equal(err, "");
    /* Many elements make the array grow. */
    {
        char big[4096];
        size_t off = 0;

        for (int i = 0; i < 200; i++)
            off += (size_t)snprintf(big + off, sizeof(big) - off, "10.%d.0.0/16,", i);
        assert_int_equal(cidr_list_parse(big, &l, err, sizeof(err)), 0);
        assert_int_equal(l.n, 200);
    }
    cidr_list_free(&l);
    cidr_list_free(&l);
    assert_null(l.v);
}

/* Builds a socket address from text; AF_INET6 when it holds ':'. */
static void make_sa(const char *addr, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (strchr(addr, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(25);
        assert_int_equal(inet_pton(AF_INET6, addr, &s6->sin6_addr), 1);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;

        s4->sin_family = AF_INET;
        s4->sin_port = htons(25);
        assert_int_equal(inet_pton(AF_INET, addr, &s4->sin_addr), 1);
    }
}

struct match_case {
    const char *list;
    const char *peer;
    int match;
};

static const struct match_case match_cases[] = {
    {"", "127.0.0.1", 0},
    {"", "::1", 0},
    {"127.0.0.0/8", "127.0.0.1", 1},
    {"127.0.0.0/8", "127.255.255.255", 1},
    {"127.0.0.0/8", "128.0.0.1", 0},
    {"127.0.0.0/8", "126.255.255.255", 0},
    {"192.0.2.7", "192.0.2.7", 1},
    {"192.0.2.7", "192.0.2.6", 0},
    {"192.0.2.7", "192.0.2.8", 0},
    {"192.0.2.128/25", "192.0.2.128", 1},
    {"192.0.2.128/25", "192.0.2.255", 1},
    {"192.0.2.128/25", "192.0.2.127", 0},
    {"10.0.0.0/7", "11.1.2.3", 1},
    {"10.0.0.0/7", "12.0.0.0", 0},
    {"0.0.0.0/0", "203.0.113.9", 1},
    {"0.0.0.0/0", "255.255.255.255", 1},
    {"0.0.0.0/0", "2001:db8::1", 0},
    {"::/0", "2001:db8::1", 1},
    {"::/0", "::", 1},
    {"::/0", "203.0.113.9", 0},
    {"::1", "::1", 1},
    {"::1", "::2", 0},
    {"::1", "127.0.0.1", 0},
    {"127.0.0.1", "::1", 0},
    {"2001:db8::/32", "2001:db8:ffff::1", 1},
    {"2001:db8::/32", "2001:db9::1", 0},
    {"fe80::/10", "febf::1", 1},
    {"fe80::/10", "fec0::1", 0},
    {"2001:db8::/127", "2001:db8::1", 1},
    {"2001:db8::/127", "2001:db8::2", 0},
    /* IPv4-mapped IPv6 peers match IPv4 networks (RFC 4291 2.5.5.2). */
    {"127.0.0.0/8", "::ffff:127.0.0.1", 1},
    {"127.0.0.0/8", "::ffff:128.0.0.1", 0},
    {"0.0.0.0/0", "::ffff:1.2.3.4", 1},
    {"192.0.2.7", "::ffff:192.0.2.7", 1},
    /* ... and also IPv6 networks that cover them, being IPv6 addresses. */
    {"::ffff:0:0/96", "::ffff:192.0.2.7", 1},
    {"::/0", "::ffff:192.0.2.7", 1},
    /* but plain IPv4 peers are not compared with IPv6 networks. */
    {"::ffff:0:0/96", "192.0.2.7", 0},
    /* IPv4-compatible (deprecated) and NAT64 forms are not mapped. */
    {"192.0.2.7", "::192.0.2.7", 0},
    {"192.0.2.7", "64:ff9b::192.0.2.7", 0},
    {"10.0.0.0/8, 127.0.0.0/8, ::1", "127.0.0.1", 1},
    {"10.0.0.0/8, 127.0.0.0/8, ::1", "::1", 1},
    {"10.0.0.0/8, 127.0.0.0/8, ::1", "192.168.1.1", 0},
};

static void test_match_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(match_cases) / sizeof(match_cases[0]); i++) {
        const struct match_case *c = &match_cases[i];
        struct cidr_list l = {NULL, 0};
        struct sockaddr_storage ss;
        char err[128];
        int got;

        assert_int_equal(cidr_list_parse(c->list, &l, err, sizeof(err)), 0);
        make_sa(c->peer, &ss);
        got = cidr_list_match(&l, (const struct sockaddr *)&ss);
        if (got != c->match)
            fail_msg("list \"%s\" peer %s: got %d, want %d", c->list, c->peer, got, c->match);
        cidr_list_free(&l);
    }
}

/* Every prefix length of both families matches exactly its network. */
static void test_every_prefix(void **state)
{
    char text[80], err[128];
    struct cidr_list l = {NULL, 0};
    struct sockaddr_storage ss;

    (void)state;
    for (unsigned p = 0; p <= 32; p++) {
        /* 255.255.255.255 masked to p bits is the network; the peer one
         * past its last address lies outside unless p is 0. */
        uint32_t mask = p ? 0xffffffffu << (32 - p) : 0;
        struct in_addr a = {htonl(0xffffffffu & mask)};
        char net[INET_ADDRSTRLEN];

        assert_non_null(inet_ntop(AF_INET, &a, net, sizeof(net)));
        snprintf(text, sizeof(text), "%s/%u", net, p);
        assert_int_equal(cidr_list_parse(text, &l, err, sizeof(err)), 0);
        make_sa("255.255.255.255", &ss);
        assert_int_equal(cidr_list_match(&l, (struct sockaddr *)&ss), 1);
        if (p > 0) {
            a.s_addr = htonl(mask - 1);     /* flips bit 32 - p, inside the prefix */
            assert_non_null(inet_ntop(AF_INET, &a, net, sizeof(net)));
            make_sa(net, &ss);
            assert_int_equal(cidr_list_match(&l, (struct sockaddr *)&ss), 0);
        }
    }
    for (unsigned p = 0; p <= 128; p++) {
        struct in6_addr a;
        char net[INET6_ADDRSTRLEN];

        memset(&a, 0xff, sizeof(a));
        for (unsigned b = p; b < 128; b++)
            a.s6_addr[b / 8] &= (unsigned char)~(0x80u >> (b % 8));
        assert_non_null(inet_ntop(AF_INET6, &a, net, sizeof(net)));
        snprintf(text, sizeof(text), "%s/%u", net, p);
        assert_int_equal(cidr_list_parse(text, &l, err, sizeof(err)), 0);
        make_sa("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", &ss);
        assert_int_equal(cidr_list_match(&l, (struct sockaddr *)&ss), 1);
        if (p > 0) {
            /* Clear the last bit of the prefix: outside. */
            memset(&a, 0xff, sizeof(a));
            a.s6_addr[(p - 1) / 8] &= (unsigned char)~(0x80u >> ((p - 1) % 8));
            assert_non_null(inet_ntop(AF_INET6, &a, net, sizeof(net)));
            make_sa(net, &ss);
            assert_int_equal(cidr_list_match(&l, (struct sockaddr *)&ss), 0);
        }
    }
    cidr_list_free(&l);
}

/* Unknown families and NULL never match. */
static void test_match_odd_inputs(void **state)
{
    struct cidr_list l = {NULL, 0};
    struct sockaddr_storage ss;
    char err[128];

    (void)state;
    assert_int_equal(cidr_list_parse("0.0.0.0/0, ::/0", &l, err, sizeof(err)), 0);
    memset(&ss, 0, sizeof(ss));
    ss.ss_family = AF_UNIX;
    assert_int_equal(cidr_list_match(&l, (struct sockaddr *)&ss), 0);
    assert_int_equal(cidr_list_match(&l, NULL), 0);
    cidr_list_free(&l);
    make_sa("127.0.0.1", &ss);
    assert_int_equal(cidr_list_match(&l, (struct sockaddr *)&ss), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_table),
        cmocka_unit_test(test_parse_replaces),
        cmocka_unit_test(test_match_table),
        cmocka_unit_test(test_every_prefix),
        cmocka_unit_test(test_match_odd_inputs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
