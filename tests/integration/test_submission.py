"""Submission (RFC 6409) on the STARTTLS and implicit-TLS (RFC 8314)
listeners: swaks and smtplib with AUTH PLAIN / LOGIN (RFC 4954), sender
authorisation per user, STARTTLS command injection (RFC 3207 section 4.2),
and users file reload on SIGHUP."""

import base64
import re
import signal
import smtplib
import subprocess
import time

from mftest import DEFAULT_USERS, PASSWORDS, check_stored, ehlo_keywords, queued_id, unfold

SWAKS_REPLY = re.compile(r"^<([-~])\*?\s+(\d{3})([ -])(.*)$", re.M)


def swaks(port, *args, data=None, timeout=30):
    """Runs swaks against 127.0.0.1:port; returns (exit status, output,
    [(code, text)] of the server's reply lines)."""
    cmd = ["swaks", "--server", "127.0.0.1:%d" % port, "--ehlo", "client.test",
           "--timeout", "15"] + list(args)
    if data is not None:
        cmd += ["--data", "-"]
    p = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)
    out = p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")
    replies = [(int(m.group(2)), m.group(4)) for m in SWAKS_REPLY.finditer(out)]
    return p.returncode, out, replies


def sent_by_swaks(text):
    """What swaks sends for --data text that does not end in a newline."""
    return text.replace("\n", "\r\n").encode() + b"\r\n"


def test_swaks_starttls_auth_plain(gateway):
    """STARTTLS then AUTH PLAIN as alice with an allowed sender: queued,
    with 'ESMTPSA' and the TLS version in the Received header."""
    text = "From: a@example.com\nTo: x@dest.test\nSubject: swaks plain\n\nbody via swaks"
    rc, out, replies = swaks(gateway.submission, "-tls", "--auth", "PLAIN",
                             "--auth-user", "alice", "--auth-password", PASSWORDS["alice"],
                             "--from", "a@example.com", "--to", "x@dest.test", data=text.encode())
    assert rc == 0, out
    assert any(c == 235 for c, _ in replies), out
    qid = queued_id(out)
    h = gateway.stored(qid)
    added = check_stored(h, sent_by_swaks(text), "a@example.com", ["x@dest.test"])
    received = unfold(added["received"][0])
    assert "ESMTPSA" in received, received
    assert re.search(r"TLS\s?v?1\.[23]", received, re.I), received


def test_swaks_starttls_auth_login(gateway):
    """STARTTLS then AUTH LOGIN as alice: queued."""
    rc, out, _ = swaks(gateway.submission, "-tls", "--auth", "LOGIN",
                       "--auth-user", "alice", "--auth-password", PASSWORDS["alice"],
                       "--from", "a@example.com", "--to", "x@dest.test")
    assert rc == 0, out
    h = gateway.stored(queued_id(out))
    assert h["from"] == "a@example.com"
    assert "ESMTPSA" in h["data"].split(b"\r\n\r\n", 1)[0].decode(errors="replace")


def test_swaks_implicit_tls(gateway):
    """The implicit TLS port (-tlsc) with AUTH LOGIN: queued, ESMTPSA."""
    rc, out, _ = swaks(gateway.tls, "-tlsc", "--auth", "LOGIN",
                       "--auth-user", "bob", "--auth-password", PASSWORDS["bob"],
                       "--from", "b@anything.test", "--to", "x@dest.test")
    assert rc == 0, out
    h = gateway.stored(queued_id(out))
    head = h["data"].split(b"\r\n\r\n", 1)[0].decode(errors="replace")
    assert "ESMTPSA" in head, head
    assert re.search(r"TLS\s?v?1\.[23]", head, re.I), head


def test_swaks_wrong_password(gateway):
    """A wrong password gets 535 5.7.8 (RFC 4954 section 6) and nothing is
    queued."""
    rc, out, replies = swaks(gateway.submission, "-tls", "--auth", "PLAIN",
                             "--auth-user", "alice", "--auth-password", "wrong",
                             "--from", "a@example.com", "--to", "x@dest.test")
    assert rc != 0, out
    assert any(c == 535 and t.startswith("5.7.8") for c, t in replies), out
    assert gateway.message_ids() == []


def test_swaks_unknown_user(gateway):
    """An unknown user gets the same 535 5.7.8 as a wrong password."""
    rc, out, replies = swaks(gateway.submission, "-tls", "--auth", "LOGIN",
                             "--auth-user", "mallory", "--auth-password", "x",
                             "--from", "a@example.com", "--to", "x@dest.test")
    assert rc != 0
    assert any(c == 535 and t.startswith("5.7.8") for c, t in replies), out


def test_auth_before_starttls_refused(gateway, raw):
    """On the submission port AUTH is refused in plaintext with a 5xx."""
    c = raw(gateway.submission)
    assert c.greeting().code == 220
    kw = ehlo_keywords(c.ehlo())
    assert "STARTTLS" in kw, c.show()
    token = base64.b64encode(b"\0alice\0" + PASSWORDS["alice"].encode()).decode()
    r = c.cmd("AUTH PLAIN " + token)
    assert 500 <= r.code < 600, c.show()
    r = c.cmd("MAIL FROM:<a@example.com>")
    assert 500 <= r.code < 600, c.show()


def test_mail_before_auth_on_submission(gateway, tls_client_ctx):
    """After STARTTLS, MAIL without AUTH gets 530 5.7.0 (RFC 4954 section 6)."""
    s = smtplib.SMTP("127.0.0.1", gateway.submission, local_hostname="client.test", timeout=10)
    try:
        s.starttls(context=tls_client_ctx)
        s.ehlo()
        assert "auth" in s.esmtp_features, s.esmtp_features
        mechs = s.esmtp_features["auth"].upper().split()
        assert "PLAIN" in mechs and "LOGIN" in mechs, mechs
        code, resp = s.mail("a@example.com")
        assert code == 530, (code, resp)
        assert resp.decode().startswith("5.7.0"), resp
    finally:
        s.close()
    assert gateway.message_ids() == []


