/*
 * dkim_cmd: "mailferryctl dkim keygen|records". See dkim_cmd.h.
 */
#include "ctl/dkim_cmd.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "ctl/ctl.h"
#include "gateway/dkim.h"
#include "lib/buf.h"
#include "lib/config.h"
#include "lib/xmalloc.h"

/* RFC 1035 section 3.3.14: a character-string holds at most 255 octets. */
#define TXT_STRING_MAX 255

const char ctl_dkim_usage[] =
    "  dkim keygen DOMAIN SELECTOR [--type rsa|ed25519] [--bits N] [--dir DIR | --out FILE]\n"
    "                         make a signing key (RSA 2048 by default) with mode 0600\n"
    "                         in [dkim] keys_dir (or DIR, or FILE) and print the TXT\n"
    "                         record to publish\n"
    "  dkim records [DOMAIN]  the TXT record of every configured key\n";

static int usage_error(const char *what)
{
    ctl_error("%s", what);
    fprintf(stderr, "usage:\n%s", ctl_dkim_usage);
    return CTL_EXIT_USAGE;
}

/* Writes the zone-file form of record at name: quoted strings of at most
 * 255 octets, split after the tags before p= and then every 250 octets of
 * the key, which a 2048-bit RSA key needs (RFC 6376 section 3.6.2.2: the
 * reader joins them). */
static void print_zone_record(FILE *out, const char *name, const char *record)
{
    const char *p = strstr(record, "p=");
    size_t head = p ? (size_t)(p - record) : strlen(record);

    fprintf(out, "  %s. 3600 IN TXT (", name);
    if (head > 0)
        fprintf(out, " \"%.*s\"", (int)head, record);
    for (const char *q = record + head; *q;) {
        size_t n = strlen(q);
        if (n > TXT_STRING_MAX - 5)
            n = TXT_STRING_MAX - 5;
        fprintf(out, "\n      \"%.*s\"", (int)n, q);
        q += n;
    }
    fprintf(out, " )\n");
}

static void print_record(FILE *out, const char *selector, const char *domain,
                         const char *record)
{
    char name[600];

    snprintf(name, sizeof(name), "%s._domainkey.%s", selector, domain);
    fprintf(out, "TXT record name:\n  %s\nvalue (DNS panels join long values themselves):\n  %s\n"
            "zone file:\n", name, record);
    print_zone_record(out, name, record);
}

static int load_config(const char *path, struct mf_config *cfg)
{
    char err[1024];

    if (config_load(cfg, path, err, sizeof(err)) != 0) {
        ctl_error("%s", err);
        return CTL_EXIT_USAGE;
    }
    return CTL_EXIT_OK;
}

/* A domain or selector as DNS and file names take it. */
static int name_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > 253 || s[0] == '.' || s[0] == '-' || s[n - 1] == '.')
        return 0;
    for (const char *p = s; *p; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '_' || *p == '.'))
            return 0;
        if (*p == '.' && p[1] == '.')
            return 0;
    }
    return 1;
}

