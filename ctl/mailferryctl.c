/*
 * mailferryctl: the operator's command line for a running mailferry.
 *
 *   mailferryctl [--config FILE] [--json] policy get [KEY]
 *   mailferryctl [--config FILE] policy set KEY VALUE [KEY VALUE ...]
 *   mailferryctl [--config FILE] policy reset [KEY ...]
 *   mailferryctl [--config FILE] [--json] queue
 *   mailferryctl [--config FILE] [--json] queue list [--route R] [--older-than D] [--limit N]
 *   mailferryctl [--config FILE] [--json] queue show ID [--scan N]
 *   mailferryctl [--config FILE] [--json] queue delete ID
 *   mailferryctl [--config FILE] [--json] queue retry ID|--all
 *   mailferryctl [--config FILE] [--json] dead list [--limit N]
 *   mailferryctl [--config FILE] [--json] dead requeue ID|--all
 *   mailferryctl [--config FILE] [--json] route suspend|resume NAME
 *   mailferryctl [--config FILE] [--json] stats [--hours N]
 *   mailferryctl tunnel-certs DIR [--relay-name NAME ...] [--routers N] ...
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
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl/ctl.h"
#include "ctl/ctl_certs.h"
#include "ctl/dkim_cmd.h"
#include "ctl/dns_cmd.h"
#include "ctl/ctl_policy.h"
#include "ctl/ctl_queue.h"
#include "ctl/ctl_list.h"
#include "ctl/ctl_ops.h"
#include "ctl/ctl_stats.h"
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
            "  queue list [--route R] [--older-than D] [--limit N]\n"
            "                         queued messages (in flight, ready, retry); R: a recipient\n"
            "                         was last tried on route R; D: age, e.g. 30m, 2h, 1d;\n"
            "                         at most N (default 100)\n"
            "  queue show ID [--scan N]\n"
            "                         envelope, recipient states, place in the queue and attempt\n"
            "                         history (searching at most N stream entries, default 10000)\n"
            "  queue delete ID        delete a message (and its retry and dead entries)\n"
            "  queue retry ID|--all   move messages waiting for a retry to the ready stream now\n"
            "  dead list [--limit N]  dead messages (failed, nobody to tell), newest first\n"
            "  dead requeue ID|--all  reset the failed recipients of dead messages to pending\n"
            "                         and queue them again\n"
            "  route suspend NAME     take a route out of service (live route.NAME.enabled = no)\n"
            "  route resume NAME      remove that override: the file's value applies again\n"
            "  stats [--hours N]      per route: recipients over the last N UTC hours (default\n"
            "                         2: this one and the previous), live rates against the\n"
            "                         thresholds, breaker, health, caps used\n"
            "options:\n"
            "  --config FILE   configuration file (default: $MAILFERRY_CONFIG, else\n"
            "                  " CTL_DEFAULT_CONFIG "); MAILFERRY_<SECTION>_<KEY>\n"
            "                  environment variables override it\n"
            "  --json          machine-readable output (every command but policy set and\n"
            "                  reset); may also follow the command\n"
            "  -h, --help      show this text\n"
            "exit status: 0 ok, 1 Redis unreachable or failing, or no such message, 2 bad\n"
            "usage, configuration or value (nothing written)\n");
    /* Sender authentication (ctl/dkim_cmd.h, ctl/dns_cmd.h, docs/dkim.md). */
    fprintf(f, "sender authentication (dns check exits 1 when something must be fixed):\n%s%s",
            ctl_dkim_usage, ctl_dns_usage);
    /* The tunnel's certificates (ctl/ctl_certs.h, docs/relay.md). */
    fprintf(f, "relay tunnel (no configuration or Redis needed):\n%s", ctl_certs_usage);
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

enum ctl_cmd {
    CMD_POLICY_GET,
    CMD_POLICY_SET,
    CMD_POLICY_RESET,
    CMD_QUEUE,
    CMD_QUEUE_LIST,
    CMD_QUEUE_SHOW,
    CMD_QUEUE_DELETE,
    CMD_QUEUE_RETRY,
    CMD_DEAD_LIST,
    CMD_DEAD_REQUEUE,
    CMD_ROUTE_SUSPEND,
    CMD_ROUTE_RESUME,
    CMD_STATS,
};

