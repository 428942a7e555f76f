# -*- test-case-name: tests.test_logs -*-
"""
The access-log line, the text log observer the worker and client give twistd, ``--logger``
factories, and :func:`mask`, the one way a secret (MASTER_TOKEN, API keys) may appear in a
log line or an error body.

JSON lines (for journald, Loki, ...): ``twistd --logger vast_vespa.logs.json_stdout -n vespa ...``.
"""

from __future__ import annotations

import atexit
import sys
from threading import RLock
from time import time
from typing import IO, Any, cast

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)
from twisted.python.components import Componentized
from twisted.web.server import Request
from zope.interface import implementer

from vast_vespa import request_id
from vast_vespa.outcome import OUTCOME_NAMES, RelayResult, outcome_of

_access = Logger(namespace="vespa.access")
# The client proxy's access lines have their own namespace: in the sandbox, where a worker and
# the client log to one stream, the two lines of one request can be told apart.
_client_access = Logger(namespace="vespa-client.access")
_ACCESS_NAMESPACES = frozenset({_access.namespace, _client_access.namespace})


def mask(secret: str) -> str:
    """A secret as it may appear in logs: enough to tell two apart, not enough to use one."""
    if not secret:
        return "(none)"
    if len(secret) <= 12:
        return "****"
    return secret[:4] + "..."


def log_access(
    request: Request, result: RelayResult, forward: object, logger: Logger = _access
) -> None:
    """One line per finished request: method, path (never the query string, which may carry
    a signature), status, workload, bytes, duration, time to first byte, request id, outcome.

    The line is built here with an f-string and logged as ``{line}``: Twisted's event
    formatter is several times slower per field, and this runs for every request (JSON
    logs still get every field). While a twistd text log on stdout serves (see
    :class:`TextLogForTwistd`), the line is written to it directly: twisted.logger's
    publisher, its observers and the event would be most of the line's cost, and that text
    log is the only observer there is."""
    method = request.method.decode("ascii", "replace")
    path = request.path.decode("ascii", "replace")
    workload = getattr(forward, "workload", 0.0)
    duration_ms = (result.finished - result.started) * 1000
    ttfb = 0.0 if result.first_byte is None else (result.first_byte - result.started) * 1000
    ttfb_ms = "-" if result.first_byte is None else f"{ttfb:.1f}ms"
    rid = request_id.of(request)
    outcome = OUTCOME_NAMES[outcome_of(result)]
    line = (
        f"{method} {path} {result.status} {outcome} workload={workload:g} "
        f"{result.bytes_out}B {duration_ms:.1f}ms ttfb={ttfb_ms} id={rid}"
    )
    direct = _direct_text_log
    if direct is not None:
        direct.access(logger.namespace, line)
        return
    # The event Logger.info would make, handed to the observer directly: Logger.emit checks
    # the level against LogLevel.iterconstants() on every call.
    logger.observer(
        {
            "log_logger": logger,
            "log_level": LogLevel.info,
            "log_namespace": logger.namespace,
            "log_source": None,
            "log_format": PREFORMATTED,
            "log_time": time(),
            "line": line,
            "method": method,
            "path": path,
            "status": result.status,
            "outcome": outcome,
            "workload": workload,
            "bytes_out": result.bytes_out,
            "duration_ms": duration_ms,
            "ttfb_ms": None if result.first_byte is None else ttfb,
            "request_id": rid,
        }
    )


def log_client_access(request: Request, result: RelayResult, forward: object) -> None:
    """:func:`log_access` for the client proxy, in the ``vespa-client.access`` namespace."""
    log_access(request, result, forward, _client_access)


# An event whose message is already in its "line" field.
PREFORMATTED = "{line}"


