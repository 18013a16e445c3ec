/*
 * Unit tests for lib/tls and lib/conn on a real libuv loop over loopback
 * TCP: plain echo, STARTTLS (RFC 3207) with the reply flushed in plaintext
 * before the switch, implicit TLS (TLS 1.3 and 1.2), mutual TLS with good,
 * missing and foreign client certificates, server name verification, a
 * 5 MB transfer each way with read pauses and write backpressure, graceful
 * close and abort, the STARTTLS command injection attack, connect failures
 * and context errors.
 *
 * A throwaway CA, a second CA and their certificates are made with the
 * openssl command in a mkdtemp directory at group setup. Every owner
 * callback checks that it is not called from inside a conn_* call (the
 * w_* wrappers count those calls), and every test ends with
 * uv_loop_close() succeeding, so no handle is left behind.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/x509.h>
#include <uv.h>

#include "lib/buf.h"
#include "lib/conn.h"
#include "lib/tls.h"

#define BIG_TOTAL (5u * 1024 * 1024)
#define CLOSE_TOTAL (1024u * 1024)

static char g_dir[64];
static int g_in_call;    /* > 0 while a conn_* call made by a test runs */

static const char *cert_path(const char *name)
{
    static char paths[16][128];
    static int next;
    char *p = paths[next++ % 16];

    snprintf(p, sizeof(paths[0]), "%s/%s", g_dir, name);
    return p;
}

/* ---- Certificates ------------------------------------------------------ */

static int run_cmd(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int run_cmd(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return system(cmd);
}

static int make_ca(const char *name, const char *cn)
{
    return run_cmd("cd %s && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 "
                   "-nodes -keyout %s.key -out %s.pem -days 2 -subj '/CN=%s' "
                   "-addext 'basicConstraints=critical,CA:TRUE' "
                   "-addext 'keyUsage=critical,keyCertSign,cRLSign' >/dev/null 2>&1",
                   g_dir, name, name, cn);
}

static int make_leaf(const char *name, const char *cn, const char *ca, const char *ext, int serial)
{
    return run_cmd("cd %s && printf '%s' > %s.ext && "
                   "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
                   "-keyout %s.key -out %s.csr -subj '/CN=%s' >/dev/null 2>&1 && "
                   "openssl x509 -req -in %s.csr -CA %s.pem -CAkey %s.key -set_serial %d "
                   "-days 2 -extfile %s.ext -out %s.pem >/dev/null 2>&1",
                   g_dir, ext, name, name, name, cn, name, ca, ca, serial, name, name);
}

static int group_setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof(g_dir), "/tmp/mf_test_tls_XXXXXX");
    if (mkdtemp(g_dir) == NULL)
        return -1;
    if (make_ca("ca", "mailferry test CA") != 0 || make_ca("ca2", "other test CA") != 0)
        return -1;
    if (make_leaf("srv", "localhost", "ca",
                  "subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n"
                  "basicConstraints=CA:FALSE\\n", 2) != 0)
        return -1;
    if (make_leaf("cli", "mailferry test client", "ca",
                  "extendedKeyUsage=clientAuth\\nbasicConstraints=CA:FALSE\\n", 3) != 0)
        return -1;
    if (make_leaf("cli2", "foreign client", "ca2",
                  "extendedKeyUsage=clientAuth\\nbasicConstraints=CA:FALSE\\n", 4) != 0)
        return -1;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    if (g_dir[0] != '\0')
        run_cmd("rm -rf '%s'", g_dir);
    return 0;
}

/* ---- conn_* wrappers that mark "inside a conn call" -------------------- */

struct peer;
static void p_read(struct conn *c, const char *d, size_t n, void *arg);
static void p_event(struct conn *c, enum conn_event ev, int status, void *arg);

/* Runs a conn_* call, marked as made by the test for the duration. */
#define IN_CALL(call) \
    do {              \
        g_in_call++;  \
        call;         \
        g_in_call--;  \
    } while (0)

static void w_write(struct conn *c, const void *d, size_t n)
{
    IN_CALL(conn_write(c, d, n));
}

static void w_writes(struct conn *c, const char *s)
{
    w_write(c, s, strlen(s));
}

static void w_flush(struct conn *c)
{
    IN_CALL(conn_flush(c));
}

static void w_close(struct conn *c)
{
    IN_CALL(conn_close(c));
}

static void w_abort(struct conn *c)
{
    IN_CALL(conn_abort(c));
}

static void w_read_start(struct conn *c)
{
    IN_CALL(conn_read_start(c));
}

static void w_read_stop(struct conn *c)
{
    IN_CALL(conn_read_stop(c));
}

static int w_start_tls(struct conn *c, struct tls_ctx *ctx, int server, const char *name)
{
    int r;

    IN_CALL(r = conn_start_tls(c, ctx, server, name));
    return r;
}

/* ---- Test case harness ------------------------------------------------- */

struct tcase;

struct peer {
    struct tcase *t;
    struct conn *c;
    struct buf in;            /* plaintext received (unless counting) */
    int ev[CONN_EV_CLOSED + 1];
    int err;                  /* status of the last CONN_EV_ERROR */
    char tls_error[256];      /* conn_tls_error() at CONN_EV_ERROR */
    int tls_started;
    int step;
    size_t in_after_tls;      /* bytes delivered after conn_start_tls */
    void (*on_data)(struct peer *p);
    void (*on_ev)(struct peer *p, enum conn_event ev, int status);
    uv_timer_t timer;         /* read pause / misc */
    /* Counting mode (large transfers): total > 0. */
    size_t total, sent, rcvd, pause_every, next_pause;
    int pauses, bad;
};

struct tcase {
    uv_loop_t loop;
    uv_tcp_t listener;
    int listening;
    struct sockaddr_in addr;
    struct peer srv, cli;
    struct tls_ctx *sctx, *cctx;
    void (*on_accept)(struct tcase *t);
    uv_timer_t watchdog;
};

static unsigned char pat(size_t i)
{
    return (unsigned char)((i * 131u + (i >> 10)) & 0xff);
}

