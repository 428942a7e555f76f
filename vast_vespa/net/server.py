# -*- test-case-name: tests.test_framing,tests.test_limits,tests.test_channel -*-
"""
The HTTP/1.1 edge of every Vespa listener: each client connection, parsed strictly and held to
resource limits before anything is handed to the resource (and so to the backend).

:class:`GuardedChannel` is to twisted.web's ``Request`` what ``HTTPChannel`` is (its transport,
consumer and producer). Requests are parsed by llhttp (``httptools.HttpRequestParser``, strict
by default, maintained and fuzzed; one parser per connection), with Vespa's limits, deadlines
and refusals on top. This module uses no private names: it imports nothing private from
Twisted and reads no private attribute of a Twisted object (``_respondToBadRequestAndDisconnect``
is not used but provided: twisted.web's Request calls it on its channel). What is refused,
always as a JSON error followed by closing the connection (after a framing error nothing that
follows on the connection can be trusted), and never seen by the resource:

- 400: a malformed request line or target (control characters, spaces, bytes that are not
  ASCII), a header name that is not a token, control characters other than HTAB in a value,
  obs-fold, lines not ended by CRLF, a ``*`` target (``OPTIONS *``), duplicate or missing
  ``Host``, ``Content-Length`` with ``Transfer-Encoding``, two ``Content-Length`` headers or
  one that is not digits or is 2^64 or more, a ``Transfer-Encoding`` other than a single
  ``chunked`` (``identity`` included), malformed chunks (a chunk size of 2^64 or more
  included), more than ``max_header_size`` bytes of chunk extensions and trailers in a row,
  an upgrade request with a body;
- 405 (with ``Allow``): CONNECT, TRACE and any method llhttp does not know (it knows the
  registered ones, as Node.js's server; lowercase names are not methods); 505: an HTTP
  version other than 1.0 and 1.1 (the HTTP/2 preface included; llhttp also reads RTSP/1.0 and
  ICE/1.0 in a request line, answered as HTTP/1.0: nothing of the client's framing reaches the
  backend);
- 414/431: a request line or head over the size limit, too many headers; 413: a body over the
  size limit (from ``Content-Length`` before it is read, or while a chunked body arrives);
- 408: a head not complete within its deadline (slowloris), a body slower than the minimum
  rate; 503: connections over the cap (in all, or from one address) when no idle connection
  could be closed to make room (:class:`ConnectionTable`).

Header fields whose name holds an underscore are dropped (counted in the site's
``dropped_headers``), as nginx drops them: a WSGI/ASGI backend would read ``X_Forwarded_For``
as ``X-Forwarded-For``.

Pipelined requests are parsed one at a time, as nginx parses them: behind a request being
answered, only the next request's head is parsed (queued, or the refusal it holds, and handed
out once the answer is done); the rest (that request's body, the requests behind it) is queued
as it came and parsed when its turn comes. So a pipelined request never reaches the resource
early, an error in one is answered after the answers before it, and a connection holds about
the bytes it sent, not a parsed request (a head's fields, its Headers) for every few dozen of
them. llhttp cannot stop after a request and resume: input that begins between requests (nearly
every read: one whole request) is fed whole, and if a second request begins in it, llhttp is
stopped there and the input parsed again with a new parser a piece at a time, each piece up to
a head's end (a body of known length is not searched). Past ``PIPELINE_BUFFER`` bytes received
during an answer, the connection is not read until all of it is handed out. A connection that
is not read is checked every ``HANGUP_CHECK`` seconds, by one timer for its whole site, for its
client's close (the FIN or a reset in its socket's TCP state, which shows it behind unread input
too, on Linux; a peek elsewhere); the close is then met as on a connection being read: the
connection is read again, its input dropped, and the request in progress is told of the lost
connection, so that the backend stops working for nobody. (A client that half-closed after
sending has left there as here: this channel does not serve half-closed connections. A timer
rather than the reactor: epoll would need the socket registered for ``EPOLLRDHUP``, which
Twisted's public API does not offer, and connections are paused rarely.)

llhttp has no limit on a head's size: it is counted here, exactly from read to read, and within
one read from what llhttp reports (whitespace it skips is not counted); while a head is open,
input without a line end is kept (not parsed) until one comes, so a head sent in small pieces
costs linear time. Vespa never upgrades a connection: an upgrade request without a body is
answered as a plain request, and the parser starts afresh on what follows it (llhttp would skip
it); one with a body is refused, so its body is never parsed as a request.
"""

from __future__ import annotations

import re
import socket
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, cast
from typing import Protocol as Interface

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IProducer,
    IPullProducer,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from vast_vespa.headers import TOKEN
from vast_vespa.net.idle_sweep import IdleSweep
from vast_vespa.outcome import JSON, error_body

if TYPE_CHECKING:
    from vast_vespa.site import VespaSite

