/*
 * Unit tests for lib/queue.c against a real redis-server.
 *
 * The test starts its own redis-server through the shared fixture
 * (tests/unit/redis_server.h: 127.0.0.1, a free port, no persistence, a
 * temporary --dir). Tests that need Redis to fail kill it, pause it with
 * SIGSTOP, or restart it on the same port; the queue object is never
 * recreated to recover, because reconnecting on its own is the contract.
 *
 * Every test ends with queue_close(), runs the loop until on_closed, then
 * runs it to completion and checks that uv_loop_close() succeeds: no handle
 * is left behind (and ASan checks that no memory is).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <jansson.h>
#include <uv.h>

#include "lib/config.h"
#include "lib/log.h"
#include "lib/queue.h"
#include "tests/unit/redis_server.h"

#define S(lit) lit, sizeof(lit) - 1

/* The group's redis-server (see tests/unit/redis_server.h). */
static struct redis_server srv;

static int group_setup(void **state)
{
    (void)state;
    const char *lvl = getenv("MF_LOG_LEVEL");
    log_set_level(lvl ? lvl : "info");
    return redis_server_setup(&srv, "queue");
}

/* A test that failed while Redis was paused must not break the next. */
static int test_setup(void **state)
{
    (void)state;
    if (srv.pid > 0)
        kill(srv.pid, SIGCONT);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    redis_server_teardown(&srv);
    return 0;
}

/* ---- loop helpers ------------------------------------------------------------------- */

struct fixture {
    uv_loop_t loop;
    struct mf_config cfg;
    struct queue *q;
    int closed;
    int calls_at_close;     /* callbacks counted when on_closed ran */
    int *calls_counter;
};

static void fixture_init(struct fixture *f, int port, int timeout)
{
    memset(f, 0, sizeof(*f));
    assert_int_equal(uv_loop_init(&f->loop), 0);
    f->cfg.queue.url.host = "127.0.0.1";
    f->cfg.queue.url.port = port;
    f->cfg.queue.url.db = 0;
    f->cfg.queue.prefix = "mf:";
    f->cfg.queue.timeout = timeout;
    f->cfg.queue.wait_replicas = 0;
    f->cfg.queue.wait_timeout = 100;
}

static int cond_ready(void *arg)
{
    return queue_ready(arg);
}

static int cond_not_ready(void *arg)
{
    return !queue_ready(arg);
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

/* Creates the queue from f->cfg and waits until it is ready. */
static void fixture_open(struct fixture *f)
{
    f->q = queue_new(&f->loop, &f->cfg);
    assert_true(run_until(&f->loop, cond_ready, f->q, 5000));
}

/* Closes the queue, waits for on_closed and checks nothing is left. */
static void fixture_finish(struct fixture *f)
{
    queue_close(f->q, on_closed, f);
    assert_true(run_until(&f->loop, cond_closed, f, 5000));
    assert_int_equal(f->closed, 1);
    assert_int_equal(uv_run(&f->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f->loop), 0);
}

/* ---- enqueue results ------------------------------------------------------------------ */

static int in_enqueue;

struct result {
    int calls;
    int status;
    char err[256];
    uint64_t at;            /* uv_hrtime() of the callback */
    int *shared_calls;      /* also counted here when set */
};

static void on_result(int status, const char *err, void *arg)
{
    struct result *r = arg;

    /* The contract: never from inside queue_enqueue(). */
    assert_int_equal(in_enqueue, 0);
    r->calls++;
    r->status = status;
    snprintf(r->err, sizeof(r->err), "%s", err ? err : "");
    r->at = uv_hrtime();
    if (r->shared_calls)
        (*r->shared_calls)++;
    if (status == 0)
        assert_null(err);
    else
        assert_non_null(err);
}

static int cond_called(void *arg)
{
    return ((struct result *)arg)->calls > 0;
}

static void enqueue(struct queue *q, const char *id, const struct queue_msg *m, struct result *r)
{
    in_enqueue = 1;
    queue_enqueue(q, id, m, on_result, r);
    in_enqueue = 0;
    assert_int_equal(r->calls, 0);
}

static void simple_msg(struct queue_msg *m)
{
    static const char *const rcpts[] = {"rcpt@example.com"};

    memset(m, 0, sizeof(*m));
    m->from = "sender@example.com";
    m->rcpts = rcpts;
    m->nrcpts = 1;
    m->data = "Subject: hi\r\n\r\nbody\r\n";
    m->datalen = strlen(m->data);
    m->client_ip = "192.0.2.1";
    m->helo = "client.example";
}

/* Enqueues a small message under a fresh id (written to id) and waits
 * until its callback has filled r. */
static void enqueue_simple(struct fixture *f, char *id, struct result *r)
{
    struct queue_msg m;

    simple_msg(&m);
    queue_id_new(id);
    enqueue(f->q, id, &m, r);
    assert_true(run_until(&f->loop, cond_called, r, 5000));
}

/* Enqueues a small message and expects success. */
static void enqueue_ok(struct fixture *f)
{
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1];

    enqueue_simple(f, id, &r);
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.status, 0);
    assert_int_equal(queue_pending_bytes(f->q), 0);
}

