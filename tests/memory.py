"""
A worker's request path in memory, for the tests of its decisions (which answer for which
verdict, what reaches the backend, what is counted and reported): no socket, no reactor; time
is a ``task.Clock`` the test advances, and everything that can happen by then has happened
when :meth:`MemoryWorker.advance` returns.

- a client connection is the worker's :class:`VespaSite` channel on a ``StringTransport``
  (raw HTTP/1.1 in, bytes out, parsed into an :class:`Answer`); the worker closing it is
  reported back to it, as the reactor would;
- the backend is a :class:`FakeBackend` on a :class:`MemoryNetwork` (treq's
  ``RequestTraversalAgent``: Twisted's HTTP/1.1 client and server protocols, connected in
  memory), or nothing (connection refused);
- the autoscaler is a :class:`FakeAutoscaler` on the same network, reached by the real
  ``AutoscalerClient``; the ``MetricsReporter`` sends when told (:meth:`MemoryWorker.report`)
  or, once started, on the Clock.

The objects are the ones ``build_worker`` wires; the wiring itself is tested through real
sockets (a few end-to-end tests per feature). Timers scheduled at the same time as they are
due run without a flush in between (``Clock.advance``): step through a stream in its own
intervals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import FAST_PATH, signed_auth
from vast_vespa.net.client import BytesProducer
from vast_vespa.outcome import RelayResult
from vast_vespa.settings import VastEnvironment
from vast_vespa.signing import generate_private_key, public_pem
from vast_vespa.site import VespaSite
from vast_vespa.worker.admission import Admission
from vast_vespa.worker.autoscaler import AutoscalerClient, PublicKeyStore
from vast_vespa.worker.gate import SignedGate
from vast_vespa.worker.lifecycle import ReadinessGate
from vast_vespa.worker.metrics import WorkerMetrics
from vast_vespa.worker.reporter import MetricsReporter
from vast_vespa.worker.resource import Forward, Observer, RequestGate, WorkerResource
from vast_vespa.worker.service import WorkerService
from vast_vespa.worker.sessions import Sessions, backend_poster
from vast_vespa.worker.state import WorkerState
from vast_vespa.workload import Workload

BACKEND_URL = "http://127.0.0.1:8000"
AUTOSCALER_URL = "http://127.0.0.1:9000"
PUBLIC_URL = "http://203.0.113.7:43000"
MASTER_TOKEN = "mtok-secret-value"


@dataclass
class Answer:
    """One HTTP response as the client read it."""

    code: int
    headers: dict[bytes, list[bytes]]  # lower-case names
    body: bytes

    def header(self, name: bytes) -> list[bytes] | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)


def _unchunked(data: bytes) -> bytes | None:
    """The body of a chunked message (trailers ignored), or None while incomplete."""
    body = b""
    while True:
        line, found, data = data.partition(b"\r\n")
        if not found:
            return None
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return body if data.startswith(b"\r\n") or b"\r\n\r\n" in data else None
        if len(data) < size + 2:
            return None
        body, data = body + data[:size], data[size + 2 :]


def parse_answer(data: bytes, closed: bool, head_only: bool = False) -> Answer | None:
    """The first response in ``data``, or None while it is incomplete (a body without a
    length ends when the connection is ``closed``; ``head_only`` for an answer to HEAD)."""
    head, found, rest = data.partition(b"\r\n\r\n")
    if not found:
        return None
    status, *lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    code = int(status.split(b" ")[1])
    if head_only or code in (204, 304) or 100 <= code < 200:
        return Answer(code, headers, b"")
    if b"content-length" in headers:
        length = int(headers[b"content-length"][0])
        return Answer(code, headers, rest[:length]) if len(rest) >= length else None
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        body = _unchunked(rest)
        return None if body is None else Answer(code, headers, body)
    return Answer(code, headers, rest) if closed else None


def raw_http(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """A request as a client writes it; a body (or a POST/PUT) gets its Content-Length."""
    lines = [f"{method} {path} HTTP/1.1", "Host: worker"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


class Connection:
    """One client connection to a site, in memory: what the client sent and read."""

    def __init__(self, site: VespaSite, port: int) -> None:
        peer = IPv4Address("TCP", "127.0.0.1", port)
        self.transport = StringTransport(peerAddress=peer)
        self.channel = site.buildProtocol(peer)
        self.channel.makeConnection(self.transport)
        self.lost = False
        self.head_only = False

    def send(self, data: bytes) -> None:
        self.head_only = data.startswith(b"HEAD ")
        self.channel.dataReceived(data)

    @property
    def received(self) -> bytes:
        data: bytes = self.transport.value()
        return data

    @property
    def answer(self) -> Answer | None:
        """The response, once complete."""
        return parse_answer(self.received, self.closed, self.head_only)

    @property
    def closed(self) -> bool:
        """The connection is closing or gone (the worker closed it, or the client left)."""
        return self.transport.disconnecting or self.lost

    def leave(self) -> None:
        """The client goes away."""
        self.close()

    def close(self) -> None:
        """The connection is gone (as the reactor reports a closed socket)."""
        if not self.lost:
            self.lost = True
            self.channel.connectionLost(Failure(ConnectionDone()))


@implementer(IAgent)
class MemoryNetwork:
    """
    An IAgent for servers in memory: each base URL served (:meth:`serve`) is a resource behind
    treq's RequestTraversalAgent (HTTP/1.1 client and server protocols, connected in memory);
    a connection to any other address is refused.
    """

    def __init__(self) -> None:
        self._servers: dict[bytes, RequestTraversalAgent] = {}
        self._down: set[bytes] = set()
        self.requested: list[bytes] = []  # every URL asked for, refused or not

    def serve(self, url: str, resource: Resource) -> str:
        self._servers[URI.fromBytes(url.encode()).netloc] = RequestTraversalAgent(resource)
        return url

    def down(self, url: str) -> None:
        """Nothing listens at ``url`` any more: new connections are refused."""
        self._down.add(URI.fromBytes(url.encode()).netloc)

    def up(self, url: str) -> None:
        self._down.discard(URI.fromBytes(url.encode()).netloc)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.requested.append(uri)
        netloc = URI.fromBytes(uri).netloc
        server = self._servers.get(netloc)
        if server is None or netloc in self._down:
            return fail(ConnectionRefusedError())
        response: Deferred[IResponse] = server.request(method, uri, headers, bodyProducer)
        return response

    def flush(self) -> None:
        """Move every byte waiting between clients and servers."""
        for server in self._servers.values():
            server.flush()


def memory_http(network: MemoryNetwork) -> HTTPClient:
    """A treq client on ``network`` (its bodies written at once, not through a Cooperator)."""
    return HTTPClient(network, data_to_body_producer=BytesProducer)


class Recorder:
    """A WorkerResource observer: every RelayResult, in order; :meth:`wait` says when the
    ``count``-th arrives (for tests through real sockets, where it comes later)."""

    def __init__(self) -> None:
        self.results: list[RelayResult] = []
        self._waiting: list[tuple[int, Deferred[list[RelayResult]]]] = []

    def __call__(self, request: Any, result: RelayResult, forward: Forward | None) -> None:
        self.results.append(result)
        for entry in list(self._waiting):
            if len(self.results) >= entry[0]:
                self._waiting.remove(entry)
                entry[1].callback(self.results)

    def wait(self, count: int = 1) -> Deferred[list[RelayResult]]:
        waiter: Deferred[list[RelayResult]] = Deferred()
        if len(self.results) >= count:
            waiter.callback(self.results)
        else:
            self._waiting.append((count, waiter))
        return waiter


class MemoryWorker:
    """
    A worker's request path in memory: readiness gate, signed gate (``signed``; otherwise
    UNSECURED), admission, metrics, relay and observers, on one Clock, in front of a
    FakeBackend (``backend_down``: a refused connection) and reporting to a FakeAutoscaler
    that serves a fresh key (unless not ``serve_key``), both on a :class:`MemoryNetwork`.
    Loaded with ``max_perf`` unless not ``loaded``. ``gate`` replaces the readiness and
    signed gates; ``wrap_agent`` wraps the agent that reaches the backend. The other keywords
    are the settings of the same name.
    """

    def __init__(
        self,
        test: SynchronousTestCase,
        *,
        signed: bool = True,
        serve_key: bool = True,
        loaded: bool = True,
        max_perf: float = 100.0,
        backend_down: bool = False,
        allow_parallel: bool = True,
        max_concurrency: int = 0,
        max_wait_time: float = 0.0,
        default_cost: float | None = None,
        blocked_paths: tuple[str, ...] = (),
        verify_url: bool = False,
        replay_window: int = 0,
        workload: str = "cost",
        max_sessions: int = 0,
        request_timeout: float = 0.0,
        first_byte_timeout: float = 0.0,
        stall_timeout: float = 0.0,
        observers: tuple[Observer, ...] = (),
        gate: RequestGate | None = None,
        wrap_agent: Callable[[IAgent], IAgent] = lambda agent: agent,
    ) -> None:
        self._test = test
        self.clock = Clock()
        self.network = MemoryNetwork()
        self.backend = FakeBackend(self.clock)
        if not backend_down:
            self.network.serve(BACKEND_URL, self.backend)
        self.key = generate_private_key()
        self.autoscaler = FakeAutoscaler(public_pem(self.key) if serve_key else None, self.clock)
        self.network.serve(AUTOSCALER_URL, self.autoscaler)
        self.state = WorkerState()
        if loaded:
            self.state.mark_loaded(0.0, max_perf)
        vast = VastEnvironment(MASTER_TOKEN, (AUTOSCALER_URL,), 4242, PUBLIC_URL)
        self.metrics = WorkerMetrics(self.clock, self.state, vast, "test")
        self.sessions: Sessions | None = None
        if max_sessions:
            self.sessions = Sessions(
                self.clock,
                self.metrics,
                max_sessions,
                post_to_backend=backend_poster(wrap_agent(self.network), BACKEND_URL),
            )
            test.addCleanup(self.sessions.stopService)
        concurrency = max_concurrency if allow_parallel else 1
        self.admission = Admission(
            lambda: self.metrics.load - (self.sessions.load if self.sessions else 0.0),
            lambda: self.state.max_perf,
            max_wait_time,
            concurrency,
        )
        client = AutoscalerClient(
            memory_http(self.network),
            self.clock,
            (AUTOSCALER_URL,),
            MASTER_TOKEN,
            vast.container_id,
        )
        self.reporter = MetricsReporter(self.clock, self.metrics, client)
        self.keys: PublicKeyStore | None = None
        if signed:
            self.keys = PublicKeyStore(self.clock, client)
            self.keys.startService()
            test.addCleanup(self.keys.stopService)
        cooperator = Cooperator(scheduler=lambda work: self.clock.callLater(0, work))
        signed_gate = SignedGate(
            self.keys,
            self.admission,
            self.metrics,
            cooperator,
            default_cost=default_cost,
            blocked_paths=blocked_paths,
            public_url=PUBLIC_URL if verify_url else None,
            replay_window=replay_window,
            workload_estimator=Workload(workload),
            sessions=self.sessions,
        )
        self.recorder = Recorder()
        self.resource = WorkerResource(
            gate or ReadinessGate(signed_gate, self.state, self.clock),
            wrap_agent(self.network),
            self.clock,
            BACKEND_URL,
            request_timeout,
            (*observers, self.recorder),
            first_byte_timeout,
            stall_timeout,
        )
        self.site = VespaSite(self.resource, name="worker", fast_path=FAST_PATH, reactor=self.clock)
        if signed and gate is None:
            self.site.early_verdict = signed_gate  # as vast_vespa.worker.tap does
        self.connections: list[Connection] = []
        test.addCleanup(self._close)
        self.flush()

    @property
    def results(self) -> list[RelayResult]:
        """What the observers were told, in order."""
        return self.recorder.results

    def auth(self, shape: str = "url", **fields: Any) -> dict[str, Any]:
        """auth_data as the router hands it out for this worker, signed in ``shape``."""
        return signed_auth(self.key, PUBLIC_URL, shape, **fields)

    def flush(self) -> None:
        """Let everything that can happen now happen: bytes between the worker, the backend
        and the autoscaler, the clock's calls that are due, and the end of the client
        connections the worker closed (as the reactor reports a closed socket)."""
        for _ in range(1000):
            self.network.flush()
            closing = [c for c in self.connections if c.transport.disconnecting and not c.lost]
            for connection in closing:
                connection.close()
            now = self.clock.seconds()
            due = any(call.getTime() <= now for call in self.clock.getDelayedCalls())
            if not (closing or due):
                return
            self.clock.advance(0)
        raise AssertionError("still busy after 1000 rounds")

    def advance(self, seconds: float) -> None:
        """Time passes; then :meth:`flush`."""
        self.clock.advance(seconds)
        self.flush()

    def connect(self) -> Connection:
        """A new client connection (its own port, as X-Forwarded-For and the log see it)."""
        connection = Connection(self.site, 50000 + len(self.connections))
        self.connections.append(connection)
        return connection

    def send(self, data: bytes) -> Connection:
        """Raw bytes on a new connection; the connection, once they have been handled."""
        connection = self.connect()
        connection.send(data)
        self.flush()
        return connection

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Connection:
        return self.send(raw_http(method, path, body, headers))

    def answered(self, connection: Connection) -> Answer:
        """The connection's complete answer (the test fails if there is none yet)."""
        answer = connection.answer
        if answer is None:
            raise self._test.failureException(f"no complete answer yet: {connection.received!r}")
        return answer

    def call(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Answer:
        """A request answered at once."""
        return self.answered(self.request(method, path, body, headers))

    def get(self, path: str, headers: dict[str, str] | None = None) -> Answer:
        return self.call("GET", path, headers=headers)

    def post(self, path: str, document: Any, headers: dict[str, str] | None = None) -> Answer:
        """POST ``document`` as JSON (bytes as they are)."""
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        return self.call("POST", path, body, headers)

    def envelope(self, path: str, shape: str = "url", **fields: Any) -> Connection:
        """POST a signed envelope with an empty payload; the connection."""
        body = json.dumps({"auth_data": self.auth(shape, **fields), "payload": {}}).encode()
        return self.request("POST", path, body)

    def report(self) -> None:
        """The reporter sends a status and the pending deletes, as on drain."""
        sent = self.reporter.send_now()
        self.flush()
        self._test.successResultOf(sent)

    def service(self, drain_timeout: float = 30.0, reporter: bool = False) -> WorkerService:
        """The worker's top service around this request path, started, for drain tests: no
        listener, and no child but the sessions (with ``max_sessions``) and the reporter with
        ``reporter`` (started: it reports at once; its last send ends the drain), in
        build_worker's order."""
        pool = HTTPConnectionPool(MemoryReactorClock())
        service = WorkerService(
            self.clock, pool, self.site, self.state, self.resource.in_flight, drain_timeout
        )
        if self.sessions is not None:
            service.sessions = self.sessions
            self.sessions.setServiceParent(service)
        if reporter:
            self.reporter.setServiceParent(service)
        service.startService()
        self.flush()
        return service

    def _close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.flush()
