/*
 * Unit tests for lib/dns.c: reverse names (table-driven), then real
 * queries against a private dnsmasq on 127.0.0.1 (a free port, records
 * given on its command line, started with fork/exec and stopped by PID).
 * When dnsmasq is not installed the query tests are skipped.
 *
 * Every query test ends with dns_close(), runs the loop until on_closed,
 * and checks that uv_loop_close() succeeds: no handle is left behind (and
 * ASan checks that no memory is).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "lib/dns.h"
#include "lib/log.h"

#define DNSMASQ "/usr/sbin/dnsmasq"

static int dns_port;
static pid_t dnsmasq_pid;
static char servers[64];

/* A 2048-bit RSA DKIM key is published as two strings; the reader must
 * join them. The parts here stand in for such a key. */
#define PART1 "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"
#define PART2 "second-part-of-the-key"

/* A loopback port free for both UDP and TCP (dnsmasq binds both). */
static int free_udp_port(void)
{
    for (;;) {
        struct sockaddr_in sa;
        socklen_t len = sizeof(sa);
        int u = socket(AF_INET, SOCK_DGRAM, 0), t, port, ok;

        assert_true(u >= 0);
        memset(&sa, 0, sizeof(sa));
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(bind(u, (struct sockaddr *)&sa, sizeof(sa)), 0);
        assert_int_equal(getsockname(u, (struct sockaddr *)&sa, &len), 0);
        port = ntohs(sa.sin_port);
        t = socket(AF_INET, SOCK_STREAM, 0);
        assert_true(t >= 0);
        ok = bind(t, (struct sockaddr *)&sa, sizeof(sa)) == 0;
        close(t);
        close(u);
        if (ok)
            return port;
    }
}

/* ---- a loop with one resolver ---------------------------------------------- */

struct ctx {
    uv_loop_t loop;
    struct dns *dns;
    int closed;
    int ncalls;
    struct dns_result *last;
};

static void on_closed(void *arg)
{
    struct ctx *c = arg;
    c->closed = 1;
}

static void ctx_init(struct ctx *c, const char *srv, int timeout_ms)
{
    struct dns_options o = {srv, timeout_ms, 1};
    char err[256];

    memset(c, 0, sizeof(*c));
    assert_int_equal(uv_loop_init(&c->loop), 0);
    c->dns = dns_new(&c->loop, &o, err, sizeof(err));
    if (c->dns == NULL)
        fail_msg("dns_new: %s", err);
}

static void ctx_done(struct ctx *c)
{
    dns_close(c->dns, on_closed, c);
    while (!c->closed)
        uv_run(&c->loop, UV_RUN_ONCE);
    uv_run(&c->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&c->loop), 0);
    dns_result_free(c->last);
}

static void keep_result(const struct dns_result *r, void *arg)
{
    struct ctx *c = arg;

    c->ncalls++;
    dns_result_free(c->last);
    c->last = dns_result_dup(r);
}

/* Runs one query to completion and returns its (kept) result. */
static const struct dns_result *query(struct ctx *c, const char *name, enum dns_type t)
{
    int before = c->ncalls;

    dns_query(c->dns, name, t, keep_result, c);
    /* Never from inside dns_query(). */
    assert_int_equal(c->ncalls, before);
    assert_int_equal(dns_pending(c->dns), 1);
    while (c->ncalls == before)
        uv_run(&c->loop, UV_RUN_ONCE);
    assert_int_equal(dns_pending(c->dns), 0);
    return c->last;
}

/* ---- dnsmasq ------------------------------------------------------------------ */

