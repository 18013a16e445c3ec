/*
 * Unit tests for relay/spf.c, the RFC 7208 evaluator. The evaluator asks
 * for DNS answers one at a time; here they come from a table that stands
 * in for the DNS (a name with records of another type answers NODATA, an
 * unknown name NXDOMAIN, and "!servfail" / "!timeout" entries fail). Each
 * case names the client address, the domain, the result expected and,
 * where it matters, the number of lookups counted against the limit of
 * ten (RFC 7208 section 4.6.4).
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
#include <strings.h>

#include "lib/xmalloc.h"
#include "relay/spf.h"

struct rr {
    const char *name;
    enum dns_type type;
    const char *data;     /* TXT text, address, "pref host", PTR name, or
                             "!servfail" / "!timeout" */
};

static const struct rr zone[] = {
    {"ex.test", DNS_T_TXT, "v=spf1 ip4:192.0.2.0/24 -all"},
    {"ex.test", DNS_T_TXT, "google-site-verification=abc"},
    {"ip6.test", DNS_T_TXT, "v=spf1 ip6:2001:db8::/32 ~all"},
    {"a.test", DNS_T_TXT, "v=spf1 a -all"},
    {"a.test", DNS_T_A, "198.51.100.1"},
    {"acidr.test", DNS_T_TXT, "v=spf1 a:host.acidr.test/24 -all"},
    {"host.acidr.test", DNS_T_A, "198.51.100.77"},
    {"mx.test", DNS_T_TXT, "v=spf1 mx -all"},
    {"mx.test", DNS_T_MX, "10 mail.mx.test"},
    {"mx.test", DNS_T_MX, "20 backup.mx.test"},
    {"mail.mx.test", DNS_T_A, "203.0.113.5"},
    {"backup.mx.test", DNS_T_A, "203.0.113.6"},
    {"inc.test", DNS_T_TXT, "v=spf1 include:ex.test ?all"},
    {"incnone.test", DNS_T_TXT, "v=spf1 include:nothing.test -all"},
    {"incfail.test", DNS_T_TXT, "v=spf1 include:fail.test ~all"},
    {"fail.test", DNS_T_TXT, "v=spf1 -all"},
    {"redir.test", DNS_T_TXT, "v=spf1 redirect=ex.test"},
    {"redirall.test", DNS_T_TXT, "v=spf1 -all redirect=ex.test"},
    {"redirnone.test", DNS_T_TXT, "v=spf1 redirect=nothing.test"},
    {"two.test", DNS_T_TXT, "v=spf1 +all"},
    {"two.test", DNS_T_TXT, "v=spf1 -all"},
    {"nospf.test", DNS_T_TXT, "v=spf10 +all"},
    {"syntax.test", DNS_T_TXT, "v=spf1 ip4:300.1.1.1 -all"},
    {"syntax2.test", DNS_T_TXT, "v=spf1 foo:bar -all"},
    {"syntax3.test", DNS_T_TXT, "v=spf1 ip4:192.0.2.0/33 -all"},
    {"syntax4.test", DNS_T_TXT, "v=spf1 -redirect=ex.test"},
    {"dupredir.test", DNS_T_TXT, "v=spf1 redirect=ex.test redirect=a.test"},
    {"loop.test", DNS_T_TXT, "v=spf1 include:loop.test -all"},
    {"temp.test", DNS_T_TXT, "!servfail"},
    {"timeout.test", DNS_T_TXT, "!timeout"},
    {"exists.test", DNS_T_TXT, "v=spf1 exists:%{i}.allow.exists.test -all"},
    {"192.0.2.1.allow.exists.test", DNS_T_A, "127.0.0.2"},
    {"macro.test", DNS_T_TXT, "v=spf1 exists:%{ir}.%{v}._spf.%{d2} -all"},
    {"1.2.0.192.in-addr._spf.macro.test", DNS_T_A, "127.0.0.2"},
    {"macro2.test", DNS_T_TXT, "v=spf1 exists:%{l}.%{o}.%{d1r}.m -all"},
    {"postmaster.macro2.test.macro2.m", DNS_T_A, "127.0.0.2"},
    {"badmacro.test", DNS_T_TXT, "v=spf1 exists:%{x}.example -all"},
    {"ptr.test", DNS_T_TXT, "v=spf1 ptr -all"},
    {"9.2.0.192.in-addr.arpa", DNS_T_PTR, "host.ptr.test"},
    {"host.ptr.test", DNS_T_A, "192.0.2.9"},
    {"10.2.0.192.in-addr.arpa", DNS_T_PTR, "host.other.test"},
    {"host.other.test", DNS_T_A, "192.0.2.10"},
    {"11.2.0.192.in-addr.arpa", DNS_T_PTR, "forged.ptr.test"},
    {"forged.ptr.test", DNS_T_A, "192.0.2.99"},
    {"void.test", DNS_T_TXT, "v=spf1 a:n1.void.test a:n2.void.test a:n3.void.test +all"},
    {"void2.test", DNS_T_TXT, "v=spf1 a:n1.void.test a:n2.void.test +all"},
    {"neutral.test", DNS_T_TXT, "v=spf1 ip4:10.0.0.0/8"},
    {"mod.test", DNS_T_TXT, "v=spf1 foo=bar exp=explain.mod.test ip4:192.0.2.1 -all"},
    {"dual.test", DNS_T_TXT, "v=spf1 a//64 -all"},
    {"dual.test", DNS_T_AAAA, "2001:db8:1::1"},
    {"case.test", DNS_T_TXT, "V=SPF1 IP4:192.0.2.1 -ALL"},
    {"mxtemp.test", DNS_T_TXT, "v=spf1 mx -all"},
    {"mxtemp.test", DNS_T_MX, "!servfail"},
    {"spaces.test", DNS_T_TXT, "v=spf1   ip4:192.0.2.1    -all  "},
    {"softall.test", DNS_T_TXT, "v=spf1 ~all"},
    {"mxmany.test", DNS_T_TXT, "v=spf1 mx -all"},
    {"mxmany.test", DNS_T_MX, "1 h1.test"},
    {"mxmany.test", DNS_T_MX, "2 h2.test"},
    {"mxmany.test", DNS_T_MX, "3 h3.test"},
    {"mxmany.test", DNS_T_MX, "4 h4.test"},
    {"mxmany.test", DNS_T_MX, "5 h5.test"},
    {"mxmany.test", DNS_T_MX, "6 h6.test"},
    {"mxmany.test", DNS_T_MX, "7 h7.test"},
    {"mxmany.test", DNS_T_MX, "8 h8.test"},
    {"mxmany.test", DNS_T_MX, "9 h9.test"},
    {"mxmany.test", DNS_T_MX, "10 h10.test"},
    {"mxmany.test", DNS_T_MX, "11 h11.test"},
    {"h1.test", DNS_T_A, "10.0.0.1"}, {"h2.test", DNS_T_A, "10.0.0.2"},
    {"h3.test", DNS_T_A, "10.0.0.3"}, {"h4.test", DNS_T_A, "10.0.0.4"},
    {"h5.test", DNS_T_A, "10.0.0.5"}, {"h6.test", DNS_T_A, "10.0.0.6"},
    {"h7.test", DNS_T_A, "10.0.0.7"}, {"h8.test", DNS_T_A, "10.0.0.8"},
    {"h9.test", DNS_T_A, "10.0.0.9"}, {"h10.test", DNS_T_A, "10.0.0.10"},
    {"h11.test", DNS_T_A, "10.0.0.11"},
    /* A chain of includes eleven deep: the eleventh lookup is one too
     * many. */
    {"c0.test", DNS_T_TXT, "v=spf1 include:c1.test -all"},
    {"c1.test", DNS_T_TXT, "v=spf1 include:c2.test -all"},
    {"c2.test", DNS_T_TXT, "v=spf1 include:c3.test -all"},
    {"c3.test", DNS_T_TXT, "v=spf1 include:c4.test -all"},
    {"c4.test", DNS_T_TXT, "v=spf1 include:c5.test -all"},
    {"c5.test", DNS_T_TXT, "v=spf1 include:c6.test -all"},
    {"c6.test", DNS_T_TXT, "v=spf1 include:c7.test -all"},
    {"c7.test", DNS_T_TXT, "v=spf1 include:c8.test -all"},
    {"c8.test", DNS_T_TXT, "v=spf1 include:c9.test -all"},
    {"c9.test", DNS_T_TXT, "v=spf1 include:c10.test -all"},
    {"c10.test", DNS_T_TXT, "v=spf1 ip4:192.0.2.1 include:c11.test -all"},
    {"c11.test", DNS_T_TXT, "v=spf1 +all"},
    /* Ten lookups exactly are allowed. */
    {"ten.test", DNS_T_TXT, "v=spf1 include:c2.test"},
};

