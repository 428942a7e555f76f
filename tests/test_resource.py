"""
WorkerResource's decisions, in memory (tests/memory.py): which answer for which verdict of
its gate, and every request told to the observers (and taken out of the drain's set) exactly
once, whatever breaks: an observer, the gate's accounting, the agent, the relay, the gate.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from tests.memory import MemoryWorker
from vast_vespa.outcome import Outcome, RelayResult
from vast_vespa.worker.resource import Forward, passthrough

INTERNAL_ERROR = {"error": "internal error", "detail": "see the worker log"}


class Passthrough:
    """Every request goes through as it came; ``on_done`` (if set) is each Forward's."""

    def __init__(self, on_done: Any = None) -> None:
        self._cooperator = Cooperator()  # bodies here are small: never used
        self._on_done = on_done

    def admit(self, request: Request) -> Forward:
        forward = passthrough(request, self._cooperator)
        forward.on_done = self._on_done
        return forward


@implementer(IAgent)
class RaisingOnce:
    """An agent that raises (instead of failing its Deferred) on its first call."""

    def __init__(self, agent: IAgent) -> None:
        self.agent = agent
        self.calls = 0

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("agent bug")
        return self.agent.request(method, uri, headers, bodyProducer)


class ResourceTests(SynchronousTestCase):
    def test_broken_observer_is_logged_and_others_still_see_requests(self) -> None:
        """An observer that raises is logged once per request with its name, the next
        observer still sees every request, and the client gets its answer."""
        seen: list[int | None] = []

        def broken(request: Request, result: RelayResult, forward: Forward | None) -> None:
            raise RuntimeError("observer bug")

        observers = (broken, lambda request, result, forward: seen.append(result.status))
        worker = MemoryWorker(self, gate=Passthrough(), observers=observers)
        for path in ("/status/200", "/status/404"):
            self.assertEqual(worker.get(path).code, int(path[-3:]))
        self.assertEqual(seen, [200, 404])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_failed_accounting_still_ends_the_request(self) -> None:
        """If recording a finished request's outcome (the gate's ``on_done``) raises, the
        error is logged, and the observers and the drain still hear that it ended."""

        def broken(result: RelayResult) -> None:
            raise RuntimeError("accounting bug")

        worker = MemoryWorker(self, gate=Passthrough(on_done=broken))
        self.assertEqual(worker.get("/status/200").code, 200)
        self.assertEqual([r.status for r in worker.results], [200])
        self.assertEqual(worker.resource.in_flight.requests, {})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_an_error_telling_the_resource_is_logged(self) -> None:
        """The relay tells the resource of each finished request by a plain call (no
        Deferred): an error there is logged, as an unhandled error in a Deferred's callback
        was, and the client's answer and the next request are not affected."""
        worker = MemoryWorker(self, gate=Passthrough())

        def broken(*args: object) -> None:
            raise RuntimeError("resource bug")

        self.patch(worker.resource, "_relayed", broken)
        self.assertEqual(worker.get("/status/200").code, 200)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(worker.get("/status/404").code, 404)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_an_agent_that_raises_is_an_internal_error(self) -> None:
        """An agent that raises instead of failing its Deferred (a bug, not a backend fault)
        gives the client a JSON 500 and the observers an errored result; the traceback is
        logged, no time limit is left running, and the next request is served."""
        worker = MemoryWorker(
            self,
            gate=Passthrough(),
            wrap_agent=RaisingOnce,
            request_timeout=30,
            first_byte_timeout=30,
        )
        answer = worker.get("/x")
        self.assertEqual((answer.code, answer.json()), (500, INTERNAL_ERROR))
        [result] = worker.results
        self.assertEqual((result.outcome, result.status), (Outcome.ERRORED, 500))
        self.assertIn("internal error", result.reason)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        relay_timers = [
            call
            for call in worker.clock.getDelayedCalls()
            if type(getattr(cast(DelayedCall, call).func, "__self__", None)).__name__
            == "ProxiedRequest"
        ]
        self.assertEqual(relay_timers, [])  # the client's idle connection keeps its own
        self.assertEqual(worker.get("/after").code, 200)
        self.assertEqual([s.uri for s in worker.backend.seen], [b"/after"])

    def test_a_relay_that_cannot_start_after_a_wait_is_answered(self) -> None:
        """A request admitted after a wait for a slot, whose relay then cannot even start (a
        bug), is answered with a JSON 500; its slot is given back (``on_done``), and the
        observers and the drain hear that it ended."""
        done: list[RelayResult] = []
        slot: Deferred[None] = Deferred()

        class Gate:
            def admit(self, request: Request) -> Deferred[Forward]:
                forward = Forward("not bytes", Headers(), None)  # type: ignore[arg-type]
                forward.on_done = done.append
                return slot.addCallback(lambda _: forward)

        worker = MemoryWorker(self, gate=Gate())
        client = worker.request("GET", "/x")
        self.assertIsNone(client.answer)
        slot.callback(None)
        worker.flush()
        answer = worker.answered(client)
        self.assertEqual((answer.code, answer.json()["error"]), (500, "internal error"))
        self.assertEqual([(r.outcome, r.status) for r in done], [(Outcome.ERRORED, 500)])
        self.assertEqual(worker.results, done)
        self.assertEqual(worker.resource.in_flight.requests, {})
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(worker.backend.seen, [])

    def test_internal_error_body_has_no_traceback(self) -> None:
        """An unexpected error inside the worker gives a JSON 500 with no traceback and no
        internals in the body (the details go to the log)."""

        class BrokenGate:
            def admit(self, request: Request) -> Forward:
                raise RuntimeError("secret-token-1234 exploded")

        worker = MemoryWorker(self, gate=BrokenGate())
        answer = worker.get("/x")
        self.assertEqual((answer.code, answer.json()), (500, INTERNAL_ERROR))
        self.assertNotIn(b"Traceback", answer.body)
        self.assertNotIn(b"secret-token", answer.body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(worker.resource.in_flight.requests, {})  # a drain would not wait

    def test_a_client_leaving_the_queue_is_cancelled_once(self) -> None:
        """A request waiting for a slot whose client leaves: the wait is cancelled, the
        observers hear CANCELLED once, and nothing reaches the backend."""
        cancelled: list[bool] = []
        slot: Deferred[Forward] = Deferred(lambda _: cancelled.append(True))

        class Gate:
            def admit(self, request: Request) -> Deferred[Forward]:
                return slot

        worker = MemoryWorker(self, gate=Gate())
        client = worker.request("GET", "/x")
        client.leave()
        worker.flush()
        self.assertEqual(cancelled, [True])
        self.assertEqual([r.outcome for r in worker.results], [Outcome.CANCELLED])
        self.assertEqual(worker.resource.in_flight.requests, {})
        self.assertEqual(worker.backend.seen, [])
