#include "gateway/smtp_session.h"

#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "gateway/dkim.h"
#include "lib/buf.h"
#include "lib/log.h"
#include "lib/sasl.h"
#include "lib/smtp_addr.h"
#include "lib/smtp_cmd.h"
#include "lib/smtp_data.h"
#include "lib/smtp_server.h"
#include "lib/xmalloc.h"

/*
 * RFC 4954 section 4: the 512-octet command line limit is raised to 12288
 * octets for AUTH and its continuation lines. Lines are framed with the
 * larger limit; every other command longer than 512 octets gets 500 5.5.2.
 */
#define SMTP_AUTH_LINE_MAX 12288
/* Input kept while the session does not consume it (paused or in TLS
 * handshake): one socket read at most; reading stops meanwhile. */
#define SMTP_INBUF_MAX (SMTP_AUTH_LINE_MAX + 65536)

enum smtp_state {
    SMTP_S_GREETING,      /* implicit TLS handshake before the banner */
    SMTP_S_CMD,           /* reading commands */
    SMTP_S_AUTH_PLAIN,    /* waiting for the PLAIN response line */
    SMTP_S_AUTH_USER,     /* waiting for the LOGIN user name */
    SMTP_S_AUTH_PASS,     /* waiting for the LOGIN password */
    SMTP_S_AUTH_CHECK,    /* password check on a worker thread */
    SMTP_S_AUTH_DELAY,    /* delaying a failed AUTH answer */
    SMTP_S_DATA,          /* reading message content */
    SMTP_S_QUEUEING,      /* waiting for Redis to commit the message */
    SMTP_S_TLS,           /* STARTTLS handshake */
    SMTP_S_CLOSING,       /* the connection is being closed */
    SMTP_S__COUNT
};

static const char *const smtp_state_names[SMTP_S__COUNT] = {
    [SMTP_S_GREETING] = "greeting", [SMTP_S_CMD] = "cmd",
    [SMTP_S_AUTH_PLAIN] = "auth_plain", [SMTP_S_AUTH_USER] = "auth_user",
    [SMTP_S_AUTH_PASS] = "auth_pass", [SMTP_S_AUTH_CHECK] = "auth_check",
    [SMTP_S_AUTH_DELAY] = "auth_delay", [SMTP_S_DATA] = "data",
    [SMTP_S_QUEUEING] = "queueing", [SMTP_S_TLS] = "tls", [SMTP_S_CLOSING] = "closing",
};

static const char *const smtp_kind_names[] = {
    [GATEWAY_LISTEN_PLAIN] = "smtp",
    [GATEWAY_LISTEN_SUBMISSION] = "submission",
    [GATEWAY_LISTEN_TLS] = "submissions",
};

/* One transaction: MAIL ... end of data. */
struct smtp_tx {
    char id[QUEUE_ID_LEN + 1];
    char *from;                   /* reverse-path mailbox, "" for <> */
    char **rcpts;
    size_t nrcpts;
    size_t rcpt_cap;
    unsigned rcpt_tries;          /* RCPT commands seen, accepted or not */
    int smtputf8;
    enum smtp_body body;
    struct smtp_data dec;
    struct buf msg;               /* decoded message */
    uint64_t enqueued_ns;         /* uv_hrtime() at queue_enqueue() */
};

/* The password check handed to a worker thread. */
struct smtp_auth_work {
    uv_work_t req;
    struct smtp_session *s;       /* NULL once the session is gone */
    struct users *users;          /* reference held for the worker */
    char user[SASL_FIELD_MAX + 1];
    char pass[SASL_FIELD_MAX + 1];
    int ok;
};

struct smtp_session {
    struct smtp_server srv;       /* connection, timer (idle, data and AUTH
                                   * delay timeouts), input, counters */
    struct gateway *gw;
    enum gateway_listener_kind kind;
    enum smtp_state state;

    char helo[256];
    int esmtp;                    /* EHLO (not HELO) was used */
    int allowed_net;              /* peer in allowed_networks */
    char *auth_user;              /* NULL until AUTH succeeds */
    char login_user[SASL_FIELD_MAX + 1];
    struct smtp_auth_work *auth;  /* check in flight */

    struct smtp_tx *tx;           /* NULL outside a transaction */
    int paused_by_gateway;
    int stopping;                 /* close when the transaction ends */
    int quit;                     /* close after flushing */
    int admitted;                 /* counted in the connection limits */
};

static void smtp_process(struct smtp_session *s);
static void smtp_close(struct smtp_session *s, const char *reason);
static void smtp_close_how(struct smtp_session *s, const char *reason, int abort);
static void smtp_update_reading(struct smtp_session *s);

/* ---- list --------------------------------------------------------------- */

struct list_node *smtp_session_node(struct smtp_session *s)
{
    return &s->srv.node;
}

/* ---- replies ------------------------------------------------------------ */

static void smtp_enter_state(struct smtp_session *s, enum smtp_state st)
{
    if (s->state == st)
        return;
    smtp_server_log_state(&s->srv, smtp_state_names[s->state], smtp_state_names[st]);
    s->state = st;
}

static void smtp_log_reject(struct smtp_session *s, const char *cmd, int code, const char *reason)
{
    log_info("session=%s event=reject ip=%s cmd=%s code=%d reason=%s", s->srv.sid, s->srv.ip,
             cmd, code, reason);
    metric_inc(metric_labels(gateway_metrics(s->gw)->rejected, reason));
}

/*
 * Counts an error reply toward the limit. Returns 1 when the limit is
 * reached, after answering 421 and starting the close (the caller stops).
 */
static int smtp_error(struct smtp_session *s)
{
    const struct mf_config *cfg = gateway_config(s->gw);

    if (!smtp_server_count_error(&s->srv, cfg->gateway.max_errors, cfg->gateway.hostname))
        return 0;
    smtp_close(s, "too_many_errors");
    return 1;
}

/* ---- timers --------------------------------------------------------------- */