/* ---- tests ------------------------------------------------------------------------------ */

static void test_id_new(void **state)
{
    char a[QUEUE_ID_LEN + 1], b[QUEUE_ID_LEN + 1];
    struct timespec ts;
    unsigned long long ms, now;

    (void)state;
    clock_gettime(CLOCK_REALTIME, &ts);
    now = (unsigned long long)ts.tv_sec * 1000ull + (unsigned long long)ts.tv_nsec / 1000000ull;
    queue_id_new(a);
    queue_id_new(b);
    assert_int_equal(strlen(a), QUEUE_ID_LEN);
    for (int i = 0; i < QUEUE_ID_LEN; i++)
        assert_non_null(strchr("0123456789abcdef", a[i]));
    assert_string_not_equal(a, b);
    /* The first 12 digits are the time in ms. */
    {
        char head[13];
        memcpy(head, a, 12);
        head[12] = '\0';
        ms = strtoull(head, NULL, 16);
        assert_true(ms + 1000 >= now && ms <= now + 1000);
    }
    /* Later ids sort after earlier ones. */
    usleep(2000);
    queue_id_new(b);
    assert_true(memcmp(a, b, 12) < 0);
}

/* Looks up a field in an HGETALL reply. */
static const redisReply *hfield(const redisReply *h, const char *name)
{
    for (size_t i = 0; i + 1 < h->elements; i += 2)
        if (strcmp(h->element[i]->str, name) == 0)
            return h->element[i + 1];
    return NULL;
}

static void assert_field(const redisReply *h, const char *name, const char *val, size_t len)
{
    const redisReply *v = hfield(h, name);

    assert_non_null(v);
    assert_int_equal(v->type, REDIS_REPLY_STRING);
    assert_int_equal((size_t)v->len, len);
    assert_memory_equal(v->str, val, len);
}

