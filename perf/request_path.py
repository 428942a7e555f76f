"""
The worker's request path run warm, in one process: CPU per request from its bytes to the
backend call (which goes to a stub: no socket, no backend), for the S3 request. With
``--cycle``, S1's whole kept-alive request instead: its bytes in, the backend request out on
a pooled connection, the backend's answer (nginx's, as in S1) in, the client's answer out,
the access line and the metrics; no socket, on in-memory transports. With ``--cycle --tls``,
the same request over TLS: a kept-alive connection through the fast path's TLS protocol (a
P-256 certificate), the client a Python ``ssl`` object whose own work is timed out but
counted by ``--instructions``. With ``--cycle --new``, S1's request on a new connection each
time, which it asks to close (``Connection: close``, as NEW-TLS's wrk, over plain TCP): the
connection's set-up and close counted with the request.

    python perf/request_path.py [--requests 20000] [--cycle [--tls | --new]] [--profile]
                                [--instructions]

Under load the same path costs several times as much (under S3 against here): between two
requests the worker relays other streams' events and sleeps, so the code and data of a request
are out of the caches when it comes. The ratio is about the same for every step, so this
figure, repeatable far more closely than a load test, tells whether a change
to the request path makes it cheaper; the side-by-side run (perf/side_by_side.py) tells by how
much under load. ``--profile`` lists the functions the time goes to (cProfile).

``--instructions`` counts instead of timing: the instructions the process runs per request,
under valgrind's cachegrind (two runs of different lengths, the difference divided by the
requests between them, so start-up and warm-up drop out), with Python's hash seed fixed. On
a shared machine, where times move by a tenth from run to run, this count repeats to a
hundredth of a percent: a change of 1 % shows. It weighs every instruction alike, so C work
that runs many simple instructions (formatting a float) counts for more than its time; check
a change that moves the count with the time too.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

from bench import self_signed
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from vast_vespa import logs
from vast_vespa.net.client import LeanAgent, _Connection, _ConnectionFactory
from vast_vespa.net.dispatch import OUTBOX
from vast_vespa.net.lean_tls import LeanTLSFactory
from vast_vespa.net.tls import server_tls
from vast_vespa.settings import Settings
from vast_vespa.worker.tap import build_worker

PROMPT = b'{"model": "bench", "prompt": "Hello, streaming world", "max_tokens": 20, "stream": true}'
REQUEST = (
    b"POST /sse/20/50 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s" % (len(PROMPT), PROMPT)
)
# S1's request (perf/post.lua through wrk) and nginx's answer to it (perf/bench.py).
S1_BODY = b'{"model": "llama-3-8b", "prompt": "What is the capital of France?", "max_tokens": 64}'
S1_REQUEST = (
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nContent-Length: %d\r\n"
    b"Content-Type: application/json\r\n\r\n%s" % (len(S1_BODY), S1_BODY)
)
S1_CLOSE_REQUEST = S1_REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
S1_ANSWER_BODY = (
    b'{"id": "cmpl-7d1e", "object": "text_completion", "created": 1732800000, '
    b'"model": "llama-3-8b", "choices": [{"index": 0, "text": " Paris is the capital of '
    b'France.", "finish_reason": "stop"}], "usage": {"prompt_tokens": 12, '
    b'"completion_tokens": 8, "total_tokens": 20}}'
)
S1_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 08:40:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
    b"\r\n%s" % (len(S1_ANSWER_BODY), S1_ANSWER_BODY)
)
PEER = IPv4Address("TCP", "127.0.0.1", 50000)
HOST = IPv4Address("TCP", "127.0.0.1", 3000)
GONE = Failure(ConnectionDone())


class StubAgent:
    """Takes the backend call and never answers."""

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()


def worker_site(stub: bool = True) -> Any:
    """A worker's site as ``twistd vespa --unsecured true`` builds it, serving at once; with
    ``stub``, its backend calls go nowhere."""
    settings = dataclasses.replace(
        Settings(),
        backend_url="http://127.0.0.1:9",
        listen=(),
        unsecured=True,
        # The whole request is measured with the admin listener's metrics, on by default.
        admin_listen="" if stub else "tcp:0:interface=127.0.0.1",
    )
    service = build_worker(settings, reactor)
    service.removeService(service.getServiceNamed("lifecycle"))
    service.state.mark_loaded(reactor.seconds(), 0.0)
    service.startService()
    site = service.site
    if stub:
        site.resource._agent = StubAgent()  # the one step left out
    return site


class _TCP(StringTransport):
    """An in-memory TCP connection (the channel turns Nagle off on one, over TLS)."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class Cycle:
    """S1's request on one kept-alive client connection, relayed on one pooled backend
    connection, both on in-memory transports; the access line goes to a text log on
    /dev/null, as twistd's on stdout (logs.TextLogForTwistd)."""

    def __init__(self, site: Any) -> None:
        logs._direct_text_log = logs._TextLog(open("/dev/null", "w"))
        agent: LeanAgent = site.resource._agent
        key = (b"http", b"127.0.0.1:9")
        agent._backend(*key)
        self.backend: _Connection = _ConnectionFactory(agent, key).buildProtocol(None)
        self.backend_transport = StringTransport()
        self.backend.makeConnection(self.backend_transport)
        agent.pool.give_back(key, self.backend)
        self.server = self.factory(site)
        self.channel, self.client_transport = self.connect()

    def connect(self) -> tuple[Any, _TCP]:
        """A new client connection to the server: its protocol and in-memory transport."""
        transport = _TCP(hostAddress=HOST, peerAddress=PEER)
        channel = self.server.buildProtocol(PEER)
        channel.makeConnection(transport)
        return channel, transport

    def factory(self, site: Any) -> Any:
        """What the client connects to: the site itself."""
        return site

    def __call__(self, profile: cProfile.Profile | None = None) -> int:
        """CPU ns for one request, from its bytes to its answer's."""
        if profile is not None:
            profile.enable()
        started = time.thread_time_ns()
        self.channel.dataReceived(S1_REQUEST)
        self.backend.dataReceived(S1_ANSWER)
        spent = time.thread_time_ns() - started
        if profile is not None:
            profile.disable()
        sent, answer = self.backend_transport.value(), self.client_transport.value()
        check(sent, answer)
        self.backend_transport.clear()
        self.client_transport.clear()
        return spent


