/*
 * The "smtp" transport: delivery to one smarthost over ESMTP, with
 * STARTTLS or implicit TLS, AUTH, and a pool of reusable connections.
 *
 * Configuration comes from the route's section ([route NAME]) as key/value
 * pairs, checked against a declarative table (st_keys). Unknown keys are
 * errors: the router hands over only the keys that are not policy keys, so
 * anything left that this table does not know is a typo.
 *
 * Pool. Every connection is an entry (struct st_conn) holding one
 * smtp_client. A send goes to an idle connected entry when there is one;
 * otherwise, below max_connections, a new connection is made (the host
 * name resolved with uv_getaddrinfo, then each address tried in turn);
 * otherwise it waits in a FIFO queue that entries serve in order as they
 * become idle. An entry is retired after max_messages_per_connection
 * messages or idle_timeout seconds without work (QUIT). Entries count
 * against the cap until their client has freed itself, so the server never
 * sees more than max_connections sockets from one transport.
 *
 * Failures. A connection that cannot be set up (refused, timed out, TLS,
 * AUTH, a refusing greeting) fails every queued send with temporary
 * results and transport_failure set: the router moves traffic elsewhere
 * instead of this transport trying again in a loop. unhealthy_after such
 * failures in a row make health() report the transport down with the last
 * reason; the next connection that works makes it healthy again.
 *
 * Callbacks. Done callbacks are never called from inside the transport's
 * own processing: completed sends go on a list that a zero-delay timer
 * empties, so a callback can send again or close the transport freely.
 */
#include <assert.h>
#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "lib/config.h"
#include "lib/log.h"
#include "lib/xmalloc.h"
#include "transports/smtp_client.h"
#include "transports/transport.h"

#define ST_ADDRS_MAX 8          /* addresses of the host tried per connection */
#define ST_SECRET_MAX 1024      /* longest password read from a file */

/* ---- configuration ------------------------------------------------------- */

enum st_type { ST_STR, ST_INT, ST_BOOL, ST_TLS };

enum st_key_id {
    K_HOST, K_TLS, K_CA_FILE, K_TLS_VERIFY, K_CLIENT_CERT, K_CLIENT_KEY, K_SERVERNAME,
    K_AUTH_USER, K_AUTH_PASSWORD_ENV, K_AUTH_PASSWORD_FILE, K_HELO, K_SOURCE_ADDRESS,
    K_MAX_CONNECTIONS, K_MAX_MESSAGES, K_IDLE_TIMEOUT, K_UNHEALTHY_AFTER, K_UNHEALTHY_RETRY,
    K_CONNECT_TIMEOUT, K_GREETING_TIMEOUT, K_COMMAND_TIMEOUT, K_MAIL_TIMEOUT,
    K_RCPT_TIMEOUT, K_DATA_TIMEOUT, K_BLOCK_TIMEOUT, K_DOT_TIMEOUT,
    K__COUNT
};

struct st_key {
    const char *name;
    enum st_type type;
    const char *def;            /* NULL: no default (optional or computed) */
    long long min, max;         /* ST_INT bounds */
};

/* Every key the smtp transport reads, with its default. Timeouts are in
 * seconds; their defaults are RFC 5321 section 4.5.3.2's. */
static const struct st_key st_keys[K__COUNT] = {
    [K_HOST] = {"host", ST_STR, NULL, 0, 0},
    [K_TLS] = {"tls", ST_TLS, "opportunistic", 0, 0},
    [K_CA_FILE] = {"ca_file", ST_STR, NULL, 0, 0},
    [K_TLS_VERIFY] = {"tls_verify", ST_BOOL, NULL, 0, 0},
    [K_CLIENT_CERT] = {"client_cert", ST_STR, NULL, 0, 0},
    [K_CLIENT_KEY] = {"client_key", ST_STR, NULL, 0, 0},
    [K_SERVERNAME] = {"servername", ST_STR, NULL, 0, 0},
    [K_AUTH_USER] = {"auth_user", ST_STR, NULL, 0, 0},
    [K_AUTH_PASSWORD_ENV] = {"auth_password_env", ST_STR, NULL, 0, 0},
    [K_AUTH_PASSWORD_FILE] = {"auth_password_file", ST_STR, NULL, 0, 0},
    [K_HELO] = {"helo", ST_STR, NULL, 0, 0},
    [K_SOURCE_ADDRESS] = {"source_address", ST_STR, NULL, 0, 0},
    [K_MAX_CONNECTIONS] = {"max_connections", ST_INT, "10", 1, 10000},
    [K_MAX_MESSAGES] = {"max_messages_per_connection", ST_INT, "100", 1, 1000000},
    [K_IDLE_TIMEOUT] = {"idle_timeout", ST_INT, "60", 1, 86400},
    [K_UNHEALTHY_AFTER] = {"unhealthy_after", ST_INT, "3", 1, 1000000},
    [K_UNHEALTHY_RETRY] = {"unhealthy_retry", ST_INT, "30", 1, 86400},
    [K_CONNECT_TIMEOUT] = {"connect_timeout", ST_INT, "30", 1, 3600},
    [K_GREETING_TIMEOUT] = {"greeting_timeout", ST_INT, "300", 1, 3600},
    [K_COMMAND_TIMEOUT] = {"command_timeout", ST_INT, "300", 1, 3600},
    [K_MAIL_TIMEOUT] = {"mail_timeout", ST_INT, "300", 1, 3600},
    [K_RCPT_TIMEOUT] = {"rcpt_timeout", ST_INT, "300", 1, 3600},
    [K_DATA_TIMEOUT] = {"data_timeout", ST_INT, "120", 1, 3600},
    [K_BLOCK_TIMEOUT] = {"data_block_timeout", ST_INT, "180", 1, 3600},
    [K_DOT_TIMEOUT] = {"dot_timeout", ST_INT, "600", 1, 3600},
};

