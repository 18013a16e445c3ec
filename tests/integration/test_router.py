"""Integration tests of the mailferry router: gateway -> Redis -> router ->
smtp transport -> a recording MX (mx_recorder.py).

Every test has its own redis-server and key prefix (router_env.renv). The
routers run with short timings ([router] claim_idle = 3, retry_schedule =
1,2, policy_refresh = 200 ms, hold_retry = 1) so that the whole file runs
in well under three minutes; everything waits by polling with a timeout.
"""

import email
import email.utils
import re
import threading
import time
from collections import Counter

from mftest import check_stored
from router_env import RouterEnv, wait_until
from router_env import renv  # noqa: F401,F811 (the fixture every test uses)

SENDER = "sender@x.test"


def simple_msg(sender, rcpt, subject, extra=b""):
    """A small CRLF message with a unique Message-ID."""
    mid = email.utils.make_msgid(domain="client.test")
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: %s\r\n"
            "Date: %s\r\n\r\nbody of %s\r\n" % (sender, rcpt, subject, mid,
                                                email.utils.formatdate(), subject)).encode() + extra


def two_routes(renv, primary_keys=None, overflow_keys=None, mx_mode="normal"):
    """MX servers and route definitions for "primary" (priority 10) and
    "overflow" (priority 20)."""
    mx1 = renv.mx("primary", mx_mode)
    mx2 = renv.mx("overflow", mx_mode)
    routes = {
        "primary": RouterEnv.smtp_route(mx1, 10, **(primary_keys or {})),
        "overflow": RouterEnv.smtp_route(mx2, 20, **(overflow_keys or {})),
    }
    return mx1, mx2, routes


def results(events):
    return [e["result"] for e in events]


def log_field(line, name):
    m = re.search(r"\b%s=(\"(?:[^\"\\]|\\.)*\"|\S+)" % re.escape(name), line)
    return m.group(1) if m else None


# -- 1. end to end -------------------------------------------------------------

E2E_BODY = (
    "Grüße aus Köln, 8-bit text without any transfer encoding: ÄÖÜ ß €.\r\n"
    ".a line that starts with a dot\r\n"
    "..two dots\r\n"
    ".\r\n"
    ". dot and blank\r\n"
    "\r\n"
    "line with trailing blanks   \r\n"
    "\t tab-led line\r\n"
).encode("utf-8") + b"L" * 990 + b"\r\n" + b"last line\r\n"


def e2e_message(rcpt):
    long_subject = ("Subject: a long subject that is folded over several lines so that the "
                    "router must pass it on\r\n exactly as it was stored, folding white space "
                    "and all\r\n\tthird line of the subject\r\n")
    x_long = "X-Long: " + " ".join("token%03d" % i for i in range(40)) + "\r\n"
    x_folded = "X-Folded: " + "\r\n ".join("part-%d-" % i + "y" * 60 for i in range(6)) + "\r\n"
    head = ("From: Sender <%s>\r\nTo: <%s>\r\n%s%s%s"
            "Message-ID: <e2e-%d@client.test>\r\nDate: %s\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            % (SENDER, rcpt, long_subject, x_long, x_folded, int(time.time() * 1000),
               email.utils.formatdate()))
    return head.encode() + E2E_BODY


def test_end_to_end_bytes_reach_the_mx_unchanged(renv):
    """mailferry all: the MX receives exactly the bytes stored in Redis,
    which are the bytes sent plus the gateway's headers; afterwards the
    message is gone and the event stream says delivered via primary."""
    mx1, mx2, routes = two_routes(renv, {"cap_minute": 100})
    cfg = renv.config("all", routes)
    # Hold everything until the stored copy has been read: a live policy
    # split to "hold", in place before the router starts.
    renv.policy_set("split.default", "hold")
    mf = renv.start("all", "all", cfg)

    rcpt = "rcpt@x.test"
    sent = e2e_message(rcpt)
    qid = renv.submit(SENDER, [rcpt], sent, mail_options=["BODY=8BITMIME"])
    mf.wait_log(r"id=%s event=hold\b" % qid, timeout=10)
    stored = renv.msg(qid)
    check_stored(stored, sent, SENDER, [rcpt])
    assert mx1.count() == 0 and mx2.count() == 0, "delivered while held"

    renv.policy_del("split.default")
    got = wait_until(lambda: mx1.to(rcpt), 15, "delivery at the primary MX", diag=renv.diag)
    assert len(got) == 1, "delivered %d times" % len(got)
    m = got[0]
    assert m["data"] == stored["data"], (
        "bytes at the MX differ from the stored message\nstored: %r\nmx:     %r"
        % (stored["data"][:3000], m["data"][:3000]))
    assert m["mail_from"] == SENDER
    assert m["rcpt_tos"] == [rcpt]
    assert "BODY=8BITMIME" in [o.upper() for o in m["mail_options"]], (
        "8-bit body sent without BODY=8BITMIME (RFC 6152): %r" % m["mail_options"])
    assert mx2.count() == 0

    renv.wait_idle(timeout=10)
    assert renv.msg(qid) == {}, "msg:%s still in Redis" % qid
    ev = renv.events(qid)
    delivered = [e for e in ev if e["result"] == "delivered"]
    assert len(delivered) == 1, ev
    assert delivered[0]["route"] == "primary", delivered[0]
    assert delivered[0]["rcpt"] == rcpt and delivered[0]["code"] == "250", delivered[0]
    assert all(e["result"] == "held" for e in ev if e is not delivered[0]), ev
    mf.wait_log(r"id=%s event=done delivered=1 failed=0" % qid, timeout=5)


