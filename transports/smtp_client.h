/*
 * smtp_client: one outgoing ESMTP connection (RFC 5321), with STARTTLS
 * (RFC 3207), AUTH PLAIN/LOGIN (RFC 4954), PIPELINING (RFC 2920), SIZE,
 * 8BITMIME and SMTPUTF8, over lib/conn. The smtp transport (smarthost),
 * the relay transport (tunnel: TLS with a client certificate) and the relay
 * itself (to recipient MX hosts) all use it.
 *
 * A client is connected and greeted once (smtp_client_connect), then runs
 * any number of transactions one after another (smtp_client_send), which
 * is how pools reuse connections. Every stage has the timeout RFC 5321
 * section 4.5.3.2 recommends unless the options override it.
 *
 * Callbacks are called from the loop, never from inside an smtp_client_*
 * call. After smtp_client_close()/smtp_client_quit() no further callback is
 * made except a pending one completing with an error, and the client frees
 * itself once its connection is closed.
 */
#ifndef MF_SMTP_CLIENT_H
#define MF_SMTP_CLIENT_H

#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

#include "lib/smtp_reply.h"
#include "lib/tls.h"
#include "transports/transport.h"

enum smtp_client_tls {
    SMTP_CLIENT_TLS_NONE = 0,        /* never STARTTLS */
    SMTP_CLIENT_TLS_OPPORTUNISTIC,   /* STARTTLS when offered; a failed
                                        handshake fails this connection (the
                                        caller may retry without TLS) */
    SMTP_CLIENT_TLS_REQUIRED,        /* STARTTLS must be offered and succeed */
    SMTP_CLIENT_TLS_IMPLICIT,        /* TLS from the first byte (port 465) */
};

struct smtp_client_opts {
    const char *helo;                /* EHLO name */
    enum smtp_client_tls tls;
    struct tls_ctx *tls_ctx;         /* client context (verification, client
                                        certificate); required unless NONE */
    const char *servername;          /* SNI and certificate name check */
    const char *auth_user;           /* NULL: no AUTH */
    const char *auth_pass;
    const struct sockaddr *source;   /* local address to bind, or NULL */
    /* Timeouts in seconds; 0 takes the RFC 5321 section 4.5.3.2 value:
     * connect 30, greeting 300, EHLO/STARTTLS/AUTH 300, MAIL 300, RCPT 300,
     * DATA 120, each data block 180, end of data 600. */
    unsigned connect_timeout, greeting_timeout, command_timeout;
    unsigned mail_timeout, rcpt_timeout, data_timeout, block_timeout, dot_timeout;
};

struct smtp_client;

/*
 * status 0: connected, greeted, EHLO done (and STARTTLS, AUTH as set).
 * status < 0: failed; reply is the failing reply when the server sent one
 * (else NULL) and err a short reason ("connect: connection refused",
 * "STARTTLS not offered", "AUTH failed: 535 5.7.8 ..."). After a failure
 * the client is closed and freed by itself; do not touch it.
 */
typedef void (*smtp_client_ready_cb)(struct smtp_client *c, int status,
                                     const struct smtp_reply *reply, const char *err,
                                     void *arg);

struct smtp_client *smtp_client_connect(uv_loop_t *loop, const struct sockaddr *addr,
                                        const struct smtp_client_opts *opts,
                                        smtp_client_ready_cb cb, void *arg);

/*
 * The outcome of one transaction. rcpt[i] is the answer to RCPT i, or,
 * for recipients accepted at RCPT, the answer to the end of data. A
 * failure before the recipients (MAIL refused, connection lost) applies to
 * every recipient. When the connection is lost after the final "." was
 * sent and before its reply, every accepted recipient is marked ambiguous
 * with a temporary result. conn_ok says whether the client can run another
 * transaction.
 */
struct smtp_client_result {
    struct transport_rcpt_result *rcpt;
    size_t nrcpts;
    int conn_ok;
};

typedef void (*smtp_client_tx_cb)(struct smtp_client *c, const struct smtp_client_result *res,
                                  void *arg);

/*
 * Runs one transaction (MAIL, RCPT..., DATA, content with dot-stuffing,
 * "."), pipelined when the server offers PIPELINING. The message bytes
 * must stay valid until the callback. Adds SIZE=, BODY=8BITMIME and
 * SMTPUTF8 when offered and relevant; a message that needs SMTPUTF8 or
 * 8BITMIME the server does not offer fails permanently (5.6.7 / 5.6.3) for
 * all recipients without being sent. Returns 0, or -1 when the client is
 * not ready (busy or broken).
 */
