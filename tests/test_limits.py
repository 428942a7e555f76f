"""
Client limits: body size, head deadline (slowloris), minimum body rate and open connections.
Timers run on a task.Clock against an in-memory transport; sizes and connection counts go
through real sockets to a real worker.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.fakes import FakeBackend
from tests.helpers import (
    RawClient,
    http_client,
    listen,
    raw_connect,
    raw_request,
    start_worker,
    until,
)
from vast_vespa.net.server import BODY_RATE_WINDOW, RECLAIM_AFTER, GuardedChannel, Limits
from vast_vespa.settings import load_settings
from vast_vespa.site import VespaSite
from vast_vespa.worker.tap import limits_from


class _Recorder(Resource):
    """Remembers which requests reached the resource."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[bytes] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.rendered.append(request.content.read())
        return b"ok"


class ClockedLimitTests(SynchronousTestCase):
    def connect(self, **limits: Any) -> tuple[GuardedChannel, StringTransport]:
        self.clock = Clock()
        self.resource = _Recorder()
        site = VespaSite(self.resource, Limits(**limits), reactor=self.clock)
        channel: GuardedChannel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(self.close, channel, site)
        return channel, transport

    def close(self, channel: GuardedChannel, site: VespaSite) -> None:
        channel.connectionLost(Failure(ConnectionError("test over")))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(site.open_connections, 0)

    def status(self, transport: StringTransport) -> bytes:
        line: bytes = transport.value().split(b"\r\n", 1)[0]
        return line

    def test_slow_head_gets_408(self) -> None:
        """A client dribbling its headers one byte at a time (slowloris) is cut off with a 408
        once the head deadline passes, although every byte resets twisted.web's idle timer."""
        channel, transport = self.connect(head_timeout=30.0)
        head = b"GET / HTTP/1.1\r\nHost: w\r\nX-Slow: " + b"a" * 100
        for byte in head:
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.5)
            if transport.value():
                break
        self.assertEqual(self.status(transport), b"HTTP/1.1 408 Request Timeout")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.rendered, [])

    def test_prompt_head_is_not_timed_out(self) -> None:
        """A head that arrives within the deadline is served, and the deadline timer is gone."""
        channel, transport = self.connect(head_timeout=30.0)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: w\r\n")
        self.clock.advance(29)
        channel.dataReceived(b"\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 200 OK")
        self.clock.advance(29)  # past the head deadline, before the idle timeout
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_slow_body_gets_408(self) -> None:
        """A body arriving slower than MIN_BODY_RATE is cut off with a 408 and never reaches
        the resource."""
        channel, transport = self.connect(min_body_rate=1000.0)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 100000\r\n\r\n")
        channel.dataReceived(b"x" * 20000)  # 2000 B/s over the first window: fine
        self.clock.advance(BODY_RATE_WINDOW)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"x" * 10)  # then nearly nothing
        self.clock.advance(BODY_RATE_WINDOW)
        self.assertEqual(self.status(transport), b"HTTP/1.1 408 Request Timeout")
        self.assertEqual(self.resource.rendered, [])

    def test_steady_body_is_served(self) -> None:
        """A body that keeps the minimum rate is served, and the rate timer stops with it."""
        channel, transport = self.connect(min_body_rate=1000.0)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 30000\r\n\r\n")
        for _ in range(3):
            channel.dataReceived(b"x" * 10000)
            self.clock.advance(BODY_RATE_WINDOW)
        self.assertEqual(self.status(transport), b"HTTP/1.1 200 OK")
        self.assertEqual(len(self.resource.rendered[0]), 30000)

    def test_chunked_body_over_the_limit_gets_413_while_arriving(self) -> None:
        """A chunked body is refused with 413 as soon as it passes MAX_BODY_SIZE, before it is
        complete, and never reaches the resource."""
        channel, transport = self.connect(max_body_size=1000)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"200\r\n" + b"x" * 512 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"200\r\n" + b"x" * 512 + b"\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 413 Content Too Large")
        channel.dataReceived(b"0\r\n\r\n")
        self.assertEqual(self.resource.rendered, [])

    def test_expect_continue_is_not_sent_for_a_too_large_body(self) -> None:
        """A client asking `Expect: 100-continue` for a too-large body gets the 413 instead of
        the 100, so it does not upload."""
        channel, transport = self.connect(max_body_size=1000)
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(self.status(transport), b"HTTP/1.1 413 Content Too Large")
        self.assertNotIn(b"100 Continue", transport.value())

    def test_keep_alive_connection_is_not_timed_out_between_requests(self) -> None:
        """No head deadline runs between requests: an open keep-alive connection with
        nothing sent is only subject to the idle timeout."""
        channel, transport = self.connect(head_timeout=30.0)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: w\r\n\r\n")
        self.clock.advance(31)  # past the head deadline, before the idle timeout
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertFalse(transport.disconnecting)

    def test_body_in_small_reads_at_the_minimum_rate_is_served(self) -> None:
        """The body rate counts every read of the window, not the last one."""
        channel, transport = self.connect(min_body_rate=500.0)
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 30000\r\n\r\n")
        for _ in range(300):  # 1000 B/s in 100-byte reads
            channel.dataReceived(b"x" * 100)
            self.clock.advance(BODY_RATE_WINDOW / 100)
        self.assertEqual(self.status(transport), b"HTTP/1.1 200 OK")
        self.assertEqual(len(self.resource.rendered[0]), 30000)

    def test_chunked_body_at_the_limit_is_served(self) -> None:
        channel, transport = self.connect(max_body_size=1000)
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(self.status(transport), b"HTTP/1.1 200 OK")
        self.assertEqual(len(self.resource.rendered[0]), 1000)

    def test_long_request_line_in_pieces_gets_414(self) -> None:
        """A request line still growing past the limit is a 414, not a 431."""
        channel, transport = self.connect(max_header_size=100)
        for _ in range(3):
            channel.dataReceived(b"GET /" + b"a" * 60)
        self.assertEqual(self.status(transport), b"HTTP/1.1 414 URI Too Long")

    def test_max_headers_is_inclusive(self) -> None:
        channel, transport = self.connect(max_headers=3)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: w\r\nX-1: 1\r\nX-2: 2\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 200 OK")
        channel, transport = self.connect(max_headers=3)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: w\r\nX-1: 1\r\nX-2: 2\r\nX-3: 3\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 431 Request Header Fields Too Large")

    def test_obs_fold_is_named_in_the_error(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: w\r\nX-A: a\r\n b\r\n\r\n")
        body = json.loads(transport.value().partition(b"\r\n\r\n")[2])
        self.assertIn("obsolete line folding", body["detail"])

    def test_tls_never_negotiates_h2(self) -> None:
        """Over TLS only HTTP/1.1 is offered (ALPN), even with the h2 package installed: every
        connection goes through the checks above."""
        self.assertEqual(VespaSite(_Recorder()).acceptableProtocols(), [b"http/1.1"])

    def test_settings_reach_the_limits(self) -> None:
        """The MAX_* / *_TIMEOUT / MIN_BODY_RATE options end up in the worker's limits."""
        settings = load_settings(
            {},
            {
                "MAX_BODY_SIZE": "2M",
                "MAX_HEADER_SIZE": "8k",
                "MAX_HEADERS": "50",
                "HEAD_TIMEOUT": "5",
                "MIN_BODY_RATE": "0",
                "MAX_CONNECTIONS": "10",
                "MAX_CONNECTIONS_PER_ADDRESS": "4",
            },
        )
        self.assertEqual(limits_from(settings), Limits(2 << 20, 8192, 50, 5.0, 0.0, 10, 4))

    def test_per_address_cap_defaults_to_half(self) -> None:
        """MAX_CONNECTIONS_PER_ADDRESS defaults to MAX_CONNECTIONS / 2; 0 turns it off."""
        cases = [({}, 1024), ({"MAX_CONNECTIONS": "101"}, 50), ({"MAX_CONNECTIONS": "0"}, 0)]
        cases.append(({"MAX_CONNECTIONS_PER_ADDRESS": "0"}, 0))
        for environment, expected in cases:
            limits = limits_from(load_settings({}, environment))
            self.assertEqual(limits.max_connections_per_address, expected, environment)


class _Hanging(Resource):
    isLeaf = True

    def render(self, request: Request) -> int:
        return NOT_DONE_YET


class ConnectionCapTests(SynchronousTestCase):
    """MAX_CONNECTIONS and MAX_CONNECTIONS_PER_ADDRESS: idle connections are closed, oldest
    first, to make room; connections with a request in progress never are."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.site = VespaSite(_Recorder(), Limits(max_connections=3), reactor=self.clock)
        self.site.timeOut = None
        self.channels: list[tuple[GuardedChannel, StringTransport]] = []

    def tearDown(self) -> None:
        for channel, _ in self.channels:
            channel.connectionLost(Failure(ConnectionError("test over")))
        self.assertEqual(self.site.open_connections, 0)

    def connect(self, host: str = "127.0.0.1") -> tuple[GuardedChannel, StringTransport]:
        channel: GuardedChannel = self.site.buildProtocol(IPv4Address("TCP", host, 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 4000))
        channel.makeConnection(transport)
        self.channels.append((channel, transport))
        return channel, transport

    def refused(self, transport: StringTransport) -> bool:
        answer: bytes = transport.value()
        return answer.startswith(b"HTTP/1.1 503 ")

    def test_oldest_idle_connection_makes_room(self) -> None:
        """At the cap, a new connection closes the oldest idle one (silent ones are idle) and
        is served; the others stay open."""
        (_, first), (_, second), (_, third) = [self.connect() for _ in range(3)]
        self.clock.advance(RECLAIM_AFTER)
        channel, transport = self.connect("127.0.0.2")
        self.assertTrue(first.disconnecting)
        self.assertFalse(second.disconnecting or third.disconnecting)
        self.assertFalse(self.refused(transport))
        self.assertEqual((self.site.open_connections, self.site.connections.reclaimed), (3, 1))
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_connection_idle_again_goes_to_the_back(self) -> None:
        """A connection that was answered is idle from its answer on: one silent since before
        is closed first."""
        (first_channel, first), (_, second), _ = [self.connect() for _ in range(3)]
        self.clock.advance(RECLAIM_AFTER)
        first_channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: w\r\n\r\n")
        self.clock.advance(RECLAIM_AFTER)
        self.connect()
        self.assertFalse(first.disconnecting)
        self.assertTrue(second.disconnecting)

    def test_connection_with_a_request_in_progress_is_never_closed(self) -> None:
        """Connections with a head or a body arriving are not idle: at the cap a new one gets
        503 and those are kept."""
        heads = [self.connect() for _ in range(2)]
        self.clock.advance(RECLAIM_AFTER)
        heads[0][0].dataReceived(b"GET /x HTTP/1.1\r\nHo")
        heads[1][0].dataReceived(b"POST /x HTTP/1.1\r\nHost: w\r\nContent-Length: 9\r\n\r\nab")
        busy = self.connect()
        busy[0].dataReceived(b"G")
        _, transport = self.connect("127.0.0.2")
        self.assertTrue(self.refused(transport))
        self.assertIn(b"at most 3 open connections;", transport.value())
        for _, kept in [*heads, busy]:
            self.assertFalse(kept.disconnecting)

    def test_connection_being_answered_is_never_closed(self) -> None:
        """A request waiting for its answer (the backend is slow) keeps its connection busy,
        however long it waits."""
        self.site.resource = _Hanging()
        waiting = [self.connect() for _ in range(3)]
        for channel, _ in waiting:
            channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: w\r\n\r\n")
        self.clock.advance(10 * RECLAIM_AFTER)
        _, transport = self.connect("127.0.0.2")
        self.assertTrue(self.refused(transport))
        self.assertFalse(any(kept.disconnecting or kept.value() for _, kept in waiting))

    def test_per_address_cap_closes_that_address_idle_connection(self) -> None:
        """Over the per-address cap, that address's oldest idle connection makes room;
        another address's older idle connection is left alone."""
        self.site.limits = Limits(max_connections=10, max_connections_per_address=2)
        _, other = self.connect("127.0.0.2")
        (_, first), (_, second) = self.connect(), self.connect()
        self.clock.advance(RECLAIM_AFTER)
        _, third = self.connect()
        self.assertTrue(first.disconnecting)
        self.assertFalse(other.disconnecting or second.disconnecting or third.disconnecting)

    def test_per_address_cap_refuses_when_none_is_idle(self) -> None:
        """With all its connections busy, an address over its cap gets 503; another address
        is served."""
        self.site.limits = Limits(max_connections=10, max_connections_per_address=2)
        for _ in range(2):
            self.connect()[0].dataReceived(b"G")
        _, transport = self.connect()
        self.assertTrue(self.refused(transport))
        self.assertIn(b"open connections from one address", transport.value())
        _, fine = self.connect("127.0.0.2")
        self.assertFalse(self.refused(fine) or fine.disconnecting)

    def test_connection_idle_for_a_moment_only_is_kept(self) -> None:
        """A connection idle for less than RECLAIM_AFTER (a keep-alive connection just
        answered, about to carry its client's next request) is not closed: 503 instead."""
        connections = [self.connect() for _ in range(3)]
        self.clock.advance(RECLAIM_AFTER / 2)
        _, transport = self.connect("127.0.0.2")
        self.assertTrue(self.refused(transport))
        self.assertFalse(any(kept.disconnecting for _, kept in connections))
        self.clock.advance(RECLAIM_AFTER / 2)
        _, transport = self.connect("127.0.0.2")
        self.assertFalse(self.refused(transport))
        self.assertTrue(connections[0][1].disconnecting)

    def test_per_address_cap_zero_is_off(self) -> None:
        self.site.limits = Limits(max_connections=0, max_connections_per_address=0)
        transports = [self.connect()[1] for _ in range(20)]
        self.assertFalse(any(t.disconnecting for t in transports))


class SocketLimitTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.backend_url = listen(self, self.backend)

    async def test_body_over_limit_is_413_before_upload(self) -> None:
        """A Content-Length over MAX_BODY_SIZE is answered 413 from the head alone; the client
        can read the answer and the backend sees nothing."""
        url, _ = start_worker(self, self.backend_url, max_body_size=1024)
        head = b"POST /upload HTTP/1.1\r\nHost: w\r\nContent-Length: 1048576\r\n\r\n"
        raw = await raw_request(url, head + b"x" * 65536)  # still sending when refused
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:100])
        self.assertEqual(
            json.loads(raw.partition(b"\r\n\r\n")[2])["error"], "request body too large"
        )
        self.assertEqual(self.backend.seen, [])

    async def test_body_at_the_limit_is_served(self) -> None:
        """A body of exactly MAX_BODY_SIZE bytes is relayed."""
        url, _ = start_worker(self, self.backend_url, max_body_size=1024)
        response = await http_client(self).post(url + "/upload", data=b"y" * 1024)
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["body_length"], 1024)

    async def test_connections_over_the_limit_get_503_and_worker_stays_responsive(self) -> None:
        """Beyond MAX_CONNECTIONS of busy connections (heads arriving), a new connection gets
        a 503 with Retry-After and is closed; once a slot frees up, requests are served
        again."""
        url, service = start_worker(
            self, self.backend_url, max_connections=3, max_connections_per_address=0
        )
        site = service.site
        idle = [await raw_connect(url, RawClient(b"GET /x HTTP/1.1\r\n")) for _ in range(3)]
        # (the worker is told of the heads' first bytes by the kernel: nothing here says when)
        await until(lambda: site.connections.idle_count == 0)
        raw = await raw_request(url, b"GET /x HTTP/1.1\r\nHost: w\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 503 "), raw[:100])
        self.assertIn(b"retry-after: 1", raw)
        self.assertEqual(site.refusals["too many connections"], 1)
        idle[0].tcp.loseConnection()
        await idle[0].closed
        await until(lambda: site.open_connections <= 2)
        response = await http_client(self).get(url + "/ok")
        self.assertEqual(response.code, 200)
        for client in idle[1:]:
            client.tcp.loseConnection()
            await client.closed
        self.assertEqual([s.uri for s in self.backend.seen], [b"/ok"])

    async def test_silent_connections_from_one_address_do_not_lock_out_another(self) -> None:
        """Many connections from one address that send nothing (more than MAX_CONNECTIONS)
        do not keep a client at another address out: it is served, and the flood's address is
        held to its cap (MAX_CONNECTIONS / 2 by default)."""
        url, service = start_worker(self, self.backend_url, max_connections=8)
        flood = [await raw_connect(url, RawClient(b"")) for _ in range(12)]
        # (the worker's accepts happen in the kernel's order, silent ones after the listener's
        # TCP_DEFER_ACCEPT second: nothing here says when)
        site = service.site
        await until(
            lambda: (
                site.connections.reclaimed + site.refusals["too many connections"] >= 8
                and site.connections.from_address("127.0.0.1") <= 4
            )  # the refused ones are gone
        )
        port = int(url.rsplit(":", 1)[1])
        other = RawClient(b"GET /other HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n")
        reactor.connectTCP(
            "127.0.0.1",
            port,
            cast(ClientFactory[RawClient], ClientFactory.forProtocol(lambda: other)),
            bindAddress=("127.0.0.2", 0),
        )
        raw = await other.closed
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:100])
        self.assertEqual([s.uri for s in self.backend.seen], [b"/other"])
        self.assertLessEqual(site.connections.from_address("127.0.0.1"), 4)
        for client in flood:
            client.tcp.loseConnection()
