/*
 * admin: the HTTP endpoint for metrics and health checks. See admin.h for
 * what it serves and its limits.
 *
 * Input model: bytes read go into the connection's buffer and
 * http_parser_execute() consumes them; the parser's callbacks only collect
 * the target and count sizes, and the request is answered from
 * on_message_complete, synchronously (every answer is computed on the
 * loop, nothing waits). When too much output is unsent, the parser is
 * paused, reading stops, and both resume when the writes drain.
 */
#include "lib/admin.h"

#include <http_parser.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

#define ADMIN_BACKLOG 64
#define ADMIN_MAX_CONNS 64
#define ADMIN_URL_MAX 1024          /* request target (414 above) */
#define ADMIN_HEAD_MAX 8192         /* request line and headers (431 above) */
#define ADMIN_BODY_MAX 4096         /* request body (413 above) */
#define ADMIN_IDLE_MS 30000         /* for each request to arrive */
#define ADMIN_LINGER_MS 2000        /* for the peer to read the last answer */
#define ADMIN_OUT_MAX (1024 * 1024) /* unsent output before reading stops */
#define ADMIN_READ_SIZE 16384

struct admin_listener {
    uv_tcp_t tcp;
    struct admin *a;
    char text[80];
};

struct admin_check {
    char *name;
    admin_check_fn fn;
    void *arg;
};

struct admin_conn {
    struct admin_conn *next, *prev;
    struct admin *a;
    uv_tcp_t tcp;
    uv_timer_t timer;            /* idle timeout, then linger */
    uv_shutdown_t shutdown;
    http_parser parser;
    char rbuf[ADMIN_READ_SIZE];
    struct buf in;               /* read, not yet parsed */

    char url[ADMIN_URL_MAX + 1];
    size_t urllen;
    size_t head_bytes;
    size_t body_bytes;
    int error_status;            /* an answer decided by a size limit */

    size_t out_pending;          /* bytes of writes not completed */
    int writes;                  /* write requests in flight */
    int out_paused;              /* parser paused for output */
    int finishing;               /* shutting down after the last answer */
    int peer_eof;                /* the peer shut down its side */
    int shut_done;               /* our side is shut down */
    int closing;                 /* uv_close() called */
    int handles;                 /* open handles (tcp, timer) */
};

struct admin_wreq {
    uv_write_t req;
    struct admin_conn *c;
    size_t len;
    char data[];
};

struct admin {
    uv_loop_t *loop;
    struct metrics *reg;
    struct admin_listener **listeners;
    size_t nlisteners;
    size_t listeners_open;
    struct admin_conn *conns;
    size_t nconns;
    struct admin_check *checks;
    size_t nchecks;
    int closing;
    void (*closed)(void *arg);
    void *closed_arg;
};

static const http_parser_settings admin_settings;
static void admin_conn_close(struct admin_conn *c);
static void admin_maybe_freed(struct admin *a);

/* ---- connections --------------------------------------------------------------- */

static void admin_conn_handle_closed(uv_handle_t *h)
{
    struct admin_conn *c = h->data;
    struct admin *a = c->a;

    if (--c->handles > 0)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        a->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    a->nconns--;
    buf_free(&c->in);
    free(c);
    admin_maybe_freed(a);
}

/* Closes both handles; pending writes fail with UV_ECANCELED first. */
static void admin_conn_close(struct admin_conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, admin_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, admin_conn_handle_closed);
}

static void admin_on_linger(uv_timer_t *t)
{
    admin_conn_close(t->data);
}

static void admin_on_shutdown(uv_shutdown_t *req, int status)
{
    struct admin_conn *c = req->data;

    /* Input is still read (and discarded) until the peer closes or the
     * linger timer fires, so that unread input does not turn our close
     * into a reset that could destroy the answer in flight. */
    c->shut_done = 1;
    if (status != 0 || c->peer_eof)
        admin_conn_close(c);
}

/*
 * Ends the connection gracefully: no more requests are parsed, the
 * answers already queued are sent, then the write side is shut down.
 */
static void admin_conn_finish(struct admin_conn *c)
{
    if (c->finishing || c->closing)
        return;
    c->finishing = 1;
    uv_timer_start(&c->timer, admin_on_linger, ADMIN_LINGER_MS, 0);
    c->shutdown.data = c;
    if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, admin_on_shutdown) != 0)
        admin_conn_close(c);
}

static void admin_on_idle(uv_timer_t *t)
{
    struct admin_conn *c = t->data;

    log_debug("event=admin_timeout");
    admin_conn_close(c);
}

static void admin_process(struct admin_conn *c);
static void admin_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static void admin_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b);

