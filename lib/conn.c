/*
 * conn: a byte stream over a libuv TCP handle, with an optional TLS layer.
 *
 * Layers. A conn is either plain (bytes go straight between the socket and
 * the owner) or TLS. The TLS layer drives OpenSSL through an in-memory BIO
 * of our own (conn_bio_method) instead of a socket BIO: ciphertext read from
 * the socket is offered to OpenSSL from the read buffer itself (and, when
 * the owner paused reading half way through it, from the small leftover
 * buffer rpend), and every byte OpenSSL writes is appended to the outgoing
 * wire buffer. Compared with a pair of BIO_s_mem this copies nothing extra
 * and, more importantly, holds no memory while a connection is idle: a
 * BIO_s_mem keeps its largest buffer until it is freed, which for thousands
 * of idle sessions adds up to hundreds of megabytes.
 *
 * Output. conn_write() appends plaintext to "out". conn_flush() moves it to
 * "wire" (through SSL_write when TLS is on) and starts a uv_write of the
 * wire buffer when none is in flight; the buffer of the write in flight is
 * "inflight" and stays untouched until the write callback, while new output
 * collects in "wire". Buffers are freed whenever they become empty, so an
 * idle conn owns no I/O memory; read buffers are allocated per read in the
 * alloc callback and freed after the read callback. CONN_EV_DRAINED comes
 * from the write callback once everything the owner wrote has reached the
 * kernel (nothing in flight, in wire, or written but not yet flushed), and
 * only if owner data was flushed since the last one: handshake traffic
 * alone does not produce it. conn_pending() counts plaintext bytes, also
 * while they travel as ciphertext.
 *
 * Callbacks. The owner is called only from libuv callbacks (read, write,
 * connect, shutdown, timer, idle, close), never from inside a conn_* call.
 * Anything that an owner's call discovers (a failed uv_write, a TLS error,
 * buffered TLS plaintext after conn_read_start()) is queued in c->defer and
 * delivered from a uv_idle callback on the next loop iteration. Errors are
 * reported once (the first one), always through that queue. After
 * conn_close() or conn_abort() the only event delivered is CONN_EV_CLOSED.
 *
 * Teardown. conn_abort() closes the three handles at once. conn_close()
 * first flushes the output, sends a TLS close_notify when TLS is up, then
 * half-closes with uv_shutdown and keeps reading (and discarding) until the
 * peer's EOF before closing: closing a socket with unread input makes the
 * kernel send RST, which can destroy the reply the peer has not read yet
 * (the "lingering close" of Apache and nginx). A 5 s timer bounds the whole
 * graceful close. The conn is freed after the last close callback, right
 * after CONN_EV_CLOSED.
 */
#include "lib/conn.h"

#include <arpa/inet.h>
#include <assert.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

#define CONN_READ_SIZE 65536       /* socket read buffer, per read */
#define CONN_PLAIN_SIZE 32768      /* decrypted bytes per delivery */
#define CONN_SSL_WRITE_MAX (1 << 20)
#define CONN_CLOSE_TIMEOUT_MS 5000

/* Work queued for the idle callback (see "Callbacks" above). */
enum { CONN_DEFER_ERROR = 1, CONN_DEFER_PUMP = 2 };

