/*
 * The "api" transport: configuration, the libcurl multi-socket engine on
 * the libuv loop, request planning, result mapping and health. Providers
 * (api_<name>.c) build requests and read responses; see api.h.
 *
 * Engine. curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION:
 * one uv_poll per socket, attached with curl_multi_assign) and when to
 * call it back (CURLMOPT_TIMERFUNCTION: one uv_timer). Readiness and timer
 * expiry go back through curl_multi_socket_action; finished transfers are
 * collected with curl_multi_info_read afterwards, never from inside a curl
 * callback. The multi handle caches connections (keep-alive) and
 * multiplexes HTTP/2 streams; CURLMOPT_MAX_TOTAL_CONNECTIONS and our own
 * in-flight cap (max_connections) bound what one route opens.
 *
 * Lifetimes. A send owns its requests; a request owns its easy handle and
 * request body. Done callbacks run from a zero-delay timer, never from
 * inside send() or a curl callback. close() fails what is queued, lets
 * requests in flight finish (each is bounded by timeout), then closes the
 * poll handles before curl_multi_cleanup (with the callbacks detached, so
 * curl cannot call back into a closing transport), then the timers; the
 * closed callback runs when the last handle's close callback has run.
 */
#include "transports/api.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <glib.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "lib/config.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

#define API_SECRET_MAX 4096        /* longest secret read from a file */
#define API_HEADERS_MAX 64         /* response headers kept */
#define API_HEADER_BYTES 16384     /* and their total size */
#define API_RETRY_AFTER_MAX_MS (86400LL * 1000)

/* ---- providers ---------------------------------------------------------------- */

static const struct api_provider *const api_providers[] = {
    &api_provider_mailgun, &api_provider_ses, &api_provider_sendgrid, &api_provider_postmark,
    &api_provider_webhook,
};

#define P_MAILGUN (1u << 0)
#define P_SES (1u << 1)
#define P_SENDGRID (1u << 2)
#define P_POSTMARK (1u << 3)
#define P_WEBHOOK (1u << 4)
#define P_ALL 0x1fu

const struct api_provider *api_provider_find(const char *name)
{
    for (size_t i = 0; i < sizeof(api_providers) / sizeof(api_providers[0]); i++)
        if (strcmp(api_providers[i]->name, name) == 0)
            return api_providers[i];
    return NULL;
}

static unsigned api_provider_bit(const struct api_provider *p)
{
    for (size_t i = 0; i < sizeof(api_providers) / sizeof(api_providers[0]); i++)
        if (api_providers[i] == p)
            return 1u << i;
    return 0;
}

/* ---- configuration -------------------------------------------------------------- */

enum ak_type { AK_STR, AK_INT, AK_BOOL };

enum api_key_id {
    K_PROVIDER, K_BASE_URL, K_API_KEY_ENV, K_API_KEY_FILE, K_DOMAIN, K_REGION,
    K_ACCESS_KEY_ID_ENV, K_ACCESS_KEY_ID_FILE, K_SECRET_KEY_ENV, K_SECRET_KEY_FILE,
    K_SESSION_TOKEN_ENV, K_SESSION_TOKEN_FILE, K_CONFIGURATION_SET, K_MESSAGE_STREAM,
    K_WEBHOOK_SECRET_ENV, K_WEBHOOK_SECRET_FILE, K_CA_FILE, K_MAX_CONNECTIONS, K_TIMEOUT,
    K_CONNECT_TIMEOUT, K_RESEND_AMBIGUOUS, K_UNHEALTHY_AFTER, K_RECOVER_AFTER,
    K__COUNT
};

struct api_key {
    const char *name;
    enum ak_type type;
    unsigned providers;         /* which providers read it */
    const char *def;            /* NULL: no default */
    long long min, max;
};

/* Every key of an api route (docs/api.md documents each). A key the chosen
 * provider does not read is an error, like an unknown key: it is a typo
 * or a leftover that would silently do nothing. */
static const struct api_key api_keys[K__COUNT] = {
    [K_PROVIDER] = {"provider", AK_STR, P_ALL, NULL, 0, 0},
    [K_BASE_URL] = {"base_url", AK_STR, P_ALL, NULL, 0, 0},
    [K_API_KEY_ENV] = {"api_key_env", AK_STR, P_MAILGUN | P_SENDGRID | P_POSTMARK, NULL, 0, 0},
    [K_API_KEY_FILE] = {"api_key_file", AK_STR, P_MAILGUN | P_SENDGRID | P_POSTMARK, NULL, 0, 0},
    [K_DOMAIN] = {"domain", AK_STR, P_MAILGUN, NULL, 0, 0},
    [K_REGION] = {"region", AK_STR, P_SES, NULL, 0, 0},
    [K_ACCESS_KEY_ID_ENV] = {"access_key_id_env", AK_STR, P_SES, NULL, 0, 0},
    [K_ACCESS_KEY_ID_FILE] = {"access_key_id_file", AK_STR, P_SES, NULL, 0, 0},
    [K_SECRET_KEY_ENV] = {"secret_key_env", AK_STR, P_SES, NULL, 0, 0},
    [K_SECRET_KEY_FILE] = {"secret_key_file", AK_STR, P_SES, NULL, 0, 0},
    [K_SESSION_TOKEN_ENV] = {"session_token_env", AK_STR, P_SES, NULL, 0, 0},
    [K_SESSION_TOKEN_FILE] = {"session_token_file", AK_STR, P_SES, NULL, 0, 0},
    [K_CONFIGURATION_SET] = {"configuration_set", AK_STR, P_SES, NULL, 0, 0},
    [K_MESSAGE_STREAM] = {"message_stream", AK_STR, P_POSTMARK, "outbound", 0, 0},
    [K_WEBHOOK_SECRET_ENV] = {"webhook_secret_env", AK_STR, P_WEBHOOK, NULL, 0, 0},
    [K_WEBHOOK_SECRET_FILE] = {"webhook_secret_file", AK_STR, P_WEBHOOK, NULL, 0, 0},
    [K_CA_FILE] = {"ca_file", AK_STR, P_ALL, NULL, 0, 0},
    [K_MAX_CONNECTIONS] = {"max_connections", AK_INT, P_ALL, "16", 1, 1000},
    [K_TIMEOUT] = {"timeout", AK_INT, P_ALL, "30", 1, 600},
    [K_CONNECT_TIMEOUT] = {"connect_timeout", AK_INT, P_ALL, "10", 1, 300},
    [K_RESEND_AMBIGUOUS] = {"resend_ambiguous", AK_BOOL, P_ALL, "no", 0, 0},
    [K_UNHEALTHY_AFTER] = {"unhealthy_after", AK_INT, P_ALL, "3", 1, 1000000},
    [K_RECOVER_AFTER] = {"recover_after", AK_INT, P_ALL, "60", 1, 86400},
};

/* Secrets: each from an environment variable or a file, never both. */
struct api_secret_src {
    enum api_key_id env, file;
    unsigned required;          /* providers that need it */
    size_t offset;              /* char * field of struct api_settings */
};

static const struct api_secret_src api_secret_srcs[] = {
    {K_API_KEY_ENV, K_API_KEY_FILE, P_MAILGUN | P_SENDGRID | P_POSTMARK,
     offsetof(struct api_settings, api_key)},
    {K_ACCESS_KEY_ID_ENV, K_ACCESS_KEY_ID_FILE, P_SES, offsetof(struct api_settings, access_key_id)},
    {K_SECRET_KEY_ENV, K_SECRET_KEY_FILE, P_SES, offsetof(struct api_settings, secret_key)},
    {K_SESSION_TOKEN_ENV, K_SESSION_TOKEN_FILE, 0, offsetof(struct api_settings, session_token)},
    {K_WEBHOOK_SECRET_ENV, K_WEBHOOK_SECRET_FILE, P_WEBHOOK,
     offsetof(struct api_settings, webhook_secret)},
};

