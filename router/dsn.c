/*
 * dsn: delivery status notifications (see dsn.h for the contract).
 *
 * Layout of this file: input checks; small writers (dates, addresses,
 * sanitised and folded text); the three parts; the boundary and assembly;
 * dsn_should_bounce() with its Content-Type reader.
 *
 * Nothing here reads a clock or does I/O. Every input octet that ends up in
 * a header field or in parts 1 and 2 is either checked (ids, host names and
 * addresses hold no control characters) or passes through a sanitiser that
 * keeps printable ASCII only, so no input can end a field, a part or the
 * header section early. Part 3 copies the original and only normalises line ends
 * and over-long lines.
 */
#include "router/dsn.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "lib/buf.h"
#include "lib/xmalloc.h"

/* RFC 5322 section 2.1.1: a line MUST be at most 998 octets without its
 * CRLF and SHOULD be at most 78. Text is wrapped at 76 so that quoting by
 * a mail reader still fits. */
#define LINE_HARD 998
#define LINE_SOFT 78
#define TEXT_WIDTH 76

#define HOST_MAX 253
/* 9999-12-31T23:59:59.999Z: RFC 5322 years have four digits here. */
#define TIME_MAX INT64_C(253402300799999)
#define MS_DAY INT64_C(86400000)

/* Bytes of the queue id that go into the boundary (see make_boundary). */
#define BOUNDARY_ID_MAX 40
#define BOUNDARY_TRIES 16

/* The longest Content-Type value dsn_should_bounce() looks at. */
#define CTYPE_MAX 16384

/* ---- Errors and input checks ------------------------------------------- */

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err != NULL && errlen > 0) {
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static int is_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

static int valid_queue_id(const char *s)
{
    size_t n;

    if (s == NULL)
        return 0;
    n = strlen(s);
    if (n == 0 || n > DSN_QUEUE_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!is_alnum(c) && c != '.' && c != '_' && c != '-')
            return 0;
    }
    return 1;
}

/* A host name as it may appear in a dot-atom domain and after "dns;". '_'
 * is tolerated because it occurs in real host names. */
static int valid_host(const char *s)
{
    size_t n;

    if (s == NULL)
        return 0;
    n = strlen(s);
    if (n == 0 || n > HOST_MAX || s[0] == '.' || s[n - 1] == '.')
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!is_alnum(c) && c != '.' && c != '-' && c != '_')
            return 0;
        if (c == '.' && s[i + 1] == '.')
            return 0;
    }
    return 1;
}

/*
 * Decodes the well-formed UTF-8 sequence at p[0..n) (RFC 3629 section 4:
 * no overlong forms, no surrogates, nothing above U+10FFFF). Returns its
 * length with the code point in *cp, or 0 when it is not well-formed.
 */
