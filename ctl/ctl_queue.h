/*
 * ctl_queue: `mailferryctl queue`, a read-only summary of the queue in
 * Redis (lib/schema.h names every key it reads):
 *
 *   ready      entries of <prefix>ready no router has read yet (the lag of
 *              the consumer group "routers")
 *   in flight  entries read by a router and not yet acknowledged (the
 *              group's pending entries)
 *   retry      members of <prefix>retry, and when the next one is due
 *   dead       entries of <prefix>dead
 *   oldest     the age of the oldest message, approximated from the first
 *              unread entry, the oldest pending entry and the retry member
 *              due first (docs/ctl.md explains the approximation)
 *   routes     delivered, deferred, bounced and held recipients per route
 *              over the current and the previous UTC hour, with each route's
 *              share of the deliveries
 *
 * Nothing is written. Returns a CTL_EXIT_* code.
 */
#ifndef MF_CTL_QUEUE_H
#define MF_CTL_QUEUE_H

#include "ctl/ctl.h"

int ctl_queue(struct ctl *c);

#endif
