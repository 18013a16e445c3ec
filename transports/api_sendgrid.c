/*
 * SendGrid v3 Mail Send (Twilio SendGrid API reference, "Mail Send"):
 * POST /v3/mail/send with "Authorization: Bearer <key>" and a JSON body.
 * SendGrid takes no raw MIME: the message is taken apart (lib/mime) into
 *   personalizations[0].to/cc/bcc   the request's envelope recipients, in
 *                                   the roles api.c planned (see api.h)
 *   from {email, name}              the From field (the envelope sender
 *                                   when the message has none)
 *   reply_to / reply_to_list        the Reply-To field
 *   subject                         decoded; " " when the message has none
 *                                   (SendGrid requires one)
 *   content[]                       text/plain first, then text/html
 *                                   (the order SendGrid requires)
 *   attachments[]                   {content (base64), filename, type,
 *                                   disposition, content_id when inline}
 *   headers {}                      the carried headers, Message-ID kept
 * SendGrid answers 202 with the message id in X-Message-Id; errors carry
 * {"errors": [{"message", "field", "help"}]}. A 429 names the end of the
 * rate limit window in X-RateLimit-Reset (unix time).
 */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "lib/xmalloc.h"
#include "transports/api.h"

static void sg_default_url(const struct api_settings *s, struct buf *out)
{
    (void)s;
    buf_appends(out, "https://api.sendgrid.com");
}

static json_t *sg_email(const char *addr, const char *name)
{
    json_t *o = json_object();

    json_object_set_new(o, "email", api_json_str(addr));
    if (name != NULL && name[0] != '\0')
        json_object_set_new(o, "name", api_json_str(name));
    return o;
}

static json_t *sg_list(const char *const *v, size_t n)
{
    json_t *a = json_array();

    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, sg_email(v[i], NULL));
    return a;
}

static int sg_build(struct api_call *c, CURL *easy, char *err, size_t errlen)
{
    const struct mime_parts *p = c->parts;
    json_t *root = json_object(), *pers = json_object(), *content = json_array();
    struct buf auth = BUF_INIT;
    char *dump;

    (void)easy;
    if (p->from.addr[0] == '\0' && c->msg->from[0] == '\0') {
        snprintf(err, errlen, "no From address and a null envelope sender");
        json_decref(root);
        json_decref(pers);
        json_decref(content);
        return -1;
    }
    json_object_set_new(pers, "to", sg_list(c->to, c->nto));
    if (c->ncc > 0)
        json_object_set_new(pers, "cc", sg_list(c->cc, c->ncc));
    if (c->nbcc > 0)
        json_object_set_new(pers, "bcc", sg_list(c->bcc, c->nbcc));
    json_object_set_new(root, "personalizations", json_pack("[o]", pers));
    if (p->from.addr[0] != '\0')
        json_object_set_new(root, "from", sg_email(p->from.addr, p->from.name));
    else
        json_object_set_new(root, "from", sg_email(c->msg->from, NULL));
    if (p->nreply_to == 1) {
        json_object_set_new(root, "reply_to", sg_email(p->reply_to[0].addr, p->reply_to[0].name));
    } else if (p->nreply_to > 1) {
        json_t *l = json_array();

        for (size_t i = 0; i < p->nreply_to; i++)
            json_array_append_new(l, sg_email(p->reply_to[i].addr, p->reply_to[i].name));
        json_object_set_new(root, "reply_to_list", l);
    }
    json_object_set_new(root, "subject",
                        api_json_str(p->subject != NULL && p->subject[0] != '\0' ? p->subject
                                                                                 : " "));
    if (p->text != NULL && p->text[0] != '\0')
        json_array_append_new(content, json_pack("{s:s,s:o}", "type", "text/plain", "value",
                                                 api_json_str(p->text)));
    if (p->html != NULL && p->html[0] != '\0')
        json_array_append_new(content, json_pack("{s:s,s:o}", "type", "text/html", "value",
                                                 api_json_str(p->html)));
    if (json_array_size(content) == 0)
        json_array_append_new(content, json_pack("{s:s,s:s}", "type", "text/plain", "value", " "));
    json_object_set_new(root, "content", content);
    if (p->natt > 0) {
        json_t *atts = json_array();

        for (size_t i = 0; i < p->natt; i++) {
            const struct mime_attachment *a = &p->att[i];
            struct buf b64 = BUF_INIT;
            json_t *o = json_object();

            buf_appends(&b64, "");
            api_base64(&b64, a->data, a->len);
            json_object_set_new(o, "content", json_stringn(b64.data, b64.len));
            buf_free(&b64);
            json_object_set_new(o, "filename", api_json_str(a->filename));
            json_object_set_new(o, "type", api_json_str(a->content_type));
            json_object_set_new(o, "disposition", json_string(a->is_inline ? "inline"
                                                                            : "attachment"));
            if (a->is_inline)
                json_object_set_new(o, "content_id", api_json_str(a->content_id));
            json_array_append_new(atts, o);
        }
        json_object_set_new(root, "attachments", atts);
    }
    if (p->nheaders > 0) {
        json_t *h = json_object();

        for (size_t i = 0; i < p->nheaders; i++)
            if (p->headers[i].value[0] != '\0')
                json_object_set_new(h, p->headers[i].name, api_json_str(p->headers[i].value));
        if (json_object_size(h) > 0)
            json_object_set_new(root, "headers", h);
        else
            json_decref(h);
    }
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

    buf_appendf(&c->url, "%s/v3/mail/send", c->cfg->base_url);
    buf_appendf(&auth, "Bearer %s", c->cfg->api_key);
    api_add_header(&c->headers, "Authorization", auth.data);
    memset(auth.data, 0, auth.len);
    buf_free(&auth);
    api_add_header(&c->headers, "Content-Type", "application/json");
    return 0;
}

