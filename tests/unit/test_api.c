/*
 * Unit tests for the api transport (transports/api*.c): route keys and
 * their errors (never carrying a secret), Retry-After, each provider's
 * response mapping, recipient planning (a Bcc recipient never shares a
 * rebuilt message with visible ones), the requests each provider builds
 * (the SES signature recomputed, the webhook HMAC recomputed), and the
 * engine on a real libuv loop against a port where nothing listens.
 * Exchanges with servers that answer are in tests/integration/test_api.py.
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
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "lib/buf.h"
#include "lib/config.h"
#include "lib/log.h"
#include "lib/mime.h"
#include "lib/sigv4.h"
#include "transports/api.h"

#define SECRET "sk-test-SECRET-0123456789abcdef"
#define AWS_ID "AKIDEXAMPLE"
#define AWS_SECRET "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"

/* ---- helpers --------------------------------------------------------------------- */

#define MAXKV 16

/* Creates the transport from "key", "value", ... NULL. */
static struct transport *mk(uv_loop_t *loop, char *err, size_t errlen, ...)
{
    struct config_named kv[MAXKV];
    const char *k;
    size_t n = 0;
    va_list ap;

    va_start(ap, errlen);
    while ((k = va_arg(ap, const char *)) != NULL && n < MAXKV) {
        kv[n].kind = (char *)"route";
        kv[n].name = (char *)"api";
        kv[n].key = (char *)k;
        kv[n].value = va_arg(ap, char *);
        n++;
    }
    va_end(ap);
    err[0] = '\0';
    return api_transport_ops.create(loop, "api", kv, n, err, errlen);
}

static void on_closed(void *arg)
{
    (*(int *)arg)++;
}

static void close_and_run(uv_loop_t *loop, struct transport *t)
{
    int closed = 0;

    api_transport_ops.close(t, on_closed, &closed);
    while (!closed && uv_run(loop, UV_RUN_ONCE))
        ;
    assert_int_equal(closed, 1);
}

static void setup_env(void)
{
    setenv("MF_TEST_KEY", SECRET, 1);
    setenv("MF_TEST_AWS_ID", AWS_ID, 1);
    setenv("MF_TEST_AWS_SECRET", AWS_SECRET, 1);
    unsetenv("MF_TEST_UNSET");
}

/* ---- configuration ---------------------------------------------------------------- */

struct cfg_case {
    const char *kv[2 * MAXKV + 1];
    const char *want;             /* substring of the error */
};

static const struct cfg_case cfg_cases[] = {
    {{NULL}, "provider: required"},
    {{"provider", "smtpish", NULL}, "provider: must be mailgun, ses, sendgrid, postmark or webhook"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_KEY", "colour", "red", NULL},
     "colour: unknown key"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_KEY", "provider", "sendgrid", NULL},
     "provider: set twice"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_KEY", "domain", "x.test", NULL},
     "domain: not used by provider sendgrid"},
    {{"provider", "sendgrid", NULL}, "api_key_env: required for provider sendgrid"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_UNSET", NULL},
     "api_key_env: environment variable MF_TEST_UNSET is not set"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_KEY", "api_key_file", "/k", NULL},
     "api_key_file: set either api_key_env or api_key_file"},
    {{"provider", "postmark", "api_key_file", "/nonexistent/key", NULL},
     "api_key_file: cannot open /nonexistent/key"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_KEY", "base_url", "http://127.0.0.1", NULL},
     "base_url: must be an https:// URL"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_KEY", "base_url",
      "https://u:" SECRET "@x.test", NULL},
     "base_url: must not carry credentials"},
    {{"provider", "sendgrid", "api_key_env", "MF_TEST_KEY", "base_url", "https://x.test/?a=b",
      NULL},
     "base_url: must not have a query"},
    {{"provider", "webhook", "webhook_secret_env", "MF_TEST_KEY", NULL},
     "base_url: required for provider webhook"},
    {{"provider", "webhook", "base_url", "https://relay.test/hook", NULL},
     "webhook_secret_env: required for provider webhook"},
    {{"provider", "ses", "access_key_id_env", "MF_TEST_AWS_ID", "secret_key_env",
      "MF_TEST_AWS_SECRET", NULL},
     "region: required for provider ses"},
    {{"provider", "ses", "region", "eu-west-1", "access_key_id_env", "MF_TEST_AWS_ID", NULL},
     "secret_key_env: required for provider ses"},
    {{"provider", "ses", "region", "eu west", "access_key_id_env", "MF_TEST_AWS_ID",
      "secret_key_env", "MF_TEST_AWS_SECRET", NULL},
     "region: must be an AWS region name"},
    {{"provider", "mailgun", "api_key_env", "MF_TEST_KEY", NULL},
     "domain: required for provider mailgun"},
    {{"provider", "mailgun", "api_key_env", "MF_TEST_KEY", "domain", "a/b", NULL},
     "domain: must be a domain name"},
    {{"provider", "postmark", "api_key_env", "MF_TEST_KEY", "timeout", "0", NULL},
     "timeout: must be an integer between 1 and 600"},
    {{"provider", "postmark", "api_key_env", "MF_TEST_KEY", "max_connections", "5000", NULL},
     "max_connections: must be an integer between 1 and 1000"},
    {{"provider", "postmark", "api_key_env", "MF_TEST_KEY", "resend_ambiguous", "maybe", NULL},
     "resend_ambiguous:"},
    {{"provider", "postmark", "api_key_env", "MF_TEST_KEY", "ca_file", "/nonexistent/ca", NULL},
     "ca_file: cannot open /nonexistent/ca"},
    {{"provider", "postmark", "api_key_env", "MF_TEST_KEY", "message_stream", "a b", NULL},
     "message_stream: must be letters"},
    {{"provider", "postmark", "api_key_env", "MF_TEST_KEY", "base_url", "", NULL},
     "base_url: must not be empty"},
};

