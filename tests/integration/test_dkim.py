"""DKIM signing in the gateway and "mailferryctl dkim keygen / dns check".

Keys come from "mailferryctl dkim keygen" (RSA 2048 and Ed25519). The
gateway signs what it accepts; the stored message is read from Redis and
verified by independent verifiers: Python's dkim package (python3-dkim,
python3-nacl for Ed25519) with the public keys served by dnsmasq on
loopback, and opendkim-testmsg, run inside private network and mount
namespaces where dnsmasq answers as the system resolver. Messages: an
8-bit body, long folded header fields, a multipart body, one without Date
and Message-ID (which the gateway adds, and signs). A changed body fails
verification. Keys are refused when group-readable, and reloaded on
SIGHUP. "dns check" runs against dnsmasq zones that are right, broken and
silent, with the verdicts and exit codes checked.
"""

import json
import os
import re
import signal
import stat
import subprocess
import time

import dkim
import pytest

from conftest import free_port
from dkim_dns import Dnsmasq, Zone, namespaces_available, opendkim_verify
from mftest import MAILFERRY_BIN, REPO, RawSMTP, child_env, dot_stuff, queued_id, split_added

MAILFERRYCTL_BIN = os.environ.get("MAILFERRYCTL_BIN", os.path.join(REPO, "build", "mailferryctl"))
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error",
                     "UndefinedBehaviorSanitizer")
DOMAIN = "example.test"
RELAY_IP = "192.0.2.10"
RELAY_NAME = "relay.example.test"


def ctl(*args, config=None, check_sanitizers=True):
    """Runs mailferryctl; returns (exit status, stdout, stderr)."""
    cmd = [MAILFERRYCTL_BIN]
    if config is not None:
        cmd += ["--config", str(config)]
    p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, env=child_env(),
                       timeout=120)
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    if check_sanitizers:
        for m in SANITIZER_MARKERS:
            assert m not in err, err
    return p.returncode, out, err


