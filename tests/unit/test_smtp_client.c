/*
 * Tests for transports/smtp_client and the "smtp" transport against real
 * peers on a real libuv loop:
 *
 *  - tests/unit/smtp_peer.py (aiosmtpd from Debian, run with
 *    /usr/bin/python3): records every message byte for byte, STARTTLS with
 *    a certificate made here with the openssl CLI, AUTH PLAIN/LOGIN,
 *    per-recipient answers (temp@ 451, perm@ 550, slow@ delayed), and
 *    counts connections;
 *  - Postfix's smtp-sink, for PIPELINING on and off, refusals of whole
 *    commands (-f, -r), delays (-W) and disconnects (-q);
 *  - a scripted peer on the test's own loop, for exact transcripts and for
 *    what no real server does on purpose (354 with no recipient, a 421 in
 *    the middle of a group, silence after the final ".").
 *
 * Peers are started with fork/exec and stopped by PID. Every test ends with
 * every client and transport closed, runs the loop dry and checks that
 * uv_loop_close() succeeds (no handle left; ASan checks memory).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "lib/buf.h"
#include "lib/config.h"
#include "lib/conn.h"
#include "lib/log.h"
#include "lib/tls.h"
#include "transports/smtp_client.h"
#include "transports/transport.h"

#define PYTHON "/usr/bin/python3"
#define SMTP_SINK "/usr/sbin/smtp-sink"

static uv_loop_t loop;
static char certdir[64];
static char cert_file[128], key_file[128];

/* ---- files and processes -------------------------------------------------- */

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void rm_tree(const char *dir)
{
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void make_tmpdir(char *out, size_t n)
{
    snprintf(out, n, "/tmp/mf-smtpc-XXXXXX");
    assert_non_null(mkdtemp(out));
    /* smtp-sink drops to "nobody" when run as root. */
    chmod(out, 0777);
}

/* Reads a whole file; NULL when it does not exist. */
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    struct buf b = BUF_INIT;
    char tmp[65536];
    size_t n;

    if (f == NULL)
        return NULL;
    while ((n = fread(tmp, 1, sizeof(tmp), f)) > 0)
        buf_append(&b, tmp, n);
    fclose(f);
    if (b.data == NULL)
        buf_append(&b, "", 0);
    if (len != NULL)
        *len = b.len;
    return buf_steal(&b, NULL);
}