static pid_t start_dnsmasq(void)
{
    char port[32];
    pid_t pid;

    dns_port = free_udp_port();
    snprintf(port, sizeof(port), "--port=%d", dns_port);
    snprintf(servers, sizeof(servers), "127.0.0.1:%d", dns_port);
    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char *argv[] = {
            DNSMASQ, port, "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", "--keep-in-foreground", "--conf-file=/dev/null",
            "--pid-file", "--user=", "--local=/test/", "--local=/arpa/",
            "--txt-record=split.example.test," PART1 "," PART2,
            "--txt-record=two.example.test,first record",
            "--txt-record=two.example.test,second record",
            "--host-record=host.example.test,192.0.2.10,2001:db8::10",
            "--ptr-record=10.2.0.192.in-addr.arpa,host.example.test",
            "--ptr-record=10.2.0.192.in-addr.arpa,alias.example.test",
            "--mx-host=example.test,mx2.example.test,20",
            "--mx-host=example.test,mx1.example.test,10",
            "--mx-host=example.test,mx1b.example.test,10",
            "--mx-host=nullmx.example.test,.,0",
            NULL,
        };
        int devnull = open("/dev/null", 0);
        dup2(devnull, 1);
        dup2(devnull, 2);
        execv(DNSMASQ, argv);
        _exit(127);
    }
    return pid;
}

static int dnsmasq_up(void **state)
{
    (void)state;
    if (access(DNSMASQ, X_OK) != 0)
        return 0;
    /* A port can be taken between choosing it and dnsmasq binding it (other
     * tests run on this host): start again on another one. */
    for (int attempt = 0; attempt < 5; attempt++) {
        struct ctx c;
        int up = 0;

        dnsmasq_pid = start_dnsmasq();
        ctx_init(&c, servers, 200);
        for (int i = 0; i < 50 && !up; i++) {
            if (waitpid(dnsmasq_pid, NULL, WNOHANG) == dnsmasq_pid) {
                dnsmasq_pid = 0;
                break;
            }
            up = query(&c, "host.example.test", DNS_T_A)->status == DNS_OK;
            if (!up)
                usleep(100000);
        }
        ctx_done(&c);
        if (up)
            return 0;
        if (dnsmasq_pid > 0) {
            kill(dnsmasq_pid, SIGTERM);
            waitpid(dnsmasq_pid, NULL, 0);
            dnsmasq_pid = 0;
        }
    }
    fail_msg("dnsmasq did not start");
    return -1;
}

static int dnsmasq_down(void **state)
{
    (void)state;
    if (dnsmasq_pid > 0) {
        kill(dnsmasq_pid, SIGTERM);
        waitpid(dnsmasq_pid, NULL, 0);
        dnsmasq_pid = 0;
    }
    return 0;
}

#define NEED_DNSMASQ()                                    \
    do {                                                  \
        if (dnsmasq_pid <= 0) {                           \
            print_message("dnsmasq not installed\n");     \
            skip();                                       \
        }                                                 \
    } while (0)

/* ---- reverse names ------------------------------------------------------- */

struct rev_case {
    const char *ip, *zone, *want;
};

static const struct rev_case rev_cases[] = {
    {"192.0.2.10", NULL, "10.2.0.192.in-addr.arpa"},
    {"127.0.0.2", "zen.spamhaus.org", "2.0.0.127.zen.spamhaus.org"},
    {"2001:db8::1", NULL,
     "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"},
    {"2001:DB8::567:89ab", "bl.example",
     "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"},
    {"::ffff:192.0.2.1", NULL,
     "1.0.2.0.0.0.0.c.f.f.f.f.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa"},
    {"not-an-ip", NULL, NULL},
    {"192.0.2", NULL, NULL},
    {"", NULL, NULL},
};

static void test_reverse_name(void **state)
{
    char out[128];

    (void)state;
    for (size_t i = 0; i < sizeof(rev_cases) / sizeof(rev_cases[0]); i++) {
        const struct rev_case *c = &rev_cases[i];
        int rc = dns_reverse_name(c->ip, c->zone, out, sizeof(out));
        if (c->want == NULL) {
            assert_int_equal(rc, -1);
            continue;
        }
        assert_int_equal(rc, 0);
        assert_string_equal(out, c->want);
    }
    /* Too small a buffer fails rather than truncates. */
    assert_int_equal(dns_reverse_name("192.0.2.10", NULL, out, 10), -1);
    assert_int_equal(dns_reverse_name("192.0.2.10", NULL, out, 24), 0);
    assert_int_equal(dns_reverse_name("192.0.2.10", NULL, out, 23), -1);
}

