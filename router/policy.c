/*
 * policy: the routing policy (see policy.h for the contract and
 * docs/policy.md for the operator's view).
 *
 * Layout of this file: value parsers; the declarative table of per-route
 * keys; the global keys (pins, splits, never_via, throttle patterns);
 * set/get/list/check; the decision; breakers; throttling.
 *
 * Nothing here reads a clock, draws a random number or does I/O.
 */
#include "router/policy.h"

#include <assert.h>
#include <ctype.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/buf.h"
#include "lib/xmalloc.h"

#define MS_MINUTE INT64_C(60000)
#define MS_HOUR INT64_C(3600000)
#define MS_DAY INT64_C(86400000)

#define CAP_MAX INT64_C(1000000000000)   /* caps and counts: 10^12 */
#define WEIGHT_MAX 1000000
#define DOMAIN_MAX 253
#define CLASS_MAX 64
#define PATTERN_MAX 128
#define PATTERNS_MAX 64
#define NEVER_VIA_MAX 100000
#define WARMUP_DAYS_MAX 366
#define VALUE_MAX 65536                   /* longest value accepted */

#define DEFAULT_THROTTLE_PATTERNS \
    "4.7.28,4.7.650,tss04,rate limit,rate-limit,ratelimit,throttl," \
    "too many connections,too many messages,unexpected volume"

/* ---- Small containers --------------------------------------------------- */

/* A target: "hold", or routes with weights, optionally strict. */
struct target_item {
    char *route;
    uint32_t weight;
};

struct target {
    bool hold;
    bool strict;
    size_t n;
    struct target_item *v;
};

/* Sorted arrays keyed by a string: every element type starts with
 * "char *key" so one binary search serves them all. */
struct pin {
    char *key;                /* domain or class */
    struct target t;
};

struct domcap {
    char *key;                /* destination domain */
    int64_t cap[3];           /* minute, hour, day; 0 = no cap */
};

struct strset {
    char **v;
    size_t n;
};

enum pin_kind { PIN_SENDER = 0, PIN_RCPT, PIN_CLASS, PIN__COUNT };

static const char *const pin_prefix[PIN__COUNT] = {
    [PIN_SENDER] = "pin.sender.", [PIN_RCPT] = "pin.rcpt.", [PIN_CLASS] = "pin.class.",
};

struct route {
    char *name;
    uint64_t set_mask;            /* bit i: route_keys[i] set explicitly */
    enum policy_transport transport;
    int64_t priority;
    char *overflow;               /* NULL: auto */
    bool overflow_none;
    bool third_party;
    bool enabled;
    int64_t max_size;
    int64_t overflow_after_attempts;
    int64_t cap_minute, cap_hour, cap_day;
    int64_t dcap_minute, dcap_hour, dcap_day;
    int64_t warmup_start;         /* epoch day, -1 = none */
    int64_t *warmup_caps;
    size_t nwarmup;
    int64_t window;               /* seconds */
    int64_t min_samples;
    double bounce_max, deferral_max, complaint_max;
    double recover_ratio;
    int64_t cooldown, cooldown_max;   /* seconds */
    double probe_fraction;
    int64_t probe_successes;
    bool domain_breaker;
    int64_t throttle_backoff, throttle_backoff_max;  /* seconds */
    bool throttle_overflow;
    struct domcap *dcaps;
    size_t ndcaps;
};

struct policy_config {
    bool frozen;
    struct route *routes;
    size_t nroutes;
    struct pin *pins[PIN__COUNT];
    size_t npins[PIN__COUNT];
    struct pin *splits;           /* split.class.<class> */
    size_t nsplits;
    bool has_split_default;
    struct target split_default;
    bool never_via_set;
    struct strset never_via;
    bool patterns_set;
    struct strset patterns;
};

/* Index of the first element whose key is >= key (elements of size sz,
 * each starting with a char * key). */
