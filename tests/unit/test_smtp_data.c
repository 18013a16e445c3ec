/*
 * Unit tests for lib/smtp_data.c, the DATA decoder.
 *
 * Every case is a complete input and its expected result. Each one is fed
 * whole, one byte at a time, split in two at every position, and split at
 * random positions; all feeds must give the same stored bytes, consumed
 * count and flags, because a decoder whose output depends on how TCP
 * segmented the stream is a smuggling vector by itself.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "lib/buf.h"
#include "lib/smtp_data.h"

#define S(lit) lit, sizeof(lit) - 1
#define NOMAX SIZE_MAX

#define K SMTP_DATA_KEEP
#define N SMTP_DATA_NORMALIZE

struct data_case {
    const char *name;
    const char *in;
    size_t in_len;
    enum smtp_data_mode mode;
    size_t max;
    const char *out;
    size_t out_len;
    size_t consumed;
    int done;
    int bare;
    int too_big;
    size_t size;        /* expected size; 0 means "same as out_len" */
};

static const struct data_case cases[] = {
    /* The marker right after DATA: the DATA line's CRLF precedes it. */
    {"empty message", S(".\r\n"), K, NOMAX, S(""), 3, 1, 0, 0, 0},
    {"one line", S("hello\r\n.\r\n"), K, NOMAX, S("hello\r\n"), 10, 1, 0, 0, 0},
    {"two lines", S("a\r\nb\r\n.\r\n"), K, NOMAX, S("a\r\nb\r\n"), 9, 1, 0, 0, 0},
    {"empty first line", S("\r\n.\r\n"), K, NOMAX, S("\r\n"), 5, 1, 0, 0, 0},
    {"empty lines", S("\r\n\r\n\r\n.\r\n"), K, NOMAX, S("\r\n\r\n\r\n"), 9, 1, 0, 0, 0},
    {"nul bytes kept", S("a\0b\r\n\0\r\n.\r\n"), K, NOMAX, S("a\0b\r\n\0\r\n"), 11, 1, 0, 0, 0},
    {"8bit kept", S("\xc3\xa9t\xc3\xa9\r\n.\r\n"), K, NOMAX, S("\xc3\xa9t\xc3\xa9\r\n"), 10, 1, 0, 0, 0},

    /* Pipelined commands after the marker stay with the caller. */
    {"pipelined after marker", S("hi\r\n.\r\nQUIT\r\n"), K, NOMAX, S("hi\r\n"), 7, 1, 0, 0, 0},
    {"second marker not consumed", S("hi\r\n.\r\n.\r\n"), K, NOMAX, S("hi\r\n"), 7, 1, 0, 0, 0},
    {"empty then pipelined", S(".\r\nRSET\r\n"), K, NOMAX, S(""), 3, 1, 0, 0, 0},

    /* Dot-unstuffing, RFC 5321 section 4.5.2. */
    {"unstuff leading dot", S("..foo\r\n.\r\n"), K, NOMAX, S(".foo\r\n"), 10, 1, 0, 0, 0},
    {"unstuff lone stuffed dot", S("a\r\n..\r\n.\r\n"), K, NOMAX, S("a\r\n.\r\n"), 10, 1, 0, 0, 0},
    {"unstuff three dots", S("...\r\n.\r\n"), K, NOMAX, S("..\r\n"), 8, 1, 0, 0, 0},
    {"dot then text", S(".x\r\n.\r\n"), K, NOMAX, S("x\r\n"), 7, 1, 0, 0, 0},
    {"only leading dot removed", S("a\r\n.b.\r\n.\r\n"), K, NOMAX, S("a\r\nb.\r\n"), 11, 1, 0, 0, 0},
    {"dot inside line", S("a.b\r\n.\r\n"), K, NOMAX, S("a.b\r\n"), 8, 1, 0, 0, 0},
    {"dot at end of line", S("a.\r\n.\r\n"), K, NOMAX, S("a.\r\n"), 7, 1, 0, 0, 0},
    {"dot space is data", S(". \r\n.\r\n"), K, NOMAX, S(" \r\n"), 7, 1, 0, 0, 0},

    /* No marker yet: everything is consumed and nothing is done. */
    {"no input", S(""), K, NOMAX, S(""), 0, 0, 0, 0, 0},
    {"no trailing marker", S("hello\r\n"), K, NOMAX, S("hello\r\n"), 7, 0, 0, 0, 0},
    {"no trailing crlf", S("hello"), K, NOMAX, S("hello"), 5, 0, 0, 0, 0},
    {"held cr", S("hello\r"), K, NOMAX, S("hello"), 6, 0, 0, 0, 0},
    {"held dot", S("hello\r\n."), K, NOMAX, S("hello\r\n"), 8, 0, 0, 0, 0},
    {"held dot cr", S("hello\r\n.\r"), K, NOMAX, S("hello\r\n"), 9, 0, 0, 0, 0},
    {"held cr only", S("\r"), K, NOMAX, S(""), 1, 0, 0, 0, 0},

    /* Smuggling variants: none of these ends the message. */
    {"lf dot lf", S("a\n.\nb\r\n.\r\n"), K, NOMAX, S("a\n.\nb\r\n"), 10, 1, 1, 0, 0},
    {"lf dot lf norm", S("a\n.\nb\r\n.\r\n"), N, NOMAX, S("a\r\n.\r\nb\r\n"), 10, 1, 1, 0, 0},
    {"lf dot lf alone", S("\n.\n"), K, NOMAX, S("\n.\n"), 3, 0, 1, 0, 0},
    {"crlf dot lf", S("a\r\n.\nb\r\n.\r\n"), K, NOMAX, S("a\r\n\nb\r\n"), 11, 1, 1, 0, 0},
    {"crlf dot lf norm", S("a\r\n.\nb\r\n.\r\n"), N, NOMAX, S("a\r\n\r\nb\r\n"), 11, 1, 1, 0, 0},
    {"crlf dot lf alone", S("\r\n.\n"), K, NOMAX, S("\r\n\n"), 4, 0, 1, 0, 0},
    {"lf dot crlf", S("a\n.\r\nb\r\n.\r\n"), K, NOMAX, S("a\n.\r\nb\r\n"), 11, 1, 1, 0, 0},
    {"lf dot crlf norm", S("a\n.\r\nb\r\n.\r\n"), N, NOMAX, S("a\r\n.\r\nb\r\n"), 11, 1, 1, 0, 0},
    {"lf dot crlf alone", S("\n.\r\n"), K, NOMAX, S("\n.\r\n"), 4, 0, 1, 0, 0},
    {"cr dot crlf", S("a\r.\r\nb\r\n.\r\n"), K, NOMAX, S("a\r.\r\nb\r\n"), 11, 1, 1, 0, 0},
    {"cr dot crlf norm", S("a\r.\r\nb\r\n.\r\n"), N, NOMAX, S("a\r\n.\r\nb\r\n"), 11, 1, 1, 0, 0},
    {"cr dot crlf alone", S("\r.\r\n"), K, NOMAX, S("\r.\r\n"), 4, 0, 1, 0, 0},
    {"cr dot cr", S("a\r.\rb\r\n.\r\n"), K, NOMAX, S("a\r.\rb\r\n"), 10, 1, 1, 0, 0},
    {"crlf dot cr x", S("a\r\n.\rX\r\n.\r\n"), K, NOMAX, S("a\r\n\rX\r\n"), 11, 1, 1, 0, 0},
    {"crlf dot cr x norm", S("a\r\n.\rX\r\n.\r\n"), N, NOMAX, S("a\r\n\r\nX\r\n"), 11, 1, 1, 0, 0},
    {"crlf dot cr dot", S("a\r\n.\r.\r\n.\r\n"), K, NOMAX, S("a\r\n\r.\r\n"), 11, 1, 1, 0, 0},
    {"crlf dot cr cr lf", S("a\r\n.\r\r\n.\r\n"), K, NOMAX, S("a\r\n\r\r\n"), 10, 1, 1, 0, 0},
    {"crlf dot cr cr lf norm", S("a\r\n.\r\r\n.\r\n"), N, NOMAX, S("a\r\n\r\n\r\n"), 10, 1, 1, 0, 0},
    {"crlf dot cr cr alone", S("a\r\n.\r\r"), K, NOMAX, S("a\r\n\r"), 6, 0, 1, 0, 0},
    {"lf crlf dot crlf", S("a\n\r\n.\r\n"), K, NOMAX, S("a\n\r\n"), 7, 1, 1, 0, 0},
    {"cr crlf dot crlf", S("a\r\r\n.\r\n"), K, NOMAX, S("a\r\r\n"), 7, 1, 1, 0, 0},
    {"cr crlf dot crlf norm", S("a\r\r\n.\r\n"), N, NOMAX, S("a\r\n\r\n"), 7, 1, 1, 0, 0},
    {"crlf lf dot crlf", S("a\r\n\n.\r\n.\r\n"), K, NOMAX, S("a\r\n\n.\r\n"), 10, 1, 1, 0, 0},
    {"crlf cr dot crlf", S("a\r\n\r.\r\n.\r\n"), K, NOMAX, S("a\r\n\r.\r\n"), 10, 1, 1, 0, 0},
    {"dot lf at start", S(".\nx\r\n.\r\n"), K, NOMAX, S("\nx\r\n"), 8, 1, 1, 0, 0},
    {"dot cr at start", S(".\rx\r\n.\r\n"), K, NOMAX, S("\rx\r\n"), 8, 1, 1, 0, 0},
    {"lf cr", S("a\n\rb\r\n.\r\n"), K, NOMAX, S("a\n\rb\r\n"), 9, 1, 1, 0, 0},
    {"lf cr norm", S("a\n\rb\r\n.\r\n"), N, NOMAX, S("a\r\n\r\nb\r\n"), 9, 1, 1, 0, 0},
    {"cr cr lf lf", S("a\r\r\n\nb\r\n.\r\n"), N, NOMAX, S("a\r\n\r\n\r\nb\r\n"), 11, 1, 1, 0, 0},
    {"bare lf lines norm", S("x\ny\n.\r\n.\r\n"), N, NOMAX, S("x\r\ny\r\n.\r\n"), 10, 1, 1, 0, 0},
    {"no flag without bare", S("a\r\nb\r\n.\r\n"), N, NOMAX, S("a\r\nb\r\n"), 9, 1, 0, 0, 0},

    /* The ceiling: exactly max is accepted, one octet more is too big; the
     * decoder still finds the marker so the session stays in sync. */
    {"max exact", S("abc\r\n.\r\n"), K, 5, S("abc\r\n"), 8, 1, 0, 0, 0},
    {"max minus one", S("abc\r\n.\r\n"), K, 4, S("abc\r"), 8, 1, 0, 1, 5},
    {"max zero empty message", S(".\r\n"), K, 0, S(""), 3, 1, 0, 0, 0},
    {"max zero", S("a\r\n.\r\nQUIT\r\n"), K, 0, S(""), 6, 1, 0, 1, 3},
    {"max counts unstuffed", S("..ab\r\n.\r\n"), K, 5, S(".ab\r\n"), 9, 1, 0, 0, 0},
    {"too big keeps scanning", S("aaaaaaaaaa\r\nbbbbbbbbbb\r\n.\r\nMAIL"), K, 2, S("aa"), 27, 1, 0, 1, 24},
    {"too big no marker", S("aaaaaaaaaa\r\n"), K, 3, S("aaa"), 12, 0, 0, 1, 12},
    {"norm counts crlf", S("a\nb\r\n.\r\n"), N, 6, S("a\r\nb\r\n"), 8, 1, 1, 0, 0},
    {"norm too big", S("a\nb\r\n.\r\n"), N, 5, S("a\r\nb\r"), 8, 1, 1, 1, 6},
    {"keep counts lf", S("a\nb\r\n.\r\n"), K, 5, S("a\nb\r\n"), 8, 1, 1, 0, 0},
};

