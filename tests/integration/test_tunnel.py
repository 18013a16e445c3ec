"""Integration tests of the tunnel from the router's side (transports/relay.c)
with real peers: `mailferry all` (gateway and router) with a relay route,
`mailferry relay` on the other end, dnsmasq serving the zone, aiosmtpd and
smtp-sink as recipient MX hosts, and certificates made by `mailferryctl
tunnel-certs` (tunnel_env.py).

What is checked:
  - end to end, gateway -> Redis -> router -> tunnel -> relay -> MX: the
    bytes at the MX are exactly the bytes stored in Redis; a temporary
    failure of one recipient is retried through the tunnel;
  - the tunnel's mutual TLS from the router's side: a router presenting a
    certificate of another CA is refused by the relay, a router that does
    not trust the relay's CA, or finds another name in its certificate,
    refuses the relay; each makes the route unhealthy and the mail takes the
    overflow route; a plain TCP client gets nothing from the relay (the
    handshake details are in test_relay.py);
  - the relay killed in the middle of a transaction: the router defers the
    recipient, nothing is lost, and the recipient of the other domain,
    already accepted, is not sent again;
  - a DNSBL listing of the relay's address: the route turns unhealthy within
    seconds, its breaker opens and mail overflows; when the listing is
    withdrawn the route comes back through half-open probes;
  - mailferryctl tunnel-certs: the files, their modes, the extensions, and
    no overwriting.
Every mailferry process must exit 0 on SIGTERM with a clean log.
"""

import email.utils
import os
import re
import socket
import stat
import subprocess
import time

import pytest

from relay_env import log_lines, start_relay  # noqa: F401 (fixture)
from router_env import renv, wait_until  # noqa: F401 (fixture)
from tunnel_env import (MAILFERRYCTL_BIN, RELAY_DEFAULTS, RELAY_NAME, TunnelWorld, make_pki,
                        relay_route)
from mftest import check_stored

SENDER = "sender@client.test"


@pytest.fixture(scope="session")
def tunnel_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("tunnel-pki"))


@pytest.fixture(scope="session")
def pki(tunnel_pki):
    """relay_env's start_relay reads the certificates from `pki`: here the
    ones mailferryctl tunnel-certs made."""
    return tunnel_pki


@pytest.fixture
def tworld(tmp_path):
    w = TunnelWorld(tmp_path / "world")
    try:
        w.start()
        yield w
    finally:
        w.stop()


def start_tunnel_relay(start_relay, tworld, **overrides):  # noqa: F811
    kw = dict(RELAY_DEFAULTS)
    kw.update(overrides)
    return start_relay(tworld.dns, tworld.mx_port, **kw)


def message(rcpts, subject):
    body = ("Hello through the tunnel.\r\n"
            ".a line that starts with a dot\r\n"
            "..two dots\r\n"
            ".\r\n"
            "\r\n"
            "Grüße, 8-bit text: ünïcödé\r\n"
            "trailing blanks   \r\n").encode("utf-8") + b"Z" * 990 + b"\r\nlast line\r\n"
    head = ("From: Sender <%s>\r\nTo: %s\r\nSubject: %s\r\nMessage-ID: <%s-%d@client.test>\r\n"
            "Date: %s\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            % (SENDER, ", ".join("<%s>" % r for r in rcpts), subject,
               re.sub(r"\W", "", subject), int(time.time() * 1000), email.utils.formatdate()))
    return head.encode() + body


def route_health_lines(mf, healthy):
    return [l for l in mf.lines("route_health")
            if "route=relay " in l and "healthy=%s " % healthy in l]


def health(renv):  # noqa: F811
    """The relay route's health as the router last wrote it to Redis."""
    flat = renv.redis("HGETALL", renv.key("health:relay")) or []
    return {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2])}


def wait_health(renv, pred, timeout=10):  # noqa: F811
    return wait_until(lambda: (lambda h: h if h and pred(h) else None)(health(renv)), timeout,
                      "the relay route's health", diag=lambda: "%r\n%s" % (health(renv),
                                                                            renv.diag()))


def delivered_via(renv, rcpt):  # noqa: F811
    return [e for e in renv.events(rcpt=rcpt) if e.get("result") == "delivered"]


# -- 1. end to end ---------------------------------------------------------------------