static size_t lower_bound(const void *base, size_t n, size_t sz, const char *key)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const char *k = *(char *const *)(const void *)((const char *)base + mid * sz);
        if (strcmp(k, key) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Returns the element with that key, or NULL. */
static void *sorted_find(const void *base, size_t n, size_t sz, const char *key)
{
    size_t i = lower_bound(base, n, sz, key);
    if (i < n) {
        char *p = (char *)base + i * sz;
        if (strcmp(*(char **)(void *)p, key) == 0)
            return p;
    }
    return NULL;
}

/* Makes room for a new, zeroed element at its sorted position: returns
 * the (reallocated) array and the element in *elem; *n grows by one. */
static void *sorted_insert(void *base, size_t *n, size_t sz, const char *key, void **elem)
{
    size_t i = lower_bound(base, *n, sz, key);
    char *p = xrealloc(base, (*n + 1) * sz);
    memmove(p + (i + 1) * sz, p + i * sz, (*n - i) * sz);
    (*n)++;
    memset(p + i * sz, 0, sz);
    *elem = p + i * sz;
    return p;
}

static void sorted_remove(void *base, size_t *n, size_t sz, void *elem)
{
    char *p = elem;
    size_t i = (size_t)(p - (char *)base) / sz;
    memmove(p, p + sz, (*n - i - 1) * sz);
    (*n)--;
}

static void target_free(struct target *t)
{
    for (size_t i = 0; i < t->n; i++)
        free(t->v[i].route);
    free(t->v);
    memset(t, 0, sizeof(*t));
}

static void target_copy(struct target *dst, const struct target *src)
{
    *dst = *src;
    dst->v = NULL;
    if (src->n) {
        dst->v = xcalloc(src->n, sizeof(*dst->v));
        for (size_t i = 0; i < src->n; i++) {
            dst->v[i].route = xstrdup(src->v[i].route);
            dst->v[i].weight = src->v[i].weight;
        }
    }
}

static void strset_free(struct strset *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
    s->v = NULL;
    s->n = 0;
}

static void strset_copy(struct strset *dst, const struct strset *src)
{
    dst->n = src->n;
    dst->v = NULL;
    if (src->n) {
        dst->v = xcalloc(src->n, sizeof(char *));
        for (size_t i = 0; i < src->n; i++)
            dst->v[i] = xstrdup(src->v[i]);
    }
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* ---- Errors and value parsers ------------------------------------------- */

static int fail(char *err, size_t errlen, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Writes "key: message" into err and returns POLICY_E_INVALID. */
static int fail(char *err, size_t errlen, const char *key, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (!err || errlen == 0)
        return POLICY_E_INVALID;
    n = snprintf(err, errlen, "%s: ", key ? key : "(null)");
    if (n < 0)
        n = 0;
    if ((size_t)n < errlen) {
        va_start(ap, fmt);
        vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return POLICY_E_INVALID;
}

/* Copies s for an error message: at most 60 bytes, anything that is not
 * printable ASCII (or is a quote or backslash) shown as '?'. */
static const char *shown(char out[72], const char *s)
{
    size_t i, o = 0;
    for (i = 0; s[i] && o < 60; i++) {
        unsigned char c = (unsigned char)s[i];
        out[o++] = (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') ? (char)c : '?';
    }
    if (s[i]) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
    return out;
}

/* A copy of s without leading and trailing blanks, in lower case. */
static char *dup_trim_lower(const char *s)
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
        d[i] = (char)tolower((unsigned char)d[i]);
    return d;
}

/* Parses a decimal integer made of digits only (no sign), into *out.
 * *end receives the first byte after the digits. Returns -1 on no digits
 * or overflow past 2^62. */
static int parse_digits(const char *s, int64_t *out, const char **end)
{
    int64_t v = 0;
    const char *p = s;

    if (!isdigit((unsigned char)*p))
        return -1;
    for (; isdigit((unsigned char)*p); p++) {
        if (v > (INT64_C(1) << 62) / 10)
            return -1;
        v = v * 10 + (*p - '0');
    }
    *out = v;
    *end = p;
    return 0;
}

static int parse_int(const char *s, int64_t *out)
{
    const char *end;
    return (parse_digits(s, out, &end) == 0 && *end == '\0') ? 0 : -1;
}

/* "300", "300s", "5m", "2h", "1d" -> seconds. */
static int parse_seconds(const char *s, int64_t *out)
{
    const char *end;
    int64_t v, mul = 1;

    if (parse_digits(s, &v, &end) < 0)
        return -1;
    if (*end) {
        switch (*end) {
        case 's': mul = 1; break;
        case 'm': mul = 60; break;
        case 'h': mul = 3600; break;
        case 'd': mul = 86400; break;
        default: return -1;
        }
        if (end[1])
            return -1;
    }
    if (v > INT64_MAX / 86400 / 1000)
        return -1;
    *out = v * mul;
    return 0;
}

/* "1048576", "10k", "30m", "1g" (powers of 1024) -> bytes. */
static int parse_size(const char *s, int64_t *out)
{
    const char *end;
    int64_t v, mul = 1;

    if (parse_digits(s, &v, &end) < 0)
        return -1;
    if (*end) {
        switch (*end) {
        case 'k': mul = INT64_C(1) << 10; break;
        case 'm': mul = INT64_C(1) << 20; break;
        case 'g': mul = INT64_C(1) << 30; break;
        default: return -1;
        }
        if (end[1])
            return -1;
    }
    if (v > (INT64_C(1) << 40))
        return -1;
    *out = v * mul;
    return 0;
}

/* "0.05", ".05", "5%" -> 0.05. Only digits, one '.', an optional final
 * '%': no signs, exponents, hex, inf or nan. */
static int parse_rate(const char *s, double *out)
{
    size_t len = strlen(s), dots = 0, digits = 0;
    bool pct = false;
    char tmp[64];
    char *end;
    double v;

    if (len && s[len - 1] == '%') {
        pct = true;
        len--;
    }
    if (len == 0 || len >= sizeof(tmp))
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '.')
            dots++;
        else if (isdigit((unsigned char)s[i]))
            digits++;
        else
            return -1;
    }
    if (dots > 1 || digits == 0)
        return -1;
    memcpy(tmp, s, len);
    tmp[len] = '\0';
    v = strtod(tmp, &end);
    if (*end || !isfinite(v))
        return -1;
    *out = pct ? v / 100.0 : v;
    return 0;
}

static int parse_bool(const char *s, bool *out)
{
    if (!strcmp(s, "yes") || !strcmp(s, "true") || !strcmp(s, "on") || !strcmp(s, "1")) {
        *out = true;
        return 0;
    }
    if (!strcmp(s, "no") || !strcmp(s, "false") || !strcmp(s, "off") || !strcmp(s, "0")) {
        *out = false;
        return 0;
    }
    return -1;
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
 * days_from_civil). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    int64_t era, yoe, doy, doe;
    y -= m <= 2;
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, int64_t *m, int64_t *d)
{
    int64_t era, doe, yoe, doy, mp;
    z += 719468;
    era = (z >= 0 ? z : z - 146096) / 146097;
    doe = z - era * 146097;
    yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp + (mp < 10 ? 3 : -9);
    *y = yoe + era * 400 + (*m <= 2);
}

/* "YYYY-MM-DD" (UTC) or a day number since 1970-01-01 -> epoch day. */
static int parse_date(const char *s, int64_t *out)
{
    static const int mdays[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int64_t y, m, d;
    const char *p;

    if (strlen(s) == 10 && s[4] == '-' && s[7] == '-') {
        for (int i = 0; i < 10; i++)
            if (i != 4 && i != 7 && !isdigit((unsigned char)s[i]))
                return -1;
        y = (s[0] - '0') * 1000 + (s[1] - '0') * 100 + (s[2] - '0') * 10 + (s[3] - '0');
        m = (s[5] - '0') * 10 + (s[6] - '0');
        d = (s[8] - '0') * 10 + (s[9] - '0');
        if (y < 1970 || m < 1 || m > 12 || d < 1 || d > mdays[m - 1])
            return -1;
        if (m == 2 && d == 29 && !((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
            return -1;
        *out = days_from_civil(y, m, d);
        return 0;
    }
    if (parse_digits(s, &y, &p) == 0 && *p == '\0' && y <= 2932896) {  /* 9999-12-31 */
        *out = y;
        return 0;
    }
    return -1;
}

/* "50,100,200" -> array of caps >= 1. */
static int parse_caplist(const char *s, int64_t **out, size_t *nout)
{
    int64_t *v = NULL;
    size_t n = 0;
    const char *p = s;

    for (;;) {
        const char *end;
        int64_t x;
        while (*p == ' ')
            p++;
        if (parse_digits(p, &x, &end) < 0 || x < 1 || x > CAP_MAX || n >= WARMUP_DAYS_MAX)
            goto bad;
        v = xrealloc(v, (n + 1) * sizeof(*v));
        v[n++] = x;
        p = end;
        while (*p == ' ')
            p++;
        if (*p == '\0')
            break;
        if (*p != ',')
            goto bad;
        p++;
    }
    *out = v;
    *nout = n;
    return 0;
bad:
    free(v);
    return -1;
}

/* Route names: 1..POLICY_ROUTE_NAME_MAX of [a-z0-9_-] (already lower
 * case), not a word with a meaning in targets. */
static bool valid_route_name(const char *s, size_t len)
{
    if (len == 0 || len > POLICY_ROUTE_NAME_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(islower(c) || isdigit(c) || c == '_' || c == '-'))
            return false;
    }
    if ((len == 4 && !memcmp(s, "hold", 4)) || (len == 4 && !memcmp(s, "none", 4)) ||
        (len == 4 && !memcmp(s, "auto", 4)) || (len == 6 && !memcmp(s, "strict", 6)))
        return false;
    return true;
}

/* A domain as it appears in an address: labels of [a-z0-9_-] separated by
 * single dots, at most 63 bytes a label and 253 in all. */
static bool valid_domain(const char *s)
{
    size_t len = strlen(s), label = 0;

    if (len == 0 || len > DOMAIN_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '.') {
            if (label == 0)
                return false;
            label = 0;
        } else if (islower(c) || isdigit(c) || c == '-' || c == '_') {
            if (++label > 63)
                return false;
        } else {
            return false;
        }
    }
    return label > 0;
}

static bool valid_class(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > CLASS_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(islower(c) || isdigit(c) || c == '_' || c == '-' || c == '.'))
            return false;
    }
    return true;
}

/* ---- Per-route keys: the declarative table ------------------------------ */

enum ftype {
    FT_TRANSPORT,   /* relay | api | smtp */
    FT_INT,         /* integer in [lo, hi] */
    FT_SECONDS,     /* integer with s/m/h/d suffix, in [lo, hi] seconds */
    FT_SIZE,        /* integer with k/m/g suffix, bytes */
    FT_BOOL,
    FT_RATE,        /* decimal or percent in [dlo, dhi] (open ends by flag) */
    FT_ROUTE_REF,   /* route name | none | auto */
    FT_DATE,        /* YYYY-MM-DD | day number | none */
    FT_CAPLIST,     /* comma list of caps | none */
};

#define RK_LO_OPEN 1u   /* FT_RATE: the lower bound itself is not allowed */
#define RK_HI_OPEN 2u

struct route_key {
    const char *name;
    enum ftype type;
    size_t off;
    int64_t lo, hi;
    double dlo, dhi;
    unsigned flags;
    const char *def;        /* default, as text; NULL: derived (see resolve) */
    const char *range;      /* for error messages */
};

#define OFF(f) offsetof(struct route, f)

/* Every per-route key, in the order `policy get` lists them. Defaults are
 * applied by parsing def, so they obey the same rules as operator values.
 * docs/policy.md documents each row. */
static const struct route_key route_keys[] = {
    {"transport", FT_TRANSPORT, OFF(transport), 0, 0, 0, 0, 0, NULL, "relay, api or smtp"},
    {"enabled", FT_BOOL, OFF(enabled), 0, 0, 0, 0, 0, "yes", "yes or no"},
    {"priority", FT_INT, OFF(priority), 0, 1000000, 0, 0, 0, "100",
     "an integer between 0 and 1000000"},
    {"overflow", FT_ROUTE_REF, OFF(overflow), 0, 0, 0, 0, 0, "auto",
     "a route name, none or auto"},
    {"third_party", FT_BOOL, OFF(third_party), 0, 0, 0, 0, 0, NULL, "yes or no"},
    {"max_size", FT_SIZE, OFF(max_size), 0, INT64_C(1) << 40, 0, 0, 0, "0",
     "a size in bytes (suffix k, m or g allowed), 0 for no limit"},
    {"overflow_after_attempts", FT_INT, OFF(overflow_after_attempts), 0, 1000, 0, 0, 0, "0",
     "an integer between 0 and 1000"},
    {"cap_minute", FT_INT, OFF(cap_minute), 0, CAP_MAX, 0, 0, 0, "0",
     "an integer between 0 and 1000000000000"},
    {"cap_hour", FT_INT, OFF(cap_hour), 0, CAP_MAX, 0, 0, 0, "0",
     "an integer between 0 and 1000000000000"},
    {"cap_day", FT_INT, OFF(cap_day), 0, CAP_MAX, 0, 0, 0, "0",
     "an integer between 0 and 1000000000000"},
    {"domain_cap_minute", FT_INT, OFF(dcap_minute), 0, CAP_MAX, 0, 0, 0, "0",
     "an integer between 0 and 1000000000000"},
    {"domain_cap_hour", FT_INT, OFF(dcap_hour), 0, CAP_MAX, 0, 0, 0, "0",
     "an integer between 0 and 1000000000000"},
    {"domain_cap_day", FT_INT, OFF(dcap_day), 0, CAP_MAX, 0, 0, 0, "0",
     "an integer between 0 and 1000000000000"},
    {"warmup_start", FT_DATE, OFF(warmup_start), 0, 0, 0, 0, 0, "none",
     "a date YYYY-MM-DD, a day number since 1970-01-01, or none"},
    {"warmup_caps", FT_CAPLIST, OFF(warmup_caps), 0, 0, 0, 0, 0, "none",
     "a comma list of daily caps (integers >= 1, at most 366), or none"},
    {"window", FT_SECONDS, OFF(window), 60, 604800, 0, 0, 0, "3600",
     "a duration between 60s and 7d"},
    {"min_samples", FT_INT, OFF(min_samples), 1, 1000000000, 0, 0, 0, "100",
     "an integer between 1 and 1000000000"},
    {"bounce_rate_max", FT_RATE, OFF(bounce_max), 0, 0, 0.0, 1.0, 0, "0.05",
     "a rate between 0 and 1 (or 0% and 100%), 0 to disable"},
    {"deferral_rate_max", FT_RATE, OFF(deferral_max), 0, 0, 0.0, 1.0, 0, "0.3",
     "a rate between 0 and 1 (or 0% and 100%), 0 to disable"},
    {"complaint_rate_max", FT_RATE, OFF(complaint_max), 0, 0, 0.0, 1.0, 0, "0.003",
     "a rate between 0 and 1 (or 0% and 100%), 0 to disable"},
    {"recover_ratio", FT_RATE, OFF(recover_ratio), 0, 0, 0.0, 1.0, RK_LO_OPEN | RK_HI_OPEN,
     "0.5", "a ratio greater than 0 and less than 1"},
    {"breaker_cooldown", FT_SECONDS, OFF(cooldown), 1, 86400, 0, 0, 0, "300",
     "a duration between 1s and 1d"},
    {"breaker_cooldown_max", FT_SECONDS, OFF(cooldown_max), 1, 604800, 0, 0, 0, "3600",
     "a duration between 1s and 7d"},
    {"probe_fraction", FT_RATE, OFF(probe_fraction), 0, 0, 0.0, 1.0, RK_LO_OPEN, "0.1",
     "a fraction greater than 0 and at most 1"},
    {"probe_successes", FT_INT, OFF(probe_successes), 1, 1000000, 0, 0, 0, "10",
     "an integer between 1 and 1000000"},
    {"domain_breaker", FT_BOOL, OFF(domain_breaker), 0, 0, 0, 0, 0, "yes", "yes or no"},
    {"throttle_backoff", FT_SECONDS, OFF(throttle_backoff), 1, 86400, 0, 0, 0, "300",
     "a duration between 1s and 1d"},
    {"throttle_backoff_max", FT_SECONDS, OFF(throttle_backoff_max), 1, 604800, 0, 0, 0,
     "3600", "a duration between 1s and 7d"},
    {"throttle_overflow", FT_BOOL, OFF(throttle_overflow), 0, 0, 0, 0, 0, "yes", "yes or no"},
};

#define NROUTE_KEYS (sizeof(route_keys) / sizeof(route_keys[0]))

enum { RK_TRANSPORT = 0, RK_THIRD_PARTY = 4 };

static const char *const transport_names[] = {
    [POLICY_TRANSPORT_NONE] = "none", [POLICY_TRANSPORT_RELAY] = "relay",
    [POLICY_TRANSPORT_API] = "api", [POLICY_TRANSPORT_SMTP] = "smtp",
};

const char *policy_transport_name(enum policy_transport t)
{
    if ((unsigned)t < sizeof(transport_names) / sizeof(transport_names[0]))
        return transport_names[t];
    return "none";
}

static const struct route_key *route_key_find(const char *name)
{
    for (size_t i = 0; i < NROUTE_KEYS; i++)
        if (!strcmp(route_keys[i].name, name))
            return &route_keys[i];
    return NULL;
}

/* A parsed value, before it is applied. */
struct fval {
    int64_t i;
    double d;
    bool b;
    enum policy_transport t;
    char *ref;              /* FT_ROUTE_REF: route name, NULL for none/auto */
    bool none;              /* FT_ROUTE_REF: none */
    int64_t *list;          /* FT_CAPLIST */
    size_t nlist;
};

static void fval_free(struct fval *v)
{
    free(v->ref);
    free(v->list);
    v->ref = NULL;
    v->list = NULL;
}

/* Parses value for key k. Returns 0, or -1 (the caller names the range). */
static int route_key_parse(const struct route_key *k, const char *value, struct fval *v)
{
    memset(v, 0, sizeof(*v));
    switch (k->type) {
    case FT_TRANSPORT:
        if (!strcmp(value, "relay"))
            v->t = POLICY_TRANSPORT_RELAY;
        else if (!strcmp(value, "api"))
            v->t = POLICY_TRANSPORT_API;
        else if (!strcmp(value, "smtp"))
            v->t = POLICY_TRANSPORT_SMTP;
        else
            return -1;
        return 0;
    case FT_INT:
        return (parse_int(value, &v->i) == 0 && v->i >= k->lo && v->i <= k->hi) ? 0 : -1;
    case FT_SECONDS:
        return (parse_seconds(value, &v->i) == 0 && v->i >= k->lo && v->i <= k->hi) ? 0 : -1;
    case FT_SIZE:
        return (parse_size(value, &v->i) == 0 && v->i >= k->lo && v->i <= k->hi) ? 0 : -1;
    case FT_BOOL:
        return parse_bool(value, &v->b);
    case FT_RATE:
        if (parse_rate(value, &v->d) < 0)
            return -1;
        if (v->d < k->dlo || ((k->flags & RK_LO_OPEN) && v->d == k->dlo))
            return -1;
        if (v->d > k->dhi || ((k->flags & RK_HI_OPEN) && v->d == k->dhi))
            return -1;
        return 0;
    case FT_ROUTE_REF:
        if (!strcmp(value, "none")) {
            v->none = true;
            return 0;
        }
        if (!strcmp(value, "auto"))
            return 0;
        if (!valid_route_name(value, strlen(value)))
            return -1;
        v->ref = xstrdup(value);
        return 0;
    case FT_DATE:
        if (!strcmp(value, "none")) {
            v->i = -1;
            return 0;
        }
        return parse_date(value, &v->i);
    case FT_CAPLIST:
        if (!strcmp(value, "none") || !*value)
            return 0;
        return parse_caplist(value, &v->list, &v->nlist);
    }
    return -1;
}

/* Stores a parsed value into route r, taking ownership of its memory. */
static void route_key_apply(struct route *r, const struct route_key *k, struct fval *v)
{
    char *p = (char *)r + k->off;

    switch (k->type) {
    case FT_TRANSPORT:
        r->transport = v->t;
        break;
    case FT_INT:
    case FT_SECONDS:
    case FT_SIZE:
    case FT_DATE:
        memcpy(p, &v->i, sizeof(int64_t));
        break;
    case FT_BOOL:
        memcpy(p, &v->b, sizeof(bool));
        break;
    case FT_RATE:
        memcpy(p, &v->d, sizeof(double));
        break;
    case FT_ROUTE_REF:
        free(r->overflow);
        r->overflow = v->ref;
        r->overflow_none = v->none;
        v->ref = NULL;
        break;
    case FT_CAPLIST:
        free(r->warmup_caps);
        r->warmup_caps = v->list;
        r->nwarmup = v->nlist;
        v->list = NULL;
        break;
    }
}

static bool route_third_party(const struct route *r)
{
    if (r->set_mask & (UINT64_C(1) << RK_THIRD_PARTY))
        return r->third_party;
    return r->transport == POLICY_TRANSPORT_API;
}

/* Shortest decimal text that reads back as the same double. */
static void format_double(char *out, size_t n, double d)
{
    for (int prec = 6; prec <= 17; prec++) {
        snprintf(out, n, "%.*g", prec, d);
        if (strtod(out, NULL) == d)
            return;
    }
}

static void format_route_key(const struct route *r, const struct route_key *k, char *out,
                             size_t n)
{
    const char *p = (const char *)r + k->off;
    int64_t i;
    double d;
    bool b;

    switch (k->type) {
    case FT_TRANSPORT:
        snprintf(out, n, "%s", policy_transport_name(r->transport));
        break;
    case FT_INT:
    case FT_SECONDS:
    case FT_SIZE:
        memcpy(&i, p, sizeof(i));
        snprintf(out, n, "%" PRId64, i);
        break;
    case FT_BOOL:
        if (k - route_keys == RK_THIRD_PARTY)
            b = route_third_party(r);
        else
            memcpy(&b, p, sizeof(b));
        snprintf(out, n, "%s", b ? "yes" : "no");
        break;
    case FT_RATE:
        memcpy(&d, p, sizeof(d));
        format_double(out, n, d);
        break;
    case FT_ROUTE_REF:
        snprintf(out, n, "%s", r->overflow_none ? "none" : r->overflow ? r->overflow : "auto");
        break;
    case FT_DATE:
        if (r->warmup_start < 0) {
            snprintf(out, n, "none");
        } else {
            int64_t y, m, dd;
            civil_from_days(r->warmup_start, &y, &m, &dd);
            snprintf(out, n, "%04" PRId64 "-%02" PRId64 "-%02" PRId64, y, m, dd);
        }
        break;
    case FT_CAPLIST: {
        struct buf b2 = BUF_INIT;
        for (size_t j = 0; j < r->nwarmup; j++)
            buf_appendf(&b2, "%s%" PRId64, j ? "," : "", r->warmup_caps[j]);
        snprintf(out, n, "%s", r->nwarmup ? b2.data : "none");
        buf_free(&b2);
        break;
    }
    }
}

/* Sets every key with a default to it (used when a route is created). */
static void route_defaults(struct route *r)
{
    r->warmup_start = -1;
    for (size_t i = 0; i < NROUTE_KEYS; i++) {
        struct fval v;
        if (!route_keys[i].def)
            continue;
        if (route_key_parse(&route_keys[i], route_keys[i].def, &v) == 0)
            route_key_apply(r, &route_keys[i], &v);
        fval_free(&v);
    }
}

static void route_free(struct route *r)
{
    free(r->name);
    free(r->overflow);
    free(r->warmup_caps);
    for (size_t i = 0; i < r->ndcaps; i++)
        free(r->dcaps[i].key);
    free(r->dcaps);
}

static void route_copy(struct route *dst, const struct route *src)
{
    *dst = *src;
    dst->name = xstrdup(src->name);
    dst->overflow = src->overflow ? xstrdup(src->overflow) : NULL;
    dst->warmup_caps = src->nwarmup ? xmemdup(src->warmup_caps,
                                              src->nwarmup * sizeof(int64_t)) : NULL;
    dst->dcaps = NULL;
    if (src->ndcaps) {
        dst->dcaps = xmemdup(src->dcaps, src->ndcaps * sizeof(*src->dcaps));
        for (size_t i = 0; i < src->ndcaps; i++)
            dst->dcaps[i].key = xstrdup(src->dcaps[i].key);
    }
}

/* ---- Config life cycle -------------------------------------------------- */

static void config_clear(struct policy_config *cfg)
{
    for (size_t i = 0; i < cfg->nroutes; i++)
        route_free(&cfg->routes[i]);
    free(cfg->routes);
    for (int k = 0; k < PIN__COUNT; k++) {
        for (size_t i = 0; i < cfg->npins[k]; i++) {
            free(cfg->pins[k][i].key);
            target_free(&cfg->pins[k][i].t);
        }
        free(cfg->pins[k]);
    }
    for (size_t i = 0; i < cfg->nsplits; i++) {
        free(cfg->splits[i].key);
        target_free(&cfg->splits[i].t);
    }
    free(cfg->splits);
    target_free(&cfg->split_default);
    strset_free(&cfg->never_via);
    strset_free(&cfg->patterns);
    memset(cfg, 0, sizeof(*cfg));
}

static int parse_patterns(const char *value, struct strset *out);

static void config_init(struct policy_config *cfg)
{
    memset(cfg, 0, sizeof(*cfg));
    parse_patterns(DEFAULT_THROTTLE_PATTERNS, &cfg->patterns);
}

struct policy_config *policy_config_new(void)
{
    struct policy_config *cfg = xmalloc(sizeof(*cfg));
    config_init(cfg);
    return cfg;
}

void policy_config_free(struct policy_config *cfg)
{
    if (!cfg)
        return;
    config_clear(cfg);
    free(cfg);
}

void policy_config_reset(struct policy_config *cfg)
{
    config_clear(cfg);
    config_init(cfg);
}

static void pins_copy(struct pin **dst, size_t *ndst, const struct pin *src, size_t n)
{
    *dst = NULL;
    *ndst = n;
    if (!n)
        return;
    *dst = xcalloc(n, sizeof(**dst));
    for (size_t i = 0; i < n; i++) {
        (*dst)[i].key = xstrdup(src[i].key);
        target_copy(&(*dst)[i].t, &src[i].t);
    }
}

struct policy_config *policy_config_clone(const struct policy_config *cfg)
{
    struct policy_config *c = xcalloc(1, sizeof(*c));

    c->frozen = cfg->frozen;
    c->nroutes = cfg->nroutes;
    if (cfg->nroutes) {
        c->routes = xcalloc(cfg->nroutes, sizeof(*c->routes));
        for (size_t i = 0; i < cfg->nroutes; i++)
            route_copy(&c->routes[i], &cfg->routes[i]);
    }
    for (int k = 0; k < PIN__COUNT; k++)
        pins_copy(&c->pins[k], &c->npins[k], cfg->pins[k], cfg->npins[k]);
    pins_copy(&c->splits, &c->nsplits, cfg->splits, cfg->nsplits);
    c->has_split_default = cfg->has_split_default;
    target_copy(&c->split_default, &cfg->split_default);
    c->never_via_set = cfg->never_via_set;
    strset_copy(&c->never_via, &cfg->never_via);
    c->patterns_set = cfg->patterns_set;
    strset_copy(&c->patterns, &cfg->patterns);
    return c;
}

void policy_config_freeze_routes(struct policy_config *cfg)
{
    cfg->frozen = true;
}

/* ---- Routes ------------------------------------------------------------- */

size_t policy_route_count(const struct policy_config *cfg)
{
    return cfg->nroutes;
}

static int route_find_n(const struct policy_config *cfg, const char *name, size_t len)
{
    for (size_t i = 0; i < cfg->nroutes; i++)
        if (strlen(cfg->routes[i].name) == len && !strncasecmp(cfg->routes[i].name, name, len))
            return (int)i;
    return -1;
}

int policy_route_find(const struct policy_config *cfg, const char *name)
{
    return name ? route_find_n(cfg, name, strlen(name)) : -1;
}

void policy_route_info(const struct policy_config *cfg, size_t i, struct policy_route_info *out)
{
    const struct route *r;

    assert(i < cfg->nroutes);
    r = &cfg->routes[i];
    out->name = r->name;
    out->transport = r->transport;
    out->priority = (int)r->priority;
    out->enabled = r->enabled;
    out->third_party = route_third_party(r);
    out->domain_breaker = r->domain_breaker;
    out->window_ms = r->window * 1000;
}

/* a + b for b >= 0, saturating at INT64_MAX: breaker and throttle times
 * come from Redis and may be anything. */
static int64_t sat_add(int64_t a, int64_t b)
{
    return a > INT64_MAX - b ? INT64_MAX : a + b;
}

/* floor(a / b) for b > 0. */
static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

int policy_warmup_day(const struct policy_config *cfg, size_t i, int64_t now_ms)
{
    const struct route *r;
    int64_t day;

    assert(i < cfg->nroutes);
    r = &cfg->routes[i];
    if (r->warmup_start < 0 || r->nwarmup == 0)
        return 0;
    day = floor_div(now_ms, MS_DAY) - r->warmup_start + 1;
    if (day < 1)
        day = 1;
    if (day > (int64_t)r->nwarmup)
        return 0;
    return (int)day;
}

uint64_t policy_route_day_cap(const struct policy_config *cfg, size_t i, int64_t now_ms)
{
    const struct route *r = &cfg->routes[i];
    int day = policy_warmup_day(cfg, i, now_ms);

    if (day > 0) {
        int64_t c = r->warmup_caps[day - 1];
        if (r->cap_day > 0 && r->cap_day < c)
            c = r->cap_day;
        return (uint64_t)c;
    }
    return (uint64_t)r->cap_day;
}

/* ---- Global keys -------------------------------------------------------- */

/*
 * Parses a target: "hold" | item ("," item)*, item = route[:weight] |
 * "strict". Route names must be valid, appear once, and (when known is
 * non-NULL) exist. Returns 0 or -1 with err filled for key.
 */
static int parse_target(const struct policy_config *known, const char *key, const char *value,
                        struct target *t, char *err, size_t errlen)
{
    char got[72];
    const char *p = value;
    uint64_t total = 0;

    memset(t, 0, sizeof(*t));
    if (!strcmp(value, "hold")) {
        t->hold = true;
        return 0;
    }
    for (;;) {
        const char *item, *colon, *end;
        size_t len, nlen;
        int64_t w = 1;

        while (*p == ' ')
            p++;
        item = p;
        end = strchr(p, ',');
        if (!end)
            end = p + strlen(p);
        len = (size_t)(end - item);
        while (len && item[len - 1] == ' ')
            len--;
        if (len == 0) {
            fail(err, errlen, key, "empty item in \"%s\"", shown(got, value));
            goto bad;
        }
        if (len == 6 && !memcmp(item, "strict", 6)) {
            if (t->strict) {
                fail(err, errlen, key, "\"strict\" given twice");
                goto bad;
            }
            t->strict = true;
        } else if (len == 4 && !memcmp(item, "hold", 4)) {
            fail(err, errlen, key, "\"hold\" cannot be combined with routes");
            goto bad;
        } else {
            colon = memchr(item, ':', len);
            nlen = colon ? (size_t)(colon - item) : len;
            while (nlen && item[nlen - 1] == ' ')
                nlen--;
            if (colon) {
                char num[24];
                const char *q = colon + 1;
                size_t qlen = len - (size_t)(q - item);
                while (qlen && *q == ' ') {
                    q++;
                    qlen--;
                }
                if (qlen == 0 || qlen >= sizeof(num)) {
                    fail(err, errlen, key, "weight must be an integer between 0 and %d in \"%s\"",
                         WEIGHT_MAX, shown(got, value));
                    goto bad;
                }
                memcpy(num, q, qlen);
                num[qlen] = '\0';
                if (parse_int(num, &w) < 0 || w > WEIGHT_MAX) {
                    fail(err, errlen, key, "weight must be an integer between 0 and %d in \"%s\"",
                         WEIGHT_MAX, shown(got, value));
                    goto bad;
                }
            }
            if (!valid_route_name(item, nlen)) {
                char nm[72], tmp[POLICY_ROUTE_NAME_MAX * 2 + 1];
                size_t c = nlen < sizeof(tmp) - 1 ? nlen : sizeof(tmp) - 1;
                memcpy(tmp, item, c);
                tmp[c] = '\0';
                fail(err, errlen, key,
                     "\"%s\" is not a route name (1 to %d of a-z 0-9 _ -), in \"%s\"",
                     shown(nm, tmp), POLICY_ROUTE_NAME_MAX, shown(got, value));
                goto bad;
            }
            for (size_t i = 0; i < t->n; i++) {
                if (strlen(t->v[i].route) == nlen && !memcmp(t->v[i].route, item, nlen)) {
                    fail(err, errlen, key, "route \"%s\" listed twice", t->v[i].route);
                    goto bad;
                }
            }
            if (t->n >= POLICY_MAX_ROUTES) {
                fail(err, errlen, key, "more than %d routes", POLICY_MAX_ROUTES);
                goto bad;
            }
            t->v = xrealloc(t->v, (t->n + 1) * sizeof(*t->v));
            t->v[t->n].route = xstrndup(item, nlen);
            t->v[t->n].weight = (uint32_t)w;
            t->n++;
            total += (uint64_t)w;
            if (known && policy_route_find(known, t->v[t->n - 1].route) < 0) {
                fail(err, errlen, key, "no route named \"%s\"", t->v[t->n - 1].route);
                goto bad;
            }
        }
        if (*end == '\0')
            break;
        p = end + 1;
    }
    if (t->n == 0) {
        fail(err, errlen, key, "names no route");
        goto bad;
    }
    if (total == 0) {
        fail(err, errlen, key, "every weight is 0");
        goto bad;
    }
    return 0;
bad:
    target_free(t);
    return -1;
}

static void format_target(const struct target *t, struct buf *b)
{
    if (t->hold) {
        buf_appends(b, "hold");
        return;
    }
    for (size_t i = 0; i < t->n; i++) {
        if (t->n == 1)
            buf_appends(b, t->v[i].route);
        else
            buf_appendf(b, "%s%s:%" PRIu32, i ? "," : "", t->v[i].route, t->v[i].weight);
    }
    if (t->strict)
        buf_appends(b, ",strict");
}

/* Comma separated patterns; "" or "none" is the empty list. */
static int parse_patterns(const char *value, struct strset *out)
{
    const char *p = value;

    memset(out, 0, sizeof(*out));
    if (!*value || !strcmp(value, "none"))
        return 0;
    for (;;) {
        const char *end = strchr(p, ','), *s = p;
        size_t len;
        if (!end)
            end = p + strlen(p);
        while (s < end && *s == ' ')
            s++;
        len = (size_t)(end - s);
        while (len && s[len - 1] == ' ')
            len--;
        if (len == 0 || len > PATTERN_MAX || out->n >= PATTERNS_MAX)
            goto bad;
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] >= 0x7f)
                goto bad;
        out->v = xrealloc(out->v, (out->n + 1) * sizeof(char *));
        out->v[out->n++] = xstrndup(s, len);
        if (*end == '\0')
            break;
        p = end + 1;
    }
    return 0;
