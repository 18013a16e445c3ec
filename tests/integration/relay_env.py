"""Fixtures and helpers for the relay integration tests (test_relay.py).

Real peers only, all on loopback:

  - a test PKI made with the openssl CLI: a tunnel CA, the relay's server
    certificate, a router client certificate, a client certificate from a
    foreign CA, and a certificate for the STARTTLS MX;
  - dnsmasq on 127.0.0.1 (a free port) serving the test zone: MX, A, PTR,
    TXT (SPF) and DNSBL records (DnsServer, restartable with other
    records);
  - recipient MX hosts on distinct loopback addresses, all on one free
    port (the relay's [relay] mx_port): mx_recorder.py (aiosmtpd) on
    127.0.0.11 and 127.0.0.12, relay_mx.py (aiosmtpd with STARTTLS) on
    127.0.0.13, Postfix's smtp-sink on 127.0.0.14; 127.0.0.15 and
    127.0.0.16 have nothing listening (connections are refused);
  - `mailferry relay --config FILE` per test (Relay), stopped with SIGTERM
    at the end: it must exit 0 with no sanitizer report in its log.

Every process is started with Popen and stopped by its PID.
"""

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mftest import MAILFERRY_BIN, child_env  # noqa: E402

PYTHON = "/usr/bin/python3"          # Debian's, which has python3-aiosmtpd
HERE = Path(__file__).resolve().parent
MX_RECORDER = HERE / "mx_recorder.py"
RELAY_MX = HERE / "relay_mx.py"
SMTP_SINK = "/usr/sbin/smtp-sink"
DNSMASQ = "/usr/sbin/dnsmasq"

SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:",
                     "UndefinedBehaviorSanitizer")

# The relay's identity in the test zone.
HELO = "relay.test"
PUBLIC_IP = "192.0.2.10"
SOURCE_IP = "127.0.0.2"

# MX hosts by role.
MX_REC = "127.0.0.11"       # mx_recorder, rec.test
MX_REC2 = "127.0.0.12"      # mx_recorder, second MX of fail.test, implicit.test
MX_TLS = "127.0.0.13"       # relay_mx (STARTTLS), tls.test
MX_SINK = "127.0.0.14"      # smtp-sink, sink.test
MX_DEAD = "127.0.0.15"      # nothing listens: first MX of fail.test
MX_DEAD2 = "127.0.0.16"     # nothing listens: down.test


def zone_records(listed=True):
    """dnsmasq options for the test zone. listed: the relay's address is
    on the DNSBL zone bl.test."""
    args = [
        # rec.test: one MX.
        "--mx-host=rec.test,mx.rec.test,10",
        "--host-record=mx.rec.test,%s" % MX_REC,
        # tls.test: an MX with STARTTLS.
        "--mx-host=tls.test,mx.tls.test,10",
        "--host-record=mx.tls.test,%s" % MX_TLS,
        # fail.test: the preferred MX refuses connections.
        "--mx-host=fail.test,mxa.fail.test,10",
        "--mx-host=fail.test,mxb.fail.test,20",
        "--host-record=mxa.fail.test,%s" % MX_DEAD,
        "--host-record=mxb.fail.test,%s" % MX_REC2,
        # sink.test: smtp-sink.
        "--mx-host=sink.test,mx.sink.test,10",
        "--host-record=mx.sink.test,%s" % MX_SINK,
        # null.test: RFC 7505 null MX.
        "--mx-host=null.test,.,0",
        # implicit.test: no MX, an address (RFC 5321 section 5.1).
        "--host-record=implicit.test,%s" % MX_REC2,
        # down.test: the only MX refuses connections.
        "--mx-host=down.test,mx.down.test,10",
        "--host-record=mx.down.test,%s" % MX_DEAD2,
        # The relay: forward-confirmed reverse DNS (host-record also makes
        # the PTR record).
        "--host-record=%s,%s" % (HELO, PUBLIC_IP),
        # SPF that authorises the relay, directly and through include:.
        "--txt-record=spf.test,v=spf1 ip4:192.0.2.0/24 -all",
        "--txt-record=spf2.test,v=spf1 include:spf.test ~all",
        # SPF that does not.
        "--txt-record=badspf.test,v=spf1 ip4:198.51.100.0/24 -all",
    ]
    if listed:
        rev = ".".join(reversed(PUBLIC_IP.split(".")))
        args += ["--host-record=%s.bl.test,127.0.0.2" % rev,
                 "--txt-record=%s.bl.test,Listed for testing, see https://bl.test/" % rev]
    return args