def test_end_to_end_bytes_identical(renv, tworld, start_relay, tunnel_pki):  # noqa: F811
    """gateway -> router -> tunnel -> relay -> MX: the MX gets exactly the
    bytes stored in Redis; one recipient's 451 is retried through the
    tunnel; the event stream names the relay route. The relay pins the
    router certificates with the line mailferryctl tunnel-certs printed."""
    pins = re.search(r"^pinned_clients = (.+(?:\n    .+)*)$", tunnel_pki["output"],
                     re.M).group(1)
    assert pins.count("sha256:") == 2, pins
    relay = start_tunnel_relay(start_relay, tworld, pinned_clients=pins)
    backup = renv.mx("backup")
    cfg = renv.config("all", {"relay": relay_route(relay, tunnel_pki),
                              "backup": renv.smtp_route(backup, 20)})
    renv.policy_set("split.default", "hold")
    mf = renv.start("all", "all", cfg)

    rcpts = ["one@rec.test", "tempfail-1@rec.test"]
    sent = message(rcpts, "end to end")
    qid = renv.submit(SENDER, rcpts, sent, mail_options=["BODY=8BITMIME"])
    mf.wait_log(r"id=%s event=hold\b" % qid, timeout=10)
    stored = renv.msg(qid)
    check_stored(stored, sent, SENDER, rcpts)
    renv.policy_del("split.default")

    got = wait_until(lambda: tworld.fast.to("tempfail-1@rec.test"), 20,
                     "the retried recipient at the MX", diag=renv.diag)
    first = tworld.fast.to("one@rec.test")
    assert len(first) == 1, "one@rec.test delivered %d times" % len(first)
    for m in first + got:
        assert m["data"] == stored["data"], (
            "bytes at the MX differ from the stored message\nstored: %r\nmx:     %r"
            % (stored["data"][:2000], m["data"][:2000]))
        assert m["mail_from"] == SENDER
        assert "BODY=8BITMIME" in [o.upper() for o in m["mail_options"]], m["mail_options"]
        assert m["helo"] == "relay.test" and m["peer"][0] == "127.0.0.2", m
    assert first[0]["rcpt_tos"] == ["one@rec.test"]
    assert len(got) == 1 and got[0]["rcpt_tos"] == ["tempfail-1@rec.test"]
    # The first attempt offered both recipients; only the refused one came back.
    tries = [e["rcpt"] for e in tworld.fast.rcpt_log()]
    assert tries.count("one@rec.test") == 1 and tries.count("tempfail-1@rec.test") == 2, tries

    renv.wait_idle(timeout=15)
    for r in rcpts:
        d = delivered_via(renv, r)
        assert len(d) == 1 and d[0]["route"] == "relay", renv.events(rcpt=r)
        assert d[0]["code"] == "250" and "127.0.0.1:%d" % relay.port in d[0]["remote"], d[0]
    deferred = [e for e in renv.events(rcpt="tempfail-1@rec.test") if e["result"] == "deferred"]
    assert deferred and deferred[0]["code"] == "451" and deferred[0]["enh"] == "4.3.0", deferred
    assert backup.count() == 0

    # The tunnel as the relay saw it: the router's certificate, TLS 1.3,
    # and the status checks on a connection of their own.
    err = relay.stderr()
    assert log_lines(err, "tunnel", cn="router-1"), err
    assert re.search(r"event=tunnel .*version=TLSv1\.3", err), err
    assert not route_health_lines(mf, "no"), mf.lines("route_health")
    assert mf.lines("transport_created")


# -- 2. who may talk to whom -----------------------------------------------------------

@pytest.mark.parametrize("case", ["foreign_client_cert", "router_distrusts_ca",
                                  "wrong_servername"])
def test_tunnel_refused_moves_to_overflow(renv, tworld, start_relay, tunnel_pki, case):  # noqa: F811
    """A tunnel that mutual TLS refuses, from either side: the relay route is
    unhealthy with the TLS reason, and mail takes the overflow route."""
    relay = start_tunnel_relay(start_relay, tworld)
    backup = renv.mx("backup")
    keys = {}
    if case == "foreign_client_cert":
        keys = {"client_cert": tunnel_pki["foreign_crt"], "client_key": tunnel_pki["foreign_key"]}
    elif case == "router_distrusts_ca":
        keys = {"tunnel_ca": tunnel_pki["foreign_ca"]}
    else:
        keys = {"servername": "other.test"}
    cfg = renv.config("all", {"relay": relay_route(relay, tunnel_pki, **keys),
                              "backup": renv.smtp_route(backup, 20)})
    mf = renv.start("all", "all", cfg)
    h = wait_health(renv, lambda h: h.get("healthy") == "0" and "relay tunnel down" in h["why"])
    assert "TLS" in h["why"], h
    mf.wait_log(r"route=relay event=tunnel_down .*TLS", timeout=5)

    rcpt = "refused-%s@rec.test" % case.replace("_", "-")
    qid = renv.submit(SENDER, [rcpt], message([rcpt], "refused tunnel"))
    wait_until(lambda: backup.to(rcpt), 15, "delivery through the overflow route",
               diag=renv.diag)
    renv.wait_idle(timeout=10)
    d = delivered_via(renv, rcpt)
    assert len(d) == 1 and d[0]["route"] == "backup", renv.events(qid)
    assert d[0]["reason"] == "overflow:unhealthy", d[0]
    assert tworld.fast.to(rcpt) == []

    err = relay.stderr()
    if case == "foreign_client_cert":
        # The relay refused the router before any SMTP.
        wait_until(lambda: log_lines(relay.stderr(), "tunnel_refused", reason="tls_error"), 5,
                   "the relay's refusal", diag=relay.stderr)
        assert not log_lines(relay.stderr(), "tunnel"), err
    else:
        # The router refused the relay: its client aborted the handshake.
        assert not log_lines(err, "tunnel", cn="router-1"), err


