/*
 * Unit tests for gateway/users.c: loading (permissions, malformed lines),
 * password verification with real libxcrypt hashes made here (yescrypt and
 * SHA-512-crypt), sender domains and reference counting.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <crypt.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gateway/users.h"

static char tmpdir[] = "/tmp/mf_test_users.XXXXXX";
static char users_path[64];
static char hash_y[CRYPT_OUTPUT_SIZE];    /* yescrypt of "alice-pw" */
static char hash_6[CRYPT_OUTPUT_SIZE];    /* SHA-512-crypt of "bob pw:$x" */
static char hash_6c[CRYPT_OUTPUT_SIZE];   /* SHA-512-crypt of "carol" */

/* Hashes pass with a fresh salt of the given method, as an operator's
 * tool (mkpasswd, openssl passwd -6) would. */
static void make_hash(const char *prefix, const char *pass, char *out)
{
    char salt[CRYPT_GENSALT_OUTPUT_SIZE];
    struct crypt_data *cd = calloc(1, sizeof(*cd));
    const char *h;

    assert_non_null(cd);
    assert_non_null(crypt_gensalt_rn(prefix, 0, NULL, 0, salt, sizeof(salt)));
    h = crypt_r(pass, salt, cd);
    assert_non_null(h);
    assert_true(h[0] == '$');
    snprintf(out, CRYPT_OUTPUT_SIZE, "%s", h);
    free(cd);
}

static int setup(void **state)
{
    (void)state;
    if (mkdtemp(tmpdir) == NULL)
        return -1;
    snprintf(users_path, sizeof(users_path), "%s/users", tmpdir);
    make_hash("$y$", "alice-pw", hash_y);
    make_hash("$6$", "bob pw:$x", hash_6);
    make_hash("$6$", "carol", hash_6c);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    unlink(users_path);
    rmdir(tmpdir);
    return 0;
}

