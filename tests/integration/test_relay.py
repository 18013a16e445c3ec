"""Integration tests of `mailferry relay` against real peers (relay_env.py):
dnsmasq serving the test zone, aiosmtpd recorders and smtp-sink as the
recipient MX hosts, and Python's smtplib / ssl as the router at the other
end of the tunnel.

What is checked:
  - the tunnel: mutual TLS only; a client certificate from another CA, no
    certificate, a plain TCP client and a certificate that is not pinned
    are refused before any SMTP byte;
  - delivery: each RCPT gets the MX's own reply, verbatim; the message
    bytes at the MX are the ones sent; EHLO as helo_name from
    source_address; STARTTLS with the MX that offers it; failover to the
    next MX when the first refuses connections; implicit MX; null MX (556
    5.1.10); NXDOMAIN (550 5.1.2); no MX reachable (451 4.4.1); one domain
    per transaction; connection reuse; pipelining;
  - the self-check: XSTATUS and the EHLO keyword follow a DNSBL listing
    that dnsmasq serves, then withdraws;
  - every relay exits 0 on SIGTERM with a clean (sanitizer-free) log.
"""

import re
import signal
import socket
import ssl
import subprocess
import time

import pytest

from mftest import MAILFERRY_BIN, RawSMTP, SMTPClosed, child_env
from relay_env import (HELO, MX_DEAD, MX_REC, SOURCE_IP, DnsServer, fingerprint, log_lines,
                       wait_until)
from relay_env import pki, relay, start_relay, world  # noqa: F401 (fixtures)

SENDER = "sender@example.net"


def message(subject, body_lines):
    """A message with CRLF line ends."""
    lines = ["From: <%s>" % SENDER, "To: <someone@rec.test>", "Subject: " + subject,
             "Message-ID: <%s@example.net>" % re.sub(r"\W", "", subject), ""] + body_lines
    return ("\r\n".join(lines) + "\r\n").encode()


def send_data(c, data):
    """DATA with exact bytes (dot-stuffing done here, as a client must)."""
    code, msg = c.docmd("DATA")
    assert code == 354, (code, msg)
    stuffed = re.sub(rb"(?m)^\.", b"..", data)
    c.send(stuffed + b".\r\n")
    return c.getreply()


# -- the tunnel ------------------------------------------------------------------

def test_greeting_and_ehlo(relay):
    with relay.smtp() as c:
        code, msg = c.ehlo("router.test")
        assert code == 250
        lines = msg.decode().splitlines()
        assert lines[0] == HELO
        for kw in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
            assert kw in lines, lines
        assert any(l.startswith("SIZE ") for l in lines)
        assert any(l.startswith("X-MAILFERRY-STATUS ") for l in lines)
        assert "STARTTLS" not in lines
    err = relay.stderr()
    assert log_lines(err, "tunnel", cn="router-1"), err
    assert re.search(r"event=tunnel .*version=TLSv1\.3", err), err


def read_all(sock, wait=1.0):
    """Bytes until EOF, reset, TLS alert or timeout; the error if any."""
    sock.settimeout(wait)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data, "eof"
            data += chunk
    except socket.timeout:
        return data, "timeout"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return data, repr(e)


def test_foreign_ca_refused(relay):
    """A router certificate from another CA: the handshake fails and not
    one byte of SMTP is sent."""
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    ctx = ssl.create_default_context(cafile=relay.pki["ca"])
    ctx.load_cert_chain(relay.pki["foreign_crt"], relay.pki["foreign_key"])
    try:
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except (ssl.SSLError, ConnectionResetError) as e:
        # TLS 1.2: the server's alert ends the handshake itself.
        data, how = b"", repr(e)
    else:
        # TLS 1.3: the client finishes first; the alert comes after.
        data, how = read_all(s, 3)
        s.close()
    assert data == b"", data
    assert how != "timeout", "the connection stayed open"
    wait_until(lambda: log_lines(relay.stderr(), "tunnel_refused", reason="tls_error"), 5,
               "the refusal in the log", diag=relay.stderr)
    assert "unknown ca" in relay.stderr().lower() or "certificate" in relay.stderr().lower()