static void on_watchdog(uv_timer_t *h)
{
    (void)h;
    fprintf(stderr, "test_tls: watchdog fired, the loop hangs\n");
    abort();
}

static void on_listener_closed(uv_handle_t *h)
{
    struct tcase *t = h->data;

    t->listening = 0;
}

static void on_connection(uv_stream_t *server, int status)
{
    struct tcase *t = server->data;

    assert_int_equal(status, 0);
    assert_null(t->srv.c);
    IN_CALL(t->srv.c = conn_accept(server, p_read, p_event, &t->srv));
    assert_non_null(t->srv.c);
    uv_close((uv_handle_t *)&t->listener, on_listener_closed);
    assert_string_equal(conn_peer_ip(t->srv.c), "127.0.0.1");
    assert_int_equal(conn_local(t->srv.c)->sa_family, AF_INET);
    assert_int_equal(((const struct sockaddr_in *)conn_local(t->srv.c))->sin_port,
                     t->addr.sin_port);
    if (t->on_accept != NULL)
        t->on_accept(t);
}

static void tcase_init(struct tcase *t, int listen)
{
    struct peer *ps[2] = {&t->srv, &t->cli};
    int len = sizeof(t->addr);

    memset(t, 0, sizeof(*t));
    assert_int_equal(uv_loop_init(&t->loop), 0);
    for (int i = 0; i < 2; i++) {
        ps[i]->t = t;
        buf_init(&ps[i]->in);
        uv_timer_init(&t->loop, &ps[i]->timer);
        ps[i]->timer.data = ps[i];
    }
    uv_timer_init(&t->loop, &t->watchdog);
    uv_timer_start(&t->watchdog, on_watchdog, 30000, 0);
    uv_unref((uv_handle_t *)&t->watchdog);
    uv_ip4_addr("127.0.0.1", 0, &t->addr);
    if (listen) {
        uv_tcp_init(&t->loop, &t->listener);
        t->listener.data = t;
        assert_int_equal(uv_tcp_bind(&t->listener, (struct sockaddr *)&t->addr, 0), 0);
        assert_int_equal(uv_listen((uv_stream_t *)&t->listener, 16, on_connection), 0);
        assert_int_equal(uv_tcp_getsockname(&t->listener, (struct sockaddr *)&t->addr, &len), 0);
        t->listening = 1;
    }
}

static void tcase_connect(struct tcase *t, unsigned timeout_ms, int bind_source)
{
    struct sockaddr_in src;

    uv_ip4_addr("127.0.0.1", 0, &src);
    IN_CALL(t->cli.c = conn_connect(&t->loop, (struct sockaddr *)&t->addr,
                                    bind_source ? (struct sockaddr *)&src : NULL, timeout_ms,
                                    p_read, p_event, &t->cli));
    assert_non_null(t->cli.c);
}

static void close_handle(uv_handle_t *h)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* Runs the loop until both conns are closed, then checks that nothing is
 * left on the loop. */
static void tcase_run(struct tcase *t)
{
    uv_run(&t->loop, UV_RUN_DEFAULT);
    assert_null(t->srv.c);
    assert_null(t->cli.c);
    if (t->listening)
        close_handle((uv_handle_t *)&t->listener);
    close_handle((uv_handle_t *)&t->srv.timer);
    close_handle((uv_handle_t *)&t->cli.timer);
    close_handle((uv_handle_t *)&t->watchdog);
    uv_run(&t->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&t->loop), 0);
}

/* Releases what the checks after tcase_run() looked at. */
static void tcase_free(struct tcase *t)
{
    buf_free(&t->srv.in);
    buf_free(&t->cli.in);
    tls_ctx_unref(t->sctx);
    tls_ctx_unref(t->cctx);
}

static int has(const struct peer *p, const char *s)
{
    return p->in.len > 0 && strstr(p->in.data, s) != NULL;
}

/* Pauses reading for 2 ms (counting mode), so that conn keeps ciphertext
 * and decrypted data across conn_read_stop()/conn_read_start(). */
static void on_resume(uv_timer_t *h)
{
    struct peer *p = h->data;

    if (p->c != NULL)
        w_read_start(p->c);
}

static void p_read(struct conn *c, const char *d, size_t n, void *arg)
{
    struct peer *p = arg;

    assert_int_equal(g_in_call, 0);
    assert_ptr_equal(c, p->c);
    assert_int_equal(p->ev[CONN_EV_CLOSED], 0);
    assert_true(n > 0);
    if (p->tls_started)
        p->in_after_tls += n;
    if (p->total > 0) {
        for (size_t i = 0; i < n; i++)
            if ((unsigned char)d[i] != pat(p->rcvd + i))
                p->bad++;
        p->rcvd += n;
        assert_true(p->rcvd <= p->total);
        if (p->pause_every > 0 && p->rcvd >= p->next_pause && p->rcvd < p->total) {
            p->next_pause = p->rcvd + p->pause_every;
            p->pauses++;
            w_read_stop(c);
            uv_timer_start(&p->timer, on_resume, 2, 0);
        }
    } else {
        buf_append(&p->in, d, n);
    }
    if (p->on_data != NULL)
        p->on_data(p);
}

/* Default reaction: close on EOF and on error. */
static void peer_default(struct peer *p, enum conn_event ev)
{
    if ((ev == CONN_EV_EOF || ev == CONN_EV_ERROR) && p->c != NULL)
        w_close(p->c);
}

static void p_event(struct conn *c, enum conn_event ev, int status, void *arg)
{
    struct peer *p = arg;

    assert_int_equal(g_in_call, 0);
    assert_ptr_equal(c, p->c);
    assert_int_equal(p->ev[CONN_EV_CLOSED], 0);
    p->ev[ev]++;
    if (ev == CONN_EV_ERROR) {
        p->err = status;
        snprintf(p->tls_error, sizeof(p->tls_error), "%s", conn_tls_error(c));
    }
    if (ev == CONN_EV_CLOSED) {
        p->c = NULL;
        uv_timer_stop(&p->timer);
    }
    if (p->on_ev != NULL)
        p->on_ev(p, ev, status);
    else
        peer_default(p, ev);
}