static int cmd_keygen(int argc, char **argv, const char *config_path)
{
    const char *domain = NULL, *selector = NULL, *dir = NULL, *out = NULL;
    enum dkim_alg alg = DKIM_ALG_RSA;
    long bits = 2048;
    struct mf_config cfg;
    char path[PATH_MAX], err[512], dlow[256];
    char *record = NULL;
    int have_cfg = 0, rc;

    memset(&cfg, 0, sizeof(cfg));
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;

        if (strcmp(a, "--type") == 0 || strcmp(a, "--bits") == 0 || strcmp(a, "--dir") == 0 ||
            strcmp(a, "--out") == 0) {
            if (v == NULL) {
                snprintf(err, sizeof(err), "dkim keygen: %s needs a value", a);
                return usage_error(err);
            }
            i++;
            if (strcmp(a, "--type") == 0) {
                if (dkim_alg_parse(v, &alg) != 0)
                    return usage_error("dkim keygen: --type must be rsa or ed25519");
            } else if (strcmp(a, "--bits") == 0) {
                char *end;
                errno = 0;
                bits = strtol(v, &end, 10);
                if (errno || *end || end == v || bits < 1024 || bits > 8192)
                    return usage_error("dkim keygen: --bits must be 1024 to 8192");
            } else if (strcmp(a, "--dir") == 0) {
                dir = v;
            } else {
                out = v;
            }
        } else if (a[0] == '-' && a[1] != '\0') {
            snprintf(err, sizeof(err), "dkim keygen: unknown option \"%s\"", a);
            return usage_error(err);
        } else if (domain == NULL) {
            domain = a;
        } else if (selector == NULL) {
            selector = a;
        } else {
            snprintf(err, sizeof(err), "dkim keygen: unexpected argument \"%s\"", a);
            return usage_error(err);
        }
    }
    if (domain == NULL || selector == NULL)
        return usage_error("dkim keygen: DOMAIN and SELECTOR expected");
    if (dir && out)
        return usage_error("dkim keygen: give --dir or --out, not both");
    if (!name_ok(domain) || strchr(domain, '.') == NULL)
        return usage_error("dkim keygen: DOMAIN must be a domain name such as example.com");
    /* keys_dir names hold no dot in the selector; key_table ones may. */
    if (!name_ok(selector) || (out == NULL && strchr(selector, '.') != NULL))
        return usage_error("dkim keygen: SELECTOR must be letters, digits and hyphens "
                           "(a dotted selector needs --out and a key_table line)");
    if (alg == DKIM_ALG_ED25519 && bits != 2048)
        return usage_error("dkim keygen: --bits applies to RSA keys only");
    snprintf(dlow, sizeof(dlow), "%s", domain);
    for (char *p = dlow; *p; p++)
        *p = (char)(*p >= 'A' && *p <= 'Z' ? *p - 'A' + 'a' : *p);

    if (out == NULL && dir == NULL) {
        rc = load_config(config_path, &cfg);
        if (rc != CTL_EXIT_OK)
            return rc;
        have_cfg = 1;
        dir = cfg.dkim.keys_dir;
        if (dir == NULL) {
            config_free(&cfg);
            return usage_error("dkim keygen: [dkim] keys_dir is not set; set it, or give "
                               "--dir DIR or --out FILE");
        }
    }
    if (out)
        snprintf(path, sizeof(path), "%s", out);
    else if ((size_t)snprintf(path, sizeof(path), "%s/%s.%s.%s.key", dir, dlow, selector,
                              dkim_alg_name(alg)) >= sizeof(path)) {
        if (have_cfg)
            config_free(&cfg);
        return usage_error("dkim keygen: path too long");
    }
    rc = dkim_keygen(alg, (int)bits, path, &record, err, sizeof(err));
    if (have_cfg)
        config_free(&cfg);
    if (rc != 0) {
        ctl_error("dkim keygen: %s", err);
        return CTL_EXIT_RUNTIME;
    }
    if (alg == DKIM_ALG_RSA)
        printf("wrote %s (rsa, %ld bits, mode 0600)\n\n", path, bits);
    else
        printf("wrote %s (ed25519, mode 0600)\n\n", path);
    print_record(stdout, selector, dlow, record);
    if (out)
        printf("\nkey_table line:\n  %s %s %s %s\n", dlow, selector, dkim_alg_name(alg), path);
    printf("\nThe key must stay readable by the gateway's user only. Publish the record,\n"
           "check it with \"mailferryctl dns check %s\", then reload the gateway\n"
           "(SIGHUP) to sign with the key.\n", dlow);
    free(record);
    return CTL_EXIT_OK;
}

static int cmd_records(int argc, char **argv, const char *config_path)
{
    struct mf_config cfg;
    struct dkim_keys *keys;
    const char *domain = NULL;
    char err[1024];
    size_t shown = 0;
    int rc;

    if (argc > 1)
        return usage_error("dkim records: at most one DOMAIN expected");
    if (argc == 1)
        domain = argv[0];
    rc = load_config(config_path, &cfg);
    if (rc != CTL_EXIT_OK)
        return rc;
    keys = dkim_keys_load(&cfg, err, sizeof(err));
    if (keys == NULL) {
        ctl_error("%s", err);
        config_free(&cfg);
        return CTL_EXIT_RUNTIME;
    }
    for (size_t i = 0; i < dkim_keys_count(keys); i++) {
        const struct dkim_key_info *k = dkim_keys_get(keys, i);
        char what[64];

        if (domain && strcasecmp(domain, k->domain) != 0)
            continue;
        if (k->alg == DKIM_ALG_RSA)
            snprintf(what, sizeof(what), "rsa, %d bits", k->bits);
        else
            snprintf(what, sizeof(what), "ed25519");
        printf("%s%s selector %s (%s), key %s\n", shown ? "\n" : "", k->domain, k->selector,
               what, k->path);
        print_record(stdout, k->selector, k->domain, k->record);
        shown++;
    }
    if (shown == 0) {
        if (!cfg.dkim.enabled)
            ctl_error("DKIM signing is disabled ([dkim] enabled = no)");
        else if (domain)
            ctl_error("no DKIM key is configured for %s", domain);
        else
            ctl_error("no DKIM key is configured ([dkim] keys_dir, key_table)");
        rc = CTL_EXIT_RUNTIME;
    }
    dkim_keys_unref(keys);
    config_free(&cfg);
    return rc;
}

int ctl_dkim_main(int argc, char **argv, const char *config_path)
{
    if (argc < 2)
        return usage_error("dkim: keygen or records expected");
    if (strcmp(argv[1], "keygen") == 0)
        return cmd_keygen(argc - 2, argv + 2, config_path);
    if (strcmp(argv[1], "records") == 0)
        return cmd_records(argc - 2, argv + 2, config_path);
    {
        char err[300];
        snprintf(err, sizeof(err), "dkim: unknown subcommand \"%.200s\"", argv[1]);
        return usage_error(err);
    }
}