def record_of(keygen_output):
    m = re.search(r"value \(DNS panels join long values themselves\):\n  (.*)\n", keygen_output)
    assert m, keygen_output
    return m.group(1)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A keys_dir with an RSA (mf1) and an Ed25519 (mf2) key for
    example.test, made by mailferryctl; returns (dir, {selector: record})."""
    d = tmp_path_factory.mktemp("dkimkeys")
    os.chmod(d, 0o700)
    records = {}
    for sel, typ in (("mf1", "rsa"), ("mf2", "ed25519")):
        rc, out, err = ctl("dkim", "keygen", DOMAIN, sel, "--type", typ, "--dir", d)
        assert rc == 0, err
        records[sel] = record_of(out)
    return d, records


def good_zone(records):
    z = Zone()
    for sel, rec in records.items():
        z.add_txt("%s._domainkey.%s" % (sel, DOMAIN), rec)
    z.add_txt(DOMAIN, "v=spf1 ip4:%s include:spf.api.example -all" % RELAY_IP)
    z.add_txt("spf.api.example", "v=spf1 ip4:198.51.100.0/24 ~all")
    z.add_txt("_dmarc." + DOMAIN, "v=DMARC1; p=reject; rua=mailto:dmarc@example.test")
    z.add_ptr(RELAY_IP, RELAY_NAME)
    z.add_host(RELAY_NAME, RELAY_IP)
    return z


@pytest.fixture
def dns_good(keys):
    srv = Dnsmasq(good_zone(keys[1])).start()
    yield srv
    srv.stop()


# -- helpers -------------------------------------------------------------------

def submit(gw, msg, sender="sender@example.test", rcpt="rcpt@dest.test", params=""):
    """Sends msg on the plain listener; returns the queue id."""
    c = RawSMTP(gw.plain)
    try:
        c.greeting()
        c.ehlo()
        r = c.cmd("MAIL FROM:<%s>%s" % (sender, params))
        assert r.code == 250, c.show()
        assert c.cmd("RCPT TO:<%s>" % rcpt).code == 250, c.show()
        assert c.cmd("DATA").code == 354, c.show()
        c.send(dot_stuff(msg))
        r = c.reply(timeout=15)
        assert r.code == 250, c.show()
        qid = queued_id(r.text)
        c.cmd("QUIT")
        return qid
    finally:
        c.close()


def split_signatures(data):
    """(list of DKIM-Signature fields, the rest) of a stored message."""
    sigs = []
    while data.startswith(b"DKIM-Signature:"):
        end = 0
        while True:
            nl = data.find(b"\r\n", end)
            assert nl >= 0, data[:300]
            end = nl + 2
            if data[end:end + 1] not in (b" ", b"\t"):
                break
        sigs.append(data[:end])
        data = data[end:]
    return sigs, data


def tags(field):
    text = re.sub(rb"\r\n[ \t]", b" ", field).decode()
    text = text.split(":", 1)[1]
    out = {}
    for part in text.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = re.sub(r"\s+", "", v)
    return out


def verify_each(data, dnsfunc):
    """Verifies every DKIM-Signature of data separately; returns the list
    of results."""
    n = len(split_signatures(data)[0])
    out = []
    for i in range(n):
        try:
            out.append(bool(dkim.DKIM(data).verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.ValidationError:
            # A body hash mismatch is raised rather than returned.
            out.append(False)
    return out


def tamper(data):
    """The message with one body character changed."""
    i = data.index(b"\r\n\r\n") + 4
    j = data.index(b"a", i) if b"a" in data[i:] else i
    return data[:j] + (b"b" if data[j:j + 1] != b"b" else b"c") + data[j + 1:]


MESSAGES = {
    "8bit": ("From: Sender <sender@example.test>\r\n"
             "To: Empf\xc3\xa4nger <rcpt@dest.test>\r\n"
             "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
             "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
             "Message-ID: <8bit@example.test>\r\n"
             "MIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n"
             "\r\n"
             "Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln \xe2\x80\x94 \xc3\xa7a va?   \r\n"
             "Trailing\ttabs\t and  runs   of spaces \t\r\n"
             "\r\n\r\n").encode("latin-1"),
    "folded": ("From: \"A very long display name, with a comma\"\r\n"
               " <sender@example.test>\r\n"
               "To: one@dest.test, two@dest.test, three@dest.test,\r\n"
               "\tfour@dest.test, five@dest.test\r\n"
               "Subject: a subject that is long enough to be folded over several lines by\r\n"
               " a well-behaved mail user agent, and then folded\r\n"
               "\tonce more with a tab\r\n"
               "References: " + "\r\n ".join("<ref-%03d@long.host.name.example>" % i
                                            for i in range(120)) + "\r\n"
               "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
               "Message-ID: <folded@example.test>\r\n"
               "\r\n"
               "body of the folded message\r\n").encode(),
    "multipart": ("From: sender@example.test\r\n"
                  "To: rcpt@dest.test\r\n"
                  "Subject: multipart\r\n"
                  "Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
                  "Message-ID: <multi@example.test>\r\n"
                  "MIME-Version: 1.0\r\n"
                  "Content-Type: multipart/mixed; boundary=\"outer\"\r\n"
                  "\r\n"
                  "This is a multi-part message in MIME format.\r\n"
                  "--outer\r\n"
                  "Content-Type: multipart/alternative; boundary=\"inner\"\r\n"
                  "\r\n"
                  "--inner\r\n"
                  "Content-Type: text/plain; charset=us-ascii\r\n"
                  "\r\n"
                  "plain part\r\n"
                  "--inner\r\n"
                  "Content-Type: text/html; charset=us-ascii\r\n"
                  "\r\n"
                  "<p>html part</p>\r\n"
                  "--inner--\r\n"
                  "--outer\r\n"
                  "Content-Type: application/octet-stream; name=\"a.bin\"\r\n"
                  "Content-Transfer-Encoding: base64\r\n"
                  "Content-Disposition: attachment; filename=\"a.bin\"\r\n"
                  "\r\n" +
                  "\r\n".join(["AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKiss"] * 20) +
                  "\r\n--outer--\r\n").encode(),
    # No Date and no Message-ID: the gateway adds both, and signs them.
    "bare": ("From: sender@example.test\r\n"
             "To: rcpt@dest.test\r\n"
             "Subject: without date\r\n"
             "\r\n"
             "hello\r\n").encode(),
}


def start_signing_gateway(start_gateway, keys_dir, **kw):
    return start_gateway(**{"dkim.keys_dir": str(keys_dir)}, **kw)


# -- keygen ---------------------------------------------------------------------

def test_keygen_writes_safe_keys_and_prints_records(tmp_path):
    d = tmp_path / "k"
    d.mkdir()
    rc, out, err = ctl("dkim", "keygen", "Example.ORG", "s1", "--dir", d)
    assert rc == 0, err
    path = d / "example.org.s1.rsa.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert "s1._domainkey.example.org" in out
    rec = record_of(out)
    assert rec.startswith("v=DKIM1; k=rsa; p=MIIBIjANBg"), rec   # 2048-bit SPKI
    # The zone-file form splits the key into strings of at most 255 octets.
    strings = re.findall(r'"([^"]*)"', out.split("zone file:")[1].split("\n\n")[0])
    assert len(strings) >= 2 and all(len(s) <= 255 for s in strings), strings
    assert "".join(strings) == rec

    rc, out, err = ctl("dkim", "keygen", "example.org", "s2", "--type", "ed25519", "--dir", d)
    assert rc == 0, err
    rec = record_of(out)
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", rec), rec
    assert stat.S_IMODE(os.stat(d / "example.org.s2.ed25519.key").st_mode) == 0o600

    # Never over an existing key; bad arguments are usage errors.
    before = (d / "example.org.s2.ed25519.key").read_bytes()
    rc, _, err = ctl("dkim", "keygen", "example.org", "s2", "--type", "ed25519", "--dir", d)
    assert rc == 1 and "File exists" in err, err
    assert (d / "example.org.s2.ed25519.key").read_bytes() == before
    for args in (["example.org"], ["example.org", "s3", "--type", "dsa"],
                 ["example.org", "s3", "--bits", "512"], ["nodot", "s3"],
                 ["example.org", "bad selector"], ["example.org", "a.b", "--dir", str(d)]):
        rc, _, err = ctl("dkim", "keygen", *args, "--dir", d) if "--dir" not in args else \
            ctl("dkim", "keygen", *args)
        assert rc == 2, (args, err)

    # --out writes elsewhere and prints the key_table line.
    out_path = tmp_path / "custom.pem"
    rc, out, err = ctl("dkim", "keygen", "example.org", "sel.2024", "--out", out_path)
    assert rc == 0, err
    assert "example.org sel.2024 rsa %s" % out_path in out


def test_keygen_uses_keys_dir_of_config(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    conf = tmp_path / "m.conf"
    conf.write_text("[dkim]\nkeys_dir = %s\n" % d)
    rc, out, err = ctl("dkim", "keygen", "example.net", "mail", config=conf)
    assert rc == 0, err
    assert (d / "example.net.mail.rsa.key").exists()
    rc, out, err = ctl("dkim", "records", config=conf)
    assert rc == 0, err
    assert "example.net selector mail (rsa, 2048 bits)" in out
    conf.write_text("[dkim]\n")
    rc, _, err = ctl("dkim", "keygen", "example.net", "mail2", config=conf)
    assert rc == 2 and "keys_dir is not set" in err, err


# -- signing --------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_signed_and_verified_by_python_dkim(start_gateway, keys, dns_good, kind):
    """Both signatures (rsa-sha256 first, then ed25519-sha256) verify with
    the keys served by DNS; the message behind them is the one sent."""
    gw = start_signing_gateway(start_gateway, keys[0])
    sent = MESSAGES[kind]
    qid = submit(gw, sent, params=" BODY=8BITMIME" if kind == "8bit" else "")
    data = gw.stored(qid)["data"]
    sigs, rest = split_signatures(data)
    assert len(sigs) == 2, data[:600]
    t0, t1 = tags(sigs[0]), tags(sigs[1])
    assert t0["a"] == "rsa-sha256" and t1["a"] == "ed25519-sha256"
    for t, sel in ((t0, "mf1"), (t1, "mf2")):
        assert t["c"] == "relaxed/relaxed" and t["d"] == DOMAIN and t["s"] == sel
        h = [x.lower() for x in t["h"].split(":")]
        # From is oversigned: listed once more than it occurs.
        assert h.count("from") == 2, h
        for name in ("to", "subject", "date", "message-id"):
            assert name in h, h
    # Every line of the signature fields ends in CRLF and stays within 998.
    for s in sigs:
        assert b"\n" not in s.replace(b"\r\n", b"")
        assert all(len(line) <= 998 for line in s.split(b"\r\n"))
    added, body = split_added(rest, sent)
    assert body == sent
    assert [n for n, _ in added][0] == "received"

    assert verify_each(data, dns_good.dnsfunc()) == [True, True]
    assert verify_each(tamper(data), dns_good.dnsfunc()) == [False, False]


def test_signed_with_smtputf8_header(start_gateway, keys, dns_good):
    """An internationalised message (RFC 6532 UTF-8 header fields)."""
    gw = start_signing_gateway(start_gateway, keys[0])
    sent = ("From: J\u00f6rg <sender@example.test>\r\nTo: r@dest.test\r\n"
            "Subject: \u00dcbersicht \u2014 caf\u00e9\r\n\r\nK\u00f6ln\r\n").encode()
    qid = submit(gw, sent, params=" SMTPUTF8 BODY=8BITMIME")
    data = gw.stored(qid)["data"]
    assert verify_each(data, dns_good.dnsfunc()) == [True, True]


@pytest.mark.skipif(not namespaces_available(),
                    reason="opendkim-testmsg needs unshare (network and mount namespaces)")
@pytest.mark.parametrize("kind", ["8bit", "multipart"])
def test_verified_by_opendkim_testmsg(start_gateway, keys, kind):
    """opendkim-testmsg verifies each signature on its own (the message
    with only that DKIM-Signature), and fails a changed body. It reads
    with DKIM_LIBFLAGS_STRICTHDRS, so it also checks that the stored
    message has the header fields RFC 5322 requires (Date, From)."""
    gw = start_signing_gateway(start_gateway, keys[0])
    qid = submit(gw, MESSAGES[kind], params=" BODY=8BITMIME")
    data = gw.stored(qid)["data"]
    sigs, rest = split_signatures(data)
    zone = good_zone(keys[1])
    for s in sigs:
        rc, out = opendkim_verify(zone, s + rest)
        assert rc == 0, out
    for s in sigs:
        rc, out = opendkim_verify(zone, tamper(s + rest))
        assert rc != 0 and "Bad signature" in out, out


def test_domain_without_key_is_not_signed(start_gateway, keys):
    gw = start_signing_gateway(start_gateway, keys[0])
    sent = b"From: x@other.example\r\nTo: r@dest.test\r\nSubject: s\r\n\r\nhi\r\n"
    qid = submit(gw, sent, sender="x@other.example")
    data = gw.stored(qid)["data"]
    assert b"DKIM-Signature" not in data
    deadline = time.monotonic() + 5
    while "event=dkim_unsigned" not in gw.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = [l for l in gw.stderr().splitlines() if "event=dkim_unsigned" in l]
    assert line and "id=%s" % qid in line[0] and "domain=other.example" in line[0], line


def test_subdomain_and_envelope_fallback(start_gateway, keys, dns_good):
    """From: a subdomain signs with the parent's key (relaxed alignment);
    no From: domain key falls back to the envelope sender's domain."""
    gw = start_signing_gateway(start_gateway, keys[0])
    qid = submit(gw, b"From: n@news.example.test\r\nSubject: s\r\n\r\nhi\r\n")
    sigs, _ = split_signatures(gw.stored(qid)["data"])
    assert [tags(s)["d"] for s in sigs] == [DOMAIN, DOMAIN]
    qid = submit(gw, b"From: x@unsigned.example\r\nSubject: s\r\n\r\nhi\r\n",
                 sender="bounce@example.test")
    data = gw.stored(qid)["data"]
    assert verify_each(data, dns_good.dnsfunc()) == [True, True]


