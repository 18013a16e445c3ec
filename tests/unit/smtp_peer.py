#!/usr/bin/python3
"""SMTP peer for the smtp_client and smtp transport unit tests (aiosmtpd).

Started by tests/unit/test_smtp_client.c with Debian's /usr/bin/python3.
It listens on 127.0.0.1 (port 0 = any free port) and writes into --dir:

  port          the port it listens on, once it accepts connections
  msg-N.eml     the content of the N-th accepted message (N from 1), byte
                for byte as received after dot-unstuffing
  msg-N.env     its envelope: "from <addr>", "rcpt <addr>" lines, "mailopt"
  auth.log      one line per AUTH attempt: "<mechanism> <user> ok|fail"
  stats         "connections=<total> max_concurrent=<n> current=<n>"

With --tls-cert/--tls-key it offers STARTTLS (or, with --implicit-tls, speaks
TLS from the first byte); with --auth user:password it offers AUTH (PLAIN and
LOGIN, or --auth-mechs) over TLS only.

Recipients choose the reply to RCPT by their local part:
  temp@...  451 4.2.0    perm@...  550 5.1.1
  slow@...  250 after --slow seconds   anything else  250 2.1.5
"""
import argparse
import asyncio
import os
import signal
import ssl
import sys

from aiosmtpd.smtp import SMTP, AuthResult


class State:
    def __init__(self, directory):
        self.dir = directory
        self.total = 0
        self.current = 0
        self.max_concurrent = 0
        self.messages = 0

    def write(self, name, data, mode="wb"):
        tmp = os.path.join(self.dir, name + ".tmp")
        with open(tmp, mode) as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.dir, name))

    def stats(self):
        self.write("stats", "connections=%d max_concurrent=%d current=%d\n"
                   % (self.total, self.max_concurrent, self.current), "w")


class Handler:
    def __init__(self, state, slow, pipelining):
        self.state = state
        self.slow = slow
        self.pipelining = pipelining

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local == "temp":
            return "451 4.2.0 Mailbox temporarily unavailable"
        if local == "perm":
            return "550 5.1.1 No such user"
        if local == "slow":
            await asyncio.sleep(self.slow)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server, session, envelope):
        st = self.state
        st.messages += 1
        n = st.messages
        env = "from %s\n" % envelope.mail_from
        env += "".join("rcpt %s\n" % r for r in envelope.rcpt_tos)
        env += "mailopt %s\n" % " ".join(envelope.mail_options)
        st.write("msg-%d.eml" % n, envelope.original_content)
        st.write("msg-%d.env" % n, env, "w")
        return "250 2.0.0 Ok: queued as %d" % n


class CountingSMTP(SMTP):
    """Counts TCP connections (a STARTTLS upgrade is not a new one)."""

    def __init__(self, state, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._state = state
        self._counted = False

    def connection_made(self, transport):
        if self._original_transport is None and not self._counted:
            self._counted = True
            st = self._state
            st.total += 1
            st.current += 1
            st.max_concurrent = max(st.max_concurrent, st.current)
            st.stats()
        super().connection_made(transport)

    def connection_lost(self, error):
        if self._counted:
            self._counted = False
            self._state.current -= 1
            self._state.stats()
        super().connection_lost(error)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--implicit-tls", action="store_true",
                    help="TLS from the first byte (port 465 style) instead of STARTTLS")
    ap.add_argument("--auth", help="user:password; enables AUTH (after STARTTLS)")
    ap.add_argument("--auth-mechs", default="PLAIN,LOGIN")
    ap.add_argument("--pipelining", action="store_true")
    ap.add_argument("--smtputf8", action="store_true")
    ap.add_argument("--slow", type=float, default=2.0)
    args = ap.parse_args()

    state = State(args.dir)
    state.stats()
    handler = Handler(state, args.slow, args.pipelining)

    tls_context = None
    if args.tls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(args.tls_cert, args.tls_key)
    server_ssl = None
    if args.implicit_tls:
        server_ssl, tls_context = tls_context, None

    authenticator = None
    exclude = []
    if args.auth:
        user, password = args.auth.split(":", 1)
        wanted = set(args.auth_mechs.upper().split(","))
        exclude = [m for m in ("PLAIN", "LOGIN") if m not in wanted]

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (auth_data.login == user.encode() and auth_data.password == password.encode())
            with open(os.path.join(args.dir, "auth.log"), "a") as f:
                f.write("%s %s %s\n" % (mechanism, auth_data.login.decode(errors="replace"),
                                        "ok" if ok else "fail"))
            # handled=False: aiosmtpd sends the 535 itself.
            return AuthResult(success=ok, handled=False)
    else:
        exclude = ["PLAIN", "LOGIN"]

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def factory():
        return CountingSMTP(state, handler, hostname="peer.test", tls_context=tls_context,
                            authenticator=authenticator,
                            auth_require_tls=not args.implicit_tls,
                            auth_exclude_mechanism=exclude, enable_SMTPUTF8=args.smtputf8,
                            loop=loop)

    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", args.port,
                                                        ssl=server_ssl))
    port = server.sockets[0].getsockname()[1]
    state.write("port", "%d\n" % port, "w")
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