_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
# Headers a refusal adds to its answer (name, value).
ExtraHeaders = list[tuple[bytes, bytes]] | tuple[()]
REFUSED_METHODS = (b"CONNECT", b"TRACE")
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# How often the body rate is checked, and how long a refused client may keep sending before
# its connection is cut (so that it can read the error instead of getting a reset).
BODY_RATE_WINDOW = 10.0
LINGER = 2.0
# Input received while a request is answered before the connection stops being read; and how
# long a timed-out connection gets to close cleanly before it is aborted.
PIPELINE_BUFFER = 0x4000
ABORT_TIMEOUT = 15.0
# How often a connection that is not read (see PIPELINE_BUFFER) is checked for its client's
# close, by one timer for all of a site's.
HANGUP_CHECK = 1.0
# Where a piece of pipelined input ends (see GuardedChannel._piece_end): a head's end, a line
# then an empty line (a run of empty lines between requests is no head's end); how far into a
# chunked body (whose end is not known before it is parsed) the search for it starts.
_NOT_LINE_END = re.compile(rb"[^\r\n]")
CHUNKED_PIECE = 1024
# A socket's state in the first byte of Linux's TCP_INFO: the client's FIN (CLOSE_WAIT) or a
# reset (CLOSE) has arrived, whatever input is still unread before it.
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
_CLIENT_CLOSED_STATES = (7, 8)  # TCP_CLOSE, TCP_CLOSE_WAIT (linux/tcp_states.h)
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
_BAD = "bad request"
_LINE_ENDS = "lines must end with CRLF (no bare CR or LF)"
_REQUEST_LINE = "malformed request line: expected METHOD TARGET HTTP/1.1"
_FOLDING = "obsolete line folding in headers is not accepted"
_NAME = "malformed header: a name that is not a token"
# llhttp's reasons for refusing input (llhttp 9) -> the answer's detail: the first entry whose
# fragment the reason holds. The version's are answered 505, the others 400.
_VERSION_ERRORS = (
    ("Invalid HTTP version", "use HTTP/1.1"),
    ("PRI/Upgrade", "HTTP/2 is not served here: use HTTP/1.1"),
)
_PARSE_ERRORS = (
    ("Chunk size overflow", "malformed chunked body: a chunk size of 2^64 or more"),
    ("after chunk data", "malformed chunked body: chunk data not followed by CRLF"),
    ("chunk size", "malformed chunked body: a chunk size that is not hex digits"),
    ("chunk extension", "malformed chunked body: a malformed chunk extension"),
    ("chunk", "malformed chunked body ({reason})"),
    ("Content-Length overflow", "Content-Length is too large a number (2^64 or more)"),
    ("Duplicate Content-Length", "a request may have one Content-Length"),
    ("can't be present", "a request may not have both Content-Length and Transfer-Encoding"),
    ("Content-Length", "Content-Length must be a decimal number"),
    ("Transfer-Encoding", "only one Transfer-Encoding: chunked is accepted"),
    ("whitespace after header value", _FOLDING),
    ("space after start line", _FOLDING + " (a header line starts with a space)"),
    ("header token", _NAME),
    ("header field char", _NAME),
    ("header value char", "malformed header: control characters in a value"),
    ("CR", _LINE_ENDS),
    ("LF", _LINE_ENDS),
    ("url", "malformed request target: control characters, spaces or non-ASCII bytes"),
    ("Expected", _REQUEST_LINE),
    ("version", _REQUEST_LINE),
)
# What the parser found, queued in order until it is handed to twisted.web (see _apply), and
# last, input kept as it came behind it (a bytearray: parsed when its turn comes).
_HEAD, _BODY, _END, _REFUSE, _RAW = range(5)
_END_EVENT = (_END,)


@dataclass(frozen=True)
class Limits:
    """What one client may send, and how slowly; see "Limits and hardening" in docs/protocol.md."""

    max_body_size: int = 1 << 30
    max_header_size: int = 16384  # request line plus all header lines, in bytes
    max_headers: int = 100
    head_timeout: float = 30.0  # seconds from a request's first byte to its last header
    min_body_rate: float = 1024.0  # bytes per second, averaged over BODY_RATE_WINDOW; 0 = off
    max_connections: int = 2048  # open client connections; 0 = no limit
    max_connections_per_address: int = 0  # open connections from one client address; 0 = off


# How long a connection must have been idle to be closed to make room: a keep-alive connection
# that has just been answered is likely to carry its client's next request at once (closing it
# then races that request), while idle floods have long been idle.
RECLAIM_AFTER = 1.0


class ConnectionTable:
    """A site's open client connections: how many, from which address, and which are idle
    (no request arriving or being answered, one that has sent nothing included), oldest idle
    first. At ``max_connections``, or at an address's cap, the oldest idle connection (of that
    address, for its cap) is closed to make room before a new one is refused, as nginx closes
    idle keep-alive connections, if it has been idle for :data:`RECLAIM_AFTER`: silent
    connections cannot lock other clients out. A connection idle for its site's ``timeOut``
    is closed, by one timer for the whole table (:class:`IdleSweep`). A connection that is not
    read is checked for its client's close every :data:`HANGUP_CHECK` seconds, by one timer for
    the whole table too, armed only while there is such a connection (:meth:`not_read`)."""

    _log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.open = 0
        self.reclaimed = 0  # idle connections closed to make room
        self._by_address: Counter[str] = Counter()
        self._idle: dict[GuardedChannel, None] = {}  # in the order they became idle
        self._idle_by_address: dict[str, dict[GuardedChannel, None]] = {}
        self._sweep = IdleSweep(clock, self._close_timed_out)
        self._not_read: dict[GuardedChannel, None] = {}
        self._hangup_check: IDelayedCall | None = None

    def opened(
        self, channel: GuardedChannel, address: str | None, limits: Limits
    ) -> tuple[int, str] | None:
        """Count a new connection from ``address``; None if it may stay (it is listed as idle:
        it has sent nothing yet), else the cap it is over that no idle connection could be
        closed for: (the cap, "" or " from one address")."""
        self.open += 1
        per_address = limits.max_connections_per_address
        if address is not None:
            self._by_address[address] += 1
            if per_address and self._by_address[address] > per_address:
                if not self._reclaim(self._idle_by_address.get(address)):
                    return per_address, " from one address"
        if limits.max_connections and self.open > limits.max_connections:
            if not self._reclaim(self._idle):
                return limits.max_connections, ""
        self.idle(channel, address)
        return None

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def from_address(self, address: str) -> int:
        return self._by_address[address]

    def closed(self, channel: GuardedChannel, address: str | None) -> None:
        self.busy(channel, address)
        self.open -= 1
        if not self.open:
            self._sweep.stop()
        if address is not None:
            left = self._by_address[address] - 1
            if left:
                self._by_address[address] = left
            else:
                del self._by_address[address]

    def idle(self, channel: GuardedChannel, address: str | None) -> None:
        channel.idle_since = self._clock.seconds()
        self._idle[channel] = None
        if address is not None:
            self._idle_by_address.setdefault(address, {})[channel] = None
        if channel.timeOut:
            self._sweep.watch(channel.timeOut)

    def _close_timed_out(self, now: float) -> float | None:
        """Close the connections idle for their site's ``timeOut`` by ``now``, oldest first;
        when the next is due. (The sweep is left to fire when the last idle connection gets a
        request: it then finds none.)"""
        idle = self._idle
        while idle:
            oldest = next(iter(idle))
            if not oldest.timeOut:
                return None
            due = oldest.idle_since + oldest.timeOut
            if due > now:
                return due
            oldest.time_out()  # which takes it out of this table
        return None

    def close_idle(self) -> int:
        """Close every idle connection (the site has stopped serving: a client would only
        get a refusal on it), as nginx does on a graceful stop; how many there were."""
        idle = list(self._idle)
        for channel in idle:
            channel.stop_idle()  # which takes it out of this table
        return len(idle)

    def busy(self, channel: GuardedChannel, address: str | None) -> None:
        self._idle.pop(channel, None)
        if address is not None:
            idle = self._idle_by_address.get(address)
            if idle is not None:
                idle.pop(channel, None)
                if not idle:
                    del self._idle_by_address[address]

    def not_read(self, channel: GuardedChannel) -> None:
        """``channel`` stopped reading its client: check it for the client's close
        (:meth:`GuardedChannel.check_client`) every HANGUP_CHECK seconds until it reads again
        (:meth:`read_again`). Nothing else sees such a client go, and the backend would go on
        with a request that nobody waits for."""
        self._not_read[channel] = None
        if self._hangup_check is None:
            self._hangup_check = self._clock.callLater(HANGUP_CHECK, self._check_not_read)

    def read_again(self, channel: GuardedChannel) -> None:
        self._not_read.pop(channel, None)
        if not self._not_read and self._hangup_check is not None:
            if self._hangup_check.active():
                self._hangup_check.cancel()
            self._hangup_check = None

    def _check_not_read(self) -> None:
        self._hangup_check = None
        for channel in list(self._not_read):
            try:
                channel.check_client()  # which may have it read again
            except Exception:  # one connection's error does not stop the checks
                self._log.failure("checking {channel!r} for its client's close", channel=channel)
        if self._not_read and self._hangup_check is None:
            self._hangup_check = self._clock.callLater(HANGUP_CHECK, self._check_not_read)

    def _reclaim(self, idle: dict[GuardedChannel, None] | None) -> bool:
        """Close the oldest of ``idle`` if it has been idle for RECLAIM_AFTER; False if none
        has."""
        if not idle:
            return False
        oldest = next(iter(idle))
        if self._clock.seconds() - oldest.idle_since < RECLAIM_AFTER:
            return False
        self.reclaimed += 1
        oldest.reclaim()  # which takes it out of this table
        return True


