"""
MODEL_LOG: the follower on real files written by the test (late creation, partial lines,
progress bars, rotation, truncation, a FIFO), the line rules on a ``task.Clock``, the start-up
decisions they drive (load line, error before and during the benchmark, after loading), the
phase shown to people, and one real twistd worker reporting a CUDA error to a fake autoscaler.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import http_client, listen, spawn_worker, worker_url
from tests.memory import MemoryWorker
from tests.test_lifecycle import ScriptedBackend, messages
from vast_vespa.backends import LogLines
from vast_vespa.settings import Settings
from vast_vespa.worker.admin import readiness
from vast_vespa.worker.lifecycle import HealthProbe, Lifecycle
from vast_vespa.worker.modellog import MAX_LINE, TICK_BUDGET, LogFollower, ModelLog
from vast_vespa.worker.state import Phase, WorkerState

LINES = LogLines(
    load=("Application startup complete.",),
    error=("CUDA out of memory", "Traceback (most recent call last):"),
    info=("Downloading",),
)


def write(path: str, text: str, mode: str = "a") -> None:
    with open(path, mode) as f:
        f.write(text)


class LogFollowerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())
        self.follower = LogFollower(self.path)
        self.addCleanup(self.follower.close)

    def test_late_creation_then_lines_as_they_complete(self) -> None:
        """A file that does not exist yet is waited for; then it is read from its start, a
        line once its end arrives; \\r ends a line too (progress bars)."""
        self.assertEqual(self.follower.poll(), [])
        self.assertFalse(self.follower.opened)
        write(self.path, "first\nsecond, half")
        self.assertEqual(self.follower.poll(), ["first"])
        write(self.path, " and the rest\n 10%\r 20%\r\n\n")
        self.assertEqual(self.follower.poll(), ["second, half and the rest", " 10%", " 20%"])
        self.assertEqual(self.follower.poll(), [])

    def test_rotation_by_inode(self) -> None:
        """A log moved away keeps being read (the writer may still append) until another file
        is at the path; then the old one's last unfinished line is given and the new file is
        read from its start."""
        write(self.path, "old 1\n")
        self.assertEqual(self.follower.poll(), ["old 1"])
        os.rename(self.path, self.path + ".old")
        write(self.path + ".old", "old 2\nold 3 unfinished")
        self.assertEqual(self.follower.poll(), ["old 2"])
        write(self.path, "new 1\n")
        self.assertEqual(self.follower.poll(), ["old 3 unfinished", "new 1"])
        write(self.path, "new 2\n")
        self.assertEqual(self.follower.poll(), ["new 2"])

    def test_truncation_by_size(self) -> None:
        """A file that shrank below what was read (copytruncate) is read again from its start;
        a half line from before is dropped."""
        write(self.path, "a long first line\nhalf")
        self.assertEqual(self.follower.poll(), ["a long first line"])
        write(self.path, "new\n", mode="w")
        self.assertEqual(self.follower.poll(), ["new"])

    def test_bounded_reads_per_poll(self) -> None:
        """One poll reads at most TICK_BUDGET bytes, so a huge log cannot hold up the reactor;
        the next polls go on where it stopped. Overlong lines are cut at MAX_LINE."""
        line = "x" * 99 + "\n"
        count = TICK_BUDGET // 100 + 50
        write(self.path, line * count + "y" * (MAX_LINE + 10) + "\nend\n")
        first = self.follower.poll()
        self.assertEqual(len(first), TICK_BUDGET // 100)
        rest = self.follower.poll()
        self.assertEqual(len(rest), 50 + 2)
        self.assertEqual(len(rest[50]), MAX_LINE)
        self.assertEqual(rest[-1], "end")

    def test_fifo_does_not_block(self) -> None:
        """MODEL_LOG naming a FIFO with no writer does not block: nothing to read yet."""
        os.mkfifo(self.path)
        started = time.monotonic()
        self.assertEqual(self.follower.poll(), [])
        self.assertLess(time.monotonic() - started, 1.0)

    def test_unreadable_file_is_said(self) -> None:
        """A file that cannot be opened is not an exception: ``problem`` says why."""
        if os.geteuid() == 0:
            os.mkdir(self.path)  # root reads any file; a directory cannot be read as one
        else:
            write(self.path, "secret\n")
            os.chmod(self.path, 0)
        self.follower.poll()
        self.assertTrue(self.follower.problem.startswith("cannot be read"))


class ModelLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = os.path.abspath(self.mktemp())
        self.errors: list[str] = []
        self.log = ModelLog(self.path, LINES, self.clock, self.errors.append)
        self.log.start()
        self.addCleanup(self.log.stop)

    def test_load_line(self) -> None:
        """The first load line fires when_loaded (waiters and later callers alike)."""
        waiter = self.log.when_loaded()
        self.assertEqual(self.log.status(), f"{self.path} does not exist yet")
        write(self.path, "INFO starting\n")
        self.clock.advance(0.25)
        self.assertEqual(self.log.status(), f"no load line in {self.path} yet")
        self.assertNoResult(waiter)
        write(self.path, "INFO: Application startup complete.\n")
        self.clock.advance(0.25)
        self.successResultOf(waiter)
        self.successResultOf(self.log.when_loaded())
        self.assertFalse(self.log.waits_for_load)

    def test_error_lines_with_the_exception_of_a_traceback(self) -> None:
        """Error lines of one read are reported together; after a traceback's first line, the
        exception it ends with is added, so error_msg says what went wrong."""
        write(
            self.path,
            "Traceback (most recent call last):\n"
            '  File "x.py", line 1, in <module>\n'
            "ValueError: max_model_len is larger than the model allows\n"
            "INFO: shutting down\n",
        )
        self.clock.advance(0.25)
        self.assertEqual(
            self.errors,
            [
                "Traceback (most recent call last): | "
                "ValueError: max_model_len is larger than the model allows"
            ],
        )

    def test_a_traceback_once_the_backend_is_ready_is_not_fatal(self) -> None:
        """Once the backend answers its health check, a traceback is one request's failure
        (llama-cpp-python logs one for a malformed request body): logged, not an error. The
        other error lines stay fatal."""
        self.log.backend_ready()
        write(
            self.path,
            "Exception: 1 validation error:\n"
            "Traceback (most recent call last):\n"
            '  File "errors.py", line 173, in custom_route_handler\n'
            "fastapi.exceptions.RequestValidationError: 1 validation error:\n",
        )
        self.clock.advance(0.25)
        self.assertEqual(self.errors, [])
        write(self.path, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate\n")
        self.clock.advance(0.25)
        self.assertEqual(
            self.errors, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"]
        )

    def test_a_traceback_after_a_load_line_is_not_fatal(self) -> None:
        """A traceback after a load line is one request's failure even before the backend
        answers its health check: a restarted worker reads the log from its start, and the
        request that failed before must not end the new start. Other error lines after it stay
        fatal; a later load line (the model server started again) changes nothing."""
        write(
            self.path,
            "INFO: Application startup complete.\n"
            "Traceback (most recent call last):\n"
            '  File "errors.py", line 173, in custom_route_handler\n'
            "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n"
            "INFO: Application startup complete.\n"
            "Traceback (most recent call last):\n",
        )
        with capturedLogs() as events:
            self.clock.advance(0.25)
        self.assertEqual(self.errors, [])
        self.assertTrue(self.log.loaded)
        self.assertEqual(
            [m for m in messages(events) if m.startswith("model log:")],
            ["model log: INFO: Application startup complete. (the model is loaded)"]
            + [
                "model log: Traceback (most recent call last): (after the model loaded: a "
                "request failed in the backend, not fatal)"
            ]
            * 2,
        )
        write(self.path, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate\n")
        self.clock.advance(0.25)
        self.assertEqual(
            self.errors, ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"]
        )

    def test_a_long_log_is_caught_up_without_waiting_for_ticks(self) -> None:
        """A log much longer than one tick's budget is read in bounded pieces, each at once
        after the previous one, not one per tick interval."""
        write(self.path, ("x" * 99 + "\n") * (3 * TICK_BUDGET // 100))
        write(self.path, "Application startup complete.\n")
        waiter = self.log.when_loaded()
        self.clock.advance(0.25)  # one tick: 4 budgets' worth, read one after the other
        self.successResultOf(waiter)

    def test_info_lines_rate_limited(self) -> None:
        """Info lines are copied into the worker's log at most once a second; the latest one
        waits for its turn, saying how many were not shown."""
        with capturedLogs() as events:
            write(self.path, "Downloading 1%\rDownloading 2%\rDownloading 3%\r")
            self.clock.advance(0.25)
            write(self.path, "Downloading 4%\r")
            self.clock.advance(0.25)
            self.clock.pump([0.25] * 4)
        shown = [m for m in messages(events) if m.startswith("model log:")]
        self.assertEqual(
            shown,
            [
                "model log: Downloading 3% (2 earlier info lines not shown)",
                "model log: Downloading 4%",
            ],
        )


class ModelLogLifecycleTests(SynchronousTestCase):
    """Start-up decisions with MODEL_LOG set, on a task.Clock with a scripted health endpoint."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = ScriptedBackend(self.clock, 200)
        self.state = WorkerState(started=0.0)
        self.path = os.path.abspath(self.mktemp())
        self.benchmarks: list[Deferred[float]] = []
        self.cancelled: list[bool] = []
        self.progress: list[str] = []

    def lifecycle(self, **changes: Any) -> Lifecycle:
        values: dict[str, Any] = {
            "unsecured": True,
            "benchmark": "my.bench:run",
            "benchmark_cache": os.path.abspath(self.mktemp()),
            "model_log": self.path,
            "model_load_log_msg": LINES.load,
            "model_error_log_msgs": LINES.error,
            "model_info_log_msgs": LINES.info,
            "healthcheck_retry_interval": 5.0,
            "ready_timeout": 60.0,
        }
        values.update(changes)
        settings = dataclasses.replace(Settings(), **values)
        probe = HealthProbe(self.backend.get, self.clock, 2.0)

        def model_log(on_error: Any) -> ModelLog:
            return ModelLog(self.path, settings.model_log_lines, self.clock, on_error)

        lifecycle = Lifecycle(
            settings,
            self.state,
            self.clock,
            probe,
            self.benchmark,
            model_log=model_log,
            progress=self.progress.append,
        )
        lifecycle.startService()
        self.addCleanup(lifecycle.stopService)
        return lifecycle

    def benchmark(self) -> Deferred[float]:
        self.benchmarks.append(Deferred(lambda _: self.cancelled.append(True)))
        return self.benchmarks[-1]

    def test_load_line_is_a_readiness_condition(self) -> None:
        """A healthy backend is not enough while MODEL_LOG has no load line (the phase says
        so, with the last probe's answer); the load line ends the wait at once."""
        self.lifecycle()
        self.clock.pump([0.25] * 40)
        self.assertEqual(self.benchmarks, [])
        self.assertEqual(self.state.phase, Phase.WAITING_FOR_LOG)
        self.assertEqual(
            self.state.progress(self.clock.seconds()),
            f"waiting for the model log ({self.path} does not exist yet) for 10 s, "
            "last health probe: HTTP 200",
        )
        write(self.path, "INFO: Application startup complete.\n")
        self.clock.advance(0.25)
        self.assertEqual(len(self.benchmarks), 1)
        self.assertEqual(self.state.phase, Phase.BENCHMARKING)
        self.benchmarks[0].callback(50.0)
        self.assertTrue(self.state.loaded)
        self.assertEqual(self.state.phase, Phase.READY)
        self.assertIn("benchmarking for 0 s, last health probe: HTTP 200", self.progress)

    def test_load_line_and_health_both_needed(self) -> None:
        """A load line with the backend still unhealthy: waiting for health."""
        self.backend.code = 503
        write(self.path, "Application startup complete.\n")
        self.lifecycle()
        self.clock.advance(0.25)
        self.clock.advance(5.0)
        self.assertEqual(self.state.phase, Phase.WAITING_FOR_HEALTH)
        self.assertEqual(self.benchmarks, [])
        self.backend.code = 200
        self.clock.advance(5.0)
        self.assertEqual(len(self.benchmarks), 1)

    def test_error_line_before_the_benchmark(self) -> None:
        """An error line ends start-up at once: error_msg holds the line, no benchmark runs,
        requests would get 503 "failed to start"."""
        write(self.path, "loading\n")
        lifecycle = self.lifecycle()
        failed = lifecycle.when_failed()
        write(self.path, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
        self.clock.advance(0.25)
        expected = (
            f"worker failed to start: model log {self.path}: "
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"
        )
        self.assertEqual(self.state.error_msg, expected)
        self.assertEqual(self.successResultOf(failed), expected)
        self.assertEqual(self.benchmarks, [])
        self.assertEqual(self.state.phase, Phase.ERRORED)
        self.clock.advance(100.0)
        self.assertEqual(len(self.backend.probes), 1)  # and the probing stopped

    def test_error_line_while_a_probe_is_unanswered(self) -> None:
        """An error line that comes while a health probe waits for its answer ends start-up
        at once too, not when the readiness timeout runs out; a second line changes nothing."""
        self.backend.code = None  # never answers: each probe waits for its 2 s limit
        write(self.path, "loading\n")
        lifecycle = self.lifecycle()
        failed = lifecycle.when_failed()
        self.clock.advance(0.5)  # within the first probe's wait (the log is read every 0.25 s)
        write(self.path, "RuntimeError: CUDA out of memory\n")
        self.clock.advance(0.25)
        expected = (
            f"worker failed to start: model log {self.path}: RuntimeError: CUDA out of memory"
        )
        self.assertEqual(self.successResultOf(failed), expected)
        self.assertEqual(self.state.error_msg, expected)
        self.assertEqual(self.state.phase, Phase.ERRORED)
        write(self.path, "RuntimeError: CUDA error: an illegal memory access\n")
        self.clock.pump([0.25] * 400)
        self.assertEqual(self.state.error_msg, expected)
        self.assertEqual(len(self.backend.probes), 1)  # and the probing stopped
        self.assertEqual(self.benchmarks, [])

    def test_error_line_mid_benchmark(self) -> None:
        """An error line while the benchmark runs cancels it (its requests with it) and
        reports the line; nothing is cached."""
        write(self.path, "Application startup complete.\n")
        lifecycle = self.lifecycle()
        self.clock.advance(0.25)
        self.assertEqual(len(self.benchmarks), 1)
        write(self.path, "RuntimeError: CUDA out of memory\n")
        self.clock.advance(0.25)
        self.assertEqual(self.cancelled, [True])
        self.assertIn("CUDA out of memory", self.successResultOf(lifecycle.when_failed()))
        self.assertFalse(self.state.loaded)

    def test_error_line_after_loading(self) -> None:
        """Once loaded, an error line is reported at once (error_msg, phase errored, the
        status line); the worker stays loaded: the autoscaler decides."""
        write(self.path, "Application startup complete.\n")
        lifecycle = self.lifecycle()
        self.clock.advance(0.25)
        self.benchmarks[0].callback(50.0)
        write(self.path, "CUDA out of memory\n")
        self.clock.advance(0.25)
        self.assertEqual(self.state.error_msg, f"model log {self.path}: CUDA out of memory")
        self.assertEqual(self.state.phase, Phase.ERRORED)
        self.assertEqual(self.progress[-1], self.state.error_msg)
        self.assertTrue(self.state.loaded)
        self.assertEqual(readiness(self.state, self.clock)()[0], 503)
        self.assertNoResult(lifecycle.when_failed())

    def test_a_traceback_while_serving_leaves_the_worker_serving(self) -> None:
        """A traceback while the backend loads ends start-up (above); one logged once the
        backend answers its health check (a request the server refused) does not."""
        write(self.path, "Application startup complete.\n")
        lifecycle = self.lifecycle()
        self.clock.advance(0.25)
        write(self.path, "Traceback (most recent call last):\nValueError: bad max_tokens\n")
        self.clock.advance(0.25)
        self.assertEqual(self.cancelled, [])
        self.benchmarks[0].callback(50.0)
        self.assertTrue(self.state.loaded)
        self.assertEqual(self.state.phase, Phase.READY)
        self.assertNoResult(lifecycle.when_failed())

    def test_a_traceback_after_the_load_line_before_a_restart(self) -> None:
        """A worker restarted while the model server runs reads the log from its start: a
        traceback after the load line (a request that failed before the restart) does not end
        start-up, though the first health probe has not answered yet; the worker loads."""
        self.backend.code = None  # the first probe is still on its way when the log is read
        write(
            self.path,
            "INFO: Application startup complete.\n"
            "Traceback (most recent call last):\nValueError: bad max_tokens\n",
        )
        lifecycle = self.lifecycle()
        self.clock.advance(0.25)
        self.assertNoResult(lifecycle.when_failed())
        self.assertEqual(self.state.error_msg, "")
        self.backend.code = 200
        self.clock.advance(5.0)
        self.assertEqual(len(self.benchmarks), 1)
        self.benchmarks[0].callback(50.0)
        self.assertEqual(self.state.phase, Phase.READY)

    def test_rotated_log_old_lines_do_not_count(self) -> None:
        """After a rotation the new file decides: its load line is seen."""
        write(self.path, "old run\n")
        self.lifecycle()
        self.clock.advance(0.25)
        os.rename(self.path, self.path + ".old")
        write(self.path, "Application startup complete.\n")
        self.clock.advance(0.25)
        self.assertEqual(len(self.benchmarks), 1)

    def test_truncated_log_is_read_again(self) -> None:
        """A truncated log is read again from its start."""
        write(self.path, "a long line from the previous run\n")
        self.lifecycle()
        self.clock.advance(0.25)
        write(self.path, "Application startup complete.\n", mode="w")
        self.clock.advance(0.25)
        self.assertEqual(len(self.benchmarks), 1)

    def test_no_load_line_within_ready_timeout(self) -> None:
        """No load line within READY_TIMEOUT: the error says which lines were expected."""
        write(self.path, "still loading\n")
        self.lifecycle(ready_timeout=20.0)
        self.clock.pump([0.25] * 100)
        self.assertEqual(
            self.state.error_msg,
            f"worker failed to start: no load line in the model log after 20 s: no load line "
            f"in {self.path} yet (expected a line containing one of: "
            "'Application startup complete.'; http://localhost:8000/health answers 200)",
        )

    def test_no_load_lines_configured(self) -> None:
        """MODEL_LOAD_LOG_MSG=none: the log only watches for errors; health decides."""
        self.lifecycle(model_load_log_msg=())
        self.assertEqual(len(self.benchmarks), 1)

    def test_first_404_is_logged_at_once_with_the_hint(self) -> None:
        """The first 404 from the health path says at once to set --healthcheck-endpoint."""
        self.backend.code = 404
        with capturedLogs() as events:
            self.lifecycle(model_log="")
            self.clock.pump([5.0] * 3)
        hints = [m for m in messages(events) if "--healthcheck-endpoint" in m]
        self.assertEqual(len(hints), 1)
        self.assertTrue(hints[0].startswith("http://localhost:8000/health answered 404"))


class PhaseShownTests(SynchronousTestCase):
    def test_loading_detail_and_readyz(self) -> None:
        """The 503 "loading" detail and /readyz say the phase, how long, and the last probe."""
        worker = MemoryWorker(self, signed=False, loaded=False)
        worker.state.enter(Phase.WAITING_FOR_HEALTH, worker.clock.seconds())
        worker.state.last_probe = "HTTP 404"
        worker.clock.advance(42.0)
        answer = worker.get("/v1/models")
        self.assertEqual(
            answer.json()["detail"],
            "the worker is not ready yet: waiting for health for 42 s, last health probe: "
            "HTTP 404; retry later",
        )
        code, _, body = readiness(worker.state, worker.clock)()
        self.assertEqual(code, 503)
        self.assertIn(b'"phase": "waiting for health", "phase_seconds": 42.0', body)
        self.assertIn(b'"last_probe": "HTTP 404"', body)


class ModelLogProcessTests(TestCase):
    async def test_cuda_error_reported_within_two_seconds(self) -> None:
        """A real worker (twistd) in front of a backend whose MODEL_LOG gets "CUDA out of
        memory" reports that line as error_msg to the autoscaler within 2 s."""
        backend = FakeBackend(reactor)
        backend.health_code = 503
        autoscaler = FakeAutoscaler()
        report_addr = listen(self, autoscaler)
        path = os.path.abspath(self.mktemp())
        write(path, "INFO 12-05 loading weights\n")
        process = spawn_worker(
            self,
            listen(self, backend),
            "--backend",
            "vllm",
            env={"MODEL_LOG": path, "REPORT_ADDR": report_addr, "CONTAINER_ID": "7"},
        )
        await process.wait_for(b"following the model log")
        await autoscaler.when(lambda: autoscaler.statuses)  # the worker reports, loading
        line = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB"
        written = time.monotonic()
        write(path, line + "\n")

        def reported() -> bool:
            return any(line in status["error_msg"] for status in autoscaler.statuses)

        await autoscaler.when(reported).addTimeout(5.0, reactor)
        self.assertLess(time.monotonic() - written, 2.0)
        self.assertIn(f"model log {path}: {line}", autoscaler.statuses[-1]["error_msg"])
        await process.wait_for(b"CUDA out of memory")

    async def test_restart_after_a_request_traceback_starts_and_serves(self) -> None:
        """A real worker (twistd) started again while llama-cpp-python runs, its log holding
        the load line and then the traceback of a malformed request, loads and serves."""
        backend = FakeBackend(reactor)
        path = os.path.abspath(self.mktemp())
        write(
            path,
            "INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)\n"
            "Exception: Expecting value: line 1 column 1 (char 0)\n"
            "Traceback (most recent call last):\n"
            '  File "llama_cpp/server/errors.py", line 173, in custom_route_handler\n'
            "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)\n"
            'INFO:     127.0.0.1:50000 - "POST /v1/completions HTTP/1.1" 500\n',
        )
        cache = os.path.abspath(self.mktemp())
        write(cache, "25.0\n")
        process = spawn_worker(
            self,
            listen(self, backend),
            "--backend",
            "llama-cpp-python",
            "--healthcheck-endpoint",
            "/health",
            "--benchmark-cache",
            cache,
            env={"MODEL_LOG": path},
        )
        url = await worker_url(process)
        started = await process.wait_for(rb"worker (loaded in|failed to start).*")
        self.assertIn(b"(max_perf 25)", started.group(0))
        response = await http_client(self).get(url + "/v1/echo")
        self.assertEqual(response.code, 200)
