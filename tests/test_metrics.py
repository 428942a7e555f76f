"""The metrics model: every outcome counted once, reports in wire order, nothing lost."""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.memory import MemoryNetwork, memory_http
from vast_vespa.emulator.checks import delete_problems, report_problems
from vast_vespa.outcome import Outcome, RelayResult
from vast_vespa.settings import VastEnvironment
from vast_vespa.worker.autoscaler import AutoscalerClient
from vast_vespa.worker.metrics import WorkerMetrics, outcome_of
from vast_vespa.worker.state import WorkerState

WIRE_ORDER = [
    "id",
    "mtoken",
    "version",
    "loadtime",
    "cur_load",
    "rej_load",
    "new_load",
    "error_msg",
    "max_perf",
    "cur_perf",
    "cur_capacity",
    "max_capacity",
    "num_requests_working",
    "num_requests_recieved",
    "additional_disk_usage",
    "working_request_idxs",
    "url",
]
VAST = VastEnvironment("tok", ("http://a",), 4242, "http://203.0.113.7:43000")


def make(backlog: int = 100) -> tuple[Clock, WorkerState, WorkerMetrics, list[int]]:
    clock = Clock()
    state = WorkerState()
    disk = [0]
    metrics = WorkerMetrics(clock, state, VAST, "0.1.0", lambda: disk[0], backlog)
    return clock, state, metrics, disk


class RequestIdxTests(SynchronousTestCase):
    """A url-shape signature does not cover request_idx: the first request to bring an idx
    owns it, and a copy can neither end the owner's entry nor change its success flag."""

    def test_copy_in_flight_is_not_reported(self) -> None:
        _, _, metrics, _ = make()
        owner = metrics.start(10.0, 7)
        copy = metrics.start(10.0, 7)
        metrics.reject(10.0, 7)  # a 429 with the copied idx
        metrics.finish(copy, Outcome.ERRORED)
        self.assertEqual(list(metrics.finished), [])
        self.assertEqual(metrics.report().body["working_request_idxs"], [7])
        metrics.finish(owner, Outcome.SERVED)
        self.assertEqual([(f.request_idx, f.success) for f in metrics.finished], [(7, True)])
        self.assertEqual(metrics.idx_copies, 2)

    def test_copy_after_the_end_is_not_reported_again(self) -> None:
        _, _, metrics, _ = make()
        metrics.finish(metrics.start(1.0, 7), Outcome.SERVED)
        metrics.reject(1.0, 8)
        metrics.finish(metrics.start(1.0, 7), Outcome.ERRORED)
        metrics.reject(1.0, 8)
        self.assertEqual(
            [(f.request_idx, f.success) for f in metrics.finished], [(7, True), (8, False)]
        )
        self.assertEqual(metrics.report().body["num_requests_recieved"], 4)

    def test_finished_idx_forgotten_beyond_the_backlog(self) -> None:
        """The set of finished idx is bounded like the backlog."""
        _, _, metrics, _ = make(backlog=2)
        for idx in (1, 2, 3):
            metrics.reject(1.0, idx)
        metrics.reject(1.0, 1)
        self.assertEqual([f.request_idx for f in metrics.finished], [3, 1])