static void test_config_errors(void **state)
{
    uv_loop_t loop;

    (void)state;
    setup_env();
    uv_loop_init(&loop);
    for (size_t i = 0; i < sizeof(cfg_cases) / sizeof(cfg_cases[0]); i++) {
        const struct cfg_case *c = &cfg_cases[i];
        struct config_named kv[MAXKV];
        char err[600];
        size_t n = 0;
        struct transport *t;

        for (; c->kv[2 * n] != NULL; n++) {
            kv[n].kind = (char *)"route";
            kv[n].name = (char *)"api";
            kv[n].key = (char *)c->kv[2 * n];
            kv[n].value = (char *)c->kv[2 * n + 1];
        }
        err[0] = '\0';
        t = api_transport_ops.create(&loop, "api", kv, n, err, sizeof(err));
        if (t != NULL)
            fail_msg("case %zu: created, want error \"%s\"", i, c->want);
        if (strstr(err, c->want) == NULL)
            fail_msg("case %zu: error \"%s\", want \"%s\"", i, err, c->want);
        if (strstr(err, SECRET) != NULL || strstr(err, AWS_SECRET) != NULL)
            fail_msg("case %zu: a secret in the error: %s", i, err);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* A secret file's first line is the key; every provider's good route
 * creates and closes cleanly. */
static void test_config_ok(void **state)
{
    char path[] = "/tmp/mf-test-api-key-XXXXXX", err[600];
    uv_loop_t loop;
    struct transport *t;
    int fd;

    (void)state;
    setup_env();
    fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, SECRET "\nsecond line\n", strlen(SECRET) + 13),
                     (ssize_t)strlen(SECRET) + 13);
    close(fd);
    uv_loop_init(&loop);

    t = mk(&loop, err, sizeof(err), "provider", "sendgrid", "api_key_file", path, NULL);
    assert_non_null(t);
    close_and_run(&loop, t);
    t = mk(&loop, err, sizeof(err), "provider", "mailgun", "api_key_env", "MF_TEST_KEY", "domain",
           "mg.example.com", "base_url", "https://api.eu.mailgun.net/", NULL);
    assert_non_null(t);
    close_and_run(&loop, t);
    t = mk(&loop, err, sizeof(err), "provider", "ses", "region", "eu-west-1",
           "access_key_id_env", "MF_TEST_AWS_ID", "secret_key_env", "MF_TEST_AWS_SECRET",
           "session_token_env", "MF_TEST_KEY", "configuration_set", "cs-1", NULL);
    assert_non_null(t);
    close_and_run(&loop, t);
    t = mk(&loop, err, sizeof(err), "provider", "postmark", "api_key_env", "MF_TEST_KEY",
           "message_stream", "broadcast", "timeout", "5", "max_connections", "64",
           "resend_ambiguous", "yes", NULL);
    assert_non_null(t);
    {
        char why[200];

        assert_int_equal(api_transport_ops.health(t, why, sizeof(why)), 1);
    }
    close_and_run(&loop, t);
    t = mk(&loop, err, sizeof(err), "provider", "webhook", "webhook_secret_file", path,
           "base_url", "https://relay.example.net:8443/hook?src=mf", NULL);
    assert_non_null(t);
    close_and_run(&loop, t);
    unlink(path);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- Retry-After ------------------------------------------------------------------ */

static void test_retry_after(void **state)
{
    int64_t now = 1700000000;   /* Tue, 14 Nov 2023 22:13:20 GMT */

    (void)state;
    assert_int_equal(api_retry_after_ms("120", now), 120000);
    assert_int_equal(api_retry_after_ms(" 5 ", now), 5000);
    assert_int_equal(api_retry_after_ms("0", now), 0);
    assert_int_equal(api_retry_after_ms("99999999999", now), 86400000);
    assert_int_equal(api_retry_after_ms("Tue, 14 Nov 2023 22:14:20 GMT", now), 60000);
    assert_int_equal(api_retry_after_ms("Tue, 14 Nov 2023 22:00:00 GMT", now), 0);
    assert_int_equal(api_retry_after_ms("soon", now), -1);
    assert_int_equal(api_retry_after_ms("12abc", now), -1);
    assert_int_equal(api_retry_after_ms(NULL, now), -1);
}

static void test_clean_text(void **state)
{
    char out[16];

    (void)state;
    api_clean_text(out, sizeof(out), "a\r\nb\t\tc  ", 9);
    assert_string_equal(out, "a b c");
    api_clean_text(out, sizeof(out), "0123456789abcdefghij", 20);
    assert_string_equal(out, "0123456789ab...");
    /* Never cut inside a UTF-8 sequence. */
    api_clean_text(out, 8, "abc\xc3\xa4\xc3\xa4\xc3\xa4", 9);
    assert_string_equal(out, "abc...");
}

/* ---- response mapping ------------------------------------------------------------- */

struct parse_case {
    const char *provider;
    long status;
    const char *hname, *hvalue;   /* one response header, may be NULL */
    const char *body;
    enum api_verdict verdict;
    int code;
    const char *enhanced;
    const char *text;             /* substring */
    const char *id;
    int64_t retry_after_ms;
    int server_error;
};

static const struct parse_case parse_cases[] = {
    /* Mailgun */
    {"mailgun", 200, NULL, NULL, "{\"id\":\"<20240101.1@mg.example.com>\",\"message\":\"Queued. Thank you.\"}",
     API_DELIVERED, 250, "2.0.0", "id <20240101.1@mg.example.com>", "<20240101.1@mg.example.com>", 0, 0},
    {"mailgun", 400, NULL, NULL, "{\"message\":\"'to' parameter is not a valid address\"}",
     API_PERM, 554, "5.0.0", "mailgun HTTP 400: 'to' parameter is not a valid address", "", 0, 0},
    {"mailgun", 401, NULL, NULL, "Forbidden", API_ACCOUNT, 451, "4.7.8", "HTTP 401: Forbidden", "", 0, 0},
    {"mailgun", 429, "Retry-After", "7", "{\"message\":\"slow down\"}", API_TEMP, 451, "4.7.0",
     "rate limited: slow down; retry after 7 s", "", 7000, 0},
    {"mailgun", 500, NULL, NULL, "oops", API_TEMP, 451, "4.3.0", "mailgun HTTP 500: oops", "", 0, 1},
    {"mailgun", 413, NULL, NULL, "", API_PERM, 552, "5.3.4", "too big", "", 0, 0},
    {"mailgun", 404, NULL, NULL, "{\"message\":\"Domain not found: x\"}", API_ACCOUNT, 451, "4.7.0",
     "Domain not found", "", 0, 0},
    /* SES v2 */
    {"ses", 200, NULL, NULL, "{\"MessageId\":\"0100018c-abc\"}", API_DELIVERED, 250, "2.0.0",
     "ses accepted, id 0100018c-abc", "0100018c-abc", 0, 0},
    {"ses", 429, "X-Amzn-ErrorType", "TooManyRequestsException:http://internal.amazon.com/coral/",
     "{\"message\":\"Maximum sending rate exceeded.\"}", API_TEMP, 451, "4.7.0",
     "TooManyRequestsException: Maximum sending rate exceeded.", "", 0, 0},
    {"ses", 400, NULL, NULL, "{\"__type\":\"com.amazonaws.ses#Throttling\",\"message\":\"Maximum sending rate exceeded.\"}",
     API_TEMP, 451, "4.7.0", "Throttling: Maximum sending rate", "", 0, 0},
    {"ses", 400, "X-Amzn-ErrorType", "LimitExceededException", "{\"message\":\"Daily message quota exceeded.\"}",
     API_ACCOUNT, 451, "4.7.0", "Daily message quota", "", 0, 0},
    {"ses", 400, "X-Amzn-ErrorType", "AccountSuspendedException:http://x/",
     "{\"message\":\"Your account has been suspended.\"}", API_ACCOUNT, 451, "4.7.0",
     "AccountSuspendedException: Your account has been suspended.", "", 0, 0},
    {"ses", 400, "X-Amzn-ErrorType", "SendingPausedException", "{\"message\":\"paused\"}",
     API_ACCOUNT, 451, "4.7.0", "SendingPausedException", "", 0, 0},
    {"ses", 403, "X-Amzn-ErrorType", "SignatureDoesNotMatch", "{\"message\":\"The request signature we calculated does not match\"}",
     API_ACCOUNT, 451, "4.7.0", "SignatureDoesNotMatch", "", 0, 0},
    {"ses", 400, "X-Amzn-ErrorType", "MessageRejected", "{\"message\":\"Email address is not verified.\"}",
     API_PERM, 554, "5.0.0", "ses HTTP 400: MessageRejected: Email address is not verified.", "", 0, 0},
    {"ses", 503, "X-Amzn-ErrorType", "ServiceUnavailable", "{}", API_TEMP, 451, "4.3.0",
     "ses HTTP 503: ServiceUnavailable", "", 0, 1},
    /* SendGrid */
    {"sendgrid", 202, "X-Message-Id", "W86EgYT6SQKk0lRflfLRsA", "", API_DELIVERED, 250, "2.0.0",
     "id W86EgYT6SQKk0lRflfLRsA", "W86EgYT6SQKk0lRflfLRsA", 0, 0},
    {"sendgrid", 400, NULL, NULL,
     "{\"errors\":[{\"message\":\"Does not contain a valid address.\",\"field\":\"personalizations.0.to.0.email\",\"help\":null}]}",
     API_PERM, 554, "5.0.0", "personalizations.0.to.0.email: Does not contain a valid address.", "", 0, 0},
    {"sendgrid", 401, NULL, NULL, "{\"errors\":[{\"message\":\"The provided authorization grant is invalid, expired, or revoked\"}]}",
     API_ACCOUNT, 451, "4.7.8", "authorization grant is invalid", "", 0, 0},
    {"sendgrid", 403, NULL, NULL, "{\"errors\":[{\"message\":\"The from address does not match a verified Sender Identity.\"}]}",
     API_ACCOUNT, 451, "4.7.0", "verified Sender Identity", "", 0, 0},
    {"sendgrid", 429, "Retry-After", "30", "{\"errors\":[{\"message\":\"too many requests\"}]}",
     API_TEMP, 451, "4.7.0", "retry after 30 s", "", 30000, 0},
    {"sendgrid", 502, NULL, NULL, "<html>bad gateway</html>", API_TEMP, 451, "4.3.0", "HTTP 502", "", 0, 1},
    /* Postmark */
    {"postmark", 200, NULL, NULL,
     "{\"To\":\"a@d.test\",\"SubmittedAt\":\"2024-01-01T00:00:00Z\",\"MessageID\":\"b7bc2f4a-e38e-4336-af7d-e6c392c2f817\",\"ErrorCode\":0,\"Message\":\"OK\"}",
     API_DELIVERED, 250, "2.0.0", "id b7bc2f4a", "b7bc2f4a-e38e-4336-af7d-e6c392c2f817", 0, 0},
    {"postmark", 401, NULL, NULL, "{\"ErrorCode\":10,\"Message\":\"No Account or Server API tokens were supplied in the HTTP headers.\"}",
     API_ACCOUNT, 451, "4.7.8", "ErrorCode 10", "", 0, 0},
    {"postmark", 422, NULL, NULL, "{\"ErrorCode\":412,\"Message\":\"Your account is pending approval.\"}",
     API_ACCOUNT, 451, "4.7.0", "ErrorCode 412: Your account is pending approval.", "", 0, 0},
    {"postmark", 422, NULL, NULL, "{\"ErrorCode\":413,\"Message\":\"This account may not send.\"}",
     API_ACCOUNT, 451, "4.7.0", "ErrorCode 413", "", 0, 0},
    {"postmark", 422, NULL, NULL, "{\"ErrorCode\":406,\"Message\":\"You tried to send to a recipient that has been marked as inactive.\"}",
     API_PERM, 554, "5.0.0", "ErrorCode 406: You tried to send", "", 0, 0},
    {"postmark", 429, NULL, NULL, "{\"ErrorCode\":429,\"Message\":\"Rate limit exceeded\"}",
     API_TEMP, 451, "4.7.0", "rate limited", "", 0, 0},
    {"postmark", 500, NULL, NULL, "", API_TEMP, 451, "4.3.0", "postmark HTTP 500", "", 0, 1},
    /* webhook */
    {"webhook", 200, NULL, NULL, "{\"id\":\"relay-42\"}", API_DELIVERED, 250, "2.0.0", "id relay-42",
     "relay-42", 0, 0},
    {"webhook", 204, "X-Message-Id", "h-7", "", API_DELIVERED, 250, "2.0.0", "id h-7", "h-7", 0, 0},
    {"webhook", 503, "Retry-After", "120", "{\"error\":\"maintenance\"}", API_TEMP, 451, "4.3.0",
     "webhook HTTP 503: maintenance", "", 120000, 1},
    {"webhook", 422, NULL, NULL, "mailbox\r\nunknown", API_PERM, 554, "5.0.0",
     "webhook HTTP 422: mailbox unknown", "", 0, 0},
    {"webhook", 302, NULL, NULL, "", API_TEMP, 451, "4.3.0", "unexpectedly", "", 0, 1},
};

static void test_parse_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(parse_cases) / sizeof(parse_cases[0]); i++) {
        const struct parse_case *c = &parse_cases[i];
        const struct api_provider *p = api_provider_find(c->provider);
        struct api_header h = {(char *)c->hname, (char *)c->hvalue};
        struct api_response r;
        struct api_outcome o;

        assert_non_null(p);
        memset(&r, 0, sizeof(r));
        memset(&o, 0, sizeof(o));
        r.status = c->status;
        r.body = c->body;
        r.body_len = strlen(c->body);
        r.headers = &h;
        r.nheaders = c->hname != NULL;
        r.now = time(NULL);
        p->parse(&r, &o);
        if (o.verdict != c->verdict || o.code != c->code || strcmp(o.enhanced, c->enhanced) != 0 ||
            strstr(o.text, c->text) == NULL || strcmp(o.id, c->id) != 0 ||
            o.retry_after_ms != c->retry_after_ms || o.server_error != c->server_error)
            fail_msg("case %zu (%s %ld): verdict %d code %d %s id [%s] retry %lld server %d "
                     "text [%s]", i, c->provider, c->status, o.verdict, o.code, o.enhanced, o.id,
                     (long long)o.retry_after_ms, o.server_error, o.text);
    }
}

