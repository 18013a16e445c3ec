/*
 * xmalloc: allocation that never returns NULL.
 *
 * Allocation failure is not a condition a mail server can recover from in
 * the middle of a protocol exchange, so every allocation goes through these
 * wrappers, which log and abort on failure (as Redis zmalloc and Postfix
 * mymalloc do). Call sites never test for NULL.
 */
#ifndef MF_XMALLOC_H
#define MF_XMALLOC_H

#include <stddef.h>

void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
void *xmemdup(const void *p, size_t n);

#endif
