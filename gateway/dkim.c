/*
 * dkim: key sets, the From: domain, signing with libopendkim on the libuv
 * threadpool, and the key tools. See dkim.h for the contract.
 *
 * One DKIM_LIB handle belongs to each key set and is configured once, at
 * load (signed and oversigned header lists); afterwards it is only read,
 * which libopendkim allows from several threads at once (its milter signs
 * on many threads with one handle). Each signature is its own DKIM handle.
 *
 * Keys are parsed with OpenSSL at load, which checks type and size and
 * refuses encrypted keys. RSA keys are then handed to libopendkim as
 * PKCS#8 PEM text, wiped when the set is freed.
 *
 * Ed25519 signatures (RFC 8463) are made here with OpenSSL instead:
 * libopendkim 2.11.0~beta2 (Debian 12) signs them correctly but its
 * dkim_free() releases the key state of RSA signatures only, which leaks
 * about 540 bytes per Ed25519 signature (fixed upstream by OpenDKIM pull
 * request #321, not in any Debian release). ed25519_sign() below does what
 * dkim_eom() would: relaxed/relaxed canonicalisation (RFC 6376 sections
 * 3.4.2 and 3.4.4), the header selection of section 5.4.2 with the same
 * signed and oversigned lists, and PureEdDSA over the SHA-256 hash (RFC
 * 8463 section 3). The tests verify both kinds with libopendkim's own
 * verifier, Python's dkim package and opendkim-testmsg.
 */
#include "gateway/dkim.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <opendkim/dkim.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/xmalloc.h"

/* A PEM private key is a few kilobytes; anything larger is not one. */
#define DKIM_KEY_MAX (64 * 1024)
/* RFC 8301 section 3.2: signers MUST use RSA keys of at least 1024 bits
 * and SHOULD use at least 2048. */
#define DKIM_RSA_MIN_BITS 1024
#define DKIM_RSA_GOOD_BITS 2048
/* RFC 1035 section 2.3.4: 63-octet labels, 255-octet names. */
#define DKIM_MAX_DOMAIN 255
/* Header field names in one list. */
#define DKIM_MAX_HEADERS 64

struct dkim_key {
    struct dkim_key_info info;    /* first: dkim_keys_get() returns it */
    char *domain;
    char *selector;
    char *path;
    char *record;
    char *pem;                    /* RSA: PKCS#8 PEM for libopendkim */
    EVP_PKEY *pkey;               /* Ed25519: the key, signed with OpenSSL */
    int line;                     /* key_table line, 0 for keys_dir */
};

struct dkim_keys {
    atomic_int refs;
    DKIM_LIB *lib;
    struct dkim_key *v;
    size_t n;
    char **sign;                  /* NULL-terminated header name lists */
    char **oversign;
};

struct dkim_job {
    uv_work_t req;
    struct dkim_keys *keys;
    char id[64];
    char domain[DKIM_MAX_DOMAIN + 1];
    const char *msg;
    size_t len;
    struct buf sigs;
    char err[256];
    int status;
    uint64_t started;
    dkim_sign_cb cb;
    void *arg;
};

const char *dkim_alg_name(enum dkim_alg alg)
{
    return alg == DKIM_ALG_ED25519 ? "ed25519" : "rsa";
}

int dkim_alg_parse(const char *s, enum dkim_alg *out)
{
    if (strcasecmp(s, "rsa") == 0)
        *out = DKIM_ALG_RSA;
    else if (strcasecmp(s, "ed25519") == 0)
        *out = DKIM_ALG_ED25519;
    else
        return -1;
    return 0;
}

/* ---- names -------------------------------------------------------------- */

static void lower(char *s)
{
    for (; *s; s++)
        *s = (char)tolower((unsigned char)*s);
}

/* RFC 5321 section 4.1.2 domain (letters, digits, hyphens in labels of at
 * most 63, at most 255 in all), or a selector, which RFC 6376 section 3.1
 * defines with the same sub-domain syntax. Underscores are let through:
 * they occur in real selectors and names. */
static int valid_name(const char *s)
{
    size_t label = 0, total = strlen(s);

    if (total == 0 || total > DKIM_MAX_DOMAIN)
        return 0;
    for (const char *p = s;; p++) {
        if (*p == '.' || *p == '\0') {
            if (label == 0 || label > 63 || p[-1] == '-')
                return 0;
            if (*p == '\0')
                return 1;
            label = 0;
            continue;
        }
        if (!isalnum((unsigned char)*p) && *p != '_' && !(*p == '-' && label > 0))
            return 0;
        label++;
    }
}

/* ---- key files ------------------------------------------------------------ */