def test_no_client_certificate_refused(relay):
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    ctx = ssl.create_default_context(cafile=relay.pki["ca"])
    try:
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except (ssl.SSLError, ConnectionResetError) as e:
        data, how = b"", repr(e)
    else:
        data, how = read_all(s, 3)
        s.close()
    assert data == b"" and how != "timeout", (data, how)
    wait_until(lambda: log_lines(relay.stderr(), "tunnel_refused", reason="tls_error"), 5,
               "the refusal in the log", diag=relay.stderr)


def test_plain_tcp_client_refused(world, start_relay):
    """A plain TCP client gets no banner; one that talks SMTP anyway is
    cut off at once, one that waits is closed after the handshake
    timeout."""
    r = start_relay(world.dns, world.mx_port, idle_timeout=2)
    talker = socket.create_connection(("127.0.0.1", r.port), timeout=5)
    talker.sendall(b"EHLO plain.test\r\n")
    data, how = read_all(talker, 3)
    talker.close()
    assert data == b"" and how != "timeout", (data, how)

    waiter = socket.create_connection(("127.0.0.1", r.port), timeout=5)
    t0 = time.monotonic()
    data, how = read_all(waiter, 5)
    waiter.close()
    assert data == b"", data
    assert how != "timeout", "not closed after the handshake timeout"
    assert time.monotonic() - t0 < 4.5
    err = r.stderr()
    assert log_lines(err, "tunnel_refused", reason="tls_error"), err
    assert log_lines(err, "disconnect", reason="handshake_timeout"), err


def test_pinned_fingerprint(world, start_relay, pki):
    """With pins, only the pinned certificate gets a greeting; another one
    from the same CA is refused right after the handshake."""
    r = start_relay(world.dns, world.mx_port, pinned_clients=fingerprint(pki["router_crt"]))
    with r.smtp("router") as c:
        assert c.noop()[0] == 250
    s = r.tls_socket("router2")
    data, how = read_all(s, 3)
    s.close()
    assert data == b"" and how != "timeout", (data, how)
    wait_until(lambda: log_lines(r.stderr(), "tunnel_refused", reason="pin_mismatch"), 5,
               "pin_mismatch in the log", diag=r.stderr)
    line = log_lines(r.stderr(), "tunnel_refused", reason="pin_mismatch")[0]
    want = fingerprint(pki["router2_crt"]).lower().replace(":", "").replace("sha256", "sha256:")
    assert "fingerprint=" + want in line, line


def test_check_config(world, start_relay, tmp_path):
    r = start_relay(world.dns, world.mx_port, start=False)
    ok = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(r.config_path), "relay"],
                        capture_output=True, env=child_env())
    assert ok.returncode == 0, ok.stderr
    bad = r.config_path.read_text().replace("tunnel_ca =", "# tunnel_ca =")
    p = tmp_path / "bad.conf"
    p.write_text(bad)
    res = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(p), "relay"],
                         capture_output=True, env=child_env())
    assert res.returncode == 1
    assert b"[relay] tunnel_ca: required" in res.stderr, res.stderr
    p.write_text(r.config_path.read_text() + "pinned_clients = sha256:abcd\n")
    res = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(p), "relay"],
                         capture_output=True, env=child_env())
    assert res.returncode == 1 and b"pinned_clients" in res.stderr, res.stderr


# -- delivery --------------------------------------------------------------------

