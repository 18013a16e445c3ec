/*
 * smtp_client: one outgoing ESMTP connection over lib/conn.
 *
 * Structure. The session (connect, greeting, EHLO, STARTTLS, AUTH) and the
 * transaction (MAIL ... end of data) are kept apart: the session lives in
 * struct smtp_client, a transaction in struct sc_tx, which exists only
 * between smtp_client_send() and its callback. Protocol progress is an
 * explicit state (enum sc_state) changed only through sc_enter_state(),
 * which logs every change at debug level. Received bytes go into c->in and
 * are cut into replies by smtp_reply_parse(); every complete reply is
 * handed to the handler of the current state.
 *
 * Timeouts. One uv_timer covers every stage with the values of RFC 5321
 * section 4.5.3.2 (or the caller's); it is restarted whenever the client
 * starts waiting for something else. The same timer, with a zero delay,
 * delivers results that are known without asking the server (a message
 * the server cannot take), since callbacks never run inside an API call.
 *
 * Pending operations. At most one of connect (ready callback), transaction
 * or command is pending (c->op). Whatever ends the connection completes it
 * exactly once: with the server's answer, or with a local failure
 * (timeout, connection lost, closed by the owner).
 *
 * Memory. The client never frees itself from inside its own callbacks: it
 * frees in the close callback of its timer, which it closes only once the
 * owner has let go (smtp_client_close/quit, or a failed connect) and the
 * connection has reported CONN_EV_CLOSED.
 */
#include "transports/smtp_client.h"

#include <arpa/inet.h>
#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>

#include "lib/buf.h"
#include "lib/conn.h"
#include "lib/log.h"
#include "lib/sasl.h"
#include "lib/xmalloc.h"

/* Message content is handed to the connection in blocks of this size;
 * the next block is written once the previous one has left (backpressure:
 * at most one block is buffered, however large the message). */
#define SC_BLOCK_SIZE (64 * 1024)
/* Received bytes not yet consumed; more than the largest reply the parser
 * accepts means the server is not speaking SMTP. */
#define SC_IN_MAX (SMTP_REPLY_LINES_MAX * (SMTP_REPLY_LINE_MAX + 2) + 4096)
/* How long a polite close waits for the reply to QUIT. */
#define SC_QUIT_WAIT_MS 5000

enum sc_state {
    SC_CONNECTING,        /* TCP connect in progress */
    SC_TLS_IMPLICIT,      /* implicit TLS handshake, before the greeting */
    SC_GREETING,          /* waiting for 220 */
    SC_EHLO,              /* waiting for the EHLO reply */
    SC_HELO,              /* waiting for the HELO reply (EHLO refused) */
    SC_STARTTLS,          /* waiting for 220 to STARTTLS */
    SC_TLS,               /* STARTTLS handshake */
    SC_AUTH,              /* waiting for 235 (PLAIN, or LOGIN's last step) */
    SC_AUTH_LOGIN_USER,   /* waiting for LOGIN's user name challenge */
    SC_AUTH_LOGIN_PASS,   /* waiting for LOGIN's password challenge */
    SC_IDLE,              /* ready for a transaction or a command */
    SC_TX_LOCAL,          /* transaction answered locally, result pending */
    SC_TX_ENVELOPE,       /* waiting for MAIL / RCPT / DATA replies */
    SC_TX_CONTENT,        /* sending the message content */
    SC_TX_DOT,            /* waiting for the reply to the final "." */
    SC_TX_RSET,           /* RSET after an unfinished transaction */
    SC_COMMAND,           /* waiting for the reply to smtp_client_command */
    SC_STEP_LOCAL,        /* stepwise command answered locally, reply pending */
    SC_STEP_MAIL,         /* stepwise: waiting for the reply to MAIL */
    SC_STEP_OPEN,         /* stepwise: transaction open, no command in flight */
    SC_STEP_RCPT,         /* stepwise: waiting for the reply to RCPT */
    SC_STEP_DATA,         /* stepwise: waiting for 354 */
    SC_STEP_DATA_RSET,    /* stepwise: DATA refused, RSET sent */
    SC_STEP_RSET,         /* stepwise: waiting for the reply to RSET */
    SC_QUIT,              /* QUIT sent, waiting for 221 */
    SC_BROKEN,            /* connection unusable; waiting for the owner */
    SC__COUNT
};

static const char *const sc_state_names[SC__COUNT] = {
    [SC_CONNECTING] = "connecting", [SC_TLS_IMPLICIT] = "tls_implicit",
    [SC_GREETING] = "greeting", [SC_EHLO] = "ehlo", [SC_HELO] = "helo",
    [SC_STARTTLS] = "starttls", [SC_TLS] = "tls", [SC_AUTH] = "auth",
    [SC_AUTH_LOGIN_USER] = "auth_login_user", [SC_AUTH_LOGIN_PASS] = "auth_login_pass",
    [SC_IDLE] = "idle", [SC_TX_LOCAL] = "tx_local", [SC_TX_ENVELOPE] = "tx_envelope",
    [SC_TX_CONTENT] = "tx_content", [SC_TX_DOT] = "tx_dot", [SC_TX_RSET] = "tx_rset",
    [SC_COMMAND] = "command", [SC_STEP_LOCAL] = "step_local", [SC_STEP_MAIL] = "step_mail",
    [SC_STEP_OPEN] = "step_open", [SC_STEP_RCPT] = "step_rcpt", [SC_STEP_DATA] = "step_data",
    [SC_STEP_DATA_RSET] = "step_data_rset", [SC_STEP_RSET] = "step_rset",
    [SC_QUIT] = "quit", [SC_BROKEN] = "broken",
};

enum sc_op { SC_OP_NONE, SC_OP_READY, SC_OP_TX, SC_OP_CMD, SC_OP_STEP };

/* Per recipient progress within a transaction. */
enum { SC_RCPT_PENDING = 0, SC_RCPT_ACCEPTED, SC_RCPT_DONE };

/* One transaction: MAIL ... end of data. */
struct sc_tx {
    char id[64];                   /* queue id, for logs */
    char *from;
    char **rcpts;
    size_t nrcpts;
    const char *data;              /* the caller's bytes, not copied */
    size_t len;
    int smtputf8, body8bit;
    struct transport_rcpt_result *res;
    unsigned char *rstate;         /* SC_RCPT_* */
    size_t *map;                   /* recipients sent, in order (indexes) */
    size_t nmap;
    int mail_ok;                   /* -1 no reply yet, 0 refused, 1 accepted */
    size_t naccepted;
    size_t next_reply;             /* 0 MAIL, 1..nmap RCPT, nmap+1 DATA */
    size_t nsent;                  /* envelope commands sent so far */
    size_t off;                    /* content bytes handed to the conn */
    int at_bol;                    /* the next content byte starts a line */
    int dot_sent;                  /* the final "." has been written */
    int discard_dot;               /* "." closes a DATA nobody should get */
    int conn_ok;                   /* the session survives the transaction */
};

struct smtp_client {
    uv_loop_t *loop;
    struct conn *conn;             /* NULL after CONN_EV_CLOSED */
    uv_timer_t timer;
    enum sc_state state;
    unsigned id;
    char peer[64];                 /* "ip:port", for logs and results */

    /* Options, copied. */
    char *helo, *servername, *auth_user, *auth_pass;
    enum smtp_client_tls tls;
    struct tls_ctx *tls_ctx;
    unsigned t_connect, t_greeting, t_command, t_mail, t_rcpt, t_data, t_block, t_dot;

    struct buf in;                 /* received, not yet parsed */
    struct smtp_reply reply;       /* the reply being handled */
    struct smtp_reply ehlo;        /* the EHLO (or HELO) reply */

    /* What the server offers (from the last EHLO). */
    unsigned ext_pipelining : 1, ext_8bitmime : 1, ext_smtputf8 : 1, ext_starttls : 1,
        ext_auth_plain : 1, ext_auth_login : 1, ext_auth : 1;
    unsigned ext_size_on : 1;      /* SIZE announced */
    unsigned long long ext_size;   /* 0 when unlimited or not announced */
    unsigned tls_active : 1;       /* TLS is up (STARTTLS done or implicit) */
    unsigned tried_helo : 1;

