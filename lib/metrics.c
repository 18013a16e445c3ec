/*
 * metrics: the registry and the text exposition format. See metrics.h for
 * the contract; the format is Prometheus's "text/plain; version=0.0.4"
 * (Prometheus documentation, "Exposition formats").
 */
#include "lib/metrics.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/log.h"
#include "lib/xmalloc.h"

/* Series hash table: starts with this many buckets, doubles when full. */
#define METRICS_TABLE_MIN 16

struct metric {
    struct metric *hnext;        /* hash chain */
    struct metric_family *f;
    uint64_t hash;
    char **values;               /* f->nlabels strings, sanitized */
    double value;                /* counter, gauge; histogram: sum */
    uint64_t count;              /* histogram: observations */
    uint64_t *buckets;           /* histogram: per bucket, not cumulative;
                                    nbounds + 1 (the last is +Inf) */
};

struct metric_family {
    char *name;
    char *help;
    enum metric_type type;
    char **labels;
    size_t nlabels;
    double *bounds;
    size_t nbounds;
    struct metric **series;      /* in creation order */
    size_t nseries, cap;
    struct metric **table;
    size_t tsize;                /* a power of two */
    int full_logged;
};

struct metrics {
    struct metric_family **fams;
    size_t nfams, cap;
};

static struct metrics *metrics_default_reg;

static const char *const metric_type_names[] = {
    [METRIC_COUNTER] = "counter",
    [METRIC_GAUGE] = "gauge",
    [METRIC_HISTOGRAM] = "histogram",
};

/* ---- registry ---------------------------------------------------------------- */

struct metrics *metrics_new(void)
{
    return xcalloc(1, sizeof(struct metrics));
}

static void metric_free(struct metric *m, size_t nlabels)
{
    for (size_t i = 0; i < nlabels; i++)
        free(m->values[i]);
    free(m->values);
    free(m->buckets);
    free(m);
}

static void family_free(struct metric_family *f)
{
    for (size_t i = 0; i < f->nseries; i++)
        metric_free(f->series[i], f->nlabels);
    for (size_t i = 0; i < f->nlabels; i++)
        free(f->labels[i]);
    free(f->labels);
    free(f->series);
    free(f->table);
    free(f->bounds);
    free(f->name);
    free(f->help);
    free(f);
}

void metrics_free(struct metrics *reg)
{
    if (reg == NULL)
        return;
    for (size_t i = 0; i < reg->nfams; i++)
        family_free(reg->fams[i]);
    free(reg->fams);
    free(reg);
}

struct metrics *metrics_default(void)
{
    if (metrics_default_reg == NULL)
        metrics_default_reg = metrics_new();
    return metrics_default_reg;
}

void metrics_default_free(void)
{
    metrics_free(metrics_default_reg);
    metrics_default_reg = NULL;
}

struct metric_family *metrics_find(const struct metrics *reg, const char *name)
{
    if (reg == NULL || name == NULL)
        return NULL;
    for (size_t i = 0; i < reg->nfams; i++)
        if (strcmp(reg->fams[i]->name, name) == 0)
            return reg->fams[i];
    return NULL;
}

size_t metric_family_nlabels(const struct metric_family *f)
{
    return f ? f->nlabels : 0;
}

/* Metric names: [a-zA-Z_:][a-zA-Z0-9_:]*; label names: the same without
 * ':' (Prometheus data model). */
static int valid_name(const char *s, size_t n, int colon)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                 (colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return 0;
    }
    return 1;
}

/* Splits "a,b" into label names; returns the count or -1 when one is
 * invalid (a reason goes to why). */
