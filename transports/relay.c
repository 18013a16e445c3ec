/*
 * The "relay" transport (transports/relay.h): the smtp transport set up
 * for the tunnel, plus the relay's health from a status connection.
 *
 * Mail. Every send goes to an inner smtp transport (smtp_transport_ops)
 * created from this route's keys with tls = implicit, tls_verify = yes,
 * ca_file = tunnel_ca and the client certificate: its pool, concurrency
 * cap, pipelining and per-recipient results are the smtp transport's. The
 * relay keeps no queue and passes the MX's replies back (docs/relay.md),
 * so those results are the MX's own. The relay takes one destination domain
 * per transaction, which is what the router hands a transport anyway.
 *
 * Health. One more connection, outside the pool, runs XSTATUS every
 * status_interval seconds (RFC 5321 section 4.1.5 allows such extension
 * commands; the relay answers with one line per check and a last line
 * with the overall status). The connection stays open between checks; a
 * connection the relay closed meanwhile is noticed at the next check and
 * made again, which also tests the tunnel end to end (TCP, TLS with both
 * certificates, greeting, EHLO). A failed check is retried after a second;
 * status_failures failed checks in a row mean the tunnel is down. A send
 * that fails to set up its connection (transport_failure) counts as a
 * failed check and starts the next check at once, so a dead relay is
 * noticed within milliseconds when mail is flowing and within
 * status_interval + 1 seconds when it is not.
 *
 * Lifetime. close() stops the checks, says QUIT on the status connection
 * and closes the inner transport (whose pending sends complete with
 * temporary failures); the closed callback runs once the timer, the
 * address lookup, the status client and the inner transport are all gone.
 */
#include "transports/relay.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/config.h"
#include "lib/log.h"
#include "lib/tls.h"
#include "lib/xmalloc.h"
#include "transports/smtp_client.h"

extern const struct transport_ops smtp_transport_ops;

#define RT_ADDRS_MAX 8              /* addresses of the relay tried per check */
#define RT_RETRY_MS 1000            /* a failed or pending check is repeated after this */

/* ---- configuration ----------------------------------------------------------- */

enum rt_key_kind {
    RK_OWN,                         /* read here */
    RK_PASS,                        /* handed to the inner smtp transport as is */
    RK_BOTH,                        /* read here and handed on */
    RK_REFUSED,                     /* set by the tunnel itself: an error */
};

struct rt_key {
    const char *name;
    enum rt_key_kind kind;
    const char *why;                /* RK_REFUSED: the error text */
};

/* Every key a relay route may have besides the policy keys. The tunnel is
 * always TLS from the first byte with a client certificate, verified
 * against tunnel_ca; the relay has no AUTH. */
static const struct rt_key rt_keys[] = {
    {"host", RK_OWN, NULL},
    {"tunnel_ca", RK_OWN, NULL},
    {"client_cert", RK_BOTH, NULL},
    {"client_key", RK_BOTH, NULL},
    {"servername", RK_BOTH, NULL},
    {"helo", RK_BOTH, NULL},
    {"source_address", RK_BOTH, NULL},
    {"status_interval", RK_OWN, NULL},
    {"status_timeout", RK_OWN, NULL},
    {"status_failures", RK_OWN, NULL},
    {"max_connections", RK_PASS, NULL},
    {"max_messages_per_connection", RK_PASS, NULL},
    {"idle_timeout", RK_PASS, NULL},
    {"connect_timeout", RK_BOTH, NULL},
    {"greeting_timeout", RK_PASS, NULL},
    {"command_timeout", RK_PASS, NULL},
    {"mail_timeout", RK_PASS, NULL},
    {"rcpt_timeout", RK_PASS, NULL},
    {"data_timeout", RK_PASS, NULL},
    {"data_block_timeout", RK_PASS, NULL},
    {"dot_timeout", RK_PASS, NULL},
    {"tls", RK_REFUSED, "not used by the relay transport: the tunnel is always TLS from the "
                        "first byte"},
    {"tls_verify", RK_REFUSED, "not used by the relay transport: the relay's certificate is "
                               "always verified against tunnel_ca"},
    {"ca_file", RK_REFUSED, "not used by the relay transport: set tunnel_ca"},
    {"auth_user", RK_REFUSED, "not used by the relay transport: routers authenticate with "
                              "client_cert"},
    {"auth_password_env", RK_REFUSED, "not used by the relay transport: routers authenticate "
                                      "with client_cert"},
    {"auth_password_file", RK_REFUSED, "not used by the relay transport: routers "
                                       "authenticate with client_cert"},
    {"unhealthy_after", RK_REFUSED, "not used by the relay transport: set status_failures"},
};

#define RT_NKEYS (sizeof(rt_keys) / sizeof(rt_keys[0]))

/* ---- state ------------------------------------------------------------------------ */

