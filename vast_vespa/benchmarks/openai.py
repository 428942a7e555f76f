"""
OpenAI-compatible servers (vLLM, SGLang, Ollama, llama.cpp, TGI's OpenAI API):
``BENCHMARK=vast_vespa.benchmarks.openai:benchmark`` (or ``BACKEND=vllm``...).

Concurrent ``POST /v1/chat/completions``; workload = ``usage.completion_tokens`` of each answer
(so ``max_perf`` is in generated tokens per second). ``MODEL_NAME`` picks the model; unset, the
first model of ``GET /v1/models`` is used. The defaults need about 1k tokens of context; a 400
that speaks of the context names the two settings that make the requests smaller.
"""

from __future__ import annotations

from typing import Any

from vast_vespa.benchmarks.rounds import count, failure_text, measure, prompt, setting

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the user's request with a detailed, "
    "well-structured explanation."
)


async def pick_model(session: Any) -> str:
    """MODEL_NAME, else the first model the server lists, else "model"."""
    name = setting("MODEL_NAME", "")
    if name:
        return name
    response = await session.get("/v1/models")
    if response.status == 200:
        models = (await response.json()).get("data") or []
        if models and models[0].get("id"):
            return str(models[0]["id"])
    return "model"


async def benchmark(backend_url: str, session: Any) -> float:
    model = await pick_model(session)
    rounds = count("BENCHMARK_ROUNDS", 8)
    concurrency = count("BENCHMARK_CONCURRENCY", 10)
    words = count("BENCHMARK_PROMPT_WORDS", 250)
    max_tokens = count("BENCHMARK_MAX_TOKENS", 500)

    async def send(number: int) -> float:
        warm_up = number < 0
        tokens = min(max_tokens, 100) if warm_up else max_tokens
        payload = {
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt(min(words, 50) if warm_up else words)},
            ],
            "max_tokens": tokens,
            "temperature": 0.7,
        }
        response = await session.post("/v1/chat/completions", json=payload)
        if response.status != 200:
            body = await response.content()
            text = failure_text(response.status, body)
            if response.status == 400 and b"context" in body.lower():
                text += (
                    f" (the prompt and max_tokens exceed the model's context: lower "
                    f"BENCHMARK_PROMPT_WORDS={words} or BENCHMARK_MAX_TOKENS={max_tokens})"
                )
            raise RuntimeError(text)
        usage = (await response.json()).get("usage") or {}
        return float(usage.get("completion_tokens", tokens))

    return await measure("openai benchmark", send, rounds, concurrency)