static const char *const st_tls_names[] = {
    [SMTP_CLIENT_TLS_NONE] = "none",
    [SMTP_CLIENT_TLS_OPPORTUNISTIC] = "opportunistic",
    [SMTP_CLIENT_TLS_REQUIRED] = "required",
    [SMTP_CLIENT_TLS_IMPLICIT] = "implicit",
};

/* ---- state ------------------------------------------------------------------ */

struct smtp_transport;

/* One queued or running send. */
struct st_send {
    struct st_send *next;
    struct transport_msg msg;    /* envelope copied; data is the caller's */
    char *id, *from;
    char **rcpts;
    transport_done_cb cb;
    void *arg;
    struct transport_result res;
};

enum st_conn_state {
    SE_RESOLVING,     /* uv_getaddrinfo in flight */
    SE_CONNECTING,    /* smtp_client_connect until ready */
    SE_IDLE,          /* ready, in the pool */
    SE_BUSY,          /* running a send */
    SE_DEAD,          /* retired or failed: waiting for its client to be freed */
};

struct st_conn {
    struct st_conn *next, *prev;
    struct smtp_transport *t;
    enum st_conn_state state;
    uv_getaddrinfo_t gai;
    int resolving;                /* gai in flight */
    struct smtp_client *client;   /* the current client, NULL once released */
    int clients_alive;            /* clients not freed yet (retries add some) */
    struct sockaddr_storage addrs[ST_ADDRS_MAX];
    size_t naddrs, ai;
    char ip[64];                  /* address of the current attempt */
    int plaintext;                /* opportunistic TLS failed: retry without */
    unsigned messages;
    uint64_t idle_since;          /* uv_now when it became idle */
    struct st_send *send;
};

struct smtp_transport {
    uv_loop_t *loop;
    char *route;
    char *host;                   /* name or address, without brackets */
    char port[8];
    char hostport[300];           /* as configured, for logs and results */
    enum smtp_client_tls tls;
    struct tls_ctx *tls_ctx;
    char *servername, *helo, *auth_user, *auth_pass;
    struct sockaddr_storage source;
    int has_source;
    long long max_conns, max_msgs, idle_timeout, unhealthy_after, unhealthy_retry;
    unsigned t_connect, t_greeting, t_command, t_mail, t_rcpt, t_data, t_block, t_dot;

    struct st_conn *conns;        /* every entry, in any state */
    size_t nconns;
    struct st_send *qhead, *qtail;   /* waiting for a connection, FIFO */
    size_t nqueued;
    struct st_send *dhead, *dtail;   /* completed, callbacks pending */

    uv_timer_t defer;             /* runs the done callbacks */
    uv_timer_t idle;              /* retires idle connections */
    int handles_open;

    unsigned failures;            /* consecutive connection failures */
    char last_error[256];
    uint64_t last_failure;      /* uv_now() of the last connection failure */

    int closing, finishing;
    void (*closed)(void *arg);
    void *closed_arg;
};

static void st_dispatch(struct smtp_transport *t);
static void st_maybe_finish(struct smtp_transport *t);

/* snprintf for texts that may be cut to fit (results, reasons): a
 * truncated diagnostic is better than none. */
