/*
 * Unit tests for router/dsn.c, delivery status notifications.
 *
 * Every generated DSN goes through two independent checks:
 *   - wire checks in C: every line ends with CRLF and holds at most 998
 *     octets (RFC 5322 section 2.1.1), the header section ends, the
 *     boundary occurs exactly five times (the parameter and four delimiter
 *     lines) and so nowhere in the content, and dsn_should_bounce()
 *     recognises the DSN as one (no bounce for a bounce);
 *   - a parse with Python's email package (tests/unit/dsn_check.py, run with
 *     /usr/bin/python3 on files in a mkdtemp directory) that checks the
 *     multipart/report structure, the delivery-status fields of every
 *     recipient and that the returned part equals the original's header
 *     section (or the whole original) byte for byte after line-end
 *     normalisation.
 * The build cases are a table; further tests cover input errors (the
 * output buffer is left untouched), dates, long and hostile texts, long
 * original lines, a boundary planted in the original, determinism, and
 * the table of dsn_should_bounce() cases.
 *
 * dsn_check.py is found through MF_SOURCE_DIR (the source tree), else
 * relative to the current directory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/buf.h"
#include "router/dsn.h"

#define S(lit) lit, sizeof(lit) - 1
#define QID "0190a1b2c3d4e5f6a7b8c9"
#define HOST "mx1.mailferry.test"
#define NOW INT64_C(1717243200123)          /* Sat, 01 Jun 2024 12:00:00 UTC */
#define ARRIVAL INT64_C(1716811200000)      /* Mon, 27 May 2024 12:00:00 UTC */
#define MAXR 6

static char g_dir[64];
static char g_script[4096];
static int g_python;        /* 1 when /usr/bin/python3 and the script exist */

/* ---- Helpers ------------------------------------------------------------ */

static struct dsn_input base_input(const char *orig, size_t len, const struct dsn_rcpt *r,
                                   size_t n)
{
    struct dsn_input in;

    memset(&in, 0, sizeof(in));
    in.queue_id = QID;
    in.reporting_mta = HOST;
    in.envelope_from = "alice@sender.example";
    in.orig_data = orig;
    in.orig_len = len;
    in.rcpts = r;
    in.nrcpts = n;
    in.arrival_ms = ARRIVAL;
    in.now_ms = NOW;
    return in;
}

static size_t count(const char *hay, size_t n, const char *needle)
{
    size_t k = strlen(needle), c = 0;
    const char *p = hay, *end = hay + n;

    while ((p = memmem(p, (size_t)(end - p), needle, k)) != NULL) {
        c++;
        p += 1;
    }
    return c;
}

/* Copies the boundary parameter of the DSN into out. */
static void get_boundary(const struct buf *b, char *out, size_t outlen)
{
    const char *p = memmem(b->data, b->len, "boundary=\"", 10);
    const char *q;

    assert_non_null(p);
    p += 10;
    q = strchr(p, '"');
    assert_non_null(q);
    assert_true((size_t)(q - p) < outlen && q > p && q - p <= 70);
    memcpy(out, p, (size_t)(q - p));
    out[q - p] = '\0';
}

/* The wire checks every DSN must pass. */
static void check_wire(const struct buf *b)
{
    char boundary[128], delim[160];
    size_t col = 0;

    assert_true(b->len > 4);
    for (size_t i = 0; i < b->len; i++) {
        if (b->data[i] == '\r') {
            assert_true(i + 1 < b->len && b->data[i + 1] == '\n');
        } else if (b->data[i] == '\n') {
            assert_true(i > 0 && b->data[i - 1] == '\r');
            col = 0;
            continue;
        } else {
            col++;
            if (col > 998)
                fail_msg("line longer than 998 octets at offset %zu", i);
        }
    }
    assert_memory_equal(b->data + b->len - 2, "\r\n", 2);
    assert_non_null(memmem(b->data, b->len, "\r\n\r\n", 4));
    get_boundary(b, boundary, sizeof(boundary));
    assert_int_equal(count(b->data, b->len, boundary), 5);
    snprintf(delim, sizeof(delim), "\r\n--%s\r\n", boundary);
    assert_int_equal(count(b->data, b->len, delim), 3);
    snprintf(delim, sizeof(delim), "\r\n--%s--\r\n", boundary);
    assert_int_equal(count(b->data, b->len, delim), 1);
    assert_memory_equal(b->data + b->len - strlen(delim), delim, strlen(delim));
    /* Never a bounce for a bounce, even with a non-null sender. */
    assert_int_equal(dsn_should_bounce("someone@example.org", b->data, b->len), 0);
}

