"""TLS connections in both modes through real sockets (the fast path's LeanTLSProtocol, stock
Twisted's TLSMemoryBIOProtocol): resumption, ALPN, close_notify, a large response under
backpressure, clients that vanish mid-handshake; and, in memory, what the fast path sends when."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHandshakeListener,
    IProtocolNegotiationFactory,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import directlyProvidedBy, implementer
from zope.interface.verify import verifyObject

from tests.certs import self_signed
from tests.fakes import FakeBackend, WritesKept, big_body
from tests.helpers import listen, spawn_worker
from vast_vespa.net import lean_tls
from vast_vespa.net.dispatch import OUTBOX
from vast_vespa.net.lean_tls import LeanTLSFactory, LeanTLSProtocol
from vast_vespa.net.listen import SendNowEndpoint, listen_service
from vast_vespa.net.tls import TICKET_KEY_LIFETIME, server_tls

BIG = 8 * 2**20  # more than a loopback socket's buffers hold: the producer must pause
CHUNK = 2**16


@implementer(IPushProducer)
class Pattern:
    """Writes ``BIG`` bytes of a pattern to a request, as fast as the transport lets it, and
    fires ``paused`` the first time the transport pauses it."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.sent = 0
        self.is_paused = False
        self.paused: Deferred[None] = Deferred()
        request.setHeader(b"content-length", b"%d" % BIG)
        request.registerProducer(self, True)

    def resumeProducing(self) -> None:
        self.is_paused = False
        while not self.is_paused and self.sent < BIG:
            self.request.write(chunk(self.sent))
            self.sent += CHUNK
        if self.sent >= BIG and not self.is_paused:
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.is_paused = True
        if not self.paused.called:
            self.paused.callback(None)

    def stopProducing(self) -> None:
        self.sent = BIG


