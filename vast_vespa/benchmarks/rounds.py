"""
What the shipped benchmarks share: their settings from environment variables, prompts from the
bundled word list, and the measurement itself: a warm-up request, then rounds of concurrent
requests; per round, throughput = workload of the successful requests / wall time of the
round; the result is the best round. If every request failed, that is an error (never 1.0).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import cache
from importlib.resources import files
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from vast_vespa.benchmark import BenchmarkError

log = Logger()

T = TypeVar("T")

# One request: its number (-1 for the warm-up) -> its workload; raises if it failed.
Send = Callable[[int], Awaitable[float]]


def setting(name: str, default: str) -> str:
    """A benchmark setting: PYWORKER_<NAME>, then <NAME>, then the default."""
    return os.environ.get("PYWORKER_" + name, os.environ.get(name, default))


def count(name: str, default: int) -> int:
    """A whole-number benchmark setting >= 1; a bad value is a clear error."""
    text = setting(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise BenchmarkError(f"invalid {name}={text!r}: expected a whole number >= 1")
    return value


@cache
def _words() -> tuple[str, ...]:
    return tuple(files("vast_vespa.benchmarks").joinpath("words.txt").read_text("utf-8").split())


def prompt(size: int, rng: random.Random | None = None) -> str:
    """``size`` random English words from the word list shipped with Vespa."""
    return " ".join((rng or random).choices(_words(), k=size))


def session_limit(session: Any) -> int:
    """How many requests ``session`` sends at once (0: no limit): the built-in session's
    ``concurrency_limit``, an aiohttp session's connector limit."""
    limit = getattr(session, "concurrency_limit", None)
    if limit is None:
        limit = getattr(getattr(session, "connector", None), "limit", 0)
    return limit if isinstance(limit, int) and limit > 0 else 0


def concurrency(session: Any, default: int) -> int:
    """BENCHMARK_CONCURRENCY, capped by what the worker's admission lets through at once
    (ALLOW_PARALLEL=false: 1; MAX_CONCURRENCY): more would measure a throughput the worker
    never delivers."""
    wanted = count("BENCHMARK_CONCURRENCY", default)
    limit = session_limit(session)
    if limit and wanted > limit:
        log.info(
            "benchmarking {limit} request(s) at a time, not BENCHMARK_CONCURRENCY={wanted}: "
            "the worker sends no more at once (ALLOW_PARALLEL, MAX_CONCURRENCY)",
            limit=limit,
            wanted=wanted,
        )
        return limit
    return wanted


def failure_text(status: int, body: bytes) -> str:
    return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


async def _attempt(send: Send, number: int) -> tuple[float, str]:
    try:
        return await send(number), ""
    except Exception as e:
        return 0.0, str(e) or type(e).__name__


def _together(attempts: list[Coroutine[Any, Any, T]]) -> Awaitable[list[T]]:
    """Run ``attempts`` at once on the loop that runs the benchmark. An aiohttp session's
    requests are asyncio's and must run in asyncio tasks (Twisted's coroutine driver cannot
    wait for an asyncio future); the built-in session's are Deferreds."""
    try:
        in_asyncio_task = asyncio.current_task() is not None
    except RuntimeError:  # no asyncio loop running
        in_asyncio_task = False
    if in_asyncio_task:
        return asyncio.gather(*attempts)
    return gatherResults([Deferred.fromCoroutine(attempt) for attempt in attempts])


async def measure(name: str, send: Send, rounds: int, concurrency: int) -> float:
    """Warm up with one request, then ``rounds`` rounds of ``concurrency`` simultaneous
    requests; return the best round's workload per second."""
    try:
        await send(-1)
    except Exception as e:  # the cause stays attached: a benchmark may act on it
        raise BenchmarkError(
            f"{name}: the warm-up request failed: {str(e) or type(e).__name__}"
        ) from e
    best, failed, last_error = 0.0, 0, ""
    for round_number in range(rounds):
        started = time.monotonic()
        attempts = [_attempt(send, round_number * concurrency + i) for i in range(concurrency)]
        results = await _together(attempts)
        elapsed = max(time.monotonic() - started, 1e-9)
        errors = [error for _, error in results if error]
        failed += len(errors)
        last_error = errors[-1] if errors else last_error
        throughput = sum(workload for workload, _ in results) / elapsed
        log.info(
            "{name} round {n}/{rounds}: {throughput:.1f} workload/s "
            "({failed} of {concurrency} requests failed) in {elapsed:.2f} s",
            name=name,
            n=round_number + 1,
            rounds=rounds,
            throughput=throughput,
            failed=len(errors),
            concurrency=concurrency,
            elapsed=elapsed,
        )
        best = max(best, throughput)
    if best <= 0:
        raise BenchmarkError(
            f"{name}: all {rounds * concurrency} benchmark requests failed (last: {last_error})"
        )
    if failed:
        log.warn(
            "{name}: {failed} benchmark requests failed (last: {error})",
            name=name,
            failed=failed,
            error=last_error,
        )
    return best
