/*
 * Unit tests for lib/mime: a message taken apart for a JSON email API.
 * Each case is a message and what must come out of it: sender, visible
 * recipients, subject, bodies (converted to UTF-8), attachments (bytes
 * identical to the decoded original), carried and dropped headers, and
 * the opaque flag for signed or encrypted MIME.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/mime.h"

static void parse_ok(const char *m, struct mime_parts *p)
{
    char err[200];

    if (mime_parse(m, strlen(m), p, err, sizeof(err)) != 0)
        fail_msg("mime_parse: %s", err);
}

static const char *header(const struct mime_parts *p, const char *name)
{
    for (size_t i = 0; i < p->nheaders; i++)
        if (strcmp(p->headers[i].name, name) == 0)
            return p->headers[i].value;
    return NULL;
}

static int dropped(const struct mime_parts *p, const char *name)
{
    int n = 0;

    for (size_t i = 0; i < p->ndropped; i++)
        n += strcmp(p->dropped[i], name) == 0;
    return n;
}

#define FULL                                                                               \
    "Received: from a.test by b.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"                 \
    "DKIM-Signature: v=1; a=rsa-sha256; d=x.test; s=s1;\r\n\th=from:to; b=abc\r\n"         \
    "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"                                            \
    "Sender: bulk@x.test\r\n"                                                             \
    "From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@x.test>\r\n"                            \
    "To: a@d.test, Team: g1@d.test, \"G Two\" <g2@d.test>;\r\n"                            \
    "Cc: \"C, Person\" <c@d.test>\r\n"                                                     \
    "Bcc: hidden@d.test\r\n"                                                              \
    "Reply-To: r1@x.test, \"R Two\" <r2@x.test>\r\n"                                       \
    "Subject: =?utf-8?b?SGVsbG8gV8O2cmxk?= and more\r\n"                                  \
    "Message-ID: <abc.123@x.test>\r\n"                                                    \
    "List-Unsubscribe: <mailto:u@x.test>,\r\n <https://x.test/u>\r\n"                     \
    "X-Dup: 1\r\n"                                                                        \
    "X-Dup: 2\r\n"                                                                        \
    "MIME-Version: 1.0\r\n"                                                               \
    "Content-Type: multipart/mixed; boundary=\"B1\"\r\n"                                   \
    "\r\n"                                                                                \
    "preamble\r\n"                                                                        \
    "--B1\r\n"                                                                            \
    "Content-Type: multipart/related; boundary=\"B2\"\r\n"                                 \
    "\r\n"                                                                                \
    "--B2\r\n"                                                                            \
    "Content-Type: multipart/alternative; boundary=\"B3\"\r\n"                             \
    "\r\n"                                                                                \
    "--B3\r\n"                                                                            \
    "Content-Type: text/plain; charset=iso-8859-1\r\n"                                     \
    "Content-Transfer-Encoding: quoted-printable\r\n"                                      \
    "\r\n"                                                                                \
    "Gr=FC=DFe=\r\n aus K=F6ln\r\n"                                                      \
    "second line\r\n"                                                                     \
    "--B3\r\n"                                                                            \
    "Content-Type: text/html; charset=utf-8\r\n"                                           \
    "Content-Transfer-Encoding: base64\r\n"                                                \
    "\r\n"                                                                                \
    "PHA+R3LDvMOfZSA8aW1nIHNyYz0iY2lkOmltZzFAeC50ZXN0Ij48L3A+\r\n"                        \
    "--B3--\r\n"                                                                          \
    "--B2\r\n"                                                                            \
    "Content-Type: image/png\r\n"                                                          \
    "Content-ID: <img1@x.test>\r\n"                                                        \
    "Content-Transfer-Encoding: base64\r\n"                                                \
    "\r\n"                                                                                \
    "iVBORw0KGgo=\r\n"                                                                    \
    "--B2--\r\n"                                                                          \
    "--B1\r\n"                                                                            \
    "Content-Type: application/pdf; name=\"r.pdf\"\r\n"                                    \
    "Content-Disposition: attachment; filename=\"report =?x?= 2024.pdf\"\r\n"              \
    "Content-Transfer-Encoding: base64\r\n"                                                \
    "\r\n"                                                                                \
    "JVBERi0xLjQKAAEC/w==\r\n"                                                            \
    "--B1\r\n"                                                                            \
    "Content-Type: text/plain; charset=utf-8; name=\"notes.txt\"\r\n"                      \
    "\r\n"                                                                                \
    "a text attachment\r\n"                                                               \
    "--B1\r\n"                                                                            \
    "Content-Type: message/rfc822\r\n"                                                     \
    "\r\n"                                                                                \
    "From: q@x.test\r\n"                                                                  \
    "Subject: inner\r\n"                                                                  \
    "\r\n"                                                                                \
    "inner body\r\n"                                                                      \
    "--B1--\r\n"                                                                          \
    "epilogue\r\n"

static void test_full_message(void **state)
{
    struct mime_parts p;
    const unsigned char png[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    const unsigned char pdf[] = {'%', 'P', 'D', 'F', '-', '1', '.', '4', '\n', 0, 1, 2, 0xff};

    (void)state;
    parse_ok(FULL, &p);
    assert_string_equal(p.from.addr, "j@x.test");
    assert_string_equal(p.from.name, "J\xc3\xbcrgen M\xc3\xbcller");
    assert_int_equal(p.nto, 3);
    assert_string_equal(p.to[0], "a@d.test");
    assert_string_equal(p.to[1], "g1@d.test");
    assert_string_equal(p.to[2], "g2@d.test");
    assert_int_equal(p.ncc, 1);
    assert_string_equal(p.cc[0], "c@d.test");
    assert_int_equal(p.nreply_to, 2);
    assert_string_equal(p.reply_to[0].addr, "r1@x.test");
    assert_string_equal(p.reply_to[1].name, "R Two");
    assert_string_equal(p.subject, "Hello W\xc3\xb6rld and more");

    /* Quoted-printable soft line break joined, Latin-1 converted. */
    assert_string_equal(p.text, "Gr\xc3\xbc\xc3\x9f" "e aus K\xc3\xb6ln\r\nsecond line");
    assert_string_equal(p.html, "<p>Gr\xc3\xbc\xc3\x9f" "e <img src=\"cid:img1@x.test\"></p>");

    /* Carried headers: in order, unfolded; Bcc never. */
    assert_int_equal(p.nheaders, 3);
    assert_string_equal(p.headers[0].name, "Message-ID");
    assert_string_equal(header(&p, "Message-ID"), "<abc.123@x.test>");
    assert_string_equal(header(&p, "List-Unsubscribe"), "<mailto:u@x.test>, <https://x.test/u>");
    assert_string_equal(header(&p, "X-Dup"), "1");
    assert_null(header(&p, "Bcc"));
    assert_null(header(&p, "Content-Type"));
    assert_null(header(&p, "MIME-Version"));
    assert_int_equal(dropped(&p, "Received"), 1);
    assert_int_equal(dropped(&p, "DKIM-Signature"), 1);
    assert_int_equal(dropped(&p, "Date"), 1);
    assert_int_equal(dropped(&p, "Sender"), 1);
    assert_int_equal(dropped(&p, "X-Dup"), 1);
    assert_int_equal(p.ndropped, 5);

    /* Attachments in order: inline image, PDF, text file, message. */
    assert_int_equal(p.natt, 4);
    assert_string_equal(p.att[0].content_type, "image/png");
    assert_string_equal(p.att[0].filename, "attachment-1.png");
    assert_string_equal(p.att[0].content_id, "img1@x.test");
    assert_true(p.att[0].is_inline);
    assert_int_equal(p.att[0].len, sizeof(png));
    assert_memory_equal(p.att[0].data, png, sizeof(png));

    assert_string_equal(p.att[1].content_type, "application/pdf");
    assert_string_equal(p.att[1].filename, "report =?x?= 2024.pdf");
    assert_null(p.att[1].content_id);
    assert_false(p.att[1].is_inline);
    assert_int_equal(p.att[1].len, sizeof(pdf));
    assert_memory_equal(p.att[1].data, pdf, sizeof(pdf));

    assert_string_equal(p.att[2].content_type, "text/plain");
    assert_string_equal(p.att[2].filename, "notes.txt");
    assert_int_equal(p.att[2].len, strlen("a text attachment"));
    assert_memory_equal(p.att[2].data, "a text attachment", p.att[2].len);

    assert_string_equal(p.att[3].content_type, "message/rfc822");
    assert_string_equal(p.att[3].filename, "attachment-4.eml");
    assert_int_equal(p.att[3].len, strlen("From: q@x.test\r\nSubject: inner\r\n\r\ninner body"));
    assert_memory_equal(p.att[3].data, "From: q@x.test\r\nSubject: inner\r\n\r\ninner body",
                        p.att[3].len);
    assert_false(p.opaque);
    mime_parts_free(&p);
}

