#include "lib/sigv4.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "lib/xmalloc.h"

#define SIGV4_ALGORITHM "AWS4-HMAC-SHA256"

static const char sigv4_hexdigits[] = "0123456789abcdef";

static void sigv4_hex(const unsigned char *p, size_t n, char *out)
{
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = sigv4_hexdigits[p[i] >> 4];
        out[2 * i + 1] = sigv4_hexdigits[p[i] & 15];
    }
    out[2 * n] = '\0';
}

void sigv4_sha256_hex(const void *p, size_t n, char out[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;

    EVP_Digest(p != NULL ? p : "", n, md, &mdlen, EVP_sha256(), NULL);
    sigv4_hex(md, mdlen, out);
}

static void sigv4_hmac(const unsigned char *key, size_t keylen, const void *data, size_t len,
                       unsigned char out[32])
{
    unsigned int outlen = 32;

    HMAC(EVP_sha256(), key, (int)keylen, data, len, out, &outlen);
}

void sigv4_amz_date(int64_t t, char out[SIGV4_DATE_LEN + 1])
{
    time_t tt = (time_t)t;
    struct tm tm;

    gmtime_r(&tt, &tm);
    strftime(out, SIGV4_DATE_LEN + 1, "%Y%m%dT%H%M%SZ", &tm);
}

/* RFC 3986 section 2.3: ALPHA / DIGIT / "-" / "." / "_" / "~". */
static int sigv4_unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           c == '-' || c == '.' || c == '_' || c == '~';
}

void sigv4_uri_encode(struct buf *b, const char *s, size_t len, int keep_slash)
{
    static const char up[] = "0123456789ABCDEF";

    buf_reserve(b, len * 3);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];

        if (sigv4_unreserved(c) || (keep_slash && c == '/')) {
            b->data[b->len++] = (char)c;
        } else {
            b->data[b->len++] = '%';
            b->data[b->len++] = up[c >> 4];
            b->data[b->len++] = up[c & 15];
        }
    }
    b->data[b->len] = '\0';
}

/*
 * The canonical URI: the path with empty, "." and ".." segments resolved
 * (RFC 3986 section 5.2.4; AWS also folds repeated slashes), a trailing
 * slash kept, then each segment percent-encoded. "/example/.." is "/",
 * "//example//" is "/example/".
 */
static void sigv4_canonical_uri(struct buf *out, const char *path)
{
    const char **seg;
    size_t *seglen, nseg = 0, cap = 8, plen;
    const char *p = path != NULL ? path : "";
    int trailing;

    plen = strlen(p);
    seg = xcalloc(cap, sizeof(*seg));
    seglen = xcalloc(cap, sizeof(*seglen));
    trailing = plen > 0 && p[plen - 1] == '/';
    while (*p != '\0') {
        const char *start;
        size_t n;

        while (*p == '/')
            p++;
        start = p;
        while (*p != '\0' && *p != '/')
            p++;
        n = (size_t)(p - start);
        if (n == 0)
            continue;
        trailing = *p == '/';
        if (n == 1 && start[0] == '.') {
            trailing = 1;
            continue;
        }
        if (n == 2 && start[0] == '.' && start[1] == '.') {
            if (nseg > 0)
                nseg--;
            trailing = 1;
            continue;
        }
        if (nseg == cap) {
            cap *= 2;
            seg = xrealloc(seg, cap * sizeof(*seg));
            seglen = xrealloc(seglen, cap * sizeof(*seglen));
        }
        seg[nseg] = start;
        seglen[nseg] = n;
        nseg++;
    }
    buf_appends(out, "/");
    for (size_t i = 0; i < nseg; i++) {
        sigv4_uri_encode(out, seg[i], seglen[i], 0);
        if (i + 1 < nseg || trailing)
            buf_appends(out, "/");
    }
    free(seg);
    free(seglen);
}

struct sigv4_kv {
    char *name;
    char *value;
};

