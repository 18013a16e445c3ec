#!/usr/bin/python3
"""A recording MX with a slow end of data, for the tunnel tests
(test_tunnel.py) and the relay benchmark.

Run as a subprocess with Debian's /usr/bin/python3 (python3-aiosmtpd):

    /usr/bin/python3 tunnel_mx.py --host 127.0.0.31 --port 2525 --dir /tmp/mx

It is mx_recorder.py's Recorder (same replies per recipient local part,
same NNNNNN.eml / NNNNNN.json files and rcpt.log), plus one more local
part:

    slow-N@...   the reply to the end of data comes after N seconds.

While such a message waits, a line is appended to data-started.log (JSON:
rcpt_tos, time), so a test knows the content has arrived and the sender is
waiting for the reply. If the client's connection is gone when the wait
ends, the message is not recorded (the line goes to dropped.log instead):
like an MX that had not yet committed the message, it never said 250, so
keeping it would only make a duplicate of the sender's retry.

Prints "READY <port>" once it listens; exits cleanly on SIGTERM or SIGINT.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mx_recorder import Recorder  # noqa: E402

SLOW_RE = re.compile(r"^slow-(\d+)$", re.I)


class SlowRecorder(Recorder):
    """Recorder whose slow-N recipients delay the end-of-data reply."""

    def _log(self, name, envelope):
        with open(os.path.join(self.dir, name), "a") as f:
            f.write(json.dumps({"rcpt_tos": list(envelope.rcpt_tos), "time": time.time()}) + "\n")

    async def handle_DATA(self, server, session, envelope):
        delay = 0
        for r in envelope.rcpt_tos:
            m = SLOW_RE.match(r.rsplit("@", 1)[0])
            if m:
                delay = max(delay, int(m.group(1)))
        if delay:
            self._log("data-started.log", envelope)
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                # aiosmtpd cancels the handler when the connection is lost.
                self._log("dropped.log", envelope)
                raise
            transport = server.transport
            if transport is None or transport.is_closing():
                self._log("dropped.log", envelope)
                return "451 4.4.2 connection lost"
        return await super().handle_DATA(server, session, envelope)


async def serve(args):
    os.makedirs(args.dir, exist_ok=True)
    handler = SlowRecorder(args.dir, args.mode)
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
