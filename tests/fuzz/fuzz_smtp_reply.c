/*
 * libFuzzer harness for lib/smtp_reply.
 *
 * The input after a two-byte header is a stream of server output. A client
 * reads it reply by reply with smtp_reply_parse(); every reply must be
 * well formed (code 200..599 with the same class as its enhanced code,
 * 1..SMTP_REPLY_LINES_MAX lines, NUL-terminated text without the code) and
 * must not depend on how the stream was cut: the header chooses a cut
 * point, and for each reply the verdict on every prefix is checked against
 * the verdict on the whole (a prefix of a reply needs more; a prefix of an
 * error needs more or is an error). smtp_reply_has_keyword() runs on every
 * reply with a keyword taken from the input.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lib/smtp_reply.h"

static void check_reply(const struct smtp_reply *r)
{
    size_t tl = strnlen(r->text, sizeof(r->text));
    size_t el = strnlen(r->enhanced, sizeof(r->enhanced));

    if (r->code < 200 || r->code > 599)
        abort();
    if (r->nlines < 1 || r->nlines > SMTP_REPLY_LINES_MAX)
        abort();
    if (tl >= sizeof(r->text) || el >= sizeof(r->enhanced))
        abort();
    if (el > 0) {
        if (el < 5 || r->enhanced[0] != '0' + r->code / 100 || r->enhanced[1] != '.')
            abort();
        if (r->code / 100 != 2 && r->code / 100 != 4 && r->code / 100 != 5)
            abort();
    }
    if (smtp_reply_class(r) != r->code / 100)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s;
    size_t n, pos = 0, cut;
    char kw[9];
    char params[32];

    if (size < 2)
        return 0;
    s = (const char *)data + 2;
    n = size - 2;
    cut = ((size_t)data[0] << 8 | data[1]);
    memcpy(kw, "SIZE", 5);
    if (n >= 4) {
        size_t i;

        for (i = 0; i < 4 && i < n; i++)
            kw[i] = s[i] == '\0' ? 'x' : s[i];
        kw[4] = '\0';
    }

    while (pos < n) {
        struct smtp_reply whole, part;
        size_t avail = n - pos;
        ssize_t w = smtp_reply_parse(s + pos, avail, &whole);
        size_t k = cut % (avail + 1);
        ssize_t p;
        char *copy;

        if (w > 0) {
            if ((size_t)w > avail)
                abort();
            check_reply(&whole);
            smtp_reply_has_keyword(&whole, kw, params, sizeof(params));
            smtp_reply_has_keyword(&whole, "PIPELINING", NULL, 0);
        } else if (w != SMTP_REPLY_NEED_MORE && w != SMTP_REPLY_ERROR) {
            abort();
        }

        /* The prefix of k bytes, in its own allocation so that ASan sees
         * any read past it. */
        copy = malloc(k ? k : 1);
        if (copy == NULL)
            abort();
        memcpy(copy, s + pos, k);
        p = smtp_reply_parse(copy, k, &part);
        free(copy);
        if (w > 0 && (ssize_t)k < w && p != SMTP_REPLY_NEED_MORE)
            abort();
        if (w > 0 && (ssize_t)k >= w) {
            if (p != w || part.code != whole.code || part.nlines != whole.nlines ||
                strcmp(part.text, whole.text) != 0 || strcmp(part.enhanced, whole.enhanced) != 0)
                abort();
        }
        if (w == SMTP_REPLY_NEED_MORE && p != SMTP_REPLY_NEED_MORE)
            abort();
        if (w == SMTP_REPLY_ERROR && p != SMTP_REPLY_ERROR && p != SMTP_REPLY_NEED_MORE)
            abort();

        if (w <= 0)
            break;
        pos += (size_t)w;
    }
    return 0;
}