bad:
    strset_free(out);
    return -1;
}

/* Domains separated by commas and/or blanks; "" or "none" is empty.
 * Sorted, duplicates dropped. */
static int parse_domain_list(const char *key, const char *value, struct strset *out, char *err,
                             size_t errlen)
{
    const char *p = value;
    char got[72];

    memset(out, 0, sizeof(*out));
    if (!strcmp(value, "none"))
        return 0;
    while (*p) {
        size_t len = strcspn(p, ", \t");
        if (len) {
            char *d = xstrndup(p, len);
            if (!valid_domain(d)) {
                fail(err, errlen, key, "\"%s\" is not a domain", shown(got, d));
                free(d);
                strset_free(out);
                return -1;
            }
            if (out->n >= NEVER_VIA_MAX) {
                free(d);
                strset_free(out);
                return fail(err, errlen, key, "more than %d domains", NEVER_VIA_MAX);
            }
            out->v = xrealloc(out->v, (out->n + 1) * sizeof(char *));
            out->v[out->n++] = d;
        }
        p += len;
        if (*p)
            p++;
    }
    if (out->n > 1) {
        size_t o = 1;
        qsort(out->v, out->n, sizeof(char *), cmp_str);
        for (size_t i = 1; i < out->n; i++) {
            if (!strcmp(out->v[i], out->v[o - 1]))
                free(out->v[i]);
            else
                out->v[o++] = out->v[i];
        }
        out->n = o;
    }
    return 0;
}

