/*
 * buf: a growable byte buffer.
 *
 * data is owned by the buf and always NUL-terminated one byte past len (the
 * NUL is not counted), so text can be passed to C string functions. Growth
 * aborts on allocation failure (xmalloc). Ceilings are the caller's job:
 * check len before appending input from the network.
 */
#ifndef MF_BUF_H
#define MF_BUF_H

#include <stdarg.h>
#include <stddef.h>

struct buf {
    char *data;
    size_t len;
    size_t cap;
};

#define BUF_INIT {NULL, 0, 0}

void buf_init(struct buf *b);
void buf_free(struct buf *b);
/* Ensures room for n more bytes (plus the terminating NUL). */
void buf_reserve(struct buf *b, size_t n);
void buf_append(struct buf *b, const void *p, size_t n);
void buf_appends(struct buf *b, const char *s);
void buf_appendf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void buf_vappendf(struct buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Removes the first n bytes (n <= len). */
void buf_consume(struct buf *b, size_t n);
/* Empties the buffer, keeping its memory. */
void buf_reset(struct buf *b);
/* Hands the data over to the caller (who frees it) and empties the buf. */
char *buf_steal(struct buf *b, size_t *len);

#endif