/* ---- state ------------------------------------------------------------------------ */

struct api_transport;
struct api_send;

/* One socket curl asked us to watch. */
struct api_sock {
    uv_poll_t poll;
    struct api_transport *t;
    curl_socket_t fd;
    struct api_sock *next, *prev;
    int closing;
};

struct api_req {
    struct api_req *next;         /* the wait queue */
    struct api_send *send;
    size_t *idx;                  /* recipients: to, then cc, then bcc */
    size_t n, nto, ncc;
    CURL *easy;
    struct api_call call;
    const char **roles;           /* the pointers call.to/cc/bcc/rcpts point into */
    struct buf resp;
    struct api_header hdrs[API_HEADERS_MAX];
    size_t nhdrs, hdr_bytes;
    char errbuf[CURL_ERROR_SIZE];
    uint64_t started;             /* uv_now */
};

struct api_send {
    struct api_send *next;        /* the completion list */
    struct api_transport *t;
    struct transport_msg msg;     /* envelope copied; data is the caller's */
    char *id, *from;
    char **rcpts;
    size_t *alias;                /* alias[i]: the first recipient equal to i */
    transport_done_cb cb;
    void *arg;
    struct transport_result res;
    struct mime_parts parts;
    int have_parts;
    size_t reqs_left;
};

struct api_transport {
    uv_loop_t *loop;
    struct api_settings cfg;
    CURLM *multi;
    uv_timer_t curl_timer;        /* curl's timeout */
    uv_timer_t defer;             /* runs done callbacks */
    int handles_open;
    struct api_sock *socks;

    struct api_req *qhead, *qtail;   /* waiting for a slot, FIFO */
    size_t nqueued, inflight;
    struct api_send *dhead, *dtail;  /* completed, callbacks pending */

    unsigned failures;            /* consecutive connection / server failures */
    uint64_t down_until;          /* uv_now ms; 0: healthy */
    char last_error[400];

    int closing, finishing;
    void (*closed)(void *arg);
    void *closed_arg;
};

static void api_dispatch(struct api_transport *t);
static void api_maybe_finish(struct api_transport *t);

static void api_strf(char *out, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* snprintf for texts that may be cut to fit (results, reasons). */
static void api_strf(char *out, size_t n, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(out, n, fmt, ap);
    va_end(ap);
}

/* ---- helpers shared with the providers ------------------------------------------- */

void api_base64(struct buf *out, const void *p, size_t n)
{
    size_t chunk = 48 * 1024;    /* a multiple of 3: no padding inside */
    const unsigned char *s = p;

    buf_reserve(out, (n + 2) / 3 * 4);
    while (n > 0) {
        size_t k = n < chunk ? n : chunk;
        int w;

        buf_reserve(out, (k + 2) / 3 * 4);
        w = EVP_EncodeBlock((unsigned char *)out->data + out->len, s, (int)k);
        out->len += (size_t)w;
        s += k;
        n -= k;
    }
    out->data[out->len] = '\0';
}

void api_clean_text(char *out, size_t n, const char *s, size_t len)
{
    size_t o = 0;
    int space = 0;

    if (n == 0)
        return;
    for (size_t i = 0; i < len && s != NULL; i++) {
        unsigned char c = (unsigned char)s[i];

        if (c < 0x20 || c == 0x7f || c == ' ') {
            space = o > 0;
            continue;
        }
        if (space) {
            if (o + 1 >= n)
                break;
            out[o++] = ' ';
            space = 0;
        }
        if (o + 1 >= n) {
            o = n;                /* mark as cut */
            break;
        }
        out[o++] = (char)c;
    }
    if (o >= n) {
        /* Cut: end on a whole UTF-8 sequence, then "...". */
        o = n > 4 ? n - 4 : 0;
        while (o > 0 && ((unsigned char)out[o] & 0xc0) == 0x80)
            o--;
        if (n > 4) {
            memcpy(out + o, "...", 3);
            o += 3;
        }
    }
    out[o] = '\0';
}

void api_add_header(struct curl_slist **l, const char *name, const char *value)
{
    struct buf b = BUF_INIT;
    struct curl_slist *nl;

    buf_appendf(&b, "%s: %s", name, value);
    nl = curl_slist_append(*l, b.data);
    if (nl == NULL)
        log_fatal("event=out_of_memory where=curl_slist_append");
    *l = nl;
    OPENSSL_cleanse(b.data, b.len);   /* may carry a credential */
    buf_free(&b);
}

json_t *api_json_str(const char *s)
{
    json_t *j = json_string(s != NULL ? s : "");
    gchar *v;

    if (j != NULL)
        return j;
    v = g_utf8_make_valid(s, -1);
    j = json_string(v);
    g_free(v);
    return j;
}

const char *api_response_header(const struct api_response *r, const char *name)
{
    for (size_t i = 0; i < r->nheaders; i++)
        if (strcasecmp(r->headers[i].name, name) == 0)
            return r->headers[i].value;
    return NULL;
}

int64_t api_retry_after_ms(const char *value, int64_t now)
{
    const char *p = value;
    long long secs = 0;
    time_t when;

    if (value == NULL)
        return -1;
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p >= '0' && *p <= '9') {
        for (; *p >= '0' && *p <= '9'; p++) {
            if (secs > 86400)
                continue;         /* capped below; keep consuming digits */
            secs = secs * 10 + (*p - '0');
        }
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p != '\0')
            return -1;
        return secs * 1000 > API_RETRY_AFTER_MAX_MS ? API_RETRY_AFTER_MAX_MS : secs * 1000;
    }
    when = curl_getdate(p, NULL);
    if (when == (time_t)-1)
        return -1;
    if ((int64_t)when <= now)
        return 0;
    if (((int64_t)when - now) * 1000 > API_RETRY_AFTER_MAX_MS)
        return API_RETRY_AFTER_MAX_MS;
    return ((int64_t)when - now) * 1000;
}

