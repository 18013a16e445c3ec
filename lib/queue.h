/*
 * queue: mailferry's queue in Redis (hiredis async on the libuv loop).
 *
 * The schema is documented in docs/queue.md; this module is the only code
 * that writes it. Keys start with [queue] prefix (default "mf:"):
 *
 *   <prefix>msg:<id>   hash: from, rcpts (JSON array of strings), data (the
 *                      exact bytes to send), size, created (ms since the
 *                      epoch), client_ip, helo, auth_user (may be empty),
 *                      class (X-Mailferry-Class or empty), gateway
 *   <prefix>ready      stream, consumer group "routers": entries {id: <id>}
 *
 * Durability contract: queue_enqueue() sends MULTI, HSET, XADD, EXEC (then
 * WAIT when [queue] wait_replicas > 0) and reports success only when EXEC
 * returned both results (and WAIT reached the replicas). Any error, a lost
 * connection or a command older than [queue] timeout reports failure; the
 * MULTI then never executed, so nothing is half-written.
 *
 * Connection: established at queue_new() and re-established after loss
 * with exponential backoff (100 ms doubling to 5 s), so mail flows again
 * when Redis comes back, without a restart. At each connect the module
 * AUTHs and SELECTs as the URL says and logs a warning when Redis reports
 * appendonly off.
 */
#ifndef MF_QUEUE_H
#define MF_QUEUE_H

#include <stddef.h>
#include <uv.h>

#include "lib/config.h"

/* Queue ids: 12 hex digits of milliseconds since the epoch then 10 hex
 * digits of randomness (RAND_bytes): sortable by time, unique across
 * gateways without coordination. */
#define QUEUE_ID_LEN 22

struct queue;

struct queue_msg {
    const char *from;            /* "" for the null sender */
    const char *const *rcpts;
    size_t nrcpts;
    const char *data;            /* message bytes, as they will be sent */
    size_t datalen;
    const char *client_ip;
    const char *helo;
    const char *auth_user;       /* NULL or "" when not authenticated */
    const char *msg_class;       /* NULL or "" when none */
};

/* status 0 on success, else a negative code; err is a short reason for
 * logs ("redis: connection lost", "redis: timeout", or Redis's error). */
typedef void (*queue_enqueue_cb)(int status, const char *err, void *arg);

/* Creates the client and starts connecting. cfg must outlive the queue. */
struct queue *queue_new(uv_loop_t *loop, const struct mf_config *cfg);

/*
 * Closes the connection. Pending enqueue callbacks are called with an
 * error, from the loop; then on_closed(arg) is called once every handle is
 * closed and the memory released. No callback is made after on_closed.
 */
void queue_close(struct queue *q, void (*on_closed)(void *arg), void *arg);

/* Generates a new id (QUEUE_ID_LEN characters plus NUL). */
void queue_id_new(char out[QUEUE_ID_LEN + 1]);

/*
 * Stores a message under id. The strings are copied before return. cb is
 * called exactly once, always from the loop (never from inside this call),
 * also when the queue is disconnected (immediate failure) or closed.
 */
void queue_enqueue(struct queue *q, const char *id, const struct queue_msg *m,
                   queue_enqueue_cb cb, void *arg);

/* 1 when connected and ready for commands. */
int queue_ready(const struct queue *q);

/* Bytes of commands handed to Redis whose replies have not arrived. */
size_t queue_pending_bytes(const struct queue *q);

/* Called (from the loop) each time queue_pending_bytes() drops below
 * low_water after having been above high_water. */
void queue_set_backpressure(struct queue *q, size_t high_water, size_t low_water,
                            void (*on_change)(int paused, void *arg), void *arg);

#endif
