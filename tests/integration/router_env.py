"""Fixtures and helpers for the router integration tests (test_router.py).

Each test gets a RouterEnv (fixture `renv`): a private redis-server (free
port, appendonly yes) in the test's tmp_path, a unique key prefix, and
factories for recording MX servers (mx_recorder.py) and mailferry
processes (gateway, router or all) with generated config files. Every
process is started with Popen and stopped by its PID when the test ends:
mailferry with SIGTERM (its exit status must then be 0), SIGKILL if it
hangs; the MX and Redis likewise.

Nothing here asserts anything about the router except at teardown: a
mailferry process that does not exit 0 on SIGTERM, or whose log shows a
sanitizer report, fails the test.
"""

import itertools
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mftest import MAILFERRY_BIN, RESP, child_env, queued_id  # noqa: E402

PYTHON = "/usr/bin/python3"          # Debian's, which has python3-aiosmtpd
HERE = Path(__file__).resolve().parent
MX_RECORDER = HERE / "mx_recorder.py"

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:",
                     "UndefinedBehaviorSanitizer")

_prefix_counter = itertools.count()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, what, interval=0.05, diag=None):
    """Polls pred() until it returns a true value, which is returned. On
    timeout raises AssertionError naming what was awaited, with diag()
    appended when given."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            extra = ""
            if diag is not None:
                try:
                    extra = "\n" + diag()
                except Exception as e:  # the diagnostic itself must not hide the timeout
                    extra = "\n(diagnostic failed: %r)" % e
            raise AssertionError("timed out after %.1f s waiting for %s%s" % (timeout, what, extra))
        time.sleep(interval)


def _stop_proc(proc, timeout=10):
    """SIGTERM, wait, SIGKILL if needed. Returns the exit status, or None
    when the process had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# -- Redis ---------------------------------------------------------------------

