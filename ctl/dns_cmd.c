/*
 * dns_cmd: "mailferryctl dns check DOMAIN". See dns_cmd.h for what is
 * checked.
 *
 * The command is a short-lived client, so the checks are written as
 * straight-line code over a small cache of lookups: lookup() starts a
 * query through lib/dns.h (unless the cache has it or it is in flight) and
 * runs the private libuv loop until the answer is there. Independent
 * queries (every DNSBL zone, the DKIM selectors, DMARC, PTR) are started
 * together first with prefetch(), so the run takes about as long as its
 * longest chain of dependent lookups (SPF includes).
 */
#include "ctl/dns_cmd.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <uv.h>

#include "ctl/ctl.h"
#include "gateway/dkim.h"
#include "lib/buf.h"
#include "lib/config.h"
#include "lib/dns.h"
#include "lib/xmalloc.h"
#include "relay/spf.h"

/* Depth of include/redirect chains followed to collect includes (RFC
 * 7208 section 4.6.4 stops evaluation after 10 lookups anyway). */
#define SPF_MAX_DEPTH 10

const char ctl_dns_usage[] =
    "  dns check DOMAIN [--json] [--resolver IP[:PORT]]\n"
    "                         check SPF, DKIM, DMARC, the relay's PTR and DNSBL\n"
    "                         listings for DOMAIN; exit 1 when something must be fixed\n";

/* Providers of [route NAME] provider = ..., and the domain their SPF
 * instructions ask senders to include. */
static const struct {
    const char *provider;
    const char *include;
} api_spf[] = {
    {"sendgrid", "sendgrid.net"},
    {"mailgun", "mailgun.org"},
    {"ses", "amazonses.com"},
    {"amazon_ses", "amazonses.com"},
    {"postmark", "spf.mtasv.net"},
    {"sparkpost", "sparkpostmail.com"},
    {"mailjet", "spf.mailjet.com"},
};

enum verdict { V_OK = 0, V_WARN, V_FAIL, V_SKIP };
static const char *const verdict_names[] = {"OK", "WARN", "FAIL", "SKIP"};

struct row {
    char *check;
    enum verdict v;
    char *detail;
    char *fix;                    /* NULL when nothing to do */
};

struct entry {
    struct entry *next;
    char *name;
    enum dns_type type;
    struct dns_result *res;       /* NULL while in flight */
};

struct chk {
    uv_loop_t loop;
    struct dns *dns;
    struct entry *cache;
    int closed;

    const struct mf_config *cfg;
    const char *domain;
    struct row *rows;
    size_t nrows;
};

/* ---- rows ------------------------------------------------------------------ */

