"""The plain listener with real clients: Python's smtplib, curl, and raw
pipelined sockets. Every accepted message is read back from Redis and
compared byte for byte with what was sent."""

import email.utils
import re
import smtplib
import subprocess

from mftest import check_stored, dot_stuff, ehlo_keywords, queued_id, unfold

SENDER = "sender@example.com"


def smtplib_client(gw):
    s = smtplib.SMTP("127.0.0.1", gw.plain, local_hostname="client.test", timeout=10)
    code, _ = s.ehlo()
    assert code == 250
    return s


def smtplib_send(s, sender, rcpts, msg, mail_options=()):
    code, resp = s.mail(sender, list(mail_options))
    assert code == 250, (code, resp)
    for r in rcpts:
        code, resp = s.rcpt(r)
        assert code == 250, (r, code, resp)
    code, resp = s.data(msg)
    assert code == 250, (code, resp)
    return queued_id(resp.decode())


def test_smtplib_ehlo_capabilities(gateway):
    """EHLO on the plain listener advertises the ESMTP extensions the
    gateway implements, SIZE with the configured limit, STARTTLS, and no
    AUTH before TLS (RFC 4954 section 4, RFC 3207)."""
    s = smtplib_client(gateway)
    try:
        f = s.esmtp_features
        for ext in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "starttls"):
            assert ext in f, "EHLO lacks %s: %r" % (ext, f)
        assert f["size"].strip() == str(gateway.max_message_size), f
        assert "auth" not in f, "AUTH advertised before TLS: %r" % f
        code, _ = s.noop()
        assert code == 250
    finally:
        s.quit()


def test_smtplib_8bit_folded_dots_stored_exactly(gateway):
    """An 8-bit message with long folded headers and lines starting with
    '.' is stored exactly as sent (dot-unstuffed), with the envelope, one
    Received header 'with ESMTP', and Message-ID and Date added once."""
    long_subject = "Subject: " + " ".join("word%d" % i for i in range(60)) + "\r\n\t" + \
        " ".join("folded%d" % i for i in range(60)) + "\r\n"
    references = "References: " + "\r\n ".join("<ref%d.%s@example.com>" % (i, "r" * 40)
                                                   for i in range(12)) + "\r\n"
    long_line = "X-Long: " + "L" * 900 + "\r\n"
    msg = (
        "From: Jörg Sender <sender@example.com>\r\n"
        "To: one@dest.test, two@dest.test\r\n"
        + long_subject + references + long_line +
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Grüße aus Köln — ünïcödé\r\n"
        ".a line starting with a dot\r\n"
        "..two dots\r\n"
        ".\r\n"
        " .space then dot\r\n"
        "\r\n"
        "last line\r\n"
    ).encode("utf-8") + b"raw high bytes: \x80\x81\xfe\xff\r\n"
    rcpts = ["one@dest.test", "two@dest.test"]
    s = smtplib_client(gateway)
    try:
        qid = smtplib_send(s, SENDER, rcpts, msg, ["BODY=8BITMIME"])
    finally:
        s.quit()
    h = gateway.stored(qid)
    added = check_stored(h, msg, SENDER, rcpts)
    received = unfold(added["received"][0])
    assert re.search(r"\bwith ESMTP(?![A-Z])", received), received
    assert "mx.test" in received, received
    assert "127.0.0.1" in received, received
    mid = unfold(added["message-id"][0])
    assert re.match(r"(?i)^Message-ID:\s*<[^<>@\s]+@[^<>@\s]+>$", mid), mid
    date = unfold(added["date"][0])
    assert email.utils.parsedate_to_datetime(date.split(":", 1)[1].strip()) is not None, date


def test_smtplib_message_id_and_date_kept(gateway):
    """A message that has Message-ID and Date keeps them unchanged and gets
    no second copy; only Received is prepended."""
    msg = (b"Message-ID: <original.1@example.com>\r\n"
           b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
           b"From: sender@example.com\r\n"
           b"To: r@dest.test\r\n"
           b"Subject: with ids\r\n"
           b"\r\n"
           b"hello\r\n")
    s = smtplib_client(gateway)
    try:
        qid = smtplib_send(s, SENDER, ["r@dest.test"], msg)
    finally:
        s.quit()
    h = gateway.stored(qid)
    added = check_stored(h, msg, SENDER, ["r@dest.test"])
    assert list(added) == ["received"], added
    assert h["data"].count(b"<original.1@example.com>") == 1


