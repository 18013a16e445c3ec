/*
 * Amazon SES API v2, SendEmail (Amazon SES API Reference, "SendEmail"):
 * POST /v2/email/outbound-emails with a JSON body
 *   {"Content": {"Raw": {"Data": "<base64 of the message>"}},
 *    "Destination": {"ToAddresses": [envelope recipients]},
 *    "ConfigurationSetName": "..."}            (when configured)
 * signed with AWS Signature Version 4 (lib/sigv4; service "ses", the
 * route's region). With raw content SES sends the message as it is and
 * takes the envelope recipients from Destination (at most 50 per call);
 * the From header gives the sender, which must be a verified identity.
 *
 * SES answers 200 {"MessageId": "..."}. Errors (REST-JSON protocol) name
 * their type in the X-Amzn-ErrorType header ("Type:uri") or the body's
 * "__type"/"code", with "message" for the text. Throttling types are
 * temporary (a daily quota spent makes the route unhealthy instead: no
 * use trying again for a while); AccountSuspended, SendingPaused and the
 * signature/credential errors mark the route unhealthy.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "lib/sigv4.h"
#include "lib/xmalloc.h"
#include "transports/api.h"

#define SES_PATH "/v2/email/outbound-emails"

static void ses_default_url(const struct api_settings *s, struct buf *out)
{
    buf_appendf(out, "https://email.%s.amazonaws.com", s->region);
}

static void ses_json_append(struct buf *b, json_t *j)
{
    char *s = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);

    buf_appends(b, s != NULL ? s : "null");
    free(s);
    json_decref(j);
}

static int ses_build(struct api_call *c, CURL *easy, char *err, size_t errlen)
{
    const struct api_settings *cfg = c->cfg;
    struct sigv4_header h[4];
    struct sigv4_request sr;
    struct sigv4_key key = {cfg->access_key_id, cfg->secret_key, cfg->region, "ses"};
    struct buf auth = BUF_INIT, path = BUF_INIT;
    char date[SIGV4_DATE_LEN + 1];
    json_t *to = json_array();
    const char *slash;
    size_t nh = 0;

    (void)easy;
    buf_appendf(&c->url, "%s" SES_PATH, cfg->base_url);

    /* The body is spliced by hand around the base64 so that a large
     * message is not copied once more into a JSON tree. */
    buf_appends(&c->body, "{\"Content\":{\"Raw\":{\"Data\":\"");
    api_base64(&c->body, c->msg->data, c->msg->len);
    buf_appends(&c->body, "\"}},\"Destination\":{\"ToAddresses\":");
    for (size_t i = 0; i < c->nrcpts; i++)
        json_array_append_new(to, api_json_str(c->rcpts[i]));
    ses_json_append(&c->body, to);
    buf_appends(&c->body, "}");
    if (cfg->configuration_set != NULL) {
        buf_appends(&c->body, ",\"ConfigurationSetName\":");
        ses_json_append(&c->body, api_json_str(cfg->configuration_set));
    }
    buf_appends(&c->body, "}");
    c->payload = c->body.data;
    c->payload_len = c->body.len;

    /* The signed path is the URL's path: base_url may carry a prefix. */
    slash = strchr(cfg->base_url + 8, '/');
    buf_appendf(&path, "%s" SES_PATH, slash != NULL ? slash : "");
    sigv4_amz_date(c->now, date);
    h[nh++] = (struct sigv4_header){"Content-Type", "application/json"};
    h[nh++] = (struct sigv4_header){"Host", cfg->host};
    h[nh++] = (struct sigv4_header){"X-Amz-Date", date};
    if (cfg->session_token != NULL)
        h[nh++] = (struct sigv4_header){"X-Amz-Security-Token", cfg->session_token};
    memset(&sr, 0, sizeof(sr));
    sr.method = "POST";
    sr.path = path.data;
    sr.headers = h;
    sr.nheaders = nh;
    sr.payload = c->body.data;
    sr.payload_len = c->body.len;
    if (sigv4_sign(&key, &sr, &auth, NULL, err, errlen) != 0) {
        buf_free(&path);
        return -1;
    }
    buf_free(&path);
    for (size_t i = 0; i < nh; i++)
        api_add_header(&c->headers, h[i].name, h[i].value);
    api_add_header(&c->headers, "Authorization", auth.data);
    buf_free(&auth);
    return 0;
}

/* "TooManyRequestsException:http://internal.amazon.com/..." and
 * "com.amazonaws.ses#Throttling" both name the type. */
static void ses_error_type(const char *raw, char *out, size_t n)
{
    const char *hash, *p = raw;
    size_t len;

    out[0] = '\0';
    if (raw == NULL)
        return;
    hash = strchr(p, '#');
    if (hash != NULL && (strchr(p, ':') == NULL || hash < strchr(p, ':')))
        p = hash + 1;
    len = strcspn(p, ":");
    api_clean_text(out, n, p, len);
}

static int ses_type_in(const char *type, const char *const *list)
{
    for (; *list != NULL; list++)
        if (strcmp(type, *list) == 0)
            return 1;
    return 0;
}

static const char *const ses_throttling[] = {
    "TooManyRequestsException", "ThrottlingException", "Throttling", "LimitExceededException",
    "RequestLimitExceeded", NULL,
};

static const char *const ses_account[] = {
    "AccountSuspendedException", "SendingPausedException", "UnrecognizedClientException",
    "InvalidClientTokenId", "SignatureDoesNotMatch", "InvalidSignatureException",
    "IncompleteSignature", "ExpiredTokenException", "ExpiredToken", "AccessDeniedException",
    "MissingAuthenticationToken", "NotFoundException", NULL,
};

static void ses_parse(const struct api_response *r, struct api_outcome *o)
{
    json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
    const char *msg = NULL, *raw_type = api_response_header(r, "X-Amzn-ErrorType");
    char type[128], detail[400];

    if (json_is_object(j)) {
        msg = json_string_value(json_object_get(j, "message"));
        if (msg == NULL)
            msg = json_string_value(json_object_get(j, "Message"));
        if (raw_type == NULL)
            raw_type = json_string_value(json_object_get(j, "__type"));
        if (raw_type == NULL)
            raw_type = json_string_value(json_object_get(j, "code"));
    }
    if (r->status >= 200 && r->status < 300) {
        api_outcome_delivered(o, "ses", json_is_object(j) ? json_string_value(
                                                                json_object_get(j, "MessageId"))
                                                          : NULL);
        json_decref(j);
        return;
    }
    ses_error_type(raw_type, type, sizeof(type));
    snprintf(detail, sizeof(detail), "%s%s%s", type, type[0] && msg ? ": " : "",
             msg != NULL ? msg : type[0] ? "" : r->body);
    if (ses_type_in(type, ses_throttling)) {
        /* "Daily message quota exceeded": nothing gets through until the
         * quota resets, so the route steps aside; the sending rate
         * ("Maximum sending rate exceeded") is only a reason to wait. */
        if (msg != NULL && strcasestr(msg, "daily") != NULL)
            api_outcome_account(o, "ses", r->status, detail);
        else
            api_outcome_throttle(o, r, "ses", detail);
    } else if (ses_type_in(type, ses_account)) {
        api_outcome_account(o, "ses", r->status, detail);
    } else {
        api_outcome_http(r, "ses", detail, o);
    }
    json_decref(j);
}

const struct api_provider api_provider_ses = {
    .name = "ses",
    .max_rcpts = 50,             /* SES: at most 50 recipients per message */
    .json = 0,
    .default_base_url = ses_default_url,
    .build = ses_build,
    .parse = ses_parse,
};
