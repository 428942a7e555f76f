# -*- test-case-name: tests.test_settings -*-
"""
Every worker option, once: its environment variable (the seed README's spelling, with the
``PYWORKER_`` alias that Vast templates set), its twistd flag, type, default and help.

Precedence is flag > ``PYWORKER_<NAME>`` > ``<NAME>`` > default. Nothing else in Vespa reads
``os.environ``: the Vast variables (``MASTER_TOKEN``, ``REPORT_ADDR``, ``CONTAINER_ID``,
``PUBLIC_IPADDR``, ``VAST_TCP_PORT_<port>``) are read here too. A bad value raises
:class:`SettingsError` whose message names the option, where the value came from, and the value.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "PYWORKER_"


class SettingsError(ValueError):
    """A setting has a value Vespa cannot use; the message is meant for the user as is."""


# Parsers: text -> value; raise ValueError with a short "expected ..." text.


def parse_text(text: str) -> str:
    return text.strip()


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on", "t"):
        return True
    if value in ("0", "false", "no", "n", "off", "f", ""):
        return False
    raise ValueError("expected true or false (also yes/no, on/off, 1/0)")


def parse_seconds(text: str) -> float:
    """A duration in seconds, >= 0 (0 usually means "off")."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a finite number of seconds >= 0")
    return value


def parse_positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a finite number > 0")
    return value


def parse_optional_positive_number(text: str) -> float | None:
    """A number > 0, or empty for "not set"."""
    return parse_positive_number(text) if text.strip() else None


