"""
One timer for a whole table of idle things (the server's client connections, the backend
client's pooled connections), instead of one per thing: a timer per connection was armed and
cancelled for every connection or request, work that showed under many short ones. The table
keeps its idle things oldest first; the sweep asks it to close what is due and comes back when
the next one is.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

# Timers may fire this early (float rounding): what is this close to its deadline goes.
TIMER_SLACK = 0.001


class IdleSweep:
    """``close_due(now)`` closes what is due by ``now`` and returns when the next thing left
    idle is due (None: nothing is left idle)."""

    def __init__(self, clock: IReactorTime, close_due: Callable[[float], float | None]) -> None:
        self._clock = clock
        self._close_due = close_due
        self._call: IDelayedCall | None = None

    def watch(self, delay: float) -> None:
        """Something went idle and is due in ``delay`` seconds. Whatever went idle before it
        is due sooner, so a sweep already armed comes first."""
        if self._call is None:
            self._call = self._clock.callLater(delay, self._sweep)

    def stop(self) -> None:
        """Nothing is idle any more: no timer left behind."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _sweep(self) -> None:
        self._call = None
        now = self._clock.seconds()
        due = self._close_due(now + TIMER_SLACK)
        if due is not None:
            self.stop()  # (in case closing made something else go idle meanwhile)
            self._call = self._clock.callLater(max(due - now, TIMER_SLACK), self._sweep)
