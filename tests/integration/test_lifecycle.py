"""Process life cycle: --check-config, Redis going away and coming back
without a restart, and SIGTERM with transactions in flight."""

import os
import re
import signal
import socket
import subprocess
import time

from mftest import MAILFERRY_BIN, RawSMTP, SMTPClosed, check_stored, child_env, dot_stuff, queued_id


def check_config(path):
    p = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(path)],
                       capture_output=True, timeout=20, env=child_env())
    return p.returncode, p.stderr.decode(errors="replace") + p.stdout.decode(errors="replace")


def with_gateway_key(text, line):
    """The config text with one more line at the start of [gateway]."""
    assert "[gateway]\n" in text
    return text.replace("[gateway]\n", "[gateway]\n" + line + "\n", 1)


def test_check_config(start_gateway, tmp_path):
    """--check-config accepts the test configuration, and refuses a bad
    value, an unknown key and a users file others can read, each time
    naming the culprit."""
    gw = start_gateway(start=False)
    good = gw.config_path.read_text()
    rc, out = check_config(gw.config_path)
    assert rc == 0, out

    bad = tmp_path / "bad_value.conf"
    bad.write_text(with_gateway_key(good, "max_connections = lots"))
    rc, out = check_config(bad)
    assert rc != 0, out
    assert "max_connections" in out, out
    assert "lots" in out, out

    unknown = tmp_path / "unknown.conf"
    unknown.write_text(with_gateway_key(good, "frobnicate_level = 3"))
    rc, out = check_config(unknown)
    assert rc != 0, out
    assert "frobnicate_level" in out, out

    section = tmp_path / "section.conf"
    section.write_text(good + "\n[bogus_section]\nkey = 1\n")
    rc, out = check_config(section)
    assert rc != 0, out
    assert "bogus_section" in out, out

    os.chmod(gw.users_path, 0o644)
    rc, out = check_config(gw.config_path)
    assert rc != 0, out
    assert str(gw.users_path) in out, out


def test_gateway_refuses_world_readable_users_file(start_gateway):
    """`mailferry gateway` itself refuses to start with a users file of
    mode 0644, naming the file."""
    gw = start_gateway(start=False)
    os.chmod(gw.users_path, 0o644)
    try:
        p = subprocess.run([MAILFERRY_BIN, "gateway", "--config", str(gw.config_path)],
                           capture_output=True, timeout=10, env=child_env())
    except subprocess.TimeoutExpired:
        raise AssertionError("gateway started with a 0644 users file")
    out = p.stderr.decode(errors="replace")
    assert p.returncode != 0, out
    assert str(gw.users_path) in out, out


def attempt(port, sender, rcpt, msg, timeout=10):
    """One whole session; returns the reply that ended the transaction
    (a refusal at any step, or the end-of-data reply)."""
    c = RawSMTP(port, timeout=timeout)
    try:
        r = c.greeting()
        if r.code != 220:
            return r, c
        c.ehlo()
        for line in ("MAIL FROM:<%s>" % sender, "RCPT TO:<%s>" % rcpt):
            r = c.cmd(line)
            if r.code != 250:
                return r, c
        r = c.cmd("DATA")
        if r.code != 354:
            return r, c
        c.send(dot_stuff(msg))
        r = c.reply()
        c.cmd("QUIT")
        return r, c
    finally:
        c.close()