# -- 2. retries ----------------------------------------------------------------

def test_tempfail_is_retried_on_the_schedule(renv):
    mx1, _mx2, routes = two_routes(renv)
    cfg = renv.config("all", routes)
    mf = renv.start("all", "all", cfg)
    rcpt = "tempfail-2@x.test"
    qid = renv.submit(SENDER, [rcpt], simple_msg(SENDER, rcpt, "retry me"))

    wait_until(lambda: mx1.to(rcpt), 20, "delivery on the third attempt", diag=renv.diag)
    renv.wait_idle(timeout=10)
    ev = renv.events(qid, rcpt)
    assert results(ev) == ["deferred", "deferred", "delivered"], ev
    assert [e["attempt"] for e in ev] == ["1", "2", "3"], ev
    assert [e["code"] for e in ev] == ["451", "451", "250"], ev
    assert all(e["route"] == "primary" for e in ev), ev
    assert len(mx1.to(rcpt)) == 1, "the MX got the message %d times" % len(mx1.to(rcpt))
    tries = mx1.rcpt_tries(rcpt)
    assert [t["code"] for t in tries] == [451, 451, 250], tries
    # retry_schedule = 1,2: one second, then two (plus the promotion tick).
    gap1 = tries[1]["time"] - tries[0]["time"]
    gap2 = tries[2]["time"] - tries[1]["time"]
    assert 0.9 <= gap1 < 3.0, "first retry after %.2f s, schedule says 1" % gap1
    assert 1.9 <= gap2 < 4.0, "second retry after %.2f s, schedule says 2" % gap2
    assert len(mf.wait_log(r"id=%s event=deferred\b" % qid, count=2)) == 2
    mf.wait_log(r"id=%s event=done delivered=1 failed=0" % qid, timeout=5)


# -- 3. expiry -------------------------------------------------------------------

def dsn_parts(data):
    """Parses a DSN: returns (message, per-message fields, list of
    per-recipient field blocks, third part)."""
    msg = email.message_from_bytes(data)
    assert msg.get_content_type() == "multipart/report", msg.get_content_type()
    assert (msg.get_param("report-type") or "").lower() == "delivery-status", msg["Content-Type"]
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) == 3, "DSN has %r parts" % (
        len(parts) if isinstance(parts, list) else parts)
    assert parts[0].get_content_maintype() == "text", parts[0].get_content_type()
    assert parts[1].get_content_type() == "message/delivery-status", parts[1].get_content_type()
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, blocks
    return msg, blocks[0], blocks[1:], parts[2]


def third_part_headers(part):
    ct = part.get_content_type()
    if ct == "message/rfc822":
        inner = part.get_payload()[0]
        return inner
    assert ct == "text/rfc822-headers", ct
    return email.message_from_string(part.get_payload(decode=True).decode("utf-8", "replace"))


def wait_dsn(mx, sender, timeout, diag):
    def dsns():
        return [m for m in mx.to(sender) if m["mail_from"] in ("", "<>")]
    return wait_until(dsns, timeout, "a DSN for %s at the MX" % sender, diag=diag)


