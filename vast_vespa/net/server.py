# -*- test-case-name: tests.test_framing,tests.test_limits,tests.test_channel -*-
"""
The worker's HTTP/1.1 edge: each client connection, parsed strictly and held to resource
limits before anything is handed to the resource (and so to the backend).

:class:`GuardedChannel` is to twisted.web's ``Request`` what ``HTTPChannel`` is (its transport,
consumer and producer), with its own parser: a request head is split and checked with a few
bytes operations and compiled patterns, not line by line through ``LineReceiver``, which cost
about a tenth of the worker's CPU per request. Chunked bodies go through twisted.web's own
chunk decoder. What is refused, always as a JSON error followed by closing the connection
(after a framing error nothing that follows on the connection can be trusted):

- 400: a malformed request line, a header name that is not a token, control characters other
  than HTAB in a value, obs-fold, duplicate or missing ``Host``, ``Content-Length`` with
  ``Transfer-Encoding``, two ``Content-Length`` headers or one that is not digits, a
  ``Transfer-Encoding`` other than ``chunked``, malformed chunks;
- 405: CONNECT and TRACE; 505: an HTTP version other than 1.0 and 1.1;
- 414/431: a request line or head over the size limit, too many headers;
- 413: a body over the size limit (from ``Content-Length`` before it is read, or while a
  chunked body arrives);
- 408: a head not complete within its deadline (slowloris), a body slower than the minimum
  rate; 503: connections over the cap.

Requests on a connection are answered in order. While one is answered, what the client sends
next waits unparsed (up to ``PIPELINE_BUFFER`` bytes; then the connection is not read until
the answer is done), so a pipelined request never reaches the resource early.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.interfaces import (
    IDelayedCall,
    IProducer,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import (
    _ChunkedTransferDecoder,
    _MalformedChunkedDataError,
)
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from vast_vespa.outcome import JSON, error_body

if TYPE_CHECKING:
    from vast_vespa.site import VespaSite

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^\x00-\x20\x7f]+) (HTTP/[0-9]\.[0-9])")
# Header values may carry visible characters, obs-text, SP and HTAB only (RFC 9110 section
# 5.5); other control bytes are what smuggling differentials between parsers are made of.
# One class to the end of the line, with no choice where whitespace belongs (the caller strips
# it): a line is matched in one pass. Patterns with whitespace both inside and around the value
# backtrack over runs of spaces: a 4 KiB line of spaces ending in a control byte took 66 s of
# CPU to refuse.
_HEADER = re.compile(rb"(" + _TOKEN + rb"):([^\x00-\x08\x0a-\x1f\x7f]*)")
_SUPPORTED = (b"HTTP/1.0", b"HTTP/1.1")
REFUSED_METHODS = (b"CONNECT", b"TRACE")
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# How often the body rate is checked, and how long a refused client may keep sending before
# its connection is cut (so that it can read the error instead of getting a reset).
BODY_RATE_WINDOW = 10.0
LINGER = 2.0
# Pipelined input held while a request is answered before the connection stops being read;
# and how long a timed-out connection gets to close cleanly before it is aborted.
PIPELINE_BUFFER = 0x4000
# Request bodies up to this size are kept in memory, larger ones in a temporary file (as
# twisted.web does).
IN_MEMORY_BODY = 100_000
ABORT_TIMEOUT = 15.0
REASONS = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}


@dataclass(frozen=True)
class Limits:
    """What one client may send, and how slowly; see the README's "Limits and hardening"."""

    max_body_size: int = 1 << 30
    max_header_size: int = 16384  # request line plus all header lines, in bytes
    max_headers: int = 100
    head_timeout: float = 30.0  # seconds from a request's first byte to its last header
    min_body_rate: float = 1024.0  # bytes per second, averaged over BODY_RATE_WINDOW; 0 = off
    max_connections: int = 2048  # open client connections; 0 = no limit


class _Refused(Exception):
    """Raised while a head is checked; its arguments are :meth:`GuardedChannel.refuse`'s."""


