"""The admin listener: /metrics (Prometheus), /healthz and /readyz, and the metrics seam; in
memory on the worker build_worker wires, and its traffic counts through real sockets."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from tests.fakes import FakeBackend
from tests.helpers import FAST_PATH, http_client, listen, start_worker
from tests.memory import Answer, Connection, raw_http
from vast_vespa.outcome import Outcome, RelayResult
from vast_vespa.settings import Settings
from vast_vespa.worker.admin import LAG_INTERVAL, PrometheusMetrics
from vast_vespa.worker.state import WorkerState
from vast_vespa.worker.tap import build_worker


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class WithoutListenerTests(TestCase):
    def test_nothing_measured_for_nobody(self) -> None:
        """Without the admin listener nobody can scrape /metrics: requests are not counted
        for it and the reactor lag is not sampled (with it, both are)."""
        for admin_listen, wanted in (("", False), ("tcp:0:interface=127.0.0.1", True)):
            settings = dataclasses.replace(
                Settings(), unsecured=True, listen=(), admin_listen=admin_listen
            )
            service = build_worker(settings, MemoryReactorClock())
            observers = service.site.resource._observers
            counted = any(
                isinstance(getattr(o, "__self__", None), PrometheusMetrics) for o in observers
            )
            self.assertEqual(counted, wanted, admin_listen)
            self.assertEqual("reactor-lag" in service.namedServices, wanted, admin_listen)
            self.assertEqual("admin" in service.namedServices, wanted, admin_listen)


class AdminSiteTests(SynchronousTestCase):
    """The admin site of a worker as build_worker wires it, on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        settings = dataclasses.replace(
            Settings(),
            unsecured=True,
            listen=(),
            admin_listen="tcp:0:interface=127.0.0.1",
            fast_path=FAST_PATH,
        )
        self.service = build_worker(settings, self.reactor)
        self.service.state.mark_loaded(0.0, 0.0)
        self.admin = self.service.getServiceNamed("admin").listening.factory

    def connect(self, site: Any) -> Connection:
        connection = Connection(site, 50000)
        self.addCleanup(connection.close)
        return connection

    def call(self, path: str, method: str = "GET") -> Answer:
        connection = self.connect(self.admin)
        connection.send(raw_http(method, path, b"x" if method == "POST" else b""))
        answer = connection.answer
        assert answer is not None, connection.received
        return answer

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        answer = self.call("/metrics")
        self.assertEqual(answer.code, 200)
        content_type = answer.header(b"content-type")
        assert content_type is not None
        self.assertTrue(content_type[0].startswith(b"text/"))
        return samples(answer.body.decode())

    def test_open_connections(self) -> None:
        """vespa_open_connections follows client connections as they open and close."""
        client = self.connect(self.service.site)
        self.assertEqual(self.scrape()[("vespa_open_connections", ())], 1)
        client.close()
        self.assertEqual(self.scrape()[("vespa_open_connections", ())], 0)

    def test_every_metric_is_documented(self) -> None:
        """Each metric family on /metrics has a row in docs/operations.md's metrics table."""
        families = text_string_to_metric_families(self.call("/metrics").body.decode())
        table = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
        names = [f.name for f in families if not f.name.endswith("_created")]  # client's own
        self.assertIn("vespa_pending_deletes", names)
        missing = [name for name in names if f"`{name}" not in table]
        self.assertEqual(missing, [])

    def test_health_and_readiness(self) -> None:
        """/healthz answers while the reactor runs; /readyz is 503 until the worker is loaded
        with a healthy backend, 200 then, and 503 again while draining."""
        answer = self.call("/healthz")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["status"], "alive")
        state = self.service.state
        state.loaded = False
        answer = self.call("/readyz")
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["ready"], False)
        state.mark_loaded(1.0, 12.5)
        answer = self.call("/readyz")
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["ready"], True)
        metrics = self.scrape()
        self.assertEqual(metrics[("vespa_benchmark_max_perf", ())], 12.5)
        self.assertEqual(metrics[("vespa_backend_healthy", ())], 1)
        state.backend_healthy = False
        answer = self.call("/readyz")
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["backend_healthy"], False)
        state.backend_healthy = True
        state.draining = True
        answer = self.call("/readyz")
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.json()["draining"], True)

    def test_unknown_admin_path(self) -> None:
        """Other admin paths are a JSON 404; the backend never sees admin traffic."""
        answer = self.call("/v1/models")
        self.assertEqual(answer.code, 404)
        self.assertEqual(answer.json()["error"], "not found")
        self.assertEqual(self.reactor.tcpClients, [])  # no connection to the backend

    def test_other_methods_are_a_json_405(self) -> None:
        """POST to an admin path is a JSON 405 naming the allowed methods, not an HTML page."""
        answer = self.call("/metrics", "POST")
        self.assertEqual(answer.code, 405)
        self.assertEqual(answer.header(b"allow"), [b"GET, HEAD"])
        self.assertEqual(set(answer.json()), {"error", "detail"})


