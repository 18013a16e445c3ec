/*
 * Unit tests for lib/sasl.c: strict base64 (RFC 4648), and the PLAIN
 * (RFC 4616) and LOGIN payloads of SMTP AUTH (RFC 4954).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "lib/sasl.h"

#define S(lit) lit, sizeof(lit) - 1

/* RFC 4648 section 10. */
static const struct {
    const char *raw;
    const char *b64;
} rfc4648[] = {
    {"", ""},
    {"f", "Zg=="},
    {"fo", "Zm8="},
    {"foo", "Zm9v"},
    {"foob", "Zm9vYg=="},
    {"fooba", "Zm9vYmE="},
    {"foobar", "Zm9vYmFy"},
};

static void test_b64_rfc4648_vectors(void **state)
{
    unsigned char dec[16];
    char enc[16];

    (void)state;
    for (size_t i = 0; i < sizeof(rfc4648) / sizeof(rfc4648[0]); i++) {
        size_t rlen = strlen(rfc4648[i].raw), blen = strlen(rfc4648[i].b64);

        assert_int_equal(sasl_b64_decode(rfc4648[i].b64, blen, dec, sizeof(dec)), (long)rlen);
        assert_memory_equal(dec, rfc4648[i].raw, rlen);
        assert_int_equal(sasl_b64_encode((const unsigned char *)rfc4648[i].raw, rlen,
                                         enc, sizeof(enc)), (long)blen);
        assert_string_equal(enc, rfc4648[i].b64);
    }
}

/* Malformed input is rejected, never decoded leniently. */
static const struct {
    const char *name;
    const char *in;
    size_t len;
} b64_bad[] = {
    {"lone pad", S("=")},
    {"two pads", S("==")},
    {"four pads", S("====")},
    {"three pads", S("Z===")},
    {"length 1", S("Z")},
    {"length 2 unpadded", S("Zg")},
    {"length 3 unpadded", S("Zm8")},
    {"length 3 padded", S("Zg=")},
    {"length 5", S("Zg===")},
    {"pad not final", S("Zg=a")},
    {"pad in middle", S("Zg==Zg==")},
    {"pad in middle 2", S("Zm8=Zm9v")},
    {"trailing crlf", S("Zm9vYg==\r\n")},
    {"trailing lf", S("Zm9v\n")},
    {"leading space", S(" Zm9v")},
    {"inner space", S("Zm9 vYmF")},
    {"spaces only", S("    ")},
    {"tab", S("Zm9v\tZm9v")},
    {"url-safe minus", S("-_==")},
    {"bad char", S("Zm9*")},
    {"nul inside", S("Zg\0=")},
    {"high byte", S("Zm9\xff")},
    {"nonzero pad bits one pad", S("Zm9=")},
    {"nonzero pad bits two pads", S("Zh==")},
    {"cancel star", S("*")},
};

static void test_b64_rejects(void **state)
{
    unsigned char dec[32];

    (void)state;
    for (size_t i = 0; i < sizeof(b64_bad) / sizeof(b64_bad[0]); i++) {
        if (sasl_b64_decode(b64_bad[i].in, b64_bad[i].len, dec, sizeof(dec)) != -1)
            fail_msg("accepted malformed base64 \"%s\"", b64_bad[i].name);
    }
}

/* outmax is honoured exactly, with padding not counted and not written. */
static void test_b64_decode_outmax(void **state)
{
    unsigned char dec[16];

    (void)state;
    assert_int_equal(sasl_b64_decode(S("Zm9vYmFy"), dec, 6), 6);
    assert_int_equal(sasl_b64_decode(S("Zm9vYmFy"), dec, 5), -1);

    memset(dec, 0xAA, sizeof(dec));
    assert_int_equal(sasl_b64_decode(S("Zm9vYg=="), dec, 4), 4);
    assert_memory_equal(dec, "foob", 4);
    for (size_t i = 4; i < sizeof(dec); i++)
        assert_int_equal(dec[i], 0xAA);
    assert_int_equal(sasl_b64_decode(S("Zm9vYg=="), dec, 3), -1);

    memset(dec, 0xAA, sizeof(dec));
    assert_int_equal(sasl_b64_decode(S("Zm9vYmE="), dec, 5), 5);
    assert_memory_equal(dec, "fooba", 5);
    assert_int_equal(dec[5], 0xAA);

    assert_int_equal(sasl_b64_decode(S(""), NULL, 0), 0);
    assert_int_equal(sasl_b64_decode(S("Zg=="), dec, 0), -1);
}