static void api_outcome_set(struct api_outcome *o, enum api_verdict v, int code,
                            const char *enhanced, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static void api_outcome_set(struct api_outcome *o, enum api_verdict v, int code,
                            const char *enhanced, const char *fmt, ...)
{
    va_list ap;

    o->verdict = v;
    o->code = code;
    snprintf(o->enhanced, sizeof(o->enhanced), "%s", enhanced);
    va_start(ap, fmt);
    vsnprintf(o->text, sizeof(o->text), fmt, ap);
    va_end(ap);
}

void api_outcome_delivered(struct api_outcome *o, const char *provider, const char *id)
{
    char clean[sizeof(o->id)];

    api_clean_text(clean, sizeof(clean), id, id != NULL ? strlen(id) : 0);
    snprintf(o->id, sizeof(o->id), "%s", clean);
    if (o->id[0] != '\0')
        api_outcome_set(o, API_DELIVERED, 250, "2.0.0", "%s accepted, id %s", provider, o->id);
    else
        api_outcome_set(o, API_DELIVERED, 250, "2.0.0", "%s accepted", provider);
}

void api_outcome_account(struct api_outcome *o, const char *provider, long status,
                         const char *detail)
{
    char d[300];

    api_clean_text(d, sizeof(d), detail, detail != NULL ? strlen(detail) : 0);
    /* RFC 3463 X.7.8: authentication credentials invalid; X.7.0 for the
     * account states (suspended, paused, quota). */
    api_outcome_set(o, API_ACCOUNT, 451, status == 401 ? "4.7.8" : "4.7.0",
                    "%s HTTP %ld%s%s (account or credentials problem; route marked unhealthy)",
                    provider, status, d[0] ? ": " : "", d);
}

void api_outcome_throttle(struct api_outcome *o, const struct api_response *r,
                          const char *provider, const char *detail)
{
    char d[300], wait[64] = "";
    int64_t ms = api_retry_after_ms(api_response_header(r, "Retry-After"), r->now);

    api_clean_text(d, sizeof(d), detail, detail != NULL ? strlen(detail) : 0);
    if (ms >= 0) {
        o->retry_after_ms = ms;
        snprintf(wait, sizeof(wait), "; retry after %" PRId64 " s", (ms + 999) / 1000);
    }
    /* "rate limited" is in the default throttle.patterns of the policy
     * (docs/policy.md): every API rate limit reads as a throttle, whatever
     * words the provider chose. */
    api_outcome_set(o, API_TEMP, 451, "4.7.0", "%s HTTP %ld: rate limited%s%s%s", provider,
                    r->status, d[0] ? ": " : "", d, wait);
}

void api_outcome_http(const struct api_response *r, const char *provider, const char *detail,
                      struct api_outcome *o)
{
    long st = r->status;
    char d[300];

    api_clean_text(d, sizeof(d), detail, detail != NULL ? strlen(detail) : 0);
    if (st >= 200 && st < 300) {
        api_outcome_delivered(o, provider, NULL);
    } else if (st == 429) {
        api_outcome_throttle(o, r, provider, detail);
    } else if (st == 401 || st == 402 || st == 403 || st == 404) {
        api_outcome_account(o, provider, st, detail);
    } else if (st == 408 || (st >= 500 && st < 600)) {
        int64_t ms = api_retry_after_ms(api_response_header(r, "Retry-After"), r->now);

        if (ms >= 0)
            o->retry_after_ms = ms;
        o->server_error = 1;
        api_outcome_set(o, API_TEMP, 451, "4.3.0", "%s HTTP %ld%s%s", provider, st,
                        d[0] ? ": " : "", d);
    } else if (st == 413) {
        api_outcome_set(o, API_PERM, 552, "5.3.4", "%s HTTP 413: message too big for the API%s%s",
                        provider, d[0] ? ": " : "", d);
    } else if (st >= 400 && st < 500) {
        api_outcome_set(o, API_PERM, 554, "5.0.0", "%s HTTP %ld%s%s", provider, st,
                        d[0] ? ": " : "", d);
    } else {
        o->server_error = 1;
        api_outcome_set(o, API_TEMP, 451, "4.3.0", "%s answered HTTP %ld unexpectedly", provider,
                        st);
    }
}

/* ---- configuration parsing --------------------------------------------------------- */

/* Reads the first line of a secret file (without its line end). */
static int api_read_secret(const char *path, char **out, char *err, size_t errlen)
{
    char *buf = xmalloc(API_SECRET_MAX + 2);
    FILE *f = fopen(path, "r");
    size_t n;

    if (f == NULL) {
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
        free(buf);
        return -1;
    }
    n = fread(buf, 1, API_SECRET_MAX + 1, f);
    fclose(f);
    buf[n] = '\0';
    n = strcspn(buf, "\r\n");
    if (n > API_SECRET_MAX || n == 0) {
        snprintf(err, errlen, "%s: %s", path,
                 n == 0 ? "empty" : "first line longer than 4096 octets");
        OPENSSL_cleanse(buf, API_SECRET_MAX + 2);
        free(buf);
        return -1;
    }
    *out = xstrndup(buf, n);
    OPENSSL_cleanse(buf, API_SECRET_MAX + 2);
    free(buf);
    return 0;
}

static void api_secret_free(char **p)
{
    if (*p != NULL) {
        OPENSSL_cleanse(*p, strlen(*p));
        free(*p);
        *p = NULL;
    }
}

static void api_settings_free(struct api_settings *s)
{
    free(s->route);
    free(s->base_url);
    free(s->host);
    api_secret_free(&s->api_key);
    api_secret_free(&s->basic_auth);
    free(s->domain);
    free(s->region);
    api_secret_free(&s->access_key_id);
    api_secret_free(&s->secret_key);
    api_secret_free(&s->session_token);
    free(s->configuration_set);
    free(s->message_stream);
    api_secret_free(&s->webhook_secret);
    free(s->ca_file);
}

/* base_url: https only, no credentials in it (they would reach logs), no
 * query or fragment except for a webhook's own URL. Sets base_url without
 * a trailing slash and host. */
static int api_parse_base_url(struct api_settings *s, const char *v, char *err, size_t errlen)
{
    const char *h, *slash;
    size_t len = strlen(v), hlen;

    if (strncasecmp(v, "https://", 8) != 0) {
        snprintf(err, errlen, "must be an https:// URL, got \"%s\"", v);
        return -1;
    }
    h = v + 8;
    slash = h + strcspn(h, "/?#");
    hlen = (size_t)(slash - h);
    if (hlen == 0 || hlen > 261) {
        snprintf(err, errlen, "no host in \"%s\"", v);
        return -1;
    }
    if (memchr(h, '@', hlen) != NULL) {
        snprintf(err, errlen, "must not carry credentials (user@host); use the *_env or *_file "
                 "keys");
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)v[i] <= ' ' || (unsigned char)v[i] >= 0x7f) {
            snprintf(err, errlen, "blank or non-ASCII character in the URL");
            return -1;
        }
    }
    if (s->provider != &api_provider_webhook && strpbrk(h, "?#") != NULL) {
        snprintf(err, errlen, "must not have a query or fragment");
        return -1;
    }
    while (len > 8 + hlen && v[len - 1] == '/')
        len--;
    s->base_url = xstrndup(v, len);
    s->host = xstrndup(h, hlen);
    for (char *c = s->host; *c != '\0'; c++)
        *c = (char)tolower((unsigned char)*c);
    /* Port 443 is the default: curl leaves it out of the Host header. */
    if (hlen > 4 && strcmp(s->host + hlen - 4, ":443") == 0)
        s->host[hlen - 4] = '\0';
    return 0;
}

static int api_name_ok(const char *v, const char *extra)
{
    if (v[0] == '\0')
        return 0;
    for (const char *p = v; *p != '\0'; p++)
        if (!isalnum((unsigned char)*p) && strchr(extra, *p) == NULL)
            return 0;
    return 1;
}

/*
 * Builds the settings from the route's keys. On error writes "key:
 * reason" into err and returns -1; secret values never appear in err.
 */
