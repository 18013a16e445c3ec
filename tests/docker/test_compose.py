#!/usr/bin/python3
"""End-to-end test of docker/docker-compose.yml.

    /usr/bin/python3 tests/docker/test_compose.py [--keep] [--no-build]

Run as root on Debian 12 (CI runs it from a fresh clone). It:

 1. finds or starts a Docker engine with scripts/docker-engine.sh;
 2. builds the images (mailferry, Redis, the tools image of the setup
    service and the demo peers); the engine's build cache makes a second
    run fast;
 3. runs the one-shot "setup" service and asks the built image what it can
    do: the relay role is there when `mailferry --help` lists it; each
    [route NAME] of docker/mailferry.conf must pass
    `mailferry --check-config`, or fail only because its transport is not
    in this build;
 4. brings the stack up with the demo profile (project "mailferry-test",
    its own network prefix and free loopback ports, so it does not clash
    with a stack someone started by hand) and waits for the health checks;
 5. submits mail from the host through the published 127.0.0.1 ports:
    plain SMTP, submission with STARTTLS and AUTH, implicit TLS with AUTH
    (TLS verified against the setup service's CA), one message marked
    "X-Mailferry-Class: bulk";
 6. checks where each message arrived: at the sink MX through the relay
    (its source address is the relay's) and at the fake SendGrid for the
    bulk one (which must find the request well-formed). What the image
    lacks is replaced and reported as skipped: a transport that
    docker/mailferry.conf names for the relay route but the image lacks
    gives way to the smtp transport to the relay; without the relay role
    the router delivers to the sink through docker/mailferry-smtp.conf;
    without the api transport the bulk message goes to the sink too;
 7. stops the stack and checks that every mailferry container exited 0 on
    SIGTERM well within the stop timeout, then `down -v`.

Prints one line per step with its duration and ends with "PASS" (exit 0)
or "FAIL: reason" (exit 1). --keep leaves the stack running for a look;
--no-build uses the images as they are.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
DOCKER = TOP / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
PROJECT = os.environ.get("MAILFERRY_TEST_PROJECT", "mailferry-test")
NET = os.environ.get("MAILFERRY_TEST_NET", "172.29.226")
RELAY_IP = NET + ".30"
MAILFERRY_SERVICES = ("gateway", "router", "relay")
# Seconds a stop may take: mailferry's shutdown_grace is 5 s in the compose
# file, Docker's kill comes after stop_grace_period (15 s).
STOP_LIMIT = 10.0
# What mailferry --check-config says about a transport it was built without.
NOT_BUILT = "is not available in this build"
# The route to the relay when docker/mailferry.conf names a transport the
# image lacks (say, a relay transport): the tunnel is ESMTP over TLS from
# the first byte with the router's client certificate, which the smtp
# transport also speaks.
RELAY_OVER_SMTP = """[route relay]
transport = smtp
priority = 10
host = relay:4650
tls = implicit
ca_file = /etc/mailferry/pki/ca.crt
servername = relay.mailferry.test
client_cert = /etc/mailferry/pki/router.crt
client_key = /etc/mailferry/pki/router.key
helo = router.mailferry.test
"""


class Failure(Exception):
    pass


def log(msg):
    print("docker-test: " + msg, flush=True)


class Step:
    """Context manager printing a step's name, duration and outcome."""

    timings = []

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.t0 = time.monotonic()
        log("--> " + self.name)
        return self

    def __exit__(self, et, ev, tb):
        dt = time.monotonic() - self.t0
        Step.timings.append((self.name, dt, et is None))
        log("<-- %s: %s in %.1f s" % (self.name, "ok" if et is None else "FAILED", dt))
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, env, compose):
        self.env = env
        self.compose = compose

    def run(self, *args, check=True, capture=False, timeout=1800, input=None):
        cmd = self.compose + ["-f", str(COMPOSE_FILE), "-p", PROJECT, "--profile", "demo"] + \
            list(args)
        r = subprocess.run(cmd, env=self.env, cwd=TOP, timeout=timeout, text=True, input=input,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.PIPE if capture else None)
        if check and r.returncode != 0:
            raise Failure("%s exited %d%s" % (" ".join(cmd[len(self.compose):]), r.returncode,
                                              (": " + r.stderr.strip()[-2000:]) if capture else ""))
        return r

    def container(self, service):
        out = self.run("ps", "-q", service, capture=True).stdout.split()
        return out[0] if out else None

    def inspect(self, cid, fmt):
        return subprocess.run(["docker", "inspect", "-f", fmt, cid], env=self.env, text=True,
                              capture_output=True, check=True).stdout.strip()

    def exec(self, service, *cmd, check=True):
        return self.run("exec", "-T", service, *cmd, capture=True, check=check)


