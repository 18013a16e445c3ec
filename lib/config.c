/*
 * config: the key table, the INI reader around libinih, environment
 * overrides and validation. See config.h for the contract.
 *
 * Loading runs in four steps, each of which may fail with one error line:
 *   1. every table key gets its default;
 *   2. the file is read through libinih, values are converted as they are
 *      read (so a bad integer names its line);
 *   3. MAILFERRY_<SECTION>_<KEY> environment variables replace values;
 *   4. check functions validate what a conversion cannot (URLs, address
 *      lists, networks) and fill the derived fields, then keys that depend
 *      on each other are checked together.
 */
#include "lib/config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ini.h>
#include <limits.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/buf.h"
#include "lib/xmalloc.h"

/* A configuration file is a few kilobytes; anything this large is a
 * mistake (a binary or a log given by accident). */
#define CONFIG_MAX_FILE (1024 * 1024)

/* libinih keeps section names in a 50-byte buffer and silently truncates
 * longer ones, which would file keys under the wrong section. */
#define CONFIG_MAX_SECTION 49

/* Echoed values are cut to this many bytes so one line stays one line. */
#define CONFIG_MAX_ECHO 120

enum cfg_type { CFG_STRING, CFG_INT, CFG_BOOL, CFG_ENUM, CFG_SIZE };

struct cfg_choice {
    const char *name;
    int value;
};

struct cfg_row;

/* A check validates a key after every source was applied and fills the
 * fields derived from it. It returns 0, or -1 with the reason in why. */
typedef int (*cfg_check_fn)(struct mf_config *cfg, const struct cfg_row *row,
                            char *why, size_t whylen);

/* The value of this key may hold a secret that must not be echoed. */
#define CFG_F_URL_SECRET 1

struct cfg_row {
    struct config_key_info info;  /* first, so config_key() can return it */
    enum cfg_type type;
    size_t off;                   /* offsetof(struct mf_config, field) */
    const struct cfg_choice *choices;
    cfg_check_fn check;
    int flags;
};