/* SendGrid's 429 without Retry-After: the end of the window. */
static void test_sendgrid_ratelimit_reset(void **state)
{
    struct api_header h = {(char *)"X-RateLimit-Reset", NULL};
    char v[32];
    struct api_response r;
    struct api_outcome o;
    int64_t now = time(NULL);

    (void)state;
    snprintf(v, sizeof(v), "%lld", (long long)now + 42);
    h.value = v;
    memset(&r, 0, sizeof(r));
    memset(&o, 0, sizeof(o));
    r.status = 429;
    r.body = "";
    r.headers = &h;
    r.nheaders = 1;
    r.now = now;
    api_provider_sendgrid.parse(&r, &o);
    assert_int_equal(o.verdict, API_TEMP);
    assert_int_equal(o.retry_after_ms, 42000);
}

/* ---- planning ------------------------------------------------------------------------- */

static const char *role_list(const struct api_plan_req *q, const char *const *rcpts,
                             size_t from, size_t n, char *out, size_t outlen)
{
    size_t o = 0;

    out[0] = '\0';
    for (size_t i = from; i < from + n; i++)
        o += (size_t)snprintf(out + o, outlen - o, "%s%s", i > from ? "," : "", rcpts[q->idx[i]]);
    return out;
}

/* Renders a plan as "to|cc|bcc; to|cc|bcc ..." for comparison. */
static void render_plan(const struct api_plan *pl, const char *const *rcpts, char *out, size_t n)
{
    size_t o = 0;
    char a[512], b[512], c[512];

    out[0] = '\0';
    for (size_t i = 0; i < pl->nreqs; i++) {
        const struct api_plan_req *q = &pl->reqs[i];

        o += (size_t)snprintf(out + o, n - o, "%s%s|%s|%s", i ? "; " : "",
                              role_list(q, rcpts, 0, q->nto, a, sizeof(a)),
                              role_list(q, rcpts, q->nto, q->ncc, b, sizeof(b)),
                              role_list(q, rcpts, q->nto + q->ncc, q->n - q->nto - q->ncc, c,
                                        sizeof(c)));
    }
}

