/*
 * Unit tests for lib/config.c: defaults, the example file documenting every
 * key, value types and bounds, error messages, environment overrides, named
 * sections, Redis URLs and listening addresses.
 *
 * The example file is found through MF_SOURCE_DIR (the source tree), else
 * two directories above MF_TEST_DATA (ctest sets it to <source>/tests/data),
 * else the current directory.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/config.h"

static char tmpdir[] = "/tmp/mf_test_config.XXXXXX";
static char conf_path[64];

/* Removes every MAILFERRY_* variable so the environment of the test run
 * cannot change the results. */
static void clear_env(void)
{
    for (;;) {
        char name[256];
        char **e;
        for (e = environ; *e; e++) {
            if (strncmp(*e, "MAILFERRY_", 10) == 0)
                break;
        }
        if (*e == NULL)
            return;
        size_t n = strcspn(*e, "=");
        assert_true(n < sizeof(name));
        memcpy(name, *e, n);
        name[n] = '\0';
        unsetenv(name);
    }
}

static int setup(void **state)
{
    (void)state;
    if (mkdtemp(tmpdir) == NULL)
        return -1;
    snprintf(conf_path, sizeof(conf_path), "%s/t.conf", tmpdir);
    clear_env();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    unlink(conf_path);
    rmdir(tmpdir);
    return 0;
}

static void write_file(const char *path, const char *text, size_t len)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void write_conf(const char *text)
{
    write_file(conf_path, text, strlen(text));
}

/* Loads text and expects success. */
static void load_ok(const char *text, struct mf_config *cfg)
{
    char err[512] = "";

    write_conf(text);
    if (config_load(cfg, conf_path, err, sizeof(err)) != 0)
        fail_msg("unexpected error for:\n%s\n%s", text, err);
}

/* Loads text and expects the error "<path><suffix>" when suffix starts with
 * ':', else exactly suffix (environment errors). */
static void load_err(const char *text, const char *suffix)
{
    struct mf_config cfg;
    char err[512] = "", want[1024];

    write_conf(text);
    if (suffix[0] == ':')
        snprintf(want, sizeof(want), "%s%s", conf_path, suffix);
    else
        snprintf(want, sizeof(want), "%s", suffix);
    if (config_load(&cfg, conf_path, err, sizeof(err)) == 0) {
        config_free(&cfg);
        fail_msg("expected an error for:\n%s", text);
    }
    assert_string_equal(err, want);
    /* A failed load leaves nothing behind. */
    assert_null(cfg.path);
    assert_null(cfg.queue.redis);
    assert_int_equal(cfg.nnamed, 0);
    config_free(&cfg);
}

static void test_defaults(void **state)
{
    struct mf_config cfg;
    char err[256];
    char host[256];

    (void)state;
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_null(cfg.path);
    assert_string_equal(cfg.log.level, "info");
    assert_string_equal(cfg.queue.redis, "redis://127.0.0.1:6379/0");
    assert_string_equal(cfg.queue.url.host, "127.0.0.1");
    assert_int_equal(cfg.queue.url.port, 6379);
    assert_int_equal(cfg.queue.url.db, 0);
    assert_null(cfg.queue.url.password);
    assert_string_equal(cfg.queue.prefix, "mf:");
    assert_int_equal(cfg.queue.timeout, 5);
    assert_int_equal(cfg.queue.wait_replicas, 0);
    assert_int_equal(cfg.queue.wait_timeout, 1000);
    assert_null(cfg.gateway.listen);
    assert_null(cfg.gateway.listen_submission);
    assert_null(cfg.gateway.listen_tls);
    assert_int_equal(cfg.gateway.listen_addrs.n, 0);
    assert_int_equal(cfg.gateway.submission_addrs.n, 0);
    assert_int_equal(cfg.gateway.tls_addrs.n, 0);
    assert_int_equal(gethostname(host, sizeof(host)), 0);
    assert_string_equal(cfg.gateway.hostname, host);
    assert_string_equal(cfg.gateway.allowed_networks, "127.0.0.0/8, ::1");
    assert_int_equal(cfg.gateway.allowed.n, 2);
    assert_null(cfg.gateway.tls_cert);
    assert_null(cfg.gateway.tls_key);
    assert_null(cfg.gateway.users_file);
    assert_int_equal(cfg.gateway.max_message_size, 26214400);
    assert_int_equal(cfg.gateway.max_recipients, 1000);
    assert_int_equal(cfg.gateway.max_connections, 10000);
    assert_int_equal(cfg.gateway.max_connections_per_ip, 100);
    assert_int_equal(cfg.gateway.max_errors, 10);
    assert_int_equal(cfg.gateway.idle_timeout, 300);
    assert_int_equal(cfg.gateway.data_timeout, 180);
    assert_int_equal(cfg.gateway.auth_delay, 1000);
    assert_int_equal(cfg.gateway.shutdown_grace, 30);
    assert_int_equal(cfg.gateway.bare_newline, CONFIG_BARE_REJECT);
    assert_int_equal(cfg.gateway.max_pending_bytes, 67108864);
    assert_int_equal(cfg.nnamed, 0);
    config_free(&cfg);
    /* config_free() leaves a zeroed struct, so a second call is harmless. */
    config_free(&cfg);
}