    enum sc_op op;
    smtp_client_ready_cb ready_cb;
    void *ready_arg;
    smtp_client_tx_cb tx_cb;
    void *tx_arg;
    smtp_client_cmd_cb cmd_cb;     /* smtp_client_command and stepwise */
    void *cmd_arg;
    struct sc_tx *tx;              /* smtp_client_send, or the content of a
                                      stepwise DATA */
    struct smtp_reply step_reply;  /* a stepwise reply made locally, or the
                                      refusal of DATA kept across RSET */
    enum sc_state step_next;       /* state after a locally made reply */

    void (*free_cb)(void *arg);
    void *free_arg;

    unsigned conn_closing : 1;     /* conn_close/conn_abort called */
    unsigned released : 1;         /* the owner let go; free once closed */
    unsigned timer_closing : 1;
};

static unsigned sc_next_id;

static void sc_process(struct smtp_client *c);
static void sc_fail(struct smtp_client *c, const char *why, const struct smtp_reply *reply);
static void sc_tx_rset(struct smtp_client *c);
static void sc_tx_finish(struct smtp_client *c);
static void sc_tx_content(struct smtp_client *c);

/* ---- helpers ------------------------------------------------------------ */

static void sc_enter_state(struct smtp_client *c, enum sc_state st)
{
    if (c->state == st)
        return;
    log_debug("client=%u peer=%s event=state from=%s to=%s", c->id, c->peer,
              sc_state_names[c->state], sc_state_names[st]);
    c->state = st;
}

static void sc_on_timer(uv_timer_t *t);

static void sc_timer(struct smtp_client *c, unsigned secs)
{
    uv_timer_start(&c->timer, sc_on_timer, (uint64_t)secs * 1000, 0);
}

/* "code enhanced text" on one line (continuation lines joined with a
 * space), for error strings and logs. */
static const char *sc_reply_str(const struct smtp_reply *r, char *out, size_t n)
{
    size_t i;

    snprintf(out, n, "%d%s%s %s", r->code, r->enhanced[0] ? " " : "", r->enhanced, r->text);
    for (i = 0; out[i] != '\0'; i++)
        if (out[i] == '\n' || out[i] == '\r')
            out[i] = ' ';
    return out;
}

/* Writes one command line. AUTH lines carry secrets and are logged with
 * their arguments masked. Nothing leaves before sc_flush(). */
static void sc_write_cmd(struct smtp_client *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void sc_write_cmd(struct smtp_client *c, const char *fmt, ...)
{
    struct buf b = BUF_INIT;
    va_list ap;

    va_start(ap, fmt);
    buf_vappendf(&b, fmt, ap);
    va_end(ap);
    if (log_min_level <= LOG_DEBUG) {
        char q[600];

        if (c->state == SC_AUTH || c->state == SC_AUTH_LOGIN_USER ||
            c->state == SC_AUTH_LOGIN_PASS || strncasecmp(b.data, "AUTH", 4) == 0)
            log_debug("client=%u peer=%s event=send line=\"AUTH ***\"", c->id, c->peer);
        else
            log_debug("client=%u peer=%s event=send line=%s", c->id, c->peer,
                      log_quote(q, sizeof(q), b.data, b.len));
    }
    buf_append(&b, "\r\n", 2);
    conn_write(c->conn, b.data, b.len);
    OPENSSL_cleanse(b.data, b.len);
    buf_free(&b);
}

static void sc_flush(struct smtp_client *c)
{
    conn_flush(c->conn);
}

enum sc_drop {
    SC_DROP_ABORT,        /* at once */
    SC_DROP_GRACEFUL,     /* flush, then close (after 221, or EOF) */
    SC_DROP_QUIT,         /* QUIT first: the server is still talking to us */
};

static void sc_drop_conn(struct smtp_client *c, enum sc_drop how)
{
    if (c->conn == NULL || c->conn_closing)
        return;
    c->conn_closing = 1;
    if (how == SC_DROP_QUIT)
        conn_write(c->conn, "QUIT\r\n", 6);
    if (how == SC_DROP_ABORT)
        conn_abort(c->conn);
    else
        conn_close(c->conn);
}

static void sc_on_timer_close(uv_handle_t *h)
{
    struct smtp_client *c = h->data;
    void (*fn)(void *) = c->free_cb;
    void *arg = c->free_arg;

    log_debug("client=%u peer=%s event=freed", c->id, c->peer);
    buf_free(&c->in);
    free(c->helo);
    free(c->servername);
    free(c->auth_user);
    if (c->auth_pass != NULL) {
        OPENSSL_cleanse(c->auth_pass, strlen(c->auth_pass));
        free(c->auth_pass);
    }
    if (c->tls_ctx != NULL)
        tls_ctx_unref(c->tls_ctx);
    free(c);
    if (fn != NULL)
        fn(arg);
}

/* Frees the client once the owner has let go and the conn is gone. */
static void sc_maybe_free(struct smtp_client *c)
{
    if (!c->released || c->conn != NULL || c->timer_closing)
        return;
    assert(c->op == SC_OP_NONE && c->tx == NULL);
    c->timer_closing = 1;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, sc_on_timer_close);
}

/* ---- transaction results ------------------------------------------------ */

static void sc_set_result(struct transport_rcpt_result *res, int code, const char *enhanced,
                          const char *text, int ambiguous)
{
    int cls = code / 100;

    res->code = code;
    snprintf(res->enhanced, sizeof(res->enhanced), "%s", enhanced);
    snprintf(res->text, sizeof(res->text), "%s", text);
    res->final = !ambiguous && (cls == 2 || cls == 5);
    res->ambiguous = ambiguous;
}

static void sc_set_from_reply(struct transport_rcpt_result *res, const struct smtp_reply *r)
{
    sc_set_result(res, r->code, r->enhanced, r->text, 0);
}

static void sc_tx_free(struct sc_tx *tx)
{
    size_t i;

    for (i = 0; i < tx->nrcpts; i++)
        free(tx->rcpts[i]);
    free(tx->rcpts);
    free(tx->from);
    free(tx->res);
    free(tx->rstate);
    free(tx->map);
    free(tx);
}

/*
 * Completes the pending transaction with a local failure for every
 * recipient that has no answer yet. Recipients accepted at RCPT whose
 * content went out completely ("." sent) are ambiguous: the server may
 * have taken the message, and trying again may deliver it twice (RFC 1047;
 * RFC 5321 section 4.5.3.2.6 gives the end of data ten minutes for that
 * reason). Refusals already received stay as they are.
 */
static void sc_tx_fail(struct smtp_client *c, const char *why)
{
    struct sc_tx *tx = c->tx;
    char text[512];
    size_t i;

    for (i = 0; i < tx->nrcpts; i++) {
        if (tx->rstate[i] == SC_RCPT_DONE)
            continue;
        if (tx->rstate[i] == SC_RCPT_ACCEPTED && tx->dot_sent) {
            snprintf(text, sizeof(text), "%s after end of data was sent (delivery status unknown)",
                     why);
            sc_set_result(&tx->res[i], 451, "4.4.2", text, 1);
        } else {
            sc_set_result(&tx->res[i], 451, "4.4.2", why, 0);
        }
        tx->rstate[i] = SC_RCPT_DONE;
    }
    tx->conn_ok = 0;
    sc_tx_finish(c);
}

/* Applies a reply to every recipient still waiting for one. */
static void sc_tx_apply_all(struct sc_tx *tx, const struct smtp_reply *r, int only_accepted)
{
    size_t i;

    for (i = 0; i < tx->nrcpts; i++) {
        if (tx->rstate[i] == SC_RCPT_DONE)
            continue;
        if (only_accepted && tx->rstate[i] != SC_RCPT_ACCEPTED)
            continue;
        sc_set_from_reply(&tx->res[i], r);
        tx->rstate[i] = SC_RCPT_DONE;
    }
}

/*
 * Ends the transaction and calls the owner. The transaction is detached
 * first, so the callback may start the next one; its results stay valid
 * until the callback returns.
 */
