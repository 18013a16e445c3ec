/*
 * spf: RFC 7208 check_host() as a resumable state machine; see spf.h.
 *
 * Each check_host() invocation (the top one, and one per include: and
 * redirect=) is a frame on a small stack. A frame goes through its
 * record's terms in order; a mechanism that needs DNS sets the frame's
 * phase and the pending query, and spf_answer() resumes it. A finished
 * frame hands its result to the frame below, which maps it as section
 * 5.2 (include) or section 6.1 (redirect) says.
 */
#include "relay/spf.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "lib/buf.h"
#include "lib/xmalloc.h"

/* RFC 7208 section 4.6.4. */
#define SPF_MAX_LOOKUPS 10
#define SPF_MAX_VOID 2
#define SPF_MAX_ADDR_LOOKUPS 10
/* Ten includes deep is already past the lookup limit. */
#define SPF_MAX_DEPTH (SPF_MAX_LOOKUPS + 2)
/* A record longer than this is not an SPF record anyone should publish
 * (RFC 7208 section 3.4 asks records to fit in 450 octets). */
#define SPF_RECORD_MAX 4096

enum spf_kind {
    K_ALL, K_INCLUDE, K_A, K_MX, K_PTR, K_IP4, K_IP6, K_EXISTS,
    K_REDIRECT, K_EXP, K_UNKNOWN_MOD,
};

struct spf_term {
    enum spf_kind kind;
    enum spf_result qual;         /* result when a mechanism matches */
    char *spec;                   /* domain-spec (unexpanded), NULL when none */
    int c4, c6;                   /* CIDR lengths; 32 / 128 when absent */
    unsigned char addr[16];       /* ip4 / ip6 network */
    char text[128];               /* the term as written, cut, for explain */
};

enum spf_phase {
    P_START,          /* the record must be fetched */
    P_TXT,            /* waiting for TXT */
    P_TERMS,          /* evaluating terms */
    P_A,              /* a / exists: waiting for addresses */
    P_EXISTS,
    P_MX,             /* mx: waiting for the MX list */
    P_MX_ADDR,        /* mx: waiting for the addresses of one host */
    P_PTR,            /* ptr: waiting for the PTR names */
    P_PTR_ADDR,       /* ptr: waiting for the addresses of one name */
    P_CHILD,          /* include / redirect frame above runs */
};

struct spf_frame {
    char domain[SPF_NAME_MAX + 1];
    struct spf_term *terms;
    size_t nterms;
    size_t pos;                   /* next term */
    const struct spf_term *cur;   /* the mechanism being evaluated */
    const struct spf_term *redirect;
    int has_all;
    int child_is_redirect;
    enum spf_phase phase;
    char target[SPF_NAME_MAX + 1];/* expanded target of cur */
    struct dns_result *list;      /* MX or PTR answer being walked */
    size_t li;
    unsigned addr_lookups;
};

struct spf {
    int family;                   /* AF_INET or AF_INET6 */
    unsigned char ip[16];
    char ip_text[INET6_ADDRSTRLEN];
    char sender[SPF_NAME_MAX + 70];
    char helo[SPF_NAME_MAX + 1];
    struct spf_frame stack[SPF_MAX_DEPTH];
    int depth;                    /* frames in use */
    unsigned lookups, voids;
    int done;
    enum spf_result result;
    char why[400];
    struct spf_query q;           /* the pending query */
};

const char *spf_result_name(enum spf_result r)
{
    switch (r) {
    case SPF_NONE: return "none";
    case SPF_NEUTRAL: return "neutral";
    case SPF_PASS: return "pass";
    case SPF_FAIL: return "fail";
    case SPF_SOFTFAIL: return "softfail";
    case SPF_TEMPERROR: return "temperror";
    case SPF_PERMERROR: return "permerror";
    }
    return "?";
}

/* ---- addresses ---------------------------------------------------------- */

