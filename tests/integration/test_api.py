"""Integration tests of the api transport: gateway -> Redis -> router ->
api transport -> a fake of each provider's HTTPS API (fake_<provider>.py),
which checks every request against the provider's documentation (method,
path, authentication, content type, required fields, the SES signature
recomputed, the webhook HMAC recomputed) and answers as scripted.

Each test has its own redis-server and prefix (router_env.renv) and the
test CA of conftest.py (certs): the fakes serve HTTPS with it and the
routes trust it with ca_file.
"""

import base64
import email
import email.policy
import email.utils
import os
import re
import subprocess
import time
from email.message import EmailMessage

import pytest

import fake_api
from mftest import MAILFERRY_BIN, child_env
from router_env import RouterEnv, wait_until
from router_env import renv  # noqa: F401 (the fixture every test uses)

SENDER = "sender@x.test"
PROVIDERS = ["sendgrid", "postmark", "mailgun", "ses", "webhook"]
SECRETS = {
    "sendgrid": "SG.mf-test-key.4f9a8c7e1b2d",
    "postmark": "pm-token-71d2c0de-9a8b",
    "mailgun": "key-3ax6xnjp29jd6fds4gc373sgvjxteol0",
    "ses": "ses/Secret+Key/wJalrXUtnFEMI0123456",
    "webhook": "whsec-5e1f00d2-secret",
}
AWS_KEY_ID = "AKIDMAILFERRYTEST01"
JSON_PROVIDERS = ("sendgrid", "postmark")


# -- fakes and routes ---------------------------------------------------------------

@pytest.fixture
def fakes(certs):
    started = []

    def start(provider, **kw):
        extra = {"region": "eu-west-1", "access_key_id": AWS_KEY_ID} if provider == "ses" else {}
        extra.update(kw)
        f = fake_api.load(provider)(certs["cert"], certs["key"], SECRETS[provider], **extra).start()
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


def api_route(provider, fake, certs, workdir, priority=10, **keys):
    """[route api] keys for a provider pointed at its fake; secrets in files."""
    secret = workdir / ("%s.secret" % provider)
    secret.write_text(SECRETS[provider] + "\n")
    os.chmod(secret, 0o600)
    d = {"transport": "api", "provider": provider, "priority": priority,
         "base_url": fake.base_url + ("/hook" if provider == "webhook" else ""),
         "ca_file": certs["ca"], "timeout": 5, "connect_timeout": 2}
    if provider in ("sendgrid", "postmark", "mailgun"):
        d["api_key_file"] = str(secret)
    if provider == "mailgun":
        d["domain"] = "mg.test"
    if provider == "ses":
        idf = workdir / "ses.id"
        idf.write_text(AWS_KEY_ID + "\n")
        d.update(region="eu-west-1", access_key_id_file=str(idf), secret_key_file=str(secret))
    if provider == "webhook":
        d["webhook_secret_file"] = str(secret)
    d.update(keys)
    return d


# -- messages -----------------------------------------------------------------------

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489") + bytes(range(256))


def rich_message(to, cc, subject="Gr\u00fc\u00dfe aus K\u00f6ln \u2013 report"):
    """multipart/mixed: related(alternative(text, html), inline PNG), a PDF,
    a CSV; a DKIM-Signature that a JSON provider cannot carry; CRLF."""
    m = EmailMessage()
    m["DKIM-Signature"] = "v=1; a=rsa-sha256; d=x.test; s=s1; h=from:to:subject; bh=abc=; b=def="
    m["From"] = "\u00c4nne Sender <%s>" % SENDER
    m["To"] = ", ".join(to)
    if cc:
        m["Cc"] = ", ".join(cc)
    m["Subject"] = subject
    m["Message-ID"] = email.utils.make_msgid(domain="x.test")
    m["Date"] = email.utils.formatdate()
    m["X-Campaign"] = "spring-2024"
    m.set_content("Hello,\n\nplain text body: \u00e4\u00f6\u00fc \u20ac\nline three\n")
    m.add_alternative("<html><body><p>Hello <b>HTML</b> \u20ac</p>"
                      "<img src=\"cid:logo@x.test\"></body></html>\n", subtype="html")
    html = m.get_payload()[1]
    html.add_related(PNG, maintype="image", subtype="png", cid="<logo@x.test>")
    m.add_attachment(os.urandom(3000) + bytes(range(256)), maintype="application",
                     subtype="pdf", filename="report 2024.pdf")
    m.add_attachment("id;amount\r\n1;2\r\n", subtype="csv", filename="data.csv")
    return m.as_bytes(policy=email.policy.SMTP)