static void example_path(char *out, size_t n)
{
    const char *src = getenv("MF_SOURCE_DIR");
    const char *data = getenv("MF_TEST_DATA");

    if (src && *src)
        snprintf(out, n, "%s/conf/mailferry.conf", src);
    else if (data && *data) {
        /* <source>/tests/data: drop two components by text, since the data
         * directory itself need not exist. */
        char dir[PATH_MAX - 32];
        snprintf(dir, sizeof(dir), "%s", data);
        for (int up = 0; up < 2; up++) {
            size_t len = strlen(dir);
            while (len > 1 && dir[len - 1] == '/')
                dir[--len] = '\0';
            char *slash = strrchr(dir, '/');
            if (slash == NULL)
                snprintf(dir, sizeof(dir), ".");
            else
                *slash = slash == dir ? '/' : '\0';
            if (slash == dir)
                dir[1] = '\0';
        }
        snprintf(out, n, "%s/conf/mailferry.conf", dir);
    }
    else
        snprintf(out, n, "conf/mailferry.conf");
}

struct doc_key {
    char section[64];
    char name[64];
    char def[256];
    int line;
};

/* Reads the "# key = default" lines of the example file, each with the
 * section header above it, and checks that the line before each is an
 * explanation (a comment that is not itself a key line). */
static size_t read_documented(const char *path, struct doc_key *keys, size_t max)
{
    FILE *f = fopen(path, "r");
    char line[512], prev[512] = "", section[64] = "";
    size_t n = 0;
    int lineno = 0, prev_is_key = 0;

    if (f == NULL)
        fail_msg("cannot open %s: %s (set MF_SOURCE_DIR)", path, strerror(errno));
    while (fgets(line, sizeof(line), f) != NULL) {
        size_t len = strcspn(line, "\r\n");
        const char *p, *eq;
        int is_key = 0;

        line[len] = '\0';
        lineno++;
        if (line[0] == '[') {
            char *end = strchr(line, ']');
            assert_non_null(end);
            *end = '\0';
            snprintf(section, sizeof(section), "%.63s", line + 1);
        } else if (strncmp(line, "# ", 2) == 0) {
            p = line + 2;
            eq = strstr(p, " =");
            if (eq != NULL && eq > p && (eq[2] == '\0' || eq[2] == ' ')) {
                const char *q = p;
                while (q < eq && (islower((unsigned char)*q) || *q == '_'))
                    q++;
                is_key = q == eq;
            }
            if (is_key) {
                assert_true(n < max);
                assert_true(section[0] != '\0');
                snprintf(keys[n].section, sizeof(keys[n].section), "%s", section);
                snprintf(keys[n].name, sizeof(keys[n].name), "%.*s", (int)(eq - p), p);
                snprintf(keys[n].def, sizeof(keys[n].def), "%s",
                         eq[2] == ' ' ? eq + 3 : "");
                keys[n].line = lineno;
                if (prev_is_key || strncmp(prev, "# ", 2) != 0 || strlen(prev) < 4)
                    fail_msg("%s:%d: key %s has no explanation on the line above", path,
                             lineno, keys[n].name);
                n++;
            }
        }
        prev_is_key = is_key;
        snprintf(prev, sizeof(prev), "%s", line);
    }
    fclose(f);
    return n;
}

static void test_example_documents_every_key(void **state)
{
    static struct doc_key keys[256];
    const struct config_key_info *k;
    char path[PATH_MAX];
    size_t n, i, j;

    (void)state;
    example_path(path, sizeof(path));
    n = read_documented(path, keys, sizeof(keys) / sizeof(keys[0]));
    assert_true(n > 0);

    /* Every table key is documented once, with the table's default. */
    for (i = 0; (k = config_key(i)) != NULL; i++) {
        size_t found = 0;
        for (j = 0; j < n; j++) {
            if (strcmp(keys[j].section, k->section) != 0 || strcmp(keys[j].name, k->name) != 0)
                continue;
            found++;
            if (strcmp(keys[j].def, k->def ? k->def : "") != 0)
                fail_msg("%s:%d: [%s] %s documents default \"%s\", the table has \"%s\"", path,
                         keys[j].line, k->section, k->name, keys[j].def,
                         k->def ? k->def : "");
        }
        if (found != 1)
            fail_msg("%s: [%s] %s is documented %zu times, want once", path, k->section,
                     k->name, found);
    }
    assert_int_equal(i, n);

    /* Every documented key exists (no stale documentation). */
    for (j = 0; j < n; j++) {
        int ok = 0;
        for (i = 0; (k = config_key(i)) != NULL; i++)
            ok |= strcmp(keys[j].section, k->section) == 0 && strcmp(keys[j].name, k->name) == 0;
        if (!ok)
            fail_msg("%s:%d: [%s] %s is not a key", path, keys[j].line, keys[j].section,
                     keys[j].name);
    }
}

/* The example loads as it is, and the defaults are written in canonical
 * form: config_dump() of the defaults prints each one as documented. */
static void test_example_loads(void **state)
{
    struct mf_config cfg;
    const struct config_key_info *k;
    char path[PATH_MAX], err[512] = "";
    char *dump = NULL;
    size_t dumplen = 0;
    FILE *f;

    (void)state;
    example_path(path, sizeof(path));
    if (config_load(&cfg, path, err, sizeof(err)) != 0)
        fail_msg("%s", err);
    assert_string_equal(cfg.path, path);
    f = open_memstream(&dump, &dumplen);
    assert_non_null(f);
    config_dump(&cfg, f);
    fclose(f);
    for (size_t i = 0; (k = config_key(i)) != NULL; i++) {
        char want[512];
        if (k->def == NULL)
            continue;
        snprintf(want, sizeof(want), "\n%s = %s\n", k->name, k->def);
        if (strstr(dump, want) == NULL)
            fail_msg("dump lacks \"%s = %s\":\n%s", k->name, k->def, dump);
    }
    free(dump);
    config_free(&cfg);
}

