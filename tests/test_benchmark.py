"""Loading and running the user's benchmark function, and the session it is handed."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeBackend, FakeInferenceAPI
from tests.helpers import ProcessWatcher, listen, spawn_worker
from vast_vespa.benchmark import (
    BackendSession,
    BenchmarkError,
    check_aiohttp,
    check_result,
    load_benchmark,
    run_benchmark,
)
from vast_vespa.options import SettingsError
from vast_vespa.settings import Settings
from vast_vespa.worker import tap
from vast_vespa.worker.lifecycle import build_lifecycle
from vast_vespa.worker.state import WorkerState

NOT_CALLABLE = 3


class LoadTests(SynchronousTestCase):
    def test_loads_function(self) -> None:
        """module.path:function is imported and returned."""
        self.assertIs(load_benchmark("tests.test_benchmark:plain"), plain)

    def test_errors_name_the_spec(self) -> None:
        """A missing module, a missing attribute or a non-callable is a clear error naming
        the spec."""
        cases = {
            "nope.nothing:run": "No module named 'nope'",
            "tests.test_benchmark:missing": "tests.test_benchmark has no attribute 'missing'",
            "tests.test_benchmark:NOT_CALLABLE": "NOT_CALLABLE is not callable",
        }
        for spec, why in cases.items():
            with self.assertRaises(SettingsError) as caught:
                load_benchmark(spec)
            self.assertIn(f"cannot load BENCHMARK={spec!r}", str(caught.exception))
            self.assertIn(why, str(caught.exception))

    def test_module_that_raises_on_import(self) -> None:
        """A benchmark module that raises while importing says what it raised."""
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "badbench.py"), "w") as f:
            f.write("raise RuntimeError('CUDA not found')\n")
        sys.path.insert(0, directory)
        self.addCleanup(sys.path.remove, directory)
        with self.assertRaises(SettingsError) as caught:
            load_benchmark("badbench:run")
        self.assertIn("RuntimeError: CUDA not found", str(caught.exception))

    def test_shipped_alias(self) -> None:
        """``benchmarks.openai:benchmark``, as Vast templates write it, is the shipped one;
        another name under ``benchmarks.`` is imported as written."""
        from vast_vespa.benchmarks import comfyui, openai, tgi

        self.assertIs(load_benchmark("benchmarks.openai:benchmark"), openai.benchmark)
        self.assertIs(load_benchmark("benchmarks.tgi:benchmark"), tgi.benchmark)
        self.assertIs(load_benchmark("benchmarks.comfyui:benchmark"), comfyui.benchmark)
        self.assertIs(load_benchmark("vast_vespa.benchmarks.openai:benchmark"), openai.benchmark)
        with self.assertRaises(SettingsError) as caught:
            load_benchmark("benchmarks.mine:run")
        self.assertIn("No module named 'benchmarks'", str(caught.exception))

    def test_twistd_refuses_to_start(self) -> None:
        """makeService stops with one line naming a BENCHMARK that does not load."""
        options = tap.Options()
        options.parseOptions(["--benchmark", "nope.nothing:run", "--unsecured", "true"])
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options, MemoryReactorClock())
        self.assertIn("vespa: cannot load BENCHMARK='nope.nothing:run'", str(caught.exception))

    def test_aiohttp_needs_the_asyncio_reactor(self) -> None:
        """BENCHMARK_SESSION=aiohttp on another reactor says how to run twistd."""
        with self.assertRaises(SettingsError) as caught:
            check_aiohttp(MemoryReactorClock())
        self.assertIn("run twistd -r asyncio", str(caught.exception))


def plain(backend_url: str, session: Any) -> float:
    return 5


class ResultTests(SynchronousTestCase):
    def test_usable_results(self) -> None:
        """Positive finite numbers are accepted (as floats)."""
        self.assertEqual(check_result("b", 3), 3.0)
        self.assertEqual(check_result("b", 0.25), 0.25)

    def test_unusable_results(self) -> None:
        """0, negative, NaN, infinity, strings, booleans and None are errors naming the spec
        and the value."""
        for value in (0, -1.0, math.nan, math.inf, "12", True, None):
            with self.assertRaises(BenchmarkError) as caught:
                check_result("my.bench:run", value)
            self.assertIn(f"benchmark my.bench:run returned {value!r}", str(caught.exception))

    def test_every_kind_of_function(self) -> None:
        """Plain, Deferred-returning and async def benchmarks all run; the result is checked."""

        async def coroutine(url: str, session: Any) -> float:
            return await succeed(2.5)

        self.assertEqual(self.successResultOf(run_benchmark(plain, "p", "u", None)), 5.0)
        self.assertEqual(
            self.successResultOf(run_benchmark(lambda u, s: succeed(7), "d", "u", None)), 7.0
        )
        self.assertEqual(self.successResultOf(run_benchmark(coroutine, "c", "u", None)), 2.5)
        failure = self.failureResultOf(run_benchmark(lambda u, s: 0.0, "z", "u", None))
        failure.trap(BenchmarkError)


SESSIONS: list[Any] = []


def record_session(url: str, session: Any) -> float:
    SESSIONS.append(session)
    return 1.0


class BenchmarkConcurrencyTests(SynchronousTestCase):
    def test_session_limited_as_admission(self) -> None:
        """The benchmark's session sends no more at once than admission will: 1 with
        ALLOW_PARALLEL=false, MAX_CONCURRENCY otherwise (0: no limit)."""
        spec = "tests.test_benchmark:record_session"
        cases: list[tuple[dict[str, Any], int]] = [
            ({"allow_parallel": False, "max_concurrency": 4}, 1),
            ({"max_concurrency": 3}, 3),
        ]
        cases.append(({}, 0))
        for changes, limit in cases:
            settings = dataclasses.replace(Settings(), benchmark=spec, **changes)
            lifecycle = build_lifecycle(settings, MemoryReactorClock(), WorkerState(), False)
            assert lifecycle._benchmark is not None
            self.successResultOf(lifecycle._benchmark())
            self.assertEqual(SESSIONS[-1].concurrency_limit, limit)
            lifecycle._close()


class SessionTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.url = listen(self, self.backend)
        self.session = BackendSession(reactor, self.url + "/")
        self.addCleanup(self.session.close)

    async def test_methods_and_options(self) -> None:
        """Every method goes to the backend URL + the relative path, with json, data,
        headers and params."""
        for method in ("get", "post", "put", "patch", "delete"):
            response = await getattr(self.session, method)("v1/x", params={"q": "1"})
            self.assertEqual(response.code, 200)
            self.assertEqual(response.status, 200)
            self.assertEqual((await response.json())["method"], method.upper())
            self.assertEqual(self.backend.seen[-1].uri, b"/v1/x?q=1")
        response = await self.session.post("/j", json={"a": 1}, headers={"X-Test": "yes"})
        seen = self.backend.seen[-1]
        self.assertEqual(seen.body, b'{"a":1}')
        self.assertEqual(seen.headers[b"x-test"], [b"yes"])
        response = await self.session.request("PUT", "/d", data=b"raw")
        self.assertEqual(self.backend.seen[-1].body, b"raw")
        self.assertIn('"method": "PUT"', await response.text())
        self.assertIn(b'"uri": "/d"', await response.content())

    async def test_status_is_not_an_exception(self) -> None:
        """Error statuses are answers, not exceptions (as in aiohttp)."""
        response = await self.session.get("/status/503")
        self.assertEqual(response.status, 503)
        self.assertEqual(await response.json(), {"status": 503})

    def test_timeout_while_connecting(self) -> None:
        """A backend that does not take the connection within the timeout: TimeoutError too
        (Twisted's own error for a cancelled connection attempt is no CancelledError)."""
        clock = MemoryReactorClock()
        session = BackendSession(clock, "http://127.0.0.1:9/")
        self.addCleanup(session.close)
        sent = session.get("/x", timeout=0.1)
        self.assertEqual(len(clock.tcpClients), 1)  # connecting, never connected
        clock.advance(0.1)
        self.failureResultOf(sent, TimeoutError)

    async def test_timeout_covers_the_whole_exchange(self) -> None:
        """A request slower than its timeout fails with TimeoutError and is cut at the
        backend."""
        with self.assertRaises(TimeoutError):
            await self.session.get("/slow?delay=5", timeout=0.1)
        await self.backend.cancelled[0]
        sse = self.session.get("/sse?n=3&interval=5", timeout=0.1)  # headers come at once
        with self.assertRaises(TimeoutError):
            await sse
        await self.backend.cancelled[1]

    async def test_cancelled_benchmark_stops_its_requests(self) -> None:
        """Cancelling a benchmark (BENCHMARK_TIMEOUT) cuts its requests at the backend and
        refuses new ones, even when the benchmark swallows the error and carries on."""
        attempts: list[str] = []

        async def stubborn(url: str, session: BackendSession) -> float:
            while True:
                try:
                    await session.get("/slow?delay=60")
                except Exception as e:
                    attempts.append(type(e).__name__)
                    if len(attempts) == 2:
                        return 1.0

        running = run_benchmark(stubborn, "s", self.url, self.session)
        await self.backend.arrived()
        running.cancel()
        await self.backend.cancelled[0]
        self.assertEqual(attempts, ["CancelledError", "CancelledError"])
        self.assertEqual(len(self.backend.cancelled), 1)
        self.assertTrue(running.called)

    async def test_concurrency_limit(self) -> None:
        """With a concurrency limit (what admission allows), requests beyond it wait their
        turn; a waiting request's timeout starts when it is sent."""
        session = BackendSession(reactor, self.url, concurrency_limit=1)
        self.addCleanup(session.close)
        first = session.get("/slow?delay=0.3")
        second = session.get("/slow?delay=0.01", timeout=0.2)
        await self.backend.arrived()
        # Proving that something did not happen takes a while: the second is still waiting.
        await deferLater(reactor, 0.05)
        self.assertEqual(len(self.backend.seen), 1)
        self.assertEqual((await first).code, 200)
        self.assertEqual((await second).code, 200)
        self.assertEqual(len(self.backend.seen), 2)

    def test_only_relative_paths(self) -> None:
        """An absolute URL is refused: the session only talks to the backend."""
        self.assertRaises(ValueError, self.session.get, "http://elsewhere/x")

    async def test_closed_session_refuses(self) -> None:
        """After close (worker stopping), requests fail at once."""
        await self.session.close()
        failed: Deferred[Any] = self.session.get("/x")
        with self.assertRaises(Exception) as caught:
            await failed
        self.assertIn("stopping", str(caught.exception))


AIOHTTP_BENCHMARK = """
import aiohttp

async def benchmark(backend_url, session):
    assert isinstance(session, aiohttp.ClientSession), type(session)
    async with session.post("/v1/echo", json={"prompt": "hi"}) as response:
        assert response.status == 200, response.status
        answer = await response.json()
    assert answer["uri"] == "/v1/echo", answer
    return 12.5
"""


class AiohttpTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            self.skipTest("aiohttp is not installed (pip install 'aiohttp>=3.9')")
        self.backend = FakeBackend(reactor)
        self.backend_url = listen(self, self.backend)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "aiobench.py"), "w") as f:
            f.write(AIOHTTP_BENCHMARK)

    def twistd(self, *twistd: str) -> Any:
        env = {
            "BENCHMARK": "aiobench:benchmark",
            "BENCHMARK_SESSION": "aiohttp",
            "PYTHONPATH": self.directory,
        }
        return spawn_worker(self, self.backend_url, env=env, twistd=twistd)

    async def test_unchanged_pyworker_benchmark(self) -> None:
        """An aiohttp PyWorker benchmark runs unchanged on the asyncio reactor, with a real
        ClientSession bound to the backend URL."""
        process = self.twistd("-r", "asyncio")
        await process.wait_for(rb"worker loaded in [\d.]+ s \(max_perf 12.5\)")
        self.assertEqual(self.backend.seen[-1].uri, b"/v1/echo")

    def shipped(self, spec: str, api: FakeInferenceAPI) -> ProcessWatcher:
        """A worker running the shipped benchmark ``spec`` with an aiohttp session in front of
        ``api``."""
        env = {
            "BENCHMARK": spec,
            "BENCHMARK_SESSION": "aiohttp",
            "BENCHMARK_ROUNDS": "2",
            "BENCHMARK_CONCURRENCY": "3",
            "HEALTHCHECK_ENDPOINT": "/v1/models",  # the fake's one GET path
        }
        return spawn_worker(self, listen(self, api), env=env, twistd=("-r", "asyncio"))

    async def test_shipped_benchmarks_read_answers_on_aiohttp(self) -> None:
        """The shipped benchmarks run on an aiohttp session too, reading answers with the
        spelling both sessions have: a refusal's body (the OpenAI benchmark fits its requests
        to the context a 400 names), a job's answer (ComfyUI)."""
        api = FakeInferenceAPI()
        api.context = 512
        openai = self.shipped("vast_vespa.benchmarks.openai:benchmark", api)
        await openai.wait_for(rb"worker loaded in [\d.]+ s")
        refused, *served = api.payloads
        self.assertEqual(refused[1]["max_tokens"], 500)
        self.assertEqual(len(served), 7)
        self.assertLess(served[-1][1]["max_tokens"], 500)
        comfy_api = FakeInferenceAPI()
        comfyui = self.shipped("vast_vespa.benchmarks.comfyui:benchmark", comfy_api)
        await comfyui.wait_for(rb"worker loaded in [\d.]+ s")
        self.assertEqual(len(comfy_api.payloads), 7)

    async def test_shipped_benchmark_refused_on_aiohttp(self) -> None:
        """A shipped benchmark whose every request is refused fails with the server's answer
        on an aiohttp session as on the built-in one."""
        api = FakeInferenceAPI()
        api.fail_status = 503
        tgi = self.shipped("vast_vespa.benchmarks.tgi:benchmark", api)
        await tgi.wait_for(rb"warm-up request failed: HTTP 503")

    async def test_wrong_reactor(self) -> None:
        """Without -r asyncio, twistd stops at once saying how to run it."""
        process = self.twistd()
        self.assertNotEqual(await process.ended, 0)
        self.assertIn(b"run twistd -r asyncio -n vespa", process.output)
