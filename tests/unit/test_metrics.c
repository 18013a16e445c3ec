/*
 * Unit tests for lib/metrics.c: registration rules, label handling, the
 * text exposition format 0.0.4 (escaping, number formatting, histograms,
 * stable order).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "lib/buf.h"
#include "lib/log.h"
#include "lib/metrics.h"

static char *render(const struct metrics *reg)
{
    struct buf b = BUF_INIT;

    metrics_render(reg, &b);
    if (b.data == NULL)
        return strdup("");
    return buf_steal(&b, NULL);
}

static void assert_render(const struct metrics *reg, const char *want)
{
    char *got = render(reg);

    if (strcmp(got, want) != 0)
        fail_msg("rendered:\n%s\nwant:\n%s", got, want);
    free(got);
}

static int setup(void **state)
{
    /* Registration errors are logged; keep test output quiet. */
    log_set_level("error");
    log_min_level = LOG_FATAL;
    *state = metrics_new();
    return 0;
}

static int teardown(void **state)
{
    metrics_free(*state);
    return 0;
}

static void test_counter_without_labels(void **state)
{
    struct metrics *reg = *state;
    struct metric_family *f = metrics_counter(reg, "mf_accepted_total", "Messages accepted.", "");

    assert_non_null(f);
    /* Exported as 0 from registration on. */
    assert_render(reg, "# HELP mf_accepted_total Messages accepted.\n"
                       "# TYPE mf_accepted_total counter\n"
                       "mf_accepted_total 0\n");
    metric_inc(metric_labels(f));
    metric_add(metric_labels(f), 2.5);
    metric_add(metric_labels(f), -10);        /* counters never go down */
    metric_add(metric_labels(f), NAN);
    metric_add(metric_labels(f), INFINITY);
    metric_set(metric_labels(f), 100);        /* not for counters */
    metric_observe(metric_labels(f), 100);    /* not for counters */
    assert_true(metric_value(metric_labels(f)) == 3.5);
    assert_render(reg, "# HELP mf_accepted_total Messages accepted.\n"
                       "# TYPE mf_accepted_total counter\n"
                       "mf_accepted_total 3.5\n");
}

static void test_gauge_operations(void **state)
{
    struct metrics *reg = *state;
    struct metric_family *f = metrics_gauge(reg, "mf_conns", "Open connections.", "listener");
    struct metric *m = metric_labels(f, "smtp");

    /* A labelled family without series is left out. */
    {
        struct metrics *r2 = metrics_new();
        metrics_gauge(r2, "mf_empty", "Nothing yet.", "a");
        assert_render(r2, "");
        metrics_free(r2);
    }
    metric_inc(m);
    metric_inc(m);
    metric_dec(m);
    metric_add(m, -3);
    assert_true(metric_value(m) == -2);
    metric_set(m, 7);
    metric_inc(metric_labels(f, "submission"));
    assert_ptr_equal(metric_labels(f, "smtp"), m);
    assert_render(reg, "# HELP mf_conns Open connections.\n"
                       "# TYPE mf_conns gauge\n"
                       "mf_conns{listener=\"smtp\"} 7\n"
                       "mf_conns{listener=\"submission\"} 1\n");
}

struct escape_case {
    const char *value;
    const char *rendered;
};

