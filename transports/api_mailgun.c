/*
 * Mailgun: "Send a message in MIME format" (Mailgun API reference,
 * Messages): POST /v3/{domain}/messages.mime with HTTP Basic
 * authentication "api:<key>", a multipart/form-data body (RFC 7578)
 * with one "to" field per envelope recipient and the message, unchanged,
 * as the file field "message". Mailgun answers 200 with
 * {"id": "<...>", "message": "Queued. Thank you."}; errors carry
 * {"message": "..."} (or plain text for some 401s).
 *
 * The form is libcurl's (curl_mime); the message part reads the caller's
 * bytes in place, which stay valid until the done callback.
 */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "lib/xmalloc.h"
#include "transports/api.h"

static void mg_default_url(const struct api_settings *s, struct buf *out)
{
    (void)s;
    buf_appends(out, "https://api.mailgun.net");
}

/* The message part's reader: the bytes in place. */
struct mg_reader {
    const char *data;
    size_t len, pos;
};

static size_t mg_read(char *buf, size_t size, size_t nitems, void *arg)
{
    struct mg_reader *r = arg;
    size_t n = size * nitems;

    if (n > r->len - r->pos)
        n = r->len - r->pos;
    memcpy(buf, r->data + r->pos, n);
    r->pos += n;
    return n;
}

static int mg_seek(void *arg, curl_off_t offset, int origin)
{
    struct mg_reader *r = arg;
    curl_off_t base = origin == SEEK_SET ? 0 : origin == SEEK_CUR ? (curl_off_t)r->pos
                                                                   : (curl_off_t)r->len;

    if (base + offset < 0 || base + offset > (curl_off_t)r->len)
        return CURL_SEEKFUNC_FAIL;
    r->pos = (size_t)(base + offset);
    return CURL_SEEKFUNC_OK;
}

static int mg_build(struct api_call *c, CURL *easy, char *err, size_t errlen)
{
    struct buf auth = BUF_INIT;
    curl_mimepart *part;
    struct mg_reader *rd;

    (void)err;
    (void)errlen;
    buf_appendf(&c->url, "%s/v3/%s/messages.mime", c->cfg->base_url, c->cfg->domain);
    buf_appendf(&auth, "Basic %s", c->cfg->basic_auth);
    api_add_header(&c->headers, "Authorization", auth.data);
    memset(auth.data, 0, auth.len);
    buf_free(&auth);
    api_add_header(&c->headers, "Accept", "application/json");

    c->form = curl_mime_init(easy);
    for (size_t i = 0; i < c->nrcpts; i++) {
        part = curl_mime_addpart(c->form);
        curl_mime_name(part, "to");
        curl_mime_data(part, c->rcpts[i], CURL_ZERO_TERMINATED);
    }
    part = curl_mime_addpart(c->form);
    curl_mime_name(part, "message");
    curl_mime_filename(part, "message.mime");
    curl_mime_type(part, "message/rfc822");
    rd = xcalloc(1, sizeof(*rd));
    rd->data = c->msg->data;
    rd->len = c->msg->len;
    curl_mime_data_cb(part, (curl_off_t)rd->len, mg_read, mg_seek, free, rd);
    return 0;
}

static void mg_parse(const struct api_response *r, struct api_outcome *o)
{
    json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
    const char *msg = NULL, *id = NULL;

    if (json_is_object(j)) {
        msg = json_string_value(json_object_get(j, "message"));
        id = json_string_value(json_object_get(j, "id"));
    }
    if (r->status >= 200 && r->status < 300)
        api_outcome_delivered(o, "mailgun", id);
    else
        api_outcome_http(r, "mailgun", msg != NULL ? msg : r->body, o);
    json_decref(j);
}

const struct api_provider api_provider_mailgun = {
    .name = "mailgun",
    .max_rcpts = 1000,           /* Mailgun's limit of recipients per message */
    .json = 0,
    .default_base_url = mg_default_url,
    .build = mg_build,
    .parse = mg_parse,
};
