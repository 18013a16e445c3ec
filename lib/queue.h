/*
 * queue: mailferry's queue in Redis, written through lib/redis.c on the
 * libuv loop.
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
 * returned both results (and WAIT reached the replicas). Everything else
 * reports failure. Nothing is ever half-written (MULTI/EXEC), but a failure
 * does not always mean nothing was written: a transaction whose EXEC had
 * reached Redis when the connection was lost or abandoned at [queue]
 * timeout (err "redis: outcome unknown") may have executed, or may still
 * execute when a paused Redis resumes; a WAIT that falls short leaves the
 * message on the primary. The client then sends again and the message is
 * queued twice under two ids: delivery is at least once.
 *
 * Connection (lib/redis.c): established at queue_new() and re-established
 * after loss with exponential backoff (100 ms doubling to 5 s), so mail
 * flows again when Redis comes back, without a restart. At each connect
 * the module AUTHs and SELECTs as the URL says, logs a warning when Redis
 * reports appendonly off, and creates the consumer group (XGROUP CREATE
 * <prefix>ready routers 0 MKSTREAM) before accepting enqueues.
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

/*
 * status 0 on success (err NULL), else a negative code with err, a short
 * reason for logs valid during the call only:
 *   -ENOTCONN    not connected ("redis: not connected");
 *   -ETIMEDOUT   no answer within [queue] timeout ("redis: timeout", or
 *                "redis: outcome unknown" once EXEC was sent);
 *   -ECONNRESET  connection lost ("redis: connection lost", or
 *                "redis: outcome unknown" once EXEC was sent);
 *   -ECANCELED   queue_close() was called ("redis: closed", or "redis:
 *                outcome unknown" once EXEC was sent);
 *   -EIO         Redis answered with an error (its text, or "redis:
 *                transaction failed: <error>"), or WAIT fell short
 *                ("redis: WAIT reached <n> of <m> replicas");
 *   -EINVAL      a recipient is not valid UTF-8 (nothing was sent).
 */
typedef void (*queue_enqueue_cb)(int status, const char *err, void *arg);

/* Creates the client and starts connecting. cfg must outlive the queue. */
struct queue *queue_new(uv_loop_t *loop, const struct mf_config *cfg);

/*
 * Closes the connection. Pending enqueue callbacks are called with an
 * error, from the loop, as are those of enqueues made after this call and
 * before on_closed; then on_closed(arg) is called once every handle is
 * closed and the memory released. No callback is made after on_closed,
 * and q must not be used then.
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

/* on_change is called from the loop, never from inside queue_enqueue(),
 * with paused=1 when queue_pending_bytes() reaches high_water and paused=0
 * when it then drops below low_water. Not called after queue_close(). */
void queue_set_backpressure(struct queue *q, size_t high_water, size_t low_water,
                            void (*on_change)(int paused, void *arg), void *arg);

#endif