/* ---- the fake DNS --------------------------------------------------------- */

static int name_eq(const char *a, const char *b)
{
    return strcasecmp(a, b) == 0;
}

static struct dns_result *answer(const char *name, enum dns_type type)
{
    struct dns_result *r = xcalloc(1, sizeof(*r));
    int exists = 0;

    r->type = type;
    r->name = xstrdup(name);
    for (size_t i = 0; i < sizeof(zone) / sizeof(zone[0]); i++) {
        const struct rr *z = &zone[i];

        if (!name_eq(z->name, name))
            continue;
        exists = 1;
        if (z->type != type)
            continue;
        if (strcmp(z->data, "!servfail") == 0) {
            r->status = DNS_ESERVFAIL;
            return r;
        }
        if (strcmp(z->data, "!timeout") == 0) {
            r->status = DNS_ETIMEOUT;
            return r;
        }
        switch (type) {
        case DNS_T_TXT:
            r->txts = xrealloc(r->txts, (r->n + 1) * sizeof(*r->txts));
            r->txts[r->n].data = xstrdup(z->data);
            r->txts[r->n].len = strlen(z->data);
            break;
        case DNS_T_A: case DNS_T_AAAA: {
            struct dns_addr *a;

            r->addrs = xrealloc(r->addrs, (r->n + 1) * sizeof(*r->addrs));
            a = &r->addrs[r->n];
            memset(a, 0, sizeof(*a));
            a->family = type == DNS_T_A ? AF_INET : AF_INET6;
            assert_int_equal(inet_pton(a->family, z->data, &a->u), 1);
            snprintf(a->text, sizeof(a->text), "%s", z->data);
            break;
        }
        case DNS_T_MX: {
            char host[256];
            unsigned pref;

            assert_int_equal(sscanf(z->data, "%u %255s", &pref, host), 2);
            r->mxs = xrealloc(r->mxs, (r->n + 1) * sizeof(*r->mxs));
            r->mxs[r->n].preference = pref;
            r->mxs[r->n].host = xstrdup(host);
            break;
        }
        case DNS_T_PTR:
            r->names = xrealloc(r->names, (r->n + 1) * sizeof(*r->names));
            r->names[r->n] = xstrdup(z->data);
            break;
        }
        r->n++;
    }
    r->status = r->n > 0 ? DNS_OK : exists ? DNS_ENODATA : DNS_ENOTFOUND;
    return r;
}

