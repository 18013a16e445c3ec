#include "lib/smtp_addr.h"

#include <arpa/inet.h>
#include <limits.h>
#include <netinet/in.h>
#include <string.h>
#include <strings.h>

/* Which grammar the path parser applies: RFC 5321 section 4.1.2 Reverse-path
 * (null path allowed) or Forward-path (null path refused, bare Postmaster
 * allowed per section 4.1.1.3). */
enum path_kind { PATH_REVERSE, PATH_FORWARD };

/* A cursor over the caller's bytes. */
struct cursor {
    const unsigned char *p;
    size_t len;
    size_t pos;
};

static int at_end(const struct cursor *c)
{
    return c->pos >= c->len;
}

static int peek(const struct cursor *c)
{
    return c->pos < c->len ? c->p[c->pos] : -1;
}

static int is_alpha(int c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

static int is_digit(int c)
{
    return c >= '0' && c <= '9';
}

static int is_alnum(int c)
{
    return is_alpha(c) || is_digit(c);
}

/* RFC 5321 section 4.1.2 atext (RFC 5322 section 3.2.3), ASCII part. */
static int is_atext(int c)
{
    return is_alnum(c) || (c != 0 && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL);
}

/* RFC 5321 section 4.1.2 qtextSMTP, ASCII part: %d32-33 / %d35-91 / %d93-126. */
static int is_qtext(int c)
{
    return (c >= 32 && c <= 126) && c != '"' && c != '\\';
}

/* RFC 5321 section 4.1.3 dcontent: %d33-90 / %d94-126. */
static int is_dcontent(int c)
{
    return (c >= 33 && c <= 90) || (c >= 94 && c <= 126);
}

/*
 * Returns the length (2..4) of the well-formed UTF-8 sequence that starts at
 * p[0] (an octet >= 0x80), or 0 when it is not UTF8-non-ascii as defined in
 * RFC 3629 section 4 (no overlong forms, no surrogates, nothing past
 * U+10FFFF, no truncation).
 */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
    unsigned char c = p[0];
    unsigned char lo = 0x80, hi = 0xbf;
    size_t need, i;

    if (c >= 0xc2 && c <= 0xdf) {
        need = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
        need = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        need = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else {
        return 0;
    }
    if (n < need)
        return 0;
    if (p[1] < lo || p[1] > hi)
        return 0;
    for (i = 2; i < need; i++)
        if (p[i] < 0x80 || p[i] > 0xbf)
            return 0;
    return need;
}

/*
 * Address literal, RFC 5321 section 4.1.3, given with its brackets:
 *   address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
 *                           General-address-literal ) "]"
 * The IPv4 and IPv6 forms are checked with inet_pton(), which enforces the
 * Snum range and the IPv6 compression rules. The tag of a general literal
 * must be an Ldh-str ending in a letter or digit.
 */
static int literal_valid(const unsigned char *s, size_t n)
{
    char tmp[64];
    unsigned char addr[sizeof(struct in6_addr)];
    size_t i, colon;

    if (n < 3 || s[0] != '[' || s[n - 1] != ']')
        return 0;
    s++;
    n -= 2;
    for (i = 0; i < n; i++)
        if (!is_dcontent(s[i]))
            return 0;

    if (n > 5 && strncasecmp((const char *)s, "IPv6:", 5) == 0) {
        if (n - 5 >= sizeof(tmp))
            return 0;
        memcpy(tmp, s + 5, n - 5);
        tmp[n - 5] = '\0';
        return inet_pton(AF_INET6, tmp, addr) == 1;
    }

    for (colon = 0; colon < n && s[colon] != ':'; colon++)
        ;
    if (colon == n) {
        if (n >= sizeof(tmp))
            return 0;
        memcpy(tmp, s, n);
        tmp[n] = '\0';
        return inet_pton(AF_INET, tmp, addr) == 1;
    }

    /*
     * General-address-literal = Standardized-tag ":" 1*dcontent. The tag must
     * begin with a letter: the grammar's Ldh-str would also admit "2001" and
     * so take an untagged IPv6 address for a general literal, and every tag
     * IANA registers is a name.
     */
    if (colon == 0 || colon + 1 == n || !is_alpha(s[0]) || !is_alnum(s[colon - 1]))
        return 0;
    for (i = 0; i < colon; i++)
        if (!is_alnum(s[i]) && s[i] != '-')
            return 0;
    return 1;
}

/*
 * Checks s[0..n) as an RFC 5321 Domain (section 4.1.2):
 *   Domain = sub-domain *("." sub-domain)
 *   sub-domain = Let-dig [Ldh-str]
 * or as an address literal. Labels are at most 63 octets (RFC 1035 section
 * 2.3.4) and the whole at most 255 (RFC 5321 section 4.5.3.1.2). RFC 6531
 * section 3.3 adds U-labels; any well-formed non-ASCII UTF-8 character
 * counts as a letter there. *nonascii is set when such a character occurs.
 */
static int domain_check(const unsigned char *s, size_t n, int *nonascii, const char **why)
{
    size_t i = 0, label = 0;

    *nonascii = 0;
    if (n > SMTP_DOMAIN_MAX) {
        *why = "Domain too long";
        return SMTP_ADDR_TOO_LONG;
    }
    if (n > 0 && s[0] == '[') {
        if (literal_valid(s, n))
            return SMTP_ADDR_OK;
        *why = "Invalid address literal";
        return SMTP_ADDR_BAD_MAILBOX;
    }
    *why = "Invalid domain";
    if (n == 0)
        return SMTP_ADDR_BAD_MAILBOX;
    while (i < n) {
        unsigned char c = s[i];

        if (c == '.') {
            if (label == 0 || s[i - 1] == '-')
                return SMTP_ADDR_BAD_MAILBOX;
            label = 0;
            i++;
            continue;
        }
        if (c >= 0x80) {
            size_t k = utf8_seq(s + i, n - i);

            if (k == 0) {
                *why = "Invalid UTF-8 in address";
                return SMTP_ADDR_BAD_MAILBOX;
            }
            *nonascii = 1;
            i += k;
            label += k;
        } else if (is_alnum(c) || (c == '-' && label > 0)) {
            i++;
            label++;
        } else {
            return SMTP_ADDR_BAD_MAILBOX;
        }
        if (label > 63)
            return SMTP_ADDR_BAD_MAILBOX;
    }
    if (label == 0 || s[n - 1] == '-')
        return SMTP_ADDR_BAD_MAILBOX;
    return SMTP_ADDR_OK;
}

int smtp_addr_domain_valid(const char *domain, int utf8_ok)
{
    const char *why;
    int nonascii;

    if (domain_check((const unsigned char *)domain, strlen(domain), &nonascii, &why) != SMTP_ADDR_OK)
        return 0;
    return !nonascii || utf8_ok;
}

/*
 * Advances over a domain inside a path: an address literal up to and
 * including its "]", or the run of octets that may belong to a sub-domain.
 * The caller validates the span with domain_check().
 */
static int scan_domain(struct cursor *c)
{
    if (peek(c) == '[') {
        const unsigned char *end = memchr(c->p + c->pos, ']', c->len - c->pos);

        if (end == NULL)
            return -1;
        c->pos = (size_t)(end - c->p) + 1;
        return 0;
    }
    while (!at_end(c)) {
        int ch = c->p[c->pos];

        if (!is_alnum(ch) && ch != '-' && ch != '.' && ch < 0x80)
            break;
        c->pos++;
    }
    return 0;
}

/*
 * Local-part = Dot-string / Quoted-string (RFC 5321 section 4.1.2, with the
 * RFC 6531 section 3.3 extension of atext and qtextSMTP to UTF8-non-ascii).
 * Advances the cursor past the local part; *nonascii reports UTF-8 octets.
 */
static int scan_local(struct cursor *c, int *nonascii, const char **why)
{
    *why = "Invalid local part";
    if (peek(c) == '"') {
        c->pos++;
        for (;;) {
            int ch = peek(c);

            if (ch < 0)
                return SMTP_ADDR_BAD_MAILBOX;
            if (ch == '"') {
                c->pos++;
                return SMTP_ADDR_OK;
            }
            if (ch == '\\') {
                /* quoted-pairSMTP = %d92 %d32-126 */
                c->pos++;
                ch = peek(c);
                if (ch < 32 || ch > 126)
                    return SMTP_ADDR_BAD_MAILBOX;
                c->pos++;
            } else if (ch >= 0x80) {
                size_t k = utf8_seq(c->p + c->pos, c->len - c->pos);

                if (k == 0) {
                    *why = "Invalid UTF-8 in address";
                    return SMTP_ADDR_BAD_MAILBOX;
                }
                *nonascii = 1;
                c->pos += k;
            } else if (is_qtext(ch)) {
                c->pos++;
            } else {
                return SMTP_ADDR_BAD_MAILBOX;
            }
        }
    }

    /* Dot-string = Atom *("." Atom); Atom = 1*atext */
    {
        int in_atom = 0;

        for (;;) {
            int ch = peek(c);

            if (ch == '.') {
                if (!in_atom)
                    return SMTP_ADDR_BAD_MAILBOX;
                in_atom = 0;
                c->pos++;
            } else if (ch >= 0x80) {
                size_t k = utf8_seq(c->p + c->pos, c->len - c->pos);

                if (k == 0) {
                    *why = "Invalid UTF-8 in address";
                    return SMTP_ADDR_BAD_MAILBOX;
                }
                *nonascii = 1;
                in_atom = 1;
                c->pos += k;
            } else if (ch >= 0 && is_atext(ch)) {
                in_atom = 1;
                c->pos++;
            } else {
                break;
            }
        }
        return in_atom ? SMTP_ADDR_OK : SMTP_ADDR_BAD_MAILBOX;
    }
}

static void path_reset(struct smtp_path *out)
{
    memset(out, 0, sizeof(*out));
    out->domain = out->addr;
}

/*
 * Parses a Path starting at the "<" under the cursor and leaves the cursor
 * after the closing ">":
 *   Path = "<" [ A-d-l ":" ] Mailbox ">"
 *   A-d-l = At-domain *( "," At-domain )
 *   At-domain = "@" Domain
 *   Mailbox = Local-part "@" ( Domain / address-literal )
 * The source route is checked and dropped (RFC 5321 appendix C). *route_utf8
 * reports non-ASCII octets in the dropped route, which still need SMTPUTF8.
 */
static int parse_path(struct cursor *c, enum path_kind kind, struct smtp_path *out,
                      int *route_utf8, const char **why)
{
    size_t start = c->pos, lstart, llen, dstart, dlen;
    int rc, had_route = 0, nonascii = 0, dom_nonascii;

    *route_utf8 = 0;
    c->pos++; /* "<" */

    if (peek(c) == '>') {
        c->pos++;
        if (kind == PATH_FORWARD) {
            *why = "Null recipient not allowed";
            return SMTP_ADDR_BAD_MAILBOX;
        }
        return SMTP_ADDR_OK;
    }

    if (peek(c) == '@') {
        had_route = 1;
        for (;;) {
            size_t ds;

            if (peek(c) != '@') {
                *why = "Invalid source route";
                return SMTP_ADDR_BAD_MAILBOX;
            }
            c->pos++;
            ds = c->pos;
            if (scan_domain(c) < 0) {
                *why = "Invalid source route";
                return SMTP_ADDR_BAD_MAILBOX;
            }
            rc = domain_check(c->p + ds, c->pos - ds, &dom_nonascii, why);
            if (rc != SMTP_ADDR_OK)
                return rc;
            *route_utf8 |= dom_nonascii;
            if (peek(c) == ',') {
                c->pos++;
                continue;
            }
            if (peek(c) == ':') {
                c->pos++;
                break;
            }
            *why = "Invalid source route";
            return SMTP_ADDR_BAD_MAILBOX;
        }
    }

    lstart = c->pos;
    rc = scan_local(c, &nonascii, why);
    if (rc != SMTP_ADDR_OK)
        return rc;
    llen = c->pos - lstart;
    if (llen > SMTP_LOCAL_MAX) {
        *why = "Local part too long";
        return SMTP_ADDR_TOO_LONG;
    }

    if (peek(c) == '>') {
        /* RFC 5321 section 4.1.1.3: "Postmaster" without a domain must be
         * accepted as a recipient, matched case-insensitively. */
        if (kind == PATH_FORWARD && !had_route && llen == 10 &&
            strncasecmp((const char *)c->p + lstart, "Postmaster", 10) == 0) {
            c->pos++;
            memcpy(out->addr, "Postmaster", 10);
            out->addr[10] = '\0';
            out->local_len = 10;
            out->domain = out->addr + 10;
            out->postmaster = 1;
            return SMTP_ADDR_OK;
        }
        *why = "Missing domain";
        return SMTP_ADDR_BAD_MAILBOX;
    }
    if (peek(c) != '@')
        return SMTP_ADDR_BAD_MAILBOX; /* why: "Invalid local part" */
    c->pos++;

    dstart = c->pos;
    if (scan_domain(c) < 0) {
        *why = "Invalid address literal";
        return SMTP_ADDR_BAD_MAILBOX;
    }
    dlen = c->pos - dstart;
    rc = domain_check(c->p + dstart, dlen, &dom_nonascii, why);
    if (rc != SMTP_ADDR_OK)
        return rc;
    if (peek(c) != '>') {
        *why = "Invalid domain";
        return SMTP_ADDR_BAD_MAILBOX;
    }
    c->pos++;

    /* RFC 5321 section 4.5.3.1.3: the path, brackets and any source route
     * included, is at most 256 octets. This also bounds the copy below. */
    if (c->pos - start > SMTP_PATH_MAX) {
        *why = "Path too long";
        return SMTP_ADDR_TOO_LONG;
    }
    memcpy(out->addr, c->p + lstart, llen);
    out->addr[llen] = '@';
    memcpy(out->addr + llen + 1, c->p + dstart, dlen);
    out->addr[llen + 1 + dlen] = '\0';
    out->local_len = llen;
    out->domain = out->addr + llen + 1;
    out->utf8 = nonascii || dom_nonascii;
    return SMTP_ADDR_OK;
}

/*
 * Matches the case-insensitive keyword ("FROM:" or "TO:"), tolerates one
 * space after it and requires the "<" of the path. Leaves the cursor on "<".
 */
static int parse_prefix(struct cursor *c, const char *kw)
{
    size_t n = strlen(kw);

    if (c->len < n || strncasecmp((const char *)c->p, kw, n) != 0)
        return -1;
    c->pos = n;
    if (peek(c) == ' ')
        c->pos++;
    if (peek(c) != '<')
        return -1;
    /* Without any ">" the argument is not a path at all. */
    if (memchr(c->p + c->pos, '>', c->len - c->pos) == NULL)
        return -1;
    return 0;
}

/* esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-") */
static int keyword_valid(const unsigned char *s, size_t n)
{
    size_t i;

    if (n == 0 || !is_alnum(s[0]))
        return 0;
    for (i = 1; i < n; i++)
        if (!is_alnum(s[i]) && s[i] != '-')
            return 0;
    return 1;
}

/* esmtp-value = 1*(%d33-60 / %d62-126) */
static int value_valid(const unsigned char *s, size_t n)
{
    size_t i;

    if (n == 0)
        return 0;
    for (i = 0; i < n; i++)
        if (s[i] < 33 || s[i] > 126 || s[i] == '=')
            return 0;
    return 1;
}

/* RFC 3461 section 4: xtext = *( xchar / hexchar ), xchar = %d33-42 /
 * %d44-60 / %d62-126, hexchar = "+" 2(%x30-39 / %x41-46). */
static int xtext_valid(const unsigned char *s, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (s[i] == '+') {
            if (n - i < 3)
                return 0;
            if (!(is_digit(s[i + 1]) || (s[i + 1] >= 'A' && s[i + 1] <= 'F')) ||
                !(is_digit(s[i + 2]) || (s[i + 2] >= 'A' && s[i + 2] <= 'F')))
                return 0;
            i += 2;
        } else if (s[i] < 33 || s[i] > 126 || s[i] == '=') {
            return 0;
        }
    }
    return 1;
}