static void sg_parse(const struct api_response *r, struct api_outcome *o)
{
    json_t *j, *errs;
    struct buf detail = BUF_INIT;

    if (r->status >= 200 && r->status < 300) {
        api_outcome_delivered(o, "sendgrid", api_response_header(r, "X-Message-Id"));
        return;
    }
    j = json_loadb(r->body, r->body_len, 0, NULL);
    errs = json_is_object(j) ? json_object_get(j, "errors") : NULL;
    for (size_t i = 0; i < json_array_size(errs); i++) {
        json_t *e = json_array_get(errs, i);
        const char *m = json_string_value(json_object_get(e, "message"));
        const char *f = json_string_value(json_object_get(e, "field"));

        if (m == NULL)
            continue;
        if (detail.len > 0)
            buf_appends(&detail, "; ");
        if (f != NULL)
            buf_appendf(&detail, "%s: ", f);
        buf_appends(&detail, m);
    }
    if (detail.len == 0)
        buf_append(&detail, r->body, r->body_len);
    if (r->status == 429) {
        api_outcome_throttle(o, r, "sendgrid", detail.data);
        if (o->retry_after_ms == 0) {
            /* No Retry-After: the window ends at X-RateLimit-Reset. */
            const char *reset = api_response_header(r, "X-RateLimit-Reset");
            long long at = reset != NULL ? strtoll(reset, NULL, 10) : 0;

            if (at > r->now)
                o->retry_after_ms = (at - r->now) * 1000 > 86400000LL ? 86400000LL
                                                                      : (at - r->now) * 1000;
        }
    } else {
        api_outcome_http(r, "sendgrid", detail.data, o);
    }
    buf_free(&detail);
    json_decref(j);
}

const struct api_provider api_provider_sendgrid = {
    .name = "sendgrid",
    .max_rcpts = 1000,           /* SendGrid: 1000 recipients per request */
    .json = 1,
    .default_base_url = sg_default_url,
    .build = sg_build,
    .parse = sg_parse,
};