def check(sent: bytes, answer: bytes) -> None:
    """Stop if the cycle no longer relays S1's request and answer (the path changed)."""
    if not (sent.startswith(b"POST /v1/completions ") and answer.endswith(S1_ANSWER_BODY)):
        raise SystemExit(f"the cycle broke: sent {sent!r}, answered {answer!r}")


class NewConnectionCycle(Cycle):
    """:class:`Cycle` on a new client connection per request, which asks to close it: the
    worker answers, closes, and the connection is lost (as the reactor reports it); then the
    reactor's timed calls are run once, as at the end of a turn (timers a connection armed
    and cancelled are dropped there, or they would pile up in this loop). The kept-alive
    connection :class:`Cycle` makes stays open and idle, as other clients' connections on a
    worker under load."""

    def __call__(self, profile: cProfile.Profile | None = None) -> int:
        if profile is not None:
            profile.enable()
        started = time.thread_time_ns()
        channel, client_transport = self.connect()
        channel.dataReceived(S1_CLOSE_REQUEST)
        self.backend.dataReceived(S1_ANSWER)
        closed = client_transport.disconnecting
        channel.connectionLost(GONE)
        cast(Any, reactor).runUntilCurrent()  # (ReactorBase's; not in the interfaces)
        spent = time.thread_time_ns() - started
        if profile is not None:
            profile.disable()
        if not closed:
            raise SystemExit("the cycle broke: the worker kept a Connection: close one open")
        check(self.backend_transport.value(), client_transport.value())
        self.backend_transport.clear()
        return spent


