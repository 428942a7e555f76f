# -*- test-case-name: tests.test_lifecycle -*-
"""
The worker's life: wait for the backend to become healthy, run the benchmark (or read its
cached result), mark the worker loaded, then keep health-checking the backend. Every failure
ends up in ``WorkerState.error_msg`` (which the reporter sends to the autoscaler) and in the
log; requests are refused with 503 until the worker is loaded, and while it drains.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from vast_vespa.benchmark import (
    BackendSession,
    BenchmarkError,
    check_aiohttp,
    load_benchmark,
    run_aiohttp_benchmark,
    run_benchmark,
)
from vast_vespa.outcome import describe_failure
from vast_vespa.settings import Settings
from vast_vespa.worker.resource import Forward, Rejection, RequestGate
from vast_vespa.worker.state import WorkerState

PROGRESS_EVERY = 30.0  # seconds between "still waiting for the backend" lines
LOADING_RETRY_AFTER = b"10"  # Retry-After of the 503 "loading" answer
DRAINING_RETRY_AFTER = b"1"  # another worker can take the request at once

log = Logger()


class StartupError(Exception):
    """The worker cannot become loaded; the message says why, for the user and the autoscaler."""


@dataclass(frozen=True)
class ProbeResult:
    healthy: bool
    detail: str  # "HTTP 200", "HTTP 503", "no answer within 10 s", "Connection refused..."


class HealthProbe:
    """One GET of the health endpoint, bounded by a timeout; never fails (says what happened)."""

    def __init__(self, get: Callable[[], Deferred[Any]], clock: IReactorTime, timeout: float):
        self._get = get
        self._clock = clock
        self._timeout = timeout

    def __call__(self) -> Deferred[ProbeResult]:
        probe = self._get()
        probe.addTimeout(self._timeout, self._clock)
        return probe.addCallbacks(self._answered, self._failed)

    def _answered(self, response: Any) -> ProbeResult:
        return ProbeResult(response.code == 200, f"HTTP {response.code}")

    def _failed(self, failure: Failure) -> ProbeResult:
        if failure.check(TimeoutError):
            return ProbeResult(False, f"no answer within {self._timeout:g} s")
        return ProbeResult(False, describe_failure(failure))


class BenchmarkCache:
    """
    The benchmark result kept on disk (default ``.has_benchmark``, the reference's format: the
    number on the first line) so that a restarted worker skips the benchmark. Unreadable or
    nonsensical content is ignored with a warning; writes are atomic (write, then rename).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> float | None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read(4096)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warn("ignoring benchmark cache {path}: {why}", path=self.path, why=e)
            return None
        try:
            value = float(text.split()[0])
        except (IndexError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            log.warn(
                "ignoring benchmark cache {path}: {text!r} is not a positive number; "
                "the benchmark will run again",
                path=self.path,
                text=text[:80],
            )
            return None
        return value

    def write(self, value: float) -> None:
        partial = self.path + ".partial"
        try:
            with open(partial, "w", encoding="utf-8") as f:
                f.write(f"{value!r}\n")
            os.replace(partial, self.path)
        except OSError as e:
            log.warn("cannot write benchmark cache {path}: {why}", path=self.path, why=e)


class HealthMonitor:
    """
    Once loaded, probes the backend every ``interval`` seconds. ``failures`` failed probes in a
    row set ``state.error_msg`` (reported to the autoscaler); the next healthy probe clears it
    again (logged), so a backend that recovers by itself gets traffic again without a restart.
    ``state.backend_healthy`` follows every probe.
    """

    def __init__(
        self,
        probe: HealthProbe,
        clock: IReactorTime,
        state: WorkerState,
        interval: float,
        failures: int,
    ) -> None:
        self._probe = probe
        self._state = state
        self._interval = interval
        self._failures = failures
        self._failed = 0
        self._error = ""  # the error_msg this monitor set, if it is still set
        self._current: Deferred[ProbeResult] | None = None
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock

    def start(self) -> None:
        if self._failures:
            stopped = self._loop.start(self._interval, now=False)
            stopped.addErrback(lambda f: log.failure("the health monitor stopped", f))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._current is not None:
            self._current.cancel()

    def _check(self) -> Deferred[None]:
        self._current = self._probe()
        return self._current.addCallback(self._record)

    def _record(self, result: ProbeResult) -> None:
        self._current = None
        if not self._loop.running:
            return  # stopped while probing
        state = self._state
        state.backend_healthy = result.healthy
        if result.healthy:
            if self._error and state.error_msg == self._error:
                log.info(
                    "backend healthy again after {count} failed health checks; error cleared",
                    count=self._failed,
                )
                state.error_msg = ""
            self._failed, self._error = 0, ""
            return
        self._failed += 1
        log.warn(
            "health check {count}/{limit} failed: {detail}",
            count=self._failed,
            limit=self._failures,
            detail=result.detail,
        )
        if self._failed == self._failures:
            self._error = (
                f"backend unhealthy: {self._failed} health checks in a row failed "
                f"(last: {result.detail})"
            )
            log.error("{error}", error=self._error)
            state.mark_errored(self._error)


class Lifecycle(Service):
    """
    The start-up chain (wait healthy -> benchmark or cache -> loaded -> health monitor), kept
    as one Deferred: errors are logged and reported through ``state.error_msg``; stopping the
    service cancels it.
    """

    name = "lifecycle"

    def __init__(
        self,
        settings: Settings,
        state: WorkerState,
        clock: IReactorTime,
        probe: HealthProbe,
        benchmark: Callable[[], Deferred[float]] | None,
        close: Callable[[], Deferred[None]] = lambda: succeed(None),
    ) -> None:
        self._settings = settings
        self._state = state
        self._clock = clock
        self._probe = probe
        self._benchmark = benchmark
        self._close = close
        self._cache = BenchmarkCache(settings.benchmark_cache)
        self._run: Deferred[None] | None = None
        self._stopping = False
        self._waiters: list[Deferred[WorkerState]] = []
        self._startup_error = ""  # why start-up failed, once it has
        self._failure_waiters: list[Deferred[str]] = []
        self.monitor = HealthMonitor(
            probe,
            clock,
            state,
            settings.healthcheck_interval,
            settings.healthcheck_failures,
        )

    def when_loaded(self) -> Deferred[WorkerState]:
        """A Deferred fired with the state once the worker is loaded (e.g. for systemd's
        READY=1); it never fails, and never fires if start-up fails."""
        if self._state.loaded:
            return succeed(self._state)
        waiter: Deferred[WorkerState] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def when_failed(self) -> Deferred[str]:
        """A Deferred fired with the error message if start-up fails (e.g. for systemd's
        STATUS=); it never fails, and never fires if the worker loads. Health-monitor errors
        after loading do not fire it."""
        if self._startup_error:
            return succeed(self._startup_error)
        waiter: Deferred[str] = Deferred()
        self._failure_waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        self._run = Deferred.fromCoroutine(self._start_up())
        self._run.addErrback(self._failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        self.monitor.stop()
        if self._run is not None:
            self._run.cancel()
        return self._close()

    async def _start_up(self) -> None:
        settings = self._settings
        cached = self._cache.read()
        if cached is None and self._benchmark is None and not settings.unsecured:
            raise StartupError(
                "no benchmark configured: set BENCHMARK=module.path:function "
                "or BACKEND (one of the shipped benchmarks)"
            )
        timeout = settings.ready_timeout if cached is None else settings.ready_timeout_resume
        await self._wait_until_healthy(timeout)
        if cached is not None:
            max_perf = cached
            log.info(
                "using the cached benchmark result {max_perf} from {path} "
                "(delete it to benchmark again)",
                max_perf=max_perf,
                path=self._cache.path,
            )
        elif self._benchmark is None:
            log.warn(
                "no benchmark configured (BENCHMARK or BACKEND): max_perf is 0, so "
                "admission by queue wait is off; fine for local use only"
            )
            max_perf = 0.0
        else:
            max_perf = await self._run_benchmark(self._benchmark)
        self._state.mark_loaded(self._clock.seconds(), max_perf)
        log.info(
            "worker loaded in {loadtime:.1f} s (max_perf {max_perf:g})",
            loadtime=self._state.loadtime,
            max_perf=max_perf,
        )
        self.monitor.start()
        waiters, self._waiters = self._waiters, []
        _fire(waiters, self._state)

    async def _wait_until_healthy(self, timeout: float) -> None:
        settings = self._settings
        url = settings.backend_url + settings.healthcheck_endpoint
        started = self._clock.seconds()
        report_at = started + PROGRESS_EVERY
        log.info("waiting for {url} to answer 200 (up to {timeout:g} s)", url=url, timeout=timeout)
        while True:
            probed = self._clock.seconds()
            result = await self._probe()
            self._check_stopping()
            self._state.backend_healthy = result.healthy
            now = self._clock.seconds()
            if result.healthy:
                log.info("backend healthy after {elapsed:.1f} s", elapsed=now - started)
                return
            if now - started >= timeout:
                raise StartupError(
                    f"backend not healthy after {timeout:g} s: {url} (last probe: {result.detail})"
                )
            if now >= report_at:
                log.info(
                    "still waiting for {url}: {elapsed:.0f} s elapsed, last probe: {detail}",
                    url=url,
                    elapsed=now - started,
                    detail=result.detail,
                )
                report_at = now + PROGRESS_EVERY
            pause = probed + settings.healthcheck_retry_interval - now
            await deferLater(self._clock, max(0.0, min(pause, started + timeout - now)))
            self._check_stopping()

    async def _run_benchmark(self, benchmark: Callable[[], Deferred[float]]) -> float:
        spec = self._settings.benchmark_spec
        log.info("running the benchmark {spec}", spec=spec)
        started = self._clock.seconds()
        running = benchmark()
        limit = self._settings.benchmark_timeout
        if limit:
            running.addTimeout(limit, self._clock, onTimeoutCancel=partial(_timed_out, spec))
        try:
            max_perf = await running
        except (BenchmarkError, StartupError):
            raise
        except Exception as e:
            self._check_stopping()
            # The user's code failed: its traceback helps them fix it.
            log.failure("the benchmark {spec} raised", spec=spec)
            raise StartupError(f"benchmark {spec} failed: {type(e).__name__}: {e}") from None
        self._check_stopping()
        log.info(
            "benchmark result: {max_perf:g} workload units/s in {elapsed:.1f} s",
            max_perf=max_perf,
            elapsed=self._clock.seconds() - started,
        )
        self._cache.write(max_perf)
        return max_perf

    def _check_stopping(self) -> None:
        if self._stopping:
            raise CancelledError()

    def _failed(self, failure: Failure) -> None:
        if self._stopping:
            return  # stopped while starting up: nothing to report
        if failure.check(StartupError, BenchmarkError):
            why = failure.getErrorMessage()
        else:
            log.failure("worker start-up failed", failure)
            why = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        message = f"worker failed to start: {why}"
        log.error("{message}", message=message)
        self._state.mark_errored(message)
        self._startup_error = message
        waiters, self._failure_waiters = self._failure_waiters, []
        _fire(waiters, message)


def _fire(waiters: list[Deferred[Any]], value: object) -> None:
    for waiter in waiters:
        waiter.callback(value)


def _timed_out(spec: str, result: object, timeout: float) -> None:
    """BENCHMARK_TIMEOUT passed: whatever the cancelled benchmark ended with, this is why."""
    raise StartupError(
        f"benchmark {spec} did not finish within BENCHMARK_TIMEOUT={timeout:g} s; it was cancelled"
    )


class ReadinessGate:
    """Wraps the request gate: 503 before the worker is loaded and while it drains."""

    def __init__(self, inner: RequestGate, state: WorkerState) -> None:
        self._inner = inner
        self._state = state

    def admit(self, request: Request) -> Forward | Deferred[Forward]:
        state = self._state
        if state.draining:
            raise Rejection(
                503,
                "draining",
                "this worker is shutting down; retry on another worker",
                {b"retry-after": DRAINING_RETRY_AFTER},
            )
        if not state.loaded:
            if state.error_msg:
                raise Rejection(503, "failed to start", state.error_msg)
            raise Rejection(
                503,
                "loading",
                "the backend is still loading or being benchmarked; retry later",
                {b"retry-after": LOADING_RETRY_AFTER},
            )
        return self._inner.admit(request)


def build_lifecycle(
    settings: Settings, reactor: Any, state: WorkerState, fast_path: bool
) -> Lifecycle:
    """
    The lifecycle for ``settings``: loads the benchmark now, so that a wrong BENCHMARK stops
    start-up at once. ``fast_path``: whether the fast path runs (its session's pool).

    @raise SettingsError: the benchmark cannot be loaded, or its session cannot be provided.
    """
    session = BackendSession(reactor, settings.backend_url, fast_path=fast_path)
    # The benchmark gets no more requests at once than admission will let through.
    limit = settings.max_concurrency if settings.allow_parallel else 1
    spec = settings.benchmark_spec
    benchmark: Callable[[], Deferred[float]] | None = None
    if spec:
        function = load_benchmark(spec)
        url = settings.backend_url
        if settings.benchmark_session == "aiohttp":
            check_aiohttp(reactor)
            benchmark = partial(run_aiohttp_benchmark, function, spec, url, limit)
        else:
            benchmark = partial(run_benchmark, function, spec, url, session.limited(limit))
    probe = HealthProbe(
        lambda: session.get(settings.healthcheck_endpoint), reactor, settings.healthcheck_timeout
    )
    return Lifecycle(settings, state, reactor, probe, benchmark, session.close)
