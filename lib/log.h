/*
 * log: one logfmt line per event on stderr.
 *
 * Every line is "ts=<RFC 3339 UTC> level=<level> <fields>" where the caller
 * supplies the fields as key=value pairs, session or queue id first, and a
 * reason= field for rejections and failures. Values that may hold spaces or
 * quotes go through log_quote(). Levels below the configured minimum cost
 * one comparison.
 */
#ifndef MF_LOG_H
#define MF_LOG_H

#include <stddef.h>

enum log_level { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERR, LOG_FATAL };

extern int log_min_level;

/* Sets the minimum level by name ("debug", "info", "warn", "error").
 * Returns 0, or -1 for an unknown name. */
int log_set_level(const char *name);

void log_write(int level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Logs at LOG_FATAL and exits with status 1. For bad configuration or
 * environment only; broken invariants use assert(). */
void log_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* Writes s into out (size n) as a logfmt value: bare when it holds no
 * space, quote, '=' or control character, else double-quoted with \" \\
 * and \xNN escapes. Truncates with "..." to fit. Returns out. */
const char *log_quote(char *out, size_t n, const char *s, size_t len);

#define log_debug(...) do { if (log_min_level <= LOG_DEBUG) log_write(LOG_DEBUG, __VA_ARGS__); } while (0)
#define log_info(...)  do { if (log_min_level <= LOG_INFO)  log_write(LOG_INFO,  __VA_ARGS__); } while (0)
#define log_warn(...)  do { if (log_min_level <= LOG_WARN)  log_write(LOG_WARN,  __VA_ARGS__); } while (0)
#define log_error(...) do { if (log_min_level <= LOG_ERR)   log_write(LOG_ERR,   __VA_ARGS__); } while (0)

#endif