static void write_file(const char *name, const void *p, size_t n)
{
    char path[128];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", g_dir, name);
    f = fopen(path, "wb");
    assert_non_null(f);
    if (n > 0)
        assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Appends s as a JSON string (RFC 8259 section 7); UTF-8 passes as is. */
static void json_str(struct buf *j, const char *s)
{
    buf_append(j, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            buf_appendf(j, "\\%c", c);
        else if (c < 0x20)
            buf_appendf(j, "\\u%04x", c);
        else
            buf_append(j, s, 1);
    }
    buf_append(j, "\"", 1);
}

struct want_rcpt {
    const char *final;      /* "rfc822; bob@example.com" */
    const char *status;
    const char *remote;     /* NULL: the field must be absent; "*": not checked */
    const char *diag;       /* NULL: the field must be absent; "*": not checked */
};

/* Runs dsn_check.py on the DSN and asserts it passed. */
static void python_check(const struct buf *dsn, const struct dsn_input *in, const char *part3,
                         int exact, const struct want_rcpt *w, size_t nw)
{
    struct buf j = BUF_INIT;
    char cmd[8192];

    if (!g_python)
        return;
    write_file("dsn.eml", dsn->data, dsn->len);
    write_file("orig.eml", in->orig_data, in->orig_len);
    buf_appends(&j, "{\"to\": ");
    json_str(&j, in->envelope_from);
    buf_appends(&j, ", \"reporting_mta\": ");
    json_str(&j, in->reporting_mta);
    buf_appends(&j, ", \"queue_id\": ");
    json_str(&j, in->queue_id);
    buf_appendf(&j, ", \"return_full\": %s, \"exact_original\": %s, \"part3_type\": ",
                in->return_full ? "true" : "false", exact ? "true" : "false");
    json_str(&j, part3);
    buf_appends(&j, ", \"rcpts\": [");
    for (size_t i = 0; i < nw; i++) {
        buf_appends(&j, i ? ", {\"action\": \"failed\", \"final\": " : "{\"action\": \"failed\", \"final\": ");
        json_str(&j, w[i].final);
        buf_appends(&j, ", \"status\": ");
        json_str(&j, w[i].status);
        if (w[i].remote == NULL) {
            buf_appends(&j, ", \"no_remote\": true");
        } else if (strcmp(w[i].remote, "*") != 0) {
            buf_appends(&j, ", \"remote\": ");
            json_str(&j, w[i].remote);
        }
        if (w[i].diag == NULL) {
            buf_appends(&j, ", \"no_diag\": true");
        } else if (strcmp(w[i].diag, "*") != 0) {
            buf_appends(&j, ", \"diag\": ");
            json_str(&j, w[i].diag);
        }
        buf_appends(&j, "}");
    }
    buf_appends(&j, "]}");
    write_file("spec.json", j.data, j.len);
    buf_free(&j);
    snprintf(cmd, sizeof(cmd), "/usr/bin/python3 '%s' '%s/dsn.eml' '%s/orig.eml' '%s/spec.json'",
             g_script, g_dir, g_dir, g_dir);
    if (system(cmd) != 0) {
        fwrite(dsn->data, 1, dsn->len > 4000 ? 4000 : dsn->len, stderr);
        fail_msg("dsn_check.py failed");
    }
}

static int group_setup(void **state)
{
    const char *src = getenv("MF_SOURCE_DIR");

    (void)state;
    snprintf(g_dir, sizeof(g_dir), "/tmp/test_dsn.XXXXXX");
    if (mkdtemp(g_dir) == NULL)
        return -1;
    snprintf(g_script, sizeof(g_script), "%s/tests/unit/dsn_check.py",
             src && *src ? src : ".");
    g_python = access("/usr/bin/python3", X_OK) == 0 && access(g_script, R_OK) == 0;
    if (!g_python)
        fprintf(stderr, "test_dsn: /usr/bin/python3 or %s missing: parse checks skipped\n",
                g_script);
    return 0;
}

static int group_teardown(void **state)
{
    static const char *const files[] = {"dsn.eml", "orig.eml", "spec.json"};
    char path[128];

    (void)state;
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", g_dir, files[i]);
        unlink(path);
    }
    rmdir(g_dir);
    return 0;
}

/* ---- The build table ------------------------------------------------------ */

static const char ORIG_PLAIN[] =
    "Received: from client.example (client.example [192.0.2.1])\r\n"
    "\tby gw.mailferry.test with ESMTPS id 0190a1b2c3d4e5f6a7b8c9\r\n"
    "From: Alice <alice@sender.example>\r\n"
    "To: bob@example.com, carol@example.net\r\n"
    "Subject: Quarterly report\r\n"
    "Message-ID: <abc@sender.example>\r\n"
    "\r\n"
    "Hello Bob,\r\n"
    "the figures are attached.\r\n";

static const char ORIG_BARE_LF[] =
    "From: alice@sender.example\n"
    "Subject: bare\n"
    " folded\r"
    "X-Mixed: yes\r\n"
    "\n"
    "body line\n";

static const char ORIG_UTF8_HEADERS[] =
    "From: J\xc3\xb6rg <joerg@sender.example>\r\n"
    "Subject: Gr\xc3\xbc\xc3\x9f" "e\r\n"
    "\r\n"
    "K\xc3\xb6rper\r\n";

static const char ORIG_8BIT_BODY[] =
    "From: alice@sender.example\r\n"
    "Subject: plain\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "caf\xc3\xa9\r\n"
    "no final line end";

static const char ORIG_NO_BODY[] = "Subject: headers only\r\nFrom: a@b.example";

static const char ORIG_NESTED_MULTIPART[] =
    "From: alice@sender.example\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed; boundary=\"inner\"\r\n"
    "\r\n"
    "--inner\r\n"
    "Content-Type: text/plain\r\n"
    "\r\n"
    "one\r\n"
    "--inner--\r\n";

struct build_case {
    const char *name;
    const char *orig;
    size_t orig_len;
    const char *from;
    const char *reason;
    int return_full;
    struct dsn_rcpt rcpts[MAXR];
    size_t nrcpts;
    struct want_rcpt want[MAXR];
    const char *part3_type;
    int eight;              /* expect Content-Transfer-Encoding: 8bit at the top */
    const char *must;       /* a substring the output must hold, or NULL */
};

