#!/usr/bin/python3
"""A recording MX that offers STARTTLS, for the relay integration tests.

Run as a subprocess with Debian's /usr/bin/python3 (python3-aiosmtpd):

    /usr/bin/python3 relay_mx.py --host 127.0.0.13 --port 2525 --dir /tmp/mx \
        --tls-cert mx.crt --tls-key mx.key

It is mx_recorder.py's Recorder (same replies per recipient local part,
same NNNNNN.eml / NNNNNN.json files, rcpt.log), served by aiosmtpd with a
TLS context, so that EHLO announces STARTTLS (RFC 3207). For every accepted
message it also writes, before the .json file appears:

    NNNNNN.tls    the TLS version the message came over ("TLSv1.3"), or
                  "none" when the client did not use STARTTLS

The process prints "READY <port>" once it listens and exits cleanly on
SIGTERM or SIGINT.
"""

import argparse
import asyncio
import os
import signal
import ssl
import sys

from aiosmtpd.smtp import SMTP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mx_recorder import Recorder  # noqa: E402


class TLSRecorder(Recorder):
    """Recorder that notes whether each message came over TLS."""

    async def handle_DATA(self, server, session, envelope):
        version = "none"
        if session.ssl is not None:
            obj = session.ssl.get("ssl_object") if hasattr(session.ssl, "get") else None
            version = obj.version() if obj is not None else "unknown"
        path = os.path.join(self.dir, "%06d.tls" % (self.seq + 1))
        with open(path + ".tmp", "w") as f:
            f.write(version + "\n")
        os.replace(path + ".tmp", path)
        return await super().handle_DATA(server, session, envelope)


async def serve(args):
    os.makedirs(args.dir, exist_ok=True)
    handler = TLSRecorder(args.dir, args.mode)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    loop = asyncio.get_running_loop()

    def factory():
        return SMTP(handler, hostname="mx.tls.test", decode_data=False, enable_SMTPUTF8=True,
                    data_size_limit=64 * 1024 * 1024, tls_context=ctx, require_starttls=False)

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
    p.add_argument("--tls-cert", required=True)
    p.add_argument("--tls-key", required=True)
    args = p.parse_args()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