/* A parsed command line: the command, its keys and values, its options. */
struct ctl_args {
    enum ctl_cmd cmd;
    const char *key;          /* policy get KEY, or NULL */
    const char **keys;        /* policy set / reset */
    const char **values;      /* policy set */
    size_t n;
    const char *arg;          /* ID or NAME; NULL with --all */
    struct ctl_list_opts list;
    long long limit;          /* dead list */
    long long scan;           /* queue show */
    long long hours;          /* stats */
};

/* Options of the commands below, as flags of ctl_cmd_spec.opts. */
#define OPT_JSON 0x01u
#define OPT_ROUTE 0x02u
#define OPT_OLDER 0x04u
#define OPT_LIMIT 0x08u
#define OPT_SCAN 0x10u
#define OPT_HOURS 0x20u
#define OPT_ALL 0x40u

/* The commands with a fixed shape: group, subcommand (NULL: the group
 * alone), the options they take and their one positional argument. The
 * policy commands take key/value lists and are parsed on their own. */
struct ctl_cmd_spec {
    enum ctl_cmd cmd;
    const char *group;
    const char *name;
    unsigned opts;
    const char *arg;          /* name of the positional argument, NULL: none */
};

static const struct ctl_cmd_spec ctl_cmds[] = {
    {CMD_QUEUE, "queue", NULL, OPT_JSON, NULL},
    {CMD_QUEUE_LIST, "queue", "list", OPT_JSON | OPT_ROUTE | OPT_OLDER | OPT_LIMIT, NULL},
    {CMD_QUEUE_SHOW, "queue", "show", OPT_JSON | OPT_SCAN, "ID"},
    {CMD_QUEUE_DELETE, "queue", "delete", OPT_JSON, "ID"},
    {CMD_QUEUE_RETRY, "queue", "retry", OPT_JSON | OPT_ALL, "ID"},
    {CMD_DEAD_LIST, "dead", "list", OPT_JSON | OPT_LIMIT, NULL},
    {CMD_DEAD_REQUEUE, "dead", "requeue", OPT_JSON | OPT_ALL, "ID"},
    {CMD_ROUTE_SUSPEND, "route", "suspend", OPT_JSON, "NAME"},
    {CMD_ROUTE_RESUME, "route", "resume", OPT_JSON, "NAME"},
    {CMD_STATS, "stats", NULL, OPT_JSON | OPT_HOURS, NULL},
};

/* The option names, with their flags. */
static const struct {
    const char *name;
    unsigned flag;
    int has_value;
} ctl_opts[] = {
    {"--json", OPT_JSON, 0},       {"--route", OPT_ROUTE, 1}, {"--older-than", OPT_OLDER, 1},
    {"--limit", OPT_LIMIT, 1},     {"--scan", OPT_SCAN, 1},   {"--hours", OPT_HOURS, 1},
    {"--all", OPT_ALL, 0},
};

/* Reports a bad option value (no usage text: the command was right).
 * Returns CTL_EXIT_USAGE. */
static int value_error(const char *cmd, const char *opt, const char *value, const char *want)
{
    ctl_error("%s: %s: bad value \"%s\" (%s)", cmd, opt, value, want);
    return CTL_EXIT_USAGE;
}

/* Applies one option with its value (NULL for flags) to *a. Returns -1,
 * or CTL_EXIT_USAGE after printing why. */
