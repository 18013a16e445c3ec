/*
 * ctl_stats: `mailferryctl stats`, how each route is doing, read-only
 * (docs/ctl.md):
 *
 *   recipients  delivered, deferred, bounced per route over the last
 *               hours UTC hours (stats:<route>:<hour>), each route's share
 *               of the deliveries (the split as it happened), and the
 *               groups held by the policy
 *   live rates  the reputation window of each route (win:<route>:...,
 *               laid out as router/store.c writes it) against the
 *               thresholds of the effective policy (bounce_rate_max,
 *               deferral_rate_max, complaint_rate_max, min_samples)
 *   breakers    brk:<route>, the route-wide circuit breaker
 *   health      health:<route>, as a router last recorded it
 *   caps        cnt:<route>:<m|h|d>:<bucket> against the caps of the
 *               effective policy (the day cap with the warm-up applied)
 *
 * The thresholds and caps are those of the effective policy: the file's
 * with the live overrides (ctl_policy_effective()). Returns a CTL_EXIT_*
 * code.
 */
#ifndef MF_CTL_STATS_H
#define MF_CTL_STATS_H

#include "ctl/ctl.h"

/* Default and largest number of UTC hours summed (stats:<route>:<hour>
 * hashes live two days, router/store.c). */
#define CTL_STATS_HOURS 2
#define CTL_STATS_HOURS_MAX 48

int ctl_stats(struct ctl *c, int hours);

#endif
