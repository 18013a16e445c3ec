/*
 * The "relay" transport: the router's end of the tunnel to `mailferry
 * relay` on the physical host (docs/relay.md, docs/transports.md).
 *
 * Mail goes through the smtp transport (transports/smtp.c) configured for
 * the tunnel: TLS from the first byte, the router's client certificate,
 * the relay's certificate and name verified against the operator's private
 * CA (tunnel_ca), a pool of reused connections capped at max_connections.
 * What this module adds is the relay's health:
 *
 *   - a status connection of its own polls the relay every
 *     status_interval seconds with XSTATUS (it also reads the
 *     X-MAILFERRY-STATUS keyword of the EHLO reply when it connects);
 *   - the tunnel counts as down after status_failures checks in a row
 *     failed (connection refused, TLS refused, timeout, lost), where a
 *     delivery that could not set up its connection counts as a failed
 *     check too and starts the next check at once;
 *   - health() is 0 while the tunnel is down, while the relay reports
 *     itself degraded (PTR mismatch, DNSBL listing, SPF), and before the
 *     first check has finished; the reason says which ("relay degraded:
 *     dnsbl:zen.spamhaus.org ...", "relay tunnel down: connect: connection
 *     refused").
 *
 * The router asks health() every [router] policy_refresh and after every
 * result with transport_failure set, and, since relay_transport_ops sets
 * health_opens_breaker, opens the route's breaker when the route turns
 * unhealthy: traffic moves to the overflow route within seconds and comes
 * back through the breaker's half-open probes (docs/policy.md).
 */
#ifndef MF_TRANSPORTS_RELAY_H
#define MF_TRANSPORTS_RELAY_H

#include <stddef.h>

#include "transports/transport.h"

/* The relay listener's port when the route's host names none. */
#define RELAY_TRANSPORT_DEFAULT_PORT 4650

extern const struct transport_ops relay_transport_ops;

/* What the relay says about its self-check (docs/relay.md, "Self-check on
 * the wire"). */
enum relay_status_state {
    RELAY_STATUS_UNKNOWN = 0,    /* nothing parsed yet */
    RELAY_STATUS_OK,             /* every check passed */
    RELAY_STATUS_DEGRADED,       /* at least one check fails */
    RELAY_STATUS_PENDING,        /* the relay's first run has not finished */
};

struct relay_status {
    enum relay_status_state state;
    /* The failing checks, comma-separated ("ptr,dnsbl:zen.spamhaus.org"),
     * "" when none are known. */
    char failing[256];
    /* The reason the relay gave for the first failing check ("" from the
     * EHLO keyword, which carries none). */
    char reason[256];
    long long checked;           /* Unix time of the relay's last finished
                                    run (XSTATUS only), 0 when unknown */
};

/* Name of a state: "unknown", "ok", "degraded", "pending". */
const char *relay_status_name(enum relay_status_state s);

/*
 * Parses the parameters of the EHLO keyword X-MAILFERRY-STATUS: "ok",
 * "pending" or "degraded <check>[,<check>...]". Returns 0 with *out
 * filled, or -1 when the text is none of these (*out is then UNKNOWN).
 */
int relay_status_parse_keyword(const char *params, struct relay_status *out);

/*
 * Parses the text of a 2xx reply to XSTATUS as lib/smtp_reply gives it:
 * the reply's lines joined with "\n", without codes, the enhanced code of
 * the first line removed. Each line but the last is "<check> <ok|fail|
 * pending> <reason>"; the last is "[2.0.0 ]status <ok|degraded|pending>
 * checked=<unix time>". Returns 0 with *out filled (failing and reason
 * from the per-check lines), or -1 when the last line is not a status
 * line (*out is then UNKNOWN). Lines it does not understand are skipped:
 * a newer relay may report more.
 */
int relay_status_parse_xstatus(const char *text, struct relay_status *out);

#endif