class MetricsTests(SynchronousTestCase):
    def test_wire_order_and_identity(self) -> None:
        """The body has every /worker_status/ field in the reference order."""
        _, state, metrics, _ = make()
        body = metrics.report().body
        self.assertEqual(list(body), WIRE_ORDER)
        self.assertEqual((body["id"], body["mtoken"], body["url"]), (4242, "tok", VAST.public_url))
        self.assertEqual(body["loadtime"], 0.0)
        state.mark_loaded(12.5, 90.0)
        body = metrics.report().body
        self.assertEqual((body["loadtime"], body["max_perf"]), (12.5, 90.0))
        # loadtime goes out in every report once loaded
        metrics.reported(metrics.report())
        self.assertEqual(metrics.report().body["loadtime"], 12.5)

    def test_every_outcome_counts_once(self) -> None:
        """served, errored, cancelled, rejected: each lands in its window counter once;
        in-flight entries are keyed per request, so equal reqnums do not collapse."""
        _, _, metrics, _ = make()
        a, b, c = metrics.start(10, 1), metrics.start(20, 2), metrics.start(30, 3)
        d = metrics.start(5, 4)
        body = metrics.report().body
        self.assertEqual((body["cur_load"], body["num_requests_working"]), (65, 4))
        self.assertEqual(body["working_request_idxs"], [1, 2, 3, 4])
        _, _, other, _ = make()
        other.start(10, 1)
        other.start(7, None)  # a request inside a session: no idx of its own
        body = other.report().body
        self.assertEqual((body["cur_load"], body["num_requests_working"]), (17, 1))
        self.assertEqual(report_problems(body), [])  # as the emulator reads it
        metrics.finish(a, Outcome.SERVED)
        metrics.finish(a, Outcome.ERRORED)  # ignored: already finished
        metrics.finish(b, Outcome.ERRORED)
        metrics.finish(c, Outcome.CANCELLED)
        metrics.finish(d, Outcome.SERVED)
        metrics.reject(40, 5)
        body = metrics.report().body
        self.assertEqual(body["cur_perf"], 15)
        self.assertEqual(body["rej_load"], 40)
        self.assertEqual(body["new_load"], 65 - 30)
        self.assertEqual(body["cur_load"], 0)
        self.assertEqual(body["num_requests_recieved"], 5)
        flags = {f.request_idx: (f.success, f.status) for f in metrics.finished}
        self.assertEqual(
            flags,
            {
                1: (True, "Success"),
                2: (False, "Error"),
                3: (True, "Cancelled"),
                4: (True, "Success"),
                5: (False, "Rejected"),
            },
        )

    def test_backend_5xx_is_an_error(self) -> None:
        """A 5xx answer from the backend counts as errored; 4xx as served."""
        self.assertIs(outcome_of(RelayResult(Outcome.SERVED, 503)), Outcome.ERRORED)
        self.assertIs(outcome_of(RelayResult(Outcome.SERVED, 404)), Outcome.SERVED)
        self.assertIs(outcome_of(RelayResult(Outcome.CANCELLED, 0)), Outcome.CANCELLED)

    def test_window_forgets_only_what_was_delivered(self) -> None:
        """After a delivered report only what it carried is subtracted: requests finishing
        while it was on the wire show in the next one; an undelivered one loses nothing."""
        _, _, metrics, disk = make()
        metrics.finish(metrics.start(10, 1), Outcome.SERVED)
        self.assertTrue(metrics.changed)
        first = metrics.report()
        metrics.finish(metrics.start(7, 2), Outcome.SERVED)  # during the send
        disk[0] = 2**30
        metrics.reported(first)
        self.assertTrue(metrics.changed)
        second = metrics.report()
        self.assertEqual(second.body["cur_perf"], 7)
        self.assertEqual(second.body["additional_disk_usage"], 1.0)
        # not delivered: the same again
        self.assertEqual(metrics.report().body["cur_perf"], 7)
        metrics.reported(second)
        self.assertFalse(metrics.changed)
        body = metrics.report().body
        self.assertEqual((body["cur_perf"], body["new_load"]), (0, 0))
        self.assertEqual(body["additional_disk_usage"], 0.0)

    def test_deletes_confirmed_by_sequence(self) -> None:
        """Confirmed entries leave the queue, later ones stay."""
        _, _, metrics, _ = make()
        for idx in range(5):
            metrics.reject(1, idx)
        batch = metrics.pending_deletes(3)
        metrics.deleted(batch)
        self.assertEqual([f.request_idx for f in metrics.finished], [3, 4])

    def test_deletes_confirmed_out_of_order(self) -> None:
        """Confirming some entries of a batch (one success flag) keeps the others, in order."""
        _, _, metrics, _ = make()
        for idx in range(5):
            metrics.reject(1, idx)
        batch = metrics.pending_deletes(4)
        metrics.deleted([batch[0], batch[2]])
        self.assertEqual([f.request_idx for f in metrics.finished], [1, 3, 4])
        metrics.deleted([])
        self.assertEqual(len(metrics.finished), 3)

    def test_backlog_is_bounded(self) -> None:
        """Past the backlog limit the oldest entries are dropped, with a log line."""
        _, _, metrics, _ = make(backlog=3)
        for idx in range(5):
            metrics.reject(1, idx)
        self.assertEqual([f.request_idx for f in metrics.finished], [2, 3, 4])
        self.assertEqual(metrics.dropped, 2)

    def test_unsecured_requests_are_not_deleted(self) -> None:
        """Requests without auth_data count in the load but send no request_idx."""
        _, _, metrics, _ = make()
        metrics.finish(metrics.start(1, None), Outcome.SERVED)
        self.assertEqual(len(metrics.finished), 0)
        self.assertEqual(metrics.report().body["cur_perf"], 1)


class ConformanceTests(SynchronousTestCase):
    def test_bodies_pass_the_emulator_checks(self) -> None:
        """Reports and both /delete_requests/ forms pass the autoscaler emulator's
        conformance checks (PROTOCOL 4.2, 4.6), busy or idle."""
        _, state, metrics, _ = make()
        self.assertEqual(report_problems(metrics.report().body), [])
        state.mark_loaded(1.5, 20.0)
        tokens = [metrics.start(0.1, idx) for idx in range(3)]
        self.assertEqual(report_problems(metrics.report().body), [])
        for token, outcome in zip(
            tokens, (Outcome.SERVED, Outcome.ERRORED, Outcome.CANCELLED), strict=True
        ):
            metrics.finish(token, outcome)
        metrics.reject(2, 9)
        self.assertEqual(report_problems(metrics.report().body), [])
        for form in ("batches", "list"):
            http, clock = memory_http(MemoryNetwork()), Clock()  # neither used for the bodies
            client = AutoscalerClient(http, clock, ("http://a",), "t", 4242, delete_format=form)
            for body in client.delete_bodies(list(metrics.finished)):
                self.assertEqual(delete_problems(json.loads(body)), [])