static char *read_filef(size_t *len, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static char *read_filef(size_t *len, const char *fmt, ...)
{
    char path[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(path, sizeof(path), fmt, ap);
    va_end(ap);
    return read_file(path, len);
}

static pid_t spawn(char *const argv[], const char *logpath)
{
    pid_t pid = fork();

    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(logpath, O_WRONLY | O_CREAT | O_APPEND, 0644);

        /* A test binary killed from outside takes its peers with it. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);

        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static int run_wait(char *const argv[], const char *logpath)
{
    int st = 0;
    pid_t pid = spawn(argv, logpath);

    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void stop_proc(pid_t pid)
{
    int st, i;

    if (pid <= 0)
        return;
    kill(pid, SIGTERM);
    for (i = 0; i < 300; i++) {
        if (waitpid(pid, &st, WNOHANG) == pid)
            return;
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
}

static int free_port(void)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int port;

    assert_true(fd >= 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

static int port_answers(int port)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0), ok;

    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ok = connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    close(fd);
    return ok;
}

/* ---- peers -------------------------------------------------------------------- */

struct peer {
    pid_t pid;
    int port;
    char dir[64];
};

/* Copies of the peers still running, so that the teardown of a failed
 * test (whose struct peer was on the stack it left) stops them. */
static struct peer live_peers[8];

static void peer_track(const struct peer *p, int on)
{
    size_t i;

    for (i = 0; i < 8; i++) {
        if (on && live_peers[i].pid == 0) {
            live_peers[i] = *p;
            return;
        }
        if (!on && live_peers[i].pid == p->pid) {
            live_peers[i].pid = 0;
            return;
        }
    }
}

/* Starts smtp_peer.py with extra arguments (NULL-terminated); port 0 lets
 * it choose. Waits until it has written its port. */
static void peer_py_start(struct peer *p, int port, ...)
{
    const char *src = getenv("MF_SOURCE_DIR");
    char script[512], portarg[16], log[128];
    char *argv[32];
    size_t n = 0;
    va_list ap;
    const char *a;
    int i;

    memset(p, 0, sizeof(*p));
    make_tmpdir(p->dir, sizeof(p->dir));
    snprintf(script, sizeof(script), "%s/tests/unit/smtp_peer.py", src != NULL ? src : ".");
    snprintf(portarg, sizeof(portarg), "%d", port);
    snprintf(log, sizeof(log), "%s/peer.log", p->dir);
    argv[n++] = (char *)PYTHON;
    argv[n++] = script;
    argv[n++] = (char *)"--dir";
    argv[n++] = p->dir;
    argv[n++] = (char *)"--port";
    argv[n++] = portarg;
    va_start(ap, port);
    while ((a = va_arg(ap, const char *)) != NULL && n < 30)
        argv[n++] = (char *)a;
    va_end(ap);
    argv[n] = NULL;
    p->pid = spawn(argv, log);
    peer_track(p, 1);
    for (i = 0; i < 1000; i++) {
        char *s = read_filef(NULL, "%s/port", p->dir);

        if (s != NULL) {
            p->port = (int)strtol(s, NULL, 10);
            free(s);
            return;
        }
        usleep(10000);
    }
    fail_msg("smtp_peer.py did not start (see %s)", log);
}

/* Starts smtp-sink with extra options (NULL-terminated) on a free port. */
static void peer_sink_start(struct peer *p, ...)
{
    char addr[64], log[128];
    char *argv[32];
    size_t n = 0;
    va_list ap;
    const char *a;
    int i;

    memset(p, 0, sizeof(*p));
    make_tmpdir(p->dir, sizeof(p->dir));
    p->port = free_port();
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", p->port);
    snprintf(log, sizeof(log), "%s/sink.log", p->dir);
    argv[n++] = (char *)SMTP_SINK;
    if (geteuid() == 0) {
        argv[n++] = (char *)"-u";
        argv[n++] = (char *)"nobody";
    }
    va_start(ap, p);
    while ((a = va_arg(ap, const char *)) != NULL && n < 28)
        argv[n++] = (char *)a;
    va_end(ap);
    argv[n++] = addr;
    argv[n++] = (char *)"100";
    argv[n] = NULL;
    p->pid = spawn(argv, log);
    peer_track(p, 1);
    for (i = 0; i < 500; i++) {
        if (port_answers(p->port))
            return;
        usleep(10000);
    }
    fail_msg("smtp-sink did not start (see %s)", log);
}

static void peer_stop(struct peer *p)
{
    peer_track(p, 0);
    stop_proc(p->pid);
    p->pid = 0;
    rm_tree(p->dir);
}

/* "connections=N max_concurrent=M current=C" from the python peer. */
static void peer_stats(const struct peer *p, int *total, int *maxc)
{
    char *s = read_filef(NULL, "%s/stats", p->dir);

    assert_non_null(s);
    assert_int_equal(sscanf(s, "connections=%d max_concurrent=%d", total, maxc), 2);
    free(s);
}

/* ---- the loop ----------------------------------------------------------------- */

static void on_watchdog(uv_timer_t *t)
{
    *(int *)t->data = 1;
    uv_stop(t->loop);
}

/* Runs the loop until *flag is set; fails after max_ms. */
static void run_until(const int *flag, unsigned max_ms)
{
    uv_timer_t wd;
    int expired = 0;

    uv_timer_init(&loop, &wd);
    wd.data = &expired;
    uv_timer_start(&wd, on_watchdog, max_ms, 0);
    while (!*flag && !expired)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&wd, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    if (!*flag)
        fail_msg("timed out after %u ms", max_ms);
}

static void run_for(unsigned ms)
{
    int never = 0;
    uv_timer_t wd;
    int expired = 0;

    uv_timer_init(&loop, &wd);
    wd.data = &expired;
    uv_timer_start(&wd, on_watchdog, ms, 0);
    while (!never && !expired)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&wd, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
}

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int setup(void **state)
{
    (void)state;
    return uv_loop_init(&loop);
}

/* Everything the test made must be closed by now: the loop runs dry
 * within a few seconds and closes without busy handles. */
static int teardown(void **state)
{
    uv_timer_t wd;
    int expired = 0;

    (void)state;
    for (size_t i = 0; i < 8; i++) {
        if (live_peers[i].pid != 0) {
            struct peer p = live_peers[i];

            peer_stop(&p);
        }
    }
    uv_timer_init(&loop, &wd);
    wd.data = &expired;
    uv_timer_start(&wd, on_watchdog, 15000, 0);
    uv_unref((uv_handle_t *)&wd);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&wd, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    if (expired) {
        fprintf(stderr, "teardown: handles still open after the test\n");
        return -1;
    }
    return uv_loop_close(&loop) == 0 ? 0 : -1;
}

/* ---- client callbacks --------------------------------------------------------- */

struct tctx {
    struct smtp_client *c;
    int ready, status;
    char err[512];
    int reply_code;
    int tx_done;
    struct transport_rcpt_result res[16];
    size_t nres;
    int conn_ok;
    int cmd_done, cmd_status, cmd_code;
    int freed;
};

static void on_ready(struct smtp_client *c, int status, const struct smtp_reply *reply,
                     const char *err, void *arg)
{
    struct tctx *t = arg;

    (void)c;
    t->ready = 1;
    t->status = status;
    snprintf(t->err, sizeof(t->err), "%s", err != NULL ? err : "");
    t->reply_code = reply != NULL ? reply->code : 0;
}

static void on_tx(struct smtp_client *c, const struct smtp_client_result *res, void *arg)
{
    struct tctx *t = arg;
    size_t i;

    (void)c;
    t->tx_done++;
    t->nres = res->nrcpts;
    for (i = 0; i < res->nrcpts && i < 16; i++)
        t->res[i] = res->rcpt[i];
    t->conn_ok = res->conn_ok;
}

static void on_cmd(struct smtp_client *c, int status, const struct smtp_reply *reply, void *arg)
{
    struct tctx *t = arg;

    (void)c;
    t->cmd_done = 1;
    t->cmd_status = status;
    t->cmd_code = reply != NULL ? reply->code : 0;
}

static void on_free(void *arg)
{
    ((struct tctx *)arg)->freed = 1;
}

static struct smtp_client_opts base_opts(void)
{
    struct smtp_client_opts o;

    memset(&o, 0, sizeof(o));
    o.helo = "client.test";
    o.tls = SMTP_CLIENT_TLS_NONE;
    return o;
}

static void client_start(struct tctx *t, int port, const struct smtp_client_opts *o)
{
    struct sockaddr_in sa;

    memset(t, 0, sizeof(*t));
    assert_int_equal(uv_ip4_addr("127.0.0.1", port, &sa), 0);
    t->c = smtp_client_connect(&loop, (struct sockaddr *)&sa, o, on_ready, t);
    assert_non_null(t->c);
    smtp_client_on_free(t->c, on_free, t);
    run_until(&t->ready, 20000);
}

/* Starts a client that must become ready. */
static void client_start_ok(struct tctx *t, int port, const struct smtp_client_opts *o)
{
    client_start(t, port, o);
    if (t->status != 0)
        fail_msg("ready failed: %s", t->err);
}

static void msg_init(struct transport_msg *m, const char *from, const char *const *rcpts,
                     size_t n, const char *data, size_t len)
{
    memset(m, 0, sizeof(*m));
    m->from = from;
    m->rcpts = rcpts;
    m->nrcpts = n;
    m->data = data;
    m->len = len;
}

/* Sends m and waits up to max_ms for its result. */
static void client_send_msg(struct tctx *t, const struct transport_msg *m, unsigned max_ms)
{
    t->tx_done = 0;
    assert_int_equal(smtp_client_send(t->c, m, on_tx, t), 0);
    /* Callbacks never run inside the call. */
    assert_int_equal(t->tx_done, 0);
    run_until(&t->tx_done, max_ms);
}

static void client_send(struct tctx *t, const char *from, const char *const *rcpts, size_t n,
                        const char *data, size_t len)
{
    struct transport_msg m;

    msg_init(&m, from, rcpts, n, data, len);
    m.id = "T1";
    client_send_msg(t, &m, 20000);
}

static const char simple_msg[] = "Subject: test\r\n\r\nHello.\r\n";

/* Sends simple_msg and waits for its result. */
static void send_simple(struct tctx *t, const char *from, const char *const *rcpts, size_t n)
{
    client_send(t, from, rcpts, n, simple_msg, sizeof(simple_msg) - 1);
}

static void client_quit(struct tctx *t)
{
    smtp_client_quit(t->c);
    run_until(&t->freed, 10000);
}

/* Closes the client without QUIT and waits until it is freed. */
static void client_abandon(struct tctx *t)
{
    smtp_client_close(t->c);
    run_until(&t->freed, 5000);
}

static void check_rcpt(const struct transport_rcpt_result *r, int code, const char *enh,
                       int final, int ambiguous)
{
    if (r->code != code || strcmp(r->enhanced, enh) != 0 || r->final != final ||
        r->ambiguous != ambiguous)
        fail_msg("result %d %s final=%d ambiguous=%d (%s), want %d %s final=%d ambiguous=%d",
                 r->code, r->enhanced, r->final, r->ambiguous, r->text, code, enh, final,
                 ambiguous);
}

/* The first n results of the last transaction are all the same. */
static void check_rcpts(const struct tctx *t, size_t n, int code, const char *enh, int final,
                        int ambiguous)
{
    assert_true(n <= 16);
    for (size_t i = 0; i < n; i++)
        check_rcpt(&t->res[i], code, enh, final, ambiguous);
}

/* ---- scripted peer ---------------------------------------------------------------- */

/*
 * A server on the test's loop that follows a script: "S:text" sends text
 * and CRLF (text may hold several CRLF-separated lines), "C:line" expects
 * exactly that command line, "D" takes message content up to the final
 * "." line (kept raw, with the client's dot-stuffing), "X" closes the
 * connection after sending what is queued, "H" goes silent. Replies go out
 * only when the script reaches them, so a script that lists several C
 * steps before their replies proves that the client pipelines.
 */
struct script {
    const char *const *steps;
    size_t nsteps, i;
    uv_tcp_t server, client;
    int have_client, client_closed, server_closed;
    int port;
    struct buf in, data;
    char error[512];
    int done;
};

struct sw {
    uv_write_t req;
    char *p;
};

static void script_write_done(uv_write_t *req, int status)
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
    uv_write(&w->req, (uv_stream_t *)&s->client, &b, 1, script_write_done);
}

static void script_client_closed(uv_handle_t *h)
{
    ((struct script *)h->data)->client_closed = 1;
}

static void script_shutdown_done(uv_shutdown_t *req, int status)
{
    struct script *s = req->data;

    (void)status;
    free(req);
    if (!uv_is_closing((uv_handle_t *)&s->client))
        uv_close((uv_handle_t *)&s->client, script_client_closed);
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
        } else if (st[0] == 'X') {
            uv_shutdown_t *req = calloc(1, sizeof(*req));

            assert_non_null(req);
            req->data = s;
            s->i++;
            s->done = 1;
            if (uv_shutdown(req, (uv_stream_t *)&s->client, script_shutdown_done) != 0) {
                free(req);
                uv_close((uv_handle_t *)&s->client, script_client_closed);
            }
            return;
        } else {            /* H */
            s->i++;
            s->done = 1;
            return;
        }
    }
    if (s->i == s->nsteps)
        s->done = 1;
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
    assert_false(s->have_client);
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

/* Checks that the whole script ran and releases it. */
static void script_finish(struct script *s)
{
    if (s->error[0] != '\0')
        fail_msg("script: %s", s->error);
    if (s->i != s->nsteps)
        fail_msg("script stopped at step %zu of %zu (%s)", s->i, s->nsteps,
                 s->i < s->nsteps ? s->steps[s->i] : "");
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
#define EHLO_PIPE "S:250-script.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000"

/* ---- certificate ----------------------------------------------------------------- */

static int group_setup(void **state)
{
    char log[128];
    char subj[] = "/CN=localhost";
    char san[] = "subjectAltName=DNS:localhost,IP:127.0.0.1";
    char *argv[] = {(char *)"/usr/bin/openssl", (char *)"req", (char *)"-x509",
                    (char *)"-newkey", (char *)"ec", (char *)"-pkeyopt",
                    (char *)"ec_paramgen_curve:prime256v1", (char *)"-nodes",
                    (char *)"-keyout", key_file, (char *)"-out", cert_file, (char *)"-days",
                    (char *)"2", (char *)"-subj", subj, (char *)"-addext", san, NULL};

    (void)state;
    signal(SIGPIPE, SIG_IGN);
    if (getenv("MF_TEST_DEBUG") != NULL)
        log_set_level("debug");
    else
        log_set_level("warn");
    make_tmpdir(certdir, sizeof(certdir));
    snprintf(cert_file, sizeof(cert_file), "%s/cert.pem", certdir);
    snprintf(key_file, sizeof(key_file), "%s/key.pem", certdir);
    snprintf(log, sizeof(log), "%s/openssl.log", certdir);
    return run_wait(argv, log) == 0 ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    rm_tree(certdir);
    return 0;
}

/* ---- client tests: aiosmtpd -------------------------------------------------------- */

/* The arguments of peer_py_start() for a server with STARTTLS (the test
 * certificate) and AUTH for user:s3cret. */
#define PEER_TLS_AUTH "--tls-cert", cert_file, "--tls-key", key_file, "--auth", "user:s3cret"

/* A client context that verifies the test certificate. */
static struct tls_ctx *verifying_ctx(void)
{
    char err[256];
    struct tls_ctx *ctx = tls_ctx_client(cert_file, 1, NULL, NULL, err, sizeof(err));

    if (ctx == NULL)
        fail_msg("%s", err);
    return ctx;
}

/* Options for TLS mode tls with ctx and servername, and AUTH as user. */
static struct smtp_client_opts tls_auth_opts(enum smtp_client_tls tls, struct tls_ctx *ctx,
                                             const char *servername, const char *pass)
{
    struct smtp_client_opts o = base_opts();

    o.tls = tls;
    o.tls_ctx = ctx;
    o.servername = servername;
    o.auth_user = "user";
    o.auth_pass = pass;
    return o;
}

/* The peer's auth.log holds exactly want. */
static void check_auth_log(const struct peer *p, const char *want)
{
    char *log = read_filef(NULL, "%s/auth.log", p->dir);

    assert_non_null(log);
    assert_string_equal(log, want);
    free(log);
}

/* RFC 2920: MAIL, four RCPTs and DATA in one group, per-recipient answers
 * (250 / 451 4.2.0 / 550 5.1.1 / 250); only the accepted ones get the
 * message, and their result is the reply to the final ".". */
static void test_pipelined_mixed(void **state)
{
    struct peer p;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"ok1@x.test", "temp@x.test", "perm@x.test", "ok2@x.test"};
    char *env;

    (void)state;
    peer_py_start(&p, 0, "--pipelining", NULL);
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, 0);
    assert_true(smtp_client_idle(t.c));
    assert_true(smtp_reply_has_keyword(smtp_client_ehlo(t.c), "PIPELINING", NULL, 0));
    send_simple(&t, "sender@y.test", rcpts, 4);
    assert_int_equal(t.nres, 4);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    check_rcpt(&t.res[1], 451, "4.2.0", 0, 0);
    check_rcpt(&t.res[2], 550, "5.1.1", 1, 0);
    check_rcpt(&t.res[3], 250, "2.0.0", 1, 0);
    assert_string_equal(t.res[2].text, "No such user");
    assert_true(t.conn_ok);
    assert_true(smtp_client_idle(t.c));
    env = read_filef(NULL, "%s/msg-1.env", p.dir);
    assert_non_null(env);
    assert_string_equal(env, "from sender@y.test\nrcpt ok1@x.test\nrcpt ok2@x.test\n"
                             "mailopt SIZE=25\n");
    free(env);
    client_quit(&t);
    peer_stop(&p);
}

