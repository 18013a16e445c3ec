/*
 * Unit tests for gateway/dkim.c.
 *
 *   - the From: domain parser, table-driven (display names, comments,
 *     quoted strings, groups, folding, obsolete spacing, no From:);
 *   - key generation (mode 0600, never overwriting) and the record;
 *   - key loading from keys_dir and key_table, and every refusal: group-
 *     or world-readable files, wrong key type, bad names, a selector with
 *     two keys, short RSA keys;
 *   - the signing domain (From:, parent domain, envelope fallback);
 *   - signatures checked by libopendkim's own verifier with its file
 *     query method (the integration tests use independent verifiers):
 *     rsa-sha256 and ed25519-sha256 on one message, relaxed/relaxed,
 *     From oversigned, CRLF line ends; a changed body fails;
 *   - published records compared with private keys;
 *   - signing on the threadpool with dkim_sign_async().
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <opendkim/dkim.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <uv.h>

#include "gateway/dkim.h"
#include "lib/buf.h"
#include "lib/config.h"
#include "lib/log.h"
#include "lib/xmalloc.h"

static char tmpdir[] = "/tmp/mf_test_dkim.XXXXXX";
static char keydir[128];
/* Keys made once for the whole run (RSA generation takes a while). */
static char rsa_path[256], ed_path[256], rsa2_path[256];
static char *rsa_record, *ed_record, *rsa2_record;

#define SIGN_HEADERS                                                                        \
    "From,Sender,Reply-To,Subject,Date,Message-ID,To,Cc,In-Reply-To,References,MIME-Version," \
    "Content-Type,Content-Transfer-Encoding,List-Id,List-Unsubscribe,List-Unsubscribe-Post"

static void config_for(struct mf_config *cfg, const char *dir, const char *table)
{
    memset(cfg, 0, sizeof(*cfg));
    cfg->dkim.enabled = 1;
    cfg->dkim.keys_dir = (char *)dir;
    cfg->dkim.key_table = (char *)table;
    cfg->dkim.sign_headers = SIGN_HEADERS;
    cfg->dkim.oversign_headers = "From,Reply-To,Subject,Date,To,Cc";
}

static void write_text(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    assert_int_equal(fchmod(fd, mode), 0);
    close(fd);
}

static void copy_file(const char *from, const char *to, mode_t mode)
{
    char buf[16384];
    int in = open(from, O_RDONLY), out;
    ssize_t n;

    assert_true(in >= 0);
    n = read(in, buf, sizeof(buf) - 1);
    assert_true(n > 0);
    buf[n] = '\0';
    close(in);
    unlink(to);
    out = open(to, O_WRONLY | O_CREAT | O_EXCL, mode);
    assert_true(out >= 0);
    assert_int_equal(write(out, buf, (size_t)n), n);
    assert_int_equal(fchmod(out, mode), 0);
    close(out);
}

