# -*- test-case-name: tests.test_channel,tests.test_limits -*-
"""
The twisted.web Site and Request every Vespa listener serves with (worker, client proxy,
autoscaler emulator, admin listener, sample backend): connections parsed and limited by
:class:`vast_vespa.net.server.GuardedChannel`, errors answered as JSON without a traceback,
no twisted.web access log (Vespa writes its own), and its name in the log lines.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from io import BytesIO
from tempfile import TemporaryFile
from typing import IO, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from vast_vespa.headers import PUBLIC_HEADER_OPS, HeaderOps
from vast_vespa.net.server import ConnectionTable, EarlyVerdict, GuardedChannel, Limits
from vast_vespa.outcome import JSON, error_body

# Request bodies up to this size are kept in memory, larger ones in a temporary file (as
# twisted.web does).
IN_MEMORY_BODY = 100_000

# A proxy never reads form fields: without this switch, twisted.web parses the Content-Type of
# every POST with the email package and reads url-encoded and multipart bodies into
# request.args. Twisted releases before 24.10 have no switch (and always parse).
_CAN_SKIP_FORMS = "parsePOSTFormSubmission" in inspect.signature(Site.__init__).parameters

_log = Logger()


class VespaRequest(Request):
    """A twisted.web Request that never shows a traceback: an error while rendering is logged
    and answered with a JSON 500."""

    channel: GuardedChannel  # type: ignore[assignment]  # its channel, not an HTTPChannel
    header_ops: HeaderOps = PUBLIC_HEADER_OPS  # how the request path fills its Headers
    # Why the server itself cut this request's connection (the worker's drain timeout), or "":
    # such a request failed to be served, its client did not go away.
    cut_reason = ""
    _when_lost: list[Callable[[Failure], object]] | None = None

    def when_lost(self, callback: Callable[[Failure], object]) -> None:
        """Have ``callback(reason)`` called if the connection is lost before the answer is
        finished: what an errback on ``notifyFinish()`` is told, without the Deferred that
        fires on every finished answer too (the relay asks this of every request)."""
        if self._when_lost is None:
            self._when_lost = [callback]
        else:
            self._when_lost.append(callback)

    def finish(self) -> None:
        self._when_lost = None  # answered: nothing to tell (and no cycle with the relay)
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        callbacks, self._when_lost = self._when_lost, None
        for callback in callbacks or ():
            try:
                callback(reason)
            except Exception:  # as a failing errback: logged, the others still told
                _log.failure("telling {callback!r} of a lost connection", callback=callback)

    def processingFailed(self, reason: Failure) -> Failure:
        """An unexpected error while rendering: log it, answer a JSON 500 (no traceback)."""
        _log.failure("internal error rendering {uri}", failure=reason, uri=self.path)
        if self.finished or self.channel is None:
            return reason
        if self.startedWriting:
            self.loseConnection()  # headers are out: a truncated answer is the honest one
            return reason
        body = error_body("internal error", "see the log")
        self.setResponseCode(500)
        self.responseHeaders.setRawHeaders(b"content-type", [JSON])
        self.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self.write(body)
        self.finish()
        return reason


class VespaSite(Site):
    """
    A Site whose connections are :class:`GuardedChannel` (HTTP/1.1 only, with ``limits``);
    counts open connections and refusals. ``name`` is how its log lines call it ("worker
    starting on 3000"). With ``fast_path`` (only where :mod:`vast_vespa.net.guard` chose it),
    requests are :class:`vast_vespa.net.request.LeanRequest` (the same answers, fewer steps).
    """

    protocol = GuardedChannel  # type: ignore[assignment]  # HTTP/1.1 only: no h2 upgrade
    displayTracebacks = False
    noisy = False  # no "Starting factory" line

    def __init__(
        self,
        resource: Resource,
        limits: Limits | None = None,
        *,
        name: str = "site",
        fast_path: bool = False,
        **kwargs: Any,
    ) -> None:
        if _CAN_SKIP_FORMS:
            kwargs["parsePOSTFormSubmission"] = False
        super().__init__(resource, **kwargs)
        factory: type[VespaRequest] = VespaRequest
        if fast_path:
            from vast_vespa.net.request import LeanRequest

            factory = LeanRequest
        self.requestFactory = factory  # called with the channel only (GuardedChannel)
        self.header_ops = factory.header_ops  # how its channels build Headers
        self.name = name
        self.limits = limits or Limits()
        self.connections = ConnectionTable(self.reactor)
        self.early_verdict: EarlyVerdict | None = None  # the worker's, when secured
        self.refusals: Counter[str] = Counter()
        self.dropped_headers = 0  # request header fields with _ in the name (GuardedChannel)
        self._date = (-1, b"")  # (second, its Date value)

    @property
    def open_connections(self) -> int:
        return self.connections.open

    def logPrefix(self) -> str:
        return self.name

    def log(self, request: object) -> None:
        """No twisted.web access log: Vespa's own (vast_vespa.logs) is one line per request."""

    def getContentFile(self, length: int | None) -> IO[bytes]:
        """Where a request body is kept, as twisted.web keeps it: in memory up to
        ``IN_MEMORY_BODY`` bytes, in a temporary file when larger or of unknown length.
        (twisted.web asks its site for this first, and a site without it raised and caught
        an AttributeError per request.)"""
        if length is not None and length < IN_MEMORY_BODY:
            return BytesIO()
        return TemporaryFile()

    def http_date(self) -> bytes:
        """The Date header's value, made once a second (twisted.web formats it per request)."""
        now = int(self.reactor.seconds())
        if now != self._date[0]:
            self._date = (now, datetimeToString(now))
        return self._date[1]

    def close_idle_connections(self) -> None:
        """Close the idle client connections once this site has stopped serving (see
        :meth:`ConnectionTable.close_idle`), in one log line."""
        closed = self.connections.close_idle()
        if closed:
            _log.info(
                "{site}: closed {count} idle client connection(s)", site=self.name, count=closed
            )

    def acceptableProtocols(self) -> list[bytes]:
        """Over TLS, offer HTTP/1.1 only (ALPN): the limits are HTTP/1.1 limits."""
        return [b"http/1.1"]
