# -*- test-case-name: tests.test_lifecycle -*-
"""
The worker's life: wait for the backend to become healthy (and, with MODEL_LOG, for its load
line), run the benchmark (or read its cached result), when secured wait for the autoscaler's
public key, mark the worker loaded, then keep health-checking the backend. Every failure, and
every MODEL_LOG error line at once, ends up in ``WorkerState.error_msg`` (which the reporter
sends to the autoscaler) and in the log; requests are refused with 503 until the worker is
loaded, and while it drains. The phase, its elapsed time and the last probe's answer are in
``WorkerState`` for the 503 detail, /readyz and systemd's STATUS=.
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
from vast_vespa.deadline import within
from vast_vespa.outcome import describe_failure
from vast_vespa.settings import Settings
from vast_vespa.worker.autoscaler import PublicKeyStore
from vast_vespa.worker.modellog import ModelLog
from vast_vespa.worker.resource import Forward, Rejection, RequestGate
from vast_vespa.worker.state import Phase, WorkerState

PROGRESS_EVERY = 30.0  # seconds between "still waiting for the backend" lines
LOADING_RETRY_AFTER = b"10"  # Retry-After of the 503 "loading" answer
DRAINING_RETRY_AFTER = b"1"  # another worker can take the request at once
# Seconds a secured worker, otherwise ready, waits for the autoscaler's public key before it
# reports the key's absence as an error (the official worker's wait): one more fetch at the
# longest backoff, so a short outage at boot does not mark it errored.
KEY_GRACE = 60.0

log = Logger()


class StartupError(Exception):
    """The worker cannot become loaded; the message says why, for the user and the autoscaler."""


@dataclass(frozen=True)
class ProbeResult:
    healthy: bool
    detail: str  # "HTTP 200", "HTTP 503", "no answer within 10 s", "Connection refused..."
    code: int | None = None  # the HTTP status, if there was an answer


class HealthProbe:
    """One GET of the health endpoint, bounded by a timeout; never fails (says what happened)."""

    def __init__(self, get: Callable[[], Deferred[Any]], clock: IReactorTime, timeout: float):
        self._get = get
        self._clock = clock
        self._timeout = timeout

    def __call__(self) -> Deferred[ProbeResult]:
        probe = within(self._get(), self._timeout, self._clock)
        return probe.addCallbacks(self._answered, self._failed)

    def _answered(self, response: Any) -> ProbeResult:
        return ProbeResult(response.code == 200, f"HTTP {response.code}", response.code)

    def _failed(self, failure: Failure) -> ProbeResult:
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
        state.last_probe = result.detail
        if result.healthy:
            if state.clear_error(self._error):
                log.info(
                    "backend healthy again after {count} failed health checks; error cleared",
                    count=self._failed,
                )
                state.error_msg = ""
            self._failed, self._error = 0, ""
            return
        self._failed += 1
        if self._failed > self._failures:
            log.warn(
                "health check failed again ({count} in a row): {detail}",
                count=self._failed,
                detail=result.detail,
            )
            return
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
    The start-up chain (wait healthy -> benchmark or cache -> the autoscaler's key, when
    secured -> loaded -> health monitor), kept as one Deferred: errors are logged and reported
    through ``state.error_msg``; stopping the service cancels it.
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
        model_log: Callable[[Callable[[str], None]], ModelLog] | None = None,
        progress: Callable[[str], None] = lambda text: None,
        keys: PublicKeyStore | None = None,
    ) -> None:
        """``model_log(on_error)``: the MODEL_LOG follower calling ``on_error(lines)``;
        ``progress(text)``: told each phase and each start-up probe (systemd's STATUS=);
        ``keys``: the autoscaler's key (secured), without which the worker is not loaded."""
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
        self._model_log = model_log(self._model_log_error) if model_log else None
        self._log_error = ""  # a MODEL_LOG error line that ended start-up
        self._progress = progress
        self._keys = keys
        self._warned_404 = False
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
        after loading do not fire it, nor does a missing public key (it can still come)."""
        if self._startup_error:
            return succeed(self._startup_error)
        waiter: Deferred[str] = Deferred()
        self._failure_waiters.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        self._state.phase_since = self._clock.seconds()
        self._run = Deferred.fromCoroutine(self._start_up())
        self._run.addErrback(self._failed)
        if self._model_log is not None:  # after _run: its first lines may end start-up
            self._model_log.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        self.monitor.stop()
        if self._model_log is not None:
            self._model_log.stop()
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
        await self._wait_until_ready(timeout)
        if self._model_log is not None:
            self._model_log.backend_ready()
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
            self._enter(Phase.BENCHMARKING)
            max_perf = await self._run_benchmark(self._benchmark)
        if self._keys is not None and self._keys.key is None:
            await self._wait_for_key(self._keys)
        self._state.mark_loaded(self._clock.seconds(), max_perf)
        self._progress(self._state.progress(self._clock.seconds()))
        log.info(
            "worker loaded in {loadtime:.1f} s (max_perf {max_perf:g})",
            loadtime=self._state.loadtime,
            max_perf=max_perf,
        )
        self.monitor.start()
        waiters, self._waiters = self._waiters, []
        _fire(waiters, self._state)

    async def _wait_until_ready(self, timeout: float) -> None:
        """Probe the backend until it answers 200 and MODEL_LOG (if it has load lines) has
        shown one; a load line wakes the wait at once."""
        settings = self._settings
        url = settings.backend_url + settings.health_path
        model_log = self._model_log if self._model_log and self._model_log.waits_for_load else None
        started = self._clock.seconds()
        report_at = started + PROGRESS_EVERY
        log.info(
            "waiting for {url} to answer 200{also} (up to {timeout:g} s)",
            url=url,
            also=f" and for a load line in {model_log.path}" if model_log else "",
            timeout=timeout,
        )
        while True:
            self._enter_waiting()
            probed = self._clock.seconds()
            result = await self._probe()
            self._check_cancelled()
            self._record_probe(url, result)
            now = self._clock.seconds()
            if result.healthy and not (model_log and model_log.waits_for_load):
                log.info("backend ready after {elapsed:.1f} s", elapsed=now - started)
                return
            if now - started >= timeout:
                raise StartupError(self._not_ready(url, timeout, result))
            if now >= report_at:
                log.info(
                    "still waiting for {url}: {elapsed:.0f} s elapsed, last probe: {detail}{log}",
                    url=url,
                    elapsed=now - started,
                    detail=result.detail,
                    log=f"; {model_log.status()}" if model_log else "",
                )
                report_at = now + PROGRESS_EVERY
            pause = probed + settings.healthcheck_retry_interval - now
            pause = max(0.0, min(pause, started + timeout - now))
            if model_log and model_log.waits_for_load:
                await _first(model_log.when_loaded(), pause, self._clock)
            else:
                await deferLater(self._clock, pause)
            self._check_cancelled()

    async def _wait_for_key(self, keys: PublicKeyStore) -> None:
        """Without the key every signed request would be refused, so the worker is not loaded
        until it comes. After KEY_GRACE s its absence is an error, reported while the store
        keeps retrying, and cleared when the key comes."""
        self._enter(Phase.WAITING_FOR_KEY, keys.problem)
        await _first(keys.when_key(), KEY_GRACE, self._clock)
        if keys.key is not None:
            return
        error = f"cannot fetch the autoscaler public key: {keys.problem}"
        log.error("{error}; the worker loads once it is fetched", error=error)
        self._state.mark_errored(error)
        self._enter(Phase.WAITING_FOR_KEY, keys.problem)
        self._progress(error)
        waited = self._clock.seconds()
        await keys.when_key()
        if self._state.clear_error(error):
            log.info(
                "autoscaler public key fetched {elapsed:.0f} s after the error; error cleared",
                elapsed=self._clock.seconds() - waited,
            )

    def _enter_waiting(self) -> None:
        model_log = self._model_log
        if model_log and model_log.waits_for_load:
            self._enter(Phase.WAITING_FOR_LOG, model_log.status())
        else:
            self._enter(Phase.WAITING_FOR_HEALTH)

    def _enter(self, phase: Phase, waiting_for: str = "") -> None:
        now = self._clock.seconds()
        if self._state.enter(phase, now, waiting_for):
            log.info("phase: {phase}", phase=phase.value)
            self._progress(self._state.progress(now))

    def _record_probe(self, url: str, result: ProbeResult) -> None:
        state = self._state
        state.backend_healthy = result.healthy
        state.last_probe = result.detail
        self._progress(state.progress(self._clock.seconds()))
        if result.code == 404 and not self._warned_404:
            self._warned_404 = True
            log.warn(
                "{url} answered 404: the backend has no such path. Set --healthcheck-endpoint "
                "(HEALTHCHECK_ENDPOINT) to a path that answers 200 once the model is ready, "
                "or --backend to a kind Vespa knows (ollama, comfyui, llama-cpp-python, ...)",
                url=url,
            )

    def _not_ready(self, url: str, timeout: float, result: ProbeResult) -> str:
        if not result.healthy:
            text = f"backend not healthy after {timeout:g} s: {url} (last probe: {result.detail})"
            if self._model_log is not None and self._model_log.waits_for_load:
                text += f"; {self._model_log.status()}"
            return text
        assert self._model_log is not None
        return (
            f"no load line in the model log after {timeout:g} s: {self._model_log.status()} "
            f"(expected a line containing one of: "
            + ", ".join(repr(text) for text in self._model_log.lines.load)
            + f"; {url} answers 200)"
        )

    def _model_log_error(self, lines: str) -> None:
        """MODEL_LOG showed error lines: start-up ends at once (no benchmark, or the running
        one cancelled); once loaded, the worker reports the error."""
        message = f"model log {self._settings.model_log}: {lines}"
        assert self._run is not None  # the log is followed from startService on
        if self._log_error:
            return  # start-up is already ending on an earlier line
        if self._run.called:  # loaded, or start-up already failed
            if not self._stopping and not self._startup_error:
                log.error("{message}", message=message)
                self._state.mark_errored(message)
                self._state.enter(Phase.ERRORED, self._clock.seconds())
                self._progress(message)
            return
        self._log_error = message
        self._run.cancel()

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
        except (BenchmarkError, StartupError, CancelledError):
            raise
        except Exception as e:
            self._check_cancelled()
            # The user's code failed: its traceback helps them fix it.
            log.failure("the benchmark {spec} raised", spec=spec)
            raise StartupError(f"benchmark {spec} failed: {type(e).__name__}: {e}") from None
        self._check_cancelled()
        log.info(
            "benchmark result: {max_perf:g} workload units/s in {elapsed:.1f} s",
            max_perf=max_perf,
            elapsed=self._clock.seconds() - started,
        )
        self._cache.write(max_perf)
        return max_perf

    def _check_cancelled(self) -> None:
        """Raise CancelledError if start-up was cancelled (the worker stopping, or a MODEL_LOG
        error line) while it waited for something that, cancelled, still fired with a result:
        a health probe says "request cancelled", a benchmark may fail in its own way."""
        if self._stopping or self._log_error:
            raise CancelledError()

    def _failed(self, failure: Failure) -> None:
        if self._stopping:
            return  # stopped while starting up: nothing to report
        if self._log_error:
            why = self._log_error
        elif failure.check(StartupError, BenchmarkError):
            why = failure.getErrorMessage()
        else:
            log.failure("worker start-up failed", failure)
            why = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        message = f"worker failed to start: {why}"
        log.error("{message}", message=message)
        self._state.mark_errored(message)
        self._startup_error = message
        self._state.enter(Phase.ERRORED, self._clock.seconds())
        waiters, self._failure_waiters = self._failure_waiters, []
        _fire(waiters, message)


def _fire(waiters: list[Deferred[Any]], value: object) -> None:
    for waiter in waiters:
        waiter.callback(value)


def _first(wake: Deferred[None], seconds: float, clock: IReactorTime) -> Deferred[None]:
    """Fires when ``wake`` does or after ``seconds``, whichever comes first."""

    def waited_enough(failure: Failure) -> None:
        failure.trap(TimeoutError)

    return wake.addTimeout(seconds, clock).addErrback(waited_enough)


def _timed_out(spec: str, result: object, timeout: float) -> None:
    """BENCHMARK_TIMEOUT passed: whatever the cancelled benchmark ended with, this is why."""
    raise StartupError(
        f"benchmark {spec} did not finish within BENCHMARK_TIMEOUT={timeout:g} s; it was cancelled"
    )


class ReadinessGate:
    """Wraps the request gate: 503 before the worker is loaded (saying where start-up
    stands, or why it failed) and while it drains."""

    def __init__(self, inner: RequestGate, state: WorkerState, clock: IReactorTime) -> None:
        self._inner = inner
        self._state = state
        self._clock = clock

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
            if state.phase is Phase.ERRORED:
                raise Rejection(503, "failed to start", state.error_msg)
            raise Rejection(
                503,
                "loading",
                f"the worker is not ready yet: {state.progress(self._clock.seconds())}; "
                "retry later",
                {b"retry-after": LOADING_RETRY_AFTER},
            )
        return self._inner.admit(request)


def build_lifecycle(
    settings: Settings,
    reactor: Any,
    state: WorkerState,
    fast_path: bool,
    progress: Callable[[str], None] = lambda text: None,
    keys: PublicKeyStore | None = None,
) -> Lifecycle:
    """
    The lifecycle for ``settings``: loads the benchmark now, so that a wrong BENCHMARK stops
    start-up at once. ``fast_path``: whether the fast path runs (its session's pool);
    ``progress``, ``keys``: see :class:`Lifecycle`.

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
        lambda: session.get(settings.health_path), reactor, settings.healthcheck_timeout
    )
    model_log = None
    if settings.model_log:
        model_log = partial(ModelLog, settings.model_log, settings.model_log_lines, reactor)
    return Lifecycle(
        settings, state, reactor, probe, benchmark, session.close, model_log, progress, keys
    )
