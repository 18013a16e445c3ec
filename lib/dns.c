/*
 * dns: c-ares on the libuv loop. See dns.h for the contract.
 *
 * Life of a query: dns_query() hands the name to ares_query(); c-ares
 * opens sockets and reports them through dns_sock_state(), which starts a
 * uv_poll per socket; readiness goes back to c-ares with
 * ares_process_fd(), and the timer calls ares_process_fd() without a
 * socket so c-ares can retransmit and time out. The answer arrives in
 * dns_on_answer(), is decoded into a struct dns_result and handed to the
 * caller.
 *
 * Two things are deferred to the "defer" timer so that callbacks never run
 * inside a call of the caller: a query that c-ares fails synchronously
 * (inside ares_query()), and the teardown of dns_close(), which must not
 * destroy the channel from inside a c-ares callback.
 */
#include "lib/dns.h"

#include <arpa/inet.h>
#include <ares.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

/* Addresses kept from one A or AAAA answer. */
#define DNS_MAX_ADDRS 64
/* RFC 1035 section 3.1: 255 octets in wire form, 253 in text. */
#define DNS_MAX_NAME 253
/* RFC 6891 section 6.2.5, and the payload size DNS Flag Day 2020 advises. */
#define DNS_EDNS_PAYLOAD 1232

struct dns_sock {
    uv_poll_t poll;
    struct dns *d;
    ares_socket_t fd;
    struct dns_sock *next;
};

struct dns_q {
    struct dns *d;
    struct dns_q *next;           /* in d->deferred */
    enum dns_type type;
    dns_cb cb;
    void *arg;
    char *name;
    int submitting;               /* inside ares_query() */
    int status;                   /* outcome of a deferred query */
};

struct dns {
    uv_loop_t *loop;
    ares_channel ch;              /* NULL once destroyed */
    uv_timer_t timer;             /* c-ares retransmissions and timeouts */
    uv_timer_t defer;             /* deferred callbacks and teardown */
    struct dns_sock *socks;
    struct dns_q *deferred, **deferred_tail;
    size_t pending;               /* callbacks not yet made */
    int handles;                  /* open libuv handles */
    int closing;
    void (*on_closed)(void *arg);
    void *closed_arg;
};

/* RFC 1035 section 3.2.2 and RFC 3596 section 2.1 type codes. */
static const int dns_qtype[] = {
    [DNS_T_A] = 1, [DNS_T_AAAA] = 28, [DNS_T_TXT] = 16, [DNS_T_PTR] = 12, [DNS_T_MX] = 15,
};

const char *dns_strerror(int status)
{
    switch (status) {
    case DNS_OK: return "ok";
    case DNS_ENOTFOUND: return "nxdomain";
    case DNS_ENODATA: return "nodata";
    case DNS_ETIMEOUT: return "timeout";
    case DNS_ESERVFAIL: return "servfail";
    case DNS_EREFUSED: return "refused";
    case DNS_EBADRESP: return "badresp";
    case DNS_ECONNREFUSED: return "connrefused";
    case DNS_EBADNAME: return "badname";
    case DNS_ECANCELLED: return "cancelled";
    default: return "error";
    }
}

static int dns_status(int ares_status)
{
    switch (ares_status) {
    case ARES_SUCCESS: return DNS_OK;
    case ARES_ENOTFOUND: return DNS_ENOTFOUND;
    case ARES_ENODATA: return DNS_ENODATA;
    case ARES_ETIMEOUT: return DNS_ETIMEOUT;
    case ARES_ESERVFAIL: return DNS_ESERVFAIL;
    case ARES_EREFUSED: return DNS_EREFUSED;
    case ARES_EFORMERR: case ARES_EBADRESP: case ARES_EBADQUERY: return DNS_EBADRESP;
    case ARES_ECONNREFUSED: return DNS_ECONNREFUSED;
    case ARES_EBADNAME: return DNS_EBADNAME;
    case ARES_EDESTRUCTION: case ARES_ECANCELLED: return DNS_ECANCELLED;
    default: return DNS_EOTHER;
    }
}

