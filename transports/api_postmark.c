/*
 * Postmark "Send a single email" (Postmark API reference, Email API):
 * POST /email with "X-Postmark-Server-Token: <token>", "Accept:
 * application/json" and a JSON body built like SendGrid's (lib/mime):
 *   From            "Name" <addr> (the envelope sender when the message
 *                   has no From)
 *   To, Cc, Bcc     comma-separated, the request's recipients in the roles
 *                   api.c planned (at most 50 in all)
 *   Subject, TextBody, HtmlBody, ReplyTo
 *   Headers         [{Name, Value}], the carried headers (Message-ID kept)
 *   Attachments     [{Name, Content (base64), ContentType, ContentID}],
 *                   ContentID "cid:<id>" for inline parts
 *   MessageStream   the route's message_stream ("outbound")
 * Postmark answers 200 {"ErrorCode": 0, "MessageID": "..."}; errors are
 * 422 (or 401) with {"ErrorCode": n, "Message": "..."}. ErrorCode 10 (bad
 * token), 405 (not allowed to send), 412 (account pending approval) and
 * 413 (account may not send) are account problems: the route steps aside.
 */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "lib/xmalloc.h"
#include "transports/api.h"

static void pm_default_url(const struct api_settings *s, struct buf *out)
{
    (void)s;
    buf_appends(out, "https://api.postmarkapp.com");
}

/* An address for a comma-separated list: in angle brackets when it holds
 * a comma or quote that would otherwise split or confuse the list. */
static void pm_addr(struct buf *b, const char *addr)
{
    if (strpbrk(addr, ",\"<>") != NULL)
        buf_appendf(b, "<%s>", addr);
    else
        buf_appends(b, addr);
}

/* "Display Name" <addr>, quoted-string escaping per RFC 5322 section 3.2.4. */
static void pm_mailbox(struct buf *b, const char *name, const char *addr)
{
    if (name == NULL || name[0] == '\0') {
        pm_addr(b, addr);
        return;
    }
    buf_appends(b, "\"");
    for (const char *p = name; *p != '\0'; p++) {
        if (*p == '"' || *p == '\\')
            buf_appends(b, "\\");
        buf_append(b, p, 1);
    }
    buf_appendf(b, "\" <%s>", addr);
}

static json_t *pm_list(const char *const *v, size_t n)
{
    struct buf b = BUF_INIT;
    json_t *j;

    buf_appends(&b, "");
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            buf_appends(&b, ", ");
        pm_addr(&b, v[i]);
    }
    j = api_json_str(b.data);
    buf_free(&b);
    return j;
}