struct err_case {
    const char *text;
    const char *want;   /* ":..." is prefixed with the file path */
};

static const struct err_case err_cases[] = {
    /* Each type names its key and echoes the value. */
    {"[gateway]\nmax_connections = lots\n",
     ":2: [gateway] max_connections: must be an integer between 1 and 1000000, got \"lots\""},
    {"[gateway]\nmax_message_size = 10T\n",
     ":2: [gateway] max_message_size: must be a size between 1024 and 2147483647 bytes "
     "(K, M, G suffixes multiply by 1024), got \"10T\""},
    {"[gateway]\nmax_message_size = 2G\n",
     ":2: [gateway] max_message_size: must be a size between 1024 and 2147483647 bytes "
     "(K, M, G suffixes multiply by 1024), got \"2G\""},
    {"[gateway]\nbare_newline = fix\n",
     ":2: [gateway] bare_newline: must be one of reject, normalize, got \"fix\""},
    {"[log]\nlevel = loud\n",
     ":2: [log] level: must be one of debug, info, warn, error, got \"loud\""},
    {"[queue]\nprefix = m f\n",
     ":2: [queue] prefix: must not contain spaces or control characters, got \"m f\""},
    {"[queue]\nprefix =\n", ":2: [queue] prefix: must not be empty, got \"\""},
    {"[queue]\nredis = http://x\n", ":2: [queue] redis: must start with redis://, got \"http://x\""},
    /* The password never appears in a message. */
    {"[queue]\nredis = redis://:hunter2@host:99999\n",
     ":2: [queue] redis: port must be between 1 and 65535, got \"redis://:***@host:99999\""},
    {"[gateway]\nhostname = -bad-\n",
     ":2: [gateway] hostname: must be a domain name (letters, digits, hyphens and dots), "
     "got \"-bad-\""},
    {"[gateway]\nallowed_networks = 10.0.0.0/8, nonsense\n",
     NULL /* message text belongs to cidr; checked by prefix below */},
    {"[gateway]\nlisten = 127.0.0.1\n",
     ":2: [gateway] listen: address \"127.0.0.1\": expected host:port, [IPv6]:port or :port, "
     "got \"127.0.0.1\""},
    {"[gateway]\nlisten = ::1:25\n",
     ":2: [gateway] listen: address \"::1:25\": an IPv6 address needs brackets, as in "
     "[::1]:25, got \"::1:25\""},
    {"[gateway]\nlisten = localhost:25\n",
     ":2: [gateway] listen: address \"localhost:25\": \"localhost\" is not an IPv4 address, "
     "got \"localhost:25\""},
    {"[gateway]\nlisten = :0\n",
     ":2: [gateway] listen: address \":0\": port must be between 1 and 65535, got \":0\""},
    {"[gateway]\nlisten = ,\n", ":2: [gateway] listen: no address given, got \",\""},
    /* Numbers are strict. */
    {"[queue]\ntimeout = 5s\n",
     ":2: [queue] timeout: must be an integer between 1 and 300, got \"5s\""},
    {"[queue]\ntimeout = +5\n",
     ":2: [queue] timeout: must be an integer between 1 and 300, got \"+5\""},
    {"[queue]\ntimeout = 0x10\n",
     ":2: [queue] timeout: must be an integer between 1 and 300, got \"0x10\""},
    {"[queue]\ntimeout =\n",
     ":2: [queue] timeout: must be an integer between 1 and 300, got \"\""},
    {"[queue]\ntimeout = 99999999999999999999\n",
     ":2: [queue] timeout: must be an integer between 1 and 300, got \"99999999999999999999\""},
    /* Structure. */
    {"[gateway]\nmax_conections = 5\n", ":2: [gateway] max_conections: unknown key"},
    {"[gatway]\nlisten = :25\n", ":1: [gatway]: unknown section"},
    {"# c\n[gatway]\n", ":2: [gatway]: unknown section"},
    {"listen = :25\n", ":1: listen: key outside of any [section]"},
    {"[gateway]\nmax_errors = 5\nmax_errors = 6\n",
     ":3: [gateway] max_errors: set twice (first on line 2)"},
    {"[gateway]\nmax_errors\n",
     ":2: syntax error: expected [section], key = value or a # comment, got \"max_errors\""},
    {"[gateway\nmax_errors = 5\n", ":1: section header without closing ']'"},
    {"[]\n", ":1: empty section name"},
    {"[route aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]\n",
     ":1: section name longer than 49 characters"},
    /* The first error wins, in file order. */
    {"[gateway]\nfoo\nmax_errors = x\n",
     ":2: syntax error: expected [section], key = value or a # comment, got \"foo\""},
    {"[gateway]\nmax_errors = x\nfoo\n",
     ":2: [gateway] max_errors: must be an integer between 1 and 1000, got \"x\""},
    /* Keys that depend on each other; no single line to blame. */
    {"[gateway]\nlisten_submission = 127.0.0.1:587\n",
     ": [gateway] tls_cert: required when listen_submission is set"},
    {"[gateway]\nlisten_submission = 127.0.0.1:587\ntls_cert = c.pem\n",
     ": [gateway] tls_key: required when listen_submission is set"},
    {"[gateway]\nlisten_submission = 127.0.0.1:587\ntls_cert = c.pem\ntls_key = k.pem\n",
     ": [gateway] users_file: required when listen_submission is set"},
    {"[gateway]\nlisten_tls = 127.0.0.1:465\ntls_cert = c.pem\n",
     ": [gateway] tls_key: required when listen_tls is set"},
    {"[gateway]\nlisten_tls = 127.0.0.1:465\ntls_cert = c.pem\ntls_key = k.pem\n",
     ": [gateway] users_file: required when listen_tls is set"},
    {"[gateway]\nlisten = 127.0.0.1:25 127.0.0.1:25\n",
     ": [gateway] listen: address 127.0.0.1:25 is already used by listen"},
    {"[gateway]\nlisten = 127.0.0.1:25\nlisten_tls = 127.0.0.1:25\ntls_cert = c\ntls_key = k\n"
     "users_file = u\n",
     ": [gateway] listen_tls: address 127.0.0.1:25 is already used by listen"},
};