def free_port(host="127.0.0.1"):
    """A port free for TCP on host (and for UDP, which dnsmasq needs too)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((host, port))
            return port
        except OSError:
            continue


def port_free_on(hosts, port):
    for h in hosts:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((h, port))
        except OSError:
            return False
    return True


def wait_until(pred, timeout, what, interval=0.05, diag=None):
    """Polls pred() until it returns a true value, which is returned."""
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
                except Exception as e:  # the diagnostic must not hide the timeout
                    extra = "\n(diagnostic failed: %r)" % e
            raise AssertionError("timed out after %.1f s waiting for %s%s" % (timeout, what, extra))
        time.sleep(interval)


def stop_proc(proc, timeout=10):
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


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


# -- PKI --------------------------------------------------------------------------

def _make_ca(d, name, cn):
    key, crt = d / (name + ".key"), d / (name + ".crt")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", crt, "-days", "3", "-subj", "/CN=" + cn,
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    return key, crt


def _issue(d, name, cn, ca_key, ca_crt, ext):
    key, csr, crt = d / (name + ".key"), d / (name + ".csr"), d / (name + ".crt")
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=" + cn])
    extf = d / (name + ".ext")
    extf.write_text(ext)
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "3", "-extfile", extf])
    os.chmod(key, 0o600)
    return str(key), str(crt)


def fingerprint(crt):
    """"sha256:AB:CD:..." as openssl prints it."""
    out = run(["openssl", "x509", "-in", crt, "-noout", "-fingerprint", "-sha256"]).stdout.decode()
    return "sha256:" + out.strip().split("=", 1)[1]


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("relay-pki")
    ca_key, ca_crt = _make_ca(d, "tunnel-ca", "mailferry tunnel CA")
    f_key, f_crt = _make_ca(d, "foreign-ca", "some other CA")
    server = _issue(d, "relay", "relay.test", ca_key, ca_crt,
                    "basicConstraints=CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=serverAuth\n"
                    "subjectAltName=DNS:relay.test,DNS:localhost,IP:127.0.0.1\n")
    client_ext = ("basicConstraints=CA:FALSE\n"
                  "keyUsage=critical,digitalSignature\n"
                  "extendedKeyUsage=clientAuth\n")
    router = _issue(d, "router", "router-1", ca_key, ca_crt, client_ext)
    router2 = _issue(d, "router2", "router-2", ca_key, ca_crt, client_ext)
    foreign = _issue(d, "foreign", "router-1", f_key, f_crt, client_ext)
    mx = _issue(d, "mx", "mx.tls.test", ca_key, ca_crt,
                "basicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectAltName=DNS:mx.tls.test\n")
    return {
        "ca": str(ca_crt),
        "server_key": server[0], "server_crt": server[1],
        "router_key": router[0], "router_crt": router[1],
        "router2_key": router2[0], "router2_crt": router2[1],
        "foreign_key": foreign[0], "foreign_crt": foreign[1],
        "mx_key": mx[0], "mx_crt": mx[1],
    }


def client_context(pki, who="router"):
    """A TLS context for a tunnel client: verifies the relay against the
    tunnel CA and presents the named client certificate (None: none)."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if who is not None:
        ctx.load_cert_chain(pki[who + "_crt"], pki[who + "_key"])
    return ctx


# -- DNS -------------------------------------------------------------------------

class DnsServer:
    """dnsmasq on 127.0.0.1:port, authoritative for .test (unknown names
    there are NXDOMAIN), with no upstream."""

    def __init__(self, workdir, listed=True):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = self.dir / "dnsmasq.log"
        self.proc = None
        self.listed = listed

    def start(self, listed=None):
        if listed is not None:
            self.listed = listed
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [DNSMASQ, "--port=%d" % self.port, "--listen-address=127.0.0.1",
             "--bind-interfaces", "--no-resolv", "--no-hosts", "--keep-in-foreground",
             "--conf-file=/dev/null", "--pid-file=", "--user=root", "--local=/test/",
             "--log-queries", "--log-facility=-"] + zone_records(self.listed),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._answers, 10, "dnsmasq to answer",
                   diag=lambda: self.log.read_text(errors="replace"))
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError("dnsmasq exited: %s" % self.log.read_text(errors="replace"))
        # A minimal DNS query for rec.test MX over UDP.
        q = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x03rec\x04test\x00\x00\x0f\x00\x01")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            try:
                s.sendto(q, ("127.0.0.1", self.port))
                data, _ = s.recvfrom(512)
                return data[:2] == b"\x12\x34"
            except OSError:
                return False

    def stop(self):
        if self.proc is not None:
            stop_proc(self.proc)
            self.proc = None
            self._log.close()

    def restart(self, listed):
        self.stop()
        self.start(listed)

    @property
    def resolver(self):
        return "127.0.0.1:%d" % self.port