static void sc_tx_finish(struct smtp_client *c)
{
    struct sc_tx *tx = c->tx;
    struct smtp_client_result res;
    size_t i;

    uv_timer_stop(&c->timer);
    for (i = 0; i < tx->nrcpts; i++) {
        if (tx->rstate[i] != SC_RCPT_DONE) {
            /* Accepted at RCPT but the transaction ended without an end
             * of data reply (DATA refused is applied before this). */
            sc_set_result(&tx->res[i], 451, "4.3.0", "transaction not completed", 0);
            tx->rstate[i] = SC_RCPT_DONE;
        }
    }
    if (!tx->conn_ok || c->conn == NULL || c->conn_closing) {
        tx->conn_ok = 0;
        sc_drop_conn(c, SC_DROP_ABORT);
        sc_enter_state(c, SC_BROKEN);
    } else {
        sc_enter_state(c, SC_IDLE);
    }
    log_debug("client=%u peer=%s msg=%s event=tx_done rcpts=%zu accepted=%zu conn_ok=%d",
              c->id, c->peer, tx->id, tx->nrcpts, tx->naccepted, tx->conn_ok);
    c->tx = NULL;
    c->op = SC_OP_NONE;
    res.rcpt = tx->res;
    res.nrcpts = tx->nrcpts;
    res.conn_ok = tx->conn_ok;
    c->tx_cb(c, &res, c->tx_arg);
    sc_tx_free(tx);
}

/* ---- failures ------------------------------------------------------------ */

/*
 * Completes the pending operation with a failure and marks the session
 * unusable. why is a short reason; reply the server's reply when it sent
 * one. After a failed connect the client releases itself (the ready
 * callback's contract); otherwise the owner closes it.
 */
static void sc_fail(struct smtp_client *c, const char *why, const struct smtp_reply *reply)
{
    char q[600];
    enum sc_op op = c->op;

    uv_timer_stop(&c->timer);
    /* A server that answered (and not with 421, RFC 5321 section 3.8) is
     * still listening and gets a QUIT. */
    sc_drop_conn(c, reply != NULL && reply->code != 421 && c->state != SC_TX_CONTENT
                        ? SC_DROP_QUIT : SC_DROP_ABORT);
    if (c->state != SC_QUIT)
        log_debug("client=%u peer=%s event=failed state=%s reason=%s", c->id, c->peer,
                  sc_state_names[c->state], log_quote(q, sizeof(q), why, strlen(why)));
    sc_enter_state(c, SC_BROKEN);
    switch (op) {
    case SC_OP_READY:
        c->op = SC_OP_NONE;
        c->released = 1;
        c->ready_cb(c, -1, reply, why, c->ready_arg);
        break;
    case SC_OP_TX:
        sc_tx_fail(c, why);
        break;
    case SC_OP_CMD:
        c->op = SC_OP_NONE;
        c->cmd_cb(c, -1, reply, c->cmd_arg);
        break;
    case SC_OP_STEP: {
        int status = c->tx != NULL && c->tx->dot_sent ? SMTP_CLIENT_AMBIGUOUS : -1;

        if (c->tx != NULL)
            sc_tx_free(c->tx);
        c->tx = NULL;
        c->op = SC_OP_NONE;
        c->cmd_cb(c, status, reply, c->cmd_arg);
        break;
    }
    case SC_OP_NONE:
        break;
    }
}

/* A reply that makes the connection fail: "<stage>: <reply>". */
static void sc_fail_reply(struct smtp_client *c, const char *stage, const struct smtp_reply *r)
{
    char rs[512], why[600];

    snprintf(why, sizeof(why), "%s: %s", stage, sc_reply_str(r, rs, sizeof(rs)));
    sc_fail(c, why, r);
}

/* ---- session setup -------------------------------------------------------- */

static void sc_ready(struct smtp_client *c)
{
    uv_timer_stop(&c->timer);
    sc_enter_state(c, SC_IDLE);
    log_debug("client=%u peer=%s event=ready helo=%s tls=%s pipelining=%d auth=%s", c->id,
              c->peer, c->tried_helo ? "HELO" : "EHLO",
              c->tls_active ? conn_tls_version(c->conn) : "no", c->ext_pipelining,
              c->auth_user != NULL ? "yes" : "no");
    c->op = SC_OP_NONE;
    c->ready_cb(c, 0, NULL, NULL, c->ready_arg);
}

static void sc_send_ehlo(struct smtp_client *c)
{
    sc_write_cmd(c, "EHLO %s", c->helo);
    sc_flush(c);
    sc_enter_state(c, SC_EHLO);
    sc_timer(c, c->t_command);
}

/* Reads the extensions of an EHLO reply (RFC 5321 section 4.1.1.1). */
static void sc_parse_ehlo(struct smtp_client *c)
{
    char params[256];

    c->ext_pipelining = smtp_reply_has_keyword(&c->ehlo, "PIPELINING", NULL, 0);
    c->ext_8bitmime = smtp_reply_has_keyword(&c->ehlo, "8BITMIME", NULL, 0);
    c->ext_smtputf8 = smtp_reply_has_keyword(&c->ehlo, "SMTPUTF8", NULL, 0);
    c->ext_starttls = smtp_reply_has_keyword(&c->ehlo, "STARTTLS", NULL, 0);
    c->ext_size = 0;
    c->ext_size_on = 0;
    if (smtp_reply_has_keyword(&c->ehlo, "SIZE", params, sizeof(params))) {
        char *end;
        unsigned long long v = strtoull(params, &end, 10);

        c->ext_size_on = 1;
        /* RFC 1870 section 4: no number, or 0, means no fixed limit. */
        if (end != params && (*end == '\0' || *end == ' '))
            c->ext_size = v;
    }
    c->ext_auth = c->ext_auth_plain = c->ext_auth_login = 0;
    if (smtp_reply_has_keyword(&c->ehlo, "AUTH", params, sizeof(params))) {
        char *save = NULL, *tok;

        c->ext_auth = 1;
        for (tok = strtok_r(params, " ", &save); tok != NULL; tok = strtok_r(NULL, " ", &save)) {
            if (strcasecmp(tok, "PLAIN") == 0)
                c->ext_auth_plain = 1;
            else if (strcasecmp(tok, "LOGIN") == 0)
                c->ext_auth_login = 1;
        }
    }
}

/* AUTH (RFC 4954), PLAIN preferred (RFC 4616, with an initial response),
 * LOGIN otherwise. Credentials never go over a connection without TLS. */
static void sc_start_auth(struct smtp_client *c)
{
    char ir[1024];

    if (!c->tls_active) {
        sc_fail(c, "AUTH requires TLS", NULL);
        return;
    }
    if (!c->ext_auth) {
        sc_fail(c, "AUTH not offered", NULL);
        return;
    }
    if (c->ext_auth_plain) {
        if (sasl_plain_encode(NULL, c->auth_user, c->auth_pass, ir, sizeof(ir)) < 0) {
            sc_fail(c, "AUTH: user name or password too long", NULL);
            return;
        }
        sc_enter_state(c, SC_AUTH);
        sc_write_cmd(c, "AUTH PLAIN %s", ir);
        OPENSSL_cleanse(ir, sizeof(ir));
    } else if (c->ext_auth_login) {
        sc_enter_state(c, SC_AUTH_LOGIN_USER);
        sc_write_cmd(c, "AUTH LOGIN");
    } else {
        sc_fail(c, "AUTH: no supported mechanism offered (PLAIN, LOGIN)", NULL);
        return;
    }
    sc_flush(c);
    sc_timer(c, c->t_command);
}

/* After EHLO: STARTTLS when wanted and not done yet, then AUTH, then
 * ready. starttls_refused: an opportunistic STARTTLS got a refusal, and
 * the session goes on in plaintext. */
