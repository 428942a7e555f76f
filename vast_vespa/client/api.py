# -*- test-case-name: tests.test_client_api -*-
"""
:class:`VastClient`: the client proxy inside a Python program.

Two ways to use it:

- **Scripts (blocking).** ``client.post("/v1/completions", json={...})``, ``get`` and
  ``request`` block until the answer's headers (and, unless ``stream=True``, its body) arrived
  and return a :class:`VastResponse`. The first call starts the reactor in a background daemon
  thread and the local proxy in it. Blocking calls may come from any number of threads at once
  (each waits on its own request; all network work happens in the reactor thread), but never
  from the reactor thread itself. A :class:`VastResponse` belongs to the thread that iterates it.
- **Twisted programs.** ``await client.start()`` (a Deferred firing with the proxy's URL, also
  in ``client.url``), then ``client.request(...)`` from the reactor thread returns a
  ``Deferred`` firing with a treq response; ``client.stop()`` closes everything. Any HTTP
  client (the OpenAI SDK, treq, curl) may also be pointed at ``client.url``.

``request`` returns a Deferred once :meth:`start` was called (Twisted-native use), unless it is
called from another thread than the running reactor's: then, and in scripts that never call
:meth:`start`, it blocks.
"""

from __future__ import annotations

import dataclasses
import json as jsonlib
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import blockingCallFromThread
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from vast_vespa.client.service import ClientService, build_client
from vast_vespa.client.settings import ClientSettings, load_client_settings
from vast_vespa.net.client import quiet_pool
from vast_vespa.net.guard import choose_fast_path

# Flow control of a streamed body read by a blocking caller: pause the connection when this
# many chunks wait in the queue, resume when the reader has caught up.
HIGH_WATER = 32
LOW_WATER = 4
_END = object()


class VastResponse:
    """A response read by a blocking caller: status, headers, and the body (streamed)."""

    def __init__(self, reactor: Any, status: int, headers: dict[str, str]) -> None:
        self._reactor = reactor
        self.status = status
        self.headers = headers  # lower-case names; repeated headers joined with ", "
        self._chunks: queue.Queue[object] = queue.Queue()
        self._producer: IPushProducer | None = None
        self._paused = False  # set and cleared under _flow (two threads)
        self._flow = threading.Lock()
        self._body: bytes | None = None
        self._consumed = False

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def iter_bytes(self) -> Iterator[bytes]:
        """The body chunk by chunk, as the worker sends it (once)."""
        if self._consumed:
            raise RuntimeError("the body was already read")
        self._consumed = True
        while True:
            item = self._chunks.get()
            if item is _END:
                return
            if isinstance(item, Failure):
                item.raiseException()
            with self._flow:
                resume = self._paused and self._chunks.qsize() < LOW_WATER
                if resume:
                    self._paused = False
            if resume:
                self._reactor.callFromThread(self._resume)
            yield cast(bytes, item)

    __iter__ = iter_bytes

    def iter_lines(self) -> Iterator[bytes]:
        """The body line by line (SSE events arrive as ``data: ...`` lines)."""
        pending = b""
        for chunk in self.iter_bytes():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            yield from (line.rstrip(b"\r") for line in lines)
        if pending:
            yield pending

    @property
    def content(self) -> bytes:
        """The whole body (read on first use)."""
        if self._body is None:
            self._body = b"".join(self.iter_bytes())
        return self._body

    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    def _resume(self) -> None:
        if self._producer is not None:
            self._producer.resumeProducing()

    # Called in the reactor thread by _Feed.
    def _put(self, item: object) -> None:
        # Under the lock with the reader's check: else the reader could empty the queue
        # between this size check and the pause, and wait for ever on a paused connection.
        with self._flow:
            self._chunks.put(item)
            pause = (
                not self._paused
                and self._producer is not None
                and self._chunks.qsize() > HIGH_WATER
            )
            if pause:
                self._paused = True
        if pause:
            assert self._producer is not None
            self._producer.pauseProducing()


