"""Helpers shared by the mailferry integration tests.

A raw SMTP client that records a transcript, a minimal RESP (Redis) client,
and functions that split the headers the gateway adds from the stored
message. Nothing here starts a process; conftest.py does that.
"""

import json
import os
import re
import socket
import ssl
import time

CRLF = b"\r\n"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAILFERRY_BIN = os.environ.get("MAILFERRY_BIN", os.path.join(REPO, "build", "mailferry"))

PASSWORDS = {"alice": "s3cret", "bob": "b0b-pass", "carol": "c4rol-pass"}
DEFAULT_USERS = [("alice", ["example.com"]), ("bob", ["*"])]

QUEUED_RE = re.compile(r"\b2\.0\.0 Ok: queued as ([0-9A-Za-z]+)")


class SMTPReply:
    """One complete SMTP reply (RFC 5321 section 4.2): a code and its lines."""

    def __init__(self, code, lines):
        self.code = code
        self.lines = lines  # text of each line, after "ddd-" / "ddd "

    @property
    def text(self):
        return "\n".join(self.lines)

    @property
    def first(self):
        return self.lines[0] if self.lines else ""

    def enhanced(self):
        """The enhanced status code (RFC 3463) of the first line, or None."""
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})\b", self.first)
        return m.group(1) if m else None

    def __repr__(self):
        return "SMTPReply(%d, %r)" % (self.code, self.lines)


class SMTPClosed(Exception):
    """The server closed the connection before a complete reply."""


class SMTPTimeout(socket.timeout):
    """No complete reply in time; the message holds the transcript."""