/* An IPv4 or IPv6 socket address; smaller than sockaddr_storage. */
union conn_addr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;      /* connect timeout, then graceful close timeout */
    uv_idle_t idle;        /* deferred events */
    uv_write_t wreq;
    uv_connect_t creq;
    uv_shutdown_t sreq;

    conn_read_cb on_read;
    conn_event_cb on_event;
    void *arg;

    union conn_addr peer;
    union conn_addr local;
    char peer_ip[INET6_ADDRSTRLEN];

    struct buf out;        /* plaintext written, not flushed */
    struct buf wire;       /* bytes ready for the socket (ciphertext under TLS) */
    struct buf inflight;   /* bytes of the uv_write in flight */
    size_t wire_plain;     /* plaintext bytes that wire stands for */
    size_t inflight_plain; /* plaintext bytes that inflight stands for */

    SSL *ssl;
    const char *rin;       /* ciphertext of the current read, not yet consumed */
    size_t rin_len;
    struct buf rpend;      /* ciphertext kept while the owner does not read */
    size_t rpend_off;
    char *tls_error;       /* reason of a TLS failure, for conn_tls_error() */

    int defer;             /* CONN_DEFER_* */
    int defer_status;      /* status of a deferred CONN_EV_ERROR */
    int close_refs;        /* handles whose close callback is pending */

    unsigned connected : 1;     /* accepted, or connect succeeded */
    unsigned owner_reading : 1; /* between conn_read_start and conn_read_stop */
    unsigned sock_reading : 1;  /* uv_read_start is in effect */
    unsigned writing : 1;       /* wreq in flight */
    unsigned flush_req : 1;     /* flush waits for the TLS handshake */
    unsigned drain_wanted : 1;  /* owner data flushed since the last DRAINED */
    unsigned sock_dead : 1;     /* socket error, connect failure or timeout */
    unsigned got_eof : 1;       /* socket EOF seen */
    unsigned eof_reported : 1;  /* CONN_EV_EOF delivered */
    unsigned err_latched : 1;   /* CONN_EV_ERROR queued or delivered */
    unsigned tls_on : 1;        /* conn_start_tls was called */
    unsigned hs_done : 1;       /* TLS handshake complete */
    unsigned tls_failed : 1;    /* fatal TLS error */
    unsigned tls_eof : 1;       /* close_notify received */
    unsigned notify_sent : 1;   /* our close_notify is queued */
    unsigned closing : 1;       /* conn_close or conn_abort called */
    unsigned shut_started : 1;  /* uv_shutdown issued */
    unsigned shut_done : 1;     /* uv_shutdown completed */
    unsigned handles_closed : 1; /* uv_close issued on all handles */
    unsigned silent : 1;        /* failed accept: no CONN_EV_CLOSED */
};

static void conn_update_reading(struct conn *c);
static void conn_close_step(struct conn *c);

/* ---- The memory BIO ---------------------------------------------------- */

static BIO_METHOD *conn_bio_method;
static pthread_once_t conn_bio_once = PTHREAD_ONCE_INIT;
static int conn_trim_ok;   /* SSL_free_buffers is safe in this OpenSSL */

/* OpenSSL's output (handshake messages, records, alerts) goes to wire. The
 * write never blocks; the owner bounds it through conn_pending(). */
static int conn_bio_write(BIO *b, const char *data, int len)
{
    struct conn *c = BIO_get_data(b);

    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    buf_append(&c->wire, data, (size_t)len);
    return len;
}

/* OpenSSL's input: leftover ciphertext first, then the current read. An
 * empty source is "retry later", never EOF: the socket's EOF is handled by
 * conn itself. */
static int conn_bio_read(BIO *b, char *dst, int len)
{
    struct conn *c = BIO_get_data(b);
    size_t want, n, done = 0;

    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    want = (size_t)len;
    if (c->rpend.len > c->rpend_off) {
        n = c->rpend.len - c->rpend_off;
        if (n > want)
            n = want;
        memcpy(dst, c->rpend.data + c->rpend_off, n);
        c->rpend_off += n;
        done = n;
        if (c->rpend_off == c->rpend.len) {
            buf_free(&c->rpend);
            c->rpend_off = 0;
        }
    }
    if (done < want && c->rin_len > 0) {
        n = c->rin_len;
        if (n > want - done)
            n = want - done;
        memcpy(dst + done, c->rin, n);
        c->rin += n;
        c->rin_len -= n;
        done += n;
    }
    if (done == 0) {
        BIO_set_retry_read(b);
        return -1;
    }
    return (int)done;
}

static long conn_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct conn *c = BIO_get_data(b);

    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_PENDING:
        return c == NULL ? 0 : (long)(c->rpend.len - c->rpend_off + c->rin_len);
    default:
        return 0;
    }
}

static int conn_bio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

/*
 * SSL_free_buffers() could free a buffer still in use before the fix for
 * CVE-2024-4741 (3.0.14, 3.1.6, 3.2.2, 3.3.1); with an older library
 * conn relies on SSL_MODE_RELEASE_BUFFERS alone.
 */
static int conn_free_buffers_safe(unsigned long v)
{
    unsigned long mm = v >> 20;   /* 0xMNN: major, minor */

    if (mm == 0x300)
        return v >= 0x300000e0UL;
    if (mm == 0x301)
        return v >= 0x30100060UL;
    if (mm == 0x302)
        return v >= 0x30200020UL;
    if (mm == 0x303)
        return v >= 0x30300010UL;
    return v >= 0x30400000UL;
}

static void conn_bio_init(void)
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "mailferry conn");

    if (m == NULL || BIO_meth_set_write(m, conn_bio_write) != 1 ||
        BIO_meth_set_read(m, conn_bio_read) != 1 ||
        BIO_meth_set_ctrl(m, conn_bio_ctrl) != 1 ||
        BIO_meth_set_create(m, conn_bio_create) != 1)
        log_fatal("event=tls_init reason=\"cannot create the conn BIO method\"");
    conn_bio_method = m;
    conn_trim_ok = conn_free_buffers_safe(OpenSSL_version_num());
}