static void test_b64_encode_outmax(void **state)
{
    char enc[16];

    (void)state;
    /* Eight characters and the NUL. */
    assert_int_equal(sasl_b64_encode((const unsigned char *)"foobar", 6, enc, 9), 8);
    assert_string_equal(enc, "Zm9vYmFy");
    assert_int_equal(sasl_b64_encode((const unsigned char *)"foobar", 6, enc, 8), -1);
    assert_int_equal(sasl_b64_encode((const unsigned char *)"f", 1, enc, 5), 4);
    assert_string_equal(enc, "Zg==");
    assert_int_equal(sasl_b64_encode((const unsigned char *)"f", 1, enc, 4), -1);
    assert_int_equal(sasl_b64_encode((const unsigned char *)"", 0, enc, 1), 0);
    assert_string_equal(enc, "");
    assert_int_equal(sasl_b64_encode((const unsigned char *)"", 0, enc, 0), -1);
}

/* Every length and all byte values survive encode then decode. */
static void test_b64_roundtrip(void **state)
{
    unsigned char raw[300], dec[300];
    char enc[401];
    uint32_t x = 12345;

    (void)state;
    for (size_t i = 0; i < sizeof(raw); i++) {
        x = x * 1103515245u + 12345u;
        raw[i] = (unsigned char)(x >> 16);
    }
    for (size_t n = 0; n <= sizeof(raw); n++) {
        long e = sasl_b64_encode(raw, n, enc, sizeof(enc));

        assert_int_equal(e, (long)((n + 2) / 3 * 4));
        assert_int_equal(strlen(enc), (size_t)e);
        assert_int_equal(sasl_b64_decode(enc, (size_t)e, dec, n), (long)n);
        assert_memory_equal(dec, raw, n);
        if (n > 0)
            assert_int_equal(sasl_b64_decode(enc, (size_t)e, dec, n - 1), -1);
    }
}

/* Literal initial responses: the two examples of RFC 4616 section 4. */
static void test_plain_rfc4616_examples(void **state)
{
    struct sasl_plain p;

    (void)state;
    assert_int_equal(sasl_plain_decode(S("AHRpbQB0YW5zdGFhZnRhbnN0YWFm"), &p), 0);
    assert_string_equal(p.authzid, "");
    assert_string_equal(p.authcid, "tim");
    assert_string_equal(p.passwd, "tanstaaftanstaaf");

    assert_int_equal(sasl_plain_decode(S("VXJzZWwAS3VydAB4aXBqM3BsbXE="), &p), 0);
    assert_string_equal(p.authzid, "Ursel");
    assert_string_equal(p.authcid, "Kurt");
    assert_string_equal(p.passwd, "xipj3plmq");
}

struct plain_case {
    const char *name;
    char raw[800];          /* the decoded PLAIN message */
    size_t len;
    int ok;
    const char *authzid, *authcid, *passwd;
};

#define X5 "xxxxx"
#define X15 X5 X5 X5
#define X255 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15 X15
/* A field of exactly SASL_FIELD_MAX octets, and one octet longer. */
#define F255 X255
#define F256 F255 "y"
_Static_assert(sizeof(F255) == SASL_FIELD_MAX + 1, "F255 is 255 octets");

