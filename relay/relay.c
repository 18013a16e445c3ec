/*
 * relay: listeners, shared state and life cycle of the relay role; see
 * relay.h. The protocol lives in relay_session.c.
 */
#include "relay/relay.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#include "lib/dns.h"
#include "lib/log.h"
#include "lib/xmalloc.h"
#include "relay/mx_pool.h"
#include "relay/mx_resolve.h"
#include "relay/relay_session.h"
#include "relay/selfcheck.h"

#define RELAY_BACKLOG 511
/* How long a domain's MX answer is reused (lib/dns reports no TTL). */
#define RELAY_MX_CACHE_SECONDS 60

struct relay_listener {
    uv_tcp_t tcp;
    struct relay *r;
    char text[80];
};

struct relay_pin {
    unsigned char sha256[32];
};

struct relay {
    uv_loop_t *loop;
    const struct mf_config *cfg;
    struct tls_ctx *tls;
    struct tls_ctx *mx_tls;
    struct relay_pin *pins;
    size_t npins;
    struct dns *dns;
    struct mx_resolver *resolver;
    struct mx_pool *pool;
    struct selfcheck *selfcheck;

    struct relay_listener **listeners;
    size_t nlisteners;
    size_t listeners_open;

    struct list sessions;             /* of struct relay_session */
    size_t nsessions;

    struct relay_metrics metrics;
    int stopping;
    uv_timer_t grace;
    void (*done)(void *arg);
    void *done_arg;
};

/* ---- configuration ------------------------------------------------------------- */

/* Parses pinned_clients: "sha256:<hex>" items (colons allowed in the hex),
 * separated by commas or spaces. Returns 0 or -1 with err. */
static int relay_parse_pins(const char *s, struct relay_pin **out, size_t *nout, char *err,
                            size_t errlen)
{
    struct relay_pin *pins = NULL;
    size_t n = 0;

    while (s && *s) {
        size_t len, k = 0;
        const char *p;
        unsigned char b[32];

        s += strspn(s, ", \t");
        len = strcspn(s, ", \t");
        if (len == 0)
            break;
        if (len < 7 || strncasecmp(s, "sha256:", 7) != 0) {
            snprintf(err, errlen, "[relay] pinned_clients: \"%.*s\" must start with sha256:",
                     (int)(len < 80 ? len : 80), s);
            free(pins);
            return -1;
        }
        for (p = s + 7; p < s + len; p++) {
            int hi, lo;

            if (*p == ':')
                continue;
            if (k == 32 || p + 1 >= s + len || !isxdigit((unsigned char)p[0]) ||
                !isxdigit((unsigned char)p[1]))
                break;
            hi = isdigit((unsigned char)p[0]) ? p[0] - '0' : tolower((unsigned char)p[0]) - 'a' + 10;
            lo = isdigit((unsigned char)p[1]) ? p[1] - '0' : tolower((unsigned char)p[1]) - 'a' + 10;
            b[k++] = (unsigned char)(hi << 4 | lo);
            p++;
        }
        if (k != 32 || p != s + len) {
            snprintf(err, errlen, "[relay] pinned_clients: \"%.*s\" is not sha256: followed "
                     "by 64 hex digits", (int)(len < 100 ? len : 100), s);
            free(pins);
            return -1;
        }
        pins = xrealloc(pins, (n + 1) * sizeof(*pins));
        memcpy(pins[n++].sha256, b, 32);
        s += len;
    }
    *out = pins;
    *nout = n;
    return 0;
}