def parse_count(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 0:
        raise ValueError("expected a whole number >= 0")
    return value


def parse_size(text: str) -> int:
    """A size in bytes: a whole number, optionally with a k/M/G suffix (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError("expected a size in bytes such as 1048576, 64k, 512M or 1G")
    return int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2)]


def parse_port(text: str) -> int:
    value = parse_count(text)
    if not 0 < value < 65536:
        raise ValueError("expected a TCP port between 1 and 65535")
    return value


def parse_http_url(text: str) -> str:
    """An absolute http(s) URL with a host, without a trailing slash."""
    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an absolute URL such as http://localhost:8000")
    if parts.query or parts.fragment:
        raise ValueError("expected a URL without query or fragment")
    return value.rstrip("/")


def parse_url_list(text: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs (Vast sets REPORT_ADDR this way)."""
    return tuple(parse_http_url(item) for item in text.split(",") if item.strip())


def parse_words(text: str) -> tuple[str, ...]:
    """Comma-separated words, whitespace trimmed, empty items dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_path(text: str) -> str:
    value = text.strip()
    if not value.startswith("/"):
        raise ValueError("expected a path starting with /")
    return value


def parse_listen(text: str) -> tuple[str, ...]:
    """
    One or more Twisted server endpoint strings separated by whitespace
    (``tcp:3000``, ``ssl:443:privateKey=...``, ``unix:/run/vespa.sock``, ``systemd:...``).
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    descriptions = tuple(text.split())
    if not descriptions:
        raise ValueError("expected an endpoint string such as tcp:3000")
    for description in descriptions:
        try:
            serverFromString(MemoryReactor(), description)
        except Exception as e:  # parsers raise many kinds (OSError, OpenSSL errors, ...)
            raise ValueError(f"expected a Twisted endpoint string such as tcp:3000 ({e})") from None
    return descriptions


def parse_admin_listen(text: str) -> str:
    """One endpoint string, or ``none`` for "no admin listener"."""
    value = text.strip()
    if value.lower() in ("", "none", "off"):
        return ""
    if len(parse_listen(value)) != 1:
        raise ValueError("expected one endpoint string such as tcp:9090:interface=127.0.0.1")
    return value


def choice(*allowed: str) -> Callable[[str], str]:
    def parse_choice(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return value

    return parse_choice


SIGNATURE_SHAPES = ("url", "five-field")
BACKEND_PRESETS = {
    "openai": "vast_vespa.benchmarks.openai:benchmark",
    "vllm": "vast_vespa.benchmarks.openai:benchmark",
    "ollama": "vast_vespa.benchmarks.openai:benchmark",
    "llama.cpp": "vast_vespa.benchmarks.openai:benchmark",
    "sglang": "vast_vespa.benchmarks.openai:benchmark",
    "tgi": "vast_vespa.benchmarks.tgi:benchmark",
    "comfyui": "vast_vespa.benchmarks.comfyui:benchmark",
}


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
class Option:
    """One setting: where it comes from and how its text becomes a value."""

    name: str
    env: str
    flag: str
    parse: Callable[[str], Any]
    default: str
    help: str
    # Older spellings still read (after the main name), e.g. READY_TIMEOUT_INITIAL.
    old_env: tuple[str, ...] = ()
    # Worker options also read PYWORKER_<NAME> (Vast templates); client options do not.
    prefixed: bool = True

    def env_names(self) -> tuple[str, ...]:
        """Environment variables to look at, first match wins."""
        names: list[str] = []
        for env in (self.env, *self.old_env):
            names += [ENV_PREFIX + env, env] if self.prefixed else [env]
        return tuple(names)


OPTIONS: tuple[Option, ...] = (
    # The relay
    Option(
        "backend_url",
        "BACKEND_URL",
        "backend-url",
        parse_http_url,
        "http://localhost:8000",
        "Base URL of the inference server; requests go to this URL + their own path.",
        old_env=("MODEL_SERVER_URL",),
    ),
    Option(
        "worker_port",
        "WORKER_PORT",
        "worker-port",
        parse_port,
        "3000",
        "Port to listen on when --listen is not given; also picks VAST_TCP_PORT_<port>.",
    ),
    Option(
        "listen",
        "LISTEN",
        "listen",
        parse_listen,
        "",
        "Twisted endpoint string(s) to listen on, e.g. tcp:3000 or "
        "ssl:3000:privateKey=key.pem:certKey=cert.pem (default tcp:$WORKER_PORT:backlog=1024).",
    ),
    Option(
        "unsecured",
        "UNSECURED",
        "unsecured",
        parse_bool,
        "false",
        "Accept requests without a Vast signature (local development only).",
    ),
    Option(
        "use_ssl",
        "USE_SSL",
        "use-ssl",
        parse_bool,
        "false",
        "Serve TLS with --ssl-cert/--ssl-key and advertise an https:// URL.",
    ),
    Option(
        "ssl_cert",
        "SSL_CERT",
        "ssl-cert",
        parse_text,
        "/etc/instance.crt",
        "Certificate (PEM) used when USE_SSL is true.",
    ),
    Option(
        "ssl_key",
        "SSL_KEY",
        "ssl-key",
        parse_text,
        "/etc/instance.key",
        "Private key (PEM) used when USE_SSL is true.",
    ),
    Option(
        "request_timeout",
        "REQUEST_TIMEOUT",
        "request-timeout",
        parse_seconds,
        "0",
        "Give up on a backend call after this many seconds (504); 0 = no limit.",
    ),
    Option(
        "access_log", "ACCESS_LOG", "access-log", parse_bool, "true", "Log one line per request."
    ),
    # Limits and hardening (vast_vespa.net.server)
    Option(
        "max_body_size",
        "MAX_BODY_SIZE",
        "max-body-size",
        parse_size,
        "1G",
        "Largest request body accepted (413 beyond it); k/M/G suffixes allowed.",
    ),
    Option(
        "max_header_size",
        "MAX_HEADER_SIZE",
        "max-header-size",
        parse_size,
        "16k",
        "Largest request line plus headers, in bytes (414/431 beyond it).",
    ),
    Option(
        "max_headers",
        "MAX_HEADERS",
        "max-headers",
        parse_count,
        "100",
        "Most header lines accepted in one request (431 beyond it).",
    ),
    Option(
        "head_timeout",
        "HEAD_TIMEOUT",
        "head-timeout",
        parse_positive_number,
        "30",
        "Seconds a client has from its request's first byte to its last header (408 after).",
    ),
    Option(
        "min_body_rate",
        "MIN_BODY_RATE",
        "min-body-rate",
        parse_size,
        "1k",
        "Slowest request upload accepted, in bytes/s over 10 s windows (408); 0 = off.",
    ),
    Option(
        "max_connections",
        "MAX_CONNECTIONS",
        "max-connections",
        parse_count,
        "2048",
        "Most open client connections; beyond it new ones get 503 and are closed. 0 = off.",
    ),
    Option(
        "backend_connect_timeout",
        "BACKEND_CONNECT_TIMEOUT",
        "backend-connect-timeout",
        parse_seconds,
        "10",
        "Seconds to open a connection to the backend (504 after); 0 = no limit.",
    ),
    Option(
        "backend_first_byte_timeout",
        "BACKEND_FIRST_BYTE_TIMEOUT",
        "backend-first-byte-timeout",
        parse_seconds,
        "0",
        "Seconds for the backend's response headers to arrive (504 after); 0 = no limit.",
    ),
    Option(
        "backend_stall_timeout",
        "BACKEND_STALL_TIMEOUT",
        "backend-stall-timeout",
        parse_seconds,
        "600",
        "Cut a response whose body sends nothing for this many seconds; 0 = no limit.",
    ),
    # The serverless protocol
    Option(
        "signature_shapes",
        "SIGNATURE_SHAPES",
        "signature-shapes",
        parse_signature_shapes,
        "url,five-field",
        "Signed message shapes accepted (url, five-field).",
    ),
    Option(
        "default_cost",
        "DEFAULT_COST",
        "default-cost",
        parse_optional_positive_number,
        "",
        "Workload used when a request's cost is <= 1.",
    ),
    Option(
        "max_wait_time",
        "MAX_WAIT_TIME",
        "max-wait-time",
        parse_seconds,
        "10",
        "Reject with 429 when the estimated queue wait exceeds this many seconds (0 = off).",
    ),
    Option(
        "allow_parallel",
        "ALLOW_PARALLEL",
        "allow-parallel",
        parse_bool,
        "true",
        "Send several requests to the backend at once (false: one at a time, FIFO).",
    ),
    Option(
        "max_concurrency",
        "MAX_CONCURRENCY",
        "max-concurrency",
        parse_count,
        "0",
        "At most this many backend requests at once (0 = no limit).",
    ),
    Option(
        "blocked_paths",
        "BLOCKED_PATHS",
        "blocked-paths",
        parse_words,
        "",
        "Comma-separated fnmatch patterns of paths answered with 403.",
    ),
    Option(
        "verify_url",
        "VERIFY_URL",
        "verify-url",
        parse_bool,
        "false",
        "Reject signed requests whose url is not this worker's public URL.",
    ),
    Option(
        "replay_window",
        "REPLAY_WINDOW",
        "replay-window",
        parse_count,
        "0",
        "Reject a (reqnum, signature) seen among the last N requests (0 = off).",
    ),
    Option(
        "delete_requests_format",
        "DELETE_REQUESTS_FORMAT",
        "delete-requests-format",
        choice("batches", "list"),
        "batches",
        "Body of /delete_requests/: batches (one POST per success flag) or list.",
    ),
    Option(
        "report_interval",
        "METRICS_UPDATE_INTERVAL",
        "report-interval",
        parse_positive_number,
        "1",
        "Seconds between autoscaler report checks.",
    ),
    # Lifecycle
    Option(
        "backend",
        "BACKEND",
        "backend",
        choice("", *BACKEND_PRESETS),
        "",
        "Kind of backend (" + ", ".join(BACKEND_PRESETS) + "): picks the shipped "
        "benchmark when BENCHMARK is not set.",
    ),
    Option(
        "benchmark",
        "BENCHMARK",
        "benchmark",
        parse_benchmark_spec,
        "",
        "module.path:function measuring the backend's throughput.",
    ),
    Option(
        "benchmark_session",
        "BENCHMARK_SESSION",
        "benchmark-session",
        choice("treq", "aiohttp"),
        "treq",
        "Session handed to the benchmark: treq (built in) or aiohttp (Vespa's aiohttp extra).",
    ),
    Option(
        "benchmark_cache",
        "BENCHMARK_CACHE_FILE",
        "benchmark-cache",
        parse_text,
        ".has_benchmark",
        "File caching the benchmark result; delete it to re-benchmark.",
    ),
    Option(
        "benchmark_timeout",
        "BENCHMARK_TIMEOUT",
        "benchmark-timeout",
        parse_seconds,
        "1800",
        "Seconds the benchmark may run before it is cancelled and reported as an error; "
        "0 = no limit.",
    ),
    Option(
        "healthcheck_endpoint",
        "HEALTHCHECK_ENDPOINT",
        "healthcheck-endpoint",
        parse_path,
        "/health",
        "Backend path answering 200 when the model is ready.",
        old_env=("MODEL_HEALTH_ENDPOINT",),
    ),
    Option(
        "ready_timeout",
        "READY_TIMEOUT",
        "ready-timeout",
        parse_positive_number,
        "1200",
        "Seconds to wait for the backend to become healthy on a first start.",
        old_env=("READY_TIMEOUT_INITIAL",),
    ),
    Option(
        "ready_timeout_resume",
        "READY_TIMEOUT_RESUME",
        "ready-timeout-resume",
        parse_positive_number,
        "300",
        "Seconds to wait for the backend when a cached benchmark exists.",
    ),
    Option(
        "healthcheck_retry_interval",
        "HEALTHCHECK_RETRY_INTERVAL",
        "healthcheck-retry-interval",
        parse_positive_number,
        "5",
        "Seconds between readiness probes while the backend loads.",
    ),
    Option(
        "healthcheck_interval",
        "HEALTHCHECK_INTERVAL",
        "healthcheck-interval",
        parse_positive_number,
        "10",
        "Seconds between health probes once loaded.",
        old_env=("HEALTHCHECK_POLL_INTERVAL",),
    ),
    Option(
        "healthcheck_timeout",
        "HEALTHCHECK_TIMEOUT",
        "healthcheck-timeout",
        parse_positive_number,
        "10",
        "Timeout of one health probe, in seconds.",
    ),
    Option(
        "healthcheck_failures",
        "HEALTHCHECK_FAILURES",
        "healthcheck-failures",
        parse_count,
        "3",
        "Consecutive failed probes before the worker reports an error.",
        old_env=("HEALTHCHECK_CONSECUTIVE_FAILURES",),
    ),
    # Operations
    Option(
        "fast_path",
        "FAST_PATH",
        "fast-path",
        parse_bool,
        "true",
        "Use Vespa's fast path through Twisted's internals (checked at start-up; false: stock "
        "Twisted only).",
    ),
    Option(
        "admin_listen",
        "ADMIN_LISTEN",
        "admin-listen",
        parse_admin_listen,
        "tcp:9090:interface=127.0.0.1",
        "Endpoint of the admin listener (/metrics, /healthz, /readyz); none = off.",
    ),
    Option(
        "drain_timeout",
        "DRAIN_TIMEOUT",
        "drain-timeout",
        parse_seconds,
        "30",
        "On shutdown, seconds to let in-flight requests finish.",
    ),
)


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
    """The worker's validated settings. Build with :func:`load_settings`."""

    backend_url: str = "http://localhost:8000"
    worker_port: int = 3000
    listen: tuple[str, ...] = ("tcp:3000:backlog=1024",)
    unsecured: bool = False
    use_ssl: bool = False
    ssl_cert: str = "/etc/instance.crt"
    ssl_key: str = "/etc/instance.key"
    request_timeout: float = 0.0
    access_log: bool = True
    max_body_size: int = 1 << 30
    max_header_size: int = 16384
    max_headers: int = 100
    head_timeout: float = 30.0
    min_body_rate: int = 1024
    max_connections: int = 2048
    backend_connect_timeout: float = 10.0
    backend_first_byte_timeout: float = 0.0
    backend_stall_timeout: float = 600.0
    signature_shapes: tuple[str, ...] = SIGNATURE_SHAPES
    default_cost: float | None = None
    max_wait_time: float = 10.0
    allow_parallel: bool = True
    max_concurrency: int = 0
    blocked_paths: tuple[str, ...] = ()
    verify_url: bool = False
    replay_window: int = 0
    delete_requests_format: str = "batches"
    report_interval: float = 1.0
    backend: str = ""
    benchmark: str = ""
    benchmark_session: str = "treq"
    benchmark_cache: str = ".has_benchmark"
    benchmark_timeout: float = 1800.0
    healthcheck_endpoint: str = "/health"
    ready_timeout: float = 1200.0
    ready_timeout_resume: float = 300.0
    healthcheck_retry_interval: float = 5.0
    healthcheck_interval: float = 10.0
    healthcheck_timeout: float = 10.0
    healthcheck_failures: int = 3
    fast_path: bool = True
    admin_listen: str = "tcp:9090:interface=127.0.0.1"
    drain_timeout: float = 30.0
    vast: VastEnvironment = field(default_factory=VastEnvironment)
    systemd: SystemdEnvironment = field(default_factory=SystemdEnvironment)

    @property
    def benchmark_spec(self) -> str:
        """The benchmark to run: BENCHMARK, else the preset of BACKEND, else empty."""
        return self.benchmark or BACKEND_PRESETS.get(self.backend, "")


def _listen_port(listen: Sequence[str]) -> int | None:
    """The TCP port of the first tcp:/ssl: listener, if any."""
    for description in listen:
        match = re.match(r"(?:tcp|ssl):(?:port=)?(\d+)", description)
        if match:
            return int(match.group(1))
    return None


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
    values = _read_options(OPTIONS, flags, environ)
    if "listen" not in values:
        values["listen"] = (_default_listen(values),)
    elif _listen_port(values["listen"]) is not None and not _given("worker_port", flags, environ):
        values["worker_port"] = _listen_port(values["listen"])
    values["vast"] = _vast_environment(environ, values["worker_port"], values["use_ssl"])
    values["systemd"] = _systemd_environment(environ, os.getpid())
    return Settings(**values)


def _read_options(
    options: Sequence[Option], flags: Mapping[str, str | None], environ: Mapping[str, str]
) -> dict[str, Any]:
    """Parse each option from its flag, else its environment variables, else its default
    (an empty ``listen`` is left out: the caller derives it)."""
    values: dict[str, Any] = {}
    for option in options:
        text, source = option.default, "default"
        for env in option.env_names():
            if env in environ:
                text, source = environ[env], f"environment variable {env}"
                break
        if flags.get(option.name) is not None:
            text, source = str(flags[option.name]), f"flag --{option.flag}"
        if option.name == "listen" and not text.strip():
            continue
        try:
            values[option.name] = option.parse(text)
        except ValueError as e:
            raise SettingsError(f"invalid {option.env}={text!r} (from {source}): {e}") from None
    return values


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
# overflows it and the excess wait for a SYN retry (S3 p99 564 ms; 115 ms with 1024).
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


def _given(name: str, flags: Mapping[str, str | None], environ: Mapping[str, str]) -> bool:
    option = next(option for option in OPTIONS if option.name == name)
    return flags.get(name) is not None or any(env in environ for env in option.env_names())


def option_fields() -> set[str]:
    """Names of the Settings fields that come from OPTIONS (for the consistency test)."""
    return {f.name for f in fields(Settings)} - {"vast", "systemd"}


# The client proxy (``vespa-client``): its own table, read the same way (no PYWORKER_ aliases).

INSTANCES = {
    # instance: (autoscaler /route/ base URL, console base URL for the endpoints API)
    "prod": ("https://run.vast.ai", "https://console.vast.ai"),
    "alpha": ("https://run-alpha.vast.ai", "https://alpha.vast.ai"),
    "candidate": ("https://run-candidate.vast.ai", "https://candidate.vast.ai"),
    "local": ("http://localhost:8080", "http://localhost:8080"),
}


def parse_optional_http_url(text: str) -> str:
    """An http(s) URL, or empty for "derived from --instance"."""
    return parse_http_url(text) if text.strip() else ""


def parse_secret(text: str) -> str:
    """A key: surrounding whitespace (a pasted newline) dropped, never echoed in errors."""
    return text.strip()


CLIENT_OPTIONS: tuple[Option, ...] = (
    Option(
        "endpoint",
        "VAST_ENDPOINT",
        "endpoint",
        parse_text,
        "",
        "Name of the serverless endpoint to call.",
        prefixed=False,
    ),
    Option(
        "api_key",
        "VAST_API_KEY",
        "api-key",
        parse_secret,
        "",
        "The endpoint's API key (wins over --account-key).",
        prefixed=False,
    ),
    Option(
        "account_key",
        "VAST_ACCOUNT_KEY",
        "account-key",
        parse_secret,
        "",
        "Account API key, used to look up the endpoint key (else ~/.vast_api_key).",
        prefixed=False,
    ),
    Option(
        "account_key_file",
        "VAST_ACCOUNT_KEY_FILE",
        "account-key-file",
        parse_text,
        "~/.vast_api_key",
        "File holding the account key (written by the vastai CLI).",
        prefixed=False,
    ),
    Option(
        "instance",
        "VAST_INSTANCE",
        "instance",
        choice(*INSTANCES),
        "prod",
        "Vast instance: prod, alpha, candidate or local (picks the default URLs).",
        prefixed=False,
    ),
    Option(
        "autoscaler_url",
        "VAST_AUTOSCALER_URL",
        "autoscaler-url",
        parse_optional_http_url,
        "",
        "Autoscaler base URL for /route/ (default from --instance).",
        prefixed=False,
    ),
    Option(
        "console_url",
        "VAST_CONSOLE_URL",
        "console-url",
        parse_optional_http_url,
        "",
        "Console base URL for the endpoints API (default from --instance).",
        prefixed=False,
    ),
    Option(
        "listen",
        "VESPA_CLIENT_LISTEN",
        "listen",
        parse_listen,
        "tcp:8010:interface=127.0.0.1",
        "Twisted endpoint string(s) the local proxy listens on.",
        prefixed=False,
    ),
    Option(
        "ca_file",
        "VAST_CA_FILE",
        "ca-file",
        parse_text,
        "",
        "Vast root CA (PEM or DER) for TLS to workers (default: downloaded once, cached).",
        prefixed=False,
    ),
    Option(
        "ca_cache",
        "VESPA_CA_CACHE",
        "ca-cache",
        parse_text,
        "~/.cache/vespa/jvastai_root.cer",
        "Where the downloaded Vast root CA is cached.",
        prefixed=False,
    ),
    Option(
        "forward_authorization",
        "VESPA_FORWARD_AUTHORIZATION",
        "forward-authorization",
        parse_bool,
        "false",
        "Pass the app's Authorization header on to the worker.",
        prefixed=False,
    ),
    Option(
        "cold_start_timeout",
        "VESPA_COLD_START_TIMEOUT",
        "cold-start-timeout",
        parse_seconds,
        "300",
        "Seconds to keep polling /route/ while no worker is ready (503 after).",
        prefixed=False,
    ),
    Option(
        "route_retries",
        "VESPA_ROUTE_RETRIES",
        "route-retries",
        parse_count,
        "3",
        "Retries of a /route/ call that failed with 5xx or a network error.",
        prefixed=False,
    ),
    Option(
        "worker_retries",
        "VESPA_WORKER_RETRIES",
        "worker-retries",
        parse_count,
        "3",
        "Re-routes when a worker answers 429/503 or cannot be reached.",
        prefixed=False,
    ),
    Option(
        "client_timeout",
        "VESPA_CLIENT_TIMEOUT",
        "request-timeout",
        parse_seconds,
        "0",
        "Give up on a worker call after this many seconds (504); 0 = no limit.",
        prefixed=False,
    ),
    Option(
        "fast_path",
        "FAST_PATH",
        "fast-path",
        parse_bool,
        "true",
        "Use Vespa's fast path through Twisted's internals (checked at start-up; false: stock "
        "Twisted only).",
        prefixed=False,
    ),
    Option(
        "client_access_log",
        "VESPA_CLIENT_ACCESS_LOG",
        "access-log",
        parse_bool,
        "true",
        "Log one line per request.",
        prefixed=False,
    ),
)


@dataclass(frozen=True)
class ClientSettings:
    """The client proxy's validated settings. Build with :func:`load_client_settings`."""

    endpoint: str = ""
    api_key: str = ""
    account_key: str = ""
    account_key_file: str = "~/.vast_api_key"
    instance: str = "prod"
    autoscaler_url: str = ""
    console_url: str = ""
    listen: tuple[str, ...] = ("tcp:8010:interface=127.0.0.1",)
    ca_file: str = ""
    ca_cache: str = "~/.cache/vespa/jvastai_root.cer"
    forward_authorization: bool = False
    cold_start_timeout: float = 300.0
    route_retries: int = 3
    worker_retries: int = 3
    client_timeout: float = 0.0
    fast_path: bool = True
    client_access_log: bool = True

    @property
    def route_base(self) -> str:
        """The autoscaler base URL: --autoscaler-url, else the instance's."""
        return self.autoscaler_url or INSTANCES[self.instance][0]

    @property
    def console_base(self) -> str:
        """The console base URL (endpoints API): --console-url, else the instance's."""
        return self.console_url or INSTANCES[self.instance][1]

    def __repr__(self) -> str:
        # Keys never reach logs or tracebacks.
        return f"ClientSettings(endpoint={self.endpoint!r}, instance={self.instance!r})"


def load_client_settings(
    flags: Mapping[str, str | None], environ: Mapping[str, str] | None = None
) -> ClientSettings:
    """
    Build :class:`ClientSettings` from flags and the environment (``os.environ`` unless given);
    ``~`` in file paths is expanded with the environment's HOME.

    @raise SettingsError: for the first bad value, naming the option, its source and the value.
    """
    if environ is None:
        environ = os.environ
    values = _read_options(CLIENT_OPTIONS, flags, environ)
    home = environ.get("HOME", "")
    for name in ("account_key_file", "ca_cache"):
        if values[name].startswith("~/") and home:
            values[name] = home + values[name][1:]
    return ClientSettings(**values)


def client_option_fields() -> set[str]:
    """Names of the ClientSettings fields (for the consistency test)."""
    return {f.name for f in fields(ClientSettings)}
