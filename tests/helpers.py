"""Test helpers: real servers on 127.0.0.1, clients, and raw-socket requests."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from typing import Any, NoReturn, cast

from cryptography.hazmat.primitives.asymmetric import rsa
from treq.client import HTTPClient
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IProtocolFactory,
    IPushProducer,
    IReactorSSL,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Factory, ProcessProtocol, Protocol
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import provider

from tests.fakes import FakeAutoscaler
from vast_vespa.net.client import backend_agent, backend_pool
from vast_vespa.net.listen import SendNowEndpoint
from vast_vespa.outcome import RelayResult
from vast_vespa.settings import Settings, VastEnvironment, parse_bool
from vast_vespa.signing import generate_private_key, public_pem, sign
from vast_vespa.site import VespaSite
from vast_vespa.worker.resource import Forward, WorkerResource, passthrough
from vast_vespa.worker.service import WorkerService
from vast_vespa.worker.tap import build_worker

# The whole suite runs with the fast path (the default) and on stock Twisted (FAST_PATH=false,
# tox -e stock): what the tests build follows it, and so do the workers they spawn.
FAST_PATH = parse_bool(os.environ.get("FAST_PATH", "true"))

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "vectors")  # copied from shared/vectors (throw-away key)


class TrackingFactory(WrappingFactory):
    """Remembers open server connections so a test can close them all at cleanup."""

    def __init__(self, wrapped: Factory[Any]) -> None:
        super().__init__(wrapped)
        self.gone: list[Deferred[None]] = []

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        d: Deferred[None] = Deferred()
        self.gone.append(d)
        p._vespa_gone = d

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        p._vespa_gone.callback(None)


def listen_tcp(factory: IProtocolFactory, port: int = 0) -> tcp.Port:
    """``factory`` listening on 127.0.0.1:``port`` (0: a free one), until stopped."""
    # Any protocol factory serves: Twisted's annotation (a ServerFactory of its protocol
    # interface itself) refuses every real one, a Site or a WrappingFactory alike.
    listening = reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    return cast(tcp.Port, listening)


_tracking: dict[str, TrackingFactory] = {}  # base URL -> its listener's connections


def listen(test: TestCase, factory_or_resource: Factory[Any] | Resource) -> str:
    """Serve on 127.0.0.1 (a free port) until the test ends; returns the base URL."""
    factory = (
        Site(factory_or_resource)
        if isinstance(factory_or_resource, Resource)
        else factory_or_resource
    )
    tracking = TrackingFactory(factory)
    port = listen_tcp(tracking)
    url = f"http://127.0.0.1:{port.getHost().port}"
    _tracking[url] = tracking
    test.addCleanup(_tracking.pop, url, None)

    async def close() -> None:
        await port.stopListening()
        for proto in list(tracking.protocols):
            proto.transport.abortConnection()
        await gatherResults(tracking.gone)

    test.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return url


def server_side_closed(url: str) -> Deferred[Any]:
    """Fires once every connection accepted so far by :func:`listen`'s server at ``url`` is
    closed on the server's side too (its protocol told of the loss)."""
    return gatherResults(list(_tracking[url].gone))


async def listen_sending_now(test: TestCase, site: Any) -> str:
    """Serve ``site`` on 127.0.0.1 as the worker listens (:mod:`vast_vespa.net.listen`: each
    connection's transport is the TCP connection itself, not a wrapper); the connections
    still open when the test ends are aborted. Returns the base URL."""
    built: list[Any] = []
    build = site.buildProtocol

    def recording(address: Any) -> Any:
        protocol = build(address)
        built.append(protocol)
        return protocol

    site.buildProtocol = recording
    endpoint = SendNowEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"))
    port = cast(tcp.Port, await endpoint.listen(site))

    async def close() -> None:
        await port.stopListening()
        for protocol in built:
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()
        await deferLater(reactor, 0, lambda: None)  # the aborted connections are lost

    test.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return f"http://127.0.0.1:{port.getHost().port}"


