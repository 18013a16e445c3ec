/*
 * selfcheck: PTR, DNSBL and SPF checks of the relay's public address on a
 * timer; see selfcheck.h.
 *
 * Each check runs as a short chain of DNS queries (lib/dns) whose
 * callbacks carry the check. A run's results are written into "next"
 * fields and only taken, all together, once the last check of the run is
 * done, so the status changes in one step and is logged once.
 */
#include "relay/selfcheck.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "lib/log.h"
#include "lib/metrics.h"
#include "lib/xmalloc.h"
#include "relay/spf.h"

enum sc_kind { SCK_PTR, SCK_DNSBL, SCK_SPF };
enum sc_state { ST_PENDING = 0, ST_OK, ST_FAIL };

static const char *const sc_state_names[] = {
    [ST_PENDING] = "pending", [ST_OK] = "ok", [ST_FAIL] = "fail",
};

struct selfcheck;

struct sc_check {
    struct selfcheck *sc;
    enum sc_kind kind;
    char name[300];                   /* "ptr", "dnsbl:<zone>", "spf:<domain>" */
    char arg[256];                    /* zone or domain */
    enum sc_state state;
    char reason[400];
    struct metric *gauge;
    /* The run in progress. */
    int running;
    enum sc_state next;
    int temp;                         /* the lookup failed for now */
    char next_reason[400];
    char listed[200];                 /* DNSBL answer codes */
    struct spf *spf;
};

struct selfcheck {
    uv_loop_t *loop;
    struct dns *dns;
    char *public_ip, *helo;
    int family;
    unsigned char ip[16];
    unsigned interval;
    struct sc_check *checks;
    size_t n;
    unsigned running;                 /* checks of this run not yet done */
    unsigned pending;                 /* DNS queries outstanding */
    uv_timer_t timer;
    int timer_closed;
    int closing;
    enum sc_state status;             /* ST_PENDING, ST_OK, ST_FAIL (degraded) */
    time_t checked;
    struct metric *status_gauge;
};

static void sc_run(struct selfcheck *sc);

/* ---- helpers ------------------------------------------------------------------ */

/* Keeps printable ASCII, replaces the rest (TXT records hold anything). */
static void sc_printable(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
            *s = '?';
}

static int sc_name_eq(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);

    if (la > 0 && a[la - 1] == '.')
        la--;
    if (lb > 0 && b[lb - 1] == '.')
        lb--;
    return la == lb && strncasecmp(a, b, la) == 0;
}

static void sc_maybe_free(struct selfcheck *sc)
{
    if (!sc->closing || sc->pending > 0 || !sc->timer_closed)
        return;
    for (size_t i = 0; i < sc->n; i++)
        spf_free(sc->checks[i].spf);
    free(sc->checks);
    free(sc->public_ip);
    free(sc->helo);
    free(sc);
}

static void sc_query(struct sc_check *ck, const char *name, enum dns_type type, dns_cb cb)
{
    ck->sc->pending++;
    dns_query(ck->sc->dns, name, type, cb, ck);
}

/* Every query callback starts here. Returns 1 when the callback must stop
 * (the selfcheck is closing). */
static int sc_arrived(struct sc_check *ck)
{
    struct selfcheck *sc = ck->sc;

    sc->pending--;
    if (sc->closing) {
        sc_maybe_free(sc);
        return 1;
    }
    return 0;
}

static int sc_temp(int st)
{
    return st != DNS_OK && st != DNS_ENOTFOUND && st != DNS_ENODATA;
}

/* ---- results ------------------------------------------------------------------- */