static void test_plan_json(void **state)
{
    const char *msg = "From: s@x.test\r\nTo: a@d.test, B@d.test\r\nCc: c@d.test\r\nSubject: p\r\n\r\nx\r\n";
    struct mime_parts parts;
    struct api_plan pl;
    char err[100], out[1024];

    (void)state;
    assert_int_equal(mime_parse(msg, strlen(msg), &parts, err, sizeof(err)), 0);

    /* To, Cc, a hidden one and a duplicate. */
    {
        const char *r[] = {"h@d.test", "c@d.test", "a@d.test", "A@D.test", "b@d.test"};

        api_plan_rcpts(&api_provider_sendgrid, r, 5, &parts, &pl);
        render_plan(&pl, r, out, sizeof(out));
        assert_string_equal(out, "a@d.test,b@d.test|c@d.test|h@d.test");
        assert_int_equal(pl.alias[3], 2);
        assert_int_equal(pl.alias[4], 4);
        api_plan_free(&pl);
    }
    /* Only hidden recipients: one copy each. */
    {
        const char *r[] = {"x@d.test", "y@d.test"};

        api_plan_rcpts(&api_provider_postmark, r, 2, &parts, &pl);
        render_plan(&pl, r, out, sizeof(out));
        assert_string_equal(out, "x@d.test||; y@d.test||");
        api_plan_free(&pl);
    }
    /* Only a Cc recipient visible: it becomes the To. */
    {
        const char *r[] = {"h@d.test", "c@d.test"};

        api_plan_rcpts(&api_provider_sendgrid, r, 2, &parts, &pl);
        render_plan(&pl, r, out, sizeof(out));
        assert_string_equal(out, "c@d.test||h@d.test");
        api_plan_free(&pl);
    }
    /* Raw providers ignore roles: message order, all "to". */
    {
        const char *r[] = {"h@d.test", "c@d.test", "H@d.test"};

        api_plan_rcpts(&api_provider_mailgun, r, 3, NULL, &pl);
        render_plan(&pl, r, out, sizeof(out));
        assert_string_equal(out, "h@d.test,c@d.test||");
        assert_int_equal(pl.alias[2], 0);
        api_plan_free(&pl);
    }
    mime_parts_free(&parts);
}

