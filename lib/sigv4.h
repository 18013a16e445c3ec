/*
 * sigv4: AWS Signature Version 4 for an HTTP request, with the signature
 * in the Authorization header (AWS General Reference, "Signature Version 4
 * signing process"; IAM User Guide, "Create a signed AWS API request").
 * HMAC-SHA256 and SHA-256 come from OpenSSL.
 *
 * Pure: no I/O and no clock. The time of the signature is the value of the
 * request's x-amz-date header (YYYYMMDD'T'HHMMSS'Z', UTC), which the caller
 * sets (sigv4_amz_date() formats one) and sends unchanged.
 *
 * The four steps, each checked by the unit tests against AWS's published
 * test suite (aws-sig-v4-test-suite, credentials AKIDEXAMPLE):
 *   1. canonical request: method, canonical URI, canonical query string,
 *      canonical headers, signed header names, hex SHA-256 of the payload;
 *   2. string to sign: "AWS4-HMAC-SHA256", the date, the credential scope
 *      <yyyymmdd>/<region>/<service>/aws4_request, hex SHA-256 of step 1;
 *   3. signing key: HMAC chain "AWS4"+secret -> date -> region -> service
 *      -> "aws4_request";
 *   4. signature: hex HMAC of step 2 with the key of step 3.
 */
#ifndef MF_SIGV4_H
#define MF_SIGV4_H

#include <stddef.h>
#include <stdint.h>

#include "lib/buf.h"

#define SIGV4_DATE_LEN 16                 /* "20150830T123600Z" */

struct sigv4_header {
    const char *name;
    const char *value;
};

/* One query parameter, not percent-encoded (the signer encodes it). */
struct sigv4_param {
    const char *name;
    const char *value;
};

struct sigv4_request {
    const char *method;                   /* "POST" */
    /* The path as it goes on the request line (already percent-encoded
     * where it needs to be). The signer removes "." and ".." segments and
     * empty segments and percent-encodes the result once more, which is
     * the double encoding AWS prescribes for every service but S3. */
    const char *path;
    const struct sigv4_param *query;
    size_t nquery;
    /* Every header to sign, each exactly as sent; "host" and "x-amz-date"
     * must be among them. Names are compared case-insensitively; several
     * headers of one name are joined with "," in the order given. */
    const struct sigv4_header *headers;
    size_t nheaders;
    const void *payload;                  /* the body, may be NULL when empty */
    size_t payload_len;
};

struct sigv4_key {
    const char *access_key_id;
    const char *secret_key;
    const char *region;                   /* "eu-west-1" */
    const char *service;                  /* "ses" */
};

/* The intermediate texts, for tests and for diagnosing a signature the
 * server refuses. Both bufs are appended to. */
struct sigv4_trace {
    struct buf canonical_request;
    struct buf string_to_sign;
};

/*
 * Computes the Authorization header value for r and appends it to auth:
 * "AWS4-HMAC-SHA256 Credential=<id>/<scope>, SignedHeaders=<names>,
 * Signature=<hex>". trace may be NULL. Returns 0, or -1 with a reason in
 * err (missing host or x-amz-date header, malformed date, empty key
 * fields, a header value with a line break). Secrets never appear in err.
 */
int sigv4_sign(const struct sigv4_key *k, const struct sigv4_request *r, struct buf *auth,
               struct sigv4_trace *trace, char *err, size_t errlen);

/* Formats unix time t as an x-amz-date value (UTC). */
void sigv4_amz_date(int64_t t, char out[SIGV4_DATE_LEN + 1]);

/* Lower-case hex SHA-256 of n bytes at p. */
void sigv4_sha256_hex(const void *p, size_t n, char out[65]);

/* Appends s (len bytes) to b percent-encoded as SigV4 wants (RFC 3986
 * unreserved characters kept, every other octet %XX in upper case); '/'
 * is kept when keep_slash. */
void sigv4_uri_encode(struct buf *b, const char *s, size_t len, int keep_slash);

#endif
