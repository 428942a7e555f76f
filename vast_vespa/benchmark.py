# -*- test-case-name: tests.test_benchmark -*-
"""
The user's benchmark function: loaded once at start-up from ``module.path:function``, run with
a small HTTP session bound to the backend, and its result checked (a positive finite number of
workload units per second, never a made-up 1.0).
"""

from __future__ import annotations

import copy
import json as jsonlib  # `json` is a parameter name of the session's methods
import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from vast_vespa.deadline import CallsInFlight, cancellable, read_body, within
from vast_vespa.net.client import close_pool, quiet_pool
from vast_vespa.options import SettingsError, load_function

Benchmark = Callable[[str, Any], Any]

# The form Vast templates write (the official PyWorker's layout) names the shipped benchmarks
# as a top-level package; it means Vespa's own, whatever else is installed as ``benchmarks``.
_SHIPPED_ALIAS = "benchmarks."
SHIPPED = ("openai", "tgi", "comfyui")


def shipped_module(module_name: str) -> str:
    """``module_name`` with ``benchmarks.<shipped>`` read as ``vast_vespa.benchmarks.<shipped>``."""
    if module_name.startswith(_SHIPPED_ALIAS) and module_name[len(_SHIPPED_ALIAS) :] in SHIPPED:
        return "vast_vespa." + module_name
    return module_name


class BenchmarkError(Exception):
    """The benchmark ran but gave no usable result; the message is meant for the user."""


def load_benchmark(spec: str) -> Benchmark:
    """
    Import ``module.path:function``; ``benchmarks.openai`` (and the other shipped names) is an
    alias of ``vast_vespa.benchmarks.openai``.

    @raise SettingsError: naming the spec and what went wrong (missing module, attribute, ...).
    """
    function: Benchmark = load_function("BENCHMARK", spec, shipped_module)
    return function


