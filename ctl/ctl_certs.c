/*
 * ctl_certs: "mailferryctl tunnel-certs". See ctl_certs.h.
 *
 * Everything is made in memory first (keys, certificates, their PEM
 * text) and only then written, each file through a temporary file and
 * rename(2), so a failure leaves no half-made set behind. The extensions
 * follow RFC 5280 section 4.2: the CA has basicConstraints CA:TRUE with
 * pathlen 0 and keyUsage keyCertSign/cRLSign, both critical; leaves have
 * CA:FALSE, a critical keyUsage, the extendedKeyUsage of their role
 * (serverAuth for the relay, clientAuth for routers), and subject and
 * authority key identifiers.
 */
#include "ctl/ctl_certs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "ctl/ctl.h"
#include "lib/buf.h"
#include "lib/xmalloc.h"

#define CERTS_NAMES_MAX 16          /* --relay-name */
#define CERTS_ROUTERS_MAX 100       /* --routers, --add-router */
#define CERTS_DAYS_DEFAULT 825      /* leaves: what public CAs allowed until 2020 */
#define CERTS_CA_DAYS_DEFAULT 3650
#define CERTS_DAYS_MAX 36500
#define CERTS_SKEW_S 300            /* notBefore this far back, for clock skew */
#define CERTS_RELAY_PORT 4650       /* the port the snippets suggest */

const char ctl_certs_usage[] =
    "  tunnel-certs DIR [--relay-name NAME ...] [--routers N] [--days D] [--ca-days D]\n"
    "               [--key-type ec|rsa] [--force]\n"
    "                         make the tunnel's private CA, the relay's server\n"
    "                         certificate (for every NAME: DNS name or IP address) and\n"
    "                         N router client certificates in DIR, keys with mode 0600,\n"
    "                         and print the [relay] and [route relay] settings\n"
    "  tunnel-certs DIR --add-router NAME [--add-router NAME ...] [--days D]\n"
    "                         more router certificates from the CA in DIR\n";

enum cert_kind { CERT_CA, CERT_SERVER, CERT_CLIENT };

struct certs_opts {
    const char *dir;
    const char *names[CERTS_NAMES_MAX];
    size_t nnames;
    const char *add[CERTS_ROUTERS_MAX];
    size_t nadd;
    long long routers, days, ca_days;
    int rsa, force;
};

/* One file to write: its name in DIR, its bytes, its mode. */
struct certs_file {
    char name[128];
    struct buf data;
    mode_t mode;
};

struct certs_out {
    struct certs_file files[2 * CERTS_ROUTERS_MAX + 4];
    size_t n;
};

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    ctl_error("tunnel-certs: %s", msg);
    fprintf(stderr, "usage:\n%s", ctl_certs_usage);
    return CTL_EXIT_USAGE;
}

/* Prints what failed with OpenSSL's first queued reason. */
static void ssl_error(const char *what)
{
    unsigned long e = ERR_get_error();
    char reason[256] = "unknown error";

    if (e != 0)
        ERR_error_string_n(e, reason, sizeof(reason));
    ERR_clear_error();
    ctl_error("tunnel-certs: %s: %s", what, reason);
}

/* ---- names -------------------------------------------------------------------- */

/* A DNS name as a certificate's subjectAltName takes it: labels of
 * letters, digits and hyphens, a leading "*." allowed (RFC 6125 section
 * 6.4.3), no comma (the extension text is a comma list). */
static int dns_name_ok(const char *s)
{
    size_t n = strlen(s), label = 0;

    if (strncmp(s, "*.", 2) == 0)
        s += 2, n -= 2;
    if (n == 0 || n > 253 || s[0] == '.' || s[n - 1] == '.' || s[n - 1] == '-')
        return 0;
    for (const char *p = s; *p; p++) {
        if (*p == '.') {
            if (label == 0 || p[-1] == '-')
                return 0;
            label = 0;
            continue;
        }
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              (*p == '-' && label > 0)))
            return 0;
        if (++label > 63)
            return 0;
    }
    return 1;
}

