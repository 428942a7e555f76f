"""
The worker's request path run warm, in one process: CPU per request from its bytes to the
backend call (which goes to a stub: no socket, no backend), for the S3 request.

    python perf/request_path.py [--requests 20000] [--profile]

Under load the same path costs several times as much (under S3 against here): between two
requests the worker relays other streams' events and sleeps, so the code and data of a request
are out of the caches when it comes. The ratio is about the same for every step, so this
figure, repeatable far more closely than a load test, tells whether a change
to the request path makes it cheaper; the side-by-side run (perf/side_by_side.py) tells by how
much under load. ``--profile`` lists the functions the time goes to (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from vast_vespa.settings import Settings
from vast_vespa.worker.tap import build_worker

PROMPT = b'{"model": "bench", "prompt": "Hello, streaming world", "max_tokens": 20, "stream": true}'
REQUEST = (
    b"POST /sse/20/50 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(PROMPT), PROMPT)
)
PEER = IPv4Address("TCP", "127.0.0.1", 50000)
HOST = IPv4Address("TCP", "127.0.0.1", 3000)
GONE = Failure(ConnectionDone())


class StubAgent:
    """Takes the backend call and never answers."""

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()


def worker_site() -> Any:
    """A worker's site as ``twistd vespa --unsecured true`` builds it, serving at once."""
    settings = dataclasses.replace(
        Settings(), backend_url="http://127.0.0.1:9", listen=(), unsecured=True, admin_listen=""
    )
    service = build_worker(settings, reactor)
    service.removeService(service.getServiceNamed("lifecycle"))
    service.state.mark_loaded(reactor.seconds(), 0.0)
    service.startService()
    site = service.site
    site.resource._agent = StubAgent()  # the one step left out
    return site


def one_request(site: Any, profile: cProfile.Profile | None = None) -> int:
    """CPU ns for one request on a new connection, from its bytes to the backend call."""
    channel = site.buildProtocol(PEER)
    channel.makeConnection(StringTransport(hostAddress=HOST, peerAddress=PEER))
    if profile is not None:
        profile.enable()
    started = time.thread_time_ns()
    channel.dataReceived(REQUEST)
    spent = time.thread_time_ns() - started
    if profile is not None:
        profile.disable()
    channel.connectionLost(GONE)  # the client leaves: the request ends (not timed)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    site = worker_site()
    for _ in range(2000):  # warm: specialised bytecode, caches, the allocator's pools
        one_request(site)
    spent = sorted(one_request(site) for _ in range(args.requests))
    print(
        f"request path, warm: p50 {statistics.median(spent) / 1000:.1f} µs, "
        f"p10 {spent[len(spent) // 10] / 1000:.1f} µs per request ({args.requests} requests)"
    )
    if args.profile:
        profile = cProfile.Profile()
        for _ in range(5000):
            one_request(site, profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