def start_worker(
    test: TestCase, backend_url: str, loaded: bool = True, **changes: Any
) -> tuple[str, WorkerService]:
    """A worker with the given settings in front of ``backend_url``; returns (url, service).
    With ``loaded`` the worker skips its start-up sequence (tests/test_lifecycle.py covers it)
    and serves at once; by default its drain at the end of the test does not wait."""
    changes = {
        "unsecured": True,
        "drain_timeout": 0.0,
        "admin_listen": "",
        "fast_path": FAST_PATH,
        **changes,
    }
    settings = dataclasses.replace(Settings(), backend_url=backend_url, listen=(), **changes)
    service = build_worker(settings, reactor)
    if loaded:
        service.removeService(service.getServiceNamed("lifecycle"))
        service.state.mark_loaded(reactor.seconds(), 0.0)
    service.startService()
    url = listen(test, service.site)
    test.addCleanup(service.stopService)
    return url, service


def observed_worker(
    test: TestCase,
    backend_url: str,
    agent: Any = None,
    request_timeout: float = 0.0,
    first_byte_timeout: float = 0.0,
    stall_timeout: float = 0.0,
) -> tuple[str, list[RelayResult]]:
    """A passthrough WorkerResource on a VespaSite whose observer records every RelayResult;
    returns (url, results). ``agent`` defaults to one with a persistent pool of its own."""
    if agent is None:
        pool = backend_pool(reactor)
        test.addCleanup(pool.closeCachedConnections)
        agent = backend_agent(reactor, pool, 5, fast_path=FAST_PATH)
    results: list[RelayResult] = []
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
    resource = WorkerResource(
        _PassthroughGate(cooperator),
        agent,
        reactor,
        backend_url,
        request_timeout=request_timeout,
        observers=(lambda request, result, forward: results.append(result),),
        first_byte_timeout=first_byte_timeout,
        stall_timeout=stall_timeout,
    )
    return listen(test, VespaSite(resource, fast_path=FAST_PATH)), results


class _PassthroughGate:
    """Every request goes through as it came: the relay alone, without the protocol."""

    def __init__(self, cooperator: Cooperator) -> None:
        self._cooperator = cooperator

    def admit(self, request: Any) -> Forward:
        return passthrough(request, self._cooperator)


