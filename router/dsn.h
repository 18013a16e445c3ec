/*
 * dsn: delivery status notifications (bounces), as a pure module.
 *
 * When a message fails permanently for some recipients, or expires from the
 * queue, the router tells the envelope sender with a DSN (RFC 3464) inside a
 * multipart/report (RFC 6522): a human-readable text/plain part, a
 * message/delivery-status part with one block per failed recipient, and the
 * original message's header section (text/rfc822-headers, the default) or
 * the whole original (message/rfc822). The router enqueues the result as a
 * new message with the null reverse-path "<>" (queue_msg.from = "") and the
 * single recipient envelope_from, so that a DSN can never cause another DSN
 * (RFC 5321 section 6.1, RFC 3464 section 1).
 *
 * The router's use, in order:
 *   1. dsn_should_bounce(from, data, len): 0 means "no DSN" (the sender is
 *      null or the message is itself a DSN); the message then goes to the
 *      dead stream instead.
 *   2. Fill a dsn_input with every recipient that failed in this round and
 *      call dsn_build(); enqueue out.data as described above.
 *
 * Only "failed" notifications are built; delay notifications ("delayed",
 * RFC 3464 section 2.3.3) are not sent by mailferry.
 *
 * The module does no I/O, reads no clock and keeps no state: times are
 * arguments (milliseconds since the Unix epoch, UTC), so equal inputs give
 * byte-identical output.
 *
 * Ownership: dsn_input, the dsn_rcpt array and every string they point to
 * are borrowed for the duration of one call and never retained. The result
 * is appended to a caller-owned buf.
 */
#ifndef MF_DSN_H
#define MF_DSN_H

#include <stddef.h>
#include <stdint.h>

#include "lib/buf.h"

/* RFC 5321 section 4.5.3.1.3: a path is at most 256 octets. Longer
 * addresses cannot have come through the gateway and are rejected. */
#define DSN_ADDR_MAX 256
/* Queue ids are QUEUE_ID_LEN (22) characters; anything up to this many
 * octets of [A-Za-z0-9._-] is accepted. */
#define DSN_QUEUE_ID_MAX 64
/* The remote reply text is cut to this many octets per recipient (the
 * SMTP reply parser keeps at most 4096 anyway). */
#define DSN_DIAG_MAX 4096

/* One recipient the message could not be delivered to. */
struct dsn_rcpt {
    /* The envelope recipient as given in RCPT TO, without angle brackets
     * (well-formed UTF-8 when non-ASCII, RFC 6531). Required. */
    const char *rcpt;
    /* "failed", the only action supported; NULL means "failed". */
    const char *action;
    /* The SMTP reply code of the last attempt (400..599), or 0 when there
     * was no SMTP reply (connection refused, DNS failure, TLS failure). */
    int code;
    /* The enhanced status code of that reply ("5.1.1", RFC 3463), or NULL
     * or "" when the reply had none. */
    const char *enhanced;
    /* The text of the reply without codes (lines joined with "\n", as in
     * smtp_reply.text), or a short local explanation when code is 0 ("connect
     * to mx.example.com: Connection refused"). NULL or "" when none. Any
     * octets are accepted; the DSN shows them sanitised to printable ASCII. */
    const char *diagnostic;
    /* The host that gave the reply ("mx.example.com"), or NULL. Shown
     * sanitised like diagnostic and cut to DSN_DIAG_MAX octets. */
    const char *remote_mta;
    /* Time of the last delivery attempt, or <= 0 when unknown (then the
     * Last-Attempt-Date field is left out). */
    int64_t last_attempt_ms;
};

struct dsn_input {
    /* The original message's queue id ([A-Za-z0-9._-], 1..DSN_QUEUE_ID_MAX
     * octets). It names the DSN's Message-ID and MIME boundary and appears
     * as X-Mailferry-Queue-ID in the report. */
    const char *queue_id;
    /* Our host name (letters, digits, '-', '.', '_'; at most 253 octets):
     * the From: domain, Reporting-MTA and Message-ID domain. */
    const char *reporting_mta;
    /* The original envelope sender, the DSN's To: and its only envelope
     * recipient. Must not be the null sender (see dsn_should_bounce()). */
    const char *envelope_from;
    /* The original message bytes as queued (may hold 8-bit octets, NULs,
     * bare LF or CR); orig_data may be NULL when orig_len is 0. */
    const char *orig_data;
    size_t orig_len;
    /* The failed recipients, at least one. */
    const struct dsn_rcpt *rcpts;
    size_t nrcpts;
    /* When the gateway accepted the message; <= 0 leaves Arrival-Date out. */
    int64_t arrival_ms;
    /* Now: the Date: of the DSN and part of its Message-ID. */
    int64_t now_ms;
    /* NULL for a permanent failure, "expired" when the message stayed in the
     * queue past its lifetime. Any other value is an error. */
    const char *reason;
    /* 0 (the default): return only the original header section; else the
     * whole original message. */
    int return_full;
};

