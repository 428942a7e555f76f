# -*- test-case-name: tests.test_settings -*-
"""
The worker's options, each declared once (see :mod:`vast_vespa.options`) as a field of
:class:`Settings`: its environment variable (the seed README's spelling, with the ``PYWORKER_``
alias that Vast templates set), its twistd flag, type, default and help.

Precedence is flag > ``PYWORKER_<NAME>`` > ``<NAME>`` > default. Nothing else in Vespa reads
``os.environ``: the Vast variables (``MASTER_TOKEN``, ``REPORT_ADDR``, ``CONTAINER_ID``,
``PUBLIC_IPADDR``, ``VAST_TCP_PORT_<port>``) are read here too. A bad value raises
:class:`~vast_vespa.options.SettingsError` whose message names the option, where the value came
from, and the value.

``python -m vast_vespa.settings --markdown`` prints the README's table of these options.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vast_vespa.backends import LogLines, health_path, model_log_lines
from vast_vespa.options import (
    SettingsError,
    choice,
    is_given,
    markdown_command,
    option,
    parse_bool,
    parse_count,
    parse_http_url,
    parse_listen,
    parse_optional_count,
    parse_optional_positive_number,
    parse_path,
    parse_port,
    parse_positive_number,
    parse_seconds,
    parse_size,
    parse_text,
    parse_url_list,
    parse_words,
    read_options,
)
from vast_vespa.workload import parse_workload_spec, workload_spec

ENV_PREFIX = "PYWORKER_"


# An option of the worker: :func:`~vast_vespa.options.option`, also read as ``PYWORKER_<NAME>``
# (the alias Vast templates set).
worker_option = partial(option, env_prefix=ENV_PREFIX)


def parse_optional_listen(text: str) -> tuple[str, ...]:
    """Endpoint strings as :func:`parse_listen`, or empty for "derived from WORKER_PORT"."""
    return parse_listen(text) if text.strip() else ()


def parse_admin_listen(text: str) -> str:
    """One endpoint string, or ``none`` for "no admin listener"."""
    value = text.strip()
    if value.lower() in ("", "none", "off"):
        return ""
    if len(parse_listen(value)) != 1:
        raise ValueError("expected one endpoint string such as tcp:9090:interface=127.0.0.1")
    return value


SIGNATURE_SHAPES = ("url", "five-field")
BACKEND_PRESETS = {
    "openai": "vast_vespa.benchmarks.openai:benchmark",
    "vllm": "vast_vespa.benchmarks.openai:benchmark",
    "ollama": "vast_vespa.benchmarks.openai:benchmark",
    "llama.cpp": "vast_vespa.benchmarks.openai:benchmark",
    "llama-cpp-python": "vast_vespa.benchmarks.openai:benchmark",
    "sglang": "vast_vespa.benchmarks.openai:benchmark",
    "tgi": "vast_vespa.benchmarks.tgi:benchmark",
    "comfyui": "vast_vespa.benchmarks.comfyui:benchmark",
}


def parse_optional_path(text: str) -> str:
    """A path as :func:`parse_path`, or empty for "the backend's default"."""
    return parse_path(text) if text.strip() else ""


def parse_log_lines(text: str) -> tuple[str, ...] | None:
    """Newline-separated substrings (each line stripped, empty ones dropped), as the official
    workers read them; empty for "the backend's default", ``none`` for no line at all."""
    if not text.strip():
        return None
    if text.strip().lower() == "none":
        return ()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def parse_signature_shapes(text: str) -> tuple[str, ...]:
    shapes = parse_words(text.lower())
    if not shapes or any(shape not in SIGNATURE_SHAPES for shape in shapes):
        raise ValueError("expected a comma-separated list of: " + ", ".join(SIGNATURE_SHAPES))
    return shapes


def parse_benchmark_spec(text: str) -> str:
    value = text.strip()
    if value and not re.fullmatch(r"[\w.]+:[\w.]+", value):
        raise ValueError(
            "expected module.path:function, e.g. vast_vespa.benchmarks.openai:benchmark"
        )
    return value


@dataclass(frozen=True)
class VastEnvironment:
    """What the Vast platform tells the worker about itself (PROTOCOL.md section 1)."""

    master_token: str = ""
    report_addrs: tuple[str, ...] = ()
    container_id: int | None = None
    public_url: str | None = None


@dataclass(frozen=True)
class SystemdEnvironment:
    """What systemd tells a service (sd_notify(3)): where to send READY=1 and how often it
    expects WATCHDOG=1 (microseconds, 0 = no watchdog)."""

    notify_socket: str | None = None
    watchdog_usec: int = 0


@dataclass(frozen=True)
class Settings:
    """
    The worker's validated settings. Build with :func:`load_settings`; ``Settings()`` holds the
    declared defaults, except ``listen``, empty here, which load_settings derives from
    WORKER_PORT and USE_SSL.
    """

    # The relay
    backend_url: str = worker_option(
        "BACKEND_URL",
        "backend-url",
        parse_http_url,
        "http://localhost:8000",
        "Base URL of the inference server; requests go to this URL + their own path.",
        old_env=("MODEL_SERVER_URL",),
    )
    worker_port: int = worker_option(
        "WORKER_PORT",
        "worker-port",
        parse_port,
        "3000",
        "Port to listen on when --listen is not given; also picks VAST_TCP_PORT_<port>.",
    )
    listen: tuple[str, ...] = worker_option(
        "LISTEN",
        "listen",
        parse_optional_listen,
        "",
        "Twisted endpoint string(s) to listen on, e.g. tcp:3000 or "
        "ssl:3000:privateKey=key.pem:certKey=cert.pem (default tcp:$WORKER_PORT:backlog=1024).",
        repeatable=True,
    )
    unsecured: bool = worker_option(
        "UNSECURED",
        "unsecured",
        parse_bool,
        "false",
        "Accept requests without a Vast signature (local development only).",
    )
    use_ssl: bool = worker_option(
        "USE_SSL",
        "use-ssl",
        parse_bool,
        "false",
        "Serve TLS with --ssl-cert/--ssl-key and advertise an https:// URL (an ssl: listener on "
        "the worker port advertises https by itself).",
    )
    ssl_cert: str = worker_option(
        "SSL_CERT",
        "ssl-cert",
        parse_text,
        "/etc/instance.crt",
        "Certificate (PEM) used when USE_SSL is true.",
    )
    ssl_key: str = worker_option(
        "SSL_KEY",
        "ssl-key",
        parse_text,
        "/etc/instance.key",
        "Private key (PEM) used when USE_SSL is true.",
    )
    request_timeout: float = worker_option(
        "REQUEST_TIMEOUT",
        "request-timeout",
        parse_seconds,
        "0",
        "Give up on a backend call after this many seconds, streams included: no response "
        "headers by then is a 504, an answer still coming is cut; 0 = no limit.",
    )
    access_log: bool = worker_option(
        "ACCESS_LOG",
        "access-log",
        parse_bool,
        "true",
        "Log one line per request.",
    )

    # Limits and hardening (vast_vespa.net.server)
    max_body_size: int = worker_option(
        "MAX_BODY_SIZE",
        "max-body-size",
        parse_size,
        "1G",
        "Largest request body accepted (413 beyond it); k/M/G suffixes allowed.",
    )
    max_header_size: int = worker_option(
        "MAX_HEADER_SIZE",
        "max-header-size",
        parse_size,
        "16k",
        "Largest request line plus headers, in bytes (414/431 beyond it).",
    )
    max_headers: int = worker_option(
        "MAX_HEADERS",
        "max-headers",
        parse_count,
        "100",
        "Most header lines accepted in one request (431 beyond it).",
    )
    head_timeout: float = worker_option(
        "HEAD_TIMEOUT",
        "head-timeout",
        parse_positive_number,
        "30",
        "Seconds a client has from its request's first byte to its last header (408 after).",
    )
    min_body_rate: int = worker_option(
        "MIN_BODY_RATE",
        "min-body-rate",
        parse_size,
        "1k",
        "Slowest request upload accepted, in bytes/s over 10 s windows (408); 0 = off.",
    )
    max_connections: int = worker_option(
        "MAX_CONNECTIONS",
        "max-connections",
        parse_count,
        "2048",
        "Most open client connections; at it the oldest idle one is closed to make room, "
        "and a new one gets 503 if none is idle. 0 = off.",
    )
    max_connections_per_address: int | None = worker_option(
        "MAX_CONNECTIONS_PER_ADDRESS",
        "max-connections-per-address",
        parse_optional_count,
        "",
        "Most open connections from one client IP address (that address's oldest idle one is "
        "closed to make room, else 503); empty = MAX_CONNECTIONS / 2, 0 = off (clients "
        "behind one NAT).",
    )
    backend_connect_timeout: float = worker_option(
        "BACKEND_CONNECT_TIMEOUT",
        "backend-connect-timeout",
        parse_seconds,
        "10",
        "Seconds to open a connection to the backend (504 after); 0 = no limit.",
    )
    backend_first_byte_timeout: float = worker_option(
        "BACKEND_FIRST_BYTE_TIMEOUT",
        "backend-first-byte-timeout",
        parse_seconds,
        "0",
        "Seconds for the backend's response headers to arrive (504 after); 0 = no limit.",
    )
    backend_max_header_size: int = worker_option(
        "BACKEND_MAX_HEADER_SIZE",
        "backend-max-header-size",
        parse_size,
        "16k",
        "Largest backend response head (status line, headers, 1xx heads before it), in bytes "
        "(502 beyond it).",
    )
    backend_max_headers: int = worker_option(
        "BACKEND_MAX_HEADERS",
        "backend-max-headers",
        parse_count,
        "100",
        "Most header lines accepted in one backend response (502 beyond it).",
    )
    backend_stall_timeout: float = worker_option(
        "BACKEND_STALL_TIMEOUT",
        "backend-stall-timeout",
        parse_seconds,
        "600",
        "Cut a response whose body sends nothing for this many seconds while the client reads; "
        "a client that reads nothing that long is cut as gone; 0 = no limit.",
    )

    # The serverless protocol
    signature_shapes: tuple[str, ...] = worker_option(
        "SIGNATURE_SHAPES",
        "signature-shapes",
        parse_signature_shapes,
        "url,five-field",
        "Signed message shapes accepted (url, five-field).",
    )
    default_cost: float | None = worker_option(
        "DEFAULT_COST",
        "default-cost",
        parse_optional_positive_number,
        "",
        "Workload used when a request's cost is <= 1.",
    )
    workload: str = worker_option(
        "WORKLOAD",
        "workload",
        parse_workload_spec,
        "",
        "How a request's workload is counted where its cost is not signed: openai, tgi, "
        "comfyui (estimated from the payload), cost (the declared cost) or "
        "module.path:function (payload -> number); default from BACKEND, else cost.",
    )
    max_wait_time: float = worker_option(
        "MAX_WAIT_TIME",
        "max-wait-time",
        parse_seconds,
        "10",
        "Reject with 429 when the estimated queue wait exceeds this many seconds (0 = off).",
    )
    allow_parallel: bool = worker_option(
        "ALLOW_PARALLEL",
        "allow-parallel",
        parse_bool,
        "true",
        "Send several requests to the backend at once (false: one at a time, FIFO).",
    )
    max_concurrency: int = worker_option(
        "MAX_CONCURRENCY",
        "max-concurrency",
        parse_count,
        "0",
        "At most this many backend requests at once (0 = no limit).",
    )
    blocked_paths: tuple[str, ...] = worker_option(
        "BLOCKED_PATHS",
        "blocked-paths",
        parse_words,
        "",
        "Comma-separated fnmatch patterns of paths answered with 403.",
    )
    verify_url: bool = worker_option(
        "VERIFY_URL",
        "verify-url",
        parse_bool,
        "false",
        "Reject signed requests whose url is not this worker's public URL.",
    )
    replay_window: int = worker_option(
        "REPLAY_WINDOW",
        "replay-window",
        parse_count,
        "0",
        "Reject a (reqnum, signature) seen among the last N requests (0 = off).",
    )
    delete_requests_format: str = worker_option(
        "DELETE_REQUESTS_FORMAT",
        "delete-requests-format",
        choice("batches", "list"),
        "batches",
        "Body of /delete_requests/: batches (one POST per success flag) or list.",
    )
    report_interval: float = worker_option(
        "METRICS_UPDATE_INTERVAL",
        "report-interval",
        parse_positive_number,
        "1",
        "Seconds between autoscaler report checks.",
    )
    # Sessions (vast_vespa.worker.sessions)
    max_sessions: int = worker_option(
        "MAX_SESSIONS",
        "max-sessions",
        parse_count,
        "10",
        "Open sessions at once; /session/create answers 429 beyond (0 = sessions off, "
        "/session/* goes to the backend).",
    )
    session_ttl: float = worker_option(
        "SESSION_TTL",
        "session-ttl",
        parse_positive_number,
        "60",
        "Seconds a session lives after its last request when /session/create gives no lifetime.",
    )
    session_max_ttl: float = worker_option(
        "SESSION_MAX_TTL",
        "session-max-ttl",
        parse_positive_number,
        "3600",
        "Largest session lifetime a client may ask for (422 above).",
    )
    session_listen: str = worker_option(
        "SESSION_LISTEN",
        "session-listen",
        parse_admin_listen,
        "none",
        "Endpoint of a plain-HTTP listener serving only POST /session/end (the official "
        "WORKER_HTTP_PORT), for the model server; none = off.",
    )

    # Lifecycle
    backend: str = worker_option(
        "BACKEND",
        "backend",
        choice("", *BACKEND_PRESETS),
        "",
        "Kind of backend ("
        + ", ".join(BACKEND_PRESETS)
        + "): picks the shipped benchmark, health path and MODEL_LOG lines where those are "
        "not set.",
    )
    benchmark: str = worker_option(
        "BENCHMARK",
        "benchmark",
        parse_benchmark_spec,
        "",
        "module.path:function measuring the backend's throughput.",
    )
    benchmark_session: str = worker_option(
        "BENCHMARK_SESSION",
        "benchmark-session",
        choice("treq", "aiohttp"),
        "treq",
        "Session handed to the benchmark: treq (built in) or aiohttp (Vespa's aiohttp extra).",
    )
    benchmark_cache: str = worker_option(
        "BENCHMARK_CACHE_FILE",
        "benchmark-cache",
        parse_text,
        ".has_benchmark",
        "File caching the benchmark result; delete it to re-benchmark.",
    )
    benchmark_timeout: float = worker_option(
        "BENCHMARK_TIMEOUT",
        "benchmark-timeout",
        parse_seconds,
        "1800",
        "Seconds the benchmark may run before it is cancelled and reported as an error; "
        "0 = no limit.",
    )
    healthcheck_endpoint: str = worker_option(
        "HEALTHCHECK_ENDPOINT",
        "healthcheck-endpoint",
        parse_optional_path,
        "",
        "Backend path answering 200 when the model is ready; unset: BACKEND's (/health; "
        "ollama /api/version, comfyui /system_stats, llama-cpp-python /openapi.json).",
        old_env=("MODEL_HEALTH_ENDPOINT",),
    )
    model_log: str = worker_option(
        "MODEL_LOG",
        "model-log",
        parse_text,
        "",
        "Model server's log file, followed from its start: its load, error and info lines "
        "(below) decide readiness and failure.",
        old_env=("MODEL_LOG_FILE",),
    )
    model_load_log_msg: tuple[str, ...] | None = worker_option(
        "MODEL_LOAD_LOG_MSG",
        "model-load-log-msg",
        parse_log_lines,
        "",
        "Newline-separated substrings of the MODEL_LOG line saying the model is loaded "
        "(unset: BACKEND's; none: no such line).",
    )
    model_error_log_msgs: tuple[str, ...] | None = worker_option(
        "MODEL_ERROR_LOG_MSGS",
        "model-error-log-msgs",
        parse_log_lines,
        "",
        "Newline-separated substrings of MODEL_LOG lines that make the worker errored at once "
        "(unset: BACKEND's; none: no such line).",
    )
    model_info_log_msgs: tuple[str, ...] | None = worker_option(
        "MODEL_INFO_LOG_MSGS",
        "model-info-log-msgs",
        parse_log_lines,
        "",
        "Newline-separated substrings of MODEL_LOG lines copied into the worker's log, at most "
        "one a second (unset: BACKEND's; none: no such line).",
    )
    ready_timeout: float = worker_option(
        "READY_TIMEOUT",
        "ready-timeout",
        parse_positive_number,
        "1200",
        "Seconds to wait for the backend to become healthy on a first start.",
        old_env=("READY_TIMEOUT_INITIAL",),
    )
    ready_timeout_resume: float = worker_option(
        "READY_TIMEOUT_RESUME",
        "ready-timeout-resume",
        parse_positive_number,
        "300",
        "Seconds to wait for the backend when a cached benchmark exists.",
    )
    healthcheck_retry_interval: float = worker_option(
        "HEALTHCHECK_RETRY_INTERVAL",
        "healthcheck-retry-interval",
        parse_positive_number,
        "5",
        "Seconds between readiness probes while the backend loads.",
    )
    healthcheck_interval: float = worker_option(
        "HEALTHCHECK_INTERVAL",
        "healthcheck-interval",
        parse_positive_number,
        "10",
        "Seconds between health probes once loaded.",
        old_env=("HEALTHCHECK_POLL_INTERVAL",),
    )
    healthcheck_timeout: float = worker_option(
        "HEALTHCHECK_TIMEOUT",
        "healthcheck-timeout",
        parse_positive_number,
        "10",
        "Timeout of one health probe, in seconds.",
    )
    healthcheck_failures: int = worker_option(
        "HEALTHCHECK_FAILURES",
        "healthcheck-failures",
        parse_count,
        "3",
        "Consecutive failed probes before the worker reports an error.",
        old_env=("HEALTHCHECK_CONSECUTIVE_FAILURES",),
    )

    # Operations
    fast_path: bool = worker_option(
        "FAST_PATH",
        "fast-path",
        parse_bool,
        "true",
        "Use Vespa's fast path through Twisted's internals (checked at start-up; false: stock "
        "Twisted only).",
    )
    admin_listen: str = worker_option(
        "ADMIN_LISTEN",
        "admin-listen",
        parse_admin_listen,
        "tcp:9090:interface=127.0.0.1",
        "Endpoint of the admin listener (/metrics, /healthz, /readyz); none = off, and the "
        "/metrics figures are then not kept at all.",
    )
    drain_timeout: float = worker_option(
        "DRAIN_TIMEOUT",
        "drain-timeout",
        parse_seconds,
        "30",
        "On shutdown, seconds to let in-flight requests finish.",
    )
    vast: VastEnvironment = field(default_factory=VastEnvironment)
    systemd: SystemdEnvironment = field(default_factory=SystemdEnvironment)

    @property
    def workload_spec(self) -> str:
        """The workload estimator: WORKLOAD, else the one BACKEND implies, else cost."""
        return workload_spec(self.workload, self.backend)

    @property
    def benchmark_spec(self) -> str:
        """The benchmark to run: BENCHMARK, else the preset of BACKEND, else empty."""
        return self.benchmark or BACKEND_PRESETS.get(self.backend, "")

    @property
    def health_path(self) -> str:
        """The path probed: HEALTHCHECK_ENDPOINT, else BACKEND's health path."""
        return self.healthcheck_endpoint or health_path(self.backend)

    @property
    def model_log_lines(self) -> LogLines:
        """The MODEL_LOG patterns: each list as set, else BACKEND's."""
        shipped = model_log_lines(self.backend)
        return LogLines(
            shipped.load if self.model_load_log_msg is None else self.model_load_log_msg,
            shipped.error if self.model_error_log_msgs is None else self.model_error_log_msgs,
            shipped.info if self.model_info_log_msgs is None else self.model_info_log_msgs,
        )


