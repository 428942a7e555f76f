"""Graceful drain on shutdown: in-flight requests and streams finish, new ones are refused.
In memory (tests/memory.py), then `twistd vespa` and SIGTERM."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived

from tests.fakes import FakeBackend
from tests.helpers import http_client, listen, spawn_worker, worker_url
from tests.memory import Answer, MemoryWorker


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.worker = MemoryWorker(self, signed=False)

    def test_stream_in_flight_finishes(self) -> None:
        """On stop, a stream in flight runs to its end, the drain hooks run first with the
        worker marked draining, new requests get 503 "draining", and the stop waits for it."""
        worker = self.worker
        service = worker.service(drain_timeout=10.0)
        seen: list[bool | Answer] = []

        def hook() -> None:
            seen.append(worker.state.draining)
            seen.append(worker.get("/v1/late"))

        service.add_drain_hook(hook)
        stream = worker.request("GET", "/sse?n=4&interval=0.1")
        stopped = service.stopService()
        self.assertEqual(seen[0], True)
        late = seen[1]
        assert isinstance(late, Answer)
        self.assertEqual(late.code, 503)
        self.assertEqual(late.header(b"retry-after"), [b"1"])
        self.assertEqual(late.json()["error"], "draining")
        worker.advance(0.1)
        worker.advance(0.1)
        self.assertNoResult(stopped)
        worker.advance(0.1)
        body = worker.answered(stream).body
        self.assertEqual(body.count(b"data: event"), 4)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.successResultOf(stopped)
        self.assertEqual(service.in_flight.requests, {})

    def test_idle_keep_alive_connections_are_closed(self) -> None:
        """Once the requests in flight are done, the idle keep-alive connections are closed
        (a request on one would only be refused), with one log line; a connection answered
        during the drain is closed too."""
        worker = self.worker
        service = worker.service(drain_timeout=10.0)
        idle = worker.request("GET", "/v1/first")
        self.assertEqual(worker.answered(idle).code, 200)
        answering = worker.request("GET", "/slow?delay=1")
        with capturedLogs() as events:
            stopped = service.stopService()
            self.assertFalse(idle.closed)  # not before the requests in flight are done
            worker.advance(1)
            self.successResultOf(stopped)
        self.assertTrue(idle.closed)
        self.assertEqual(worker.answered(answering).code, 200)
        self.assertTrue(answering.closed)
        self.assertIn(
            "worker: closed 2 idle client connection(s)", [formatEvent(e) for e in events]
        )

    def test_drain_timeout_aborts_the_rest(self) -> None:
        """A request still in flight when DRAIN_TIMEOUT ends is cut, and its backend call
        cancelled; the stop then completes."""
        worker = self.worker
        service = worker.service(drain_timeout=0.2)
        pending = worker.request("GET", "/slow?delay=30")
        stopped = service.stopService()
        worker.advance(0.19)
        self.assertNoResult(stopped)
        self.assertFalse(pending.closed)
        worker.advance(0.01)
        self.successResultOf(stopped)
        self.successResultOf(worker.backend.cancelled[0])
        self.assertTrue(pending.closed)
        self.assertIsNone(pending.answer)

    def test_failing_hook_does_not_block_the_drain(self) -> None:
        """A drain hook that fails is logged; the shutdown goes on."""
        service = self.worker.service()

        def failing() -> None:
            raise ZeroDivisionError("drain hook")

        service.add_drain_hook(failing)
        self.successResultOf(service.stopService())
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
        # Twisted logs the port's closing just before it closes the socket: a connection made
        # in between is accepted by the kernel into the backlog and reset by the close, never
        # served. Either way, no new request reaches the worker.
        try:
            await http_client(self).get(url + "/v1/echo")
        except ConnectionRefusedError:
            pass
        except ResponseNeverReceived as never:
            self.assertTrue(never.reasons[0].check(ConnectionLost), never.reasons)
        else:
            self.fail("a request was served after the port closed")
        body = await response.content()
        self.assertEqual(body.count(b"data: event"), 5)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(await process.ended, 0)
        self.assertIn(b"draining: 1 request(s) in flight", process.output)
        self.assertIn(b"drained", process.output)