/* ---- results ---------------------------------------------------------- */

static void dns_result_clear(struct dns_result *r)
{
    for (size_t i = 0; i < r->n; i++) {
        if (r->txts)
            free(r->txts[i].data);
        if (r->names)
            free(r->names[i]);
        if (r->mxs)
            free(r->mxs[i].host);
    }
    free(r->addrs);
    free(r->txts);
    free(r->names);
    free(r->mxs);
    free(r->name);
    memset(r, 0, sizeof(*r));
}

void dns_result_free(struct dns_result *r)
{
    if (r == NULL)
        return;
    dns_result_clear(r);
    free(r);
}

struct dns_result *dns_result_dup(const struct dns_result *r)
{
    struct dns_result *c = xcalloc(1, sizeof(*c));

    c->status = r->status;
    c->type = r->type;
    c->name = xstrdup(r->name ? r->name : "");
    c->n = r->n;
    if (r->addrs)
        c->addrs = xmemdup(r->addrs, (r->n ? r->n : 1) * sizeof(*r->addrs));
    if (r->txts) {
        c->txts = xcalloc(r->n ? r->n : 1, sizeof(*c->txts));
        for (size_t i = 0; i < r->n; i++) {
            c->txts[i].data = xmemdup(r->txts[i].data, r->txts[i].len + 1);
            c->txts[i].len = r->txts[i].len;
        }
    }
    if (r->names) {
        c->names = xcalloc(r->n ? r->n : 1, sizeof(*c->names));
        for (size_t i = 0; i < r->n; i++)
            c->names[i] = xstrdup(r->names[i]);
    }
    if (r->mxs) {
        c->mxs = xcalloc(r->n ? r->n : 1, sizeof(*c->mxs));
        for (size_t i = 0; i < r->n; i++) {
            c->mxs[i].preference = r->mxs[i].preference;
            c->mxs[i].host = xstrdup(r->mxs[i].host);
        }
    }
    return c;
}

static void dns_decode_a(const unsigned char *abuf, int alen, struct dns_result *r)
{
    struct ares_addrttl ttl[DNS_MAX_ADDRS];
    int n = DNS_MAX_ADDRS;
    int rc = ares_parse_a_reply(abuf, alen, NULL, ttl, &n);

    if (rc != ARES_SUCCESS) {
        r->status = dns_status(rc);
        return;
    }
    r->addrs = xcalloc((size_t)(n > 0 ? n : 1), sizeof(*r->addrs));
    for (int i = 0; i < n; i++) {
        struct dns_addr *a = &r->addrs[r->n++];
        a->family = AF_INET;
        a->u.v4 = ttl[i].ipaddr;
        inet_ntop(AF_INET, &a->u.v4, a->text, sizeof(a->text));
    }
    if (r->n == 0)
        r->status = DNS_ENODATA;
}

static void dns_decode_aaaa(const unsigned char *abuf, int alen, struct dns_result *r)
{
    struct ares_addr6ttl ttl[DNS_MAX_ADDRS];
    int n = DNS_MAX_ADDRS;
    int rc = ares_parse_aaaa_reply(abuf, alen, NULL, ttl, &n);

    if (rc != ARES_SUCCESS) {
        r->status = dns_status(rc);
        return;
    }
    r->addrs = xcalloc((size_t)(n > 0 ? n : 1), sizeof(*r->addrs));
    for (int i = 0; i < n; i++) {
        struct dns_addr *a = &r->addrs[r->n++];
        a->family = AF_INET6;
        memcpy(&a->u.v6, &ttl[i].ip6addr, sizeof(a->u.v6));
        inet_ntop(AF_INET6, &a->u.v6, a->text, sizeof(a->text));
    }
    if (r->n == 0)
        r->status = DNS_ENODATA;
}