static void check_clean(const struct peer *p)
{
    assert_int_equal(p->ev[CONN_EV_ERROR], 0);
    assert_int_equal(p->ev[CONN_EV_CLOSED], 1);
}

/* Both sides closed once, without an error. */
static void check_both_clean(const struct tcase *t)
{
    check_clean(&t->srv);
    check_clean(&t->cli);
}

/* Both sides completed one handshake and closed once, without an error. */
static void check_tls_clean(const struct tcase *t)
{
    check_both_clean(t);
    assert_int_equal(t->srv.ev[CONN_EV_TLS_READY], 1);
    assert_int_equal(t->cli.ev[CONN_EV_TLS_READY], 1);
}

/* Connects the client (no source address, 5 s timeout) and runs the case
 * to its end. */
static void tcase_go(struct tcase *t)
{
    tcase_connect(t, 5000, 0);
    tcase_run(t);
}

/* The server context with srv.pem; with ca, client certificates issued by
 * it are required. */
static struct tls_ctx *server_ctx(const char *ca)
{
    char err[512];
    struct tls_ctx *s = tls_ctx_server(cert_path("srv.pem"), cert_path("srv.key"),
                                       ca != NULL ? cert_path(ca) : NULL, ca != NULL, err,
                                       sizeof(err));

    if (s == NULL)
        fail_msg("%s", err);
    return s;
}

static struct tls_ctx *client_ctx(const char *ca, int verify, const char *cert, const char *key)
{
    char err[512];
    struct tls_ctx *c = tls_ctx_client(ca != NULL ? cert_path(ca) : NULL, verify,
                                       cert != NULL ? cert_path(cert) : NULL,
                                       key != NULL ? cert_path(key) : NULL, err, sizeof(err));

    if (c == NULL)
        fail_msg("%s", err);
    return c;
}

/* A case with a listener and these contexts (the case releases them). */
static void tcase_init_tls(struct tcase *t, struct tls_ctx *sctx, struct tls_ctx *cctx)
{
    tcase_init(t, 1);
    t->sctx = sctx;
    t->cctx = cctx;
}

/* Once want has arrived (step 0), answers reply and flushes (step 1). */
static void reply_once(struct peer *p, const char *want, const char *reply)
{
    if (p->step == 0 && has(p, want)) {
        p->step = 1;
        w_writes(p->c, reply);
        w_flush(p->c);
    }
}

/* Once want has arrived (step 0), closes (step 1). */
static void close_once(struct peer *p, const char *want)
{
    if (p->step == 0 && has(p, want)) {
        p->step = 1;
        w_close(p->c);
    }
}

/* Implicit TLS on the server side: the handshake starts at once. */
static void tls_accept(struct tcase *t)
{
    assert_int_equal(w_start_tls(t->srv.c, t->sctx, 1, NULL), 0);
    w_read_start(t->srv.c);
    t->srv.tls_started = 1;
}

/* ---- 1: plain echo ----------------------------------------------------- */

static void echo_srv_data(struct peer *p)
{
    w_write(p->c, p->in.data + p->step, p->in.len - (size_t)p->step);
    w_flush(p->c);
    p->step = (int)p->in.len;
}

static void echo_accept(struct tcase *t)
{
    w_read_start(t->srv.c);
    assert_int_equal(conn_is_tls(t->srv.c), 0);
    assert_string_equal(conn_tls_version(t->srv.c), "");
    assert_null(conn_tls_peer_cert(t->srv.c));
}

static void echo_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_CONNECTED) {
        assert_string_equal(conn_peer_ip(p->c), "127.0.0.1");
        w_read_start(p->c);
        w_writes(p->c, "hello\r\n");
        assert_int_equal(conn_pending(p->c), 7);
        w_writes(p->c, "world\r\n");
        w_flush(p->c);
        assert_int_equal(conn_pending(p->c), 14);
        return;
    }
    if (ev == CONN_EV_DRAINED) {
        assert_int_equal(conn_pending(p->c), 0);
        return;
    }
    peer_default(p, ev);
}

static void echo_cli_data(struct peer *p)
{
    if (p->step == 0 && p->in.len >= 14) {
        assert_string_equal(p->in.data, "hello\r\nworld\r\n");
        p->step = 1;
        w_writes(p->c, "again\r\n");
        w_flush(p->c);
    } else if (p->step == 1 && p->in.len >= 21) {
        assert_string_equal(p->in.data, "hello\r\nworld\r\nagain\r\n");
        p->step = 2;
        w_close(p->c);
    }
}

static void test_plain_echo(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init(&t, 1);
    t.on_accept = echo_accept;
    t.srv.on_data = echo_srv_data;
    t.cli.on_ev = echo_cli_ev;
    t.cli.on_data = echo_cli_data;
    tcase_connect(&t, 5000, 1);
    tcase_run(&t);
    check_both_clean(&t);
    assert_int_equal(t.cli.ev[CONN_EV_CONNECTED], 1);
    assert_true(t.cli.ev[CONN_EV_DRAINED] >= 1);
    assert_int_equal(t.srv.ev[CONN_EV_EOF], 1);
    assert_int_equal(t.cli.step, 2);
    assert_string_equal(t.srv.in.data, "hello\r\nworld\r\nagain\r\n");
    tcase_free(&t);
}

/* ---- 2: STARTTLS ------------------------------------------------------- */

static void check_tls13(struct conn *c)
{
    assert_int_equal(conn_is_tls(c), 1);
    assert_string_equal(conn_tls_version(c), "TLSv1.3");
    assert_true(strlen(conn_tls_cipher(c)) > 0);
}

static void starttls_accept(struct tcase *t)
{
    struct conn *c = t->srv.c;

    w_read_start(c);
    /* Not flushed: conn_start_tls must send it in plaintext first. */
    w_writes(c, "220 go\r\n");
    assert_int_equal(w_start_tls(c, t->sctx, 1, NULL), 0);
    assert_int_equal(w_start_tls(c, t->sctx, 1, NULL), -1);
    assert_int_equal(conn_is_tls(c), 1);
    t->srv.tls_started = 1;
}

