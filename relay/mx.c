/*
 * mx: MX ordering, null MX, address literals and lookup failure replies.
 * Pure functions; see mx.h.
 */
#include "relay/mx.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

int mx_is_null(const struct dns_mx *mx, size_t n)
{
    return n == 1 && mx[0].preference == 0 && mx[0].host != NULL &&
           (mx[0].host[0] == '\0' || strcmp(mx[0].host, ".") == 0);
}

/* Compares two host names without case and without a trailing dot. */
static int mx_same_host(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);

    if (la > 0 && a[la - 1] == '.')
        la--;
    if (lb > 0 && b[lb - 1] == '.')
        lb--;
    return la == lb && strncasecmp(a, b, la) == 0;
}

static int mx_empty_host(const char *h)
{
    return h == NULL || h[0] == '\0' || strcmp(h, ".") == 0;
}

size_t mx_order(const struct dns_mx *mx, size_t n, size_t *order, size_t max, mx_rand_fn rnd,
                void *arg)
{
    size_t k = 0, i, j, start;

    if (max == 0)
        return 0;
    for (i = 0; i < n; i++) {
        size_t dup = k;

        if (mx_empty_host(mx[i].host))
            continue;
        for (j = 0; j < k; j++) {
            if (mx_same_host(mx[order[j]].host, mx[i].host)) {
                dup = j;
                break;
            }
        }
        if (dup < k) {
            if (mx[i].preference < mx[order[dup]].preference)
                order[dup] = i;
            continue;
        }
        if (k == max) {
            /* Full: keep the best max; replace the worst when this one is
             * preferred. */
            size_t worst = 0;

            for (j = 1; j < k; j++)
                if (mx[order[j]].preference > mx[order[worst]].preference)
                    worst = j;
            if (mx[i].preference < mx[order[worst]].preference)
                order[worst] = i;
            continue;
        }
        order[k++] = i;
    }
    /* Insertion sort by preference; stable, and k is at most max. */
    for (i = 1; i < k; i++) {
        size_t v = order[i];

        for (j = i; j > 0 && mx[order[j - 1]].preference > mx[v].preference; j--)
            order[j] = order[j - 1];
        order[j] = v;
    }
    /* Fisher-Yates within each run of equal preference. */
    for (start = 0; start < k; start = i) {
        for (i = start + 1; i < k && mx[order[i]].preference == mx[order[start]].preference; i++)
            ;
        for (j = i - 1; j > start; j--) {
            size_t r = start + rnd(arg, (unsigned)(j - start + 1)), t;

            t = order[j];
            order[j] = order[r];
            order[r] = t;
        }
    }
    return k;
}

int mx_literal(const char *domain, struct sockaddr_storage *ss, socklen_t *len)
{
    char buf[INET6_ADDRSTRLEN + 8];
    size_t n = strlen(domain);

    if (n == 0 || domain[0] != '[')
        return 0;
    if (n < 3 || domain[n - 1] != ']' || n - 2 >= sizeof(buf))
        return -1;
    memcpy(buf, domain + 1, n - 2);
    buf[n - 2] = '\0';
    memset(ss, 0, sizeof(*ss));
    if (strncasecmp(buf, "IPv6:", 5) == 0) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

        if (inet_pton(AF_INET6, buf + 5, &s6->sin6_addr) != 1)
            return -1;
        s6->sin6_family = AF_INET6;
        *len = sizeof(*s6);
        return 1;
    }
    {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;

        if (inet_pton(AF_INET, buf, &s4->sin_addr) != 1)
            return -1;
        s4->sin_family = AF_INET;
        *len = sizeof(*s4);
    }
    return 1;
}

static void mx_fail(struct mx_failure *out, int code, const char *enh)
{
    out->code = code;
    out->enhanced = enh;
}

void mx_dns_failure(int st, const char *domain, struct mx_failure *out)
{
    if (st == DNS_ENOTFOUND) {
        mx_fail(out, 550, "5.1.2");
        snprintf(out->text, sizeof(out->text), "domain %s does not exist (DNS: NXDOMAIN)",
                 domain);
        return;
    }
    mx_fail(out, 451, "4.4.3");
    snprintf(out->text, sizeof(out->text), "DNS lookup of the mail hosts of %s failed (%s), "
             "try again later", domain, dns_strerror(st));
}

void mx_null_failure(const char *domain, struct mx_failure *out)
{
    mx_fail(out, 556, "5.1.10");
    snprintf(out->text, sizeof(out->text), "domain %s does not accept mail (null MX, "
             "RFC 7505)", domain);
}

void mx_noaddr_failure(const char *domain, int temporary, struct mx_failure *out)
{
    if (temporary) {
        mx_fail(out, 451, "4.4.3");
        snprintf(out->text, sizeof(out->text), "DNS lookup of the addresses of the mail "
                 "hosts of %s failed, try again later", domain);
    } else {
        mx_fail(out, 550, "5.4.4");
        snprintf(out->text, sizeof(out->text), "no mail host of %s has an address", domain);
    }
}

void mx_domain_normalize(char *domain)
{
    size_t n = strlen(domain);

    for (size_t i = 0; i < n; i++)
        domain[i] = (char)tolower((unsigned char)domain[i]);
    if (n > 1 && domain[n - 1] == '.')
        domain[n - 1] = '\0';
}