static void add_row(struct chk *c, enum verdict v, const char *check, const char *fix,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void add_row(struct chk *c, enum verdict v, const char *check, const char *fix,
                    const char *fmt, ...)
{
    struct buf b = BUF_INIT;
    struct row *r;
    va_list ap;

    va_start(ap, fmt);
    buf_vappendf(&b, fmt, ap);
    va_end(ap);
    c->rows = xrealloc(c->rows, (c->nrows + 1) * sizeof(*c->rows));
    r = &c->rows[c->nrows++];
    r->check = xstrdup(check);
    r->v = v;
    r->detail = buf_steal(&b, NULL);
    if (r->detail == NULL)
        r->detail = xstrdup("");
    r->fix = fix ? xstrdup(fix) : NULL;
}

/* ---- lookups ---------------------------------------------------------------- */

static void normalise(char *name)
{
    size_t n = strlen(name);

    if (n > 1 && name[n - 1] == '.')
        name[n - 1] = '\0';
    for (char *p = name; *p; p++)
        *p = (char)tolower((unsigned char)*p);
}

static struct entry *find_entry(struct chk *c, const char *name, enum dns_type t)
{
    for (struct entry *e = c->cache; e; e = e->next) {
        if (e->type == t && strcmp(e->name, name) == 0)
            return e;
    }
    return NULL;
}

static void on_answer(const struct dns_result *r, void *arg)
{
    struct entry *e = arg;

    e->res = dns_result_dup(r);
}

/* Starts the query unless it is cached or in flight. */
static struct entry *prefetch(struct chk *c, const char *name, enum dns_type t)
{
    char *n = xstrdup(name);
    struct entry *e;

    normalise(n);
    e = find_entry(c, n, t);
    if (e != NULL) {
        free(n);
        return e;
    }
    e = xcalloc(1, sizeof(*e));
    e->name = n;
    e->type = t;
    e->next = c->cache;
    c->cache = e;
    dns_query(c->dns, n, t, on_answer, e);
    return e;
}

/* The answer for name and type, waiting for it. Valid until the end. */
static const struct dns_result *lookup(struct chk *c, const char *name, enum dns_type t)
{
    struct entry *e = prefetch(c, name, t);

    while (e->res == NULL)
        uv_run(&c->loop, UV_RUN_ONCE);
    return e->res;
}

/* "timeout" and the like, for a failed lookup. */
static int lookup_failed(const struct dns_result *r)
{
    return r->status != DNS_OK && r->status != DNS_ENOTFOUND && r->status != DNS_ENODATA;
}

/* ---- addresses ------------------------------------------------------------- */

struct ip {
    int family;
    unsigned char a[16];
    char text[INET6_ADDRSTRLEN];
};

static int ip_parse(const char *s, struct ip *ip)
{
    memset(ip, 0, sizeof(*ip));
    if (inet_pton(AF_INET, s, ip->a) == 1)
        ip->family = AF_INET;
    else if (inet_pton(AF_INET6, s, ip->a) == 1)
        ip->family = AF_INET6;
    else
        return -1;
    inet_ntop(ip->family, ip->a, ip->text, sizeof(ip->text));
    return 0;
}

/* Whether the first bits bits of a and b agree. */
static int prefix_eq(const unsigned char *a, const unsigned char *b, unsigned bits)
{
    unsigned full = bits / 8, rest = bits % 8;

    if (memcmp(a, b, full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    return ((a[full] ^ b[full]) & (unsigned char)(0xff << (8 - rest))) == 0;
}

static int addr_matches(const struct ip *ip, const struct dns_addr *a, unsigned bits4,
                        unsigned bits6)
{
    if (ip->family != a->family)
        return 0;
    if (a->family == AF_INET)
        return prefix_eq(ip->a, (const unsigned char *)&a->u.v4, bits4);
    return prefix_eq(ip->a, (const unsigned char *)&a->u.v6, bits6);
}

/* ---- tag lists -------------------------------------------------------------- */

/* The value of tag name in a "tag=value; tag=value" list (DMARC, RFC 7489
 * section 6.4), trimmed, or NULL. */
static char *tag_value(const char *list, const char *name)
{
    size_t nl = strlen(name);
    const char *p = list;

    while (*p) {
        const char *end = strchr(p, ';'), *eq;
        size_t len = end ? (size_t)(end - p) : strlen(p);

        while (len > 0 && isspace((unsigned char)*p)) {
            p++;
            len--;
        }
        eq = memchr(p, '=', len);
        if (eq) {
            size_t kl = (size_t)(eq - p);
            while (kl > 0 && isspace((unsigned char)p[kl - 1]))
                kl--;
            if (kl == nl && strncasecmp(p, name, nl) == 0) {
                const char *v = eq + 1, *ve = p + len;
                while (v < ve && isspace((unsigned char)*v))
                    v++;
                while (ve > v && isspace((unsigned char)ve[-1]))
                    ve--;
                return xstrndup(v, (size_t)(ve - v));
            }
        }
        if (end == NULL)
            break;
        p = end + 1;
    }
    return NULL;
}

/* ---- SPF (RFC 7208) ----------------------------------------------------------- */

/* Outcomes of find_spf(). */
enum { SPF_FOUND = 0, SPF_MISSING = -1, SPF_SEVERAL = -2, SPF_LOOKUP_FAILED = -3 };

/* Finds the one SPF record of domain (RFC 7208 section 4.5): returns
 * SPF_FOUND with it in *rec, or another outcome with why. *count gets the
 * number of v=spf1 records. */
static int find_spf(struct chk *c, const char *domain, const char **rec, int *count, char *why,
                    size_t n)
{
    const struct dns_result *r = lookup(c, domain, DNS_T_TXT);
    int found = 0;

    *rec = NULL;
    if (lookup_failed(r)) {
        snprintf(why, n, "TXT lookup of %s failed: %s", domain, dns_strerror(r->status));
        return SPF_LOOKUP_FAILED;
    }
    for (size_t i = 0; i < r->n; i++) {
        const char *t = r->txts[i].data;
        if (strncasecmp(t, "v=spf1", 6) == 0 && (t[6] == ' ' || t[6] == '\0')) {
            if (found == 0)
                *rec = t;
            found++;
        }
    }
    if (count)
        *count = found;
    if (found == 0) {
        snprintf(why, n, "%s has no SPF record", domain);
        return SPF_MISSING;
    }
    if (found > 1) {
        snprintf(why, n, "%s has %d SPF records", domain, found);
        return SPF_SEVERAL;
    }
    return SPF_FOUND;
}

/* check_host() for ip and domain (relay/spf.h, the relay's own SPF
 * evaluator), its lookups answered from the cache. */
static enum spf_result check_host(struct chk *c, const struct ip *ip, const char *domain,
                                  char *why, size_t n)
{
    struct spf *e = spf_new(ip->text, domain, NULL, NULL);
    struct spf_query q;
    enum spf_result r;

    if (e == NULL) {
        snprintf(why, n, "cannot evaluate SPF for %s", domain);
        return SPF_PERMERROR;
    }
    while (spf_step(e, &q) == SPF_STEP_QUERY)
        spf_answer(e, lookup(c, q.name, q.type));
    r = spf_result(e);
    snprintf(why, n, "%s", spf_explain(e));
    spf_free(e);
    return r;
}

/* Adds every include: and redirect= target of domain's SPF record, and of
 * theirs, to list (names in lower case, each once). */
static void collect_includes(struct chk *c, const char *domain, int depth, char ***list,
                             size_t *n)
{
    const char *rec;
    char why[300], *copy, *save = NULL;

    if (depth > SPF_MAX_DEPTH || find_spf(c, domain, &rec, NULL, why, sizeof(why)) != SPF_FOUND)
        return;
    copy = xstrdup(rec + 6);
    for (char *t = strtok_r(copy, " ", &save); t; t = strtok_r(NULL, " ", &save)) {
        const char *target = NULL;
        size_t k;

        if (*t == '+' || *t == '-' || *t == '~' || *t == '?')
            t++;
        if (strncasecmp(t, "include:", 8) == 0)
            target = t + 8;
        else if (strncasecmp(t, "redirect=", 9) == 0)
            target = t + 9;
        if (target == NULL || *target == '\0' || strchr(target, '%'))
            continue;
        for (k = 0; k < *n && strcasecmp((*list)[k], target) != 0; k++)
            ;
        if (k < *n)
            continue;
        *list = xrealloc(*list, (*n + 1) * sizeof(**list));
        (*list)[*n] = xstrdup(target);
        normalise((*list)[*n]);
        (*n)++;
        collect_includes(c, target, depth + 1, list, n);
    }
    free(copy);
}

/* The domains the SPF record must include: [dns] spf_includes and those
 * of the API routes' providers. */
static size_t required_includes(const struct mf_config *cfg, char ***out)
{
    char **v = NULL;
    size_t n = 0;
    const char *p = cfg->dns.spf_includes;

    while (p && *p) {
        size_t len;
        p += strspn(p, ", \t");
        len = strcspn(p, ", \t");
        if (len == 0)
            break;
        v = xrealloc(v, (n + 1) * sizeof(*v));
        v[n] = xstrndup(p, len);
        normalise(v[n++]);
        p += len;
    }
    for (size_t i = 0; i < cfg->nnamed; i++) {
        const struct config_named *e = &cfg->named[i];
        if (strcmp(e->kind, "route") != 0 || strcasecmp(e->key, "provider") != 0)
            continue;
        for (size_t j = 0; j < sizeof(api_spf) / sizeof(api_spf[0]); j++) {
            size_t k;
            if (strcasecmp(e->value, api_spf[j].provider) != 0)
                continue;
            for (k = 0; k < n && strcmp(v[k], api_spf[j].include) != 0; k++)
                ;
            if (k == n) {
                v = xrealloc(v, (n + 1) * sizeof(*v));
                v[n++] = xstrdup(api_spf[j].include);
            }
        }
    }
    *out = v;
    return n;
}

/* Splits the comma list s into up to max entries of out. */
static size_t split_list(const char *s, char out[][256], size_t max)
{
    size_t n = 0;

    while (s && *s && n < max) {
        size_t len;
        s += strspn(s, ", \t");
        len = strcspn(s, ", \t");
        if (len == 0)
            break;
        if (len < 256) {
            memcpy(out[n], s, len);
            out[n][len] = '\0';
            n++;
        }
        s += len;
    }
    return n;
}

static void check_spf(struct chk *c, const struct ip *relays, size_t nrelays)
{
    const char *rec;
    char why[300], fix[1024], check[300];
    char **req = NULL, **inc = NULL;
    size_t nreq = required_includes(c->cfg, &req), ninc = 0;
    int count = 0;
    int r = find_spf(c, c->domain, &rec, &count, why, sizeof(why));
    struct buf sugg = BUF_INIT;

    /* A record to suggest: the relay's addresses, the includes, -all. */
    buf_appends(&sugg, "v=spf1");
    for (size_t i = 0; i < nrelays; i++)
        buf_appendf(&sugg, " %s:%s", relays[i].family == AF_INET ? "ip4" : "ip6",
                    relays[i].text);
    for (size_t i = 0; i < nreq; i++)
        buf_appendf(&sugg, " include:%s", req[i]);
    buf_appends(&sugg, " -all");

    if (r == SPF_LOOKUP_FAILED) {
        add_row(c, V_FAIL, "SPF record", "check that the DNS answers (see [dns] resolver)",
                "%s", why);
        goto out;
    }
    if (r == SPF_MISSING) {
        snprintf(fix, sizeof(fix), "publish one TXT record at %s: \"%s\"", c->domain, sugg.data);
        add_row(c, V_FAIL, "SPF record", fix, "no v=spf1 TXT record at %s", c->domain);
        goto out;
    }
    if (r == SPF_SEVERAL) {
        snprintf(fix, sizeof(fix), "merge them into one TXT record at %s (RFC 7208 section "
                 "4.5: two are a permanent error)", c->domain);
        add_row(c, V_FAIL, "SPF record", fix, "%d v=spf1 records at %s", count, c->domain);
        goto out;
    }
    {
        /* The default: +all lets anyone send, ?all or none says nothing. */
        const char *all = NULL;
        char *copy = xstrdup(rec), *save = NULL;
        for (char *t = strtok_r(copy, " ", &save); t; t = strtok_r(NULL, " ", &save)) {
            const char *m = (*t == '+' || *t == '-' || *t == '~' || *t == '?') ? t + 1 : t;
            if (strcasecmp(m, "all") == 0)
                all = rec + (t - copy);
        }
        if (all && (all[0] == '+' || strncasecmp(all, "all", 3) == 0))
            add_row(c, V_FAIL, "SPF record", "end the record with -all or ~all",
                    "%s (\"+all\" authorises every host)", rec);
        else if (all == NULL || all[0] == '?')
            add_row(c, V_WARN, "SPF record", "end the record with -all or ~all",
                    "%s (no -all or ~all: mail from other hosts is not refused)", rec);
        else
            add_row(c, V_OK, "SPF record", NULL, "%s", rec);
        free(copy);
    }

    if (nrelays == 0)
        add_row(c, V_SKIP, "SPF authorises the relay", "set [dns] relay_ip to check it",
                "no relay address configured");
    for (size_t i = 0; i < nrelays; i++) {
        char spfwhy[400];
        enum spf_result res = check_host(c, &relays[i], c->domain, spfwhy, sizeof(spfwhy));

        snprintf(check, sizeof(check), "SPF authorises %s", relays[i].text);
        if (res == SPF_PASS) {
            add_row(c, V_OK, check, NULL, "pass (%s)", spfwhy);
        } else {
            if (res == SPF_TEMPERROR)
                snprintf(fix, sizeof(fix), "check that the DNS answers (see [dns] resolver)");
            else if (res == SPF_PERMERROR)
                snprintf(fix, sizeof(fix), "repair the SPF record of %s: %s", c->domain, spfwhy);
            else
                snprintf(fix, sizeof(fix), "add %s:%s to the SPF record of %s before its "
                         "\"all\"", relays[i].family == AF_INET ? "ip4" : "ip6", relays[i].text,
                         c->domain);
            add_row(c, V_FAIL, check, fix, "%s (%s)", spf_result_name(res), spfwhy);
        }
    }

    collect_includes(c, c->domain, 0, &inc, &ninc);
    for (size_t i = 0; i < nreq; i++) {
        size_t k;
        for (k = 0; k < ninc && strcmp(inc[k], req[i]) != 0; k++)
            ;
        snprintf(check, sizeof(check), "SPF includes %s", req[i]);
        if (k < ninc) {
            add_row(c, V_OK, check, NULL, "include:%s found", req[i]);
        } else {
            snprintf(fix, sizeof(fix), "add include:%s to the SPF record of %s before its "
                     "\"all\" (the API provider sends from its own addresses)", req[i],
                     c->domain);
            add_row(c, V_FAIL, check, fix, "include:%s is missing", req[i]);
        }
    }
out:
    for (size_t i = 0; i < nreq; i++)
        free(req[i]);
    free(req);
    for (size_t i = 0; i < ninc; i++)
        free(inc[i]);
    free(inc);
    buf_free(&sugg);
}

static void zone_fix(struct buf *b, const char *name, const char *record)
{
    const char *p = strstr(record, "p=");
    size_t head = p ? (size_t)(p - record) : strlen(record);

    buf_appendf(b, "publish the TXT record %s.\n  value: %s\n  zone file: %s. IN TXT (", name,
                record, name);
    if (head > 0)
        buf_appendf(b, " \"%.*s\"", (int)head, record);
    for (const char *q = record + head; *q;) {
        size_t n = strlen(q) > 250 ? 250 : strlen(q);
        buf_appendf(b, " \"%.*s\"", (int)n, q);
        q += n;
    }
    buf_appends(b, " )");
}

static void check_dkim(struct chk *c)
{
    struct dkim_keys *keys;
    char err[1024], check[300], name[600];
    const char *signer;

    keys = dkim_keys_load(c->cfg, err, sizeof(err));
    if (keys == NULL) {
        add_row(c, V_FAIL, "DKIM keys", "make the keys readable by this user (run as the "
                "gateway's user) and fix the error", "%s", err);
        return;
    }
    if (!c->cfg->dkim.enabled) {
        add_row(c, V_FAIL, "DKIM keys", "set [dkim] enabled = yes",
                "DKIM signing is disabled ([dkim] enabled = no)");
        dkim_keys_unref(keys);
        return;
    }
    signer = dkim_keys_signer(keys, c->domain);
    if (signer == NULL) {
        char fix[512];
        snprintf(fix, sizeof(fix), "mailferryctl dkim keygen %s SELECTOR (and --type ed25519 "
                 "for a second key), publish the records, reload the gateway", c->domain);
        add_row(c, V_FAIL, "DKIM keys", fix, "no DKIM key is configured for %s: its mail "
                "leaves unsigned", c->domain);
        dkim_keys_unref(keys);
        return;
    }
    if (strcmp(signer, c->domain) != 0)
        add_row(c, V_WARN, "DKIM keys", NULL, "no key for %s itself; mail is signed as d=%s "
                "(aligned only under relaxed DMARC alignment, adkim=r)", c->domain, signer);
    for (size_t i = 0; i < dkim_keys_count(keys); i++) {
        const struct dkim_key_info *k = dkim_keys_get(keys, i);
        if (strcmp(k->domain, signer) == 0) {
            snprintf(name, sizeof(name), "%s._domainkey.%s", k->selector, k->domain);
            prefetch(c, name, DNS_T_TXT);
        }
    }
    for (size_t i = 0; i < dkim_keys_count(keys); i++) {
        const struct dkim_key_info *k = dkim_keys_get(keys, i);
        const struct dns_result *r;
        struct buf fix = BUF_INIT;
        char why[300];
        enum dkim_record_status st = DKIM_REC_SYNTAX;
        const struct dns_txt *rec = NULL;
        int nrec = 0;

        if (strcmp(k->domain, signer) != 0)
            continue;
        snprintf(name, sizeof(name), "%s._domainkey.%s", k->selector, k->domain);
        snprintf(check, sizeof(check), "DKIM %s (%s)", k->selector, dkim_alg_name(k->alg));
        r = lookup(c, name, DNS_T_TXT);
        zone_fix(&fix, name, k->record);
        if (lookup_failed(r)) {
            add_row(c, V_FAIL, check, "check that the DNS answers (see [dns] resolver)",
                    "TXT lookup of %s failed: %s", name, dns_strerror(r->status));
            buf_free(&fix);
            continue;
        }
        for (size_t j = 0; j < r->n; j++) {
            /* Anything that is not another kind of record counts. */
            if (strncasecmp(r->txts[j].data, "v=spf1", 6) == 0)
                continue;
            rec = &r->txts[j];
            nrec++;
        }
        if (nrec == 0) {
            add_row(c, V_FAIL, check, fix.data, "no TXT record at %s", name);
        } else if (nrec > 1) {
            add_row(c, V_FAIL, check, fix.data, "%d TXT records at %s; keep exactly one", nrec,
                    name);
        } else {
            st = dkim_record_check(rec->data, rec->len, k, why, sizeof(why));
            if (st == DKIM_REC_OK)
                add_row(c, V_OK, check, NULL, "%s: %s", name, why);
            else if (st == DKIM_REC_TESTING)
                add_row(c, V_WARN, check, "remove t=y from the record once signing works",
                        "%s: %s", name, why);
            else
                add_row(c, V_FAIL, check, fix.data, "%s: %s", name, why);
        }
        buf_free(&fix);
    }
    dkim_keys_unref(keys);
}

static void check_dmarc(struct chk *c)
{
    char name[300], fix[600];
    const char *d = c->domain, *found_at = NULL;
    const char *rec = NULL;
    int count = 0;
    char *p = NULL, *sp = NULL, *pct = NULL, *rua = NULL;

    snprintf(fix, sizeof(fix), "publish a TXT record at _dmarc.%s: \"v=DMARC1; p=quarantine; "
             "rua=mailto:dmarc-reports@%s\"", c->domain, c->domain);
    /* The record of the domain, else of its parents (the tree walk of
     * DMARCbis; RFC 7489 section 6.6.3 looks at the organisational
     * domain), never of a top-level domain. */
    while (d && strchr(d, '.')) {
        const struct dns_result *r;

        snprintf(name, sizeof(name), "_dmarc.%s", d);
        r = lookup(c, name, DNS_T_TXT);
        if (lookup_failed(r)) {
            add_row(c, V_FAIL, "DMARC", "check that the DNS answers (see [dns] resolver)",
                    "TXT lookup of %s failed: %s", name, dns_strerror(r->status));
            return;
        }
        for (size_t i = 0; i < r->n; i++) {
            const char *t = r->txts[i].data;
            while (*t == ' ')
                t++;
            if (strncmp(t, "v=DMARC1", 8) == 0 && (t[8] == ';' || t[8] == ' ' || t[8] == '\0')) {
                if (count == 0)
                    rec = r->txts[i].data;
                count++;
            }
        }
        if (count > 0) {
            found_at = d;
            break;
        }
        d = strchr(d, '.') + 1;
    }
    if (count == 0) {
        add_row(c, V_FAIL, "DMARC", fix, "no v=DMARC1 record at _dmarc.%s", c->domain);
        return;
    }
    if (count > 1) {
        add_row(c, V_FAIL, "DMARC", "keep exactly one v=DMARC1 record",
                "%d v=DMARC1 records at _dmarc.%s (RFC 7489 section 6.6.3: none applies)",
                count, found_at);
        return;
    }
    p = tag_value(rec, "p");
    sp = tag_value(rec, "sp");
    pct = tag_value(rec, "pct");
    rua = tag_value(rec, "rua");
    {
        /* A subdomain inherits sp= when given, else p=. */
        const char *pol = (found_at != c->domain && sp) ? sp : p;
        char where[400];

        if (found_at != c->domain)
            snprintf(where, sizeof(where), " (inherited from _dmarc.%s)", found_at);
        else
            where[0] = '\0';
        if (pol == NULL || (strcasecmp(pol, "none") != 0 && strcasecmp(pol, "quarantine") != 0 &&
                            strcasecmp(pol, "reject") != 0)) {
            add_row(c, V_FAIL, "DMARC", fix, "%s%s: p= is missing or invalid", rec, where);
        } else if (strcasecmp(pol, "none") == 0) {
            add_row(c, V_WARN, "DMARC", "once the reports show aligned SPF or DKIM for all mail, "
                    "raise the policy to p=quarantine, then p=reject",
                    "%s%s: p=none only asks for reports; receivers apply no policy", rec, where);
        } else if (pct && strcmp(pct, "100") != 0) {
            add_row(c, V_WARN, "DMARC", "raise pct to 100", "%s%s: policy %s applies to %s%% "
                    "of failing mail only", rec, where, pol, pct);
        } else {
            add_row(c, V_OK, "DMARC", NULL, "%s%s: policy %s%s", rec, where, pol,
                    rua ? "" : " (no rua=: no aggregate reports)");
        }
    }
    free(p);
    free(sp);
    free(pct);
    free(rua);
}

static int name_eq(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);

    if (la > 0 && a[la - 1] == '.')
        la--;
    if (lb > 0 && b[lb - 1] == '.')
        lb--;
    return la == lb && strncasecmp(a, b, la) == 0;
}

/* Whether host resolves to ip. Returns 1, 0, or -1 on a lookup failure
 * (with the status in *st). */
static int resolves_to(struct chk *c, const char *host, const struct ip *ip, int *st)
{
    const struct dns_result *r = lookup(c, host, ip->family == AF_INET ? DNS_T_A : DNS_T_AAAA);

    *st = r->status;
    if (lookup_failed(r))
        return -1;
    for (size_t i = 0; i < r->n; i++) {
        if (addr_matches(ip, &r->addrs[i], ip->family == AF_INET ? 32 : 128, 128))
            return 1;
    }
    return 0;
}

static void check_ptr(struct chk *c, const struct ip *ip)
{
    const char *want = c->cfg->dns.relay_hostname;
    char name[128], check[128], fix[600];
    const struct dns_result *r;
    const char *matched = NULL;
    int st;

    snprintf(check, sizeof(check), "PTR %s", ip->text);
    dns_reverse_name(ip->text, NULL, name, sizeof(name));
    r = lookup(c, name, DNS_T_PTR);
    if (lookup_failed(r)) {
        add_row(c, V_FAIL, check, "check that the DNS answers (see [dns] resolver)",
                "PTR lookup of %s failed: %s", name, dns_strerror(r->status));
        return;
    }
    if (r->status != DNS_OK || r->n == 0) {
        snprintf(fix, sizeof(fix), "ask whoever owns %s (the hosting provider) to set its PTR "
                 "record to %s", ip->text, want ? want : "the relay's host name");
        add_row(c, V_FAIL, check, fix, "no PTR record for %s", ip->text);
        return;
    }
    for (size_t i = 0; i < r->n && matched == NULL; i++) {
        if (want ? name_eq(r->names[i], want) : 1)
            matched = r->names[i];
    }
    if (matched == NULL) {
        snprintf(fix, sizeof(fix), "set the PTR record of %s to %s (the relay says this name in "
                 "EHLO), or set [dns] relay_hostname to the name the PTR gives", ip->text, want);
        add_row(c, V_FAIL, check, fix, "PTR names %s, expected %s", r->names[0], want);
        return;
    }
    switch (resolves_to(c, matched, ip, &st)) {
    case 1:
        add_row(c, V_OK, check, NULL, "%s, which resolves back to %s (forward-confirmed)",
                matched, ip->text);
        break;
    case 0:
        snprintf(fix, sizeof(fix), "add an %s record %s -> %s", ip->family == AF_INET ? "A"
                 : "AAAA", matched, ip->text);
        add_row(c, V_FAIL, check, fix, "%s does not resolve back to %s (%s)", matched, ip->text,
                st == DNS_OK ? "other addresses" : dns_strerror(st));
        break;
    default:
        add_row(c, V_FAIL, check, "check that the DNS answers (see [dns] resolver)",
                "lookup of %s failed: %s", matched, dns_strerror(st));
        break;
    }
}

static void check_dnsbl(struct chk *c, const struct ip *ip, const char *zone)
{
    char name[400], check[400], fix[600];
    const struct dns_result *r, *t;

    snprintf(check, sizeof(check), "DNSBL %s", zone);
    if (dns_reverse_name(ip->text, zone, name, sizeof(name)) != 0) {
        add_row(c, V_WARN, check, NULL, "zone name too long");
        return;
    }
    r = lookup(c, name, DNS_T_A);
    if (r->status == DNS_ENOTFOUND || r->status == DNS_ENODATA) {
        add_row(c, V_OK, check, NULL, "%s is not listed", ip->text);
        return;
    }
    if (lookup_failed(r)) {
        add_row(c, V_WARN, check, NULL, "lookup of %s failed: %s (not known whether listed)",
                name, dns_strerror(r->status));
        return;
    }
    /* RFC 5782 section 2.1: listings answer 127.0.0.2 and up. Spamhaus
     * answers 127.255.255.x to refused queries (public resolvers). */
    {
        const unsigned char *a = (const unsigned char *)&r->addrs[0].u.v4;
        if (r->addrs[0].family == AF_INET && a[0] == 127 && a[1] == 255 && a[2] == 255) {
            add_row(c, V_WARN, check, "query DNSBLs through your own resolver, not a public one",
                    "the zone refused the query (%s): not known whether listed",
                    r->addrs[0].text);
            return;
        }
        if (r->addrs[0].family != AF_INET || a[0] != 127) {
            add_row(c, V_WARN, check, NULL, "unexpected answer %s (a wildcard or a closed zone?)",
                    r->addrs[0].text);
            return;
        }
    }
    t = lookup(c, name, DNS_T_TXT);
    snprintf(fix, sizeof(fix), "find why %s is listed and ask %s to delist it (the reason in "
             "its TXT record usually links the form)", ip->text, zone);
    add_row(c, V_FAIL, check, fix, "%s is listed (%s)%s%.200s%s", ip->text, r->addrs[0].text,
            t->status == DNS_OK && t->n > 0 ? ": \"" : "",
            t->status == DNS_OK && t->n > 0 ? t->txts[0].data : "",
            t->status == DNS_OK && t->n > 0 ? "\"" : "");
}

/* ---- output --------------------------------------------------------------- */

static void print_table(const struct chk *c, const char *resolver)
{
    size_t w = strlen("CHECK"), nfix = 0;
    int counts[4] = {0, 0, 0, 0};

    for (size_t i = 0; i < c->nrows; i++) {
        if (strlen(c->rows[i].check) > w)
            w = strlen(c->rows[i].check);
        counts[c->rows[i].v]++;
    }
    printf("DNS check of %s (resolver: %s)\n\n", c->domain, resolver);
    printf("%-*s  %-6s %s\n", (int)w, "CHECK", "RESULT", "DETAIL");
    for (size_t i = 0; i < c->nrows; i++)
        printf("%-*s  %-6s %s\n", (int)w, c->rows[i].check, verdict_names[c->rows[i].v],
               c->rows[i].detail);
    for (size_t i = 0; i < c->nrows; i++) {
        const struct row *r = &c->rows[i];
        if (r->fix == NULL || (r->v != V_FAIL && r->v != V_WARN))
            continue;
        if (nfix++ == 0)
            printf("\nTo fix:\n");
        printf("  %s %s: ", r->v == V_FAIL ? "[FAIL]" : "[WARN]", r->check);
        for (const char *p = r->fix; *p; p++) {
            putchar(*p);
            if (*p == '\n')
                fputs("    ", stdout);
        }
        putchar('\n');
    }
    printf("\n%d failed, %d warning%s, %d passed, %d skipped: %s\n", counts[V_FAIL],
           counts[V_WARN], counts[V_WARN] == 1 ? "" : "s", counts[V_OK], counts[V_SKIP],
           counts[V_FAIL] ? "fix the failed checks" : "sender authentication is in order");
}

static void print_json(const struct chk *c, const char *resolver)
{
    json_t *o = json_object(), *a = json_array();
    int failed = 0, warnings = 0;
    char *s;

    for (size_t i = 0; i < c->nrows; i++) {
        const struct row *r = &c->rows[i];
        json_t *e = json_object();
        json_object_set_new(e, "check", json_string(r->check));
        json_object_set_new(e, "result", json_string(verdict_names[r->v]));
        json_object_set_new(e, "detail", json_string(r->detail));
        json_object_set_new(e, "fix", r->fix ? json_string(r->fix) : json_null());
        json_array_append_new(a, e);
        failed += r->v == V_FAIL;
        warnings += r->v == V_WARN;
    }
    json_object_set_new(o, "domain", json_string(c->domain));
    json_object_set_new(o, "resolver", json_string(resolver));
    json_object_set_new(o, "checks", a);
    json_object_set_new(o, "failed", json_integer(failed));
    json_object_set_new(o, "warnings", json_integer(warnings));
    s = json_dumps(o, JSON_INDENT(2));
    if (s)
        printf("%s\n", s);
    free(s);
    json_decref(o);
}

/* ---- the command ---------------------------------------------------------- */

static void on_dns_closed(void *arg)
{
    struct chk *c = arg;
    c->closed = 1;
}

static int usage_error(const char *what)
{
    ctl_error("%s", what);
    fprintf(stderr, "usage:\n%s", ctl_dns_usage);
    return CTL_EXIT_USAGE;
}

static int cmd_check(int argc, char **argv, const char *config_path, int json)
{
    const char *domain = NULL, *resolver = NULL;
    int rc = CTL_EXIT_OK;
    struct mf_config cfg;
    struct chk c;
    struct dns_options o;
    char err[1024], dom[256], ipl[16][256], zones[32][256];
    struct ip relays[16];
    size_t nrelays = 0, nips, nzones;

    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "--resolver") == 0) {
            if (i + 1 >= argc)
                return usage_error("dns check: --resolver needs IP[:PORT]");
            resolver = argv[++i];
        } else if (argv[i][0] == '-') {
            snprintf(err, sizeof(err), "dns check: unknown option \"%.100s\"", argv[i]);
            return usage_error(err);
        } else if (domain == NULL) {
            domain = argv[i];
        } else {
            return usage_error("dns check: one DOMAIN expected");
        }
    }
    if (domain == NULL)
        return usage_error("dns check: DOMAIN expected");
    if (strlen(domain) >= sizeof(dom) || strchr(domain, '.') == NULL)
        return usage_error("dns check: DOMAIN must be a domain name such as example.com");
    snprintf(dom, sizeof(dom), "%s", domain);
    normalise(dom);
    if (config_load(&cfg, config_path, err, sizeof(err)) != 0) {
        ctl_error("%s", err);
        return CTL_EXIT_USAGE;
    }
    if (resolver == NULL)
        resolver = cfg.dns.resolver;

    memset(&c, 0, sizeof(c));
    c.cfg = &cfg;
    c.domain = dom;
    uv_loop_init(&c.loop);
    memset(&o, 0, sizeof(o));
    o.servers = resolver;
    o.timeout_ms = cfg.dns.timeout;
    o.tries = 2;
    c.dns = dns_new(&c.loop, &o, err, sizeof(err));
    if (c.dns == NULL) {
        ctl_error("%s", err);
        uv_loop_close(&c.loop);
        config_free(&cfg);
        return CTL_EXIT_USAGE;
    }

    nips = split_list(cfg.dns.relay_ip, ipl, sizeof(ipl) / sizeof(ipl[0]));
    for (size_t i = 0; i < nips; i++) {
        if (ip_parse(ipl[i], &relays[nrelays]) == 0)
            nrelays++;
    }
    nzones = split_list(cfg.dns.dnsbl_zones, zones, sizeof(zones) / sizeof(zones[0]));

    /* Independent lookups go out together. */
    prefetch(&c, dom, DNS_T_TXT);
    {
        char name[400];
        snprintf(name, sizeof(name), "_dmarc.%s", dom);
        prefetch(&c, name, DNS_T_TXT);
        for (size_t i = 0; i < nrelays; i++) {
            if (dns_reverse_name(relays[i].text, NULL, name, sizeof(name)) == 0)
                prefetch(&c, name, DNS_T_PTR);
            for (size_t z = 0; z < nzones; z++) {
                if (dns_reverse_name(relays[i].text, zones[z], name, sizeof(name)) == 0)
                    prefetch(&c, name, DNS_T_A);
            }
        }
    }

    check_spf(&c, relays, nrelays);
    check_dkim(&c);
    check_dmarc(&c);
    if (nrelays == 0) {
        add_row(&c, V_SKIP, "PTR", "set [dns] relay_ip (and relay_hostname) to check the relay",
                "no relay address configured");
        add_row(&c, V_SKIP, "DNSBL", "set [dns] relay_ip to check the relay's listings",
                "no relay address configured");
    }
    for (size_t i = 0; i < nrelays; i++) {
        check_ptr(&c, &relays[i]);
        for (size_t z = 0; z < nzones; z++)
            check_dnsbl(&c, &relays[i], zones[z]);
    }

    if (json)
        print_json(&c, resolver ? resolver : "system");
    else
        print_table(&c, resolver ? resolver : "system (/etc/resolv.conf)");
    for (size_t i = 0; i < c.nrows; i++) {
        if (c.rows[i].v == V_FAIL)
            rc = CTL_EXIT_RUNTIME;
        free(c.rows[i].check);
        free(c.rows[i].detail);
        free(c.rows[i].fix);
    }
    free(c.rows);

    dns_close(c.dns, on_dns_closed, &c);
    while (!c.closed)
        uv_run(&c.loop, UV_RUN_ONCE);
    uv_run(&c.loop, UV_RUN_DEFAULT);
    uv_loop_close(&c.loop);
    while (c.cache) {
        struct entry *e = c.cache;
        c.cache = e->next;
        dns_result_free(e->res);
        free(e->name);
        free(e);
    }
    config_free(&cfg);
    return rc;
}

int ctl_dns_main(int argc, char **argv, const char *config_path, int json)
{
    if (argc < 2 || strcmp(argv[1], "check") != 0)
        return usage_error(argc < 2 ? "dns: check expected" : "dns: unknown subcommand");
    return cmd_check(argc - 2, argv + 2, config_path, json);
}
