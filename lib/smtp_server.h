/*
 * smtp_server: the plumbing shared by the SMTP server sessions (the
 * gateway's gateway/smtp_session.c and the relay's relay/relay_session.c).
 *
 * A session embeds one struct smtp_server (its "core"): the connection,
 * the session id and peer address for logs, the timer, the input buffer
 * with the command framer's state, the error and message counters, and
 * the life cycle rule (STYLE.md): the session is released only once its
 * connection and timer are closed and no callback still refers to it.
 *
 * What stays in the session: its state machine, its command table and
 * handlers, its timeouts and what it must cancel when it closes.
 */
#ifndef MF_SMTP_SERVER_H
#define MF_SMTP_SERVER_H

#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "lib/buf.h"
#include "lib/conn.h"
#include "lib/list.h"

/* The longest reply line smtp_server_reply() can write, CRLF included. */
#define SMTP_SERVER_REPLY_CAP 1024
/* Replies not yet read by the client before the session stops reading. */
#define SMTP_SERVER_OUT_MAX (256 * 1024)

struct smtp_server {
    struct list_node node;        /* in the role's registry of sessions */
    struct conn *conn;
    char sid[16];                 /* session id for logs */
    char ip[64];                  /* peer address as text */
    uv_timer_t timer;             /* its data is the session (arg) */
    int timer_open;
    uint64_t started;             /* uv_now() at accept */

    struct buf in;                /* received, not yet consumed */
    int discarding;               /* inside an overlong command line */
    int discard_cr;

    int errors;                   /* error replies counted so far */
    unsigned messages;            /* messages accepted */
    int reading;                  /* conn_read_start() in effect */
    int inflight;                 /* callbacks that still reference the session */
    int conn_closed;

    size_t reply_max;             /* reply line cap, CRLF included */
    int reply_sanitize;           /* control characters become '?' */

    void (*release)(void *arg);
    void *arg;                    /* the session */
};

/*
 * Accepts a connection from server into c and starts its timer handle
 * (not armed); the connection's callbacks get arg. Sets a fresh session
 * id, the peer address, reply_max to 600 and reply_sanitize to 0 (the
 * caller may change both). release(arg) is called exactly once, from
 * smtp_server_maybe_release(), after c's own memory (the input buffer)
 * is freed; it frees the session. Returns 0, or -1 when accept failed
 * (nothing is left to free in c then).
 */
int smtp_server_accept(struct smtp_server *c, uv_loop_t *loop, uv_stream_t *server,
                       conn_read_cb on_read, conn_event_cb on_event,
                       void (*release)(void *arg), void *arg);

/*
 * Queues one reply line "code enhanced text" CRLF (RFC 3463 enhanced
 * status codes, RFC 2034; enh may be NULL). The line is cut to
 * c->reply_max octets, CRLF included. Nothing is sent before conn_flush().
 */
void smtp_server_reply(struct smtp_server *c, int code, const char *enh, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/*
 * Answers a failed smtp_addr_parse_mail()/smtp_addr_parse_rcpt(): 555
 * 5.5.4 for a bad parameter (RFC 5321 section 4.1.1.11), 553 5.6.7 for a
 * non-ASCII address without SMTPUTF8 (RFC 6531 section 3.5), else 501 with
 * 5.1.7 (sender) or 5.1.3 (recipient). Returns 0 when rc is SMTP_ADDR_OK
 * (nothing written), else -1 after writing the reply; the caller counts
 * the error.
 */
int smtp_server_addr_reply(struct smtp_server *c, int rc, const char *why, int rcpt);

/*
 * Counts an error reply toward max. Returns 0 below the limit; at the
 * limit, queues "421 4.7.0 <hostname> Error: too many errors" and returns
 * 1: the caller closes the session.
 */
int smtp_server_count_error(struct smtp_server *c, int max, const char *hostname);

enum smtp_server_frame_result {
    SMTP_SERVER_NEED_MORE = 0,    /* no complete line in p[0..avail) */
    SMTP_SERVER_LINE = 1,         /* a command line at p, *linelen octets, no CRLF */
    SMTP_SERVER_TOO_LONG = 2,     /* an overlong line ended: answer 500 5.5.2 */
};

/*
 * One framing step over p[0..avail), the unconsumed input: a command line
 * (RFC 5321 section 2.3.8: only CRLF ends it) of at most max octets, or
 * the discarding of a longer line up to its CRLF (lib/smtp_cmd.h), which
 * may span several calls. *used is set to the octets to consume in every
 * case (with SMTP_SERVER_NEED_MORE, those that were discarded).
 */
int smtp_server_frame(struct smtp_server *c, const char *p, size_t avail, size_t max,
                      size_t *used, size_t *linelen);

/*
 * Reads from the client only while can_consume holds, the input buffer
 * holds less than inbuf_max and the client reads its replies (fewer than
 * SMTP_SERVER_OUT_MAX octets pending). No-op once the connection closed.
 */
void smtp_server_update_reading(struct smtp_server *c, int can_consume, size_t inbuf_max);

/* The debug line of a state change "from -> to". */
void smtp_server_log_state(const struct smtp_server *c, const char *from, const char *to);

/* The info line "event=disconnect" with the session's counters. */
void smtp_server_log_disconnect(const struct smtp_server *c, const char *reason);

/*
 * Stops reading, then closes the connection: with abort at once (RST),
 * else after flushing what was written (the peer gets time to read it).
 * Stops and closes the timer. The session is released once both closes
 * are done and inflight is 0 (smtp_server_maybe_release()).
 */
void smtp_server_close(struct smtp_server *c, int abort);

/* To call on CONN_EV_CLOSED: the connection is gone. */
void smtp_server_conn_closed(struct smtp_server *c);

/* Releases the session when its connection and timer are closed and no
 * callback refers to it (inflight == 0); else does nothing. A callback
 * that decremented inflight after the close calls this. */
void smtp_server_maybe_release(struct smtp_server *c);

#endif