static void starttls_srv_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY) {
        check_tls13(p->c);
        assert_null(conn_tls_peer_cert(p->c));   /* no client cert asked */
        w_writes(p->c, "hello from server\r\n");
        w_flush(p->c);
        return;
    }
    if (ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void starttls_srv_data(struct peer *p)
{
    reply_once(p, "ping\r\n", "pong\r\n");
}

static void starttls_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_CONNECTED) {
        w_read_start(p->c);
        return;
    }
    if (ev == CONN_EV_TLS_READY) {
        X509 *x;

        check_tls13(p->c);
        x = conn_tls_peer_cert(p->c);
        assert_non_null(x);
        w_writes(p->c, "ping\r\n");
        w_flush(p->c);
        return;
    }
    if (ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void starttls_cli_data(struct peer *p)
{
    if (!p->tls_started) {
        if (p->in.len < 8)
            return;
        assert_int_equal(p->in.len, 8);
        assert_string_equal(p->in.data, "220 go\r\n");
        buf_reset(&p->in);
        p->tls_started = 1;
        assert_int_equal(w_start_tls(p->c, p->t->cctx, 0, "localhost"), 0);
        return;
    }
    close_once(p, "hello from server\r\npong\r\n");
}

static void test_starttls(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init_tls(&t, server_ctx(NULL), client_ctx("ca.pem", 1, NULL, NULL));
    t.on_accept = starttls_accept;
    t.srv.on_ev = starttls_srv_ev;
    t.srv.on_data = starttls_srv_data;
    t.cli.on_ev = starttls_cli_ev;
    t.cli.on_data = starttls_cli_data;
    tcase_go(&t);
    check_tls_clean(&t);
    assert_int_equal(t.srv.ev[CONN_EV_EOF], 1);
    assert_string_equal(t.srv.in.data, "ping\r\n");
    assert_string_equal(t.cli.in.data, "hello from server\r\npong\r\n");
    tcase_free(&t);
}

/* ---- 3: implicit TLS --------------------------------------------------- */

static const char *g_expect_version;

static void implicit_srv_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY) {
        assert_string_equal(conn_tls_version(p->c), g_expect_version);
        return;
    }
    if (ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void implicit_srv_data(struct peer *p)
{
    reply_once(p, "early\r\n", "ok\r\n");
}

static void implicit_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY) {
        assert_string_equal(conn_tls_version(p->c), g_expect_version);
        assert_non_null(conn_tls_peer_cert(p->c));
        return;
    }
    if (ev == CONN_EV_CONNECTED || ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void implicit_cli_data(struct peer *p)
{
    close_once(p, "ok\r\n");
}

/* The client starts TLS and writes before its connect has even completed:
 * the ClientHello waits for the connection, the data for the handshake. */
static void run_implicit(int max_version, const char *expect)
{
    struct tcase t;

    tcase_init_tls(&t, server_ctx(NULL), client_ctx("ca.pem", 1, NULL, NULL));
    g_expect_version = expect;
    if (max_version != 0)
        SSL_CTX_set_max_proto_version(tls_ctx_ssl(t.cctx), max_version);
    t.on_accept = tls_accept;
    t.srv.on_ev = implicit_srv_ev;
    t.srv.on_data = implicit_srv_data;
    t.cli.on_ev = implicit_cli_ev;
    t.cli.on_data = implicit_cli_data;
    tcase_connect(&t, 5000, 0);
    /* Certificate checked against the IP address SAN. */
    assert_int_equal(w_start_tls(t.cli.c, t.cctx, 0, "127.0.0.1"), 0);
    t.cli.tls_started = 1;
    w_read_start(t.cli.c);
    w_writes(t.cli.c, "early\r\n");
    w_flush(t.cli.c);
    assert_int_equal(conn_pending(t.cli.c), 7);
    tcase_run(&t);
    check_tls_clean(&t);
    assert_int_equal(t.cli.ev[CONN_EV_CONNECTED], 1);
    assert_string_equal(t.srv.in.data, "early\r\n");
    assert_string_equal(t.cli.in.data, "ok\r\n");
    tcase_free(&t);
}

static void test_implicit_tls13(void **state)
{
    (void)state;
    run_implicit(0, "TLSv1.3");
}

static void test_implicit_tls12(void **state)
{
    (void)state;
    run_implicit(TLS1_2_VERSION, "TLSv1.2");
}

/* ---- 4, 5: mutual TLS and name verification ---------------------------- */

static const char *g_servername;

static void mtls_srv_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY) {
        X509 *x = conn_tls_peer_cert(p->c);
        char cn[128] = "";

        if (x != NULL)
            X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn));
        snprintf(p->tls_error, sizeof(p->tls_error), "cn=%s", cn);
        w_writes(p->c, "welcome\r\n");
        w_flush(p->c);
        return;
    }
    if (ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void mtls_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_CONNECTED) {
        assert_int_equal(w_start_tls(p->c, p->t->cctx, 0, g_servername), 0);
        p->tls_started = 1;
        w_read_start(p->c);
        return;
    }
    if (ev == CONN_EV_TLS_READY || ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void mtls_cli_data(struct peer *p)
{
    close_once(p, "welcome\r\n");
}

/* Runs one handshake; ok says whether it must succeed. */
static void run_mtls(struct tls_ctx *sctx, struct tls_ctx *cctx, const char *servername, int ok,
                     const char *srv_note, const char *cli_reason)
{
    struct tcase t;

    tcase_init_tls(&t, sctx, cctx);
    g_servername = servername;
    t.on_accept = tls_accept;
    t.srv.on_ev = mtls_srv_ev;
    t.cli.on_ev = mtls_cli_ev;
    t.cli.on_data = mtls_cli_data;
    tcase_go(&t);
    assert_int_equal(t.srv.ev[CONN_EV_CLOSED], 1);
    assert_int_equal(t.cli.ev[CONN_EV_CLOSED], 1);
    if (ok) {
        check_tls_clean(&t);
        assert_string_equal(t.cli.in.data, "welcome\r\n");
        if (srv_note != NULL)
            assert_string_equal(t.srv.tls_error, srv_note);
    } else {
        /* TLS 1.3 completes the client's side before the server has
         * checked the client certificate; the server's alert then fails
         * the client's next read. The server never gets that far. */
        assert_int_equal(t.srv.ev[CONN_EV_TLS_READY], 0);
        assert_int_equal(t.srv.ev[CONN_EV_ERROR], 1);
        assert_int_equal(t.cli.ev[CONN_EV_ERROR], 1);
        assert_int_equal(t.srv.err, CONN_ERR_TLS);
        assert_int_equal(t.cli.err, CONN_ERR_TLS);
        assert_true(strlen(t.srv.tls_error) > 0);
        assert_true(strlen(t.cli.tls_error) > 0);
        if (cli_reason != NULL && strstr(t.cli.tls_error, cli_reason) == NULL)
            fail_msg("client reason \"%s\" lacks \"%s\"", t.cli.tls_error, cli_reason);
        if (srv_note != NULL && strstr(t.srv.tls_error, srv_note) == NULL)
            fail_msg("server reason \"%s\" lacks \"%s\"", t.srv.tls_error, srv_note);
        assert_null(t.cli.in.data);
    }
    tcase_free(&t);
}

static void test_mtls_good_client(void **state)
{
    (void)state;
    run_mtls(server_ctx("ca.pem"), client_ctx("ca.pem", 1, "cli.pem", "cli.key"), "localhost", 1,
             "cn=mailferry test client", NULL);
}

static void test_mtls_no_client_cert(void **state)
{
    (void)state;
    run_mtls(server_ctx("ca.pem"), client_ctx("ca.pem", 1, NULL, NULL), "localhost", 0,
             "certificate", NULL);
}

static void test_mtls_foreign_client_cert(void **state)
{
    (void)state;
    run_mtls(server_ctx("ca.pem"), client_ctx("ca.pem", 1, "cli2.pem", "cli2.key"), "localhost", 0,
             "certificate", NULL);
}

static void test_verify_wrong_servername(void **state)
{
    (void)state;
    run_mtls(server_ctx(NULL), client_ctx("ca.pem", 1, NULL, NULL), "wrong.example", 0, NULL,
             "hostname mismatch");
}

static void test_verify_unknown_ca(void **state)
{
    (void)state;
    run_mtls(server_ctx(NULL), client_ctx("ca2.pem", 1, NULL, NULL), "localhost", 0, NULL,
             "unable to get local issuer certificate");
}

/* Opportunistic TLS: verification off, any name works, and the peer's
 * certificate is not reported as verified. */
static void noverify_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    if (ev == CONN_EV_TLS_READY)
        assert_null(conn_tls_peer_cert(p->c));
    mtls_cli_ev(p, ev, status);
}

