/*
 * Unit tests for lib/redis.c against a real redis-server.
 *
 * The test starts its own redis-server through the shared fixture
 * (tests/unit/redis_server.h: 127.0.0.1, a free port, no persistence, a
 * temporary --dir). Tests that need Redis to fail kill it, pause it with
 * SIGSTOP, or restart it on the same port; the struct redis is never
 * recreated to recover, because reconnecting on its own is the contract.
 *
 * Every test ends with redis_close(), runs the loop until closed(), then
 * runs it to completion and checks that uv_loop_close() succeeds: no handle
 * is left behind (and ASan checks that no memory is).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "lib/config.h"
#include "lib/log.h"
#include "lib/redis.h"
#include "tests/unit/redis_server.h"

/* The group's redis-server (see tests/unit/redis_server.h). */
static struct redis_server srv;

/* Runs one command on a fresh synchronous connection to the test server
 * (db 0) and returns the reply (caller frees). */
static redisReply *sync_cmd(const char *fmt, ...)
{
    redisContext *c = redis_server_connect(srv.port, NULL, 0);
    redisReply *v;
    va_list ap;

    va_start(ap, fmt);
    v = redisvCommand(c, fmt, ap);
    va_end(ap);
    assert_non_null(v);
    redisFree(c);
    return v;
}

static int group_setup(void **state)
{
    const char *lvl = getenv("MF_LOG_LEVEL");

    (void)state;
    log_set_level(lvl ? lvl : "info");
    /* hiredis writes with write(2): a peer that died must not kill us. */
    signal(SIGPIPE, SIG_IGN);
    return redis_server_setup(&srv, "redis");
}

static int group_teardown(void **state)
{
    (void)state;
    redis_server_teardown(&srv);
    return 0;
}

/* Each test starts with a running, empty server. */
static int test_setup(void **state)
{
    redisReply *v;

    (void)state;
    capture_abandon();
    if (srv.pid <= 0)
        srv.pid = redis_server_start(srv.dir, srv.port, NULL);
    kill(srv.pid, SIGCONT);
    v = sync_cmd("FLUSHALL");
    freeReplyObject(v);
    return 0;
}

/* ---- loop helpers -------------------------------------------------------------------- */

struct fixture {
    uv_loop_t loop;
    struct config_redis url;
    struct redis *r;
    int closed;
    int calls_at_close;      /* callbacks counted when closed() ran */
    int *calls_counter;
};

static void fixture_init(struct fixture *f, int port)
{
    memset(f, 0, sizeof(*f));
    assert_int_equal(uv_loop_init(&f->loop), 0);
    f->url.host = "127.0.0.1";
    f->url.port = port;
    f->url.db = 0;
}

static void fixture_new(struct fixture *f, int timeout, redis_ready_hook hook, void *hook_arg)
{
    struct redis_opts o;

    memset(&o, 0, sizeof(o));
    o.url = &f->url;
    o.timeout = timeout;
    o.name = "test";
    o.hook = hook;
    o.hook_arg = hook_arg;
    f->r = redis_new(&f->loop, &o);
    assert_non_null(f->r);
}

static int cond_ready(void *arg)
{
    return redis_ready(arg);
}

static int cond_not_ready(void *arg)
{
    return !redis_ready(arg);
}

static int cond_closed(void *arg)
{
    return ((struct fixture *)arg)->closed;
}

static void on_closed(void *arg)
{
    struct fixture *f = arg;

    f->closed++;
    if (f->calls_counter)
        f->calls_at_close = *f->calls_counter;
}

static void fixture_ready(struct fixture *f)
{
    assert_true(run_until(&f->loop, cond_ready, f->r, 5000));
}

/* Closes, waits for closed() and checks that nothing is left. */
static void fixture_finish(struct fixture *f)
{
    redis_close(f->r, on_closed, f);
    f->r = NULL;
    assert_true(run_until(&f->loop, cond_closed, f, 5000));
    assert_int_equal(f->closed, 1);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f->loop), 0);
}

/* ---- command results -------------------------------------------------------------------- */

/* Set while the test is inside a function that issues a command: the
 * contract says the callback never runs from there. */
static int in_issue;

struct result {
    int calls;
    int type;                /* reply type, -1 for a failure */
    char str[256];           /* string/status/error reply, or err on failure */
    size_t len;
    long long integer;
    size_t elements;
    int elem_type[8];
    char elem_str[8][64];
    long long elem_int[8];
    uint64_t at;             /* uv_hrtime() of the callback */
    int *shared_calls;       /* also counted here when set */
    int *order;              /* where this callback's sequence number goes */
    int *seq;
    struct fixture *close_in_cb;   /* redis_close() from inside the callback */
};

static void copy_str(char *out, size_t n, const char *s, size_t len)
{
    if (len >= n)
        len = n - 1;
    memcpy(out, s, len);
    out[len] = '\0';
}

