/*
 * libFuzzer harness for lib/smtp_cmd.
 *
 * The input is a header followed by a byte stream. The stream is fed to a
 * simulated server in chunks cut at the points the header chooses; the
 * server frames lines with smtp_cmd_frame(), discards overlong ones with
 * smtp_cmd_discard() and parses every complete line with smtp_cmd_parse().
 * The sequence of events (line at offset/length, overlong line ended at
 * offset) must not depend on where the stream was cut, so it is compared
 * with a reference computed over the whole stream at once.
 *
 * Header: byte 0 = number of cuts (low 3 bits) and whether to use a small
 * line limit (bit 3); byte 1 = the small limit; then two bytes per cut.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "lib/smtp_cmd.h"

#define MAX_CUTS 7

struct event {
    size_t off;  /* stream offset of the line, or of the end of the overlong line */
    size_t len;  /* line length without CRLF; (size_t)-1 for an overlong line */
};

struct events {
    struct event *v;
    size_t n, cap;
};

static void ev_push(struct events *e, size_t off, size_t len)
{
    if (e->n == e->cap) {
        e->cap = e->cap ? e->cap * 2 : 16;
        e->v = realloc(e->v, e->cap * sizeof(*e->v));
        if (e->v == NULL)
            abort();
    }
    e->v[e->n].off = off;
    e->v[e->n].len = len;
    e->n++;
}

/* Naive reference: scan the whole stream for each CRLF. */
static void reference(const uint8_t *s, size_t n, size_t max, struct events *e)
{
    size_t pos = 0;

    while (pos < n) {
        size_t i = pos;

        while (i + 1 < n && !(s[i] == '\r' && s[i + 1] == '\n'))
            i++;
        if (i + 1 < n && i + 2 - pos <= max) {
            ev_push(e, pos, i - pos);
            pos = i + 2;
            continue;
        }
        if (n - pos < max)
            return; /* incomplete line, no verdict yet */
        if (i + 1 >= n)
            return; /* overlong, still discarding at the end of the stream */
        ev_push(e, i + 2, (size_t)-1);
        pos = i + 2;
    }
}

static void check_parse(const char *line, size_t len)
{
    struct smtp_cmd cmd;
    size_t i;
    int ctl = 0;

    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)line[i];

        if ((c < 0x20 && c != '\t') || c == 0x7f)
            ctl = 1;
    }
    if (smtp_cmd_parse(line, len, &cmd) != 0)
        return;
    if (ctl)
        abort();
    if (cmd.verb != line || cmd.verblen == 0 || cmd.verblen > 20 || cmd.verblen > len)
        abort();
    for (i = 0; i < cmd.verblen; i++) {
        char c = line[i];

        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')))
            abort();
    }
    if (cmd.verblen < len && line[cmd.verblen] != ' ')
        abort();
    if (cmd.arg < line + cmd.verblen || cmd.arg + cmd.arglen > line + len)
        abort();
    if (cmd.arglen > 0 && (cmd.arg[0] == ' ' || cmd.arg[0] == '\t' ||
                           cmd.arg[cmd.arglen - 1] == ' ' || cmd.arg[cmd.arglen - 1] == '\t'))
        abort();
    if (cmd.id < SMTP_CMD_UNKNOWN || cmd.id >= SMTP_CMD__COUNT)
        abort();
    if (cmd.id != SMTP_CMD_UNKNOWN) {
        const char *name = smtp_cmd_name(cmd.id);

        if (strlen(name) != cmd.verblen || strncasecmp(name, line, cmd.verblen) != 0)
            abort();
    }
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;

    return x < y ? -1 : x > y;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t ncuts, max, cuts[MAX_CUTS + 1], i, n, fed = 0, have = 0, base = 0, k = 0;
    const uint8_t *s;
    char *buf;
    struct events got = {NULL, 0, 0}, want = {NULL, 0, 0};
    int discarding = 0, pending_cr = 0;

    if (size < 2)
        return 0;
    ncuts = data[0] & MAX_CUTS;
    max = (data[0] & 8) ? (size_t)data[1] % 40 : SMTP_CMD_LINE_MAX;
    if (size < 2 + 2 * ncuts)
        return 0;
    s = data + 2 + 2 * ncuts;
    n = size - 2 - 2 * ncuts;
    for (i = 0; i < ncuts; i++)
        cuts[i] = ((size_t)data[2 + 2 * i] << 8 | data[3 + 2 * i]) % (n + 1);
    cuts[ncuts] = n;
    qsort(cuts, ncuts, sizeof(cuts[0]), cmp_size);

    buf = malloc(n + 1);
    if (buf == NULL)
        abort();

    /* Feed chunk by chunk; after each, process as much as possible. */
    while (k <= ncuts) {
        size_t next = cuts[k++];

        if (next > fed) {
            memcpy(buf + have, s + fed, next - fed);
            have += next - fed;
            fed = next;
        }
        for (;;) {
            if (discarding) {
                int done = -1;
                size_t r = smtp_cmd_discard(buf, have, &pending_cr, &done);

                if (r > have || (done != 0 && done != 1) || (!done && r != have))
                    abort();
                if (done && (r == 0 || buf[r - 1] != '\n' || (r >= 2 && buf[r - 2] != '\r')))
                    abort();
                memmove(buf, buf + r, have - r);
                have -= r;
                base += r;
                if (!done)
                    break;
                discarding = 0;
                ev_push(&got, base, (size_t)-1);
            } else {
                size_t linelen = (size_t)-7;
                ssize_t r = smtp_cmd_frame(buf, have, max, &linelen);

                if (r == SMTP_FRAME_NEED_MORE) {
                    if (have >= max)
                        abort();
                    break;
                }
                if (r == SMTP_FRAME_TOO_LONG) {
                    if (have < max)
                        abort();
                    discarding = 1;
                    pending_cr = 0;
                    continue;
                }
                if (r < 2 || (size_t)r > have || (size_t)r > max || linelen + 2 != (size_t)r ||
                    buf[linelen] != '\r' || buf[linelen + 1] != '\n')
                    abort();
                if (linelen > 0 && memmem(buf, linelen + 1, "\r\n", 2) != NULL)
                    abort();
                check_parse(buf, linelen);
                ev_push(&got, base, linelen);
                memmove(buf, buf + r, have - (size_t)r);
                have -= (size_t)r;
                base += (size_t)r;
            }
        }
    }

    reference(s, n, max, &want);
    if (got.n != want.n)
        abort();
    for (i = 0; i < got.n; i++)
        if (got.v[i].off != want.v[i].off || got.v[i].len != want.v[i].len)
            abort();

    /* The whole stream as one line exercises the parser on raw input. */
    check_parse((const char *)s, n);

    free(got.v);
    free(want.v);
    free(buf);
    return 0;
}