def _advertised_tls(values: Mapping[str, Any]) -> bool:
    """Whether the URL reported to the autoscaler is https, with --listen given: the listener
    on WORKER_PORT decides (an ``ssl:`` one is https without USE_SSL); with none on it (a
    ``systemd:`` socket, TLS ended in front of another port), USE_SSL does.

    @raise SettingsError: for USE_SSL with a plain ``tcp:`` listener on WORKER_PORT, which
        would send every client https:// to a port that speaks HTTP.
    """
    for kind, port, description in _port_listeners(values["listen"]):
        if port == values["worker_port"]:
            if kind == "ssl":
                return True
            if values["use_ssl"]:
                raise SettingsError(
                    f"USE_SSL is true but the listener on port {values['worker_port']} serves "
                    f"plain HTTP ({description}): clients would be sent https:// to it "
                    "(listen with ssl:, or set USE_SSL=false)"
                )
            return False
    return bool(values["use_ssl"])


def _port_listeners(listen: Sequence[str]) -> list[tuple[str, int, str]]:
    """Each tcp:/ssl: listener as (its kind, its port, its description); the port is the
    first positional argument or ``port=``, wherever it stands."""
    found = []
    for description in listen:
        kind, *fields = re.split(r"(?<!\\):", description)
        if kind not in ("tcp", "ssl"):
            continue
        positional = [field for field in fields if "=" not in field]
        named = [field[5:] for field in fields if field.startswith("port=")]
        for port in named or positional[:1]:
            if port.isdigit():
                found.append((kind, int(port), description))
    return found