static void smtp_on_timeout(uv_timer_t *t)
{
    struct smtp_session *s = t->data;
    const struct mf_config *cfg = gateway_config(s->gw);

    if (s->state == SMTP_S_AUTH_DELAY) {
        /* The delayed answer to a failed AUTH (RFC 4954 section 4 leaves
         * the pace to the server; it slows down password guessing). */
        smtp_enter_state(s, SMTP_S_CMD);
        smtp_server_reply(&s->srv, 535, "5.7.8", "Authentication credentials invalid");
        if (!smtp_error(s))
            smtp_process(s);
        conn_flush(s->srv.conn);
        smtp_update_reading(s);
        return;
    }
    /* RFC 5321 section 4.5.3.2: the server times out an idle client. */
    log_info("session=%s event=timeout ip=%s state=%s", s->srv.sid, s->srv.ip,
             smtp_state_names[s->state]);
    smtp_server_reply(&s->srv, 421, "4.4.2", "%s Error: timeout exceeded", cfg->gateway.hostname);
    smtp_close(s, "timeout");
}

/* Arms the timer for the current state: the data timeout while reading a
 * message, the idle timeout between commands. */
static void smtp_arm_timer(struct smtp_session *s)
{
    const struct mf_config *cfg = gateway_config(s->gw);
    uint64_t ms;

    switch (s->state) {
    case SMTP_S_DATA:
        ms = (uint64_t)cfg->gateway.data_timeout * 1000;
        break;
    case SMTP_S_GREETING: case SMTP_S_CMD: case SMTP_S_AUTH_PLAIN:
    case SMTP_S_AUTH_USER: case SMTP_S_AUTH_PASS: case SMTP_S_TLS:
        ms = (uint64_t)cfg->gateway.idle_timeout * 1000;
        break;
    default:
        return;
    }
    uv_timer_start(&s->srv.timer, smtp_on_timeout, ms, 0);
}

/* ---- transaction ---------------------------------------------------------- */

static void smtp_tx_free(struct smtp_tx *tx)
{
    if (tx == NULL)
        return;
    free(tx->from);
    for (size_t i = 0; i < tx->nrcpts; i++)
        free(tx->rcpts[i]);
    free(tx->rcpts);
    buf_free(&tx->msg);
    free(tx);
}

static void smtp_tx_reset(struct smtp_session *s)
{
    smtp_tx_free(s->tx);
    s->tx = NULL;
}

/* ---- reading ---------------------------------------------------------- */

/* Reads from the client only while the session can consume input: not
 * while waiting for Redis, a password check, the AUTH delay or a TLS
 * switch, not while the queue is backed up, and not while the client
 * leaves our replies unread. */
static void smtp_update_reading(struct smtp_session *s)
{
    if (s->state == SMTP_S_CLOSING)
        return;
    smtp_server_update_reading(&s->srv, !s->paused_by_gateway && s->state != SMTP_S_QUEUEING &&
                                            s->state != SMTP_S_AUTH_CHECK &&
                                            s->state != SMTP_S_AUTH_DELAY,
                               SMTP_INBUF_MAX);
}

void smtp_session_set_paused(struct smtp_session *s, int paused)
{
    s->paused_by_gateway = paused;
    smtp_update_reading(s);
}

/* ---- commands ----------------------------------------------------------- */

enum {
    CMDF_NEED_HELO = 1 << 0,   /* 503 before HELO/EHLO */
    CMDF_NO_ARG = 1 << 1,      /* 501 when an argument is given */
    CMDF_NOT_IN_TX = 1 << 2,   /* 503 inside a transaction */
};

struct smtp_cmd_def {
    enum smtp_cmd_id id;
    unsigned flags;
    void (*run)(struct smtp_session *s, const struct smtp_cmd *cmd);
};

static int smtp_tls_available(struct smtp_session *s)
{
    return s->kind != GATEWAY_LISTEN_TLS && !conn_is_tls(s->srv.conn) && gateway_tls(s->gw) != NULL;
}

/* RFC 4954 section 4 and RFC 6409 section 4.3: AUTH is offered only over
 * TLS, so passwords never cross the network in clear. */
static int smtp_auth_available(struct smtp_session *s)
{
    return conn_is_tls(s->srv.conn) && gateway_users(s->gw) != NULL;
}

static void smtp_set_helo(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    size_t n = cmd->arglen < sizeof(s->helo) - 1 ? cmd->arglen : sizeof(s->helo) - 1;

    memcpy(s->helo, cmd->arg, n);
    s->helo[n] = '\0';
    /* Only the first word is the client's name; keep it printable. */
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

static void smtp_cmd_helo(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = gateway_config(s->gw);

    if (cmd->arglen == 0) {
        smtp_server_reply(&s->srv, 501, "5.5.4", "Syntax: %s hostname", smtp_cmd_name(cmd->id));
        smtp_error(s);
        return;
    }
    /* RFC 5321 section 4.1.4: HELO/EHLO resets any transaction. */
    smtp_tx_reset(s);
    smtp_set_helo(s, cmd);
    s->esmtp = cmd->id == SMTP_CMD_EHLO;
    if (!s->esmtp) {
        smtp_server_reply(&s->srv, 250, NULL, "%s", cfg->gateway.hostname);
        return;
    }
    struct buf b = BUF_INIT;
    buf_appendf(&b, "250-%s\r\n", cfg->gateway.hostname);
    buf_appends(&b, "250-PIPELINING\r\n");
    buf_appendf(&b, "250-SIZE %lld\r\n", cfg->gateway.max_message_size);
    buf_appends(&b, "250-8BITMIME\r\n");
    buf_appends(&b, "250-SMTPUTF8\r\n");
    if (smtp_tls_available(s))
        buf_appends(&b, "250-STARTTLS\r\n");
    if (smtp_auth_available(s) && s->auth_user == NULL)
        buf_appends(&b, "250-AUTH PLAIN LOGIN\r\n");
    buf_appends(&b, "250 ENHANCEDSTATUSCODES\r\n");
    conn_write(s->srv.conn, b.data, b.len);
    buf_free(&b);
}

static void smtp_cmd_noop(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    smtp_server_reply(&s->srv, 250, "2.0.0", "Ok");
}

static void smtp_cmd_rset(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    smtp_tx_reset(s);
    smtp_server_reply(&s->srv, 250, "2.0.0", "Ok");
}

static void smtp_cmd_quit(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    smtp_server_reply(&s->srv, 221, "2.0.0", "Bye");
    s->quit = 1;
    smtp_close(s, "quit");
}

/* RFC 5321 section 3.5.3: a server that does not verify addresses answers
 * 252. */
static void smtp_cmd_vrfy(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    if (cmd->arglen == 0) {
        smtp_server_reply(&s->srv, 501, "5.5.4", "Syntax: VRFY address");
        smtp_error(s);
        return;
    }
    smtp_server_reply(&s->srv, 252, "2.5.0",
                      "Cannot VRFY user, but will accept message and attempt delivery");
}

static void smtp_cmd_expn(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    smtp_server_reply(&s->srv, 502, "5.5.1", "EXPN not available");
    smtp_error(s);
}

static void smtp_cmd_help(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    smtp_server_reply(&s->srv, 214, "2.0.0",
                      "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH");
}

static void smtp_cmd_bdat(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    /* CHUNKING (RFC 3030) is not offered, so BDAT is unknown here. */
    smtp_server_reply(&s->srv, 502, "5.5.1", "Error: BDAT unavailable, CHUNKING is not offered");
    smtp_error(s);
}

static void smtp_cmd_starttls(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    struct tls_ctx *ctx = gateway_tls(s->gw);

    if (conn_is_tls(s->srv.conn)) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: TLS already active");
        smtp_error(s);
        return;
    }
    if (!smtp_tls_available(s) || ctx == NULL) {
        smtp_server_reply(&s->srv, 454, "4.7.0", "TLS not available");
        smtp_error(s);
        return;
    }
    smtp_server_reply(&s->srv, 220, "2.0.0", "Ready to start TLS");
    /* RFC 3207 section 4.2 and CVE-2011-0411: whatever the client sent
     * after STARTTLS in plaintext is discarded, never executed after the
     * handshake. */
    buf_reset(&s->srv.in);
    smtp_enter_state(s, SMTP_S_TLS);
    if (conn_start_tls(s->srv.conn, ctx, 1, NULL) != 0)
        smtp_close(s, "tls_failed");
}