def test_plain_tcp_client_gets_nothing(tworld, start_relay):  # noqa: F811
    """The tunnel port speaks TLS only: a plain SMTP client gets no banner
    and is cut off (every variant is in test_relay.py)."""
    relay = start_tunnel_relay(start_relay, tworld, idle_timeout=2)
    s = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    s.sendall(b"EHLO plain.test\r\n")
    s.settimeout(4)
    data = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    assert not data.startswith(b"220"), data
    assert b"EHLO" not in data and b"250" not in data, data
    wait_until(lambda: log_lines(relay.stderr(), "tunnel_refused", reason="tls_error"), 5,
               "the refusal in the relay's log", diag=relay.stderr)


# -- 3. the relay dies in the middle of a transaction --------------------------------------

def restart_relay(relay):
    """Starts a relay process again on the same port and configuration,
    keeping the log of the one that died."""
    old = relay.stderr()
    relay._err.close()
    (relay.dir / "stderr.killed.log").write_text(old)
    relay.start()
    return old


def test_relay_killed_mid_transaction(renv, tworld, start_relay, tunnel_pki):  # noqa: F811
    """A message to two domains: rec.test is delivered at once; slow.test's
    MX delays its reply to the end of data and the relay is SIGKILLed
    meanwhile. The router defers that recipient as ambiguous (the "." had
    gone out) and keeps it on the relay route; the dead tunnel takes the
    route out within seconds (new mail overflows to the backup route) and
    opens its breaker. Once the relay is back, the deferred recipient is
    delivered through the relay, new mail comes back through the half-open
    probes, rec.test's recipient is not sent again, and nothing is lost."""
    relay = start_tunnel_relay(start_relay, tworld)
    backup = renv.mx("backup")
    cfg = renv.config("all", {"relay": relay_route(relay, tunnel_pki),
                              "backup": renv.smtp_route(backup, 20)})
    mf = renv.start("all", "all", cfg)

    rcpts = ["done@rec.test", "slow-2@slow.test"]
    qid = renv.submit(SENDER, rcpts, message(rcpts, "killed relay"))
    wait_until(lambda: tworld.fast.to("done@rec.test"), 10, "rec.test's delivery",
               diag=renv.diag)
    wait_until(lambda: tworld.slow.data_started() >= 1, 10,
               "the slow MX to have the message", diag=renv.diag)
    relay.proc.kill()
    relay.proc.wait()
    t_kill = time.monotonic()

    # No final answer for slow.test: deferred, ambiguous, kept on its route.
    first = wait_until(lambda: [e for e in renv.events(qid, "slow-2@slow.test")
                                if e["result"] == "deferred"], 10, "the deferral",
                       diag=renv.diag)[0]
    assert first["route"] == "relay" and first["code"] == "451", first
    assert first["enh"] == "4.4.2" and first.get("ambiguous") == "1", first
    # The dead tunnel takes the route out within seconds.
    h = wait_health(renv, lambda h: h["healthy"] == "0")
    assert "relay tunnel down" in h["why"], h
    took = time.monotonic() - t_kill
    assert took < 5, "the dead tunnel took %.1f s to reach the policy" % took
    mf.wait_log(r"event=breaker route=relay transition=closed->open cause=health", timeout=5)
    wait_until(lambda: tworld.slow.dropped() >= 1, 5, "the slow MX to drop the message")

    send_one(renv, "meanwhile@rec.test")
    d = wait_delivered(renv, "meanwhile@rec.test")
    assert d["route"] == "backup" and d["reason"] == "overflow:unhealthy", d
    time.sleep(1)
    assert tworld.slow.to("slow-2@slow.test") == [] and backup.to("slow-2@slow.test") == []
    restart_relay(relay)

    got = wait_until(lambda: tworld.slow.to("slow-2@slow.test"), 30,
                     "the deferred recipient's delivery after the restart", diag=renv.diag)
    mf.wait_log(r"event=route_health route=relay healthy=yes", timeout=5)
    mf.wait_log(r"event=breaker route=relay transition=open->half_open", timeout=10)
    send_one(renv, "after@rec.test")
    d = wait_delivered(renv, "after@rec.test")
    assert d["route"] == "relay" and d["reason"] == "probe", d
    renv.wait_idle(timeout=15)

    assert len(got) == 1, "delivered %d times" % len(got)
    assert got[0]["rcpt_tos"] == ["slow-2@slow.test"]
    assert backup.to("slow-2@slow.test") == []
    # No resend to the recipient accepted before the crash.
    assert len(tworld.fast.to("done@rec.test")) == 1
    assert [e["rcpt"] for e in tworld.fast.rcpt_log()].count("done@rec.test") == 1
    ev = renv.events(qid)
    assert [e["result"] for e in ev if e["rcpt"] == "done@rec.test"] == ["delivered"], ev
    slow = [e for e in ev if e["rcpt"] == "slow-2@slow.test"]
    assert slow[-1]["result"] == "delivered" and slow[-1]["route"] == "relay", slow
    assert slow[-1]["reason"] == "pinned:ambiguous", slow
    assert all(e["result"] in ("deferred", "held") for e in slow[:-1]), slow