static size_t utf8_decode(const unsigned char *p, size_t n, uint32_t *cp)
{
    uint32_t c;
    size_t len;

    if (n == 0)
        return 0;
    if (p[0] < 0x80) {
        *cp = p[0];
        return 1;
    }
    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        len = 2;
        c = p[0] & 0x1f;
    } else if (p[0] >= 0xe0 && p[0] <= 0xef) {
        len = 3;
        c = p[0] & 0x0f;
    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        len = 4;
        c = p[0] & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        c = (c << 6) | (p[i] & 0x3f);
    }
    if ((len == 3 && c < 0x800) || (len == 4 && c < 0x10000) || c > 0x10ffff ||
        (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

/*
 * An envelope address as the gateway stores it: 1..DSN_ADDR_MAX octets, no
 * control characters, well-formed UTF-8 (RFC 6531). need_at asks for a
 * domain part (a reverse-path always has one; the recipient "Postmaster"
 * may not, RFC 5321 section 4.1.1.3). Sets *nonascii.
 */
static const char *check_addr(const char *a, int need_at, int *nonascii)
{
    const unsigned char *p = (const unsigned char *)a;
    size_t n, i = 0;
    const char *at;

    *nonascii = 0;
    if (a == NULL || *a == '\0')
        return "empty";
    n = strlen(a);
    if (n > DSN_ADDR_MAX)
        return "too long";
    while (i < n) {
        uint32_t cp;
        size_t k;

        if (p[i] < 0x20 || p[i] == 0x7f)
            return "control character";
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        k = utf8_decode(p + i, n - i, &cp);
        if (k == 0)
            return "invalid UTF-8";
        *nonascii = 1;
        i += k;
    }
    if (need_at) {
        at = strrchr(a, '@');
        if (at == NULL || at == a || at[1] == '\0')
            return "no domain";
    }
    return NULL;
}

/* RFC 3463 section 2: class "." subject "." detail, subject and detail of
 * one to three digits. Returns the class (2, 4 or 5) or 0. */
static int enhanced_class(const char *s)
{
    size_t i = 0, k;

    if (s == NULL || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.')
        return 0;
    i = 2;
    for (int part = 0; part < 2; part++) {
        for (k = 0; s[i + k] >= '0' && s[i + k] <= '9'; k++)
            if (k == 3)
                return 0;
        if (k == 0)
            return 0;
        i += k;
        if (part == 0) {
            if (s[i] != '.')
                return 0;
            i++;
        }
    }
    return s[i] == '\0' ? s[0] - '0' : 0;
}

/* The Status field of one recipient; the rules are stated in dsn.h. */
static const char *rcpt_status(const struct dsn_rcpt *r, int expired)
{
    int cls = enhanced_class(r->enhanced);
    int rc = r->code / 100;

    if ((cls == 4 || cls == 5) && (r->code == 0 || rc == cls))
        return r->enhanced;
    if (rc == 5)
        return "5.0.0";
    if (expired)
        return "4.4.7";
    return rc == 4 ? "4.0.0" : "5.0.0";
}

/* ---- Writers ------------------------------------------------------------ */

/* RFC 5322 section 3.3 date-time in UTC ("Thu, 01 Jan 1970 00:00:00 +0000").
 * ms must be within 0..TIME_MAX. The civil date comes from the day count
 * with H. Hinnant's days-to-civil algorithm, so no time_t or TZ is used. */
static void put_date(struct buf *b, int64_t ms)
{
    static const char *const wday[7] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const mon[12] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                        "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    int64_t days = ms / MS_DAY;
    int64_t secs = (ms % MS_DAY) / 1000;
    int64_t z = days + 719468;
    int64_t era = z / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t d = doy - (153 * mp + 2) / 5 + 1;
    int64_t m = mp < 10 ? mp + 3 : mp - 9;
    int64_t y = yoe + era * 400 + (m <= 2);

    buf_appendf(b, "%s, %02d %s %04d %02d:%02d:%02d +0000", wday[(days + 4) % 7], (int)d,
                mon[m - 1], (int)y, (int)(secs / 3600), (int)(secs / 60 % 60), (int)(secs % 60));
}

static int time_ok(int64_t ms)
{
    return ms >= 0 && ms <= TIME_MAX;
}

/*
 * Appends an address for Final-Recipient and for the text part. An ASCII
 * address is written as it is (type rfc822); a non-ASCII one in the
 * utf-8-addr-xtext form of RFC 6533 section 3 (type utf-8): QCHARs as they
 * are, every other character as "\x{HEXPOINT}" in upper-case hex without
 * leading zeros. The address was checked by check_addr().
 */
static void put_addr(struct buf *b, const char *a, int nonascii)
{
    const unsigned char *p = (const unsigned char *)a;
    size_t n = strlen(a), i = 0;

    if (!nonascii) {
        buf_append(b, a, n);
        return;
    }
    while (i < n) {
        uint32_t cp = 0;
        size_t k = utf8_decode(p + i, n - i, &cp);

        if (k == 0) {           /* cannot happen after check_addr() */
            cp = 0xfffd;
            k = 1;
        }
        if (cp > 0x20 && cp < 0x7f && cp != '\\' && cp != '+' && cp != '=')
            buf_append(b, p + i, 1);
        else
            buf_appendf(b, "\\x{%" PRIX32 "}", cp);
        i += k;
    }
}

/*
 * Appends s[0..n) reduced to printable ASCII: a tab becomes a space, every
 * other octet outside 0x20..0x7e (line ends included) a '?'.
 */
static void put_sanitized(struct buf *b, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char o = c == '\t' ? ' ' : (c >= 0x20 && c < 0x7f) ? (char)c : '?';
        buf_append(b, &o, 1);
    }
}

/*
 * Appends the words of s[0..n) (printable ASCII; runs of spaces separate
 * words and are written as one) to a line that already holds col octets.
 * Before a word that would take the line past soft, the line is broken
 * with CRLF and the next one starts with cont; a word that does not fit in
 * hard octets even so is cut. For a header field cont is " ": the break
 * then is a fold (RFC 5322 section 2.2.3) that unfolds to the same text,
 * except after a cut, where unfolding adds a space. The caller ends the
 * last line.
 */
static void put_words(struct buf *b, size_t col, const char *s, size_t n, const char *cont,
                      size_t soft, size_t hard)
{
    size_t contlen = strlen(cont);
    size_t i = 0;
    int placed = 0;

    while (i < n) {
        size_t start, wl;

        while (i < n && s[i] == ' ')
            i++;
        if (i == n)
            break;
        start = i;
        while (i < n && s[i] != ' ')
            i++;
        wl = i - start;
        if (placed && col + 1 + wl > soft) {
            buf_append(b, "\r\n", 2);
            buf_append(b, cont, contlen);
            col = contlen;
            placed = 0;
        }
        if (placed) {
            buf_append(b, " ", 1);
            col++;
        }
        while (wl > 0) {
            size_t room = hard > col ? hard - col : 0, k;

            if (room == 0) {
                buf_append(b, "\r\n", 2);
                buf_append(b, cont, contlen);
                col = contlen;
                room = hard - col;
            }
            k = wl < room ? wl : room;
            buf_append(b, s + start, k);
            col += k;
            start += k;
            wl -= k;
        }
        placed = 1;
    }
}

/* Appends "Name: value" with value folded at spaces, and the CRLF. */
static void put_field(struct buf *b, const char *name, const char *value, size_t n)
{
    size_t col = strlen(name) + 2;

    buf_appends(b, name);
    buf_append(b, ": ", 2);
    put_words(b, col, value, n, " ", LINE_SOFT, LINE_HARD);
    buf_append(b, "\r\n", 2);
}

/* Appends one paragraph of part 1, wrapped at TEXT_WIDTH, and its CRLF. */
static void put_para(struct buf *b, const char *s, size_t n, size_t col, const char *cont)
{
    put_words(b, col, s, n, cont, TEXT_WIDTH, TEXT_WIDTH);
    buf_append(b, "\r\n", 2);
}

/*
 * Splits the diagnostic text into its lines (CRLF, LF or CR end a line;
 * empty lines are dropped) after cutting it to DSN_DIAG_MAX octets, and
 * appends each sanitised line to lines, separated by '\n'. Returns the
 * number of lines.
 */
static size_t diag_lines(const char *diag, struct buf *lines)
{
    size_t n = diag ? strnlen(diag, DSN_DIAG_MAX) : 0;
    size_t i = 0, count = 0;

    while (i < n) {
        size_t j = i;

        while (j < n && diag[j] != '\r' && diag[j] != '\n')
            j++;
        if (j > i) {
            if (count++ > 0)
                buf_append(lines, "\n", 1);
            put_sanitized(lines, diag + i, j - i);
        }
        i = j < n ? j + 1 : j;
    }
    return count;
}

/* ---- The parts ---------------------------------------------------------- */

/* The recipient's diagnostic pieces, computed once for parts 1 and 2. */
struct rcpt_info {
    int nonascii;
    const char *status;
    const char *enhanced;       /* well-formed enhanced code of the reply, or NULL */
    struct buf lines;           /* sanitised reply lines joined by '\n' */
    size_t nlines;
    struct buf remote;          /* sanitised remote MTA, empty when unknown */
};

/* Part 1: text/plain for people (RFC 6522 section 3). */
static void part_text(struct buf *b, const struct dsn_input *in, const struct rcpt_info *info,
                      int expired)
{
    struct buf t = BUF_INIT;

    buf_appends(b, "Content-Description: Notification\r\n"
                   "Content-Type: text/plain; charset=us-ascii\r\n"
                   "\r\n");
    buf_appendf(&t, "This is the mail delivery system at %s.", in->reporting_mta);
    put_para(b, t.data, t.len, 0, "");
    buf_append(b, "\r\n", 2);
    buf_reset(&t);
    buf_appends(&t, "Your message could not be delivered to one or more of its recipients. ");
    if (expired)
        buf_appends(&t, "Delivery was retried until the message expired from the queue; "
                        "the last attempt for each recipient is shown below. ");
    else
        buf_appends(&t, "The reason for each recipient is shown below. ");
    buf_appends(&t, in->return_full ? "Your message is attached in full."
                                    : "The header section of your message is attached.");
    put_para(b, t.data, t.len, 0, "");

    for (size_t i = 0; i < in->nrcpts; i++) {
        const struct dsn_rcpt *r = &in->rcpts[i];
        const struct rcpt_info *ri = &info[i];
        const char *line = ri->lines.data ? ri->lines.data : "";
        const char *nl = strchr(line, '\n');
        size_t first = nl ? (size_t)(nl - line) : strlen(line);

        buf_append(b, "\r\n", 2);
        buf_reset(&t);
        buf_append(&t, "<", 1);
        put_addr(&t, r->rcpt, ri->nonascii);
        buf_append(&t, ">:", 2);
        if (ri->remote.len > 0) {
            buf_appends(&t, " host ");
            buf_append(&t, ri->remote.data, ri->remote.len);
            buf_appends(&t, " said:");
        }
        if (r->code != 0)
            buf_appendf(&t, " %d", r->code);
        if (r->code != 0 && ri->enhanced != NULL)
            buf_appendf(&t, " %s", ri->enhanced);
        if (first > 0) {
            buf_append(&t, " ", 1);
            buf_append(&t, line, first);
        } else if (r->code == 0) {
            buf_appends(&t, expired ? " delivery time expired" : " delivery failed");
        }
        put_para(b, t.data, t.len, 0, "    ");
        /* The further lines of a multi-line reply, indented. */
        while (nl != NULL) {
            const char *s = nl + 1;
            nl = strchr(s, '\n');
            buf_append(b, "    ", 4);
            put_para(b, s, nl ? (size_t)(nl - s) : strlen(s), 4, "    ");
        }
    }
    buf_free(&t);
}

/* Part 2: message/delivery-status (RFC 3464 section 2). */
static void part_status(struct buf *b, const struct dsn_input *in, const struct rcpt_info *info)
{
    struct buf v = BUF_INIT;

    buf_appends(b, "Content-Description: Delivery report\r\n"
                   "Content-Type: message/delivery-status\r\n"
                   "\r\n");
    /* Per-message fields, RFC 3464 section 2.2. */
    buf_appendf(b, "Reporting-MTA: dns; %s\r\n", in->reporting_mta);
    buf_appendf(b, "X-Mailferry-Queue-ID: %s\r\n", in->queue_id);
    if (in->arrival_ms > 0) {
        buf_appends(b, "Arrival-Date: ");
        put_date(b, in->arrival_ms);
        buf_append(b, "\r\n", 2);
    }
    /* Per-recipient fields, RFC 3464 section 2.3, each group after a blank
     * line. */
    for (size_t i = 0; i < in->nrcpts; i++) {
        const struct dsn_rcpt *r = &in->rcpts[i];
        const struct rcpt_info *ri = &info[i];

        buf_append(b, "\r\n", 2);
        buf_reset(&v);
        buf_appends(&v, ri->nonascii ? "utf-8; " : "rfc822; ");
        put_addr(&v, r->rcpt, ri->nonascii);
        /* An address fits on one line, except a non-ASCII one whose xtext
         * form (up to six octets per octet) is too long; only that one is
         * cut by put_field(). */
        if (v.len + sizeof("Final-Recipient: ") - 1 <= LINE_HARD)
            buf_appendf(b, "Final-Recipient: %s\r\n", v.data);
        else
            put_field(b, "Final-Recipient", v.data, v.len);
        buf_appends(b, "Action: failed\r\n");
        buf_appendf(b, "Status: %s\r\n", ri->status);
        if (ri->remote.len > 0) {
            buf_reset(&v);
            buf_appends(&v, "dns; ");
            buf_append(&v, ri->remote.data, ri->remote.len);
            put_field(b, "Remote-MTA", v.data, v.len);
        }
        if (r->code != 0 || ri->nlines > 0) {
            buf_reset(&v);
            /* RFC 3464 section 2.3.6: "smtp" carries the SMTP reply;
             * without one the text is our own, under an X- type. */
            if (r->code != 0)
                buf_appendf(&v, "smtp; %d", r->code);
            else
                buf_appends(&v, "X-mailferry;");
            if (r->code != 0 && ri->enhanced != NULL)
                buf_appendf(&v, " %s", ri->enhanced);
            if (ri->nlines > 0) {
                size_t start = v.len;
                buf_append(&v, " ", 1);
                buf_append(&v, ri->lines.data, ri->lines.len);
                for (size_t k = start; k < v.len; k++)
                    if (v.data[k] == '\n')
                        v.data[k] = ' ';
            }
            put_field(b, "Diagnostic-Code", v.data, v.len);
        }
        if (r->last_attempt_ms > 0) {
            buf_appends(b, "Last-Attempt-Date: ");
            put_date(b, r->last_attempt_ms);
            buf_append(b, "\r\n", 2);
        }
    }
    buf_free(&v);
}

/*
 * Appends one line of the original, p[0..n) without its line end, split so
 * that no output line exceeds LINE_HARD octets. In the header section a
 * split is a fold: before the last space or tab that keeps the line short
 * enough, else (no such blank) a cut followed by CRLF SP. In the body a
 * split is a plain CRLF. The caller ends the last piece.
 */
static void put_orig_line(struct buf *b, const char *p, size_t n, int header)
{
    size_t pre = 0;

    while (pre + n > LINE_HARD) {
        size_t room = LINE_HARD - pre;
        size_t k = 0;

        if (header)
            for (k = room; k > 0; k--)
                if (p[k] == ' ' || p[k] == '\t')
                    break;
        if (k > 0) {
            buf_append(b, p, k);
            buf_append(b, "\r\n", 2);
            pre = 0;
        } else {
            k = room;
            buf_append(b, p, k);
            buf_append(b, "\r\n", 2);
            if (header) {
                buf_append(b, " ", 1);
                pre = 1;
            } else {
                pre = 0;
            }
        }
        p += k;
        n -= k;
    }
    buf_append(b, p, n);
}

/*
 * Appends the original message, or only its header section (the lines up
 * to the first empty one, without it), with every line ended by CRLF: a
 * bare LF or bare CR in the original is a line end too, so the part never
 * holds a bare CR or LF that a relay would reject or rewrite (RFC 5321
 * section 2.3.8). A last line without a line end gets one.
 */
static void put_original(struct buf *b, const char *p, size_t n, int full)
{
    size_t i = 0;
    int header = 1;

    while (i < n) {
        size_t j = i, next;

        while (j < n && p[j] != '\r' && p[j] != '\n')
            j++;
        if (j == n)
            next = n;
        else if (p[j] == '\r' && j + 1 < n && p[j + 1] == '\n')
            next = j + 2;
        else
            next = j + 1;
        if (header && j == i) {
            if (!full)
                return;
            header = 0;
        } else {
            put_orig_line(b, p + i, j - i, header);
        }
        buf_append(b, "\r\n", 2);
        i = next;
    }
}

/* The length of the header section: up to the first empty line. */
static size_t header_len(const char *p, size_t n)
{
    size_t i = 0;

    while (i < n) {
        size_t j = i;

        while (j < n && p[j] != '\r' && p[j] != '\n')
            j++;
        if (j == i)
            return i;
        if (j == n)
            return n;
        i = (p[j] == '\r' && j + 1 < n && p[j + 1] == '\n') ? j + 2 : j + 1;
    }
    return n;
}

static int has_8bit(const char *p, size_t n, int nul_too)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x80 || (nul_too && c == 0))
            return 1;
    }
    return 0;
}

