"""
The autoscaler down, hanging, answering 500 or answering something that is not HTTP: requests
keep being served meanwhile, reports resume once it recovers with nothing lost (the window
totals and every request_idx arrive, each exactly once), and what waits is bounded.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import (
    SignedWorker,
    TrackingFactory,
    http_client,
    listen,
    start_signed_worker,
    until,
)
from tests.test_reporter import FakeClient
from vast_vespa.outcome import Outcome
from vast_vespa.settings import VastEnvironment
from vast_vespa.worker.metrics import WorkerMetrics
from vast_vespa.worker.reporter import MetricsReporter
from vast_vespa.worker.state import WorkerState

PATHS = {b"/worker_status/", b"/delete_requests/"}
REQUESTS = 6  # served while the autoscaler is in trouble; request_idx 1..6, cost = idx


async def done(step: Awaitable[None] | None) -> None:
    """Wait for a fault step that may or may not be asynchronous."""
    if step is not None:
        await step


class Switch:
    """Serves a resource on 127.0.0.1 and can take it off the network (connection refused,
    open connections cut) and back on the same port."""

    def __init__(self, test: TestCase) -> None:
        self._factory: TrackingFactory | None = None
        self._port: Any = None
        self._number = 0
        test.addCleanup(self.down)

    def serve(self, resource: FakeAutoscaler) -> str:
        self._factory = TrackingFactory(Site(resource))
        self.up()
        return f"http://127.0.0.1:{self._number}"

    def up(self) -> None:
        assert self._factory is not None
        self._port = reactor.listenTCP(self._number, self._factory, interface="127.0.0.1")
        self._number = self._port.getHost().port

    async def down(self) -> None:
        port, self._port = self._port, None
        if port is None or self._factory is None:
            return
        await port.stopListening()
        for proto in list(self._factory.protocols):
            proto.transport.abortConnection()
        await gatherResults(self._factory.gone)


class AutoscalerFaultTests(TestCase):
    timeout = 30

    async def worker(self, **kwargs: Any) -> SignedWorker:
        backend = FakeBackend(reactor)
        return await start_signed_worker(
            self, listen(self, backend), report_interval=0.05, **kwargs
        )

    async def through_fault(
        self,
        worker: SignedWorker,
        start: Callable[[], Awaitable[None] | None],
        faulted: Callable[[], bool],
        end: Callable[[], Awaitable[None] | None],
    ) -> None:
        """Serve REQUESTS signed requests while the fault lasts (each must be a 200), wait
        until the reporter has met the fault, end it, and check that the autoscaler got
        everything exactly once."""
        metrics = worker.service.metrics
        reporter = worker.service.reporter
        await until(lambda: worker.autoscaler.statuses)  # reporting works before the fault
        await done(start())
        http = http_client(self)
        for idx in range(1, REQUESTS + 1):
            auth = worker.auth(cost=float(idx), request_idx=idx, reqnum=idx)
            body = json.dumps({"auth_data": auth, "payload": {}}).encode()
            response = await http.post(worker.url + "/ok", data=body)
            self.assertEqual(response.code, 200, "requests keep flowing during the fault")
            await response.content()
        await until(faulted)
        self.assertEqual(len(metrics.finished), REQUESTS, "nothing is forgotten meanwhile")
        await done(end())
        await until(lambda: not metrics.finished and not metrics.changed)
        await reporter.send_now()
        statuses = worker.autoscaler.statuses
        entries = worker.autoscaler.delete_entries()
        expected = {(idx, True): 1 for idx in range(1, REQUESTS + 1)}
        self.assertEqual(Counter(entries), Counter(expected))
        total = sum(range(1, REQUESTS + 1))
        self.assertEqual(sum(s["cur_perf"] for s in statuses), total)
        self.assertEqual(sum(s["new_load"] for s in statuses), total)
        self.assertEqual(statuses[-1]["cur_load"], 0)
        self.assertEqual(statuses[-1]["num_requests_recieved"], REQUESTS)

    def failing(self, worker: SignedWorker) -> Callable[[], bool]:
        """True once the reporter has failed twice in a row (it is backing off)."""
        return lambda: worker.service.reporter._failures >= 2

    async def test_down(self):
        """The autoscaler stops listening (connection refused) and comes back on its port."""
        switch = Switch(self)
        worker = await self.worker(serve=switch.serve)
        await self.through_fault(worker, switch.down, self.failing(worker), switch.up)

    async def test_answers_500(self):
        """Both report calls answer 500 for a while."""
        worker = await self.worker()
        codes = worker.autoscaler.codes

        def start() -> None:
            codes.update(dict.fromkeys(PATHS, 500))

        await self.through_fault(worker, start, self.failing(worker), codes.clear)

    async def test_answers_garbage(self):
        """Both report calls get bytes that are not HTTP and a closed connection."""
        worker = await self.worker()
        garbage = worker.autoscaler.garbage

        def start() -> None:
            garbage.update(PATHS)

        await self.through_fault(worker, start, self.failing(worker), garbage.clear)

    async def test_hangs(self):
        """The autoscaler takes a report call and does not answer until it recovers: exactly
        one send waits (the beat does not pile up sends) and requests are not held up."""
        worker = await self.worker()
        autoscaler = worker.autoscaler

        def start() -> None:
            autoscaler.hang.update(PATHS)

        await self.through_fault(
            worker, start, lambda: len(autoscaler.hung) == 1, autoscaler.release
        )
        self.assertEqual(autoscaler.hung, [])


class PartialFailureTests(TestCase):
    timeout = 30

    async def test_half_delivered_deletes_are_not_sent_twice(self):
        """The autoscaler takes the body of successful request_idx but answers 500 to the
        one of failed ones (DELETE_REQUESTS_FORMAT=batches sends the two apart): once it
        recovers, only the failed ones are sent again, so each request_idx arrives once."""
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(self, listen(self, backend), report_interval=0.05)
        autoscaler = worker.autoscaler
        autoscaler.refuse = lambda body: body.get("success") is False
        http = http_client(self)
        for idx, path in ((1, "/ok"), (2, "/status/500")):
            auth = worker.auth(cost=1.0, request_idx=idx, reqnum=idx)
            body = json.dumps({"auth_data": auth, "payload": {}}).encode()
            response = await http.post(worker.url + path, data=body)
            await response.content()
        await until(lambda: worker.service.reporter._failures >= 3)
        autoscaler.refuse = None
        await until(lambda: not worker.service.metrics.finished)
        await worker.service.reporter.send_now()
        self.assertEqual(
            Counter(autoscaler.delete_entries()), Counter({(1, True): 1, (2, False): 1})
        )


class Outage(FakeClient):
    """A FakeClient whose calls fail while ``down``."""

    down = False

    def _answer(self) -> Deferred[str]:
        return fail(ConnectionRefusedError()) if self.down else super()._answer()


class BoundedBacklogTests(SynchronousTestCase):
    def test_long_outage_keeps_memory_bounded(self):
        """During a long outage the finished request_idx waiting for /delete_requests/ stay
        within the backlog (the oldest are dropped, logged once per thousand, not once per
        request), the window totals stay O(1) and exact, and after recovery the kept ones are
        delivered exactly once."""
        clock = Clock()
        state = WorkerState()
        state.mark_loaded(0.0, 100.0)
        vast = VastEnvironment("t", ("http://a",), 1, "u")
        metrics = WorkerMetrics(clock, state, vast, "v", backlog=100)
        client = Outage()
        client.clock = clock
        reporter = MetricsReporter(clock, metrics, client, 1.0)  # type: ignore[arg-type]
        warnings: list[dict] = []

        def collect(event: dict) -> None:
            if event.get("log_level") is LogLevel.warn and "backlog" in event.get("log_format", ""):
                warnings.append(event)

        globalLogPublisher.addObserver(collect)
        self.addCleanup(globalLogPublisher.removeObserver, collect)
        client.down = True
        reporter.startService()
        for idx in range(1, 3001):
            metrics.finish(metrics.start(1.0, idx), Outcome.SERVED)
            self.assertLessEqual(len(metrics.finished), 100)
            if idx % 50 == 0:
                clock.advance(1)
        self.assertEqual(metrics.dropped, 2900)
        self.assertLessEqual(len(warnings), 4)
        client.down = False
        sent_before = len(client.statuses)
        clock.advance(10)
        self.assertEqual(client.statuses[sent_before][1]["cur_perf"], 3000)
        delivered = [e.request_idx for batch in client.deletes for e in batch]
        self.assertEqual(delivered, list(range(2901, 3001)))
        self.assertEqual(len(metrics.finished), 0)
        self.successResultOf(reporter.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])