static int api_configure(struct api_settings *s, const struct config_named *kv, size_t nkv,
                         char *err, size_t errlen)
{
    const char *val[K__COUNT] = {0};
    long long num[K__COUNT] = {0};
    char why[300], msg[600];
    unsigned bit;
    int k;

#define API_ERR(key, ...)                                                                 \
    do {                                                                                  \
        api_strf(msg, sizeof(msg), __VA_ARGS__);                                          \
        api_strf(err, errlen, "%s: %s", key, msg);                                         \
        return -1;                                                                        \
    } while (0)

    for (size_t i = 0; i < nkv; i++) {
        for (k = 0; k < K__COUNT; k++)
            if (strcmp(kv[i].key, api_keys[k].name) == 0)
                break;
        if (k == K__COUNT)
            API_ERR(kv[i].key, "unknown key for the api transport");
        if (val[k] != NULL)
            API_ERR(kv[i].key, "set twice");
        val[k] = kv[i].value;
    }
    if (val[K_PROVIDER] == NULL)
        API_ERR("provider", "required: mailgun, ses, sendgrid, postmark or webhook");
    s->provider = api_provider_find(val[K_PROVIDER]);
    if (s->provider == NULL)
        API_ERR("provider", "must be mailgun, ses, sendgrid, postmark or webhook, got \"%s\"",
                val[K_PROVIDER]);
    bit = api_provider_bit(s->provider);
    for (k = 0; k < K__COUNT; k++) {
        const char *v = val[k] != NULL ? val[k] : api_keys[k].def;

        if (val[k] != NULL && !(api_keys[k].providers & bit))
            API_ERR(api_keys[k].name, "not used by provider %s", s->provider->name);
        if (v == NULL)
            continue;
        switch (api_keys[k].type) {
        case AK_INT:
            if (config_parse_int(v, api_keys[k].min, api_keys[k].max, &num[k], why, sizeof(why)))
                API_ERR(api_keys[k].name, "%s, got \"%s\"", why, v);
            break;
        case AK_BOOL: {
            int b;

            if (config_parse_bool(v, &b, why, sizeof(why)) != 0)
                API_ERR(api_keys[k].name, "%s, got \"%s\"", why, v);
            num[k] = b;
            break;
        }
        case AK_STR:
            if (v[0] == '\0')
                API_ERR(api_keys[k].name, "must not be empty");
            break;
        }
    }

    /* Secrets. */
    for (size_t i = 0; i < sizeof(api_secret_srcs) / sizeof(api_secret_srcs[0]); i++) {
        const struct api_secret_src *src = &api_secret_srcs[i];
        char **dst = (char **)((char *)s + src->offset);
        const char *env = val[src->env], *file = val[src->file];

        if (env != NULL && file != NULL)
            API_ERR(api_keys[src->file].name, "set either %s or %s", api_keys[src->env].name,
                    api_keys[src->file].name);
        if (env == NULL && file == NULL) {
            if (src->required & bit)
                API_ERR(api_keys[src->env].name, "required for provider %s (or %s)",
                        s->provider->name, api_keys[src->file].name);
            continue;
        }
        if (env != NULL) {
            const char *p = getenv(env);

            if (p == NULL || p[0] == '\0')
                API_ERR(api_keys[src->env].name, "environment variable %s is not set", env);
            if (strlen(p) > API_SECRET_MAX)
                API_ERR(api_keys[src->env].name, "environment variable %s is longer than 4096 "
                        "octets", env);
            *dst = xstrdup(p);
        } else if (api_read_secret(file, dst, why, sizeof(why)) != 0) {
            API_ERR(api_keys[src->file].name, "%s", why);
        }
        /* A secret goes into HTTP headers: no line breaks or controls. */
        for (const char *c = *dst; *c != '\0'; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f)
                API_ERR(env != NULL ? api_keys[src->env].name : api_keys[src->file].name,
                        "the secret holds a control character");
    }

    if (s->provider == &api_provider_mailgun) {
        struct buf b = BUF_INIT, enc = BUF_INIT;

        if (val[K_DOMAIN] == NULL)
            API_ERR("domain", "required for provider mailgun (the sending domain)");
        if (!api_name_ok(val[K_DOMAIN], ".-"))
            API_ERR("domain", "must be a domain name, got \"%s\"", val[K_DOMAIN]);
        s->domain = xstrdup(val[K_DOMAIN]);
        buf_appendf(&b, "api:%s", s->api_key);
        api_base64(&enc, b.data, b.len);
        s->basic_auth = buf_steal(&enc, NULL);
        OPENSSL_cleanse(b.data, b.len);
        buf_free(&b);
    }
    if (s->provider == &api_provider_ses) {
        if (val[K_REGION] == NULL)
            API_ERR("region", "required for provider ses (e.g. eu-west-1)");
        if (!api_name_ok(val[K_REGION], "-"))
            API_ERR("region", "must be an AWS region name, got \"%s\"", val[K_REGION]);
        s->region = xstrdup(val[K_REGION]);
        if (val[K_CONFIGURATION_SET] != NULL) {
            if (!api_name_ok(val[K_CONFIGURATION_SET], "-_"))
                API_ERR("configuration_set", "must be letters, digits, '-' and '_', got \"%s\"",
                        val[K_CONFIGURATION_SET]);
            s->configuration_set = xstrdup(val[K_CONFIGURATION_SET]);
        }
    }
    if (s->provider == &api_provider_postmark) {
        if (!api_name_ok(val[K_MESSAGE_STREAM] ? val[K_MESSAGE_STREAM] : "outbound", "-_"))
            API_ERR("message_stream", "must be letters, digits, '-' and '_', got \"%s\"",
                    val[K_MESSAGE_STREAM]);
        s->message_stream = xstrdup(val[K_MESSAGE_STREAM] ? val[K_MESSAGE_STREAM] : "outbound");
    }

    if (val[K_BASE_URL] != NULL) {
        if (api_parse_base_url(s, val[K_BASE_URL], why, sizeof(why)) != 0)
            API_ERR("base_url", "%s", why);
    } else if (s->provider->default_base_url != NULL) {
        struct buf b = BUF_INIT;

        s->provider->default_base_url(s, &b);
        if (api_parse_base_url(s, b.data, why, sizeof(why)) != 0) {
            buf_free(&b);
            API_ERR("base_url", "%s", why);
        }
        buf_free(&b);
    } else {
        API_ERR("base_url", "required for provider %s (the full https:// URL to POST to)",
                s->provider->name);
    }
    if (val[K_CA_FILE] != NULL) {
        FILE *f = fopen(val[K_CA_FILE], "r");

        if (f == NULL)
            API_ERR("ca_file", "cannot open %s: %s", val[K_CA_FILE], strerror(errno));
        fclose(f);
        s->ca_file = xstrdup(val[K_CA_FILE]);
    }
    s->max_connections = num[K_MAX_CONNECTIONS];
    s->timeout = num[K_TIMEOUT];
    s->connect_timeout = num[K_CONNECT_TIMEOUT];
    s->unhealthy_after = num[K_UNHEALTHY_AFTER];
    s->recover_after = num[K_RECOVER_AFTER];
    s->resend_ambiguous = (int)num[K_RESEND_AMBIGUOUS];
    return 0;
#undef API_ERR
}

/*
 * Replaces every occurrence of a configured secret in text (size n) with
 * "[redacted]". A provider may echo a key back in an error body; nothing
 * that leaves this module may carry one.
 */
static void api_redact(const struct api_settings *s, char *text, size_t n)
{
    const char *secrets[] = {s->api_key, s->basic_auth, s->access_key_id, s->secret_key,
                             s->session_token, s->webhook_secret};

    for (size_t i = 0; i < sizeof(secrets) / sizeof(secrets[0]); i++) {
        const char *sec = secrets[i];
        size_t sl;
        char *p;

        if (sec == NULL || (sl = strlen(sec)) < 4)
            continue;
        while ((p = strstr(text, sec)) != NULL) {
            struct buf b = BUF_INIT;

            buf_append(&b, text, (size_t)(p - text));
            buf_appends(&b, "[redacted]");
            buf_appends(&b, p + sl);
            snprintf(text, n, "%s", b.data);
            buf_free(&b);
        }
    }
}

/* ---- sends and their completion ---------------------------------------------------- */

static void api_send_free(struct api_send *s)
{
    for (size_t i = 0; i < s->msg.nrcpts; i++)
        free(s->rcpts[i]);
    free(s->rcpts);
    free(s->alias);
    free(s->id);
    free(s->from);
    free(s->res.rcpt);
    if (s->have_parts)
        mime_parts_free(&s->parts);
    free(s);
}

