#include "gateway/gateway.h"

#include <stdlib.h>
#include <string.h>

#include "gateway/dkim.h"
#include "gateway/smtp_session.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

#define GATEWAY_BACKLOG 511
#define GATEWAY_IP_BUCKETS 4096

struct gateway_listener {
    uv_tcp_t tcp;
    struct gateway *gw;
    enum gateway_listener_kind kind;
    char text[80];
};

/* Connections per client address, for max_connections_per_ip. */
struct gateway_ipcount {
    struct gateway_ipcount *next;
    unsigned count;
    char ip[];
};

struct gateway {
    uv_loop_t *loop;
    const struct mf_config *cfg;
    struct queue *queue;
    struct tls_ctx *tls;
    struct users *users;
    struct dkim_keys *dkim;       /* DKIM signing keys (gateway/dkim.h) */

    struct gateway_listener **listeners;
    size_t nlisteners;
    size_t listeners_open;

    struct list sessions;           /* of struct smtp_session */
    size_t nsessions;
    size_t nadmitted;
    struct gateway_ipcount *ips[GATEWAY_IP_BUCKETS];

    int paused;
    int stopping;
    struct gateway_metrics metrics;
    uv_timer_t grace;
    void (*done)(void *arg);
    void *done_arg;
};

static const char *const gateway_kind_names[] = {
    [GATEWAY_LISTEN_PLAIN] = "listen",
    [GATEWAY_LISTEN_SUBMISSION] = "listen_submission",
    [GATEWAY_LISTEN_TLS] = "listen_tls",
};

static const char *const gateway_listener_labels[] = {
    [GATEWAY_LISTEN_PLAIN] = "smtp",
    [GATEWAY_LISTEN_SUBMISSION] = "submission",
    [GATEWAY_LISTEN_TLS] = "submissions",
};

const char *gateway_listener_label(enum gateway_listener_kind kind)
{
    return gateway_listener_labels[kind];
}

/* Message sizes: 1 KiB to 64 MiB by powers of 4. */
static const double gateway_bytes_buckets[] = {
    1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
};
/* Redis commit times: 0.5 ms to 10 s. */
static const double gateway_enqueue_buckets[] = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
};

static void gateway_metrics_register(struct gateway_metrics *m)
{
    struct metrics *reg = metrics_default();

    m->connections = metrics_gauge(reg, "mailferry_smtp_connections",
                                   "SMTP connections open, by listener kind.", "listener");
    m->sessions = metrics_counter(reg, "mailferry_smtp_sessions_total",
                                  "SMTP connections accepted, by listener kind.", "listener");
    m->accepted = metrics_counter(reg, "mailferry_messages_accepted_total",
                                  "Messages committed to the queue and answered with 250.", "");
    m->rejected = metrics_counter(reg, "mailferry_messages_rejected_total",
                                  "SMTP commands and messages refused, by the reason the log "
                                  "line gives.", "reason");
    m->bytes = metrics_histogram(reg, "mailferry_message_bytes",
                                 "Size of accepted messages as queued, in bytes.", "",
                                 gateway_bytes_buckets,
                                 sizeof(gateway_bytes_buckets) / sizeof(double));
    m->enqueue = metrics_histogram(reg, "mailferry_enqueue_seconds",
                                   "Time from the end of data until Redis committed the "
                                   "message.", "", gateway_enqueue_buckets,
                                   sizeof(gateway_enqueue_buckets) / sizeof(double));
}

static int gateway_load(const struct mf_config *cfg, struct tls_ctx **tls, struct users **users,
                        struct dkim_keys **dkim, char *err, size_t errlen)
{
    *tls = NULL;
    *users = NULL;
    *dkim = NULL;
    if (cfg->gateway.tls_cert && cfg->gateway.tls_key) {
        *tls = tls_ctx_server(cfg->gateway.tls_cert, cfg->gateway.tls_key, NULL, 0, err, errlen);
        if (*tls == NULL)
            return -1;
    }
    if (cfg->gateway.users_file) {
        *users = users_load(cfg->gateway.users_file, err, errlen);
        if (*users == NULL) {
            if (*tls)
                tls_ctx_unref(*tls);
            *tls = NULL;
            return -1;
        }
    }
    /* DKIM keys: loaded at start and on SIGHUP like the rest. */
    *dkim = dkim_keys_load(cfg, err, errlen);
    if (*dkim == NULL) {
        if (*tls)
            tls_ctx_unref(*tls);
        if (*users)
            users_unref(*users);
        *tls = NULL;
        *users = NULL;
        return -1;
    }
    return 0;
}