static void st_strf(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void st_strf(char *out, size_t n, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(out, n, fmt, ap);
    va_end(ap);
}

/* ---- configuration parsing ------------------------------------------------- */

/* Parses "host", "host:port", "[v6]" or "[v6]:port" (default port 25). */
static int st_parse_host(struct smtp_transport *t, const char *v, char *err, size_t errlen)
{
    const char *host = v, *port = NULL;
    size_t hlen;
    long long p = 25;
    char perr[128];

    if (v[0] == '[') {
        const char *close = strchr(v, ']');

        if (close == NULL || close == v + 1) {
            snprintf(err, errlen, "must be host, host:port or [IPv6]:port, got \"%s\"", v);
            return -1;
        }
        host = v + 1;
        hlen = (size_t)(close - host);
        if (close[1] == ':')
            port = close + 2;
        else if (close[1] != '\0') {
            snprintf(err, errlen, "must be host, host:port or [IPv6]:port, got \"%s\"", v);
            return -1;
        }
    } else {
        const char *colon = strchr(v, ':');

        if (colon != NULL && strchr(colon + 1, ':') != NULL) {
            snprintf(err, errlen, "an IPv6 address needs brackets: [%s]:port", v);
            return -1;
        }
        hlen = colon != NULL ? (size_t)(colon - v) : strlen(v);
        if (colon != NULL)
            port = colon + 1;
    }
    if (hlen == 0 || hlen > 253) {
        snprintf(err, errlen, "must be host, host:port or [IPv6]:port, got \"%s\"", v);
        return -1;
    }
    if (port != NULL && config_parse_int(port, 1, 65535, &p, perr, sizeof(perr)) != 0) {
        snprintf(err, errlen, "port %s", perr);
        return -1;
    }
    t->host = xstrndup(host, hlen);
    snprintf(t->port, sizeof(t->port), "%lld", p);
    snprintf(t->hostport, sizeof(t->hostport), "%s", v);
    return 0;
}

/* Reads the first line of a password file (without its line end). */
static int st_read_secret(const char *path, char **out, char *err, size_t errlen)
{
    char buf[ST_SECRET_MAX + 2];
    FILE *f = fopen(path, "r");
    size_t n;

    if (f == NULL) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    n = strcspn(buf, "\r\n");
    if (n > ST_SECRET_MAX) {
        OPENSSL_cleanse(buf, sizeof(buf));
        snprintf(err, errlen, "%s: password longer than %d octets", path, ST_SECRET_MAX);
        return -1;
    }
    if (n == 0) {
        snprintf(err, errlen, "%s: empty password", path);
        return -1;
    }
    *out = xstrndup(buf, n);
    OPENSSL_cleanse(buf, sizeof(buf));
    return 0;
}

static void st_free(struct smtp_transport *t)
{
    free(t->route);
    free(t->host);
    free(t->servername);
    free(t->helo);
    free(t->auth_user);
    if (t->auth_pass != NULL) {
        OPENSSL_cleanse(t->auth_pass, strlen(t->auth_pass));
        free(t->auth_pass);
    }
    if (t->tls_ctx != NULL)
        tls_ctx_unref(t->tls_ctx);
    free(t);
}

/*
 * Builds the transport from the route's keys. On error writes "key:
 * reason" into err (the caller adds the route) and returns -1.
 */
static int st_configure(struct smtp_transport *t, const struct config_named *kv, size_t nkv,
                        char *err, size_t errlen)
{
    const char *val[K__COUNT] = {0};
    long long num[K__COUNT] = {0};
    char why[300], msg[600];
    int verify = -1, k;
    size_t i;

#define ST_ERR(key, ...)                                                              \
    do {                                                                              \
        st_strf(msg, sizeof(msg), __VA_ARGS__);                                       \
        st_strf(err, errlen, "%s: %s", key, msg);                                      \
        return -1;                                                                    \
    } while (0)

    for (i = 0; i < nkv; i++) {
        for (k = 0; k < K__COUNT; k++)
            if (strcmp(kv[i].key, st_keys[k].name) == 0)
                break;
        if (k == K__COUNT)
            ST_ERR(kv[i].key, "unknown key for the smtp transport");
        if (val[k] != NULL)
            ST_ERR(kv[i].key, "set twice");
        val[k] = kv[i].value;
    }
    for (k = 0; k < K__COUNT; k++) {
        const char *v = val[k] != NULL ? val[k] : st_keys[k].def;

        if (v == NULL)
            continue;
        switch (st_keys[k].type) {
        case ST_INT:
            if (config_parse_int(v, st_keys[k].min, st_keys[k].max, &num[k], why, sizeof(why)))
                ST_ERR(st_keys[k].name, "%s, got \"%s\"", why, v);
            break;
        case ST_BOOL: {
            int b;

            if (config_parse_bool(v, &b, why, sizeof(why)) != 0)
                ST_ERR(st_keys[k].name, "%s, got \"%s\"", why, v);
            num[k] = b;
            break;
        }
        case ST_TLS: {
            size_t j;

            for (j = 0; j < sizeof(st_tls_names) / sizeof(st_tls_names[0]); j++)
                if (strcmp(v, st_tls_names[j]) == 0)
                    break;
            if (j == sizeof(st_tls_names) / sizeof(st_tls_names[0]))
                ST_ERR(st_keys[k].name,
                       "must be none, opportunistic, required or implicit, got \"%s\"", v);
            num[k] = (long long)j;
            break;
        }
        case ST_STR:
            if (v[0] == '\0')
                ST_ERR(st_keys[k].name, "must not be empty");
            break;
        }
    }

    if (val[K_HOST] == NULL)
        ST_ERR("host", "required (host, host:port or [IPv6]:port)");
    if (st_parse_host(t, val[K_HOST], why, sizeof(why)) != 0)
        ST_ERR("host", "%s", why);
    t->tls = (enum smtp_client_tls)num[K_TLS];
    if (val[K_TLS_VERIFY] != NULL)
        verify = (int)num[K_TLS_VERIFY];
    else
        verify = t->tls == SMTP_CLIENT_TLS_REQUIRED || t->tls == SMTP_CLIENT_TLS_IMPLICIT;

    /* A certificate without a key file holds both in one PEM file. */
    if (val[K_CLIENT_KEY] != NULL && val[K_CLIENT_CERT] == NULL)
        ST_ERR("client_key", "needs client_cert");
    if (val[K_AUTH_PASSWORD_ENV] != NULL && val[K_AUTH_PASSWORD_FILE] != NULL)
        ST_ERR("auth_password_file", "set either auth_password_env or auth_password_file");
    if (val[K_AUTH_USER] == NULL &&
        (val[K_AUTH_PASSWORD_ENV] != NULL || val[K_AUTH_PASSWORD_FILE] != NULL))
        ST_ERR(val[K_AUTH_PASSWORD_ENV] ? "auth_password_env" : "auth_password_file",
               "needs auth_user");
    if (val[K_AUTH_USER] != NULL) {
        if (val[K_AUTH_PASSWORD_ENV] == NULL && val[K_AUTH_PASSWORD_FILE] == NULL)
            ST_ERR("auth_user", "needs auth_password_env or auth_password_file");
        /* Credentials are never sent in plaintext (the client refuses AUTH
         * without TLS); say so now rather than at every connection. */
        if (t->tls == SMTP_CLIENT_TLS_NONE)
            ST_ERR("auth_user", "AUTH requires TLS, but tls = none");
        if (strlen(val[K_AUTH_USER]) > 255)
            ST_ERR("auth_user", "longer than 255 octets");
        t->auth_user = xstrdup(val[K_AUTH_USER]);
        if (val[K_AUTH_PASSWORD_ENV] != NULL) {
            const char *p = getenv(val[K_AUTH_PASSWORD_ENV]);

            if (p == NULL || p[0] == '\0')
                ST_ERR("auth_password_env", "environment variable %s is not set",
                       val[K_AUTH_PASSWORD_ENV]);
            t->auth_pass = xstrdup(p);
        } else if (st_read_secret(val[K_AUTH_PASSWORD_FILE], &t->auth_pass, why,
                                  sizeof(why)) != 0) {
            ST_ERR("auth_password_file", "%s", why);
        }
        if (strlen(t->auth_pass) > 255)
            ST_ERR(val[K_AUTH_PASSWORD_ENV] ? "auth_password_env" : "auth_password_file",
                   "password longer than 255 octets");
    }
    if (val[K_SOURCE_ADDRESS] != NULL) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&t->source;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&t->source;

        if (uv_ip4_addr(val[K_SOURCE_ADDRESS], 0, s4) != 0 &&
            uv_ip6_addr(val[K_SOURCE_ADDRESS], 0, s6) != 0)
            ST_ERR("source_address", "must be an IPv4 or IPv6 address, got \"%s\"",
                   val[K_SOURCE_ADDRESS]);
        t->has_source = 1;
    }
    if (val[K_HELO] != NULL) {
        t->helo = xstrdup(val[K_HELO]);
    } else {
        char hn[256];

        if (gethostname(hn, sizeof(hn)) != 0 || hn[0] == '\0')
            ST_ERR("helo", "not set and gethostname() failed");
        hn[sizeof(hn) - 1] = '\0';
        t->helo = xstrdup(hn);
    }
    t->servername = xstrdup(val[K_SERVERNAME] != NULL ? val[K_SERVERNAME] : t->host);
    if (t->tls != SMTP_CLIENT_TLS_NONE) {
        t->tls_ctx = tls_ctx_client(val[K_CA_FILE], verify, val[K_CLIENT_CERT],
                                    val[K_CLIENT_KEY], why, sizeof(why));
        if (t->tls_ctx == NULL)
            ST_ERR(val[K_CLIENT_CERT] ? "client_cert" : val[K_CA_FILE] ? "ca_file" : "tls",
                   "%s", why);
    }
    t->max_conns = num[K_MAX_CONNECTIONS];
    t->max_msgs = num[K_MAX_MESSAGES];
    t->idle_timeout = num[K_IDLE_TIMEOUT];
    t->unhealthy_after = num[K_UNHEALTHY_AFTER];
    t->unhealthy_retry = num[K_UNHEALTHY_RETRY];
    t->t_connect = (unsigned)num[K_CONNECT_TIMEOUT];
    t->t_greeting = (unsigned)num[K_GREETING_TIMEOUT];
    t->t_command = (unsigned)num[K_COMMAND_TIMEOUT];
    t->t_mail = (unsigned)num[K_MAIL_TIMEOUT];
    t->t_rcpt = (unsigned)num[K_RCPT_TIMEOUT];
    t->t_data = (unsigned)num[K_DATA_TIMEOUT];
    t->t_block = (unsigned)num[K_BLOCK_TIMEOUT];
    t->t_dot = (unsigned)num[K_DOT_TIMEOUT];
    return 0;
#undef ST_ERR
}