/* Chunks: SES takes 50 per request; Postmark 50, and a chunk of hidden
 * recipients alone splits into single copies. */
static void test_plan_chunks(void **state)
{
    char *rc[120], to_field[8192], msg[9000];
    struct mime_parts parts;
    struct api_plan pl;
    size_t o = 0;
    char err[100];

    (void)state;
    for (size_t i = 0; i < 120; i++) {
        rc[i] = malloc(32);
        snprintf(rc[i], 32, "r%zu@d.test", i);
    }
    api_plan_rcpts(&api_provider_ses, (const char *const *)rc, 120, NULL, &pl);
    assert_int_equal(pl.nreqs, 3);
    assert_int_equal(pl.reqs[0].n, 50);
    assert_int_equal(pl.reqs[1].n, 50);
    assert_int_equal(pl.reqs[2].n, 20);
    assert_int_equal(pl.reqs[2].nto, 20);
    assert_string_equal(rc[pl.reqs[2].idx[0]], "r100@d.test");
    api_plan_free(&pl);

    /* r0..r49 visible in To, r50..r52 hidden. */
    to_field[0] = '\0';
    for (size_t i = 0; i < 50; i++)
        o += (size_t)snprintf(to_field + o, sizeof(to_field) - o, "%sr%zu@d.test", i ? ", " : "",
                              i);
    snprintf(msg, sizeof(msg), "From: s@x.test\r\nTo: %s\r\n\r\nx\r\n", to_field);
    assert_int_equal(mime_parse(msg, strlen(msg), &parts, err, sizeof(err)), 0);
    api_plan_rcpts(&api_provider_postmark, (const char *const *)rc, 53, &parts, &pl);
    assert_int_equal(pl.nreqs, 4);
    assert_int_equal(pl.reqs[0].n, 50);
    assert_int_equal(pl.reqs[0].nto, 50);
    for (size_t i = 1; i < 4; i++) {
        assert_int_equal(pl.reqs[i].n, 1);
        assert_int_equal(pl.reqs[i].nto, 1);
    }
    api_plan_free(&pl);
    mime_parts_free(&parts);

    /* r0..r54 visible, r55..r59 hidden: the second chunk has visible
     * ones, so its hidden recipients ride along as Bcc. */
    o = 0;
    for (size_t i = 0; i < 55; i++)
        o += (size_t)snprintf(to_field + o, sizeof(to_field) - o, "%sr%zu@d.test", i ? ", " : "",
                              i);
    snprintf(msg, sizeof(msg), "From: s@x.test\r\nTo: %s\r\n\r\nx\r\n", to_field);
    assert_int_equal(mime_parse(msg, strlen(msg), &parts, err, sizeof(err)), 0);
    api_plan_rcpts(&api_provider_postmark, (const char *const *)rc, 60, &parts, &pl);
    assert_int_equal(pl.nreqs, 2);
    assert_int_equal(pl.reqs[1].n, 10);
    assert_int_equal(pl.reqs[1].nto, 5);
    assert_int_equal(pl.reqs[1].ncc, 0);
    assert_string_equal(rc[pl.reqs[1].idx[9]], "r59@d.test");
    api_plan_free(&pl);
    mime_parts_free(&parts);
    for (size_t i = 0; i < 120; i++)
        free(rc[i]);
}

/* ---- request building --------------------------------------------------------------- */

#define BUILD_MSG                                                                           \
    "DKIM-Signature: v=1; d=x.test; b=abc\r\n"                                              \
    "From: \"Sender, Esq.\" <s@x.test>\r\n"                                                 \
    "To: a@d.test\r\n"                                                                      \
    "Cc: c@d.test\r\n"                                                                      \
    "Reply-To: r@x.test\r\n"                                                                \
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"                                               \
    "Message-ID: <m1@x.test>\r\n"                                                           \
    "X-Campaign: c42\r\n"                                                                   \
    "MIME-Version: 1.0\r\n"                                                                 \
    "Content-Type: multipart/mixed; boundary=b1\r\n"                                        \
    "\r\n"                                                                                  \
    "--b1\r\n"                                                                              \
    "Content-Type: multipart/related; boundary=b2\r\n"                                      \
    "\r\n"                                                                                  \
    "--b2\r\n"                                                                              \
    "Content-Type: multipart/alternative; boundary=b3\r\n"                                  \
    "\r\n"                                                                                  \
    "--b3\r\n"                                                                              \
    "Content-Type: text/plain; charset=utf-8\r\n"                                           \
    "\r\n"                                                                                  \
    "plain text\r\n"                                                                        \
    "--b3\r\n"                                                                              \
    "Content-Type: text/html; charset=utf-8\r\n"                                            \
    "\r\n"                                                                                  \
    "<p>html <img src=\"cid:logo@x.test\"></p>\r\n"                                         \
    "--b3--\r\n"                                                                            \
    "--b2\r\n"                                                                              \
    "Content-Type: image/png\r\n"                                                           \
    "Content-ID: <logo@x.test>\r\n"                                                         \
    "Content-Transfer-Encoding: base64\r\n"                                                 \
    "\r\n"                                                                                  \
    "iVBORw0KGgo=\r\n"                                                                      \
    "--b2--\r\n"                                                                            \
    "--b1\r\n"                                                                              \
    "Content-Type: application/pdf\r\n"                                                     \
    "Content-Disposition: attachment; filename=\"r.pdf\"\r\n"                               \
    "Content-Transfer-Encoding: base64\r\n"                                                 \
    "\r\n"                                                                                  \
    "JVBERi0=\r\n"                                                                          \
    "--b1--\r\n"

struct built {
    struct api_settings cfg;
    struct transport_msg msg;
    struct mime_parts parts;
    struct api_call call;
    const char *rcpts[3];
    CURL *easy;
};

