"""
vast_vespa.net.client against real sockets on 127.0.0.1: keep-alive, response framing, the request on
the wire, failures, cancellation, flow control, the pool, and an answer that comes before the
request body was sent. The backends are raw protocols sending exact bytes (httptools parses
what they receive), so every framing case is the one written here.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import random
import struct
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from httptools import HttpParserError, HttpRequestParser
from twisted.internet import reactor, tcp
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import (
    IAddress,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.task import Clock, Cooperator, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import (
    FileBodyProducer,
    RequestNotSent,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from tests.helpers import FAST_PATH, listen, until
from vast_vespa.net.client import (
    POOL_CLOSE_TIMEOUT,
    READ_SIZE,
    BadResponseHead,
    BytesProducer,
    ConnectionPool,
    LeanAgent,
    Response,
    _Connection,
    backend_agent,
    backend_pool,
    close_pool,
)
from vast_vespa.net.dispatch import OUTBOX

if TYPE_CHECKING:
    from twisted.web.http import _GenericHTTPChannelProtocol

# ---- a scripted backend ------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the backend parsed it (header names in lower case)."""

    method: bytes = b""
    target: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


Answer = bytes | Callable[["ServerConnection", Seen], None]


class ServerConnection(Protocol):
    """One backend connection: keeps the raw bytes it got, parses requests, answers each."""

    def __init__(self, backend: ScriptedBackend) -> None:
        self.backend = backend
        self.raw = bytearray()
        self.requests: list[Seen] = []
        self.closed: Deferred[None] = Deferred()
        self._parser = HttpRequestParser(self)
        self._seen = Seen()

    @property
    def tcp(self) -> ITCPTransport:
        """Its transport: the TCP connection (or helpers.listen's wrapper, which provides
        the same interfaces)."""
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        self.backend.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        try:
            self._parser.feed_data(data)
        except HttpParserError:
            self.tcp.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)

    def on_message_begin(self) -> None:
        self._seen = Seen()

    def on_url(self, url: bytes) -> None:
        self._seen.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._seen.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._seen.method = self._parser.get_method()
        if self.backend.on_headers is not None:
            self.backend.on_headers(self, self._seen)

    def on_body(self, data: bytes) -> None:
        self._seen.body += data

    def on_message_complete(self) -> None:
        self.requests.append(self._seen)
        self.backend.received(self, self._seen)


class ScriptedBackend(Factory):
    """Answers the n-th request with ``answers[n]`` (the last one repeats): bytes to write,
    or a callable(connection, request). ``on_headers`` runs once a request's head is in."""

    def __init__(
        self, answers: tuple[Answer, ...], on_headers: Callable[..., None] | None = None
    ) -> None:
        self.answers = answers
        self.on_headers = on_headers
        self.connections: list[ServerConnection] = []
        self.requests: list[Seen] = []
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def buildProtocol(self, addr: Any) -> ServerConnection:
        return ServerConnection(self)

    def received(self, connection: ServerConnection, seen: Seen) -> None:
        answer = self.answers[min(len(self.requests), len(self.answers) - 1)]
        self.requests.append(seen)
        if callable(answer):
            answer(connection, seen)
        else:
            connection.tcp.write(answer)
        for waiter in [w for w in self._waiters if len(self.requests) >= w[0]]:
            self._waiters.remove(waiter)
            waiter[1].callback(None)

    def arrived(self, count: int) -> Deferred[None]:
        """Fires once ``count`` requests in all have fully arrived."""
        waiter: Deferred[None] = Deferred()
        if len(self.requests) >= count:
            waiter.callback(None)
        else:
            self._waiters.append((count, waiter))
        return waiter