/* ---- sends and their completion ------------------------------------------- */

static void st_send_free(struct st_send *s)
{
    size_t i;

    for (i = 0; i < s->msg.nrcpts; i++)
        free(s->rcpts[i]);
    free(s->rcpts);
    free(s->id);
    free(s->from);
    free(s->res.rcpt);
    free(s);
}

static void st_on_defer(uv_timer_t *h);

/* Queues the done callback; it runs from the defer timer. */
static void st_complete(struct smtp_transport *t, struct st_send *s)
{
    s->next = NULL;
    if (t->dtail != NULL)
        t->dtail->next = s;
    else
        t->dhead = s;
    t->dtail = s;
    uv_timer_start(&t->defer, st_on_defer, 0, 0);
}

static void st_on_defer(uv_timer_t *h)
{
    struct smtp_transport *t = h->data;

    while (t->dhead != NULL) {
        struct st_send *s = t->dhead;

        t->dhead = s->next;
        if (t->dhead == NULL)
            t->dtail = NULL;
        s->cb(&s->res, s->arg);
        st_send_free(s);
    }
    st_maybe_finish(t);
}

/* Fills every recipient of s with one temporary result. */
static void st_fail_send(struct smtp_transport *t, struct st_send *s, const char *enhanced,
                         const char *text, int transport_failure)
{
    size_t i;

    for (i = 0; i < s->res.nrcpts; i++) {
        struct transport_rcpt_result *r = &s->res.rcpt[i];

        r->code = 451;
        snprintf(r->enhanced, sizeof(r->enhanced), "%s", enhanced);
        snprintf(r->text, sizeof(r->text), "%s", text);
        r->final = 0;
        r->ambiguous = 0;
    }
    s->res.transport_failure = transport_failure;
    st_complete(t, s);
}