# -- 4. DNSBL listing ----------------------------------------------------------------------

def send_one(renv, rcpt):  # noqa: F811
    return renv.submit(SENDER, [rcpt], message([rcpt], "dnsbl " + rcpt))


def wait_delivered(renv, rcpt, timeout=15):  # noqa: F811
    return wait_until(lambda: delivered_via(renv, rcpt), timeout,
                      "delivery of %s" % rcpt, diag=renv.diag)[0]


def test_dnsbl_listing_moves_traffic_and_back(renv, tworld, start_relay, tunnel_pki):  # noqa: F811
    """The relay's address appears on bl.test: within seconds the route is
    unhealthy ("relay degraded: dnsbl:bl.test ..."), its breaker opens, and
    mail overflows to the backup route. Withdrawn: the route is healthy,
    the breaker goes half open after its cool-down, probes go through the
    relay, and after probe_successes good probes it closes and the relay
    is the primary route again."""
    relay = start_tunnel_relay(start_relay, tworld)
    backup = renv.mx("backup")
    cfg = renv.config("all", {"relay": relay_route(relay, tunnel_pki),
                              "backup": renv.smtp_route(backup, 20)})
    mf = renv.start("all", "all", cfg)

    send_one(renv, "before@rec.test")
    d = wait_delivered(renv, "before@rec.test")
    assert d["route"] == "relay" and d["reason"] == "primary", d

    t0 = time.monotonic()
    tworld.dns.restart(listed=True)
    line = mf.wait_log(r"event=route_health route=relay healthy=no", timeout=15)[0]
    took = time.monotonic() - t0
    assert "relay degraded: dnsbl:bl.test" in line and "Listed for testing" in line, line
    assert took < 6, "the listing took %.1f s to reach the policy" % took
    mf.wait_log(r"event=breaker route=relay transition=closed->open cause=health", timeout=5)
    wait_until(lambda: log_lines(relay.stderr(), "selfcheck_status", to="degraded"), 5,
               "the relay's own log of it")

    for i in range(2):
        rcpt = "listed%d@rec.test" % i
        send_one(renv, rcpt)
        d = wait_delivered(renv, rcpt)
        assert d["route"] == "backup" and d["reason"] == "overflow:unhealthy", d
        assert tworld.fast.to(rcpt) == []
    assert len(backup.to("listed0@rec.test")) == 1

    tworld.dns.restart(listed=False)
    mf.wait_log(r"event=route_health route=relay healthy=yes", timeout=15)
    mf.wait_log(r"event=breaker route=relay transition=open->half_open", timeout=10)
    reasons = []
    for i in range(4):
        rcpt = "back%d@rec.test" % i
        send_one(renv, rcpt)
        d = wait_delivered(renv, rcpt)
        assert d["route"] == "relay", d
        reasons.append(d["reason"])
        if i == 1:
            mf.wait_log(r"event=breaker route=relay transition=half_open->closed", timeout=10)
    # probe_successes = 2: two probes, then the relay is primary again.
    assert reasons == ["probe", "probe", "primary", "primary"], reasons
    renv.wait_idle(timeout=10)
    h = health(renv)
    assert h["healthy"] == "1" and h["why"] == "ok", h


