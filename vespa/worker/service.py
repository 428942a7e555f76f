# -*- test-case-name: tests.test_worker_service -*-
"""The worker's top service: its children start in order; stopping closes the backend pool."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

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

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()
        closed = self.pool.closeCachedConnections()
        closed.addTimeout(POOL_CLOSE_TIMEOUT, self._clock).addErrback(lambda _: None)
        both = DeferredList([stopped, closed])
        return both.addCallback(lambda _: None)