enum rt_poll_state {
    RP_WAIT = 0,                    /* the timer runs until the next check */
    RP_RESOLVING,                   /* uv_getaddrinfo of the relay's host */
    RP_CONNECTING,                  /* smtp_client_connect until ready */
    RP_QUERY,                       /* XSTATUS sent */
};

struct relay_transport {
    uv_loop_t *loop;
    char *route;
    struct transport *inner;        /* the smtp transport that carries the mail */

    /* The status connection's settings. */
    char *host;                     /* without brackets or port */
    char port[8];
    char hostport[300];             /* for logs */
    char *servername, *helo;
    struct sockaddr_storage source;
    int has_source;
    struct tls_ctx *tls_ctx;
    uint64_t interval_ms;
    unsigned timeout_s, connect_timeout_s;
    unsigned fail_limit;

    /* The status check. */
    enum rt_poll_state pstate;
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    int resolving;                  /* gai in flight */
    struct smtp_client *client;     /* the status connection, NULL when none */
    int clients_alive;              /* clients not freed yet */
    struct sockaddr_storage addrs[RT_ADDRS_MAX];
    size_t naddrs, ai;
    char ip[64];
    struct relay_status kw;         /* from the EHLO keyword of this connection */

    /* What is known. */
    int known;                      /* a check finished, or the tunnel was found down */
    int tunnel_up;
    unsigned failures;              /* failed checks in a row */
    char down_reason[256];
    struct relay_status status;     /* the relay's last verdict (never PENDING once
                                       it gave another) */

    int closing, inner_open, timer_open;
    void (*closed)(void *arg);
    void *closed_arg;
};

/* One send handed to the inner transport. */
struct rt_send {
    struct relay_transport *t;
    transport_done_cb cb;
    void *arg;
};

static void rt_poll_start(struct relay_transport *t);
static void rt_maybe_finish(struct relay_transport *t);

