"""
The benchmark's Python backend (Twisted): slow SSE streams, a chunked blob and /health.

    GET|POST /sse/N/MS  N events MS ms apart (the first at once), then "data: [DONE]"; the
                        first event carries "t": [when the request was rendered, when the
                        event was written] (time.perf_counter, the machine's monotonic clock:
                        sse_load.py splits the time to first byte with them)
    GET /chunked/MIB    MIB MiB of zeros, chunked (no Content-Length), as fast as it drains
    GET /health         200 {"ok": true}

Run by bench.py as ``python backend.py PORT``; loopback only.
"""

from __future__ import annotations

import sys
import time
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall, IPullProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

CHUNK = b"\0" * (1 << 20)


class Stream:
    """One SSE response: an event every ``delay`` seconds, stopped if the client leaves."""

    def __init__(self, request: Request, events: int, delay: float, rendered: float) -> None:
        self.request = request
        self.left = events
        self.delay = delay
        self.call: IDelayedCall | None = None
        self.rendered: float | None = rendered
        request.notifyFinish().addErrback(self.gone)

    def tick(self) -> None:
        self.call = None
        if self.left:
            self.left -= 1
            if self.rendered is not None:  # the first event: when the request came, and now
                stamps = b', "t": [%.7f, %.7f]' % (self.rendered, time.perf_counter())
                self.rendered = None
            else:
                stamps = b""
            self.request.write(b'data: {"token": "hello", "left": %d%s}\n\n' % (self.left, stamps))
            self.call = reactor.callLater(self.delay, self.tick)
        else:
            self.request.write(b"data: [DONE]\n\n")
            self.request.finish()

    def gone(self, _: object) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None


@implementer(IPullProducer)
class Blob:
    """MiB-sized chunks written each time the transport asks for more."""

    def __init__(self, request: Request, mib: int) -> None:
        self.request = request
        self.left = mib

    def resumeProducing(self) -> None:
        if self.left:
            self.left -= 1
            self.request.write(CHUNK)
        else:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.left = 0


class Backend(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes | int:
        rendered = time.perf_counter()
        parts = request.path.strip(b"/").split(b"/")
        if parts[0] == b"sse" and len(parts) == 3:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            Stream(request, int(parts[1]), int(parts[2]) / 1000, rendered).tick()
            return NOT_DONE_YET
        if parts[0] == b"chunked" and len(parts) == 2:
            request.setHeader(b"content-type", b"application/octet-stream")
            request.registerProducer(Blob(request, int(parts[1])), False)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok": true}'

    render_POST = render_GET  # S3 posts a prompt, as the harness does


class QuietSite(Site):
    def log(self, request: object) -> None:
        pass


if __name__ == "__main__":
    site = cast(Any, QuietSite(Backend()))  # Twisted's annotation asks for a ServerFactory
    reactor.listenTCP(int(sys.argv[1]), site, backlog=2048, interface="127.0.0.1")
    reactor.run()
