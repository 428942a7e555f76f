# -*- test-case-name: tests.test_client_tap,tests.test_client_keys -*-
"""
The client proxy's options (``vespa-client``), each declared once (see :mod:`vast_vespa.options`)
as a field of :class:`ClientSettings`: read like the worker's, without ``PYWORKER_`` aliases.

``python -m vast_vespa.client.settings --markdown`` prints the README's table of these options.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from vast_vespa.options import (
    choice,
    markdown_command,
    option,
    parse_bool,
    parse_count,
    parse_http_url,
    parse_listen,
    parse_seconds,
    parse_text,
    read_options,
)
from vast_vespa.workload import parse_workload_spec

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


@dataclass(frozen=True)
class ClientSettings:
    """The client proxy's validated settings. Build with :func:`load_client_settings`."""

    endpoint: str = option(
        "VAST_ENDPOINT",
        "endpoint",
        parse_text,
        "",
        "Name of the serverless endpoint to call.",
    )
    api_key: str = option(
        "VAST_API_KEY",
        "api-key",
        parse_secret,
        "",
        "The endpoint's API key (wins over --account-key).",
    )
    account_key: str = option(
        "VAST_ACCOUNT_KEY",
        "account-key",
        parse_secret,
        "",
        "Account API key, used to look up the endpoint key (else ~/.vast_api_key).",
    )
    account_key_file: str = option(
        "VAST_ACCOUNT_KEY_FILE",
        "account-key-file",
        parse_text,
        "~/.vast_api_key",
        "File holding the account key (written by the vastai CLI).",
    )
    instance: str = option(
        "VAST_INSTANCE",
        "instance",
        choice(*INSTANCES),
        "prod",
        "Vast instance: prod, alpha, candidate or local (picks the default URLs).",
    )
    autoscaler_url: str = option(
        "VAST_AUTOSCALER_URL",
        "autoscaler-url",
        parse_optional_http_url,
        "",
        "Autoscaler base URL for /route/ (default from --instance).",
    )
    console_url: str = option(
        "VAST_CONSOLE_URL",
        "console-url",
        parse_optional_http_url,
        "",
        "Console base URL for the endpoints API (default from --instance).",
    )
    listen: tuple[str, ...] = option(
        "VESPA_CLIENT_LISTEN",
        "listen",
        parse_listen,
        "tcp:8010:interface=127.0.0.1",
        "Twisted endpoint string(s) the local proxy listens on.",
        repeatable=True,
    )
    ca_file: str = option(
        "VAST_CA_FILE",
        "ca-file",
        parse_text,
        "",
        "Vast root CA (PEM or DER) for TLS to workers (default: downloaded once, cached).",
    )
    ca_cache: str = option(
        "VESPA_CA_CACHE",
        "ca-cache",
        parse_text,
        "~/.cache/vespa/jvastai_root.cer",
        "Where the downloaded Vast root CA is cached.",
    )
    forward_authorization: bool = option(
        "VESPA_FORWARD_AUTHORIZATION",
        "forward-authorization",
        parse_bool,
        "false",
        "Pass the app's Authorization header on to the worker.",
    )
    cold_start_timeout: float = option(
        "VESPA_COLD_START_TIMEOUT",
        "cold-start-timeout",
        parse_seconds,
        "300",
        "Seconds to keep polling /route/ while no worker is ready (503 after).",
    )
    route_retries: int = option(
        "VESPA_ROUTE_RETRIES",
        "route-retries",
        parse_count,
        "3",
        "Retries of a /route/ call that failed with 5xx or a network error.",
    )
    worker_retries: int = option(
        "VESPA_WORKER_RETRIES",
        "worker-retries",
        parse_count,
        "3",
        "Re-routes when a worker answers 429/503 or cannot be reached.",
    )
    client_timeout: float = option(
        "VESPA_CLIENT_TIMEOUT",
        "request-timeout",
        parse_seconds,
        "0",
        "Give up on a worker call after this many seconds (504); 0 = no limit.",
    )
    workload: str = option(
        "VESPA_WORKLOAD",
        "workload",
        parse_workload_spec,
        "openai",
        "/route/ cost of a request without X-Serverless-Cost: openai, tgi, comfyui (estimated "
        "from the payload, as the worker does), cost (1.0) or module.path:function.",
    )
    client_access_log: bool = option(
        "VESPA_CLIENT_ACCESS_LOG",
        "access-log",
        parse_bool,
        "true",
        "Log one line per request.",
    )
    fast_path: bool = option(
        "FAST_PATH",
        "fast-path",
        parse_bool,
        "true",
        "Use Vespa's fast path through Twisted's internals (checked at start-up; false: stock "
        "Twisted only).",
    )

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
    values = read_options(ClientSettings, flags, environ)
    home = environ.get("HOME", "")
    for name in ("account_key_file", "ca_cache"):
        if values[name].startswith("~/") and home:
            values[name] = home + values[name][1:]
    return ClientSettings(**values)


if __name__ == "__main__":
    raise SystemExit(markdown_command(ClientSettings, "vast_vespa.client.settings", sys.argv[1:]))
