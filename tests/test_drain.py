"""Graceful drain on shutdown: in-flight requests and streams finish, new ones are refused."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from tests.fakes import FakeBackend
from tests.helpers import http_client, listen, spawn_worker, start_worker, until, worker_url


class DrainTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.backend_url = listen(self, self.backend)
        self.http = http_client(self)

    async def test_stream_in_flight_finishes(self) -> None:
        """On stop, a stream in flight runs to its end, the drain hooks run first with the
        worker marked draining, new requests get 503 "draining", and the stop waits for it."""
        url, service = start_worker(self, self.backend_url, drain_timeout=10.0)
        seen = []

        def hook() -> Deferred[None]:
            seen.append(service.state.draining)
            return self.http.get(url + "/v1/late").addCallback(seen.append)

        service.add_drain_hook(hook)
        response = await self.http.get(url + "/sse?n=4&interval=0.1")
        stopped = service.stopService()
        await until(lambda: len(seen) == 2)
        self.assertNoResult(stopped)
        late = seen[1]
        self.assertEqual(seen[0], True)
        self.assertEqual(late.code, 503)
        self.assertEqual(late.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertEqual((await late.json())["error"], "draining")
        body = await response.content()
        self.assertEqual(body.count(b"data: event"), 4)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        await stopped
        self.assertEqual(service.in_flight.requests, set())

    async def test_drain_timeout_aborts_the_rest(self) -> None:
        """A request still in flight when DRAIN_TIMEOUT ends is cut, and its backend call
        cancelled; the stop then completes."""
        url, service = start_worker(self, self.backend_url, drain_timeout=0.2)
        pending = self.http.get(url + "/slow?delay=30")
        await until(lambda: self.backend.cancelled)
        started = reactor.seconds()
        await service.stopService()
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        await self.backend.cancelled[0]
        with self.assertRaises(ResponseFailed):
            await pending

    async def test_failing_hook_does_not_block_the_drain(self) -> None:
        """A drain hook that fails is logged; the shutdown goes on."""
        _, service = start_worker(self, self.backend_url)
        service.add_drain_hook(lambda: 1 / 0)
        await service.stopService()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class TwistdDrainTests(TestCase):
    timeout = 60

    async def test_sigterm_with_a_stream_in_flight(self) -> None:
        """`twistd -n vespa` gets SIGTERM while streaming: it stops listening at once, the
        stream completes, and the process exits 0."""
        backend = FakeBackend(reactor)
        backend_url = listen(self, backend)
        process = spawn_worker(self, backend_url, "--healthcheck-retry-interval", "0.1")
        url = await worker_url(process)
        await process.wait_for(rb"worker loaded")
        http = http_client(self)
        response = await http.get(url + "/sse?n=5&interval=0.3")
        self.assertEqual(response.code, 200)
        process.transport_.signalProcess("TERM")  # type: ignore[attr-defined]
        await process.wait_for(rb"Port \d+ Closed")
        with self.assertRaises(ConnectionRefusedError):
            await http_client(self).get(url + "/v1/echo")
        body = await response.content()
        self.assertEqual(body.count(b"data: event"), 5)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(await process.ended, 0)
        self.assertIn(b"draining: 1 request(s) in flight", process.output)
        self.assertIn(b"drained", process.output)