static void on_result(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct result *res = arg;

    assert_int_equal(in_issue, 0);
    assert_non_null(r);
    res->calls++;
    res->at = uv_hrtime();
    if (res->shared_calls)
        (*res->shared_calls)++;
    if (res->order)
        *res->order = (*res->seq)++;
    if (reply == NULL) {
        assert_non_null(err);
        res->type = -1;
        copy_str(res->str, sizeof(res->str), err, strlen(err));
    } else {
        assert_null(err);
        res->type = reply->type;
        res->integer = reply->integer;
        res->len = reply->str ? (size_t)reply->len : 0;
        if (reply->str)
            copy_str(res->str, sizeof(res->str), reply->str, (size_t)reply->len);
        res->elements = reply->type == REDIS_REPLY_ARRAY ? reply->elements : 0;
        for (size_t i = 0; i < res->elements && i < 8; i++) {
            const redisReply *e = reply->element[i];
            res->elem_type[i] = e->type;
            res->elem_int[i] = e->integer;
            if (e->str)
                copy_str(res->elem_str[i], sizeof(res->elem_str[i]), e->str, (size_t)e->len);
        }
    }
    if (res->close_in_cb) {
        struct fixture *f = res->close_in_cb;
        res->close_in_cb = NULL;
        redis_close(r, on_closed, f);
    }
}

static int cond_called(void *arg)
{
    return ((struct result *)arg)->calls > 0;
}

static void cmd(struct redis *r, struct result *res, int argc, const char **argv,
                const size_t *lens)
{
    in_issue = 1;
    redis_command(r, on_result, res, argc, argv, lens);
    in_issue = 0;
    assert_int_equal(res->calls, 0);
}

/* A command from C strings: cmd_s(r, &res, "SET", "k", "v", NULL). */
static void cmd_s(struct redis *r, struct result *res, ...)
{
    const char *argv[16];
    int argc = 0;
    va_list ap;

    va_start(ap, res);
    while (argc < 16 && (argv[argc] = va_arg(ap, const char *)) != NULL)
        argc++;
    va_end(ap);
    cmd(r, res, argc, argv, NULL);
}

static void wait_called(struct fixture *f, struct result *res, unsigned ms)
{
    assert_true(run_until(&f->loop, cond_called, res, ms));
    assert_int_equal(res->calls, 1);
}

/* ---- tests: commands ---------------------------------------------------------------------- */

/* Issues GET chain:key from inside the reply callback of the SET. */
static void on_set_then_get(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct result *res = arg;
    const char *argv[2] = {"GET", "chain:key"};

    assert_null(err);
    assert_int_equal(reply->type, REDIS_REPLY_STATUS);
    redis_command(r, on_result, res, 2, argv, NULL);
    assert_int_equal(res->calls, 0);
}

static void test_commands(void **state)
{
    struct fixture f;
    struct result set = {0}, get = {0}, incr = {0}, fset = {0}, fget = {0}, st = {0};
    static const char bin[] = "a\0b\r\nc";
    const char *setv[3] = {"SET", "bin", bin};
    size_t setl[3] = {3, 3, sizeof(bin) - 1};
    struct result seq[50];
    int order[50], next = 0;

    (void)state;
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, NULL, NULL);
    fixture_ready(&f);

    /* Binary-safe arguments and replies. */
    cmd(f.r, &set, 3, setv, setl);
    assert_true(redis_pending_bytes(f.r) > 0);
    cmd_s(f.r, &get, "GET", "bin", NULL);
    wait_called(&f, &set, 5000);
    wait_called(&f, &get, 5000);
    assert_int_equal(set.type, REDIS_REPLY_STATUS);
    assert_string_equal(set.str, "OK");
    assert_int_equal(get.type, REDIS_REPLY_STRING);
    assert_int_equal(get.len, sizeof(bin) - 1);
    assert_memory_equal(get.str, bin, sizeof(bin) - 1);
    assert_int_equal(redis_pending_bytes(f.r), 0);

    /* An error reply is a reply, not a failure. */
    cmd_s(f.r, &incr, "INCR", "bin", NULL);
    wait_called(&f, &incr, 5000);
    assert_int_equal(incr.type, REDIS_REPLY_ERROR);
    assert_true(strncmp(incr.str, "ERR", 3) == 0);

    /* The printf-like form, with %b. */
    in_issue = 1;
    redis_commandf(f.r, on_result, &fset, "SET %s %b", "fmt key", "x\0y", (size_t)3);
    redis_commandf(f.r, on_result, &fget, "STRLEN %s", "fmt key");
    redis_commandf(f.r, on_result, &st, "%s", "PING");
    in_issue = 0;
    wait_called(&f, &fget, 5000);
    assert_int_equal(fset.calls, 1);
    assert_string_equal(fset.str, "OK");
    assert_int_equal(fget.type, REDIS_REPLY_INTEGER);
    assert_int_equal(fget.integer, 3);
    wait_called(&f, &st, 5000);
    assert_string_equal(st.str, "PONG");

    /* Pipelined commands are answered in order. */
    memset(seq, 0, sizeof(seq));
    for (int i = 0; i < 50; i++) {
        seq[i].order = &order[i];
        seq[i].seq = &next;
        cmd_s(f.r, &seq[i], "INCR", "counter", NULL);
    }
    assert_true(run_until(&f.loop, cond_called, &seq[49], 5000));
    for (int i = 0; i < 50; i++) {
        assert_int_equal(seq[i].calls, 1);
        assert_int_equal(order[i], i);
        assert_int_equal(seq[i].integer, i + 1);
    }
    assert_int_equal(redis_pending_bytes(f.r), 0);

    /* A callback may issue the next command. */
    {
        struct result chained = {0};
        const char *argv[3] = {"SET", "chain:key", "chained"};
        redis_command(f.r, on_set_then_get, &chained, 3, argv, NULL);
        wait_called(&f, &chained, 5000);
        assert_string_equal(chained.str, "chained");
    }
    fixture_finish(&f);
}

