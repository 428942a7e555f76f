"""TCP connections that send at once: order, partial sends, backpressure and closing kept."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any, cast
from unittest import skipIf

from twisted.internet import reactor, tcp
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IProtocolFactory, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from vast_vespa.net.dispatch import OUTBOX
from vast_vespa.net.listen import (
    ListenFailed,
    SendNowEndpoint,
    SendNowNoDelayServer,
    SendNowServer,
    listen_service,
    send_now,
)
from vast_vespa.net.splice import has_unsent


class _Writer(Protocol):
    """Runs ``script(transport)`` once connected; records what the transport held after."""

    def __init__(self, script: Callable[[SendNowServer], int], made: Deferred[_Writer]) -> None:
        self.script = script
        self.made = made

    @property
    def server(self) -> SendNowServer:
        """Its transport: the connection SendNowEndpoint's listener made."""
        return cast(SendNowServer, self.transport)

    def connectionMade(self) -> None:
        self.queued = self.script(self.server)
        self.made.callback(self)


@implementer(IPushProducer)
class _Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class _CountingSocket:
    """A socket whose sends are counted (by size); anything else goes to the real one."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.sizes: list[int] = []

    def send(self, data: bytes) -> int:
        sent = self.real.send(data)
        self.sizes.append(sent)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def queued(transport: tcp.Connection) -> int:
    """Bytes the transport holds back for a later reactor turn."""
    held: int = transport._tempDataLen + len(transport.dataBuffer) - transport.offset
    return held


class SendNowTests(TestCase):
    async def connect(
        self, script: Callable[[SendNowServer], int]
    ) -> tuple[_Writer, socket.socket]:
        made: Deferred[_Writer] = Deferred()
        endpoint = SendNowEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        listening = await endpoint.listen(Factory.forProtocol(lambda: _Writer(script, made)))
        port = cast(tcp.Port, listening)
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.sendall(b"\n")  # a client speaks first (the listener defers accepting until then)
        writer = await made
        self.addCleanup(writer.server.abortConnection)
        return writer, client

    async def receive(self, client: socket.socket, size: int) -> bytes:
        """Read ``size`` bytes while the reactor runs (the server may still be sending)."""
        client.setblocking(False)
        got = bytearray()
        while len(got) < size:
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                await _turn()
                continue
            if not chunk:
                break
            got += chunk
        return bytes(got)

    async def test_small_write_leaves_at_once(self) -> None:
        """A write on an idle connection is in the socket before write() returns: nothing is
        left for the next reactor turn."""

        def script(transport: SendNowServer) -> int:
            transport.write(b"data: hello\n\n")
            transport.writeSequence([b"a", b"b"])
            return queued(transport)

        writer, client = await self.connect(script)
        self.assertIsInstance(writer.transport, SendNowServer)
        self.assertEqual(writer.queued, 0)
        client.settimeout(5)
        self.assertEqual(client.recv(100), b"data: hello\n\nab")

    async def test_big_write_keeps_order(self) -> None:
        """What the socket does not take is queued, and later writes go after it: the client
        gets every byte in order."""
        big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than a socket buffer holds

        def script(transport: SendNowServer) -> int:
            transport.write(big)
            held = queued(transport)
            transport.write(b"tail")
            return held

        writer, client = await self.connect(script)
        self.assertGreater(writer.queued, 0)
        got = await self.receive(client, len(big) + 4)
        self.assertEqual(got, big + b"tail")

    async def test_backpressure_pauses_producer(self) -> None:
        """A client that does not read still pauses a streaming producer."""
        producer = _Producer()

        def script(transport: SendNowServer) -> int:
            transport.registerProducer(producer, True)
            for _ in range(64):
                transport.write(b"x" * 256 * 1024)
            return queued(transport)

        _, client = await self.connect(script)
        self.assertTrue(producer.paused)
        await self.receive(client, 64 * 256 * 1024)  # drained: resumed, as Twisted does
        self.assertFalse(producer.paused)

    async def test_close_after_write(self) -> None:
        """loseConnection after writes still sends everything, then closes."""

        def script(transport: SendNowServer) -> int:
            transport.write(b"last words")
            transport.loseConnection()
            return queued(transport)

        _, client = await self.connect(script)
        self.assertEqual(await self.receive(client, 100), b"last words")

    async def held(
        self, script: Callable[[SendNowServer], None]
    ) -> tuple[_Writer, socket.socket, list[int]]:
        """Connect, then run ``script(transport)`` as if in a turn of the reactor's lean
        dispatch (the outbox open); returns the sizes of the socket sends made meanwhile."""
        writer, client = await self.connect(lambda transport: 0)
        transport = writer.server
        sends = _CountingSocket(transport.socket)
        transport.socket = cast(socket.socket, sends)  # a stand-in for it
        OUTBOX.open = True
        try:
            script(transport)
        finally:
            self.addCleanup(setattr, OUTBOX, "open", False)
        return writer, client, sends.sizes

    async def test_writes_in_a_turn_leave_together(self) -> None:
        """While the reactor dispatches a turn's events, a connection's writes wait; when the
        turn is over they leave in one send, in order."""

        def script(transport: SendNowServer) -> None:
            transport.write(b"head ")
            transport.writeSequence([b"body ", b"more "])
            transport.write(b"end")

        _, client, sizes = await self.held(script)
        self.assertEqual(sizes, [])
        client.setblocking(False)
        self.assertRaises(BlockingIOError, client.recv, 100)
        OUTBOX.send_all()
        self.assertFalse(OUTBOX.open)
        self.assertEqual(sizes, [len(b"head body more end")])
        self.assertEqual(await self.receive(client, 18), b"head body more end")

    async def test_streamed_chunk_in_a_turn_leaves_at_once(self) -> None:
        """write_now (a streamed body's chunk) is sent during the turn, not held for its end:
        holding a chunk that comes alone in its turn would gather nothing."""
        _, client, sizes = await self.held(lambda transport: transport.write_now(b"data: 1\n\n"))
        self.assertEqual(sizes, [len(b"data: 1\n\n")])
        self.assertEqual(OUTBOX.waiting, [])
        self.assertEqual(await self.receive(client, 9), b"data: 1\n\n")

    async def test_streamed_chunk_after_held_writes_keeps_their_order(self) -> None:
        """A chunk written at once behind writes the turn holds (an answer's head) joins them:
        the client gets the head first."""

        def script(transport: SendNowServer) -> None:
            transport.write(b"head ")
            transport.write_now(b"chunk")

        _, client, sizes = await self.held(script)
        self.assertEqual(sizes, [])
        OUTBOX.send_all()
        self.assertEqual(sizes, [len(b"head chunk")])
        self.assertEqual(await self.receive(client, 10), b"head chunk")

    async def test_close_in_a_turn_sends_what_is_held_first(self) -> None:
        """loseConnection in the same turn as held writes: they are sent, then it closes."""

        def script(transport: SendNowServer) -> None:
            transport.write(b"last words")
            transport.loseConnection()

        _, client, _ = await self.held(script)
        OUTBOX.send_all()
        self.assertEqual(await self.receive(client, 100), b"last words")

    async def test_abort_in_a_turn_drops_what_is_held(self) -> None:
        """abortConnection drops what the turn's writes hold: nothing more is sent."""

        def script(transport: SendNowServer) -> None:
            transport.write(b"never")
            transport.abortConnection()

        _, client, sizes = await self.held(script)
        OUTBOX.send_all()
        self.assertEqual(sizes, [])
        try:
            got = await self.receive(client, 100)
        except ConnectionResetError:  # an abort resets the connection
            got = b""
        self.assertEqual(got, b"")

    async def test_queued_data_is_not_held(self) -> None:
        """With bytes already queued the Twisted way, a write in a turn is queued behind them,
        not held (Twisted's own doWrite may send and close later in the same turn)."""
        big = b"x" * (8 << 20)  # more than a socket buffer holds: some is queued

        def script(transport: SendNowServer) -> None:
            transport.write(big)
            OUTBOX.open = True
            transport.write(b"tail")

        OUTBOX.open = False
        writer, client = await self.connect(lambda transport: 0)
        script(writer.server)
        self.assertEqual(OUTBOX.waiting, [])
        OUTBOX.send_all()
        self.assertEqual(await self.receive(client, len(big) + 4), big + b"tail")

    async def test_splice_sends_what_is_held_first(self) -> None:
        """Before bytes are spliced into a connection, what its writes hold is sent: the
        spliced bytes go after it."""
        _, client, sizes = await self.held(lambda transport: transport.write(b"head"))
        writer_transport = cast(SendNowServer, OUTBOX.waiting[0])
        self.assertFalse(has_unsent(writer_transport))
        self.assertEqual(sizes, [4])
        OUTBOX.send_all()
        self.assertEqual(sizes, [4])
        self.assertEqual(await self.receive(client, 4), b"head")

    def test_a_failing_connection_spares_the_others(self) -> None:
        """A connection that raises while its held writes are sent is logged; the others in
        the outbox are still sent."""

        class Failing:
            def send_held(self) -> None:
                raise OSError("broken")

        class Fine:
            sent = False

            def send_held(self) -> None:
                self.sent = True

        fine = Fine()
        OUTBOX.waiting[:] = [Failing(), fine]
        OUTBOX.send_all()
        self.assertTrue(fine.sent)
        self.assertEqual(OUTBOX.waiting, [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_other_transports_write_as_usual(self) -> None:
        """send_now on a transport that is not TCP is a plain write."""
        transport = StringTransport()
        send_now(transport, b"abc")
        self.assertEqual(transport.value(), b"abc")

    async def test_unix_listener_untouched(self) -> None:
        """Only TCP listeners get SendNowServer connections."""
        from twisted.internet.endpoints import UNIXServerEndpoint

        path = self.mktemp()
        endpoint = SendNowEndpoint(UNIXServerEndpoint(reactor, path))
        port = await endpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        self.assertNotEqual(getattr(port, "transport", None), SendNowServer)


class _Hello(Protocol):
    """Says hello and closes."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")
        self.transport.loseConnection()


class _FlakyListener:
    """A listening socket whose first ``failures`` accepts fail with EPERM."""

    def __init__(self, real: socket.socket, failures: int) -> None:
        self._real = real
        self.failures = failures

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EPERM, "refused by a firewall rule")
        return self._real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class AcceptTests(TestCase):
    """The listener's own accept loop (in place of tcp.Port.doRead)."""

    async def listen(self, factory: IProtocolFactory) -> tcp.Port:
        endpoint = SendNowEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        port = cast(tcp.Port, await endpoint.listen(factory))
        self.addCleanup(port.stopListening)
        return port

    def connect(self, port: tcp.Port, clients: int, host: str = "127.0.0.1") -> list[socket.socket]:
        """``clients`` sockets connected, each having sent a byte (waiting in the listener's
        backlog until accepted)."""
        sockets = [socket.create_connection((host, port.getHost().port)) for _ in range(clients)]
        for client in sockets:
            self.addCleanup(client.close)
            client.sendall(b"\n")
        return sockets

    async def read_all(self, port: tcp.Port, clients: int, host: str = "127.0.0.1") -> list[bytes]:
        """Connect ``clients`` sockets at once, then read each to the end."""
        return [await self.read_to_end(client) for client in self.connect(port, clients, host)]

    async def read_to_end(self, client: socket.socket) -> bytes:
        client.setblocking(False)
        got = b""
        while True:
            try:
                chunk = client.recv(100)
            except BlockingIOError:
                await _turn()
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return got
            got += chunk

    async def test_burst_of_connections_all_served(self) -> None:
        """Connections waiting together are all accepted (several per turn)."""
        port = await self.listen(Factory.forProtocol(_Hello))
        self.assertEqual(await self.read_all(port, 40), [b"hello"] * 40)

    async def test_accepts_per_turn_follow_the_backlog(self) -> None:
        """A turn that found as many waiting connections as it tried takes 20 more next time;
        one that found fewer takes that many next time, so clients arriving one by one cost
        no accept tried in vain."""
        port = await self.listen(Factory.forProtocol(_Hello))
        waiting = self.connect(port, 3)
        port.numberAccepts = 2
        port.doRead()  # two of the three
        self.assertEqual(port.numberAccepts, 22)
        port.doRead()  # the last one, then none
        self.assertEqual(port.numberAccepts, 1)
        self.assertEqual([await self.read_to_end(client) for client in waiting], [b"hello"] * 3)

    async def test_ipv6_peer_address(self) -> None:
        """An IPv6 listener's connections are accepted too, with the peer's address as
        Twisted gives it."""
        peers: list[IAddress] = []

        class Recording(_Hello):
            def connectionMade(self) -> None:
                assert self.transport is not None
                peers.append(self.transport.getPeer())
                super().connectionMade()

        endpoint = SendNowEndpoint(TCP6ServerEndpoint(reactor, 0, interface="::1"))
        port = cast(tcp.Port, await endpoint.listen(Factory.forProtocol(Recording)))
        self.addCleanup(port.stopListening)
        self.assertEqual(await self.read_all(port, 1, "::1"), [b"hello"])
        [peer] = peers
        self.assertIsInstance(peer, IPv6Address)
        self.assertEqual(cast(IPv6Address, peer).host, "::1")

    async def test_failing_connection_set_up_spares_the_others(self) -> None:
        """A protocol that cannot be built or set up is logged and its connection closed; a
        factory that declines closes it too; the port keeps accepting."""
        failures = iter(["build", "set up", "decline"])

        class FailingSetUp(Protocol):
            def connectionMade(self) -> None:
                raise ZeroDivisionError("set up")

        class Picky(Factory[Protocol]):
            def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
                failure = next(failures, None)
                if failure == "build":
                    raise ZeroDivisionError("build")
                if failure == "decline":
                    return None
                if failure == "set up":
                    return FailingSetUp()
                return _Hello() if failure is None else Protocol()

        port = await self.listen(Picky())
        for expected in (b"", b"", b"", b"hello", b"hello"):
            [answer] = await self.read_all(port, 1)
            self.assertEqual(answer, expected)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)

    async def test_accept_errors_left_to_twisted(self) -> None:
        """An accept error other than "no more" goes to Twisted's accept loop, which
        handles it (here: skips an EPERM) and accepts the connection."""
        port = await self.listen(Factory.forProtocol(_Hello))
        flaky = _FlakyListener(port.socket, failures=1)
        port.socket = flaky
        self.addCleanup(setattr, port, "socket", flaky._real)
        self.assertEqual(await self.read_all(port, 1), [b"hello"])
        self.assertEqual(flaky.failures, 0)


class _Recording(Protocol):
    """Records what it is sent; may stop reading as soon as it is connected."""

    pause_at_once = False

    def __init__(self) -> None:
        self.received = b""

    @property
    def server(self) -> SendNowServer:
        """Its transport: the connection SendNowEndpoint's listener made."""
        return cast(SendNowServer, self.transport)

    def connectionMade(self) -> None:
        if self.pause_at_once:
            self.server.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@skipIf(not hasattr(socket, "TCP_DEFER_ACCEPT"), "TCP_DEFER_ACCEPT is Linux only")
class DeferredAcceptTests(TestCase):
    """On Linux a connection is accepted once its client has spoken, and what it said is
    read in the same turn; accepted sockets inherit TCP_NODELAY from the listener."""

    async def listen(
        self, protocol: type[_Recording] = _Recording
    ) -> tuple[tcp.Port, list[_Recording]]:
        made: list[_Recording] = []

        def build() -> _Recording:
            made.append(protocol())
            return made[-1]

        endpoint = SendNowEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
        port = cast(tcp.Port, await endpoint.listen(Factory.forProtocol(build)))
        self.addCleanup(port.stopListening)
        return port, made

    def client(self, port: tcp.Port) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        return client

    async def test_a_connection_is_accepted_once_its_client_speaks(self) -> None:
        port, made = await self.listen()
        client = self.client(port)
        port.doRead()
        self.assertEqual(made, [])  # connected, silent: still in the kernel
        client.sendall(b"GET / HTTP/1.1\r\n")
        port.doRead()
        [protocol] = made
        # Read in the same turn as the accept, without the reactor running in between.
        self.assertEqual(protocol.received, b"GET / HTTP/1.1\r\n")
        self.addCleanup(protocol.server.abortConnection)

    async def test_a_protocol_that_stops_reading_at_once_is_not_read(self) -> None:
        class Pausing(_Recording):
            pause_at_once = True

        port, made = await self.listen(Pausing)
        self.client(port).sendall(b"early")
        port.doRead()
        [protocol] = made
        self.addCleanup(protocol.server.abortConnection)
        self.assertEqual(protocol.received, b"")
        protocol.server.resumeProducing()
        while not protocol.received:
            await _turn()
        self.assertEqual(protocol.received, b"early")

    async def test_a_protocol_failing_on_its_first_bytes_spares_the_others(self) -> None:
        """What a protocol raises on the bytes read at accept is logged and drops its
        connection; the connections accepted with it are read all the same."""

        class Failing(_Recording):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                if data == b"boom":
                    raise ZeroDivisionError(data)

        port, made = await self.listen(Failing)
        first, second = self.client(port), self.client(port)
        first.sendall(b"boom")
        second.sendall(b"fine")
        port.doRead()
        self.assertEqual([protocol.received for protocol in made], [b"boom", b"fine"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(made[0].server.disconnected)
        self.assertFalse(made[1].server.disconnected)
        self.addCleanup(made[1].server.abortConnection)

    async def test_accepted_sockets_have_no_delay_without_setting_it(self) -> None:
        port, made = await self.listen()
        self.client(port).sendall(b"x")
        port.doRead()
        [protocol] = made
        transport = protocol.server
        self.addCleanup(transport.abortConnection)
        self.assertIsInstance(transport, SendNowNoDelayServer)
        self.assertTrue(transport.getTcpNoDelay())
        transport.setTcpNoDelay(True)  # no system call: inherited
        transport.setTcpNoDelay(False)  # still works the other way
        self.assertFalse(transport.getTcpNoDelay())


def _turn() -> Deferred[None]:
    """A Deferred that fires on a later reactor turn."""
    turn: Deferred[None] = Deferred()
    reactor.callLater(0.001, turn.callback, None)
    return turn


class ListenServiceTests(TestCase):
    async def test_taken_port_is_one_line(self) -> None:
        """A listener whose port is taken fails to start with ListenFailed: one line naming the
        program, the endpoint, why and what to set; a SystemExit (no traceback) that is also
        a CannotListenError (an Exception, so twistd still cleans up)."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        description = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        for fast in (True, False):
            service = listen_service(
                description,
                Factory.forProtocol(Protocol),
                reactor,
                "prog",
                "--x / X",
                fast_path=fast,
            )
            with self.assertRaises(ListenFailed) as caught:
                service.privilegedStartService()
            failed = caught.exception
            expected = f"prog: cannot listen on {description}: address already in use (set --x / X)"
            self.assertEqual((str(failed), failed.code), (expected, expected))
            self.assertIsInstance(failed, SystemExit)
            self.assertIsInstance(failed, CannotListenError)
            self.assertIsInstance(failed, Exception)