def test_expired_message_bounces_with_a_dsn(renv):
    mx1, _mx2, routes = two_routes(renv)
    cfg = renv.config("all", routes, router={"max_queue_lifetime": 3})
    mf = renv.start("all", "all", cfg)
    rcpt = "tempfail-100@x.test"
    sent = simple_msg(SENDER, rcpt, "expiring message")
    qid = renv.submit(SENDER, [rcpt], sent)

    dsns = wait_dsn(mx1, SENDER, 20, renv.diag)
    assert len(dsns) == 1, "%d DSNs" % len(dsns)
    mf.wait_log(r"id=%s event=expired\b" % qid, timeout=1)
    mf.wait_log(r"id=%s event=bounce\b" % qid, timeout=1)
    assert len(mx1.rcpt_tries(rcpt)) >= 2, mx1.rcpt_tries(rcpt)
    assert not mx1.to(rcpt), "the tempfailing recipient got the message"

    dsn = dsns[0]
    assert dsn["rcpt_tos"] == [SENDER]
    msg, per_msg, per_rcpt, third = dsn_parts(dsn["data"])
    assert per_msg["Reporting-MTA"] and "gw.test" in per_msg["Reporting-MTA"], per_msg.items()
    assert len(per_rcpt) == 1, per_rcpt
    r = per_rcpt[0]
    assert r["Action"].strip().lower() == "failed", r.items()
    assert re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", r["Status"].strip()), r["Status"]
    fr = re.sub(r"\s+", "", r["Final-Recipient"]).lower()
    assert fr == "rfc822;" + rcpt, r["Final-Recipient"]
    orig = third_part_headers(third)
    sent_msg = email.message_from_bytes(sent)
    assert orig["Message-ID"] == sent_msg["Message-ID"], orig.items()
    assert orig["Subject"] == sent_msg["Subject"], orig.items()
    renv.wait_idle(timeout=10)


# -- 4. permanent failures ----------------------------------------------------------

def test_permanent_failure_bounces_once_and_null_sender_goes_dead(renv):
    mx1, _mx2, routes = two_routes(renv)
    cfg = renv.config("all", routes)
    mf = renv.start("all", "all", cfg)
    rcpt = "perm@x.test"
    t0 = time.monotonic()
    qid = renv.submit(SENDER, [rcpt], simple_msg(SENDER, rcpt, "to a missing user"))

    dsns = wait_dsn(mx1, SENDER, 10, renv.diag)
    assert time.monotonic() - t0 < 5, "the DSN took %.1f s" % (time.monotonic() - t0)
    mf.wait_log(r"id=%s event=done delivered=0 failed=1" % qid, timeout=5)
    renv.wait_idle(timeout=10)
    assert len(dsns) == 1
    _msg, _pm, per_rcpt, _third = dsn_parts(dsns[0]["data"])
    assert per_rcpt[0]["Status"].strip() == "5.1.1", per_rcpt[0].items()
    assert per_rcpt[0]["Action"].strip().lower() == "failed"
    assert "550" in (per_rcpt[0]["Diagnostic-Code"] or ""), per_rcpt[0].items()
    ev = renv.events(qid, rcpt)
    assert results(ev) == ["failed"], ev
    assert [t["code"] for t in mx1.rcpt_tries(rcpt)] == [550], "perm@ was retried"
    assert renv.xlen("dead") == 0

    # A bounce is never bounced (RFC 5321 section 6.1, RFC 3464 section 2):
    # a null-sender message that fails goes to <prefix>dead.
    dsn_like = (b"From: MAILER-DAEMON@client.test\r\nTo: <perm@x.test>\r\n"
                b"Subject: Undelivered Mail Returned to Sender\r\n"
                b"Message-ID: <dsn-like@client.test>\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: multipart/report; report-type=delivery-status;\r\n"
                b" boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n"
                b"could not deliver\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
                b"Reporting-MTA: dns; client.test\r\n\r\nFinal-Recipient: rfc822; a@b.test\r\n"
                b"Action: failed\r\nStatus: 5.0.0\r\n\r\n--b1--\r\n")
    qid2 = renv.submit("", [rcpt], dsn_like)
    wait_until(lambda: renv.xlen("dead") == 1, 10, "XLEN dead == 1", diag=renv.diag)
    dead = renv.stream("dead")
    assert dead[0][1]["id"] == qid2, dead
    assert dead[0][1].get("from", "") == "", dead
    mf.wait_log(r"id=%s event=done delivered=0 failed=1" % qid2, timeout=5)
    assert not [l for l in mf.lines("bounce") if qid2 in l], mf.lines("bounce")
    # Give a wrongly queued bounce the time to arrive.
    time.sleep(1.0)
    null_senders = [m for m in mx1.messages() if m["mail_from"] in ("", "<>")]
    assert len(null_senders) == 1, "a DSN was sent for the null-sender message: %r" % [
        (m["mail_from"], m["rcpt_tos"]) for m in null_senders]
    assert [t["code"] for t in mx1.rcpt_tries(rcpt)] == [550, 550]
    assert renv.ready_pending() == 0
    assert renv.redis("ZCARD", renv.key("retry")) == 0