static void build_with(struct built *b, const struct api_provider *p)
{
    char err[200];

    memset(b, 0, sizeof(*b));
    b->cfg.provider = p;
    b->cfg.route = (char *)"api";
    b->cfg.base_url = (char *)"https://api.example.test:8443/prefix";
    b->cfg.host = (char *)"api.example.test:8443";
    b->cfg.api_key = (char *)SECRET;
    b->cfg.basic_auth = (char *)"YXBpOmtleQ==";
    b->cfg.domain = (char *)"mg.x.test";
    b->cfg.region = (char *)"eu-west-1";
    b->cfg.access_key_id = (char *)AWS_ID;
    b->cfg.secret_key = (char *)AWS_SECRET;
    b->cfg.session_token = (char *)"tok";
    b->cfg.configuration_set = (char *)"cs-1";
    b->cfg.message_stream = (char *)"outbound";
    b->cfg.webhook_secret = (char *)SECRET;
    b->msg.id = "Q1";
    b->msg.from = "bounce@x.test";
    b->msg.data = BUILD_MSG;
    b->msg.len = strlen(BUILD_MSG);
    b->rcpts[0] = "a@d.test";
    b->rcpts[1] = "c@d.test";
    b->rcpts[2] = "h\"q@d.test";
    b->msg.rcpts = b->rcpts;
    b->msg.nrcpts = 3;
    if (p->json)
        assert_int_equal(mime_parse(b->msg.data, b->msg.len, &b->parts, err, sizeof(err)), 0);
    b->call.cfg = &b->cfg;
    b->call.msg = &b->msg;
    b->call.parts = p->json ? &b->parts : NULL;
    b->call.rcpts = b->rcpts;
    b->call.nrcpts = 3;
    b->call.to = b->rcpts;
    b->call.nto = 1;
    b->call.cc = b->rcpts + 1;
    b->call.ncc = 1;
    b->call.bcc = b->rcpts + 2;
    b->call.nbcc = 1;
    b->call.now = 1440938160;     /* 20150830T123600Z */
    b->easy = curl_easy_init();
    if (p->build(&b->call, b->easy, err, sizeof(err)) != 0)
        fail_msg("build %s: %s", p->name, err);
}

static void built_free(struct built *b)
{
    curl_slist_free_all(b->call.headers);
    if (b->call.form != NULL)
        curl_mime_free(b->call.form);
    buf_free(&b->call.url);
    buf_free(&b->call.body);
    if (b->call.parts != NULL)
        mime_parts_free(&b->parts);
    curl_easy_cleanup(b->easy);
}

static const char *hdr(const struct built *b, const char *name)
{
    size_t n = strlen(name);

    for (struct curl_slist *l = b->call.headers; l != NULL; l = l->next)
        if (strncasecmp(l->data, name, n) == 0 && l->data[n] == ':')
            return l->data + n + 2;
    return NULL;
}

static json_t *body_json(const struct built *b)
{
    json_error_t je;
    json_t *j = json_loadb(b->call.payload, b->call.payload_len, 0, &je);

    if (j == NULL)
        fail_msg("body is not JSON: %s", je.text);
    return j;
}

static void test_build_sendgrid(void **state)
{
    struct built b;
    json_t *j, *p0, *atts, *a;

    (void)state;
    build_with(&b, &api_provider_sendgrid);
    assert_string_equal(b.call.url.data, "https://api.example.test:8443/prefix/v3/mail/send");
    assert_string_equal(hdr(&b, "Authorization"), "Bearer " SECRET);
    assert_string_equal(hdr(&b, "Content-Type"), "application/json");
    j = body_json(&b);
    p0 = json_array_get(json_object_get(j, "personalizations"), 0);
    assert_int_equal(json_array_size(json_object_get(j, "personalizations")), 1);
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(p0, "to"), 0), "email")), "a@d.test");
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(p0, "cc"), 0), "email")), "c@d.test");
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(p0, "bcc"), 0), "email")), "h\"q@d.test");
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "from"), "email")), "s@x.test");
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "from"), "name")), "Sender, Esq.");
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "reply_to"), "email")), "r@x.test");
    assert_string_equal(json_string_value(json_object_get(j, "subject")), "Gr\xc3\xbc\xc3\x9f" "e");
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(j, "content"), 0), "type")), "text/plain");
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(j, "content"), 0), "value")), "plain text");
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(j, "content"), 1), "type")), "text/html");
    atts = json_object_get(j, "attachments");
    assert_int_equal(json_array_size(atts), 2);
    a = json_array_get(atts, 0);
    assert_string_equal(json_string_value(json_object_get(a, "content")), "iVBORw0KGgo=");
    assert_string_equal(json_string_value(json_object_get(a, "disposition")), "inline");
    assert_string_equal(json_string_value(json_object_get(a, "content_id")), "logo@x.test");
    assert_string_equal(json_string_value(json_object_get(a, "type")), "image/png");
    a = json_array_get(atts, 1);
    assert_string_equal(json_string_value(json_object_get(a, "filename")), "r.pdf");
    assert_string_equal(json_string_value(json_object_get(a, "disposition")), "attachment");
    assert_null(json_object_get(a, "content_id"));
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "headers"), "Message-ID")), "<m1@x.test>");
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "headers"), "X-Campaign")), "c42");
    assert_null(json_object_get(json_object_get(j, "headers"), "DKIM-Signature"));
    json_decref(j);
    built_free(&b);
}

static void test_build_postmark(void **state)
{
    struct built b;
    json_t *j, *atts, *h;

    (void)state;
    build_with(&b, &api_provider_postmark);
    assert_string_equal(b.call.url.data, "https://api.example.test:8443/prefix/email");
    assert_string_equal(hdr(&b, "X-Postmark-Server-Token"), SECRET);
    assert_string_equal(hdr(&b, "Accept"), "application/json");
    j = body_json(&b);
    assert_string_equal(json_string_value(json_object_get(j, "From")), "\"Sender, Esq.\" <s@x.test>");
    assert_string_equal(json_string_value(json_object_get(j, "To")), "a@d.test");
    assert_string_equal(json_string_value(json_object_get(j, "Cc")), "c@d.test");
    assert_string_equal(json_string_value(json_object_get(j, "Bcc")), "<h\"q@d.test>");
    assert_string_equal(json_string_value(json_object_get(j, "ReplyTo")), "r@x.test");
    assert_string_equal(json_string_value(json_object_get(j, "TextBody")), "plain text");
    assert_non_null(strstr(json_string_value(json_object_get(j, "HtmlBody")), "cid:logo@x.test"));
    assert_string_equal(json_string_value(json_object_get(j, "MessageStream")), "outbound");
    h = json_object_get(j, "Headers");
    assert_string_equal(json_string_value(json_object_get(json_array_get(h, 0), "Name")), "Message-ID");
    assert_string_equal(json_string_value(json_object_get(json_array_get(h, 0), "Value")), "<m1@x.test>");
    atts = json_object_get(j, "Attachments");
    assert_string_equal(json_string_value(json_object_get(json_array_get(atts, 0), "ContentID")), "cid:logo@x.test");
    assert_string_equal(json_string_value(json_object_get(json_array_get(atts, 1), "Name")), "r.pdf");
    assert_string_equal(json_string_value(json_object_get(json_array_get(atts, 1), "Content")), "JVBERi0=");
    assert_null(json_object_get(json_array_get(atts, 1), "ContentID"));
    json_decref(j);
    built_free(&b);
}