/* Part 3: the original's header section or the whole of it (RFC 6522
 * section 3, RFC 6533 section 3, RFC 6532 section 3.7). Returns 1 when
 * the part is 8-bit. */
static int part_original(struct buf *b, const struct dsn_input *in)
{
    const char *p = in->orig_len > 0 ? in->orig_data : "";
    size_t n = in->orig_len;
    size_t hl = header_len(p, n);
    int utf8_headers = has_8bit(p, hl, 0);
    int eight = has_8bit(p, in->return_full ? n : hl, 1);

    if (in->return_full)
        buf_appendf(b, "Content-Description: Undelivered Message\r\n"
                       "Content-Type: %s\r\n",
                    utf8_headers ? "message/global" : "message/rfc822");
    else
        buf_appendf(b, "Content-Description: Undelivered Message Headers\r\n"
                       "Content-Type: %s\r\n",
                    utf8_headers ? "message/global-headers" : "text/rfc822-headers");
    if (eight)
        buf_appends(b, "Content-Transfer-Encoding: 8bit\r\n");
    buf_append(b, "\r\n", 2);
    put_original(b, p, n, in->return_full);
    return eight;
}

/* ---- Boundary and assembly --------------------------------------------- */

static uint64_t fnv1a(uint64_t h, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

/* splitmix64's finaliser: spreads the attempt number over all bits. */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    x ^= x >> 31;
    return x;
}

