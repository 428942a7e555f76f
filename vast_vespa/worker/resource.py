# -*- test-case-name: tests.test_relay,tests.test_backend_faults,tests.test_cancellation -*-
"""
The worker's one resource: any method on any path. Each request goes through a gate (the
verdict: lifecycle's readiness check around vast_vespa.worker.gate: auth form, signature unless
UNSECURED, admission) and then through the relay; observers see every outcome exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vast_vespa import request_id
from vast_vespa.headers import LocationRewriter, forwarded_request_headers, header_ops
from vast_vespa.outcome import JSON, Observer, Outcome, RelayResult, notify, write_error
from vast_vespa.relay import ProxiedRequest, body_producer, request_has_body
from vast_vespa.site import VespaRequest


@dataclass
class Forward:
    """An admitted request: what to send to the backend, and whom to tell when it is over."""

    target: bytes  # path and query string, as sent to the backend
    headers: Headers
    body: IBodyProducer | None
    workload: float = 0.0
    on_done: Callable[[RelayResult], None] | None = None
    # A JSON answer (status, body) the worker gives itself (the session routes): no relay.
    answer: tuple[int, bytes] | None = None


@dataclass
class Rejection(Exception):
    """A request refused before it reached the backend; rendered as a JSON error."""

    code: int
    error: str
    detail: str = ""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    workload: float = 0.0


class RequestGate(Protocol):
    """Decides what happens to a request: a Forward (maybe later) or a Rejection."""

    def admit(self, request: Request) -> Forward | Deferred[Forward]:
        """Raise (or fail with) Rejection to refuse; a Deferred may wait for a slot."""


def client_address(request: Request) -> str | None:
    peer = request.getClientAddress()
    return getattr(peer, "host", None)


def passthrough(
    request: Request,
    cooperator: Cooperator,
    target: bytes | None = None,
    drop: frozenset[bytes] = frozenset(),
) -> Forward:
    """The request as the client sent it (to ``target``, default its own): end-to-end headers
    but ``drop``, and the body byte for byte."""
    scheme = b"https" if request.isSecure() else b"http"
    headers = forwarded_request_headers(
        request.requestHeaders,
        client_address(request),
        scheme,
        drop,
        forwarded_host=True,
        ops=header_ops(request),
    )
    assert request.content is not None
    body = body_producer(request.content, cooperator, request_has_body(request))
    return Forward(request.uri if target is None else target, headers, body)


class InFlight:
    """The requests not answered yet (waiting for admission, relaying, streaming), so that a
    shutdown can let them finish first. WorkerResource adds each request as it comes and
    takes it out when its outcome is told (every request has exactly one), without a
    Deferred per request."""

    def __init__(self) -> None:
        # By id: twisted.web's Request hashes in Python, a call per add and per removal.
        self.requests: dict[int, VespaRequest] = {}
        self._idle: list[Deferred[None]] = []

    def add(self, request: VespaRequest) -> None:
        self.requests[id(request)] = request

    def done(self, request: Request) -> None:
        self.requests.pop(id(request), None)
        if not self.requests and self._idle:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires once no request is in flight (at once if none is)."""
        waiter: Deferred[None] = Deferred()
        if self.requests:
            self._idle.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def abort(self, why: str) -> int:
        """Cut the connections of the requests still in flight, which end as errored with
        ``why`` (their ``cut_reason``) once the loss reaches them, a reactor turn later
        (:meth:`idle` says when); returns how many."""
        requests = list(self.requests.values())
        for request in requests:
            transport = getattr(request.channel, "transport", None)
            if transport is not None:  # (a request whose client left is not cut: it ends)
                request.cut_reason = why
                transport.abortConnection()
        return len(requests)