# -- 5. two routers, one killed ----------------------------------------------------------

SEQ_RE = re.compile(rb"^Subject: load (\d+)\r$", re.M)


def seq_of(m):
    hit = SEQ_RE.search(m["data"])
    assert hit, "no sequence number in %r" % m["data"][:300]
    return int(hit.group(1))


def report(capsys, text):
    """Prints to the terminal even when pytest captures output."""
    with capsys.disabled():
        print("\n[router] " + text)


def test_two_routers_sigkill_loses_nothing(renv, capsys):
    n = 1000
    concurrency = 20
    mx1, _mx2, routes = two_routes(renv, mx_mode="accept")
    rkeys = {"concurrency": concurrency, "batch": 10}
    gw_cfg = renv.config("gateway", routes, router=rkeys)
    r1_cfg = renv.config("r1", routes, router=dict(rkeys, consumer="r1"), gateway=False)
    r2_cfg = renv.config("r2", routes, router=dict(rkeys, consumer="r2"), gateway=False)
    renv.start("gateway", "gateway", gw_cfg)
    r1 = renv.start("r1", "router", r1_cfg)
    r2 = renv.start("r2", "router", r2_cfg)

    items = []
    for i in range(n):
        rcpt = "load-%04d@x.test" % i
        items.append((SENDER, [rcpt], simple_msg(SENDER, rcpt, "load %d" % i)))

    sent = {}

    def sender():
        sent["ids"] = renv.submit_many(items, connections=8)

    t = threading.Thread(target=sender)
    t.start()
    try:
        wait_until(lambda: mx1.count() >= 300, 60, "300 deliveries", interval=0.01,
                   diag=renv.diag)
        in_flight_before = renv.pending_of("r1")
        r1.kill()
        in_flight = renv.pending_of("r1")
        killed_at = mx1.count()
        # The queue ids of the entries r1 held when it died.
        in_flight_ids = set()
        for sid in set(in_flight) | set(in_flight_before):
            for _eid, fields in renv.redis("XRANGE", renv.key("ready"), sid, sid) or []:
                f = dict(zip(fields[::2], fields[1::2]))
                in_flight_ids.add(f[b"id"].decode())
    finally:
        t.join()
    assert len(sent.get("ids", [])) == n and all(sent["ids"]), "not every message was queued"
    report(capsys, "r1 killed after %d deliveries with %d entries pending (%d just before)"
           % (killed_at, len(in_flight), len(in_flight_before)))

    if in_flight:
        # r2 takes r1's entries over once they are claim_idle (3 s) old.
        r2.wait_log(r"event=claimed\b", timeout=15)
    r1.start()                       # same consumer name, fresh process

    def all_there():
        return len({seq_of(m) for m in mx1.messages()}) == n
    wait_until(all_there, 90, "all %d messages at the MX" % n, interval=0.2, diag=renv.diag)
    renv.wait_idle(timeout=30)

    seqs = Counter(seq_of(m) for m in mx1.messages())
    missing = sorted(set(range(n)) - set(seqs))
    dups = {s: c for s, c in seqs.items() if c > 1}
    extra = sum(c - 1 for c in dups.values())
    report(capsys, "delivered %d messages, %d distinct; duplicates: %d extra copies of %d "
           "messages %s" % (sum(seqs.values()), len(seqs), extra, len(dups), sorted(dups)[:50]))
    assert not missing, "lost: %r" % missing[:50]
    # Only what r1 had in flight when it died may be delivered twice.
    assert extra <= max(len(in_flight), len(in_flight_before)), (
        "%d duplicates but r1 had only %d entries in flight" % (extra, len(in_flight)))
    assert extra <= concurrency
    not_in_flight = sorted(s for s in dups if sent["ids"][s] not in in_flight_ids)
    assert not not_in_flight, "delivered twice although r1 was not holding them: %r" % (
        not_in_flight)
    assert renv.msg_keys() == []
    assert renv.ready_pending() == 0
    assert renv.redis("ZCARD", renv.key("retry")) == 0
    # Every queue id has exactly one "delivered" outcome: a recorded
    # outcome is never sent again (router/router.h).
    delivered = Counter(e["id"] for e in renv.events() if e["result"] == "delivered")
    assert set(delivered) == set(sent["ids"]), len(set(sent["ids"]) - set(delivered))
    twice = [q for q, c in delivered.items() if c > 1]
    assert not twice, "recorded as delivered more than once: %r" % twice[:20]


