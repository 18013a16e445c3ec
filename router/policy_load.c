#include "router/policy_load.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/xmalloc.h"

struct policy_config *policy_load(const struct mf_config *cfg,
                                  struct policy_load_route_keys **keys, char *err,
                                  size_t errlen)
{
    const char *path = cfg->path ? cfg->path : "config";
    struct policy_config *pc = policy_config_new();
    struct policy_load_route_keys *kv;
    char why[512];
    size_t n;

    for (size_t i = 0; i < cfg->nnamed; i++) {
        const struct config_named *e = &cfg->named[i];
        int rc;
        if (strcmp(e->kind, "route") == 0) {
            rc = policy_config_set_route(pc, e->name, e->key, e->value, why, sizeof(why));
            if (rc == POLICY_E_NOT_POLICY)
                continue;
        } else if (strcmp(e->kind, "policy") == 0) {
            rc = policy_config_set(pc, e->key, e->value, why, sizeof(why));
            if (rc == POLICY_E_NOT_POLICY)
                snprintf(why, sizeof(why), "%s: unknown policy key", e->key);
        } else {
            snprintf(err, errlen, "%s: [%s %s]: unknown section kind \"%s\"", path, e->kind,
                     e->name, e->kind);
            policy_config_free(pc);
            return NULL;
        }
        if (rc != POLICY_OK) {
            snprintf(err, errlen, "%s: [%s%s%s] %s", path, e->kind, e->name[0] ? " " : "",
                     e->name, why);
            policy_config_free(pc);
            return NULL;
        }
    }
    if (policy_config_check(pc, why, sizeof(why)) != POLICY_OK) {
        snprintf(err, errlen, "%s: routing policy: %s", path, why);
        policy_config_free(pc);
        return NULL;
    }
    policy_config_freeze_routes(pc);
    if (keys == NULL)
        return pc;

    n = policy_route_count(pc);
    kv = xcalloc(n ? n : 1, sizeof(*kv));
    for (size_t i = 0; i < cfg->nnamed; i++) {
        const struct config_named *e = &cfg->named[i];
        struct buf k = BUF_INIT;
        char probe[256];
        int ri, rc;

        if (strcmp(e->kind, "route") != 0)
            continue;
        ri = policy_route_find(pc, e->name);
        if (ri < 0)
            continue;
        /* A key the policy takes is not the transport's. */
        buf_appendf(&k, "route.%s.%s", e->name, e->key);
        rc = policy_config_get(pc, k.data, probe, sizeof(probe));
        buf_free(&k);
        if (rc != POLICY_E_NOT_POLICY)
            continue;
        kv[ri].v = xrealloc(kv[ri].v, (kv[ri].n + 1) * sizeof(struct config_named));
        kv[ri].v[kv[ri].n++] = *e;
    }
    *keys = kv;
    return pc;
}

void policy_load_keys_free(struct policy_load_route_keys *keys, size_t n)
{
    if (keys == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        free(keys[i].v);
    free(keys);
}
