/*
 * libFuzzer harness for lib/smtp_data.c.
 *
 * Input layout: byte 0 selects the mode (bit 0) and the ceiling (bits 1-3),
 * byte 1 seeds the chunking, the rest is the DATA stream. The stream is
 * decoded three ways: in one call, in chunks whose sizes come from the
 * input, and one byte at a time. All three must agree with each other and
 * with a reference decoder written independently below, and every result
 * must satisfy the contract of smtp_data.h.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/smtp_data.h"

#define CHECK(cond) do { if (!(cond)) abort(); } while (0)

struct run {
    struct smtp_data d;
    struct buf out;
    size_t consumed;
};

/*
 * The reference: a direct reading of RFC 5321 section 4.5.2 over the whole
 * input, with lookahead instead of states. A line start is position 0 or
 * the position after a CR LF pair. Octets whose meaning depends on input
 * not yet seen (a final CR, a leading dot or dot CR at the end) are not
 * stored, as the incremental decoder holds them back too.
 */
static void reference(const unsigned char *p, size_t n, enum smtp_data_mode mode, size_t max,
                      struct run *r)
{
    struct buf full = BUF_INIT;
    size_t i = 0;
    int bol = 1;
    const char *bare_cr = mode == SMTP_DATA_NORMALIZE ? "\r\n" : "\r";
    const char *bare_lf = mode == SMTP_DATA_NORMALIZE ? "\r\n" : "\n";

    memset(&r->d, 0, sizeof(r->d));
    buf_init(&r->out);
    r->consumed = n;
    while (i < n) {
        if (bol && p[i] == '.') {
            if (i + 2 < n && p[i + 1] == '\r' && p[i + 2] == '\n') {
                r->d.done = 1;
                r->consumed = i + 3;
                break;
            }
            i++;                /* transparency dot */
            bol = 0;
            continue;
        }
        bol = 0;
        if (p[i] == '\r') {
            if (i + 1 == n)
                break;          /* held back */
            if (p[i + 1] == '\n') {
                buf_append(&full, "\r\n", 2);
                i += 2;
                bol = 1;
                continue;
            }
            r->d.bare_newline = 1;
            buf_appends(&full, bare_cr);
            i++;
        } else if (p[i] == '\n') {
            r->d.bare_newline = 1;
            buf_appends(&full, bare_lf);
            i++;
        } else {
            buf_append(&full, &p[i], 1);
            i++;
        }
    }
    r->d.size = full.len;
    r->d.too_big = full.len > max;
    buf_append(&r->out, full.data ? full.data : "", full.len > max ? max : full.len);
    buf_free(&full);
}

static uint32_t next_rand(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

/* Feeds p[0..n) in chunks: sizes drawn from seed, or 1 when bytewise. */
static void chunked(const unsigned char *p, size_t n, enum smtp_data_mode mode, size_t max,
                    uint32_t seed, int bytewise, struct run *r)
{
    size_t off = 0;
    uint32_t s = seed | 1;

    smtp_data_init(&r->d, mode, max);
    buf_init(&r->out);
    r->consumed = 0;
    while (!r->d.done) {
        size_t left = n - off;
        size_t k = bytewise ? (left ? 1 : 0) : (left ? next_rand(&s) % (left + 1) : 0);
        size_t used;

        /* Zero-length feeds are legal and must change nothing. */
        used = smtp_data_feed(&r->d, (const char *)p + off, k, &r->out);
        CHECK(used <= k);
        CHECK(r->d.done || used == k);
        CHECK(r->out.len <= max);
        off += used;
        if (off == n && !r->d.done)
            break;
    }
    r->consumed = off;
    /* After the marker nothing more is taken. */
    if (r->d.done && off < n)
        CHECK(smtp_data_feed(&r->d, (const char *)p + off, n - off, &r->out) == 0);
}

static void same(const struct run *a, const struct run *b)
{
    CHECK(a->consumed == b->consumed);
    CHECK(a->d.done == b->d.done);
    CHECK(a->d.bare_newline == b->d.bare_newline);
    CHECK(a->d.too_big == b->d.too_big);
    CHECK(a->d.size == b->d.size);
    CHECK(a->out.len == b->out.len);
    CHECK(a->out.len == 0 || memcmp(a->out.data, b->out.data, a->out.len) == 0);
}

/* Properties that follow from the header alone. */
static void invariants(const unsigned char *p, size_t n, enum smtp_data_mode mode, size_t max,
                       const struct run *r)
{
    const unsigned char *o = (const unsigned char *)r->out.data;

    CHECK(r->out.len <= max);
    CHECK(r->consumed <= n);
    if (!r->d.too_big)
        CHECK(r->d.size == r->out.len);
    else
        CHECK(r->d.size > max && r->out.len == max);
    if (r->d.done) {
        /* The marker is CRLF "." CRLF, its first CRLF being the previous
         * line's end or the DATA command's. */
        size_t c = r->consumed;
        CHECK(c >= 3 && memcmp(p + c - 3, ".\r\n", 3) == 0);
        CHECK(c == 3 || (c >= 5 && p[c - 5] == '\r' && p[c - 4] == '\n'));
        if (!r->d.too_big && r->out.len > 0)
            CHECK(r->out.len >= 2 && o[r->out.len - 2] == '\r' && o[r->out.len - 1] == '\n');
    } else {
        CHECK(r->consumed == n);
    }
    if (!r->d.bare_newline && r->out.len > 0) {
        /* Without the flag, every CR is followed by LF and every LF is
         * preceded by CR (a truncated message may end with a lone CR). */
        for (size_t i = 0; i < r->out.len; i++) {
            if (o[i] == '\n')
                CHECK(i > 0 && o[i - 1] == '\r');
            if (o[i] == '\r' && i + 1 < r->out.len)
                CHECK(o[i + 1] == '\n');
        }
    }
    if (mode == SMTP_DATA_NORMALIZE && !r->d.too_big) {
        for (size_t i = 0; i < r->out.len; i++) {
            if (o[i] == '\n')
                CHECK(i > 0 && o[i - 1] == '\r');
            if (o[i] == '\r')
                CHECK(i + 1 < r->out.len && o[i + 1] == '\n');
        }
    }
    /* The stored message never holds more octets than were received,
     * except for the LF added to each bare CR or LF when normalising. */
    if (mode == SMTP_DATA_KEEP)
        CHECK(r->d.size <= r->consumed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t ceilings[8] = {SIZE_MAX, 0, 1, 2, 3, 5, 16, 256};
    struct run whole, ref, split, bytes;
    enum smtp_data_mode mode;
    size_t max;
    uint32_t seed;
    const unsigned char *p;
    size_t n;

    if (size < 2)
        return 0;
    mode = (data[0] & 1) ? SMTP_DATA_NORMALIZE : SMTP_DATA_KEEP;
    max = ceilings[(data[0] >> 1) & 7];
    seed = (uint32_t)data[1] * 2654435761u ^ (uint32_t)size;
    p = data + 2;
    n = size - 2;

    smtp_data_init(&whole.d, mode, max);
    buf_init(&whole.out);
    whole.consumed = smtp_data_feed(&whole.d, (const char *)p, n, &whole.out);

    reference(p, n, mode, max, &ref);
    chunked(p, n, mode, max, seed, 0, &split);
    chunked(p, n, mode, max, seed, 1, &bytes);

    invariants(p, n, mode, max, &whole);
    same(&whole, &ref);
    same(&whole, &split);
    same(&whole, &bytes);

    buf_free(&whole.out);
    buf_free(&ref.out);
    buf_free(&split.out);
    buf_free(&bytes.out);
    return 0;
}
