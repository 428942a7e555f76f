# -*- test-case-name: tests.test_framing,tests.test_limits -*-
"""
The worker's HTTP/1.1 edge: strict framing and resource limits, checked while a request head
and body arrive, before anything is handed to the resource (and so to the backend).

twisted.web already refuses (400 + close) Content-Length with Transfer-Encoding, two
Content-Length headers, a non-digit Content-Length, a Transfer-Encoding other than ``chunked``
or ``identity``, malformed chunk sizes and extensions, header names that are not tokens, NUL/CR/LF
in header values, malformed request lines and versions, and more than ``maxHeaders`` headers.
This module adds what it lacks: other control characters in header values, obs-fold, duplicate
or missing ``Host``, CONNECT/TRACE (405), 414/431/505 instead of a bare
400 or a silent close, a body size limit (413 before the body is read), an absolute deadline for
the request head (slowloris), a minimum body rate, and a cap on open client connections (503).
Every refusal is a JSON error followed by closing the connection: after a framing error nothing
that follows on the connection can be trusted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from vespa.relay import JSON, error_body
from vespa.settings import Settings

# Header values may carry visible characters, SP and HTAB only (RFC 9110 section 5.5); other
# control bytes are what smuggling differentials between parsers are made of.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_SUPPORTED = (b"HTTP/1.0", b"HTTP/1.1")
REFUSED_METHODS = (b"CONNECT", b"TRACE")
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# How often the body rate is checked, and how long a refused client may keep sending before
# its connection is cut (so that it can read the error instead of getting a reset).
BODY_RATE_WINDOW = 10.0
LINGER = 2.0
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


def limits_from(settings: Settings) -> Limits:
    """The client limits configured in ``settings``."""
    return Limits(
        settings.max_body_size,
        settings.max_header_size,
        settings.max_headers,
        settings.head_timeout,
        float(settings.min_body_rate),
        settings.max_connections,
    )


class GuardedChannel(HTTPChannel):
    """An HTTPChannel that enforces :class:`Limits` (from its site) and strict framing."""

    site: GuardedSite
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self._refused = False
        self._counted = False
        self._head_timer: IDelayedCall | None = None
        self._rate_timer: IDelayedCall | None = None
        self._linger: IDelayedCall | None = None
        self._body_bytes = 0
        self._window_bytes = 0
        self._secure = False

    @property
    def limits(self) -> Limits:
        return self.site.limits

    def connectionMade(self) -> None:
        self._secure = super().isSecure()
        self.maxHeaders = self.limits.max_headers
        self.totalHeadersSize = self.limits.max_header_size
        self.MAX_LENGTH = self.limits.max_header_size
        super().connectionMade()
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

    def isSecure(self) -> bool:
        """Worked out once per connection (an interface adaptation on every request before)."""
        return self._secure

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._counted:
            self._counted = False
            self.site.open_connections -= 1
        for timer in (self._head_timer, self._rate_timer, self._linger):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._rate_timer = self._linger = None
        super().connectionLost(reason)

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
        self._refused = True
        self.site.refusals[error] += 1
        peer = self.transport.getPeer() if self.transport is not None else None
        self._log.info(
            "refused {peer}: {code} {error}",
            peer=getattr(peer, "host", "?"),
            code=code,
            error=error,
        )
        for timer in (self._head_timer, self._rate_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._rate_timer = None
        self.setTimeout(None)
        body = error_body(error, detail)
        lines = [
            b"HTTP/1.1 %d %s" % (code, REASONS[code]),
            b"content-type: " + JSON,
            b"content-length: %d" % len(body),
            b"connection: close",
            *(name + b": " + value for name, value in headers),
        ]
        transport = cast(Any, self.transport)  # a TCP or TLS transport
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        cast(Any, self._networkProducer).unregisterProducer()
        # Half-close and keep reading (and dropping) for a moment: closing with unread input
        # would send a reset that can destroy the answer before the client reads it.
        close_write = getattr(transport, "loseWriteConnection", None)
        if close_write is None:
            transport.loseConnection()
            return
        close_write()
        self._networkProducer.resumeProducing()
        self._linger = self.callLater(LINGER, transport.abortConnection)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's own refusals (see the module docstring), as a JSON 400.
        self.refuse(400, "bad request", "malformed HTTP request framing")

    # The request head

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and self.line_mode and not self._handlingRequest:
            self._head_timer = self.callLater(self.limits.head_timeout, self._head_too_slow)
        super().dataReceived(data)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self.refuse(
            408,
            "request timeout",
            f"request headers not complete within {self.limits.head_timeout:g} s",
        )

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._at_request_line():
            self.refuse(414, "request line too long", self._size_detail())
        else:
            self.refuse(431, "request headers too large", self._size_detail())

    def _at_request_line(self) -> bool:
        return bool(getattr(self, "_HTTPChannel__first_line", 1))

    def _size_detail(self) -> str:
        return f"request line and headers are limited to {self.limits.max_header_size} bytes"

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if self._receivedHeaderSize + len(line) > self.limits.max_header_size:
            self.lineLengthExceeded(line)
            return
        if self._at_request_line():
            if line and not self._request_line_ok(line):
                return
        elif line[:1] in (b" ", b"\t"):
            self.refuse(400, "bad request", "obsolete line folding in headers is not accepted")
            return
        super().lineReceived(line)

    def _request_line_ok(self, line: bytes) -> bool:
        parts = line.split(b" ")
        if len(parts) != 3:
            return True  # twisted.web answers 400 for anything else
        method, _, version = parts
        if _VERSION.fullmatch(version) and version not in _SUPPORTED:
            self.refuse(505, "HTTP version not supported", "use HTTP/1.1")
            return False
        if method.upper() in REFUSED_METHODS:
            self.refuse(
                405,
                "method not allowed",
                f"{method.decode('ascii', 'replace')} is not relayed",
                [(b"allow", ALLOW)],
            )
            return False
        return True

    def headerReceived(self, line: bytes) -> bool:
        if self._refused:
            return False
        if self._receivedHeaderCount >= self.limits.max_headers:
            self.refuse(
                431, "too many headers", f"at most {self.limits.max_headers} headers are accepted"
            )
            return False
        _, _, value = line.partition(b":")
        if _BAD_VALUE.search(value.strip(b" \t")):
            self.refuse(400, "bad request", "control characters in a header value")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        if self._refused:
            return
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None
        request = self.requests[-1]
        hosts = request.requestHeaders.getRawHeaders(b"host", [])
        if len(hosts) > 1 or (not hosts and self._version == b"HTTP/1.1"):
            self.refuse(400, "bad request", "an HTTP/1.1 request needs exactly one Host header")
            return
        if self.length is not None and self.length > self.limits.max_body_size:
            self._body_too_large()
            return
        self._body_bytes = 0
        if self.length != 0 and self.limits.min_body_rate:
            self._window_bytes = 0
            self._rate_timer = self.callLater(BODY_RATE_WINDOW, self._check_body_rate)
        super().allHeadersReceived()

    # The request body

    def _body_too_large(self) -> None:
        self.refuse(
            413,
            "request body too large",
            f"request bodies are limited to {self.limits.max_body_size} bytes",
        )

    def body_received(self, size: int) -> bool:
        """Count ``size`` decoded body bytes; False (and a 413) once the body is too large."""
        if self._refused:
            return False
        self._body_bytes += size
        if self._body_bytes > self.limits.max_body_size:
            self._body_too_large()
            return False
        return True

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._handlingRequest:
            self._window_bytes += len(data)
        super().rawDataReceived(data)  # bad chunk framing: _respondToBadRequestAndDisconnect

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

    def allContentReceived(self) -> None:
        if self._refused:
            return  # a refused request never reaches the resource
        if self._rate_timer is not None and self._rate_timer.active():
            self._rate_timer.cancel()
        self._rate_timer = None
        super().allContentReceived()


class GuardedRequest(Request):
    """A Request that counts its body against the size limit and never shows a traceback."""

    channel: GuardedChannel

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel is not None and self.channel.body_received(len(data)):
            super().handleContentChunk(data)

    def processingFailed(self, reason: Failure) -> Failure:
        """An unexpected error while rendering: log it, answer a JSON 500 (no traceback)."""
        self._log.failure("internal error rendering {uri}", failure=reason, uri=self.path)
        if self.finished or self.channel is None:
            return reason
        if self.startedWriting:
            self.loseConnection()  # headers are out: a truncated answer is the honest one
            return reason
        body = error_body("internal error", "see the worker log")
        self.setResponseCode(500)
        self.responseHeaders.setRawHeaders(b"content-type", [JSON])
        self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()
        return reason


class GuardedSite(Site):
    """A Site whose connections are :class:`GuardedChannel`; counts connections and refusals."""

    protocol = GuardedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no h2 upgrade
    requestFactory = GuardedRequest

    def __init__(self, resource: Any, limits: Limits | None = None, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.limits = limits or Limits()
        self.open_connections = 0
        self.refusals: Counter[str] = Counter()

    def acceptableProtocols(self) -> list[bytes]:
        """Over TLS, offer HTTP/1.1 only (ALPN): the limits above are HTTP/1.1 limits."""
        return [b"http/1.1"]