static const struct plain_case plain_cases[] = {
    {"no authzid", S("\0tim\0tanstaaftanstaaf"), 1, "", "tim", "tanstaaftanstaaf"},
    {"with authzid", S("Ursel\0Kurt\0xipj3plmq"), 1, "Ursel", "Kurt", "xipj3plmq"},
    {"same authzid", S("kurt\0kurt\0pw"), 1, "kurt", "kurt", "pw"},
    {"spaces and utf-8", S("\0j\xc3\xb6rg\0p a s s"), 1, "", "j\xc3\xb6rg", "p a s s"},
    {"one-octet fields", S("\0a\0b"), 1, "", "a", "b"},
    {"max authzid", S(F255 "\0u\0p"), 1, F255, "u", "p"},
    {"max authcid", S("\0" F255 "\0p"), 1, "", F255, "p"},
    {"max passwd", S("\0u\0" F255), 1, "", "u", F255},
    {"all fields max", S(F255 "\0" F255 "\0" F255), 1, F255, F255, F255},
    {"long authzid", S(F256 "\0u\0p"), 0, NULL, NULL, NULL},
    {"long authcid", S("\0" F256 "\0p"), 0, NULL, NULL, NULL},
    {"long passwd", S("\0u\0" F256), 0, NULL, NULL, NULL},
    {"all fields long", S(F256 "\0" F256 "\0" F256), 0, NULL, NULL, NULL},
    {"no nul", S("userpass"), 0, NULL, NULL, NULL},
    {"one nul", S("user\0pass"), 0, NULL, NULL, NULL},
    {"one leading nul", S("\0userpass"), 0, NULL, NULL, NULL},
    {"extra trailing nul", S("\0user\0pass\0"), 0, NULL, NULL, NULL},
    {"nul in passwd", S("\0user\0pa\0ss"), 0, NULL, NULL, NULL},
    {"three fields and nul", S("z\0user\0pass\0x"), 0, NULL, NULL, NULL},
    {"empty passwd", S("\0user\0"), 0, NULL, NULL, NULL},
    {"empty passwd with authzid", S("z\0user\0"), 0, NULL, NULL, NULL},
    {"empty authcid", S("\0\0pass"), 0, NULL, NULL, NULL},
    {"only nuls", S("\0\0"), 0, NULL, NULL, NULL},
    {"empty message", S(""), 0, NULL, NULL, NULL},
};

static void test_plain_table(void **state)
{
    char b64[1200];
    struct sasl_plain p;

    (void)state;
    for (size_t i = 0; i < sizeof(plain_cases) / sizeof(plain_cases[0]); i++) {
        const struct plain_case *c = &plain_cases[i];
        long e = sasl_b64_encode((const unsigned char *)c->raw, c->len, b64, sizeof(b64));
        int rc;

        assert_true(e >= 0);
        memset(&p, 'Q', sizeof(p));
        rc = sasl_plain_decode(b64, (size_t)e, &p);
        if (rc != (c->ok ? 0 : -1))
            fail_msg("PLAIN case \"%s\": got %d", c->name, rc);
        if (c->ok) {
            assert_string_equal(p.authzid, c->authzid);
            assert_string_equal(p.authcid, c->authcid);
            assert_string_equal(p.passwd, c->passwd);
        } else {
            /* Nothing half-parsed is left behind on failure. */
            assert_string_equal(p.authzid, "");
            assert_string_equal(p.authcid, "");
            assert_string_equal(p.passwd, "");
        }
    }
}

/* Base64 errors surface as PLAIN errors. */
static void test_plain_bad_base64(void **state)
{
    struct sasl_plain p;

    (void)state;
    assert_int_equal(sasl_plain_decode(S("="), &p), -1);
    assert_int_equal(sasl_plain_decode(S("*"), &p), -1);
    assert_int_equal(sasl_plain_decode(S("AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"), &p), -1);
    assert_int_equal(sasl_plain_decode(S(" AHRpbQB0YW5zdGFhZnRhbnN0YWFm"), &p), -1);
    assert_int_equal(sasl_plain_decode(S("AHRpbQB0YW5zdGFhZnRhbnN0YWF"), &p), -1);
}

