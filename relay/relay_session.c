/*
 * relay_session: one router's tunnel connection; see relay_session.h.
 *
 * Input model as in the gateway (gateway/smtp_session.c): bytes go into a
 * buffer, the command framer (lib/smtp_cmd) and the DATA decoder
 * (lib/smtp_data) consume from it, replies are collected and flushed once
 * per batch. Commands are handled one at a time in order, which is what
 * RFC 2920 asks of a pipelining server: when a command needs the MX (the
 * RCPTs, the end of data), processing stops until the MX has answered, the
 * session stops reading, and the next buffered command is taken after the
 * reply has been written.
 *
 * Memory. The session is freed once its connection and timer are closed
 * and no smtp_client callback still refers to it (inflight). DNS lookups
 * and pool requests are cancelled on close instead (their modules promise
 * no callback after a cancel). An MX connection is given back to the pool
 * when the transaction ends: reusable when no command is in flight (the
 * pool RSETs a half-done transaction), closed otherwise.
 */
#include "relay/relay_session.h"

#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "lib/buf.h"
#include "lib/conn.h"
#include "lib/log.h"
#include "lib/smtp_addr.h"
#include "lib/smtp_cmd.h"
#include "lib/smtp_data.h"
#include "lib/smtp_server.h"
#include "lib/xmalloc.h"
#include "relay/mx.h"
#include "relay/mx_pool.h"
#include "relay/mx_resolve.h"
#include "relay/selfcheck.h"
#include "transports/smtp_client.h"

/* Input kept while the session does not consume it (waiting for the MX):
 * one socket read at most; reading stops meanwhile. */
#define RS_INBUF_MAX (SMTP_CMD_LINE_MAX + 65536)
/* Errors before 421 and close (the router is trusted; this only stops a
 * peer that is not speaking SMTP from looping). */
#define RS_MAX_ERRORS 20
/* The TLS handshake must be done within this many seconds (or
 * idle_timeout when that is shorter): a plain TCP client that waits for a
 * banner gets nothing and is closed. */
#define RS_HANDSHAKE_TIMEOUT 10

enum rs_state {
    RS_HANDSHAKE,      /* TLS handshake, before the greeting */
    RS_CMD,            /* reading commands */
    RS_RESOLVE,        /* waiting for the MX route of the domain */
    RS_CONNECT,        /* waiting for a connection from the pool */
    RS_MX,             /* waiting for the MX's reply to MAIL or RCPT */
    RS_DATA,           /* reading message content */
    RS_DELIVER,        /* waiting for the MX's reply to the end of data */
    RS_CLOSING,        /* the connection is being closed */
    RS__COUNT
};

static const char *const rs_state_names[RS__COUNT] = {
    [RS_HANDSHAKE] = "handshake", [RS_CMD] = "cmd", [RS_RESOLVE] = "resolve",
    [RS_CONNECT] = "connect", [RS_MX] = "mx", [RS_DATA] = "data", [RS_DELIVER] = "deliver",
    [RS_CLOSING] = "closing",
};

/* One transaction: MAIL ... end of data, with one destination domain. */
struct rs_tx {
    char *from;                       /* reverse-path, "" for <> */
    struct smtp_client_mail_params params;
    char domain[SMTP_DOMAIN_MAX + 1]; /* normalised; "" before the first RCPT */
    char rcpt[SMTP_PATH_MAX + 1];     /* the RCPT being handled */
    unsigned rcpt_tries;
    size_t naccepted;
    struct mx_lookup *lookup;
    struct mx_wait *wait;
    struct mx_conn *mx;
    int mail_sent;                    /* MAIL went to the MX and was accepted */
    int failed;                       /* every further RCPT gets fail */
    int fail_code;
    char fail_enh[16];
    char fail_text[600];
    int retried;                      /* a stale pooled connection was replaced */
    char mx_host[256];                /* for logs, after mx is given back */
    char mx_peer[80];
    char mx_tls[16];
    struct smtp_data dec;
    struct buf msg;
};

struct relay_session {
    struct smtp_server srv;           /* connection, timer, input, counters;
                                       * inflight counts smtp_client callbacks */
    struct relay *r;
    enum rs_state state;
    char cn[128];                     /* client certificate subject CN */

    char helo[256];
    int esmtp;
    struct rs_tx *tx;
    int stopping;
    int quit;
    int counted;                      /* in the connections gauge */
};

static void rs_process(struct relay_session *s);
static void rs_close(struct relay_session *s, const char *reason);
static void rs_close_how(struct relay_session *s, const char *reason, int abort);
static void rs_update_reading(struct relay_session *s);
static void rs_rcpt_to_mx(struct relay_session *s);

/* ---- list ------------------------------------------------------------------- */

struct list_node *relay_session_node(struct relay_session *s)
{
    return &s->srv.node;
}

/* ---- replies ------------------------------------------------------------------ */

static void rs_enter_state(struct relay_session *s, enum rs_state st)
{
    if (s->state == st)
        return;
    smtp_server_log_state(&s->srv, rs_state_names[s->state], rs_state_names[st]);
    s->state = st;
}

static const struct mf_config *rs_cfg(const struct relay_session *s)
{
    return relay_config(s->r);
}

/*
 * The reply code to pass back for a reply of the MX. RFC 5321 section
 * 3.8: 421 means "this server closes the connection"; passed on as is, it
 * would tell the router that the tunnel is closing. It becomes 451 (same
 * enhanced code and text): the recipient is deferred, the tunnel stays.
 * A code of another class than 2, 4 or 5 to these commands is a protocol
 * error of the MX and becomes 451 too.
 */
static int rs_pass_code(const struct smtp_reply *r)
{
    int cls = r->code / 100;

    if (r->code == 421 || (cls != 2 && cls != 4 && cls != 5))
        return 451;
    return r->code;
}

