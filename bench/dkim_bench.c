/*
 * dkim_bench: DKIM signatures per second of gateway/dkim.c (run through
 * bench/dkim_bench.sh). Prints figures; it is not a test.
 *
 * For each key kind (RSA 2048 through libopendkim, Ed25519 through
 * OpenSSL) and message size (2 KB and 100 KB by default) it signs the same
 * message repeatedly on one thread for --seconds and prints signatures per
 * second and microseconds per signature, then the same with every key
 * signing at once (the gateway's default: both signatures on a message).
 * The gateway signs on libuv's threadpool (UV_THREADPOOL_SIZE threads,
 * default 4), so its ceiling is about that many times the one-thread
 * figure when the cores are there.
 *
 *   dkim_bench [--seconds S] [--sizes "2048 102400"] [--dir DIR]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "gateway/dkim.h"
#include "lib/buf.h"
#include "lib/config.h"
#include "lib/log.h"

static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A message of exactly size bytes: the header fields a submission has,
 * then lines of text. */
static void make_message(struct buf *m, size_t size)
{
    size_t i = 0;

    buf_appends(m, "From: Sender <sender@bench.example>\r\n"
                   "To: Recipient <rcpt@dest.example>\r\n"
                   "Subject: DKIM benchmark message\r\n"
                   "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
                   "Message-ID: <bench@bench.example>\r\n"
                   "MIME-Version: 1.0\r\n"
                   "Content-Type: text/plain; charset=utf-8\r\n"
                   "\r\n");
    while (m->len + 80 < size)
        buf_appendf(m, "line %06zu of the body, with  some   white space to canonicalise  \r\n",
                    i++);
    while (m->len + 2 < size)
        buf_append(m, "x", 1);
    buf_append(m, "\r\n", 2);
}

static void run(const struct dkim_keys *k, const char *label, const char *msg, size_t len,
                double seconds)
{
    struct buf out = BUF_INIT;
    char err[512];
    double t0 = now(), t;
    long n = 0;

    do {
        buf_reset(&out);
        if (dkim_sign_message(k, "bench.example", "bench", msg, len, &out, err, sizeof(err)) != 0) {
            fprintf(stderr, "dkim_bench: %s\n", err);
            exit(1);
        }
        n++;
        t = now() - t0;
    } while (t < seconds);
    printf("  %-28s %8zu bytes  %9.0f messages/s  %8.1f us/message\n", label, len, n / t,
           t * 1e6 / n);
    buf_free(&out);
}

static struct dkim_keys *load(const char *dir, const char *only)
{
    struct mf_config cfg;
    char err[512], table[600];
    struct dkim_keys *k;
    FILE *f;

    memset(&cfg, 0, sizeof(cfg));
    snprintf(table, sizeof(table), "%s/table-%s", dir, only);
    f = fopen(table, "w");
    if (f == NULL) {
        perror(table);
        exit(1);
    }
    if (strcmp(only, "rsa") == 0 || strcmp(only, "both") == 0)
        fprintf(f, "bench.example rsa1 rsa %s/rsa.pem\n", dir);
    if (strcmp(only, "ed25519") == 0 || strcmp(only, "both") == 0)
        fprintf(f, "bench.example ed1 ed25519 %s/ed25519.pem\n", dir);
    fclose(f);
    cfg.dkim.enabled = 1;
    cfg.dkim.key_table = table;
    cfg.dkim.sign_headers = "From,Sender,Reply-To,Subject,Date,Message-ID,To,Cc,MIME-Version,"
                            "Content-Type,Content-Transfer-Encoding";
    cfg.dkim.oversign_headers = "From,Reply-To,Subject,Date,To,Cc";
    k = dkim_keys_load(&cfg, err, sizeof(err));
    if (k == NULL) {
        fprintf(stderr, "dkim_bench: %s\n", err);
        exit(1);
    }
    return k;
}

int main(int argc, char **argv)
{
    double seconds = 2.0;
    const char *sizes = "2048 102400", *dir = NULL;
    char tmpl[] = "/tmp/dkim_bench.XXXXXX", path[600], err[512], *rec;
    static const char *const kinds[] = {"rsa", "ed25519", "both"};
    static const char *const labels[] = {"rsa-sha256 (RSA 2048)", "ed25519-sha256",
                                         "both (one message, two)"};

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc)
            seconds = strtod(argv[++i], NULL);
        else if (strcmp(argv[i], "--sizes") == 0 && i + 1 < argc)
            sizes = argv[++i];
        else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc)
            dir = argv[++i];
        else {
            fprintf(stderr, "usage: dkim_bench [--seconds S] [--sizes \"2048 102400\"] "
                    "[--dir DIR]\n");
            return 2;
        }
    }
    log_set_level("error");
    if (dir == NULL && (dir = mkdtemp(tmpl)) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(path, sizeof(path), "%s/rsa.pem", dir);
    unlink(path);
    if (dkim_keygen(DKIM_ALG_RSA, 2048, path, &rec, err, sizeof(err)) != 0) {
        fprintf(stderr, "dkim_bench: %s\n", err);
        return 1;
    }
    free(rec);
    snprintf(path, sizeof(path), "%s/ed25519.pem", dir);
    unlink(path);
    if (dkim_keygen(DKIM_ALG_ED25519, 0, path, &rec, err, sizeof(err)) != 0) {
        fprintf(stderr, "dkim_bench: %s\n", err);
        return 1;
    }
    free(rec);

    printf("== DKIM signing, one thread, %.1f s per figure (relaxed/relaxed)\n", seconds);
    for (size_t k = 0; k < 3; k++) {
        struct dkim_keys *keys = load(dir, kinds[k]);
        const char *p = sizes;

        while (*p) {
            char *end;
            size_t size = strtoul(p, &end, 10);
            struct buf m = BUF_INIT;

            if (end == p)
                break;
            p = end + strspn(end, " ,");
            make_message(&m, size < 512 ? 512 : size);
            run(keys, labels[k], m.data, m.len, seconds);
            buf_free(&m);
        }
        dkim_keys_unref(keys);
    }
    for (size_t k = 0; k < 3; k++) {
        char t[700];
        snprintf(t, sizeof(t), "%s/table-%s", dir, kinds[k]);
        unlink(t);
    }
    snprintf(path, sizeof(path), "%s/rsa.pem", dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/ed25519.pem", dir);
    unlink(path);
    if (dir == tmpl)
        rmdir(dir);
    return 0;
}
