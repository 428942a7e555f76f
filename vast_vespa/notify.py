# -*- test-case-name: tests.test_notify -*-
"""
systemd's notify protocol (sd_notify(3)), written directly: one datagram of ``KEY=value``
lines to the unix socket named by ``$NOTIFY_SOCKET`` (``@name`` = abstract namespace).
``READY=1`` when the worker is loaded (or has failed to start and keeps reporting why),
``STOPPING=1`` on shutdown, ``STATUS=...`` for ``systemctl status``, and ``WATCHDOG=1`` from a
timer so that systemd restarts a worker whose reactor is stuck. Without ``$NOTIFY_SOCKET``
(not under systemd) every call does nothing.
"""

from __future__ import annotations

import socket

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class SystemdNotifier:
    """Sends notifications to systemd; never raises (a lost notification is logged once)."""

    _log = Logger()

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if systemd got them."""
        if not self._address:
            return False
        target = self._address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(assignments).encode("utf-8"), target)
        except OSError as e:
            if not self._warned:
                self._warned = True
                self._log.warn(
                    "cannot notify systemd at {address}: {error}", address=self._address, error=e
                )
            return False
        return True

    def ready(self) -> None:
        """The worker is loaded and serving: systemd considers the unit started."""
        self.send("READY=1", "STATUS=serving")

    def failed(self, message: str) -> None:
        """Start-up failed. The worker deliberately stays up, reporting the error to the
        autoscaler (the error beacon) and answering 503 with it, so systemd is told the unit
        started (no kill at TimeoutStartSec, no restart loop) and ``systemctl status`` shows
        why."""
        self.send("READY=1", _status(message))

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining")

    def status(self, text: str) -> None:
        """A one-line status for ``systemctl status``."""
        self.send(_status(text))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())


class SystemdService(MultiService):
    """
    The worker's systemd side while it runs: a watchdog timer (``WATCHDOG=1`` every half of
    ``WATCHDOG_USEC``), which keeps going while the worker drains. ``READY=1``, ``STOPPING=1``
    and ``STATUS=`` are sent by whoever knows (the lifecycle's start-up progress and loaded
    hook, the drain), through ``notifier``.
    """

    def __init__(self, notifier: SystemdNotifier, clock: IReactorTime, watchdog_usec: int = 0):
        super().__init__()
        self.notifier = notifier
        if notifier.enabled and watchdog_usec > 0:
            timer = TimerService(watchdog_usec / 2_000_000, notifier.watchdog)
            timer.clock = clock
            timer.setServiceParent(self)

    def stopService(self) -> object:
        stopped = super().stopService()
        self.notifier.close()
        return stopped
