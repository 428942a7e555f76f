# -*- test-case-name: tests.test_tap -*-
"""twistd options and makeService for the worker: the one place its objects are wired."""

from __future__ import annotations

from typing import Any, cast

from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.python import usage
from twisted.web.client import Agent

from vespa.logs import log_access
from vespa.notify import SystemdNotifier, SystemdService
from vespa.relay import backend_pool
from vespa.settings import OPTIONS, Settings, SettingsError, load_settings
from vespa.worker.admin import AdminSite, WorkerMetrics
from vespa.worker.lifecycle import ReadinessGate, build_lifecycle
from vespa.worker.limits import limits_from
from vespa.worker.resource import Observer, PassthroughGate, QuietSite, WorkerResource
from vespa.worker.service import WorkerService
from vespa.worker.state import WorkerState


def _help(option: Any) -> str:
    default = option.default or "unset"
    return f"{option.help} [env {option.env}; default {default}]"


class Options(usage.Options):
    """``twistd vespa`` options: one flag per setting (see vespa.settings)."""

    synopsis = "[options]"
    longdesc = (
        "Run a Vespa worker in front of an HTTP inference backend. Every flag also reads an "
        "environment variable (shown in brackets) and its PYWORKER_ alias; flags win."
    )
    optParameters = [[o.flag, None, None, _help(o)] for o in OPTIONS if o.name != "listen"]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.settings = Settings()

    def opt_listen(self, description: str) -> None:
        """Listen here, e.g. tcp:3000; repeatable [env LISTEN; default tcp:WORKER_PORT]"""
        self["listen"].append(description)

    def postOptions(self) -> None:
        flags = {o.name: self.get(o.flag) for o in OPTIONS}
        flags["listen"] = " ".join(self["listen"]) or None
        try:
            self.settings = load_settings(flags)
        except SettingsError as e:
            # One clear line and a non-zero exit, before anything listens.
            raise SystemExit(f"vespa: {e}") from None


def installed_reactor(reactor: Any = None) -> Any:
    """``reactor``, else the one twistd has installed by the time it calls makeService."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    return reactor


def makeService(options: Options, reactor: Any = None) -> IService:
    """twistd's entry point: the worker described by the parsed options."""
    try:
        return build_worker(options.settings, installed_reactor(reactor))
    except SettingsError as e:
        raise SystemExit(f"vespa: {e}") from None


def build_worker(settings: Settings, reactor: Any) -> WorkerService:
    """Wire the worker's objects from its settings (tests call this directly)."""
    clock = cast(IReactorTime, reactor)
    pool = backend_pool(reactor)
    agent = Agent(reactor, connectTimeout=settings.backend_connect_timeout or None, pool=pool)
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
    state = WorkerState(started=clock.seconds())
    metrics = WorkerMetrics(state, clock)
    observers: tuple[Observer, ...] = (log_access,) if settings.access_log else ()
    resource = WorkerResource(
        ReadinessGate(PassthroughGate(cooperator), state),
        agent,
        clock,
        settings.backend_url,
        settings.request_timeout,
        (*observers, metrics.observe),
        settings.backend_first_byte_timeout,
        settings.backend_stall_timeout,
    )
    site = QuietSite(resource, limits_from(settings), reactor=reactor)
    metrics.count_connections(site)
    service = WorkerService(clock, pool, site, state, resource.in_flight, settings.drain_timeout)
    lifecycle = build_lifecycle(settings, reactor, state)
    lifecycle.setServiceParent(service)
    for index, description in enumerate(settings.listen):
        listener = strports.service(description, site, reactor=reactor)
        listener.setName(f"listen-{index}")
        listener.setServiceParent(service)
    metrics.lag_sampler().setServiceParent(service)
    if settings.admin_listen:
        admin = AdminSite(metrics, state)
        listener = strports.service(settings.admin_listen, admin, reactor=reactor)
        listener.setName("admin")
        listener.setServiceParent(service)
    notifier = SystemdNotifier(settings.systemd.notify_socket)
    systemd = SystemdService(notifier, clock, settings.systemd.watchdog_usec)
    systemd.setName("systemd")
    systemd.setServiceParent(service)
    lifecycle.when_loaded().addCallback(lambda _: notifier.ready())
    service.add_drain_hook(notifier.stopping)
    return service