static int no_password(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

/* Base64 of len bytes (no line breaks), freed by the caller. */
static char *b64(const unsigned char *p, size_t len)
{
    char *out = xmalloc(4 * ((len + 2) / 3) + 1);

    EVP_EncodeBlock((unsigned char *)out, p, (int)len);
    return out;
}

/* Decodes base64 text that may hold white space (RFC 6376 section 3.6.1
 * allows FWS inside p=). Returns the length, or -1. */
static long unb64(const char *s, size_t len, unsigned char **out)
{
    char *clean = xmalloc(len + 1);
    size_t n = 0, pad = 0;
    int got;

    for (size_t i = 0; i < len; i++) {
        if (!isspace((unsigned char)s[i]))
            clean[n++] = s[i];
    }
    clean[n] = '\0';
    if (n == 0 || n % 4 != 0) {
        free(clean);
        return -1;
    }
    if (clean[n - 1] == '=')
        pad++;
    if (clean[n - 2] == '=')
        pad++;
    *out = xmalloc(n / 4 * 3 + 1);
    got = EVP_DecodeBlock(*out, (unsigned char *)clean, (int)n);
    free(clean);
    if (got < 0 || (size_t)got < pad) {
        free(*out);
        *out = NULL;
        return -1;
    }
    return got - (long)pad;
}

/* The record that publishes pkey's public half (RFC 6376 section 3.6.1;
 * RFC 8463 section 4: the raw 32-byte Ed25519 key). */
static char *record_of(EVP_PKEY *pkey)
{
    struct buf b = BUF_INIT;
    char *p;

    if (EVP_PKEY_id(pkey) == EVP_PKEY_ED25519) {
        unsigned char raw[32];
        size_t rl = sizeof(raw);
        if (EVP_PKEY_get_raw_public_key(pkey, raw, &rl) != 1)
            return NULL;
        p = b64(raw, rl);
        buf_appendf(&b, "v=DKIM1; k=ed25519; p=%s", p);
    } else {
        unsigned char *der = NULL;
        int dl = i2d_PUBKEY(pkey, &der);
        if (dl <= 0)
            return NULL;
        p = b64(der, (size_t)dl);
        OPENSSL_free(der);
        buf_appendf(&b, "v=DKIM1; k=rsa; p=%s", p);
    }
    free(p);
    return buf_steal(&b, NULL);
}

/* Reads and checks one key file into k (domain, selector and alg already
 * set). Returns 0, or -1 with the reason in err. */
static int key_read(struct dkim_key *k, char *err, size_t errlen)
{
    struct stat st;
    char *data = NULL;
    size_t len = 0;
    ssize_t r;
    int fd, rc = -1, type;
    BIO *bio = NULL;
    EVP_PKEY *pkey = NULL;
    BUF_MEM *mem;

    fd = open(k->path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        snprintf(err, errlen, "DKIM key %s: cannot open: %s", k->path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "DKIM key %s: not a regular file", k->path);
        goto out;
    }
    /* A signing key lets anyone who reads it send as the domain. */
    if (st.st_mode & (S_IRWXG | S_IRWXO)) {
        snprintf(err, errlen, "DKIM key %s: readable or writable by group or others (mode %04o); "
                 "refused: chmod 600 %s", k->path, (unsigned)(st.st_mode & 07777), k->path);
        goto out;
    }
    if (st.st_size > DKIM_KEY_MAX) {
        snprintf(err, errlen, "DKIM key %s: larger than %d bytes, not a PEM key", k->path,
                 DKIM_KEY_MAX);
        goto out;
    }
    data = xmalloc((size_t)st.st_size + 1);
    while (len < (size_t)st.st_size) {
        r = read(fd, data + len, (size_t)st.st_size - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            snprintf(err, errlen, "DKIM key %s: cannot read: %s", k->path, strerror(errno));
            goto out;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    bio = BIO_new_mem_buf(data, (int)len);
    if (bio)
        pkey = PEM_read_bio_PrivateKey(bio, NULL, no_password, NULL);
    if (pkey == NULL) {
        snprintf(err, errlen, "DKIM key %s: not an unencrypted PEM private key", k->path);
        goto out;
    }
    type = EVP_PKEY_id(pkey);
    if (k->info.alg == DKIM_ALG_RSA && type != EVP_PKEY_RSA) {
        snprintf(err, errlen, "DKIM key %s: named rsa, but holds another kind of key", k->path);
        goto out;
    }
    if (k->info.alg == DKIM_ALG_ED25519 && type != EVP_PKEY_ED25519) {
        snprintf(err, errlen, "DKIM key %s: named ed25519, but holds another kind of key",
                 k->path);
        goto out;
    }
    k->info.bits = EVP_PKEY_bits(pkey);
    if (k->info.alg == DKIM_ALG_RSA && k->info.bits < DKIM_RSA_MIN_BITS) {
        snprintf(err, errlen, "DKIM key %s: RSA key of %d bits; at least %d are required "
                 "(RFC 8301), %d advised", k->path, k->info.bits, DKIM_RSA_MIN_BITS,
                 DKIM_RSA_GOOD_BITS);
        goto out;
    }
    k->record = record_of(pkey);
    if (k->record == NULL) {
        snprintf(err, errlen, "DKIM key %s: cannot derive the public key", k->path);
        goto out;
    }
    if (k->info.alg == DKIM_ALG_ED25519) {
        /* Signed here with OpenSSL (see the top of the file). */
        k->pkey = pkey;
        pkey = NULL;
    } else {
        /* libopendkim parses the key from text for every signature. */
        BIO_free(bio);
        bio = BIO_new(BIO_s_mem());
        if (bio == NULL ||
            PEM_write_bio_PKCS8PrivateKey(bio, pkey, NULL, NULL, 0, NULL, NULL) != 1 ||
            BIO_get_mem_ptr(bio, &mem) != 1) {
            snprintf(err, errlen, "DKIM key %s: cannot convert the key", k->path);
            goto out;
        }
        k->pem = xstrndup(mem->data, mem->length);
        OPENSSL_cleanse(mem->data, mem->length);
    }
    if (k->info.alg == DKIM_ALG_RSA && k->info.bits < DKIM_RSA_GOOD_BITS)
        log_warn("event=dkim_weak_key path=%s bits=%d reason=\"RFC 8301 advises 2048 bits\"",
                 k->path, k->info.bits);
    rc = 0;
out:
    if (data) {
        OPENSSL_cleanse(data, len);
        free(data);
    }
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    close(fd);
    return rc;
}

static void key_free(struct dkim_key *k)
{
    if (k->pem) {
        OPENSSL_cleanse(k->pem, strlen(k->pem));
        free(k->pem);
    }
    EVP_PKEY_free(k->pkey);
    free(k->domain);
    free(k->selector);
    free(k->path);
    free(k->record);
}

static struct dkim_key *keys_add(struct dkim_keys *ks, const char *domain, const char *selector,
                                 enum dkim_alg alg, const char *path, int line)
{
    struct dkim_key *k;

    ks->v = xrealloc(ks->v, (ks->n + 1) * sizeof(*ks->v));
    k = &ks->v[ks->n++];
    memset(k, 0, sizeof(*k));
    k->domain = xstrdup(domain);
    lower(k->domain);
    if (k->domain[0] && k->domain[strlen(k->domain) - 1] == '.')
        k->domain[strlen(k->domain) - 1] = '\0';
    k->selector = xstrdup(selector);
    k->path = xstrdup(path);
    k->info.alg = alg;
    k->line = line;
    return k;
}

/* keys_dir: <domain>.<selector>.<rsa|ed25519>.key; other names are
 * skipped (with a debug line), so the directory may hold notes. */
static int load_dir(struct dkim_keys *ks, const char *dir, char *err, size_t errlen)
{
    DIR *d = opendir(dir);
    struct dirent *e;

    if (d == NULL) {
        snprintf(err, errlen, "[dkim] keys_dir %s: %s", dir, strerror(errno));
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        static const struct { const char *suffix; enum dkim_alg alg; } kinds[] = {
            {".rsa.key", DKIM_ALG_RSA}, {".ed25519.key", DKIM_ALG_ED25519},
        };
        size_t len = strlen(e->d_name);
        char *base, *dot, path[PATH_MAX];
        int kind = -1;

        if (e->d_name[0] == '.')
            continue;
        for (int i = 0; i < 2; i++) {
            size_t sl = strlen(kinds[i].suffix);
            if (len > sl && strcmp(e->d_name + len - sl, kinds[i].suffix) == 0) {
                kind = i;
                len -= sl;
                break;
            }
        }
        if (kind < 0) {
            log_debug("event=dkim_skip_file dir=%s file=%s reason=name", dir, e->d_name);
            continue;
        }
        base = xstrndup(e->d_name, len);
        dot = strrchr(base, '.');
        if (dot == NULL || !valid_name(dot + 1) || (*dot = '\0', !valid_name(base))) {
            snprintf(err, errlen, "[dkim] keys_dir %s: %s: expected "
                     "<domain>.<selector>.%s.key", dir, e->d_name, dkim_alg_name(kinds[kind].alg));
            free(base);
            closedir(d);
            return -1;
        }
        if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, e->d_name) >= sizeof(path)) {
            snprintf(err, errlen, "[dkim] keys_dir %s: path too long", dir);
            free(base);
            closedir(d);
            return -1;
        }
        keys_add(ks, base, dot + 1, kinds[kind].alg, path, 0);
        free(base);
    }
    closedir(d);
    return 0;
}

/* key_table: "domain selector rsa|ed25519 path" per line. */
static int load_table(struct dkim_keys *ks, const char *file, char *err, size_t errlen)
{
    FILE *f = fopen(file, "re");
    char line[4096];
    int lineno = 0;

    if (f == NULL) {
        snprintf(err, errlen, "[dkim] key_table %s: %s", file, strerror(errno));
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        char *tok[5], *save = NULL, *p = line;
        int nt = 0;
        enum dkim_alg alg;

        lineno++;
        if (strchr(line, '\n') == NULL && !feof(f)) {
            snprintf(err, errlen, "%s:%d: line too long", file, lineno);
            fclose(f);
            return -1;
        }
        p[strcspn(p, "#")] = '\0';
        while (nt < 5 && (tok[nt] = strtok_r(p, " \t\r\n", &save)) != NULL) {
            p = NULL;
            nt++;
        }
        if (nt == 0)
            continue;
        if (nt != 4) {
            snprintf(err, errlen, "%s:%d: expected \"domain selector rsa|ed25519 path\"", file,
                     lineno);
            fclose(f);
            return -1;
        }
        if (!valid_name(tok[0])) {
            snprintf(err, errlen, "%s:%d: \"%.80s\" is not a domain name", file, lineno, tok[0]);
            fclose(f);
            return -1;
        }
        if (!valid_name(tok[1])) {
            snprintf(err, errlen, "%s:%d: \"%.80s\" is not a selector", file, lineno, tok[1]);
            fclose(f);
            return -1;
        }
        if (dkim_alg_parse(tok[2], &alg) != 0) {
            snprintf(err, errlen, "%s:%d: key type must be rsa or ed25519, got \"%.40s\"", file,
                     lineno, tok[2]);
            fclose(f);
            return -1;
        }
        keys_add(ks, tok[0], tok[1], alg, tok[3], lineno);
    }
    fclose(f);
    return 0;
}

static int key_cmp(const void *a, const void *b)
{
    const struct dkim_key *x = a, *y = b;
    int c = strcmp(x->domain, y->domain);

    if (c == 0)
        c = (int)x->info.alg - (int)y->info.alg;
    if (c == 0)
        c = strcmp(x->selector, y->selector);
    return c;
}

/* Splits a comma list of header names into a NULL-terminated array. */
static char **header_list(const char *s, char **extra)
{
    char **v = xcalloc(DKIM_MAX_HEADERS * 2 + 1, sizeof(*v));
    size_t n = 0;

    while (s && *s && n < DKIM_MAX_HEADERS) {
        size_t len;
        s += strspn(s, ", \t");
        len = strcspn(s, ", \t");
        if (len == 0)
            break;
        v[n++] = xstrndup(s, len);
        s += len;
    }
    /* libopendkim oversigns only fields it signs: add them. */
    for (size_t i = 0; extra && extra[i] && n < DKIM_MAX_HEADERS * 2; i++) {
        size_t j;
        for (j = 0; j < n && strcasecmp(v[j], extra[i]) != 0; j++)
            ;
        if (j == n)
            v[n++] = xstrdup(extra[i]);
    }
    return v;
}

static void header_list_free(char **v)
{
    for (size_t i = 0; v && v[i]; i++)
        free(v[i]);
    free(v);
}

static void keys_free(struct dkim_keys *ks)
{
    for (size_t i = 0; i < ks->n; i++)
        key_free(&ks->v[i]);
    free(ks->v);
    if (ks->lib)
        dkim_close(ks->lib);
    header_list_free(ks->sign);
    header_list_free(ks->oversign);
    free(ks);
}

struct dkim_keys *dkim_keys_load(const struct mf_config *cfg, char *err, size_t errlen)
{
    struct dkim_keys *ks = xcalloc(1, sizeof(*ks));
    DKIM_STAT st;

    atomic_init(&ks->refs, 1);
    if (!cfg->dkim.enabled)
        return ks;
    if (cfg->dkim.keys_dir && load_dir(ks, cfg->dkim.keys_dir, err, errlen) != 0)
        goto fail;
    if (cfg->dkim.key_table && load_table(ks, cfg->dkim.key_table, err, errlen) != 0)
        goto fail;
    for (size_t i = 0; i < ks->n; i++) {
        struct dkim_key *k = &ks->v[i];
        if (key_read(k, err, errlen) != 0) {
            if (k->line > 0) {
                char e2[512];
                snprintf(e2, sizeof(e2), "%s (%s:%d)", err, cfg->dkim.key_table, k->line);
                snprintf(err, errlen, "%s", e2);
            }
            goto fail;
        }
    }
    if (ks->n > 1)
        qsort(ks->v, ks->n, sizeof(*ks->v), key_cmp);
    for (size_t i = 0; i < ks->n; i++) {
        struct dkim_key *k = &ks->v[i];
        /* A selector publishes one key record (one k= tag). */
        for (size_t j = 0; j < i; j++) {
            if (strcmp(ks->v[j].domain, k->domain) == 0 &&
                strcmp(ks->v[j].selector, k->selector) == 0) {
                snprintf(err, errlen, "DKIM selector %s of %s has two keys: %s and %s",
                         k->selector, k->domain, ks->v[j].path, k->path);
                goto fail;
            }
        }
        k->info.domain = k->domain;
        k->info.selector = k->selector;
        k->info.path = k->path;
        k->info.record = k->record;
    }
    if (ks->n == 0)
        return ks;

    ks->lib = dkim_init(NULL, NULL);
    if (ks->lib == NULL) {
        snprintf(err, errlen, "libopendkim: cannot initialise");
        goto fail;
    }
    ks->oversign = header_list(cfg->dkim.oversign_headers, NULL);
    ks->sign = header_list(cfg->dkim.sign_headers, ks->oversign);
    st = dkim_options(ks->lib, DKIM_OP_SETOPT, DKIM_OPTS_SIGNHDRS, ks->sign, sizeof(ks->sign));
    if (st == DKIM_STAT_OK && ks->oversign[0] != NULL)
        st = dkim_options(ks->lib, DKIM_OP_SETOPT, DKIM_OPTS_OVERSIGNHDRS, ks->oversign,
                          sizeof(ks->oversign));
    if (st != DKIM_STAT_OK) {
        snprintf(err, errlen, "libopendkim: cannot set the header lists: %s",
                 dkim_getresultstr(st));
        goto fail;
    }
    return ks;

fail:
    keys_free(ks);
    return NULL;
}

struct dkim_keys *dkim_keys_ref(struct dkim_keys *k)
{
    atomic_fetch_add(&k->refs, 1);
    return k;
}

void dkim_keys_unref(struct dkim_keys *k)
{
    if (k != NULL && atomic_fetch_sub(&k->refs, 1) == 1)
        keys_free(k);
}

size_t dkim_keys_count(const struct dkim_keys *k)
{
    return k ? k->n : 0;
}

const struct dkim_key_info *dkim_keys_get(const struct dkim_keys *k, size_t i)
{
    return k && i < k->n ? &k->v[i].info : NULL;
}

const char *dkim_keys_signer(const struct dkim_keys *k, const char *domain)
{
    const char *d = domain;

    if (k == NULL || k->n == 0)
        return NULL;
    while (d && *d) {
        for (size_t i = 0; i < k->n; i++) {
            if (strcmp(k->v[i].domain, d) == 0)
                return k->v[i].domain;
        }
        d = strchr(d, '.');
        if (d)
            d++;
        /* A bare top-level domain never signs. */
        if (d && strchr(d, '.') == NULL)
            break;
    }
    return NULL;
}

/* ---- the From: domain -------------------------------------------------- */

/* Skips a comment starting at s[*i] == '(' (RFC 5322 section 3.2.2:
 * nested, with quoted-pairs). */
static void skip_comment(const char *s, size_t len, size_t *i)
{
    int depth = 0;

    for (; *i < len; (*i)++) {
        if (s[*i] == '\\' && *i + 1 < len) {
            (*i)++;
        } else if (s[*i] == '(') {
            depth++;
        } else if (s[*i] == ')' && --depth == 0) {
            (*i)++;
            return;
        }
    }
}

/* Copies a quoted string starting at s[*i] == '"' into b, quotes and all. */
static void copy_quoted(const char *s, size_t len, size_t *i, struct buf *b)
{
    buf_append(b, "\"", 1);
    for ((*i)++; *i < len; (*i)++) {
        if (s[*i] == '\\' && *i + 1 < len) {
            buf_append(b, s + *i, 2);
            (*i)++;
        } else if (s[*i] == '"') {
            (*i)++;
            break;
        } else {
            buf_append(b, s + *i, 1);
        }
    }
    buf_append(b, "\"", 1);
}

/* The address of the first mailbox of an unfolded address-list value
 * (RFC 5322 section 3.4): the angle-addr when there is one, else the
 * addr-spec; display names and groups are skipped. Returns 0 and the
 * address in out, or -1. */
static int first_address(const char *s, size_t len, struct buf *out)
{
    struct buf cur = BUF_INIT;
    size_t i = 0;
    int rc = -1;

    while (i < len) {
        char c = s[i];
        if (c == '(') {
            skip_comment(s, len, &i);
        } else if (c == '"') {
            copy_quoted(s, len, &i, &cur);
        } else if (c == '<') {
            buf_reset(&cur);
            for (i++; i < len && s[i] != '>'; i++) {
                if (s[i] == '(') {
                    skip_comment(s, len, &i);
                    i--;
                } else if (s[i] == '"') {
                    copy_quoted(s, len, &i, &cur);
                    i--;
                } else if (!isspace((unsigned char)s[i])) {
                    buf_append(&cur, s + i, 1);
                }
            }
            if (cur.len > 0)
                rc = 0;
            break;
        } else if (c == ':') {
            /* A group's display name ends here; its mailboxes follow. */
            buf_reset(&cur);
            i++;
        } else if (c == ',' || c == ';') {
            if (cur.data && memchr(cur.data, '@', cur.len)) {
                rc = 0;
                break;
            }
            buf_reset(&cur);
            i++;
        } else {
            if (!isspace((unsigned char)c))
                buf_append(&cur, &c, 1);
            i++;
        }
    }
    if (rc != 0 && cur.data && memchr(cur.data, '@', cur.len))
        rc = 0;
    if (rc == 0) {
        buf_reset(out);
        buf_append(out, cur.data, cur.len);
    }
    buf_free(&cur);
    return rc;
}

/* Writes the domain of addr (after its last '@') into out, lower-cased,
 * without a trailing dot. Returns 0, or -1 when there is none, it is a
 * domain literal, or it does not fit. */
static int domain_of(const char *addr, char *out, size_t n)
{
    const char *at = strrchr(addr, '@');
    size_t len;

    if (at == NULL || at[1] == '\0' || at[1] == '[')
        return -1;
    at++;
    len = strlen(at);
    if (len > 0 && at[len - 1] == '.')
        len--;
    if (len == 0 || len >= n)
        return -1;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)at[i];
        if (c <= 0x20 || c == 0x7f || c == '@' || c == '<' || c == '>' || c == '"')
            return -1;
        out[i] = (char)tolower(c);
    }
    out[len] = '\0';
    return 0;
}

