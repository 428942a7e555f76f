# -*- test-case-name: tests.test_client_e2e -*-
"""The client proxy's top service (its listeners, and the connection pools closed on stop), and
:func:`build_client`, the one place its objects are wired (for ``twistd vespa-client``, the
``vespa-client`` script, :class:`vast_vespa.client.api.VastClient` and the sandbox)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.web.client import Agent, HTTPConnectionPool

from vast_vespa.client.keys import EndpointKey
from vast_vespa.client.resource import ClientResource
from vast_vespa.client.routing import Router
from vast_vespa.client.settings import ClientSettings
from vast_vespa.client.tls import WorkerTLSPolicy
from vast_vespa.logs import TextLogForTwistd, log_client_access
from vast_vespa.net.client import AnyPool, backend_agent, backend_pool, close_pool, quiet_pool
from vast_vespa.net.guard import choose_fast_path
from vast_vespa.net.listen import listen_service
from vast_vespa.options import declaration
from vast_vespa.outcome import Observer
from vast_vespa.site import VespaSite
from vast_vespa.workload import Workload


class ClientService(TextLogForTwistd, MultiService):
    """The local proxy: ``site`` (what listeners serve), and its worker and control pools."""

    def __init__(
        self,
        clock: IReactorTime,
        pools: tuple[AnyPool, ...],
        site: VespaSite,
        resource: ClientResource,
    ) -> None:
        super().__init__()
        self._clock = clock
        self.pools = pools
        self.site = site
        self.resource = resource

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()
        self.site.close_idle_connections()  # the listeners stopped at once
        closed = [close_pool(pool, self._clock) for pool in self.pools]
        return DeferredList([stopped, *closed]).addCallback(lambda _: None)


def control_client(reactor: Any, fast_path: bool) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client (and its pool) for control-plane calls: /route/, endpoints, the CA."""
    pool = quiet_pool(reactor, fast_path=fast_path)
    pool.cachedConnectionTimeout = 30
    return HTTPClient(Agent(reactor, pool=pool)), pool


_LISTEN = declaration(ClientSettings, "listen").naming


def build_client(
    settings: ClientSettings,
    reactor: Any,
    clock: IReactorTime | None = None,
    rand: Callable[[], float] | None = None,
) -> ClientService:
    """
    Wire the client's objects from its settings (tests and VastClient call this directly).
    ``clock`` (default: the reactor) runs every timer; ``rand`` is the back-off jitter source.
    """
    clock = clock or cast(IReactorTime, reactor)
    fast = choose_fast_path(settings.fast_path, reactor)
    http, control_pool = control_client(reactor, fast)
    key = EndpointKey(settings, http, clock)
    extra = {"rand": rand} if rand is not None else {}
    router = Router(
        http,
        clock,
        settings.route_base,
        settings.endpoint,
        key.get,
        settings.route_retries,
        settings.cold_start_timeout,
        **extra,
    )
    tls = WorkerTLSPolicy(http, clock, settings.ca_file, settings.ca_cache)
    worker_pool = backend_pool(reactor)
    agent = backend_agent(reactor, worker_pool, tls=tls, fast_path=fast)
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
    observers: tuple[Observer, ...] = (log_client_access,) if settings.client_access_log else ()
    resource = ClientResource(
        router,
        agent,
        clock,
        cooperator,
        tls,
        settings.forward_authorization,
        settings.worker_retries,
        settings.client_timeout,
        observers,
        rand,
        Workload(settings.workload or "openai"),
    )
    site = VespaSite(resource, name="client proxy", fast_path=fast)
    service = ClientService(clock, (worker_pool, control_pool), site, resource)
    for index, description in enumerate(settings.listen):
        listener = listen_service(
            description, site, reactor, "vespa-client", _LISTEN, fast_path=fast
        )
        listener.setName(f"listen-{index}")
        listener.setServiceParent(service)
    return service