class TLSCycle(Cycle):
    """:class:`Cycle` over TLS: the client's bytes encrypted by a Python ``ssl`` client,
    decrypted by the fast path's TLS protocol in front of the channel, the answer encrypted
    back; each read handled as in a reactor turn (the outbox open, then sent)."""

    def __init__(self, site: Any) -> None:
        super().__init__(site)
        while True:
            try:
                self.client.do_handshake()
                return
            except ssl.SSLWantReadError:
                self._turn(self.channel.dataReceived, self.outgoing.read())
                self._to_client()

    def factory(self, site: Any) -> Any:
        """The site behind the fast path's TLS, for a certificate made here; the client that
        trusts it is made with it."""
        work = Path(tempfile.mkdtemp(prefix="vespa-request-path-"))
        self_signed(str(work), "ec")  # cert.pem and key.pem
        found = server_tls(f"ssl:0:privateKey={work}/key.pem:certKey={work}/cert.pem", reactor)
        assert found is not None
        client = ssl.create_default_context(cafile=str(work / "cert.pem"))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        return LeanTLSFactory(found[1], site, reactor)

    @staticmethod
    def _turn(call: Any, data: bytes) -> None:
        OUTBOX.open = True
        try:
            call(data)
        finally:
            OUTBOX.send_all()

    def _to_client(self) -> None:
        self.incoming.write(self.client_transport.value())
        self.client_transport.clear()

    def __call__(self, profile: cProfile.Profile | None = None) -> int:
        self.client.write(S1_REQUEST)
        data = self.outgoing.read()
        if profile is not None:
            profile.enable()
        started = time.thread_time_ns()
        self._turn(self.channel.dataReceived, data)
        self._turn(self.backend.dataReceived, S1_ANSWER)
        spent = time.thread_time_ns() - started
        if profile is not None:
            profile.disable()
        self._to_client()
        answer = b""
        try:
            while piece := self.client.read(2**16):
                answer += piece
        except ssl.SSLWantReadError:
            pass
        check(self.backend_transport.value(), answer)
        self.backend_transport.clear()
        return spent


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


# The two lengths of run --instructions counts (requests after the warm-up): under valgrind a
# run is about fifty times slower, so far fewer than a timed run's.
COUNTED_RUNS = (1000, 3000)


def instructions(options: list[str]) -> float:
    """Instructions per request, counted by cachegrind (see the module docstring)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")

    def count(n: int) -> int:
        valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
        valgrind.append("--cachegrind-out-file=/dev/null")
        argv = [sys.executable, __file__, "--requests", str(n), *options]
        run = subprocess.run(
            [*valgrind, *argv],
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=True,
        )
        found = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
        if found is None:
            raise SystemExit(f"no instruction count from valgrind:\n{run.stderr}")
        return int(found.group(1).replace(",", ""))

    short, long = COUNTED_RUNS
    return (count(long) - count(short)) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--cycle", action="store_true", help="S1's whole request")
    connection = parser.add_mutually_exclusive_group()  # (--new is over plain TCP)
    connection.add_argument("--tls", action="store_true", help="with --cycle: over TLS")
    connection.add_argument(
        "--new", action="store_true", help="with --cycle: a new connection per request"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help=f"count instructions (valgrind, runs of {COUNTED_RUNS[0]} and {COUNTED_RUNS[1]} "
        "requests) instead",
    )
    args = parser.parse_args()
    if (args.tls or args.new) and not args.cycle:
        parser.error("--tls and --new go with --cycle")
    what = "whole request" if args.cycle else "request path"
    what += " over TLS" if args.tls else ""
    what += " on a new connection" if args.new else ""
    if args.instructions:
        flags = (("--cycle", args.cycle), ("--tls", args.tls), ("--new", args.new))
        per_request = instructions([flag for flag, given in flags if given])
        print(f"{what}: {per_request:,.0f} instructions per request")
        return
    site = worker_site(stub=not args.cycle)
    run: Any = partial(one_request, site)
    if args.cycle:
        run = TLSCycle(site) if args.tls else NewConnectionCycle(site) if args.new else Cycle(site)
    for _ in range(2000):  # warm: specialised bytecode, caches, the allocator's pools
        run()
    spent = sorted(run() for _ in range(args.requests))
    print(
        f"{what}, warm: mean {statistics.fmean(spent) / 1000:.1f} µs, "
        f"p50 {statistics.median(spent) / 1000:.1f} µs, "
        f"p10 {spent[len(spent) // 10] / 1000:.1f} µs per request ({args.requests} requests)"
    )
    if args.profile:
        profile = cProfile.Profile()
        for _ in range(5000):
            run(profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