def test_group_readable_key_refused(start_gateway, keys, tmp_path):
    """A key readable by the group stops the gateway at start, and
    --check-config says which file and why."""
    d = tmp_path / "lax"
    d.mkdir()
    bad = d / "example.test.mf9.rsa.key"
    bad.write_bytes((keys[0] / "example.test.mf1.rsa.key").read_bytes())
    os.chmod(bad, 0o640)
    gw = start_gateway(start=False, **{"dkim.keys_dir": str(d)})
    p = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(gw.config_path)],
                       capture_output=True, env=child_env(), timeout=30)
    err = p.stderr.decode()
    assert p.returncode != 0
    assert str(bad) in err and "mode 0640" in err and "chmod 600" in err, err
    p = subprocess.run([MAILFERRY_BIN, "gateway", "--config", str(gw.config_path)],
                       capture_output=True, env=child_env(), timeout=30)
    assert p.returncode != 0 and "readable or writable by group or others" in p.stderr.decode()


def test_keys_reload_on_sighup(start_gateway, keys, dns_good, tmp_path):
    """SIGHUP loads new keys; a reload that fails keeps the old ones."""
    d = tmp_path / "reload"
    d.mkdir()
    os.chmod(d, 0o700)
    rsa = d / "example.test.mf1.rsa.key"
    rsa.write_bytes((keys[0] / "example.test.mf1.rsa.key").read_bytes())
    os.chmod(rsa, 0o600)
    gw = start_gateway(**{"dkim.keys_dir": str(d)})
    msg = MESSAGES["bare"]
    sigs, _ = split_signatures(gw.stored(submit(gw, msg))["data"])
    assert [tags(s)["a"] for s in sigs] == ["rsa-sha256"]

    ed = d / "example.test.mf2.ed25519.key"
    ed.write_bytes((keys[0] / "example.test.mf2.ed25519.key").read_bytes())
    os.chmod(ed, 0o600)
    gw.signal(signal.SIGHUP)
    wait_log(gw, "event=reload result=ok", 1)
    data = gw.stored(submit(gw, msg))["data"]
    sigs, _ = split_signatures(data)
    assert [tags(s)["a"] for s in sigs] == ["rsa-sha256", "ed25519-sha256"]
    assert verify_each(data, dns_good.dnsfunc()) == [True, True]

    os.chmod(ed, 0o644)
    gw.signal(signal.SIGHUP)
    wait_log(gw, "event=reload result=fail", 1)
    assert "readable or writable by group or others" in gw.stderr()
    sigs, _ = split_signatures(gw.stored(submit(gw, msg))["data"])
    assert len(sigs) == 2


