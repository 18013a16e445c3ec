/*
 * mailferryctl: the operator's command line for a running mailferry.
 *
 *   mailferryctl [--config FILE] [--json] policy get [KEY]
 *   mailferryctl [--config FILE] policy set KEY VALUE [KEY VALUE ...]
 *   mailferryctl [--config FILE] policy reset [KEY ...]
 *   mailferryctl [--config FILE] [--json] queue
 *
 * It reads the same configuration file as the daemons (with the same
 * MAILFERRY_<SECTION>_<KEY> environment overrides) to find Redis, the key
 * prefix and the routing policy of the file, and talks to Redis directly;
 * no daemon needs to be reachable. docs/ctl.md is the operator's manual.
 *
 * Exit status: 0 success, 1 Redis unreachable or failing, 2 bad usage, a
 * bad configuration or a rejected value (nothing written).
 */
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl/ctl.h"
#include "ctl/ctl_policy.h"
#include "ctl/ctl_queue.h"
#include "lib/xmalloc.h"

#define CTL_DEFAULT_CONFIG "/etc/mailferry/mailferry.conf"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: mailferryctl [--config FILE] [--json] COMMAND\n"
            "commands:\n"
            "  policy get [KEY]       the effective routing policy (or one key) with the\n"
            "                         source of each value: live, file or default\n"
            "  policy set KEY VALUE [KEY VALUE ...]\n"
            "                         validate and store live overrides (all or none);\n"
            "                         routers apply them within [router] policy_refresh ms\n"
            "  policy reset [KEY ...] remove the live overrides of the KEYs, or all of them\n"
            "  queue                  queue counts, oldest message, and recipients per route\n"
            "                         over the current and previous UTC hour\n"
            "options:\n"
            "  --config FILE   configuration file (default: $MAILFERRY_CONFIG, else\n"
            "                  " CTL_DEFAULT_CONFIG "); MAILFERRY_<SECTION>_<KEY>\n"
            "                  environment variables override it\n"
            "  --json          machine-readable output (policy get, queue)\n"
            "  -h, --help      show this text\n"
            "exit status: 0 ok, 1 Redis unreachable or failing, 2 bad usage, configuration\n"
            "or value (nothing written)\n");
}

/* Reports bad arguments: the reason, then the usage text. Returns
 * CTL_EXIT_USAGE. */
static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
    va_list ap;

    fputs("mailferryctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    usage(stderr);
    return CTL_EXIT_USAGE;
}

/*
 * Takes "--json" out of the arguments of commands that have no free-form
 * values (policy get, queue), so that it may also follow the command.
 * Returns the number of remaining arguments.
 */
static int take_json(struct ctl *c, int argc, char **argv)
{
    int n = 0;

    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0)
            c->json = 1;
        else
            argv[n++] = argv[i];
    }
    return n;
}

enum ctl_cmd { CMD_POLICY_GET, CMD_POLICY_SET, CMD_POLICY_RESET, CMD_QUEUE };

/* A parsed command line: the command and its keys and values. */
struct ctl_args {
    enum ctl_cmd cmd;
    const char *key;          /* policy get KEY, or NULL */
    const char **keys;        /* policy set / reset */
    const char **values;      /* policy set */
    size_t n;
};

/* Parses the command and its arguments (argv holds what follows the
 * options). Returns -1 with *a filled, or CTL_EXIT_USAGE after printing
 * why and the usage text. */
static int parse_command(struct ctl *c, int argc, char **argv, struct ctl_args *a)
{
    memset(a, 0, sizeof(*a));
    if (argc < 1)
        return usage_error("no command given");
    if (strcmp(argv[0], "queue") == 0) {
        argc = take_json(c, argc - 1, argv + 1);
        if (argc != 0)
            return usage_error("queue: unexpected argument \"%s\"", argv[1]);
        a->cmd = CMD_QUEUE;
        return -1;
    }
    if (strcmp(argv[0], "policy") != 0)
        return usage_error("unknown command \"%s\"", argv[0]);
    if (argc < 2)
        return usage_error("policy: get, set or reset expected");
    if (strcmp(argv[1], "get") == 0) {
        argc = take_json(c, argc - 2, argv + 2);
        if (argc > 1)
            return usage_error("policy get: unexpected argument \"%s\"", argv[3]);
        a->cmd = CMD_POLICY_GET;
        a->key = argc == 1 ? argv[2] : NULL;
        return -1;
    }
    if (strcmp(argv[1], "set") == 0) {
        if (argc < 4 || argc % 2 != 0)
            return usage_error("policy set: KEY VALUE pairs expected");
        a->cmd = CMD_POLICY_SET;
        a->n = (size_t)(argc - 2) / 2;
        a->keys = xcalloc(a->n, sizeof(*a->keys));
        a->values = xcalloc(a->n, sizeof(*a->values));
        for (size_t i = 0; i < a->n; i++) {
            a->keys[i] = argv[2 + 2 * i];
            a->values[i] = argv[3 + 2 * i];
        }
        return -1;
    }
    if (strcmp(argv[1], "reset") == 0) {
        a->cmd = CMD_POLICY_RESET;
        a->n = (size_t)(argc - 2);
        a->keys = xcalloc(a->n ? a->n : 1, sizeof(*a->keys));
        for (size_t i = 0; i < a->n; i++)
            a->keys[i] = argv[2 + i];
        return -1;
    }
    return usage_error("policy: unknown subcommand \"%s\"", argv[1]);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct ctl c;
    struct ctl_args a;
    const char *path = NULL;
    char err[1024];
    int opt, rc;

    memset(&c, 0, sizeof(c));
    /* '+': options end at the command, so a VALUE may begin with '-'. */
    while ((opt = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            path = optarg;
            break;
        case 'j':
            c.json = 1;
            break;
        case 'h':
            usage(stdout);
            return CTL_EXIT_OK;
        default:
            usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    rc = parse_command(&c, argc - optind, argv + optind, &a);
    if (rc != -1)
        return rc;

    if (path == NULL) {
        path = getenv("MAILFERRY_CONFIG");
        if (path == NULL || path[0] == '\0')
            path = CTL_DEFAULT_CONFIG;
    }
    if (config_load(&c.cfg, path, err, sizeof(err)) != 0) {
        ctl_error("%s", err);
        free(a.keys);
        free(a.values);
        return CTL_EXIT_USAGE;
    }

    switch (a.cmd) {
    case CMD_POLICY_GET:
        rc = ctl_policy_get(&c, a.key);
        break;
    case CMD_POLICY_SET:
        rc = ctl_policy_set(&c, a.n, a.keys, a.values);
        break;
    case CMD_POLICY_RESET:
        rc = ctl_policy_reset(&c, a.n, a.keys);
        break;
    case CMD_QUEUE:
    default:
        rc = ctl_queue(&c);
        break;
    }
    ctl_close(&c);
    free(a.keys);
    free(a.values);
    if (fflush(stdout) != 0 && rc == CTL_EXIT_OK) {
        ctl_error("cannot write the output");
        rc = CTL_EXIT_RUNTIME;
    }
    return rc;
}