static void answer_free(struct dns_result *r)
{
    for (size_t i = 0; i < r->n; i++) {
        if (r->type == DNS_T_TXT)
            free(r->txts[i].data);
        else if (r->type == DNS_T_MX)
            free(r->mxs[i].host);
        else if (r->type == DNS_T_PTR)
            free(r->names[i]);
    }
    free(r->txts);
    free(r->mxs);
    free(r->names);
    free(r->addrs);
    free(r->name);
    free(r);
}

/* Runs one evaluation against the table. */
static enum spf_result eval(const char *ip, const char *domain, unsigned *lookups, char *why,
                            size_t whylen)
{
    struct spf *e = spf_new(ip, domain, NULL, NULL);
    struct spf_query q;
    enum spf_result r;
    int guard = 0;

    assert_non_null(e);
    while (spf_step(e, &q) == SPF_STEP_QUERY) {
        struct dns_result *a = answer(q.name, q.type);

        spf_answer(e, a);
        answer_free(a);
        assert_true(++guard < 500);
    }
    r = spf_result(e);
    if (lookups)
        *lookups = spf_lookups(e);
    snprintf(why, whylen, "%s", spf_explain(e));
    spf_free(e);
    return r;
}

static void test_table(void **state)
{
    static const struct {
        const char *ip, *domain;
        enum spf_result want;
        int lookups;               /* -1: not checked */
    } cases[] = {
        {"192.0.2.1", "ex.test", SPF_PASS, 0},
        {"192.0.2.255", "ex.test", SPF_PASS, 0},
        {"192.0.3.1", "ex.test", SPF_FAIL, 0},
        {"2001:db8::1", "ex.test", SPF_FAIL, 0},
        {"2001:db8:ff::1", "ip6.test", SPF_PASS, 0},
        {"2001:db9::1", "ip6.test", SPF_SOFTFAIL, 0},
        {"192.0.2.1", "ip6.test", SPF_SOFTFAIL, 0},
        {"::ffff:192.0.2.1", "ex.test", SPF_PASS, 0},
        {"198.51.100.1", "a.test", SPF_PASS, 1},
        {"198.51.100.2", "a.test", SPF_FAIL, 1},
        {"198.51.100.200", "acidr.test", SPF_PASS, 1},
        {"198.51.101.1", "acidr.test", SPF_FAIL, 1},
        {"203.0.113.6", "mx.test", SPF_PASS, 1},
        {"203.0.113.7", "mx.test", SPF_FAIL, 1},
        {"192.0.2.7", "inc.test", SPF_PASS, 1},
        {"10.1.1.1", "inc.test", SPF_NEUTRAL, 1},
        {"192.0.2.7", "incnone.test", SPF_PERMERROR, 1},
        {"192.0.2.7", "incfail.test", SPF_SOFTFAIL, 1},
        {"192.0.2.7", "redir.test", SPF_PASS, 1},
        {"10.0.0.1", "redir.test", SPF_FAIL, 1},
        {"192.0.2.7", "redirall.test", SPF_FAIL, 0},
        {"192.0.2.7", "redirnone.test", SPF_PERMERROR, 1},
        {"192.0.2.7", "two.test", SPF_PERMERROR, 0},
        {"192.0.2.7", "nospf.test", SPF_NONE, 0},
        {"192.0.2.7", "nothing.test", SPF_NONE, 0},
        {"192.0.2.7", "syntax.test", SPF_PERMERROR, 0},
        {"192.0.2.7", "syntax2.test", SPF_PERMERROR, 0},
        {"192.0.2.7", "syntax3.test", SPF_PERMERROR, 0},
        {"192.0.2.7", "syntax4.test", SPF_PERMERROR, 0},
        {"192.0.2.7", "dupredir.test", SPF_PERMERROR, 0},
        {"192.0.2.7", "loop.test", SPF_PERMERROR, 11},
        {"192.0.2.7", "temp.test", SPF_TEMPERROR, 0},
        {"192.0.2.7", "timeout.test", SPF_TEMPERROR, 0},
        {"192.0.2.1", "exists.test", SPF_PASS, 1},
        {"192.0.2.2", "exists.test", SPF_FAIL, 1},
        {"192.0.2.1", "macro.test", SPF_PASS, 1},
        {"192.0.2.1", "macro2.test", SPF_PASS, 1},
        {"192.0.2.1", "badmacro.test", SPF_PERMERROR, 1},
        {"192.0.2.9", "ptr.test", SPF_PASS, 1},
        {"192.0.2.10", "ptr.test", SPF_FAIL, 1},     /* PTR in another domain */
        {"192.0.2.11", "ptr.test", SPF_FAIL, 1},     /* PTR not forward-confirmed */
        {"192.0.2.12", "ptr.test", SPF_FAIL, 1},     /* no PTR at all */
        {"192.0.2.1", "void.test", SPF_PERMERROR, 3},
        {"192.0.2.1", "void2.test", SPF_PASS, 2},
        {"192.0.2.1", "neutral.test", SPF_NEUTRAL, 0},
        {"192.0.2.1", "mod.test", SPF_PASS, 0},
        {"2001:db8:1::99", "dual.test", SPF_PASS, 1},
        {"2001:db8:2::1", "dual.test", SPF_FAIL, 1},
        {"192.0.2.1", "case.test", SPF_PASS, 0},
        {"192.0.2.1", "mxtemp.test", SPF_TEMPERROR, 1},
        {"192.0.2.1", "spaces.test", SPF_PASS, 0},
        {"192.0.2.1", "softall.test", SPF_SOFTFAIL, 0},
        {"10.0.0.11", "mxmany.test", SPF_PERMERROR, 1},
        /* Lookups are counted as terms are evaluated: an earlier match
         * ends the evaluation below the limit. */
        {"192.0.2.1", "c0.test", SPF_PASS, 10},
        {"192.0.2.2", "c0.test", SPF_PERMERROR, 11},
        {"192.0.2.1", "ten.test", SPF_PASS, 9},
        {"192.0.2.2", "ten.test", SPF_PASS, 10},
    };
    char why[512];

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        unsigned lookups = 0;
        enum spf_result r = eval(cases[i].ip, cases[i].domain, &lookups, why, sizeof(why));

        if (r != cases[i].want)
            fail_msg("%s from %s: %s (%s), want %s", cases[i].domain, cases[i].ip,
                     spf_result_name(r), why, spf_result_name(cases[i].want));
        if (cases[i].lookups >= 0 && lookups != (unsigned)cases[i].lookups)
            fail_msg("%s from %s: %u lookups, want %d", cases[i].domain, cases[i].ip, lookups,
                     cases[i].lookups);
    }
}