/* The Authorization header is recomputed from what is sent. */
static void test_build_ses(void **state)
{
    struct built b;
    json_t *j;
    const char *data;
    struct buf want = BUF_INIT;
    unsigned char raw[4096];
    int n;
    char err[200];

    (void)state;
    build_with(&b, &api_provider_ses);
    assert_string_equal(b.call.url.data,
                        "https://api.example.test:8443/prefix/v2/email/outbound-emails");
    j = body_json(&b);
    data = json_string_value(json_object_get(json_object_get(json_object_get(j, "Content"), "Raw"), "Data"));
    n = EVP_DecodeBlock(raw, (const unsigned char *)data, (int)strlen(data));
    assert_true(n >= (int)b.msg.len);
    assert_memory_equal(raw, b.msg.data, b.msg.len);
    assert_int_equal(json_array_size(json_object_get(json_object_get(j, "Destination"), "ToAddresses")), 3);
    assert_string_equal(json_string_value(json_object_get(j, "ConfigurationSetName")), "cs-1");
    assert_string_equal(hdr(&b, "X-Amz-Date"), "20150830T123600Z");
    assert_string_equal(hdr(&b, "Host"), "api.example.test:8443");
    assert_string_equal(hdr(&b, "X-Amz-Security-Token"), "tok");
    {
        struct sigv4_header h[] = {
            {"content-type", "application/json"}, {"host", "api.example.test:8443"},
            {"x-amz-date", "20150830T123600Z"}, {"x-amz-security-token", "tok"},
        };
        struct sigv4_key k = {AWS_ID, AWS_SECRET, "eu-west-1", "ses"};
        struct sigv4_request r = {"POST", "/prefix/v2/email/outbound-emails", NULL, 0, h, 4,
                                  b.call.payload, b.call.payload_len};

        assert_int_equal(sigv4_sign(&k, &r, &want, NULL, err, sizeof(err)), 0);
    }
    assert_string_equal(hdr(&b, "Authorization"), want.data);
    assert_non_null(strstr(want.data, "Credential=AKIDEXAMPLE/20150830/eu-west-1/ses/aws4_request, "
                                      "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, "));
    buf_free(&want);
    json_decref(j);
    built_free(&b);
}

static void test_build_webhook(void **state)
{
    struct built b;
    struct buf s = BUF_INIT;
    unsigned char mac[32];
    unsigned int maclen = 32;
    char hex[80] = "v1=";
    int to = 0;

    (void)state;
    build_with(&b, &api_provider_webhook);
    assert_string_equal(b.call.url.data, "https://api.example.test:8443/prefix");
    assert_ptr_equal(b.call.payload, b.msg.data);        /* sent in place */
    assert_string_equal(hdr(&b, "Content-Type"), "message/rfc822");
    assert_string_equal(hdr(&b, "X-Mailferry-Queue-Id"), "Q1");
    assert_string_equal(hdr(&b, "X-Mailferry-Envelope-From"), "<bounce@x.test>");
    assert_string_equal(hdr(&b, "X-Mailferry-Timestamp"), "1440938160");
    for (struct curl_slist *l = b.call.headers; l != NULL; l = l->next)
        to += strncmp(l->data, "X-Mailferry-Envelope-To: <", 26) == 0;
    assert_int_equal(to, 3);
    buf_appends(&s, "mailferry-v1\n1440938160\nQ1\nbounce@x.test\na@d.test\nc@d.test\nh\"q@d.test\n\n");
    buf_append(&s, b.msg.data, b.msg.len);
    HMAC(EVP_sha256(), SECRET, (int)strlen(SECRET), (const unsigned char *)s.data, s.len, mac,
         &maclen);
    for (size_t i = 0; i < 32; i++)
        snprintf(hex + 3 + 2 * i, 3, "%02x", mac[i]);
    assert_string_equal(hdr(&b, "X-Mailferry-Signature"), hex);
    buf_free(&s);
    built_free(&b);
}

static void test_build_mailgun(void **state)
{
    struct built b;

    (void)state;
    build_with(&b, &api_provider_mailgun);
    assert_string_equal(b.call.url.data,
                        "https://api.example.test:8443/prefix/v3/mg.x.test/messages.mime");
    assert_string_equal(hdr(&b, "Authorization"), "Basic YXBpOmtleQ==");
    assert_non_null(b.call.form);
    built_free(&b);
}

/* ---- the engine on a loop ------------------------------------------------------------ */

struct sent {
    int done;
    struct transport_result res;
    struct transport_rcpt_result rcpt[4];
};

static void on_sent(const struct transport_result *res, void *arg)
{
    struct sent *s = arg;

    s->done++;
    s->res = *res;
    for (size_t i = 0; i < res->nrcpts && i < 4; i++)
        s->rcpt[i] = res->rcpt[i];
    s->res.rcpt = s->rcpt;
}