class EarlyVerdict(Interface):
    """What may refuse a request before its body is read (the worker's signature check, set
    as its site's ``early_verdict``). A request refused early goes to the resource at once,
    without its body (the verdict keeps the refusal for the resource to answer); no ``100
    Continue`` is sent, the rest of the body is read and dropped for a moment while the answer
    goes out, and the connection is closed."""

    def refuses_head(self, request: Request, method: bytes, target: bytes) -> bool:
        """Whether the request is refused whatever its body, from its head alone (its
        headers are set; its method and target come with it)."""

    def refuses_body_start(
        self, request: Request, method: bytes, target: bytes, start: bytes
    ) -> bool | None:
        """Whether the request is refused from the first bytes of its body; None: cannot
        tell yet, ask again with more."""


# While an early verdict waits for a body's first bytes: how many it is first asked with,
# and how many it is asked with at most (each time it is asked again, twice as many).
EARLY_FIRST = 512
EARLY_LIMIT = 1 << 16


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp (a refusal is queued, the last request was
    parsed, or a second request begins in input parsed whole)."""


# GuardedChannel._cut: llhttp is not stopped where a request begins behind another (input
# parsed a piece at a time), is (input parsed whole), was (see GuardedChannel._parse_again).
_NO_CUT, _CUT_ARMED, _CUT = range(3)


@implementer(IPushProducer)
class GuardedChannel(Protocol):
    """One client connection: strict HTTP/1.1 parsing (llhttp), :class:`Limits` (from its
    site), and the transport side of each twisted.web ``Request`` on it."""

    site: VespaSite
    requestFactory: Callable[[GuardedChannel], Request]
    timeOut: float | None = None  # idle timeout, set by the site (HTTPFactory.buildProtocol)
    callLater: Callable[..., IDelayedCall]  # the site's reactor, set by HTTPFactory.buildProtocol
    _log = Logger()

    # A connection's state is in slots: CPython 3.11 reads and writes a slot by a
    # specialised instruction, where a class default read through an object is not, and an
    # object with 30 attributes or more in its dictionary loses its fast method calls.
    __slots__ = (
        "_address",
        "_answered_early",
        "_answering",
        "_applying",
        "_body_ask",
        "_body_size",
        "_body_start",
        "_command",
        "_completed",
        "_counted",
        "_counted_from",
        "_cut",
        "_drop_input",
        "_events",
        "_fields",
        "_framing_run",
        "_head_size",
        "_head_timer",
        "_held_size",
        "_host",
        "_in_body",
        "_in_head",
        "_last",
        "_limits",
        "_line_done",
        "_linger",
        "_listed_idle",
        "_parse_stopped",
        "_parser",
        "_partial_line",
        "_path",
        "_peer",
        "_persistent",
        "_producer",
        "_rate_timer",
        "_reading_paused",
        "_refused",
        "_request",
        "_secure",
        "_transport",
        "_url",
        "_version",
        "_waiting_for_transport",
        "_window_bytes",
        "idle_since",
    )
    _limits: Limits
    _parser: HttpRequestParser  # from connectionMade
    _fields: list[tuple[bytes, bytes]]  # the head's header fields, from on_message_begin
    _peer: Any
    _host: Any

    def __init__(self) -> None:
        self._events: deque[tuple[Any, ...]] = deque()  # parsed, not handed out yet
        self._transport: Any = None  # TCP or TLS, from connectionMade
        # What the parser is in (parser callbacks):
        self._in_head = False  # a request has begun and its head is not complete
        self._in_body = False  # its head is complete and its body is not
        self._url = b""
        self._line_done = False  # the open head's request line is complete
        self._head_size = 0  # bytes of the open head known so far (0: none arriving)
        # input held (not parsed) until a line end comes:
        self._partial_line: bytearray | None = None
        self._body_size = 0
        # chunk framing (size lines, extensions, trailers) since the last data:
        self._framing_run = 0
        self._last = False  # the request parsed last asks to close the connection
        self._completed = 0  # requests parsed to their end
        self._cut = _CUT_ARMED  # see on_message_begin
        # the first request (by _completed) whose dropped headers are not counted yet:
        self._counted_from = 0
        # nothing more is parsed: a refusal is queued, or the last request was:
        self._parse_stopped = False
        # What twisted.web has of it (_apply):
        self._request: Request | None = None  # from a head handed out until it is answered
        self._command = b""
        self._path = b""
        self._version = b""
        self._persistent = True
        self._window_bytes = 0
        self._answering = False  # the request has gone to the resource and is not finished
        self._applying = False
        self._held_size = 0  # bytes received while a request is answered
        self._reading_paused = False
        self._waiting_for_transport = False
        self._producer: IPushProducer | None = None  # the answer's, registered by its Request
        self._drop_input = False
        self._refused = False
        # refused by the site's early verdict: close lingering when done:
        self._answered_early = False
        self._body_start: bytearray | None = None  # a body's first bytes, for the early verdict
        self._body_ask = 0  # the size of _body_start at which the early verdict is asked next
        self._counted = False
        self._listed_idle = False  # in the site's ConnectionTable as idle
        self.idle_since = 0.0  # when it was listed as idle (the site's clock)
        # the client's IP address, when there is a per-address cap:
        self._address: str | None = None
        self._secure = False
        self._head_timer: IDelayedCall | None = None
        self._rate_timer: IDelayedCall | None = None
        self._linger: IDelayedCall | None = None

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
        limits = self._limits = self.site.limits
        if limits.max_connections_per_address:
            # Counted by address only for that cap (0 turns it off: clients behind one NAT).
            self._address = getattr(self._peer, "host", None)
        over = self.site.connections.opened(self, self._address, limits)
        if over is not None:
            cap, which = over
            self.refuse(
                503,
                "too many connections",
                f"this worker accepts at most {cap} open connections{which}; retry shortly",
                [(b"retry-after", b"1")],
            )
            return
        self._listed_idle = True
        self._parser = HttpRequestParser(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted:
            self._counted = self._listed_idle = False
            self.site.connections.closed(self, self._address)
        for timer in (self._head_timer, self._rate_timer, self._linger):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._rate_timer = self._linger = None
        self._drop_input = True
        self._events.clear()
        if self._reading_paused:
            self._reading_paused = False
            self.site.connections.read_again(self)
        try:
            del self._parser  # it holds this channel's methods: leave no cycle behind
        except AttributeError:
            pass  # (a connection refused at once never had one)
        request, self._request = self._request, None
        if request is not None:
            request.connectionLost(reason)

    def time_out(self) -> None:
        """Closed, idle for the site's ``timeOut`` (see :class:`ConnectionTable`)."""
        self._listed_idle = False
        self.site.connections.busy(self, self._address)
        self._close_idle("Timing out client: {peer}")

    def stop_idle(self) -> None:
        """Closed, idle, as its site stops serving (see :meth:`ConnectionTable.close_idle`,
        which says how many in one line)."""
        self._listed_idle = False
        self.site.connections.busy(self, self._address)
        self._close_idle(None)

    def reclaim(self) -> None:
        """Closed, idle, to make room for a new connection (see :class:`ConnectionTable`)."""
        self._counted = self._listed_idle = False
        self.site.connections.closed(self, self._address)
        self._close_idle("Closing idle client {peer} to make room")

    def _close_idle(self, message: str | None) -> None:
        """Close an idle connection (out of its table already; no input deadline is armed
        on one), logging ``message`` if any; it is aborted if it does not close within
        ABORT_TIMEOUT."""
        self._drop_input = True
        if message is not None:
            self._log.info(message, peer=str(self._peer))
        self._linger = self.callLater(ABORT_TIMEOUT, self._transport.abortConnection)
        self.loseConnection()

    def _is_idle(self) -> bool:
        """No request arriving, queued or being answered, and more may come."""
        return not (
            self._request is not None
            or self._in_head
            or self._in_body
            or self._events
            or self._partial_line is not None
            or self._drop_input
            or self._parse_stopped
        )

    def _set_busy(self) -> None:
        if self._listed_idle:
            self._listed_idle = False
            self.site.connections.busy(self, self._address)

    def _set_idle_if_idle(self) -> None:
        if not self._listed_idle and self._counted and self._is_idle():
            self._listed_idle = True
            self.site.connections.idle(self, self._address)

    # Refusing

    def refuse(
        self,
        code: int,
        error: str,
        detail: str,
        headers: ExtraHeaders = (),
    ) -> None:
        """Answer with a JSON error and close; everything the client sends after is ignored."""
        if self._refused:
            return
        self._refused = self._drop_input = True
        self._set_busy()
        self._events.clear()
        self._partial_line = None
        self.site.refusals[error] += 1
        self._log.info(
            "refused {peer}: {code} {error}",
            peer=getattr(self._peer, "host", "?"),
            code=code,
            error=error,
        )
        for timer in (self._head_timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._rate_timer = None
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
        self._close_lingering()

    def _close_lingering(self) -> None:
        transport = self._transport
        transport.unregisterProducer()
        # Half-close and keep reading (and dropping) for a moment: closing with unread input
        # would send a reset that can destroy the answer before the client reads it. Over
        # TLS the half-close is close_notify, sent after the answer (once the handshake is
        # over, if it is not yet): the TLS layer reads on until the client's. (A TLS
        # transport hands loseWriteConnection on to its TCP connection, which would end
        # the TCP stream under the TLS one, the handshake or the answer perhaps unsent.)
        if self._secure:
            transport.loseConnection()
        elif (close_write := getattr(transport, "loseWriteConnection", None)) is not None:
            close_write()
        else:
            transport.loseConnection()
            return
        transport.resumeProducing()
        self._linger = self.callLater(LINGER, transport.abortConnection)

    def _answer_early(self) -> None:
        """The early verdict refused the request: hand it to the resource now, its body (the
        rest of it) unread; see :class:`EarlyVerdict`."""
        self._body_start = None
        self._persistent = False
        self._answered_early = True
        if self._version == b"HTTP/1.1":
            request = cast(Request, self._request)
            self.site.header_ops.put(request.responseHeaders, b"Connection", [b"close"])
        self._events.clear()
        self._parse_stopped = True
        if self._reading_paused and not self._waiting_for_transport:
            self._read_again()  # read (and drop) while the answer goes out
        self._all_content_received()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # What twisted.web's Request calls on input it cannot use.
        self.refuse(400, _BAD, "malformed HTTP request")

    def _refuse_in_turn(
        self,
        code: int,
        error: str,
        detail: str,
        headers: ExtraHeaders = (),
    ) -> None:
        """Queue a refusal behind what was parsed before it, and parse nothing more."""
        self._events.append((_REFUSE, code, error, detail, headers))
        self._parse_stopped = True
        self._partial_line = None

    def _stop(
        self,
        code: int,
        error: str,
        detail: str,
        headers: ExtraHeaders = (),
    ) -> NoReturn:
        """In a parser callback: refuse in turn, and stop llhttp where it is."""
        self._refuse_in_turn(code, error, detail, headers)
        raise _Stop()

    # Input

    def dataReceived(self, data: bytes) -> None:
        if self._listed_idle:
            self._set_busy()
        self._received(data)
        if self._request is None:  # (a request being answered is not idle: nearly every read)
            self._set_idle_if_idle()

    def _received(self, data: bytes) -> None:
        if self._drop_input or self._parse_stopped:
            return
        if self._answering or self._in_head or self._in_body:
            self._received_within(data)
            return
        # At a request's start (nearly every read: one whole request): parsed whole, unless a
        # second request begins in it (see on_message_begin).
        self._parse(data, len(data))
        self._apply()
        if not self._answering:
            self._arm_input_timers()
        elif self._events:
            self._hold(len(data))  # requests behind the one now answered came in this read

    def _received_within(self, data: bytes) -> None:
        """Input within a request, or behind one being answered: parsed a piece at a time
        (see :meth:`_piece_end`); behind a request answered, up to the next head's end, and
        behind what is parsed and not handed out yet, not at all (kept as it came)."""
        answering = self._answering
        events = self._events
        if answering:
            self._hold(len(data))
            if events:  # what was parsed (or kept) before waits: this waits behind it
                last = events[-1]
                if last[0] == _RAW:
                    last[1].extend(data)
                else:
                    events.append((_RAW, bytearray(data)))
                return
        elif self._request is not None:
            self._window_bytes += len(data)
        chunk: bytes | bytearray = data
        if self._in_head and (self._partial_line is not None or b"\n" not in data):
            # A head is open: give llhttp whole lines (its callbacks would otherwise gather a
            # header sent in many pieces by copying it again for each piece).
            if b"\n" not in data:
                self._keep_partial_line(data)
                return
            chunk, self._partial_line = cast(bytearray, self._partial_line) + data, None
        held = len(chunk) - len(data)  # a line kept for its end, counted already
        end = self._piece_end(chunk)
        rest = bytearray(memoryview(chunk)[end:]) if end < len(chunk) else None
        self._cut = _NO_CUT
        self._parse(chunk[:end] if rest is not None else chunk, end - held)
        self._cut = _CUT_ARMED
        if rest is not None and not self._parse_stopped:
            events.append((_RAW, rest))
        self._apply()
        if self._answering:
            if events and not answering:
                self._hold(len(data))  # requests behind the one now answered came in this read
        else:
            self._arm_input_timers()

    def _piece_end(self, data: bytes | bytearray) -> int:
        """Where the piece of pipelined input at the start of ``data`` ends: after the next
        head's end (a line, then an empty line), or at the end of ``data``. The body being
        parsed is not searched when its length is known (a body holds anything, heads' ends
        too: searching it would cut it into as many pieces as a client likes, each a call into
        llhttp), nor the first CHUNKED_PIECE bytes of a chunked one. A piece then completes at
        most a body and the head after it (at worst, the requests in a chunked body's last
        CHUNKED_PIECE bytes)."""
        start = 0
        if self._in_body:  # (its head is handed out: nothing parsed waits when input is)
            request = self._request
            length = None if request is None else request.requestHeaders.getRawHeaders(_LENGTH)
            start = int(length[0]) - self._body_size if length else CHUNKED_PIECE
        while True:
            end = data.find(b"\r\n\r\n", start)
            if end == -1:
                return len(data)
            if end and data[end - 1] not in b"\r\n":
                return end + 4
            # An empty line after an empty line (between requests): no head's end.
            found = _NOT_LINE_END.search(data, end)
            if found is None:
                return len(data)
            start = found.start()

    def _parse_piece(self, data: bytearray) -> None:
        """Parse the piece at the start of input kept as it came (see :meth:`_piece_end`);
        the rest is kept, queued behind what the piece holds."""
        end = self._piece_end(data)
        rest = None
        if end < len(data):
            rest = data
            data = data[:end]
            del rest[:end]  # (from the front of a bytearray: the rest is not copied)
        self._cut = _NO_CUT
        self._parse(data, end)
        self._cut = _CUT_ARMED
        if rest is not None and not self._parse_stopped:
            self._events.append((_RAW, rest))

    def _hold(self, size: int) -> None:
        """Count input that waits for an answer; past ``PIPELINE_BUFFER``, stop reading."""
        self._held_size += size
        if self._held_size > PIPELINE_BUFFER:
            self._pause_reading()

    def _keep_partial_line(self, data: bytes) -> None:
        """Hold input without a line end while a head is open (it cannot complete it)."""
        if self._partial_line is None:
            self._partial_line = bytearray(data)
        else:
            self._partial_line += data
        self._head_size += len(data)
        self._check_open_head()
        self._apply()
        self._arm_input_timers()

    def _parse(self, data: bytes | bytearray | memoryview, received: int) -> None:
        """Feed llhttp; what it finds is queued (see the parser callbacks below). ``received``
        is how much of ``data`` came in this read (the rest was held for a line end)."""
        began_idle = not self._in_head and not self._in_body
        in_body = self._in_body
        completed = self._completed
        body_size = self._body_size
        while True:
            try:
                self._parser.feed_data(data)
            except HttpParserUpgrade as upgrade:
                # llhttp stops after an upgrade request, and would skip what follows it. Only
                # a request without a body gets here: what follows is the next request.
                if self._parse_stopped:
                    return
                self._parser = HttpRequestParser(self)
                data = memoryview(data)[upgrade.args[0] :]
                if data:
                    if self._cut == _CUT_ARMED:  # parsed whole: the rest waits as it came
                        self._events.append((_RAW, bytearray(data)))
                        return
                    continue
            except HttpParserError as error:
                if self._parse_stopped:  # a callback stopped it
                    return
                if isinstance(error, HttpParserCallbackError):
                    if self._cut == _CUT:  # (on_message_begin stopped it)
                        self._cut = _CUT_ARMED
                        self._parse_again(data, completed)
                        return
                    raise  # a callback failed: a bug here, not the client's
                sniff = data if began_idle and completed == self._completed else None
                self._refuse_in_turn(*_parse_refusal(error, sniff))
                return
            break
        if self._parse_stopped:
            return
        if self._in_head:
            if completed == self._completed:
                # No request ended in this input: all of it went into the open head.
                self._head_size += received
                if not self._line_done:
                    rest = data if began_idle else b"\n"
                    self._line_done = b"\n" in bytes(rest).lstrip(b"\r\n")
            else:
                # It began behind another request in this input: count what llhttp reported.
                # (Its request line is complete if a line end follows its target.)
                url = self._url
                end = bytes(data).rfind(url) + len(url) if url else len(data)
                self._line_done = bool(self._fields) or b"\n" in data[end:]
                self._head_size = 16 + len(self._url) + _fields_size(self._fields)
            self._check_open_head()
        elif in_body and self._in_body and completed == self._completed:
            if self._body_size == body_size:
                self._framing_run += received
                if self._framing_run > self._limits.max_header_size:
                    self._refuse_in_turn(
                        400,
                        _BAD,
                        "malformed chunked body: chunk extensions and trailers are limited to "
                        f"{self._limits.max_header_size} bytes",
                    )
            else:
                self._framing_run = 0

    def _parse_again(self, data: bytes | bytearray | memoryview, completed: int) -> None:
        """A request began behind another in ``data``, parsed whole from a request's start:
        forget what llhttp found in it (all that was queued: input is parsed whole only with
        nothing queued) and keep it all, as it came, to be parsed again a piece at a time by a
        new parser (which starts where ``data`` did, between requests). The dropped headers of
        the first request were counted already (see on_headers_complete)."""
        self._events.clear()
        self._counted_from = completed + 1
        self._completed = completed
        self._in_head = self._in_body = False
        self._parser = HttpRequestParser(self)
        self._events.append((_RAW, bytearray(data)))

    def _check_open_head(self) -> None:
        limits = self._limits
        if self._head_size > limits.max_header_size:
            self._refuse_in_turn(*self._head_too_large(not self._line_done))
        elif len(self._fields) > limits.max_headers:
            self._refuse_in_turn(*self._too_many_headers())

    def _head_too_large(self, line_too_long: bool) -> tuple[int, str, str]:
        detail = f"request line and headers are limited to {self._limits.max_header_size} bytes"
        if line_too_long:
            return 414, "request line too long", detail
        return 431, "request headers too large", detail

    def _too_many_headers(self) -> tuple[int, str, str]:
        return 431, "too many headers", f"at most {self._limits.max_headers} headers are accepted"

    def _too_large(self) -> tuple[int, str, str]:
        return (
            413,
            "request body too large",
            f"request bodies are limited to {self._limits.max_body_size} bytes",
        )

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.refuse(
            408,
            "request timeout",
            f"request headers not complete within {self._limits.head_timeout:g} s",
        )

    def _check_body_rate(self) -> None:
        self._rate_timer = None
        needed = self._limits.min_body_rate * BODY_RATE_WINDOW
        if self._window_bytes < needed:
            self.refuse(
                408,
                "request timeout",
                f"request body arrived slower than {self._limits.min_body_rate:g} bytes/s",
            )
            return
        self._window_bytes = 0
        self._rate_timer = self.callLater(BODY_RATE_WINDOW, self._check_body_rate)

    def _arm_input_timers(self) -> None:
        """Input stopped mid-head or mid-body: start its deadline (never armed for a request
        whose head and body come in one read, which is nearly all of them)."""
        if self._drop_input or self._answering:
            return
        if self._request is None:
            if self._head_size and self._head_timer is None:
                self._head_timer = self.callLater(self._limits.head_timeout, self._head_too_slow)
        elif self._rate_timer is None and self._limits.min_body_rate:
            self._window_bytes = 0
            self._rate_timer = self.callLater(BODY_RATE_WINDOW, self._check_body_rate)

    # llhttp's callbacks (httptools.HttpRequestParser): they only check and queue, so that no
    # resource code runs inside the parser.

    def on_message_begin(self) -> None:
        if self._parse_stopped:
            raise _Stop()  # nothing after a last request is parsed
        if self._events and self._cut == _CUT_ARMED:
            # A request begins behind another in input parsed whole (nothing was queued
            # before it): llhttp cannot be stopped after a request and resumed, so the input
            # is parsed again a piece at a time (see _parse_again).
            self._cut = _CUT
            raise _Stop()
        self._in_head = True
        self._url = b""
        self._fields = []
        self._line_done = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))  # trailers too, after the head: ignored

    def on_headers_complete(self) -> None:
        """A head is complete: check it as a whole, and queue it for twisted.web."""
        self._in_head = False
        self._in_body = True
        self._body_size = self._framing_run = 0
        parser = self._parser
        limits = self._limits
        method = parser.get_method()
        target = self._url
        fields = self._fields
        http_version = parser.get_http_version()
        version = _VERSIONS.get(http_version)
        if version is None:
            if http_version == "0.9":
                self._stop(400, _BAD, "malformed request line: no HTTP version")
            self._stop(505, "HTTP version not supported", "use HTTP/1.1")
        if method in REFUSED_METHODS:
            self._stop(*_method_not_allowed(method))
        if target[:1] == b"*":
            # Asterisk-form (OPTIONS *) asks about this server: Vespa has nothing to say about
            # the backend's, and twisted.web would answer it 200 itself.
            self._stop(400, _BAD, "malformed request target: expected a path, not *")
        size = len(method) + len(target) + 14  # two spaces, the version, three line ends
        kept: list[tuple[bytes, bytes]] = []
        length: int | None = 0
        chunked = connection = expect = cookies = upgrade = False
        hosts = underscored = 0
        for name, value in fields:
            size += len(name) + len(value) + 4
            # (find, not ``in``: a bytes ``in`` tries its operand as an int first, and raises
            # and clears a TypeError inside CPython, for every header)
            if name.find(b"_") != -1:
                # Dropped, as nginx does: WSGI/ASGI backends read X_Forwarded_For as the
                # X-Forwarded-For the worker writes.
                underscored += 1
                continue
            value = value.rstrip(b" \t")  # llhttp drops the whitespace before a value only
            lower = name.lower()
            if lower in _FRAMING:
                if lower == b"host":
                    hosts += 1
                elif lower == b"content-length":
                    length = int(value)  # digits: llhttp checked it
                elif lower == b"transfer-encoding":
                    if value.lower() != b"chunked":  # no coding of ours to undo (RFC 9112 6.3)
                        self._stop(400, _BAD, "only one Transfer-Encoding: chunked is accepted")
                    chunked, length = True, None
                elif lower == b"connection":
                    connection = True
                elif lower == b"expect":
                    expect = expect or value.lower() == b"100-continue"
                elif lower == b"upgrade":
                    upgrade = True
                else:
                    cookies = True
            kept.append((name, value))
        size = max(size, self._head_size)
        self._head_size = 0
        if underscored and self._completed >= self._counted_from:  # (not parsed again)
            self.site.dropped_headers += underscored
            self._log.debug(
                "dropped {count} header(s) with _ in the name from {peer}",
                count=underscored,
                peer=getattr(self._peer, "host", "?"),
            )
        if size > limits.max_header_size:
            self._stop(
                *self._head_too_large(len(method) + len(target) + 12 > limits.max_header_size)
            )
        if len(fields) > limits.max_headers:
            self._stop(*self._too_many_headers())
        if hosts > 1 or (not hosts and version == b"HTTP/1.1"):
            self._stop(400, _BAD, "an HTTP/1.1 request needs exactly one Host header")
        if upgrade and (chunked or length) and parser.should_upgrade():
            # llhttp would skip the body: never let it be parsed as a request.
            self._stop(
                400, _BAD, "this server does not upgrade: an Upgrade request may not have a body"
            )
        if length is not None and length > limits.max_body_size:
            self._stop(*self._too_large())
        persistent = version == b"HTTP/1.1" and not (connection and not parser.should_keep_alive())
        self._last = not persistent
        expect = expect and version == b"HTTP/1.1"
        headers = self.site.header_ops.from_fields(kept)
        self._events.append(
            (_HEAD, method, target, version, headers, length, persistent, expect, cookies)
        )

    def on_body(self, body: bytes) -> None:
        size = self._body_size = self._body_size + len(body)
        if size > self._limits.max_body_size:  # a chunked body (llhttp holds others to CL)
            self._stop(*self._too_large())
        self._events.append((_BODY, body))

    def on_message_complete(self) -> None:
        self._in_body = False
        self._completed += 1
        self._events.append(_END_EVENT)
        if self._last:
            self._parse_stopped = True

    # Handing requests to twisted.web

    def _apply(self) -> None:
        """Hand what was parsed to twisted.web, in order, up to the next request to answer."""
        if self._applying:
            return  # (a request answered at once, from inside this loop)
        self._applying = True
        events = self._events
        try:
            while True:
                while events and not self._answering and not self._drop_input:
                    event = events.popleft()
                    kind = event[0]
                    if kind == _BODY:
                        if self._body_start is not None and self._watch_body_start(event[1]):
                            break
                        request = self._request
                        assert request is not None  # (a body follows its head)
                        request.handleContentChunk(event[1])
                    elif kind == _HEAD:
                        self._start_request(*event[1:])
                    elif kind == _END:
                        self._body_start = None
                        self._all_content_received()
                    elif kind == _REFUSE:
                        self.refuse(*event[1:])
                    else:  # input kept as it came (the last event): its turn to be parsed
                        self._parse_piece(event[1])
                if not events or self._drop_input or events[0][0] != _RAW:
                    break
                # A request is answered and only kept input waits: parse up to the next
                # head's end (which then waits, parsed).
                self._parse_piece(events.popleft()[1])
        finally:
            self._applying = False
        if events and self._parse_stopped:
            self._pause_reading()  # a refusal or a last request waits its turn: read no more
        elif not events and self._held_size and not self._drop_input:
            # Everything received during the answers is handed out: read again.
            self._held_size = 0
            if self._reading_paused and not self._waiting_for_transport:
                self._read_again()

    def _start_request(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        length: int | None,
        persistent: bool,
        expect: bool,
        cookies: bool,
    ) -> None:
        """A head: create its twisted.web Request (the body, if any, follows; ``length`` is
        None for a chunked one)."""
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None
        request = self.requestFactory(self)
        request.requestHeaders = headers
        self._request = request
        self._command, self._path, self._version = method, target, version
        self._persistent = persistent
        if version == b"HTTP/1.1" and not persistent:
            self.site.header_ops.put(request.responseHeaders, b"Connection", [b"close"])
        if cookies:
            request.parseCookies()
        request.gotLength(length)
        verdict = self.site.early_verdict
        if verdict is not None:
            if verdict.refuses_head(request, method, target):
                self._answer_early()
                return
            if length != 0:
                self._body_start, self._body_ask = bytearray(), EARLY_FIRST
        if expect:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _watch_body_start(self, data: bytes) -> bool:
        """Keep a body's first bytes for the early verdict, and ask it at each doubling of
        them (asking costs a parse of what is kept): True when it refused the request."""
        start = cast(bytearray, self._body_start)
        start += data[: EARLY_LIMIT - len(start)]
        if len(start) < self._body_ask and len(start) < EARLY_LIMIT:
            return False
        self._body_ask = 2 * len(start)
        request = cast(Request, self._request)
        verdict = cast(EarlyVerdict, self.site.early_verdict)
        refused = verdict.refuses_body_start(request, self._command, self._path, bytes(start))
        if refused is None and len(start) < EARLY_LIMIT:
            return False
        if refused:
            self._answer_early()
            return True
        self._body_start = None
        return False

    def _all_content_received(self) -> None:
        """The request is complete: hand it to the resource (twisted.web's requestReceived)."""
        if self._rate_timer is not None:
            if self._rate_timer.active():
                self._rate_timer.cancel()
            self._rate_timer = None
        self._answering = True
        if not self._persistent:
            self._drop_input = True  # nothing after a last request is read
        request = self._request
        assert request is not None  # (an end follows its head)
        request.requestReceived(self._command, self._path, self._version)

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._transport.pauseProducing()
            self.site.connections.not_read(self)

    def _read_again(self) -> None:
        self._reading_paused = False
        self.site.connections.read_again(self)
        self._transport.resumeProducing()

    def check_client(self) -> None:
        """Not read (see :meth:`ConnectionTable.not_read`): if its client has closed, read
        it again, dropping the input, so that the close is met as on a connection being read
        (the request in progress is told its connection was lost)."""
        if not self._reading_paused:
            self.site.connections.read_again(self)  # (reading again already)
        elif _client_closed(self._transport):
            self._drop_input = True
            self._events.clear()
            self._partial_line = None
            self._read_again()

    # What twisted.web's Request calls

    def requestDone(self, request: Request) -> None:
        """The answer is complete: close, or go on with what the client sent meanwhile."""
        if request is not self._request:
            raise TypeError(f"{request!r} is not this connection's current request")
        self._request = None
        self._answering = False
        if self._answered_early:
            self._close_lingering()
            return
        if not self._persistent:
            self.loseConnection()
            return
        if self._applying:
            return  # answered at once: the loop handing out requests goes on
        if self._events or self._held_size:  # (nearly always neither: nothing came meanwhile)
            self._apply()
        self._arm_input_timers()
        self._set_idle_if_idle()

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
        """The answer's producer: paused and resumed with this connection's send buffer (a
        pull producer is asked for data by a cooperative task, see :class:`PullDriver`)."""
        if self._producer is not None:
            raise RuntimeError(f"{self._producer!r} is still registered")
        if streaming:
            self._producer = cast(IPushProducer, producer)
        else:
            self._producer = PullDriver(cast(IPullProducer, producer), self)

    def unregisterProducer(self) -> None:
        producer, self._producer = self._producer, None
        if isinstance(producer, PullDriver):
            producer.stop()

    # IPushProducer, for the transport: its send buffer is full, or has room again

    def pauseProducing(self) -> None:
        self._waiting_for_transport = True
        if self._producer is not None:
            self._producer.pauseProducing()
        if not self._answering:
            # A client that does not read its answers does not get to send more requests.
            self._pause_reading()

    def resumeProducing(self) -> None:
        self._waiting_for_transport = False
        if self._producer is not None:
            self._producer.resumeProducing()
        if self._reading_paused and (
            not self._answering
            # Answering, reading stays paused only for held input past the buffer, or a
            # refusal or last request: held input handed out while the client was not
            # reading (this pause) left nothing else to resume it.
            or (self._held_size <= PIPELINE_BUFFER and not self._parse_stopped)
        ):
            self._read_again()

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()