/*
 * Gives the session's 16 KB record buffers back when nothing is in them.
 * SSL_MODE_RELEASE_BUFFERS alone releases them only after application
 * data; a buffer used for post-handshake messages (the server's TLS 1.3
 * NewSessionTicket, the handshake's last flight) would otherwise stay with
 * every idle session. SSL_free_buffers() refuses when a buffer holds data.
 */
static void conn_tls_trim(struct conn *c)
{
    if (c->ssl != NULL && conn_trim_ok)
        SSL_free_buffers(c->ssl);
}

/* ---- Events ------------------------------------------------------------ */

/* Delivers an event unless the owner has started the teardown. Returns -1
 * when the conn is closing afterwards, so the caller stops. */
static int conn_emit(struct conn *c, enum conn_event ev, int status)
{
    if (c->closing)
        return -1;
    c->on_event(c, ev, status, c->arg);
    return c->closing ? -1 : 0;
}

static void conn_deliver(struct conn *c, const char *data, size_t len)
{
    if (!c->closing && len > 0)
        c->on_read(c, data, len, c->arg);
}

static void conn_on_idle(uv_idle_t *h);

static void conn_defer(struct conn *c, int what)
{
    if (c->handles_closed)
        return;
    c->defer |= what;
    uv_idle_start(&c->idle, conn_on_idle);
}

/* Queues CONN_EV_ERROR; only the first error of a conn is reported. */
static void conn_fail(struct conn *c, int status)
{
    if (c->err_latched || c->closing)
        return;
    c->err_latched = 1;
    c->defer_status = status;
    conn_defer(c, CONN_DEFER_ERROR);
}

/* ---- Output ------------------------------------------------------------ */

static void conn_on_write(uv_write_t *req, int status);

/* Starts a uv_write of everything in wire unless one is in flight. Data is
 * only handed to libuv once connected, so a client can write (and start TLS)
 * while its connect is pending. */
static void conn_kick_write(struct conn *c)
{
    uv_buf_t b;
    struct buf tmp;
    int r;

    if (c->handles_closed || c->writing || c->wire.len == 0)
        return;
    if (c->sock_dead) {
        buf_free(&c->wire);
        c->wire_plain = 0;
        return;
    }
    if (!c->connected)
        return;
    assert(c->inflight.len == 0);
    assert(c->wire.len <= UINT_MAX);
    tmp = c->inflight;
    c->inflight = c->wire;
    c->wire = tmp;
    c->inflight_plain = c->wire_plain;
    c->wire_plain = 0;
    b = uv_buf_init(c->inflight.data, (unsigned int)c->inflight.len);
    r = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, conn_on_write);
    if (r < 0) {
        buf_free(&c->inflight);
        c->inflight_plain = 0;
        c->sock_dead = 1;
        conn_update_reading(c);
        conn_fail(c, r);
        return;
    }
    c->writing = 1;
}

static void conn_tls_fail(struct conn *c, int sslerr, const char *what);

/* Moves the owner's plaintext towards the socket: as is, or through
 * SSL_write once the handshake is complete. Before that it waits (flush_req)
 * and goes out right after the handshake. */
static void conn_push_out(struct conn *c)
{
    size_t len = c->out.len;

    if (len == 0)
        return;
    if (c->sock_dead || c->tls_failed) {
        buf_free(&c->out);
        return;
    }
    if (c->tls_on) {
        size_t off = 0;

        if (!c->hs_done) {
            c->flush_req = 1;
            return;
        }
        while (off < len) {
            size_t chunk = len - off;
            int n;

            if (chunk > CONN_SSL_WRITE_MAX)
                chunk = CONN_SSL_WRITE_MAX;
            ERR_clear_error();
            n = SSL_write(c->ssl, c->out.data + off, (int)chunk);
            if (n <= 0) {
                buf_free(&c->out);
                conn_tls_fail(c, SSL_get_error(c->ssl, n), "write");
                return;
            }
            off += (size_t)n;
        }
        buf_free(&c->out);
        conn_tls_trim(c);
    } else if (c->wire.len == 0) {
        struct buf tmp = c->wire;

        c->wire = c->out;
        c->out = tmp;
    } else {
        buf_append(&c->wire, c->out.data, len);
        buf_free(&c->out);
    }
    c->wire_plain += len;
    c->drain_wanted = 1;
    conn_kick_write(c);
}

