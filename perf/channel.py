"""
CPU per request of the HTTP/1.1 edge alone (:class:`vast_vespa.net.server.GuardedChannel` and
the site's Request), in one process: typical request heads fed to a channel on an in-memory
transport, answered by a trivial leaf resource.

    python perf/channel.py [--requests 5000] [--rounds 7]

Three shapes: GET requests one after another on a keep-alive connection, JSON POSTs (a
Content-Length body, the worker's usual request) on one, and a new connection for each POST
(as each SSE stream is). Each figure is the median over the rounds of the process CPU time per
request. To compare two versions of the channel, run this file with each on ``PYTHONPATH``,
alternating, on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from vast_vespa.site import VespaSite

PROMPT = b'{"model": "bench", "prompt": "Hello, streaming world", "max_tokens": 20, "stream": true}'
HEADERS = (
    b"Host: 127.0.0.1:3000\r\nUser-Agent: python-httpx/0.27.0\r\nAccept: text/event-stream\r\n"
    b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
    b"Authorization: Bearer 0123456789abcdef0123456789abcdef\r\n"
)
GET = b"GET /v1/models HTTP/1.1\r\n" + HEADERS + b"\r\n"
POST = (
    b"POST /v1/completions HTTP/1.1\r\n"
    + HEADERS
    + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(PROMPT), PROMPT)
)
PEER = IPv4Address("TCP", "127.0.0.1", 50000)
GONE = Failure(ConnectionDone())


class Leaf(Resource):
    isLeaf = True

    def render(self, request: object) -> bytes:
        return b"ok"


def keep_alive(site: VespaSite, raw: bytes, requests: int) -> float:
    channel = site.buildProtocol(PEER)
    transport = StringTransport()
    channel.makeConnection(transport)
    started = time.process_time()
    for _ in range(requests):
        channel.dataReceived(raw)
        transport.clear()
    spent = time.process_time() - started
    channel.connectionLost(GONE)
    return spent


def connection_each(site: VespaSite, raw: bytes, requests: int) -> float:
    started = time.process_time()
    for _ in range(requests):
        channel = site.buildProtocol(PEER)
        channel.makeConnection(StringTransport())
        channel.dataReceived(raw)
        channel.connectionLost(GONE)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    options = parser.parse_args()
    site = VespaSite(Leaf(), reactor=Clock())
    shapes = {
        "GET, keep-alive": lambda: keep_alive(site, GET, options.requests),
        "POST, keep-alive": lambda: keep_alive(site, POST, options.requests),
        "POST, connection each": lambda: connection_each(site, POST, options.requests),
    }
    for shape in shapes.values():
        shape()  # warm up
    for name, shape in shapes.items():
        figures = [shape() / options.requests * 1e6 for _ in range(options.rounds)]
        print(
            f"{name:24} median {statistics.median(figures):6.2f} µs/request"
            f"  (min {min(figures):.2f}, max {max(figures):.2f})"
        )


if __name__ == "__main__":
    main()
