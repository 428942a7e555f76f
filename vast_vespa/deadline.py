# -*- test-case-name: tests.test_deadline -*-
"""
Time limits on the HTTP calls Vespa makes itself (the autoscaler, the console, ``/route/``, the
Vast root CA, the benchmark's session, the health probe, ``on_close_route``), body included,
reported the same way whatever stage the call was at; and the calls a service has in flight
when it stops.

``Deferred.addTimeout`` only turns a call's ``CancelledError`` into a ``TimeoutError``. A treq
call cancelled while it connects fails with ``ConnectingCancelledError`` instead, and one
cancelled while it waits for the answer with ``ResponseNeverReceived``; both passed through as
they were, and the user read "HostnameAddress(hostname=b'10.0.0.1', port=443)" or "request
cancelled" where the call had simply not been answered in time.
"""

from __future__ import annotations

import typing
from typing import Any, NoReturn, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

T = TypeVar("T")


class NoAnswerError(TimeoutError):
    """A call had not ended within its time limit. A ``twisted.internet.defer.TimeoutError``,
    which the benchmark's session documents, that says what happened in its message."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds

    def __str__(self) -> str:
        return f"no answer within {self.seconds:g} s"


def cancellable(call: Deferred[T]) -> Deferred[T]:
    """``call``, failing with ``CancelledError`` once it is cancelled, whichever error the
    cancelled call itself fails with (a connection attempt's, a pending answer's) or if it
    never fires."""
    cancelled = False

    def cancel(_: Deferred[T]) -> None:
        nonlocal cancelled
        cancelled = True
        call.cancel()

    guarded: Deferred[T] = Deferred(cancel)

    def relay(result: T | Failure) -> None:
        if guarded.called:  # cancelled, and the call ended only afterwards
            return
        if cancelled:
            guarded.errback(CancelledError())
        elif isinstance(result, Failure):
            guarded.errback(result)
        else:
            guarded.callback(result)

    call.addBoth(relay)
    return guarded


class CallsInFlight:
    """The calls a service made that have not ended yet: to cancel, or to wait for, when the
    service stops."""

    def __init__(self) -> None:
        self._calls: set[Deferred[Any]] = set()

    def add(self, call: Deferred[T]) -> Deferred[T]:
        """``call``, kept until it ends."""
        if not call.called:
            self._calls.add(call)
            call.addBoth(self._ended, call)
        return call

    def _ended(self, result: T, call: Deferred[T]) -> T:
        self._calls.discard(call)
        return result

    def cancel(self) -> None:
        for call in list(self._calls):
            call.cancel()

    def ended(self) -> Deferred[Any]:
        """Fires once every call kept now has ended (at once if none)."""
        return DeferredList(list(self._calls))


def within(call: Deferred[T], seconds: float, clock: IReactorTime) -> Deferred[T]:
    """``call``, cancelled if it has not ended after ``seconds`` and then failing with
    :class:`NoAnswerError`; cancelled from outside, it fails with ``CancelledError``."""
    bounded = cancellable(call)
    bounded.addTimeout(seconds, clock, onTimeoutCancel=_no_answer)
    return bounded


class Answer(typing.Protocol):
    """An HTTP answer as Twisted's Agent and treq give it, as far as reading it goes."""

    code: int
    length: int | object  # a number of bytes, or twisted.web.iweb.UNKNOWN_LENGTH

    def deliverBody(self, protocol: IProtocol) -> None: ...


A = TypeVar("A", bound=Answer)


def answer_within(
    request: Deferred[A], seconds: float, clock: IReactorTime
) -> Deferred[tuple[A, bytes]]:
    """An HTTP call's answer and its whole body, under one time limit (:func:`within`): a
    server that sends its head and then stalls holds nobody up for longer, and its connection
    is closed (treq's ``content()`` would leave it open, still reading)."""

    async def answer() -> tuple[A, bytes]:
        response = await request
        return response, await read_body(response)

    return within(Deferred.fromCoroutine(answer()), seconds, clock)


class _Collect(Protocol):
    """Reads a whole response body; cancelling ``done`` drops the connection."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: Answer) -> Deferred[bytes]:
    """The whole body of ``response`` (cancellable: cancelling closes the connection)."""
    if response.length == 0:
        return succeed(b"")
    collect = _Collect()
    response.deliverBody(collect)
    return collect.done


def _no_answer(result: object, seconds: float) -> NoReturn:
    """Called once the timeout has cancelled the call, whose result is then always a
    ``CancelledError`` (``cancellable``)."""
    raise NoAnswerError(seconds)
