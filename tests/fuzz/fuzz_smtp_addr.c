/*
 * libFuzzer harness for lib/smtp_addr.
 *
 * The input is handed, unchanged, to smtp_addr_parse_mail() and to
 * smtp_addr_parse_rcpt() (with and without SMTPUTF8), and its NUL-terminated
 * copy to smtp_addr_domain_valid(). Whatever the result, the output must be
 * consistent: addr NUL-terminated inside its array, local_len <= strlen(addr),
 * domain pointing inside addr, a short printable reason on error. A parsed
 * mailbox must respect the RFC 5321 limits, have a valid domain and parse
 * again to itself.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/smtp_addr.h"

static int has_8bit(const char *s, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            return 1;
    return 0;
}

static void check_why(int rc, const char *why)
{
    size_t i;

    if (rc == SMTP_ADDR_OK)
        return;
    if (rc < SMTP_ADDR_NEED_UTF8 || rc > SMTP_ADDR_SYNTAX || why == NULL)
        abort();
    for (i = 0; why[i] != '\0'; i++)
        if (why[i] < 0x20 || why[i] > 0x7e || i >= 60)
            abort();
    if (i == 0)
        abort();
}

/* Invariants that hold after any call, successful or not. */
static size_t check_shape(const struct smtp_path *p)
{
    const char *nul = memchr(p->addr, '\0', sizeof(p->addr));
    size_t n;

    if (nul == NULL)
        abort();
    n = (size_t)(nul - p->addr);
    if (p->local_len > n)
        abort();
    if (p->domain < p->addr || p->domain > p->addr + n)
        abort();
    return n;
}

/* An independent restatement of the label rules (RFC 1035 section 2.3.4,
 * RFC 5321 section 4.1.2) for a domain that is not an address literal. */
static void check_labels(const char *d)
{
    size_t n = strlen(d), i, start = 0;

    if (d[0] == '[') {
        if (d[n - 1] != ']')
            abort();
        return;
    }
    if (n == 0 || n > SMTP_DOMAIN_MAX)
        abort();
    for (i = 0; i <= n; i++) {
        if (i < n && d[i] != '.')
            continue;
        if (i == start || i - start > 63 || d[start] == '-' || d[i - 1] == '-')
            abort();
        start = i + 1;
    }
}

/* Invariants of a successfully parsed path. */
static void check_ok(const struct smtp_path *p, int utf8_allowed)
{
    size_t n = check_shape(p);

    if (p->utf8 != has_8bit(p->addr, n) || (p->utf8 && !utf8_allowed))
        abort();
    if (n == 0) {
        if (p->local_len != 0 || p->postmaster)
            abort();
        return;
    }
    if (p->postmaster) {
        if (strcmp(p->addr, "Postmaster") != 0 || p->local_len != n || p->domain != p->addr + n)
            abort();
        return;
    }
    /* "<" local "@" domain ">" is at most 256 octets. */
    if (n > SMTP_PATH_MAX - 2 || p->local_len == 0 || p->local_len > SMTP_LOCAL_MAX)
        abort();
    if (p->addr[p->local_len] != '@' || p->domain != p->addr + p->local_len + 1)
        abort();
    if (!smtp_addr_domain_valid(p->domain, 1))
        abort();
    check_labels(p->domain);
    if (!p->utf8 && !smtp_addr_domain_valid(p->domain, 0))
        abort();
}

/* Round trip: "<addr>" must parse back to the same mailbox. */
static void check_roundtrip(const struct smtp_path *p)
{
    char line[SMTP_PATH_MAX + 32];
    struct smtp_mail_args m;
    struct smtp_path r;
    const char *why = NULL;
    int len;

    if (p->addr[0] == '\0')
        return;
    if (!p->postmaster) {
        len = snprintf(line, sizeof(line), "FROM:<%s> SMTPUTF8", p->addr);
        if (len < 0 || (size_t)len >= sizeof(line))
            abort();
        if (smtp_addr_parse_mail(line, (size_t)len, &m, &why) != SMTP_ADDR_OK)
            abort();
        if (strcmp(m.path.addr, p->addr) != 0 || m.path.local_len != p->local_len)
            abort();
    }
    len = snprintf(line, sizeof(line), "TO:<%s>", p->addr);
    if (len < 0 || (size_t)len >= sizeof(line))
        abort();
    if (smtp_addr_parse_rcpt(line, (size_t)len, 1, &r, &why) != SMTP_ADDR_OK)
        abort();
    if (strcmp(r.addr, p->addr) != 0 || r.local_len != p->local_len ||
        r.postmaster != p->postmaster)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *arg = (const char *)data;
    struct smtp_mail_args m;
    struct smtp_path r0, r1;
    const char *why;
    char *z;
    int rc, rc0, rc1;

    why = NULL;
    rc = smtp_addr_parse_mail(arg, size, &m, &why);
    check_why(rc, why);
    check_shape(&m.path);
    if (rc == SMTP_ADDR_OK) {
        check_ok(&m.path, m.smtputf8);
        if (m.size < -1 || (m.body != SMTP_BODY_7BIT && m.body != SMTP_BODY_8BITMIME) ||
            (m.smtputf8 != 0 && m.smtputf8 != 1))
            abort();
        if (m.path.postmaster)
            abort();
        check_roundtrip(&m.path);
    } else if (m.path.addr[0] != '\0' || m.size != -1) {
        abort();
    }

    why = NULL;
    rc0 = smtp_addr_parse_rcpt(arg, size, 0, &r0, &why);
    check_why(rc0, why);
    check_shape(&r0);
    why = NULL;
    rc1 = smtp_addr_parse_rcpt(arg, size, 1, &r1, &why);
    check_why(rc1, why);
    check_shape(&r1);
    if (rc0 == SMTP_ADDR_OK) {
        check_ok(&r0, 0);
        if (r0.addr[0] == '\0')
            abort(); /* the null path is not a recipient */
        /* Allowing SMTPUTF8 never turns a good recipient bad. */
        if (rc1 != SMTP_ADDR_OK || strcmp(r0.addr, r1.addr) != 0)
            abort();
    }
    if (rc1 == SMTP_ADDR_OK) {
        check_ok(&r1, 1);
        if (r1.addr[0] == '\0')
            abort();
        if (rc0 != SMTP_ADDR_OK && rc0 != SMTP_ADDR_NEED_UTF8)
            abort();
        check_roundtrip(&r1);
    } else if (rc0 != rc1) {
        abort(); /* utf8_ok only decides NEED_UTF8, the last check */
    }

    /* smtp_addr_domain_valid on the NUL-terminated input. */
    z = malloc(size + 1);
    if (z == NULL)
        abort();
    memcpy(z, data, size);
    z[size] = '\0';
    {
        int v0 = smtp_addr_domain_valid(z, 0), v1 = smtp_addr_domain_valid(z, 1);

        if ((v0 != 0 && v0 != 1) || (v1 != 0 && v1 != 1) || (v0 && !v1))
            abort();
        if (v1 && strlen(z) > SMTP_DOMAIN_MAX)
            abort();
        if (v0 && z[0] != '[' && has_8bit(z, strlen(z)))
            abort();
    }
    free(z);
    return 0;
}