def wait_log(gw, needle, count, timeout=10):
    deadline = time.monotonic() + timeout
    while gw.stderr().count(needle) < count:
        assert time.monotonic() < deadline, "no %r in:\n%s" % (needle, gw.stderr())
        time.sleep(0.05)


# -- dns check ---------------------------------------------------------------------

def check_config(tmp_path, keys_dir, resolver, extra=""):
    conf = tmp_path / "check.conf"
    conf.write_text("[dkim]\nkeys_dir = %s\n\n[dns]\nresolver = %s\ntimeout = 500\n"
                    "relay_ip = %s\nrelay_hostname = %s\n"
                    "dnsbl_zones = bl.example.test, bl2.example.test\n"
                    "spf_includes = spf.api.example\n%s"
                    % (keys_dir, resolver, RELAY_IP, RELAY_NAME, extra))
    return conf


def rows(out):
    """{check: (result, detail)} from the table."""
    table = out.split("\n\n")[1]
    res = {}
    for line in table.splitlines()[1:]:
        m = re.match(r"(.+?)\s{2,}(OK|WARN|FAIL|SKIP)\s+(.*)$", line)
        assert m, line
        res[m.group(1)] = (m.group(2), m.group(3))
    return res


def test_dns_check_good_zone(keys, dns_good, tmp_path):
    conf = check_config(tmp_path, keys[0], dns_good.server)
    rc, out, err = ctl("dns", "check", DOMAIN, config=conf)
    assert rc == 0, out + err
    r = rows(out)
    assert set(v for v, _ in r.values()) == {"OK"}, out
    assert r["SPF authorises %s" % RELAY_IP][1].startswith("pass (ip4:%s matched" % RELAY_IP)
    assert r["SPF includes spf.api.example"][0] == "OK"
    assert "matches the private key (rsa, 2048 bits)" in r["DKIM mf1 (rsa)"][1]
    assert "matches the private key (ed25519" in r["DKIM mf2 (ed25519)"][1]
    assert "policy reject" in r["DMARC"][1]
    assert "forward-confirmed" in r["PTR %s" % RELAY_IP][1]
    assert r["DNSBL bl.example.test"] == ("OK", "%s is not listed" % RELAY_IP)
    assert "sender authentication is in order" in out

    rc, out, err = ctl("--json", "dns", "check", DOMAIN, config=conf)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["failed"] == 0 and doc["domain"] == DOMAIN
    assert {c["result"] for c in doc["checks"]} == {"OK"}