static void conn_on_write(uv_write_t *req, int status)
{
    struct conn *c = req->data;

    c->writing = 0;
    c->inflight_plain = 0;
    buf_free(&c->inflight);
    if (c->handles_closed)
        return;
    if (status < 0) {
        c->sock_dead = 1;
        buf_free(&c->wire);
        buf_free(&c->out);
        c->wire_plain = 0;
        conn_update_reading(c);
        if (c->closing)
            conn_close_step(c);
        else
            conn_fail(c, status);
        return;
    }
    conn_kick_write(c);
    if (c->closing) {
        conn_close_step(c);
        return;
    }
    if (c->drain_wanted && !c->writing && c->wire.len == 0 && c->out.len == 0) {
        c->drain_wanted = 0;
        conn_emit(c, CONN_EV_DRAINED, 0);
    }
}

/* ---- TLS --------------------------------------------------------------- */

/*
 * Records a fatal TLS error: the reason (OpenSSL's oldest queued error,
 * plus the certificate verification result when that failed) is logged and
 * kept for conn_tls_error(); the alert OpenSSL produced is sent; reading
 * stops; CONN_EV_ERROR with CONN_ERR_TLS is queued.
 */
static void conn_tls_fail(struct conn *c, int sslerr, const char *what)
{
    char reason[256], text[384], quoted[400];
    unsigned long e = ERR_get_error();
    long vr = X509_V_OK;

    if (c->tls_failed)
        return;
    c->tls_failed = 1;
    if (c->ssl != NULL && (SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER))
        vr = SSL_get_verify_result(c->ssl);
    if (e != 0)
        ERR_error_string_n(e, reason, sizeof(reason));
    else if (sslerr == SSL_ERROR_SYSCALL)
        snprintf(reason, sizeof(reason), "connection closed by peer");
    else
        snprintf(reason, sizeof(reason), "%s", what);
    ERR_clear_error();
    if (vr != X509_V_OK)
        snprintf(text, sizeof(text), "%s (certificate: %s)", reason,
                 X509_verify_cert_error_string(vr));
    else
        snprintf(text, sizeof(text), "%s", reason);
    free(c->tls_error);
    c->tls_error = xstrdup(text);
    log_info("event=tls_failed peer=%s stage=%s reason=%s", c->peer_ip,
             c->hs_done ? "record" : "handshake",
             log_quote(quoted, sizeof(quoted), text, strlen(text)));
    buf_free(&c->out);
    c->flush_req = 0;
    conn_kick_write(c);
    conn_update_reading(c);
    conn_fail(c, CONN_ERR_TLS);
}

/*
 * Runs the TLS engine over the ciphertext available to the BIO: advances
 * the handshake (CONN_EV_TLS_READY on completion, then the output that was
 * flushed meanwhile goes out) and decrypts records for the owner while it
 * reads. Post-handshake messages (TLS 1.3 NewSessionTicket, KeyUpdate) are
 * consumed inside SSL_read, which then reports WANT_READ without data; any
 * reply they need lands in wire and is sent at the end.
 */
static void conn_tls_drive(struct conn *c)
{
    char *pbuf = NULL;
    size_t plen = 0;
    int n, e;

    if (!c->hs_done) {
        ERR_clear_error();
        n = SSL_do_handshake(c->ssl);
        if (n != 1) {
            e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                conn_kick_write(c);
            else
                conn_tls_fail(c, e, "handshake failed");
            return;
        }
        c->hs_done = 1;
        conn_kick_write(c);
        log_debug("event=tls_established peer=%s version=%s cipher=%s", c->peer_ip,
                  SSL_get_version(c->ssl), SSL_get_cipher_name(c->ssl));
        if (c->flush_req) {
            c->flush_req = 0;
            conn_push_out(c);
        }
        if (conn_emit(c, CONN_EV_TLS_READY, 0) < 0)
            return;
    }
    while (c->owner_reading && !c->closing && !c->tls_failed && !c->tls_eof) {
        /* With nothing buffered and no ciphertext left, SSL_read would only
         * say WANT_READ, but it would first allocate a fresh 16 KB record
         * buffer that SSL_MODE_RELEASE_BUFFERS had just released; an idle
         * session would keep it. So stop here. */
        if (!SSL_has_pending(c->ssl) && c->rin_len == 0 && c->rpend.len == c->rpend_off)
            break;
        if (pbuf == NULL)
            pbuf = xmalloc(CONN_PLAIN_SIZE);
        ERR_clear_error();
        n = SSL_read(c->ssl, pbuf + plen, (int)(CONN_PLAIN_SIZE - plen));
        if (n > 0) {
            plen += (size_t)n;
            if (plen == CONN_PLAIN_SIZE) {
                conn_deliver(c, pbuf, plen);
                plen = 0;
            }
            continue;
        }
        e = SSL_get_error(c->ssl, n);
        if (plen > 0) {
            conn_deliver(c, pbuf, plen);
            plen = 0;
            if (c->closing)
                break;
        }
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            break;
        if (e == SSL_ERROR_ZERO_RETURN) {
            /* close_notify (RFC 8446 section 6.1): the peer sends no more. */
            c->tls_eof = 1;
            if (!c->eof_reported) {
                c->eof_reported = 1;
                conn_emit(c, CONN_EV_EOF, 0);
            }
            break;
        }
        conn_tls_fail(c, e, "record layer failure");
        break;
    }
    if (plen > 0)
        conn_deliver(c, pbuf, plen);
    free(pbuf);
    conn_kick_write(c);
    conn_tls_trim(c);
}

