#include "ctl/ctl_policy.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/schema.h"
#include "lib/xmalloc.h"
#include "router/policy.h"
#include "router/policy_load.h"

/* Optimistic transactions retried this many times before giving up. */
#define CTL_POLICY_ATTEMPTS 10

/* Values up to this length set the width of the VALUE column; longer
 * ones are printed in full and push their SOURCE to the right. */
#define CTL_VALUE_COL_MAX 40

/* One field of the hash <prefix>policy as read, with the key the policy
 * module will make of it (blanks trimmed, lower case). */
struct ctl_field {
    char *raw;
    char *value;
    char *canon;
};

struct ctl_live {
    struct ctl_field *v;
    size_t n;
};

/* One key of a policy_config_list() walk. */
struct ctl_row {
    char *key;
    char *value;
    bool is_set;
    const char *source;       /* filled by ctl_policy_get() */
};

struct ctl_rows {
    struct ctl_row *v;
    size_t n, cap;
};

/* One key of a set or reset command. */
struct ctl_change {
    char *canon;              /* the key, canonical */
    const char *value;        /* set: as given; reset: NULL */
    char *written;            /* set: canonical value; reset: the value now */
    size_t matching;          /* reset: hash fields that mean this key */
};

/* ---- helpers ------------------------------------------------------------- */

/* The key as policy_config_set() reads it: ASCII blanks around it removed
 * and letters in lower case (keys are case-insensitive, docs/policy.md). */
static char *ctl_canon_key(const char *s)
{
    size_t len;
    char *d;

    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')
        s++;
    len = strlen(s);
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\r' ||
                   s[len - 1] == '\n'))
        len--;
    d = xstrndup(s, len);
    for (size_t i = 0; i < len; i++)
        if (d[i] >= 'A' && d[i] <= 'Z')
            d[i] = (char)(d[i] - 'A' + 'a');
    return d;
}

static void ctl_rows_add(void *ctx, const char *key, const char *value, bool is_set)
{
    struct ctl_rows *rows = ctx;

    if (rows->n == rows->cap) {
        rows->cap = rows->cap ? rows->cap * 2 : 64;
        rows->v = xrealloc(rows->v, rows->cap * sizeof(*rows->v));
    }
    rows->v[rows->n].key = xstrdup(key);
    rows->v[rows->n].value = xstrdup(value);
    rows->v[rows->n].is_set = is_set;
    rows->v[rows->n].source = NULL;
    rows->n++;
}

static void ctl_rows_collect(const struct policy_config *pc, struct ctl_rows *rows)
{
    policy_config_list(pc, ctl_rows_add, rows);
}

static void ctl_rows_free(struct ctl_rows *rows)
{
    for (size_t i = 0; i < rows->n; i++) {
        free(rows->v[i].key);
        free(rows->v[i].value);
    }
    free(rows->v);
    memset(rows, 0, sizeof(*rows));
}

static struct ctl_row *ctl_rows_find(const struct ctl_rows *rows, const char *key)
{
    for (size_t i = 0; i < rows->n; i++)
        if (strcmp(rows->v[i].key, key) == 0)
            return &rows->v[i];
    return NULL;
}

static void ctl_live_free(struct ctl_live *live)
{
    for (size_t i = 0; i < live->n; i++) {
        free(live->v[i].raw);
        free(live->v[i].value);
        free(live->v[i].canon);
    }
    free(live->v);
    memset(live, 0, sizeof(*live));
}

static bool ctl_live_has(const struct ctl_live *live, const char *canon)
{
    for (size_t i = 0; i < live->n; i++)
        if (strcmp(live->v[i].canon, canon) == 0)
            return true;
    return false;
}

