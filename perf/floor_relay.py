r"""
The least a Twisted HTTP relay can do, to measure the floor under Vespa (not a proxy to use):
Twisted's reactor and TCP transports, httptools for the backend's answers, writes sent at once,
backend connections kept alive. No twisted.web, no checks, no limits, no logging, no
metrics, no timers; a request must have a Content-Length (or no body), the answer is
always sent chunked. A request's ``Connection`` header stops here: ``close`` closes the client's
connection after its answer, and the backend's connection is kept alive (forwarded, it would
close the backend's connection while the relay still counts it as idle).

With ``--tls CERT KEY`` it serves HTTPS through the fast path's TLS protocol
(``vast_vespa.net.lean_tls``, writes encrypted and sent at once). Measured beside nginx and
Vespa, plain and over TLS (from the repository root):
    tox -e perf -- --scenarios S3,S3-TLS --floor
"""

from __future__ import annotations

import argparse
from typing import Any, cast
from urllib.parse import urlsplit

from httptools import HttpResponseParser
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocolFactory, ITCPTransport
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from vast_vespa.net.lean_tls import LeanTLSFactory
from vast_vespa.net.listen import send_now  # writes sent at once, as the worker's
from vast_vespa.net.tls import server_tls

HOP_BY_HOP = (b"connection", b"transfer-encoding", b"content-length", b"keep-alive")


class Backend(Protocol):
    """One kept-alive backend connection, relaying one answer at a time to ``client``."""

    def __init__(self, client: Client) -> None:
        self.client: Client | None = client
        self.head: list[bytes] = []

    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).setTcpNoDelay(True)
        self.parser = HttpResponseParser(self)
        assert self.client is not None
        self.start(self.client)

    def start(self, client: Client) -> None:
        self.client = client
        self.head = [b"HTTP/1.1 200 OK\r\n"]
        send_now(self.transport, client.request)

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self.head.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self) -> None:
        assert self.client is not None
        self.head[0] = b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()
        if self.client.close_after:
            self.head.append(b"Connection: close\r\n")
        self.head.append(b"Transfer-Encoding: chunked\r\n\r\n")
        send_now(self.client.transport, b"".join(self.head))

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        send_now(self.client.transport, b"%x\r\n%b\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        IDLE.append(self)
        assert client is not None
        send_now(client.transport, b"0\r\n\r\n")
        if client.close_after:
            cast(ITCPTransport, client.transport).loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if self in IDLE:
            IDLE.remove(self)


IDLE: list[Backend] = []


class Client(Protocol):
    """A client connection: each complete request goes to an idle backend connection."""

    request = b""
    close_after = False  # the last request said "Connection: close"

    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).setTcpNoDelay(True)  # TCP, or TLS over TCP
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, end, rest = self.buffer.partition(b"\r\n\r\n")
        if not end:
            return
        length, close = 0, False
        lines = head.split(b"\r\n")
        kept = lines[:1]
        for line in lines[1:]:
            name = line[:15].lower()
            if name[:11] == b"connection:":  # stops here
                close = b"close" in line[11:].lower()
                continue
            if name == b"content-length:":
                length = int(line[15:])
            kept.append(line)
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        self.close_after = close
        self.request = b"\r\n".join(kept) + end + rest[:length]
        if IDLE:
            IDLE.pop().start(self)
        else:
            factory = ClientFactory()
            factory.buildProtocol = lambda addr: Backend(self)  # type: ignore[method-assign]
            reactor.connectTCP(BACKEND[0], BACKEND[1], factory)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("backend_url")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args()
    backend = urlsplit(args.backend_url)
    BACKEND = (backend.hostname or "127.0.0.1", backend.port or 80)
    factory: IProtocolFactory = Factory.forProtocol(Client)
    if args.tls:
        cert, key = args.tls
        found = server_tls(f"ssl:{args.port}:privateKey={key}:certKey={cert}", reactor)
        assert found is not None
        factory = LeanTLSFactory(found[1], factory, reactor)
    # Any protocol factory serves (Twisted's annotation asks for a ServerFactory).
    port = reactor.listenTCP(args.port, cast(Any, factory), backlog=1024, interface="127.0.0.1")
    address = cast(IPv4Address, port.getHost())
    print(f"floor relay on {address.port}", flush=True)  # port 0: the one it got
    reactor.run()
