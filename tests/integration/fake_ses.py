"""Fake Amazon SES API v2 SendEmail (POST /v2/email/outbound-emails),
checked against the Amazon SES API Reference and the Signature Version 4
documentation: the Authorization header is recomputed here with hashlib and
hmac from the request as received (canonical request, string to sign,
signing key of the test secret, service "ses", the configured region), the
X-Amz-Date must be within 5 minutes, and the JSON body must be a SendEmail
request with Content of exactly one kind (Raw.Data base64 here) and
Destination address lists (at most 50 recipients). Success is 200
{"MessageId": "..."}; errors name their type in X-Amzn-ErrorType."""

import calendar
import hashlib
import hmac
import json
import re
import time
import urllib.parse

from fake_api import FakeAPI, check_base64, check_common, check_email, check_json_body

FIELDS = {"FromEmailAddress", "FromEmailAddressIdentityArn", "Destination", "ReplyToAddresses",
          "FeedbackForwardingEmailAddress", "FeedbackForwardingEmailAddressIdentityArn",
          "Content", "EmailTags", "ConfigurationSetName", "ListManagementOptions", "EndpointId"}
AUTH_RE = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                     r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$")


def _enc(s):
    return urllib.parse.quote(s, safe="-_.~")


def canonical_request(req, signed):
    """The SigV4 canonical request of what arrived (AWS: URI-encode each
    path segment of the request's path once more; query names and values
    encoded and sorted; headers lower-case, trimmed, blanks folded,
    repeated ones joined with commas)."""
    segs = [s for s in req.path.split("/") if s not in ("", ".")]
    uri = "/" + "/".join(_enc(s) for s in segs) + ("/" if req.path.endswith("/") and segs else "")
    q = sorted((_enc(k), _enc(v)) for k, v in urllib.parse.parse_qsl(req.query, keep_blank_values=True))
    lines = [req.method, uri, "&".join("%s=%s" % kv for kv in q)]
    for name in signed:
        vals = [" ".join(v.split()) for v in req.header_all(name)]
        lines.append("%s:%s" % (name, ",".join(vals)))
    lines += ["", ";".join(signed), hashlib.sha256(req.body).hexdigest()]
    return "\n".join(lines)


def sign(secret, date8, region, service, sts):
    k = hmac.new(("AWS4" + secret).encode(), date8.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    return hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()


class FakeSES(FakeAPI):
    provider = "ses"

    def __init__(self, *a, region="eu-west-1", access_key_id="AKIDTEST", session_token=None,
                 configuration_set=None, **kw):
        super().__init__(*a, **kw)
        self.region = region
        self.access_key_id = access_key_id
        self.session_token = session_token
        self.configuration_set = configuration_set

    def check_signature(self, req, e):
        auth = req.header("Authorization") or ""
        m = AUTH_RE.match(auth)
        if not m:
            e.append("Authorization is not an AWS4-HMAC-SHA256 header: %r" % auth[:80])
            return
        akid, date8, region, service, signed, sig = m.groups()
        signed = signed.split(";")
        amz = req.header("X-Amz-Date") or ""
        if not re.match(r"^\d{8}T\d{6}Z$", amz):
            e.append("X-Amz-Date missing or malformed: %r" % amz)
            return
        if abs(calendar.timegm(time.strptime(amz, "%Y%m%dT%H%M%SZ")) - time.time()) > 300:
            e.append("X-Amz-Date more than 5 minutes off")
        if akid != self.access_key_id:
            e.append("Credential: access key id %r" % akid)
        if date8 != amz[:8] or region != self.region or service != "ses":
            e.append("Credential scope %s/%s/%s must be %s/%s/ses" % (date8, region, service,
                                                                       amz[:8], self.region))
        if signed != sorted(signed) or "host" not in signed or "x-amz-date" not in signed:
            e.append("SignedHeaders must be sorted and include host and x-amz-date")
        if self.session_token is not None:
            if req.header("X-Amz-Security-Token") != self.session_token:
                e.append("X-Amz-Security-Token missing or wrong")
            if "x-amz-security-token" not in signed:
                e.append("the session token must be signed")
        creq = canonical_request(req, signed)
        sts = "\n".join(["AWS4-HMAC-SHA256", amz, "%s/%s/%s/aws4_request" % (date8, region, service),
                         hashlib.sha256(creq.encode()).hexdigest()])
        want = sign(self.secret, date8, region, service, sts)
        if not hmac.compare_digest(want, sig):
            e.append("SignatureDoesNotMatch: recomputed %s, got %s; canonical request:\n%s"
                     % (want, sig, creq))

    def validate(self, req):
        e = []
        check_common(req, "POST", "/v2/email/outbound-emails", e)
        self.check_signature(req, e)
        j = check_json_body(req, e)
        if j is None:
            return e
        for k in sorted(set(j) - FIELDS):
            e.append("unknown field %r" % k)
        content = j.get("Content")
        if not isinstance(content, dict) or len(set(content) & {"Simple", "Raw", "Template"}) != 1:
            e.append("Content: exactly one of Simple, Raw, Template")
        elif "Raw" in content:
            raw = content["Raw"]
            if not isinstance(raw, dict) or set(raw) != {"Data"}:
                e.append("Content.Raw: must be {Data}")
            else:
                req.mime = check_base64(raw["Data"], "Content.Raw.Data", e)
        dest = j.get("Destination", {})
        if not isinstance(dest, dict) or set(dest) - {"ToAddresses", "CcAddresses", "BccAddresses"}:
            e.append("Destination: only ToAddresses, CcAddresses, BccAddresses")
            dest = {}
        for k, v in dest.items():
            if not isinstance(v, list):
                e.append("Destination.%s: must be a list" % k)
                continue
            for a in v:
                check_email(a, "Destination.%s" % k, e)
                req.rcpts.append(a)
        if not req.rcpts or len(req.rcpts) > 50:
            e.append("Destination: 1 to 50 recipients")
        if self.configuration_set is not None and j.get("ConfigurationSetName") != self.configuration_set:
            e.append("ConfigurationSetName must be %r" % self.configuration_set)
        return e

    def success(self, req):
        return 200, [("Content-Type", "application/json")], json.dumps({"MessageId": req.message_id})

    def error(self, kind, req):
        def err(status, typ, msg):
            return status, [("Content-Type", "application/json"),
                            ("X-Amzn-ErrorType", typ + ":http://internal.amazon.com/coral/com.amazonaws.sesv2/")], \
                json.dumps({"message": msg})
        if kind == "400":
            return err(400, "MessageRejected", "fake ses: the test rejected this message")
        if kind == "echo400":
            return err(400, "BadRequestException", "secret %s is not allowed" % self.credential(req))
        if kind == "401":
            return err(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
        if kind == "echo401":
            return err(403, "SignatureDoesNotMatch", "secret %s does not match" % self.credential(req))
        if kind == "account":
            return err(400, "AccountSuspendedException", "Your account has been suspended.")
        if kind == "throttle":
            return err(400, "LimitExceededException", "Maximum sending rate exceeded.")
        if kind == "429":
            return err(429, "TooManyRequestsException", "Too many requests.")
        return err(500, "InternalFailure", "internal failure")


FAKE = FakeSES