static void test_errors(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(err_cases) / sizeof(err_cases[0]); i++) {
        if (err_cases[i].want != NULL) {
            load_err(err_cases[i].text, err_cases[i].want);
        } else {
            /* The reason comes from cidr_list_parse(); check the frame. */
            struct mf_config cfg;
            char err[512], want[512];
            write_conf(err_cases[i].text);
            assert_int_equal(config_load(&cfg, conf_path, err, sizeof(err)), -1);
            snprintf(want, sizeof(want), "%s:2: [gateway] allowed_networks: ", conf_path);
            assert_memory_equal(err, want, strlen(want));
            assert_non_null(strstr(err, ", got \"10.0.0.0/8, nonsense\""));
        }
    }
}

static void test_odd_lines(void **state)
{
    char text[600];
    char want[256];

    (void)state;
    /* A line longer than libinih can hold is refused, not cut: 197
     * characters fit (with "\r\n"), 198 do not. */
    static const struct {
        size_t width;
        const char *end;
        int ok;
    } widths[] = {{197, "\r\n", 1}, {197, "", 1}, {198, "\n", 0}, {300, "\n", 0}};
    for (size_t i = 0; i < sizeof(widths) / sizeof(widths[0]); i++) {
        static const char head[] = "[gateway]\nallowed_networks = 10.0.0.0/8";
        size_t w = widths[i].width;
        memset(text, ' ', sizeof(text));
        memcpy(text, head, sizeof(head) - 1);
        /* The line after "[gateway]\n" is w characters, then the end. */
        snprintf(text + 10 + w, sizeof(text) - 10 - w, "%s", widths[i].end);
        if (widths[i].ok) {
            struct mf_config cfg;
            load_ok(text, &cfg);
            assert_int_equal(cfg.gateway.allowed.n, 1);
            config_free(&cfg);
        } else {
            load_err(text, ":2: line longer than 197 characters; continue the value on an "
                           "indented line");
        }
    }

    /* A NUL byte. */
    write_file(conf_path, "[gateway]\nmax_errors = 1\0 0\n", 27);
    {
        struct mf_config cfg;
        char err[256];
        assert_int_equal(config_load(&cfg, conf_path, err, sizeof(err)), -1);
        snprintf(want, sizeof(want), "%s:2: line holds a NUL byte", conf_path);
        assert_string_equal(err, want);
    }

    /* Values with quotes and control characters are echoed escaped. */
    load_err("[queue]\ntimeout = \"5\"\t\\\n",
             ":2: [queue] timeout: must be an integer between 1 and 300, got \"\\\"5\\\"\\x09\\\\\"");
}

static void test_missing_file(void **state)
{
    struct mf_config cfg;
    char err[512], want[600], path[64];

    (void)state;
    snprintf(path, sizeof(path), "%s/absent.conf", tmpdir);
    assert_int_equal(config_load(&cfg, path, err, sizeof(err)), -1);
    snprintf(want, sizeof(want), "%s: cannot open: %s", path, strerror(ENOENT));
    assert_string_equal(err, want);
    /* A too small error buffer truncates, never overflows. */
    assert_int_equal(config_load(&cfg, path, err, 8), -1);
    assert_int_equal(strlen(err), 7);
}

/* Every int and size key refuses min-1, max+1 and text, naming itself, and
 * accepts min and max. */
static void test_bounds_every_key(void **state)
{
    const struct config_key_info *k;
    char text[256], want[512];
    struct mf_config cfg;
    size_t tested = 0;

    (void)state;
    for (size_t i = 0; (k = config_key(i)) != NULL; i++) {
        const char *why;
        long long bad[2] = {k->min - 1, k->max + 1};

        if (strcmp(k->type, "int") == 0)
            why = "must be an integer between %lld and %lld";
        else if (strcmp(k->type, "size") == 0)
            why = "must be a size between %lld and %lld bytes (K, M, G suffixes multiply by 1024)";
        else
            continue;
        tested++;
        assert_true(k->min < k->max && k->max < LLONG_MAX && k->min > LLONG_MIN);
        for (int b = 0; b < 3; b++) {
            char value[32], reason[160];
            if (b < 2)
                snprintf(value, sizeof(value), "%lld", bad[b]);
            else
                snprintf(value, sizeof(value), "many");
            snprintf(text, sizeof(text), "[%s]\n%s = %s\n", k->section, k->name, value);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
            snprintf(reason, sizeof(reason), why, k->min, k->max);
#pragma GCC diagnostic pop
            snprintf(want, sizeof(want), ":2: [%s] %s: %s, got \"%s\"", k->section, k->name,
                     reason, value);
            load_err(text, want);
        }
        snprintf(text, sizeof(text), "[%s]\n%s = %lld\n", k->section, k->name, k->min);
        load_ok(text, &cfg);
        config_free(&cfg);
        snprintf(text, sizeof(text), "[%s]\n%s = %lld\n", k->section, k->name, k->max);
        load_ok(text, &cfg);
        config_free(&cfg);
    }
    assert_true(tested >= 13);
}