static int apply_opt(struct ctl *c, const char *cmd, unsigned flag, const char *opt,
                     const char *v, struct ctl_args *a)
{
    switch (flag) {
    case OPT_JSON:
        c->json = 1;
        break;
    case OPT_ROUTE:
        if (v[0] == '\0')
            return value_error(cmd, opt, v, "a route name");
        a->list.route = v;
        break;
    case OPT_OLDER:
        if (ctl_parse_duration(v, &a->list.older_ms) < 0)
            return value_error(cmd, opt, v, "a duration such as 90s, 30m, 2h or 1d");
        break;
    case OPT_LIMIT:
        if (ctl_parse_count(v, 1, CTL_LIST_LIMIT_MAX, &a->list.limit) < 0)
            return value_error(cmd, opt, v, "a number between 1 and 1000000");
        a->limit = a->list.limit;
        break;
    case OPT_SCAN:
        if (ctl_parse_count(v, 1, CTL_SHOW_SCAN_MAX, &a->scan) < 0)
            return value_error(cmd, opt, v, "a number between 1 and 10000000");
        break;
    case OPT_HOURS:
        if (ctl_parse_count(v, 1, CTL_STATS_HOURS_MAX, &a->hours) < 0)
            return value_error(cmd, opt, v, "a number of hours between 1 and 48");
        break;
    case OPT_ALL:
        a->arg = NULL;
        break;
    default:
        break;
    }
    return -1;
}

/* Parses the arguments of a command of ctl_cmds[] (argv: what follows
 * the command words). Returns -1, or CTL_EXIT_USAGE after printing why. */
static int parse_spec(struct ctl *c, const struct ctl_cmd_spec *sp, const char *cmd, int argc,
                      char **argv, struct ctl_args *a)
{
    unsigned seen = 0;
    int npos = 0, rc;

    a->cmd = sp->cmd;
    a->list.limit = CTL_LIST_LIMIT;
    a->limit = CTL_DEAD_LIMIT;
    a->scan = CTL_SHOW_SCAN;
    a->hours = CTL_STATS_HOURS;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i], *eq = strchr(arg, '=');
        size_t nlen = eq != NULL && arg[0] == '-' ? (size_t)(eq - arg) : strlen(arg);
        size_t k;

        if (arg[0] != '-' || arg[1] == '\0') {
            if (sp->arg == NULL || npos > 0)
                return usage_error("%s: unexpected argument \"%s\"", cmd, arg);
            if (arg[0] == '\0')
                return usage_error("%s: empty %s", cmd, sp->arg);
            a->arg = arg;
            npos++;
            continue;
        }
        for (k = 0; k < sizeof(ctl_opts) / sizeof(ctl_opts[0]); k++)
            if (strlen(ctl_opts[k].name) == nlen && strncmp(ctl_opts[k].name, arg, nlen) == 0)
                break;
        if (k == sizeof(ctl_opts) / sizeof(ctl_opts[0]) || !(sp->opts & ctl_opts[k].flag))
            return usage_error("%s: unknown option \"%.*s\"", cmd, (int)nlen, arg);
        seen |= ctl_opts[k].flag;
        if (!ctl_opts[k].has_value) {
            if (eq != NULL)
                return usage_error("%s: %s takes no value", cmd, ctl_opts[k].name);
            rc = apply_opt(c, cmd, ctl_opts[k].flag, ctl_opts[k].name, NULL, a);
        } else if (eq != NULL) {
            rc = apply_opt(c, cmd, ctl_opts[k].flag, ctl_opts[k].name, eq + 1, a);
        } else if (i + 1 < argc) {
            rc = apply_opt(c, cmd, ctl_opts[k].flag, ctl_opts[k].name, argv[++i], a);
        } else {
            return usage_error("%s: %s needs a value", cmd, ctl_opts[k].name);
        }
        if (rc != -1)
            return rc;
    }
    if (sp->arg != NULL && (sp->opts & OPT_ALL)) {
        if (npos > 0 && (seen & OPT_ALL))
            return usage_error("%s: give %s or --all, not both", cmd, sp->arg);
        if (npos == 0 && !(seen & OPT_ALL))
            return usage_error("%s: %s or --all expected", cmd, sp->arg);
        if (seen & OPT_ALL)
            a->arg = NULL;
    } else if (sp->arg != NULL && npos == 0) {
        return usage_error("%s: %s expected", cmd, sp->arg);
    }
    return -1;
}

