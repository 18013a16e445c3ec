#!/usr/bin/python3
"""mailferry router benchmark (run through bench/router.sh).

Measures messages per second from a queue that is already full, through an
SMTP client, to Postfix's smtp-sink, for three systems side by side in one
run:

  postfix   a private Postfix instance relaying to the sink
            (relayhost = [127.0.0.1]:SINK). Its queue is filled first by
            smtp-source while defer_transports = smtp holds every message;
            then defer_transports is cleared, Postfix reloaded, and the time
            runs from "postqueue -f" until the queue is empty.
  mf x1     one "mailferry router" (consumer r1) with a route
            "transport = smtp" to the sink.
  mf x2     two routers (consumers r1 and r2) on the same queue.

For mailferry the message hashes are written into Redis first
(<prefix>msg:<id>, the gateway's ten fields), the routers are started and
wait on the empty <prefix>ready stream, and the time runs from the moment
the N stream entries are appended (one pipelined write) until the consumer
group "routers" has read all of them and holds none pending: the router
acknowledges an entry only once every recipient is final and the hash is
deleted.

Every system gets a fresh smtp-sink (same options), so the sink counts what
each delivered. CPU time comes from /proc/PID/stat: the routers plus
redis-server (and its reaped children), every Postfix process (the master,
its live children and the children it reaped), and the sink separately.

Targets (from the issue): mf x1 >= 3 x postfix; mf x2 >= 1.8 x mf x1.
Figures only: the exit status is 0 when the run completed, whatever the
figures, and 1 when something failed to run.

Every process started here is stopped on exit (also on SIGINT/SIGTERM);
router.sh keeps a second line of defence from the pids file in the work
directory.
"""

import argparse
import os
import sys
import time

from benchlib import (POSTCONF, POSTFIX, BenchError, Postfix, Procs, Redis, RedisReplyError,
                      Sink, add_common_args, cpu_seconds, free_port, log, median, pairs,
                      postfix_version, print_ratios, print_title, redis_version,
                      require_executable, resp_encode, run, run_source, stop_popen)

POSTQUEUE = "/usr/sbin/postqueue"
PREFIX = "rb:"
MAIL_FROM = "a@bench.test"
RCPT_TO = "u@dest.test"
ROUTE = "sink"


# ---------------------------------------------------------------- the message

def message_data(size, now):
    """A message like smtp-source's: a trace header, From, To, Date,
    Message-Id, and `size` bytes of numbered lines of X, CRLF line ends
    (the exact bytes the gateway would store)."""
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now))
    head = (f"Received: from bench.test (localhost [127.0.0.1])\r\n"
            f"\tby gateway.bench.test (mailferry) with ESMTP;\r\n\t{date}\r\n"
            f"From: <{MAIL_FROM}>\r\n"
            f"To: <{RCPT_TO}>\r\n"
            f"Date: {date}\r\n"
            f"Message-Id: <bench.{int(now)}@bench.test>\r\n"
            f"Subject: router benchmark\r\n"
            f"\r\n").encode()
    body = bytearray()
    i = 1
    while len(body) < size:
        line = (str(i) + "X" * 78)[:78] + "\r\n"
        body += line.encode()
        i += 1
    return head + bytes(body[:size])


def queue_ids(n):
    ms = int(time.time() * 1000)
    rnd = os.urandom(5 * n)
    return [f"{ms:012x}{rnd[5 * i:5 * i + 5].hex()}" for i in range(n)]


# ---------------------------------------------------------------- Postfix

# Added to benchlib's main.cf (which holds every message with
# defer_transports = smtp while the queue is filled; it is cleared before the
# measurement): relay everything to the sink, over reused connections.
EXTRA_MAIN_CF = """\
relayhost = [127.0.0.1]:{sink}
smtp_tls_security_level = none
smtp_connection_cache_on_demand = yes
default_destination_concurrency_limit = {conns}
smtp_destination_concurrency_limit = {conns}
"""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


class RelayPostfix(Postfix):
    def __init__(self, procs, workdir, tag, sink_port, conns, keep):
        super().__init__(procs, workdir, tag, keep, max(100, 2 * conns + 20),
                         EXTRA_MAIN_CF.format(sink=sink_port, conns=conns))

    def settle(self, expected, timeout):
        """Waits until every message received has been deferred; returns
        the number in the deferred queue."""
        self.wait_deferred(expected, timeout)
        return self.count("deferred")


# ---------------------------------------------------------------- results

class Result:
    def __init__(self, system, count, elapsed, server_cpu, sink_cpu, delivered, left,
                 split=None):
        self.system = system
        self.count = count
        self.elapsed = elapsed
        self.rate = count / elapsed
        self.server_ms = server_cpu * 1000.0 / count
        self.sink_ms = sink_cpu * 1000.0 / count
        self.delivered = delivered
        self.left = left          # messages still queued afterwards
        self.split = split        # (router ms/msg, redis ms/msg) for mailferry
        self.rates = [self.rate]


