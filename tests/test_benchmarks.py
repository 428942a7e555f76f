"""The shipped benchmarks, each against an in-process fake of its API through real sockets."""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from tests.fakes import FakeInferenceAPI
from tests.helpers import listen
from vast_vespa.benchmark import BackendSession, BenchmarkError
from vast_vespa.benchmarks import comfyui, openai, tgi
from vast_vespa.benchmarks.rounds import count, measure, prompt


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

    async def test_openai(self) -> None:
        """Warm-up, then rounds of concurrent chat completions with the server's model;
        the result is completion tokens per second."""
        result = await openai.benchmark(self.url, self.session)
        self.assertGreater(result, 0)
        self.assertEqual(self.paths(), [b"/v1/chat/completions"] * 7)
        warm_up, first = self.api.payloads[0][1], self.api.payloads[1][1]
        self.assertEqual(warm_up["max_tokens"], 100)
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

    async def test_openai_all_failed_is_an_error(self) -> None:
        """A server refusing every request makes the benchmark fail with the server's answer,
        instead of returning a made-up 1.0."""
        self.api.fail_status = 503
        with self.assertRaises(BenchmarkError) as caught:
            await openai.benchmark(self.url, self.session)
        self.assertIn("warm-up request failed: HTTP 503", str(caught.exception))

    async def test_openai_small_context_names_the_settings(self) -> None:
        """A 400 about the context (llama.cpp's "maximum context length is 512 tokens") says
        which settings make the benchmark's requests smaller, with their values."""
        self.environ(BENCHMARK_PROMPT_WORDS="300")
        self.api.fail_status = 400
        self.api.fail_body = (
            b'{"error": {"message": "This model\'s maximum context length is 512"}}'
        )
        with self.assertRaises(BenchmarkError) as caught:
            await openai.benchmark(self.url, self.session)
        message = str(caught.exception)
        self.assertIn("maximum context length is 512", message)
        self.assertIn("lower BENCHMARK_PROMPT_WORDS=300 or BENCHMARK_MAX_TOKENS=500", message)

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
