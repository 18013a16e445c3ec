#!/usr/bin/python3
"""A stand-in email API for the demo profile of docker/docker-compose.yml.

Temporary: it answers like the providers' send endpoints closely enough
for a demo, and is to be replaced by the project's fake provider server
(tests/integration/fake_*.py) once that exists.

    fakeapi.py [--host 0.0.0.0] [--port 8080] [--dir /var/spool/fakeapi]

Every POST is recorded in --dir as NNNNNN.json: method, path, query,
headers (Authorization and API-key headers replaced by "<redacted>"), and
the body (as text when it is UTF-8, else base64). The file is written to a
temporary name and renamed, so a reader listing *.json sees whole requests
only. One log line per request goes to stdout.

Answers by path, each a success with a message id:

    /v3/mail/send                  SendGrid v3: 202, X-Message-Id header
    /v3/<domain>/messages[.mime]   Mailgun: 200 {"id": "<...>", "message"}
    /email, /email/batch           Postmark: 200 {"MessageID", "ErrorCode": 0}
    /v2/email/outbound-emails      Amazon SES v2: 200 {"MessageId"}
    anything else                  a generic webhook: 200 {"id"}

GET /healthz answers 200; GET /messages lists the recorded requests as a
JSON array. SIGTERM and SIGINT stop the server at once.
"""

import argparse
import base64
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET_HEADERS = {"authorization", "x-postmark-server-token", "x-api-key", "api-key"}
MAILGUN_RE = re.compile(r"^/v3/[^/]+/messages(\.mime)?$")


class Store:
    """Numbered, atomically written request records in one folder."""

    def __init__(self, directory):
        self.dir = directory
        self.lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self.seq = len([n for n in os.listdir(directory) if n.endswith(".json")])

    def add(self, record):
        with self.lock:
            self.seq += 1
            record["seq"] = self.seq
            base = os.path.join(self.dir, "%06d" % self.seq)
            with open(base + ".json.tmp", "w") as f:
                json.dump(record, f)
            os.replace(base + ".json.tmp", base + ".json")
            return self.seq

    def all(self):
        out = []
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".json"):
                with open(os.path.join(self.dir, name)) as f:
                    out.append(json.load(f))
        return out


class Handler(BaseHTTPRequestHandler):
    server_version = "mailferry-fakeapi/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        # One line per request on stdout, logfmt like mailferry's own logs.
        sys.stdout.write("fakeapi %s\n" % (fmt % args))
        sys.stdout.flush()

    def reply(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self.reply(200, {"status": "ok"})
        elif path == "/messages":
            self.reply(200, self.server.store.all())
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        path, _, query = self.path.partition("?")
        headers = {k: ("<redacted>" if k.lower() in SECRET_HEADERS else v)
                   for k, v in self.headers.items()}
        try:
            text, encoding = body.decode("utf-8"), "text"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(body).decode(), "base64"
        msgid = uuid.uuid4().hex
        seq = self.server.store.add({
            "method": "POST", "path": path, "query": query, "headers": headers,
            "body": text, "body_encoding": encoding, "size": len(body),
            "id": msgid, "time": time.time(),
        })
        if path == "/v3/mail/send":
            self.reply(202, {}, {"X-Message-Id": msgid})
        elif MAILGUN_RE.match(path):
            self.reply(200, {"id": "<%s@fakeapi>" % msgid, "message": "Queued. Thank you."})
        elif path in ("/email", "/email/batch"):
            self.reply(200, {"MessageID": msgid, "ErrorCode": 0, "Message": "OK",
                             "SubmittedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        elif path == "/v2/email/outbound-emails":
            self.reply(200, {"MessageId": msgid})
        else:
            self.reply(200, {"id": msgid, "seq": seq})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--dir", default="/var/spool/fakeapi")
    args = p.parse_args()

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.store = Store(args.dir)

    def stop(signum, frame):
        # shutdown() waits for serve_forever() to return, so it runs on
        # another thread than the one serving.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("fakeapi listening on %s:%d, recording to %s" % (args.host, args.port, args.dir),
          flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