# ---------------------------------------------------------------- measurements

def measure_postfix(env, args, tag):
    procs, count = env["procs"], args.messages
    sink_port = free_port()
    pf = RelayPostfix(procs, args.workdir, tag, sink_port, args.connections, args.keep)
    env.setdefault("postfix_greeting", pf.greeting)
    try:
        log(f"  postfix: filling its queue with {count} messages (smtp-source, deferred)")
        run_source(pf.port, count, args.size, 20, True, args.timeout, MAIL_FROM, RCPT_TO)
        queued = pf.settle(count, args.timeout)
        if queued != count:
            raise BenchError(f"postfix queued {queued} of {count} messages; see {pf.dir}/maillog")
        sink = Sink(procs, os.path.join(args.workdir, f"sink-postfix-{tag}.out"), port=sink_port)
        pf.run(POSTCONF, "-e", "defer_transports =")
        pf.run(POSTFIX, "reload")
        # The deferred files carry a future time: nothing moves before the
        # flush. Give the restarted qmgr a moment and check that.
        time.sleep(2.0)
        if pf.count("deferred") != count or sink.count() != 0:
            raise BenchError("postfix started delivering before the flush")
        cpu0 = (cpu_seconds(pf.master, True), cpu_seconds(sink.pid))
        t0 = time.monotonic()
        pf.run(POSTQUEUE, "-f")
        deadline = t0 + args.timeout
        while True:
            if sink.count() >= count and pf.count(*QUEUES) == 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"postfix delivered {sink.count()} of {count} within "
                                 f"{args.timeout} s; see {pf.dir}/maillog")
            time.sleep(0.05)
        t1 = time.monotonic()
        cpu1 = (cpu_seconds(pf.master, True), cpu_seconds(sink.pid))
        left = pf.count(*QUEUES)
        delivered = sink.count()
        sink.stop()
        return Result("postfix", count, t1 - t0, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1],
                      delivered, left)
    finally:
        pf.stop()