# -- MX hosts ----------------------------------------------------------------------

class Recorder:
    """One mx_recorder.py / relay_mx.py subprocess and what it recorded."""

    def __init__(self, workdir, name, host, port, tls=None, mode="normal"):
        self.name = name
        self.host = host
        self.port = port
        self.dir = Path(workdir) / ("mx-" + name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = self.dir / "stdout.log"
        self.tls = tls
        self.mode = mode
        self.proc = None

    def start(self):
        script = RELAY_MX if self.tls else MX_RECORDER
        cmd = [PYTHON, str(script), "--host", self.host, "--port", str(self.port),
               "--dir", str(self.dir), "--mode", self.mode]
        if self.tls:
            cmd += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        self._out = open(self.out, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: b"READY" in self.out.read_bytes() or self.proc.poll() is not None,
                   10, "MX %s to listen" % self.name)
        if self.proc.poll() is not None:
            raise RuntimeError("MX %s exited: %s" % (self.name, self.out.read_text(errors="replace")))
        return self

    def stop(self):
        if self.proc is not None:
            stop_proc(self.proc)
            self.proc = None
            self._out.close()

    def messages(self):
        """Every message so far: the JSON envelope with "data" (the exact
        bytes) and "tls" (relay_mx.py only) added."""
        out = []
        for meta in sorted(self.dir.glob("*.json")):
            m = json.loads(meta.read_text())
            m["data"] = meta.with_suffix(".eml").read_bytes()
            tls = meta.with_suffix(".tls")
            m["tls"] = tls.read_text().strip() if tls.exists() else None
            out.append(m)
        return out

    def to(self, rcpt):
        return [m for m in self.messages() if rcpt.lower() in [r.lower() for r in m["rcpt_tos"]]]

    def rcpt_log(self):
        p = self.dir / "rcpt.log"
        if not p.exists():
            return []
        return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


class Sink:
    """Postfix's smtp-sink, dumping each transaction into a file."""

    def __init__(self, workdir, host, port):
        self.host = host
        self.port = port
        # smtp-sink drops to "nobody" when run as root, which cannot enter
        # pytest's private directories: the dumps go to a directory of
        # their own under /tmp (removed at stop).
        self.dir = Path(tempfile.mkdtemp(prefix="mf-relay-sink-"))
        os.chmod(self.dir, 0o777)
        self.log = Path(workdir) / "sink.log"
        self.proc = None

    def start(self):
        cmd = [SMTP_SINK]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += ["-d", str(self.dir / "%H%M%S."), "%s:%d" % (self.host, self.port), "100"]
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("smtp-sink exited: %s" % self.log.read_text(errors="replace"))
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            except OSError:
                return False
        wait_until(up, 10, "smtp-sink to listen")
        return self

    def stop(self):
        if self.proc is not None:
            stop_proc(self.proc)
            self.proc = None
            self._log.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def dumps(self):
        return [p.read_bytes() for p in sorted(self.dir.iterdir()) if p.is_file()]


class World:
    """The shared peers: DNS and the MX hosts."""

    def __init__(self, workdir, pki):
        self.dir = Path(workdir)
        self.pki = pki
        hosts = [MX_REC, MX_REC2, MX_TLS, MX_SINK]
        for _ in range(50):
            self.mx_port = free_port()
            if port_free_on(hosts, self.mx_port):
                break
        self.dns = DnsServer(self.dir / "dns")
        self.rec = Recorder(self.dir, "rec", MX_REC, self.mx_port)
        self.rec2 = Recorder(self.dir, "rec2", MX_REC2, self.mx_port)
        self.tls = Recorder(self.dir, "tls", MX_TLS, self.mx_port,
                            tls=(pki["mx_crt"], pki["mx_key"]))
        self.sink = Sink(self.dir, MX_SINK, self.mx_port)

    def start(self):
        self.dns.start()
        for p in (self.rec, self.rec2, self.tls, self.sink):
            p.start()
        return self

    def stop(self):
        for p in (self.sink, self.tls, self.rec2, self.rec, self.dns):
            p.stop()


@pytest.fixture(scope="session")
def world(tmp_path_factory, pki):
    w = World(tmp_path_factory.mktemp("relay-world"), pki)
    try:
        w.start()
        yield w
    finally:
        w.stop()


# -- the relay -----------------------------------------------------------------------

def render_config(sections):
    out = []
    for sec, kv in sections.items():
        out.append("[%s]" % sec)
        for k, v in kv.items():
            if v is not None:
                out.append("%s = %s" % (k, v))
        out.append("")
    return "\n".join(out)


class Relay:
    """One `mailferry relay` process."""

    def __init__(self, workdir, pki, dns, mx_port, overrides):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = free_port()
        relay = {
            "listen": "127.0.0.1:%d" % self.port,
            "tls_cert": pki["server_crt"],
            "tls_key": pki["server_key"],
            "tunnel_ca": pki["ca"],
            "helo_name": HELO,
            "public_ip": PUBLIC_IP,
            "source_address": SOURCE_IP,
            "resolver": dns.resolver,
            "mx_port": mx_port,
            "mx_idle_timeout": 30,
            "mx_connect_timeout": 5,
            "check_interval": 1,
            "dnsbl_zones": "bl.test",
            "spf_domains": "spf.test,spf2.test",
            "idle_timeout": 30,
            "data_timeout": 30,
            "shutdown_grace": 3,
        }
        sections = {"log": {"level": "debug"}, "dns": {"timeout": 1000}, "relay": relay}
        for k, v in overrides.items():
            sec, key = k.split(".", 1) if "." in k else ("relay", k)
            sections.setdefault(sec, {})[key] = v
        self.config = sections
        self.config_path = self.dir / "mailferry.conf"
        self.config_path.write_text(render_config(sections))
        self.stderr_path = self.dir / "stderr.log"
        self.proc = None
        self.returncode = None

    def start(self, wait=True):
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([MAILFERRY_BIN, "relay", "--config", str(self.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._err,
                                     stderr=self._err, env=child_env())
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=10):
        def up():
            if self.proc.poll() is not None:
                raise AssertionError("mailferry relay exited with %s:\n%s"
                                     % (self.proc.returncode, self.stderr()))
            return "event=listen listener=relay" in self.stderr()
        wait_until(up, timeout, "the relay to listen", diag=self.stderr)

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout=15):
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

    # -- clients ---------------------------------------------------------------
    def smtp(self, who="router", timeout=15):
        """smtplib over implicit TLS with a client certificate."""
        return smtplib.SMTP_SSL("127.0.0.1", self.port, context=client_context(self.pki, who),
                                timeout=timeout)

    def tls_socket(self, who="router", timeout=5):
        """A raw TLS socket to the relay (handshake done)."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return client_context(self.pki, who).wrap_socket(raw, server_hostname="127.0.0.1")

    def xstatus(self):
        """The XSTATUS reply lines (without codes) and the EHLO keyword."""
        with self.smtp() as c:
            code, msg = c.ehlo("router.test")
            assert code == 250, (code, msg)
            kw = c.esmtp_features.get("x-mailferry-status")
            code, msg = c.docmd("XSTATUS")
            assert code == 250, (code, msg)
            return msg.decode().splitlines(), kw


@pytest.fixture
def start_relay(request, tmp_path, pki):
    """Factory: start_relay(dns, mx_port, wait=True, **overrides) -> Relay.
    Keys go to [relay] unless written "section.key"; None leaves one out.
    At teardown each relay gets SIGTERM and must exit 0 with a clean log."""
    started = []

    def factory(dns, mx_port, wait=True, start=True, **overrides):
        r = Relay(tmp_path / ("relay%d" % len(started)), pki, dns, mx_port, overrides)
        started.append(r)
        return r.start(wait=wait) if start else r

    yield factory

    problems = []
    for r in started:
        if r.proc is None:
            continue
        already = r.proc.poll() is not None
        rc = r.stop()
        err = r.stderr()
        sys.stderr.write("---- mailferry relay stderr (%s) ----\n%s\n" % (r.dir, err[-30000:]))
        if rc != 0:
            problems.append("mailferry relay exit status %r (%s)" %
                            (rc, "had already exited" if already else "after SIGTERM"))
        for marker in SANITIZER_MARKERS:
            if marker in err:
                problems.append("mailferry relay stderr contains %r" % marker)
    assert not problems, "\n".join(problems)


@pytest.fixture
def relay(world, start_relay):
    """A relay with the default test configuration, against the shared
    world."""
    return start_relay(world.dns, world.mx_port)


def log_lines(text, event, **fields):
    """The relay's log lines with event=<event> and the given key=value
    fields (values compared as written, unquoted)."""
    out = []
    for line in text.splitlines():
        if " event=%s " % event not in line + " ":
            continue
        if all(re.search(r"\b%s=\"?%s\"?(\s|$)" % (re.escape(k), re.escape(str(v))), line)
               for k, v in fields.items()):
            out.append(line)
    return out
