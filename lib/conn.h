/*
 * conn: a byte stream over a libuv TCP handle, with an optional TLS layer
 * (server or client) that can be switched on at any point (STARTTLS) or
 * from the start (implicit TLS).
 *
 * The owner sees plaintext only. Incoming bytes are handed to the read
 * callback as they are decrypted; outgoing bytes are collected by
 * conn_write() and sent by conn_flush(), so that all replies to one batch
 * of pipelined commands leave in one write (one TLS record, one syscall).
 *
 * Lifetime: conn_close() (graceful: flush, TLS close_notify, close) or
 * conn_abort() (immediate) starts the teardown; the event callback then
 * gets CONN_EV_CLOSED exactly once, after which the conn is freed by this
 * module and must not be touched. An error (reset, TLS failure) is reported
 * with CONN_EV_ERROR; the owner then calls conn_close()/conn_abort(). No
 * callback is ever made from inside a conn_* call made by the owner.
 */
#ifndef MF_CONN_H
#define MF_CONN_H

#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

#include "lib/tls.h"

struct conn;

enum conn_event {
    CONN_EV_CONNECTED,   /* client connection established (conn_connect) */
    CONN_EV_TLS_READY,   /* TLS handshake completed */
    CONN_EV_EOF,         /* peer closed its side */
    CONN_EV_ERROR,       /* status holds a libuv error or CONN_ERR_* */
    CONN_EV_DRAINED,     /* every byte written so far has been sent */
    CONN_EV_CLOSED,      /* last callback; the conn is freed after it */
};

#define CONN_ERR_TLS (-10001)  /* TLS handshake or record failure */

typedef void (*conn_read_cb)(struct conn *c, const char *data, size_t len, void *arg);
typedef void (*conn_event_cb)(struct conn *c, enum conn_event ev, int status, void *arg);

/*
 * Accepts a pending connection from a listening server handle. Reading
 * does not start until conn_read_start(). Returns NULL when accept fails.
 */
struct conn *conn_accept(uv_stream_t *server, conn_read_cb on_read,
                         conn_event_cb on_event, void *arg);

/*
 * Connects to addr (optionally from source, NULL for any). The result
 * comes as CONN_EV_CONNECTED or CONN_EV_ERROR. connect_timeout_ms 0 = none.
 */
struct conn *conn_connect(uv_loop_t *loop, const struct sockaddr *addr,
                          const struct sockaddr *source, unsigned connect_timeout_ms,
                          conn_read_cb on_read, conn_event_cb on_event, void *arg);

void conn_read_start(struct conn *c);
void conn_read_stop(struct conn *c);

/* Appends to the output buffer; nothing is sent before conn_flush(). */
void conn_write(struct conn *c, const void *data, size_t len);
void conn_flush(struct conn *c);
/* Plaintext bytes written but not yet handed to the kernel. */
size_t conn_pending(const struct conn *c);

/*
 * Switches TLS on. Output written before this call is flushed in plaintext
 * first (the "220 Ready to start TLS" reply); plaintext bytes already
 * received and not yet delivered are discarded (RFC 3207 section 4.2 and
 * the STARTTLS command injection attack), as is anything else that arrived
 * in plaintext after the command. server: 1 to accept, 0 to connect; for a
 * client, servername (may be NULL) is sent as SNI and, when the context
 * verifies, checked against the certificate. Completion comes as
 * CONN_EV_TLS_READY; failure as CONN_EV_ERROR with CONN_ERR_TLS.
 * Returns 0, or -1 when TLS is already on.
 */
int conn_start_tls(struct conn *c, struct tls_ctx *ctx, int server, const char *servername);

int conn_is_tls(const struct conn *c);
/* "TLSv1.3" / cipher name / "" when not TLS. Valid until close. */
const char *conn_tls_version(const struct conn *c);
const char *conn_tls_cipher(const struct conn *c);
/* The peer's verified certificate, or NULL. Owned by the conn. */
X509 *conn_tls_peer_cert(const struct conn *c);
/* Why TLS failed (OpenSSL's reason, and the certificate check's when that
 * failed), after CONN_EV_ERROR with CONN_ERR_TLS; "" otherwise. Valid until
 * close. For logs and DSN diagnostics. */
const char *conn_tls_error(const struct conn *c);

/* Peer and local addresses, filled at accept/connect. */
const struct sockaddr *conn_peer(const struct conn *c);
const char *conn_peer_ip(const struct conn *c);    /* textual, no port */
const struct sockaddr *conn_local(const struct conn *c);

void conn_close(struct conn *c);
void conn_abort(struct conn *c);

#endif
