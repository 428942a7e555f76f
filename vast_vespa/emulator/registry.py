# -*- test-case-name: tests.test_emulator_registry -*-
"""
The emulator's state and decisions: configured endpoints and keys, workers learned from their
``/worker_status/`` reports, routing with signed replies (PROTOCOL.md 8.1), and the bookkeeping
of routed requests closed by ``/delete_requests/``. Pure: time comes from a ``now`` callable.
"""

from __future__ import annotations

import hmac
import math
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from vast_vespa import signing
from vast_vespa.emulator.checks import (
    delete_problems,
    describe,
    finished_requests,
    number,
    report_problems,
    whole,
)
from vast_vespa.settings import SIGNATURE_SHAPES

DEFAULT_COST = 100.0  # PROTOCOL.md 8.1: the cost /route/ assumes when the client sends none
RECENT = 50  # routed requests and refused reports kept for the status page
OPEN_LIMIT = 10_000  # routed requests awaiting /delete_requests/ kept at most


class RouteError(Exception):
    """A ``/route/`` call refused: ``code`` (401 or 400) and a message for the JSON body."""

    def __init__(self, code: int, error: str, detail: str = "") -> None:
        super().__init__(error)
        self.code = code
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class Endpoint:
    """An endpoint of the emulated account. ``mtoken`` empty: any worker may serve it."""

    name: str
    api_key: str
    id: int
    mtoken: str = ""


@dataclass
class WorkerRecord:
    """A worker as the emulator knows it from its last conforming report."""

    id: int
    url: str
    mtoken: str
    first_seen: float
    last_report: float
    version: str = ""
    loadtime: float = 0.0  # the last non-zero loadtime reported ([CL] sends it once)
    loaded_at: float | None = None  # when max_perf first became > 0
    max_perf: float = 0.0
    cur_load: float = 0.0
    new_load: float = 0.0
    rej_load: float = 0.0
    cur_perf: float = 0.0
    error_msg: str = ""
    num_requests_working: int = 0
    working_request_idxs: list[int] = field(default_factory=list)
    reports: int = 0
    routed: int = 0
    routed_since_report: float = 0.0  # cost routed here that its last report could not count
    last_reqnum: int = 0

    def state(self, now: float, stale_after: float) -> str:
        """errored, silent (no report for ``stale_after`` s), ready, or loading."""
        if self.error_msg:
            return "errored"
        if now - self.last_report > stale_after:
            return "silent"
        return "ready" if self.max_perf > 0 else "loading"

    def estimated_wait(self) -> float:
        """Seconds of queued work: load at the last report plus what was routed since."""
        return (self.cur_load + self.routed_since_report) / self.max_perf


@dataclass
class RoutedRequest:
    """One ``request_idx``: waiting for a worker, routed, then finished (success or failed)."""

    request_idx: int
    endpoint: str
    cost: float
    created: float
    state: str = "waiting"
    worker_id: int | None = None
    reqnum: int | None = None
    routed_at: float | None = None
    finished_at: float | None = None


@dataclass
class RefusedReport:
    path: str
    at: float
    worker_id: Any
    problems: list[str]