/*
 * Picks a boundary (RFC 2046 section 5.1.1: 1..70 bchars, here 62 at most)
 * that occurs in none of the pieces. It is derived from the queue id and a
 * hash of the content, so output stays deterministic, and the content
 * cannot be crafted to contain it without knowing it. The only '=' in it is
 * the first octet, so an occurrence cannot overlap another one or the
 * "--" around the delimiters. Returns 0, or -1 when every try collided.
 */
static int make_boundary(char *out, size_t outlen, const char *qid, struct buf *const *pieces,
                         size_t npieces)
{
    char id[BOUNDARY_ID_MAX + 1];
    size_t k = 0;
    uint64_t h = UINT64_C(0xcbf29ce484222325);

    for (size_t i = 0; qid[i] != '\0' && k < BOUNDARY_ID_MAX; i++)
        if (is_alnum((unsigned char)qid[i]))
            id[k++] = qid[i];
    id[k] = '\0';
    for (size_t i = 0; i < npieces; i++)
        h = fnv1a(h, pieces[i]->data ? pieces[i]->data : "", pieces[i]->len);
    for (uint64_t t = 0; t < BOUNDARY_TRIES; t++) {
        int clash = 0;

        snprintf(out, outlen, "=_mf_%s_%016" PRIx64, id,
                 mix64(h + t * UINT64_C(0x9e3779b97f4a7c15)));
        for (size_t i = 0; i < npieces && !clash; i++)
            clash = pieces[i]->len > 0 &&
                    memmem(pieces[i]->data, pieces[i]->len, out, strlen(out)) != NULL;
        if (!clash)
            return 0;
    }
    return -1;
}