static void admin_on_write(uv_write_t *req, int status)
{
    struct admin_wreq *w = (struct admin_wreq *)req;
    struct admin_conn *c = w->c;

    c->writes--;
    c->out_pending -= w->len;
    free(w);
    if (c->closing)
        return;
    if (status != 0) {
        admin_conn_close(c);
        return;
    }
    if (c->out_paused && c->out_pending <= ADMIN_OUT_MAX / 2 && !c->finishing) {
        /* The peer reads again: parse what was held back, then read. */
        c->out_paused = 0;
        http_parser_pause(&c->parser, 0);
        admin_process(c);
        if (!c->closing && !c->finishing && !c->out_paused && !c->peer_eof)
            uv_read_start((uv_stream_t *)&c->tcp, admin_on_alloc, admin_on_read);
    }
}

static void admin_write(struct admin_conn *c, const char *p, size_t len)
{
    struct admin_wreq *w = xmalloc(sizeof(*w) + len);
    uv_buf_t b;

    if (c->closing) {
        free(w);
        return;
    }
    w->c = c;
    w->len = len;
    memcpy(w->data, p, len);
    b = uv_buf_init(w->data, (unsigned)len);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, admin_on_write) != 0) {
        free(w);
        admin_conn_close(c);
        return;
    }
    c->writes++;
    c->out_pending += len;
}

/* ---- answers --------------------------------------------------------------------- */

static const char *admin_reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 431: return "Request Header Fields Too Large";
    case 503: return "Service Unavailable";
    default: return "Error";
    }
}

/* Writes one whole response. head_only: HEAD, the body is left out but
 * Content-Length still gives its size (RFC 9110 section 8.6). */
static void admin_respond(struct admin_conn *c, int status, const char *ctype, const char *body,
                          size_t len, int head_only, int keep_alive)
{
    struct buf out = BUF_INIT;
    char date[64];
    struct tm tm;
    time_t now = time(NULL);

    gmtime_r(&now, &tm);
    /* RFC 9110 section 5.6.7: IMF-fixdate. */
    strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
    buf_appendf(&out,
                "HTTP/1.1 %d %s\r\n"
                "Date: %s\r\n"
                "Content-Type: %s\r\n"
                "Content-Length: %zu\r\n"
                "Cache-Control: no-store\r\n"
                "%s"
                "Connection: %s\r\n"
                "\r\n",
                status, admin_reason(status), date, ctype, len,
                status == 405 ? "Allow: GET, HEAD\r\n" : "", keep_alive ? "keep-alive" : "close");
    if (!head_only)
        buf_append(&out, body, len);
    admin_write(c, out.data, out.len);
    buf_free(&out);
}

static void admin_respond_text(struct admin_conn *c, int status, const char *text, int head_only,
                               int keep_alive)
{
    admin_respond(c, status, "text/plain; charset=utf-8", text, strlen(text), head_only,
                  keep_alive);
}

/* GET /readyz: every check, the failing ones listed. */
static void admin_readyz(struct admin_conn *c, int head_only, int keep_alive)
{
    struct admin *a = c->a;
    struct buf body = BUF_INIT;
    int ok = 1;

    for (size_t i = 0; i < a->nchecks; i++) {
        char why[256] = "";
        if (a->checks[i].fn(a->checks[i].arg, why, sizeof(why)))
            continue;
        ok = 0;
        /* One line per check, whatever the reason holds. */
        for (char *p = why; *p; p++)
            if (*p == '\r' || *p == '\n')
                *p = ' ';
        buf_appendf(&body, "%s: %s\n", a->checks[i].name, why[0] ? why : "failing");
    }
    if (ok)
        buf_appends(&body, "ok\n");
    admin_respond(c, ok ? 200 : 503, "text/plain; charset=utf-8", body.data, body.len, head_only,
                  keep_alive);
    buf_free(&body);
}

static void admin_metrics(struct admin_conn *c, int head_only, int keep_alive)
{
    struct buf body = BUF_INIT;

    metrics_render(c->a->reg, &body);
    admin_respond(c, 200, METRICS_CONTENT_TYPE, body.data ? body.data : "", body.len, head_only,
                  keep_alive);
    buf_free(&body);
}

/* Answers the request just parsed. Returns whether the connection stays. */
static int admin_dispatch(struct admin_conn *c)
{
    http_parser *p = &c->parser;
    int keep = http_should_keep_alive(p) && !p->upgrade && !c->a->closing;
    int head = p->method == HTTP_HEAD;
    struct http_parser_url u;
    const char *path;
    size_t plen;

    if (c->error_status) {
        admin_respond_text(c, c->error_status, "request too large\n", 0, 0);
        return 0;
    }
    http_parser_url_init(&u);
    if (http_parser_parse_url(c->url, c->urllen, p->method == HTTP_CONNECT, &u) != 0 ||
        !(u.field_set & (1 << UF_PATH))) {
        admin_respond_text(c, 400, "bad request target\n", 0, 0);
        return 0;
    }
    if (p->method != HTTP_GET && p->method != HTTP_HEAD) {
        admin_respond_text(c, 405, "method not allowed\n", 0, keep);
        return keep;
    }
    path = c->url + u.field_data[UF_PATH].off;
    plen = u.field_data[UF_PATH].len;
    if (plen == 8 && memcmp(path, "/metrics", 8) == 0)
        admin_metrics(c, head, keep);
    else if (plen == 8 && memcmp(path, "/healthz", 8) == 0)
        admin_respond_text(c, 200, "ok\n", head, keep);
    else if (plen == 7 && memcmp(path, "/readyz", 7) == 0)
        admin_readyz(c, head, keep);
    else
        admin_respond_text(c, 404, "not found\n", head, keep);
    return keep;
}