static int ip_literal(const char *s)
{
    unsigned char a[16];

    return inet_pton(AF_INET, s, a) == 1 || inet_pton(AF_INET6, s, a) == 1;
}

/* A router name: it becomes a file name and the certificate's CN. */
static int router_name_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > 64 || s[0] == '.' || s[0] == '-')
        return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '_' || *p == '.'))
            return 0;
    return strcmp(s, "tunnel-ca") != 0 && strcmp(s, "relay") != 0;
}

/* ---- keys and certificates ---------------------------------------------------- */

static EVP_PKEY *make_key(int rsa)
{
    EVP_PKEY *k = rsa ? EVP_RSA_gen(2048) : EVP_EC_gen("P-256");

    if (k == NULL)
        ssl_error("key generation");
    return k;
}

/* Adds one extension given in OpenSSL's configuration syntax. */
static int add_ext(X509 *cert, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX ctx;
    X509_EXTENSION *ext;
    int ok;

    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
    ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
    if (ext == NULL) {
        char what[300];

        snprintf(what, sizeof(what), "extension %s = %s", OBJ_nid2sn(nid), value);
        ssl_error(what);
        return -1;
    }
    ok = X509_add_ext(cert, ext, -1);
    X509_EXTENSION_free(ext);
    return ok == 1 ? 0 : -1;
}

/* A random positive serial number of 127 bits (RFC 5280 section 4.1.2.2:
 * at most 20 octets, unpredictable as CA/Browser Forum asks). */
static int set_serial(X509 *x)
{
    unsigned char raw[16];
    BIGNUM *bn;
    int ok = -1;

    if (RAND_bytes(raw, sizeof(raw)) != 1)
        return -1;
    raw[0] &= 0x7f;
    raw[0] |= 0x01;
    bn = BN_bin2bn(raw, sizeof(raw), NULL);
    if (bn != NULL && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) != NULL)
        ok = 0;
    BN_free(bn);
    return ok;
}

/*
 * Makes a certificate for key, signed by issuer_key (the certificate's own
 * key and issuer NULL for the self-signed CA). san is the subjectAltName
 * text ("DNS:a,IP:b") for the server, NULL otherwise.
 */
static X509 *make_cert(enum cert_kind kind, EVP_PKEY *key, const char *cn, const char *san,
                       long long days, X509 *issuer, EVP_PKEY *issuer_key, int rsa)
{
    X509 *x = X509_new();
    X509_NAME *name;
    int bad = 0;

    if (x == NULL)
        return NULL;
    name = X509_get_subject_name(x);
    bad |= X509_set_version(x, 2) != 1;   /* v3 */
    bad |= set_serial(x) != 0;
    bad |= X509_gmtime_adj(X509_getm_notBefore(x), -CERTS_SKEW_S) == NULL;
    bad |= X509_gmtime_adj(X509_getm_notAfter(x), (long)(days * 86400)) == NULL;
    bad |= X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1,
                                      -1, 0) != 1;
    bad |= X509_set_issuer_name(x, issuer != NULL ? X509_get_subject_name(issuer) : name) != 1;
    bad |= X509_set_pubkey(x, key) != 1;
    if (bad) {
        ssl_error("certificate fields");
        X509_free(x);
        return NULL;
    }
    if (issuer == NULL)
        issuer = x;
    switch (kind) {
    case CERT_CA:
        bad |= add_ext(x, issuer, NID_basic_constraints, "critical,CA:TRUE,pathlen:0");
        bad |= add_ext(x, issuer, NID_key_usage, "critical,keyCertSign,cRLSign");
        break;
    case CERT_SERVER:
        bad |= add_ext(x, issuer, NID_basic_constraints, "critical,CA:FALSE");
        /* RSA key exchange (TLS 1.2) needs keyEncipherment; ECDHE does not. */
        bad |= add_ext(x, issuer, NID_key_usage,
                       rsa ? "critical,digitalSignature,keyEncipherment"
                           : "critical,digitalSignature");
        bad |= add_ext(x, issuer, NID_ext_key_usage, "serverAuth");
        bad |= add_ext(x, issuer, NID_subject_alt_name, san);
        break;
    case CERT_CLIENT:
        bad |= add_ext(x, issuer, NID_basic_constraints, "critical,CA:FALSE");
        bad |= add_ext(x, issuer, NID_key_usage, "critical,digitalSignature");
        bad |= add_ext(x, issuer, NID_ext_key_usage, "clientAuth");
        break;
    }
    bad |= add_ext(x, issuer, NID_subject_key_identifier, "hash");
    bad |= add_ext(x, issuer, NID_authority_key_identifier, "keyid:always");
    if (bad) {
        X509_free(x);
        return NULL;
    }
    if (X509_sign(x, issuer_key != NULL ? issuer_key : key, EVP_sha256()) <= 0) {
        ssl_error("signing");
        X509_free(x);
        return NULL;
    }
    return x;
}