def _listen_port(listen: Sequence[str]) -> int | None:
    """The TCP port of the first tcp:/ssl: listener, if any."""
    listeners = _port_listeners(listen)
    return listeners[0][1] if listeners else None


def _vast_environment(environ: Mapping[str, str], port: int, use_ssl: bool) -> VastEnvironment:
    def get(name: str) -> str:
        return environ.get(ENV_PREFIX + name, environ.get(name, "")).strip()

    def fail(name: str, value: str, why: str) -> SettingsError:
        return SettingsError(f"invalid {name}={value!r} (from the environment): {why}")

    try:
        report_addrs = parse_url_list(get("REPORT_ADDR"))
    except ValueError as e:
        raise fail("REPORT_ADDR", get("REPORT_ADDR"), str(e)) from None
    container = get("CONTAINER_ID")
    try:
        container_id = int(container) if container else None
    except ValueError:
        raise fail("CONTAINER_ID", container, "expected a whole number") from None
    public_url = None
    address = get("PUBLIC_IPADDR")
    external_port = get(f"VAST_TCP_PORT_{port}")
    if address and external_port:
        # PROTOCOL.md 1.2: byte-identical to what the router signs.
        public_url = ("https" if use_ssl else "http") + "://" + address + ":" + external_port
    # MASTER_TOKEN is a secret: kept verbatim (never stripped), never logged.
    master_token = environ.get(ENV_PREFIX + "MASTER_TOKEN", environ.get("MASTER_TOKEN", ""))
    return VastEnvironment(master_token, report_addrs, container_id, public_url)