/* Parses source_address into at most one address per family. */
static int relay_parse_sources(const char *s, struct sockaddr_in *s4, int *has4,
                               struct sockaddr_in6 *s6, int *has6, char *err, size_t errlen)
{
    *has4 = *has6 = 0;
    memset(s4, 0, sizeof(*s4));
    memset(s6, 0, sizeof(*s6));
    while (s && *s) {
        char ip[INET6_ADDRSTRLEN + 1];
        size_t len;

        s += strspn(s, ", \t");
        len = strcspn(s, ", \t");
        if (len == 0)
            break;
        if (len >= sizeof(ip)) {
            snprintf(err, errlen, "[relay] source_address: not an IP address");
            return -1;
        }
        memcpy(ip, s, len);
        ip[len] = '\0';
        if (inet_pton(AF_INET, ip, &s4->sin_addr) == 1) {
            if ((*has4)++) {
                snprintf(err, errlen, "[relay] source_address: more than one IPv4 address");
                return -1;
            }
            s4->sin_family = AF_INET;
        } else if (inet_pton(AF_INET6, ip, &s6->sin6_addr) == 1) {
            if ((*has6)++) {
                snprintf(err, errlen, "[relay] source_address: more than one IPv6 address");
                return -1;
            }
            s6->sin6_family = AF_INET6;
        } else {
            snprintf(err, errlen, "[relay] source_address: \"%s\" is not an IP address", ip);
            return -1;
        }
        s += len;
    }
    return 0;
}

/* Loads the tunnel's server context: certificate, key, and the CA client
 * certificates must verify against (required, RFC 8446 section 4.3.2). */
static struct tls_ctx *relay_load_tls(const struct mf_config *cfg, char *err, size_t errlen)
{
    char why[512];
    struct tls_ctx *t = tls_ctx_server(cfg->relay.tls_cert, cfg->relay.tls_key,
                                       cfg->relay.tunnel_ca, 1, why, sizeof(why));

    if (t == NULL)
        snprintf(err, errlen, "[relay] %s", why);
    return t;
}

int relay_check(const struct mf_config *cfg, char *err, size_t errlen)
{
    static const char *const keys[] = {"listen", "tls_cert", "tls_key", "tunnel_ca", "public_ip"};
    const char *vals[] = {cfg->relay.listen, cfg->relay.tls_cert, cfg->relay.tls_key,
                          cfg->relay.tunnel_ca, cfg->relay.public_ip};
    unsigned char a[16];
    struct relay_pin *pins;
    size_t npins;
    struct sockaddr_in s4;
    struct sockaddr_in6 s6;
    int h4, h6;
    struct tls_ctx *t;

    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        if (vals[i] == NULL || vals[i][0] == '\0') {
            snprintf(err, errlen, "[relay] %s: required for the relay role", keys[i]);
            return -1;
        }
    }
    if (inet_pton(AF_INET, cfg->relay.public_ip, a) != 1 &&
        inet_pton(AF_INET6, cfg->relay.public_ip, a) != 1) {
        snprintf(err, errlen, "[relay] public_ip: must be one IP address, got \"%s\"",
                 cfg->relay.public_ip);
        return -1;
    }
    if (relay_parse_pins(cfg->relay.pinned_clients, &pins, &npins, err, errlen) < 0)
        return -1;
    free(pins);
    if (relay_parse_sources(cfg->relay.source_address, &s4, &h4, &s6, &h6, err, errlen) < 0)
        return -1;
    t = relay_load_tls(cfg, err, errlen);
    if (t == NULL)
        return -1;
    tls_ctx_unref(t);
    if (cfg->relay.mx_ca_file != NULL) {
        char why[512];

        t = tls_ctx_client(cfg->relay.mx_ca_file, cfg->relay.mx_tls_verify, NULL, NULL, why,
                           sizeof(why));
        if (t == NULL) {
            snprintf(err, errlen, "[relay] mx_ca_file: %s", why);
            return -1;
        }
        tls_ctx_unref(t);
    }
    return 0;
}

/* ---- listeners ------------------------------------------------------------------- */

static void relay_on_connection(uv_stream_t *server, int status)
{
    struct relay_listener *l = server->data;

    if (status < 0) {
        log_warn("event=accept_error listener=%s reason=%s", l->text, uv_err_name(status));
        return;
    }
    if (l->r->stopping)
        return;
    relay_session_accept(l->r, server);
}