static void sc_after_ehlo(struct smtp_client *c, int starttls_refused)
{
    if (!c->tls_active && !starttls_refused &&
        (c->tls == SMTP_CLIENT_TLS_OPPORTUNISTIC || c->tls == SMTP_CLIENT_TLS_REQUIRED)) {
        if (c->ext_starttls) {
            sc_write_cmd(c, "STARTTLS");
            sc_flush(c);
            sc_enter_state(c, SC_STARTTLS);
            sc_timer(c, c->t_command);
            return;
        }
        if (c->tls == SMTP_CLIENT_TLS_REQUIRED) {
            sc_fail(c, "STARTTLS not offered", NULL);
            return;
        }
    }
    if (c->auth_user != NULL) {
        sc_start_auth(c);
        return;
    }
    sc_ready(c);
}

static void sc_on_greeting(struct smtp_client *c, const struct smtp_reply *r)
{
    /* RFC 5321 section 3.1: 554 (or anything but 220) means the server
     * does not want us; the client should QUIT. */
    if (r->code != 220) {
        sc_fail_reply(c, "greeting", r);
        return;
    }
    sc_send_ehlo(c);
}

static void sc_on_ehlo(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code == 250) {
        c->ehlo = *r;
        sc_parse_ehlo(c);
        sc_after_ehlo(c, 0);
        return;
    }
    /* RFC 5321 section 4.1.4: a server that does not know EHLO answers
     * 5xx, and the client may fall back to HELO. */
    if (smtp_reply_class(r) == 5 && !c->tried_helo && r->code != 421) {
        c->tried_helo = 1;
        sc_write_cmd(c, "HELO %s", c->helo);
        sc_flush(c);
        sc_enter_state(c, SC_HELO);
        sc_timer(c, c->t_command);
        return;
    }
    sc_fail_reply(c, "EHLO", r);
}

static void sc_on_helo(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code != 250) {
        sc_fail_reply(c, "HELO", r);
        return;
    }
    c->ehlo = *r;
    sc_parse_ehlo(c);       /* a one-line reply: no extensions */
    sc_after_ehlo(c, 0);
}

static void sc_on_starttls(struct smtp_client *c, const struct smtp_reply *r)
{
    if (r->code != 220) {
        if (c->tls == SMTP_CLIENT_TLS_REQUIRED) {
            sc_fail_reply(c, "STARTTLS refused", r);
            return;
        }
        /* RFC 3207 section 4: the client may go on without TLS. */
        sc_after_ehlo(c, 1);
        return;
    }
    /* RFC 3207 section 4.2: anything the server sent after its 220 in
     * plaintext is an injection attempt and is dropped, and what we knew
     * of the server's extensions is forgotten until the new EHLO. */
    buf_reset(&c->in);
    memset(&c->ehlo, 0, sizeof(c->ehlo));
    c->ext_pipelining = c->ext_8bitmime = c->ext_smtputf8 = c->ext_starttls = 0;
    c->ext_auth = c->ext_auth_plain = c->ext_auth_login = 0;
    c->ext_size = 0;
    c->ext_size_on = 0;
    sc_enter_state(c, SC_TLS);
    sc_timer(c, c->t_command);
    if (conn_start_tls(c->conn, c->tls_ctx, 0, c->servername) != 0)
        sc_fail(c, "STARTTLS: cannot start TLS", NULL);
}

static void sc_on_auth(struct smtp_client *c, const struct smtp_reply *r)
{
    char b64[512];

    switch (c->state) {
    case SC_AUTH:
        if (r->code == 235) {
            sc_ready(c);
            return;
        }
        break;
    case SC_AUTH_LOGIN_USER:
    case SC_AUTH_LOGIN_PASS:
        if (r->code == 334) {
            const char *v = c->state == SC_AUTH_LOGIN_USER ? c->auth_user : c->auth_pass;

            if (sasl_b64_encode((const unsigned char *)v, strlen(v), b64, sizeof(b64)) < 0) {
                /* RFC 4954 section 4: "*" cancels the exchange. */
                conn_write(c->conn, "*\r\n", 3);
                sc_fail(c, "AUTH: user name or password too long", NULL);
                return;
            }
            sc_enter_state(c, c->state == SC_AUTH_LOGIN_USER ? SC_AUTH_LOGIN_PASS : SC_AUTH);
            sc_write_cmd(c, "%s", b64);
            OPENSSL_cleanse(b64, sizeof(b64));
            sc_flush(c);
            sc_timer(c, c->t_command);
            return;
        }
        break;
    default:
        break;
    }
    sc_fail_reply(c, "AUTH failed", r);
}

/* ---- transactions ------------------------------------------------------- */

/* The MAIL parameters: RFC 1870 section 6 the size estimate (size < 0:
 * none), RFC 6152 BODY=8BITMIME, RFC 6531 section 3.4 SMTPUTF8, each only
 * when the server offers it. */
static void sc_mail_params(struct smtp_client *c, struct buf *params, long long size,
                           int body8bit, int smtputf8)
{
    if (c->ext_size_on && size >= 0)
        buf_appendf(params, " SIZE=%lld", size);
    if (body8bit && c->ext_8bitmime)
        buf_appends(params, " BODY=8BITMIME");
    if (smtputf8 && c->ext_smtputf8)
        buf_appends(params, " SMTPUTF8");
}

/*
 * Whether a message the server cannot take must be refused without
 * sending it: RFC 6531 section 3.5 (SMTPUTF8), RFC 6152 section 3 / RFC
 * 3463 5.6.3 (8-bit content without 8BITMIME), RFC 1870 section 6 (SIZE).
 * Returns 0, or the reply code with enh and text filled.
 */
static int sc_mail_refusal(struct smtp_client *c, long long size, int body8bit, int smtputf8,
                           const char **enh, char *text, size_t n)
{
    if (smtputf8 && !c->ext_smtputf8) {
        *enh = "5.6.7";
        snprintf(text, n, "message needs SMTPUTF8, which the server does not offer");
        return 553;
    }
    if (body8bit && !c->ext_8bitmime) {
        *enh = "5.6.3";
        snprintf(text, n, "message has 8-bit content and the server does not offer 8BITMIME");
        return 554;
    }
    if (c->ext_size > 0 && size >= 0 && (unsigned long long)size > c->ext_size) {
        *enh = "5.3.4";
        snprintf(text, n, "message size %lld exceeds the server's limit of %llu", size,
                 c->ext_size);
        return 552;
    }
    return 0;
}

/* The envelope commands, by index: 0 MAIL, 1..nmap RCPT (the recipients
 * not refused locally, in order), nmap+1 DATA. */
static void sc_tx_write_cmd(struct smtp_client *c, size_t k)
{
    struct sc_tx *tx = c->tx;

    if (k == 0) {
        struct buf params = BUF_INIT;

        sc_mail_params(c, &params, (long long)tx->len, tx->body8bit, tx->smtputf8);
        sc_write_cmd(c, "MAIL FROM:<%s>%s", tx->from, params.data != NULL ? params.data : "");
        buf_free(&params);
    } else if (k <= tx->nmap) {
        sc_write_cmd(c, "RCPT TO:<%s>", tx->rcpts[tx->map[k - 1]]);
    } else {
        sc_write_cmd(c, "DATA");
    }
    tx->nsent = k + 1;
}

/* The timeout for the next envelope reply (RFC 5321 section 4.5.3.2). */
static unsigned sc_tx_envelope_timeout(struct smtp_client *c)
{
    struct sc_tx *tx = c->tx;

    if (tx->next_reply == 0)
        return c->t_mail;
    if (tx->next_reply <= tx->nmap)
        return c->t_rcpt;
    return c->t_data;
}

/*
 * After a transaction that did not reach a reply to its end of data, the
 * server may still hold a half-built transaction (MAIL accepted, or DATA
 * refused): RSET clears it (RFC 5321 section 4.1.1.5) before the client
 * counts as idle again.
 */
static void sc_tx_rset(struct smtp_client *c)
{
    sc_write_cmd(c, "RSET");
    sc_flush(c);
    sc_enter_state(c, SC_TX_RSET);
    sc_timer(c, c->t_command);
}

/* RFC 5321 section 3.8: 421 means the server closes the connection. The
 * reply answers every recipient still open. */
static void sc_tx_on_421(struct smtp_client *c, const struct smtp_reply *r)
{
    sc_tx_apply_all(c->tx, r, 0);
    c->tx->conn_ok = 0;
    sc_tx_finish(c);
}