def same_secret(given: object, expected: str | None) -> bool:
    """Whether ``given`` is the secret ``expected``, in constant time (no timing oracle)."""
    if not isinstance(given, str) or expected is None:
        return given is None and expected is None
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _bearer(value: str | None) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` value (or of a bare key)."""
    if not value:
        return None
    if value.lower().startswith("bearer "):
        value = value[7:]
    return value.strip() or None


class Registry:
    """Endpoints, workers and routed requests of one emulated autoscaler."""

    def __init__(
        self,
        key: rsa.RSAPrivateKey,
        endpoints: Iterable[Endpoint],
        shape: str,
        account_key: str,
        now: Callable[[], float],
        stale_after: float = 30.0,
    ) -> None:
        if shape not in SIGNATURE_SHAPES:
            raise ValueError(f"unknown signature shape {shape!r}")
        self.key = key
        self.public_pem = signing.public_pem(key)
        self.endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self.shape = shape
        self.account_key = account_key
        self.stale_after = stale_after
        self._now = now
        self.started = now()
        self.workers: dict[int, WorkerRecord] = {}
        self.open: dict[int, RoutedRequest] = {}  # request_idx -> waiting or routed request
        self.recent: deque[RoutedRequest] = deque(maxlen=RECENT)
        self.refused: deque[RefusedReport] = deque(maxlen=RECENT)
        self.unknown_finished = 0  # request_idx values reported finished that were never routed
        self._last_request_idx = 0

    # Keys

    def endpoint_for_key(self, api_key: str | None) -> Endpoint | None:
        return next((e for e in self.endpoints.values() if same_secret(api_key, e.api_key)), None)

    def is_account_key(self, value: str | None) -> bool:
        return same_secret(_bearer(value), self.account_key)

    # Worker reports

    def report(self, body: Any) -> list[str]:
        """Record a ``/worker_status/`` report; returns its problems (then nothing is recorded)."""
        problems = report_problems(body)
        worker = self.workers.get(body["id"]) if not problems else None
        if worker is not None and not same_secret(body["mtoken"], worker.mtoken):
            problems.append(f"mtoken: differs from the one worker {worker.id} reported before")
        if problems:
            self._refuse("/worker_status/", body, "id", problems)
            return problems
        now = self._now()
        if worker is None:
            worker = WorkerRecord(body["id"], body["url"], body["mtoken"], now, now)
            self.workers[worker.id] = worker
        worker.url = body["url"]
        worker.last_report = now
        worker.version = body["version"]
        if body["loadtime"] > 0:
            worker.loadtime = float(body["loadtime"])
        worker.max_perf = float(body["max_perf"])
        if worker.max_perf > 0 and worker.loaded_at is None:
            worker.loaded_at = now
        for name in ("cur_load", "new_load", "rej_load", "cur_perf"):
            setattr(worker, name, float(body[name]))
        worker.error_msg = body["error_msg"]
        worker.num_requests_working = int(body["num_requests_working"])
        worker.working_request_idxs = list(body["working_request_idxs"])
        worker.reports += 1
        worker.routed_since_report = 0.0
        return []

    def delete_requests(self, body: Any) -> list[str]:
        """Close the routed requests a ``/delete_requests/`` body names; returns its problems."""
        problems = delete_problems(body)
        if not problems:
            worker = self.workers.get(body["worker_id"])
            if worker is not None and not same_secret(body["mtoken"], worker.mtoken):
                problems.append(
                    f"mtoken: differs from the one worker {worker.id} sends in /worker_status/"
                )
        if problems:
            self._refuse("/delete_requests/", body, "worker_id", problems)
            return problems
        now = self._now()
        for request_idx, success in finished_requests(body):
            request = self.open.pop(request_idx, None)
            if request is None:
                self.unknown_finished += 1
                continue
            request.state = "success" if success else "failed"
            request.finished_at = now
        return []

    def _refuse(self, path: str, body: Any, id_field: str, problems: list[str]) -> None:
        worker_id = body.get(id_field) if isinstance(body, dict) else None
        self.refused.append(RefusedReport(path, self._now(), worker_id, problems))

    # Routing

    def route(self, api_key: str | None, body: Any) -> dict[str, Any]:
        """
        The ``/route/`` reply for ``body`` sent with ``api_key`` (the ``Authorization`` value or
        the ``api_key`` parameter): a signed reply naming a worker, or the waiting form without
        ``url`` whose ``request_idx`` the client re-sends. Raises :class:`RouteError`.
        """
        endpoint, cost, replay_idx = self._route_request(_bearer(api_key), body)
        # A replayed request_idx (cold-start polling, or a re-route after the worker could not
        # be reached) keeps its number and avoids the worker it was last sent to.
        request = self.open.get(replay_idx) if replay_idx else None
        if request is None or request.endpoint != endpoint.name:
            self._last_request_idx += 1
            request = RoutedRequest(self._last_request_idx, endpoint.name, cost, self._now())
            self._remember(request)
        request.cost = cost
        worker = self.choose_worker(endpoint, avoid=request.worker_id)
        if worker is None:
            return {
                "endpoint": endpoint.name,
                "status": self._waiting_status(endpoint),
                "request_idx": request.request_idx,
                "__request_id": str(uuid.uuid4()),
            }
        worker.last_reqnum += 1
        worker.routed += 1
        worker.routed_since_report += cost
        request.state, request.worker_id = "routed", worker.id
        request.reqnum, request.routed_at = worker.last_reqnum, self._now()
        reply: dict[str, Any] = {
            "cost": cost,
            "endpoint": endpoint.name,
            "reqnum": worker.last_reqnum,
            "request_idx": request.request_idx,
            "url": worker.url,
        }
        reply["signature"] = signing.sign(self.key, reply, self.shape)
        reply["__request_id"] = str(uuid.uuid4())
        return reply

    def _route_request(self, api_key: str | None, body: Any) -> tuple[Endpoint, float, int]:
        if not api_key:
            raise RouteError(
                401, "missing endpoint API key", "send Authorization: Bearer <endpoint api_key>"
            )
        endpoint = self.endpoint_for_key(api_key)
        if endpoint is None:
            detail = "no configured endpoint has this API key"
            if same_secret(api_key, self.account_key):
                detail = "this is the account key; /route/ takes the endpoint's api_key"
            raise RouteError(401, "invalid endpoint API key", detail)
        if not isinstance(body, dict):
            raise RouteError(
                400, "invalid route request", f"expected a JSON object, got {describe(body)}"
            )
        name = body.get("endpoint")
        if not isinstance(name, str) or not name:
            raise RouteError(400, "invalid route request", "endpoint: expected the endpoint name")
        if name != endpoint.name:
            raise RouteError(
                401,
                "invalid endpoint API key",
                f"this key belongs to another endpoint, not {name!r}",
            )
        cost = body.get("cost", DEFAULT_COST)
        if number(0)(cost) is not None:
            raise RouteError(
                400, "invalid route request", f"cost: expected a number >= 0, got {describe(cost)}"
            )
        replay_idx = body.get("request_idx", 0)
        if whole(strict=True)(replay_idx) is not None:
            raise RouteError(
                400,
                "invalid route request",
                f"request_idx: expected an integer >= 0, got {describe(replay_idx)}",
            )
        return endpoint, float(cost), replay_idx

    def _remember(self, request: RoutedRequest) -> None:
        self.open[request.request_idx] = request
        self.recent.append(request)
        while len(self.open) > OPEN_LIMIT:
            del self.open[next(iter(self.open))]

    def choose_worker(self, endpoint: Endpoint, avoid: int | None = None) -> WorkerRecord | None:
        """
        The ready worker of ``endpoint`` with the lowest estimated wait (ties: fewest routed),
        other than ``avoid`` unless it is the only one.
        """
        now = self._now()
        ready = [
            worker
            for worker in self.workers_of(endpoint)
            if worker.state(now, self.stale_after) == "ready"
        ]
        if not ready:
            return None
        ready = [worker for worker in ready if worker.id != avoid] or ready
        return min(ready, key=lambda w: (w.estimated_wait(), w.routed, w.id))

    def workers_of(self, endpoint: Endpoint) -> list[WorkerRecord]:
        return [
            w
            for w in self.workers.values()
            if not endpoint.mtoken or same_secret(w.mtoken, endpoint.mtoken)
        ]

    def _waiting_status(self, endpoint: Endpoint) -> dict[str, Any]:
        now = self._now()
        counts: dict[str, Any] = dict.fromkeys(("ready", "loading", "errored", "silent"), 0)
        for worker in self.workers_of(endpoint):
            counts[worker.state(now, self.stale_after)] += 1
        counts["detail"] = (
            "no worker has reported yet" if not any(counts.values()) else "no worker is ready yet"
        ) + "; call /route/ again with this request_idx"
        return counts

    # Views for the status page and the listing APIs

    def worker_view(self, worker: WorkerRecord) -> dict[str, Any]:
        now = self._now()
        wait = worker.estimated_wait() if worker.max_perf > 0 else None
        return {
            "id": worker.id,
            "url": worker.url,
            "state": worker.state(now, self.stale_after),
            "version": worker.version,
            "cur_load": worker.cur_load,
            "max_perf": worker.max_perf,
            "estimated_wait": None if wait is None or math.isinf(wait) else round(wait, 3),
            "loadtime": worker.loadtime,
            "error_msg": worker.error_msg,
            "num_requests_working": worker.num_requests_working,
            "routed": worker.routed,
            "reports": worker.reports,
            "last_report_age": round(now - worker.last_report, 3),
        }

    def status(self) -> dict[str, Any]:
        """Everything the status page shows, as JSON-ready data (no keys, no mtokens)."""
        now = self._now()
        return {
            "about": "Vespa autoscaler emulator: a development and test tool, never a "
            "production router",
            "shape": self.shape,
            "uptime": round(now - self.started, 3),
            "endpoints": [
                {
                    "name": e.name,
                    "id": e.id,
                    "workers": [w.id for w in self.workers_of(e)],
                }
                for e in self.endpoints.values()
            ],
            "workers": [self.worker_view(w) for w in self.workers.values()],
            "requests": [
                {
                    "request_idx": r.request_idx,
                    "endpoint": r.endpoint,
                    "cost": r.cost,
                    "state": r.state,
                    "worker_id": r.worker_id,
                    "reqnum": r.reqnum,
                    "age": round(now - r.created, 3),
                }
                for r in reversed(self.recent)
            ],
            "unknown_finished": self.unknown_finished,
            "refused_reports": [
                {
                    "path": r.path,
                    "worker_id": r.worker_id,
                    "age": round(now - r.at, 3),
                    "problems": r.problems,
                }
                for r in reversed(self.refused)
            ],
        }

    def endpoint_jobs(self) -> list[dict[str, Any]]:
        """``/api/v0/endptjobs/`` results (PROTOCOL.md 8.5): what clients read keys from."""
        return [
            {
                "id": e.id,
                "endpoint_name": e.name,
                "api_key": e.api_key,
                "user_id": 1,
                "created_at": self.started,
                "cold_workers": 0,
                "max_workers": len(self.workers_of(e)),
                "min_load": 0.0,
                "min_cold_load": 0.0,
                "target_util": 0.9,
                "cold_mult": 1.0,
                "max_queue_time": 30.0,
                "target_queue_time": 10.0,
                "endpoint_state": "active",
                "inactivity_timeout": None,
                "auto_delete_in_seconds": None,
                "auto_delete_due_24h": False,
            }
            for e in self.endpoints.values()
        ]

    def endpoint_workers(self, endpoint_id: int) -> list[dict[str, Any]] | None:
        """``/get_endpoint_workers/`` items (PROTOCOL.md 8.5), or None for an unknown id."""
        endpoint = next((e for e in self.endpoints.values() if e.id == endpoint_id), None)
        if endpoint is None:
            return None
        now = self._now()
        return [
            {
                "id": w.id,
                "status": w.state(now, self.stale_after),
                "cur_load": w.cur_load,
                "new_load": w.new_load,
                "cur_load_rolling_avg": w.cur_load,
                "cur_perf": w.cur_perf,
                "perf": w.max_perf,
                "measured_perf": w.max_perf,
                "dlperf": 0.0,
                "reliability": 1.0,
                "reqs_working": w.num_requests_working,
                "disk_usage": 0.0,
                "loaded_at": w.loaded_at or 0.0,  # the SDK reads it with float()
                "started_at": w.first_seen,
            }
            for w in self.workers_of(endpoint)
        ]
