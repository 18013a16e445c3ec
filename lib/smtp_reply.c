/*
 * smtp_reply: parsing of SMTP replies on the client side.
 *
 * RFC 5321 section 4.2: a reply is one or more lines "xyz-text" ending
 * with a line "xyz text" (or "xyz" alone, section 4.2.1 allows the text to
 * be empty); every line of one reply carries the same code. The parser
 * works on whatever bytes have arrived: it scans the lines present, checks
 * each one as far as it goes (so garbage is reported as soon as it is
 * seen, not only once a line end arrives) and returns a reply only when
 * its last line is complete. It keeps no state between calls: a reply is
 * at most SMTP_REPLY_LINES_MAX lines of SMTP_REPLY_LINE_MAX octets, so
 * scanning it again when more bytes arrive is cheap and bounded.
 */
#include "lib/smtp_reply.h"

#include <string.h>
#include <strings.h>

/* The code of a reply line: three digits, the first 2..5 (RFC 5321
 * section 4.2: 1yz is not used by SMTP). The second and third digits are
 * any digit, to be lenient with servers using private codes. */
static int reply_digit_ok(size_t pos, char c)
{
    if (pos == 0)
        return c >= '2' && c <= '5';
    return c >= '0' && c <= '9';
}

/*
 * Finds the end of the line starting at p (avail bytes present). Returns 1
 * with *linelen (without terminator) and *termlen (1 for LF, 2 for CRLF)
 * when a complete line is there, 0 when more bytes are needed, -1 when the
 * line exceeds SMTP_REPLY_LINE_MAX. A line that cannot end within the
 * limit any more is an error at once, so that the verdict for a prefix of
 * the input never contradicts the verdict for the whole.
 */
static int reply_line_end(const char *p, size_t avail, size_t *linelen, size_t *termlen)
{
    size_t lim = avail < SMTP_REPLY_LINE_MAX + 2 ? avail : SMTP_REPLY_LINE_MAX + 2;
    const char *lf = memchr(p, '\n', lim);

    if (lf != NULL) {
        size_t i = (size_t)(lf - p);

        if (i > 0 && p[i - 1] == '\r') {
            *linelen = i - 1;
            *termlen = 2;
        } else {
            *linelen = i;
            *termlen = 1;
        }
        return *linelen <= SMTP_REPLY_LINE_MAX ? 1 : -1;
    }
    /* No LF yet: the line can still end in time only when at most
     * SMTP_REPLY_LINE_MAX octets are present, or one more that is the CR of
     * the terminator. */
    if (avail > SMTP_REPLY_LINE_MAX + 1)
        return -1;
    if (avail == SMTP_REPLY_LINE_MAX + 1 && p[SMTP_REPLY_LINE_MAX] != '\r')
        return -1;
    return 0;
}

/*
 * Checks the first n octets of a line that has not ended yet: the digits
 * and the separator must be right as far as they go. A CR right after the
 * code may still be the start of the CRLF that ends a line "250".
 */
static int reply_prefix_ok(const char *p, size_t n, int code)
{
    size_t i;

    for (i = 0; i < n && i < 3; i++) {
        if (!reply_digit_ok(i, p[i]))
            return 0;
        if (code > 0 && p[i] != "0123456789"[(code / (i == 0 ? 100 : i == 1 ? 10 : 1)) % 10])
            return 0;
    }
    if (n > 3 && p[3] != ' ' && p[3] != '-' && !(p[3] == '\r' && n == 4))
        return 0;
    return 1;
}

/*
 * RFC 3463 section 2 and RFC 2034 section 4: an enhanced status code is
 * "class.subject.detail", class one digit (2, 4 or 5, the same as the
 * reply's class), subject and detail one to three digits, followed by a
 * space or the end of the text. Returns its length, or 0 when text does
 * not start with one for this reply class.
 */
static size_t reply_enhanced_len(const char *t, size_t n, int reply_class)
{
    size_t i = 0, part, digits;

    if (reply_class != 2 && reply_class != 4 && reply_class != 5)
        return 0;
    if (n < 5 || t[0] != (char)('0' + reply_class) || t[1] != '.')
        return 0;
    i = 2;
    for (part = 0; part < 2; part++) {
        digits = 0;
        while (i < n && t[i] >= '0' && t[i] <= '9' && digits < 4) {
            i++;
            digits++;
        }
        if (digits == 0 || digits > 3)
            return 0;
        if (part == 0) {
            if (i >= n || t[i] != '.')
                return 0;
            i++;
        }
    }
    if (i < n && t[i] != ' ')
        return 0;
    return i;
}