static void test_explain(void **state)
{
    char why[512];

    (void)state;
    assert_int_equal(eval("192.0.2.1", "ex.test", NULL, why, sizeof(why)), SPF_PASS);
    assert_string_equal(why, "ip4:192.0.2.0/24 matched in ex.test");
    assert_int_equal(eval("192.0.2.7", "nothing.test", NULL, why, sizeof(why)), SPF_NONE);
    assert_string_equal(why, "no SPF record at nothing.test");
    assert_int_equal(eval("192.0.2.7", "loop.test", NULL, why, sizeof(why)), SPF_PERMERROR);
    assert_string_equal(why, "more than 10 DNS lookups");
    assert_int_equal(eval("192.0.2.7", "inc.test", NULL, why, sizeof(why)), SPF_PASS);
    assert_string_equal(why, "include:ex.test matched in inc.test");
}

static void test_new_invalid(void **state)
{
    (void)state;
    assert_null(spf_new("not-an-ip", "ex.test", NULL, NULL));
    assert_null(spf_new("192.0.2.1", "", NULL, NULL));
    assert_null(spf_new("192.0.2.1", NULL, NULL, NULL));
}

/* A caller that steps again without answering gets the same query. */
static void test_step_repeats(void **state)
{
    struct spf *e = spf_new("192.0.2.1", "ex.test", NULL, NULL);
    struct spf_query q1, q2;

    (void)state;
    assert_int_equal(spf_step(e, &q1), SPF_STEP_QUERY);
    assert_int_equal(spf_step(e, &q2), SPF_STEP_QUERY);
    assert_string_equal(q1.name, "ex.test");
    assert_string_equal(q2.name, q1.name);
    assert_int_equal(q1.type, DNS_T_TXT);
    spf_free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_explain),
        cmocka_unit_test(test_new_invalid),
        cmocka_unit_test(test_step_repeats),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
