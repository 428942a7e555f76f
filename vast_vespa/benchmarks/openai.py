"""
OpenAI-compatible servers (vLLM, SGLang, Ollama, llama.cpp, TGI's OpenAI API):
``BENCHMARK=vast_vespa.benchmarks.openai:benchmark`` (or ``BACKEND=vllm``...).

Concurrent requests on ``BENCHMARK_ROUTE``: ``chat`` (``POST /v1/chat/completions``, the
default), ``completions`` (``POST /v1/completions``) or ``embeddings`` (``POST /v1/embeddings``).
Each successful request counts the workload ``WORKLOAD=openai`` gives its payload (prompt tokens
+ ``max_tokens``), so ``max_perf`` is in the unit admission counts requests in. ``MODEL_NAME``
picks the model; unset, the first model of ``GET /v1/models`` is used.

A server whose context cannot hold the prompt and the answer refuses every request (400): where
the server says its context (vLLM's ``max_model_len`` in ``/v1/models``, or the "maximum context
length is N tokens" of that 400) the request is made smaller to fit, and said so; otherwise the
error names the knobs, ``BENCHMARK_PROMPT_WORDS`` and ``BENCHMARK_MAX_TOKENS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from vast_vespa.benchmark import BenchmarkError
from vast_vespa.benchmarks.rounds import concurrency, count, failure_text, measure, prompt, setting
from vast_vespa.workload import openai_workload

log = Logger()

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's request with a detailed, "
    "well-structured explanation."
)
ROUTES = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
# Fitting to a context: a share kept free for the chat template and the system prompt, and
# tokens per prompt word when the server has not said (random dictionary words split into
# about two tokens each with common tokenizers).
CONTEXT_SHARE = 0.9
CONTEXT_OVERHEAD = 48
TOKENS_PER_WORD = 2.0
_CONTEXT = re.compile(rb"maximum context length is (\d+)")
_PROMPT_TOKENS = re.compile(rb"\((\d+) in the (?:messages|prompt|input)")


@dataclass(frozen=True)
class Sizes:
    """The benchmark request's size: prompt words and answer tokens."""

    words: int
    max_tokens: int

    def knobs(self) -> str:
        return (
            f"lower BENCHMARK_PROMPT_WORDS (now {self.words}) and/or BENCHMARK_MAX_TOKENS "
            f"(now {self.max_tokens}), or give the server a larger context"
        )


class ContextTooSmall(RuntimeError):
    """The server refused a request for its size (a 400 about context or tokens)."""

    def __init__(self, text: str, sizes: Sizes, body: bytes) -> None:
        super().__init__(f"{text} ({sizes.knobs()})")
        limit = _CONTEXT.search(body)
        prompt_tokens = _PROMPT_TOKENS.search(body)
        self.limit = int(limit.group(1)) if limit else None
        self.prompt_tokens = int(prompt_tokens.group(1)) if prompt_tokens else None


def fit(sizes: Sizes, context: int, prompt_tokens: int | None = None) -> Sizes | None:
    """The largest sizes, at most ``sizes``, whose prompt and answer fit in ``context``
    tokens (``prompt_tokens``: what the server counted for ``sizes.words``), or None when even
    a small request cannot fit."""
    per_word = prompt_tokens / sizes.words if prompt_tokens else TOKENS_PER_WORD
    budget = int(context * CONTEXT_SHARE) - CONTEXT_OVERHEAD
    if sizes.words * per_word + sizes.max_tokens <= budget:
        return sizes
    max_tokens = min(sizes.max_tokens, budget // 2)
    words = min(sizes.words, int((budget - max_tokens) / per_word))
    if words < 1 or max_tokens < 1:
        return None
    return Sizes(words, max_tokens)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def pick_model(session: Any) -> tuple[str, int | None]:
    """MODEL_NAME, else the first model the server lists, else "model"; and that model's
    context length when the server says it (vLLM's ``max_model_len``)."""
    name = setting("MODEL_NAME", "")
    models: list[Any] = []
    response = await session.get("/v1/models")
    if response.status == 200:
        try:
            listed = (await response.json()).get("data")
        except Exception:  # not JSON, not an object: no model list
            listed = None
        models = [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
    chosen = next((m for m in models if m.get("id") == name), None) if name else None
    if not name and models and models[0].get("id"):
        chosen, name = models[0], str(models[0]["id"])
    context = _positive_int(chosen.get("max_model_len")) if chosen else None
    return name or "model", context


def route_path() -> str:
    name = setting("BENCHMARK_ROUTE", "chat").strip().lower()
    if name not in ROUTES:
        raise BenchmarkError(
            f"invalid BENCHMARK_ROUTE={name!r}: expected one of " + ", ".join(ROUTES)
        )
    return ROUTES[name]


def payload(path: str, model: str, sizes: Sizes) -> dict[str, Any]:
    """A benchmark request for ``path`` of ``sizes``."""
    text = prompt(sizes.words)
    if path == ROUTES["embeddings"]:
        return {"model": model, "input": text}
    body: dict[str, Any] = {"model": model, "max_tokens": sizes.max_tokens, "temperature": 0.7}
    if path == ROUTES["completions"]:
        body["prompt"] = text
    else:
        body["messages"] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": text},
        ]
    return body


async def benchmark(backend_url: str, session: Any) -> float:
    path = route_path()
    model, context = await pick_model(session)
    rounds = count("BENCHMARK_ROUNDS", 8)
    at_once = concurrency(session, 10)
    sizes = Sizes(count("BENCHMARK_PROMPT_WORDS", 250), count("BENCHMARK_MAX_TOKENS", 500))
    if context is not None:
        sizes = _fitted(sizes, context, None, "/v1/models")

    async def send(number: int) -> float:
        # The warm-up is full-size too: a request the server cannot hold shows at once.
        body = payload(path, model, sizes)
        response = await session.post(path, json=body)
        content = await response.read()  # read whole: an aiohttp session reuses the connection
        if response.status != 200:
            text = failure_text(response.status, content)
            if response.status == 400 and re.search(rb"(?i)context|token", content):
                raise ContextTooSmall(text, sizes, content)
            raise RuntimeError(text)
        return openai_workload(body)

    name = f"openai benchmark ({path})"
    try:
        return await measure(name, send, rounds, at_once)
    except BenchmarkError as e:
        refused = e.__cause__
        if not isinstance(refused, ContextTooSmall) or refused.limit is None:
            raise
        smaller = _fitted(sizes, refused.limit, refused.prompt_tokens, "the server's answer")
        if smaller == sizes:
            raise
        sizes = smaller
        return await measure(name, send, rounds, at_once)


def _fitted(sizes: Sizes, context: int, prompt_tokens: int | None, source: str) -> Sizes:
    """``sizes`` fitted to ``context``, logged when they change.

    @raise BenchmarkError: naming the knobs, when no request fits."""
    fitted = fit(sizes, context, prompt_tokens)
    if fitted is None:
        raise BenchmarkError(
            f"openai benchmark: the model's context ({context} tokens, from {source}) cannot "
            f"hold a benchmark request: {sizes.knobs()}"
        )
    if fitted != sizes:
        log.warn(
            "openai benchmark: the model's context is {context} tokens ({source}): "
            "benchmarking with BENCHMARK_PROMPT_WORDS={words} and BENCHMARK_MAX_TOKENS="
            "{max_tokens} instead of {old_words} and {old_max_tokens}",
            context=context,
            source=source,
            words=fitted.words,
            max_tokens=fitted.max_tokens,
            old_words=sizes.words,
            old_max_tokens=sizes.max_tokens,
        )
    return fitted
