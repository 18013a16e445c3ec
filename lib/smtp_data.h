/*
 * smtp_data: the DATA decoder (RFC 5321 sections 4.1.1.4 and 4.5.2).
 *
 * Incremental and resumable: feed it the bytes as they arrive, in pieces of
 * any size; it appends the dot-unstuffed message to an output buffer and
 * says when the end-of-data marker was seen and how many input bytes it
 * used, so that bytes after the marker (pipelined commands) stay with the
 * caller.
 *
 * Smuggling hardening: the end of data is exactly CRLF "." CRLF, where the
 * first CRLF is the end of the previous line (or the DATA command's own line
 * for an empty message). "\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r\n" and every
 * other variant are data, never the end. Lines with a bare CR or a bare LF
 * set a flag; with SMTP_DATA_NORMALIZE they are stored with CRLF instead,
 * which changes only the stored bytes, never where the message ends.
 */
#ifndef MF_SMTP_DATA_H
#define MF_SMTP_DATA_H

#include <stddef.h>

#include "lib/buf.h"

enum smtp_data_mode {
    SMTP_DATA_KEEP = 0,     /* store bare CR / LF as received (flag set) */
    SMTP_DATA_NORMALIZE,    /* store a bare CR or LF as CRLF (flag set) */
};

struct smtp_data {
    /* private decoder state */
    int state;
    enum smtp_data_mode mode;
    size_t max;           /* ceiling for out->len */
    /* results */
    int done;             /* end-of-data marker seen */
    int bare_newline;     /* a bare CR or bare LF was seen in the message */
    int too_big;          /* the message exceeded max; bytes past it dropped */
    size_t size;          /* message octets after unstuffing, counted even
                             past max (for logging) */
};

/* Prepares a decoder for one message. max is the largest message accepted
 * (out->len never exceeds it; too_big is set instead). */
void smtp_data_init(struct smtp_data *d, enum smtp_data_mode mode, size_t max);

/*
 * Decodes p[0..len) into out. Returns the number of input bytes consumed:
 * all of them unless the end-of-data marker was reached, in which case
 * d->done is set and the return value stops right after the marker's final
 * LF. The stored message ends with the CRLF that preceded the marker (a
 * non-empty message always ends with CRLF).
 */
size_t smtp_data_feed(struct smtp_data *d, const char *p, size_t len, struct buf *out);

#endif