# -- 6. caps ---------------------------------------------------------------------------------

def test_cap_minute_is_exact_across_two_routers(renv):
    n = 300
    mx1, mx2, routes = two_routes(renv, {"cap_minute": 100}, mx_mode="accept")
    gw_cfg = renv.config("gateway", routes)
    r1_cfg = renv.config("r1", routes, router={"consumer": "r1"}, gateway=False)
    r2_cfg = renv.config("r2", routes, router={"consumer": "r2"}, gateway=False)
    renv.start("gateway", "gateway", gw_cfg)
    renv.start("r1", "router", r1_cfg)
    renv.start("r2", "router", r2_cfg)

    # Everything must be decided within one UTC minute.
    sec = time.time() % 60
    if sec > 40:
        time.sleep(60 - sec + 0.2)
    minute = int(time.time() // 60)
    items = []
    for i in range(n):
        rcpt = "cap-%03d@x.test" % i
        items.append((SENDER, [rcpt], simple_msg(SENDER, rcpt, "cap %d" % i)))
    ids = renv.submit_many(items, connections=6)
    wait_until(lambda: mx1.count() + mx2.count() >= n, 40, "%d deliveries" % n, interval=0.1,
               diag=renv.diag)
    renv.wait_idle(timeout=20)
    ev = [e for e in renv.stream("events") if e[1]["result"] == "delivered"]
    minutes = {int(eid.split("-")[0]) // 60000 for eid, _ in ev}
    assert minutes == {minute}, "deliveries spread over minutes %r (started in %d)" % (
        minutes, minute)

    assert mx1.count() == 100, "primary got %d, cap_minute is 100" % mx1.count()
    assert mx2.count() == 200, "overflow got %d" % mx2.count()
    by_route = Counter((f["route"], f["reason"]) for _eid, f in ev)
    assert by_route == {("primary", "primary"): 100, ("overflow", "overflow:cap_minute"): 200}, \
        by_route
    assert len({f["id"] for _e, f in ev}) == n and set(ids) == {f["id"] for _e, f in ev}


# -- 7. breaker ---------------------------------------------------------------------------------

def test_bounce_breaker_opens_probes_and_closes(renv, capsys):
    breaker = {"bounce_rate_max": 0.2, "min_samples": 10, "window": 60,
               "breaker_cooldown": 3, "probe_fraction": 1, "probe_successes": 3,
               "domain_breaker": "no",
               # Closing also needs every rate in the window below
               # bounce_rate_max x recover_ratio (docs/policy.md); 0.9
               # keeps the number of probes that takes small.
               "recover_ratio": 0.9}
    mx1, mx2, routes = two_routes(renv, breaker)
    cfg = renv.config("all", routes)
    mf = renv.start("all", "all", cfg)

    # 20 bounces at primary (null sender: no DSNs to dilute the window).
    perm = [("", ["perm@x.test"], simple_msg("", "perm@x.test", "perm %d" % i))
            for i in range(20)]
    perm_ids = renv.submit_many(perm, connections=4)
    opened = mf.wait_log(r"event=breaker route=primary transition=closed->open\b", timeout=10)[0]
    assert log_field(opened, "cause") == "bounce", opened
    wait_until(lambda: all(renv.events(q) for q in perm_ids), 10, "outcomes of the 20 bounces")
    perm_ev = [e for q in perm_ids for e in renv.events(q)]
    assert all(e["result"] == "failed" for e in perm_ev), perm_ev
    at_primary = [e for e in perm_ev if e["route"] == "primary"]
    assert len(at_primary) >= 10, "only %d bounces at primary" % len(at_primary)

    # The transition is persisted with compare-and-set and reaches the
    # router's decisions with its next snapshot (every policy_refresh).
    wait_until(lambda: (renv.redis("GET", renv.key("brk:primary")) or b"").startswith(b"state=open"),
               2, "brk:primary to read state=open")
    time.sleep(0.3)

    # While open: good mail overflows.
    t_open = time.monotonic()
    open_ids = [renv.submit(SENDER, ["ok-open-%d@x.test" % i],
                            simple_msg(SENDER, "ok-open-%d@x.test" % i, "while open"))
                for i in range(3)]
    wait_until(lambda: all(renv.events(q) for q in open_ids), 5, "deliveries while open",
               diag=renv.diag)
    assert time.monotonic() - t_open < 3, "too slow to test the open state"
    for q in open_ids:
        e = renv.events(q)
        assert [(x["route"], x["reason"], x["result"]) for x in e] == [
            ("overflow", "overflow:breaker_open", "delivered")], e

    # After the cool-down: half open, good mail probes primary.
    mf.wait_log(r"event=breaker route=primary transition=open->half_open\b", timeout=10)
    probes = 0
    closed = None
    for batch in range(30):
        items = [(SENDER, ["ok-probe-%d-%d@x.test" % (batch, i)],
                  simple_msg(SENDER, "ok-probe-%d-%d@x.test" % (batch, i), "probe"))
                 for i in range(10)]
        ids = renv.submit_many(items, connections=2)
        wait_until(lambda: all(renv.events(q) for q in ids), 10, "probe outcomes", diag=renv.diag)
        for q in ids:
            for e in renv.events(q):
                if e["reason"] == "probe":
                    assert e["route"] == "primary" and e["result"] == "delivered", e
                    probes += 1
        hits = mf.lines("breaker")
        hits = [l for l in hits if "transition=half_open->closed" in l]
        if hits:
            closed = hits[0]
            break
        time.sleep(0.25)   # one policy refresh, so the next batch sees the step
    assert closed, "breaker never closed after %d probes:\n%s" % (probes, mf.tail(40))
    assert not [l for l in mf.lines("breaker") if "transition=half_open->open" in l]
    assert probes >= 3, "closed after %d probes, probe_successes is 3" % probes
    sent_n, bounced_n = int(log_field(closed, "sent")), int(log_field(closed, "bounced"))
    assert int(log_field(closed, "probe_ok")) >= 3, closed
    assert bounced_n / sent_n < 0.2 * 0.9, closed
    report(capsys, "breaker closed after %d probes: %s" % (probes, closed))

    # Closed again: traffic is back on primary (after the snapshot that
    # carries the closed breaker).
    wait_until(lambda: (renv.redis("GET", renv.key("brk:primary")) or b"").startswith(b"state=closed"),
               2, "brk:primary to read state=closed")
    time.sleep(0.3)
    after = [renv.submit(SENDER, ["ok-after-%d@x.test" % i],
                         simple_msg(SENDER, "ok-after-%d@x.test" % i, "after close"))
             for i in range(3)]
    wait_until(lambda: all(renv.events(q) for q in after), 5, "deliveries after closing")
    for q in after:
        e = renv.events(q)
        assert [(x["route"], x["reason"], x["result"]) for x in e] == [
            ("primary", "primary", "delivered")], e
    renv.wait_idle(timeout=10)


# -- 8. live policy ---------------------------------------------------------------------------

def test_live_policy_split_moves_traffic(renv):
    mx1, mx2, routes = two_routes(renv)
    cfg = renv.config("all", routes)
    mf = renv.start("all", "all", cfg)

    def send_one(tag):
        rcpt = "live-%s@x.test" % tag
        qid = renv.submit(SENDER, [rcpt], simple_msg(SENDER, rcpt, "live %s" % tag))
        wait_until(lambda: renv.events(qid), 5, "outcome of %s" % qid, diag=renv.diag)
        e = renv.events(qid)
        assert len(e) == 1 and e[0]["result"] == "delivered", e
        return e[0]["route"], e[0]["reason"]

    assert send_one("before") == ("primary", "primary")

    t0 = time.monotonic()
    renv.policy_set("split.default", "overflow")
    mf.wait_log(r"event=policy_applied overrides=1\b", timeout=3)
    assert time.monotonic() - t0 < 1.5, "policy applied after %.2f s" % (time.monotonic() - t0)
    assert send_one("during") == ("overflow", "split")
    assert mx2.count() == 1

    t0 = time.monotonic()
    renv.policy_del("split.default")
    mf.wait_log(r"event=policy_applied overrides=0\b", count=2, timeout=3)
    assert time.monotonic() - t0 < 1.5
    assert send_one("after") == ("primary", "primary")
    assert mx1.count() == 2 and mx2.count() == 1

    # A bad live value is refused and the policy in force stays.
    renv.policy_set("split.default", "nowhere")
    mf.wait_log(r"event=policy_rejected\b", timeout=3)
    assert send_one("rejected") == ("primary", "primary")
    renv.wait_idle(timeout=10)
