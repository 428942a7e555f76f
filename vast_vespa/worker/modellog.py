# -*- test-case-name: tests.test_modellog -*-
"""
The model server's log (``MODEL_LOG``), followed as Vast's own workers follow it: from its
start, whether it exists yet or not, through rotation (another file at the path: a new inode)
and truncation (a size below what was read). A LoopingCall reads what is new in small
non-blocking reads, a bounded amount per tick, so that a huge log never holds up the reactor;
while behind, the next tick comes at once (after what else the reactor has to do).

Each line (``\\n`` or ``\\r`` ends one: download progress bars rewrite their line with ``\\r``)
is matched against the substrings of :class:`~vast_vespa.backends.LogLines`: error first, then
load, then info.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vast_vespa.backends import LogLines

POLL_INTERVAL = 0.25  # seconds between looks at the file
READ_SIZE = 64 * 1024  # bytes per read
TICK_BUDGET = 1024 * 1024  # bytes read per tick at most; the rest waits for the next ticks
MAX_LINE = 8 * 1024  # longer lines are cut (and matched) at this length
MAX_ERROR = 1000  # characters of error lines kept for error_msg
INFO_EVERY = 1.0  # seconds between two info lines copied into the worker's log

_LINE_END = re.compile(rb"\r\n|\r|\n")
_TRACEBACK = "Traceback (most recent call last):"

log = Logger(namespace="vast_vespa.model_log")


class LogFollower:
    """Follows the file at ``path``: each :meth:`poll` returns the lines completed since the
    previous one. Never raises for the file's sake: ``problem`` says why it cannot be read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.opened = False  # the file has been opened at least once
        self.problem = ""  # why it could not be opened last time (other than "missing")
        self.behind = False  # the last poll stopped at its budget, not at the end of the file
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._partial = b""

    def poll(self, budget: int = TICK_BUDGET) -> list[str]:
        lines: list[str] = []
        self.behind = False
        for _ in range(2):  # after a rotation or truncation, read the new content at once
            if self._fd is None and not self._open():
                break
            try:
                data, at_end = self._read(budget)
            except OSError as e:  # a directory, an I/O error: said, and tried again later
                self.problem = f"cannot be read: {e.strerror}"
                self.close()
                break
            budget -= len(data)
            lines += self._split(data)
            self.behind = not at_end
            if not at_end or budget <= 0 or not self._restarted(lines):
                break
        return lines

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        try:
            # O_NONBLOCK: a FIFO given as MODEL_LOG must not block the reactor either.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            self.problem = f"cannot be read: {e.strerror}"
            return False
        stat = os.fstat(fd)
        self._fd, self._identity, self._offset = fd, (stat.st_dev, stat.st_ino), 0
        self._partial, self.opened, self.problem = b"", True, ""
        return True

    def _read(self, budget: int) -> tuple[bytes, bool]:
        """Up to ``budget`` new bytes, and whether the end of the file was reached."""
        assert self._fd is not None
        chunks: list[bytes] = []
        got = 0
        while got < budget:
            try:
                chunk = os.read(self._fd, min(READ_SIZE, budget - got))
            except BlockingIOError:
                chunk = b""
            if not chunk:
                self._offset += got
                return b"".join(chunks), True
            chunks.append(chunk)
            got += len(chunk)
        self._offset += got
        return b"".join(chunks), False

    def _restarted(self, lines: list[str]) -> bool:
        """At the end of the file: whether another file is at the path now (rotation; the last
        unfinished line of the old one is returned as is) or the file shrank (truncation;
        read again from its start)."""
        assert self._fd is not None
        try:
            stat = os.stat(self.path)
        except OSError:
            return False  # moved away and not recreated yet: the writer may still append
        if (stat.st_dev, stat.st_ino) != self._identity:
            lines += self._split(b"\n")
            self.close()
            return True
        if os.fstat(self._fd).st_size < self._offset:
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._offset, self._partial = 0, b""
            return True
        return False

    def _split(self, data: bytes) -> list[str]:
        parts = _LINE_END.split(self._partial + data)
        self._partial = parts.pop()
        if len(self._partial) > MAX_LINE:
            parts.append(self._partial)
            self._partial = b""
        return [
            text for part in parts if (text := part[:MAX_LINE].decode("utf-8", "replace").rstrip())
        ]


