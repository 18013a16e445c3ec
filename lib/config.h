/*
 * config: mailferry's configuration (INI, read with libinih).
 *
 * Every key is one row of a declarative table in config.c: section, name,
 * type, default, bounds, field. conf/mailferry.conf documents every row with
 * its default, and a unit test checks that the two agree. An environment
 * variable MAILFERRY_<SECTION>_<KEY> (upper case, e.g.
 * MAILFERRY_GATEWAY_MAX_CONNECTIONS) overrides the file, for containers.
 *
 * Sections whose name has the form "<kind> <name>" (e.g. "[route relay]")
 * are not in the table: their keys are kept in order in cfg->named for the
 * module that owns that kind, which validates them itself. The section
 * [policy] is kept the same way, with kind "policy" and an empty name.
 *
 * Ownership: config_load() fills a struct that owns every string in it;
 * config_free() releases them. The struct is read-only afterwards.
 */
#ifndef MF_CONFIG_H
#define MF_CONFIG_H

#include <stddef.h>
#include <stdio.h>
#include <sys/socket.h>

#include "lib/cidr.h"

enum config_bare_newline { CONFIG_BARE_REJECT = 0, CONFIG_BARE_NORMALIZE };

/* One listening address, from "host:port", "[v6]:port" or ":port". */
struct config_addr {
    struct sockaddr_storage ss;
    socklen_t len;
    char text[80];            /* as written, for logs */
};

struct config_addr_list {
    struct config_addr *v;
    size_t n;
};

/* redis://[:password@]host:port/db */
struct config_redis {
    char *host;
    int port;
    char *password;           /* NULL when none */
    int db;
};

/* One key of a "[kind name]" section, in file order. */
struct config_named {
    char *kind;               /* "route" */
    char *name;               /* "relay" */
    char *key;
    char *value;
};

struct mf_config {
    char *path;               /* file read, NULL when none */

    struct {
        char *level;          /* debug|info|warn|error */
    } log;

    struct {
        char *redis;                  /* URL as written */
        struct config_redis url;      /* parsed */
        char *prefix;                 /* key prefix, "mf:" */
        int timeout;                  /* seconds before a command is abandoned */
        int wait_replicas;            /* WAIT for this many replicas; 0 = no */
        int wait_timeout;             /* ms for WAIT */
    } queue;

    struct {
        char *listen;                 /* plain SMTP, allowed_networks only */
        char *listen_submission;      /* STARTTLS + AUTH */
        char *listen_tls;             /* implicit TLS + AUTH */
        struct config_addr_list listen_addrs;
        struct config_addr_list submission_addrs;
        struct config_addr_list tls_addrs;
        char *hostname;               /* greeting/EHLO name; default gethostname() */
        char *allowed_networks;
        struct cidr_list allowed;
        char *tls_cert;
        char *tls_key;
        char *users_file;
        long long max_message_size;   /* bytes */
        int max_recipients;
        int max_connections;
        int max_connections_per_ip;
        int max_errors;               /* errors before 421 and close */
        int idle_timeout;             /* seconds, between commands */
        int data_timeout;             /* seconds, between DATA reads */
        int auth_delay;               /* ms before answering a failed AUTH */
        int shutdown_grace;           /* seconds for SIGTERM */
        enum config_bare_newline bare_newline;
        long long max_pending_bytes;  /* Redis write backlog before reads stop */
    } gateway;

    struct {
        char *consumer;               /* stream consumer name; default host-pid */
        char *hostname;               /* Reporting-MTA of bounces; default gethostname() */
        int concurrency;              /* messages in delivery at once */
        int batch;                    /* stream entries read per XREADGROUP */
        int claim_idle;               /* seconds before another router's entry is claimed */
        char *retry_schedule;         /* seconds between attempts, comma list */
        long long *retry;             /* parsed retry_schedule */
        size_t nretry;
        int max_queue_lifetime;       /* seconds before a message expires */
        int hold_retry;               /* seconds before a held group is tried again */
        int events_maxlen;            /* approximate cap of <prefix>events */
        int policy_refresh;           /* ms between reads of <prefix>policy */
    } router;

    struct {
        char *listen;                 /* HTTP metrics/health endpoint; NULL: none */
        struct config_addr_list listen_addrs;
    } admin;

    /* DKIM signing in the gateway (gateway/dkim.h, docs/dkim.md). */
    struct {
        int enabled;
        char *keys_dir;               /* <domain>.<selector>.<rsa|ed25519>.key files */
        char *key_table;              /* "domain selector rsa|ed25519 path" lines */
        char *sign_headers;           /* comma list of header fields to sign */
        char *oversign_headers;       /* signed once more than present */
    } dkim;