static void test_enqueue_fields(void **state)
{
    static const char data[] = "From: a@example.com\r\nSubject: t\r\n\r\n"
                               "nul\0inside\r\n\0\r\n.\r\n..dots\r\nend\r\n";
    static const char *const rcpts[] = {
        "rcpt@example.com",
        "\"quoted \\\"local\\\" part\"@example.org",
        "j\xc3\xb6rg@\xc3\xa9xample.de",
    };
    static const char rcpts_json[] =
        "[\"rcpt@example.com\","
        "\"\\\"quoted \\\\\\\"local\\\\\\\" part\\\"@example.org\","
        "\"j\xc3\xb6rg@\xc3\xa9xample.de\"]";
    struct fixture f;
    struct queue_msg m;
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1], key[64], hostname[256];
    redisContext *c;
    redisReply *h, *x;
    unsigned long long before, created;
    struct timespec ts;
    json_t *js;
    int found = 0;

    (void)state;
    fixture_init(&f, srv.port, 5);
    fixture_open(&f);

    memset(&m, 0, sizeof(m));
    m.from = "sender@example.com";
    m.rcpts = rcpts;
    m.nrcpts = 3;
    m.data = data;
    m.datalen = sizeof(data) - 1;
    m.client_ip = "2001:db8::1";
    m.helo = "client.example";
    m.auth_user = "alice";
    m.msg_class = "newsletter";

    clock_gettime(CLOCK_REALTIME, &ts);
    before = (unsigned long long)ts.tv_sec * 1000ull + (unsigned long long)ts.tv_nsec / 1000000ull;
    queue_id_new(id);
    enqueue(f.q, id, &m, &r);
    assert_true(queue_pending_bytes(f.q) > m.datalen);
    assert_true(run_until(&f.loop, cond_called, &r, 5000));
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.status, 0);
    assert_int_equal(queue_pending_bytes(f.q), 0);

    c = redis_server_connect(srv.port, NULL, 0);
    snprintf(key, sizeof(key), "mf:msg:%s", id);
    h = redisCommand(c, "HGETALL %s", key);
    assert_non_null(h);
    assert_int_equal(h->type, REDIS_REPLY_ARRAY);
    /* Exactly these ten fields. */
    assert_int_equal(h->elements, 20);
    assert_field(h, "from", S("sender@example.com"));
    assert_field(h, "rcpts", S(rcpts_json));
    assert_field(h, "data", data, sizeof(data) - 1);
    {
        char size[24];
        snprintf(size, sizeof(size), "%zu", sizeof(data) - 1);
        assert_field(h, "size", size, strlen(size));
    }
    assert_field(h, "client_ip", S("2001:db8::1"));
    assert_field(h, "helo", S("client.example"));
    assert_field(h, "auth_user", S("alice"));
    assert_field(h, "class", S("newsletter"));
    gethostname(hostname, sizeof(hostname));
    assert_field(h, "gateway", hostname, strlen(hostname));
    created = strtoull(hfield(h, "created")->str, NULL, 10);
    assert_true(created >= before && created <= before + 5000);

    /* The recipients decode back to the same strings. */
    js = json_loads(hfield(h, "rcpts")->str, 0, NULL);
    assert_non_null(js);
    assert_int_equal(json_array_size(js), 3);
    for (size_t i = 0; i < 3; i++)
        assert_string_equal(json_string_value(json_array_get(js, i)), rcpts[i]);
    json_decref(js);
    freeReplyObject(h);

    x = redisCommand(c, "XRANGE mf:ready - +");
    assert_non_null(x);
    assert_int_equal(x->type, REDIS_REPLY_ARRAY);
    for (size_t i = 0; i < x->elements; i++) {
        redisReply *fields = x->element[i]->element[1];
        if (fields->elements == 2 && strcmp(fields->element[0]->str, "id") == 0 &&
            strcmp(fields->element[1]->str, id) == 0)
            found++;
    }
    assert_int_equal(found, 1);
    freeReplyObject(x);

    /* The consumer group exists. */
    x = redisCommand(c, "XINFO GROUPS mf:ready");
    assert_non_null(x);
    assert_int_equal(x->type, REDIS_REPLY_ARRAY);
    assert_int_equal(x->elements, 1);
    freeReplyObject(x);
    redisFree(c);

    /* An empty sender and no optional fields are stored as empty strings. */
    {
        struct result r2 = {0};
        const redisReply *v;
        memset(&m, 0, sizeof(m));
        m.from = "";
        m.rcpts = rcpts;
        m.nrcpts = 1;
        m.data = "x";
        m.datalen = 1;
        m.client_ip = "127.0.0.1";
        m.helo = "h";
        queue_id_new(id);
        enqueue(f.q, id, &m, &r2);
        assert_true(run_until(&f.loop, cond_called, &r2, 5000));
        assert_int_equal(r2.status, 0);
        c = redis_server_connect(srv.port, NULL, 0);
        h = redisCommand(c, "HGETALL mf:msg:%s", id);
        assert_int_equal(h->elements, 20);
        assert_field(h, "from", S(""));
        assert_field(h, "auth_user", S(""));
        assert_field(h, "class", S(""));
        v = hfield(h, "rcpts");
        assert_string_equal(v->str, "[\"rcpt@example.com\"]");
        freeReplyObject(h);
        redisFree(c);
    }

    fixture_finish(&f);
}

