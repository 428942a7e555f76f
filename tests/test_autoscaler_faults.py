"""
The autoscaler down, hanging, answering 500 or answering something that is not HTTP: requests
keep being served meanwhile, reports resume once it recovers with nothing lost (the window
totals and every request_idx arrive, each exactly once), and what waits is bounded. In
memory (tests/memory.py), then the autoscaler down and back through real sockets.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from zope.interface import provider

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import (
    TrackingFactory,
    http_client,
    listen,
    listen_tcp,
    logged,
    start_signed_worker,
)
from tests.memory import AUTOSCALER_URL, MemoryWorker
from tests.test_reporter import FakeClient
from vast_vespa.outcome import Outcome
from vast_vespa.settings import VastEnvironment
from vast_vespa.worker.metrics import WorkerMetrics
from vast_vespa.worker.reporter import MetricsReporter
from vast_vespa.worker.state import WorkerState

PATHS = {b"/worker_status/", b"/delete_requests/"}
REQUESTS = 6  # served while the autoscaler is in trouble; request_idx 1..6, cost = idx


class Switch:
    """Serves a resource on 127.0.0.1 and can take it off the network (connection refused,
    open connections cut) and back on the same port."""

    def __init__(self, test: TestCase) -> None:
        self._factory: TrackingFactory | None = None
        self._port: tcp.Port | None = None
        self._number = 0
        test.addCleanup(self.down)

    def serve(self, resource: FakeAutoscaler) -> str:
        self._factory = TrackingFactory(Site(resource))
        self.up()
        return f"http://127.0.0.1:{self._number}"

    def up(self) -> None:
        assert self._factory is not None
        self._port = listen_tcp(self._factory, self._number)
        self._number = self._port.getHost().port

    async def down(self) -> None:
        port, self._port = self._port, None
        if port is None or self._factory is None:
            return
        await port.stopListening()
        for proto in list(self._factory.protocols):
            proto.transport.abortConnection()
        await gatherResults(self._factory.gone)


class AutoscalerFaultTests(SynchronousTestCase):
    """Each fault in memory (tests/memory.py), the reporter beating every second."""

    def worker(self) -> MemoryWorker:
        worker = MemoryWorker(self)
        worker.reporter.startService()
        self.addCleanup(worker.reporter.stopService)
        return worker

    def status_attempts(self, worker: MemoryWorker) -> int:
        return sum(uri.endswith(b"/worker_status/") for uri in worker.network.requested)

    def through_fault(
        self,
        worker: MemoryWorker,
        start: Callable[[], None],
        faulted: Callable[[], bool],
        end: Callable[[], None],
    ) -> None:
        """Serve REQUESTS signed requests while the fault lasts (each must be a 200), one
        every half second so that the reporter meets the fault meanwhile (4 s in all: before
        the client's 5 s timeout), end it, and check that the autoscaler got everything
        exactly once."""
        metrics = worker.metrics
        worker.flush()
        self.assertEqual(len(worker.autoscaler.statuses), 1)  # reporting works before the fault
        start()
        for idx in range(1, REQUESTS + 1):
            auth = worker.auth(cost=float(idx), request_idx=idx, reqnum=idx)
            answer = worker.post("/ok", {"auth_data": auth, "payload": {}})
            self.assertEqual(answer.code, 200, "requests keep flowing during the fault")
            worker.advance(0.5)
        worker.advance(1)
        self.assertTrue(faulted())
        self.assertEqual(len(metrics.finished), REQUESTS, "nothing is forgotten meanwhile")
        end()
        for _ in range(12):  # the longest backoff is 10 s
            worker.advance(1)
        self.assertEqual((len(metrics.finished), metrics.changed), (0, False))
        worker.report()
        statuses = worker.autoscaler.statuses
        entries = worker.autoscaler.delete_entries()
        expected = {(idx, True): 1 for idx in range(1, REQUESTS + 1)}
        self.assertEqual(Counter(entries), Counter(expected))
        total = sum(range(1, REQUESTS + 1))
        self.assertEqual(sum(s["cur_perf"] for s in statuses), total)
        self.assertEqual(sum(s["new_load"] for s in statuses), total)
        self.assertEqual(statuses[-1]["cur_load"], 0)
        self.assertEqual(statuses[-1]["num_requests_recieved"], REQUESTS)

    def failing(self, worker: MemoryWorker) -> Callable[[], bool]:
        """True once the reporter has tried twice more without delivering (it backs off)."""
        before = self.status_attempts(worker), len(worker.autoscaler.statuses)
        return lambda: (
            self.status_attempts(worker) >= before[0] + 2
            and len(worker.autoscaler.statuses) == before[1]
        )

    def test_down(self) -> None:
        """The autoscaler stops listening (connection refused) and comes back."""
        worker = self.worker()
        network = worker.network
        self.through_fault(
            worker,
            lambda: network.down(AUTOSCALER_URL),
            self.failing(worker),
            lambda: network.up(AUTOSCALER_URL),
        )

    def test_answers_500(self) -> None:
        """Both report calls answer 500 for a while."""
        worker = self.worker()
        codes = worker.autoscaler.codes
        self.through_fault(
            worker,
            lambda: codes.update(dict.fromkeys(PATHS, 500)),
            self.failing(worker),
            codes.clear,
        )

    def test_answers_garbage(self) -> None:
        """Both report calls get bytes that are not HTTP and a closed connection."""
        worker = self.worker()
        garbage = worker.autoscaler.garbage
        self.through_fault(
            worker, lambda: garbage.update(PATHS), self.failing(worker), garbage.clear
        )

    def test_hangs(self) -> None:
        """The autoscaler takes a report call and does not answer until it recovers: exactly
        one send waits (the beat does not pile up sends) and requests are not held up."""
        worker = self.worker()
        autoscaler = worker.autoscaler
        self.through_fault(
            worker,
            lambda: autoscaler.hang.update(PATHS),
            lambda: len(autoscaler.hung) == 1,
            autoscaler.release,
        )
        self.assertEqual(autoscaler.hung, [])


class AutoscalerDownEndToEndTests(TestCase):
    timeout = 30

    async def test_down_and_back_on_its_port(self) -> None:
        """Through real sockets: the autoscaler stops listening (connection refused, open
        connections cut) while requests are served, and comes back on the same port;
        the reports resume with nothing lost."""
        switch = Switch(self)
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(
            self, listen(self, backend), report_interval=0.05, serve=switch.serve
        )
        autoscaler = worker.autoscaler
        await autoscaler.when(lambda: autoscaler.statuses)  # reporting works before the fault
        failed_twice = logged(self, "autoscaler report failed", 2)
        await switch.down()
        http = http_client(self)
        for idx in range(1, REQUESTS + 1):
            auth = worker.auth(cost=float(idx), request_idx=idx, reqnum=idx)
            body = json.dumps({"auth_data": auth, "payload": {}}).encode()
            response = await http.post(worker.url + "/ok", data=body)
            self.assertEqual(response.code, 200, "requests keep flowing during the fault")
            await response.content()
        await failed_twice
        assert worker.service.metrics is not None
        self.assertEqual(len(worker.service.metrics.finished), REQUESTS)
        switch.up()
        await autoscaler.when(lambda: len(autoscaler.delete_entries()) >= REQUESTS)
        assert worker.service.reporter is not None
        await worker.service.reporter.send_now()
        self.assertEqual(
            Counter(autoscaler.delete_entries()),
            Counter({(idx, True): 1 for idx in range(1, REQUESTS + 1)}),
        )
        total = sum(range(1, REQUESTS + 1))
        self.assertEqual(sum(s["cur_perf"] for s in autoscaler.statuses), total)
        self.assertEqual(autoscaler.statuses[-1]["cur_load"], 0)


class PartialFailureTests(SynchronousTestCase):
    def test_half_delivered_deletes_are_not_sent_twice(self) -> None:
        """The autoscaler takes the body of successful request_idx but answers 500 to the
        one of failed ones (DELETE_REQUESTS_FORMAT=batches sends the two apart): once it
        recovers, only the failed ones are sent again, so each request_idx arrives once."""
        worker = MemoryWorker(self)
        worker.reporter.startService()
        self.addCleanup(worker.reporter.stopService)
        autoscaler = worker.autoscaler
        autoscaler.refuse = lambda body: body.get("success") is False
        for idx, path in ((1, "/ok"), (2, "/status/500")):
            auth = worker.auth(cost=1.0, request_idx=idx, reqnum=idx)
            worker.post(path, {"auth_data": auth, "payload": {}})
        for _ in range(8):
            worker.advance(1)
        deletes = [uri for uri in worker.network.requested if uri.endswith(b"/delete_requests/")]
        self.assertGreaterEqual(len(deletes), 1 + 3)  # the failed ones refused 3 times or more
        self.assertEqual(autoscaler.delete_entries(), [(1, True)])
        autoscaler.refuse = None
        for _ in range(11):  # the longest backoff is 10 s
            worker.advance(1)
        self.assertEqual(len(worker.metrics.finished), 0)
        worker.report()
        self.assertEqual(
            Counter(autoscaler.delete_entries()), Counter({(1, True): 1, (2, False): 1})
        )


class Outage(FakeClient):
    """A FakeClient whose calls fail while ``down``."""

    down = False

    def _answer(self) -> Deferred[str]:
        return fail(ConnectionRefusedError()) if self.down else super()._answer()


class BoundedBacklogTests(SynchronousTestCase):
    def test_long_outage_keeps_memory_bounded(self) -> None:
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

        @provider(ILogObserver)
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