/* "sha256:AB:CD:..." of the DER encoding, as openssl x509 -fingerprint
 * prints it and [relay] pinned_clients takes it. */
static void fingerprint(X509 *x, char *out, size_t n)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    size_t o;

    snprintf(out, n, "sha256:");
    if (X509_digest(x, EVP_sha256(), md, &len) != 1)
        return;
    o = strlen(out);
    for (unsigned int i = 0; i < len && o + 4 <= n; i++)
        o += (size_t)snprintf(out + o, n - o, "%s%02X", i ? ":" : "", md[i]);
}

/* ---- output -------------------------------------------------------------------- */

static struct certs_file *out_add(struct certs_out *o, const char *name, mode_t mode)
{
    struct certs_file *f = &o->files[o->n++];

    snprintf(f->name, sizeof(f->name), "%s", name);
    buf_init(&f->data);
    f->mode = mode;
    return f;
}

static void out_free(struct certs_out *o)
{
    for (size_t i = 0; i < o->n; i++) {
        /* Private keys do not linger in freed memory. */
        if (o->files[i].mode == 0600 && o->files[i].data.len > 0)
            OPENSSL_cleanse(o->files[i].data.data, o->files[i].data.len);
        buf_free(&o->files[i].data);
    }
    o->n = 0;
}

/* Appends the PEM text that fn writes into a memory BIO. */
static int pem_into(struct buf *b, int (*fn)(BIO *bio, void *obj), void *obj)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *p;
    long n;
    int ok = -1;

    if (bio == NULL)
        return -1;
    if (fn(bio, obj) == 1) {
        n = BIO_get_mem_data(bio, &p);
        if (n > 0) {
            buf_append(b, p, (size_t)n);
            ok = 0;
        }
    }
    if (ok == 0 && n > 0)
        OPENSSL_cleanse(p, (size_t)n);
    BIO_free(bio);
    return ok;
}

static int pem_key(BIO *bio, void *k)
{
    /* PKCS#8, unencrypted: the daemons read it without a passphrase. */
    return PEM_write_bio_PrivateKey(bio, k, NULL, NULL, 0, NULL, NULL);
}

static int pem_cert(BIO *bio, void *x)
{
    return PEM_write_bio_X509(bio, x);
}

/* Adds NAME.key and NAME.crt. */
static int out_pair(struct certs_out *o, const char *name, EVP_PKEY *key, X509 *cert)
{
    char fn[128];

    snprintf(fn, sizeof(fn), "%s.key", name);
    if (key != NULL && pem_into(&out_add(o, fn, 0600)->data, pem_key, key) != 0) {
        ssl_error("writing a key");
        return -1;
    }
    snprintf(fn, sizeof(fn), "%s.crt", name);
    if (pem_into(&out_add(o, fn, 0644)->data, pem_cert, cert) != 0) {
        ssl_error("writing a certificate");
        return -1;
    }
    return 0;
}

static int path_of(char *out, size_t n, const char *dir, const char *name)
{
    return (size_t)snprintf(out, n, "%s/%s", dir, name) < n ? 0 : -1;
}

/* Writes one file through a temporary one and rename(2), with its mode
 * set exactly (the umask does not apply). */