static struct st_send *st_queue_pop(struct smtp_transport *t)
{
    struct st_send *s = t->qhead;

    if (s != NULL) {
        t->qhead = s->next;
        if (t->qhead == NULL)
            t->qtail = NULL;
        s->next = NULL;
        t->nqueued--;
    }
    return s;
}

static void st_queue_push_front(struct smtp_transport *t, struct st_send *s)
{
    s->next = t->qhead;
    t->qhead = s;
    if (t->qtail == NULL)
        t->qtail = s;
    t->nqueued++;
}

static void st_fail_queue(struct smtp_transport *t, const char *enhanced, const char *text,
                          int transport_failure)
{
    struct st_send *s;

    while ((s = st_queue_pop(t)) != NULL)
        st_fail_send(t, s, enhanced, text, transport_failure);
}

/* ---- connections ------------------------------------------------------------ */

static void st_conn_unlink_free(struct st_conn *e)
{
    struct smtp_transport *t = e->t;

    if (e->prev != NULL)
        e->prev->next = e->next;
    else
        t->conns = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    t->nconns--;
    free(e);
}

/* Frees a retired entry once nothing refers to it any more; its slot in
 * the cap is then free for a new connection. */
static void st_conn_maybe_free(struct st_conn *e)
{
    struct smtp_transport *t = e->t;

    if (e->state != SE_DEAD || e->resolving || e->clients_alive > 0)
        return;
    st_conn_unlink_free(e);
    st_dispatch(t);
    st_maybe_finish(t);
}

static void st_on_client_free(void *arg)
{
    struct st_conn *e = arg;

    e->clients_alive--;
    st_conn_maybe_free(e);
}

/* Retires an entry: politely when its client is idle, else at once. */
static void st_conn_retire(struct st_conn *e, int polite)
{
    struct smtp_client *cl = e->client;

    e->state = SE_DEAD;
    e->client = NULL;
    if (cl != NULL) {
        if (polite)
            smtp_client_quit(cl);
        else
            smtp_client_close(cl);
    }
}

static const char *st_enhanced_for(const char *err, const struct smtp_reply *reply,
                                   char *buf, size_t n)
{
    if (reply != NULL && reply->enhanced[0] != '\0') {
        /* The server's detail, as a temporary condition on our side. */
        snprintf(buf, n, "4%s", reply->enhanced + 1);
        return buf;
    }
    if (strncmp(err, "connect:", 8) == 0)
        return "4.4.1";                       /* no answer from host */
    if (strncmp(err, "TLS", 3) == 0)
        return "4.7.5";                       /* cryptographic failure */
    if (strncmp(err, "STARTTLS", 8) == 0)
        return "4.7.10";                      /* encryption needed */
    if (strncmp(err, "AUTH", 4) == 0)
        return "4.7.8";
    return "4.4.2";                           /* bad connection */
}

/*
 * A connection could not be set up. The queued sends fail with temporary
 * results marked as the transport's failure, and the failure counts
 * towards unhealthy_after.
 */
static void st_connect_failed(struct st_conn *e, const char *err, const struct smtp_reply *reply)
{
    struct smtp_transport *t = e->t;
    char enh[16], text[512], q[600];

    t->failures++;
    t->last_failure = uv_now(t->loop);
    st_strf(t->last_error, sizeof(t->last_error), "%s: %s", t->hostport, err);
    snprintf(text, sizeof(text), "%s%s%s: %s", t->hostport, e->ip[0] ? " " : "", e->ip, err);
    log_info("route=%s event=connect_failed host=%s failures=%u reason=%s", t->route,
             t->hostport, t->failures, log_quote(q, sizeof(q), err, strlen(err)));
    if (t->failures == (unsigned)t->unhealthy_after)
        log_warn("route=%s event=unhealthy host=%s failures=%u reason=%s", t->route,
                 t->hostport, t->failures, log_quote(q, sizeof(q), err, strlen(err)));
    st_fail_queue(t, st_enhanced_for(err, reply, enh, sizeof(enh)), text, 1);
}