def _systemd_environment(environ: Mapping[str, str], pid: int) -> SystemdEnvironment:
    """NOTIFY_SOCKET and WATCHDOG_USEC; the watchdog is ours only if WATCHDOG_PID is unset or
    names this process (sd_watchdog_enabled(3))."""
    watchdog = environ.get("WATCHDOG_USEC", "").strip()
    owner = environ.get("WATCHDOG_PID", "").strip()
    try:
        usec = int(watchdog) if watchdog else 0
    except ValueError:
        raise SettingsError(
            f"invalid WATCHDOG_USEC={watchdog!r} (from the environment): expected microseconds"
        ) from None
    if owner and owner != str(pid):
        usec = 0
    return SystemdEnvironment(environ.get("NOTIFY_SOCKET") or None, max(usec, 0))


def load_settings(
    flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None
) -> Settings:
    """
    Build :class:`Settings` from twistd flags (option name -> text or None) and the environment
    (``os.environ`` unless given).

    @raise SettingsError: for the first bad value, naming the option, its source and the value.
    """
    if environ is None:
        environ = os.environ
    values = read_options(Settings, flags, environ)
    if not values["listen"]:
        values["listen"] = (_default_listen(values),)
    else:
        if _listen_port(values["listen"]) is not None and not is_given(
            Settings, "worker_port", flags, environ
        ):
            values["worker_port"] = _listen_port(values["listen"])
        values["use_ssl"] = _advertised_tls(values)
    values["vast"] = _vast_environment(environ, values["worker_port"], values["use_ssl"])
    values["systemd"] = _systemd_environment(environ, os.getpid())
    return Settings(**values)