static int split_labels(const char *labels, enum metric_type type,
                        char out[METRICS_MAX_LABELS][64], const char **why)
{
    int n = 0;
    const char *p = labels ? labels : "";

    while (*p) {
        size_t len = strcspn(p, ",");
        const char *s = p;
        size_t sl = len;

        while (sl > 0 && *s == ' ') {
            s++;
            sl--;
        }
        while (sl > 0 && s[sl - 1] == ' ')
            sl--;
        if (n == METRICS_MAX_LABELS) {
            *why = "too many label names";
            return -1;
        }
        if (!valid_name(s, sl, 0) || sl >= 64 || (sl >= 2 && s[0] == '_' && s[1] == '_')) {
            *why = "invalid label name";
            return -1;
        }
        memcpy(out[n], s, sl);
        out[n][sl] = '\0';
        if (type == METRIC_HISTOGRAM && strcmp(out[n], "le") == 0) {
            *why = "label \"le\" is reserved for histogram buckets";
            return -1;
        }
        for (int k = 0; k < n; k++) {
            if (strcmp(out[k], out[n]) == 0) {
                *why = "duplicate label name";
                return -1;
            }
        }
        n++;
        p += len;
        if (*p == ',') {
            p++;
            if (*p == '\0') {
                *why = "invalid label name";
                return -1;
            }
        }
    }
    return n;
}

static struct metric *series_new(struct metric_family *f, char **values, uint64_t hash);
static uint64_t values_hash(const char *const *v, size_t n);

static struct metric_family *metrics_register(struct metrics *reg, enum metric_type type,
                                              const char *name, const char *help,
                                              const char *labels, const double *bounds,
                                              size_t nbounds)
{
    char names[METRICS_MAX_LABELS][64];
    const char *why = NULL;
    struct metric_family *f;
    int n;

    if (reg == NULL)
        return NULL;
    if (name == NULL || !valid_name(name, strlen(name), 1)) {
        log_error("event=metrics_register name=%s reason=\"invalid metric name\"",
                  name ? name : "(null)");
        return NULL;
    }
    n = split_labels(labels, type, names, &why);
    if (n < 0) {
        log_error("event=metrics_register name=%s reason=\"%s\"", name, why);
        return NULL;
    }
    if (type == METRIC_HISTOGRAM) {
        if (bounds == NULL || nbounds == 0 || nbounds > METRICS_MAX_BUCKETS) {
            log_error("event=metrics_register name=%s reason=\"histogram needs 1 to %d buckets\"",
                      name, METRICS_MAX_BUCKETS);
            return NULL;
        }
        for (size_t i = 0; i < nbounds; i++) {
            if (!isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) {
                log_error("event=metrics_register name=%s reason=\"bucket bounds must be finite "
                          "and increasing\"", name);
                return NULL;
            }
        }
    } else {
        nbounds = 0;
    }

    f = metrics_find(reg, name);
    if (f != NULL) {
        int same = f->type == type && f->nlabels == (size_t)n && f->nbounds == nbounds;
        for (size_t i = 0; same && i < f->nlabels; i++)
            same = strcmp(f->labels[i], names[i]) == 0;
        for (size_t i = 0; same && i < nbounds; i++)
            same = f->bounds[i] == bounds[i];
        if (!same) {
            log_error("event=metrics_register name=%s reason=\"already registered with another "
                      "type, labels or buckets\"", name);
            return NULL;
        }
        return f;
    }

    f = xcalloc(1, sizeof(*f));
    f->name = xstrdup(name);
    f->help = xstrdup(help ? help : "");
    f->type = type;
    f->nlabels = (size_t)n;
    f->labels = xcalloc(n ? (size_t)n : 1, sizeof(char *));
    for (int i = 0; i < n; i++)
        f->labels[i] = xstrdup(names[i]);
    if (nbounds) {
        f->bounds = xmemdup(bounds, nbounds * sizeof(double));
        f->nbounds = nbounds;
    }
    if (reg->nfams == reg->cap) {
        reg->cap = reg->cap ? reg->cap * 2 : 16;
        reg->fams = xrealloc(reg->fams, reg->cap * sizeof(*reg->fams));
    }
    reg->fams[reg->nfams++] = f;
    /* A family without labels has its one series from the start. */
    if (f->nlabels == 0)
        series_new(f, NULL, values_hash(NULL, 0));
    return f;
}

struct metric_family *metrics_counter(struct metrics *reg, const char *name, const char *help,
                                      const char *labels)
{
    return metrics_register(reg, METRIC_COUNTER, name, help, labels, NULL, 0);
}

