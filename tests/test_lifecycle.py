"""
The worker's start-up sequence, health monitor and readiness gate: every timer on a
``task.Clock`` with a scripted backend, the gate's answers in memory, then end to end through
real sockets.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import http_client, listen, start_worker
from tests.memory import Answer, MemoryNetwork, MemoryWorker, memory_http
from vast_vespa.benchmark import BackendSession
from vast_vespa.outcome import Outcome
from vast_vespa.settings import Settings, VastEnvironment
from vast_vespa.signing import generate_private_key, public_pem
from vast_vespa.worker import lifecycle as lifecycle_module
from vast_vespa.worker.admin import readiness
from vast_vespa.worker.autoscaler import AutoscalerClient, PublicKeyStore
from vast_vespa.worker.lifecycle import BenchmarkCache, HealthProbe, Lifecycle, ProbeResult
from vast_vespa.worker.metrics import WorkerMetrics
from vast_vespa.worker.state import Phase, WorkerState

AUTOSCALER_URL = "http://127.0.0.1:9000"
VAST = VastEnvironment("mtok", (AUTOSCALER_URL,), 4242, "http://203.0.113.7:43000")
# The fake autoscaler refuses with the body "{}", which the error quotes.
KEY_ERROR = f"cannot fetch the autoscaler public key: {AUTOSCALER_URL}/pubkey/: HTTP 500: {{}}"


class HealthAnswer:
    def __init__(self, code: int) -> None:
        self.code = code


class ScriptedBackend:
    """The health endpoint as a script: ``code`` is the next answer (None: never answers,
    an exception: the probe fails with it); ``probes`` records when each probe was sent."""

    def __init__(self, clock: Clock, code: int | Exception | None = 503) -> None:
        self.clock = clock
        self.code = code
        self.probes: list[float] = []

    def get(self) -> Deferred[Any]:
        self.probes.append(self.clock.seconds())
        if self.code is None:
            return Deferred()
        if isinstance(self.code, Exception):
            return fail(self.code)
        return succeed(HealthAnswer(self.code))


def messages(events: Sequence[dict[str, Any]]) -> list[str]:
    return [formatEvent(event) for event in events]


class LifecycleClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = ScriptedBackend(self.clock)
        self.state = WorkerState(started=0.0)
        self.cache = os.path.abspath(self.mktemp())
        self.benchmark_runs = 0
        self.result: Any = 250.0

    def lifecycle(
        self, benchmark: bool = True, keys: PublicKeyStore | None = None, **changes: Any
    ) -> Lifecycle:
        values: dict[str, Any] = {
            "unsecured": True,
            "benchmark": "my.bench:run" if benchmark else "",
            "benchmark_cache": self.cache,
            "healthcheck_retry_interval": 5.0,
            "healthcheck_timeout": 2.0,
            "healthcheck_interval": 10.0,
            "healthcheck_failures": 3,
        }
        values.update(changes)
        settings = dataclasses.replace(Settings(), **values)
        probe = HealthProbe(self.backend.get, self.clock, settings.healthcheck_timeout)
        lifecycle = Lifecycle(
            settings,
            self.state,
            self.clock,
            probe,
            self.run_benchmark if benchmark else None,
            keys=keys,
        )
        lifecycle.startService()
        self.addCleanup(self.assertEqual, self.clock.getDelayedCalls(), [])
        self.addCleanup(lifecycle.stopService)
        return lifecycle

    def secured(self, key_code: int) -> tuple[Lifecycle, FakeAutoscaler]:
        """A secured worker's lifecycle and its key store (started after it, as in
        build_worker), fetching from an autoscaler in memory whose /pubkey/ answers
        ``key_code`` (with a key); :meth:`pass_time` lets the fetches go on."""
        self.network = MemoryNetwork()
        autoscaler = FakeAutoscaler(public_pem(generate_private_key()), self.clock)
        autoscaler.codes[b"/pubkey/"] = key_code
        url = self.network.serve(AUTOSCALER_URL, autoscaler)
        client = AutoscalerClient(memory_http(self.network), self.clock, [url], "", None)
        keys = PublicKeyStore(self.clock, client)
        lifecycle = self.lifecycle(keys=keys, unsecured=False)
        keys.startService()
        self.addCleanup(keys.stopService)
        self.network.flush()
        return lifecycle, autoscaler

    def pass_time(self, seconds: int) -> None:
        """``seconds`` pass one at a time, the autoscaler in memory answering in between."""
        for _ in range(seconds):
            self.clock.advance(1.0)
            self.network.flush()

    def run_benchmark(self) -> Deferred[float]:
        self.benchmark_runs += 1
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(self.result)

    def test_probes_until_healthy_then_benchmarks_and_loads(self) -> None:
        """The backend is probed every HEALTHCHECK_RETRY_INTERVAL until it answers 200; then
        the benchmark runs once, its result is cached and the worker is loaded."""
        lifecycle = self.lifecycle()
        loaded = lifecycle.when_loaded()
        self.clock.pump([5.0] * 3)
        self.assertEqual(self.backend.probes, [0.0, 5.0, 10.0, 15.0])
        self.assertFalse(self.state.loaded)
        self.assertEqual(self.benchmark_runs, 0)
        self.backend.code = 200
        self.clock.advance(5.0)
        self.assertTrue(self.state.loaded)
        self.assertEqual(self.state.loadtime, 20.0)
        self.assertEqual(self.state.max_perf, 250.0)
        self.assertEqual(self.benchmark_runs, 1)
        self.assertIs(self.successResultOf(loaded), self.state)
        self.assertIs(self.successResultOf(lifecycle.when_loaded()), self.state)
        with open(self.cache) as f:
            self.assertEqual(f.read(), "250.0\n")

    def test_ready_timeout(self) -> None:
        """A backend that never becomes healthy within READY_TIMEOUT is an error naming the
        URL and the last probe's answer; the worker never loads and stops probing."""
        lifecycle = self.lifecycle(ready_timeout=60.0)
        loaded = lifecycle.when_loaded()
        failed = lifecycle.when_failed()
        self.clock.pump([5.0] * 11)
        self.assertEqual(self.state.error_msg, "")
        self.assertNoResult(failed)
        self.clock.advance(5.0)
        self.assertEqual(self.successResultOf(failed), self.state.error_msg)
        self.assertIn("backend not healthy after 60 s", self.state.error_msg)
        self.assertIn("http://localhost:8000/health (last probe: HTTP 503)", self.state.error_msg)
        self.assertFalse(self.state.loaded)
        self.assertNoResult(loaded)
        self.assertEqual(len(self.backend.probes), 13)
        self.clock.advance(100.0)
        self.assertEqual(len(self.backend.probes), 13)

    def test_probe_timeout(self) -> None:
        """A probe that gets no answer counts as failed after HEALTHCHECK_TIMEOUT; the next
        probe still goes out on time."""
        self.backend.code = None
        self.lifecycle(ready_timeout=12.0)
        self.clock.pump([1.0] * 12)
        self.assertEqual(self.backend.probes, [0.0, 5.0, 10.0])
        self.assertIn("last probe: no answer within 2 s", self.state.error_msg)

    def test_unreachable_backend_probe_detail(self) -> None:
        """A refused connection is a failed probe described in the error."""
        self.backend.code = ConnectionRefusedError()
        self.lifecycle(ready_timeout=5.0)
        self.clock.advance(5.0)
        self.assertIn("last probe: Connection was refused", self.state.error_msg)

    def test_progress_logged_every_30_seconds(self) -> None:
        """While waiting, a line with the elapsed time and the last probe's answer comes about
        every 30 s, so a user watching a long model download knows the worker is alive."""
        with capturedLogs() as events:
            self.lifecycle()
            self.clock.pump([5.0] * 19)
        waiting = [line for line in messages(events) if line.startswith("still waiting")]
        self.assertEqual(
            waiting,
            [
                f"still waiting for http://localhost:8000/health: {t} s elapsed, "
                "last probe: HTTP 503"
                for t in (30, 60, 90)
            ],
        )

    def test_cached_result_skips_benchmark_and_uses_resume_timeout(self) -> None:
        """With a cached result the benchmark does not run again and the shorter
        READY_TIMEOUT_RESUME applies."""
        BenchmarkCache(self.cache).write(77.5)
        self.lifecycle(ready_timeout=1000.0, ready_timeout_resume=20.0)
        self.clock.pump([5.0] * 4)
        self.assertIn("not healthy after 20 s", self.state.error_msg)
        self.assertEqual(self.benchmark_runs, 0)

    def test_cached_result_is_max_perf(self) -> None:
        """A cached result becomes max_perf once the backend is healthy."""
        BenchmarkCache(self.cache).write(77.5)
        self.backend.code = 200
        self.lifecycle()
        self.assertEqual(self.state.max_perf, 77.5)
        self.assertEqual(self.benchmark_runs, 0)

    def test_garbage_cache_is_ignored(self) -> None:
        """A cache file holding garbage (or 0, or nan) is ignored with a warning: the benchmark
        runs again and its result replaces the garbage."""
        for garbage in ("not a number", "0", "nan", "-3", ""):
            with open(self.cache, "w") as f:
                f.write(garbage)
            with capturedLogs() as events:
                self.assertIsNone(BenchmarkCache(self.cache).read())
            self.assertIn("ignoring benchmark cache", messages(events)[0])
        self.backend.code = 200
        self.lifecycle()
        self.assertEqual(self.benchmark_runs, 1)
        self.assertEqual(BenchmarkCache(self.cache).read(), 250.0)

    def test_unwritable_cache_is_a_warning(self) -> None:
        """A cache that cannot be written is a warning; the worker loads anyway."""
        self.cache = os.path.join(self.mktemp(), "missing-dir", "cache")
        self.backend.code = 200
        with capturedLogs() as events:
            self.lifecycle()
        self.assertTrue(self.state.loaded)
        self.assertTrue(any("cannot write benchmark cache" in m for m in messages(events)))

    def test_benchmark_exception(self) -> None:
        """A benchmark that raises is reported with its exception (traceback in the log) and
        nothing is cached."""
        self.backend.code = 200
        self.result = RuntimeError("model answered garbage")
        self.lifecycle()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(
            self.state.error_msg,
            "worker failed to start: benchmark my.bench:run failed: "
            "RuntimeError: model answered garbage",
        )
        self.assertFalse(self.state.loaded)
        self.assertFalse(os.path.exists(self.cache))

    def test_benchmark_timeout(self) -> None:
        """A benchmark still running after BENCHMARK_TIMEOUT is cancelled and the worker
        reports an error naming the timeout (the error beacon), instead of "loading" forever."""
        self.backend.code = 200
        running: list[Deferred[float]] = []
        cancelled: list[bool] = []
        self.result = None

        def hanging() -> Deferred[float]:
            running.append(Deferred(lambda _: cancelled.append(True)))
            return running[-1]

        self.run_benchmark = hanging  # type: ignore[method-assign]
        lifecycle = self.lifecycle(benchmark_timeout=600.0)
        loaded = lifecycle.when_loaded()
        self.clock.advance(599.0)
        self.assertEqual((self.state.error_msg, cancelled), ("", []))
        self.clock.advance(1.0)
        self.assertEqual(cancelled, [True])
        self.assertEqual(
            self.state.error_msg,
            "worker failed to start: benchmark my.bench:run did not finish within "
            "BENCHMARK_TIMEOUT=600 s; it was cancelled",
        )
        self.assertFalse(self.state.loaded)
        self.assertNoResult(loaded)
        self.assertEqual(self.successResultOf(lifecycle.when_failed()), self.state.error_msg)
        self.assertFalse(os.path.exists(self.cache))

    def test_benchmark_timeout_zero_is_no_limit(self) -> None:
        """BENCHMARK_TIMEOUT=0 lets a slow benchmark take as long as it needs."""
        self.backend.code = 200
        slow: Deferred[float] = Deferred()
        self.run_benchmark = lambda: slow  # type: ignore[method-assign]
        self.lifecycle(benchmark_timeout=0.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10_000.0)
        slow.callback(80.0)
        self.assertTrue(self.state.loaded)
        self.assertEqual(self.state.max_perf, 80.0)

    def test_secured_without_benchmark_is_an_error(self) -> None:
        """On Vast (secured) a worker with no benchmark cannot compute max_perf: it reports an
        error at once instead of waiting for the backend."""
        self.lifecycle(benchmark=False, unsecured=False)
        self.assertIn("no benchmark configured", self.state.error_msg)
        self.assertEqual(self.backend.probes, [])

    def test_unsecured_without_benchmark_loads_with_zero(self) -> None:
        """Locally (unsecured) a worker without benchmark loads with max_perf 0 and a warning."""
        self.backend.code = 200
        with capturedLogs() as events:
            self.lifecycle(benchmark=False)
        self.assertTrue(self.state.loaded)
        self.assertEqual(self.state.max_perf, 0.0)
        self.assertTrue(any("no benchmark configured" in m for m in messages(events)))

    def test_stop_while_waiting(self) -> None:
        """Stopping while the backend loads cancels the wait quietly: no error, no timer left."""
        lifecycle = self.lifecycle()
        self.clock.advance(5.0)
        self.successResultOf(lifecycle.stopService())
        self.assertEqual(self.state.error_msg, "")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_during_a_probe(self) -> None:
        """Stopping while a probe is unanswered cancels it; nothing is reported."""
        self.backend.code = None
        lifecycle = self.lifecycle()
        self.successResultOf(lifecycle.stopService())
        self.assertEqual(self.state.error_msg, "")

    def test_health_monitor_failures_and_recovery(self) -> None:
        """Once loaded, the backend is probed every HEALTHCHECK_INTERVAL; HEALTHCHECK_FAILURES
        failures in a row set error_msg, and the next healthy probe clears it again."""
        self.backend.code = 200
        lifecycle = self.lifecycle()
        failed = lifecycle.when_failed()
        probes = len(self.backend.probes)
        self.clock.advance(10.0)
        self.assertEqual(len(self.backend.probes), probes + 1)
        self.backend.code = 500
        self.clock.pump([10.0] * 2)
        self.assertFalse(self.state.backend_healthy)
        self.assertEqual(self.state.error_msg, "")
        self.assertEqual(self.state.last_probe, "HTTP 500")  # /readyz shows the last probe
        self.backend.code = None  # hangs: a timeout is a failure too
        self.clock.pump([10.0, 2.0])
        self.assertEqual(
            self.state.error_msg,
            "backend unhealthy: 3 health checks in a row failed (last: no answer within 2 s)",
        )
        self.assertEqual(self.state.last_probe, "no answer within 2 s")
        self.assertNoResult(failed)  # not a start-up failure: systemd was told READY=1
        with capturedLogs() as events:
            self.clock.pump([8.0, 2.0])
        self.assertEqual(
            messages(events), ["health check failed again (4 in a row): no answer within 2 s"]
        )
        self.backend.code = 200
        with capturedLogs() as events:
            self.clock.advance(8.0)
        self.assertEqual(self.state.error_msg, "")
        self.assertTrue(self.state.backend_healthy)
        self.assertEqual(self.state.last_probe, "HTTP 200")
        self.assertIn("healthy again after 4 failed health checks", messages(events)[0])

    def test_key_missing_when_ready(self) -> None:
        """Secured, healthy and benchmarked, but the autoscaler's /pubkey/ answers 500: every
        request would be refused, so the worker is not loaded; after KEY_GRACE s its reports
        carry the error and /readyz says it, and the key is still fetched again and again."""
        self.backend.code = 200
        lifecycle, autoscaler = self.secured(500)
        loaded, failed = lifecycle.when_loaded(), lifecycle.when_failed()
        self.assertEqual(self.state.phase, Phase.WAITING_FOR_KEY)
        self.pass_time(59)
        self.assertEqual((self.state.loaded, self.state.error_msg), (False, ""))
        self.pass_time(1)
        self.assertEqual((self.state.loaded, self.state.error_msg), (False, KEY_ERROR))
        report = WorkerMetrics(self.clock, self.state, VAST, "test").report().body
        self.assertEqual(
            (report["loadtime"], report["max_perf"], report["error_msg"]), (0.0, 0.0, KEY_ERROR)
        )
        code, _, body = readiness(self.state, self.clock)()
        answer = json.loads(body)
        self.assertEqual((code, answer["ready"], answer["error"]), (503, False, KEY_ERROR))
        self.assertTrue(
            answer["detail"].startswith(
                f"waiting for the autoscaler public key ({AUTOSCALER_URL}/pubkey/: HTTP 500: {{}})"
            )
        )
        self.assertNoResult(loaded)
        self.assertNoResult(failed)  # not a start-up failure: the key may still come
        fetched = autoscaler.pubkey_requests
        self.pass_time(120)
        self.assertGreater(autoscaler.pubkey_requests, fetched)
        self.assertFalse(self.state.loaded)

    def test_key_fetched_later_loads_and_clears_the_error(self) -> None:
        """A key that comes after the error was reported clears it (logged) and loads the
        worker then: an autoscaler outage at boot heals without a restart."""
        self.backend.code = 200
        lifecycle, autoscaler = self.secured(500)
        self.pass_time(60)
        self.assertEqual(self.state.error_msg, KEY_ERROR)
        autoscaler.codes[b"/pubkey/"] = 200
        with capturedLogs() as events:
            self.pass_time(3)  # the fetch after 32 s of backoff: at 63 s
        self.assertEqual((self.state.loaded, self.state.error_msg), (True, ""))
        self.assertEqual((self.state.loadtime, self.state.max_perf), (63.0, 250.0))
        self.assertIs(self.successResultOf(lifecycle.when_loaded()), self.state)
        self.assertEqual(readiness(self.state, self.clock)()[0], 200)
        logged = messages(events)
        self.assertIn("autoscaler public key fetched 3 s after the error; error cleared", logged)
        self.assertIn("worker loaded in 63.0 s (max_perf 250)", logged)

    def test_key_within_the_grace_is_no_error(self) -> None:
        """A key that comes within KEY_GRACE s (a blip at boot) loads the worker then, no
        error ever reported."""
        self.backend.code = 200
        _, autoscaler = self.secured(500)
        autoscaler.codes[b"/pubkey/"] = 200
        self.pass_time(1)
        self.assertEqual((self.state.loaded, self.state.loadtime), (True, 1.0))
        self.assertEqual(self.state.error_msg, "")

    def test_key_before_the_backend_is_ready_changes_nothing(self) -> None:
        """A key in before the backend is ready: the worker loads as soon as it is healthy and
        benchmarked, as an unsecured one does, with no phase of waiting for the key."""
        with capturedLogs() as events:
            self.secured(200)
            self.clock.advance(5.0)
            self.backend.code = 200
            self.clock.advance(5.0)
        self.assertEqual((self.state.loaded, self.state.loadtime), (True, 10.0))
        self.assertEqual(self.backend.probes, [0.0, 5.0, 10.0])
        phases = [m for m in messages(events) if m.startswith("phase: ")]
        self.assertEqual(phases, ["phase: benchmarking"])
        self.assertEqual(self.state.phase, Phase.READY)

    def test_stop_while_waiting_for_the_key(self) -> None:
        """Stopping while the worker waits for the key ends the wait quietly: no error, no
        timer left."""
        self.backend.code = 200
        lifecycle, _ = self.secured(500)
        self.successResultOf(lifecycle.stopService())
        self.pass_time(60)
        self.assertEqual((self.state.loaded, self.state.error_msg), (False, ""))

    def test_health_monitor_leaves_other_errors_alone(self) -> None:
        """A healthy probe does not clear an error the health monitor did not set."""
        self.backend.code = 200
        self.lifecycle()
        self.state.mark_errored("something else")
        self.clock.advance(10.0)
        self.assertEqual(self.state.error_msg, "something else")