def test_redis_down_and_back(start_gateway, raw, redis_server):
    """Redis stops in the middle of a transaction: the end of data gets 451
    4.3.0 and nothing is stored. When Redis is back on the same port, a new
    session is accepted again within ~10 s without restarting the gateway."""
    gw = start_gateway(**{"queue.timeout": 2})
    c = raw(gw.plain, timeout=15)
    c.greeting()
    c.ehlo()
    assert c.cmd("MAIL FROM:<s@example.com>").code == 250, c.show()
    assert c.cmd("RCPT TO:<r@dest.test>").code == 250, c.show()
    lost = b"Subject: lost\r\n\r\nnever stored\r\n"
    redis_server.stop()
    try:
        r = c.cmd("DATA")
        if r.code == 354:
            c.send(dot_stuff(lost))
            r = c.reply(timeout=15)
        assert r.code == 451 and r.enhanced() == "4.3.0", c.show()
        c.cmd("QUIT")
    finally:
        redis_server.start()
    assert gw.message_ids() == []
    assert gw.ready_ids() == []

    msg = b"Subject: after restart\r\n\r\nstored\r\n"
    t0 = time.monotonic()
    tries = []
    while True:
        r, s = attempt(gw.plain, "s@example.com", "r@dest.test", msg)
        tries.append(r)
        if r.code == 250:
            break
        assert 400 <= r.code < 500, s.show()
        assert time.monotonic() - t0 < 12, "still refused after Redis came back: %r" % tries
        time.sleep(0.5)
    check_stored(gw.stored(queued_id(r.first)), msg, "s@example.com", ["r@dest.test"])
    assert len(gw.message_ids()) == 1
    assert gw.proc.poll() is None


def connect_refused(port, within):
    """True when connections to port are refused within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            return True
        s.close()
        time.sleep(0.05)
    return False


def test_sigterm_lets_open_transaction_finish(start_gateway, raw):
    """SIGTERM: idle sessions get 421 at once, listeners close, the open
    transaction finishes within shutdown_grace and is stored, then the
    process exits 0."""
    gw = start_gateway(shutdown_grace=6)
    busy = raw(gw.plain, timeout=10)
    busy.greeting()
    busy.ehlo()
    assert busy.cmd("MAIL FROM:<s@example.com>").code == 250
    assert busy.cmd("RCPT TO:<r@dest.test>").code == 250
    assert busy.cmd("DATA").code == 354
    msg = b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"
    busy.send(msg[:25])
    idle = raw(gw.plain, timeout=10)
    idle.greeting()
    idle.ehlo()

    gw.signal(signal.SIGTERM)
    r = idle.reply(timeout=3)
    assert r.code == 421, idle.show()
    assert idle.wait_closed(3), idle.show()
    idle.close()
    for port in (gw.plain, gw.submission, gw.tls):
        assert connect_refused(port, 2), "port %d still accepts after SIGTERM" % port
    assert gw.proc.poll() is None, "exited before the open transaction ended"

    time.sleep(0.5)
    busy.send(msg[25:] + b".\r\n")
    r = busy.reply()
    assert r.code == 250, busy.show()
    qid = queued_id(r.first)
    t_done = time.monotonic()
    try:
        busy.send("QUIT\r\n")
    except OSError:
        pass
    try:
        r = busy.reply(timeout=3)
        assert r.code in (221, 421), busy.show()
    except SMTPClosed:
        pass
    busy.close()
    rc = gw.wait(timeout=8)
    assert rc == 0, gw.stderr()
    assert time.monotonic() - t_done < 3, "did not exit promptly after the last session"
    check_stored(gw.stored(qid), msg, "s@example.com", ["r@dest.test"])


def test_sigterm_grace_expires(start_gateway, raw):
    """A transaction that does not finish within shutdown_grace is aborted;
    nothing is stored and the process exits 0 soon after the grace period,
    even though the client keeps its end of the connection open."""
    gw = start_gateway(shutdown_grace=2)
    c = raw(gw.plain, timeout=10)
    c.greeting()
    c.ehlo()
    assert c.cmd("MAIL FROM:<s@example.com>").code == 250
    assert c.cmd("RCPT TO:<r@dest.test>").code == 250
    assert c.cmd("DATA").code == 354
    c.send(b"Subject: stuck\r\n\r\nnever finished")
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    rc = gw.wait(timeout=10)
    elapsed = time.monotonic() - t0
    assert rc == 0, gw.stderr()
    assert 1.5 <= elapsed <= 5, elapsed
    try:
        data = c.pending(1)
    except OSError:
        data = b""
    assert c.eof, "client connection not closed at exit"
    assert not re.search(rb"^250", data, re.M), data
    assert gw.message_ids() == []