/*
 * Writes the MX's reply r as this server's reply, line for line: each
 * line "code-enhanced text", the last "code enhanced text". A reply
 * without an enhanced code gets the class's generic one (X.0.0), since
 * this server announces ENHANCEDSTATUSCODES.
 */
static void rs_reply_pass(struct relay_session *s, const struct smtp_reply *r)
{
    struct buf b = BUF_INIT;
    int code = rs_pass_code(r);
    char enh[16];
    const char *line = r->text;

    if (r->enhanced[0] != '\0' && r->enhanced[0] == '0' + code / 100)
        snprintf(enh, sizeof(enh), "%s", r->enhanced);
    else
        snprintf(enh, sizeof(enh), "%d.0.0", code / 100);
    for (;;) {
        const char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line), start = b.len;

        if (len > 900)
            len = 900;
        buf_appendf(&b, "%d%c%s%s%.*s\r\n", code, nl ? '-' : ' ', enh, len ? " " : "", (int)len,
                    line);
        for (size_t i = start; i + 2 < b.len; i++)
            if ((unsigned char)b.data[i] < 0x20 && b.data[i] != '\t')
                b.data[i] = '?';
        if (nl == NULL)
            break;
        line = nl + 1;
    }
    conn_write(s->srv.conn, b.data, b.len);
    buf_free(&b);
}