class WorkerResource(Resource):
    """Every method, every path: gate, then relay to the backend, then tell the observers."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        gate: RequestGate,
        agent: IAgent,
        clock: IReactorTime,
        backend_url: str,
        request_timeout: float = 0.0,
        observers: tuple[Observer, ...] = (),
        first_byte_timeout: float = 0.0,
        stall_timeout: float = 0.0,
        public_url: str | None = None,
    ) -> None:
        """``public_url``: where clients reach this worker (PUBLIC_IPADDR and
        VAST_TCP_PORT_<port>); absolute URLs the backend answers with are rewritten to it, or
        without it to the scheme and Host the client used."""
        super().__init__()
        self._locations = LocationRewriter(backend_url, public_url)
        self._first_byte_timeout = first_byte_timeout
        self._stall_timeout = stall_timeout
        self._gate = gate
        self._agent = agent
        self._clock = clock
        self._backend = backend_url.encode("ascii")
        self._timeout = request_timeout
        self._observers = observers
        self.in_flight = InFlight()

    def render(self, request: VespaRequest) -> int:
        request.defaultContentType = None  # never invent a Content-Type for the backend's body
        self.in_flight.add(request)
        started = self._clock.seconds()
        request_id.assign(request)
        if not request.uri.startswith(b"/"):
            # Absolute-form or asterisk-form targets: the backend host is always BACKEND_URL.
            self._refuse(request, Rejection(400, "bad request target", "expected a path"), started)
            return NOT_DONE_YET
        try:
            verdict = self._gate.admit(request)
        except Rejection as rejection:
            self._refuse(request, rejection, started)
            return NOT_DONE_YET
        except Exception:
            self._not_admitted(Failure(), request, started)
            return NOT_DONE_YET
        if isinstance(verdict, Forward):  # (a plain class: Deferred's check goes through abc)
            self._relay(verdict, request, started)
        else:
            self._wait_for_slot(verdict, request, started)
        return NOT_DONE_YET

    def _wait_for_slot(
        self, verdict: Deferred[Forward], request: VespaRequest, started: float
    ) -> None:
        # (not in render: a closure there would make a cell for every request)
        # A client that leaves is taken out of the queue.
        request.notifyFinish().addErrback(lambda _: verdict.cancel())
        verdict.addCallbacks(
            self._admitted_later,
            self._not_admitted,
            callbackArgs=(request, started),
            errbackArgs=(request, started),
        )

    def _admitted_later(self, forward: Forward, request: VespaRequest, started: float) -> None:
        """A request the worker cut while it waited (the loss has not reached it yet: a
        slot freed by another cut request comes first) is not sent to the backend."""
        if request.cut_reason:
            now = self._clock.seconds()
            gone = RelayResult(Outcome.CANCELLED, 0, 0, started, None, now)
            self._relayed(request, forward, started, gone)
        else:
            self._relay(forward, request, started)

    def _relay(self, forward: Forward, request: VespaRequest, started: float) -> None:
        if forward.answer is not None:
            self._answer(forward, forward.answer, request, started)
            return
        try:
            proxied = ProxiedRequest(
                self._agent,
                self._clock,
                request,
                request.method,
                self._backend + forward.target,
                forward.headers,
                forward.body,
                self._timeout,
                self._first_byte_timeout,
                self._stall_timeout,
                locations=self._locations,
            )
            proxied.run(partial(self._relayed, request, forward, started))
        except Exception:
            # A bug; after a wait for a slot nothing above would answer the client or free
            # the slot, so both happen here.
            self._log.failure(
                "could not relay {method} {path}", method=request.method, path=request.path
            )
            write_error(request, 500, "internal error", "see the worker log")
            now = self._clock.seconds()
            failed = RelayResult(Outcome.ERRORED, 500, 0, started, None, now, "internal error")
            self._relayed(request, forward, started, failed)

    def _answer(
        self, forward: Forward, answer: tuple[int, bytes], request: VespaRequest, started: float
    ) -> None:
        code, body = answer
        if not request.finished and request.channel is not None:
            request.setResponseCode(code)
            request.setHeader(b"content-type", JSON)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()
        now = self._clock.seconds()
        self._relayed(
            request,
            forward,
            started,
            RelayResult(Outcome.SERVED, code, len(body), started, now, now),
        )

    def _relayed(
        self, request: VespaRequest, forward: Forward, started: float, result: RelayResult
    ) -> None:
        result.started = started
        if request.cut_reason:
            self._cut(request, result)
        if forward.on_done is not None:
            try:
                forward.on_done(result)
            except Exception:  # the observers and the drain must still hear of the request
                self._log.failure(
                    "recording how {method} {path} ended failed",
                    method=request.method,
                    path=request.path,
                )
        self._notify(request, result, forward)

    def _not_admitted(self, failure: Failure, request: VespaRequest, started: float) -> None:
        if failure.check(CancelledError):
            result = RelayResult(Outcome.CANCELLED, 0, 0, started, None, self._clock.seconds())
            if request.cut_reason:
                self._cut(request, result)
            self._notify(request, result, None)
        elif isinstance(failure.value, Rejection):
            self._refuse(request, failure.value, started)
        else:
            self._log.failure("request gate failed", failure)
            self._refuse(request, Rejection(500, "internal error", "see the worker log"), started)

    def _refuse(self, request: Request, rejection: Rejection, started: float) -> None:
        write_error(
            request,
            rejection.code,
            rejection.error,
            rejection.detail,
            rejection.headers,
            **rejection.extra,
        )
        result = RelayResult(
            Outcome.REJECTED,
            rejection.code,
            request.sentLength,
            started,
            None,
            self._clock.seconds(),
            rejection.error,
        )
        self._notify(request, result, rejection)  # its workload, as reported (a 429's)

    def _cut(self, request: VespaRequest, result: RelayResult) -> None:
        """A request whose connection the worker cut failed to be served, however the relay
        saw it end (its client got nothing more, and did not leave by itself): errored,
        saying why in a log line next to its access line (PROTOCOL 4.4: cancelled is for a
        client that went away)."""
        result.outcome = Outcome.ERRORED
        result.reason = request.cut_reason
        self._log.warn(
            "{method} {path} (id {id}): {why}",
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("ascii", "replace"),
            id=request_id.of(request),
            why=request.cut_reason,
        )

    def _notify(
        self, request: Request, result: RelayResult, forward: Forward | Rejection | None
    ) -> None:
        # Out of the drain's set last: a drain waiting for it goes on with the request told.
        notify(self._observers, request, result, forward)
        self.in_flight.done(request)
