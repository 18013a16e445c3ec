/*
 * Unit tests for lib/buf.c, the growable byte buffer.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "lib/buf.h"

/* The invariant of buf.h: once allocated, data[len] is NUL and fits. */
static void check_terminated(const struct buf *b)
{
    if (b->data == NULL) {
        assert_int_equal(b->len, 0);
        assert_int_equal(b->cap, 0);
        return;
    }
    assert_true(b->len < b->cap);
    assert_int_equal(b->data[b->len], '\0');
}

static void test_init(void **state)
{
    struct buf a = BUF_INIT, b;

    (void)state;
    memset(&b, 0x5a, sizeof(b));
    buf_init(&b);
    assert_null(a.data);
    assert_int_equal(a.len, 0);
    assert_int_equal(a.cap, 0);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.cap, 0);
    /* Freeing an empty buffer is fine, twice too. */
    buf_free(&a);
    buf_free(&a);
    assert_null(a.data);
}

static void test_append(void **state)
{
    struct buf b = BUF_INIT;

    (void)state;
    buf_append(&b, "abc", 3);
    assert_int_equal(b.len, 3);
    assert_string_equal(b.data, "abc");
    check_terminated(&b);
    buf_append(&b, "de", 2);
    assert_string_equal(b.data, "abcde");
    /* Zero bytes change nothing but the buffer stays terminated. */
    buf_append(&b, NULL, 0);
    assert_int_equal(b.len, 5);
    check_terminated(&b);
    /* Binary data with NULs is kept whole. */
    buf_append(&b, "\0x\0", 3);
    assert_int_equal(b.len, 8);
    assert_memory_equal(b.data, "abcde\0x\0", 8);
    check_terminated(&b);
    buf_free(&b);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.cap, 0);
}

/* An empty append on a fresh buffer allocates, so data is a valid string. */
static void test_append_empty_fresh(void **state)
{
    struct buf b = BUF_INIT;

    (void)state;
    buf_append(&b, "", 0);
    assert_non_null(b.data);
    assert_string_equal(b.data, "");
    check_terminated(&b);
    buf_free(&b);
}

/* Growth across many appends keeps every byte in order. */
static void test_growth(void **state)
{
    struct buf b = BUF_INIT;
    size_t total = 0;

    (void)state;
    for (size_t i = 0; i < 5000; i++) {
        unsigned char chunk[37];
        size_t n = i % sizeof(chunk);

        for (size_t k = 0; k < n; k++)
            chunk[k] = (unsigned char)(total + k);
        buf_append(&b, chunk, n);
        total += n;
        assert_int_equal(b.len, total);
        check_terminated(&b);
    }
    for (size_t k = 0; k < total; k++)
        assert_int_equal((unsigned char)b.data[k], (unsigned char)k);
    buf_free(&b);
}

/* After reserve(n), n bytes are appended without moving the data. */
static void test_reserve(void **state)
{
    struct buf b = BUF_INIT;
    char *before;

    (void)state;
    buf_reserve(&b, 1000);
    assert_non_null(b.data);
    assert_true(b.cap >= 1001);
    assert_int_equal(b.len, 0);
    before = b.data;
    for (int i = 0; i < 100; i++)
        buf_append(&b, "0123456789", 10);
    assert_ptr_equal(b.data, before);
    assert_int_equal(b.len, 1000);
    check_terminated(&b);

    /* Reserving what is already there does not reallocate. */
    buf_reserve(&b, 0);
    assert_ptr_equal(b.data, before);
    buf_reserve(&b, 5000);
    assert_true(b.cap >= b.len + 5001);
    assert_memory_equal(b.data + 990, "0123456789", 10);
    buf_free(&b);
}

static void test_appends(void **state)
{
    struct buf b = BUF_INIT;

    (void)state;
    buf_appends(&b, "hello");
    buf_appends(&b, "");
    buf_appends(&b, ", world");
    assert_string_equal(b.data, "hello, world");
    assert_int_equal(b.len, 12);
    check_terminated(&b);
    buf_free(&b);
}

