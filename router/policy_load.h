/*
 * policy_load: builds the routing policy from the configuration file, the
 * same way for every program that needs it (the router at start and for
 * --check-config, mailferryctl to validate live overrides against the
 * file's policy).
 *
 * The [route NAME] sections and the [policy] section of cfg (cfg->named)
 * go through policy_config_set_route() and policy_config_set() in file
 * order; a route key the policy answers POLICY_E_NOT_POLICY for belongs to
 * the route's transport, a [policy] key it does not know is an error. The
 * result is checked as a whole (policy_config_check()) and its routes are
 * frozen (policy_config_freeze_routes()), as router/policy.h prescribes.
 */
#ifndef MF_POLICY_LOAD_H
#define MF_POLICY_LOAD_H

#include <stddef.h>

#include "lib/config.h"
#include "router/policy.h"

/* The keys of one [route NAME] section that are not the policy's: the
 * transport's settings. v points at entries copied from cfg->named, whose
 * strings stay owned by the mf_config. */
struct policy_load_route_keys {
    struct config_named *v;
    size_t n;
};

/*
 * Builds the frozen policy of cfg. Returns it (the caller frees it with
 * policy_config_free()), or NULL with one line in err naming the file,
 * section and key, e.g. "conf/x.conf: [route relay] route.relay.cap_minute:
 * must be an integer ...".
 *
 * When keys is not NULL, *keys receives an array with one entry per route
 * of the policy, in its route order, holding that route's transport keys
 * in file order; release it with policy_load_keys_free(*keys,
 * policy_route_count(policy)). On error *keys is left untouched.
 */
struct policy_config *policy_load(const struct mf_config *cfg,
                                  struct policy_load_route_keys **keys, char *err,
                                  size_t errlen);

/* Releases an array returned by policy_load() for n routes. NULL is
 * allowed. The config entries it points at are not touched. */
void policy_load_keys_free(struct policy_load_route_keys *keys, size_t n);

#endif