static void rt_strf(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* snprintf for texts that may be cut to fit (reasons for logs and
 * health): a truncated diagnostic is better than none. */
static void rt_strf(char *out, size_t n, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(out, n, fmt, ap);
    va_end(ap);
}

/* ---- the status texts ---------------------------------------------------------------- */

static const char *const rt_status_names[] = {
    [RELAY_STATUS_UNKNOWN] = "unknown",
    [RELAY_STATUS_OK] = "ok",
    [RELAY_STATUS_DEGRADED] = "degraded",
    [RELAY_STATUS_PENDING] = "pending",
};

const char *relay_status_name(enum relay_status_state s)
{
    if ((unsigned)s < sizeof(rt_status_names) / sizeof(rt_status_names[0]))
        return rt_status_names[s];
    return "unknown";
}

/* The state named by the len bytes at p, or UNKNOWN. */
static enum relay_status_state rt_state_of(const char *p, size_t len)
{
    if (len == 2 && memcmp(p, "ok", 2) == 0)
        return RELAY_STATUS_OK;
    if (len == 8 && memcmp(p, "degraded", 8) == 0)
        return RELAY_STATUS_DEGRADED;
    if (len == 7 && memcmp(p, "pending", 7) == 0)
        return RELAY_STATUS_PENDING;
    return RELAY_STATUS_UNKNOWN;
}

/* A check name as the relay writes them: printable ASCII without spaces
 * or commas. */
static int rt_check_name_ok(const char *p, size_t len)
{
    if (len == 0)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (p[i] <= ' ' || p[i] > '~' || p[i] == ',')
            return 0;
    return 1;
}

int relay_status_parse_keyword(const char *params, struct relay_status *out)
{
    const char *sp;
    size_t wlen;

    memset(out, 0, sizeof(*out));
    if (params == NULL)
        return -1;
    sp = strchr(params, ' ');
    wlen = sp != NULL ? (size_t)(sp - params) : strlen(params);
    out->state = rt_state_of(params, wlen);
    switch (out->state) {
    case RELAY_STATUS_OK:
    case RELAY_STATUS_PENDING:
        if (sp == NULL)
            return 0;
        break;
    case RELAY_STATUS_DEGRADED: {
        const char *list = sp != NULL ? sp + 1 : NULL;
        size_t n = list != NULL ? strlen(list) : 0;
        const char *p, *comma;

        if (n == 0 || n >= sizeof(out->failing) || strchr(list, ' ') != NULL)
            break;
        /* Each name of the comma list must be a check name. */
        for (p = list;; p = comma + 1) {
            comma = strchr(p, ',');
            if (!rt_check_name_ok(p, comma != NULL ? (size_t)(comma - p) : strlen(p)))
                goto bad;
            if (comma == NULL)
                break;
        }
        memcpy(out->failing, list, n + 1);
        return 0;
    }
    case RELAY_STATUS_UNKNOWN:
        break;
    }
bad:
    memset(out, 0, sizeof(*out));
    return -1;
}

/* Appends name to the comma list in out (size n); names that do not fit
 * are left out, ending the list with "..." once. */
static void rt_list_add(char *out, size_t n, const char *name, size_t len)
{
    size_t have = strlen(out);

    if (have >= 3 && strcmp(out + have - 3, "...") == 0)
        return;
    if (have + (have > 0) + len + 4 > n) {
        if (have + 4 <= n)
            memcpy(out + have, "...", 4);
        return;
    }
    if (have > 0)
        out[have++] = ',';
    memcpy(out + have, name, len);
    out[have + len] = '\0';
}

int relay_status_parse_xstatus(const char *text, struct relay_status *out)
{
    const char *line, *end, *last = NULL;
    size_t lastlen = 0;

    memset(out, 0, sizeof(*out));
    if (text == NULL)
        return -1;
    /* The last line first: it decides. */
    for (line = text;; line = end + 1) {
        end = strchr(line, '\n');
        last = line;
        lastlen = end != NULL ? (size_t)(end - line) : strlen(line);
        if (end == NULL)
            break;
    }
    {
        const char *p = last, *e = last + lastlen, *w;
        long long checked = 0;

        /* An enhanced status code (RFC 3463) in front when the status line
         * is not the reply's first line. */
        if (p < e && p[0] >= '2' && p[0] <= '5' && p + 1 < e && p[1] == '.') {
            const char *sp = memchr(p, ' ', (size_t)(e - p));

            if (sp == NULL)
                return -1;
            p = sp + 1;
        }
        if ((size_t)(e - p) < 7 || memcmp(p, "status ", 7) != 0)
            return -1;
        p += 7;
        w = p;
        while (p < e && *p != ' ')
            p++;
        out->state = rt_state_of(w, (size_t)(p - w));
        if (out->state == RELAY_STATUS_UNKNOWN)
            return -1;
        /* "checked=<unix time>" follows; anything else after it is for a
         * newer router. */
        if (p < e && (size_t)(e - p) > 9 && memcmp(p, " checked=", 9) == 0) {
            for (p += 9; p < e && *p >= '0' && *p <= '9' && checked < 100000000000LL; p++)
                checked = checked * 10 + (*p - '0');
            out->checked = checked;
        }
    }
    /* The per-check lines before it: collect the failing ones. */
    for (line = text; line != last; line = end + 1) {
        const char *sp1, *sp2, *reason;
        size_t len;

        end = strchr(line, '\n');
        len = (size_t)(end - line);
        sp1 = memchr(line, ' ', len);
        if (sp1 == NULL || !rt_check_name_ok(line, (size_t)(sp1 - line)))
            continue;
        sp2 = memchr(sp1 + 1, ' ', (size_t)(end - sp1 - 1));
        if ((size_t)((sp2 != NULL ? sp2 : end) - sp1 - 1) != 4 || memcmp(sp1 + 1, "fail", 4) != 0)
            continue;
        rt_list_add(out->failing, sizeof(out->failing), line, (size_t)(sp1 - line));
        if (out->reason[0] == '\0' && sp2 != NULL) {
            reason = sp2 + 1;
            rt_strf(out->reason, sizeof(out->reason), "%.*s", (int)(end - reason), reason);
        }
    }
    return 0;
}

/* ---- health ------------------------------------------------------------------------ */

/* Fills why and returns 1 healthy, 0 not. */
static int rt_health_of(const struct relay_transport *t, char *why, size_t whylen)
{
    if (!t->known) {
        rt_strf(why, whylen, "relay tunnel: first status check not finished");
        return 0;
    }
    if (!t->tunnel_up) {
        rt_strf(why, whylen, "relay tunnel down: %s", t->down_reason);
        return 0;
    }
    switch (t->status.state) {
    case RELAY_STATUS_OK:
        rt_strf(why, whylen, "ok");
        return 1;
    case RELAY_STATUS_DEGRADED:
        if (t->status.reason[0] != '\0')
            rt_strf(why, whylen, "relay degraded: %s (%s)", t->status.failing, t->status.reason);
        else
            rt_strf(why, whylen, "relay degraded: %s", t->status.failing);
        return 0;
    case RELAY_STATUS_PENDING:
        rt_strf(why, whylen, "relay self-check pending");
        return 0;
    case RELAY_STATUS_UNKNOWN:
        break;
    }
    rt_strf(why, whylen, "relay status unknown");
    return 0;
}

/* Takes the relay's verdict. A "pending" (the relay restarted and has not
 * finished its first run) keeps the verdict it replaces, so that a relay
 * restart alone does not flap the route. */
static void rt_set_status(struct relay_transport *t, const struct relay_status *st)
{
    char q[600];

    if (st->state == RELAY_STATUS_PENDING &&
        (t->status.state == RELAY_STATUS_OK || t->status.state == RELAY_STATUS_DEGRADED))
        return;
    if (st->state != t->status.state || strcmp(st->failing, t->status.failing) != 0) {
        const char *r = st->reason;

        if (st->state == RELAY_STATUS_DEGRADED)
            log_warn("route=%s event=relay_status host=%s from=%s to=%s failing=%s reason=%s",
                     t->route, t->hostport, relay_status_name(t->status.state),
                     relay_status_name(st->state), st->failing,
                     log_quote(q, sizeof(q), r, strlen(r)));
        else
            log_info("route=%s event=relay_status host=%s from=%s to=%s", t->route,
                     t->hostport, relay_status_name(t->status.state),
                     relay_status_name(st->state));
    }
    t->status = *st;
}

/* A check (or a send's connection) succeeded: the tunnel is up. */
static void rt_tunnel_ok(struct relay_transport *t)
{
    if (t->known && !t->tunnel_up)
        log_info("route=%s event=tunnel_up host=%s ip=%s", t->route, t->hostport, t->ip);
    t->known = 1;
    t->tunnel_up = 1;
    t->failures = 0;
    t->down_reason[0] = '\0';
}

/* A check failed, or a send could not set up its connection. Returns 1
 * when that made the tunnel count as down. */
static int rt_tunnel_failed(struct relay_transport *t, const char *why)
{
    char q[600];

    t->failures++;
    /* Once the tunnel is known to be down, each further failure is news
     * only when debugging. */
    if (t->known && !t->tunnel_up)
        log_debug("route=%s event=tunnel_check_failed host=%s failures=%u reason=%s", t->route,
                  t->hostport, t->failures, log_quote(q, sizeof(q), why, strlen(why)));
    else
        log_info("route=%s event=tunnel_check_failed host=%s failures=%u reason=%s", t->route,
                 t->hostport, t->failures, log_quote(q, sizeof(q), why, strlen(why)));
    if (t->failures < t->fail_limit)
        return 0;
    rt_strf(t->down_reason, sizeof(t->down_reason), "%s", why);
    if (!t->known || t->tunnel_up)
        log_warn("route=%s event=tunnel_down host=%s failures=%u reason=%s", t->route,
                 t->hostport, t->failures, log_quote(q, sizeof(q), why, strlen(why)));
    t->known = 1;
    t->tunnel_up = 0;
    return 1;
}

/* ---- the status check ------------------------------------------------------------------- */

static const char *const rt_poll_names[] = {
    [RP_WAIT] = "wait",
    [RP_RESOLVING] = "resolving",
    [RP_CONNECTING] = "connecting",
    [RP_QUERY] = "query",
};

/* Every change of the status check's state goes through here. */
static void rt_enter(struct relay_transport *t, enum rt_poll_state s)
{
    if (t->pstate == s)
        return;
    log_debug("route=%s event=status_state from=%s to=%s", t->route, rt_poll_names[t->pstate],
              rt_poll_names[s]);
    t->pstate = s;
}

static void rt_on_timer(uv_timer_t *h)
{
    rt_poll_start(h->data);
}

/* Waits delay_ms before the next check. */
static void rt_poll_wait(struct relay_transport *t, uint64_t delay_ms)
{
    rt_enter(t, RP_WAIT);
    if (!t->closing)
        uv_timer_start(&t->timer, rt_on_timer, delay_ms, 0);
}

static void rt_on_client_free(void *arg)
{
    struct relay_transport *t = arg;

    t->clients_alive--;
    rt_maybe_finish(t);
}

/* Lets go of the status connection: QUIT when it is usable, else at once. */
static void rt_release_client(struct relay_transport *t)
{
    struct smtp_client *cl = t->client;

    t->client = NULL;
    if (cl == NULL)
        return;
    if (smtp_client_idle(cl))
        smtp_client_quit(cl);
    else
        smtp_client_close(cl);
}

/* The check failed with why: the connection goes, and the next check
 * comes after a second (or status_interval once the tunnel is down). */
static void rt_check_failed(struct relay_transport *t, const char *why)
{
    rt_release_client(t);
    if (t->closing) {
        rt_enter(t, RP_WAIT);
        return;
    }
    if (rt_tunnel_failed(t, why))
        rt_poll_wait(t, t->interval_ms);
    else
        rt_poll_wait(t, RT_RETRY_MS < t->interval_ms ? RT_RETRY_MS : t->interval_ms);
}

/* The check got the relay's verdict. */
static void rt_check_done(struct relay_transport *t, const struct relay_status *st)
{
    rt_tunnel_ok(t);
    rt_set_status(t, st);
    log_debug("route=%s event=relay_checked host=%s status=%s failing=%s", t->route,
              t->hostport, relay_status_name(st->state), st->failing[0] ? st->failing : "-");
    /* While the relay's first run is pending, ask again soon. */
    rt_poll_wait(t, st->state == RELAY_STATUS_PENDING && t->interval_ms > RT_RETRY_MS
                        ? RT_RETRY_MS
                        : t->interval_ms);
}

static void rt_on_xstatus(struct smtp_client *cl, int status, const struct smtp_reply *reply,
                          void *arg)
{
    struct relay_transport *t = arg;
    struct relay_status st;
    char why[600];

    if (cl != t->client)
        return;                 /* released meanwhile (closing) */
    if (status != 0) {
        (void)reply;
        rt_strf(why, sizeof(why), "XSTATUS: no reply (connection lost or timed out)");
        rt_check_failed(t, why);
        return;
    }
    if (reply->code / 100 == 2 && relay_status_parse_xstatus(reply->text, &st) == 0) {
        rt_check_done(t, &st);
        return;
    }
    if (reply->code == 421) {
        /* The relay is shutting down (RFC 5321 section 3.8). */
        rt_strf(why, sizeof(why), "XSTATUS: %d %s", reply->code, reply->text);
        rt_check_failed(t, why);
        return;
    }
    /* A relay that does not know XSTATUS: its EHLO keyword is the status,
     * read afresh on a new connection at each check. */
    rt_release_client(t);
    rt_check_done(t, &t->kw);
}

static void rt_query(struct relay_transport *t)
{
    rt_enter(t, RP_QUERY);
    if (smtp_client_command(t->client, "XSTATUS", rt_on_xstatus, t) != 0)
        rt_check_failed(t, "XSTATUS: connection not usable");
}

static void rt_connect(struct relay_transport *t);

static void rt_on_ready(struct smtp_client *cl, int status, const struct smtp_reply *reply,
                        const char *err, void *arg)
{
    struct relay_transport *t = arg;
    char params[256], why[600];

    (void)reply;
    if (cl != t->client)
        return;
    if (status != 0) {
        /* The failed client releases itself. */
        t->client = NULL;
        if (t->closing) {
            rt_enter(t, RP_WAIT);
            return;
        }
        /* Another address of the host when this one did not answer. */
        if (strncmp(err, "connect:", 8) == 0 && t->ai + 1 < t->naddrs) {
            t->ai++;
            rt_connect(t);
            return;
        }
        rt_strf(why, sizeof(why), "%s%s%s", t->ip, t->ip[0] ? ": " : "", err);
        rt_check_failed(t, why);
        return;
    }
    /* Only a mailferry relay announces the keyword (docs/relay.md): a
     * plain MTA behind the configured address is not a tunnel. */
    if (!smtp_reply_has_keyword(smtp_client_ehlo(cl), "X-MAILFERRY-STATUS", params,
                                sizeof(params)) ||
        relay_status_parse_keyword(params, &t->kw) != 0) {
        rt_check_failed(t, "not a mailferry relay: no valid X-MAILFERRY-STATUS in the EHLO "
                           "reply");
        return;
    }
    log_debug("route=%s event=status_connected host=%s ip=%s status=%s", t->route, t->hostport,
              t->ip, relay_status_name(t->kw.state));
    rt_query(t);
}

static void rt_connect(struct relay_transport *t)
{
    struct smtp_client_opts o;
    const struct sockaddr *sa = (const struct sockaddr *)&t->addrs[t->ai];

    memset(&o, 0, sizeof(o));
    o.helo = t->helo;
    o.tls = SMTP_CLIENT_TLS_IMPLICIT;
    o.tls_ctx = t->tls_ctx;
    o.servername = t->servername;
    o.source = t->has_source ? (const struct sockaddr *)&t->source : NULL;
    o.connect_timeout = t->connect_timeout_s;
    o.greeting_timeout = t->timeout_s;
    o.command_timeout = t->timeout_s;
    if (sa->sa_family == AF_INET6) {
        char ip[64];

        uv_ip6_name((const struct sockaddr_in6 *)sa, ip, sizeof(ip));
        rt_strf(t->ip, sizeof(t->ip), "[%s]", ip);
    } else {
        uv_ip4_name((const struct sockaddr_in *)sa, t->ip, sizeof(t->ip));
    }
    rt_enter(t, RP_CONNECTING);
    t->client = smtp_client_connect(t->loop, sa, &o, rt_on_ready, t);
    t->clients_alive++;
    smtp_client_on_free(t->client, rt_on_client_free, t);
}

static void rt_on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct relay_transport *t = req->data;
    struct addrinfo *ai;
    char why[300];

    t->resolving = 0;
    if (t->closing || status == UV_ECANCELED) {
        if (res != NULL)
            uv_freeaddrinfo(res);
        rt_enter(t, RP_WAIT);
        rt_maybe_finish(t);
        return;
    }
    if (status < 0) {
        rt_strf(why, sizeof(why), "cannot resolve %s: %s", t->host, uv_strerror(status));
        rt_check_failed(t, why);
        return;
    }
    t->naddrs = 0;
    t->ai = 0;
    for (ai = res; ai != NULL && t->naddrs < RT_ADDRS_MAX; ai = ai->ai_next)
        if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
            ai->ai_addrlen <= sizeof(t->addrs[0]))
            memcpy(&t->addrs[t->naddrs++], ai->ai_addr, ai->ai_addrlen);
    uv_freeaddrinfo(res);
    if (t->naddrs == 0) {
        rt_strf(why, sizeof(why), "cannot resolve %s: no address", t->host);
        rt_check_failed(t, why);
        return;
    }
    rt_connect(t);
}