static void api_on_defer(uv_timer_t *h)
{
    struct api_transport *t = h->data;

    while (t->dhead != NULL) {
        struct api_send *s = t->dhead;

        t->dhead = s->next;
        if (t->dhead == NULL)
            t->dtail = NULL;
        s->cb(&s->res, s->arg);
        api_send_free(s);
    }
    api_maybe_finish(t);
}

/* Queues the done callback of a finished send; it runs from the defer
 * timer. Recipients that repeat an earlier one get its result. */
static void api_complete(struct api_transport *t, struct api_send *s)
{
    for (size_t i = 0; i < s->res.nrcpts; i++)
        if (s->alias[i] != i)
            s->res.rcpt[i] = s->res.rcpt[s->alias[i]];
    s->next = NULL;
    if (t->dtail != NULL)
        t->dtail->next = s;
    else
        t->dhead = s;
    t->dtail = s;
    uv_timer_start(&t->defer, api_on_defer, 0, 0);
}

static void api_req_free(struct api_req *r)
{
    if (r->call.headers != NULL) {
        /* Header lines may carry credentials: wipe before freeing. */
        for (struct curl_slist *l = r->call.headers; l != NULL; l = l->next)
            OPENSSL_cleanse(l->data, strlen(l->data));
        curl_slist_free_all(r->call.headers);
    }
    if (r->call.form != NULL)
        curl_mime_free(r->call.form);
    buf_free(&r->call.url);
    buf_free(&r->call.body);
    buf_free(&r->resp);
    for (size_t i = 0; i < r->nhdrs; i++) {
        free(r->hdrs[i].name);
        free(r->hdrs[i].value);
    }
    free(r->roles);
    free(r->idx);
    free(r);
}

static const char *const api_verdict_names[] = {
    [API_DELIVERED] = "delivered", [API_TEMP] = "deferred", [API_PERM] = "failed",
    [API_ACCOUNT] = "account_error",
};

/* Health bookkeeping for one finished request. */
static void api_health_note(struct api_transport *t, const struct api_outcome *o)
{
    uint64_t now = uv_now(t->loop);
    int was_down = t->down_until != 0 && now < t->down_until;
    char q[400];

    if (o->verdict == API_ACCOUNT || o->server_error) {
        if (o->server_error)
            t->failures++;
        snprintf(t->last_error, sizeof(t->last_error), "%s", o->text);
        if (o->verdict == API_ACCOUNT || t->failures >= (unsigned)t->cfg.unhealthy_after) {
            t->down_until = now + (uint64_t)t->cfg.recover_after * 1000;
            if (!was_down)
                log_warn("route=%s event=unhealthy provider=%s host=%s failures=%u "
                         "recover_after_s=%lld reason=%s", t->cfg.route, t->cfg.provider->name,
                         t->cfg.host, t->failures, t->cfg.recover_after,
                         log_quote(q, sizeof(q), o->text, strlen(o->text)));
        }
        return;
    }
    /* A proper answer (delivered, refused, rate limited): the API works. */
    if (t->down_until != 0)
        log_info("route=%s event=healthy provider=%s host=%s", t->cfg.route,
                 t->cfg.provider->name, t->cfg.host);
    t->failures = 0;
    t->down_until = 0;
    t->last_error[0] = '\0';
}

/* Applies a request's outcome to its recipients; completes the send when
 * it was the last request. Consumes r. */
static void api_req_outcome(struct api_transport *t, struct api_req *r, struct api_outcome *o,
                            int ambiguous, long status)
{
    struct api_send *s = r->send;
    uint64_t latency = r->started ? uv_now(t->loop) - r->started : 0;
    char q[500];

    api_redact(&t->cfg, o->text, sizeof(o->text));
    api_redact(&t->cfg, o->id, sizeof(o->id));
    for (size_t k = 0; k < r->n; k++) {
        struct transport_rcpt_result *rr = &s->res.rcpt[r->idx[k]];

        rr->code = o->code;
        snprintf(rr->enhanced, sizeof(rr->enhanced), "%s", o->enhanced);
        snprintf(rr->text, sizeof(rr->text), "%s", o->text);
        rr->final = !ambiguous && (o->verdict == API_DELIVERED || o->verdict == API_PERM);
        rr->ambiguous = ambiguous;
    }
    if (o->id[0] != '\0' && s->res.provider_id[0] == '\0')
        snprintf(s->res.provider_id, sizeof(s->res.provider_id), "%s", o->id);
    if (o->retry_after_ms > s->res.retry_after_ms)
        s->res.retry_after_ms = o->retry_after_ms;
    if (o->verdict == API_ACCOUNT || o->server_error)
        s->res.transport_failure = 1;
    log_info("route=%s msg=%s event=api_result provider=%s host=%s status=%ld rcpts=%zu "
             "result=%s ambiguous=%d id=%s retry_after_ms=%" PRId64 " latency_ms=%" PRIu64
             " reason=%s", t->cfg.route, s->id, t->cfg.provider->name, t->cfg.host, status, r->n,
             ambiguous ? "ambiguous" : api_verdict_names[o->verdict], ambiguous,
             o->id[0] ? o->id : "-", o->retry_after_ms, latency,
             log_quote(q, sizeof(q), o->text, strlen(o->text)));
    if (r->started)
        api_health_note(t, o);
    api_req_free(r);
    if (--s->reqs_left == 0)
        api_complete(t, s);
}

/* Fails a request that never ran (shutdown, a message the provider cannot
 * carry). */
static void api_req_fail(struct api_transport *t, struct api_req *r, enum api_verdict v, int code,
                         const char *enhanced, const char *text)
{
    struct api_outcome o;

    memset(&o, 0, sizeof(o));
    o.verdict = v;
    o.code = code;
    snprintf(o.enhanced, sizeof(o.enhanced), "%s", enhanced);
    snprintf(o.text, sizeof(o.text), "%s", text);
    api_req_outcome(t, r, &o, 0, 0);
}

/* ---- planning: recipients into requests ------------------------------------------- */

enum api_role { ROLE_TO, ROLE_CC, ROLE_HIDDEN };

static int api_in_list(const char *a, char *const *v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcasecmp(a, v[i]) == 0)
            return 1;
    return 0;
}

static void api_plan_add(struct api_plan *pl, const size_t *idx, const enum api_role *role,
                         size_t n)
{
    struct api_plan_req *q;
    size_t o = 0;
    int any_to = 0;

    pl->reqs = xrealloc(pl->reqs, (pl->nreqs + 1) * sizeof(*pl->reqs));
    q = &pl->reqs[pl->nreqs++];
    q->idx = xcalloc(n, sizeof(size_t));
    q->n = n;
    for (size_t i = 0; i < n; i++)
        any_to |= role[idx[i]] == ROLE_TO;
    /* Without a To recipient, the Cc ones move to To (the APIs require a
     * To); hidden recipients stay hidden (Bcc). */
    for (int pass = 0; pass < 3; pass++) {
        for (size_t i = 0; i < n; i++) {
            enum api_role ro = role[idx[i]];
            int want = ro == ROLE_HIDDEN ? 2 : (ro == ROLE_TO || !any_to) ? 0 : 1;

            if (want == pass)
                q->idx[o++] = idx[i];
        }
        if (pass == 0)
            q->nto = o;
        else if (pass == 1)
            q->ncc = o - q->nto;
    }
}

