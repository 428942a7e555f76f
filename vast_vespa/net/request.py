# -*- test-case-name: tests.test_channel -*-
"""
The fast path's twisted.web Request: the same answers as :class:`vast_vespa.site.VespaRequest`
in fewer steps, for the requests every listener relays.

Twisted private names it relies on (checked at start-up by :mod:`vast_vespa.net.guard`):
the state ``Request.write`` keeps about an answer
(``_disconnected``, ``_encoder``, ``_inFakeHead``), read to know when its own head writing
applies; anything else goes to twisted.web's own ``write``; ``_cleanup``, the end of
twisted.web's ``finish``, which its own ``finish`` calls; and the attributes twisted.web's
Request constructor sets (``_parsePOSTFormSubmission`` and Componentized's ``_adapterCache``
among them), which its own constructor sets in one step. Its headers are read and filled
through :mod:`vast_vespa.net.header_table`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.server import version as SERVER

from vast_vespa.net.header_table import RAW_HEADER_OPS
from vast_vespa.net.listen import SendNowServer
from vast_vespa.site import VespaRequest

if TYPE_CHECKING:
    from vast_vespa.net.server import GuardedChannel


class LeanRequest(VespaRequest):
    """A :class:`VespaRequest` that takes the short way through
    the steps every relayed request goes through (twisted.web's way does more work per
    request than a relay needs; docs/performance.md has what this buys):

    - it is set up in one step, where twisted.web's goes through two constructors (its own
      and Componentized's); the start-up guard checks that the attributes set are the ones
      twisted.web's constructor sets;
    - the request is handed to its resource without looking at a form body's Content-Type
      (the site never reads form bodies into ``args``, see :class:`VespaSite`);
    - a leaf root resource (the worker's, the client proxy's) is rendered without walking the
      resource tree, so ``prepath`` and ``postpath`` are not set (those resources read
      ``path`` and ``uri``); any other resource goes the twisted.web way;
    - the response head is made in one pass over the headers (the same head), and goes out
      in one write with the first data;
    - once the head is out, a chunked body's data is framed here and written to the
      connection (twisted.web's write, three calls deep, checks the same state each time);
    - an answer under way is finished in one step too.
    """

    header_ops = RAW_HEADER_OPS
    _chunks_go_straight = False  # the head is out and the body is chunked, not encoded
    _send_chunk: Callable[[bytes], object]  # the connection's write, once chunks go straight

    def __init__(self, channel: GuardedChannel) -> None:
        self.notifications: list[Deferred[None]] = []
        self.channel = channel
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.requestHeaders = Headers()
        self.received_cookies: dict[bytes, bytes] = {}
        self.responseHeaders = Headers()
        self.cookies: list[bytes] = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = False
        self._adapterCache: dict[str, object] = {}

    def gotLength(self, length: int | None) -> None:
        # twisted.web looks the site's method up each time, in case a site has none
        self.content = self.channel.site.getContentFile(length)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        content = self.content
        assert content is not None  # (gotLength made it)
        content.seek(0)
        self.method, self.uri, self.clientproto = command, path, version
        self.path, query_follows, query = path.partition(b"?")
        self.args = parse_qs(query, 1) if query_follows else {}
        self.process()

    def process(self) -> None:
        site = self.channel.site
        resource = site.resource
        if not getattr(resource, "isLeaf", False):
            super().process()
            return
        self.site = site
        put = self.header_ops.put
        put(self.responseHeaders, b"Server", [SERVER])
        put(self.responseHeaders, b"Date", [site.http_date()])
        try:
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if self._chunks_go_straight and data:  # cleared by finish and connectionLost
            self.sentLength += len(data)
            self._send_chunk(b"%x\r\n%b\r\n" % (len(data), data))
            return
        if (
            self.startedWriting
            or self.finished
            or self._disconnected
            or self._encoder is not None
            or self._inFakeHead
            or self.lastModified is not None
            or self.etag is not None
            or self.cookies
        ):
            super().write(data)
            return
        head = self._head()
        if self.method == b"HEAD" or self.code in NO_BODY_CODES:
            self.channel.write(head)
            self.write = _no_body  # type: ignore[method-assign]  # as twisted.web
            return
        if data:  # in the same write as the head: one packet, one system call
            self.sentLength = len(data)
            head += b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
        self.channel.write(head)
        if self.chunked:
            transport = self.transport  # the connection's (TCP or TLS)
            assert transport is not None
            # Chosen once per answer, not per chunk. A SendNowServer's chunks are not held
            # for the end of the turn: see write_now.
            self._send_chunk = (
                transport.write_now if isinstance(transport, SendNowServer) else transport.write
            )
            self._chunks_go_straight = True

    def finish(self) -> None:
        self._chunks_go_straight = False
        if (
            self._disconnected
            or self.finished
            or not self.startedWriting
            or self._encoder is not None
            or self.queued
        ):
            super().finish()  # twisted.web's checks, warnings and head writing
            return
        # twisted.web's finish of an answer under way, without its three calls deep and the
        # site's access log (VespaSite writes none)
        self._when_lost = None  # as VespaRequest.finish
        if self.chunked:
            self.channel.write(b"0\r\n\r\n")
        self.finished = 1
        self._cleanup()

    def connectionLost(self, reason: Failure) -> None:
        self._chunks_go_straight = False
        super().connectionLost(reason)

    def _head(self) -> bytes:
        """The status line and headers, as twisted.web writes them on a first write (a
        default Content-Type when there is one and a body; chunked when HTTP/1.1 without a
        Content-Length), made in one pass over the headers; the answer counts as started."""
        self.startedWriting = 1
        code = self.code
        head = [self.clientproto, b" %d " % code, self.code_message, b"\r\n"]
        length: bytes | None = None
        has_type = False
        for name, values in self.responseHeaders.getAllRawHeaders():  # canonical names
            if name == b"Content-Length":
                length = values[0]
            elif name == b"Content-Type":
                has_type = True
            for value in values:
                head += (name, b": ", value, b"\r\n")
        body_allowed = code not in NO_BODY_CODES
        default_type = self.defaultContentType
        if body_allowed and not has_type and default_type is not None and length != b"0":
            self.responseHeaders.setRawHeaders(b"Content-Type", [default_type])
            head += (b"Content-Type: ", default_type, b"\r\n")
        if (
            self.clientproto == b"HTTP/1.1"
            and length is None
            and self.method != b"HEAD"
            and body_allowed
        ):
            self.chunked = 1
            head.append(b"Transfer-Encoding: chunked\r\n")
        head.append(b"\r\n")
        return b"".join(head)


def _no_body(data: bytes) -> None:
    """A HEAD answer's or a 204's or 304's write: the body is not sent."""
