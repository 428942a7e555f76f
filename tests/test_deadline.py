"""Tests for vast_vespa.deadline: the time limit on Vespa's own HTTP calls."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent

from vast_vespa.deadline import CallsInFlight, NoAnswerError, answer_within, cancellable, within

ADDRESS = IPv4Address("TCP", "192.0.2.1", 8080)


def connecting() -> Deferred[Any]:
    """A call that fails as treq's does when it is cancelled while it connects."""
    return Deferred(lambda d: d.errback(ConnectingCancelledError(ADDRESS)))


class WithinTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_result_in_time(self) -> None:
        """A call that ends in time passes its result, or its failure, through; no timer stays."""
        call: Deferred[str] = Deferred()
        bounded = within(call, 2.5, self.clock)
        self.clock.advance(2)
        call.callback("answer")
        self.assertEqual(self.successResultOf(bounded), "answer")
        refused: Deferred[str] = Deferred()
        bounded = within(refused, 2.5, self.clock)
        refused.errback(ConnectionRefusedError("refused"))
        self.failureResultOf(bounded, ConnectionRefusedError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timed_out_while_connecting(self) -> None:
        """A call still connecting at its limit fails with NoAnswerError (a TimeoutError)
        that says so, not with the connection attempt's error, which names only the address."""
        bounded = within(connecting(), 2.5, self.clock)
        self.clock.advance(2.4)
        self.assertNoResult(bounded)
        self.clock.advance(0.1)
        failure = self.failureResultOf(bounded, NoAnswerError)
        self.assertIsInstance(failure.value, TimeoutError)
        self.assertEqual(str(failure.value), "no answer within 2.5 s")

    def test_call_ending_after_cancel(self) -> None:
        """A call that goes on for a while once cancelled (a coroutine cleaning up) times out
        at its limit all the same, and its late result goes nowhere."""
        cleaned_up: Deferred[None] = Deferred()

        async def stubborn() -> str:
            try:
                await Deferred()
            except CancelledError:
                await cleaned_up
            return "late"

        call = Deferred.fromCoroutine(stubborn())
        bounded = within(call, 1, self.clock)
        self.clock.advance(1)
        failure = self.failureResultOf(bounded, NoAnswerError)
        self.assertEqual(str(failure.value), "no answer within 1 s")
        cleaned_up.callback(None)
        self.assertIsNone(self.successResultOf(call))

    def test_cancelled_from_outside(self) -> None:
        """Cancelled before its limit (the app hung up), the call fails with CancelledError
        and its timer is gone."""
        bounded = within(connecting(), 2.5, self.clock)
        bounded.cancel()
        self.failureResultOf(bounded, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancellable(self) -> None:
        """Without a limit, a cancelled call fails with CancelledError whatever treq's error
        for its stage; one not cancelled passes its own failure through."""
        guarded = cancellable(connecting())
        guarded.cancel()
        self.failureResultOf(guarded, CancelledError)
        call: Deferred[str] = Deferred()
        guarded = cancellable(call)
        call.errback(ConnectingCancelledError(ADDRESS))
        self.failureResultOf(guarded, ConnectingCancelledError)


class AnswerWithinTests(SynchronousTestCase):
    """treq over an in-memory reactor: the limit covers the connection, the answer's head and
    its body."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.http = HTTPClient(Agent(self.clock))

    def connect(self) -> tuple[IProtocol, StringTransport]:
        """The connection the call is making, made: its protocol and transport."""
        factory = self.clock.tcpClients[0][2]
        protocol = factory.buildProtocol(ADDRESS)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_answered(self) -> None:
        got = answer_within(self.http.get("http://192.0.2.1:8080/x"), 5, self.clock)
        protocol, transport = self.connect()
        self.assertTrue(transport.value().startswith(b"GET /x HTTP/1.1\r\n"))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        response, body = self.successResultOf(got)
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_never_connected(self) -> None:
        got = answer_within(self.http.get("http://192.0.2.1:8080/x"), 5, self.clock)
        self.clock.advance(5)
        self.assertEqual(
            str(self.failureResultOf(got, NoAnswerError).value), "no answer within 5 s"
        )

    def test_no_answer(self) -> None:
        """Connected, the request sent, no answer: the time limit, not "request cancelled"."""
        got = answer_within(self.http.get("http://192.0.2.1:8080/x"), 5, self.clock)
        _, transport = self.connect()
        self.clock.advance(5)
        self.failureResultOf(got, NoAnswerError)
        self.assertTrue(transport.disconnecting)

    def test_body_stalls(self) -> None:
        """A server that sends its head and then stalls is cut off at the same limit, and the
        connection closed."""
        got = answer_within(self.http.get("http://192.0.2.1:8080/x"), 5, self.clock)
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
        self.assertNoResult(got)
        self.clock.advance(5)
        self.failureResultOf(got, NoAnswerError)
        self.assertEqual(transport.producerState, "stopped")  # a TCP transport: closed


class CallsInFlightTests(SynchronousTestCase):
    def test_kept_until_ended(self) -> None:
        """``ended`` waits for the calls still going; those that ended are not kept."""
        calls = CallsInFlight()
        done: Deferred[str] = Deferred()
        going: Deferred[str] = Deferred()
        self.assertIs(calls.add(done), done)
        calls.add(going)
        done.callback("ok")
        self.assertEqual(self.successResultOf(done), "ok")  # the result passes through
        ended = calls.ended()
        self.assertNoResult(ended)
        going.errback(ConnectionRefusedError("refused"))
        self.successResultOf(ended)
        self.failureResultOf(going, ConnectionRefusedError)
        self.successResultOf(calls.ended())  # nothing kept: fires at once

    def test_cancel(self) -> None:
        calls = CallsInFlight()
        going: Deferred[None] = calls.add(Deferred())
        calls.cancel()
        self.failureResultOf(going, CancelledError)
        self.successResultOf(calls.ended())