/* Reads the hash of live overrides. Returns 0 or CTL_EXIT_RUNTIME. */
static int ctl_live_read(struct ctl *c, const char *hkey, struct ctl_live *live)
{
    redisReply *r = ctl_redis_ok(c, "HGETALL", hkey, NULL);

    memset(live, 0, sizeof(*live));
    if (r == NULL)
        return CTL_EXIT_RUNTIME;
    if (r->type != REDIS_REPLY_ARRAY || r->elements % 2 != 0) {
        ctl_error("Redis at %s: HGETALL %s: unexpected reply", c->where, hkey);
        freeReplyObject(r);
        return CTL_EXIT_RUNTIME;
    }
    live->v = xcalloc(r->elements / 2 + 1, sizeof(*live->v));
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *f = r->element[i], *v = r->element[i + 1];
        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        /* Fields are binary-safe in Redis but keys and values of the
         * policy are text: an embedded NUL ends them, as for the router. */
        live->v[live->n].raw = xstrndup(f->str, f->len);
        live->v[live->n].value = xstrndup(v->str, v->len);
        live->v[live->n].canon = ctl_canon_key(live->v[live->n].raw);
        live->n++;
    }
    freeReplyObject(r);
    return 0;
}

static bool ctl_changes_have(const struct ctl_change *ch, size_t n, const char *canon)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(ch[i].canon, canon) == 0)
            return true;
    return false;
}

/*
 * What the routers compute: a clone of base with every live field applied
 * except those whose key is one of the n changes, then the values of the
 * changes (when apply is true), then the whole checked. Returns the config,
 * or NULL with the policy module's message in err and, when a field of the
 * hash was refused on its own, that field in *bad (if bad is not NULL).
 */
static struct policy_config *ctl_overlay(const struct policy_config *base,
                                         const struct ctl_live *live,
                                         const struct ctl_change *ch, size_t n, bool apply,
                                         const struct ctl_field **bad, char *err,
                                         size_t errlen)
{
    struct policy_config *pc = policy_config_clone(base);

    if (bad != NULL)
        *bad = NULL;
    for (size_t i = 0; i < live->n; i++) {
        const struct ctl_field *f = &live->v[i];
        if (ctl_changes_have(ch, n, f->canon))
            continue;
        if (policy_config_set(pc, f->raw, f->value, err, errlen) != POLICY_OK) {
            if (bad != NULL)
                *bad = f;
            goto fail;
        }
    }
    for (size_t i = 0; apply && i < n; i++)
        if (policy_config_set(pc, ch[i].canon, ch[i].value, err, errlen) != POLICY_OK)
            goto fail;
    if (policy_config_check(pc, err, errlen) != POLICY_OK)
        goto fail;
    return pc;

fail:
    policy_config_free(pc);
    return NULL;
}

/* Builds the file's policy as the router does. Returns it, or NULL after
 * printing why. */
static struct policy_config *ctl_base(struct ctl *c)
{
    char err[1024];
    struct policy_config *pc = policy_load(&c->cfg, NULL, err, sizeof(err));

    if (pc == NULL)
        ctl_error("%s", err);
    return pc;
}

/*
 * The canonical value of key in pc: from the listing when the key is in
 * it, else what policy_config_get() answers (e.g. "none" for a pin that
 * is not set). Returns a new string, or NULL when the key is not valid;
 * then the policy module's message is in err.
 */
static char *ctl_value(const struct policy_config *pc, const struct ctl_rows *rows,
                       const char *key, int *rc, char *err, size_t errlen)
{
    const struct ctl_row *row = ctl_rows_find(rows, key);

    *rc = policy_config_get(pc, key, err, errlen);
    if (*rc != POLICY_OK)
        return NULL;
    if (row != NULL)
        return xstrdup(row->value);
    return xstrdup(err);
}

/* "file" when the file set key, else "default". */
static const char *ctl_file_source(const struct ctl_rows *base_rows, const char *key)
{
    const struct ctl_row *row = ctl_rows_find(base_rows, key);

    return row != NULL && row->is_set ? "file" : "default";
}