/* ---- parser callbacks ---------------------------------------------------------- */

static int admin_on_message_begin(http_parser *p)
{
    struct admin_conn *c = p->data;

    if (c->closing)
        return -1;
    c->urllen = 0;
    c->head_bytes = 0;
    c->body_bytes = 0;
    c->error_status = 0;
    return 0;
}

static int admin_count_head(struct admin_conn *c, size_t len)
{
    c->head_bytes += len;
    if (c->head_bytes > ADMIN_HEAD_MAX) {
        if (c->error_status == 0)
            c->error_status = 431;
        return -1;
    }
    return 0;
}

static int admin_on_url(http_parser *p, const char *at, size_t len)
{
    struct admin_conn *c = p->data;

    if (c->urllen + len > ADMIN_URL_MAX) {
        c->error_status = 414;
        return -1;
    }
    memcpy(c->url + c->urllen, at, len);
    c->urllen += len;
    c->url[c->urllen] = '\0';
    return admin_count_head(c, len);
}

static int admin_on_header(http_parser *p, const char *at, size_t len)
{
    return admin_count_head(p->data, len);
}

static int admin_on_body(http_parser *p, const char *at, size_t len)
{
    struct admin_conn *c = p->data;

    c->body_bytes += len;
    if (c->body_bytes > ADMIN_BODY_MAX) {
        c->error_status = 413;
        return -1;
    }
    return 0;
}

static int admin_on_message_complete(http_parser *p)
{
    struct admin_conn *c = p->data;

    if (c->closing)
        return -1;
    if (!admin_dispatch(c)) {
        /* Stop here: what follows is not answered. */
        admin_conn_finish(c);
        http_parser_pause(p, 1);
        return 0;
    }
    /* A complete request restarts the idle timeout. */
    uv_timer_start(&c->timer, admin_on_idle, ADMIN_IDLE_MS, 0);
    if (c->out_pending > ADMIN_OUT_MAX) {
        log_debug("event=admin_paused reason=output_backlog pending_bytes=%zu", c->out_pending);
        c->out_paused = 1;
        http_parser_pause(p, 1);
    }
    return 0;
}

static const http_parser_settings admin_settings = {
    .on_message_begin = admin_on_message_begin,
    .on_url = admin_on_url,
    .on_header_field = admin_on_header,
    .on_header_value = admin_on_header,
    .on_body = admin_on_body,
    .on_message_complete = admin_on_message_complete,
};

/* Parses buffered input; answers every complete request. */
static void admin_process(struct admin_conn *c)
{
    size_t n;
    enum http_errno e;

    if (c->closing || c->finishing || c->out_paused || c->in.len == 0)
        return;
    n = http_parser_execute(&c->parser, &admin_settings, c->in.data, c->in.len);
    if (c->closing)
        return;
    buf_consume(&c->in, n > c->in.len ? c->in.len : n);
    e = HTTP_PARSER_ERRNO(&c->parser);
    if (e == HPE_OK || e == HPE_PAUSED) {
        if (c->out_paused)
            uv_read_stop((uv_stream_t *)&c->tcp);
        return;
    }
    /* A limit (the status is set) or a malformed request. */
    if (!c->finishing) {
        int status = c->error_status ? c->error_status : 400;
        log_debug("event=admin_bad_request status=%d reason=%s", status, http_errno_name(e));
        admin_respond_text(c, status, status == 400 ? "bad request\n" : "request too large\n", 0,
                           0);
        admin_conn_finish(c);
    }
}

static void admin_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    struct admin_conn *c = h->data;

    *b = uv_buf_init(c->rbuf, sizeof(c->rbuf));
}

static void admin_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct admin_conn *c = s->data;

    if (c->closing)
        return;
    if (nread == UV_EOF) {
        /* The peer is done sending; answers still queued are sent
         * before our side closes too. */
        c->peer_eof = 1;
        uv_read_stop(s);
        if (c->finishing ? c->shut_done : c->writes == 0)
            admin_conn_close(c);
        else if (!c->finishing)
            admin_conn_finish(c);
        return;
    }
    if (nread < 0) {
        admin_conn_close(c);
        return;
    }
    if (nread == 0 || c->finishing)
        return;   /* discarded while lingering */
    buf_append(&c->in, b->base, (size_t)nread);
    admin_process(c);
}

