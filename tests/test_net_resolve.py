"""
Backend names looked up once every few seconds (vast_vespa.net.resolve): what is kept, for how long,
what is forgotten, and real connections through NamedEndpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.helpers import listen_tcp
from vast_vespa.net.resolve import MAX_NAMES, NAME_TTL, NamedEndpoint, RememberedNames


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        raise AssertionError("not cancelled in these tests")


@implementer(IHostnameResolver)
class _CountingResolver:
    """Answers every name with ``answer`` (addresses on the port asked for), at once."""

    def __init__(self, *hosts: str) -> None:
        self.hosts = hosts
        self.asked: list[tuple[str, int, object]] = []
        self.later = False  # answer only when answer() is called
        self._unanswered: list[tuple[IResolutionReceiver, int]] = []

    def resolveHostName(
        self,
        receiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append((hostName, portNumber, addressTypes))
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        self._unanswered.append((receiver, portNumber))
        if not self.later:
            self.answer()
        return resolution

    def answer(self) -> None:
        unanswered, self._unanswered = self._unanswered, []
        for receiver, port in unanswered:
            for host in self.hosts:
                kind = IPv6Address if ":" in host else IPv4Address
                receiver.addressResolved(kind("TCP", host, port))
            receiver.resolutionComplete()


@implementer(IResolutionReceiver)
class _Receiver:
    def __init__(self) -> None:
        self.calls: list[object] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self.calls.append(("began", resolutionInProgress.name))

    def addressResolved(self, address: IAddress) -> None:
        self.calls.append(address)

    def resolutionComplete(self) -> None:
        self.calls.append("complete")


class RememberedNamesTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resolver = _CountingResolver("::1", "127.0.0.1")
        self.names = RememberedNames(self.resolver, self.clock)

    def look_up(
        self,
        name: str = "backend",
        port: int = 8000,
        types: Sequence[type[IAddress]] | None = None,
    ) -> list[object]:
        receiver = _Receiver()
        resolution = self.names.resolveHostName(receiver, name, port, types)
        verifyObject(IHostResolution, resolution)
        self.assertEqual(resolution.name, name)
        return receiver.calls

    def test_a_look_up_is_kept_for_its_ttl(self) -> None:
        """Within NAME_TTL seconds the same addresses come back in the same order, without
        asking the resolver; then it is asked again."""
        verifyObject(IHostnameResolver, self.names)
        first = self.look_up()
        self.assertEqual(
            first,
            [
                ("began", "backend"),
                IPv6Address("TCP", "::1", 8000),
                IPv4Address("TCP", "127.0.0.1", 8000),
                "complete",
            ],
        )
        self.clock.advance(NAME_TTL - 0.1)
        self.assertEqual(self.look_up(), first)
        self.assertEqual(len(self.resolver.asked), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.look_up(), first)
        self.assertEqual(len(self.resolver.asked), 2)

    def test_look_ups_under_way_are_shared(self) -> None:
        """Look-ups asked while the same one is under way (a burst of new connections) wait
        for it and get its answer; the resolver is asked once."""
        self.resolver.later = True
        receivers = [_Receiver() for _ in range(3)]
        for receiver in receivers:
            self.names.resolveHostName(receiver, "backend", 8000)
        self.assertEqual([r.calls for r in receivers], [[("began", "backend")]] * 3)
        self.resolver.answer()
        self.assertEqual(len(self.resolver.asked), 1)
        expected = [
            ("began", "backend"),
            IPv6Address("TCP", "::1", 8000),
            IPv4Address("TCP", "127.0.0.1", 8000),
            "complete",
        ]
        self.assertEqual([r.calls for r in receivers], [expected] * 3)

    def test_a_resolver_that_raises_leaves_nobody_waiting(self) -> None:
        """A resolver that raises (it should fail through its receiver instead): the error
        goes to the caller, and the next look-up asks again instead of waiting for ever."""

        @implementer(IHostnameResolver)
        class Broken:
            def resolveHostName(self, *args: object, **kwargs: object) -> IHostResolution:
                raise RuntimeError("resolver bug")

        names = RememberedNames(Broken(), self.clock)
        for _ in range(2):
            with self.assertRaises(RuntimeError):
                names.resolveHostName(_Receiver(), "backend", 8000)

    def test_nothing_found_is_not_kept(self) -> None:
        """A name that had no address is looked up again next time."""
        self.resolver.hosts = ()
        self.resolver.later = True
        receivers = [_Receiver(), _Receiver()]
        for receiver in receivers:
            self.names.resolveHostName(receiver, "backend", 8000)
        self.resolver.answer()
        self.assertEqual([r.calls for r in receivers], [[("began", "backend"), "complete"]] * 2)
        self.resolver.later = False
        self.resolver.hosts = ("127.0.0.1",)
        self.assertEqual(self.look_up()[1], IPv4Address("TCP", "127.0.0.1", 8000))
        self.assertEqual(len(self.resolver.asked), 2)

    def test_each_question_is_kept_apart(self) -> None:
        """Name, port and address types each make a different look-up."""
        self.look_up()
        self.look_up(name="other")
        self.look_up(port=9000)
        self.look_up(types=[IPv4Address])
        self.look_up()
        self.assertEqual(
            self.resolver.asked,
            [
                ("backend", 8000, None),
                ("other", 8000, None),
                ("backend", 9000, None),
                ("backend", 8000, [IPv4Address]),
            ],
        )

    def test_forget(self) -> None:
        """After forget, every name is looked up again."""
        self.look_up()
        self.look_up(name="other")
        self.names.forget()
        self.look_up()
        self.look_up(name="other")
        self.assertEqual(len(self.resolver.asked), 4)

    def test_bounded(self) -> None:
        """At most MAX_NAMES look-ups are kept; the oldest goes first."""
        for port in range(MAX_NAMES + 1):
            self.look_up(port=port)
        self.look_up(port=MAX_NAMES)
        self.look_up(port=1)
        self.assertEqual(len(self.resolver.asked), MAX_NAMES + 1)
        self.look_up(port=0)
        self.assertEqual(len(self.resolver.asked), MAX_NAMES + 2)


class NamedEndpointTests(TestCase):
    """NamedEndpoint over real sockets on 127.0.0.1, with a resolver that counts."""

    def setUp(self) -> None:
        self.resolver = _CountingResolver("127.0.0.1")
        self.names = RememberedNames(self.resolver, reactor)

    def endpoint(self, port: int) -> NamedEndpoint:
        endpoint = NamedEndpoint(reactor, self.names, "backend.test", port, 5.0)
        verifyObject(IStreamClientEndpoint, endpoint)
        return endpoint

    def server(self) -> int:
        port = listen_tcp(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    async def connect(self, endpoint: NamedEndpoint) -> None:
        protocol = cast(Protocol, await endpoint.connect(Factory.forProtocol(Protocol)))
        assert protocol.transport is not None
        protocol.transport.loseConnection()

    async def test_new_connections_share_a_look_up(self) -> None:
        """Two connections to a name: both made, one look-up; the connect timeout is
        HostnameEndpoint's."""
        endpoint = self.endpoint(self.server())
        await self.connect(endpoint)
        await self.connect(endpoint)
        self.assertEqual(len(self.resolver.asked), 1)
        self.assertEqual(endpoint.endpoint._timeout, 5.0)

    async def test_a_failed_connection_looks_the_name_up_again(self) -> None:
        """When no address of the name takes the connection (the backend moved, or is down),
        the look-up is forgotten: the next attempt asks again."""
        listening = listen_tcp(Factory.forProtocol(Protocol))
        number = listening.getHost().port
        endpoint = self.endpoint(number)
        await self.connect(endpoint)
        await listening.stopListening()
        with self.assertRaises(ConnectError):
            await endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(len(self.resolver.asked), 1)
        listening = listen_tcp(Factory.forProtocol(Protocol), number)
        self.addCleanup(listening.stopListening)
        await self.connect(endpoint)
        self.assertEqual(len(self.resolver.asked), 2)
