/*
 * transport: the interface every way out of mailferry implements (smtp
 * smarthost, relay tunnel, third-party APIs), chosen by name from a route's
 * "transport =" setting (a vtable, like OpenSMTPD's queue backends).
 *
 * A transport takes one message with one or more recipients of one
 * destination domain and reports one result per recipient. It manages its
 * own connections, reuse and concurrency cap; send() never blocks.
 *
 * Lifetime rules: the done callback of transport_send() is called exactly
 * once, from the loop, never from inside transport_send(); after
 * transport_close() starts, pending sends complete with temporary failures
 * ("shutting down") before the closed callback.
 */
#ifndef MF_TRANSPORT_H
#define MF_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "lib/config.h"

struct transport;

/* The outcome for one recipient. */
struct transport_rcpt_result {
    int code;                 /* SMTP reply code, or an equivalent for APIs */
    char enhanced[16];        /* RFC 3463 code, "" when unknown */
    char text[512];           /* the peer's reply text (secrets never here) */
    int final;                /* 1: delivered (2xx) or failed for good (5xx);
                                 0: try again later */
    int ambiguous;            /* the message may have been accepted (timeout
                                 after the end of data was sent) */
};

/* send() copies the envelope (id, from, rcpts); the message bytes (data)
 * are not copied and must stay valid until the done callback. */
struct transport_msg {
    const char *id;           /* queue id, for logs */
    const char *from;         /* envelope sender, "" for <> */
    const char *const *rcpts; /* all in one destination domain */
    size_t nrcpts;
    const char *data;         /* exact message bytes, CRLF line ends */
    size_t len;
    int smtputf8;
    int body8bit;
};

struct transport_result {
    struct transport_rcpt_result *rcpt;   /* nrcpts entries, in msg order */
    size_t nrcpts;
    /* Set when the transport itself is unhealthy (cannot connect, auth
     * failure, account suspended): the policy moves traffic elsewhere. */
    int transport_failure;
    char remote[128];         /* who answered (host, API endpoint) */
    char provider_id[128];    /* API message id, "" otherwise */
    /* The peer asked not to be tried again before this many milliseconds
     * (HTTP Retry-After, RFC 9110 section 10.2.3); 0 when it did not say. */
    int64_t retry_after_ms;
    /* For recipients marked ambiguous: 1 when the route allows sending
     * them again through any route (resend_ambiguous = yes); 0 when they
     * must not be resent through another route, since the first may have
     * delivered them. */
    int resend_ambiguous;
};

typedef void (*transport_done_cb)(const struct transport_result *res, void *arg);

struct transport_ops {
    const char *name;         /* "smtp", "relay", "api" */
    /* Creates the transport for a route from its key/values (the route's
     * [route NAME] section entries that are not policy keys). Returns NULL
     * with a message naming the key in err. */
    struct transport *(*create)(uv_loop_t *loop, const char *route,
                                const struct config_named *kv, size_t nkv,
                                char *err, size_t errlen);
    void (*send)(struct transport *t, const struct transport_msg *m,
                 transport_done_cb cb, void *arg);
    /* 1 healthy, 0 not; why gets a short reason. */
    int (*health)(struct transport *t, char *why, size_t whylen);
    void (*close)(struct transport *t, void (*closed)(void *arg), void *arg);
    /* 1: when health() turns from healthy to unhealthy, the router also
     * opens the route's breaker (cause "health"), so that the route takes
     * traffic back through the breaker's half-open probes rather than all
     * at once when it is healthy again (the relay: a DNSBL listing, a PTR
     * mismatch or a dead tunnel). 0: the route resumes as soon as it is
     * healthy. */
    int health_opens_breaker;
};

/* Looks a transport up by name; NULL when unknown. */
const struct transport_ops *transport_find(const char *name);

#endif
