"""Fixtures and helpers for the tunnel tests (test_tunnel.py) and the relay
benchmark (bench/relay_bench.py): the router side of the relay.

Built from the relay's and the router's test helpers (relay_env.py,
router_env.py), which are used as they are:

  - the tunnel PKI made by `mailferryctl tunnel-certs` (TunnelPKI): a CA,
    the relay's certificate for relay.test and 127.0.0.1, two router
    certificates, and a second, unrelated CA with its own router
    certificate (the "foreign" one);
  - dnsmasq serving a zone of its own (TunnelDns): rec.test, slow.test and
    sink.test with their MX hosts on 127.0.0.31-33, the relay's
    forward-confirmed PTR, and, when `listed`, a DNSBL record for the
    relay's public address in bl.test;
  - recipient MX hosts on one port (the relay's mx_port): tunnel_mx.py
    (mx_recorder plus slow-N recipients) on 127.0.0.31 and 127.0.0.32,
    Postfix's smtp-sink on 127.0.0.33.

Every process is started with Popen and stopped by its PID.
"""

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mftest import MAILFERRY_BIN  # noqa: E402
from relay_env import (DNSMASQ, HELO, PUBLIC_IP, PYTHON, DnsServer, Recorder, Sink,  # noqa: E402
                       free_port, port_free_on, wait_until)

HERE = Path(__file__).resolve().parent
TUNNEL_MX = HERE / "tunnel_mx.py"
MAILFERRYCTL_BIN = os.environ.get(
    "MAILFERRYCTL_BIN", os.path.join(os.path.dirname(MAILFERRY_BIN), "mailferryctl"))

# The name the router checks in the relay's certificate.
RELAY_NAME = "relay.test"

# MX hosts of the tunnel zone.
MX_FAST = "127.0.0.31"      # tunnel_mx: rec.test
MX_SLOW = "127.0.0.32"      # tunnel_mx: slow.test
MX_SINK = "127.0.0.33"      # smtp-sink: sink.test


def tunnel_zone(listed):
    """dnsmasq options: three destination domains, the relay's PTR, and
    (listed) the relay's address on the DNSBL zone bl.test."""
    args = [
        "--mx-host=rec.test,mx.rec.test,10",
        "--host-record=mx.rec.test,%s" % MX_FAST,
        "--mx-host=slow.test,mx.slow.test,10",
        "--host-record=mx.slow.test,%s" % MX_SLOW,
        "--mx-host=sink.test,mx.sink.test,10",
        "--host-record=mx.sink.test,%s" % MX_SINK,
        "--host-record=%s,%s" % (HELO, PUBLIC_IP),
    ]
    if listed:
        rev = ".".join(reversed(PUBLIC_IP.split(".")))
        args += ["--host-record=%s.bl.test,127.0.0.2" % rev,
                 "--txt-record=%s.bl.test,Listed for testing, see https://bl.test/" % rev]
    return args


class TunnelDns(DnsServer):
    """relay_env's dnsmasq, serving the tunnel zone."""

    def start(self, listed=None):
        if listed is not None:
            self.listed = listed
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [DNSMASQ, "--port=%d" % self.port, "--listen-address=127.0.0.1",
             "--bind-interfaces", "--no-resolv", "--no-hosts", "--keep-in-foreground",
             "--conf-file=/dev/null", "--pid-file=", "--user=root", "--local=/test/",
             "--log-queries", "--log-facility=-"] + tunnel_zone(self.listed),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(self._answers, 10, "dnsmasq to answer",
                   diag=lambda: self.log.read_text(errors="replace"))
        return self