/* Builds a message of about size bytes whose lines often start with ".",
 * including lone "." lines and a "." right at a 64 KiB block boundary. */
static char *dotty_message(size_t size, size_t *len)
{
    struct buf b = BUF_INIT;
    unsigned i = 0;

    buf_appends(&b, "Subject: dots\r\n\r\n");
    while (b.len < size) {
        switch (i++ % 5) {
        case 0:
            buf_appendf(&b, ".line %u starts with a dot\r\n", i);
            break;
        case 1:
            buf_appends(&b, ".\r\n");
            break;
        case 2:
            buf_appendf(&b, "..two dots %u\r\n", i);
            break;
        default:
            buf_appendf(&b, "plain line %u with some text to make it longer, more text\r\n", i);
            break;
        }
        if (b.len < 65536 && b.len + 60 > 65536) {
            /* Pad so that a line starting with "." begins exactly at the
             * first block boundary. */
            while (b.len < 65536 - 2)
                buf_append(&b, "x", 1);
            buf_appends(&b, "\r\n.boundary\r\n");
        }
    }
    *len = b.len;
    return buf_steal(&b, NULL);
}

/* RFC 5321 section 4.5.2: what the server stores is exactly what was
 * sent, for a 3 MB message streamed in blocks, and a message without a
 * final CRLF gets one. Two transactions run on one connection. */