def test_sender_not_allowed_for_user(gateway):
    """alice may only use example.com: MAIL FROM other@elsewhere.test gets
    553 5.7.1 and nothing is queued."""
    rc, out, replies = swaks(gateway.submission, "-tls", "--auth", "PLAIN",
                             "--auth-user", "alice", "--auth-password", PASSWORDS["alice"],
                             "--from", "other@elsewhere.test", "--to", "x@dest.test")
    assert rc != 0, out
    assert any(c == 553 and t.startswith("5.7.1") for c, t in replies), out
    assert gateway.message_ids() == []


def test_sender_domain_case_insensitive_and_wildcard(gateway, tls_client_ctx):
    """alice may use Example.COM (domains compare case-insensitively); bob
    ("*") may use any sender, including the null sender."""
    s = smtplib.SMTP("127.0.0.1", gateway.submission, local_hostname="client.test", timeout=10)
    try:
        s.starttls(context=tls_client_ctx)
        s.login("alice", PASSWORDS["alice"])
        code, resp = s.mail("a@Example.COM")
        assert code == 250, resp
    finally:
        s.close()
    for sender in ("anyone@anywhere.test", ""):
        s = smtplib.SMTP("127.0.0.1", gateway.submission, local_hostname="client.test",
                         timeout=10)
        try:
            s.starttls(context=tls_client_ctx)
            s.login("bob", PASSWORDS["bob"])
            code, resp = s.mail(sender)
            assert code == 250, (sender, resp)
            assert s.rcpt("x@dest.test")[0] == 250
            msg = b"Subject: bob\r\n\r\nfrom bob\r\n"
            code, resp = s.data(msg)
            assert code == 250, resp
            check_stored(gateway.stored(queued_id(resp.decode())), msg, sender, ["x@dest.test"])
        finally:
            s.quit()


def test_swaks_bob_any_sender(gateway):
    """bob ("*") sends as an arbitrary domain via swaks."""
    rc, out, _ = swaks(gateway.submission, "-tls", "--auth", "PLAIN",
                       "--auth-user", "bob", "--auth-password", PASSWORDS["bob"],
                       "--from", "someone@elsewhere.test", "--to", "x@dest.test")
    assert rc == 0, out
    h = gateway.stored(queued_id(out))
    assert h["from"] == "someone@elsewhere.test"


def test_starttls_injection(gateway, raw, tls_client_ctx):
    """Commands pipelined after STARTTLS in the same write (CVE-2011-0411
    class) are discarded: after the handshake the first reply is the one to
    EHLO, never one to the injected RSET."""
    c = raw(gateway.submission)
    assert c.greeting().code == 220
    c.ehlo()
    c.send("STARTTLS\r\nRSET\r\n")
    r = c.reply()
    assert r.code == 220, c.show()
    c.starttls(tls_client_ctx)
    c.send("EHLO client.test\r\n")
    r = c.reply()
    assert r.code == 250 and len(r.lines) > 1 and "mx.test" in r.first, \
        "first reply after TLS is not the EHLO reply:\n" + c.show()
    assert "AUTH" in ehlo_keywords(r), c.show()
    assert c.cmd("NOOP").code == 250, c.show()
    assert c.pending(0.3) == b"", c.show()


def test_sighup_reloads_users(start_gateway, tls_client_ctx):
    """SIGHUP reloads the users file: a new user can log in at once, while
    a session opened before the reload stays connected and can send."""
    gw = start_gateway()
    old = smtplib.SMTP("127.0.0.1", gw.submission, local_hostname="client.test", timeout=10)
    old.starttls(context=tls_client_ctx)
    old.login("alice", PASSWORDS["alice"])

    s = smtplib.SMTP("127.0.0.1", gw.submission, local_hostname="client.test", timeout=10)
    s.starttls(context=tls_client_ctx)
    try:
        s.login("carol", PASSWORDS["carol"])
        raise AssertionError("carol logged in before she was added")
    except smtplib.SMTPAuthenticationError as e:
        assert e.smtp_code == 535
    finally:
        s.close()

    gw.write_users(DEFAULT_USERS + [("carol", ["carol.test"])])
    gw.signal(signal.SIGHUP)

    deadline = time.monotonic() + 5
    while True:
        s = smtplib.SMTP("127.0.0.1", gw.submission, local_hostname="client.test", timeout=10)
        s.starttls(context=tls_client_ctx)
        try:
            s.login("carol", PASSWORDS["carol"])
            break
        except smtplib.SMTPAuthenticationError:
            s.close()
            assert time.monotonic() < deadline, "carol cannot log in 5 s after SIGHUP"
            time.sleep(0.2)
    try:
        msg = b"Subject: carol\r\n\r\nhi\r\n"
        code, resp = s.mail("c@carol.test")
        assert code == 250, resp
        assert s.rcpt("x@dest.test")[0] == 250
        code, resp = s.data(msg)
        assert code == 250, resp
        check_stored(gw.stored(queued_id(resp.decode())), msg, "c@carol.test", ["x@dest.test"])
    finally:
        s.quit()

    try:
        msg = b"Subject: old session\r\n\r\nstill here\r\n"
        code, resp = old.mail("a@example.com")
        assert code == 250, resp
        assert old.rcpt("y@dest.test")[0] == 250
        code, resp = old.data(msg)
        assert code == 250, resp
        check_stored(gw.stored(queued_id(resp.decode())), msg, "a@example.com", ["y@dest.test"])
    finally:
        old.quit()
    assert gw.proc.poll() is None
