/*
 * Tests of the stepwise transaction API of transports/smtp_client
 * (smtp_client_mail/rcpt/data/rset), which the relay uses to pass each MX
 * reply back, against a scripted server on the test's own libuv loop:
 * exact transcripts, replies passed as they came, the client's state
 * after each step, refusals made locally without a byte sent, DATA refused
 * (RSET follows), 421, and a connection lost after the final ".".
 *
 * Script steps: "S:text" sends text and CRLF, "C:line" expects exactly
 * that command line, "D" takes content up to the final "." (kept with the
 * client's dot-stuffing), "X" closes the connection. Every test ends with
 * the client freed, the loop run dry and uv_loop_close() succeeding.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "transports/smtp_client.h"

static uv_loop_t loop;

static void tick(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until *flag is set. A ticking timer keeps each round
 * short: UV_RUN_ONCE would otherwise block in the poll after the callback
 * that set the flag has run. */
static void run_until(const int *flag, unsigned ms)
{
    uint64_t end = uv_now(&loop) + ms;
    uv_timer_t t;

    uv_timer_init(&loop, &t);
    uv_timer_start(&t, tick, 10, 10);
    while (!*flag) {
        uv_run(&loop, UV_RUN_ONCE);
        if (uv_now(&loop) > end)
            break;
    }
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    if (!*flag)
        fail_msg("timed out waiting on the loop");
}

/* ---- scripted server --------------------------------------------------------------- */

struct script {
    const char *const *steps;
    size_t nsteps, i;
    uv_tcp_t server, client;
    int have_client, client_closed, server_closed;
    int port;
    struct buf in, data;
    char error[512];
};

struct sw {
    uv_write_t req;
    char *p;
};

static void sw_done(uv_write_t *req, int status)
{
    struct sw *w = (struct sw *)req;

    (void)status;
    free(w->p);
    free(w);
}

static void script_send(struct script *s, const char *text)
{
    struct sw *w = calloc(1, sizeof(*w));
    size_t n = strlen(text);
    uv_buf_t b;

    assert_non_null(w);
    w->p = malloc(n + 2);
    assert_non_null(w->p);
    memcpy(w->p, text, n);
    memcpy(w->p + n, "\r\n", 2);
    b = uv_buf_init(w->p, (unsigned)(n + 2));
    uv_write(&w->req, (uv_stream_t *)&s->client, &b, 1, sw_done);
}

static void script_client_closed(uv_handle_t *h)
{
    ((struct script *)h->data)->client_closed = 1;
}

static void script_run(struct script *s)
{
    while (s->i < s->nsteps && s->error[0] == '\0') {
        const char *st = s->steps[s->i];

        if (st[0] == 'S') {
            script_send(s, st + 2);
            s->i++;
        } else if (st[0] == 'C') {
            char *crlf = s->in.len ? memmem(s->in.data, s->in.len, "\r\n", 2) : NULL;
            size_t n;

            if (crlf == NULL)
                return;
            n = (size_t)(crlf - s->in.data);
            if (n != strlen(st + 2) || memcmp(s->in.data, st + 2, n) != 0) {
                snprintf(s->error, sizeof(s->error), "step %zu: want \"%s\", got \"%.*s\"",
                         s->i, st + 2, (int)n, s->in.data);
                return;
            }
            buf_consume(&s->in, n + 2);
            s->i++;
        } else if (st[0] == 'D') {
            char *end = NULL;

            if (s->in.len >= 3 && memcmp(s->in.data, ".\r\n", 3) == 0)
                end = s->in.data - 2;
            else if (s->in.len > 0)
                end = memmem(s->in.data, s->in.len, "\r\n.\r\n", 5);
            if (end == NULL)
                return;
            buf_append(&s->data, s->in.data, (size_t)(end + 2 - s->in.data));
            buf_consume(&s->in, (size_t)(end + 5 - s->in.data));
            s->i++;
        } else {            /* X */
            s->i++;
            if (!uv_is_closing((uv_handle_t *)&s->client))
                uv_close((uv_handle_t *)&s->client, script_client_closed);
            return;
        }
    }
}

static void script_alloc(uv_handle_t *h, size_t sz, uv_buf_t *b)
{
    (void)h;
    b->base = malloc(sz);
    b->len = sz;
}

static void script_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    struct script *s = st->data;

    if (n > 0) {
        buf_append(&s->in, b->base, (size_t)n);
        script_run(s);
    } else if (n < 0) {
        uv_read_stop(st);
        if (!uv_is_closing((uv_handle_t *)&s->client))
            uv_close((uv_handle_t *)&s->client, script_client_closed);
    }
    free(b->base);
}

