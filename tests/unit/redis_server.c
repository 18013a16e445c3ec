/*
 * Shared fixture for the unit tests that run against a real redis-server:
 * see redis_server.h for the contract.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/unit/redis_server.h"

/* ---- redis-server management ------------------------------------------------------ */

int redis_server_setup(struct redis_server *s, const char *tag)
{
    memset(s, 0, sizeof(*s));
    snprintf(s->dir, sizeof(s->dir), "/tmp/mf-test-%s.XXXXXX", tag);
    if (mkdtemp(s->dir) == NULL)
        return -1;
    s->port = redis_server_free_port();
    s->pid = redis_server_start(s->dir, s->port, NULL);
    return 0;
}

void redis_server_teardown(struct redis_server *s)
{
    char path[128];

    capture_abandon();
    snprintf(path, sizeof(path), "%s/stderr.log", s->dir);
    unlink(path);
    redis_server_stop(s->pid);
    s->pid = 0;
    rmdir(s->dir);
}

int redis_server_free_port(void)
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

int redis_server_answers(int port)
{
    struct timeval tv = {0, 200000};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    redisReply *r;
    int ok = 0;

    if (c == NULL)
        return 0;
    if (c->err == 0) {
        redisSetTimeout(c, tv);
        r = redisCommand(c, "PING");
        ok = r != NULL;
        if (r)
            freeReplyObject(r);
    }
    redisFree(c);
    return ok;
}

pid_t redis_server_start(const char *dir, int port, const char *const *extra)
{
    char portstr[16];
    const char *argv[32];
    int n = 0;
    pid_t pid;

    snprintf(portstr, sizeof(portstr), "%d", port);
    argv[n++] = "redis-server";
    argv[n++] = "--port";
    argv[n++] = portstr;
    argv[n++] = "--bind";
    argv[n++] = "127.0.0.1";
    argv[n++] = "--save";
    argv[n++] = "";
    argv[n++] = "--appendonly";
    argv[n++] = "no";
    argv[n++] = "--dir";
    argv[n++] = dir;
    argv[n++] = "--daemonize";
    argv[n++] = "no";
    argv[n++] = "--loglevel";
    argv[n++] = "warning";
    for (int i = 0; extra && extra[i]; i++) {
        assert_true(n < (int)(sizeof(argv) / sizeof(argv[0])) - 1);
        argv[n++] = extra[i];
    }
    argv[n] = NULL;

    pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    for (int i = 0; i < 200; i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            fail_msg("redis-server exited at start (status %d)", st);
        if (redis_server_answers(port))
            return pid;
        usleep(50000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    fail_msg("redis-server did not answer on port %d", port);
    return -1;
}

void redis_server_stop(pid_t pid)
{
    if (pid <= 0)
        return;
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

redisContext *redis_server_connect(int port, const char *password, int db)
{
    redisContext *c = redisConnect("127.0.0.1", port);
    redisReply *r;

    assert_non_null(c);
    assert_int_equal(c->err, 0);
    if (password) {
        r = redisCommand(c, "AUTH %s", password);
        assert_non_null(r);
        assert_int_equal(r->type, REDIS_REPLY_STATUS);
        freeReplyObject(r);
    }
    r = redisCommand(c, "SELECT %d", db);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    freeReplyObject(r);
    return c;
}

/* ---- loop helpers ----------------------------------------------------------------- */

static void deadline_cb(uv_timer_t *t)
{
    *(int *)t->data = 1;
}

int run_until(uv_loop_t *loop, int (*cond)(void *), void *arg, unsigned ms)
{
    uv_timer_t deadline;
    int expired = 0;
    int ok;

    uv_timer_init(loop, &deadline);
    deadline.data = &expired;
    uv_timer_start(&deadline, deadline_cb, ms, 0);
    while (!cond(arg) && !expired)
        uv_run(loop, UV_RUN_ONCE);
    ok = cond(arg);
    uv_close((uv_handle_t *)&deadline, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return ok;
}

static int cond_never(void *arg)
{
    (void)arg;
    return 0;
}

void run_for(uv_loop_t *loop, unsigned ms)
{
    run_until(loop, cond_never, NULL, ms);
}

/* ---- stderr capture --------------------------------------------------------------- */

/* The saved stderr of an active capture, for capture_abandon(). */
static int capture_saved_fd = -1;

void capture_abandon(void)
{
    if (capture_saved_fd < 0)
        return;
    fflush(stderr);
    dup2(capture_saved_fd, 2);
    close(capture_saved_fd);
    capture_saved_fd = -1;
}

void capture_start(struct capture *c, const char *dir)
{
    int fd;

    snprintf(c->path, sizeof(c->path), "%s/stderr.log", dir);
    fd = open(c->path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(fd >= 0);
    fflush(stderr);
    c->saved = dup(2);
    capture_saved_fd = c->saved;
    dup2(fd, 2);
    close(fd);
}

char *capture_stop(struct capture *c)
{
    FILE *fp;
    char *text;
    long n;

    fflush(stderr);
    dup2(c->saved, 2);
    close(c->saved);
    capture_saved_fd = -1;
    fp = fopen(c->path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    text = calloc(1, (size_t)n + 1);
    assert_non_null(text);
    assert_int_equal(fread(text, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    unlink(c->path);
    fputs(text, stderr);
    return text;
}

int count_substr(const char *text, const char *needle)
{
    int n = 0;

    for (const char *p = text; (p = strstr(p, needle)) != NULL; p++)
        n++;
    return n;
}
