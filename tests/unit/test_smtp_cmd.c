/*
 * Unit tests for lib/smtp_cmd: CRLF framing (RFC 5321 section 2.3.8, with
 * the SMTP smuggling hardening), the 512-octet line limit (section
 * 4.5.3.1.4), discarding of overlong lines and verb parsing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "lib/smtp_cmd.h"

/* Builds a line of n octets: "NOOP " padded with 'x', then CRLF when crlf
 * is set (the CRLF is counted in n). */
static char *make_line(size_t n, int crlf)
{
    char *s = test_malloc(n + 1);
    size_t body = crlf ? n - 2 : n;

    memset(s, 'x', n);
    memcpy(s, "NOOP ", 5);
    if (crlf) {
        s[body] = '\r';
        s[body + 1] = '\n';
    }
    s[n] = '\0';
    return s;
}

/* ---- smtp_cmd_frame ---- */

struct frame_case {
    const char *in;
    size_t len;
    size_t max;
    ssize_t want;
    size_t linelen;  /* checked when want > 0 */
};

#define L(s) s, sizeof(s) - 1

static const struct frame_case frame_cases[] = {
    {L("QUIT\r\n"), 512, 6, 4},
    {L("\r\n"), 512, 2, 0},
    {L("QUIT\r\nNOOP\r\n"), 512, 6, 4},            /* first line only */
    {L("QUIT"), 512, SMTP_FRAME_NEED_MORE, 0},
    {L("QUIT\r"), 512, SMTP_FRAME_NEED_MORE, 0},     /* CRLF split */
    {L(""), 512, SMTP_FRAME_NEED_MORE, 0},
    {L("QUIT\n"), 512, SMTP_FRAME_NEED_MORE, 0},     /* bare LF is no end */
    {L("QU\nIT\r\n"), 512, 7, 5},                    /* bare LF inside */
    {L("QU\rIT\r\n"), 512, 7, 5},                    /* bare CR inside */
    {L("A\r\r\n"), 512, 4, 2},                       /* CR CR LF */
    {L("A\n\r\n"), 512, 4, 2},                       /* LF CR LF */
    {L("QU\0IT\r\n"), 512, 7, 5},                    /* NUL is a line byte */
    {L("ABCD"), 4, SMTP_FRAME_TOO_LONG, 0},
    {L("ABC\r\n"), 4, SMTP_FRAME_TOO_LONG, 0},       /* LF past max */
    {L("AB\r\n"), 4, 4, 2},                          /* exactly max */
    {L("ABC"), 4, SMTP_FRAME_NEED_MORE, 0},
    {L("\n\r"), 2, SMTP_FRAME_TOO_LONG, 0},
    {L("x"), 0, SMTP_FRAME_TOO_LONG, 0},
};

static void test_frame_table(void **state)
{
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(frame_cases) / sizeof(frame_cases[0]); i++) {
        const struct frame_case *fc = &frame_cases[i];
        size_t linelen = 9999;
        ssize_t r = smtp_cmd_frame(fc->in, fc->len, fc->max, &linelen);

        if (r != fc->want)
            fail_msg("frame case %zu: got %zd want %zd", i, r, fc->want);
        if (fc->want > 0)
            assert_int_equal(linelen, fc->linelen);
    }
}

/* RFC 5321 section 4.5.3.1.4: 512 octets including CRLF are allowed. */
static void test_frame_limit(void **state)
{
    char *s512 = make_line(512, 1), *s513 = make_line(513, 1), *s512n = make_line(512, 0);
    size_t linelen = 0;

    (void)state;
    assert_int_equal(smtp_cmd_frame(s512, 512, SMTP_CMD_LINE_MAX, &linelen), 512);
    assert_int_equal(linelen, 510);
    assert_int_equal(smtp_cmd_frame(s513, 513, SMTP_CMD_LINE_MAX, &linelen), SMTP_FRAME_TOO_LONG);
    /* 512 octets ending in CR: the LF would be the 513th. */
    assert_int_equal(smtp_cmd_frame(s513, 512, SMTP_CMD_LINE_MAX, &linelen), SMTP_FRAME_TOO_LONG);
    assert_int_equal(smtp_cmd_frame(s512n, 511, SMTP_CMD_LINE_MAX, &linelen),
                     SMTP_FRAME_NEED_MORE);
    assert_int_equal(smtp_cmd_frame(s512n, 512, SMTP_CMD_LINE_MAX, &linelen), SMTP_FRAME_TOO_LONG);
    test_free(s512);
    test_free(s513);
    test_free(s512n);
}

/*
 * Feeds the stream in chunks as a server would, framing after each feed,
 * and returns the lines joined by "|"; overlong lines appear as "<LONG>".
 */
