/*
 * mx: the pure part of choosing where a domain's mail goes (RFC 5321
 * section 5.1, RFC 7505), with no I/O, so that it can be tested with
 * tables.
 *
 *   - the order in which MX hosts are tried: ascending preference, and a
 *     random order among hosts of equal preference (section 5.1: "the
 *     sender-SMTP MUST randomize them to spread the load");
 *   - the null MX of RFC 7505 ("MX 0 ."), which says the domain accepts
 *     no mail;
 *   - address literals ("[192.0.2.1]", "[IPv6:2001:db8::1]", RFC 5321
 *     section 4.1.3), which name the host directly;
 *   - the reply the relay gives when the DNS cannot name a host.
 */
#ifndef MF_RELAY_MX_H
#define MF_RELAY_MX_H

#include <stddef.h>
#include <sys/socket.h>

#include "lib/dns.h"

/* At most this many MX hosts of one domain are tried (Postfix's
 * smtp_mx_address_limit is 5, sendmail tries every one; ten covers every
 * real domain and bounds the lookups one transaction causes). */
#define MX_HOSTS_MAX 10

/* Returns a random number in [0, n), n > 0. */
typedef unsigned (*mx_rand_fn)(void *arg, unsigned n);

/*
 * RFC 7505 section 3: a domain that accepts no mail publishes exactly one
 * MX record with preference 0 and the root as host (lib/dns gives the
 * root as ""). Returns 1 for such a record set, else 0. A set that mixes
 * a null MX with real ones is not a null MX (the mistake is the
 * publisher's, and the real hosts are used; mx_order() skips the empty
 * one).
 */
int mx_is_null(const struct dns_mx *mx, size_t n);

/*
 * Writes into order[] the indexes of the records of mx[0..n) to try, at
 * most max: records with an empty host are left out, a host listed twice
 * (names compared without case and trailing dot) is kept once with its
 * lowest preference, the rest are sorted by ascending preference and the
 * hosts of one preference are shuffled with rnd. Returns how many indexes
 * were written.
 */
size_t mx_order(const struct dns_mx *mx, size_t n, size_t *order, size_t max, mx_rand_fn rnd,
                void *arg);

/*
 * RFC 5321 section 4.1.3: "[a.b.c.d]" or "[IPv6:...]". Returns 1 and
 * fills *ss / *len (port 0) when domain is such a literal with a valid
 * address, 0 when domain is not a literal, -1 when it is a malformed one.
 */
int mx_literal(const char *domain, struct sockaddr_storage *ss, socklen_t *len);

/* What the relay answers at RCPT when the lookup of a domain's mail
 * hosts fails. */
struct mx_failure {
    int code;                 /* 4xx or 5xx */
    const char *enhanced;     /* RFC 3463 */
    char text[320];
};

/*
 * The reply for a failed MX lookup of domain with lib/dns status st (a
 * DNS_E* code):
 *   DNS_ENOTFOUND (NXDOMAIN)          550 5.1.2 the domain does not exist
 *   everything else (timeout, SERVFAIL, REFUSED, unreachable server)
 *                                     451 4.4.3 try again later
 * (DNS_ENODATA is not a failure for MX: it means "use the implicit MX".)
 */
void mx_dns_failure(int st, const char *domain, struct mx_failure *out);

/* RFC 7505 section 4.2: 556 5.1.10 for a domain with a null MX. */
void mx_null_failure(const char *domain, struct mx_failure *out);

/*
 * The reply when no host of the domain has an address: permanent (550
 * 5.4.4, RFC 3463 "unable to route") when every address lookup said the
 * names do not exist or have no address, temporary (451 4.4.3) when at
 * least one lookup failed for a reason that may pass.
 */
void mx_noaddr_failure(const char *domain, int temporary, struct mx_failure *out);

/* Lower-cases an ASCII domain name in place and drops one trailing dot. */
void mx_domain_normalize(char *domain);

#endif