/* A small deterministic generator, so that failures are reproducible. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rng_next(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

struct result {
    struct buf out;
    size_t consumed;
    struct smtp_data d;
};

/*
 * Feeds the input in chunks whose ends are cuts[0..ncuts) (ascending, the
 * last one being in_len), the way a session would: the input of each call
 * is what the previous calls left, and feeding stops once done is set.
 */
static void feed_chunks(const struct data_case *c, const size_t *cuts, size_t ncuts,
                        struct result *r)
{
    size_t start = 0;

    buf_init(&r->out);
    r->consumed = 0;
    smtp_data_init(&r->d, c->mode, c->max);
    for (size_t k = 0; k < ncuts && !r->d.done; k++) {
        size_t n = cuts[k] - start;
        size_t used = smtp_data_feed(&r->d, c->in + start, n, &r->out);

        assert_true(used <= n);
        if (!r->d.done)
            assert_int_equal(used, n);
        r->consumed += used;
        start = cuts[k];
    }
}

/* Returns 0 when r matches the case, else prints the difference and
 * returns -1 (so that one run reports every failing case). */
static int check_result(const struct data_case *c, const struct result *r, const char *how)
{
    size_t want_size = c->size ? c->size : c->out_len;

    if (r->out.len != c->out_len || memcmp(r->out.data ? r->out.data : "", c->out, c->out_len) != 0
        || r->consumed != c->consumed || r->d.done != c->done
        || r->d.bare_newline != c->bare || r->d.too_big != c->too_big
        || r->d.size != want_size) {
        print_error("case \"%s\" fed %s: len=%zu (want %zu) consumed=%zu (want %zu) "
                    "done=%d (want %d) bare=%d (want %d) too_big=%d (want %d) "
                    "size=%zu (want %zu)\n",
                    c->name, how, r->out.len, c->out_len, r->consumed, c->consumed,
                    r->d.done, c->done, r->d.bare_newline, c->bare, r->d.too_big,
                    c->too_big, r->d.size, want_size);
        return -1;
    }
    assert_true(r->out.len <= c->max);
    return 0;
}

