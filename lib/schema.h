/*
 * schema: the names of mailferry's keys and fields in Redis, in one place.
 *
 * Every key is the configured prefix ([queue] prefix, default "mf:")
 * followed by one of the names below; docs/queue.md explains each one and
 * who writes it. Gateway, router and mailferryctl all build names from
 * here, so the schema cannot drift between them.
 */
#ifndef MF_SCHEMA_H
#define MF_SCHEMA_H

/* hash msg:<id>: one queued message. Written by the gateway (and by the
 * router for bounces); per-recipient state and attempt bookkeeping are
 * added by the router. */
#define SCHEMA_MSG "msg:"
#define SCHEMA_F_FROM "from"              /* envelope sender, "" for <> */
#define SCHEMA_F_RCPTS "rcpts"            /* JSON array of recipients */
#define SCHEMA_F_DATA "data"              /* exact message bytes */
#define SCHEMA_F_SIZE "size"
#define SCHEMA_F_CREATED "created"        /* ms since the epoch */
#define SCHEMA_F_CLIENT_IP "client_ip"
#define SCHEMA_F_HELO "helo"
#define SCHEMA_F_AUTH_USER "auth_user"
#define SCHEMA_F_CLASS "class"            /* X-Mailferry-Class */
#define SCHEMA_F_GATEWAY "gateway"        /* host name of the accepting gateway */
#define SCHEMA_F_ATTEMPTS "attempts"      /* delivery rounds that left recipients deferred */
#define SCHEMA_F_NEXT "next_attempt"      /* ms since the epoch */
/* "st:<index>": JSON object with the state of recipient <index>:
 * {"s":"delivered"|"failed"|"deferred", "code":250, "enh":"2.0.0",
 *  "text":"...", "route":"relay", "t":<ms>, "n":<attempts>} */
#define SCHEMA_F_RCPT_STATE "st:"

/* stream ready, consumer group "routers": entries {id: <id>} ready to route. */
#define SCHEMA_READY "ready"
#define SCHEMA_GROUP "routers"
#define SCHEMA_F_ID "id"

/* sorted set retry: member <id>, score = due time in ms. */
#define SCHEMA_RETRY "retry"

/* stream dead: {id, reason, from}: messages that failed without a way to
 * bounce (null sender) or could not be bounced. The message hash stays. */
#define SCHEMA_DEAD "dead"

/* stream events (capped): one entry per delivery attempt outcome. */
#define SCHEMA_EVENTS "events"

/* hash policy: live overrides of the routing policy (docs/policy.md). */
#define SCHEMA_POLICY "policy"

/* string cnt:<route>:<m|h|d>:<bucket> and cnt:<route>:<domain>:<m|h|d>:<bucket>:
 * recipients committed to a route in a UTC minute/hour/day (TTL). */
#define SCHEMA_COUNT "cnt:"

/* hash win:<route>[:<domain>]:<bucket>: outcomes in a reputation window
 * bucket, fields sent, bounced, deferred, complained (TTL). */
#define SCHEMA_WINDOW "win:"

/* string brk:<route>[:<domain>]: a circuit breaker (policy_breaker_format). */
#define SCHEMA_BREAKER "brk:"

/* hash probe:<route>[:<domain>]:<since_ms>: fields ok, bad (TTL). */
#define SCHEMA_PROBE "probe:"

/* string thr:<route>:<domain>: a throttle backoff (policy_throttle_format). */
#define SCHEMA_THROTTLE "thr:"

/* hash stats:<route>:<hour>: delivered, deferred, bounced, held per UTC
 * hour (TTL 2 days); route "hold" counts held groups. */
#define SCHEMA_STATS "stats:"

/* hash health:<route>: the health a router last saw for a route: fields
 * healthy (0/1), why, t (ms), router. */
#define SCHEMA_HEALTH "health:"

#endif
