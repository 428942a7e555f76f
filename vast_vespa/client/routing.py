# -*- test-case-name: tests.test_client_e2e -*-
"""
``/route/`` calls (PROTOCOL.md 8.1): which worker serves a request, and the signed
``auth_data`` to send it. Waits through cold starts (replies without ``url``) by polling with
back-off and jitter, retries autoscaler 5xx and network errors a bounded number of times, and
turns 4xx into a clear error for the app. Every timer runs on the injected clock.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from vast_vespa.client.keys import KeyLookupError
from vast_vespa.deadline import answer_within
from vast_vespa.logs import mask
from vast_vespa.outcome import describe_failure
from vast_vespa.strict_json import loads

# One /route/ HTTP call may take this long before it counts as a network error.
ROUTE_CALL_TIMEOUT = 10.0
# Back-off: first delay, and the longest one (seconds); each delay gets a random jitter.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 5.0


def backoff(attempt: int, rand: Callable[[], float]) -> float:
    """Exponential back-off with jitter: between half and all of min(cap, base * 2**attempt)."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**attempt)
    return ceiling * (0.5 + 0.5 * rand())


@dataclass(frozen=True)
class Route:
    """A worker chosen by the autoscaler and the ``auth_data`` to present to it (the reply
    verbatim: extra keys such as ``__request_id`` kept, numbers as parsed)."""

    url: str
    auth_data: dict[str, Any]

    @property
    def request_idx(self) -> int | None:
        value = self.auth_data.get("request_idx")
        return value if isinstance(value, int) else None


@dataclass
class RouteError(Exception):
    """Routing failed for good; ``code``/``error``/``detail`` are what the app receives."""

    code: int
    error: str
    detail: str
    extra: dict[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} {self.error}: {self.detail}"


class _Retryable(Exception):
    """A /route/ call failed in a way worth another try (5xx, 429, network, bad reply)."""


class Router:
    """Asks the autoscaler for a worker, on behalf of one endpoint and its key."""

    _log = Logger()

    def __init__(
        self,
        http: HTTPClient,
        clock: IReactorTime,
        autoscaler_url: str,
        endpoint: str,
        api_key: Callable[[], Deferred[str]],
        retries: int = 3,
        cold_start_timeout: float = 300.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._http = http
        self._clock = clock
        self._url = autoscaler_url.rstrip("/") + "/route/"
        self.endpoint = endpoint
        self._api_key = api_key
        self._retries = retries
        self._cold_start_timeout = cold_start_timeout
        self._rand = rand

    def route(self, cost: float, request_idx: int | None = None) -> Deferred[Route]:
        """
        A worker for a request of workload ``cost``; ``request_idx`` re-uses the logical request
        the autoscaler assigned earlier (cold-start polling, re-route after a busy worker).
        Fails with :class:`RouteError`; cancelling it stops polling at once.
        """
        return Deferred.fromCoroutine(self._route(cost, request_idx))

    async def _route(self, cost: float, request_idx: int | None) -> Route:
        try:
            key = await self._api_key()
        except KeyLookupError as e:
            raise RouteError(401, "no endpoint key", str(e)) from None
        deadline = self._clock.seconds() + self._cold_start_timeout
        failures = 0
        polls = 0
        while True:
            try:
                reply = await self._call(key, cost, request_idx)
            except _Retryable as e:
                failures += 1
                if failures > self._retries:
                    raise RouteError(
                        502,
                        "autoscaler unavailable",
                        f"{self._url} failed {failures} times; last: {e}",
                    ) from None
                delay = backoff(failures - 1, self._rand)
                self._log.info(
                    "/route/ failed ({why}); retry {n} of {max} in {delay:.1f} s",
                    why=str(e),
                    n=failures,
                    max=self._retries,
                    delay=delay,
                )
                await deferLater(self._clock, delay)
                continue
            failures = 0
            if isinstance(reply.get("request_idx"), int):
                request_idx = reply["request_idx"]
            url = reply.get("url")
            if isinstance(url, str) and url:
                return Route(url, reply)
            # Cold start: no worker ready. Ask again, for the same logical request.
            delay = backoff(polls, self._rand)
            polls += 1
            if self._clock.seconds() + delay > deadline:
                raise RouteError(
                    503,
                    "no worker ready",
                    f"endpoint {self.endpoint!r} had no ready worker within "
                    f"{self._cold_start_timeout:g} s (cold start still going on?)",
                    {"autoscaler_status": reply.get("status")},
                )
            if polls == 1:
                self._log.info(
                    "endpoint {endpoint}: no worker ready yet, waiting (status {status})",
                    endpoint=self.endpoint,
                    status=json.dumps(reply.get("status")),
                )
            await deferLater(self._clock, delay)

    async def _call(self, key: str, cost: float, request_idx: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"endpoint": self.endpoint, "cost": cost}
        if request_idx is not None:
            body["request_idx"] = request_idx
        try:
            posted = self._http.post(
                self._url,
                json=body,
                headers=Headers({b"Authorization": [b"Bearer " + key.encode("utf-8")]}),
            )
            response, text = await answer_within(posted, ROUTE_CALL_TIMEOUT, self._clock)
        except CancelledError:
            raise
        except Exception as e:
            raise _Retryable(describe_failure(Failure(e))) from None
        code = response.code
        if code >= 500 or code == 429:
            raise _Retryable(f"HTTP {code} {_reason(text)}")
        if code >= 400:
            raise self._refused(code, key, text)
        try:
            reply = loads(text)
        except ValueError:
            raise _Retryable("reply is not JSON") from None
        if not isinstance(reply, dict):
            raise _Retryable("reply is not a JSON object")
        return reply

    def _refused(self, code: int, key: str, text: bytes) -> RouteError:
        reason = _reason(text)
        self._log.warn(
            "/route/ refused endpoint {endpoint} with key {key}: {code} {reason}",
            endpoint=self.endpoint,
            key=mask(key),
            code=code,
            reason=reason,
        )
        if code in (401, 403):
            return RouteError(
                code,
                "endpoint key rejected",
                f"the autoscaler refused the key {mask(key)} for endpoint {self.endpoint!r} "
                f"({reason}). /route/ needs the endpoint's API key (vespa-client --list shows "
                "your endpoints; --account-key looks the key up), not the account key.",
            )
        return RouteError(code, "route refused", f"/route/ for {self.endpoint!r}: {reason}")


def _reason(text: bytes) -> str:
    """The autoscaler's error text, short: its JSON ``error``/``detail`` or the raw start."""
    try:
        parsed = loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        for name in ("error", "detail", "msg"):
            if isinstance(parsed.get(name), str):
                return str(parsed[name])[:300]
    return text[:300].decode("utf-8", "replace").strip()
