"""Fake SendGrid v3 Mail Send (POST /v3/mail/send), checked against the
Twilio SendGrid API reference "Mail Send": Bearer API key, a JSON body with
personalizations[].to (at least one) / cc / bcc of {email, name}, unique
addresses within a personalization, at most 1000 personalizations and 1000
recipients, from {email, name}, reply_to xor reply_to_list, a subject,
content[] of {type, value} (non-empty; text/plain first, then text/html),
attachments[] of {content (base64), filename, type, disposition
(inline|attachment), content_id (required when inline)}, and headers
without the reserved names. Success is 202 with X-Message-Id."""

import json
import time

from fake_api import FakeAPI, check_base64, check_common, check_email, check_json_body

TOP = {"personalizations", "from", "reply_to", "reply_to_list", "subject", "content",
       "attachments", "template_id", "headers", "categories", "custom_args", "send_at",
       "batch_id", "asm", "ip_pool_name", "mail_settings", "tracking_settings"}
PERSONALIZATION = {"to", "cc", "bcc", "from", "subject", "headers", "substitutions",
                   "dynamic_template_data", "custom_args", "send_at"}
# "You may not overwrite the following reserved headers" (Mail Send).
RESERVED = {"x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type",
            "content-transfer-encoding", "to", "from", "subject", "reply-to", "cc", "bcc"}


def _check_addr_obj(x, where, e):
    if not isinstance(x, dict) or "email" not in x:
        e.append("%s: must be an object with email" % where)
        return None
    check_email(x["email"], where + ".email", e)
    if "name" in x and not isinstance(x["name"], str):
        e.append("%s.name: must be a string" % where)
    extra = set(x) - {"email", "name"}
    if extra:
        e.append("%s: unknown fields %s" % (where, sorted(extra)))
    return x["email"]


class FakeSendGrid(FakeAPI):
    provider = "sendgrid"

    def validate(self, req):
        e = []
        check_common(req, "POST", "/v3/mail/send", e)
        if req.header("Authorization") != "Bearer " + self.secret:
            e.append("Authorization must be 'Bearer <API key>'")
        j = check_json_body(req, e)
        if j is None:
            return e
        for k in sorted(set(j) - TOP):
            e.append("unknown field %r" % k)
        pers = j.get("personalizations")
        if not isinstance(pers, list) or not 1 <= len(pers) <= 1000:
            e.append("personalizations: 1 to 1000 objects required")
            pers = []
        total = 0
        for i, p in enumerate(pers):
            if not isinstance(p, dict):
                e.append("personalizations.%d: must be an object" % i)
                continue
            for k in sorted(set(p) - PERSONALIZATION):
                e.append("personalizations.%d: unknown field %r" % (i, k))
            if not isinstance(p.get("to"), list) or not p["to"]:
                e.append("personalizations.%d.to: at least one recipient required" % i)
            seen = set()
            for role in ("to", "cc", "bcc"):
                if role not in p:
                    continue
                if not isinstance(p[role], list) or not p[role]:
                    e.append("personalizations.%d.%s: must be a non-empty array" % (i, role))
                    continue
                for k, x in enumerate(p[role]):
                    a = _check_addr_obj(x, "personalizations.%d.%s.%d" % (i, role, k), e)
                    if a is None:
                        continue
                    if a.lower() in seen:
                        e.append("personalizations.%d: %s appears twice (to, cc and bcc must "
                                 "be unique)" % (i, a))
                    seen.add(a.lower())
                    req.rcpts.append(a)
                    req.roles.setdefault(role, []).append(a)
            total += len(seen)
        if total > 1000:
            e.append("more than 1000 recipients")
        _check_addr_obj(j.get("from"), "from", e)
        if "reply_to" in j and "reply_to_list" in j:
            e.append("reply_to and reply_to_list are mutually exclusive")
        if "reply_to" in j:
            _check_addr_obj(j["reply_to"], "reply_to", e)
        for k, x in enumerate(j.get("reply_to_list", [])):
            _check_addr_obj(x, "reply_to_list.%d" % k, e)
        if not (isinstance(j.get("subject"), str) and j["subject"]) and not (
                pers and all(isinstance(p, dict) and p.get("subject") for p in pers)):
            e.append("subject: required (at least one character)")
        content = j.get("content")
        if not isinstance(content, list) or not content:
            e.append("content: at least one {type, value} required")
            content = []
        types = []
        for k, c in enumerate(content):
            if not isinstance(c, dict) or set(c) != {"type", "value"}:
                e.append("content.%d: must be exactly {type, value}" % k)
                continue
            if not isinstance(c["type"], str) or not c["type"]:
                e.append("content.%d.type: required" % k)
            if not isinstance(c["value"], str) or not c["value"]:
                e.append("content.%d.value: at least one character" % k)
            types.append(c["type"])
        if "text/plain" in types and types[0] != "text/plain":
            e.append("content: text/plain must be first")
        if "text/html" in types and types.index("text/html") != (1 if "text/plain" in types else 0):
            e.append("content: text/html must follow text/plain")
        for k, a in enumerate(j.get("attachments", [])):
            where = "attachments.%d" % k
            if not isinstance(a, dict):
                e.append(where + ": must be an object")
                continue
            for f in sorted(set(a) - {"content", "filename", "type", "disposition", "content_id"}):
                e.append("%s: unknown field %r" % (where, f))
            check_base64(a.get("content"), where + ".content", e)
            if not isinstance(a.get("filename"), str) or not a["filename"]:
                e.append(where + ".filename: required")
            if "type" in a and (not isinstance(a["type"], str) or not a["type"]):
                e.append(where + ".type: must be a MIME type")
            if a.get("disposition", "attachment") not in ("inline", "attachment"):
                e.append(where + ".disposition: inline or attachment")
            if a.get("disposition") == "inline" and not a.get("content_id"):
                e.append(where + ".content_id: required for an inline attachment")
        h = j.get("headers", {})
        if not isinstance(h, dict):
            e.append("headers: must be an object")
            h = {}
        for k, v in h.items():
            if not isinstance(v, str):
                e.append("headers.%s: value must be a string" % k)
            if k.lower() in RESERVED:
                e.append("headers.%s: a reserved header" % k)
        return e

    def success(self, req):
        return 202, [("X-Message-Id", req.message_id)], b""

    def error(self, kind, req):
        def errs(status, msg, field=None, extra=()):
            return status, [("Content-Type", "application/json")] + list(extra), json.dumps(
                {"errors": [{"message": msg, "field": field, "help": None}]})
        if kind == "400":
            return errs(400, "fake sendgrid: the test rejected this message",
                        "personalizations.0.to.0.email")
        if kind == "echo400":
            return errs(400, "invalid key %s for this message" % self.credential(req))
        if kind == "401":
            return errs(401, "The provided authorization grant is invalid, expired, or revoked")
        if kind == "echo401":
            return errs(401, "API key %s is invalid" % self.credential(req))
        if kind == "account":
            return errs(403, "The from address does not match a verified Sender Identity.", "from")
        if kind in ("429", "throttle"):
            return errs(429, "too many requests", None,
                        [("X-RateLimit-Reset", str(int(time.time()) + 1))])
        return errs(500, "internal error")


FAKE = FakeSendGrid