/* The same message with LF line ends takes apart the same way. */
static void test_lf_line_ends(void **state)
{
    struct mime_parts a, b;
    char *lf = strdup(FULL);
    size_t o = 0;

    (void)state;
    for (size_t i = 0; lf[i] != '\0'; i++)
        if (lf[i] != '\r')
            lf[o++] = lf[i];
    lf[o] = '\0';
    parse_ok(FULL, &a);
    parse_ok(lf, &b);
    assert_string_equal(a.subject, b.subject);
    assert_string_equal(a.html, b.html);
    assert_int_equal(a.natt, b.natt);
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(a.att[i].len, b.att[i].len);
        assert_memory_equal(a.att[i].data, b.att[i].data, a.att[i].len);
    }
    mime_parts_free(&a);
    mime_parts_free(&b);
    free(lf);
}

struct simple_case {
    const char *name;
    const char *msg;
    const char *from;             /* "" when none */
    const char *subject;          /* NULL when none */
    const char *text, *html;      /* NULL when none */
    size_t natt;
    int opaque;
};

static const struct simple_case simple[] = {
    {"text only, no subject", "From: a@x.test\r\nTo: b@y.test\r\n\r\nhello\r\n", "a@x.test", NULL,
     "hello\r\n", NULL, 0, 0},
    {"no From at all", "To: b@y.test\r\nSubject: s\r\n\r\nbody\r\n", "", "s", "body\r\n", NULL,
     0, 0},
    {"html only", "From: a@x.test\r\nSubject: h\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n",
     "a@x.test", "h", NULL, "<b>x</b>\r\n", 0, 0},
    {"8-bit UTF-8 body, no MIME headers",
     "From: a@x.test\r\nSubject: \xc3\xbc\r\n\r\n\xc3\xa4\xc3\xb6\r\n", "a@x.test",
     "\xc3\xbc", "\xc3\xa4\xc3\xb6\r\n", NULL, 0, 0},
    {"a second inline text part is an attachment",
     "From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     "Content-Type: text/plain\r\n\r\none\r\n--b\r\nContent-Type: image/gif\r\n\r\nGIF\r\n"
     "--b\r\nContent-Type: text/plain\r\n\r\ntwo\r\n--b--\r\n",
     "a@x.test", NULL, "one", NULL, 2, 0},
    {"attachment disposition on text/html",
     "From: a@x.test\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     "Content-Type: text/plain\r\n\r\nbody\r\n--b\r\nContent-Type: text/html\r\n"
     "Content-Disposition: attachment\r\n\r\n<p>file</p>\r\n--b--\r\n",
     "a@x.test", NULL, "body", NULL, 1, 0},
    {"multipart/signed is opaque",
     "From: a@x.test\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\";"
     " micalg=sha-256; boundary=s\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\nsigned\r\n--s\r\n"
     "Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
     "Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--s--\r\n",
     "a@x.test", NULL, "signed", NULL, 1, 1},
    {"S/MIME enveloped data is opaque",
     "From: a@x.test\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data;"
     " name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n\r\nAAEC\r\n",
     "a@x.test", NULL, NULL, NULL, 1, 1},
    {"empty body", "From: a@x.test\r\nSubject: e\r\n\r\n", "a@x.test", "e", "", NULL, 0, 0},
};

