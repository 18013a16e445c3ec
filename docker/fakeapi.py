#!/usr/bin/python3
"""The email API of docker-compose.yml's demo profile.

Serves the project's fake provider (tests/integration/fake_<provider>.py,
which checks every request against the provider's published API reference
and answers like it) to the Compose network, logs one line per request,
and lists what arrived:

    fakeapi.py --provider sendgrid --cert C --key K --secret-env SENDGRID_API_KEY
               [--host 0.0.0.0] [--port 8443] [--list-port 8080]

HTTPS on --host:--port (socat in front of the fake, which listens on
loopback), with the certificate the setup service made (the router trusts
the Compose CA through the route's ca_file). The API key the
fake expects is read from the environment variable --secret-env.

Plain HTTP on --list-port: GET /messages answers a JSON array of the
requests received, oldest first (method, path, status, mode, errors,
recipients, message id, time, body as text); GET /healthz answers 200.
A request the fake found malformed has status 400 and its reasons in
"errors". SIGTERM and SIGINT stop both servers at once.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

for _d in ("/usr/local/lib/mailferry",
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration")):
    if os.path.exists(os.path.join(_d, "fake_api.py")):
        sys.path.insert(0, _d)
        break
import fake_api  # noqa: E402  (found through the path set above)


def describe(req):
    """A request as JSON-ready data."""
    return {
        "method": req.method, "path": req.path, "status": req.status, "mode": req.mode,
        "errors": req.errors, "rcpts": req.rcpts, "message_id": req.message_id,
        "time": req.time, "body": req.body.decode("utf-8", "replace"),
    }


class ListHandler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        if self.path == "/healthz":
            out = {"status": "ok"}
        elif self.path == "/messages":
            out = [describe(r) for r in self.server.fake.requests()]
        else:
            self.send_error(404)
            return
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def watch(fake, stop, forward):
    """Prints one line per request the fake answered, for `docker compose
    logs`, until stop is set (0) or socat has ended (1)."""
    seen = 0
    while True:
        stopping = stop.wait(0.5)
        if forward.poll() is not None:
            print("fakeapi: socat exited with status %d" % forward.returncode, flush=True)
            return 1
        reqs = fake.requests()
        for r in reqs[seen:]:
            print("fakeapi provider=%s method=%s path=%s status=%s rcpts=%s id=%s%s" % (
                fake.provider, r.method, r.path, r.status, ",".join(r.rcpts) or "-",
                r.message_id or "-", (" errors=%s" % json.dumps(r.errors)) if r.errors else ""),
                flush=True)
        seen = len(reqs)
        if stopping:
            return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--provider", default="sendgrid")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--list-port", type=int, default=8080)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--secret-env", required=True, help="variable holding the API key")
    a = ap.parse_args()

    secret = os.environ.get(a.secret_env, "")
    if not secret:
        ap.error("environment variable %s is not set" % a.secret_env)
    # The fake listens on loopback (it is made for tests on one host);
    # socat passes the Compose network's connections to it unchanged, TLS
    # and all.
    fake = fake_api.load(a.provider)(a.cert, a.key, secret, port=0).start()
    forward = subprocess.Popen(["socat", "TCP-LISTEN:%d,bind=%s,fork,reuseaddr" % (a.port, a.host),
                                "TCP:127.0.0.1:%d" % fake.port])

    lister = ThreadingHTTPServer((a.host, a.list_port), ListHandler)
    lister.daemon_threads = True
    lister.fake = fake
    threading.Thread(target=lister.serve_forever, daemon=True).start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    print("fakeapi provider=%s https=%s:%d list=http://%s:%d/messages" % (
        a.provider, a.host, a.port, a.host, a.list_port), flush=True)
    rc = watch(fake, stop, forward)
    forward.terminate()
    forward.wait()
    lister.shutdown()
    fake.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