int dkim_from_domain(const char *msg, size_t len, char *out, size_t n)
{
    size_t off = 0;

    /* RFC 5322 section 2.1: the header section ends at the first empty
     * line. A field continues on lines that start with white space. */
    while (off < len) {
        const char *line = msg + off;
        const char *eol = memchr(line, '\n', len - off);
        size_t ll = eol ? (size_t)(eol - line) : len - off;
        size_t name = 0;

        if (ll == 0 || (ll == 1 && line[0] == '\r'))
            break;
        while (name < ll && line[name] != ':' && line[name] != ' ' && line[name] != '\t')
            name++;
        if (name == 4 && strncasecmp(line, "From", 4) == 0) {
            size_t colon = name;
            struct buf value = BUF_INIT, addr = BUF_INIT;
            size_t end = off;
            int rc;

            while (colon < ll && (line[colon] == ' ' || line[colon] == '\t'))
                colon++;
            if (colon < ll && line[colon] == ':') {
                /* Unfold: the field's lines, without their line ends. */
                for (;;) {
                    const char *l = msg + end;
                    const char *e = memchr(l, '\n', len - end);
                    size_t n2 = e ? (size_t)(e - l) : len - end;
                    size_t start = end == off ? colon + 1 : 0;
                    if (n2 > 0 && l[n2 - 1] == '\r')
                        n2--;
                    if (start < n2)
                        buf_append(&value, l + start, n2 - start);
                    buf_append(&value, " ", 1);
                    if (e == NULL)
                        break;
                    end += (size_t)(e - l) + 1;
                    if (end >= len || (msg[end] != ' ' && msg[end] != '\t'))
                        break;
                }
                rc = first_address(value.data, value.len, &addr) == 0 &&
                             domain_of(addr.data, out, n) == 0
                         ? 0
                         : -1;
                buf_free(&value);
                buf_free(&addr);
                return rc;
            }
        }
        if (eol == NULL)
            break;
        off += ll + 1;
    }
    return -1;
}

