/*
 * cidr: lists of IPv4 and IPv6 networks in CIDR notation, and matching a
 * peer address against them.
 */
#ifndef MF_CIDR_H
#define MF_CIDR_H

#include <stddef.h>
#include <sys/socket.h>

struct cidr {
    int family;               /* AF_INET or AF_INET6 */
    unsigned char addr[16];   /* network address, host bits zeroed */
    unsigned prefix;          /* 0..32 or 0..128 */
};

struct cidr_list {
    struct cidr *v;
    size_t n;
};

/*
 * Parses a list separated by commas and/or whitespace: "127.0.0.0/8,
 * ::1, 10.0.0.0/8". An address without "/len" is a host (/32 or /128).
 * Host bits set in the address are an error (say "10.0.0.1/8" is almost
 * certainly a typo). An empty string gives an empty list. On error returns
 * -1 and writes a message naming the bad element into err; out is left
 * empty. Replaces whatever out held (it must be initialised or zeroed).
 */
int cidr_list_parse(const char *s, struct cidr_list *out, char *err, size_t errlen);

/* Returns 1 when sa (AF_INET or AF_INET6) lies in one of the networks.
 * An IPv4-mapped IPv6 address (::ffff:a.b.c.d) matches IPv4 networks. */
int cidr_list_match(const struct cidr_list *l, const struct sockaddr *sa);

void cidr_list_free(struct cidr_list *l);

#endif