class ReadinessGateTests(SynchronousTestCase):
    """Which answer a request gets for the worker's state, in memory (tests/memory.py)."""

    def setUp(self) -> None:
        self.worker = MemoryWorker(self, signed=False, loaded=False)
        self.state = self.worker.state

    def assert_refused(self, error: str, retry_after: list[bytes] | None) -> Answer:
        answer = self.worker.get("/v1/models")
        self.assertEqual((answer.code, answer.json()["error"]), (503, error))
        self.assertEqual(answer.header(b"retry-after"), retry_after)
        result = self.worker.results[-1]
        self.assertEqual((result.outcome, result.status), (Outcome.REJECTED, 503))
        self.assertEqual(self.worker.backend.seen, [])
        return answer

    def test_loading(self) -> None:
        """Until the worker is loaded: 503 "loading", retry in 10 s."""
        self.assert_refused("loading", [b"10"])

    def test_failed_to_start(self) -> None:
        """A start-up that failed: 503 saying why, no Retry-After (retrying will not help)."""
        self.state.mark_errored("worker failed to start: benchmark x failed")
        self.state.enter(Phase.ERRORED, 0.0)
        answer = self.assert_refused("failed to start", None)
        self.assertEqual(answer.json()["detail"], "worker failed to start: benchmark x failed")

    def test_waiting_for_the_key(self) -> None:
        """Ready but for the autoscaler's key, even once that is reported as an error: 503
        "loading" saying so, retry later (the key may still come)."""
        self.state.enter(Phase.WAITING_FOR_KEY, 0.0, f"{AUTOSCALER_URL}/pubkey/: HTTP 500")
        self.state.mark_errored(KEY_ERROR)
        answer = self.assert_refused("loading", [b"10"])
        self.assertEqual(
            answer.json()["detail"],
            "the worker is not ready yet: waiting for the autoscaler public key "
            f"({AUTOSCALER_URL}/pubkey/: HTTP 500) for 0 s; retry later",
        )

    def test_loaded_then_draining(self) -> None:
        """Loaded: the request goes through, once; draining: 503, retry at once elsewhere."""
        self.state.mark_loaded(1.0, 10.0)
        self.assertEqual(self.worker.get("/v1/models").code, 200)
        self.assertEqual(len(self.worker.backend.seen), 1)
        self.worker.backend.seen.clear()
        self.state.draining = True
        self.assert_refused("draining", [b"1"])
        self.assertEqual(len(self.worker.results), 2)


