/*
 * Unit tests for lib/smtp_addr: the MAIL/RCPT path grammar of RFC 5321
 * section 4.1.2, address literals (section 4.1.3), the limits of section
 * 4.5.3.1, SMTPUTF8 (RFC 6531) and the ESMTP parameters SIZE (RFC 1870),
 * BODY (RFC 6152) and AUTH (RFC 4954).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "lib/smtp_addr.h"

/* UTF-8 for the RFC 6531 examples: 用户@例子.广告 */
#define U_USER "\xe7\x94\xa8\xe6\x88\xb7"
#define U_DOM "\xe4\xbe\x8b\xe5\xad\x90.\xe5\xb9\xbf\xe5\x91\x8a"

/* Checks the invariants every successful parse must keep. */
static void check_path(const struct smtp_path *p)
{
    size_t n = strnlen(p->addr, sizeof(p->addr));

    assert_true(n < sizeof(p->addr));
    assert_true(p->local_len <= n);
    assert_true(p->domain >= p->addr && p->domain <= p->addr + n);
    if (n == 0) {
        assert_int_equal(p->local_len, 0);
    } else if (p->postmaster) {
        assert_int_equal(p->local_len, n);
        assert_ptr_equal(p->domain, p->addr + n);
    } else {
        assert_int_equal(p->addr[p->local_len], '@');
        assert_ptr_equal(p->domain, p->addr + p->local_len + 1);
        assert_true(strlen(p->domain) > 0);
    }
}

static int has_8bit(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return 1;
    return 0;
}

/* A failed parse leaves an empty path behind. */
static void check_reset(const struct smtp_path *p)
{
    assert_string_equal(p->addr, "");
    assert_int_equal(p->local_len, 0);
    assert_ptr_equal(p->domain, p->addr);
    assert_int_equal(p->utf8, 0);
    assert_int_equal(p->postmaster, 0);
}

/* Error texts go into an SMTP reply: short, printable. */
static void check_why(const char *why)
{
    size_t i;

    assert_non_null(why);
    assert_true(strlen(why) > 0 && strlen(why) < 60);
    for (i = 0; why[i]; i++)
        assert_true(why[i] >= 0x20 && why[i] < 0x7f);
}

/* ---- MAIL FROM ---- */

struct mail_case {
    const char *arg;
    int rc;
    const char *addr;   /* OK: expected addr; error: expected why (or NULL) */
    size_t local_len;
    long long size;
    enum smtp_body body;
    int smtputf8;
};

#define OK_(a, addr, ll) {a, SMTP_ADDR_OK, addr, ll, -1, SMTP_BODY_7BIT, 0}
#define ERR(a, rc, why) {a, rc, why, 0, -1, SMTP_BODY_7BIT, 0}

