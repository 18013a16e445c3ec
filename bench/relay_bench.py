#!/usr/bin/python3
"""mailferry relay benchmark (run through bench/relay_bench.sh).

Two measurements, side by side in one run, against Postfix's smtp-sink:

  throughput  messages per second from a queue that is already full,
              through one `mailferry router`, for two routes:
                direct  transport = smtp, straight to the sink;
                tunnel  transport = relay: TLS 1.3 with the router's client
                        certificate to `mailferry relay` on loopback, which
                        looks up the MX of dest.test (dnsmasq) and delivers
                        to the sink, passing its replies back.
              As in router_bench.py: the message hashes are written into
              Redis first, the router waits on the empty stream, and the
              time runs from the XADD of the entries until the consumer
              group has read all of them and holds none pending.

  latency     what the tunnel hop adds to one transaction on warm
              connections: one client runs transactions one after another
              (MAIL, RCPT and DATA pipelined, RFC 2920, then the content
              and "."), alternating between a connection straight to the
              sink and a connection through the tunnel (TLS with the
              router's certificate; the relay keeps its connection to the
              sink open between transactions). Each sample is the time from
              sending MAIL to the reply to ".". The added latency is the
              tunnel's percentile minus the direct one's, and the
              percentiles of the paired differences.

Certificates come from `mailferryctl tunnel-certs`. CPU time is read from
/proc/PID/stat: the router plus redis-server, the relay, the sink apart.
Target (from the issue): the hop adds under 2 ms at p50 with warm
connections. Figures only: the exit status is 0 when the run completed and
1 when something failed to run.
"""

import argparse
import os
import socket
import ssl
import subprocess
import sys
import time

from benchlib import (BenchError, Procs, Redis, RedisReplyError, Sink, add_common_args,
                      cpu_seconds, free_port, log, median, pairs, print_title,
                      redis_version, require_executable, resp_encode, run, stop_popen)
from router_bench import MAIL_FROM, RCPT_TO, message_data, queue_ids

DNSMASQ = "/usr/sbin/dnsmasq"
PREFIX = "lb:"
RELAY_NAME = "relay.bench.test"
PUBLIC_IP = "192.0.2.10"       # the relay's "public" address in the test zone
DEST = RCPT_TO.split("@")[1]   # dest.test: its MX is the sink
WARMUP = 50


# ---------------------------------------------------------------- the peers

class Dns:
    """dnsmasq on 127.0.0.1:port serving the zone: dest.test's MX is
    127.0.0.1 (the relay's mx_port is the sink's port), and the relay's
    forward-confirmed PTR for its self-check; unknown .test names are
    NXDOMAIN (the DNSBL zone bl.bench.test lists nothing)."""

    def __init__(self, procs, workdir):
        self.port = free_port()
        argv = [DNSMASQ, f"--port={self.port}", "--listen-address=127.0.0.1",
                "--bind-interfaces", "--no-resolv", "--no-hosts", "--keep-in-foreground",
                "--conf-file=/dev/null", "--pid-file=", "--user=root", "--local=/test/",
                f"--mx-host={DEST},mx.{DEST},10", f"--host-record=mx.{DEST},127.0.0.1",
                f"--host-record={RELAY_NAME},{PUBLIC_IP}"]
        self.proc = procs.popen("dnsmasq", argv, os.path.join(workdir, "dnsmasq.log"))
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("dnsmasq did not start; see dnsmasq.log")
            time.sleep(0.05)

    def answers(self):
        name = b"".join(bytes([len(p)]) + p.encode() for p in DEST.split(".")) + b"\x00"
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x0f\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            try:
                s.sendto(q, ("127.0.0.1", self.port))
                return s.recvfrom(512)[0][:2] == b"\x12\x34"
            except OSError:
                return False


def make_pki(mailferryctl, workdir):
    d = os.path.join(workdir, "pki")
    r = subprocess.run([mailferryctl, "tunnel-certs", d, "--relay-name", RELAY_NAME,
                        "--days", "2"], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"mailferryctl tunnel-certs failed: {r.stderr.strip()}")
    return {"dir": d, "ca": f"{d}/tunnel-ca.crt", "crt": f"{d}/router-1.crt",
            "key": f"{d}/router-1.key", "server_crt": f"{d}/relay.crt",
            "server_key": f"{d}/relay.key"}