/* Runs one check: XSTATUS on the open status connection, or a new one. */
static void rt_poll_start(struct relay_transport *t)
{
    struct addrinfo hints;
    char why[300];
    int r;

    if (t->closing || t->pstate != RP_WAIT)
        return;
    if (t->client != NULL && smtp_client_idle(t->client)) {
        rt_query(t);
        return;
    }
    /* Gone since the last check (the relay closed it or died): anew. */
    rt_release_client(t);
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    t->gai.data = t;
    rt_enter(t, RP_RESOLVING);
    r = uv_getaddrinfo(t->loop, &t->gai, rt_on_resolved, t->host, t->port, &hints);
    if (r < 0) {
        rt_strf(why, sizeof(why), "cannot resolve %s: %s", t->host, uv_strerror(r));
        rt_check_failed(t, why);
        return;
    }
    t->resolving = 1;
}

/* ---- sends --------------------------------------------------------------------------- */

static void rt_on_sent(const struct transport_result *res, void *arg)
{
    struct rt_send *s = arg;
    struct relay_transport *t = s->t;

    /* A delivery that could not set up its connection is a failed check;
     * the next check runs now, so that two failures in a row (the default
     * status_failures) take the route out within milliseconds. */
    if (res->transport_failure && !t->closing && (!t->known || t->tunnel_up)) {
        const char *why = res->nrcpts > 0 ? res->rcpt[0].text : "connection failed";

        if (!rt_tunnel_failed(t, why) && t->pstate == RP_WAIT)
            rt_poll_wait(t, 0);
    }
    s->cb(res, s->arg);
    free(s);
}