static int run_case(const struct data_case *c)
{
    struct result r;
    int bad = 0;
    size_t cuts[64];
    char how[64];

    /* (a) whole */
    cuts[0] = c->in_len;
    feed_chunks(c, cuts, 1, &r);
    bad |= check_result(c, &r, "whole");
    buf_free(&r.out);
    if (bad)
        return -1;

    /* (b) byte by byte */
    {
        size_t *bytes = test_malloc((c->in_len + 1) * sizeof(*bytes));

        for (size_t i = 0; i < c->in_len; i++)
            bytes[i] = i + 1;
        feed_chunks(c, bytes, c->in_len, &r);
        bad |= check_result(c, &r, "byte by byte");
        buf_free(&r.out);
        test_free(bytes);
    }

    /* (c) two parts, split at every position (empty parts included) */
    for (size_t at = 0; at <= c->in_len; at++) {
        cuts[0] = at;
        cuts[1] = c->in_len;
        feed_chunks(c, cuts, 2, &r);
        snprintf(how, sizeof(how), "split at %zu", at);
        bad |= check_result(c, &r, how);
        buf_free(&r.out);
    }

    /* (d) random splits into up to 8 parts */
    for (int iter = 0; iter < 300; iter++) {
        size_t n = 0, pos = 0;
        size_t parts = 1 + (size_t)(rng_next() % 8);

        while (n + 1 < parts && pos < c->in_len) {
            pos += (size_t)(rng_next() % (c->in_len - pos + 1));
            cuts[n++] = pos;
        }
        cuts[n++] = c->in_len;
        feed_chunks(c, cuts, n, &r);
        snprintf(how, sizeof(how), "randomly (iteration %d, %zu parts)", iter, n);
        bad |= check_result(c, &r, how);
        buf_free(&r.out);
        if (bad)
            break;
    }
    return bad;
}