/* The reply as one line for logs: "550 5.1.1 User unknown". */
static const char *rs_reply_str(const struct smtp_reply *r, char *out, size_t n)
{
    snprintf(out, n, "%d%s%s %s", r->code, r->enhanced[0] ? " " : "", r->enhanced, r->text);
    for (char *p = out; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    return out;
}

/*
 * Counts an error reply toward the limit. Returns 1 when the limit is
 * reached, after answering 421 and starting the close (the caller stops).
 */
static int rs_error(struct relay_session *s)
{
    if (!smtp_server_count_error(&s->srv, RS_MAX_ERRORS, rs_cfg(s)->relay.helo_name))
        return 0;
    rs_close(s, "too_many_errors");
    return 1;
}

static const char *rs_class_label(int code)
{
    switch (code / 100) {
    case 2: return "2xx";
    case 4: return "4xx";
    default: return "5xx";
    }
}

/* ---- timers ------------------------------------------------------------------ */

static void rs_on_timeout(uv_timer_t *t)
{
    struct relay_session *s = t->data;

    log_info("session=%s event=timeout ip=%s state=%s", s->srv.sid, s->srv.ip,
             rs_state_names[s->state]);
    if (s->state == RS_HANDSHAKE) {
        /* No banner was sent and none will be. */
        metric_inc(metric_labels(relay_metrics(s->r)->tunnels, "timeout"));
        rs_close_how(s, "handshake_timeout", 1);
        return;
    }
    /* RFC 5321 section 4.5.3.2: the server times out an idle client. */
    smtp_server_reply(&s->srv, 421, "4.4.2", "%s Error: timeout exceeded",
                      rs_cfg(s)->relay.helo_name);
    rs_close(s, "timeout");
}

/* Arms the timer for the current state. While the session waits for DNS
 * or the MX, their own timeouts apply. */
static void rs_arm_timer(struct relay_session *s)
{
    const struct mf_config *cfg = rs_cfg(s);
    uint64_t ms;

    switch (s->state) {
    case RS_HANDSHAKE:
        ms = (uint64_t)(cfg->relay.idle_timeout < RS_HANDSHAKE_TIMEOUT ? cfg->relay.idle_timeout
                                                                       : RS_HANDSHAKE_TIMEOUT) *
             1000;
        break;
    case RS_CMD:
        ms = (uint64_t)cfg->relay.idle_timeout * 1000;
        break;
    case RS_DATA:
        ms = (uint64_t)cfg->relay.data_timeout * 1000;
        break;
    default:
        uv_timer_stop(&s->srv.timer);
        return;
    }
    uv_timer_start(&s->srv.timer, rs_on_timeout, ms, 0);
}

/* ---- transaction ---------------------------------------------------------------- */

/* Gives the MX connection back: reusable when no command is in flight on
 * it (the pool ends a half-done transaction with RSET), else closed. */
static void rs_release_mx(struct relay_session *s, int reusable)
{
    struct rs_tx *tx = s->tx;

    if (tx == NULL || tx->mx == NULL)
        return;
    mx_pool_put(tx->mx, reusable && s->srv.inflight == 0);
    tx->mx = NULL;
}

static void rs_tx_reset(struct relay_session *s)
{
    struct rs_tx *tx = s->tx;

    if (tx == NULL)
        return;
    mx_resolve_cancel(tx->lookup);
    mx_pool_cancel(tx->wait);
    rs_release_mx(s, 1);
    free(tx->from);
    buf_free(&tx->msg);
    free(tx);
    s->tx = NULL;
}

/* Every further RCPT of the transaction gets this answer. */
static void rs_tx_fail(struct relay_session *s, int code, const char *enh, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void rs_tx_fail(struct relay_session *s, int code, const char *enh, const char *fmt, ...)
{
    struct rs_tx *tx = s->tx;
    va_list ap;

    tx->failed = 1;
    tx->fail_code = code;
    snprintf(tx->fail_enh, sizeof(tx->fail_enh), "%s", enh);
    va_start(ap, fmt);
    vsnprintf(tx->fail_text, sizeof(tx->fail_text), fmt, ap);
    va_end(ap);
}

static void rs_tx_fail_reply(struct relay_session *s, const struct smtp_reply *r)
{
    char text[sizeof(s->tx->fail_text)];

    snprintf(text, sizeof(text), "%s", r->text);
    for (char *p = text; *p; p++)
        if (*p == '\n')
            *p = ' ';
    rs_tx_fail(s, rs_pass_code(r), r->enhanced[0] ? r->enhanced : (r->code / 100 == 5 ? "5.0.0"
                                                                                       : "4.0.0"),
               "%s", text);
}

static void rs_log_rcpt(struct relay_session *s, int code, const char *enh, const char *text,
                        const char *source)
{
    struct rs_tx *tx = s->tx;
    char qr[400], qt[600];

    log_info("session=%s event=rcpt rcpt=%s domain=%s mx=%s peer=%s source=%s code=%d "
             "enhanced=%s reply=%s",
             s->srv.sid, log_quote(qr, sizeof(qr), tx->rcpt, strlen(tx->rcpt)), tx->domain,
             tx->mx_host[0] ? tx->mx_host : "-", tx->mx_peer[0] ? tx->mx_peer : "-", source, code,
             enh && enh[0] ? enh : "-", log_quote(qt, sizeof(qt), text, strlen(text)));
    metric_inc(metric_labels(relay_metrics(s->r)->rcpt, rs_class_label(code)));
}

/* Answers the current RCPT with the latched failure. */
static void rs_rcpt_failed(struct relay_session *s)
{
    struct rs_tx *tx = s->tx;

    smtp_server_reply(&s->srv, tx->fail_code, tx->fail_enh, "%s", tx->fail_text);
    rs_log_rcpt(s, tx->fail_code, tx->fail_enh, tx->fail_text, "relay");
}

/* The session may go on with buffered commands after an MX answer. */
static void rs_resume(struct relay_session *s)
{
    rs_enter_state(s, RS_CMD);
    rs_process(s);
    if (s->state != RS_CLOSING)
        conn_flush(s->srv.conn);
    rs_update_reading(s);
}

/* ---- the MX side of a transaction ------------------------------------------------ */

static void rs_on_route(const struct mx_route *route, void *arg);

static void rs_resolve(struct relay_session *s)
{
    struct rs_tx *tx = s->tx;

    rs_enter_state(s, RS_RESOLVE);
    uv_timer_stop(&s->srv.timer);
    tx->lookup = mx_resolve(relay_resolver(s->r), tx->domain, rs_on_route, s);
}

/*
 * A command to the MX failed without a reply (connection lost, timeout).
 * On a connection taken from the pool that had served before, the first
 * command failing most likely means the MX closed it while it rested:
 * once per transaction the RCPT starts over on a new connection.
 */
static int rs_mx_lost(struct relay_session *s, const char *during)
{
    struct rs_tx *tx = s->tx;

    if (tx->mx != NULL && mx_conn_uses(tx->mx) > 0 && !tx->mail_sent && !tx->retried) {
        log_info("session=%s event=mx_stale domain=%s peer=%s during=%s", s->srv.sid, tx->domain,
                 tx->mx_peer, during);
        rs_release_mx(s, 0);
        tx->retried = 1;
        rs_resolve(s);
        return 1;
    }
    rs_release_mx(s, 0);
    rs_tx_fail(s, 451, "4.4.2", "connection to %s (%s) lost during %s, try again later",
               tx->mx_host, tx->mx_peer, during);
    return 0;
}

static void rs_on_rcpt(struct smtp_client *c, int status, const struct smtp_reply *r, void *arg)
{
    struct relay_session *s = arg;
    struct rs_tx *tx = s->tx;
    char rs[600];

    (void)c;
    s->srv.inflight--;
    if (s->state == RS_CLOSING) {
        smtp_server_maybe_release(&s->srv);
        return;
    }
    if (status < 0) {
        if (rs_mx_lost(s, "RCPT"))
            return;
        rs_rcpt_failed(s);
        rs_resume(s);
        return;
    }
    rs_reply_pass(s, r);
    rs_log_rcpt(s, rs_pass_code(r), r->enhanced, rs_reply_str(r, rs, sizeof(rs)), "mx");
    if (smtp_reply_class(r) == 2)
        tx->naccepted++;
    if (r->code == 421) {
        /* The MX is closing: later RCPTs get the same answer. */
        rs_release_mx(s, 0);
        rs_tx_fail_reply(s, r);
    }
    rs_resume(s);
}

static void rs_on_mail(struct smtp_client *c, int status, const struct smtp_reply *r, void *arg)
{
    struct relay_session *s = arg;
    struct rs_tx *tx = s->tx;
    char rs[600], q[700];

    (void)c;
    s->srv.inflight--;
    if (s->state == RS_CLOSING) {
        smtp_server_maybe_release(&s->srv);
        return;
    }
    if (status < 0) {
        if (rs_mx_lost(s, "MAIL"))
            return;
        rs_rcpt_failed(s);
        rs_resume(s);
        return;
    }
    if (smtp_reply_class(r) == 2) {
        tx->mail_sent = 1;
        rs_rcpt_to_mx(s);
        return;
    }
    /* The MX refused the sender: its reply answers this RCPT and every
     * later one (the router's MAIL was already answered here). */
    rs_reply_str(r, rs, sizeof(rs));
    log_info("session=%s event=mx_mail_refused domain=%s peer=%s reply=%s", s->srv.sid, tx->domain,
             tx->mx_peer, log_quote(q, sizeof(q), rs, strlen(rs)));
    rs_tx_fail_reply(s, r);
    rs_reply_pass(s, r);
    rs_log_rcpt(s, rs_pass_code(r), r->enhanced, rs_reply_str(r, rs, sizeof(rs)), "mx_mail");
    rs_release_mx(s, r->code != 421);
    rs_resume(s);
}

/* Sends the current RCPT to the MX. */
static void rs_rcpt_to_mx(struct relay_session *s)
{
    struct rs_tx *tx = s->tx;

    rs_enter_state(s, RS_MX);
    if (tx->mx != NULL && smtp_client_rcpt(mx_conn_client(tx->mx), tx->rcpt, rs_on_rcpt, s) == 0) {
        s->srv.inflight++;
        return;
    }
    rs_release_mx(s, 0);
    rs_tx_fail(s, 451, "4.4.2", "connection to %s (%s) lost, try again later", tx->mx_host,
               tx->mx_peer);
    rs_rcpt_failed(s);
    rs_resume(s);
}

static void rs_on_conn(struct mx_conn *mc, const char *err, void *arg)
{
    struct relay_session *s = arg;
    struct rs_tx *tx = s->tx;

    tx->wait = NULL;
    if (mc == NULL) {
        rs_tx_fail(s, 451, "4.4.1", "no MX reachable for %s (%s)", tx->domain,
                   err ? err : "no address");
        rs_rcpt_failed(s);
        rs_resume(s);
        return;
    }
    tx->mx = mc;
    snprintf(tx->mx_host, sizeof(tx->mx_host), "%s", mx_conn_host(mc));
    snprintf(tx->mx_peer, sizeof(tx->mx_peer), "%s", mx_conn_peer(mc));
    snprintf(tx->mx_tls, sizeof(tx->mx_tls), "%s", mx_conn_tls(mc));
    if (smtp_client_mail(mx_conn_client(mc), tx->from, &tx->params, rs_on_mail, s) == 0) {
        rs_enter_state(s, RS_MX);
        s->srv.inflight++;
        return;
    }
    if (rs_mx_lost(s, "MAIL"))
        return;
    rs_rcpt_failed(s);
    rs_resume(s);
}

static void rs_on_route(const struct mx_route *route, void *arg)
{
    struct relay_session *s = arg;
    struct rs_tx *tx = s->tx;

    tx->lookup = NULL;
    if (route->failed) {
        rs_tx_fail(s, route->failure.code, route->failure.enhanced, "%s", route->failure.text);
        rs_rcpt_failed(s);
        rs_resume(s);
        return;
    }
    if (log_min_level <= LOG_DEBUG) {
        struct buf b = BUF_INIT;

        for (size_t i = 0; i < route->ntargets; i++)
            buf_appendf(&b, "%s%s/%s", i ? "," : "", route->targets[i].host,
                        route->targets[i].ip);
        log_debug("session=%s event=route domain=%s implicit=%d targets=%s", s->srv.sid, tx->domain,
                  route->implicit, b.data ? b.data : "");
        buf_free(&b);
    }
    rs_enter_state(s, RS_CONNECT);
    tx->wait = mx_pool_get(relay_pool(s->r), route, rs_on_conn, s);
}

/* ---- reading ------------------------------------------------------------------ */

/* Reads from the router only while the session can consume input: during
 * the handshake, between commands and in DATA, never while it waits for
 * DNS or the MX, nor while the router leaves replies unread. */
static void rs_update_reading(struct relay_session *s)
{
    if (s->state == RS_CLOSING)
        return;
    smtp_server_update_reading(
        &s->srv, s->state == RS_HANDSHAKE || s->state == RS_CMD || s->state == RS_DATA,
        RS_INBUF_MAX);
}

/* ---- commands ------------------------------------------------------------------ */

enum {
    CMDF_NEED_HELO = 1 << 0,   /* 503 before HELO/EHLO */
    CMDF_NO_ARG = 1 << 1,      /* 501 when an argument is given */
    CMDF_NOT_IN_TX = 1 << 2,   /* 503 inside a transaction */
};

struct rs_cmd_def {
    const char *name;
    unsigned flags;
    void (*run)(struct relay_session *s, const struct smtp_cmd *cmd);
};

static void rs_set_helo(struct relay_session *s, const struct smtp_cmd *cmd)
{
    size_t n = cmd->arglen < sizeof(s->helo) - 1 ? cmd->arglen : sizeof(s->helo) - 1;

    memcpy(s->helo, cmd->arg, n);
    s->helo[n] = '\0';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s->helo[i];

        if (c == ' ' || c == '\t') {
            s->helo[i] = '\0';
            break;
        }
        if (c < 0x21 || c > 0x7e)
            s->helo[i] = '?';
    }
}

static void rs_cmd_helo(struct relay_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = rs_cfg(s);
    char status[512];
    struct buf b = BUF_INIT;

    if (cmd->arglen == 0) {
        smtp_server_reply(&s->srv, 501, "5.5.4", "Syntax: %s hostname", smtp_cmd_name(cmd->id));
        rs_error(s);
        return;
    }
    /* RFC 5321 section 4.1.4: HELO/EHLO resets any transaction. */
    rs_tx_reset(s);
    rs_set_helo(s, cmd);
    s->esmtp = cmd->id == SMTP_CMD_EHLO;
    if (!s->esmtp) {
        smtp_server_reply(&s->srv, 250, NULL, "%s", cfg->relay.helo_name);
        return;
    }
    selfcheck_summary(relay_selfcheck(s->r), status, sizeof(status));
    buf_appendf(&b, "250-%s\r\n", cfg->relay.helo_name);
    buf_appends(&b, "250-PIPELINING\r\n");
    buf_appendf(&b, "250-SIZE %lld\r\n", cfg->relay.max_message_size);
    buf_appends(&b, "250-8BITMIME\r\n");
    buf_appends(&b, "250-SMTPUTF8\r\n");
    buf_appends(&b, "250-ENHANCEDSTATUSCODES\r\n");
    /* docs/relay.md: the self-check result for the router's policy. */
    buf_appendf(&b, "250 X-MAILFERRY-STATUS %s\r\n", status);
    conn_write(s->srv.conn, b.data, b.len);
    buf_free(&b);
}

static void rs_cmd_mail(struct relay_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = rs_cfg(s);
    struct smtp_mail_args args;
    const char *why = NULL;
    int rc;

    if (s->tx) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: nested MAIL command");
        rs_error(s);
        return;
    }
    rc = smtp_addr_parse_mail(cmd->arg, cmd->arglen, &args, &why);
    if (smtp_server_addr_reply(&s->srv, rc, why, 0) != 0) {
        rs_error(s);
        return;
    }
    /* RFC 1870 section 6.2: refuse at MAIL when the declared size is
     * already too big. */
    if (args.size > cfg->relay.max_message_size) {
        smtp_server_reply(&s->srv, 552, "5.3.4", "Message size exceeds fixed limit");
        rs_error(s);
        return;
    }
    s->tx = xcalloc(1, sizeof(*s->tx));
    s->tx->from = xstrdup(args.path.addr);
    s->tx->params.size = args.size;
    s->tx->params.body8bit = args.body == SMTP_BODY_8BITMIME;
    s->tx->params.smtputf8 = args.smtputf8;
    buf_init(&s->tx->msg);
    /* The MX is not known before the first RCPT names the domain. */
    smtp_server_reply(&s->srv, 250, "2.1.0", "Ok");
}