/* ---- Input ------------------------------------------------------------- */

static void conn_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)h;
    (void)suggested;
    b->base = xmalloc(CONN_READ_SIZE);
    b->len = CONN_READ_SIZE;
}

/* Hands newly read bytes to the active layer. Under TLS, ciphertext the
 * engine did not take (the owner paused reading) is kept in rpend. */
static void conn_process(struct conn *c, const char *data, size_t len)
{
    if (!c->tls_on) {
        conn_deliver(c, data, len);
        return;
    }
    c->rin = data;
    c->rin_len = len;
    conn_tls_drive(c);
    if (c->rin_len > 0 && !c->tls_failed && !c->closing)
        buf_append(&c->rpend, c->rin, c->rin_len);
    c->rin = NULL;
    c->rin_len = 0;
}

static void conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct conn *c = s->data;

    if (nread > 0) {
        if (!c->closing && !c->sock_dead && !c->tls_failed && !c->tls_eof)
            conn_process(c, b->base, (size_t)nread);
    } else if (nread < 0) {
        uv_read_stop(s);
        c->sock_reading = 0;
        if (nread == UV_EOF)
            c->got_eof = 1;
        else
            c->sock_dead = 1;
        if (c->closing) {
            /* A graceful close waits for this EOF (or gives up on error). */
            conn_close_step(c);
        } else if (nread != UV_EOF) {
            conn_fail(c, (int)nread);
        } else if (c->tls_on && !c->hs_done && !c->tls_failed) {
            conn_tls_fail(c, SSL_ERROR_SYSCALL, "connection closed during handshake");
        } else if (!c->eof_reported) {
            c->eof_reported = 1;
            conn_emit(c, CONN_EV_EOF, 0);
        }
    }
    free(b->base);
    conn_update_reading(c);
}

/* Decides whether the socket is read: during a TLS handshake always (its
 * progress does not depend on the owner), while closing always (to see the
 * peer's EOF), otherwise when the owner reads. */
static void conn_update_reading(struct conn *c)
{
    int want, r;

    if (c->handles_closed)
        return;
    if (!c->connected || c->sock_dead || c->got_eof)
        want = 0;
    else if (c->closing)
        want = 1;
    else if (c->tls_failed || c->tls_eof)
        want = 0;
    else if (c->tls_on && !c->hs_done)
        want = 1;
    else
        want = c->owner_reading;

    if (want && !c->sock_reading) {
        r = uv_read_start((uv_stream_t *)&c->tcp, conn_on_alloc, conn_on_read);
        if (r < 0) {
            c->sock_dead = 1;
            conn_fail(c, r);
            return;
        }
        c->sock_reading = 1;
    } else if (!want && c->sock_reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->sock_reading = 0;
    }
}

static void conn_on_idle(uv_idle_t *h)
{
    struct conn *c = h->data;
    int what = c->defer;

    uv_idle_stop(h);
    c->defer = 0;
    if (c->closing)
        return;
    if (what & CONN_DEFER_ERROR) {
        conn_emit(c, CONN_EV_ERROR, c->defer_status);
        return;
    }
    if ((what & CONN_DEFER_PUMP) && c->owner_reading && c->hs_done &&
        !c->tls_failed && !c->tls_eof) {
        conn_tls_drive(c);
        conn_update_reading(c);
    }
}

/* ---- Setup ------------------------------------------------------------- */