static void format_list(const struct strset *s, struct buf *b, const char *sep)
{
    for (size_t i = 0; i < s->n; i++)
        buf_appendf(b, "%s%s", i ? sep : "", s->v[i]);
}

/* Sets or removes (value none or "") a pin or class split. */
static int set_pin(struct policy_config *cfg, struct pin **pins, size_t *npins, bool domain,
                   const char *key, const char *name, const char *value, char *err,
                   size_t errlen)
{
    char got[72];
    struct target t;
    struct pin *p;

    if (domain ? !valid_domain(name) : !valid_class(name))
        return fail(err, errlen, key, domain ? "\"%s\" is not a domain"
                                             : "\"%s\" is not a class name (1 to 64 of a-z 0-9 _ - .)",
                    shown(got, name));
    p = sorted_find(*pins, *npins, sizeof(**pins), name);
    if (!*value || !strcmp(value, "none")) {
        if (p) {
            free(p->key);
            target_free(&p->t);
            sorted_remove(*pins, npins, sizeof(**pins), p);
        }
        return POLICY_OK;
    }
    if (parse_target(cfg->frozen ? cfg : NULL, key, value, &t, err, errlen) < 0)
        return POLICY_E_INVALID;
    if (p) {
        target_free(&p->t);
    } else {
        void *e;
        *pins = sorted_insert(*pins, npins, sizeof(**pins), name, &e);
        p = e;
        p->key = xstrdup(name);
    }
    p->t = t;
    return POLICY_OK;
}

static int set_global(struct policy_config *cfg, const char *key, const char *value, char *err,
                      size_t errlen)
{
    char got[72];

    for (int k = 0; k < PIN__COUNT; k++) {
        size_t plen = strlen(pin_prefix[k]);
        if (!strncmp(key, pin_prefix[k], plen))
            return set_pin(cfg, &cfg->pins[k], &cfg->npins[k], k != PIN_CLASS, key, key + plen,
                           value, err, errlen);
    }
    if (!strncmp(key, "pin.", 4))
        return fail(err, errlen, key, "unknown pin kind (pin.sender.<domain>, "
                    "pin.rcpt.<domain> or pin.class.<class>)");
    if (!strncmp(key, "split.class.", 12))
        return set_pin(cfg, &cfg->splits, &cfg->nsplits, false, key, key + 12, value, err, errlen);
    if (!strcmp(key, "split.default")) {
        struct target t;
        if (!*value || !strcmp(value, "none")) {
            target_free(&cfg->split_default);
            cfg->has_split_default = false;
            return POLICY_OK;
        }
        if (parse_target(cfg->frozen ? cfg : NULL, key, value, &t, err, errlen) < 0)
            return POLICY_E_INVALID;
        target_free(&cfg->split_default);
        cfg->split_default = t;
        cfg->has_split_default = true;
        return POLICY_OK;
    }
    if (!strncmp(key, "split.", 6))
        return fail(err, errlen, key, "unknown split (split.default or split.class.<class>)");
    if (!strcmp(key, "never_via.sender")) {
        struct strset s;
        if (parse_domain_list(key, value, &s, err, errlen) < 0)
            return POLICY_E_INVALID;
        strset_free(&cfg->never_via);
        cfg->never_via = s;
        cfg->never_via_set = true;
        return POLICY_OK;
    }
    if (!strncmp(key, "never_via.", 10))
        return fail(err, errlen, key, "unknown never_via list (never_via.sender)");
    if (!strcmp(key, "throttle.patterns")) {
        struct strset s;
        if (parse_patterns(value, &s) < 0)
            return fail(err, errlen, key,
                        "must be a comma list of up to %d patterns of 1 to %d printable "
                        "characters, got \"%s\"", PATTERNS_MAX, PATTERN_MAX, shown(got, value));
        strset_free(&cfg->patterns);
        cfg->patterns = s;
        cfg->patterns_set = true;
        return POLICY_OK;
    }
    if (!strncmp(key, "throttle.", 9))
        return fail(err, errlen, key, "unknown throttle key (throttle.patterns)");
    return POLICY_E_NOT_POLICY;
}

/* ---- Set ---------------------------------------------------------------- */

/* Splits "route.<name>.<rest>"; returns -1 when the shape is wrong. */
static int split_route_key(const char *key, const char **name, size_t *nlen, const char **rest)
{
    const char *n = key + 6, *dot = strchr(n, '.');
    if (!dot || dot == n || dot[1] == '\0')
        return -1;
    *name = n;
    *nlen = (size_t)(dot - n);
    *rest = dot + 1;
    return 0;
}

static struct route *route_create(struct policy_config *cfg, const char *name, size_t nlen)
{
    struct route *r;
    cfg->routes = xrealloc(cfg->routes, (cfg->nroutes + 1) * sizeof(*cfg->routes));
    r = &cfg->routes[cfg->nroutes++];
    memset(r, 0, sizeof(*r));
    r->name = xstrndup(name, nlen);
    route_defaults(r);
    return r;
}