int dkim_pick(const struct dkim_keys *k, const char *msg, size_t len, const char *env_from,
              char *d, size_t n)
{
    char from[DKIM_MAX_DOMAIN + 1], env[DKIM_MAX_DOMAIN + 1];
    const char *signer = NULL;
    int have_from = dkim_from_domain(msg, len, from, sizeof(from)) == 0;
    int have_env = env_from && domain_of(env_from, env, sizeof(env)) == 0;

    if (have_from)
        signer = dkim_keys_signer(k, from);
    if (signer == NULL && have_env)
        signer = dkim_keys_signer(k, env);
    if (signer != NULL) {
        snprintf(d, n, "%s", signer);
        return 1;
    }
    snprintf(d, n, "%s", have_from ? from : have_env ? env : "");
    return 0;
}

/* ---- signing -------------------------------------------------------------- */

/* An rsa-sha256 signature by libopendkim, appended to sigs. */
static int rsa_sign(const struct dkim_keys *k, const struct dkim_key *key, const char *id,
                    const char *msg, size_t len, struct buf *sigs, char *err, size_t errlen)
{
    DKIM_STAT st;
    DKIM *h;
    unsigned char *hdr = NULL;
    size_t hlen = 0;
    const char *what;

    h = dkim_sign(k->lib, (const unsigned char *)id, NULL, (dkim_sigkey_t)key->pem,
                  (const unsigned char *)key->selector, (const unsigned char *)key->domain,
                  DKIM_CANON_RELAXED, DKIM_CANON_RELAXED, DKIM_SIGN_RSASHA256, -1, &st);
    if (h == NULL) {
        snprintf(err, errlen, "%s/%s (rsa): dkim_sign: %s", key->domain, key->selector,
                 dkim_getresultstr(st));
        return -1;
    }
    what = "message";
    st = dkim_chunk(h, (unsigned char *)msg, len);
    /* libopendkim wants the last line ended. Relaxed body canonicalisation
     * adds that CRLF to a body without one anyway (RFC 6376 section
     * 3.4.4), so the signature is the same. */
    if (st == DKIM_STAT_OK && (len == 0 || msg[len - 1] != '\n'))
        st = dkim_chunk(h, (unsigned char *)"\r\n", 2);
    if (st == DKIM_STAT_OK) {
        what = "end of message";
        st = dkim_chunk(h, NULL, 0);
    }
    if (st == DKIM_STAT_OK) {
        what = "signature";
        st = dkim_eom(h, NULL);
    }
    if (st == DKIM_STAT_OK) {
        what = "signature header";
        st = dkim_getsighdr_d(h, sizeof(DKIM_SIGNHEADER ": ") - 1, &hdr, &hlen);
    }
    if (st != DKIM_STAT_OK) {
        const char *e = dkim_geterror(h);
        snprintf(err, errlen, "%s/%s (rsa): %s: %s%s%s", key->domain, key->selector, what,
                 dkim_getresultstr(st), e ? ": " : "", e ? e : "");
        dkim_free(h);
        return -1;
    }
    /* The library folds with bare LF; the message uses CRLF. */
    buf_appends(sigs, DKIM_SIGNHEADER ": ");
    for (size_t j = 0; j < hlen && hdr[j]; j++) {
        if (hdr[j] == '\n')
            buf_append(sigs, "\r\n", 2);
        else if (hdr[j] != '\r')
            buf_append(sigs, &hdr[j], 1);
    }
    buf_append(sigs, "\r\n", 2);
    dkim_free(h);
    return 0;
}

