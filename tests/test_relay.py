"""The relay through real sockets: a worker in passthrough mode in front of a fake backend;
its answers when the backend cannot answer, in memory."""

from __future__ import annotations

import gc
import hashlib
import os
import weakref
from functools import partial
from io import BytesIO
from tempfile import TemporaryFile
from types import SimpleNamespace
from typing import IO, Any, cast

import treq
from twisted.internet import reactor
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import _newclient
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from tests.fakes import FakeBackend
from tests.helpers import (
    RawClient,
    http_client,
    listen,
    listen_sending_now,
    raw_connect,
    raw_request,
    server_side_closed,
    start_signed_worker,
    start_worker,
)
from tests.memory import MemoryWorker, Recorder
from tests.test_gate import query
from vast_vespa.net import server
from vast_vespa.net.client import BytesProducer, Response, _CachedEndpoints
from vast_vespa.net.listen import SendNowServer
from vast_vespa.net.request import LeanRequest
from vast_vespa.net.resolve import NamedEndpoint
from vast_vespa.outcome import Outcome
from vast_vespa.relay import SMALL_BODY, BodyRelay, ProxiedRequest, body_producer
from vast_vespa.site import VespaRequest, VespaSite


def seen_closed(cancelled: Deferred[None]) -> Deferred[None]:
    """The backend's "connection closed" signal, failing the test within 10 s rather than at
    trial's 2-minute timeout when the worker never closes the backend call."""
    return cancelled.addTimeout(10, reactor)


class RelayTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.backend_url = listen(self, self.backend)
        self.url, self.worker = start_worker(self, self.backend_url)
        self.http = http_client(self)

    async def test_headers_go_out_before_the_first_event(self) -> None:
        """An SSE answer whose first event takes a while: the client has the status and
        headers at once, before any event."""
        client = await raw_connect(
            self.url, RawClient(b"GET /sse?n=1&first=30 HTTP/1.1\r\nHost: w\r\n\r\n")
        )
        self.addCleanup(client.tcp.abortConnection)
        await client.when(lambda: b"\r\n\r\n" in client.received)
        head, _, body = client.received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertIn(b"\r\nContent-Type: text/event-stream\r\n", head)
        self.assertEqual(body, b"")

    async def test_the_head_and_the_first_event_leave_in_one_send(self) -> None:
        """A backend that writes its head with the first event (one read for the worker): the
        client gets both in one write, so one packet and one wake-up, not two (the fast
        path's write path and LeanRequest)."""
        _, worker = start_worker(self, self.backend_url, fast_path=True)
        url = await listen_sending_now(self, worker.site)
        writes: list[bytes] = []
        write = SendNowServer.write

        def recording(transport: SendNowServer, data: bytes) -> None:
            writes.append(data)
            write(transport, data)

        self.patch(SendNowServer, "write", recording)
        raw = await raw_request(
            url, b"GET /sse?n=2 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"data: event 1", raw)
        self.assertTrue(writes[0].startswith(b"HTTP/1.1 200 OK\r\n"), writes[0])
        self.assertIn(b"data: event 0", writes[0])

    async def test_a_backend_named_by_host_name(self) -> None:
        """BACKEND_URL may name its host (the default is localhost): the reactor's own
        resolver looks it up, and requests on new connections are relayed."""
        port = self.backend_url.rsplit(":", 1)[1]
        url, _ = start_worker(self, f"http://localhost:{port}")
        for path in ("/one", "/two"):
            response = await self.http.get(url + path, headers=Headers({"Connection": ["close"]}))
            self.assertEqual((response.code, (await response.json())["uri"]), (200, path))

    async def test_a_relayed_stream_is_freed_without_the_garbage_collector(self) -> None:
        """Once a stream is over, its request, relay and backend response are freed by
        reference counting alone: no reference cycle is left for the garbage collector (which
        ran for each stream's objects, 2.5 % of the worker's CPU per S3 stream)."""
        made = self.without_collector()
        raw = await raw_request(
            self.url, b"GET /sse?n=2 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"data: event 1", raw)
        await self.all_freed(made, self.url)

    async def test_a_signed_request_is_freed_without_the_garbage_collector(self) -> None:
        """The same for a request in signed mode (envelope parsed and verified, workload
        counted): a keep-alive client's requests leave nothing to collect either."""
        worker = await start_signed_worker(self, self.backend_url)
        made = self.without_collector()
        response = await self.http.post(
            worker.url + "/ok", json={"auth_data": worker.auth(), "payload": {"a": 1}}
        )
        self.assertEqual(response.code, 200)
        await response.content()
        await self.all_freed(made, worker.url)

    async def test_a_request_on_a_kept_alive_backend_connection_is_freed_too(self) -> None:
        """The same for a request relayed on a backend connection kept alive from the one
        before (the pooled connection hands its response to the relay itself)."""
        first = await raw_request(
            self.url, b"GET /ok HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(first.startswith(b"HTTP/1.1 200 "), first)
        made = self.without_collector()
        raw = await raw_request(
            self.url, b"GET /sse?n=2 HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
        )
        self.assertIn(b"data: event 1", raw)
        self.assertEqual(self.backend.seen[0].client_port, self.backend.seen[1].client_port)  # kept
        await self.all_freed(made, self.url)

    def without_collector(self) -> list[weakref.ref[object]]:
        """Turn the garbage collector off for the test; weak references to each request,
        relay and backend response the worker sets up from now on."""
        made: list[weakref.ref[object]] = []
        for cls in (VespaRequest, LeanRequest, ProxiedRequest, BodyRelay, Response):
            self.patch(cls, "__init__", _recording_init(cls.__init__, made))
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        return made

    async def all_freed(self, made: list[weakref.ref[object]], url: str) -> None:
        self.assertEqual(len(made), 4)  # one of each
        await server_side_closed(url)  # the worker's side of the connection is gone too
        self.assertEqual([ref() for ref in made], [None] * 4)

    async def test_every_method_path_and_query(self) -> None:
        """Every method reaches the backend with the same path and query string."""
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            response = await self.http.request(method, self.url + "/a/b?x=1&x=2&y=%2F")
            self.assertEqual(response.code, 200)
            self.assertEqual((await response.json())["uri"], "/a/b?x=1&x=2&y=%2F")
            self.assertEqual(self.backend.seen[-1].method, method.encode())
            self.assertEqual(self.backend.seen[-1].uri, b"/a/b?x=1&x=2&y=%2F")

    async def test_head_is_forwarded_as_head(self) -> None:
        """HEAD goes out as HEAD, and the backend's Content-Length comes back without a body."""
        response = await self.http.head(self.url + "/status/200")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.backend.seen[-1].method, b"HEAD")
        self.assertEqual(await response.content(), b"")

    async def test_bodies_byte_for_byte(self) -> None:
        """JSON, multipart and binary bodies, small and large, reach the backend unchanged."""
        bodies = [
            (b"application/json", b'{"a": 1.50, "b": "\\u00e9"}'),
            (
                b"multipart/form-data; boundary=xx",
                b"--xx\r\nContent-Disposition: form-data\r\n\r\nhi\r\n--xx--\r\n",
            ),
            (b"application/octet-stream", os.urandom(3 * 1024 * 1024)),
        ]
        for content_type, body in bodies:
            response = await self.http.post(
                self.url + "/upload", data=body, headers=Headers({b"content-type": [content_type]})
            )
            echoed = await response.json()
            self.assertEqual(echoed["body_sha256"], hashlib.sha256(body).hexdigest())
            seen = self.backend.seen[-1]
            self.assertEqual(seen.headers[b"content-type"], [content_type])
            self.assertEqual(seen.headers[b"content-length"], [b"%d" % len(body)])

    async def test_get_without_body_has_no_content_length(self) -> None:
        """A GET without a body goes out without a Content-Length header."""
        await (await self.http.get(self.url + "/x")).content()
        self.assertNotIn(b"content-length", self.backend.seen[-1].headers)

    async def test_request_headers(self) -> None:
        """End-to-end headers pass, hop-by-hop ones do not; Host is the backend's."""
        headers = Headers(
            {
                b"Authorization": [b"Bearer app"],
                b"X-Trace": [b"t1"],
                b"Connection": [b"X-Secret"],
                b"X-Secret": [b"s"],
                b"Proxy-Authorization": [b"p"],
            }
        )
        await (await self.http.get(self.url + "/h", headers=headers)).content()
        seen = self.backend.seen[-1].headers
        self.assertEqual(seen[b"authorization"], [b"Bearer app"])
        self.assertEqual(seen[b"x-trace"], [b"t1"])
        self.assertNotIn(b"x-secret", seen)
        self.assertNotIn(b"proxy-authorization", seen)
        self.assertEqual(seen[b"host"], [self.backend_url.split("//")[1].encode()])
        self.assertEqual(seen[b"x-forwarded-for"], [b"127.0.0.1"])
        self.assertEqual(seen[b"x-forwarded-proto"], [b"http"])

    async def test_status_and_response_headers_pass_through(self) -> None:
        """Every status comes back with the backend's end-to-end headers and body."""
        for code in (200, 201, 301, 404, 429, 500, 503):
            response = await self.http.get(self.url + f"/status/{code}", allow_redirects=False)
            self.assertEqual(response.code, code)
            headers = response.headers
            self.assertEqual(headers.getRawHeaders(b"x-custom"), [b"kept"])
            self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"7"])
            self.assertEqual(headers.getRawHeaders(b"set-cookie"), [b"a=1"])
            self.assertEqual(
                headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"]
            )
            self.assertEqual(await response.json(), {"status": code})

    async def test_no_invented_content_type(self) -> None:
        """A backend answer without Content-Type comes back without one."""
        response = await self.http.get(self.url + "/health")
        self.assertIsNone(response.headers.getRawHeaders(b"content-type"))
        self.assertEqual(await response.content(), b"ok")

    async def test_sse_events_arrive_as_sent(self) -> None:
        """Each SSE event reaches the client while the stream is still open."""
        response = await self.http.get(self.url + "/sse?n=3&interval=30", unbuffered=True)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        first: Deferred[bytes] = Deferred()
        chunks: list[bytes] = []

        def collect(data: bytes) -> None:
            chunks.append(data)
            if not first.called:
                first.callback(data)

        done = treq.collect(response, collect)
        self.assertEqual(await first, b"data: event 0\n\n")
        self.assertFalse(done.called)  # the next event is 30 s away
        cast(_newclient.Response, response.original)._transport.stopProducing()  # hang up
        await seen_closed(self.backend.cancelled[-1])  # the backend saw the disconnect
        await done.addErrback(lambda _: None)

    async def test_backpressure_pauses_the_backend(self) -> None:
        """A client that does not read pauses the backend; reading resumes it, nothing is lost."""
        total = 64 * 1024 * 1024
        request = b"GET /firehose?total=%d HTTP/1.1\r\nHost: x\r\n\r\n" % total
        client = await raw_connect(self.url, RawClient(request, read=False))
        await self.backend.arrived()
        firehose = self.backend.firehoses[0]
        sent_when_paused = await firehose.was_paused
        self.assertLess(sent_when_paused, total // 2)
        client.producer.resumeProducing()
        await client.when(lambda: client.count > total)
        self.assertEqual(firehose.sent, total)
        client.tcp.loseConnection()

    async def test_a_client_that_reads_nothing_is_cut_as_its_own(self) -> None:
        """BACKEND_STALL_TIMEOUT counts the backend's silence, not the client's: a client that
        stops reading (the worker paused the backend for it) is cut after that long as one
        that left (cancelled, "client stopped reading"), its connection aborted and the backend
        call cut; it was blamed on the backend ("response body stalled", errored)."""
        url, worker = start_worker(self, self.backend_url, backend_stall_timeout=0.3)
        recorder = Recorder()
        resource = worker.site.resource
        resource._observers = (*resource._observers, recorder)
        request = b"GET /firehose?total=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (256 * 1024 * 1024)
        client = await raw_connect(url, RawClient(request, read=False))
        await self.backend.arrived()
        await self.backend.firehoses[0].was_paused
        [result] = await recorder.wait()
        self.assertEqual(
            (result.outcome, result.reason), (Outcome.CANCELLED, "client stopped reading")
        )
        # (The result came once the backend's connection was closed: relay.connectionLost.)
        client.producer.resumeProducing()  # reading again, it finds its connection aborted
        received = await client.closed
        self.assertFalse(received.endswith(b"0\r\n\r\n"))

    async def test_disconnect_cancels_backend_call(self) -> None:
        """A client that leaves before the answer makes the worker close the backend call."""
        client = await raw_connect(
            self.url, RawClient(b"GET /slow?delay=60 HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        await self.backend.arrived()
        client.tcp.loseConnection()
        await seen_closed(self.backend.cancelled[0])

    async def test_a_client_that_leaves_while_not_read_cancels_the_backend_call(self) -> None:
        """A client that pipelines more than PIPELINE_BUFFER behind a slow request (so that
        the worker stops reading it), then closes: the worker sees the close, though input is
        still unread before it, within a few HANGUP_CHECKs, and cancels the backend call;
        the pipelined request never reaches the backend."""
        self.patch(server, "HANGUP_CHECK", 0.05)
        body = b"x" * 100_000  # more than the worker reads before it stops reading
        client = await raw_connect(
            self.url,
            RawClient(
                b"GET /slow?delay=60 HTTP/1.1\r\nHost: x\r\n\r\n"
                b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            ),
        )
        await self.backend.arrived()
        client.tcp.loseConnection()
        await self.backend.cancelled[0].addTimeout(2.0, reactor)  # 40 checks
        await server_side_closed(self.url)
        self.assertEqual([seen.uri for seen in self.backend.seen], [b"/slow?delay=60"])

    async def test_a_client_that_hangs_up_at_the_end_of_a_stream_was_served(self) -> None:
        """A client that hangs up as soon as it has read a stream's last event (the OpenAI
        SDK at ``data: [DONE]``), before the backend's last chunk reached the worker (held
        here until the worker saw the client go): served, and the backend connection, whose
        answer ended cleanly, serves the next request."""
        recorder = Recorder()
        resource = self.worker.site.resource
        resource._observers = (*resource._observers, recorder)
        client = await raw_connect(
            self.url, RawClient(b"GET /sse?n=2&end=held HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        await client.when(lambda: b"data: [DONE]" in client.received)
        client.tcp.loseConnection()
        await server_side_closed(self.url)
        self.backend.ends[0]()
        [result] = await recorder.wait()
        self.assertEqual(result.outcome, Outcome.SERVED)
        response = await self.http.get(self.url + "/ok")
        self.assertEqual(response.code, 200)
        await response.content()
        streamed, after = self.backend.seen
        self.assertEqual(after.client_port, streamed.client_port)

    async def test_backend_reset_before_headers_is_502(self) -> None:
        """A backend that drops the connection before answering gives a 502."""
        response = await self.http.get(self.url + "/reset")
        self.assertEqual(response.code, 502)
        self.assertEqual((await response.json())["error"], "backend unavailable")

    async def test_break_mid_body_truncates_the_client(self) -> None:
        """A backend that breaks mid-stream makes the client connection end without a clean end."""
        raw = await raw_request(self.url, b"GET /break HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"data: one", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"), raw)  # no terminating chunk

    async def test_short_content_length_truncates_the_client(self) -> None:
        """A backend sending less than its Content-Length makes the client see a short body."""
        raw = await raw_request(self.url, b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 1000", head)
        self.assertEqual(body, b"only this")

    async def test_worker_keeps_serving_after_faults(self) -> None:
        """After resets and breaks, the next request is served normally (the pool is healthy)."""
        await (await self.http.get(self.url + "/reset")).content()
        await raw_request(self.url, b"GET /break HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await self.http.post(self.url + "/ok", json={"a": 1})
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["method"], "POST")


class RelayDecisionTests(SynchronousTestCase):
    """Which answer the relay gives when the backend cannot, in memory (tests/memory.py)."""

    def test_stall_timer_only_for_a_body_still_coming(self) -> None:
        """A body that came whole with its head cannot stall: it is relayed without a stall
        timer. A streamed one has one until it ends."""
        worker = MemoryWorker(self, signed=False, stall_timeout=30.0)
        armed: list[str] = []
        call_later = worker.clock.callLater

        def recording(delay: float, func: Any, *args: Any, **kwargs: Any) -> Any:
            armed.append(getattr(func, "__name__", ""))
            return call_later(delay, func, *args, **kwargs)

        self.patch(worker.clock, "callLater", recording)
        self.assertEqual(worker.get("/whole").code, 200)
        self.assertNotIn("_stalled", armed)

        def stall_timers() -> list[object]:
            calls = worker.clock.getDelayedCalls()
            return [
                call
                for call in calls
                if getattr(cast(DelayedCall, call).func, "__name__", "") == "_stalled"
            ]

        client = worker.request("GET", "/sse?n=2&interval=1")
        self.assertEqual(len(stall_timers()), 1)
        worker.advance(1)
        self.assertIn(b"data: event 1", client.received)
        self.assertEqual(stall_timers(), [])

    def test_absolute_form_target_is_refused(self) -> None:
        """An absolute-form target is a 400: the backend host is always BACKEND_URL."""
        worker = MemoryWorker(self, signed=False)
        answer = worker.answered(
            worker.send(b"GET http://evil.example/x HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        self.assertEqual(answer.code, 400)
        self.assertEqual(answer.json()["error"], "bad request target")
        self.assertEqual(worker.backend.seen, [])

    def test_backend_down_is_502(self) -> None:
        """An unreachable backend gives a 502 with a JSON error."""
        worker = MemoryWorker(self, signed=False, backend_down=True)
        answer = worker.post("/v1/x", {})
        self.assertEqual(answer.code, 502)
        self.assertEqual(answer.json()["error"], "backend unavailable")
        self.assertEqual(answer.json()["detail"], "Connection was refused by other side.")

    def test_request_timeout_is_504(self) -> None:
        """With REQUEST_TIMEOUT set, a backend that does not answer in time gives a 504 and
        its call is cancelled."""
        worker = MemoryWorker(self, signed=False, request_timeout=0.2)
        client = worker.request("GET", "/slow?delay=30")
        worker.advance(0.19)
        self.assertIsNone(client.answer)
        worker.advance(0.01)
        answer = worker.answered(client)
        self.assertEqual(answer.code, 504)
        self.assertEqual(answer.json()["error"], "backend timeout")
        self.successResultOf(worker.backend.cancelled[-1])


class _ProducerRecorder:
    """What BodyRelay calls on its request: producer (un)registration, writes and the end."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.calls.append("register")

    def unregisterProducer(self) -> None:
        self.calls.append("unregister")

    def write(self, data: bytes) -> None:
        self.calls.append("write")

    def finish(self) -> None:
        self.calls.append("finish")


class BodyProducerTests(SynchronousTestCase):
    """What a request body is sent with: in memory, the bytes; a file, read whole when small,
    else streamed; an empty body, nothing unless the client sent one (framing headers)."""

    def test_in_memory(self) -> None:
        content = BytesIO(b'{"prompt": "hi"}')
        content.seek(5)  # wherever it was left, the whole body
        producer = body_producer(content, Cooperator(), required=True)
        assert isinstance(producer, BytesProducer)
        self.assertEqual(producer.body, b'{"prompt": "hi"}')

    def test_empty(self) -> None:
        for content in (BytesIO(), self.temporary_file()):
            self.assertIsNone(body_producer(content, Cooperator(), required=False))
            producer = body_producer(content, Cooperator(), required=True)
            assert isinstance(producer, BytesProducer)
            self.assertEqual(producer.body, b"")

    def temporary_file(self) -> IO[bytes]:
        file = TemporaryFile()
        self.addCleanup(file.close)
        return file

    def test_file(self) -> None:
        small, large = self.temporary_file(), self.temporary_file()
        small.write(b"x" * 10)
        large.write(b"x" * (SMALL_BODY + 1))
        producer = body_producer(small, Cooperator(), required=True)
        assert isinstance(producer, BytesProducer)
        self.assertEqual(producer.body, b"x" * 10)
        self.assertIsInstance(body_producer(large, Cooperator(), required=True), FileBodyProducer)


class BodyRelayTests(SynchronousTestCase):
    def test_a_body_that_came_whole_registers_no_producer(self) -> None:
        """A body already over when it is delivered (net/client.py's Response says so) has
        nothing to pause: the relay writes it and finishes without registering as the
        request's producer. A body still coming is relayed as a producer."""
        for ended, expected in (
            (True, ["write", "finish"]),
            (False, ["register", "write", "unregister", "finish"]),
        ):
            request = _ProducerRecorder()
            done: list[bool] = []
            relay = BodyRelay(cast(Any, request), partial(done.append, True))
            relay.makeConnection(cast(Any, SimpleNamespace(ended=ended)))
            relay.dataReceived(b"body")
            relay.connectionLost(Failure(ResponseDone()))
            self.assertEqual((request.calls, done), (expected, [True]), ended)

    def test_time_paused_for_the_client_is_not_the_backends_silence(self) -> None:
        """While the client does not read, the relay holds the backend: the stall clock (the
        last chunk's time) restarts when the client reads again, and ``paused_since`` says
        since when the silence has been the client's."""
        clock = Clock()
        relay = BodyRelay(cast(Any, _ProducerRecorder()), lambda: None, clock)
        relay.makeConnection(
            cast(
                Any,
                SimpleNamespace(
                    ended=False, pauseProducing=lambda: None, resumeProducing=lambda: None
                ),
            )
        )
        relay.dataReceived(b"body")
        clock.advance(5)
        relay.pauseProducing()
        clock.advance(100)
        relay.pauseProducing()  # paused again while paused: still since 5
        self.assertEqual((relay.paused_since, relay.last_data), (5, 0))
        relay.resumeProducing()
        self.assertEqual((relay.paused_since, relay.last_data), (None, 105))


def _recording_init(original: Any, made: list[weakref.ref[object]]) -> Any:
    """``original`` (an ``__init__``), recording a weak reference to each object it sets up."""

    def init(self: object, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    return init


class FormBodyTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        # The fake backend must not parse forms either (a default Site would answer 400).
        self.url, self.worker = start_worker(self, listen(self, VespaSite(self.backend)))
        self.http = http_client(self)

    async def test_form_bodies_are_not_parsed(self) -> None:
        """A form body Vespa could not parse still reaches the backend: forms are its business."""
        response = await self.http.post(
            self.url + "/upload",
            data=b"not really multipart",
            headers=Headers({b"content-type": [b"multipart/form-data"]}),
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.backend.seen[-1].body, b"not really multipart")


class BackendEndpointTests(TestCase):
    def test_one_endpoint_per_backend(self) -> None:
        """The relay makes one endpoint per backend and reuses it; https gets TLS."""
        endpoints = _CachedEndpoints(MemoryReactorClock(), None, None)
        first = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8000/a"))
        again = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8000/b?x=1"))
        other = endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8001/a"))
        tls = endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8000/a"))
        self.assertIs(first, again)
        self.assertIsInstance(first, TCP4ClientEndpoint)
        self.assertIsNot(other, first)
        self.assertNotIsInstance(tls, TCP4ClientEndpoint)  # wrapped in TLS

    def test_addresses_are_not_looked_up(self) -> None:
        """A backend given by IP address is connected to straight (no name look-up per new
        connection, in a thread; every relay test here connects that way); a name goes
        through a NamedEndpoint (each address it has is tried, look-ups kept by one
        RememberedNames per agent); all keep the connect timeout."""
        endpoints = _CachedEndpoints(MemoryReactorClock(), 7.0, None)
        urls = (b"http://10.1.2.3:8000/", b"http://[::1]:8000/", b"http://localhost:8000/")
        made = {url: endpoints.endpointForURI(URI.fromBytes(url)) for url in urls}
        other = endpoints.endpointForURI(URI.fromBytes(b"http://backend:9000/"))
        self.assertIsInstance(made[b"http://10.1.2.3:8000/"], TCP4ClientEndpoint)
        self.assertIsInstance(made[b"http://[::1]:8000/"], TCP6ClientEndpoint)
        named = made.pop(b"http://localhost:8000/")
        self.assertIsInstance(named, NamedEndpoint)
        self.assertIsInstance(other, NamedEndpoint)
        self.assertIs(cast(NamedEndpoint, named).names, cast(NamedEndpoint, other).names)
        resolved = (*made.values(), cast(NamedEndpoint, named).endpoint)
        timeouts = [
            cast(TCP4ClientEndpoint | TCP6ClientEndpoint | HostnameEndpoint, endpoint)._timeout
            for endpoint in resolved
        ]
        self.assertEqual(timeouts, [7.0, 7.0, 7.0])

    def test_bounded_and_policy(self) -> None:
        """The client proxy meets many workers: only the last MAX_ENDPOINTS are kept, and
        https endpoints use the TLS policy given (the client's, trusting the Vast CA)."""
        asked: list[tuple[bytes, int]] = []

        @implementer(IPolicyForHTTPS)
        class Policy:
            def creatorForNetloc(
                self, hostname: bytes, port: int
            ) -> IOpenSSLClientConnectionCreator:
                asked.append((hostname, port))
                return BrowserLikePolicyForHTTPS().creatorForNetloc(hostname, port)

        endpoints = _CachedEndpoints(MemoryReactorClock(), None, Policy())
        limit = _CachedEndpoints.MAX_ENDPOINTS
        first = endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:1/"))
        self.assertEqual(asked, [(b"127.0.0.1", 1)])
        for port in range(2, limit + 2):
            endpoints.endpointForURI(URI.fromBytes(b"http://127.0.0.1:%d/" % port))
        self.assertEqual(len(endpoints._made), limit)
        self.assertIsNot(endpoints.endpointForURI(URI.fromBytes(b"https://127.0.0.1:1/")), first)
        self.assertEqual(len(asked), 2)  # the first was dropped and made again


class Redirecting(Resource):
    """A backend that builds absolute URLs from its own address (as uvicorn's redirect_slashes
    and many frameworks do), and says which X-Forwarded-Host/Port it got."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.base = ""

    def render(self, request: Request) -> bytes:
        request.setResponseCode(307)
        request.setHeader(b"location", (self.base + "/docs/?page=2").encode())
        request.setHeader(b"content-location", (self.base + "/docs/index.json").encode())
        request.setHeader(b"link", (self.base + "/unchanged").encode())
        forwarded = [request.getHeader(b"x-forwarded-host"), request.getHeader(b"x-forwarded-port")]
        return b" ".join(value or b"-" for value in forwarded)


class LocationRewriteTests(TestCase):
    def setUp(self) -> None:
        self.backend = Redirecting()
        self.backend.base = listen(self, self.backend)
        self.http = http_client(self)

    async def test_rewritten_to_the_url_the_client_used(self) -> None:
        """Without a public URL, Location and Content-Location that point at the backend
        point at the Host the client asked for; the backend is told it in X-Forwarded-*."""
        url, _ = start_worker(self, self.backend.base)
        port = url.rsplit(":", 1)[1]
        response = await self.http.get(url + "/docs", allow_redirects=False)
        self.assertEqual(response.code, 307)
        self.assertEqual(
            response.headers.getRawHeaders(b"location"), [f"{url}/docs/?page=2".encode()]
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"content-location"),
            [f"{url}/docs/index.json".encode()],
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"link"), [f"{self.backend.base}/unchanged".encode()]
        )
        self.assertEqual(await response.content(), f"127.0.0.1:{port} {port}".encode())

    async def test_rewritten_to_the_public_url(self) -> None:
        """A worker that knows its public URL (PUBLIC_IPADDR, VAST_TCP_PORT_<port>) puts it."""
        worker = await start_signed_worker(self, self.backend.base)
        response = await self.http.get(
            worker.url + "/docs?" + query(worker.auth()), allow_redirects=False
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"location"),
            [worker.public_url.encode() + b"/docs/?page=2"],
        )