def check_protocol(settings: Settings) -> None:
    """
    Settings that are valid one by one but not together (checked before the worker starts).

    @raise SettingsError: naming what to set.
    """
    if not settings.unsecured and not settings.vast.report_addrs:
        raise SettingsError(
            "REPORT_ADDR is not set: a secured worker needs the autoscaler's address for its "
            "public key and reports (set REPORT_ADDR, or UNSECURED=true for local development)"
        )
    if settings.verify_url and settings.vast.public_url is None:
        raise SettingsError(
            f"VERIFY_URL needs this worker's public URL: set PUBLIC_IPADDR and "
            f"VAST_TCP_PORT_{settings.worker_port}"
        )


# Twisted listens with a backlog of 50: a burst of new connections (100 SSE clients at once)
# overflows it and the excess wait for a SYN retry, which shows in the tail latency.
LISTEN_BACKLOG = 1024


def _default_listen(values: Mapping[str, Any]) -> str:
    """tcp:$WORKER_PORT, or ssl:$WORKER_PORT on SSL_CERT/SSL_KEY when USE_SSL is true; both
    with a listen backlog of LISTEN_BACKLOG."""
    port = values["worker_port"]
    if not values["use_ssl"]:
        return f"tcp:{port}:backlog={LISTEN_BACKLOG}"
    for name, path in (("SSL_CERT", values["ssl_cert"]), ("SSL_KEY", values["ssl_key"])):
        if not os.path.isfile(path):
            raise SettingsError(
                f"USE_SSL is true but {name}={path!r} is not a file "
                "(set SSL_CERT and SSL_KEY, or --ssl-cert and --ssl-key, to PEM files)"
            )
    key, cert = (_endpoint_quote(values[name]) for name in ("ssl_key", "ssl_cert"))
    description = f"ssl:{port}:backlog={LISTEN_BACKLOG}:privateKey={key}:certKey={cert}"
    try:
        parse_listen(description)  # loads the files: a bad PEM is one line now, not a traceback
    except ValueError as e:
        raise SettingsError(f"USE_SSL is true but SSL_CERT/SSL_KEY cannot be used: {e}") from None
    return description


def _endpoint_quote(path: str) -> str:
    """A file name inside a Twisted endpoint string (``:``, ``=`` and ``\\`` escaped)."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


if __name__ == "__main__":
    raise SystemExit(markdown_command(Settings, "vast_vespa.settings", sys.argv[1:]))