static void test_strerror(void **state)
{
    (void)state;
    assert_string_equal(dns_strerror(DNS_OK), "ok");
    assert_string_equal(dns_strerror(DNS_ENOTFOUND), "nxdomain");
    assert_string_equal(dns_strerror(DNS_ENODATA), "nodata");
    assert_string_equal(dns_strerror(DNS_ETIMEOUT), "timeout");
    assert_string_equal(dns_strerror(12345), "error");
}

static void test_bad_servers(void **state)
{
    uv_loop_t loop;
    struct dns_options o = {"not a server list", 0, 0};
    char err[256] = "";

    (void)state;
    uv_loop_init(&loop);
    assert_null(dns_new(&loop, &o, err, sizeof(err)));
    assert_non_null(strstr(err, "not a server list"));
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* ---- queries ----------------------------------------------------------------- */

static void test_txt_joined(void **state)
{
    struct ctx c;
    const struct dns_result *r;

    (void)state;
    NEED_DNSMASQ();
    ctx_init(&c, servers, 2000);
    r = query(&c, "split.example.test", DNS_T_TXT);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->type, DNS_T_TXT);
    assert_string_equal(r->name, "split.example.test");
    assert_int_equal(r->n, 1);
    assert_string_equal(r->txts[0].data, PART1 PART2);
    assert_int_equal(r->txts[0].len, strlen(PART1 PART2));

    r = query(&c, "two.example.test.", DNS_T_TXT);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->n, 2);
    assert_true((strcmp(r->txts[0].data, "first record") == 0 &&
                 strcmp(r->txts[1].data, "second record") == 0) ||
                (strcmp(r->txts[1].data, "first record") == 0 &&
                 strcmp(r->txts[0].data, "second record") == 0));
    ctx_done(&c);
}

static void test_addresses(void **state)
{
    struct ctx c;
    const struct dns_result *r;

    (void)state;
    NEED_DNSMASQ();
    ctx_init(&c, servers, 2000);
    r = query(&c, "host.example.test", DNS_T_A);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->n, 1);
    assert_int_equal(r->addrs[0].family, AF_INET);
    assert_string_equal(r->addrs[0].text, "192.0.2.10");

    r = query(&c, "host.example.test", DNS_T_AAAA);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->n, 1);
    assert_int_equal(r->addrs[0].family, AF_INET6);
    assert_string_equal(r->addrs[0].text, "2001:db8::10");
    ctx_done(&c);
}

static void test_ptr_and_mx(void **state)
{
    struct ctx c;
    const struct dns_result *r;
    char name[128];
    int host = 0, alias = 0;

    (void)state;
    NEED_DNSMASQ();
    ctx_init(&c, servers, 2000);
    assert_int_equal(dns_reverse_name("192.0.2.10", NULL, name, sizeof(name)), 0);
    r = query(&c, name, DNS_T_PTR);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->n, 2);
    for (size_t i = 0; i < r->n; i++) {
        host += strcmp(r->names[i], "host.example.test") == 0;
        alias += strcmp(r->names[i], "alias.example.test") == 0;
    }
    assert_int_equal(host, 1);
    assert_int_equal(alias, 1);

    r = query(&c, "example.test", DNS_T_MX);
    assert_int_equal(r->status, DNS_OK);
    assert_int_equal(r->n, 3);
    assert_int_equal(r->mxs[0].preference, 10);
    assert_int_equal(r->mxs[1].preference, 10);
    assert_int_equal(r->mxs[2].preference, 20);
    assert_string_equal(r->mxs[2].host, "mx2.example.test");
    ctx_done(&c);
}

static void test_negative(void **state)
{
    struct ctx c;
    const struct dns_result *r;

    (void)state;
    NEED_DNSMASQ();
    ctx_init(&c, servers, 2000);
    r = query(&c, "missing.example.test", DNS_T_TXT);
    assert_int_equal(r->status, DNS_ENOTFOUND);
    assert_int_equal(r->n, 0);
    assert_null(r->txts);
    r = query(&c, "host.example.test", DNS_T_TXT);
    assert_int_equal(r->status, DNS_ENODATA);
    assert_int_equal(r->n, 0);
    /* A name that cannot be encoded fails without a packet, from the loop. */
    r = query(&c, "bad..name.test", DNS_T_A);
    assert_int_equal(r->status, DNS_EBADNAME);
    r = query(&c, "", DNS_T_A);
    assert_int_equal(r->status, DNS_EBADNAME);
    r = query(&c, "has space.test", DNS_T_A);
    assert_int_equal(r->status, DNS_EBADNAME);
    ctx_done(&c);
}