static const struct mail_case mail_cases[] = {
    /* Null reverse-path and the basic forms. */
    OK_("FROM:<>", "", 0),
    OK_("from:<>", "", 0),
    OK_("From: <>", "", 0),
    OK_("FROM:<a@b>", "a@b", 1),
    OK_("FROM: <a@b>", "a@b", 1),
    OK_("FROM:<user@mail.example.com>", "user@mail.example.com", 4),
    OK_("FROM:<a.b.c@x>", "a.b.c@x", 5),
    OK_("FROM:<!#$%&'*+-/=?^_`{|}~@x>", "!#$%&'*+-/=?^_`{|}~@x", 19),
    OK_("FROM:<a@b-c.d1>", "a@b-c.d1", 1),
    OK_("FROM:<a@1.2.3>", "a@1.2.3", 1),
    OK_("FROM:<a@xn--fiqs8s>", "a@xn--fiqs8s", 1),
    OK_("FROM:<A@B.EXAMPLE>", "A@B.EXAMPLE", 1),
    /* Quoted local parts keep their quotes. */
    OK_("FROM:<\"a b\"@x>", "\"a b\"@x", 5),
    OK_("FROM:<\"a\\\"b\"@x>", "\"a\\\"b\"@x", 6),
    OK_("FROM:<\"a\\\\b\"@x>", "\"a\\\\b\"@x", 6),
    OK_("FROM:<\"\"@x>", "\"\"@x", 2),
    OK_("FROM:<\"a>b\"@x>", "\"a>b\"@x", 5),
    OK_("FROM:<\"a@b\"@x>", "\"a@b\"@x", 5),
    OK_("FROM:<\"a.\"@x>", "\"a.\"@x", 4),
    OK_("FROM:<\"a\\ b\"@x>", "\"a\\ b\"@x", 6),
    /* Source routes are accepted and dropped (RFC 5321 appendix C). */
    OK_("FROM:<@a,@b:user@d>", "user@d", 4),
    OK_("FROM:<@a:user@d>", "user@d", 4),
    OK_("FROM:<@a.example,@b.example,@c:u@d>", "u@d", 1),
    OK_("FROM:<@[192.0.2.1]:user@d>", "user@d", 4),
    OK_("FROM:<@[IPv6:::1],@b:user@d>", "user@d", 4),
    /* Address literals (RFC 5321 section 4.1.3). */
    OK_("FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", 1),
    OK_("FROM:<a@[255.255.255.255]>", "a@[255.255.255.255]", 1),
    OK_("FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", 1),
    OK_("FROM:<a@[ipv6:::1]>", "a@[ipv6:::1]", 1),
    OK_("FROM:<a@[IPv6:::ffff:192.0.2.1]>", "a@[IPv6:::ffff:192.0.2.1]", 1),
    OK_("FROM:<a@[IPv6:1:2:3:4:5:6:7:8]>", "a@[IPv6:1:2:3:4:5:6:7:8]", 1),
    OK_("FROM:<a@[x-tag:foo]>", "a@[x-tag:foo]", 1),
    OK_("FROM:<a@[tag:a>b]>", "a@[tag:a>b]", 1),
    /* Parameters. */
    {"FROM:<a@b> SIZE=1000", SMTP_ADDR_OK, "a@b", 1, 1000, SMTP_BODY_7BIT, 0},
    {"FROM:<a@b> SIZE=0", SMTP_ADDR_OK, "a@b", 1, 0, SMTP_BODY_7BIT, 0},
    {"FROM:<a@b> size=007", SMTP_ADDR_OK, "a@b", 1, 7, SMTP_BODY_7BIT, 0},
    {"FROM:<a@b> SIZE=9223372036854775807", SMTP_ADDR_OK, "a@b", 1, 9223372036854775807LL,
     SMTP_BODY_7BIT, 0},
    {"FROM:<a@b> BODY=8BITMIME", SMTP_ADDR_OK, "a@b", 1, -1, SMTP_BODY_8BITMIME, 0},
    {"FROM:<a@b> body=8bitmime", SMTP_ADDR_OK, "a@b", 1, -1, SMTP_BODY_8BITMIME, 0},
    {"FROM:<a@b> BODY=7bit", SMTP_ADDR_OK, "a@b", 1, -1, SMTP_BODY_7BIT, 0},
    {"FROM:<a@b> SMTPUTF8", SMTP_ADDR_OK, "a@b", 1, -1, SMTP_BODY_7BIT, 1},
    {"FROM:<a@b> smtputf8", SMTP_ADDR_OK, "a@b", 1, -1, SMTP_BODY_7BIT, 1},
    OK_("FROM:<a@b> AUTH=<>", "a@b", 1),
    OK_("FROM:<a@b> AUTH=user+2Bx@example.com", "a@b", 1),
    OK_("FROM:<> AUTH=<>", "", 0),
    {"FROM:<a@b> SIZE=10 BODY=8BITMIME SMTPUTF8 AUTH=<>", SMTP_ADDR_OK, "a@b", 1, 10,
     SMTP_BODY_8BITMIME, 1},
    {"FROM:<a@b>  SIZE=10   BODY=8BITMIME  ", SMTP_ADDR_OK, "a@b", 1, 10, SMTP_BODY_8BITMIME, 0},
    OK_("FROM:<a@b> ", "a@b", 1),
    /* SMTPUTF8 (RFC 6531). */
    {"FROM:<" U_USER "@" U_DOM "> SMTPUTF8", SMTP_ADDR_OK, U_USER "@" U_DOM, 6, -1,
     SMTP_BODY_7BIT, 1},
    {"FROM:<a@" U_DOM "> SMTPUTF8", SMTP_ADDR_OK, "a@" U_DOM, 1, -1, SMTP_BODY_7BIT, 1},
    {"FROM:<\"" U_USER " x\"@x> SMTPUTF8", SMTP_ADDR_OK, "\"" U_USER " x\"@x", 10, -1,
     SMTP_BODY_7BIT, 1},
    {"FROM:<> SMTPUTF8", SMTP_ADDR_OK, "", 0, -1, SMTP_BODY_7BIT, 1},
    ERR("FROM:<" U_USER "@" U_DOM ">", SMTP_ADDR_NEED_UTF8, "SMTPUTF8 required for this address"),
    ERR("FROM:<a@" U_DOM ">", SMTP_ADDR_NEED_UTF8, "SMTPUTF8 required for this address"),
    ERR("FROM:<" U_USER "@x> BODY=8BITMIME", SMTP_ADDR_NEED_UTF8, NULL),
    ERR("FROM:<\"" U_USER "\"@x>", SMTP_ADDR_NEED_UTF8, NULL),
    ERR("FROM:<@" U_DOM ":a@b>", SMTP_ADDR_NEED_UTF8, NULL),
    ERR("FROM:<a\xff@x> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address"),
    ERR("FROM:<a\xff@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address"),
    ERR("FROM:<a\xc0\xaf@x> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address"),
    ERR("FROM:<a\xed\xa0\x80@x> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address"),
    ERR("FROM:<a\xf4\x90\x80\x80@x> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address"),
    ERR("FROM:<a@b\xe4\xbe> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address"),
    ERR("FROM:<\"a\x80\"@x> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address"),
    ERR("FROM:<a@[192.0.2.1\xc3\xa9]> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX,
        "Invalid address literal"),
    /* Not "FROM:<path>". */
    ERR("", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:a@b", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM: a@b", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:  <a@b>", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM :<a@b>", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM<a@b>", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("TO:<a@b>", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:<a@b", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:<", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:<a@b>x", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:<a@b>>", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:<>x", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:<a@b>\tSIZE=1", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    ERR("FROM:\t<a@b>", SMTP_ADDR_SYNTAX, "Syntax: MAIL FROM:<address>"),
    /* Local part errors. */
    ERR("FROM:<a..b@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<.a@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<a.@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<.@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<a b@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<a(b)@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<a,b@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<a\"b\"@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<\"a\"b@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<\"a\"\"b\"@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<\"a@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<\"a\tb\"@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<\"a\\\tb\"@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<\"a\x01\"@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<\"a\\\xc3\xa9\"@x> SMTPUTF8", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<a\\b@x>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<a@b@c>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a>", SMTP_ADDR_BAD_MAILBOX, "Missing domain"),
    ERR("FROM:<Postmaster>", SMTP_ADDR_BAD_MAILBOX, "Missing domain"),
    ERR("FROM:<@>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    /* Domain errors. */
    ERR("FROM:<a@>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@b..c>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@-b>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@b->", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@b-.c>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@b.>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@.b>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@b_c>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@b c>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@b SIZE=1>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@[1.2.3]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[256.1.1.1]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[1.2.3.4.5]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[IPv6:]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[IPv6:1::2::3]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[IPv6:192.0.2.1]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[IPv6:12345::1]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[2001:db8::1]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[:foo]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[tag-:foo]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[t_g:foo]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[tag:]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[tag:a\\b]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[tag:a b]>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[192.0.2.1>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    ERR("FROM:<a@[192.0.2.1]x>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<a@x[192.0.2.1]>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    /* Source route errors. */
    ERR("FROM:<@a>", SMTP_ADDR_BAD_MAILBOX, "Invalid source route"),
    ERR("FROM:<@a,b:u@d>", SMTP_ADDR_BAD_MAILBOX, "Invalid source route"),
    ERR("FROM:<@a;u@d>", SMTP_ADDR_BAD_MAILBOX, "Invalid source route"),
    ERR("FROM:<@:u@d>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<@a..b:u@d>", SMTP_ADDR_BAD_MAILBOX, "Invalid domain"),
    ERR("FROM:<@a,@b:>", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<@[1.2.3]:u@d>", SMTP_ADDR_BAD_MAILBOX, "Invalid address literal"),
    /* Parameter errors. */
    ERR("FROM:<a@b> SIZE", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> SIZE=abc", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=-1", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=+1", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=1k", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=9223372036854775808", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=99999999999999999999", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=000000000000000000001", SMTP_ADDR_BAD_PARAM, "Invalid SIZE value"),
    ERR("FROM:<a@b> SIZE=1 SIZE=2", SMTP_ADDR_BAD_PARAM, "Duplicate parameter"),
    ERR("FROM:<a@b> BODY=BINARYMIME", SMTP_ADDR_BAD_PARAM, "Invalid BODY value"),
    ERR("FROM:<a@b> BODY=8BIT", SMTP_ADDR_BAD_PARAM, "Invalid BODY value"),
    ERR("FROM:<a@b> BODY", SMTP_ADDR_BAD_PARAM, "Invalid BODY value"),
    ERR("FROM:<a@b> BODY=7BIT BODY=8BITMIME", SMTP_ADDR_BAD_PARAM, "Duplicate parameter"),
    ERR("FROM:<a@b> SMTPUTF8=yes", SMTP_ADDR_BAD_PARAM, "SMTPUTF8 takes no value"),
    ERR("FROM:<a@b> SMTPUTF8 smtputf8", SMTP_ADDR_BAD_PARAM, "Duplicate parameter"),
    ERR("FROM:<a@b> AUTH", SMTP_ADDR_BAD_PARAM, "Invalid AUTH value"),
    ERR("FROM:<a@b> AUTH=", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> AUTH=a+2", SMTP_ADDR_BAD_PARAM, "Invalid AUTH value"),
    ERR("FROM:<a@b> AUTH=a+", SMTP_ADDR_BAD_PARAM, "Invalid AUTH value"),
    ERR("FROM:<a@b> AUTH=a+zz", SMTP_ADDR_BAD_PARAM, "Invalid AUTH value"),
    ERR("FROM:<a@b> AUTH=a+2b", SMTP_ADDR_BAD_PARAM, "Invalid AUTH value"),
    ERR("FROM:<a@b> AUTH=<> AUTH=<>", SMTP_ADDR_BAD_PARAM, "Duplicate parameter"),
    ERR("FROM:<a@b> FOO=bar", SMTP_ADDR_BAD_PARAM, "Unknown parameter"),
    ERR("FROM:<a@b> RET=FULL", SMTP_ADDR_BAD_PARAM, "Unknown parameter"),
    ERR("FROM:<a@b> ENVID=x", SMTP_ADDR_BAD_PARAM, "Unknown parameter"),
    ERR("FROM:<a@b> SIZES=1", SMTP_ADDR_BAD_PARAM, "Unknown parameter"),
    ERR("FROM:<a@b> SIZE=1 X-FOO", SMTP_ADDR_BAD_PARAM, "Unknown parameter"),
    ERR("FROM:<a@b> =x", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> -X", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> SI_ZE=1", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> SIZE==1", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> SIZE=1\x01", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> AUTH=\xc3\xa9", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    ERR("FROM:<a@b> SIZE=1\t", SMTP_ADDR_BAD_PARAM, "Syntax error in parameters"),
    /* The first error in the line wins. */
    ERR("FROM:<a..b@x> FOO", SMTP_ADDR_BAD_MAILBOX, "Invalid local part"),
    ERR("FROM:<" U_USER "@x> FOO", SMTP_ADDR_BAD_PARAM, "Unknown parameter"),
};

static void test_mail_table(void **state)
{
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(mail_cases) / sizeof(mail_cases[0]); i++) {
        const struct mail_case *mc = &mail_cases[i];
        struct smtp_mail_args args;
        const char *why = NULL;
        int rc;

        memset(&args, 0x5a, sizeof(args));
        rc = smtp_addr_parse_mail(mc->arg, strlen(mc->arg), &args, &why);
        if (rc != mc->rc)
            fail_msg("mail case %zu (%s): rc %d want %d (why %s)", i, mc->arg, rc, mc->rc,
                     why ? why : "-");
        if (rc != SMTP_ADDR_OK) {
            check_why(why);
            if (mc->addr != NULL && strcmp(why, mc->addr) != 0)
                fail_msg("mail case %zu (%s): why '%s' want '%s'", i, mc->arg, why, mc->addr);
            check_reset(&args.path);
            assert_int_equal(args.size, -1);
            continue;
        }
        check_path(&args.path);
        if (strcmp(args.path.addr, mc->addr) != 0)
            fail_msg("mail case %zu (%s): addr '%s' want '%s'", i, mc->arg, args.path.addr,
                     mc->addr);
        assert_int_equal(args.path.local_len, mc->local_len);
        assert_int_equal(args.path.postmaster, 0);
        assert_int_equal(args.path.utf8, has_8bit(mc->addr));
        if (args.size != mc->size)
            fail_msg("mail case %zu (%s): size %lld want %lld", i, mc->arg, args.size, mc->size);
        assert_int_equal(args.body, mc->body);
        assert_int_equal(args.smtputf8, mc->smtputf8);
    }
}

/* NUL octets never belong to a path or a parameter. */
static void test_mail_nul(void **state)
{
#define S(s) {s, sizeof(s) - 1}
    static const struct {
        const char *s;
        size_t n;
    } cases[] = {
        S("FROM:<a\0b@x>"), S("FROM:<a@x\0>"), S("FROM:<\"a\0\"@x>"), S("FROM:<a@x> SIZE=1\0"),
        S("FROM:\0<a@x>"), S("FROM:<a@[1.2.3.4\0]>"), S("FROM:<@a\0:b@c>"),
    };
#undef S
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct smtp_mail_args args;
        const char *why = NULL;

        assert_int_not_equal(smtp_addr_parse_mail(cases[i].s, cases[i].n, &args, &why),
                             SMTP_ADDR_OK);
        check_why(why);
        check_reset(&args.path);
    }
}

/* ---- RCPT TO ---- */

struct rcpt_case {
    const char *arg;
    int utf8_ok;
    int rc;
    const char *addr;   /* OK: expected addr; error: expected why (or NULL) */
    int postmaster;
};

static const struct rcpt_case rcpt_cases[] = {
    {"TO:<a@b>", 0, SMTP_ADDR_OK, "a@b", 0},
    {"to:<a@b>", 0, SMTP_ADDR_OK, "a@b", 0},
    {"To: <a@b>", 0, SMTP_ADDR_OK, "a@b", 0},
    {"TO:<a@b> ", 0, SMTP_ADDR_OK, "a@b", 0},
    {"TO:<\"a b\"@x>", 0, SMTP_ADDR_OK, "\"a b\"@x", 0},
    {"TO:<@a,@b:user@d>", 0, SMTP_ADDR_OK, "user@d", 0},
    {"TO:<a@[IPv6:::1]>", 0, SMTP_ADDR_OK, "a@[IPv6:::1]", 0},
    {"TO:<a@[192.0.2.1]>", 0, SMTP_ADDR_OK, "a@[192.0.2.1]", 0},
    /* RFC 5321 section 4.1.1.3: bare Postmaster. */
    {"TO:<Postmaster>", 0, SMTP_ADDR_OK, "Postmaster", 1},
    {"TO:<postmaster>", 0, SMTP_ADDR_OK, "Postmaster", 1},
    {"TO:<POSTMASTER>", 0, SMTP_ADDR_OK, "Postmaster", 1},
    {"TO: <PostMaster> ", 0, SMTP_ADDR_OK, "Postmaster", 1},
    {"TO:<postmaster@x>", 0, SMTP_ADDR_OK, "postmaster@x", 0},
    {"TO:<\"Postmaster\">", 0, SMTP_ADDR_BAD_MAILBOX, "Missing domain", 0},
    {"TO:<@a:Postmaster>", 0, SMTP_ADDR_BAD_MAILBOX, "Missing domain", 0},
    {"TO:<Postmasters>", 0, SMTP_ADDR_BAD_MAILBOX, "Missing domain", 0},
    {"TO:<Postmaste>", 0, SMTP_ADDR_BAD_MAILBOX, "Missing domain", 0},
    {"TO:<user>", 0, SMTP_ADDR_BAD_MAILBOX, "Missing domain", 0},
    {"TO:<Postmaster>x", 0, SMTP_ADDR_SYNTAX, "Syntax: RCPT TO:<address>", 0},
    /* No null forward-path, no parameters. */
    {"TO:<>", 0, SMTP_ADDR_BAD_MAILBOX, "Null recipient not allowed", 0},
    {"TO:<a@b> SIZE=1", 0, SMTP_ADDR_BAD_PARAM, "Unknown parameter", 0},
    {"TO:<a@b> NOTIFY=NEVER", 0, SMTP_ADDR_BAD_PARAM, "Unknown parameter", 0},
    {"TO:<a@b> SMTPUTF8", 1, SMTP_ADDR_BAD_PARAM, "Unknown parameter", 0},
    {"TO:<a@b> =", 0, SMTP_ADDR_BAD_PARAM, "Syntax error in parameters", 0},
    /* SMTPUTF8 comes from MAIL. */
    {"TO:<" U_USER "@" U_DOM ">", 0, SMTP_ADDR_NEED_UTF8, "SMTPUTF8 required for this address", 0},
    {"TO:<" U_USER "@" U_DOM ">", 1, SMTP_ADDR_OK, U_USER "@" U_DOM, 0},
    {"TO:<a@" U_DOM ">", 0, SMTP_ADDR_NEED_UTF8, NULL, 0},
    {"TO:<a@" U_DOM ">", 1, SMTP_ADDR_OK, "a@" U_DOM, 0},
    {"TO:<@" U_DOM ":a@b>", 0, SMTP_ADDR_NEED_UTF8, NULL, 0},
    {"TO:<@" U_DOM ":a@b>", 1, SMTP_ADDR_OK, "a@b", 0},
    {"TO:<a\xfe@b>", 1, SMTP_ADDR_BAD_MAILBOX, "Invalid UTF-8 in address", 0},
    /* Syntax. */
    {"TO:a@b", 0, SMTP_ADDR_SYNTAX, "Syntax: RCPT TO:<address>", 0},
    {"FROM:<a@b>", 0, SMTP_ADDR_SYNTAX, "Syntax: RCPT TO:<address>", 0},
    {"TO:  <a@b>", 0, SMTP_ADDR_SYNTAX, "Syntax: RCPT TO:<address>", 0},
    {"TO:<a@b>x", 0, SMTP_ADDR_SYNTAX, "Syntax: RCPT TO:<address>", 0},
    {"TO:<a@b", 0, SMTP_ADDR_SYNTAX, "Syntax: RCPT TO:<address>", 0},
    {"T", 0, SMTP_ADDR_SYNTAX, "Syntax: RCPT TO:<address>", 0},
    {"TO:<a..b@x>", 0, SMTP_ADDR_BAD_MAILBOX, "Invalid local part", 0},
    {"TO:<a@b..c>", 0, SMTP_ADDR_BAD_MAILBOX, "Invalid domain", 0},
};

static void test_rcpt_table(void **state)
{
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(rcpt_cases) / sizeof(rcpt_cases[0]); i++) {
        const struct rcpt_case *rc_ = &rcpt_cases[i];
        struct smtp_path path;
        const char *why = NULL;
        int rc;

        memset(&path, 0x5a, sizeof(path));
        rc = smtp_addr_parse_rcpt(rc_->arg, strlen(rc_->arg), rc_->utf8_ok, &path, &why);
        if (rc != rc_->rc)
            fail_msg("rcpt case %zu (%s): rc %d want %d (why %s)", i, rc_->arg, rc, rc_->rc,
                     why ? why : "-");
        if (rc != SMTP_ADDR_OK) {
            check_why(why);
            if (rc_->addr != NULL && strcmp(why, rc_->addr) != 0)
                fail_msg("rcpt case %zu (%s): why '%s' want '%s'", i, rc_->arg, why, rc_->addr);
            check_reset(&path);
            continue;
        }
        check_path(&path);
        assert_string_equal(path.addr, rc_->addr);
        assert_int_equal(path.postmaster, rc_->postmaster);
        assert_int_equal(path.utf8, has_8bit(rc_->addr));
    }
}

/* ---- Length limits (RFC 5321 section 4.5.3.1) ---- */

/* Writes n copies of c to p and returns p + n. */
static char *fill(char *p, int c, size_t n)
{
    memset(p, c, n);
    return p + n;
}

/* A domain of exactly n octets made of labels of at most 63. */
static char *fill_domain(char *p, size_t n)
{
    while (n > 0) {
        size_t l = n > 63 ? 63 : n;

        if (n - l == 1) /* never leave a single trailing dot */
            l--;
        p = fill(p, 'd', l);
        n -= l;
        if (n > 0) {
            *p++ = '.';
            n--;
        }
    }
    return p;
}

/* Builds "<prefix><local of llen>@<domain of dlen>><suffix>". */
static size_t build(char *out, const char *prefix, size_t llen, size_t dlen, const char *suffix)
{
    char *p = out;

    memcpy(p, prefix, strlen(prefix));
    p += strlen(prefix);
    p = fill(p, 'l', llen);
    *p++ = '@';
    p = fill_domain(p, dlen);
    *p++ = '>';
    memcpy(p, suffix, strlen(suffix));
    p += strlen(suffix);
    *p = '\0';
    return (size_t)(p - out);
}

struct limit_case {
    const char *prefix;
    size_t llen, dlen;
    int rc;
    const char *why;
};

static const struct limit_case limit_cases[] = {
    {"FROM:<", 64, 10, SMTP_ADDR_OK, NULL},
    {"FROM:<", 65, 10, SMTP_ADDR_TOO_LONG, "Local part too long"},
    {"FROM:<", 200, 10, SMTP_ADDR_TOO_LONG, "Local part too long"},
    /* Path "<" + 64 + "@" + 189 + ">" is exactly 256 octets. */
    {"FROM:<", 64, 189, SMTP_ADDR_OK, NULL},
    {"FROM:<", 64, 190, SMTP_ADDR_TOO_LONG, "Path too long"},
    {"FROM:<", 1, 252, SMTP_ADDR_OK, NULL},
    {"FROM:<", 1, 253, SMTP_ADDR_TOO_LONG, "Path too long"},
    {"FROM:<", 1, 255, SMTP_ADDR_TOO_LONG, "Path too long"},
    {"FROM:<", 1, 256, SMTP_ADDR_TOO_LONG, "Domain too long"},
    {"FROM:<", 1, 1000, SMTP_ADDR_TOO_LONG, "Domain too long"},
    /* The source route counts towards the path length. */
    {"FROM:<@r:", 64, 186, SMTP_ADDR_OK, NULL},
    {"FROM:<@r:", 64, 187, SMTP_ADDR_TOO_LONG, "Path too long"},
    {"TO:<", 64, 189, SMTP_ADDR_OK, NULL},
    {"TO:<", 64, 190, SMTP_ADDR_TOO_LONG, "Path too long"},
    {"TO:<", 65, 1, SMTP_ADDR_TOO_LONG, "Local part too long"},
};

static void test_limits(void **state)
{
    char line[2048];
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(limit_cases) / sizeof(limit_cases[0]); i++) {
        const struct limit_case *lc = &limit_cases[i];
        size_t n = build(line, lc->prefix, lc->llen, lc->dlen, " SIZE=1");
        const char *why = NULL;
        struct smtp_mail_args args;
        struct smtp_path path;
        const struct smtp_path *p;
        int rc;

        if (lc->prefix[0] == 'T') {
            n -= strlen(" SIZE=1");
            rc = smtp_addr_parse_rcpt(line, n, 0, &path, &why);
            p = &path;
        } else {
            rc = smtp_addr_parse_mail(line, n, &args, &why);
            p = &args.path;
        }
        if (rc != lc->rc)
            fail_msg("limit case %zu: rc %d want %d (why %s)", i, rc, lc->rc, why ? why : "-");
        if (rc != SMTP_ADDR_OK) {
            assert_string_equal(why, lc->why);
            continue;
        }
        check_path(p);
        assert_int_equal(p->local_len, lc->llen);
        assert_int_equal(strlen(p->domain), lc->dlen);
        assert_int_equal(strlen(p->addr), lc->llen + 1 + lc->dlen);
    }
}

/* A quoted local part counts its quotes. */
static void test_limits_quoted(void **state)
{
    char line[256];
    char *p = line;
    struct smtp_mail_args args;
    const char *why;

    (void)state;
    memcpy(p, "FROM:<\"", 7);
    p = fill(p + 7, 'q', 62);
    memcpy(p, "\"@x>", 5);
    assert_int_equal(smtp_addr_parse_mail(line, strlen(line), &args, &why), SMTP_ADDR_OK);
    assert_int_equal(args.path.local_len, 64);

    p = line + 7;
    p = fill(p, 'q', 63);
    memcpy(p, "\"@x>", 5);
    assert_int_equal(smtp_addr_parse_mail(line, strlen(line), &args, &why), SMTP_ADDR_TOO_LONG);
    assert_string_equal(why, "Local part too long");
}

/* ---- smtp_addr_domain_valid ---- */

struct domain_case {
    const char *domain;
    int utf8_ok;
    int want;
};

static const struct domain_case domain_cases[] = {
    {"example.com", 0, 1},
    {"a", 0, 1},
    {"a-b.c", 0, 1},
    {"a--b.c", 0, 1},
    {"1.2.3.4", 0, 1},
    {"xn--fiqs8s", 0, 1},
    {"EXAMPLE.COM", 0, 1},
    {"[192.0.2.1]", 0, 1},
    {"[IPv6:::1]", 0, 1},
    {"[IPv6:2001:db8::8:800:200c:417a]", 0, 1},
    {"[tag:x]", 0, 1},
    {"", 0, 0},
    {".", 0, 0},
    {"a.", 0, 0},
    {".a", 0, 0},
    {"a..b", 0, 0},
    {"-a", 0, 0},
    {"a-", 0, 0},
    {"a.-b", 0, 0},
    {"a_b", 0, 0},
    {"a b", 0, 0},
    {"a@b", 0, 0},
    {"[1.2.3]", 0, 0},
    {"[]", 0, 0},
    {"[", 0, 0},
    {"[IPv6:]", 0, 0},
    {"[IPv6:::1", 0, 0},
    {"[192.0.2.1", 0, 0},
    {"192.0.2.1]", 0, 0},
    {"[192.0.2.01]", 0, 0},
    {U_DOM, 0, 0},
    {U_DOM, 1, 1},
    {"a." U_DOM, 1, 1},
    {"\xe4\xbe\x8b-", 1, 0},
    {"-\xe4\xbe\x8b", 1, 0},
    {"\xff", 1, 0},
    {"\xe4\xbe", 1, 0},
    {"\xc3\xa9", 0, 0},
    {"\xc3\xa9", 1, 1},
};

static void test_domain_table(void **state)
{
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(domain_cases) / sizeof(domain_cases[0]); i++) {
        const struct domain_case *dc = &domain_cases[i];

        if (smtp_addr_domain_valid(dc->domain, dc->utf8_ok) != dc->want)
            fail_msg("domain case %zu (%s, utf8 %d): want %d", i, dc->domain, dc->utf8_ok,
                     dc->want);
    }
}

/* Labels up to 63 octets, names up to 255 (RFC 1035 section 2.3.4, RFC
 * 5321 section 4.5.3.1.2). */
static void test_domain_limits(void **state)
{
    char d[600];

    (void)state;
    *fill(d, 'a', 63) = '\0';
    assert_int_equal(smtp_addr_domain_valid(d, 0), 1);
    *fill(d, 'a', 64) = '\0';
    assert_int_equal(smtp_addr_domain_valid(d, 0), 0);
    memcpy(fill(d, 'a', 64), ".com", 5);
    assert_int_equal(smtp_addr_domain_valid(d, 0), 0);
    *fill_domain(d, 255) = '\0';
    assert_int_equal(strlen(d), 255);
    assert_int_equal(smtp_addr_domain_valid(d, 0), 1);
    *fill_domain(d, 256) = '\0';
    assert_int_equal(smtp_addr_domain_valid(d, 0), 0);
    /* 21 three-octet characters make a 63-octet label, 22 are too many. */
    {
        char *p = d;
        int k;

        for (k = 0; k < 21; k++) {
            memcpy(p, "\xe4\xbe\x8b", 3);
            p += 3;
        }
        *p = '\0';
        assert_int_equal(smtp_addr_domain_valid(d, 1), 1);
        memcpy(p, "\xe4\xbe\x8b", 4);
        assert_int_equal(smtp_addr_domain_valid(d, 1), 0);
    }
    /* The same label limit applies inside a path. */
    {
        char line[128];
        struct smtp_mail_args args;
        const char *why;

        memcpy(line, "FROM:<a@", 8);
        memcpy(fill(line + 8, 'd', 64), ">", 2);
        assert_int_equal(smtp_addr_parse_mail(line, strlen(line), &args, &why),
                         SMTP_ADDR_BAD_MAILBOX);
        assert_string_equal(why, "Invalid domain");
        memcpy(fill(line + 8, 'd', 63), ">", 2);
        assert_int_equal(smtp_addr_parse_mail(line, strlen(line), &args, &why), SMTP_ADDR_OK);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mail_table),
        cmocka_unit_test(test_mail_nul),
        cmocka_unit_test(test_rcpt_table),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_limits_quoted),
        cmocka_unit_test(test_domain_table),
        cmocka_unit_test(test_domain_limits),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
