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
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
REDIS_SERVER = "redis-server"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PREFIX = "rb:"
MAIL_FROM = "a@bench.test"
RCPT_TO = "u@dest.test"
ROUTE = "sink"


class BenchError(Exception):
    """A step of the benchmark could not run; the message says which."""


def log(msg):
    print(f"# {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

class Procs:
    """Every process this run started, stopped in reverse order at exit."""

    def __init__(self, workdir):
        self.stoppers = []  # (name, callable)
        self.pidfile = os.path.join(workdir, "pids")

    def record_pid(self, pid, comm):
        # router.sh reads this file in its EXIT trap as a backstop.
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
    # rest[0] is field 3 (state); utime is field 14, cutime field 16.
    ppid = int(rest[1])
    self_ticks = int(rest[11]) + int(rest[12])
    child_ticks = int(rest[13]) + int(rest[14])
    return ppid, self_ticks, child_ticks


def cpu_seconds(pid, with_children=False):
    """CPU seconds used so far by a process and the children it reaped;
    with_children adds its live children (Postfix's master forks every
    daemon directly, so one level covers the whole instance). A child alive
    at the first reading and reaped by the second moves from the second sum
    to the first, so a difference of two readings counts it once."""
    st = proc_stat(pid)
    if st is None:
        raise BenchError(f"process {pid} is gone")
    total = st[1] + st[2]
    if with_children:
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == pid:
                continue
            c = proc_stat(int(d))
            if c is not None and c[0] == pid:
                total += c[1]
    return total / CLK_TCK


# ---------------------------------------------------------------- Redis

def resp_encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RedisConn:
    """A minimal RESP2 client: pipelined commands, replies in order.
    Error replies come back as RedisReplyError values, not exceptions, so a
    pipeline can be read to its end."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0

    def close(self):
        self.sock.close()

    def _fill(self):
        if self.pos > 65536:
            del self.buf[:self.pos]
            self.pos = 0
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise BenchError("redis closed the connection")
        self.buf += chunk

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return line
            self._fill()

    def _reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            return RedisReplyError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) - self.pos < n + 2:
                self._fill()
            v = bytes(self.buf[self.pos:self.pos + n])
            self.pos += n + 2
            return v
        if t == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._reply() for _ in range(n)]
        raise BenchError(f"unexpected reply from redis: {line[:80]!r}")

    def pipeline(self, cmds, chunk=2000):
        """Sends the commands (lists of arguments) in chunks, reads every
        reply, and returns the replies."""
        out = []
        for i in range(0, len(cmds), chunk):
            part = cmds[i:i + chunk]
            self.sock.sendall(b"".join(resp_encode(*c) for c in part))
            out.extend(self._reply() for _ in part)
        return out

    def send_all(self, payload):
        self.sock.sendall(payload)

    def read_replies(self, n):
        return [self._reply() for _ in range(n)]

    def cmd(self, *args):
        r = self.pipeline([args])[0]
        if isinstance(r, RedisReplyError):
            raise BenchError(f"redis {' '.join(map(str, args))[:60]}: {r}")
        return r


class RedisReplyError(str):
    pass


def pairs(flat):
    """A flat [k1, v1, k2, v2, ...] reply as a dict with str keys."""
    return {(flat[i].decode() if isinstance(flat[i], bytes) else flat[i]): flat[i + 1]
            for i in range(0, len(flat), 2)}


class Redis:
    def __init__(self, procs, workdir, fsync):
        self.port = free_port()
        self.dir = os.path.join(workdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = procs.popen("redis-server", [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", self.dir, "--save", "", "--appendonly", "yes",
            "--appendfsync", fsync, "--daemonize", "no",
            "--protected-mode", "yes", "--logfile", "",
        ], os.path.join(workdir, "redis.log"))
        deadline = time.monotonic() + 20
        self.conn = None
        while self.conn is None:
            try:
                c = RedisConn(self.port)
                if c.cmd("PING") == "PONG":
                    self.conn = c
                    break
                c.close()
            except (OSError, BenchError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("redis-server did not start; see redis.log")
            time.sleep(0.1)
        self.pid = self.proc.pid

    def info(self, section):
        out = {}
        for line in self.conn.cmd("INFO", section).decode().splitlines():
            k, sep, v = line.partition(":")
            if sep:
                out[k] = v.strip()
        return out

    def rewrite_aof(self):
        """Compacts the AOF, so no rewrite is due during the measurement."""
        self.wait_rewrite()
        self.conn.cmd("BGREWRITEAOF")
        self.wait_rewrite()

    def wait_rewrite(self):
        deadline = time.monotonic() + 120
        time.sleep(0.2)
        while time.monotonic() < deadline:
            p = self.info("persistence")
            if p.get("aof_rewrite_in_progress") == "0" and p.get("aof_rewrite_scheduled") == "0":
                return
            time.sleep(0.2)
        raise BenchError("redis AOF rewrite did not finish")

    def count_keys(self, pattern):
        n, cursor = 0, b"0"
        while True:
            cursor, keys = self.conn.cmd("SCAN", cursor, "MATCH", pattern, "COUNT", 5000)
            n += len(keys)
            if cursor == b"0":
                return n


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


# ---------------------------------------------------------------- smtp-sink

class Sink:
    """A fresh smtp-sink for one measurement; -c makes it print a running
    count ("sess=.. quit=.. mesg=N", CR-separated) after every message."""

    def __init__(self, procs, workdir, tag, port=None):
        self.port = port or free_port()
        self.out = os.path.join(workdir, f"sink-{tag}.out")
        self.proc = procs.popen("smtp-sink", [
            SMTP_SINK, "-c", "-u", "postfix", f"127.0.0.1:{self.port}", "1000",
        ], self.out)
        self.pid = self.proc.pid
        wait_greeting(self.port, "smtp-sink", self.proc)

    def count(self):
        """Messages received so far (the greeting probe sent none)."""
        try:
            with open(self.out, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256))
                tail = f.read()
        except OSError:
            return 0
        i = tail.rfind(b"mesg=")
        if i < 0:
            return 0
        digits = b""
        for ch in tail[i + 5:]:
            if 48 <= ch <= 57:
                digits += bytes([ch])
            else:
                break
        return int(digits) if digits else 0

    def stop(self):
        stop_popen(self.proc)


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
relayhost = [127.0.0.1]:{sink}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
smtp_connection_cache_on_demand = yes
default_destination_concurrency_limit = {conns}
smtp_destination_concurrency_limit = {conns}
# Filled while holding every message; cleared before the measurement.
defer_transports = smtp
in_flow_delay = 0
default_process_limit = {plimit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
biff = no
"""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


class Postfix:
    def __init__(self, procs, workdir, tag, sink_port, conns, keep):
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
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(d=self.dir, sink=sink_port, conns=conns,
                                   plimit=max(100, 2 * conns + 20)))
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

    def settle(self, expected, timeout):
        """Waits until every message received has been deferred; returns
        the number in the deferred queue."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.count("incoming", "active", "maildrop") == 0
                    and self.count("deferred") >= expected):
                break
            time.sleep(0.5)
        return self.count("deferred")

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


def run_source(port, count, size, timeout):
    argv = [SMTP_SOURCE, "-s", "20", "-m", str(count), "-l", str(size), "-d",
            "-f", MAIL_FROM, "-t", RCPT_TO, f"127.0.0.1:{port}"]
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"smtp-source failed (status {p.returncode}): "
                         f"{(p.stdout + p.stderr).decode('latin-1').strip()[-500:]}")


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
    pf = Postfix(procs, args.workdir, tag, sink_port, args.connections, args.keep)
    env.setdefault("postfix_greeting", pf.greeting)
    try:
        log(f"  postfix: filling its queue with {count} messages (smtp-source, deferred)")
        run_source(pf.port, count, args.size, args.timeout)
        queued = pf.settle(count, args.timeout)
        if queued != count:
            raise BenchError(f"postfix queued {queued} of {count} messages; see {pf.dir}/maillog")
        sink = Sink(procs, args.workdir, f"postfix-{tag}", sink_port)
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

    sink = Sink(procs, args.workdir, f"mf{nrouters}-{tag}")
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

def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


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
    if lines:
        print("ratios of msgs/s (target in brackets):")
        print("\n".join(lines))
    sys.stdout.flush()


def header(args, env):
    def ver(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"
    commit = ver(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"]) or "?"
    dirty = ver(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"])
    print(f"mailferry router benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  host: {platform.node()}  {os.cpu_count()} CPUs  kernel {platform.release()}")
    print(f"  mailferry: {args.mailferry} (repository at {commit}"
          f"{' + local changes' if dirty else ''})")
    print(f"  redis: {ver([REDIS_SERVER, '--version']).split(' sha=')[0]}, appendonly yes, "
          f"appendfsync {args.appendfsync}; postfix {ver([POSTCONF, '-d', '-h', 'mail_version'])}")
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
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--mailferry", required=True)
    ap.add_argument("-m", "--messages", type=int, default=20000)
    ap.add_argument("-l", "--size", type=int, default=2048)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--appendfsync", default="everysec", choices=("everysec", "always", "no"))
    ap.add_argument("--router-log-level", default="info",
                    choices=("debug", "info", "warn", "error"))
    ap.add_argument("--only", default="postfix 1 2")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    only = args.only.replace(",", " ").split()
    for o in only:
        if o not in ("postfix", "1", "2"):
            ap.error(f"unknown system {o} (postfix 1 2)")
    if args.repeat < 1 or args.messages < 1 or args.size < 0 or args.connections < 1:
        ap.error("--repeat, --messages and --connections must be at least 1")

    procs = Procs(args.workdir)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    env = {"procs": procs}
    status = 0
    results = []
    try:
        if "1" in only or "2" in only:
            if not os.access(args.mailferry, os.X_OK):
                raise BenchError(f"{args.mailferry} is not an executable (set MAILFERRY_BIN)")
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