static void script_accept(uv_stream_t *server, int status)
{
    struct script *s = server->data;

    assert_int_equal(status, 0);
    uv_tcp_init(&loop, &s->client);
    s->client.data = s;
    assert_int_equal(uv_accept(server, (uv_stream_t *)&s->client), 0);
    s->have_client = 1;
    uv_read_start((uv_stream_t *)&s->client, script_alloc, script_read);
    script_run(s);
}

static void script_start(struct script *s, const char *const *steps, size_t n)
{
    struct sockaddr_in sa;
    int len = sizeof(sa);

    memset(s, 0, sizeof(*s));
    s->steps = steps;
    s->nsteps = n;
    uv_tcp_init(&loop, &s->server);
    s->server.data = s;
    uv_ip4_addr("127.0.0.1", 0, &sa);
    assert_int_equal(uv_tcp_bind(&s->server, (struct sockaddr *)&sa, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&s->server, 8, script_accept), 0);
    uv_tcp_getsockname(&s->server, (struct sockaddr *)&sa, &len);
    s->port = ntohs(sa.sin_port);
}

static void script_server_closed(uv_handle_t *h)
{
    ((struct script *)h->data)->server_closed = 1;
}

static void script_finish(struct script *s)
{
    if (s->error[0] != '\0')
        fail_msg("script: %s", s->error);
    if (s->i != s->nsteps)
        fail_msg("script stopped at step %zu of %zu (%s)", s->i, s->nsteps, s->steps[s->i]);
    if (s->have_client && !uv_is_closing((uv_handle_t *)&s->client))
        uv_close((uv_handle_t *)&s->client, script_client_closed);
    uv_close((uv_handle_t *)&s->server, script_server_closed);
    run_until(&s->server_closed, 5000);
    if (s->have_client)
        run_until(&s->client_closed, 5000);
    buf_free(&s->in);
    buf_free(&s->data);
}

#define NSTEPS(a) (sizeof(a) / sizeof(a[0]))

/* ---- the client ------------------------------------------------------------------- */

struct tc {
    struct smtp_client *c;
    int ready, status, done, freed, step_status;
    struct smtp_reply reply;
    int have_reply;
};

static void on_ready(struct smtp_client *c, int status, const struct smtp_reply *r,
                     const char *err, void *arg)
{
    struct tc *t = arg;

    (void)c;
    (void)r;
    (void)err;
    t->ready = 1;
    t->status = status;
}

static void on_freed(void *arg)
{
    ((struct tc *)arg)->freed = 1;
}

static void on_step(struct smtp_client *c, int status, const struct smtp_reply *r, void *arg)
{
    struct tc *t = arg;

    (void)c;
    t->done = 1;
    t->step_status = status;
    t->have_reply = r != NULL;
    if (r != NULL)
        t->reply = *r;
}

static void client_start(struct tc *t, int port)
{
    struct smtp_client_opts o;
    struct sockaddr_in sa;

    memset(t, 0, sizeof(*t));
    memset(&o, 0, sizeof(o));
    o.helo = "client.test";
    o.tls = SMTP_CLIENT_TLS_NONE;
    o.command_timeout = o.mail_timeout = o.rcpt_timeout = o.data_timeout = 5;
    o.dot_timeout = o.greeting_timeout = o.connect_timeout = 5;
    uv_ip4_addr("127.0.0.1", port, &sa);
    t->c = smtp_client_connect(&loop, (struct sockaddr *)&sa, &o, on_ready, t);
    smtp_client_on_free(t->c, on_freed, t);
    run_until(&t->ready, 5000);
    assert_int_equal(t->status, 0);
}

/* Waits for the step started by the caller and checks the reply. */
static void step_wait(struct tc *t, int status, int code, const char *enh, const char *text)
{
    run_until(&t->done, 5000);
    t->done = 0;
    assert_int_equal(t->step_status, status);
    if (code == 0) {
        assert_false(t->have_reply);
        return;
    }
    assert_true(t->have_reply);
    assert_int_equal(t->reply.code, code);
    assert_string_equal(t->reply.enhanced, enh);
    if (text != NULL)
        assert_string_equal(t->reply.text, text);
}

static void client_end(struct tc *t, int quit)
{
    if (quit)
        smtp_client_quit(t->c);
    else
        smtp_client_close(t->c);
    run_until(&t->freed, 6000);
}

static const struct smtp_client_mail_params no_params = {-1, 0, 0};

#define EHLO_REPLY "S:250-script.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000"

/* ---- tests ---------------------------------------------------------------------------- */