def test_mx_replies_pass_through(world, relay):
    """Each RCPT gets the MX's own reply, code, enhanced code and text; the
    end of data gets the MX's own reply; the bytes arrive unchanged, from
    source_address, with EHLO helo_name."""
    data = message("pass-through", ["line one", ".a line that starts with a dot", "..two dots",
                                    "x" * 990, "", "last line"])
    with relay.smtp() as c:
        c.ehlo("router.test")
        assert c.mail("<%s>" % SENDER)[0] == 250
        assert c.rcpt("<ok1@rec.test>") == (250, b"2.1.5 OK")
        assert c.rcpt("<perm@rec.test>") == (550, b"5.1.1 User unknown")
        assert c.rcpt("<tempfail-1@rec.test>") == (451, b"4.3.0 Temporary failure, try again later")
        assert c.rcpt("<tempfail-1@rec.test>") == (250, b"2.1.5 OK")
        code, msg = send_data(c, data)
        assert code == 250, msg
        assert re.fullmatch(rb"2\.0\.0 Ok: queued as mx\d{6}", msg), msg
    msgs = world.rec.to("ok1@rec.test")
    assert len(msgs) == 1
    m = msgs[0]
    assert m["data"] == data
    assert m["mail_from"] == SENDER
    assert m["rcpt_tos"] == ["ok1@rec.test", "tempfail-1@rec.test"]
    assert m["helo"] == HELO
    assert m["peer"][0] == SOURCE_IP
    err = relay.stderr()
    assert log_lines(err, "rcpt", code=550, enhanced="5.1.1", source="mx"), err
    assert log_lines(err, "message", domain="rec.test", code=250), err


def test_pipelined_group(world, relay):
    """RFC 2920: MAIL, RCPTs and DATA in one write; the replies come in
    order, each RCPT's from the MX."""
    c = RawSMTP(relay.port, tls_context=_ctx(relay), server_hostname="127.0.0.1", timeout=10)
    try:
        assert c.greeting().code == 220
        c.ehlo("router.test")
        c.send("MAIL FROM:<%s> SIZE=100\r\nRCPT TO:<pipe@rec.test>\r\n"
               "RCPT TO:<perm@rec.test>\r\nRCPT TO:<pipe2@rec.test>\r\nDATA\r\n" % SENDER)
        replies = c.replies(5)
        assert [r.code for r in replies] == [250, 250, 550, 250, 354], c.show()
        assert replies[2].lines == ["5.1.1 User unknown"]
        c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        r = c.reply()
        assert r.code == 250, c.show()
        assert c.reply().code == 221
    finally:
        c.close()
    m = world.rec.to("pipe@rec.test")
    assert len(m) == 1 and m[0]["rcpt_tos"] == ["pipe@rec.test", "pipe2@rec.test"]
    assert m[0]["data"] == b"Subject: pipelined\r\n\r\nbody\r\n"


def _ctx(relay):
    from relay_env import client_context
    return client_context(relay.pki)


def test_no_valid_recipients(world, relay):
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<perm@rec.test>")[0] == 550
        code, msg = c.docmd("DATA")
        assert (code, msg) == (554, b"5.5.1 Error: no valid recipients")
        assert c.rset()[0] == 250
        # The MX connection was reset and is still good for the next one.
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<after-reset@rec.test>")[0] == 250
        assert send_data(c, message("after reset", ["x"]))[0] == 250
    assert len(world.rec.to("after-reset@rec.test")) == 1


def test_starttls_with_mx(world, relay):
    data = message("over tls", ["secret"])
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<tls1@tls.test>") == (250, b"2.1.5 OK")
        assert send_data(c, data)[0] == 250
    m = world.tls.to("tls1@tls.test")
    assert len(m) == 1
    assert m[0]["data"] == data
    assert m[0]["tls"].startswith("TLSv1."), m[0]["tls"]
    assert log_lines(relay.stderr(), "mx_connected", domain="tls.test", tls=m[0]["tls"])


def test_failover_to_second_mx(world, relay):
    """fail.test: the preferred MX (127.0.0.15) refuses connections; the
    message goes to the next one."""
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<fo@fail.test>") == (250, b"2.1.5 OK")
        assert send_data(c, message("failover", ["x"]))[0] == 250
    assert len(world.rec2.to("fo@fail.test")) == 1
    err = relay.stderr()
    assert log_lines(err, "mx_connect_failed", domain="fail.test", ip=MX_DEAD), err
    assert log_lines(err, "mx_connected", domain="fail.test", host="mxb.fail.test"), err


def test_implicit_mx(world, relay):
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<imp@implicit.test>") == (250, b"2.1.5 OK")
        assert send_data(c, message("implicit", ["x"]))[0] == 250
    assert len(world.rec2.to("imp@implicit.test")) == 1


