/*
 * smtp_reply: parsing SMTP replies on the client side (RFC 5321 section
 * 4.2, multi-line replies; RFC 3463 / RFC 2034 enhanced status codes).
 *
 * Incremental over a caller-owned buffer, like the server's command
 * framer: smtp_reply_parse() either returns a complete reply (all its
 * lines) with the bytes it used, asks for more, or reports a protocol
 * error. Pure; no allocation except into the caller's struct.
 */
#ifndef MF_SMTP_REPLY_H
#define MF_SMTP_REPLY_H

#include <stddef.h>
#include <sys/types.h>

/* RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets. We
 * accept up to 2048 per line (servers exceed the limit in the wild) and at
 * most 64 lines per reply (EHLO lists). */
#define SMTP_REPLY_LINE_MAX 2048
#define SMTP_REPLY_LINES_MAX 64
#define SMTP_REPLY_TEXT_MAX 4096

struct smtp_reply {
    int code;                        /* 200..599 */
    char enhanced[16];               /* "5.1.1", or "" when absent */
    /* The text of all lines joined with "\n", without codes, enhanced
     * code of the first line removed, truncated to SMTP_REPLY_TEXT_MAX. */
    char text[SMTP_REPLY_TEXT_MAX];
    size_t nlines;
};

enum {
    SMTP_REPLY_NEED_MORE = 0,
    SMTP_REPLY_ERROR = -1,           /* not an SMTP reply: malformed line,
                                        codes differ between lines, too long */
};

/*
 * Parses one complete reply from p[0..len). Lines end with CRLF; a bare LF
 * is accepted as a line end too (lenient as a client, RFC 5321 section
 * 2.3.8 permits it only on receipt). Returns the bytes consumed (> 0) with
 * *out filled, SMTP_REPLY_NEED_MORE, or SMTP_REPLY_ERROR.
 */
ssize_t smtp_reply_parse(const char *p, size_t len, struct smtp_reply *out);

/* The class of a reply: 2 success, 3 intermediate, 4 transient, 5
 * permanent. */
static inline int smtp_reply_class(const struct smtp_reply *r) { return r->code / 100; }

/*
 * For EHLO replies: returns 1 when one of the lines after the first starts
 * with keyword (case-insensitive, followed by space or end), and copies the
 * rest of that line (parameters) into params when non-NULL.
 */
int smtp_reply_has_keyword(const struct smtp_reply *r, const char *keyword, char *params,
                           size_t paramslen);

#endif
