# -*- test-case-name: tests.test_logs -*-
"""
The access-log line, ``--logger`` factories for twistd, and :func:`mask`, the one way a
secret (MASTER_TOKEN, API keys) may appear in a log line or an error body.

JSON lines (for journald, Loki, ...): ``twistd --logger vespa.logs.json_stdout -n vespa ...``.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    formatEvent,
    jsonFileLogObserver,
)
from twisted.web.server import Request
from zope.interface import implementer

from vespa import request_id
from vespa.relay import RelayResult, outcome_of

_access = Logger(namespace="vespa.access")


def mask(secret: str) -> str:
    """A secret as it may appear in logs: enough to tell two apart, not enough to use one."""
    if not secret:
        return "(none)"
    if len(secret) <= 12:
        return "****"
    return secret[:4] + "..."


def log_access(request: Request, result: RelayResult, forward: object) -> None:
    """One line per finished request: method, path (never the query string, which may carry
    a signature), status, workload, bytes, duration, time to first byte, request id, outcome.

    The line is built here with an f-string and logged as ``{line}``: Twisted's event
    formatter is several times slower per field, and this runs for every request (JSON
    logs still get every field)."""
    method = request.method.decode("ascii", "replace")
    path = request.path.decode("ascii", "replace")
    workload = getattr(forward, "workload", 0.0)
    duration_ms = (result.finished - result.started) * 1000
    ttfb_ms = (
        "-" if result.first_byte is None else f"{(result.first_byte - result.started) * 1000:.1f}ms"
    )
    rid = request_id.of(request)
    outcome = outcome_of(result).value
    _access.info(
        "{line}",
        line=f"{method} {path} {result.status} {outcome} workload={workload:g} "
        f"{result.bytes_out}B {duration_ms:.1f}ms ttfb={ttfb_ms} id={rid}",
        method=method,
        path=path,
        status=result.status,
        outcome=outcome,
        workload=workload,
        bytes_out=result.bytes_out,
        duration_ms=duration_ms,
        ttfb_ms=ttfb_ms,
        request_id=rid,
    )


@implementer(ILogObserver)
class _WithText:
    """Adds the formatted message as ``text`` so JSON readers need not know Twisted's
    format strings."""

    def __init__(self, observer: FileLogObserver) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        self._observer({**event, "text": formatEvent(event)})


def json_observer(stream: IO[str]) -> ILogObserver:
    """One JSON object per line on ``stream``."""
    return _WithText(jsonFileLogObserver(stream, recordSeparator=""))


def json_stdout() -> ILogObserver:
    """twistd ``--logger`` factory: JSON lines on stdout (journald keeps one entry per line)."""
    return json_observer(sys.stdout)
