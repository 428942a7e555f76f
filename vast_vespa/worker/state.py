# -*- test-case-name: tests.test_lifecycle,tests.test_gate -*-
"""
The worker's readiness, shared by the lifecycle (which writes it), the request gate (which
refuses requests until the worker is loaded), the admin listener's /readyz and the reporter
(which sends it to the autoscaler).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    """Where start-up stands; the value is what people read."""

    WAITING_FOR_LOG = "waiting for the model log"
    WAITING_FOR_HEALTH = "waiting for health"
    BENCHMARKING = "benchmarking"
    WAITING_FOR_KEY = "waiting for the autoscaler public key"
    READY = "ready"
    ERRORED = "errored"


@dataclass
class WorkerState:
    """Where the worker is in its life. Plain data: no reactor, no I/O."""

    started: float = 0.0  # clock time the worker started (loadtime is measured from here)
    loaded: bool = False  # backend healthy, benchmarked, (secured) key in: requests admitted
    loadtime: float = 0.0  # seconds from start to loaded
    max_perf: float = 0.0  # benchmark result, workload units per second
    error_msg: str = ""  # non-empty: something is wrong, reported to the autoscaler
    backend_healthy: bool = False  # the last health probe's verdict
    draining: bool = False  # shutting down: finishing in-flight requests, admitting none
    phase: Phase = Phase.WAITING_FOR_HEALTH
    phase_since: float = 0.0  # clock time the phase began
    waiting_for: str = ""  # what the phase waits for, e.g. "/var/log/vllm.log does not exist yet"
    last_probe: str = ""  # the last health probe's answer, e.g. "HTTP 503"

    def enter(self, phase: Phase, now: float, waiting_for: str = "") -> bool:
        """Move to ``phase`` (its clock restarts only if it changes); True if it changed."""
        changed = phase is not self.phase
        if changed:
            self.phase, self.phase_since = phase, now
        self.waiting_for = waiting_for
        return changed

    def progress(self, now: float) -> str:
        """The phase, its elapsed time and the last probe's answer, in one line."""
        text = self.phase.value
        if self.waiting_for:
            text += f" ({self.waiting_for})"
        text += f" for {max(0.0, now - self.phase_since):.0f} s"
        if self.last_probe:
            text += f", last health probe: {self.last_probe}"
        return text

    def mark_loaded(self, now: float, max_perf: float) -> None:
        self.loaded = True
        self.loadtime = now - self.started
        self.max_perf = max_perf
        self.backend_healthy = True
        self.enter(Phase.READY, now)

    def mark_errored(self, message: str) -> None:
        self.error_msg = message

    def clear_error(self, message: str) -> bool:
        """Clear ``message`` once its cause is gone, unless another error replaced it since;
        True if it was cleared."""
        if not message or self.error_msg != message:
            return False
        self.error_msg = ""
        return True
