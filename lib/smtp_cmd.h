/*
 * smtp_cmd: framing and parsing of SMTP command lines (RFC 5321 section 4.1).
 *
 * Pure functions over caller-owned bytes; no allocation, no I/O. The server
 * puts what it reads into a buffer and calls smtp_cmd_frame() until it asks
 * for more; each complete line goes to smtp_cmd_parse().
 *
 * Hardening (SMTP smuggling): only CRLF ends a command line. A bare LF or a
 * bare CR is an ordinary byte of the line, which then fails to parse (the
 * verb or its argument holds a control character).
 */
#ifndef MF_SMTP_CMD_H
#define MF_SMTP_CMD_H

#include <stddef.h>
#include <sys/types.h>

/* RFC 5321 section 4.5.3.1.4: a command line is at most 512 octets,
 * counting the verb and the final CRLF. */
#define SMTP_CMD_LINE_MAX 512

enum smtp_cmd_frame_result {
    SMTP_FRAME_NEED_MORE = 0,  /* no CRLF yet; keep the bytes, read more */
    SMTP_FRAME_TOO_LONG = -1,  /* max bytes seen without a CRLF */
};

/*
 * Looks for the first CRLF in p[0..len). When found within max octets
 * (CRLF included), stores the line length without CRLF in *linelen and
 * returns the bytes consumed (linelen + 2). Returns SMTP_FRAME_NEED_MORE
 * when there is no CRLF yet and len < max, SMTP_FRAME_TOO_LONG when the
 * first max bytes hold no CRLF.
 */
ssize_t smtp_cmd_frame(const char *p, size_t len, size_t max, size_t *linelen);

/*
 * Discarding after SMTP_FRAME_TOO_LONG: returns the number of bytes of
 * p[0..len) to drop. *done is set to 1 when they end with the CRLF that
 * closes the overlong line (the caller then answers 500 5.5.2), else 0 (drop
 * them all and keep discarding). *pending_cr carries a CR seen as the last
 * byte of the previous call; initialise it to 0.
 */
size_t smtp_cmd_discard(const char *p, size_t len, int *pending_cr, int *done);

enum smtp_cmd_id {
    SMTP_CMD_UNKNOWN = 0,
    SMTP_CMD_HELO,
    SMTP_CMD_EHLO,
    SMTP_CMD_MAIL,
    SMTP_CMD_RCPT,
    SMTP_CMD_DATA,
    SMTP_CMD_RSET,
    SMTP_CMD_NOOP,
    SMTP_CMD_QUIT,
    SMTP_CMD_VRFY,
    SMTP_CMD_EXPN,
    SMTP_CMD_HELP,
    SMTP_CMD_STARTTLS,
    SMTP_CMD_AUTH,
    SMTP_CMD_BDAT,
    SMTP_CMD__COUNT
};

struct smtp_cmd {
    enum smtp_cmd_id id;
    const char *verb;     /* points into the line */
    size_t verblen;
    /* The argument after the verb with surrounding spaces removed: for
     * MAIL it starts at "FROM:", for RCPT at "TO:". Points into the line;
     * arglen may be 0. */
    const char *arg;
    size_t arglen;
};

/*
 * Parses one command line (without CRLF). The verb is matched case-
 * insensitively (RFC 5321 section 2.4) and must be followed by a space or
 * the end of the line. Returns 0 on success (id may be SMTP_CMD_UNKNOWN for
 * a well-formed but unknown verb), -1 when the line holds a NUL, CR, LF or
 * other control character other than TAB, or the verb is not 1..20 letters.
 */
int smtp_cmd_parse(const char *line, size_t len, struct smtp_cmd *out);

/* The canonical upper-case name of a command ("MAIL"), "?" for unknown. */
const char *smtp_cmd_name(enum smtp_cmd_id id);

#endif