#define IS_WSP(c) ((c) == ' ' || (c) == '\t')
/* libopendkim's DKIM_ISLWSP: WSP, CR and LF. Its header parser takes a
 * line starting with VT or FF as a continuation too, and so does
 * split_header(), so that both signers see the same fields. */
#define IS_LWSP(c) (IS_WSP(c) || (c) == '\r' || (c) == '\n')
#define IS_CONT(c) (IS_WSP(c) || (c) == '\v' || (c) == '\f')

/* One header field of the message: its bytes without the final CRLF. */
struct hfield {
    const char *p;
    size_t len;
    size_t namelen;
    int used;                     /* already selected for h= */
};

/* Splits the header section of msg into fields (RFC 5322 section 2.2:
 * continuation lines start with WSP) and returns where the body starts
 * (len when there is none). */
static size_t split_header(const char *msg, size_t len, struct hfield **out, size_t *nout)
{
    struct hfield *v = NULL;
    size_t n = 0, cap = 0, off = 0, body = len;

    while (off < len) {
        const char *line = msg + off;
        const char *eol = memchr(line, '\n', len - off);
        size_t next = eol ? (size_t)(eol - msg) + 1 : len;
        size_t ll = next - off;

        if (ll <= 2 && (line[0] == '\n' || (line[0] == '\r' && ll == 2))) {
            body = next;   /* the empty line: the body follows */
            break;
        }
        if (IS_CONT(line[0]) && n > 0) {
            v[n - 1].len = next - (size_t)(v[n - 1].p - msg);
        } else {
            if (n == cap) {
                cap = cap ? cap * 2 : 32;
                v = xrealloc(v, cap * sizeof(*v));
            }
            v[n].p = line;
            v[n].len = ll;
            v[n].namelen = strcspn(line, ":\r\n");
            if (v[n].namelen > ll)
                v[n].namelen = ll;
            while (v[n].namelen > 0 && IS_WSP(line[v[n].namelen - 1]))
                v[n].namelen--;
            v[n].used = 0;
            n++;
        }
        off = next;
    }
    for (size_t i = 0; i < n; i++) {
        /* Without the line end of the last line. */
        while (v[i].len > 0 && (v[i].p[v[i].len - 1] == '\n' || v[i].p[v[i].len - 1] == '\r'))
            v[i].len--;
    }
    *out = v;
    *nout = n;
    return body;
}

/*
 * RFC 6376 section 3.4.2, relaxed header canonicalisation of one field
 * (text without its final CRLF), appended to b with a CRLF when crlf. It
 * follows libopendkim's dkim_canon_header_string() byte for byte, so that
 * the rsa-sha256 and ed25519-sha256 signatures of a message agree for
 * every verifier: the name lower-cased without white space (IS_LWSP);
 * white space skipped at the start of the value; then every run of white
 * space (isspace(), which also takes the CRLF of folding) one SP, none at
 * the end.
 */
static void canon_header(const char *p, size_t len, struct buf *b, int crlf)
{
    size_t i = 0;
    int space = 0;

    for (; i < len; i++) {
        unsigned char c = (unsigned char)p[i];
        if (IS_LWSP(c))
            continue;
        c = (unsigned char)(c < 0x80 ? tolower(c) : c);
        buf_append(b, &c, 1);
        if (c == ':') {
            i++;
            break;
        }
    }
    while (i < len && IS_LWSP(p[i]))
        i++;
    for (; i < len; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c < 0x80 && isspace(c)) {
            space = 1;
            continue;
        }
        if (space)
            buf_append(b, " ", 1);
        space = 0;
        buf_append(b, &c, 1);
    }
    if (crlf)
        buf_append(b, "\r\n", 2);
}