static int sigv4_kv_cmp(const void *a, const void *b)
{
    const struct sigv4_kv *x = a, *y = b;
    int c = strcmp(x->name, y->name);

    return c != 0 ? c : strcmp(x->value, y->value);
}

/* Query parameters encoded, then sorted by name and value (byte order). */
static void sigv4_canonical_query(struct buf *out, const struct sigv4_param *q, size_t n)
{
    struct sigv4_kv *kv;

    if (n == 0)
        return;
    kv = xcalloc(n, sizeof(*kv));
    for (size_t i = 0; i < n; i++) {
        struct buf a = BUF_INIT, b = BUF_INIT;

        buf_appends(&a, "");
        buf_appends(&b, "");
        sigv4_uri_encode(&a, q[i].name, strlen(q[i].name), 0);
        sigv4_uri_encode(&b, q[i].value != NULL ? q[i].value : "",
                         q[i].value != NULL ? strlen(q[i].value) : 0, 0);
        kv[i].name = buf_steal(&a, NULL);
        kv[i].value = buf_steal(&b, NULL);
    }
    qsort(kv, n, sizeof(*kv), sigv4_kv_cmp);
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            buf_appends(out, "&");
        buf_appendf(out, "%s=%s", kv[i].name, kv[i].value);
        free(kv[i].name);
        free(kv[i].value);
    }
    free(kv);
}

/* Appends a header value with leading and trailing blanks removed and
 * every run of blanks inside folded to one space (AWS "Trimall"). Line
 * breaks inside a value are refused by the caller. */
static void sigv4_trimall(struct buf *out, const char *v)
{
    int pending = 0, any = 0;

    for (; *v != '\0'; v++) {
        if (*v == ' ' || *v == '\t') {
            pending = any;
            continue;
        }
        if (pending)
            buf_append(out, " ", 1);
        pending = 0;
        any = 1;
        buf_append(out, v, 1);
    }
}

struct sigv4_hdr {
    char *lname;               /* lower-case name */
    size_t order;              /* position in the request, for stable joins */
    const char *value;
};

static int sigv4_hdr_cmp(const void *a, const void *b)
{
    const struct sigv4_hdr *x = a, *y = b;
    int c = strcmp(x->lname, y->lname);

    if (c != 0)
        return c;
    return x->order < y->order ? -1 : x->order > y->order;
}

int sigv4_sign(const struct sigv4_key *k, const struct sigv4_request *r, struct buf *auth,
               struct sigv4_trace *trace, char *err, size_t errlen)
{
    struct buf creq = BUF_INIT, sts = BUF_INIT, signed_names = BUF_INIT;
    struct sigv4_hdr *h;
    const char *amz_date = NULL;
    char hash[65], date8[9], sig[65];
    unsigned char kdate[32], kregion[32], kservice[32], ksigning[32], mac[32];
    size_t keylen;
    char *secret;
    int have_host = 0;

    if (k->access_key_id == NULL || k->access_key_id[0] == '\0' || k->secret_key == NULL ||
        k->secret_key[0] == '\0' || k->region == NULL || k->region[0] == '\0' ||
        k->service == NULL || k->service[0] == '\0') {
        snprintf(err, errlen, "access key id, secret key, region and service must all be set");
        return -1;
    }
    if (r->method == NULL || r->method[0] == '\0') {
        snprintf(err, errlen, "no method");
        return -1;
    }
    h = xcalloc(r->nheaders ? r->nheaders : 1, sizeof(*h));
    for (size_t i = 0; i < r->nheaders; i++) {
        const char *n = r->headers[i].name, *v = r->headers[i].value;
        size_t len = strlen(n);

        if (len == 0 || v == NULL || strpbrk(v, "\r\n") != NULL) {
            snprintf(err, errlen, "header %zu: empty name, or a line break in its value", i);
            for (size_t j = 0; j < i; j++)
                free(h[j].lname);
            free(h);
            return -1;
        }
        h[i].lname = xstrdup(n);
        for (size_t j = 0; j < len; j++)
            if (h[i].lname[j] >= 'A' && h[i].lname[j] <= 'Z')
                h[i].lname[j] = (char)(h[i].lname[j] - 'A' + 'a');
        h[i].order = i;
        h[i].value = v;
        if (strcmp(h[i].lname, "host") == 0)
            have_host = 1;
        else if (strcmp(h[i].lname, "x-amz-date") == 0)
            amz_date = v;
    }
    if (!have_host || amz_date == NULL || strlen(amz_date) != SIGV4_DATE_LEN ||
        amz_date[8] != 'T' || amz_date[15] != 'Z') {
        snprintf(err, errlen, "the signed headers need host and x-amz-date (YYYYMMDDTHHMMSSZ)");
        for (size_t i = 0; i < r->nheaders; i++)
            free(h[i].lname);
        free(h);
        return -1;
    }
    qsort(h, r->nheaders, sizeof(*h), sigv4_hdr_cmp);