/* ---- configuration ------------------------------------------------------------------- */

static void rt_free(struct relay_transport *t)
{
    free(t->route);
    free(t->host);
    free(t->servername);
    free(t->helo);
    if (t->tls_ctx != NULL)
        tls_ctx_unref(t->tls_ctx);
    free(t);
}

/*
 * Splits host into name and port: "name", "name:port", "[v6]" or
 * "[v6]:port", the port RELAY_TRANSPORT_DEFAULT_PORT when left out. Fills
 * hostport with "host:port" as the inner transport takes it.
 */
static int rt_parse_host(struct relay_transport *t, const char *v, char *err, size_t errlen)
{
    const char *name = v, *port = NULL;
    size_t nlen;
    long long p = RELAY_TRANSPORT_DEFAULT_PORT;
    char perr[128];

    if (v[0] == '[') {
        const char *close = strchr(v, ']');

        if (close == NULL || close == v + 1 || (close[1] != '\0' && close[1] != ':')) {
            rt_strf(err, errlen, "must be host, host:port or [IPv6]:port, got \"%s\"", v);
            return -1;
        }
        name = v + 1;
        nlen = (size_t)(close - name);
        if (close[1] == ':')
            port = close + 2;
    } else {
        const char *colon = strchr(v, ':');

        if (colon != NULL && strchr(colon + 1, ':') != NULL) {
            rt_strf(err, errlen, "an IPv6 address needs brackets: [%s]:port", v);
            return -1;
        }
        nlen = colon != NULL ? (size_t)(colon - v) : strlen(v);
        if (colon != NULL)
            port = colon + 1;
    }
    if (nlen == 0 || nlen > 253) {
        rt_strf(err, errlen, "must be host, host:port or [IPv6]:port, got \"%s\"", v);
        return -1;
    }
    if (port != NULL && config_parse_int(port, 1, 65535, &p, perr, sizeof(perr)) != 0) {
        rt_strf(err, errlen, "port %s", perr);
        return -1;
    }
    t->host = xstrndup(name, nlen);
    snprintf(t->port, sizeof(t->port), "%lld", p);
    if (v[0] == '[')
        rt_strf(t->hostport, sizeof(t->hostport), "[%s]:%lld", t->host, p);
    else
        rt_strf(t->hostport, sizeof(t->hostport), "%s:%lld", t->host, p);
    return 0;
}

