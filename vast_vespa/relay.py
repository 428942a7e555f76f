# -*- test-case-name: tests.test_relay -*-
"""
The streaming relay: one backend call per client request, its answer copied back chunk by
chunk with backpressure in both directions. The only producer/consumer code in Vespa; the
worker and the client proxy both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from io import BytesIO
from typing import IO, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, RequestNotSent, ResponseDone
from twisted.web.http import PotentialDataLoss, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from vast_vespa.headers import RESPONSE_ONLY_DROPPED, LocationRewriter, end_to_end, header_ops
from vast_vespa.net.client import BytesProducer
from vast_vespa.outcome import (
    SERVED,
    Outcome,
    RelayResult,
    describe_failure,
    inner_failure,
    write_error,
)

# Bodies up to this size are read into memory and written in one go (no Cooperator round
# trip per request); larger ones (twisted.web spools them to a temporary file) are streamed.
SMALL_BODY = 256 * 1024
# Sent twice, these do what they do once (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# Seconds a backend has to end its body once the client left, when that end is not the body's
# last byte (a chunked body's last chunk, a connection's close): a client that stops at its
# API's own end of stream (the OpenAI SDK at "data: [DONE]") often leaves before the backend's
# end reaches the worker, and was served. Enough for an end that comes a little after the last
# data (a busy backend's next event-loop turn; a small write Nagle's algorithm holds for a
# delayed ACK, up to 200 ms on Linux); short beside a generation left running for nobody, which
# more data after the client left cuts at once anyway.
END_GRACE = 0.25


def body_producer(
    content: IO[bytes], cooperator: Cooperator, required: bool
) -> IBodyProducer | None:
    """
    A producer for a request body read from ``content`` (at its start), or None when the body
    is empty and not ``required`` (GET without a body must go out without Content-Length).
    """
    if isinstance(content, BytesIO):  # in memory already (nearly every request): one call
        body = content.getvalue()
        return BytesProducer(body) if body or required else None
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    if size == 0 and not required:
        return None
    if size <= SMALL_BODY:
        return BytesProducer(content.read())
    return FileBodyProducer(content, cooperator)


def request_has_body(request: Request) -> bool:
    """Whether the client sent a body (even an empty one): its framing headers say so."""
    table = header_ops(request).table(request.requestHeaders)
    return b"Content-Length" in table or b"Transfer-Encoding" in table


def _without_query(url: bytes) -> bytes:
    """``url`` fit for a log line: its query string may carry a signature or an app's key."""
    return url.split(b"?", 1)[0]


