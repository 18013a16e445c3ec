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