static int rt_int(const char *key, const char *v, long long def, long long min, long long max,
                  long long *out, char *err, size_t errlen)
{
    char why[200];

    if (v == NULL) {
        *out = def;
        return 0;
    }
    if (config_parse_int(v, min, max, out, why, sizeof(why)) != 0) {
        rt_strf(err, errlen, "%s: %s, got \"%s\"", key, why, v);
        return -1;
    }
    return 0;
}

/* The value of key among kv, or NULL. */
static const char *rt_get(const struct config_named *kv, size_t nkv, const char *key)
{
    for (size_t i = 0; i < nkv; i++)
        if (strcmp(kv[i].key, key) == 0)
            return kv[i].value;
    return NULL;
}

/*
 * Checks the route's keys, builds the inner transport's (tunnel settings
 * first, then the keys passed through) and reads this module's. Errors
 * are "key: reason".
 */
static int rt_configure(struct relay_transport *t, const char *route,
                        const struct config_named *kv, size_t nkv, char *err, size_t errlen)
{
    struct config_named *ikv = xcalloc(nkv + 4, sizeof(*ikv));
    size_t ni = 0;
    const char *v;
    char why[512];
    long long n;
    int rc = -1;

    for (size_t i = 0; i < nkv; i++) {
        size_t k;

        for (k = 0; k < RT_NKEYS; k++)
            if (strcmp(kv[i].key, rt_keys[k].name) == 0)
                break;
        if (k == RT_NKEYS) {
            rt_strf(err, errlen, "%s: unknown key for the relay transport", kv[i].key);
            goto out;
        }
        if (rt_keys[k].kind == RK_REFUSED) {
            rt_strf(err, errlen, "%s: %s", kv[i].key, rt_keys[k].why);
            goto out;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(kv[j].key, kv[i].key) == 0) {
                rt_strf(err, errlen, "%s: set twice", kv[i].key);
                goto out;
            }
    }
    if ((v = rt_get(kv, nkv, "host")) == NULL) {
        rt_strf(err, errlen, "host: required (the relay's tunnel listener, host:port; port %d "
                             "when left out)", RELAY_TRANSPORT_DEFAULT_PORT);
        goto out;
    }
    if (rt_parse_host(t, v, why, sizeof(why)) != 0) {
        rt_strf(err, errlen, "host: %s", why);
        goto out;
    }
    if (rt_get(kv, nkv, "tunnel_ca") == NULL) {
        rt_strf(err, errlen, "tunnel_ca: required (the CA that issued the relay's "
                             "certificate, PEM)");
        goto out;
    }
    if (rt_get(kv, nkv, "client_cert") == NULL) {
        rt_strf(err, errlen, "client_cert: required (this router's certificate from the "
                             "tunnel CA, PEM; see mailferryctl tunnel-certs)");
        goto out;
    }

    /* The status connection's own settings, the same as the pool's. */
    t->tls_ctx = tls_ctx_client(rt_get(kv, nkv, "tunnel_ca"), 1, rt_get(kv, nkv, "client_cert"),
                                rt_get(kv, nkv, "client_key"), why, sizeof(why));
    if (t->tls_ctx == NULL) {
        /* The message names the file at fault. */
        rt_strf(err, errlen, "%s: %s",
                strstr(why, rt_get(kv, nkv, "tunnel_ca")) != NULL ? "tunnel_ca" : "client_cert",
                why);
        goto out;
    }
    v = rt_get(kv, nkv, "servername");
    t->servername = xstrdup(v != NULL ? v : t->host);
    if ((v = rt_get(kv, nkv, "helo")) != NULL) {
        t->helo = xstrdup(v);
    } else {
        char hn[256];

        if (gethostname(hn, sizeof(hn)) != 0 || hn[0] == '\0')
            snprintf(hn, sizeof(hn), "localhost");
        hn[sizeof(hn) - 1] = '\0';
        t->helo = xstrdup(hn);
    }
    if ((v = rt_get(kv, nkv, "source_address")) != NULL) {
        if (uv_ip4_addr(v, 0, (struct sockaddr_in *)&t->source) != 0 &&
            uv_ip6_addr(v, 0, (struct sockaddr_in6 *)&t->source) != 0) {
            rt_strf(err, errlen, "source_address: must be an IPv4 or IPv6 address, got \"%s\"",
                    v);
            goto out;
        }
        t->has_source = 1;
    }
    if (rt_int("status_interval", rt_get(kv, nkv, "status_interval"), 5, 1, 3600, &n, err,
               errlen) != 0)
        goto out;
    t->interval_ms = (uint64_t)n * 1000;
    if (rt_int("status_timeout", rt_get(kv, nkv, "status_timeout"), 10, 1, 300, &n, err,
               errlen) != 0)
        goto out;
    t->timeout_s = (unsigned)n;
    if (rt_int("status_failures", rt_get(kv, nkv, "status_failures"), 2, 1, 100, &n, err,
               errlen) != 0)
        goto out;
    t->fail_limit = (unsigned)n;
    /* The status connection waits for TCP no longer than the pool does,
     * and no longer than a status check may take. */
    if (rt_int("connect_timeout", rt_get(kv, nkv, "connect_timeout"), 30, 1, 3600, &n, err,
               errlen) != 0)
        goto out;
    t->connect_timeout_s = n < t->timeout_s ? (unsigned)n : t->timeout_s;

    /* The inner smtp transport: the tunnel's settings, then the rest. */
    ikv[ni].key = (char *)"host";
    ikv[ni++].value = t->hostport;
    ikv[ni].key = (char *)"tls";
    ikv[ni++].value = (char *)"implicit";
    ikv[ni].key = (char *)"tls_verify";
    ikv[ni++].value = (char *)"yes";
    ikv[ni].key = (char *)"ca_file";
    ikv[ni++].value = (char *)rt_get(kv, nkv, "tunnel_ca");
    for (size_t i = 0; i < nkv; i++)
        for (size_t k = 0; k < RT_NKEYS; k++)
            if (strcmp(kv[i].key, rt_keys[k].name) == 0 &&
                (rt_keys[k].kind == RK_PASS || rt_keys[k].kind == RK_BOTH)) {
                ikv[ni++] = kv[i];
                break;
            }
    t->inner = smtp_transport_ops.create(t->loop, route, ikv, ni, why, sizeof(why));
    if (t->inner == NULL) {
        /* "ca_file" is what this route calls tunnel_ca. */
        if (strncmp(why, "ca_file:", 8) == 0)
            rt_strf(err, errlen, "tunnel_ca:%s", why + 8);
        else
            rt_strf(err, errlen, "%s", why);
        goto out;
    }
    t->inner_open = 1;
    rc = 0;
out:
    free(ikv);
    return rc;
}