static void test_reply_error_helper(void **state)
{
    redisReply e = {0}, s = {0};
    char msg[] = "ERR nope";

    (void)state;
    e.type = REDIS_REPLY_ERROR;
    e.str = msg;
    e.len = (int)strlen(msg);
    s.type = REDIS_REPLY_STATUS;
    s.str = msg;
    s.len = e.len;
    assert_string_equal(redis_reply_error(&e), "ERR nope");
    assert_null(redis_reply_error(&s));
    assert_null(redis_reply_error(NULL));
}

/* Commands issued while not ready fail from the loop, never at once. */
static void test_not_connected_async(void **state)
{
    struct fixture f;
    struct result early = {0}, down = {0}, multi = {0}, ev = {0};
    struct redis_script s;
    struct capture cap;
    char *text;
    int port = redis_server_free_port();
    const int argcs[1] = {1};
    const char *ping[1] = {"PING"};
    const char *const *argvs[1] = {ping};

    (void)state;
    /* Right after redis_new(): still connecting. */
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, NULL, NULL);
    assert_false(redis_ready(f.r));
    cmd_s(f.r, &early, "PING", NULL);
    wait_called(&f, &early, 1000);
    assert_int_equal(early.type, -1);
    assert_string_equal(early.str, "redis: not connected");
    fixture_finish(&f);

    /* Nobody listens: retries are logged once, every kind of call fails. */
    redis_script_init(&s, "return 1");
    fixture_init(&f, port);
    capture_start(&cap, srv.dir);
    fixture_new(&f, 5, NULL, NULL);
    run_for(&f.loop, 1000);
    cmd_s(f.r, &down, "PING", NULL);
    in_issue = 1;
    redis_multi(f.r, on_result, &multi, 1, argcs, argvs, NULL);
    redis_eval(f.r, &s, on_result, &ev, 0, 0, NULL, NULL);
    in_issue = 0;
    assert_int_equal(multi.calls, 0);
    assert_int_equal(ev.calls, 0);
    wait_called(&f, &down, 1000);
    wait_called(&f, &multi, 1000);
    wait_called(&f, &ev, 1000);
    text = capture_stop(&cap);
    assert_string_equal(down.str, "redis: not connected");
    assert_string_equal(multi.str, "redis: not connected");
    assert_string_equal(ev.str, "redis: not connected");
    assert_int_equal(count_substr(text, "event=redis_disconnected name=test"), 1);
    assert_int_equal(count_substr(text, "event=redis_connected"), 0);
    free(text);
    /* Closing during the backoff pause. */
    fixture_finish(&f);
}

/* ---- tests: the hook ------------------------------------------------------------------------ */

struct hook_state {
    struct redis *r;
    int calls;               /* times the hook ran */
    int fail_first;          /* redis_hook_done(-1) on the first run */
    int done_calls;
    int block;               /* start with a 300 ms BLPOP */
    struct result blpop, incr, chained;
};

static void hook_on_chained(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct hook_state *h = arg;

    assert_null(err);
    assert_int_equal(reply->type, REDIS_REPLY_STATUS);
    h->done_calls++;
    redis_hook_done(r, (h->fail_first && h->calls == 1) ? -1 : 0);
}

static void hook_on_incr(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct hook_state *h = arg;
    const char *argv[3] = {"SET", "hook:last", "done"};

    if (reply == NULL) {
        assert_non_null(err);
        return;
    }
    assert_int_equal(reply->type, REDIS_REPLY_INTEGER);
    /* Still in the hook: a command from this callback is sent. */
    assert_false(redis_ready(r));
    redis_command(r, hook_on_chained, h, 3, argv, NULL);
}

static void hook_on_blpop(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct hook_state *h = arg;
    const char *argv[2] = {"INCR", "hook:count"};

    assert_null(err);
    assert_int_equal(reply->type, REDIS_REPLY_NIL);
    redis_command(r, hook_on_incr, h, 2, argv, NULL);
}

static void hook(struct redis *r, void *arg)
{
    struct hook_state *h = arg;

    assert_false(redis_ready(r));
    h->calls++;
    if (h->block && h->calls == 1) {
        const char *argv[3] = {"BLPOP", "hook:none", "0.3"};
        redis_command(r, hook_on_blpop, h, 3, argv, NULL);
    } else {
        const char *argv[2] = {"INCR", "hook:count"};
        redis_command(r, hook_on_incr, h, 2, argv, NULL);
    }
}

