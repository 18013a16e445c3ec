/*
 * admin: the small HTTP/1.1 endpoint of a mailferry process, for metrics
 * and health checks ([admin] listen; docs/metrics.md). libuv TCP, requests
 * parsed by http-parser 2.9.
 *
 *   GET /metrics   200, the registry in the Prometheus text format 0.0.4
 *                  (Content-Type: text/plain; version=0.0.4)
 *   GET /healthz   200 "ok": the process runs its loop (liveness)
 *   GET /readyz    200 "ok" when every readiness check passes, else 503
 *                  with one line "<check>: <reason>" per failing check
 *   other paths    404; methods other than GET and HEAD: 405 with Allow
 *
 * HEAD is answered as GET without the body (RFC 9110 section 9.3.2). The
 * query string is ignored. Connections are persistent unless the client
 * asks otherwise (RFC 9112 section 9.3), and pipelined requests are
 * answered in order. Limits: request line and headers 8 KiB together (431,
 * or 414 for a target over 1 KiB), request body 4 KiB (413), 64
 * connections (more are closed at accept), 30 s for each request to
 * arrive completely (the idle timeout), 1 MiB of unsent responses before
 * reading stops. A malformed request gets 400. After any error answer the
 * connection is closed: the response is sent, then the write side is shut
 * down and input is discarded for at most 2 s before the socket closes, so
 * the client reads the whole response.
 *
 * The endpoint has no authentication: bind it to loopback (the usual
 * 127.0.0.1:PORT) or to a network only the scraper reaches.
 *
 * Everything runs on the loop's thread, like the metrics registry it
 * serves (lib/metrics.h).
 */
#ifndef MF_ADMIN_H
#define MF_ADMIN_H

#include <stddef.h>
#include <uv.h>

#include "lib/config.h"
#include "lib/metrics.h"

struct admin;

/* A readiness check: returns 1 when ready, else 0 with a short reason
 * (one line) written into why. Called from the loop on each GET /readyz. */
typedef int (*admin_check_fn)(void *arg, char *why, size_t whylen);

/*
 * Listens on every address of addrs (at least one) and serves reg, which
 * must outlive the endpoint. Returns NULL with a message in err when an
 * address cannot be bound; the handles already opened are then closed by
 * the loop, as the caller is expected to exit.
 */
struct admin *admin_new(uv_loop_t *loop, const struct config_addr_list *addrs,
                        struct metrics *reg, char *err, size_t errlen);

/* Adds a readiness check named name (copied); checks run in the order they
 * were added. arg is passed to fn and must stay valid until admin_close(). */
void admin_add_check(struct admin *a, const char *name, admin_check_fn fn, void *arg);

/*
 * Stops listening and closes every connection: idle ones at once, ones
 * with a response still being written after it is sent (at most 2 s).
 * Then frees the endpoint and calls closed(arg) from the loop (closed may
 * be NULL). No check is called after admin_close() returns.
 */
void admin_close(struct admin *a, void (*closed)(void *arg), void *arg);

#endif
