#include "lib/smtp_server.h"

#include <assert.h>
#include <openssl/rand.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

#include "lib/log.h"
#include "lib/smtp_addr.h"
#include "lib/smtp_cmd.h"

/* The gateway's historical reply cap; the relay raises it. */
#define SMTP_SERVER_REPLY_DEFAULT 600

int smtp_server_accept(struct smtp_server *c, uv_loop_t *loop, uv_stream_t *server,
                       conn_read_cb on_read, conn_event_cb on_event,
                       void (*release)(void *arg), void *arg)
{
    /* Session ids: a random per-process prefix and a counter, so that the
     * logs of several processes (or restarts) do not mix sessions up. */
    static unsigned long counter;
    static unsigned prefix;

    if (prefix == 0 && RAND_bytes((unsigned char *)&prefix, sizeof(prefix)) != 1)
        prefix = 1;
    c->conn = conn_accept(server, on_read, on_event, arg);
    if (c->conn == NULL)
        return -1;
    snprintf(c->sid, sizeof(c->sid), "%04x%06lx", prefix & 0xffff, ++counter & 0xffffff);
    snprintf(c->ip, sizeof(c->ip), "%s", conn_peer_ip(c->conn));
    buf_init(&c->in);
    uv_timer_init(loop, &c->timer);
    c->timer.data = arg;
    c->timer_open = 1;
    c->started = uv_now(loop);
    c->reply_max = SMTP_SERVER_REPLY_DEFAULT;
    c->reply_sanitize = 0;
    c->release = release;
    c->arg = arg;
    return 0;
}

void smtp_server_reply(struct smtp_server *c, int code, const char *enh, const char *fmt, ...)
{
    char line[SMTP_SERVER_REPLY_CAP];
    size_t max = c->reply_max;
    int n;
    va_list ap;

    assert(max >= 16 && max <= sizeof(line));
    if (enh)
        n = snprintf(line, max, "%d %s ", code, enh);
    else
        n = snprintf(line, max, "%d ", code);
    va_start(ap, fmt);
    n += vsnprintf(line + n, max - (size_t)n - 2, fmt, ap);
    va_end(ap);
    if ((size_t)n > max - 3)
        n = (int)max - 3;
    if (c->reply_sanitize)
        for (int i = 0; i < n; i++)
            if ((unsigned char)line[i] < 0x20 && line[i] != '\t')
                line[i] = '?';
    line[n++] = '\r';
    line[n++] = '\n';
    conn_write(c->conn, line, (size_t)n);
}

int smtp_server_count_error(struct smtp_server *c, int max, const char *hostname)
{
    if (++c->errors < max)
        return 0;
    smtp_server_reply(c, 421, "4.7.0", "%s Error: too many errors", hostname);
    return 1;
}

int smtp_server_frame(struct smtp_server *c, const char *p, size_t avail, size_t max,
                      size_t *used, size_t *linelen)
{
    ssize_t n;

    if (!c->discarding) {
        n = smtp_cmd_frame(p, avail, max, linelen);
        if (n == SMTP_FRAME_NEED_MORE) {
            *used = 0;
            return SMTP_SERVER_NEED_MORE;
        }
        if (n != SMTP_FRAME_TOO_LONG) {
            *used = (size_t)n;
            return SMTP_SERVER_LINE;
        }
        c->discarding = 1;
        c->discard_cr = 0;
    }
    int done = 0;

    *used = smtp_cmd_discard(p, avail, &c->discard_cr, &done);
    if (!done)
        return SMTP_SERVER_NEED_MORE;
    c->discarding = 0;
    return SMTP_SERVER_TOO_LONG;
}

void smtp_server_update_reading(struct smtp_server *c, int can_consume, size_t inbuf_max)
{
    int want;

    if (c->conn_closed)
        return;
    want = can_consume && c->in.len < inbuf_max && conn_pending(c->conn) < SMTP_SERVER_OUT_MAX;
    if (want && !c->reading)
        conn_read_start(c->conn);
    else if (!want && c->reading)
        conn_read_stop(c->conn);
    c->reading = want;
}

void smtp_server_log_state(const struct smtp_server *c, const char *from, const char *to)
{
    log_debug("session=%s event=state from=%s to=%s", c->sid, from, to);
}

void smtp_server_log_disconnect(const struct smtp_server *c, const char *reason)
{
    uint64_t ms = uv_now(uv_handle_get_loop((const uv_handle_t *)&c->timer)) - c->started;

    log_info("session=%s event=disconnect ip=%s reason=%s messages=%u errors=%d duration_ms=%llu",
             c->sid, c->ip, reason, c->messages, c->errors, (unsigned long long)ms);
}

static void smtp_server_timer_closed(uv_handle_t *h)
{
    struct smtp_server *c = (struct smtp_server *)((char *)h - offsetof(struct smtp_server, timer));

    c->timer_open = 0;
    smtp_server_maybe_release(c);
}

void smtp_server_close(struct smtp_server *c, int abort)
{
    conn_read_stop(c->conn);
    if (abort) {
        conn_abort(c->conn);
    } else {
        conn_flush(c->conn);
        conn_close(c->conn);
    }
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, smtp_server_timer_closed);
}

void smtp_server_conn_closed(struct smtp_server *c)
{
    c->conn_closed = 1;
    smtp_server_maybe_release(c);
}

void smtp_server_maybe_release(struct smtp_server *c)
{
    if (!c->conn_closed || c->timer_open || c->inflight > 0)
        return;
    buf_free(&c->in);
    c->release(c->arg);
}

int smtp_server_addr_reply(struct smtp_server *c, int rc, const char *why, int rcpt)
{
    if (rc == SMTP_ADDR_OK)
        return 0;
    if (rc == SMTP_ADDR_BAD_PARAM)
        smtp_server_reply(c, 555, "5.5.4", "%s", why);
    else if (rc == SMTP_ADDR_NEED_UTF8)
        smtp_server_reply(c, 553, "5.6.7", "%s", why);
    else if (rcpt)
        smtp_server_reply(c, 501, "5.1.3", "Bad recipient address syntax: %s", why);
    else
        smtp_server_reply(c, 501, "5.1.7", "Bad sender address syntax: %s", why);
    return -1;
}
