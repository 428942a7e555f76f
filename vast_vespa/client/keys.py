# -*- test-case-name: tests.test_client_keys -*-
"""
Which key the client routes with (PROTOCOL.md 8.5): ``--api-key`` > ``VAST_API_KEY`` > the
endpoint's key looked up with an account key (``--account-key``, ``VAST_ACCOUNT_KEY``, then the
``~/.vast_api_key`` file the vastai CLI writes) in the console's endpoints API. Keys are masked
wherever they could reach a log or an error message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from vast_vespa.client.settings import ClientSettings
from vast_vespa.deadline import answer_within
from vast_vespa.logs import mask
from vast_vespa.outcome import describe_failure

LIST_TIMEOUT = 10.0


class KeyLookupError(Exception):
    """No usable endpoint key; the message tells the user what to pass."""


@dataclass(frozen=True)
class EndpointInfo:
    """One endpoint of the account, as the endpoints API lists it."""

    name: str
    id: int | None = None
    api_key: str = field(default="", repr=False)


def read_account_key(settings: ClientSettings) -> str:
    """The account key: --account-key / VAST_ACCOUNT_KEY, else the key file, else ""."""
    if settings.account_key:
        return settings.account_key
    try:
        with open(settings.account_key_file, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise KeyLookupError(f"cannot read {settings.account_key_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KeyLookupError(
            f"cannot read {settings.account_key_file}: not text (a Vast API key is plain text)"
        ) from None


def endpoints_url(settings: ClientSettings) -> str:
    instance = quote(settings.instance)
    return f"{settings.console_base}/api/v0/endptjobs/?autoscaler_instance={instance}"


async def list_endpoints(
    http: HTTPClient, clock: IReactorTime, settings: ClientSettings, account_key: str
) -> list[EndpointInfo]:
    """The account's endpoints, sorted by name."""
    url = endpoints_url(settings)
    headers = Headers({b"Authorization": [b"Bearer " + account_key.encode()]})
    try:
        response, text = await answer_within(http.get(url, headers=headers), LIST_TIMEOUT, clock)
    except CancelledError:
        raise
    except Exception as e:
        why = describe_failure(Failure(e))
        raise KeyLookupError(f"cannot list endpoints at {url}: {why}") from None
    if response.code in (401, 403):
        raise KeyLookupError(
            f"the console refused the account key {mask(account_key)} ({response.code}); "
            "pass a valid account key with --account-key or VAST_ACCOUNT_KEY, "
            "or the endpoint key itself with --api-key"
        )
    if response.code != 200:
        raise KeyLookupError(f"listing endpoints at {url} failed with HTTP {response.code}")
    try:
        results = json.loads(text)["results"]
        return sorted(
            (_endpoint(item) for item in results if isinstance(item, dict)),
            key=lambda e: e.name,
        )
    except (ValueError, KeyError, TypeError):
        raise KeyLookupError(f"unexpected reply from {url}") from None


def _endpoint(item: dict[str, Any]) -> EndpointInfo:
    ident = item.get("id")
    return EndpointInfo(
        str(item["endpoint_name"]),
        ident if isinstance(ident, int) else None,
        str(item.get("api_key") or ""),
    )


class EndpointKey:
    """
    The key for ``/route/``, resolved once and remembered. A failed look-up is not remembered:
    the next request tries again (the console may have been briefly unreachable).
    """

    _log = Logger()

    def __init__(self, settings: ClientSettings, http: HTTPClient, clock: IReactorTime) -> None:
        self._settings = settings
        self._http = http
        self._clock = clock
        self._key = settings.api_key

    def get(self) -> Deferred[str]:
        """The endpoint key (fails with :class:`KeyLookupError`)."""
        return Deferred.fromCoroutine(self._get())

    async def _get(self) -> str:
        if self._key:
            return self._key
        settings = self._settings
        account_key = read_account_key(settings)
        if not account_key:
            raise KeyLookupError(
                "no key: pass the endpoint's API key with --api-key or VAST_API_KEY, or an "
                "account key with --account-key, VAST_ACCOUNT_KEY or "
                f"{settings.account_key_file} to look it up"
            )
        endpoints = await list_endpoints(self._http, self._clock, settings, account_key)
        for endpoint in endpoints:
            if endpoint.name == settings.endpoint and endpoint.api_key:
                self._log.info(
                    "using the key {key} of endpoint {name}",
                    key=mask(endpoint.api_key),
                    name=endpoint.name,
                )
                self._key = endpoint.api_key
                return self._key
        names = ", ".join(e.name for e in endpoints) or "none"
        raise KeyLookupError(
            f"endpoint {settings.endpoint!r} not found for account key {mask(account_key)} "
            f"(endpoints: {names})"
        )


def choose_endpoint(
    endpoints: list[EndpointInfo], read: Callable[[str], str], out: TextIO
) -> EndpointInfo:
    """Interactive choice: print the numbered list, read a number or a name."""
    if not endpoints:
        raise KeyLookupError("this account has no serverless endpoints")
    for index, endpoint in enumerate(endpoints, 1):
        out.write(f"{index:3d}  {endpoint.name}\n")
    while True:
        answer = read("Endpoint (number or name): ").strip()
        if answer.isascii() and answer.isdigit() and 1 <= int(answer) <= len(endpoints):
            return endpoints[int(answer) - 1]
        for endpoint in endpoints:
            if endpoint.name == answer:
                return endpoint
        out.write(f"no endpoint {answer!r}{os.linesep}")