static void test_exact_delivery_and_reuse(void **state)
{
    struct peer p;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"ok@x.test"};
    static const char no_crlf[] = "Subject: x\r\n\r\n.starts\r\nends without newline";
    char *msg, *got;
    size_t len, glen;
    int total, maxc;

    (void)state;
    peer_py_start(&p, 0, "--pipelining", NULL);
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, 0);

    msg = dotty_message(3 * 1024 * 1024, &len);
    assert_int_equal(memcmp(msg + 65536, ".boundary", 9), 0);
    client_send(&t, "a@y.test", rcpts, 1, msg, len);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    got = read_filef(&glen, "%s/msg-1.eml", p.dir);
    assert_non_null(got);
    assert_int_equal(glen, len);
    assert_memory_equal(got, msg, len);
    free(got);
    free(msg);

    client_send(&t, "", rcpts, 1, no_crlf, sizeof(no_crlf) - 1);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    got = read_filef(&glen, "%s/msg-2.eml", p.dir);
    assert_non_null(got);
    assert_int_equal(glen, sizeof(no_crlf) - 1 + 2);
    assert_memory_equal(got, no_crlf, sizeof(no_crlf) - 1);
    assert_memory_equal(got + glen - 2, "\r\n", 2);
    free(got);
    got = read_filef(NULL, "%s/msg-2.env", p.dir);
    assert_non_null(strstr(got, "from <>\n"));     /* null sender */
    free(got);

    client_quit(&t);
    peer_stats(&p, &total, &maxc);
    assert_int_equal(total, 1);
    peer_stop(&p);
}

/* STARTTLS required (RFC 3207) with certificate verification, then AUTH
 * PLAIN (RFC 4954, RFC 4616) after the second EHLO; a message goes
 * through. With only LOGIN offered, LOGIN is used. */
static void test_starttls_auth(void **state)
{
    struct peer p;
    struct tctx t;
    struct tls_ctx *ctx = verifying_ctx();
    struct smtp_client_opts o = tls_auth_opts(SMTP_CLIENT_TLS_REQUIRED, ctx, "localhost", "s3cret");
    const char *rcpts[] = {"ok@x.test"};

    (void)state;
    peer_py_start(&p, 0, PEER_TLS_AUTH, NULL);
    client_start_ok(&t, p.port, &o);
    assert_true(conn_is_tls(smtp_client_conn(t.c)));
    assert_non_null(conn_tls_peer_cert(smtp_client_conn(t.c)));
    assert_true(smtp_reply_has_keyword(smtp_client_ehlo(t.c), "AUTH", NULL, 0));
    assert_false(smtp_reply_has_keyword(smtp_client_ehlo(t.c), "STARTTLS", NULL, 0));
    send_simple(&t, "a@y.test", rcpts, 1);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    client_quit(&t);
    check_auth_log(&p, "PLAIN user ok\n");
    peer_stop(&p);

    peer_py_start(&p, 0, PEER_TLS_AUTH, "--auth-mechs", "LOGIN", NULL);
    client_start_ok(&t, p.port, &o);
    client_quit(&t);
    check_auth_log(&p, "LOGIN user ok\n");
    peer_stop(&p);
    tls_ctx_unref(ctx);
}

/* Implicit TLS (RFC 8314, port 465 style): the handshake comes before the
 * greeting; AUTH LOGIN when it is the only mechanism. */
static void test_implicit_tls(void **state)
{
    struct peer p;
    struct tctx t;
    struct tls_ctx *ctx = verifying_ctx();
    struct smtp_client_opts o = tls_auth_opts(SMTP_CLIENT_TLS_IMPLICIT, ctx, "127.0.0.1", "s3cret");
    const char *rcpts[] = {"ok@x.test"};

    (void)state;
    peer_py_start(&p, 0, PEER_TLS_AUTH, "--implicit-tls", "--auth-mechs", "LOGIN", NULL);
    client_start_ok(&t, p.port, &o);
    assert_true(conn_is_tls(smtp_client_conn(t.c)));
    send_simple(&t, "a@y.test", rcpts, 1);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    client_quit(&t);
    check_auth_log(&p, "LOGIN user ok\n");
    peer_stop(&p);
    tls_ctx_unref(ctx);
}

/* A wrong password fails the connection with the server's 535 reply; a
 * certificate that does not match the name fails the handshake; AUTH is
 * never attempted without TLS. */
static void test_auth_and_tls_failures(void **state)
{
    struct peer p;
    struct tctx t;
    struct tls_ctx *ctx = verifying_ctx();
    struct smtp_client_opts o = tls_auth_opts(SMTP_CLIENT_TLS_REQUIRED, ctx, "localhost", "wrong");

    (void)state;
    peer_py_start(&p, 0, PEER_TLS_AUTH, NULL);
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, -1);
    assert_int_equal(t.reply_code, 535);
    assert_non_null(strstr(t.err, "AUTH failed: 535 5.7.8"));
    assert_null(strstr(t.err, "wrong"));
    run_until(&t.freed, 10000);
    check_auth_log(&p, "PLAIN user fail\n");

    /* The certificate is for localhost and 127.0.0.1, not this name. */
    o.servername = "mx.example.org";
    o.auth_user = NULL;
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, -1);
    assert_non_null(strstr(t.err, "TLS handshake failed"));
    run_until(&t.freed, 10000);

    /* Plaintext: the server does not even offer AUTH before TLS, and the
     * client refuses to try. */
    o.tls = SMTP_CLIENT_TLS_NONE;
    o.tls_ctx = NULL;
    o.auth_user = "user";
    o.auth_pass = "s3cret";
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, -1);
    assert_string_equal(t.err, "AUTH requires TLS");
    run_until(&t.freed, 10000);
    peer_stop(&p);
    tls_ctx_unref(ctx);
}

/* A server that accepts the connection and never says anything: the
 * greeting timeout ends it. A recipient that takes too long: the RCPT
 * timeout fails the transaction (temporary, not ambiguous). */
static void test_timeouts(void **state)
{
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    struct sockaddr_in sa;
    socklen_t sl = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    uint64_t t0;
    struct peer p;
    const char *rcpts[] = {"ok@x.test", "slow@x.test"};

    (void)state;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(fd, 4), 0);     /* never accepted, never answered */
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    o.greeting_timeout = 1;
    t0 = now_ms();
    client_start(&t, ntohs(sa.sin_port), &o);
    assert_int_equal(t.status, -1);
    assert_string_equal(t.err, "timeout waiting for greeting");
    assert_true(now_ms() - t0 >= 900 && now_ms() - t0 < 3000);
    run_until(&t.freed, 5000);
    close(fd);

    peer_py_start(&p, 0, "--pipelining", "--slow", "4", NULL);
    o = base_opts();
    o.rcpt_timeout = 1;
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, 0);
    t0 = now_ms();
    send_simple(&t, "a@y.test", rcpts, 2);
    assert_true(now_ms() - t0 < 3000);
    check_rcpts(&t, 2, 451, "4.4.2", 0, 0);
    assert_string_equal(t.res[1].text, "timeout waiting for reply to RCPT");
    assert_false(t.conn_ok);
    assert_false(smtp_client_idle(t.c));
    assert_int_equal(smtp_client_send(t.c, NULL, on_tx, &t), -1);
    client_abandon(&t);
    peer_stop(&p);
}

/* ---- client tests: smtp-sink --------------------------------------------------------- */

