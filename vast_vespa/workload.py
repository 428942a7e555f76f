# -*- test-case-name: tests.test_workload -*-
"""
A request's workload estimated from its payload, as the official worker does (PROTOCOL.md 5.1):
``WORKLOAD=openai|tgi|comfyui|cost|module:function``. The client proxy uses it for the
``/route/`` cost when the app sends no ``X-Serverless-Cost``; the worker for admission and its
reports when the request's ``cost`` is not signed (url-only signatures, unsecured mode). The
shipped benchmarks count each request's workload with the same functions, so ``max_perf`` and
the workload in flight share one unit.

An estimate never raises: a body that is not a JSON document (or is larger than
:data:`PARSE_LIMIT`), a payload of an unexpected shape, or a user function that fails or returns
a non-number counts :data:`DEFAULT_WORKLOAD`; every estimate is within [0, :data:`MAX_WORKLOAD`].
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import orjson
from twisted.logger import Logger

from vast_vespa.options import load_function

log = Logger()

# The official worker's workload when a route has no calculator, and this module's answer to
# anything it cannot read.
DEFAULT_WORKLOAD = 100.0
# Far above any real request (a million-token prompt plus its answer), low enough that one
# request cannot make the estimated wait of every other one infinite.
MAX_WORKLOAD = 10_000_000.0
# Larger bodies are not parsed to estimate them (a JSON parse takes several times the body's
# size in memory): they count DEFAULT_WORKLOAD.
PARSE_LIMIT = 8 << 20
# Prompt text is counted in tokens of about four characters, OpenAI's rule of thumb: unlike a
# word count, it also works for scripts written without spaces.
CHARS_PER_TOKEN = 4
MAX_CHOICES = 128  # the largest ``n`` counted (more is no real request)

BUILT_IN = ("openai", "tgi", "comfyui", "cost")
# The estimator each BACKEND implies when WORKLOAD is not set.
BACKEND_WORKLOADS = {
    "openai": "openai",
    "vllm": "openai",
    "sglang": "openai",
    "ollama": "openai",
    "llama.cpp": "openai",
    "llama-cpp-python": "openai",
    "tgi": "tgi",
    "comfyui": "comfyui",
}

Estimator = Callable[[Any], Any]  # the parsed JSON payload (None: not JSON) -> a number


def parse_workload_spec(text: str) -> str:
    """WORKLOAD: a built-in name, ``module.path:function``, or empty (the default)."""
    value = text.strip()
    if value and value.lower() in BUILT_IN:
        return value.lower()
    if value and not re.fullmatch(r"[\w.]+:[\w.]+", value):
        raise ValueError(
            "expected " + ", ".join(BUILT_IN) + " or module.path:function (a workload calculator)"
        )
    return value


def _count(value: Any) -> float | None:
    """``value`` as a token count: a finite number >= 0 (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _tokens(chars: int) -> int:
    return -(-chars // CHARS_PER_TOKEN)


MAX_NESTING = 3  # lists in lists, messages holding parts: deeper is no OpenAI shape


def text_tokens(value: Any, depth: int = 0) -> int:
    """Tokens of a prompt in any of the OpenAI shapes: a string, a list of strings, a list of
    token ids (one token each), a list of such lists, or chat messages whose ``content`` is a
    string or a list of parts with ``text``. Anything else (or nested deeper) counts nothing."""
    if isinstance(value, str):
        return _tokens(len(value))
    if not isinstance(value, list) or depth >= MAX_NESTING:
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += _tokens(len(item))
        elif isinstance(item, int):
            total += 1  # a token id
        elif isinstance(item, list):
            total += text_tokens(item, depth + 1)
        elif isinstance(item, dict):  # a chat message, or one part of a message's content
            text = item.get("text")
            if isinstance(text, str):
                total += _tokens(len(text))
            content = item.get("content")
            if isinstance(content, str | list):
                total += text_tokens(content, depth + 1)
    return total


def openai_workload(payload: Any) -> float:
    """Tokens requested: the prompt's (``messages``, ``prompt`` or ``input``) plus the
    answer's limit (``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``;
    DEFAULT_WORKLOAD when none is given) times ``n``."""
    if not isinstance(payload, dict):
        return DEFAULT_WORKLOAD
    prompt = sum(text_tokens(payload.get(name)) for name in ("messages", "prompt", "input"))
    answer = DEFAULT_WORKLOAD
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        limit = _count(payload.get(name))
        if limit is not None:
            answer = limit
            break
    choices = _count(payload.get("n"))
    times = min(max(int(choices), 1), MAX_CHOICES) if choices is not None else 1
    return min(prompt + answer * times, MAX_WORKLOAD)


def tgi_workload(payload: Any) -> float:
    """Tokens requested: ``inputs`` plus ``parameters.max_new_tokens`` (DEFAULT_WORKLOAD when
    not given)."""
    if not isinstance(payload, dict):
        return DEFAULT_WORKLOAD
    parameters = payload.get("parameters")
    limit = _count(parameters.get("max_new_tokens")) if isinstance(parameters, dict) else None
    answer = DEFAULT_WORKLOAD if limit is None else limit
    return min(text_tokens(payload.get("inputs")) + answer, MAX_WORKLOAD)


def comfyui_workload(payload: Any) -> float:
    """Every job counts DEFAULT_WORKLOAD ("100 % of a standard job", the official template's
    unit): a workflow's cost depends on its steps and sizes far more than on its node count."""
    return DEFAULT_WORKLOAD


BUILT_IN_ESTIMATORS: dict[str, Estimator] = {
    "openai": openai_workload,
    "tgi": tgi_workload,
    "comfyui": comfyui_workload,
}


def read_payload(body: bytes | None) -> Any:
    """The JSON document ``body`` holds, or None (empty, too large, or not JSON)."""
    if not body or len(body) > PARSE_LIMIT:
        return None
    try:
        return orjson.loads(body)
    except Exception:  # orjson.JSONDecodeError, and recursion limits: never the caller's problem
        return None


def load_estimator(spec: str) -> Estimator:
    """The function a WORKLOAD names (not ``cost``).

    @raise SettingsError: naming the spec when ``module.path:function`` cannot be loaded."""
    if spec in BUILT_IN_ESTIMATORS:
        return BUILT_IN_ESTIMATORS[spec]
    function: Estimator = load_function("WORKLOAD", spec)
    return function


class Workload:
    """The workload estimator WORKLOAD names; ``estimator`` is None for ``cost`` (the declared
    cost is the workload)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.estimator = None if spec == "cost" else load_estimator(spec)
        self._complained = False

    @property
    def uses_cost(self) -> bool:
        return self.estimator is None

    def of_body(self, body: bytes | None) -> float:
        """The workload of a request whose payload is ``body`` (JSON or not)."""
        return self.of_payload(read_payload(body))

    def of_payload(self, payload: Any) -> float:
        """The workload of a parsed payload, bounded; DEFAULT_WORKLOAD if the estimator fails."""
        if self.estimator is None:
            return DEFAULT_WORKLOAD
        try:
            value = _count(self.estimator(payload))
        except Exception as e:
            self._complain(f"raised {type(e).__name__}: {e}")
            return DEFAULT_WORKLOAD
        if value is None:
            self._complain("returned something other than a finite number >= 0")
            return DEFAULT_WORKLOAD
        return min(value, MAX_WORKLOAD)

    def _complain(self, what: str) -> None:
        """Said once per worker: a calculator that fails, fails for every request."""
        if not self._complained:
            self._complained = True
            log.warn(
                "WORKLOAD={spec} {what}; such requests count {default:g} (said once)",
                spec=self.spec,
                what=what,
                default=DEFAULT_WORKLOAD,
            )


def workload_spec(workload: str, backend: str) -> str:
    """The estimator to use: WORKLOAD, else the one BACKEND implies, else ``cost``."""
    return workload or BACKEND_WORKLOADS.get(backend, "cost")
