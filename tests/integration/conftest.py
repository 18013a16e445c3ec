"""Harness for the mailferry gateway integration tests.

Starts one redis-server for the session, makes a test CA and a server
certificate with the openssl CLI, writes users files with hashes from
`openssl passwd -6`, and starts `mailferry gateway --config FILE` per test
with a queue prefix of its own. The binary comes from $MAILFERRY_BIN
(default <repo>/build/mailferry).
"""

import itertools
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mftest import (DEFAULT_USERS, MAILFERRY_BIN, PASSWORDS, RESP, RawSMTP,  # noqa: E402
                    SMTPClosed, child_env)

# Keys that live in a section other than [gateway].
SECTION_OF = {
    "redis": "queue", "prefix": "queue", "timeout": "queue",
    "wait_replicas": "queue", "wait_timeout": "queue",
    "level": "log",
}

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error",
                     "UndefinedBehaviorSanitizer")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n):
    ports = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


# -- Redis -------------------------------------------------------------------

class RedisServer:
    """A private redis-server on 127.0.0.1, stoppable and restartable on the
    same port (for the Redis-down test)."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.port = free_port()
        self.proc = None
        self.log = self.dir / "redis.log"

    def start(self):
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--dir", str(self.dir),
             "--logfile", str(self.log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with RESP(self.port, timeout=1) as r:
                    if r("PING") == "PONG":
                        return
            except (OSError, Exception):
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()


# -- Certificates and users --------------------------------------------------

@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A test CA and a server certificate for localhost / 127.0.0.1."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt = d / "server.key", d / "server.csr", d / "server.crt"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "3",
         "-subj", "/CN=mailferry test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost"])
    ext = d / "server.ext"
    ext.write_text("basicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n"
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "3", "-extfile", ext])
    os.chmod(key, 0o600)
    os.chmod(ca_key, 0o600)
    return {"ca": str(ca_crt), "cert": str(crt), "key": str(key)}


@pytest.fixture(scope="session")
def tls_client_ctx(certs):
    """A client TLS context that verifies the gateway against the test CA."""
    ctx = ssl.create_default_context(cafile=certs["ca"])
    return ctx


@pytest.fixture(scope="session")
def password_hashes():
    return {u: run(["openssl", "passwd", "-6", p]).stdout.decode().strip()
            for u, p in PASSWORDS.items()}


def write_users(path, users, hashes, mode=0o600):
    """Writes a users file ("user:hash:domain,domain") atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text("# mailferry test users\n" +
                   "".join("%s:%s:%s\n" % (u, hashes[u], ",".join(doms)) for u, doms in users))
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# -- Gateway -----------------------------------------------------------------

def render_config(sections):
    out = []
    for sec, kv in sections.items():
        out.append("[%s]" % sec)
        for k, v in kv.items():
            if v is not None:
                out.append("%s = %s" % (k, v))
        out.append("")
    return "\n".join(out)