static void test_invalid_utf8_rcpt(void **state)
{
    static const char *const rcpts[] = {"bad\xff@example.com"};
    struct fixture f;
    struct queue_msg m;
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1];

    (void)state;
    fixture_init(&f, srv.port, 5);
    fixture_open(&f);
    simple_msg(&m);
    m.rcpts = rcpts;
    queue_id_new(id);
    enqueue(f.q, id, &m, &r);
    assert_true(run_until(&f.loop, cond_called, &r, 5000));
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.status, -EINVAL);
    assert_string_equal(r.err, "queue: recipient is not valid UTF-8");
    assert_int_equal(queue_pending_bytes(f.q), 0);
    /* Nothing was written, and the connection is still usable. */
    {
        redisContext *c = redis_server_connect(srv.port, NULL, 0);
        redisReply *v = redisCommand(c, "EXISTS mf:msg:%s", id);
        assert_int_equal(v->integer, 0);
        freeReplyObject(v);
        redisFree(c);
    }
    assert_true(queue_ready(f.q));
    enqueue_ok(&f);
    fixture_finish(&f);
}

static void test_not_connected(void **state)
{
    struct fixture f;
    struct queue_msg m;
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1];

    (void)state;
    /* Nothing listens there. */
    fixture_init(&f, redis_server_free_port(), 1);
    f.q = queue_new(&f.loop, &f.cfg);
    assert_false(queue_ready(f.q));
    simple_msg(&m);
    queue_id_new(id);
    enqueue(f.q, id, &m, &r);
    assert_true(run_until(&f.loop, cond_called, &r, 5000));
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.status, -ENOTCONN);
    /* Not being connected is reported before a bad recipient. */
    {
        static const char *const bad[] = {"bad\xff@example.com"};
        struct result r2 = {0};
        m.rcpts = bad;
        queue_id_new(id);
        enqueue(f.q, id, &m, &r2);
        assert_true(run_until(&f.loop, cond_called, &r2, 5000));
        assert_int_equal(r2.calls, 1);
        assert_int_equal(r2.status, -ENOTCONN);
        assert_string_equal(r2.err, "redis: not connected");
    }
    /* Let a few reconnect attempts fail, then close during backoff. */
    run_until(&f.loop, cond_ready, f.q, 400);
    assert_false(queue_ready(f.q));
    fixture_finish(&f);
}

static void test_kill_and_restart(void **state)
{
    struct fixture f;
    struct queue_msg m;
    struct result r1 = {0}, r2 = {0};
    char id[QUEUE_ID_LEN + 1];

    (void)state;
    fixture_init(&f, srv.port, 5);
    fixture_open(&f);
    enqueue_ok(&f);

    /* A transaction in flight when Redis dies fails as a lost connection;
     * its EXEC had reached the socket, so lib/redis.c reports the outcome
     * as unknown (the header's at-least-once case). */
    simple_msg(&m);
    kill(srv.pid, SIGSTOP);
    queue_id_new(id);
    enqueue(f.q, id, &m, &r1);
    run_until(&f.loop, cond_called, &r1, 200);
    assert_int_equal(r1.calls, 0);
    redis_server_stop(srv.pid);
    srv.pid = 0;
    assert_true(run_until(&f.loop, cond_called, &r1, 3000));
    assert_int_equal(r1.calls, 1);
    assert_int_equal(r1.status, -ECONNRESET);
    assert_string_equal(r1.err, "redis: outcome unknown");
    assert_true(run_until(&f.loop, cond_not_ready, f.q, 3000));

    /* While Redis is down: an immediate failure, from the loop. */
    queue_id_new(id);
    enqueue(f.q, id, &m, &r2);
    assert_true(run_until(&f.loop, cond_called, &r2, 1000));
    assert_int_equal(r2.calls, 1);
    assert_int_equal(r2.status, -ENOTCONN);

    /* Let the backoff grow a little, then bring Redis back on the same
     * port: the same queue object reconnects within a few seconds. */
    run_until(&f.loop, cond_ready, f.q, 1500);
    assert_false(queue_ready(f.q));
    srv.pid = redis_server_start(srv.dir, srv.port, NULL);
    assert_true(run_until(&f.loop, cond_ready, f.q, 7000));
    enqueue_ok(&f);
    fixture_finish(&f);
    assert_int_equal(r1.calls, 1);
    assert_int_equal(r2.calls, 1);
}

