/*
 * libFuzzer harness for router/dsn.c.
 *
 * Input layout: byte 0 holds flags (bit 0 return_full, bit 1 expired, bits
 * 2-3 one to four recipients, bit 4 a remote MTA given, bits 5-7 the
 * envelope sender), byte 1 selects reply codes and enhanced codes, bytes
 * 2-3 the length of the reply text (little-endian), byte 4 the length of
 * the remote MTA name; then the reply text, the remote MTA name and, for
 * the rest, the original message. Recipient i gets the reply text from
 * octet i on, so recipients differ.
 *
 * Every input is valid for dsn_build(), which must succeed and produce:
 * only CRLF line ends, no line over 998 octets, the boundary exactly five
 * times (parameter, three delimiters, the close delimiter, in that order
 * and at the end), a message dsn_should_bounce() refuses to bounce, the
 * same bytes on a second run, and, when no returned line needed
 * splitting, a third part equal to the original's header section (or the
 * whole original) with line ends made CRLF by the reference below.
 * dsn_should_bounce() also runs over the raw input.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/xmalloc.h"
#include "router/dsn.h"

#define CHECK(cond) do { if (!(cond)) abort(); } while (0)

static const int codes[8] = {0, 421, 450, 452, 550, 551, 554, 599};
static const char *const enhanced[8] = {NULL, "", "5.1.1", "4.4.1", "5.7.1000", "2.0.0",
                                        "4.2.2", "5.0"};
static const char *const senders[8] = {
    "alice@sender.example",
    "\"alice  smith\"@sender.example",
    "j\303\266rg@b\303\274cher.example",
    "=_mf_0190a1b2c3d4e5f6a7b8c9_@x.example",
    "a+b=c\\d@x.example",
    "x@y",
    "\xf0\x9f\x93\xa7@\xe7\x94\xa8.example",
    "--@example.org",
};

static char long_rcpt[DSN_ADDR_MAX + 1];

static const char *rcpt_addr(size_t i)
{
    static const char *const fixed[3] = {
        "bob@example.com",
        "j\303\266rg+tag=1@b\303\274cher.example",
        "Postmaster",
    };

    if (i < 3)
        return fixed[i];
    /* The worst case for the xtext form: six octets per '+'. */
    if (long_rcpt[0] == '\0') {
        memset(long_rcpt, '+', DSN_ADDR_MAX);
        memcpy(long_rcpt, "\xc3\xa9", 2);
        memcpy(long_rcpt + DSN_ADDR_MAX - 10, "@x.example", 10);
        long_rcpt[DSN_ADDR_MAX] = '\0';
    }
    return long_rcpt;
}

static char *cstr(const uint8_t *p, size_t n)
{
    char *s = xmalloc(n + 1);
    if (n)
        memcpy(s, p, n);
    s[n] = '\0';
    return s;
}

/*
 * The reference for part 3, written from RFC 5322 independently of dsn.c:
 * lines end at CRLF, LF or CR; the header section stops before the first
 * empty line; every line gets CRLF. Returns 1 when some line is longer
 * than 998 octets (then dsn.c splits it and no comparison is made).
 */
static int reference(const uint8_t *p, size_t n, int full, struct buf *out)
{
    size_t i = 0;
    int header = 1, long_line = 0;

    while (i < n) {
        size_t j = i;
        while (j < n && p[j] != '\r' && p[j] != '\n')
            j++;
        if (header && j == i) {
            if (!full)
                break;
            header = 0;
        }
        if (j - i > 998)
            long_line = 1;
        buf_append(out, p + i, j - i);
        buf_append(out, "\r\n", 2);
        if (j == n)
            break;
        i = (p[j] == '\r' && j + 1 < n && p[j + 1] == '\n') ? j + 2 : j + 1;
    }
    return long_line;
}

static size_t count(const char *p, size_t n, const char *needle, size_t k)
{
    size_t c = 0;
    const char *q = p, *end = p + n;

    while ((q = memmem(q, (size_t)(end - q), needle, k)) != NULL) {
        c++;
        q++;
    }
    return c;
}

