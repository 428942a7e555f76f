# -*- test-case-name: tests.test_sandbox -*-
"""
``twistd vespa-sandbox``: the whole system on one machine, in one process, with one command. A
sample OpenAI-compatible backend, the autoscaler emulator, Vespa workers in signed mode in front
of the backend (each reporting to the emulator and benchmarking the backend), and the client
proxy on 127.0.0.1:8010. Everything listens on 127.0.0.1; nothing talks to Vast.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import Logger

from vast_vespa.cli import CommandOptions, installed_reactor
from vast_vespa.client.service import build_client
from vast_vespa.client.settings import load_client_settings
from vast_vespa.emulator.registry import Endpoint
from vast_vespa.emulator.tap import (
    DEFAULT_ACCOUNT_KEY,
    DEFAULT_ENDPOINT,
    AutoscalerService,
    EmulatorConfig,
    build_autoscaler,
)
from vast_vespa.net.listen import ListenFailed, listen_service
from vast_vespa.options import choice, parse_count, parse_port, parse_positive_number
from vast_vespa.sample_backend import SampleBackend
from vast_vespa.settings import SIGNATURE_SHAPES, Settings, load_settings
from vast_vespa.site import VespaSite
from vast_vespa.worker.service import WorkerService
from vast_vespa.worker.tap import build_worker

HOST = "127.0.0.1"
SANDBOX_BENCHMARK = "vast_vespa.benchmarks.openai:benchmark"


@dataclass(frozen=True)
class SandboxConfig:
    """Ports (0: any free port), worker count, signature shape, backend speed."""

    workers: int = 2
    shape: str = "url"
    client_port: int = 8010
    autoscaler_port: int = 8080
    backend_port: int = 8001
    worker_port: int = 3001  # the first worker's; the others count up from it
    tokens_per_second: float = 100.0
    max_tokens: int = 64
    stale_after: float = 30.0
    state_dir: str = ".vespa-sandbox"
    endpoint: Endpoint = DEFAULT_ENDPOINT
    account_key: str = DEFAULT_ACCOUNT_KEY


def _port(port: int) -> int:
    """``port``, or a free loopback port for 0 (tests run several sandboxes at once)."""
    if port:
        return port
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _listen(port: int) -> str:
    return f"tcp:{port}:interface={HOST}"


def benchmark_cache(config: SandboxConfig, index: int) -> str:
    return os.path.join(config.state_dir, f"worker-{index}.has_benchmark")


def worker_settings(
    config: SandboxConfig, index: int, port: int, backend_url: str, autoscaler_url: str
) -> Settings:
    """A worker in signed mode in front of the sample backend, reporting to the emulator under
    its loopback URL (what the emulator hands to clients and signs). Built by load_settings
    from flags and Vast variables, as ``twistd vespa`` builds it (never from os.environ)."""
    flags = {
        "backend_url": backend_url,
        "listen": _listen(port),
        "admin_listen": "none",  # several workers in one process: no shared admin port
        "signature_shapes": config.shape,  # a signature in the other shape would be a 401
        "backend": "openai",
        "benchmark": SANDBOX_BENCHMARK,
        "benchmark_cache": benchmark_cache(config, index),
    }
    vast = {
        "MASTER_TOKEN": f"sandbox-mtoken-{index}",
        "REPORT_ADDR": autoscaler_url,
        "CONTAINER_ID": str(index),
        "PUBLIC_IPADDR": HOST,
        f"VAST_TCP_PORT_{port}": str(port),
    }
    return load_settings(flags, vast)


def build_sandbox_client(config: SandboxConfig, autoscaler_url: str, reactor: Any) -> IService:
    """The client proxy pointed at the emulator, turning the account key into the endpoint key
    through the emulator's endpoint listing."""
    flags = {
        "endpoint": config.endpoint.name,
        "account_key": config.account_key,
        "instance": "local",
        "autoscaler_url": autoscaler_url,
        "console_url": autoscaler_url,
        "listen": _listen(config.client_port),
        "ca_cache": os.path.join(config.state_dir, "vast_root.cer"),
    }
    settings = load_client_settings(flags, {})  # parsed as vespa-client parses its flags
    return build_client(settings, reactor)