class RelayProc:
    """`mailferry relay` on a free port, delivering to the sink's port."""

    def __init__(self, procs, args, pki, dns_port, sink_port):
        self.port = free_port()
        conf = os.path.join(args.workdir, "relay.conf")
        self.log = os.path.join(args.workdir, "relay.log")
        with open(conf, "w") as f:
            f.write("\n".join([
                "[log]", "level = info", "",
                "[dns]", "timeout = 1000", "",
                "[relay]", f"listen = 127.0.0.1:{self.port}",
                f"tls_cert = {pki['server_crt']}", f"tls_key = {pki['server_key']}",
                f"tunnel_ca = {pki['ca']}", f"helo_name = {RELAY_NAME}",
                f"public_ip = {PUBLIC_IP}", f"resolver = 127.0.0.1:{dns_port}",
                f"mx_port = {sink_port}", "check_interval = 300",
                "dnsbl_zones = bl.bench.test",
                f"mx_max_connections_per_domain = {args.connections}",
                "mx_idle_timeout = 300", "idle_timeout = 600", ""]))
        self.proc = procs.popen("relay", [args.mailferry, "relay", "--config", conf], self.log)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while True:
            try:
                with open(self.log) as f:
                    text = f.read()
            except OSError:
                text = ""
            if "event=listen listener=relay" in text and "event=selfcheck_status" in text:
                if "to=ok" not in text.split("event=selfcheck_status", 1)[1].split("\n", 1)[0]:
                    raise BenchError(f"the relay's self-check failed; see {self.log}")
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the relay did not start; see {self.log}")
            time.sleep(0.05)


# ---------------------------------------------------------------- throughput

class Result:
    def __init__(self, system, count, elapsed, router_cpu, relay_cpu, sink_cpu, delivered, left):
        self.system = system
        self.count = count
        self.elapsed = elapsed
        self.rate = count / elapsed
        self.router_ms = router_cpu * 1000.0 / count
        self.relay_ms = relay_cpu * 1000.0 / count
        self.sink_ms = sink_cpu * 1000.0 / count
        self.delivered = delivered
        self.left = left
        self.rates = [self.rate]


def route_lines(env, args, system):
    if system == "direct":
        return ["[route sink]", "transport = smtp", f"host = 127.0.0.1:{env['sink_port']}",
                "tls = none", "helo = router.bench.test",
                f"max_connections = {args.connections}", ""]
    pki = env["pki"]
    return ["[route relay]", "transport = relay", f"host = 127.0.0.1:{env['relay'].port}",
            f"servername = {RELAY_NAME}", f"tunnel_ca = {pki['ca']}",
            f"client_cert = {pki['crt']}", f"client_key = {pki['key']}",
            "helo = router.bench.test", f"max_connections = {args.connections}", ""]