def _bad(detail: str) -> _Refused:
    return _Refused(400, "bad request", detail)


@implementer(IPushProducer)
class GuardedChannel(Protocol):
    """One client connection: strict HTTP/1.1 parsing, :class:`Limits` (from its site), and the
    transport side of each twisted.web ``Request`` on it."""

    site: VespaSite
    requestFactory: Callable[[GuardedChannel], Request]
    timeOut: float | None = None  # idle timeout, set by the site (HTTPFactory.buildProtocol)
    callLater: Callable[..., IDelayedCall]  # the site's reactor, set by HTTPFactory.buildProtocol
    _log = Logger()

    # The state of a connection, as class defaults (only what changes is stored per
    # connection; S3 makes a connection per stream).
    _transport: Any = None  # TCP or TLS, from connectionMade
    _request: Request | None = None  # from a complete head until it is answered
    _command = _path = _version = b""
    _persistent = True
    _remaining = 0  # body bytes still to come (Content-Length)
    _chunks: _ChunkedTransferDecoder | None = None
    _chunks_rest: bytes | None = None  # what followed the last chunk, once it came
    _body_bytes = 0
    _window_bytes = 0
    _answering = False  # the request has gone to the resource and is not finished
    _parsing = False
    _held_size = 0
    _reading_paused = False
    _waiting_for_transport = False
    _producer: IPushProducer | None = None  # the answer's, registered by its Request
    _producer_streaming = True
    _drop_input = False
    _refused = False
    _counted = False
    _secure = False
    _last_seen = 0.0
    _head_timer: IDelayedCall | None = None
    _rate_timer: IDelayedCall | None = None
    _idle_timer: IDelayedCall | None = None
    _linger: IDelayedCall | None = None

    def __init__(self) -> None:
        self._head = bytearray()  # the start of a request head not complete yet
        self._held: list[bytes] = []  # pipelined input, parsed once the answer is done

    @property
    def limits(self) -> Limits:
        return self.site.limits

    # The connection

    def connectionMade(self) -> None:
        transport = self._transport = cast(Any, self.transport)  # TCP or TLS
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)  # an SSE event is one small write: no Nagle delay
        self._secure = ISSLTransport(transport, None) is not None
        self._peer = transport.getPeer()
        self._host = transport.getHost()
        transport.registerProducer(self, True)
        self._counted = True
        self.site.open_connections += 1
        limit = self.limits.max_connections
        if limit and self.site.open_connections > limit:
            self.refuse(
                503,
                "too many connections",
                f"this worker accepts at most {limit} open connections; retry shortly",
                [(b"retry-after", b"1")],
            )
            return
        if self.timeOut:
            self._last_seen = self.site.reactor.seconds()
            self._idle_timer = self.callLater(self.timeOut, self._idle_check)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted:
            self._counted = False
            self.site.open_connections -= 1
        for timer in (self._head_timer, self._rate_timer, self._idle_timer, self._linger):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._rate_timer = self._idle_timer = self._linger = None
        self._drop_input = True
        request, self._request = self._request, None
        if request is not None:
            request.connectionLost(reason)

    def _idle_check(self) -> None:
        """A connection with no request for ``timeOut`` seconds is closed (checked lazily: no
        timer is reset per request)."""
        assert self.timeOut is not None
        if self._answering or self._request is not None or self._head:
            # A request arriving or being answered: its own deadlines apply, look again later.
            self._idle_timer = self.callLater(self.timeOut, self._idle_check)
            return
        idle = self.site.reactor.seconds() - self._last_seen
        if idle < self.timeOut:
            self._idle_timer = self.callLater(self.timeOut - idle, self._idle_check)
            return
        self._idle_timer = None
        self._log.info("Timing out client: {peer}", peer=str(self._peer))
        transport = self._transport
        self._linger = self.callLater(ABORT_TIMEOUT, transport.abortConnection)
        self.loseConnection()

    # Refusing

    def refuse(
        self,
        code: int,
        error: str,
        detail: str,
        headers: list[tuple[bytes, bytes]] | tuple[()] = (),
    ) -> None:
        """Answer with a JSON error and close; everything the client sends after is ignored."""
        if self._refused:
            return
        self._refused = self._drop_input = True
        self.site.refusals[error] += 1
        self._log.info(
            "refused {peer}: {code} {error}",
            peer=getattr(self._peer, "host", "?"),
            code=code,
            error=error,
        )
        for timer in (self._head_timer, self._rate_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._rate_timer = self._idle_timer = None
        body = error_body(error, detail)
        lines = [
            b"HTTP/1.1 %d %s" % (code, REASONS[code]),
            b"content-type: " + JSON,
            b"content-length: %d" % len(body),
            b"connection: close",
            *(name + b": " + value for name, value in headers),
        ]
        transport = self._transport  # a TCP or TLS transport
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        transport.unregisterProducer()
        # Half-close and keep reading (and dropping) for a moment: closing with unread input
        # would send a reset that can destroy the answer before the client reads it.
        close_write = getattr(transport, "loseWriteConnection", None)
        if close_write is None:
            transport.loseConnection()
            return
        close_write()
        transport.resumeProducing()
        self._linger = self.callLater(LINGER, transport.abortConnection)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # What twisted.web's Request calls on input it cannot use.
        self.refuse(400, "bad request", "malformed HTTP request")

    # Input

    def dataReceived(self, data: bytes) -> None:
        if self._drop_input:
            return
        if self._answering:
            self._hold(data)
            return
        if self._request is not None:
            self._window_bytes += len(data)
        self._consume(data)
        self._arm_input_timers()

    def _hold(self, data: bytes) -> None:
        """Keep input that came while a request is answered; stop reading past a limit."""
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > PIPELINE_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self._transport.pauseProducing()

    def _consume(self, data: bytes) -> None:
        """Parse ``data`` as far as it goes: heads, bodies, and each complete request to the
        resource; what comes while a request is answered is held."""
        self._parsing = True
        try:
            while data and not self._drop_input:
                if self._answering:
                    self._hold(data)
                    return
                if self._request is None:
                    data = self._receive_head(data)
                elif self._chunks is not None:
                    data = self._receive_chunks(data)
                else:
                    data = self._receive_body(data)
        finally:
            self._parsing = False

    def _arm_input_timers(self) -> None:
        """Input stopped mid-head or mid-body: start its deadline (never armed for a request
        whose head and body come in one read, which is nearly all of them)."""
        if self._drop_input or self._answering:
            return
        if self._request is None:
            if self._head and self._head_timer is None:
                self._head_timer = self.callLater(self.limits.head_timeout, self._head_too_slow)
        elif self._rate_timer is None and self.limits.min_body_rate:
            self._window_bytes = 0
            self._rate_timer = self.callLater(BODY_RATE_WINDOW, self._check_body_rate)

    # The request head

    def _receive_head(self, data: bytes) -> bytes:
        """Buffer ``data`` until the head is complete; then check it and start the request.
        Returns what follows the head."""
        seen = len(self._head)
        if seen:
            self._head += data  # a bytearray: a head sent byte by byte costs linear time
            buffer: bytes | bytearray = self._head
        else:
            buffer = data.lstrip(b"\r\n") if data[:1] in (b"\r", b"\n") else data
            # (empty lines before a request line are ignored)
        end = buffer.find(b"\r\n\r\n", max(seen - 3, 0))
        limit = self.limits.max_header_size
        if end < 0:
            if len(buffer) > limit:
                self._head_too_large(buffer)
            elif not seen and buffer:
                self._head = bytearray(buffer)
            return b""
        head, rest = bytes(buffer[:end]), bytes(buffer[end + 4 :])
        self._head = bytearray()
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None
        if end > limit:
            self._head_too_large(head)
            return b""
        try:
            self._start_request(head)
        except _Refused as refusal:
            self.refuse(*refusal.args)
            return b""
        return rest

    def _head_too_large(self, buffer: bytes | bytearray) -> None:
        detail = f"request line and headers are limited to {self.limits.max_header_size} bytes"
        line_end = buffer.find(b"\r\n")
        if line_end < 0 or line_end > self.limits.max_header_size:
            self.refuse(414, "request line too long", detail)
        else:
            self.refuse(431, "request headers too large", detail)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.refuse(
            408,
            "request timeout",
            f"request headers not complete within {self.limits.head_timeout:g} s",
        )

    def _start_request(self, head: bytes) -> None:
        """Check a complete head (without its final blank line) and create its Request."""
        lines = head.split(b"\r\n")
        line = _REQUEST_LINE.fullmatch(lines[0])
        if line is None:
            raise _bad("malformed request line")
        method, target, version = line.groups()
        if version not in _SUPPORTED:
            raise _Refused(505, "HTTP version not supported", "use HTTP/1.1")
        if method.upper() in REFUSED_METHODS:
            raise _Refused(
                405,
                "method not allowed",
                f"{method.decode('ascii')} is not relayed",
                [(b"allow", ALLOW)],
            )
        limits = self.limits
        if len(lines) > limits.max_headers + 1:
            raise _Refused(
                431, "too many headers", f"at most {limits.max_headers} headers are accepted"
            )
        headers = Headers()
        length: int | None = 0
        has_length = chunked = False
        hosts = 0
        connection: list[bytes] = []
        expect = cookies = False
        for raw in lines[1:]:
            header = _HEADER.fullmatch(raw)
            if header is None:
                if raw[:1] in (b" ", b"\t"):
                    raise _bad("obsolete line folding in headers is not accepted")
                raise _bad("malformed header: a name that is not a token, or control characters")
            name, value = header.groups()
            value = value.strip(b" \t")
            lower = name.lower()
            if lower in _FRAMING:
                if lower == b"host":
                    hosts += 1
                elif lower == b"content-length":
                    if has_length or chunked:
                        raise _bad("a request may have one Content-Length and no Transfer-Encoding")
                    if not value.isdigit():
                        raise _bad("Content-Length must be a decimal number")
                    has_length, length = True, int(value)
                elif lower == b"transfer-encoding":
                    coding = value.lower()
                    if coding == b"identity":
                        continue  # twisted.web accepts it, as a no-op
                    if coding != b"chunked" or has_length or chunked:
                        raise _bad("only one Transfer-Encoding: chunked, without Content-Length")
                    chunked, length = True, None
                elif lower == b"connection":
                    connection.append(value)
                elif lower == b"expect":
                    expect = expect or value.lower() == b"100-continue"
                else:
                    cookies = True
            headers.addRawHeader(name, value)
        if hosts > 1 or (not hosts and version == b"HTTP/1.1"):
            raise _bad("an HTTP/1.1 request needs exactly one Host header")
        if length is not None and length > limits.max_body_size:
            raise self._too_large()
        request = self.requestFactory(self)
        request.requestHeaders = headers
        self._request = request
        self._command, self._path, self._version = method, target, version
        self._persistent = version == b"HTTP/1.1" and not _asks_to_close(connection)
        if version == b"HTTP/1.1" and not self._persistent:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        if cookies:
            request.parseCookies()
        request.gotLength(length)
        if expect and version == b"HTTP/1.1":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._body_bytes = 0
        if chunked:
            self._chunks_rest = None
            self._chunks = _ChunkedTransferDecoder(self._chunk_received, self._chunks_done)
        elif length:
            self._remaining = length
        else:
            self._all_content_received()

    # The request body

    def _too_large(self) -> _Refused:
        return _Refused(
            413,
            "request body too large",
            f"request bodies are limited to {self.limits.max_body_size} bytes",
        )

    def _receive_body(self, data: bytes) -> bytes:
        """A body of known length; returns what follows it."""
        request = cast(Request, self._request)
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            request.handleContentChunk(data)
            return b""
        request.handleContentChunk(data if len(data) == remaining else data[:remaining])
        self._remaining = 0
        self._all_content_received()
        return data[remaining:]

    def _receive_chunks(self, data: bytes) -> bytes:
        """A chunked body; returns what follows its last chunk."""
        chunks = cast(_ChunkedTransferDecoder, self._chunks)
        try:
            chunks.dataReceived(data)
        except _MalformedChunkedDataError as error:
            self.refuse(400, "bad request", f"malformed chunked body: {error}")
            return b""
        rest = self._chunks_rest
        if rest is None or self._drop_input:
            return b""
        self._chunks = self._chunks_rest = None
        self._all_content_received()
        return rest

    def _chunk_received(self, data: bytes) -> None:
        if self._drop_input:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self.limits.max_body_size:
            self.refuse(*self._too_large().args)
            return
        cast(Request, self._request).handleContentChunk(data)

    def _chunks_done(self, rest: bytes) -> None:
        self._chunks_rest = rest

    def _check_body_rate(self) -> None:
        self._rate_timer = None
        needed = self.limits.min_body_rate * BODY_RATE_WINDOW
        if self._window_bytes < needed:
            self.refuse(
                408,
                "request timeout",
                f"request body arrived slower than {self.limits.min_body_rate:g} bytes/s",
            )
            return
        self._window_bytes = 0
        self._rate_timer = self.callLater(BODY_RATE_WINDOW, self._check_body_rate)

    def _all_content_received(self) -> None:
        """The request is complete: hand it to the resource (twisted.web's requestReceived)."""
        if self._rate_timer is not None:
            if self._rate_timer.active():
                self._rate_timer.cancel()
            self._rate_timer = None
        self._answering = True
        if not self._persistent:
            self._drop_input = True  # nothing after a last request is read
        cast(Request, self._request).requestReceived(self._command, self._path, self._version)

    # What twisted.web's Request calls

    def requestDone(self, request: Request) -> None:
        """The answer is complete: close, or go on with what the client sent meanwhile."""
        if request is not self._request:
            raise TypeError(f"{request!r} is not this connection's current request")
        self._request = None
        self._answering = False
        if not self._persistent:
            self.loseConnection()
            return
        if self.timeOut:
            self._last_seen = self.site.reactor.seconds()
        held, self._held, self._held_size = self._held, [], 0
        if self._reading_paused and not self._waiting_for_transport:
            self._reading_paused = False
            self._transport.resumeProducing()
        if held and not self._parsing:
            self._consume(b"".join(held))
            self._arm_input_timers()

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host

    def isSecure(self) -> bool:
        return self._secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        sequence = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                sequence.extend((name, b": ", value, b"\r\n"))
        sequence.append(b"\r\n")
        self._transport.writeSequence(sequence)

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._transport.writeSequence(data)

    def loseConnection(self) -> None:
        transport = self._transport
        transport.unregisterProducer()
        transport.loseConnection()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """The answer's producer: paused and resumed with this connection's send buffer."""
        if self._producer is not None:
            raise RuntimeError(f"{self._producer!r} is still registered")
        if not streaming:
            pull = _PullToPush(producer, self)
            pull.startStreaming()
            producer = pull
        self._producer = cast(IPushProducer, producer)
        self._producer_streaming = streaming

    def unregisterProducer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None and not self._producer_streaming:
            cast(_PullToPush, producer).stopStreaming()

    # IPushProducer, for the transport: its send buffer is full, or has room again

    def pauseProducing(self) -> None:
        self._waiting_for_transport = True
        if self._producer is not None:
            self._producer.pauseProducing()
        if not self._answering and not self._reading_paused:
            # A client that does not read its answers does not get to send more requests.
            self._reading_paused = True
            self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._waiting_for_transport = False
        if self._producer is not None:
            self._producer.resumeProducing()
        if not self._answering and self._reading_paused:
            self._reading_paused = False
            self._transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()


_FRAMING = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"cookie")
)


def _asks_to_close(values: list[bytes]) -> bool:
    """Whether Connection header values carry the ``close`` option."""
    return any(token.strip().lower() == b"close" for value in values for token in value.split(b","))
