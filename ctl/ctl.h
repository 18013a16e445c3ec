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
#define CTL_EXIT_NOT_FOUND 1      /* no such message or route state: the
                                     runtime status, with its own message */

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

/* The value after the STRING element name in a flat [name, value, ...]
 * array (HGETALL, XINFO, the fields of a stream entry), or NULL. */
const redisReply *ctl_reply_field(const redisReply *r, const char *name);

/* Reads Redis' clock (TIME) in ms since the epoch: every mailferryctl
 * command measures ages and due times against the clock the routers'
 * stream ids come from. Returns 0 or CTL_EXIT_RUNTIME (printed). */
int ctl_redis_time(struct ctl *c, int64_t *now_ms);

/*
 * Pipelining: ctl_redis_append() queues a command without waiting for its
 * reply (returns 0, or -1 after printing the failure); ctl_redis_reply()
 * then returns the replies in order, like ctl_redis_cmd() (NULL when the
 * connection failed). Every appended command must have its reply read
 * before the next ctl_redis_cmd().
 */
int ctl_redis_append(struct ctl *c, size_t argc, const char **argv);
redisReply *ctl_redis_reply(struct ctl *c);

/* ---- transactions ---------------------------------------------------------
 * ctl_multi_begin() sends MULTI; ctl_multi_queue() checks the reply of a
 * command sent inside it (it must be QUEUED) and frees it, returning 0 or
 * -1 (printed; a NULL reply is a lost connection); ctl_multi_end() sends
 * DISCARD when queued (the combined status of ctl_multi_queue(), 0 or -1)
 * failed, else EXEC. ctl_multi_end() returns CTL_EXIT_OK, CTL_EXIT_RUNTIME,
 * or -1 when a WATCHed key changed and nothing was done; with exec not
 * NULL it hands over EXEC's array of replies on success (the caller frees
 * it). ctl_unwatch() drops the WATCH of an abandoned transaction.
 */
int ctl_multi_begin(struct ctl *c);
int ctl_multi_queue(struct ctl *c, redisReply *r);
int ctl_multi_end(struct ctl *c, int queued, redisReply **exec);
void ctl_unwatch(struct ctl *c);

/* Parses a sorted-set score or decimal time ("1715170000000", "1.7e12")
 * as ms. Returns 0 or -1. */
int ctl_parse_ms(const char *s, int64_t *out);

/* Parses a duration for the command line: a whole number followed by s,
 * m, h, d or w (no unit: seconds), e.g. "90", "30m", "2h", "1d", at most
 * 10 years. Returns 0 with *ms set, or -1. */
int ctl_parse_duration(const char *s, int64_t *ms);

/* Parses all of s as a decimal count in [min, max]. Returns 0 or -1. */
int ctl_parse_count(const char *s, long long min, long long max, long long *out);

/* Writes a duration as "42s", "3m12s", "2h05m" or "3d04h" (negative
 * durations as 0s). */
void ctl_fmt_duration(int64_t ms, char *out, size_t n);

/* Writes a time (ms since the epoch) as "2024-05-08 13:04:10" (UTC). */
void ctl_fmt_time(int64_t ms, char *out, size_t n);

/* Prints o on stdout as indented JSON, in insertion order, followed by a
 * newline, and releases o. */
void ctl_json_print(json_t *o);

/* A set of strings (message ids seen while walking the queue). */
struct ctl_set {
    char **v;                 /* open addressing, NULL = free slot */
    size_t cap, n;
};

/* Adds a copy of s. Returns 1 when s was new, 0 when already present. */
int ctl_set_add(struct ctl_set *s, const char *str);
void ctl_set_free(struct ctl_set *s);

/* Parses the milliseconds part of a stream entry id "<ms>-<seq>". Returns
 * 0 or -1. */
int ctl_stream_id_ms(const char *id, int64_t *ms);

/* Writes into out (size n) the id that immediately follows the stream id
 * "<ms>-<seq>" (the first id XRANGE should return after it). Returns 0,
 * or -1 for a malformed id. */
int ctl_stream_id_next(const char *id, char *out, size_t n);

#endif