def check_result(spec: str, value: object) -> float:
    """The benchmark's result as a float, or BenchmarkError if it is not a usable throughput."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BenchmarkError(
            f"benchmark {spec} returned {value!r}: expected a number (workload units per second)"
        )
    if not math.isfinite(value) or value <= 0:
        raise BenchmarkError(
            f"benchmark {spec} returned {value!r}: expected a positive finite number "
            "(workload units per second)"
        )
    return float(value)


def run_benchmark(
    function: Benchmark, spec: str, backend_url: str, session: Any
) -> Deferred[float]:
    """Call ``function(backend_url, session)`` (async def, Deferred or plain value) and check
    its result. Cancelling the returned Deferred (BENCHMARK_TIMEOUT, the worker stopping) also
    cancels the session's requests and refuses new ones, so a benchmark that ignores the
    cancellation cannot keep loading the backend."""
    running: Deferred[Any] = maybeDeferred(function, backend_url, session)

    def cancel(_: Deferred[float]) -> None:
        if session is not None:
            session.abandon()
        running.cancel()

    result: Deferred[float] = Deferred(cancel)
    running.addCallback(lambda value: check_result(spec, value)).chainDeferred(result)
    return result


def check_aiohttp(reactor: Any) -> None:
    """
    BENCHMARK_SESSION=aiohttp needs aiohttp and Twisted's asyncio reactor.

    @raise SettingsError: saying what to install or how to run twistd.
    """
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SettingsError(
            "BENCHMARK_SESSION=aiohttp needs aiohttp: pip install 'aiohttp>=3.9' "
            "(or '.[aiohttp]' in the Vespa checkout)"
        ) from None
    if not isinstance(reactor, AsyncioSelectorReactor):
        raise SettingsError(
            "BENCHMARK_SESSION=aiohttp needs Twisted's asyncio reactor: "
            "run twistd -r asyncio -n vespa ..."
        )


def run_aiohttp_benchmark(
    function: Benchmark, spec: str, backend_url: str, concurrency_limit: int = 0
) -> Deferred[float]:
    """Run an existing PyWorker benchmark unchanged: as an asyncio task, with a real
    ``aiohttp.ClientSession`` whose base URL is the backend (requires the asyncio reactor);
    ``concurrency_limit`` (0: aiohttp's default) caps its connections, so its requests."""
    import asyncio
    import inspect

    import aiohttp

    async def run() -> Any:
        # No total timeout, like the reference worker's session.
        timeout = aiohttp.ClientTimeout(total=None)
        connector = aiohttp.TCPConnector(limit=concurrency_limit) if concurrency_limit else None
        async with aiohttp.ClientSession(
            base_url=backend_url, timeout=timeout, connector=connector
        ) as session:
            value = function(backend_url, session)
            if isinstance(value, Deferred):
                value = value.asFuture(asyncio.get_running_loop())
            if inspect.isawaitable(value):
                value = await value
            return value

    result: Deferred[Any] = Deferred.fromFuture(asyncio.ensure_future(run()))
    return result.addCallback(lambda value: check_result(spec, value))


class SessionResponse:
    """A backend response, read in full (so a benchmark never leaves a connection hanging)."""

    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self._body = body

    @property
    def status(self) -> int:
        """The status code (aiohttp's spelling)."""
        return self.code

    def content(self) -> Deferred[bytes]:
        return succeed(self._body)

    def read(self) -> Deferred[bytes]:
        """The body (aiohttp's spelling, as ``status``: the shipped benchmarks read it so, and
        run on either session)."""
        return succeed(self._body)

    def text(self, encoding: str = "utf-8") -> Deferred[str]:
        return succeed(self._body.decode(encoding, errors="replace"))

    def json(self) -> Deferred[Any]:
        return maybeDeferred(jsonlib.loads, self._body)


class BackendSession:
    """
    A small HTTP client bound to the backend URL, handed to benchmark functions: relative
    paths, treq underneath, its own connection pool (closed by :meth:`close`). Every method
    returns a Deferred (awaitable in ``async def``) firing with a :class:`SessionResponse`
    whose body has been read; ``timeout`` (seconds) covers the whole exchange.
    """

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        *,
        fast_path: bool = False,
        concurrency_limit: int = 0,
    ) -> None:
        """``concurrency_limit`` (0: none): requests at the backend at once, as admission will
        allow once the worker serves (more wait their turn; their timeout starts when sent).
        A benchmark that sent more at once would measure a throughput the worker never has."""
        from treq.client import HTTPClient

        self.base_url = base_url.rstrip("/")
        self.concurrency_limit = concurrency_limit
        self._slots = DeferredSemaphore(concurrency_limit) if concurrency_limit > 0 else None
        self._clock: IReactorTime = reactor
        self._pool = quiet_pool(reactor, fast_path=fast_path)
        self._pool.maxPersistentPerHost = 256  # a benchmark may run many requests at once
        self._pool.cachedConnectionTimeout = 4  # before uvicorn drops idle connections (5 s)
        self._http = HTTPClient(Agent(reactor, pool=self._pool))
        self._closed = False
        self._in_flight = CallsInFlight()

    def limited(self, concurrency_limit: int) -> BackendSession:
        """A session on this one's connections (a benchmark right after the health probe
        reuses its connection) that sends at most ``concurrency_limit`` requests at once, and
        whose :meth:`abandon` leaves this one alone. Closing this one closes both."""
        view = copy.copy(self)
        view.concurrency_limit = concurrency_limit
        view._slots = DeferredSemaphore(concurrency_limit) if concurrency_limit > 0 else None
        view._closed = False
        view._in_flight = CallsInFlight()
        return view

    def url(self, path: str) -> str:
        """The backend URL of ``path`` (relative to the backend's base URL)."""
        if "://" in path:
            raise ValueError(f"expected a path relative to the backend, got {path!r}")
        return self.base_url + "/" + path.lstrip("/")

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        headers: Any = None,
        params: Any = None,
        timeout: float | None = None,
    ) -> Deferred[SessionResponse]:
        if self._closed:
            return fail(CancelledError("the worker is stopping"))
        options = {"json": json, "data": data, "headers": headers, "params": params}
        given = {name: value for name, value in options.items() if value is not None}
        return self._in_flight.add(
            Deferred.fromCoroutine(self._send(method, self.url(path), given, timeout))
        )

    async def _send(
        self, method: str, url: str, options: dict[str, Any], timeout: float | None
    ) -> SessionResponse:
        """The exchange, once a slot is free (under a concurrency limit)."""
        if self._slots is not None:
            await self._slots.acquire()
        try:
            exchange = Deferred.fromCoroutine(self._exchange(method, url, options))
            # Cancelled (the worker stopping, or the timeout), it fails with CancelledError or
            # NoAnswerError whatever stage it was at, not treq's error for that stage.
            bounded = within(exchange, timeout, self._clock) if timeout else cancellable(exchange)
            return await bounded
        finally:
            if self._slots is not None:
                self._slots.release()

    async def _exchange(self, method: str, url: str, options: dict[str, Any]) -> SessionResponse:
        response = await self._http.request(method, url, unbuffered=True, **options)
        body = await read_body(response)
        return SessionResponse(response.code, response.headers, body)

    def get(self, path: str, **options: Any) -> Deferred[SessionResponse]:
        return self.request("GET", path, **options)

    def post(self, path: str, **options: Any) -> Deferred[SessionResponse]:
        return self.request("POST", path, **options)

    def put(self, path: str, **options: Any) -> Deferred[SessionResponse]:
        return self.request("PUT", path, **options)

    def patch(self, path: str, **options: Any) -> Deferred[SessionResponse]:
        return self.request("PATCH", path, **options)

    def delete(self, path: str, **options: Any) -> Deferred[SessionResponse]:
        return self.request("DELETE", path, **options)

    def abandon(self) -> None:
        """Refuse new requests and cancel those in flight (a benchmark cut short)."""
        self._closed = True
        self._in_flight.cancel()

    def close(self) -> Deferred[None]:
        """Abandon the session and close the pool's connections (bounded: closing can hang,
        twisted#7738)."""
        self.abandon()
        return close_pool(self._pool, self._clock)
