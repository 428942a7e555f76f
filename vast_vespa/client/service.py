# -*- test-case-name: tests.test_client_e2e -*-
"""The client proxy's top service: its listeners, and the connection pools closed on stop."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Site

from vast_vespa.client.resource import ClientResource
from vast_vespa.logs import TextLogForTwistd
from vast_vespa.relay import AnyPool, close_pool


class ClientService(TextLogForTwistd, MultiService):
    """The local proxy: ``site`` (what listeners serve), and its worker and control pools."""

    def __init__(
        self,
        clock: IReactorTime,
        pools: tuple[AnyPool, ...],
        site: Site,
        resource: ClientResource,
    ) -> None:
        super().__init__()
        self._clock = clock
        self.pools = pools
        self.site = site
        self.resource = resource

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()
        closed = [close_pool(pool, self._clock) for pool in self.pools]
        return DeferredList([stopped, *closed]).addCallback(lambda _: None)