@implementer(IPushProducer)
class BodyRelay(Protocol):
    """
    Copies a backend response body into a twisted.web request. Registered on the request as a
    push producer: when the client reads slowly, twisted.web pauses us and we pause the
    backend connection.
    """

    _producing = False  # registered as the request's producer
    _cut = False  # ended here, by a time limit (cut)
    _missed = False  # body came after the client left: it never had the whole answer

    def __init__(
        self,
        request: Request,
        done: Callable[[], object],
        clock: IReactorTime | None = None,
    ) -> None:
        """``done()`` is called once the body is over, one way or another."""
        self._request = request
        self._done = done
        # With a clock, when the last chunk came (for the stall timer) is kept in last_data.
        self._seconds = clock.seconds if clock is not None else None
        self.last_data = clock.seconds() if clock is not None else 0.0
        # Since when the client has not been reading (its connection's buffer full: this
        # relay paused the backend), with a clock; None while it reads.
        self.paused_since: float | None = None
        self._backend: IPushProducer | None = None
        self.client_lost = False
        self.bytes_out = 0
        self.failure: Failure | None = None  # why the backend body ended early, if it did

    def connectionMade(self) -> None:
        # Agent hands us a TransportProxyProducer: pause/resume/stopProducing only.
        backend: Any = self.transport  # (not typing.cast: a call for every response)
        self._backend = backend
        if getattr(self._backend, "ended", False):
            return  # the whole body is here (net/client.py's Response): nothing to pause
        self._producing = True
        self._request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self._seconds is not None:
            self.last_data = self._seconds()
        if not self.client_lost:
            self.bytes_out += len(data)
            self._request.write(data)
        else:  # more body after the client left: it did not have the whole answer
            self._missed = True  # (even if the body's end comes in this same read)
            self.cut()

    def spliced(self, count: int) -> None:
        """``count`` bytes of the body went to the client without passing through here
        (:meth:`vast_vespa.net.client.Response.splice_to`)."""
        if self._seconds is not None:
            self.last_data = self._seconds()
        self.bytes_out += count

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        ended = reason.value  # (not .check: slower)
        if self._missed or not (
            isinstance(ended, ResponseDone)
            or (isinstance(ended, PotentialDataLoss) and not self._cut)
        ):
            self.failure = reason  # truncated upstream, cut here, or not all relayed
        if not self.client_lost:  # (else the channel is gone: unregister and finish raise)
            if self._producing:
                self._request.unregisterProducer()
            if self.failure is None:
                self._request.finish()
            else:
                # Closed without the final chunk: the client sees a broken response, never a
                # short clean one.
                self._request.loseConnection()
        self._done()

    def cut(self) -> None:
        """End the body here (a time limit passed, or the client left before its end): the
        backend's connection is closed, and the body counts as broken even when it is one
        that ends with its connection (no Content-Length, not chunked), whose end would
        otherwise read as whole."""
        self._cut = True
        if self._backend is not None:
            self._backend.stopProducing()

    def client_gone(self) -> None:
        """The client disconnected: nothing more is written to it. The backend's body goes on
        until :class:`ProxiedRequest` cuts it (at once, or after END_GRACE), or it ends."""
        self.client_lost = True

    # A real transport tells its producer as it is lost, before the request tells
    # ProxiedRequest (an in-memory one never does): the client is gone, as above.
    stopProducing = client_gone

    def pauseProducing(self) -> None:
        if self._seconds is not None and self.paused_since is None:
            self.paused_since = self._seconds()
        if self._backend is not None:
            self._backend.pauseProducing()

    def resumeProducing(self) -> None:
        if self._seconds is not None and self.paused_since is not None:
            # The backend was not expected to send while paused: its stall clock starts now.
            self.paused_since = None
            self.last_data = self._seconds()
        if self._backend is not None:
            self._backend.resumeProducing()


