# -*- test-case-name: tests.test_settings -*-
"""
What Vespa knows of each kind of backend (``--backend``) besides its benchmark: the path that
answers 200 once the model is ready, and the model-log lines that mean "loaded", "failed" and
"progress" (substrings, as the official workers match them). Explicit settings always win.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HEALTH_PATH = "/health"

# Servers without /health: each path answers 200 once the server serves, cheaply. Not
# /v1/models for llama-cpp-python: it takes the model lock and ends streams in progress.
HEALTH_PATHS = {
    "ollama": "/api/version",
    "comfyui": "/system_stats",
    "llama-cpp-python": "/openapi.json",
}


@dataclass(frozen=True)
class LogLines:
    """Substrings of model-log lines: ``load`` marks the model loaded, ``error`` a failure that
    ends this worker, ``info`` progress worth copying into the worker's log."""

    load: tuple[str, ...] = ()
    error: tuple[str, ...] = ()
    info: tuple[str, ...] = ()


# From the official Vast workers' patterns (vast-ai/pyworker workers/*), plus the out-of-memory
# line vLLM and TGI print when a model does not fit. "INFO exited: <name>" is the supervisor's
# line in Vast templates when the server process dies.
MODEL_LOG_LINES = {
    "vllm": LogLines(
        load=("Application startup complete.",),
        error=(
            "INFO exited: vllm",
            "RuntimeError: Engine",
            "CUDA out of memory",
            "Traceback (most recent call last):",
        ),
        info=("Starting to load model", "Loading weights took", "Model loading took"),
    ),
    "tgi": LogLines(
        load=('"message":"Connected","target":"text_generation_router',),
        error=(
            "Error: WebserverFailed",
            "Error: DownloadError",
            "Error: ShardCannotStart",
            "CUDA out of memory",
        ),
        info=('"message":"Download',),
    ),
    "ollama": LogLines(
        load=("Listening on",),
        error=("Error: listen tcp", "llama runner process has terminated", "error loading model"),
        info=('msg="downloading',),
    ),
    "comfyui": LogLines(
        # ComfyUI's own log, and the Vast API wrapper's (BACKENDS_READY_TIMEOUT contains
        # BACKENDS_READY: error lines are matched first).
        load=("To see the GUI go to: ", "BACKENDS_READY"),
        error=(
            "BACKENDS_READY_TIMEOUT",
            "BACKEND_UNRECOVERABLE",
            "Application startup failed",
            "MetadataIncompleteBuffer",
            "[ERROR] Provisioning Script failed",
        ),
        info=("Downloading",),
    ),
    "llama.cpp": LogLines(
        # "model loaded" comes after /health turns 200; "listening" comes while it is 503.
        load=("model loaded",),
        error=("INFO exited: llama", "error loading model", "failed to load model"),
    ),
    "llama-cpp-python": LogLines(
        load=("Uvicorn running on",),
        error=("Failed to load model", "Traceback (most recent call last):"),
    ),
}


def health_path(backend: str) -> str:
    """The health path of ``backend`` (``/health`` for those not listed)."""
    return HEALTH_PATHS.get(backend, DEFAULT_HEALTH_PATH)


def model_log_lines(backend: str) -> LogLines:
    """The model-log patterns shipped for ``backend`` (none for those not listed)."""
    return MODEL_LOG_LINES.get(backend, LogLines())