    /* 1. The canonical request. */
    buf_appendf(&creq, "%s\n", r->method);
    sigv4_canonical_uri(&creq, r->path);
    buf_appends(&creq, "\n");
    sigv4_canonical_query(&creq, r->query, r->nquery);
    buf_appends(&creq, "\n");
    for (size_t i = 0; i < r->nheaders; i++) {
        if (i > 0 && strcmp(h[i].lname, h[i - 1].lname) == 0) {
            buf_appends(&creq, ",");
        } else {
            if (i > 0) {
                buf_appends(&creq, "\n");
                buf_appends(&signed_names, ";");
            }
            buf_appendf(&creq, "%s:", h[i].lname);
            buf_appends(&signed_names, h[i].lname);
        }
        sigv4_trimall(&creq, h[i].value);
    }
    buf_appends(&creq, "\n\n");
    buf_append(&creq, signed_names.data, signed_names.len);
    sigv4_sha256_hex(r->payload, r->payload_len, hash);
    buf_appendf(&creq, "\n%s", hash);

    /* 2. The string to sign. */
    memcpy(date8, amz_date, 8);
    date8[8] = '\0';
    sigv4_sha256_hex(creq.data, creq.len, hash);
    buf_appendf(&sts, SIGV4_ALGORITHM "\n%s\n%s/%s/%s/aws4_request\n%s", amz_date, date8,
                k->region, k->service, hash);

    /* 3. The signing key, and 4. the signature. */
    keylen = strlen(k->secret_key) + 4;
    secret = xmalloc(keylen + 1);
    memcpy(secret, "AWS4", 4);
    memcpy(secret + 4, k->secret_key, keylen - 4 + 1);
    sigv4_hmac((const unsigned char *)secret, keylen, date8, 8, kdate);
    OPENSSL_cleanse(secret, keylen);
    free(secret);
    sigv4_hmac(kdate, 32, k->region, strlen(k->region), kregion);
    sigv4_hmac(kregion, 32, k->service, strlen(k->service), kservice);
    sigv4_hmac(kservice, 32, "aws4_request", 12, ksigning);
    sigv4_hmac(ksigning, 32, sts.data, sts.len, mac);
    sigv4_hex(mac, 32, sig);
    OPENSSL_cleanse(kdate, sizeof(kdate));
    OPENSSL_cleanse(kregion, sizeof(kregion));
    OPENSSL_cleanse(kservice, sizeof(kservice));
    OPENSSL_cleanse(ksigning, sizeof(ksigning));

    buf_appendf(auth, SIGV4_ALGORITHM " Credential=%s/%s/%s/%s/aws4_request, SignedHeaders=%s, "
                "Signature=%s", k->access_key_id, date8, k->region, k->service,
                signed_names.data, sig);
    if (trace != NULL) {
        buf_append(&trace->canonical_request, creq.data, creq.len);
        buf_append(&trace->string_to_sign, sts.data, sts.len);
    }
    for (size_t i = 0; i < r->nheaders; i++)
        free(h[i].lname);
    free(h);
    buf_free(&creq);
    buf_free(&sts);
    buf_free(&signed_names);
    return 0;
}