static int cond_hook_ran(void *arg)
{
    return ((struct hook_state *)arg)->calls > 0;
}

static long long get_int(const char *key)
{
    redisReply *v = sync_cmd("GET %s", key);
    long long n = v->type == REDIS_REPLY_STRING ? strtoll(v->str, NULL, 10) : -1;

    freeReplyObject(v);
    return n;
}

static void test_hook(void **state)
{
    struct fixture f;
    struct hook_state h;
    struct result other = {0}, get = {0};
    redisReply *v;

    (void)state;
    memset(&h, 0, sizeof(h));
    h.block = 1;
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, hook, &h);

    /* While the hook's BLPOP blocks, other commands are not sent. */
    assert_true(run_until(&f.loop, cond_hook_ran, &h, 5000));
    assert_false(redis_ready(f.r));
    cmd_s(f.r, &other, "SET", "hook:other", "1", NULL);
    wait_called(&f, &other, 1000);
    assert_string_equal(other.str, "redis: not connected");
    assert_false(redis_ready(f.r));

    fixture_ready(&f);
    assert_int_equal(h.calls, 1);
    assert_int_equal(h.done_calls, 1);
    assert_int_equal(get_int("hook:count"), 1);
    cmd_s(f.r, &get, "GET", "hook:last", NULL);
    wait_called(&f, &get, 5000);
    assert_string_equal(get.str, "done");

    /* A reconnect runs the hook again. */
    v = sync_cmd("CLIENT KILL TYPE normal");
    assert_int_equal(v->type, REDIS_REPLY_INTEGER);
    assert_true(v->integer >= 1);
    freeReplyObject(v);
    assert_true(run_until(&f.loop, cond_not_ready, f.r, 3000));
    fixture_ready(&f);
    assert_int_equal(h.calls, 2);
    assert_int_equal(get_int("hook:count"), 2);
    fixture_finish(&f);

    /* redis_hook_done(-1): the connection is dropped and retried. */
    memset(&h, 0, sizeof(h));
    h.fail_first = 1;
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, hook, &h);
    fixture_ready(&f);
    assert_int_equal(h.calls, 2);
    assert_int_equal(h.done_calls, 2);
    assert_int_equal(get_int("hook:count"), 4);
    fixture_finish(&f);
}

/* A hook that never finishes counts against the timeout; one that fails at
 * once (from inside the hook) is retried. */
struct slow_hook {
    int calls;
    uint64_t first_at, second_at;
};

static void slow_hook(struct redis *r, void *arg)
{
    struct slow_hook *h = arg;

    h->calls++;
    if (h->calls == 1)
        h->first_at = uv_hrtime();      /* never calls redis_hook_done() */
    else if (h->calls == 2) {
        h->second_at = uv_hrtime();
        redis_hook_done(r, -1);
        assert_false(redis_ready(r));
    } else {
        redis_hook_done(r, 0);
        assert_true(redis_ready(r));
    }
}

static void test_hook_timeout(void **state)
{
    struct fixture f;
    struct slow_hook h = {0};
    double waited;

    (void)state;
    fixture_init(&f, srv.port);
    fixture_new(&f, 1, slow_hook, &h);
    assert_true(run_until(&f.loop, cond_ready, f.r, 5000));
    assert_int_equal(h.calls, 3);
    waited = (double)(h.second_at - h.first_at) / 1e9;
    assert_true(waited >= 1.0);
    assert_true(waited <= 2.0);
    /* Not called again once ready; a late redis_hook_done() is ignored. */
    redis_hook_done(f.r, -1);
    assert_true(redis_ready(f.r));
    run_for(&f.loop, 300);
    assert_int_equal(h.calls, 3);
    assert_true(redis_ready(f.r));
    fixture_finish(&f);
}

/* ---- tests: failures -------------------------------------------------------------------------- */

static void test_kill_and_restart(void **state)
{
    struct fixture f;
    struct result blocked = {0}, down = {0}, after = {0};
    struct capture cap;
    char *text, line[128];

    (void)state;
    fixture_init(&f, srv.port);
    fixture_new(&f, 30, NULL, NULL);
    capture_start(&cap, srv.dir);
    fixture_ready(&f);

    /* A command in flight when Redis dies fails with "connection lost". */
    cmd_s(f.r, &blocked, "BLPOP", "nothing", "0", NULL);
    run_for(&f.loop, 200);
    assert_int_equal(blocked.calls, 0);
    redis_server_stop(srv.pid);
    srv.pid = 0;
    wait_called(&f, &blocked, 3000);
    assert_int_equal(blocked.type, -1);
    assert_string_equal(blocked.str, "redis: connection lost");
    assert_true(run_until(&f.loop, cond_not_ready, f.r, 3000));
    assert_int_equal(redis_pending_bytes(f.r), 0);

    /* While Redis is down: an immediate failure, from the loop. */
    cmd_s(f.r, &down, "PING", NULL);
    wait_called(&f, &down, 1000);
    assert_string_equal(down.str, "redis: not connected");

    /* Several retries fail, then Redis comes back on the same port. */
    run_for(&f.loop, 1500);
    assert_false(redis_ready(f.r));
    srv.pid = redis_server_start(srv.dir, srv.port, NULL);
    assert_true(run_until(&f.loop, cond_ready, f.r, 8000));
    text = capture_stop(&cap);
    snprintf(line, sizeof(line), "event=redis_connected name=test addr=127.0.0.1:%d", srv.port);
    assert_int_equal(count_substr(text, line), 2);
    snprintf(line, sizeof(line), "event=redis_disconnected name=test addr=127.0.0.1:%d reason=",
             srv.port);
    assert_int_equal(count_substr(text, line), 1);
    free(text);

    cmd_s(f.r, &after, "PING", NULL);
    wait_called(&f, &after, 5000);
    assert_string_equal(after.str, "PONG");
    fixture_finish(&f);
}