int gateway_check(const struct mf_config *cfg, char *err, size_t errlen)
{
    struct tls_ctx *tls;
    struct users *users;
    struct dkim_keys *dkim;

    if (gateway_load(cfg, &tls, &users, &dkim, err, errlen) != 0)
        return -1;
    if (tls)
        tls_ctx_unref(tls);
    if (users)
        users_unref(users);
    dkim_keys_unref(dkim);
    return 0;
}

static void gateway_on_connection(uv_stream_t *server, int status)
{
    struct gateway_listener *l = server->data;

    if (status < 0) {
        log_warn("event=accept_error listener=%s reason=%s", l->text, uv_err_name(status));
        return;
    }
    if (l->gw->stopping)
        return;
    smtp_session_accept(l->gw, server, l->kind);
}

static int gateway_listen(struct gateway *gw, const struct config_addr_list *addrs,
                          enum gateway_listener_kind kind, char *err, size_t errlen)
{
    for (size_t i = 0; i < addrs->n; i++) {
        struct gateway_listener *l = xcalloc(1, sizeof(*l));
        int rc;

        l->gw = gw;
        l->kind = kind;
        snprintf(l->text, sizeof(l->text), "%s", addrs->v[i].text);
        uv_tcp_init(gw->loop, &l->tcp);
        l->tcp.data = l;
        gw->listeners = xrealloc(gw->listeners, (gw->nlisteners + 1) * sizeof(*gw->listeners));
        gw->listeners[gw->nlisteners++] = l;
        gw->listeners_open++;
        rc = uv_tcp_bind(&l->tcp, (const struct sockaddr *)&addrs->v[i].ss, 0);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)&l->tcp, GATEWAY_BACKLOG, gateway_on_connection);
        if (rc != 0) {
            snprintf(err, errlen, "[gateway] %s: cannot listen on %s: %s",
                     gateway_kind_names[kind], l->text, uv_strerror(rc));
            return -1;
        }
        log_info("event=listen listener=%s address=%s", gateway_kind_names[kind], l->text);
        /* Exported as 0 from the start for the kinds that are open. */
        metric_labels(gw->metrics.connections, gateway_listener_label(kind));
        metric_labels(gw->metrics.sessions, gateway_listener_label(kind));
    }
    return 0;
}

static void gateway_on_backpressure(int paused, void *arg)
{
    struct gateway *gw = arg;

    gw->paused = paused;
    log_warn("event=%s reason=redis_backlog pending_bytes=%zu",
             paused ? "reading_paused" : "reading_resumed", queue_pending_bytes(gw->queue));
    for (struct list_node *n = gw->sessions.head; n; n = n->next)
        smtp_session_set_paused(n->owner, paused);
}

static void gateway_listener_closed(uv_handle_t *h)
{
    struct gateway_listener *l = h->data;
    l->gw->listeners_open--;
    free(l);
}

static void gateway_close_listeners(struct gateway *gw)
{
    for (size_t i = 0; i < gw->nlisteners; i++)
        uv_close((uv_handle_t *)&gw->listeners[i]->tcp, gateway_listener_closed);
    free(gw->listeners);
    gw->listeners = NULL;
    gw->nlisteners = 0;
}