static void rs_cmd_rcpt(struct relay_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = rs_cfg(s);
    struct rs_tx *tx = s->tx;
    struct smtp_path path;
    char domain[SMTP_DOMAIN_MAX + 1];
    const char *why = NULL;
    int rc;

    if (tx == NULL) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: need MAIL command");
        rs_error(s);
        return;
    }
    rc = smtp_addr_parse_rcpt(cmd->arg, cmd->arglen, tx->params.smtputf8, &path, &why);
    if (smtp_server_addr_reply(&s->srv, rc, why, 1) != 0) {
        rs_error(s);
        return;
    }
    if (path.postmaster || path.domain == NULL || path.domain[0] == '\0') {
        smtp_server_reply(&s->srv, 550, "5.1.3",
                          "<%s>: a recipient without a domain cannot be relayed", path.addr);
        return;
    }
    snprintf(domain, sizeof(domain), "%s", path.domain);
    mx_domain_normalize(domain);
    /* One destination per transaction: the router groups recipients by
     * domain, and the MX connection belongs to that domain. */
    if (tx->domain[0] != '\0' && strcmp(tx->domain, domain) != 0) {
        smtp_server_reply(&s->srv, 451, "4.5.3",
                          "<%s>: one destination domain per transaction (%s); send "
                          "%s in another transaction", path.addr, tx->domain, domain);
        return;
    }
    /* RFC 5321 section 4.5.3.1.8: 452 for too many recipients. */
    if (tx->rcpt_tries >= (unsigned)cfg->relay.max_recipients) {
        smtp_server_reply(&s->srv, 452, "4.5.3", "Error: too many recipients");
        return;
    }
    tx->rcpt_tries++;
    snprintf(tx->rcpt, sizeof(tx->rcpt), "%s", path.addr);
    if (tx->failed) {
        rs_rcpt_failed(s);
        return;
    }
    if (tx->mx != NULL && tx->mail_sent) {
        rs_rcpt_to_mx(s);
        return;
    }
    snprintf(tx->domain, sizeof(tx->domain), "%s", domain);
    rs_resolve(s);
}