/* RFC 1035 section 3.3.14: a TXT record is one or more character-strings.
 * c-ares marks the first string of each record (record_start); the
 * strings of one record are joined. */
static void dns_decode_txt(const unsigned char *abuf, int alen, struct dns_result *r)
{
    struct ares_txt_ext *txt = NULL;
    size_t cap = 0;
    int rc = ares_parse_txt_reply_ext(abuf, alen, &txt);

    if (rc != ARES_SUCCESS) {
        r->status = dns_status(rc);
        return;
    }
    for (struct ares_txt_ext *t = txt; t; t = t->next) {
        struct dns_txt *cur;

        if (t->record_start || r->n == 0) {
            if (r->n == cap) {
                cap = cap ? cap * 2 : 4;
                r->txts = xrealloc(r->txts, cap * sizeof(*r->txts));
            }
            cur = &r->txts[r->n++];
            cur->data = xcalloc(1, 1);
            cur->len = 0;
        }
        cur = &r->txts[r->n - 1];
        cur->data = xrealloc(cur->data, cur->len + t->length + 1);
        memcpy(cur->data + cur->len, t->txt, t->length);
        cur->len += t->length;
        cur->data[cur->len] = '\0';
    }
    ares_free_data(txt);
    if (r->n == 0)
        r->status = DNS_ENODATA;
}

static void dns_decode_ptr(const unsigned char *abuf, int alen, struct dns_result *r)
{
    /* The address only fills the hostent's address list, which is not
     * used; c-ares 1.18 copies addrlen bytes from it. */
    static const unsigned char unused[4];
    struct hostent *h = NULL;
    size_t n = 0;
    int rc = ares_parse_ptr_reply(abuf, alen, unused, (int)sizeof(unused), AF_INET, &h);

    if (rc != ARES_SUCCESS) {
        r->status = dns_status(rc);
        return;
    }
    /* Every PTR name of the answer is in h_aliases; h_name is one of them. */
    while (h->h_aliases && h->h_aliases[n])
        n++;
    if (n == 0) {
        r->names = xcalloc(1, sizeof(*r->names));
        r->names[0] = xstrdup(h->h_name);
        r->n = 1;
    } else {
        r->names = xcalloc(n, sizeof(*r->names));
        for (size_t i = 0; i < n; i++)
            r->names[i] = xstrdup(h->h_aliases[i]);
        r->n = n;
    }
    ares_free_hostent(h);
}

/* Orders by the sort key dns_decode_mx() stores in preference: the
 * preference in the high bits, the answer position in the low ones, so
 * that qsort() (which is not stable) keeps answer order among equals. */
static int dns_mx_cmp(const void *a, const void *b)
{
    const struct dns_mx *x = a, *y = b;

    return x->preference < y->preference ? -1 : x->preference > y->preference;
}

static void dns_decode_mx(const unsigned char *abuf, int alen, struct dns_result *r)
{
    struct ares_mx_reply *mx = NULL;
    size_t n = 0, i = 0;
    int rc = ares_parse_mx_reply(abuf, alen, &mx);

    if (rc != ARES_SUCCESS) {
        r->status = dns_status(rc);
        return;
    }
    for (struct ares_mx_reply *m = mx; m; m = m->next)
        n++;
    r->mxs = xcalloc(n ? n : 1, sizeof(*r->mxs));
    for (struct ares_mx_reply *m = mx; m; m = m->next, i++) {
        r->mxs[i].preference = (unsigned)m->priority * 65536u + (unsigned)(i & 0xffff);
        r->mxs[i].host = xstrdup(m->host);
    }
    r->n = n;
    qsort(r->mxs, n, sizeof(*r->mxs), dns_mx_cmp);
    for (i = 0; i < n; i++)
        r->mxs[i].preference /= 65536u;
    ares_free_data(mx);
    if (n == 0)
        r->status = DNS_ENODATA;
}

