/*
 * ctl_policy: `mailferryctl policy get|set|reset`, the live overrides of
 * the routing policy in the Redis hash <prefix>policy (docs/policy.md,
 * docs/ctl.md).
 *
 * The base policy is built from the configuration file exactly as the
 * router builds it (router/policy_load.h), and every change is validated
 * the way the routers will apply it: a clone of the base, every field of
 * the hash laid over it with policy_config_set(), then
 * policy_config_check(). A change that would be rejected is not written,
 * so the routers never see a hash they refuse. Writes are optimistic
 * transactions (WATCH/MULTI/EXEC) on the hash, so two operators changing
 * the policy at once cannot combine into a policy neither validated.
 *
 * Each function returns a CTL_EXIT_* code and prints its own messages.
 */
#ifndef MF_CTL_POLICY_H
#define MF_CTL_POLICY_H

#include <stdbool.h>

#include "ctl/ctl.h"
#include "router/policy.h"

/* Prints the effective policy (every key, or only key when not NULL) with
 * the source of each value: "live", "file" or "default". */
int ctl_policy_get(struct ctl *c, const char *key);

/*
 * Validates and writes n live overrides keys[i] = values[i] (n >= 1), all
 * or none, each stored in canonical form. Several keys at once allow
 * changes that are only valid together (warmup_start with warmup_caps).
 */
int ctl_policy_set(struct ctl *c, size_t n, const char **keys, const char **values);

/* Removes the live overrides of the n keys, all or none, or every
 * override when n is 0. */
int ctl_policy_reset(struct ctl *c, size_t n, const char **keys);

/*
 * `route suspend NAME` (suspend true) sets the live override
 * route.<NAME>.enabled = no; `route resume NAME` removes it, so the file's
 * value applies again. Both go through the validation of policy set and
 * reset; a name that is not a route of the configuration file is
 * CTL_EXIT_USAGE. Prints the route's state afterwards and where it comes
 * from (a file that disables the route keeps it disabled after resume).
 */
int ctl_route_suspend(struct ctl *c, const char *name, bool suspend);

/*
 * The policy the routers use: the file's, with the live overrides of
 * <prefix>policy laid over it. When the routers reject the hash a warning
 * is printed and the file's policy is returned, as the routers keep the
 * last policy they accepted. Connects to Redis. Returns the config (the
 * caller frees it with policy_config_free()), or NULL with *rc set to a
 * CTL_EXIT_* code after printing why.
 */
struct policy_config *ctl_policy_effective(struct ctl *c, int *rc);

#endif