/* Appends n octets to the joined text, truncating at the buffer's end. */
static void reply_text_add(struct smtp_reply *r, size_t *tlen, const char *s, size_t n)
{
    size_t room = SMTP_REPLY_TEXT_MAX - 1 - *tlen;

    if (n > room)
        n = room;
    memcpy(r->text + *tlen, s, n);
    *tlen += n;
    r->text[*tlen] = '\0';
}

ssize_t smtp_reply_parse(const char *p, size_t len, struct smtp_reply *out)
{
    size_t pos = 0, nlines = 0, tlen = 0;
    int code = 0;

    for (;;) {
        size_t linelen = 0, termlen = 0, tstart, enh = 0;
        int r, last;

        if (pos == len)
            return SMTP_REPLY_NEED_MORE;
        r = reply_line_end(p + pos, len - pos, &linelen, &termlen);
        if (r < 0)
            return SMTP_REPLY_ERROR;
        if (r == 0)
            return reply_prefix_ok(p + pos, len - pos, code) ? SMTP_REPLY_NEED_MORE
                                                             : SMTP_REPLY_ERROR;
        if (linelen < 3 || !reply_prefix_ok(p + pos, linelen, code))
            return SMTP_REPLY_ERROR;
        if (linelen > 3 && p[pos + 3] == '\r')
            return SMTP_REPLY_ERROR;       /* "250\rtext": bare CR after the code */
        if (nlines == SMTP_REPLY_LINES_MAX)
            return SMTP_REPLY_ERROR;
        last = linelen == 3 || p[pos + 3] == ' ';
        if (nlines == 0) {
            code = (p[pos] - '0') * 100 + (p[pos + 1] - '0') * 10 + (p[pos + 2] - '0');
            out->code = code;
            out->enhanced[0] = '\0';
            out->text[0] = '\0';
        }
        tstart = linelen > 3 ? 4 : 3;
        if (nlines == 0) {
            enh = reply_enhanced_len(p + pos + tstart, linelen - tstart, code / 100);
            if (enh > 0) {
                memcpy(out->enhanced, p + pos + tstart, enh);
                out->enhanced[enh] = '\0';
                /* The separating space goes with the code. */
                if (tstart + enh < linelen)
                    enh++;
            }
        } else {
            /* RFC 2034 section 4 repeats the code on every line; the copies
             * of the first line's code are dropped too. */
            size_t e = reply_enhanced_len(p + pos + tstart, linelen - tstart, code / 100);

            if (e > 0 && e == strlen(out->enhanced) &&
                memcmp(p + pos + tstart, out->enhanced, e) == 0)
                enh = tstart + e < linelen ? e + 1 : e;
            reply_text_add(out, &tlen, "\n", 1);
        }
        reply_text_add(out, &tlen, p + pos + tstart + enh, linelen - tstart - enh);
        nlines++;
        pos += linelen + termlen;
        if (last) {
            out->nlines = nlines;
            return (ssize_t)pos;
        }
    }
}

int smtp_reply_has_keyword(const struct smtp_reply *r, const char *keyword, char *params,
                           size_t paramslen)
{
    const char *line = strchr(r->text, '\n');
    size_t klen = strlen(keyword);

    while (line != NULL) {
        const char *end;
        size_t n;

        line++;
        end = strchr(line, '\n');
        n = end != NULL ? (size_t)(end - line) : strlen(line);
        if (n >= klen && strncasecmp(line, keyword, klen) == 0 &&
            (n == klen || line[klen] == ' ')) {
            if (params != NULL && paramslen > 0) {
                size_t off = n > klen ? klen + 1 : klen;
                size_t plen = n - off;

                if (plen > paramslen - 1)
                    plen = paramslen - 1;
                memcpy(params, line + off, plen);
                params[plen] = '\0';
            }
            return 1;
        }
        line = end;
    }
    return 0;
}
