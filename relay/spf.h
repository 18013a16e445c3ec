/*
 * spf: evaluation of SPF records (RFC 7208 check_host()) as a pure,
 * resumable state machine: it never does I/O itself. The caller runs
 *
 *     while (spf_step(e, &q) == SPF_STEP_QUERY)
 *         spf_answer(e, <the lib/dns result of q.name, q.type>);
 *
 * asynchronously (the relay's self-check answers from c-ares callbacks)
 * or from a table (the unit tests). The result and a one-line explanation
 * are then read with spf_result() and spf_explain().
 *
 * What is evaluated (RFC 7208 sections 4 and 5): the one "v=spf1" TXT
 * record of the domain (none: "none"; more than one: "permerror"), the
 * mechanisms all, include, a, mx, ptr, ip4, ip6 and exists with their
 * qualifiers (+ - ~ ?) and dual CIDR lengths, the redirect= modifier
 * (ignored when the record has an "all"), and macros in domain specs
 * (section 7: letters s l o d i p v h, digit and "r" transformers,
 * delimiters, %% %_ %-; "p" expands to "unknown" as section 7.3 allows).
 * exp= and unknown modifiers are accepted and not evaluated. The limits of
 * section 4.6.4 apply: at most 10 mechanisms and modifiers that query DNS
 * (include, a, mx, ptr, exists, redirect), at most 10 address lookups per
 * mx and ptr, at most 2 lookups answered with NXDOMAIN or no records
 * ("void lookups"); past them the result is "permerror". A DNS failure
 * other than NXDOMAIN and NODATA gives "temperror" (section 4.4), except
 * within ptr, which then does not match (section 5.5).
 */
#ifndef MF_RELAY_SPF_H
#define MF_RELAY_SPF_H

#include <stddef.h>

#include "lib/dns.h"

enum spf_result {
    SPF_NONE = 0,
    SPF_NEUTRAL,
    SPF_PASS,
    SPF_FAIL,
    SPF_SOFTFAIL,
    SPF_TEMPERROR,
    SPF_PERMERROR,
};

/* "none", "neutral", "pass", "fail", "softfail", "temperror",
 * "permerror" (RFC 7208 section 2.6). */
const char *spf_result_name(enum spf_result r);

/* RFC 1035 section 2.3.4: 253 octets in text form without the final dot. */
#define SPF_NAME_MAX 253

struct spf_query {
    char name[SPF_NAME_MAX + 1];
    enum dns_type type;          /* DNS_T_TXT, DNS_T_A, DNS_T_AAAA, DNS_T_MX,
                                    DNS_T_PTR */
};

enum { SPF_STEP_DONE = 0, SPF_STEP_QUERY = 1 };

struct spf;

/*
 * Starts check_host(ip, domain, sender): ip is the client address as text
 * (IPv4 or IPv6), domain the domain whose record is evaluated, sender the
 * envelope sender ("local@domain"; NULL: "postmaster@<domain>", RFC 7208
 * section 4.3) and helo the name for the "h" macro (NULL: domain).
 * Returns NULL when ip is not an address or domain is empty or too long.
 */
struct spf *spf_new(const char *ip, const char *domain, const char *sender, const char *helo);

/*
 * Runs the evaluation until it needs a DNS answer (returns SPF_STEP_QUERY
 * with *q filled; the next call must be spf_answer() for it) or has its
 * result (SPF_STEP_DONE, also on every later call).
 */
int spf_step(struct spf *e, struct spf_query *q);

/* The answer to the last query (r->status DNS_OK or a DNS_E* code). The
 * result is read during the call and not kept. */
void spf_answer(struct spf *e, const struct dns_result *r);

/* Valid once spf_step() returned SPF_STEP_DONE. */
enum spf_result spf_result(const struct spf *e);
/* Why, in one line: "ip4:192.0.2.0/24 matched in example.com", "no
 * mechanism matched in example.com", "too many DNS lookups", ... Valid
 * until spf_free(). */
const char *spf_explain(const struct spf *e);
/* DNS lookups made by mechanisms and modifiers (for logs and tests). */
unsigned spf_lookups(const struct spf *e);

void spf_free(struct spf *e);

#endif
