/*
 * job: the delivery of one queued message, from the stream entry to its
 * acknowledgement.
 *
 *   load msg:<id> -> group the recipients still pending by destination
 *   domain -> per group: router_choose() (policy + caps), transport send,
 *   record the outcome (recipient states are in Redis before anything else
 *   happens) -> when every group is done: bounce new failures, then either
 *   schedule the retry or delete the message, acknowledging the entry in
 *   the same MULTI/EXEC.
 *
 * On a Redis failure the job gives up without acknowledging: the entry
 * stays pending and is claimed again after [router] claim_idle, and the
 * recipients whose state was written are not sent again.
 */
#ifndef MF_JOB_H
#define MF_JOB_H

#include "router/router.h"
#include "router/store.h"

struct job;

/* Starts delivering the entry. The job calls router_job_done() when over
 * and frees itself after that call returns. */
struct job *job_start(struct router *r, const struct store_entry *e);

/* The stream entry id, for the router's heartbeat (store_touch). */
const char *job_stream_id(const struct job *j);

#endif