static void test_timeout_sigstop(void **state)
{
    struct fixture f;
    struct queue_msg m;
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1];
    uint64_t start;
    double waited;

    (void)state;
    fixture_init(&f, srv.port, 1);
    fixture_open(&f);

    kill(srv.pid, SIGSTOP);
    simple_msg(&m);
    queue_id_new(id);
    start = uv_hrtime();
    enqueue(f.q, id, &m, &r);
    assert_true(run_until(&f.loop, cond_called, &r, 4000));
    waited = (double)(r.at - start) / 1e9;
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.status, -ETIMEDOUT);
    /* The paused Redis has the EXEC in its socket: it may still run it. */
    assert_string_equal(r.err, "redis: outcome unknown");
    assert_true(waited >= 0.9);
    assert_true(waited <= 2.0);   /* timeout + 1 s */
    assert_int_equal(queue_pending_bytes(f.q), 0);
    assert_false(queue_ready(f.q));

    /* While paused, reconnects stall in the handshake and time out too. */
    run_until(&f.loop, cond_ready, f.q, 1500);
    assert_false(queue_ready(f.q));

    kill(srv.pid, SIGCONT);
    assert_true(run_until(&f.loop, cond_ready, f.q, 8000));
    enqueue_ok(&f);
    fixture_finish(&f);
    assert_int_equal(r.calls, 1);

    /* Redis read the abandoned transaction from its socket when it
     * resumed and executed it: the failure reported above is the
     * at-least-once case of lib/queue.h (the client's retry makes a second
     * message). */
    {
        redisContext *c = redis_server_connect(srv.port, NULL, 0);
        redisReply *v = redisCommand(c, "EXISTS mf:msg:%s", id);
        assert_int_equal(v->integer, 1);
        freeReplyObject(v);
        redisFree(c);
    }
}

struct bp_state {
    int calls;
    int last;
    int seen_paused;
};

static void on_bp(int paused, void *arg)
{
    struct bp_state *b = arg;

    assert_int_equal(in_enqueue, 0);
    b->calls++;
    b->last = paused;
    if (paused)
        b->seen_paused = 1;
}

static int cond_bp_paused(void *arg)
{
    return ((struct bp_state *)arg)->last == 1;
}

struct two {
    struct result *a, *b;
    struct bp_state *bp;
};

static int cond_both_done_resumed(void *arg)
{
    struct two *t = arg;
    return t->a->calls && t->b->calls && t->bp->seen_paused && t->bp->last == 0;
}

static void test_backpressure(void **state)
{
    static char big[2000];
    struct fixture f;
    struct queue_msg m;
    struct result r1 = {0}, r2 = {0};
    struct bp_state bp = {0};
    struct two t = {&r1, &r2, &bp};
    char id[QUEUE_ID_LEN + 1];

    (void)state;
    memset(big, 'x', sizeof(big));
    fixture_init(&f, srv.port, 10);
    fixture_open(&f);
    queue_set_backpressure(f.q, 3000, 1500, on_bp, &bp);

    simple_msg(&m);
    m.data = big;
    m.datalen = sizeof(big);
    kill(srv.pid, SIGSTOP);
    queue_id_new(id);
    enqueue(f.q, id, &m, &r1);
    assert_true(queue_pending_bytes(f.q) >= sizeof(big));
    assert_true(queue_pending_bytes(f.q) < 3000);
    queue_id_new(id);
    enqueue(f.q, id, &m, &r2);
    assert_true(queue_pending_bytes(f.q) >= 2 * sizeof(big));
    /* Reported from the loop, not from inside queue_enqueue(). */
    assert_int_equal(bp.calls, 0);
    assert_true(run_until(&f.loop, cond_bp_paused, &bp, 2000));
    assert_int_equal(bp.calls, 1);
    assert_int_equal(r1.calls + r2.calls, 0);

    kill(srv.pid, SIGCONT);
    assert_true(run_until(&f.loop, cond_both_done_resumed, &t, 5000));
    assert_int_equal(r1.status, 0);
    assert_int_equal(r2.status, 0);
    assert_int_equal(bp.calls, 2);
    assert_int_equal(queue_pending_bytes(f.q), 0);
    fixture_finish(&f);
}