void api_plan_rcpts(const struct api_provider *p, const char *const *rcpts, size_t n,
                    const struct mime_parts *parts, struct api_plan *pl)
{
    size_t nu = 0, max = p->max_rcpts;
    size_t *order = xcalloc(n ? n : 1, sizeof(size_t));
    enum api_role *role = xcalloc(n ? n : 1, sizeof(*role));
    int json = p->json && parts != NULL;

    memset(pl, 0, sizeof(*pl));
    pl->alias = xcalloc(n ? n : 1, sizeof(size_t));
    for (size_t i = 0; i < n; i++) {
        pl->alias[i] = i;
        for (size_t j = 0; j < i; j++) {
            if (strcasecmp(rcpts[i], rcpts[j]) == 0) {
                pl->alias[i] = pl->alias[j];
                break;
            }
        }
        role[i] = ROLE_TO;
        if (json)
            role[i] = api_in_list(rcpts[i], parts->to, parts->nto)   ? ROLE_TO
                      : api_in_list(rcpts[i], parts->cc, parts->ncc) ? ROLE_CC
                                                                     : ROLE_HIDDEN;
    }
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < n; i++)
            if (pl->alias[i] == i && (role[i] == ROLE_HIDDEN) == pass)
                order[nu++] = i;
    for (size_t c = 0; c < nu; c += max) {
        size_t len = nu - c < max ? nu - c : max;
        int visible = 0;

        for (size_t i = 0; i < len; i++)
            visible |= role[order[c + i]] != ROLE_HIDDEN;
        if (json && !visible) {
            for (size_t i = 0; i < len; i++) {
                role[order[c + i]] = ROLE_TO;
                api_plan_add(pl, &order[c + i], role, 1);
            }
        } else {
            api_plan_add(pl, &order[c], role, len);
        }
    }
    free(order);
    free(role);
}

void api_plan_free(struct api_plan *pl)
{
    for (size_t i = 0; i < pl->nreqs; i++)
        free(pl->reqs[i].idx);
    free(pl->reqs);
    free(pl->alias);
    memset(pl, 0, sizeof(*pl));
}

/* Queues the requests of a send, as api_plan_rcpts() splits it. */
static void api_plan(struct api_transport *t, struct api_send *s)
{
    struct api_plan pl;

    api_plan_rcpts(t->cfg.provider, (const char *const *)s->rcpts, s->msg.nrcpts,
                   s->have_parts ? &s->parts : NULL, &pl);
    memcpy(s->alias, pl.alias, s->msg.nrcpts * sizeof(size_t));
    for (size_t i = 0; i < pl.nreqs; i++) {
        struct api_req *r = xcalloc(1, sizeof(*r));

        r->send = s;
        r->idx = pl.reqs[i].idx;         /* taken over */
        pl.reqs[i].idx = NULL;
        r->n = pl.reqs[i].n;
        r->nto = pl.reqs[i].nto;
        r->ncc = pl.reqs[i].ncc;
        s->reqs_left++;
        if (t->qtail != NULL)
            t->qtail->next = r;
        else
            t->qhead = r;
        t->qtail = r;
        t->nqueued++;
    }
    api_plan_free(&pl);
}

/* ---- the curl engine ------------------------------------------------------------------ */

static void api_on_handle_closed(uv_handle_t *h);

static void api_sock_close(struct api_transport *t, struct api_sock *ps)
{
    if (ps->closing)
        return;
    ps->closing = 1;
    if (ps->prev != NULL)
        ps->prev->next = ps->next;
    else
        t->socks = ps->next;
    if (ps->next != NULL)
        ps->next->prev = ps->prev;
    uv_poll_stop(&ps->poll);
    uv_close((uv_handle_t *)&ps->poll, api_on_handle_closed);
}

static void api_check_done(struct api_transport *t);

static void api_on_poll(uv_poll_t *h, int status, int events)
{
    struct api_sock *ps = h->data;
    struct api_transport *t = ps->t;
    int flags = 0, running;

    if (status < 0)
        flags = CURL_CSELECT_ERR;
    else {
        if (events & UV_READABLE)
            flags |= CURL_CSELECT_IN;
        if (events & UV_WRITABLE)
            flags |= CURL_CSELECT_OUT;
    }
    /* ps may be closed from inside this call (CURL_POLL_REMOVE). */
    curl_multi_socket_action(t->multi, ps->fd, flags, &running);
    api_check_done(t);
}

static int api_socket_cb(CURL *e, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct api_transport *t = userp;
    struct api_sock *ps = socketp;
    int ev = 0, r;

    (void)e;
    if (what == CURL_POLL_REMOVE) {
        if (ps != NULL) {
            curl_multi_assign(t->multi, s, NULL);
            api_sock_close(t, ps);
        }
        return 0;
    }
    if (ps == NULL) {
        ps = xcalloc(1, sizeof(*ps));
        ps->t = t;
        ps->fd = s;
        r = uv_poll_init_socket(t->loop, &ps->poll, s);
        if (r < 0) {
            log_error("route=%s event=poll_init_failed reason=\"%s\"", t->cfg.route,
                      uv_strerror(r));
            free(ps);
            return -1;
        }
        ps->poll.data = ps;
        t->handles_open++;
        ps->next = t->socks;
        if (t->socks != NULL)
            t->socks->prev = ps;
        t->socks = ps;
        curl_multi_assign(t->multi, s, ps);
    }
    if (what & CURL_POLL_IN)
        ev |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        ev |= UV_WRITABLE;
    uv_poll_start(&ps->poll, ev, api_on_poll);
    return 0;
}

