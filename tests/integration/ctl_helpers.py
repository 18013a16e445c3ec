"""Helpers for the mailferryctl integration tests (test_ctl.py).

A private redis-server on a free loopback port, a writer for a two-route
configuration file, and a runner for the mailferryctl binary that checks
its stderr for sanitizer reports. The binary comes from $MAILFERRYCTL_BIN
(default <repo>/build/mailferryctl).
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from mftest import REPO, RESP

MAILFERRYCTL_BIN = os.environ.get("MAILFERRYCTL_BIN",
                                  os.path.join(REPO, "build", "mailferryctl"))

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error",
                     "UndefinedBehaviorSanitizer")

# The two routes every test configuration has.
ROUTES = """\
[route relay]
transport = smtp
host = 127.0.0.1:1
tls = none
priority = 10

[route api]
transport = smtp
host = 127.0.0.1:2
tls = none
priority = 20
"""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CtlRedis:
    """A redis-server of the tests' own, without persistence."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.port = free_port()
        self.log = self.dir / "redis.log"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir),
             "--logfile", str(self.log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with RESP(self.port, timeout=1) as r:
                    if r("PING") == "PONG":
                        return
            except Exception:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited: %s" % self.log.read_text())
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self):
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self):
        return RESP(self.port)


def write_config(path, redis_port, prefix, extra=""):
    """Writes a configuration with the two routes and returns its path."""
    path = Path(path)
    path.write_text(
        "[queue]\n"
        "redis = redis://127.0.0.1:%d/0\n"
        "prefix = %s\n"
        "\n%s\n%s" % (redis_port, prefix, ROUTES, extra))
    return path


def ctl_env(extra=None):
    """The environment for mailferryctl: MAILFERRY_* variables would
    override the configuration file, so none are passed on unless the test
    sets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}
    if extra:
        env.update(extra)
    return env


class Result:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return "Result(rc=%d, out=%r, err=%r)" % (self.rc, self.out, self.err)


def run_ctl(args, config=None, env=None, timeout=30):
    """Runs mailferryctl [--config config] args and returns a Result."""
    cmd = [MAILFERRYCTL_BIN]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=ctl_env(env))
    for marker in SANITIZER_MARKERS:
        assert marker not in proc.stderr, proc.stderr
    return Result(proc)


def parse_table(text):
    """Parses the KEY VALUE SOURCE table of `policy get` into
    {key: (value, source)}. Values may hold blanks (throttle.patterns), so
    the key is the first word and the source the last."""
    lines = text.splitlines()
    assert lines and lines[0].split() == ["KEY", "VALUE", "SOURCE"], text
    rows = {}
    for line in lines[1:]:
        key, rest = line.split(None, 1)
        value, source = rest.rstrip().rsplit(None, 1)
        rows[key] = (value.strip(), source)
    return rows


def decode(v):
    return v.decode() if isinstance(v, bytes) else v


def hgetall(r, key):
    flat = r("HGETALL", key)
    return {decode(flat[i]): decode(flat[i + 1]) for i in range(0, len(flat), 2)}


# -- writing queue state the way gateway and router write it ----------------
# (docs/queue.md, lib/queue.c, router/store.c)

_id_counter = iter(range(1, 1 << 30))


def queue_id(ms=None):
    """A queue id: 12 hex digits of the time in ms, then 10 more."""
    if ms is None:
        ms = int(time.time() * 1000)
    return "%012x%010x" % (ms, next(_id_counter))


def rcpt_state(s, code=0, enh="", text=None, route=None, remote=None, t=0, n=0, b=False):
    """The JSON of field st:<i>, as router/store.c store_rcpt_json() writes
    it (compact, same key order)."""
    o = {"s": s, "code": code, "enh": enh}
    if text is not None:
        o["text"] = text
    if route is not None:
        o["route"] = route
    if remote is not None:
        o["remote"] = remote
    o["t"] = t
    o["n"] = n
    if b:
        o["b"] = True
    return json.dumps(o, separators=(",", ":"))


def write_msg(r, prefix, qid, sender, rcpts, created, states=None, attempts=None,
              next_attempt=None, cls="", auth_user="", data=b"Subject: t\r\n\r\nbody\r\n"):
    """HSET msg:<qid> with the gateway's ten fields, plus the router's
    attempts / next_attempt and st:<i> fields when given."""
    fields = ["from", sender, "rcpts", json.dumps(rcpts, separators=(",", ":")),
              "data", data, "size", str(len(data)), "created", str(created),
              "client_ip", "192.0.2.7", "helo", "client.test", "auth_user", auth_user,
              "class", cls, "gateway", "gw.test"]
    if attempts is not None:
        fields += ["attempts", str(attempts)]
    if next_attempt is not None:
        fields += ["next_attempt", str(next_attempt)]
    for i, st in (states or {}).items():
        fields += ["st:%d" % i, st]
    r("HSET", prefix + "msg:" + qid, *fields)


def add_event(r, prefix, qid, rcpt, route, result, code, enh="", text="", remote="",
              reason="primary", latency_ms=12, attempt=1):
    """XADD events, the fields of router/store.c store_record()."""
    return decode(r("XADD", prefix + "events", "*", "id", qid, "rcpt", rcpt, "route", route,
                    "reason", reason, "result", result, "code", str(code), "enh", enh,
                    "text", text, "remote", remote, "latency_ms", str(latency_ms),
                    "attempt", str(attempt)))


def add_dead(r, prefix, qid, sender, reason="failed, no bounce (null sender or a bounce)"):
    """XADD dead, as router/store.c store_finish_done() writes it."""
    return decode(r("XADD", prefix + "dead", "*", "id", qid, "reason", reason, "from", sender))


def parse_rows(text, header_first):
    """The rows of a table whose header line starts with header_first:
    lists of the blank-separated words of each line up to the first empty
    line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.split()[:1] == [header_first]:
            rows = []
            for row in lines[i + 1:]:
                if not row.strip() or row.startswith("("):
                    break
                rows.append(row.split())
            return rows
    raise AssertionError("no table with header %r in:\n%s" % (header_first, text))