static int relay_listen(struct relay *r, char *err, size_t errlen)
{
    const struct config_addr_list *addrs = &r->cfg->relay.listen_addrs;

    for (size_t i = 0; i < addrs->n; i++) {
        struct relay_listener *l = xcalloc(1, sizeof(*l));
        int rc;

        l->r = r;
        snprintf(l->text, sizeof(l->text), "%s", addrs->v[i].text);
        uv_tcp_init(r->loop, &l->tcp);
        l->tcp.data = l;
        r->listeners = xrealloc(r->listeners, (r->nlisteners + 1) * sizeof(*r->listeners));
        r->listeners[r->nlisteners++] = l;
        r->listeners_open++;
        rc = uv_tcp_bind(&l->tcp, (const struct sockaddr *)&addrs->v[i].ss, 0);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)&l->tcp, RELAY_BACKLOG, relay_on_connection);
        if (rc != 0) {
            snprintf(err, errlen, "[relay] listen: cannot listen on %s: %s", l->text,
                     uv_strerror(rc));
            return -1;
        }
        log_info("event=listen listener=relay address=%s", l->text);
    }
    return 0;
}

static void relay_listener_closed(uv_handle_t *h)
{
    struct relay_listener *l = h->data;

    l->r->listeners_open--;
    free(l);
}

static void relay_close_listeners(struct relay *r)
{
    for (size_t i = 0; i < r->nlisteners; i++)
        uv_close((uv_handle_t *)&r->listeners[i]->tcp, relay_listener_closed);
    free(r->listeners);
    r->listeners = NULL;
    r->nlisteners = 0;
}

/* ---- creation --------------------------------------------------------------------- */

static void relay_freed(uv_handle_t *h)
{
    free(h->data);
}

static void relay_metrics_register(struct relay_metrics *m)
{
    struct metrics *reg = metrics_default();

    m->connections = metrics_gauge(reg, "mailferry_relay_connections",
                                   "Tunnel connections from routers open.", "");
    m->tunnels = metrics_counter(reg, "mailferry_relay_tunnels_total",
                                 "Tunnel connections accepted, by outcome of the TLS "
                                 "handshake and pinning.", "result");
    m->rcpt = metrics_counter(reg, "mailferry_relay_rcpt_total",
                              "Replies to RCPT passed back to routers, by class (2xx, 4xx, "
                              "5xx).", "class");
    m->messages = metrics_counter(reg, "mailferry_relay_messages_total",
                                  "Replies to the end of data passed back to routers, by "
                                  "class.", "class");
}

struct relay *relay_new(uv_loop_t *loop, const struct mf_config *cfg, char *err, size_t errlen)
{
    struct relay *r = xcalloc(1, sizeof(*r));
    struct dns_options dopts;
    struct mx_resolver_opts ropts;
    struct mx_pool_opts popts;
    struct selfcheck_opts sopts;
    struct sockaddr_in s4;
    struct sockaddr_in6 s6;
    int h4, h6, v6;
    unsigned char a[16];
    char why[512];

    r->loop = loop;
    r->cfg = cfg;
    uv_timer_init(loop, &r->grace);
    r->grace.data = r;
    relay_metrics_register(&r->metrics);
    if (relay_check(cfg, err, errlen) < 0 ||
        relay_parse_pins(cfg->relay.pinned_clients, &r->pins, &r->npins, err, errlen) < 0 ||
        relay_parse_sources(cfg->relay.source_address, &s4, &h4, &s6, &h6, err, errlen) < 0)
        goto fail;
    r->tls = relay_load_tls(cfg, err, errlen);
    if (r->tls == NULL)
        goto fail;
    r->mx_tls = tls_ctx_client(cfg->relay.mx_ca_file, cfg->relay.mx_tls_verify, NULL, NULL, why,
                               sizeof(why));
    if (r->mx_tls == NULL) {
        snprintf(err, errlen, "[relay] MX TLS context: %s", why);
        goto fail;
    }
    memset(&dopts, 0, sizeof(dopts));
    dopts.servers = cfg->relay.resolver;
    dopts.timeout_ms = cfg->dns.timeout;
    r->dns = dns_new(loop, &dopts, why, sizeof(why));
    if (r->dns == NULL) {
        snprintf(err, errlen, "[relay] resolver: %s", why);
        goto fail;
    }
    if (relay_listen(r, err, errlen) < 0)
        goto fail;