/* One command at a time, each reply reported as the server sent it, the
 * content dot-stuffed, the client idle after the end of data and ready
 * for the next transaction; a refused MAIL leaves it idle too. */
static void test_transcript(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_REPLY,
        "C:MAIL FROM:<s@y.test> SIZE=20 BODY=8BITMIME",
        "S:250 2.1.0 Sender ok",
        "C:RCPT TO:<a@x.test>",
        "S:250 2.1.5 Recipient ok",
        "C:RCPT TO:<b@x.test>",
        "S:550-5.1.1 No such user\r\n550 5.1.1 Really",
        "C:DATA",
        "S:354 Go ahead",
        "D",
        "S:250 2.0.0 Ok: queued as ABC",
        "C:MAIL FROM:<>",
        "S:553 5.7.1 Not from you",
        "C:RSET",
        "S:250 2.0.0 Ok",
        "C:QUIT",
        "S:221 2.0.0 Bye",
    };
    static const char msg[] = "A: b\r\n\r\n.x\r\nend\r\n";
    struct smtp_client_mail_params p = {20, 1, 0};
    struct script s;
    struct tc t;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port);
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &p, on_step, &t), 0);
    /* One command in flight at a time. */
    assert_int_equal(smtp_client_rcpt(t.c, "a@x.test", on_step, &t), -1);
    step_wait(&t, 0, 250, "2.1.0", "Sender ok");
    assert_true(smtp_client_in_transaction(t.c));
    assert_false(smtp_client_idle(t.c));
    assert_int_equal(smtp_client_rcpt(t.c, "a@x.test", on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.5", "Recipient ok");
    assert_int_equal(smtp_client_rcpt(t.c, "b@x.test", on_step, &t), 0);
    step_wait(&t, 0, 550, "5.1.1", "No such user\nReally");
    assert_int_equal(t.reply.nlines, 2);
    assert_int_equal(smtp_client_data(t.c, msg, sizeof(msg) - 1, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.0.0", "Ok: queued as ABC");
    assert_string_equal(s.data.data, "A: b\r\n\r\n..x\r\nend\r\n");
    assert_true(smtp_client_idle(t.c));
    assert_false(smtp_client_in_transaction(t.c));
    /* RCPT and DATA need an open transaction. */
    assert_int_equal(smtp_client_rcpt(t.c, "a@x.test", on_step, &t), -1);
    assert_int_equal(smtp_client_data(t.c, msg, 3, on_step, &t), -1);
    assert_int_equal(smtp_client_mail(t.c, "", &no_params, on_step, &t), 0);
    step_wait(&t, 0, 553, "5.7.1", "Not from you");
    assert_true(smtp_client_idle(t.c));
    assert_int_equal(smtp_client_rset(t.c, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.0.0", "Ok");
    client_end(&t, 1);
    script_finish(&s);
}

/* DATA refused: the client sends RSET by itself and reports the refusal
 * of DATA, idle again. RSET also ends an open transaction on request. */
static void test_data_refused(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_REPLY,
        "C:MAIL FROM:<s@y.test>",
        "S:250 2.1.0 Ok",
        "C:RCPT TO:<a@x.test>",
        "S:250 2.1.5 Ok",
        "C:DATA",
        "S:554 5.5.1 No valid recipients",
        "C:RSET",
        "S:250 2.0.0 Ok",
        "C:MAIL FROM:<s@y.test>",
        "S:250 2.1.0 Ok",
        "C:RSET",
        "S:250 2.0.0 Flushed",
    };
    struct script s;
    struct tc t;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port);
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &no_params, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.0", NULL);
    assert_int_equal(smtp_client_rcpt(t.c, "a@x.test", on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.5", NULL);
    assert_int_equal(smtp_client_data(t.c, "x\r\n", 3, on_step, &t), 0);
    step_wait(&t, 0, 554, "5.5.1", "No valid recipients");
    assert_true(smtp_client_idle(t.c));
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &no_params, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.0", NULL);
    assert_int_equal(smtp_client_rset(t.c, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.0.0", "Flushed");
    assert_true(smtp_client_idle(t.c));
    client_end(&t, 0);
    script_finish(&s);
}

/* What the server cannot take is refused here, without a byte sent:
 * SMTPUTF8 not offered, 8-bit content without 8BITMIME, a declared size
 * over the announced SIZE, an address that would break the line. */
static void test_local_refusals(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        "S:250-script.test\r\n250 SIZE 1000",
        "C:MAIL FROM:<ok@y.test> SIZE=1000",
        "S:250 2.1.0 Ok",
        "C:RCPT TO:<a@x.test>",
        "S:250 2.1.5 Ok",
        "C:QUIT",
        "S:221 Bye",
    };
    struct smtp_client_mail_params utf8 = {-1, 0, 1}, bit8 = {-1, 1, 0}, big = {1001, 0, 0},
                                       fits = {1000, 0, 0};
    struct script s;
    struct tc t;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port);
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &utf8, on_step, &t), 0);
    step_wait(&t, 0, 553, "5.6.7", NULL);
    assert_true(smtp_client_idle(t.c));
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &bit8, on_step, &t), 0);
    step_wait(&t, 0, 554, "5.6.3", NULL);
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &big, on_step, &t), 0);
    step_wait(&t, 0, 552, "5.3.4", NULL);
    assert_int_equal(smtp_client_mail(t.c, "s\r\nRSET@y.test", &no_params, on_step, &t), 0);
    step_wait(&t, 0, 553, "5.1.7", NULL);
    assert_int_equal(smtp_client_mail(t.c, "ok@y.test", &fits, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.0", NULL);
    assert_int_equal(smtp_client_rcpt(t.c, "bad>@x.test", on_step, &t), 0);
    step_wait(&t, 0, 553, "5.1.3", NULL);
    assert_true(smtp_client_in_transaction(t.c));
    assert_int_equal(smtp_client_rcpt(t.c, "a@x.test", on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.5", NULL);
    /* QUIT is fine inside a transaction. */
    client_end(&t, 1);
    script_finish(&s);
}

/* A 421 is reported as the server's reply, and the client is broken. */
static void test_421(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_REPLY,
        "C:MAIL FROM:<s@y.test>",
        "S:250 2.1.0 Ok",
        "C:RCPT TO:<a@x.test>",
        "S:421 4.7.28 Rate limited, closing",
    };
    struct script s;
    struct tc t;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port);
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &no_params, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.0", NULL);
    assert_int_equal(smtp_client_rcpt(t.c, "a@x.test", on_step, &t), 0);
    step_wait(&t, 0, 421, "4.7.28", "Rate limited, closing");
    assert_false(smtp_client_idle(t.c));
    assert_false(smtp_client_in_transaction(t.c));
    assert_int_equal(smtp_client_rcpt(t.c, "b@x.test", on_step, &t), -1);
    client_end(&t, 0);
    script_finish(&s);
}

/* The connection lost after the final "." : the server may have taken
 * the message, and the status says so. */
static void test_ambiguous(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_REPLY,
        "C:MAIL FROM:<s@y.test>",
        "S:250 2.1.0 Ok",
        "C:RCPT TO:<a@x.test>",
        "S:250 2.1.5 Ok",
        "C:DATA",
        "S:354 Go",
        "D",
        "X",
    };
    struct script s;
    struct tc t;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port);
    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &no_params, on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.0", NULL);
    assert_int_equal(smtp_client_rcpt(t.c, "a@x.test", on_step, &t), 0);
    step_wait(&t, 0, 250, "2.1.5", NULL);
    assert_int_equal(smtp_client_data(t.c, "x\r\n", 3, on_step, &t), 0);
    step_wait(&t, SMTP_CLIENT_AMBIGUOUS, 0, NULL, NULL);
    assert_false(smtp_client_idle(t.c));
    client_end(&t, 0);
    script_finish(&s);
}