/* ---- the transport_ops ------------------------------------------------------------------ */

static struct transport *rt_create(uv_loop_t *loop, const char *route,
                                   const struct config_named *kv, size_t nkv, char *err,
                                   size_t errlen)
{
    struct relay_transport *t = xcalloc(1, sizeof(*t));

    t->loop = loop;
    t->route = xstrdup(route != NULL ? route : "-");
    if (rt_configure(t, t->route, kv, nkv, err, errlen) != 0) {
        rt_free(t);
        return NULL;
    }
    uv_timer_init(loop, &t->timer);
    t->timer.data = t;
    t->timer_open = 1;
    /* The first check runs as soon as the loop does (pstate starts as
     * RP_WAIT, the zero value). */
    uv_timer_start(&t->timer, rt_on_timer, 0, 0);
    log_info("route=%s event=transport_created transport=relay host=%s servername=%s "
             "status_interval_s=%llu status_failures=%u", t->route, t->hostport, t->servername,
             (unsigned long long)(t->interval_ms / 1000), t->fail_limit);
    return (struct transport *)t;
}

static void rt_send_op(struct transport *tp, const struct transport_msg *m, transport_done_cb cb,
                       void *arg)
{
    struct relay_transport *t = (struct relay_transport *)tp;
    struct rt_send *s = xmalloc(sizeof(*s));

    s->t = t;
    s->cb = cb;
    s->arg = arg;
    smtp_transport_ops.send(t->inner, m, rt_on_sent, s);
}