class ModelLog:
    """
    What MODEL_LOG tells the worker: :meth:`when_loaded` fires at the first load line;
    ``on_error(text)`` is called at the end of each tick that saw error lines, with those lines
    (and, after a Python traceback's first line, its exception line); info lines are copied
    into the worker's log, at most one each INFO_EVERY s (the latest waits for its turn).

    A Python traceback is an error line only until the model is up, by a load line in the log
    or :meth:`backend_ready`: while the model loads it means the server failed; once it serves
    it is one request's failure (servers log one for a malformed request), and a client must
    not be able to end the worker with one. The load line counts also when it was read from
    before this process started (a restarted worker reads the log from its start again).
    """

    def __init__(
        self,
        path: str,
        lines: LogLines,
        clock: IReactorTime,
        on_error: Callable[[str], None],
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self.lines = lines
        self.loaded = False
        self._backend_ready = False
        self._clock = clock
        self._on_error = on_error
        self._interval = interval
        self._follower = LogFollower(path)
        self._waiters: list[Deferred[None]] = []
        self._info_at = -INFO_EVERY
        self._pending_info = ""
        self._skipped = 0
        self._catch_up: IDelayedCall | None = None
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    @property
    def waits_for_load(self) -> bool:
        """Whether a load line is a readiness condition (one is configured, none seen yet)."""
        return bool(self.lines.load) and not self.loaded

    def status(self) -> str:
        """Where the wait for the load line stands, for people."""
        if self.loaded:
            return f"load line seen in {self.path}"
        if self._follower.problem:
            return f"{self.path} {self._follower.problem}"
        if not self._follower.opened:
            return f"{self.path} does not exist yet"
        return f"no load line in {self.path} yet"

    def backend_ready(self) -> None:
        """The backend answers its health check: from now on a traceback is not fatal (also
        with no load lines configured)."""
        self._backend_ready = True

    def when_loaded(self) -> Deferred[None]:
        """Fires once a load line has been seen (cancellable)."""
        waiter: Deferred[None] = Deferred()
        if self.loaded:
            waiter.callback(None)
        else:
            self._waiters = [old for old in self._waiters if not old.called]  # cancelled ones
            self._waiters.append(waiter)
        return waiter

    def start(self) -> None:
        log.info(
            "following the model log {path} (load lines: {load}; error lines: {error})",
            path=self.path,
            load=_listed(self.lines.load),
            error=_listed(self.lines.error),
        )
        stopped = self._loop.start(self._interval, now=True)
        stopped.addErrback(lambda f: log.failure("following the model log stopped", f))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._catch_up is not None and self._catch_up.active():
            self._catch_up.cancel()
        self._follower.close()

    def _tick(self) -> None:
        if self._catch_up is not None and self._catch_up.active():  # the loop came first
            self._catch_up.cancel()
        self._catch_up = None
        errors: list[str] = []
        in_traceback = False
        for line in self._follower.poll():
            if in_traceback and not line[:1].isspace() and line != _TRACEBACK:
                errors.append(line)  # the exception a traceback ends with
                in_traceback = False
            if any(text in line for text in self.lines.error if self._fatal(text)):
                log.error("model log: {line}", line=line)
                errors.append(line)
                in_traceback = _TRACEBACK in line
            elif _TRACEBACK in line and _TRACEBACK in self.lines.error:
                log.warn(
                    "model log: {line} (after the model loaded: a request failed in the "
                    "backend, not fatal)",
                    line=line,
                )
            elif not self.loaded and any(text in line for text in self.lines.load):
                log.info("model log: {line} (the model is loaded)", line=line)
                self._loaded()
            elif any(text in line for text in self.lines.info):
                self._info(line)
        self._flush_info()
        if self._follower.behind and self._loop.running and self._catch_up is None:
            self._catch_up = self._clock.callLater(0, self._tick)
        if errors:
            self._on_error(" | ".join(dict.fromkeys(errors))[:MAX_ERROR])

    def _fatal(self, text: str) -> bool:
        return text != _TRACEBACK or not (self.loaded or self._backend_ready)

    def _loaded(self) -> None:
        self.loaded = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # a cancelled wait
                waiter.callback(None)

    def _info(self, line: str) -> None:
        if self._pending_info:
            self._skipped += 1
        self._pending_info = line

    def _flush_info(self) -> None:
        now = self._clock.seconds()
        if not self._pending_info or now - self._info_at < INFO_EVERY:
            return
        if self._skipped:
            log.info(
                "model log: {line} ({skipped} earlier info lines not shown)",
                line=self._pending_info,
                skipped=self._skipped,
            )
        else:
            log.info("model log: {line}", line=self._pending_info)
        self._info_at, self._pending_info, self._skipped = now, "", 0


def _listed(texts: tuple[str, ...]) -> str:
    return ", ".join(repr(text) for text in texts) or "none"
