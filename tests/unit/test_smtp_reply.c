/*
 * Unit tests for lib/smtp_reply: multi-line replies (RFC 5321 section
 * 4.2), enhanced status codes (RFC 3463, RFC 2034), limits, and EHLO
 * keyword lookup. Every table case is also fed cut at every position, the
 * way replies arrive from a socket.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/smtp_reply.h"

#define L(s) s, sizeof(s) - 1

struct reply_case {
    const char *in;
    size_t len;
    ssize_t want;            /* bytes consumed, or SMTP_REPLY_ERROR */
    int code;
    const char *enhanced;
    const char *text;
    size_t nlines;
};

static const struct reply_case cases[] = {
    /* Single lines. */
    {L("250 OK\r\n"), 8, 250, "", "OK", 1},
    {L("220 mx.example.org ESMTP ready\r\n"), 32, 220, "", "mx.example.org ESMTP ready", 1},
    {L("250\r\n"), 5, 250, "", "", 1},                        /* no text at all */
    {L("250 \r\n"), 6, 250, "", "", 1},
    {L("250 OK\n"), 7, 250, "", "OK", 1},                     /* bare LF accepted */
    {L("250 OK\r\nNEXT"), 8, 250, "", "OK", 1},               /* stops at the reply */
    {L("250 OK\r\n250 again\r\n"), 8, 250, "", "OK", 1},
    {L("354 End data with <CR><LF>.<CR><LF>\r\n"), 37, 354, "",
     "End data with <CR><LF>.<CR><LF>", 1},
    {L("250 a\rb\r\n"), 9, 250, "", "a\rb", 1},               /* CR inside text kept */

    /* Enhanced status codes. */
    {L("250 2.1.0 Ok\r\n"), 14, 250, "2.1.0", "Ok", 1},
    {L("550 5.1.1 <x@y>: Recipient address rejected\r\n"), 45, 550, "5.1.1",
     "<x@y>: Recipient address rejected", 1},
    {L("451 4.2.0 try later\r\n"), 21, 451, "4.2.0", "try later", 1},
    {L("550 5.123.456 long parts\r\n"), 26, 550, "5.123.456", "long parts", 1},
    {L("250 2.0.0\r\n"), 11, 250, "2.0.0", "", 1},            /* code, no text */
    {L("250 2.0.0 \r\n"), 12, 250, "2.0.0", "", 1},
    {L("550 4.1.1 class mismatch\r\n"), 26, 550, "", "4.1.1 class mismatch", 1},
    {L("354 3.0.0 no class 3\r\n"), 22, 354, "", "3.0.0 no class 3", 1},
    {L("550 5.1234.1 too many digits\r\n"), 30, 550, "", "5.1234.1 too many digits", 1},
    {L("550 5.1.1234 too many digits\r\n"), 30, 550, "", "5.1.1234 too many digits", 1},
    {L("550 5.1 short\r\n"), 15, 550, "", "5.1 short", 1},
    {L("550 5..1 empty\r\n"), 16, 550, "", "5..1 empty", 1},
    {L("550 5.1.1x glued\r\n"), 18, 550, "", "5.1.1x glued", 1},
    {L("550 5.1.1.\r\n"), 12, 550, "", "5.1.1.", 1},

    /* Multi-line replies. */
    {L("250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"), 50, 250, "",
     "mx.example.org\nPIPELINING\n8BITMIME", 3},
    {L("250-first\r\n250\r\n"), 16, 250, "", "first\n", 2},   /* last line "250" */
    {L("250-\r\n250-\r\n250 \r\n"), 18, 250, "", "\n\n", 3},
    {L("550-5.1.1 The email account does not exist.\r\n"
       "550-5.1.1 Please try\r\n"
       "550 5.1.1 again. x - gsmtp\r\n"),
     95, 550, "5.1.1", "The email account does not exist.\nPlease try\nagain. x - gsmtp", 3},
    {L("550-5.1.1 first\r\n550 5.7.1 other\r\n"), 34, 550, "5.1.1", "first\n5.7.1 other", 2},
    {L("421-4.7.0 a\n421 4.7.0 b\n"), 24, 421, "4.7.0", "a\nb", 2},
    {L("250-a\r\n250 b\r\n250 c\r\n"), 14, 250, "", "a\nb", 2},

    /* Errors. */
    {L("hello\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("25\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("2500 x\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("250x\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("150 x\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("650 x\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("2a0 x\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("250\r\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("250\rx\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("250-a\r\n251 b\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},   /* codes differ */
    {L("250-a\r\n550 b\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L("250-a\r\nxyz\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},
    {L(" 250 x\r\n"), SMTP_REPLY_ERROR, 0, NULL, NULL, 0},

    /* Incomplete. */
    {L(""), SMTP_REPLY_NEED_MORE, 0, NULL, NULL, 0},
    {L("250 OK"), SMTP_REPLY_NEED_MORE, 0, NULL, NULL, 0},
    {L("250 OK\r"), SMTP_REPLY_NEED_MORE, 0, NULL, NULL, 0},
    {L("250-first\r\n"), SMTP_REPLY_NEED_MORE, 0, NULL, NULL, 0},
    {L("250-first\r\n250"), SMTP_REPLY_NEED_MORE, 0, NULL, NULL, 0},
};

/* Checks one case against the whole input, then against every prefix: a
 * prefix of a reply needs more, and once a prefix is an error every longer
 * one is too. */
static void run_case(size_t idx, const struct reply_case *rc)
{
    struct smtp_reply r;
    ssize_t got;
    size_t k;
    int seen_error = 0;
    char *copy = malloc(rc->len + 1);

    assert_non_null(copy);
    memcpy(copy, rc->in, rc->len);
    for (k = 0; k <= rc->len; k++) {
        /* A fresh heap copy of exactly k bytes lets ASan catch any read
         * past the prefix. */
        char *pre = malloc(k ? k : 1);

        assert_non_null(pre);
        memcpy(pre, copy, k);
        memset(&r, 0x5a, sizeof(r));
        got = smtp_reply_parse(pre, k, &r);
        free(pre);
        if (seen_error && got != SMTP_REPLY_ERROR)
            fail_msg("case %zu prefix %zu: error, then %zd", idx, k, got);
        if (got == SMTP_REPLY_ERROR) {
            seen_error = 1;
            if (rc->want != SMTP_REPLY_ERROR)
                fail_msg("case %zu prefix %zu: unexpected error", idx, k);
            continue;
        }
        if (rc->want <= 0 || (ssize_t)k < rc->want) {
            if (got != SMTP_REPLY_NEED_MORE)
                fail_msg("case %zu prefix %zu: got %zd, want need-more", idx, k, got);
            continue;
        }
        if (got != rc->want)
            fail_msg("case %zu prefix %zu: got %zd want %zd", idx, k, got, rc->want);
        if (r.code != rc->code)
            fail_msg("case %zu: code %d want %d", idx, r.code, rc->code);
        if (strcmp(r.enhanced, rc->enhanced) != 0)
            fail_msg("case %zu: enhanced \"%s\" want \"%s\"", idx, r.enhanced, rc->enhanced);
        if (strcmp(r.text, rc->text) != 0)
            fail_msg("case %zu: text \"%s\" want \"%s\"", idx, r.text, rc->text);
        if (r.nlines != rc->nlines)
            fail_msg("case %zu: nlines %zu want %zu", idx, r.nlines, rc->nlines);
    }
    got = smtp_reply_parse(copy, rc->len, &r);
    if (got != rc->want)
        fail_msg("case %zu: whole input got %zd want %zd", idx, got, rc->want);
    free(copy);
}

static void test_table(void **state)
{
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        run_case(i, &cases[i]);
}

/* Replies arrive in arbitrary pieces; a reader that appends each piece to
 * its buffer and parses until "need more" sees the same replies whatever
 * the cut. */
static void test_stream_two_cuts(void **state)
{
    static const char stream[] =
        "220 mx ESMTP\r\n"
        "250-mx\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 SMTPUTF8\r\n"
        "250 2.1.0 Ok\r\n"
        "550 5.1.1 no\r\n"
        "451-4.2.0 later\n451 4.2.0 really\r\n"
        "354 go\r\n"
        "250\r\n";
    static const int codes[] = {220, 250, 250, 550, 451, 354, 250};
    const size_t n = sizeof(stream) - 1, nreplies = sizeof(codes) / sizeof(codes[0]);
    size_t a, b;

    (void)state;
    for (a = 0; a <= n; a++) {
        for (b = a; b <= n; b++) {
            char buf[sizeof(stream)];
            size_t have = 0, fed = 0, got = 0, cuts[3] = {a, b, n}, ci;
            struct smtp_reply r;

            for (ci = 0; ci < 3; ci++) {
                memcpy(buf + have, stream + fed, cuts[ci] - fed);
                have += cuts[ci] - fed;
                fed = cuts[ci];
                for (;;) {
                    ssize_t x = smtp_reply_parse(buf, have, &r);

                    assert_true(x != SMTP_REPLY_ERROR);
                    if (x == SMTP_REPLY_NEED_MORE)
                        break;
                    assert_true(got < nreplies);
                    assert_int_equal(r.code, codes[got]);
                    got++;
                    memmove(buf, buf + x, have - (size_t)x);
                    have -= (size_t)x;
                }
            }
            assert_int_equal(got, nreplies);
            assert_int_equal(have, 0);
        }
    }
}

static void test_line_limit(void **state)
{
    size_t n = SMTP_REPLY_LINE_MAX + 8;
    char *s = malloc(n + 2);
    struct smtp_reply r;

    (void)state;
    assert_non_null(s);
    /* Exactly SMTP_REPLY_LINE_MAX octets before CRLF: accepted. */
    memset(s, 'x', n);
    memcpy(s, "250 ", 4);
    s[SMTP_REPLY_LINE_MAX] = '\r';
    s[SMTP_REPLY_LINE_MAX + 1] = '\n';
    assert_int_equal(smtp_reply_parse(s, SMTP_REPLY_LINE_MAX + 2, &r), SMTP_REPLY_LINE_MAX + 2);
    assert_int_equal(strlen(r.text), SMTP_REPLY_LINE_MAX - 4);
    /* With a bare LF as terminator as well. */
    s[SMTP_REPLY_LINE_MAX] = '\n';
    assert_int_equal(smtp_reply_parse(s, SMTP_REPLY_LINE_MAX + 1, &r), SMTP_REPLY_LINE_MAX + 1);
    /* Waiting for the LF after a CR at the limit. */
    s[SMTP_REPLY_LINE_MAX] = '\r';
    assert_int_equal(smtp_reply_parse(s, SMTP_REPLY_LINE_MAX + 1, &r), SMTP_REPLY_NEED_MORE);
    assert_int_equal(smtp_reply_parse(s, SMTP_REPLY_LINE_MAX, &r), SMTP_REPLY_NEED_MORE);
    /* One octet more: an error as soon as it cannot end in time. */
    memset(s + 4, 'x', n - 4);
    assert_int_equal(smtp_reply_parse(s, SMTP_REPLY_LINE_MAX + 1, &r), SMTP_REPLY_ERROR);
    s[SMTP_REPLY_LINE_MAX + 1] = '\r';
    s[SMTP_REPLY_LINE_MAX + 2] = '\n';
    assert_int_equal(smtp_reply_parse(s, SMTP_REPLY_LINE_MAX + 3, &r), SMTP_REPLY_ERROR);
    free(s);
}

static void test_lines_limit_and_truncation(void **state)
{
    struct smtp_reply r;
    char *s = malloc((SMTP_REPLY_LINES_MAX + 1) * 200 + 16);
    size_t off = 0, i;
    ssize_t got;

    (void)state;
    assert_non_null(s);
    for (i = 0; i < SMTP_REPLY_LINES_MAX; i++) {
        const char *sep = i + 1 == SMTP_REPLY_LINES_MAX ? " " : "-";

        off += (size_t)snprintf(s + off, 200, "250%s%0150zu\r\n", sep, i);
    }
    got = smtp_reply_parse(s, off, &r);
    assert_int_equal(got, (ssize_t)off);
    assert_int_equal(r.nlines, SMTP_REPLY_LINES_MAX);
    /* 64 lines of 150 octets do not fit: the text is cut, NUL-terminated. */
    assert_int_equal(strlen(r.text), SMTP_REPLY_TEXT_MAX - 1);

    /* A 65th line is one too many. */
    off = 0;
    for (i = 0; i <= SMTP_REPLY_LINES_MAX; i++)
        off += (size_t)snprintf(s + off, 200, "250%s\r\n", i == SMTP_REPLY_LINES_MAX ? " x" : "-x");
    assert_int_equal(smtp_reply_parse(s, off, &r), SMTP_REPLY_ERROR);
    free(s);
}

static void test_keywords(void **state)
{
    static const char ehlo[] =
        "250-mx.example.org Hello [127.0.0.1]\r\n"
        "250-PIPELINING\r\n"
        "250-SIZE 10240000\r\n"
        "250-auth PLAIN LOGIN\r\n"
        "250-8BITMIME\r\n"
        "250-STARTTLSX\r\n"
        "250 SMTPUTF8\r\n";
    struct smtp_reply r;
    char params[64];

    (void)state;
    assert_int_equal(smtp_reply_parse(ehlo, sizeof(ehlo) - 1, &r), (ssize_t)(sizeof(ehlo) - 1));
    assert_true(smtp_reply_has_keyword(&r, "PIPELINING", NULL, 0));
    assert_true(smtp_reply_has_keyword(&r, "pipelining", params, sizeof(params)));
    assert_string_equal(params, "");
    assert_true(smtp_reply_has_keyword(&r, "SIZE", params, sizeof(params)));
    assert_string_equal(params, "10240000");
    assert_true(smtp_reply_has_keyword(&r, "AUTH", params, sizeof(params)));
    assert_string_equal(params, "PLAIN LOGIN");
    assert_true(smtp_reply_has_keyword(&r, "AUTH", params, 6));
    assert_string_equal(params, "PLAIN");
    assert_true(smtp_reply_has_keyword(&r, "SMTPUTF8", NULL, 0));
    assert_true(smtp_reply_has_keyword(&r, "8BITMIME", NULL, 0));
    /* Prefixes and the greeting line do not count. */
    assert_false(smtp_reply_has_keyword(&r, "STARTTLS", NULL, 0));
    assert_false(smtp_reply_has_keyword(&r, "PIPE", NULL, 0));
    assert_false(smtp_reply_has_keyword(&r, "mx.example.org", NULL, 0));
    assert_false(smtp_reply_has_keyword(&r, "CHUNKING", NULL, 0));

    assert_int_equal(smtp_reply_parse(L("250 only\r\n"), &r), 10);
    assert_false(smtp_reply_has_keyword(&r, "only", NULL, 0));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_stream_two_cuts),
        cmocka_unit_test(test_line_limit),
        cmocka_unit_test(test_lines_limit_and_truncation),
        cmocka_unit_test(test_keywords),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
