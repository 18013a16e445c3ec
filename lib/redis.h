/*
 * redis: one asynchronous Redis connection on the libuv loop (hiredis async
 * with its libuv adapter), shared by every module that talks to Redis: the
 * gateway's queue writer, the router, mailferryctl's live views.
 *
 * What it adds to hiredis:
 *   - connection management: connect, AUTH and SELECT from the URL, a
 *     caller hook run after every (re)connect (to create consumer groups,
 *     check settings), reconnect with backoff (100 ms doubling to 5 s)
 *     after any loss, one log line per state change;
 *   - a timeout: a command older than timeout seconds drops the connection
 *     (hiredis 0.14 has none), which fails every pending command;
 *   - exactly-once callbacks, always from the loop: a command issued while
 *     disconnected fails at once (asynchronously), a lost connection fails
 *     everything in flight;
 *   - Lua scripts by SHA1 (EVALSHA, falling back to EVAL on NOSCRIPT);
 *   - MULTI/EXEC groups reported as one result;
 *   - a count of bytes in flight, for backpressure.
 *
 * hiredis writes with write(2): a process using this module must ignore
 * SIGPIPE. Pub/sub and MONITOR are not supported (one reply per command is
 * assumed). All functions are for the loop's thread only.
 */
#ifndef MF_REDIS_H
#define MF_REDIS_H

#include <stddef.h>
#include <hiredis/hiredis.h>
#include <uv.h>

#include "lib/config.h"

struct redis;

/*
 * reply is the command's reply (owned by hiredis, valid during the call
 * only), or NULL on failure with err set ("redis: connection lost",
 * "redis: timeout", "redis: not connected"). A Redis error reply
 * (REDIS_REPLY_ERROR) is passed as a reply, not as a failure; use
 * redis_reply_error() to tell.
 *
 * Every callback is made exactly once and never from inside the call that
 * issued the command. Other failure texts: "redis: closed" (redis_close()
 * was called), "redis: cannot format command" (bad format string or
 * arguments), and for redis_multi() "redis: transaction failed: <error>"
 * and "redis: outcome unknown". A callback may issue new commands, and may
 * call redis_close().
 */
typedef void (*redis_cb)(struct redis *r, const redisReply *reply, const char *err, void *arg);

/*
 * Called after every successful connect and AUTH/SELECT, before the
 * connection is declared ready. The hook issues its own commands (they run
 * before any queued user command) and must call redis_hook_done(r, 0) when
 * they succeeded or redis_hook_done(r, -1) to drop and retry the
 * connection.
 *
 * The hook is called from the loop. Until redis_hook_done(r, 0), only
 * commands issued from inside the hook or from inside callbacks of the
 * hook's commands are sent; others fail with "redis: not connected". The
 * hook, and its commands, count against opts.timeout. redis_hook_done()
 * calls made when no hook is pending (e.g. after the connection was lost)
 * are ignored.
 */
typedef void (*redis_ready_hook)(struct redis *r, void *arg);

struct redis_opts {
    const struct config_redis *url;
    int timeout;                  /* seconds a command may take */
    const char *name;             /* for logs: "queue", "router" */
    redis_ready_hook hook;        /* may be NULL */
    void *hook_arg;
};

struct redis *redis_new(uv_loop_t *loop, const struct redis_opts *opts);
void redis_hook_done(struct redis *r, int status);

/* Fails pending commands, disconnects, closes handles, then calls
 * closed(arg) from the loop. Pending commands fail with "redis: closed"
 * (a MULTI whose EXEC was already written with "redis: outcome unknown");
 * commands issued before closed() runs fail with "redis: closed"; no
 * callback is made after closed(). r is freed before closed() runs. */
void redis_close(struct redis *r, void (*closed)(void *arg), void *arg);

int redis_ready(const struct redis *r);

/* One command; argv/lens are copied before return. */
void redis_command(struct redis *r, redis_cb cb, void *arg, int argc, const char **argv,
                   const size_t *lens);

/* One command from a printf-like hiredis format ("%s", "%b" with length). */
void redis_commandf(struct redis *r, redis_cb cb, void *arg, const char *fmt, ...);

/*
 * Runs ncmds commands inside MULTI ... EXEC. cb gets the EXEC reply (an
 * array with one reply per command), or NULL with err when the transaction
 * did not execute (nothing of it was applied) or its outcome is unknown
 * (connection lost after EXEC was sent: err says "redis: outcome unknown").
 *
 * "After EXEC was sent" means EXEC's bytes were all written to the socket;
 * the connection then being lost for any reason (including a timeout or
 * redis_close()) gives "redis: outcome unknown". A command refused while
 * queueing (wrong arity, unknown command) gives
 * "redis: transaction failed: <that command's error>". A transaction that
 * executed with a runtime error inside (WRONGTYPE) is a success: the error
 * is the corresponding element of the array. The arguments are copied
 * before return; lenss (or one of its entries) may be NULL for C strings.
 */
void redis_multi(struct redis *r, redis_cb cb, void *arg, int ncmds, const int *argcs,
                 const char *const *const *argvs, const size_t *const *lenss);

/* A Lua script, loaded lazily: sha1 is computed from the source at
 * redis_script_init(). */
struct redis_script {
    const char *source;
    char sha1[41];
};
void redis_script_init(struct redis_script *s, const char *source);

/* EVALSHA script numkeys keys... args... ; argv holds keys then args. On a
 * NOSCRIPT error the same call is sent again as EVAL with the source
 * (which loads the script), transparently. argv/lens are copied before
 * return (lens may be NULL for C strings); s and s->source must stay valid
 * until cb has been called (scripts are normally static). */
void redis_eval(struct redis *r, struct redis_script *s, redis_cb cb, void *arg, int nkeys,
                int argc, const char **argv, const size_t *lens);

/* Bytes of commands sent whose replies have not arrived. */
size_t redis_pending_bytes(const struct redis *r);

/* Called from the loop when redis_pending_bytes() crosses high_water going
 * up (paused=1) and low_water going down (paused=0). */
void redis_set_backpressure(struct redis *r, size_t high_water, size_t low_water,
                            void (*on_change)(int paused, void *arg), void *arg);

/* Returns the error text of an error reply, or NULL. */
const char *redis_reply_error(const redisReply *reply);

#endif