static int set_route(struct policy_config *cfg, const char *key, const char *value, char *err,
                     size_t errlen)
{
    const char *name, *rest;
    size_t nlen;
    int idx;
    const struct route_key *k;
    char got[72], nm[72];

    if (split_route_key(key, &name, &nlen, &rest) < 0)
        return fail(err, errlen, key, "route keys have the form route.<name>.<key>");
    if (!valid_route_name(name, nlen)) {
        char tmp[POLICY_ROUTE_NAME_MAX * 2 + 1];
        size_t c = nlen < sizeof(tmp) - 1 ? nlen : sizeof(tmp) - 1;
        memcpy(tmp, name, c);
        tmp[c] = '\0';
        return fail(err, errlen, key,
                    "\"%s\" is not a route name (1 to %d of a-z 0-9 _ -; not hold, none, auto "
                    "or strict)", shown(nm, tmp), POLICY_ROUTE_NAME_MAX);
    }
    idx = route_find_n(cfg, name, nlen);
    if (idx < 0 && cfg->frozen) {
        char tmp[POLICY_ROUTE_NAME_MAX + 1];
        memcpy(tmp, name, nlen);
        tmp[nlen] = '\0';
        return fail(err, errlen, key, "no route named \"%s\" (routes are defined in the "
                    "configuration file)", tmp);
    }

    if (!strncmp(rest, "domain_caps.", 12)) {
        const char *dom = rest + 12;
        int64_t caps[3];
        bool remove = !*value || !strcmp(value, "none");
        struct route *r;
        struct domcap *dc;

        if (!valid_domain(dom))
            return fail(err, errlen, key, "\"%s\" is not a domain", shown(got, dom));
        if (!remove) {
            const char *p = value;
            for (int i = 0; i < 3; i++) {
                const char *end;
                while (*p == ' ')
                    p++;
                if (parse_digits(p, &caps[i], &end) < 0 || caps[i] > CAP_MAX)
                    goto badcaps;
                p = end;
                while (*p == ' ')
                    p++;
                if (i < 2 && *p++ != ',')
                    goto badcaps;
            }
            if (*p)
                goto badcaps;
        }
        if (idx < 0) {
            if (cfg->nroutes >= POLICY_MAX_ROUTES)
                return fail(err, errlen, key, "more than %d routes", POLICY_MAX_ROUTES);
            r = route_create(cfg, name, nlen);
        } else {
            r = &cfg->routes[idx];
        }
        dc = sorted_find(r->dcaps, r->ndcaps, sizeof(*r->dcaps), dom);
        if (remove) {
            if (dc) {
                free(dc->key);
                sorted_remove(r->dcaps, &r->ndcaps, sizeof(*r->dcaps), dc);
            }
            return POLICY_OK;
        }
        if (!dc) {
            void *e;
            r->dcaps = sorted_insert(r->dcaps, &r->ndcaps, sizeof(*r->dcaps), dom, &e);
            dc = e;
            dc->key = xstrdup(dom);
        }
        memcpy(dc->cap, caps, sizeof(caps));
        return POLICY_OK;
    badcaps:
        return fail(err, errlen, key, "must be three caps \"<minute>,<hour>,<day>\" (integers "
                    "between 0 and %" PRId64 ", 0 for no cap) or none, got \"%s\"",
                    CAP_MAX, shown(got, value));
    }

    if (!strcmp(rest, "domain_caps"))
        return fail(err, errlen, key, "needs a domain: route.<name>.domain_caps.<domain>");
    k = route_key_find(rest);
    if (!k) {
        if (err && errlen)
            snprintf(err, errlen, "%s: not a policy key", key);
        return POLICY_E_NOT_POLICY;
    }

    {
        struct fval v;
        struct route *r;

        if (route_key_parse(k, value, &v) < 0) {
            fval_free(&v);
            return fail(err, errlen, key, "must be %s, got \"%s\"", k->range, shown(got, value));
        }
        if (k->type == FT_ROUTE_REF && v.ref) {
            if (strlen(v.ref) == nlen && !memcmp(v.ref, name, nlen)) {
                fval_free(&v);
                return fail(err, errlen, key, "a route cannot overflow to itself");
            }
            if (cfg->frozen && policy_route_find(cfg, v.ref) < 0) {
                fail(err, errlen, key, "no route named \"%s\"", v.ref);
                fval_free(&v);
                return POLICY_E_INVALID;
            }
        }
        if (k->type == FT_TRANSPORT && cfg->frozen && cfg->routes[idx].transport != v.t) {
            fval_free(&v);
            return fail(err, errlen, key, "a route's transport cannot change at run time "
                        "(it is %s)", policy_transport_name(cfg->routes[idx].transport));
        }
        if (idx < 0) {
            if (cfg->nroutes >= POLICY_MAX_ROUTES) {
                fval_free(&v);
                return fail(err, errlen, key, "more than %d routes", POLICY_MAX_ROUTES);
            }
            r = route_create(cfg, name, nlen);
        } else {
            r = &cfg->routes[idx];
        }
        route_key_apply(r, k, &v);
        r->set_mask |= UINT64_C(1) << (k - route_keys);
        fval_free(&v);
    }
    return POLICY_OK;
}

int policy_config_set(struct policy_config *cfg, const char *key, const char *value, char *err,
                      size_t errlen)
{
    char *k, *v;
    int rc;

    if (err && errlen)
        err[0] = '\0';
    if (!key || !value)
        return fail(err, errlen, key ? key : "(null)", "no value");
    if (strlen(key) > 512)
        return fail(err, errlen, "(key)", "longer than 512 bytes");
    if (strlen(value) > VALUE_MAX)
        return fail(err, errlen, key, "value longer than %d bytes", VALUE_MAX);
    k = dup_trim_lower(key);
    v = dup_trim_lower(value);
    if (!strncmp(k, "route.", 6))
        rc = set_route(cfg, k, v, err, errlen);
    else
        rc = set_global(cfg, k, v, err, errlen);
    if (rc == POLICY_E_NOT_POLICY && err && errlen && !err[0])
        snprintf(err, errlen, "%s: not a policy key", k);
    free(k);
    free(v);
    return rc;
}

int policy_config_set_route(struct policy_config *cfg, const char *route, const char *key,
                            const char *value, char *err, size_t errlen)
{
    struct buf b = BUF_INIT;
    int rc;

    if (!route || !key)
        return fail(err, errlen, "route", "no route or key");
    buf_appendf(&b, "route.%s.%s", route, key);
    rc = policy_config_set(cfg, b.data, value, err, errlen);
    buf_free(&b);
    return rc;
}

/* ---- Check -------------------------------------------------------------- */

static int check_target(const struct policy_config *cfg, const char *key, const struct target *t,
                        char *err, size_t errlen)
{
    for (size_t i = 0; i < t->n; i++)
        if (policy_route_find(cfg, t->v[i].route) < 0)
            return fail(err, errlen, key, "no route named \"%s\"", t->v[i].route);
    return POLICY_OK;
}

int policy_config_check(const struct policy_config *cfg, char *err, size_t errlen)
{
    char key[600];

    if (err && errlen)
        err[0] = '\0';
    if (cfg->nroutes == 0)
        return fail(err, errlen, "route", "no route is configured (add a [route <name>] "
                    "section with transport = relay, api or smtp)");
    for (size_t i = 0; i < cfg->nroutes; i++) {
        const struct route *r = &cfg->routes[i];
        if (r->transport == POLICY_TRANSPORT_NONE) {
            snprintf(key, sizeof(key), "route.%s.transport", r->name);
            return fail(err, errlen, key, "not set (relay, api or smtp)");
        }
        if (r->overflow && policy_route_find(cfg, r->overflow) < 0) {
            snprintf(key, sizeof(key), "route.%s.overflow", r->name);
            return fail(err, errlen, key, "no route named \"%s\"", r->overflow);
        }
        if (r->cooldown_max < r->cooldown) {
            snprintf(key, sizeof(key), "route.%s.breaker_cooldown_max", r->name);
            return fail(err, errlen, key, "%" PRId64 " is less than breaker_cooldown (%" PRId64
                        ")", r->cooldown_max, r->cooldown);
        }
        if (r->throttle_backoff_max < r->throttle_backoff) {
            snprintf(key, sizeof(key), "route.%s.throttle_backoff_max", r->name);
            return fail(err, errlen, key, "%" PRId64 " is less than throttle_backoff (%" PRId64
                        ")", r->throttle_backoff_max, r->throttle_backoff);
        }
        if ((r->warmup_start >= 0) != (r->nwarmup > 0)) {
            snprintf(key, sizeof(key), "route.%s.%s", r->name,
                     r->warmup_start >= 0 ? "warmup_caps" : "warmup_start");
            return fail(err, errlen, key, "warmup_start and warmup_caps must be set together");
        }
    }
    for (int k = 0; k < PIN__COUNT; k++) {
        for (size_t i = 0; i < cfg->npins[k]; i++) {
            snprintf(key, sizeof(key), "%s%s", pin_prefix[k], cfg->pins[k][i].key);
            if (check_target(cfg, key, &cfg->pins[k][i].t, err, errlen) < 0)
                return POLICY_E_INVALID;
        }
    }
    for (size_t i = 0; i < cfg->nsplits; i++) {
        snprintf(key, sizeof(key), "split.class.%s", cfg->splits[i].key);
        if (check_target(cfg, key, &cfg->splits[i].t, err, errlen) < 0)
            return POLICY_E_INVALID;
    }
    if (cfg->has_split_default &&
        check_target(cfg, "split.default", &cfg->split_default, err, errlen) < 0)
        return POLICY_E_INVALID;
    return POLICY_OK;
}

/* ---- Get and list ------------------------------------------------------- */

typedef void (*list_fn)(void *ctx, const char *key, const char *value, bool is_set);

static void emit(list_fn fn, void *ctx, const char *key, struct buf *val, bool is_set)
{
    fn(ctx, key, val->data ? val->data : "", is_set);
    buf_reset(val);
}

/* Lists the global keys in key order. */
static void list_global(const struct policy_config *cfg, list_fn fn, void *ctx)
{
    struct buf v = BUF_INIT, k = BUF_INIT;

    format_list(&cfg->never_via, &v, ",");
    if (!cfg->never_via.n)
        buf_appends(&v, "none");
    emit(fn, ctx, "never_via.sender", &v, cfg->never_via_set);

    /* pin.class < pin.rcpt < pin.sender, then split.class < split.default */
    static const int order[PIN__COUNT] = {PIN_CLASS, PIN_RCPT, PIN_SENDER};
    for (int j = 0; j < PIN__COUNT; j++) {
        int kind = order[j];
        for (size_t i = 0; i < cfg->npins[kind]; i++) {
            buf_reset(&k);
            buf_appendf(&k, "%s%s", pin_prefix[kind], cfg->pins[kind][i].key);
            format_target(&cfg->pins[kind][i].t, &v);
            emit(fn, ctx, k.data, &v, true);
        }
    }
    for (size_t i = 0; i < cfg->nsplits; i++) {
        buf_reset(&k);
        buf_appendf(&k, "split.class.%s", cfg->splits[i].key);
        format_target(&cfg->splits[i].t, &v);
        emit(fn, ctx, k.data, &v, true);
    }
    if (cfg->has_split_default)
        format_target(&cfg->split_default, &v);
    else
        buf_appends(&v, "none");
    emit(fn, ctx, "split.default", &v, cfg->has_split_default);

    format_list(&cfg->patterns, &v, ",");
    if (!cfg->patterns.n)
        buf_appends(&v, "none");
    emit(fn, ctx, "throttle.patterns", &v, cfg->patterns_set);
    buf_free(&v);
    buf_free(&k);
}

static void list_route(const struct route *r, list_fn fn, void *ctx)
{
    struct buf k = BUF_INIT, v = BUF_INIT;
    char val[4096];

    for (size_t i = 0; i < NROUTE_KEYS; i++) {
        buf_reset(&k);
        buf_appendf(&k, "route.%s.%s", r->name, route_keys[i].name);
        format_route_key(r, &route_keys[i], val, sizeof(val));
        if (route_keys[i].type == FT_CAPLIST && r->nwarmup) {
            /* A long schedule may not fit val; format it in full. */
            for (size_t j = 0; j < r->nwarmup; j++)
                buf_appendf(&v, "%s%" PRId64, j ? "," : "", r->warmup_caps[j]);
        } else {
            buf_appends(&v, val);
        }
        emit(fn, ctx, k.data, &v, (r->set_mask >> i) & 1);
    }
    for (size_t i = 0; i < r->ndcaps; i++) {
        buf_reset(&k);
        buf_appendf(&k, "route.%s.domain_caps.%s", r->name, r->dcaps[i].key);
        buf_appendf(&v, "%" PRId64 ",%" PRId64 ",%" PRId64, r->dcaps[i].cap[0],
                    r->dcaps[i].cap[1], r->dcaps[i].cap[2]);
        emit(fn, ctx, k.data, &v, true);
    }
    buf_free(&k);
    buf_free(&v);
}

void policy_config_list(const struct policy_config *cfg, list_fn fn, void *ctx)
{
    list_global(cfg, fn, ctx);
    for (size_t i = 0; i < cfg->nroutes; i++)
        list_route(&cfg->routes[i], fn, ctx);
}

struct get_ctx {
    const char *key;
    char *out;
    size_t n;
    bool found;
};

static void get_cb(void *ctx, const char *key, const char *value, bool is_set)
{
    struct get_ctx *g = ctx;
    (void)is_set;
    if (!g->found && !strcmp(key, g->key)) {
        snprintf(g->out, g->n, "%s", value);
        g->found = true;
    }
}