static void st_on_ready(struct smtp_client *cl, int status, const struct smtp_reply *reply,
                        const char *err, void *arg);

static void st_conn_connect(struct st_conn *e)
{
    struct smtp_transport *t = e->t;
    struct smtp_client_opts o;
    const struct sockaddr *sa = (const struct sockaddr *)&e->addrs[e->ai];

    memset(&o, 0, sizeof(o));
    o.helo = t->helo;
    o.tls = e->plaintext ? SMTP_CLIENT_TLS_NONE : t->tls;
    o.tls_ctx = e->plaintext ? NULL : t->tls_ctx;
    o.servername = t->servername;
    o.auth_user = t->auth_user;
    o.auth_pass = t->auth_pass;
    o.source = t->has_source ? (const struct sockaddr *)&t->source : NULL;
    o.connect_timeout = t->t_connect;
    o.greeting_timeout = t->t_greeting;
    o.command_timeout = t->t_command;
    o.mail_timeout = t->t_mail;
    o.rcpt_timeout = t->t_rcpt;
    o.data_timeout = t->t_data;
    o.block_timeout = t->t_block;
    o.dot_timeout = t->t_dot;
    if (sa->sa_family == AF_INET6) {
        char ip[64];

        uv_ip6_name((const struct sockaddr_in6 *)sa, ip, sizeof(ip));
        st_strf(e->ip, sizeof(e->ip), "[%s]", ip);
    } else {
        uv_ip4_name((const struct sockaddr_in *)sa, e->ip, sizeof(e->ip));
    }
    e->state = SE_CONNECTING;
    e->client = smtp_client_connect(t->loop, sa, &o, st_on_ready, e);
    e->clients_alive++;
    smtp_client_on_free(e->client, st_on_client_free, e);
}

static void st_on_ready(struct smtp_client *cl, int status, const struct smtp_reply *reply,
                        const char *err, void *arg)
{
    struct st_conn *e = arg;
    struct smtp_transport *t = e->t;

    (void)cl;
    if (status == 0) {
        if (t->failures >= (unsigned)t->unhealthy_after)
            log_info("route=%s event=healthy host=%s", t->route, t->hostport);
        t->failures = 0;
        t->last_error[0] = '\0';
        log_debug("route=%s event=connected host=%s ip=%s", t->route, t->hostport, e->ip);
        e->state = SE_IDLE;
        e->messages = 0;
        e->idle_since = uv_now(t->loop);
        if (t->closing) {
            st_conn_retire(e, 1);
            return;
        }
        st_dispatch(t);
        return;
    }
    /* The failed client releases itself; its free callback comes later. */
    e->client = NULL;
    if (t->closing || e->state == SE_DEAD) {
        e->state = SE_DEAD;
        return;
    }
    /* Opportunistic TLS whose handshake failed: the same address again
     * without TLS, as the header of smtp_client allows (RFC 3207 section
     * 4.1 leaves the decision to the client). Never with AUTH, which needs
     * TLS. */
    if (t->tls == SMTP_CLIENT_TLS_OPPORTUNISTIC && !e->plaintext && t->auth_user == NULL &&
        strncmp(err, "TLS", 3) == 0) {
        char q[300];

        log_info("route=%s event=tls_fallback host=%s ip=%s reason=%s", t->route, t->hostport,
                 e->ip, log_quote(q, sizeof(q), err, strlen(err)));
        e->plaintext = 1;
        st_conn_connect(e);
        return;
    }
    /* A host with several addresses: try the next one when this one did
     * not answer at all (RFC 5321 section 5.1). */
    if (strncmp(err, "connect:", 8) == 0 && e->ai + 1 < e->naddrs) {
        char q[300];

        log_info("route=%s event=connect_retry host=%s ip=%s reason=%s", t->route,
                 t->hostport, e->ip, log_quote(q, sizeof(q), err, strlen(err)));
        e->ai++;
        e->plaintext = 0;
        st_conn_connect(e);
        return;
    }
    e->state = SE_DEAD;
    st_connect_failed(e, err, reply);
}

static void st_on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    struct st_conn *e = req->data;
    struct smtp_transport *t = e->t;
    struct addrinfo *ai;
    char err[300];

    e->resolving = 0;
    if (t->closing || status == UV_ECANCELED) {
        if (res != NULL)
            uv_freeaddrinfo(res);
        e->state = SE_DEAD;
        st_conn_maybe_free(e);
        return;
    }
    if (status < 0) {
        snprintf(err, sizeof(err), "cannot resolve %s: %s", t->host, uv_strerror(status));
        e->state = SE_DEAD;
        st_connect_failed(e, err, NULL);
        st_conn_maybe_free(e);
        return;
    }
    for (ai = res; ai != NULL && e->naddrs < ST_ADDRS_MAX; ai = ai->ai_next) {
        if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
            ai->ai_addrlen <= sizeof(e->addrs[0]))
            memcpy(&e->addrs[e->naddrs++], ai->ai_addr, ai->ai_addrlen);
    }
    uv_freeaddrinfo(res);
    if (e->naddrs == 0) {
        snprintf(err, sizeof(err), "cannot resolve %s: no address", t->host);
        e->state = SE_DEAD;
        st_connect_failed(e, err, NULL);
        st_conn_maybe_free(e);
        return;
    }
    st_conn_connect(e);
}