static void test_simple_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(simple) / sizeof(simple[0]); i++) {
        const struct simple_case *c = &simple[i];
        struct mime_parts p;

        parse_ok(c->msg, &p);
        if (strcmp(p.from.addr, c->from) != 0)
            fail_msg("%s: from %s", c->name, p.from.addr);
        if ((c->subject == NULL) != (p.subject == NULL) ||
            (c->subject != NULL && strcmp(c->subject, p.subject) != 0))
            fail_msg("%s: subject %s", c->name, p.subject ? p.subject : "(none)");
        if ((c->text == NULL) != (p.text == NULL) ||
            (c->text != NULL && strcmp(c->text, p.text) != 0))
            fail_msg("%s: text [%s]", c->name, p.text ? p.text : "(none)");
        if ((c->html == NULL) != (p.html == NULL) ||
            (c->html != NULL && strcmp(c->html, p.html) != 0))
            fail_msg("%s: html [%s]", c->name, p.html ? p.html : "(none)");
        if (p.natt != c->natt)
            fail_msg("%s: %zu attachments", c->name, p.natt);
        if (p.opaque != c->opaque)
            fail_msg("%s: opaque %d", c->name, p.opaque);
        mime_parts_free(&p);
    }
}

/* Every octet value survives base64 decoding; raw 8-bit header bytes that
 * are not UTF-8 become U+FFFD, so the JSON stays valid. */
static void test_binary_and_invalid_utf8(void **state)
{
    static const char b64[] =
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+P0BB"
        "QkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWltcXV5fYGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6e3x9fn+AgYKD"
        "hIWGh4iJiouMjY6PkJGSk5SVlpeYmZqbnJ2en6ChoqOkpaanqKmqq6ytrq+wsbKztLW2t7i5uru8vb6/wMHCw8TF"
        "xsfIycrLzM3Oz9DR0tPU1dbX2Nna29zd3t/g4eLj5OXm5+jp6uvs7e7v8PHy8/T19vf4+fr7/P3+/w==";
    char msg[2048];
    struct mime_parts p;

    (void)state;
    snprintf(msg, sizeof(msg),
             "From: a@x.test\r\nX-Latin: caf\xe9\r\nContent-Type: multipart/mixed; boundary=b\r\n"
             "\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b\r\n"
             "Content-Type: application/octet-stream\r\nContent-Disposition: attachment; "
             "filename=all.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n%s\r\n--b--\r\n", b64);
    parse_ok(msg, &p);
    assert_int_equal(p.natt, 1);
    assert_int_equal(p.att[0].len, 256);
    for (size_t i = 0; i < 256; i++)
        assert_int_equal(p.att[0].data[i], i);
    assert_string_equal(header(&p, "X-Latin"), "caf\xef\xbf\xbd");
    mime_parts_free(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_message),
        cmocka_unit_test(test_lf_line_ends),
        cmocka_unit_test(test_simple_table),
        cmocka_unit_test(test_binary_and_invalid_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