class CachedBenchmarks:
    """Benchmarks loaded by BENCHMARK=tests.test_lifecycle:... in the end-to-end tests."""

    runs = 0

    @classmethod
    async def echo(cls, backend_url: str, session: Any) -> float:
        """Uses the session like a user would: a relative path, json in, json out."""
        cls.runs += 1
        response = await session.post("/v1/echo", json={"prompt": "hi"})
        assert response.status == 200, response.status
        answer = await response.json()
        assert answer["uri"] == "/v1/echo", answer
        return 42.0

    @staticmethod
    def broken(backend_url: str, session: Any) -> float:
        raise ValueError("no such model")


echo_benchmark = CachedBenchmarks.echo
broken_benchmark = CachedBenchmarks.broken


class LifecycleEndToEndTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.backend.health_code = 503
        self.backend_url = listen(self, self.backend)
        self.http = http_client(self)
        self.cache = os.path.abspath(self.mktemp())
        CachedBenchmarks.runs = 0

    def start(self, spec: str = "tests.test_lifecycle:echo_benchmark") -> tuple[str, Any]:
        url, service = start_worker(
            self,
            self.backend_url,
            loaded=False,
            benchmark=spec,
            benchmark_cache=self.cache,
            healthcheck_retry_interval=0.05,
        )
        return url, service

    async def test_backend_healthy_late(self) -> None:
        """Until the backend is healthy and benchmarked, requests get 503 "loading" with
        Retry-After; then the worker serves, with the benchmark's result cached."""
        url, service = self.start()
        response = await self.http.post(url + "/v1/echo", json={})
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"10"])
        self.assertEqual((await response.json())["error"], "loading")
        # Nothing but health probes reached the backend (the first may still be on its way).
        self.assertEqual({seen.uri for seen in self.backend.seen} - {b"/health"}, set())
        self.backend.health_code = 200
        await service.getServiceNamed("lifecycle").when_loaded()
        self.assertEqual(service.state.max_perf, 42.0)
        self.assertEqual(CachedBenchmarks.runs, 1)
        self.assertEqual(BenchmarkCache(self.cache).read(), 42.0)
        response = await self.http.post(url + "/v1/echo", json={})
        self.assertEqual(response.code, 200)

    async def test_cached_result_not_rerun(self) -> None:
        """A cached result is used: the benchmark does not run again."""
        BenchmarkCache(self.cache).write(7.0)
        self.backend.health_code = 200
        _, service = self.start()
        await service.getServiceNamed("lifecycle").when_loaded()
        self.assertEqual(service.state.max_perf, 7.0)
        self.assertEqual(CachedBenchmarks.runs, 0)

    async def test_garbage_cache_reruns(self) -> None:
        """A garbage cache file is ignored: the benchmark runs and rewrites it."""
        with open(self.cache, "w") as f:
            f.write("\x00\x01garbage")
        self.backend.health_code = 200
        _, service = self.start()
        await service.getServiceNamed("lifecycle").when_loaded()
        self.assertEqual(CachedBenchmarks.runs, 1)
        self.assertEqual(BenchmarkCache(self.cache).read(), 42.0)

    async def test_benchmark_raises(self) -> None:
        """A benchmark that raises leaves the worker unloaded with its error reported; requests
        get 503 saying why."""
        self.backend.health_code = 200
        url, service = self.start("tests.test_lifecycle:broken_benchmark")
        await service.getServiceNamed("lifecycle").when_failed()
        response = await self.http.get(url + "/v1/models")
        body = await response.json()
        self.assertEqual(response.code, 503)
        self.assertEqual(body["error"], "failed to start")
        expected = (
            "worker failed to start: benchmark tests.test_lifecycle:broken_benchmark failed: "
            "ValueError: no such model"
        )
        self.assertEqual(body["detail"], expected)
        self.assertEqual(service.state.error_msg, expected)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    async def test_secured_worker_waits_for_the_key(self) -> None:
        """As build_worker wires it, through sockets: a healthy secured worker whose
        autoscaler's /pubkey/ answers 500 reports the error, not loaded, and refuses requests
        as loading (KEY_GRACE 0 here)."""
        self.patch(lifecycle_module, "KEY_GRACE", 0.0)
        autoscaler = FakeAutoscaler(public_pem(generate_private_key()))
        autoscaler.codes[b"/pubkey/"] = 500
        vast = dataclasses.replace(VAST, report_addrs=(listen(self, autoscaler),))
        BenchmarkCache(self.cache).write(7.0)
        self.backend.health_code = 200
        url, _ = start_worker(
            self,
            self.backend_url,
            loaded=False,
            unsecured=False,
            vast=vast,
            benchmark_cache=self.cache,
        )
        statuses = autoscaler.statuses
        await autoscaler.when(lambda: any(s["error_msg"] or s["loadtime"] for s in statuses))
        status = next(s for s in statuses if s["error_msg"] or s["loadtime"])
        self.assertTrue(status["error_msg"].startswith("cannot fetch the autoscaler public key"))
        self.assertEqual((status["loadtime"], status["max_perf"]), (0.0, 0.0))
        response = await self.http.get(url + "/v1/models")
        self.assertEqual(response.code, 503)
        body = await response.json()
        self.assertEqual(body["error"], "loading")
        self.assertIn("waiting for the autoscaler public key", body["detail"])