static void test_noverify_any_name(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init_tls(&t, server_ctx(NULL), client_ctx("ca2.pem", 0, NULL, NULL));
    g_servername = "wrong.example.";
    t.on_accept = tls_accept;
    t.srv.on_ev = mtls_srv_ev;
    t.cli.on_ev = noverify_cli_ev;
    t.cli.on_data = mtls_cli_data;
    tcase_go(&t);
    check_tls_clean(&t);
    assert_string_equal(t.cli.in.data, "welcome\r\n");
    tcase_free(&t);
}

/* ---- 6: large transfer ------------------------------------------------- */

/* Writes while less than 256 KB is pending; DRAINED resumes. */
static void big_pump(struct peer *p)
{
    static char chunk[65536];

    while (p->sent < p->total && conn_pending(p->c) < 262144) {
        size_t n = p->total - p->sent;

        if (n > sizeof(chunk))
            n = sizeof(chunk);
        for (size_t i = 0; i < n; i++)
            chunk[i] = (char)pat(p->sent + i);
        w_write(p->c, chunk, n);
        p->sent += n;
    }
    w_flush(p->c);
}

static void big_srv_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY || ev == CONN_EV_DRAINED) {
        if (ev == CONN_EV_DRAINED && p->sent == p->total)
            assert_int_equal(conn_pending(p->c), 0);
        big_pump(p);
        return;
    }
    if (ev == CONN_EV_EOF)
        assert_int_equal(p->rcvd, p->total);
    peer_default(p, ev);
}

static void big_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY) {
        /* All 5 MB in one write: one SSL_write pass, one big uv_write. */
        char *all = malloc(p->total);

        assert_non_null(all);
        for (size_t i = 0; i < p->total; i++)
            all[i] = (char)pat(i);
        w_write(p->c, all, p->total);
        free(all);
        assert_int_equal(conn_pending(p->c), p->total);
        w_flush(p->c);
        assert_int_equal(conn_pending(p->c), p->total);
        p->sent = p->total;
        return;
    }
    if (ev == CONN_EV_DRAINED) {
        assert_int_equal(conn_pending(p->c), 0);
        return;
    }
    mtls_cli_ev(p, ev, status);
}

static void big_cli_data(struct peer *p)
{
    if (p->rcvd == p->total && p->step == 0) {
        p->step = 1;
        w_close(p->c);
    }
}

static void test_large_transfer(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init_tls(&t, server_ctx(NULL), client_ctx("ca.pem", 1, NULL, NULL));
    g_servername = "localhost";
    t.on_accept = tls_accept;
    t.srv.on_ev = big_srv_ev;
    t.cli.on_ev = big_cli_ev;
    t.cli.on_data = big_cli_data;
    t.srv.total = t.cli.total = BIG_TOTAL;
    t.srv.pause_every = 300001;
    t.cli.pause_every = 250007;
    t.srv.next_pause = t.srv.pause_every;
    t.cli.next_pause = t.cli.pause_every;
    tcase_go(&t);
    check_tls_clean(&t);
    assert_int_equal(t.srv.rcvd, BIG_TOTAL);
    assert_int_equal(t.cli.rcvd, BIG_TOTAL);
    assert_int_equal(t.srv.sent, BIG_TOTAL);
    assert_int_equal(t.srv.bad, 0);
    assert_int_equal(t.cli.bad, 0);
    assert_true(t.srv.pauses >= 10);
    assert_true(t.cli.pauses >= 10);
    assert_int_equal(t.srv.ev[CONN_EV_EOF], 1);
    tcase_free(&t);
}

