#!/usr/bin/python3
"""mailferry gateway benchmark (run through bench/gateway.sh).

Postfix's smtp-source sends COUNT messages of SIZE bytes at each session
count to four servers started here, side by side in one run:

  (a) mailferry gateway, Redis appendonly yes, appendfsync everysec
  (b) mailferry gateway, Redis appendonly yes, appendfsync always
  (c) a private Postfix on loopback that queues without delivering
      (defer_transports = smtp)
  (d) Postfix's smtp-sink (no queue: the ceiling of this client)

and prints msgs/s, server CPU ms per message (from /proc/PID/stat: the
gateway plus redis-server; every Postfix process; smtp-sink), the client's
CPU ms per message, the number of messages each queue holds afterwards, and
the ratios b/c and a/d. Then it opens IDLE connections to a fresh gateway,
reads the 220 greeting on each, holds them and prints the gateway's VmRSS
before and while holding them.

Targets (from the issue): (b) >= 4 x (c); (a) >= 0.8 x (d); RSS < 100 MB
holding 10,000 idle connections. Figures only: the exit status is 0 when the
run completed, whatever the figures, and 1 when something failed to run.

Every process started here is stopped on exit (also on SIGINT/SIGTERM);
gateway.sh keeps a second line of defence from the pids file in the work
directory.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

from benchlib import (BenchError, Postfix, Procs, Redis, Sink, add_common_args, cpu_seconds,
                      free_port, log, median, postfix_version, print_ratios, print_title,
                      redis_version, require_executable, run, run_source, stop_popen,
                      wait_greeting)

PREFIX = "mfbench:"
MAIL_FROM = "from@bench.test"
RCPT_TO = "to@dest.test"


# ---------------------------------------------------------------- /proc

def vm_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "Threads"):
                out[k] = int(v.split()[0])
    return out


# ---------------------------------------------------------------- gateway

class Gateway:
    def __init__(self, procs, workdir, binary, redis, name, max_conns, log_level):
        self.port = free_port()
        self.name = name
        self.conf = os.path.join(workdir, f"{name}.conf")
        lines = []
        if log_level:
            lines += ["[log]", f"level = {log_level}", ""]
        lines += [
            "[gateway]",
            f"listen = 127.0.0.1:{self.port}",
            "allowed_networks = 127.0.0.0/8",
            "hostname = gateway.bench.test",
            f"max_connections = {max_conns}",
            f"max_connections_per_ip = {max_conns}",
            "",
            "[queue]",
            f"redis = redis://127.0.0.1:{redis.port}/0",
            f"prefix = {PREFIX}",
            "",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))
        self.log = os.path.join(workdir, f"{name}.log")
        self.proc = procs.popen(name, [binary, "gateway", "--config", self.conf], self.log)
        self.greeting = wait_greeting(self.port, f"gateway ({name}.log)", self.proc)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None


def smtp_smoke(port, what):
    """Sends one message and requires 250 (the queue is connected)."""
    import smtplib
    deadline = time.monotonic() + 20
    last = None
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail(MAIL_FROM, [RCPT_TO],
                           b"Subject: smoke\r\nFrom: <from@bench.test>\r\n\r\nsmoke\r\n")
            return
        except (smtplib.SMTPException, OSError) as e:
            last = e
            time.sleep(0.5)
    raise BenchError(f"{what}: test message not accepted: {last}")


# ---------------------------------------------------------------- Postfix

# benchlib's main.cf queues without delivering (defer_transports = smtp) and
# does not throttle the load generator; TLS sessions are not throttled either.
EXTRA_MAIN_CF = "smtpd_client_new_tls_session_rate_limit = 0\n"


class QueueOnlyPostfix(Postfix):
    def __init__(self, procs, workdir, plimit, tag, keep):
        super().__init__(procs, workdir, tag, keep, plimit, EXTRA_MAIN_CF)

    def settle(self, expected, timeout=300.0):
        """Waits until every message received has been deferred (qmgr and
        the error transport are done), so their CPU counts too. Returns the
        number of messages in the queue."""
        self.wait_deferred(expected, timeout)
        time.sleep(0.5)
        return self.count("incoming", "active", "maildrop", "deferred", "hold")


# ---------------------------------------------------------------- runs

def child_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Result:
    def __init__(self, target, sessions, mode, count, elapsed, server_cpu, client_cpu, stored):
        self.target = target
        self.sessions = sessions
        self.mode = mode
        self.count = count
        self.elapsed = elapsed
        self.rate = count / elapsed
        self.server_ms = server_cpu * 1000.0 / count
        self.client_ms = client_cpu * 1000.0 / count
        self.stored = stored
        self.gw_ms = None      # gateway's share of server_ms (a, b)
        self.rates = [self.rate]


TARGETS = {
    "a": "(a) gateway, appendfsync everysec",
    "b": "(b) gateway, appendfsync always",
    "c": "(c) postfix, queue only",
    "d": "(d) smtp-sink, no queue",
}


def reset_redis(redis, fsync):
    """Empties the database, sets appendfsync and compacts the AOF (so no
    rewrite starts during the next run)."""
    redis.conn.cmd("FLUSHALL")
    redis.set_fsync(fsync)
    redis.rewrite_aof(timeout=60)


def measure(target, env, args, sessions, mode):
    count = args.messages
    reuse = mode == "reuse"
    if target in ("a", "b"):
        redis, gw = env["redis"], env["gateway"]
        reset_redis(redis, "everysec" if target == "a" else "always")
        roots = [gw.pid, redis.pid]
        port = gw.port
    elif target == "c":
        # A fresh instance for every run, so each starts from an empty
        # queue on fresh directories, like the gateway's flushed Redis.
        env["postfix_runs"] = env.get("postfix_runs", 0) + 1
        pf = QueueOnlyPostfix(env["procs"], args.workdir, env["postfix_plimit"],
                              str(env["postfix_runs"]), args.keep)
        time.sleep(1.0)
        roots = [pf.master]
        port = pf.port
    else:
        roots = [env["sink"].pid]
        port = env["sink"].port

    cpu0 = [cpu_seconds(pid, True) for pid in roots]
    client0 = child_cpu()
    elapsed = run_source(port, count, args.size, sessions, reuse, args.timeout,
                         MAIL_FROM, RCPT_TO)
    client1 = child_cpu()
    if target in ("a", "b"):
        if not gw.alive():
            raise BenchError(f"gateway exited during the run; see {gw.log}")
        time.sleep(1.1)  # Redis's last everysec fsync counts too
        cpu1 = [cpu_seconds(pid, True) for pid in roots]
        stored = redis.conn.cmd("XLEN", f"{PREFIX}ready")
    elif target == "c":
        stored = pf.settle(count)
        cpu1 = [cpu_seconds(pid, True) for pid in roots]
        pf.stop()
    else:
        stored = None
        cpu1 = [cpu_seconds(pid, True) for pid in roots]
    used = [y - x for x, y in zip(cpu0, cpu1)]
    r = Result(target, sessions, mode, count, elapsed, sum(used), client1 - client0, stored)
    if target in ("a", "b"):
        r.gw_ms = used[0] * 1000.0 / count
    return r


def aggregate(rs):
    """One Result from the repetitions of a measurement: medians of each
    figure, the stored count of the first repetition that disagrees."""
    r = Result(rs[0].target, rs[0].sessions, rs[0].mode, rs[0].count,
               median([x.elapsed for x in rs]), 0.0, 0.0, rs[0].stored)
    r.rates = [x.rate for x in rs]
    r.rate = median(r.rates)
    r.server_ms = median([x.server_ms for x in rs])
    r.client_ms = median([x.client_ms for x in rs])
    if rs[0].gw_ms is not None:
        r.gw_ms = median([x.gw_ms for x in rs])
    for x in rs:
        if x.stored != x.count:
            r.stored = x.stored
            break
    return r


def fmt_stored(r):
    if r.stored is None:
        return "-"
    if r.stored == r.count:
        return f"{r.stored} ok"
    return f"{r.stored} MISMATCH"


def print_results(results, args):
    modes = [m for m in args.modes if any(r.mode == m for r in results)]
    for mode in modes:
        print()
        if mode == "new":
            print(f"== smtp-source without -d: one connection per message "
                  f"({args.messages} messages of {args.size} bytes)")
        else:
            print(f"== smtp-source -d: messages follow each other on the same connections "
                  f"({args.messages} messages of {args.size} bytes)")
        rep = f", median of {args.repeat}" if args.repeat > 1 else ""
        print(f"{'target':38} {'sess':>4} {'msgs/s':>8} {'seconds':>8} "
              f"{'server CPU':>10} {'client CPU':>10}  {'stored':<12}server CPU split{rep}")
        print(f"{'':38} {'':>4} {'':>8} {'':>8} {'ms/msg':>10} {'ms/msg':>10}  "
              f"{'':<12}ms/msg")
        groups = {}
        for r in results:
            if r.mode == mode:
                groups.setdefault((r.target, r.sessions), []).append(r)
        by = {k: aggregate(v) for k, v in groups.items()}
        for s in args.sessions:
            for t in "abcd":
                r = by.get((t, s))
                if r is None:
                    continue
                line = (f"{TARGETS[t]:38} {s:>4} {r.rate:>8.0f} {r.elapsed:>8.2f} "
                        f"{r.server_ms:>10.3f} {r.client_ms:>10.3f}  {fmt_stored(r):<12}")
                if r.gw_ms is not None:
                    line += f"gateway {r.gw_ms:.3f} + redis {r.server_ms - r.gw_ms:.3f}"
                if len(r.rates) > 1:
                    line += (f"{'' if r.gw_ms is not None else ' ' * 29}   msgs/s "
                             f"{min(r.rates):.0f}..{max(r.rates):.0f}")
                print(line.rstrip())
        lines = []
        for s in args.sessions:
            a, b, c, d = (by.get((t, s)) for t in "abcd")
            if b and c:
                ok = "meets" if b.rate >= 4 * c.rate else "MISSES"
                lines.append(f"  {s:>3} sessions  b/c = {b.rate / c.rate:6.2f}  [>= 4.00: {ok}]"
                             f"   server CPU per msg c/b = {c.server_ms / b.server_ms:6.2f}")
            if a and d:
                ok = "meets" if a.rate >= 0.8 * d.rate else "MISSES"
                lines.append(f"  {s:>3} sessions  a/d = {a.rate / d.rate:6.2f}  [>= 0.80: {ok}]"
                             f"   server CPU per msg d/a = {d.server_ms / a.server_ms:6.2f}")
            if a and b:
                lines.append(f"  {s:>3} sessions  b/a = {b.rate / a.rate:6.2f}  "
                             "(appendfsync always vs everysec)")
        print_ratios(lines)
    sys.stdout.flush()


def idle_test(env, args, procs):
    gw = Gateway(procs, args.workdir, args.mailferry, env["redis"], "gateway-idle",
                 args.max_connections, args.gateway_log_level)
    time.sleep(1.0)
    before = vm_status(gw.pid)
    n = args.idle
    argv = [args.idle_bin, "-n", str(n), "-t", "180"]
    if args.idle_sources:
        argv += ["-b", args.idle_sources]
    argv += ["127.0.0.1", str(gw.port)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.record_pid(p.pid, "idle_conns")
    procs.add_stopper("idle_conns", lambda: stop_popen(p))
    ready = p.stdout.readline().strip()
    if not ready.startswith("ready"):
        raise BenchError(f"idle_conns: {ready or 'no output'}")
    time.sleep(2.0)
    held = vm_status(gw.pid)
    p.stdin.write("\n")
    p.stdin.flush()
    alive = p.stdout.readline().strip()
    p.wait(timeout=60)
    gw_alive = gw.alive()
    time.sleep(1.0)
    after = vm_status(gw.pid) if gw_alive else None

    mb = lambda kb: kb / 1024.0
    print()
    print(f"== gateway memory holding {n} idle connections (greeting read, nothing sent)")
    print(f"  idle_conns: {ready}; at the end {alive}")
    print(f"  VmRSS before connecting   {mb(before['VmRSS']):8.1f} MB")
    print(f"  VmRSS holding {n:<6}      {mb(held['VmRSS']):8.1f} MB  "
          f"(RssAnon {mb(held.get('RssAnon', 0)):.1f} MB, VmHWM {mb(held['VmHWM']):.1f} MB, "
          f"threads {held.get('Threads', '?')})")
    per = (held["VmRSS"] - before["VmRSS"]) / n
    print(f"  per connection            {per:8.2f} KB")
    if after is not None:
        print(f"  VmRSS after they closed   {mb(after['VmRSS']):8.1f} MB")
    ok = "meets" if mb(held["VmRSS"]) < 100 and ready.find(f"greeted={n} ") >= 0 else "MISSES"
    print(f"  target: under 100 MB at {n} idle connections [{ok}]")
    sys.stdout.flush()
    stop_popen(gw.proc)


def header(args, env):
    print_title("gateway", args, "commit")
    print(f"  redis: {redis_version()}; postfix {postfix_version()}")
    print(f"  messages {args.messages} x {args.size} bytes payload; sessions "
          f"{' '.join(map(str, args.sessions))}; modes {' '.join(args.modes)}; "
          f"repeat {args.repeat}; "
          f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    if "gateway" in env:
        print(f"  gateway greeting: {env['gateway'].greeting}")
    if "postfix_greeting" in env:
        print(f"  postfix greeting: {env['postfix_greeting']}")
    print("  server CPU: gateway + redis-server | every postfix process | smtp-sink, "
          "from /proc/PID/stat")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--idle-bin", required=True)
    ap.add_argument("-s", "--sessions", default="10 100")
    ap.add_argument("--modes", default="new reuse")
    ap.add_argument("--only", default="a b c d idle")
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--idle-sources", default="")
    ap.add_argument("--gateway-log-level", default="")
    args = ap.parse_args()
    args.sessions = [int(x) for x in args.sessions.replace(",", " ").split()]
    args.modes = args.modes.replace(",", " ").split()
    only = set(args.only.replace(",", " ").split())
    for m in args.modes:
        if m not in ("new", "reuse"):
            ap.error(f"unknown mode {m} (new, reuse)")
    for t in only:
        if t not in ("a", "b", "c", "d", "idle"):
            ap.error(f"unknown target {t} (a b c d idle)")
    if args.repeat < 1 or args.messages < 1 or args.size < 0 or not args.sessions:
        ap.error("--repeat and --messages must be at least 1, --sessions not empty")
    args.max_connections = max(1000, args.idle + 1000, max(args.sessions) * 2)

    procs = Procs(args.workdir)
    env = {}

    def body(results):
        gw_needed = only & {"a", "b", "idle"}
        if gw_needed:
            require_executable(args.mailferry)
            env["redis"] = Redis(procs, args.workdir, "everysec")
        if only & {"a", "b"}:
            env["gateway"] = Gateway(procs, args.workdir, args.mailferry, env["redis"],
                                     "gateway", args.max_connections, args.gateway_log_level)
            smtp_smoke(env["gateway"].port, "gateway")
        if "c" in only:
            # A first instance checks the setup with one message; each run
            # then gets its own fresh instance.
            env["procs"] = procs
            env["postfix_plimit"] = max(200, 2 * max(args.sessions) + 50)
            pf = QueueOnlyPostfix(procs, args.workdir, env["postfix_plimit"], "check", args.keep)
            smtp_smoke(pf.port, "postfix")
            env["postfix_greeting"] = pf.greeting
            if pf.settle(1, timeout=30) != 1:
                raise BenchError(f"postfix did not queue the test message; see {pf.dir}/maillog")
            pf.stop()
        if "d" in only:
            env["sink"] = Sink(procs, os.path.join(args.workdir, "smtp-sink.log"),
                               counting=False)
        header(args, env)

        if "idle" in only:
            idle_test(env, args, procs)

        # Repetitions go round the whole cycle, so that every target sees
        # the same mix of quiet and busy moments of a shared machine.
        for rep in range(args.repeat):
            for mode in args.modes:
                for s in args.sessions:
                    for t in "abcd":
                        if t not in only:
                            continue
                        log(f"[{rep + 1}/{args.repeat}] {TARGETS[t]}: {args.messages} "
                            f"messages, {s} sessions, mode {mode}")
                        r = measure(t, env, args, s, mode)
                        log(f"  {r.rate:.0f} msgs/s, server {r.server_ms:.3f} ms/msg, "
                            f"stored {r.stored}")
                        results.append(r)

    return run(procs, body, lambda results: print_results(results, args))


if __name__ == "__main__":
    sys.exit(main())
