/*
 * api: the "api" transport, delivery through a third-party email API over
 * HTTPS (docs/api.md). One module does the HTTP work for every provider;
 * each provider (transports/api_<name>.c) only builds its request and
 * reads its response. This header is the contract between the two, and
 * what the unit tests reach.
 *
 * HTTP. libcurl's multi-socket interface driven by the libuv loop (one
 * uv_poll per socket curl opens, one uv_timer for curl's timeout): no
 * thread per request and no blocking call on the loop. The multi handle
 * keeps connections alive and reuses them, and negotiates HTTP/2 through
 * ALPN where the server offers it (streams are then multiplexed on one
 * connection). At most max_connections requests are in flight; others
 * wait in order. TLS peers are always verified (ca_file for a private CA).
 *
 * Requests. A send (one message, the recipients of one domain) becomes
 * one or more requests: each provider takes a bounded number of
 * recipients per request, and the JSON providers (which rebuild the
 * message) never put a recipient who is not in the To or Cc field of the
 * message where other recipients see it (api_plan_rcpts below). Each
 * request's outcome applies to its recipients.
 *
 * Outcomes. 2xx delivered (the provider's message id goes into the
 * recipient's text and the result's provider_id); 429 and 5xx temporary
 * (Retry-After honoured, reported in retry_after_ms); account and
 * authentication errors temporary and the transport unhealthy for
 * recover_after seconds, so the policy moves traffic elsewhere instead of
 * bouncing mail; other 4xx permanent with the provider's error text. A
 * request that failed after it was completely sent (timeout, connection
 * lost before the response) is ambiguous: the provider may have accepted
 * it.
 *
 * Secrets (API keys, AWS secret keys, webhook secrets) come from
 * environment variables or files named in the route, and never appear in
 * a log line, a result text or an error message: every text that leaves
 * this module is scrubbed of them.
 */
#ifndef MF_API_H
#define MF_API_H

#include <stddef.h>
#include <stdint.h>

#include <curl/curl.h>
#include <jansson.h>

#include "lib/buf.h"
#include "lib/mime.h"
#include "transports/transport.h"

extern const struct transport_ops api_transport_ops;

struct api_provider;

/* A route's settings, parsed and checked by api.c. Strings are owned by
 * the transport; secrets are wiped when it is freed. */
struct api_settings {
    const struct api_provider *provider;
    char *route;
    char *base_url;                 /* "https://host[:port][/path]", no trailing '/' */
    char *host;                     /* "host[:port]" as in the Host header */
    char *api_key;                  /* mailgun, sendgrid, postmark */
    char *basic_auth;               /* mailgun: base64 of "api:KEY" (a secret too) */
    char *domain;                   /* mailgun */
    char *region;                   /* ses */
    char *access_key_id, *secret_key, *session_token;   /* ses */
    char *configuration_set;        /* ses, NULL when none */
    char *message_stream;           /* postmark */
    char *webhook_secret;           /* webhook */
    char *ca_file;                  /* NULL: the system trust store */
    long long max_connections;      /* requests in flight */
    long long timeout;              /* seconds for a whole request */
    long long connect_timeout;      /* seconds */
    long long unhealthy_after;      /* consecutive connection or 5xx failures */
    long long recover_after;        /* seconds an unhealthy transport stays down */
    int resend_ambiguous;
};

/*
 * One HTTP request: the message and the recipients it covers. For the
 * JSON providers the recipients come with the roles they get in the
 * rebuilt message (to, cc, bcc); the raw providers use rcpts.
 */
struct api_call {
    const struct api_settings *cfg;
    const struct transport_msg *msg;  /* id, from, data, len */
    const struct mime_parts *parts;   /* JSON providers only, else NULL */
    const char **rcpts;               /* every recipient of the request */
    size_t nrcpts;
    const char **to, **cc, **bcc;     /* JSON providers: the roles */
    size_t nto, ncc, nbcc;
    int64_t now;                      /* unix seconds, for signatures */

    /* Filled by the provider's build(). The payload is body (or the
     * message itself) unless form is set. */
    struct buf url;
    struct curl_slist *headers;
    struct buf body;
    const char *payload;
    size_t payload_len;
    curl_mime *form;                  /* multipart/form-data, owned */
};

/* One response header as received (trimmed). */
struct api_header {
    char *name;
    char *value;
};

struct api_response {
    long status;                      /* HTTP status code */
    const char *body;                 /* NUL-terminated, at most API_BODY_MAX */
    size_t body_len;
    const struct api_header *headers;
    size_t nheaders;
    int64_t now;                      /* unix seconds, for Retry-After dates */
};

enum api_verdict {
    API_DELIVERED,                    /* 2xx */
    API_TEMP,                         /* try again later */
    API_PERM,                         /* failed for good */
    API_ACCOUNT,                      /* temporary, and the transport is unhealthy */
};

