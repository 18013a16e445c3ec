/*
 * selfcheck: the relay's periodic look at its own standing as a sender,
 * the facts receivers judge it by, reported to routers over the tunnel
 * (docs/relay.md has the wire format).
 *
 * Checks, each with a name used in logs and on the wire:
 *   ptr            the PTR record of public_ip names helo_name, and
 *                  helo_name's A (or AAAA) records hold public_ip
 *                  (forward-confirmed reverse DNS, RFC 8601 section 3 "iprev")
 *   dnsbl:<zone>   public_ip is not listed in the DNSBL zone (RFC 5782: an
 *                  A record in 127.0.0.0/8 under the reversed address means
 *                  listed, and its TXT record says why; NXDOMAIN means not
 *                  listed; 127.255.255.0/24 answers are the zones' error
 *                  codes, such as Spamhaus refusing public resolvers, and
 *                  are not listings)
 *   spf:<domain>   the SPF record of the domain gives "pass" for public_ip
 *                  (relay/spf.c, RFC 7208)
 *
 * A run starts every interval seconds (the first at once); its checks go
 * out together and the results are taken when the last one is in. Each
 * check is "ok" or "fail"; before the first result it is "pending". A
 * lookup that fails for a reason that may pass (timeout, SERVFAIL) keeps
 * the check's previous result, so a DNS hiccup does not flap the status
 * (the reason says so); with no previous result it counts as "fail".
 * Every change of a check, and of the overall status, is logged:
 *   event=selfcheck check=ptr from=ok to=fail reason="..."
 *   event=selfcheck_status from=ok to=degraded failing=ptr,dnsbl:zone
 * The overall status is "ok" when no check fails, "degraded" otherwise,
 * and "pending" until the first run has finished.
 */
#ifndef MF_RELAY_SELFCHECK_H
#define MF_RELAY_SELFCHECK_H

#include <stddef.h>
#include <time.h>
#include <uv.h>

#include "lib/buf.h"
#include "lib/dns.h"

struct selfcheck_opts {
    const char *public_ip;            /* the address mail leaves from */
    const char *helo_name;            /* the name the relay says in EHLO */
    const char *dnsbl_zones;          /* comma/space list, may be empty */
    const char *spf_domains;          /* comma/space list, may be empty */
    unsigned interval;                /* seconds between runs */
};

struct selfcheck;

/* Options are copied. dns must outlive the selfcheck (see
 * selfcheck_close()). Returns NULL with a message in err when public_ip is
 * not an address. */
struct selfcheck *selfcheck_new(uv_loop_t *loop, struct dns *dns,
                                const struct selfcheck_opts *opts, char *err, size_t errlen);

/* Starts the first run and the interval timer. */
void selfcheck_start(struct selfcheck *sc);

/* The value of the EHLO keyword X-MAILFERRY-STATUS: "ok", "pending", or
 * "degraded <failing checks, comma-separated, no spaces>". */
void selfcheck_summary(const struct selfcheck *sc, char *out, size_t n);

/* 1 when the status is ok, 0 when degraded or pending. */
int selfcheck_ok(const struct selfcheck *sc);

/* Unix time the last run finished, 0 before the first. */
time_t selfcheck_checked(const struct selfcheck *sc);

/*
 * Appends the reply to XSTATUS: one line per check, "250-<name> <state>
 * <reason>", then "250 2.0.0 status <ok|degraded|pending> checked=<unix
 * time>". Lines end with CRLF and hold printable ASCII only.
 */
void selfcheck_report(const struct selfcheck *sc, struct buf *out);

/* Stops the timer. The selfcheck frees itself once its DNS queries have
 * completed, which dns_close() forces; call dns_close() afterwards. */
void selfcheck_close(struct selfcheck *sc);

#endif