class ProxiedRequest:
    """
    Owns one proxied call: sends it with ``agent``, relays the response into ``request``,
    cancels the backend call when the client leaves, and reports a :class:`RelayResult`.
    The Deferred from :meth:`start` never fails (nor does :meth:`run` call ``done`` twice).

    A client that leaves while a body whose end is not its last byte (chunked, or ending with
    the connection) is still coming may have had all of it but that end (a client that stops
    at its API's own end of stream): the request is served if the end comes within END_GRACE
    and nothing more of the body before it; otherwise the call is cut and the request
    cancelled. A body of known length still coming is cut at once, and so is the body of a
    request whose connection the worker cut itself (``cut_reason``: its client did not leave).

    Time limits (0 = none): ``timeout`` for the whole call, ``first_byte_timeout`` until the
    response headers (both 504 while nothing was sent to the client), ``stall_timeout`` between
    two body chunks (after the headers: both connections are cut). A request that provably
    never left (``RequestNotSent``: a pooled connection that died just before) is sent once
    more on a fresh connection; nothing else is retried, since the backend may have seen it.
    """

    _log = Logger()

    def __init__(
        self,
        agent: IAgent,
        clock: IReactorTime,
        request: Request,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        timeout: float = 0.0,
        first_byte_timeout: float = 0.0,
        stall_timeout: float = 0.0,
        retry_if: Callable[[int | None], bool] | None = None,
        locations: Callable[[Request, bytes], bytes] | None = None,
        upstream: str = "backend",
    ) -> None:
        """
        ``retry_if(status)`` (status None: no response at all) may claim an answer before any
        byte of it reaches the client: the result then has ``retry`` set and the caller may
        send the request elsewhere (the client proxy re-routes on 429/503). With no response,
        it is asked only if sending the request again cannot do its work twice: the request
        never left (the connection could not be made), or its method is idempotent. ``locations``
        rewrites each ``Location`` and ``Content-Location`` value of the response to
        ``request``. ``upstream``: what the request goes to, as its errors name it (the
        client proxy's is a worker, whose own errors name its backend).
        """
        self._locations = locations
        self._agent = agent
        self._clock = clock
        self._request = request
        self._method = method
        self._url = url
        self._headers = headers
        self._body = body
        self._timeout = timeout
        self._first_byte_timeout = first_byte_timeout
        self._stall_timeout = stall_timeout
        self._retry_if = retry_if
        self._upstream = upstream
        self._pending: Deferred[IResponse] | None = None
        self._relay: BodyRelay | None = None
        self._timer: IDelayedCall | None = None
        # First byte, then stall; once the client left mid-body, END_GRACE.
        self._step_timer: IDelayedCall | None = None
        self._timed_out = ""  # which limit passed, if one did
        self._retried = False
        self._client_gone = False
        self._client_stalled = False  # cut for reading nothing for stall_timeout
        self._result = RelayResult(SERVED, started=clock.seconds())
        self._done: Callable[[RelayResult], object] | None = None

    def start(self) -> Deferred[RelayResult]:
        """Send the request; the Deferred fires once the request is over, one way or another."""
        relayed: Deferred[RelayResult] = Deferred()
        self.run(relayed.callback)
        return relayed

    def run(self, done: Callable[[RelayResult], object]) -> None:
        """:meth:`start`, with ``done(result)`` called once the request is over instead of a
        Deferred fired: for the worker's resource, whose every request would otherwise run
        a Deferred's callback chain (a measurable part of a small request's CPU)."""
        self._done = done
        when_lost = getattr(self._request, "when_lost", None)  # VespaRequest's
        if when_lost is not None:
            when_lost(self._client_disconnected)
        else:
            self._request.notifyFinish().addErrback(self._client_disconnected)
        if self._timeout:
            self._timer = self._clock.callLater(self._timeout, self._over_time)
        if self._first_byte_timeout:
            self._step_timer = self._clock.callLater(
                self._first_byte_timeout,
                self._time_out,
                f"no response headers within {self._first_byte_timeout:g} s",
            )
        self._send()

    def _send(self) -> None:
        # vast_vespa.net.client's agent tells of interim answers (Twisted's Agent drops them),
        # and hands the response to _got_response itself: its Deferred only fails.
        with_interim = getattr(self._agent, "request_with_interim", None)
        try:
            if with_interim is not None:
                pending = with_interim(
                    self._method,
                    self._url,
                    self._headers,
                    self._body,
                    self._interim,
                    self._got_response,
                )
            else:
                pending = self._agent.request(self._method, self._url, self._headers, self._body)
        except Exception:  # an agent should fail its Deferred instead: a bug, not the backend
            self._log.failure(
                "{method} {url}: could not send to the backend",
                method=self._method,
                url=_without_query(self._url),
            )
            self._result.status = 500
            write_error(self._request, 500, "internal error", "see the worker log")
            self._finish(Outcome.ERRORED, "internal error")
            return
        self._pending = pending
        if with_interim is not None:
            pending.addErrback(self._no_response)
        else:
            pending.addCallbacks(self._got_response, self._no_response)

    def _interim(self, code: int, phrase: bytes, headers: Headers) -> None:
        """A 1xx answer from the backend (103 Early Hints, 102 Processing) goes on to an
        HTTP/1.1 client before the final one (RFC 9110 15.2), with its end-to-end headers.
        Not 100 Continue: the worker answers a client's Expect itself and never sends one on,
        so a backend's 100 answers the worker's request, not the client's."""
        request = self._request
        if (
            code == 100
            or request.clientproto != b"HTTP/1.1"  # HTTP/1.0 clients get no 1xx (15.2)
            or request.startedWriting
            or request.finished
            or self._client_gone
            or request.channel is None
        ):
            return
        ops = header_ops(request)
        table = {name: list(values) for name, values in end_to_end(ops.table(headers), frozenset())}
        request.channel.writeHeaders(b"HTTP/1.1", b"%d" % code, phrase, ops.build(table))

    def _client_disconnected(self, reason: Failure) -> None:
        if self._client_gone:
            return
        self._client_gone = True
        relay = self._relay
        if self._pending is not None:
            self._pending.cancel()  # aborts the backend connection
        elif relay is not None:
            relay.client_gone()
            request = self._request
            if getattr(request, "cut_reason", ""):  # VespaRequest's: the worker cut it itself
                relay.cut()
            elif b"Content-Length" in header_ops(request).table(request.responseHeaders):
                relay.cut()  # its end is its last byte, which the client never had
            else:
                # The client may have left at the end of the answer, before the backend's end
                # of the body reached the worker: served if that end comes within END_GRACE.
                self._cancel_step_timer()
                self._step_timer = self._clock.callLater(END_GRACE, relay.cut)

    def _over_time(self) -> None:
        """The whole call's limit: a 504 before the response headers; after them, the answer
        (a stream still going) is cut, which its warning and access line say as such."""
        if self._pending is not None:
            self._time_out(f"no response within {self._timeout:g} s")
        else:
            self._time_out(f"answer still coming after {self._timeout:g} s, the whole-call limit")

    def _time_out(self, why: str) -> None:
        self._timed_out = why
        if self._pending is not None:
            self._pending.cancel()
        elif self._relay is not None:
            # Headers already went out: the only thing left is to cut both connections.
            self._relay.cut()

    def _stalled(self) -> None:
        # The timer is not moved on every chunk (a DelayedCall.reset per SSE event): it
        # fires, and only then looks at when the last chunk came. While the client does not
        # read (the relay paused the backend for it), the silence is the client's, and the
        # same limit applies to it.
        relay = self._relay
        assert relay is not None  # armed with the relay
        paused_since = relay.paused_since
        quiet_until = (relay.last_data if paused_since is None else paused_since) + (
            self._stall_timeout
        )
        now = self._clock.seconds()
        if now < quiet_until:
            self._step_timer = self._clock.callLater(quiet_until - now, self._stalled)
            return
        self._step_timer = None
        if paused_since is None:
            self._time_out(f"response body stalled for {self._stall_timeout:g} s")
            return
        # Gone in all but name: the connection is aborted (a close would wait for the unread
        # bytes), the backend call cut, and the request counted as one its client left.
        self._client_stalled = True
        self._log.warn(
            "{method} {url}: the client read nothing for {timeout:g} s: cut",
            method=self._method,
            url=_without_query(self._url),
            timeout=self._stall_timeout,
        )
        relay.client_gone()
        relay.cut()
        transport = getattr(self._request, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        self._cancel_step_timer()
        request = self._request
        self._result.first_byte = self._clock.seconds()
        if self._client_gone:
            response.deliverBody(_Discard())
            return
        self._result.status = response.code
        if self._retry_if is not None and self._retry_if(response.code):
            response.deliverBody(_Discard())
            self._result.retry = True
            self._finish(Outcome.ERRORED, f"answered {response.code}")
            return
        request.setResponseCode(response.code, response.phrase)
        head = self._method == b"HEAD"
        # Agent keeps Content-Length on HEAD responses (there it describes a GET): relay it.
        dropped = frozenset() if head else RESPONSE_ONLY_DROPPED
        ops = header_ops(request)
        copied = request.responseHeaders
        own = ops.table(copied)
        locations = self._locations
        taken: dict[bytes, list[bytes]] = {}
        for name, values in end_to_end(ops.table(response.headers), dropped):
            if name in own:  # Vespa's own (X-Request-ID) win
                continue
            if locations is not None and name in LocationRewriter.NAMES:
                taken[name] = _rewritten(locations, request, values)
            else:
                taken[name] = list(values)
        if not head and response.length is not UNKNOWN_LENGTH and response.code not in (204, 304):
            taken[b"Content-Length"] = [b"%d" % response.length]
        ops.update(copied, taken)
        relay = self._relay = BodyRelay(
            request, self._body_done, self._clock if self._stall_timeout else None
        )
        # The body that came with the headers is written first, so that a server that writes
        # the head with the first data (the worker's) sends both in one packet; then status and
        # headers go out in any case: SSE clients see them before the first event.
        response.deliverBody(relay)
        if self._relay is None:
            return  # the whole body came with the head, and is relayed: it cannot stall
        if self._stall_timeout:
            self._step_timer = self._clock.callLater(self._stall_timeout, self._stalled)
        if not (request.startedWriting or request.finished or relay.client_lost):
            request.write(b"")
        # A big body of known length, passed on as it is: the kernel moves it (net/splice.py).
        splice_to = getattr(response, "splice_to", None)  # vast_vespa.net.client's responses
        if splice_to is not None and not (head or request.chunked or request.finished):
            splice_to(request.transport, relay.spliced)

    def _body_done(self) -> None:
        relay = self._relay
        assert relay is not None
        self._result.bytes_out = relay.bytes_out
        failure = relay.failure
        if failure is None:  # whole, even if the client left before its end came
            self._finish(SERVED)
        elif relay.client_lost:
            why = "client stopped reading" if self._client_stalled else "client disconnected"
            self._finish(Outcome.CANCELLED, why)
        else:
            why = self._timed_out or f"{self._upstream} broke mid-response"
            self._log.warn(
                "{method} {url}: {why}: {reason}",
                method=self._method,
                url=_without_query(self._url),
                why=why,
                reason=failure.getErrorMessage(),
            )
            self._finish(Outcome.ERRORED, why)

    def _no_response(self, failure: Failure) -> None:
        self._pending = None
        if self._client_gone:
            self._finish(Outcome.CANCELLED, "client disconnected")
            return
        if failure.check(RequestNotSent) and not self._retried and not self._timed_out:
            # Provably never sent (the pooled connection was already gone): one more try.
            self._retried = True
            self._send()
            return
        if self._timed_out:
            code, error, detail = 504, f"{self._upstream} timeout", self._timed_out
        else:
            if inner_failure(failure).check(ConnectTimeout):
                code, error, detail = 504, f"{self._upstream} timeout", "could not connect in time"
            else:
                code, error = 502, f"{self._upstream} unavailable"
                detail = describe_failure(failure)
            if (
                self._retry_if is not None
                and self._safe_to_resend(failure)
                and self._retry_if(None)
            ):
                self._result.retry = True
                self._finish(Outcome.ERRORED, detail)
                return
        self._log.warn(
            "{method} {url}: {error}: {detail}",
            method=self._method,
            url=_without_query(self._url),
            error=error,
            detail=detail,
        )
        self._result.status = code
        write_error(self._request, code, error, detail)
        self._result.bytes_out = self._request.sentLength
        self._finish(Outcome.ERRORED, error)

    def _safe_to_resend(self, failure: Failure) -> bool:
        """Whether the request can go elsewhere without being acted on twice: a connection
        lost after it left may have been lost after the backend ran it."""
        if self._method in IDEMPOTENT_METHODS:
            return True
        # (ConnectError covers a connection that timed out before it opened.)
        return (
            inner_failure(failure).check(ConnectError, DNSLookupError, RequestNotSent) is not None
        )

    def _cancel_step_timer(self) -> None:
        if self._step_timer is not None and self._step_timer.active():
            self._step_timer.cancel()
        self._step_timer = None

    def _finish(self, outcome: Outcome, reason: str = "") -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._cancel_step_timer()
        self._result.outcome = outcome
        self._result.reason = reason
        self._result.finished = self._clock.seconds()
        self._relay = None  # it holds our _body_done: no cycle left for the garbage collector
        done, self._done = self._done, None  # (nor with the caller)
        assert done is not None, "finished twice"
        try:
            done(self._result)
        except Exception:  # as an unhandled error in a Deferred's callback: a bug, logged
            self._log.failure(
                "{method} {url}: telling how the request ended failed",
                method=self._method,
                url=_without_query(self._url),
            )


def _rewritten(
    locations: Callable[[Request, bytes], bytes], request: Request, values: Sequence[bytes]
) -> list[bytes]:
    """Each of ``values`` rewritten for ``request`` (a comprehension in the caller would make
    two cells for every response, rewritten or not)."""
    return [locations(request, value) for value in values]


class _Discard(Protocol):
    """Drains and drops a response nobody wants any more (so its connection is released)."""

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()