#define R(addr, code, enh, diag, remote) {addr, "failed", code, enh, diag, remote, NOW - 60000}

static const struct build_case build_cases[] = {
    {"permanent 550 5.1.1", S(ORIG_PLAIN), "alice@sender.example", NULL, 0,
     {R("bob@example.com", 550, "5.1.1", "User unknown", "mx.example.com")}, 1,
     {{"rfc822; bob@example.com", "5.1.1", "dns; mx.example.com", "smtp; 550 5.1.1 User unknown"}},
     "text/rfc822-headers", 0, "<bob@example.com>: host mx.example.com said: 550 5.1.1 User unknown"},

    {"status derivation", S(ORIG_PLAIN), "alice@sender.example", NULL, 0,
     {R("a@example.com", 550, NULL, "no enhanced code", "mx.example.com"),
      R("b@example.com", 554, "", "empty enhanced code", NULL),
      R("c@example.com", 550, "4.1.1", "class disagrees with the reply", NULL),
      R("d@example.com", 0, NULL, "connect to mx.example.com: Connection refused", NULL),
      R("e@example.com", 0, "5.7.1", NULL, NULL),
      R("f@example.com", 553, "5.1.1000", "detail too long", NULL)}, 6,
     {{"rfc822; a@example.com", "5.0.0", "dns; mx.example.com", "smtp; 550 no enhanced code"},
      {"rfc822; b@example.com", "5.0.0", NULL, "smtp; 554 empty enhanced code"},
      {"rfc822; c@example.com", "5.0.0", NULL, "smtp; 550 4.1.1 class disagrees with the reply"},
      {"rfc822; d@example.com", "5.0.0", NULL,
       "X-mailferry; connect to mx.example.com: Connection refused"},
      {"rfc822; e@example.com", "5.7.1", NULL, NULL},
      {"rfc822; f@example.com", "5.0.0", NULL, "smtp; 553 detail too long"}},
     "text/rfc822-headers", 0, NULL},

    {"expired keeps the transient status", S(ORIG_PLAIN), "alice@sender.example", "expired", 0,
     {R("a@example.com", 452, "4.2.2", "Mailbox full", "mx.example.com"),
      R("b@example.com", 421, NULL, "Service not available", "mx.example.net"),
      R("c@example.com", 0, NULL, "connect: Connection timed out", NULL),
      R("d@example.com", 550, "5.1.1", "Unknown user", NULL)}, 4,
     {{"rfc822; a@example.com", "4.2.2", "dns; mx.example.com", "smtp; 452 4.2.2 Mailbox full"},
      {"rfc822; b@example.com", "4.4.7", "dns; mx.example.net", "smtp; 421 Service not available"},
      {"rfc822; c@example.com", "4.4.7", NULL, "X-mailferry; connect: Connection timed out"},
      {"rfc822; d@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 Unknown user"}},
     "text/rfc822-headers", 0, "expired from the queue"},

    {"multi-line reply, hostile octets", S(ORIG_PLAIN), "alice@sender.example", NULL, 0,
     {R("bob@example.com", 550, "5.7.1",
        "Message rejected\r\nsee https://example.com/help\nthird\x01 line \xff\xfe\r\r\n"
        "--=_mf_fake\r\n\r\nInjected: header\tafter tab",
        "mx.example.com\r\nInjected: yes")}, 1,
     {{"rfc822; bob@example.com", "5.7.1", "dns; mx.example.com??Injected: yes",
       "smtp; 550 5.7.1 Message rejected see https://example.com/help third? line ?? "
       "--=_mf_fake Injected: header after tab"}},
     "text/rfc822-headers", 0, "    see https://example.com/help\r\n"},

    {"return full", S(ORIG_PLAIN), "alice@sender.example", NULL, 1,
     {R("bob@example.com", 550, "5.1.1", "User unknown", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 User unknown"}},
     "message/rfc822", 0, "the figures are attached.\r\n"},

    {"bare LF and CR in the original", S(ORIG_BARE_LF), "alice@sender.example", NULL, 0,
     {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "text/rfc822-headers", 0, "Subject: bare\r\n folded\r\nX-Mixed: yes\r\n\r\n--"},

    {"bare LF, return full", S(ORIG_BARE_LF), "alice@sender.example", NULL, 1,
     {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "message/rfc822", 0, "X-Mixed: yes\r\n\r\nbody line\r\n"},

    {"UTF-8 headers: message/global-headers", S(ORIG_UTF8_HEADERS), "alice@sender.example", NULL,
     0, {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "message/global-headers", 1, "Content-Transfer-Encoding: 8bit\r\n\r\nFrom: J\xc3\xb6rg"},

    {"UTF-8 headers, return full: message/global", S(ORIG_UTF8_HEADERS), "alice@sender.example",
     NULL, 1, {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "message/global", 1, "K\xc3\xb6rper\r\n"},

    {"8-bit body, headers only: 7bit", S(ORIG_8BIT_BODY), "alice@sender.example", NULL, 0,
     {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "text/rfc822-headers", 0, NULL},

    {"8-bit body, return full", S(ORIG_8BIT_BODY), "alice@sender.example", NULL, 1,
     {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "message/rfc822", 1, "caf\xc3\xa9\r\nno final line end\r\n\r\n--"},

    {"no body, no final line end", S(ORIG_NO_BODY), "alice@sender.example", NULL, 0,
     {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "text/rfc822-headers", 0, "From: a@b.example\r\n\r\n--"},

    {"empty original", "", 0, "alice@sender.example", NULL, 0,
     {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "text/rfc822-headers", 0, NULL},

    {"nested multipart returned in full", S(ORIG_NESTED_MULTIPART), "alice@sender.example", NULL,
     1, {R("bob@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "message/rfc822", 0, "--inner--\r\n"},

    {"UTF-8 recipient: utf-8 xtext", S(ORIG_PLAIN), "alice@sender.example", NULL, 0,
     {R("j\xc3\xb6rg+tag=x@b\xc3\xbc" "cher.example", 550, "5.1.1", "x", NULL),
      R("\xe7\x94\xa8\xe6\x88\xb7@\xf0\x9f\x93\xa7.example", 550, "5.1.1", "x", NULL),
      R("Postmaster", 550, "5.1.1", "x", NULL)}, 3,
     {{"utf-8; j\\x{F6}rg\\x{2B}tag\\x{3D}x@b\\x{FC}cher.example", "5.1.1", NULL,
       "smtp; 550 5.1.1 x"},
      {"utf-8; \\x{7528}\\x{6237}@\\x{1F4E7}.example", "5.1.1", NULL, "smtp; 550 5.1.1 x"},
      {"rfc822; Postmaster", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "text/rfc822-headers", 0, "<j\\x{F6}rg\\x{2B}tag\\x{3D}x@b\\x{FC}cher.example>:"},

    {"quoted local part", S(ORIG_PLAIN), "\"alice smith\"@sender.example", NULL, 0,
     {R("\"bob  jones\"@example.com", 550, "5.1.1", "x", NULL)}, 1,
     {{"rfc822; \"bob  jones\"@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"}},
     "text/rfc822-headers", 0, "To: <\"alice smith\"@sender.example>\r\n"},

    {"no reply at all", S(ORIG_PLAIN), "alice@sender.example", NULL, 0,
     {{"bob@example.com", NULL, 0, NULL, NULL, NULL, 0}}, 1,
     {{"rfc822; bob@example.com", "5.0.0", NULL, NULL}},
     "text/rfc822-headers", 0, "<bob@example.com>: delivery failed\r\n"},
};

static void test_build_table(void **state)
{
    (void)state;
    for (size_t c = 0; c < sizeof(build_cases) / sizeof(build_cases[0]); c++) {
        const struct build_case *bc = &build_cases[c];
        struct dsn_input in = base_input(bc->orig, bc->orig_len, bc->rcpts, bc->nrcpts);
        struct buf out = BUF_INIT;
        char err[128] = "";
        int rc;

        in.envelope_from = bc->from;
        in.reason = bc->reason;
        in.return_full = bc->return_full;
        rc = dsn_build(&in, &out, err, sizeof(err));
        if (rc != 0)
            fail_msg("%s: dsn_build failed: %s", bc->name, err);
        print_message("case: %s\n", bc->name);
        check_wire(&out);
        for (size_t i = 0; i < bc->nrcpts; i++) {
            char line[1200];
            snprintf(line, sizeof(line), "\r\nStatus: %s\r\n", bc->want[i].status);
            if (memmem(out.data, out.len, line, strlen(line)) == NULL)
                fail_msg("%s: no %s", bc->name, line + 2);
        }
        if (bc->must != NULL && memmem(out.data, out.len, bc->must, strlen(bc->must)) == NULL)
            fail_msg("%s: output lacks %s", bc->name, bc->must);
        assert_int_equal(memmem(out.data, out.len, S("\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                                                     "This is a MIME")) != NULL,
                         bc->eight);
        python_check(&out, &in, bc->part3_type, 1, bc->want, bc->nrcpts);
        buf_free(&out);
    }
}

/* The fixed header section, dates and the per-message fields, exactly. */
static void test_exact_header(void **state)
{
    struct dsn_rcpt r = R("bob@example.com", 550, "5.1.1", "User unknown", "mx.example.com");
    struct dsn_input in = base_input(S(ORIG_PLAIN), &r, 1);
    struct buf out = BUF_INIT;
    char boundary[128], want[2048];

    (void)state;
    r.last_attempt_ms = INT64_C(1709251199000);
    assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
    get_boundary(&out, boundary, sizeof(boundary));
    assert_int_equal(strncmp(boundary, "=_mf_" QID "_", strlen("=_mf_" QID "_")), 0);
    snprintf(want, sizeof(want),
             "From: \"Mail Delivery System\" <MAILER-DAEMON@" HOST ">\r\n"
             "To: <alice@sender.example>\r\n"
             "Subject: Undelivered Mail Returned to Sender\r\n"
             "Date: Sat, 01 Jun 2024 12:00:00 +0000\r\n"
             "Message-ID: <" QID ".dsn.1717243200123@" HOST ">\r\n"
             "Auto-Submitted: auto-replied\r\n"
             "MIME-Version: 1.0\r\n"
             "Content-Type: multipart/report; report-type=delivery-status;\r\n"
             "\tboundary=\"%s\"\r\n"
             "\r\n"
             "This is a MIME-encapsulated message.\r\n"
             "\r\n"
             "--%s\r\n"
             "Content-Description: Notification\r\n"
             "Content-Type: text/plain; charset=us-ascii\r\n"
             "\r\n"
             "This is the mail delivery system at " HOST ".\r\n",
             boundary, boundary);
    assert_true(out.len > strlen(want));
    assert_memory_equal(out.data, want, strlen(want));
    snprintf(want, sizeof(want),
             "\r\n--%s\r\n"
             "Content-Description: Delivery report\r\n"
             "Content-Type: message/delivery-status\r\n"
             "\r\n"
             "Reporting-MTA: dns; " HOST "\r\n"
             "X-Mailferry-Queue-ID: " QID "\r\n"
             "Arrival-Date: Mon, 27 May 2024 12:00:00 +0000\r\n"
             "\r\n"
             "Final-Recipient: rfc822; bob@example.com\r\n"
             "Action: failed\r\n"
             "Status: 5.1.1\r\n"
             "Remote-MTA: dns; mx.example.com\r\n"
             "Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n"
             "Last-Attempt-Date: Thu, 29 Feb 2024 23:59:59 +0000\r\n"
             "\r\n--%s\r\n"
             "Content-Description: Undelivered Message Headers\r\n"
             "Content-Type: text/rfc822-headers\r\n"
             "\r\n"
             "Received: from client.example (client.example [192.0.2.1])\r\n",
             boundary, boundary);
    assert_non_null(memmem(out.data, out.len, want, strlen(want)));
    buf_free(&out);
}

/* Dates through the Date: field, and optional date fields left out. */
static void test_dates(void **state)
{
    static const struct {
        int64_t ms;
        const char *date;
    } cases[] = {
        {0, "Thu, 01 Jan 1970 00:00:00 +0000"},
        {INT64_C(951782400000), "Tue, 29 Feb 2000 00:00:00 +0000"},
        {INT64_C(1709251199000), "Thu, 29 Feb 2024 23:59:59 +0000"},
        {INT64_C(4107542400000), "Mon, 01 Mar 2100 00:00:00 +0000"},
        {INT64_C(253402300799999), "Fri, 31 Dec 9999 23:59:59 +0000"},
    };
    struct dsn_rcpt r = R("bob@example.com", 550, "5.1.1", "x", NULL);

    (void)state;
    r.last_attempt_ms = 0;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct dsn_input in = base_input(S(ORIG_PLAIN), &r, 1);
        struct buf out = BUF_INIT;
        char want[64];

        in.now_ms = cases[i].ms;
        in.arrival_ms = 0;
        assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
        snprintf(want, sizeof(want), "\r\nDate: %s\r\n", cases[i].date);
        assert_non_null(memmem(out.data, out.len, want, strlen(want)));
        assert_null(memmem(out.data, out.len, S("Arrival-Date:")));
        assert_null(memmem(out.data, out.len, S("Last-Attempt-Date:")));
        check_wire(&out);
        buf_free(&out);
    }
}

/* Input errors: -1, a reason, and the output buffer as it was. */
static void test_errors(void **state)
{
    struct err_case {
        const char *name;
        const char *queue_id, *host, *from, *reason, *rcpt, *action;
        int code;
        int64_t now, arrival, attempt;
        size_t nrcpts;
    };
    static const struct err_case cases[] = {
        {"null sender", QID, HOST, "", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"null sender <>", QID, HOST, "<>", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"NULL sender", QID, HOST, NULL, NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"sender without domain", QID, HOST, "alice", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"sender ends at @", QID, HOST, "alice@", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"sender with CRLF", QID, HOST, "a@x.example\r\nBcc: v@x", NULL, "b@x.example", NULL,
         550, NOW, 0, 0, 1},
        {"sender bad UTF-8", QID, HOST, "a\xc3@x.example", NULL, "b@x.example", NULL, 550, NOW, 0,
         0, 1},
        {"sender overlong UTF-8", QID, HOST, "a\xc0\xaf@x.example", NULL, "b@x.example", NULL, 550,
         NOW, 0, 0, 1},
        {"sender surrogate", QID, HOST, "a\xed\xa0\x80@x.example", NULL, "b@x.example", NULL, 550,
         NOW, 0, 0, 1},
        {"empty queue id", "", HOST, "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"NULL queue id", NULL, HOST, "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"queue id with space", "ab cd", HOST, "a@x.example", NULL, "b@x.example", NULL, 550, NOW,
         0, 0, 1},
        {"queue id with >", "ab>cd", HOST, "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0,
         0, 1},
        {"empty host", QID, "", "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"host with space", QID, "mx example", "a@x.example", NULL, "b@x.example", NULL, 550, NOW,
         0, 0, 1},
        {"host with ..", QID, "mx..example", "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0,
         0, 1},
        {"host with >", QID, "mx>", "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 1},
        {"no recipients", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0, 0, 0},
        {"empty recipient", QID, HOST, "a@x.example", NULL, "", NULL, 550, NOW, 0, 0, 1},
        {"NULL recipient", QID, HOST, "a@x.example", NULL, NULL, NULL, 550, NOW, 0, 0, 1},
        {"recipient with LF", QID, HOST, "a@x.example", NULL, "b@x\n.example", NULL, 550, NOW, 0,
         0, 1},
        {"recipient with DEL", QID, HOST, "a@x.example", NULL, "b\x7f@x.example", NULL, 550, NOW,
         0, 0, 1},
        {"recipient bad UTF-8", QID, HOST, "a@x.example", NULL, "b\xff@x.example", NULL, 550, NOW,
         0, 0, 1},
        {"action delayed", QID, HOST, "a@x.example", NULL, "b@x.example", "delayed", 450, NOW, 0,
         0, 1},
        {"code 250", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, 250, NOW, 0, 0, 1},
        {"code 600", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, 600, NOW, 0, 0, 1},
        {"code -1", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, -1, NOW, 0, 0, 1},
        {"unknown reason", QID, HOST, "a@x.example", "timeout", "b@x.example", NULL, 550, NOW, 0,
         0, 1},
        {"negative now", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, 550, -1, 0, 0, 1},
        {"now past 9999", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, 550,
         INT64_C(253402300800000), 0, 0, 1},
        {"arrival past 9999", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, 550, NOW,
         INT64_MAX, 0, 1},
        {"attempt past 9999", QID, HOST, "a@x.example", NULL, "b@x.example", NULL, 550, NOW, 0,
         INT64_MAX, 1},
    };
    char longq[DSN_QUEUE_ID_MAX + 2], longaddr[DSN_ADDR_MAX + 2], longhost[300];

    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct err_case *ec = &cases[i];
        struct dsn_rcpt r = {ec->rcpt, ec->action, ec->code, "5.1.1", "x", NULL, ec->attempt};
        struct dsn_input in = base_input(S(ORIG_PLAIN), &r, ec->nrcpts);
        struct buf out = BUF_INIT;
        char err[128] = "";

        in.queue_id = ec->queue_id;
        in.reporting_mta = ec->host;
        in.envelope_from = ec->from;
        in.reason = ec->reason;
        in.now_ms = ec->now;
        in.arrival_ms = ec->arrival;
        buf_appends(&out, "kept");
        if (dsn_build(&in, &out, err, sizeof(err)) != -1)
            fail_msg("%s: accepted", ec->name);
        assert_true(err[0] != '\0');
        assert_int_equal(out.len, 4);
        assert_string_equal(out.data, "kept");
        buf_free(&out);
    }

    /* Over-long fields, and the limits themselves. */
    memset(longq, 'a', sizeof(longq) - 1);
    longq[sizeof(longq) - 1] = '\0';
    memset(longaddr, 'b', sizeof(longaddr) - 1);
    longaddr[sizeof(longaddr) - 1] = '\0';
    longaddr[10] = '@';
    memset(longhost, 'h', sizeof(longhost) - 1);
    longhost[sizeof(longhost) - 1] = '\0';
    {
        struct dsn_rcpt r = R("b@x.example", 550, "5.1.1", "x", NULL);
        struct dsn_input in = base_input(S(ORIG_PLAIN), &r, 1);
        struct buf out = BUF_INIT;

        in.queue_id = longq;
        assert_int_equal(dsn_build(&in, &out, NULL, 0), -1);
        longq[DSN_QUEUE_ID_MAX] = '\0';
        assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
        check_wire(&out);
        buf_reset(&out);
        in.queue_id = QID;
        in.reporting_mta = longhost;
        assert_int_equal(dsn_build(&in, &out, NULL, 0), -1);
        in.reporting_mta = HOST;
        in.envelope_from = longaddr;
        assert_int_equal(dsn_build(&in, &out, NULL, 0), -1);
        r.rcpt = longaddr;
        in.envelope_from = "a@x.example";
        assert_int_equal(dsn_build(&in, &out, NULL, 0), -1);
        longaddr[DSN_ADDR_MAX] = '\0';
        assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
        check_wire(&out);
        buf_reset(&out);
        /* NULL input, NULL output, a missing original, tiny err buffers. */
        {
            char e1[1] = {'x'};
            assert_int_equal(dsn_build(NULL, &out, e1, sizeof(e1)), -1);
            assert_int_equal(e1[0], '\0');
            assert_int_equal(dsn_build(&in, NULL, NULL, 0), -1);
            in.orig_data = NULL;
            assert_int_equal(dsn_build(&in, &out, NULL, 0), -1);
            in.orig_len = 0;
            assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
        }
        buf_free(&out);
    }
}

/* Long texts: folded at spaces, cut when there are none, never over 998. */
static void test_long_texts(void **state)
{
    static char spaced[6000], solid[6000], remote[3000];
    struct dsn_rcpt r[2] = {R("bob@example.com", 550, "5.7.1", spaced, remote),
                            R("carol@example.com", 550, "5.7.1", solid, NULL)};
    struct dsn_input in = base_input(S(ORIG_PLAIN), r, 2);
    struct buf out = BUF_INIT;
    size_t k = 0;

    (void)state;
    /* Numbered words "w0000 w0001 ...", six octets each, none repeated. */
    for (size_t i = 0; i + 6 < sizeof(spaced); i += 6)
        snprintf(spaced + i, 7, "w%04zu ", i / 6);
    memset(solid, 'z', sizeof(solid) - 1);
    solid[sizeof(solid) - 1] = '\0';
    memset(remote, 'm', sizeof(remote) - 1);
    remote[sizeof(remote) - 1] = '\0';
    assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
    check_wire(&out);
    /* The text is cut to DSN_DIAG_MAX: word 682 (octets 4092..4097) is
     * cut short, the next ones are absent. */
    assert_non_null(memmem(out.data, out.len, S(" w0681 w068")));
    assert_null(memmem(out.data, out.len, S("w0682")));
    assert_null(memmem(out.data, out.len, S("w0683")));
    /* Every Diagnostic-Code continuation line starts with a blank. */
    for (const char *p = out.data; (p = memmem(p, out.len - (size_t)(p - out.data),
                                              S("Diagnostic-Code:"))) != NULL; p++) {
        const char *e = memmem(p, out.len - (size_t)(p - out.data), S("\r\nLast-Attempt"));
        assert_non_null(e);
        for (const char *q = p; q < e; q++)
            if (q[0] == '\n')
                assert_true(q[1] == ' ');
        k++;
    }
    assert_int_equal(k, 2);
    /* The spaced text unfolds to what was sent, cut at DSN_DIAG_MAX; the
     * solid texts cannot be compared, their cuts add blanks. */
    {
        static char diag[DSN_DIAG_MAX + 64];
        struct want_rcpt w[2] = {
            {"rfc822; bob@example.com", "5.7.1", "*", diag},
            {"rfc822; carol@example.com", "5.7.1", NULL, "*"},
        };
        snprintf(diag, sizeof(diag), "smtp; 550 5.7.1 %.*s", DSN_DIAG_MAX, spaced);
        python_check(&out, &in, "text/rfc822-headers", 1, w, 2);
    }

    /* A non-ASCII address whose xtext form (six octets per '+') exceeds a
     * line is the one Final-Recipient that gets cut. */
    {
        static char addr[DSN_ADDR_MAX + 1];
        struct dsn_rcpt lr = R(addr, 550, "5.1.1", "x", NULL);

        memset(addr, '+', DSN_ADDR_MAX);
        memcpy(addr, "\xc3\xa9", 2);
        memcpy(addr + DSN_ADDR_MAX - 10, "@x.example", 10);
        in.rcpts = &lr;
        in.nrcpts = 1;
        buf_reset(&out);
        assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
        check_wire(&out);
        assert_non_null(memmem(out.data, out.len, S("\r\nFinal-Recipient: utf-8;\r\n \\x{E9}\\x{2B}")));
    }
    buf_free(&out);
}

/* Header lines over 998 octets are folded at a blank or cut with CRLF SP;
 * body lines are cut with CRLF. */
static void test_long_original_lines(void **state)
{
    struct buf orig = BUF_INIT, out = BUF_INIT;
    struct dsn_rcpt r = R("bob@example.com", 550, "5.1.1", "x", NULL);
    struct want_rcpt w = {"rfc822; bob@example.com", "5.1.1", NULL, "smtp; 550 5.1.1 x"};
    struct dsn_input in;
    const char *p;

    (void)state;
    buf_appends(&orig, "Subject: ");
    for (int i = 0; i < 300; i++)
        buf_appends(&orig, "word ");
    buf_appends(&orig, "\r\nX-Solid: ");
    for (int i = 0; i < 2500; i++)
        buf_append(&orig, "s", 1);
    buf_appends(&orig, "\r\n\r\n");
    for (int i = 0; i < 2500; i++)
        buf_append(&orig, "b", 1);
    buf_appends(&orig, "\r\nend\r\n");

    in = base_input(orig.data, orig.len, &r, 1);
    for (int full = 0; full <= 1; full++) {
        in.return_full = full;
        buf_reset(&out);
        assert_int_equal(dsn_build(&in, &out, NULL, 0), 0);
        check_wire(&out);
        /* The Subject folds before a blank: unfolding gives it back. */
        p = memmem(out.data, out.len, S("\r\nSubject: word"));
        assert_non_null(p);
        /* The solid header folds at its only blank, after the colon, and
         * is then cut: three continuation lines that start with a blank. */
        p = memmem(out.data, out.len, S("\r\nX-Solid:\r\n sss"));
        assert_non_null(p);
        for (int line = 0; line < 3; line++) {
            p = memchr(p + 2, '\n', out.len - (size_t)(p + 2 - out.data));
            assert_non_null(p);
            assert_true(p[1] == ' ' && p[2] == 's');
        }
        assert_int_equal(memmem(out.data, out.len, S("bbbb")) != NULL, full);
        assert_int_equal(memmem(out.data, out.len, S("\r\nend\r\n")) != NULL, full);
        python_check(&out, &in, full ? "message/rfc822" : "text/rfc822-headers", 0, &w, 1);
    }
    buf_free(&out);
    buf_free(&orig);
}

/* A boundary candidate planted in the original is never used, and the
 * output stays the same for the same input. */
static void test_boundary_and_determinism(void **state)
{
    struct buf orig = BUF_INIT, a = BUF_INIT, b = BUF_INIT;
    struct dsn_rcpt r = R("bob@example.com", 550, "5.1.1", "x", NULL);
    struct dsn_input in = base_input(S(ORIG_PLAIN), &r, 1);
    char b1[128], b2[128];

    (void)state;
    assert_int_equal(dsn_build(&in, &a, NULL, 0), 0);
    assert_int_equal(dsn_build(&in, &b, NULL, 0), 0);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.data, b.data, a.len);
    get_boundary(&a, b1, sizeof(b1));

    /* Plant the first boundary as delimiter lines in the original. */
    buf_appendf(&orig, "X-Trap: %s\r\n--%s\r\n\r\n--%s--\r\n", b1, b1, b1);
    buf_append(&orig, ORIG_PLAIN, sizeof(ORIG_PLAIN) - 1);
    in.orig_data = orig.data;
    in.orig_len = orig.len;
    for (int full = 0; full <= 1; full++) {
        buf_reset(&b);
        in.return_full = full;
        assert_int_equal(dsn_build(&in, &b, NULL, 0), 0);
        check_wire(&b);
        get_boundary(&b, b2, sizeof(b2));
        assert_string_not_equal(b1, b2);
        /* X-Trap and the first delimiter are in the header section. */
        assert_int_equal(count(b.data, b.len, b1), full ? 3 : 2);
    }

    /* The result is appended: what the buffer held stays in front. */
    buf_reset(&b);
    buf_appends(&b, "prefix");
    in.orig_data = ORIG_PLAIN;
    in.orig_len = sizeof(ORIG_PLAIN) - 1;
    in.return_full = 0;
    assert_int_equal(dsn_build(&in, &b, NULL, 0), 0);
    assert_int_equal(b.len, a.len + 6);
    assert_memory_equal(b.data + 6, a.data, a.len);
    buf_free(&a);
    buf_free(&b);
    buf_free(&orig);
}

/* ---- dsn_should_bounce ------------------------------------------------- */

struct bounce_case {
    const char *name;
    const char *from;
    const char *msg;
    size_t len;
    int want;
};

static const struct bounce_case bounce_cases[] = {
    {"plain message", "a@x.example", S(ORIG_PLAIN), 1},
    {"null sender", "", S(ORIG_PLAIN), 0},
    {"null sender <>", "<>", S(ORIG_PLAIN), 0},
    {"NULL sender", NULL, S(ORIG_PLAIN), 0},
    {"empty message", "a@x.example", "", 0, 1},
    {"NULL message", "a@x.example", NULL, 0, 1},
    {"DSN", "a@x.example",
     S("Subject: x\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n"
       "\tboundary=\"b\"\r\n\r\nbody\r\n"), 0},
    {"DSN, case and quotes", "a@x.example",
     S("CONTENT-TYPE: Multipart/Report; Report-Type=\"Delivery-Status\"; boundary=b\r\n\r\n"), 0},
    {"DSN, folded before the parameter", "a@x.example",
     S("Content-Type: multipart/report;\r\n report-type=delivery-status\r\n\r\n"), 0},
    {"DSN, folded inside", "a@x.example",
     S("Content-Type: multipart\r\n\t/report; boundary=\"x\";\r\n  report-type\r\n =delivery-status\r\n"
       "\r\n"), 0},
    {"DSN, comments", "a@x.example",
     S("Content-Type: (c) multipart (x\\)y) / report (z); (w) report-type (v) = (u) "
       "delivery-status (t)\r\n\r\n"), 0},
    {"DSN, bare LF", "a@x.example",
     S("Subject: x\nContent-Type: multipart/report; report-type=delivery-status\n\nbody\n"), 0},
    {"DSN, bare CR", "a@x.example",
     S("Subject: x\rContent-Type: multipart/report;\r report-type=delivery-status\r\r"), 0},
    {"DSN, no final line end", "a@x.example",
     S("Content-Type: multipart/report; report-type=delivery-status"), 0},
    {"DSN, blank before colon", "a@x.example",
     S("Content-Type : multipart/report; report-type=delivery-status\r\n\r\n"), 0},
    {"DSN, second Content-Type", "a@x.example",
     S("Content-Type: text/plain\r\nContent-Type: multipart/report; "
       "report-type=delivery-status\r\n\r\n"), 0},
    {"DSN, empty parameters", "a@x.example",
     S("Content-Type: multipart/report;; ; report-type=delivery-status\r\n\r\n"), 0},
    {"global DSN", "a@x.example",
     S("Content-Type: multipart/report; report-type=global-delivery-status\r\n\r\n"), 0},
    {"MDN is not a DSN", "a@x.example",
     S("Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n"), 1},
    {"report without report-type", "a@x.example",
     S("Content-Type: multipart/report; boundary=x\r\n\r\n"), 1},
    {"mixed with report-type", "a@x.example",
     S("Content-Type: multipart/mixed; report-type=delivery-status\r\n\r\n"), 1},
    {"other value", "a@x.example",
     S("Content-Type: multipart/report; report-type=delivery-statusx\r\n\r\n"), 1},
    {"unterminated quote", "a@x.example",
     S("Content-Type: multipart/report; report-type=\"delivery-status\r\n\r\n"), 1},
    {"missing value", "a@x.example",
     S("Content-Type: multipart/report; report-type=\r\n\r\n"), 1},
    {"in the body only", "a@x.example",
     S("Subject: x\r\n\r\nContent-Type: multipart/report; report-type=delivery-status\r\n"), 1},
    {"after a bare LF blank line", "a@x.example",
     S("Subject: x\n\nContent-Type: multipart/report; report-type=delivery-status\n"), 1},
    {"other field name", "a@x.example",
     S("X-Content-Type: multipart/report; report-type=delivery-status\r\n\r\n"), 1},
    {"in a comment", "a@x.example",
     S("Content-Type: multipart/report (report-type=delivery-status)\r\n\r\n"), 1},
    {"auto-submitted still bounces", "a@x.example",
     S("Auto-Submitted: auto-generated\r\nSubject: x\r\n\r\n"), 1},
    {"continuation of another field", "a@x.example",
     S("Subject: x\r\n Content-Type: multipart/report; report-type=delivery-status\r\n\r\n"), 1},
};

static void test_should_bounce(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(bounce_cases) / sizeof(bounce_cases[0]); i++) {
        const struct bounce_case *c = &bounce_cases[i];
        int got = dsn_should_bounce(c->from, c->msg, c->len);
        if (got != c->want)
            fail_msg("%s: got %d, want %d", c->name, got, c->want);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_build_table),
        cmocka_unit_test(test_exact_header),
        cmocka_unit_test(test_dates),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_long_texts),
        cmocka_unit_test(test_long_original_lines),
        cmocka_unit_test(test_boundary_and_determinism),
        cmocka_unit_test(test_should_bounce),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