class TunnelMX(Recorder):
    """relay_env's Recorder, running tunnel_mx.py."""

    def start(self):
        cmd = [PYTHON, str(TUNNEL_MX), "--host", self.host, "--port", str(self.port),
               "--dir", str(self.dir), "--mode", self.mode]
        self._out = open(self.out, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: b"READY" in self.out.read_bytes() or self.proc.poll() is not None,
                   10, "MX %s to listen" % self.name)
        if self.proc.poll() is not None:
            raise RuntimeError("MX %s exited: %s" % (self.name, self.out.read_text(errors="replace")))
        return self

    def data_started(self):
        """How many slow messages have reached their end of data."""
        p = self.dir / "data-started.log"
        return len(p.read_text().splitlines()) if p.exists() else 0

    def dropped(self):
        p = self.dir / "dropped.log"
        return len(p.read_text().splitlines()) if p.exists() else 0


class TunnelWorld:
    """DNS and the MX hosts, on one MX port."""

    def __init__(self, workdir, sink=False):
        self.dir = Path(workdir)
        hosts = [MX_FAST, MX_SLOW] + ([MX_SINK] if sink else [])
        for _ in range(50):
            self.mx_port = free_port()
            if port_free_on(hosts, self.mx_port):
                break
        self.dns = TunnelDns(self.dir / "dns", listed=False)
        self.fast = TunnelMX(self.dir, "fast", MX_FAST, self.mx_port)
        self.slow = TunnelMX(self.dir, "slow", MX_SLOW, self.mx_port)
        self.sink = Sink(self.dir, MX_SINK, self.mx_port) if sink else None

    def start(self):
        self.dns.start()
        for p in (self.fast, self.slow, self.sink):
            if p is not None:
                p.start()
        return self

    def stop(self):
        for p in (self.sink, self.slow, self.fast, self.dns):
            if p is not None:
                p.stop()


def make_pki(d):
    """The tunnel PKI, made by mailferryctl tunnel-certs, in relay_env's
    layout (the keys relay_env.Relay and client_context read) plus the
    foreign CA's files and the tool's output."""
    d = Path(d)
    ours, other = d / "tunnel", d / "foreign"
    out = subprocess.run([MAILFERRYCTL_BIN, "tunnel-certs", str(ours), "--relay-name",
                          "%s,127.0.0.1" % RELAY_NAME, "--routers", "2", "--days", "3"],
                         capture_output=True, check=True)
    subprocess.run([MAILFERRYCTL_BIN, "tunnel-certs", str(other), "--relay-name", RELAY_NAME,
                    "--days", "3"], capture_output=True, check=True)
    return {
        "dir": str(ours),
        "output": out.stdout.decode(),
        "ca": str(ours / "tunnel-ca.crt"),
        "server_crt": str(ours / "relay.crt"), "server_key": str(ours / "relay.key"),
        "router_crt": str(ours / "router-1.crt"), "router_key": str(ours / "router-1.key"),
        "router2_crt": str(ours / "router-2.crt"), "router2_key": str(ours / "router-2.key"),
        "foreign_ca": str(other / "tunnel-ca.crt"),
        "foreign_crt": str(other / "router-1.crt"), "foreign_key": str(other / "router-1.key"),
    }


def relay_route(relay, pki, priority=10, who="router", **keys):
    """A [route NAME] section for the relay transport to relay (a
    relay_env.Relay), with the test's fast status checks and breaker."""
    d = {
        "transport": "relay",
        "host": "127.0.0.1:%d" % relay.port,
        "servername": RELAY_NAME,
        "tunnel_ca": pki["ca"],
        "client_cert": pki[who + "_crt"],
        "client_key": pki[who + "_key"],
        "status_interval": 1,
        "status_timeout": 5,
        "priority": priority,
        "breaker_cooldown": 2,
        "probe_fraction": 1,
        "probe_successes": 2,
    }
    d.update(keys)
    return d


RELAY_DEFAULTS = {
    # The tunnel zone has no SPF records; the self-check looks at the PTR
    # and the DNSBL zone only.
    "spf_domains": None,
    "dnsbl_zones": "bl.test",
    "check_interval": 1,
}