static int check_input(const struct dsn_input *in, int *expired, char *err, size_t errlen)
{
    const char *why;
    int nonascii;

    if (!valid_queue_id(in->queue_id))
        return fail(err, errlen, "invalid queue id");
    if (!valid_host(in->reporting_mta))
        return fail(err, errlen, "invalid reporting MTA host name");
    if (in->envelope_from == NULL || in->envelope_from[0] == '\0' ||
        strcmp(in->envelope_from, "<>") == 0)
        return fail(err, errlen, "null sender: no DSN for a DSN");
    if ((why = check_addr(in->envelope_from, 1, &nonascii)) != NULL)
        return fail(err, errlen, "invalid envelope sender: %s", why);
    if (in->orig_len > 0 && in->orig_data == NULL)
        return fail(err, errlen, "original message missing");
    if (in->nrcpts == 0 || in->rcpts == NULL)
        return fail(err, errlen, "no recipients");
    if (!time_ok(in->now_ms))
        return fail(err, errlen, "current time out of range");
    if (in->arrival_ms > 0 && !time_ok(in->arrival_ms))
        return fail(err, errlen, "arrival time out of range");
    if (in->reason == NULL)
        *expired = 0;
    else if (strcmp(in->reason, "expired") == 0)
        *expired = 1;
    else
        return fail(err, errlen, "unknown reason");
    for (size_t i = 0; i < in->nrcpts; i++) {
        const struct dsn_rcpt *r = &in->rcpts[i];

        if ((why = check_addr(r->rcpt, 0, &nonascii)) != NULL)
            return fail(err, errlen, "recipient %zu: invalid address: %s", i, why);
        if (r->action != NULL && strcmp(r->action, "failed") != 0)
            return fail(err, errlen, "recipient %zu: unsupported action", i);
        if (r->code != 0 && (r->code < 400 || r->code > 599))
            return fail(err, errlen, "recipient %zu: reply code out of range", i);
        if (r->last_attempt_ms > 0 && !time_ok(r->last_attempt_ms))
            return fail(err, errlen, "recipient %zu: attempt time out of range", i);
    }
    return 0;
}