static struct conn *conn_new(uv_loop_t *loop, conn_read_cb on_read,
                             conn_event_cb on_event, void *arg)
{
    struct conn *c = xcalloc(1, sizeof(*c));

    uv_tcp_init(loop, &c->tcp);
    uv_timer_init(loop, &c->timer);
    uv_idle_init(loop, &c->idle);
    c->tcp.data = c;
    c->timer.data = c;
    c->idle.data = c;
    c->wreq.data = c;
    c->creq.data = c;
    c->sreq.data = c;
    c->on_read = on_read;
    c->on_event = on_event;
    c->arg = arg;
    buf_init(&c->out);
    buf_init(&c->wire);
    buf_init(&c->inflight);
    buf_init(&c->rpend);
    return c;
}

/* The textual peer address. An IPv4 peer on a dual-stack IPv6 socket shows
 * as "::ffff:192.0.2.1": the address is kept as the kernel reports it, and
 * callers matching networks must handle the mapped form. */
static void conn_set_peer_ip(struct conn *c)
{
    c->peer_ip[0] = '\0';
    if (c->peer.sa.sa_family == AF_INET)
        uv_ip4_name(&c->peer.in, c->peer_ip, sizeof(c->peer_ip));
    else if (c->peer.sa.sa_family == AF_INET6)
        uv_ip6_name(&c->peer.in6, c->peer_ip, sizeof(c->peer_ip));
}

static void conn_fill_addrs(struct conn *c)
{
    int len = (int)sizeof(c->peer);

    if (uv_tcp_getpeername(&c->tcp, &c->peer.sa, &len) == 0)
        conn_set_peer_ip(c);
    len = (int)sizeof(c->local);
    if (uv_tcp_getsockname(&c->tcp, &c->local.sa, &len) != 0)
        memset(&c->local, 0, sizeof(c->local));
    uv_tcp_nodelay(&c->tcp, 1);
}

static void conn_close_now(struct conn *c);

struct conn *conn_accept(uv_stream_t *server, conn_read_cb on_read,
                         conn_event_cb on_event, void *arg)
{
    struct conn *c = conn_new(server->loop, on_read, on_event, arg);

    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        c->silent = 1;
        c->closing = 1;
        conn_close_now(c);
        return NULL;
    }
    c->connected = 1;
    conn_fill_addrs(c);
    return c;
}

static void conn_on_timer(uv_timer_t *t);

static void conn_on_connect(uv_connect_t *req, int status)
{
    struct conn *c = req->data;

    if (c->handles_closed || c->sock_dead)
        return;            /* aborted, or the connect timeout fired */
    uv_timer_stop(&c->timer);
    if (status < 0) {
        c->sock_dead = 1;
        conn_fail(c, status);
        return;
    }
    c->connected = 1;
    conn_fill_addrs(c);
    conn_kick_write(c);
    conn_update_reading(c);
    conn_emit(c, CONN_EV_CONNECTED, 0);
}

static socklen_t conn_addrlen(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return sizeof(struct sockaddr_in);
    if (sa->sa_family == AF_INET6)
        return sizeof(struct sockaddr_in6);
    return 0;
}

struct conn *conn_connect(uv_loop_t *loop, const struct sockaddr *addr,
                          const struct sockaddr *source, unsigned connect_timeout_ms,
                          conn_read_cb on_read, conn_event_cb on_event, void *arg)
{
    struct conn *c = conn_new(loop, on_read, on_event, arg);
    socklen_t len = conn_addrlen(addr);
    int r;

    if (len == 0) {
        c->sock_dead = 1;
        conn_fail(c, UV_EAFNOSUPPORT);
        return c;
    }
    memcpy(&c->peer, addr, len);
    conn_set_peer_ip(c);
    if (source != NULL) {
        r = uv_tcp_bind(&c->tcp, source, 0);
        if (r < 0) {
            c->sock_dead = 1;
            conn_fail(c, r);
            return c;
        }
    }
    r = uv_tcp_connect(&c->creq, &c->tcp, addr, conn_on_connect);
    if (r < 0) {
        c->sock_dead = 1;
        conn_fail(c, r);
        return c;
    }
    if (connect_timeout_ms > 0)
        uv_timer_start(&c->timer, conn_on_timer, connect_timeout_ms, 0);
    return c;
}

/* ---- Reading ----------------------------------------------------------- */

void conn_read_start(struct conn *c)
{
    if (c->closing || c->owner_reading)
        return;
    c->owner_reading = 1;
    conn_update_reading(c);
    /* Plaintext decrypted but not delivered, or ciphertext kept while the
     * owner paused, is delivered from the idle callback, not from here. */
    if (c->tls_on && c->hs_done && !c->tls_failed && !c->tls_eof &&
        (c->rpend.len > c->rpend_off || SSL_has_pending(c->ssl)))
        conn_defer(c, CONN_DEFER_PUMP);
}

