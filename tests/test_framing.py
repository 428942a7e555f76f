"""
Hostile or malformed HTTP/1.1 framing, sent as raw bytes to a real worker: every case gets a
JSON error with the right status and a closed connection, the backend sees nothing, and the
worker serves the next client normally.
"""

from __future__ import annotations

import json
from typing import cast

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from tests.fakes import FakeBackend
from tests.helpers import http_client, listen, raw_request, start_worker
from tests.memory import MemoryWorker
from vast_vespa.site import VespaSite

POST = b"POST /x HTTP/1.1\r\nHost: w\r\n"
GET = b"GET /x HTTP/1.1\r\nHost: w\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: w\r\n\r\n"

# name -> (raw request, expected status). The checks: llhttp's and vast_vespa/net/server.py's.
# (Absolute-form targets are well framed: WorkerResource answers them 400 with a request id on
# a connection that stays open; see test_relay and test_logs.)
CASES: dict[str, tuple[bytes, int]] = {
    "CL and TE together": (
        POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two differing CL": (POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "two equal CL": (POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "CL list": (POST + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "CL +1": (POST + b"Content-Length: +1\r\n\r\na", 400),
    "CL -1": (POST + b"Content-Length: -1\r\n\r\na", 400),
    "CL empty": (POST + b"Content-Length: \r\n\r\n", 400),
    "CL hex": (POST + b"Content-Length: 0x3\r\n\r\nabc", 400),
    "CL overflow": (POST + b"Content-Length: 99999999999999999999999999\r\n\r\n", 400),
    "CL of 5000 digits": (POST + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    "CL of 20 digits": (POST + b"Content-Length: " + b"9" * 20 + b"\r\n\r\n", 400),
    "CL 2^64": (POST + b"Content-Length: 18446744073709551616\r\n\r\n", 400),
    "CL 2^64 - 1": (POST + b"Content-Length: 18446744073709551615\r\n\r\n", 413),
    "TE identity": (POST + b"Transfer-Encoding: identity\r\n\r\n", 400),
    "TE chunked, identity": (POST + b"Transfer-Encoding: chunked, identity\r\n\r\n", 400),
    "TE gzip": (POST + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    "TE gzip, chunked": (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    "TE twice": (
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "chunk size 0x": (POST + b"Transfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n", 400),
    "chunk size negative": (
        POST + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "chunk extension NUL": (
        POST + b"Transfer-Encoding: chunked\r\n\r\n3;\x00\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "chunk without CRLF": (POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n", 400),
    "chunk size of 2^64": (
        POST + b"Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        400,
    ),
    "control byte in name": (GET + b"X-A\x01b: 1\r\n\r\n", 400),
    "space in name": (GET + b"X-A b: 1\r\n\r\n", 400),
    "space before colon": (GET + b"X-A : 1\r\n\r\n", 400),
    "empty name": (GET + b": 1\r\n\r\n", 400),
    "NUL in value": (GET + b"X-A: a\x00b\r\n\r\n", 400),
    "bare CR in value": (GET + b"X-A: a\rb\r\n\r\n", 400),
    "C0 control in value": (GET + b"X-A: a\x01b\r\n\r\n", 400),
    "vertical tab in value": (GET + b"X-A: a\x0bb\r\n\r\n", 400),
    "form feed in value": (GET + b"X-A: a\x0cb\r\n\r\n", 400),
    "DEL in value": (GET + b"X-A: a\x7fb\r\n\r\n", 400),
    "obs-fold": (GET + b"X-A: a\r\n  b\r\n\r\n", 400),
    "two Host headers": (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "no Host in HTTP/1.1": (b"GET /x HTTP/1.1\r\n\r\n", 400),
    "CONNECT": (b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    "TRACE": (b"TRACE /x HTTP/1.1\r\nHost: w\r\n\r\n", 405),
    "HTTP/2.0 on a 1.1 port": (b"GET /x HTTP/2.0\r\nHost: w\r\n\r\n", 505),
    "HTTP/9.9": (b"GET /x HTTP/9.9\r\nHost: w\r\n\r\n", 505),
    "garbage version": (b"GET /x FOO\r\nHost: w\r\n\r\n", 400),
    "HTTP/0.9 request": (b"GET /x\r\n\r\n", 400),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: w\r\n\r\n", 400),
    "control byte in method": (b"G\x01T /x HTTP/1.1\r\nHost: w\r\n\r\n", 400),
    "header line starts with space": (b"GET /x HTTP/1.1\r\n X-A: 1\r\nHost: w\r\n\r\n", 400),
    "request line too long": (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: w\r\n\r\n", 414),
    "header too large": (GET + b"X-A: " + b"a" * 20000 + b"\r\n\r\n", 431),
    "headers too large together": (
        GET + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20)) + b"\r\n",
        431,
    ),
    "too many headers": (GET + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
    "TE then CL": (POST + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    "ESC in value": (GET + b"X-A: a\x1bb\r\n\r\n", 400),
    "US in value": (GET + b"X-A: a\x1fb\r\n\r\n", 400),
    "control byte in target": (b"GET /a\x01b HTTP/1.1\r\nHost: w\r\n\r\n", 400),
    "DEL in target": (b"GET /a\x7fb HTTP/1.1\r\nHost: w\r\n\r\n", 400),
    "tab in target": (b"GET /a\tb HTTP/1.1\r\nHost: w\r\n\r\n", 400),
    "lowercase trace": (b"trace /x HTTP/1.1\r\nHost: w\r\n\r\n", 405),
    "unknown method": (b"BREW /x HTTP/1.1\r\nHost: w\r\n\r\n", 405),
    "LF-only line ends": (b"GET /x HTTP/1.1\nHost: w\n\n", 400),
    "LF-only end of head": (GET + b"\n", 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: w\r\n\r\n", 400),
    "GET *": (b"GET *?a=1 HTTP/1.1\r\nHost: w\r\n\r\n", 400),
    "upgrade with a body": (
        POST
        + b"Connection: upgrade\r\nUpgrade: websocket\r\nContent-Length: %d\r\n\r\n%s"
        % (len(SMUGGLED), SMUGGLED),
        400,
    ),
    "upgrade with a chunked body": (
        POST + b"Connection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
}
# Refused by llhttp at once (the old parser waited for a deadline, raised, or let them through).
IMMEDIATE = (
    "CL of 5000 digits",
    "CL of 20 digits",
    "OPTIONS *",
    "TE identity",
    "chunk size of 2^64",
    "LF-only line ends",
    "LF-only end of head",
)


class FramingTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.url, self.worker = start_worker(self, listen(self, self.backend))

    async def assert_refused(self, name: str, payload: bytes, code: int) -> None:
        raw = await raw_request(self.url, payload)  # returns once the worker closed
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 %d " % code), f"{name}: {raw[:200]!r}")
        self.assertIn(b"content-type: application/json", head.lower(), name)
        error = json.loads(body)
        self.assertEqual(set(error), {"error", "detail"}, name)
        self.assertNotIn("Traceback", error["detail"], name)
        self.assertEqual(self.backend.seen, [], name)

    async def test_malformed_framing_is_refused_and_closed(self) -> None:
        """Each malformed or ambiguous request gets its 4xx/5xx JSON error and a closed
        connection, and nothing of it reaches the backend."""
        for name, (payload, code) in CASES.items():
            await self.assert_refused(name, payload, code)

    async def test_worker_serves_after_every_refusal(self) -> None:
        """After all the hostile requests, a normal request is served and reaches the backend
        exactly once, well formed."""
        for payload, _ in CASES.values():
            await raw_request(self.url, payload)
        response = await http_client(self).post(self.url + "/after", data=b"fine")
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["body_length"], 4)
        self.assertEqual(
            [(s.method, s.uri, s.body) for s in self.backend.seen], [(b"POST", b"/after", b"fine")]
        )

    async def test_smuggled_request_after_refusal_never_runs(self) -> None:
        """A second request pipelined behind a refused one (the classic smuggling shape) is
        never parsed: the connection is closed after the error."""
        payload = (
            POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
        )
        raw = await raw_request(self.url, payload)
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1, raw)
        self.assertEqual(self.backend.seen, [])

    async def test_405_lists_allowed_methods(self) -> None:
        """CONNECT/TRACE are answered 405 with an Allow header naming what is relayed."""
        raw = await raw_request(self.url, b"TRACE / HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertIn(b"\r\nallow: GET, HEAD, POST", raw)

    async def test_lenient_but_unambiguous_input_is_served(self) -> None:
        """What RFC 9112 allows stays allowed: OWS around Content-Length, a TAB inside a value,
        `Chunked` in any case, HTTP/1.0 without Host, a chunk size with leading zeros (llhttp
        reads it in constant memory; the body reaches the backend decoded, never as chunks)."""
        chunked = POST + b"Transfer-Encoding: Chunked\r\nConnection: close\r\n\r\n"
        cases = [
            POST + b"Content-Length:  3 \r\nConnection: close\r\n\r\nabc",
            GET + b"X-A: a\tb\r\nConnection: close\r\n\r\n",
            chunked + b"3\r\nabc\r\n0\r\n\r\n",
            b"GET /x HTTP/1.0\r\n\r\n",
            chunked + b"0" * 2000 + b"3\r\nabc\r\n0\r\n\r\n",
        ]
        for payload in cases:
            raw = await raw_request(self.url, payload)
            self.assertTrue(raw.startswith(b"HTTP/1.1 200") or raw.startswith(b"HTTP/1.0 200"), raw)
        self.assertEqual([s.body for s in self.backend.seen], [b"abc", b"", b"abc", b"", b"abc"])
        self.assertEqual(self.backend.seen[1].headers[b"x-a"], [b"a\tb"])


class _Seen(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(request.uri)
        return b"ok"


class ImmediateRefusalTests(SynchronousTestCase):
    def test_refused_as_soon_as_it_arrives(self) -> None:
        """A Content-Length of thousands of digits (or 20), `Transfer-Encoding: identity`, a
        chunk size of 2^64, LF-only line ends and `OPTIONS *` are answered 400 in the read
        that brings them: no deadline has to pass, nothing raises (no error or traceback in
        the log), nothing reaches the resource."""
        events: list[dict] = []
        observer = cast(ILogObserver, events.append)  # any callable taking the event
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        for name in IMMEDIATE:
            payload, code = CASES[name]
            resource = _Seen()
            clock = Clock()
            site = VespaSite(resource, reactor=clock)
            channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
            transport = StringTransport()
            channel.makeConnection(transport)
            channel.dataReceived(payload)
            status = transport.value().split(b"\r\n", 1)[0]
            self.assertEqual(status, b"HTTP/1.1 %d Bad Request" % code, name)
            self.assertTrue(transport.disconnecting, name)
            self.assertEqual(resource.seen, [], name)
            self.assertEqual(site.refusals["bad request"], 1, name)
            channel.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(clock.getDelayedCalls(), [], name)
        loud = [e for e in events if e["log_level"] >= LogLevel.warn or "log_failure" in e]
        self.assertEqual(loud, [])


class UnderscoreHeaderTests(SynchronousTestCase):
    def test_header_names_with_underscores_are_dropped(self) -> None:
        """`X_Forwarded_For` (read as X-Forwarded-For by WSGI/ASGI backends) never reaches
        the backend; other headers do; the drop is counted."""
        worker = MemoryWorker(self, signed=False)
        answer = worker.get("/x", {"X_Forwarded_For": "6.6.6.6", "X-Kept": "1", "a_b": "2"})
        self.assertEqual(answer.code, 200)
        [seen] = worker.backend.seen
        names = {name.lower() for name in seen.headers}
        self.assertIn(b"x-kept", names)
        self.assertFalse([name for name in names if b"_" in name], names)
        self.assertNotIn(b"6.6.6.6", b"".join(seen.headers[b"x-forwarded-for"]))
        self.assertEqual(worker.site.dropped_headers, 2)
