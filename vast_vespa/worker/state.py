# -*- test-case-name: tests.test_lifecycle,tests.test_gate -*-
"""
The worker's readiness, shared by the lifecycle (which writes it), the request gate (which
refuses requests until the worker is loaded) and the reporter (which sends it to the autoscaler).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerState:
    """Where the worker is in its life. Plain data: no reactor, no I/O."""

    started: float = 0.0  # clock time the worker started (loadtime is measured from here)
    loaded: bool = False  # backend healthy and benchmarked: requests are admitted
    loadtime: float = 0.0  # seconds from start to loaded
    max_perf: float = 0.0  # benchmark result, workload units per second
    error_msg: str = ""  # non-empty: something is wrong, reported to the autoscaler
    backend_healthy: bool = False  # the last health probe's verdict
    draining: bool = False  # shutting down: finishing in-flight requests, admitting none

    def mark_loaded(self, now: float, max_perf: float) -> None:
        self.loaded = True
        self.loadtime = now - self.started
        self.max_perf = max_perf
        self.backend_healthy = True

    def mark_errored(self, message: str) -> None:
        self.error_msg = message
