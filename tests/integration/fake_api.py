"""Fake third-party email APIs for the api transport's tests.

One HTTPS server (http.server's ThreadingHTTPServer with ssl, HTTP/1.1
keep-alive) per provider. Each provider module (fake_sendgrid.py,
fake_mailgun.py, fake_ses.py, fake_postmark.py, fake_webhook.py) subclasses
FakeAPI with:

  validate(req)   every rule of the provider's public documentation the
                  request must meet: method, path, authentication, content
                  type, required fields and their shapes. Returns a list of
                  violations; a request with any is answered 400 and the
                  violations are kept (violations()), so a test fails on
                  the first malformed request.
  recipients(req) the envelope recipients the request carries.
  success(req)    the provider's success answer (status, headers, body).
  error(kind, req) its answer for "429", "500", "401", "400", "account" and
                  "throttle" (provider-specific account or rate errors).

What a fake answers is scripted: set_mode("429:2", "success") answers the
next request 429 with Retry-After: 2, the one after that with success, and
then the default ("success" unless given). Modes:

  success            the documented success answer, with a fresh message id
  429[:n]            rate limited, Retry-After n (default 1)
  500, 401, 400      those errors, in the provider's error format
  account            the provider's account error (suspended, pending...)
  throttle           the provider's throttling error (SES: 400 Throttling)
  echo400, echo401   400 / 401 whose error text repeats the credential the
                     request carried (a leak test: it must never come back
                     out of mailferry)
  timeout:n          wait n seconds, then answer success (the client has
                     given up by then: ambiguous)
  close              read the request, close the connection, answer nothing

Every request is recorded (requests()); the control endpoint POST
/_fake/mode {"modes": [...], "default": "..."} sets the script for a fake
running in another process, GET /_fake/stats returns counters.

Run standalone (for bench/api_bench.py):
  fake_api.py --provider sendgrid --port 0 --cert C --key K --secret S
prints "READY <port>" once listening.
"""