/* STARTTLS required against a server that does not offer it. */
static void test_starttls_required_not_offered(void **state)
{
    struct peer p;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    char err[256];
    struct tls_ctx *ctx = tls_ctx_client(NULL, 0, NULL, NULL, err, sizeof(err));

    (void)state;
    peer_sink_start(&p, NULL);
    o.tls = SMTP_CLIENT_TLS_REQUIRED;
    o.tls_ctx = ctx;
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, -1);
    assert_string_equal(t.err, "STARTTLS not offered");
    run_until(&t.freed, 5000);

    /* Opportunistic goes on in plaintext. */
    o.tls = SMTP_CLIENT_TLS_OPPORTUNISTIC;
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, 0);
    assert_false(conn_is_tls(smtp_client_conn(t.c)));
    client_quit(&t);
    peer_stop(&p);
    tls_ctx_unref(ctx);
}

/* smtp-sink without PIPELINING (-p): one command at a time, two
 * transactions on one connection, and a command through
 * smtp_client_command(). */
static void test_sink_no_pipelining(void **state)
{
    struct peer p;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test", "b@x.test"};

    (void)state;
    peer_sink_start(&p, "-p", NULL);
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, 0);
    assert_false(smtp_reply_has_keyword(smtp_client_ehlo(t.c), "PIPELINING", NULL, 0));
    send_simple(&t, "s@y.test", rcpts, 2);
    check_rcpts(&t, 2, 250, "2.0.0", 1, 0);
    send_simple(&t, "s@y.test", rcpts, 1);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    assert_int_equal(smtp_client_command(t.c, "NOOP", on_cmd, &t), 0);
    assert_int_equal(smtp_client_command(t.c, "NOOP", on_cmd, &t), -1);   /* busy */
    run_until(&t.cmd_done, 5000);
    assert_int_equal(t.cmd_status, 0);
    assert_int_equal(t.cmd_code, 250);
    assert_true(smtp_client_idle(t.c));
    client_quit(&t);
    peer_stop(&p);
}

/* MAIL refused (-f MAIL): every recipient gets the refusal, the client
 * sends RSET and stays usable. RCPT refused with 4xx (-r RCPT): nothing is
 * sent after the RCPTs but RSET. */
static void test_sink_refusals(void **state)
{
    struct peer p;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test", "b@x.test"};

    (void)state;
    peer_sink_start(&p, "-f", "MAIL", NULL);
    client_start(&t, p.port, &o);
    send_simple(&t, "s@y.test", rcpts, 2);
    check_rcpts(&t, 2, 500, "5.3.0", 1, 0);
    assert_true(t.conn_ok);
    assert_true(smtp_client_idle(t.c));
    client_quit(&t);
    peer_stop(&p);

    peer_sink_start(&p, "-r", "RCPT", NULL);
    client_start(&t, p.port, &o);
    send_simple(&t, "s@y.test", rcpts, 2);
    check_rcpts(&t, 2, 450, "4.3.0", 0, 0);
    assert_true(t.conn_ok);
    send_simple(&t, "s@y.test", rcpts, 1);
    check_rcpt(&t.res[0], 450, "4.3.0", 0, 0);
    client_quit(&t);
    peer_stop(&p);
}

/* The server drops the connection after the final "." without a reply
 * (-q .): the message may have been taken, so the result is temporary and
 * ambiguous. A 554 greeting fails the connection with that reply. */
static void test_sink_disconnects(void **state)
{
    struct peer p;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test", "b@x.test"};

    (void)state;
    peer_sink_start(&p, "-q", ".", NULL);
    client_start(&t, p.port, &o);
    send_simple(&t, "s@y.test", rcpts, 2);
    check_rcpts(&t, 2, 451, "4.4.2", 0, 1);
    assert_false(t.conn_ok);
    client_abandon(&t);
    peer_stop(&p);

    peer_sink_start(&p, "-f", "CONNECT", NULL);
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, -1);
    assert_true(t.reply_code / 100 == 5);
    assert_non_null(strstr(t.err, "greeting: 5"));
    run_until(&t.freed, 5000);
    peer_stop(&p);

    /* No ESMTP (-e): EHLO is refused, HELO works. */
    peer_sink_start(&p, "-e", NULL);
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, 0);
    send_simple(&t, "s@y.test", rcpts, 1);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    client_quit(&t);
    peer_stop(&p);
}

/* Backpressure: the server stops reading after DATA (-H) with a small
 * window (-T). The client hands the content over block by block and waits
 * for each to drain, so it is still sending (not waiting after ".") when
 * the block timeout fires: a temporary failure, not an ambiguous one. */
static void test_sink_backpressure(void **state)
{
    struct peer p;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test"};
    size_t len = 24 * 1024 * 1024, i;
    char *msg = malloc(len);
    uint64_t t0;

    (void)state;
    assert_non_null(msg);
    for (i = 0; i < len; i++)
        msg[i] = (i % 80 == 78) ? '\r' : (i % 80 == 79) ? '\n' : 'a';
    peer_sink_start(&p, "-H", "6", "-T", "8192", NULL);
    o.block_timeout = 1;
    client_start(&t, p.port, &o);
    assert_int_equal(t.status, 0);
    t0 = now_ms();
    client_send(&t, "s@y.test", rcpts, 1, msg, len);
    assert_true(now_ms() - t0 < 4000);
    check_rcpt(&t.res[0], 451, "4.4.2", 0, 0);
    assert_string_equal(t.res[0].text, "timeout while sending message content");
    assert_false(t.conn_ok);
    client_abandon(&t);
    free(msg);
    peer_stop(&p);
}

/* ---- client tests: scripted transcripts ------------------------------------------------ */

/* The exact transcript of a pipelined transaction: MAIL, RCPTs and DATA
 * arrive before any reply is sent (otherwise the script would wait
 * forever), the content is dot-stuffed, and QUIT ends it. */
static void test_script_pipelining_transcript(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_PIPE,
        "C:MAIL FROM:<s@y.test> SIZE=27",
        "C:RCPT TO:<a@x.test>",
        "C:RCPT TO:<b@x.test>",
        "C:RCPT TO:<c@x.test>",
        "C:DATA",
        "S:250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 Unknown\r\n250 2.1.5 Ok\r\n354 Go",
        "D",
        "S:250 2.0.0 Queued",
        "C:QUIT",
        "S:221 2.0.0 Bye",
        "X",
    };
    static const char msg[] = "A: b\r\n\r\n.x\r\n..\r\n.\r\nlast .\r\n";
    struct script s;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test", "b@x.test", "c@x.test"};

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port, &o);
    assert_int_equal(t.status, 0);
    client_send(&t, "s@y.test", rcpts, 3, msg, sizeof(msg) - 1);
    check_rcpt(&t.res[0], 250, "2.0.0", 1, 0);
    check_rcpt(&t.res[1], 550, "5.1.1", 1, 0);
    check_rcpt(&t.res[2], 250, "2.0.0", 1, 0);
    assert_string_equal(t.res[0].text, "Queued");
    assert_string_equal(s.data.data, "A: b\r\n\r\n..x\r\n...\r\n..\r\nlast .\r\n");
    client_quit(&t);
    script_finish(&s);
}

/* RFC 2920 section 3.1: every RCPT refused, but the server answers DATA
 * with 354 anyway: the client sends an empty message ("." alone), ignores
 * its reply, and sends RSET. Then a 421 in the middle of the next group
 * closes the session: the recipient refused before keeps its answer, the
 * rest get the 421. */