/*
 * Takes "--json" out of the arguments of commands that have no free-form
 * values (policy get), so that it may also follow the command. Returns
 * the number of remaining arguments.
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

/* The policy commands: keys and values, all free-form. */
static int parse_policy(struct ctl *c, int argc, char **argv, struct ctl_args *a)
{
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

/* Parses the command and its arguments (argv holds what follows the
 * options). Returns -1 with *a filled, or CTL_EXIT_USAGE after printing
 * why and the usage text. */
static int parse_command(struct ctl *c, int argc, char **argv, struct ctl_args *a)
{
    const size_t ncmds = sizeof(ctl_cmds) / sizeof(ctl_cmds[0]);
    bool group = false;
    char cmd[64];

    memset(a, 0, sizeof(*a));
    if (argc < 1)
        return usage_error("no command given");
    if (strcmp(argv[0], "policy") == 0)
        return parse_policy(c, argc, argv, a);
    /* "GROUP NAME ..." first, then "GROUP ..." (queue alone is the
     * summary; an argument that is no subcommand is an error then). */
    for (size_t i = 0; i < ncmds; i++) {
        const struct ctl_cmd_spec *sp = &ctl_cmds[i];
        if (strcmp(argv[0], sp->group) != 0)
            continue;
        group = true;
        if (sp->name != NULL && argc >= 2 && strcmp(argv[1], sp->name) == 0) {
            snprintf(cmd, sizeof(cmd), "%s %s", sp->group, sp->name);
            return parse_spec(c, sp, cmd, argc - 2, argv + 2, a);
        }
    }
    for (size_t i = 0; i < ncmds; i++) {
        const struct ctl_cmd_spec *sp = &ctl_cmds[i];
        if (sp->name == NULL && strcmp(argv[0], sp->group) == 0) {
            if (argc >= 2 && argv[1][0] != '-')
                return usage_error("%s: unknown subcommand \"%s\"", sp->group, argv[1]);
            return parse_spec(c, sp, sp->group, argc - 1, argv + 1, a);
        }
    }
    if (group && argc < 2)
        return usage_error("%s: subcommand expected", argv[0]);
    if (group)
        return usage_error("%s: unknown subcommand \"%s\"", argv[0], argv[1]);
    return usage_error("unknown command \"%s\"", argv[0]);
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
    /* "tunnel-certs" needs neither the configuration nor Redis. */
    if (optind < argc && strcmp(argv[optind], "tunnel-certs") == 0) {
        rc = ctl_certs_main(argc - optind, argv + optind);
        if (fflush(stdout) != 0 && rc == CTL_EXIT_OK)
            rc = CTL_EXIT_RUNTIME;
        return rc;
    }
    /* "dkim" and "dns" parse their own arguments and read the configuration
     * only when they need it (ctl/dkim_cmd.c, ctl/dns_cmd.c). */
    if (optind < argc && (strcmp(argv[optind], "dkim") == 0 || strcmp(argv[optind], "dns") == 0)) {
        const char *cp = path ? path : getenv("MAILFERRY_CONFIG");
        if (cp == NULL || cp[0] == '\0')
            cp = CTL_DEFAULT_CONFIG;
        rc = argv[optind][1] == 'k' ? ctl_dkim_main(argc - optind, argv + optind, cp)
                                    : ctl_dns_main(argc - optind, argv + optind, cp, c.json);
        if (fflush(stdout) != 0 && rc == CTL_EXIT_OK)
            rc = CTL_EXIT_RUNTIME;
        return rc;
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
        rc = ctl_queue(&c);
        break;
    case CMD_QUEUE_LIST:
        rc = ctl_queue_list(&c, &a.list);
        break;
    case CMD_QUEUE_SHOW:
        rc = ctl_queue_show(&c, a.arg, a.scan);
        break;
    case CMD_QUEUE_DELETE:
        rc = ctl_queue_delete(&c, a.arg);
        break;
    case CMD_QUEUE_RETRY:
        rc = ctl_queue_retry(&c, a.arg);
        break;
    case CMD_DEAD_LIST:
        rc = ctl_dead_list(&c, a.limit);
        break;
    case CMD_DEAD_REQUEUE:
        rc = ctl_dead_requeue(&c, a.arg);
        break;
    case CMD_ROUTE_SUSPEND:
    case CMD_ROUTE_RESUME:
        rc = ctl_route_suspend(&c, a.arg, a.cmd == CMD_ROUTE_SUSPEND);
        break;
    case CMD_STATS:
    default:
        rc = ctl_stats(&c, (int)a.hours);
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