void conn_read_stop(struct conn *c)
{
    if (c->closing)
        return;
    c->owner_reading = 0;
    conn_update_reading(c);
}

/* ---- Writing ----------------------------------------------------------- */

void conn_write(struct conn *c, const void *data, size_t len)
{
    if (c->closing || c->sock_dead || c->tls_failed || len == 0)
        return;
    buf_append(&c->out, data, len);
}

void conn_flush(struct conn *c)
{
    if (c->closing)
        return;
    conn_push_out(c);
}

size_t conn_pending(const struct conn *c)
{
    return c->out.len + c->wire_plain + c->inflight_plain;
}

/* ---- TLS switch and queries -------------------------------------------- */

/*
 * Sets the expected peer name on a client SSL: SNI for DNS names (RFC 6066
 * section 3 forbids literal IP addresses there) and, when the context
 * verifies, the name or address the certificate must match (RFC 6125).
 * A trailing dot (absolute DNS name, as MX lookups return) is dropped.
 * Returns 0 or -1.
 */
static int conn_tls_set_name(struct conn *c, const char *servername)
{
    char name[256];
    size_t n = strlen(servername);
    unsigned char ip[16];
    int is_ip;

    if (n > 0 && servername[n - 1] == '.')
        n--;
    if (n == 0 || n >= sizeof(name))
        return -1;
    memcpy(name, servername, n);
    name[n] = '\0';
    is_ip = inet_pton(AF_INET, name, ip) == 1 || inet_pton(AF_INET6, name, ip) == 1;
    if (!is_ip && SSL_set_tlsext_host_name(c->ssl, name) != 1)
        return -1;
    if (SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER) {
        X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);

        X509_VERIFY_PARAM_set_hostflags(vp, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, name) != 1
                  : SSL_set1_host(c->ssl, name) != 1)
            return -1;
    }
    return 0;
}

/*
 * RFC 3207 section 4.2: after the 220 reply, everything the client sent in
 * plaintext is discarded and the session starts afresh. The plain layer
 * hands every byte to the owner in the read callback and keeps nothing, so
 * the bytes that rode in the same read as STARTTLS are in the owner's
 * buffer, which the owner empties; whatever conn still holds (leftover
 * input) is dropped here, and every later byte from the socket goes to the
 * TLS engine, never to the owner as plaintext.
 */
int conn_start_tls(struct conn *c, struct tls_ctx *ctx, int server, const char *servername)
{
    BIO *bio;
    int n, e;

    if (c->tls_on || c->closing)
        return -1;
    conn_push_out(c);
    buf_free(&c->rpend);
    c->rpend_off = 0;
    c->rin = NULL;
    c->rin_len = 0;
    c->tls_on = 1;

    pthread_once(&conn_bio_once, conn_bio_init);
    ERR_clear_error();
    c->ssl = SSL_new(tls_ctx_ssl(ctx));
    if (c->ssl == NULL) {
        conn_tls_fail(c, SSL_ERROR_SSL, "cannot create TLS session");
        return 0;
    }
    bio = BIO_new(conn_bio_method);
    if (bio == NULL) {
        conn_tls_fail(c, SSL_ERROR_SSL, "cannot create TLS BIO");
        return 0;
    }
    BIO_set_data(bio, c);
    SSL_set_bio(c->ssl, bio, bio);
    if (server) {
        SSL_set_accept_state(c->ssl);
    } else {
        SSL_set_connect_state(c->ssl);
        if (servername != NULL && conn_tls_set_name(c, servername) < 0) {
            conn_tls_fail(c, SSL_ERROR_SSL, "invalid server name");
            return 0;
        }
        /* The ClientHello goes out now (after any plaintext still queued). */
        ERR_clear_error();
        n = SSL_do_handshake(c->ssl);
        e = SSL_get_error(c->ssl, n);
        if (n != 1 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
            conn_tls_fail(c, e, "handshake failed");
            return 0;
        }
        conn_kick_write(c);
    }
    conn_update_reading(c);
    return 0;
}

/* TLS is "on" from conn_start_tls() on, before the handshake completes; no
 * plaintext is delivered from that point. */
int conn_is_tls(const struct conn *c)
{
    return c->tls_on;
}

const char *conn_tls_version(const struct conn *c)
{
    if (c->ssl == NULL || !c->hs_done)
        return "";
    return SSL_get_version(c->ssl);
}

