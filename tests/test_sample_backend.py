"""The sandbox's sample OpenAI-compatible backend: shapes, streaming rate, cancellation."""

from __future__ import annotations

import io
import json
from typing import cast

import treq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from tests.helpers import http_client, listen
from vast_vespa.sample_backend import SampleBackend

CHAT = {"model": "m", "messages": [{"role": "user", "content": "say five words"}], "max_tokens": 5}


def sse_data(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


class OverSocketTests(TestCase):
    def setUp(self) -> None:
        self.backend = SampleBackend(reactor, tokens_per_second=2000, max_tokens=8)
        self.url = listen(self, self.backend)
        self.http = http_client(self)

    async def post(self, path: str, body: object) -> tuple[IResponse, bytes]:
        response = await self.http.post(self.url + path, json=body)
        return response, await treq.content(response)

    async def test_chat_non_streaming_has_usage(self) -> None:
        """A non-streaming chat answer is OpenAI JSON with usage.completion_tokens."""
        response, body = await self.post("/v1/chat/completions", CHAT)
        answer = json.loads(body)
        self.assertEqual(response.code, 200)
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["usage"]["completion_tokens"], 5)
        self.assertEqual(answer["usage"]["prompt_tokens"], 3)
        self.assertEqual(answer["choices"][0]["finish_reason"], "stop")
        self.assertEqual(len(answer["choices"][0]["message"]["content"].split()), 5)

    async def test_chat_streaming_sse(self) -> None:
        """A streaming chat answer is SSE: a role chunk, one chunk per token, a finish chunk,
        a usage chunk when asked, then [DONE]."""
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        response, raw = await self.post("/v1/chat/completions", body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        events = sse_data(raw)
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(e) for e in events[:-1]]
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        words = [c["choices"][0]["delta"]["content"] for c in chunks[1:6]]
        self.assertEqual(len(words), 5)
        self.assertEqual(chunks[6]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[7]["usage"]["completion_tokens"], 5)

    async def test_completions_capped(self) -> None:
        """/v1/completions answers text; a request above the cap stops with 'length'."""
        _, raw = await self.post("/v1/completions", {"prompt": "a b", "max_tokens": 500})
        answer = json.loads(raw)
        self.assertEqual(answer["object"], "text_completion")
        self.assertEqual(answer["usage"]["completion_tokens"], 8)
        self.assertEqual(answer["choices"][0]["finish_reason"], "length")
        _, raw = await self.post(
            "/v1/completions", {"prompt": "a", "max_tokens": 2, "stream": True}
        )
        events = sse_data(raw)
        self.assertEqual(
            [json.loads(e)["choices"][0]["text"] for e in events[:2]], ["Vespa", " relayed"]
        )

    async def test_models_health_and_errors(self) -> None:
        """/v1/models lists the model, /health is 200, bad input is an OpenAI-style 400."""
        models = json.loads(await treq.content(await self.http.get(self.url + "/v1/models")))
        self.assertEqual(models["data"][0]["id"], "vespa-sample")
        health = await self.http.get(self.url + "/health")
        self.assertEqual(health.code, 200)
        await treq.content(health)
        response, raw = await self.post("/v1/chat/completions", {**CHAT, "max_tokens": 0})
        self.assertEqual(response.code, 400)
        self.assertIn("max_tokens", json.loads(raw)["error"]["message"])
        response = await self.http.post(self.url + "/v1/completions", data=b"not json")
        self.assertEqual(response.code, 400)
        await treq.content(response)
        response = await self.http.get(self.url + "/v2/nothing")
        self.assertEqual(response.code, 404)
        await treq.content(response)


class RateTests(SynchronousTestCase):
    def request(self, body: dict) -> DummyRequest:
        request = DummyRequest([b"v1", b"chat", b"completions"])
        as_request = cast(Request, request)  # a stand-in for one
        as_request.path = b"/v1/chat/completions"
        request.method = b"POST"
        as_request.content = io.BytesIO(json.dumps(body).encode())
        return request

    def test_tokens_come_at_the_set_rate(self) -> None:
        """At 10 tokens/s, one token is written every 0.1 s of the clock, no sooner."""
        clock = Clock()
        backend = SampleBackend(clock, tokens_per_second=10)
        request = self.request({**CHAT, "stream": True})
        backend.render(cast(Request, request))
        self.assertEqual(len(request.written), 1)  # the role chunk
        clock.advance(0.05)
        self.assertEqual(len(request.written), 1)
        clock.advance(0.05)
        self.assertEqual(len(request.written), 2)
        clock.pump([0.1] * 4)
        self.assertEqual(len(request.written), 8)  # role, 5 tokens, finish, [DONE]
        self.assertEqual(request.finished, 1)
        self.assertEqual(backend.served, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_client_leaving_stops_generation(self) -> None:
        """When the client disconnects no more tokens are scheduled."""
        clock = Clock()
        backend = SampleBackend(clock, tokens_per_second=10)
        request = self.request(CHAT)
        backend.render(cast(Request, request))
        request.processingFailed(Exception("gone"))  # fires notifyFinish's errback
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(backend.served, 0)