/* Starts a new pool entry: resolve, then connect. */
static void st_conn_new(struct smtp_transport *t)
{
    struct st_conn *e = xcalloc(1, sizeof(*e));
    struct addrinfo hints;
    char err[300];
    int r;

    e->t = t;
    e->state = SE_RESOLVING;
    e->next = t->conns;
    if (t->conns != NULL)
        t->conns->prev = e;
    t->conns = e;
    t->nconns++;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    e->gai.data = e;
    r = uv_getaddrinfo(t->loop, &e->gai, st_on_resolved, t->host, t->port, &hints);
    if (r < 0) {
        snprintf(err, sizeof(err), "cannot resolve %s: %s", t->host, uv_strerror(r));
        e->state = SE_DEAD;
        st_connect_failed(e, err, NULL);
        /* Nothing refers to the entry yet; the caller's loop rescans. */
        st_conn_unlink_free(e);
        return;
    }
    e->resolving = 1;
}

static void st_on_tx(struct smtp_client *cl, const struct smtp_client_result *res, void *arg)
{
    struct st_conn *e = arg;
    struct smtp_transport *t = e->t;
    struct st_send *s = e->send;
    size_t i, ok = 0, temp = 0, perm = 0;

    (void)cl;
    e->send = NULL;
    e->messages++;
    for (i = 0; i < s->res.nrcpts && i < res->nrcpts; i++) {
        s->res.rcpt[i] = res->rcpt[i];
        if (res->rcpt[i].code / 100 == 2 && res->rcpt[i].final)
            ok++;
        else if (res->rcpt[i].final)
            perm++;
        else
            temp++;
    }
    st_strf(s->res.remote, sizeof(s->res.remote), "%s (%s)", t->hostport, e->ip);
    log_info("route=%s msg=%s event=smtp_done host=%s ip=%s rcpts=%zu delivered=%zu "
             "temp=%zu perm=%zu", t->route, s->id, t->hostport, e->ip, s->res.nrcpts, ok, temp,
             perm);
    st_complete(t, s);

    if (!res->conn_ok)
        st_conn_retire(e, 0);
    else if (t->closing || e->messages >= (unsigned)t->max_msgs)
        st_conn_retire(e, 1);
    else {
        e->state = SE_IDLE;
        e->idle_since = uv_now(t->loop);
    }
    st_dispatch(t);
}

/* ---- pool scheduling ------------------------------------------------------- */

static void st_on_idle_timer(uv_timer_t *h);

/* Retires connections idle for idle_timeout and arms the timer for the
 * next one due. */
static void st_arm_idle(struct smtp_transport *t)
{
    uint64_t now = uv_now(t->loop), limit = (uint64_t)t->idle_timeout * 1000, next = 0;
    struct st_conn *e, *nx;
    int any = 0;

    if (t->finishing)
        return;
    for (e = t->conns; e != NULL; e = nx) {
        nx = e->next;
        if (e->state != SE_IDLE)
            continue;
        if (now - e->idle_since >= limit) {
            log_debug("route=%s event=idle_close host=%s ip=%s", t->route, t->hostport, e->ip);
            st_conn_retire(e, 1);
            continue;
        }
        if (!any || e->idle_since + limit - now < next)
            next = e->idle_since + limit - now;
        any = 1;
    }
    if (any)
        uv_timer_start(&t->idle, st_on_idle_timer, next, 0);
    else
        uv_timer_stop(&t->idle);
}

static void st_on_idle_timer(uv_timer_t *h)
{
    st_arm_idle(h->data);
}

/*
 * Serves the queue in order: idle connections first, then new ones up to
 * max_connections (no more connecting at once than sends are waiting).
 */
static void st_dispatch(struct smtp_transport *t)
{
    if (t->closing)
        return;
    while (t->qhead != NULL) {
        struct st_conn *e, *idle = NULL;
        size_t connecting = 0;

        for (e = t->conns; e != NULL; e = e->next) {
            if (e->state == SE_IDLE && idle == NULL)
                idle = e;
            else if (e->state == SE_RESOLVING || e->state == SE_CONNECTING)
                connecting++;
        }
        if (idle != NULL) {
            struct st_send *s;

            if (!smtp_client_idle(idle->client)) {
                /* The server closed the idle connection meanwhile. */
                st_conn_retire(idle, 0);
                continue;
            }
            s = st_queue_pop(t);
            idle->state = SE_BUSY;
            idle->send = s;
            if (smtp_client_send(idle->client, &s->msg, st_on_tx, idle) != 0) {
                idle->send = NULL;
                st_queue_push_front(t, s);
                st_conn_retire(idle, 0);
            }
            continue;
        }
        if (t->nconns < (size_t)t->max_conns && connecting < t->nqueued) {
            st_conn_new(t);
            continue;
        }
        break;
    }
    st_arm_idle(t);
}

/* ---- the transport_ops -------------------------------------------------------- */

