#include "lib/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

int log_min_level = LOG_INFO;

static const char *const log_level_names[] = {
    [LOG_DEBUG] = "debug", [LOG_INFO] = "info", [LOG_WARN] = "warn",
    [LOG_ERR] = "error", [LOG_FATAL] = "fatal",
};

int log_set_level(const char *name)
{
    for (int i = LOG_DEBUG; i <= LOG_ERR; i++) {
        if (strcmp(name, log_level_names[i]) == 0) {
            log_min_level = i;
            return 0;
        }
    }
    return -1;
}

static void log_vwrite(int level, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));

static void log_vwrite(int level, const char *fmt, va_list ap)
{
    char line[4096];
    struct timeval tv;
    struct tm tm;
    size_t off;
    int n;

    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    off = strftime(line, sizeof(line), "ts=%Y-%m-%dT%H:%M:%S", &tm);
    n = snprintf(line + off, sizeof(line) - off, ".%03dZ level=%s ",
                 (int)(tv.tv_usec / 1000), log_level_names[level]);
    off += (size_t)n;
    n = vsnprintf(line + off, sizeof(line) - off - 1, fmt, ap);
    if (n < 0)
        n = 0;
    off += (size_t)n;
    if (off > sizeof(line) - 2)
        off = sizeof(line) - 2;
    line[off++] = '\n';
    /* One write(2) per line keeps lines whole when several processes share
     * the stream. */
    fwrite(line, 1, off, stderr);
    fflush(stderr);
}

void log_write(int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(level, fmt, ap);
    va_end(ap);
}

void log_fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(LOG_FATAL, fmt, ap);
    va_end(ap);
    exit(1);
}

const char *log_quote(char *out, size_t n, const char *s, size_t len)
{
    size_t o = 0, i;
    int bare = len > 0;

    if (n < 8) {
        if (n)
            out[0] = '\0';
        return out;
    }
    for (i = 0; i < len && bare; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= ' ' || c == '"' || c == '=' || c == '\\' || c == 0x7f)
            bare = 0;
    }
    if (bare && len < n) {
        memcpy(out, s, len);
        out[len] = '\0';
        return out;
    }
    out[o++] = '"';
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[5];
        size_t el;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            el = 2;
        } else if (c < ' ' || c == 0x7f) {
            snprintf(esc, sizeof(esc), "\\x%02x", c);
            el = 4;
        } else {
            esc[0] = (char)c;
            el = 1;
        }
        if (o + el + 5 > n) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        memcpy(out + o, esc, el);
        o += el;
    }
    out[o++] = '"';
    out[o] = '\0';
    return out;
}