/* RFC 6376 section 3.4.4, relaxed body canonicalisation, hashed: WSP runs
 * become one SP, WSP at line ends and empty lines at the end go, and a
 * non-empty body ends with CRLF. */
/* Output of hash_body(), hashed in blocks. */
struct body_out {
    EVP_MD_CTX *ctx;
    int ok;
    size_t n;
    unsigned char b[16384];
};

static void body_put(struct body_out *o, const char *p, size_t n)
{
    while (n > 0) {
        size_t room = sizeof(o->b) - o->n, k = n < room ? n : room;
        memcpy(o->b + o->n, p, k);
        o->n += k;
        p += k;
        n -= k;
        if (o->n == sizeof(o->b)) {
            o->ok = o->ok && EVP_DigestUpdate(o->ctx, o->b, o->n) == 1;
            o->n = 0;
        }
    }
}

static int hash_body(const char *p, size_t len, unsigned char md[32])
{
    struct body_out *o = xcalloc(1, sizeof(*o));
    size_t empty = 0, off = 0;
    unsigned int mdlen = 0;
    int ok;

    o->ctx = EVP_MD_CTX_new();
    o->ok = o->ctx != NULL && EVP_DigestInit_ex(o->ctx, EVP_sha256(), NULL) == 1;
    while (off < len) {
        const char *eol = memchr(p + off, '\n', len - off);
        size_t end = eol ? (size_t)(eol - p) : len;
        size_t ll = end - off, i = off, stop;

        if (eol && ll > 0 && p[end - 1] == '\r')
            ll--;
        stop = off + ll;
        /* Trailing WSP of the line goes. */
        while (stop > off && IS_WSP(p[stop - 1]))
            stop--;
        if (stop == off) {
            empty++;
        } else {
            for (; empty > 0; empty--)
                body_put(o, "\r\n", 2);
            while (i < stop) {
                size_t run = i;
                while (run < stop && !IS_WSP(p[run]))
                    run++;
                body_put(o, p + i, run - i);
                if (run == stop)
                    break;
                while (IS_WSP(p[run]))
                    run++;
                body_put(o, " ", 1);
                i = run;
            }
            body_put(o, "\r\n", 2);
        }
        off = eol ? end + 1 : len;
    }
    ok = o->ok && (o->n == 0 || EVP_DigestUpdate(o->ctx, o->b, o->n) == 1) &&
         EVP_DigestFinal_ex(o->ctx, md, &mdlen) == 1 && mdlen == 32;
    EVP_MD_CTX_free(o->ctx);
    free(o);
    return ok ? 0 : -1;
}

static int in_list(char **list, const char *name, size_t len)
{
    for (size_t i = 0; list && list[i]; i++) {
        if (strlen(list[i]) == len && strncasecmp(list[i], name, len) == 0)
            return 1;
    }
    return 0;
}

/* Appends s to b, folding before s when the line would pass 78
 * characters (RFC 5322 section 2.1.1); *col tracks the line length. */
static void fold_append(struct buf *b, size_t *col, const char *s)
{
    size_t n = strlen(s);

    if (*col + 1 + n > 78) {
        buf_appends(b, "\r\n\t");
        *col = 8;
    } else {
        buf_append(b, " ", 1);
        (*col)++;
    }
    buf_append(b, s, n);
    *col += n;
}

/* An ed25519-sha256 signature (RFC 8463), appended to sigs. */
static int ed25519_sign(const struct dkim_keys *k, const struct dkim_key *key, const char *msg,
                        size_t len, struct buf *sigs, char *err, size_t errlen)
{
    struct hfield *f = NULL;
    size_t nf = 0, body, col;
    unsigned char bh[32], hh[32], sig[64];
    unsigned int hl = 0;
    size_t sl = sizeof(sig);
    struct buf hdr = BUF_INIT, hlist = BUF_INIT, canon = BUF_INIT, tag = BUF_INIT;
    char *b64bh = NULL, *b64sig = NULL;
    EVP_MD_CTX *ctx = NULL;
    int rc = -1;

    body = split_header(msg, len, &f, &nf);
    if (hash_body(msg + body, len - body, bh) != 0) {
        snprintf(err, errlen, "%s/%s (ed25519): cannot hash the body", key->domain,
                 key->selector);
        goto out;
    }

    /* h=: every signed field present, in message order, then one more of
     * each oversigned name (an instance that does not exist). */
    for (size_t i = 0; i < nf; i++) {
        if (!in_list(k->sign, f[i].p, f[i].namelen))
            continue;
        buf_appendf(&hlist, "%s%.*s", hlist.len ? ":" : "", (int)f[i].namelen, f[i].p);
    }
    for (size_t i = 0; k->oversign && k->oversign[i]; i++)
        buf_appendf(&hlist, "%s%s", hlist.len ? ":" : "", k->oversign[i]);

    /* RFC 6376 section 5.4.2: for each name of h=, the last instance not
     * yet used; a name without one contributes nothing. */
    {
        const char *p = hlist.data ? hlist.data : "";
        while (*p) {
            size_t nl = strcspn(p, ":");
            for (size_t i = nf; i-- > 0;) {
                if (!f[i].used && f[i].namelen == nl && strncasecmp(f[i].p, p, nl) == 0) {
                    f[i].used = 1;
                    canon_header(f[i].p, f[i].len, &canon, 1);
                    break;
                }
            }
            p += nl;
            if (*p == ':')
                p++;
        }
    }

    /* The DKIM-Signature field with an empty b=, last, as it will be
     * written (RFC 6376 section 3.7). */
    b64bh = b64(bh, sizeof(bh));
    buf_appends(&hdr, DKIM_SIGNHEADER ": v=1; a=ed25519-sha256; c=relaxed/relaxed;");
    col = hdr.len;
    buf_appendf(&tag, "d=%s;", key->domain);
    fold_append(&hdr, &col, tag.data);
    buf_reset(&tag);
    buf_appendf(&tag, "s=%s;", key->selector);
    fold_append(&hdr, &col, tag.data);
    buf_reset(&tag);
    buf_appendf(&tag, "t=%lld;", (long long)time(NULL));
    fold_append(&hdr, &col, tag.data);
    buf_reset(&tag);
    buf_appendf(&tag, "h=%s;", hlist.data ? hlist.data : "");
    fold_append(&hdr, &col, tag.data);
    buf_reset(&tag);
    buf_appendf(&tag, "bh=%s;", b64bh);
    fold_append(&hdr, &col, tag.data);
    fold_append(&hdr, &col, "b=");
    canon_header(hdr.data, hdr.len, &canon, 0);

    /* RFC 8463 section 3: PureEdDSA over the SHA-256 hash of the data. */
    ctx = EVP_MD_CTX_new();
    if (ctx == NULL || EVP_Digest(canon.data, canon.len, hh, &hl, EVP_sha256(), NULL) != 1 ||
        EVP_DigestSignInit(ctx, NULL, NULL, NULL, key->pkey) != 1 ||
        EVP_DigestSign(ctx, sig, &sl, hh, hl) != 1) {
        snprintf(err, errlen, "%s/%s (ed25519): OpenSSL cannot sign", key->domain,
                 key->selector);
        goto out;
    }
    b64sig = b64(sig, sl);
    /* Folded inside the value where needed: verifiers drop the whole b=
     * value, white space included (RFC 6376 section 3.5). */
    {
        size_t left = strlen(b64sig), at = 0;
        while (left > 0) {
            size_t room = col < 76 ? 76 - col : 0, n2 = left < room ? left : room;
            if (n2 == 0) {
                buf_appends(&hdr, "\r\n\t ");
                col = 9;
                continue;
            }
            buf_append(&hdr, b64sig + at, n2);
            at += n2;
            left -= n2;
            col += n2;
        }
    }
    buf_append(&hdr, "\r\n", 2);
    buf_append(sigs, hdr.data, hdr.len);
    rc = 0;
out:
    EVP_MD_CTX_free(ctx);
    free(f);
    free(b64bh);
    free(b64sig);
    buf_free(&hdr);
    buf_free(&hlist);
    buf_free(&canon);
    buf_free(&tag);
    return rc;
}

