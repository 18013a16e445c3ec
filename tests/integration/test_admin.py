"""The admin HTTP endpoint ([admin] listen, lib/admin.c): /metrics in the
Prometheus text format (checked with promtool from Debian's prometheus
package and by a strict parser here, against what the test did), /healthz,
/readyz following Redis, and the HTTP behaviour (keep-alive, pipelining,
404/405, size limits).

Each test runs `mailferry all` against its own redis-server and a
recording MX (router_env.renv).
"""

import http.client
import re
import shutil
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from mftest import MAILFERRY_BIN, child_env
from router_env import RouterEnv, free_port, wait_until
from router_env import renv  # noqa: F401,F811 (the fixture every test uses)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# -- helpers -----------------------------------------------------------------------

def start_all(renv, routes=None, gateway_extra=None):
    """Writes a config with [admin] listen on a free port and starts
    `mailferry all`; returns (process, admin port, MX)."""
    mx = renv.mx("primary")
    routes = routes or {"primary": RouterEnv.smtp_route(mx, 10)}
    path = renv.config("all", routes)
    text = path.read_text()
    for k, v in (gateway_extra or {}).items():
        text = re.sub(r"(?m)^%s = .*$" % re.escape(k), "%s = %s" % (k, v), text)
    port = free_port()
    text += "\n[admin]\nlisten = 127.0.0.1:%d\n" % port
    path.write_text(text)
    p = renv.start("all", "all", path)
    p.wait_log(r"event=listen listener=admin address=127\.0\.0\.1:%d" % port)
    return p, port, mx


