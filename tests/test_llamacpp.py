"""
A real inference server behind real Vespa processes: llama-cpp-python's OpenAI server on the
tiny random-weight model of tests/realbackend/tiny_gguf.py (``tox -e llamacpp``, which builds
llama-cpp-python and sets VESPA_TEST_LLAMACPP=1; skipped everywhere else).

What this server does that the project's fakes do not: no ``/health`` (the worker probes
``/openapi.json``: ``/v1/models`` takes the model lock and ends the streams in progress), a 400
with an empty body for an ``X-Request-Id`` that is not a UUID, a context limit, the model id
being the file path, and generation that stops when a streaming client leaves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import time
import uuid
from typing import Any

import psutil
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.http_headers import Headers

from tests.helpers import (
    ProcessWatcher,
    RawClient,
    http_client,
    raw_connect,
    spawn,
    spawn_worker,
    twistd_command,
    worker_url,
)

ENABLED = os.environ.get("VESPA_TEST_LLAMACPP") == "1"
SKIP_REASON = "needs llama-cpp-python's server: tox -e llamacpp (sets VESPA_TEST_LLAMACPP=1)"

# The fields of an OpenAI answer (and of each streamed chunk) that differ between two requests
# for the same generation: the completion's id and its creation time (whole seconds).
PER_REQUEST = re.compile(rb'"(id|created)":\s*("[^"]*"|\d+)')

# The worker's flags for this server, as the README's llama-cpp-python row gives them.
WORKER_FLAGS = ("--backend", "llama-cpp-python")

# Vespa's benchmark with the smallest requests that still measure something, so that a test
# spends seconds, not minutes, on it.
SMALL_BENCHMARK = {
    "BENCHMARK_ROUNDS": "2",
    "BENCHMARK_CONCURRENCY": "2",
    "BENCHMARK_PROMPT_WORDS": "40",
    "BENCHMARK_MAX_TOKENS": "32",
}

_model: list[str] = []  # the model file, written once per process


def tiny_model() -> str:
    """The tiny model (about 7 MB, a second to write), shared by the tests of this process."""
    if not _model:
        from tests.realbackend import tiny_gguf

        path = os.path.abspath("tiny.gguf")  # in trial's temporary directory
        tiny_gguf.write(path, tiny_gguf.benchmark_words())
        _model.append(path)
    return _model[0]


def free_port() -> int:
    """A free loopback port, for a process that must be told its port before it listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LoggedWatcher(ProcessWatcher):
    """Also appends everything the process writes to a file: the server's log file, which a
    worker may tail as MODEL_LOG."""

    def __init__(self, log_file: str) -> None:
        super().__init__()
        self.log_file = log_file

    def outReceived(self, data: bytes) -> None:
        with open(self.log_file, "ab") as f:
            f.write(data)
        super().outReceived(data)

    errReceived = outReceived


@dataclasses.dataclass
class LlamaServer:
    url: str
    model: str
    process: ProcessWatcher
    pid: int


async def start_llama(
    test: TestCase, n_ctx: int = 2048, log_file: str = "", port: int = 0
) -> LlamaServer:
    """llama-cpp-python's server on the tiny model, once it listens (the model is loaded by
    then). ``--interrupt_requests False``: a request waiting for the model lock does not end
    the stream that holds it (llama-cpp-python's default does)."""
    model = tiny_model()
    port = port or free_port()
    args = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--interrupt_requests",
        "False",
    ]
    # The server is third-party code: its deprecations are not this suite's errors.
    env = {"PYTHONWARNINGS": ""}
    if log_file:
        watcher: ProcessWatcher = LoggedWatcher(log_file)
        process = spawn(test, args, env, watcher=watcher)
    else:
        process = spawn(test, args, env)
    await process.wait_for(rb"Uvicorn running on", timeout=120)
    pid = process.transport_.pid  # type: ignore[attr-defined]
    return LlamaServer(f"http://127.0.0.1:{port}", model, process, pid)


def same_generation(body: bytes) -> bytes:
    """``body`` without what differs per request (PER_REQUEST)."""
    return PER_REQUEST.sub(rb'"\1": "-"', body)


async def post(url: str, payload: dict[str, Any], test: TestCase, **headers: str) -> Any:
    """POST ``payload``; returns (status, headers, body)."""
    http = http_client(test)
    response = await http.post(
        url,
        json=payload,
        headers=Headers(
            {
                name: [value]
                for name, value in {"content-type": "application/json", **headers}.items()
            }
        ),
    )
    return response.code, response.headers, await treq.content(response)