static void test_timeout_sigstop(void **state)
{
    struct fixture f;
    struct result r = {0}, after = {0};
    uint64_t start;
    double waited;

    (void)state;
    fixture_init(&f, srv.port);
    fixture_new(&f, 1, NULL, NULL);
    fixture_ready(&f);

    kill(srv.pid, SIGSTOP);
    start = uv_hrtime();
    cmd_s(f.r, &r, "GET", "k", NULL);
    wait_called(&f, &r, 4000);
    waited = (double)(r.at - start) / 1e9;
    assert_int_equal(r.type, -1);
    assert_string_equal(r.str, "redis: timeout");
    assert_true(waited >= 0.9);
    assert_true(waited <= 2.0);
    assert_false(redis_ready(f.r));

    /* Connects to a stopped server hang in the handshake and time out too;
     * once it runs again the connection recovers. */
    run_for(&f.loop, 1500);
    assert_false(redis_ready(f.r));
    kill(srv.pid, SIGCONT);
    assert_true(run_until(&f.loop, cond_ready, f.r, 10000));
    cmd_s(f.r, &after, "PING", NULL);
    wait_called(&f, &after, 5000);
    assert_string_equal(after.str, "PONG");
    fixture_finish(&f);
}

/* ---- tests: MULTI/EXEC ----------------------------------------------------------------------- */

static void multi(struct redis *r, struct result *res, int n, const int *argcs,
                  const char *const *const *argvs)
{
    in_issue = 1;
    redis_multi(r, on_result, res, n, argcs, argvs, NULL);
    in_issue = 0;
    assert_int_equal(res->calls, 0);
}

static void test_multi_ok(void **state)
{
    struct fixture f;
    struct result res = {0}, empty = {0};
    const char *c1[3] = {"SET", "m:k", "1"};
    const char *c2[2] = {"INCR", "m:k"};
    const char *c3[2] = {"GET", "m:k"};
    const char *const *argvs[3] = {c1, c2, c3};
    const int argcs[3] = {3, 2, 2};
    static const char bin[] = "x\0y";
    const char *b1[3] = {"SET", "m:bin", bin};
    const size_t l1[3] = {3, 5, 3};
    const char *const *bargvs[1] = {b1};
    const size_t *const blens[1] = {l1};
    const int bargcs[1] = {3};

    (void)state;
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, NULL, NULL);
    fixture_ready(&f);

    multi(f.r, &res, 3, argcs, argvs);
    wait_called(&f, &res, 5000);
    assert_int_equal(res.type, REDIS_REPLY_ARRAY);
    assert_int_equal(res.elements, 3);
    assert_int_equal(res.elem_type[0], REDIS_REPLY_STATUS);
    assert_string_equal(res.elem_str[0], "OK");
    assert_int_equal(res.elem_type[1], REDIS_REPLY_INTEGER);
    assert_int_equal(res.elem_int[1], 2);
    assert_int_equal(res.elem_type[2], REDIS_REPLY_STRING);
    assert_string_equal(res.elem_str[2], "2");
    assert_int_equal(redis_pending_bytes(f.r), 0);

    /* Binary arguments, and an empty transaction. */
    memset(&res, 0, sizeof(res));
    in_issue = 1;
    redis_multi(f.r, on_result, &res, 1, bargcs, bargvs, blens);
    redis_multi(f.r, on_result, &empty, 0, NULL, NULL, NULL);
    in_issue = 0;
    wait_called(&f, &res, 5000);
    wait_called(&f, &empty, 5000);
    assert_int_equal(res.type, REDIS_REPLY_ARRAY);
    assert_int_equal(empty.type, REDIS_REPLY_ARRAY);
    assert_int_equal(empty.elements, 0);
    {
        redisReply *v = sync_cmd("STRLEN m:bin");
        assert_int_equal(v->integer, 3);
        freeReplyObject(v);
    }
    fixture_finish(&f);
}