static void test_close_with_pending(void **state)
{
    enum { N = 5 };
    struct fixture f;
    struct queue_msg m;
    struct result r[N + 1];
    char id[QUEUE_ID_LEN + 1];
    int calls = 0;

    (void)state;
    memset(r, 0, sizeof(r));
    fixture_init(&f, srv.port, 10);
    fixture_open(&f);
    f.calls_counter = &calls;

    simple_msg(&m);
    kill(srv.pid, SIGSTOP);
    for (int i = 0; i < N; i++) {
        r[i].shared_calls = &calls;
        queue_id_new(id);
        enqueue(f.q, id, &m, &r[i]);
    }
    uv_run(&f.loop, UV_RUN_NOWAIT);
    assert_int_equal(calls, 0);

    queue_close(f.q, on_closed, &f);
    /* Not from inside queue_close() either. */
    assert_int_equal(calls, 0);
    /* An enqueue after queue_close() still gets its one callback. */
    r[N].shared_calls = &calls;
    queue_id_new(id);
    enqueue(f.q, id, &m, &r[N]);

    assert_true(run_until(&f.loop, cond_closed, &f, 5000));
    kill(srv.pid, SIGCONT);
    for (int i = 0; i <= N; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_int_equal(r[i].status, -ECANCELED);
    }
    /* Every callback came before on_closed. */
    assert_int_equal(f.calls_at_close, N + 1);
    assert_int_equal(f.closed, 1);
    assert_int_equal(uv_run(&f.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&f.loop), 0);
    assert_int_equal(calls, N + 1);
}

static void test_close_while_connecting(void **state)
{
    struct fixture f;

    (void)state;
    /* Closed right after creation: the connect is still in progress. */
    fixture_init(&f, srv.port, 5);
    f.q = queue_new(&f.loop, &f.cfg);
    fixture_finish(&f);

    /* Closed in the middle of the handshake. */
    fixture_init(&f, srv.port, 5);
    kill(srv.pid, SIGSTOP);
    f.q = queue_new(&f.loop, &f.cfg);
    run_until(&f.loop, cond_ready, f.q, 300);
    assert_false(queue_ready(f.q));
    fixture_finish(&f);
    kill(srv.pid, SIGCONT);
}

static void test_appendonly_warning(void **state)
{
    struct fixture f;
    struct capture cap;
    char *text;

    (void)state;
    fixture_init(&f, srv.port, 5);
    capture_start(&cap, srv.dir);
    f.q = queue_new(&f.loop, &f.cfg);
    run_until(&f.loop, cond_ready, f.q, 5000);
    text = capture_stop(&cap);
    assert_true(queue_ready(f.q));
    assert_non_null(strstr(text, "level=warn event=redis_appendonly_off"));
    assert_non_null(strstr(text, "event=redis_connected"));
    free(text);
    enqueue_ok(&f);
    fixture_finish(&f);
}

static void test_wait_replicas(void **state)
{
    struct fixture f;
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1];

    (void)state;
    fixture_init(&f, srv.port, 5);
    f.cfg.queue.wait_replicas = 1;
    f.cfg.queue.wait_timeout = 100;
    fixture_open(&f);
    enqueue_simple(&f, id, &r);
    /* This Redis has no replica: WAIT answers 0, which is a failure. */
    assert_int_equal(r.status, -EIO);
    assert_string_equal(r.err, "redis: WAIT reached 0 of 1 replicas");
    assert_true(queue_ready(f.q));
    fixture_finish(&f);
}

/* Redis errors: a runtime error inside the executed transaction and a
 * command refused while queueing both fail the enqueue with -EIO and the
 * error's text; the connection stays up. */
