/*
 * webhook: for an operator's own HTTP relay. POST of the message,
 * unchanged, to base_url (the full URL) with
 *   Content-Type: message/rfc822
 *   X-Mailferry-Queue-Id: <queue id>
 *   X-Mailferry-Envelope-From: <sender>          ("<>" for the null sender)
 *   X-Mailferry-Envelope-To: <rcpt>              (one header per recipient)
 *   X-Mailferry-Timestamp: <unix seconds>
 *   X-Mailferry-Signature: v1=<hex HMAC-SHA256>
 * The signature covers the envelope and the body, so a captured request
 * cannot be replayed to other recipients:
 *   HMAC-SHA256(secret, "mailferry-v1\n" timestamp "\n" queue_id "\n"
 *               sender "\n" rcpt_1 "\n" ... rcpt_n "\n" "\n" body)
 * where sender and recipients are the bare addresses ("" for the null
 * sender). Receivers should also refuse timestamps more than a few minutes
 * old. docs/api.md shows a verifier.
 *
 * Any 2xx is delivered; the message id is taken from a JSON body's "id"
 * or the X-Message-Id header. Errors map like every provider's
 * (api_outcome_http), with the body's "error" or "message" as the text.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "lib/xmalloc.h"
#include "transports/api.h"

/* HMAC-SHA256 over the parts in order (EVP_MAC: the body is not copied). */
static int wh_hmac(const char *key, const void *const *parts, const size_t *lens, size_t n,
                   char hex[65])
{
    static const char digits[] = "0123456789abcdef";
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *ctx = mac != NULL ? EVP_MAC_CTX_new(mac) : NULL;
    OSSL_PARAM params[2];
    unsigned char out[32];
    size_t outlen = 0;
    int ok;

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    ok = ctx != NULL &&
         EVP_MAC_init(ctx, (const unsigned char *)key, strlen(key), params) == 1;
    for (size_t i = 0; ok && i < n; i++)
        ok = EVP_MAC_update(ctx, parts[i], lens[i]) == 1;
    ok = ok && EVP_MAC_final(ctx, out, &outlen, sizeof(out)) == 1 && outlen == 32;
    EVP_MAC_CTX_free(ctx);
    EVP_MAC_free(mac);
    if (!ok)
        return -1;
    for (size_t i = 0; i < 32; i++) {
        hex[2 * i] = digits[out[i] >> 4];
        hex[2 * i + 1] = digits[out[i] & 15];
    }
    hex[64] = '\0';
    return 0;
}

static int wh_build(struct api_call *c, CURL *easy, char *err, size_t errlen)
{
    struct buf env = BUF_INIT, v = BUF_INIT;
    char ts[32], hex[65];
    const void *parts[2];
    size_t lens[2];

    (void)easy;
    buf_appends(&c->url, c->cfg->base_url);
    snprintf(ts, sizeof(ts), "%lld", (long long)c->now);
    /* The envelope part of the signed text. */
    buf_appendf(&env, "mailferry-v1\n%s\n%s\n%s\n", ts, c->msg->id, c->msg->from);
    for (size_t i = 0; i < c->nrcpts; i++)
        buf_appendf(&env, "%s\n", c->rcpts[i]);
    buf_appends(&env, "\n");
    parts[0] = env.data;
    lens[0] = env.len;
    parts[1] = c->msg->data;
    lens[1] = c->msg->len;
    if (wh_hmac(c->cfg->webhook_secret, parts, lens, 2, hex) != 0) {
        snprintf(err, errlen, "HMAC-SHA256 failed (OpenSSL)");
        buf_free(&env);
        return -1;
    }
    buf_free(&env);

    api_add_header(&c->headers, "Content-Type", "message/rfc822");
    api_add_header(&c->headers, "Accept", "application/json");
    api_add_header(&c->headers, "X-Mailferry-Queue-Id", c->msg->id);
    buf_appendf(&v, "<%s>", c->msg->from);
    api_add_header(&c->headers, "X-Mailferry-Envelope-From", v.data);
    for (size_t i = 0; i < c->nrcpts; i++) {
        buf_reset(&v);
        buf_appendf(&v, "<%s>", c->rcpts[i]);
        api_add_header(&c->headers, "X-Mailferry-Envelope-To", v.data);
    }
    buf_free(&v);
    api_add_header(&c->headers, "X-Mailferry-Timestamp", ts);
    buf_appendf(&v, "v1=%s", hex);
    api_add_header(&c->headers, "X-Mailferry-Signature", v.data);
    buf_free(&v);
    c->payload = c->msg->data;
    c->payload_len = c->msg->len;
    return 0;
}

static void wh_parse(const struct api_response *r, struct api_outcome *o)
{
    json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
    const char *id = NULL, *msg = NULL;

    if (json_is_object(j)) {
        id = json_string_value(json_object_get(j, "id"));
        msg = json_string_value(json_object_get(j, "error"));
        if (msg == NULL)
            msg = json_string_value(json_object_get(j, "message"));
    }
    if (id == NULL)
        id = api_response_header(r, "X-Message-Id");
    if (r->status >= 200 && r->status < 300)
        api_outcome_delivered(o, "webhook", id);
    else
        api_outcome_http(r, "webhook", msg != NULL ? msg : r->body, o);
    json_decref(j);
}

const struct api_provider api_provider_webhook = {
    .name = "webhook",
    .max_rcpts = 1000,
    .json = 0,
    .default_base_url = NULL,    /* base_url is the full URL, required */
    .build = wh_build,
    .parse = wh_parse,
};