static void rs_cmd_data(struct relay_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = rs_cfg(s);

    (void)cmd;
    if (s->tx == NULL) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: need MAIL command");
        rs_error(s);
        return;
    }
    if (s->tx->rcpt_tries == 0) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: need RCPT command");
        rs_error(s);
        return;
    }
    if (s->tx->naccepted == 0) {
        /* RFC 2920 section 3.1: with every RCPT refused, DATA fails. */
        smtp_server_reply(&s->srv, 554, "5.5.1", "Error: no valid recipients");
        return;
    }
    /* A bare CR or LF is stored as CRLF: the MX must never see a line end
     * it could read differently from us (SMTP smuggling). The gateway has
     * already refused or normalised them, so this changes nothing for
     * mail that came through it. */
    smtp_data_init(&s->tx->dec, SMTP_DATA_NORMALIZE, (size_t)cfg->relay.max_message_size);
    smtp_server_reply(&s->srv, 354, NULL, "End data with <CR><LF>.<CR><LF>");
    rs_enter_state(s, RS_DATA);
}

static void rs_cmd_rset(struct relay_session *s, const struct smtp_cmd *cmd)
{
    (void)cmd;
    rs_tx_reset(s);
    smtp_server_reply(&s->srv, 250, "2.0.0", "Ok");
}

static void rs_cmd_noop(struct relay_session *s, const struct smtp_cmd *cmd)
{
    (void)cmd;
    smtp_server_reply(&s->srv, 250, "2.0.0", "Ok");
}

static void rs_cmd_quit(struct relay_session *s, const struct smtp_cmd *cmd)
{
    (void)cmd;
    smtp_server_reply(&s->srv, 221, "2.0.0", "Bye");
    s->quit = 1;
    rs_close(s, "quit");
}

static void rs_cmd_vrfy(struct relay_session *s, const struct smtp_cmd *cmd)
{
    (void)cmd;
    /* RFC 5321 section 3.5.3: 252 when the address cannot be verified. */
    smtp_server_reply(&s->srv, 252, "2.5.0", "Cannot VRFY user; send a RCPT");
}