class _Feed(Protocol):
    """Moves a response body from the reactor thread into a :class:`VastResponse` queue."""

    def __init__(self, response: VastResponse) -> None:
        self._response = response

    def connectionMade(self) -> None:
        self._response._producer = cast(IPushProducer, self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._response._put(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._response._producer = None
        if reason.check(ResponseDone, PotentialDataLoss):
            self._response._put(_END)
        else:
            self._response._put(reason)


class VastClient:
    """A local proxy to one endpoint, with blocking and Twisted-native calls (see module doc)."""

    def __init__(
        self,
        endpoint_name: str | None = None,
        api_key: str | None = None,
        *,
        reactor: Any = None,
        listen: str = "tcp:0:interface=127.0.0.1",
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        """
        ``endpoint_name``/``api_key`` default to VAST_ENDPOINT/VAST_API_KEY (or the key looked
        up with an account key); ``options`` are any other client settings by field name
        (``autoscaler_url="http://..."``, ``instance="alpha"``, ``cold_start_timeout=60`` ...).
        """
        flags = {"endpoint": endpoint_name, "api_key": api_key}
        settings = load_client_settings(flags, environ)
        self.settings: ClientSettings = dataclasses.replace(settings, listen=(), **options)
        self._listen = listen
        self._reactor = reactor
        self._service: ClientService | None = None
        self._port: IListeningPort | None = None
        self._pool: HTTPConnectionPool | None = None
        self._http: HTTPClient | None = None
        self._lock = threading.Lock()
        self._native = False  # start() was called: a Twisted program
        self.url = ""

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # Twisted-native side

    def start(self) -> Deferred[str]:
        """Start the proxy in the reactor (Twisted-native use); fires with its URL."""
        self._native = True
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> str:
        if self._service is not None:
            return self.url
        reactor = self.reactor
        service = build_client(self.settings, reactor)
        service.startService()
        self._service = service
        self._port = await serverFromString(reactor, self._listen).listen(service.site)
        host = cast(IPv4Address, self._port.getHost())
        self.url = f"http://{host.host}:{host.port}"
        self._pool = quiet_pool(
            reactor, fast_path=choose_fast_path(self.settings.fast_path, reactor)
        )
        self._http = HTTPClient(Agent(reactor, pool=self._pool))
        return self.url

    def stop(self) -> Deferred[None]:
        """Stop listening, close connections; fires when done."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        port, service, pool = self._port, self._service, self._pool
        self._port = self._service = self._pool = self._http = None
        self.url = ""
        if port is not None:
            await maybeDeferred(port.stopListening)
        if service is not None:
            await service.stopService()
        if pool is not None:
            await pool.closeCachedConnections()

    def request_deferred(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Any = None,
        cost: float | None = None,
    ) -> Deferred[Any]:
        """Send a request through the proxy (reactor thread); fires with a treq response whose
        body has not been read yet (``treq.content``, ``.json()``, or ``deliverBody``)."""
        if self._http is None:
            raise RuntimeError("VastClient.start() first")
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        if cost is not None:
            sent.setRawHeaders("X-Serverless-Cost", [repr(float(cost))])
        return self._http.request(
            method.upper(),
            self.url + path,
            json=json,
            data=data,
            headers=sent,
            params=params,
            allow_redirects=False,
            unbuffered=True,
        )

    # Blocking side

    def request(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> Any:
        """
        After :meth:`start`, in the reactor thread: :meth:`request_deferred`. Otherwise block
        and return a :class:`VastResponse` (its body already read unless ``stream=True``).
        """
        if self._native and self._in_reactor_thread():
            return self.request_deferred(method, path, **kwargs)
        self._ensure_running()
        response: VastResponse = blockingCallFromThread(
            self.reactor,
            lambda: Deferred.fromCoroutine(self._blocking_request(method, path, kwargs)),  # type: ignore[arg-type]
        )
        if not stream:
            _ = response.content
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def close(self) -> None:
        """Stop the proxy (blocking). The reactor thread keeps running: Twisted's reactor
        cannot be restarted, so a later call on a new client re-uses it."""
        if self._service is not None and self.reactor.running and not threadable.isInIOThread():
            blockingCallFromThread(self.reactor, self.stop)  # type: ignore[arg-type]

    def __enter__(self) -> VastClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _blocking_request(
        self, method: str, path: str, kwargs: dict[str, Any]
    ) -> VastResponse:
        await self._start()
        response = await self.request_deferred(method, path, **kwargs)
        headers = {
            name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in response.headers.getAllRawHeaders()
        }
        result = VastResponse(self.reactor, response.code, headers)
        response.deliverBody(_Feed(result))
        return result

    def _in_reactor_thread(self) -> bool:
        """True in the reactor's thread, or anywhere before the reactor runs (set-up code)."""
        return not self.reactor.running or threadable.isInIOThread()

    def _ensure_running(self) -> None:
        """Run the reactor in a daemon thread unless it runs already (once per process)."""
        reactor = self.reactor
        with self._lock:
            if reactor.running:
                return
            started = threading.Event()
            failed: list[BaseException] = []

            def run() -> None:
                try:
                    reactor.run(installSignalHandlers=False)
                except BaseException as e:  # ReactorNotRestartable: it ran and stopped
                    failed.append(e)
                    started.set()

            reactor.callWhenRunning(started.set)
            thread = threading.Thread(target=run, name="vespa-reactor", daemon=True)
            thread.start()
            started.wait()
            if failed:
                raise RuntimeError(
                    "VastClient needs the Twisted reactor, which was stopped and cannot run "
                    f"again in this process ({type(failed[0]).__name__})"
                ) from failed[0]