def write_router_conf(path, args, redis_port, consumer, sink_port):
    lines = [
        "[log]", f"level = {args.router_log_level}", "",
        "[queue]", f"redis = redis://127.0.0.1:{redis_port}/0", f"prefix = {PREFIX}", "",
        "[router]", f"consumer = {consumer}", "hostname = router.bench.test",
        f"concurrency = {args.concurrency}", f"batch = {args.batch}", "",
        f"[route {ROUTE}]", "transport = smtp", f"host = 127.0.0.1:{sink_port}",
        "tls = none", "helo = router.bench.test", f"max_connections = {args.connections}", "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def measure_mailferry(env, args, nrouters, tag):
    procs, redis, count = env["procs"], env["redis"], args.messages
    rc = redis.conn
    ready = f"{PREFIX}ready"

    # A clean queue holding `count` messages, and the group, but no entries.
    rc.cmd("FLUSHALL")
    rc.cmd("XGROUP", "CREATE", ready, "routers", "0", "MKSTREAM")
    now = time.time()
    data = message_data(args.size, now)
    created = str(int(now * 1000))
    ids = queue_ids(count)
    log(f"  mailferry x{nrouters}: writing {count} message hashes")
    replies = rc.pipeline([
        ["HSET", f"{PREFIX}msg:{i}", "from", MAIL_FROM, "rcpts", f'["{RCPT_TO}"]',
         "data", data, "size", str(len(data)), "created", created,
         "client_ip", "127.0.0.1", "helo", "bench.test", "auth_user", "", "class", "",
         "gateway", "gateway.bench.test"] for i in ids])
    bad = [r for r in replies if isinstance(r, RedisReplyError)]
    if bad:
        raise BenchError(f"HSET failed: {bad[0]}")
    redis.rewrite_aof()

    sink = Sink(procs, os.path.join(args.workdir, f"sink-mf{nrouters}-{tag}.out"))
    routers = []
    for k in range(1, nrouters + 1):
        name = f"r{k}"
        conf = os.path.join(args.workdir, f"router-{name}.conf")
        write_router_conf(conf, args, redis.port, name, sink.port)
        logf = os.path.join(args.workdir, f"router-{name}-x{nrouters}-{tag}.log")
        p = procs.popen(f"router {name}", [args.mailferry, "router", "--config", conf], logf)
        routers.append((p, logf))
    try:
        # Ready when every consumer has read (blocked) on the group once.
        want = {f"r{k}" for k in range(1, nrouters + 1)}
        deadline = time.monotonic() + 30
        while True:
            have = {pairs(c)["name"].decode() for c in rc.cmd("XINFO", "CONSUMERS", ready, "routers")}
            if want <= have:
                break
            for p, logf in routers:
                if p.poll() is not None:
                    raise BenchError(f"router exited with status {p.returncode}; see {logf}")
            if time.monotonic() > deadline:
                raise BenchError(f"routers did not join the group; see {routers[0][1]}")
            time.sleep(0.05)
        time.sleep(0.5)
        pids = [p.pid for p, _ in routers]

        xadds = b"".join(resp_encode("XADD", ready, "*", "id", i) for i in ids)
        cpu0 = ([cpu_seconds(pid) for pid in pids], cpu_seconds(redis.pid), cpu_seconds(sink.pid))
        t0 = time.monotonic()
        rc.send_all(xadds)
        replies = rc.read_replies(count)
        bad = [r for r in replies if isinstance(r, RedisReplyError)]
        if bad:
            raise BenchError(f"XADD failed: {bad[0]}")
        deadline = t0 + args.timeout
        while True:
            g = pairs(rc.cmd("XINFO", "GROUPS", ready)[0])
            if g["entries-read"] is not None and g["entries-read"] >= count and g["pending"] == 0:
                break
            for p, logf in routers:
                if p.poll() is not None:
                    raise BenchError(f"router exited with status {p.returncode}; see {logf}")
            if time.monotonic() > deadline:
                raise BenchError(f"mailferry finished {g['entries-read']} - {g['pending']} of "
                                 f"{count} within {args.timeout} s; see {routers[0][1]}")
            time.sleep(0.02)
        t1 = time.monotonic()
        cpu1 = ([cpu_seconds(pid) for pid in pids], cpu_seconds(redis.pid), cpu_seconds(sink.pid))
    finally:
        for p, _ in routers:
            stop_popen(p)
    router_cpu = sum(cpu1[0]) - sum(cpu0[0])
    redis_cpu = cpu1[1] - cpu0[1]
    left = (redis.count_keys(f"{PREFIX}msg:*") + rc.cmd("ZCARD", f"{PREFIX}retry"))
    delivered = sink.count()
    sink.stop()
    r = Result(f"mailferry x{nrouters}", count, t1 - t0, router_cpu + redis_cpu,
               cpu1[2] - cpu0[2], delivered, left,
               (router_cpu * 1000.0 / count, redis_cpu * 1000.0 / count))
    r.per_router = [(b - a) * 1000.0 / count for a, b in zip(cpu0[0], cpu1[0])]
    return r


# ---------------------------------------------------------------- report

def aggregate(rs):
    """One Result from the repetitions of a measurement: the median of each
    figure; the delivered and left counts of the first repetition that
    differs from the expected ones."""
    r = Result(rs[0].system, rs[0].count, median([x.elapsed for x in rs]), 0.0, 0.0,
               rs[0].delivered, rs[0].left)
    r.rates = [x.rate for x in rs]
    r.rate = median(r.rates)
    r.server_ms = median([x.server_ms for x in rs])
    r.sink_ms = median([x.sink_ms for x in rs])
    if rs[0].split is not None:
        r.split = (median([x.split[0] for x in rs]), median([x.split[1] for x in rs]))
    for x in rs:
        if x.delivered != x.count or x.left != 0:
            r.delivered, r.left = x.delivered, x.left
            break
    return r


SYSTEMS = ("postfix", "mailferry x1", "mailferry x2")


def print_results(results, args):
    by = {}
    for r in results:
        by.setdefault(r.system, []).append(r)
    agg = {s: aggregate(by[s]) for s in SYSTEMS if s in by}
    rep = f" (median of {args.repeat})" if args.repeat > 1 else ""
    print()
    print(f"== queue -> SMTP client -> smtp-sink: {args.messages} messages of "
          f"{args.size} bytes payload, one recipient each{rep}")
    print(f"{'system':14} {'messages':>8} {'seconds':>8} {'msgs/s':>8} {'CPU':>8} "
          f"{'sink CPU':>8} {'cores':>5}  {'delivered':<16} CPU split")
    print(f"{'':14} {'':>8} {'':>8} {'':>8} {'ms/msg':>8} {'ms/msg':>8} {'busy':>5}  {'':<16} "
          f"ms/msg")
    for s in SYSTEMS:
        r = agg.get(s)
        if r is None:
            continue
        ok = "ok" if r.delivered == r.count and r.left == 0 else f"MISMATCH, {r.left} left"
        # Cores kept busy: (system + sink) CPU per message times msgs/s.
        busy = (r.server_ms + r.sink_ms) * r.rate / 1000.0
        line = (f"{s:14} {r.count:>8} {r.elapsed:>8.2f} {r.rate:>8.0f} {r.server_ms:>8.3f} "
                f"{r.sink_ms:>8.3f} {busy:>5.2f}  {f'{r.delivered} {ok}':<16} ")
        if r.split is not None:
            line += f"router(s) {r.split[0]:.3f} + redis {r.split[1]:.3f}"
        else:
            line += "every postfix process"
        if len(r.rates) > 1:
            line += f"   msgs/s {min(r.rates):.0f}..{max(r.rates):.0f}"
        print(line.rstrip())
    pf, m1, m2 = (agg.get(s) for s in SYSTEMS)
    lines = []
    if pf and m1:
        ok = "meets" if m1.rate >= 3 * pf.rate else "MISSES"
        lines.append(f"  mailferry(1)/postfix       = {m1.rate / pf.rate:6.2f}  [>= 3.00: {ok}]"
                     f"   CPU per msg postfix/mailferry(1) = {pf.server_ms / m1.server_ms:6.2f}")
    if m1 and m2:
        ok = "meets" if m2.rate >= 1.8 * m1.rate else "MISSES"
        lines.append(f"  mailferry(2)/mailferry(1)  = {m2.rate / m1.rate:6.2f}  [>= 1.80: {ok}]"
                     f"   CPU per msg mailferry(2)/mailferry(1) = "
                     f"{m2.server_ms / m1.server_ms:6.2f}")
    if pf and m2:
        lines.append(f"  mailferry(2)/postfix       = {m2.rate / pf.rate:6.2f}")
    if m1:
        # What the CPU allows at all: every core busy with mailferry, Redis
        # and the sink at the CPU cost per message of one router.
        ceiling = (os.cpu_count() or 1) * 1000.0 / (m1.server_ms + m1.sink_ms)
        lines.append(f"  CPU ceiling on {os.cpu_count()} cores at mailferry(1)'s CPU per msg "
                     f"(incl. sink): {ceiling:.0f} msgs/s = {ceiling / m1.rate:.2f} x "
                     f"mailferry(1)")
    print_ratios(lines)
    sys.stdout.flush()


def header(args, env):
    print_title("router", args, "repository at")
    print(f"  redis: {redis_version()}, appendonly yes, "
          f"appendfsync {args.appendfsync}; postfix {postfix_version()}")
    print(f"  router: concurrency {args.concurrency}, batch {args.batch}, route {ROUTE}: smtp "
          f"tls none max_connections {args.connections} (per router), log level "
          f"{args.router_log_level}")
    print(f"  postfix: relayhost [127.0.0.1]:sink, smtp_destination_concurrency_limit "
          f"{args.connections}, connection cache on, in_flow_delay 0; queue filled by "
          f"smtp-source under defer_transports = smtp, timed from postqueue -f to empty queue")
    print(f"  mailferry: hashes written first, routers waiting; timed from the XADD of the "
          f"{args.messages} entries until the group has read all and holds none pending")
    print(f"  sink: smtp-sink -c -u postfix 127.0.0.1:PORT 1000, a fresh one per measurement")
    print("  CPU: routers + redis-server | master and every postfix child process; "
          "sink apart; from /proc/PID/stat")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--appendfsync", default="everysec", choices=("everysec", "always", "no"))
    ap.add_argument("--router-log-level", default="info",
                    choices=("debug", "info", "warn", "error"))
    ap.add_argument("--only", default="postfix 1 2")
    args = ap.parse_args()
    only = args.only.replace(",", " ").split()
    for o in only:
        if o not in ("postfix", "1", "2"):
            ap.error(f"unknown system {o} (postfix 1 2)")
    if args.repeat < 1 or args.messages < 1 or args.size < 0 or args.connections < 1:
        ap.error("--repeat, --messages and --connections must be at least 1")

    procs = Procs(args.workdir)
    env = {"procs": procs}

    def body(results):
        if "1" in only or "2" in only:
            require_executable(args.mailferry)
            env["redis"] = Redis(procs, args.workdir, args.appendfsync)
        header(args, env)
        # Repetitions go round the whole cycle, so that every system sees
        # the same mix of quiet and busy moments of a shared machine.
        for rep in range(args.repeat):
            for o in ("postfix", "1", "2"):
                if o not in only:
                    continue
                log(f"[{rep + 1}/{args.repeat}] {'postfix' if o == 'postfix' else 'mailferry x' + o}:"
                    f" {args.messages} messages")
                if o == "postfix":
                    r = measure_postfix(env, args, str(rep + 1))
                else:
                    r = measure_mailferry(env, args, int(o), str(rep + 1))
                log(f"  {r.rate:.0f} msgs/s, {r.server_ms:.3f} ms CPU/msg, delivered "
                    f"{r.delivered}, left {r.left}")
                results.append(r)

    return run(procs, body, lambda results: print_results(results, args))


if __name__ == "__main__":
    sys.exit(main())