int dsn_build(const struct dsn_input *in, struct buf *out, char *err, size_t errlen)
{
    struct buf head = BUF_INIT, p1 = BUF_INIT, p2 = BUF_INIT, p3 = BUF_INIT;
    struct buf *pieces[4] = {&head, &p1, &p2, &p3};
    struct rcpt_info *info;
    char boundary[80];
    int expired = 0, eight, rc = 0;

    if (in == NULL || out == NULL)
        return fail(err, errlen, "no input");
    if (check_input(in, &expired, err, errlen) < 0)
        return -1;

    info = xcalloc(in->nrcpts, sizeof(*info));
    for (size_t i = 0; i < in->nrcpts; i++) {
        const struct dsn_rcpt *r = &in->rcpts[i];
        struct rcpt_info *ri = &info[i];

        check_addr(r->rcpt, 0, &ri->nonascii);
        ri->status = rcpt_status(r, expired);
        ri->enhanced = enhanced_class(r->enhanced) ? r->enhanced : NULL;
        buf_init(&ri->lines);
        ri->nlines = diag_lines(r->diagnostic, &ri->lines);
        buf_init(&ri->remote);
        if (r->remote_mta != NULL)
            put_sanitized(&ri->remote, r->remote_mta, strnlen(r->remote_mta, DSN_DIAG_MAX));
    }

    /* The header section, RFC 5322 section 3.6, without Content-Type. */
    buf_appendf(&head, "From: \"Mail Delivery System\" <MAILER-DAEMON@%s>\r\n", in->reporting_mta);
    buf_appendf(&head, "To: <%s>\r\n", in->envelope_from);
    buf_appends(&head, "Subject: Undelivered Mail Returned to Sender\r\n");
    buf_appends(&head, "Date: ");
    put_date(&head, in->now_ms);
    buf_append(&head, "\r\n", 2);
    buf_appendf(&head, "Message-ID: <%s.dsn.%" PRId64 "@%s>\r\n", in->queue_id, in->now_ms,
                in->reporting_mta);
    /* RFC 3834 section 5: a response sent automatically to a message. */
    buf_appends(&head, "Auto-Submitted: auto-replied\r\n");
    buf_appends(&head, "MIME-Version: 1.0\r\n");

    part_text(&p1, in, info, expired);
    part_status(&p2, in, info);
    eight = part_original(&p3, in);

    if (make_boundary(boundary, sizeof(boundary), in->queue_id, pieces, 4) < 0) {
        rc = fail(err, errlen, "no boundary found");
        goto done;
    }
    buf_append(out, head.data, head.len);
    buf_appendf(out, "Content-Type: multipart/report; report-type=delivery-status;\r\n"
                     "\tboundary=\"%s\"\r\n", boundary);
    /* RFC 2045 section 6.4: a multipart holding an 8bit part is 8bit. */
    if (eight)
        buf_appends(out, "Content-Transfer-Encoding: 8bit\r\n");
    buf_appends(out, "\r\n"
                     "This is a MIME-encapsulated message.\r\n");
    /* RFC 2046 section 5.1.1: the CRLF before "--" belongs to the
     * delimiter, so each part's own last CRLF stays part of the part. */
    buf_appendf(out, "\r\n--%s\r\n", boundary);
    buf_append(out, p1.data, p1.len);
    buf_appendf(out, "\r\n--%s\r\n", boundary);
    buf_append(out, p2.data, p2.len);
    buf_appendf(out, "\r\n--%s\r\n", boundary);
    buf_append(out, p3.data, p3.len);
    buf_appendf(out, "\r\n--%s--\r\n", boundary);

done:
    for (size_t i = 0; i < in->nrcpts; i++) {
        buf_free(&info[i].lines);
        buf_free(&info[i].remote);
    }
    free(info);
    for (size_t i = 0; i < 4; i++)
        buf_free(pieces[i]);
    return rc;
}

