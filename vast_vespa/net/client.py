# -*- test-case-name: tests.test_net_client -*-
"""
The relay's HTTP/1.1 client: an :class:`IAgent` for the backend calls (worker to backend,
client proxy to worker). Profiled under load, Twisted's Agent was a large part of the
worker's CPU on a small request: per-request URI parsing, a state machine of Deferreds, and a
pure-Python response parser. Here the request head goes out in one write, llhttp (through
httptools, C) parses the response, and keep-alive connections wait in a pool per backend.

The response offers what the relay uses of :class:`IResponse` (code, phrase, headers,
length, deliverBody) and ends the body protocol the way Agent does (``ResponseDone``,
``PotentialDataLoss`` for a body delimited by the connection closing, ``ResponseFailed``),
so :class:`vast_vespa.relay.ProxiedRequest` works with either agent.

With the fast path (``fast_path``, see :mod:`vast_vespa.net.guard`), a request made while the
reactor dispatches a turn's events goes out with the turn's other writes when the turn is over
(:class:`vast_vespa.net.dispatch.Outbox`; at once, by :func:`vast_vespa.net.listen.send_now`,
when made outside a turn), a big body is spliced (:mod:`vast_vespa.net.splice`), each
connection skips the endpoint's ``_WrappingProtocol`` once connected (its private
``_wrappedProtocol``), and :func:`quiet_pool` swaps the control pool's private ``_factory``
for one that does not log every connection; stock, the same requests take Twisted's own write
path and the control pool is Twisted's as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionAborted, ConnectionClosed
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import RESPONSES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from vast_vespa.headers import PUBLIC_HEADER_OPS
from vast_vespa.net.dispatch import OUTBOX
from vast_vespa.net.header_table import RAW_HEADER_OPS
from vast_vespa.net.idle_sweep import IdleSweep
from vast_vespa.net.listen import send_now
from vast_vespa.net.resolve import NamedEndpoint, RememberedNames
from vast_vespa.net.splice import SPLICE_MIN, Splice, can_splice, has_unsent

# Methods whose request goes out with "Content-Length: 0" when there is no body (as Agent).
_LENGTH_REQUIRED = frozenset({b"POST", b"PUT", b"PATCH"})
# Sent once more on a new connection when a kept-alive one turns out closed (as Agent does).
_RETRY_SAFE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
_NO_BODY_STATUS = frozenset({204, 304})

Key = tuple[bytes, bytes]  # (scheme, netloc)
# Read size of a backend connection (Twisted reads 64 KiB): larger reads mean fewer system
# calls on big downloads, but from 128 KiB on each read's buffer is above glibc's mmap
# threshold and costs fresh pages, which slows big downloads down.
READ_SIZE = 120 * 1024

# One for every clean end, as Twisted's own connectionDone (a Failure costs microseconds).
_RESPONSE_DONE = Failure(ResponseDone())
# Limits of a backend's response head (interim 1xx heads included), as on the request side.
MAX_HEAD_SIZE = 16 * 1024
MAX_HEADERS = 100
# What a reason phrase may hold (RFC 9112 4: HTAB, SP, VCHAR, obs-text): no control bytes.
_PHRASE_CONTROLS = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"

_log = Logger()

# Told of each interim (1xx other than 101) answer: code, phrase, headers.
Interim = Callable[[int, bytes, Headers], object]
# Given the final response as soon as its head is parsed (LeanAgent.request_with_interim).
Answer = Callable[[IResponse], object]


class BadResponseHead(Exception):
    """A response head the relay will not pass on: too large, too many headers, or a status
    below 100 (the relay answers 502 with this text as the detail)."""


def reason_phrase(code: int, phrase: bytes) -> bytes:
    """``phrase``, or the standard one for ``code`` when it holds control bytes (a phrase is
    relayed to clients, and a CR or NUL in it could break their parsers)."""
    if phrase.translate(None, _PHRASE_CONTROLS) != phrase:
        return RESPONSES.get(code, b"")
    return phrase


def chunked_last(values: Sequence[bytes]) -> bool:
    """Whether the Transfer-Encoding ``values`` end with ``chunked``: only then does the
    encoding frame the body (RFC 9112 6.3); any other ends at the connection's close."""
    codings = b",".join(values).split(b",")
    return codings[-1].strip().lower() == b"chunked"


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory: it goes out in the same write as the head."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written in startProducing."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class ConnectionPool:
    """
    Idle keep-alive connections per backend, most recently used first. An idle connection
    is closed after ``idle_timeout`` seconds (before typical server keep-alive timeouts:
    uvicorn closes idle connections after 5 s) and beyond ``max_idle_per_backend``, by one
    timer for the whole pool (:class:`IdleSweep`).
    """

    def __init__(
        self, clock: IReactorTime, max_idle_per_backend: int = 256, idle_timeout: float = 4.0
    ) -> None:
        self._clock = clock
        self.max_idle_per_backend = max_idle_per_backend
        self.idle_timeout = idle_timeout
        self._idle: dict[Key, list[_Connection]] = {}  # oldest first
        self._sweep = IdleSweep(clock, self._close_expired)

    def take(self, key: Key) -> _Connection | None:
        """An idle connection to ``key`` (now busy), or None."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.claim():
                return connection
        return None

    def give_back(self, key: Key, connection: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle_per_backend:
            connection.close()
            return
        connection.idle_since = self._clock.seconds()
        idle.append(connection)
        self._sweep.watch(self.idle_timeout)

    def _close_expired(self, now: float) -> float | None:
        """Close the connections idle for ``idle_timeout`` by ``now``; when the next is due."""
        expired_before = now - self.idle_timeout
        oldest: float | None = None
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= expired_before:
                idle.pop(0).close()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        return None if oldest is None else oldest + self.idle_timeout

    def forget(self, key: Key, connection: _Connection) -> None:
        """``connection`` is gone (closed by the backend while idle)."""
        idle = self._idle.get(key)
        if idle and connection in idle:
            idle.remove(connection)
            if not any(self._idle.values()):
                self._sweep.stop()

    def closeCachedConnections(self) -> Deferred[None]:
        """Close every idle connection; fires once they are all closed."""
        self._sweep.stop()
        closing = [connection for idle in self._idle.values() for connection in idle]
        self._idle.clear()
        lost = [connection.close() for connection in closing]
        return DeferredList(lost, consumeErrors=True).addCallback(lambda _: None)


@implementer(IResponse)
class Response:
    """One backend response: status, headers and a body delivered to one protocol."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self, connection: _Connection, code: int, phrase: bytes, headers: Headers, length: Any
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection: _Connection | None = connection
        self._protocol: IProtocol | None = None
        self._early: list[bytes] = []  # body that came before deliverBody
        self._ended: Failure | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        """Not used: the relay never follows redirects."""

    @property
    def ended(self) -> bool:
        """Whether the body is over already (the whole of it came with the head, or the
        connection failed): the protocol given to deliverBody then gets all of it and its
        end at once, and has nothing to pause."""
        return self._ended is not None

    def deliverBody(self, protocol: IProtocol) -> None:
        transport: Any = self  # the transport: pause/resume/stop only (no cast: a call)
        protocol.makeConnection(transport)
        early, self._early = self._early, []
        ended = self._ended  # the whole body may be here already
        for data in early:
            if self._ended is not ended:
                break  # the protocol stopped the body meanwhile
            protocol.dataReceived(data)
        if self._ended is not None:
            # Told here, once; the response never keeps the protocol (no cycle between them).
            protocol.connectionLost(self._ended)
            return
        self._protocol = protocol
        if self._connection is not None:
            self._connection.body_to = protocol.dataReceived

    def splice_to(self, sink: Any, moved: Callable[[int], object]) -> bool:
        """Have the rest of the body moved straight to ``sink``, the client's transport, by
        the kernel (:mod:`.splice`) instead of through the protocol's ``dataReceived``;
        ``moved(n)`` tells how much went. Only for a body of known length with at least
        ``SPLICE_MIN`` bytes to come, over plain TCP on both sides, with nothing of the
        answer still queued for the client. Returns whether it will be (the protocol still
        hears of the end, by ``connectionLost``)."""
        connection = self._connection
        return connection is not None and connection.splice_to(sink, moved)

    def data(self, data: bytes) -> None:
        """Body that came before deliverBody: kept for it (after deliverBody, the connection
        hands each chunk straight to the protocol, ``body_to``)."""
        if self._ended is None:
            self._early.append(data)

    def end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._connection = None  # pause/resume/stop no longer reach the connection
        # The protocol's transport is this response: let go of it, so that the two are freed
        # as soon as nothing else holds them, not by the garbage collector.
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume()

    def abortConnection(self) -> None:
        """What twisted.web's ``readBody`` calls when it is cancelled: close the connection
        and end the body now, so that its protocol hears of it once, before the cancel."""
        self.stopProducing()
        self.end(Failure(ResponseFailed([Failure(ConnectionAborted())])))

    def stopProducing(self) -> None:
        """The body is not wanted any more: the connection is closed, never reused."""
        connection = self._connection
        if connection is not None:
            self._connection = None
            connection.abort()