static int check_level(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_redis(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_prefix(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_listen(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_hostname(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_retry(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_networks(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_header_list(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_ip_list(struct mf_config *, const struct cfg_row *, char *, size_t);
static int check_domain(struct mf_config *, const struct cfg_row *, char *, size_t);

static const struct cfg_choice bare_newline_choices[] = {
    {"reject", CONFIG_BARE_REJECT},
    {"normalize", CONFIG_BARE_NORMALIZE},
    {NULL, 0},
};

#define F(field) offsetof(struct mf_config, field)
#define STR(sec, name, def, field, check, flags) \
    {{sec, name, "string", def, 0, 0}, CFG_STRING, F(field), NULL, check, flags}
#define INT(sec, name, def, min, max, field) \
    {{sec, name, "int", def, min, max}, CFG_INT, F(field), NULL, NULL, 0}
#define SIZE(sec, name, def, min, max, field) \
    {{sec, name, "size", def, min, max}, CFG_SIZE, F(field), NULL, NULL, 0}
#define ENUM(sec, name, def, choices, field) \
    {{sec, name, "enum", def, 0, 0}, CFG_ENUM, F(field), choices, NULL, 0}
#define BOOL(sec, name, def, field) \
    {{sec, name, "bool", def, 0, 0}, CFG_BOOL, F(field), NULL, NULL, 0}

/*
 * Every key mailferry reads. conf/mailferry.conf documents each row with
 * its default, and tests/unit/test_config.c checks that they agree. Rows
 * are in the order the example file lists them.
 */
static const struct cfg_row cfg_rows[] = {
    STR("log", "level", "info", log.level, check_level, 0),

    STR("queue", "redis", "redis://127.0.0.1:6379/0", queue.redis, check_redis,
        CFG_F_URL_SECRET),
    STR("queue", "prefix", "mf:", queue.prefix, check_prefix, 0),
    INT("queue", "timeout", "5", 1, 300, queue.timeout),
    INT("queue", "wait_replicas", "0", 0, 16, queue.wait_replicas),
    /* Redis WAIT with a timeout of 0 blocks forever, hence the minimum. */
    INT("queue", "wait_timeout", "1000", 1, 60000, queue.wait_timeout),

    STR("gateway", "listen", NULL, gateway.listen, check_listen, 0),
    STR("gateway", "listen_submission", NULL, gateway.listen_submission, check_listen, 0),
    STR("gateway", "listen_tls", NULL, gateway.listen_tls, check_listen, 0),
    STR("gateway", "hostname", NULL, gateway.hostname, check_hostname, 0),
    STR("gateway", "allowed_networks", "127.0.0.0/8, ::1", gateway.allowed_networks,
        check_networks, 0),
    STR("gateway", "tls_cert", NULL, gateway.tls_cert, NULL, 0),
    STR("gateway", "tls_key", NULL, gateway.tls_key, NULL, 0),
    STR("gateway", "users_file", NULL, gateway.users_file, NULL, 0),
    SIZE("gateway", "max_message_size", "26214400", 1024, 2147483647LL,
         gateway.max_message_size),
    INT("gateway", "max_recipients", "1000", 1, 100000, gateway.max_recipients),
    INT("gateway", "max_connections", "10000", 1, 1000000, gateway.max_connections),
    INT("gateway", "max_connections_per_ip", "100", 1, 1000000,
        gateway.max_connections_per_ip),
    INT("gateway", "max_errors", "10", 1, 1000, gateway.max_errors),
    /* RFC 5321 section 4.5.3.2.7: a server SHOULD wait at least 5 minutes
     * for the next command. */
    INT("gateway", "idle_timeout", "300", 1, 86400, gateway.idle_timeout),
    INT("gateway", "data_timeout", "180", 1, 86400, gateway.data_timeout),
    INT("gateway", "auth_delay", "1000", 0, 60000, gateway.auth_delay),
    INT("gateway", "shutdown_grace", "30", 0, 3600, gateway.shutdown_grace),
    ENUM("gateway", "bare_newline", "reject", bare_newline_choices, gateway.bare_newline),
    SIZE("gateway", "max_pending_bytes", "67108864", 65536, 68719476736LL,
         gateway.max_pending_bytes),

    STR("router", "consumer", NULL, router.consumer, NULL, 0),
    STR("router", "hostname", NULL, router.hostname, check_hostname, 0),
    INT("router", "concurrency", "100", 1, 100000, router.concurrency),
    INT("router", "batch", "32", 1, 1000, router.batch),
    INT("router", "claim_idle", "300", 1, 86400, router.claim_idle),
    /* Near Postfix: first retry after 5 minutes, doubling, capped near
     * 67 minutes (minimal_backoff_time 300s, maximal_backoff_time 4000s). */
    STR("router", "retry_schedule", "300,600,1200,2400,4000", router.retry_schedule,
        check_retry, 0),
    INT("router", "max_queue_lifetime", "432000", 1, 31536000, router.max_queue_lifetime),
    INT("router", "hold_retry", "60", 1, 86400, router.hold_retry),
    INT("router", "events_maxlen", "100000", 100, 100000000, router.events_maxlen),
    INT("router", "policy_refresh", "1000", 100, 60000, router.policy_refresh),

    STR("admin", "listen", NULL, admin.listen, check_listen, 0),

    BOOL("dkim", "enabled", "yes", dkim.enabled),
    STR("dkim", "keys_dir", NULL, dkim.keys_dir, NULL, 0),
    STR("dkim", "key_table", NULL, dkim.key_table, NULL, 0),
    STR("dkim", "sign_headers",
        "From,Sender,Reply-To,Subject,Date,Message-ID,To,Cc,In-Reply-To,References,"
        "MIME-Version,Content-Type,Content-Transfer-Encoding,List-Id,List-Unsubscribe,"
        "List-Unsubscribe-Post", dkim.sign_headers, check_header_list, 0),
    STR("dkim", "oversign_headers", "From,Reply-To,Subject,Date,To,Cc", dkim.oversign_headers,
        check_header_list, 0),

    STR("dns", "resolver", NULL, dns.resolver, NULL, 0),
    INT("dns", "timeout", "5000", 100, 60000, dns.timeout),
    STR("dns", "relay_ip", NULL, dns.relay_ip, check_ip_list, 0),
    STR("dns", "relay_hostname", NULL, dns.relay_hostname, check_domain, 0),
    STR("dns", "dnsbl_zones", "zen.spamhaus.org,bl.spamcop.net", dns.dnsbl_zones, NULL, 0),
    STR("dns", "spf_includes", NULL, dns.spf_includes, NULL, 0),

    STR("relay", "listen", NULL, relay.listen, check_listen, 0),
    STR("relay", "tls_cert", NULL, relay.tls_cert, NULL, 0),
    STR("relay", "tls_key", NULL, relay.tls_key, NULL, 0),
    STR("relay", "tunnel_ca", NULL, relay.tunnel_ca, NULL, 0),
    STR("relay", "pinned_clients", NULL, relay.pinned_clients, NULL, 0),
    STR("relay", "helo_name", NULL, relay.helo_name, check_hostname, 0),
    STR("relay", "public_ip", NULL, relay.public_ip, check_ip_list, 0),
    STR("relay", "source_address", NULL, relay.source_address, check_ip_list, 0),
    STR("relay", "resolver", NULL, relay.resolver, NULL, 0),
    INT("relay", "mx_port", "25", 1, 65535, relay.mx_port),
    INT("relay", "mx_max_connections_per_domain", "10", 1, 1000,
        relay.mx_max_connections_per_domain),
    INT("relay", "mx_idle_timeout", "30", 1, 3600, relay.mx_idle_timeout),
    INT("relay", "mx_connect_timeout", "30", 1, 300, relay.mx_connect_timeout),
    BOOL("relay", "mx_tls_verify", "no", relay.mx_tls_verify),
    STR("relay", "mx_ca_file", NULL, relay.mx_ca_file, NULL, 0),
    INT("relay", "check_interval", "300", 1, 86400, relay.check_interval),
    STR("relay", "dnsbl_zones", "zen.spamhaus.org,bl.spamcop.net,b.barracudacentral.org",
        relay.dnsbl_zones, NULL, 0),
    STR("relay", "spf_domains", NULL, relay.spf_domains, NULL, 0),
    SIZE("relay", "max_message_size", "33554432", 1024, 2147483647LL, relay.max_message_size),
    INT("relay", "max_recipients", "1000", 1, 100000, relay.max_recipients),
    INT("relay", "max_connections", "1000", 1, 1000000, relay.max_connections),
    INT("relay", "idle_timeout", "300", 1, 86400, relay.idle_timeout),
    INT("relay", "data_timeout", "180", 1, 86400, relay.data_timeout),
    INT("relay", "shutdown_grace", "30", 0, 3600, relay.shutdown_grace),
};

#undef F
#undef STR
#undef INT
#undef SIZE
#undef ENUM
#undef BOOL

#define CFG_NROWS (sizeof(cfg_rows) / sizeof(cfg_rows[0]))

/* cfg_set() stores enum values through an int pointer. */
_Static_assert(sizeof(enum config_bare_newline) == sizeof(int), "enum fields must be int-sized");

const struct config_key_info *config_key(size_t i)
{
    return i < CFG_NROWS ? &cfg_rows[i].info : NULL;
}

/* ---- value parsers ---- */

int config_parse_int(const char *s, long long min, long long max, long long *out,
                     char *err, size_t errlen)
{
    const char *p = s;
    char *end;
    long long v;

    if (*p == '-')
        p++;
    if (!isdigit((unsigned char)*p))
        goto bad;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        goto bad;
    *out = v;
    return 0;
bad:
    snprintf(err, errlen, "must be an integer between %lld and %lld", min, max);
    return -1;
}

int config_parse_size(const char *s, long long min, long long max, long long *out,
                      char *err, size_t errlen)
{
    long long v, mult = 1;
    char *end;

    if (!isdigit((unsigned char)*s))
        goto bad;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0)
        goto bad;
    switch (*end) {
    case '\0': break;
    case 'k': case 'K': mult = 1024LL; end++; break;
    case 'm': case 'M': mult = 1024LL * 1024; end++; break;
    case 'g': case 'G': mult = 1024LL * 1024 * 1024; end++; break;
    default: goto bad;
    }
    if (*end != '\0' || v > LLONG_MAX / mult)
        goto bad;
    v *= mult;
    if (v < min || v > max)
        goto bad;
    *out = v;
    return 0;
bad:
    snprintf(err, errlen, "must be a size between %lld and %lld bytes "
             "(K, M, G suffixes multiply by 1024)", min, max);
    return -1;
}

int config_parse_bool(const char *s, int *out, char *err, size_t errlen)
{
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};

    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    snprintf(err, errlen, "must be yes or no (or true/false, on/off, 1/0)");
    return -1;
}

static int parse_enum(const struct cfg_choice *choices, const char *s, int *out,
                      char *err, size_t errlen)
{
    struct buf b = BUF_INIT;

    for (const struct cfg_choice *c = choices; c->name; c++) {
        if (strcasecmp(s, c->name) == 0) {
            *out = c->value;
            return 0;
        }
    }
    buf_appends(&b, "must be one of ");
    for (const struct cfg_choice *c = choices; c->name; c++)
        buf_appendf(&b, "%s%s", c == choices ? "" : ", ", c->name);
    snprintf(err, errlen, "%s", b.data);
    buf_free(&b);
    return -1;
}

/* Parses a decimal port, 1..65535, that must fill the whole string. */
static int parse_port(const char *s, int *port)
{
    long long v;
    char why[8];

    if (*s == '-' || config_parse_int(s, 1, 65535, &v, why, sizeof(why)) < 0)
        return -1;
    *port = (int)v;
    return 0;
}

/* ---- listening addresses ---- */

/* Fills a from one element: "a.b.c.d:port", "[v6]:port", ":port" or
 * "*:port" (every IPv4 address). Host names are refused: resolving them at
 * start-up would make the listeners depend on DNS. */
static int parse_one_addr(const char *tok, struct config_addr *a, char *err, size_t errlen)
{
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    const char *colon, *hs, *he;
    struct addrinfo hints, *res = NULL;
    int port, rc;

    size_t toklen = strlen(tok);

    memset(a, 0, sizeof(*a));
    if (toklen >= sizeof(a->text)) {
        snprintf(err, errlen, "address \"%.40s...\" is too long", tok);
        return -1;
    }
    if (tok[0] == '[') {
        he = strchr(tok, ']');
        if (he == NULL || he[1] != ':') {
            snprintf(err, errlen, "address \"%s\": expected [IPv6]:port", tok);
            return -1;
        }
        hs = tok + 1;
        colon = he + 1;
    } else {
        colon = strrchr(tok, ':');
        if (colon == NULL) {
            snprintf(err, errlen, "address \"%s\": expected host:port, [IPv6]:port or :port",
                     tok);
            return -1;
        }
        if (memchr(tok, ':', (size_t)(colon - tok)) != NULL) {
            snprintf(err, errlen, "address \"%s\": an IPv6 address needs brackets, "
                     "as in [::1]:25", tok);
            return -1;
        }
        hs = tok;
        he = colon;
    }
    if (parse_port(colon + 1, &port) < 0) {
        snprintf(err, errlen, "address \"%s\": port must be between 1 and 65535", tok);
        return -1;
    }
    if ((size_t)(he - hs) >= sizeof(host)) {
        snprintf(err, errlen, "address \"%s\": not an IP address", tok);
        return -1;
    }
    memcpy(host, hs, (size_t)(he - hs));
    host[he - hs] = '\0';

    if (tok[0] != '[' && (host[0] == '\0' || strcmp(host, "*") == 0)) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&a->ss;
        sin->sin_family = AF_INET;
        sin->sin_addr.s_addr = htonl(INADDR_ANY);
        sin->sin_port = htons((uint16_t)port);
        a->len = sizeof(*sin);
    } else {
        /* AI_NUMERICHOST never touches DNS; getaddrinfo rather than
         * inet_pton so that scoped addresses (fe80::1%eth0) work. */
        memset(&hints, 0, sizeof(hints));
        hints.ai_family = tok[0] == '[' ? AF_INET6 : AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE;
        rc = getaddrinfo(host, colon + 1, &hints, &res);
        if (rc != 0 || res == NULL || res->ai_addrlen > sizeof(a->ss)) {
            if (res)
                freeaddrinfo(res);
            snprintf(err, errlen, "address \"%s\": \"%s\" is not an %s address", tok, host,
                     tok[0] == '[' ? "IPv6" : "IPv4");
            return -1;
        }
        memcpy(&a->ss, res->ai_addr, res->ai_addrlen);
        a->len = (socklen_t)res->ai_addrlen;
        freeaddrinfo(res);
    }
    memcpy(a->text, tok, toklen + 1);
    return 0;
}

int config_parse_addrs(const char *s, struct config_addr_list *out, char *err, size_t errlen)
{
    struct config_addr_list l = {NULL, 0};
    char tok[sizeof(l.v[0].text) + 1];
    size_t n;

    out->v = NULL;
    out->n = 0;
    for (;;) {
        s += strspn(s, ", \t\r\n");
        if (*s == '\0')
            break;
        n = strcspn(s, ", \t\r\n");
        if (n >= sizeof(tok)) {
            snprintf(err, errlen, "address \"%.40s...\" is too long", s);
            free(l.v);
            return -1;
        }
        memcpy(tok, s, n);
        tok[n] = '\0';
        s += n;
        l.v = xrealloc(l.v, (l.n + 1) * sizeof(l.v[0]));
        if (parse_one_addr(tok, &l.v[l.n], err, errlen) < 0) {
            free(l.v);
            return -1;
        }
        l.n++;
    }
    *out = l;
    return 0;
}

/* ---- Redis URL ---- */

int config_parse_redis_url(const char *s, struct config_redis *out, char *err, size_t errlen)
{
    static const char scheme[] = "redis://";
    const char *p, *at, *hs, *he, *rest;
    struct in6_addr a6;
    char *host = NULL;
    long long v;
    char why[64];

    memset(out, 0, sizeof(*out));
    out->port = 6379;
    if (strncasecmp(s, scheme, sizeof(scheme) - 1) != 0) {
        snprintf(err, errlen, "must start with redis://");
        return -1;
    }
    p = s + sizeof(scheme) - 1;

    /* The password runs to the last '@': passwords may hold '@' and '/',
     * a host and a database number never do. */
    at = strrchr(p, '@');
    if (at != NULL) {
        if (p[0] != ':') {
            snprintf(err, errlen, "expected redis://:password@host (user names are not supported)");
            return -1;
        }
        if (at > p + 1)
            out->password = xstrndup(p + 1, (size_t)(at - p - 1));
        p = at + 1;
    }

    if (p[0] == '[') {
        hs = p + 1;
        he = strchr(hs, ']');
        if (he == NULL) {
            snprintf(err, errlen, "IPv6 host needs a closing ']'");
            goto fail;
        }
        rest = he + 1;
    } else {
        hs = p;
        he = hs + strcspn(hs, ":/");
        rest = he;
    }
    if (he == hs) {
        snprintf(err, errlen, "host is missing");
        goto fail;
    }
    host = xstrndup(hs, (size_t)(he - hs));
    for (const char *c = host; *c; c++) {
        if (isspace((unsigned char)*c) || iscntrl((unsigned char)*c) || *c == '?' ||
            *c == '#' || *c == '[' || *c == ']') {
            snprintf(err, errlen, "bad character in host");
            goto fail;
        }
    }
    if (p[0] == '[' && inet_pton(AF_INET6, host, &a6) != 1) {
        snprintf(err, errlen, "\"%s\" is not an IPv6 address", host);
        goto fail;
    }

    if (*rest == ':') {
        size_t n = strcspn(rest + 1, "/");
        char port[8];
        if (n == 0 || n >= sizeof(port)) {
            snprintf(err, errlen, "port must be between 1 and 65535");
            goto fail;
        }
        memcpy(port, rest + 1, n);
        port[n] = '\0';
        if (parse_port(port, &out->port) < 0) {
            snprintf(err, errlen, "port must be between 1 and 65535");
            goto fail;
        }
        rest += 1 + n;
    }
    if (*rest == '/') {
        rest++;
        if (*rest != '\0') {
            if (*rest == '-' || config_parse_int(rest, 0, INT_MAX, &v, why, sizeof(why)) < 0) {
                snprintf(err, errlen, "database must be a number, as in redis://host:6379/0");
                goto fail;
            }
            out->db = (int)v;
        }
    } else if (*rest != '\0') {
        snprintf(err, errlen, "unexpected text after the host");
        goto fail;
    }
    out->host = host;
    return 0;

fail:
    free(host);
    free(out->password);
    memset(out, 0, sizeof(*out));
    return -1;
}

/* ---- loading ---- */

/* Where a table key got its value from, for error messages. */
#define ORIGIN_DEFAULT 0
#define ORIGIN_ENV (-1)

struct cfg_ctx {
    struct mf_config *cfg;
    const char *path;            /* for messages; never NULL */

    /* The first error; later ones are dropped. */
    struct buf msg;
    int failed;
    int errline;                 /* file line of the error, 0 when none */

    /* Reader state over the file held in memory. */
    const char *data, *pos, *end;
    int lineno;
    int have_prev;               /* libinih has a key a continuation may extend */
    int cont;                    /* the current line is a continuation */

    int origin[CFG_NROWS];       /* file line, ORIGIN_DEFAULT or ORIGIN_ENV */
    char *raw[CFG_NROWS];        /* text as read, for continuation lines */
};

static void *field_ptr(struct mf_config *cfg, const struct cfg_row *r)
{
    return (char *)cfg + r->off;
}

static const void *field_cptr(const struct mf_config *cfg, const struct cfg_row *r)
{
    return (const char *)cfg + r->off;
}

/* Appends s to b with the credentials of a URL replaced by ":***", which
 * keeps the URL parseable. */
static void append_redacted(struct buf *b, const char *s)
{
    const char *p = strstr(s, "://");
    const char *at = p ? strrchr(p + 3, '@') : NULL;

    if (at == NULL) {
        buf_appends(b, s);
        return;
    }
    buf_append(b, s, (size_t)(p + 3 - s));
    buf_appends(b, ":***");
    buf_appends(b, at);
}

/* Appends s as a double-quoted C-style string, cut at CONFIG_MAX_ECHO
 * bytes, so an error is always one line of printable text. */
static void append_quoted(struct buf *b, const char *s, int redact)
{
    struct buf t = BUF_INIT;
    size_t i;

    if (redact)
        append_redacted(&t, s);
    else
        buf_appends(&t, s);
    buf_appends(b, "\"");
    for (i = 0; i < t.len && i < CONFIG_MAX_ECHO; i++) {
        unsigned char c = (unsigned char)t.data[i];
        if (c == '"' || c == '\\')
            buf_appendf(b, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            buf_appendf(b, "\\x%02x", c);
        else
            buf_append(b, &t.data[i], 1);
    }
    if (i < t.len)
        buf_appends(b, "...");
    buf_appends(b, "\"");
    buf_free(&t);
}

/*
 * Records an error unless one is already recorded (force replaces it).
 * where: line > 0 is a file line, env names an environment variable, else
 * the file as a whole. The text is "<where>: [section] key: <why>" with
 * ", got \"value\"" when value is not NULL.
 */
static void cfg_error(struct cfg_ctx *c, int force, int line, const char *env,
                      const char *section, const char *key, const char *value, int redact,
                      const char *fmt, ...) __attribute__((format(printf, 9, 10)));

static void cfg_error(struct cfg_ctx *c, int force, int line, const char *env,
                      const char *section, const char *key, const char *value, int redact,
                      const char *fmt, ...)
{
    va_list ap;

    if (c->failed && !force)
        return;
    buf_reset(&c->msg);
    if (env)
        buf_appendf(&c->msg, "environment %s: ", env);
    else if (line > 0)
        buf_appendf(&c->msg, "%s:%d: ", c->path, line);
    else
        buf_appendf(&c->msg, "%s: ", c->path);
    if (section && key)
        buf_appendf(&c->msg, "[%s] %s: ", section, key);
    else if (section)
        buf_appendf(&c->msg, "[%s]: ", section);
    else if (key)
        buf_appendf(&c->msg, "%s: ", key);
    va_start(ap, fmt);
    buf_vappendf(&c->msg, fmt, ap);
    va_end(ap);
    if (value) {
        buf_appends(&c->msg, ", got ");
        append_quoted(&c->msg, value, redact);
    }
    c->failed = 1;
    c->errline = line;
}

/* Error about a table key, located where its value came from. */
static void row_error(struct cfg_ctx *c, size_t i, const char *value, const char *why)
{
    const struct cfg_row *r = &cfg_rows[i];
    char env[96];
    const char *envp = NULL;

    if (c->origin[i] == ORIGIN_ENV) {
        size_t o = (size_t)snprintf(env, sizeof(env), "MAILFERRY_%s_%s", r->info.section,
                                    r->info.name);
        for (size_t k = 0; k < o && k < sizeof(env); k++)
            env[k] = (char)toupper((unsigned char)env[k]);
        envp = env;
    }
    cfg_error(c, 0, c->origin[i] > 0 ? c->origin[i] : 0, envp, r->info.section, r->info.name,
              value, r->flags & CFG_F_URL_SECRET, "%s", why);
}

/* Converts text and stores it in the row's field. Empty text clears a
 * string key (so "listen =" means no listener). */
static int cfg_set(struct mf_config *cfg, const struct cfg_row *r, const char *text,
                   char *why, size_t whylen)
{
    void *f = field_ptr(cfg, r);
    long long v;
    int b;

    switch (r->type) {
    case CFG_STRING:
        free(*(char **)f);
        *(char **)f = text[0] ? xstrdup(text) : NULL;
        return 0;
    case CFG_INT:
        if (config_parse_int(text, r->info.min, r->info.max, &v, why, whylen) < 0)
            return -1;
        *(int *)f = (int)v;
        return 0;
    case CFG_SIZE:
        if (config_parse_size(text, r->info.min, r->info.max, &v, why, whylen) < 0)
            return -1;
        *(long long *)f = v;
        return 0;
    case CFG_BOOL:
        if (config_parse_bool(text, &b, why, whylen) < 0)
            return -1;
        *(int *)f = b;
        return 0;
    case CFG_ENUM:
        if (parse_enum(r->choices, text, &b, why, whylen) < 0)
            return -1;
        /* Every enum field of struct mf_config has int's size. */
        *(int *)f = b;
        return 0;
    }
    return -1;
}

static int find_row(const char *section, const char *name)
{
    for (size_t i = 0; i < CFG_NROWS; i++) {
        if (strcmp(cfg_rows[i].info.section, section) == 0 &&
            strcmp(cfg_rows[i].info.name, name) == 0)
            return (int)i;
    }
    return -1;
}

static int known_section(const char *section)
{
    for (size_t i = 0; i < CFG_NROWS; i++) {
        if (strcmp(cfg_rows[i].info.section, section) == 0)
            return 1;
    }
    return 0;
}

/* Copies s without surrounding white space into out (s may be out). */
static void trim_copy(char *out, size_t n, const char *s)
{
    size_t len;

    while (isspace((unsigned char)*s))
        s++;
    len = strlen(s);
    while (len > 0 && isspace((unsigned char)s[len - 1]))
        len--;
    if (len >= n)
        len = n - 1;
    memmove(out, s, len);
    out[len] = '\0';
}

/*
 * Checks a "[...]" line as libinih will see it: the closing bracket, the
 * length, and whether the section is a table section or "<kind> <name>".
 */
static void check_section_line(struct cfg_ctx *c, const char *s)
{
    const char *end = s + 1;
    int was_space = 0;
    char name[CONFIG_MAX_SECTION + 2];
    size_t len;

    /* libinih ends the name at ']' or at an inline comment. */
    while (*end && *end != ']' &&
           !(was_space && ini_allow_inline_comments &&
             strchr(ini_inline_comment_prefixes, *end))) {
        was_space = isspace((unsigned char)*end);
        end++;
    }
    if (*end != ']') {
        cfg_error(c, 0, c->lineno, NULL, NULL, NULL, NULL, 0,
                  "section header without closing ']'");
        return;
    }
    len = (size_t)(end - (s + 1));
    if (len > CONFIG_MAX_SECTION) {
        cfg_error(c, 0, c->lineno, NULL, NULL, NULL, NULL, 0,
                  "section name longer than %d characters", CONFIG_MAX_SECTION);
        return;
    }
    memcpy(name, s + 1, len);
    name[len] = '\0';
    trim_copy(name, sizeof(name), name);
    if (name[0] == '\0') {
        cfg_error(c, 0, c->lineno, NULL, NULL, NULL, NULL, 0, "empty section name");
        return;
    }
    if (strpbrk(name, " \t") == NULL && strcmp(name, "policy") != 0 && !known_section(name))
        cfg_error(c, 0, c->lineno, NULL, name, NULL, NULL, 0, "unknown section");
}

/*
 * Classifies the line libinih is about to parse, with libinih's own rules,
 * so the handler knows whether a call is a continuation line (an indented
 * line after a key, which libinih passes as the same key again).
 */
static void classify_line(struct cfg_ctx *c, const char *line)
{
    const char *s = line;
    int was_space = 0;

    if (c->lineno == 1 && ini_allow_bom && strncmp(s, "\xEF\xBB\xBF", 3) == 0)
        s += 3;
    while (isspace((unsigned char)*s))
        s++;
    c->cont = 0;
    if (*s == '\0' || strchr(ini_start_comment_prefixes, *s) != NULL)
        return;
    if (ini_allow_multiline && c->have_prev && s > line) {
        c->cont = 1;
        return;
    }
    if (*s == '[') {
        check_section_line(c, s);
        c->have_prev = 0;
        return;
    }
    for (; *s; s++) {
        if (*s == '=' || *s == ':') {
            c->have_prev = 1;
            return;
        }
        if (was_space && ini_allow_inline_comments && strchr(ini_inline_comment_prefixes, *s))
            return;
        was_space = isspace((unsigned char)*s);
    }
}

/* An fgets() for libinih over the file in memory. It counts lines (the
 * handler has no line number), and hands libinih an empty line in place
 * of one it cannot hold or that holds a NUL byte, after recording why. */
static char *cfg_reader(char *str, int num, void *stream)
{
    struct cfg_ctx *c = stream;
    const char *line = c->pos, *nl;
    size_t len;

    if (c->pos >= c->end || num < 2)
        return NULL;
    nl = memchr(line, '\n', (size_t)(c->end - line));
    len = nl ? (size_t)(nl - line) + 1 : (size_t)(c->end - line);
    c->pos += len;
    c->lineno++;
    if (memchr(line, '\0', len) != NULL) {
        cfg_error(c, 0, c->lineno, NULL, NULL, NULL, NULL, 0, "line holds a NUL byte");
        len = 0;
    } else {
        /* libinih needs room for "\r\n" and the NUL after the text. */
        size_t text = len;
        if (text > 0 && line[text - 1] == '\n')
            text--;
        if (text > 0 && line[text - 1] == '\r')
            text--;
        if (num < 4 || text > (size_t)num - 3) {
            cfg_error(c, 0, c->lineno, NULL, NULL, NULL, NULL, 0,
                      "line longer than %d characters; continue the value on an indented line",
                      num - 3);
            len = 0;
        }
    }
    if (len == 0) {
        str[0] = '\n';
        str[1] = '\0';
        c->cont = 0;
        return str;
    }
    memcpy(str, line, len);
    str[len] = '\0';
    classify_line(c, str);
    return str;
}

static void add_named(struct cfg_ctx *c, const char *section, const char *key,
                      const char *value)
{
    struct mf_config *cfg = c->cfg;
    struct config_named *n;
    size_t k = strcspn(section, " \t");
    const char *name = section + k;

    if (c->cont && cfg->nnamed > 0) {
        struct buf b = BUF_INIT;
        n = &cfg->named[cfg->nnamed - 1];
        buf_appendf(&b, "%s%s%s", n->value, n->value[0] ? " " : "", value);
        free(n->value);
        n->value = buf_steal(&b, NULL);
        return;
    }
    while (isspace((unsigned char)*name))
        name++;
    cfg->named = xrealloc(cfg->named, (cfg->nnamed + 1) * sizeof(cfg->named[0]));
    n = &cfg->named[cfg->nnamed++];
    n->kind = xstrndup(section, k);
    n->name = xstrdup(name);
    n->key = xstrdup(key);
    n->value = xstrdup(value);
}

/* libinih's callback: one key = value, or one continuation line. */
static int cfg_handler(void *user, const char *rawsection, const char *key, const char *value)
{
    struct cfg_ctx *c = user;
    char section[CONFIG_MAX_SECTION + 2];
    char why[256];
    const char *text = value;
    struct buf joined = BUF_INIT;
    int i, rc = 1;

    trim_copy(section, sizeof(section), rawsection);
    if (section[0] == '\0') {
        cfg_error(c, 0, c->lineno, NULL, NULL, key, NULL, 0,
                  "key outside of any [section]");
        return 0;
    }
    /* "[kind name]" sections, and [policy] (kind "policy", empty name),
     * belong to the modules that own them (router, policy). */
    if (strpbrk(section, " \t") != NULL || strcmp(section, "policy") == 0) {
        add_named(c, section, key, value);
        return 1;
    }
    if (!known_section(section)) {
        cfg_error(c, 0, c->lineno, NULL, section, NULL, NULL, 0, "unknown section");
        return 0;
    }
    i = find_row(section, key);
    if (i < 0) {
        cfg_error(c, 0, c->lineno, NULL, section, key, NULL, 0, "unknown key");
        return 0;
    }
    if (c->cont && c->raw[i] != NULL) {
        buf_appendf(&joined, "%s%s%s", c->raw[i], c->raw[i][0] ? " " : "", value);
        text = joined.data;
    } else if (c->origin[i] > 0) {
        cfg_error(c, 0, c->lineno, NULL, section, key, NULL, 0,
                  "set twice (first on line %d)", c->origin[i]);
        return 0;
    } else {
        c->origin[i] = c->lineno;
    }
    free(c->raw[i]);
    c->raw[i] = xstrdup(text);
    if (cfg_set(c->cfg, &cfg_rows[i], text, why, sizeof(why)) < 0) {
        cfg_error(c, 0, c->lineno, NULL, section, key, text,
                  cfg_rows[i].flags & CFG_F_URL_SECRET, "%s", why);
        rc = 0;
    }
    buf_free(&joined);
    return rc;
}

/* Reads the whole file: the reader needs it in memory to count lines and
 * to quote a line libinih reports as malformed. */
static int read_file(struct cfg_ctx *c, const char *path, struct buf *out)
{
    char chunk[8192];
    ssize_t n;
    int fd;

    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        cfg_error(c, 0, 0, NULL, NULL, NULL, NULL, 0, "cannot open: %s", strerror(errno));
        return -1;
    }
    for (;;) {
        n = read(fd, chunk, sizeof(chunk));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            cfg_error(c, 0, 0, NULL, NULL, NULL, NULL, 0, "cannot read: %s", strerror(errno));
            close(fd);
            return -1;
        }
        if (n == 0)
            break;
        if (out->len + (size_t)n > CONFIG_MAX_FILE) {
            cfg_error(c, 0, 0, NULL, NULL, NULL, NULL, 0, "larger than %d bytes",
                      CONFIG_MAX_FILE);
            close(fd);
            return -1;
        }
        buf_append(out, chunk, (size_t)n);
    }
    close(fd);
    return 0;
}

static int load_file(struct cfg_ctx *c, const char *path)
{
    struct buf data = BUF_INIT;
    int ret;

    if (read_file(c, path, &data) < 0) {
        buf_free(&data);
        return -1;
    }
    c->data = c->pos = data.data ? data.data : "";
    c->end = c->data + data.len;
    ret = ini_parse_stream(cfg_reader, c, cfg_handler, c);
    if (ret > 0 && (!c->failed || ret < c->errline)) {
        /* libinih found a line that is neither a section, a key = value
         * nor a comment; quote it. */
        const char *l = c->data;
        size_t len;
        char *text;
        for (int k = 1; k < ret && l < c->end; k++) {
            const char *nl = memchr(l, '\n', (size_t)(c->end - l));
            l = nl ? nl + 1 : c->end;
        }
        len = strcspn(l, "\r\n");
        text = xstrndup(l, len);
        cfg_error(c, 1, ret, NULL, NULL, NULL, text, 0,
                  "syntax error: expected [section], key = value or a # comment");
        free(text);
    } else if (ret < 0 && !c->failed) {
        cfg_error(c, 0, 0, NULL, NULL, NULL, NULL, 0, "cannot parse (libinih error %d)", ret);
    }
    buf_free(&data);
    return c->failed ? -1 : 0;
}

/* Builds MAILFERRY_<SECTION>_<KEY> into out. */
static void env_name(const struct cfg_row *r, char *out, size_t n)
{
    size_t o = (size_t)snprintf(out, n, "MAILFERRY_%s_%s", r->info.section, r->info.name);

    for (size_t k = 0; k < o && k < n; k++)
        out[k] = (char)toupper((unsigned char)out[k]);
}

static int load_env(struct cfg_ctx *c)
{
    char name[96], why[256];
    const char *v;

    for (size_t i = 0; i < CFG_NROWS; i++) {
        env_name(&cfg_rows[i], name, sizeof(name));
        v = getenv(name);
        if (v == NULL)
            continue;
        c->origin[i] = ORIGIN_ENV;
        if (cfg_set(c->cfg, &cfg_rows[i], v, why, sizeof(why)) < 0) {
            row_error(c, i, v, why);
            return -1;
        }
    }

    /* A misspelt variable for a table section would otherwise be ignored
     * without a word, which is the worst failure for a container setting. */
    for (char **e = environ; e && *e; e++) {
        const char *var = *e, *eq = strchr(var, '=');
        size_t vlen = eq ? (size_t)(eq - var) : strlen(var);

        if (strncmp(var, "MAILFERRY_", 10) != 0 || vlen >= sizeof(name))
            continue;
        memcpy(name, var, vlen);
        name[vlen] = '\0';
        for (size_t i = 0; i < CFG_NROWS; i++) {
            const char *sec = cfg_rows[i].info.section;
            size_t sl = strlen(sec);
            char key[96];
            size_t k;

            if (i > 0 && strcmp(sec, cfg_rows[i - 1].info.section) == 0)
                continue;
            if (strncasecmp(name + 10, sec, sl) != 0 || name[10 + sl] != '_')
                continue;
            for (k = 0; name[11 + sl + k] && k < sizeof(key) - 1; k++)
                key[k] = (char)tolower((unsigned char)name[11 + sl + k]);
            key[k] = '\0';
            if (find_row(sec, key) < 0) {
                cfg_error(c, 0, 0, name, sec, key, NULL, 0, "unknown key");
                return -1;
            }
        }
    }
    return 0;
}

/* ---- checks ---- */

static int check_level(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    static const char *const levels[] = {"debug", "info", "warn", "error"};
    char *s = *(char **)field_ptr(cfg, r);

    if (s != NULL) {
        for (char *p = s; *p; p++)
            *p = (char)tolower((unsigned char)*p);
        for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
            if (strcmp(s, levels[i]) == 0)
                return 0;
        }
    }
    snprintf(why, n, "must be one of debug, info, warn, error");
    return -1;
}

static int check_redis(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *s = *(char **)field_ptr(cfg, r);

    if (s == NULL) {
        snprintf(why, n, "must not be empty");
        return -1;
    }
    return config_parse_redis_url(s, &cfg->queue.url, why, n);
}

static int check_prefix(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *s = *(char **)field_ptr(cfg, r);

    if (s == NULL) {
        snprintf(why, n, "must not be empty");
        return -1;
    }
    if (strlen(s) > 64) {
        snprintf(why, n, "must be at most 64 characters");
        return -1;
    }
    for (const char *p = s; *p; p++) {
        if (isspace((unsigned char)*p) || iscntrl((unsigned char)*p)) {
            snprintf(why, n, "must not contain spaces or control characters");
            return -1;
        }
    }
    return 0;
}

static int check_listen(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *s = *(char **)field_ptr(cfg, r);
    struct config_addr_list *out;

    if (r->off == offsetof(struct mf_config, admin.listen))
        out = &cfg->admin.listen_addrs;
    else if (r->off == offsetof(struct mf_config, relay.listen))
        out = &cfg->relay.listen_addrs;
    else if (r->off == offsetof(struct mf_config, gateway.listen))
        out = &cfg->gateway.listen_addrs;
    else if (r->off == offsetof(struct mf_config, gateway.listen_submission))
        out = &cfg->gateway.submission_addrs;
    else
        out = &cfg->gateway.tls_addrs;
    if (s == NULL)
        return 0;
    if (config_parse_addrs(s, out, why, n) < 0)
        return -1;
    if (out->n == 0) {
        snprintf(why, n, "no address given");
        return -1;
    }
    return 0;
}

/* RFC 5321 section 4.1.2: Domain = sub-domain *("." sub-domain), each a
 * letter or digit, then letters, digits and hyphens, not ending with a
 * hyphen. RFC 1035 section 2.3.4 caps labels at 63 and names at 255. */
static int valid_domain(const char *s)
{
    size_t label = 0, total = strlen(s);

    if (total == 0 || total > 255)
        return 0;
    for (const char *p = s;; p++) {
        if (*p == '.' || *p == '\0') {
            if (label == 0 || label > 63 || p[-1] == '-')
                return 0;
            if (*p == '\0')
                return 1;
            label = 0;
            continue;
        }
        if (!isalnum((unsigned char)*p) && !(*p == '-' && label > 0))
            return 0;
        label++;
    }
}

/* retry_schedule: seconds between attempts, "300,600,..."; the last
 * value repeats until max_queue_lifetime. */
static int check_retry(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *p = *(char **)field_ptr(cfg, r);
    long long *v = NULL;
    size_t nv = 0;

    while (p && *p) {
        char *end;
        long long x;

        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        if (*p == '\0')
            break;
        errno = 0;
        x = strtoll(p, &end, 10);
        if (end == p || errno || x < 1 || x > 31536000 || nv >= 64) {
            snprintf(why, n, "must be a comma list of 1 to 64 intervals in seconds "
                     "(1..31536000)");
            free(v);
            return -1;
        }
        v = xrealloc(v, (nv + 1) * sizeof(*v));
        v[nv++] = x;
        p = end;
        if (*p && *p != ',' && *p != ' ' && *p != '\t') {
            snprintf(why, n, "must be a comma list of intervals in seconds");
            free(v);
            return -1;
        }
    }
    if (nv == 0) {
        snprintf(why, n, "must list at least one interval");
        return -1;
    }
    free(cfg->router.retry);
    cfg->router.retry = v;
    cfg->router.nretry = nv;
    return 0;
}

static int check_hostname(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    char **f = field_ptr(cfg, r);
    char host[256];

    if (*f == NULL) {
        if (gethostname(host, sizeof(host)) < 0) {
            snprintf(why, n, "not set, and gethostname() failed: %s", strerror(errno));
            return -1;
        }
        host[sizeof(host) - 1] = '\0';
        *f = xstrdup(host);
        if (!valid_domain(*f)) {
            snprintf(why, n, "not set, and the system host name is not a valid domain; "
                     "set it");
            return -1;
        }
        return 0;
    }
    if (!valid_domain(*f)) {
        snprintf(why, n, "must be a domain name (letters, digits, hyphens and dots)");
        return -1;
    }
    return 0;
}

static int check_networks(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *s = *(char **)field_ptr(cfg, r);

    return cidr_list_parse(s ? s : "", &cfg->gateway.allowed, why, n);
}

/* [dkim] sign_headers, oversign_headers: a comma list of header field
 * names (RFC 5322 section 3.6.8: printable ASCII but ':'). RFC 6376
 * section 5.4 says From MUST be signed, so sign_headers must list it. */
static int check_header_list(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *p = *(char **)field_ptr(cfg, r);
    int from = 0;

    while (p && *p) {
        size_t len;

        p += strspn(p, ", \t");
        len = strcspn(p, ", \t");
        if (len == 0)
            break;
        for (size_t i = 0; i < len; i++) {
            if (p[i] < 0x21 || p[i] > 0x7e || p[i] == ':') {
                snprintf(why, n, "must be a comma list of header field names");
                return -1;
            }
        }
        from |= len == 4 && strncasecmp(p, "From", 4) == 0;
        p += len;
    }
    if (r->off == offsetof(struct mf_config, dkim.sign_headers) && !from) {
        snprintf(why, n, "must list From (RFC 6376 section 5.4)");
        return -1;
    }
    return 0;
}

/* An optional domain name: unset, or valid_domain(). */
static int check_domain(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *s = *(char **)field_ptr(cfg, r);

    if (s != NULL && !valid_domain(s)) {
        snprintf(why, n, "must be a domain name (letters, digits, hyphens and dots)");
        return -1;
    }
    return 0;
}

/* [dns] relay_ip: a comma list of IPv4 and IPv6 addresses. */
static int check_ip_list(struct mf_config *cfg, const struct cfg_row *r, char *why, size_t n)
{
    const char *p = *(char **)field_ptr(cfg, r);
    unsigned char a[16];
    char ip[INET6_ADDRSTRLEN + 1];

    while (p && *p) {
        size_t len;

        p += strspn(p, ", \t");
        len = strcspn(p, ", \t");
        if (len == 0)
            break;
        if (len >= sizeof(ip)) {
            snprintf(why, n, "must be a comma list of IP addresses");
            return -1;
        }
        memcpy(ip, p, len);
        ip[len] = '\0';
        if (inet_pton(AF_INET, ip, a) != 1 && inet_pton(AF_INET6, ip, a) != 1) {
            snprintf(why, n, "\"%s\" is not an IP address", ip);
            return -1;
        }
        p += len;
    }
    return 0;
}

/* Same address and port, as bind() would see them. */
static int same_addr(const struct config_addr *a, const struct config_addr *b)
{
    return a->len == b->len && memcmp(&a->ss, &b->ss, a->len) == 0;
}

static int validate(struct cfg_ctx *c)
{
    struct mf_config *cfg = c->cfg;
    char why[256];

    for (size_t i = 0; i < CFG_NROWS; i++) {
        const struct cfg_row *r = &cfg_rows[i];
        if (r->check == NULL)
            continue;
        if (r->check(cfg, r, why, sizeof(why)) < 0) {
            const char *v = r->type == CFG_STRING ? *(char **)field_ptr(cfg, r) : NULL;
            row_error(c, i, v ? v : "", why);
            return -1;
        }
    }

    /* Submission and implicit TLS both carry AUTH, which needs users and
     * TLS (RFC 4616 section 6: PLAIN only over a protected channel). */
    {
        static const char *const needs[] = {"tls_cert", "tls_key", "users_file"};
        const char *by = cfg->gateway.listen_submission ? "listen_submission"
                         : cfg->gateway.listen_tls      ? "listen_tls"
                                                        : NULL;
        const char *vals[] = {cfg->gateway.tls_cert, cfg->gateway.tls_key,
                              cfg->gateway.users_file};
        for (size_t k = 0; by && k < 3; k++) {
            if (vals[k] == NULL) {
                cfg_error(c, 0, 0, NULL, "gateway", needs[k], NULL, 0,
                          "required when %s is set", by);
                return -1;
            }
        }
    }

    /* Two listeners on one address would fail at bind() with a message
     * that does not say which keys collide. */
    {
        const struct config_addr_list *lists[] = {&cfg->gateway.listen_addrs,
                                                  &cfg->gateway.submission_addrs,
                                                  &cfg->gateway.tls_addrs};
        static const char *const names[] = {"listen", "listen_submission", "listen_tls"};
        for (size_t la = 0; la < 3; la++) {
            for (size_t ia = 0; ia < lists[la]->n; ia++) {
                for (size_t lb = la; lb < 3; lb++) {
                    for (size_t ib = la == lb ? ia + 1 : 0; ib < lists[lb]->n; ib++) {
                        if (!same_addr(&lists[la]->v[ia], &lists[lb]->v[ib]))
                            continue;
                        cfg_error(c, 0, 0, NULL, "gateway", names[lb], NULL, 0,
                                  "address %s is already used by %s", lists[lb]->v[ib].text,
                                  names[la]);
                        return -1;
                    }
                }
            }
        }
    }
    return 0;
}

int config_load(struct mf_config *cfg, const char *path, char *err, size_t errlen)
{
    struct cfg_ctx *c = xcalloc(1, sizeof(*c));
    char why[256];
    int rc = -1;

    memset(cfg, 0, sizeof(*cfg));
    c->cfg = cfg;
    c->path = path ? path : "configuration";
    buf_init(&c->msg);
    if (path)
        cfg->path = xstrdup(path);

    for (size_t i = 0; i < CFG_NROWS; i++) {
        const char *def = cfg_rows[i].info.def;
        if (def != NULL && cfg_set(cfg, &cfg_rows[i], def, why, sizeof(why)) < 0) {
            /* A default the table's own bounds refuse is a programming
             * error; report it like any other. */
            row_error(c, i, def, why);
            goto out;
        }
    }
    if (path != NULL && load_file(c, path) < 0)
        goto out;
    if (load_env(c) < 0)
        goto out;
    if (validate(c) < 0)
        goto out;
    rc = 0;

out:
    if (rc < 0) {
        if (errlen > 0)
            snprintf(err, errlen, "%s", c->msg.data ? c->msg.data : "configuration error");
        config_free(cfg);
    }
    for (size_t i = 0; i < CFG_NROWS; i++)
        free(c->raw[i]);
    buf_free(&c->msg);
    free(c);
    return rc;
}

void config_free(struct mf_config *cfg)
{
    for (size_t i = 0; i < CFG_NROWS; i++) {
        if (cfg_rows[i].type == CFG_STRING)
            free(*(char **)field_ptr(cfg, &cfg_rows[i]));
    }
    free(cfg->path);
    free(cfg->router.retry);
    free(cfg->queue.url.host);
    free(cfg->queue.url.password);
    free(cfg->gateway.listen_addrs.v);
    free(cfg->gateway.submission_addrs.v);
    free(cfg->gateway.tls_addrs.v);
    free(cfg->admin.listen_addrs.v);
    free(cfg->relay.listen_addrs.v);
    cidr_list_free(&cfg->gateway.allowed);
    for (size_t i = 0; i < cfg->nnamed; i++) {
        free(cfg->named[i].kind);
        free(cfg->named[i].name);
        free(cfg->named[i].key);
        free(cfg->named[i].value);
    }
    free(cfg->named);
    memset(cfg, 0, sizeof(*cfg));
}

void config_dump(const struct mf_config *cfg, FILE *out)
{
    const char *section = NULL;

    for (size_t i = 0; i < CFG_NROWS; i++) {
        const struct cfg_row *r = &cfg_rows[i];
        const void *f = field_cptr(cfg, r);

        if (section == NULL || strcmp(section, r->info.section) != 0) {
            fprintf(out, "%s[%s]\n", section ? "\n" : "", r->info.section);
            section = r->info.section;
        }
        fprintf(out, "%s =", r->info.name);
        switch (r->type) {
        case CFG_STRING: {
            const char *s = *(char *const *)f;
            if (s != NULL && (r->flags & CFG_F_URL_SECRET)) {
                struct buf b = BUF_INIT;
                append_redacted(&b, s);
                fprintf(out, " %s", b.data);
                buf_free(&b);
            } else if (s != NULL) {
                fprintf(out, " %s", s);
            }
            break;
        }
        case CFG_INT:
            fprintf(out, " %d", *(const int *)f);
            break;
        case CFG_SIZE:
            fprintf(out, " %lld", *(const long long *)f);
            break;
        case CFG_BOOL:
            fprintf(out, " %s", *(const int *)f ? "yes" : "no");
            break;
        case CFG_ENUM:
            for (const struct cfg_choice *ch = r->choices; ch->name; ch++) {
                if (ch->value == *(const int *)f) {
                    fprintf(out, " %s", ch->name);
                    break;
                }
            }
            break;
        }
        fputc('\n', out);
    }
}