static void api_on_curl_timer(uv_timer_t *h)
{
    struct api_transport *t = h->data;
    int running;

    curl_multi_socket_action(t->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    api_check_done(t);
}

static int api_timer_cb(CURLM *m, long timeout_ms, void *userp)
{
    struct api_transport *t = userp;

    (void)m;
    if (timeout_ms < 0)
        uv_timer_stop(&t->curl_timer);
    else
        uv_timer_start(&t->curl_timer, api_on_curl_timer, (uint64_t)timeout_ms, 0);
    return 0;
}

static size_t api_on_body(char *p, size_t size, size_t nmemb, void *arg)
{
    struct api_req *r = arg;
    size_t n = size * nmemb;

    if (r->resp.len < API_BODY_MAX)
        buf_append(&r->resp, p, n < API_BODY_MAX - r->resp.len ? n : API_BODY_MAX - r->resp.len);
    return n;
}

/* Keeps the headers of the last response (a status line starts a new
 * one: interim 1xx responses are forgotten). */
static size_t api_on_header(char *p, size_t size, size_t nmemb, void *arg)
{
    struct api_req *r = arg;
    size_t n = size * nmemb, len = n, nl;
    const char *colon, *v;

    if (len >= 5 && strncmp(p, "HTTP/", 5) == 0) {
        for (size_t i = 0; i < r->nhdrs; i++) {
            free(r->hdrs[i].name);
            free(r->hdrs[i].value);
        }
        r->nhdrs = 0;
        r->hdr_bytes = 0;
        return n;
    }
    while (len > 0 && (p[len - 1] == '\r' || p[len - 1] == '\n'))
        len--;
    colon = memchr(p, ':', len);
    if (colon == NULL || colon == p || r->nhdrs == API_HEADERS_MAX ||
        r->hdr_bytes + len > API_HEADER_BYTES)
        return n;
    nl = (size_t)(colon - p);
    v = colon + 1;
    while (v < p + len && (*v == ' ' || *v == '\t'))
        v++;
    r->hdrs[r->nhdrs].name = xstrndup(p, nl);
    r->hdrs[r->nhdrs].value = xstrndup(v, (size_t)(p + len - v));
    r->nhdrs++;
    r->hdr_bytes += len;
    return n;
}

/* The enhanced code for a transfer that failed before it was sent. */
static const char *api_curl_enhanced(CURLcode rc)
{
    switch (rc) {
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
        return "4.4.1";                         /* no answer from host */
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
        return "4.7.5";                         /* cryptographic failure */
    default:
        return "4.4.2";                         /* bad connection */
    }
}

/* A transfer is over: read what curl knows and map it. */
static void api_req_finished(struct api_transport *t, struct api_req *r, CURLcode rc)
{
    struct api_outcome o;
    long status = 0;
    curl_off_t up = 0, expect = -1;
    int ambiguous = 0;
    const char *pname = t->cfg.provider->name;

    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(r->easy, CURLINFO_SIZE_UPLOAD_T, &up);
    curl_easy_getinfo(r->easy, CURLINFO_CONTENT_LENGTH_UPLOAD_T, &expect);
    curl_multi_remove_handle(t->multi, r->easy);
    curl_easy_cleanup(r->easy);
    r->easy = NULL;
    t->inflight--;

    memset(&o, 0, sizeof(o));
    if (status >= 200) {
        /* A response arrived (its body may be cut short). */
        struct api_response resp;

        memset(&resp, 0, sizeof(resp));
        resp.status = status;
        resp.body = r->resp.data != NULL ? r->resp.data : "";
        resp.body_len = r->resp.len;
        resp.headers = r->hdrs;
        resp.nheaders = r->nhdrs;
        resp.now = (int64_t)time(NULL);
        t->cfg.provider->parse(&resp, &o);
    } else {
        char detail[CURL_ERROR_SIZE + 64];
        int64_t want = expect > 0 ? (int64_t)expect : (int64_t)r->call.payload_len;

        api_clean_text(detail, sizeof(detail), r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc),
                       strlen(r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc)));
        o.server_error = 1;
        if (want > 0 && (int64_t)up >= want) {
            /* The whole request went out and no answer came back: the
             * provider may have accepted the message. */
            ambiguous = 1;
            if (rc == CURLE_OPERATION_TIMEDOUT)
                api_outcome_set(&o, API_TEMP, 451, "4.4.7",
                                "ambiguous: timeout after request sent to %s (delivery status "
                                "unknown): %s", pname, detail);
            else
                api_outcome_set(&o, API_TEMP, 451, "4.4.2",
                                "ambiguous: connection lost after request sent to %s (delivery "
                                "status unknown): %s", pname, detail);
        } else {
            api_outcome_set(&o, API_TEMP, 451, api_curl_enhanced(rc), "%s %s: %s", pname,
                            t->cfg.host, detail);
        }
    }
    api_req_outcome(t, r, &o, ambiguous, status);
}

static void api_check_done(struct api_transport *t)
{
    CURLMsg *m;
    int left;

    while ((m = curl_multi_info_read(t->multi, &left)) != NULL) {
        struct api_req *r = NULL;

        if (m->msg != CURLMSG_DONE)
            continue;
        curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        api_req_finished(t, r, m->data.result);
    }
    api_dispatch(t);
    api_maybe_finish(t);
}

/* Builds a request and hands it to curl. On failure the request is
 * completed with a result at once (its callback still comes from the
 * defer timer). */
static void api_req_start(struct api_transport *t, struct api_req *r)
{
    struct api_send *s = r->send;
    struct api_call *c = &r->call;
    char err[300];
    CURLMcode mc;
    CURL *e;

    c->cfg = &t->cfg;
    c->msg = &s->msg;
    c->parts = s->have_parts ? &s->parts : NULL;
    r->roles = xcalloc(r->n ? r->n : 1, sizeof(char *));
    for (size_t k = 0; k < r->n; k++)
        r->roles[k] = s->rcpts[r->idx[k]];
    c->rcpts = r->roles;
    c->nrcpts = r->n;
    c->to = r->roles;
    c->nto = r->nto;
    c->cc = r->roles + r->nto;
    c->ncc = r->ncc;
    c->bcc = r->roles + r->nto + r->ncc;
    c->nbcc = r->n - r->nto - r->ncc;
    c->now = (int64_t)time(NULL);

    e = curl_easy_init();
    if (e == NULL) {
        api_req_fail(t, r, API_TEMP, 451, "4.3.0", "cannot create an HTTP request (libcurl)");
        return;
    }
    if (t->cfg.provider->build(c, e, err, sizeof(err)) != 0) {
        char text[400];

        curl_easy_cleanup(e);
        api_redact(&t->cfg, err, sizeof(err));
        api_strf(text, sizeof(text), "%s cannot carry this message: %s", t->cfg.provider->name,
                 err);
        /* RFC 3463 X.6.3: conversion required but not supported. */
        api_req_fail(t, r, API_PERM, 554, "5.6.3", text);
        return;
    }
    api_add_header(&c->headers, "Expect", "");   /* no 100-continue round trip */
    r->easy = e;
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)r);
    curl_easy_setopt(e, CURLOPT_URL, c->url.data);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, c->headers);
    if (c->form != NULL) {
        curl_easy_setopt(e, CURLOPT_MIMEPOST, c->form);
    } else {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)c->payload_len);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, c->payload);
    }
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, api_on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, api_on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(t->cfg.timeout * 1000));
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(t->cfg.connect_timeout * 1000));
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    curl_easy_setopt(e, CURLOPT_PIPEWAIT, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    if (t->cfg.ca_file != NULL)
        curl_easy_setopt(e, CURLOPT_CAINFO, t->cfg.ca_file);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    /* A connection idle longer than this is not reused: servers close idle
     * keep-alive connections (often after 60 s), and a request that meets
     * a connection the server is closing is one curl sends again. */
    curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, 20L);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "mailferry");
    r->started = uv_now(t->loop);
    if (r->started == 0)
        r->started = 1;
    mc = curl_multi_add_handle(t->multi, e);
    if (mc != CURLM_OK) {
        char text[200];

        r->easy = NULL;
        curl_easy_cleanup(e);
        r->started = 0;
        api_strf(text, sizeof(text), "cannot start an HTTP request: %s", curl_multi_strerror(mc));
        api_req_fail(t, r, API_TEMP, 451, "4.3.0", text);
        return;
    }
    t->inflight++;
    log_debug("route=%s msg=%s event=api_request provider=%s host=%s rcpts=%zu inflight=%zu",
              t->cfg.route, s->id, t->cfg.provider->name, t->cfg.host, r->n, t->inflight);
}

static struct api_req *api_queue_pop(struct api_transport *t)
{
    struct api_req *r = t->qhead;

    if (r != NULL) {
        t->qhead = r->next;
        if (t->qhead == NULL)
            t->qtail = NULL;
        r->next = NULL;
        t->nqueued--;
    }
    return r;
}

/* Starts waiting requests while below the in-flight cap. */
static void api_dispatch(struct api_transport *t)
{
    if (t->closing)
        return;
    while (t->qhead != NULL && t->inflight < (size_t)t->cfg.max_connections)
        api_req_start(t, api_queue_pop(t));
}

/* ---- the transport_ops ------------------------------------------------------------- */

static void api_free(struct api_transport *t)
{
    api_settings_free(&t->cfg);
    free(t);
}

static int api_curl_inited;