static void rs_cmd_not_here(struct relay_session *s, const struct smtp_cmd *cmd)
{
    switch (cmd->id) {
    case SMTP_CMD_STARTTLS:
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: TLS already active");
        break;
    case SMTP_CMD_AUTH:
        smtp_server_reply(&s->srv, 503, "5.5.1",
                          "Error: already authenticated by client certificate");
        break;
    case SMTP_CMD_BDAT:
        smtp_server_reply(&s->srv, 502, "5.5.1", "Error: BDAT not supported (no CHUNKING)");
        break;
    default:
        smtp_server_reply(&s->srv, 502, "5.5.1", "Error: BDAT unavailable, CHUNKING is not offered");
        break;
    }
    rs_error(s);
}

static void rs_cmd_help(struct relay_session *s, const struct smtp_cmd *cmd)
{
    (void)cmd;
    smtp_server_reply(&s->srv, 214, "2.0.0",
                      "mailferry relay: EHLO MAIL RCPT DATA RSET NOOP QUIT XSTATUS");
}

/* XSTATUS: the self-check report (docs/relay.md). */
static void rs_cmd_xstatus(struct relay_session *s, const struct smtp_cmd *cmd)
{
    struct buf b = BUF_INIT;

    (void)cmd;
    selfcheck_report(relay_selfcheck(s->r), &b);
    conn_write(s->srv.conn, b.data, b.len);
    buf_free(&b);
}

static const struct rs_cmd_def rs_cmds[SMTP_CMD__COUNT] = {
    [SMTP_CMD_HELO] = {"HELO", 0, rs_cmd_helo},
    [SMTP_CMD_EHLO] = {"EHLO", 0, rs_cmd_helo},
    [SMTP_CMD_MAIL] = {"MAIL", CMDF_NEED_HELO, rs_cmd_mail},
    [SMTP_CMD_RCPT] = {"RCPT", CMDF_NEED_HELO, rs_cmd_rcpt},
    [SMTP_CMD_DATA] = {"DATA", CMDF_NEED_HELO | CMDF_NO_ARG, rs_cmd_data},
    [SMTP_CMD_RSET] = {"RSET", CMDF_NO_ARG, rs_cmd_rset},
    [SMTP_CMD_NOOP] = {"NOOP", 0, rs_cmd_noop},
    [SMTP_CMD_QUIT] = {"QUIT", CMDF_NO_ARG, rs_cmd_quit},
    [SMTP_CMD_VRFY] = {"VRFY", 0, rs_cmd_vrfy},
    [SMTP_CMD_EXPN] = {"EXPN", 0, rs_cmd_not_here},
    [SMTP_CMD_HELP] = {"HELP", 0, rs_cmd_help},
    [SMTP_CMD_STARTTLS] = {"STARTTLS", 0, rs_cmd_not_here},
    [SMTP_CMD_AUTH] = {"AUTH", 0, rs_cmd_not_here},
    [SMTP_CMD_BDAT] = {"BDAT", 0, rs_cmd_not_here},
};

/* Not in lib/smtp_cmd's table: the relay's own command. */
static const struct rs_cmd_def rs_cmd_xstatus_def = {"XSTATUS", CMDF_NO_ARG, rs_cmd_xstatus};

/* Parses and runs one command line. The flags of the command table are
 * enforced here, so handlers only do what is specific to them. */
static void rs_dispatch(struct relay_session *s, const char *line, size_t len)
{
    struct smtp_cmd cmd;
    const struct rs_cmd_def *def = NULL;

    if (smtp_cmd_parse(line, len, &cmd) == 0) {
        if (cmd.id != SMTP_CMD_UNKNOWN)
            def = &rs_cmds[cmd.id];
        else if (cmd.verblen == 7 && strncasecmp(cmd.verb, "XSTATUS", 7) == 0)
            def = &rs_cmd_xstatus_def;
    }
    if (def == NULL || def->run == NULL) {
        smtp_server_reply(&s->srv, 500, "5.5.2", "Error: command not recognized");
        rs_error(s);
        return;
    }
    if (len + 2 > SMTP_CMD_LINE_MAX) {
        smtp_server_reply(&s->srv, 500, "5.5.2", "Error: line too long");
        rs_error(s);
        return;
    }
    if ((def->flags & CMDF_NO_ARG) && cmd.arglen > 0) {
        smtp_server_reply(&s->srv, 501, "5.5.4", "Syntax: %s", def->name);
        rs_error(s);
        return;
    }
    if ((def->flags & CMDF_NEED_HELO) && s->helo[0] == '\0') {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: send HELO/EHLO first");
        rs_error(s);
        return;
    }
    if ((def->flags & CMDF_NOT_IN_TX) && s->tx) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: %s not allowed during a mail transaction",
                          def->name);
        rs_error(s);
        return;
    }
    def->run(s, &cmd);
}

/* ---- end of data ---------------------------------------------------------------- */

static void rs_on_dot(struct smtp_client *c, int status, const struct smtp_reply *r, void *arg)
{
    struct relay_session *s = arg;
    struct rs_tx *tx = s->tx;
    char rs[600], qf[400], qr[700];
    int code;

    (void)c;
    s->srv.inflight--;
    if (s->state == RS_CLOSING) {
        smtp_server_maybe_release(&s->srv);
        return;
    }
    if (status < 0) {
        /* The MX may have taken the message (RFC 1047): the router will
         * try again and the recipient may get it twice, which is better
         * than losing it. */
        rs_release_mx(s, 0);
        if (status == SMTP_CLIENT_AMBIGUOUS)
            snprintf(rs, sizeof(rs), "451 4.4.2 connection to %s (%s) lost after the end of "
                     "data; delivery status unknown", tx->mx_host, tx->mx_peer);
        else
            snprintf(rs, sizeof(rs), "451 4.4.2 connection to %s (%s) lost during DATA",
                     tx->mx_host, tx->mx_peer);
        smtp_server_reply(&s->srv, 451, "4.4.2", "%s", rs + 10);
        code = 451;
    } else {
        rs_reply_pass(s, r);
        rs_reply_str(r, rs, sizeof(rs));
        code = rs_pass_code(r);
        if (r->code == 421)
            rs_release_mx(s, 0);
    }
    log_info("session=%s event=message from=%s domain=%s nrcpt=%zu size=%zu mx=%s peer=%s "
             "tls=%s code=%d reply=%s",
             s->srv.sid, log_quote(qf, sizeof(qf), tx->from, strlen(tx->from)), tx->domain,
             tx->naccepted, tx->msg.len, tx->mx_host, tx->mx_peer,
             tx->mx_tls[0] ? tx->mx_tls : "no", code, log_quote(qr, sizeof(qr), rs, strlen(rs)));
    metric_inc(metric_labels(relay_metrics(s->r)->messages, rs_class_label(code)));
    s->srv.messages++;
    rs_tx_reset(s);
    rs_resume(s);
}