/* ---- queries ------------------------------------------------------------ */

static void dns_rearm(struct dns *d);
static void dns_on_defer(uv_timer_t *t);

static void dns_q_free(struct dns_q *q)
{
    free(q->name);
    free(q);
}

/* Makes the callback of q with a result that carries only a status. */
static void dns_deliver_status(struct dns_q *q, int status)
{
    struct dns *d = q->d;
    struct dns_result r;

    memset(&r, 0, sizeof(r));
    r.status = status;
    r.type = q->type;
    r.name = q->name;
    d->pending--;
    q->cb(&r, q->arg);
    dns_q_free(q);
}

static void dns_defer(struct dns *d, struct dns_q *q, int status)
{
    q->status = status;
    q->next = NULL;
    *d->deferred_tail = q;
    d->deferred_tail = &q->next;
    uv_timer_start(&d->defer, dns_on_defer, 0, 0);
}

static void dns_on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    struct dns_q *q = arg;
    struct dns *d = q->d;
    struct dns_result r;

    (void)timeouts;
    if (q->submitting) {
        /* Failed inside ares_query(): report from the loop instead. */
        dns_defer(d, q, dns_status(status));
        return;
    }
    memset(&r, 0, sizeof(r));
    r.type = q->type;
    r.status = dns_status(status);
    if (r.status == DNS_OK && abuf == NULL)
        r.status = DNS_EBADRESP;
    if (r.status == DNS_OK) {
        switch (q->type) {
        case DNS_T_A: dns_decode_a(abuf, alen, &r); break;
        case DNS_T_AAAA: dns_decode_aaaa(abuf, alen, &r); break;
        case DNS_T_TXT: dns_decode_txt(abuf, alen, &r); break;
        case DNS_T_PTR: dns_decode_ptr(abuf, alen, &r); break;
        case DNS_T_MX: dns_decode_mx(abuf, alen, &r); break;
        }
    }
    if (r.status != DNS_OK) {
        /* A partly decoded answer is dropped whole. */
        int st = r.status;
        dns_result_clear(&r);
        r.status = st;
        r.type = q->type;
    }
    r.name = q->name;
    q->name = NULL;
    d->pending--;
    q->cb(&r, q->arg);
    dns_result_clear(&r);
    dns_q_free(q);
}

/* A name c-ares can encode: 1 to 253 characters without spaces or
 * control characters (a trailing dot aside), no empty label. */
static int dns_name_ok(const char *name)
{
    size_t len = strlen(name);

    if (len > 0 && name[len - 1] == '.')
        len--;
    if (len == 0 || len > DNS_MAX_NAME || name[0] == '.')
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c <= 0x20 || c == 0x7f)
            return 0;
        if (c == '.' && name[i + 1] == '.')
            return 0;
    }
    return 1;
}

void dns_query(struct dns *d, const char *name, enum dns_type type, dns_cb cb, void *arg)
{
    struct dns_q *q = xcalloc(1, sizeof(*q));

    q->d = d;
    q->type = type;
    q->cb = cb;
    q->arg = arg;
    q->name = xstrdup(name);
    d->pending++;
    if (d->closing || d->ch == NULL) {
        dns_defer(d, q, DNS_ECANCELLED);
        return;
    }
    if (!dns_name_ok(name)) {
        dns_defer(d, q, DNS_EBADNAME);
        return;
    }
    /* When c-ares fails at once, dns_on_answer() moves q to the deferred
     * list. Either way q stays valid after the call: c-ares holds it until
     * the answer, or the deferred list until the next loop iteration. */
    q->submitting = 1;
    ares_query(d->ch, name, 1 /* class IN */, dns_qtype[type], dns_on_answer, q);
    q->submitting = 0;
    dns_rearm(d);
}

size_t dns_pending(const struct dns *d)
{
    return d->pending;
}

/* ---- loop integration --------------------------------------------------- */