static struct transport *api_create(uv_loop_t *loop, const char *route,
                                    const struct config_named *kv, size_t nkv, char *err,
                                    size_t errlen)
{
    struct api_transport *t = xcalloc(1, sizeof(*t));

    if (!api_curl_inited) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            snprintf(err, errlen, "provider: libcurl failed to initialise");
            free(t);
            return NULL;
        }
        api_curl_inited = 1;
    }
    t->loop = loop;
    t->cfg.route = xstrdup(route != NULL ? route : "-");
    if (api_configure(&t->cfg, kv, nkv, err, errlen) != 0) {
        api_free(t);
        return NULL;
    }
    t->multi = curl_multi_init();
    if (t->multi == NULL) {
        snprintf(err, errlen, "provider: libcurl failed to create a multi handle");
        api_free(t);
        return NULL;
    }
    curl_multi_setopt(t->multi, CURLMOPT_SOCKETFUNCTION, api_socket_cb);
    curl_multi_setopt(t->multi, CURLMOPT_SOCKETDATA, t);
    curl_multi_setopt(t->multi, CURLMOPT_TIMERFUNCTION, api_timer_cb);
    curl_multi_setopt(t->multi, CURLMOPT_TIMERDATA, t);
    curl_multi_setopt(t->multi, CURLMOPT_MAX_TOTAL_CONNECTIONS, (long)t->cfg.max_connections);
    curl_multi_setopt(t->multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)t->cfg.max_connections);
    curl_multi_setopt(t->multi, CURLMOPT_MAXCONNECTS, (long)t->cfg.max_connections);
    curl_multi_setopt(t->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    uv_timer_init(loop, &t->curl_timer);
    uv_timer_init(loop, &t->defer);
    t->curl_timer.data = t;
    t->defer.data = t;
    t->handles_open = 2;
    log_info("route=%s event=transport_created transport=api provider=%s host=%s "
             "max_connections=%lld timeout_s=%lld resend_ambiguous=%s", t->cfg.route,
             t->cfg.provider->name, t->cfg.host, t->cfg.max_connections, t->cfg.timeout,
             t->cfg.resend_ambiguous ? "yes" : "no");
    return (struct transport *)t;
}

static void api_send(struct transport *tp, const struct transport_msg *m, transport_done_cb cb,
                     void *arg)
{
    struct api_transport *t = (struct api_transport *)tp;
    struct api_send *s = xcalloc(1, sizeof(*s));
    size_t n = m->nrcpts;

    s->t = t;
    s->id = xstrdup(m->id != NULL ? m->id : "-");
    s->from = xstrdup(m->from != NULL ? m->from : "");
    s->rcpts = xcalloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; i < n; i++)
        s->rcpts[i] = xstrdup(m->rcpts[i]);
    s->alias = xcalloc(n ? n : 1, sizeof(size_t));
    s->msg = *m;
    s->msg.id = s->id;
    s->msg.from = s->from;
    s->msg.rcpts = (const char *const *)s->rcpts;
    s->cb = cb;
    s->arg = arg;
    s->res.nrcpts = n;
    s->res.rcpt = xcalloc(n ? n : 1, sizeof(*s->res.rcpt));
    s->res.resend_ambiguous = t->cfg.resend_ambiguous;
    api_strf(s->res.remote, sizeof(s->res.remote), "%s %s", t->cfg.provider->name, t->cfg.host);

    if (t->closing || n == 0) {
        /* Sends after the closed callback has run are a bug. */
        assert(!t->finishing);
        for (size_t i = 0; i < n; i++) {
            s->res.rcpt[i].code = 451;
            snprintf(s->res.rcpt[i].enhanced, sizeof(s->res.rcpt[i].enhanced), "4.3.2");
            snprintf(s->res.rcpt[i].text, sizeof(s->res.rcpt[i].text),
                     "transport shutting down");
        }
        for (size_t i = 0; i < n; i++)
            s->alias[i] = i;
        api_complete(t, s);
        return;
    }
    if (t->cfg.provider->json) {
        char err[200], text[300];

        s->have_parts = 1;
        if (mime_parse(m->data, m->len, &s->parts, err, sizeof(err)) != 0 || s->parts.opaque) {
            if (s->parts.opaque)
                snprintf(err, sizeof(err), "a signed or encrypted MIME message (RFC 1847, "
                         "RFC 8551) cannot be rebuilt without breaking it; send it through a "
                         "raw MIME route");
            api_strf(text, sizeof(text), "%s cannot carry this message: %s",
                     t->cfg.provider->name, err);
            for (size_t i = 0; i < n; i++) {
                s->alias[i] = i;
                s->res.rcpt[i].code = 554;
                snprintf(s->res.rcpt[i].enhanced, sizeof(s->res.rcpt[i].enhanced), "5.6.3");
                snprintf(s->res.rcpt[i].text, sizeof(s->res.rcpt[i].text), "%s", text);
                s->res.rcpt[i].final = 1;
            }
            log_info("route=%s msg=%s event=api_unconvertible provider=%s reason=\"%s\"",
                     t->cfg.route, s->id, t->cfg.provider->name, err);
            api_complete(t, s);
            return;
        }
        for (size_t i = 0; i < s->parts.ndropped; i++)
            log_debug("route=%s msg=%s event=api_header_dropped provider=%s header=%s",
                      t->cfg.route, s->id, t->cfg.provider->name, s->parts.dropped[i]);
    }
    api_plan(t, s);
    api_dispatch(t);
}

static int api_health(struct transport *tp, char *why, size_t whylen)
{
    struct api_transport *t = (struct api_transport *)tp;
    uint64_t now = uv_now(t->loop);

    if (t->down_until != 0 && now < t->down_until) {
        /* Stable while down: the router records the reason when it
         * changes. */
        api_strf(why, whylen, "%s", t->last_error);
        return 0;
    }
    snprintf(why, whylen, "ok");
    return 1;
}

static void api_on_handle_closed(uv_handle_t *h)
{
    struct api_transport *t;

    if (h->type == UV_POLL) {
        struct api_sock *ps = h->data;

        t = ps->t;
        free(ps);
    } else {
        t = h->data;
    }
    if (--t->handles_open > 0)
        return;
    log_info("route=%s event=transport_closed", t->cfg.route);
    if (t->closed != NULL)
        t->closed(t->closed_arg);
    api_free(t);
}

/* Once closing, with nothing in flight, queued or pending, the sockets
 * and timers are closed and the owner is told. */
static void api_maybe_finish(struct api_transport *t)
{
    if (!t->closing || t->finishing || t->inflight > 0 || t->qhead != NULL || t->dhead != NULL)
        return;
    t->finishing = 1;
    while (t->socks != NULL)
        api_sock_close(t, t->socks);
    curl_multi_setopt(t->multi, CURLMOPT_SOCKETFUNCTION, NULL);
    curl_multi_setopt(t->multi, CURLMOPT_TIMERFUNCTION, NULL);
    curl_multi_cleanup(t->multi);
    t->multi = NULL;
    uv_timer_stop(&t->curl_timer);
    uv_close((uv_handle_t *)&t->curl_timer, api_on_handle_closed);
    uv_close((uv_handle_t *)&t->defer, api_on_handle_closed);
}

static void api_close(struct transport *tp, void (*closed)(void *arg), void *arg)
{
    struct api_transport *t = (struct api_transport *)tp;
    struct api_req *r;

    if (t->closing)
        return;
    t->closing = 1;
    t->closed = closed;
    t->closed_arg = arg;
    log_info("route=%s event=transport_closing queued=%zu inflight=%zu", t->cfg.route,
             t->nqueued, t->inflight);
    while ((r = api_queue_pop(t)) != NULL)
        api_req_fail(t, r, API_TEMP, 451, "4.3.2", "transport shutting down");
    api_maybe_finish(t);
}

const struct transport_ops api_transport_ops = {
    .name = "api",
    .create = api_create,
    .send = api_send,
    .health = api_health,
    .close = api_close,
};