def chunk(offset: int) -> bytes:
    return (b"%08x" % offset) * (CHUNK // 8)


class Pages(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.producers: list[Pattern] = []

    def render_GET(self, request: Request) -> bytes | int:
        if request.path == b"/big":
            self.producers.append(Pattern(request))
            reactor.callLater(0, self.producers[-1].resumeProducing)
            return NOT_DONE_YET
        return b"hello"


class HTTP11Site(Site):
    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


def get(
    port: int,
    client: ssl.SSLContext,
    path: str = "/",
    session: ssl.SSLSession | None = None,
    before_reading: threading.Event | None = None,
) -> tuple[bool | None, ssl.SSLSession | None, str | None, bytes]:
    """GET ``path`` over a new TLS connection (blocking: run in a thread), reading to the
    end; a connection that ends without close_notify raises ``ssl.SSLEOFError``. (resumed, the
    session, the ALPN protocol, the response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with client.wrap_socket(
            raw, server_hostname="127.0.0.1", session=session, suppress_ragged_eofs=False
        ) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            if before_reading is not None:
                before_reading.wait(20)
            response = []
            while piece := tls.recv(2**20):
                response.append(piece)
            return tls.session_reused, tls.session, tls.selected_alpn_protocol(), b"".join(response)


def handshake(port: int, client: ssl.SSLContext) -> tuple[str, bytes]:
    """A TLS handshake alone (blocking: run in a thread); (the cipher, the server's
    certificate in DER)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cipher = tls.cipher()
            der = tls.getpeercert(binary_form=True)
            assert cipher is not None and der is not None
            return cipher[0], der


if TYPE_CHECKING:
    _TestCaseMixin = TestCase  # what the mixin is mixed into
else:
    _TestCaseMixin = object


class EndToEnd(_TestCaseMixin):
    """Both modes, through real sockets; subclasses say which."""

    fast_path: bool

    def setUp(self) -> None:
        self.cert, self.key, pem = self_signed(os.path.abspath(self.mktemp()))
        self.client = ssl.create_default_context(cadata=pem.decode("ascii"))
        self.client.set_alpn_protocols(["h2", "http/1.1"])
        found = server_tls(f"ssl:0:privateKey={self.key}:certKey={self.cert}", Clock())
        assert found is not None
        self.tls = found[1]

    async def listen(self, factory: Factory[Any]) -> tuple[int, Any]:
        """Listen as :func:`listen_service` does in this mode; (port, the TLS factory)."""
        endpoint: Any = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        if self.fast_path:
            tls_factory: Any = LeanTLSFactory(self.tls, factory, reactor)
            endpoint = SendNowEndpoint(endpoint)
        else:
            tls_factory = TLSMemoryBIOFactory(self.tls, False, factory, reactor)
        port = await endpoint.listen(tls_factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port, tls_factory

    async def test_ec_key(self) -> None:
        """An EC P-256 key (start_server.sh's first choice) is served over TLS 1.3 and 1.2
        (ECDHE-ECDSA), and a session resumes."""
        cert, key, pem = self_signed(os.path.abspath(self.mktemp()), "ec")
        found = server_tls(f"ssl:0:privateKey={key}:certKey={cert}", Clock())
        assert found is not None
        self.tls = found[1]
        port, _ = await self.listen(HTTP11Site(Pages()))
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            client = ssl.create_default_context(cadata=pem.decode("ascii"))
            client.maximum_version = version
            cipher, der = await deferToThread(handshake, port, client)
            public = x509.load_der_x509_certificate(der).public_key()
            self.assertIsInstance(public, ec.EllipticCurvePublicKey)
            if version == ssl.TLSVersion.TLSv1_2:
                self.assertTrue(cipher.startswith("ECDHE-ECDSA-"), cipher)
            first, session, _, response = await deferToThread(get, port, client)
            resumed, _, _, again = await deferToThread(get, port, client, "/", session)
            self.assertEqual((first, resumed), (False, True))
            self.assertTrue(response.endswith(b"hello") and again.endswith(b"hello"))

    async def test_resumption_alpn_close_notify(self) -> None:
        """A first connection, then one resuming its session: both answered, ALPN chosen,
        each ended with close_notify (or the client raises)."""
        self.pages = Pages()
        port, _ = await self.listen(HTTP11Site(self.pages))
        first, session, protocol, response = await deferToThread(get, port, self.client)
        self.assertTrue(response.endswith(b"hello"), response)
        self.assertEqual((first, protocol), (False, "http/1.1"))
        second, _, _, response = await deferToThread(get, port, self.client, "/", session)
        self.assertTrue(second)
        self.assertTrue(response.endswith(b"hello"))

    async def test_large_response_with_backpressure(self) -> None:
        """A body larger than the sockets hold, to a client that reads only once the server
        has been paused: it arrives whole and in order."""
        pages = Pages()
        port, _ = await self.listen(HTTP11Site(pages))
        reading = threading.Event()
        got = deferToThread(get, port, self.client, "/big", None, reading)
        while not pages.producers:  # the request has arrived once its producer exists
            await deferLater0()
        await pages.producers[0].paused
        reading.set()
        _, _, _, response = await got
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        expected = hashlib.sha256(b"".join(chunk(o) for o in range(0, BIG, CHUNK)))
        self.assertEqual(len(body), BIG)
        self.assertEqual(hashlib.sha256(body).hexdigest(), expected.hexdigest())

    async def vanishing(self, send: bytes) -> Failure:
        """Connect, send ``send`` (part of a handshake), and close; the reason the server's
        protocol was told its connection was lost."""
        lost: Deferred[list[Failure]] = Deferred()

        class Watch(Protocol):
            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                lost.callback([reason])

        port, tls_factory = await self.listen(Factory.forProtocol(Watch))
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(send)
        raw.close()
        [reason] = await lost
        self.assertEqual(tls_factory.protocols, {})
        return reason

    async def test_client_vanishes_after_hello(self) -> None:
        """A client that sends its ClientHello and goes: the connection is closed, nothing is
        logged as an error."""
        hello = ssl.MemoryBIO()
        client = self.client.wrap_bio(ssl.MemoryBIO(), hello, server_hostname="127.0.0.1")
        self.assertRaises(ssl.SSLWantReadError, client.do_handshake)
        await self.vanishing(hello.read())
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_client_vanishes_mid_hello(self) -> None:
        """A client that sends half a record and goes."""
        await self.vanishing(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_interfaces(self) -> None:
        """The TLS transport a protocol sees provides, in both modes, a TCP connection's
        interfaces and TLS's, with every method they name; the TCP connection's own reach it
        (Nagle, keep-alive, the addresses, reading paused and resumed)."""
        made: Deferred[Any] = Deferred()

        class Keep(Protocol):
            def connectionMade(self) -> None:
                made.callback(self.transport)

        port, _ = await self.listen(Factory.forProtocol(Keep))
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(b"\x16")  # the fast path's listener hands over a connection with bytes in
        self.addCleanup(raw.close)
        transport = await made
        for interface in TRANSPORT_INTERFACES:
            verifyObject(interface, transport)
        if self.fast_path:
            self.assertEqual(list(directlyProvidedBy(transport)), [])
        self.assertEqual(transport.getPeer().port, raw.getsockname()[1])
        self.assertEqual(transport.getHost().port, port)
        for enabled in (True, False):
            transport.setTcpNoDelay(enabled)
            transport.setTcpKeepAlive(enabled)
            self.assertEqual(
                (bool(transport.getTcpNoDelay()), bool(transport.getTcpKeepAlive())),
                (enabled, enabled),
            )
        tcp = transport.transport
        transport.pauseProducing()
        self.assertNotIn(tcp, reactor.getReaders())
        transport.resumeProducing()
        self.assertIn(tcp, reactor.getReaders())
        transport.stopProducing()  # the TCP connection's: reading stops, it closes
        self.assertNotIn(tcp, reactor.getReaders())
        self.assertTrue(tcp.disconnecting)


# What a protocol may use of its TLS transport, in both modes.
TRANSPORT_INTERFACES = (ITCPTransport, ISSLTransport, IPushProducer, IConsumer, ISystemHandle)


def deferLater0() -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0, lambda: None)


class FastPathTLSTests(EndToEnd, TestCase):
    fast_path = True


class StockTLSTests(EndToEnd, TestCase):
    fast_path = False


class WorkerOverTLSTests(TestCase):
    """A worker process serving an ``ssl:`` listener, in both modes (the fast path's event
    loop holding writes for the turn, or stock Twisted): a large response arrives whole and
    ends with close_notify, a second connection resumes its session, and the backend hears
    that the client spoke https."""

    async def through_worker(self, fast_path: bool) -> None:
        cert, key, pem = self_signed(os.path.abspath(self.mktemp()))
        client = ssl.create_default_context(cadata=pem.decode("ascii"))
        backend = FakeBackend(reactor)
        process = spawn_worker(
            self,
            listen(self, backend),
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            env={"FAST_PATH": "true" if fast_path else "false"},
        )
        port = int((await process.wait_for(rb"worker \(TLS\) starting on (\d+)")).group(1))
        await process.wait_for(rb"worker loaded")
        self.assertEqual(b"fast path off" not in process.output, fast_path)
        total = 16 * 2**20
        _, session, _, response = await deferToThread(get, port, client, f"/big?total={total}")
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertEqual(len(body), total)
        self.assertEqual(body, big_body(total))
        resumed, _, _, response = await deferToThread(get, port, client, "/status/200", session)
        self.assertTrue(resumed)
        self.assertTrue(response.endswith(b'{"status": 200}'), response)
        self.assertEqual(backend.seen[-1].headers[b"x-forwarded-proto"], [b"https"])

    async def test_fast_path(self) -> None:
        await self.through_worker(True)

    async def test_stock(self) -> None:
        await self.through_worker(False)

    async def refusals(self, fast_path: bool) -> None:
        """Answers the worker refuses with and closes are delivered over TLS, then
        close_notify: a 503 to a connection over MAX_CONNECTIONS (written before the
        handshake is over) and a 400 to a malformed request (the half-close that keeps
        reading is close_notify: one of the TCP stream would cut the TLS one short)."""
        cert, key, pem = self_signed(os.path.abspath(self.mktemp()))
        client = ssl.create_default_context(cadata=pem.decode("ascii"))
        process = spawn_worker(
            self,
            listen(self, FakeBackend(reactor)),
            "--listen",
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
            "--max-connections=1",
            env={"FAST_PATH": "true" if fast_path else "false"},
        )
        port = int((await process.wait_for(rb"worker \(TLS\) starting on (\d+)")).group(1))
        await process.wait_for(rb"worker loaded")
        # The one connection allowed, busy (a request head under way): not reclaimable.
        busy = await deferToThread(exchange, port, client, b"GET / HTTP/1.1\r\nHost: x\r\n", False)
        self.addCleanup(busy.close)
        answer = await deferToThread(exchange, port, client, b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"too many connections", answer)
        # The busy connection's head goes on with a malformed line.
        answer = await deferToThread(finish, busy, b"X-A: a\x01b\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)

    async def test_refusals_fast_path(self) -> None:
        await self.refusals(True)

    async def test_refusals_stock(self) -> None:
        await self.refusals(False)


def exchange(port: int, client: ssl.SSLContext, payload: bytes, read: bool = True) -> Any:
    """Send ``payload`` over a new TLS connection (blocking: run in a thread); with ``read``,
    what :func:`finish` returns, else the connection, open."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    tls = client.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
    tls.sendall(payload)
    return finish(tls) if read else tls


def finish(tls: ssl.SSLSocket, payload: bytes = b"") -> bytes:
    """Send ``payload`` and read everything answered until close_notify (an end without it
    raises ``ssl.SSLEOFError``); then close (blocking: run in a thread)."""
    with tls:
        tls.sendall(payload)
        answer = []
        while piece := tls.recv(2**16):
            answer.append(piece)
        return b"".join(answer)


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """The application side: what it received, whether the handshake ended, and why its
    connection was lost."""

    def __init__(self) -> None:
        self.received = b""
        self.handshakes = 0
        self.reason: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason


@implementer(IPushProducer)
class Producer:
    stopped = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class InMemoryTests(SynchronousTestCase):
    """LeanTLSProtocol against an OpenSSL client, bytes carried by hand."""

    def setUp(self) -> None:
        cert, key, _ = self_signed(os.path.abspath(self.mktemp()))
        found = server_tls(f"ssl:443:privateKey={key}:certKey={cert}", Clock())
        assert found is not None
        self.factory = LeanTLSFactory(found[1], Factory.forProtocol(Recorder), Clock())
        self.addCleanup(setattr, OUTBOX, "open", False)
        self.addCleanup(OUTBOX.waiting.clear)
        self.connect()
        self.handshake()

    def connect(self) -> None:
        """A new connection and client, before the handshake."""
        self.server = self.factory.buildProtocol(None)
        self.app = cast(Recorder, self.server.wrappedProtocol)
        self.transport = WritesKept()
        self.server.makeConnection(self.transport)
        self.client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
        self.client.set_connect_state()

    def carry(self) -> None:
        """Move bytes both ways until neither side has more to say."""
        while True:
            moved = False
            try:
                self.server.dataReceived(self.client.bio_read(2**20))
                moved = True
            except SSL.WantReadError:
                pass
            if self.transport.value():
                self.client.bio_write(self.transport.value())
                self.transport.clear()
                moved = True
            if not moved:
                return

    def handshake(self) -> None:
        for _ in range(5):
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            self.carry()
        self.transport.writes.clear()

    def client_reads(self) -> bytes:
        """What the client reads: from the transport and what carry() has moved already."""
        if self.transport.value():
            self.client.bio_write(self.transport.value())
            self.transport.clear()
        data = b""
        try:
            while True:
                data += self.client.recv(2**20)
        except (SSL.WantReadError, SSL.ZeroReturnError):
            return data

    def test_same_interfaces_for_every_transport(self) -> None:
        """The class says what a connection provides: nothing is declared per connection,
        whatever its transport provides; and it has no ``__getattr__``, which would make
        every attribute read of it CPython's slow one."""
        self.assertEqual(list(directlyProvidedBy(self.server)), [])

        @implementer(IAddress)
        class Odd(StringTransport):
            pass

        other = LeanTLSProtocol(self.server.factory, Recorder())
        other.makeConnection(Odd())
        self.assertEqual(list(directlyProvidedBy(other)), [])
        self.assertFalse(IAddress.providedBy(other))
        self.assertTrue(ITCPTransport.providedBy(other))
        self.assertFalse(hasattr(LeanTLSProtocol, "__getattr__"))

    def test_log_prefix(self) -> None:
        """The wrapped protocol's log prefix, marked TLS, as its factory's is the wrapped
        factory's."""
        self.assertEqual(self.server.logPrefix(), "Recorder (TLS)")
        self.assertEqual(self.factory.logPrefix(), "Factory (TLS)")

    def test_writes_in_a_turn_leave_together(self) -> None:
        """While the reactor dispatches a turn's events, writes wait; when the turn is over
        they are encrypted together and written to the transport once."""
        OUTBOX.open = True
        self.server.write(b"head ")
        self.server.writeSequence([b"body ", b"end"])
        self.assertEqual(self.transport.writes, [])
        OUTBOX.send_all()
        self.assertEqual(len(self.transport.writes), 1)
        self.assertEqual(self.client_reads(), b"head body end")

    def test_close_in_a_turn(self) -> None:
        """A response and loseConnection in one turn: one write, the response then the
        close_notify; the client's close_notify closes the transport."""
        OUTBOX.open = True
        self.server.write(b"last words")
        self.server.loseConnection()
        self.assertEqual(len(self.transport.writes), 1)
        self.assertEqual(self.client_reads(), b"last words")
        self.assertTrue(self.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        OUTBOX.send_all()
        self.assertEqual(len(self.transport.writes), 1)
        self.client.shutdown()
        self.server.dataReceived(self.client.bio_read(2**20))
        self.assertTrue(self.transport.disconnecting)

    def test_handshake_output_waits_for_the_turn(self) -> None:
        """Output made while a turn's input is handled (here a reply to the client's data)
        leaves when the turn is over, with the turn's writes, in one write."""
        OUTBOX.open = True
        self.client.send(b"request")
        self.server.dataReceived(self.client.bio_read(2**20))
        self.server.write(b"answer")
        OUTBOX.send_all()
        self.assertEqual(self.app.received, b"request")
        self.assertLessEqual(len(self.transport.writes), 1)
        self.assertEqual(self.client_reads(), b"answer")

    def test_write_outside_a_turn_leaves_at_once(self) -> None:
        self.server.write(b"from a timer")
        self.assertEqual(len(self.transport.writes), 1)
        self.assertEqual(self.client_reads(), b"from a timer")

    def test_abort_drops_what_is_held(self) -> None:
        OUTBOX.open = True
        self.server.write(b"never")
        self.server.abortConnection()
        OUTBOX.send_all()
        self.assertEqual(self.transport.value(), b"")  # not even a close_notify
        self.assertTrue(self.transport.disconnecting)

    def test_several_records_in_one_read(self) -> None:
        """Bytes that hold several records (two writes, and a body longer than one record
        holds) are all delivered from one read, and a close_notify after them is seen."""
        body = os.urandom(40_000)
        self.client.send(b"first ")
        self.client.sendall(body)
        self.client.shutdown()
        self.server.dataReceived(self.client.bio_read(2**20))
        self.assertEqual(self.app.received, b"first " + body)
        self.assertTrue(self.transport.disconnecting)  # the close_notify answered

    def test_record_longer_than_a_read(self) -> None:
        """A record whose cleartext takes several reads is all delivered: a read that fills
        what it asked for is followed by another, though the bytes in are all taken."""
        self.patch(lean_tls, "READ_SIZE", 1000)
        body = os.urandom(5_500)  # one record
        self.client.sendall(body)
        self.server.dataReceived(self.client.bio_read(2**20))
        self.assertEqual(self.app.received, body)

    def test_handshake_completed(self) -> None:
        self.assertEqual(self.app.handshakes, 1)
        self.assertIsInstance(self.server.getHandle(), ssl.SSLObject)
        self.assertIsNone(self.server.getPeerCertificate())  # none asked for
        self.assertIsNone(self.server.negotiatedProtocol)  # the factory offers no ALPN

    def test_client_close_notify_first(self) -> None:
        """The client's close_notify is answered with the server's and the TCP connection
        closes; the wrapped protocol then hears a clean end."""
        self.client.shutdown()
        self.server.dataReceived(self.client.bio_read(2**20))
        self.assertTrue(self.transport.disconnecting)
        self.client_reads()
        self.assertTrue(self.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        self.server.connectionLost(Failure(ConnectionDone()))
        assert self.app.reason is not None
        self.assertIsInstance(self.app.reason.value, ConnectionDone)

    def test_end_without_close_notify(self) -> None:
        """The TCP connection ends without close_notify: what came before is delivered, and
        the wrapped protocol hears ConnectionLost (as from Twisted's TLS protocol)."""
        self.client.send(b"last bytes")
        self.server.dataReceived(self.client.bio_read(2**20))
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.app.received, b"last bytes")
        assert self.app.reason is not None
        self.assertIsInstance(self.app.reason.value, ConnectionLost)
        self.assertEqual(self.factory.protocols, {})

    def resumes_after(self, end: Callable[[], object]) -> None:
        """The client takes its tickets and shuts its side down (an OpenSSL client that does
        not makes its own session unresumable), ``end`` ends the connection on the server's
        side, and a new connection offering the client's session resumes it."""
        self.client_reads()  # the tickets
        session, context = self.client.get_session(), self.client.get_context()
        assert session is not None
        self.client.shutdown()
        end()
        self.assertGreater(self.factory.context().session_stats()["number"], 0)
        self.connect()
        self.client = SSL.Connection(context)  # a session resumes on its own context only
        self.client.set_connect_state()
        self.client.set_session(session)
        self.handshake()
        handle = self.server.getHandle()
        assert handle is not None
        self.assertTrue(handle.session_reused)

    def test_resumes_after_close_notify(self) -> None:
        def end() -> None:
            self.server.dataReceived(self.client.bio_read(2**20))
            self.server.connectionLost(Failure(ConnectionDone()))

        self.resumes_after(end)

    def test_resumes_after_an_end_without_close_notify(self) -> None:
        """A connection that ends without the client's close_notify reaching the server
        (one that closes its socket without it, or whose close_notify is lost) leaves its
        session resumable (OpenSSL drops a stateful ticket's session when its connection
        fails), and the wrapped protocol still hears that the connection was cut."""
        first = self.app
        self.resumes_after(lambda: self.server.connectionLost(Failure(ConnectionDone())))
        assert first.reason is not None
        self.assertIsInstance(first.reason.value, ConnectionLost)

    def test_resumes_after_an_abort(self) -> None:
        def end() -> None:
            self.server.abortConnection()
            self.server.connectionLost(Failure(ConnectionAborted()))

        self.resumes_after(end)

    def test_left_mid_handshake(self) -> None:
        self.connect()
        self.assertRaises(SSL.WantReadError, self.client.do_handshake)
        self.server.dataReceived(self.client.bio_read(2**20)[:20])
        self.server.connectionLost(Failure(ConnectionDone()))
        assert self.app.reason is not None
        self.assertIsInstance(self.app.reason.value, ConnectionLost)
        self.assertEqual((self.app.handshakes, self.app.received), (0, b""))

    def test_not_tls(self) -> None:
        """Plain HTTP to the TLS port fails the handshake: the server sends its alert and
        closes, and the wrapped protocol hears the TLS error."""
        self.connect()
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.server.connectionLost(Failure(ConnectionDone()))
        assert self.app.reason is not None
        self.assertIsInstance(self.app.reason.value, ssl.SSLError)
        self.assertEqual(self.app.received, b"")
        producer = Producer()
        self.server.registerProducer(producer, True)  # the session is over: stopped at once
        self.assertTrue(producer.stopped)

    def test_writes_before_the_handshake_wait_for_it(self) -> None:
        self.connect()
        self.server.write(b"early")
        self.assertEqual(self.transport.value(), b"")
        self.handshake()
        self.assertEqual(self.client_reads(), b"early")

    def test_close_before_the_handshake_ends_aborts(self) -> None:
        """A close before the handshake ends (OpenSSL would not send close_notify yet) and
        with nothing written aborts the connection; with something written, the handshake
        goes on and the close follows what was written."""
        self.connect()
        self.server.loseConnection()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")
        self.connect()
        self.server.write(b"408 and goodbye")
        self.server.loseConnection()
        self.assertFalse(self.transport.disconnecting)
        self.handshake()
        self.assertEqual(self.client_reads(), b"408 and goodbye")
        self.assertTrue(self.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN)

    def test_close_waits_for_the_producer(self) -> None:
        """With a producer registered, loseConnection waits for it to be unregistered; the
        writes it makes meanwhile still go out, then close_notify."""
        producer = Producer()
        self.server.registerProducer(producer, True)
        self.assertIs(self.transport.producer, producer)
        self.server.loseConnection()
        self.server.write(b"more")
        self.assertEqual(self.client_reads(), b"more")
        self.assertFalse(self.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        self.server.unregisterProducer()
        self.assertIsNone(self.transport.producer)
        self.client_reads()
        self.assertTrue(self.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN)
        self.server.write(b"too late")
        self.assertEqual(self.transport.value(), b"")


@implementer(IProtocolNegotiationFactory)
class HTTP11Recorders(Factory):
    protocol = Recorder

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


class ContextTests(SynchronousTestCase):
    """The fast path's Python ssl context: the listener's settings, replaced as often."""

    def setUp(self) -> None:
        cert, key, _ = self_signed(os.path.abspath(self.mktemp()))
        self.clock = Clock()
        found = server_tls(f"ssl:443:privateKey={key}:certKey={cert}", self.clock)
        assert found is not None
        self.factory = LeanTLSFactory(found[1], HTTP11Recorders(), self.clock)

    def test_settings(self) -> None:
        context = self.factory.context()
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)
        self.assertTrue(context.options & ssl.OP_NO_COMPRESSION)
        self.assertTrue(context.options & ssl.OP_NO_RENEGOTIATION)
        # Stateful TLS 1.3 tickets, and an end without close_notify that keeps the session:
        self.assertTrue(context.options & ssl.OP_NO_TICKET)
        self.assertTrue(context.options & ssl.OP_IGNORE_UNEXPECTED_EOF)
        tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        self.assertTrue(tls12)
        for name in tls12:
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20" in name, name)

    def test_alpn_from_the_site(self) -> None:
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        client.set_alpn_protocols(["h2", "http/1.1"])
        app = self.factory.buildProtocol(None)
        transport = WritesKept()
        app.makeConnection(transport)
        into, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = client.wrap_bio(into, out)
        for _ in range(3):
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            if out.pending:
                app.dataReceived(out.read())
            into.write(transport.value())
            transport.clear()
        self.assertEqual(tls.selected_alpn_protocol(), "http/1.1")
        self.assertEqual(app.negotiatedProtocol, b"http/1.1")

    def test_one_context_until_the_keys_expire(self) -> None:
        first = self.factory.context()
        self.clock.advance(TICKET_KEY_LIFETIME - 1)
        self.assertIs(self.factory.context(), first)
        self.clock.advance(1)
        second = self.factory.context()
        self.assertIsNot(second, first)
        self.assertIs(self.factory.context(), second)


class ListenerTests(SynchronousTestCase):
    def test_tls_protocol_per_mode(self) -> None:
        """An ssl: listener's connections are LeanTLSProtocol on the fast path, Twisted's own
        TLS protocol on stock Twisted."""
        cert, key, _ = self_signed(os.path.abspath(self.mktemp()))
        for fast_path, expected in ((True, LeanTLSProtocol), (False, None)):
            memory = MemoryReactorClock()
            service = listen_service(
                f"ssl:0:privateKey={key}:certKey={cert}",
                Site(Resource()),
                memory,
                "vespa",
                "--listen",
                fast_path=fast_path,
            )
            service.startService()
            factory = memory.tcpServers[0][1]
            if expected is None:
                self.assertIsInstance(factory, TLSMemoryBIOFactory)
            else:
                self.assertIsInstance(factory, LeanTLSFactory)
                self.assertIs(cast(LeanTLSFactory, factory).protocol, expected)