/* The end-of-data marker was seen: answer errors latched during DATA, or
 * hand the message to the MX. */
static void rs_end_of_data(struct relay_session *s)
{
    struct rs_tx *tx = s->tx;

    rs_enter_state(s, RS_CMD);
    if (tx->dec.too_big) {
        smtp_server_reply(&s->srv, 552, "5.3.4", "Message size exceeds fixed limit");
        rs_tx_reset(s);
        return;
    }
    if (tx->mx == NULL) {
        /* The MX went away after accepting recipients (a 421). */
        smtp_server_reply(&s->srv, 451, "4.4.2",
                          "connection to %s (%s) lost before DATA, try again later", tx->mx_host,
                          tx->mx_peer);
        rs_tx_reset(s);
        return;
    }
    if (smtp_client_data(mx_conn_client(tx->mx), tx->msg.data ? tx->msg.data : "", tx->msg.len,
                         rs_on_dot, s) != 0) {
        smtp_server_reply(&s->srv, 451, "4.4.2",
                          "connection to %s (%s) lost before DATA, try again later", tx->mx_host,
                          tx->mx_peer);
        rs_release_mx(s, 0);
        rs_tx_reset(s);
        return;
    }
    s->srv.inflight++;
    rs_enter_state(s, RS_DELIVER);
}

/* ---- input loop ------------------------------------------------------------------ */

/*
 * Consumes as much buffered input as the current state allows: command
 * lines and message content. Stops when input runs out or the session has
 * to wait (DNS, pool, MX).
 */
static void rs_process(struct relay_session *s)
{
    size_t off = 0;

    while (off < s->srv.in.len && !s->quit) {
        const char *p = s->srv.in.data + off;
        size_t avail = s->srv.in.len - off;

        if (s->state == RS_DATA) {
            struct rs_tx *tx = s->tx;

            off += smtp_data_feed(&tx->dec, p, avail, &tx->msg);
            if (tx->dec.done)
                rs_end_of_data(s);
            continue;
        }
        if (s->state != RS_CMD)
            break;
        size_t used, linelen;
        int fr = smtp_server_frame(&s->srv, p, avail, SMTP_CMD_LINE_MAX, &used, &linelen);

        off += used;
        if (fr == SMTP_SERVER_NEED_MORE)
            break;
        if (fr == SMTP_SERVER_TOO_LONG) {
            smtp_server_reply(&s->srv, 500, "5.5.2", "Error: line too long");
            if (rs_error(s))
                break;
            continue;
        }
        rs_dispatch(s, p, linelen);
        if (s->stopping && s->tx == NULL && s->state == RS_CMD)
            break;
    }
    /* Shutting down: the session ends once its transaction has. */
    if (s->stopping && s->tx == NULL && s->state == RS_CMD && !s->quit) {
        smtp_server_reply(&s->srv, 421, "4.3.2", "%s Service shutting down",
                          rs_cfg(s)->relay.helo_name);
        rs_close(s, "shutdown");
    }
    if (s->state != RS_CLOSING) {
        buf_consume(&s->srv.in, off);
        rs_arm_timer(s);
    }
}

static void rs_on_read(struct conn *c, const char *data, size_t len, void *arg)
{
    struct relay_session *s = arg;

    (void)c;
    if (s->state == RS_CLOSING || s->state == RS_HANDSHAKE)
        return;
    buf_append(&s->srv.in, data, len);
    rs_process(s);
    if (s->state != RS_CLOSING)
        conn_flush(s->srv.conn);
    rs_update_reading(s);
}

/* The handshake is done: the certificate was verified against tunnel_ca
 * by OpenSSL; check the pins, then greet. */
static void rs_on_tls_ready(struct relay_session *s)
{
    X509 *cert = conn_tls_peer_cert(s->srv.conn);
    char fp[80] = "", q[200];

    if (cert != NULL) {
        X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, s->cn,
                                  sizeof(s->cn));
        for (char *p = s->cn; *p; p++)
            if ((unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e)
                *p = '_';
    }
    if (cert == NULL || !relay_pin_ok(s->r, cert, fp, sizeof(fp))) {
        log_warn("session=%s event=tunnel_refused ip=%s reason=%s cn=%s fingerprint=%s", s->srv.sid,
                 s->srv.ip, cert == NULL ? "no_client_certificate" : "pin_mismatch",
                 s->cn[0] ? log_quote(q, sizeof(q), s->cn, strlen(s->cn)) : "-",
                 fp[0] ? fp : "-");
        metric_inc(metric_labels(relay_metrics(s->r)->tunnels,
                                 cert == NULL ? "no_certificate" : "pin_mismatch"));
        rs_close_how(s, cert == NULL ? "no_client_certificate" : "pin_mismatch", 1);
        return;
    }
    log_info("session=%s event=tunnel ip=%s version=%s cipher=%s cn=%s fingerprint=%s", s->srv.sid,
             s->srv.ip, conn_tls_version(s->srv.conn), conn_tls_cipher(s->srv.conn),
             s->cn[0] ? log_quote(q, sizeof(q), s->cn, strlen(s->cn)) : "-", fp);
    metric_inc(metric_labels(relay_metrics(s->r)->tunnels, "ok"));
    rs_enter_state(s, RS_CMD);
    smtp_server_reply(&s->srv, 220, NULL, "%s ESMTP mailferry relay", rs_cfg(s)->relay.helo_name);
    conn_flush(s->srv.conn);
    rs_arm_timer(s);
}

