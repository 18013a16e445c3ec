/*
 * metrics: a small in-process registry of Prometheus metrics (counters,
 * gauges, histograms) and its rendering in the Prometheus text exposition
 * format, version 0.0.4 (docs/metrics.md lists every metric mailferry
 * exports; lib/admin.c serves the text on GET /metrics).
 *
 * Model. A family has a name, a help text, a type and a fixed list of
 * label names; it is registered once. Each distinct list of label values
 * is one series (struct metric), created on first use and kept until the
 * registry is freed. A family without labels has exactly one series,
 * created at registration, so it is exported (as 0) from the start;
 * a labelled family is exported once it has a series.
 *
 * Threading: none. A registry, its families and series belong to the
 * thread that runs the libuv loop; every function here must be called from
 * that thread only (mailferry's roles all run on one loop; worker threads,
 * such as the password checks, never touch metrics). Nothing is locked and
 * nothing is atomic.
 *
 * Ownership: the registry owns its families and series. Pointers returned
 * by the registration and lookup functions stay valid until the registry
 * is freed. Every string passed in is copied.
 *
 * Errors: registering an invalid name, invalid label names, or a name that
 * is already registered with another type, other label names or other
 * buckets logs an error and returns NULL. Every function that takes a
 * family or a series accepts NULL and then does nothing (returns NULL or
 * 0), so instrumentation never needs to test for it.
 */
#ifndef MF_METRICS_H
#define MF_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "lib/buf.h"

enum metric_type {
    METRIC_COUNTER = 0,
    METRIC_GAUGE,
    METRIC_HISTOGRAM,
};

/* At most this many label names per family. */
#define METRICS_MAX_LABELS 8
/* At most this many buckets per histogram (+Inf is implicit and extra). */
#define METRICS_MAX_BUCKETS 32
/*
 * At most this many series per family. Label values may come from the
 * outside (a message class header, a route name): past this cap, a lookup
 * with new values returns NULL (the update is dropped) and one warning per
 * family is logged, so a hostile client cannot grow the registry without
 * bound.
 */
#define METRICS_MAX_SERIES 1000
/* Label values longer than this many bytes are cut (at a UTF-8 character
 * boundary). Bytes that are not valid UTF-8 become U+FFFD, since the text
 * format requires UTF-8. Both happen before lookup, so the same input
 * always finds the same series. */
#define METRICS_MAX_VALUE 256

struct metrics;          /* a registry */
struct metric_family;    /* one metric name */
struct metric;           /* one series: a family and label values */

struct metrics *metrics_new(void);

/* Releases the registry, every family and every series. NULL is allowed. */
void metrics_free(struct metrics *reg);

/*
 * The process-wide registry that mailferry's roles register into and the
 * admin endpoint serves, created on first call. metrics_default_free()
 * releases it (at exit, after everything that holds family pointers is
 * gone); a later metrics_default() creates a new, empty one.
 */
struct metrics *metrics_default(void);
void metrics_default_free(void);

/*
 * Registers a family, or returns the one already registered under name
 * when type, label names (and buckets) are the same; the help text of the
 * first registration stays. name must match [a-zA-Z_:][a-zA-Z0-9_:]*;
 * labels is a comma-separated list of label names, each matching
 * [a-zA-Z_][a-zA-Z0-9_]* and not starting with "__" ("" or NULL for none;
 * a histogram may not use "le"). help may hold any text (it is escaped).
 *
 * Histograms take their bucket upper bounds, finite and strictly
 * increasing, 1 to METRICS_MAX_BUCKETS of them; the +Inf bucket is added.
 */
struct metric_family *metrics_counter(struct metrics *reg, const char *name, const char *help,
                                      const char *labels);
struct metric_family *metrics_gauge(struct metrics *reg, const char *name, const char *help,
                                    const char *labels);
struct metric_family *metrics_histogram(struct metrics *reg, const char *name, const char *help,
                                        const char *labels, const double *bounds,
                                        size_t nbounds);

/* The family registered under name, or NULL. */
struct metric_family *metrics_find(const struct metrics *reg, const char *name);

/* The number of label names of f (0 for NULL). */
size_t metric_family_nlabels(const struct metric_family *f);

/*
 * The series of f with the given label values, created on first use:
 * exactly as many const char * arguments as f has label names, in the
 * order of registration (none for a family without labels). A NULL value
 * is taken as "". Returns NULL when f is NULL or the family is full
 * (METRICS_MAX_SERIES).
 */
struct metric *metric_labels(struct metric_family *f, ...);
/* The same with the values in an array of metric_family_nlabels(f). */
struct metric *metric_labelsv(struct metric_family *f, const char *const *values);

/*
 * Updates. Counters take inc and add (add ignores a negative, NaN or
 * infinite amount: a counter only goes up); gauges take inc, dec, add and
 * set; histograms take observe (NaN is ignored). Any other combination is
 * ignored.
 */
void metric_inc(struct metric *m);
void metric_dec(struct metric *m);
void metric_add(struct metric *m, double v);
void metric_set(struct metric *m, double v);
void metric_observe(struct metric *m, double v);

/* For tests: the value of a counter or gauge, the sum of a histogram's
 * observations; and the number of a histogram's observations. */
double metric_value(const struct metric *m);
uint64_t metric_count(const struct metric *m);

/*
 * Appends the whole registry to out in the text exposition format 0.0.4:
 * for each family, sorted by name, "# HELP" and "# TYPE" lines and then
 * its series sorted by label values (byte order, label by label), so the
 * output is stable. Histograms are written as <name>_bucket lines with
 * cumulative counts and an "le" label (the +Inf bucket last), then
 * <name>_sum and <name>_count. Label values escape backslash, double
 * quote and newline; help texts escape backslash and newline. Values are
 * written as the shortest decimal that reads back as the same double;
 * infinities as +Inf/-Inf and NaN as NaN. Families without any series are
 * left out.
 */
void metrics_render(const struct metrics *reg, struct buf *out);

/* The Content-Type of what metrics_render() writes. */
#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

#endif