class AdminListenerTests(TestCase):
    async def test_metrics_count_traffic(self) -> None:
        """Through real sockets, /metrics on the admin listener parses as Prometheus text and
        counts exactly the traffic just sent to the worker: by method, status class and
        outcome (a backend 5xx is errored), with latency/TTFB histograms and bytes in/out."""
        backend = FakeBackend(reactor)
        url, service = start_worker(
            self, listen(self, backend), admin_listen="tcp:0:interface=127.0.0.1"
        )
        admin = listen(self, service.getServiceNamed("admin").listening.factory)
        http = http_client(self)
        body = b'{"prompt": "hello"}'
        r1 = await http.post(url + "/v1/echo", data=body)
        out1 = await r1.content()
        r2 = await http.get(url + "/status/404")
        out2 = await r2.content()
        # (a registered method, as the edge accepts: llhttp's, the set Node.js serves)
        r3 = await http.request("PROPFIND", url + "/status/503")
        await r3.content()
        self.assertEqual(r3.code, 503)
        await service.in_flight.idle()
        response = await http.get(admin + "/metrics")
        self.assertEqual(response.code, 200)
        metrics = samples((await response.content()).decode())

        def requests(method: str, status: str, outcome: str = "served") -> float:
            labels = (("method", method), ("outcome", outcome), ("status", status))
            return metrics.get(("vespa_requests_total", labels), 0.0)

        self.assertEqual(requests("POST", "2xx"), 1)
        self.assertEqual(requests("GET", "4xx"), 1)
        # Unknown methods: bounded labels. A backend 5xx is errored, as in the reports.
        self.assertEqual(requests("other", "5xx", "errored"), 1)
        self.assertEqual(requests("other", "5xx"), 0)
        self.assertEqual(metrics[("vespa_request_duration_seconds_count", ())], 3)
        self.assertEqual(metrics[("vespa_time_to_first_byte_seconds_count", ())], 3)
        self.assertGreaterEqual(metrics[("vespa_response_bytes_total", ())], len(out1) + len(out2))
        self.assertEqual(metrics[("vespa_request_bytes_total", ())], len(body))
        self.assertEqual(metrics[("vespa_loaded", ())], 1)
        self.assertIn(("vespa_reactor_lag_seconds", ()), metrics)
        self.assertEqual(backend.seen[-1].method, b"PROPFIND")


class PrometheusMetricsTests(TestCase):
    def test_register_gauge(self) -> None:
        """A gauge registered with a callable shows the callable's value at each scrape, and
        each worker has its own registry (two workers never clash)."""
        depth = [3]
        metrics = PrometheusMetrics(WorkerState(), Clock())
        metrics.register_gauge("vespa_queue_depth", "Requests waiting.", lambda: depth[0])
        PrometheusMetrics(WorkerState(), Clock()).register_gauge(
            "vespa_queue_depth", "x", lambda: 0
        )
        self.assertEqual(samples(metrics.render().decode())[("vespa_queue_depth", ())], 3)
        depth[0] = 5
        self.assertEqual(samples(metrics.render().decode())[("vespa_queue_depth", ())], 5)

    def test_reactor_lag(self) -> None:
        """The lag sampler reports how late its timer fired; it stops with its service."""
        clock = Clock()
        metrics = PrometheusMetrics(WorkerState(), clock)
        sampler = metrics.lag_sampler()
        sampler.startService()
        clock.advance(LAG_INTERVAL)
        self.assertEqual(metrics.reactor_lag, 0.0)
        clock.advance(LAG_INTERVAL + 0.25)  # the reactor was blocked for 0.25 s
        self.assertAlmostEqual(metrics.reactor_lag, 0.25)
        sampler.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_histogram_buckets(self) -> None:
        """A duration on a bucket's bound counts in that bucket ("le"), buckets are cumulative,
        and a duration past the last bound counts only in +Inf; count, sum and _created are
        there as prometheus_client writes them."""
        metrics = PrometheusMetrics(WorkerState(), Clock())
        request = SimpleNamespace(method=b"GET", requestHeaders=Headers())
        for seconds in (0.005, 0.0051, 301.0):
            result = RelayResult(Outcome.SERVED, 200, 0, 0.0, None, seconds)
            metrics.observe(request, result, None)  # type: ignore[arg-type]
        page = samples(metrics.render().decode())

        def bucket(le: str) -> float:
            return page[("vespa_request_duration_seconds_bucket", (("le", le),))]

        self.assertEqual([bucket("0.005"), bucket("0.01"), bucket("300.0")], [1, 2, 2])
        self.assertEqual(bucket("+Inf"), 3)
        self.assertEqual(page[("vespa_request_duration_seconds_count", ())], 3)
        self.assertAlmostEqual(page[("vespa_request_duration_seconds_sum", ())], 301.0101)
        self.assertIn(("vespa_request_duration_seconds_created", ()), page)
        labels = (("method", "GET"), ("outcome", "served"), ("status", "2xx"))
        self.assertEqual(page[("vespa_requests_total", labels)], 3)
        self.assertIn(("vespa_requests_created", labels), page)

    def test_request_labels(self) -> None:
        """Requests are labelled when scraped: a request without a status (a client that
        left) as "none", and every made-up method as one "other", so labels stay bounded."""
        metrics = PrometheusMetrics(WorkerState(), Clock())
        ended = [(b"POST", Outcome.CANCELLED, 0), (b"MADEUP", Outcome.SERVED, 404)]
        ended.append((b"OTHERMADEUP", Outcome.SERVED, 404))
        for method, outcome, status in ended:
            request = SimpleNamespace(method=method, requestHeaders=Headers())
            result = RelayResult(outcome, status, 0, 0.0, None, 0.1)
            metrics.observe(request, result, None)  # type: ignore[arg-type]
        page = samples(metrics.render().decode())
        totals = {
            labels: value
            for (name, labels), value in page.items()
            if name == "vespa_requests_total"
        }
        self.assertEqual(
            totals,
            {
                (("method", "POST"), ("outcome", "cancelled"), ("status", "none")): 1,
                (("method", "other"), ("outcome", "served"), ("status", "4xx")): 2,
            },
        )