static void check_output(const struct buf *b, const uint8_t *orig, size_t orig_len, int full)
{
    const char *p, *q, *part3;
    char boundary[80], delim[100];
    size_t col = 0, blen, dlen, first_len;
    struct buf ref = BUF_INIT;

    /* CRLF only, lines of at most 998 octets. */
    for (size_t i = 0; i < b->len; i++) {
        if (b->data[i] == '\r') {
            CHECK(i + 1 < b->len && b->data[i + 1] == '\n');
        } else if (b->data[i] == '\n') {
            CHECK(i > 0 && b->data[i - 1] == '\r');
            col = 0;
        } else {
            CHECK(++col <= 998);
        }
    }
    CHECK(b->len >= 2 && memcmp(b->data + b->len - 2, "\r\n", 2) == 0);

    /* The boundary: once as the parameter, then as delimiters only. */
    p = memmem(b->data, b->len, "\tboundary=\"", 11);
    CHECK(p != NULL);
    p += 11;
    q = memchr(p, '"', b->len - (size_t)(p - b->data));
    CHECK(q != NULL && q > p && q - p <= 70);
    blen = (size_t)(q - p);
    memcpy(boundary, p, blen);
    boundary[blen] = '\0';
    CHECK(count(b->data, b->len, boundary, blen) == 5);
    dlen = (size_t)snprintf(delim, sizeof(delim), "\r\n--%s\r\n", boundary);
    CHECK(count(b->data, b->len, delim, dlen) == 3);
    dlen = (size_t)snprintf(delim, sizeof(delim), "\r\n--%s--\r\n", boundary);
    CHECK(b->len >= dlen && memcmp(b->data + b->len - dlen, delim, dlen) == 0);

    CHECK(dsn_should_bounce("someone@example.org", b->data, b->len) == 0);

    /* The header section ends after the boundary parameter, before the
     * first delimiter: no input made an empty line in the header. */
    dlen = (size_t)snprintf(delim, sizeof(delim), "\r\n--%s\r\n", boundary);
    first_len = (size_t)((const char *)memmem(b->data, b->len, "\r\n\r\n", 4) - b->data);
    CHECK(first_len > (size_t)(q - b->data));
    CHECK(first_len < (size_t)((const char *)memmem(b->data, b->len, delim, dlen) - b->data));

    /* Part 3 against the reference. */
    part3 = b->data;
    for (int k = 0; k < 3; k++) {
        part3 = memmem(part3, b->len - (size_t)(part3 - b->data), delim, dlen);
        CHECK(part3 != NULL);
        part3 += dlen;
    }
    p = memmem(part3, b->len - (size_t)(part3 - b->data), "\r\n\r\n", 4);
    CHECK(p != NULL);
    p += 4;
    if (!reference(orig, orig_len, full, &ref)) {
        size_t clen = b->len - (size_t)(p - b->data) - (strlen(boundary) + 8);
        CHECK(clen == ref.len);
        CHECK(clen == 0 || memcmp(p, ref.data, clen) == 0);
    }
    buf_free(&ref);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct dsn_rcpt rcpts[4];
    struct dsn_input in;
    struct buf out = BUF_INIT, again = BUF_INIT;
    char *diag, *remote, *diags[4];
    size_t dl, rl, nr;
    const uint8_t *p;
    char err[128];
    uint8_t flags, sel;

    if (size < 5)
        return 0;
    flags = data[0];
    sel = data[1];
    dl = (size_t)data[2] | (size_t)data[3] << 8;
    rl = data[4];
    p = data + 5;
    size -= 5;
    if (dl > size)
        dl = size;
    diag = cstr(p, dl);
    p += dl;
    size -= dl;
    if (rl > size)
        rl = size;
    remote = cstr(p, rl);
    p += rl;
    size -= rl;

    nr = 1 + ((flags >> 2) & 3);
    for (size_t i = 0; i < nr; i++) {
        diags[i] = diag + (i < dl ? i : dl);
        rcpts[i].rcpt = rcpt_addr(i);
        rcpts[i].action = (i & 1) ? "failed" : NULL;
        rcpts[i].code = codes[(sel + i) & 7];
        rcpts[i].enhanced = enhanced[((sel >> 3) + i) & 7];
        rcpts[i].diagnostic = diags[i];
        rcpts[i].remote_mta = (flags & 0x10) ? remote : NULL;
        rcpts[i].last_attempt_ms = (sel & 0x40) ? 0 : INT64_C(1717243100000) + (int64_t)i;
    }
    memset(&in, 0, sizeof(in));
    in.queue_id = "0190a1b2c3d4e5f6a7b8c9";
    in.reporting_mta = "mx1.mailferry.test";
    in.envelope_from = senders[flags >> 5];
    in.orig_data = (const char *)p;
    in.orig_len = size;
    in.rcpts = rcpts;
    in.nrcpts = nr;
    in.arrival_ms = (sel & 0x80) ? 0 : INT64_C(1716811200000);
    in.now_ms = INT64_C(1717243200123);
    in.reason = (flags & 2) ? "expired" : NULL;
    in.return_full = flags & 1;

    (void)dsn_should_bounce(in.envelope_from, (const char *)p, size);

    CHECK(dsn_build(&in, &out, err, sizeof(err)) == 0);
    check_output(&out, p, size, in.return_full);
    CHECK(dsn_build(&in, &again, err, sizeof(err)) == 0);
    CHECK(again.len == out.len && memcmp(again.data, out.data, out.len) == 0);

    buf_free(&out);
    buf_free(&again);
    free(diag);
    free(remote);
    return 0;
}