def measure_throughput(env, args, system, tag):
    procs, redis, count = env["procs"], env["redis"], args.messages
    rc = redis.conn
    ready = f"{PREFIX}ready"
    route = "sink" if system == "direct" else "relay"

    rc.cmd("FLUSHALL")
    rc.cmd("XGROUP", "CREATE", ready, "routers", "0", "MKSTREAM")
    now = time.time()
    data = message_data(args.size, now)
    created = str(int(now * 1000))
    ids = queue_ids(count)
    log(f"  {system}: writing {count} message hashes")
    replies = rc.pipeline([
        ["HSET", f"{PREFIX}msg:{i}", "from", MAIL_FROM, "rcpts", f'["{RCPT_TO}"]',
         "data", data, "size", str(len(data)), "created", created,
         "client_ip", "127.0.0.1", "helo", "bench.test", "auth_user", "", "class", "",
         "gateway", "gateway.bench.test"] for i in ids])
    bad = [r for r in replies if isinstance(r, RedisReplyError)]
    if bad:
        raise BenchError(f"HSET failed: {bad[0]}")
    redis.rewrite_aof()

    sink = Sink(procs, os.path.join(args.workdir, f"sink-{system}-{tag}.out"),
                port=env["sink_port"])
    conf = os.path.join(args.workdir, f"router-{system}.conf")
    with open(conf, "w") as f:
        f.write("\n".join([
            "[log]", "level = info", "",
            "[queue]", f"redis = redis://127.0.0.1:{redis.port}/0", f"prefix = {PREFIX}", "",
            "[router]", "consumer = r1", "hostname = router.bench.test",
            "concurrency = 100", "batch = 32", ""] + route_lines(env, args, system)))
    logf = os.path.join(args.workdir, f"router-{system}-{tag}.log")
    p = procs.popen(f"router {system}", [args.mailferry, "router", "--config", conf], logf)
    try:
        # Ready: the consumer has joined the group and the route is healthy
        # (the relay route reports so once its first status check is in).
        deadline = time.monotonic() + 30
        while True:
            have = {pairs(c)["name"].decode() for c in rc.cmd("XINFO", "CONSUMERS", ready, "routers")}
            healthy = rc.cmd("HGET", f"{PREFIX}health:{route}", "healthy")
            if "r1" in have and healthy == b"1":
                break
            if p.poll() is not None:
                raise BenchError(f"router exited with status {p.returncode}; see {logf}")
            if time.monotonic() > deadline:
                why = rc.cmd("HGET", f"{PREFIX}health:{route}", "why")
                raise BenchError(f"router not ready (route {route}: {why!r}); see {logf}")
            time.sleep(0.05)
        time.sleep(0.5)

        xadds = b"".join(resp_encode("XADD", ready, "*", "id", i) for i in ids)
        relay_pid = env["relay"].pid if system == "tunnel" else None
        cpu0 = (cpu_seconds(p.pid), cpu_seconds(redis.pid),
                cpu_seconds(relay_pid) if relay_pid else 0.0, cpu_seconds(sink.pid))
        t0 = time.monotonic()
        rc.send_all(xadds)
        replies = rc.read_replies(count)
        bad = [r for r in replies if isinstance(r, RedisReplyError)]
        if bad:
            raise BenchError(f"XADD failed: {bad[0]}")
        deadline = t0 + args.timeout
        while True:
            g = pairs(rc.cmd("XINFO", "GROUPS", ready)[0])
            if g["entries-read"] is not None and g["entries-read"] >= count and g["pending"] == 0:
                break
            if p.poll() is not None:
                raise BenchError(f"router exited with status {p.returncode}; see {logf}")
            if time.monotonic() > deadline:
                raise BenchError(f"{system}: finished {g['entries-read']} - {g['pending']} of "
                                 f"{count} within {args.timeout} s; see {logf}")
            time.sleep(0.02)
        t1 = time.monotonic()
        cpu1 = (cpu_seconds(p.pid), cpu_seconds(redis.pid),
                cpu_seconds(relay_pid) if relay_pid else 0.0, cpu_seconds(sink.pid))
    finally:
        stop_popen(p)
    left = redis.count_keys(f"{PREFIX}msg:*") + rc.cmd("ZCARD", f"{PREFIX}retry")
    delivered = sink.count()
    sink.stop()
    return Result(system, count, t1 - t0, (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1]),
                  cpu1[2] - cpu0[2], cpu1[3] - cpu0[3], delivered, left)


# ---------------------------------------------------------------- latency

class Client:
    """A minimal SMTP client on one connection: greeting, EHLO, then
    transactions with MAIL, RCPT and DATA in one write (both peers offer
    PIPELINING), the content, and ".". Every reply is checked."""

    def __init__(self, sock, what):
        self.sock = sock
        self.what = what
        self.buf = b""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.expect(220, "greeting")
        self.sock.sendall(b"EHLO client.bench.test\r\n")
        lines = self.expect(250, "EHLO")
        if not any(l[4:].upper().startswith(b"PIPELINING") for l in lines):
            raise BenchError(f"{what}: no PIPELINING in the EHLO reply")

    def reply(self):
        lines = []
        while True:
            i = self.buf.find(b"\r\n")
            while i < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise BenchError(f"{self.what}: connection closed")
                self.buf += chunk
                i = self.buf.find(b"\r\n")
            line, self.buf = self.buf[:i], self.buf[i + 2:]
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def expect(self, code, stage):
        got, lines = self.reply()
        if got != code:
            raise BenchError(f"{self.what}: {stage}: {b' / '.join(lines).decode('latin-1')}")
        return lines

    def tx(self, content):
        """One transaction; returns its duration in seconds."""
        t0 = time.perf_counter()
        self.sock.sendall(f"MAIL FROM:<{MAIL_FROM}>\r\nRCPT TO:<{RCPT_TO}>\r\nDATA\r\n".encode())
        self.expect(250, "MAIL")
        self.expect(250, "RCPT")
        self.expect(354, "DATA")
        self.sock.sendall(content)
        self.expect(250, "end of data")
        return time.perf_counter() - t0

    def close(self):
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, BenchError):
            pass
        self.sock.close()