class RawSMTP:
    """A byte-exact SMTP client: the test decides every byte that is sent
    and when, and reads replies one at a time. Every exchange is kept in
    self.transcript for assertion messages."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0, tls_context=None,
                 server_hostname="localhost"):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.timeout = timeout
        if tls_context is not None:
            self.sock = tls_context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.buf = b""
        self.transcript = []
        self.eof = False

    # -- sending -------------------------------------------------------
    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.transcript.append(">> " + _show(data))
        self.sock.sendall(data)

    # -- receiving -----------------------------------------------------
    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SMTPTimeout("timed out waiting for a reply; transcript:\n" + self.show())
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise SMTPTimeout("timed out waiting for a reply; transcript:\n" + self.show())
        except (ConnectionResetError, ssl.SSLEOFError):
            chunk = b""
        if not chunk:
            self.eof = True
            raise SMTPClosed("connection closed by server; transcript:\n" + self.show())
        self.buf += chunk

    def _line(self, deadline):
        while True:
            i = self.buf.find(CRLF)
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill(deadline)

    def reply(self, timeout=None):
        """Reads exactly one complete reply (all of its lines)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        code = None
        lines = []
        while True:
            raw = self._line(deadline)
            text = raw.decode("utf-8", "replace")
            self.transcript.append("<< " + text)
            m = re.match(r"^(\d{3})([ -]|$)(.*)$", text)
            assert m, "malformed reply line %r; transcript:\n%s" % (text, self.show())
            c = int(m.group(1))
            if code is None:
                code = c
            assert c == code, "reply code changed inside a multi-line reply; transcript:\n" + self.show()
            lines.append(m.group(3))
            if m.group(2) != "-":
                return SMTPReply(code, lines)

    def replies(self, n, timeout=None):
        return [self.reply(timeout) for _ in range(n)]

    def cmd(self, line, timeout=None):
        """Sends one command line (CRLF added) and reads its reply."""
        self.send(line + "\r\n" if isinstance(line, str) else line + CRLF)
        return self.reply(timeout)

    def pending(self, wait=0.3):
        """Returns whatever bytes arrive within wait seconds without being
        asked for (used to prove that nothing more was answered)."""
        deadline = time.monotonic() + wait
        try:
            while True:
                self._fill(deadline)
        except (socket.timeout, SMTPClosed):
            pass
        data, self.buf = self.buf, b""
        if data:
            self.transcript.append("<< (unexpected) " + _show(data))
        return data

    def wait_closed(self, timeout=5.0):
        """True when the server closes the connection within timeout, with
        no further bytes; raises AssertionError if it sends data instead.
        Like a real client, closes its own end once the server has."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._fill(deadline)
                if self.buf:
                    raise AssertionError("unexpected bytes before close: %r; transcript:\n%s"
                                         % (self.buf, self.show()))
        except SMTPClosed:
            self.close()
            return True
        except socket.timeout:
            return False

    def starttls(self, context, server_hostname="localhost"):
        """Upgrades the connection. Bytes already buffered in plaintext after
        the 220 reply would be a protocol violation and are reported."""
        assert self.buf == b"", "plaintext bytes after the STARTTLS reply: %r" % self.buf
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.transcript.append("== TLS %s" % self.sock.version())

    def ehlo(self, name="client.test"):
        r = self.cmd("EHLO " + name)
        assert r.code == 250, "EHLO refused: %r\n%s" % (r, self.show())
        return r

    def greeting(self, timeout=None):
        return self.reply(timeout)

    def show(self):
        return "\n".join(self.transcript)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _show(data):
    s = data.decode("utf-8", "replace")
    if len(s) > 400:
        s = s[:200] + "...[%d bytes]..." % len(data) + s[-120:]
    return s.replace("\r", "\\r").replace("\n", "\\n\n   ")


def ehlo_keywords(reply):
    """EHLO reply lines after the first, as {KEYWORD: [params]}."""
    out = {}
    for line in reply.lines[1:]:
        parts = line.split()
        if parts:
            out[parts[0].upper()] = parts[1:]
    return out


def queued_id(text):
    """The queue id from a '250 2.0.0 Ok: queued as <id>' reply text."""
    m = QUEUED_RE.search(text)
    assert m, "no 'queued as <id>' in %r" % text
    return m.group(1)


def dot_stuff(msg):
    """Transparency (RFC 5321 section 4.5.2): the bytes a client sends for
    msg, a CRLF-terminated message, plus the end-of-data marker."""
    assert msg.endswith(CRLF) or msg == b""
    lines = msg.split(CRLF)[:-1] if msg else []
    out = b"".join((b"." + l if l.startswith(b".") else l) + CRLF for l in lines)
    return out + b".\r\n"


def make_message(size, dotted=True, subject="size test"):
    """A CRLF message of exactly size bytes with lines under 80 octets.
    With dotted, some lines start with '.' so that the wire form is longer
    than the message."""
    head = ("From: a@example.com\r\nTo: r@dest.test\r\nSubject: %s\r\n\r\n" % subject).encode()
    body = []
    n = len(head)
    i = 0
    while True:
        line = (b".dot line %d " % i) if dotted and i % 10 == 0 else (b"line %d " % i)
        line = line + b"x" * (70 - len(line)) + CRLF
        if n + len(line) + 80 > size:
            break
        body.append(line)
        n += len(line)
        i += 1
    rest = size - n
    assert 2 <= rest <= 200, rest
    while rest > 78:
        body.append(b"y" * 70 + CRLF)
        rest -= 72
    body.append(b"z" * (rest - 2) + CRLF)
    msg = head + b"".join(body)
    assert len(msg) == size, (len(msg), size)
    return msg


def header_names(msg):
    """Lower-case names of the fields in the header block of msg."""
    end = msg.find(b"\r\n\r\n")
    block = msg if end < 0 else msg[:end + 2]
    names = []
    for line in block.split(CRLF):
        if line and line[:1] not in (b" ", b"\t"):
            m = re.match(rb"([!-9;-~]+):", line)
            if m:
                names.append(m.group(1).decode().lower())
    return names


def split_added(stored, sent):
    """Splits stored (the queue's data field) into the header fields the
    gateway prepended and the rest. Received is always stripped; Message-ID
    and Date only when sent lacked them. Returns (list of (name, bytes of
    the whole field including folded lines and CRLF), rest)."""
    have = set(header_names(sent))
    strip = {"received"}
    for h in ("message-id", "date"):
        if h not in have:
            strip.add(h)
    added = []
    pos = 0
    while True:
        m = re.match(rb"([!-9;-~]+):", stored[pos:pos + 100])
        if not m or m.group(1).decode().lower() not in strip:
            break
        end = pos
        while True:
            nl = stored.find(CRLF, end)
            if nl < 0:
                raise AssertionError("unterminated added header in %r" % stored[:500])
            end = nl + 2
            if stored[end:end + 1] not in (b" ", b"\t"):
                break
        added.append((m.group(1).decode().lower(), stored[pos:end]))
        pos = end
    return added, stored[pos:]


def check_stored(msg_hash, sent, sender, rcpts):
    """Asserts the queue entry holds exactly the sent message (apart from
    the added headers) and the envelope; returns the added fields as a
    dict name -> list of field bytes."""
    assert msg_hash, "message not found in Redis"
    assert msg_hash["from"] == sender, msg_hash["from"]
    assert json.loads(msg_hash["rcpts"]) == rcpts, msg_hash["rcpts"]
    data = msg_hash["data"]
    added, rest = split_added(data, sent)
    assert rest == sent, ("stored message differs from the sent one\nsent:   %r\nstored: %r"
                          % (sent[:3000], data[:3000]))
    names = [n for n, _ in added]
    assert names.count("received") == 1, "expected one added Received header, got %r" % added
    for h in ("message-id", "date"):
        if h in header_names(sent):
            assert h not in names, "%s added although present: %r" % (h, added)
            assert header_names(data).count(h) == 1, "%s duplicated" % h
        else:
            assert names.count(h) == 1, "%s not added exactly once: %r" % (h, added)
    size = int(msg_hash["size"])
    assert size in (len(data), len(sent)), "size field %d matches neither %d nor %d" % (
        size, len(data), len(sent))
    assert int(msg_hash["created"]) > 0
    out = {}
    for n, b in added:
        out.setdefault(n, []).append(b)
    return out


def unfold(field):
    """A header field's bytes as one str line (RFC 5322 section 2.2.3)."""
    return re.sub(r"\r\n([ \t])", r"\1", field.decode("utf-8", "replace")).rstrip("\r\n")


def child_env():
    """The environment for mailferry: MAILFERRY_* variables would override
    the config file, so none are passed on."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}


# -- Redis -----------------------------------------------------------------

class RedisError(Exception):
    pass


class RESP:
    """A minimal synchronous RESP2 client, enough for the tests to read the
    queue (python3-redis is not installed)."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def __call__(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, str):
                a = a.encode()
            elif isinstance(a, int):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self):
        line = self.f.readline()
        if not line:
            raise RedisError("connection closed")
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RedisError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)
            return data[:-2]
        if t == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self._read() for _ in range(n)]
        raise RedisError("bad reply %r" % line)

    def close(self):
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