def test_smtp_sink(world, relay):
    data = message("to the sink", ["hello sink"])
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<s@sink.test>")[0] == 250
        code, msg = send_data(c, data)
        assert code == 250, msg
    wait_until(lambda: any(b"hello sink" in d for d in world.sink.dumps()), 5, "the sink's dump")


@pytest.mark.parametrize("rcpt,code,enh,text", [
    ("x@null.test", 556, "5.1.10", "null MX"),
    ("x@nothing.test", 550, "5.1.2", "does not exist"),
    ("x@down.test", 451, "4.4.1", "no MX reachable for down.test"),
])
def test_destination_failures(relay, rcpt, code, enh, text):
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        got = c.rcpt("<%s>" % rcpt)
        assert got[0] == code, got
        assert got[1].decode().startswith(enh + " "), got
        assert text in got[1].decode(), got
        # Later recipients of the same domain get the same answer.
        assert c.rcpt("<y@%s>" % rcpt.split("@")[1])[0] == code
        assert c.docmd("DATA")[0] == 554


def test_one_domain_per_transaction(world, relay):
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<a@rec.test>")[0] == 250
        code, msg = c.rcpt("<b@tls.test>")
        assert code == 451 and msg.startswith(b"4.5.3 "), msg
        assert c.rcpt("<c@REC.test>")[0] == 250
        assert send_data(c, message("one domain", ["x"]))[0] == 250
    m = world.rec.to("a@rec.test")
    assert len(m) == 1 and m[0]["rcpt_tos"] == ["a@rec.test", "c@REC.test"]


def test_mx_421_becomes_451(relay):
    """An MX that says 421 closes its connection; the router gets 451 with
    the MX's enhanced code and text, and the tunnel stays open."""
    with relay.smtp() as c:
        c.ehlo("router.test")
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<throttle@rec.test>") == (451, b"4.7.28 rate limited")
        assert c.rcpt("<more@rec.test>")[0] == 451
        assert c.rset()[0] == 250
        c.mail("<%s>" % SENDER)
        assert c.rcpt("<fresh@rec.test>")[0] == 250
        assert send_data(c, message("after 421", ["x"]))[0] == 250


def test_connection_reuse(world, relay):
    """Two transactions to one domain, from two tunnel sessions, use one
    MX connection."""
    before = len(world.rec.messages())
    for i in range(2):
        with relay.smtp() as c:
            c.ehlo("router.test")
            c.mail("<%s>" % SENDER)
            assert c.rcpt("<reuse%d@rec.test>" % i)[0] == 250
            assert send_data(c, message("reuse %d" % i, ["x"]))[0] == 250
    msgs = world.rec.messages()[before:]
    peers = {tuple(m["peer"]) for m in msgs if m["rcpt_tos"][0].startswith("reuse")}
    assert len(peers) == 1, peers


def test_concurrency_cap(world, start_relay):
    """With a cap of 1 connection per domain, parallel transactions queue
    for it and all get through on one connection."""
    import threading
    r = start_relay(world.dns, world.mx_port, mx_max_connections_per_domain=1)
    errors = []

    def one(i):
        try:
            with r.smtp() as c:
                c.ehlo("router.test")
                c.mail("<%s>" % SENDER)
                assert c.rcpt("<cap%d@rec.test>" % i)[0] == 250
                assert send_data(c, message("cap %d" % i, ["x"]))[0] == 250
        except Exception as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    msgs = [m for m in world.rec.messages() if m["rcpt_tos"][0].startswith("cap")]
    assert len(msgs) == 4
    assert len({tuple(m["peer"]) for m in msgs}) == 1


# -- the self-check ------------------------------------------------------------------

def _checks(lines):
    """XSTATUS lines as {check: (state, reason)} and the final line."""
    out = {}
    for l in lines[:-1]:
        name, state, reason = (l.split(" ", 2) + [""])[:3]
        out[name] = (state, reason)
    return out, lines[-1]


