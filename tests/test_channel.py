"""
GuardedChannel as an HTTP/1.1 server connection: keep-alive, pipelining in order, HTTP/1.0,
Connection: close, 100-continue, input split anywhere, the idle timeout, backpressure in both
directions, and a client that goes away. Driven byte by byte on an in-memory transport and a
task.Clock; one case through a real socket.
"""

from __future__ import annotations

import ast
import inspect
import socket
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from httptools import HttpRequestParser
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPullProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from tests.fakes import WritesKept
from tests.helpers import FAST_PATH, RawClient, listen, raw_connect
from vast_vespa.net import server
from vast_vespa.net.guard import REQUEST_ATTRIBUTES
from vast_vespa.net.idle_sweep import IdleSweep
from vast_vespa.net.server import PIPELINE_BUFFER, GuardedChannel, Limits
from vast_vespa.site import VespaSite


class _Held(Resource):
    """Answers each request with its method, path and body, at once or when told to."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        self.waiting: list[tuple[Request, bytes]] = []
        self.lost: list[Failure] = []
        self.answer_with: Callable[[Request], bytes] | None = None  # in place of the above

    def render(self, request: Request) -> bytes | int:
        if self.answer_with is not None:
            return self.answer_with(request)
        assert request.content is not None
        self.seen.append((request.method, request.uri, request.content.read()))
        request.setHeader(b"content-type", b"text/plain")
        answer = b"%s %s %d" % (request.method, request.uri, len(self.seen[-1][2]))
        if not self.hold:
            return answer
        request.notifyFinish().addErrback(self.lost.append)
        self.waiting.append((request, answer))
        return NOT_DONE_YET

    def release(self) -> None:
        request, answer = self.waiting.pop(0)
        request.setHeader(b"content-length", b"%d" % len(answer))
        request.write(answer)
        request.finish()


GET = b"GET /%d HTTP/1.1\r\nHost: w\r\n\r\n"


# The bytes a header value may hold (RFC 9110 section 5.5): visible, obs-text, SP and HTAB.
_FIELD_BYTES = frozenset(b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)))


def _keep(seen: list[Request]) -> Callable[[Request], bytes]:
    """An answer_with for _Held: keeps the request in ``seen``, answers an empty body."""

    def answer(request: Request) -> bytes:
        seen.append(request)
        return b""

    return answer


class _SocketTransport(StringTransport):
    """An in-memory transport over a real socket, which it gives as its handle (as a TCP
    connection's does): the channel asks it whether the client has closed."""

    def __init__(self, handle: socket.socket) -> None:
        super().__init__()
        self.handle = handle

    def getHandle(self) -> socket.socket:
        return self.handle


def _tcp_pair(test: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    """Both ends of a TCP connection on loopback (the server's, the client's), closed when
    the test ends."""
    listening = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listening.getsockname())
    server_end, _ = listening.accept()
    listening.close()
    for end in (server_end, client):
        test.addCleanup(end.close)
    server_end.setblocking(False)  # as Twisted's
    return server_end, client


class ChannelTests(SynchronousTestCase):
    def connect(
        self,
        hold: bool = False,
        fast_path: bool = FAST_PATH,
        transport: StringTransport | None = None,
        **limits: Any,
    ) -> tuple[GuardedChannel, StringTransport]:
        self.clock = Clock()
        self.resource = _Held(hold)
        self.site = VespaSite(
            self.resource, Limits(**limits), reactor=self.clock, fast_path=fast_path
        )
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = transport or StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(self.close, channel)
        return channel, transport

    def close(self, channel: GuardedChannel) -> None:
        """Lose the connection: with no connection left, no timer is left either."""
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.site.open_connections, 0)

    def sweeps(self) -> int:
        """How many of the clock's calls are an idle sweep's."""
        return sum(
            isinstance(getattr(cast(DelayedCall, call).func, "__self__", None), IdleSweep)
            for call in self.clock.getDelayedCalls()
        )

    def answers(self, transport: StringTransport) -> list[bytes]:
        """The status and body of each (Content-Length framed) answer written so far."""
        out = []
        for part in transport.value().split(b"HTTP/1.1 ")[1:]:
            head, _, body = part.partition(b"\r\n\r\n")
            out.append(head.split(b"\r\n")[0] + b" | " + body)
        return out

    def test_its_own_state_is_in_slots(self) -> None:
        """A connection's dictionary holds only what Twisted's protocol and factory set on
        it, before, during and after a request (everything of the channel's own is a slot):
        CPython 3.11 reads a slot by a specialised instruction where a class default is not,
        and from 30 attributes in the dictionary on, method calls on the object get slower."""
        twisteds = {"callLater", "connected", "factory", "requestFactory", "site", "timeOut"}
        twisteds.add("transport")
        channel, transport = self.connect(hold=True)
        self.assertLessEqual(set(vars(channel)), twisteds)
        channel.dataReceived(b"POST /1 HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1"])
        self.assertLessEqual(set(vars(channel)), twisteds)
        self.resource.release()
        self.assertEqual(self.answers(transport), [b"200 OK | POST /1 3"])
        self.assertLessEqual(set(vars(channel)), twisteds)

    def test_keep_alive_serves_requests_one_after_another(self) -> None:
        """Two requests on one HTTP/1.1 connection are both answered; it stays open."""
        channel, transport = self.connect()
        channel.dataReceived(GET % 1)
        channel.dataReceived(b"POST /2 HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(self.answers(transport), [b"200 OK | GET /1 0", b"200 OK | POST /2 3"])
        self.assertFalse(transport.disconnecting)

    def test_pipelined_requests_wait_for_the_answer_before(self) -> None:
        """Requests sent in one read reach the resource one at a time, in order, each only
        once the answer before it is complete."""
        channel, transport = self.connect(hold=True)
        channel.dataReceived(
            GET % 1 + GET % 2 + b"POST /3 HTTP/1.1\r\nHost: w\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1"])
        self.resource.release()
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1", b"/2"])
        self.resource.release()
        self.assertEqual(self.resource.seen[2], (b"POST", b"/3", b"abc"))
        self.resource.release()
        self.assertEqual(
            self.answers(transport),
            [b"200 OK | GET /1 0", b"200 OK | GET /2 0", b"200 OK | POST /3 3"],
        )

    def test_any_split_of_the_input_gives_the_same_requests(self) -> None:
        """Heads, bodies and chunks cut at every byte boundary parse the same."""
        stream = (
            b"\r\n"
            + GET % 1
            + b"POST /2 HTTP/1.1\r\nHost: w\r\nContent-Length: 5\r\n\r\nhello"
            + b"PUT /3 HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"2\r\nab\r\n1;x=y\r\nc\r\n0\r\nX-Trailer: t\r\n\r\n"
            + GET % 4
        )
        expected = [
            (b"GET", b"/1", b""),
            (b"POST", b"/2", b"hello"),
            (b"PUT", b"/3", b"abc"),
            (b"GET", b"/4", b""),
        ]
        for cut in range(1, len(stream)):
            channel, transport = self.connect()
            channel.dataReceived(stream[:cut])
            channel.dataReceived(stream[cut:])
            self.assertEqual(self.resource.seen, expected, cut)
        channel, transport = self.connect()
        for byte in stream:
            channel.dataReceived(bytes([byte]))
        self.assertEqual(self.resource.seen, expected)
        self.assertEqual(len(self.answers(transport)), 4)

    def test_connection_close_is_the_last_request(self) -> None:
        """`Connection: close` gets an answer saying so, then the connection closes; a request
        sent after it is never parsed."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: w\r\nConnection: keep-alive, close\r\n\r\n" + GET % 2
        )
        self.assertIn(b"\r\nConnection: close\r\n", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1"])

    def test_http_1_0_is_answered_then_closed(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET /old HTTP/1.0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_expect_continue_gets_100_before_the_body(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /up HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel.dataReceived(b"abc")
        self.assertEqual(self.resource.seen, [(b"POST", b"/up", b"abc")])

    def test_headers_and_cookies_reach_the_request(self) -> None:
        """Names keep their case-insensitive identity, values lose surrounding whitespace, a
        repeated header keeps every value, and cookies are parsed."""
        seen: list[Request] = []
        channel, transport = self.connect()
        self.resource.answer_with = _keep(seen)
        channel.dataReceived(
            b"GET /h?q=1 HTTP/1.1\r\nHost: w\r\nX-A:  one \r\nx-a: two\r\n"
            b"Cookie: k=v\r\nX-Utf8: caf\xc3\xa9\r\n\r\n"
        )
        request = seen[0]
        self.assertEqual(request.requestHeaders.getRawHeaders(b"X-A"), [b"one", b"two"])
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-utf8"), [b"caf\xc3\xa9"])
        self.assertEqual(request.received_cookies, {b"k": b"v"})
        self.assertEqual(request.args, {b"q": [b"1"]})
        self.assertEqual(request.getClientAddress(), transport.getPeer())

    @settings(max_examples=200, deadline=None)
    @given(
        st.binary(max_size=4).map(lambda b: bytes(b" \t"[c % 2] for c in b)),
        st.binary(max_size=12).map(lambda b: bytes(c for c in b if c in _FIELD_BYTES)),
        st.binary(max_size=4).map(lambda b: bytes(b" \t"[c % 2] for c in b)),
    )
    def test_a_value_is_the_field_without_surrounding_whitespace(
        self, before: bytes, value: bytes, after: bytes
    ) -> None:
        """A header's value is what follows the colon without leading and trailing spaces and
        tabs, whatever it holds between them (spaces, tabs, obs-text)."""
        seen: list[Request] = []
        channel, _ = self.connect()
        self.resource.answer_with = _keep(seen)
        channel.dataReceived(
            b"GET / HTTP/1.1\r\nHost: w\r\nX-V:" + before + value + after + b"\r\n\r\n"
        )
        self.assertEqual(seen[0].requestHeaders.getRawHeaders(b"x-v"), [value.strip(b" \t")])

    def test_runs_of_spaces_in_a_header_line_are_matched_in_linear_time(self) -> None:
        """A header line with long runs of spaces costs no more to check than any other,
        accepted or refused (patterns with whitespace around and inside the value backtrack:
        a 16 KiB value with spaces inside took 0.7 s to accept, and 4 KiB of spaces before a
        control byte 66 s to refuse)."""
        seen: list[Request] = []
        value = b"a" + b" " * 32000 + b"b"
        lines = [
            (b"X-Long: " + value, 200),
            (b"X-Bad:" + b" " * 8000 + b"\x01", 400),
            (b"X-Bad: a" + b" \t" * 4000 + b"\x01", 400),
        ]
        for line, status in lines:
            channel, transport = self.connect(max_header_size=1 << 16)
            self.resource.answer_with = _keep(seen)
            started = time.process_time()
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: w\r\n" + line + b"\r\n\r\n")
            spent = time.process_time() - started
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 %d " % status), line[:10])
            self.assertLess(spent, 0.1, line[:10])
        self.assertEqual(seen[0].requestHeaders.getRawHeaders(b"x-long"), [value])

    def test_idle_connection_is_closed_after_the_timeout(self) -> None:
        """A keep-alive connection with no request for the site's timeOut is closed, and
        aborted if it does not close cleanly; activity and an answer in progress keep it."""
        channel, transport = self.connect(hold=True)
        timeout = self.site.timeOut
        assert timeout is not None
        self.clock.advance(timeout - 1)
        channel.dataReceived(GET % 1)  # activity: the clock restarts
        self.clock.advance(timeout * 3)  # answering: never idle
        self.assertFalse(transport.disconnecting)
        self.resource.release()
        self.clock.advance(timeout - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.clock.advance(15)
        self.assertTrue(transport.disconnected)  # StringTransport.abortConnection

    def test_idle_connections_time_out_on_one_timer(self) -> None:
        """Connections that went idle at different times each close their site's timeOut
        after they did, all watched by one timer."""
        _, first_transport = self.connect()
        timeout = self.site.timeOut
        assert timeout is not None
        self.clock.advance(20)
        second = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4001))
        second_transport = StringTransport()
        second.makeConnection(second_transport)
        self.addCleanup(second.connectionLost, Failure(ConnectionDone()))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.sweeps(), 1)
        self.clock.advance(timeout - 20)
        self.assertTrue(first_transport.disconnecting)
        self.assertFalse(second_transport.disconnecting)
        self.clock.advance(19)
        self.assertFalse(second_transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(second_transport.disconnecting)
        self.assertEqual(self.site.connections.idle_count, 0)

    def test_long_upload_is_not_an_idle_connection(self) -> None:
        """A body that keeps arriving for longer than the idle timeout is neither cut nor
        watched in a busy loop: the site's idle sweep finds no idle connection and is not
        armed again while the request arrives."""
        channel, transport = self.connect(min_body_rate=1000.0)
        timeout = self.site.timeOut
        assert timeout is not None
        size = 15000 * 12
        channel.dataReceived(b"POST /up HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(11):  # 110 s, nearly twice the idle timeout
            channel.dataReceived(b"x" * 15000)
            self.clock.advance(10)
            self.assertEqual(self.sweeps(), int(self.clock.seconds() < timeout))
        self.assertGreater(self.clock.seconds(), timeout)
        channel.dataReceived(b"x" * 15000)
        self.assertEqual(self.answers(transport), [b"200 OK | POST /up %d" % size])
        self.assertEqual(self.sweeps(), 1)  # idle again: watched again

    def test_partial_pipelined_head_gets_the_head_deadline(self) -> None:
        """A pipelined head left unfinished behind an answered request is held to the head
        deadline like any other (no slowloris through pipelining)."""
        channel, transport = self.connect(hold=True, head_timeout=30.0)
        channel.dataReceived(GET % 1 + b"GET /2 HTTP/1.1\r\nHo")
        self.resource.release()
        self.clock.advance(31)
        self.assertIn(b"HTTP/1.1 408 Request Timeout", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_connection_close_option_is_case_insensitive(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: w\r\nConnection: Close\r\n\r\n" + GET % 2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1"])

    def test_upload_spanning_the_idle_timeout_is_not_cut(self) -> None:
        channel, transport = self.connect()
        timeout = self.site.timeOut
        assert timeout is not None
        self.clock.advance(timeout - 1)
        channel.dataReceived(
            b"POST /u HTTP/1.1\r\nHost: w\r\nContent-Length: 2000\r\n\r\n" + b"x" * 1000
        )
        self.clock.advance(1)  # the idle check comes mid-body
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x" * 1000)
        self.assertEqual(self.resource.seen, [(b"POST", b"/u", b"x" * 2000)])

    def test_head_arriving_at_the_idle_timeout_is_not_cut(self) -> None:
        """A head still arriving when the idle timeout comes is left to the head deadline."""
        channel, transport = self.connect()
        timeout = self.site.timeOut
        assert timeout is not None
        self.clock.advance(timeout - 1)
        channel.dataReceived(b"GET /late HTTP/1.1\r\nHost: w\r\n")
        self.clock.advance(2)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"\r\n")
        self.assertEqual([s[1] for s in self.resource.seen], [b"/late"])

    def test_request_racing_the_idle_timeout_is_not_served(self) -> None:
        """A request that arrives after its connection timed out, while it closes, reaches no
        resource and is not answered (the client retries it on a new connection)."""
        channel, transport = self.connect()
        timeout = self.site.timeOut
        assert timeout is not None
        self.clock.advance(timeout)
        self.assertTrue(transport.disconnecting)
        channel.dataReceived(GET % 1)
        self.assertEqual(self.resource.seen, [])
        self.assertEqual(transport.value(), b"")

    def test_idle_clock_restarts_after_each_answer(self) -> None:
        channel, transport = self.connect()
        timeout = self.site.timeOut
        assert timeout is not None
        self.clock.advance(timeout - 10)
        channel.dataReceived(GET % 1)
        self.clock.advance(10)  # the first idle check: 10 s after the answer
        self.assertFalse(transport.disconnecting)
        self.clock.advance(timeout - 11)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def held_over_the_buffer(self) -> tuple[GuardedChannel, StringTransport]:
        """A connection answering one request, with PIPELINE_BUFFER bytes of the next one's
        body held (the part that crossed the limit included)."""
        channel, transport = self.connect(hold=True)
        channel.dataReceived(GET % 1)
        channel.dataReceived(b"POST /2 HTTP/1.1\r\nHost: w\r\nContent-Length: 20000\r\n\r\n")
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"x" * PIPELINE_BUFFER)
        return channel, transport

    def test_pipelined_input_over_the_buffer_stops_reading(self) -> None:
        """While a request is answered, the client's next input is held; past PIPELINE_BUFFER
        the connection is not read until the answer is done."""
        channel, transport = self.held_over_the_buffer()
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(self.resource.seen), 1)
        self.resource.release()
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"x" * (20000 - PIPELINE_BUFFER))
        self.assertEqual(self.resource.seen[1][:2], (b"POST", b"/2"))
        self.assertEqual(len(self.resource.seen[1][2]), 20000)

    def test_held_input_handed_out_while_the_client_is_not_reading(self) -> None:
        """Held input handed out to its request while the client does not read its answers
        (the send buffer is full): once it reads again, so does the connection, or nothing
        more would ever be read from it."""
        channel, transport = self.held_over_the_buffer()
        channel.dataReceived(b"x" * (20000 - PIPELINE_BUFFER))  # POST /2 whole, held
        channel.pauseProducing()  # the client's socket buffer is full for a moment
        self.resource.release()  # request 1 answered: POST /2 is handed out
        self.assertEqual(transport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.resource.release()
        channel.dataReceived(GET % 3)  # the next request on the connection is read
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1", b"/2", b"/3"])

    def test_requests_pipelined_in_one_read_count_towards_the_buffer(self) -> None:
        """Requests parsed in the same read as the one now answered are held like input that
        comes later: past PIPELINE_BUFFER the connection is not read until they are answered."""
        channel, transport = self.connect(hold=True)
        count = PIPELINE_BUFFER // len(GET % 1) + 1  # more than PIPELINE_BUFFER bytes
        channel.dataReceived(b"".join(GET % i for i in range(count)))
        self.assertEqual(transport.producerState, "paused")
        while self.resource.waiting:
            self.resource.release()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual([s[1] for s in self.resource.seen], [b"/%d" % i for i in range(count)])

    def parsed_ahead(self, channel: GuardedChannel) -> int:
        """How many requests the connection holds parsed (heads, refusals) and not yet
        handed to the resource."""
        return sum(event[0] in (server._HEAD, server._REFUSE) for event in channel._events)

    def test_pipelined_requests_are_parsed_one_at_a_time(self) -> None:
        """However many requests are pipelined behind one being answered (in its read or in
        later ones), at most the next head is parsed ahead of its turn: the rest is held as
        it came (what the connection holds is then about the bytes it read, not a parsed
        request per few dozen of them), and all are answered, in order."""
        channel, transport = self.connect(hold=True)
        count = 400
        ahead = []
        channel.dataReceived(b"".join(GET % i for i in range(count)))  # one read
        ahead.append(self.parsed_ahead(channel))
        channel.dataReceived(b"".join(GET % i for i in range(count, 2 * count)))  # a later one
        ahead.append(self.parsed_ahead(channel))
        self.assertEqual(transport.producerState, "paused")  # over PIPELINE_BUFFER
        while self.resource.waiting:
            self.resource.release()
            ahead.append(self.parsed_ahead(channel))
        self.assertEqual(max(ahead), 1)
        self.assertEqual([s[1] for s in self.resource.seen], [b"/%d" % i for i in range(2 * count)])
        self.assertEqual(len(self.answers(transport)), 2 * count)
        self.assertEqual(transport.producerState, "producing")

    def test_a_pipelined_body_is_not_parsed_before_its_turn(self) -> None:
        """A chunked body of many small chunks pipelined behind a request being answered
        stays as it came (parsed, each chunk would be queued on its own) until its turn."""
        channel, transport = self.connect(hold=True)
        chunks = b"1\r\nx\r\n" * 2000 + b"0\r\n\r\n"
        channel.dataReceived(
            GET % 1 + b"POST /2 HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        channel.dataReceived(chunks[:5000])
        channel.dataReceived(chunks[5000:])
        self.assertLessEqual(len(channel._events), 2)  # the head, and the input as it came
        self.resource.release()
        self.assertEqual(self.resource.seen[1], (b"POST", b"/2", b"x" * 2000))
        self.resource.release()
        self.assertEqual(len(self.answers(transport)), 2)

    def test_requests_parsed_again_count_their_dropped_headers_once(self) -> None:
        """Requests pipelined in one read are parsed again, a head at a time, when a second one
        begins: the headers dropped from each (a name with _) are counted once, and an
        upgrade request among them is still followed by the next request."""
        channel, transport = self.connect()
        upgrade = b"GET /3 HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
        channel.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: w\r\nX_A: 1\r\n\r\n"
            + b"GET /2 HTTP/1.1\r\nHost: w\r\nX_B: 1\r\n\r\n"
            + upgrade
            + GET % 4
        )
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1", b"/2", b"/3", b"/4"])
        self.assertEqual(self.site.dropped_headers, 2)
        channel.dataReceived(upgrade + GET % 5 + GET % 6)  # the upgrade request first
        self.assertEqual([s[1] for s in self.resource.seen][4:], [b"/3", b"/5", b"/6"])
        self.assertEqual(len(self.answers(transport)), 7)

    def test_a_client_that_closes_while_not_read_is_seen_leaving(self) -> None:
        """A connection not read (input held past PIPELINE_BUFFER) is checked for its client's
        close every HANGUP_CHECK seconds, by one timer armed only while it is not read: once
        the client has closed (here half-closed, with input still unread before its FIN,
        which a peek would not see past), the connection is read again and its input
        dropped, so that the close reaches the request being answered as when it is read."""
        ours, theirs = _tcp_pair(self)
        channel, transport = self.connect(hold=True, transport=_SocketTransport(ours))
        channel.dataReceived(GET % 1)
        self.assertEqual(self.checks(), 0)
        channel.dataReceived(b"POST /2 HTTP/1.1\r\nHost: w\r\nContent-Length: 20000\r\n\r\n")
        channel.dataReceived(b"x" * 20000)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.checks(), 1)
        theirs.sendall(b"unread")
        self.clock.advance(server.HANGUP_CHECK)  # the client is still there
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.checks(), 1)
        if server._TCP_INFO is None:  # (elsewhere than Linux, a peek: nothing unread before)
            ours.recv(100)
        theirs.shutdown(socket.SHUT_WR)
        self.clock.advance(server.HANGUP_CHECK)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.checks(), 0)
        channel.dataReceived(b"unread")  # read, and dropped, up to the end
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.resource.lost), 1)
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1"])

    def test_a_connection_read_again_is_checked_no_more(self) -> None:
        """The check stops when the connection is read again (its held input handed out), or
        when it is lost (the cleanup checks that no timer is left)."""
        ours, _ = _tcp_pair(self)
        channel, transport = self.connect(hold=True, transport=_SocketTransport(ours))
        channel.dataReceived(GET % 1 + b"POST /2 HTTP/1.1\r\nHost: w\r\n")
        channel.dataReceived(b"Content-Length: %d\r\n\r\n" % PIPELINE_BUFFER)
        channel.dataReceived(b"x" * PIPELINE_BUFFER)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.checks(), 1)
        self.resource.release()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.checks(), 0)
        channel.dataReceived(GET % 3 + b"x" * PIPELINE_BUFFER)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.checks(), 1)

    def checks(self) -> int:
        """How many of the clock's calls check connections not read for their client's close."""
        return sum(
            getattr(cast(DelayedCall, call).func, "__name__", "") == "_check_not_read"
            for call in self.clock.getDelayedCalls()
        )

    def test_full_send_buffer_pauses_the_answer_then_the_client(self) -> None:
        """The transport's pause reaches the answer's producer; between requests it also
        stops reading the client, who must read its answers before sending more."""
        channel, transport = self.connect(hold=True)
        channel.dataReceived(GET % 1)
        request = self.resource.waiting[0][0]
        producer = _Producer()
        request.registerProducer(producer, True)
        channel.pauseProducing()
        self.assertEqual(producer.state, "paused")
        self.assertEqual(transport.producerState, "producing")  # still reading: answering
        channel.resumeProducing()
        self.assertEqual(producer.state, "producing")
        request.unregisterProducer()
        self.resource.release()
        channel.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_transport_stop_reaches_the_answer_producer(self) -> None:
        channel, _ = self.connect(hold=True)
        channel.dataReceived(GET % 1)
        producer = _Producer()
        self.resource.waiting[0][0].registerProducer(producer, True)
        channel.stopProducing()
        self.assertEqual(producer.state, "stopped")

    def test_send_buffer_cycling_keeps_held_input_unread(self) -> None:
        """The pause for held pipelined input outlasts the send buffer filling and draining."""
        channel, transport = self.held_over_the_buffer()
        self.assertEqual(transport.producerState, "paused")
        channel.pauseProducing()
        channel.resumeProducing()  # the answer's writes drained: the hold limit still applies
        self.assertEqual(transport.producerState, "paused")

    def test_answer_done_with_full_send_buffer_keeps_reading_paused(self) -> None:
        """A client that does not read its answers is not read when the answer ends either."""
        channel, transport = self.held_over_the_buffer()
        channel.pauseProducing()  # the client is not reading its answers
        self.resource.release()
        self.assertEqual(transport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(transport.producerState, "producing")

    def test_client_gone_mid_body_never_reaches_the_resource(self) -> None:
        channel, _ = self.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: w\r\nContent-Length: 10\r\n\r\nabc")
        request = channel._request
        assert request is not None
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.resource.seen, [])
        self.assertTrue(request._disconnected)
        assert request.content is not None
        self.assertTrue(request.content.closed)

    def test_client_gone_while_answered_is_told_to_the_request(self) -> None:
        channel, _ = self.connect(hold=True)
        channel.dataReceived(GET % 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.resource.lost), 1)
        self.resource.lost[0].trap(ConnectionDone)

    def test_first_data_goes_with_the_head(self) -> None:
        """The head and the first data leave in one write (one packet): chunked, or as they
        are when the answer has a Content-Length (the fast path's LeanRequest)."""
        kept = WritesKept()
        channel, _ = self.connect(hold=True, fast_path=True, transport=kept)
        writes = kept.writes
        channel.dataReceived(GET % 1)
        request, _ = self.resource.waiting.pop(0)
        request.write(b"data: 1\n\n")
        self.assertEqual(len(writes), 1)
        self.assertTrue(writes[0].endswith(b"chunked\r\n\r\n9\r\ndata: 1\n\n\r\n"), writes)
        request.finish()
        channel.dataReceived(GET % 2)
        writes.clear()
        self.resource.release()  # Content-Length, then the body in one write
        self.assertEqual(len(writes), 1)
        self.assertTrue(writes[0].endswith(b"Content-Length: 8\r\n\r\nGET /2 0"), writes)

    def test_chunked_answer_written_piece_by_piece(self) -> None:
        """After the head, each write is one chunk on the wire (empty writes send nothing);
        a write after finish raises as twisted.web's does, one after the client left is
        dropped."""
        channel, transport = self.connect(hold=True)
        channel.dataReceived(GET % 1 + GET % 2)
        request, _ = self.resource.waiting.pop(0)
        request.write(b"")  # the head only
        self.assertTrue(transport.value().endswith(b"Transfer-Encoding: chunked\r\n\r\n"))
        transport.clear()
        for piece in (b"data: 1\n\n", b"", b"x" * 300):
            request.write(piece)
        request.finish()
        self.assertEqual(
            transport.value(), b"9\r\ndata: 1\n\n\r\n12c\r\n" + b"x" * 300 + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(request.sentLength, 309)
        self.assertRaises(RuntimeError, request.write, b"late")
        second, _ = self.resource.waiting.pop(0)  # the pipelined request, answered next
        second.write(b"first")
        channel.connectionLost(Failure(ConnectionDone()))
        transport.clear()
        second.write(b"after the client left")
        self.assertEqual(transport.value(), b"")

    def test_upgrade_request_without_a_body_is_answered_as_a_plain_request(self) -> None:
        """Vespa never upgrades: `Connection: upgrade` without a body gets an ordinary answer,
        and the request pipelined after it is parsed afresh and answered (llhttp would have
        skipped it as the upgraded protocol's data)."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            + GET % 2
        )
        self.assertEqual(self.answers(transport), [b"200 OK | GET /1 0", b"200 OK | GET /2 0"])
        self.assertFalse(transport.disconnecting)

    def test_error_in_a_pipelined_request_is_answered_in_turn(self) -> None:
        """A malformed request parsed behind one being answered is answered after it, and
        nothing more is read meanwhile."""
        channel, transport = self.connect(hold=True)
        channel.dataReceived(GET % 1 + b"GET /2 HTTP/1.1\r\nHost: w\r\nX-A: \x01\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        self.resource.release()
        self.assertEqual(
            [answer.split(b" | ")[0] for answer in self.answers(transport)],
            [b"200 OK", b"400 Bad Request"],
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1"])

    def test_pipelined_head_over_the_limit_is_refused_in_turn(self) -> None:
        """A head that begins behind another request in one read is still held to the size
        limit as it grows over the next reads."""
        channel, transport = self.connect(max_header_size=200)
        channel.dataReceived(GET % 1 + b"GET /2 HTTP/1.1\r\nHost: w\r\nX-A: " + b"a" * 50)
        self.assertEqual(self.answers(transport), [b"200 OK | GET /1 0"])
        channel.dataReceived(b"a" * 100)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"a" * 100)
        self.assertIn(b"HTTP/1.1 431 Request Header Fields Too Large", transport.value())
        self.assertEqual([s[1] for s in self.resource.seen], [b"/1"])

    def test_a_head_sent_in_pieces_is_parsed_a_line_at_a_time(self) -> None:
        """A head arriving a byte at a time is given to llhttp only once each line is whole:
        the cost stays linear in its size (llhttp's callbacks would copy a partly received
        header again for every piece)."""
        channel, transport = self.connect()
        fed: list[bytes] = []
        parser = channel._parser

        class Recording:
            def feed_data(self, data: bytes | bytearray | memoryview) -> None:
                fed.append(bytes(data))
                parser.feed_data(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(parser, name)

        channel._parser = cast(HttpRequestParser, Recording())  # a stand-in for it
        head = b"GET / HTTP/1.1\r\nHost: w\r\nX-A: " + b"a" * 3000 + b"\r\n\r\n"
        for byte in head:
            channel.dataReceived(bytes([byte]))
        self.assertEqual(self.answers(transport), [b"200 OK | GET / 0"])
        self.assertLessEqual(len(fed), head.count(b"\n") + 1, fed[:5])

    def test_chunk_framing_without_data_is_limited(self) -> None:
        """Trailers (or chunk extensions) arriving read after read with no body data are
        refused past the head size limit: llhttp would gather a trailer without end."""
        channel, transport = self.connect(max_header_size=1000)
        channel.dataReceived(
            b"POST /t HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        )
        channel.dataReceived(b"X-T: " + b"t" * 600)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"t" * 600)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request"))
        self.assertEqual(self.resource.seen, [])

    def test_pull_producer_is_driven_on_the_site_reactor(self) -> None:
        """A pull producer is asked for data by a task on the site's reactor, not while the
        connection's send buffer is full, and not after it unregisters."""
        channel, transport = self.connect(hold=True)
        channel.dataReceived(GET % 1)
        request, _ = self.resource.waiting.pop(0)
        pull = _Pull(request, [b"a", b"b"])
        request.registerProducer(pull, False)
        channel.pauseProducing()
        self.clock.advance(1)
        self.assertEqual(pull.parts, [b"a", b"b"])
        channel.resumeProducing()
        self.clock.advance(0)
        self.assertTrue(pull.done)
        self.assertTrue(transport.value().endswith(b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n"))
        self.assertEqual(len(self.clock.getDelayedCalls()), self.sweeps())
        self.assertEqual(self.sweeps(), 1)

    def test_failing_pull_producer_is_unregistered(self) -> None:
        """A pull producer that raises is logged and asked for nothing more."""
        channel, _ = self.connect(hold=True)
        channel.dataReceived(GET % 1)
        request, _ = self.resource.waiting.pop(0)
        failing = _Failing()
        request.registerProducer(failing, False)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.clock.advance(1)
        self.assertEqual(failing.calls, 1)


class PublicTwistedTests(SynchronousTestCase):
    def test_the_channel_uses_no_private_twisted_name(self) -> None:
        """vast_vespa/net/server.py imports nothing private from Twisted and reads no private
        attribute of anything but its own objects, as its docstring says."""
        tree = ast.parse(inspect.getsource(server))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                names = [*(node.module or "").split("."), *(a.name for a in node.names)]
                self.assertEqual([n for n in names if n.startswith("_")], [], node.module)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                owner = node.value
                self.assertTrue(
                    isinstance(owner, ast.Name) and owner.id == "self", ast.unparse(node)
                )
        self.assertIn("uses no private names", " ".join((server.__doc__ or "").split()))


class _Shapes(Resource):
    """Answers of every shape a response head takes, chosen by the path."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        shape = request.path
        if shape == b"/no-type":
            return b"a body and no Content-Type"
        if shape in (b"/204", b"/304"):
            request.setResponseCode(int(shape[1:]))
            return b""
        if shape == b"/empty":
            request.setHeader(b"content-length", b"0")
            return b""
        if shape == b"/typed":
            request.setHeader(b"content-type", b"text/event-stream")
            request.responseHeaders.addRawHeader(b"x-twice", b"1")
            request.responseHeaders.addRawHeader(b"x-twice", b"2")
            request.setResponseCode(201, b"Made")
            request.write(b"streamed without a length")
            request.finish()
            return NOT_DONE_YET
        request.defaultContentType = None  # as the worker's resource
        request.write(b"no default type")
        request.finish()
        return NOT_DONE_YET


class ContentFileTests(SynchronousTestCase):
    def test_small_bodies_in_memory_others_in_a_file(self) -> None:
        """A body of known length under 100 kB is kept in memory; a larger one, or a chunked
        one (length unknown), in a temporary file: what twisted.web does on its own."""
        site = VespaSite(_Held(), reactor=Clock())
        for length, in_memory in ((0, True), (99_999, True), (100_000, False), (None, False)):
            content = site.getContentFile(length)
            self.addCleanup(content.close)
            self.assertEqual(isinstance(content, BytesIO), in_memory, length)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: w\r\nContent-Length: 2\r\n\r\nhi")
        self.assertEqual(site.resource.seen, [(b"POST", b"/x", b"hi")])
        channel.connectionLost(Failure(ConnectionDone()))


class LeanSetUpTests(SynchronousTestCase):
    """LeanRequest sets a request up in one step and hands it over without twisted.web's
    form checks: the request a resource gets is the one twisted.web's way makes."""

    def received(self, fast_path: bool, raw: bytes) -> dict[str, Any]:
        """The request's attributes as its resource got it, and its body."""
        seen: list[dict[str, Any]] = []

        def answer(request: Request) -> bytes:
            assert request.content is not None
            seen.append({**vars(request), "type": type(request), "body": request.content.read()})
            return b""

        resource = _Held()
        resource.answer_with = answer
        site = VespaSite(resource, reactor=Clock(), fast_path=fast_path)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        channel.makeConnection(StringTransport())
        channel.dataReceived(raw)
        channel.connectionLost(Failure(ConnectionDone()))
        [request] = seen
        return request

    def test_the_same_request_as_twisted_webs(self) -> None:
        form = b"a=1&b=2"
        for raw in (
            b"GET /path?x=1&x=2&flag HTTP/1.1\r\nHost: w\r\nCookie: c=3\r\n\r\n",
            b"POST /form HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n%s" % (len(form), form),
        ):
            lean, stock = self.received(True, raw), self.received(False, raw)
            self.assertEqual(lean["type"].__name__, "LeanRequest")
            self.assertLessEqual(REQUEST_ATTRIBUTES, set(lean))
            for name in (
                *("method", "uri", "path", "args", "clientproto", "client", "host", "queued"),
                *("received_cookies", "cookies", "notifications"),
                *("_parsePOSTFormSubmission", "body"),
            ):
                self.assertEqual(lean[name], stock[name], (raw, name))
        self.assertEqual(lean["args"], {})  # a form body is never read into args


class ResponseHeadTests(SynchronousTestCase):
    """LeanRequest writes the head itself (one pass, one write): it must be the head
    twisted.web writes for the same answer, byte for byte but the Date."""

    def exchange(self, site: Site, raw: bytes) -> bytes:
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        channel.connectionLost(Failure(ConnectionDone()))
        answer: bytes = transport.value()
        return answer

    def without_date(self, answer: bytes) -> bytes:
        return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.startswith(b"Date:"))

    def test_same_head_as_twisted_web(self) -> None:
        clock = Clock()
        guarded = VespaSite(_Shapes(), reactor=clock, fast_path=True)
        plain = Site(_Shapes(), reactor=clock)
        for path in (b"/no-type", b"/204", b"/304", b"/empty", b"/typed", b"/untyped"):
            for method, version in (
                (b"GET", b"HTTP/1.1"),
                (b"HEAD", b"HTTP/1.1"),
                (b"GET", b"HTTP/1.0"),
                (b"OPTIONS", b"HTTP/1.1"),
            ):
                raw = b"%s %s %s\r\nHost: w\r\n\r\n" % (method, path, version)
                ours, theirs = self.exchange(guarded, raw), self.exchange(plain, raw)
                self.assertEqual(self.without_date(ours), self.without_date(theirs), raw)
                self.assertIn(b"\r\nServer: TwistedWeb/", ours)

    def test_date_is_the_site_clock_second(self) -> None:
        clock = Clock()
        site = VespaSite(_Shapes(), reactor=clock, fast_path=True)
        raw = b"GET /no-type HTTP/1.1\r\nHost: w\r\n\r\n"
        self.assertIn(b"\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n", self.exchange(site, raw))
        clock.advance(1_700_000_000.4)
        self.assertIn(b"\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n", self.exchange(site, raw))
        clock.advance(1)
        self.assertIn(b"\r\nDate: Tue, 14 Nov 2023 22:13:21 GMT\r\n", self.exchange(site, raw))


class _Producer:
    state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


@implementer(IPullProducer)
class _Failing:
    calls = 0

    def resumeProducing(self) -> None:
        self.calls += 1
        raise ValueError("no data today")

    def stopProducing(self) -> None:
        pass


@implementer(IPullProducer)
class _Pull:
    def __init__(self, request: Request, parts: list[bytes]) -> None:
        self.request, self.parts, self.done = request, parts, False

    def resumeProducing(self) -> None:
        if self.parts:
            self.request.write(self.parts.pop(0))
        else:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self) -> None:
        self.parts = []


class _PullResource(Resource):
    isLeaf = True

    def render(self, request: Request) -> int:
        request.registerProducer(_Pull(request, [b"a", b"b", b"c"]), False)
        return NOT_DONE_YET


class SocketChannelTests(TestCase):
    async def test_pipelined_requests_over_a_socket(self) -> None:
        """Three requests written at once on a real socket come back as three answers, in
        order, on the same connection, which closes after the last (Connection: close)."""
        resource = _Held()
        url = listen(self, VespaSite(resource))
        last = b"GET /3 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        client = await raw_connect(url, RawClient(GET % 1 + GET % 2 + last))
        received = await client.closed
        self.assertEqual([s[1] for s in resource.seen], [b"/1", b"/2", b"/3"])
        self.assertEqual(received.count(b"HTTP/1.1 200 OK"), 3)
        self.assertLess(received.index(b"GET /1"), received.index(b"GET /2"))
        self.assertLess(received.index(b"GET /2"), received.index(b"GET /3"))

    async def test_pull_producer_is_driven(self) -> None:
        """A pull producer registered on a Request is asked for data until it is done."""
        url = listen(self, VespaSite(_PullResource()))
        raw = b"GET / HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        received = await (await raw_connect(url, RawClient(raw))).closed
        self.assertTrue(received.endswith(b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n"), received)