def pct(v, p):
    """The p-th percentile (nearest rank) of v."""
    v = sorted(v)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def measure_latency(env, args, tag):
    procs = env["procs"]
    sink = Sink(procs, os.path.join(args.workdir, f"sink-latency-{tag}.out"),
                port=env["sink_port"])
    data = message_data(args.size, time.time())
    if not data.endswith(b"\r\n"):
        data += b"\r\n"       # the payload may end inside a line
    # Dot-stuffing (RFC 5321 section 4.5.2): the benchmark's lines start
    # with digits or header names, so there is nothing to stuff; the final
    # "." ends the content.
    content = data + b".\r\n"
    pki = env["pki"]
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(pki["crt"], pki["key"])
    direct = tunnel = None
    try:
        direct = Client(socket.create_connection(("127.0.0.1", env["sink_port"]), timeout=30),
                        "direct")
        raw = socket.create_connection(("127.0.0.1", env["relay"].port), timeout=30)
        tunnel = Client(ctx.wrap_socket(raw, server_hostname=RELAY_NAME), "tunnel")
        tls = f"{tunnel.sock.version()} {tunnel.sock.cipher()[0]}"
        for _ in range(WARMUP):
            direct.tx(content)
            tunnel.tx(content)
        d, t = [], []
        for i in range(args.latency):
            # Alternate which goes first, so neither always follows the other.
            if i % 2:
                d.append(direct.tx(content))
                t.append(tunnel.tx(content))
            else:
                t.append(tunnel.tx(content))
                d.append(direct.tx(content))
    finally:
        for c in (direct, tunnel):
            if c is not None:
                c.close()
        sink.stop()
    return {"direct": d, "tunnel": t, "tls": tls}


# ---------------------------------------------------------------- report

