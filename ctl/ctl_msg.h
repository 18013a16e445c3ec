/*
 * ctl_msg: a queued message as mailferryctl reads it from msg:<id>
 * (lib/schema.h, docs/queue.md): the gateway's fields without the message
 * bytes, the router's bookkeeping, and each recipient's state (field
 * st:<index>, absent until the router first tried the recipient).
 *
 * Messages are read in batches with pipelining: one HMGET of the fixed
 * fields per message, then one HMGET of the state fields per message
 * (their names follow from the number of recipients). The message bytes
 * (field data) are never read, so listing a queue of large messages costs
 * no more than listing one of small ones.
 */
#ifndef MF_CTL_MSG_H
#define MF_CTL_MSG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ctl/ctl.h"

/* One recipient. Strings are never NULL ("" when absent). */
struct ctl_rcpt {
    char *addr;
    char *raw;                /* field st:<index> as stored; NULL when absent */
    char state[16];           /* pending, deferred, delivered, failed; "pending"
                                 without a state; "?" when raw is unreadable */
    long long code;           /* last reply code, 0 when none */
    char *enh;                /* enhanced status code (RFC 3463) */
    char *text;               /* last reply text */
    char *route;              /* route of the last attempt */
    char *remote;             /* who answered */
    int64_t t;                /* time of the last attempt (ms), 0 when none */
    long long attempts;
    bool bounced;             /* a bounce (or a dead entry) was made for it */
};

struct ctl_msg {
    char *id;
    bool found;               /* the hash holds a message (field rcpts) */
    char *from, *client_ip, *helo, *auth_user, *cls, *gateway;
    long long size;
    int64_t created;          /* ms; 0 when absent */
    long long attempts;
    int64_t next_attempt;     /* ms; 0 when absent */
    struct ctl_rcpt *rcpts;
    size_t nrcpts;
};

/* Prepares m for ctl_msg_load(): a copy of id, nothing loaded. */
void ctl_msg_init(struct ctl_msg *m, const char *id);

/* Releases everything m holds (m itself is the caller's). */
void ctl_msg_clear(struct ctl_msg *m);

/* Loads the n messages of v (prepared with ctl_msg_init()). A message
 * that does not exist has found false. Returns 0 or CTL_EXIT_RUNTIME. */
int ctl_msg_load(struct ctl *c, struct ctl_msg *v, size_t n);

/* Whether the router will try the recipient again: no state yet, pending
 * or deferred. An unreadable state counts as not final either, as it does
 * for the router. */
bool ctl_rcpt_open(const struct ctl_rcpt *r);

/* The number of recipients of m whose state is state ("pending" counts
 * recipients without a state too). */
size_t ctl_msg_count(const struct ctl_msg *m, const char *state);

/* The number of recipients of m the router will try again. */
size_t ctl_msg_open(const struct ctl_msg *m);

/* The route of m's most recent attempt, "" when none was made. */
const char *ctl_msg_last_route(const struct ctl_msg *m);

/* The sender as shown to operators: "<>" for the null sender. */
const char *ctl_sender(const char *from);

#endif