static int setup(void **state)
{
    char err[512];

    (void)state;
    assert_non_null(mkdtemp(tmpdir));
    snprintf(keydir, sizeof(keydir), "%s/keys", tmpdir);
    assert_int_equal(mkdir(keydir, 0700), 0);
    snprintf(rsa_path, sizeof(rsa_path), "%s/example.test.mf1.rsa.key", keydir);
    snprintf(ed_path, sizeof(ed_path), "%s/example.test.mf2.ed25519.key", keydir);
    snprintf(rsa2_path, sizeof(rsa2_path), "%s/other-rsa.pem", tmpdir);
    if (dkim_keygen(DKIM_ALG_RSA, 2048, rsa_path, &rsa_record, err, sizeof(err)) != 0 ||
        dkim_keygen(DKIM_ALG_ED25519, 0, ed_path, &ed_record, err, sizeof(err)) != 0 ||
        dkim_keygen(DKIM_ALG_RSA, 1024, rsa2_path, &rsa2_record, err, sizeof(err)) != 0) {
        fprintf(stderr, "keygen: %s\n", err);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    char cmd[256];

    (void)state;
    free(rsa_record);
    free(ed_record);
    free(rsa2_record);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

/* ---- From: domain --------------------------------------------------------- */

struct from_case {
    const char *msg;
    const char *want;        /* NULL: -1 expected */
};

static const struct from_case from_cases[] = {
    {"From: a@example.com\r\n\r\nbody\r\n", "example.com"},
    {"From: Alice <alice@Example.COM>\r\n\r\n", "example.com"},
    {"Subject: x\r\nFROM:bob@b.example\r\n\r\n", "b.example"},
    {"From : obs@obs.example\r\n\r\n", "obs.example"},
    {"From: \"Doe, John <x@evil.example>\" <john@good.example>\r\n\r\n", "good.example"},
    {"From: (comment with @evil.example) carol@c.example (another)\r\n\r\n", "c.example"},
    {"From: \"quoted@local\"@q.example\r\n\r\n", "q.example"},
    {"From: Team: one@g1.example, two@g2.example;\r\n\r\n", "g1.example"},
    {"From: first@m1.example, Second <second@m2.example>\r\n\r\n", "m1.example"},
    {"From: Very Long Display\r\n Name Folded\r\n\t<folded@f.example>\r\n\r\n", "f.example"},
    {"From:\r\n <next-line@n.example>\r\n\r\n", "n.example"},
    {"From: dot@trailing.example.\r\n\r\n", "trailing.example"},
    {"From: <@route.example:user@real.example>\r\n\r\n", "real.example"},
    {"From: =?utf-8?q?J=C3=B6rg?= <joerg@utf.example>\r\n\r\n", "utf.example"},
    {"From: a@first.example\r\nFrom: b@second.example\r\n\r\n", "first.example"},
    {"From: bare@lf.example\n\nbody\n", "lf.example"},
    {"From: no-body@only.example\r\n", "only.example"},
    {"From: literal@[192.0.2.1]\r\n\r\n", NULL},
    {"From: Undisclosed recipients:;\r\n\r\n", NULL},
    {"From: no-at-sign\r\n\r\n", NULL},
    {"From: <>\r\n\r\n", NULL},
    {"Sender: s@s.example\r\n\r\n", NULL},
    {"From-Address: x@x.example\r\n\r\n", NULL},
    {"Subject: hi\r\n\r\nFrom: body@body.example\r\n", NULL},
    {"", NULL},
};

static void test_from_domain(void **state)
{
    char out[256];

    (void)state;
    for (size_t i = 0; i < sizeof(from_cases) / sizeof(from_cases[0]); i++) {
        const struct from_case *c = &from_cases[i];
        int rc = dkim_from_domain(c->msg, strlen(c->msg), out, sizeof(out));
        if (c->want == NULL) {
            if (rc != -1)
                fail_msg("case %zu: want -1, got %s", i, out);
            continue;
        }
        if (rc != 0)
            fail_msg("case %zu: want %s, got -1", i, c->want);
        assert_string_equal(out, c->want);
    }
    /* Too small an output buffer fails. */
    assert_int_equal(dkim_from_domain(from_cases[0].msg, strlen(from_cases[0].msg), out, 5), -1);
}

/* ---- keygen and loading ----------------------------------------------------- */

static void test_keygen(void **state)
{
    struct stat st;
    char *rec = NULL, err[512];

    (void)state;
    assert_int_equal(stat(rsa_path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_int_equal(stat(ed_path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);
    assert_true(strncmp(rsa_record, "v=DKIM1; k=rsa; p=MIIBIjAN", 26) == 0);
    /* RFC 8463 section 4: the raw 32-byte key, 44 base64 characters. */
    assert_true(strncmp(ed_record, "v=DKIM1; k=ed25519; p=", 22) == 0);
    assert_int_equal(strlen(ed_record + 22), 44);
    /* Never overwrites. */
    assert_int_equal(dkim_keygen(DKIM_ALG_ED25519, 0, ed_path, &rec, err, sizeof(err)), -1);
    assert_null(rec);
    assert_non_null(strstr(err, "File exists"));
    assert_int_equal(dkim_keygen(DKIM_ALG_RSA, 512, "/nonexistent/x", &rec, err, sizeof(err)),
                     -1);
    assert_non_null(strstr(err, "bits"));
}

static void test_load_dir_and_table(void **state)
{
    struct mf_config cfg;
    struct dkim_keys *k;
    const struct dkim_key_info *ki;
    char table[256], err[512], text[1024], notes[256];

    (void)state;
    snprintf(notes, sizeof(notes), "%s/README", keydir);
    write_text(notes, "not a key\n", 0644);
    snprintf(table, sizeof(table), "%s/keytable", tmpdir);
    snprintf(text, sizeof(text),
             "# domain selector type path\n"
             "\n"
             "Other.Example  sel.2024  rsa  %s   # dotted selector\n",
             rsa2_path);
    write_text(table, text, 0644);
    config_for(&cfg, keydir, table);
    k = dkim_keys_load(&cfg, err, sizeof(err));
    if (k == NULL)
        fail_msg("%s", err);
    assert_int_equal(dkim_keys_count(k), 3);
    ki = dkim_keys_get(k, 0);
    assert_string_equal(ki->domain, "example.test");
    assert_string_equal(ki->selector, "mf1");
    assert_int_equal(ki->alg, DKIM_ALG_RSA);
    assert_int_equal(ki->bits, 2048);
    assert_string_equal(ki->record, rsa_record);
    ki = dkim_keys_get(k, 1);
    assert_string_equal(ki->selector, "mf2");
    assert_int_equal(ki->alg, DKIM_ALG_ED25519);
    assert_string_equal(ki->record, ed_record);
    ki = dkim_keys_get(k, 2);
    assert_string_equal(ki->domain, "other.example");
    assert_string_equal(ki->selector, "sel.2024");
    assert_int_equal(ki->bits, 1024);
    assert_null(dkim_keys_get(k, 3));

    /* The signing domain: the domain, else its nearest parent with keys,
     * never a bare top-level domain. */
    assert_string_equal(dkim_keys_signer(k, "example.test"), "example.test");
    assert_string_equal(dkim_keys_signer(k, "news.mail.example.test"), "example.test");
    assert_null(dkim_keys_signer(k, "test"));
    assert_null(dkim_keys_signer(k, "unknown.example"));
    assert_null(dkim_keys_signer(k, "xexample.test"));

    /* References keep the set alive. */
    dkim_keys_ref(k);
    dkim_keys_unref(k);
    assert_int_equal(dkim_keys_count(k), 3);
    dkim_keys_unref(k);
    unlink(notes);

    /* Disabled, or nothing configured: an empty set. */
    cfg.dkim.enabled = 0;
    k = dkim_keys_load(&cfg, err, sizeof(err));
    assert_non_null(k);
    assert_int_equal(dkim_keys_count(k), 0);
    dkim_keys_unref(k);
    config_for(&cfg, NULL, NULL);
    k = dkim_keys_load(&cfg, err, sizeof(err));
    assert_non_null(k);
    assert_int_equal(dkim_keys_count(k), 0);
    dkim_keys_unref(k);
}

struct refuse_case {
    const char *file;        /* name in a fresh keys_dir */
    const char *source;      /* "rsa", "ed", "rsa1024", "junk" */
    mode_t mode;
    const char *want;        /* substring of the error */
};

static const struct refuse_case refuse_cases[] = {
    {"d.example.s.rsa.key", "rsa", 0640, "readable or writable by group or others (mode 0640)"},
    {"d.example.s.rsa.key", "rsa", 0604, "chmod 600"},
    {"d.example.s.rsa.key", "ed", 0600, "named rsa, but holds another kind of key"},
    {"d.example.s.ed25519.key", "rsa", 0600, "named ed25519, but holds another kind of key"},
    {"d.example.s.rsa.key", "junk", 0600, "not an unencrypted PEM private key"},
    {"nodot.rsa.key", "rsa", 0600, "expected <domain>.<selector>.rsa.key"},
    {"bad_-.example.s.rsa.key", "rsa", 0600, "expected <domain>.<selector>.rsa.key"},
};

static void test_load_refusals(void **state)
{
    struct mf_config cfg;
    char dir[256], path[512], err[512], table[256], text[1024];

    (void)state;
    snprintf(dir, sizeof(dir), "%s/refuse", tmpdir);
    for (size_t i = 0; i < sizeof(refuse_cases) / sizeof(refuse_cases[0]); i++) {
        const struct refuse_case *c = &refuse_cases[i];
        char cmd[300];

        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        assert_int_equal(system(cmd), 0);
        assert_int_equal(mkdir(dir, 0700), 0);
        snprintf(path, sizeof(path), "%s/%s", dir, c->file);
        if (strcmp(c->source, "junk") == 0)
            write_text(path, "-----BEGIN PRIVATE KEY-----\nnot base64\n", c->mode);
        else
            copy_file(strcmp(c->source, "ed") == 0 ? ed_path : rsa_path, path, c->mode);
        config_for(&cfg, dir, NULL);
        if (dkim_keys_load(&cfg, err, sizeof(err)) != NULL)
            fail_msg("case %zu: loaded", i);
        if (strstr(err, c->want) == NULL)
            fail_msg("case %zu: error \"%s\" lacks \"%s\"", i, err, c->want);
    }

    /* One selector with two keys. */
    snprintf(table, sizeof(table), "%s/dup", tmpdir);
    snprintf(text, sizeof(text), "example.test mf1 ed25519 %s\n", ed_path);
    write_text(table, text, 0600);
    config_for(&cfg, keydir, table);
    assert_null(dkim_keys_load(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "selector mf1 of example.test has two keys"));

    /* Table syntax errors name the line. */
    write_text(table, "# keys\nexample.test mf9 rsa\n", 0600);
    config_for(&cfg, NULL, table);
    assert_null(dkim_keys_load(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "dup:2: expected \"domain selector rsa|ed25519 path\""));
    write_text(table, "example.test mf9 dsa /x\n", 0600);
    assert_null(dkim_keys_load(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "dup:1: key type must be rsa or ed25519"));
    snprintf(text, sizeof(text), "example.test mf9 rsa %s/missing.pem\n", tmpdir);
    write_text(table, text, 0600);
    assert_null(dkim_keys_load(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "cannot open: No such file or directory (" ));
    assert_non_null(strstr(err, "dup:1)"));
    config_for(&cfg, "/nonexistent/keys", NULL);
    assert_null(dkim_keys_load(&cfg, err, sizeof(err)));
    assert_non_null(strstr(err, "[dkim] keys_dir /nonexistent/keys"));
}

/* ---- signing -------------------------------------------------------------- */

static struct dkim_keys *load_main(void)
{
    struct mf_config cfg;
    char err[512];
    struct dkim_keys *k;

    config_for(&cfg, keydir, NULL);
    k = dkim_keys_load(&cfg, err, sizeof(err));
    if (k == NULL)
        fail_msg("%s", err);
    return k;
}

static void test_pick(void **state)
{
    struct dkim_keys *k = load_main();
    char d[256];
    const char *msg = "From: News <news@mail.example.test>\r\nSubject: x\r\n\r\nhi\r\n";
    const char *other = "From: x@elsewhere.example\r\n\r\nhi\r\n";
    const char *none = "Subject: no from\r\n\r\nhi\r\n";

    (void)state;
    assert_int_equal(dkim_pick(k, msg, strlen(msg), "bounce@unrelated.example", d, sizeof(d)), 1);
    assert_string_equal(d, "example.test");
    /* No key for the From: domain: the envelope sender's. */
    assert_int_equal(dkim_pick(k, other, strlen(other), "b@example.test", d, sizeof(d)), 1);
    assert_string_equal(d, "example.test");
    assert_int_equal(dkim_pick(k, none, strlen(none), "b@Example.Test", d, sizeof(d)), 1);
    assert_string_equal(d, "example.test");
    /* Neither: not signed; d names the domain looked for. */
    assert_int_equal(dkim_pick(k, other, strlen(other), "", d, sizeof(d)), 0);
    assert_string_equal(d, "elsewhere.example");
    assert_int_equal(dkim_pick(k, none, strlen(none), "", d, sizeof(d)), 0);
    assert_string_equal(d, "");
    dkim_keys_unref(k);
}

/* Verifies msg with libopendkim, keys from a query file; returns the
 * number of good signatures, and of bad ones in *bad. */
static int verify(const char *msg, size_t len, int *bad)
{
    char qfile[256], text[2048];
    DKIM_LIB *lib = dkim_init(NULL, NULL);
    dkim_query_t qtype = DKIM_QUERY_FILE;
    DKIM_STAT st;
    DKIM *h;
    DKIM_SIGINFO **sigs;
    int nsigs = 0, good = 0;

    assert_non_null(lib);
    snprintf(qfile, sizeof(qfile), "%s/keys.query", tmpdir);
    snprintf(text, sizeof(text), "mf1._domainkey.example.test %s\nmf2._domainkey.example.test %s\n",
             rsa_record, ed_record);
    write_text(qfile, text, 0600);
    assert_int_equal(dkim_options(lib, DKIM_OP_SETOPT, DKIM_OPTS_QUERYMETHOD, &qtype,
                                  sizeof(qtype)), DKIM_STAT_OK);
    assert_int_equal(dkim_options(lib, DKIM_OP_SETOPT, DKIM_OPTS_QUERYINFO, qfile,
                                  strlen(qfile)), DKIM_STAT_OK);
    h = dkim_verify(lib, (const unsigned char *)"test", NULL, &st);
    assert_non_null(h);
    dkim_chunk(h, (unsigned char *)msg, len);
    /* libopendkim wants the last line ended; relaxed canonicalisation
     * adds the CRLF anyway. */
    if (len > 0 && msg[len - 1] != '\n')
        dkim_chunk(h, (unsigned char *)"\r\n", 2);
    dkim_chunk(h, NULL, 0);
    dkim_eom(h, NULL);
    *bad = 0;
    if (dkim_getsiglist(h, &sigs, &nsigs) == DKIM_STAT_OK) {
        for (int i = 0; i < nsigs; i++) {
            if (DKIM_SIG_CHECK(sigs[i]))
                good++;
            else
                (*bad)++;
        }
    }
    dkim_free(h);
    dkim_close(lib);
    return good;
}

static const char test_msg[] =
    "From: Sender <sender@example.test>\r\n"
    "To: rcpt@dest.example\r\n"
    "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and a long subject line that goes on and on\r\n"
    " and is folded onto a second line\r\n"
    "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    "Message-ID: <m1@example.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Gr\xc3\xbc\xc3\x9f" "e aus K\xc3\xb6ln.   Trailing spaces   \r\n"
    "\r\n"
    "\r\n";

static void test_sign_and_verify(void **state)
{
    struct dkim_keys *k = load_main();
    struct buf out = BUF_INIT, msg = BUF_INIT;
    char err[512];
    const char *p, *second;
    int bad, good;

    (void)state;
    assert_int_equal(dkim_sign_message(k, "example.test", "q1", test_msg, strlen(test_msg), &out,
                                       err, sizeof(err)), 0);
    /* Two fields, RSA first, each CRLF-terminated with no bare LF. */
    assert_true(strncmp(out.data, "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;", 53) ==
                0);
    second = strstr(out.data + 1, "\r\nDKIM-Signature: ");
    assert_non_null(second);
    assert_non_null(strstr(second, "a=ed25519-sha256"));
    assert_non_null(strstr(out.data, "d=example.test"));
    assert_non_null(strstr(out.data, "s=mf1"));
    assert_non_null(strstr(second, "s=mf2"));
    for (p = out.data; (p = strchr(p, '\n')) != NULL; p++)
        assert_true(p > out.data && p[-1] == '\r');
    assert_true(out.len > 2 && out.data[out.len - 2] == '\r' && out.data[out.len - 1] == '\n');
    /* From is oversigned: it appears twice in h=, once in the message. */
    {
        struct buf unf = BUF_INIT;
        const char *h;
        int froms = 0;
        for (size_t i = 0; i < out.len; i++) {
            if (out.data[i] == '\r' && i + 2 < out.len && out.data[i + 1] == '\n' &&
                (out.data[i + 2] == ' ' || out.data[i + 2] == '\t'))
                i += 2;
            else
                buf_append(&unf, &out.data[i], 1);
        }
        /* The h= tag, not the end of bh=. */
        for (h = strstr(unf.data, "h="); h && h > unf.data && h[-1] == 'b'; h = strstr(h + 1, "h="))
            ;
        assert_non_null(h);
        for (const char *f = h; (f = strcasestr(f, "from")) != NULL && f < strchr(h, ';'); f++)
            froms++;
        assert_int_equal(froms, 2);
        buf_free(&unf);
    }

    buf_append(&msg, out.data, out.len);
    buf_appends(&msg, test_msg);
    good = verify(msg.data, msg.len, &bad);
    assert_int_equal(good, 2);
    assert_int_equal(bad, 0);

    /* A changed body fails both signatures. */
    p = strstr(msg.data, "K\xc3\xb6ln");
    assert_non_null(p);
    msg.data[p - msg.data] = 'X';
    good = verify(msg.data, msg.len, &bad);
    assert_int_equal(good, 0);
    assert_int_equal(bad, 2);

    /* A domain without a key signs nothing and says so. */
    buf_reset(&out);
    assert_int_equal(dkim_sign_message(k, "other.example", "q2", test_msg, strlen(test_msg),
                                       &out, err, sizeof(err)), -1);
    assert_int_equal(out.len, 0);
    assert_non_null(strstr(err, "no DKIM key for other.example"));
    buf_free(&out);
    buf_free(&msg);
    dkim_keys_unref(k);
}

/* A multipart message and a header longer than libopendkim's 4096-byte
 * header cache, signed and verified. */
static void test_sign_long_and_multipart(void **state)
{
    struct dkim_keys *k = load_main();
    struct buf m = BUF_INIT, out = BUF_INIT;
    char err[512];
    int bad;

    (void)state;
    buf_appends(&m, "From: sender@example.test\r\nTo: r@dest.example\r\nReferences:");
    for (int i = 0; i < 200; i++)
        buf_appendf(&m, "\r\n <reference-%d@some.long.host.name.example>", i);
    buf_appends(&m, "\r\nSubject: multipart\r\nMIME-Version: 1.0\r\n"
                    "Content-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n"
                    "preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
                    "--b1\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--b1--\r\n");
    assert_true(m.len > 8000);
    assert_int_equal(dkim_sign_message(k, "example.test", "q3", m.data, m.len, &out, err,
                                       sizeof(err)), 0);
    buf_append(&out, m.data, m.len);
    assert_int_equal(verify(out.data, out.len, &bad), 2);
    assert_int_equal(bad, 0);
    buf_free(&m);
    buf_free(&out);
    dkim_keys_unref(k);
}

/* Canonicalisation corner cases (RFC 6376 sections 3.4.2 and 3.4.4),
 * each signed by both keys and checked by libopendkim's verifier. */
static const char *const edge_msgs[] = {
    /* Empty body, and no body at all. */
    "From: a@example.test\r\nSubject: empty\r\n\r\n",
    "From: a@example.test\r\nSubject: no separator\r\n",
    /* Trailing white space, inner runs of WSP, empty lines at the end. */
    "From: a@example.test\r\n\r\nline \t with\t\truns   \r\n \t\r\n\r\n\r\n\r\n",
    /* No CRLF after the last line. */
    "From: a@example.test\r\n\r\nfirst\r\n\r\nlast line without end",
    /* Only empty lines. */
    "From: a@example.test\r\n\r\n\r\n\r\n",
    /* Names in other cases, WSP before the colon, tabs, folding, and two
     * To fields (picked bottom-up). */
    ("FROM :  a@example.test  \r\nsubject:\tfolded\r\n\t  value \t \r\n  more\r\n"
     "To: one@dest.example\r\nTo: two@dest.example\r\nX-Unsigned: x\r\n\r\nbody\r\n"),
    /* A header field with an empty value. */
    "From: a@example.test\r\nSubject:\r\nCc:   \r\n\r\nx\r\n",
};

static void test_sign_edge_cases(void **state)
{
    struct dkim_keys *k = load_main();
    char err[512];
    int bad;

    (void)state;
    for (size_t i = 0; i < sizeof(edge_msgs) / sizeof(edge_msgs[0]); i++) {
        struct buf out = BUF_INIT;
        int good;
        if (dkim_sign_message(k, "example.test", "edge", edge_msgs[i], strlen(edge_msgs[i]),
                              &out, err, sizeof(err)) != 0)
            fail_msg("case %zu: %s", i, err);
        buf_appends(&out, edge_msgs[i]);
        good = verify(out.data, out.len, &bad);
        if (good != 2 || bad != 0)
            fail_msg("case %zu: %d good, %d bad signatures:\n%s", i, good, bad, out.data);
        buf_free(&out);
    }
    dkim_keys_unref(k);
}

/* ---- records ------------------------------------------------------------ */

static void test_record_check(void **state)
{
    struct dkim_keys *k = load_main();
    const struct dkim_key_info *rsa = dkim_keys_get(k, 0), *ed = dkim_keys_get(k, 1);
    char why[256], rec[2048];
    const char *p = strstr(rsa_record, "p=") + 2;

    (void)state;
    assert_int_equal(dkim_record_check(rsa_record, strlen(rsa_record), rsa, why, sizeof(why)),
                     DKIM_REC_OK);
    assert_int_equal(dkim_record_check(ed_record, strlen(ed_record), ed, why, sizeof(why)),
                     DKIM_REC_OK);
    /* Without v= and k= (RSA is the default), with spaces inside p=. */
    snprintf(rec, sizeof(rec), "p=%.100s %.100s  %s", p, p + 100, p + 200);
    assert_int_equal(dkim_record_check(rec, strlen(rec), rsa, why, sizeof(why)), DKIM_REC_OK);
    snprintf(rec, sizeof(rec), "v=DKIM1; h=sha1:sha256; t=y; p=%s", p);
    assert_int_equal(dkim_record_check(rec, strlen(rec), rsa, why, sizeof(why)),
                     DKIM_REC_TESTING);
    /* Another key. */
    assert_int_equal(dkim_record_check(rsa2_record, strlen(rsa2_record), rsa, why, sizeof(why)),
                     DKIM_REC_MISMATCH);
    assert_non_null(strstr(why, "another key"));
    assert_int_equal(dkim_record_check(rsa_record, strlen(rsa_record), ed, why, sizeof(why)),
                     DKIM_REC_WRONG_TYPE);
    snprintf(rec, sizeof(rec), "v=DKIM1; h=sha1; p=%s", p);
    assert_int_equal(dkim_record_check(rec, strlen(rec), rsa, why, sizeof(why)),
                     DKIM_REC_WRONG_TYPE);
    assert_int_equal(dkim_record_check("v=DKIM1; k=rsa; p=", 18, rsa, why, sizeof(why)),
                     DKIM_REC_REVOKED);
    assert_int_equal(dkim_record_check("v=spf1 -all", 11, rsa, why, sizeof(why)),
                     DKIM_REC_SYNTAX);
    assert_int_equal(dkim_record_check("k=rsa; v=DKIM1; p=AAAA", 22, rsa, why, sizeof(why)),
                     DKIM_REC_SYNTAX);
    assert_int_equal(dkim_record_check("v=DKIM1; p=!!!!", 15, rsa, why, sizeof(why)),
                     DKIM_REC_SYNTAX);
    dkim_keys_unref(k);
}

/* ---- on the threadpool --------------------------------------------------- */

struct async_ctx {
    int calls;
    int status;
    struct buf sigs;
};

static void on_signed(int status, const char *sigs, size_t len, const char *err, void *arg)
{
    struct async_ctx *a = arg;

    (void)err;
    a->calls++;
    a->status = status;
    if (status == 0)
        buf_append(&a->sigs, sigs, len);
}

static void test_async(void **state)
{
    struct dkim_keys *k = load_main();
    uv_loop_t loop;
    struct async_ctx a;
    const char *unsigned_msg = "From: x@elsewhere.example\r\n\r\nhi\r\n";

    (void)state;
    memset(&a, 0, sizeof(a));
    uv_loop_init(&loop);
    assert_int_equal(dkim_sign_async(&loop, k, "q4", "env@example.test", test_msg,
                                     strlen(test_msg), on_signed, &a), 1);
    /* The job holds its own reference. */
    dkim_keys_unref(k);
    assert_int_equal(a.calls, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.status, 0);
    assert_true(strncmp(a.sigs.data, "DKIM-Signature: ", 16) == 0);

    k = load_main();
    assert_int_equal(dkim_sign_async(&loop, k, "q5", "", unsigned_msg, strlen(unsigned_msg),
                                     on_signed, &a), 0);
    assert_int_equal(dkim_sign_async(&loop, NULL, "q6", "", test_msg, strlen(test_msg),
                                     on_signed, &a), 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(a.calls, 1);
    dkim_keys_unref(k);
    assert_int_equal(uv_loop_close(&loop), 0);
    buf_free(&a.sigs);
}

static void test_alg_names(void **state)
{
    enum dkim_alg a;

    (void)state;
    assert_int_equal(dkim_alg_parse("RSA", &a), 0);
    assert_int_equal(a, DKIM_ALG_RSA);
    assert_int_equal(dkim_alg_parse("ed25519", &a), 0);
    assert_int_equal(a, DKIM_ALG_ED25519);
    assert_int_equal(dkim_alg_parse("dsa", &a), -1);
    assert_string_equal(dkim_alg_name(DKIM_ALG_ED25519), "ed25519");
    assert_string_equal(dkim_alg_name(DKIM_ALG_RSA), "rsa");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_from_domain),
        cmocka_unit_test(test_alg_names),
        cmocka_unit_test(test_keygen),
        cmocka_unit_test(test_load_dir_and_table),
        cmocka_unit_test(test_load_refusals),
        cmocka_unit_test(test_pick),
        cmocka_unit_test(test_sign_and_verify),
        cmocka_unit_test(test_sign_long_and_multipart),
        cmocka_unit_test(test_sign_edge_cases),
        cmocka_unit_test(test_record_check),
        cmocka_unit_test(test_async),
    };

    log_set_level("error");
    umask(022);
    return cmocka_run_group_tests(tests, setup, teardown);
}
