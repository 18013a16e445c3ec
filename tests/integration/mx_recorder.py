#!/usr/bin/python3
"""A recording SMTP server (the "MX") for the router integration tests.

Run as a subprocess with Debian's /usr/bin/python3 (python3-aiosmtpd):

    /usr/bin/python3 mx_recorder.py --port 2525 --dir /tmp/mx [--mode normal]

It speaks ESMTP with PIPELINING, 8BITMIME and SMTPUTF8 (aiosmtpd with
decode_data=False and enable_SMTPUTF8=True; aiosmtpd reads commands from
one buffered stream, so pipelined commands are answered in order).

Every accepted message is recorded in --dir as two files:

    NNNNNN.eml    the DATA content exactly as aiosmtpd gives it
                  (envelope.original_content: dot-unstuffed, CRLF kept)
    NNNNNN.json   the envelope: mail_from ("" for <>), rcpt_tos,
                  mail_options, rcpt_options, peer, helo, seq, time

The .json file is written last and atomically (rename), so a reader that
lists *.json only ever sees complete messages. Every RCPT command is also
appended to rcpt.log (one JSON object a line: rcpt, code, reply, time),
which is how tests count delivery attempts that were refused.

Replies per recipient local part (--mode normal, the default):

    tempfail-N@...   451 4.3.0 the first N times that address is tried,
                     then 250
    perm@...         550 5.1.1 User unknown
    throttle@...     421 4.7.28 rate limited
    anything else    250

Other modes: "accept" (250 to everything), "tempfail" (451 to every RCPT),
"reject" (550 to every RCPT).

The process prints "READY <port>" on stdout once it listens, and exits
cleanly on SIGTERM or SIGINT.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time

from aiosmtpd.smtp import SMTP

TEMPFAIL_RE = re.compile(r"^tempfail-(\d+)$", re.I)

REPLY_OK = "250 2.1.5 OK"
REPLY_TEMPFAIL = "451 4.3.0 Temporary failure, try again later"
REPLY_PERM = "550 5.1.1 User unknown"
REPLY_THROTTLE = "421 4.7.28 rate limited"


class Recorder:
    """The aiosmtpd handler: decides each RCPT, records each message."""

    def __init__(self, directory, mode):
        self.dir = directory
        self.mode = mode
        self.seq = 0
        self.tries = {}            # lower-case address -> RCPT count
        self.rcpt_log = open(os.path.join(directory, "rcpt.log"), "a", buffering=1)

    def decide(self, address):
        if self.mode == "accept":
            return REPLY_OK
        if self.mode == "tempfail":
            return REPLY_TEMPFAIL
        if self.mode == "reject":
            return REPLY_PERM
        key = address.lower()
        local = key.rsplit("@", 1)[0]
        self.tries[key] = self.tries.get(key, 0) + 1
        m = TEMPFAIL_RE.match(local)
        if m:
            return REPLY_TEMPFAIL if self.tries[key] <= int(m.group(1)) else REPLY_OK
        if local == "perm":
            return REPLY_PERM
        if local == "throttle":
            return REPLY_THROTTLE
        return REPLY_OK

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # The "new" EHLO hook (aiosmtpd >= 1.3) replaces the reply lines:
        # keep aiosmtpd's and announce PIPELINING (RFC 2920) before the
        # last line.
        session.host_name = hostname
        return responses[:-1] + ["250-PIPELINING"] + responses[-1:]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.decide(address)
        code = int(reply[:3])
        self.rcpt_log.write(json.dumps({"rcpt": address, "code": code, "reply": reply,
                                        "mail_from": envelope.mail_from,
                                        "time": time.time()}) + "\n")
        if code == 250:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.append(rcpt_options)
        return reply

    async def handle_DATA(self, server, session, envelope):
        self.seq += 1
        base = os.path.join(self.dir, "%06d" % self.seq)
        data = envelope.original_content
        with open(base + ".eml", "wb") as f:
            f.write(data)
        meta = {
            "seq": self.seq,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": [list(o) for o in envelope.rcpt_options],
            "peer": list(session.peer) if isinstance(session.peer, tuple) else str(session.peer),
            "helo": session.host_name,
            "size": len(data),
            "time": time.time(),
        }
        tmp = base + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, base + ".json")
        return "250 2.0.0 Ok: queued as mx%06d" % self.seq


async def serve(args):
    os.makedirs(args.dir, exist_ok=True)
    handler = Recorder(args.dir, args.mode)
    loop = asyncio.get_running_loop()

    def factory():
        return SMTP(handler, hostname="mx.test", decode_data=False, enable_SMTPUTF8=True,
                    data_size_limit=64 * 1024 * 1024)

    server = await loop.create_server(factory, host=args.host, port=args.port,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY %d" % args.port, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dir", required=True)
    p.add_argument("--mode", default="normal", choices=("normal", "accept", "tempfail", "reject"))
    args = p.parse_args()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