int dkim_sign_message(const struct dkim_keys *k, const char *d, const char *id,
                      const char *msg, size_t len, struct buf *out, char *err, size_t errlen)
{
    struct buf sigs = BUF_INIT;
    int signed_any = 0;

    /* Keys are sorted RSA first within a domain. */
    for (size_t i = 0; k && i < k->n; i++) {
        const struct dkim_key *key = &k->v[i];
        int rc;

        if (strcmp(key->domain, d) != 0)
            continue;
        if (key->info.alg == DKIM_ALG_ED25519)
            rc = ed25519_sign(k, key, msg, len, &sigs, err, errlen);
        else
            rc = rsa_sign(k, key, id, msg, len, &sigs, err, errlen);
        if (rc != 0) {
            buf_free(&sigs);
            return -1;
        }
        signed_any = 1;
    }
    if (!signed_any) {
        snprintf(err, errlen, "no DKIM key for %s", d);
        buf_free(&sigs);
        return -1;
    }
    buf_append(out, sigs.data, sigs.len);
    buf_free(&sigs);
    return 0;
}

static void dkim_work(uv_work_t *req)
{
    struct dkim_job *j = req->data;

    j->status = dkim_sign_message(j->keys, j->domain, j->id, j->msg, j->len, &j->sigs, j->err,
                                  sizeof(j->err));
}

static void dkim_after_work(uv_work_t *req, int status)
{
    struct dkim_job *j = req->data;
    char q[300];

    if (status != 0) {
        snprintf(j->err, sizeof(j->err), "worker: %s", uv_strerror(status));
        j->status = -1;
    }
    if (j->status == 0) {
        log_debug("id=%s event=dkim_signed domain=%s bytes=%zu us=%llu", j->id, j->domain, j->len,
                  (unsigned long long)((uv_hrtime() - j->started) / 1000));
        j->cb(0, j->sigs.data, j->sigs.len, NULL, j->arg);
    } else {
        log_error("id=%s event=dkim_error domain=%s reason=%s", j->id, j->domain,
                  log_quote(q, sizeof(q), j->err, strlen(j->err)));
        j->cb(-1, NULL, 0, j->err, j->arg);
    }
    dkim_keys_unref(j->keys);
    buf_free(&j->sigs);
    free(j);
}

int dkim_sign_async(uv_loop_t *loop, struct dkim_keys *k, const char *id, const char *env_from,
                    const char *msg, size_t len, dkim_sign_cb cb, void *arg)
{
    struct dkim_job *j;
    char d[DKIM_MAX_DOMAIN + 1], q[300];

    if (k == NULL || k->n == 0)
        return 0;
    if (!dkim_pick(k, msg, len, env_from, d, sizeof(d))) {
        log_info("id=%s event=dkim_unsigned domain=%s reason=no_key", id,
                 d[0] ? log_quote(q, sizeof(q), d, strlen(d)) : "none");
        return 0;
    }
    j = xcalloc(1, sizeof(*j));
    j->req.data = j;
    j->keys = dkim_keys_ref(k);
    snprintf(j->id, sizeof(j->id), "%s", id);
    snprintf(j->domain, sizeof(j->domain), "%s", d);
    j->msg = msg;
    j->len = len;
    j->cb = cb;
    j->arg = arg;
    j->started = uv_hrtime();
    buf_init(&j->sigs);
    uv_queue_work(loop, &j->req, dkim_work, dkim_after_work);
    return 1;
}

/* ---- key tools -------------------------------------------------------------- */