struct metric_family *metrics_gauge(struct metrics *reg, const char *name, const char *help,
                                    const char *labels)
{
    return metrics_register(reg, METRIC_GAUGE, name, help, labels, NULL, 0);
}

struct metric_family *metrics_histogram(struct metrics *reg, const char *name, const char *help,
                                        const char *labels, const double *bounds,
                                        size_t nbounds)
{
    return metrics_register(reg, METRIC_HISTOGRAM, name, help, labels, bounds, nbounds);
}

/* ---- label values -------------------------------------------------------------- */

/*
 * Length of the valid UTF-8 sequence at p (RFC 3629 section 4: no
 * overlong forms, no surrogates, nothing above U+10FFFF), or 0.
 */
static size_t utf8_seq(const unsigned char *p, size_t avail)
{
    unsigned char c = p[0];
    size_t n;
    unsigned lo = 0x80, hi = 0xbf;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef)
        n = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        n = 4;
    else
        return 0;
    if (avail < n)
        return 0;
    if (c == 0xe0)
        lo = 0xa0;
    else if (c == 0xed)
        hi = 0x9f;
    else if (c == 0xf0)
        lo = 0x90;
    else if (c == 0xf4)
        hi = 0x8f;
    if (p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xbf)
            return 0;
    return n;
}

/* Whether s is already in the form series keep: valid UTF-8 of at most
 * METRICS_MAX_VALUE bytes. The common case, which needs no copy. */
static int value_clean(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t len = strlen(s), i = 0;

    if (len > METRICS_MAX_VALUE)
        return 0;
    while (i < len) {
        size_t n = utf8_seq(p + i, len - i);
        if (n == 0)
            return 0;
        i += n;
    }
    return 1;
}

/* Copies s as valid UTF-8 of at most METRICS_MAX_VALUE bytes: invalid
 * bytes become U+FFFD, and the copy ends before the character that would
 * cross the limit. */
static char *value_sanitize(const char *s)
{
    static const char repl[] = "\xef\xbf\xbd";
    const unsigned char *p = (const unsigned char *)s;
    size_t len = strlen(s), i = 0;
    struct buf b = BUF_INIT;

    while (i < len) {
        size_t n = utf8_seq(p + i, len - i);
        const char *src = s + i;
        size_t out = n;
        if (n == 0) {
            src = repl;
            out = 3;
            n = 1;
        }
        if (b.len + out > METRICS_MAX_VALUE)
            break;
        buf_append(&b, src, out);
        i += n;
    }
    if (b.data == NULL)
        return xstrdup("");
    return buf_steal(&b, NULL);
}

/* FNV-1a over the values, each followed by 0xff (never part of UTF-8). */
static uint64_t values_hash(const char *const *v, size_t n)
{
    uint64_t h = 1469598103934665603ULL;

    for (size_t i = 0; i < n; i++) {
        for (const unsigned char *p = (const unsigned char *)v[i]; *p; p++)
            h = (h ^ *p) * 1099511628211ULL;
        h = (h ^ 0xff) * 1099511628211ULL;
    }
    return h;
}

static void table_insert(struct metric **table, size_t tsize, struct metric *m)
{
    size_t b = (size_t)(m->hash & (tsize - 1));
    m->hnext = table[b];
    table[b] = m;
}

static void table_grow(struct metric_family *f)
{
    size_t ns = f->tsize ? f->tsize * 2 : METRICS_TABLE_MIN;
    struct metric **nt = xcalloc(ns, sizeof(*nt));

    for (size_t i = 0; i < f->nseries; i++)
        table_insert(nt, ns, f->series[i]);
    free(f->table);
    f->table = nt;
    f->tsize = ns;
}

/* Adds a series; takes ownership of values (f->nlabels strings). */
static struct metric *series_new(struct metric_family *f, char **values, uint64_t hash)
{
    struct metric *m = xcalloc(1, sizeof(*m));