import argparse
import base64
import email
import email.policy
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class Request:
    """One request as the fake received it."""

    def __init__(self, method, target, headers, body, conn_id):
        self.method = method
        self.target = target
        self.path, _, self.query = target.partition("?")
        self.headers = headers          # [(name, value)] in order
        self.body = body
        self.conn_id = conn_id
        self.errors = []
        self.status = None
        self.mode = None
        self.json = None                # parsed JSON body, when JSON
        self.mime = None                # raw message bytes, raw providers
        self.rcpts = []                 # envelope recipients
        self.roles = {}                 # JSON providers: to / cc / bcc lists
        self.message_id = None          # the id the fake answered with
        self.time = time.time()

    def header(self, name):
        """The first value of a header (case-insensitive), or None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def __repr__(self):
        return "Request(%s %s status=%s mode=%s errors=%r)" % (
            self.method, self.path, self.status, self.mode, self.errors)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive
    server_version = "fake-api/1"
    sys_version = ""

    def setup(self):
        self.request.settimeout(30)
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError):
            self.close_connection = True
        super().setup()
        with self.server.fake.lock:
            self.server.fake._conn_seq += 1
            self.conn_id = self.server.fake._conn_seq

    def log_message(self, fmt, *args):
        pass

    def _read_body(self):
        te = self.headers.get("Transfer-Encoding", "")
        if te.lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(n) if n > 0 else b""

    def _serve(self):
        fake = self.server.fake
        body = self._read_body()
        req = Request(self.command, self.path, list(self.headers.items()), body, self.conn_id)
        if self.path.startswith("/_fake/"):
            return self._control(req)
        with fake.lock:
            fake._inflight += 1
            fake.max_inflight = max(fake.max_inflight, fake._inflight)
        try:
            status, headers, out = fake._answer(req)
        finally:
            with fake.lock:
                fake._inflight -= 1
        if status is None:                # "close": no answer at all
            self.close_connection = True
            try:
                self.request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._reply(status, headers, out)

    def _reply(self, status, headers, out):
        if isinstance(out, str):
            out = out.encode()
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
        except OSError:
            self.close_connection = True

    def _control(self, req):
        fake = self.server.fake
        if req.method == "POST" and req.path == "/_fake/mode":
            d = json.loads(req.body or b"{}")
            fake.set_mode(*d.get("modes", []), default=d.get("default"))
            return self._reply(200, [("Content-Type", "application/json")], "{}")
        if req.method == "GET" and req.path == "/_fake/stats":
            return self._reply(200, [("Content-Type", "application/json")],
                               json.dumps(fake.stats()))
        return self._reply(404, [], "")

    do_POST = _serve
    do_GET = _serve
    do_PUT = _serve
    do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def server_bind(self):
        if self.fake.reuse_port:
            # Several fake processes on one port (benchmarks): the kernel
            # spreads connections among them.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self):
        sock, addr = super().get_request()
        # Headers and body go out in separate writes: without TCP_NODELAY
        # Nagle holds the body until the client's delayed ACK (40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.fake.lock:
            self.fake.connections += 1
        # The handshake runs in the connection's own thread (setup()).
        return self.fake.ctx.wrap_socket(sock, server_side=True,
                                         do_handshake_on_connect=False), addr


class FakeAPI:
    """Base class: the HTTPS server, the script, the records."""

    provider = None

    def __init__(self, certfile, keyfile, secret, port=0, record=True, reuse_port=False):
        self.secret = secret
        self.port = port
        self.record = record
        self.reuse_port = reuse_port
        self.lock = threading.Lock()
        self._requests = []
        self._script = []
        self._default = "success"
        self._conn_seq = 0
        self._inflight = 0
        self.max_inflight = 0
        self.connections = 0
        self.count = 0
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certfile, keyfile)
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.server = None
        self.thread = None

    # -- lifecycle -------------------------------------------------------------
    def start(self):
        self.server = _Server(("127.0.0.1", self.port), _Handler, bind_and_activate=False)
        self.server.fake = self
        try:
            self.server.server_bind()
            self.server.server_activate()
        except BaseException:
            self.server.server_close()
            raise
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def base_url(self):
        return "https://127.0.0.1:%d" % self.port

    # -- control ---------------------------------------------------------------
    def set_mode(self, *modes, default=None):
        with self.lock:
            self._script = list(modes)
            if default is not None:
                self._default = default

    def requests(self):
        """The API requests received so far (control calls excluded)."""
        with self.lock:
            return list(self._requests)

    def accepted(self):
        return [r for r in self.requests() if r.status is not None and 200 <= r.status < 300]

    def violations(self):
        return [(r.path, e) for r in self.requests() for e in r.errors]

    def stats(self):
        with self.lock:
            return {"requests": self.count, "connections": self.connections,
                    "max_inflight": self.max_inflight}

    # -- answering -------------------------------------------------------------
    def _next_mode(self):
        with self.lock:
            return self._script.pop(0) if self._script else self._default

    def _answer(self, req):
        errors = []
        try:
            errors = self.validate(req)
        except Exception as e:           # a malformed request the validator choked on
            errors = ["request could not be validated: %r" % e]
        req.errors = errors
        with self.lock:
            self.count += 1
            if self.record:
                self._requests.append(req)
        if errors:
            req.status = 400
            req.mode = "invalid"
            return 400, [("Content-Type", "application/json")], json.dumps(
                {"errors": [{"message": "fake %s: %s" % (self.provider, e)} for e in errors]})
        mode = self._next_mode()
        req.mode = mode
        kind, _, arg = mode.partition(":")
        if kind == "close":
            return None, None, None
        if kind == "timeout":
            time.sleep(float(arg or "5"))
            kind = "success"
        if kind == "success":
            req.message_id = self.new_id()
            status, headers, body = self.success(req)
        elif kind == "429":
            status, headers, body = self.error("429", req)
            headers = headers + [("Retry-After", arg or "1")]
        else:
            status, headers, body = self.error(kind, req)
        req.status = status
        return status, headers, body

    def new_id(self):
        return str(uuid.uuid4())

    # -- for subclasses ----------------------------------------------------------
    def validate(self, req):
        raise NotImplementedError

    def success(self, req):
        raise NotImplementedError

    def error(self, kind, req):
        raise NotImplementedError

    def credential(self, req):
        """The credential the request carried, for the echo modes."""
        return self.secret


# -- shared checks ---------------------------------------------------------------

def check_email(v, where, errors):
    if not isinstance(v, str) or not EMAIL_RE.match(v):
        errors.append("%s: not an email address: %r" % (where, v))


def check_base64(v, where, errors):
    if not isinstance(v, str) or not v:
        errors.append("%s: must be a non-empty base64 string" % where)
        return None
    try:
        return base64.b64decode(v, validate=True)
    except Exception:
        errors.append("%s: not valid base64" % where)
        return None


def check_json_body(req, errors, content_type="application/json"):
    ct = (req.header("Content-Type") or "").split(";")[0].strip().lower()
    if ct != content_type:
        errors.append("Content-Type must be %s, got %r" % (content_type, ct))
    try:
        req.json = json.loads(req.body.decode("utf-8"))
    except Exception as e:
        errors.append("body is not UTF-8 JSON: %s" % e)
        return None
    if not isinstance(req.json, dict):
        errors.append("body must be a JSON object")
        return None
    return req.json


def check_common(req, method, path, errors):
    if req.method != method:
        errors.append("method must be %s, got %s" % (method, req.method))
    if req.path != path:
        errors.append("path must be %s, got %s" % (path, req.path))
    if req.header("Host") is None:
        errors.append("no Host header (RFC 9110 section 7.2)")
    cl = req.header("Content-Length")
    if cl is not None and int(cl) != len(req.body):
        errors.append("Content-Length %s but %d bytes" % (cl, len(req.body)))


# -- comparing a JSON provider's fields with the original message ------------------

def _is_attachment(part):
    disp = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
    return disp == "attachment" or part.get_filename() is not None


def mime_expectation(mime):
    """What a JSON provider should carry for this message, by the rules of
    lib/mime.h, computed independently with Python's email package:
    subject, text, html, attachments [(filename or None, type, bytes,
    content_id or None, inline)]."""
    msg = email.message_from_bytes(mime, policy=email.policy.default)
    exp = {"subject": str(msg["Subject"]) if msg["Subject"] is not None else None,
           "text": None, "html": None, "attachments": []}

    def walk(part, related):
        ctype = part.get_content_type()
        if part.is_multipart() and ctype != "message/rfc822":
            for p in part.iter_parts():
                walk(p, ctype == "multipart/related")
            return
        cid = part.get("Content-ID")
        cid = cid.strip().strip("<>") if cid else None
        if ctype == "message/rfc822":
            inner = part.get_payload()[0] if isinstance(part.get_payload(), list) else part.get_payload()
            data = inner.as_bytes(policy=email.policy.SMTP)
            exp["attachments"].append((part.get_filename(), ctype, data, cid, False, True))
            return
        if not _is_attachment(part) and ctype in ("text/plain", "text/html"):
            key = "text" if ctype == "text/plain" else "html"
            if exp[key] is None:
                exp[key] = part.get_content()
                return
        disp = (part.get("Content-Disposition") or "").split(";")[0].strip().lower()
        inline = cid is not None and (related or disp == "inline")
        exp["attachments"].append((part.get_filename(), ctype, part.get_payload(decode=True) or b"",
                                   cid, inline, False))

    walk(msg, False)
    return exp


def _norm(s):
    return None if s is None else s.replace("\r\n", "\n").rstrip("\n")


def compare_fields(got, mime):
    """got: {"subject", "text", "html", "attachments": [(filename, type,
    bytes, content_id, inline)]} as the provider's JSON carried them.
    Returns a list of differences from the original message."""
    exp = mime_expectation(mime)
    diffs = []
    if (exp["subject"] or "").strip() != (got["subject"] or "").strip():
        diffs.append("subject %r != %r" % (got["subject"], exp["subject"]))
    for k in ("text", "html"):
        if _norm(exp[k]) != _norm(got[k]):
            diffs.append("%s differs:\n got %r\nwant %r" % (k, got[k], exp[k]))
    if len(exp["attachments"]) != len(got["attachments"]):
        diffs.append("%d attachments, want %d" % (len(got["attachments"]), len(exp["attachments"])))
        return diffs
    for i, (e, g) in enumerate(zip(exp["attachments"], got["attachments"])):
        efn, etype, edata, ecid, einline, is_msg = e
        gfn, gtype, gdata, gcid, ginline = g
        if efn is not None and efn != gfn:
            diffs.append("attachment %d: filename %r, want %r" % (i, gfn, efn))
        if efn is None and not (gfn or "").startswith("attachment-"):
            diffs.append("attachment %d: made-up filename %r" % (i, gfn))
        if etype != gtype:
            diffs.append("attachment %d: type %r, want %r" % (i, gtype, etype))
        if is_msg:
            # An attached message is re-serialised by both sides; compare
            # what it says, not its folding.
            a = email.message_from_bytes(gdata, policy=email.policy.default)
            b = email.message_from_bytes(edata, policy=email.policy.default)
            if str(a["Subject"]) != str(b["Subject"]) or _norm(a.get_content()) != _norm(b.get_content()):
                diffs.append("attachment %d: attached message differs" % i)
        elif edata != gdata:
            diffs.append("attachment %d (%s): %d bytes differ from the original %d bytes"
                         % (i, gfn, len(gdata), len(edata)))
        if einline != ginline or (einline and ecid != gcid):
            diffs.append("attachment %d: inline=%s cid=%r, want inline=%s cid=%r"
                         % (i, ginline, gcid, einline, ecid))
    return diffs


# -- standalone --------------------------------------------------------------------

def load(provider):
    """The FakeAPI subclass of a provider."""
    mod = __import__("fake_%s" % provider)
    return mod.FAKE


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--provider", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--secret", required=True, help="the API key / secret (file with @path)")
    ap.add_argument("--extra", action="append", default=[], help="name=value for the fake")
    ap.add_argument("--no-record", action="store_true", help="keep counters only (benchmarks)")
    ap.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: several processes, one port")
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    secret = open(a.secret[1:]).read().strip() if a.secret.startswith("@") else a.secret
    kw = dict(x.split("=", 1) for x in a.extra)
    fake = load(a.provider)(a.cert, a.key, secret, port=a.port, record=not a.no_record,
                            reuse_port=a.reuse_port, **kw)
    fake.start()
    print("READY %d" % fake.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