int policy_config_get(const struct policy_config *cfg, const char *key, char *out, size_t n)
{
    struct get_ctx g;
    char *k;
    int rc = POLICY_OK;

    if (!key || !out || n == 0)
        return POLICY_E_INVALID;
    k = dup_trim_lower(key);
    g.key = k;
    g.out = out;
    g.n = n;
    g.found = false;
    if (!strncmp(k, "route.", 6)) {
        const char *name, *rest;
        size_t nlen;
        int idx;
        if (split_route_key(k, &name, &nlen, &rest) < 0) {
            rc = fail(out, n, k, "route keys have the form route.<name>.<key>");
        } else if ((idx = route_find_n(cfg, name, nlen)) < 0) {
            rc = fail(out, n, k, "no such route");
        } else if (!strncmp(rest, "domain_caps.", 12)) {
            list_route(&cfg->routes[idx], get_cb, &g);
            if (!g.found) {
                if (valid_domain(rest + 12))
                    snprintf(out, n, "none");
                else
                    rc = fail(out, n, k, "not a domain");
            }
        } else if (!route_key_find(rest)) {
            snprintf(out, n, "%s: not a policy key", k);
            rc = POLICY_E_NOT_POLICY;
        } else {
            list_route(&cfg->routes[idx], get_cb, &g);
        }
    } else {
        list_global(cfg, get_cb, &g);
        if (!g.found) {
            bool pinlike = false;
            for (int i = 0; i < PIN__COUNT; i++) {
                size_t plen = strlen(pin_prefix[i]);
                if (!strncmp(k, pin_prefix[i], plen) &&
                    (i == PIN_CLASS ? valid_class(k + plen) : valid_domain(k + plen)))
                    pinlike = true;
            }
            if (!strncmp(k, "split.class.", 12) && valid_class(k + 12))
                pinlike = true;
            if (pinlike) {
                snprintf(out, n, "none");
            } else if (!strncmp(k, "pin.", 4) || !strncmp(k, "split.", 6) ||
                       !strncmp(k, "never_via.", 10) || !strncmp(k, "throttle.", 9)) {
                rc = fail(out, n, k, "unknown policy key");
            } else {
                snprintf(out, n, "%s: not a policy key", k);
                rc = POLICY_E_NOT_POLICY;
            }
        }
    }
    free(k);
    return rc;
}

/* ---- Decision ----------------------------------------------------------- */

static const char *const reason_names[POLICY_R__COUNT] = {
    [POLICY_R_PRIMARY] = "primary",
    [POLICY_R_PIN_SENDER] = "pin:sender_domain",
    [POLICY_R_PIN_RCPT] = "pin:rcpt_domain",
    [POLICY_R_PIN_CLASS] = "pin:class",
    [POLICY_R_SPLIT_CLASS] = "split:class",
    [POLICY_R_SPLIT] = "split",
    [POLICY_R_PROBE] = "probe",
    [POLICY_R_OVERFLOW_DISABLED] = "overflow:disabled",
    [POLICY_R_OVERFLOW_NEVER_VIA] = "overflow:never_via",
    [POLICY_R_OVERFLOW_UNHEALTHY] = "overflow:unhealthy",
    [POLICY_R_OVERFLOW_TOO_BIG] = "overflow:too_big",
    [POLICY_R_OVERFLOW_ATTEMPTS] = "overflow:attempts",
    [POLICY_R_OVERFLOW_BREAKER_OPEN] = "overflow:breaker_open",
    [POLICY_R_OVERFLOW_BREAKER_HALF_OPEN] = "overflow:breaker_half_open",
    [POLICY_R_OVERFLOW_DOMAIN_BREAKER_OPEN] = "overflow:domain_breaker_open",
    [POLICY_R_OVERFLOW_DOMAIN_BREAKER_HALF_OPEN] = "overflow:domain_breaker_half_open",
    [POLICY_R_THROTTLED] = "throttled",
    [POLICY_R_OVERFLOW_CAP_DAY] = "overflow:cap_day",
    [POLICY_R_OVERFLOW_WARMUP_CAP] = "overflow:warmup_cap",
    [POLICY_R_OVERFLOW_CAP_HOUR] = "overflow:cap_hour",
    [POLICY_R_OVERFLOW_CAP_MINUTE] = "overflow:cap_minute",
    [POLICY_R_OVERFLOW_DOMAIN_CAP_DAY] = "overflow:domain_cap_day",
    [POLICY_R_OVERFLOW_DOMAIN_CAP_HOUR] = "overflow:domain_cap_hour",
    [POLICY_R_OVERFLOW_DOMAIN_CAP_MINUTE] = "overflow:domain_cap_minute",
    [POLICY_R_HOLD_RULE] = "hold:rule",
    [POLICY_R_HOLD_NEVER_VIA] = "hold:never_via",
    [POLICY_R_HOLD_ALL_CAPPED] = "hold:all_capped",
    [POLICY_R_HOLD_THROTTLED] = "hold:throttled",
    [POLICY_R_HOLD_STRICT] = "hold:strict",
    [POLICY_R_HOLD_NO_ROUTE] = "hold:no_route",
};

const char *policy_reason_name(enum policy_reason r)
{
    if ((unsigned)r < POLICY_R__COUNT)
        return reason_names[r];
    return "unknown";
}

static bool is_cap_reason(enum policy_reason r)
{
    return r >= POLICY_R_OVERFLOW_CAP_DAY && r <= POLICY_R_OVERFLOW_DOMAIN_CAP_MINUTE;
}

/* Copies a domain or class from a message in lower case; anything longer
 * than the longest valid name becomes "" (it cannot match a key). */
static void lower_copy(char *out, size_t n, const char *s)
{
    size_t len = s ? strlen(s) : 0;
    if (len >= n) {
        out[0] = '\0';
        return;
    }
    for (size_t i = 0; i < len; i++)
        out[i] = (char)tolower((unsigned char)s[i]);
    out[len] = '\0';
}

/* Looks a domain up in a sorted array of elements keyed by domain: the
 * domain itself, then each parent ("a.b.example.com", "b.example.com",
 * "example.com", "com"); the most specific match wins. */
static void *domain_lookup(const void *base, size_t n, size_t sz, const char *domain)
{
    const char *d = domain;
    if (!n)
        return NULL;
    while (*d) {
        void *p = sorted_find(base, n, sz, d);
        if (p)
            return p;
        d = strchr(d, '.');
        if (!d)
            break;
        d++;
    }
    return NULL;
}

void policy_route_caps(const struct policy_config *cfg, size_t i, const char *rcpt_domain,
                       int64_t now_ms, struct policy_caps *out)
{
    const struct route *r = &cfg->routes[i];
    const struct domcap *dc = NULL;
    char dom[DOMAIN_MAX + 1];

    out->minute = r->cap_minute;
    out->hour = r->cap_hour;
    out->day = (int64_t)policy_route_day_cap(cfg, i, now_ms);
    out->domain_minute = r->dcap_minute;
    out->domain_hour = r->dcap_hour;
    out->domain_day = r->dcap_day;
    lower_copy(dom, sizeof(dom), rcpt_domain);
    if (r->ndcaps && dom[0])
        dc = domain_lookup(r->dcaps, r->ndcaps, sizeof(*r->dcaps), dom);
    if (dc) {
        out->domain_minute = dc->cap[0];
        out->domain_hour = dc->cap[1];
        out->domain_day = dc->cap[2];
    }
}

/* A route that can take the message is ROUTE_OK; otherwise the reason it
 * hands over, and *avail the time it frees up (0 if unknown or never). */
#define ROUTE_OK POLICY_R__COUNT

struct check {
    const struct policy_config *cfg;
    const struct policy_state *st;
    const struct policy_msg *m;
    bool never_via;           /* the sender is on never_via.sender */
    double probe_rnd;
    int64_t now;
    uint64_t nrcpt;
};

/* True when count already in the bucket plus n exceeds cap; an empty
 * bucket always takes one group, however large, so that a group bigger
 * than the cap is not stuck forever. */
static bool cap_exceeded(uint64_t count, uint64_t n, int64_t cap)
{
    if (cap <= 0 || count == 0)
        return false;
    return count >= (uint64_t)cap || n > (uint64_t)cap - count;
}

static int64_t next_bucket(int64_t now, int64_t period)
{
    return (floor_div(now, period) + 1) * period;
}

static int64_t breaker_cooldown_ms(const struct route *r, const struct policy_breaker *b)
{
    return b->cooldown_ms > 0 ? b->cooldown_ms : r->cooldown * 1000;
}

static enum policy_reason route_check(const struct check *c, size_t i, int64_t *avail,
                                      bool *probe_route, bool *probe_domain)
{
    const struct route *r = &c->cfg->routes[i];
    const struct policy_route_state *rs = &c->st->routes[i];
    enum policy_reason first = ROUTE_OK;
    int64_t at = 0;

    *avail = 0;
    *probe_route = *probe_domain = false;
    if (!r->enabled)
        return POLICY_R_OVERFLOW_DISABLED;
    if (c->never_via && route_third_party(r))
        return POLICY_R_OVERFLOW_NEVER_VIA;
    if (!rs->healthy)
        return POLICY_R_OVERFLOW_UNHEALTHY;
    if (r->max_size > 0 && c->m->size > (uint64_t)r->max_size)
        return POLICY_R_OVERFLOW_TOO_BIG;
    if (r->overflow_after_attempts > 0 && c->m->attempts >= r->overflow_after_attempts)
        return POLICY_R_OVERFLOW_ATTEMPTS;

    switch (rs->breaker.state) {
    case POLICY_BREAKER_OPEN:
        *avail = sat_add(rs->breaker.since_ms, breaker_cooldown_ms(r, &rs->breaker));
        return POLICY_R_OVERFLOW_BREAKER_OPEN;
    case POLICY_BREAKER_HALF_OPEN:
        if (c->probe_rnd >= r->probe_fraction)
            return POLICY_R_OVERFLOW_BREAKER_HALF_OPEN;
        *probe_route = true;
        break;
    case POLICY_BREAKER_CLOSED:
        break;
    }
    if (r->domain_breaker) {
        switch (rs->domain_breaker.state) {
        case POLICY_BREAKER_OPEN:
            *avail = sat_add(rs->domain_breaker.since_ms,
                             breaker_cooldown_ms(r, &rs->domain_breaker));
            return POLICY_R_OVERFLOW_DOMAIN_BREAKER_OPEN;
        case POLICY_BREAKER_HALF_OPEN:
            if (c->probe_rnd >= r->probe_fraction)
                return POLICY_R_OVERFLOW_DOMAIN_BREAKER_HALF_OPEN;
            *probe_domain = true;
            break;
        case POLICY_BREAKER_CLOSED:
            break;
        }
    }
    if (rs->throttle.until_ms > c->now) {
        *avail = rs->throttle.until_ms;
        return POLICY_R_THROTTLED;
    }

    /* Caps: the reason is the first exceeded in this order; the time it
     * frees up is the latest bucket end among those exceeded. */
    {
        struct capcheck {
            uint64_t count;
            int64_t cap;
            int64_t period;
            enum policy_reason reason;
        } caps[6];
        struct policy_caps pc;

        policy_route_caps(c->cfg, i, c->m->rcpt_domain, c->now, &pc);
        caps[0] = (struct capcheck){rs->sent.day, pc.day, MS_DAY,
                                    policy_warmup_day(c->cfg, i, c->now) > 0
                                        ? POLICY_R_OVERFLOW_WARMUP_CAP
                                        : POLICY_R_OVERFLOW_CAP_DAY};
        caps[1] = (struct capcheck){rs->sent.hour, pc.hour, MS_HOUR,
                                    POLICY_R_OVERFLOW_CAP_HOUR};
        caps[2] = (struct capcheck){rs->sent.minute, pc.minute, MS_MINUTE,
                                    POLICY_R_OVERFLOW_CAP_MINUTE};
        caps[3] = (struct capcheck){rs->domain_sent.day, pc.domain_day, MS_DAY,
                                    POLICY_R_OVERFLOW_DOMAIN_CAP_DAY};
        caps[4] = (struct capcheck){rs->domain_sent.hour, pc.domain_hour, MS_HOUR,
                                    POLICY_R_OVERFLOW_DOMAIN_CAP_HOUR};
        caps[5] = (struct capcheck){rs->domain_sent.minute, pc.domain_minute, MS_MINUTE,
                                    POLICY_R_OVERFLOW_DOMAIN_CAP_MINUTE};
        for (int j = 0; j < 6; j++) {
            if (cap_exceeded(caps[j].count, c->nrcpt, caps[j].cap)) {
                int64_t end = next_bucket(c->now, caps[j].period);
                if (first == ROUTE_OK)
                    first = caps[j].reason;
                if (end > at)
                    at = end;
            }
        }
    }
    if (first != ROUTE_OK) {
        *probe_route = *probe_domain = false;
        *avail = at;
    }
    return first;
}

