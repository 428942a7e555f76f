# -*- test-case-name: tests.test_sample_backend -*-
"""
A sample OpenAI-compatible backend for the sandbox and the tests: ``/v1/chat/completions`` and
``/v1/completions`` (streamed as server-sent events at a set token rate, or whole with
``usage.completion_tokens``), ``/v1/models`` and ``/health``. It runs no model: its "tokens" are
words of a fixed text, produced on the injected clock.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

WORDS = (
    "Vespa relayed this answer from a sample backend through a signed Vast worker, token by "
    "token, with backpressure, and the local autoscaler routed it."
).split()
DEFAULT_MAX_TOKENS = 16


def _error(request: Request, code: int, message: str) -> bytes:
    """OpenAI's error shape, as real OpenAI-compatible servers answer."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    error = {"message": message, "type": "invalid_request_error", "code": code}
    return json.dumps({"error": error}).encode()


class SampleBackend(Resource):
    """An OpenAI-style server that streams ``tokens_per_second`` words per request."""

    isLeaf = True

    def __init__(
        self,
        clock: IReactorTime,
        tokens_per_second: float = 100.0,
        max_tokens: int = 64,
        model: str = "vespa-sample",
    ) -> None:
        super().__init__()
        self.clock = clock
        self.interval = 1.0 / tokens_per_second
        self.max_tokens = max_tokens  # cap: longer requests stop with finish_reason "length"
        self.model = model
        self.served = 0  # completions finished
        self._ids = itertools.count(1)

    def render(self, request: Request) -> bytes | int:
        path = request.path.rstrip(b"/")
        if path == b"/health":
            request.setHeader(b"content-type", b"application/json")
            return b'{"status": "ok"}'
        if path == b"/v1/models":
            request.setHeader(b"content-type", b"application/json")
            model = {"id": self.model, "object": "model", "created": 0, "owned_by": "vespa"}
            return json.dumps({"object": "list", "data": [model]}).encode()
        kinds = {b"/v1/chat/completions": "chat", b"/v1/completions": "text"}
        if path not in kinds:
            return _error(request, 404, f"no route {path.decode('utf-8', 'replace')}")
        if request.method != b"POST":
            return _error(request, 405, "use POST")
        assert request.content is not None
        try:
            body = json.loads(request.content.read())
        except ValueError:
            return _error(request, 400, "the body must be JSON")
        if not isinstance(body, dict):
            return _error(request, 400, "the body must be a JSON object")
        requested = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            return _error(request, 400, "max_tokens must be a whole number >= 1")
        Completion(self, request, kinds[path], body, requested).start()
        return NOT_DONE_YET


def _prompt_words(kind: str, body: dict[str, Any]) -> int:
    if kind == "text":
        prompt = body.get("prompt", "")
        return len(prompt.split()) if isinstance(prompt, str) else 0
    messages = body.get("messages")
    contents = (
        [m.get("content") for m in messages if isinstance(m, dict)]
        if isinstance(messages, list)
        else []
    )
    return sum(len(c.split()) for c in contents if isinstance(c, str))


class Completion:
    """One completion: words on the clock, streamed as SSE or answered whole at the end."""

    def __init__(
        self,
        backend: SampleBackend,
        request: Request,
        kind: str,
        body: dict[str, Any],
        requested: int,
    ) -> None:
        self.backend = backend
        self.request = request
        self.kind = kind
        self.stream = body.get("stream") is True
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.count = min(requested, backend.max_tokens)
        self.finish_reason = "length" if requested >= backend.max_tokens else "stop"
        self.prompt_tokens = _prompt_words(kind, body)
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + str(next(backend._ids))
        self.words: list[str] = []
        self.call: IDelayedCall | None = None

    def start(self) -> None:
        self.request.notifyFinish().addErrback(self._client_gone)
        if self.stream:
            self.request.setHeader(b"content-type", b"text/event-stream")
            self.request.setHeader(b"cache-control", b"no-cache")
            if self.kind == "chat":
                self._event(self._choice({"role": "assistant", "content": ""}, None))
            else:
                self.request.write(b"")
        self.call = self.backend.clock.callLater(self.backend.interval, self._next)

    def _client_gone(self, _: Failure) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()

    def _next(self) -> None:
        self.call = None
        word = WORDS[len(self.words) % len(WORDS)]
        word = word if not self.words else " " + word
        self.words.append(word)
        if self.stream:
            delta: Any = {"content": word} if self.kind == "chat" else word
            self._event(self._choice(delta, None))
        if len(self.words) < self.count:
            self.call = self.backend.clock.callLater(self.backend.interval, self._next)
        else:
            self._finish()

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.words),
            "total_tokens": self.prompt_tokens + len(self.words),
        }

    def _choice(self, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            key, obj = (
                ("delta", "chat.completion.chunk")
                if self.stream
                else ("message", "chat.completion")
            )
        else:
            key, obj = "text", "text_completion"
        choice = {"index": 0, key: delta, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": obj,
            "created": int(self.backend.clock.seconds()),
            "model": self.backend.model,
            "choices": [choice],
        }

    def _event(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        self.request.write(b"data: " + text.encode() + b"\n\n")

    def _finish(self) -> None:
        self.backend.served += 1
        text = "".join(self.words)
        if self.stream:
            self._event(self._choice({} if self.kind == "chat" else "", self.finish_reason))
            if self.include_usage:
                self._event({**self._choice({}, None), "choices": [], "usage": self._usage()})
            self._event("[DONE]")
        else:
            message = {"role": "assistant", "content": text} if self.kind == "chat" else text
            answer = {**self._choice(message, self.finish_reason), "usage": self._usage()}
            body = json.dumps(answer).encode()
            self.request.setHeader(b"content-type", b"application/json")
            self.request.setHeader(b"content-length", b"%d" % len(body))
            self.request.write(body)
        self.request.finish()
