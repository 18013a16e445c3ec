/*
 * sasl: SMTP AUTH PLAIN and LOGIN payloads (RFC 4954, RFC 4616) over strict
 * base64 (RFC 4648).
 *
 * OpenSSL's EVP_DecodeBlock is lenient (it trims whitespace, and reports
 * the padding octets as decoded data), so the input is validated here first
 * and the padding is subtracted from its result. Buffers that held
 * credentials are wiped with OPENSSL_cleanse before they go out of scope.
 */
#include "lib/sasl.h"

#include <limits.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

/* The longest input handed to OpenSSL, whose length arguments are int. */
#define SASL_B64_MAX ((size_t)INT_MAX / 4 * 4 - 4)

/* Returns the 6-bit value of a character of the base64 alphabet (RFC 4648
 * section 4, table 1), or -1. '=' is not part of the alphabet. */
static int b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/*
 * The decoder rejects everything RFC 4648 lets a decoder reject: characters
 * outside the alphabet including whitespace and line breaks (section 3.3),
 * a length that is not a multiple of 4 (section 3.2, padding required),
 * '=' anywhere but in the last one or two positions, and non-zero pad bits
 * (section 3.5), so that each decoded value has exactly one encoding.
 */
long sasl_b64_decode(const char *in, size_t len, unsigned char *out, size_t outmax)
{
    const unsigned char *s = (const unsigned char *)in;
    size_t pad = 0, dlen, whole;
    unsigned char tail[3];
    int last;

    if (len == 0)
        return 0;
    if (len % 4 != 0 || len > SASL_B64_MAX)
        return -1;
    if (s[len - 1] == '=') {
        pad = 1;
        if (s[len - 2] == '=')
            pad = 2;
    }
    for (size_t i = 0; i < len - pad; i++) {
        if (b64_value(s[i]) < 0)
            return -1;
    }
    /* The last data character carries 2 (one '=') or 4 (two '=') bits that
     * are not part of the data and must be zero. */
    if (pad) {
        last = b64_value(s[len - pad - 1]);
        if ((pad == 1 && (last & 0x03) != 0) || (pad == 2 && (last & 0x0f) != 0))
            return -1;
    }

    dlen = len / 4 * 3 - pad;
    if (dlen > outmax)
        return -1;

    /* EVP_DecodeBlock writes 3 octets per quantum, padding included, so a
     * padded final quantum goes through a scratch buffer to keep the writes
     * within outmax. */
    whole = pad ? len - 4 : len;
    if (whole > 0 && EVP_DecodeBlock(out, s, (int)whole) != (int)(whole / 4 * 3))
        return -1;
    if (pad) {
        if (EVP_DecodeBlock(tail, s + whole, 4) != 3) {
            OPENSSL_cleanse(tail, sizeof(tail));
            return -1;
        }
        memcpy(out + whole / 4 * 3, tail, 3 - pad);
        OPENSSL_cleanse(tail, sizeof(tail));
    }
    return (long)dlen;
}

long sasl_b64_encode(const unsigned char *in, size_t len, char *out, size_t outmax)
{
    size_t elen;

    if (len > SASL_B64_MAX / 4 * 3)
        return -1;
    elen = (len + 2) / 3 * 4;
    if (out == NULL || outmax < elen + 1)
        return -1;
    if (len == 0) {
        out[0] = '\0';
        return 0;
    }
    /* EVP_EncodeBlock writes elen characters and a NUL, no line breaks. */
    return (long)EVP_EncodeBlock((unsigned char *)out, in, (int)len);
}

/* The longest PLAIN message: three maximal fields and two NULs. */
#define SASL_PLAIN_RAW_MAX (3 * SASL_FIELD_MAX + 2)

/*
 * RFC 4616 section 2: message = [authzid] UTF8NUL authcid UTF8NUL passwd,
 * each field 1 to 255 octets except the optional authzid, and none holding
 * a NUL. A third NUL therefore makes the message malformed, as does a
 * missing one. The fields are not checked for UTF-8; they are compared
 * byte for byte against the user table.
 */
int sasl_plain_decode(const char *b64, size_t len, struct sasl_plain *out)
{
    unsigned char raw[SASL_PLAIN_RAW_MAX];
    const unsigned char *nul1, *nul2;
    size_t zlen, clen, plen;
    long n;
    int rc = -1;

    memset(out, 0, sizeof(*out));
    n = sasl_b64_decode(b64, len, raw, sizeof(raw));
    if (n < 0)
        goto done;

    nul1 = memchr(raw, '\0', (size_t)n);
    if (nul1 == NULL)
        goto done;
    zlen = (size_t)(nul1 - raw);
    nul2 = memchr(nul1 + 1, '\0', (size_t)n - zlen - 1);
    if (nul2 == NULL)
        goto done;
    clen = (size_t)(nul2 - nul1 - 1);
    plen = (size_t)n - zlen - clen - 2;
    if (memchr(nul2 + 1, '\0', plen) != NULL)
        goto done;
    if (clen == 0 || plen == 0)
        goto done;
    if (zlen > SASL_FIELD_MAX || clen > SASL_FIELD_MAX || plen > SASL_FIELD_MAX)
        goto done;

    memcpy(out->authzid, raw, zlen);
    out->authzid[zlen] = '\0';
    memcpy(out->authcid, nul1 + 1, clen);
    out->authcid[clen] = '\0';
    memcpy(out->passwd, nul2 + 1, plen);
    out->passwd[plen] = '\0';
    rc = 0;
done:
    OPENSSL_cleanse(raw, sizeof(raw));
    return rc;
}

/*
 * A NULL field is taken as empty. Fields longer than SASL_FIELD_MAX cannot
 * be carried (RFC 4616 section 2) and give -1. Empty authcid or passwd are
 * encoded as given, which lets tests build the malformed messages a server
 * must reject.
 */
long sasl_plain_encode(const char *authzid, const char *authcid, const char *passwd,
                       char *out, size_t outmax)
{
    unsigned char raw[SASL_PLAIN_RAW_MAX];
    const char *field[3] = {authzid, authcid, passwd};
    size_t off = 0;
    long n;

    for (int i = 0; i < 3; i++) {
        const char *f = field[i] ? field[i] : "";
        size_t flen = strnlen(f, SASL_FIELD_MAX + 1);

        if (flen > SASL_FIELD_MAX) {
            OPENSSL_cleanse(raw, off);
            return -1;
        }
        if (i > 0)
            raw[off++] = '\0';
        memcpy(raw + off, f, flen);
        off += flen;
    }
    n = sasl_b64_encode(raw, off, out, outmax);
    OPENSSL_cleanse(raw, sizeof(raw));
    return n;
}

/*
 * The LOGIN mechanism (draft-murchison-sasl-login, never an RFC) sends the
 * user name and then the password as two client responses, each one base64
 * line as RFC 4954 section 4 describes. Each decodes to an opaque octet
 * string without NUL. Recognising "*" (cancel) is the caller's job.
 */
int sasl_login_decode(const char *b64, size_t len, char out[SASL_FIELD_MAX + 1])
{
    unsigned char raw[SASL_FIELD_MAX];
    long n;
    int rc = -1;

    out[0] = '\0';
    n = sasl_b64_decode(b64, len, raw, sizeof(raw));
    if (n >= 0 && memchr(raw, '\0', (size_t)n) == NULL) {
        memcpy(out, raw, (size_t)n);
        out[n] = '\0';
        rc = 0;
    }
    OPENSSL_cleanse(raw, sizeof(raw));
    return rc;
}
