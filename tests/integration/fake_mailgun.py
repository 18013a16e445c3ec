"""Fake Mailgun "Send a message in MIME format" (POST
/v3/{domain}/messages.mime), checked against the Mailgun API reference:
HTTP Basic authentication with user "api" and the API key,
multipart/form-data (RFC 7578) with one or more "to" fields (each may list
several addresses, comma-separated) and the message as the file field
"message"; other fields must be options (o:, h:, v:, t:). Success is 200
{"id": "<...>", "message": "Queued. Thank you."}."""

import base64
import email.utils
import json
import re

from fake_api import FakeAPI, check_common, check_email


def parse_form(ctype, body):
    """Splits a multipart/form-data body (RFC 7578) into
    [(name, filename, content type, bytes)], keeping each value's bytes
    exactly."""
    m = re.search(r'boundary="?([^";]+)"?', ctype or "")
    if not m:
        raise ValueError("no boundary")
    delim = b"--" + m.group(1).encode()
    chunks = (b"\r\n" + body).split(b"\r\n" + delim)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("not a complete multipart body")
    out = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n"):
            raise ValueError("boundary not followed by CRLF")
        head, sep, value = chunk[2:].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without a header block")
        hdrs = {}
        for line in head.decode("utf-8").split("\r\n"):
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        cd = hdrs.get("content-disposition", "")
        if not cd.lower().startswith("form-data"):
            raise ValueError("part without Content-Disposition: form-data")
        name = re.search(r'\bname="([^"]*)"', cd)
        fn = re.search(r'\bfilename="([^"]*)"', cd)
        out.append((name.group(1) if name else None, fn.group(1) if fn else None,
                    hdrs.get("content-type"), value))
    return out


class FakeMailgun(FakeAPI):
    provider = "mailgun"

    def __init__(self, *a, domain="mg.test", **kw):
        super().__init__(*a, **kw)
        self.domain = domain

    def validate(self, req):
        e = []
        check_common(req, "POST", "/v3/%s/messages.mime" % self.domain, e)
        want = "Basic " + base64.b64encode(("api:" + self.secret).encode()).decode()
        if req.header("Authorization") != want:
            e.append("Authorization must be HTTP Basic with user api and the API key")
        ctype = req.header("Content-Type") or ""
        if not ctype.lower().startswith("multipart/form-data"):
            e.append("Content-Type must be multipart/form-data, got %r" % ctype)
            return e
        try:
            fields = parse_form(ctype, req.body)
        except Exception as x:
            e.append("malformed multipart/form-data: %s" % x)
            return e
        for name, fn, ct, value in fields:
            if name == "to":
                for _n, addr in email.utils.getaddresses([value.decode("utf-8")]):
                    check_email(addr, "to", e)
                    req.rcpts.append(addr)
            elif name == "message":
                if fn is None:
                    e.append("message: must be a file upload (filename)")
                req.mime = value
            elif name is None or not re.match(r"^(o|h|v|t):", name):
                e.append("unknown field %r" % name)
        if not req.rcpts:
            e.append("to: at least one recipient required")
        if req.mime is None:
            e.append("message: the MIME message is required")
        return e

    def success(self, req):
        return 200, [("Content-Type", "application/json")], json.dumps(
            {"id": "<%s@%s>" % (req.message_id, self.domain), "message": "Queued. Thank you."})

    def error(self, kind, req):
        def err(status, msg):
            return status, [("Content-Type", "application/json")], json.dumps({"message": msg})
        if kind == "400":
            return err(400, "fake mailgun: the test rejected this message")
        if kind == "echo400":
            return err(400, "key %s may not send this" % self.credential(req))
        if kind == "401":
            return 401, [("Content-Type", "text/plain")], "Forbidden"
        if kind == "echo401":
            return err(401, "Invalid private key %s" % self.credential(req))
        if kind == "account":
            return err(403, "Domain %s is not allowed to send: account disabled" % self.domain)
        if kind in ("429", "throttle"):
            return err(429, "Too many requests")
        return err(500, "Internal Server Error")


FAKE = FakeMailgun
