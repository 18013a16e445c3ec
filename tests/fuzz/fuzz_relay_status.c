/*
 * libFuzzer harness for the relay transport's status parsers
 * (transports/relay.h): the EHLO keyword X-MAILFERRY-STATUS and the text of
 * an XSTATUS reply, both from the relay, i.e. from the network.
 *
 * The input is split at its first NUL: the part before is given to
 * relay_status_parse_keyword(), the whole input (up to the first NUL) is
 * also run through lib/smtp_reply as a raw reply and its text given to
 * relay_status_parse_xstatus(), as the transport does. The results must be
 * NUL-terminated within their fields and consistent with the return code.
 *
 * relay.c lives in mfnet (it needs libuv and the smtp transport), so the
 * harness links the rest of mailferry from a normal build, e.g.:
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -I. \
 *     tests/fuzz/fuzz_relay_status.c transports/relay.c \
 *     build/libmfnet.a build/libmfcore.a $(pkg-config --libs libuv openssl \
 *     hiredis libcares jansson libxcrypt libcurl gmime-3.0 inih opendkim) \
 *     -lhttp_parser -lm -o /tmp/fuzz_relay_status
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lib/smtp_reply.h"
#include "transports/relay.h"

static void check(const struct relay_status *st, int rc)
{
    if (memchr(st->failing, '\0', sizeof(st->failing)) == NULL ||
        memchr(st->reason, '\0', sizeof(st->reason)) == NULL)
        abort();
    if (rc != 0 && (st->state != RELAY_STATUS_UNKNOWN || st->failing[0] != '\0'))
        abort();
    if (rc == 0 && st->state == RELAY_STATUS_UNKNOWN)
        abort();
    (void)relay_status_name(st->state);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    struct relay_status st;
    struct smtp_reply r;
    size_t off = 0;

    if (s == NULL)
        return 0;
    memcpy(s, data, size);
    s[size] = '\0';
    check(&st, relay_status_parse_keyword(s, &st));
    check(&st, relay_status_parse_xstatus(s, &st));
    /* As the transport sees it: every complete reply in the input. */
    while (off < strlen(s)) {
        ssize_t n = smtp_reply_parse(s + off, strlen(s) - off, &r);

        if (n <= 0)
            break;
        check(&st, relay_status_parse_xstatus(r.text, &st));
        off += (size_t)n;
    }
    free(s);
    return 0;
}