/* The route after cur in the chain, or -1. */
static int next_route(const struct policy_config *cfg, size_t cur, const bool *visited)
{
    const struct route *r = &cfg->routes[cur];
    int best = -1;

    if (r->overflow_none)
        return -1;
    if (r->overflow) {
        int i = policy_route_find(cfg, r->overflow);
        return (i >= 0 && !visited[i]) ? i : -1;
    }
    for (size_t i = 0; i < cfg->nroutes; i++) {
        if (visited[i])
            continue;
        if (best < 0 || cfg->routes[i].priority < cfg->routes[best].priority)
            best = (int)i;
    }
    return best;
}

/* Weighted choice of a target's route by rnd in [0, 1); -1 when the route
 * does not exist (a config that was not checked). */
static int pick(const struct policy_config *cfg, const struct target *t, double rnd)
{
    uint64_t total = 0;
    double x, cum = 0;

    for (size_t i = 0; i < t->n; i++)
        total += t->v[i].weight;
    if (total == 0)
        return -1;
    x = rnd * (double)total;
    for (size_t i = 0; i < t->n; i++) {
        if (t->v[i].weight == 0)
            continue;
        cum += t->v[i].weight;
        if (x < cum)
            return policy_route_find(cfg, t->v[i].route);
    }
    /* rnd < 1 makes this unreachable but for rounding: the last route with
     * weight. */
    for (size_t i = t->n; i-- > 0;)
        if (t->v[i].weight)
            return policy_route_find(cfg, t->v[i].route);
    return -1;
}

/* Writes a domain for a log text: only name characters, others as '?'. */
static void safe_domain(char *out, size_t n, const char *s)
{
    size_t o = 0;
    for (; s && *s && o + 1 < n; s++) {
        unsigned char ch = (unsigned char)*s;
        out[o++] = (isalnum(ch) || ch == '.' || ch == '-' || ch == '_') ? (char)tolower(ch) : '?';
    }
    out[o] = '\0';
}

static void set_reason(struct policy_decision *out, enum policy_reason r, const char *detail)
{
    out->reason = r;
    if (detail && *detail)
        snprintf(out->text, sizeof(out->text), "%s:%s", reason_names[r], detail);
    else
        snprintf(out->text, sizeof(out->text), "%s", reason_names[r]);
}

int policy_decide(const struct policy_config *cfg, const struct policy_state *st,
                  const struct policy_msg *m, double rnd, int64_t now_ms,
                  struct policy_decision *out)
{
    char sender[DOMAIN_MAX + 1], rcpt[DOMAIN_MAX + 1], cls[CLASS_MAX + 1];
    char dom_text[DOMAIN_MAX + 1];
    const struct target *t = NULL;
    enum policy_reason entry_reason = POLICY_R_PRIMARY, first = ROUTE_OK;
    const char *hold_detail = NULL;
    bool visited[POLICY_MAX_ROUTES] = {false};
    bool strict = false, any_never_via = false, counted = false;
    bool all_capped = true, all_throttled = true;
    struct check c;
    int entry = -1, cur;
    int64_t retry = 0;
    double scaled;

    if (!out)
        return -1;
    memset(out, 0, sizeof(*out));
    out->route = POLICY_HOLD;
    out->intended = -1;
    if (!cfg || !st || !m || st->nroutes != cfg->nroutes || (st->nroutes && !st->routes)) {
        set_reason(out, POLICY_R_HOLD_NO_ROUTE, NULL);
        return -1;
    }
    if (!(rnd >= 0.0))          /* also NaN */
        rnd = 0.0;
    if (rnd >= 1.0)
        rnd = 1.0 - DBL_EPSILON / 2;    /* the largest double below 1 */

    lower_copy(sender, sizeof(sender), m->sender_domain);
    lower_copy(rcpt, sizeof(rcpt), m->rcpt_domain);
    lower_copy(cls, sizeof(cls), m->msg_class);
    safe_domain(dom_text, sizeof(dom_text), m->rcpt_domain);

    /* The intended route: sender pin, recipient pin, class pin, class
     * split, default split, lowest priority. */
    {
        const struct pin *p = NULL;
        if (sender[0] &&
            (p = domain_lookup(cfg->pins[PIN_SENDER], cfg->npins[PIN_SENDER], sizeof(*p), sender))) {
            entry_reason = POLICY_R_PIN_SENDER;
            hold_detail = "pin:sender_domain";
        } else if (rcpt[0] && (p = domain_lookup(cfg->pins[PIN_RCPT], cfg->npins[PIN_RCPT],
                                                 sizeof(*p), rcpt))) {
            entry_reason = POLICY_R_PIN_RCPT;
            hold_detail = "pin:rcpt_domain";
        } else if (cls[0] && (p = sorted_find(cfg->pins[PIN_CLASS], cfg->npins[PIN_CLASS],
                                              sizeof(*p), cls))) {
            entry_reason = POLICY_R_PIN_CLASS;
            hold_detail = "pin:class";
        } else if (cls[0] && (p = sorted_find(cfg->splits, cfg->nsplits, sizeof(*p), cls))) {
            entry_reason = POLICY_R_SPLIT_CLASS;
            hold_detail = "split:class";
        }
        if (p) {
            t = &p->t;
        } else if (cfg->has_split_default) {
            t = &cfg->split_default;
            entry_reason = POLICY_R_SPLIT;
            hold_detail = "split";
        }
    }
    if (t) {
        if (t->hold) {
            set_reason(out, POLICY_R_HOLD_RULE, hold_detail);
            return 0;
        }
        strict = t->strict;
        entry = pick(cfg, t, rnd);
    } else {
        for (size_t i = 0; i < cfg->nroutes; i++)
            if (entry < 0 || cfg->routes[i].priority < cfg->routes[entry].priority)
                entry = (int)i;
    }
    if (entry < 0) {
        set_reason(out, POLICY_R_HOLD_NO_ROUTE, NULL);
        return 0;
    }
    out->intended = entry;

    c.cfg = cfg;
    c.st = st;
    c.m = m;
    c.never_via = sender[0] && domain_lookup(cfg->never_via.v, cfg->never_via.n,
                                             sizeof(char *), sender) != NULL;
    /* The probe draw: the fraction of rnd * 65536, a number in [0, 1)
     * that does not depend on which side of a split rnd fell. */
    scaled = rnd * 65536.0;
    c.probe_rnd = scaled - (double)(uint32_t)scaled;
    c.now = now_ms;
    c.nrcpt = m->nrcpt ? m->nrcpt : 1;

    for (cur = entry; cur >= 0; cur = next_route(cfg, (size_t)cur, visited)) {
        int64_t avail;
        bool pr, pd;
        enum policy_reason f;

        visited[cur] = true;
        f = route_check(&c, (size_t)cur, &avail, &pr, &pd);
        if (f == ROUTE_OK) {
            out->route = cur;
            out->probe_route = pr;
            out->probe_domain = pd;
            if (pr || pd)
                set_reason(out, POLICY_R_PROBE, NULL);
            else if (first != ROUTE_OK)
                set_reason(out, first, first == POLICY_R_THROTTLED ? dom_text : NULL);
            else
                set_reason(out, entry_reason, NULL);
            return 0;
        }
        if (first == ROUTE_OK)
            first = f;
        if (f == POLICY_R_OVERFLOW_NEVER_VIA) {
            any_never_via = true;
        } else if (f != POLICY_R_OVERFLOW_DISABLED) {
            counted = true;
            if (!is_cap_reason(f))
                all_capped = false;
            if (f != POLICY_R_THROTTLED)
                all_throttled = false;
        }
        if (avail > 0 && (retry == 0 || avail < retry))
            retry = avail;
        if (f == POLICY_R_THROTTLED && !cfg->routes[cur].throttle_overflow) {
            out->retry_at_ms = avail;
            set_reason(out, POLICY_R_HOLD_THROTTLED, dom_text);
            return 0;
        }
        if (strict)
            break;
    }

    out->retry_at_ms = retry;
    if (any_never_via)
        set_reason(out, POLICY_R_HOLD_NEVER_VIA, NULL);
    else if (counted && all_capped)
        set_reason(out, POLICY_R_HOLD_ALL_CAPPED, NULL);
    else if (counted && all_throttled)
        set_reason(out, POLICY_R_HOLD_THROTTLED, dom_text);
    else if (strict)
        set_reason(out, POLICY_R_HOLD_STRICT, NULL);
    else
        set_reason(out, POLICY_R_HOLD_NO_ROUTE, NULL);
    return 0;
}

/* ---- Breakers ----------------------------------------------------------- */

static const char *const transition_names[] = {
    [POLICY_T_NONE] = "none",
    [POLICY_T_OPEN] = "closed->open",
    [POLICY_T_HALF_OPEN] = "open->half_open",
    [POLICY_T_CLOSE] = "half_open->closed",
    [POLICY_T_REOPEN] = "half_open->open",
};

static const char *const breaker_state_names[] = {
    [POLICY_BREAKER_CLOSED] = "closed",
    [POLICY_BREAKER_OPEN] = "open",
    [POLICY_BREAKER_HALF_OPEN] = "half_open",
};

static const char *const cause_names[] = {
    [POLICY_CAUSE_NONE] = "none",
    [POLICY_CAUSE_BOUNCE] = "bounce",
    [POLICY_CAUSE_DEFERRAL] = "deferral",
    [POLICY_CAUSE_COMPLAINT] = "complaint",
    [POLICY_CAUSE_PROBE] = "probe",
    [POLICY_CAUSE_HEALTH] = "health",
};

#define NAMEOF(tab, v) \
    ((unsigned)(v) < sizeof(tab) / sizeof(tab[0]) ? tab[v] : "unknown")

const char *policy_transition_name(enum policy_transition t)
{
    return NAMEOF(transition_names, t);
}

const char *policy_breaker_state_name(enum policy_breaker_state s)
{
    return NAMEOF(breaker_state_names, s);
}

const char *policy_cause_name(enum policy_cause c)
{
    return NAMEOF(cause_names, c);
}

/* The first rate of w above max * factor (strictly), or NONE. Only judged
 * with at least min_samples outcomes; a maximum of 0 is disabled. */
static enum policy_cause rate_above(const struct route *r, const struct policy_window *w,
                                    double factor)
{
    double sent = (double)w->sent;
    if (w->sent < (uint64_t)r->min_samples)
        return POLICY_CAUSE_NONE;
    if (r->bounce_max > 0 && (double)w->bounced > r->bounce_max * factor * sent)
        return POLICY_CAUSE_BOUNCE;
    if (r->deferral_max > 0 && (double)w->deferred > r->deferral_max * factor * sent)
        return POLICY_CAUSE_DEFERRAL;
    if (r->complaint_max > 0 && (double)w->complained > r->complaint_max * factor * sent)
        return POLICY_CAUSE_COMPLAINT;
    return POLICY_CAUSE_NONE;
}

/* True when every enabled rate is below max * recover_ratio, or the window
 * is too small to judge. */