def test_smtputf8_address(gateway):
    """With SMTPUTF8 (RFC 6531) a UTF-8 mailbox is accepted and stored."""
    sender = "jörg@example.com"
    rcpt = "ünï@dest.test"
    msg = "From: jörg@example.com\r\nSubject: utf8\r\n\r\nhi\r\n".encode()
    s = smtplib_client(gateway)
    try:
        qid = smtplib_send(s, sender, [rcpt], msg, ["SMTPUTF8", "BODY=8BITMIME"])
    finally:
        s.quit()
    check_stored(gateway.stored(qid), msg, sender, [rcpt])


def test_curl_smtp_client(gateway, tmp_path):
    """curl's SMTP client (with --crlf) delivers a file; the stored message
    is the file with CRLF line ends, dot-unstuffed."""
    text = ("From: curl@example.com\n"
            "To: r@dest.test\n"
            "Subject: from curl\n"
            "\n"
            "line one\n"
            ".dotted line\n"
            ".\n"
            "last\n")
    f = tmp_path / "mail.txt"
    f.write_bytes(text.encode())
    p = subprocess.run(
        ["curl", "-sS", "-v", "--max-time", "20",
         "smtp://127.0.0.1:%d/client.test" % gateway.plain,
         "--mail-from", "curl@example.com", "--mail-rcpt", "r@dest.test",
         "--mail-rcpt", "s@dest.test", "--upload-file", str(f), "--crlf"],
        capture_output=True, timeout=30)
    out = p.stderr.decode(errors="replace")
    assert p.returncode == 0, out
    qid = queued_id(out)
    sent = text.replace("\n", "\r\n").encode()
    check_stored(gateway.stored(qid), sent, "curl@example.com", ["r@dest.test", "s@dest.test"])


def test_pipelined_transaction_single_write(gateway, raw):
    """RFC 2920: MAIL, three RCPTs and DATA in one write get five replies
    in order; the message and QUIT in one write get 250 and 221."""
    c = raw(gateway.plain)
    assert c.greeting().code == 220
    kw = ehlo_keywords(c.ehlo())
    assert "PIPELINING" in kw
    c.send("MAIL FROM:<p@example.com>\r\n"
           "RCPT TO:<r1@dest.test>\r\n"
           "RCPT TO:<r2@dest.test>\r\n"
           "RCPT TO:<r3@dest.test>\r\n"
           "DATA\r\n")
    rs = c.replies(5)
    assert [r.code for r in rs] == [250, 250, 250, 250, 354], c.show()
    msg = b"Subject: pipelined\r\n\r\nbody\r\n.starts with dot\r\n"
    c.send(dot_stuff(msg) + b"QUIT\r\n")
    r = c.reply()
    assert r.code == 250, c.show()
    qid = queued_id(r.first)
    assert c.reply().code == 221, c.show()
    assert c.wait_closed(5), c.show()
    check_stored(gateway.stored(qid), msg, "p@example.com",
                 ["r1@dest.test", "r2@dest.test", "r3@dest.test"])


def test_two_transactions_in_one_write(gateway, raw):
    """Two whole transactions and QUIT sent in a single write: the bytes
    after the first end-of-data marker are commands, both messages are
    stored, and the replies come in order."""
    c = raw(gateway.plain)
    assert c.greeting().code == 220
    c.ehlo()
    m1 = b"Subject: first\r\n\r\none\r\n"
    m2 = b"Subject: second\r\n\r\ntwo\r\n..\r\n"
    c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@dest.test>\r\nDATA\r\n" + dot_stuff(m1) +
           b"MAIL FROM:<b@example.com>\r\nRCPT TO:<y@dest.test>\r\nDATA\r\n" + dot_stuff(m2) +
           b"QUIT\r\n")
    rs = c.replies(9)
    assert [r.code for r in rs] == [250, 250, 354, 250, 250, 250, 354, 250, 221], c.show()
    id1, id2 = queued_id(rs[3].first), queued_id(rs[7].first)
    assert id1 != id2
    check_stored(gateway.stored(id1), m1, "a@example.com", ["x@dest.test"])
    check_stored(gateway.stored(id2), m2, "b@example.com", ["y@dest.test"])
    assert sorted(gateway.message_ids()) == sorted([id1, id2])


def test_empty_message_and_null_sender(gateway, raw):
    """The null reverse-path (RFC 5321 section 4.5.5) is accepted and stored
    as the empty string."""
    c = raw(gateway.plain)
    c.greeting()
    c.ehlo()
    assert c.cmd("MAIL FROM:<>").code == 250, c.show()
    assert c.cmd("RCPT TO:<r@dest.test>").code == 250, c.show()
    assert c.cmd("DATA").code == 354, c.show()
    msg = b"Subject: bounce\r\n\r\nx\r\n"
    c.send(dot_stuff(msg))
    r = c.reply()
    assert r.code == 250, c.show()
    check_stored(gateway.stored(queued_id(r.first)), msg, "", ["r@dest.test"])