/* ---- AUTH ---------------------------------------------------------------- */

static void smtp_auth_after_work(uv_work_t *req, int status);

static void smtp_auth_work(uv_work_t *req)
{
    struct smtp_auth_work *w = req->data;
    w->ok = users_verify(w->users, w->user, w->pass);
}

/* Starts the password check for user/pass on a worker thread: crypt(3)
 * hashes are deliberately slow and must not stall the event loop. */
static void smtp_auth_check(struct smtp_session *s, const char *authzid, const char *user,
                            const char *pass)
{
    struct smtp_auth_work *w;

    /* Acting for someone else (an authorisation identity different from
     * the authentication identity) is not supported: treat as a failure. */
    if (authzid && authzid[0] && strcmp(authzid, user) != 0)
        pass = "";
    w = xcalloc(1, sizeof(*w));
    w->req.data = w;
    w->s = s;
    w->users = users_ref(gateway_users(s->gw));
    snprintf(w->user, sizeof(w->user), "%s", user);
    snprintf(w->pass, sizeof(w->pass), "%s", pass);
    s->auth = w;
    s->srv.inflight++;
    smtp_enter_state(s, SMTP_S_AUTH_CHECK);
    uv_timer_stop(&s->srv.timer);
    uv_queue_work(uv_handle_get_loop((uv_handle_t *)&s->srv.timer), &w->req, smtp_auth_work,
                  smtp_auth_after_work);
}

static void smtp_auth_after_work(uv_work_t *req, int status)
{
    struct smtp_auth_work *w = req->data;
    struct smtp_session *s = w->s;
    char q[300];

    users_unref(w->users);
    OPENSSL_cleanse(w->pass, sizeof(w->pass));
    if (s == NULL) {
        free(w);
        return;
    }
    s->auth = NULL;
    s->srv.inflight--;
    log_quote(q, sizeof(q), w->user, strlen(w->user));
    if (w->ok && status == 0) {
        s->auth_user = xstrdup(w->user);
        log_info("session=%s event=auth ip=%s user=%s result=ok", s->srv.sid, s->srv.ip, q);
        smtp_enter_state(s, SMTP_S_CMD);
        smtp_server_reply(&s->srv, 235, "2.7.0", "Authentication successful");
        smtp_process(s);
    } else {
        const struct mf_config *cfg = gateway_config(s->gw);
        log_info("session=%s event=auth ip=%s user=%s result=fail reason=bad_credentials",
                 s->srv.sid, s->srv.ip, q);
        smtp_enter_state(s, SMTP_S_AUTH_DELAY);
        uv_timer_start(&s->srv.timer, smtp_on_timeout, (uint64_t)cfg->gateway.auth_delay, 0);
    }
    free(w);
    conn_flush(s->srv.conn);
    smtp_update_reading(s);
}

static void smtp_auth_fail_syntax(struct smtp_session *s, const char *why)
{
    smtp_enter_state(s, SMTP_S_CMD);
    smtp_server_reply(&s->srv, 501, "5.5.2", "%s", why);
    smtp_error(s);
}

static void smtp_auth_plain_response(struct smtp_session *s, const char *b64, size_t len)
{
    struct sasl_plain p;

    if (sasl_plain_decode(b64, len, &p) != 0) {
        smtp_auth_fail_syntax(s, "Cannot decode AUTH PLAIN response");
        return;
    }
    smtp_auth_check(s, p.authzid, p.authcid, p.passwd);
    OPENSSL_cleanse(&p, sizeof(p));
}

