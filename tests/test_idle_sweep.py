"""IdleSweep: one timer for a table of idle things, on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.net.idle_sweep import IdleSweep


class IdleSweepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.due: list[float] = []  # when each idle thing is due, oldest first
        self.closed: list[float] = []
        self.sweep = IdleSweep(self.clock, self.close_due)

    def close_due(self, now: float) -> float | None:
        while self.due and self.due[0] <= now:
            self.closed.append(self.due.pop(0))
        return self.due[0] if self.due else None

    def idle(self, timeout: float) -> None:
        self.due.append(self.clock.seconds() + timeout)
        self.sweep.watch(timeout)

    def test_each_closes_when_due_on_one_timer(self) -> None:
        self.idle(10)
        self.clock.advance(3)
        self.idle(10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(7)
        self.assertEqual(self.closed, [10])
        self.clock.advance(3)
        self.assertEqual(self.closed, [10, 13])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_leaves_no_timer(self) -> None:
        self.idle(10)
        self.due.clear()  # the table has nothing idle any more
        self.sweep.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.idle(5)  # watched again
        self.clock.advance(5)
        self.assertEqual(len(self.closed), 1)

    def test_something_going_idle_during_a_sweep_leaves_one_timer(self) -> None:
        """If closing makes something else go idle, the sweep still comes back once, when
        the oldest left is due."""
        closing = self.close_due

        def close_and_go_idle(now: float) -> float | None:
            next_due = closing(now)
            if self.closed == [10, 10]:
                self.idle(30)  # watch() from inside the sweep
                next_due = self.due[0]
            return next_due

        self.sweep = IdleSweep(self.clock, close_and_go_idle)
        self.idle(10)
        self.idle(10)
        self.clock.advance(10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(30)
        self.assertEqual(self.closed, [10, 10, 40])
        self.assertEqual(self.clock.getDelayedCalls(), [])