static struct transport *st_create(uv_loop_t *loop, const char *route,
                                   const struct config_named *kv, size_t nkv, char *err,
                                   size_t errlen)
{
    struct smtp_transport *t = xcalloc(1, sizeof(*t));

    t->loop = loop;
    t->route = xstrdup(route != NULL ? route : "-");
    if (st_configure(t, kv, nkv, err, errlen) != 0) {
        st_free(t);
        return NULL;
    }
    uv_timer_init(loop, &t->defer);
    uv_timer_init(loop, &t->idle);
    t->defer.data = t;
    t->idle.data = t;
    t->handles_open = 2;
    log_info("route=%s event=transport_created transport=smtp host=%s tls=%s auth=%s "
             "max_connections=%lld", t->route, t->hostport, st_tls_names[t->tls],
             t->auth_user != NULL ? "yes" : "no", t->max_conns);
    return (struct transport *)t;
}

static void st_send(struct transport *tp, const struct transport_msg *m, transport_done_cb cb,
                    void *arg)
{
    struct smtp_transport *t = (struct smtp_transport *)tp;
    struct st_send *s = xcalloc(1, sizeof(*s));
    size_t i;

    s->id = xstrdup(m->id != NULL ? m->id : "-");
    s->from = xstrdup(m->from != NULL ? m->from : "");
    s->rcpts = xcalloc(m->nrcpts ? m->nrcpts : 1, sizeof(char *));
    for (i = 0; i < m->nrcpts; i++)
        s->rcpts[i] = xstrdup(m->rcpts[i]);
    s->msg = *m;
    s->msg.id = s->id;
    s->msg.from = s->from;
    s->msg.rcpts = (const char *const *)s->rcpts;
    s->cb = cb;
    s->arg = arg;
    s->res.nrcpts = m->nrcpts;
    s->res.rcpt = xcalloc(m->nrcpts ? m->nrcpts : 1, sizeof(*s->res.rcpt));
    st_strf(s->res.remote, sizeof(s->res.remote), "%s", t->hostport);

    if (t->closing) {
        /* Sends made after the closed callback has run are a bug. */
        assert(!t->finishing);
        st_fail_send(t, s, "4.3.2", "transport shutting down", 0);
        return;
    }
    s->next = NULL;
    if (t->qtail != NULL)
        t->qtail->next = s;
    else
        t->qhead = s;
    t->qtail = s;
    t->nqueued++;
    st_dispatch(t);
}

static int st_health(struct transport *tp, char *why, size_t whylen)
{
    struct smtp_transport *t = (struct smtp_transport *)tp;

    /* Unhealthy after unhealthy_after failures in a row; healthy again
     * after a success. Since an unhealthy route gets no traffic, it is
     * offered traffic again unhealthy_retry seconds after the last failure:
     * the next connection attempt decides (one failure puts it back). */
    if (t->failures >= (unsigned)t->unhealthy_after &&
        uv_now(t->loop) - t->last_failure < (uint64_t)t->unhealthy_retry * 1000) {
        snprintf(why, whylen, "%u consecutive connection failures, last: %s", t->failures,
                 t->last_error);
        return 0;
    }
    snprintf(why, whylen, "ok");
    return 1;
}

static void st_on_handle_closed(uv_handle_t *h)
{
    struct smtp_transport *t = h->data;

    if (--t->handles_open > 0)
        return;
    log_info("route=%s event=transport_closed", t->route);
    if (t->closed != NULL)
        t->closed(t->closed_arg);
    st_free(t);
}

/* Once closing, with no connection, queued send or pending callback left,
 * the timers are closed and the owner is told. */
static void st_maybe_finish(struct smtp_transport *t)
{
    if (!t->closing || t->finishing || t->conns != NULL || t->qhead != NULL ||
        t->dhead != NULL)
        return;
    t->finishing = 1;
    uv_close((uv_handle_t *)&t->defer, st_on_handle_closed);
    uv_close((uv_handle_t *)&t->idle, st_on_handle_closed);
}

static void st_close(struct transport *tp, void (*closed)(void *arg), void *arg)
{
    struct smtp_transport *t = (struct smtp_transport *)tp;
    struct st_conn *e, *nx;

    if (t->closing)
        return;
    t->closing = 1;
    t->closed = closed;
    t->closed_arg = arg;
    log_info("route=%s event=transport_closing queued=%zu connections=%zu", t->route,
             t->nqueued, t->nconns);
    st_fail_queue(t, "4.3.2", "transport shutting down", 0);
    uv_timer_stop(&t->idle);
    for (e = t->conns; e != NULL; e = nx) {
        nx = e->next;
        switch (e->state) {
        case SE_RESOLVING:
            /* The callback comes with UV_ECANCELED, or with the result if
             * the lookup already ran; either way the entry goes then. */
            uv_cancel((uv_req_t *)&e->gai);
            break;
        case SE_CONNECTING:
            st_conn_retire(e, 0);
            break;
        case SE_IDLE:
            st_conn_retire(e, 1);
            break;
        case SE_BUSY:
            /* The running transaction completes (or times out) first. */
            break;
        case SE_DEAD:
            break;
        }
    }
    st_maybe_finish(t);
}

const struct transport_ops smtp_transport_ops = {
    .name = "smtp",
    .create = st_create,
    .send = st_send,
    .health = st_health,
    .close = st_close,
};