/* A hint for keys the policy does not own. */
static void ctl_not_policy(const char *key, const char *msg)
{
    if (strncmp(key, "route.", 6) == 0)
        ctl_error("%s (transport settings are read from the configuration file only)", msg);
    else
        ctl_error("%s", msg);
}

/* ---- get ----------------------------------------------------------------- */

static void ctl_print_table(const struct ctl_row *v, size_t n)
{
    int kw = 3, vw = 5;

    for (size_t i = 0; i < n; i++) {
        int kl = (int)strlen(v[i].key), vl = (int)strlen(v[i].value);
        if (kl > kw)
            kw = kl;
        if (vl > vw && vl <= CTL_VALUE_COL_MAX)
            vw = vl;
    }
    printf("%-*s  %-*s  %s\n", kw, "KEY", vw, "VALUE", "SOURCE");
    for (size_t i = 0; i < n; i++)
        printf("%-*s  %-*s  %s\n", kw, v[i].key, vw, v[i].value, v[i].source);
}

static void ctl_print_json(const struct ctl_row *v, size_t n)
{
    json_t *o = json_object();
    char *s;

    for (size_t i = 0; i < n; i++) {
        json_t *e = json_object();
        json_object_set_new(e, "value", ctl_json_string(v[i].value));
        json_object_set_new(e, "source", json_string(v[i].source));
        ctl_json_set(o, v[i].key, e);
    }
    s = json_dumps(o, JSON_PRESERVE_ORDER | JSON_INDENT(2));
    printf("%s\n", s);
    free(s);
    json_decref(o);
}

int ctl_policy_get(struct ctl *c, const char *key)
{
    struct policy_config *base, *eff;
    struct ctl_live live;
    struct ctl_rows base_rows = {0}, rows = {0};
    char *hkey, err[1024];
    bool live_ok = true;
    int rc;

    base = ctl_base(c);
    if (base == NULL)
        return CTL_EXIT_USAGE;
    rc = ctl_redis_connect(c);
    if (rc != 0) {
        policy_config_free(base);
        return rc;
    }
    hkey = ctl_key(c, SCHEMA_POLICY);
    rc = ctl_live_read(c, hkey, &live);
    if (rc != 0) {
        free(hkey);
        policy_config_free(base);
        return rc;
    }
    eff = ctl_overlay(base, &live, NULL, 0, false, NULL, err, sizeof(err));
    if (eff == NULL) {
        ctl_error("warning: routers reject the live overrides in %s: %s; showing the file's "
                  "policy (routers keep the last policy they accepted)", hkey, err);
        live_ok = false;
        eff = policy_config_clone(base);
    }
    ctl_rows_collect(base, &base_rows);
    ctl_rows_collect(eff, &rows);

    if (key != NULL) {
        char *canon = ctl_canon_key(key);
        int grc;
        char *value = ctl_value(eff, &rows, canon, &grc, err, sizeof(err));
        if (value == NULL) {
            if (grc == POLICY_E_NOT_POLICY)
                ctl_not_policy(canon, err);
            else
                ctl_error("%s", err);
            rc = CTL_EXIT_USAGE;
        } else {
            struct ctl_row row = {canon, value, true, NULL};
            row.source = live_ok && ctl_live_has(&live, canon) ? "live"
                                                               : ctl_file_source(&base_rows, canon);
            if (c->json)
                ctl_print_json(&row, 1);
            else
                ctl_print_table(&row, 1);
            free(value);
        }
        free(canon);
    } else {
        for (size_t i = 0; i < rows.n; i++) {
            struct ctl_row *row = &rows.v[i];
            row->source = live_ok && ctl_live_has(&live, row->key)
                              ? "live"
                              : ctl_file_source(&base_rows, row->key);
        }
        /* A live override that removes a pin, split or domain cap of the
         * file leaves no key in the listing; show it anyway. */
        for (size_t i = 0; live_ok && i < live.n; i++) {
            const char *k = live.v[i].canon;
            int grc;
            char *value;
            if (ctl_rows_find(&rows, k) != NULL)
                continue;
            value = ctl_value(eff, &rows, k, &grc, err, sizeof(err));
            if (value == NULL)
                continue;
            ctl_rows_add(&rows, k, value, true);
            rows.v[rows.n - 1].source = "live";
            free(value);
        }
        if (c->json)
            ctl_print_json(rows.v, rows.n);
        else
            ctl_print_table(rows.v, rows.n);
    }

    ctl_rows_free(&rows);
    ctl_rows_free(&base_rows);
    ctl_live_free(&live);
    policy_config_free(eff);
    policy_config_free(base);
    free(hkey);
    return rc;
}