int smtp_client_send(struct smtp_client *c, const struct transport_msg *m,
                     smtp_client_tx_cb cb, void *arg);

/* Sends one command line and reports its reply (used for the relay's
 * status command and for RSET/NOOP health checks). Returns 0 or -1. */
typedef void (*smtp_client_cmd_cb)(struct smtp_client *c, int status,
                                   const struct smtp_reply *reply, void *arg);
int smtp_client_command(struct smtp_client *c, const char *line, smtp_client_cmd_cb cb,
                        void *arg);

/*
 * Stepwise transactions, for a caller that must see the server's answer to
 * each command before it sends the next one (the relay passes each reply
 * of a recipient's MX back to its own client, RCPT by RCPT). One command
 * is in flight at a time:
 *
 *   smtp_client_mail()  MAIL FROM; a 2xx reply opens the transaction
 *   smtp_client_rcpt()  RCPT TO, any number while the transaction is open
 *   smtp_client_data()  DATA, the content with dot-stuffing and the final
 *                       "."; the reply is the answer to the end of data,
 *                       or the refusal of DATA itself, after which the
 *                       client has sent RSET (its reply is not reported)
 *   smtp_client_rset()  RSET; ends an open transaction (also allowed idle)
 *
 * Each callback (smtp_client_cmd_cb, called exactly once, from the loop)
 * gets status 0 with the reply: the server's own, or one made here
 * without asking the server for what it cannot take (MAIL: 553 5.6.7
 * when SMTPUTF8 is needed and not offered, 554 5.6.3 for 8-bit content
 * without 8BITMIME, 552 5.3.4 over the announced SIZE; 553 5.1.7 / 5.1.3
 * for an address holding CR, LF, '<' or '>'). A 421 reply is reported
 * with status 0 and leaves the client broken. status < 0 means the
 * connection failed (timeout, lost, closed by the owner), reply is then
 * the server's last reply or NULL; SMTP_CLIENT_AMBIGUOUS from
 * smtp_client_data() says the final "." had been sent, so the server may
 * have taken the message. After any failure the client is broken and the
 * owner closes it.
 *
 * After a callback the client is idle (smtp_client_idle), inside an open
 * transaction (smtp_client_in_transaction: after MAIL or RCPT), or broken.
 * Each function returns 0, or -1 when the client is not in the state the
 * command needs (busy, broken, closed). smtp_client_send() and stepwise
 * commands use the same session one after another.
 */
#define SMTP_CLIENT_AMBIGUOUS (-2)

struct smtp_client_mail_params {
    long long size;          /* SIZE= estimate (RFC 1870), -1 when unknown */
    int body8bit;            /* BODY=8BITMIME (RFC 6152) */
    int smtputf8;            /* SMTPUTF8 (RFC 6531) */
};

int smtp_client_mail(struct smtp_client *c, const char *from,
                     const struct smtp_client_mail_params *p, smtp_client_cmd_cb cb, void *arg);
int smtp_client_rcpt(struct smtp_client *c, const char *rcpt, smtp_client_cmd_cb cb, void *arg);
/* The bytes (CRLF line ends, not dot-stuffed) must stay valid until the
 * callback. */
int smtp_client_data(struct smtp_client *c, const char *data, size_t len,
                     smtp_client_cmd_cb cb, void *arg);
int smtp_client_rset(struct smtp_client *c, smtp_client_cmd_cb cb, void *arg);

/* 1 when a stepwise transaction is open (MAIL accepted, no DATA or RSET
 * yet) and no command is in flight. */
int smtp_client_in_transaction(const struct smtp_client *c);

/* 1 when connected, greeted and idle (ready for smtp_client_send). */
int smtp_client_idle(const struct smtp_client *c);

/* The server's EHLO reply (keywords), valid while the client lives. */
const struct smtp_reply *smtp_client_ehlo(const struct smtp_client *c);

/* The connection, for TLS details and the peer certificate. */
struct conn *smtp_client_conn(const struct smtp_client *c);

/* Polite close: QUIT, wait briefly for 221, close. */
void smtp_client_quit(struct smtp_client *c);
/* Immediate close. A pending callback completes with an error. */
void smtp_client_close(struct smtp_client *c);

/*
 * Registers fn to be called, from the loop, right after the client has
 * freed itself (after smtp_client_quit(), smtp_client_close() or a failed
 * connect), so that an owner such as a connection pool can tell when all
 * of its clients are gone. Replaces an earlier registration.
 */
void smtp_client_on_free(struct smtp_client *c, void (*fn)(void *arg), void *arg);

#endif
