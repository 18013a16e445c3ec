/*
 * mailferry: one daemon binary, roles as subcommands.
 *
 *   mailferry [--config FILE] [--check-config] gateway|router|all|relay
 *   mailferry --check-config --config FILE
 *
 * Signals: SIGTERM/SIGINT stop gracefully (exit 0), SIGHUP reloads TLS
 * certificates and the users file.
 *
 * With [admin] listen set, the process serves the metrics of the roles it
 * runs and its health on one HTTP endpoint (lib/admin.h): /readyz passes
 * while each role's Redis connection is up, the gateway's listeners are
 * open and no shutdown has begun.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "gateway/gateway.h"
#include "lib/admin.h"
#include "lib/config.h"
#include "lib/log.h"
#include "lib/metrics.h"
#include "lib/queue.h"
#include "relay/relay.h"
#include "router/router.h"

struct mf_main {
    uv_loop_t *loop;
    struct mf_config cfg;
    struct queue *queue;
    struct gateway *gateway;
    struct router *router;
    struct relay *relay;
    struct admin *admin;
    uv_signal_t sigterm, sigint, sighup;
    int stopping;
    int parts;                /* roles still running */
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: mailferry [--config FILE] [--check-config] ROLE\n"
            "       mailferry --check-config --config FILE\n"
            "roles:\n"
            "  gateway   SMTP front end: accepts mail into the Redis queue\n"
            "  router    delivers queued mail through the configured routes\n"
            "  all       gateway and router in one process\n"
            "  relay     tunnel endpoint on the physical host: delivers to recipient MX\n"
            "            hosts (docs/relay.md)\n"
            "options:\n"
            "  --config FILE    configuration file (INI); MAILFERRY_<SECTION>_<KEY>\n"
            "                   environment variables override it\n"
            "  --check-config   validate the configuration and exit (0 when valid)\n"
            "  --print-config   print the effective configuration and exit\n");
}