/* Closing the client with a command in flight completes it with an
 * error, from the loop. */
static void test_close_pending(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_REPLY,
        "C:MAIL FROM:<s@y.test>",
    };
    struct script s;
    struct tc t;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port);
    int seen = 0;

    assert_int_equal(smtp_client_mail(t.c, "s@y.test", &no_params, on_step, &t), 0);
    while (!seen) {
        uv_run(&loop, UV_RUN_NOWAIT);
        seen = s.i == s.nsteps;
    }
    smtp_client_close(t.c);
    assert_false(t.done);          /* never from inside the call */
    step_wait(&t, -1, 0, NULL, NULL);
    run_until(&t.freed, 5000);
    script_finish(&s);
}

static int setup(void **state)
{
    (void)state;
    log_set_level(getenv("MF_TEST_DEBUG") ? "debug" : "error");
    return uv_loop_init(&loop);
}

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* After a passing test nothing is left on the loop. After a failed one,
 * whatever is left is closed, so that the next test can run. */
static int teardown(void **state)
{
    int left;

    (void)state;
    uv_run(&loop, UV_RUN_NOWAIT);
    left = uv_loop_alive(&loop);
    uv_walk(&loop, close_walk, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    assert_int_equal(left, 0);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_transcript, setup, teardown),
        cmocka_unit_test_setup_teardown(test_data_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_local_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_421, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ambiguous, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_pending, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