static int rt_health(struct transport *tp, char *why, size_t whylen)
{
    return rt_health_of((struct relay_transport *)tp, why, whylen);
}

/* Once closing and everything is gone, the owner is told and t freed. */
static void rt_maybe_finish(struct relay_transport *t)
{
    void (*closed)(void *arg);
    void *arg;

    if (!t->closing || t->inner_open || t->timer_open || t->resolving || t->clients_alive > 0)
        return;
    closed = t->closed;
    arg = t->closed_arg;
    log_info("route=%s event=transport_closed transport=relay", t->route);
    rt_free(t);
    if (closed != NULL)
        closed(arg);
}

static void rt_on_inner_closed(void *arg)
{
    struct relay_transport *t = arg;

    t->inner_open = 0;
    rt_maybe_finish(t);
}

static void rt_on_timer_closed(uv_handle_t *h)
{
    struct relay_transport *t = h->data;

    t->timer_open = 0;
    rt_maybe_finish(t);
}

static void rt_close(struct transport *tp, void (*closed)(void *arg), void *arg)
{
    struct relay_transport *t = (struct relay_transport *)tp;

    if (t->closing)
        return;
    t->closing = 1;
    t->closed = closed;
    t->closed_arg = arg;
    uv_timer_stop(&t->timer);
    if (t->resolving)
        uv_cancel((uv_req_t *)&t->gai);
    rt_release_client(t);
    uv_close((uv_handle_t *)&t->timer, rt_on_timer_closed);
    smtp_transport_ops.close(t->inner, rt_on_inner_closed, t);
}

const struct transport_ops relay_transport_ops = {
    .name = "relay",
    .create = rt_create,
    .send = rt_send_op,
    .health = rt_health,
    .close = rt_close,
    .health_opens_breaker = 1,
};
