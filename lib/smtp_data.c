/*
 * smtp_data: the DATA decoder (RFC 5321 sections 4.1.1.4 and 4.5.2).
 *
 * The decoder is a byte-level state machine. A "line start" is only ever the
 * position right after a real CRLF (or the start of the message, whose
 * preceding CRLF ended the DATA command line). Everything that depends on a
 * line start, dot-unstuffing and the end-of-data marker, is decided there and
 * nowhere else, so that a bare CR or a bare LF can never begin a line that
 * ends the message (SMTP smuggling).
 *
 * No input byte is ever buffered inside the decoder: a CR whose fate depends
 * on the next byte, or a leading dot that may belong to the marker, is held
 * back by being encoded in the state itself, so a chunk may end anywhere.
 */
#include "lib/smtp_data.h"

#include <assert.h>
#include <stdint.h>
#include <string.h>

enum smtp_data_state {
    SD_BOL = 0,     /* at a line start: after CRLF, or the DATA line's CRLF */
    SD_BOL_DOT,     /* a line start was followed by '.', which is dropped */
    SD_BOL_DOT_CR,  /* CRLF "." CR seen: an LF now completes the marker */
    SD_TEXT,        /* inside a line (also after a bare CR or bare LF) */
    SD_CR,          /* a CR inside a line, held back until the next byte */
    SD_DONE,        /* the end-of-data marker was consumed */
};

void smtp_data_init(struct smtp_data *d, enum smtp_data_mode mode, size_t max)
{
    memset(d, 0, sizeof(*d));
    d->state = SD_BOL;
    d->mode = mode;
    d->max = max;
}

/*
 * Stores n decoded octets. size counts every octet, while out only grows up
 * to max; what does not fit is dropped and latches too_big. Because the cut
 * is made octet by octet, the stored bytes are always the first max octets
 * of the message, however the input was split into chunks.
 */
static void sd_emit(struct smtp_data *d, struct buf *out, const void *p, size_t n)
{
    size_t room = d->max > out->len ? d->max - out->len : 0;

    d->size = n > SIZE_MAX - d->size ? SIZE_MAX : d->size + n;
    if (n > room) {
        d->too_big = 1;
        n = room;
    }
    if (n)
        buf_append(out, p, n);
}

/* A CR that is not followed by LF (RFC 5321 section 2.3.8 allows CR and LF
 * only together as CRLF). */
static void sd_bare_cr(struct smtp_data *d, struct buf *out)
{
    d->bare_newline = 1;
    if (d->mode == SMTP_DATA_NORMALIZE)
        sd_emit(d, out, "\r\n", 2);
    else
        sd_emit(d, out, "\r", 1);
}

/* An LF that was not preceded by CR. */
static void sd_bare_lf(struct smtp_data *d, struct buf *out)
{
    d->bare_newline = 1;
    if (d->mode == SMTP_DATA_NORMALIZE)
        sd_emit(d, out, "\r\n", 2);
    else
        sd_emit(d, out, "\n", 1);
}

size_t smtp_data_feed(struct smtp_data *d, const char *p, size_t len, struct buf *out)
{
    size_t i = 0;

    /* Bytes after the marker belong to the next command, never to us. */
    if (d->state == SD_DONE)
        return 0;

    /* Each case either consumes p[i] (i++) or changes state to one that will
     * consume it on the next round (the byte is "reprocessed"); SD_TEXT
     * always consumes, so the loop always makes progress. */
    while (i < len) {
        unsigned char c = (unsigned char)p[i];

        switch (d->state) {
        case SD_BOL:
            if (c == '.') {
                /* RFC 5321 section 4.5.2: the leading dot is removed; it is
                 * either transparency or the start of the marker. */
                d->state = SD_BOL_DOT;
                i++;
            } else {
                d->state = SD_TEXT;
            }
            break;

        case SD_BOL_DOT:
            if (c == '\r') {
                d->state = SD_BOL_DOT_CR;
                i++;
            } else {
                /* "..x" stores ".x"; "." + bare LF stores the bare LF. */
                d->state = SD_TEXT;
            }
            break;

        case SD_BOL_DOT_CR:
            if (c == '\n') {
                /* CRLF "." CRLF: the end of the mail data. The first CRLF
                 * was stored as the end of the last line. */
                d->state = SD_DONE;
                d->done = 1;
                return i + 1;
            }
            /* CRLF "." CR x: the dot was transparency and the CR is bare. */
            sd_bare_cr(d, out);
            d->state = SD_TEXT;
            break;

        case SD_CR:
            if (c == '\n') {
                sd_emit(d, out, "\r\n", 2);
                d->state = SD_BOL;
                i++;
            } else {
                sd_bare_cr(d, out);
                d->state = SD_TEXT;
            }
            break;

        case SD_TEXT:
            if (c == '\r') {
                d->state = SD_CR;
                i++;
            } else if (c == '\n') {
                /* A bare LF ends no line: what follows is not a line
                 * start, whatever the mode stores. */
                sd_bare_lf(d, out);
                i++;
            } else {
                size_t j = i + 1;

                while (j < len && p[j] != '\r' && p[j] != '\n')
                    j++;
                sd_emit(d, out, p + i, j - i);
                i = j;
            }
            break;

        default:
            assert(!"smtp_data: corrupt state");
            return len;
        }
    }
    return len;
}