static void sc_on_envelope(struct smtp_client *c, const struct smtp_reply *r)
{
    struct sc_tx *tx = c->tx;
    size_t k = tx->next_reply++;
    int cls = smtp_reply_class(r);

    if (r->code == 421) {
        sc_tx_on_421(c, r);
        return;
    }
    if (k == 0) {
        /* MAIL: a refusal answers every recipient (the RCPT replies that
         * follow in a pipelined group are then only read). */
        tx->mail_ok = cls == 2;
        if (!tx->mail_ok)
            sc_tx_apply_all(tx, r, 0);
    } else if (k <= tx->nmap) {
        size_t i = tx->map[k - 1];

        if (tx->mail_ok) {
            sc_set_from_reply(&tx->res[i], r);
            if (cls == 2) {
                tx->rstate[i] = SC_RCPT_ACCEPTED;
                tx->naccepted++;
            } else {
                tx->rstate[i] = SC_RCPT_DONE;
            }
        }
    } else {
        /* DATA. */
        if (r->code == 354) {
            if (tx->naccepted > 0) {
                sc_enter_state(c, SC_TX_CONTENT);
                sc_tx_content(c);
                return;
            }
            /* RFC 2920 section 3.1: with no valid recipient the server
             * should refuse DATA; one that says 354 anyway gets an empty
             * message, which it has nobody to deliver to, and an RSET. */
            tx->discard_dot = 1;
            conn_write(c->conn, ".\r\n", 3);
            sc_flush(c);
            sc_enter_state(c, SC_TX_DOT);
            sc_timer(c, c->t_dot);
            return;
        }
        sc_tx_apply_all(tx, r, 1);
        sc_tx_rset(c);
        return;
    }

    if (tx->next_reply < tx->nsent) {
        /* More replies of a pipelined group are due. */
        sc_timer(c, sc_tx_envelope_timeout(c));
        return;
    }
    /* One command at a time: decide what comes next. */
    if (!tx->mail_ok) {
        sc_tx_rset(c);
        return;
    }
    if (tx->nsent <= tx->nmap) {
        sc_tx_write_cmd(c, tx->nsent);
    } else if (tx->naccepted > 0) {
        sc_tx_write_cmd(c, tx->nsent);   /* DATA */
    } else {
        sc_tx_rset(c);
        return;
    }
    sc_flush(c);
    sc_timer(c, sc_tx_envelope_timeout(c));
}

/*
 * Hands the content to the connection, one block at a time, with
 * dot-stuffing (RFC 5321 section 4.5.2): a line that starts with "." gets
 * one more. Segments between such dots are written straight from the
 * caller's buffer (conn_write copies them once). A line start is any byte
 * after LF, not only after CRLF: a bare LF in the data must not let a "."
 * through unstuffed, since a lenient receiver could read "\n.\r\n" as the
 * end of data (SMTP smuggling).
 */
static void sc_tx_content(struct smtp_client *c)
{
    struct sc_tx *tx = c->tx;
    size_t end = tx->off + SC_BLOCK_SIZE < tx->len ? tx->off + SC_BLOCK_SIZE : tx->len;
    size_t seg = tx->off, i = tx->off;

    while (i < end) {
        if (tx->at_bol && tx->data[i] == '.') {
            conn_write(c->conn, tx->data + seg, i - seg);
            conn_write(c->conn, ".", 1);
            seg = i;
        }
        {
            const char *lf = memchr(tx->data + i, '\n', end - i);

            if (lf == NULL) {
                tx->at_bol = 0;
                i = end;
            } else {
                i = (size_t)(lf - tx->data) + 1;
                tx->at_bol = 1;
            }
        }
    }
    if (end > seg)
        conn_write(c->conn, tx->data + seg, end - seg);
    tx->off = end;
    if (tx->off < tx->len) {
        /* Wait for CONN_EV_DRAINED before the next block. */
        sc_flush(c);
        sc_timer(c, c->t_block);
        return;
    }
    /* The content must end with CRLF before the final "." (RFC 5321
     * section 4.1.1.4). */
    if (tx->len > 0 && tx->data[tx->len - 1] == '\r')
        conn_write(c->conn, "\n", 1);
    else if (tx->len > 0 && !(tx->len >= 2 && tx->data[tx->len - 2] == '\r' &&
                              tx->data[tx->len - 1] == '\n'))
        conn_write(c->conn, "\r\n", 2);
    conn_write(c->conn, ".\r\n", 3);
    tx->dot_sent = 1;
    sc_flush(c);
    sc_enter_state(c, SC_TX_DOT);
    sc_timer(c, c->t_dot);
}

static void sc_on_dot(struct smtp_client *c, const struct smtp_reply *r)
{
    struct sc_tx *tx = c->tx;

    if (tx->discard_dot) {
        if (r->code == 421) {
            sc_tx_on_421(c, r);
            return;
        }
        sc_tx_rset(c);
        return;
    }
    /* RFC 5321 section 4.1.1.4: one reply for every accepted recipient
     * (LMTP would answer each, SMTP answers once). */
    sc_tx_apply_all(tx, r, 1);
    if (r->code == 421)
        tx->conn_ok = 0;
    sc_tx_finish(c);
}

static void sc_on_rset(struct smtp_client *c, const struct smtp_reply *r)
{
    if (smtp_reply_class(r) != 2)
        c->tx->conn_ok = 0;
    sc_tx_finish(c);
}

/* A message the server cannot take is answered without sending it
 * (sc_mail_refusal). */
static int sc_tx_check_local(struct smtp_client *c, struct sc_tx *tx)
{
    const char *enh = NULL;
    char text[160];
    int code;
    size_t i;

    code = sc_mail_refusal(c, (long long)tx->len, tx->body8bit, tx->smtputf8, &enh, text,
                           sizeof(text));
    if (code == 0)
        return 0;
    for (i = 0; i < tx->nrcpts; i++) {
        sc_set_result(&tx->res[i], code, enh, text, 0);
        tx->rstate[i] = SC_RCPT_DONE;
    }
    return 1;
}

/* An address that would break the command line (CR, LF) is refused
 * locally rather than sent: the router should never pass one. */
static int sc_addr_bad(const char *a)
{
    return strpbrk(a, "\r\n<>") != NULL;
}

int smtp_client_send(struct smtp_client *c, const struct transport_msg *m,
                     smtp_client_tx_cb cb, void *arg)
{
    struct sc_tx *tx;
    size_t i, k;

    if (c->state != SC_IDLE || c->released || c->conn == NULL || c->conn_closing)
        return -1;
    tx = xcalloc(1, sizeof(*tx));
    snprintf(tx->id, sizeof(tx->id), "%s", m->id != NULL ? m->id : "-");
    tx->from = xstrdup(m->from != NULL ? m->from : "");
    tx->nrcpts = m->nrcpts;
    tx->rcpts = xcalloc(m->nrcpts ? m->nrcpts : 1, sizeof(char *));
    tx->res = xcalloc(m->nrcpts ? m->nrcpts : 1, sizeof(*tx->res));
    tx->rstate = xcalloc(m->nrcpts ? m->nrcpts : 1, 1);
    tx->map = xcalloc(m->nrcpts ? m->nrcpts : 1, sizeof(size_t));
    for (i = 0; i < m->nrcpts; i++)
        tx->rcpts[i] = xstrdup(m->rcpts[i]);
    tx->data = m->data;
    tx->len = m->len;
    tx->smtputf8 = m->smtputf8;
    tx->body8bit = m->body8bit;
    tx->mail_ok = -1;
    tx->at_bol = 1;
    tx->conn_ok = 1;

    c->tx = tx;
    c->op = SC_OP_TX;
    c->tx_cb = cb;
    c->tx_arg = arg;

    if (sc_addr_bad(tx->from)) {
        for (i = 0; i < tx->nrcpts; i++) {
            sc_set_result(&tx->res[i], 553, "5.1.7", "invalid sender address", 0);
            tx->rstate[i] = SC_RCPT_DONE;
        }
    }
    for (i = 0; i < tx->nrcpts; i++) {
        if (tx->rstate[i] == SC_RCPT_PENDING && sc_addr_bad(tx->rcpts[i])) {
            sc_set_result(&tx->res[i], 553, "5.1.3", "invalid recipient address", 0);
            tx->rstate[i] = SC_RCPT_DONE;
        }
        if (tx->rstate[i] == SC_RCPT_PENDING)
            tx->map[tx->nmap++] = i;
    }
    if (tx->nmap == 0 || sc_tx_check_local(c, tx)) {
        sc_enter_state(c, SC_TX_LOCAL);
        uv_timer_start(&c->timer, sc_on_timer, 0, 0);
        return 0;
    }

    sc_enter_state(c, SC_TX_ENVELOPE);
    if (c->ext_pipelining) {
        /* RFC 2920 section 3.1: MAIL, every RCPT and DATA in one group;
         * DATA is the last command of the group. */
        for (k = 0; k <= tx->nmap + 1; k++)
            sc_tx_write_cmd(c, k);
    } else {
        sc_tx_write_cmd(c, 0);
    }
    sc_flush(c);
    sc_timer(c, c->t_mail);
    return 0;
}

