# -*- test-case-name: tests.test_logs -*-
"""The access-log line, and --logger factories for twistd."""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.server import Request

from vespa.relay import RelayResult

_access = Logger(namespace="vespa.access")


def log_access(request: Request, result: RelayResult, forward: object) -> None:
    """One line per finished request: method, path, status, outcome, bytes, duration."""
    _access.info(
        "{method} {path} {status} {outcome} {bytes_out}B {duration_ms:.1f}ms",
        method=request.method.decode("ascii", "replace"),
        path=request.path.decode("ascii", "replace"),
        status=result.status,
        outcome=result.outcome.value,
        bytes_out=result.bytes_out,
        duration_ms=(result.finished - result.started) * 1000,
    )
