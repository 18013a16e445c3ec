/*
 * users: the submission users file. See users.h for the contract.
 *
 * Users are kept in an array sorted by name and found by binary search.
 * Names are compared exactly (case matters), as SASL authentication
 * identities are (RFC 4616 section 2 leaves comparison to the server; we do
 * not fold case, so "Bob" and "bob" are two users). Sender domains are
 * folded to lower case at load and compared case-insensitively, as domains
 * are (RFC 5321 section 2.4).
 *
 * Reference counting: the count is atomic. In the gateway it is only
 * changed on the loop thread (a session takes a reference before queueing
 * the verification work and drops it in the after-work callback), but an
 * atomic count costs nothing and keeps users_ref()/users_unref() safe from
 * any thread. Everything else is immutable after users_load(), so
 * users_verify() and users_sender_allowed() may run on several threads at
 * once.
 */
#include "gateway/users.h"

#include <crypt.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/log.h"
#include "lib/xmalloc.h"

/* RFC 4616 section 2 caps the authentication identity at 255 octets. */
#define USERS_MAX_NAME 255

/*
 * The setting an unknown user's password is hashed with when the file has
 * no users, so a failed lookup costs a real crypt. It is a SHA-512-crypt
 * hash (5000 rounds, the libxcrypt default) of a random password nobody
 * knows; its output is never compared. When the file has users, the first
 * user's hash is used instead, so the dummy costs what a real user's hash
 * costs with the method and cost parameters in use.
 */
static const char users_dummy_hash[] =
    "$6$GjxkRlq2n5KbPc9Z$DPqKLhYRwCHd2SwDdbFPEBLnkClFcwbqMe2xgkVUNxhtKlLOyGv."
    "kyI40H/nKucor4lAzNxIpfgz8WIQz34Q11";

struct user {
    char *name;
    char *hash;
    char **domains;           /* lower case; empty when any */
    size_t ndomains;
    int any;                  /* "*": every sender domain and the null sender */
    int line;
};

struct users {
    atomic_uint refs;
    struct user *v;           /* sorted by name */
    size_t n;
    char *dummy;              /* setting for unknown users */
};

static void user_free(struct user *e)
{
    free(e->name);
    if (e->hash) {
        explicit_bzero(e->hash, strlen(e->hash));
        free(e->hash);
    }
    for (size_t i = 0; i < e->ndomains; i++)
        free(e->domains[i]);
    free(e->domains);
}

static void users_free(struct users *u)
{
    for (size_t i = 0; i < u->n; i++)
        user_free(&u->v[i]);
    free(u->v);
    free(u->dummy);
    free(u);
}

static int user_cmp(const void *a, const void *b)
{
    const struct user *x = a, *y = b;
    int c = strcmp(x->name, y->name);

    /* Equal names keep file order, so a duplicate is reported against the
     * line that came first. */
    return c ? c : (x->line > y->line) - (x->line < y->line);
}

/* Checks that s is a complete crypt(3) hash of a method libxcrypt enables:
 * "$id$...$" then a non-empty hash in crypt's base64 alphabet. Traditional
 * DES hashes (no '$') are refused: they use only 8 characters of a
 * password. Returns NULL when good, else the reason. */
static const char *hash_problem(const char *s, int *legacy)
{
    const char *last = strrchr(s, '$');
    int rc;

    *legacy = 0;
    if (s[0] != '$' || last == NULL || last == s)
        return "the hash must be a crypt(3) hash such as \"$y$...\" or \"$6$...\"";
    if (last[1] == '\0')
        return "the hash is only a salt, without the hashed password";
    for (const char *p = last + 1; *p; p++) {
        if (!isalnum((unsigned char)*p) && *p != '.' && *p != '/')
            return "the hash has characters crypt(3) never writes";
    }
    rc = crypt_checksalt(s);
    if (rc == CRYPT_SALT_INVALID)
        return "the hash method is unknown to crypt(3)";
    if (rc == CRYPT_SALT_METHOD_DISABLED)
        return "the hash method is disabled in libxcrypt";
    *legacy = rc == CRYPT_SALT_METHOD_LEGACY || rc == CRYPT_SALT_TOO_CHEAP;
    return NULL;
}