static void main_close_walk(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void main_close_signals(struct mf_main *m)
{
    uv_close((uv_handle_t *)&m->sigterm, NULL);
    uv_close((uv_handle_t *)&m->sigint, NULL);
    uv_close((uv_handle_t *)&m->sighup, NULL);
}

static void main_part_done(struct mf_main *m)
{
    if (--m->parts > 0)
        return;
    main_close_signals(m);
    if (m->admin)
        admin_close(m->admin, NULL, NULL);
    m->admin = NULL;
}

/* ---- readiness checks (GET /readyz) ---- */

static int main_check_running(void *arg, char *why, size_t n)
{
    const struct mf_main *m = arg;

    if (!m->stopping)
        return 1;
    snprintf(why, n, "shutting down");
    return 0;
}

static int main_check_gateway_redis(void *arg, char *why, size_t n)
{
    const struct mf_main *m = arg;

    if (m->queue && queue_ready(m->queue))
        return 1;
    snprintf(why, n, "not connected to %s:%d", m->cfg.queue.url.host, m->cfg.queue.url.port);
    return 0;
}

static int main_check_gateway_listeners(void *arg, char *why, size_t n)
{
    const struct mf_main *m = arg;

    if (m->gateway && gateway_listening(m->gateway) > 0)
        return 1;
    snprintf(why, n, "no SMTP listener open");
    return 0;
}

static int main_check_router_redis(void *arg, char *why, size_t n)
{
    const struct mf_main *m = arg;

    if (m->router && store_ready(router_store(m->router)))
        return 1;
    snprintf(why, n, "not connected to %s:%d", m->cfg.queue.url.host, m->cfg.queue.url.port);
    return 0;
}

static int main_check_relay_listeners(void *arg, char *why, size_t n)
{
    const struct mf_main *m = arg;

    if (m->relay && relay_listening(m->relay) > 0)
        return 1;
    snprintf(why, n, "no tunnel listener open");
    return 0;
}

/* Starts the admin endpoint when [admin] listen is set. */
static int main_start_admin(struct mf_main *m, char *err, size_t errlen)
{
    if (m->cfg.admin.listen_addrs.n == 0)
        return 0;
    m->admin = admin_new(m->loop, &m->cfg.admin.listen_addrs, metrics_default(), err, errlen);
    if (m->admin == NULL)
        return -1;
    admin_add_check(m->admin, "shutdown", main_check_running, m);
    if (m->gateway) {
        admin_add_check(m->admin, "gateway_redis", main_check_gateway_redis, m);
        admin_add_check(m->admin, "gateway_listeners", main_check_gateway_listeners, m);
    }
    if (m->router)
        admin_add_check(m->admin, "router_redis", main_check_router_redis, m);
    if (m->relay)
        admin_add_check(m->admin, "relay_listeners", main_check_relay_listeners, m);
    return 0;
}

static void main_queue_closed(void *arg)
{
    main_part_done(arg);
}

static void main_gateway_done(void *arg)
{
    struct mf_main *m = arg;

    gateway_free(m->gateway);
    m->gateway = NULL;
    queue_close(m->queue, main_queue_closed, m);
    m->queue = NULL;
}

static void main_router_done(void *arg)
{
    struct mf_main *m = arg;

    m->router = NULL;
    main_part_done(m);
}

static void main_relay_done(void *arg)
{
    struct mf_main *m = arg;

    relay_free(m->relay);
    m->relay = NULL;
    main_part_done(m);
}

static void main_on_signal(uv_signal_t *h, int signum)
{
    struct mf_main *m = h->data;

    if (signum == SIGHUP) {
        log_info("event=signal signal=HUP");
        if (m->gateway)
            gateway_reload(m->gateway);
        if (m->relay)
            relay_reload(m->relay);
        if (m->router)
            router_reload(m->router, m->cfg.path);
        return;
    }
    log_info("event=signal signal=%s", signum == SIGTERM ? "TERM" : "INT");
    if (m->stopping)
        return;
    m->stopping = 1;
    if (m->gateway)
        gateway_shutdown(m->gateway, main_gateway_done, m);
    if (m->router)
        router_shutdown(m->router, main_router_done, m);
    if (m->relay)
        relay_shutdown(m->relay, main_relay_done, m);
}

/* Runs the roles on one loop until SIGTERM/SIGINT has stopped them all. */
static int main_run(struct mf_main *m, int gateway, int router, int relay, const char *role)
{
    char err[1024];

    m->loop = uv_default_loop();
    if (gateway) {
        m->queue = queue_new(m->loop, &m->cfg);
        m->gateway = gateway_new(m->loop, &m->cfg, m->queue, err, sizeof(err));
        if (m->gateway == NULL) {
            fprintf(stderr, "mailferry: %s\n", err);
            return 1;
        }
        m->parts++;
    }
    if (router) {
        m->router = router_new(m->loop, &m->cfg, err, sizeof(err));
        if (m->router == NULL) {
            fprintf(stderr, "mailferry: %s\n", err);
            return 1;
        }
        m->parts++;
    }
    if (relay) {
        m->relay = relay_new(m->loop, &m->cfg, err, sizeof(err));
        if (m->relay == NULL) {
            fprintf(stderr, "mailferry: %s\n", err);
            return 1;
        }
        m->parts++;
    }
    if (main_start_admin(m, err, sizeof(err)) != 0) {
        fprintf(stderr, "mailferry: %s\n", err);
        return 1;
    }
    uv_signal_init(m->loop, &m->sigterm);
    uv_signal_init(m->loop, &m->sigint);
    uv_signal_init(m->loop, &m->sighup);
    m->sigterm.data = m->sigint.data = m->sighup.data = m;
    uv_signal_start(&m->sigterm, main_on_signal, SIGTERM);
    uv_signal_start(&m->sigint, main_on_signal, SIGINT);
    uv_signal_start(&m->sighup, main_on_signal, SIGHUP);
    if (gateway || router)
        log_info("event=start role=%s redis=%s:%d", role, m->cfg.queue.url.host,
                 m->cfg.queue.url.port);
    else
        log_info("event=start role=%s", role);
    uv_run(m->loop, UV_RUN_DEFAULT);
    /* Anything still open (there should be nothing) is closed so that the
     * loop can be released without leaks. */
    uv_walk(m->loop, main_close_walk, NULL);
    uv_run(m->loop, UV_RUN_DEFAULT);
    uv_loop_close(m->loop);
    metrics_default_free();
    log_info("event=exit role=%s", role);
    return 0;
}

/* Whether the configuration has any [route NAME] section. */
static int main_has_routes(const struct mf_config *cfg)
{
    for (size_t i = 0; i < cfg->nnamed; i++)
        if (strcmp(cfg->named[i].kind, "route") == 0)
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    struct mf_main m;
    const char *config = NULL, *role = NULL;
    int check = 0, print = 0, rc;
    char err[1024];

    memset(&m, 0, sizeof(m));
    signal(SIGPIPE, SIG_IGN);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0 || strcmp(argv[i], "-c") == 0) {
            if (++i >= argc) {
                usage(stderr);
                return 2;
            }
            config = argv[i];
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            config = argv[i] + 9;
        } else if (strcmp(argv[i], "--check-config") == 0) {
            check = 1;
        } else if (strcmp(argv[i], "--print-config") == 0) {
            print = 1;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (argv[i][0] != '-' && role == NULL) {
            role = argv[i];
        } else {
            fprintf(stderr, "mailferry: unknown argument %s\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    if (role && strcmp(role, "gateway") != 0 && strcmp(role, "router") != 0 &&
        strcmp(role, "all") != 0 && strcmp(role, "relay") != 0) {
        fprintf(stderr, "mailferry: unknown role %s\n", role);
        usage(stderr);
        return 2;
    }
    if (!role && !check && !print) {
        usage(stderr);
        return 2;
    }
    if (config_load(&m.cfg, config, err, sizeof(err)) != 0) {
        fprintf(stderr, "mailferry: %s\n", err);
        return 1;
    }
    if (log_set_level(m.cfg.log.level) != 0)
        log_warn("event=config reason=\"unknown log level %s\"", m.cfg.log.level);
    if (print) {
        config_dump(&m.cfg, stdout);
        config_free(&m.cfg);
        return 0;
    }
    int gw = role == NULL || strcmp(role, "gateway") == 0 || strcmp(role, "all") == 0;
    int rt = role ? strcmp(role, "router") == 0 || strcmp(role, "all") == 0 : main_has_routes(&m.cfg);
    /* --check-config without a role checks the relay when it is set up. */
    int rl = role ? strcmp(role, "relay") == 0 : m.cfg.relay.listen != NULL;
    if ((gw && gateway_check(&m.cfg, err, sizeof(err)) != 0) ||
        (rt && router_check(&m.cfg, err, sizeof(err)) != 0) ||
        (rl && relay_check(&m.cfg, err, sizeof(err)) != 0)) {
        fprintf(stderr, "mailferry: %s\n", err);
        config_free(&m.cfg);
        return 1;
    }
    if (check) {
        printf("mailferry: configuration %s is valid\n", config ? config : "(defaults)");
        config_free(&m.cfg);
        return 0;
    }
    rc = main_run(&m, gw, rt, rl, role);
    config_free(&m.cfg);
    return rc;
}