/*
 * Builds the complete DSN message (header section and body, every line
 * ended by CRLF, none longer than 998 octets, RFC 5322 section 2.1.1) and
 * appends it to out. Returns 0, or -1 with a short reason in err (when
 * errlen > 0) and out left as it was.
 *
 * Errors are inputs that cannot come from the gateway: a missing or
 * malformed queue id or host name, a null, over-long or malformed address
 * (control characters, invalid UTF-8, envelope_from without '@'), no
 * recipients, an action other than "failed", a code outside 400..599 other
 * than 0, a reason other than NULL and "expired", or a time outside
 * 1970..9999.
 *
 * The message (RFC 6522, RFC 3464):
 *   From: "Mail Delivery System" <MAILER-DAEMON@reporting_mta>
 *   To: <envelope_from>
 *   Subject: Undelivered Mail Returned to Sender
 *   Date: (RFC 5322 section 3.3, UTC, from now_ms)
 *   Message-ID: <queue_id.dsn.now_ms@reporting_mta>
 *   Auto-Submitted: auto-replied (RFC 3834 section 5)
 *   MIME-Version: 1.0
 *   Content-Type: multipart/report; report-type=delivery-status; boundary=...
 * with three parts:
 *   1. text/plain; charset=us-ascii: what happened, one paragraph per
 *      recipient with the remote reply, wrapped at 76 columns.
 *   2. message/delivery-status: Reporting-MTA, X-Mailferry-Queue-ID,
 *      Arrival-Date; then per recipient Final-Recipient, Action: failed,
 *      Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date.
 *   3. text/rfc822-headers with the original header section, or
 *      message/rfc822 with the whole original when return_full. When the
 *      original header section holds non-ASCII octets, message/global-headers
 *      (RFC 6533 section 3) or message/global (RFC 6532 section 3.7) is
 *      used instead.
 *
 * Status (RFC 3463): the recipient's enhanced code when it is well-formed
 * with class 4 or 5 and agrees with the reply code's class; else 5.0.0 for
 * a 5xx reply; else, for an expired message, 4.4.7 ("delivery time
 * expired"); else 4.0.0 for a 4xx reply and 5.0.0 without a reply. An
 * expired message thus keeps the class-4 status of its last transient
 * error, with Action: failed, as Postfix reports it; RFC 3463 says of
 * 4.4.7 that "the code for the actual problem found when delivery was
 * attempted should be returned rather than this code" when possible.
 *
 * Final-Recipient is "rfc822; addr" for an ASCII address and "utf-8; addr"
 * in the 7-bit utf-8-addr-xtext form for a non-ASCII one (RFC 6533 section
 * 3), so the delivery-status part is always 7-bit. Diagnostic-Code is
 * "smtp; <code> [<enhanced>] <text>" when there was a reply, else
 * "X-mailferry; <text>", folded at spaces. A word too long for a
 * 998-octet line (a reply text without spaces, or a non-ASCII
 * Final-Recipient made mostly of '+', '=', backslashes or spaces) is cut
 * with a fold, which adds a space on unfolding.
 *
 * The original is copied octet for octet with two exceptions, both needed
 * for the result to be a valid message: every line end (CRLF, bare LF,
 * bare CR) becomes CRLF and the last line gets one if it had none; a line
 * longer than 998 octets is split (header lines folded before a space or
 * tab when there is one, else with CRLF SP; body lines with CRLF). When the
 * returned part holds octets >= 0x80 (or NUL) it carries
 * Content-Transfer-Encoding: 8bit, and so does the whole message (RFC 2045
 * section 6.4): such a DSN must be relayed with BODY=8BITMIME, and with
 * SMTPUTF8 when envelope_from or the original headers are non-ASCII (the
 * To: field then holds UTF-8, RFC 6532 section 3.2).
 *
 * The boundary is "=_mf_" + the queue id's letters and digits + "_" + 16 hex
 * digits of a hash of the content. It is checked not to occur anywhere in
 * the message except as the boundary parameter and the four delimiter
 * lines; on a hit another hash is tried. "=_" cannot occur in
 * quoted-printable text, so a hit is all but impossible.
 */
int dsn_build(const struct dsn_input *in, struct buf *out, char *err, size_t errlen);

/*
 * Returns 1 when a failure of this message should be reported to
 * envelope_from with a DSN, else 0:
 *   - the null reverse-path (NULL, "" or "<>") gets no DSN: RFC 5321
 *     section 4.5.5 and 6.1, RFC 3464 section 1 ("never a bounce for a
 *     bounce");
 *   - a message that is itself a DSN gets none either: its header section
 *     (up to the first empty line) has a Content-Type field of
 *     multipart/report with report-type delivery-status or
 *     global-delivery-status (RFC 6522, RFC 6533), however it is cased,
 *     quoted, folded or commented. This catches DSNs that another system
 *     sent with a non-null sender.
 * Auto-Submitted: auto-generated or auto-replied messages with a non-null
 * sender do get DSNs: RFC 3834 governs automatic responders, not delivery
 * reports, and such senders (list servers, ticket systems) rely on bounces.
 * orig may be NULL when len is 0.
 */
int dsn_should_bounce(const char *envelope_from, const char *orig, size_t len);

#endif