# -- 5. the certificates -------------------------------------------------------------------

def test_tunnel_certs_files(tunnel_pki, tmp_path):
    d = tunnel_pki["dir"]
    names = sorted(os.listdir(d))
    assert names == sorted(["tunnel-ca.key", "tunnel-ca.crt", "relay.key", "relay.crt",
                            "router-1.key", "router-1.crt", "router-2.key", "router-2.crt"]), names
    for n in names:
        mode = stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)
        assert mode == (0o600 if n.endswith(".key") else 0o644), (n, oct(mode))

    def text(crt):
        return subprocess.run(["openssl", "x509", "-in", os.path.join(d, crt), "-noout", "-text"],
                              capture_output=True, check=True).stdout.decode()

    ca = text("tunnel-ca.crt")
    assert "CA:TRUE, pathlen:0" in ca and "Certificate Sign, CRL Sign" in ca, ca
    relay = text("relay.crt")
    assert "DNS:%s, IP Address:127.0.0.1" % RELAY_NAME in relay, relay
    assert "TLS Web Server Authentication" in relay and "CA:FALSE" in relay, relay
    router = text("router-1.crt")
    assert "TLS Web Client Authentication" in router and "CN = router-1" in router, router
    ok = subprocess.run(["openssl", "verify", "-CAfile", tunnel_pki["ca"], "-purpose", "sslclient",
                         tunnel_pki["router2_crt"]], capture_output=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(["openssl", "verify", "-CAfile", tunnel_pki["ca"],
                          tunnel_pki["foreign_crt"]], capture_output=True)
    assert bad.returncode != 0

    out = tunnel_pki["output"]
    fp = subprocess.run(["openssl", "x509", "-in", tunnel_pki["router_crt"], "-noout",
                         "-fingerprint", "-sha256"], capture_output=True,
                        check=True).stdout.decode().strip().split("=", 1)[1]
    assert "\npinned_clients = sha256:" + fp + ",\n    sha256:" in out, out
    assert "transport = relay" in out and "client_cert = %s/router-1.crt" % d in out, out

    # Never over existing files; --add-router issues more from the same CA.
    again = subprocess.run([MAILFERRYCTL_BIN, "tunnel-certs", d, "--relay-name", RELAY_NAME],
                           capture_output=True)
    assert again.returncode == 1 and b"exists" in again.stderr, again.stderr
    assert sorted(os.listdir(d)) == names
    add = subprocess.run([MAILFERRYCTL_BIN, "tunnel-certs", str(tmp_path / "x")],
                         capture_output=True)
    assert add.returncode == 2
    copy = tmp_path / "copy"
    copy.mkdir()
    for n in ("tunnel-ca.crt", "tunnel-ca.key", "relay.crt"):
        (copy / n).write_bytes(open(os.path.join(d, n), "rb").read())
    add = subprocess.run([MAILFERRYCTL_BIN, "tunnel-certs", str(copy), "--add-router", "edge-7"],
                         capture_output=True)
    assert add.returncode == 0, add.stderr
    assert b"host = %s:4650" % RELAY_NAME.encode() in add.stdout, add.stdout
    ok = subprocess.run(["openssl", "verify", "-CAfile", tunnel_pki["ca"], "-purpose", "sslclient",
                         str(copy / "edge-7.crt")], capture_output=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert stat.S_IMODE(os.stat(copy / "edge-7.key").st_mode) == 0o600


def test_relay_route_check_config(renv, tunnel_pki, tmp_path):  # noqa: F811
    """--check-config names the bad relay route key."""
    from mftest import MAILFERRY_BIN, child_env
    good = {"transport": "relay", "host": "127.0.0.1:4650", "servername": RELAY_NAME,
            "tunnel_ca": tunnel_pki["ca"], "client_cert": tunnel_pki["router_crt"],
            "client_key": tunnel_pki["router_key"]}
    cfg = renv.config("ok", {"relay": good})
    res = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(cfg), "router"],
                         capture_output=True, env=child_env())
    assert res.returncode == 0, res.stderr
    for key, value, want in [("tls", "none", b"[route relay] tls: not used by the relay"),
                             ("client_cert", "/nonexistent.crt", b"[route relay] client_cert:"),
                             ("status_interval", "0", b"[route relay] status_interval:")]:
        bad = dict(good)
        bad[key] = value
        cfg = renv.config("bad", {"relay": bad})
        res = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(cfg), "router"],
                             capture_output=True, env=child_env())
        assert res.returncode != 0 and want in res.stderr, (key, res.stderr)