static void test_table(void **state)
{
    int failed = 0;

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        if (run_case(&cases[i]) != 0)
            failed++;
    }
    if (failed)
        fail_msg("%d of %zu cases failed", failed, sizeof(cases) / sizeof(cases[0]));
}

/* Once the marker is seen, further feeds consume nothing and store nothing. */
static void test_feed_after_done(void **state)
{
    struct smtp_data d;
    struct buf out = BUF_INIT;

    (void)state;
    smtp_data_init(&d, SMTP_DATA_KEEP, 100);
    assert_int_equal(smtp_data_feed(&d, S("x\r\n.\r\n"), &out), 6);
    assert_true(d.done);
    assert_int_equal(smtp_data_feed(&d, S("more\r\n.\r\n"), &out), 0);
    assert_int_equal(smtp_data_feed(&d, S(""), &out), 0);
    assert_int_equal(out.len, 3);
    assert_memory_equal(out.data, "x\r\n", 3);
    assert_int_equal(d.size, 3);
    buf_free(&out);
}

/* A zero-length feed leaves the state alone, wherever it is. */
static void test_empty_feeds(void **state)
{
    struct smtp_data d;
    struct buf out = BUF_INIT;
    static const char in[] = "a\r\n.\r\n";

    (void)state;
    smtp_data_init(&d, SMTP_DATA_KEEP, 100);
    for (size_t i = 0; i < sizeof(in) - 1; i++) {
        assert_int_equal(smtp_data_feed(&d, in + i, 0, &out), 0);
        assert_int_equal(smtp_data_feed(&d, in + i, 1, &out), 1);
    }
    assert_true(d.done);
    assert_int_equal(out.len, 3);
    buf_free(&out);
}

