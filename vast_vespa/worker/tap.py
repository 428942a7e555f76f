# -*- test-case-name: tests.test_plugin,tests.test_admin -*-
"""twistd options and makeService for the worker: the one place its objects are wired."""

from __future__ import annotations

from typing import Any, cast

import psutil
from treq.client import HTTPClient
from twisted.application.service import IService, IServiceCollection
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.web.client import Agent
from twisted.web.server import Site

from vast_vespa import __version__
from vast_vespa.cli import SettingsOptions, flag_parameters, installed_reactor
from vast_vespa.logs import log_access, use_text_log
from vast_vespa.net.client import backend_agent, backend_pool, quiet_pool
from vast_vespa.net.guard import choose_fast_path
from vast_vespa.net.listen import listen_service
from vast_vespa.net.server import Limits
from vast_vespa.notify import SystemdNotifier, SystemdService
from vast_vespa.options import SettingsError, declaration
from vast_vespa.outcome import Observer
from vast_vespa.runtime import tune_once_running
from vast_vespa.settings import Settings, check_protocol, load_settings
from vast_vespa.site import VespaSite
from vast_vespa.worker import admin
from vast_vespa.worker.admission import Admission
from vast_vespa.worker.autoscaler import AutoscalerClient, PublicKeyStore
from vast_vespa.worker.gate import SignedGate
from vast_vespa.worker.lifecycle import ReadinessGate, build_lifecycle
from vast_vespa.worker.metrics import WorkerMetrics
from vast_vespa.worker.reporter import MetricsReporter
from vast_vespa.worker.resource import WorkerResource
from vast_vespa.worker.service import DrainHook, WorkerService
from vast_vespa.worker.sessions import SessionEndResource, Sessions, backend_poster
from vast_vespa.worker.state import WorkerState
from vast_vespa.workload import Workload


class Options(SettingsOptions):
    """``twistd vespa`` options: one flag per setting (see vast_vespa.settings)."""

    synopsis = "[options]"
    longdesc = (
        "Run a Vespa worker in front of an HTTP inference backend. Every flag also reads an "
        "environment variable (shown in brackets) and its PYWORKER_ alias; flags win. A "
        "true/false flag given alone means true (--unsecured is --unsecured=true)."
    )
    settings_class = Settings
    optParameters = flag_parameters(Settings)

    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings()

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self.flags())
        except SettingsError as e:
            # One clear line and a non-zero exit, before anything listens.
            raise SystemExit(f"vespa: {e}") from None


def makeService(options: Options, reactor: Any = None) -> IService:
    """twistd's entry point: the worker described by the parsed options."""
    try:
        reactor = installed_reactor(reactor)
        tune_once_running(reactor, choose_fast_path(options.settings.fast_path, reactor))
        return use_text_log(build_worker(options.settings, reactor), options)
    except SettingsError as e:
        raise SystemExit(f"vespa: {e}") from None