static void test_values(void **state)
{
    struct mf_config cfg;

    (void)state;
    load_ok("; comment\n[log]\nlevel = DEBUG\n"
            "[queue]\nredis = redis://:pw@redis.example:6380/2\nprefix = prod:mf:\n"
            "wait_replicas = 2 ; two replicas\n"
            "[ gateway ]\nmax_message_size = 10M\nmax_pending_bytes = 1g\n"
            "bare_newline = Normalize\nhostname = mx1.example.com\n"
            "allowed_networks = 10.0.0.0/8,\n   192.168.0.0/16\n"
            "   ::1\n"
            "listen = 127.0.0.1:2525\n"
            "listen_submission = [::1]:587, :1587\n"
            "listen_tls = *:465\n"
            "tls_cert = /etc/mf/cert.pem\ntls_key = /etc/mf/key.pem\nusers_file = /etc/mf/users\n",
            &cfg);
    assert_string_equal(cfg.log.level, "debug");
    assert_string_equal(cfg.queue.url.host, "redis.example");
    assert_int_equal(cfg.queue.url.port, 6380);
    assert_int_equal(cfg.queue.url.db, 2);
    assert_string_equal(cfg.queue.url.password, "pw");
    assert_string_equal(cfg.queue.prefix, "prod:mf:");
    assert_int_equal(cfg.queue.wait_replicas, 2);
    assert_int_equal(cfg.gateway.max_message_size, 10 * 1024 * 1024);
    assert_int_equal(cfg.gateway.max_pending_bytes, 1024LL * 1024 * 1024);
    assert_int_equal(cfg.gateway.bare_newline, CONFIG_BARE_NORMALIZE);
    assert_string_equal(cfg.gateway.hostname, "mx1.example.com");
    /* Continuation lines join with a space. */
    assert_string_equal(cfg.gateway.allowed_networks, "10.0.0.0/8, 192.168.0.0/16 ::1");
    assert_int_equal(cfg.gateway.allowed.n, 3);
    assert_int_equal(cfg.gateway.listen_addrs.n, 1);
    assert_int_equal(cfg.gateway.submission_addrs.n, 2);
    assert_int_equal(cfg.gateway.submission_addrs.v[0].ss.ss_family, AF_INET6);
    assert_string_equal(cfg.gateway.submission_addrs.v[1].text, ":1587");
    assert_int_equal(cfg.gateway.tls_addrs.n, 1);
    assert_string_equal(cfg.gateway.tls_cert, "/etc/mf/cert.pem");
    config_free(&cfg);

    /* An empty allowed_networks allows nobody; an empty listen opens none. */
    load_ok("[gateway]\nallowed_networks =\nlisten =\n", &cfg);
    assert_null(cfg.gateway.allowed_networks);
    assert_int_equal(cfg.gateway.allowed.n, 0);
    assert_null(cfg.gateway.listen);
    config_free(&cfg);

    /* A UTF-8 byte order mark and CRLF line ends are accepted. */
    load_ok("\xEF\xBB\xBF[gateway]\r\nmax_errors = 3\r\n", &cfg);
    assert_int_equal(cfg.gateway.max_errors, 3);
    config_free(&cfg);
}