/* ---- 7: graceful close and abort --------------------------------------- */

static void close_send_all(struct peer *p)
{
    static char chunk[65536];

    for (size_t off = 0; off < CLOSE_TOTAL; off += sizeof(chunk)) {
        for (size_t i = 0; i < sizeof(chunk); i++)
            chunk[i] = (char)pat(off + i);
        w_write(p->c, chunk, sizeof(chunk));
    }
    assert_int_equal(conn_pending(p->c), CLOSE_TOTAL);
    /* No flush: conn_close sends what is pending. Twice is harmless. */
    w_close(p->c);
    w_close(p->c);
}

static void close_accept_plain(struct tcase *t)
{
    close_send_all(&t->srv);
}

static void close_accept_tls(struct tcase *t)
{
    assert_int_equal(w_start_tls(t->srv.c, t->sctx, 1, NULL), 0);
}

static void close_srv_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY) {
        close_send_all(p);
        return;
    }
    peer_default(p, ev);
}

static void close_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    if (ev == CONN_EV_EOF) {
        assert_int_equal(p->rcvd, CLOSE_TOTAL);
        assert_int_equal(p->ev[CONN_EV_EOF], 1);
    }
    if (ev == CONN_EV_CONNECTED && p->t->sctx == NULL) {
        w_read_start(p->c);
        return;
    }
    mtls_cli_ev(p, ev, status);
}

static void run_close(int tls)
{
    struct tcase t;

    if (tls) {
        tcase_init_tls(&t, server_ctx(NULL), client_ctx("ca.pem", 1, NULL, NULL));
        t.on_accept = close_accept_tls;
    } else {
        tcase_init(&t, 1);
        t.on_accept = close_accept_plain;
    }
    g_servername = "localhost";
    t.srv.on_ev = close_srv_ev;
    t.cli.on_ev = close_cli_ev;
    t.cli.total = CLOSE_TOTAL;
    t.cli.pause_every = 200003;
    t.cli.next_pause = t.cli.pause_every;
    tcase_go(&t);
    check_both_clean(&t);
    /* After conn_close only CONN_EV_CLOSED reaches the owner. */
    assert_int_equal(t.srv.ev[CONN_EV_DRAINED], 0);
    assert_int_equal(t.srv.ev[CONN_EV_EOF], 0);
    assert_int_equal(t.cli.ev[CONN_EV_EOF], 1);
    assert_int_equal(t.cli.rcvd, CLOSE_TOTAL);
    assert_int_equal(t.cli.bad, 0);
    tcase_free(&t);
}

static void test_graceful_close_plain(void **state)
{
    (void)state;
    run_close(0);
}

static void test_graceful_close_tls(void **state)
{
    (void)state;
    run_close(1);
}

/* Abort with a write in flight and more queued: one CLOSED, nothing else;
 * the server sees the end of the stream (EOF or reset). */
static void abort_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    static char chunk[65536];

    (void)status;
    if (ev == CONN_EV_CONNECTED) {
        for (int i = 0; i < 32; i++)
            w_write(p->c, chunk, sizeof(chunk));
        w_flush(p->c);
        w_write(p->c, chunk, sizeof(chunk));
        w_abort(p->c);
        w_abort(p->c);
        w_close(p->c);
    }
}

static void abort_accept(struct tcase *t)
{
    w_read_start(t->srv.c);
}

static void test_abort(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init(&t, 1);
    t.on_accept = abort_accept;
    t.cli.on_ev = abort_cli_ev;
    tcase_go(&t);
    assert_int_equal(t.cli.ev[CONN_EV_CONNECTED], 1);
    assert_int_equal(t.cli.ev[CONN_EV_DRAINED], 0);
    check_clean(&t.cli);
    assert_int_equal(t.srv.ev[CONN_EV_CLOSED], 1);
    assert_int_equal(t.srv.ev[CONN_EV_EOF] + t.srv.ev[CONN_EV_ERROR], 1);
    tcase_free(&t);
}

/* ---- 8: STARTTLS command injection ------------------------------------- */

/* Variant A: "STARTTLS-ish\r\nINJECTED" arrives in one read. The owner
 * takes its command, drops the rest of its own buffer and switches; conn
 * must not hand INJECTED over again once TLS is on. */
static void inj_srv_data(struct peer *p)
{
    if (!p->tls_started) {
        char *eol = strstr(p->in.data, "\r\n");

        if (eol == NULL)
            return;
        /* The attack: the command and the injection in one segment. */
        assert_string_equal(p->in.data, "STARTTLS-ish\r\nINJECTED");
        buf_reset(&p->in);
        p->tls_started = 1;
        w_writes(p->c, "220 go\r\n");
        assert_int_equal(w_start_tls(p->c, p->t->sctx, 1, NULL), 0);
        return;
    }
    assert_null(strstr(p->in.data, "INJECTED"));
    reply_once(p, "secure\r\n", "done\r\n");
}