/* Label values: \ " and newline are escaped, nothing else. */
static const struct escape_case label_cases[] = {
    {"plain", "plain"},
    {"", ""},
    {"back\\slash", "back\\\\slash"},
    {"say \"hi\"", "say \\\"hi\\\""},
    {"two\nlines", "two\\nlines"},
    {"tab\there", "tab\there"},
    {"all \\\"\n", "all \\\\\\\"\\n"},
    {"caf\xc3\xa9", "caf\xc3\xa9"},                 /* valid UTF-8 kept */
    {"bad\xff" "byte", "bad\xef\xbf\xbd" "byte"},   /* invalid byte: U+FFFD */
    {"\xc3", "\xef\xbf\xbd"},                        /* truncated sequence */
    {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"},        /* overlong form */
    {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},  /* surrogate */
};

static void test_label_escaping(void **state)
{
    for (size_t i = 0; i < sizeof(label_cases) / sizeof(label_cases[0]); i++) {
        struct metrics *reg = metrics_new();
        struct metric_family *f = metrics_counter(reg, "mf_x_total", "x", "v");
        char want[512];

        metric_inc(metric_labels(f, label_cases[i].value));
        /* The same input finds the same series, sanitized or not. */
        metric_inc(metric_labels(f, label_cases[i].value));
        snprintf(want, sizeof(want),
                 "# HELP mf_x_total x\n# TYPE mf_x_total counter\nmf_x_total{v=\"%s\"} 2\n",
                 label_cases[i].rendered);
        assert_render(reg, want);
        metrics_free(reg);
    }
    (void)state;
}

static void test_help_escaping(void **state)
{
    struct metrics *reg = *state;

    /* HELP escapes backslash and newline but not double quotes. */
    metrics_gauge(reg, "mf_h", "a \"quoted\" c:\\dir\nnext line", "");
    assert_render(reg, "# HELP mf_h a \"quoted\" c:\\\\dir\\nnext line\n"
                       "# TYPE mf_h gauge\n"
                       "mf_h 0\n");
}

static void test_null_label_value_and_long_value(void **state)
{
    struct metrics *reg = *state;
    struct metric_family *f = metrics_counter(reg, "mf_c_total", "c", "a");
    char big[METRICS_MAX_VALUE + 50], want[METRICS_MAX_VALUE + 200];

    metric_inc(metric_labels(f, (const char *)NULL));
    metric_inc(metric_labels(f, ""));
    assert_true(metric_value(metric_labels(f, "")) == 2);

    /* Over the limit: cut to METRICS_MAX_VALUE bytes. A 2-byte character
     * that would cross the limit is left out whole. */
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    big[METRICS_MAX_VALUE - 1] = '\xc3';
    big[METRICS_MAX_VALUE] = '\xa9';
    metrics_free(reg);
    reg = metrics_new();
    *state = reg;
    f = metrics_counter(reg, "mf_c_total", "c", "a");
    metric_inc(metric_labels(f, big));
    snprintf(want, sizeof(want),
             "# HELP mf_c_total c\n# TYPE mf_c_total counter\nmf_c_total{a=\"%.*s\"} 1\n",
             METRICS_MAX_VALUE - 1, big);
    assert_render(reg, want);
}

static void test_histogram(void **state)
{
    struct metrics *reg = *state;
    static const double b[] = {0.005, 0.1, 1, 10};
    struct metric_family *f = metrics_histogram(reg, "mf_latency_seconds", "Latency.", "route",
                                                b, 4);
    struct metric *m = metric_labels(f, "relay");

    assert_non_null(m);
    metric_observe(m, 0.005);   /* le is inclusive */
    metric_observe(m, 0.05);
    metric_observe(m, 0.5);
    metric_observe(m, 1);
    metric_observe(m, 20);      /* only in +Inf */
    metric_observe(m, NAN);     /* ignored */
    metric_inc(m);              /* not for histograms */
    metric_set(m, 3);
    assert_int_equal(metric_count(m), 5);
    assert_true(fabs(metric_value(m) - 21.555) < 1e-9);
    metric_observe(metric_labels(f, "api"), 0.001);
    assert_render(reg,
                  "# HELP mf_latency_seconds Latency.\n"
                  "# TYPE mf_latency_seconds histogram\n"
                  "mf_latency_seconds_bucket{route=\"api\",le=\"0.005\"} 1\n"
                  "mf_latency_seconds_bucket{route=\"api\",le=\"0.1\"} 1\n"
                  "mf_latency_seconds_bucket{route=\"api\",le=\"1\"} 1\n"
                  "mf_latency_seconds_bucket{route=\"api\",le=\"10\"} 1\n"
                  "mf_latency_seconds_bucket{route=\"api\",le=\"+Inf\"} 1\n"
                  "mf_latency_seconds_sum{route=\"api\"} 0.001\n"
                  "mf_latency_seconds_count{route=\"api\"} 1\n"
                  "mf_latency_seconds_bucket{route=\"relay\",le=\"0.005\"} 1\n"
                  "mf_latency_seconds_bucket{route=\"relay\",le=\"0.1\"} 2\n"
                  "mf_latency_seconds_bucket{route=\"relay\",le=\"1\"} 4\n"
                  "mf_latency_seconds_bucket{route=\"relay\",le=\"10\"} 4\n"
                  "mf_latency_seconds_bucket{route=\"relay\",le=\"+Inf\"} 5\n"
                  "mf_latency_seconds_sum{route=\"relay\"} 21.555\n"
                  "mf_latency_seconds_count{route=\"relay\"} 5\n");
}

static void test_histogram_without_labels(void **state)
{
    struct metrics *reg = *state;
    static const double b[] = {1024, 1048576};
    struct metric_family *f = metrics_histogram(reg, "mf_bytes", "Sizes.", NULL, b, 2);

    metric_observe(metric_labels(f), 2048);
    assert_render(reg, "# HELP mf_bytes Sizes.\n"
                       "# TYPE mf_bytes histogram\n"
                       "mf_bytes_bucket{le=\"1024\"} 0\n"
                       "mf_bytes_bucket{le=\"1048576\"} 1\n"
                       "mf_bytes_bucket{le=\"+Inf\"} 1\n"
                       "mf_bytes_sum 2048\n"
                       "mf_bytes_count 1\n");
}

struct value_case {
    double v;
    const char *text;
};

static const struct value_case value_cases[] = {
    {0, "0"},
    {1, "1"},
    {-2, "-2"},
    {0.1, "0.1"},
    {0.25, "0.25"},
    {1.0 / 3, "0.3333333333333333"},
    {123456789012, "123456789012"},
    {9007199254740992.0, "9007199254740992"},
    {1e20, "1e+20"},
    {2.5e-7, "2.5e-07"},
    {INFINITY, "+Inf"},
    {-INFINITY, "-Inf"},
    {NAN, "NaN"},
};

static void test_value_format(void **state)
{
    for (size_t i = 0; i < sizeof(value_cases) / sizeof(value_cases[0]); i++) {
        struct metrics *reg = metrics_new();
        char want[256];

        metric_set(metric_labels(metrics_gauge(reg, "g", "", "")), value_cases[i].v);
        snprintf(want, sizeof(want), "# HELP g \n# TYPE g gauge\ng %s\n", value_cases[i].text);
        assert_render(reg, want);
        metrics_free(reg);
    }
    (void)state;
}

static void test_sorted_output(void **state)
{
    struct metrics *reg = *state;
    struct metric_family *z = metrics_counter(reg, "mf_z_total", "z", "route,reason");
    struct metric_family *a = metrics_gauge(reg, "mf_a", "a", "");

    metric_inc(metric_labels(z, "relay", "primary"));
    metric_inc(metric_labels(z, "api", "overflow:cap_day"));
    metric_inc(metric_labels(z, "relay", "overflow:unhealthy"));
    metric_inc(metric_labels(z, "api", "overflow:breaker_open"));
    metric_set(metric_labels(a), 1);
    assert_render(reg, "# HELP mf_a a\n# TYPE mf_a gauge\nmf_a 1\n"
                       "# HELP mf_z_total z\n# TYPE mf_z_total counter\n"
                       "mf_z_total{route=\"api\",reason=\"overflow:breaker_open\"} 1\n"
                       "mf_z_total{route=\"api\",reason=\"overflow:cap_day\"} 1\n"
                       "mf_z_total{route=\"relay\",reason=\"overflow:unhealthy\"} 1\n"
                       "mf_z_total{route=\"relay\",reason=\"primary\"} 1\n");
    /* Rendering twice gives the same bytes. */
    {
        char *one = render(reg), *two = render(reg);
        assert_string_equal(one, two);
        free(one);
        free(two);
    }
}

static void test_labelsv_and_many_series(void **state)
{
    struct metrics *reg = *state;
    struct metric_family *f = metrics_counter(reg, "mf_d_total", "d", "route, result,class");
    char name[32];

    assert_int_equal(metric_family_nlabels(f), 3);
    /* Enough series to grow the hash table several times. */
    for (int i = 0; i < 300; i++) {
        const char *v[3] = {"relay", "delivered", name};
        snprintf(name, sizeof(name), "c%d", i);
        metric_add(metric_labelsv(f, v), i);
    }
    for (int i = 0; i < 300; i++) {
        snprintf(name, sizeof(name), "c%d", i);
        assert_true(metric_value(metric_labels(f, "relay", "delivered", name)) == i);
    }
    /* Values that differ only in where one label ends are different. */
    metric_inc(metric_labels(f, "ab", "c", "x"));
    metric_inc(metric_labels(f, "a", "bc", "x"));
    assert_true(metric_value(metric_labels(f, "ab", "c", "x")) == 1);
    assert_true(metric_value(metric_labels(f, "a", "bc", "x")) == 1);
}

static void test_series_cap(void **state)
{
    struct metrics *reg = *state;
    struct metric_family *f = metrics_counter(reg, "mf_cls_total", "c", "class");
    char name[32];

    for (int i = 0; i < METRICS_MAX_SERIES; i++) {
        snprintf(name, sizeof(name), "k%d", i);
        assert_non_null(metric_labels(f, name));
    }
    /* Full: new values are dropped, known ones still count. */
    assert_null(metric_labels(f, "one-too-many"));
    metric_inc(metric_labels(f, "one-too-many"));
    metric_inc(metric_labels(f, "k7"));
    assert_true(metric_value(metric_labels(f, "k7")) == 1);
}

struct reg_case {
    int type;                    /* enum metric_type */
    const char *name;
    const char *labels;
    int ok;
};

static const struct reg_case reg_cases[] = {
    {METRIC_COUNTER, "mailferry_x_total", "", 1},
    {METRIC_COUNTER, "ns:sub_x", "a,b", 1},
    {METRIC_GAUGE, "_private", "_a", 1},
    {METRIC_GAUGE, "9starts_with_digit", "", 0},
    {METRIC_GAUGE, "has-dash", "", 0},
    {METRIC_GAUGE, "", "", 0},
    {METRIC_GAUGE, "g", "bad-label", 0},
    {METRIC_GAUGE, "g", "a:b", 0},           /* ':' only in metric names */
    {METRIC_GAUGE, "g", "__reserved", 0},
    {METRIC_GAUGE, "g", "a,a", 0},
    {METRIC_GAUGE, "g", "a,", 0},
    {METRIC_GAUGE, "g", ",a", 0},
    {METRIC_GAUGE, "g", "a,b,c,d,e,f,g,h,i", 0},   /* more than 8 */
    {METRIC_HISTOGRAM, "h", "le", 0},
    {METRIC_HISTOGRAM, "h", "route", 1},
    {METRIC_COUNTER, "c", "le", 1},          /* "le" is only reserved in histograms */
};

static void test_registration_rules(void **state)
{
    static const double b[] = {1, 2};

    for (size_t i = 0; i < sizeof(reg_cases) / sizeof(reg_cases[0]); i++) {
        const struct reg_case *c = &reg_cases[i];
        struct metrics *reg = metrics_new();
        struct metric_family *f;

        if (c->type == METRIC_COUNTER)
            f = metrics_counter(reg, c->name, "h", c->labels);
        else if (c->type == METRIC_GAUGE)
            f = metrics_gauge(reg, c->name, "h", c->labels);
        else
            f = metrics_histogram(reg, c->name, "h", c->labels, b, 2);
        if ((f != NULL) != c->ok)
            fail_msg("case %zu (%s {%s}): got %s", i, c->name, c->labels,
                     f ? "registered" : "refused");
        metrics_free(reg);
    }
    (void)state;
}

static void test_reregistration(void **state)
{
    struct metrics *reg = *state;
    static const double b1[] = {1, 2}, b2[] = {1, 3}, bad[] = {2, 1};
    struct metric_family *c = metrics_counter(reg, "mf_r_total", "first help", "a,b");

    /* Same type and labels: the same family (help of the first kept). */
    assert_ptr_equal(metrics_counter(reg, "mf_r_total", "other help", "a, b"), c);
    assert_ptr_equal(metrics_find(reg, "mf_r_total"), c);
    assert_null(metrics_find(reg, "mf_nope"));
    /* Another type or other labels: refused. */
    assert_null(metrics_gauge(reg, "mf_r_total", "h", "a,b"));
    assert_null(metrics_counter(reg, "mf_r_total", "h", "a"));
    assert_null(metrics_counter(reg, "mf_r_total", "h", "b,a"));

    struct metric_family *h = metrics_histogram(reg, "mf_h", "h", "", b1, 2);
    assert_non_null(h);
    assert_ptr_equal(metrics_histogram(reg, "mf_h", "h", "", b1, 2), h);
    assert_null(metrics_histogram(reg, "mf_h", "h", "", b2, 2));
    assert_null(metrics_histogram(reg, "mf_h", "h", "", b1, 1));
    /* Bad buckets. */
    assert_null(metrics_histogram(reg, "mf_h2", "h", "", bad, 2));
    assert_null(metrics_histogram(reg, "mf_h3", "h", "", b1, 0));
    assert_null(metrics_histogram(reg, "mf_h4", "h", "", NULL, 2));
    {
        static const double inf[] = {1, INFINITY};
        assert_null(metrics_histogram(reg, "mf_h5", "h", "", inf, 2));
    }
    assert_render(reg, "# HELP mf_h h\n# TYPE mf_h histogram\n"
                       "mf_h_bucket{le=\"1\"} 0\nmf_h_bucket{le=\"2\"} 0\n"
                       "mf_h_bucket{le=\"+Inf\"} 0\nmf_h_sum 0\nmf_h_count 0\n");
}

static void test_null_tolerance(void **state)
{
    (void)state;
    assert_null(metrics_counter(NULL, "x", "h", ""));
    assert_null(metric_labels(NULL, "a"));
    assert_null(metric_labelsv(NULL, NULL));
    assert_int_equal(metric_family_nlabels(NULL), 0);
    metric_inc(NULL);
    metric_dec(NULL);
    metric_add(NULL, 1);
    metric_set(NULL, 1);
    metric_observe(NULL, 1);
    assert_true(metric_value(NULL) == 0);
    assert_int_equal(metric_count(NULL), 0);
    metrics_render(NULL, NULL);
    metrics_free(NULL);
}

static void test_default_registry(void **state)
{
    struct metrics *d = metrics_default();

    (void)state;
    assert_ptr_equal(metrics_default(), d);
    metric_inc(metric_labels(metrics_counter(d, "mf_default_total", "h", "")));
    assert_true(metric_value(metric_labels(metrics_find(metrics_default(), "mf_default_total"))) ==
                1);
    metrics_default_free();
    /* A fresh, empty one afterwards. */
    assert_null(metrics_find(metrics_default(), "mf_default_total"));
    metrics_default_free();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_counter_without_labels, setup, teardown),
        cmocka_unit_test_setup_teardown(test_gauge_operations, setup, teardown),
        cmocka_unit_test_setup_teardown(test_label_escaping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_help_escaping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_null_label_value_and_long_value, setup, teardown),
        cmocka_unit_test_setup_teardown(test_histogram, setup, teardown),
        cmocka_unit_test_setup_teardown(test_histogram_without_labels, setup, teardown),
        cmocka_unit_test_setup_teardown(test_value_format, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sorted_output, setup, teardown),
        cmocka_unit_test_setup_teardown(test_labelsv_and_many_series, setup, teardown),
        cmocka_unit_test_setup_teardown(test_series_cap, setup, teardown),
        cmocka_unit_test_setup_teardown(test_registration_rules, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reregistration, setup, teardown),
        cmocka_unit_test_setup_teardown(test_null_tolerance, setup, teardown),
        cmocka_unit_test_setup_teardown(test_default_registry, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