class _ClassicText:
    """
    Twisted's classic text line (``textFileLogObserver``: RFC 3339 time, ``[system]``,
    message), made cheaply for pre-formatted events: the time string is made once per second
    and the message is taken as it is. Twisted's formatter does far more work per line, and
    the access log writes one line per request.
    """

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def __call__(self, event: LogEvent) -> str | None:
        if event.get("log_format") != PREFORMATTED or "log_system" in event:
            return formatEventAsClassicLogText(event)
        level = getattr(event.get("log_level"), "name", "-")
        return self.line(event["log_time"], event.get("log_namespace", "-"), level, event["line"])

    def line(self, when: float, namespace: str, level: str, message: str) -> str:
        """One line: the time, ``[namespace#level]``, the message."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(second)
        return f"{self._stamp} [{namespace}#{level}] {message}\n"


FLUSH_AFTER = 0.1  # seconds an access line may wait in the stream's buffer


@implementer(ILogObserver)
class _TextLog:
    """
    Twisted's text log (``FileLogObserver`` with :class:`_ClassicText`), except that access
    lines are written in batches: ``FileLogObserver`` writes and flushes every event, a
    ``write(2)`` per request (stdout is often unbuffered: ``PYTHONUNBUFFERED`` is common in
    containers). Access lines are held here and written together within :data:`FLUSH_AFTER`
    seconds; any other line is written at once, after the lines held, so the order never
    changes (but for a line logged by a signal handler that interrupts a write, which may go
    first). Lines still held when the process exits are written then.
    """

    def __init__(self, stream: IO[str], clock: IReactorTime | None = None) -> None:
        self._stream = stream
        self._format = _ClassicText()
        self._clock = clock
        self._held: list[str] = []
        # Other threads may log (and so flush) too. Re-entrant: a signal handler runs in the
        # main thread, maybe while it holds the lock, and logs (twistd's "Received SIGTERM");
        # with a plain Lock the process would wait for itself for ever instead of stopping.
        self._lock = RLock()
        atexit.register(self.flush)

    def __call__(self, event: LogEvent) -> None:
        text = self._format(event)
        if not text:
            return
        access = event.get("log_format") == PREFORMATTED
        access = access and event.get("log_namespace") in _ACCESS_NAMESPACES
        if access:
            self._hold(text)
            return
        with self._lock:
            self._held.append(text)
        self.flush()

    def access(self, namespace: str, message: str) -> None:
        """An access line, logged now at info level in ``namespace``: the line an access
        event would make, without the event."""
        self._hold(self._format.line(time(), namespace, "info", message))

    def _hold(self, text: str) -> None:
        """Hold an access line; the first one held is written within FLUSH_AFTER."""
        with self._lock:
            first = not self._held
            self._held.append(text)
        if first:
            self._reactor().callLater(FLUSH_AFTER, self.flush)

    def _reactor(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor  # the one twistd installed

            self._clock = cast(IReactorTime, reactor)
        return self._clock

    def flush(self) -> None:
        """Write the lines held, now (in order, whichever thread calls)."""
        with self._lock:
            if self._held:
                held, self._held = self._held, []
                self._stream.write("".join(held))
                self._stream.flush()


def text_observer(stream: IO[str], clock: IReactorTime | None = None) -> ILogObserver:
    """The text log twistd writes by default, with pre-formatted lines made cheaply and
    access lines flushed in batches (``clock`` times them; default the global reactor)."""
    return _TextLog(stream, clock)


def twistd_writes_text_to_stdout(options: Any) -> bool:
    """Whether twistd, given these (sub-command) options, would log text to stdout: no
    ``--logger``, no ``--syslog`` and ``--logfile`` unset or ``-`` with ``--nodaemon``."""
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return False
    if twistd.get("logger") or twistd.get("syslog") or not twistd.get("nodaemon"):
        return False
    return twistd.get("logfile") in (None, "", "-")


# The text log access lines are written to directly while a TextLogForTwistd service runs.
_direct_text_log: _TextLog | None = None


class TextLogForTwistd:
    """
    Mixin for a twistd sub-command's top service: when ``text_log`` is set, the service hands
    it to twistd as the application's ILogObserver (the hook a .tac file uses), which twistd
    then logs to instead of its default text observer; while the service runs,
    :func:`log_access` writes to it directly.
    """

    text_log: _TextLog | None = None

    def setServiceParent(self, parent: Any) -> None:
        if self.text_log is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.text_log)
        super().setServiceParent(parent)  # type: ignore[misc]

    def startService(self) -> None:
        global _direct_text_log
        if self.text_log is not None:
            _direct_text_log = self.text_log
        super().startService()  # type: ignore[misc]

    def stopService(self) -> Any:
        global _direct_text_log
        stopped = super().stopService()  # type: ignore[misc]
        if _direct_text_log is self.text_log:
            _direct_text_log = None
        return stopped


def use_text_log(service: IService, options: Any) -> IService:
    """``service`` (a :class:`TextLogForTwistd`), set to give twistd :func:`text_observer` on
    stdout when that is where twistd would write its own text log anyway."""
    if isinstance(service, TextLogForTwistd) and twistd_writes_text_to_stdout(options):
        service.text_log = _TextLog(sys.stdout)
    return service


@implementer(ILogObserver)
class _WithText:
    """Adds the formatted message as ``text`` and the level's name as ``level`` (``info``,
    ``warn``, ``error``...), so JSON readers need not know Twisted's format strings or its
    encoding of ``log_level`` (an object, kept so Twisted can read the lines back)."""

    def __init__(self, observer: FileLogObserver) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        level = getattr(event.get("log_level"), "name", None)  # a LogLevel constant
        named = {"level": level} if level is not None else {}
        self._observer({**event, **named, "text": formatEvent(event)})


def json_observer(stream: IO[str]) -> ILogObserver:
    """One JSON object per line on ``stream``."""
    return _WithText(jsonFileLogObserver(stream, recordSeparator=""))


def json_stdout() -> ILogObserver:
    """twistd ``--logger`` factory: JSON lines on stdout (journald keeps one entry per line)."""
    return json_observer(sys.stdout)