/* A server that never answers: the query times out through the timer. */
static void test_timeout(void **state)
{
    struct ctx c;
    const struct dns_result *r;
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    char srv[64];
    uint64_t t0;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);

    (void)state;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    snprintf(srv, sizeof(srv), "127.0.0.1:%d", ntohs(sa.sin_port));
    ctx_init(&c, srv, 150);
    t0 = uv_hrtime();
    r = query(&c, "slow.example.test", DNS_T_A);
    assert_int_equal(r->status, DNS_ETIMEOUT);
    assert_true(uv_hrtime() - t0 >= 100 * 1000000ULL);
    ctx_done(&c);
    close(fd);
}

/* dns_close() with queries in flight: each callback gets DNS_ECANCELLED,
 * from the loop; queries started after close fail the same way. */
struct cancel_ctx {
    struct ctx *c;
    int cancelled;
    int requery;
};

static void on_cancel(const struct dns_result *r, void *arg)
{
    struct cancel_ctx *cc = arg;

    assert_int_equal(r->status, DNS_ECANCELLED);
    cc->cancelled++;
    if (cc->requery) {
        cc->requery = 0;
        dns_query(cc->c->dns, "again.example.test", DNS_T_A, on_cancel, cc);
    }
}

static void test_close_cancels(void **state)
{
    struct ctx c;
    struct cancel_ctx cc = {&c, 0, 1};
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    char srv[64];

    (void)state;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    snprintf(srv, sizeof(srv), "127.0.0.1:%d", ntohs(sa.sin_port));
    ctx_init(&c, srv, 5000);
    dns_query(c.dns, "a.example.test", DNS_T_A, on_cancel, &cc);
    dns_query(c.dns, "b.example.test", DNS_T_TXT, on_cancel, &cc);
    uv_run(&c.loop, UV_RUN_NOWAIT);
    assert_int_equal(cc.cancelled, 0);
    dns_close(c.dns, on_closed, &c);
    assert_int_equal(cc.cancelled, 0);
    while (!c.closed)
        uv_run(&c.loop, UV_RUN_ONCE);
    assert_int_equal(cc.cancelled, 3);
    uv_run(&c.loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&c.loop), 0);
    close(fd);
}

/* Many queries at once, some started from inside callbacks. */
struct burst {
    struct ctx *c;
    int done, ok, chained;
};

static void on_burst(const struct dns_result *r, void *arg)
{
    struct burst *b = arg;

    b->done++;
    if (r->status == DNS_OK && r->n == 1 && strcmp(r->addrs[0].text, "192.0.2.10") == 0)
        b->ok++;
    if (b->chained < 10) {
        b->chained++;
        dns_query(b->c->dns, "host.example.test", DNS_T_A, on_burst, b);
    }
}

static void test_burst(void **state)
{
    struct ctx c;
    struct burst b;

    (void)state;
    NEED_DNSMASQ();
    ctx_init(&c, servers, 2000);
    memset(&b, 0, sizeof(b));
    b.c = &c;
    for (int i = 0; i < 50; i++)
        dns_query(c.dns, "host.example.test", DNS_T_A, on_burst, &b);
    while (dns_pending(c.dns) > 0)
        uv_run(&c.loop, UV_RUN_ONCE);
    assert_int_equal(b.done, 60);
    assert_int_equal(b.ok, 60);
    ctx_done(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reverse_name),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_bad_servers),
        cmocka_unit_test(test_txt_joined),
        cmocka_unit_test(test_addresses),
        cmocka_unit_test(test_ptr_and_mx),
        cmocka_unit_test(test_negative),
        cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_close_cancels),
        cmocka_unit_test(test_burst),
    };

    log_set_level("error");
    signal(SIGPIPE, SIG_IGN);
    return cmocka_run_group_tests(tests, dnsmasq_up, dnsmasq_down);
}