/* One libuv handle of d is closed; the last one frees d. */
static void dns_handle_gone(struct dns *d)
{
    void (*cb)(void *);
    void *arg;

    if (--d->handles > 0 || !d->closing)
        return;
    cb = d->on_closed;
    arg = d->closed_arg;
    free(d);
    ares_library_cleanup();
    if (cb)
        cb(arg);
}

static void dns_sock_closed(uv_handle_t *h)
{
    struct dns_sock *s = h->data;
    struct dns *d = s->d;

    free(s);
    dns_handle_gone(d);
}

static void dns_timer_closed(uv_handle_t *h)
{
    dns_handle_gone(h->data);
}

static void dns_on_timer(uv_timer_t *t)
{
    struct dns *d = t->data;

    if (d->ch == NULL)
        return;
    ares_process_fd(d->ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    dns_rearm(d);
}

/* Arms the timer for c-ares' next retransmission or timeout. */
static void dns_rearm(struct dns *d)
{
    struct timeval tv, *tvp;
    uint64_t ms;

    if (d->ch == NULL || d->closing)
        return;
    tvp = ares_timeout(d->ch, NULL, &tv);
    if (tvp == NULL) {
        uv_timer_stop(&d->timer);
        return;
    }
    ms = (uint64_t)tvp->tv_sec * 1000 + ((uint64_t)tvp->tv_usec + 999) / 1000;
    uv_timer_start(&d->timer, dns_on_timer, ms, 0);
}

static void dns_on_poll(uv_poll_t *p, int status, int events)
{
    struct dns_sock *s = p->data;
    struct dns *d = s->d;
    ares_socket_t rfd = ARES_SOCKET_BAD, wfd = ARES_SOCKET_BAD;

    if (d->ch == NULL)
        return;
    if (status < 0) {
        /* Let c-ares meet the error on the socket itself. */
        rfd = wfd = s->fd;
    } else {
        if (events & UV_READABLE)
            rfd = s->fd;
        if (events & UV_WRITABLE)
            wfd = s->fd;
    }
    ares_process_fd(d->ch, rfd, wfd);
    dns_rearm(d);
}

/* c-ares' ARES_OPT_SOCK_STATE_CB: which events to watch on fd; neither
 * means fd is about to be closed. */
static void dns_sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    struct dns *d = data;
    struct dns_sock *s, **pp;

    for (pp = &d->socks; (s = *pp) != NULL; pp = &s->next) {
        if (s->fd == fd)
            break;
    }
    if (!readable && !writable) {
        if (s != NULL) {
            *pp = s->next;
            uv_close((uv_handle_t *)&s->poll, dns_sock_closed);
        }
        return;
    }
    if (s == NULL) {
        int rc;
        s = xcalloc(1, sizeof(*s));
        s->d = d;
        s->fd = fd;
        rc = uv_poll_init_socket(d->loop, &s->poll, fd);
        if (rc != 0) {
            /* The query then times out through the timer. */
            log_error("event=dns_poll_error reason=%s", uv_err_name(rc));
            free(s);
            return;
        }
        s->poll.data = s;
        d->handles++;
        s->next = d->socks;
        d->socks = s;
    }
    uv_poll_start(&s->poll, (readable ? UV_READABLE : 0) | (writable ? UV_WRITABLE : 0),
                  dns_on_poll);
}

static void dns_flush_deferred(struct dns *d)
{
    struct dns_q *q;

    while ((q = d->deferred) != NULL) {
        d->deferred = q->next;
        if (d->deferred == NULL)
            d->deferred_tail = &d->deferred;
        dns_deliver_status(q, q->status);
    }
}