int dkim_keygen(enum dkim_alg alg, int bits, const char *path, char **record, char *err,
                size_t errlen)
{
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pkey = NULL;
    BIO *bio = NULL;
    BUF_MEM *mem = NULL;
    int fd = -1, rc = -1;
    size_t off = 0;

    *record = NULL;
    if (alg == DKIM_ALG_RSA && (bits < DKIM_RSA_MIN_BITS || bits > 8192)) {
        snprintf(err, errlen, "RSA keys have %d to 8192 bits", DKIM_RSA_MIN_BITS);
        return -1;
    }
    ctx = EVP_PKEY_CTX_new_id(alg == DKIM_ALG_ED25519 ? EVP_PKEY_ED25519 : EVP_PKEY_RSA, NULL);
    if (ctx == NULL || EVP_PKEY_keygen_init(ctx) != 1 ||
        (alg == DKIM_ALG_RSA && EVP_PKEY_CTX_set_rsa_keygen_bits(ctx, bits) != 1) ||
        EVP_PKEY_keygen(ctx, &pkey) != 1) {
        snprintf(err, errlen, "OpenSSL cannot generate the key");
        goto out;
    }
    bio = BIO_new(BIO_s_mem());
    if (bio == NULL || PEM_write_bio_PKCS8PrivateKey(bio, pkey, NULL, NULL, 0, NULL, NULL) != 1 ||
        BIO_get_mem_ptr(bio, &mem) != 1) {
        snprintf(err, errlen, "OpenSSL cannot encode the key");
        goto out;
    }
    /* O_EXCL: never overwrite a key that may be published and in use. */
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (fchmod(fd, 0600) != 0) {
        snprintf(err, errlen, "%s: chmod: %s", path, strerror(errno));
        goto out_unlink;
    }
    while (off < mem->length) {
        ssize_t w = write(fd, mem->data + off, mem->length - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            snprintf(err, errlen, "%s: write: %s", path, strerror(errno));
            goto out_unlink;
        }
        off += (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        fd = -1;
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        goto out_unlink;
    }
    fd = -1;
    *record = record_of(pkey);
    if (*record == NULL) {
        snprintf(err, errlen, "cannot derive the public key");
        goto out_unlink;
    }
    rc = 0;
    goto out;

out_unlink:
    unlink(path);
out:
    if (fd >= 0)
        close(fd);
    if (mem)
        OPENSSL_cleanse(mem->data, mem->length);
    BIO_free(bio);
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

/* A tag of a tag-list (RFC 6376 section 3.2). */
struct dkim_tag {
    char name[16];
    const char *value;
    size_t len;
};

/* Splits txt into tags; values are trimmed of surrounding white space.
 * Returns the number of tags, or -1 for a malformed list. */
static int parse_tags(const char *txt, size_t len, struct dkim_tag *tags, int max)
{
    size_t i = 0;
    int n = 0;

    while (i < len) {
        size_t ns, ne, vs, ve;

        while (i < len && isspace((unsigned char)txt[i]))
            i++;
        if (i == len)
            break;
        ns = i;
        while (i < len && (isalnum((unsigned char)txt[i]) || txt[i] == '_'))
            i++;
        ne = i;
        while (i < len && isspace((unsigned char)txt[i]))
            i++;
        if (ne == ns || i == len || txt[i] != '=' || ne - ns >= sizeof(tags[0].name) || n == max)
            return -1;
        i++;
        vs = i;
        while (i < len && txt[i] != ';')
            i++;
        ve = i;
        while (vs < ve && isspace((unsigned char)txt[vs]))
            vs++;
        while (ve > vs && isspace((unsigned char)txt[ve - 1]))
            ve--;
        memcpy(tags[n].name, txt + ns, ne - ns);
        tags[n].name[ne - ns] = '\0';
        tags[n].value = txt + vs;
        tags[n].len = ve - vs;
        n++;
        if (i < len)
            i++;   /* ';' */
    }
    return n;
}

static const struct dkim_tag *find_tag(const struct dkim_tag *tags, int n, const char *name)
{
    for (int i = 0; i < n; i++) {
        if (strcmp(tags[i].name, name) == 0)
            return &tags[i];
    }
    return NULL;
}

/* The public key of a p= value: a SubjectPublicKeyInfo (what everyone
 * publishes) or a bare RSAPublicKey (RFC 6376 section 3.6.1's wording)
 * for RSA, the raw 32 bytes for Ed25519. */
static EVP_PKEY *pubkey_of(const char *p, size_t len, enum dkim_alg alg)
{
    unsigned char *der = NULL;
    const unsigned char *q;
    long dl = unb64(p, len, &der);
    EVP_PKEY *pk = NULL;

    if (dl <= 0)
        return NULL;
    if (alg == DKIM_ALG_ED25519) {
        if (dl == 32)
            pk = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, der, 32);
    } else {
        q = der;
        pk = d2i_PUBKEY(NULL, &q, dl);
        if (pk == NULL) {
            q = der;
            pk = d2i_PublicKey(EVP_PKEY_RSA, NULL, &q, dl);
        }
    }
    free(der);
    return pk;
}

enum dkim_record_status dkim_record_check(const char *txt, size_t len,
                                          const struct dkim_key_info *key, char *why, size_t n)
{
    struct dkim_tag tags[32], mine[8];
    const struct dkim_tag *v, *k, *p, *h, *t, *mp;
    int nt = parse_tags(txt, len, tags, 32);
    int nm = parse_tags(key->record, strlen(key->record), mine, 8);
    const char *want = dkim_alg_name(key->alg);
    EVP_PKEY *theirs = NULL, *ours = NULL;
    enum dkim_record_status rc;

    if (nt <= 0) {
        snprintf(why, n, "not a DKIM key record (tag=value; list expected)");
        return DKIM_REC_SYNTAX;
    }
    v = find_tag(tags, nt, "v");
    if (v && (v != &tags[0] || v->len != 5 || strncmp(v->value, "DKIM1", 5) != 0)) {
        snprintf(why, n, "v= must be the first tag and be DKIM1");
        return DKIM_REC_SYNTAX;
    }
    p = find_tag(tags, nt, "p");
    if (p == NULL) {
        snprintf(why, n, "the record has no p= tag");
        return DKIM_REC_SYNTAX;
    }
    if (p->len == 0) {
        snprintf(why, n, "the key is revoked (empty p=)");
        return DKIM_REC_REVOKED;
    }
    k = find_tag(tags, nt, "k");
    if ((k == NULL && key->alg != DKIM_ALG_RSA) ||
        (k != NULL && (k->len != strlen(want) || strncasecmp(k->value, want, k->len) != 0))) {
        snprintf(why, n, "k=%.*s, but the private key is %s", k ? (int)k->len : 3,
                 k ? k->value : "rsa", want);
        return DKIM_REC_WRONG_TYPE;
    }
    h = find_tag(tags, nt, "h");
    if (h) {
        char hv[128];
        snprintf(hv, sizeof(hv), ":%.*s:", (int)(h->len < 120 ? h->len : 120), h->value);
        for (char *c = hv; *c; c++)
            if (isspace((unsigned char)*c))
                memmove(c, c + 1, strlen(c));
        if (strcasestr(hv, ":sha256:") == NULL) {
            snprintf(why, n, "h=%.*s does not allow sha256", (int)h->len, h->value);
            return DKIM_REC_WRONG_TYPE;
        }
    }
    mp = nm > 0 ? find_tag(mine, nm, "p") : NULL;
    theirs = pubkey_of(p->value, p->len, key->alg);
    ours = mp ? pubkey_of(mp->value, mp->len, key->alg) : NULL;
    if (theirs == NULL) {
        snprintf(why, n, "p= is not a %s public key", want);
        rc = DKIM_REC_SYNTAX;
    } else if (ours == NULL || EVP_PKEY_eq(theirs, ours) != 1) {
        snprintf(why, n, "p= holds another key than %s", key->path ? key->path : "the private key");
        rc = DKIM_REC_MISMATCH;
    } else {
        t = find_tag(tags, nt, "t");
        rc = DKIM_REC_OK;
        snprintf(why, n, "matches the private key (%s, %d bits)", want, key->bits);
        if (t) {
            for (size_t i = 0; i < t->len; i++) {
                if (t->value[i] == 'y' || t->value[i] == 'Y') {
                    rc = DKIM_REC_TESTING;
                    snprintf(why, n, "matches, but t=y marks the domain as testing DKIM");
                }
            }
        }
    }
    EVP_PKEY_free(theirs);
    EVP_PKEY_free(ours);
    return rc;
}