    /* DNS lookups and "mailferryctl dns check" (lib/dns.h, docs/dkim.md). */
    struct {
        char *resolver;               /* "ip[:port],..."; NULL: /etc/resolv.conf */
        int timeout;                  /* ms per try */
        char *relay_ip;               /* the relay's public address(es) */
        char *relay_hostname;         /* the name its PTR must point to */
        char *dnsbl_zones;            /* comma list of DNSBL zones */
        char *spf_includes;           /* comma list of SPF include: domains */
    } dns;

    /* The relay role: the tunnel endpoint that delivers to recipient MX
     * hosts (relay/relay.h, docs/relay.md). */
    struct {
        char *listen;                 /* tunnel listeners (mutual TLS) */
        struct config_addr_list listen_addrs;
        char *tls_cert;               /* the relay's server certificate */
        char *tls_key;
        char *tunnel_ca;              /* CA that issues router certificates */
        char *pinned_clients;         /* "sha256:<hex>,..." or NULL */
        char *helo_name;              /* EHLO name; default gethostname() */
        char *public_ip;              /* the address mail leaves from */
        char *source_address;         /* bind addresses for MX connections */
        char *resolver;               /* "ip[:port],..."; NULL: system */
        int mx_port;
        int mx_max_connections_per_domain;
        int mx_idle_timeout;          /* seconds */
        int mx_connect_timeout;       /* seconds */
        int mx_tls_verify;
        char *mx_ca_file;
        int check_interval;           /* seconds between self-checks */
        char *dnsbl_zones;
        char *spf_domains;
        long long max_message_size;
        int max_recipients;
        int max_connections;
        int idle_timeout;             /* seconds */
        int data_timeout;             /* seconds */
        int shutdown_grace;           /* seconds */
    } relay;

    struct config_named *named;
    size_t nnamed;
};

/*
 * Loads defaults, then the file at path (NULL: defaults only), then the
 * environment overrides, then validates every value and derived field
 * (addresses, networks, Redis URL; TLS listeners need tls_cert and tls_key,
 * submission listeners need users_file). On error returns -1 and writes one
 * line naming the file, line, section and key and why into err, e.g.
 * "conf/x.conf:12: [gateway] max_connections: must be an integer between 1
 * and 1000000, got \"lots\"". Unknown sections and keys are errors.
 * On error cfg is left zeroed (config_free() on it is harmless); on success
 * the caller releases it with config_free().
 */
int config_load(struct mf_config *cfg, const char *path, char *err, size_t errlen);

/* Releases every string and list of cfg and zeroes it. */
void config_free(struct mf_config *cfg);

/* Parses a comma/space separated list of listening addresses. Returns 0 or
 * -1 with a message in err. out is overwritten (not freed first); its v is
 * allocated and released with free(). On error out is left empty. */
int config_parse_addrs(const char *s, struct config_addr_list *out, char *err, size_t errlen);

/* Parses a redis:// URL. Returns 0 or -1 with a message in err. out is
 * overwritten; host and password are allocated and released with free().
 * On error out is left zeroed. */
int config_parse_redis_url(const char *s, struct config_redis *out, char *err, size_t errlen);

/*
 * Value parsers with the rules the table uses, for modules that validate
 * their own "[kind name]" sections. Each returns 0, or -1 with the reason
 * (e.g. "must be an integer between 1 and 300") in err, without key name.
 * Integers are decimal, fully consumed, no sign but '-'. Sizes are bytes
 * with an optional K, M or G suffix (1024-based, either case). Booleans are
 * yes/no, true/false, on/off, 1/0 (either case).
 */
int config_parse_int(const char *s, long long min, long long max, long long *out,
                     char *err, size_t errlen);
int config_parse_size(const char *s, long long min, long long max, long long *out,
                      char *err, size_t errlen);
int config_parse_bool(const char *s, int *out, char *err, size_t errlen);

/* One key of the table, as the documentation describes it. */
struct config_key_info {
    const char *section;
    const char *name;
    const char *type;         /* "string", "int", "bool", "enum" or "size" */
    const char *def;          /* default as text; NULL when there is none */
    long long min, max;       /* bounds of int and size keys */
};

/* Returns the i-th key of the table in table order, or NULL when i is past
 * the end. The pointer is static. Used by the documentation test. */
const struct config_key_info *config_key(size_t i);

/* Writes every table key with its current value as INI text to the
 * stream (used by tests and by "mailferry --print-config"). A password in
 * the Redis URL is written as "redis://:***@host"; "[kind name]" sections
 * are not written, since they may hold secrets. */
void config_dump(const struct mf_config *cfg, FILE *out);

#endif
