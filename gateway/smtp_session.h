/*
 * smtp_session: one SMTP server connection (RFC 5321, RFC 6409, RFC 3207,
 * RFC 4954, RFC 2920, RFC 1870, RFC 6152, RFC 6531, RFC 3463).
 *
 * The session (connection, TLS, EHLO, AUTH) is kept apart from the
 * transaction (MAIL ... end of data), which lives in its own struct and is
 * reset by RSET, HELO/EHLO, STARTTLS and after each message.
 *
 * Input model: bytes go into a buffer; the command framer (smtp_cmd) and
 * the DATA decoder (smtp_data) consume from it. Replies are collected and
 * flushed once per batch of input, so a pipelined group gets one write.
 * While the session waits for Redis or for a password check, it stops
 * reading, which bounds its memory and gives backpressure.
 */
#ifndef MF_SMTP_SESSION_H
#define MF_SMTP_SESSION_H

#include "gateway/gateway.h"
#include "lib/conn.h"
#include "lib/list.h"

struct smtp_session;

/*
 * Accepts a connection from a listening handle and starts the dialogue
 * (banner, or the TLS handshake first on an implicit TLS listener). The
 * session registers itself with gateway_session_add(), asks
 * gateway_admit() whether the connection limits allow it (else it answers
 * 421 and closes), and frees itself when the connection is closed, after
 * calling gateway_session_gone(). Returns NULL when accept failed.
 */
struct smtp_session *smtp_session_accept(struct gateway *gw, uv_stream_t *server,
                                         enum gateway_listener_kind kind);

/* The peer's address as text, and whether gateway_admit() admitted it. */
const char *smtp_session_ip(const struct smtp_session *s);
int smtp_session_admitted(const struct smtp_session *s);

/* SIGTERM: an idle session is closed with 421 at once; one with an open
 * transaction is closed with 421 when that transaction ends. */
void smtp_session_shutdown(struct smtp_session *s);

/* Stops the session at once (end of the grace period). */
void smtp_session_abort(struct smtp_session *s);

/* Queue backpressure: stop or resume reading from the client. */
void smtp_session_set_paused(struct smtp_session *s, int paused);

/* The session's link in the gateway's registry (lib/list.h); its owner is
 * the session. Valid until gateway_session_gone() returns. */
struct list_node *smtp_session_node(struct smtp_session *s);

#endif