    v6 = inet_pton(AF_INET, cfg->relay.public_ip, a) != 1;
    memset(&ropts, 0, sizeof(ropts));
    ropts.use_v4 = h4 || !h6;
    ropts.use_v6 = h6 || !h4;
    ropts.prefer = v6 ? AF_INET6 : AF_INET;
    ropts.cache_seconds = RELAY_MX_CACHE_SECONDS;
    r->resolver = mx_resolver_new(loop, r->dns, &ropts);

    memset(&popts, 0, sizeof(popts));
    popts.helo = cfg->relay.helo_name;
    popts.port = (unsigned)cfg->relay.mx_port;
    popts.source4 = h4 ? (struct sockaddr *)&s4 : NULL;
    popts.source6 = h6 ? (struct sockaddr *)&s6 : NULL;
    popts.tls_ctx = r->mx_tls;
    popts.tls_verify = cfg->relay.mx_tls_verify;
    popts.max_per_domain = (unsigned)cfg->relay.mx_max_connections_per_domain;
    popts.idle_timeout = (unsigned)cfg->relay.mx_idle_timeout;
    popts.connect_timeout = (unsigned)cfg->relay.mx_connect_timeout;
    r->pool = mx_pool_new(loop, &popts);

    memset(&sopts, 0, sizeof(sopts));
    sopts.public_ip = cfg->relay.public_ip;
    sopts.helo_name = cfg->relay.helo_name;
    sopts.dnsbl_zones = cfg->relay.dnsbl_zones;
    sopts.spf_domains = cfg->relay.spf_domains;
    sopts.interval = (unsigned)cfg->relay.check_interval;
    r->selfcheck = selfcheck_new(loop, r->dns, &sopts, why, sizeof(why));
    if (r->selfcheck == NULL) {
        snprintf(err, errlen, "[relay] %s", why);
        goto fail;
    }
    selfcheck_start(r->selfcheck);
    metric_labels(r->metrics.tunnels, "ok");
    log_info("event=relay_start helo=%s public_ip=%s mx_port=%d pins=%zu resolver=%s",
             cfg->relay.helo_name, cfg->relay.public_ip, cfg->relay.mx_port, r->npins,
             cfg->relay.resolver ? cfg->relay.resolver : "system");
    return r;

fail:
    /* Handles are closed by the loop; the caller exits. */
    relay_close_listeners(r);
    if (r->selfcheck)
        selfcheck_close(r->selfcheck);
    if (r->pool)
        mx_pool_close(r->pool, NULL, NULL);
    if (r->resolver)
        mx_resolver_close(r->resolver);
    if (r->dns)
        dns_close(r->dns, NULL, NULL);
    if (r->tls)
        tls_ctx_unref(r->tls);
    if (r->mx_tls)
        tls_ctx_unref(r->mx_tls);
    free(r->pins);
    uv_close((uv_handle_t *)&r->grace, relay_freed);
    return NULL;
}

int relay_reload(struct relay *r)
{
    char err[600], q[700];
    struct tls_ctx *t = relay_load_tls(r->cfg, err, sizeof(err));

    if (t == NULL) {
        log_error("event=reload result=fail reason=%s", log_quote(q, sizeof(q), err, strlen(err)));
        return -1;
    }
    tls_ctx_unref(r->tls);
    r->tls = t;
    log_info("event=reload result=ok tls=yes");
    return 0;
}

/* ---- shutdown --------------------------------------------------------------------- */

static void relay_dns_closed(void *arg)
{
    struct relay *r = arg;
    void (*done)(void *) = r->done;

    r->dns = NULL;
    r->done = NULL;
    if (done != NULL)
        done(r->done_arg);
}

static void relay_pool_closed(void *arg)
{
    struct relay *r = arg;

    r->pool = NULL;
    mx_resolver_close(r->resolver);
    r->resolver = NULL;
    selfcheck_close(r->selfcheck);
    r->selfcheck = NULL;
    dns_close(r->dns, relay_dns_closed, r);
}

