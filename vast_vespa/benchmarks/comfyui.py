"""
ComfyUI behind its JSON API wrapper: ``BENCHMARK=vast_vespa.benchmarks.comfyui:benchmark`` (or
``BACKEND=comfyui``).

``POST /generate/sync`` with the workflow in ``COMFYUI_BENCHMARK_FILE`` (a JSON workflow), or
else a default text-to-image request (``BENCHMARK_TEST_WIDTH``/``_HEIGHT``/``_STEPS``). Each job
counts the workload ``WORKLOAD=comfyui`` gives it (100, "100 % of a standard job"); jobs run one
at a time by default.
"""

from __future__ import annotations

import json
import random
from typing import Any

from vast_vespa.benchmark import BenchmarkError
from vast_vespa.benchmarks.rounds import concurrency, count, failure_text, measure, setting
from vast_vespa.workload import comfyui_workload

PROMPTS = (
    "a lighthouse on a cliff at sunset, oil painting",
    "a red fox in fresh snow, wildlife photograph",
    "a futuristic city skyline at night, neon lights",
    "a bowl of ramen on a wooden table, studio lighting",
    "an astronaut riding a horse on the moon",
    "a watercolor map of an imaginary island",
    "a cozy library with a fireplace, warm light",
    "a mountain lake at dawn, mist over the water",
    "a steampunk airship above the clouds",
    "a close-up of a hummingbird drinking nectar",
)
REQUEST_TIMEOUT = 600.0


def workflow() -> Any:
    """The workflow JSON from COMFYUI_BENCHMARK_FILE, or None for the default request."""
    path = setting("COMFYUI_BENCHMARK_FILE", "")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"cannot read COMFYUI_BENCHMARK_FILE={path!r}: {e}") from None


async def benchmark(backend_url: str, session: Any) -> float:
    rounds = count("BENCHMARK_ROUNDS", 3)
    at_once = concurrency(session, 1)
    width = count("BENCHMARK_TEST_WIDTH", 512)
    height = count("BENCHMARK_TEST_HEIGHT", 512)
    steps = count("BENCHMARK_TEST_STEPS", 20)
    custom = workflow()

    async def send(number: int) -> float:
        job: dict[str, Any] = {"request_id": f"benchmark-{number + 1}"}
        if custom is not None:
            job["workflow_json"] = custom
        else:
            job["modifier"] = "Text2Image"
            job["modifications"] = {
                "prompt": random.choice(PROMPTS),
                "width": width,
                "height": height,
                "steps": steps,
                "seed": random.randrange(2**32),
            }
        body = {"input": job}
        response = await session.post("/generate/sync", json=body, timeout=REQUEST_TIMEOUT)
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(failure_text(response.status, body))
        answer = json.loads(body)
        if isinstance(answer, dict) and answer.get("status") in ("failed", "error"):
            raise RuntimeError(f"job failed: {body[:200].decode('utf-8', 'replace')}")
        return comfyui_workload(body)

    return await measure("comfyui benchmark", send, rounds, at_once)