/* ---- set and reset ------------------------------------------------------- */

/* Starts WATCH on hkey and reads it. Returns 0 or CTL_EXIT_RUNTIME. */
static int ctl_watch_read(struct ctl *c, const char *hkey, struct ctl_live *live)
{
    redisReply *r = ctl_redis_ok(c, "WATCH", hkey, NULL);

    if (r == NULL) {
        memset(live, 0, sizeof(*live));
        return CTL_EXIT_RUNTIME;
    }
    freeReplyObject(r);
    return ctl_live_read(c, hkey, live);
}

/* Reports a key the policy refuses, with policy_config_set()'s answer. */
static void ctl_refused(const char *canon, int rc, const char *err)
{
    if (rc == POLICY_E_NOT_POLICY)
        ctl_not_policy(canon, err);
    else
        ctl_error("%s", err);
}

/*
 * One attempt at writing the n changes: validates them against the file
 * and the current hash, then replaces every field that means one of the
 * keys with the canonical one, in one transaction. Returns CTL_EXIT_*, or
 * -1 when the hash changed under the WATCH (try again). Fills written.
 */
static int ctl_set_once(struct ctl *c, const struct policy_config *base, const char *hkey,
                        struct ctl_change *ch, size_t n)
{
    const struct ctl_field *bad;
    struct ctl_live live;
    struct ctl_rows rows = {0};
    struct policy_config *pc;
    char err[1024];
    int rc, grc;

    rc = ctl_watch_read(c, hkey, &live);
    if (rc != 0)
        return rc;

    /* Each key alone first, so that its own error is the one reported. */
    for (size_t i = 0; i < n; i++) {
        pc = policy_config_clone(base);
        grc = policy_config_set(pc, ch[i].canon, ch[i].value, err, sizeof(err));
        policy_config_free(pc);
        if (grc != POLICY_OK) {
            ctl_refused(ch[i].canon, grc, err);
            rc = CTL_EXIT_USAGE;
            goto out_unwatch;
        }
    }
    pc = ctl_overlay(base, &live, ch, n, true, &bad, err, sizeof(err));
    if (pc == NULL) {
        if (bad != NULL)
            ctl_error("%s (a live override already stored in %s; remove it with "
                      "\"mailferryctl policy reset %s\")", err, hkey, bad->canon);
        else
            ctl_error("%s", err);
        rc = CTL_EXIT_USAGE;
        goto out_unwatch;
    }
    ctl_rows_collect(pc, &rows);
    for (size_t i = 0; i < n && rc == 0; i++) {
        free(ch[i].written);
        ch[i].written = ctl_value(pc, &rows, ch[i].canon, &grc, err, sizeof(err));
        if (ch[i].written == NULL) {
            ctl_refused(ch[i].canon, grc, err);
            rc = CTL_EXIT_USAGE;
        }
    }
    ctl_rows_free(&rows);
    policy_config_free(pc);
    if (rc != 0)
        goto out_unwatch;

