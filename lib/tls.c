/*
 * tls: reference-counted OpenSSL contexts.
 *
 * Both kinds of context refuse anything older than TLS 1.2 and never
 * renegotiate (renegotiation is a known denial-of-service lever and has no
 * use in SMTP). SSL_MODE_RELEASE_BUFFERS lets an idle connection give its
 * record buffers back, which is what keeps thousands of idle TLS sessions
 * cheap. The per-connection TLS layer lives in conn.c.
 */
#include "lib/tls.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include <openssl/err.h>
#include <openssl/x509.h>

#include "lib/xmalloc.h"

struct tls_ctx {
    SSL_CTX *ssl;
    atomic_int refs;
};

/* The session id context a server must have once it verifies client
 * certificates, or resumed sessions fail (SSL_CTX_set_session_id_context). */
static const unsigned char tls_sid_ctx[] = "mailferry";

/*
 * Formats "<what> <file>: <OpenSSL reason>" into err, taking the oldest
 * error on the thread's OpenSSL error queue (the root cause, e.g. "No such
 * file or directory" before "BIO routines") and clearing the queue.
 */
static void tls_errmsg(char *err, size_t errlen, const char *what, const char *file)
{
    char reason[256];
    unsigned long e = ERR_get_error();

    if (e != 0)
        ERR_error_string_n(e, reason, sizeof(reason));
    else
        snprintf(reason, sizeof(reason), "unknown OpenSSL error");
    ERR_clear_error();
    if (err != NULL && errlen > 0) {
        if (file != NULL)
            snprintf(err, errlen, "%s %s: %s", what, file, reason);
        else
            snprintf(err, errlen, "%s: %s", what, reason);
    }
}

static struct tls_ctx *tls_wrap(SSL_CTX *ssl)
{
    struct tls_ctx *t = xmalloc(sizeof(*t));

    t->ssl = ssl;
    atomic_init(&t->refs, 1);
    return t;
}

/* Settings shared by server and client contexts. Returns 0 or -1. */
static int tls_common(SSL_CTX *ssl, char *err, size_t errlen)
{
    if (SSL_CTX_set_min_proto_version(ssl, TLS1_2_VERSION) != 1) {
        tls_errmsg(err, errlen, "cannot set minimum TLS version", NULL);
        return -1;
    }
    SSL_CTX_set_options(ssl, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ssl, SSL_MODE_RELEASE_BUFFERS);
    return 0;
}

/* Loads a certificate chain and its key, and checks that they match. */
static int tls_load_pair(SSL_CTX *ssl, const char *cert_file, const char *key_file,
                         char *err, size_t errlen)
{
    if (SSL_CTX_use_certificate_chain_file(ssl, cert_file) != 1) {
        tls_errmsg(err, errlen, "cannot load certificate chain", cert_file);
        return -1;
    }
    if (SSL_CTX_use_PrivateKey_file(ssl, key_file, SSL_FILETYPE_PEM) != 1) {
        tls_errmsg(err, errlen, "cannot load private key", key_file);
        return -1;
    }
    if (SSL_CTX_check_private_key(ssl) != 1) {
        tls_errmsg(err, errlen, "private key does not match certificate", key_file);
        return -1;
    }
    return 0;
}

struct tls_ctx *tls_ctx_server(const char *cert_file, const char *key_file,
                               const char *client_ca, int require_client,
                               char *err, size_t errlen)
{
    SSL_CTX *ssl;

    ERR_clear_error();
    ssl = SSL_CTX_new(TLS_server_method());
    if (ssl == NULL) {
        tls_errmsg(err, errlen, "cannot create server TLS context", NULL);
        return NULL;
    }
    if (tls_common(ssl, err, errlen) < 0)
        goto fail;
    SSL_CTX_set_options(ssl, SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_set_session_id_context(ssl, tls_sid_ctx, sizeof(tls_sid_ctx) - 1) != 1) {
        tls_errmsg(err, errlen, "cannot set session id context", NULL);
        goto fail;
    }
    if (tls_load_pair(ssl, cert_file, key_file, err, errlen) < 0)
        goto fail;
    if (client_ca != NULL) {
        STACK_OF(X509_NAME) *names;
        int mode = SSL_VERIFY_PEER;

        if (SSL_CTX_load_verify_locations(ssl, client_ca, NULL) != 1) {
            tls_errmsg(err, errlen, "cannot load client CA file", client_ca);
            goto fail;
        }
        /* The CertificateRequest lists the acceptable issuers, so that a
         * client holding several certificates picks the right one
         * (RFC 8446 section 4.2.4, RFC 5246 section 7.4.4). */
        names = SSL_load_client_CA_file(client_ca);
        if (names == NULL) {
            tls_errmsg(err, errlen, "cannot read CA names from", client_ca);
            goto fail;
        }
        SSL_CTX_set_client_CA_list(ssl, names);
        if (require_client)
            mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
        SSL_CTX_set_verify(ssl, mode, NULL);
    }
    return tls_wrap(ssl);

fail:
    SSL_CTX_free(ssl);
    return NULL;
}

struct tls_ctx *tls_ctx_client(const char *ca_file, int verify,
                               const char *cert_file, const char *key_file,
                               char *err, size_t errlen)
{
    SSL_CTX *ssl;

    ERR_clear_error();
    ssl = SSL_CTX_new(TLS_client_method());
    if (ssl == NULL) {
        tls_errmsg(err, errlen, "cannot create client TLS context", NULL);
        return NULL;
    }
    if (tls_common(ssl, err, errlen) < 0)
        goto fail;
    if (ca_file != NULL) {
        if (SSL_CTX_load_verify_locations(ssl, ca_file, NULL) != 1) {
            tls_errmsg(err, errlen, "cannot load CA file", ca_file);
            goto fail;
        }
    } else if (verify && SSL_CTX_set_default_verify_paths(ssl) != 1) {
        tls_errmsg(err, errlen, "cannot load the system trust store", NULL);
        goto fail;
    }
    SSL_CTX_set_verify(ssl, verify ? SSL_VERIFY_PEER : SSL_VERIFY_NONE, NULL);
    if (cert_file != NULL || key_file != NULL) {
        /* A key without a certificate is a configuration mistake; a
         * certificate without a key file means both are in one PEM file. */
        if (cert_file == NULL) {
            if (err != NULL && errlen > 0)
                snprintf(err, errlen, "client key %s given without a certificate", key_file);
            goto fail;
        }
        if (tls_load_pair(ssl, cert_file, key_file != NULL ? key_file : cert_file,
                          err, errlen) < 0)
            goto fail;
    }
    return tls_wrap(ssl);

fail:
    SSL_CTX_free(ssl);
    return NULL;
}

struct tls_ctx *tls_ctx_ref(struct tls_ctx *t)
{
    if (t != NULL)
        atomic_fetch_add(&t->refs, 1);
    return t;
}

/*
 * Drops one reference. SSL objects created from the context hold their own
 * reference on the SSL_CTX, so connections that are still open keep using
 * it after the last tls_ctx reference is gone.
 */
void tls_ctx_unref(struct tls_ctx *t)
{
    if (t == NULL)
        return;
    if (atomic_fetch_sub(&t->refs, 1) == 1) {
        SSL_CTX_free(t->ssl);
        free(t);
    }
}

SSL_CTX *tls_ctx_ssl(struct tls_ctx *t)
{
    return t->ssl;
}
