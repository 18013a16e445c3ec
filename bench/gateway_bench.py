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
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTSUPER = "/usr/sbin/postsuper"
REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PREFIX = "mfbench:"
MAIL_FROM = "from@bench.test"
RCPT_TO = "to@dest.test"


class BenchError(Exception):
    """A step of the benchmark could not run; the message says which."""


def log(msg):
    print(f"# {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

class Procs:
    """Every process this run started, stopped in reverse order at exit."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.stoppers = []  # (name, callable)
        self.pidfile = os.path.join(workdir, "pids")

    def record_pid(self, pid, comm):
        # gateway.sh reads this file in its EXIT trap as a backstop.
        with open(self.pidfile, "a") as f:
            f.write(f"{pid} {comm}\n")

    def popen(self, name, argv, logfile, **kw):
        out = open(logfile, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, **kw)
        out.close()
        self.record_pid(p.pid, os.path.basename(argv[0])[:15])
        self.stoppers.append((name, lambda: stop_popen(p)))
        return p

    def add_stopper(self, name, fn):
        self.stoppers.append((name, fn))

    def stop_all(self):
        while self.stoppers:
            name, fn = self.stoppers.pop()
            try:
                fn()
            except Exception as e:  # keep stopping the others
                log(f"stopping {name}: {e}")


def stop_popen(p, grace=10.0):
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_greeting(port, timeout=1.0):
    """Returns the first line the server sends, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(512)
                if not chunk:
                    break
                data += chunk
            try:
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            except OSError:
                pass
            return data.decode("latin-1").strip() or None
    except OSError:
        return None


def wait_greeting(port, what, proc=None, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} while starting")
        line = read_greeting(port)
        if line is not None and line.startswith("220"):
            return line
        time.sleep(0.1)
    raise BenchError(f"{what} did not greet on 127.0.0.1:{port} within {timeout:.0f} s")


# ---------------------------------------------------------------- /proc

def proc_stat(pid):
    """(ppid, self ticks, reaped children ticks) or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14.
    ppid = int(rest[1])
    self_ticks = int(rest[11]) + int(rest[12])
    child_ticks = int(rest[13]) + int(rest[14])
    return ppid, self_ticks, child_ticks


def all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def cpu_seconds(roots):
    """CPU seconds used so far by each root process, its live children and
    the children it has reaped. Postfix's master forks every daemon directly,
    so one level of children covers the whole instance."""
    roots = set(roots)
    total = 0
    for pid in roots:
        st = proc_stat(pid)
        if st is None:
            raise BenchError(f"process {pid} is gone")
        total += st[1] + st[2]
    for pid in all_pids():
        if pid in roots:
            continue
        st = proc_stat(pid)
        if st is not None and st[0] in roots:
            total += st[1]
    return total / CLK_TCK


def vm_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "Threads"):
                out[k] = int(v.split()[0])
    return out


# ---------------------------------------------------------------- Redis

class Redis:
    def __init__(self, procs, workdir):
        self.port = free_port()
        self.dir = os.path.join(workdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = procs.popen("redis-server", [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--appendonly", "yes",
            "--appendfsync", "everysec", "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", "",
        ], os.path.join(workdir, "redis.log"))
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.cli("PING") == "PONG":
                    break
            except BenchError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("redis-server did not start; see redis.log")
            time.sleep(0.1)

    def cli(self, *args):
        r = subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *args],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError(f"redis-cli {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout.strip()

    def info(self, section):
        out = {}
        for line in self.cli("INFO", section).splitlines():
            k, sep, v = line.partition(":")
            if sep:
                out[k] = v.strip()
        return out

    def reset(self, fsync):
        """Empties the database, compacts the AOF (so no rewrite starts
        during the next run) and sets appendfsync."""
        self.cli("FLUSHALL")
        self.cli("CONFIG", "SET", "appendfsync", fsync)
        if self.cli("CONFIG", "GET", "appendfsync").splitlines()[-1] != fsync:
            raise BenchError("CONFIG SET appendfsync did not take")
        self.wait_rewrite()
        self.cli("BGREWRITEAOF")
        self.wait_rewrite()

    def wait_rewrite(self):
        deadline = time.monotonic() + 60
        time.sleep(0.2)
        while time.monotonic() < deadline:
            p = self.info("persistence")
            if p.get("aof_rewrite_in_progress") == "0" and p.get("aof_rewrite_scheduled") == "0":
                return
            time.sleep(0.2)
        raise BenchError("redis AOF rewrite did not finish")


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

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {d}/etc
queue_directory = {d}/queue
data_directory = {d}/data
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
# Queue without delivering.
defer_transports = smtp
smtp_dns_support_level = disabled
# No throttling of the load generator.
in_flow_delay = 0
default_process_limit = {plimit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
biff = no
"""


class Postfix:
    def __init__(self, procs, workdir, plimit, tag, keep):
        self.port = free_port()
        self.keep = keep
        self.dir = os.path.join(workdir, f"postfix-{tag}")
        self.etc = os.path.join(self.dir, "etc")
        self.queue = os.path.join(self.dir, "queue")
        data = os.path.join(self.dir, "data")
        for d in (self.etc, self.queue, data):
            os.makedirs(d, exist_ok=True)
        for d in (workdir, self.dir, self.etc, self.queue):
            os.chmod(d, 0o755)
        import pwd
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(d=self.dir, plimit=plimit))
        # Debian's master.cf with the smtp listener moved to our port and
        # chroot off everywhere (the queue holds no copies of /etc files).
        out = []
        with open("/etc/postfix/master.cf") as f:
            for line in f:
                fields = line.split()
                if (line[:1] not in ("#", " ", "\t") and len(fields) >= 8
                        and fields[1] in ("inet", "unix", "unix-dgram", "fifo", "pass")):
                    if fields[0] == "smtp" and fields[1] == "inet":
                        fields[0] = f"127.0.0.1:{self.port}"
                    fields[4] = "n"
                    line = " ".join(fields) + "\n"
                out.append(line)
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.writelines(out)
        self.run(POSTFIX, "check")
        self.master = None
        procs.add_stopper("postfix", self.stop)
        self.run(POSTFIX, "start")
        deadline = time.monotonic() + 20
        while self.master is None and time.monotonic() < deadline:
            try:
                with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                    self.master = int(f.read().strip())
            except (OSError, ValueError):
                time.sleep(0.1)
        if self.master is None:
            raise BenchError(f"postfix did not start; see {self.dir}/maillog")
        procs.record_pid(self.master, "master")
        self.greeting = wait_greeting(self.port, f"postfix ({self.dir}/maillog)")

    def run(self, prog, *args):
        r = subprocess.run([prog, "-c", self.etc, *args], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise BenchError(f"{os.path.basename(prog)} -c {self.etc} {' '.join(args)}: "
                             f"{(r.stderr or r.stdout).strip()}")
        return r.stdout

    def count(self, *queues):
        n = 0
        for q in queues:
            for _, _, files in os.walk(os.path.join(self.queue, q)):
                n += len(files)
        return n

    def settle(self, expected, timeout=300.0):
        """Waits until every message received has been deferred (qmgr and
        the error transport are done), so their CPU counts too. Returns the
        number of messages in the queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = self.count("incoming", "active", "maildrop")
            if pending == 0 and self.count("deferred") >= expected:
                break
            time.sleep(0.5)
        time.sleep(0.5)
        return self.count("incoming", "active", "maildrop", "deferred", "hold")

    def stop(self):
        """Stops the instance (idempotent) and removes its folder."""
        if self.master is None:
            return
        subprocess.run([POSTFIX, "-c", self.etc, "abort"], capture_output=True, timeout=60)
        deadline = time.monotonic() + 10
        while proc_stat(self.master) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc_stat(self.master) is not None:
            os.kill(self.master, signal.SIGKILL)
        self.master = None
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- runs

def run_source(port, count, sessions, size, reuse, timeout):
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-f", MAIL_FROM, "-t", RCPT_TO]
    if reuse:
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise BenchError(f"smtp-source did not finish within {timeout} s: {' '.join(argv)}")
    elapsed = time.monotonic() - t0
    if p.returncode != 0:
        raise BenchError(f"smtp-source failed (status {p.returncode}): "
                         f"{out.decode('latin-1').strip()[-500:]}")
    return elapsed


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


def measure(target, env, args, sessions, mode):
    count = args.messages
    reuse = mode == "reuse"
    if target in ("a", "b"):
        redis, gw = env["redis"], env["gateway"]
        redis.reset("everysec" if target == "a" else "always")
        roots = [gw.pid, redis.proc.pid]
        port = gw.port
    elif target == "c":
        # A fresh instance for every run, so each starts from an empty
        # queue on fresh directories, like the gateway's flushed Redis.
        env["postfix_runs"] = env.get("postfix_runs", 0) + 1
        pf = Postfix(env["procs"], args.workdir, env["postfix_plimit"],
                     str(env["postfix_runs"]), args.keep)
        time.sleep(1.0)
        roots = [pf.master]
        port = pf.port
    else:
        roots = [env["sink"].pid]
        port = env["sink_port"]

    cpu0 = [cpu_seconds([pid]) for pid in roots]
    client0 = child_cpu()
    elapsed = run_source(port, count, sessions, args.size, reuse, args.timeout)
    client1 = child_cpu()
    if target in ("a", "b"):
        if not gw.alive():
            raise BenchError(f"gateway exited during the run; see {gw.log}")
        time.sleep(1.1)  # Redis's last everysec fsync counts too
        cpu1 = [cpu_seconds([pid]) for pid in roots]
        stored = redis.cli("XLEN", f"{PREFIX}ready")
        stored = int(stored) if stored.isdigit() else stored
    elif target == "c":
        stored = pf.settle(count)
        cpu1 = [cpu_seconds([pid]) for pid in roots]
        pf.stop()
    else:
        stored = None
        cpu1 = [cpu_seconds([pid]) for pid in roots]
    used = [y - x for x, y in zip(cpu0, cpu1)]
    r = Result(target, sessions, mode, count, elapsed, sum(used), client1 - client0, stored)
    if target in ("a", "b"):
        r.gw_ms = used[0] * 1000.0 / count
    return r


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


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
        if lines:
            print("ratios of msgs/s (target in brackets):")
            print("\n".join(lines))
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
    def ver(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"
    commit = ver(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"]) or "?"
    dirty = ver(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"])
    print(f"mailferry gateway benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  host: {platform.node()}  {os.cpu_count()} CPUs  kernel {platform.release()}")
    print(f"  mailferry: {args.mailferry} (commit {commit}{' + local changes' if dirty else ''})")
    print(f"  redis: {ver([REDIS_SERVER, '--version']).split(' sha=')[0]}; "
          f"postfix {ver(['postconf', '-d', '-h', 'mail_version'])}")
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
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--mailferry", required=True)
    ap.add_argument("--idle-bin", required=True)
    ap.add_argument("-m", "--messages", type=int, default=20000)
    ap.add_argument("-s", "--sessions", default="10 100")
    ap.add_argument("-l", "--size", type=int, default=2048)
    ap.add_argument("--modes", default="new reuse")
    ap.add_argument("--only", default="a b c d idle")
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--idle-sources", default="")
    ap.add_argument("--gateway-log-level", default="")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
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

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    env = {}
    status = 0
    results = []
    try:
        gw_needed = only & {"a", "b", "idle"}
        if gw_needed:
            if not os.access(args.mailferry, os.X_OK):
                raise BenchError(f"{args.mailferry} is not an executable (set MAILFERRY_BIN)")
            env["redis"] = Redis(procs, args.workdir)
        if only & {"a", "b"}:
            env["gateway"] = Gateway(procs, args.workdir, args.mailferry, env["redis"],
                                     "gateway", args.max_connections, args.gateway_log_level)
            smtp_smoke(env["gateway"].port, "gateway")
        if "c" in only:
            # A first instance checks the setup with one message; each run
            # then gets its own fresh instance.
            env["procs"] = procs
            env["postfix_plimit"] = max(200, 2 * max(args.sessions) + 50)
            pf = Postfix(procs, args.workdir, env["postfix_plimit"], "check", args.keep)
            smtp_smoke(pf.port, "postfix")
            env["postfix_greeting"] = pf.greeting
            if pf.settle(1, timeout=30) != 1:
                raise BenchError(f"postfix did not queue the test message; see {pf.dir}/maillog")
            pf.stop()
        if "d" in only:
            env["sink_port"] = free_port()
            env["sink"] = procs.popen("smtp-sink", [
                SMTP_SINK, "-u", "postfix", f"127.0.0.1:{env['sink_port']}", "1000",
            ], os.path.join(args.workdir, "smtp-sink.log"))
            wait_greeting(env["sink_port"], "smtp-sink", env["sink"])
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
        print_results(results, args)
    except BenchError as e:
        if results:
            print_results(results, args)
        print(f"benchmark failed: {e}", file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
    return status


if __name__ == "__main__":
    sys.exit(main())