static void test_script_354_without_rcpt_and_421(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_PIPE,
        "C:MAIL FROM:<s@y.test> SIZE=25",
        "C:RCPT TO:<a@x.test>",
        "C:DATA",
        "S:250 Ok\r\n550 5.1.1 No\r\n354 Go ahead anyway",
        "C:.",
        "S:554 5.5.1 No valid recipients",
        "C:RSET",
        "S:250 2.0.0 Ok",
        "C:MAIL FROM:<s@y.test> SIZE=25",
        "C:RCPT TO:<a@x.test>",
        "C:RCPT TO:<b@x.test>",
        "C:DATA",
        "S:250 Ok\r\n550 5.1.1 No\r\n421 4.7.0 Too busy, closing",
        "X",
    };
    struct script s;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test", "b@x.test"};

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port, &o);
    send_simple(&t, "s@y.test", rcpts, 1);
    check_rcpt(&t.res[0], 550, "5.1.1", 1, 0);
    assert_true(t.conn_ok);
    assert_true(smtp_client_idle(t.c));
    send_simple(&t, "s@y.test", rcpts, 2);
    check_rcpt(&t.res[0], 550, "5.1.1", 1, 0);
    check_rcpt(&t.res[1], 421, "4.7.0", 0, 0);
    assert_false(t.conn_ok);
    client_abandon(&t);
    script_finish(&s);
}

/* Silence after the final ".": the end-of-data timeout makes the accepted
 * recipients ambiguous; the refused one keeps its 5xx. */
static void test_script_dot_timeout(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_PIPE,
        "C:MAIL FROM:<s@y.test> SIZE=25",
        "C:RCPT TO:<a@x.test>",
        "C:RCPT TO:<b@x.test>",
        "C:DATA",
        "S:250 Ok\r\n250 Ok\r\n550 5.1.1 No\r\n354 Go",
        "D",
        "H",
    };
    struct script s;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test", "b@x.test"};
    uint64_t t0;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    o.dot_timeout = 1;
    client_start(&t, s.port, &o);
    t0 = now_ms();
    send_simple(&t, "s@y.test", rcpts, 2);
    assert_true(now_ms() - t0 < 3000);
    check_rcpt(&t.res[0], 451, "4.4.2", 0, 1);
    check_rcpt(&t.res[1], 550, "5.1.1", 1, 0);
    assert_non_null(strstr(t.res[0].text, "timeout waiting for reply to end of data"));
    assert_false(t.conn_ok);
    client_abandon(&t);
    script_finish(&s);
}

/* A message that needs SMTPUTF8 or 8BITMIME the server lacks fails
 * permanently without a word to the server (RFC 6531 section 3.5, RFC
 * 3463 5.6.3); an address holding CRLF is never written. The session
 * stays usable. */
static void test_script_local_refusals(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        "S:250-script.test\r\n250 PIPELINING",
        "C:QUIT",
        "S:221 Bye",
        "X",
    };
    struct script s;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test"};
    const char *bad[] = {"a@x.test>\r\nRSET"};
    struct transport_msg m;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port, &o);
    msg_init(&m, "s@y.test", rcpts, 1, simple_msg, sizeof(simple_msg) - 1);
    m.smtputf8 = 1;
    client_send_msg(&t, &m, 5000);
    check_rcpt(&t.res[0], 553, "5.6.7", 1, 0);
    assert_true(t.conn_ok);

    m.smtputf8 = 0;
    m.body8bit = 1;
    client_send_msg(&t, &m, 5000);
    check_rcpt(&t.res[0], 554, "5.6.3", 1, 0);

    m.body8bit = 0;
    m.rcpts = bad;
    client_send_msg(&t, &m, 5000);
    check_rcpt(&t.res[0], 553, "5.1.3", 1, 0);
    assert_true(smtp_client_idle(t.c));
    client_quit(&t);
    script_finish(&s);
}

/* Closing a client in the middle of a transaction completes it with an
 * error from the loop (never from inside smtp_client_close()). */
static void test_close_pending(void **state)
{
    static const char *const steps[] = {
        "S:220 script.test ESMTP",
        "C:EHLO client.test",
        EHLO_PIPE,
        "C:MAIL FROM:<s@y.test> SIZE=25",
        "C:RCPT TO:<a@x.test>",
        "C:DATA",
        "H",
    };
    struct script s;
    struct tctx t;
    struct smtp_client_opts o = base_opts();
    const char *rcpts[] = {"a@x.test"};
    struct transport_msg m;

    (void)state;
    script_start(&s, steps, NSTEPS(steps));
    client_start(&t, s.port, &o);
    msg_init(&m, "s@y.test", rcpts, 1, simple_msg, sizeof(simple_msg) - 1);
    assert_int_equal(smtp_client_send(t.c, &m, on_tx, &t), 0);
    run_until(&s.done, 5000);
    smtp_client_close(t.c);
    assert_int_equal(t.tx_done, 0);
    run_until(&t.tx_done, 5000);
    check_rcpt(&t.res[0], 451, "4.4.2", 0, 0);
    assert_false(t.conn_ok);
    run_until(&t.freed, 5000);
    script_finish(&s);
}

/* ---- the smtp transport ----------------------------------------------------------- */

struct tdone {
    int n;
    int order[32];
    struct transport_rcpt_result res[32];
    int tfail[32];
    char remote[32][128];
    int closed;
    int closed_after;          /* done callbacks seen when closed ran */
};

struct tsend {
    struct tdone *d;
    int idx;
};

static void on_done(const struct transport_result *res, void *arg)
{
    struct tsend *s = arg;
    struct tdone *d = s->d;

    assert_true(d->n < 32);
    assert_int_equal(res->nrcpts, 1);
    d->order[d->n] = s->idx;
    d->res[s->idx] = res->rcpt[0];
    d->tfail[s->idx] = res->transport_failure;
    snprintf(d->remote[s->idx], sizeof(d->remote[0]), "%s", res->remote);
    d->n++;
}

static void on_closed(void *arg)
{
    struct tdone *d = arg;

    d->closed = 1;
    d->closed_after = d->n;
}

#define KV(k, v) {(char *)"route", (char *)"out", (char *)(k), (char *)(v)}

static struct transport *tr_create(const struct config_named *kv, size_t n)
{
    const struct transport_ops *ops = transport_find("smtp");
    char err[512];
    struct transport *tr;

    assert_non_null(ops);
    tr = ops->create(&loop, "out", kv, n, err, sizeof(err));
    if (tr == NULL)
        fail_msg("create: %s", err);
    return tr;
}

static void tr_send(struct transport *tr, struct tsend *s, const char *from, const char *rcpt)
{
    struct transport_msg m;
    const char *rcpts[1] = {rcpt};

    /* send() copies rcpts. */
    msg_init(&m, from, rcpts, 1, simple_msg, sizeof(simple_msg) - 1);
    m.id = "Q";
    transport_find("smtp")->send(tr, &m, on_done, s);
}

static void tr_close(struct transport *tr, struct tdone *d)
{
    transport_find("smtp")->close(tr, on_closed, d);
    run_until(&d->closed, 15000);
}