static void smtp_cmd_auth(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    const char *mech = cmd->arg, *ir = NULL;
    size_t mechlen = cmd->arglen, irlen = 0;

    if (!smtp_auth_available(s)) {
        /* RFC 4954 section 6 and RFC 3207: 538 when the mechanism would
         * need encryption; without a users file AUTH is simply absent. */
        if (gateway_users(s->gw) != NULL && !conn_is_tls(s->srv.conn))
            smtp_server_reply(&s->srv, 538, "5.7.11",
                              "Encryption required for requested authentication mechanism");
        else
            smtp_server_reply(&s->srv, 502, "5.5.1", "Error: authentication not enabled");
        smtp_error(s);
        return;
    }
    if (s->auth_user) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: already authenticated");
        smtp_error(s);
        return;
    }
    for (size_t i = 0; i < cmd->arglen; i++) {
        if (cmd->arg[i] == ' ') {
            mechlen = i;
            ir = cmd->arg + i + 1;
            irlen = cmd->arglen - i - 1;
            break;
        }
    }
    if (mechlen == 5 && strncasecmp(mech, "PLAIN", 5) == 0) {
        if (ir == NULL) {
            smtp_enter_state(s, SMTP_S_AUTH_PLAIN);
            smtp_server_reply(&s->srv, 334, NULL, "%s", "");
        } else if (irlen == 1 && ir[0] == '=') {
            /* RFC 4954 section 4: "=" is an empty initial response. */
            smtp_auth_fail_syntax(s, "Cannot decode AUTH PLAIN response");
        } else {
            smtp_auth_plain_response(s, ir, irlen);
        }
    } else if (mechlen == 5 && strncasecmp(mech, "LOGIN", 5) == 0) {
        if (ir == NULL) {
            smtp_enter_state(s, SMTP_S_AUTH_USER);
            smtp_server_reply(&s->srv, 334, NULL, "VXNlcm5hbWU6");   /* "Username:" */
        } else if (sasl_login_decode(ir, irlen, s->login_user) != 0) {
            smtp_auth_fail_syntax(s, "Cannot decode AUTH LOGIN response");
        } else {
            smtp_enter_state(s, SMTP_S_AUTH_PASS);
            smtp_server_reply(&s->srv, 334, NULL, "UGFzc3dvcmQ6");   /* "Password:" */
        }
    } else if (mechlen == 0) {
        smtp_server_reply(&s->srv, 501, "5.5.4", "Syntax: AUTH mechanism");
        smtp_error(s);
    } else {
        smtp_server_reply(&s->srv, 504, "5.5.4", "Unrecognized authentication type");
        smtp_error(s);
    }
}

/* One continuation line of an AUTH exchange (RFC 4954 section 4). */
static void smtp_auth_line(struct smtp_session *s, const char *line, size_t len)
{
    char pass[SASL_FIELD_MAX + 1];

    if (len == 1 && line[0] == '*') {
        smtp_enter_state(s, SMTP_S_CMD);
        smtp_server_reply(&s->srv, 501, "5.0.0", "Authentication cancelled");
        smtp_error(s);
        return;
    }
    switch (s->state) {
    case SMTP_S_AUTH_PLAIN:
        smtp_auth_plain_response(s, line, len);
        break;
    case SMTP_S_AUTH_USER:
        if (sasl_login_decode(line, len, s->login_user) != 0) {
            smtp_auth_fail_syntax(s, "Cannot decode AUTH LOGIN response");
            return;
        }
        smtp_enter_state(s, SMTP_S_AUTH_PASS);
        smtp_server_reply(&s->srv, 334, NULL, "UGFzc3dvcmQ6");
        break;
    case SMTP_S_AUTH_PASS:
        if (sasl_login_decode(line, len, pass) != 0) {
            smtp_auth_fail_syntax(s, "Cannot decode AUTH LOGIN response");
            return;
        }
        smtp_auth_check(s, NULL, s->login_user, pass);
        OPENSSL_cleanse(pass, sizeof(pass));
        break;
    default:
        break;
    }
}

/* ---- MAIL, RCPT, DATA ------------------------------------------------------ */

/* Domain part of a mailbox, "" for the null path. */
static const char *smtp_domain_of(const char *addr)
{
    const char *at = strrchr(addr, '@');
    return at ? at + 1 : "";
}

static void smtp_cmd_mail(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = gateway_config(s->gw);
    struct smtp_mail_args args;
    const char *why = NULL;
    int rc;

    if (s->tx) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: nested MAIL command");
        smtp_error(s);
        return;
    }
    /* RFC 6409 section 4.3: the submission ports need authentication. */
    if (s->kind != GATEWAY_LISTEN_PLAIN && s->auth_user == NULL) {
        if (!conn_is_tls(s->srv.conn))
            smtp_server_reply(&s->srv, 530, "5.7.0", "Must issue a STARTTLS command first");
        else
            smtp_server_reply(&s->srv, 530, "5.7.0", "Authentication required");
        smtp_log_reject(s, "MAIL", 530, "auth_required");
        smtp_error(s);
        return;
    }
    rc = smtp_addr_parse_mail(cmd->arg, cmd->arglen, &args, &why);
    if (smtp_server_addr_reply(&s->srv, rc, why, 0) != 0) {
        smtp_error(s);
        return;
    }
    /* RFC 1870 section 6.2: refuse at MAIL when the declared size is
     * already too big. */
    if (args.size > cfg->gateway.max_message_size) {
        smtp_server_reply(&s->srv, 552, "5.3.4", "Message size exceeds fixed limit");
        smtp_log_reject(s, "MAIL", 552, "size_declared");
        smtp_error(s);
        return;
    }
    if (s->auth_user) {
        struct users *u = gateway_users(s->gw);
        if (u == NULL || !users_sender_allowed(u, s->auth_user, smtp_domain_of(args.path.addr))) {
            smtp_server_reply(&s->srv, 553, "5.7.1", "<%s>: Sender address not owned by user %s",
                              args.path.addr, s->auth_user);
            smtp_log_reject(s, "MAIL", 553, "sender_not_owned");
            smtp_error(s);
            return;
        }
    }
    s->tx = xcalloc(1, sizeof(*s->tx));
    s->tx->from = xstrdup(args.path.addr);
    s->tx->smtputf8 = args.smtputf8;
    s->tx->body = args.body;
    smtp_server_reply(&s->srv, 250, "2.1.0", "Ok");
}

static void smtp_cmd_rcpt(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = gateway_config(s->gw);
    struct smtp_path path;
    const char *why = NULL;
    int rc;

    if (s->tx == NULL) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: need MAIL command");
        smtp_error(s);
        return;
    }
    s->tx->rcpt_tries++;
    rc = smtp_addr_parse_rcpt(cmd->arg, cmd->arglen, s->tx->smtputf8, &path, &why);
    if (smtp_server_addr_reply(&s->srv, rc, why, 1) != 0) {
        smtp_error(s);
        return;
    }
    /* No open relay: on the plain listener only allowed networks (or an
     * authenticated client) may send. */
    if (!s->allowed_net && s->auth_user == NULL) {
        smtp_server_reply(&s->srv, 554, "5.7.1", "<%s>: Relay access denied", path.addr);
        smtp_log_reject(s, "RCPT", 554, "relay_denied");
        smtp_error(s);
        return;
    }
    /* RFC 5321 section 4.5.3.1.8: 452 for too many recipients; the
     * client sends the rest in another transaction. */
    if (s->tx->nrcpts >= (size_t)cfg->gateway.max_recipients) {
        smtp_server_reply(&s->srv, 452, "4.5.3", "Error: too many recipients");
        smtp_log_reject(s, "RCPT", 452, "too_many_recipients");
        return;
    }
    if (s->tx->nrcpts == s->tx->rcpt_cap) {
        s->tx->rcpt_cap = s->tx->rcpt_cap ? s->tx->rcpt_cap * 2 : 4;
        s->tx->rcpts = xrealloc(s->tx->rcpts, s->tx->rcpt_cap * sizeof(char *));
    }
    s->tx->rcpts[s->tx->nrcpts++] = xstrdup(path.addr);
    smtp_server_reply(&s->srv, 250, "2.1.5", "Ok");
}

