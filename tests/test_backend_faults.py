"""
Backend faults through real sockets: each ends in a defined answer for the client and one
defined RelayResult for the observers, and the next request is served (the pool is healthy).
(The resource's own faults, in memory, are in tests/test_resource.py.)
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import RequestNotSent, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from tests.fakes import FakeBackend
from tests.helpers import (
    FAST_PATH,
    TrackingFactory,
    http_client,
    listen,
    listen_tcp,
    observed_worker,
    raw_request,
)
from vast_vespa.net.client import backend_agent, backend_pool
from vast_vespa.outcome import Outcome
from vast_vespa.site import VespaSite


@implementer(IAgent)
class _FlakyAgent:
    """Fails the first ``failures`` calls with ``error``, then sends through ``agent``."""

    def __init__(self, agent: IAgent, error: BaseException | Failure, failures: int = 1) -> None:
        self.agent = agent
        self.error = error
        self.failures = failures
        self.calls = 0

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.calls += 1
        if self.calls <= self.failures:
            return fail(self.error)
        return self.agent.request(method, uri, headers, bodyProducer)


class _SilentAfterOneEvent(Protocol):
    """A backend whose answer ends with its connection (HTTP/1.0 style) and says one event,
    then nothing."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n"
            )


class BackendFaultTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.backend_url = listen(self, self.backend)
        pool = backend_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = backend_agent(reactor, pool, 5, fast_path=FAST_PATH)
        self.http = http_client(self)

    def worker(self, backend_url: str | None = None, agent: Any = None, **timeouts: float) -> str:
        url, self.results = observed_worker(
            self, backend_url or self.backend_url, agent or self.agent, **timeouts
        )
        return url

    async def get(self, url: str) -> tuple[int, dict]:
        response = await self.http.get(url)
        return response.code, await response.json()

    async def assert_healthy_after(self, url: str) -> None:
        """The next request through the same worker (and pool) is served normally."""
        before = len(self.backend.seen)
        code, body = await self.get(url + "/after")
        self.assertEqual((code, body["uri"]), (200, "/after"))
        self.assertEqual(len(self.backend.seen), before + 1)
        self.assertEqual(self.results[-1].outcome, Outcome.SERVED)

    def assert_result(self, outcome: Outcome, status: int, reason: str) -> None:
        result = self.results[-1]
        self.assertEqual((result.outcome, result.status), (outcome, status))
        self.assertIn(reason, result.reason)

    async def test_refused_then_flapping_backend(self) -> None:
        """A backend that refuses connections gives 502 (errored); when it comes back on the
        same port requests are served, and it can go away and come back again."""
        factory = TrackingFactory(VespaSite(self.backend, fast_path=FAST_PATH))
        port = listen_tcp(factory)
        number = port.getHost().port
        url = self.worker(f"http://127.0.0.1:{number}")

        async def backend_dies() -> None:
            await port.stopListening()
            for protocol in list(factory.protocols):
                protocol.transport.abortConnection()
            await gatherResults(factory.gone)

        for _ in range(2):
            await backend_dies()
            code, body = await self.get(url + "/down")
            self.assertEqual((code, body["error"]), (502, "backend unavailable"))
            self.assertNotIn("Traceback", body["detail"])
            self.assert_result(Outcome.ERRORED, 502, "backend unavailable")
            port = listen_tcp(factory, number)
            await self.assert_healthy_after(url)
        await backend_dies()

    async def test_reset_before_headers(self) -> None:
        """A backend that resets before answering gives 502 (errored), then all is well."""
        url = self.worker()
        code, body = await self.get(url + "/reset")
        self.assertEqual((code, body["error"]), (502, "backend unavailable"))
        self.assert_result(Outcome.ERRORED, 502, "backend unavailable")
        await self.assert_healthy_after(url)

    async def test_garbage_answer(self) -> None:
        """A backend answering something that is not HTTP gives 502 (errored)."""
        url = self.worker()
        code, body = await self.get(url + "/garbage")
        self.assertEqual((code, body["error"]), (502, "backend unavailable"))
        self.assert_result(Outcome.ERRORED, 502, "backend unavailable")
        await self.assert_healthy_after(url)

    async def test_reset_mid_body_truncates(self) -> None:
        """A backend dropping the connection mid-stream: the client's response ends without its
        final chunk (never a short clean answer); the outcome is errored."""
        url = self.worker()
        raw = await raw_request(url, b"GET /break HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertIn(b"data: one", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        self.assert_result(Outcome.ERRORED, 200, "backend broke mid-response")
        await self.assert_healthy_after(url)

    async def test_content_length_larger_than_sent(self) -> None:
        """A backend that sends less than its Content-Length: the client sees a short body on a
        closed connection; the outcome is errored."""
        url = self.worker()
        raw = await raw_request(url, b"GET /short HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertTrue(raw.endswith(b"only this"), raw)
        self.assertIn(b"Content-Length: 1000", raw)
        self.assert_result(Outcome.ERRORED, 200, "backend broke mid-response")
        await self.assert_healthy_after(url)

    async def test_hang_before_headers_is_504(self) -> None:
        """A backend that never answers gives 504 after BACKEND_FIRST_BYTE_TIMEOUT and its
        connection is closed (the backend sees the cancellation)."""
        url = self.worker(first_byte_timeout=0.2)
        code, body = await self.get(url + "/slow?delay=30")
        self.assertEqual((code, body["error"]), (504, "backend timeout"))
        self.assertIn("no response headers within 0.2 s", body["detail"])
        self.assert_result(Outcome.ERRORED, 504, "backend timeout")
        await self.backend.cancelled[-1]
        await self.assert_healthy_after(url)

    async def test_stalled_stream_is_cut(self) -> None:
        """A stream that goes silent longer than BACKEND_STALL_TIMEOUT is cut on both sides:
        the client sees a truncated stream, the backend sees the disconnect."""
        url = self.worker(stall_timeout=0.3)
        raw = await raw_request(url, b"GET /sse?n=3&interval=30 HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertIn(b"data: event 0", raw)
        self.assertNotIn(b"event 1", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        self.assert_result(Outcome.ERRORED, 200, "stalled for 0.3 s")
        await self.backend.cancelled[-1]
        await self.assert_healthy_after(url)

    async def test_stalled_stream_ending_with_its_connection_is_cut(self) -> None:
        """A stream without Content-Length or chunks (it ends when its connection closes) that
        goes silent is cut the same way: closing the backend connection ourselves is not the
        stream's end, so the client never sees a clean final chunk."""
        backend = listen(self, Factory.forProtocol(_SilentAfterOneEvent))
        for limit in ({"stall_timeout": 0.3}, {"request_timeout": 0.3}):
            url = self.worker(backend, **limit)
            raw = await raw_request(url, b"GET /sse HTTP/1.1\r\nHost: w\r\n\r\n")
            self.assertIn(b"data: 1", raw)
            self.assertFalse(raw.endswith(b"0\r\n\r\n"), raw)
            self.assert_result(Outcome.ERRORED, 200, "0.3 s")

    async def test_steady_stream_is_not_cut(self) -> None:
        """The stall timer restarts with every chunk: a stream slower in total than the stall
        timeout, but never silent that long, is served whole."""
        url = self.worker(stall_timeout=0.3)
        raw = await raw_request(
            url, b"GET /sse?n=4&interval=0.1 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"data: [DONE]", raw)
        self.assert_result(Outcome.SERVED, 200, "")

    async def test_request_timeout_cuts_a_steady_stream(self) -> None:
        """REQUEST_TIMEOUT bounds the whole call: a stream still going when it passes is cut
        (the client never sees a clean end), and the reason says so rather than "no
        response", as the headers came long before."""
        url = self.worker(request_timeout=0.3)
        raw = await raw_request(
            url, b"GET /sse?n=20&interval=0.05 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"data: event 1", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"), raw)
        self.assert_result(
            Outcome.ERRORED, 200, "answer still coming after 0.3 s, the whole-call limit"
        )

    async def test_connect_timeout_is_504(self) -> None:
        """A backend that cannot be connected to in time gives 504 (errored)."""
        url = self.worker(agent=_FlakyAgent(self.agent, ConnectTimeout()))
        code, body = await self.get(url + "/x")
        self.assertEqual((code, body["error"]), (504, "backend timeout"))
        self.assertEqual(self.backend.seen, [])

    async def test_request_not_sent_is_retried_once(self) -> None:
        """A request that provably never left (RequestNotSent) is sent again, once: the client
        gets the answer and the backend sees exactly one request."""
        agent = _FlakyAgent(self.agent, RequestNotSent())
        url = self.worker(agent=agent)
        response = await self.http.post(url + "/x", data=b"payload")
        self.assertEqual(response.code, 200)
        self.assertEqual(agent.calls, 2)
        self.assertEqual([(s.uri, s.body) for s in self.backend.seen], [(b"/x", b"payload")])

    async def test_request_not_sent_twice_is_502(self) -> None:
        """Only one retry: a second RequestNotSent gives 502."""
        agent = _FlakyAgent(self.agent, RequestNotSent(), failures=2)
        code, body = await self.get(self.worker(agent=agent) + "/x")
        self.assertEqual((code, body["error"]), (502, "backend unavailable"))
        self.assertEqual(agent.calls, 2)

    async def test_maybe_sent_is_never_retried(self) -> None:
        """A request that may have reached the backend (no response) is not retried."""
        error = ResponseNeverReceived([Failure(ConnectionResetError())])
        agent = _FlakyAgent(self.agent, error)
        code, _ = await self.get(self.worker(agent=agent) + "/x")
        self.assertEqual(code, 502)
        self.assertEqual(agent.calls, 1)