static void test_multi_refused(void **state)
{
    struct fixture f;
    struct result res = {0}, after = {0};
    const char *c1[3] = {"SET", "m:a", "1"};
    const char *c2[2] = {"SET", "m:b"};          /* wrong number of arguments */
    const char *c3[3] = {"SET", "m:c", "1"};
    const char *const *argvs[3] = {c1, c2, c3};
    const int argcs[3] = {3, 2, 3};
    redisReply *v;

    (void)state;
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, NULL, NULL);
    fixture_ready(&f);

    multi(f.r, &res, 3, argcs, argvs);
    wait_called(&f, &res, 5000);
    assert_int_equal(res.type, -1);
    assert_true(strncmp(res.str, "redis: transaction failed: ERR wrong number of arguments",
                        strlen("redis: transaction failed: ERR wrong number of arguments")) == 0);
    v = sync_cmd("EXISTS m:a m:b m:c");
    assert_int_equal(v->integer, 0);
    freeReplyObject(v);

    /* The connection is not in a MULTI afterwards. */
    cmd_s(f.r, &after, "SET", "m:after", "1", NULL);
    wait_called(&f, &after, 5000);
    assert_string_equal(after.str, "OK");
    assert_int_equal(redis_pending_bytes(f.r), 0);
    fixture_finish(&f);
}

/* EXEC written, then the connection dropped (timeout): the outcome is
 * unknown. */
static void test_multi_outcome_unknown(void **state)
{
    struct fixture f;
    struct result res = {0};
    const char *c1[3] = {"SET", "m:u", "1"};
    const char *const *argvs[1] = {c1};
    const int argcs[1] = {3};

    (void)state;
    fixture_init(&f, srv.port);
    fixture_new(&f, 1, NULL, NULL);
    fixture_ready(&f);

    kill(srv.pid, SIGSTOP);
    multi(f.r, &res, 1, argcs, argvs);
    wait_called(&f, &res, 4000);
    assert_int_equal(res.type, -1);
    assert_string_equal(res.str, "redis: outcome unknown");
    kill(srv.pid, SIGCONT);
    fixture_finish(&f);
}

/* ---- tests: scripts --------------------------------------------------------------------------- */

static long long cmdstat_calls(const char *info, const char *cmdname)
{
    char key[64];
    const char *p;

    snprintf(key, sizeof(key), "cmdstat_%s:calls=", cmdname);
    p = strstr(info, key);
    return p ? strtoll(p + strlen(key), NULL, 10) : 0;
}

static void test_eval(void **state)
{
    struct fixture f;
    struct redis_script s;
    struct result e1 = {0}, e2 = {0}, e3 = {0};
    const char *argv[2] = {"ev:key", "arg\0x"};
    const size_t lens[2] = {6, 5};
    redisReply *v;
    static const char src[] = "redis.call('SET', KEYS[1], ARGV[1]) return {KEYS[1], ARGV[1]}";

    (void)state;
    redis_script_init(&s, src);
    assert_ptr_equal(s.source, src);
    assert_int_equal(strlen(s.sha1), 40);
    v = sync_cmd("SCRIPT LOAD %s", src);
    assert_int_equal(v->type, REDIS_REPLY_STRING);
    assert_string_equal(s.sha1, v->str);
    freeReplyObject(v);

    v = sync_cmd("SCRIPT FLUSH");
    freeReplyObject(v);
    v = sync_cmd("CONFIG RESETSTAT");
    freeReplyObject(v);

    fixture_init(&f, srv.port);
    fixture_new(&f, 5, NULL, NULL);
    fixture_ready(&f);

    /* Not cached: EVALSHA answers NOSCRIPT, EVAL runs transparently. */
    in_issue = 1;
    redis_eval(f.r, &s, on_result, &e1, 1, 2, argv, lens);
    in_issue = 0;
    wait_called(&f, &e1, 5000);
    assert_int_equal(e1.type, REDIS_REPLY_ARRAY);
    assert_int_equal(e1.elements, 2);
    assert_string_equal(e1.elem_str[0], "ev:key");
    assert_memory_equal(e1.elem_str[1], "arg\0x", 5);
    assert_int_equal(redis_pending_bytes(f.r), 0);

    /* Cached now: EVALSHA alone. */
    in_issue = 1;
    redis_eval(f.r, &s, on_result, &e2, 1, 2, argv, lens);
    in_issue = 0;
    wait_called(&f, &e2, 5000);
    assert_int_equal(e2.type, REDIS_REPLY_ARRAY);
    assert_string_equal(e2.elem_str[0], "ev:key");

    v = sync_cmd("INFO commandstats");
    assert_int_equal(v->type, REDIS_REPLY_STRING);
    assert_int_equal(cmdstat_calls(v->str, "eval"), 1);
    assert_int_equal(cmdstat_calls(v->str, "evalsha"), 2);
    freeReplyObject(v);
    v = sync_cmd("STRLEN ev:key");
    assert_int_equal(v->integer, 5);
    freeReplyObject(v);

    /* A script error is an error reply, not a failure. */
    {
        struct redis_script bad;
        redis_script_init(&bad, "return redis.call('INCR', KEYS[1])");
        in_issue = 1;
        redis_eval(f.r, &bad, on_result, &e3, 1, 1, argv, NULL);
        in_issue = 0;
        wait_called(&f, &e3, 5000);
        assert_int_equal(e3.type, REDIS_REPLY_ERROR);
    }
    fixture_finish(&f);
}