static void rs_on_event(struct conn *c, enum conn_event ev, int status, void *arg)
{
    struct relay_session *s = arg;

    switch (ev) {
    case CONN_EV_TLS_READY:
        if (s->state == RS_HANDSHAKE)
            rs_on_tls_ready(s);
        rs_update_reading(s);
        break;
    case CONN_EV_EOF:
        rs_close(s, s->state == RS_HANDSHAKE ? "eof_in_handshake"
                    : s->tx                  ? "eof_in_transaction"
                                             : "eof");
        break;
    case CONN_EV_ERROR:
        if (s->state == RS_HANDSHAKE && status == CONN_ERR_TLS) {
            char q[400];
            const char *e = conn_tls_error(c);

            /* A client certificate from another CA, none at all, or not
             * TLS: refused before a single SMTP byte. */
            log_warn("session=%s event=tunnel_refused ip=%s reason=tls_error error=%s", s->srv.sid,
                     s->srv.ip, log_quote(q, sizeof(q), e, strlen(e)));
            metric_inc(metric_labels(relay_metrics(s->r)->tunnels, "tls_error"));
            rs_close_how(s, "tls_error", 1);
            break;
        }
        rs_close(s, status == CONN_ERR_TLS ? "tls_error" : uv_err_name(status));
        break;
    case CONN_EV_DRAINED:
        rs_update_reading(s);
        break;
    case CONN_EV_CLOSED:
        smtp_server_conn_closed(&s->srv);
        break;
    case CONN_EV_CONNECTED:
        break;
    }
}

/* ---- life cycle -------------------------------------------------------------------- */

/* Frees the session; smtp_server_maybe_release() calls it once the
 * connection and timer are closed and no smtp_client callback still
 * refers to the session. */
static void rs_release(void *arg)
{
    struct relay_session *s = arg;

    if (s->counted)
        metric_dec(metric_labels(relay_metrics(s->r)->connections));
    relay_session_gone(s->r, s);
    if (s->tx != NULL) {
        free(s->tx->from);
        buf_free(&s->tx->msg);
        free(s->tx);
    }
    free(s);
}

static void rs_close(struct relay_session *s, const char *reason)
{
    rs_close_how(s, reason, 0);
}

static void rs_close_how(struct relay_session *s, const char *reason, int abort)
{
    if (s->state == RS_CLOSING)
        return;
    if (s->state != RS_HANDSHAKE || strcmp(reason, "tls_error") != 0)
        smtp_server_log_disconnect(&s->srv, reason);
    if (s->tx != NULL) {
        /* Pending DNS and pool requests are cancelled; an MX command in
         * flight ends with an error callback once its client is closed. */
        mx_resolve_cancel(s->tx->lookup);
        mx_pool_cancel(s->tx->wait);
        s->tx->lookup = NULL;
        s->tx->wait = NULL;
        rs_release_mx(s, 1);
    }
    rs_enter_state(s, RS_CLOSING);
    smtp_server_close(&s->srv, abort);
}

struct relay_session *relay_session_accept(struct relay *r, uv_stream_t *server)
{
    struct relay_session *s = xcalloc(1, sizeof(*s));

    if (smtp_server_accept(&s->srv, relay_loop(r), server, rs_on_read, rs_on_event, rs_release,
                           s) != 0) {
        free(s);
        return NULL;
    }
    /* Replies may quote an MX's text: longer lines, never a control
     * character that could end a line early. */
    s->srv.reply_max = SMTP_SERVER_REPLY_CAP;
    s->srv.reply_sanitize = 1;
    s->r = r;
    s->state = RS_HANDSHAKE;
    relay_session_add(r, s);
    metric_inc(metric_labels(relay_metrics(r)->connections));
    s->counted = 1;
    log_info("session=%s event=connect ip=%s listener=relay", s->srv.sid, s->srv.ip);
    if (!relay_admit(r)) {
        log_warn("session=%s event=tunnel_refused ip=%s reason=connection_limit", s->srv.sid,
                 s->srv.ip);
        metric_inc(metric_labels(relay_metrics(r)->tunnels, "connection_limit"));
        rs_close_how(s, "connection_limit", 1);
        return s;
    }
    /* TLS from the first byte; the greeting comes after the handshake and
     * the certificate checks. */
    if (conn_start_tls(s->srv.conn, relay_tls(r), 1, NULL) != 0) {
        rs_close_how(s, "tls_unavailable", 1);
        return s;
    }
    rs_arm_timer(s);
    rs_update_reading(s);
    return s;
}

void relay_session_shutdown(struct relay_session *s)
{
    if (s->state == RS_CLOSING)
        return;
    s->stopping = 1;
    if (s->state == RS_HANDSHAKE) {
        rs_close_how(s, "shutdown", 1);
        return;
    }
    if (s->tx == NULL && s->state == RS_CMD) {
        smtp_server_reply(&s->srv, 421, "4.3.2", "%s Service shutting down",
                          rs_cfg(s)->relay.helo_name);
        rs_close(s, "shutdown");
    }
}

void relay_session_abort(struct relay_session *s)
{
    if (s->state == RS_CLOSING)
        return;
    rs_close_how(s, "shutdown_grace_expired", 1);
}