/* ---- stepwise transactions -------------------------------------------- */

/*
 * Completes the stepwise command in flight with reply r (status 0) and
 * moves to state next. A 421 reply means the server is closing (RFC 5321
 * section 3.8): the client is broken whatever next says. The content of a
 * DATA, if any, is released first; the callback may start the next command.
 */
static void sc_step_done(struct smtp_client *c, const struct smtp_reply *r, enum sc_state next)
{
    smtp_client_cmd_cb cb = c->cmd_cb;
    void *arg = c->cmd_arg;

    uv_timer_stop(&c->timer);
    if (c->tx != NULL)
        sc_tx_free(c->tx);
    c->tx = NULL;
    c->op = SC_OP_NONE;
    if (r->code == 421 || next == SC_BROKEN) {
        sc_drop_conn(c, SC_DROP_ABORT);
        next = SC_BROKEN;
    }
    sc_enter_state(c, next);
    cb(c, 0, r, arg);
}

/* Answers the command being started with a reply made here, from the
 * loop (callbacks never run inside an API call). */
static void sc_step_local(struct smtp_client *c, int code, const char *enh, const char *text,
                          enum sc_state next)
{
    memset(&c->step_reply, 0, sizeof(c->step_reply));
    c->step_reply.code = code;
    snprintf(c->step_reply.enhanced, sizeof(c->step_reply.enhanced), "%s", enh);
    snprintf(c->step_reply.text, sizeof(c->step_reply.text), "%s", text);
    c->step_reply.nlines = 1;
    c->step_next = next;
    sc_enter_state(c, SC_STEP_LOCAL);
    uv_timer_start(&c->timer, sc_on_timer, 0, 0);
}

/* Whether a stepwise command may start in state st. */
static int sc_step_can(const struct smtp_client *c, enum sc_state st)
{
    return c->state == st && c->op == SC_OP_NONE && !c->released && c->conn != NULL &&
           !c->conn_closing;
}

static void sc_step_begin(struct smtp_client *c, smtp_client_cmd_cb cb, void *arg)
{
    c->op = SC_OP_STEP;
    c->cmd_cb = cb;
    c->cmd_arg = arg;
}

int smtp_client_mail(struct smtp_client *c, const char *from,
                     const struct smtp_client_mail_params *p, smtp_client_cmd_cb cb, void *arg)
{
    struct buf params = BUF_INIT;
    const char *enh = NULL;
    char text[160];
    int code;

    if (!sc_step_can(c, SC_IDLE))
        return -1;
    sc_step_begin(c, cb, arg);
    if (sc_addr_bad(from)) {
        sc_step_local(c, 553, "5.1.7", "invalid sender address", SC_IDLE);
        return 0;
    }
    code = sc_mail_refusal(c, p->size, p->body8bit, p->smtputf8, &enh, text, sizeof(text));
    if (code != 0) {
        sc_step_local(c, code, enh, text, SC_IDLE);
        return 0;
    }
    sc_mail_params(c, &params, p->size, p->body8bit, p->smtputf8);
    sc_write_cmd(c, "MAIL FROM:<%s>%s", from, params.data != NULL ? params.data : "");
    buf_free(&params);
    sc_flush(c);
    sc_enter_state(c, SC_STEP_MAIL);
    sc_timer(c, c->t_mail);
    return 0;
}

int smtp_client_rcpt(struct smtp_client *c, const char *rcpt, smtp_client_cmd_cb cb, void *arg)
{
    if (!sc_step_can(c, SC_STEP_OPEN))
        return -1;
    sc_step_begin(c, cb, arg);
    if (sc_addr_bad(rcpt)) {
        sc_step_local(c, 553, "5.1.3", "invalid recipient address", SC_STEP_OPEN);
        return 0;
    }
    sc_write_cmd(c, "RCPT TO:<%s>", rcpt);
    sc_flush(c);
    sc_enter_state(c, SC_STEP_RCPT);
    sc_timer(c, c->t_rcpt);
    return 0;
}

int smtp_client_data(struct smtp_client *c, const char *data, size_t len,
                     smtp_client_cmd_cb cb, void *arg)
{
    struct sc_tx *tx;

    if (!sc_step_can(c, SC_STEP_OPEN))
        return -1;
    sc_step_begin(c, cb, arg);
    tx = xcalloc(1, sizeof(*tx));
    snprintf(tx->id, sizeof(tx->id), "-");
    tx->data = data;
    tx->len = len;
    tx->at_bol = 1;
    tx->conn_ok = 1;
    c->tx = tx;
    sc_write_cmd(c, "DATA");
    sc_flush(c);
    sc_enter_state(c, SC_STEP_DATA);
    sc_timer(c, c->t_data);
    return 0;
}

int smtp_client_rset(struct smtp_client *c, smtp_client_cmd_cb cb, void *arg)
{
    if (!sc_step_can(c, SC_STEP_OPEN) && !sc_step_can(c, SC_IDLE))
        return -1;
    sc_step_begin(c, cb, arg);
    sc_write_cmd(c, "RSET");
    sc_flush(c);
    sc_enter_state(c, SC_STEP_RSET);
    sc_timer(c, c->t_command);
    return 0;
}

int smtp_client_in_transaction(const struct smtp_client *c)
{
    return sc_step_can(c, SC_STEP_OPEN);
}

/* A reply to a stepwise command, in any of the SC_STEP_* states, or to
 * its content (SC_TX_CONTENT, SC_TX_DOT with op SC_OP_STEP). */
static void sc_on_step(struct smtp_client *c, const struct smtp_reply *r)
{
    int cls = smtp_reply_class(r);

    switch (c->state) {
    case SC_STEP_MAIL:
        sc_step_done(c, r, cls == 2 ? SC_STEP_OPEN : SC_IDLE);
        break;
    case SC_STEP_RCPT:
        sc_step_done(c, r, SC_STEP_OPEN);
        break;
    case SC_STEP_DATA:
        if (r->code == 354) {
            sc_enter_state(c, SC_TX_CONTENT);
            sc_tx_content(c);
            break;
        }
        if (r->code == 421) {
            sc_step_done(c, r, SC_BROKEN);
            break;
        }
        /* DATA refused (no valid recipient, RFC 2920 section 3.1, or
         * any other reason): the server may still hold the transaction,
         * and RSET clears it before the client counts as idle. */
        c->step_reply = *r;
        sc_write_cmd(c, "RSET");
        sc_flush(c);
        sc_enter_state(c, SC_STEP_DATA_RSET);
        sc_timer(c, c->t_command);
        break;
    case SC_STEP_DATA_RSET:
        sc_step_done(c, &c->step_reply, cls == 2 ? SC_IDLE : SC_BROKEN);
        break;
    case SC_STEP_RSET:
        sc_step_done(c, r, cls == 2 ? SC_IDLE : SC_BROKEN);
        break;
    case SC_TX_CONTENT:
        /* An answer before the end of data: the server gave up on the
         * message, and the rest of the content cannot be sent in step. */
        sc_step_done(c, r, SC_BROKEN);
        break;
    case SC_TX_DOT:
        /* RFC 5321 section 4.1.1.4: the transaction is over whatever the
         * reply says. */
        sc_step_done(c, r, SC_IDLE);
        break;
    default:
        break;
    }
}

