/*
 * tls: OpenSSL contexts for mailferry's servers and clients.
 *
 * A tls_ctx wraps an SSL_CTX with a reference count, so that a reload
 * (SIGHUP) can install a new certificate while connections that started
 * with the old one keep it until they close. The per-connection TLS layer
 * itself lives in conn.c, which drives OpenSSL through memory BIOs.
 */
#ifndef MF_TLS_H
#define MF_TLS_H

#include <stddef.h>
#include <openssl/ssl.h>

struct tls_ctx;

/*
 * A server context: TLS 1.2 minimum, certificate chain and key from PEM
 * files (the key must match the certificate). With client_ca non-NULL the
 * server asks for a client certificate, verifies it against that CA file
 * and, when require_client is set, refuses handshakes without one.
 * Returns NULL with a message in err (naming the file and OpenSSL's reason).
 */
struct tls_ctx *tls_ctx_server(const char *cert_file, const char *key_file,
                               const char *client_ca, int require_client,
                               char *err, size_t errlen);

/*
 * A client context: TLS 1.2 minimum. ca_file NULL uses the system's trust
 * store; verify 0 turns verification off (opportunistic STARTTLS to a
 * smarthost that does not require it). cert_file/key_file, when non-NULL,
 * are the client certificate. Returns NULL with a message in err.
 */
struct tls_ctx *tls_ctx_client(const char *ca_file, int verify,
                               const char *cert_file, const char *key_file,
                               char *err, size_t errlen);

struct tls_ctx *tls_ctx_ref(struct tls_ctx *t);
void tls_ctx_unref(struct tls_ctx *t);
SSL_CTX *tls_ctx_ssl(struct tls_ctx *t);

#endif