static void smtp_cmd_data(struct smtp_session *s, const struct smtp_cmd *cmd)
{
    const struct mf_config *cfg = gateway_config(s->gw);

    if (s->tx == NULL) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: need MAIL command");
        smtp_error(s);
        return;
    }
    if (s->tx->rcpt_tries == 0) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: need RCPT command");
        smtp_error(s);
        return;
    }
    if (s->tx->nrcpts == 0) {
        /* RFC 2920 section 3.1: with every RCPT refused (a pipelined
         * group), DATA fails with 554. */
        smtp_server_reply(&s->srv, 554, "5.5.1", "Error: no valid recipients");
        smtp_error(s);
        return;
    }
    smtp_data_init(&s->tx->dec,
                   cfg->gateway.bare_newline == CONFIG_BARE_NORMALIZE ? SMTP_DATA_NORMALIZE
                                                                      : SMTP_DATA_KEEP,
                   (size_t)cfg->gateway.max_message_size);
    smtp_server_reply(&s->srv, 354, NULL, "End data with <CR><LF>.<CR><LF>");
    smtp_enter_state(s, SMTP_S_DATA);
}

static const struct smtp_cmd_def smtp_cmds[SMTP_CMD__COUNT] = {
    [SMTP_CMD_HELO] = {SMTP_CMD_HELO, 0, smtp_cmd_helo},
    [SMTP_CMD_EHLO] = {SMTP_CMD_EHLO, 0, smtp_cmd_helo},
    [SMTP_CMD_MAIL] = {SMTP_CMD_MAIL, CMDF_NEED_HELO, smtp_cmd_mail},
    [SMTP_CMD_RCPT] = {SMTP_CMD_RCPT, CMDF_NEED_HELO, smtp_cmd_rcpt},
    [SMTP_CMD_DATA] = {SMTP_CMD_DATA, CMDF_NEED_HELO | CMDF_NO_ARG, smtp_cmd_data},
    [SMTP_CMD_RSET] = {SMTP_CMD_RSET, CMDF_NO_ARG, smtp_cmd_rset},
    [SMTP_CMD_NOOP] = {SMTP_CMD_NOOP, 0, smtp_cmd_noop},
    [SMTP_CMD_QUIT] = {SMTP_CMD_QUIT, CMDF_NO_ARG, smtp_cmd_quit},
    [SMTP_CMD_VRFY] = {SMTP_CMD_VRFY, 0, smtp_cmd_vrfy},
    [SMTP_CMD_EXPN] = {SMTP_CMD_EXPN, 0, smtp_cmd_expn},
    [SMTP_CMD_HELP] = {SMTP_CMD_HELP, 0, smtp_cmd_help},
    [SMTP_CMD_STARTTLS] = {SMTP_CMD_STARTTLS, CMDF_NO_ARG | CMDF_NEED_HELO | CMDF_NOT_IN_TX,
                           smtp_cmd_starttls},
    [SMTP_CMD_AUTH] = {SMTP_CMD_AUTH, CMDF_NEED_HELO | CMDF_NOT_IN_TX, smtp_cmd_auth},
    [SMTP_CMD_BDAT] = {SMTP_CMD_BDAT, 0, smtp_cmd_bdat},
};

/* Parses and runs one command line. The flags of the command table are
 * enforced here, so handlers only do what is specific to them. */
static void smtp_dispatch(struct smtp_session *s, const char *line, size_t len)
{
    struct smtp_cmd cmd;
    const struct smtp_cmd_def *def;

    if (smtp_cmd_parse(line, len, &cmd) != 0 || cmd.id == SMTP_CMD_UNKNOWN) {
        smtp_server_reply(&s->srv, 500, "5.5.2", "Error: command not recognized");
        smtp_log_reject(s, "unknown", 500, "unknown_command");
        smtp_error(s);
        return;
    }
    if (cmd.id != SMTP_CMD_AUTH && len + 2 > SMTP_CMD_LINE_MAX) {
        smtp_server_reply(&s->srv, 500, "5.5.2", "Error: line too long");
        smtp_error(s);
        return;
    }
    def = &smtp_cmds[cmd.id];
    if ((def->flags & CMDF_NO_ARG) && cmd.arglen > 0) {
        smtp_server_reply(&s->srv, 501, "5.5.4", "Syntax: %s", smtp_cmd_name(cmd.id));
        smtp_error(s);
        return;
    }
    if ((def->flags & CMDF_NEED_HELO) && s->helo[0] == '\0') {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: send HELO/EHLO first");
        smtp_error(s);
        return;
    }
    if ((def->flags & CMDF_NOT_IN_TX) && s->tx) {
        smtp_server_reply(&s->srv, 503, "5.5.1", "Error: %s not allowed during a mail transaction",
                          smtp_cmd_name(cmd.id));
        smtp_error(s);
        return;
    }
    def->run(s, &cmd);
}

/* ---- end of data ---------------------------------------------------------- */

/* Case-insensitive test for a header field name at the start of a line. */
static int smtp_header_is(const char *line, size_t len, const char *name)
{
    size_t n = strlen(name);
    return len > n && line[n] == ':' && strncasecmp(line, name, n) == 0;
}

/*
 * Looks through the header section (RFC 5322 section 2.1: up to the first
 * empty line) for Message-ID, Date and X-Mailferry-Class. The class value is
 * copied into cls (unfolded, trimmed).
 */