    rc = ctl_multi_begin(c);
    if (rc != 0)
        goto out;
    for (size_t i = 0; i < live.n && rc == 0; i++) {
        /* Fields spelled differently that mean one of the keys go away, so
         * that the hash holds each key once. */
        if (ctl_changes_have(ch, n, live.v[i].canon) &&
            strcmp(live.v[i].raw, live.v[i].canon) != 0)
            rc = ctl_multi_queue(c, ctl_redis_cmd(c, "HDEL", hkey, live.v[i].raw, NULL));
    }
    for (size_t i = 0; i < n && rc == 0; i++)
        rc = ctl_multi_queue(c, ctl_redis_cmd(c, "HSET", hkey, ch[i].canon, ch[i].written, NULL));
    rc = ctl_multi_end(c, rc, NULL);
    goto out;

out_unwatch:
    ctl_unwatch(c);
out:
    ctl_live_free(&live);
    return rc;
}

/* Turns the keys of a command into changes; refuses a key given twice.
 * Returns 0 or CTL_EXIT_USAGE. */
static int ctl_changes_new(size_t n, const char **keys, const char **values,
                           struct ctl_change **out)
{
    struct ctl_change *ch = xcalloc(n ? n : 1, sizeof(*ch));

    for (size_t i = 0; i < n; i++) {
        ch[i].canon = ctl_canon_key(keys[i]);
        ch[i].value = values ? values[i] : NULL;
        if (ctl_changes_have(ch, i, ch[i].canon)) {
            ctl_error("%s: given more than once", ch[i].canon);
            *out = ch;
            return CTL_EXIT_USAGE;
        }
    }
    *out = ch;
    return 0;
}

static void ctl_changes_free(struct ctl_change *ch, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(ch[i].canon);
        free(ch[i].written);
    }
    free(ch);
}

/* Loads the base policy, connects and names the hash: what set and reset
 * with keys need. Returns 0 or a CTL_EXIT_* code. */
static int ctl_prepare(struct ctl *c, struct policy_config **base, char **hkey)
{
    int rc;

    *base = ctl_base(c);
    if (*base == NULL)
        return CTL_EXIT_USAGE;
    rc = ctl_redis_connect(c);
    if (rc != 0) {
        policy_config_free(*base);
        *base = NULL;
        return rc;
    }
    *hkey = ctl_key(c, SCHEMA_POLICY);
    return 0;
}

/* ctl_set_once() until no other writer intervened, at most
 * CTL_POLICY_ATTEMPTS times. Returns a CTL_EXIT_* code. */
static int ctl_set_retry(struct ctl *c, const struct policy_config *base, const char *hkey,
                         struct ctl_change *ch, size_t n)
{
    int rc = -1;

    for (int attempt = 0; attempt < CTL_POLICY_ATTEMPTS && rc == -1; attempt++)
        rc = ctl_set_once(c, base, hkey, ch, n);
    if (rc == -1) {
        ctl_error("%s changed during each of %d attempts; nothing written, try again", hkey,
                  CTL_POLICY_ATTEMPTS);
        rc = CTL_EXIT_RUNTIME;
    }
    return rc;
}

int ctl_policy_set(struct ctl *c, size_t n, const char **keys, const char **values)
{
    struct policy_config *base = NULL;
    struct ctl_change *ch = NULL;
    char *hkey = NULL;
    int rc;

    rc = ctl_changes_new(n, keys, values, &ch);
    if (rc == 0)
        rc = ctl_prepare(c, &base, &hkey);
    if (rc == 0)
        rc = ctl_set_retry(c, base, hkey, ch, n);
    for (size_t i = 0; rc == CTL_EXIT_OK && i < n; i++)
        printf("%s = %s (applied by routers within %d ms)\n", ch[i].canon, ch[i].written,
               c->cfg.router.policy_refresh);
    ctl_changes_free(ch, n);
    free(hkey);
    policy_config_free(base);
    return rc;
}