/* A sender domain as it may appear after '@' in MAIL FROM: no white space,
 * control characters, '@', ':', ',' or '*'; letters are stored in lower
 * case. */
static int domain_ok(const char *d)
{
    if (d[0] == '\0' || strlen(d) > 255)
        return 0;
    for (const char *p = d; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c <= ' ' || c == 0x7f || c == '@' || c == ':' || c == ',' || c == '*')
            return 0;
    }
    return 1;
}

static char *trim(char *s)
{
    size_t len;

    while (isspace((unsigned char)*s))
        s++;
    len = strlen(s);
    while (len > 0 && isspace((unsigned char)s[len - 1]))
        s[--len] = '\0';
    return s;
}

/* Parses one non-comment line into e. Returns NULL or the reason. The line
 * is modified. Reasons never quote the line, which holds a hash. */
static const char *parse_line(char *line, struct user *e, const char *path, int lineno)
{
    char *c1, *c2, *d, *next;
    const char *why;
    int legacy;

    c1 = strchr(line, ':');
    c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (c2 == NULL)
        return "expected user:hash:domain,domain";
    *c1 = '\0';
    *c2 = '\0';
    if (line[0] == '\0')
        return "the user name is empty";
    if (strlen(line) > USERS_MAX_NAME)
        return "the user name is longer than 255 bytes";
    for (const char *p = line; *p; p++) {
        if ((unsigned char)*p <= ' ' || *p == 0x7f)
            return "the user name holds white space or control characters";
    }
    why = hash_problem(c1 + 1, &legacy);
    if (why != NULL)
        return why;
    if (legacy) {
        char qpath[256], quser[128];
        log_warn("event=users_load file=%s line=%d user=%s reason=legacy_hash "
                 "hint=\"rehash with yescrypt ($y$) or SHA-512-crypt ($6$)\"",
                 log_quote(qpath, sizeof(qpath), path, strlen(path)), lineno,
                 log_quote(quser, sizeof(quser), line, strlen(line)));
    }

    e->name = xstrdup(line);
    e->hash = xstrdup(c1 + 1);
    e->line = lineno;
    for (d = c2 + 1; d != NULL; d = next) {
        next = strchr(d, ',');
        if (next)
            *next++ = '\0';
        d = trim(d);
        if (d[0] == '\0')
            return next || e->ndomains || e->any ? "empty domain in the domain list"
                                                 : "no sender domains; use * to allow any";
        if (strcmp(d, "*") == 0) {
            e->any = 1;
            continue;
        }
        if (!domain_ok(d))
            return "a domain holds white space, '@', ':' or '*'";
        for (char *p = d; *p; p++)
            *p = (char)tolower((unsigned char)*p);
        e->domains = xrealloc(e->domains, (e->ndomains + 1) * sizeof(e->domains[0]));
        e->domains[e->ndomains++] = xstrdup(d);
    }
    return NULL;
}

struct users *users_load(const char *path, char *err, size_t errlen)
{
    struct users *u = NULL;
    struct stat st;
    FILE *f = NULL;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int fd, lineno = 0;