class SandboxService(MultiService):
    """Backend, emulator, workers and client; says what to try once everything listens."""

    _log = Logger()

    def __init__(self, config: SandboxConfig, backend: SampleBackend, urls: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.urls = urls
        self.autoscaler: AutoscalerService | None = None
        self.workers: list[WorkerService] = []
        self.client: IService | None = None  # set by build_sandbox
        # Listener description -> the sandbox flag that sets its port (set by build_sandbox).
        self.port_flags: dict[str, str] = {}

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenFailed as e:
            raise self._port_taken(e) from None

    def startService(self) -> None:
        try:
            super().startService()
        except Exception as e:
            # A port was taken: forget what never started, so that stopService stops exactly
            # what did (MultiService would also "stop" the services that never started).
            _forget_unstarted(self)
            if isinstance(e, ListenFailed):
                raise self._port_taken(e) from None
            raise
        self._log.info("{text}", text=instructions(self.config, self.urls))

    def _port_taken(self, failed: ListenFailed) -> ListenFailed:
        """The failure of a worker's, the client's, ... listener, told in the sandbox's terms:
        which of its flags to set."""
        setting = self.port_flags.get(failed.description, failed.setting)
        return ListenFailed("vespa-sandbox", failed.description, failed.reason, setting)


def _forget_unstarted(collection: MultiService) -> None:
    for child in list(collection):
        if not child.running:
            # Not disownServiceParent: that would stop it, and it never started.
            collection.services.remove(child)
            collection.namedServices.pop(child.name, None)
            child.parent = None
        elif isinstance(child, MultiService):
            _forget_unstarted(child)


def instructions(config: SandboxConfig, urls: dict[str, Any]) -> str:
    """What the sandbox prints once it is up: where everything is and what to try."""
    plain = '{"model": "vespa-sample", "messages": [{"role": "user", "content": "hello"}]}'
    streaming = plain[:-1] + ', "stream": true}'
    client = urls["client"]
    lines = [
        "Vespa sandbox is up (local only: nothing here talks to Vast).",
        f"  sample backend  {urls['backend']}  (OpenAI-compatible, "
        f"{config.tokens_per_second:g} tokens/s)",
        f"  autoscaler      {urls['autoscaler']}  (emulator; status page {urls['autoscaler']}/)",
        f"  workers         {', '.join(urls['workers'])}  (signed mode, {config.shape} shape)",
        f"  client          {client}",
        "Workers benchmark the backend first (a few seconds); the client waits for one.",
        "Try:",
        f"  curl {client}/v1/chat/completions -H 'content-type: application/json' -d '{plain}'",
        f"  curl -N {client}/v1/chat/completions -H 'content-type: application/json' "
        f"-d '{streaming}'",
        f"  open {urls['autoscaler']}/ to watch routing and load",
    ]
    return "\n".join(lines)


def build_sandbox(config: SandboxConfig, reactor: Any) -> SandboxService:
    """Wire the whole sandbox (tests call this directly)."""
    os.makedirs(config.state_dir, exist_ok=True)
    backend_port, autoscaler_port = _port(config.backend_port), _port(config.autoscaler_port)
    config = dataclasses.replace(config, client_port=_port(config.client_port))
    worker_ports = [
        _port(config.worker_port + i if config.worker_port else 0) for i in range(config.workers)
    ]
    urls: dict[str, Any] = {
        "backend": f"http://{HOST}:{backend_port}",
        "autoscaler": f"http://{HOST}:{autoscaler_port}",
        "workers": [f"http://{HOST}:{port}" for port in worker_ports],
        "client": f"http://{HOST}:{config.client_port}",
    }
    backend = SampleBackend(reactor, config.tokens_per_second, config.max_tokens)
    sandbox = SandboxService(config, backend, urls)
    sandbox.port_flags = {
        _listen(backend_port): "--backend-port",
        _listen(autoscaler_port): "--autoscaler-port",
        _listen(config.client_port): "--client-port",
        **{_listen(port): "--worker-port" for port in worker_ports},
    }
    backend_site = VespaSite(backend, name="sample backend")
    listen_service(
        _listen(backend_port),
        backend_site,
        reactor,
        "vespa-sandbox",
        "--backend-port",
        fast_path=False,
    ).setServiceParent(sandbox)
    sandbox.autoscaler = build_autoscaler(
        EmulatorConfig(
            listen=(_listen(autoscaler_port),),
            state_dir=os.path.join(config.state_dir, "autoscaler"),
            endpoints=(config.endpoint,),
            account_key=config.account_key,
            shape=config.shape,
            stale_after=config.stale_after,
        ),
        reactor,
    )
    sandbox.autoscaler.setServiceParent(sandbox)
    for index, port in enumerate(worker_ports, 1):
        cache = benchmark_cache(config, index)
        if os.path.exists(cache):
            os.remove(cache)  # benchmark the sample backend for real on every start
        settings = worker_settings(config, index, port, urls["backend"], urls["autoscaler"])
        worker = build_worker(settings, reactor)
        worker.setServiceParent(sandbox)
        sandbox.workers.append(worker)
    sandbox.client = build_sandbox_client(config, urls["autoscaler"], reactor)
    sandbox.client.setServiceParent(sandbox)
    return sandbox


class Options(CommandOptions):
    """``twistd vespa-sandbox`` options."""

    synopsis = "[options]"
    longdesc = (
        "Run the whole Vespa system locally in one process: a sample OpenAI-compatible "
        "backend, the autoscaler emulator (a development and test tool, never a production "
        "router), Vespa workers in signed mode, and the client proxy. Then curl the client."
    )
    optParameters = [
        ["workers", None, "2", "Number of workers."],
        ["shape", None, "url", "Signed message shape: url or five-field."],
        ["client-port", None, "8010", "Port of the client proxy (send your requests here)."],
        ["autoscaler-port", None, "8080", "Port of the autoscaler emulator and its status page."],
        ["backend-port", None, "8001", "Port of the sample backend."],
        ["worker-port", None, "3001", "Port of the first worker; the others count up."],
        ["tokens-per-second", None, "100", "Speed of the sample backend, per request."],
        ["max-tokens", None, "64", "Longest answer of the sample backend, in tokens."],
        ["state-dir", None, ".vespa-sandbox", "Directory for the key and benchmark files."],
    ]

    def _parse(self, flag: str, parse: Callable[[str], Any]) -> Any:
        try:
            return parse(self[flag])
        except ValueError as e:
            raise SystemExit(f"vespa-sandbox: invalid --{flag} {self[flag]!r}: {e}") from None

    def postOptions(self) -> None:
        self.config = SandboxConfig(
            workers=self._parse("workers", parse_positive_count),
            shape=self._parse("shape", choice(*SIGNATURE_SHAPES)),
            client_port=self._parse("client-port", parse_port),
            autoscaler_port=self._parse("autoscaler-port", parse_port),
            backend_port=self._parse("backend-port", parse_port),
            worker_port=self._parse("worker-port", parse_port),
            tokens_per_second=self._parse("tokens-per-second", parse_positive_number),
            max_tokens=self._parse("max-tokens", parse_positive_count),
            state_dir=self["state-dir"],
        )


def parse_positive_count(text: str) -> int:
    value = parse_count(text)
    if value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


def makeService(options: Options, reactor: Any = None) -> SandboxService:
    """twistd's entry point."""
    return build_sandbox(options.config, installed_reactor(reactor))
