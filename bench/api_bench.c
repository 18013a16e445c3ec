/*
 * api_bench: messages per second through the api transport (libcurl
 * multi-socket on libuv, keep-alive) to a fake provider API, at each
 * concurrency (the route's max_connections). It prints figures; it is not
 * a test. bench/api_bench.sh starts the fake and runs this.
 *
 * Each message is SIZE bytes (headers and a text body) to one recipient.
 * The program keeps 2 x concurrency sends outstanding (as the router's
 * concurrency would), so the transport always has work waiting behind its
 * cap. Time runs from the first send to the last done callback; every
 * result must be "delivered". client_cpu_us is this process's CPU time
 * (user + system) per message: the transport's own cost, TLS included.
 *
 * Usage: api_bench --provider P --base-url URL --ca-file F --secret S
 *                  [--messages N] [--size BYTES] [--concurrency "1 16 64"]
 *                  [--domain D] [--region R] [--access-key-id ID]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>

#include "lib/buf.h"
#include "lib/config.h"
#include "lib/log.h"
#include "transports/api.h"

struct bench {
    uv_loop_t *loop;
    struct transport *t;
    struct transport_msg msg;
    long total, sent, done, delivered, failed;
    long window;
    char first_failure[600];
    int closed;
};

static void bench_pump(struct bench *b);

static void on_done(const struct transport_result *res, void *arg)
{
    struct bench *b = arg;

    b->done++;
    if (res->nrcpts == 1 && res->rcpt[0].code / 100 == 2) {
        b->delivered++;
    } else {
        if (b->failed++ == 0)
            snprintf(b->first_failure, sizeof(b->first_failure), "%d %s %s",
                     res->nrcpts ? res->rcpt[0].code : 0,
                     res->nrcpts ? res->rcpt[0].enhanced : "",
                     res->nrcpts ? res->rcpt[0].text : "no result");
    }
    bench_pump(b);
}

static void bench_pump(struct bench *b)
{
    while (b->sent < b->total && b->sent - b->done < b->window) {
        b->sent++;
        api_transport_ops.send(b->t, &b->msg, on_done, b);
    }
}

static void on_closed(void *arg)
{
    ((struct bench *)arg)->closed = 1;
}

static const char *arg_of(int argc, char **argv, const char *name, const char *def)
{
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0)
            return argv[i + 1];
    return def;
}

int main(int argc, char **argv)
{
    const char *provider = arg_of(argc, argv, "--provider", NULL);
    const char *base_url = arg_of(argc, argv, "--base-url", NULL);
    const char *ca_file = arg_of(argc, argv, "--ca-file", NULL);
    const char *secret = arg_of(argc, argv, "--secret", NULL);
    long messages = strtol(arg_of(argc, argv, "--messages", "20000"), NULL, 10);
    long size = strtol(arg_of(argc, argv, "--size", "2048"), NULL, 10);
    char *conc = strdup(arg_of(argc, argv, "--concurrency", "1 16 64"));
    const char *rcpts[] = {"rcpt@d.test"};
    struct buf m = BUF_INIT;
    char *save = NULL, *tok;
    int rc = 0;

    if (provider == NULL || base_url == NULL || ca_file == NULL || secret == NULL ||
        messages <= 0 || size < 300) {
        fprintf(stderr, "usage: api_bench --provider P --base-url URL --ca-file F --secret S "
                        "[--messages N] [--size BYTES] [--concurrency \"1 16 64\"]\n");
        return 2;
    }
    log_set_level("warn");
    setenv("MF_BENCH_SECRET", secret, 1);
    setenv("MF_BENCH_KEY_ID", arg_of(argc, argv, "--access-key-id", "AKIDBENCH"), 1);

    /* A SIZE-byte message: headers, then lines of text. */
    buf_appends(&m, "From: Bench <bench@x.test>\r\nTo: <rcpt@d.test>\r\n"
                    "Subject: api transport benchmark\r\nMessage-ID: <bench@x.test>\r\n"
                    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n");
    while (m.len + 2 < (size_t)size) {
        size_t n = (size_t)size - m.len - 2;

        if (n > 76)
            n = 76;
        for (size_t i = 0; i < n; i++)
            buf_append(&m, &"abcdefghijklmnopqrstuvwxyz0123456789"[i % 36], 1);
        buf_appends(&m, "\r\n");
    }

    printf("api transport benchmark: provider %s, %ld messages of %zu bytes per run, "
           "keep-alive\n", provider, messages, m.len);
    printf("%12s %10s %10s %12s %14s\n", "concurrency", "messages", "seconds", "messages/s",
           "client_cpu_us");
    for (tok = strtok_r(conc, " ,", &save); tok != NULL; tok = strtok_r(NULL, " ,", &save)) {
        uv_loop_t loop;
        struct bench b;
        struct config_named kv[12];
        size_t n = 0;
        char err[600];
        uint64_t t0, t1;
        double secs, cpu0, cpu1;
        struct rusage ru;

#define KV(k, v)                                                                        \
    do {                                                                                \
        kv[n].kind = (char *)"route";                                                   \
        kv[n].name = (char *)"bench";                                                   \
        kv[n].key = (char *)(k);                                                        \
        kv[n].value = (char *)(v);                                                      \
        n++;                                                                            \
    } while (0)
        KV("provider", provider);
        KV("base_url", base_url);
        KV("ca_file", ca_file);
        KV("max_connections", tok);
        if (strcmp(provider, "ses") == 0) {
            KV("region", arg_of(argc, argv, "--region", "eu-west-1"));
            KV("access_key_id_env", "MF_BENCH_KEY_ID");
            KV("secret_key_env", "MF_BENCH_SECRET");
        } else if (strcmp(provider, "webhook") == 0) {
            KV("webhook_secret_env", "MF_BENCH_SECRET");
        } else {
            KV("api_key_env", "MF_BENCH_SECRET");
        }
        if (strcmp(provider, "mailgun") == 0)
            KV("domain", arg_of(argc, argv, "--domain", "mg.test"));
#undef KV
        uv_loop_init(&loop);
        memset(&b, 0, sizeof(b));
        b.loop = &loop;
        b.total = messages;
        b.window = 2 * strtol(tok, NULL, 10);
        b.msg.id = "bench";
        b.msg.from = "bench@x.test";
        b.msg.rcpts = rcpts;
        b.msg.nrcpts = 1;
        b.msg.data = m.data;
        b.msg.len = m.len;
        b.t = api_transport_ops.create(&loop, "bench", kv, n, err, sizeof(err));
        if (b.t == NULL) {
            fprintf(stderr, "api_bench: %s\n", err);
            return 1;
        }
        getrusage(RUSAGE_SELF, &ru);
        cpu0 = (double)ru.ru_utime.tv_sec * 1e6 + (double)ru.ru_utime.tv_usec +
               (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec;
        t0 = uv_hrtime();
        bench_pump(&b);
        while (b.done < b.total && uv_run(&loop, UV_RUN_ONCE))
            ;
        t1 = uv_hrtime();
        getrusage(RUSAGE_SELF, &ru);
        cpu1 = (double)ru.ru_utime.tv_sec * 1e6 + (double)ru.ru_utime.tv_usec +
               (double)ru.ru_stime.tv_sec * 1e6 + (double)ru.ru_stime.tv_usec;
        api_transport_ops.close(b.t, on_closed, &b);
        while (!b.closed && uv_run(&loop, UV_RUN_ONCE))
            ;
        uv_run(&loop, UV_RUN_DEFAULT);
        uv_loop_close(&loop);
        secs = (double)(t1 - t0) / 1e9;
        printf("%12s %10ld %10.2f %12.0f %14.0f\n", tok, b.done, secs,
               (double)b.delivered / secs, (cpu1 - cpu0) / (double)(b.done ? b.done : 1));
        fflush(stdout);
        if (b.failed > 0) {
            fprintf(stderr, "api_bench: %ld of %ld not delivered; first: %s\n", b.failed,
                    b.done, b.first_failure);
            rc = 1;
        }
    }
    free(conc);
    buf_free(&m);
    return rc;
}
