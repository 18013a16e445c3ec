/*
 * cidr: lists of IPv4 and IPv6 networks (RFC 4632 section 3.1 notation for
 * IPv4, RFC 4291 section 2.3 for IPv6) and matching peers against them.
 */
#include "lib/cidr.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/xmalloc.h"

/* The longest element accepted: an IPv6 address in its longest text form
 * (INET6_ADDRSTRLEN counts the NUL) and "/128". */
#define CIDR_ELEM_MAX (INET6_ADDRSTRLEN - 1 + 4)

static int cidr_is_sep(unsigned char c)
{
    return c == ',' || isspace(c);
}

static void cidr_err(char *err, size_t errlen, const char *elem, size_t len, const char *why)
{
    if (err == NULL || errlen == 0)
        return;
    if (len > 64)
        snprintf(err, errlen, "bad network \"%.*s...\": %s", 64, elem, why);
    else
        snprintf(err, errlen, "bad network \"%.*s\": %s", (int)len, elem, why);
}

/* Returns 1 when the first prefix bits of a and net are equal. */
static int cidr_prefix_eq(const unsigned char *a, const unsigned char *net, unsigned prefix)
{
    unsigned full = prefix / 8, rem = prefix % 8;

    if (memcmp(a, net, full) != 0)
        return 0;
    if (rem) {
        unsigned char mask = (unsigned char)(0xffu << (8 - rem));
        return (a[full] & mask) == (net[full] & mask);
    }
    return 1;
}

/* Clears the bits after prefix; returns 1 when any of them was set. */
static int cidr_clear_host_bits(unsigned char *a, size_t alen, unsigned prefix)
{
    int was_set = 0;

    for (size_t i = 0; i < alen; i++) {
        unsigned bit0 = (unsigned)i * 8;
        unsigned char keep;

        if (bit0 + 8 <= prefix)
            keep = 0xff;
        else if (bit0 >= prefix)
            keep = 0;
        else
            keep = (unsigned char)(0xffu << (8 - (prefix - bit0)));
        if (a[i] & (unsigned char)~keep)
            was_set = 1;
        a[i] &= keep;
    }
    return was_set;
}

/*
 * Parses one element, "address" or "address/length", into c. The length is
 * 1 to 3 decimal digits with no sign. The family follows from the address:
 * one holding ':' is IPv6. inet_pton does the address syntax, so IPv4
 * octets with leading zeros (ambiguous, octal to some parsers) and IPv6
 * zone identifiers are rejected. Returns 0, or -1 with err set.
 */
static int cidr_parse_elem(const char *e, size_t len, struct cidr *c, char *err, size_t errlen)
{
    char text[CIDR_ELEM_MAX + 1];
    const char *slash;
    size_t alen;
    unsigned maxp, prefix;

    if (len > CIDR_ELEM_MAX) {
        cidr_err(err, errlen, e, len, "too long");
        return -1;
    }
    memcpy(text, e, len);
    text[len] = '\0';

    slash = memchr(text, '/', len);
    alen = slash ? (size_t)(slash - text) : len;
    text[alen] = '\0';

    memset(c, 0, sizeof(*c));
    if (memchr(text, ':', alen) != NULL) {
        c->family = AF_INET6;
        maxp = 128;
    } else {
        c->family = AF_INET;
        maxp = 32;
    }
    if (alen == 0 || inet_pton(c->family, text, c->addr) != 1) {
        cidr_err(err, errlen, e, len,
                 c->family == AF_INET6 ? "not an IPv6 address" : "not an IPv4 address");
        return -1;
    }

    prefix = maxp;
    if (slash) {
        const char *d = slash + 1;
        size_t dlen = len - alen - 1;

        if (dlen == 0 || dlen > 3) {
            cidr_err(err, errlen, e, len, "bad prefix length");
            return -1;
        }
        prefix = 0;
        for (size_t i = 0; i < dlen; i++) {
            if (d[i] < '0' || d[i] > '9') {
                cidr_err(err, errlen, e, len, "bad prefix length");
                return -1;
            }
            prefix = prefix * 10 + (unsigned)(d[i] - '0');
        }
        if (prefix > maxp) {
            cidr_err(err, errlen, e, len,
                     maxp == 32 ? "prefix length out of range 0..32"
                                : "prefix length out of range 0..128");
            return -1;
        }
    }
    c->prefix = prefix;

    if (cidr_clear_host_bits(c->addr, maxp / 8, prefix)) {
        char net[INET6_ADDRSTRLEN], why[INET6_ADDRSTRLEN + 48];

        if (inet_ntop(c->family, c->addr, net, sizeof(net)) == NULL)
            net[0] = '\0';
        snprintf(why, sizeof(why), "host bits set (the network is %s/%u)", net, prefix);
        cidr_err(err, errlen, e, len, why);
        return -1;
    }
    return 0;
}

int cidr_list_parse(const char *s, struct cidr_list *out, char *err, size_t errlen)
{
    struct cidr *v = NULL;
    size_t n = 0, cap = 0;
    const char *p = s ? s : "";

    cidr_list_free(out);
    if (err && errlen)
        err[0] = '\0';

    for (;;) {
        const char *start;
        struct cidr c;

        /* Separators may repeat: ", ,", ",," and trailing commas are
         * empty elements and are skipped. */
        while (*p && cidr_is_sep((unsigned char)*p))
            p++;
        if (*p == '\0')
            break;
        start = p;
        while (*p && !cidr_is_sep((unsigned char)*p))
            p++;
        if (cidr_parse_elem(start, (size_t)(p - start), &c, err, errlen) != 0) {
            free(v);
            return -1;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            v = xrealloc(v, cap * sizeof(*v));
        }
        v[n++] = c;
    }
    out->v = v;
    out->n = n;
    return 0;
}

/*
 * An AF_INET peer is compared with the IPv4 networks. An AF_INET6 peer is
 * compared with the IPv6 networks and, when it is an IPv4-mapped address
 * (RFC 4291 section 2.5.5.2, what a dual-stack socket reports for an IPv4
 * client), its embedded IPv4 address is compared with the IPv4 networks
 * too. A plain IPv4 peer never matches an IPv6 network.
 */
int cidr_list_match(const struct cidr_list *l, const struct sockaddr *sa)
{
    unsigned char v4[4], v6[16];
    int has4 = 0, has6 = 0;

    if (l == NULL || sa == NULL)
        return 0;
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in sin;

        memcpy(&sin, sa, sizeof(sin));
        memcpy(v4, &sin.sin_addr, 4);
        has4 = 1;
    } else if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 sin6;

        memcpy(&sin6, sa, sizeof(sin6));
        memcpy(v6, &sin6.sin6_addr, 16);
        has6 = 1;
        if (IN6_IS_ADDR_V4MAPPED(&sin6.sin6_addr)) {
            memcpy(v4, v6 + 12, 4);
            has4 = 1;
        }
    } else {
        return 0;
    }

    for (size_t i = 0; i < l->n; i++) {
        const struct cidr *c = &l->v[i];

        if (c->family == AF_INET && has4 && cidr_prefix_eq(v4, c->addr, c->prefix))
            return 1;
        if (c->family == AF_INET6 && has6 && cidr_prefix_eq(v6, c->addr, c->prefix))
            return 1;
    }
    return 0;
}

void cidr_list_free(struct cidr_list *l)
{
    if (l == NULL)
        return;
    free(l->v);
    l->v = NULL;
    l->n = 0;
}