def get(port, path, method="GET", headers=None):
    """One request on a fresh connection: (status, headers dict, body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        c.close()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_metrics(text):
    """A strict reader of the text format 0.0.4: returns ({(name,
    frozenset(labels.items())): value}, {family: type}). Asserts the
    structure: HELP then TYPE before a family's samples, samples of one
    family together, families sorted by name, every line valid."""
    samples, types, order = {}, {}, []
    assert text.endswith("\n"), "output must end with a newline"
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in types, "family %s appears twice" % name
            order.append(name)
            current = name
            continue
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ")
            assert name == current, "TYPE %s not right after its HELP" % name
            assert typ in ("counter", "gauge", "histogram"), line
            types[name] = typ
            continue
        m = _SAMPLE.match(line)
        assert m, "bad sample line %r" % line
        name, _, labels, value = m.groups()
        base = re.sub(r"_(bucket|sum|count)$", "", name) if types.get(current) == "histogram" \
            else name
        assert base == current, "sample %s outside its family %s" % (name, current)
        lab = {}
        if labels:
            pos = 0
            while pos < len(labels):
                lm = _LABEL.match(labels, pos)
                assert lm, "bad labels in %r" % line
                lab[lm.group(1)] = (lm.group(2).replace("\\n", "\n").replace('\\"', '"')
                                    .replace("\\\\", "\\"))
                pos = lm.end()
        key = (name, frozenset(lab.items()))
        assert key not in samples, "duplicate sample %r" % line
        samples[key] = float(value)
    assert order == sorted(order), "families not sorted: %r" % order
    return samples, types


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def scrape(port):
    status, headers, body = get(port, "/metrics")
    assert status == 200, (status, body)
    assert headers["content-type"] == CONTENT_TYPE
    return body


def promtool_check(text):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: scripts/setup.sh installs Debian's prometheus package")
    p = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                       timeout=60)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 0, "promtool check metrics failed:\n%s\n---\n%s" % (out, text)


def message(subject, cls=None):
    extra = "X-Mailferry-Class: %s\r\n" % cls if cls else ""
    return ("From: app@example.com\r\nTo: user@example.net\r\nSubject: %s\r\n%s\r\n"
            "Hello.\r\n" % (subject, extra)).encode()


# -- tests -------------------------------------------------------------------------

def test_metrics_count_what_happened(renv):
    """Three messages delivered (one of class bulk), one recipient refused
    for relaying and one unknown command: /metrics says so, in a form that
    promtool accepts."""
    p, port, mx = start_all(renv, gateway_extra={"allowed_networks": "127.0.0.1/32"})

    # Before any mail: the families of both roles are there, at zero.
    text = scrape(port)
    promtool_check(text)
    s, types = parse_metrics(text)
    assert value(s, "mailferry_messages_accepted_total") == 0
    assert value(s, "mailferry_smtp_connections", listener="smtp") == 0
    assert types["mailferry_message_bytes"] == "histogram"
    assert types["mailferry_enqueue_seconds"] == "histogram"
    assert types["mailferry_smtp_sessions_total"] == "counter"
    assert value(s, "mailferry_route_healthy", route="primary") == 1
    assert value(s, "mailferry_breaker_state", route="primary") == 0
    assert "mailferry_relay_check" not in types     # only where the relay role runs

    sizes = []
    for i, cls in enumerate([None, "bulk", None]):
        msg = message("m%d" % i, cls)
        renv.submit("app@example.com", ["user%d@example.net" % i], msg)
        sizes.append(len(msg))

    # From 127.0.0.2, outside allowed_networks: relay denied (554).
    c = smtplib.SMTP("127.0.0.1", renv.gateway_port, timeout=10,
                     source_address=("127.0.0.2", 0))
    c.ehlo("outside.test")
    assert c.mail("app@example.com")[0] == 250
    assert c.rcpt("someone@example.org")[0] == 554
    # An unknown command (500).
    assert c.docmd("FROB")[0] == 500
    c.quit()

    wait_until(lambda: mx.count() == 3, 30, "3 deliveries", diag=renv.diag)
    renv.wait_idle()

    def settled():
        t = scrape(port)
        s, _ = parse_metrics(t)
        ok = (value(s, "mailferry_delivery_seconds_count", route="primary") == 3 and
              value(s, "mailferry_smtp_connections", listener="smtp") == 0 and
              value(s, "mailferry_queue_messages", state="ready") == 0 and
              value(s, "mailferry_queue_messages", state="retry") == 0 and
              value(s, "mailferry_queue_messages", state="inflight") == 0)
        return t if ok else None
    text = wait_until(settled, 15, "metrics to settle", interval=0.3, diag=lambda: scrape(port))
    promtool_check(text)
    s, _ = parse_metrics(text)

    # Gateway.
    assert value(s, "mailferry_messages_accepted_total") == 3
    assert value(s, "mailferry_messages_rejected_total", reason="relay_denied") == 1
    assert value(s, "mailferry_messages_rejected_total", reason="unknown_command") == 1
    # renv.start's readiness probe, three submissions, the refused client.
    assert value(s, "mailferry_smtp_sessions_total", listener="smtp") >= 5
    assert value(s, "mailferry_message_bytes_count") == 3
    # Queued sizes include the Received (and maybe Message-ID, Date)
    # headers the gateway adds.
    assert sum(sizes) < value(s, "mailferry_message_bytes_sum") < sum(sizes) + 3 * 1024
    assert value(s, "mailferry_message_bytes_bucket", le="1024") == 3
    assert value(s, "mailferry_message_bytes_bucket", le="+Inf") == 3
    assert value(s, "mailferry_enqueue_seconds_count") == 3
    assert 0 < value(s, "mailferry_enqueue_seconds_sum") < 10
    assert value(s, "mailferry_enqueue_seconds_bucket", le="+Inf") == 3

    # Router.
    assert value(s, "mailferry_routing_decisions_total", route="primary", reason="primary") == 3
    assert value(s, "mailferry_deliveries_total", route="primary", result="delivered",
                 **{"class": "none"}) == 2
    assert value(s, "mailferry_deliveries_total", route="primary", result="delivered",
                 **{"class": "bulk"}) == 1
    assert value(s, "mailferry_delivery_seconds_bucket", route="primary", le="+Inf") == 3
    assert value(s, "mailferry_queue_messages", state="dead") == 0
    assert value(s, "mailferry_route_healthy", route="primary") == 1
    assert value(s, "mailferry_breaker_state", route="primary") == 0

    # Histogram buckets are cumulative and end with +Inf == _count.
    for fam, labels in (("mailferry_enqueue_seconds", {}),
                        ("mailferry_delivery_seconds", {"route": "primary"})):
        buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in s.items()
                          if k[0] == fam + "_bucket" and
                          {a: b for a, b in k[1] if a != "le"} == labels))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), (fam, buckets)
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == value(s, fam + "_count", **labels)


def test_deferred_and_failed_deliveries(renv):
    """Outcomes other than delivered are counted with their result: a 550
    recipient fails, a 451 one is deferred."""
    mx = renv.mx("primary", "normal")
    path = renv.config("all", {"primary": RouterEnv.smtp_route(mx, 10)},
                       router={"retry_schedule": "60"})
    port = free_port()
    path.write_text(path.read_text() + "\n[admin]\nlisten = 127.0.0.1:%d\n" % port)
    renv.start("all", "all", path)
    renv.submit("app@example.com", ["perm@example.net"], message("fail"))
    renv.submit("app@example.com", ["tempfail-5@example.net"], message("defer"))

    def counted():
        s, _ = parse_metrics(scrape(port))
        f = value(s, "mailferry_deliveries_total", route="primary", result="failed",
                  **{"class": "none"})
        d = value(s, "mailferry_deliveries_total", route="primary", result="deferred",
                  **{"class": "none"})
        return (f, d) if f == 1 and d == 1 else None
    wait_until(counted, 30, "a failed and a deferred delivery", interval=0.3,
               diag=lambda: scrape(port) + renv.diag())
    # The deferred message waits in <prefix>retry.
    wait_until(lambda: value(parse_metrics(scrape(port))[0], "mailferry_queue_messages",
                             state="retry") == 1, 15, "queue_messages{state=retry} 1",
               interval=0.3)
    promtool_check(scrape(port))


def test_health_and_readiness_follow_redis(renv):
    """/healthz is 200 while the process runs; /readyz is 200, then 503
    naming the Redis checks while Redis is down, and 200 again once it is
    back."""
    p, port, _mx = start_all(renv)

    status, headers, body = get(port, "/healthz")
    assert (status, body) == (200, "ok\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    wait_until(lambda: get(port, "/readyz")[0] == 200, 10, "/readyz 200")
    status, headers, body = get(port, "/readyz")
    assert (status, body) == (200, "ok\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"

    renv.redis.stop()
    wait_until(lambda: get(port, "/readyz")[0] == 503, 15, "/readyz 503 with Redis down")
    status, _, body = get(port, "/readyz")
    assert status == 503
    lines = body.splitlines()
    assert any(l.startswith("gateway_redis: ") for l in lines), body
    assert any(l.startswith("router_redis: ") for l in lines), body
    assert not any(l.startswith("gateway_listeners") for l in lines), body
    assert "ok" not in lines
    # Liveness and metrics do not depend on Redis.
    assert get(port, "/healthz")[0] == 200
    promtool_check(scrape(port))

    renv.redis.start()
    wait_until(lambda: get(port, "/readyz")[0] == 200, 30, "/readyz 200 after Redis is back",
               interval=0.2, diag=renv.diag)
    # Mail flows again.
    renv.submit("app@example.com", ["user@example.net"], message("after"))


def test_http_behaviour(renv):
    """Keep-alive, pipelining, HEAD, 404, 405 and the request limits."""
    p, port, _mx = start_all(renv)

    # Several requests on one persistent connection.
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path, want in (("/healthz", 200), ("/metrics", 200), ("/readyz", 200),
                       ("/nope", 404), ("/metrics?x=1", 200), ("/healthz", 200)):
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        assert r.status == want, (path, r.status, body)
        assert r.getheader("Connection") == "keep-alive"
        assert int(r.getheader("Content-Length")) == len(body)
    c.request("HEAD", "/metrics")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b""
    assert int(r.getheader("Content-Length")) > 0
    c.close()

    status, headers, _ = get(port, "/metrics", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert get(port, "/", method="DELETE")[0] == 405

    def raw(data, timeout=5):
        """Sends data, returns everything until the server closes."""
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        s.sendall(data)
        out = b""
        try:
            while True:
                d = s.recv(65536)
                if not d:
                    break
                out += d
        finally:
            s.close()
        return out

    # Pipelined requests are answered in order; "Connection: close" ends
    # the connection after its answer, and later requests are not answered.
    out = raw(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
              b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n"
              b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
              b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    statuses = re.findall(rb"^HTTP/1\.1 (\d+)", out, re.M)
    assert statuses == [b"200", b"404", b"200"], out
    # HTTP/1.0 without keep-alive: one answer, then close.
    out = raw(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in out

    # Limits: the answer, then the connection is closed.
    assert raw(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 414 ")
    assert raw(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n").startswith(
        b"HTTP/1.1 431 ")
    assert raw(b"POST /metrics HTTP/1.1\r\nContent-Length: 10000\r\n\r\n" + b"c" * 10000) \
        .startswith(b"HTTP/1.1 413 ")
    assert raw(b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400 ")

    # Many pipelined scrapes from a client that reads late: the server
    # stops reading while over 1 MiB of answers wait, and answers them all
    # once the client reads.
    n = 4000
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    sender = threading.Thread(target=s.sendall, args=(b"GET /metrics HTTP/1.1\r\n\r\n" * n,))
    sender.start()
    time.sleep(1)
    out = b""
    while out.count(b"HTTP/1.1 200 OK\r\n") < n:
        d = s.recv(1 << 20)
        assert d, "connection closed after %d answers" % out.count(b"HTTP/1.1 200 OK\r\n")
        out += d
    sender.join()
    s.close()

    # The endpoint still serves after all that.
    assert get(port, "/healthz")[0] == 200


def test_admin_address_in_use_is_fatal(renv, tmp_path):
    """A process that cannot bind its admin address does not start."""
    mx = renv.mx("primary")
    path = renv.config("all", {"primary": RouterEnv.smtp_route(mx, 10)})
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path.write_text(path.read_text() + "\n[admin]\nlisten = 127.0.0.1:%d\n" % port)
        p = subprocess.run([MAILFERRY_BIN, "all", "--config", str(path)], capture_output=True,
                           timeout=20, env=child_env())
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 1, err
    assert "[admin] listen: cannot listen on 127.0.0.1:%d" % port in err, err


def test_check_config_validates_admin_listen(tmp_path):
    path = tmp_path / "bad.conf"
    path.write_text("[admin]\nlisten = localhost\n")
    p = subprocess.run([MAILFERRY_BIN, "--check-config", "--config", str(path)],
                       capture_output=True, timeout=20, env=child_env())
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode != 0, out
    assert "[admin] listen" in out, out
