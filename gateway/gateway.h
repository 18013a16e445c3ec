/*
 * gateway: the SMTP front end's listeners and the state shared by its
 * sessions (configuration, queue, TLS context, users, connection counts).
 *
 * Three listener kinds (RFC 6409 submission and RFC 8314 implicit TLS):
 *   listen             plain SMTP, STARTTLS offered when a certificate is
 *                      configured; clients in allowed_networks may send,
 *                      others only after AUTH
 *   listen_submission  STARTTLS, then AUTH required before MAIL
 *   listen_tls         TLS from the first byte, AUTH required before MAIL
 */
#ifndef MF_GATEWAY_H
#define MF_GATEWAY_H

#include <stddef.h>
#include <uv.h>

#include "lib/config.h"
#include "lib/metrics.h"
#include "lib/queue.h"
#include "lib/tls.h"
#include "gateway/users.h"

enum gateway_listener_kind {
    GATEWAY_LISTEN_PLAIN = 0,
    GATEWAY_LISTEN_SUBMISSION,
    GATEWAY_LISTEN_TLS,
};

struct gateway;
struct smtp_session;
struct dkim_keys;

/*
 * Loads the TLS certificate, the users file and the DKIM keys named in cfg
 * (without opening anything). Used by --check-config and at start. Returns 0, or -1
 * with a message in err.
 */
int gateway_check(const struct mf_config *cfg, char *err, size_t errlen);

/*
 * Creates the gateway and opens its listeners on loop. cfg and q must
 * outlive it. Returns NULL with a message in err (bad certificate, users
 * file, address in use).
 */
struct gateway *gateway_new(uv_loop_t *loop, const struct mf_config *cfg, struct queue *q,
                            char *err, size_t errlen);

/* SIGHUP: reloads the TLS certificate, the users file and the DKIM keys.
 * Sessions keep what they started with; new sessions, new AUTH/STARTTLS
 * and new signatures use the new ones. On error the old ones stay and -1
 * is returned (logged). */
int gateway_reload(struct gateway *gw);

/*
 * SIGTERM: closes the listeners, lets every open transaction finish for at
 * most [gateway] shutdown_grace seconds, closes idle sessions at once with
 * 421, aborts the rest when the grace period ends, and calls done(arg) from
 * the loop when the last session is gone. The gateway is freed afterwards
 * with gateway_free().
 */
void gateway_shutdown(struct gateway *gw, void (*done)(void *arg), void *arg);
void gateway_free(struct gateway *gw);

/* Accessors for sessions. */
const struct mf_config *gateway_config(const struct gateway *gw);
struct queue *gateway_queue(const struct gateway *gw);
/* The current TLS server context, or NULL when none is configured. */
struct tls_ctx *gateway_tls(const struct gateway *gw);
/* The current users, or NULL when no users file is configured. */
struct users *gateway_users(const struct gateway *gw);
/* The current DKIM keys (possibly an empty set; gateway/dkim.h). A session
 * that signs takes its own reference for the time it signs. */
struct dkim_keys *gateway_dkim(const struct gateway *gw);
/* 1 while the queue's write backlog is over its high-water mark. */
int gateway_paused(const struct gateway *gw);
/* 1 once gateway_shutdown() was called. */
int gateway_stopping(const struct gateway *gw);
uv_loop_t *gateway_loop(const struct gateway *gw);

#define GATEWAY_LIMIT_TOTAL (-1)
#define GATEWAY_LIMIT_PER_IP (-2)

/* The listener kind as the "listener" label of metrics and logs:
 * "smtp", "submission" or "submissions". */
const char *gateway_listener_label(enum gateway_listener_kind kind);

/* Listeners open and accepting; 0 once gateway_shutdown() was called. For
 * the readiness check. */
size_t gateway_listening(const struct gateway *gw);

/* The gateway's metric families in the default registry (lib/metrics.h,
 * docs/metrics.md), registered by gateway_new(); for sessions. */
struct gateway_metrics {
    struct metric_family *connections;   /* gauge {listener} */
    struct metric_family *sessions;      /* counter {listener} */
    struct metric_family *accepted;      /* counter */
    struct metric_family *rejected;      /* counter {reason} */
    struct metric_family *bytes;         /* histogram: accepted message sizes */
    struct metric_family *enqueue;       /* histogram: seconds until Redis committed */
};
const struct gateway_metrics *gateway_metrics(const struct gateway *gw);

/* Connection limits: returns 0 and counts the connection, or
 * GATEWAY_LIMIT_TOTAL / GATEWAY_LIMIT_PER_IP. */
int gateway_admit(struct gateway *gw, const char *ip);

/* Session registry: add at accept, gone when the session is freed (which
 * also releases what gateway_admit() counted). */
void gateway_session_add(struct gateway *gw, struct smtp_session *s);
void gateway_session_gone(struct gateway *gw, struct smtp_session *s);

#endif