    m->f = f;
    m->hash = hash;
    m->values = values;
    if (f->type == METRIC_HISTOGRAM)
        m->buckets = xcalloc(f->nbounds + 1, sizeof(uint64_t));
    if (f->nseries == f->cap) {
        f->cap = f->cap ? f->cap * 2 : 8;
        f->series = xrealloc(f->series, f->cap * sizeof(*f->series));
    }
    f->series[f->nseries++] = m;
    if (f->nseries > f->tsize)
        table_grow(f);
    else
        table_insert(f->table, f->tsize, m);
    return m;
}

struct metric *metric_labelsv(struct metric_family *f, const char *const *values)
{
    const char *v[METRICS_MAX_LABELS];
    char *fixed[METRICS_MAX_LABELS] = {NULL};
    struct metric *m;
    uint64_t h;
    size_t n;

    if (f == NULL)
        return NULL;
    n = f->nlabels;
    for (size_t i = 0; i < n; i++) {
        v[i] = values[i] ? values[i] : "";
        if (!value_clean(v[i])) {
            fixed[i] = value_sanitize(v[i]);
            v[i] = fixed[i];
        }
    }
    h = values_hash(v, n);
    m = f->tsize ? f->table[h & (f->tsize - 1)] : NULL;
    for (; m != NULL; m = m->hnext) {
        size_t i;
        if (m->hash != h)
            continue;
        for (i = 0; i < n && strcmp(m->values[i], v[i]) == 0; i++)
            ;
        if (i == n)
            break;
    }
    if (m == NULL) {
        if (f->nseries >= METRICS_MAX_SERIES) {
            if (!f->full_logged) {
                f->full_logged = 1;
                log_warn("event=metrics_full name=%s series=%zu reason=\"too many label values; "
                         "new ones are not counted\"", f->name, f->nseries);
            }
        } else {
            char **copy = n ? xcalloc(n, sizeof(char *)) : NULL;
            for (size_t i = 0; i < n; i++) {
                copy[i] = fixed[i] ? fixed[i] : xstrdup(v[i]);
                fixed[i] = NULL;
            }
            m = series_new(f, copy, h);
        }
    }
    for (size_t i = 0; i < n; i++)
        free(fixed[i]);
    return m;
}

struct metric *metric_labels(struct metric_family *f, ...)
{
    const char *v[METRICS_MAX_LABELS];
    va_list ap;

    if (f == NULL)
        return NULL;
    va_start(ap, f);
    for (size_t i = 0; i < f->nlabels; i++)
        v[i] = va_arg(ap, const char *);
    va_end(ap);
    return metric_labelsv(f, v);
}

/* ---- updates ------------------------------------------------------------------ */

void metric_inc(struct metric *m)
{
    metric_add(m, 1);
}

void metric_dec(struct metric *m)
{
    if (m != NULL && m->f->type == METRIC_GAUGE)
        m->value -= 1;
}

void metric_add(struct metric *m, double v)
{
    if (m == NULL)
        return;
    if (m->f->type == METRIC_GAUGE)
        m->value += v;
    else if (m->f->type == METRIC_COUNTER && isfinite(v) && v >= 0)
        m->value += v;
}

void metric_set(struct metric *m, double v)
{
    if (m != NULL && m->f->type == METRIC_GAUGE)
        m->value = v;
}

void metric_observe(struct metric *m, double v)
{
    size_t i;

    if (m == NULL || m->f->type != METRIC_HISTOGRAM || isnan(v))
        return;
    /* Bucket i counts observations <= bounds[i] (the "le" label); the
     * last one those above every bound. */
    for (i = 0; i < m->f->nbounds && v > m->f->bounds[i]; i++)
        ;
    m->buckets[i]++;
    m->count++;
    m->value += v;
}

double metric_value(const struct metric *m)
{
    return m ? m->value : 0;
}

uint64_t metric_count(const struct metric *m)
{
    return m ? m->count : 0;
}

/* ---- rendering ------------------------------------------------------------------ */

