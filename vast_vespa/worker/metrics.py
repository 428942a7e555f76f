# -*- test-case-name: tests.test_metrics -*-
"""
The one metrics model (PROTOCOL.md 4.2-4.4). Every request that passed authentication ends in
exactly one of served, errored, cancelled or rejected, recorded exactly once; O(1) each.

Accounting choices (README "What is reported"):

- window counters are not zeroed after a send but reduced by what that send carried, so
  requests that finish while a report is on the wire are never lost, and nothing is reset
  while the autoscaler is unreachable;
- a backend answer with a 5xx status counts as errored (not in ``cur_perf``, ``success:
  false`` in /delete_requests/), so the autoscaler can see a broken model (the reference
  workers count it as served, PROTOCOL B29);
- ``loadtime`` is sent in every report once loaded (as the SDK does), so a lost report
  cannot lose it;
- ``num_requests_recieved`` counts the requests received since start (B34);
- the in-flight table is keyed by a per-request id, never by ``reqnum`` (B31);
- a ``request_idx`` belongs to the first request that brings it: a later request with an
  idx in flight or already finished is served and counted but never reported under it
  (a url-shape signature does not cover ``request_idx``, so a copied idx must not end
  another client's request in /delete_requests/ or turn its success into a failure).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from vast_vespa.outcome import CANCELLED, SERVED, Outcome
from vast_vespa.outcome import outcome_of as outcome_of  # re-exported: the gate imports it here
from vast_vespa.settings import VastEnvironment
from vast_vespa.worker.state import WorkerState

GIB = float(2**30)
# Finished request_idx kept for /delete_requests/ while the autoscaler is unreachable.
DELETE_BACKLOG = 100_000
DROP_LOG_EVERY = 1000  # one log line per this many dropped request_idx
# The status strings of the single-list /delete_requests/ body (PROTOCOL 4.6).
STATUS = {
    Outcome.SERVED: "Success",
    Outcome.ERRORED: "Error",
    Outcome.CANCELLED: "Cancelled",
    Outcome.REJECTED: "Rejected",
}


@dataclass
class Admitted:
    """One entry of the in-flight table (vast_vespa.worker.resource.InFlight is the drain's set of
    open requests, a different thing)."""

    workload: float
    request_idx: int | None
    entered: float  # wall time it was admitted (queued or not)
    started: float = 0.0  # wall time it got its turn at the backend


@dataclass
class Finished:
    """One entry for /delete_requests/ (one per reported request: not frozen, see
    :class:`vast_vespa.worker.envelope.Unwrapped`)."""

    seq: int
    request_idx: int
    success: bool
    status: str
    entered_queue_at: float
    work_started_at: float
    work_completed_at: float


@dataclass
class Window:
    """Workload totals since the last successful report."""

    received: float = 0.0
    served: float = 0.0
    errored: float = 0.0
    cancelled: float = 0.0
    rejected: float = 0.0

    def subtract(self, sent: Window) -> None:
        self.received -= sent.received
        self.served -= sent.served
        self.errored -= sent.errored
        self.cancelled -= sent.cancelled
        self.rejected -= sent.rejected


@dataclass(frozen=True)
class Report:
    """A /worker_status/ body and what to forget once it has been delivered."""

    body: dict[str, Any]
    window: Window
    disk_used: int
    changes: int


STATE_FIELDS = ("loadtime", "max_perf", "error_msg")  # what the worker's state sets in a report


def _state_fields(body: dict[str, Any]) -> tuple[object, ...]:
    return tuple(body[name] for name in STATE_FIELDS)


class WorkerMetrics:
    """Counters, in-flight table and finished queue; read by the reporter and admission."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        state: WorkerState,
        vast: VastEnvironment,
        version: str,
        disk_used: Callable[[], int] = lambda: 0,
        backlog: int = DELETE_BACKLOG,
    ) -> None:
        self._clock = clock
        self._state = state
        self._vast = vast
        self._version = version
        self._disk_used = disk_used
        self._backlog = backlog
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self.in_flight: dict[int, Admitted] = {}
        self.load = 0.0  # workload in flight, queued requests included
        self.window = Window()
        self.received_count = 0
        self.finished: deque[Finished] = deque()
        self.dropped = 0
        self._changes = 0  # bumped by every recorded event
        self._seen_changes = 0  # ...as of the last delivered report
        self._state_sent: tuple[object, ...] | None = None  # STATE_FIELDS of that report
        self._disk_sent: int | None = None
        self._idx_owners: dict[int, int] = {}  # request_idx in flight -> its owner's token
        self._idx_done: OrderedDict[int, None] = OrderedDict()  # the last finished, oldest first
        self.idx_copies = 0  # requests whose request_idx was someone else's

    # Recording (called by the gate)

    def start(self, workload: float, request_idx: int | None) -> int:
        """A request was admitted (it may still wait for a slot); returns its id."""
        token = next(self._ids)
        if request_idx is not None:
            if self._taken(request_idx):
                request_idx = None
            else:
                self._idx_owners[request_idx] = token
        self.in_flight[token] = Admitted(workload, request_idx, self._clock.seconds())
        self.load += workload
        self.window.received += workload
        self.received_count += 1
        self._changes += 1
        return token

    def working(self, token: int) -> None:
        """The request got its turn at the backend."""
        entry = self.in_flight.get(token)
        if entry is not None:
            entry.started = self._clock.seconds()

    def finish(self, token: int, outcome: Outcome) -> None:
        """The request is over; a second call for the same request does nothing."""
        entry = self.in_flight.pop(token, None)
        if entry is None:
            return
        self.load -= entry.workload
        if not self.in_flight:
            self.load = 0.0  # no float drift when idle
        w = entry.workload
        if outcome is SERVED:
            self.window.served += w
        elif outcome is CANCELLED:
            self.window.cancelled += w
        else:
            self.window.errored += w
        self._changes += 1
        if entry.request_idx is not None:
            del self._idx_owners[entry.request_idx]
        self._finished(entry.request_idx, outcome, entry.entered, entry.started)

    def reject(self, workload: float, request_idx: int | None) -> None:
        """An authenticated request refused by admission (429)."""
        self.window.rejected += workload
        self.received_count += 1
        self._changes += 1
        now = self._clock.seconds()
        if request_idx is not None and not self._taken(request_idx):
            self._finished(request_idx, Outcome.REJECTED, now, 0.0)

    def _taken(self, request_idx: int) -> bool:
        """Whether ``request_idx`` is another request's, in flight or finished lately."""
        if request_idx not in self._idx_owners and request_idx not in self._idx_done:
            return False
        self.idx_copies += 1
        if self.idx_copies % DROP_LOG_EVERY == 1:
            self._log.info(
                "request_idx {idx} arrived again: the request is served but not reported "
                "under it ({copies} such requests so far)",
                idx=request_idx,
                copies=self.idx_copies,
            )
        return True

    def _finished(
        self, request_idx: int | None, outcome: Outcome, entered: float, started: float
    ) -> None:
        if request_idx is None:
            return  # no auth_data, or someone else's request_idx: nothing to report
        self._idx_done[request_idx] = None
        if len(self._idx_done) > self._backlog:
            self._idx_done.popitem(last=False)
        if len(self.finished) >= self._backlog:
            oldest = self.finished.popleft()
            self.dropped += 1
            if self.dropped % DROP_LOG_EVERY == 1:  # a long outage must not flood the log
                self._log.warn(
                    "delete_requests backlog full ({limit}): dropped request_idx {idx} "
                    "({dropped} dropped so far)",
                    limit=self._backlog,
                    idx=oldest.request_idx,
                    dropped=self.dropped,
                )
        self.finished.append(
            Finished(
                next(self._seq),
                request_idx,
                outcome in (Outcome.SERVED, Outcome.CANCELLED),
                STATUS[outcome],
                entered,
                started,
                self._clock.seconds(),
            )
        )

    # Reporting (called by the reporter)

    def report(self) -> Report:
        """The /worker_status/ body, fields in wire order (PROTOCOL 4.2)."""
        state = self._state
        window = Window(**vars(self.window))
        disk = self._disk_used()
        previous = disk if self._disk_sent is None else self._disk_sent
        # The requests the autoscaler routed and that are still in flight, sessions included:
        # a request inside a session has no idx of its own and, as in the official worker, is
        # not among them (nor is a repeated idx), though its workload counts in cur_load.
        working = [e.request_idx for e in self.in_flight.values() if e.request_idx is not None]
        body: dict[str, Any] = {
            "id": self._vast.container_id or 0,
            "mtoken": self._vast.master_token,
            "version": self._version,
            "loadtime": state.loadtime if state.loaded else 0.0,
            "cur_load": max(self.load, 0.0),  # never a rounding -0.0000001
            "rej_load": window.rejected,
            "new_load": max(window.received - window.cancelled, 0.0),
            "error_msg": state.error_msg,
            "max_perf": state.max_perf,
            "cur_perf": window.served,
            "cur_capacity": 0,
            "max_capacity": 0,
            "num_requests_working": len(working),
            "num_requests_recieved": self.received_count,
            "additional_disk_usage": (disk - previous) / GIB,
            "working_request_idxs": working,
            "url": self._vast.public_url or "",
        }
        return Report(body, window, disk, self._changes)

    def reported(self, report: Report) -> None:
        """``report`` reached the autoscaler: forget what it carried."""
        self.window.subtract(report.window)
        self._disk_sent = report.disk_used
        self._seen_changes = max(self._seen_changes, report.changes)
        self._state_sent = _state_fields(report.body)

    @property
    def changed(self) -> bool:
        """Something happened that the autoscaler has not been told about: a request, or the
        worker's state (loaded, failed, unhealthy, recovered), so that a worker that just
        loaded gets traffic within a second, not at the next idle report."""
        if self._changes != self._seen_changes:
            return True
        state = self._state
        now = (state.loadtime if state.loaded else 0.0, state.max_perf, state.error_msg)
        return now != self._state_sent

    def pending_deletes(self, limit: int) -> list[Finished]:
        """The oldest finished requests not yet confirmed to the autoscaler."""
        return list(itertools.islice(self.finished, limit))

    def deleted(self, entries: Sequence[Finished]) -> None:
        """``entries`` (taken from :meth:`pending_deletes`) reached the autoscaler; the others
        stay in order. O(len of the batch they came from)."""
        seqs = {e.seq for e in entries}
        last = max(seqs, default=0)
        kept = []
        while self.finished and self.finished[0].seq <= last:
            entry = self.finished.popleft()
            if entry.seq not in seqs:
                kept.append(entry)
        self.finished.extendleft(reversed(kept))