static void test_transport_config(void **state)
{
    static const struct {
        struct config_named kv[4];
        size_t n;
        const char *want;        /* substring of the error, NULL for success */
    } cases[] = {
        {{KV("host", "127.0.0.1:2525")}, 1, NULL},
        {{KV("host", "[::1]:2525"), KV("tls", "none")}, 2, NULL},
        {{KV("host", "mx.example.org"), KV("tls", "required"), KV("tls_verify", "no")}, 3, NULL},
        {{KV("host", "h"), KV("colour", "blue")}, 2, "colour: unknown key for the smtp transport"},
        {{KV("tls", "none")}, 1, "host: required"},
        {{KV("host", "::1")}, 1, "host: an IPv6 address needs brackets"},
        {{KV("host", "h:0")}, 1, "host: port must be an integer between 1 and 65535"},
        {{KV("host", "h:25x")}, 1, "host: port"},
        {{KV("host", "[::1")}, 1, "host: must be host"},
        {{KV("host", "h"), KV("tls", "maybe")}, 2, "tls: must be none, opportunistic"},
        {{KV("host", "h"), KV("max_connections", "0")}, 2, "max_connections: must be"},
        {{KV("host", "h"), KV("host", "g")}, 2, "host: set twice"},
        {{KV("host", "h"), KV("auth_user", "u")}, 2,
         "auth_user: needs auth_password_env or auth_password_file"},
        {{KV("host", "h"), KV("auth_password_env", "X")}, 2, "auth_password_env: needs auth_user"},
        {{KV("host", "h"), KV("tls", "none"), KV("auth_user", "u"),
          KV("auth_password_env", "MF_TEST_SMTP_PW")}, 4, "auth_user: AUTH requires TLS"},
        {{KV("host", "h"), KV("auth_user", "u"), KV("auth_password_env", "MF_TEST_NOPE")}, 3,
         "auth_password_env: environment variable MF_TEST_NOPE is not set"},
        {{KV("host", "h"), KV("auth_user", "u"), KV("auth_password_file", "/nonexistent/pw")}, 3,
         "auth_password_file: cannot open /nonexistent/pw"},
        {{KV("host", "h"), KV("client_key", "/x.pem")}, 2, "client_key: needs client_cert"},
        {{KV("host", "h"), KV("ca_file", "/nonexistent/ca.pem")}, 2, "ca_file:"},
        {{KV("host", "h"), KV("source_address", "nowhere")}, 2, "source_address: must be"},
    };
    const struct transport_ops *ops = transport_find("smtp");
    size_t i;

    (void)state;
    assert_non_null(ops);
    assert_string_equal(ops->name, "smtp");
    assert_null(transport_find("carrier-pigeon"));
    setenv("MF_TEST_SMTP_PW", "pw", 1);
    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char err[512] = "";
        struct transport *tr = ops->create(&loop, "out", cases[i].kv, cases[i].n, err,
                                           sizeof(err));

        if (cases[i].want == NULL) {
            struct tdone d;
            char why[256];

            if (tr == NULL)
                fail_msg("case %zu: %s", i, err);
            assert_int_equal(ops->health(tr, why, sizeof(why)), 1);
            memset(&d, 0, sizeof(d));
            tr_close(tr, &d);
        } else {
            if (tr != NULL)
                fail_msg("case %zu: created, want error \"%s\"", i, cases[i].want);
            if (strstr(err, cases[i].want) == NULL)
                fail_msg("case %zu: error \"%s\", want \"%s\"", i, err, cases[i].want);
        }
    }
}

/* Waits until at least n done callbacks have run. */
static void wait_done(struct tdone *d, int n, unsigned max_ms)
{
    uint64_t t0 = now_ms();

    while (d->n < n) {
        if (now_ms() - t0 > max_ms)
            fail_msg("%d of %d sends done after %u ms", d->n, n, max_ms);
        run_for(20);
    }
}

/* Pool: with max_connections 2, ten messages use two connections, never
 * more at once, and every one is delivered. */
static void test_transport_pool_cap(void **state)
{
    struct peer p;
    char hostport[64];
    struct tdone d;
    struct tsend s[10];
    struct transport *tr;
    int i, total, maxc;

    (void)state;
    peer_py_start(&p, 0, "--pipelining", "--slow", "0.2", NULL);
    snprintf(hostport, sizeof(hostport), "127.0.0.1:%d", p.port);
    {
        const struct config_named kv[] = {KV("host", hostport), KV("tls", "none"),
                                          KV("max_connections", "2"), KV("helo", "me.test")};

        tr = tr_create(kv, 4);
    }
    memset(&d, 0, sizeof(d));
    for (i = 0; i < 10; i++) {
        s[i].d = &d;
        s[i].idx = i;
        tr_send(tr, &s[i], "s@y.test", "slow@x.test");
    }
    assert_int_equal(d.n, 0);
    wait_done(&d, 10, 20000);
    for (i = 0; i < 10; i++) {
        check_rcpt(&d.res[i], 250, "2.0.0", 1, 0);
        assert_int_equal(d.tfail[i], 0);
        assert_non_null(strstr(d.remote[i], hostport));
    }
    peer_stats(&p, &total, &maxc);
    assert_int_equal(maxc, 2);
    assert_int_equal(total, 2);
    tr_close(tr, &d);
    assert_int_equal(d.closed_after, 10);
    peer_stats(&p, &total, &maxc);
    assert_int_equal(maxc, 2);
    peer_stop(&p);
}

/* With one connection, queued sends are served in the order they came,
 * on the same connection (max_messages_per_connection permitting). */
static void test_transport_fifo(void **state)
{
    struct peer p;
    char hostport[64];
    struct tdone d;
    struct tsend s[5];
    struct transport *tr;
    int i, total, maxc;
    char from[5][32];

    (void)state;
    peer_py_start(&p, 0, NULL);
    snprintf(hostport, sizeof(hostport), "127.0.0.1:%d", p.port);
    {
        const struct config_named kv[] = {KV("host", hostport), KV("tls", "opportunistic"),
                                          KV("max_connections", "1"),
                                          KV("max_messages_per_connection", "3")};

        tr = tr_create(kv, 4);
    }
    memset(&d, 0, sizeof(d));
    for (i = 0; i < 5; i++) {
        s[i].d = &d;
        s[i].idx = i;
        snprintf(from[i], sizeof(from[i]), "s%d@y.test", i + 1);
        tr_send(tr, &s[i], from[i], "ok@x.test");
    }
    wait_done(&d, 5, 20000);
    for (i = 0; i < 5; i++) {
        char *env = read_filef(NULL, "%s/msg-%d.env", p.dir, i + 1);
        char want[64];

        assert_int_equal(d.order[i], i);
        check_rcpt(&d.res[i], 250, "2.0.0", 1, 0);
        assert_non_null(env);
        snprintf(want, sizeof(want), "from s%d@y.test\n", i + 1);
        assert_memory_equal(env, want, strlen(want));
        free(env);
    }
    tr_close(tr, &d);
    peer_stats(&p, &total, &maxc);
    assert_int_equal(maxc, 1);
    assert_int_equal(total, 2);         /* 3 messages, then a new connection */
    peer_stop(&p);
}

/* Nothing listens: temporary results marked as the transport's failure
 * (4.4.1, "connection refused"); after unhealthy_after failures in a row
 * health() says why; a working server makes it healthy again. */