def build_worker(settings: Settings, reactor: Any) -> WorkerService:
    """Wire the worker's objects from its settings (tests call this directly)."""
    check_protocol(settings)
    fast = choose_fast_path(settings.fast_path, reactor)
    clock = cast(IReactorTime, reactor)
    pool = backend_pool(reactor)
    agent = backend_agent(
        reactor,
        pool,
        settings.backend_connect_timeout or None,
        fast_path=fast,
        max_head_size=settings.backend_max_header_size,
        max_headers=settings.backend_max_headers,
    )
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
    state = WorkerState(started=clock.seconds())
    metrics = admin.PrometheusMetrics(state, clock)
    observers: tuple[Observer, ...] = (log_access,) if settings.access_log else ()
    if settings.admin_listen:
        observers += (metrics.observe,)  # nobody could scrape them without the listener
    vast = settings.vast
    load = WorkerMetrics(clock, state, vast, __version__, _disk_used)
    sessions = None
    if settings.max_sessions > 0:
        sessions = Sessions(
            clock,
            load,
            settings.max_sessions,
            settings.session_ttl,
            settings.session_max_ttl,
            backend_poster(agent, settings.backend_url),
        )
    concurrency = settings.max_concurrency if settings.allow_parallel else 1
    admission = Admission(
        (lambda: load.load - sessions.load) if sessions is not None else (lambda: load.load),
        lambda: state.max_perf,
        settings.max_wait_time,
        concurrency,
    )
    _register_load_metrics(metrics, load, admission)
    children: list[IService] = []
    if sessions is not None:
        children.append(sessions)
        metrics.register_gauge(
            "vespa_sessions_open", "Sessions open on this worker.", lambda: len(sessions.open)
        )
    client = None
    control_pool = None
    if vast.report_addrs:
        control_pool = quiet_pool(reactor, fast_path=fast)
        client = AutoscalerClient(
            HTTPClient(Agent(reactor, pool=control_pool)),
            clock,
            vast.report_addrs,
            vast.master_token,
            vast.container_id,
            delete_format=settings.delete_requests_format,
        )
        children.append(MetricsReporter(clock, load, client, settings.report_interval))
    keys = None
    if not settings.unsecured:
        assert client is not None  # check_protocol: REPORT_ADDR is set
        keys = PublicKeyStore(clock, client)
        children.append(keys)
    gate = SignedGate(
        keys,
        admission,
        load,
        cooperator,
        settings.signature_shapes,
        settings.default_cost,
        settings.blocked_paths,
        vast.public_url if settings.verify_url else None,
        settings.replay_window,
        Workload(settings.workload_spec),
        sessions,
    )
    resource = WorkerResource(
        ReadinessGate(gate, state, clock),
        agent,
        clock,
        settings.backend_url,
        settings.request_timeout,
        observers,
        settings.backend_first_byte_timeout,
        settings.backend_stall_timeout,
        vast.public_url,
    )
    site = VespaSite(
        resource, limits_from(settings), name="worker", fast_path=fast, reactor=reactor
    )
    if keys is not None:
        site.early_verdict = gate  # auth refused from the head, before the body is read
    metrics.register_gauge(
        "vespa_open_connections",
        "Client connections open on the worker listeners.",
        lambda: site.open_connections,
    )
    service = WorkerService(clock, pool, site, state, resource.in_flight, settings.drain_timeout)
    service.metrics = load
    service.sessions = sessions
    service.control_pool = control_pool
    notifier = SystemdNotifier(settings.systemd.notify_socket)
    lifecycle = build_lifecycle(settings, reactor, state, fast, notifier.status, keys)
    lifecycle.setServiceParent(service)
    for child in children:
        child.setServiceParent(cast(IServiceCollection, service))
        if isinstance(child, MetricsReporter):
            service.reporter = child
            # The autoscaler learns of the drain at once.
            service.add_drain_hook(cast(DrainHook, child.send_now))
    for index, description in enumerate(settings.listen):
        listener = listen_service(
            description, site, reactor, "vespa", _naming("listen"), fast_path=fast
        )
        listener.setName(f"listen-{index}")
        listener.setServiceParent(service)
    if sessions is not None and settings.session_listen:
        listener = listen_service(
            settings.session_listen,
            Site(SessionEndResource(sessions)),
            reactor,
            "vespa",
            _naming("session_listen"),
            fast_path=False,
        )
        listener.setName("session-end")
        listener.setServiceParent(service)
    if settings.admin_listen:
        sampler = metrics.lag_sampler()
        sampler.setName("reactor-lag")
        sampler.setServiceParent(service)
        admin_site = admin.AdminSite(metrics, state)
        listener = listen_service(
            settings.admin_listen,
            admin_site,
            reactor,
            "vespa",
            _naming("admin_listen"),
            fast_path=False,
        )
        listener.setName("admin")
        listener.setServiceParent(service)
    systemd = SystemdService(notifier, clock, settings.systemd.watchdog_usec)
    systemd.setName("systemd")
    systemd.setServiceParent(service)
    lifecycle.when_loaded().addCallback(lambda _: notifier.ready())
    lifecycle.when_failed().addCallback(notifier.failed)
    service.add_drain_hook(notifier.stopping)
    return service


def _naming(name: str) -> str:
    """How to change a worker option, for messages: ``--listen / LISTEN``."""
    return declaration(Settings, name).naming


def limits_from(settings: Settings) -> Limits:
    """The client limits configured in ``settings``."""
    return Limits(
        settings.max_body_size,
        settings.max_header_size,
        settings.max_headers,
        settings.head_timeout,
        float(settings.min_body_rate),
        settings.max_connections,
        per_address_cap(settings.max_connections, settings.max_connections_per_address),
    )


def per_address_cap(max_connections: int, per_address: int | None) -> int:
    """MAX_CONNECTIONS_PER_ADDRESS, default half of MAX_CONNECTIONS (1024 of 2048): one
    address is often many users (a vespa-client, a NAT, a load test holding 1,000 streams), and
    whatever one address holds, the other half of the slots stays for everyone else (its idle
    connections are closed as needed anyway)."""
    if per_address is not None:
        return per_address
    return max(1, max_connections // 2) if max_connections else 0


def _register_load_metrics(
    metrics: admin.PrometheusMetrics, load: WorkerMetrics, admission: Admission
) -> None:
    """The serverless figures on /metrics, read at scrape time."""
    metrics.register_gauge(
        "vespa_workload_in_flight",
        "Workload of admitted requests, queued ones included (cur_load).",
        lambda: load.load,
    )
    metrics.register_gauge(
        "vespa_requests_queued",
        "Requests waiting for a concurrency slot.",
        lambda: admission.queued,
    )
    metrics.register_gauge(
        "vespa_estimated_wait_seconds",
        "Workload in flight over max_perf: what MAX_WAIT_TIME is compared with.",
        admission.estimated_wait,
    )
    metrics.register_gauge(
        "vespa_pending_deletes",
        "Finished request_idx not yet delivered to /delete_requests/.",
        lambda: len(load.finished),
    )


def _disk_used() -> int:
    """Bytes used on / (additional_disk_usage in reports); 0 if it cannot be read, so a
    strange filesystem never stops the reports."""
    try:
        return int(psutil.disk_usage("/").used)
    except OSError:
        return 0