/* Writes text to the users file with the given mode, whatever the umask. */
static void write_users(const char *text, size_t len, mode_t mode)
{
    int fd;

    unlink(users_path);
    fd = open(users_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    assert_int_equal(fchmod(fd, mode), 0);
    assert_int_equal(close(fd), 0);
}

/* Returns tmpl with every "HASH" replaced by hash_6 (caller frees). */
static char *expand(const char *tmpl)
{
    size_t hl = strlen(hash_6), n = 0, cap = strlen(tmpl) * (hl + 1) + 1;
    char *out = malloc(cap);

    assert_non_null(out);
    for (const char *p = tmpl; *p;) {
        if (strncmp(p, "HASH", 4) == 0) {
            memcpy(out + n, hash_6, hl);
            n += hl;
            p += 4;
        } else {
            out[n++] = *p++;
        }
    }
    out[n] = '\0';
    return out;
}

static struct users *load_text(const char *text, mode_t mode, char *err, size_t errlen)
{
    write_users(text, strlen(text), mode);
    return users_load(users_path, err, errlen);
}

static struct users *load_standard(void)
{
    char text[2048], err[512] = "";
    struct users *u;

    snprintf(text, sizeof(text),
             "# mailferry users\n"
             "\n"
             "alice:%s:example.com, Example.ORG\n"
             "   # indented comment\n"
             "bob:%s:bob.example\n"
             "carol:%s:*\n",
             hash_y, hash_6, hash_6c);
    u = load_text(text, 0600, err, sizeof(err));
    if (u == NULL)
        fail_msg("%s", err);
    return u;
}

static void test_verify(void **state)
{
    struct users *u = load_standard();
    char longpw[1000];

    (void)state;
    assert_int_equal(users_count(u), 3);
    assert_int_equal(users_verify(u, "alice", "alice-pw"), 1);
    assert_int_equal(users_verify(u, "bob", "bob pw:$x"), 1);
    assert_int_equal(users_verify(u, "carol", "carol"), 1);

    assert_int_equal(users_verify(u, "alice", "alice-pW"), 0);
    assert_int_equal(users_verify(u, "alice", "alice-pw "), 0);
    assert_int_equal(users_verify(u, "alice", ""), 0);
    assert_int_equal(users_verify(u, "alice", NULL), 0);
    assert_int_equal(users_verify(u, "alice", "bob pw:$x"), 0);
    assert_int_equal(users_verify(u, "bob", "alice-pw"), 0);
    /* Names are exact. */
    assert_int_equal(users_verify(u, "Alice", "alice-pw"), 0);
    assert_int_equal(users_verify(u, "alice ", "alice-pw"), 0);
    /* Unknown users never pass, whatever the password. */
    assert_int_equal(users_verify(u, "mallory", "alice-pw"), 0);
    assert_int_equal(users_verify(u, "mallory", ""), 0);
    assert_int_equal(users_verify(u, "", ""), 0);
    assert_int_equal(users_verify(u, NULL, "alice-pw"), 0);
    /* A password longer than crypt accepts is simply wrong. */
    memset(longpw, 'a', sizeof(longpw) - 1);
    longpw[sizeof(longpw) - 1] = '\0';
    assert_int_equal(users_verify(u, "alice", longpw), 0);
    assert_int_equal(users_verify(u, "mallory", longpw), 0);
    users_unref(u);
}

static void test_sender_domains(void **state)
{
    struct users *u = load_standard();

    (void)state;
    assert_int_equal(users_sender_allowed(u, "alice", "example.com"), 1);
    assert_int_equal(users_sender_allowed(u, "alice", "EXAMPLE.Com"), 1);
    assert_int_equal(users_sender_allowed(u, "alice", "example.org"), 1);
    assert_int_equal(users_sender_allowed(u, "alice", "sub.example.com"), 0);
    assert_int_equal(users_sender_allowed(u, "alice", "example.co"), 0);
    assert_int_equal(users_sender_allowed(u, "alice", "bob.example"), 0);
    assert_int_equal(users_sender_allowed(u, "alice", ""), 0);
    assert_int_equal(users_sender_allowed(u, "alice", NULL), 0);
    assert_int_equal(users_sender_allowed(u, "bob", "Bob.Example"), 1);
    assert_int_equal(users_sender_allowed(u, "bob", "example.com"), 0);
    /* "*" allows every domain and the null sender. */
    assert_int_equal(users_sender_allowed(u, "carol", "anything.example"), 1);
    assert_int_equal(users_sender_allowed(u, "carol", ""), 1);
    assert_int_equal(users_sender_allowed(u, "carol", NULL), 1);
    /* Unknown users may send nothing. */
    assert_int_equal(users_sender_allowed(u, "mallory", "example.com"), 0);
    assert_int_equal(users_sender_allowed(u, NULL, "example.com"), 0);
    users_unref(u);
}

static void test_permissions(void **state)
{
    static const struct {
        mode_t mode;
        int ok;
    } cases[] = {
        {0600, 1}, {0640, 1}, {0400, 1}, {0660, 1},
        {0644, 0}, {0604, 0}, {0602, 0}, {0601, 1}, {0666, 0},
    };
    char text[512], err[512], want[512];

    (void)state;
    snprintf(text, sizeof(text), "alice:%s:*\n", hash_y);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct users *u;
        err[0] = '\0';
        u = load_text(text, cases[i].mode, err, sizeof(err));
        if (cases[i].ok) {
            if (u == NULL)
                fail_msg("mode %04o: %s", (unsigned)cases[i].mode, err);
            users_unref(u);
            continue;
        }
        assert_null(u);
        snprintf(want, sizeof(want),
                 "users_file %s: readable or writable by others (mode %04o); chmod 600 or 640",
                 users_path, (unsigned)cases[i].mode);
        assert_string_equal(err, want);
    }
}

static void test_open_errors(void **state)
{
    char err[512], want[512], path[96];

    (void)state;
    snprintf(path, sizeof(path), "%s/absent", tmpdir);
    assert_null(users_load(path, err, sizeof(err)));
    snprintf(want, sizeof(want), "users_file %s: cannot open: %s", path, strerror(ENOENT));
    assert_string_equal(err, want);

    assert_null(users_load(tmpdir, err, sizeof(err)));
    snprintf(want, sizeof(want), "users_file %s: not a regular file", tmpdir);
    assert_string_equal(err, want);
}