static void admin_on_connection(uv_stream_t *server, int status)
{
    struct admin_listener *l = server->data;
    struct admin *a = l->a;
    struct admin_conn *c;

    if (status < 0) {
        log_warn("event=admin_accept_error listener=%s reason=%s", l->text, uv_err_name(status));
        return;
    }
    c = xcalloc(1, sizeof(*c));
    c->a = a;
    uv_tcp_init(a->loop, &c->tcp);
    uv_timer_init(a->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    buf_init(&c->in);
    c->next = a->conns;
    if (a->conns)
        a->conns->prev = c;
    a->conns = c;
    a->nconns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        admin_conn_close(c);
        return;
    }
    if (a->closing || a->nconns > ADMIN_MAX_CONNS) {
        log_warn("event=admin_reject listener=%s reason=%s", l->text,
                 a->closing ? "closing" : "too_many_connections");
        admin_conn_close(c);
        return;
    }
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    uv_timer_start(&c->timer, admin_on_idle, ADMIN_IDLE_MS, 0);
    uv_read_start((uv_stream_t *)&c->tcp, admin_on_alloc, admin_on_read);
}

/* ---- life cycle -------------------------------------------------------------- */

static void admin_listener_closed(uv_handle_t *h)
{
    struct admin_listener *l = h->data;
    struct admin *a = l->a;

    free(l);
    a->listeners_open--;
    admin_maybe_freed(a);
}

static void admin_close_listeners(struct admin *a)
{
    for (size_t i = 0; i < a->nlisteners; i++)
        uv_close((uv_handle_t *)&a->listeners[i]->tcp, admin_listener_closed);
    free(a->listeners);
    a->listeners = NULL;
    a->nlisteners = 0;
}

struct admin *admin_new(uv_loop_t *loop, const struct config_addr_list *addrs,
                        struct metrics *reg, char *err, size_t errlen)
{
    struct admin *a = xcalloc(1, sizeof(*a));

    a->loop = loop;
    a->reg = reg;
    if (addrs->n == 0) {
        snprintf(err, errlen, "[admin] listen: no address given");
        free(a);
        return NULL;
    }
    for (size_t i = 0; i < addrs->n; i++) {
        struct admin_listener *l = xcalloc(1, sizeof(*l));
        int rc;

        l->a = a;
        snprintf(l->text, sizeof(l->text), "%s", addrs->v[i].text);
        uv_tcp_init(loop, &l->tcp);
        l->tcp.data = l;
        a->listeners = xrealloc(a->listeners, (a->nlisteners + 1) * sizeof(*a->listeners));
        a->listeners[a->nlisteners++] = l;
        a->listeners_open++;
        rc = uv_tcp_bind(&l->tcp, (const struct sockaddr *)&addrs->v[i].ss, 0);
        if (rc == 0)
            rc = uv_listen((uv_stream_t *)&l->tcp, ADMIN_BACKLOG, admin_on_connection);
        if (rc != 0) {
            snprintf(err, errlen, "[admin] listen: cannot listen on %s: %s", l->text,
                     uv_strerror(rc));
            /* The loop closes the listeners and frees the endpoint. */
            a->closing = 1;
            admin_close_listeners(a);
            return NULL;
        }
        log_info("event=listen listener=admin address=%s", l->text);
    }
    return a;
}

void admin_add_check(struct admin *a, const char *name, admin_check_fn fn, void *arg)
{
    a->checks = xrealloc(a->checks, (a->nchecks + 1) * sizeof(*a->checks));
    a->checks[a->nchecks].name = xstrdup(name);
    a->checks[a->nchecks].fn = fn;
    a->checks[a->nchecks].arg = arg;
    a->nchecks++;
}

/* Frees the endpoint once it is closing and its last handle is closed. */
static void admin_maybe_freed(struct admin *a)
{
    void (*closed)(void *) = a->closed;
    void *arg = a->closed_arg;

    if (!a->closing || a->listeners_open > 0 || a->conns != NULL)
        return;
    for (size_t i = 0; i < a->nchecks; i++)
        free(a->checks[i].name);
    free(a->checks);
    free(a);
    if (closed)
        closed(arg);
}

void admin_close(struct admin *a, void (*closed)(void *arg), void *arg)
{
    struct admin_conn *c, *next;

    if (a->closing)
        return;
    a->closing = 1;
    a->closed = closed;
    a->closed_arg = arg;
    admin_close_listeners(a);
    for (c = a->conns; c; c = next) {
        next = c->next;
        if (c->writes > 0)
            admin_conn_finish(c);
        else
            admin_conn_close(c);
    }
}
