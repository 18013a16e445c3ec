/*
 * ctl_list: the read-only views of single messages in the queue,
 * `mailferryctl queue list` and `mailferryctl queue show ID` (docs/ctl.md).
 *
 * A message is queued while it has an entry in <prefix>ready that no
 * router acknowledged (unread, or pending in the group "routers": in
 * flight) or a member in <prefix>retry. Both commands walk these in that
 * order (in flight, ready, retry) and read the messages with ctl_msg.
 * Nothing is written. Each function returns a CTL_EXIT_* code and prints
 * its own messages.
 */
#ifndef MF_CTL_LIST_H
#define MF_CTL_LIST_H

#include <stdint.h>

#include "ctl/ctl.h"

/* Default and largest number of messages `queue list` prints. */
#define CTL_LIST_LIMIT 100
#define CTL_LIST_LIMIT_MAX 1000000

/* Default and largest number of stream entries `queue show` examines in
 * each of <prefix>events, <prefix>dead and the ready stream. */
#define CTL_SHOW_SCAN 10000
#define CTL_SHOW_SCAN_MAX 10000000

struct ctl_list_opts {
    const char *route;        /* only messages with a recipient last tried
                                 on this route; NULL: all */
    int64_t older_ms;         /* only messages created at least this long
                                 ago; 0: all */
    long long limit;          /* print at most this many */
};

int ctl_queue_list(struct ctl *c, const struct ctl_list_opts *o);

/* Prints the envelope, the state of every recipient, where the message
 * is in the queue and its attempt history from <prefix>events, examining
 * at most scan entries of each stream. A missing message is an error
 * (CTL_EXIT_RUNTIME, "no such message"). */
int ctl_queue_show(struct ctl *c, const char *id, long long scan);

#endif
