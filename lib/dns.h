/*
 * dns: asynchronous DNS queries with c-ares, driven by the libuv loop.
 *
 * One resolver (struct dns) owns a c-ares channel. c-ares tells the module
 * which sockets it wants watched (ARES_OPT_SOCK_STATE_CB); each gets a
 * uv_poll handle, and one uv_timer runs c-ares' retransmissions and
 * timeouts (ares_timeout). Nothing blocks the loop.
 *
 * Queries go to the servers of /etc/resolv.conf, or to the list given in
 * the options ("127.0.0.1:5353,[::1]:53", as ares_set_servers_ports_csv()
 * reads it). Names are queried as given (ares_query: no search list), which
 * is what a mail system wants for MX, SPF, DKIM and DNSBL names. EDNS0 with
 * a 1232-byte payload is announced; a truncated answer is retried over TCP
 * by c-ares.
 *
 * Answers are decoded into struct dns_result:
 *   A, AAAA  addresses (binary and text), CNAME chains followed by c-ares;
 *   TXT      one entry per record, its character-strings joined without
 *            separator: a 2048-bit DKIM key is published as several
 *            strings of at most 255 octets, which RFC 6376 section 3.6.2.2
 *            and RFC 7208 section 3.3 say to concatenate;
 *   PTR      every name of the answer;
 *   MX       preference and host, sorted by preference (stable; choosing
 *            among equal preferences at random, RFC 5321 section 5.1, is
 *            the caller's). A null MX (RFC 7505) is host "" with
 *            preference 0.
 *
 * Callbacks: every query's callback is made exactly once, always from the
 * loop and never from inside dns_query(); the result (and every pointer in
 * it) is valid only during the callback. dns_result_dup() keeps a copy. A
 * callback may start new queries and may call dns_close().
 *
 * All functions are for the loop's thread only.
 */
#ifndef MF_DNS_H
#define MF_DNS_H

#include <netinet/in.h>
#include <stddef.h>
#include <uv.h>

/* Query outcomes (struct dns_result.status). */
#define DNS_OK 0
#define DNS_ENOTFOUND (-1)     /* NXDOMAIN: the name does not exist */
#define DNS_ENODATA (-2)       /* the name exists, without records of the type */
#define DNS_ETIMEOUT (-3)      /* no answer from any server in time */
#define DNS_ESERVFAIL (-4)     /* the server failed (SERVFAIL) */
#define DNS_EREFUSED (-5)      /* the server refused (REFUSED) */
#define DNS_EBADRESP (-6)      /* malformed answer or query */
#define DNS_ECONNREFUSED (-7)  /* no server could be reached */
#define DNS_EBADNAME (-8)      /* the name cannot be queried */
#define DNS_ECANCELLED (-9)    /* dns_close() was called */
#define DNS_EOTHER (-10)

enum dns_type { DNS_T_A = 0, DNS_T_AAAA, DNS_T_TXT, DNS_T_PTR, DNS_T_MX };

struct dns_addr {
    int family;                       /* AF_INET or AF_INET6 */
    union {
        struct in_addr v4;
        struct in6_addr v6;
    } u;
    char text[INET6_ADDRSTRLEN];
};

struct dns_txt {
    char *data;                       /* NUL-terminated (may hold NULs) */
    size_t len;                       /* without the terminating NUL */
};

struct dns_mx {
    unsigned preference;
    char *host;                       /* "" for a null MX */
};

struct dns_result {
    int status;                       /* DNS_OK or a DNS_E* code */
    enum dns_type type;
    char *name;                       /* the name queried */
    size_t n;                         /* entries in the array of the type */
    struct dns_addr *addrs;           /* DNS_T_A, DNS_T_AAAA */
    struct dns_txt *txts;             /* DNS_T_TXT */
    char **names;                     /* DNS_T_PTR */
    struct dns_mx *mxs;               /* DNS_T_MX */
};

typedef void (*dns_cb)(const struct dns_result *r, void *arg);

struct dns_options {
    const char *servers;              /* NULL or "": /etc/resolv.conf */
    int timeout_ms;                   /* per try; <= 0: 5000 */
    int tries;                        /* per server; <= 0: 2 */
};

struct dns;

/*
 * Creates a resolver on loop. Returns NULL with a message in err when
 * c-ares cannot start or the server list does not parse.
 */
struct dns *dns_new(uv_loop_t *loop, const struct dns_options *opts, char *err, size_t errlen);

/*
 * Starts a query for name (without or with a trailing dot). cb is called
 * exactly once, from the loop, never from inside this call (a name that
 * cannot be queried fails with DNS_EBADNAME on the next loop iteration).
 * After dns_close() every new query fails with DNS_ECANCELLED.
 */
void dns_query(struct dns *d, const char *name, enum dns_type type, dns_cb cb, void *arg);

/* Queries whose callback has not been made yet. */
size_t dns_pending(const struct dns *d);

/*
 * Cancels every pending query (each callback gets DNS_ECANCELLED, from the
 * loop), closes the sockets and handles, frees the resolver and then calls
 * on_closed(arg) (may be NULL) from the loop. Safe inside a callback.
 */
void dns_close(struct dns *d, void (*on_closed)(void *arg), void *arg);

/* A short name for a status: "ok", "nxdomain", "nodata", "timeout",
 * "servfail", "refused", "badresp", "connrefused", "badname",
 * "cancelled", "error". */
const char *dns_strerror(int status);

/*
 * Writes the reverse name of the address ip (text, IPv4 or IPv6) under
 * zone into out: with zone NULL, the PTR name "4.3.2.1.in-addr.arpa" (RFC
 * 1035 section 3.5) or the nibble form under "ip6.arpa" (RFC 3596 section
 * 2.5); with a zone, the DNSBL query name "4.3.2.1.<zone>" (RFC 5782
 * section 2.1 and 2.4). Returns 0, or -1 when ip is not an address or out
 * is too small.
 */
int dns_reverse_name(const char *ip, const char *zone, char *out, size_t n);

/* A deep copy of r (for keeping a result past its callback), released
 * with dns_result_free(). */
struct dns_result *dns_result_dup(const struct dns_result *r);
void dns_result_free(struct dns_result *r);

#endif
