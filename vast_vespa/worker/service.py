# -*- test-case-name: tests.test_drain -*-
"""
The worker's top service: its children start in order. Stopping is a graceful drain: mark
draining, run the drain hooks (the final report), stop listening, let in-flight requests finish
up to the drain timeout, abort what is left and let it end (errored), end the open sessions
(their on_close_route calls start), stop the other children (the reporter's last send carries
what ended; the sessions wait for their on_close_route calls) and close the pools (backend, then
autoscaler).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from vast_vespa.logs import TextLogForTwistd
from vast_vespa.net.client import AnyPool, close_pool
from vast_vespa.site import VespaSite
from vast_vespa.worker.metrics import WorkerMetrics
from vast_vespa.worker.reporter import MetricsReporter
from vast_vespa.worker.resource import InFlight
from vast_vespa.worker.sessions import Sessions
from vast_vespa.worker.state import WorkerState

# A drain hook (e.g. the final report) may not hold up the shutdown longer than this.
DRAIN_HOOK_TIMEOUT = 10.0
LISTENER_PREFIX = "listen-"  # names of the children that accept connections
DRAIN_CUT = "cut at the drain timeout"  # the reason the requests aborted then end with
# The requests aborted at the drain timeout end once their connections' loss reaches them, a
# reactor turn or two later; the stop waits this long at most (one stuck cannot hold it up).
CUT_WAIT = 1.0

DrainHook = Callable[[], "Deferred[object] | None"]


class WorkerService(TextLogForTwistd, MultiService):
    """All of the worker's services, plus the backend connection pool they share."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: AnyPool,
        site: VespaSite,
        state: WorkerState,
        in_flight: InFlight | None = None,
        drain_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self._clock = clock
        self.pool = pool
        self.site = site  # what the listeners serve
        self.state = state
        self.in_flight = in_flight or InFlight()
        self.drain_timeout = drain_timeout
        self._drain_hooks: list[DrainHook] = []
        self._stopped: Deferred[None] | None = None
        self.metrics: WorkerMetrics | None = None  # set by build_worker
        self.reporter: MetricsReporter | None = None  # None without REPORT_ADDR
        self.sessions: Sessions | None = None  # None with MAX_SESSIONS=0
        self.control_pool: AnyPool | None = None  # autoscaler calls

    def add_drain_hook(self, hook: DrainHook) -> None:
        """Call ``hook()`` when the drain starts (after ``state.draining`` is set, before the
        listeners stop); the shutdown waits for its Deferred, at most DRAIN_HOOK_TIMEOUT s."""
        self._drain_hooks.append(hook)

    def stopService(self) -> Deferred[None]:
        """Drain (once; a second call waits for the same drain)."""
        if self._stopped is None:
            Service.stopService(self)
            self._stopped = Deferred.fromCoroutine(self._drain())
            self._stopped.addErrback(lambda f: self._log.failure("drain failed", f))
        waiter: Deferred[None] = Deferred()
        self._stopped.chainDeferred(waiter)
        return waiter

    async def _drain(self) -> None:
        self.state.draining = True
        self._log.info(
            "draining: {count} request(s) in flight, waiting up to {timeout:g} s",
            count=len(self.in_flight.requests),
            timeout=self.drain_timeout,
        )
        await DeferredList([self._run_hook(hook) for hook in self._drain_hooks])
        listeners = [child for child in self if (child.name or "").startswith(LISTENER_PREFIX)]
        await self._stop_children(listeners)
        if not await self._all_ended(self.drain_timeout):
            self._log.warn(
                "drain timeout ({timeout:g} s): aborting {count} request(s) still in flight",
                timeout=self.drain_timeout,
                count=self.in_flight.abort(DRAIN_CUT),
            )
            # Once they have ended (recorded, logged), the reporter's last send carries them.
            if not await self._all_ended(CUT_WAIT):
                self._log.warn(
                    "{count} aborted request(s) had not ended {wait:g} s after the drain "
                    "timeout; stopping anyway",
                    count=len(self.in_flight.requests),
                    wait=CUT_WAIT,
                )
        sessions = self.sessions
        if sessions is not None and sessions.open:
            # Ended as by /session/end, before the reporter's last send, which carries them.
            self._log.info("ending {count} open session(s)", count=len(sessions.open))
            sessions.end_all()
        self.site.close_idle_connections()
        await self._stop_children([child for child in reversed(list(self)) if child.running])
        await close_pool(self.pool, self._clock)
        if self.control_pool is not None:  # after the reporter's last send
            await close_pool(self.control_pool, self._clock)
        self._log.info("drained")

    async def _all_ended(self, seconds: float) -> bool:
        """Whether every request in flight has ended within ``seconds``."""
        try:
            await self.in_flight.idle().addTimeout(seconds, self._clock)
        except TimeoutError:
            return False
        return True

    def _run_hook(self, hook: DrainHook) -> Deferred[object]:
        ran: Deferred[object] = maybeDeferred(hook)
        ran.addTimeout(DRAIN_HOOK_TIMEOUT, self._clock)
        return ran.addErrback(self._hook_failed, hook)

    def _hook_failed(self, failure: Failure, hook: DrainHook) -> None:
        if failure.check(TimeoutError):
            self._log.warn(
                "drain hook {hook!r} took more than {timeout:g} s; going on",
                hook=hook,
                timeout=DRAIN_HOOK_TIMEOUT,
            )
        else:
            self._log.failure("drain hook {hook!r} failed", failure, hook=hook)

    def _stop_children(self, children: list[Service]) -> Deferred[Any]:
        stopped = [
            maybeDeferred(child.stopService).addErrback(self._stop_failed, child)
            for child in children
        ]
        return DeferredList(stopped) if stopped else succeed(None)

    def _stop_failed(self, failure: Failure, child: Service) -> None:
        self._log.failure("stopping {service} failed", failure, service=child.name)