/* The shortest decimal that reads back as v, or +Inf, -Inf, NaN. */
static void fmt_value(char *out, size_t n, double v)
{
    if (isnan(v)) {
        snprintf(out, n, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(out, n, "%s", v > 0 ? "+Inf" : "-Inf");
        return;
    }
    /* Counts are whole numbers: written without exponent up to 2^53. */
    if (v == floor(v) && fabs(v) <= 9007199254740992.0) {
        snprintf(out, n, "%.0f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, n, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

/* Label values: backslash, double quote and line feed are escaped. */
static void append_label_value(struct buf *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            buf_append(out, "\\\\", 2);
        else if (*s == '"')
            buf_append(out, "\\\"", 2);
        else if (*s == '\n')
            buf_append(out, "\\n", 2);
        else
            buf_append(out, s, 1);
    }
}

/* HELP text: backslash and line feed are escaped. */
static void append_help(struct buf *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            buf_append(out, "\\\\", 2);
        else if (*s == '\n')
            buf_append(out, "\\n", 2);
        else
            buf_append(out, s, 1);
    }
}

/* name{labels[,le="x"]} value\n */
static void append_sample(struct buf *out, const struct metric_family *f, const struct metric *m,
                          const char *suffix, const char *le, double v)
{
    char num[40];
    int any = 0;

    buf_appends(out, f->name);
    buf_appends(out, suffix);
    for (size_t i = 0; i < f->nlabels; i++) {
        buf_appends(out, any ? "," : "{");
        any = 1;
        buf_appends(out, f->labels[i]);
        buf_append(out, "=\"", 2);
        append_label_value(out, m->values[i]);
        buf_append(out, "\"", 1);
    }
    if (le != NULL) {
        buf_appends(out, any ? "," : "{");
        any = 1;
        buf_appendf(out, "le=\"%s\"", le);
    }
    if (any)
        buf_append(out, "}", 1);
    fmt_value(num, sizeof(num), v);
    buf_appendf(out, " %s\n", num);
}

static int cmp_family(const void *a, const void *b)
{
    const struct metric_family *fa = *(const struct metric_family *const *)a;
    const struct metric_family *fb = *(const struct metric_family *const *)b;
    return strcmp(fa->name, fb->name);
}

static int cmp_series(const void *a, const void *b)
{
    const struct metric *ma = *(const struct metric *const *)a;
    const struct metric *mb = *(const struct metric *const *)b;

    for (size_t i = 0; i < ma->f->nlabels; i++) {
        int c = strcmp(ma->values[i], mb->values[i]);
        if (c != 0)
            return c;
    }
    return 0;
}

static void render_family(const struct metric_family *f, struct buf *out)
{
    struct metric **v;

    if (f->nseries == 0)
        return;
    buf_appendf(out, "# HELP %s ", f->name);
    append_help(out, f->help);
    buf_appendf(out, "\n# TYPE %s %s\n", f->name, metric_type_names[f->type]);
    v = xmemdup(f->series, f->nseries * sizeof(*v));
    qsort(v, f->nseries, sizeof(*v), cmp_series);
    for (size_t k = 0; k < f->nseries; k++) {
        const struct metric *m = v[k];
        if (f->type != METRIC_HISTOGRAM) {
            append_sample(out, f, m, "", NULL, m->value);
            continue;
        }
        uint64_t cum = 0;
        char le[40];
        for (size_t i = 0; i < f->nbounds; i++) {
            cum += m->buckets[i];
            fmt_value(le, sizeof(le), f->bounds[i]);
            append_sample(out, f, m, "_bucket", le, (double)cum);
        }
        append_sample(out, f, m, "_bucket", "+Inf", (double)m->count);
        append_sample(out, f, m, "_sum", NULL, m->value);
        append_sample(out, f, m, "_count", NULL, (double)m->count);
    }
    free(v);
}

void metrics_render(const struct metrics *reg, struct buf *out)
{
    struct metric_family **v;

    if (reg == NULL || reg->nfams == 0)
        return;
    v = xmemdup(reg->fams, reg->nfams * sizeof(*v));
    qsort(v, reg->nfams, sizeof(*v), cmp_family);
    for (size_t i = 0; i < reg->nfams; i++)
        render_family(v[i], out);
    free(v);
}