def http_client(test: TestCase) -> HTTPClient:
    """A treq client whose connections are closed at the end of the test."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


class RawClient(Protocol):
    """Sends raw bytes, collects everything the server sends until it closes; ``when``
    says when what arrived is enough."""

    def __init__(self, payload: bytes, read: bool = True) -> None:
        self.payload = payload
        self.read = read
        self.chunks: list[bytes] = []
        self.count = 0  # bytes received so far
        self.made: Deferred[None] = Deferred()  # fires once connected
        self.closed: Deferred[bytes] = Deferred()
        self.got_data: Deferred[None] = Deferred()
        self._waiters: list[tuple[Any, Deferred[None]]] = []

    def when(self, predicate: Any) -> Deferred[None]:
        """Fires (on the reactor's next turn) once ``predicate()`` holds, checked as data
        arrives; fails if the connection closes first."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append((predicate, waiter))
        self._check()
        return waiter

    def _check(self) -> None:
        for entry in list(self._waiters):
            if entry[0]():
                self._waiters.remove(entry)
                reactor.callLater(0, entry[1].callback, None)

    def connectionMade(self) -> None:
        if not self.read:
            self.producer.pauseProducing()  # a client that does not read
        self.tcp.write(self.payload)
        self.made.callback(None)

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def tcp(self) -> ITCPTransport:
        """Its transport: the TCP connection (or TLS over it, which provides the same)."""
        return cast(ITCPTransport, self.transport)

    @property
    def producer(self) -> IPushProducer:
        """Its transport, as the producer of what it receives."""
        return cast(IPushProducer, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.count += len(data)
        if not self.got_data.called:
            self.got_data.callback(None)
        self._check()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        waiting, self._waiters = self._waiters, []
        for _, waiter in waiting:
            waiter.errback(AssertionError(f"closed first, after {self.received[-200:]!r}"))
        self.closed.callback(self.received)


async def raw_connect(
    url: str, client: RawClient, tls: Any = None, bind: tuple[str, int] | None = None
) -> RawClient:
    """Connect ``client`` to the server at ``url`` (http://127.0.0.1:PORT), from ``bind``
    if given; with ``tls`` (client TLS options, for https://127.0.0.1:PORT) over TLS."""
    port = int(url.rsplit(":", 1)[1])
    factory = cast(ClientFactory[RawClient], ClientFactory.forProtocol(lambda: client))
    if tls is None:
        reactor.connectTCP("127.0.0.1", port, factory, bindAddress=bind)
    else:
        ssl_reactor = cast(IReactorSSL, reactor)
        ssl_reactor.connectSSL("127.0.0.1", port, factory, tls, timeout=30, bindAddress=bind)
    await client.made
    return client


async def raw_request(url: str, payload: bytes, tls: Any = None) -> bytes:
    """Send raw bytes, return everything the server answered until it closed."""
    client = await raw_connect(url, RawClient(payload), tls)
    return await client.closed


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait, polling every 10 ms, until ``predicate()`` is true: only for what nothing in
    this process is told of (bytes in a kernel buffer, another process's state); say why
    where it is used. Anything else has a Deferred that says when (``when``/``arrived`` on
    the fakes, RawClient.when, notifyFinish, a service's stop, InFlight.idle, a Clock)."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"condition not met after {timeout} s")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


def logged(test: TestCase, text: str, count: int = 1) -> Deferred[None]:
    """Fires (on the reactor's next turn) once ``count`` log events whose format contains
    ``text`` have been emitted from now on (for what only the log tells)."""
    seen: list[dict[str, Any]] = []
    fired: Deferred[None] = Deferred()

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if text in (event.get("log_format") or "") and len(seen) < count:
            seen.append(event)
            if len(seen) == count:
                reactor.callLater(0, fired.callback, None)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return fired


def twistd_command(*args: str) -> list[str]:
    """The command line of the installed twistd, run with this interpreter."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


class ProcessWatcher(ProcessProtocol):
    """Collects a child's output; ``wait_for(regex)`` fires when a line matches it."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()
        self._waiters: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for pattern, waiter in list(self._waiters):
            match = pattern.search(self.output)
            if match:
                self._waiters.remove((pattern, waiter))
                waiter.callback(match)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        for pattern, waiter in self._waiters:
            waiter.errback(AssertionError(f"exited ({code}) before {pattern!r}:\n{self.output!r}"))
        self._waiters = []
        self.ended.callback(code or 0)

    def wait_for(self, pattern: bytes, timeout: float = 30.0) -> Deferred[re.Match[bytes]]:
        compiled = re.compile(pattern)
        match = compiled.search(self.output)
        if match:
            return succeed(match)
        waiter: Deferred[re.Match[bytes]] = Deferred()
        self._waiters.append((compiled, waiter))

        def timed_out(result: object, seconds: float) -> NoReturn:
            self._waiters.remove((compiled, waiter))
            raise AssertionError(f"no {pattern!r} within {seconds:g} s:\n{self.output!r}")

        return waiter.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


def spawn(
    test: TestCase,
    args: list[str],
    env: dict[str, str] | None = None,
    watcher: ProcessWatcher | None = None,
) -> ProcessWatcher:
    """Run a child process in a fresh directory (so the installed package is what runs); it is
    stopped with SIGTERM at the end of the test if still running. ``watcher`` defaults to a
    new :class:`ProcessWatcher`."""
    watcher = watcher or ProcessWatcher()
    workdir = test.mktemp()
    os.makedirs(workdir)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    environ.update(env or {})
    transport = reactor.spawnProcess(watcher, args[0], args, env=environ, path=workdir)

    async def stop() -> None:
        if not watcher.ended.called:
            with contextlib.suppress(ProcessExitedAlready):
                transport.signalProcess("TERM")
        await watcher.ended

    test.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    watcher.transport_ = transport  # type: ignore[attr-defined]
    return watcher


def spawn_worker(
    test: TestCase,
    backend_url: str,
    *flags: str,
    env: dict[str, str] | None = None,
    twistd: tuple[str, ...] = (),
) -> ProcessWatcher:
    """``twistd [twistd] -n vespa --backend-url URL [flags]`` on a free port of 127.0.0.1,
    unsecured and without admin listener unless ``env`` says otherwise; see :func:`worker_url`."""
    args = (*twistd, "-n", "--pidfile=", "vespa", "--backend-url", backend_url)
    listen_on = ("--listen", "tcp:0:interface=127.0.0.1")
    return spawn(
        test,
        twistd_command(*args, *listen_on, *flags),
        {"UNSECURED": "true", "ADMIN_LISTEN": "none", **(env or {})},
    )


def secured_worker_env(test: TestCase, report_addr: str) -> dict[str, str]:
    """The environment of a secured ``twistd vespa`` (see :func:`spawn_worker`) reporting to
    ``report_addr``, with a cached benchmark result: no benchmark run before it loads."""
    cache = os.path.abspath(test.mktemp())
    with open(cache, "w") as f:
        f.write("1000.0\n")
    return {
        "BENCHMARK_CACHE_FILE": cache,
        "UNSECURED": "false",
        "REPORT_ADDR": report_addr,
        "MASTER_TOKEN": "mtok-0123456789",
        "CONTAINER_ID": "4242",
    }


async def worker_url(process: ProcessWatcher) -> str:
    """The URL of a worker started by :func:`spawn_worker`, once it listens."""
    match = await process.wait_for(rb"worker starting on (\d+)")
    return f"http://127.0.0.1:{int(match.group(1))}"


@dataclasses.dataclass
class SignedWorker:
    """A secured worker, the fake autoscaler it reports to, and the key that signs for it."""

    url: str
    service: WorkerService
    autoscaler: FakeAutoscaler
    key: rsa.RSAPrivateKey
    public_url: str

    def auth(self, shape: str = "url", **fields: Any) -> dict[str, Any]:
        """auth_data as the router hands it out, signed in ``shape``."""
        return signed_auth(self.key, self.public_url, shape, **fields)


def signed_auth(
    key: rsa.RSAPrivateKey, public_url: str, shape: str, /, **fields: Any
) -> dict[str, Any]:
    """auth_data as the router hands it out for the worker at ``public_url``, signed with
    ``key`` in ``shape``; ``fields`` change the defaults (cost 10, reqnum 1, request_idx 1)."""
    auth = {
        "cost": 10.0,
        "endpoint": "my-endpoint",
        "reqnum": 1,
        "request_idx": 1,
        "url": public_url,
        **fields,
    }
    auth["signature"] = sign(key, auth, shape)
    return {**auth, "__request_id": "0f8e4b0a"}


async def start_signed_worker(
    test: TestCase,
    backend_url: str,
    serve_key: bool = True,
    serve: Any = None,
    **changes: Any,
) -> SignedWorker:
    """A secured worker whose REPORT_ADDR is a fake autoscaler serving a fresh key; loaded
    (max_perf 100) once the key is in, unless ``serve_key`` is false. ``serve(autoscaler)``
    puts the fake autoscaler on the network and returns its URL (default: :func:`listen`)."""
    key = generate_private_key()
    autoscaler = FakeAutoscaler(public_pem(key) if serve_key else None)
    public_url = "http://203.0.113.7:43000"
    report_addr = (serve or (lambda resource: listen(test, resource)))(autoscaler)
    vast = VastEnvironment("mtok-secret-value", (report_addr,), 4242, public_url)
    url, service = start_worker(test, backend_url, unsecured=False, vast=vast, **changes)
    service.state.loaded = True
    service.state.max_perf = 100.0
    if serve_key:
        keys = service.getServiceNamed("pubkey")
        if keys.key is None:
            await keys.refresh()  # joins the fetch its start began
    return SignedWorker(url, service, autoscaler, key, public_url)