/* A port on 127.0.0.1 where nothing listens. */
static int closed_port(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static void run_until(uv_loop_t *loop, const int *flag, int want)
{
    while (*flag < want && uv_run(loop, UV_RUN_ONCE))
        ;
}

static void test_engine_connect_refused(void **state)
{
    uv_loop_t loop;
    struct transport *t;
    struct transport_msg m;
    const char *rcpts[] = {"a@d.test", "b@d.test", "A@d.test"};
    struct sent s1, s2;
    char url[100], err[600], why[400];

    (void)state;
    setup_env();
    uv_loop_init(&loop);
    snprintf(url, sizeof(url), "https://127.0.0.1:%d/hook", closed_port());
    t = mk(&loop, err, sizeof(err), "provider", "webhook", "base_url", url, "webhook_secret_env",
           "MF_TEST_KEY", "unhealthy_after", "2", "recover_after", "60", "connect_timeout", "2",
           NULL);
    assert_non_null(t);
    memset(&m, 0, sizeof(m));
    m.id = "Q1";
    m.from = "s@x.test";
    m.rcpts = rcpts;
    m.nrcpts = 3;
    m.data = "Subject: t\r\n\r\nbody\r\n";
    m.len = strlen(m.data);
    memset(&s1, 0, sizeof(s1));
    api_transport_ops.send(t, &m, on_sent, &s1);
    assert_int_equal(s1.done, 0);             /* never from inside send() */
    run_until(&loop, &s1.done, 1);
    assert_int_equal(s1.done, 1);
    assert_int_equal(s1.res.nrcpts, 3);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(s1.rcpt[i].code, 451);
        assert_string_equal(s1.rcpt[i].enhanced, "4.4.1");
        assert_int_equal(s1.rcpt[i].final, 0);
        assert_int_equal(s1.rcpt[i].ambiguous, 0);
        assert_null(strstr(s1.rcpt[i].text, SECRET));
    }
    assert_int_equal(s1.res.transport_failure, 1);
    assert_int_equal(s1.res.resend_ambiguous, 0);
    assert_non_null(strstr(s1.res.remote, "webhook 127.0.0.1:"));
    assert_int_equal(api_transport_ops.health(t, why, sizeof(why)), 1);

    memset(&s2, 0, sizeof(s2));
    api_transport_ops.send(t, &m, on_sent, &s2);
    run_until(&loop, &s2.done, 1);
    assert_int_equal(api_transport_ops.health(t, why, sizeof(why)), 0);
    assert_non_null(strstr(why, "Couldn't connect"));
    close_and_run(&loop, t);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* close() with requests queued behind the cap: every send gets exactly
 * one callback, the queued ones "shutting down", then closed. */
static void test_engine_close_with_queue(void **state)
{
    uv_loop_t loop;
    struct transport *t;
    struct transport_msg m;
    const char *rcpts[] = {"a@d.test"};
    struct sent s[3];
    int closed = 0, shutting = 0;
    char url[100], err[600];

    (void)state;
    setup_env();
    uv_loop_init(&loop);
    snprintf(url, sizeof(url), "https://127.0.0.1:%d", closed_port());
    t = mk(&loop, err, sizeof(err), "provider", "sendgrid", "base_url", url, "api_key_env",
           "MF_TEST_KEY", "max_connections", "1", "resend_ambiguous", "yes", NULL);
    assert_non_null(t);
    memset(&m, 0, sizeof(m));
    m.id = "Q2";
    m.from = "s@x.test";
    m.rcpts = rcpts;
    m.nrcpts = 1;
    m.data = "From: s@x.test\r\nTo: a@d.test\r\nSubject: t\r\n\r\nbody\r\n";
    m.len = strlen(m.data);
    memset(s, 0, sizeof(s));
    for (int i = 0; i < 3; i++)
        api_transport_ops.send(t, &m, on_sent, &s[i]);
    api_transport_ops.close(t, on_closed, &closed);
    run_until(&loop, &closed, 1);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(s[i].done, 1);
        assert_int_equal(s[i].rcpt[0].final, 0);
        assert_int_equal(s[i].res.resend_ambiguous, 1);
        shutting += strcmp(s[i].rcpt[0].text, "transport shutting down") == 0;
    }
    assert_int_equal(shutting, 2);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* A signed message cannot be rebuilt by a JSON provider: permanent 5.6.3,
 * decided before any network. */
static void test_engine_opaque(void **state)
{
    uv_loop_t loop;
    struct transport *t;
    struct transport_msg m;
    const char *rcpts[] = {"a@d.test"};
    struct sent s;
    char url[100], err[600];

    (void)state;
    setup_env();
    uv_loop_init(&loop);
    snprintf(url, sizeof(url), "https://127.0.0.1:%d", closed_port());
    t = mk(&loop, err, sizeof(err), "provider", "postmark", "base_url", url, "api_key_env",
           "MF_TEST_KEY", NULL);
    assert_non_null(t);
    memset(&m, 0, sizeof(m));
    m.id = "Q3";
    m.from = "s@x.test";
    m.rcpts = rcpts;
    m.nrcpts = 1;
    m.data = "From: s@x.test\r\nContent-Type: multipart/signed; protocol=\"application/"
             "pkcs7-signature\"; boundary=s\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\nx\r\n"
             "--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAA==\r\n--s--\r\n";
    m.len = strlen(m.data);
    memset(&s, 0, sizeof(s));
    api_transport_ops.send(t, &m, on_sent, &s);
    run_until(&loop, &s.done, 1);
    assert_int_equal(s.rcpt[0].code, 554);
    assert_string_equal(s.rcpt[0].enhanced, "5.6.3");
    assert_int_equal(s.rcpt[0].final, 1);
    assert_int_equal(s.res.transport_failure, 0);
    close_and_run(&loop, t);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_config_ok),
        cmocka_unit_test(test_retry_after),
        cmocka_unit_test(test_clean_text),
        cmocka_unit_test(test_parse_table),
        cmocka_unit_test(test_sendgrid_ratelimit_reset),
        cmocka_unit_test(test_plan_json),
        cmocka_unit_test(test_plan_chunks),
        cmocka_unit_test(test_build_sendgrid),
        cmocka_unit_test(test_build_postmark),
        cmocka_unit_test(test_build_ses),
        cmocka_unit_test(test_build_webhook),
        cmocka_unit_test(test_build_mailgun),
        cmocka_unit_test(test_engine_connect_refused),
        cmocka_unit_test(test_engine_close_with_queue),
        cmocka_unit_test(test_engine_opaque),
    };

    log_set_level("warn");
    return cmocka_run_group_tests(tests, NULL, NULL);
}