static void inj_srv_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_TLS_READY || ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void inj_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_CONNECTED) {
        w_read_start(p->c);
        w_writes(p->c, "STARTTLS-ish\r\nINJECTED");
        w_flush(p->c);
        return;
    }
    if (ev == CONN_EV_TLS_READY) {
        w_writes(p->c, "secure\r\n");
        w_flush(p->c);
        return;
    }
    if (ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void inj_cli_data(struct peer *p)
{
    if (!p->tls_started) {
        if (!has(p, "\r\n"))
            return;
        assert_string_equal(p->in.data, "220 go\r\n");
        buf_reset(&p->in);
        p->tls_started = 1;
        assert_int_equal(w_start_tls(p->c, p->t->cctx, 0, "localhost"), 0);
        return;
    }
    close_once(p, "done\r\n");
}

static void test_starttls_injection_same_read(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init_tls(&t, server_ctx(NULL), client_ctx("ca.pem", 1, NULL, NULL));
    t.on_accept = abort_accept;     /* just starts reading */
    t.srv.on_data = inj_srv_data;
    t.srv.on_ev = inj_srv_ev;
    t.cli.on_ev = inj_cli_ev;
    t.cli.on_data = inj_cli_data;
    tcase_go(&t);
    check_tls_clean(&t);
    assert_string_equal(t.srv.in.data, "secure\r\n");
    assert_int_equal(t.srv.in_after_tls, strlen("secure\r\n"));
    tcase_free(&t);
}

/*
 * Variant B: the injected bytes arrive after the command, while the server
 * has stopped reading to think (as an owner waiting on a lookup would).
 * They reach conn after the switch and go to the TLS engine as a bogus
 * ClientHello: the handshake fails and nothing is delivered in plaintext.
 */
static void inj2_switch(uv_timer_t *h)
{
    struct peer *p = h->data;

    p->tls_started = 1;
    w_writes(p->c, "220 go\r\n");
    assert_int_equal(w_start_tls(p->c, p->t->sctx, 1, NULL), 0);
    w_read_start(p->c);
}

static void inj2_srv_data(struct peer *p)
{
    assert_int_equal(p->tls_started, 0);
    if (p->step == 0 && has(p, "\r\n")) {
        assert_string_equal(p->in.data, "STARTTLS-ish\r\n");
        p->step = 1;
        w_read_stop(p->c);
        w_writes(p->c, "250 wait\r\n");
        w_flush(p->c);
        uv_timer_start(&p->timer, inj2_switch, 100, 0);
    }
}

static void inj2_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_CONNECTED) {
        w_read_start(p->c);
        w_writes(p->c, "STARTTLS-ish\r\n");
        w_flush(p->c);
        return;
    }
    if (ev == CONN_EV_TLS_READY || ev == CONN_EV_DRAINED)
        return;
    peer_default(p, ev);
}

static void inj2_cli_data(struct peer *p)
{
    reply_once(p, "250 wait\r\n", "INJECTED");
    if (p->step == 1 && has(p, "220 go\r\n")) {
        p->step = 2;
        p->tls_started = 1;
        assert_int_equal(w_start_tls(p->c, p->t->cctx, 0, "localhost"), 0);
    }
}

static void test_starttls_injection_later_read(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init_tls(&t, server_ctx(NULL), client_ctx("ca.pem", 1, NULL, NULL));
    t.on_accept = abort_accept;
    t.srv.on_data = inj2_srv_data;
    t.cli.on_ev = inj2_cli_ev;
    t.cli.on_data = inj2_cli_data;
    tcase_go(&t);
    assert_int_equal(t.srv.in_after_tls, 0);
    assert_string_equal(t.srv.in.data, "STARTTLS-ish\r\n");
    assert_int_equal(t.srv.ev[CONN_EV_TLS_READY], 0);
    assert_int_equal(t.srv.ev[CONN_EV_ERROR], 1);
    assert_int_equal(t.srv.err, CONN_ERR_TLS);
    assert_int_equal(t.srv.ev[CONN_EV_CLOSED], 1);
    assert_int_equal(t.cli.ev[CONN_EV_ERROR], 1);
    assert_int_equal(t.cli.ev[CONN_EV_TLS_READY], 0);
    assert_int_equal(t.cli.ev[CONN_EV_CLOSED], 1);
    tcase_free(&t);
}

/* ---- Connect failures -------------------------------------------------- */

/* A port nobody listens on: bind one, note it, close it. */
static void closed_port(struct tcase *t)
{
    uv_tcp_t tmp;
    int len = sizeof(t->addr);

    uv_tcp_init(&t->loop, &tmp);
    assert_int_equal(uv_tcp_bind(&tmp, (struct sockaddr *)&t->addr, 0), 0);
    assert_int_equal(uv_tcp_getsockname(&tmp, (struct sockaddr *)&t->addr, &len), 0);
    uv_close((uv_handle_t *)&tmp, NULL);
    uv_run(&t->loop, UV_RUN_DEFAULT);
}

static void test_connect_refused(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init(&t, 0);
    closed_port(&t);
    tcase_connect(&t, 5000, 0);
    assert_string_equal(conn_peer_ip(t.cli.c), "127.0.0.1");
    tcase_run(&t);
    assert_int_equal(t.cli.ev[CONN_EV_CONNECTED], 0);
    assert_int_equal(t.cli.ev[CONN_EV_ERROR], 1);
    assert_int_equal(t.cli.err, UV_ECONNREFUSED);
    assert_int_equal(t.cli.ev[CONN_EV_CLOSED], 1);
    tcase_free(&t);
}

/* Aborting or closing a connect in progress, from the owner's own code:
 * CONN_EV_CLOSED comes later, from the loop, and alone. */
static void run_connect_cancel(int graceful)
{
    struct tcase t;

    tcase_init(&t, 0);
    closed_port(&t);
    tcase_connect(&t, 5000, 0);
    if (graceful)
        w_close(t.cli.c);
    else
        w_abort(t.cli.c);
    assert_int_equal(t.cli.ev[CONN_EV_CLOSED], 0);
    tcase_run(&t);
    assert_int_equal(t.cli.ev[CONN_EV_CONNECTED], 0);
    assert_int_equal(t.cli.ev[CONN_EV_ERROR], 0);
    assert_int_equal(t.cli.ev[CONN_EV_CLOSED], 1);
    tcase_free(&t);
}

static void test_connect_abort(void **state)
{
    (void)state;
    run_connect_cancel(0);
}

static void test_connect_close(void **state)
{
    (void)state;
    run_connect_cancel(1);
}