class HealthProbeTests(TestCase):
    async def test_real_probe_outcomes(self) -> None:
        """Through real sockets a probe says 200, another status, or that it timed out (and
        the slow probe is cut at the backend)."""
        backend = FakeBackend(reactor)
        session = BackendSession(reactor, listen(self, backend))
        self.addCleanup(session.close)
        healthy = await HealthProbe(lambda: session.get("/health"), reactor, 1.0)()
        self.assertEqual(healthy, ProbeResult(True, "HTTP 200", 200))
        backend.health_code = 503
        sick = await HealthProbe(lambda: session.get("/health"), reactor, 1.0)()
        self.assertEqual(sick, ProbeResult(False, "HTTP 503", 503))
        slow = await HealthProbe(lambda: session.get("/slow?delay=5"), reactor, 0.1)()
        self.assertEqual(slow, ProbeResult(False, "no answer within 0.1 s"))
        await backend.cancelled[0]

    def test_timed_out_while_connecting(self) -> None:
        """A backend that does not take the connection: the probe says it timed out, as for
        one that does not answer (not Twisted's cancelled connection attempt)."""
        clock = MemoryReactorClock()
        session = BackendSession(clock, "http://127.0.0.1:9/")
        probed = HealthProbe(lambda: session.get("/health"), clock, 2.0)()
        clock.advance(2.0)
        self.assertEqual(self.successResultOf(probed), ProbeResult(False, "no answer within 2 s"))