struct bad_case {
    const char *text;      /* HASH stands for a valid hash */
    int line;
    const char *why;
};

static const struct bad_case bad_cases[] = {
    {"alice\n", 1, "expected user:hash:domain,domain"},
    {"alice:HASH\n", 1, "expected user:hash:domain,domain"},
    {":HASH:a.example\n", 1, "the user name is empty"},
    {"al ice:HASH:a.example\n", 1, "the user name holds white space or control characters"},
    {"al\tice:HASH:a.example\n", 1, "the user name holds white space or control characters"},
    {"alice:secret:a.example\n", 1,
     "the hash must be a crypt(3) hash such as \"$y$...\" or \"$6$...\""},
    {"alice::a.example\n", 1, "the hash must be a crypt(3) hash such as \"$y$...\" or \"$6$...\""},
    /* A traditional DES hash uses only 8 characters of a password. */
    {"alice:abJnggxhB/yWI:a.example\n", 1,
     "the hash must be a crypt(3) hash such as \"$y$...\" or \"$6$...\""},
    {"alice:$6$saltsalt$:a.example\n", 1, "the hash is only a salt, without the hashed password"},
    {"alice:$6$saltsalt$ab c:a.example\n", 1, "the hash has characters crypt(3) never writes"},
    {"alice:$9$salt$abc:a.example\n", 1, "the hash method is unknown to crypt(3)"},
    {"alice:HASH:\n", 1, "no sender domains; use * to allow any"},
    {"alice:HASH:  \n", 1, "no sender domains; use * to allow any"},
    {"alice:HASH:a.example,,b.example\n", 1, "empty domain in the domain list"},
    {"alice:HASH:a.example,\n", 1, "empty domain in the domain list"},
    {"alice:HASH:*,\n", 1, "empty domain in the domain list"},
    {"alice:HASH:a b.example\n", 1, "a domain holds white space, '@', ':' or '*'"},
    {"alice:HASH:user@a.example\n", 1, "a domain holds white space, '@', ':' or '*'"},
    {"alice:HASH:*.example\n", 1, "a domain holds white space, '@', ':' or '*'"},
    {"alice:HASH:a.example:b.example\n", 1, "a domain holds white space, '@', ':' or '*'"},
    /* Line numbers count comments and blank lines. */
    {"# users\n\nalice:HASH:a.example\nbob\n", 4, "expected user:hash:domain,domain"},
    {"alice:HASH:a.example\nbob:HASH:b.example\nalice:HASH:c.example\n", 3,
     "user alice already defined on line 1"},
};

static void test_malformed(void **state)
{
    char err[512], want[640];

    (void)state;
    for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
        char *text = expand(bad_cases[i].text);
        struct users *u;

        err[0] = '\0';
        u = load_text(text, 0600, err, sizeof(err));
        if (u != NULL)
            fail_msg("accepted: %s", bad_cases[i].text);
        snprintf(want, sizeof(want), "users_file %s:%d: %s", users_path, bad_cases[i].line,
                 bad_cases[i].why);
        assert_string_equal(err, want);
        /* The hash never appears in a message. */
        assert_null(strstr(err, hash_6));
        free(text);
    }

    /* A NUL byte inside a line. */
    {
        static const char nul[] = "alice:$6$x\0y:a.example\n";
        write_users(nul, sizeof(nul) - 1, 0600);
        assert_null(users_load(users_path, err, sizeof(err)));
        snprintf(want, sizeof(want), "users_file %s:1: line holds a NUL byte", users_path);
        assert_string_equal(err, want);
    }

    /* A user name longer than RFC 4616 allows. */
    {
        char name[300], *text, tmpl[400];
        memset(name, 'n', 256);
        name[256] = '\0';
        snprintf(tmpl, sizeof(tmpl), "%s:HASH:*\n", name);
        text = expand(tmpl);
        assert_null(load_text(text, 0600, err, sizeof(err)));
        snprintf(want, sizeof(want), "users_file %s:1: the user name is longer than 255 bytes",
                 users_path);
        assert_string_equal(err, want);
        free(text);
        /* 255 bytes are fine. */
        name[255] = '\0';
        snprintf(tmpl, sizeof(tmpl), "%s:HASH:*\n", name);
        text = expand(tmpl);
        struct users *u = load_text(text, 0600, err, sizeof(err));
        assert_non_null(u);
        assert_int_equal(users_sender_allowed(u, name, "x.example"), 1);
        users_unref(u);
        free(text);
    }
}

