/*
 * dns_cmd: "mailferryctl dns check DOMAIN", one command that says whether
 * the DNS is right for mail from DOMAIN through the relay and the APIs
 * (docs/dkim.md):
 *
 *   SPF    one v=spf1 record (RFC 7208 section 4.5) whose evaluation
 *          (check_host(), section 4, by the relay's evaluator relay/spf.h)
 *          passes for every [dns] relay_ip, that includes the API
 *          providers (the [route NAME] sections' provider keys and [dns]
 *          spf_includes), and that does not end in +all;
 *   DKIM   for each configured key of DOMAIN, a record at
 *          <selector>._domainkey.<DOMAIN> that holds the key's public half
 *          (RFC 6376 section 3.6.2), not revoked, not in test mode;
 *   DMARC  a v=DMARC1 record at _dmarc.<DOMAIN> (or inherited from a
 *          parent domain) with a policy; p=none is a warning;
 *   PTR    for each relay_ip a PTR record naming relay_hostname that
 *          resolves back to the address (forward-confirmed reverse DNS);
 *   DNSBL  relay_ip listed in none of [dns] dnsbl_zones (RFC 5782).
 *
 * Lookups go through lib/dns.h (c-ares) to [dns] resolver or
 * --resolver IP[:PORT]. The result is a table (or JSON with --json) with
 * OK, WARN, FAIL or SKIP per check and what to fix.
 *
 * argv[0] is "dns"; json (mailferryctl's --json) asks for JSON output, as
 * does --json after the command. Returns 0 when every required check
 * passed (warnings allowed), 1 when one failed or could not be completed,
 * 2 for bad usage or configuration.
 */
#ifndef MF_CTL_DNS_CMD_H
#define MF_CTL_DNS_CMD_H

int ctl_dns_main(int argc, char **argv, const char *config_path, int json);

/* The usage lines of the dns commands, for mailferryctl's help. */
extern const char ctl_dns_usage[];

#endif
