# -*- test-case-name: tests.test_relay -*-
"""
How a request ended (:class:`Outcome`, :class:`RelayResult`), and the JSON error bodies every
Vespa listener answers with: one shape for the worker, the client proxy, the emulator and the
admin listener.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import Request

JSON = b"application/json"

# Told how each request ended: the request, its result, and what was forwarded for it (the
# worker's Forward or the client proxy's Routed, with its workload) or None.
Observer = Callable[[server.Request, "RelayResult", Any], None]
_log = Logger()


class Outcome(enum.Enum):
    """How a request ended; every request ends in exactly one."""

    SERVED = "served"  # the backend answered (any status) and the answer was relayed whole
    # The backend failed (unreachable, timed out, broke mid-answer), or the worker cut the
    # request (the drain timeout).
    ERRORED = "errored"
    CANCELLED = "cancelled"  # the client went away first
    REJECTED = "rejected"  # refused before reaching the backend (auth, admission, limits)

    # Members are singletons, equal to themselves alone, so hashing by identity is right;
    # Enum's own hash is a Python call on every dict lookup by outcome (/metrics counts by one).
    __hash__ = object.__hash__


# Each outcome's value, read without Enum's value property (a Python call per read): the access
# line names an outcome for every request.
OUTCOME_NAMES: dict[Outcome, str] = {outcome: outcome.value for outcome in Outcome}


# Members the request path names for every request, as module names: on Python 3.11 and older
# a member read from the Enum class goes through EnumType.__getattr__, which makes CPython call
# the class's __getattribute__ through a bound wrapper it makes for each read (about 500
# instructions where a module name is a dict lookup).
SERVED = Outcome.SERVED
ERRORED = Outcome.ERRORED
CANCELLED = Outcome.CANCELLED


@dataclass
class RelayResult:
    """What happened to one request: the outcome, the status sent and the bytes relayed."""

    outcome: Outcome
    status: int = 0
    bytes_out: int = 0
    started: float = 0.0
    first_byte: float | None = None  # when the backend's response headers arrived
    finished: float = 0.0
    reason: str = ""
    # Set when ``retry_if`` claimed the answer: nothing was written to the client.
    retry: bool = False


def outcome_of(result: RelayResult) -> Outcome:
    """How a finished request counts everywhere (reports, /metrics, the access log): a
    relayed backend 5xx answer is an error, so a broken model shows as one."""
    if result.outcome is SERVED and result.status >= 500:
        return ERRORED
    return result.outcome


def error_body(error: str, detail: str = "", **extra: Any) -> bytes:
    """The JSON error body every Vespa-made error response carries."""
    return json.dumps({"error": error, "detail": detail, **extra}).encode("utf-8")


def write_error(
    request: Request,
    code: int,
    error: str,
    detail: str = "",
    headers: dict[bytes, bytes] | None = None,
    **extra: Any,
) -> None:
    """Answer ``request`` with a JSON error (if the client is still there)."""
    if request.finished or request.channel is None or request.startedWriting:
        return
    body = error_body(error, detail, **extra)
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON)
    request.setHeader(b"content-length", b"%d" % len(body))
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.write(body)
    request.finish()


def inner_failure(failure: Failure) -> Failure:
    """The first wrapped failure of ResponseNeverReceived / RequestTransmissionFailed."""
    inner = getattr(failure.value, "reasons", None)
    return cast(Failure, inner[0]) if inner else failure


def describe_failure(failure: Failure) -> str:
    """A short, user-facing description of why the backend call failed (no traceback)."""
    value = inner_failure(failure).value
    if isinstance(value, CancelledError):
        return "request cancelled"
    text = str(value) or type(value).__name__
    return text.strip()


def notify(
    observers: tuple[Observer, ...], request: server.Request, result: RelayResult, forward: Any
) -> None:
    """Tell every observer; one that raises is logged and the others still hear of it (the
    relay's Deferred chains end here, so nothing would report the error otherwise)."""
    for observer in observers:
        try:
            observer(request, result, forward)
        except Exception:
            _log.failure("observer {observer!r} failed", observer=observer)
