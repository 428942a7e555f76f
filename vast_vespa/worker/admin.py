# -*- test-case-name: tests.test_admin -*-
"""
The admin listener (``--admin-listen``, default 127.0.0.1:9090): ``/metrics`` in Prometheus
text format, ``/healthz`` and ``/readyz``. Separate from the worker's listener, so it is
outside signature checks and admission and shadows no backend path.

Request metrics come from the WorkerResource observer hook (every outcome exactly once, O(1)
per request). They are plain numbers, made into Prometheus families only when scraped:
prometheus_client's labelled Counter and Histogram take a lock and check labels on every update,
which is too much work to do per request. Other parts
of the worker plug in gauges with :meth:`PrometheusMetrics.register_gauge` (a name, a help
text and a callable read at scrape time).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Iterable
from time import time
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from vast_vespa.headers import header_ops
from vast_vespa.outcome import JSON, Outcome, RelayResult, error_body, outcome_of
from vast_vespa.site import VespaSite
from vast_vespa.worker.state import Phase, WorkerState

METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS", b"CONNECT", b"TRACE"}
)
# Inference answers range from milliseconds (embeddings) to minutes (long generations). Floats
# all: each request's durations are placed among them, and a float compares faster with a float.
LATENCY_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
LAG_INTERVAL = 1.0  # seconds between reactor-lag samples


class _ReadAtScrape(Collector):
    """One gauge whose value comes from a callable when Prometheus scrapes."""

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self._name = name
        self._help = help
        self._read = read

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self._name, self._help, value=float(self._read()))


class _Histogram:
    """Observations counted per bucket (upper bounds ``bounds``, then +Inf), and their sum."""

    def __init__(self, name: str, help: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.help = help
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # "le": a bound takes its equal
        self.sum += value

    def family(self) -> Metric:
        cumulative = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), float(cumulative)))
        family = HistogramMetricFamily(self.name, self.help, buckets, self.sum)
        family.samples.append(Sample(self.name + "_created", {}, self.created))
        return family


class _Counter:
    """A counter without labels."""

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.value = 0
        self.created = time()

    def family(self) -> Metric:
        return CounterMetricFamily(self.name, self.help, self.value, created=self.created)


class _RequestMetrics(Collector):
    """Finished requests by (method, status class, outcome), latency and first-byte
    histograms, bytes in and out. Requests are counted under the values they come with (the
    method, a status divided by 100, the Outcome) and labelled only when scraped."""

    def __init__(self) -> None:
        # (method or b"other", status // 100, outcome): [count, created]
        self.requests: dict[tuple[bytes, int, Outcome], list[float]] = {}
        self.latency = _Histogram(
            "vespa_request_duration_seconds",
            "Time from request received to response finished.",
            LATENCY_BUCKETS,
        )
        self.first_byte = _Histogram(
            "vespa_time_to_first_byte_seconds",
            "Time from request received to the backend's response headers.",
            LATENCY_BUCKETS,
        )
        self.bytes_in = _Counter(
            "vespa_request_bytes", "Request body bytes received (as declared by Content-Length)."
        )
        self.bytes_out = _Counter(
            "vespa_response_bytes", "Response body bytes relayed from the backend."
        )

    def count(self, key: tuple[bytes, int, Outcome]) -> None:
        entry = self.requests.get(key)
        if entry is None:
            self.requests[key] = [1, time()]
        else:
            entry[0] += 1

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "vespa_requests",
            "Finished requests by method, status class and outcome.",
            labels=("method", "status", "outcome"),
        )
        for (method, status, outcome), (count, created) in list(self.requests.items()):
            labels = (method.decode("ascii"), f"{status}xx" if status else "none", outcome.value)
            requests.add_metric(labels, count, created=created)
        yield requests
        yield self.latency.family()
        yield self.first_byte.family()
        yield self.bytes_in.family()
        yield self.bytes_out.family()


class PrometheusMetrics:
    """The worker's Prometheus metrics, in a registry of its own (never the global one)."""

    def __init__(self, state: WorkerState, clock: IReactorTime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.clock = clock
        self._requests = _RequestMetrics()
        self.registry.register(self._requests)
        self.reactor_lag = 0.0
        self.register_gauge(
            "vespa_reactor_lag_seconds",
            "How late the last reactor-lag timer fired (a busy or blocked reactor).",
            lambda: self.reactor_lag,
        )
        self.register_gauge("vespa_loaded", "1 once the backend is loaded.", lambda: state.loaded)
        self.register_gauge(
            "vespa_backend_healthy",
            "1 if the last health probe passed.",
            lambda: state.backend_healthy,
        )
        self.register_gauge("vespa_draining", "1 while shutting down.", lambda: state.draining)
        self.register_gauge(
            "vespa_benchmark_max_perf",
            "Benchmarked throughput, workload units per second.",
            lambda: state.max_perf,
        )
        self.register_gauge(
            "vespa_errored", "1 if the worker reports an error.", lambda: bool(state.error_msg)
        )
        self._last_tick: float | None = None

    def register_gauge(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` at scrape time (e.g. queue depth, wait estimate)."""
        self.registry.register(_ReadAtScrape(name, help, read))

    def observe(self, request: Request, result: RelayResult, forward: object) -> None:
        """WorkerResource observer: count one finished request (a backend 5xx as errored,
        as in the reports)."""
        metrics = self._requests
        method = request.method
        metrics.count(
            (method if method in METHODS else b"other", result.status // 100, outcome_of(result))
        )
        metrics.latency.observe(max(result.finished - result.started, 0.0))
        if result.first_byte is not None:
            metrics.first_byte.observe(max(result.first_byte - result.started, 0.0))
        metrics.bytes_out.value += result.bytes_out
        length = header_ops(request).table(request.requestHeaders).get(b"Content-Length")
        if length and length[0].isdigit():  # chunked uploads are not counted
            metrics.bytes_in.value += int(length[0])

    def lag_sampler(self) -> TimerService:
        """A service measuring how late a LAG_INTERVAL timer fires."""
        service = TimerService(LAG_INTERVAL, self._sample_lag)
        service.clock = self.clock
        return service

    def _sample_lag(self) -> None:
        now = self.clock.seconds()
        if self._last_tick is not None:
            self.reactor_lag = max(now - self._last_tick - LAG_INTERVAL, 0.0)
        self._last_tick = now

    def render(self) -> bytes:
        return generate_latest(self.registry)


Answer = Callable[[], "tuple[int, bytes, bytes]"]  # status, content type, body
METRICS_TYPE = CONTENT_TYPE_LATEST.encode("ascii")


class _Answer(Resource):
    """GET (and HEAD) answered with a status, type and body computed at request time."""

    isLeaf = True

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self._answer = answer

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):  # JSON, not twisted.web's HTML 405 page
            request.setResponseCode(405)
            request.setHeader(b"content-type", JSON)
            request.setHeader(b"allow", b"GET, HEAD")
            return error_body("method not allowed", "the admin listener answers GET and HEAD")
        return super().render(request)  # type: ignore[no-any-return]

    def render_GET(self, request: Request) -> bytes:
        code, content_type, body = self._answer()
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        return body

    render_HEAD = render_GET


def _json(code: int, body: dict[str, Any]) -> tuple[int, bytes, bytes]:
    return code, JSON, json.dumps(body).encode("utf-8")


def health(metrics: PrometheusMetrics) -> Answer:
    """Answered at all: the process runs and its reactor turns."""
    return lambda: _json(200, {"status": "alive", "reactor_lag": metrics.reactor_lag})


def readiness(state: WorkerState, clock: IReactorTime) -> Answer:
    """Ready to take requests: loaded, backend healthy, not draining, not errored by the model
    log (503 otherwise); with where start-up stands."""

    def answer() -> tuple[int, bytes, bytes]:
        ready = (
            state.loaded
            and state.backend_healthy
            and not state.draining
            and state.phase is not Phase.ERRORED  # a MODEL_LOG error line: never again
        )
        body = {
            "ready": ready,
            "loaded": state.loaded,
            "backend_healthy": state.backend_healthy,
            "draining": state.draining,
            "error": state.error_msg,
            "phase": state.phase.value,
            "phase_seconds": round(max(0.0, clock.seconds() - state.phase_since), 3),
            "last_probe": state.last_probe,
            "detail": state.progress(clock.seconds()),
        }
        return _json(200 if ready else 503, body)

    return answer


class AdminResource(Resource):
    """``/metrics``, ``/healthz``, ``/readyz``; anything else is a JSON 404."""

    def __init__(self, metrics: PrometheusMetrics, state: WorkerState) -> None:
        super().__init__()
        self.putChild(b"metrics", _Answer(lambda: (200, METRICS_TYPE, metrics.render())))
        self.putChild(b"healthz", _Answer(health(metrics)))
        self.putChild(b"readyz", _Answer(readiness(state, metrics.clock)))
        self._missing = _Answer(
            lambda: _json(
                404, {"error": "not found", "detail": "try /metrics, /healthz or /readyz"}
            )
        )

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self._missing


class AdminSite(VespaSite):
    """The admin listener's site (its own name in the logs: "admin starting on 9090")."""

    def __init__(self, metrics: PrometheusMetrics, state: WorkerState) -> None:
        super().__init__(AdminResource(metrics, state), name="admin")