/* Delivers the deferred callbacks; after dns_close() also tears down. */
static void dns_on_defer(uv_timer_t *t)
{
    struct dns *d = t->data;

    dns_flush_deferred(d);
    if (!d->closing || d->ch == NULL)
        return;
    /* ares_destroy() calls every pending callback with ARES_EDESTRUCTION
     * and reports each socket closed through dns_sock_state(). Queries
     * started from those callbacks fail into the deferred list. */
    ares_destroy(d->ch);
    d->ch = NULL;
    dns_flush_deferred(d);
    while (d->socks) {
        struct dns_sock *s = d->socks;
        d->socks = s->next;
        uv_close((uv_handle_t *)&s->poll, dns_sock_closed);
    }
    uv_close((uv_handle_t *)&d->timer, dns_timer_closed);
    uv_close((uv_handle_t *)&d->defer, dns_timer_closed);
}

void dns_close(struct dns *d, void (*on_closed)(void *arg), void *arg)
{
    if (d == NULL || d->closing)
        return;
    d->closing = 1;
    d->on_closed = on_closed;
    d->closed_arg = arg;
    uv_timer_stop(&d->timer);
    uv_timer_start(&d->defer, dns_on_defer, 0, 0);
}

struct dns *dns_new(uv_loop_t *loop, const struct dns_options *opts, char *err, size_t errlen)
{
    struct ares_options o;
    struct dns *d;
    int rc, mask;

    rc = ares_library_init(ARES_LIB_INIT_ALL);
    if (rc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: %s", ares_strerror(rc));
        return NULL;
    }
    d = xcalloc(1, sizeof(*d));
    d->loop = loop;
    d->deferred_tail = &d->deferred;

    memset(&o, 0, sizeof(o));
    o.flags = ARES_FLAG_EDNS;
    o.ednspsz = DNS_EDNS_PAYLOAD;
    o.timeout = opts && opts->timeout_ms > 0 ? opts->timeout_ms : 5000;
    o.tries = opts && opts->tries > 0 ? opts->tries : 2;
    o.sock_state_cb = dns_sock_state;
    o.sock_state_cb_data = d;
    mask = ARES_OPT_FLAGS | ARES_OPT_EDNSPSZ | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES |
           ARES_OPT_SOCK_STATE_CB;
    rc = ares_init_options(&d->ch, &o, mask);
    if (rc != ARES_SUCCESS) {
        snprintf(err, errlen, "c-ares: cannot start: %s", ares_strerror(rc));
        free(d);
        ares_library_cleanup();
        return NULL;
    }
    if (opts && opts->servers && opts->servers[0]) {
        rc = ares_set_servers_ports_csv(d->ch, opts->servers);
        if (rc != ARES_SUCCESS) {
            snprintf(err, errlen, "DNS servers \"%s\": %s (expected ip[:port] or "
                     "[ipv6]:port, separated by commas)", opts->servers, ares_strerror(rc));
            ares_destroy(d->ch);
            free(d);
            ares_library_cleanup();
            return NULL;
        }
    }
    uv_timer_init(loop, &d->timer);
    uv_timer_init(loop, &d->defer);
    d->timer.data = d;
    d->defer.data = d;
    d->handles = 2;
    return d;
}

/* ---- reverse names ------------------------------------------------------ */

int dns_reverse_name(const char *ip, const char *zone, char *out, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char a[16];
    struct buf b = BUF_INIT;
    int rc = -1;

    if (inet_pton(AF_INET, ip, a) == 1) {
        buf_appendf(&b, "%u.%u.%u.%u.%s", a[3], a[2], a[1], a[0], zone ? zone : "in-addr.arpa");
    } else if (inet_pton(AF_INET6, ip, a) == 1) {
        for (int i = 15; i >= 0; i--)
            buf_appendf(&b, "%c.%c.", hex[a[i] & 0xf], hex[a[i] >> 4]);
        buf_appends(&b, zone ? zone : "ip6.arpa");
    } else {
        return -1;
    }
    if (b.len < n) {
        memcpy(out, b.data, b.len + 1);
        rc = 0;
    }
    buf_free(&b);
    return rc;
}