const char *conn_tls_cipher(const struct conn *c)
{
    const char *name;

    if (c->ssl == NULL || !c->hs_done)
        return "";
    name = SSL_get_cipher_name(c->ssl);
    return name != NULL ? name : "";
}

/* Only a certificate that was verified (the context asked for verification
 * and it succeeded) is returned; an opportunistic peer's is not. */
X509 *conn_tls_peer_cert(const struct conn *c)
{
    X509 *x;

    if (c->ssl == NULL || !c->hs_done || c->tls_failed)
        return NULL;
    if (!(SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER))
        return NULL;
    x = SSL_get0_peer_certificate(c->ssl);
    if (x == NULL || SSL_get_verify_result(c->ssl) != X509_V_OK)
        return NULL;
    return x;
}

const char *conn_tls_error(const struct conn *c)
{
    return c->tls_error != NULL ? c->tls_error : "";
}

const struct sockaddr *conn_peer(const struct conn *c)
{
    return &c->peer.sa;
}

const char *conn_peer_ip(const struct conn *c)
{
    return c->peer_ip;
}

const struct sockaddr *conn_local(const struct conn *c)
{
    return &c->local.sa;
}

/* ---- Teardown ---------------------------------------------------------- */

static void conn_free(struct conn *c)
{
    SSL_free(c->ssl);
    buf_free(&c->out);
    buf_free(&c->wire);
    buf_free(&c->inflight);
    buf_free(&c->rpend);
    free(c->tls_error);
    free(c);
}

static void conn_on_close(uv_handle_t *h)
{
    struct conn *c = h->data;

    if (--c->close_refs > 0)
        return;
    if (!c->silent)
        c->on_event(c, CONN_EV_CLOSED, 0, c->arg);
    conn_free(c);
}

static void conn_close_now(struct conn *c)
{
    if (c->handles_closed)
        return;
    c->handles_closed = 1;
    c->closing = 1;
    c->close_refs = 3;
    uv_close((uv_handle_t *)&c->tcp, conn_on_close);
    uv_close((uv_handle_t *)&c->timer, conn_on_close);
    uv_close((uv_handle_t *)&c->idle, conn_on_close);
}

static void conn_on_shutdown(uv_shutdown_t *req, int status)
{
    struct conn *c = req->data;

    if (c->handles_closed)
        return;
    c->shut_done = 1;
    if (status < 0)
        c->sock_dead = 1;
    conn_close_step(c);
}

/*
 * Advances a graceful close: wait for the output to be written, queue the
 * TLS close_notify (RFC 8446 section 6.1) and wait for it too, half-close,
 * wait for the peer's EOF, close. Called again from the write, shutdown and
 * read callbacks until the handles are closed.
 */
static void conn_close_step(struct conn *c)
{
    int r;

    if (c->handles_closed)
        return;
    if (c->sock_dead || !c->connected) {
        conn_close_now(c);
        return;
    }
    conn_kick_write(c);
    if (c->writing)
        return;
    if (c->tls_on && c->hs_done && !c->tls_failed && !c->notify_sent) {
        c->notify_sent = 1;
        ERR_clear_error();
        SSL_shutdown(c->ssl);
        ERR_clear_error();
        conn_kick_write(c);
        if (c->writing)
            return;
    }
    if (c->sock_dead) {
        conn_close_now(c);
        return;
    }
    if (!c->shut_started) {
        c->shut_started = 1;
        r = uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, conn_on_shutdown);
        if (r < 0)
            conn_close_now(c);
        return;
    }
    if (!c->shut_done)
        return;
    conn_update_reading(c);
    if (c->got_eof || !c->sock_reading)
        conn_close_now(c);
}

static void conn_on_timer(uv_timer_t *t)
{
    struct conn *c = t->data;

    if (c->handles_closed)
        return;
    if (c->closing) {
        log_debug("event=close_timeout peer=%s", c->peer_ip);
        conn_close_now(c);
        return;
    }
    if (!c->connected && !c->sock_dead) {
        c->sock_dead = 1;
        conn_fail(c, UV_ETIMEDOUT);
    }
}

void conn_close(struct conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    c->owner_reading = 0;
    uv_timer_start(&c->timer, conn_on_timer, CONN_CLOSE_TIMEOUT_MS, 0);
    if (c->tls_on && !c->hs_done)
        buf_free(&c->out);      /* no session to carry it */
    else
        conn_push_out(c);
    conn_update_reading(c);
    conn_close_step(c);
}

void conn_abort(struct conn *c)
{
    if (c->handles_closed)
        return;
    c->closing = 1;
    conn_close_now(c);
}