static void smtp_scan_headers(const struct buf *m, int *has_msgid, int *has_date, char *cls,
                              size_t clslen)
{
    size_t off = 0;

    *has_msgid = *has_date = 0;
    cls[0] = '\0';
    while (off < m->len) {
        const char *line = m->data + off;
        const char *eol = memchr(line, '\n', m->len - off);
        size_t len = eol ? (size_t)(eol - line) : m->len - off;
        if (len > 0 && line[len - 1] == '\r')
            len--;
        if (len == 0)
            break;
        if (smtp_header_is(line, len, "Message-ID"))
            *has_msgid = 1;
        else if (smtp_header_is(line, len, "Date"))
            *has_date = 1;
        else if (smtp_header_is(line, len, "X-Mailferry-Class")) {
            const char *v = line + 18;
            size_t vl = len - 18, o = 0;
            while (vl && (*v == ' ' || *v == '\t')) {
                v++;
                vl--;
            }
            for (size_t i = 0; i < vl && o + 1 < clslen; i++) {
                unsigned char c = (unsigned char)v[i];
                if (c > 0x20 && c < 0x7f)
                    cls[o++] = (char)c;
            }
            cls[o] = '\0';
        }
        if (eol == NULL)
            break;
        off += (size_t)(eol - line) + 1;
    }
}