static void test_redis_errors(void **state)
{
    struct fixture f;
    struct queue_msg m;
    struct result r1 = {0}, r2 = {0};
    char id[QUEUE_ID_LEN + 1];
    redisContext *c;
    redisReply *v;

    (void)state;
    fixture_init(&f, srv.port, 5);
    fixture_open(&f);
    simple_msg(&m);
    c = redis_server_connect(srv.port, NULL, 0);

    /* The message key exists with another type: HSET answers WRONGTYPE
     * inside EXEC's array. */
    queue_id_new(id);
    v = redisCommand(c, "SET mf:msg:%s x", id);
    freeReplyObject(v);
    enqueue(f.q, id, &m, &r1);
    assert_true(run_until(&f.loop, cond_called, &r1, 5000));
    assert_int_equal(r1.calls, 1);
    assert_int_equal(r1.status, -EIO);
    assert_true(strncmp(r1.err, "WRONGTYPE", 9) == 0);
    v = redisCommand(c, "DEL mf:msg:%s", id);
    freeReplyObject(v);

    /* Out of memory: HSET is refused while queueing and that error, not
     * EXECABORT, is reported; nothing is written. */
    v = redisCommand(c, "CONFIG SET maxmemory 1");
    assert_int_equal(v->type, REDIS_REPLY_STATUS);
    freeReplyObject(v);
    queue_id_new(id);
    enqueue(f.q, id, &m, &r2);
    assert_true(run_until(&f.loop, cond_called, &r2, 5000));
    v = redisCommand(c, "CONFIG SET maxmemory 0");
    freeReplyObject(v);
    assert_int_equal(r2.calls, 1);
    assert_int_equal(r2.status, -EIO);
    assert_non_null(strstr(r2.err, "transaction failed: OOM"));
    v = redisCommand(c, "EXISTS mf:msg:%s", id);
    assert_int_equal(v->integer, 0);
    freeReplyObject(v);
    redisFree(c);

    assert_true(queue_ready(f.q));
    assert_int_equal(queue_pending_bytes(f.q), 0);
    enqueue_ok(&f);
    fixture_finish(&f);
}

/* Entries added to the ready stream before the consumer group existed
 * (the group is created at id 0, not $) are delivered to the routers. */
static void test_group_from_zero(void **state)
{
    struct fixture f;
    redisContext *c;
    redisReply *v;

    (void)state;
    c = redis_server_connect(srv.port, NULL, 0);
    v = redisCommand(c, "DEL early:ready");
    freeReplyObject(v);
    v = redisCommand(c, "XADD early:ready * id before");
    assert_int_equal(v->type, REDIS_REPLY_STRING);
    freeReplyObject(v);

    fixture_init(&f, srv.port, 5);
    f.cfg.queue.prefix = "early:";
    fixture_open(&f);
    fixture_finish(&f);

    v = redisCommand(c, "XREADGROUP GROUP routers t COUNT 10 STREAMS early:ready >");
    assert_non_null(v);
    assert_int_equal(v->type, REDIS_REPLY_ARRAY);
    assert_int_equal(v->elements, 1);
    {
        const redisReply *entries = v->element[0]->element[1];
        const redisReply *fields;
        assert_int_equal(entries->elements, 1);
        fields = entries->element[0]->element[1];
        assert_string_equal(fields->element[0]->str, "id");
        assert_string_equal(fields->element[1]->str, "before");
    }
    freeReplyObject(v);
    v = redisCommand(c, "DEL early:ready");
    freeReplyObject(v);
    redisFree(c);
}

static int cond_replica_online(void *arg)
{
    redisContext *c = arg;
    redisReply *v = redisCommand(c, "INFO replication");
    int ok = v && v->type == REDIS_REPLY_STRING && strstr(v->str, "connected_slaves:1") &&
             strstr(v->str, "state=online");

    if (v)
        freeReplyObject(v);
    if (!ok)
        usleep(50000);
    return ok;
}

/* With a replica attached, WAIT reaches it and the enqueue succeeds. */
static void test_wait_replica_ok(void **state)
{
    char dir[128], primary[16];
    const char *extra[] = {"--dir", dir, "--replicaof", "127.0.0.1", primary, NULL};
    struct fixture f;
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1];
    int port = redis_server_free_port();
    redisContext *c;
    redisReply *v;
    pid_t pid;

    (void)state;
    snprintf(dir, sizeof(dir), "%s/replica", srv.dir);
    assert_true(mkdir(dir, 0700) == 0 || errno == EEXIST);
    snprintf(primary, sizeof(primary), "%d", srv.port);
    pid = redis_server_start(srv.dir, port, extra);
    c = redis_server_connect(srv.port, NULL, 0);
    for (int i = 0; i < 200 && !cond_replica_online(c); i++)
        ;
    assert_true(cond_replica_online(c));

    fixture_init(&f, srv.port, 5);
    f.cfg.queue.wait_replicas = 1;
    f.cfg.queue.wait_timeout = 2000;
    fixture_open(&f);
    enqueue_simple(&f, id, &r);
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.status, 0);
    assert_int_equal(queue_pending_bytes(f.q), 0);
    fixture_finish(&f);

    /* The replica has the message. */
    {
        redisContext *rc = redis_server_connect(port, NULL, 0);
        v = redisCommand(rc, "EXISTS mf:msg:%s", id);
        assert_int_equal(v->integer, 1);
        freeReplyObject(v);
        redisFree(rc);
    }
    redis_server_stop(pid);
    redisFree(c);
    {
        char path[160];
        snprintf(path, sizeof(path), "%s/dump.rdb", dir);
        unlink(path);
        rmdir(dir);
    }
}