class Gateway:
    """One running `mailferry gateway` with its ports, queue prefix and the
    means to read what it stored."""

    def __init__(self, workdir, redis, certs, hashes, prefix, overrides, users):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.redis = redis
        self.hashes = hashes
        self.prefix = prefix
        self.plain, self.submission, self.tls = free_ports(3)
        self.users_path = self.dir / "users"
        write_users(self.users_path, users, hashes)
        sections = {
            "gateway": {
                "listen": "127.0.0.1:%d" % self.plain,
                "listen_submission": "127.0.0.1:%d" % self.submission,
                "listen_tls": "127.0.0.1:%d" % self.tls,
                "allowed_networks": "127.0.0.0/8",
                "hostname": "mx.test",
                "tls_cert": certs["cert"],
                "tls_key": certs["key"],
                "users_file": str(self.users_path),
                "max_message_size": 1048576,
                "auth_delay": 100,
                "shutdown_grace": 3,
            },
            "queue": {
                "redis": "redis://127.0.0.1:%d/0" % redis.port,
                "prefix": prefix,
            },
        }
        for k, v in overrides.items():
            if "." in k:
                sec, key = k.split(".", 1)
            else:
                sec, key = SECTION_OF.get(k, "gateway"), k
            sections.setdefault(sec, {})[key] = v
        self.config = sections
        self.max_message_size = int(sections["gateway"].get("max_message_size"))
        self.config_path = self.dir / "mailferry.conf"
        self.config_path.write_text(render_config(sections))
        self.stderr_path = self.dir / "stderr.log"
        self.proc = None
        self.returncode = None

    def start(self, wait=True):
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([MAILFERRY_BIN, "gateway", "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=self._err, env=child_env())
        self.pid = self.proc.pid
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=10):
        """Waits until every listener accepts. The plain and submission
        probes read the greeting and QUIT, so the server has seen them end;
        then waits (briefly) for the gateway's Redis connection."""
        deadline = time.monotonic() + timeout
        for port, full in ((self.plain, True), (self.submission, True), (self.tls, False)):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError("mailferry exited with %s during start:\n%s"
                                         % (self.proc.returncode, self.stderr()))
                try:
                    if full:
                        c = RawSMTP(port, timeout=2)
                        c.greeting()
                        c.send("QUIT\r\n")
                        c.reply()
                        c.wait_closed(2)
                        c.close()
                    else:
                        socket.create_connection(("127.0.0.1", port), timeout=2).close()
                    break
                except (OSError, SMTPClosed):
                    if time.monotonic() > deadline:
                        raise AssertionError("port %d not accepting; stderr:\n%s"
                                             % (port, self.stderr()))
                    time.sleep(0.05)
        # The queue connects asynchronously; give it a moment to show up as
        # a Redis client other than ourselves.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            with self.redis.client() as r:
                lst = r("CLIENT", "LIST").decode()
            others = [l for l in lst.splitlines() if "cmd=client|list" not in l]
            if others:
                break
            time.sleep(0.05)

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout):
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def stop(self, timeout=10):
        """SIGTERM and wait; returns the exit status (None on timeout, after
        which the process is killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.returncode = None
        self._err.close()
        return self.returncode

    def write_users(self, users):
        write_users(self.users_path, users, self.hashes)

    # -- the queue ---------------------------------------------------------
    def message_ids(self):
        with self.redis.client() as r:
            keys = r("KEYS", self.prefix + "msg:*")
        return sorted(k.decode()[len(self.prefix) + 4:] for k in keys)

    def message(self, qid):
        with self.redis.client() as r:
            flat = r("HGETALL", self.prefix + "msg:" + qid)
        h = {}
        for k, v in zip(flat[::2], flat[1::2]):
            k = k.decode()
            h[k] = v if k == "data" else v.decode("utf-8", "replace")
        return h

    def messages(self):
        return {i: self.message(i) for i in self.message_ids()}

    def ready_ids(self):
        with self.redis.client() as r:
            entries = r("XRANGE", self.prefix + "ready", "-", "+")
        out = []
        for _eid, fields in entries or []:
            f = dict(zip(fields[::2], fields[1::2]))
            out.append(f.get(b"id", b"").decode())
        return out

    def stored(self, qid):
        """The message hash for qid, after checking the ready stream has it."""
        h = self.message(qid)
        assert h, "message %s not in Redis (keys: %r)" % (qid, self.message_ids())
        assert qid in self.ready_ids(), "message %s not in %sready" % (qid, self.prefix)
        return h


_prefix_counter = itertools.count()


@pytest.fixture
def start_gateway(request, tmp_path, redis_server, certs, password_hashes):
    """Factory: start_gateway(users=None, wait=True, start=True,
    **config_overrides) -> Gateway (start=False only writes the files).
    Keys go to [gateway] unless listed in SECTION_OF or written
    "section.key"; a value None leaves the key out. At teardown each
    gateway gets SIGTERM and must exit 0 within 10 s with a clean stderr."""
    started = []
    base = re.sub(r"[^A-Za-z0-9]+", "_", request.node.name)[:60]

    def factory(users=None, wait=True, start=True, **overrides):
        prefix = "it:%s:%d:" % (base, next(_prefix_counter))
        gw = Gateway(tmp_path / ("gw%d" % len(started)), redis_server, certs, password_hashes,
                     prefix, overrides, users if users is not None else DEFAULT_USERS)
        started.append(gw)
        return gw.start(wait=wait) if start else gw

    yield factory

    problems = []
    for gw in started:
        if gw.proc is None:
            continue
        already = gw.proc.poll() is not None
        rc = gw.stop(10)
        err = gw.stderr()
        sys.stderr.write("---- mailferry stderr (%s) ----\n%s\n" % (gw.prefix, err[-20000:]))
        if rc != 0:
            problems.append("mailferry %s exit status %r (%s)" %
                            (gw.prefix, rc, "had already exited" if already
                             else "after SIGTERM; None means still running after 10 s"))
        for marker in SANITIZER_MARKERS:
            if marker in err:
                problems.append("mailferry %s stderr contains %r" % (gw.prefix, marker))
    assert not problems, "\n".join(problems)


@pytest.fixture
def gateway(start_gateway):
    """A gateway with the default configuration."""
    return start_gateway()


@pytest.fixture
def raw(request):
    """Factory for RawSMTP clients that are closed at teardown."""
    clients = []

    def factory(port, **kw):
        c = RawSMTP(port, **kw)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.close()


def pytest_configure(config):
    if not os.path.exists(MAILFERRY_BIN):
        sys.stderr.write("mailferry binary not found at %s (set MAILFERRY_BIN)\n" % MAILFERRY_BIN)