static void test_plain_encode(void **state)
{
    char b64[1100];
    struct sasl_plain p;
    long n;

    (void)state;
    n = sasl_plain_encode(NULL, "tim", "tanstaaftanstaaf", b64, sizeof(b64));
    assert_int_equal(n, 28);
    assert_string_equal(b64, "AHRpbQB0YW5zdGFhZnRhbnN0YWFm");
    n = sasl_plain_encode("", "tim", "tanstaaftanstaaf", b64, sizeof(b64));
    assert_string_equal(b64, "AHRpbQB0YW5zdGFhZnRhbnN0YWFm");
    n = sasl_plain_encode("Ursel", "Kurt", "xipj3plmq", b64, sizeof(b64));
    assert_int_equal(n, 28);
    assert_string_equal(b64, "VXJzZWwAS3VydAB4aXBqM3BsbXE=");

    /* Exactly enough room, then one byte short. */
    assert_int_equal(sasl_plain_encode("Ursel", "Kurt", "xipj3plmq", b64, 29), 28);
    assert_int_equal(sasl_plain_encode("Ursel", "Kurt", "xipj3plmq", b64, 28), -1);

    /* The largest message round-trips; longer fields do not fit. */
    n = sasl_plain_encode(F255, F255, F255, b64, sizeof(b64));
    assert_int_equal(n, 1024);
    assert_int_equal(sasl_plain_decode(b64, (size_t)n, &p), 0);
    assert_string_equal(p.authzid, F255);
    assert_string_equal(p.authcid, F255);
    assert_string_equal(p.passwd, F255);
    assert_int_equal(sasl_plain_encode(F256, "u", "p", b64, sizeof(b64)), -1);
    assert_int_equal(sasl_plain_encode(NULL, F256, "p", b64, sizeof(b64)), -1);
    assert_int_equal(sasl_plain_encode(NULL, "u", F256, b64, sizeof(b64)), -1);

    /* Empty fields are encoded as asked, and the decoder rejects them. */
    n = sasl_plain_encode(NULL, "user", "", b64, sizeof(b64));
    assert_true(n > 0);
    assert_int_equal(sasl_plain_decode(b64, (size_t)n, &p), -1);
}

static void test_login(void **state)
{
    char out[SASL_FIELD_MAX + 1];
    char b64[400];
    long n;

    (void)state;
    assert_int_equal(sasl_login_decode(S("dXNlcm5hbWU="), out), 0);
    assert_string_equal(out, "username");
    assert_int_equal(sasl_login_decode(S("cGFzc3dvcmQ="), out), 0);
    assert_string_equal(out, "password");
    assert_int_equal(sasl_login_decode(S(""), out), 0);
    assert_string_equal(out, "");

    /* A NUL cannot be part of a user name or password. */
    assert_int_equal(sasl_login_decode(S("dXNlcgBuYW1l"), out), -1);
    assert_string_equal(out, "");
    /* "*" cancels the exchange (RFC 4954 section 4); it is not base64. */
    assert_int_equal(sasl_login_decode(S("*"), out), -1);
    assert_int_equal(sasl_login_decode(S("dXNlcm5hbWU"), out), -1);
    assert_int_equal(sasl_login_decode(S("dXNlcm5hbWU=\r\n"), out), -1);

    n = sasl_b64_encode((const unsigned char *)F255, 255, b64, sizeof(b64));
    assert_int_equal(sasl_login_decode(b64, (size_t)n, out), 0);
    assert_string_equal(out, F255);
    n = sasl_b64_encode((const unsigned char *)F256, 256, b64, sizeof(b64));
    assert_int_equal(sasl_login_decode(b64, (size_t)n, out), -1);
    assert_string_equal(out, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_b64_rfc4648_vectors),
        cmocka_unit_test(test_b64_rejects),
        cmocka_unit_test(test_b64_decode_outmax),
        cmocka_unit_test(test_b64_encode_outmax),
        cmocka_unit_test(test_b64_roundtrip),
        cmocka_unit_test(test_plain_rfc4616_examples),
        cmocka_unit_test(test_plain_table),
        cmocka_unit_test(test_plain_bad_base64),
        cmocka_unit_test(test_plain_encode),
        cmocka_unit_test(test_login),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