static int write_file(const char *dir, const struct certs_file *f)
{
    char path[PATH_MAX], tmp[PATH_MAX + 32];
    const char *p = f->data.data;
    size_t left = f->data.len;
    int fd;

    if (path_of(path, sizeof(path), dir, f->name) != 0) {
        ctl_error("tunnel-certs: %s/%s: path too long", dir, f->name);
        return -1;
    }
    snprintf(tmp, sizeof(tmp), "%s.tmp%ld", path, (long)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, f->mode);
    if (fd < 0) {
        ctl_error("tunnel-certs: cannot create %s: %s", tmp, strerror(errno));
        return -1;
    }
    if (fchmod(fd, f->mode) != 0)
        goto fail;
    while (left > 0) {
        ssize_t w = write(fd, p, left);

        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            goto fail;
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0)
        goto fail;
    if (close(fd) != 0) {
        fd = -1;
        goto fail;
    }
    if (rename(tmp, path) != 0) {
        ctl_error("tunnel-certs: cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
fail:
    ctl_error("tunnel-certs: cannot write %s: %s", tmp, strerror(errno));
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    return -1;
}

/* Refuses when a file to be written exists (without --force), then
 * writes them all. */
static int write_all(const struct certs_opts *op, const struct certs_out *o)
{
    char path[PATH_MAX];
    struct stat st;

    for (size_t i = 0; i < o->n && !op->force; i++) {
        if (path_of(path, sizeof(path), op->dir, o->files[i].name) != 0) {
            ctl_error("tunnel-certs: %s/%s: path too long", op->dir, o->files[i].name);
            return CTL_EXIT_RUNTIME;
        }
        if (lstat(path, &st) == 0) {
            ctl_error("tunnel-certs: %s exists; nothing was written (--force replaces it)",
                      path);
            return CTL_EXIT_RUNTIME;
        }
    }
    for (size_t i = 0; i < o->n; i++)
        if (write_file(op->dir, &o->files[i]) != 0)
            return CTL_EXIT_RUNTIME;
    return CTL_EXIT_OK;
}

/* Creates DIR (mode 0700) when missing and makes it absolute. */
static int prepare_dir(const char *dir, char *abs, size_t n)
{
    char buf[PATH_MAX];
    struct stat st;

    if (stat(dir, &st) != 0) {
        if (errno != ENOENT) {
            ctl_error("tunnel-certs: %s: %s", dir, strerror(errno));
            return -1;
        }
        if (mkdir(dir, 0700) != 0) {
            ctl_error("tunnel-certs: cannot create %s: %s", dir, strerror(errno));
            return -1;
        }
    } else if (!S_ISDIR(st.st_mode)) {
        ctl_error("tunnel-certs: %s is not a directory", dir);
        return -1;
    }
    if (realpath(dir, buf) == NULL) {
        ctl_error("tunnel-certs: %s: %s", dir, strerror(errno));
        return -1;
    }
    snprintf(abs, n, "%s", buf);
    return 0;
}

/* ---- the commands ----------------------------------------------------------------- */

/* Prints the settings to paste: the relay's and one router's route. */
static void print_snippets(const char *dir, const struct certs_opts *op, char fps[][128],
                           const char *const *routers, size_t nrouters, int new_ca,
                           const char *relay_cn)
{
    const char *host = op->nnames > 0 ? op->names[0] : relay_cn;
    int host_ip = strchr(host, ':') != NULL;

    if (new_ca) {
        printf("\nOn the relay (copy tunnel-ca.crt, relay.crt and relay.key to it):\n\n"
               "[relay]\n"
               "listen = 0.0.0.0:%d\n"
               "tls_cert = %s/relay.crt\n"
               "tls_key = %s/relay.key\n"
               "tunnel_ca = %s/tunnel-ca.crt\n", CERTS_RELAY_PORT, dir, dir, dir);
        /* One fingerprint a line: the configuration's lines are short,
         * and an indented line continues the value. */
        printf("pinned_clients = ");
        for (size_t i = 0; i < nrouters; i++)
            printf("%s%s", i ? ",\n    " : "", fps[i]);
        printf("\n");
    } else {
        printf("\nOn the relay, if [relay] pinned_clients is set, add to it (one a line):\n");
        for (size_t i = 0; i < nrouters; i++)
            printf("    %s%s\n", fps[i], i + 1 < nrouters ? "," : "");
    }
    printf("\nOn each router (copy tunnel-ca.crt and its own <name>.crt and <name>.key; "
           "here %s):\n\n"
           "[route relay]\n"
           "transport = relay\n"
           "host = %s%s%s:%d\n"
           "tunnel_ca = %s/tunnel-ca.crt\n"
           "client_cert = %s/%s.crt\n"
           "client_key = %s/%s.key\n", routers[0], host_ip ? "[" : "", host,
           host_ip ? "]" : "", CERTS_RELAY_PORT, dir, dir, routers[0], dir, routers[0]);
    if (new_ca)
        printf("\nKeep tunnel-ca.key offline: it is needed only to issue more certificates\n"
               "(mailferryctl tunnel-certs DIR --add-router NAME).\n");
}

/* The first run: CA, relay, routers. */
static int cmd_new(const struct certs_opts *op, const char *dir)
{
    struct certs_out *o = xcalloc(1, sizeof(*o));
    EVP_PKEY *ca_key = NULL, *key = NULL;
    X509 *ca = NULL, *x = NULL;
    struct buf san;
    char routers[CERTS_ROUTERS_MAX][32], fps[CERTS_ROUTERS_MAX][128];
    const char *rnames[CERTS_ROUTERS_MAX];
    int rc = CTL_EXIT_RUNTIME;

    buf_init(&san);
    for (size_t i = 0; i < op->nnames; i++) {
        buf_appendf(&san, "%s%s:%s", i ? "," : "", ip_literal(op->names[i]) ? "IP" : "DNS",
                    op->names[i]);
    }
    ca_key = make_key(op->rsa);
    if (ca_key == NULL)
        goto out;
    ca = make_cert(CERT_CA, ca_key, "mailferry tunnel CA", NULL, op->ca_days, NULL, NULL,
                   op->rsa);
    if (ca == NULL || out_pair(o, "tunnel-ca", ca_key, ca) != 0)
        goto out;
    if ((key = make_key(op->rsa)) == NULL)
        goto out;
    x = make_cert(CERT_SERVER, key, op->names[0], san.data, op->days, ca, ca_key,
                  op->rsa);
    if (x == NULL || out_pair(o, "relay", key, x) != 0)
        goto out;
    X509_free(x);
    EVP_PKEY_free(key);
    x = NULL;
    key = NULL;
    for (long long i = 0; i < op->routers; i++) {
        snprintf(routers[i], sizeof(routers[i]), "router-%lld", i + 1);
        rnames[i] = routers[i];
        if ((key = make_key(op->rsa)) == NULL)
            goto out;
        x = make_cert(CERT_CLIENT, key, routers[i], NULL, op->days, ca, ca_key, op->rsa);
        if (x == NULL || out_pair(o, routers[i], key, x) != 0)
            goto out;
        fingerprint(x, fps[i], sizeof(fps[i]));
        X509_free(x);
        EVP_PKEY_free(key);
        x = NULL;
        key = NULL;
    }
    rc = write_all(op, o);
    if (rc != CTL_EXIT_OK)
        goto out;
    printf("wrote in %s (%s keys, mode 0600):\n", dir, op->rsa ? "RSA 2048" : "EC P-256");
    for (size_t i = 0; i < o->n; i++)
        printf("  %s\n", o->files[i].name);
    printf("relay certificate names: %s\n", san.data);
    printf("router fingerprints:\n");
    for (long long i = 0; i < op->routers; i++)
        printf("  %s %s\n", routers[i], fps[i]);
    print_snippets(dir, op, fps, rnames, (size_t)op->routers, 1, NULL);
out:
    X509_free(x);
    EVP_PKEY_free(key);
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    buf_free(&san);
    out_free(o);
    free(o);
    return rc;
}

/* Reads DIR/tunnel-ca.crt and DIR/tunnel-ca.key and checks they match. */
static int load_ca(const char *dir, X509 **ca, EVP_PKEY **key)
{
    char path[PATH_MAX];
    FILE *f;

    *ca = NULL;
    *key = NULL;
    if (path_of(path, sizeof(path), dir, "tunnel-ca.crt") != 0 || (f = fopen(path, "r")) == NULL) {
        ctl_error("tunnel-certs: cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    *ca = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    if (*ca == NULL) {
        ssl_error(path);
        return -1;
    }
    if (path_of(path, sizeof(path), dir, "tunnel-ca.key") != 0 || (f = fopen(path, "r")) == NULL) {
        ctl_error("tunnel-certs: cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    *key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (*key == NULL) {
        ssl_error(path);
        return -1;
    }
    if (X509_check_private_key(*ca, *key) != 1) {
        ssl_error("tunnel-ca.key does not belong to tunnel-ca.crt");
        return -1;
    }
    return 0;
}

/* The CN of DIR/relay.crt, for the route snippet; a placeholder when it
 * cannot be read (the relay's files may live elsewhere by now). */
static const char *relay_name(const char *dir, char *cn, size_t n)
{
    char path[PATH_MAX];
    FILE *f;
    X509 *x = NULL;

    snprintf(cn, n, "relay.example.net");
    if (path_of(path, sizeof(path), dir, "relay.crt") == 0 && (f = fopen(path, "r")) != NULL) {
        x = PEM_read_X509(f, NULL, NULL, NULL);
        fclose(f);
    }
    if (x != NULL && X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn,
                                               (int)n) <= 0)
        snprintf(cn, n, "relay.example.net");
    X509_free(x);
    ERR_clear_error();
    return cn;
}

/* --add-router: client certificates from the existing CA. */
static int cmd_add(const struct certs_opts *op, const char *dir)
{
    struct certs_out *o = xcalloc(1, sizeof(*o));
    char cn[256];
    EVP_PKEY *ca_key = NULL, *key = NULL;
    X509 *ca = NULL, *x = NULL;
    char fps[CERTS_ROUTERS_MAX][128];
    int rc = CTL_EXIT_RUNTIME;

    if (load_ca(dir, &ca, &ca_key) != 0)
        goto out;
    for (size_t i = 0; i < op->nadd; i++) {
        if ((key = make_key(op->rsa)) == NULL)
            goto out;
        x = make_cert(CERT_CLIENT, key, op->add[i], NULL, op->days, ca, ca_key, op->rsa);
        if (x == NULL || out_pair(o, op->add[i], key, x) != 0)
            goto out;
        fingerprint(x, fps[i], sizeof(fps[i]));
        X509_free(x);
        EVP_PKEY_free(key);
        x = NULL;
        key = NULL;
    }
    rc = write_all(op, o);
    if (rc != CTL_EXIT_OK)
        goto out;
    printf("wrote in %s (mode 0600 for keys):\n", dir);
    for (size_t i = 0; i < o->n; i++)
        printf("  %s\n", o->files[i].name);
    printf("router fingerprints:\n");
    for (size_t i = 0; i < op->nadd; i++)
        printf("  %s %s\n", op->add[i], fps[i]);
    print_snippets(dir, op, fps, op->add, op->nadd, 0, relay_name(dir, cn, sizeof(cn)));
out:
    X509_free(x);
    EVP_PKEY_free(key);
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    out_free(o);
    free(o);
    return rc;
}

static int parse_count(const char *opt, const char *v, long long min, long long max,
                       long long *out)
{
    char *end;
    long long n;

    errno = 0;
    n = strtoll(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || n < min || n > max)
        return usage_error("%s must be a number from %lld to %lld, got \"%s\"", opt, min, max,
                           v);
    *out = n;
    return -1;
}

/* Adds the comma-separated names of v to list (at most max). */
static int add_names(const char *opt, char *v, const char **list, size_t *n, size_t max)
{
    for (char *save = NULL, *p = strtok_r(v, ",", &save); p != NULL;
         p = strtok_r(NULL, ",", &save)) {
        if (*n == max)
            return usage_error("%s: at most %zu names", opt, max);
        list[(*n)++] = p;
    }
    return -1;
}

int ctl_certs_main(int argc, char **argv)
{
    struct certs_opts op;
    char dir[PATH_MAX];
    int rc;
    int got_routers = 0, got_ca_days = 0;

    memset(&op, 0, sizeof(op));
    op.routers = 1;
    op.days = CERTS_DAYS_DEFAULT;
    op.ca_days = CERTS_CA_DAYS_DEFAULT;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = strcmp(a, "--relay-name") == 0 || strcmp(a, "--routers") == 0 ||
                    strcmp(a, "--days") == 0 || strcmp(a, "--ca-days") == 0 ||
                    strcmp(a, "--key-type") == 0 || strcmp(a, "--add-router") == 0;

        if (takes && v == NULL)
            return usage_error("%s needs a value", a);
        if (takes)
            i++;
        if (strcmp(a, "--relay-name") == 0)
            rc = add_names(a, v, op.names, &op.nnames, CERTS_NAMES_MAX);
        else if (strcmp(a, "--add-router") == 0)
            rc = add_names(a, v, op.add, &op.nadd, CERTS_ROUTERS_MAX);
        else if (strcmp(a, "--routers") == 0)
            rc = parse_count(a, v, 1, CERTS_ROUTERS_MAX, &op.routers), got_routers = 1;
        else if (strcmp(a, "--days") == 0)
            rc = parse_count(a, v, 1, CERTS_DAYS_MAX, &op.days);
        else if (strcmp(a, "--ca-days") == 0)
            rc = parse_count(a, v, 1, CERTS_DAYS_MAX, &op.ca_days), got_ca_days = 1;
        else if (strcmp(a, "--key-type") == 0) {
            if (strcmp(v, "ec") != 0 && strcmp(v, "rsa") != 0)
                return usage_error("--key-type must be ec or rsa, got \"%s\"", v);
            op.rsa = strcmp(v, "rsa") == 0;
            rc = -1;
        } else if (strcmp(a, "--force") == 0) {
            op.force = 1;
            rc = -1;
        } else if (a[0] == '-' && a[1] != '\0') {
            return usage_error("unknown option \"%s\"", a);
        } else if (op.dir == NULL) {
            if (a[0] == '\0')
                return usage_error("empty DIR");
            op.dir = a;
            rc = -1;
        } else {
            return usage_error("unexpected argument \"%s\"", a);
        }
        if (rc != -1)
            return rc;
    }
    if (op.dir == NULL)
        return usage_error("DIR expected");
    if (op.nadd > 0 && (op.nnames > 0 || got_routers || got_ca_days))
        return usage_error("--add-router takes no --relay-name, --routers or --ca-days");
    for (size_t i = 0; i < op.nadd; i++) {
        if (!router_name_ok(op.add[i]))
            return usage_error("router name \"%s\": 1-64 of letters, digits, '-', '_', '.' "
                               "(not tunnel-ca or relay)", op.add[i]);
        for (size_t j = 0; j < i; j++)
            if (strcmp(op.add[i], op.add[j]) == 0)
                return usage_error("router name \"%s\" given twice", op.add[i]);
    }
    for (size_t i = 0; i < op.nnames; i++)
        if (!ip_literal(op.names[i]) && !dns_name_ok(op.names[i]))
            return usage_error("--relay-name \"%s\": a DNS name or an IP address", op.names[i]);
    if (op.nadd == 0 && op.nnames == 0)
        return usage_error("--relay-name NAME expected: the name routers connect to, which "
                           "the relay's certificate must carry");
    if (op.days > op.ca_days)
        return usage_error("--days (%lld) longer than the CA's --ca-days (%lld)", op.days,
                           op.ca_days);
    if (prepare_dir(op.dir, dir, sizeof(dir)) != 0)
        return CTL_EXIT_RUNTIME;
    return op.nadd > 0 ? cmd_add(&op, dir) : cmd_new(&op, dir);
}