class _Connection(Protocol):
    """One keep-alive connection to a backend, carrying one request at a time."""

    # Class defaults, set on a connection only when they change: each is read seldom (a pause,
    # a close), and a connection with 30 or more attributes of its own gets slower attribute
    # reads and method calls from CPython 3.11 (its attribute table is no longer shared).
    _paused = False
    _lost: Deferred[None] | None = None  # close()'s, fired once the connection is gone

    def __init__(
        self,
        pool: ConnectionPool,
        key: Key,
        fast_path: bool,
        max_head_size: int = MAX_HEAD_SIZE,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        self._pool = pool
        self._key = key
        self._fast = fast_path
        self._header_ops = RAW_HEADER_OPS if fast_path else PUBLIC_HEADER_OPS
        self._max_head_size = max_head_size
        self._max_headers = max_headers
        self._head_left: int | None = None  # bytes the head may still take; None: past it
        self._interim: Interim | None = None  # told of 1xx answers to the request in flight
        self._answer: Answer | None = None  # given the response instead of its Deferred
        self._parser = HttpResponseParser(self)
        self._waiting: Deferred[IResponse] | None = None  # until the response headers
        self._response: Response | None = None  # until the response body ends
        # A response whose head was parsed, told once the rest of that read is parsed too.
        self._announce: tuple[Deferred[IResponse], Answer | None, Response] | None = None
        # The response's body protocol once it has one: each chunk goes straight there.
        self.body_to: Callable[[bytes], object] | None = None
        self._head = False
        self._body: IBodyProducer | None = None  # a request body still being sent
        self._phrase = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._delimited_by_close = False
        self._reusable = True
        self._busy = True  # made for a request
        self.idle_since = 0.0  # when the pool got it back
        self._gone = False
        self._body_seen = 0  # bytes of this response's body parsed so far
        # Bytes read since the head or the last body bytes: chunk lines and trailers, which
        # the parser holds whole (a trailer line without an end grew without bound).
        self._framing = 0
        self._splice: Splice | None = None  # moving the rest of the body (or about to)
        self._held_request: bytes | None = None  # sent when the reactor's turn is over

    def connectionMade(self) -> None:
        # Read up to READ_SIZE per system call (Twisted reads 64 KiB): fewer trips through
        # the reactor and the parser per megabyte of a big response.
        transport: Any = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = READ_SIZE
        if (
            self._fast
            and getattr(getattr(transport, "protocol", None), "_wrappedProtocol", None) is self
        ):
            # The endpoint's wrapper only forwards once connected: each chunk of each answer
            # skips a call through it.
            transport.protocol = self

    # ---- the pool's side -------------------------------------------------------------

    def claim(self) -> bool:
        """Take this idle connection for a request (False if it is already gone)."""
        if self._gone:
            return False
        self._busy = True
        return True

    def close(self) -> Deferred[None]:
        """Close; fires once the connection is gone."""
        lost: Deferred[None] = Deferred()
        if self._gone:
            lost.callback(None)
            return lost
        self._lost = lost
        assert self.transport is not None
        self.transport.loseConnection()
        return lost

    # ---- sending ---------------------------------------------------------------------

    def send(
        self,
        method: bytes,
        target: bytes,
        host: bytes,
        headers: Headers | None,
        body: IBodyProducer | None,
        interim: Interim | None = None,
        answer: Answer | None = None,
    ) -> Deferred[IResponse]:
        waiting: Deferred[IResponse] = Deferred(self._cancelled)
        if self._gone:
            waiting.errback(Failure(RequestNotSent()))
            return waiting
        self._waiting = waiting
        self._interim = interim
        self._answer = answer
        self._head = method == b"HEAD"
        self._head_left = self._max_head_size
        self._phrase = b""
        self._headers = []
        self._body_seen = 0
        self._framing = 0
        parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    parts += (name, b": ", value, b"\r\n")
        transport = self.transport
        assert transport is not None
        if body is None:
            parts.append(b"Content-Length: 0\r\n\r\n" if method in _LENGTH_REQUIRED else b"\r\n")
            self._send(b"".join(parts))
            return waiting
        if isinstance(body, BytesProducer):
            parts += (b"Content-Length: %d\r\n\r\n" % body.length, body.body)
            self._send(b"".join(parts))
            return waiting
        chunked = body.length is UNKNOWN_LENGTH
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            parts.append(b"Content-Length: %d\r\n\r\n" % cast(int, body.length))
        transport.write(b"".join(parts))
        self._body = body
        cast(IConsumer, transport).registerProducer(body, True)
        consumer = _ChunkedConsumer(transport) if chunked else transport
        sent = body.startProducing(cast(IConsumer, consumer))
        sent.addCallbacks(self._body_sent, self._body_failed, (chunked,))
        return waiting

    def _send(self, data: bytes) -> None:
        """A request (head and body) in one write. With the fast path, one made during a turn
        waits for the end of the turn (:meth:`send_held`): the requests a busy turn makes then
        reach the backend together, and their answers come back together too, to fewer and
        fuller turns, where sending each at once had the backend answer one by one."""
        assert self.transport is not None
        if not self._fast:
            self.transport.write(data)
        elif OUTBOX.open:
            self._held_request = data
            OUTBOX.waiting.append(self)
        else:
            send_now(self.transport, data)

    def send_held(self) -> None:
        """Send the request held for the end of the turn, unless the connection was aborted
        or lost meanwhile (the backend never sees it then)."""
        data, self._held_request = self._held_request, None
        if data is not None and not self._gone and self.transport is not None:
            send_now(self.transport, data)

    def _body_sent(self, _: object, chunked: bool) -> None:
        if self._body is None:
            return  # stopped: the response came first or the connection went
        self._body = None
        assert self.transport is not None
        cast(IConsumer, self.transport).unregisterProducer()
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    def _body_failed(self, failure: Failure) -> None:
        if self._body is None:
            return
        self._body = None
        waiting, self._waiting = self._waiting, None
        self.abort()
        if waiting is not None and not waiting.called:
            waiting.errback(Failure(RequestTransmissionFailed([failure])))

    def _stop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            self._reusable = False  # the backend answered before reading the whole body
            body.stopProducing()
            if self.transport is not None and not self._gone:
                cast(IConsumer, self.transport).unregisterProducer()

    # ---- flow control of the response body ----------------------------------------------

    def pause(self) -> None:
        if self._splice is not None:
            return  # the splice reads only what the client takes
        if not self._paused and not self._gone:
            self._paused = True
            assert self.transport is not None
            cast(Any, self.transport).pauseProducing()

    def resume(self) -> None:
        if self._paused and not self._gone:
            self._paused = False
            assert self.transport is not None
            cast(Any, self.transport).resumeProducing()

    def _cancelled(self, waiting: Deferred[IResponse]) -> None:
        """The caller cancelled the request: the connection goes with it."""
        self.abort()

    def abort(self) -> None:
        self._held_request = None  # a request held for the end of the turn is not sent
        self._reusable = False
        self._stop_splice()
        if not self._gone and self.transport is not None:
            cast(Any, self.transport).abortConnection()

    # ---- receiving: httptools parser callbacks ------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if not self._busy:
            self.abort()  # a backend talking out of turn: never reuse this connection
            return
        left = self._head_left
        if left is not None:
            if len(data) > left:
                self._past_head_limit(data, left)
                return
            self._head_left = left - len(data)
        else:
            self._framing += len(data)  # set back to 0 by on_body
        self._feed(data)
        if self._framing > self._max_head_size:
            self._past_framing_limit()
        if self._splice is not None and not self._splice.started:
            self._start_splice()

    def _past_framing_limit(self) -> None:
        """More than the head's limit of chunk lines or trailers without body bytes."""
        self._framing = 0
        if not self._gone and self._response is not None:
            size = self._max_head_size
            self._broken(
                Failure(BadResponseHead(f"response trailers or chunk lines over {size} bytes"))
            )

    def _past_head_limit(self, data: bytes, left: int) -> None:
        """A read that takes the head past its limit: the parser gets what fits, and the rest
        only if the head ended within it (it never holds an oversized head)."""
        self._feed(data[:left])
        if self._head_left is not None and not self._gone:
            self._head_left = None
            size = self._max_head_size
            self._broken(Failure(BadResponseHead(f"response head over {size} bytes")))
        elif not self._gone:
            self.dataReceived(data[left:])  # the body, or what follows a HEAD answer
            return
        if self._splice is not None and not self._splice.started:
            self._start_splice()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as e:  # the relay does not upgrade
            self._unparsable(e)
        if self._announce is not None:  # this read carried a response's head
            self._announce_response()

    def _unparsable(self, error: HttpParserError | HttpParserUpgrade) -> None:
        """The response cannot be parsed (or asks to upgrade): the call fails, with the head
        limit's own error when that is what stopped the parser."""
        self._announce_response()
        cause = error.__context__
        self._broken(Failure(cause if isinstance(cause, BadResponseHead) else error))

    def on_status(self, phrase: bytes) -> None:
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(self._headers) > self._max_headers:
            raise BadResponseHead(f"more than {self._max_headers} response headers")

    def on_headers_complete(self) -> None:
        if not self._busy:  # more after a complete answer, in the same read
            self.abort()
            return
        code = self._parser.get_status_code()
        if code == 101:
            why = "101 Switching Protocols, but the relay never asks to upgrade a connection"
            self._broken(Failure(HttpParserError(why)))
            return
        if code < 100:
            self._broken(Failure(BadResponseHead(f"status {code} is not an HTTP status")))
            return
        ops = self._header_ops
        headers = ops.from_fields(self._headers)
        self._headers = []
        table = ops.table(headers)
        lengths = table.get(b"Content-Length")  # llhttp refuses two that differ
        framed = lengths is not None
        length: Any = int(lengths[-1]) if lengths else UNKNOWN_LENGTH
        codings = table.get(b"Transfer-Encoding")
        phrase, self._phrase = reason_phrase(code, self._phrase), b""
        if code < 200:
            # Interim (100 Continue, 103 Early Hints): the answer follows. Its head counts
            # against the same limit as the final one.
            if self._interim is not None:
                self._interim(code, phrase, headers)
            return
        if codings and chunked_last(codings):
            # llhttp refuses Content-Length beside Transfer-Encoding (ambiguous framing).
            framed = True
            length = UNKNOWN_LENGTH
        self._head_left = None
        self._interim = None
        no_body = self._head or code in _NO_BODY_STATUS
        if no_body and length is UNKNOWN_LENGTH:
            length = 0
        self._delimited_by_close = not framed and not no_body
        if not self._parser.should_keep_alive() or self._delimited_by_close:
            self._reusable = False
        response = Response(self, code, phrase, headers, length)
        self._response = response
        waiting, self._waiting = self._waiting, None
        answer, self._answer = self._answer, None
        if waiting is not None:
            # Told after this read is parsed, with the body that came with the head (kept by
            # the response): the relay then writes the head and that body in one send.
            self._announce = (waiting, answer, response)
        if self._head:
            # llhttp would wait for the Content-Length bytes a HEAD answer never has.
            self._reusable = False
            self._response_ended(_RESPONSE_DONE)

    def _announce_response(self) -> None:
        announce, self._announce = self._announce, None
        if announce is None:
            return
        waiting, answer, response = announce
        if answer is None:
            waiting.callback(response)
        else:
            _hand_over(response, answer)

    def on_body(self, data: bytes) -> None:
        self._body_seen += len(data)
        self._framing = 0
        deliver = self.body_to
        if deliver is not None:
            deliver(data)
        elif self._response is not None:
            self._response.data(data)

    def on_message_complete(self) -> None:
        if self._response is None:
            return  # informational, or a HEAD answer already ended
        if not self._parser.should_keep_alive():
            self._reusable = False
        self._stop_body()
        self._response_ended(_RESPONSE_DONE)

    # ---- a body moved by the kernel (vast_vespa.net.splice) ------------------------------

    def splice_to(self, sink: Any, moved: Callable[[int], object]) -> bool:
        """See :meth:`Response.splice_to`; starts once the read being parsed (the one with
        the response's head) is done, with what is left of the body then."""
        response = self._response
        if (
            not self._fast
            or self._splice is not None
            or response is None
            or self.body_to is None
            or not isinstance(response.length, int)
            or response.length - self._body_seen < SPLICE_MIN
            or not can_splice(self.transport)
            or not can_splice(sink)
            or has_unsent(sink)
        ):
            return False
        self._splice = Splice(
            cast(Any, self.transport), sink, moved, self._spliced, self._splice_unsupported
        )
        return True

    def _start_splice(self) -> None:
        splice = self._splice
        assert splice is not None
        response = self._response
        if response is None or self._gone or self.body_to is None:
            self._splice = None  # the response ended (or failed) in the same read
            return
        if has_unsent(splice.sink):
            self._splice = None  # this read's body did not all go out: relay the rest as usual
            return
        try:
            splice.start(cast(int, response.length) - self._body_seen)
        except OSError:  # no pipe to be had (out of file descriptors): the usual way, then
            self._splice = None
            return
        if self._paused:
            self._paused = False  # the splice reads as the client takes

    def _spliced(self) -> None:
        """The whole body went: the message is over (the parser never saw the rest of it,
        so the next response on this connection gets a new one)."""
        self._splice = None
        self._parser = HttpResponseParser(self)
        self._stop_body()  # an upload still going: the connection is not reused (as below)
        self._response_ended(_RESPONSE_DONE)

    def _splice_unsupported(self, taken: bytes) -> None:
        """splice(2) does not work here: what it took from the backend, and the rest, go
        through the parser as usual."""
        self._splice = None
        if taken:
            self.dataReceived(taken)

    def _stop_splice(self) -> None:
        splice, self._splice = self._splice, None
        if splice is not None:
            splice.stop()

    def _response_ended(self, reason: Failure) -> None:
        response, self._response = self._response, None
        self.body_to = None
        if self._paused:
            self.resume()
        if self._reusable and not self._gone:
            self._busy = False
            self._pool.give_back(self._key, self)
        elif not self._gone and self.transport is not None:
            self.transport.loseConnection()
        if response is not None:
            response.end(reason)

    def _broken(self, failure: Failure) -> None:
        """Garbage from the backend: fail what is in flight and drop the connection."""
        self.abort()
        self._fail_in_flight(failure)

    def _fail_in_flight(self, failure: Failure) -> None:
        self._head_left = None
        self._interim = None
        self._answer = None
        self._stop_body()
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            waiting.errback(Failure(ResponseNeverReceived([failure])))
        response, self._response = self._response, None
        self.body_to = None
        if response is not None:
            response.end(Failure(ResponseFailed([failure])))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._stop_splice()
        self._body = None  # the transport stops its producer itself
        if not self._busy:
            self._pool.forget(self._key, self)
        if self._response is not None and self._delimited_by_close:
            # No Content-Length and not chunked: the body ends with the connection.
            response, self._response = self._response, None
            self.body_to = None
            response.end(Failure(PotentialDataLoss()))
        if self._held_request is not None:
            # Lost before the turn ended: the request never left, so it may be sent again.
            self._held_request = None
            waiting, self._waiting = self._waiting, None
            if waiting is not None and not waiting.called:
                waiting.errback(Failure(RequestNotSent()))
        self._fail_in_flight(reason)
        lost, self._lost = self._lost, None
        if lost is not None:
            lost.callback(None)


def _hand_over(response: IResponse, answer: Answer) -> None:
    """``answer(response)``. An error there is a bug, logged as an unhandled error in a
    Deferred's callback would be; nobody reads the response now, so its connection is
    closed if the body is still coming."""
    try:
        answer(response)
    except Exception:
        _log.failure("the response to a backend request could not be handled")
        cast(Response, response).abortConnection()


class _ChunkedConsumer:
    """Writes a body of unknown length to the connection in chunked transfer coding."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        if data:
            self._transport.writeSequence([b"%x\r\n" % len(data), data, b"\r\n"])

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The connection's transport already has the body producer."""

    def unregisterProducer(self) -> None:
        """See registerProducer."""


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" line per backend connection

    def __init__(self, agent: LeanAgent, key: Key) -> None:
        self._agent = agent
        self._key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        agent = self._agent
        return _Connection(
            agent.pool, self._key, agent.fast_path, agent.max_head_size, agent.max_headers
        )


class _Backend:
    """What is worked out once per backend: pool key, Host header, endpoint."""

    def __init__(self, key: Key, endpoints: IAgentEndpointFactory) -> None:
        scheme, netloc = key
        self.key = key
        self.host = netloc
        self.endpoint = endpoints.endpointForURI(URI.fromBytes(scheme + b"://" + netloc + b"/"))


@implementer(IAgent)
class LeanAgent:
    """Sends requests over :class:`ConnectionPool` connections; see the module docstring."""

    MAX_BACKENDS = 256  # the client proxy talks to whichever workers it is routed to

    def __init__(
        self,
        pool: ConnectionPool,
        endpoints: IAgentEndpointFactory,
        fast_path: bool = True,
        max_head_size: int = MAX_HEAD_SIZE,
        max_headers: int = MAX_HEADERS,
    ) -> None:
        self.pool = pool
        self._endpoints = endpoints
        self.fast_path = fast_path
        self.max_head_size = max_head_size
        self.max_headers = max_headers
        self._backends: dict[Key, _Backend] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        return self.request_with_interim(method, uri, headers, bodyProducer)

    def request_with_interim(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
        interim: Interim | None = None,
        answer: Answer | None = None,
    ) -> Deferred[IResponse]:
        """:meth:`request`, with ``interim`` told of each 1xx answer (but 101) before the
        response. With ``answer``, the response goes to ``answer(response)`` instead of the
        Deferred, which then tells of failures alone (no response: not sent, cancelled, the
        connection broke): for the relay, whose every request would otherwise run a
        Deferred's callback chain (a measurable part of a small request's CPU)."""
        scheme, sep, rest = uri.partition(b"://")
        if not sep or scheme not in (b"http", b"https"):
            return fail(ValueError(f"not an http(s) URL: {uri!r}"))
        cut = len(rest)
        for mark in (b"/", b"?"):
            found = rest.find(mark)
            if 0 <= found < cut:
                cut = found
        netloc, target = rest[:cut], rest[cut:]
        if target[:1] != b"/":
            target = b"/" + target
        backend = self._backend(scheme, netloc)
        connection = self.pool.take(backend.key)
        if connection is None:
            return self._connect(backend, method, target, headers, bodyProducer, interim, answer)
        sent = connection.send(method, target, backend.host, headers, bodyProducer, interim, answer)
        if bodyProducer is None and method in _RETRY_SAFE:
            sent.addErrback(
                self._closed_while_idle, backend, method, target, headers, interim, answer
            )
        return sent

    def _connect(
        self,
        backend: _Backend,
        method: bytes,
        target: bytes,
        headers: Headers | None,
        body: IBodyProducer | None,
        interim: Interim | None,
        answer: Answer | None,
    ) -> Deferred[IResponse]:
        connecting = backend.endpoint.connect(_ConnectionFactory(self, backend.key))
        sent = connecting.addCallback(
            lambda connection: connection.send(method, target, backend.host, headers, body, interim)
        )
        if answer is not None:
            # Through the Deferred: the endpoint keeps this one for as long as the connection
            # lives, so it must fire, or it would keep the caller's errback (and the caller).
            sent.addCallback(_hand_over, answer)
        return sent  # type: ignore[no-any-return]

    def _closed_while_idle(
        self,
        failure: Failure,
        backend: _Backend,
        method: bytes,
        target: bytes,
        headers: Headers | None,
        interim: Interim | None,
        answer: Answer | None,
    ) -> Failure | Deferred[IResponse]:
        """A kept-alive connection the backend had closed just before (its FIN not read yet):
        a body-less idempotent request is sent again on a new connection."""
        reasons = getattr(failure.value, "reasons", None)
        if failure.check(ResponseNeverReceived) and reasons and reasons[0].check(ConnectionClosed):
            return self._connect(backend, method, target, headers, None, interim, answer)
        return failure

    def _backend(self, scheme: bytes, netloc: bytes) -> _Backend:
        key = (scheme, netloc)
        backend = self._backends.get(key)
        if backend is None:
            if len(self._backends) >= self.MAX_BACKENDS:
                del self._backends[next(iter(self._backends))]
            backend = _Backend(key, self._endpoints)
            self._backends[key] = backend
        return backend


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per connection


def quiet_pool(reactor: Any, *, fast_path: bool) -> HTTPConnectionPool:
    """A persistent Agent pool for control-plane calls; with the fast path it logs nothing
    per connection (stock Twisted logs "Starting factory" for each)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    if fast_path:
        pool._factory = _QuietClientFactory
    return pool


def backend_pool(reactor: Any) -> ConnectionPool:
    """Keep-alive connections for backend calls: no new TCP connection per request."""
    return ConnectionPool(reactor)


# Either kind of pool the services close on the way out.
AnyPool = HTTPConnectionPool | ConnectionPool

# closeCachedConnections can hang (twisted#7738): never wait for it longer than this.
POOL_CLOSE_TIMEOUT = 5.0


def close_pool(pool: AnyPool, clock: IReactorTime) -> Deferred[None]:
    """Close a pool's connections, waiting at most POOL_CLOSE_TIMEOUT seconds; never fails.
    The close is left to finish, not cancelled at the limit: cancelling Twisted's leaves a
    CancelledError per connection unhandled, logged as an error when collected."""
    waited: Deferred[None] = Deferred()
    limit = clock.callLater(POOL_CLOSE_TIMEOUT, waited.callback, None)

    def closed(_: object) -> None:
        if limit.active():
            limit.cancel()
            waited.callback(None)

    pool.closeCachedConnections().addBoth(closed)
    return waited


@implementer(IAgentEndpointFactory)
class _CachedEndpoints:
    """
    One endpoint per (scheme, host, port), made once. Agent's default factory builds a new
    endpoint (and its TLS options) for every request, work that showed on small requests,
    although the relay always talks to the same backend. The client proxy talks to
    whichever workers the autoscaler routes to, so at most MAX_ENDPOINTS are kept (oldest out).

    A host given as an IP address gets a plain TCP endpoint: ``HostnameEndpoint`` looks every
    address up again on each new connection, in a thread (and makes a class per attempt),
    which added CPU and latency to every new connection. A name
    (``localhost``) gets a :class:`.resolve.NamedEndpoint`: each address it has is tried,
    and look-ups are kept for a few seconds (one set per agent).
    """

    MAX_ENDPOINTS = 256

    def __init__(
        self, reactor: Any, connect_timeout: float | None, tls: IPolicyForHTTPS | None
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls = tls or BrowserLikePolicyForHTTPS()
        self._made: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}
        self._names: RememberedNames | None = None

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            if len(self._made) >= self.MAX_ENDPOINTS:
                del self._made[next(iter(self._made))]
            endpoint = self._tcp(uri.host.decode("ascii"), uri.port)
            if uri.scheme == b"https":
                creator = self._tls.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._made[key] = endpoint
        return endpoint

    def _tcp(self, host: str, port: int) -> IStreamClientEndpoint:
        """A TCP endpoint to ``host``: straight to it when it is an IP address."""
        timeout = 30 if self._timeout is None else self._timeout  # Twisted's default
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout)
        if self._names is None:
            self._names = RememberedNames(self._reactor.nameResolver, self._reactor)
        return NamedEndpoint(self._reactor, self._names, host, port, timeout)


def backend_agent(
    reactor: Any,
    pool: ConnectionPool,
    connect_timeout: float | None = None,
    tls: IPolicyForHTTPS | None = None,
    *,
    fast_path: bool,
    max_head_size: int = MAX_HEAD_SIZE,
    max_headers: int = MAX_HEADERS,
) -> IAgent:
    """The relay's agent (:class:`LeanAgent`): connections from ``pool``, endpoints made
    once per backend, giving up on a connection attempt after ``connect_timeout`` seconds
    (None: Twisted's 30), https checked by ``tls`` (None: Twisted's browser-like policy),
    response heads refused beyond ``max_head_size`` bytes or ``max_headers`` headers."""
    endpoints = _CachedEndpoints(reactor, connect_timeout, tls)
    return LeanAgent(pool, endpoints, fast_path, max_head_size, max_headers)
