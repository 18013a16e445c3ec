#!/usr/bin/python3
"""The gateway's accept rate with DKIM signing off and on (run through
bench/dkim_bench.sh). Prints figures; it is not a test.

Postfix's smtp-source sends COUNT messages of SIZE bytes over SESSIONS
connections (-d: messages follow each other on a connection) to a
`mailferry gateway` on loopback with a private redis-server (AOF, fsync
every second), once per mode:

  off    [dkim] enabled = no
  rsa    one RSA 2048 key for the sender domain
  both   an RSA 2048 and an Ed25519 key: two signatures per message

and prints messages/s, the gateway's CPU milliseconds per message (from
/proc/PID/stat; signing runs on its libuv threadpool, which that counts)
and each mode's rate relative to "off". After each signing run it checks
that a stored message carries the expected DKIM-Signature fields.
"""

import argparse
import os
import subprocess
import sys
import time

from benchlib import (BenchError, Procs, Redis, add_common_args, cpu_seconds, free_port, log,
                      median, print_title, require_executable, run_source, wait_greeting)

DOMAIN = "bench.example"
MAIL_FROM = "sender@" + DOMAIN
RCPT_TO = "rcpt@dest.example"


def make_keys(workdir):
    """keys_dir for "rsa" and "both", keys made by the openssl CLI."""
    dirs = {}
    for mode, kinds in (("rsa", ("rsa",)), ("both", ("rsa", "ed25519"))):
        d = os.path.join(workdir, "keys-" + mode)
        os.makedirs(d, mode=0o700, exist_ok=True)
        for kind in kinds:
            path = os.path.join(d, "%s.%s.%s.key" % (DOMAIN, "s" + kind, kind))
            if kind == "rsa":
                argv = ["openssl", "genpkey", "-algorithm", "RSA",
                        "-pkeyopt", "rsa_keygen_bits:2048", "-out", path]
            else:
                argv = ["openssl", "genpkey", "-algorithm", "ed25519", "-out", path]
            subprocess.run(argv, check=True, capture_output=True)
            os.chmod(path, 0o600)
        dirs[mode] = d
    return dirs


def write_config(path, redis_port, port, prefix, keys_dir):
    with open(path, "w") as f:
        f.write("[log]\nlevel = warn\n\n"
                "[queue]\nredis = redis://127.0.0.1:%d/0\nprefix = %s\n\n"
                "[gateway]\nlisten = 127.0.0.1:%d\nallowed_networks = 127.0.0.0/8\n"
                "hostname = gw.bench.example\nmax_connections = 20000\n"
                "max_connections_per_ip = 20000\n\n"
                "[dkim]\nenabled = %s\n%s"
                % (redis_port, prefix, port, "yes" if keys_dir else "no",
                   "keys_dir = %s\n" % keys_dir if keys_dir else ""))


def signatures_of_one(redis, prefix):
    keys = redis.conn.cmd("SCAN", "0", "MATCH", prefix + "msg:*", "COUNT", "1000")[1]
    if not keys:
        raise BenchError("no message stored under %smsg:*" % prefix)
    data = redis.conn.cmd("HGET", keys[0], "data")
    if isinstance(data, str):
        data = data.encode("latin-1")
    return [line for line in data.split(b"\r\n") if line.startswith(b"DKIM-Signature:")]


def one_run(args, procs, redis, keys_dir, mode, i):
    port = free_port()
    prefix = "mfdkim:%s:%d:" % (mode, i)
    conf = os.path.join(args.workdir, "gw-%s-%d.conf" % (mode, i))
    write_config(conf, redis.port, port, prefix, keys_dir)
    logf = os.path.join(args.workdir, "gw-%s-%d.log" % (mode, i))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}
    gw = procs.popen("gateway-" + mode, [args.mailferry, "gateway", "--config", conf], logf,
                     env=env)
    try:
        wait_greeting(port, "mailferry gateway (%s)" % mode, gw)
        cpu0 = cpu_seconds(gw.pid)
        elapsed = run_source(port, args.messages, args.size, args.sessions, True, args.timeout,
                             MAIL_FROM, RCPT_TO)
        cpu = cpu_seconds(gw.pid) - cpu0
        sigs = signatures_of_one(redis, prefix)
        want = {"off": 0, "rsa": 1, "both": 2}[mode]
        if len(sigs) != want:
            raise BenchError("%s: a stored message has %d DKIM-Signature fields, expected %d"
                             % (mode, len(sigs), want))
    finally:
        gw.terminate()
        gw.wait(30)
    redis.conn.cmd("FLUSHDB")
    return args.messages / elapsed, cpu * 1000.0 / args.messages


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap)
    ap.add_argument("-s", "--sessions", type=int, default=20)
    ap.add_argument("--modes", default="off rsa both")
    args = ap.parse_args()
    require_executable(args.mailferry)
    procs = Procs(args.workdir)
    try:
        print_title("gateway DKIM", args, "commit")
        print("# %d messages of %d bytes over %d sessions (smtp-source -d), %d run(s) each"
              % (args.messages, args.size, args.sessions, args.repeat))
        redis = Redis(procs, args.workdir, "everysec")
        keys = make_keys(args.workdir)
        results = {}
        for i in range(args.repeat):
            for mode in args.modes.split():
                log("run %d, mode %s" % (i + 1, mode))
                rate, cpu = one_run(args, procs, redis, keys.get(mode), mode, i)
                results.setdefault(mode, []).append((rate, cpu))
        base = median([r for r, _ in results["off"]]) if "off" in results else None
        print("%-6s %12s %18s %10s" % ("mode", "messages/s", "gateway CPU ms/msg", "vs off"))
        for mode in args.modes.split():
            rate = median([r for r, _ in results[mode]])
            cpu = median([c for _, c in results[mode]])
            rel = "%9.2fx" % (rate / base) if base else "-"
            print("%-6s %12.0f %18.3f %10s" % (mode, rate, cpu, rel))
        return 0
    except BenchError as e:
        print("dkim_bench: %s" % e, file=sys.stderr)
        return 1
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
