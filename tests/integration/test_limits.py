"""Message size (RFC 1870), recipient limit, command errors and their
reply codes (RFC 5321 section 4.2, RFC 3463), error limit, connection
limits and timeouts."""

import time

from mftest import SMTPClosed, check_stored, dot_stuff, ehlo_keywords, make_message, queued_id

MAX = 20000


def open_tx(c, sender="s@example.com", rcpts=("r@dest.test",)):
    assert c.cmd("MAIL FROM:<%s>" % sender).code == 250, c.show()
    for r in rcpts:
        assert c.cmd("RCPT TO:<%s>" % r).code == 250, c.show()
    assert c.cmd("DATA").code == 354, c.show()


def test_size_limits(start_gateway, raw):
    """SIZE in EHLO equals max_message_size; SIZE= over it is refused at
    MAIL with 552 5.3.4; a message of exactly the limit (counted after
    dot-unstuffing, without the added headers) is accepted even though its
    wire form is longer; one byte more is refused at end of data with 552
    5.3.4, and the session goes on."""
    gw = start_gateway(max_message_size=MAX)
    c = raw(gw.plain)
    assert c.greeting().code == 220
    kw = ehlo_keywords(c.ehlo())
    assert kw.get("SIZE") == [str(MAX)], c.show()

    r = c.cmd("MAIL FROM:<s@example.com> SIZE=%d" % (MAX + 1))
    assert r.code == 552 and r.enhanced() == "5.3.4", c.show()

    assert c.cmd("MAIL FROM:<s@example.com> SIZE=%d" % MAX).code == 250, c.show()
    assert c.cmd("RCPT TO:<r@dest.test>").code == 250, c.show()
    assert c.cmd("DATA").code == 354, c.show()
    exact = make_message(MAX, dotted=True, subject="exact")
    wire = dot_stuff(exact)
    assert len(wire) - 3 > MAX  # the stuffed form alone is over the limit
    c.send(wire)
    r = c.reply()
    assert r.code == 250, c.show()
    check_stored(gw.stored(queued_id(r.first)), exact, "s@example.com", ["r@dest.test"])

    open_tx(c)
    c.send(dot_stuff(make_message(MAX + 1, dotted=True, subject="one over")))
    r = c.reply()
    assert r.code == 552 and r.enhanced() == "5.3.4", c.show()

    open_tx(c)
    c.send(dot_stuff(make_message(3 * MAX, dotted=False, subject="far over")))
    r = c.reply(timeout=10)
    assert r.code == 552 and r.enhanced() == "5.3.4", c.show()

    small = b"Subject: after\r\n\r\nsmall\r\n"
    open_tx(c)
    c.send(dot_stuff(small))
    r = c.reply()
    assert r.code == 250, c.show()
    check_stored(gw.stored(queued_id(r.first)), small, "s@example.com", ["r@dest.test"])
    assert len(gw.message_ids()) == 2
    assert c.cmd("QUIT").code == 221


def test_recipient_limit(start_gateway, raw):
    """max_recipients=3: the fourth RCPT gets 452 4.5.3 (RFC 5321 section
    4.5.3.1.10) and the transaction with three recipients succeeds."""
    gw = start_gateway(max_recipients=3)
    c = raw(gw.plain)
    c.greeting()
    c.ehlo()
    assert c.cmd("MAIL FROM:<s@example.com>").code == 250
    rcpts = ["r%d@dest.test" % i for i in range(1, 5)]
    codes = [c.cmd("RCPT TO:<%s>" % r) for r in rcpts]
    assert [r.code for r in codes[:3]] == [250, 250, 250], c.show()
    assert codes[3].code == 452 and codes[3].enhanced() == "4.5.3", c.show()
    assert c.cmd("DATA").code == 354, c.show()
    msg = b"Subject: three\r\n\r\nx\r\n"
    c.send(dot_stuff(msg))
    r = c.reply()
    assert r.code == 250, c.show()
    check_stored(gw.stored(queued_id(r.first)), msg, "s@example.com", rcpts[:3])


def test_command_errors(start_gateway, raw):
    """Reply codes for bad commands and sequences; none of them ends the
    session."""
    gw = start_gateway(max_errors=50)
    c = raw(gw.plain)
    assert c.greeting().code == 220

    r = c.cmd("FROBNICATE now")
    assert r.code == 500 and r.enhanced() == "5.5.2", c.show()
    r = c.cmd("MAIL FROM:<s@example.com>")
    assert r.code == 503, c.show()
    c.ehlo()
    r = c.cmd("RCPT TO:<r@dest.test>")
    assert r.code == 503, c.show()
    r = c.cmd("DATA")
    assert r.code == 503, c.show()
    for bad in ("MAIL FROM:<no at sign>", "MAIL FROM:<a@@b>", "MAIL FROM:<a@example.com"):
        r = c.cmd(bad)
        assert r.code == 501, c.show()
    assert c.cmd("MAIL FROM:<s@example.com>").code == 250, c.show()
    r = c.cmd("DATA")
    assert r.code == 503, c.show()
    r = c.cmd("RCPT TO:<bad address>")
    assert r.code == 501, c.show()
    r = c.cmd("MAIL FROM:<t@example.com>")
    assert r.code == 503, "nested MAIL accepted:\n" + c.show()

    c.send("NOOP " + "x" * 600 + "\r\n")
    r = c.reply()
    assert r.code == 500 and r.enhanced() == "5.5.2", c.show()
    assert c.cmd("NOOP").code == 250, c.show()

    assert c.cmd("VRFY postmaster").code == 252, c.show()
    assert c.cmd("HELP").code == 214, c.show()
    assert c.cmd("NOOP").code == 250, c.show()
    assert c.cmd("RSET").code == 250, c.show()

    # After RSET the transaction is gone: RCPT needs a new MAIL.
    assert c.cmd("RCPT TO:<r@dest.test>").code == 503, c.show()
    # The session still works end to end.
    open_tx(c)
    msg = b"Subject: after errors\r\n\r\nok\r\n"
    c.send(dot_stuff(msg))
    r = c.reply()
    assert r.code == 250, c.show()
    check_stored(gw.stored(queued_id(r.first)), msg, "s@example.com", ["r@dest.test"])
    assert c.cmd("QUIT").code == 221
    assert c.wait_closed(5)


