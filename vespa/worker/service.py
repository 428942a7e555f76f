# -*- test-case-name: tests.test_worker_service -*-
"""The worker's top service: its children start in order; stopping closes the backend pool."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from vespa.worker.metrics import WorkerMetrics
from vespa.worker.reporter import MetricsReporter
from vespa.worker.state import WorkerState

# closeCachedConnections can hang (twisted#7738): never wait for it longer than this.
POOL_CLOSE_TIMEOUT = 5.0


class WorkerService(MultiService):
    """All of the worker's services, plus the backend connection pool they share."""

    def __init__(
        self, clock: IReactorTime, pool: HTTPConnectionPool, site: Site, state: WorkerState
    ) -> None:
        super().__init__()
        self._clock = clock
        self.pool = pool
        self.site = site  # what the listeners serve
        self.state = state
        self.metrics: WorkerMetrics | None = None  # set by build_worker
        self.reporter: MetricsReporter | None = None  # None without REPORT_ADDR
        self.control_pool: HTTPConnectionPool | None = None  # autoscaler calls

    def stopService(self) -> Deferred[None]:
        stopped: Deferred[None] = super().stopService()
        control = self.control_pool
        if control is not None:
            # After the children stopped: the reporter may still be finishing its last send.
            stopped.addCallback(lambda _: self._close(control))
        both = DeferredList([stopped, self._close(self.pool)])
        return both.addCallback(lambda _: None)

    def _close(self, pool: HTTPConnectionPool) -> Deferred[None]:
        closed: Deferred[None] = pool.closeCachedConnections()
        return closed.addTimeout(POOL_CLOSE_TIMEOUT, self._clock).addErrback(lambda _: None)