/* ---- commands and close ----------------------------------------------------- */

int smtp_client_command(struct smtp_client *c, const char *line, smtp_client_cmd_cb cb,
                        void *arg)
{
    if (c->state != SC_IDLE || c->released || c->conn == NULL || c->conn_closing ||
        strpbrk(line, "\r\n") != NULL)
        return -1;
    sc_write_cmd(c, "%s", line);
    sc_flush(c);
    c->op = SC_OP_CMD;
    c->cmd_cb = cb;
    c->cmd_arg = arg;
    sc_enter_state(c, SC_COMMAND);
    sc_timer(c, c->t_command);
    return 0;
}

static void sc_on_command(struct smtp_client *c, const struct smtp_reply *r)
{
    uv_timer_stop(&c->timer);
    c->op = SC_OP_NONE;
    if (r->code == 421) {
        sc_drop_conn(c, SC_DROP_ABORT);
        sc_enter_state(c, SC_BROKEN);
    } else {
        sc_enter_state(c, SC_IDLE);
    }
    c->cmd_cb(c, 0, r, c->cmd_arg);
}

int smtp_client_idle(const struct smtp_client *c)
{
    return c->state == SC_IDLE && !c->released && c->conn != NULL && !c->conn_closing;
}

const struct smtp_reply *smtp_client_ehlo(const struct smtp_client *c)
{
    return &c->ehlo;
}

struct conn *smtp_client_conn(const struct smtp_client *c)
{
    return c->conn;
}

void smtp_client_on_free(struct smtp_client *c, void (*fn)(void *arg), void *arg)
{
    c->free_cb = fn;
    c->free_arg = arg;
}

/*
 * The owner lets go. A pending operation is completed with an error when
 * the connection reports CONN_EV_CLOSED (from the loop, never from here).
 */
void smtp_client_close(struct smtp_client *c)
{
    if (c->released)
        return;
    c->released = 1;
    uv_timer_stop(&c->timer);
    if (c->conn != NULL) {
        c->conn_closing = 1;
        conn_abort(c->conn);
        return;
    }
    sc_maybe_free(c);
}

/* RFC 5321 section 4.1.1.10: QUIT, wait for 221, close. */
void smtp_client_quit(struct smtp_client *c)
{
    if (c->released)
        return;
    /* QUIT is also fine inside an open transaction (RFC 5321 section
     * 4.1.1.10: the server aborts it). */
    if ((c->state != SC_IDLE && c->state != SC_STEP_OPEN) || c->op != SC_OP_NONE ||
        c->conn == NULL || c->conn_closing) {
        smtp_client_close(c);
        return;
    }
    c->released = 1;
    sc_write_cmd(c, "QUIT");
    sc_flush(c);
    sc_enter_state(c, SC_QUIT);
    uv_timer_start(&c->timer, sc_on_timer, SC_QUIT_WAIT_MS, 0);
}

/* ---- events ------------------------------------------------------------ */

static void sc_handle_reply(struct smtp_client *c, const struct smtp_reply *r)
{
    char rs[512], q[600];

    sc_reply_str(r, rs, sizeof(rs));
    log_debug("client=%u peer=%s event=reply state=%s reply=%s", c->id, c->peer,
              sc_state_names[c->state], log_quote(q, sizeof(q), rs, strlen(rs)));
    switch (c->state) {
    case SC_GREETING:
        sc_on_greeting(c, r);
        break;
    case SC_EHLO:
        sc_on_ehlo(c, r);
        break;
    case SC_HELO:
        sc_on_helo(c, r);
        break;
    case SC_STARTTLS:
        sc_on_starttls(c, r);
        break;
    case SC_AUTH:
    case SC_AUTH_LOGIN_USER:
    case SC_AUTH_LOGIN_PASS:
        sc_on_auth(c, r);
        break;
    case SC_TX_ENVELOPE:
        sc_on_envelope(c, r);
        break;
    case SC_STEP_MAIL:
    case SC_STEP_RCPT:
    case SC_STEP_DATA:
    case SC_STEP_DATA_RSET:
    case SC_STEP_RSET:
        sc_on_step(c, r);
        break;
    case SC_TX_CONTENT:
        if (c->op == SC_OP_STEP) {
            sc_on_step(c, r);
            break;
        }
        /* The server answered before the end of data (it gave up on the
         * message): the answer is for every accepted recipient, and the
         * rest of the content can no longer be sent in step. */
        sc_tx_apply_all(c->tx, r, 1);
        c->tx->conn_ok = 0;
        sc_tx_finish(c);
        break;
    case SC_TX_DOT:
        if (c->op == SC_OP_STEP)
            sc_on_step(c, r);
        else
            sc_on_dot(c, r);
        break;
    case SC_TX_RSET:
        sc_on_rset(c, r);
        break;
    case SC_COMMAND:
        sc_on_command(c, r);
        break;
    case SC_QUIT:
        /* The 221 (or whatever came): close cleanly. */
        uv_timer_stop(&c->timer);
        sc_drop_conn(c, SC_DROP_GRACEFUL);
        break;
    default:
        /* Idle (or anywhere a reply is not expected): a 421 before the
         * server closes, or a protocol violation. The session is over. */
        log_info("client=%u peer=%s event=unexpected_reply state=%s reply=%s", c->id,
                 c->peer, sc_state_names[c->state], log_quote(q, sizeof(q), rs, strlen(rs)));
        sc_fail(c, r->code == 421 ? "server closed the connection (421)"
                                   : "unexpected reply from server", r);
        break;
    }
}

static void sc_process(struct smtp_client *c)
{
    while (c->in.len > 0 && c->conn != NULL && !c->conn_closing) {
        ssize_t n;

        if (c->state == SC_TLS || c->state == SC_TLS_IMPLICIT || c->state == SC_CONNECTING) {
            /* No plaintext may be taken while TLS starts (RFC 3207). */
            buf_reset(&c->in);
            return;
        }
        n = smtp_reply_parse(c->in.data, c->in.len, &c->reply);
        if (n == SMTP_REPLY_NEED_MORE) {
            if (c->in.len > SC_IN_MAX)
                sc_fail(c, "protocol error: reply too long", NULL);
            return;
        }
        if (n == SMTP_REPLY_ERROR) {
            char q[120];

            log_info("client=%u peer=%s event=protocol_error state=%s data=%s", c->id, c->peer,
                     sc_state_names[c->state],
                     log_quote(q, sizeof(q), c->in.data, c->in.len < 80 ? c->in.len : 80));
            buf_reset(&c->in);
            sc_fail(c, "protocol error: malformed reply from server", NULL);
            return;
        }
        buf_consume(&c->in, (size_t)n);
        sc_handle_reply(c, &c->reply);
    }
}

static void sc_on_read(struct conn *conn, const char *data, size_t len, void *arg)
{
    struct smtp_client *c = arg;

    (void)conn;
    if (c->conn_closing && c->state != SC_QUIT)
        return;
    buf_append(&c->in, data, len);
    sc_process(c);
}

/* Short reason for a connection-level failure in the current state. */
static void sc_conn_reason(struct smtp_client *c, int status, char *out, size_t n)
{
    if (status == CONN_ERR_TLS) {
        const char *e = c->conn != NULL ? conn_tls_error(c->conn) : "";

        snprintf(out, n, "TLS %s failed%s%s",
                 c->state == SC_TLS || c->state == SC_TLS_IMPLICIT ? "handshake" : "session",
                 e[0] ? ": " : "", e);
    } else if (c->state == SC_CONNECTING) {
        snprintf(out, n, "connect: %s", uv_strerror(status));
    } else {
        snprintf(out, n, "connection error in state %s: %s", sc_state_names[c->state],
                 uv_strerror(status));
    }
}