def simple_message(rcpt, subject="hello"):
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: %s\r\nDate: %s\r\n\r\n"
            "body of %s\r\n" % (SENDER, rcpt, subject, email.utils.make_msgid(domain="x.test"),
                                email.utils.formatdate(), subject)).encode()


def json_fields(provider, j):
    """The message fields a JSON provider's request carried, for
    fake_api.compare_fields()."""
    if provider == "sendgrid":
        content = {c["type"]: c["value"] for c in j["content"]}
        return {"subject": j.get("subject"), "text": content.get("text/plain"),
                "html": content.get("text/html"),
                "attachments": [(a["filename"], a.get("type"), base64.b64decode(a["content"]),
                                 a.get("content_id"), a.get("disposition") == "inline")
                                for a in j.get("attachments", [])]}
    return {"subject": j.get("Subject"), "text": j.get("TextBody"), "html": j.get("HtmlBody"),
            "attachments": [(a["Name"], a["ContentType"], base64.b64decode(a["Content"]),
                             a["ContentID"][4:] if "ContentID" in a else None, "ContentID" in a)
                            for a in j.get("Attachments", [])]}


def json_headers(provider, j):
    if provider == "sendgrid":
        return dict(j.get("headers", {}))
    return {h["Name"]: h["Value"] for h in j.get("Headers", [])}


# -- waiting ------------------------------------------------------------------------

def wait_results(renv, qid, rcpts, want, timeout=30):
    """Waits until every rcpt's latest event has result in want."""
    def done():
        evs = renv.events(qid)
        last = {}
        for e in evs:
            last[e["rcpt"].lower()] = e
        if all(r.lower() in last and last[r.lower()]["result"] in want for r in rcpts):
            return evs
        return None
    return wait_until(done, timeout, "results %s for %s" % (want, rcpts), interval=0.1,
                      diag=renv.diag)


def no_violations(fake):
    v = fake.violations()
    assert not v, "requests broke the %s documentation:\n%s" % (
        fake.provider, "\n".join("%s: %s" % x for x in v))


# -- 1. every provider end to end ------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
def test_delivers_through_each_provider(renv, fakes, certs, provider):
    """A rich message to To, Cc and Bcc recipients: the request matches the
    provider's documentation, carries exactly the envelope recipients, and
    (JSON providers) the subject, bodies and attachments of the original
    byte for byte; raw providers get the stored message unchanged. Each
    recipient's event says delivered with the provider's message id."""
    fake = fakes(provider)
    routes = {"api": api_route(provider, fake, certs, renv.dir)}
    cfg = renv.config("all", routes)
    mf = renv.start("mf", "all", cfg)
    to, cc, bcc = ["a@d.test", "b@d.test"], ["c@d.test"], ["hidden@d.test"]
    msg = rich_message(to, cc)
    qid = renv.submit(SENDER, to + cc + bcc, msg)
    evs = wait_results(renv, qid, to + cc + bcc, {"delivered", "failed"})
    assert {e["result"] for e in evs} == {"delivered"}, evs
    no_violations(fake)
    reqs = fake.accepted()
    sent_to = sorted(r for q in reqs for r in q.rcpts)
    assert sent_to == sorted(to + cc + bcc), sent_to

    if provider in JSON_PROVIDERS:
        # One request: the Bcc recipient rides as bcc, never visible.
        assert len(reqs) == 1
        roles = reqs[0].roles
        assert sorted(roles.get("to", [])) == to and roles.get("cc", []) == cc
        assert roles.get("bcc", []) == bcc
        diffs = fake_api.compare_fields(json_fields(provider, reqs[0].json), msg)
        assert not diffs, "\n".join(diffs)
        headers = json_headers(provider, reqs[0].json)
        orig = email.message_from_bytes(msg, policy=email.policy.default)
        assert headers.get("Message-ID") == orig["Message-ID"]
        assert headers.get("X-Campaign") == "spring-2024"
        assert "DKIM-Signature" not in headers and "Date" not in headers
    else:
        stored = renv.msg(qid).get("data") or b""
        for q in reqs:
            assert q.mime.endswith(msg), "the %s request does not carry the message unchanged" % provider
            # The only addition is the gateway's trace field.
            assert re.match(rb"^(Received: [^\r]*\r\n([ \t][^\r]*\r\n)*)+$", q.mime[:-len(msg)]), \
                q.mime[:-len(msg)][:300]
            if stored:
                assert q.mime == stored

    ids = {q.message_id for q in reqs}
    for e in evs:
        assert e["code"] == "250" and e["enh"] == "2.0.0", e
        assert any(i in e["text"] for i in ids), (e["text"], ids)
        assert e["remote"].startswith(provider + " 127.0.0.1:"), e
    line = mf.wait_log(r"event=api_result .*result=delivered")[0]
    assert "provider=%s" % provider in line