static bool rates_recovered(const struct route *r, const struct policy_window *w)
{
    double sent = (double)w->sent, f = r->recover_ratio;
    if (w->sent < (uint64_t)r->min_samples)
        return true;
    if (r->bounce_max > 0 && !((double)w->bounced < r->bounce_max * f * sent))
        return false;
    if (r->deferral_max > 0 && !((double)w->deferred < r->deferral_max * f * sent))
        return false;
    if (r->complaint_max > 0 && !((double)w->complained < r->complaint_max * f * sent))
        return false;
    return true;
}

enum policy_transition policy_breaker_step(const struct policy_config *cfg, size_t i,
                                           enum policy_scope scope,
                                           const struct policy_breaker *cur,
                                           const struct policy_window *w, int64_t now_ms,
                                           struct policy_breaker *next)
{
    const struct route *r;
    struct policy_breaker b = *cur;
    enum policy_transition t = POLICY_T_NONE;
    enum policy_cause cause;
    int64_t cd;

    assert(i < cfg->nroutes);
    r = &cfg->routes[i];
    if (scope == POLICY_SCOPE_DOMAIN && !r->domain_breaker) {
        *next = b;
        return POLICY_T_NONE;
    }
    switch (cur->state) {
    case POLICY_BREAKER_CLOSED:
        cause = rate_above(r, w, 1.0);
        if (cause != POLICY_CAUSE_NONE) {
            b.state = POLICY_BREAKER_OPEN;
            b.since_ms = now_ms;
            b.cooldown_ms = r->cooldown * 1000;
            b.trips++;
            b.cause = cause;
            t = POLICY_T_OPEN;
        }
        break;
    case POLICY_BREAKER_OPEN:
        cd = breaker_cooldown_ms(r, cur);
        if (now_ms >= sat_add(cur->since_ms, cd)) {
            b.state = POLICY_BREAKER_HALF_OPEN;
            b.since_ms = now_ms;
            b.cooldown_ms = cd;
            t = POLICY_T_HALF_OPEN;
        }
        break;
    case POLICY_BREAKER_HALF_OPEN:
        cd = breaker_cooldown_ms(r, cur);
        if (w->probe_bad > 0) {
            int64_t max = r->cooldown_max * 1000;
            b.state = POLICY_BREAKER_OPEN;
            b.since_ms = now_ms;
            b.cooldown_ms = cd > max / 2 ? max : cd * 2;
            if (b.cooldown_ms < cd)   /* cooldown_max below the current one */
                b.cooldown_ms = cd;
            b.trips++;
            b.cause = POLICY_CAUSE_PROBE;
            t = POLICY_T_REOPEN;
        } else if (w->probe_ok >= (uint64_t)r->probe_successes && rates_recovered(r, w)) {
            b.state = POLICY_BREAKER_CLOSED;
            b.since_ms = now_ms;
            b.cooldown_ms = 0;
            b.cause = POLICY_CAUSE_NONE;
            t = POLICY_T_CLOSE;
        }
        break;
    }
    *next = b;
    return t;
}

enum policy_transition policy_breaker_trip(const struct policy_config *cfg, size_t i,
                                           const struct policy_breaker *cur,
                                           enum policy_cause cause, int64_t now_ms,
                                           struct policy_breaker *next)
{
    const struct route *r;
    struct policy_breaker b = *cur;
    enum policy_transition t = POLICY_T_NONE;
    int64_t cd, max;

    assert(i < cfg->nroutes);
    r = &cfg->routes[i];
    switch (cur->state) {
    case POLICY_BREAKER_CLOSED:
        b.state = POLICY_BREAKER_OPEN;
        b.since_ms = now_ms;
        b.cooldown_ms = r->cooldown * 1000;
        b.trips++;
        b.cause = cause;
        t = POLICY_T_OPEN;
        break;
    case POLICY_BREAKER_HALF_OPEN:
        /* As a failed probe: the route was given a chance and failed. */
        cd = breaker_cooldown_ms(r, cur);
        max = r->cooldown_max * 1000;
        b.state = POLICY_BREAKER_OPEN;
        b.since_ms = now_ms;
        b.cooldown_ms = cd > max / 2 ? max : cd * 2;
        if (b.cooldown_ms < cd)
            b.cooldown_ms = cd;
        b.trips++;
        b.cause = cause;
        t = POLICY_T_REOPEN;
        break;
    case POLICY_BREAKER_OPEN:
        break;
    }
    *next = b;
    return t;
}

const char *policy_breaker_format(const struct policy_breaker *b, char *out, size_t n)
{
    snprintf(out, n, "state=%s since=%" PRId64 " cooldown=%" PRId64 " trips=%" PRIu32 " cause=%s",
             policy_breaker_state_name(b->state), b->since_ms, b->cooldown_ms, b->trips,
             policy_cause_name(b->cause));
    return out;
}

/* Iterates "k=v" words separated by blanks: calls fn for each and returns
 * -1 as soon as fn does or a word has no '='. */
static int parse_fields(const char *s, int (*fn)(void *ctx, const char *k, size_t klen,
                                                 const char *v, size_t vlen), void *ctx)
{
    while (*s) {
        size_t len;
        const char *eq;
        while (*s == ' ')
            s++;
        if (!*s)
            break;
        len = strcspn(s, " ");
        eq = memchr(s, '=', len);
        if (!eq || eq == s)
            return -1;
        if (fn(ctx, s, (size_t)(eq - s), eq + 1, len - (size_t)(eq - s) - 1) < 0)
            return -1;
        s += len;
    }
    return 0;
}

static int field_int(const char *v, size_t vlen, int64_t *out)
{
    char tmp[24];
    if (vlen == 0 || vlen >= sizeof(tmp))
        return -1;
    memcpy(tmp, v, vlen);
    tmp[vlen] = '\0';
    return parse_int(tmp, out);
}

static int field_name(const char *v, size_t vlen, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(names[i]) == vlen && !memcmp(names[i], v, vlen))
            return (int)i;
    return -1;
}

struct breaker_parse {
    struct policy_breaker *b;
    unsigned seen;
};

static int breaker_field(void *ctx, const char *k, size_t klen, const char *v, size_t vlen)
{
    struct breaker_parse *bp = ctx;
    static const char *const keys[] = {"state", "since", "cooldown", "trips", "cause"};
    int key = field_name(k, klen, keys, 5), x;
    int64_t i;

    if (key < 0 || (bp->seen & (1u << key)))
        return -1;
    bp->seen |= 1u << key;
    switch (key) {
    case 0:
        x = field_name(v, vlen, breaker_state_names, 3);
        if (x < 0)
            return -1;
        bp->b->state = (enum policy_breaker_state)x;
        return 0;
    case 1:
    case 2:
    case 3:
        if (field_int(v, vlen, &i) < 0)
            return -1;
        if (key == 1)
            bp->b->since_ms = i;
        else if (key == 2)
            bp->b->cooldown_ms = i;
        else if (i > UINT32_MAX)
            return -1;
        else
            bp->b->trips = (uint32_t)i;
        return 0;
    default:
        x = field_name(v, vlen, cause_names, sizeof(cause_names) / sizeof(cause_names[0]));
        if (x < 0)
            return -1;
        bp->b->cause = (enum policy_cause)x;
        return 0;
    }
}

int policy_breaker_parse(const char *s, struct policy_breaker *b)
{
    struct policy_breaker tmp;
    struct breaker_parse bp = {&tmp, 0};

    if (!s)
        return -1;
    memset(&tmp, 0, sizeof(tmp));
    if (parse_fields(s, breaker_field, &bp) < 0 || !(bp.seen & 1u))
        return -1;
    *b = tmp;
    return 0;
}

/* ---- Throttling --------------------------------------------------------- */

static const char *const reply_names[] = {
    [POLICY_REPLY_OK] = "ok", [POLICY_REPLY_TEMP] = "temp",
    [POLICY_REPLY_PERM] = "perm", [POLICY_REPLY_THROTTLE] = "throttle",
};

const char *policy_reply_name(enum policy_reply r)
{
    return NAMEOF(reply_names, r);
}

/* A digit, or a '.' between digits: part of the same status code. */
static bool code_char_before(const char *hay, size_t i)
{
    if (i == 0)
        return false;
    if (isdigit((unsigned char)hay[i - 1]))
        return true;
    return hay[i - 1] == '.' && i >= 2 && isdigit((unsigned char)hay[i - 2]);
}

static bool code_char_after(const char *p)
{
    return isdigit((unsigned char)p[0]) || (p[0] == '.' && isdigit((unsigned char)p[1]));
}

/* Case-insensitive search of pat (lower case) in hay with the digit
 * boundary rule of policy_classify_reply(). */
static bool pattern_in(const char *hay, const char *pat)
{
    size_t plen = strlen(pat), hlen;
    bool dstart, dend;

    if (!hay || plen == 0)
        return false;
    hlen = strlen(hay);
    dstart = isdigit((unsigned char)pat[0]);
    dend = isdigit((unsigned char)pat[plen - 1]);
    for (size_t i = 0; i + plen <= hlen; i++) {
        if (strncasecmp(hay + i, pat, plen) != 0)
            continue;
        if (dstart && code_char_before(hay, i))
            continue;
        if (dend && code_char_after(hay + i + plen))
            continue;
        return true;
    }
    return false;
}

enum policy_reply policy_classify_reply(const struct policy_config *cfg, int code,
                                        const char *enhanced, const char *text)
{
    if (code >= 200 && code <= 299)
        return POLICY_REPLY_OK;
    if (code >= 500 && code <= 599)
        return POLICY_REPLY_PERM;
    if (code >= 400 && code <= 499) {
        for (size_t i = 0; i < cfg->patterns.n; i++)
            if (pattern_in(enhanced, cfg->patterns.v[i]) || pattern_in(text, cfg->patterns.v[i]))
                return POLICY_REPLY_THROTTLE;
    }
    return POLICY_REPLY_TEMP;
}

void policy_throttle_hit(const struct policy_config *cfg, size_t i,
                         const struct policy_throttle *cur, int64_t now_ms,
                         struct policy_throttle *next)
{
    const struct route *r;
    int64_t base, max, backoff;
    uint32_t level;

    assert(i < cfg->nroutes);
    r = &cfg->routes[i];
    base = r->throttle_backoff * 1000;
    max = r->throttle_backoff_max * 1000;
    backoff = base;
    if (cur->until_ms > now_ms) {
        *next = *cur;
        return;
    }
    if (cur->level > 0 && now_ms < sat_add(cur->until_ms, max))
        level = cur->level < UINT32_MAX ? cur->level + 1 : cur->level;
    else
        level = 1;
    for (uint32_t l = 1; l < level && backoff < max; l++)
        backoff *= 2;
    if (backoff > max)
        backoff = max;
    if (backoff < base)         /* throttle_backoff_max below throttle_backoff */
        backoff = base;
    next->until_ms = sat_add(now_ms, backoff);
    next->level = level;
}

const char *policy_throttle_format(const struct policy_throttle *t, char *out, size_t n)
{
    snprintf(out, n, "until=%" PRId64 " level=%" PRIu32, t->until_ms, t->level);
    return out;
}

struct throttle_parse {
    struct policy_throttle *t;
    unsigned seen;
};

static int throttle_field(void *ctx, const char *k, size_t klen, const char *v, size_t vlen)
{
    struct throttle_parse *tp = ctx;
    static const char *const keys[] = {"until", "level"};
    int key = field_name(k, klen, keys, 2);
    int64_t i;

    if (key < 0 || (tp->seen & (1u << key)) || field_int(v, vlen, &i) < 0)
        return -1;
    tp->seen |= 1u << key;
    if (key == 0) {
        tp->t->until_ms = i;
    } else {
        if (i > UINT32_MAX)
            return -1;
        tp->t->level = (uint32_t)i;
    }
    return 0;
}

int policy_throttle_parse(const char *s, struct policy_throttle *t)
{
    struct policy_throttle tmp;
    struct throttle_parse tp = {&tmp, 0};

    if (!s)
        return -1;
    memset(&tmp, 0, sizeof(tmp));
    if (parse_fields(s, throttle_field, &tp) < 0 || tp.seen == 0)
        return -1;
    *t = tmp;
    return 0;
}
