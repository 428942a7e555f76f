# -*- test-case-name: tests.test_reporter -*-
"""
The reporter (PROTOCOL.md 4.5, 4.6): a LoopingCall that, from process start, sends
/worker_status/ each tick when something changed and at least every ``idle_interval`` otherwise
(while loading too), and /delete_requests/ for finished requests on the next tick.

A tick never waits for the autoscaler: a send runs in the background (one at a time, each call
bounded by the client's timeout), so a slow or hung autoscaler delays neither requests nor the
beat. After a failed send the next one waits with exponential backoff; nothing is forgotten
until a send succeeded.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from vast_vespa.worker.autoscaler import AutoscalerClient
from vast_vespa.worker.metrics import WorkerMetrics

IDLE_INTERVAL = 10.0  # seconds between reports when nothing changed
MAX_BACKOFF = 10.0  # seconds, upper bound of the wait after failed sends
DELETE_BATCH = 1000  # request_idx per /delete_requests/ call


class MetricsReporter(Service):
    """Sends the metrics to the autoscaler; ``send_now()`` for the final report on drain."""

    name = "reporter"
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        metrics: WorkerMetrics,
        client: AutoscalerClient,
        interval: float = 1.0,
        idle_interval: float = IDLE_INTERVAL,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._client = client
        self._interval = interval
        self._idle = idle_interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._last_sent: float | None = None  # clock time of the last delivered status
        self._failures = 0
        self._not_before = 0.0
        self._sending: Deferred[None] | None = None
        self._failing = False  # log the first failure of a run loudly, the others quietly

    def startService(self) -> None:
        super().startService()
        self._log.info("reporting to the autoscaler at {where}", where=self._client.describe())
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None]:
        """Stop the beat; send what is still unsent (requests that ended during the drain)
        once more, bounded by the client's timeout."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._idle_now().addCallback(lambda _: self._last_send())

    def _last_send(self) -> Deferred[None]:
        if self._metrics.changed or self._metrics.finished:
            self._start(True)
        return self._idle_now()

    def _idle_now(self) -> Deferred[None]:
        """Fires once no send is in flight (sends are bounded by the client's timeout)."""
        if self._sending is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._sending.addBoth(lambda _: done.callback(None))
        return done

    def _status_due(self, now: float) -> bool:
        if self._last_sent is None or now - self._last_sent >= self._idle:
            return True
        return self._metrics.changed

    def _tick(self) -> None:
        now = self._clock.seconds()
        if self._sending is not None or now < self._not_before:
            return
        status = self._status_due(now)
        if status or self._metrics.finished:
            self._start(status)

    def send_now(self) -> Deferred[None]:
        """Send a status report (and pending deletes) now, after any send in flight."""
        done: Deferred[None] = Deferred()

        def go(_: object) -> None:
            if self._sending is None:
                self._start(True)
            self._idle_now().chainDeferred(done)

        self._idle_now().addCallback(go)
        return done

    def _start(self, status: bool) -> None:
        sending = Deferred.fromCoroutine(self._send(status))
        self._sending = sending
        sending.addErrback(self._failed)
        sending.addBoth(self._sent)

    async def _send(self, status: bool) -> None:
        metrics = self._metrics
        if status:
            report = metrics.report()
            await self._client.post_status(report.body)
            metrics.reported(report)
            self._last_sent = self._clock.seconds()
        while metrics.finished:
            # One body per call, each confirmed on its own: after a partial failure only
            # what was not delivered is sent again (never a request_idx twice).
            for group in self._client.delete_groups(metrics.pending_deletes(DELETE_BATCH)):
                await self._client.post_deletes(group)
                metrics.deleted(group)
        if self._failing:
            self._log.info("autoscaler reachable again")
        self._failures = 0
        self._failing = False

    def _failed(self, failure: Failure) -> None:
        self._failures += 1
        doublings = min(self._failures - 1, 30)  # 2**1024 is beyond any float: a long outage
        delay = min(self._interval * 2**doublings, MAX_BACKOFF)
        self._not_before = self._clock.seconds() + delay
        emit = self._log.debug if self._failing else self._log.warn
        self._failing = True
        emit(
            "autoscaler report failed ({reason}); next try in {delay:g} s, nothing is lost",
            reason=failure.getErrorMessage(),
            delay=delay,
        )

    def _sent(self, _: object) -> None:
        self._sending = None