static void run_stream(const char *in, size_t len, const size_t *cuts, size_t ncuts, char *out,
                       size_t outsz)
{
    char buf[2048];
    size_t have = 0, fed = 0, k = 0, o = 0;
    int discarding = 0, pending_cr = 0;

    out[0] = '\0';
    while (fed < len || have > 0) {
        size_t next = k < ncuts ? cuts[k++] : len;
        int progressed = 0;

        if (next > len)
            next = len;
        if (next > fed) {
            memcpy(buf + have, in + fed, next - fed);
            have += next - fed;
            fed = next;
        }
        for (;;) {
            if (discarding) {
                int done;
                size_t n = smtp_cmd_discard(buf, have, &pending_cr, &done);

                memmove(buf, buf + n, have - n);
                have -= n;
                if (!done)
                    break;
                discarding = 0;
                o += (size_t)snprintf(out + o, outsz - o, "%s<LONG>", o ? "|" : "");
                progressed = 1;
            } else {
                size_t linelen;
                ssize_t r = smtp_cmd_frame(buf, have, SMTP_CMD_LINE_MAX, &linelen);

                if (r == SMTP_FRAME_NEED_MORE)
                    break;
                if (r == SMTP_FRAME_TOO_LONG) {
                    discarding = 1;
                    pending_cr = 0;
                    continue;
                }
                o += (size_t)snprintf(out + o, outsz - o, "%s%.*s", o ? "|" : "", (int)linelen,
                                      buf);
                memmove(buf, buf + r, have - (size_t)r);
                have -= (size_t)r;
                progressed = 1;
            }
        }
        if (fed == len && !progressed)
            break;
    }
}

static void test_frame_split_feeds(void **state)
{
    static const char in[] = "EHLO a\r\nMAIL FROM:<x@y>\r\nQUIT\r\n";
    char out[256];
    size_t cut;

    (void)state;
    /* Every single split point, including between CR and LF. */
    for (cut = 0; cut <= sizeof(in) - 1; cut++) {
        run_stream(in, sizeof(in) - 1, &cut, 1, out, sizeof(out));
        assert_string_equal(out, "EHLO a|MAIL FROM:<x@y>|QUIT");
    }
    /* Byte by byte. */
    {
        size_t cuts[sizeof(in)];

        for (cut = 0; cut < sizeof(in); cut++)
            cuts[cut] = cut;
        run_stream(in, sizeof(in) - 1, cuts, sizeof(in), out, sizeof(out));
        assert_string_equal(out, "EHLO a|MAIL FROM:<x@y>|QUIT");
    }
}

/* An overlong line is dropped up to its CRLF, wherever the reads split it,
 * and the next line is framed normally. */
static void test_discard_stream(void **state)
{
    char in[1400];
    char out[256];
    size_t n = 0, cut;

    (void)state;
    memset(in, 'A', 1000);
    n = 1000;
    memcpy(in + n, "\n\r\r\n", 4); /* bare LF, then CR CR LF ends it */
    n += 4;
    memcpy(in + n, "QUIT\r\n", 6);
    n += 6;
    for (cut = 500; cut <= n; cut++) {
        size_t cuts[2] = {cut, cut + 1};

        run_stream(in, n, cuts, 2, out, sizeof(out));
        assert_string_equal(out, "<LONG>|QUIT");
    }
}

struct discard_step {
    const char *in;
    size_t len;
    size_t want;
    int done;
    int pending_after;
};

/* Several calls with a CR at the end of a buffer. */
static void test_discard_steps(void **state)
{
    static const struct discard_step seq1[] = {
        {L("xxxx\r"), 5, 0, 1},
        {L("\n"), 1, 1, 0},
    };
    static const struct discard_step seq2[] = {
        {L("xx\r"), 3, 0, 1},
        {L("x\n"), 2, 0, 0},      /* CR x LF: no CRLF */
        {L("\r"), 1, 0, 1},
        {L(""), 0, 0, 1},         /* empty read keeps the CR */
        {L("\r"), 1, 0, 1},
        {L("\nQUIT\r\n"), 1, 1, 0},
    };
    static const struct discard_step seq3[] = {
        {L("a\nb\rc\r\nQUIT\r\n"), 7, 1, 0},
    };
    static const struct discard_step seq4[] = {
        {L("\n\n\n"), 3, 0, 0},
        {L("\r\r\r"), 3, 0, 1},
        {L("\r\n"), 2, 1, 0},
    };
    static const struct {
        const struct discard_step *s;
        size_t n;
    } seqs[] = {{seq1, 2}, {seq2, 6}, {seq3, 1}, {seq4, 3}};
    size_t i, j;

    (void)state;
    for (i = 0; i < sizeof(seqs) / sizeof(seqs[0]); i++) {
        int pending = 0;

        for (j = 0; j < seqs[i].n; j++) {
            const struct discard_step *st = &seqs[i].s[j];
            int done = -1;
            size_t r = smtp_cmd_discard(st->in, st->len, &pending, &done);

            if (r != st->want || done != st->done || pending != st->pending_after)
                fail_msg("discard seq %zu step %zu: got %zu/%d/%d want %zu/%d/%d", i, j, r, done,
                         pending, st->want, st->done, st->pending_after);
        }
    }
}