/* Removes every override: one transaction counts and deletes them. */
static int ctl_reset_all(struct ctl *c, const char *hkey)
{
    redisReply *r;
    long long n = 0;
    int rc;

    if (ctl_multi_begin(c) != 0)
        return CTL_EXIT_RUNTIME;
    if (ctl_multi_queue(c, ctl_redis_cmd(c, "HLEN", hkey, NULL)) < 0 ||
        ctl_multi_queue(c, ctl_redis_cmd(c, "DEL", hkey, NULL)) < 0)
        return ctl_multi_end(c, -1, NULL);
    rc = ctl_multi_end(c, 0, &r);
    if (rc != CTL_EXIT_OK)
        return CTL_EXIT_RUNTIME;
    if (r->elements == 2)
        ctl_reply_int(r->element[0], &n);
    freeReplyObject(r);
    printf("removed %lld live override%s; routers use the file's policy within %d ms\n", n,
           n == 1 ? "" : "s", c->cfg.router.policy_refresh);
    return CTL_EXIT_OK;
}

/*
 * One attempt at removing the overrides of the n keys in one transaction.
 * A key must be valid unless the hash holds it (a hand-written field may
 * be removed whatever it says). Returns CTL_EXIT_*, or -1 when the hash
 * changed under the WATCH. Fills written with each key's value afterwards.
 */
static int ctl_reset_once(struct ctl *c, const struct policy_config *base, const char *hkey,
                          struct ctl_change *ch, size_t n)
{
    struct ctl_live live;
    struct ctl_rows rows = {0};
    struct policy_config *before, *after, *now;
    char err[1024], why[1024];
    size_t matching = 0;
    int rc, grc;

    rc = ctl_watch_read(c, hkey, &live);
    if (rc != 0)
        return rc;
    for (size_t i = 0; i < n; i++) {
        ch[i].matching = 0;
        for (size_t j = 0; j < live.n; j++)
            if (strcmp(live.v[j].canon, ch[i].canon) == 0)
                ch[i].matching++;
        matching += ch[i].matching;
        if (ch[i].matching == 0 &&
            (grc = policy_config_get(base, ch[i].canon, err, sizeof(err))) != POLICY_OK) {
            ctl_refused(ch[i].canon, grc, err);
            rc = CTL_EXIT_USAGE;
            goto out_unwatch;
        }
    }

    /* Refuse to turn an accepted policy into one the routers reject; a
     * policy already rejected may lose any key. */
    before = ctl_overlay(base, &live, NULL, 0, false, NULL, why, sizeof(why));
    after = ctl_overlay(base, &live, ch, n, false, NULL, err, sizeof(err));
    if (after == NULL && before != NULL) {
        if (n == 1)
            ctl_error("cannot reset %s: %s", ch[0].canon, err);
        else
            ctl_error("cannot reset these keys: %s", err);
        policy_config_free(before);
        rc = CTL_EXIT_USAGE;
        goto out_unwatch;
    }
    if (after == NULL)
        ctl_error("warning: the remaining live overrides are still rejected: %s", err);
    now = after != NULL ? after : before != NULL ? before : NULL;
    ctl_rows_collect(now != NULL ? now : base, &rows);
    for (size_t i = 0; i < n; i++) {
        free(ch[i].written);
        ch[i].written = ctl_value(now != NULL ? now : base, &rows, ch[i].canon, &grc, err,
                                  sizeof(err));
        if (ch[i].written == NULL)
            ch[i].written = xstrdup("?");
    }
    ctl_rows_free(&rows);
    policy_config_free(before);
    policy_config_free(after);

    if (matching == 0) {
        rc = CTL_EXIT_OK;
        goto out_unwatch;
    }
    rc = ctl_multi_begin(c);
    if (rc != 0)
        goto out;
    for (size_t j = 0; j < live.n && rc == 0; j++)
        if (ctl_changes_have(ch, n, live.v[j].canon))
            rc = ctl_multi_queue(c, ctl_redis_cmd(c, "HDEL", hkey, live.v[j].raw, NULL));
    rc = ctl_multi_end(c, rc, NULL);
    goto out;

out_unwatch:
    ctl_unwatch(c);
out:
    ctl_live_free(&live);
    return rc;
}