/* Takes the results of a finished run. */
static void sc_commit(struct selfcheck *sc)
{
    struct buf failing = BUF_INIT;
    enum sc_state overall = ST_OK;
    char q1[500], q2[300];

    for (size_t i = 0; i < sc->n; i++) {
        struct sc_check *ck = &sc->checks[i];
        enum sc_state st = ck->next;

        if (ck->temp) {
            /* Keep what we knew; with nothing known, count it failed. */
            st = ck->state != ST_PENDING ? ck->state : ST_FAIL;
            if (ck->state != ST_PENDING) {
                size_t len = strlen(ck->next_reason);

                snprintf(ck->next_reason + len, sizeof(ck->next_reason) - len,
                         "; keeping the previous result");
            }
        }
        if (st != ck->state)
            log_info("event=selfcheck check=%s from=%s to=%s reason=%s", ck->name,
                     sc_state_names[ck->state], sc_state_names[st],
                     log_quote(q1, sizeof(q1), ck->next_reason, strlen(ck->next_reason)));
        else if (strcmp(ck->reason, ck->next_reason) != 0)
            log_debug("event=selfcheck check=%s state=%s reason=%s", ck->name,
                      sc_state_names[st],
                      log_quote(q1, sizeof(q1), ck->next_reason, strlen(ck->next_reason)));
        ck->state = st;
        memcpy(ck->reason, ck->next_reason, sizeof(ck->reason));
        metric_set(ck->gauge, st == ST_OK ? 1 : 0);
        if (st != ST_OK) {
            overall = ST_FAIL;
            buf_appendf(&failing, "%s%s", failing.len ? "," : "", ck->name);
        }
    }
    sc->checked = time(NULL);
    if (overall != sc->status) {
        log_info("event=selfcheck_status from=%s to=%s failing=%s",
                 sc->status == ST_PENDING ? "pending" : sc->status == ST_OK ? "ok" : "degraded",
                 overall == ST_OK ? "ok" : "degraded",
                 failing.len ? log_quote(q2, sizeof(q2), failing.data, failing.len) : "none");
    }
    sc->status = overall;
    metric_set(sc->status_gauge, overall == ST_OK ? 1 : 0);
    buf_free(&failing);
}