static void sc_on_event(struct conn *conn, enum conn_event ev, int status, void *arg)
{
    struct smtp_client *c = arg;
    char why[400];

    switch (ev) {
    case CONN_EV_CONNECTED:
        conn_read_start(conn);
        if (c->tls == SMTP_CLIENT_TLS_IMPLICIT) {
            sc_enter_state(c, SC_TLS_IMPLICIT);
            sc_timer(c, c->t_greeting);
            if (conn_start_tls(conn, c->tls_ctx, 0, c->servername) != 0)
                sc_fail(c, "TLS: cannot start", NULL);
        } else {
            sc_enter_state(c, SC_GREETING);
            sc_timer(c, c->t_greeting);
        }
        break;
    case CONN_EV_TLS_READY:
        c->tls_active = 1;
        log_debug("client=%u peer=%s event=tls version=%s cipher=%s", c->id, c->peer,
                  conn_tls_version(conn), conn_tls_cipher(conn));
        if (c->state == SC_TLS_IMPLICIT) {
            sc_enter_state(c, SC_GREETING);
            sc_timer(c, c->t_greeting);
        } else if (c->state == SC_TLS) {
            /* RFC 3207 section 4.2: EHLO again over TLS. */
            sc_send_ehlo(c);
        }
        break;
    case CONN_EV_EOF:
        if (c->state == SC_QUIT) {
            uv_timer_stop(&c->timer);
            sc_drop_conn(c, SC_DROP_GRACEFUL);
            break;
        }
        snprintf(why, sizeof(why), "connection closed by server in state %s",
                 sc_state_names[c->state]);
        if (c->state == SC_TLS || c->state == SC_TLS_IMPLICIT)
            snprintf(why, sizeof(why), "TLS handshake failed: connection closed by server");
        sc_fail(c, why, NULL);
        break;
    case CONN_EV_ERROR:
        if (c->state == SC_QUIT) {
            uv_timer_stop(&c->timer);
            sc_drop_conn(c, SC_DROP_ABORT);
            break;
        }
        sc_conn_reason(c, status, why, sizeof(why));
        sc_fail(c, why, NULL);
        break;
    case CONN_EV_DRAINED:
        if (c->state == SC_TX_CONTENT && c->conn != NULL && !c->conn_closing)
            sc_tx_content(c);
        break;
    case CONN_EV_CLOSED:
        c->conn = NULL;
        c->conn_closing = 1;
        if (c->op != SC_OP_NONE)
            sc_fail(c, c->released ? "client closed" : "connection closed", NULL);
        else
            sc_enter_state(c, SC_BROKEN);
        sc_maybe_free(c);
        break;
    }
}

static void sc_on_timer(uv_timer_t *t)
{
    struct smtp_client *c = t->data;
    char why[160];

    switch (c->state) {
    case SC_TX_LOCAL:
        sc_tx_finish(c);
        return;
    case SC_STEP_LOCAL:
        sc_step_done(c, &c->step_reply, c->step_next);
        return;
    case SC_STEP_MAIL:
    case SC_STEP_RCPT:
    case SC_STEP_DATA:
    case SC_STEP_DATA_RSET:
    case SC_STEP_RSET:
        snprintf(why, sizeof(why), "timeout waiting for reply to %s",
                 c->state == SC_STEP_MAIL   ? "MAIL"
                 : c->state == SC_STEP_RCPT ? "RCPT"
                 : c->state == SC_STEP_DATA ? "DATA"
                                            : "RSET");
        break;
    case SC_QUIT:
        sc_drop_conn(c, SC_DROP_ABORT);
        return;
    case SC_CONNECTING:
        snprintf(why, sizeof(why), "connect: %s", uv_strerror(UV_ETIMEDOUT));
        break;
    case SC_TX_CONTENT:
        snprintf(why, sizeof(why), "timeout while sending message content");
        break;
    case SC_TX_ENVELOPE: {
        struct sc_tx *tx = c->tx;

        snprintf(why, sizeof(why), "timeout waiting for reply to %s",
                 tx->next_reply == 0 ? "MAIL" : tx->next_reply <= tx->nmap ? "RCPT" : "DATA");
        break;
    }
    case SC_TX_DOT:
        snprintf(why, sizeof(why), "timeout waiting for reply to end of data");
        break;
    case SC_TLS_IMPLICIT:
    case SC_TLS:
        snprintf(why, sizeof(why), "timeout during TLS handshake");
        break;
    case SC_GREETING:
        snprintf(why, sizeof(why), "timeout waiting for greeting");
        break;
    case SC_EHLO:
    case SC_HELO:
    case SC_STARTTLS:
        snprintf(why, sizeof(why), "timeout waiting for reply to %s",
                 c->state == SC_EHLO ? "EHLO" : c->state == SC_HELO ? "HELO" : "STARTTLS");
        break;
    case SC_AUTH:
    case SC_AUTH_LOGIN_USER:
    case SC_AUTH_LOGIN_PASS:
        snprintf(why, sizeof(why), "timeout waiting for reply to AUTH");
        break;
    case SC_TX_RSET:
        snprintf(why, sizeof(why), "timeout waiting for reply to RSET");
        break;
    default:
        snprintf(why, sizeof(why), "timeout waiting for reply (state %s)",
                 sc_state_names[c->state]);
        break;
    }
    log_info("client=%u peer=%s event=timeout state=%s", c->id, c->peer,
             sc_state_names[c->state]);
    sc_fail(c, why, NULL);
}

/* RFC 5321 section 4.5.3.2 defaults, in seconds. */
static unsigned sc_or(unsigned v, unsigned def)
{
    return v != 0 ? v : def;
}

struct smtp_client *smtp_client_connect(uv_loop_t *loop, const struct sockaddr *addr,
                                        const struct smtp_client_opts *opts,
                                        smtp_client_ready_cb cb, void *arg)
{
    struct smtp_client *c = xcalloc(1, sizeof(*c));
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;

    assert(opts->tls == SMTP_CLIENT_TLS_NONE || opts->tls_ctx != NULL);
    c->loop = loop;
    c->id = ++sc_next_id;
    if (addr->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)addr;

        uv_ip4_name(s4, ip, sizeof(ip));
        port = ntohs(s4->sin_port);
        snprintf(c->peer, sizeof(c->peer), "%s:%d", ip, port);
    } else if (addr->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)addr;

        uv_ip6_name(s6, ip, sizeof(ip));
        port = ntohs(s6->sin6_port);
        snprintf(c->peer, sizeof(c->peer), "[%s]:%d", ip, port);
    } else {
        snprintf(c->peer, sizeof(c->peer), "?");
    }
    c->helo = xstrdup(opts->helo != NULL ? opts->helo : "localhost");
    c->servername = opts->servername != NULL ? xstrdup(opts->servername) : NULL;
    c->auth_user = opts->auth_user != NULL ? xstrdup(opts->auth_user) : NULL;
    c->auth_pass = opts->auth_user != NULL ? xstrdup(opts->auth_pass != NULL ? opts->auth_pass : "")
                                           : NULL;
    c->tls = opts->tls;
    c->tls_ctx = opts->tls != SMTP_CLIENT_TLS_NONE ? tls_ctx_ref(opts->tls_ctx) : NULL;
    c->t_connect = sc_or(opts->connect_timeout, 30);
    c->t_greeting = sc_or(opts->greeting_timeout, 300);
    c->t_command = sc_or(opts->command_timeout, 300);
    c->t_mail = sc_or(opts->mail_timeout, 300);
    c->t_rcpt = sc_or(opts->rcpt_timeout, 300);
    c->t_data = sc_or(opts->data_timeout, 120);
    c->t_block = sc_or(opts->block_timeout, 180);
    c->t_dot = sc_or(opts->dot_timeout, 600);
    buf_init(&c->in);
    c->state = SC_CONNECTING;
    c->op = SC_OP_READY;
    c->ready_cb = cb;
    c->ready_arg = arg;
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    log_debug("client=%u peer=%s event=connect tls=%d", c->id, c->peer, (int)c->tls);
    c->conn = conn_connect(loop, addr, opts->source, 0, sc_on_read, sc_on_event, c);
    sc_timer(c, c->t_connect);
    return c;
}
