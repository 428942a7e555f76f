# -*- test-case-name: tests.test_admission -*-
"""
Admission (PROTOCOL.md section 5): a request's workload, the estimated wait before the backend
gets to it, and the concurrency slots (FIFO when ALLOW_PARALLEL is false or MAX_CONCURRENCY is
set). No reactor: the in-flight load and the benchmarked throughput are read through callables.

A url-shape signature does not cover ``cost`` (PROTOCOL 3.2), so the workload a request claims
is bounded: never more than the worker serves within MAX_WAIT_TIME (:meth:`Admission.bound`,
clamped rather than refused, so that a genuine large request on an idle worker is still
served), and the request's own workload counts in its wait check.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger

# The workload ceiling when it cannot be derived (no benchmark, or MAX_WAIT_TIME 0): large
# enough for any real request in any benchmark's units, small enough that a forged cost
# cannot make the autoscaler's figures meaningless.
UNMEASURED_CEILING = 1e6
CLAMP_LOG_EVERY = 1000  # one log line per this many clamped costs


class BadCost(ValueError):
    """A cost that cannot be a workload (negative, NaN, infinite): 422."""


def workload(cost: float, default_cost: float | None) -> float:
    """The workload a request counts for: its cost, or DEFAULT_COST when cost <= 1 and set."""
    try:
        value = float(cost)
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if not math.isfinite(value) or value < 0:
        shown = repr(cost)
        if len(shown) > 40:
            shown = f"{shown[:20]}... ({len(shown)} characters)"
        raise BadCost(f"cost must be a finite number >= 0, got {shown}")
    if default_cost is not None and value <= 1:
        return default_cost
    return value


@dataclass
class TooBusy(Exception):
    """The estimated wait exceeds MAX_WAIT_TIME: 429."""

    wait: float
    limit: float

    @property
    def retry_after(self) -> int:
        """Whole seconds until the queue should have drained below the limit; never more than
        the limit itself (a client told to wait longer than MAX_WAIT_TIME would not come back,
        and an estimate that large only comes from a figure gone wrong)."""
        return max(1, min(math.ceil(self.wait - self.limit), math.ceil(self.limit)))


class Slot:
    """The right to talk to the backend; release it exactly once when the request is over."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._released()


class Admission:
    """Workload ceiling, wait-time check and concurrency slots for requests that passed
    authentication."""

    _log = Logger()

    def __init__(
        self,
        load: Callable[[], float],
        max_perf: Callable[[], float],
        max_wait_time: float,
        concurrency: int = 0,
    ) -> None:
        """
        @param load: workload in flight, queued requests included.
        @param max_perf: benchmarked throughput (workload units per second); <= 0 means not
            measured, and the wait check is skipped.
        @param max_wait_time: seconds; 0 turns the wait check off.
        @param concurrency: requests at the backend at once; 0 = no limit.
        """
        self._load = load
        self._max_perf = max_perf
        self._max_wait = max_wait_time
        self._free = concurrency
        self._limited = concurrency > 0
        self._queue: deque[Deferred[Slot]] = deque()
        self.clamped = 0  # costs cut down to the ceiling so far

    @property
    def queued(self) -> int:
        return len(self._queue)

    def ceiling(self) -> float:
        """The most workload one request counts for: what the worker serves within
        MAX_WAIT_TIME (max_perf x MAX_WAIT_TIME), or :data:`UNMEASURED_CEILING` when either
        is 0."""
        perf = self._max_perf()
        if perf > 0 and self._max_wait > 0:
            return perf * self._max_wait
        return UNMEASURED_CEILING

    def bound(self, work: float) -> float:
        """``work`` clamped to the :meth:`ceiling` (logged the first time and every
        :data:`CLAMP_LOG_EVERY` times after)."""
        ceiling = self.ceiling()
        if work <= ceiling:
            return work
        self.clamped += 1
        if self.clamped % CLAMP_LOG_EVERY == 1:
            self._log.info(
                "cost {cost:g} clamped to {ceiling:g}, the workload this worker serves within "
                "MAX_WAIT_TIME ({clamped} clamped so far)",
                cost=work,
                ceiling=ceiling,
                clamped=self.clamped,
            )
        return ceiling

    def estimated_wait(self, work: float = 0.0) -> float:
        """Seconds before the backend would be done with what is in flight plus ``work``."""
        perf = self._max_perf()
        return (self._load() + work) / perf if perf > 0 else 0.0

    def check(self, work: float = 0.0) -> None:
        """@param work: the request's own workload, which counts in its wait.
        @raise TooBusy: when the estimated wait is over MAX_WAIT_TIME."""
        if self._max_wait <= 0:
            return
        wait = self.estimated_wait(work)
        if wait > self._max_wait:
            raise TooBusy(wait, self._max_wait)

    def acquire(self) -> Slot | Deferred[Slot]:
        """A slot now, or a Deferred for one in FIFO order (cancelling it leaves the queue)."""
        if not self._limited:
            return Slot(self)
        if self._free > 0 and not self._queue:
            self._free -= 1
            return Slot(self)
        waiter: Deferred[Slot] = Deferred(self._left_queue)
        self._queue.append(waiter)
        return waiter

    def _left_queue(self, waiter: Deferred[Slot]) -> None:
        self._queue.remove(waiter)

    def _released(self) -> None:
        if not self._limited:
            return
        if self._queue:
            self._queue.popleft().callback(Slot(self))
        else:
            self._free += 1
