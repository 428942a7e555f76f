"""
The TLS layer's own CPU, in one process and without sockets: the server side of resumed TLS 1.3
connections (Python's ssl module as the client, as wrk's OpenSSL) served by the fast path's
``LeanTLSProtocol`` and by Twisted's own (``TLSMemoryBIOFactory``), each reactor turn emulated
(the outbox opened and sent; ``callLater(0)`` run). Only the server's calls are timed (thread
CPU time), so other processes on the machine move the figures little.

    python perf/tls_layer.py [--connections 400] [--requests 3000] [--rounds 3]
                             [--full] [--tls-key rsa|ec]

``close``: CPU µs per connection (handshake, one request, response, close_notify both ways),
and the writes to the TCP transport per connection; ``kept``: CPU µs per request on one
connection. ``--full``: every connection makes a full handshake instead (a client that keeps
no session), which signs with the certificate's key: RSA-2048 (default) or EC P-256.
"""

from __future__ import annotations

import argparse
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import self_signed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from vast_vespa.net.dispatch import OUTBOX
from vast_vespa.net.lean_tls import LeanTLSFactory
from vast_vespa.net.tls import server_tls

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 300\r\n\r\n"
BODY = b"x" * 300


class Answer(Protocol):
    """Answers each request with a head and a body, two writes, as twisted.web does."""

    close = True

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(HEAD)
        self.transport.write(BODY)
        if self.close:
            self.transport.loseConnection()


class Counting(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Server:
    """One kind of TLS factory, its server-side calls timed."""

    def __init__(self, factory: Any, clock: Clock) -> None:
        self.factory = factory
        self.clock = clock
        self.cpu = 0.0

    def turn(self, call: Callable[..., Any], *args: Any) -> None:
        """``call(*args)`` as in a turn of the reactor: the outbox open, then sent; then what
        ``callLater(0)`` scheduled."""
        started = time.thread_time()
        OUTBOX.open = True
        try:
            call(*args)
        finally:
            OUTBOX.send_all()
        self.clock.advance(0)
        self.cpu += time.thread_time() - started


def connection(
    server: Server, client: ssl.SSLContext, session: Any, requests: int, close: bool
) -> tuple[Any, int]:
    """A connection resuming ``session`` (None: a full handshake); (its session, the writes
    to the TCP transport)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1", session=session)
    protocol = server.factory.buildProtocol(None)
    protocol.wrappedProtocol.close = close
    transport = Counting()
    server.turn(protocol.makeConnection, transport)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            server.turn(protocol.dataReceived, outgoing.read())
            incoming.write(transport.value())
            transport.clear()
    for _ in range(requests):
        tls.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        server.turn(protocol.dataReceived, outgoing.read())
        incoming.write(transport.value())
        transport.clear()
        answer = b""
        try:
            while piece := tls.read(65536):
                answer += piece
        except ssl.SSLWantReadError:
            pass
        assert answer == HEAD + BODY, answer
    if close:
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        server.turn(protocol.dataReceived, outgoing.read())
        server.turn(protocol.connectionLost, None)
    return tls.session, transport.writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=400)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="full handshakes, no resumption")
    parser.add_argument("--tls-key", choices=["rsa", "ec"], default="rsa")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vespa-tls-layer-"))
    self_signed(str(work), args.tls_key)  # cert.pem and key.pem
    clock = Clock()
    found = server_tls(f"ssl:1:privateKey={work}/key.pem:certKey={work}/cert.pem", clock)
    assert found is not None
    client = ssl.create_default_context(cafile=str(work / "cert.pem"))
    kinds = {
        "lean (fast path)": lambda f: LeanTLSFactory(found[1], f, clock),
        "Twisted's": lambda f: TLSMemoryBIOFactory(found[1], False, f, clock),
    }
    for round_ in range(1, args.rounds + 1):
        for name, kind in kinds.items():
            server = Server(kind(Factory.forProtocol(Answer)), clock)
            session, _ = connection(server, client, None, 1, True)
            server.cpu, writes = 0.0, 0
            for _ in range(args.connections):
                session, sent = connection(server, client, None if args.full else session, 1, True)
                writes += sent
            per_connection = server.cpu / args.connections * 1e6
            server.cpu = 0.0
            connection(server, client, session, args.requests, False)
            per_request = server.cpu / args.requests * 1e6
            print(
                f"round {round_} {name:16} close: {per_connection:5.0f} µs/connection, "
                f"{writes / args.connections:.1f} writes/connection; "
                f"kept: {per_request:5.1f} µs/request"
            )


if __name__ == "__main__":
    main()