/* Whether the first bits of a and b agree. */
static int spf_prefix_eq(const unsigned char *a, const unsigned char *b, int bits)
{
    int full = bits / 8, rest = bits % 8;

    if (memcmp(a, b, (size_t)full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    return ((a[full] ^ b[full]) & (0xff << (8 - rest))) == 0;
}

static int spf_addr_match(const struct spf *e, const struct dns_addr *a, int c4, int c6)
{
    if (a->family != e->family)
        return 0;
    if (a->family == AF_INET)
        return spf_prefix_eq((const unsigned char *)&a->u.v4, e->ip, c4);
    return spf_prefix_eq((const unsigned char *)&a->u.v6, e->ip, c6);
}

/* ---- frames and results ------------------------------------------------ */

static void spf_frame_clear(struct spf_frame *f)
{
    for (size_t i = 0; i < f->nterms; i++)
        free(f->terms[i].spec);
    free(f->terms);
    if (f->list != NULL)
        dns_result_free(f->list);
    memset(f, 0, sizeof(*f));
}

static struct spf_frame *spf_top(struct spf *e)
{
    return &e->stack[e->depth - 1];
}

/* Ends the whole evaluation at once (limits, errors that terminate
 * check_host() everywhere: section 4.6.4 and 4.4). */
static void spf_abort(struct spf *e, enum spf_result r, const char *why)
{
    while (e->depth > 0)
        spf_frame_clear(&e->stack[--e->depth]);
    e->done = 1;
    e->result = r;
    if (why != e->why)
        snprintf(e->why, sizeof(e->why), "%s", why);
}

/* The top frame has its result; pass it to the frame below. */
static void spf_finish(struct spf *e, enum spf_result r)
{
    struct spf_frame *parent;
    int redirect;

    spf_frame_clear(&e->stack[--e->depth]);
    if (e->depth == 0) {
        e->done = 1;
        e->result = r;
        return;
    }
    parent = spf_top(e);
    redirect = parent->child_is_redirect;
    parent->phase = P_TERMS;
    if (redirect) {
        /* Section 6.1: the result of the redirect is the record's result;
         * a target without a record is a permerror. */
        if (r == SPF_NONE) {
            snprintf(e->why, sizeof(e->why), "redirect=%s has no SPF record", parent->target);
            r = SPF_PERMERROR;
        }
        spf_finish(e, r);
        return;
    }
    /* Section 5.2: include matches on pass only. */
    switch (r) {
    case SPF_PASS:
        snprintf(e->why, sizeof(e->why), "%s matched in %s", parent->cur->text, parent->domain);
        spf_finish(e, parent->cur->qual);
        break;
    case SPF_FAIL: case SPF_SOFTFAIL: case SPF_NEUTRAL:
        break;
    case SPF_TEMPERROR:
        spf_finish(e, SPF_TEMPERROR);
        break;
    case SPF_NONE:
        snprintf(e->why, sizeof(e->why), "include:%s has no SPF record", parent->target);
        spf_finish(e, SPF_PERMERROR);
        break;
    case SPF_PERMERROR:
        spf_finish(e, SPF_PERMERROR);
        break;
    }
}

/* A mechanism of the top frame matched. */
static void spf_matched(struct spf *e)
{
    struct spf_frame *f = spf_top(e);

    snprintf(e->why, sizeof(e->why), "%s matched in %s", f->cur->text, f->domain);
    spf_finish(e, f->cur->qual);
}

static void spf_frame_error(struct spf *e, enum spf_result r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void spf_frame_error(struct spf *e, enum spf_result r, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(e->why, sizeof(e->why), fmt, ap);
    va_end(ap);
    spf_abort(e, r, e->why);
}

/* ---- macros (RFC 7208 section 7) ------------------------------------------ */

/* The value of one macro letter into b. Returns 0, or -1 for a letter not
 * allowed in a domain-spec. */
static int spf_macro_value(struct spf *e, const struct spf_frame *f, char letter, struct buf *b)
{
    const char *at = strrchr(e->sender, '@');

    switch (tolower((unsigned char)letter)) {
    case 's':
        buf_appends(b, e->sender);
        return 0;
    case 'l':
        if (at == NULL || at == e->sender)
            buf_appends(b, "postmaster");
        else
            buf_append(b, e->sender, (size_t)(at - e->sender));
        return 0;
    case 'o':
        buf_appends(b, at ? at + 1 : e->sender);
        return 0;
    case 'd':
        buf_appends(b, f->domain);
        return 0;
    case 'i':
        if (e->family == AF_INET) {
            buf_appends(b, e->ip_text);
        } else {
            /* Section 7.3: the nibbles of an IPv6 address, dot-separated. */
            static const char hex[] = "0123456789abcdef";
            for (int k = 0; k < 16; k++) {
                buf_appendf(b, "%s%c.%c", k ? "." : "", hex[e->ip[k] >> 4], hex[e->ip[k] & 15]);
            }
        }
        return 0;
    case 'p':
        buf_appends(b, "unknown");
        return 0;
    case 'v':
        buf_appends(b, e->family == AF_INET ? "in-addr" : "ip6");
        return 0;
    case 'h':
        buf_appends(b, e->helo);
        return 0;
    default:
        return -1;
    }
}

/*
 * Applies the transformers of one macro: split value on the delimiters,
 * reverse when asked, keep the rightmost keep parts (0: all), join with
 * dots.
 */
static void spf_macro_transform(const char *value, size_t vlen, int keep, int reverse,
                                const char *delims, struct buf *out)
{
    const char *parts[256];
    size_t lens[256], n = 0, start = 0, first;

    for (size_t i = 0; i <= vlen && n < 256; i++) {
        if (i == vlen || strchr(delims, value[i]) != NULL) {
            parts[n] = value + start;
            lens[n] = i - start;
            n++;
            start = i + 1;
        }
    }
    if (reverse) {
        for (size_t i = 0; i < n / 2; i++) {
            const char *tp = parts[i];
            size_t tl = lens[i];

            parts[i] = parts[n - 1 - i];
            lens[i] = lens[n - 1 - i];
            parts[n - 1 - i] = tp;
            lens[n - 1 - i] = tl;
        }
    }
    first = keep > 0 && (size_t)keep < n ? n - (size_t)keep : 0;
    for (size_t i = first; i < n; i++) {
        if (i > first)
            buf_append(out, ".", 1);
        buf_append(out, parts[i], lens[i]);
    }
}

/*
 * Expands a domain-spec into out (at most SPF_NAME_MAX octets; longer
 * results lose labels on the left, section 7.3). Returns 0, or -1 for a
 * syntax error (permerror).
 */
static int spf_expand(struct spf *e, const struct spf_frame *f, const char *spec, char *out,
                      size_t outlen)
{
    struct buf b = BUF_INIT;
    const char *p = spec;
    int rc = -1;

    while (*p) {
        if (*p != '%') {
            if ((unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e)
                goto out;
            buf_append(&b, p++, 1);
            continue;
        }
        p++;
        if (*p == '%') {
            buf_append(&b, "%", 1);
            p++;
        } else if (*p == '_') {
            buf_append(&b, " ", 1);
            p++;
        } else if (*p == '-') {
            buf_appends(&b, "%20");
            p++;
        } else if (*p == '{') {
            struct buf v = BUF_INIT;
            char letter, delims[16];
            int keep = 0, reverse = 0, nd = 0;

            p++;
            letter = *p++;
            if (spf_macro_value(e, f, letter, &v) < 0) {
                buf_free(&v);
                goto out;
            }
            while (isdigit((unsigned char)*p)) {
                keep = keep * 10 + (*p++ - '0');
                if (keep > 128) {
                    buf_free(&v);
                    goto out;
                }
            }
            if (p[-1] >= '0' && p[-1] <= '9' && keep == 0) {
                buf_free(&v);
                goto out;   /* section 7.1: a zero count is a syntax error */
            }
            if (*p == 'r' || *p == 'R') {
                reverse = 1;
                p++;
            }
            while (*p && strchr(".-+,/_=", *p) != NULL && nd < (int)sizeof(delims) - 1)
                delims[nd++] = *p++;
            delims[nd] = '\0';
            if (*p != '}') {
                buf_free(&v);
                goto out;
            }
            p++;
            spf_macro_transform(v.data ? v.data : "", v.len, keep, reverse,
                                nd ? delims : ".", &b);
            buf_free(&v);
        } else {
            goto out;
        }
    }
    {
        const char *s = b.data ? b.data : "";
        size_t n = b.len;

        if (n > 0 && s[n - 1] == '.')
            n--;
        while (n > SPF_NAME_MAX) {
            const char *dot = memchr(s, '.', n);
            if (dot == NULL)
                goto out;
            n -= (size_t)(dot - s) + 1;
            s = dot + 1;
        }
        if (n == 0 || n >= outlen)
            goto out;
        memcpy(out, s, n);
        out[n] = '\0';
    }
    rc = 0;
out:
    buf_free(&b);
    return rc;
}

/* ---- parsing (RFC 7208 section 4.6 and 12) --------------------------------- */

/* Parses "/n" at the end of s[0..*len) when present: sets *v and shortens
 * *len. Returns 0, or -1 when the number is out of [0, max]. */
static int spf_cut_cidr(const char *s, size_t *len, int max, int *v, int dbl)
{
    size_t n = *len, i = n;
    long x = 0;

    while (i > 0 && isdigit((unsigned char)s[i - 1]))
        i--;
    if (i == n || i == 0 || s[i - 1] != '/')
        return 0;
    if (dbl != (i >= 2 && s[i - 2] == '/'))
        return 0;
    if (n - i > 3)
        return -1;
    for (size_t k = i; k < n; k++)
        x = x * 10 + (s[k] - '0');
    /* Section 5.6: no leading zeros. */
    if ((n - i > 1 && s[i] == '0') || x > max)
        return -1;
    *v = (int)x;
    *len = i - 1 - (size_t)dbl;
    return 0;
}

/* Parses one term into t. Returns 0 or -1 (syntax error). */
static int spf_parse_term(const char *tok, size_t len, struct spf_term *t)
{
    static const struct { const char *name; enum spf_kind kind; } mechs[] = {
        {"all", K_ALL}, {"include", K_INCLUDE}, {"a", K_A}, {"mx", K_MX}, {"ptr", K_PTR},
        {"ip4", K_IP4}, {"ip6", K_IP6}, {"exists", K_EXISTS},
    };
    const char *p = tok;
    size_t n = len, nl;
    int qualified = 0, found = 0;

    memset(t, 0, sizeof(*t));
    snprintf(t->text, sizeof(t->text), "%.*s", (int)(len < 120 ? len : 120), tok);
    t->qual = SPF_PASS;
    t->c4 = 32;
    t->c6 = 128;
    switch (*p) {
    case '+': t->qual = SPF_PASS; qualified = 1; break;
    case '-': t->qual = SPF_FAIL; qualified = 1; break;
    case '~': t->qual = SPF_SOFTFAIL; qualified = 1; break;
    case '?': t->qual = SPF_NEUTRAL; qualified = 1; break;
    default: break;
    }
    if (qualified) {
        p++;
        n--;
    }
    nl = 0;
    while (nl < n && (isalnum((unsigned char)p[nl]) || p[nl] == '-' || p[nl] == '_' ||
                      p[nl] == '.'))
        nl++;
    if (nl == 0)
        return -1;
    /* A modifier: name "=" macro-string (section 4.6.1). */
    if (nl < n && p[nl] == '=') {
        if (qualified || !isalpha((unsigned char)p[0]))
            return -1;
        if (nl == 8 && strncasecmp(p, "redirect", 8) == 0)
            t->kind = K_REDIRECT;
        else if (nl == 3 && strncasecmp(p, "exp", 3) == 0)
            t->kind = K_EXP;
        else
            t->kind = K_UNKNOWN_MOD;
        if (t->kind != K_UNKNOWN_MOD && nl + 1 == n)
            return -1;
        t->spec = xstrndup(p + nl + 1, n - nl - 1);
        return 0;
    }
    for (size_t i = 0; i < sizeof(mechs) / sizeof(mechs[0]); i++) {
        size_t ml = strlen(mechs[i].name);

        if (nl != ml || strncasecmp(p, mechs[i].name, ml) != 0)
            continue;
        if (ml < n && p[ml] != ':' && p[ml] != '/')
            return -1;
        t->kind = mechs[i].kind;
        p += ml;
        n -= ml;
        found = 1;
        break;
    }
    if (!found)
        return -1;
    switch (t->kind) {
    case K_ALL:
        return n == 0 ? 0 : -1;
    case K_IP4: case K_IP6: {
        char ip[INET6_ADDRSTRLEN + 8];
        size_t al;
        int fam = t->kind == K_IP4 ? AF_INET : AF_INET6;

        if (n < 2 || p[0] != ':')
            return -1;
        p++;
        n--;
        al = n;
        if (spf_cut_cidr(p, &al, fam == AF_INET ? 32 : 128, fam == AF_INET ? &t->c4 : &t->c6,
                         0) < 0)
            return -1;
        if (al == 0 || al >= sizeof(ip))
            return -1;
        memcpy(ip, p, al);
        ip[al] = '\0';
        if (inet_pton(fam, ip, t->addr) != 1)
            return -1;
        return 0;
    }
    case K_INCLUDE: case K_EXISTS:
        if (n < 2 || p[0] != ':')
            return -1;
        t->spec = xstrndup(p + 1, n - 1);
        return 0;
    case K_A: case K_MX: case K_PTR: {
        size_t sl = n;

        if (t->kind != K_PTR) {
            if (spf_cut_cidr(p, &sl, 128, &t->c6, 1) < 0 ||
                spf_cut_cidr(p, &sl, 32, &t->c4, 0) < 0)
                return -1;
        }
        if (sl == 0)
            return 0;
        if (p[0] != ':' || sl < 2)
            return -1;
        t->spec = xstrndup(p + 1, sl - 1);
        return 0;
    }
    default:
        return -1;
    }
}

/* Parses a record (starting "v=spf1") into the frame. Returns 0 or -1. */
static int spf_parse_record(struct spf_frame *f, const char *rec, size_t len)
{
    size_t i = 6, cap = 0;

    if (len > SPF_RECORD_MAX)
        return -1;
    while (i < len) {
        size_t s, e;
        struct spf_term t;

        while (i < len && rec[i] == ' ')
            i++;
        s = i;
        while (i < len && rec[i] != ' ')
            i++;
        e = i;
        if (e == s)
            break;
        if (spf_parse_term(rec + s, e - s, &t) < 0)
            return -1;
        if (t.kind == K_REDIRECT || t.kind == K_EXP) {
            /* Section 6: each at most once. */
            for (size_t k = 0; k < f->nterms; k++) {
                if (f->terms[k].kind == t.kind) {
                    free(t.spec);
                    return -1;
                }
            }
        }
        if (f->nterms == cap) {
            cap = cap ? cap * 2 : 8;
            f->terms = xrealloc(f->terms, cap * sizeof(*f->terms));
        }
        f->terms[f->nterms++] = t;
    }
    for (size_t k = 0; k < f->nterms; k++) {
        if (f->terms[k].kind == K_REDIRECT)
            f->redirect = &f->terms[k];
        if (f->terms[k].kind == K_ALL)
            f->has_all = 1;
    }
    return 0;
}

/* ---- evaluation ------------------------------------------------------------ */

static int spf_push(struct spf *e, const char *domain)
{
    struct spf_frame *f;
    size_t n;

    if (e->depth == SPF_MAX_DEPTH)
        return -1;
    n = strnlen(domain, SPF_NAME_MAX);
    f = &e->stack[e->depth++];
    memset(f, 0, sizeof(*f));
    /* domain may be the target of the frame below; memmove states that
     * the two may not be assumed apart. */
    memmove(f->domain, domain, n);
    f->domain[n] = '\0';
    f->phase = P_START;
    return 0;
}

struct spf *spf_new(const char *ip, const char *domain, const char *sender, const char *helo)
{
    struct spf *e;
    size_t dl;

    if (ip == NULL || domain == NULL)
        return NULL;
    dl = strlen(domain);
    if (dl > 0 && domain[dl - 1] == '.')
        dl--;
    if (dl == 0 || dl > SPF_NAME_MAX)
        return NULL;
    e = xcalloc(1, sizeof(*e));
    if (inet_pton(AF_INET, ip, e->ip) == 1) {
        e->family = AF_INET;
    } else if (inet_pton(AF_INET6, ip, e->ip) == 1) {
        e->family = AF_INET6;
        /* An IPv4-mapped address is evaluated as IPv4 (section 5: "the
         * IPv4 address ... as if it were an IPv4 connection"). */
        if (IN6_IS_ADDR_V4MAPPED((struct in6_addr *)e->ip)) {
            memmove(e->ip, e->ip + 12, 4);
            e->family = AF_INET;
        }
    } else {
        free(e);
        return NULL;
    }
    inet_ntop(e->family, e->ip, e->ip_text, sizeof(e->ip_text));
    if (sender != NULL && sender[0] != '\0')
        snprintf(e->sender, sizeof(e->sender), "%s", sender);
    else
        snprintf(e->sender, sizeof(e->sender), "postmaster@%.*s", (int)dl, domain);
    snprintf(e->helo, sizeof(e->helo), "%.*s", (int)(helo ? strlen(helo) : dl),
             helo ? helo : domain);
    spf_push(e, "");
    snprintf(e->stack[0].domain, sizeof(e->stack[0].domain), "%.*s", (int)dl, domain);
    return e;
}

void spf_free(struct spf *e)
{
    if (e == NULL)
        return;
    while (e->depth > 0)
        spf_frame_clear(&e->stack[--e->depth]);
    free(e);
}

enum spf_result spf_result(const struct spf *e)
{
    return e->result;
}

const char *spf_explain(const struct spf *e)
{
    return e->why;
}

unsigned spf_lookups(const struct spf *e)
{
    return e->lookups;
}

static void spf_query(struct spf *e, const char *name, enum dns_type type)
{
    snprintf(e->q.name, sizeof(e->q.name), "%s", name);
    e->q.type = type;
}

static enum dns_type spf_addr_type(const struct spf *e)
{
    return e->family == AF_INET ? DNS_T_A : DNS_T_AAAA;
}

/* Counts a term that queries DNS (section 4.6.4). Returns 0, or -1 after
 * ending the evaluation with permerror. */
static int spf_count_lookup(struct spf *e)
{
    if (++e->lookups > SPF_MAX_LOOKUPS) {
        spf_frame_error(e, SPF_PERMERROR, "more than %d DNS lookups", SPF_MAX_LOOKUPS);
        return -1;
    }
    return 0;
}

/* Counts a lookup that found nothing. Returns 0 or -1 (permerror). */
static int spf_count_void(struct spf *e)
{
    if (++e->voids > SPF_MAX_VOID) {
        spf_frame_error(e, SPF_PERMERROR, "more than %d lookups without an answer",
                        SPF_MAX_VOID);
        return -1;
    }
    return 0;
}

/* The target of a mechanism: its expanded domain-spec, or the current
 * domain. Returns 0 or -1 (permerror, evaluation ended). */
static int spf_target(struct spf *e, struct spf_frame *f, const char *spec)
{
    if (spec == NULL) {
        size_t n = strnlen(f->domain, sizeof(f->target) - 1);
        memcpy(f->target, f->domain, n);
        f->target[n] = '\0';
        return 0;
    }
    if (spf_expand(e, f, spec, f->target, sizeof(f->target)) < 0) {
        spf_frame_error(e, SPF_PERMERROR, "bad domain-spec \"%.100s\" in %s", spec, f->domain);
        return -1;
    }
    return 0;
}

/* Evaluates the next term of the top frame, or ends it. Returns 1 when a
 * query is pending, 0 to go on. */
static int spf_next_term(struct spf *e)
{
    struct spf_frame *f = spf_top(e);
    const struct spf_term *t;

    if (f->pos == f->nterms) {
        if (f->redirect != NULL && !f->has_all) {
            /* Section 6.1: redirect= counts as a lookup. */
            f->cur = f->redirect;
            if (spf_count_lookup(e) < 0 || spf_target(e, f, f->redirect->spec) < 0)
                return 0;
            f->child_is_redirect = 1;
            f->phase = P_CHILD;
            if (spf_push(e, f->target) < 0)
                spf_frame_error(e, SPF_PERMERROR, "SPF records nested too deep");
            return 0;
        }
        snprintf(e->why, sizeof(e->why), "no mechanism matched in %s", f->domain);
        spf_finish(e, SPF_NEUTRAL);
        return 0;
    }
    t = &f->terms[f->pos++];
    f->cur = t;
    switch (t->kind) {
    case K_ALL:
        spf_matched(e);
        return 0;
    case K_IP4: case K_IP6:
        if ((t->kind == K_IP4 && e->family == AF_INET && spf_prefix_eq(t->addr, e->ip, t->c4)) ||
            (t->kind == K_IP6 && e->family == AF_INET6 && spf_prefix_eq(t->addr, e->ip, t->c6)))
            spf_matched(e);
        return 0;
    case K_A: case K_MX: case K_PTR: case K_EXISTS:
        if (spf_count_lookup(e) < 0 || spf_target(e, f, t->spec) < 0)
            return 0;
        if (t->kind == K_A) {
            f->phase = P_A;
            spf_query(e, f->target, spf_addr_type(e));
        } else if (t->kind == K_EXISTS) {
            /* Section 5.7: always an A query, whatever the client's
             * address family. */
            f->phase = P_EXISTS;
            spf_query(e, f->target, DNS_T_A);
        } else if (t->kind == K_MX) {
            f->phase = P_MX;
            spf_query(e, f->target, DNS_T_MX);
        } else {
            char rev[128];

            f->phase = P_PTR;
            dns_reverse_name(e->ip_text, NULL, rev, sizeof(rev));
            spf_query(e, rev, DNS_T_PTR);
        }
        return 1;
    case K_INCLUDE:
        if (spf_count_lookup(e) < 0 || spf_target(e, f, t->spec) < 0)
            return 0;
        f->child_is_redirect = 0;
        f->phase = P_CHILD;
        if (spf_push(e, f->target) < 0)
            spf_frame_error(e, SPF_PERMERROR, "SPF records nested too deep");
        return 0;
    case K_REDIRECT: case K_EXP: case K_UNKNOWN_MOD:
        return 0;
    }
    return 0;
}

/* mx / ptr: asks for the addresses of the next name of f->list, or ends
 * the mechanism without a match. Returns 1 when a query is pending. */
static int spf_next_listed(struct spf *e, struct spf_frame *f)
{
    for (; f->list != NULL && f->li < f->list->n; f->li++) {
        const char *name = f->list->type == DNS_T_MX ? f->list->mxs[f->li].host
                                                     : f->list->names[f->li];

        if (name == NULL || name[0] == '\0')
            continue;
        if (f->addr_lookups++ == SPF_MAX_ADDR_LOOKUPS) {
            if (f->list->type == DNS_T_MX) {
                spf_frame_error(e, SPF_PERMERROR, "mx in %s names more than %d hosts",
                                f->domain, SPF_MAX_ADDR_LOOKUPS);
                return 0;
            }
            break;   /* ptr: section 4.6.4, ignore the names past ten */
        }
        f->phase = f->list->type == DNS_T_MX ? P_MX_ADDR : P_PTR_ADDR;
        spf_query(e, name, spf_addr_type(e));
        return 1;
    }
    dns_result_free(f->list);
    f->list = NULL;
    f->phase = P_TERMS;
    return 0;
}

int spf_step(struct spf *e, struct spf_query *q)
{
    while (!e->done) {
        struct spf_frame *f = spf_top(e);

        switch (f->phase) {
        case P_START:
            f->phase = P_TXT;
            spf_query(e, f->domain, DNS_T_TXT);
            *q = e->q;
            return SPF_STEP_QUERY;
        case P_TERMS:
            if (spf_next_term(e)) {
                *q = e->q;
                return SPF_STEP_QUERY;
            }
            break;
        case P_CHILD:
            /* Cannot happen: the child frame is on top. */
            spf_abort(e, SPF_PERMERROR, "internal error");
            break;
        default:
            /* A query is pending and was not answered; ask again. */
            *q = e->q;
            return SPF_STEP_QUERY;
        }
    }
    return SPF_STEP_DONE;
}

/* Whether a DNS status is a temporary failure (section 4.4). */
static int spf_temp(int st)
{
    return st != DNS_OK && st != DNS_ENOTFOUND && st != DNS_ENODATA;
}

static void spf_on_txt(struct spf *e, struct spf_frame *f, const struct dns_result *r)
{
    const struct dns_txt *rec = NULL;
    size_t found = 0;

    if (spf_temp(r->status)) {
        spf_frame_error(e, SPF_TEMPERROR, "TXT lookup of %s failed (%s)", f->domain,
                        dns_strerror(r->status));
        return;
    }
    for (size_t i = 0; r->status == DNS_OK && i < r->n; i++) {
        const struct dns_txt *t = &r->txts[i];

        /* Section 4.5: "v=spf1" followed by a space or the end. */
        if (t->len >= 6 && strncasecmp(t->data, "v=spf1", 6) == 0 &&
            (t->len == 6 || t->data[6] == ' ')) {
            rec = t;
            found++;
        }
    }
    if (found == 0) {
        snprintf(e->why, sizeof(e->why), "no SPF record at %s", f->domain);
        spf_finish(e, SPF_NONE);
        return;
    }
    if (found > 1) {
        spf_frame_error(e, SPF_PERMERROR, "%s has more than one SPF record", f->domain);
        return;
    }
    if (memchr(rec->data, '\0', rec->len) != NULL ||
        spf_parse_record(f, rec->data, rec->len) < 0) {
        spf_frame_error(e, SPF_PERMERROR, "syntax error in the SPF record of %s", f->domain);
        return;
    }
    f->phase = P_TERMS;
}

void spf_answer(struct spf *e, const struct dns_result *r)
{
    struct spf_frame *f;

    if (e->done || e->depth == 0)
        return;
    f = spf_top(e);
    switch (f->phase) {
    case P_TXT:
        spf_on_txt(e, f, r);
        return;
    case P_A:
    case P_EXISTS:
        f->phase = P_TERMS;
        if (spf_temp(r->status)) {
            spf_frame_error(e, SPF_TEMPERROR, "lookup of %s failed (%s)", f->target,
                            dns_strerror(r->status));
            return;
        }
        if (r->status != DNS_OK || r->n == 0) {
            spf_count_void(e);
            return;
        }
        for (size_t i = 0; i < r->n; i++) {
            if (f->cur->kind == K_EXISTS || spf_addr_match(e, &r->addrs[i], f->cur->c4,
                                                           f->cur->c6)) {
                spf_matched(e);
                return;
            }
        }
        return;
    case P_MX:
        f->phase = P_TERMS;
        if (spf_temp(r->status)) {
            spf_frame_error(e, SPF_TEMPERROR, "MX lookup of %s failed (%s)", f->target,
                            dns_strerror(r->status));
            return;
        }
        if (r->status != DNS_OK || r->n == 0) {
            spf_count_void(e);
            return;
        }
        f->list = dns_result_dup(r);
        f->li = 0;
        f->addr_lookups = 0;
        spf_next_listed(e, f);
        return;
    case P_PTR:
        f->phase = P_TERMS;
        /* Section 5.5: a failed PTR lookup means no match. */
        if (r->status != DNS_OK || r->n == 0)
            return;
        f->list = dns_result_dup(r);
        f->li = 0;
        f->addr_lookups = 0;
        spf_next_listed(e, f);
        return;
    case P_MX_ADDR:
    case P_PTR_ADDR: {
        int ptr = f->phase == P_PTR_ADDR;
        const char *name = ptr ? f->list->names[f->li] : f->list->mxs[f->li].host;
        int hit = 0;

        if (!ptr && spf_temp(r->status)) {
            spf_frame_error(e, SPF_TEMPERROR, "lookup of %s failed (%s)", name,
                            dns_strerror(r->status));
            return;
        }
        for (size_t i = 0; r->status == DNS_OK && i < r->n; i++)
            if (spf_addr_match(e, &r->addrs[i], ptr ? 32 : f->cur->c4, ptr ? 128 : f->cur->c6))
                hit = 1;
        if (hit && ptr) {
            /* A validated name (section 5.5) matches when it is the
             * target or a subdomain of it. */
            size_t nl = strlen(name), tl = strlen(f->target);

            if (nl > 0 && name[nl - 1] == '.')
                nl--;
            hit = (nl == tl && strncasecmp(name, f->target, tl) == 0) ||
                  (nl > tl && name[nl - tl - 1] == '.' &&
                   strncasecmp(name + nl - tl, f->target, tl) == 0);
        }
        if (hit) {
            dns_result_free(f->list);
            f->list = NULL;
            spf_matched(e);
            return;
        }
        f->li++;
        spf_next_listed(e, f);
        return;
    }
    default:
        return;
    }
}