/* ---- Is this message itself a DSN? -------------------------------------- */

/* Skips CFWS (RFC 5322 section 3.2.2): blanks and nested comments with
 * quoted pairs. An unclosed comment runs to the end. */
static size_t skip_cfws(const char *s, size_t n, size_t i)
{
    for (;;) {
        while (i < n && (s[i] == ' ' || s[i] == '\t'))
            i++;
        if (i < n && s[i] == '(') {
            int depth = 0;
            while (i < n) {
                if (s[i] == '\\' && i + 1 < n)
                    i++;
                else if (s[i] == '(')
                    depth++;
                else if (s[i] == ')' && --depth == 0) {
                    i++;
                    break;
                }
                i++;
            }
            continue;
        }
        return i;
    }
}

/* RFC 2045 section 5.1: token := 1*<any CHAR except SPACE, CTLs or
 * tspecials>. Returns the index after the token. */
static size_t skip_token(const char *s, size_t n, size_t i)
{
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c >= 0x7f || strchr("()<>@,;:\\\"/[]?=", c) != NULL)
            break;
        i++;
    }
    return i;
}

static int token_is(const char *s, size_t a, size_t b, const char *word)
{
    return b - a == strlen(word) && strncasecmp(s + a, word, b - a) == 0;
}

/*
 * Whether a Content-Type value (unfolded) is multipart/report with
 * report-type delivery-status or global-delivery-status (RFC 6522 section
 * 3, RFC 6533 section 6). Parameter values may be tokens or quoted
 * strings; anything unparsable ends the scan with "no".
 */