def response(status: bytes, *headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    """A response as it goes on the wire."""
    return b"\r\n".join((b"HTTP/" + version + b" " + status, *headers, b"", b"")) + body


def ok(body: bytes = b"ok", *headers: bytes) -> bytes:
    """A keep-alive 200 with a Content-Length body."""
    return response(b"200 OK", b"Content-Length: %d" % len(body), *headers, body=body)


def hold(connection: ServerConnection, seen: Seen) -> None:
    """Never answer."""


def hang_up(connection: ServerConnection, seen: Seen) -> None:
    """Close without answering."""
    connection.tcp.loseConnection()


def in_pieces(*pieces: bytes, close: bool = False) -> Answer:
    """Write ``pieces`` one reactor turn apart (then close, with ``close``)."""

    def answer(connection: ServerConnection, seen: Seen) -> None:
        rest = list(pieces)

        def write() -> None:
            connection.tcp.write(rest.pop(0))
            if rest:
                reactor.callLater(0, write)
            elif close:
                connection.tcp.loseConnection()

        write()

    return answer


# ---- the client side ---------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class _RecordingEndpoint:
    def __init__(self, endpoint: TCP4ClientEndpoint, recording: RecordingEndpoints) -> None:
        self._endpoint = endpoint
        self._recording = recording

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        return self._endpoint.connect(factory).addCallback(self._recording.record)


@implementer(IAgentEndpointFactory)
class RecordingEndpoints:
    """TCP endpoints that remember every client connection they made, and when each was
    lost (``closed[i]``)."""

    def __init__(self) -> None:
        self.connections: list[Any] = []
        self.closed: list[Deferred[None]] = []

    def endpointForURI(self, uri: Any) -> _RecordingEndpoint:
        endpoint = TCP4ClientEndpoint(reactor, uri.host.decode(), uri.port, timeout=5)
        return _RecordingEndpoint(endpoint, self)

    def record(self, protocol: Any) -> Any:
        lost: Deferred[None] = Deferred()
        told = protocol.connectionLost

        def connection_lost(reason: Failure) -> None:
            told(reason)
            lost.callback(None)

        protocol.connectionLost = connection_lost  # the pool's own connection class
        self.connections.append(protocol)
        self.closed.append(lost)
        return protocol


class BodyReader(Protocol):
    """Collects a response body; ``ended()`` gives the reason it ended. ``on_data(reader)``
    runs after each piece (to pause or stop the transport)."""

    def __init__(self, on_data: Callable[[BodyReader], None] | None = None) -> None:
        self.chunks: list[bytes] = []
        self.on_data = on_data
        self.done: Deferred[None] = Deferred()
        self.got_data: Deferred[None] = Deferred()  # fires with the first piece
        self.reason: Failure | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def response(self) -> Response:
        """Its transport: the LeanAgent's Response that delivers the body."""
        return cast(Response, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.on_data is not None:
            self.on_data(self)
        if not self.got_data.called:
            self.got_data.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.reason = reason
        self.done.callback(None)

    async def ended(self) -> Failure:
        await self.done
        assert self.reason is not None
        return self.reason


@dataclass
class Fetched:
    response: Any
    body: bytes
    reason: Failure


class Client:
    """A LeanAgent with its own pool; its connections are recorded (server-side counts say
    whether a connection was reused)."""

    def __init__(self, pool: ConnectionPool, limits: tuple[int, int] | None = None) -> None:
        self.pool = pool
        self.endpoints = RecordingEndpoints()
        self.agent = LeanAgent(pool, self.endpoints, True, *(limits or ()))

    @property
    def connections(self) -> list[Any]:
        return self.endpoints.connections

    def request(
        self, url: bytes, method: bytes = b"GET", headers: Headers | None = None, body: Any = None
    ) -> Deferred[Any]:
        return self.agent.request(method, url, headers, body)

    async def fetch(
        self,
        url: bytes,
        method: bytes = b"GET",
        headers: Headers | None = None,
        body: Any = None,
        reader: BodyReader | None = None,
    ) -> Fetched:
        answer = await self.request(url, method, headers, body)
        reader = reader or BodyReader()
        answer.deliverBody(reader)
        reason = await reader.ended()
        return Fetched(answer, reader.data, reason)


@implementer(IBodyProducer)
class PiecesProducer:
    """A request body written one piece per reactor turn; with ``finish=False`` it never
    says it is done (a body still being sent)."""

    def __init__(
        self, pieces: list[bytes], length: Any = UNKNOWN_LENGTH, finish: bool = True
    ) -> None:
        self.pieces = list(pieces)
        self.length = length
        self.finish = finish
        self.stopped = False
        self._done: Deferred[None] = Deferred()
        self._call: Any = None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._next()
        return self._done

    def _next(self) -> None:
        if self.pieces:
            self._consumer.write(self.pieces.pop(0))
            self._call = reactor.callLater(0, self._next)
        elif self.finish:
            self._done.callback(None)

    def pauseProducing(self) -> None:
        """Small pieces: nothing to pause."""

    def resumeProducing(self) -> None:
        """See pauseProducing."""

    def stopProducing(self) -> None:
        self.stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()


def unread(connection: Any) -> int:
    """Bytes waiting in the kernel's receive buffer of a client connection."""
    handle = connection.transport.getHandle()
    count: int = struct.unpack("i", fcntl.ioctl(handle.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return count


def netloc(url: bytes) -> bytes:
    return url.split(b"://", 1)[1]


class Http11Case(TestCase):
    timeout = 20  # a hang (a body that never ends, a paused connection) fails, not blocks

    def serve(
        self, *answers: Answer, on_headers: Callable[..., None] | None = None
    ) -> tuple[bytes, ScriptedBackend]:
        backend = ScriptedBackend(answers, on_headers)
        return listen(self, backend).encode(), backend

    def client(
        self, clock: Clock | None = None, limits: tuple[int, int] | None = None, **pool_options: Any
    ) -> Client:
        """A client whose connections are aborted at the end of the test. Its pool's idle
        timers run on ``clock`` (a Clock nobody advances by default: a connection that is
        wrongly kept is not rescued by the idle timeout); ``limits``: the largest response
        head and the most headers."""
        client = Client(ConnectionPool(clock or Clock(), **pool_options), limits)

        async def close() -> None:
            for connection in client.connections:
                if connection.transport.connected:
                    connection.transport.abortConnection()
            await gatherResults(client.endpoints.closed)

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return client

    def assertReason(self, reason: Failure, kind: type) -> None:
        self.assertIsInstance(reason.value, kind, reason)

    async def assert_fresh_connection_works(
        self, client: Client, url: bytes, backend: ScriptedBackend, body: bytes = b"after"
    ) -> None:
        """The next request is served, on a connection of its own."""
        before = len(backend.connections)
        fetched = await client.fetch(url + b"/after")
        self.assertEqual((fetched.response.code, fetched.body), (200, body))
        self.assertEqual(len(backend.connections), before + 1)


# ---- 1. keep-alive -----------------------------------------------------------------------


class KeepAliveTests(Http11Case):
    async def test_sequential_requests_share_one_connection(self) -> None:
        """Two requests one after the other go over one TCP connection."""
        url, backend = self.serve(ok(b"first"), ok(b"second"))
        client = self.client()
        first = await client.fetch(url + b"/1")
        second = await client.fetch(url + b"/2")
        self.assertEqual((first.body, second.body), (b"first", b"second"))
        self.assertReason(second.reason, ResponseDone)
        self.assertEqual(len(backend.connections), 1)
        self.assertEqual([s.target for s in backend.connections[0].requests], [b"/1", b"/2"])
        transport = client.connections[0].transport
        self.assertEqual(transport.bufferSize, READ_SIZE)  # big reads
        self.assertIs(transport.protocol, client.connections[0])  # no wrapper in between

    async def test_relay_agent_keeps_alive_with_twisted_web(self) -> None:
        """backend_agent/backend_pool as the relay builds them reuse a twisted.web connection."""

        class Hello(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> bytes:
                return b"hello " + request.path

        class CountingSite(Site):
            built = 0

            def buildProtocol(self, addr: IAddress | None) -> _GenericHTTPChannelProtocol | None:
                self.built += 1
                protocol: _GenericHTTPChannelProtocol | None = super().buildProtocol(addr)
                return protocol

        site = CountingSite(Hello())
        url = listen(self, site).encode()
        pool = backend_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        agent = backend_agent(reactor, pool, 5, fast_path=FAST_PATH)
        for path in (b"/a", b"/b"):
            answer = await agent.request(b"GET", url + path)
            reader = BodyReader()
            answer.deliverBody(reader)
            self.assertReason(await reader.ended(), ResponseDone)
            self.assertEqual((answer.code, reader.data), (200, b"hello " + path))
        self.assertEqual(site.built, 1)

    async def assert_not_reused(self, first: bytes) -> None:
        url, backend = self.serve(first, ok(b"after"))
        client = self.client()
        fetched = await client.fetch(url + b"/first")
        self.assertEqual((fetched.response.code, fetched.body), (200, b"ok"))
        self.assertReason(fetched.reason, ResponseDone)
        await self.assert_fresh_connection_works(client, url, backend)
        await backend.connections[0].closed  # the client closed it

    async def test_connection_close_is_not_reused(self) -> None:
        """A 'Connection: close' answer: the client closes that connection, opens a new one."""
        await self.assert_not_reused(ok(b"ok", b"Connection: close"))

    async def test_http10_answer_is_not_reused(self) -> None:
        """An HTTP/1.0 answer (no keep-alive): the connection is closed, not reused."""
        await self.assert_not_reused(
            response(b"200 OK", b"Content-Length: 2", body=b"ok", version=b"1.0")
        )


# ---- 2-4. response framing ----------------------------------------------------------------


class ResponseFramingTests(Http11Case):
    async def test_content_length_body(self) -> None:
        """A Content-Length body: code, phrase, headers, length and body as sent; ResponseDone."""
        url, _ = self.serve(ok(b"hello world", b"X-Backend: yes", b"X-Backend: again"))
        fetched = await self.client().fetch(url)
        answer = fetched.response
        self.assertEqual((answer.code, answer.phrase, answer.length), (200, b"OK", 11))
        self.assertEqual(answer.headers.getRawHeaders(b"x-backend"), [b"yes", b"again"])
        self.assertEqual(fetched.body, b"hello world")
        self.assertReason(fetched.reason, ResponseDone)

    async def test_head_split_across_reads(self) -> None:
        """A status line, header and body cut at odd places are put back together."""
        url, _ = self.serve(
            in_pieces(
                b"HTTP/1.1 200 O",
                b"K\r\nX-Lon",
                b"g: val",
                b"ue\r\nContent-Length: 5\r\n\r\nhel",
                b"lo",
            )
        )
        fetched = await self.client().fetch(url)
        self.assertEqual((fetched.response.phrase, fetched.body), (b"OK", b"hello"))
        self.assertEqual(fetched.response.headers.getRawHeaders(b"x-long"), [b"value"])
        self.assertReason(fetched.reason, ResponseDone)

    async def test_chunked_body_in_several_chunks(self) -> None:
        """A chunked body (chunks in separate writes, a trailer) arrives whole; the connection
        is reused and the trailer does not leak into the next answer's headers."""
        url, backend = self.serve(
            in_pieces(
                response(b"200 OK", b"Transfer-Encoding: chunked"),
                b"5\r\nhello\r\n",
                b"1\r\n \r\n5\r\nwor",
                b"ld\r\n0\r\nX-Trailer: t\r\n\r\n",
            ),
            ok(b"next"),
        )
        client = self.client()
        fetched = await client.fetch(url)
        self.assertEqual((fetched.body, fetched.response.length), (b"hello world", UNKNOWN_LENGTH))
        self.assertReason(fetched.reason, ResponseDone)
        following = await client.fetch(url)
        self.assertEqual(following.body, b"next")
        self.assertFalse(following.response.headers.hasHeader(b"x-trailer"))
        self.assertEqual(len(backend.connections), 1)

    async def test_close_delimited_body(self) -> None:
        """No Content-Length, not chunked: all the bytes arrive, then PotentialDataLoss."""
        url, backend = self.serve(
            in_pieces(response(b"200 OK"), b"part one, ", b"part two", close=True),
            ok(b"after"),
        )
        client = self.client()
        fetched = await client.fetch(url)
        self.assertEqual(
            (fetched.body, fetched.response.length), (b"part one, part two", UNKNOWN_LENGTH)
        )
        self.assertReason(fetched.reason, PotentialDataLoss)
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_body_in_the_read_with_the_head_is_there_when_the_response_is_told(self) -> None:
        """The response is told once the read that carried its head is parsed, so the body
        that came with the head is there at deliverBody (the relay writes both at once)."""
        answering: list[ServerConnection] = []

        def head_and_first(connection: ServerConnection, seen: Seen) -> None:
            connection.tcp.write(response(b"200 OK", b"Content-Length: 10", body=b"first"))
            answering.append(connection)  # the rest once the test has looked

        url, _ = self.serve(head_and_first)
        reader = BodyReader()
        at_once: list[bytes] = []

        def got(answer: Any) -> None:
            self.assertFalse(answer.ended)  # the rest is still to come
            answer.deliverBody(reader)
            at_once.append(reader.data)

        await self.client().request(url).addCallback(got)
        self.assertEqual(at_once, [b"first"])
        answering[0].tcp.write(b"later")
        self.assertReason(await reader.ended(), ResponseDone)
        self.assertEqual(reader.data, b"firstlater")

    async def test_a_body_that_came_whole_with_the_head_is_ended_when_told(self) -> None:
        """The whole body in the read with the head: the response says it is over already
        (the relay then has nothing to pause), and deliverBody gives it and its end."""
        url, _ = self.serve(ok(b"whole"))
        answer = await self.client().request(url)
        self.assertTrue(answer.ended)
        reader = BodyReader()
        answer.deliverBody(reader)
        self.assertTrue(reader.done.called)
        self.assertReason(await reader.ended(), ResponseDone)
        self.assertEqual(reader.data, b"whole")

    def test_body_stopped_while_its_early_part_is_delivered_ends_once(self) -> None:
        """A protocol that aborts the body while the part that came before deliverBody is
        handed to it gets nothing more, and hears of the end once."""

        class Connection:
            aborted = False

            def abort(self) -> None:
                self.aborted = True

        connection = Connection()
        answer = Response(connection, 200, b"OK", Headers(), 10)  # type: ignore[arg-type]
        answer.data(b"first")
        answer.data(b"second")
        reader = BodyReader(on_data=lambda reader: reader.response.abortConnection())
        answer.deliverBody(reader)
        self.assertTrue(connection.aborted)
        self.assertEqual(reader.chunks, [b"first"])
        assert reader.reason is not None
        self.assertReason(reader.reason, ResponseFailed)  # once: a second would raise here

    async def test_body_delivered_after_it_ended_is_replayed(self) -> None:
        """deliverBody called after the whole body came in still gets it, then ResponseDone."""
        url, backend = self.serve(ok(b"early bird"), ok(b"second"))
        client = self.client()
        answer = await client.request(url)
        await deferLater(reactor, 0, lambda: None)  # the rest of that read is parsed
        reader = BodyReader()
        answer.deliverBody(reader)
        self.assertTrue(reader.done.called)
        self.assertReason(await reader.ended(), ResponseDone)
        self.assertEqual(reader.data, b"early bird")
        self.assertEqual((await client.fetch(url)).body, b"second")
        self.assertEqual(len(backend.connections), 1)

    async def test_next_body_never_reaches_the_last_protocol(self) -> None:
        """On a reused connection, a body that comes before its deliverBody waits for its own
        protocol; the protocol of the answer before hears nothing more."""
        url, backend = self.serve(ok(b"first"), ok(b"second"))
        client = self.client()
        first = await client.fetch(url)
        answer = await client.request(url)
        await deferLater(reactor, 0, lambda: None)  # the second body is parsed already
        second = BodyReader()
        answer.deliverBody(second)
        self.assertReason(await second.ended(), ResponseDone)
        self.assertEqual((first.body, second.data), (b"first", b"second"))
        self.assertEqual(len(backend.connections), 1)

    async def test_head_with_content_length_ends(self) -> None:
        """A HEAD answer with a Content-Length ends at once (ResponseDone, no body)."""
        url, backend = self.serve(response(b"200 OK", b"Content-Length: 1000"), ok(b"after"))
        client = self.client()
        fetched = await client.fetch(url, method=b"HEAD")
        self.assertEqual((fetched.response.code, fetched.body), (200, b""))
        self.assertReason(fetched.reason, ResponseDone)
        self.assertEqual(backend.requests[0].method, b"HEAD")
        after = await client.fetch(url)
        self.assertEqual(after.body, b"after")

    async def test_204_and_304_have_no_body(self) -> None:
        """204 and 304 (even with a Content-Length) end with no body; keep-alive goes on."""
        url, backend = self.serve(
            response(b"204 No Content"),
            response(b"304 Not Modified", b"Content-Length: 10"),
            ok(b"after"),
        )
        client = self.client()
        for code in (204, 304):
            fetched = await client.fetch(url)
            self.assertEqual((fetched.response.code, fetched.body), (code, b""))
            self.assertReason(fetched.reason, ResponseDone)
        self.assertEqual((await client.fetch(url)).body, b"after")
        self.assertEqual(len(backend.connections), 1)

    async def assert_interim_skipped(self, answer: Answer) -> None:
        url, _ = self.serve(answer)
        fetched = await self.client().fetch(url, method=b"POST", body=BytesProducer(b"data"))
        answered = fetched.response
        self.assertEqual((answered.code, answered.phrase, fetched.body), (200, b"OK", b"real"))
        self.assertEqual(answered.headers.getRawHeaders(b"link"), None)
        self.assertReason(fetched.reason, ResponseDone)

    async def test_100_continue_is_skipped(self) -> None:
        """A 100 Continue before the 200 (same write) is skipped: the 200 is the answer."""
        await self.assert_interim_skipped(response(b"100 Continue") + ok(b"real"))

    async def test_103_early_hints_is_skipped(self) -> None:
        """A 103 with headers, then the 200 in a later write: the 200 alone is the answer."""
        hints = response(b"103 Early Hints", b"Link: </style.css>; rel=preload")
        await self.assert_interim_skipped(in_pieces(hints, ok(b"real")))


class ResponseHeadTests(Http11Case):
    """What of a backend's response head is refused, rewritten or passed on."""

    async def assert_bad_head(self, answer: Answer, why: str, **options: Any) -> None:
        """``answer`` fails the call with BadResponseHead saying ``why``; the connection goes
        and the next request is served on a new one."""
        url, backend = self.serve(answer, ok(b"after"))
        client = self.client(**options)
        failure = await self.assertFailure(client.request(url), ResponseNeverReceived)
        self.assertTrue(failure.reasons[0].check(BadResponseHead), failure.reasons)
        self.assertIn(why, str(failure.reasons[0].value))
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_head_over_the_limit(self) -> None:
        """A header line larger than the limit, in one write or in pieces, is refused."""
        big = b"X-Big: " + b"a" * 2000
        await self.assert_bad_head(ok(b"x", big), "over 1000 bytes", limits=(1000, 100))
        pieces = in_pieces(*(ok(b"x", big)[i : i + 100] for i in range(0, 2100, 100)))
        await self.assert_bad_head(pieces, "over 1000 bytes", limits=(1000, 100))

    async def test_interim_heads_count(self) -> None:
        """1xx heads count towards the same limit: endless 103s are refused."""
        hint = response(b"103 Early Hints", b"Link: </a.css>; rel=preload")
        await self.assert_bad_head(hint * 100 + ok(), "over 1000 bytes", limits=(1000, 100))

    async def test_too_many_headers(self) -> None:
        headers = [b"X-%d: 1" % i for i in range(11)]
        await self.assert_bad_head(ok(b"x", *headers), "more than 10", limits=(16384, 10))

    async def test_head_at_the_limit_is_served(self) -> None:
        """A head of exactly the limit, with its body in the same read, is served."""
        answer = ok(b"body", b"X-Pad: " + b"a" * 100)
        head_size = len(answer) - len(b"body")
        url, _ = self.serve(answer)
        fetched = await self.client(limits=(head_size, 3)).fetch(url)
        self.assertEqual((fetched.response.code, fetched.body), (200, b"body"))

    async def test_default_limits(self) -> None:
        """16 KiB and 100 headers, as on the request side."""
        await self.assert_bad_head(ok(b"x", b"X-Big: " + b"a" * 20000), "over 16384 bytes")
        headers = [b"X-%d: 1" % i for i in range(101)]
        await self.assert_bad_head(ok(b"x", *headers), "more than 100")

    async def test_status_below_100(self) -> None:
        await self.assert_bad_head(ok().replace(b"200 OK", b"099 Odd"), "status 99")
        await self.assert_bad_head(ok().replace(b"200 OK", b"000 Zero"), "status 0")

    async def test_control_bytes_in_the_phrase_are_not_passed_on(self) -> None:
        """A phrase with a control byte is replaced with the standard one; a clean one stays,
        obs-text included."""
        url, _ = self.serve(
            ok().replace(b"200 OK", b"200 O\x1b[2Jk"), ok().replace(b"OK", b"Fine \xe9")
        )
        client = self.client()
        self.assertEqual((await client.fetch(url)).response.phrase, b"OK")
        self.assertEqual((await client.fetch(url)).response.phrase, b"Fine \xe9")

    async def test_identity_body_ends_at_close(self) -> None:
        """Transfer-Encoding other than a final chunked does not frame the body: it is read
        to the close, whole (PotentialDataLoss, as any close-delimited body)."""
        for coding in (b"identity", b"chunked, identity", b"gzip"):
            url, _ = self.serve(
                in_pieces(
                    response(b"200 OK", b"Transfer-Encoding: " + coding),
                    b"0\r\n\r\npart one, ",
                    b"part two",
                    close=True,
                )
            )
            fetched = await self.client().fetch(url)
            self.assertEqual(fetched.body, b"0\r\n\r\npart one, part two", coding)
            self.assertReason(fetched.reason, PotentialDataLoss)

    async def test_interim_answers_are_told(self) -> None:
        """request_with_interim tells of each 1xx (phrase and headers) before the answer."""
        hints = response(b"103 Early Hints", b"Link: </style.css>; rel=preload")
        url, _ = self.serve(hints + response(b"102 Processing") + ok(b"real"))
        told: list[tuple[int, bytes, Sequence[bytes] | None]] = []
        client = self.client()
        answer = await client.agent.request_with_interim(
            b"GET",
            url,
            interim=lambda code, phrase, headers: told.append(
                (code, phrase, headers.getRawHeaders(b"link"))
            ),
        )
        self.assertEqual(answer.code, 200)
        self.assertEqual(
            told,
            [(103, b"Early Hints", [b"</style.css>; rel=preload"]), (102, b"Processing", None)],
        )


class AnswerTests(Http11Case):
    """``request_with_interim(..., answer=...)``, the relay's way: the response goes to
    ``answer`` instead of the Deferred, which then only tells of failures (no callback chain
    runs for a request that is answered)."""

    def send(
        self, client: Client, url: bytes, answer: Callable[[Any], object] | None = None
    ) -> tuple[Deferred[Any], Deferred[Response]]:
        """A GET to ``url``; the Deferred the agent returns, and one fired with what
        ``answer`` is given, in the next reactor turn (a test awaiting it then does not go
        on from inside the agent's call)."""
        given: Deferred[Response] = Deferred()

        def later(response: IResponse) -> None:
            reactor.callLater(0, given.callback, response)

        sent = client.agent.request_with_interim(b"GET", url, answer=answer or later)
        return sent, given

    async def test_the_response_goes_to_answer(self) -> None:
        """On a new connection and on a kept-alive one, ``answer`` gets the response (its
        body follows as usual); the agent's Deferred does not: on the new connection it
        fires with None (the endpoint keeps it as long as the connection lives, so it must
        end), on the kept-alive one not at all."""
        url, backend = self.serve(ok(b"first"), ok(b"second"))
        client = self.client()
        for body in (b"first", b"second"):
            sent, given = self.send(client, url)
            response = await given
            reader = BodyReader()
            response.deliverBody(reader)
            self.assertReason(await reader.ended(), ResponseDone)
            self.assertEqual((response.code, reader.data), (200, body))
            if body == b"first":
                self.assertIsNone(await sent)
            else:
                self.assertFalse(sent.called)
        self.assertEqual(len(backend.connections), 1)

    async def test_no_response_still_fails_the_deferred(self) -> None:
        """A backend that closes without answering fails the Deferred, as without
        ``answer``, which is never called."""
        url, _ = self.serve(hang_up)
        sent, given = self.send(self.client(), url)
        await self.assertFailure(sent, ResponseNeverReceived)
        self.assertFalse(given.called)

    async def test_a_get_sent_again_goes_to_answer(self) -> None:
        """A GET sent on a kept-alive connection the backend had just closed goes again on a
        new connection, and its response to ``answer``."""
        url, backend = self.serve(ok(b"first"), ok(b"again"))
        client = self.client()
        await client.fetch(url)
        backend.connections[0].tcp.loseConnection()
        await backend.connections[0].closed  # the client has not read the FIN yet
        sent, given = self.send(client, url)
        response = await given
        self.assertEqual(response.code, 200)
        self.assertIsNone(await sent)
        self.assertEqual(len(backend.connections), 2)

    async def test_an_answer_that_raises_is_logged(self) -> None:
        """An error in ``answer`` is a bug: logged. A response already whole leaves its
        connection in the pool; one whose body is still coming has nobody to read it now,
        and its connection is closed. Both on a new connection and on a kept-alive one."""

        def half(connection: ServerConnection, seen: Seen) -> None:
            connection.tcp.write(response(b"200 OK", b"Content-Length: 10", body=b"01234"))

        url, backend = self.serve(ok(b"whole"), half, ok(b"after"))
        client = self.client()

        def broken(response: Any) -> None:
            raise RuntimeError("a bug in the caller")

        sent, _ = self.send(client, url, broken)
        await sent  # a new connection's: fired once the answer was given
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.send(client, url, broken)  # on the same connection, kept alive
        await backend.connections[0].closed
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        fetched = await client.fetch(url)
        self.assertEqual(fetched.body, b"after")
        self.assertEqual(len(backend.connections), 2)


# ---- 5. the request on the wire -------------------------------------------------------------


class RequestWireTests(Http11Case):
    async def send(self, method: bytes, body: Any = None, **options: Any) -> Seen:
        """Send one request; returns what the backend parsed (its raw bytes: ``self.raw``)."""
        url, backend = self.serve(ok())
        self.url = url
        fetched = await self.client().fetch(
            url + options.pop("path", b"/path?q=1"), method, body=body, **options
        )
        self.assertEqual(fetched.body, b"ok")
        self.raw = bytes(backend.connections[0].raw)
        return backend.requests[0]

    async def test_get_head_line_host_and_headers(self) -> None:
        """Request line, Host first, the given headers (each value), no length for a GET."""
        headers = Headers({b"X-Test": [b"a"], b"X-Multi": [b"1", b"2"]})
        seen = await self.send(b"GET", headers=headers)
        self.assertTrue(
            self.raw.startswith(b"GET /path?q=1 HTTP/1.1\r\nHost: %s\r\n" % netloc(self.url)),
            self.raw,
        )
        self.assertEqual((seen.header(b"x-test"), seen.header(b"x-multi")), ([b"a"], [b"1", b"2"]))
        self.assertEqual(seen.header(b"host"), [netloc(self.url)])
        self.assertEqual(seen.header(b"content-length") + seen.header(b"transfer-encoding"), [])
        self.assertTrue(self.raw.endswith(b"\r\n\r\n"))

    async def test_target_forms(self) -> None:
        """No path goes out as '/', a bare query as '/?query'."""
        url, backend = self.serve(ok())
        client = self.client()
        await client.fetch(url)
        await client.fetch(url + b"?a=1")
        self.assertEqual([s.target for s in backend.requests], [b"/", b"/?a=1"])

    async def test_bodyless_post_has_content_length_zero(self) -> None:
        """A POST without a body says 'Content-Length: 0'."""
        seen = await self.send(b"POST")
        self.assertEqual((seen.header(b"content-length"), seen.body), ([b"0"], bytearray()))

    async def test_bytes_producer_body(self) -> None:
        """A BytesProducer body goes with its Content-Length, byte for byte."""
        seen = await self.send(b"PUT", BytesProducer(b"payload \x00\xff"))
        self.assertEqual(seen.header(b"content-length"), [b"10"])
        self.assertEqual((seen.method, bytes(seen.body)), (b"PUT", b"payload \x00\xff"))
        self.assertEqual(seen.header(b"transfer-encoding"), [])

    async def test_large_file_body_arrives_byte_exact(self) -> None:
        """A 4 MiB FileBodyProducer body (through a Cooperator) arrives byte-exact."""
        data = random.Random(7).randbytes(4 * 1024 * 1024)
        cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        seen = await self.send(b"POST", FileBodyProducer(io.BytesIO(data), cooperator))
        self.assertEqual(seen.header(b"content-length"), [b"%d" % len(data)])
        self.assertEqual(len(seen.body), len(data))
        self.assertEqual(hashlib.sha256(seen.body).digest(), hashlib.sha256(data).digest())

    async def test_unknown_length_is_sent_chunked(self) -> None:
        """A producer of UNKNOWN_LENGTH goes chunked (an empty write ends nothing early); the
        connection stays usable after the last chunk."""
        url, backend = self.serve(ok(b"first"), ok(b"second"))
        client = self.client()
        producer = PiecesProducer([b"abc", b"", b"defg"])
        fetched = await client.fetch(url, b"POST", body=producer)
        self.assertEqual(fetched.body, b"first")
        seen = backend.requests[0]
        self.assertEqual(seen.header(b"transfer-encoding"), [b"chunked"])
        self.assertEqual((seen.header(b"content-length"), bytes(seen.body)), ([], b"abcdefg"))
        raw = bytes(backend.connections[0].raw)
        self.assertTrue(raw.endswith(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"), raw)
        self.assertEqual((await client.fetch(url)).body, b"second")
        self.assertEqual(len(backend.connections), 1)


# ---- 6. failures -------------------------------------------------------------------------


class FailureTests(Http11Case):
    async def test_close_without_answer(self) -> None:
        """The backend closes without answering: ResponseNeverReceived."""
        url, _ = self.serve(hang_up)
        await self.assertFailure(self.client().request(url), ResponseNeverReceived)

    async def test_garbage_status_line(self) -> None:
        """Garbage instead of a status line: ResponseNeverReceived (a parser error), and the
        next request is served on a new connection."""
        url, backend = self.serve(b"garbage\r\n\r\n", ok(b"after"))
        client = self.client()
        failure = await self.assertFailure(client.request(url), ResponseNeverReceived)
        self.assertTrue(failure.reasons[0].check(HttpParserError), failure.reasons)
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_close_mid_body(self) -> None:
        """The backend closes in the middle of a Content-Length body: the bytes so far, then
        ResponseFailed."""
        url, backend = self.serve(
            in_pieces(response(b"200 OK", b"Content-Length: 100", body=b"0123456789"), close=True),
            ok(b"after"),
        )
        client = self.client()
        fetched = await client.fetch(url)
        self.assertEqual((fetched.response.code, fetched.body), (200, b"0123456789"))
        self.assertReason(fetched.reason, ResponseFailed)
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_malformed_chunk(self) -> None:
        """A broken chunked body ends the body with ResponseFailed and the connection goes."""
        url, backend = self.serve(
            response(b"200 OK", b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\nzz\r\n"),
            ok(b"after"),
        )
        client = self.client()
        fetched = await client.fetch(url)
        self.assertEqual(fetched.body, b"hello")
        self.assertReason(fetched.reason, ResponseFailed)
        await backend.connections[0].closed
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_connection_refused(self) -> None:
        """Nobody listening: the request fails with ConnectionRefusedError itself."""
        port = cast(tcp.Port, reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1"))
        number = port.getHost().port
        await port.stopListening()
        pool = backend_pool(reactor)
        agent = backend_agent(reactor, pool, 5, fast_path=FAST_PATH)
        request = agent.request(b"GET", b"http://127.0.0.1:%d/" % number)
        await self.assertFailure(request, ConnectionRefusedError)


# ---- 7. cancellation ---------------------------------------------------------------------


class CancelTests(Http11Case):
    async def assert_cancel_while_waiting(
        self, client: Client, url: bytes, backend: ScriptedBackend, count: int
    ) -> None:
        waiting = client.request(url)
        await backend.arrived(count)
        waiting.cancel()
        await self.assertFailure(waiting, CancelledError)
        await backend.connections[-1].closed

    async def test_cancel_while_waiting_for_headers(self) -> None:
        """Cancelling before the headers: CancelledError, and the backend sees the close."""
        url, backend = self.serve(hold, ok(b"after"))
        client = self.client()
        await self.assert_cancel_while_waiting(client, url, backend, 1)
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_cancel_on_a_reused_connection(self) -> None:
        """Cancelling a request sent on a pooled connection closes that connection too."""
        url, backend = self.serve(ok(b"first"), hold, ok(b"after"))
        client = self.client()
        self.assertEqual((await client.fetch(url)).body, b"first")
        await self.assert_cancel_while_waiting(client, url, backend, 2)
        self.assertEqual(len(backend.connections), 1)
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_stop_producing_mid_body(self) -> None:
        """stopProducing() mid-body closes the connection (ResponseFailed, never reused)."""
        url, backend = self.serve(
            response(b"200 OK", b"Content-Length: 1000", body=b"x" * 10), ok(b"after")
        )
        client = self.client()
        reader = BodyReader(lambda reader: reader.response.stopProducing())
        fetched = await client.fetch(url, reader=reader)
        self.assertEqual(fetched.body, b"x" * 10)
        self.assertReason(fetched.reason, ResponseFailed)
        await backend.connections[0].closed
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_read_body_cancelled(self) -> None:
        """twisted.web's readBody works on a Response, and cancelling it closes the
        connection (it calls the transport's abortConnection)."""
        url, backend = self.serve(
            response(b"200 OK", b"Content-Length: 1000", body=b"x" * 10), ok(b"after")
        )
        client = self.client()
        answer = await client.request(url)
        reading = readBody(answer)
        reading.cancel()
        await self.assertFailure(reading, ResponseFailed)
        await backend.connections[0].closed
        await self.assert_fresh_connection_works(client, url, backend)


# ---- 8. backpressure ---------------------------------------------------------------------


class FlowControlTests(Http11Case):
    async def test_pause_stops_reading_until_resumed(self) -> None:
        """While paused, bytes the backend sent wait unread in the socket; resume delivers
        the rest and the body ends cleanly."""
        url, backend = self.serve(response(b"200 OK", b"Content-Length: 1000", body=b"a" * 10))
        client = self.client()
        answer = await client.request(url)
        reader = BodyReader(lambda reader: reader.response.pauseProducing())
        answer.deliverBody(reader)
        await reader.got_data
        backend.connections[0].tcp.write(b"b" * 990)
        connection = client.connections[0]
        # Polled: bytes reaching the kernel's buffer of a paused socket tell no one.
        await until(lambda: unread(connection) > 0 or len(reader.data) > 10)
        await deferLater(reactor, 0, lambda: None)
        self.assertEqual(reader.data, b"a" * 10)
        self.assertFalse(reader.done.called)
        reader.on_data = None
        reader.response.resumeProducing()
        self.assertReason(await reader.ended(), ResponseDone)
        self.assertEqual(reader.data, b"a" * 10 + b"b" * 990)

    async def test_connection_back_in_pool_while_paused_is_resumed(self) -> None:
        """A body protocol that paused and never resumed: its connection goes back to the pool
        resumed, and the next request on it is answered."""
        url, backend = self.serve(ok(b"first"), ok(b"second"))
        client = self.client()
        reader = BodyReader(lambda reader: reader.response.pauseProducing())
        first = await client.fetch(url, reader=reader)
        self.assertReason(first.reason, ResponseDone)
        self.assertEqual((await client.fetch(url)).body, b"second")
        self.assertEqual(len(backend.connections), 1)


# ---- 9. the pool -------------------------------------------------------------------------


class PoolTests(Http11Case):
    async def fetch_concurrently(self, client: Client, url: bytes, count: int) -> None:
        """``count`` requests at once: each on a connection of its own, all then idle."""
        fetches = [Deferred.fromCoroutine(client.fetch(url)) for _ in range(count)]
        for fetched in await gatherResults(fetches):
            self.assertReason(fetched.reason, ResponseDone)

    async def test_idle_timeout_closes_connection(self) -> None:
        """An idle connection lives idle_timeout seconds (taking it for a request restarts its
        idle time), then it is closed and the next request opens a new one."""
        url, backend = self.serve(ok())
        clock = Clock()
        client = self.client(clock, idle_timeout=4.0)
        await client.fetch(url)
        clock.advance(3.5)
        await client.fetch(url)
        self.assertEqual(len(backend.connections), 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # one timer for the whole pool
        clock.advance(3.5)
        await deferLater(reactor, 0, lambda: None)
        self.assertFalse(backend.connections[0].closed.called)
        clock.advance(0.5)
        await backend.connections[0].closed
        await self.assert_fresh_connection_works(client, url, backend, body=b"ok")

    async def test_idle_connections_expire_oldest_first(self) -> None:
        """Connections that went idle at different times each close idle_timeout after their
        own last answer, on the pool's one timer, which stops once none is left."""
        url, backend = self.serve(ok())
        clock = Clock()
        client = self.client(clock, idle_timeout=4.0)
        await self.fetch_concurrently(client, url, 2)  # two connections, idle at t=0
        clock.advance(2)
        await client.fetch(url)  # the most recent one is used again: idle from t=2
        used_again = [c for c in backend.connections if len(c.requests) == 2]
        first = [c for c in backend.connections if len(c.requests) == 1]
        clock.advance(2)
        await first[0].closed
        self.assertFalse(used_again[0].closed.called)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(2)
        await used_again[0].closed
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_idle_connections_beyond_max_are_closed(self) -> None:
        """With max_idle_per_backend=1, the second connection to go idle is closed; the one
        kept serves the next request."""
        url, backend = self.serve(ok())
        client = self.client(Clock(), max_idle_per_backend=1)
        await self.fetch_concurrently(client, url, 2)
        self.assertEqual(len(backend.connections), 2)
        await DeferredList([c.closed for c in backend.connections], fireOnOneCallback=True)
        kept = [c for c in backend.connections if not c.closed.called]
        self.assertEqual(len(kept), 1)
        await client.fetch(url)
        self.assertEqual(len(backend.connections), 2)
        self.assertEqual(len(kept[0].requests), 2)

    async def test_connection_closed_by_backend_while_idle_is_dropped(self) -> None:
        """An idle connection the backend closes is dropped (its idle timer too); the next
        request opens a new connection and is served."""
        url, backend = self.serve(ok())
        clock = Clock()
        client = self.client(clock)
        await client.fetch(url)
        backend.connections[0].tcp.loseConnection()
        await backend.connections[0].closed
        await client.endpoints.closed[0]
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIsNone(client.pool.take((b"http", netloc(url))))
        await self.assert_fresh_connection_works(client, url, backend, body=b"ok")

    async def closed_before_noticed(self, method: bytes, body: Any = None) -> tuple[Any, Any]:
        """Send ``method`` on a pooled connection the backend has just closed, before the
        client read the close (the race a keep-alive timeout opens)."""
        url, backend = self.serve(ok(b"first"), ok(b"again"))
        client = self.client(Clock())
        await client.fetch(url)
        backend.connections[0].tcp.loseConnection()
        await backend.connections[0].closed  # the client has not read the FIN yet
        self.assertTrue(client.connections[0].transport.connected)
        return client.request(url, method, body=body), backend

    async def test_get_on_connection_closed_before_noticed_is_sent_again(self) -> None:
        """A GET sent on a kept-alive connection the backend had just closed goes once more
        on a new connection, as Agent does."""
        sent, backend = await self.closed_before_noticed(b"GET")
        answer = await sent
        self.assertEqual(answer.code, 200)
        self.assertEqual(len(backend.connections), 2)

    async def test_post_on_connection_closed_before_noticed_is_not_sent_again(self) -> None:
        """A POST is never sent twice: it fails (the relay answers 502)."""
        sent, backend = await self.closed_before_noticed(b"POST", BytesProducer(b"{}"))
        await self.assertFailure(sent, ResponseNeverReceived)
        self.assertEqual(len(backend.connections), 1)

    async def test_upgrade_answer_fails_cleanly(self) -> None:
        """A 101 (the relay never asks for an upgrade) fails the call like garbage would,
        without an unhandled error."""
        url, backend = self.serve(
            response(b"101 Switching Protocols", b"Connection: upgrade", b"Upgrade: websocket"),
            ok(b"after"),
        )
        client = self.client()
        failure = await self.assertFailure(client.request(url), ResponseNeverReceived)
        self.assertEqual(len(failure.reasons), 1)
        await self.assert_fresh_connection_works(client, url, backend)

    async def test_close_cached_connections(self) -> None:
        """closeCachedConnections() fires once every idle connection is closed; a request
        after it opens a new connection."""
        url, backend = self.serve(ok())
        clock = Clock()
        client = self.client(clock)
        self.assertTrue(client.pool.closeCachedConnections().called)  # nothing to close
        await self.fetch_concurrently(client, url, 2)
        await client.pool.closeCachedConnections()
        self.assertEqual([c.transport.connected for c in client.connections], [0, 0])
        self.assertEqual(clock.getDelayedCalls(), [])
        await gatherResults([c.closed for c in backend.connections])
        await self.assert_fresh_connection_works(client, url, backend, body=b"ok")


# ---- 10. an answer before the request body was sent ----------------------------------------


class EarlyAnswerTests(Http11Case):
    async def test_answer_before_body_was_sent(self) -> None:
        """A 413 right after the request head is delivered; the body stops, and the connection
        (its body half-sent) is closed, not reused."""

        def refuse_uploads(connection: ServerConnection, seen: Seen) -> None:
            if seen.method == b"POST":
                too_large = b"413 Content Too Large"
                connection.tcp.write(response(too_large, b"Content-Length: 3", body=b"no!"))

        url, backend = self.serve(ok(b"after"), on_headers=refuse_uploads)
        client = self.client()
        producer = PiecesProducer([b"x" * 1000], length=1_000_000, finish=False)
        fetched = await client.fetch(url, b"POST", body=producer)
        self.assertEqual((fetched.response.code, fetched.body), (413, b"no!"))
        self.assertReason(fetched.reason, ResponseDone)
        self.assertTrue(producer.stopped)
        await self.assert_fresh_connection_works(client, url, backend)
        await backend.connections[0].closed


class SplicedAnswerTests(TestCase):
    def test_upload_still_going_when_the_spliced_answer_ends(self) -> None:
        """An answer whose body the kernel moved (splice) can end while the request's body is
        still being sent (the backend answered first): the upload stops and the connection is
        not offered again, or the next request would be written into the upload."""
        pool = ConnectionPool(Clock())
        key = (b"http", b"backend")
        connection = _Connection(pool, key, True)
        connection.makeConnection(StringTransport())
        upload = PiecesProducer([b"x" * 1000], length=1_000_000, finish=False)
        connection.send(b"POST", b"/", b"backend", None, upload)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n")
        connection._spliced()  # the splice moved the whole body
        self.assertTrue(upload.stopped)
        self.assertIsNone(pool.take(key))


class TrailerLimitTests(TestCase):
    def test_endless_trailer_line_is_cut(self) -> None:
        """Chunk lines and trailers count against the head's limit, from the last body bytes:
        a trailer line that never ends (the parser would hold it whole) fails the answer
        once past it, and the connection is dropped."""
        connection = _Connection(ConnectionPool(Clock()), (b"http", b"backend"), True)
        transport = StringTransport()
        connection.makeConnection(transport)
        answered: list[IResponse] = []
        connection.send(b"GET", b"/", b"backend", None, None, answer=answered.append)
        connection.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: "
        )
        body = BodyReader()
        answered[0].deliverBody(body)
        for _ in range(4):
            connection.dataReceived(b"a" * 4096)
        self.assertIsNone(body.reason)  # within the limit (16 KiB)
        connection.dataReceived(b"a" * 4096)
        self.assertEqual(body.data, b"hello")
        assert body.reason is not None
        failed = body.reason.value
        assert isinstance(failed, ResponseFailed)
        [cause] = failed.reasons
        self.assertEqual(str(cause.value), "response trailers or chunk lines over 16384 bytes")
        self.assertTrue(transport.disconnecting)

    def test_many_small_chunks_are_body(self) -> None:
        """Chunk lines around body bytes never add up: a long stream of tiny chunks passes."""
        connection = _Connection(ConnectionPool(Clock()), (b"http", b"backend"), True)
        connection.makeConnection(StringTransport())
        answered: list[IResponse] = []
        connection.send(b"GET", b"/", b"backend", None, None, answer=answered.append)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = BodyReader()
        answered[0].deliverBody(body)
        for _ in range(100):
            connection.dataReceived(b"1\r\nx\r\n" * 1000)
        connection.dataReceived(b"0\r\n\r\n")
        self.assertEqual(len(body.data), 100_000)
        assert body.reason is not None
        self.assertIsInstance(body.reason.value, ResponseDone)


class AttributeCountTests(TestCase):
    def test_fewer_than_30_attributes_of_its_own(self) -> None:
        """A backend connection keeps fewer than 30 attributes of its own while it carries a
        request and after: from 30 on, CPython 3.11 stops sharing an object's attribute table
        with its class, and every method call and attribute read on it gets slower."""
        connection = _Connection(ConnectionPool(Clock()), (b"http", b"backend"), True)
        connection.makeConnection(StringTransport())
        answered: list[IResponse] = []
        connection.send(b"GET", b"/", b"backend", None, None, answer=answered.append)
        self.assertLess(len(vars(connection)), 30, sorted(vars(connection)))
        connection.dataReceived(ok())
        self.assertEqual([response.code for response in answered], [200])
        self.assertLess(len(vars(connection)), 30, sorted(vars(connection)))


class HeldRequestTests(TestCase):
    """On the fast path, a request made while the reactor dispatches a turn's events waits in
    the outbox and goes to the backend when the turn is over; one made outside a turn goes at
    once. In memory: the outbox opened and sent by hand, as the fast path's loop does."""

    def connection(self) -> tuple[_Connection, StringTransport]:
        connection = _Connection(ConnectionPool(Clock()), (b"http", b"backend"), True)
        transport = StringTransport()
        connection.makeConnection(transport)
        return connection, transport

    def in_a_turn(self) -> None:
        OUTBOX.open = True
        self.addCleanup(OUTBOX.waiting.clear)
        self.addCleanup(setattr, OUTBOX, "open", False)

    def test_request_in_a_turn_leaves_when_the_turn_is_over(self) -> None:
        connection, transport = self.connection()
        self.in_a_turn()
        connection.send(b"GET", b"/ready", b"backend", None, None)
        self.assertEqual(transport.value(), b"")
        OUTBOX.send_all()
        self.assertEqual(transport.value(), b"GET /ready HTTP/1.1\r\nHost: backend\r\n\r\n")

    def test_request_outside_a_turn_leaves_at_once(self) -> None:
        connection, transport = self.connection()
        connection.send(b"POST", b"/v1", b"backend", None, BytesProducer(b"{}"))
        self.assertEqual(
            transport.value(),
            b"POST /v1 HTTP/1.1\r\nHost: backend\r\nContent-Length: 2\r\n\r\n{}",
        )

    def test_request_cancelled_in_its_turn_never_reaches_the_backend(self) -> None:
        """A client that leaves in the turn its request was made (its cancel aborts the
        connection): the held request is dropped, not sent to a backend that would act on it."""
        connection, transport = self.connection()
        self.in_a_turn()
        waiting = connection.send(b"POST", b"/v1", b"backend", None, BytesProducer(b"{}"))
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        OUTBOX.send_all()
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_request_on_a_connection_lost_in_its_turn_was_not_sent(self) -> None:
        """A pooled connection the backend closed, its close read in the same turn: the held
        request never left, and says so (RequestNotSent: the relay sends it again)."""
        connection, transport = self.connection()
        self.in_a_turn()
        waiting = connection.send(b"POST", b"/v1", b"backend", None, BytesProducer(b"{}"))
        connection.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(waiting, RequestNotSent)
        OUTBOX.send_all()
        self.assertEqual(transport.value(), b"")


class _ClosingPool:
    """A pool whose connections take as long to close as the test says."""

    def __init__(self) -> None:
        self.connection: Deferred[None] = Deferred(lambda d: d.errback(CancelledError()))

    def closeCachedConnections(self) -> Deferred[None]:
        return gatherResults([self.connection]).addCallback(lambda _: None)


class ClosePoolTests(SynchronousTestCase):
    def test_closed_in_time(self) -> None:
        clock = Clock()
        pool = _ClosingPool()
        closed = close_pool(cast(ConnectionPool, pool), clock)
        self.assertNoResult(closed)
        pool.connection.callback(None)
        self.successResultOf(closed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_hanging_close_is_not_cancelled(self) -> None:
        """A close that hangs is waited for POOL_CLOSE_TIMEOUT, then left to finish: cancelled,
        Twisted's would leave a CancelledError per connection unhandled."""
        clock = Clock()
        pool = _ClosingPool()
        closed = close_pool(cast(ConnectionPool, pool), clock)
        clock.advance(POOL_CLOSE_TIMEOUT)
        self.successResultOf(closed)
        self.assertFalse(pool.connection.called)
        pool.connection.callback(None)  # finishing late changes nothing
