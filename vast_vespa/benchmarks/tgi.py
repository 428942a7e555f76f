"""
Hugging Face text-generation-inference, native API:
``BENCHMARK=vast_vespa.benchmarks.tgi:benchmark`` (or ``BACKEND=tgi``).

Concurrent ``POST /generate``; each successful request counts the workload ``WORKLOAD=tgi``
gives its payload (``inputs`` tokens + ``max_new_tokens``), the unit admission counts in.
"""

from __future__ import annotations

from typing import Any

from vast_vespa.benchmarks.rounds import concurrency, count, failure_text, measure, prompt
from vast_vespa.workload import tgi_workload


async def benchmark(backend_url: str, session: Any) -> float:
    rounds = count("BENCHMARK_ROUNDS", 8)
    at_once = concurrency(session, 10)
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
        content = await response.read()  # read whole: an aiohttp session reuses the connection
        if response.status != 200:
            raise RuntimeError(failure_text(response.status, content))
        return tgi_workload(payload)

    return await measure("tgi benchmark", send, rounds, at_once)