/* ctl_reset_once() until no other writer intervened, at most
 * CTL_POLICY_ATTEMPTS times. Returns a CTL_EXIT_* code. */
static int ctl_reset_retry(struct ctl *c, const struct policy_config *base, const char *hkey,
                           struct ctl_change *ch, size_t n)
{
    int rc = -1;

    for (int attempt = 0; attempt < CTL_POLICY_ATTEMPTS && rc == -1; attempt++)
        rc = ctl_reset_once(c, base, hkey, ch, n);
    if (rc == -1) {
        ctl_error("%s changed during each of %d attempts; nothing removed, try again", hkey,
                  CTL_POLICY_ATTEMPTS);
        rc = CTL_EXIT_RUNTIME;
    }
    return rc;
}

int ctl_policy_reset(struct ctl *c, size_t n, const char **keys)
{
    struct policy_config *base = NULL;
    struct ctl_change *ch = NULL;
    struct ctl_rows base_rows = {0};
    char *hkey = NULL;
    int rc;

    if (n == 0) {
        rc = ctl_redis_connect(c);
        if (rc != 0)
            return rc;
        hkey = ctl_key(c, SCHEMA_POLICY);
        rc = ctl_reset_all(c, hkey);
        free(hkey);
        return rc;
    }

    rc = ctl_changes_new(n, keys, NULL, &ch);
    if (rc == 0)
        rc = ctl_prepare(c, &base, &hkey);
    if (rc == 0) {
        ctl_rows_collect(base, &base_rows);
        rc = ctl_reset_retry(c, base, hkey, ch, n);
    }
    for (size_t i = 0; rc == CTL_EXIT_OK && i < n; i++) {
        if (ch[i].matching > 0)
            printf("%s = %s (%s value; applied by routers within %d ms)\n", ch[i].canon,
                   ch[i].written, ctl_file_source(&base_rows, ch[i].canon),
                   c->cfg.router.policy_refresh);
        else
            printf("%s = %s (%s value; there was no live override)\n", ch[i].canon,
                   ch[i].written, ctl_file_source(&base_rows, ch[i].canon));
    }
    ctl_rows_free(&base_rows);
    ctl_changes_free(ch, n);
    free(hkey);
    policy_config_free(base);
    return rc;
}

/* ---- the effective policy ------------------------------------------------- */

struct policy_config *ctl_policy_effective(struct ctl *c, int *rc)
{
    struct policy_config *base, *eff;
    struct ctl_live live;
    char *hkey, err[1024];

    base = ctl_base(c);
    if (base == NULL) {
        *rc = CTL_EXIT_USAGE;
        return NULL;
    }
    *rc = ctl_redis_connect(c);
    if (*rc != 0) {
        policy_config_free(base);
        return NULL;
    }
    hkey = ctl_key(c, SCHEMA_POLICY);
    *rc = ctl_live_read(c, hkey, &live);
    if (*rc != 0) {
        free(hkey);
        policy_config_free(base);
        return NULL;
    }
    eff = ctl_overlay(base, &live, NULL, 0, false, NULL, err, sizeof(err));
    if (eff == NULL) {
        ctl_error("warning: routers reject the live overrides in %s: %s; showing the file's "
                  "policy (routers keep the last policy they accepted)", hkey, err);
        eff = base;
        base = NULL;
    }
    ctl_live_free(&live);
    policy_config_free(base);
    free(hkey);
    return eff;
}

/* ---- route suspend and resume ----------------------------------------------- */

/* Checks that name is a route of the file's policy. Returns 0, or
 * CTL_EXIT_USAGE after naming the routes there are. */
static int ctl_route_known(const struct policy_config *base, const char *name)
{
    size_t n = policy_route_count(base);
    struct buf list = BUF_INIT;

    if (policy_route_find(base, name) >= 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        struct policy_route_info info;
        policy_route_info(base, i, &info);
        buf_appendf(&list, "%s%s", i ? ", " : "", info.name);
    }
    ctl_error("no route named \"%s\" (routes in %s: %s)", name, "the configuration file",
              list.data ? list.data : "none");
    buf_free(&list);
    return CTL_EXIT_USAGE;
}