static int ctype_is_dsn(const char *s, size_t n)
{
    size_t i = skip_cfws(s, n, 0), a;

    a = i;
    i = skip_token(s, n, i);
    if (!token_is(s, a, i, "multipart"))
        return 0;
    i = skip_cfws(s, n, i);
    if (i >= n || s[i] != '/')
        return 0;
    i = skip_cfws(s, n, i + 1);
    a = i;
    i = skip_token(s, n, i);
    if (!token_is(s, a, i, "report"))
        return 0;
    for (;;) {
        char val[64];
        size_t vl = 0, an, ae;

        i = skip_cfws(s, n, i);
        if (i >= n || s[i] != ';')
            return 0;
        i = skip_cfws(s, n, i + 1);
        an = i;
        i = skip_token(s, n, i);
        ae = i;
        if (ae == an)
            continue;           /* an empty parameter, as in "; ;" */
        i = skip_cfws(s, n, i);
        if (i >= n || s[i] != '=')
            return 0;
        i = skip_cfws(s, n, i + 1);
        if (i < n && s[i] == '"') {
            for (i++; i < n && s[i] != '"'; i++) {
                if (s[i] == '\\' && i + 1 < n)
                    i++;
                if (vl < sizeof(val) - 1)
                    val[vl++] = s[i];
            }
            if (i >= n)
                return 0;
            i++;
        } else {
            size_t vs = i;
            i = skip_token(s, n, i);
            if (i == vs)
                return 0;
            vl = i - vs < sizeof(val) - 1 ? i - vs : sizeof(val) - 1;
            memcpy(val, s + vs, vl);
        }
        val[vl] = '\0';
        if (token_is(s, an, ae, "report-type"))
            return strcasecmp(val, "delivery-status") == 0 ||
                   strcasecmp(val, "global-delivery-status") == 0;
    }
}

/* Walks the header section of p[0..n) and reports whether a Content-Type
 * field marks the message as a DSN. Fields are unfolded by dropping line
 * ends (RFC 5322 section 2.2.3); bare LF and CR end lines as well. */
static int is_dsn(const char *p, size_t n)
{
    struct buf v = BUF_INIT;
    size_t i = 0;
    int in_ctype = 0, found = 0;

    while (i <= n && !found) {
        size_t j = i, next;
        int end = i == n;

        while (j < n && p[j] != '\r' && p[j] != '\n')
            j++;
        if (j == n)
            next = n;
        else
            next = (p[j] == '\r' && j + 1 < n && p[j + 1] == '\n') ? j + 2 : j + 1;
        end = end || j == i;
        if (!end && (p[i] == ' ' || p[i] == '\t')) {
            if (in_ctype && v.len + (j - i) <= CTYPE_MAX)
                buf_append(&v, p + i, j - i);
            i = next;
            continue;
        }
        /* A new field (or the end): judge the Content-Type before it. */
        if (in_ctype)
            found = ctype_is_dsn(v.data ? v.data : "", v.len);
        in_ctype = 0;
        if (end)
            break;
        buf_reset(&v);
        {
            const char *colon = memchr(p + i, ':', j - i);
            if (colon != NULL) {
                size_t nl = (size_t)(colon - (p + i));
                while (nl > 0 && (p[i + nl - 1] == ' ' || p[i + nl - 1] == '\t'))
                    nl--;
                if (nl == 12 && strncasecmp(p + i, "Content-Type", 12) == 0) {
                    size_t vl = (size_t)(p + j - colon - 1);
                    in_ctype = 1;
                    buf_append(&v, colon + 1, vl <= CTYPE_MAX ? vl : CTYPE_MAX);
                }
            }
        }
        i = next;
    }
    buf_free(&v);
    return found;
}

int dsn_should_bounce(const char *envelope_from, const char *orig, size_t len)
{
    if (envelope_from == NULL || envelope_from[0] == '\0' || strcmp(envelope_from, "<>") == 0)
        return 0;
    if (len > 0 && orig != NULL && is_dsn(orig, len))
        return 0;
    return 1;
}
