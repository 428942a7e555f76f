"""
Hugging Face text-generation-inference, native API:
``BENCHMARK=vast_vespa.benchmarks.tgi:benchmark`` (or ``BACKEND=tgi``).

Concurrent ``POST /generate``; workload = ``max_new_tokens`` of each successful request (the
unit TGI request costs are usually given in).
"""

from __future__ import annotations

from typing import Any

from vast_vespa.benchmarks.rounds import count, failure_text, measure, prompt


async def benchmark(backend_url: str, session: Any) -> float:
    rounds = count("BENCHMARK_ROUNDS", 8)
    concurrency = count("BENCHMARK_CONCURRENCY", 10)
    words = count("BENCHMARK_PROMPT_WORDS", 250)
    max_new_tokens = count("BENCHMARK_MAX_TOKENS", 256)

    async def send(number: int) -> float:
        payload = {
            "inputs": prompt(words),
            "parameters": {
                "max_new_tokens": max_new_tokens,
                "temperature": 0.7,
                "return_full_text": False,
            },
        }
        response = await session.post("/generate", json=payload)
        if response.status != 200:
            raise RuntimeError(failure_text(response.status, await response.content()))
        return float(max_new_tokens)

    return await measure("tgi benchmark", send, rounds, concurrency)
