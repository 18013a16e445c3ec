/*
 * mx_pool: the relay's connections to recipient MX hosts (transports/
 * smtp_client), reused across transactions to the same destination
 * domain, with at most max_per_domain connections per domain at once
 * (connecting, busy and idle together). Callers past the cap wait in FIFO
 * order for a connection to come free.
 *
 * A new connection is made from the route's targets in order (relay/
 * mx_resolve): a refused or failed connection, a greeting other than 220
 * (RFC 5321 section 3.1: a server may refuse with 554 at the greeting) or
 * a failed EHLO moves on to the next address. STARTTLS is used whenever
 * the MX offers it (opportunistic, RFC 3207). Without verification
 * (tls_verify 0) any certificate is taken and a failed handshake is
 * retried once in plaintext on the same address, which is what senders
 * do for opportunistic TLS; with tls_verify the certificate must verify
 * against the CA file and name the MX host, and a host that fails that is
 * skipped. Each failure is logged with its reason.
 *
 * Callbacks are made exactly once per request, from the loop, never from
 * inside mx_pool_get(), unless the request is cancelled first.
 */
#ifndef MF_RELAY_MX_POOL_H
#define MF_RELAY_MX_POOL_H

#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

#include "lib/tls.h"
#include "relay/mx_resolve.h"
#include "transports/smtp_client.h"

struct mx_pool_opts {
    const char *helo;                 /* EHLO name */
    unsigned port;                    /* 25, or a lab port */
    const struct sockaddr *source4;   /* bind address per family, or NULL */
    const struct sockaddr *source6;
    struct tls_ctx *tls_ctx;          /* client context for STARTTLS */
    int tls_verify;
    unsigned max_per_domain;
    unsigned idle_timeout;            /* seconds an unused connection stays */
    unsigned connect_timeout;         /* seconds per address */
};

struct mx_pool;
struct mx_conn;                       /* a connection lent to one user */
struct mx_wait;                       /* a pending request */

/*
 * mc is the connection (idle, ready for a transaction), or NULL when no
 * target could be reached; err then says why ("127.0.0.11:25: connect:
 * connection refused" for the last address tried) and is valid during the
 * callback only.
 */
typedef void (*mx_pool_cb)(struct mx_conn *mc, const char *err, void *arg);

/* opts are copied; tls_ctx gets a reference. */
struct mx_pool *mx_pool_new(uv_loop_t *loop, const struct mx_pool_opts *opts);

/* Asks for a connection to the destination of route (not failed, at
 * least one target). */
struct mx_wait *mx_pool_get(struct mx_pool *p, const struct mx_route *route, mx_pool_cb cb,
                            void *arg);

/* No callback is made for w after this call (a connection that was on its
 * way goes back to the pool). */
void mx_pool_cancel(struct mx_wait *w);

/*
 * Gives a connection back. reusable 0 closes it; otherwise a connection
 * still inside a transaction gets RSET first, and one that is idle stays
 * for the next user of its domain (or closes after idle_timeout). mc must
 * not be used afterwards; a command still in flight on it must have
 * completed (or the owner passes reusable 0, which closes the client and
 * completes that command with an error).
 */
void mx_pool_put(struct mx_conn *mc, int reusable);

struct smtp_client *mx_conn_client(const struct mx_conn *mc);
const char *mx_conn_host(const struct mx_conn *mc);   /* MX host name */
const char *mx_conn_peer(const struct mx_conn *mc);   /* "ip:port" */
/* "TLSv1.3" or "" when the connection is not encrypted. */
const char *mx_conn_tls(const struct mx_conn *mc);
/* Transactions started on this connection before the current user got it
 * (0 for a new connection). A reused connection may have been closed by
 * the server meanwhile; its first command can fail for that reason. */
unsigned mx_conn_uses(const struct mx_conn *mc);

/* Connections open (connecting, busy or idle), all domains. */
size_t mx_pool_size(const struct mx_pool *p);

/*
 * Closes idle connections (QUIT), stops connecting, fails no request
 * (callers are gone by then) and calls closed(arg) from the loop once every
 * client has been freed; busy connections are closed when given back.
 */
void mx_pool_close(struct mx_pool *p, void (*closed)(void *arg), void *arg);

#endif
