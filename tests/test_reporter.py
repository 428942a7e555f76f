"""The reporter: cadence, backoff, no loss while the autoscaler is down, hung autoscalers."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.outcome import Outcome
from vast_vespa.settings import VastEnvironment
from vast_vespa.worker.metrics import Finished, WorkerMetrics
from vast_vespa.worker.reporter import MAX_BACKOFF, MetricsReporter
from vast_vespa.worker.state import WorkerState


class FakeClient:
    """Stands in for AutoscalerClient: records calls, answers with ``answers`` (or success)."""

    def __init__(self) -> None:
        self.statuses: list[tuple[float, dict[str, Any]]] = []
        self.deletes: list[list[Finished]] = []
        self.answers: list[Deferred[str]] = []
        self.clock: Clock | None = None

    def describe(self) -> str:
        return "http://a"

    def _answer(self) -> Deferred[str]:
        return self.answers.pop(0) if self.answers else succeed("http://a")

    def post_status(self, body: dict[str, Any]) -> Deferred[str]:
        assert self.clock is not None
        self.statuses.append((self.clock.seconds(), body))
        return self._answer()

    def delete_groups(self, entries: list[Finished]) -> list[list[Finished]]:
        return [list(entries)] if entries else []

    def post_deletes(self, entries: list[Finished]) -> Deferred[str]:
        self.deletes.append(list(entries))
        return self._answer()


def make() -> tuple[Clock, WorkerState, WorkerMetrics, FakeClient, MetricsReporter]:
    clock = Clock()
    state = WorkerState()
    metrics = WorkerMetrics(clock, state, VastEnvironment("t", ("http://a",), 1, "u"), "v")
    client = FakeClient()
    client.clock = clock
    reporter = MetricsReporter(clock, metrics, client, 1.0)  # type: ignore[arg-type]
    return clock, state, metrics, client, reporter


def advance(clock: Clock, seconds: int) -> None:
    for _ in range(seconds):
        clock.advance(1)


class CadenceTests(SynchronousTestCase):
    def tearDown(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def stop(self, reporter: MetricsReporter) -> None:
        self.successResultOf(reporter.stopService())

    def test_reports_from_start_every_10_s_while_loading(self) -> None:
        """The first report goes out at start, then every 10 s while nothing changes (also
        while the model is still loading)."""
        self.clock, _state, _, client, reporter = make()
        reporter.startService()
        advance(self.clock, 25)
        self.assertEqual([t for t, _ in client.statuses], [0, 10, 20])
        self.assertEqual(client.statuses[0][1]["max_perf"], 0.0)
        self.stop(reporter)

    def test_each_second_when_something_changed(self) -> None:
        """A change is reported on the next tick; deletes follow within a second."""
        self.clock, state, metrics, client, reporter = make()
        state.mark_loaded(3.0, 100.0)
        reporter.startService()
        advance(self.clock, 2)
        token = metrics.start(5, 77)
        advance(self.clock, 1)
        self.assertEqual([t for t, _ in client.statuses], [0, 3])
        self.assertEqual(client.statuses[-1][1]["cur_load"], 5)
        metrics.finish(token, Outcome.SERVED)
        advance(self.clock, 1)
        self.assertEqual(client.statuses[-1], (4, client.statuses[-1][1]))
        self.assertEqual(client.statuses[-1][1]["cur_perf"], 5)
        self.assertEqual([[e.request_idx for e in d] for d in client.deletes], [[77]])
        self.assertEqual(len(metrics.finished), 0)
        advance(self.clock, 5)
        self.assertEqual(len(client.statuses), 3)  # nothing changed since
        self.stop(reporter)

    def test_state_changes_reported_on_the_next_tick(self) -> None:
        """Loading, a start-up or health error and its recovery reach the autoscaler on the
        next tick (so a worker that just loaded gets traffic at once), not 10 s later."""
        self.clock, state, _, client, reporter = make()
        reporter.startService()
        advance(self.clock, 3)
        state.mark_loaded(3.0, 100.0)
        advance(self.clock, 1)
        state.mark_errored("backend unhealthy")
        advance(self.clock, 1)
        state.error_msg = ""
        advance(self.clock, 3)
        sent = [(t, b["loadtime"], b["max_perf"], b["error_msg"]) for t, b in client.statuses]
        self.assertEqual(
            sent,
            [
                (0, 0.0, 0.0, ""),
                (4, 3.0, 100.0, ""),
                (5, 3.0, 100.0, "backend unhealthy"),
                (6, 3.0, 100.0, ""),
            ],
        )
        self.stop(reporter)

    def test_nothing_lost_while_the_autoscaler_is_down(self) -> None:
        """Failed sends keep the window and the deletes; retries back off (1, 2, 4 s); the
        first delivered report carries everything."""
        self.clock, _state, metrics, client, reporter = make()
        client.answers = [fail(ConnectionRefusedError()) for _ in range(3)]
        metrics.finish(metrics.start(10, 1), Outcome.SERVED)
        metrics.reject(4, 2)
        reporter.startService()  # t=0 fails
        advance(self.clock, 8)
        self.assertEqual([t for t, _ in client.statuses], [0, 1, 3, 7])
        delivered = client.statuses[-1][1]
        self.assertEqual((delivered["cur_perf"], delivered["rej_load"]), (10, 4))
        self.assertEqual(delivered["new_load"], 10)
        self.assertEqual(
            {e.request_idx: e.success for e in client.deletes[-1]}, {1: True, 2: False}
        )
        advance(self.clock, 1)
        self.assertEqual(len(client.statuses), 4)
        self.stop(reporter)

    def test_long_outage_keeps_backing_off(self) -> None:
        """Hours of failures (over a thousand in a row) keep the retries MAX_BACKOFF apart:
        the doubling stops at the cap instead of overflowing into a retry every second."""
        self.clock, _state, _metrics, client, reporter = make()
        client.answers = [fail(ConnectionRefusedError()) for _ in range(1100)]
        reporter.startService()
        while len(client.statuses) < 1100:
            self.clock.advance(1)
        times = [t for t, _ in client.statuses]
        self.assertEqual({b - a for a, b in itertools.pairwise(times[1000:])}, {MAX_BACKOFF})
        self.stop(reporter)

    def test_failed_deletes_are_kept(self) -> None:
        """A failed /delete_requests/ keeps its entries for the next try."""
        self.clock, _state, metrics, client, reporter = make()
        reporter.startService()
        metrics.reject(1, 9)
        client.answers = [succeed("a"), fail(ConnectionRefusedError())]
        advance(self.clock, 1)
        self.assertEqual(len(metrics.finished), 1)
        advance(self.clock, 2)
        self.assertEqual(len(metrics.finished), 0)
        self.assertEqual([[e.request_idx for e in d] for d in client.deletes], [[9], [9]])
        self.stop(reporter)

    def test_hung_autoscaler_blocks_neither_requests_nor_the_beat(self) -> None:
        """While a send hangs, ticks do not pile up sends and requests are recorded as
        usual; once it ends, the next report carries what happened meanwhile."""
        self.clock, _state, metrics, client, reporter = make()
        hung: Deferred[str] = Deferred()
        client.answers = [hung]
        reporter.startService()
        for second in range(5):
            metrics.finish(metrics.start(1, second), Outcome.SERVED)
            self.clock.advance(1)
        self.assertEqual(len(client.statuses), 1)
        hung.errback(ConnectionRefusedError())  # the client's timeout fires
        advance(self.clock, 2)
        self.assertEqual(client.statuses[-1][1]["cur_perf"], 5)
        self.assertEqual(len(client.deletes[-1]), 5)
        self.stop(reporter)

    def test_stop_waits_for_the_send_in_flight(self) -> None:
        """Stopping waits for a send in flight (bounded by the client's timeout)."""
        self.clock, _state, _metrics, client, reporter = make()
        hung: Deferred[str] = Deferred()
        client.answers = [hung]
        reporter.startService()
        stopped = reporter.stopService()
        self.assertNoResult(stopped)
        hung.callback("a")
        self.successResultOf(stopped)

    def test_stop_sends_what_is_left(self) -> None:
        """Stopping sends what happened since the last report (the end of a drain)."""
        self.clock, _state, metrics, client, reporter = make()
        reporter.startService()
        metrics.finish(metrics.start(4, 8), Outcome.SERVED)
        self.stop(reporter)
        self.assertEqual(client.statuses[-1][1]["cur_perf"], 4)
        self.assertEqual([e.request_idx for e in client.deletes[-1]], [8])

    def test_send_now(self) -> None:
        """send_now() reports at once (after a send in flight), for the drain."""
        self.clock, state, metrics, client, reporter = make()
        hung: Deferred[str] = Deferred()
        client.answers = [hung]
        reporter.startService()
        state.draining = True
        metrics.reject(3, 1)
        sent = reporter.send_now()
        self.assertNoResult(sent)
        hung.callback("a")
        self.successResultOf(sent)
        self.assertEqual(len(client.statuses), 2)
        self.assertEqual(client.statuses[-1][1]["rej_load"], 3)
        self.stop(reporter)