/* A second Redis with a password and CONFIG disabled, as managed Redis
 * services often are: AUTH and SELECT are used, CONFIG's refusal is not a
 * failure, and a wrong password keeps the queue not ready. */
static void test_auth_select_no_config(void **state)
{
    static const char *const extra[] = {"--requirepass", "s3cret", "--rename-command", "CONFIG",
                                        "", NULL};
    struct fixture f;
    struct capture cap;
    struct result r = {0};
    char id[QUEUE_ID_LEN + 1], *text;
    int port = redis_server_free_port();
    pid_t pid = redis_server_start(srv.dir, port, extra);
    redisContext *c;
    redisReply *v;

    (void)state;
    fixture_init(&f, port, 5);
    f.cfg.queue.url.password = "s3cret";
    f.cfg.queue.url.db = 2;
    f.cfg.queue.prefix = "test:";
    capture_start(&cap, srv.dir);
    f.q = queue_new(&f.loop, &f.cfg);
    run_until(&f.loop, cond_ready, f.q, 5000);
    text = capture_stop(&cap);
    assert_true(queue_ready(f.q));
    assert_null(strstr(text, "redis_appendonly_off"));
    free(text);

    enqueue_simple(&f, id, &r);
    assert_int_equal(r.status, 0);
    c = redis_server_connect(port, "s3cret", 2);
    v = redisCommand(c, "HGET test:msg:%s from", id);
    assert_non_null(v);
    assert_int_equal(v->type, REDIS_REPLY_STRING);
    assert_string_equal(v->str, "sender@example.com");
    freeReplyObject(v);
    v = redisCommand(c, "XLEN test:ready");
    assert_int_equal(v->integer, 1);
    freeReplyObject(v);
    redisFree(c);
    fixture_finish(&f);

    /* Wrong password: never ready, one disconnect line, closes cleanly. */
    fixture_init(&f, port, 5);
    f.cfg.queue.url.password = "wrong";
    capture_start(&cap, srv.dir);
    f.q = queue_new(&f.loop, &f.cfg);
    run_until(&f.loop, cond_ready, f.q, 1000);
    text = capture_stop(&cap);
    assert_false(queue_ready(f.q));
    {
        const char *p = strstr(text, "event=redis_disconnected");
        assert_non_null(p);
        assert_non_null(strstr(p, "AUTH failed"));
        /* Logged once per transition, not once per retry. */
        assert_null(strstr(p + 1, "event=redis_disconnected"));
    }
    free(text);
    fixture_finish(&f);
    redis_server_stop(pid);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_id_new, test_setup),
        cmocka_unit_test_setup(test_enqueue_fields, test_setup),
        cmocka_unit_test_setup(test_invalid_utf8_rcpt, test_setup),
        cmocka_unit_test_setup(test_not_connected, test_setup),
        cmocka_unit_test_setup(test_appendonly_warning, test_setup),
        cmocka_unit_test_setup(test_wait_replicas, test_setup),
        cmocka_unit_test_setup(test_wait_replica_ok, test_setup),
        cmocka_unit_test_setup(test_redis_errors, test_setup),
        cmocka_unit_test_setup(test_group_from_zero, test_setup),
        cmocka_unit_test_setup(test_backpressure, test_setup),
        cmocka_unit_test_setup(test_close_with_pending, test_setup),
        cmocka_unit_test_setup(test_close_while_connecting, test_setup),
        cmocka_unit_test_setup(test_timeout_sigstop, test_setup),
        cmocka_unit_test_setup(test_auth_select_no_config, test_setup),
        cmocka_unit_test_setup(test_kill_and_restart, test_setup),
    };

    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