struct gateway *gateway_new(uv_loop_t *loop, const struct mf_config *cfg, struct queue *q,
                            char *err, size_t errlen)
{
    struct gateway *gw = xcalloc(1, sizeof(*gw));

    gw->loop = loop;
    gw->cfg = cfg;
    gw->queue = q;
    gateway_metrics_register(&gw->metrics);
    uv_timer_init(loop, &gw->grace);
    gw->grace.data = gw;
    if (gateway_load(cfg, &gw->tls, &gw->users, &gw->dkim, err, errlen) != 0 ||
        gateway_listen(gw, &cfg->gateway.listen_addrs, GATEWAY_LISTEN_PLAIN, err, errlen) != 0 ||
        gateway_listen(gw, &cfg->gateway.submission_addrs, GATEWAY_LISTEN_SUBMISSION, err,
                       errlen) != 0 ||
        gateway_listen(gw, &cfg->gateway.tls_addrs, GATEWAY_LISTEN_TLS, err, errlen) != 0) {
        /* Listeners are closed by the loop; the caller exits. */
        gateway_close_listeners(gw);
        if (gw->tls)
            tls_ctx_unref(gw->tls);
        if (gw->users)
            users_unref(gw->users);
        dkim_keys_unref(gw->dkim);
        gw->tls = NULL;
        gw->users = NULL;
        gw->dkim = NULL;
        uv_close((uv_handle_t *)&gw->grace, NULL);
        return NULL;
    }
    if (gw->nlisteners == 0)
        log_warn("event=no_listeners reason=\"none of listen, listen_submission, listen_tls is set\"");
    queue_set_backpressure(q, (size_t)cfg->gateway.max_pending_bytes,
                           (size_t)cfg->gateway.max_pending_bytes / 2, gateway_on_backpressure, gw);
    return gw;
}

int gateway_reload(struct gateway *gw)
{
    struct tls_ctx *tls;
    struct users *users;
    struct dkim_keys *dkim;
    char err[512];

    if (gateway_load(gw->cfg, &tls, &users, &dkim, err, sizeof(err)) != 0) {
        char q[600];
        log_error("event=reload result=fail reason=%s", log_quote(q, sizeof(q), err, strlen(err)));
        return -1;
    }
    if (gw->tls)
        tls_ctx_unref(gw->tls);
    if (gw->users)
        users_unref(gw->users);
    /* Signatures in progress keep their reference to the old keys. */
    dkim_keys_unref(gw->dkim);
    gw->tls = tls;
    gw->users = users;
    gw->dkim = dkim;
    log_info("event=reload result=ok tls=%s users=%zu dkim_keys=%zu", tls ? "yes" : "no",
             users ? users_count(users) : 0, dkim_keys_count(dkim));
    return 0;
}

static void gateway_maybe_done(struct gateway *gw);

static void gateway_on_grace(uv_timer_t *t)
{
    struct gateway *gw = t->data;

    if (gw->nsessions == 0) {
        gateway_maybe_done(gw);
        return;
    }
    log_warn("event=shutdown_grace_expired sessions=%zu", gw->nsessions);
    for (struct list_node *n = gw->sessions.head; n; n = n->next)
        smtp_session_abort(n->owner);
}

static void gateway_maybe_done(struct gateway *gw)
{
    void (*done)(void *) = gw->done;

    if (!gw->stopping || gw->nsessions > 0 || done == NULL)
        return;
    gw->done = NULL;
    uv_timer_stop(&gw->grace);
    done(gw->done_arg);
}

void gateway_shutdown(struct gateway *gw, void (*done)(void *arg), void *arg)
{
    struct list_node *n, *next;

    if (gw->stopping)
        return;
    gw->stopping = 1;
    gw->done = done;
    gw->done_arg = arg;
    log_info("event=shutdown sessions=%zu grace=%d", gw->nsessions, gw->cfg->gateway.shutdown_grace);
    gateway_close_listeners(gw);
    for (n = gw->sessions.head; n; n = next) {
        next = n->next;
        smtp_session_shutdown(n->owner);
    }
    /* With no sessions the timer fires at once and completes the stop from
     * the loop, never from inside this call. */
    uv_timer_start(&gw->grace, gateway_on_grace,
                   gw->nsessions ? (uint64_t)gw->cfg->gateway.shutdown_grace * 1000 : 0, 0);
}