def test_keepalive_and_concurrency_cap(renv, fakes, certs):
    """40 messages with max_connections = 4: never more than 4 requests in
    flight, and connections are reused (keep-alive)."""
    fake = fakes("postmark")
    routes = {"api": api_route("postmark", fake, certs, renv.dir, max_connections=4)}
    renv.start("mf", "all", renv.config("all", routes, router={"concurrency": 50}))
    items = [(SENDER, ["r%d@d.test" % i], simple_message("r%d@d.test" % i, "m%d" % i))
             for i in range(40)]
    ids = renv.submit_many(items, connections=4)
    for qid, (_s, rc, _m) in zip(ids, items):
        wait_results(renv, qid, rc, {"delivered"})
    no_violations(fake)
    st = fake.stats()
    assert st["requests"] == 40
    assert st["max_inflight"] <= 4, st
    assert st["connections"] <= 8, "connections not reused: %r" % st


# -- 2. throttling, server errors, retries --------------------------------------------

@pytest.mark.parametrize("provider,mode,enh", [
    ("sendgrid", "429:1", "4.7.0"),
    ("ses", "throttle", "4.7.0"),
    ("ses", "429:1", "4.7.0"),
    ("mailgun", "500", "4.3.0"),
    ("postmark", "429:1", "4.7.0"),
    ("webhook", "500", "4.3.0"),
])
def test_temporary_errors_are_retried(renv, fakes, certs, provider, mode, enh):
    """429 (with Retry-After), SES throttling and 5xx defer the recipient
    (never bounce it); the retry delivers."""
    fake = fakes(provider)
    fake.set_mode(mode)
    # A rate limit is a throttle to the policy (docs/api.md): the domain
    # waits throttle_backoff on the route, 1 s here.
    routes = {"api": api_route(provider, fake, certs, renv.dir, throttle_backoff=1)}
    mf = renv.start("mf", "all", renv.config("all", routes))
    qid = renv.submit(SENDER, ["a@d.test"], simple_message("a@d.test"))
    evs = wait_results(renv, qid, ["a@d.test"], {"delivered", "failed"})
    evs = [e for e in evs if e["result"] != "held"]
    assert [e["result"] for e in evs] == ["deferred", "delivered"], evs
    assert evs[0]["code"] == "451" and evs[0]["enh"] == enh, evs[0]
    no_violations(fake)
    assert len(fake.requests()) == 2
    line = [l for l in mf.lines("api_result") if "result=deferred" in l][0]
    if mode.startswith("429") or mode == "throttle":
        assert "rate limited" in evs[0]["text"]
    if mode.startswith("429"):
        assert "retry_after_ms=1000" in line, line
    else:
        assert "retry_after_ms=0" in line, line


def test_permanent_error_bounces_with_provider_text(renv, fakes, certs):
    """A 4xx other than 429/401/403 fails the recipient for good; the DSN
    carries the provider's error text (and goes out through the API too)."""
    fake = fakes("mailgun")
    fake.set_mode("400")
    routes = {"api": api_route("mailgun", fake, certs, renv.dir)}
    renv.start("mf", "all", renv.config("all", routes))
    qid = renv.submit(SENDER, ["a@d.test"], simple_message("a@d.test"))
    evs = wait_results(renv, qid, ["a@d.test"], {"failed"})
    assert evs[-1]["code"] == "554" and evs[-1]["enh"] == "5.0.0"
    assert "fake mailgun: the test rejected this message" in evs[-1]["text"]
    bounce = wait_until(lambda: [r for r in fake.accepted() if r.rcpts == [SENDER]], 20,
                        "the bounce at the fake", diag=renv.diag)[0]
    assert b"multipart/report" in bounce.mime
    assert b"fake mailgun: the test rejected this message" in bounce.mime
    no_violations(fake)


# -- 3. account errors: the route steps aside ---------------------------------------------