class Redis:
    """A private redis-server for one test."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "redis.log"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--dir", str(self.dir),
             "--logfile", str(self.log), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self("PING") == "PONG":
                    return self
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: %s" % self.log.read_text())
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.05)

    def __call__(self, *args):
        """One command on a fresh connection (the tests poll from several
        threads; a connection per call keeps that simple)."""
        with RESP(self.port, timeout=10) as r:
            return r(*args)

    def stop(self):
        if self.proc is not None:
            _stop_proc(self.proc)
            self.proc = None


# -- the recording MX ------------------------------------------------------------

class MX:
    """One mx_recorder.py subprocess and what it recorded."""

    def __init__(self, workdir, name, mode="normal"):
        self.name = name
        self.dir = Path(workdir) / ("mx-" + name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.mode = mode
        self.out = self.dir / "stdout.log"
        self.proc = None
        self._cache = {}

    def start(self):
        self._out = open(self.out, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, str(MX_RECORDER), "--port", str(self.port), "--dir", str(self.dir),
             "--mode", self.mode],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)
        wait_until(lambda: b"READY" in self.out.read_bytes() or self.proc.poll() is not None,
                   10, "mx_recorder %s to listen" % self.name)
        if self.proc.poll() is not None:
            raise RuntimeError("mx_recorder exited: %s" % self.out.read_text(errors="replace"))
        return self

    def stop(self):
        if self.proc is not None:
            _stop_proc(self.proc)
            self.proc = None
            self._out.close()

    @property
    def hostport(self):
        return "127.0.0.1:%d" % self.port

    def messages(self):
        """Every message received so far, in arrival order: the JSON
        envelope with "data" (the exact bytes) added."""
        out = []
        for meta_path in sorted(self.dir.glob("*.json")):
            m = self._cache.get(meta_path.name)
            if m is None:
                m = json.loads(meta_path.read_text())
                m["data"] = meta_path.with_suffix(".eml").read_bytes()
                self._cache[meta_path.name] = m
            out.append(m)
        return out

    def count(self):
        return len(list(self.dir.glob("*.json")))

    def to(self, rcpt):
        """Messages whose envelope recipients include rcpt."""
        return [m for m in self.messages() if rcpt.lower() in [r.lower() for r in m["rcpt_tos"]]]

    def rcpt_log(self):
        """Every RCPT the MX answered: dicts with rcpt, code, reply."""
        p = self.dir / "rcpt.log"
        if not p.exists():
            return []
        return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]

    def rcpt_tries(self, rcpt):
        return [e for e in self.rcpt_log() if e["rcpt"].lower() == rcpt.lower()]


# -- mailferry -------------------------------------------------------------------

def render_config(sections):
    out = []
    for sec, kv in sections.items():
        out.append("[%s]" % sec)
        for k, v in kv.items():
            if v is not None:
                out.append("%s = %s" % (k, v))
        out.append("")
    return "\n".join(out)


class Mailferry:
    """One `mailferry ROLE --config FILE` process and its log."""

    def __init__(self, env, name, role, config_path):
        self.env = env
        self.name = name
        self.role = role
        self.config_path = config_path
        self.log_path = env.dir / ("%s.log" % name)
        self.proc = None
        self.killed = False
        self.exit_status = None
        self.restarts = 0

    def start(self):
        mode = "ab" if self.log_path.exists() else "wb"
        self._log = open(self.log_path, mode)
        if mode == "ab":
            self._log.write(b"---- restart ----\n")
            self._log.flush()
        self.proc = subprocess.Popen([MAILFERRY_BIN, self.role, "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=child_env())
        self.pid = self.proc.pid
        self.killed = False
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL: the process dies without any cleanup."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.killed = True
        self._log.close()

    def stop(self, timeout=15):
        """SIGTERM and wait; records the exit status (None: had to SIGKILL)."""
        if self.proc is None or self.killed:
            return None
        self.exit_status = _stop_proc(self.proc, timeout)
        self._log.close()
        return self.exit_status

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self, event=None):
        """Log lines, optionally only those with event=<event>."""
        out = self.log().splitlines()
        if event is not None:
            out = [l for l in out if re.search(r"\bevent=%s\b" % re.escape(event), l)]
        return out

    def wait_log(self, pattern, timeout=10, count=1):
        """Waits until pattern (a regex) matches count log lines; returns
        the matching lines."""
        rx = re.compile(pattern)

        def found():
            if self.proc is not None and self.proc.poll() is not None and not self.killed:
                raise AssertionError("%s exited with %s while waiting for %r:\n%s"
                                     % (self.name, self.proc.returncode, pattern, self.tail()))
            hits = [l for l in self.log().splitlines() if rx.search(l)]
            return hits if len(hits) >= count else None
        return wait_until(found, timeout, "%d log line(s) /%s/ from %s" % (count, pattern, self.name),
                          diag=self.tail)

    def tail(self, n=60):
        return "---- %s (last %d lines) ----\n%s" % (
            self.name, n, "\n".join(self.log().splitlines()[-n:]))

    def wait_listening(self, port, timeout=10):
        """Waits for an SMTP greeting on port (the gateway is up)."""
        def ok():
            if not self.alive():
                raise AssertionError("%s exited with %s during start:\n%s"
                                     % (self.name, self.proc.returncode, self.tail()))
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.settimeout(2)
                    greeting = s.recv(512)
                    s.sendall(b"QUIT\r\n")
                    try:
                        s.recv(512)
                    except OSError:
                        pass
                    return greeting.startswith(b"220")
            except OSError:
                return False
        wait_until(ok, timeout, "%s to accept SMTP on port %d" % (self.name, port), diag=self.tail)


class RouterEnv:
    """Everything one router test runs: Redis, MX servers, mailferry
    processes; cleans all of it up in close()."""

    def __init__(self, workdir, test_name):
        self.dir = Path(workdir)
        self.redis = Redis(self.dir / "redis").start()
        self.prefix = "rt%d_%s:" % (next(_prefix_counter), re.sub(r"\W", "", test_name)[:20])
        self.gateway_port = free_port()
        self.mxs = []
        self.procs = []

    # -- building blocks -----------------------------------------------------
    def mx(self, name, mode="normal"):
        m = MX(self.dir, name, mode).start()
        self.mxs.append(m)
        return m

    def config(self, name, routes, router=None, gateway=True, policy=None, log_level=None):
        """Writes <name>.conf. routes: {route name: {key: value}} in order;
        router: [router] keys over the test defaults; gateway: include a
        [gateway] section listening on self.gateway_port."""
        sections = {"queue": {"redis": "redis://127.0.0.1:%d/0" % self.redis.port,
                              "prefix": self.prefix}}
        if log_level:
            sections["log"] = {"level": log_level}
        if gateway:
            sections["gateway"] = {"listen": "127.0.0.1:%d" % self.gateway_port,
                                   "allowed_networks": "127.0.0.0/8",
                                   "hostname": "gw.test",
                                   "shutdown_grace": 2}
        r = {"consumer": "r1", "claim_idle": 3, "retry_schedule": "1,2",
             "policy_refresh": 200, "hold_retry": 1, "hostname": "gw.test"}
        r.update(router or {})
        sections["router"] = r
        for rname, keys in routes.items():
            sections["route %s" % rname] = dict(keys)
        if policy:
            sections["policy"] = dict(policy)
        path = self.dir / ("%s.conf" % name)
        path.write_text(render_config(sections))
        return path

    @staticmethod
    def smtp_route(mx, priority, **keys):
        d = {"transport": "smtp", "host": mx.hostport, "tls": "none", "priority": priority}
        d.update(keys)
        return d

    def start(self, name, role, config_path, wait=True):
        p = Mailferry(self, name, role, config_path).start()
        self.procs.append(p)
        if wait:
            if role in ("gateway", "all"):
                p.wait_listening(self.gateway_port)
            if role in ("router", "all"):
                p.wait_log(r"event=policy_applied", timeout=10)
        return p

    # -- sending ---------------------------------------------------------------
    def submit(self, sender, rcpts, msg, conn=None, mail_options=()):
        """Sends one message through the gateway; returns its queue id."""
        own = conn is None
        s = conn or smtplib.SMTP("127.0.0.1", self.gateway_port, timeout=30)
        try:
            if own:
                s.ehlo("client.test")
            code, resp = s.mail(sender, list(mail_options))
            assert code == 250, "MAIL FROM:<%s> refused: %d %r" % (sender, code, resp)
            for r in rcpts:
                code, resp = s.rcpt(r)
                assert code == 250, "RCPT TO:<%s> refused: %d %r" % (r, code, resp)
            code, resp = s.data(msg)
            assert code == 250, "DATA refused: %d %r" % (code, resp)
            return queued_id(resp.decode("utf-8", "replace"))
        finally:
            if own:
                s.quit()

    def submit_many(self, items, connections=8):
        """Sends items [(sender, [rcpts], msg bytes)] over several parallel
        connections; returns the queue ids in the order of items."""
        ids = [None] * len(items)
        errors = []
        idx = iter(range(len(items)))
        lock = threading.Lock()

        def worker():
            try:
                s = smtplib.SMTP("127.0.0.1", self.gateway_port, timeout=30)
                s.ehlo("client.test")
                n = 0
                while True:
                    with lock:
                        i = next(idx, None)
                    if i is None:
                        break
                    sender, rcpts, msg = items[i]
                    ids[i] = self.submit(sender, rcpts, msg, conn=s)
                    n += 1
                    if n % 90 == 0:
                        # Stay under any per-connection message limit.
                        s.quit()
                        s = smtplib.SMTP("127.0.0.1", self.gateway_port, timeout=30)
                        s.ehlo("client.test")
                s.quit()
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return ids

    # -- reading Redis -----------------------------------------------------------
    def key(self, name):
        return self.prefix + name

    def msg_keys(self):
        return sorted(k.decode() for k in self.redis("KEYS", self.prefix + "msg:*"))

    def msg(self, qid):
        flat = self.redis("HGETALL", self.key("msg:" + qid)) or []
        return {k.decode(): (v if k == b"data" else v.decode("utf-8", "replace"))
                for k, v in zip(flat[::2], flat[1::2])}

    def stream(self, name):
        """XRANGE of a stream as [(entry id, {field: str value})]."""
        out = []
        for eid, fields in self.redis("XRANGE", self.key(name), "-", "+") or []:
            f = {k.decode(): v.decode("utf-8", "replace") for k, v in zip(fields[::2], fields[1::2])}
            out.append((eid.decode(), f))
        return out

    def events(self, qid=None, rcpt=None):
        ev = [f for _eid, f in self.stream("events")]
        if qid is not None:
            ev = [e for e in ev if e.get("id") == qid]
        if rcpt is not None:
            ev = [e for e in ev if e.get("rcpt", "").lower() == rcpt.lower()]
        return ev

    def xlen(self, name):
        return self.redis("XLEN", self.key(name))

    def ready_pending(self):
        """XPENDING summary count of the routers group (0 when the group
        does not exist yet)."""
        try:
            return self.redis("XPENDING", self.key("ready"), "routers")[0]
        except Exception:
            return 0

    def pending_of(self, consumer):
        try:
            rows = self.redis("XPENDING", self.key("ready"), "routers", "-", "+", 100000, consumer)
        except Exception:
            return []
        return [r[0].decode() for r in rows or []]

    def policy_set(self, key, value):
        self.redis("HSET", self.key("policy"), key, value)

    def policy_del(self, key):
        self.redis("HDEL", self.key("policy"), key)

    def dead_ids(self):
        return {f.get("id") for _eid, f in self.stream("dead")}

    def wait_idle(self, timeout=30):
        """Waits until no message is left in the queue: no pending entry,
        nothing scheduled for retry, and no msg:* key except those of
        messages in <prefix>dead (whose hash stays, lib/schema.h)."""
        def idle():
            if self.ready_pending() != 0 or self.redis("ZCARD", self.key("retry")) != 0:
                return False
            dead = {self.key("msg:" + i) for i in self.dead_ids()}
            return not [k for k in self.msg_keys() if k not in dead]
        wait_until(idle, timeout, "the queue to drain", interval=0.1, diag=self.diag)

    def diag(self):
        parts = ["msg keys: %d, pending: %s, retry: %s" % (
            len(self.msg_keys()), self.ready_pending(), self.redis("ZCARD", self.key("retry")))]
        for p in self.procs:
            parts.append(p.tail(30))
        return "\n".join(parts)

    # -- teardown -------------------------------------------------------------
    def close(self):
        problems = []
        for p in reversed(self.procs):
            if p.proc is None or p.killed:
                continue
            st = p.stop()
            if st != 0:
                problems.append("%s (pid %d) exited with %s on SIGTERM\n%s"
                                % (p.name, p.pid, st, p.tail(30)))
        for p in self.procs:
            log = p.log()
            for marker in SANITIZER_MARKERS:
                if marker in log:
                    problems.append("%s: sanitizer report in log:\n%s" % (p.name, p.tail(80)))
                    break
        for m in self.mxs:
            m.stop()
        self.redis.stop()
        return problems


@pytest.fixture
def renv(request, tmp_path):
    if not os.path.exists(MAILFERRY_BIN):
        pytest.fail("mailferry binary not found at %s (set MAILFERRY_BIN)" % MAILFERRY_BIN)
    env = RouterEnv(tmp_path, request.node.name)
    try:
        yield env
    finally:
        problems = env.close()
    if problems:
        pytest.fail("teardown:\n" + "\n\n".join(problems))
