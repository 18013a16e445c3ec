/*
 * sasl: decoding and encoding of SMTP AUTH exchanges (RFC 4954) for the
 * PLAIN (RFC 4616) and LOGIN mechanisms, on top of base64 (RFC 4648).
 * Pure functions; base64 work is done by OpenSSL's EVP encoder.
 */
#ifndef MF_SASL_H
#define MF_SASL_H

#include <stddef.h>

#define SASL_FIELD_MAX 255   /* RFC 4616 section 2: up to 255 octets each */

/*
 * Strict base64 decoding: the alphabet of RFC 4648 section 4, length a
 * multiple of 4, '=' only as final padding, no whitespace. Writes at most
 * outmax bytes. Returns the decoded length, or -1 on malformed input or
 * when the result does not fit.
 */
long sasl_b64_decode(const char *in, size_t len, unsigned char *out, size_t outmax);

/* Encodes in[0..len) as base64 into out (size outmax, NUL-terminated).
 * Returns the encoded length, or -1 when out is too small. */
long sasl_b64_encode(const unsigned char *in, size_t len, char *out, size_t outmax);

struct sasl_plain {
    char authzid[SASL_FIELD_MAX + 1];
    char authcid[SASL_FIELD_MAX + 1];
    char passwd[SASL_FIELD_MAX + 1];
};

/*
 * Decodes a PLAIN initial response: base64 of authzid NUL authcid NUL
 * passwd. authcid and passwd must be non-empty, no field may hold a NUL or
 * exceed SASL_FIELD_MAX. Returns 0, or -1 on any malformation.
 */
int sasl_plain_decode(const char *b64, size_t len, struct sasl_plain *out);

/* Builds a PLAIN initial response (base64) for a client. Returns the
 * length written into out (NUL-terminated), or -1 when it does not fit. */
long sasl_plain_encode(const char *authzid, const char *authcid, const char *passwd,
                       char *out, size_t outmax);

/* Decodes one LOGIN step (a base64 user name or password) into out
 * (NUL-terminated, at most SASL_FIELD_MAX octets, no NUL inside). Returns 0
 * or -1. */
int sasl_login_decode(const char *b64, size_t len, char out[SASL_FIELD_MAX + 1]);

#endif