static void gateway_freed(uv_handle_t *h)
{
    free(h->data);
}

void gateway_free(struct gateway *gw)
{
    if (gw == NULL)
        return;
    gateway_close_listeners(gw);
    if (gw->tls)
        tls_ctx_unref(gw->tls);
    if (gw->users)
        users_unref(gw->users);
    dkim_keys_unref(gw->dkim);
    for (size_t i = 0; i < GATEWAY_IP_BUCKETS; i++) {
        while (gw->ips[i]) {
            struct gateway_ipcount *n = gw->ips[i]->next;
            free(gw->ips[i]);
            gw->ips[i] = n;
        }
    }
    /* The grace timer is embedded: free the gateway once it is closed. */
    gw->grace.data = gw;
    uv_close((uv_handle_t *)&gw->grace, gateway_freed);
}

const struct mf_config *gateway_config(const struct gateway *gw) { return gw->cfg; }
struct queue *gateway_queue(const struct gateway *gw) { return gw->queue; }
struct tls_ctx *gateway_tls(const struct gateway *gw) { return gw->tls; }
struct users *gateway_users(const struct gateway *gw) { return gw->users; }
struct dkim_keys *gateway_dkim(const struct gateway *gw) { return gw->dkim; }
int gateway_paused(const struct gateway *gw) { return gw->paused; }
int gateway_stopping(const struct gateway *gw) { return gw->stopping; }
uv_loop_t *gateway_loop(const struct gateway *gw) { return gw->loop; }
const struct gateway_metrics *gateway_metrics(const struct gateway *gw) { return &gw->metrics; }

size_t gateway_listening(const struct gateway *gw)
{
    return gw->stopping ? 0 : gw->listeners_open;
}

static unsigned gateway_ip_hash(const char *ip)
{
    unsigned h = 2166136261u;
    for (; *ip; ip++)
        h = (h ^ (unsigned char)*ip) * 16777619u;
    return h % GATEWAY_IP_BUCKETS;
}

int gateway_admit(struct gateway *gw, const char *ip)
{
    struct gateway_ipcount **slot = &gw->ips[gateway_ip_hash(ip)], *e;

    if (gw->nadmitted >= (size_t)gw->cfg->gateway.max_connections)
        return GATEWAY_LIMIT_TOTAL;
    for (e = *slot; e; e = e->next)
        if (strcmp(e->ip, ip) == 0)
            break;
    if (e && e->count >= (unsigned)gw->cfg->gateway.max_connections_per_ip)
        return GATEWAY_LIMIT_PER_IP;
    if (e == NULL) {
        size_t n = strlen(ip) + 1;
        e = xcalloc(1, sizeof(*e) + n);
        memcpy(e->ip, ip, n);
        e->next = *slot;
        *slot = e;
    }
    e->count++;
    gw->nadmitted++;
    return 0;
}

static void gateway_release(struct gateway *gw, const char *ip)
{
    struct gateway_ipcount **pp = &gw->ips[gateway_ip_hash(ip)], *e;

    for (; (e = *pp) != NULL; pp = &e->next) {
        if (strcmp(e->ip, ip) != 0)
            continue;
        if (--e->count == 0) {
            *pp = e->next;
            free(e);
        }
        break;
    }
    gw->nadmitted--;
}

void gateway_session_add(struct gateway *gw, struct smtp_session *s)
{
    list_push(&gw->sessions, smtp_session_node(s), s);
    gw->nsessions++;
    if (gw->paused)
        smtp_session_set_paused(s, 1);
}

void gateway_session_gone(struct gateway *gw, struct smtp_session *s)
{
    if (smtp_session_admitted(s))
        gateway_release(gw, smtp_session_ip(s));
    list_remove(&gw->sessions, smtp_session_node(s));
    gw->nsessions--;
    if (gw->stopping && gw->nsessions == 0) {
        /* Finish from a timer callback, not from inside the session's
         * own teardown. */
        uv_timer_start(&gw->grace, gateway_on_grace, 0, 0);
    }
}