/* init resets every result field, so a decoder can be reused. */
static void test_reinit(void **state)
{
    struct smtp_data d;
    struct buf out = BUF_INIT;

    (void)state;
    smtp_data_init(&d, SMTP_DATA_NORMALIZE, 2);
    assert_int_equal(smtp_data_feed(&d, S("a\nbcd\r\n.\r\n"), &out), 10);
    assert_true(d.done && d.bare_newline && d.too_big);
    smtp_data_init(&d, SMTP_DATA_KEEP, 10);
    assert_false(d.done || d.bare_newline || d.too_big);
    assert_int_equal(d.size, 0);
    assert_int_equal(d.mode, SMTP_DATA_KEEP);
    assert_int_equal(d.max, 10);
    buf_reset(&out);
    assert_int_equal(smtp_data_feed(&d, S(".\r\n"), &out), 3);
    assert_int_equal(out.len, 0);
    buf_free(&out);
}

/*
 * A large message with long lines, stuffed dots and a marker, fed in chunks
 * of every size from 1 to 64 bytes, decodes to the same bytes as fed whole
 * (exercises the bulk copy of line contents across chunk boundaries).
 */
static void test_large_message(void **state)
{
    struct buf in = BUF_INIT, want = BUF_INIT, out = BUF_INIT;
    struct smtp_data d;

    (void)state;
    for (int line = 0; line < 500; line++) {
        if (line % 7 == 0) {
            buf_appends(&in, "..");
            buf_appends(&want, ".");
        }
        for (int k = 0; k < line % 97; k++) {
            char ch = (char)('a' + (line + k) % 26);
            buf_append(&in, &ch, 1);
            buf_append(&want, &ch, 1);
        }
        buf_appends(&in, "\r\n");
        buf_appends(&want, "\r\n");
    }
    buf_appends(&in, ".\r\nQUIT\r\n");

    for (size_t chunk = 1; chunk <= 64; chunk++) {
        size_t off = 0;

        smtp_data_init(&d, SMTP_DATA_KEEP, SIZE_MAX);
        buf_reset(&out);
        while (off < in.len && !d.done) {
            size_t n = in.len - off < chunk ? in.len - off : chunk;
            off += smtp_data_feed(&d, in.data + off, n, &out);
        }
        assert_true(d.done);
        assert_false(d.bare_newline || d.too_big);
        assert_int_equal(off, in.len - 6);
        assert_int_equal(out.len, want.len);
        assert_memory_equal(out.data, want.data, want.len);
        assert_int_equal(d.size, want.len);
    }
    buf_free(&in);
    buf_free(&want);
    buf_free(&out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_feed_after_done),
        cmocka_unit_test(test_empty_feeds),
        cmocka_unit_test(test_reinit),
        cmocka_unit_test(test_large_message),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