static void sc_done(struct sc_check *ck, enum sc_state st, int temp, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void sc_done(struct sc_check *ck, enum sc_state st, int temp, const char *fmt, ...)
{
    struct selfcheck *sc = ck->sc;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(ck->next_reason, sizeof(ck->next_reason), fmt, ap);
    va_end(ap);
    sc_printable(ck->next_reason);
    ck->next = st;
    ck->temp = temp;
    ck->running = 0;
    spf_free(ck->spf);
    ck->spf = NULL;
    if (--sc->running == 0)
        sc_commit(sc);
}

/* ---- ptr ----------------------------------------------------------------------- */

static void sc_on_forward(const struct dns_result *r, void *arg)
{
    struct sc_check *ck = arg;
    struct selfcheck *sc = ck->sc;
    struct buf seen = BUF_INIT;

    if (sc_arrived(ck))
        return;
    if (sc_temp(r->status)) {
        sc_done(ck, ST_FAIL, 1, "lookup of %s failed (%s)", sc->helo, dns_strerror(r->status));
        return;
    }
    for (size_t i = 0; r->status == DNS_OK && i < r->n; i++) {
        const struct dns_addr *a = &r->addrs[i];

        if (a->family == sc->family &&
            memcmp(&a->u, sc->ip, sc->family == AF_INET ? 4 : 16) == 0) {
            sc_done(ck, ST_OK, 0, "%s -> %s -> %s", sc->public_ip, sc->helo, sc->public_ip);
            buf_free(&seen);
            return;
        }
        buf_appendf(&seen, "%s%s", seen.len ? "," : "", a->text);
    }
    sc_done(ck, ST_FAIL, 0, "%s does not resolve back to %s (%s: %s)", sc->helo, sc->public_ip,
            sc->family == AF_INET ? "A" : "AAAA", seen.len ? seen.data : "none");
    buf_free(&seen);
}

static void sc_on_ptr(const struct dns_result *r, void *arg)
{
    struct sc_check *ck = arg;
    struct selfcheck *sc = ck->sc;
    struct buf names = BUF_INIT;

    if (sc_arrived(ck))
        return;
    if (sc_temp(r->status)) {
        sc_done(ck, ST_FAIL, 1, "PTR lookup of %s failed (%s)", sc->public_ip,
                dns_strerror(r->status));
        return;
    }
    for (size_t i = 0; r->status == DNS_OK && i < r->n; i++) {
        if (sc_name_eq(r->names[i], sc->helo)) {
            buf_free(&names);
            sc_query(ck, sc->helo, sc->family == AF_INET ? DNS_T_A : DNS_T_AAAA, sc_on_forward);
            return;
        }
        buf_appendf(&names, "%s%s", names.len ? "," : "", r->names[i]);
    }
    if (names.len == 0)
        sc_done(ck, ST_FAIL, 0, "no PTR record for %s", sc->public_ip);
    else
        sc_done(ck, ST_FAIL, 0, "PTR of %s is %s, not %s", sc->public_ip, names.data, sc->helo);
    buf_free(&names);
}

/* ---- dnsbl ------------------------------------------------------------------------ */

static void sc_on_dnsbl_txt(const struct dns_result *r, void *arg)
{
    struct sc_check *ck = arg;
    struct buf why = BUF_INIT;

    if (sc_arrived(ck))
        return;
    for (size_t i = 0; r->status == DNS_OK && i < r->n && why.len < 300; i++)
        buf_appendf(&why, "%s%.*s", why.len ? " | " : "", (int)r->txts[i].len, r->txts[i].data);
    sc_done(ck, ST_FAIL, 0, "%s listed in %s (%s)%s%s", ck->sc->public_ip, ck->arg, ck->listed,
            why.len ? ": " : "", why.len ? why.data : "");
    buf_free(&why);
}

static void sc_on_dnsbl(const struct dns_result *r, void *arg)
{
    struct sc_check *ck = arg;
    struct selfcheck *sc = ck->sc;
    struct buf codes = BUF_INIT, other = BUF_INIT;

    if (sc_arrived(ck))
        return;
    if (sc_temp(r->status)) {
        sc_done(ck, ST_FAIL, 1, "DNSBL lookup in %s failed (%s)", ck->arg,
                dns_strerror(r->status));
        return;
    }
    for (size_t i = 0; r->status == DNS_OK && i < r->n; i++) {
        const struct dns_addr *a = &r->addrs[i];
        const unsigned char *b = (const unsigned char *)&a->u.v4;

        if (a->family != AF_INET)
            continue;
        /* RFC 5782 section 2.1: listings are in 127.0.0.0/8; 127.0.0.1
         * is never a listing, and 127.255.255.0/24 are error codes. */
        if (b[0] == 127 && !(b[1] == 255 && b[2] == 255) &&
            !(b[1] == 0 && b[2] == 0 && b[3] == 1))
            buf_appendf(&codes, "%s%s", codes.len ? "," : "", a->text);
        else
            buf_appendf(&other, "%s%s", other.len ? "," : "", a->text);
    }
    if (codes.len > 0) {
        char name[600];

        snprintf(ck->listed, sizeof(ck->listed), "%s", codes.data);
        dns_reverse_name(sc->public_ip, ck->arg, name, sizeof(name));
        sc_query(ck, name, DNS_T_TXT, sc_on_dnsbl_txt);
    } else if (other.len > 0) {
        sc_done(ck, ST_OK, 0, "not listed in %s (answer %s is not a listing)", ck->arg,
                other.data);
    } else {
        sc_done(ck, ST_OK, 0, "not listed in %s", ck->arg);
    }
    buf_free(&codes);
    buf_free(&other);
}

/* ---- spf ---------------------------------------------------------------------------- */

static void sc_spf_drive(struct sc_check *ck);

static void sc_on_spf(const struct dns_result *r, void *arg)
{
    struct sc_check *ck = arg;

    if (sc_arrived(ck))
        return;
    spf_answer(ck->spf, r);
    sc_spf_drive(ck);
}

static void sc_spf_drive(struct sc_check *ck)
{
    struct spf_query q;
    enum spf_result res;

    if (spf_step(ck->spf, &q) == SPF_STEP_QUERY) {
        sc_query(ck, q.name, q.type, sc_on_spf);
        return;
    }
    res = spf_result(ck->spf);
    sc_done(ck, res == SPF_PASS ? ST_OK : ST_FAIL, res == SPF_TEMPERROR, "%s: %s",
            spf_result_name(res), spf_explain(ck->spf));
}

/* ---- runs ------------------------------------------------------------------------- */

static void sc_start_check(struct sc_check *ck)
{
    struct selfcheck *sc = ck->sc;
    char name[600];

    ck->running = 1;
    ck->temp = 0;
    ck->next = ST_PENDING;
    ck->next_reason[0] = '\0';
    ck->listed[0] = '\0';
    switch (ck->kind) {
    case SCK_PTR:
        dns_reverse_name(sc->public_ip, NULL, name, sizeof(name));
        sc_query(ck, name, DNS_T_PTR, sc_on_ptr);
        break;
    case SCK_DNSBL:
        if (dns_reverse_name(sc->public_ip, ck->arg, name, sizeof(name)) != 0) {
            sc_done(ck, ST_FAIL, 0, "cannot build the query name for %s", ck->arg);
            return;
        }
        sc_query(ck, name, DNS_T_A, sc_on_dnsbl);
        break;
    case SCK_SPF:
        ck->spf = spf_new(sc->public_ip, ck->arg, NULL, sc->helo);
        if (ck->spf == NULL) {
            sc_done(ck, ST_FAIL, 0, "cannot evaluate SPF for %s", ck->arg);
            return;
        }
        sc_spf_drive(ck);
        break;
    }
}

static void sc_run(struct selfcheck *sc)
{
    if (sc->running > 0) {
        log_warn("event=selfcheck_skipped reason=\"the previous run has not finished\"");
        return;
    }
    if (sc->n == 0) {
        sc_commit(sc);
        return;
    }
    /* Count first: a check may finish at once (a bad name), and the run
     * must not be taken before every check has started. */
    sc->running = (unsigned)sc->n + 1;
    for (size_t i = 0; i < sc->n; i++)
        sc_start_check(&sc->checks[i]);
    if (--sc->running == 0)
        sc_commit(sc);
}

static void sc_on_timer(uv_timer_t *t)
{
    sc_run(t->data);
}

/* ---- setup ----------------------------------------------------------------------------- */

static void sc_add(struct selfcheck *sc, enum sc_kind kind, const char *arg, size_t arglen)
{
    struct sc_check *ck;

    sc->checks = xrealloc(sc->checks, (sc->n + 1) * sizeof(*sc->checks));
    ck = &sc->checks[sc->n++];
    memset(ck, 0, sizeof(*ck));
    ck->sc = sc;
    ck->kind = kind;
    snprintf(ck->arg, sizeof(ck->arg), "%.*s", (int)arglen, arg);
    for (char *p = ck->arg; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    if (kind == SCK_PTR)
        snprintf(ck->name, sizeof(ck->name), "ptr");
    else
        snprintf(ck->name, sizeof(ck->name), "%s:%s", kind == SCK_DNSBL ? "dnsbl" : "spf",
                 ck->arg);
    snprintf(ck->reason, sizeof(ck->reason), "not checked yet");
}

static void sc_add_list(struct selfcheck *sc, enum sc_kind kind, const char *list)
{
    const char *p = list;

    while (p && *p) {
        size_t len;

        p += strspn(p, ", \t");
        len = strcspn(p, ", \t");
        if (len == 0)
            break;
        if (len < 256)
            sc_add(sc, kind, p, len);
        p += len;
    }
}

struct selfcheck *selfcheck_new(uv_loop_t *loop, struct dns *dns,
                                const struct selfcheck_opts *opts, char *err, size_t errlen)
{
    struct selfcheck *sc = xcalloc(1, sizeof(*sc));
    struct metric_family *f;

    sc->family = AF_INET;
    if (opts->public_ip == NULL || inet_pton(AF_INET, opts->public_ip, sc->ip) != 1) {
        sc->family = AF_INET6;
        if (opts->public_ip == NULL || inet_pton(AF_INET6, opts->public_ip, sc->ip) != 1) {
            snprintf(err, errlen, "public_ip \"%s\" is not an IP address",
                     opts->public_ip ? opts->public_ip : "");
            free(sc);
            return NULL;
        }
    }
    sc->loop = loop;
    sc->dns = dns;
    sc->public_ip = xstrdup(opts->public_ip);
    sc->helo = xstrdup(opts->helo_name);
    sc->interval = opts->interval ? opts->interval : 300;
    sc_add(sc, SCK_PTR, "", 0);
    sc_add_list(sc, SCK_DNSBL, opts->dnsbl_zones);
    sc_add_list(sc, SCK_SPF, opts->spf_domains);
    f = metrics_gauge(metrics_default(), "mailferry_relay_selfcheck",
                      "Result of each relay self-check: 1 ok, 0 failing or not yet known.",
                      "check");
    for (size_t i = 0; i < sc->n; i++)
        sc->checks[i].gauge = metric_labels(f, sc->checks[i].name);
    sc->status_gauge = metric_labels(metrics_gauge(
        metrics_default(), "mailferry_relay_status",
        "1 when every relay self-check passes, 0 when degraded or not yet known.", ""));
    uv_timer_init(loop, &sc->timer);
    sc->timer.data = sc;
    return sc;
}

void selfcheck_start(struct selfcheck *sc)
{
    uint64_t ms = (uint64_t)sc->interval * 1000;

    log_info("event=selfcheck_start public_ip=%s helo=%s checks=%zu interval=%u", sc->public_ip,
             sc->helo, sc->n, sc->interval);
    uv_timer_start(&sc->timer, sc_on_timer, 0, ms);
}

void selfcheck_summary(const struct selfcheck *sc, char *out, size_t n)
{
    size_t off;

    if (sc->status == ST_PENDING) {
        snprintf(out, n, "pending");
        return;
    }
    if (sc->status == ST_OK) {
        snprintf(out, n, "ok");
        return;
    }
    off = (size_t)snprintf(out, n, "degraded ");
    for (size_t i = 0, k = 0; i < sc->n && off < n; i++) {
        if (sc->checks[i].state == ST_OK)
            continue;
        off += (size_t)snprintf(out + off, n - off, "%s%s", k++ ? "," : "", sc->checks[i].name);
    }
}

int selfcheck_ok(const struct selfcheck *sc)
{
    return sc->status == ST_OK;
}

time_t selfcheck_checked(const struct selfcheck *sc)
{
    return sc->checked;
}

void selfcheck_report(const struct selfcheck *sc, struct buf *out)
{
    for (size_t i = 0; i < sc->n; i++) {
        const struct sc_check *ck = &sc->checks[i];

        buf_appendf(out, "250-%s %s %s\r\n", ck->name, sc_state_names[ck->state], ck->reason);
    }
    buf_appendf(out, "250 2.0.0 status %s checked=%lld\r\n",
                sc->status == ST_PENDING ? "pending" : sc->status == ST_OK ? "ok" : "degraded",
                (long long)sc->checked);
}

static void sc_timer_closed(uv_handle_t *h)
{
    struct selfcheck *sc = h->data;

    sc->timer_closed = 1;
    sc_maybe_free(sc);
}

void selfcheck_close(struct selfcheck *sc)
{
    if (sc->closing)
        return;
    sc->closing = 1;
    uv_timer_stop(&sc->timer);
    uv_close((uv_handle_t *)&sc->timer, sc_timer_closed);
}