@pytest.mark.parametrize("provider,mode", [
    ("sendgrid", "401"),
    ("ses", "account"),
    ("postmark", "account"),
    ("mailgun", "account"),
])
def test_account_error_moves_traffic_to_other_route(renv, fakes, certs, provider, mode):
    """401/403 and account errors (SES AccountSuspended, Postmark 412) make
    the api route unhealthy: the recipient is deferred (not bounced) and its
    retry, and new mail, go through the other route."""
    fake = fakes(provider)
    fake.set_mode(default=mode)
    mx = renv.mx("relay")
    routes = {"api": api_route(provider, fake, certs, renv.dir, priority=10),
              "relay": RouterEnv.smtp_route(mx, 20)}
    mf = renv.start("mf", "all", renv.config("all", routes))
    qid = renv.submit(SENDER, ["a@d.test"], simple_message("a@d.test", "first"))
    evs = wait_results(renv, qid, ["a@d.test"], {"delivered", "failed"})
    assert [(e["route"], e["result"]) for e in evs] == [("api", "deferred"), ("relay", "delivered")], evs
    assert evs[0]["code"] == "451" and "route marked unhealthy" in evs[0]["text"], evs[0]
    assert evs[1]["reason"].startswith("overflow:unhealthy"), evs[1]
    mf.wait_log(r"event=unhealthy .*provider=%s" % provider)
    n = len(fake.requests())
    qid2 = renv.submit(SENDER, ["b@d.test"], simple_message("b@d.test", "second"))
    evs2 = wait_results(renv, qid2, ["b@d.test"], {"delivered"})
    assert [(e["route"], e["reason"].split(":")[0]) for e in evs2] == [("relay", "overflow")], evs2
    assert len(fake.requests()) == n, "the unhealthy route was used again"
    assert len(mx.messages()) == 2
    no_violations(fake)


# -- 4. ambiguity ---------------------------------------------------------------------------

@pytest.mark.parametrize("provider,mode,text", [
    ("webhook", "timeout:3", "ambiguous: timeout after request sent"),
    ("webhook", "close", "ambiguous: connection lost after request sent"),
    ("mailgun", "timeout:3", "ambiguous: timeout after request sent"),
    ("sendgrid", "close", "ambiguous: connection lost after request sent"),
])
def test_no_answer_after_the_request_is_ambiguous(renv, fakes, certs, provider, mode, text):
    """A request that went out completely and got no answer (timeout, or the
    connection closed) may have been accepted: the recipient is deferred and
    recorded as ambiguous, not failed."""
    fake = fakes(provider)
    fake.set_mode(mode)
    routes = {"api": api_route(provider, fake, certs, renv.dir, timeout=1)}
    mf = renv.start("mf", "all", renv.config("all", routes))
    qid = renv.submit(SENDER, ["a@d.test"], simple_message("a@d.test"))
    evs = wait_results(renv, qid, ["a@d.test"], {"delivered"}, timeout=40)
    assert evs[0]["result"] == "deferred" and text in evs[0]["text"], evs[0]
    line = mf.wait_log(r"event=api_result .*result=ambiguous")[0]
    assert "ambiguous=1" in line
    # The request did reach the API: that is what makes it ambiguous.
    assert fake.requests()[0].mode == mode
    no_violations(fake)


# -- 5. secrets ------------------------------------------------------------------------------

def redis_dump(renv):
    """Every value of every key of the test's prefix, as bytes."""
    out = []
    for k in renv.redis("KEYS", renv.prefix + "*") or []:
        t = renv.redis("TYPE", k)
        t = t.decode() if isinstance(t, bytes) else t
        if t == "string":
            out.append(renv.redis("GET", k) or b"")
        elif t == "hash":
            out += renv.redis("HGETALL", k) or []
        elif t == "stream":
            for _id, fields in renv.redis("XRANGE", k, "-", "+") or []:
                out += fields
        elif t == "zset":
            out += renv.redis("ZRANGE", k, 0, -1) or []
        elif t == "list":
            out += renv.redis("LRANGE", k, 0, -1) or []
        elif t == "set":
            out += renv.redis("SMEMBERS", k) or []
        out.append(k)
    return b"\n".join(x if isinstance(x, bytes) else str(x).encode() for x in out)


