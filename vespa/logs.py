# -*- test-case-name: tests.test_logs -*-
"""The access log: one line per request, handed to the log publisher in batches."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from vespa.relay import RelayResult

_access = Logger(namespace="vespa.access")

# Lines wait at most this long, or until there are this many, before they are logged.
FLUSH_INTERVAL = 0.2
MAX_BATCH = 256


def access_line(request: Request, result: RelayResult) -> str:
    """Method, path, status, outcome, bytes relayed and duration of one finished request."""
    return (
        f"{request.method.decode('ascii', 'replace')} {request.path.decode('ascii', 'replace')} "
        f"{result.status} {result.outcome.value} {result.bytes_out}B "
        f"{(result.finished - result.started) * 1000:.1f}ms"
    )


class AccessLog(Service):
    """
    A request observer writing one access line per request. Twisted's log publisher costs
    about as much per event as relaying a small request (timestamp, formatting, a write and
    a flush), so lines are batched: one log event carries every line of the last
    ``FLUSH_INTERVAL`` seconds (one line per text-log line). Stopping the service flushes.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._lines: list[str] = []
        self._timer: IDelayedCall | None = None

    def __call__(self, request: Request, result: RelayResult, forward: object) -> None:
        self._lines.append(access_line(request, result))
        if len(self._lines) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Log the pending lines now."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._lines:
            lines, self._lines = self._lines, []
            _access.info("{lines}", lines="\n".join(lines), count=len(lines))

    def stopService(self) -> None:
        self.flush()
        super().stopService()
