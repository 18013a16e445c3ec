/*
 * relay: the "mailferry relay" role, the tunnel endpoint on the physical
 * host with the clean IP address (docs/relay.md).
 *
 * Routers connect over TLS 1.2 or newer with a client certificate issued
 * by [relay] tunnel_ca (and, when [relay] pinned_clients is set, one of
 * those exact certificates); anything else is refused before the first
 * SMTP byte. Each tunnel connection is a relay_session speaking ESMTP with
 * PIPELINING; every transaction is delivered at once to the recipient
 * domain's MX (relay/mx_resolve, relay/mx_pool) and the MX's own replies
 * are passed back. Nothing is queued here: Redis, behind the routers, stays
 * the only place a message is kept.
 *
 * The relay owns the shared parts its sessions use: the TLS context, the
 * DNS resolver (c-ares on the loop, [relay] resolver), the MX route cache,
 * the MX connection pool and the self-check (relay/selfcheck).
 */
#ifndef MF_RELAY_RELAY_H
#define MF_RELAY_RELAY_H

#include <stddef.h>
#include <uv.h>

#include "lib/config.h"
#include "lib/metrics.h"
#include "lib/tls.h"

struct relay;
struct relay_session;
struct mx_resolver;
struct mx_pool;
struct selfcheck;

/*
 * Checks what the relay needs beyond the configuration table: listen,
 * tls_cert, tls_key, tunnel_ca and public_ip set, one public_ip, at most
 * one source address per family, well-formed pinned_clients, and loads the
 * certificates (without opening anything). For --check-config and start.
 * Returns 0, or -1 with a message in err.
 */
int relay_check(const struct mf_config *cfg, char *err, size_t errlen);

/*
 * Creates the relay on loop: opens the tunnel listeners, the resolver and
 * the pool, and starts the self-check. cfg must outlive it. Returns NULL
 * with a message in err.
 */
struct relay *relay_new(uv_loop_t *loop, const struct mf_config *cfg, char *err, size_t errlen);

/* SIGHUP: reloads the tunnel certificate, key and CA. Sessions keep the
 * context they started with. On error the old one stays and -1 is
 * returned (logged). */
int relay_reload(struct relay *r);

/*
 * SIGTERM: closes the listeners, closes idle sessions with 421, lets open
 * transactions finish for at most [relay] shutdown_grace seconds, aborts
 * the rest, then closes the MX connections, the self-check and the
 * resolver, and calls done(arg) from the loop. Free with relay_free()
 * afterwards.
 */
void relay_shutdown(struct relay *r, void (*done)(void *arg), void *arg);
void relay_free(struct relay *r);

/* Tunnel listeners open (0 once shutting down). */
size_t relay_listening(const struct relay *r);
/* 1 when the last self-check found everything in order. */
int relay_status_ok(const struct relay *r);

/* ---- for relay_session.c ---- */

struct relay_metrics {
    struct metric_family *connections;    /* gauge: tunnel sessions open */
    struct metric_family *tunnels;        /* counter by result */
    struct metric_family *rcpt;           /* counter of RCPT replies by class */
    struct metric_family *messages;       /* counter of end-of-data replies */
};

const struct mf_config *relay_config(const struct relay *r);
struct tls_ctx *relay_tls(const struct relay *r);
uv_loop_t *relay_loop(const struct relay *r);
struct mx_resolver *relay_resolver(const struct relay *r);
struct mx_pool *relay_pool(const struct relay *r);
struct selfcheck *relay_selfcheck(const struct relay *r);
const struct relay_metrics *relay_metrics(const struct relay *r);
int relay_stopping(const struct relay *r);

/*
 * Whether a client certificate passes [relay] pinned_clients: 1 when no
 * pins are configured or the SHA-256 of its DER encoding is one of them.
 * fp gets the fingerprint as "sha256:<hex>" for logs.
 */
int relay_pin_ok(const struct relay *r, X509 *cert, char *fp, size_t fplen);

/* Sessions register and unregister themselves; relay_admit() says whether
 * another one fits under [relay] max_connections. */
void relay_session_add(struct relay *r, struct relay_session *s);
void relay_session_gone(struct relay *r, struct relay_session *s);
int relay_admit(const struct relay *r);

#endif