static void test_env(void **state)
{
    struct mf_config cfg;
    char err[512];
    const struct config_key_info *k;

    (void)state;
    /* The environment wins over the file. */
    setenv("MAILFERRY_GATEWAY_MAX_CONNECTIONS", "42", 1);
    setenv("MAILFERRY_GATEWAY_LISTEN", "127.0.0.1:2526", 1);
    setenv("MAILFERRY_QUEUE_REDIS", "redis://[::1]:7000", 1);
    setenv("MAILFERRY_GATEWAY_BARE_NEWLINE", "normalize", 1);
    setenv("MAILFERRY_GATEWAY_MAX_MESSAGE_SIZE", "1M", 1);
    setenv("MAILFERRY_GATEWAY_HOSTNAME", "", 1);
    load_ok("[gateway]\nmax_connections = 10\nhostname = from.file\n", &cfg);
    assert_int_equal(cfg.gateway.max_connections, 42);
    assert_int_equal(cfg.gateway.listen_addrs.n, 1);
    assert_string_equal(cfg.gateway.listen_addrs.v[0].text, "127.0.0.1:2526");
    assert_string_equal(cfg.queue.url.host, "::1");
    assert_int_equal(cfg.queue.url.port, 7000);
    assert_int_equal(cfg.gateway.bare_newline, CONFIG_BARE_NORMALIZE);
    assert_int_equal(cfg.gateway.max_message_size, 1048576);
    /* Empty clears the file's value: back to the system host name. */
    assert_string_not_equal(cfg.gateway.hostname, "from.file");
    config_free(&cfg);
    clear_env();

    /* Errors name the variable. */
    setenv("MAILFERRY_GATEWAY_MAX_CONNECTIONS", "x", 1);
    load_err("[gateway]\n",
             "environment MAILFERRY_GATEWAY_MAX_CONNECTIONS: [gateway] max_connections: must be "
             "an integer between 1 and 1000000, got \"x\"");
    clear_env();
    setenv("MAILFERRY_QUEUE_REDIS", "redis://:secret@", 1);
    load_err("", "environment MAILFERRY_QUEUE_REDIS: [queue] redis: host is missing, got "
                 "\"redis://:***@\"");
    clear_env();
    setenv("MAILFERRY_GATEWAY_LISTEN", "nowhere", 1);
    load_err("", "environment MAILFERRY_GATEWAY_LISTEN: [gateway] listen: address \"nowhere\": "
                 "expected host:port, [IPv6]:port or :port, got \"nowhere\"");
    clear_env();
    setenv("MAILFERRY_GATEWAY_MAX_CONECTIONS", "5", 1);
    load_err("", "environment MAILFERRY_GATEWAY_MAX_CONECTIONS: [gateway] max_conections: "
                 "unknown key");
    clear_env();

    /* Every table key has its variable: set each to an invalid value for
     * its type and expect its own name in the error. */
    for (size_t i = 0; (k = config_key(i)) != NULL; i++) {
        char name[128], want[512];
        size_t o;
        if (strcmp(k->type, "string") == 0 && strcmp(k->name, "level") != 0 &&
            strcmp(k->name, "prefix") != 0)
            continue;
        o = (size_t)snprintf(name, sizeof(name), "MAILFERRY_%s_%s", k->section, k->name);
        for (size_t c = 0; c < o; c++)
            name[c] = (char)toupper((unsigned char)name[c]);
        setenv(name, " ", 1);
        write_conf("");
        assert_int_equal(config_load(&cfg, conf_path, err, sizeof(err)), -1);
        snprintf(want, sizeof(want), "environment %s: [%s] %s: ", name, k->section, k->name);
        if (strncmp(err, want, strlen(want)) != 0)
            fail_msg("want prefix \"%s\", got \"%s\"", want, err);
        unsetenv(name);
    }

    /* Variables of other prefixes and of named sections are not ours. */
    setenv("MAILFERRY_ROUTE_RELAY_HOST", "other", 1);
    setenv("MAILFERRY_SENDGRID_KEY", "x", 1);
    load_ok("[route relay]\nhost = file\n", &cfg);
    assert_int_equal(cfg.nnamed, 1);
    assert_string_equal(cfg.named[0].value, "file");
    config_free(&cfg);
    clear_env();

    /* Without a file, the environment alone configures. */
    setenv("MAILFERRY_GATEWAY_MAX_ERRORS", "7", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), 0);
    assert_int_equal(cfg.gateway.max_errors, 7);
    config_free(&cfg);
    setenv("MAILFERRY_GATEWAY_LISTEN_TLS", ":465", 1);
    assert_int_equal(config_load(&cfg, NULL, err, sizeof(err)), -1);
    assert_string_equal(err, "configuration: [gateway] tls_cert: required when listen_tls is set");
    clear_env();
}

static void test_named_sections(void **state)
{
    struct mf_config cfg;

    (void)state;
    load_ok("[route relay]\ntransport = relay\nhost = relay.example:2525\n"
            "[gateway]\nmax_errors = 5\n"
            "[route  api]\ntransport = api\nkey_file = /run/secrets/sg\n"
            "match = a.example\nmatch = b.example\n"
            "  c.example\n"
            "[route relay]\nweight =\n",
            &cfg);
    assert_int_equal(cfg.gateway.max_errors, 5);
    assert_int_equal(cfg.nnamed, 7);
    static const char *const want[][4] = {
        {"route", "relay", "transport", "relay"},
        {"route", "relay", "host", "relay.example:2525"},
        {"route", "api", "transport", "api"},
        {"route", "api", "key_file", "/run/secrets/sg"},
        {"route", "api", "match", "a.example"},
        {"route", "api", "match", "b.example c.example"},
        {"route", "relay", "weight", ""},
    };
    for (size_t i = 0; i < 7; i++) {
        assert_string_equal(cfg.named[i].kind, want[i][0]);
        assert_string_equal(cfg.named[i].name, want[i][1]);
        assert_string_equal(cfg.named[i].key, want[i][2]);
        assert_string_equal(cfg.named[i].value, want[i][3]);
    }
    config_free(&cfg);
}

struct redis_case {
    const char *url;
    int ok;
    const char *host;
    int port;
    const char *password;
    int db;
};

static const struct redis_case redis_cases[] = {
    {"redis://127.0.0.1:6379/0", 1, "127.0.0.1", 6379, NULL, 0},
    {"redis://localhost", 1, "localhost", 6379, NULL, 0},
    {"redis://localhost/", 1, "localhost", 6379, NULL, 0},
    {"redis://localhost/5", 1, "localhost", 6379, NULL, 5},
    {"REDIS://Host.Example:1", 1, "Host.Example", 1, NULL, 0},
    {"redis://[::1]", 1, "::1", 6379, NULL, 0},
    {"redis://[2001:db8::7]:6380/15", 1, "2001:db8::7", 6380, NULL, 15},
    {"redis://:secret@h:1/2", 1, "h", 1, "secret", 2},
    {"redis://:p@ss/w:rd@h", 1, "h", 6379, "p@ss/w:rd", 0},
    {"redis://:@h", 1, "h", 6379, NULL, 0},
    {"redis://:pw@[::1]:7000/3", 1, "::1", 7000, "pw", 3},
    {"http://h", 0, NULL, 0, NULL, 0},
    {"redis:/h", 0, NULL, 0, NULL, 0},
    {"redis://", 0, NULL, 0, NULL, 0},
    {"redis://:6379", 0, NULL, 0, NULL, 0},
    {"redis://user:pw@h", 0, NULL, 0, NULL, 0},
    {"redis://:pw@", 0, NULL, 0, NULL, 0},
    {"redis://h:0", 0, NULL, 0, NULL, 0},
    {"redis://h:65536", 0, NULL, 0, NULL, 0},
    {"redis://h:", 0, NULL, 0, NULL, 0},
    {"redis://h:-1", 0, NULL, 0, NULL, 0},
    {"redis://h:63x79", 0, NULL, 0, NULL, 0},
    {"redis://h/x", 0, NULL, 0, NULL, 0},
    {"redis://h/-1", 0, NULL, 0, NULL, 0},
    {"redis://h/1/2", 0, NULL, 0, NULL, 0},
    {"redis://h?db=1", 0, NULL, 0, NULL, 0},
    {"redis://[::1", 0, NULL, 0, NULL, 0},
    {"redis://[nothost]:1", 0, NULL, 0, NULL, 0},
    {"redis://[::1]x", 0, NULL, 0, NULL, 0},
    {"redis://h o/1", 0, NULL, 0, NULL, 0},
};