@implementer(IPushProducer)
class PullDriver:
    """A pull producer registered with a channel, driven as a push producer: a cooperative
    task on the site's reactor asks it for data, paused and resumed with the connection's send
    buffer, until it is unregistered (what Twisted's own channel does with a private helper)."""

    _log = Logger()
    _paused = False
    _stopped = False

    def __init__(self, producer: IPullProducer, channel: GuardedChannel) -> None:
        self._producer = producer
        self._channel = channel
        cooperator = Cooperator(scheduler=lambda work: channel.callLater(0, work))
        self._task = cooperator.cooperate(self._pull())

    def _pull(self) -> Iterator[None]:
        while True:
            try:
                self._producer.resumeProducing()
            except Exception:
                self._log.failure("producer {producer} failed", producer=self._producer)
                self._channel.unregisterProducer()  # which stops this task
            yield None

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._task.stop()

    def pauseProducing(self) -> None:
        if not self._paused and not self._stopped:
            self._paused = True
            self._task.pause()

    def resumeProducing(self) -> None:
        if self._paused and not self._stopped:
            self._paused = False
            self._task.resume()

    def stopProducing(self) -> None:
        self.stop()
        self._producer.stopProducing()


_LENGTH = b"content-length"
_FRAMING = frozenset(
    (
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"expect",
        b"upgrade",
        b"cookie",
    )
)