/* A source address that cannot be bound fails through the event queue. */
static void test_connect_bad_source(void **state)
{
    struct tcase t;
    struct sockaddr_in src;

    (void)state;
    tcase_init(&t, 0);
    closed_port(&t);
    uv_ip4_addr("192.0.2.1", 0, &src);   /* TEST-NET-1, not local */
    IN_CALL(t.cli.c = conn_connect(&t.loop, (struct sockaddr *)&t.addr, (struct sockaddr *)&src,
                                   0, p_read, p_event, &t.cli));
    tcase_run(&t);
    assert_int_equal(t.cli.ev[CONN_EV_ERROR], 1);
    assert_int_equal(t.cli.err, UV_EADDRNOTAVAIL);
    assert_int_equal(t.cli.ev[CONN_EV_CLOSED], 1);
    tcase_free(&t);
}

/*
 * A connect that gets no answer: a listener with a full accept queue
 * (backlog 0 and one connection waiting) makes Linux drop further SYNs.
 */
static void test_connect_timeout(void **state)
{
    struct tcase t;
    int lfd, filler;
    socklen_t alen = sizeof(t.addr);
    uint64_t t0;

    (void)state;
    tcase_init(&t, 0);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(lfd >= 0);
    assert_int_equal(bind(lfd, (struct sockaddr *)&t.addr, sizeof(t.addr)), 0);
    assert_int_equal(listen(lfd, 0), 0);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&t.addr, &alen), 0);
    filler = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(connect(filler, (struct sockaddr *)&t.addr, sizeof(t.addr)), 0);
    t0 = uv_now(&t.loop);
    tcase_connect(&t, 200, 0);
    tcase_run(&t);
    assert_true(uv_now(&t.loop) - t0 >= 190);
    assert_int_equal(t.cli.ev[CONN_EV_CONNECTED], 0);
    assert_int_equal(t.cli.ev[CONN_EV_ERROR], 1);
    assert_int_equal(t.cli.err, UV_ETIMEDOUT);
    assert_int_equal(t.cli.ev[CONN_EV_CLOSED], 1);
    close(filler);
    close(lfd);
    tcase_free(&t);
}

/*
 * A graceful close whose peer never closes its side gives up after about
 * 5 s: the server closes, the client ignores the EOF and only closes once
 * the server's CONN_EV_CLOSED has come.
 */
static uint64_t g_close_started;

static void stuck_accept(struct tcase *t)
{
    w_writes(t->srv.c, "221 bye\r\n");
    g_close_started = uv_now(&t->loop);
    w_close(t->srv.c);
}

static void stuck_srv_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_CLOSED) {
        uint64_t waited = uv_now(&p->t->loop) - g_close_started;

        assert_true(waited >= 4900 && waited < 7000);
        assert_non_null(p->t->cli.c);
        w_close(p->t->cli.c);
    }
}

static void stuck_cli_ev(struct peer *p, enum conn_event ev, int status)
{
    (void)status;
    if (ev == CONN_EV_CONNECTED)
        w_read_start(p->c);
}

static void test_close_timeout(void **state)
{
    struct tcase t;

    (void)state;
    tcase_init(&t, 1);
    t.on_accept = stuck_accept;
    t.srv.on_ev = stuck_srv_ev;
    t.cli.on_ev = stuck_cli_ev;
    tcase_go(&t);
    check_both_clean(&t);
    assert_int_equal(t.cli.ev[CONN_EV_EOF], 1);
    assert_string_equal(t.cli.in.data, "221 bye\r\n");
    tcase_free(&t);
}

/* ---- Contexts ---------------------------------------------------------- */

static void test_ctx_errors(void **state)
{
    char err[512];
    struct tls_ctx *t;

    (void)state;
    t = tls_ctx_server(cert_path("missing.pem"), cert_path("srv.key"), NULL, 0, err, sizeof(err));
    assert_null(t);
    assert_non_null(strstr(err, "missing.pem"));
    assert_non_null(strstr(err, "No such file"));

    t = tls_ctx_server(cert_path("srv.pem"), cert_path("cli.key"), NULL, 0, err, sizeof(err));
    assert_null(t);
    assert_non_null(strstr(err, "cli.key"));
    assert_non_null(strstr(err, "mismatch"));

    t = tls_ctx_server(cert_path("srv.pem"), cert_path("srv.key"), cert_path("nope.pem"), 1,
                       err, sizeof(err));
    assert_null(t);
    assert_non_null(strstr(err, "nope.pem"));

    t = tls_ctx_client(cert_path("srv.key"), 1, NULL, NULL, err, sizeof(err));
    assert_null(t);
    assert_non_null(strstr(err, "srv.key"));

    t = tls_ctx_client(NULL, 1, NULL, cert_path("cli.key"), err, sizeof(err));
    assert_null(t);

    t = tls_ctx_client(NULL, 1, NULL, NULL, err, sizeof(err));
    assert_non_null(t);
    assert_ptr_equal(tls_ctx_ref(t), t);
    tls_ctx_unref(t);
    assert_non_null(tls_ctx_ssl(t));
    assert_int_equal(SSL_CTX_get_min_proto_version(tls_ctx_ssl(t)), TLS1_2_VERSION);
    tls_ctx_unref(t);
    tls_ctx_unref(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ctx_errors),
        cmocka_unit_test(test_plain_echo),
        cmocka_unit_test(test_starttls),
        cmocka_unit_test(test_implicit_tls13),
        cmocka_unit_test(test_implicit_tls12),
        cmocka_unit_test(test_mtls_good_client),
        cmocka_unit_test(test_mtls_no_client_cert),
        cmocka_unit_test(test_mtls_foreign_client_cert),
        cmocka_unit_test(test_verify_wrong_servername),
        cmocka_unit_test(test_verify_unknown_ca),
        cmocka_unit_test(test_noverify_any_name),
        cmocka_unit_test(test_large_transfer),
        cmocka_unit_test(test_graceful_close_plain),
        cmocka_unit_test(test_graceful_close_tls),
        cmocka_unit_test(test_abort),
        cmocka_unit_test(test_starttls_injection_same_read),
        cmocka_unit_test(test_starttls_injection_later_read),
        cmocka_unit_test(test_connect_refused),
        cmocka_unit_test(test_connect_abort),
        cmocka_unit_test(test_connect_close),
        cmocka_unit_test(test_connect_bad_source),
        cmocka_unit_test(test_connect_timeout),
        cmocka_unit_test(test_close_timeout),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