/* RFC 5322 section 3.3 date-time in UTC. */
static void smtp_rfc5322_date(char *out, size_t n)
{
    time_t now = time(NULL);
    struct tm tm;
    static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const mons[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

    gmtime_r(&now, &tm);
    snprintf(out, n, "%s, %d %s %d %02d:%02d:%02d +0000", days[tm.tm_wday], tm.tm_mday,
             mons[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/*
 * The trace and missing header fields prepended to the message:
 * Received (RFC 5321 section 4.4, with the RFC 3848 / RFC 6531 protocol
 * names and the TLS parameters), then Message-ID and Date when the message
 * has none (RFC 6409 section 8).
 */
static void smtp_build_headers(struct smtp_session *s, struct buf *h, char *cls, size_t clslen)
{
    const struct mf_config *cfg = gateway_config(s->gw);
    const struct sockaddr *peer = conn_peer(s->srv.conn);
    struct smtp_tx *tx = s->tx;
    int has_msgid, has_date;
    char date[64];
    const char *proto;
    int tls = conn_is_tls(s->srv.conn), auth = s->auth_user != NULL;

    smtp_scan_headers(&tx->msg, &has_msgid, &has_date, cls, clslen);
    smtp_rfc5322_date(date, sizeof(date));
    if (tx->smtputf8)
        proto = tls ? (auth ? "UTF8SMTPSA" : "UTF8SMTPS") : (auth ? "UTF8SMTPA" : "UTF8SMTP");
    else if (s->esmtp)
        proto = tls ? (auth ? "ESMTPSA" : "ESMTPS") : (auth ? "ESMTPA" : "ESMTP");
    else
        proto = "SMTP";

    buf_appendf(h, "Received: from %s (%s%s%s)\r\n", s->helo,
                peer && peer->sa_family == AF_INET6 ? "[IPv6:" : "[", s->srv.ip, "]");
    buf_appendf(h, "\tby %s (mailferry) with %s id %s", cfg->gateway.hostname, proto, tx->id);
    if (tls)
        buf_appendf(h, "\r\n\t(using %s with cipher %s)", conn_tls_version(s->srv.conn),
                    conn_tls_cipher(s->srv.conn));
    if (tx->nrcpts == 1)
        buf_appendf(h, "\r\n\tfor <%s>", tx->rcpts[0]);
    buf_appendf(h, "; %s\r\n", date);
    if (!has_msgid)
        buf_appendf(h, "Message-ID: <%s@%s>\r\n", tx->id, cfg->gateway.hostname);
    if (!has_date)
        buf_appendf(h, "Date: %s\r\n", date);
}

static void smtp_on_queued(int status, const char *err, void *arg)
{
    struct smtp_session *s = arg;
    struct smtp_tx *tx = s->tx;
    char q[300], eq[200];

    s->srv.inflight--;
    if (s->state == SMTP_S_CLOSING) {
        smtp_server_maybe_release(&s->srv);
        return;
    }
    if (status == 0) {
        log_quote(q, sizeof(q), tx->from, strlen(tx->from));
        log_info("session=%s event=queued id=%s from=%s nrcpt=%zu size=%zu", s->srv.sid, tx->id, q,
                 tx->nrcpts, tx->msg.len);
        smtp_server_reply(&s->srv, 250, "2.0.0", "Ok: queued as %s", tx->id);
        s->srv.messages++;
        metric_inc(metric_labels(gateway_metrics(s->gw)->accepted));
        metric_observe(metric_labels(gateway_metrics(s->gw)->bytes), (double)tx->msg.len);
        metric_observe(metric_labels(gateway_metrics(s->gw)->enqueue),
                       (double)(uv_hrtime() - tx->enqueued_ns) / 1e9);
    } else {
        log_quote(eq, sizeof(eq), err ? err : "", err ? strlen(err) : 0);
        log_warn("session=%s event=reject id=%s cmd=DATA code=451 reason=queue_error error=%s",
                 s->srv.sid, tx->id, eq);
        metric_inc(metric_labels(gateway_metrics(s->gw)->rejected, "queue_error"));
        smtp_server_reply(&s->srv, 451, "4.3.0",
                          "Temporary failure: queue unavailable, try again later");
    }
    smtp_tx_reset(s);
    smtp_enter_state(s, SMTP_S_CMD);
    smtp_process(s);
    conn_flush(s->srv.conn);
    smtp_update_reading(s);
}

/* The end-of-data marker was seen: answer errors latched during DATA, or
 * hand the message to the queue. */
static void smtp_enqueue(struct smtp_session *s, const char *cls);
static void smtp_on_signed(int status, const char *sigs, size_t siglen, const char *err,
                           void *arg);

static void smtp_end_of_data(struct smtp_session *s)
{
    const struct mf_config *cfg = gateway_config(s->gw);
    struct smtp_tx *tx = s->tx;
    struct buf h = BUF_INIT;
    char cls[64];

    smtp_enter_state(s, SMTP_S_CMD);
    if (tx->dec.too_big) {
        smtp_server_reply(&s->srv, 552, "5.3.4", "Message size exceeds fixed limit");
        smtp_log_reject(s, "DATA", 552, "too_big");
        smtp_tx_reset(s);
        return;
    }
    if (tx->dec.bare_newline && cfg->gateway.bare_newline == CONFIG_BARE_REJECT) {
        /* SMTP smuggling defence: bare CR or LF never ends the message,
         * and by default a message containing them is refused. */
        smtp_server_reply(&s->srv, 550, "5.6.0",
                          "Error: bare CR or LF in message; use CRLF line endings");
        smtp_log_reject(s, "DATA", 550, "bare_newline");
        smtp_tx_reset(s);
        return;
    }
    queue_id_new(tx->id);
    smtp_build_headers(s, &h, cls, sizeof(cls));
    buf_append(&h, tx->msg.data, tx->msg.len);
    buf_free(&tx->msg);
    tx->msg = h;

    /* DKIM: sign after the added header fields, before the queue, on a
     * worker thread; smtp_on_signed() queues the message then. */
    smtp_enter_state(s, SMTP_S_QUEUEING);
    s->srv.inflight++;
    if (dkim_sign_async(gateway_loop(s->gw), gateway_dkim(s->gw), tx->id, tx->from,
                        tx->msg.data, tx->msg.len, smtp_on_signed, s))
        return;
    s->srv.inflight--;
    smtp_enqueue(s, cls);
}

/* ---- DKIM signing (gateway/dkim.h) ------------------------------------------ */

/* Hands the transaction's message to the queue; smtp_on_queued() answers. */
static void smtp_enqueue(struct smtp_session *s, const char *cls)
{
    struct smtp_tx *tx = s->tx;
    struct queue_msg m;

    memset(&m, 0, sizeof(m));
    m.from = tx->from;
    m.rcpts = (const char *const *)tx->rcpts;
    m.nrcpts = tx->nrcpts;
    m.data = tx->msg.data;
    m.datalen = tx->msg.len;
    m.client_ip = s->srv.ip;
    m.helo = s->helo;
    m.auth_user = s->auth_user;
    m.msg_class = cls;
    smtp_enter_state(s, SMTP_S_QUEUEING);
    s->srv.inflight++;
    tx->enqueued_ns = uv_hrtime();
    queue_enqueue(gateway_queue(s->gw), tx->id, &m, smtp_on_queued, s);
}

/*
 * The DKIM-Signature fields are ready: they go in front of the message,
 * which is then queued. Every message must leave signed when its domain
 * has a key, so a signing failure is a temporary one (451) that the client
 * retries, never an unsigned message.
 */
static void smtp_on_signed(int status, const char *sigs, size_t siglen, const char *err,
                           void *arg)
{
    struct smtp_session *s = arg;
    struct smtp_tx *tx = s->tx;
    struct buf b = BUF_INIT;
    char cls[64], eq[300];
    int has_msgid, has_date;

    s->srv.inflight--;
    if (s->state == SMTP_S_CLOSING) {
        smtp_server_maybe_release(&s->srv);
        return;
    }
    if (status != 0) {
        log_quote(eq, sizeof(eq), err ? err : "", err ? strlen(err) : 0);
        log_warn("session=%s event=reject id=%s cmd=DATA code=451 reason=dkim_error error=%s",
                 s->srv.sid, tx->id, eq);
        smtp_server_reply(&s->srv, 451, "4.3.0",
                          "Temporary failure: cannot sign the message, try again later");
        smtp_tx_reset(s);
        smtp_enter_state(s, SMTP_S_CMD);
        smtp_process(s);
        conn_flush(s->srv.conn);
        smtp_update_reading(s);
        return;
    }
    buf_reserve(&b, siglen + tx->msg.len);
    buf_append(&b, sigs, siglen);
    buf_append(&b, tx->msg.data, tx->msg.len);
    buf_free(&tx->msg);
    tx->msg = b;
    smtp_scan_headers(&tx->msg, &has_msgid, &has_date, cls, sizeof(cls));
    smtp_enqueue(s, cls);
}

/* ---- input loop ------------------------------------------------------------- */

/*
 * Consumes as much buffered input as the current state allows: command
 * lines, AUTH continuations, message content. Stops when input runs out or
 * the session has to wait (Redis, password check, TLS).
 */
static void smtp_process(struct smtp_session *s)
{
    size_t off = 0;

    while (off < s->srv.in.len && !s->quit) {
        const char *p = s->srv.in.data + off;
        size_t avail = s->srv.in.len - off;

        if (s->state == SMTP_S_DATA) {
            struct smtp_tx *tx = s->tx;
            off += smtp_data_feed(&tx->dec, p, avail, &tx->msg);
            if (tx->dec.done) {
                smtp_end_of_data(s);
                if (s->stopping && s->tx == NULL)
                    break;
            }
            continue;
        }
        if (s->state != SMTP_S_CMD && s->state != SMTP_S_AUTH_PLAIN &&
            s->state != SMTP_S_AUTH_USER && s->state != SMTP_S_AUTH_PASS)
            break;
        size_t used, linelen;
        int fr = smtp_server_frame(&s->srv, p, avail, SMTP_AUTH_LINE_MAX, &used, &linelen);
        off += used;
        if (fr == SMTP_SERVER_NEED_MORE)
            break;
        if (fr == SMTP_SERVER_TOO_LONG) {
            smtp_enter_state(s, SMTP_S_CMD);
            smtp_server_reply(&s->srv, 500, "5.5.2", "Error: line too long");
            smtp_log_reject(s, "line", 500, "line_too_long");
            if (smtp_error(s))
                break;
            continue;
        }
        if (s->state == SMTP_S_CMD)
            smtp_dispatch(s, p, linelen);
        else
            smtp_auth_line(s, p, linelen);
        if (s->state == SMTP_S_TLS)
            return;   /* input already discarded by STARTTLS */
        if (s->stopping && s->tx == NULL && s->state == SMTP_S_CMD) {
            const struct mf_config *cfg = gateway_config(s->gw);
            smtp_server_reply(&s->srv, 421, "4.3.2", "%s Service shutting down",
                              cfg->gateway.hostname);
            smtp_close(s, "shutdown");
            break;
        }
    }
    if (s->state != SMTP_S_CLOSING)
        buf_consume(&s->srv.in, off);
    if (s->state != SMTP_S_CLOSING)
        smtp_arm_timer(s);
}

static void smtp_on_read(struct conn *c, const char *data, size_t len, void *arg)
{
    struct smtp_session *s = arg;

    if (s->state == SMTP_S_CLOSING || s->state == SMTP_S_TLS || s->state == SMTP_S_GREETING)
        return;
    buf_append(&s->srv.in, data, len);
    smtp_process(s);
    conn_flush(s->srv.conn);
    smtp_update_reading(s);
}

static void smtp_greet(struct smtp_session *s)
{
    const struct mf_config *cfg = gateway_config(s->gw);

    smtp_enter_state(s, SMTP_S_CMD);
    smtp_server_reply(&s->srv, 220, NULL, "%s ESMTP mailferry", cfg->gateway.hostname);
    conn_flush(s->srv.conn);
    smtp_arm_timer(s);
}

static void smtp_on_event(struct conn *c, enum conn_event ev, int status, void *arg)
{
    struct smtp_session *s = arg;

    switch (ev) {
    case CONN_EV_TLS_READY:
        log_info("session=%s event=tls ip=%s version=%s cipher=%s", s->srv.sid, s->srv.ip,
                 conn_tls_version(c), conn_tls_cipher(c));
        if (s->state == SMTP_S_GREETING) {
            smtp_greet(s);
        } else if (s->state == SMTP_S_TLS) {
            /* RFC 3207 section 4.2: after the handshake the session starts
             * over, the client must send EHLO again. */
            smtp_tx_reset(s);
            s->helo[0] = '\0';
            s->esmtp = 0;
            smtp_enter_state(s, SMTP_S_CMD);
            smtp_arm_timer(s);
        }
        smtp_update_reading(s);
        break;
    case CONN_EV_EOF:
        smtp_close(s, s->tx ? "eof_in_transaction" : "eof");
        break;
    case CONN_EV_ERROR:
        smtp_close(s, status == CONN_ERR_TLS ? "tls_error" : uv_err_name(status));
        break;
    case CONN_EV_DRAINED:
        smtp_update_reading(s);
        break;
    case CONN_EV_CLOSED:
        smtp_server_conn_closed(&s->srv);
        break;
    case CONN_EV_CONNECTED:
        break;
    }
}

/* ---- life cycle ---------------------------------------------------------- */

/* Frees the session; smtp_server_maybe_release() calls it once the
 * connection and timer are closed and no callback (queue, password check)
 * still refers to the session. */
static void smtp_release(void *arg)
{
    struct smtp_session *s = arg;

    metric_dec(metric_labels(gateway_metrics(s->gw)->connections,
                             gateway_listener_label(s->kind)));
    gateway_session_gone(s->gw, s);
    smtp_tx_free(s->tx);
    free(s->auth_user);
    free(s);
}

/* Graceful close: replies written so far are flushed and the peer gets
 * time to read them (conn_close). */
static void smtp_close(struct smtp_session *s, const char *reason)
{
    smtp_close_how(s, reason, 0);
}

static void smtp_close_how(struct smtp_session *s, const char *reason, int abort)
{
    if (s->state == SMTP_S_CLOSING)
        return;
    smtp_enter_state(s, SMTP_S_CLOSING);
    smtp_server_log_disconnect(&s->srv, reason);
    if (s->auth) {
        /* The password check cannot be stopped once a worker runs it; its
         * completion finds the session gone and only frees itself. */
        s->auth->s = NULL;
        uv_cancel((uv_req_t *)&s->auth->req);
        s->auth = NULL;
        s->srv.inflight--;
    }
    smtp_server_close(&s->srv, abort);
}

struct smtp_session *smtp_session_accept(struct gateway *gw, uv_stream_t *server,
                                         enum gateway_listener_kind kind)
{
    const struct mf_config *cfg = gateway_config(gw);
    struct smtp_session *s = xcalloc(1, sizeof(*s));
    int rc;

    if (smtp_server_accept(&s->srv, gateway_loop(gw), server, smtp_on_read, smtp_on_event,
                           smtp_release, s) != 0) {
        free(s);
        return NULL;
    }
    s->gw = gw;
    s->kind = kind;
    s->state = SMTP_S_GREETING;
    s->allowed_net = cidr_list_match(&cfg->gateway.allowed, conn_peer(s->srv.conn));
    gateway_session_add(gw, s);
    metric_inc(metric_labels(gateway_metrics(gw)->connections, gateway_listener_label(kind)));
    metric_inc(metric_labels(gateway_metrics(gw)->sessions, gateway_listener_label(kind)));

    log_info("session=%s event=connect ip=%s listener=%s", s->srv.sid, s->srv.ip,
             smtp_kind_names[kind]);
    rc = gateway_admit(gw, s->srv.ip);
    if (rc != 0) {
        /* RFC 5321 section 3.1: a server may refuse with 421 at greeting. */
        smtp_server_reply(&s->srv, 421, "4.7.0", "%s Error: too many connections%s",
                          cfg->gateway.hostname,
                          rc == GATEWAY_LIMIT_PER_IP ? " from your address" : "");
        smtp_log_reject(s, "connect", 421,
                        rc == GATEWAY_LIMIT_PER_IP ? "per_ip_limit" : "connection_limit");
        smtp_close(s, "connection_limit");
        return s;
    }
    s->admitted = 1;
    if (kind == GATEWAY_LISTEN_TLS) {
        /* RFC 8314 section 3.3: implicit TLS, the banner comes after the
         * handshake. */
        if (gateway_tls(gw) == NULL ||
            conn_start_tls(s->srv.conn, gateway_tls(gw), 1, NULL) != 0) {
            smtp_close(s, "tls_unavailable");
            return s;
        }
        smtp_arm_timer(s);
    } else {
        smtp_greet(s);
    }
    smtp_update_reading(s);
    return s;
}

const char *smtp_session_ip(const struct smtp_session *s)
{
    return s->srv.ip;
}

int smtp_session_admitted(const struct smtp_session *s)
{
    return s->admitted;
}

void smtp_session_shutdown(struct smtp_session *s)
{
    const struct mf_config *cfg = gateway_config(s->gw);

    if (s->state == SMTP_S_CLOSING)
        return;
    s->stopping = 1;
    if (s->tx == NULL && (s->state == SMTP_S_CMD || s->state == SMTP_S_GREETING ||
                          s->state == SMTP_S_TLS)) {
        if (s->state == SMTP_S_CMD)
            smtp_server_reply(&s->srv, 421, "4.3.2", "%s Service shutting down",
                              cfg->gateway.hostname);
        smtp_close(s, "shutdown");
    }
}

void smtp_session_abort(struct smtp_session *s)
{
    if (s->state == SMTP_S_CLOSING)
        return;
    smtp_close_how(s, "shutdown_grace_expired", 1);
}