/* ---- smtp_cmd_parse ---- */

struct parse_case {
    const char *line;
    size_t len;
    int rc;
    enum smtp_cmd_id id;
    const char *verb;
    const char *arg;
};

static const struct parse_case parse_cases[] = {
    /* Every verb, upper case. */
    {L("HELO client.example"), 0, SMTP_CMD_HELO, "HELO", "client.example"},
    {L("EHLO client.example"), 0, SMTP_CMD_EHLO, "EHLO", "client.example"},
    {L("MAIL FROM:<a@b>"), 0, SMTP_CMD_MAIL, "MAIL", "FROM:<a@b>"},
    {L("RCPT TO:<a@b>"), 0, SMTP_CMD_RCPT, "RCPT", "TO:<a@b>"},
    {L("DATA"), 0, SMTP_CMD_DATA, "DATA", ""},
    {L("RSET"), 0, SMTP_CMD_RSET, "RSET", ""},
    {L("NOOP"), 0, SMTP_CMD_NOOP, "NOOP", ""},
    {L("QUIT"), 0, SMTP_CMD_QUIT, "QUIT", ""},
    {L("VRFY user"), 0, SMTP_CMD_VRFY, "VRFY", "user"},
    {L("EXPN list"), 0, SMTP_CMD_EXPN, "EXPN", "list"},
    {L("HELP"), 0, SMTP_CMD_HELP, "HELP", ""},
    {L("STARTTLS"), 0, SMTP_CMD_STARTTLS, "STARTTLS", ""},
    {L("AUTH PLAIN AGFAAGI="), 0, SMTP_CMD_AUTH, "AUTH", "PLAIN AGFAAGI="},
    {L("BDAT 100 LAST"), 0, SMTP_CMD_BDAT, "BDAT", "100 LAST"},
    /* Case-insensitive (RFC 5321 section 2.4). */
    {L("helo x"), 0, SMTP_CMD_HELO, "helo", "x"},
    {L("ehlo x"), 0, SMTP_CMD_EHLO, "ehlo", "x"},
    {L("mail from:<a@b>"), 0, SMTP_CMD_MAIL, "mail", "from:<a@b>"},
    {L("rcpt to:<a@b>"), 0, SMTP_CMD_RCPT, "rcpt", "to:<a@b>"},
    {L("data"), 0, SMTP_CMD_DATA, "data", ""},
    {L("rset"), 0, SMTP_CMD_RSET, "rset", ""},
    {L("noop"), 0, SMTP_CMD_NOOP, "noop", ""},
    {L("quit"), 0, SMTP_CMD_QUIT, "quit", ""},
    {L("vrfy u"), 0, SMTP_CMD_VRFY, "vrfy", "u"},
    {L("expn u"), 0, SMTP_CMD_EXPN, "expn", "u"},
    {L("help"), 0, SMTP_CMD_HELP, "help", ""},
    {L("starttls"), 0, SMTP_CMD_STARTTLS, "starttls", ""},
    {L("auth login"), 0, SMTP_CMD_AUTH, "auth", "login"},
    {L("bdat 0 last"), 0, SMTP_CMD_BDAT, "bdat", "0 last"},
    {L("StArTtLs"), 0, SMTP_CMD_STARTTLS, "StArTtLs", ""},
    /* Extra spaces are trimmed from the argument. */
    {L("MAIL   FROM:<a@b>   "), 0, SMTP_CMD_MAIL, "MAIL", "FROM:<a@b>"},
    {L("QUIT "), 0, SMTP_CMD_QUIT, "QUIT", ""},
    {L("NOOP  a  b "), 0, SMTP_CMD_NOOP, "NOOP", "a  b"},
    {L("HELO \tx\t"), 0, SMTP_CMD_HELO, "HELO", "x"},
    {L("RCPT TO:<a@b> \t"), 0, SMTP_CMD_RCPT, "RCPT", "TO:<a@b>"},
    /* Unknown but well formed. */
    {L("XCLIENT ADDR=1"), 0, SMTP_CMD_UNKNOWN, "XCLIENT", "ADDR=1"},
    {L("QUITE"), 0, SMTP_CMD_UNKNOWN, "QUITE", ""},
    {L("QUI"), 0, SMTP_CMD_UNKNOWN, "QUI", ""},
    {L("ABCDEFGHIJKLMNOPQRST"), 0, SMTP_CMD_UNKNOWN, "ABCDEFGHIJKLMNOPQRST", ""},
    /* TAB and 8-bit octets are allowed in the argument. */
    {L("NOOP a\tb"), 0, SMTP_CMD_NOOP, "NOOP", "a\tb"},
    {L("RCPT TO:<\xe7\x94\xa8@x>"), 0, SMTP_CMD_RCPT, "RCPT", "TO:<\xe7\x94\xa8@x>"},
    /* Refused: verb not 1..20 letters or not followed by space/end. */
    {L(""), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L(" QUIT"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("ABCDEFGHIJKLMNOPQRSTU"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("MAIL:FROM:<a@b>"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("MAIL\tFROM:<a@b>"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("QUIT2"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("X-FOO"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("\xc3\xa9HLO"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    /* Refused: control characters anywhere (SMTP smuggling). */
    {L("DATA\n"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("DA\nTA"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("NOOP a\nRSET"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("NOOP a\rb"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("QUIT\r"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("QU\0IT"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("NOOP \0"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("NOOP \x1b[0m"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("NOOP \x7f"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
    {L("\tQUIT"), -1, SMTP_CMD_UNKNOWN, NULL, NULL},
};

static void test_parse_table(void **state)
{
    size_t i;

    (void)state;
    for (i = 0; i < sizeof(parse_cases) / sizeof(parse_cases[0]); i++) {
        const struct parse_case *pc = &parse_cases[i];
        struct smtp_cmd cmd;
        int rc = smtp_cmd_parse(pc->line, pc->len, &cmd);

        if (rc != pc->rc)
            fail_msg("parse case %zu (%s): rc %d want %d", i, pc->line, rc, pc->rc);
        if (rc != 0)
            continue;
        if (cmd.id != pc->id)
            fail_msg("parse case %zu (%s): id %d want %d", i, pc->line, cmd.id, pc->id);
        assert_ptr_equal(cmd.verb, pc->line);
        assert_int_equal(cmd.verblen, strlen(pc->verb));
        assert_memory_equal(cmd.verb, pc->verb, cmd.verblen);
        if (cmd.arglen != strlen(pc->arg) || memcmp(cmd.arg, pc->arg, cmd.arglen) != 0)
            fail_msg("parse case %zu (%s): arg '%.*s' want '%s'", i, pc->line, (int)cmd.arglen,
                     cmd.arg, pc->arg);
        assert_true(cmd.arg >= pc->line && cmd.arg + cmd.arglen <= pc->line + pc->len);
    }
}

/* A longest legal line frames and parses; its argument is intact. */
static void test_parse_long_line(void **state)
{
    char *s = make_line(512, 1);
    struct smtp_cmd cmd;
    size_t linelen;

    (void)state;
    assert_int_equal(smtp_cmd_frame(s, 512, SMTP_CMD_LINE_MAX, &linelen), 512);
    assert_int_equal(smtp_cmd_parse(s, linelen, &cmd), 0);
    assert_int_equal(cmd.id, SMTP_CMD_NOOP);
    assert_int_equal(cmd.arglen, 505);
    test_free(s);
}

static void test_names(void **state)
{
    int id;

    (void)state;
    assert_string_equal(smtp_cmd_name(SMTP_CMD_UNKNOWN), "?");
    assert_string_equal(smtp_cmd_name(SMTP_CMD_MAIL), "MAIL");
    assert_string_equal(smtp_cmd_name(SMTP_CMD_STARTTLS), "STARTTLS");
    assert_string_equal(smtp_cmd_name(SMTP_CMD__COUNT), "?");
    assert_string_equal(smtp_cmd_name((enum smtp_cmd_id)-3), "?");
    /* Every name parses back to its own id. */
    for (id = SMTP_CMD_UNKNOWN + 1; id < SMTP_CMD__COUNT; id++) {
        const char *name = smtp_cmd_name((enum smtp_cmd_id)id);
        struct smtp_cmd cmd;

        assert_int_equal(smtp_cmd_parse(name, strlen(name), &cmd), 0);
        assert_int_equal(cmd.id, id);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame_table),
        cmocka_unit_test(test_frame_limit),
        cmocka_unit_test(test_frame_split_feeds),
        cmocka_unit_test(test_discard_stream),
        cmocka_unit_test(test_discard_steps),
        cmocka_unit_test(test_parse_table),
        cmocka_unit_test(test_parse_long_line),
        cmocka_unit_test(test_names),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