static void test_redis_urls(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(redis_cases) / sizeof(redis_cases[0]); i++) {
        const struct redis_case *c = &redis_cases[i];
        struct config_redis r;
        char err[256] = "";
        int rc = config_parse_redis_url(c->url, &r, err, sizeof(err));

        if (!c->ok) {
            if (rc != -1)
                fail_msg("%s: accepted", c->url);
            assert_true(err[0] != '\0');
            assert_null(r.host);
            assert_null(r.password);
            continue;
        }
        if (rc != 0)
            fail_msg("%s: %s", c->url, err);
        assert_string_equal(r.host, c->host);
        assert_int_equal(r.port, c->port);
        assert_int_equal(r.db, c->db);
        if (c->password)
            assert_string_equal(r.password, c->password);
        else
            assert_null(r.password);
        free(r.host);
        free(r.password);
    }
}

struct addr_case {
    const char *text;
    size_t n;                 /* 0: must fail */
    int family;               /* of the first address */
    const char *ip;           /* of the first address */
    int port;                 /* of the first address */
};

static const struct addr_case addr_cases[] = {
    {"127.0.0.1:2525", 1, AF_INET, "127.0.0.1", 2525},
    {"[::1]:2525", 1, AF_INET6, "::1", 2525},
    {":2525", 1, AF_INET, "0.0.0.0", 2525},
    {"*:25", 1, AF_INET, "0.0.0.0", 25},
    {"[::]:587", 1, AF_INET6, "::", 587},
    {"0.0.0.0:65535", 1, AF_INET, "0.0.0.0", 65535},
    {"10.1.2.3:1, [::1]:2 :3", 3, AF_INET, "10.1.2.3", 1},
    {" ,127.0.0.1:25,, ", 1, AF_INET, "127.0.0.1", 25},
    {"127.0.0.1", 0, 0, NULL, 0},
    {"127.0.0.1:", 0, 0, NULL, 0},
    {"127.0.0.1:0", 0, 0, NULL, 0},
    {"127.0.0.1:65536", 0, 0, NULL, 0},
    {"127.0.0.1:-1", 0, 0, NULL, 0},
    {"127.0.0.1:2x", 0, 0, NULL, 0},
    {"127.0.0.256:25", 0, 0, NULL, 0},
    {"localhost:25", 0, 0, NULL, 0},
    {"::1:25", 0, 0, NULL, 0},
    {"[::1]25", 0, 0, NULL, 0},
    {"[::1]", 0, 0, NULL, 0},
    {"[127.0.0.1]:25", 0, 0, NULL, 0},
    {"[::1:25", 0, 0, NULL, 0},
    {"127.0.0.1:25, bad", 0, 0, NULL, 0},
    {"[1111:2222:3333:4444:5555:6666:7777:8888]:1111111111111111111111111111111111111111111111111"
     "11111111111111", 0, 0, NULL, 0},
};

static void test_listen_addrs(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(addr_cases) / sizeof(addr_cases[0]); i++) {
        const struct addr_case *c = &addr_cases[i];
        struct config_addr_list l;
        char err[256] = "", ip[INET6_ADDRSTRLEN];
        int rc = config_parse_addrs(c->text, &l, err, sizeof(err));

        if (c->n == 0) {
            if (rc != -1)
                fail_msg("\"%s\": accepted", c->text);
            assert_true(err[0] != '\0');
            assert_null(l.v);
            assert_int_equal(l.n, 0);
            continue;
        }
        if (rc != 0)
            fail_msg("\"%s\": %s", c->text, err);
        assert_int_equal(l.n, c->n);
        assert_int_equal(l.v[0].ss.ss_family, c->family);
        if (c->family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)&l.v[0].ss;
            assert_int_equal(l.v[0].len, sizeof(*sin));
            inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
            assert_int_equal(ntohs(sin->sin_port), c->port);
        } else {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&l.v[0].ss;
            assert_int_equal(l.v[0].len, sizeof(*sin6));
            inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
            assert_int_equal(ntohs(sin6->sin6_port), c->port);
        }
        assert_string_equal(ip, c->ip);
        free(l.v);
    }

    /* The empty list is not an error; the config decides what it means. */
    {
        struct config_addr_list l;
        char err[64];
        assert_int_equal(config_parse_addrs("", &l, err, sizeof(err)), 0);
        assert_int_equal(l.n, 0);
        free(l.v);
    }
}