static void test_layout(void **state)
{
    char *text;
    char err[512] = "";
    struct users *u;

    (void)state;
    /* CRLF, surrounding blanks, a last line without newline. */
    text = expand("# c\r\n\r\n  alice:HASH: a.example , b.example \r\n\tbob:HASH:*");
    u = load_text(text, 0640, err, sizeof(err));
    if (u == NULL)
        fail_msg("%s", err);
    assert_int_equal(users_count(u), 2);
    assert_int_equal(users_verify(u, "alice", "bob pw:$x"), 1);
    assert_int_equal(users_sender_allowed(u, "alice", "b.example"), 1);
    assert_int_equal(users_sender_allowed(u, "bob", "z.example"), 1);
    users_unref(u);
    free(text);

    /* An empty file is valid and knows nobody. */
    u = load_text("", 0600, err, sizeof(err));
    assert_non_null(u);
    assert_int_equal(users_count(u), 0);
    assert_int_equal(users_verify(u, "alice", "alice-pw"), 0);
    assert_int_equal(users_sender_allowed(u, "alice", "a.example"), 0);
    users_unref(u);

    /* Many users are found by name in any order. */
    {
        size_t cap = 64 * 1024, n = 0;
        char *big = malloc(cap);
        assert_non_null(big);
        for (int i = 199; i >= 0; i--)
            n += (size_t)snprintf(big + n, cap - n, "user%03d:%s:d%d.example\n", i, hash_6c, i);
        u = load_text(big, 0600, err, sizeof(err));
        assert_non_null(u);
        assert_int_equal(users_count(u), 200);
        for (int i = 0; i < 200; i++) {
            char name[16], dom[32];
            snprintf(name, sizeof(name), "user%03d", i);
            snprintf(dom, sizeof(dom), "D%d.example", i);
            assert_int_equal(users_sender_allowed(u, name, dom), 1);
            snprintf(dom, sizeof(dom), "d%d.example", i + 1);
            assert_int_equal(users_sender_allowed(u, name, dom), 0);
        }
        assert_int_equal(users_verify(u, "user123", "carol"), 1);
        assert_int_equal(users_verify(u, "user200", "carol"), 0);
        users_unref(u);
        free(big);
    }
}

/* A legacy method (MD5-crypt) still verifies; it is only warned about. */
static void test_legacy_hash(void **state)
{
    struct crypt_data *cd = calloc(1, sizeof(*cd));
    char text[512], err[512] = "";
    const char *h;
    struct users *u;

    (void)state;
    assert_non_null(cd);
    h = crypt_r("old-pw", "$1$abcdefgh$", cd);
    if (h == NULL || h[0] != '$') {
        free(cd);
        skip();
    }
    snprintf(text, sizeof(text), "old:%s:old.example\n", h);
    free(cd);
    u = load_text(text, 0600, err, sizeof(err));
    if (u == NULL)
        fail_msg("%s", err);
    assert_int_equal(users_verify(u, "old", "old-pw"), 1);
    assert_int_equal(users_verify(u, "old", "new-pw"), 0);
    users_unref(u);
}

static void test_refcount(void **state)
{
    struct users *u = load_standard();

    (void)state;
    assert_ptr_equal(users_ref(u), u);
    assert_ptr_equal(users_ref(u), u);
    users_unref(u);
    users_unref(u);
    /* Still alive: one reference left. */
    assert_int_equal(users_verify(u, "alice", "alice-pw"), 1);
    users_unref(u);
    assert_null(users_ref(NULL));
    users_unref(NULL);
    assert_int_equal(users_count(NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_verify),
        cmocka_unit_test(test_sender_domains),
        cmocka_unit_test(test_permissions),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_legacy_hash),
        cmocka_unit_test(test_refcount),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