static void test_appendf(void **state)
{
    struct buf b = BUF_INIT;
    char big[10000];

    (void)state;
    buf_appendf(&b, "%d-%s-%zu", 42, "x", (size_t)7);
    assert_string_equal(b.data, "42-x-7");
    assert_int_equal(b.len, 6);
    buf_appendf(&b, "%c", 'Z');
    assert_string_equal(b.data, "42-x-7Z");
    check_terminated(&b);

    /* An empty result appends nothing. */
    buf_appendf(&b, "%s", "");
    assert_int_equal(b.len, 7);
    check_terminated(&b);

    /* A result longer than the initial capacity and than any stack
     * buffer a caller might guess. */
    memset(big, 'q', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    buf_appendf(&b, "[%s]", big);
    assert_int_equal(b.len, 7 + 2 + sizeof(big) - 1);
    assert_int_equal(b.data[7], '[');
    assert_int_equal(b.data[b.len - 1], ']');
    assert_int_equal(b.data[8 + 5000], 'q');
    check_terminated(&b);
    buf_free(&b);
}

static void test_appendf_empty_fresh(void **state)
{
    struct buf b = BUF_INIT;

    (void)state;
    buf_appendf(&b, "%s", "");
    assert_int_equal(b.len, 0);
    check_terminated(&b);
    buf_free(&b);
}

static void appendf_via_va(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void appendf_via_va(struct buf *b, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    buf_vappendf(b, fmt, ap);
    va_end(ap);
}

static void test_vappendf(void **state)
{
    struct buf b = BUF_INIT;

    (void)state;
    buf_appends(&b, "ts=1 ");
    appendf_via_va(&b, "event=%s n=%u", "accept", 3u);
    assert_string_equal(b.data, "ts=1 event=accept n=3");
    /* Appending long text in pieces across several growths. */
    for (int i = 0; i < 200; i++)
        appendf_via_va(&b, " k%03d=%s", i, "value");
    assert_int_equal(b.len, 21 + 200 * 11);
    assert_memory_equal(b.data + b.len - 11, " k199=value", 11);
    check_terminated(&b);
    buf_free(&b);
}

static void test_consume(void **state)
{
    struct buf b = BUF_INIT;

    (void)state;
    buf_appends(&b, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
    buf_consume(&b, 0);
    assert_int_equal(b.len, 32);
    buf_consume(&b, 17);
    assert_int_equal(b.len, 15);
    assert_string_equal(b.data, "RCPT TO:<c@d>\r\n");
    check_terminated(&b);
    buf_consume(&b, 1);
    assert_string_equal(b.data, "CPT TO:<c@d>\r\n");
    buf_consume(&b, b.len);
    assert_int_equal(b.len, 0);
    assert_string_equal(b.data, "");
    check_terminated(&b);
    /* The memory is kept for the next bytes. */
    assert_true(b.cap > 0);
    buf_appends(&b, "x");
    assert_string_equal(b.data, "x");
    buf_free(&b);

    /* Consuming nothing from an empty, unallocated buffer is harmless. */
    buf_consume(&b, 0);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
}

static void test_reset(void **state)
{
    struct buf b = BUF_INIT;
    char *before;
    size_t cap;

    (void)state;
    buf_reset(&b);
    assert_null(b.data);
    buf_appends(&b, "some text");
    before = b.data;
    cap = b.cap;
    buf_reset(&b);
    assert_int_equal(b.len, 0);
    assert_ptr_equal(b.data, before);
    assert_int_equal(b.cap, cap);
    assert_string_equal(b.data, "");
    buf_appends(&b, "new");
    assert_string_equal(b.data, "new");
    assert_ptr_equal(b.data, before);
    buf_free(&b);
}

static void test_steal(void **state)
{
    struct buf b = BUF_INIT;
    size_t len = 99;
    char *p;

    (void)state;
    buf_append(&b, "abc\0def", 7);
    p = buf_steal(&b, &len);
    assert_non_null(p);
    assert_int_equal(len, 7);
    assert_memory_equal(p, "abc\0def", 8);  /* terminator included */
    assert_null(b.data);
    assert_int_equal(b.len, 0);
    assert_int_equal(b.cap, 0);
    free(p);

    /* The buffer is reusable afterwards, and len may be NULL. */
    buf_appends(&b, "again");
    p = buf_steal(&b, NULL);
    assert_string_equal(p, "again");
    free(p);

    /* Stealing from an empty buffer gives NULL and length 0. */
    len = 99;
    p = buf_steal(&b, &len);
    assert_null(p);
    assert_int_equal(len, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init),
        cmocka_unit_test(test_append),
        cmocka_unit_test(test_append_empty_fresh),
        cmocka_unit_test(test_growth),
        cmocka_unit_test(test_reserve),
        cmocka_unit_test(test_appends),
        cmocka_unit_test(test_appendf),
        cmocka_unit_test(test_appendf_empty_fresh),
        cmocka_unit_test(test_vappendf),
        cmocka_unit_test(test_consume),
        cmocka_unit_test(test_reset),
        cmocka_unit_test(test_steal),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
