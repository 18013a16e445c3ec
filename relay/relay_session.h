/*
 * relay_session: one tunnel connection from a router (RFC 5321 ESMTP with
 * RFC 2920 PIPELINING, RFC 3463 enhanced status codes, RFC 1870 SIZE,
 * RFC 6152 8BITMIME, RFC 6531 SMTPUTF8), after mutual TLS.
 *
 * The session (TLS, EHLO) is kept apart from the transaction (MAIL ... end
 * of data). A transaction has one destination domain: its first RCPT
 * resolves the domain's MX and takes a connection from the pool, MAIL and
 * every RCPT go to that MX one by one, and each RCPT gets the MX's own
 * reply; DATA is answered 354 here, the content is read (dot-unstuffed),
 * and the MX's reply to its end of data is the answer. The session stops
 * reading while it waits for DNS or the MX, which bounds its memory.
 *
 * Besides the usual commands it knows XSTATUS (the self-check report),
 * and its EHLO reply carries the keyword X-MAILFERRY-STATUS (docs/relay.md
 * describes both).
 */
#ifndef MF_RELAY_SESSION_H
#define MF_RELAY_SESSION_H

#include <uv.h>

#include "lib/list.h"
#include "relay/relay.h"

/*
 * Accepts a connection from a listening handle and starts the TLS
 * handshake; the greeting follows only after the handshake with a valid
 * (and, with pins, pinned) client certificate. The session registers
 * itself with relay_session_add() and frees itself when the connection is
 * closed, after relay_session_gone(). Returns NULL when accept failed.
 */
struct relay_session *relay_session_accept(struct relay *r, uv_stream_t *server);

/* SIGTERM: an idle session is closed with 421 at once; one inside a
 * transaction is closed when the transaction ends. */
void relay_session_shutdown(struct relay_session *s);

/* Stops the session at once (end of the grace period). */
void relay_session_abort(struct relay_session *s);

/* The session's link in the relay's registry (lib/list.h); its owner is
 * the session. Valid until relay_session_gone() returns. */
struct list_node *relay_session_node(struct relay_session *s);

#endif