static int pm_build(struct api_call *c, CURL *easy, char *err, size_t errlen)
{
    const struct mime_parts *p = c->parts;
    json_t *root = json_object();
    struct buf b = BUF_INIT;
    char *dump;

    (void)easy;
    if (p->from.addr[0] == '\0' && c->msg->from[0] == '\0') {
        snprintf(err, errlen, "no From address and a null envelope sender");
        json_decref(root);
        return -1;
    }
    buf_appends(&b, "");
    if (p->from.addr[0] != '\0')
        pm_mailbox(&b, p->from.name, p->from.addr);
    else
        pm_addr(&b, c->msg->from);
    json_object_set_new(root, "From", api_json_str(b.data));
    buf_free(&b);
    json_object_set_new(root, "To", pm_list(c->to, c->nto));
    if (c->ncc > 0)
        json_object_set_new(root, "Cc", pm_list(c->cc, c->ncc));
    if (c->nbcc > 0)
        json_object_set_new(root, "Bcc", pm_list(c->bcc, c->nbcc));
    if (p->subject != NULL)
        json_object_set_new(root, "Subject", api_json_str(p->subject));
    if (p->text != NULL && p->text[0] != '\0')
        json_object_set_new(root, "TextBody", api_json_str(p->text));
    if (p->html != NULL && p->html[0] != '\0')
        json_object_set_new(root, "HtmlBody", api_json_str(p->html));
    if (json_object_get(root, "TextBody") == NULL && json_object_get(root, "HtmlBody") == NULL)
        json_object_set_new(root, "TextBody", json_string(" "));   /* one is required */
    if (p->nreply_to > 0) {
        buf_appends(&b, "");
        for (size_t i = 0; i < p->nreply_to; i++) {
            if (i > 0)
                buf_appends(&b, ", ");
            pm_mailbox(&b, p->reply_to[i].name, p->reply_to[i].addr);
        }
        json_object_set_new(root, "ReplyTo", api_json_str(b.data));
        buf_free(&b);
    }
    if (p->nheaders > 0) {
        json_t *h = json_array();

        for (size_t i = 0; i < p->nheaders; i++)
            json_array_append_new(h, json_pack("{s:o,s:o}", "Name",
                                               api_json_str(p->headers[i].name), "Value",
                                               api_json_str(p->headers[i].value)));
        json_object_set_new(root, "Headers", h);
    }
    if (p->natt > 0) {
        json_t *atts = json_array();

        for (size_t i = 0; i < p->natt; i++) {
            const struct mime_attachment *a = &p->att[i];
            struct buf b64 = BUF_INIT;
            json_t *o = json_object();

            json_object_set_new(o, "Name", api_json_str(a->filename));
            buf_appends(&b64, "");
            api_base64(&b64, a->data, a->len);
            json_object_set_new(o, "Content", json_stringn(b64.data, b64.len));
            buf_free(&b64);
            json_object_set_new(o, "ContentType", api_json_str(a->content_type));
            if (a->is_inline) {
                buf_appendf(&b, "cid:%s", a->content_id);
                json_object_set_new(o, "ContentID", api_json_str(b.data));
                buf_free(&b);
            }
            json_array_append_new(atts, o);
        }
        json_object_set_new(root, "Attachments", atts);
    }
    json_object_set_new(root, "MessageStream", api_json_str(c->cfg->message_stream));
    dump = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (dump == NULL) {
        snprintf(err, errlen, "cannot encode the JSON body");
        return -1;
    }
    buf_appends(&c->body, dump);
    free(dump);
    c->payload = c->body.data;
    c->payload_len = c->body.len;

    buf_appendf(&c->url, "%s/email", c->cfg->base_url);
    api_add_header(&c->headers, "Accept", "application/json");
    api_add_header(&c->headers, "Content-Type", "application/json");
    api_add_header(&c->headers, "X-Postmark-Server-Token", c->cfg->api_key);
    return 0;
}

static void pm_parse(const struct api_response *r, struct api_outcome *o)
{
    json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
    const char *msg = NULL;
    json_int_t code = -1;
    char detail[400];

    if (json_is_object(j)) {
        msg = json_string_value(json_object_get(j, "Message"));
        if (json_is_integer(json_object_get(j, "ErrorCode")))
            code = json_integer_value(json_object_get(j, "ErrorCode"));
    }
    if (r->status >= 200 && r->status < 300 && code <= 0) {
        api_outcome_delivered(o, "postmark", json_is_object(j)
                                                 ? json_string_value(json_object_get(j, "MessageID"))
                                                 : NULL);
        json_decref(j);
        return;
    }
    if (code >= 0)
        snprintf(detail, sizeof(detail), "ErrorCode %lld: %s", (long long)code,
                 msg != NULL ? msg : "");
    else
        snprintf(detail, sizeof(detail), "%s", msg != NULL ? msg : r->body);
    if (code == 10 || code == 405 || code == 412 || code == 413)
        api_outcome_account(o, "postmark", r->status, detail);
    else if (r->status >= 200 && r->status < 300)
        /* 200 with an ErrorCode: an API error all the same. */
        api_outcome_http(&(struct api_response){.status = 422, .body = r->body,
                                                .body_len = r->body_len, .headers = r->headers,
                                                .nheaders = r->nheaders, .now = r->now},
                         "postmark", detail, o);
    else
        api_outcome_http(r, "postmark", detail, o);
    json_decref(j);
}

const struct api_provider api_provider_postmark = {
    .name = "postmark",
    .max_rcpts = 50,             /* Postmark: 50 recipients in To, Cc and Bcc together */
    .json = 1,
    .default_base_url = pm_default_url,
    .build = pm_build,
    .parse = pm_parse,
};