/* ---- tests: backpressure and close -------------------------------------------------------------- */

struct bp {
    int changes;
    int last;
    int seen[8];
};

static void on_bp(int paused, void *arg)
{
    struct bp *b = arg;

    assert_int_equal(in_issue, 0);
    if (b->changes < 8)
        b->seen[b->changes] = paused;
    b->changes++;
    b->last = paused;
}

static int cond_bp_paused(void *arg)
{
    return ((struct bp *)arg)->changes > 0 && ((struct bp *)arg)->last == 1;
}

static int cond_bp_resumed(void *arg)
{
    return ((struct bp *)arg)->changes > 1 && ((struct bp *)arg)->last == 0;
}

static void test_backpressure(void **state)
{
    struct fixture f;
    struct bp b = {0};
    struct result r1 = {0}, r2 = {0}, r3 = {0};
    char value[600];
    const char *argv[3] = {"SET", "bp:key", value};
    size_t lens[3] = {3, 6, sizeof(value)};

    (void)state;
    memset(value, 'v', sizeof(value));
    fixture_init(&f, srv.port);
    fixture_new(&f, 10, NULL, NULL);
    fixture_ready(&f);
    redis_set_backpressure(f.r, 1000, 500, on_bp, &b);

    kill(srv.pid, SIGSTOP);
    cmd(f.r, &r1, 3, argv, lens);
    run_for(&f.loop, 50);
    assert_int_equal(b.changes, 0);
    assert_true(redis_pending_bytes(f.r) > 600);
    cmd(f.r, &r2, 3, argv, lens);
    assert_true(redis_pending_bytes(f.r) >= 1000);
    assert_int_equal(b.changes, 0);     /* reported from the loop */
    assert_true(run_until(&f.loop, cond_bp_paused, &b, 1000));
    assert_int_equal(b.changes, 1);
    cmd(f.r, &r3, 3, argv, lens);
    run_for(&f.loop, 50);
    assert_int_equal(b.changes, 1);     /* once per crossing */

    kill(srv.pid, SIGCONT);
    assert_true(run_until(&f.loop, cond_bp_resumed, &b, 5000));
    wait_called(&f, &r3, 5000);
    assert_int_equal(b.changes, 2);
    assert_int_equal(b.seen[0], 1);
    assert_int_equal(b.seen[1], 0);
    assert_int_equal(redis_pending_bytes(f.r), 0);
    fixture_finish(&f);
}

/* A failure callback that issues a new command during close. */
struct retry {
    struct fixture *f;
    struct result *first;
    struct result second;
};

static void on_retry(struct redis *r, const redisReply *reply, const char *err, void *arg)
{
    struct retry *t = arg;

    on_result(r, reply, err, t->first);
    redis_command(r, on_result, &t->second, 1, (const char *[]){"PING"}, NULL);
}

static void test_close_with_pending(void **state)
{
    struct fixture f;
    struct result res[4], m = {0}, ev = {0};
    struct result first = {0};
    struct retry t;
    struct redis_script s;
    int calls = 0;
    const char *c1[3] = {"SET", "cl:m", "1"};
    const char *const *argvs[1] = {c1};
    const int argcs[1] = {3};
    redisReply *v;

    (void)state;
    memset(res, 0, sizeof(res));
    memset(&t, 0, sizeof(t));
    redis_script_init(&s, "return 1");
    fixture_init(&f, srv.port);
    fixture_new(&f, 30, NULL, NULL);
    fixture_ready(&f);

    /* Written to a stopped server: pending when closed. */
    kill(srv.pid, SIGSTOP);
    for (int i = 0; i < 4; i++) {
        res[i].shared_calls = &calls;
        cmd_s(f.r, &res[i], "INCR", "cl:n", NULL);
    }
    m.shared_calls = &calls;
    ev.shared_calls = &calls;
    first.shared_calls = &calls;
    t.f = &f;
    t.first = &first;
    t.second.shared_calls = &calls;
    multi(f.r, &m, 1, argcs, argvs);
    in_issue = 1;
    redis_eval(f.r, &s, on_result, &ev, 0, 0, NULL, NULL);
    redis_command(f.r, on_retry, &t, 1, (const char *[]){"PING"}, NULL);
    in_issue = 0;
    run_for(&f.loop, 100);
    assert_int_equal(calls, 0);

    f.calls_counter = &calls;
    in_issue = 1;
    redis_close(f.r, on_closed, &f);
    in_issue = 0;
    assert_int_equal(calls, 0);
    assert_true(run_until(&f.loop, cond_closed, &f, 5000));
    assert_int_equal(calls, 8);
    assert_int_equal(f.calls_at_close, 8);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(res[i].calls, 1);
        assert_string_equal(res[i].str, "redis: closed");
    }
    assert_int_equal(m.calls, 1);
    assert_string_equal(m.str, "redis: outcome unknown");
    assert_int_equal(ev.calls, 1);
    assert_string_equal(ev.str, "redis: closed");
    assert_int_equal(first.calls, 1);
    assert_int_equal(t.second.calls, 1);
    assert_string_equal(t.second.str, "redis: closed");
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f.loop), 0);
    kill(srv.pid, SIGCONT);

    /* A MULTI never written (closed in the same loop turn): not applied.
     * (The one above was, and may well have been executed once Redis ran
     * again: that is what "outcome unknown" means.) */
    c1[1] = "cl:m2";
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, NULL, NULL);
    fixture_ready(&f);
    memset(&m, 0, sizeof(m));
    multi(f.r, &m, 1, argcs, argvs);
    redis_close(f.r, on_closed, &f);
    assert_int_equal(m.calls, 0);
    assert_true(run_until(&f.loop, cond_closed, &f, 5000));
    assert_int_equal(m.calls, 1);
    assert_string_equal(m.str, "redis: closed");
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f.loop), 0);
    v = sync_cmd("EXISTS cl:m2");
    assert_int_equal(v->integer, 0);
    freeReplyObject(v);
}