static void test_transport_connect_refused(void **state)
{
    const struct transport_ops *ops = transport_find("smtp");
    int port = free_port();
    char hostport[64], why[512];
    struct tdone d;
    struct tsend s[3];
    struct transport *tr;
    struct peer p;

    (void)state;
    snprintf(hostport, sizeof(hostport), "127.0.0.1:%d", port);
    {
        const struct config_named kv[] = {KV("host", hostport), KV("tls", "none"),
                                          KV("unhealthy_after", "2")};

        tr = tr_create(kv, 3);
    }
    memset(&d, 0, sizeof(d));
    s[0].d = s[1].d = s[2].d = &d;
    s[0].idx = 0;
    s[1].idx = 1;
    s[2].idx = 2;
    tr_send(tr, &s[0], "s@y.test", "a@x.test");
    wait_done(&d, 1, 10000);
    check_rcpt(&d.res[0], 451, "4.4.1", 0, 0);
    assert_int_equal(d.tfail[0], 1);
    assert_non_null(strstr(d.res[0].text, "connection refused"));
    assert_int_equal(ops->health(tr, why, sizeof(why)), 1);

    tr_send(tr, &s[1], "s@y.test", "a@x.test");
    wait_done(&d, 2, 10000);
    assert_int_equal(d.tfail[1], 1);
    assert_int_equal(ops->health(tr, why, sizeof(why)), 0);
    assert_non_null(strstr(why, "2 consecutive connection failures"));
    assert_non_null(strstr(why, "connection refused"));

    peer_py_start(&p, port, NULL);
    tr_send(tr, &s[2], "s@y.test", "a@x.test");
    wait_done(&d, 3, 10000);
    check_rcpt(&d.res[2], 250, "2.0.0", 1, 0);
    assert_int_equal(d.tfail[2], 0);
    assert_int_equal(ops->health(tr, why, sizeof(why)), 1);
    tr_close(tr, &d);
    peer_stop(&p);
}

/* STARTTLS + AUTH through the transport, the password from a file; then
 * a wrong password from the environment is the transport's failure with
 * the server's 535 in the text. */
static void test_transport_tls_auth(void **state)
{
    struct peer p;
    char hostport[64], pwfile[128];
    struct tdone d;
    struct tsend s[3];
    struct transport *tr;
    FILE *f;

    (void)state;
    peer_py_start(&p, 0, PEER_TLS_AUTH, NULL);
    snprintf(hostport, sizeof(hostport), "localhost:%d", p.port);
    snprintf(pwfile, sizeof(pwfile), "%s/pw", p.dir);
    f = fopen(pwfile, "w");
    assert_non_null(f);
    fputs("s3cret\n", f);
    fclose(f);
    memset(&d, 0, sizeof(d));
    s[0].d = s[1].d = &d;
    s[0].idx = 0;
    s[1].idx = 1;
    {
        const struct config_named kv[] = {KV("host", hostport), KV("tls", "required"),
                                          KV("ca_file", cert_file), KV("auth_user", "user"),
                                          KV("auth_password_file", pwfile)};

        tr = tr_create(kv, 5);
    }
    tr_send(tr, &s[0], "s@y.test", "ok@x.test");
    wait_done(&d, 1, 15000);
    check_rcpt(&d.res[0], 250, "2.0.0", 1, 0);
    tr_close(tr, &d);

    setenv("MF_TEST_SMTP_PW", "wrong", 1);
    d.closed = 0;
    {
        const struct config_named kv[] = {KV("host", hostport), KV("tls", "required"),
                                          KV("ca_file", cert_file), KV("auth_user", "user"),
                                          KV("auth_password_env", "MF_TEST_SMTP_PW")};

        tr = tr_create(kv, 5);
    }
    tr_send(tr, &s[1], "s@y.test", "ok@x.test");
    wait_done(&d, 2, 15000);
    check_rcpt(&d.res[1], 451, "4.7.8", 0, 0);
    assert_int_equal(d.tfail[1], 1);
    assert_non_null(strstr(d.res[1].text, "535"));
    assert_null(strstr(d.res[1].text, "wrong"));
    tr_close(tr, &d);

    /* Opportunistic TLS whose handshake fails (the certificate does not
     * match the name asked for) falls back to plaintext. */
    d.closed = 0;
    {
        const struct config_named kv[] = {KV("host", hostport), KV("tls", "opportunistic"),
                                          KV("ca_file", cert_file), KV("tls_verify", "yes"),
                                          KV("servername", "mx.example.org")};

        tr = tr_create(kv, 5);
    }
    s[0].idx = 2;
    tr_send(tr, &s[0], "s@y.test", "ok@x.test");
    wait_done(&d, 3, 15000);
    check_rcpt(&d.res[2], 250, "2.0.0", 1, 0);
    tr_close(tr, &d);
    peer_stop(&p);
}

/* close() while one send runs and two wait: the waiting ones fail at once
 * ("shutting down", temporary), the running one completes, then closed
 * is called, after every done callback. */
static void test_transport_close_pending(void **state)
{
    struct peer p;
    char hostport[64];
    struct tdone d;
    struct tsend s[3];
    struct transport *tr;
    int i;

    (void)state;
    peer_py_start(&p, 0, "--slow", "1", NULL);
    snprintf(hostport, sizeof(hostport), "127.0.0.1:%d", p.port);
    {
        const struct config_named kv[] = {KV("host", hostport), KV("tls", "none"),
                                          KV("max_connections", "1")};

        tr = tr_create(kv, 3);
    }
    memset(&d, 0, sizeof(d));
    for (i = 0; i < 3; i++) {
        s[i].d = &d;
        s[i].idx = i;
        tr_send(tr, &s[i], "s@y.test", "slow@x.test");
    }
    run_for(400);
    assert_int_equal(d.n, 0);
    transport_find("smtp")->close(tr, on_closed, &d);
    assert_int_equal(d.n, 0);         /* never from inside close() */
    run_until(&d.closed, 15000);
    assert_int_equal(d.closed_after, 3);
    assert_int_equal(d.order[0], 1);
    assert_int_equal(d.order[1], 2);
    assert_int_equal(d.order[2], 0);
    check_rcpt(&d.res[1], 451, "4.3.2", 0, 0);
    check_rcpt(&d.res[2], 451, "4.3.2", 0, 0);
    check_rcpt(&d.res[0], 250, "2.0.0", 1, 0);
    peer_stop(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_pipelined_mixed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_exact_delivery_and_reuse, setup, teardown),
        cmocka_unit_test_setup_teardown(test_starttls_auth, setup, teardown),
        cmocka_unit_test_setup_teardown(test_implicit_tls, setup, teardown),
        cmocka_unit_test_setup_teardown(test_auth_and_tls_failures, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeouts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_starttls_required_not_offered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sink_no_pipelining, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sink_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sink_disconnects, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sink_backpressure, setup, teardown),
        cmocka_unit_test_setup_teardown(test_script_pipelining_transcript, setup, teardown),
        cmocka_unit_test_setup_teardown(test_script_354_without_rcpt_and_421, setup, teardown),
        cmocka_unit_test_setup_teardown(test_script_dot_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_script_local_refusals, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_pending, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transport_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transport_pool_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transport_fifo, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transport_connect_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transport_tls_auth, setup, teardown),
        cmocka_unit_test_setup_teardown(test_transport_close_pending, setup, teardown),
    };

    /* MF_TEST_FILTER=test_name (shell pattern) runs a subset. */
    if (getenv("MF_TEST_FILTER") != NULL)
        cmocka_set_test_filter(getenv("MF_TEST_FILTER"));
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
