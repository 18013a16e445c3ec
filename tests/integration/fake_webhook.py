"""Fake operator relay for the webhook provider (docs/api.md): POST of the
message (Content-Type message/rfc822) with X-Mailferry-Queue-Id,
X-Mailferry-Envelope-From, one X-Mailferry-Envelope-To per recipient,
X-Mailferry-Timestamp (within 5 minutes) and X-Mailferry-Signature
"v1=<hex HMAC-SHA256>" recomputed here over
"mailferry-v1\\n" ts "\\n" id "\\n" from "\\n" rcpt "\\n" ... "\\n" body."""

import hashlib
import hmac
import json
import time

from fake_api import FakeAPI, check_common, check_email


def _path(v):
    """The address inside <...> (header values arrive as latin-1)."""
    if v is None or not (v.startswith("<") and v.endswith(">")):
        return None
    return v[1:-1].encode("latin-1").decode("utf-8")


class FakeWebhook(FakeAPI):
    provider = "webhook"

    def __init__(self, *a, path="/hook", **kw):
        super().__init__(*a, **kw)
        self.path = path

    def validate(self, req):
        e = []
        check_common(req, "POST", self.path, e)
        ct = (req.header("Content-Type") or "").split(";")[0].strip().lower()
        if ct != "message/rfc822":
            e.append("Content-Type must be message/rfc822, got %r" % ct)
        qid = req.header("X-Mailferry-Queue-Id")
        if not qid:
            e.append("X-Mailferry-Queue-Id required")
        frm = _path(req.header("X-Mailferry-Envelope-From"))
        if frm is None:
            e.append("X-Mailferry-Envelope-From must be <address> or <>")
        for v in req.header_all("X-Mailferry-Envelope-To"):
            a = _path(v)
            if a is None:
                e.append("X-Mailferry-Envelope-To must be <address>: %r" % v)
                continue
            check_email(a, "X-Mailferry-Envelope-To", e)
            req.rcpts.append(a)
        if not req.rcpts:
            e.append("at least one X-Mailferry-Envelope-To required")
        ts = req.header("X-Mailferry-Timestamp") or ""
        if not ts.isdigit() or abs(int(ts) - time.time()) > 300:
            e.append("X-Mailferry-Timestamp missing or more than 5 minutes off")
        signed = ("mailferry-v1\n%s\n%s\n%s\n" % (ts, qid, frm or "")).encode() + \
            b"".join(r.encode() + b"\n" for r in req.rcpts) + b"\n" + req.body
        want = "v1=" + hmac.new(self.secret.encode(), signed, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, req.header("X-Mailferry-Signature") or ""):
            e.append("X-Mailferry-Signature does not verify")
        req.mime = req.body
        return e

    def success(self, req):
        return 200, [("Content-Type", "application/json")], json.dumps({"id": req.message_id})

    def error(self, kind, req):
        def err(status, msg):
            return status, [("Content-Type", "application/json")], json.dumps({"error": msg})
        if kind == "400":
            return err(422, "fake webhook: the test rejected this message")
        if kind == "echo400":
            return err(422, "secret %s rejected" % self.credential(req))
        if kind in ("401", "echo401"):
            return err(401, "signature rejected" + (" for " + self.credential(req) if kind == "echo401" else ""))
        if kind == "account":
            return err(403, "relay disabled")
        if kind in ("429", "throttle"):
            return err(429, "slow down")
        return err(503, "relay down")


FAKE = FakeWebhook
