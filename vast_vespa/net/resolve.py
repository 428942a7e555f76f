# -*- test-case-name: tests.test_net_resolve -*-
"""
Backend host names looked up once every few seconds, not once per new connection.

``HostnameEndpoint`` asks the reactor's resolver on every connection attempt, and Twisted's
resolver calls ``getaddrinfo`` in the reactor's thread pool (ten threads). The default
``BACKEND_URL`` names its host (``localhost``), so a burst of new streams would queue a
look-up each behind those threads. :class:`NamedEndpoint` is
``HostnameEndpoint`` (every address of the name is tried, IPv6 and IPv4 alike) with
look-ups kept for :data:`NAME_TTL` seconds by a :class:`RememberedNames`; when no address
can be connected to, what was kept is forgotten, so a backend that moved is looked up again
on the next attempt.

Public Twisted APIs only: it is in :mod:`vast_vespa.net` as part of the backend client, and
serves with and without the fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

NAME_TTL = 5.0  # seconds a look-up is used for new connections
MAX_NAMES = 256  # look-ups kept at most (the oldest goes first)

_Key = tuple[str, int, tuple[Any, ...] | None, str]


@implementer(IHostnameResolver)
class RememberedNames:
    """Answers a look-up that ``resolver`` answered less than ``ttl`` seconds ago with the
    same addresses, in the same order, and one asked while the same look-up is under way
    with its answer (a burst of new connections makes one look-up, not one each). Empty
    answers (failures) are never kept."""

    def __init__(
        self, resolver: IHostnameResolver, clock: IReactorTime, ttl: float = NAME_TTL
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._ttl = ttl
        self._known: dict[_Key, tuple[float, list[IAddress]]] = {}  # key: (until, addresses)
        self._waiting: dict[_Key, list[IResolutionReceiver]] = {}  # for a look-up under way

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        types = None if addressTypes is None else tuple(addressTypes)
        key = (hostName, portNumber, types, transportSemantics)
        known = self._known.get(key)
        if known is not None and self._clock.seconds() < known[0]:
            resolution = _Remembered(hostName)
            resolutionReceiver.resolutionBegan(resolution)
            _tell(resolutionReceiver, known[1])
            return resolution
        waiting = self._waiting.get(key)
        if waiting is not None:
            resolution = _Remembered(hostName)
            resolutionReceiver.resolutionBegan(resolution)
            waiting.append(resolutionReceiver)
            return resolution
        self._waiting[key] = []
        try:
            return self._resolver.resolveHostName(
                _Recorder(self, key, resolutionReceiver),
                hostName,
                portNumber,
                addressTypes,
                transportSemantics,
            )
        except BaseException:
            self._waiting.pop(key, None)  # (a resolver should not raise) nobody is left waiting
            raise

    def found(self, key: _Key, addresses: list[IAddress]) -> None:
        """What a look-up found: told to those who asked meanwhile, and kept unless it found
        nothing."""
        self._known.pop(key, None)
        if addresses:
            if len(self._known) >= MAX_NAMES:
                del self._known[next(iter(self._known))]
            self._known[key] = (self._clock.seconds() + self._ttl, addresses)
        for receiver in self._waiting.pop(key, ()):
            _tell(receiver, addresses)

    def forget(self) -> None:
        """Look every name up again next time."""
        self._known.clear()


def _tell(receiver: IResolutionReceiver, addresses: list[IAddress]) -> None:
    for address in addresses:
        receiver.addressResolved(address)
    receiver.resolutionComplete()


@implementer(IHostResolution)
class _Remembered:
    """A look-up answered with another's answer (``HostnameEndpoint`` never cancels one)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Its answer comes with the other look-up's."""


@implementer(IResolutionReceiver)
class _Recorder:
    """Passes a look-up's answer on to ``receiver`` and gives it to ``names`` to keep."""

    def __init__(self, names: RememberedNames, key: _Key, receiver: IResolutionReceiver) -> None:
        self._names = names
        self._key = key
        self._receiver = receiver
        self._addresses: list[IAddress] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        self._addresses.append(address)
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._names.found(self._key, self._addresses)
        self._receiver.resolutionComplete()


@implementer(IReactorPluggableNameResolver)
class _ReactorWithNames:
    """``reactor`` as a ``HostnameEndpoint`` sees it: names looked up through ``names``."""

    def __init__(self, reactor: Any, names: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = names

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class NamedEndpoint:
    """``HostnameEndpoint(reactor, host, port, timeout)`` looking names up through ``names``;
    a connection that fails (no address of the name took it) makes ``names`` forget."""

    def __init__(
        self, reactor: Any, names: RememberedNames, host: str, port: int, timeout: float
    ) -> None:
        self.names = names
        self.endpoint = HostnameEndpoint(
            _ReactorWithNames(reactor, names), host, port, timeout=timeout
        )

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self.endpoint.connect(protocolFactory).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        self.names.forget()
        return failure