def test_selfcheck_follows_dnsbl(tmp_path, world, start_relay):
    """XSTATUS and the EHLO keyword report a DNSBL listing served by
    dnsmasq, and its withdrawal, within a few check intervals."""
    dns = DnsServer(tmp_path / "dns", listed=True).start()
    try:
        r = start_relay(dns, world.mx_port)

        def status():
            lines, kw = r.xstatus()
            checks, last = _checks(lines)
            return checks, last, kw

        def settled(want, keyword):
            # Under load a first run may also fail a check on a DNS timeout
            # (nothing known yet counts as failed): wait for the state in
            # which exactly the expected checks fail.
            def pred():
                checks, last, kw = status()
                return (checks, last, kw) if (
                    re.match(r"2\.0\.0 status %s checked=\d+$" % want, last)
                    and kw == keyword) else None
            return pred

        checks, last, kw = wait_until(settled("degraded", "degraded dnsbl:bl.test"), 15,
                                      "a degraded status", diag=r.stderr)
        assert checks["dnsbl:bl.test"][0] == "fail", checks
        assert "127.0.0.2" in checks["dnsbl:bl.test"][1]
        assert "Listed for testing" in checks["dnsbl:bl.test"][1]
        assert checks["ptr"][0] == "ok", checks
        assert checks["spf:spf.test"][0] == "ok", checks
        assert checks["spf:spf2.test"][0] == "ok", checks
        assert kw == "degraded dnsbl:bl.test", kw
        assert int(last.rsplit("=", 1)[1]) > time.time() - 60

        dns.restart(listed=False)
        checks, last, kw = wait_until(settled("ok", "ok"), 20, "the status to recover",
                                      diag=r.stderr)
        assert checks["dnsbl:bl.test"][0] == "ok", checks
        assert kw == "ok"
        err = r.stderr()
        assert log_lines(err, "selfcheck", check="dnsbl:bl.test", to="fail"), err
        assert log_lines(err, "selfcheck", check="dnsbl:bl.test", **{"from": "fail"}, to="ok"), err
        assert log_lines(err, "selfcheck_status", to="ok"), err
    finally:
        dns.stop()


def test_selfcheck_ptr_and_spf_failures(world, start_relay):
    """A helo_name that the PTR does not name, and an SPF record that does
    not authorise the address, are reported as failing checks."""
    r = start_relay(world.dns, world.mx_port, helo_name="other.test",
                    spf_domains="badspf.test", dnsbl_zones="clean.test")

    def degraded():
        lines, kw = r.xstatus()
        checks, last = _checks(lines)
        return (checks, kw) if "status degraded" in last else None

    checks, kw = wait_until(degraded, 15, "a degraded status", diag=r.stderr)
    assert checks["ptr"][0] == "fail" and "not other.test" in checks["ptr"][1], checks
    assert checks["spf:badspf.test"][0] == "fail", checks
    assert checks["spf:badspf.test"][1].startswith("fail"), checks
    assert checks["dnsbl:clean.test"][0] == "ok", checks
    assert kw == "degraded ptr,spf:badspf.test", kw


# -- shutdown ---------------------------------------------------------------------

def test_sigterm_lets_the_transaction_finish(world, relay):
    """SIGTERM: the listener closes, an idle tunnel gets 421 at once, an
    open transaction is completed and then closed with 421, and the relay
    exits 0 (checked at teardown)."""
    busy = relay.smtp()
    busy.ehlo("router.test")
    busy.mail("<%s>" % SENDER)
    assert busy.rcpt("<shutdown@rec.test>")[0] == 250
    idle = RawSMTP(relay.port, tls_context=_ctx(relay), server_hostname="127.0.0.1", timeout=10)
    assert idle.greeting().code == 220
    idle.ehlo("router.test")

    relay.proc.send_signal(signal.SIGTERM)
    r = idle.reply()
    assert r.code == 421 and r.enhanced() == "4.3.2", idle.show()
    assert idle.wait_closed(5)
    wait_until(lambda: log_lines(relay.stderr(), "shutdown"), 5, "the shutdown to start")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()

    code, msg = send_data(busy, message("during shutdown", ["x"]))
    assert code == 250, msg
    code, msg = busy.getreply()
    assert code == 421, (code, msg)
    busy.close()
    assert len(world.rec.to("shutdown@rec.test")) == 1
    assert relay.proc.wait(10) == 0
