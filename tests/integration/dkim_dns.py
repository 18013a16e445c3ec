"""DNS for the DKIM and "dns check" integration tests.

Dnsmasq serves test zones on 127.0.0.1 (a free port), with every record on
its command line; a TXT value longer than 255 octets is published as
several character-strings, as a 2048-bit DKIM key is in real zones, so the
readers (mailferryctl, Python's dkim package, libopendkim) must join them.

dnsfunc() gives Python's dkim package a resolver that asks that dnsmasq
(dnspython), and opendkim_verify() runs opendkim-testmsg, whose resolver
reads /etc/resolv.conf, inside private network and mount namespaces where
a second dnsmasq answers on 127.0.0.1:53.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import dns.exception
import dns.resolver

DNSMASQ = "/usr/sbin/dnsmasq"
OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg"


def free_udp_port():
    """A loopback port free for both UDP and TCP (dnsmasq binds both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def txt_arg(name, value):
    """A dnsmasq --txt-record argument; values are split into strings of
    at most 250 octets (RFC 1035 section 3.3.14 allows 255)."""
    assert "," not in value, "dnsmasq separates strings with commas"
    parts = [value[i:i + 250] for i in range(0, len(value), 250)] or [""]
    return "--txt-record=%s,%s" % (name, ",".join(parts))


class Zone:
    """The records one dnsmasq serves: TXT, PTR and A/AAAA."""

    def __init__(self):
        self.txt = []      # (name, value)
        self.ptr = []      # (reverse name, target)
        self.hosts = []    # (name, address)

    def add_txt(self, name, value):
        self.txt.append((name, value))
        return self

    def add_ptr(self, ip, target):
        a = ip.split(".")
        self.ptr.append((".".join(reversed(a)) + ".in-addr.arpa", target))
        return self

    def add_host(self, name, addr):
        self.hosts.append((name, addr))
        return self

    def args(self, port):
        out = [DNSMASQ, "--port=%d" % port, "--listen-address=127.0.0.1", "--bind-interfaces",
               "--no-resolv", "--no-hosts", "--keep-in-foreground", "--conf-file=/dev/null",
               "--pid-file", "--user=",
               # Authoritative answers (NXDOMAIN) for everything the tests ask.
               "--local=/test/", "--local=/arpa/", "--local=/net/", "--local=/org/",
               "--local=/com/", "--local=/example/"]
        out += [txt_arg(n, v) for n, v in self.txt]
        out += ["--ptr-record=%s,%s" % (n, t) for n, t in self.ptr]
        out += ["--host-record=%s,%s" % (n, a) for n, a in self.hosts]
        return out


class Dnsmasq:
    """A dnsmasq on 127.0.0.1:port serving zone, stopped by stop()."""

    def __init__(self, zone):
        self.zone = zone
        self.port = None
        self.proc = None

    def start(self):
        """Starts dnsmasq on a free port; a port taken meanwhile by another
        process (dnsmasq then exits) means another try on another one."""
        err = ""
        for _ in range(5):
            self.port = free_udp_port()
            self.proc = subprocess.Popen(self.zone.args(self.port), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            if self._wait_answer():
                return self
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
            self.stop()
        raise RuntimeError("dnsmasq did not start: %s" % err)

    def _wait_answer(self):
        deadline = time.monotonic() + 5
        r = self.resolver(timeout=0.3)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                r.resolve("probe.test", "A")
                return True
            except dns.resolver.NXDOMAIN:
                return True
            except (dns.exception.Timeout, dns.resolver.NoNameservers,
                    dns.resolver.NoAnswer):
                time.sleep(0.05)
        return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def server(self):
        return "127.0.0.1:%d" % self.port

    def resolver(self, timeout=2.0):
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.timeout = timeout
        r.lifetime = timeout * 2
        return r

    def dnsfunc(self):
        """The dnsfunc of dkim.verify(): the first TXT record of name, its
        strings joined (RFC 6376 section 3.6.2.2), or b"" when none."""
        res = self.resolver()

        def lookup(name, timeout=5):
            if isinstance(name, bytes):
                name = name.decode()
            try:
                ans = res.resolve(name, "TXT")
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return b""
            for rr in ans:
                return b"".join(rr.strings)
            return b""
        return lookup


def namespaces_available():
    """Whether opendkim-testmsg can be run against a private resolver."""
    if not (os.path.exists(OPENDKIM_TESTMSG) and shutil.which("unshare") and shutil.which("ip")):
        return False
    cmd = _unshare() + ["sh", "-c", "ip link set lo up && mount --bind /dev/null /etc/hostname"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def _unshare():
    base = ["unshare", "-n", "-m"]
    return base if os.geteuid() == 0 else ["unshare", "-r", "-n", "-m"]


def opendkim_verify(zone, message):
    """Runs opendkim-testmsg on message (bytes) with zone served as the
    system resolver in private namespaces. Returns (exit status, output)."""
    with tempfile.TemporaryDirectory() as d:
        msg = os.path.join(d, "msg")
        resolv = os.path.join(d, "resolv.conf")
        script = os.path.join(d, "run.sh")
        with open(msg, "wb") as f:
            f.write(message)
        with open(resolv, "w") as f:
            f.write("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")
        args = " ".join("'%s'" % a.replace("'", "'\\''") for a in zone.args(53))
        with open(script, "w") as f:
            f.write("set -e\n"
                    "ip link set lo up\n"
                    "mount --bind %s /etc/resolv.conf\n"
                    "%s >/dev/null 2>&1 &\n"
                    "dm=$!\n"
                    "for i in $(seq 50); do\n"
                    "  if ip -o addr show lo >/dev/null && "
                    "[ -n \"$(ss -lun 2>/dev/null | grep ':53 ')\" ]; then break; fi\n"
                    "  sleep 0.05\n"
                    "done\n"
                    "set +e\n"
                    "%s < %s\n"
                    "rc=$?\n"
                    "kill $dm\n"
                    "exit $rc\n" % (resolv, args, OPENDKIM_TESTMSG, msg))
        p = subprocess.run(_unshare() + ["sh", script], capture_output=True, timeout=60)
        return p.returncode, (p.stdout + p.stderr).decode(errors="replace")
