/*
 * idle_conns: opens many TCP connections to an SMTP server, reads the 220
 * greeting on each (RFC 5321 section 4.2: the greeting may span several
 * "220-" lines and ends with a "220 " line) and then holds them open without
 * sending anything, so that the caller can measure the server's memory per
 * idle connection.
 *
 * Usage: idle_conns [-n COUNT] [-p INFLIGHT] [-t SECONDS] [-b SRC,SRC,...]
 *                   HOST PORT
 *
 *   -n  connections to open (default 10000)
 *   -p  connections allowed between connect() and the end of the greeting
 *       at once (default 256), so the server's accept backlog never
 *       overflows
 *   -t  seconds allowed for the whole connect phase (default 120)
 *   -b  IPv4 source addresses used round robin (e.g. 127.0.0.2,127.0.0.3),
 *       for when one address runs out of ephemeral ports
 *
 * Protocol with the caller, on stdout, one line each:
 *   "ready opened=N greeted=G failed=F seconds=S"  after the connect phase;
 * then the program waits for a line (or end of file) on stdin, checks every
 * greeted connection without blocking and prints
 *   "alive=A closed=C data=D"
 * (closed: the server closed it; data: the server sent more bytes, such as a
 * 421 before closing) and exits, closing everything. Exit status 0 when
 * every connection was greeted, 1 otherwise, 2 on a usage error.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum conn_state { CONN_UNUSED = 0, CONN_CONNECTING, CONN_GREETING, CONN_IDLE, CONN_FAILED };

/* One connection. The greeting is matched line by line: only the first
 * four bytes of each line and the line end matter, so that is all we keep. */
struct conn {
    int fd;
    enum conn_state state;
    char head[4];       /* first bytes of the current line */
    unsigned headlen;   /* bytes of head[] filled (at most 4) */
};

static double now_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_long(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: idle_conns [-n COUNT] [-p INFLIGHT] [-t SECONDS] "
                    "[-b SRC,SRC,...] HOST PORT\n");
    exit(2);
}

/*
 * Feeds received bytes to the greeting matcher. Returns 1 when the last
 * greeting line ("220 ...\n") is complete, 0 when more is needed and -1
 * when a line does not start with "220".
 */
static int greeting_feed(struct conn *c, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\n') {
            if (c->headlen < 4 || memcmp(c->head, "220", 3) != 0)
                return -1;
            if (c->head[3] == ' ')
                return 1;
            if (c->head[3] != '-')
                return -1;
            c->headlen = 0;
            continue;
        }
        if (c->headlen < 4)
            c->head[c->headlen++] = p[i];
    }
    return 0;
}

/* Starts a non-blocking connect. Returns 0 when in progress or done, -1 on
 * an immediate failure (errno set). */
static int conn_start(struct conn *c, int ep, const struct sockaddr_in *dst,
                      const struct sockaddr_in *src)
{
    struct epoll_event ev;
    int fd;

    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (src != NULL && bind(fd, (const struct sockaddr *)src, sizeof(*src)) < 0) {
        close(fd);
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)dst, sizeof(*dst)) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->state = CONN_CONNECTING;
    c->headlen = 0;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
    ev.data.ptr = c;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        close(fd);
        c->fd = -1;
        return -1;
    }
    return 0;
}

/* Stops watching a connection; keeps it open when it is idle. */
static void conn_park(struct conn *c, int ep, enum conn_state st)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    c->state = st;
    if (st == CONN_FAILED) {
        close(c->fd);
        c->fd = -1;
    }
}

/* Handles readiness on a connection in CONNECTING or GREETING state.
 * Returns 1 when it left the in-flight set (idle or failed), else 0. */
