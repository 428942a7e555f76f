"""Admission: workload, the wait estimate against MAX_WAIT_TIME, and concurrency slots."""

from __future__ import annotations

import math
from typing import cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.worker.admission import (
    UNMEASURED_CEILING,
    Admission,
    BadCost,
    Slot,
    TooBusy,
    workload,
)


class WorkloadTests(SynchronousTestCase):
    def test_cost_is_the_workload(self) -> None:
        """The cost is the workload; DEFAULT_COST replaces a cost <= 1 when it is set."""
        self.assertEqual(workload(256.0, None), 256.0)
        self.assertEqual(workload(100, 50.0), 100.0)
        self.assertEqual(workload(1, 50.0), 50.0)
        self.assertEqual(workload(0, 50.0), 50.0)
        self.assertEqual(workload(1, None), 1.0)

    def test_bad_costs(self) -> None:
        """Negative, NaN or infinite costs are refused, and so is an integer beyond any float
        (it raised OverflowError: a 500), named in a detail of bounded length."""
        for bad in (-1, math.nan, math.inf, -math.inf, 10**400, -(10**400)):
            self.assertRaises(BadCost, workload, bad, 100.0)
        detail = str(self.assertRaises(BadCost, workload, 10**4000, None))
        self.assertLess(len(detail), 100)
        self.assertIn("4001 characters", detail)


class WaitTests(SynchronousTestCase):
    def test_over_the_limit_is_too_busy(self) -> None:
        """Wait = load / max_perf; over MAX_WAIT_TIME is TooBusy with a Retry-After."""
        load = [0.0]
        admission = Admission(lambda: load[0], lambda: 10.0, 5.0)
        admission.check()  # idle: any single request gets in
        load[0] = 50.0
        admission.check()  # exactly 5 s: still fine
        load[0] = 72.0
        with self.assertRaises(TooBusy) as caught:
            admission.check()
        self.assertAlmostEqual(caught.exception.wait, 7.2)
        self.assertEqual(caught.exception.retry_after, 3)

    def test_own_workload_counts(self) -> None:
        """The request's own workload is part of its wait: one that would take the queue past
        MAX_WAIT_TIME is refused even when what is in flight alone is under it."""
        admission = Admission(lambda: 40.0, lambda: 10.0, 5.0)
        admission.check(10.0)  # (40 + 10) / 10 = 5 s: fine
        with self.assertRaises(TooBusy) as caught:
            admission.check(30.0)
        self.assertAlmostEqual(caught.exception.wait, 7.0)

    def test_retry_after_capped(self) -> None:
        """Retry-After never exceeds MAX_WAIT_TIME (rounded up), whatever the estimate."""
        self.assertEqual(TooBusy(1e15, 10.0).retry_after, 10)
        self.assertEqual(TooBusy(1e15, 2.5).retry_after, 3)
        self.assertEqual(TooBusy(10.2, 10.0).retry_after, 1)

    def test_workload_bounded_by_what_is_served_within_max_wait(self) -> None:
        """A claimed workload is clamped to max_perf x MAX_WAIT_TIME (a fixed ceiling when
        either is 0), so that on an idle worker the clamped request is still admitted."""
        admission = Admission(lambda: 0.0, lambda: 10.0, 5.0)
        self.assertEqual(admission.ceiling(), 50.0)
        self.assertEqual(admission.bound(20.0), 20.0)
        self.assertEqual(admission.bound(1e15), 50.0)
        self.assertEqual(admission.clamped, 1)
        admission.check(admission.bound(1e15))  # idle: still admitted
        self.assertEqual(Admission(lambda: 0.0, lambda: 0.0, 5.0).bound(1e15), UNMEASURED_CEILING)
        self.assertEqual(Admission(lambda: 0.0, lambda: 9.0, 0.0).bound(1e15), UNMEASURED_CEILING)

    def test_not_benchmarked_or_off(self) -> None:
        """Without a benchmark (max_perf 0), or with MAX_WAIT_TIME 0, nothing is refused."""
        Admission(lambda: 1e9, lambda: 0.0, 5.0).check()
        Admission(lambda: 1e9, lambda: 1.0, 0.0).check()


class SlotTests(SynchronousTestCase):
    def test_unlimited(self) -> None:
        """No limit: every request gets a slot at once."""
        admission = Admission(lambda: 0.0, lambda: 1.0, 10.0, 0)
        slots = [admission.acquire() for _ in range(100)]
        self.assertTrue(all(isinstance(s, Slot) for s in slots))

    def test_one_at_a_time_fifo(self) -> None:
        """With one slot, waiting requests get their turn in arrival order."""
        admission = Admission(lambda: 0.0, lambda: 1.0, 10.0, 1)
        first = admission.acquire()
        assert isinstance(first, Slot)
        order: list[tuple[int, Slot]] = []

        def record(slot: Slot, index: int) -> None:
            order.append((index, slot))

        waiting = [admission.acquire() for _ in range(3)]
        for index, d in enumerate(waiting):
            assert isinstance(d, Deferred)
            d.addCallback(record, index)
        self.assertEqual(admission.queued, 3)
        first.release()
        first.release()  # a second release does nothing
        self.assertEqual([i for i, _ in order], [0])
        order[0][1].release()
        order[1][1].release()
        self.assertEqual([i for i, _ in order], [0, 1, 2])
        order[2][1].release()
        self.assertIsInstance(admission.acquire(), Slot)

    def test_n_at_a_time(self) -> None:
        """MAX_CONCURRENCY=N: N run at once, the next waits."""
        admission = Admission(lambda: 0.0, lambda: 1.0, 10.0, 2)
        a, b = admission.acquire(), admission.acquire()
        self.assertIsInstance(a, Slot)
        self.assertIsInstance(b, Slot)
        c = admission.acquire()
        assert isinstance(c, Deferred)
        self.assertNoResult(c)
        cast(Slot, b).release()
        self.assertIsInstance(self.successResultOf(c), Slot)

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """A waiting request whose client left is removed and never gets a slot."""
        admission = Admission(lambda: 0.0, lambda: 1.0, 10.0, 1)
        first = admission.acquire()
        assert isinstance(first, Slot)
        gone, stays = admission.acquire(), admission.acquire()
        assert isinstance(gone, Deferred) and isinstance(stays, Deferred)
        gone.cancel()
        self.failureResultOf(gone, CancelledError)
        self.assertEqual(admission.queued, 1)
        first.release()
        self.assertIsInstance(self.successResultOf(stays), Slot)