class UnsecuredWorkerTests(TestCase):
    """A worker (a real twistd) in front of the server, in unsecured mode."""

    timeout = 240

    def setUp(self) -> None:
        if not ENABLED:
            raise SkipTest(SKIP_REASON)

    async def worker(self, server: LlamaServer, **env: str) -> str:
        """A worker benchmarked and loaded in front of ``server``; returns its URL."""
        process = spawn_worker(self, server.url, *WORKER_FLAGS, env={**SMALL_BENCHMARK, **env})
        url = await worker_url(process)
        await process.wait_for(rb"benchmark result: ", timeout=120)
        return url

    async def test_benchmark_measures_max_perf(self) -> None:
        """The shipped OpenAI benchmark, at its default sizes (250-word prompts, 500 tokens)
        but fewer rounds, measures a positive max_perf from the real server in bounded time
        (the wait's timeout); it picks the model from /v1/models, where its id is the file
        path."""
        server = await start_llama(self)
        process = spawn_worker(
            self,
            server.url,
            *WORKER_FLAGS,
            env={"BENCHMARK_ROUNDS": "2", "BENCHMARK_CONCURRENCY": "2"},
        )
        started = time.monotonic()
        match = await process.wait_for(
            rb"benchmark result: ([0-9.e+]+) workload units/s in ([0-9.]+) s", timeout=180
        )
        self.assertGreater(float(match.group(1)), 0)
        self.assertLess(time.monotonic() - started, 180)

    async def test_small_context_fits_the_benchmark(self) -> None:
        """With a context shorter than the benchmark's default request (a 250-word prompt and
        500 tokens, --n_ctx 256) the server refuses the first request with its context in the
        message; the benchmark fits its requests to it, says so, and measures a positive
        max_perf instead of failing start-up."""
        server = await start_llama(self, n_ctx=256)
        process = spawn_worker(
            self,
            server.url,
            *WORKER_FLAGS,
            env={"BENCHMARK_ROUNDS": "1", "BENCHMARK_CONCURRENCY": "2"},
        )
        fitted = await process.wait_for(
            rb"the model's context is 256 tokens \(the server's answer\): benchmarking with "
            rb"BENCHMARK_PROMPT_WORDS=(\d+) and BENCHMARK_MAX_TOKENS=(\d+) instead of 250 and 500",
            timeout=120,
        )
        self.assertLess(int(fitted.group(1)) + int(fitted.group(2)), 256)
        result = await process.wait_for(rb"benchmark result: ([0-9.e+]+) workload units/s", 120)
        self.assertGreater(float(result.group(1)), 0)

    async def test_same_bytes_as_direct(self) -> None:
        """Completions and chat completions, plain and streamed, at temperature 0: the body
        through the worker is the body the server gives directly, byte for byte, apart from
        each answer's (and each chunk's) ``id`` and ``created``."""
        server = await start_llama(self)
        url = await self.worker(server)
        prompt = "tell me a story about the water in the house"
        requests: dict[str, dict[str, Any]] = {
            "/v1/completions": {"prompt": prompt},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": prompt}]},
        }
        for path, request in requests.items():
            for stream in (False, True):
                payload = {
                    **request,
                    "model": server.model,
                    "max_tokens": 40,
                    "temperature": 0,
                    "stream": stream,
                }
                direct = await post(server.url + path, payload, self)
                proxied = await post(url + path, payload, self)
                self.assertEqual((direct[0], proxied[0]), (200, 200), (path, stream))
                self.assertEqual(
                    same_generation(proxied[2]), same_generation(direct[2]), (path, stream)
                )
                if stream:
                    self.assertTrue(proxied[2].rstrip().endswith(b"data: [DONE]"), proxied[2])
                    self.assertGreater(proxied[2].count(b"data: "), 10)
                else:
                    self.assertGreater(json.loads(proxied[2])["usage"]["completion_tokens"], 10)

    async def test_client_leaving_stops_generation(self) -> None:
        """A client that leaves a stream through the worker stops the generation: the server,
        busy while it streams, falls idle within seconds of the worker closing the backend
        connection, long before the generation could end by itself."""
        server = await start_llama(self, n_ctx=4096)
        url = await self.worker(server)
        payload = {
            "prompt": "tell me a long story",
            "max_tokens": 4000,  # about 15 s of generation on one core
            "temperature": 0,
            "stream": True,
            "logit_bias": {"2": -100},  # no </s>: only the client can end it early
        }
        body = json.dumps(payload).encode()
        client = await raw_connect(
            url,
            RawClient(
                b"POST /v1/completions HTTP/1.1\r\nHost: worker\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            ),
        )
        await client.when(lambda: client.received.count(b"data: ") >= 20)
        process = psutil.Process(server.pid)
        streaming = await cpu_share(process)
        self.assertGreater(streaming, 0.5)  # about one core while it generates
        client.tcp.abortConnection()
        await client.closed
        idle = streaming
        for _ in range(6):  # 3 s; the server's CPU, only psutil can tell
            idle = await cpu_share(process)
            if idle < streaming / 5:
                break
        self.assertLess(idle, streaming / 5)
        self.assertNotIn(b"data: [DONE]", client.received)

    async def test_request_ids(self) -> None:
        """The server refuses an X-Request-Id that is not a UUID (400, empty body). The ids
        Vespa makes (32 hex digits) are UUIDs to it; a client's own id is kept and sent on,
        as the README says, so a client's UUID passes and a client's other id gets the
        server's 400, passed back unchanged with the id."""
        server = await start_llama(self)
        url = await self.worker(server)
        payload = {"model": server.model, "prompt": "hi", "max_tokens": 4, "temperature": 0}
        path = "/v1/completions"

        code, headers, _ = await post(url + path, payload, self)
        self.assertEqual(code, 200)
        made = headers.getRawHeaders("x-request-id")[0]
        self.assertRegex(made, "^[0-9a-f]{32}$")
        uuid.UUID(made)  # what the server checks
        self.assertEqual(
            (await post(server.url + path, payload, self, **{"X-Request-Id": made}))[0], 200
        )

        own = str(uuid.uuid4())
        code, headers, _ = await post(url + path, payload, self, **{"X-Request-Id": own})
        self.assertEqual((code, headers.getRawHeaders("x-request-id")), (200, [own]))

        direct = await post(server.url + path, payload, self, **{"X-Request-Id": "order-17"})
        self.assertEqual((direct[0], direct[2]), (400, b""))
        code, headers, body = await post(url + path, payload, self, **{"X-Request-Id": "order-17"})
        self.assertEqual((code, body), (400, b""))
        self.assertEqual(headers.getRawHeaders("x-request-id"), ["order-17"])


async def cpu_share(process: psutil.Process, window: float = 0.5) -> float:
    """The CPU time ``process`` used over the next ``window`` seconds, per second."""
    before = sum(process.cpu_times()[:2])
    await deferLater(reactor, window, lambda: None)
    return (sum(process.cpu_times()[:2]) - before) / window


# What the server logs when its model cannot be loaded: the test appends it to the log.
ERROR_LINE = "ValueError: Failed to load model from file: tiny.gguf"


@dataclasses.dataclass
class SignedLoop:
    server: LlamaServer
    log_file: str
    emulator_url: str
    client_url: str


class SignedLoopTests(TestCase):
    """The whole loop through real processes: the OpenAI SDK -> vespa-client -> the emulator
    (vespa-autoscaler) for a signed route -> a signed worker -> the server."""

    timeout = 240

    def setUp(self) -> None:
        if not ENABLED:
            raise SkipTest(SKIP_REASON)

    async def status(self, emulator_url: str) -> dict[str, Any]:
        response = await http_client(self).get(emulator_url + "/status")
        return json.loads(await treq.content(response))  # type: ignore[no-any-return]

    async def worker_state(self, emulator_url: str, state: str) -> dict[str, Any]:
        """The emulator's view of the worker once it reported ``state`` (the worker is
        another process: its reports are polled for)."""
        for _ in range(600):
            workers = (await self.status(emulator_url))["workers"]
            if workers and workers[0]["state"] == state:
                return workers[0]  # type: ignore[no-any-return]
            await deferLater(reactor, 0.1, lambda: None)
        raise AssertionError(f"the worker never reported {state}: {workers}")

    async def signed_loop(self) -> SignedLoop:
        """Emulator, then a signed worker tailing the server's (still empty) log file as
        MODEL_LOG where the worker knows that option, then the server (writing that log),
        then vespa-client; returns once the worker is ready and the client listens."""
        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        log_file = os.path.join(state, "llama.log")
        open(log_file, "wb").close()
        emulator = spawn(
            self,
            twistd_command(
                "-n",
                "--pidfile=",
                "vespa-autoscaler",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--state-dir",
                state,
            ),
        )
        match = await emulator.wait_for(rb"autoscaler emulator starting on (\d+)")
        emulator_url = f"http://127.0.0.1:{int(match.group(1))}"

        port, worker_port = free_port(), free_port()
        server_url = f"http://127.0.0.1:{port}"
        env = {
            "UNSECURED": "false",
            "REPORT_ADDR": emulator_url,
            "MASTER_TOKEN": "llamacpp-test-mtoken",
            "CONTAINER_ID": "1",
            "PUBLIC_IPADDR": "127.0.0.1",
            f"VAST_TCP_PORT_{worker_port}": str(worker_port),
            "ADMIN_LISTEN": "none",
            "HEALTHCHECK_RETRY_INTERVAL": "0.5",
            **SMALL_BENCHMARK,
        }
        env["MODEL_LOG"] = log_file  # the lines to look for: --backend llama-cpp-python's
        spawn(
            self,
            twistd_command(
                "-n",
                "--pidfile=",
                "vespa",
                "--backend-url",
                server_url,
                "--listen",
                f"tcp:{worker_port}:interface=127.0.0.1",
                *WORKER_FLAGS,
            ),
            env,
        )
        server = await start_llama(self, log_file=log_file, port=port)
        await self.worker_state(emulator_url, "ready")
        client = spawn(
            self,
            twistd_command(
                "-n",
                "--pidfile=",
                "vespa-client",
                "--endpoint",
                "my-endpoint",
                "--account-key",
                "local-account-key",
                "--instance",
                "local",
                "--autoscaler-url",
                emulator_url,
                "--console-url",
                emulator_url,
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--ca-cache",
                os.path.join(state, "vast_root.cer"),
            ),
        )
        match = await client.wait_for(rb"client proxy starting on (\d+)")
        client_url = f"http://127.0.0.1:{int(match.group(1))}"
        return SignedLoop(server, log_file, emulator_url, client_url)

    async def test_openai_sdk_plain_and_streaming(self) -> None:
        """The SDK's chat completion, plain and streamed, comes back through the client and a
        signed route with the text the server gives directly (temperature 0); the emulator
        hears from the worker that both requests succeeded."""
        import openai

        loop = await self.signed_loop()
        messages = [{"role": "user", "content": "explain the water in the house"}]
        request: dict[str, Any] = {
            "model": loop.server.model,
            "messages": messages,
            "max_tokens": 24,
        }
        direct = await post(
            loop.server.url + "/v1/chat/completions", {**request, "temperature": 0}, self
        )
        expected = json.loads(direct[2])["choices"][0]["message"]["content"]
        self.assertTrue(expected)
        sdk = openai.OpenAI(base_url=loop.client_url + "/v1", api_key="sk-unused", max_retries=0)

        def plain() -> str:
            answer = sdk.chat.completions.create(temperature=0, **request)
            return str(answer.choices[0].message.content)

        def streamed() -> str:
            chunks = sdk.chat.completions.create(temperature=0, stream=True, **request)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        self.assertEqual(await deferToThread(plain), expected)
        self.assertEqual(await deferToThread(streamed), expected)
        for _ in range(100):  # the worker's /delete_requests/ reach the emulator in a second
            requests = (await self.status(loop.emulator_url))["requests"]
            if [r["state"] for r in requests] == ["success", "success"]:
                break
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual([r["state"] for r in requests], ["success", "success"])

    async def test_model_log_load_and_error(self) -> None:
        """The worker tails the server's log file as MODEL_LOG with --backend
        llama-cpp-python's lines: it was started before the server and loads once the
        server's load line is there. A malformed request makes the server log a traceback,
        which does not end a serving worker; an error line appended to the log after it makes
        the worker report errored to the emulator, with that line alone."""
        loop = await self.signed_loop()
        bad = {"model": loop.server.model, "prompt": "hi", "max_tokens": "many"}
        status, _, body = await post(loop.client_url + "/v1/completions", bad, self)
        self.assertEqual(status, 500, body)  # the server's answer, with a traceback in its log
        with open(loop.log_file, encoding="utf-8") as f:
            self.assertIn("Traceback (most recent call last):", f.read())
        with open(loop.log_file, "a", encoding="utf-8") as f:
            f.write(ERROR_LINE + "\n")
        worker = await self.worker_state(loop.emulator_url, "errored")
        self.assertEqual(worker["error_msg"], f"model log {loop.log_file}: {ERROR_LINE}")