/* What a provider makes of a response. */
struct api_outcome {
    enum api_verdict verdict;
    int code;                         /* SMTP equivalent: 250, 451, 550 ... */
    char enhanced[16];                /* RFC 3463 */
    char text[400];                   /* for the DSN and the event */
    char id[128];                     /* provider message id, "" when none */
    int64_t retry_after_ms;           /* the provider asked to wait; 0 when not */
    int server_error;                 /* 5xx or unexpected: counts towards unhealthy_after */
};

struct api_provider {
    const char *name;                 /* the value of "provider =" */
    size_t max_rcpts;                 /* recipients per request */
    int json;                         /* the message is taken apart with lib/mime */
    /* Writes the default base URL (NULL: base_url is required). */
    void (*default_base_url)(const struct api_settings *s, struct buf *out);
    /* Builds the request into c (url, headers, body or form; easy is the
     * handle the request will run on, for curl_mime). Returns 0, or -1
     * with a reason in err (a message the provider cannot carry: the send
     * fails permanently with it). */
    int (*build)(struct api_call *c, CURL *easy, char *err, size_t errlen);
    /* Maps a response with an HTTP status to an outcome. */
    void (*parse)(const struct api_response *r, struct api_outcome *o);
};

extern const struct api_provider api_provider_mailgun;
extern const struct api_provider api_provider_ses;
extern const struct api_provider api_provider_sendgrid;
extern const struct api_provider api_provider_postmark;
extern const struct api_provider api_provider_webhook;

/*
 * How a send is split into requests. Recipients equal to an earlier one
 * (case-insensitively) are not sent twice: alias[i] names the first.
 *
 * Raw providers carry the message unchanged: recipients in message order,
 * max_rcpts per request, all as "to".
 *
 * JSON providers (parts given) rebuild the message and show every
 * recipient of a request in its To or Cc field, so a recipient the
 * original message shows nowhere (a Bcc) must never share a request with
 * one who would see it. Recipients named in the To field go to To, those
 * in the Cc field to Cc, the others to Bcc, visible ones first; without a
 * To, the Cc ones become To. A chunk made only of hidden recipients
 * becomes one request per recipient, each the sole To of its own copy.
 */
struct api_plan_req {
    size_t *idx;                      /* recipient indexes: to, then cc, then bcc */
    size_t n, nto, ncc;
};

struct api_plan {
    struct api_plan_req *reqs;
    size_t nreqs;
    size_t *alias;                    /* n entries */
};

void api_plan_rcpts(const struct api_provider *p, const char *const *rcpts, size_t n,
                    const struct mime_parts *parts, struct api_plan *pl);
void api_plan_free(struct api_plan *pl);

/* Looks a provider up by name; NULL when unknown. */
const struct api_provider *api_provider_find(const char *name);

#define API_BODY_MAX (64 * 1024)      /* response body kept */

/* ---- helpers for providers (api.c) ------------------------------------- */

/*
 * The generic mapping of an HTTP status to an outcome, used by every
 * provider for what it has no special rule for: 2xx delivered; 429 rate
 * limited (temporary, Retry-After honoured); 401, 402, 403 and 404 (wrong
 * key, account, or endpoint) account errors; 408 and 5xx temporary; 413
 * permanent 552 5.3.4; other 4xx permanent; anything else temporary.
 * detail is the provider's error text (may be NULL).
 */
void api_outcome_http(const struct api_response *r, const char *provider, const char *detail,
                      struct api_outcome *o);

/* Sets o to an account error (temporary, transport unhealthy). */
void api_outcome_account(struct api_outcome *o, const char *provider, long status,
                         const char *detail);

/* Sets o to a rate limit (temporary 451 4.7.0, whose text the policy's
 * throttle patterns recognise), with the wait the response asks for. */
void api_outcome_throttle(struct api_outcome *o, const struct api_response *r,
                          const char *provider, const char *detail);

/* Sets o to a delivery with the provider's id (may be NULL). */
void api_outcome_delivered(struct api_outcome *o, const char *provider, const char *id);

/* The value of response header name (case-insensitive), NULL when absent. */
const char *api_response_header(const struct api_response *r, const char *name);

/* Milliseconds to wait from a Retry-After value (RFC 9110 section
 * 10.2.3: delay-seconds or an HTTP-date), capped at one day; -1 when the
 * value is neither. */
int64_t api_retry_after_ms(const char *value, int64_t now);

/* Appends the base64 (RFC 4648, no line breaks) of n bytes to out. */
void api_base64(struct buf *out, const void *p, size_t n);

/* Copies len bytes of s into out as one line of printable text: control
 * characters become spaces, runs of blanks fold, the end is trimmed, and
 * the result is cut (with "...") to fit n. */
void api_clean_text(char *out, size_t n, const char *s, size_t len);

/* A new JSON string holding s; octets that are not valid UTF-8 become
 * U+FFFD (JSON text is UTF-8, RFC 8259 section 8.1). */
json_t *api_json_str(const char *s);

/* Adds "Name: value" to a curl header list. */
void api_add_header(struct curl_slist **l, const char *name, const char *value);

#endif
