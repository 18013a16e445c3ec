"""Fake Postmark "Send a single email" (POST /email), checked against the
Postmark API reference: X-Postmark-Server-Token, Accept and Content-Type
application/json, a JSON body with From and To (comma-separated), Cc, Bcc
(at most 50 recipients in all), Subject, TextBody and/or HtmlBody,
ReplyTo, Headers [{Name, Value}], Attachments [{Name, Content (base64),
ContentType, ContentID ("cid:...")}], MessageStream. Success is 200
{To, SubmittedAt, MessageID, ErrorCode: 0, Message: "OK"}; errors are 422
(401 for the token) with {ErrorCode, Message}."""

import email.utils
import json
import time

from fake_api import FakeAPI, check_base64, check_common, check_email, check_json_body

FIELDS = {"From", "To", "Cc", "Bcc", "Subject", "Tag", "HtmlBody", "TextBody", "ReplyTo",
          "Headers", "TrackOpens", "TrackLinks", "Metadata", "Attachments", "MessageStream"}


def _addrs(v, where, e):
    if not isinstance(v, str) or not v.strip():
        e.append("%s: must be a non-empty string" % where)
        return []
    out = []
    for name, addr in email.utils.getaddresses([v]):
        check_email(addr, where, e)
        out.append(addr)
    return out


class FakePostmark(FakeAPI):
    provider = "postmark"

    def validate(self, req):
        e = []
        check_common(req, "POST", "/email", e)
        if req.header("X-Postmark-Server-Token") != self.secret:
            e.append("X-Postmark-Server-Token must be the server token")
        if (req.header("Accept") or "").lower() != "application/json":
            e.append("Accept must be application/json")
        j = check_json_body(req, e)
        if j is None:
            return e
        for k in sorted(set(j) - FIELDS):
            e.append("unknown field %r" % k)
        if len(_addrs(j.get("From"), "From", e)) != 1:
            e.append("From: exactly one sender")
        for role in ("To", "Cc", "Bcc"):
            if role == "To" or role in j:
                a = _addrs(j.get(role), role, e)
                req.rcpts += a
                req.roles[role.lower()] = a
        if len(req.rcpts) > 50:
            e.append("more than 50 recipients in To, Cc and Bcc")
        if "ReplyTo" in j:
            _addrs(j["ReplyTo"], "ReplyTo", e)
        for k in ("Subject", "TextBody", "HtmlBody", "MessageStream", "Tag"):
            if k in j and not isinstance(j[k], str):
                e.append("%s: must be a string" % k)
        if not j.get("TextBody") and not j.get("HtmlBody"):
            e.append("Provide either email TextBody or HtmlBody or both.")
        for k, h in enumerate(j.get("Headers", [])):
            if not isinstance(h, dict) or set(h) != {"Name", "Value"} or not all(
                    isinstance(x, str) for x in h.values()) or not h["Name"]:
                e.append("Headers.%d: must be {Name, Value} strings" % k)
        for k, a in enumerate(j.get("Attachments", [])):
            where = "Attachments.%d" % k
            if not isinstance(a, dict):
                e.append(where + ": must be an object")
                continue
            for f in sorted(set(a) - {"Name", "Content", "ContentType", "ContentID"}):
                e.append("%s: unknown field %r" % (where, f))
            for f in ("Name", "ContentType"):
                if not isinstance(a.get(f), str) or not a[f]:
                    e.append("%s.%s: required" % (where, f))
            check_base64(a.get("Content"), where + ".Content", e)
            if "ContentID" in a and not (isinstance(a["ContentID"], str)
                                         and a["ContentID"].startswith("cid:")):
                e.append(where + ".ContentID: must be cid:<id>")
        return e

    def success(self, req):
        return 200, [("Content-Type", "application/json")], json.dumps(
            {"To": req.json.get("To"), "SubmittedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "MessageID": req.message_id, "ErrorCode": 0, "Message": "OK"})

    def error(self, kind, req):
        def err(status, code, msg):
            return status, [("Content-Type", "application/json")], json.dumps(
                {"ErrorCode": code, "Message": msg})
        if kind == "400":
            return err(422, 300, "fake postmark: the test rejected this message")
        if kind == "echo400":
            return err(422, 300, "Invalid token %s" % self.credential(req))
        if kind == "401":
            return err(401, 10, "No Account or Server API tokens were supplied in the HTTP headers.")
        if kind == "echo401":
            return err(401, 10, "Server token %s is not valid" % self.credential(req))
        if kind == "account":
            return err(422, 412, "Your account is pending approval.")
        if kind in ("429", "throttle"):
            return err(429, 429, "Rate limit exceeded")
        return err(500, 0, "Internal server error")


FAKE = FakePostmark