/* RFC 1870 section 3: size-value = 1*20DIGIT. A value that does not fit a
 * long long is refused rather than clamped. */
static int size_value(const unsigned char *s, size_t n, long long *out)
{
    long long v = 0;
    size_t i;

    if (n == 0 || n > 20)
        return -1;
    for (i = 0; i < n; i++) {
        if (!is_digit(s[i]))
            return -1;
        if (v > (LLONG_MAX - (s[i] - '0')) / 10)
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

enum param_bit {
    PARAM_SIZE = 1 << 0,
    PARAM_BODY = 1 << 1,
    PARAM_SMTPUTF8 = 1 << 2,
    PARAM_AUTH = 1 << 3,
};

/*
 * Parses the ESMTP parameters after the path (RFC 5321 section 4.1.2:
 * Mail-parameters = esmtp-param *(SP esmtp-param)); runs of spaces are
 * tolerated. Only the parameters in allowed are known; mail may be NULL
 * when none are.
 */
static int parse_params(struct cursor *c, unsigned allowed, struct smtp_mail_args *mail,
                        const char **why)
{
    unsigned seen = 0;

    if (at_end(c))
        return SMTP_ADDR_OK;
    if (peek(c) != ' ')
        return SMTP_ADDR_SYNTAX;

    for (;;) {
        const unsigned char *kw, *val = NULL;
        size_t kwlen, vallen = 0, tstart;
        const unsigned char *eq;
        unsigned bit;

        while (peek(c) == ' ')
            c->pos++;
        if (at_end(c))
            return SMTP_ADDR_OK;
        tstart = c->pos;
        while (!at_end(c) && c->p[c->pos] != ' ')
            c->pos++;
        kw = c->p + tstart;
        kwlen = c->pos - tstart;
        eq = memchr(kw, '=', kwlen);
        if (eq != NULL) {
            val = eq + 1;
            vallen = kwlen - (size_t)(val - kw);
            kwlen = (size_t)(eq - kw);
        }
        if (!keyword_valid(kw, kwlen) || (val != NULL && !value_valid(val, vallen))) {
            *why = "Syntax error in parameters";
            return SMTP_ADDR_BAD_PARAM;
        }

        if (kwlen == 4 && strncasecmp((const char *)kw, "SIZE", 4) == 0)
            bit = PARAM_SIZE;
        else if (kwlen == 4 && strncasecmp((const char *)kw, "BODY", 4) == 0)
            bit = PARAM_BODY;
        else if (kwlen == 8 && strncasecmp((const char *)kw, "SMTPUTF8", 8) == 0)
            bit = PARAM_SMTPUTF8;
        else if (kwlen == 4 && strncasecmp((const char *)kw, "AUTH", 4) == 0)
            bit = PARAM_AUTH;
        else
            bit = 0;
        if ((bit & allowed) == 0) {
            *why = "Unknown parameter";
            return SMTP_ADDR_BAD_PARAM;
        }
        if (seen & bit) {
            *why = "Duplicate parameter";
            return SMTP_ADDR_BAD_PARAM;
        }
        seen |= bit;

        switch (bit) {
        case PARAM_SIZE:
            if (val == NULL || size_value(val, vallen, &mail->size) < 0) {
                *why = "Invalid SIZE value";
                return SMTP_ADDR_BAD_PARAM;
            }
            break;
        case PARAM_BODY:
            /* RFC 6152 section 2: BODY=7BIT / BODY=8BITMIME. */
            if (val != NULL && vallen == 4 && strncasecmp((const char *)val, "7BIT", 4) == 0) {
                mail->body = SMTP_BODY_7BIT;
            } else if (val != NULL && vallen == 8 &&
                       strncasecmp((const char *)val, "8BITMIME", 8) == 0) {
                mail->body = SMTP_BODY_8BITMIME;
            } else {
                *why = "Invalid BODY value";
                return SMTP_ADDR_BAD_PARAM;
            }
            break;
        case PARAM_SMTPUTF8:
            /* RFC 6531 section 3.4: the parameter has no value. */
            if (val != NULL) {
                *why = "SMTPUTF8 takes no value";
                return SMTP_ADDR_BAD_PARAM;
            }
            mail->smtputf8 = 1;
            break;
        default: /* PARAM_AUTH, RFC 4954 section 5: checked, then ignored. */
            if (val == NULL || !xtext_valid(val, vallen)) {
                *why = "Invalid AUTH value";
                return SMTP_ADDR_BAD_PARAM;
            }
            break;
        }
    }
}

int smtp_addr_parse_mail(const char *arg, size_t len, struct smtp_mail_args *out,
                         const char **why)
{
    struct cursor c = {(const unsigned char *)arg, len, 0};
    int rc, route_utf8;

    path_reset(&out->path);
    out->size = -1;
    out->body = SMTP_BODY_7BIT;
    out->smtputf8 = 0;

    if (parse_prefix(&c, "FROM:") < 0) {
        *why = "Syntax: MAIL FROM:<address>";
        rc = SMTP_ADDR_SYNTAX;
        goto fail;
    }
    rc = parse_path(&c, PATH_REVERSE, &out->path, &route_utf8, why);
    if (rc != SMTP_ADDR_OK)
        goto fail;
    rc = parse_params(&c, PARAM_SIZE | PARAM_BODY | PARAM_SMTPUTF8 | PARAM_AUTH, out, why);
    if (rc == SMTP_ADDR_SYNTAX)
        *why = "Syntax: MAIL FROM:<address>";
    if (rc != SMTP_ADDR_OK)
        goto fail;
    /* RFC 6531 section 3.4: a non-ASCII reverse-path needs SMTPUTF8. */
    if ((out->path.utf8 || route_utf8) && !out->smtputf8) {
        *why = "SMTPUTF8 required for this address";
        rc = SMTP_ADDR_NEED_UTF8;
        goto fail;
    }
    return SMTP_ADDR_OK;

fail:
    path_reset(&out->path);
    out->size = -1;
    out->body = SMTP_BODY_7BIT;
    out->smtputf8 = 0;
    return rc;
}

int smtp_addr_parse_rcpt(const char *arg, size_t len, int utf8_ok, struct smtp_path *out,
                         const char **why)
{
    struct cursor c = {(const unsigned char *)arg, len, 0};
    int rc, route_utf8;

    path_reset(out);
    if (parse_prefix(&c, "TO:") < 0) {
        *why = "Syntax: RCPT TO:<address>";
        rc = SMTP_ADDR_SYNTAX;
        goto fail;
    }
    rc = parse_path(&c, PATH_FORWARD, out, &route_utf8, why);
    if (rc != SMTP_ADDR_OK)
        goto fail;
    rc = parse_params(&c, 0, NULL, why);
    if (rc == SMTP_ADDR_SYNTAX)
        *why = "Syntax: RCPT TO:<address>";
    if (rc != SMTP_ADDR_OK)
        goto fail;
    /* RFC 6531 section 3.4: a non-ASCII forward-path is only valid in a
     * transaction opened with SMTPUTF8. */
    if ((out->utf8 || route_utf8) && !utf8_ok) {
        *why = "SMTPUTF8 required for this address";
        rc = SMTP_ADDR_NEED_UTF8;
        goto fail;
    }
    return SMTP_ADDR_OK;

fail:
    path_reset(out);
    return rc;
}