def print_results(results, args):
    tp = {}
    lat = []
    for kind, r in results:
        if kind == "throughput":
            tp.setdefault(r.system, []).append(r)
        else:
            lat.append(r)
    rep = f" (median of {args.repeat})" if args.repeat > 1 else ""
    if tp:
        print()
        print(f"== throughput: queue -> router -> smtp-sink, {args.messages} messages of "
              f"{args.size} bytes payload, one recipient each{rep}")
        print(f"{'system':8} {'messages':>8} {'seconds':>8} {'msgs/s':>8} {'router+redis':>12} "
              f"{'relay':>8} {'sink':>8}  delivered")
        print(f"{'':8} {'':>8} {'':>8} {'':>8} {'CPU ms/msg':>12} {'ms/msg':>8} {'ms/msg':>8}")
        agg = {}
        for s in ("direct", "tunnel"):
            rs = tp.get(s)
            if not rs:
                continue
            r = rs[0]
            rate = median([x.rate for x in rs])
            agg[s] = rate
            bad = [x for x in rs if x.delivered != x.count or x.left != 0]
            ok = "ok" if not bad else f"MISMATCH: {bad[0].delivered}, {bad[0].left} left"
            relay = f"{median([x.relay_ms for x in rs]):>8.3f}" if s == "tunnel" else f"{'-':>8}"
            line = (f"{s:8} {r.count:>8} {median([x.elapsed for x in rs]):>8.2f} {rate:>8.0f} "
                    f"{median([x.router_ms for x in rs]):>12.3f} {relay} "
                    f"{median([x.sink_ms for x in rs]):>8.3f}  {rs[0].delivered} {ok}")
            if len(rs) > 1:
                line += f"   msgs/s {min(x.rate for x in rs):.0f}..{max(x.rate for x in rs):.0f}"
            print(line)
        if "direct" in agg and "tunnel" in agg:
            print(f"tunnel/direct msgs/s = {agg['tunnel'] / agg['direct']:.2f}")
    if lat:
        d = [x for r in lat for x in r["direct"]]
        t = [x for r in lat for x in r["tunnel"]]
        diff = [b - a for a, b in zip(d, t)]
        print()
        print(f"== latency of one transaction on a warm connection, {len(d)} transactions of "
              f"{args.size} bytes payload per path, one at a time (tunnel: {lat[0]['tls']})")
        print(f"{'path':22} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
        for name, v in (("direct to the sink", d), ("through the tunnel", t),
                        ("paired difference", diff)):
            print(f"{name:22} {pct(v, 50) * 1e3:>8.3f} {pct(v, 90) * 1e3:>8.3f} "
                  f"{pct(v, 99) * 1e3:>8.3f} {sum(v) / len(v) * 1e3:>8.3f}")
        add50 = (pct(t, 50) - pct(d, 50)) * 1e3
        add99 = (pct(t, 99) - pct(d, 99)) * 1e3
        ok = "meets" if add50 < 2.0 else "MISSES"
        print(f"the tunnel hop adds: p50 {add50:.3f} ms [target < 2.000: {ok}], "
              f"p99 {add99:.3f} ms")
    sys.stdout.flush()


def header(args):
    print_title("relay", args, "repository at")
    print(f"  redis: {redis_version()}, appendonly yes, appendfsync everysec")
    print(f"  router: concurrency 100, batch 32, log level info; route max_connections "
          f"{args.connections}")
    print(f"  relay: mailferry relay on 127.0.0.1, log level info, "
          f"mx_max_connections_per_domain {args.connections}; MX of {DEST} from dnsmasq = the "
          f"sink; certificates from mailferryctl tunnel-certs (EC P-256)")
    print("  sink: smtp-sink -c -u postfix 127.0.0.1:PORT 1000, a fresh one per measurement")
    print("  CPU: router + redis-server | relay | sink; from /proc/PID/stat")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.set_defaults(messages=5000)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--latency", type=int, default=2000)
    ap.add_argument("--only", default="direct tunnel latency")
    args = ap.parse_args()
    only = args.only.replace(",", " ").split()
    for o in only:
        if o not in ("direct", "tunnel", "latency"):
            ap.error(f"unknown measurement {o} (direct tunnel latency)")
    if (args.repeat < 1 or args.messages < 1 or args.size < 0 or args.connections < 1
            or args.latency < 1):
        ap.error("--repeat, --messages, --connections and --latency must be at least 1")
    mailferryctl = os.path.join(os.path.dirname(args.mailferry), "mailferryctl")

    procs = Procs(args.workdir)
    env = {"procs": procs}

    def body(results):
        require_executable(args.mailferry)
        require_executable(mailferryctl)
        header(args)
        env["pki"] = make_pki(mailferryctl, args.workdir)
        env["sink_port"] = free_port()
        dns = Dns(procs, args.workdir)
        if "tunnel" in only or "latency" in only:
            env["relay"] = RelayProc(procs, args, env["pki"], dns.port, env["sink_port"])
        if "direct" in only or "tunnel" in only:
            env["redis"] = Redis(procs, args.workdir, "everysec")
        for rep in range(args.repeat):
            for o in ("direct", "tunnel", "latency"):
                if o not in only:
                    continue
                log(f"[{rep + 1}/{args.repeat}] {o}")
                if o == "latency":
                    r = measure_latency(env, args, str(rep + 1))
                    d, t = r["direct"], r["tunnel"]
                    log(f"  p50 direct {pct(d, 50) * 1e3:.3f} ms, tunnel "
                        f"{pct(t, 50) * 1e3:.3f} ms")
                    results.append(("latency", r))
                else:
                    r = measure_throughput(env, args, o, str(rep + 1))
                    log(f"  {r.rate:.0f} msgs/s, delivered {r.delivered}, left {r.left}")
                    results.append(("throughput", r))

    return run(procs, body, lambda results: print_results(results, args))


if __name__ == "__main__":
    sys.exit(main())