def test_dns_check_broken_zone(keys, tmp_path):
    """Every check broken in its own way: exit 1 and a fix for each."""
    z = Zone()
    z.add_txt("mf1._domainkey." + DOMAIN, keys[1]["mf2"])           # the other key
    # mf2 missing; two SPF records at a sub-zone are checked below.
    z.add_txt(DOMAIN, "v=spf1 a mx ?all")
    z.add_host(DOMAIN, "192.0.2.99")
    z.add_txt("_dmarc." + DOMAIN, "v=DMARC1; p=none")
    z.add_ptr(RELAY_IP, "wrong.example.test")
    z.add_host("wrong.example.test", "192.0.2.99")
    z.add_host("10.2.0.192.bl.example.test", "127.0.0.2")
    z.add_txt("10.2.0.192.bl.example.test", "Listed since yesterday")
    z.add_host("10.2.0.192.bl2.example.test", "127.255.255.254")
    srv = Dnsmasq(z).start()
    try:
        # An API route: its provider's SPF include is required too.
        conf = check_config(tmp_path, keys[0], srv.server,
                            "\n[route api]\ntransport = api\nprovider = postmark\n")
        rc, out, err = ctl("dns", "check", DOMAIN, config=conf)
    finally:
        srv.stop()
    assert rc == 1, out + err
    r = rows(out)
    assert r["SPF includes spf.mtasv.net"] == ("FAIL", "include:spf.mtasv.net is missing")
    assert r["SPF record"][0] == "WARN"                 # ?all
    assert r["SPF authorises %s" % RELAY_IP][0] == "FAIL"
    assert r["SPF authorises %s" % RELAY_IP][1].startswith("neutral")
    assert r["SPF includes spf.api.example"] == ("FAIL", "include:spf.api.example is missing")
    assert r["DKIM mf1 (rsa)"][0] == "FAIL" and "k=ed25519" in r["DKIM mf1 (rsa)"][1]
    assert r["DKIM mf2 (ed25519)"][0] == "FAIL" and "no TXT record" in r["DKIM mf2 (ed25519)"][1]
    assert r["DMARC"][0] == "WARN" and "p=none" in r["DMARC"][1]
    assert r["PTR %s" % RELAY_IP] == ("FAIL", "PTR names wrong.example.test, expected %s"
                                      % RELAY_NAME)
    assert r["DNSBL bl.example.test"][0] == "FAIL"
    assert "Listed since yesterday" in r["DNSBL bl.example.test"][1]
    assert r["DNSBL bl2.example.test"][0] == "WARN"     # refused query
    fixes = out.split("To fix:")[1]
    assert "add ip4:%s to the SPF record" % RELAY_IP in fixes
    assert "add include:spf.api.example" in fixes
    assert "publish the TXT record mf2._domainkey.example.test." in fixes
    assert "set the PTR record of %s to %s" % (RELAY_IP, RELAY_NAME) in fixes


