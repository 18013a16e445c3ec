/*
 * ctl_ops: the operator's changes to single messages, and the dead-letter
 * stream (docs/ctl.md):
 *
 *   queue delete ID       removes msg:<id>, its retry member and the dead
 *                         entries naming it
 *   queue retry ID|--all  moves retry members to the ready stream now
 *   dead list             the entries of <prefix>dead, newest first
 *   dead requeue ID|--all resets the failed recipients of dead messages to
 *                         pending and queues them again
 *
 * Every change is one atomic step in Redis (MULTI/EXEC, optimistic with
 * WATCH where it depends on what was read, or a Lua script), so a router
 * working at the same time sees the message before or after it, never
 * half-changed. Each function returns a CTL_EXIT_* code and prints its own
 * messages; an id that names no message is CTL_EXIT_NOT_FOUND.
 */
#ifndef MF_CTL_OPS_H
#define MF_CTL_OPS_H

#include "ctl/ctl.h"

/* Default and largest number of entries `dead list` prints. */
#define CTL_DEAD_LIMIT 100
#define CTL_DEAD_LIMIT_MAX 1000000

int ctl_queue_delete(struct ctl *c, const char *id);

/* id NULL: every member of <prefix>retry. */
int ctl_queue_retry(struct ctl *c, const char *id);

int ctl_dead_list(struct ctl *c, long long limit);

/* id NULL: every message named in <prefix>dead. */
int ctl_dead_requeue(struct ctl *c, const char *id);

#endif
