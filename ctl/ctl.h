/*
 * ctl: what every mailferryctl command shares: the loaded configuration,
 * one synchronous Redis connection (hiredis), the output mode, error
 * reporting and the exit codes. docs/ctl.md describes the commands for
 * operators.
 *
 * mailferryctl is a short-lived process that runs one command and exits,
 * so it uses hiredis' blocking API: every ctl_redis_*() call waits for its
 * reply (at most [queue] timeout seconds). A failed connection or a lost
 * reply is reported once, on stderr, and the command ends with
 * CTL_EXIT_RUNTIME; error replies are the caller's to judge.
 */
#ifndef MF_CTL_H
#define MF_CTL_H

#include <hiredis/hiredis.h>
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/config.h"

/* Exit codes of mailferryctl. */
#define CTL_EXIT_OK 0
#define CTL_EXIT_RUNTIME 1        /* Redis unreachable or failing */
#define CTL_EXIT_USAGE 2          /* bad arguments, bad configuration, rejected value */

/* Seconds allowed for the TCP connection to Redis. */
#define CTL_CONNECT_TIMEOUT_S 2

struct ctl {
    struct mf_config cfg;     /* loaded by the caller with config_load() */
    int json;                 /* --json: machine-readable output on stdout */
    redisContext *redis;      /* NULL until ctl_redis_connect() */
    char where[300];          /* "host:port" of Redis, for messages */
};

/* Prints "mailferryctl: <message>" and a newline on stderr. */
void ctl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Connects to the Redis of cfg->queue.url with a CTL_CONNECT_TIMEOUT_S
 * timeout, sets the command timeout to [queue] timeout, and sends AUTH and
 * SELECT as the URL asks. Returns 0, or CTL_EXIT_RUNTIME after printing
 * "mailferryctl: cannot reach Redis at host:port: <reason>" (or the AUTH /
 * SELECT failure). Calling it again when connected does nothing.
 */
int ctl_redis_connect(struct ctl *c);

/* Closes the connection (if any) and frees the configuration. */
void ctl_close(struct ctl *c);

/*
 * Sends one command, its arguments given as NUL-terminated strings with a
 * NULL after the last, and returns the reply, which the caller frees with
 * freeReplyObject(). An error reply is returned like any other. NULL means
 * the connection failed (the reason was printed; the context is unusable).
 */
redisReply *ctl_redis_cmd(struct ctl *c, const char *arg0, ...) __attribute__((sentinel));

/* ctl_redis_cmd() over an argument vector. */
redisReply *ctl_redis_cmdv(struct ctl *c, size_t argc, const char **argv);

/*
 * Like ctl_redis_cmd(), but an error reply is a failure too: it is printed
 * as "mailferryctl: Redis at host:port: <COMMAND>: <error>", freed, and
 * NULL is returned.
 */
redisReply *ctl_redis_ok(struct ctl *c, const char *arg0, ...) __attribute__((sentinel));

/* Returns a new string: the configured key prefix followed by name. The
 * caller frees it. */
char *ctl_key(const struct ctl *c, const char *name);

/* ctl_key() of a name built with printf formatting. */
char *ctl_keyf(const struct ctl *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Returns a JSON string of s. Text that is not valid UTF-8 (a hand-written
 * Redis field, say) keeps its ASCII characters and shows every other byte
 * as '?', so the output stays valid JSON. */
json_t *ctl_json_string(const char *s);

/* Sets o[key] = v (a new reference, consumed), with key made valid UTF-8
 * as ctl_json_string() does. */
void ctl_json_set(json_t *o, const char *key, json_t *v);

/* Parses a decimal integer reply (an INTEGER, or a STRING of digits such
 * as HGET answers). Returns 0, or -1 for NIL, other types and bad text. */
int ctl_reply_int(const redisReply *r, long long *out);

/* Parses the milliseconds part of a stream entry id "<ms>-<seq>". Returns
 * 0 or -1. */
int ctl_stream_id_ms(const char *id, int64_t *ms);

/* Writes into out (size n) the id that immediately follows the stream id
 * "<ms>-<seq>" (the first id XRANGE should return after it). Returns 0,
 * or -1 for a malformed id. */
int ctl_stream_id_next(const char *id, char *out, size_t n);

#endif
