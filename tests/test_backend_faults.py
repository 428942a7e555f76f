"""
Backend faults through real sockets: each ends in a defined answer for the client and one
defined RelayResult for the observers, and the next request is served (the pool is healthy).
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import RequestNotSent, ResponseNeverReceived
from twisted.web.http_headers import Headers

from tests.fakes import FakeBackend
from tests.helpers import (
    FAST_PATH,
    TrackingFactory,
    http_client,
    listen,
    observed_worker,
    raw_request,
)
from vast_vespa.net.client import backend_agent, backend_pool
from vast_vespa.outcome import Outcome
from vast_vespa.site import VespaSite
from vast_vespa.worker.resource import Forward, WorkerResource, passthrough


class _FlakyAgent:
    """Fails the first ``failures`` calls with ``error``, then sends through ``agent``."""

    def __init__(self, agent, error, failures=1):
        self.agent = agent
        self.error = error
        self.failures = failures
        self.calls = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.calls += 1
        if self.calls <= self.failures:
            return fail(self.error)
        return self.agent.request(method, uri, headers, bodyProducer)


class BackendFaultTests(TestCase):
    def setUp(self):
        self.backend = FakeBackend(reactor)
        self.backend_url = listen(self, self.backend)
        pool = backend_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.agent = backend_agent(reactor, pool, 5, fast_path=FAST_PATH)
        self.http = http_client(self)

    def worker(self, backend_url=None, agent=None, **timeouts) -> str:
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

    async def test_refused_then_flapping_backend(self):
        """A backend that refuses connections gives 502 (errored); when it comes back on the
        same port requests are served, and it can go away and come back again."""
        factory = TrackingFactory(VespaSite(self.backend, fast_path=FAST_PATH))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
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
            port = reactor.listenTCP(number, factory, interface="127.0.0.1")
            await self.assert_healthy_after(url)
        await backend_dies()

    async def test_reset_before_headers(self):
        """A backend that resets before answering gives 502 (errored), then all is well."""
        url = self.worker()
        code, body = await self.get(url + "/reset")
        self.assertEqual((code, body["error"]), (502, "backend unavailable"))
        self.assert_result(Outcome.ERRORED, 502, "backend unavailable")
        await self.assert_healthy_after(url)

    async def test_garbage_answer(self):
        """A backend answering something that is not HTTP gives 502 (errored)."""
        url = self.worker()
        code, body = await self.get(url + "/garbage")
        self.assertEqual((code, body["error"]), (502, "backend unavailable"))
        self.assert_result(Outcome.ERRORED, 502, "backend unavailable")
        await self.assert_healthy_after(url)

    async def test_reset_mid_body_truncates(self):
        """A backend dropping the connection mid-stream: the client's response ends without its
        final chunk (never a short clean answer); the outcome is errored."""
        url = self.worker()
        raw = await raw_request(url, b"GET /break HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertIn(b"data: one", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"))
        self.assert_result(Outcome.ERRORED, 200, "backend broke mid-response")
        await self.assert_healthy_after(url)

    async def test_content_length_larger_than_sent(self):
        """A backend that sends less than its Content-Length: the client sees a short body on a
        closed connection; the outcome is errored."""
        url = self.worker()
        raw = await raw_request(url, b"GET /short HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertTrue(raw.endswith(b"only this"), raw)
        self.assertIn(b"Content-Length: 1000", raw)
        self.assert_result(Outcome.ERRORED, 200, "backend broke mid-response")
        await self.assert_healthy_after(url)

    async def test_hang_before_headers_is_504(self):
        """A backend that never answers gives 504 after BACKEND_FIRST_BYTE_TIMEOUT and its
        connection is closed (the backend sees the cancellation)."""
        url = self.worker(first_byte_timeout=0.2)
        code, body = await self.get(url + "/slow?delay=30")
        self.assertEqual((code, body["error"]), (504, "backend timeout"))
        self.assertIn("no response headers within 0.2 s", body["detail"])
        self.assert_result(Outcome.ERRORED, 504, "backend timeout")
        await self.backend.cancelled[-1]
        await self.assert_healthy_after(url)

    async def test_stalled_stream_is_cut(self):
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

    async def test_steady_stream_is_not_cut(self):
        """The stall timer restarts with every chunk: a stream slower in total than the stall
        timeout, but never silent that long, is served whole."""
        url = self.worker(stall_timeout=0.3)
        raw = await raw_request(
            url, b"GET /sse?n=4&interval=0.1 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"data: [DONE]", raw)
        self.assert_result(Outcome.SERVED, 200, "")

    async def test_connect_timeout_is_504(self):
        """A backend that cannot be connected to in time gives 504 (errored)."""
        url = self.worker(agent=_FlakyAgent(self.agent, ConnectTimeout()))
        code, body = await self.get(url + "/x")
        self.assertEqual((code, body["error"]), (504, "backend timeout"))
        self.assertEqual(self.backend.seen, [])

    async def test_request_not_sent_is_retried_once(self):
        """A request that provably never left (RequestNotSent) is sent again, once: the client
        gets the answer and the backend sees exactly one request."""
        agent = _FlakyAgent(self.agent, RequestNotSent())
        url = self.worker(agent=agent)
        response = await self.http.post(url + "/x", data=b"payload")
        self.assertEqual(response.code, 200)
        self.assertEqual(agent.calls, 2)
        self.assertEqual([(s.uri, s.body) for s in self.backend.seen], [(b"/x", b"payload")])

    async def test_request_not_sent_twice_is_502(self):
        """Only one retry: a second RequestNotSent gives 502."""
        agent = _FlakyAgent(self.agent, RequestNotSent(), failures=2)
        code, body = await self.get(self.worker(agent=agent) + "/x")
        self.assertEqual((code, body["error"]), (502, "backend unavailable"))
        self.assertEqual(agent.calls, 2)

    async def test_maybe_sent_is_never_retried(self):
        """A request that may have reached the backend (no response) is not retried."""
        error = ResponseNeverReceived([Failure(ConnectionResetError())])
        agent = _FlakyAgent(self.agent, error)
        code, _ = await self.get(self.worker(agent=agent) + "/x")
        self.assertEqual(code, 502)
        self.assertEqual(agent.calls, 1)

    async def test_broken_observer_is_logged_and_others_still_see_requests(self):
        """An observer that raises is logged once per request with its name, the next
        observer still sees every request, and the client gets its answer."""
        seen = []

        def broken(request, result, forward):
            raise RuntimeError("observer bug")

        cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

        class Gate:
            def admit(self, request):
                return passthrough(request, cooperator)

        resource = WorkerResource(
            Gate(),
            self.agent,
            reactor,
            self.backend_url,
            observers=(broken, lambda request, result, forward: seen.append(result.status)),
        )
        url = listen(self, VespaSite(resource, fast_path=FAST_PATH))
        for path in ("/status/200", "/status/404"):
            response = await self.http.get(url + path)
            self.assertEqual(response.code, int(path[-3:]))
            await response.content()
        self.assertEqual(seen, [200, 404])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_failed_accounting_still_ends_the_request(self):
        """If recording a finished request's outcome (the gate's ``on_done``) raises, the
        error is logged, and the observers and the drain still hear that it ended."""
        seen = []
        cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

        def broken(result):
            raise RuntimeError("accounting bug")

        class Gate:
            def admit(self, request):
                forward = passthrough(request, cooperator)
                forward.on_done = broken
                return forward

        resource = WorkerResource(
            Gate(),
            self.agent,
            reactor,
            self.backend_url,
            observers=(lambda request, result, forward: seen.append(result.status),),
        )
        url = listen(self, VespaSite(resource, fast_path=FAST_PATH))
        response = await self.http.get(url + "/status/200")
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(seen, [200])
        self.assertEqual(resource.in_flight.requests, set())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_an_agent_that_raises_is_an_internal_error(self):
        """An agent that raises instead of failing its Deferred (a bug, not a backend fault)
        gives the client a JSON 500 and the observers an errored result; the traceback is
        logged, no time limit is left running, and the next request is served."""

        class RaisingOnce(_FlakyAgent):
            def request(self, method, uri, headers=None, bodyProducer=None):
                self.calls += 1
                if self.calls == 1:
                    raise RuntimeError("agent bug")
                return self.agent.request(method, uri, headers, bodyProducer)

        url = self.worker(
            agent=RaisingOnce(self.agent, None), request_timeout=30, first_byte_timeout=30
        )
        code, body = await self.get(url + "/x")
        self.assertEqual(
            (code, body), (500, {"error": "internal error", "detail": "see the worker log"})
        )
        self.assert_result(Outcome.ERRORED, 500, "internal error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        relay_timers = [
            call
            for call in reactor.getDelayedCalls()
            if type(getattr(call.func, "__self__", None)).__name__ == "ProxiedRequest"
        ]
        self.assertEqual(relay_timers, [])
        await self.assert_healthy_after(url)

    async def test_a_relay_that_cannot_start_after_a_wait_is_answered(self):
        """A request admitted after a wait for a slot, whose relay then cannot even start (a
        bug), is answered with a JSON 500; its slot is given back (``on_done``), and the
        observers and the drain hear that it ended."""
        done, seen = [], []
        slot = Deferred()

        class Gate:
            def admit(self, request):
                forward = Forward("not bytes", Headers(), None)  # type: ignore[arg-type]
                forward.on_done = done.append
                return slot.addCallback(lambda _: forward)

        resource = WorkerResource(
            Gate(),
            self.agent,
            reactor,
            self.backend_url,
            observers=(lambda request, result, forward: seen.append(result),),
        )
        url = listen(self, VespaSite(resource, fast_path=FAST_PATH))
        answer = self.http.get(url + "/x")
        reactor.callLater(0.01, slot.callback, None)
        response = await answer
        self.assertEqual(response.code, 500)
        self.assertEqual((await response.json())["error"], "internal error")
        self.assertEqual([(r.outcome, r.status) for r in done], [(Outcome.ERRORED, 500)])
        self.assertEqual(seen, done)
        self.assertEqual(resource.in_flight.requests, set())
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(self.backend.seen, [])

    async def test_internal_error_body_has_no_traceback(self):
        """An unexpected error inside the worker gives a JSON 500 with no traceback and no
        internals in the body (the details go to the log)."""

        class BrokenGate:
            def admit(self, request):
                raise RuntimeError("secret-token-1234 exploded")

        resource = WorkerResource(BrokenGate(), self.agent, reactor, self.backend_url)
        url = listen(self, VespaSite(resource, fast_path=FAST_PATH))
        response = await self.http.get(url + "/x")
        body = await response.content()
        self.assertEqual(response.code, 500)
        self.assertEqual(
            json.loads(body), {"error": "internal error", "detail": "see the worker log"}
        )
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(b"secret-token", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(resource.in_flight.requests, set())  # a drain would not wait for it