/* redis_close() from inside a reply callback, with more replies pending. */
static void test_close_in_callback(void **state)
{
    struct fixture f;
    struct result res[20];
    int calls = 0;

    (void)state;
    memset(res, 0, sizeof(res));
    fixture_init(&f, srv.port);
    fixture_new(&f, 5, NULL, NULL);
    fixture_ready(&f);
    f.calls_counter = &calls;
    for (int i = 0; i < 20; i++) {
        res[i].shared_calls = &calls;
        cmd_s(f.r, &res[i], "INCR", "cb:n", NULL);
    }
    res[3].close_in_cb = &f;
    assert_true(run_until(&f.loop, cond_closed, &f, 5000));
    assert_int_equal(calls, 20);
    assert_int_equal(f.calls_at_close, 20);
    for (int i = 0; i < 20; i++) {
        assert_int_equal(res[i].calls, 1);
        if (i <= 3) {
            assert_int_equal(res[i].type, REDIS_REPLY_INTEGER);
            assert_int_equal(res[i].integer, i + 1);
        } else if (res[i].type == -1) {
            assert_string_equal(res[i].str, "redis: closed");
        } else {
            /* Answered in the same read as the reply that closed. */
            assert_int_equal(res[i].integer, i + 1);
        }
    }
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f.loop), 0);
}

/* A server with a password: AUTH and SELECT from the URL; a wrong password
 * keeps the connection not ready, logged once. */
static void test_auth_select(void **state)
{
    static const char *const extra[] = {"--requirepass", "s3cret", NULL};
    struct fixture f;
    struct result r = {0};
    struct capture cap;
    int port = redis_server_free_port();
    pid_t pid = redis_server_start(srv.dir, port, extra);
    redisContext *c;
    redisReply *v;
    char *text;

    (void)state;
    fixture_init(&f, port);
    f.url.password = "s3cret";
    f.url.db = 3;
    fixture_new(&f, 5, NULL, NULL);
    fixture_ready(&f);
    cmd_s(f.r, &r, "SET", "auth:k", "v", NULL);
    wait_called(&f, &r, 5000);
    assert_string_equal(r.str, "OK");
    fixture_finish(&f);
    c = redis_server_connect(port, "s3cret", 3);
    v = redisCommand(c, "GET auth:k");
    assert_non_null(v);
    assert_int_equal(v->type, REDIS_REPLY_STRING);
    assert_string_equal(v->str, "v");
    freeReplyObject(v);
    redisFree(c);

    fixture_init(&f, port);
    f.url.password = "wrong";
    capture_start(&cap, srv.dir);
    fixture_new(&f, 5, NULL, NULL);
    run_for(&f.loop, 1000);
    text = capture_stop(&cap);
    assert_false(redis_ready(f.r));
    assert_int_equal(count_substr(text, "event=redis_disconnected"), 1);
    assert_non_null(strstr(text, "AUTH failed"));
    free(text);
    fixture_finish(&f);
    redis_server_stop(pid);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reply_error_helper),
        cmocka_unit_test_setup(test_commands, test_setup),
        cmocka_unit_test_setup(test_not_connected_async, test_setup),
        cmocka_unit_test_setup(test_hook, test_setup),
        cmocka_unit_test_setup(test_hook_timeout, test_setup),
        cmocka_unit_test_setup(test_multi_ok, test_setup),
        cmocka_unit_test_setup(test_multi_refused, test_setup),
        cmocka_unit_test_setup(test_multi_outcome_unknown, test_setup),
        cmocka_unit_test_setup(test_eval, test_setup),
        cmocka_unit_test_setup(test_backpressure, test_setup),
        cmocka_unit_test_setup(test_close_with_pending, test_setup),
        cmocka_unit_test_setup(test_close_in_callback, test_setup),
        cmocka_unit_test_setup(test_auth_select, test_setup),
        cmocka_unit_test_setup(test_kill_and_restart, test_setup),
        cmocka_unit_test_setup(test_timeout_sigstop, test_setup),
    };

    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