static int conn_event(struct conn *c, int ep, uint32_t events)
{
    char buf[4096];

    if (c->state == CONN_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof(err);

        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
            conn_park(c, ep, CONN_FAILED);
            return 1;
        }
        if ((events & (EPOLLOUT | EPOLLIN)) == 0) {
            conn_park(c, ep, CONN_FAILED);
            return 1;
        }
        struct epoll_event ev;
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.ptr = c;
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->state = CONN_GREETING;
    }
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof(buf), 0);

        if (n > 0) {
            int r = greeting_feed(c, buf, (size_t)n);
            if (r != 0) {
                conn_park(c, ep, r > 0 ? CONN_IDLE : CONN_FAILED);
                return 1;
            }
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n < 0 && errno == EINTR)
            continue;
        conn_park(c, ep, CONN_FAILED);
        return 1;
    }
    if (events & (EPOLLHUP | EPOLLERR)) {
        conn_park(c, ep, CONN_FAILED);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    long count = 10000, inflight_max = 256, limit_s = 120, port;
    struct sockaddr_in dst, *srcs = NULL;
    size_t nsrcs = 0;
    int opt;

    while ((opt = getopt(argc, argv, "n:p:t:b:")) != -1) {
        switch (opt) {
        case 'n':
            if (parse_long(optarg, 1, 1000000, &count) < 0)
                usage();
            break;
        case 'p':
            if (parse_long(optarg, 1, 100000, &inflight_max) < 0)
                usage();
            break;
        case 't':
            if (parse_long(optarg, 1, 86400, &limit_s) < 0)
                usage();
            break;
        case 'b': {
            char *list = strdup(optarg), *save = NULL;
            if (list == NULL)
                abort();
            for (char *tok = strtok_r(list, ",", &save); tok != NULL;
                 tok = strtok_r(NULL, ",", &save)) {
                srcs = realloc(srcs, (nsrcs + 1) * sizeof(*srcs));
                if (srcs == NULL)
                    abort();
                memset(&srcs[nsrcs], 0, sizeof(srcs[nsrcs]));
                srcs[nsrcs].sin_family = AF_INET;
                if (inet_pton(AF_INET, tok, &srcs[nsrcs].sin_addr) != 1)
                    usage();
                nsrcs++;
            }
            free(list);
            break;
        }
        default:
            usage();
        }
    }
    if (argc - optind != 2 || parse_long(argv[optind + 1], 1, 65535, &port) < 0)
        usage();
    memset(&dst, 0, sizeof(dst));
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, argv[optind], &dst.sin_addr) != 1)
        usage();

    struct conn *conns = calloc((size_t)count, sizeof(*conns));
    if (conns == NULL)
        abort();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }

    long next = 0, inflight = 0, greeted = 0, failed = 0;
    double t0 = now_seconds();
    struct epoll_event evs[512];
    int first_errno = 0;

    while (next < count || inflight > 0) {
        while (next < count && inflight < inflight_max) {
            struct conn *c = &conns[next];
            const struct sockaddr_in *src = nsrcs > 0 ? &srcs[(size_t)next % nsrcs] : NULL;

            if (conn_start(c, ep, &dst, src) < 0) {
                if (first_errno == 0)
                    first_errno = errno;
                c->fd = -1;
                c->state = CONN_FAILED;
                failed++;
            } else {
                inflight++;
            }
            next++;
        }
        if (now_seconds() - t0 > (double)limit_s)
            break;
        int n = epoll_wait(ep, evs, (int)(sizeof(evs) / sizeof(evs[0])), 1000);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (conn_event(c, ep, evs[i].events)) {
                inflight--;
                if (c->state == CONN_IDLE)
                    greeted++;
                else
                    failed++;
            }
        }
    }
    /* Anything still in flight at the deadline counts as failed. */
    for (long i = 0; i < next; i++) {
        if (conns[i].state == CONN_CONNECTING || conns[i].state == CONN_GREETING) {
            conn_park(&conns[i], ep, CONN_FAILED);
            failed++;
        }
    }
    failed += count - next;
    if (first_errno != 0)
        fprintf(stderr, "idle_conns: first connect error: %s\n", strerror(first_errno));
    printf("ready opened=%ld greeted=%ld failed=%ld seconds=%.2f\n", next, greeted, failed,
           now_seconds() - t0);
    fflush(stdout);

    /* Hold until the caller says so. */
    char line[64];
    if (fgets(line, sizeof(line), stdin) == NULL && ferror(stdin))
        perror("stdin");

    long alive = 0, closed = 0, data = 0;
    for (long i = 0; i < count; i++) {
        char b;
        if (conns[i].state != CONN_IDLE)
            continue;
        ssize_t r = recv(conns[i].fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK))
            closed++;
        else if (r > 0)
            data++;
        else
            alive++;
        close(conns[i].fd);
    }
    printf("alive=%ld closed=%ld data=%ld\n", alive, closed, data);
    fflush(stdout);
    close(ep);
    free(conns);
    free(srcs);
    return greeted == count ? 0 : 1;
}