    /* Checked on the descriptor read from, not on the name, so the file
     * cannot be swapped between the check and the read. */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        snprintf(err, errlen, "users_file %s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) < 0) {
        snprintf(err, errlen, "users_file %s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "users_file %s: not a regular file", path);
        close(fd);
        return NULL;
    }
    if ((st.st_mode & 006) != 0) {
        snprintf(err, errlen,
                 "users_file %s: readable or writable by others (mode %04o); chmod 600 or 640",
                 path, (unsigned)(st.st_mode & 07777));
        close(fd);
        return NULL;
    }
    f = fdopen(fd, "r");
    if (f == NULL) {
        snprintf(err, errlen, "users_file %s: cannot open: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }

    u = xcalloc(1, sizeof(*u));
    atomic_init(&u->refs, 1);
    while ((len = getline(&line, &cap, f)) >= 0) {
        struct user e;
        const char *why;
        char *s;

        lineno++;
        if ((size_t)len != strlen(line)) {
            snprintf(err, errlen, "users_file %s:%d: line holds a NUL byte", path, lineno);
            goto fail;
        }
        s = trim(line);
        if (s[0] == '\0' || s[0] == '#')
            continue;
        memset(&e, 0, sizeof(e));
        why = parse_line(s, &e, path, lineno);
        if (why != NULL) {
            snprintf(err, errlen, "users_file %s:%d: %s", path, lineno, why);
            user_free(&e);
            goto fail;
        }
        u->v = xrealloc(u->v, (u->n + 1) * sizeof(u->v[0]));
        u->v[u->n++] = e;
    }
    if (ferror(f)) {
        snprintf(err, errlen, "users_file %s: cannot read: %s", path, strerror(errno));
        goto fail;
    }

    /* The dummy must be chosen in file order, before sorting. */
    u->dummy = xstrdup(u->n > 0 ? u->v[0].hash : users_dummy_hash);
    if (u->n > 1)
        qsort(u->v, u->n, sizeof(u->v[0]), user_cmp);
    for (size_t i = 1; i < u->n; i++) {
        if (strcmp(u->v[i - 1].name, u->v[i].name) == 0) {
            snprintf(err, errlen, "users_file %s:%d: user %s already defined on line %d", path,
                     u->v[i].line, u->v[i].name, u->v[i - 1].line);
            goto fail;
        }
    }
    if (line) {
        explicit_bzero(line, cap);
        free(line);
    }
    fclose(f);
    return u;

fail:
    if (line) {
        explicit_bzero(line, cap);
        free(line);
    }
    fclose(f);
    users_free(u);
    return NULL;
}

struct users *users_ref(struct users *u)
{
    if (u)
        atomic_fetch_add_explicit(&u->refs, 1, memory_order_relaxed);
    return u;
}

void users_unref(struct users *u)
{
    /* acq_rel: the last owner must see every other owner's reads finished
     * before it frees (the same pattern as a shared_ptr). */
    if (u && atomic_fetch_sub_explicit(&u->refs, 1, memory_order_acq_rel) == 1)
        users_free(u);
}

static const struct user *find(const struct users *u, const char *name)
{
    size_t lo = 0, hi;

    if (u == NULL || name == NULL)
        return NULL;
    hi = u->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, u->v[mid].name);
        if (c == 0)
            return &u->v[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

int users_verify(const struct users *u, const char *user, const char *pass)
{
    const struct user *e;
    struct crypt_data *cd;
    const char *phrase, *setting, *out;
    int ok = 0;

    if (u == NULL || user == NULL)
        return 0;
    e = find(u, user);
    setting = e ? e->hash : u->dummy;
    /* crypt refuses passphrases this long; hash an empty one instead so
     * the answer takes as long as any other. */
    phrase = pass && strnlen(pass, CRYPT_MAX_PASSPHRASE_SIZE) < CRYPT_MAX_PASSPHRASE_SIZE
                 ? pass
                 : "";
    /* struct crypt_data is some 32 KiB: too big for a worker thread's
     * stack. Zeroed, as crypt_r() wants before first use. */
    cd = xcalloc(1, sizeof(*cd));
    out = crypt_r(phrase, setting, cd);
    if (e != NULL && phrase == pass && out != NULL && out[0] != '*') {
        size_t n = strlen(e->hash);
        /* The length is the method's, not a secret; the bytes are compared
         * in constant time. */
        ok = strlen(out) == n && CRYPTO_memcmp(out, e->hash, n) == 0;
    }
    /* The structure holds a copy of the password. */
    explicit_bzero(cd, sizeof(*cd));
    free(cd);
    return ok;
}

int users_sender_allowed(const struct users *u, const char *user, const char *domain)
{
    const struct user *e = find(u, user);

    if (e == NULL)
        return 0;
    if (e->any)
        return 1;
    if (domain == NULL || domain[0] == '\0')
        return 0;
    for (size_t i = 0; i < e->ndomains; i++) {
        if (strcasecmp(e->domains[i], domain) == 0)
            return 1;
    }
    return 0;
}

size_t users_count(const struct users *u)
{
    return u ? u->n : 0;
}