def test_secrets_never_leak(renv, fakes, certs, monkeypatch):
    """API keys come from the environment or files and never reach a log
    line, an event, a DSN, a health reason or Redis, even when the provider
    echoes them back in an error text: SendGrid and SES refuse a message
    quoting the key (permanent failures, whose DSNs carry the text), the
    webhook refuses its secret quoting it (an account error: the route's
    health reason carries the text), and its mail goes on through SendGrid."""
    sg, ses, wh = fakes("sendgrid"), fakes("ses"), fakes("webhook")
    sg.set_mode("echo400")
    ses.set_mode("echo400")
    wh.set_mode("echo401")
    monkeypatch.setenv("MF_TEST_SENDGRID_KEY", SECRETS["sendgrid"])
    sg_route = api_route("sendgrid", sg, certs, renv.dir, priority=10)
    del sg_route["api_key_file"]
    sg_route["api_key_env"] = "MF_TEST_SENDGRID_KEY"
    routes = {"sg": sg_route,
              "ses": api_route("ses", ses, certs, renv.dir, priority=20),
              "wh": api_route("webhook", wh, certs, renv.dir, priority=30)}
    policy = {"pin.rcpt.ses.test": "ses", "pin.rcpt.wh.test": "wh"}
    mf = renv.start("mf", "all", renv.config("all", routes, policy=policy, log_level="debug"))
    q1 = renv.submit(SENDER, ["a@d.test"], simple_message("a@d.test", "sg"))
    q2 = renv.submit(SENDER, ["b@ses.test"], simple_message("b@ses.test", "ses"))
    q3 = renv.submit(SENDER, ["c@wh.test"], simple_message("c@wh.test", "wh"))
    wait_results(renv, q1, ["a@d.test"], {"failed"})
    wait_results(renv, q2, ["b@ses.test"], {"failed"})
    evs3 = wait_results(renv, q3, ["c@wh.test"], {"delivered"})
    assert [e["route"] for e in evs3] == ["wh", "sg"], evs3
    # The echoes did happen: each fake put its key into an error text.
    assert [r.mode for r in sg.requests()][:1] == ["echo400"]
    assert [r.mode for r in ses.requests()] == ["echo400"]
    assert [r.mode for r in wh.requests()] == ["echo401"]
    # Both DSNs went out (through SendGrid, the first route).
    wait_until(lambda: len([r for r in sg.accepted() if r.rcpts == [SENDER]]) >= 2, 20,
               "the two bounces", diag=renv.diag)
    mf.wait_log(r"event=route_health route=wh healthy=no")
    time.sleep(0.5)
    log = mf.log()
    dump = redis_dump(renv)
    bounces = b"".join(r.body for r in sg.requests() if r.rcpts == [SENDER])
    assert "[redacted]" in log
    assert b"[redacted]" in bounces and b"[redacted]" in dump
    for provider, secret in SECRETS.items():
        for s in (secret, base64.b64encode(("api:" + secret).encode()).decode()):
            assert s not in log, "%s secret in the log" % provider
            assert s.encode() not in dump, "%s secret in Redis" % provider
            assert s.encode() not in bounces, "%s secret in a bounce" % provider
    no_violations(sg)
    no_violations(ses)
    no_violations(wh)


def test_check_config_names_key_without_secret(renv, certs, tmp_path):
    """--check-config refuses a bad api route with one line naming the
    route and key, and never prints a secret."""
    secret = tmp_path / "k"
    secret.write_text(SECRETS["sendgrid"] + "\n")
    bad = [
        ({"provider": "sendgrid", "api_key_file": str(secret), "base_url": "http://127.0.0.1:1"},
         "[route api] base_url: must be an https:// URL"),
        ({"provider": "sendgrid", "api_key_file": str(secret), "domain": "x.test"},
         "[route api] domain: not used by provider sendgrid"),
        ({"provider": "ses", "region": "eu-west-1", "secret_key_file": str(secret)},
         "[route api] access_key_id_env: required for provider ses"),
        ({"provider": "sendgrid", "api_key_file": str(secret),
          "base_url": "https://u:%s@127.0.0.1" % SECRETS["sendgrid"]},
         "[route api] base_url: must not carry credentials"),
        ({"provider": "webhook", "webhook_secret_env": "MF_TEST_UNSET_SECRET",
          "base_url": "https://127.0.0.1/hook"},
         "[route api] webhook_secret_env: environment variable MF_TEST_UNSET_SECRET is not set"),
    ]
    for keys, want in bad:
        route = {"transport": "api", "priority": 10}
        route.update(keys)
        cfg = renv.config("check", {"api": route})
        p = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(cfg)],
                           capture_output=True, env=child_env(), timeout=20)
        out = (p.stdout + p.stderr).decode(errors="replace")
        assert p.returncode != 0, out
        assert want in out, out
        assert SECRETS["sendgrid"] not in out, out