def test_max_errors(start_gateway, raw):
    """max_errors=3: after three errors the server answers 421 and closes."""
    gw = start_gateway(max_errors=3)
    c = raw(gw.plain)
    c.greeting()
    codes = []
    closed = False
    for i in range(4):
        try:
            c.send("BOGUS%d\r\n" % i)
        except OSError:
            closed = True
        try:
            r = c.reply()
        except SMTPClosed:
            closed = True
            break
        codes.append(r.code)
        if r.code == 421:
            break
    if 421 not in codes and not closed:
        try:
            codes.append(c.reply(timeout=1).code)
        except (SMTPClosed, OSError):
            closed = True
    assert codes[:2] == [500, 500], c.show()
    assert 421 in codes, "no 421 after max_errors:\n" + c.show()
    assert len(codes) <= 4, c.show()
    assert closed or c.wait_closed(5), "connection not closed after 421:\n" + c.show()
    # Good commands do not count as errors.
    c2 = raw(gw.plain)
    c2.greeting()
    for _ in range(6):
        assert c2.cmd("NOOP").code == 250, c2.show()
    assert c2.cmd("QUIT").code == 221


def test_max_connections_per_ip(start_gateway, raw):
    """max_connections_per_ip=2: the third concurrent connection gets 421
    4.7.0 as its greeting and is closed; after one closes, a new one is
    served again."""
    gw = start_gateway(max_connections_per_ip=2)
    time.sleep(0.3)  # let the readiness probes' connections be reaped
    a = raw(gw.plain)
    assert a.greeting().code == 220, a.show()
    b = raw(gw.submission)
    assert b.greeting().code == 220, b.show()
    c = raw(gw.plain)
    r = c.greeting()
    assert r.code == 421 and r.enhanced() == "4.7.0", c.show()
    assert c.wait_closed(5), c.show()
    c.close()
    assert a.cmd("QUIT").code == 221
    assert a.wait_closed(5)
    a.close()
    deadline = time.monotonic() + 3
    while True:
        d = raw(gw.plain)
        r = d.greeting()
        if r.code == 220:
            break
        assert time.monotonic() < deadline, "slot not released after QUIT:\n" + d.show()
        time.sleep(0.1)
    assert d.cmd("QUIT").code == 221
    assert b.cmd("QUIT").code == 221


def test_idle_timeout(start_gateway, raw):
    """idle_timeout=2: a silent client gets 421 and is disconnected after
    about two seconds."""
    gw = start_gateway(idle_timeout=2)
    c = raw(gw.plain, timeout=8)
    c.greeting()
    c.ehlo()
    t0 = time.monotonic()
    r = c.reply(timeout=8)
    elapsed = time.monotonic() - t0
    assert r.code == 421, c.show()
    assert 1.5 <= elapsed <= 5, elapsed
    assert c.wait_closed(3), c.show()


def test_data_timeout(start_gateway, raw):
    """data_timeout=2: a client that stops sending in the middle of DATA gets
    421 and is disconnected; nothing is stored."""
    gw = start_gateway(data_timeout=2, idle_timeout=30)
    c = raw(gw.plain, timeout=8)
    c.greeting()
    c.ehlo()
    open_tx(c)
    c.send(b"Subject: slow\r\n\r\npart of a body")
    t0 = time.monotonic()
    r = c.reply(timeout=8)
    elapsed = time.monotonic() - t0
    assert r.code == 421, c.show()
    assert 1.5 <= elapsed <= 5, elapsed
    assert c.wait_closed(3), c.show()
    assert gw.message_ids() == []


def test_idle_timeout_tls(start_gateway, raw, tls_client_ctx):
    """The idle timeout applies on the implicit TLS listener too."""
    gw = start_gateway(idle_timeout=2)
    c = raw(gw.tls, timeout=8, tls_context=tls_client_ctx)
    assert c.greeting().code == 220
    t0 = time.monotonic()
    r = c.reply(timeout=8)
    assert r.code == 421, c.show()
    assert 1.5 <= time.monotonic() - t0 <= 5
    assert c.wait_closed(3), c.show()