def _client_closed(transport: Any) -> bool:
    """Whether the client of a connection that is not read has closed (its FIN or a reset
    arrived), asked of the connection's socket without reading from it; False if there is no
    socket to ask. On Linux, the socket's TCP state says it even behind unread input; elsewhere,
    a peek tells only once no unread input is left before the close."""
    sock = _socket_of(transport)
    if sock is None or sock.fileno() == -1:
        return False
    if _TCP_INFO is not None:
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] in _CLIENT_CLOSED_STATES
        except OSError:
            pass  # not a TCP socket (a Unix one)
    try:
        return not sock.recv(1, socket.MSG_PEEK)  # (a Twisted socket does not block)
    except BlockingIOError:
        return False  # open, nothing to read
    except OSError:
        return True  # reset


def _socket_of(transport: Any) -> socket.socket | None:
    """The socket under a connection's transport: its handle (``ISystemHandle``), or that of
    the transport it wraps (TLS, a ``ProtocolWrapper``), public attributes both."""
    for _ in range(4):
        get_handle = getattr(transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if isinstance(handle, socket.socket):
            return handle
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def _fields_size(fields: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) + 4 for name, value in fields)


def _method_not_allowed(method: bytes) -> tuple[int, str, str, list[tuple[bytes, bytes]]]:
    return (
        405,
        "method not allowed",
        f"{method.decode('ascii')} is not relayed",
        [(b"allow", ALLOW)],
    )


def _parse_refusal(
    error: HttpParserError, sniff: bytes | bytearray | memoryview | None
) -> tuple[Any, ...]:
    """The answer to input llhttp refused. ``sniff`` is the input, when the refused request
    starts it: an unknown method is then named (405) if it is a token at all."""
    reason = str(error)
    if isinstance(error, HttpParserInvalidMethodError) or "Invalid method for HTTP" in reason:
        if sniff is not None:
            method, space, _ = bytes(sniff[:200]).lstrip(b"\r\n").partition(b" ")
            if space and TOKEN.fullmatch(method):
                return _method_not_allowed(method)
        return 400, _BAD, "malformed request line: an unknown or malformed method"
    for fragment, detail in _VERSION_ERRORS:
        if fragment in reason:
            return 505, "HTTP version not supported", detail
    for fragment, detail in _PARSE_ERRORS:
        if fragment in reason:
            return 400, _BAD, detail.format(reason=reason)
    return 400, _BAD, f"malformed request ({reason})"