static void test_value_parsers(void **state)
{
    static const struct {
        const char *s;
        int ok;
        int v;
    } bools[] = {
        {"yes", 1, 1}, {"YES", 1, 1}, {"true", 1, 1}, {"On", 1, 1}, {"1", 1, 1},
        {"no", 1, 0}, {"false", 1, 0}, {"OFF", 1, 0}, {"0", 1, 0},
        {"", 0, 0}, {"y", 0, 0}, {"2", 0, 0}, {"yes ", 0, 0}, {"enabled", 0, 0},
    };
    static const struct {
        const char *s;
        int ok;
        long long v;
    } sizes[] = {
        {"0", 1, 0}, {"1024", 1, 1024}, {"1k", 1, 1024}, {"1K", 1, 1024},
        {"25M", 1, 25LL << 20}, {"3g", 1, 3LL << 30}, {"8589934591G", 1, 8589934591LL << 30},
        {"8589934592G", 0, 0}, {"", 0, 0}, {"K", 0, 0}, {"1KB", 0, 0}, {"1 K", 0, 0},
        {"-1", 0, 0}, {"+1", 0, 0}, {"1.5M", 0, 0}, {"9223372036854775808", 0, 0},
    };
    static const struct {
        const char *s;
        int ok;
        long long v;
    } ints[] = {
        {"0", 1, 0}, {"-5", 1, -5}, {"007", 1, 7}, {"100", 1, 100},
        {"101", 0, 0}, {"-6", 0, 0}, {"", 0, 0}, {"-", 0, 0}, {" 1", 0, 0},
        {"1 ", 0, 0}, {"+1", 0, 0}, {"1e2", 0, 0}, {"0x1", 0, 0},
    };
    char err[128];

    (void)state;
    for (size_t i = 0; i < sizeof(bools) / sizeof(bools[0]); i++) {
        int v = -1;
        int rc = config_parse_bool(bools[i].s, &v, err, sizeof(err));
        if (bools[i].ok) {
            assert_int_equal(rc, 0);
            assert_int_equal(v, bools[i].v);
        } else {
            if (rc != -1)
                fail_msg("bool \"%s\" accepted", bools[i].s);
            assert_string_equal(err, "must be yes or no (or true/false, on/off, 1/0)");
        }
    }
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        long long v = -1;
        int rc = config_parse_size(sizes[i].s, 0, LLONG_MAX, &v, err, sizeof(err));
        if (sizes[i].ok) {
            if (rc != 0)
                fail_msg("size \"%s\": %s", sizes[i].s, err);
            assert_int_equal(v, sizes[i].v);
        } else if (rc != -1) {
            fail_msg("size \"%s\" accepted", sizes[i].s);
        }
    }
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        long long v = -1;
        int rc = config_parse_int(ints[i].s, -5, 100, &v, err, sizeof(err));
        if (ints[i].ok) {
            if (rc != 0)
                fail_msg("int \"%s\": %s", ints[i].s, err);
            assert_int_equal(v, ints[i].v);
        } else {
            if (rc != -1)
                fail_msg("int \"%s\" accepted", ints[i].s);
            assert_string_equal(err, "must be an integer between -5 and 100");
        }
    }
}

/* config_dump() output loads back to the same configuration. */
static void test_dump_roundtrip(void **state)
{
    struct mf_config a, b;
    char *d1 = NULL, *d2 = NULL;
    size_t l1 = 0, l2 = 0;
    FILE *f;

    (void)state;
    load_ok("[log]\nlevel = warn\n[queue]\nredis = redis://[::1]:7000/4\nwait_replicas = 1\n"
            "[gateway]\nlisten = 127.0.0.1:2525\nlisten_submission = [::1]:587\n"
            "tls_cert = c.pem\ntls_key = k.pem\nusers_file = users\n"
            "max_message_size = 1M\nbare_newline = normalize\nhostname = gw.example\n"
            "[route relay]\nsecret = s3cr3t\n",
            &a);
    f = open_memstream(&d1, &l1);
    config_dump(&a, f);
    fclose(f);
    assert_non_null(strstr(d1, "[gateway]\n"));
    assert_non_null(strstr(d1, "\nmax_message_size = 1048576\n"));
    assert_non_null(strstr(d1, "\nbare_newline = normalize\n"));
    assert_non_null(strstr(d1, "\nlisten_tls =\n"));
    assert_null(strstr(d1, "s3cr3t"));
    load_ok(d1, &b);
    f = open_memstream(&d2, &l2);
    config_dump(&b, f);
    fclose(f);
    assert_string_equal(d1, d2);
    config_free(&a);
    config_free(&b);
    free(d1);
    free(d2);

    /* The Redis password is hidden. */
    load_ok("[queue]\nredis = redis://:hunter2@h:1/0\n", &a);
    f = open_memstream(&d1, &l1);
    config_dump(&a, f);
    fclose(f);
    assert_null(strstr(d1, "hunter2"));
    assert_non_null(strstr(d1, "\nredis = redis://:***@h:1/0\n"));
    config_free(&a);
    free(d1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_example_documents_every_key),
        cmocka_unit_test(test_example_loads),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_odd_lines),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_bounds_every_key),
        cmocka_unit_test(test_values),
        cmocka_unit_test(test_env),
        cmocka_unit_test(test_named_sections),
        cmocka_unit_test(test_redis_urls),
        cmocka_unit_test(test_listen_addrs),
        cmocka_unit_test(test_value_parsers),
        cmocka_unit_test(test_dump_roundtrip),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
