"""The shipped benchmarks, each against an in-process fake of its API through real sockets."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet import reactor
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from tests.fakes import FakeInferenceAPI
from tests.helpers import listen
from vast_vespa.benchmark import BackendSession, BenchmarkError
from vast_vespa.benchmarks import comfyui, openai, tgi
from vast_vespa.benchmarks.rounds import count, measure, prompt
from vast_vespa.workload import comfyui_workload, openai_workload, tgi_workload


class ShippedBenchmarkTests(TestCase):
    def setUp(self) -> None:
        self.api = FakeInferenceAPI()
        self.url = listen(self, self.api)
        self.session = BackendSession(reactor, self.url)
        self.addCleanup(self.session.close)
        self.environ(BENCHMARK_ROUNDS="2", BENCHMARK_CONCURRENCY="3")

    def environ(self, **values: str) -> None:
        self.patch(os, "environ", {**os.environ, **values})

    def paths(self) -> list[bytes]:
        return [path for path, _ in self.api.payloads]

    def counted(self, module: Any) -> list[tuple[int, int, float]]:
        """Replace ``module``'s measure: record (rounds, concurrency, workload of one
        request) instead of measuring."""
        calls: list[tuple[int, int, float]] = []

        async def measure(name: str, send: Any, rounds: int, concurrency: int) -> float:
            calls.append((rounds, concurrency, await send(0)))
            return 1.0

        self.patch(module, "measure", measure)
        return calls

    async def test_openai(self) -> None:
        """Warm-up (full size: a request the server cannot hold shows at once), then rounds
        of concurrent chat completions with the server's model."""
        result = await openai.benchmark(self.url, self.session)
        self.assertGreater(result, 0)
        self.assertEqual(self.paths(), [b"/v1/chat/completions"] * 7)
        warm_up, first = self.api.payloads[0][1], self.api.payloads[1][1]
        self.assertEqual(warm_up["max_tokens"], 500)
        self.assertEqual(first["max_tokens"], 500)
        self.assertEqual(first["model"], "org/model-7b")
        self.assertEqual(len(first["messages"][1]["content"].split()), 250)

    async def test_openai_model_name(self) -> None:
        """MODEL_NAME (or PYWORKER_MODEL_NAME) picks the model; sizes come from the env."""
        self.environ(PYWORKER_MODEL_NAME="mine", BENCHMARK_MAX_TOKENS="40")
        await openai.benchmark(self.url, self.session)
        payload = self.api.payloads[-1][1]
        self.assertEqual(payload["model"], "mine")
        self.assertEqual(payload["max_tokens"], 40)

    async def test_workload_is_the_estimators(self) -> None:
        """Each shipped benchmark counts a request with the estimator WORKLOAD uses for its
        backend, on the payload it sent: max_perf and admission share one unit."""
        for module, estimate in (
            (openai, openai_workload),
            (tgi, tgi_workload),
            (comfyui, comfyui_workload),
        ):
            calls = self.counted(module)
            await module.benchmark(self.url, self.session)
            sent = self.api.payloads[-1][1]
            self.assertEqual(calls[-1][2], estimate(sent))
        self.assertGreater(openai_workload(self.api.payloads[0][1]), 500)

    async def test_openai_routes(self) -> None:
        """BENCHMARK_ROUTE picks completions or embeddings instead of chat."""
        self.environ(BENCHMARK_ROUTE="completions", BENCHMARK_PROMPT_WORDS="20")
        calls = self.counted(openai)
        await openai.benchmark(self.url, self.session)
        path, sent = self.api.payloads[-1]
        self.assertEqual(path, b"/v1/completions")
        self.assertEqual(len(sent["prompt"].split()), 20)
        self.assertEqual(calls[-1][2], openai_workload(sent))
        self.environ(BENCHMARK_ROUTE="Embeddings")
        await openai.benchmark(self.url, self.session)
        path, sent = self.api.payloads[-1]
        self.assertEqual(path, b"/v1/embeddings")
        self.assertNotIn("max_tokens", sent)
        self.environ(BENCHMARK_ROUTE="images")
        with self.assertRaises(BenchmarkError) as caught:
            await openai.benchmark(self.url, self.session)
        self.assertIn("BENCHMARK_ROUTE='images'", str(caught.exception))

    async def test_concurrency_capped_by_admission(self) -> None:
        """A session limited to what admission lets through (ALLOW_PARALLEL=false: 1) caps
        BENCHMARK_CONCURRENCY, and the log says why."""
        session = BackendSession(reactor, self.url, concurrency_limit=1)
        self.addCleanup(session.close)
        self.environ(BENCHMARK_CONCURRENCY="10")
        for module in (openai, tgi, comfyui):
            calls = self.counted(module)
            with capturedLogs() as events:
                await module.benchmark(self.url, session)
            self.assertEqual(calls[-1][1], 1)
            self.assertTrue(any("not BENCHMARK_CONCURRENCY=10" in formatEvent(e) for e in events))
        calls = self.counted(openai)
        await openai.benchmark(self.url, self.session)  # no limit
        self.assertEqual(calls[-1][1], 10)

    async def test_context_from_models(self) -> None:
        """vLLM says max_model_len in /v1/models: the request is made to fit, and said so."""
        self.api.max_model_len = 512
        with capturedLogs() as events:
            await openai.benchmark(self.url, self.session)
        sent = self.api.payloads[-1][1]
        words = len(sent["messages"][1]["content"].split())
        self.assertLessEqual(words * 2 + sent["max_tokens"], 512)
        self.assertTrue(any("context is 512 tokens" in formatEvent(e) for e in events))

    async def test_context_from_the_refusal(self) -> None:
        """A server that says its context only in its 400 (llama-cpp-python): the benchmark
        fits the request to it and measures."""
        self.api.context = 512
        result = await openai.benchmark(self.url, self.session)
        self.assertGreater(result, 0)
        refused, *served = self.api.payloads
        self.assertEqual(refused[1]["max_tokens"], 500)
        sent = served[-1][1]
        prompt = sum(len(m["content"].split()) for m in sent["messages"])
        self.assertLessEqual(prompt + sent["max_tokens"], 512)
        self.assertEqual(len(served), 7)

    async def test_context_too_small_names_the_knobs(self) -> None:
        """A 400 about the context without a number: the error names the knobs."""
        self.api.context = 40
        self.patch(openai, "_CONTEXT", re.compile(rb"never matches"))
        with self.assertRaises(BenchmarkError) as caught:
            await openai.benchmark(self.url, self.session)
        message = str(caught.exception)
        self.assertIn("maximum context length is 40 tokens", message)
        self.assertIn("BENCHMARK_PROMPT_WORDS (now 250)", message)
        self.assertIn("BENCHMARK_MAX_TOKENS (now 500)", message)

    def test_fit(self) -> None:
        """fit() keeps what fits, shrinks what does not, and gives up when nothing can."""
        sizes = openai.Sizes(250, 500)
        self.assertEqual(openai.fit(sizes, 4096), sizes)
        self.assertEqual(openai.fit(sizes, 512), openai.Sizes(103, 206))
        self.assertEqual(openai.fit(sizes, 512, prompt_tokens=250), openai.Sizes(206, 206))
        self.assertIsNone(openai.fit(sizes, 50))

    async def test_openai_all_failed_is_an_error(self) -> None:
        """A server refusing every request makes the benchmark fail with the server's answer,
        instead of returning a made-up 1.0."""
        self.api.fail_status = 503
        with self.assertRaises(BenchmarkError) as caught:
            await openai.benchmark(self.url, self.session)
        self.assertIn("warm-up request failed: HTTP 503", str(caught.exception))

    async def test_openai_small_context_names_the_settings(self) -> None:
        """A 400 about the context (llama.cpp's "maximum context length is 512 tokens") that
        stays after the requests were fitted to it says which settings make them smaller,
        with their values."""
        self.environ(BENCHMARK_PROMPT_WORDS="300")
        self.api.fail_status = 400
        self.api.fail_body = (
            b'{"error": {"message": "This model\'s maximum context length is 512"}}'
        )
        with self.assertRaises(BenchmarkError) as caught:
            await openai.benchmark(self.url, self.session)
        message = str(caught.exception)
        self.assertIn("maximum context length is 512", message)
        self.assertIn("lower BENCHMARK_PROMPT_WORDS (now ", message)
        self.assertIn("BENCHMARK_MAX_TOKENS (now ", message)

    async def test_openai_other_400_has_no_context_hint(self) -> None:
        """Any other refusal is reported as the server said it, without the hint."""
        self.api.fail_status = 400
        with self.assertRaises(BenchmarkError) as caught:
            await openai.benchmark(self.url, self.session)
        self.assertNotIn("BENCHMARK_PROMPT_WORDS", str(caught.exception))

    async def test_partial_failures_are_counted_out(self) -> None:
        """Failed requests add no workload and are reported in the log."""
        self.api.fail_status, self.api.fail_every = 500, 3
        with capturedLogs() as events:
            result = await openai.benchmark(self.url, self.session)
        self.assertGreater(result, 0)
        self.assertTrue(any("2 benchmark requests failed" in formatEvent(e) for e in events))

    async def test_tgi(self) -> None:
        """TGI's /generate with max_new_tokens from the environment."""
        self.environ(BENCHMARK_MAX_TOKENS="64")
        result = await tgi.benchmark(self.url, self.session)
        self.assertGreater(result, 0)
        self.assertEqual(self.paths(), [b"/generate"] * 7)
        self.assertEqual(self.api.payloads[-1][1]["parameters"]["max_new_tokens"], 64)

    async def test_comfyui_default_request(self) -> None:
        """Without a workflow file, a Text2Image request sized by the environment."""
        self.environ(BENCHMARK_TEST_WIDTH="768", BENCHMARK_CONCURRENCY="1")
        result = await comfyui.benchmark(self.url, self.session)
        self.assertGreater(result, 0)
        self.assertEqual(self.paths(), [b"/generate/sync"] * 3)
        job = self.api.payloads[-1][1]["input"]
        self.assertEqual(job["modifier"], "Text2Image")
        self.assertEqual(job["modifications"]["width"], 768)
        self.assertEqual(job["request_id"], "benchmark-2")

    async def test_comfyui_workflow_file(self) -> None:
        """COMFYUI_BENCHMARK_FILE's workflow is sent as workflow_json."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump({"3": {"class_type": "KSampler"}}, f)
        self.environ(COMFYUI_BENCHMARK_FILE=path)
        await comfyui.benchmark(self.url, self.session)
        self.assertEqual(
            self.api.payloads[-1][1]["input"]["workflow_json"], {"3": {"class_type": "KSampler"}}
        )

    async def test_comfyui_bad_workflow_file(self) -> None:
        """An unreadable workflow file is a clear error naming it."""
        self.environ(COMFYUI_BENCHMARK_FILE="/nonexistent.json")
        with self.assertRaises(BenchmarkError) as caught:
            await comfyui.benchmark(self.url, self.session)
        self.assertIn("COMFYUI_BENCHMARK_FILE='/nonexistent.json'", str(caught.exception))


class RoundsTests(TestCase):
    async def test_every_request_failed(self) -> None:
        """When every measured request fails, the benchmark raises with the last reason."""

        async def send(number: int) -> float:
            if number >= 0:
                raise RuntimeError("HTTP 500: out of memory")
            return 1.0

        with self.assertRaises(BenchmarkError) as caught:
            await measure("test", send, 2, 2)
        self.assertEqual(
            str(caught.exception),
            "test: all 4 benchmark requests failed (last: HTTP 500: out of memory)",
        )

    async def test_best_round_wins(self) -> None:
        """The result is the best round's throughput."""
        seen: list[int] = []

        async def send(number: int) -> float:
            seen.append(number)
            return 10.0 if number < 2 else 0.0

        result = await measure("test", send, 2, 2)
        self.assertEqual(seen, [-1, 0, 1, 2, 3])
        self.assertGreater(result, 0)

    def test_prompt_from_shipped_words(self) -> None:
        """Prompts come from the word list in the package (no download)."""
        words = prompt(250).split()
        self.assertEqual(len(words), 250)
        self.assertTrue(all(word.isalpha() for word in words))

    def test_bad_count(self) -> None:
        """A bad size setting is an error naming it."""
        self.patch(os, "environ", {"BENCHMARK_ROUNDS": "many"})
        with self.assertRaises(BenchmarkError) as caught:
            count("BENCHMARK_ROUNDS", 8)
        self.assertIn("BENCHMARK_ROUNDS='many'", str(caught.exception))