def test_dns_check_missing_records_and_spf_errors(keys, tmp_path):
    """No SPF, no DMARC, no PTR: FAIL; two SPF records and too many
    lookups are permanent errors."""
    z = Zone()
    for sel, rec in keys[1].items():
        z.add_txt("%s._domainkey.%s" % (sel, DOMAIN), rec)
    srv = Dnsmasq(z).start()
    try:
        conf = check_config(tmp_path, keys[0], srv.server)
        rc, out, err = ctl("dns", "check", DOMAIN, config=conf)
    finally:
        srv.stop()
    assert rc == 1, out + err
    r = rows(out)
    assert r["SPF record"][0] == "FAIL" and "no v=spf1" in r["SPF record"][1]
    assert r["DMARC"][0] == "FAIL"
    assert r["PTR %s" % RELAY_IP] == ("FAIL", "no PTR record for %s" % RELAY_IP)
    assert r["DKIM mf1 (rsa)"][0] == "OK" and r["DKIM mf2 (ed25519)"][0] == "OK"
    assert "v=spf1 ip4:%s include:spf.api.example -all" % RELAY_IP in out

    z = Zone()
    z.add_txt(DOMAIN, "v=spf1 -all").add_txt(DOMAIN, "v=spf1 ip4:%s -all" % RELAY_IP)
    z.add_txt("deep.example.test",
              "v=spf1 " + " ".join("include:i%d.example.test" % i for i in range(11)) + " -all")
    for i in range(11):
        z.add_txt("i%d.example.test" % i, "v=spf1 ip4:203.0.113.%d -all" % i)
    srv = Dnsmasq(z).start()
    try:
        conf = check_config(tmp_path, keys[0], srv.server)
        rc, out, _ = ctl("dns", "check", DOMAIN, config=conf)
        assert rc == 1 and "2 v=spf1 records" in rows(out)["SPF record"][1], out
        rc, out, _ = ctl("dns", "check", "deep.example.test", config=conf)
        r = rows(out)
        assert r["SPF authorises %s" % RELAY_IP][0] == "FAIL", out
        assert "permerror" in r["SPF authorises %s" % RELAY_IP][1], out
        assert "more than 10 DNS lookups" in r["SPF authorises %s" % RELAY_IP][1], out
    finally:
        srv.stop()


def test_dns_check_resolver_down(keys, tmp_path):
    """A resolver that never answers: the checks fail with "timeout" and
    the command ends in bounded time with exit 1."""
    import socket
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        conf = check_config(tmp_path, keys[0], "127.0.0.1:%d" % silent.getsockname()[1])
        t0 = time.monotonic()
        rc, out, err = ctl("dns", "check", DOMAIN, config=conf)
        assert time.monotonic() - t0 < 30
    finally:
        silent.close()
    assert rc == 1, out + err
    assert "timeout" in rows(out)["SPF record"][1], out


def test_dns_check_usage(tmp_path):
    conf = tmp_path / "c.conf"
    conf.write_text("[dns]\nresolver = 127.0.0.1:%d\n" % free_port())
    assert ctl("dns", "check", config=conf)[0] == 2
    assert ctl("dns", "check", "a.test", "b.test", config=conf)[0] == 2
    assert ctl("dns", "check", "nodot", config=conf)[0] == 2
    assert ctl("dns", "frobnicate", config=conf)[0] == 2
    assert ctl("dkim", config=conf)[0] == 2