/* Prints the outcome of route suspend / resume: the route's enabled value
 * now and where it comes from. */
static void ctl_route_print(const struct ctl *c, const char *route, bool suspend,
                            bool already, const struct ctl_change *ch, const char *source)
{
    bool enabled = strcmp(ch->written, "yes") == 0;

    if (c->json) {
        json_t *o = json_object();
        json_object_set_new(o, "route", ctl_json_string(route));
        json_object_set_new(o, "enabled", json_boolean(enabled));
        json_object_set_new(o, "source", json_string(source));
        json_object_set_new(o, "changed",
                            json_boolean(suspend ? !already : ch->matching > 0));
        json_object_set_new(o, "applied_within_ms", json_integer(c->cfg.router.policy_refresh));
        ctl_json_print(o);
        return;
    }
    if (suspend && already)
        printf("route %s was suspended already: %s = no (live)\n", route, ch->canon);
    else if (suspend)
        printf("route %s suspended: %s = no (live); within %d ms routers send nothing through "
               "it: its mail overflows to the next route or is held\n", route, ch->canon,
               c->cfg.router.policy_refresh);
    else if (enabled && ch->matching > 0)
        printf("route %s resumed: %s = yes (%s value); routers use it again within %d ms\n",
               route, ch->canon, source, c->cfg.router.policy_refresh);
    else if (enabled)
        printf("route %s was not suspended: %s = yes (%s value)\n", route, ch->canon, source);
    else
        printf("route %s stays disabled: %s, but the configuration file sets %s = no "
               "(change the file, or: mailferryctl policy set %s yes)\n", route,
               ch->matching > 0 ? "removed the live override" : "there was no live override",
               ch->canon, ch->canon);
}

int ctl_route_suspend(struct ctl *c, const char *name, bool suspend)
{
    struct policy_config *base = NULL;
    struct ctl_change *ch = NULL;
    struct ctl_rows base_rows = {0};
    const char *keys[1], *values[1] = {"no"};
    char *hkey = NULL, *route = ctl_canon_key(name);
    struct buf key = BUF_INIT;
    const char *source = "live";
    bool already = false;
    int rc;

    buf_appendf(&key, "route.%s.enabled", route);
    keys[0] = key.data;
    base = ctl_base(c);
    if (base == NULL) {
        rc = CTL_EXIT_USAGE;
        goto out;
    }
    rc = ctl_route_known(base, route);
    if (rc != 0)
        goto out;
    rc = ctl_changes_new(1, keys, suspend ? values : NULL, &ch);
    if (rc != 0)
        goto out;
    rc = ctl_redis_connect(c);
    if (rc != 0)
        goto out;
    hkey = ctl_key(c, SCHEMA_POLICY);
    if (suspend) {
        /* Setting it again is harmless (and spells the field canonically);
         * only the message differs. */
        redisReply *r = ctl_redis_ok(c, "HGET", hkey, ch[0].canon, NULL);
        if (r == NULL) {
            rc = CTL_EXIT_RUNTIME;
            goto out;
        }
        already = r->type == REDIS_REPLY_STRING && strcmp(r->str, "no") == 0;
        freeReplyObject(r);
        rc = ctl_set_retry(c, base, hkey, ch, 1);
    } else {
        rc = ctl_reset_retry(c, base, hkey, ch, 1);
        ctl_rows_collect(base, &base_rows);
        source = ctl_file_source(&base_rows, ch[0].canon);
    }
    if (rc == CTL_EXIT_OK)
        ctl_route_print(c, route, suspend, already, &ch[0], source);

out:
    ctl_rows_free(&base_rows);
    if (ch != NULL)
        ctl_changes_free(ch, 1);
    free(hkey);
    policy_config_free(base);
    buf_free(&key);
    free(route);
    return rc;
}