static void relay_on_grace(uv_timer_t *t)
{
    struct relay *r = t->data;

    if (r->nsessions == 0) {
        if (r->pool != NULL && r->done != NULL)
            mx_pool_close(r->pool, relay_pool_closed, r);
        return;
    }
    log_warn("event=shutdown_grace_expired sessions=%zu", r->nsessions);
    for (struct list_node *n = r->sessions.head; n; n = n->next)
        relay_session_abort(n->owner);
}

void relay_shutdown(struct relay *r, void (*done)(void *arg), void *arg)
{
    struct list_node *n, *next;

    if (r->stopping)
        return;
    r->stopping = 1;
    r->done = done;
    r->done_arg = arg;
    log_info("event=shutdown role=relay sessions=%zu grace=%d", r->nsessions,
             r->cfg->relay.shutdown_grace);
    relay_close_listeners(r);
    for (n = r->sessions.head; n; n = next) {
        next = n->next;
        relay_session_shutdown(n->owner);
    }
    uv_timer_start(&r->grace, relay_on_grace,
                   r->nsessions ? (uint64_t)r->cfg->relay.shutdown_grace * 1000 : 0, 0);
}

void relay_free(struct relay *r)
{
    if (r == NULL)
        return;
    relay_close_listeners(r);
    if (r->tls)
        tls_ctx_unref(r->tls);
    if (r->mx_tls)
        tls_ctx_unref(r->mx_tls);
    free(r->pins);
    uv_timer_stop(&r->grace);
    uv_close((uv_handle_t *)&r->grace, relay_freed);
}

/* ---- accessors ---------------------------------------------------------------------- */

size_t relay_listening(const struct relay *r)
{
    return r->stopping ? 0 : r->listeners_open;
}

int relay_status_ok(const struct relay *r)
{
    return r->selfcheck != NULL && selfcheck_ok(r->selfcheck);
}

const struct mf_config *relay_config(const struct relay *r) { return r->cfg; }
struct tls_ctx *relay_tls(const struct relay *r) { return r->tls; }
uv_loop_t *relay_loop(const struct relay *r) { return r->loop; }
struct mx_resolver *relay_resolver(const struct relay *r) { return r->resolver; }
struct mx_pool *relay_pool(const struct relay *r) { return r->pool; }
struct selfcheck *relay_selfcheck(const struct relay *r) { return r->selfcheck; }
const struct relay_metrics *relay_metrics(const struct relay *r) { return &r->metrics; }
int relay_stopping(const struct relay *r) { return r->stopping; }

int relay_pin_ok(const struct relay *r, X509 *cert, char *fp, size_t fplen)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    size_t off;

    if (fplen > 0)
        fp[0] = '\0';
    if (cert == NULL || X509_digest(cert, EVP_sha256(), md, &mdlen) != 1 || mdlen != 32)
        return 0;
    off = (size_t)snprintf(fp, fplen, "sha256:");
    for (unsigned i = 0; i < mdlen && off + 2 < fplen; i++)
        off += (size_t)snprintf(fp + off, fplen - off, "%02x", md[i]);
    if (r->npins == 0)
        return 1;
    for (size_t i = 0; i < r->npins; i++)
        if (memcmp(r->pins[i].sha256, md, 32) == 0)
            return 1;
    return 0;
}

void relay_session_add(struct relay *r, struct relay_session *s)
{
    list_push(&r->sessions, relay_session_node(s), s);
    r->nsessions++;
}

void relay_session_gone(struct relay *r, struct relay_session *s)
{
    list_remove(&r->sessions, relay_session_node(s));
    r->nsessions--;
    if (r->stopping && r->nsessions == 0) {
        /* Finish from a timer callback, not from inside the session's
         * teardown. */
        uv_timer_start(&r->grace, relay_on_grace, 0, 0);
    }
}

int relay_admit(const struct relay *r)
{
    return r->nsessions <= (size_t)r->cfg->relay.max_connections;
}
