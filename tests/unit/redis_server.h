/*
 * Shared fixture for the unit tests that run against a real redis-server
 * (tests/unit/test_queue.c, tests/unit/test_redis.c).
 *
 * redis_server_* starts a private redis-server child (127.0.0.1, a free
 * port, no persistence, a temporary --dir) with fork/exec and stops it by
 * PID. Tests that need Redis to fail kill it, pause it with SIGSTOP (resume
 * with SIGCONT), or restart it on the same port with redis_server_start().
 *
 * The helpers below it run a libuv loop until a condition holds and capture
 * what the module under test logs to stderr.
 *
 * Every function here reports failure through cmocka (assert_*, fail_msg),
 * so it may only be called from inside a running cmocka test or group
 * setup/teardown.
 */
#ifndef MF_TESTS_UNIT_REDIS_SERVER_H
#define MF_TESTS_UNIT_REDIS_SERVER_H

#include <sys/types.h>

#include <hiredis/hiredis.h>
#include <uv.h>

/* The group's server: its temporary directory, port and PID (0 while it is
 * stopped). */
struct redis_server {
    char dir[64];
    int port;
    pid_t pid;
};

/* Creates the directory /tmp/mf-test-<tag>.XXXXXX, picks a free port and
 * starts a server there. Returns 0, or -1 when the directory cannot be
 * created (the caller returns it from its cmocka group setup). */
int redis_server_setup(struct redis_server *s, const char *tag);

/* Ends a capture a failed test left active, stops the server (a paused one
 * too) and removes its directory, with the stderr.log a capture may have
 * left; the caller has removed any other file it put there. */
void redis_server_teardown(struct redis_server *s);

/* A TCP port on 127.0.0.1 that was free a moment ago. */
int redis_server_free_port(void);

/* Whether something on port answers PING at all (any reply, an error such as
 * NOAUTH included), within 200 ms. */
int redis_server_answers(int port);

/* Starts redis-server on port with dir as --dir, then the extra arguments
 * (NULL-terminated, may be NULL; a later option overrides an earlier one),
 * and waits until it answers. Fails the test if it exits or does not answer
 * within 10 s. */
pid_t redis_server_start(const char *dir, int port, const char *const *extra);

/* Kills the server with SIGKILL and reaps it; pid <= 0 is a no-op. SIGKILL
 * also ends a stopped process, and no SIGCONT is sent first, so that a
 * paused Redis never gets to run what is in its socket. */
void redis_server_stop(pid_t pid);

/* A synchronous client for checks, AUTHed (when password is not NULL) and
 * SELECTed as asked. The caller frees it with redisFree(). */
redisContext *redis_server_connect(int port, const char *password, int db);

/* Runs the loop until cond(arg) holds or ms pass; returns cond(arg). */
int run_until(uv_loop_t *loop, int (*cond)(void *), void *arg, unsigned ms);

/* Runs the loop for ms. */
void run_for(uv_loop_t *loop, unsigned ms);

/* Captures what the module logs (stderr) into a file while active. */
struct capture {
    int saved;
    char path[128];
};

/* Redirects stderr to dir/stderr.log. */
void capture_start(struct capture *c, const char *dir);

/* Restores stderr, echoes the captured text, removes the file and returns
 * the text (caller frees). */
char *capture_stop(struct capture *c);

/* Restores stderr if a capture is still active: a test that failed inside
 * one (cmocka jumps out) must not leave stderr redirected for the next. */
void capture_abandon(void);

/* How many times needle occurs in text. */
int count_substr(const char *text, const char *needle);

#endif
