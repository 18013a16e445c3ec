"""Shared pieces of the mailferry benchmarks (bench/gateway_bench.py and
bench/router_bench.py, run through bench/gateway.sh and bench/router.sh).

What is here: the record of every process a run starts (stopped in reverse
order at exit, with a pids file the shell wrapper reads as a backstop), SMTP
greeting probes, CPU accounting from /proc/PID/stat, a minimal RESP2 client
and a private redis-server with the AOF on, a private Postfix instance on
loopback, Postfix's smtp-sink and smtp-source, and the common parts of the
command line, the report header and the main loop.

Everything listens and connects on 127.0.0.1 only.
"""

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
REDIS_SERVER = "redis-server"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
        # The shell wrapper reads this file in its EXIT trap as a backstop.
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


def require_executable(path):
    if not os.access(path, os.X_OK):
        raise BenchError(f"{path} is not an executable (set MAILFERRY_BIN)")


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


class RedisReplyError(str):
    pass


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


def pairs(flat):
    """A flat [k1, v1, k2, v2, ...] reply as a dict with str keys."""
    return {(flat[i].decode() if isinstance(flat[i], bytes) else flat[i]): flat[i + 1]
            for i in range(0, len(flat), 2)}


class Redis:
    """A private redis-server (appendonly yes, no RDB saves) on a free port,
    its data and log in the work directory, and one connection to it."""

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

    def set_fsync(self, fsync):
        self.conn.cmd("CONFIG", "SET", "appendfsync", fsync)
        if self.conn.cmd("CONFIG", "GET", "appendfsync")[-1].decode() != fsync:
            raise BenchError("CONFIG SET appendfsync did not take")

    def rewrite_aof(self, timeout=120):
        """Compacts the AOF, so no rewrite is due during the measurement."""
        self.wait_rewrite(timeout)
        self.conn.cmd("BGREWRITEAOF")
        self.wait_rewrite(timeout)

    def wait_rewrite(self, timeout=120):
        deadline = time.monotonic() + timeout
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


# ---------------------------------------------------------------- smtp-sink, smtp-source

class Sink:
    """Postfix's smtp-sink on a free port (or the one given), its output in
    logfile. With counting, -c makes it print a running count ("sess=..
    quit=.. mesg=N", CR-separated) after every message, read by count()."""

    def __init__(self, procs, logfile, counting=True, port=None):
        self.port = port or free_port()
        self.out = logfile
        argv = [SMTP_SINK]
        if counting:
            argv.append("-c")
        argv += ["-u", "postfix", f"127.0.0.1:{self.port}", "1000"]
        self.proc = procs.popen("smtp-sink", argv, self.out)
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


def run_source(port, count, size, sessions, reuse, timeout, mail_from, rcpt_to):
    """Runs smtp-source against 127.0.0.1:port (-d when reuse) and returns
    the seconds it took."""
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-f", mail_from, "-t", rcpt_to]
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


# ---------------------------------------------------------------- Postfix

# The main.cf both benchmarks start from: paths in the instance's folder,
# loopback only, every message held by defer_transports = smtp, and no
# throttling of the load generator. {d} is the folder, {plimit} the
# default_process_limit; each benchmark appends its own lines.
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
smtp_dns_support_level = disabled
defer_transports = smtp
in_flow_delay = 0
default_process_limit = {plimit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
biff = no
"""


class Postfix:
    """A private Postfix instance in workdir/postfix-TAG, its smtpd on a
    free port of 127.0.0.1. main.cf is MAIN_CF plus extra_main_cf; stop()
    runs at exit at the latest and removes the folder unless keep."""

    def __init__(self, procs, workdir, tag, keep, plimit, extra_main_cf=""):
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
            f.write(MAIN_CF.format(d=self.dir, plimit=plimit) + extra_main_cf)
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

    def wait_deferred(self, expected, timeout):
        """Waits until nothing is left in maildrop, incoming and active and
        at least expected messages are deferred, or timeout seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.count("incoming", "active", "maildrop") == 0
                    and self.count("deferred") >= expected):
                break
            time.sleep(0.5)

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


# ---------------------------------------------------------------- command line and report

def add_common_args(ap):
    """The options both benchmarks take, with the same defaults."""
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--mailferry", required=True)
    ap.add_argument("-m", "--messages", type=int, default=20000)
    ap.add_argument("-l", "--size", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--keep", action="store_true")


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def version(argv):
    """What argv prints on stdout, stripped, or "?" when it cannot run."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "?"


def redis_version():
    return version([REDIS_SERVER, "--version"]).split(" sha=")[0]


def postfix_version():
    return version([POSTCONF, "-d", "-h", "mail_version"])


def print_title(what, args, repo_label):
    """The first lines of a report: which benchmark, when, on what host,
    with which binary, and the repository's commit (repo_label says how
    that is introduced)."""
    commit = version(["git", "-C", args.repo, "rev-parse", "--short", "HEAD"]) or "?"
    dirty = version(["git", "-C", args.repo, "status", "--porcelain", "--untracked-files=no"])
    print(f"mailferry {what} benchmark  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"  host: {platform.node()}  {os.cpu_count()} CPUs  kernel {platform.release()}")
    print(f"  mailferry: {args.mailferry} ({repo_label} {commit}"
          f"{' + local changes' if dirty else ''})")


def print_ratios(lines):
    if lines:
        print("ratios of msgs/s (target in brackets):")
        print("\n".join(lines))


def run(procs, body, report):
    """Runs body(results), which appends a result per measurement, then
    report(results). SIGTERM, SIGINT and SIGHUP end the run through
    SystemExit. When a step fails, reports what was measured and then the
    error. Every process in procs is stopped in the end. Returns the exit
    status: 0 when the run completed, 1 when something failed to run."""
    def on_signal(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    status = 0
    results = []
    try:
        body(results)
        report(results)
    except BenchError as e:
        if results:
            report(results)
        print(f"benchmark failed: {e}", file=sys.stderr)
        status = 1
    finally:
        procs.stop_all()
    return status