def engine_env():
    """Runs scripts/docker-engine.sh start and returns the environment."""
    env = dict(os.environ)
    r = subprocess.run([str(TOP / "scripts" / "docker-engine.sh"), "start"], env=env,
                       capture_output=True, text=True)
    sys.stderr.write(r.stderr)
    if r.returncode != 0:
        raise Failure("scripts/docker-engine.sh start failed")
    for line in r.stdout.splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    return env


def compose_command(env):
    if subprocess.run(["docker", "compose", "version"], env=env,
                      capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"]


def conf_sections(path):
    """The [section] blocks of an INI file, comments dropped, in order."""
    sections, cur = [], None
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#") or s.startswith(";"):
            continue
        if s.startswith("["):
            cur = [s[1:s.index("]")], [line]]
            sections.append(cur)
        elif cur is not None:
            cur[1].append(line)
    return [(name, "\n".join(lines) + "\n") for name, lines in sections]


def check_config(stack, workdir, name, text):
    """Whether the router accepts a configuration; the error otherwise."""
    path = Path(workdir) / ("probe-%s.conf" % name)
    path.write_text(text)
    stack.env["MAILFERRY_CONF"] = str(path)
    r = stack.run("run", "--rm", "-T", "--no-deps", "router", "--check-config", "--config",
                  "/etc/mailferry/mailferry.conf", "router", capture=True, check=False)
    out = (r.stdout + r.stderr).strip().splitlines()
    said = [line for line in out if line.startswith("mailferry:")]
    return r.returncode == 0, (said or out or [""])[-1]


def wait_healthy(stack, services, timeout=180):
    deadline = time.monotonic() + timeout
    pending = set(services)
    while pending:
        for svc in sorted(pending):
            cid = stack.container(svc)
            if not cid:
                continue
            state = stack.inspect(cid, "{{.State.Status}} {{if .State.Health}}"
                                       "{{.State.Health.Status}}{{else}}none{{end}}")
            status, health = state.split()
            if status in ("exited", "dead"):
                raise Failure("%s is %s" % (svc, status))
            if status == "running" and health in ("healthy", "none"):
                pending.discard(svc)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise Failure("not healthy within %d s: %s" % (timeout, ", ".join(sorted(pending))))
        time.sleep(1)


def make_message(token, rcpt, cls=None):
    m = EmailMessage()
    m["From"] = "app@example.com"
    m["To"] = rcpt
    m["Subject"] = "compose test " + token
    m["Message-ID"] = "<%s@test.mailferry>" % token
    if cls:
        m["X-Mailferry-Class"] = cls
    m.set_content("Sent by tests/docker/test_compose.py, token %s.\n" % token)
    return m


def sink_messages(stack):
    script = ("import glob, json\n"
              "out = []\n"
              "for f in sorted(glob.glob('/var/spool/sink/*.json')):\n"
              "    meta = json.load(open(f))\n"
              "    meta['data'] = open(f[:-5] + '.eml', 'rb').read().decode('latin-1')\n"
              "    out.append(meta)\n"
              "print(json.dumps(out))\n")
    r = stack.exec("sink", "python3", "-c", script)
    return json.loads(r.stdout)


def api_messages(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/messages" % port, timeout=5) as r:
        return json.load(r)


def wait_for(what, fn, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise Failure("%s: nothing within %d s" % (what, timeout))
        time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser(description="end-to-end test of docker/docker-compose.yml")
    ap.add_argument("--keep", action="store_true", help="leave the stack running")
    ap.add_argument("--no-build", action="store_true", help="do not build the images")
    args = ap.parse_args()

    t_start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="mailferry-docker-test-")
    os.chmod(workdir, 0o755)
    ports = {k: free_port() for k in ("smtp", "submission", "submissions", "admin", "fakeapi")}
    password = secrets.token_urlsafe(12)
    skipped = []
    stack = None
    ok = False
    try:
        with Step("engine"):
            env = engine_env()
        env.update({
            "MAILFERRY_NET": NET,
            "MAILFERRY_SMTP_PORT": str(ports["smtp"]),
            "MAILFERRY_SUBMISSION_PORT": str(ports["submission"]),
            "MAILFERRY_SUBMISSIONS_PORT": str(ports["submissions"]),
            "MAILFERRY_METRICS_PORT": str(ports["admin"]),
            "MAILFERRY_FAKEAPI_PORT": str(ports["fakeapi"]),
            "MAILFERRY_DEMO_USER": "demo",
            "MAILFERRY_DEMO_PASSWORD": password,
            "MAILFERRY_CONF": str(DOCKER / "mailferry.conf"),
        })
        stack = Stack(env, compose_command(env))
        log("compose: %s, project %s, network %s.0/24, ports %s" %
            (" ".join(stack.compose), PROJECT, NET, ports))

        with Step("clean up an earlier run"):
            stack.run("down", "-v", "--remove-orphans", capture=True, check=False)

        if not args.no_build:
            with Step("build images"):
                stack.run("build")

        with Step("setup service (CA, certificates, users file)"):
            stack.run("run", "--rm", "-T", "setup")

        with Step("detect the image's roles and transports"):
            r = stack.run("run", "--rm", "-T", "--no-deps", "router", "--help", capture=True)
            relay_role = re.search(r"^\s+relay\s", r.stdout, re.M) is not None
            log("relay role: %s" % ("yes" if relay_role else "no"))
            # Each route of the shipped file on its own: a transport the
            # build lacks is replaced below; any other refusal means
            # docker/mailferry.conf is wrong.
            sections = conf_sections(DOCKER / "mailferry.conf")
            accepted = {}
            for name, text in sections:
                if not name.startswith("route "):
                    continue
                good, why = check_config(stack, workdir, name.split()[1], text)
                log("[%s]: %s" % (name, "accepted" if good else why))
                if not good and NOT_BUILT not in why:
                    raise Failure("docker/mailferry.conf [%s] is refused: %s" % (name, why))
                accepted[name] = (good, why)
            use_relay = relay_role          # mail reaches the sink through the relay
            use_api = accepted["route api"][0]
            if relay_role and all(good for good, why in accepted.values()):
                conf = DOCKER / "mailferry.conf"
            else:
                parts = []
                for name, text in sections:
                    good, why = accepted.get(name, (True, ""))
                    if name == "route relay" and not relay_role:
                        parts += [t for n, t in conf_sections(DOCKER / "mailferry-smtp.conf")]
                        skipped.append("delivery through the relay (no relay role in the image; "
                                       "the router delivered to the sink itself)")
                    elif name == "route relay" and not good:
                        parts.append(RELAY_OVER_SMTP)
                        skipped.append("the route's own transport (%s); the router reached "
                                       "the relay through the smtp transport" % why)
                    elif name in ("route api", "policy") and not use_api:
                        if name == "route api":
                            skipped.append("delivery through the api transport (%s)" % why)
                    else:
                        parts.append(text)
                conf = Path(workdir) / "mailferry.conf"
                conf.write_text("\n".join(parts))
            ok_conf, why = check_config(stack, workdir, "effective", Path(conf).read_text())
            if not ok_conf:
                raise Failure("the router refuses %s: %s" % (conf, why))
            stack.env["MAILFERRY_CONF"] = str(conf)
            log("route file: %s" % conf)

        services = ["redis", "gateway", "router", "sink", "dns", "fakeapi"]
        if relay_role:
            services.append("relay")
        else:
            skipped.append("the relay container (no relay role in the image)")
        with Step("up"):
            stack.run("up", "-d", *services)
        with Step("wait for health checks"):
            wait_healthy(stack, services)

        with Step("the stack as configured"):
            uid = stack.exec("gateway", "id", "-u").stdout.strip()
            if uid == "0":
                raise Failure("the gateway runs as root")
            aof = stack.exec("redis", "redis-cli", "config", "get", "appendonly").stdout.split()
            if aof[-1:] != ["yes"]:
                raise Failure("redis appendonly is %s" % aof)
            ca = stack.exec("gateway", "cat", "/etc/mailferry/pki/ca.crt").stdout
            ca_path = Path(workdir) / "ca.crt"
            ca_path.write_text(ca)
            with urllib.request.urlopen("http://127.0.0.1:%d/readyz" % ports["admin"],
                                        timeout=5) as r:
                if r.status != 200:
                    raise Failure("gateway /readyz answered %d" % r.status)
            log("gateway uid %s, redis appendonly yes, gateway /readyz 200" % uid)

        tokens = {k: secrets.token_hex(6) for k in ("plain", "submission", "tls", "bulk")}
        with Step("submit from the host through 127.0.0.1"):
            tls = ssl.create_default_context(cafile=str(ca_path))
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
                s.send_message(make_message(tokens["plain"], "alice@example.net"))
            with smtplib.SMTP("localhost", ports["submission"], timeout=30) as s:
                s.starttls(context=tls)
                s.login("demo", password)
                s.send_message(make_message(tokens["submission"], "bob@example.org"))
            with smtplib.SMTP_SSL("localhost", ports["submissions"], timeout=30,
                                  context=tls) as s:
                s.login("demo", password)
                s.send_message(make_message(tokens["tls"], "carol@example.com"))
            with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as s:
                s.send_message(make_message(tokens["bulk"], "dave@example.net", cls="bulk"))
            log("4 messages accepted: plain 2525, 587 STARTTLS+AUTH, 465 TLS+AUTH, 1 bulk")

        to_sink = ["plain", "submission", "tls"] + ([] if use_api else ["bulk"])
        with Step("delivered to the sink MX" + (" through the relay" if use_relay else "")):
            def arrived():
                msgs = sink_messages(stack)
                found = {k: m for m in msgs for k in to_sink if tokens[k] in m["data"]}
                return found if len(found) == len(to_sink) else None
            found = wait_for("sink", arrived)
            for k, m in found.items():
                peer = m["peer"][0] if isinstance(m["peer"], list) else str(m["peer"])
                if use_relay and peer != RELAY_IP:
                    raise Failure("%s came from %s, not the relay %s" % (k, peer, RELAY_IP))
                log("sink got %s for %s from %s (EHLO %s)" % (k, m["rcpt_tos"], peer, m["helo"]))

        if use_api:
            with Step("delivered to the fake API"):
                got = wait_for("fakeapi", lambda: [r for r in api_messages(ports["fakeapi"])
                                                   if tokens["bulk"] in r.get("body", "")])
                r = got[0]
                if r["errors"] or not 200 <= (r["status"] or 0) < 300:
                    raise Failure("fakeapi answered %s: %s" % (r["status"], r["errors"]))
                log("fakeapi got the bulk message: %s %s -> %s for %s, id %s" % (
                    r["method"], r["path"], r["status"], r["rcpts"], r["message_id"]))
                msgs = sink_messages(stack)
                if any(tokens["bulk"] in m["data"] for m in msgs):
                    raise Failure("the bulk message reached the sink too")

        with Step("mailferryctl queue in the router container"):
            r = stack.exec("router", "mailferryctl", "--config", "/etc/mailferry/mailferry.conf",
                           "queue")
            for line in r.stdout.strip().splitlines()[:12]:
                log("  " + line)

        if args.keep:
            log("--keep: the stack stays up (project %s)" % PROJECT)
            ok = True
            return 0

        with Step("stop (SIGTERM) and exit codes"):
            cids = {s: stack.container(s) for s in services}
            t0 = time.monotonic()
            stack.run("stop", capture=True)
            dt = time.monotonic() - t0
            log("docker compose stop took %.1f s" % dt)
            for s, cid in cids.items():
                code = stack.inspect(cid, "{{.State.ExitCode}}")
                log("  %s exited %s" % (s, code))
                if s in MAILFERRY_SERVICES and code != "0":
                    raise Failure("%s exited %s after SIGTERM (137 means killed)" % (s, code))
            if dt > STOP_LIMIT:
                raise Failure("stop took %.1f s (limit %.0f s)" % (dt, STOP_LIMIT))

        with Step("down -v"):
            stack.run("down", "-v", "--remove-orphans")
        ok = True
        return 0
    except (Failure, subprocess.TimeoutExpired) as e:
        log("FAIL: %s" % e)
        if stack is not None:
            stack.run("ps", check=False)
            stack.run("logs", "--no-color", "--tail=60", check=False)
        return 1
    finally:
        if stack is not None and not ok:
            stack.run("down", "-v", "--remove-orphans", check=False, capture=True)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        for name, dt, good in Step.timings:
            log("%6.1f s  %s%s" % (dt, name, "" if good else "  (failed)"))
        log("total %.1f s" % (time.monotonic() - t_start))
        for s in skipped:
            log("skipped: " + s)
        if ok:
            log("PASS")


if __name__ == "__main__":
    sys.exit(main())
