# -*- test-case-name: tests.test_client_e2e -*-
"""
The client proxy's one resource: any method on any path. Each request is routed with
``/route/``, wrapped in the signed form a worker accepts, and relayed with the shared relay.
A worker that is busy (429/503) or unreachable before any byte was relayed is replaced by
another one (bounded); once bytes were relayed, never.

Request forms (PROTOCOL.md 2.2, 2.3 and the header form of Vespa workers):

- a JSON body: ``{"auth_data": <route reply>, "payload": <the app's bytes, untouched>}``;
- GET/DELETE/HEAD without a body: ``serverless_*`` query parameters after the app's own;
- any other body: ``X-Serverless-Auth: <compact JSON auth_data>`` and the body byte for byte.

Paths under ``/.vespa/`` belong to the proxy itself (``/.vespa/health``) and never reach a worker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar, cast
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from vast_vespa import request_id
from vast_vespa.client.routing import Route, RouteError, Router, backoff
from vast_vespa.client.tls import CertificateError, WorkerTLSPolicy
from vast_vespa.headers import forwarded_request_headers, header_ops
from vast_vespa.outcome import (
    JSON,
    Observer,
    Outcome,
    RelayResult,
    error_body,
    notify,
    outcome_of,
    write_error,
)
from vast_vespa.relay import BytesProducer, ProxiedRequest, body_producer, request_has_body
from vast_vespa.strict_json import MAX_DEPTH, STRICT, nested_deeper
from vast_vespa.worker.envelope import AUTH_HEADER, ENVELOPE_METHODS, QUERY_METHODS
from vast_vespa.workload import Workload

RESERVED_PREFIX = b"/.vespa/"
HEALTH_PATH = b"/.vespa/health"
COST_HEADER = b"x-serverless-cost"
QUERY_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")
RETRY_STATUSES = frozenset({429, 503})

T = TypeVar("T")


def parse_cost(values: Sequence[bytes] | None) -> float | None:
    """The workload from ``X-Serverless-Cost`` (None: not sent); ValueError when malformed."""
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("expected one X-Serverless-Cost header")
    try:
        cost = float(values[0].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"expected a number, got {values[0][:40]!r}") from None
    if not math.isfinite(cost) or cost < 0:
        raise ValueError(f"expected a finite number >= 0, got {values[0][:40]!r}")
    return cost


def _media_type(request: Request) -> bytes:
    value = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
    return value.split(b";", 1)[0].strip().lower()


def json_payload(request: Request, content: _KeepOpen) -> tuple[bytes, Any] | None:
    """The app's body when it goes in the JSON envelope, and that body parsed: a body that
    parses as JSON, sent with a JSON content type (or none), and that the worker reads in an
    envelope (nested at most MAX_DEPTH - 1 levels: the envelope is one more); else None (it
    goes byte for byte, header form)."""
    media = _media_type(request)
    if media and media != JSON and not media.endswith(b"+json"):
        return None
    content.seek(0)
    raw = content.read()
    if not raw.strip() or nested_deeper(raw, MAX_DEPTH - 1):
        return None
    try:
        # Read as the worker reads it inside the envelope: UTF-8 without a BOM, strict JSON
        # (no NaN, Infinity or numbers beyond a float); anything else goes byte for byte.
        text = raw.decode("utf-8")
        if text.startswith("\ufeff"):
            return None
        return raw, json.loads(text, **STRICT)
    except ValueError:  # UnicodeDecodeError is one too
        return None


@dataclass(frozen=True)
class Wrapped:
    """A request in the signed form for one route: where it goes and what it carries."""

    url: bytes
    headers: Headers
    body: IBodyProducer | None


@dataclass(frozen=True)
class Routed:
    """What the proxy tells its observers it forwarded: the workload the request was routed
    with (the cost sent to /route/), which the access line shows as the worker's does."""

    workload: float


class RequestForm:
    """How one app request is wrapped for whichever worker the autoscaler picks."""

    def __init__(
        self, request: Request, cooperator: Cooperator, forward_authorization: bool
    ) -> None:
        self._request = request
        self._cooperator = cooperator
        assert request.content is not None
        self._content = _KeepOpen(request.content)
        self._has_body = request_has_body(request) and _size(self._content) > 0
        # Only these methods carry an envelope (the worker opens no other's body).
        enveloped = self._has_body and request.method in ENVELOPE_METHODS
        found = json_payload(request, self._content) if enveloped else None
        # The body for the envelope, and the same parsed (the workload estimate reads it).
        self.payload: bytes | None = found[0] if found is not None else None
        self.document: Any = found[1] if found is not None else None
        drop = {AUTH_HEADER} | (set() if forward_authorization else {b"authorization"})
        scheme = b"https" if request.isSecure() else b"http"
        self._headers = forwarded_request_headers(
            request.requestHeaders, None, scheme, frozenset(drop), ops=header_ops(request)
        )

    @property
    def kind(self) -> str:
        if self.payload is not None:
            return "json"
        if not self._has_body and self._request.method in QUERY_METHODS:
            return "query"
        return "header"

    def wrap(self, route: Route) -> Wrapped:
        base = route.url.rstrip("/").encode("ascii")
        headers = self._headers.copy()
        uri = self._request.uri
        kind = self.kind
        body: IBodyProducer | None
        if kind == "json":
            assert self.payload is not None
            auth = json.dumps(route.auth_data).encode("ascii")
            envelope = b'{"auth_data": ' + auth + b', "payload": ' + self.payload + b"}"
            headers.setRawHeaders(b"content-type", [JSON])
            body = BytesProducer(envelope)
        elif kind == "query":
            params = "&".join(
                f"serverless_{name}={quote(str(route.auth_data.get(name, '')), safe='')}"
                for name in QUERY_FIELDS
            ).encode("ascii")
            uri = uri + (b"&" if b"?" in uri else b"?") + params
            body = None
        else:
            compact = json.dumps(route.auth_data, separators=(",", ":")).encode("ascii")
            headers.setRawHeaders(AUTH_HEADER, [compact])
            content = cast(IO[bytes], self._content)
            body = body_producer(content, self._cooperator, self._has_body)
        return Wrapped(base + uri, headers, body)


class _KeepOpen:
    """The request body file, re-readable for a retry (FileBodyProducer closes what it read)."""

    def __init__(self, wrapped: IO[bytes]) -> None:
        self._wrapped = wrapped

    def read(self, size: int = -1) -> bytes:
        return self._wrapped.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._wrapped.seek(offset, whence)

    def tell(self) -> int:
        return self._wrapped.tell()

    def close(self) -> None:
        """Leave the real file open: twisted.web closes it when the request is over."""


def _size(content: _KeepOpen) -> int:
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size


class _Pending:
    """The one Deferred a request is waiting on outside the relay (routing, back-off), so that
    an app that disconnects cancels it."""

    def __init__(self, request: Request) -> None:
        self.gone = False
        self._current: Deferred[Any] | None = None
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _: object) -> None:
        self.gone = True
        if self._current is not None:
            self._current.cancel()

    async def wait(self, d: Deferred[T]) -> T:
        if self.gone:
            d.cancel()
        self._current = d
        try:
            return await d
        finally:
            self._current = None


class ClientResource(Resource):
    """Every method, every path: route, wrap, relay; re-route a busy worker (bounded)."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        router: Router,
        agent: IAgent,
        clock: IReactorTime,
        cooperator: Cooperator,
        tls: WorkerTLSPolicy,
        forward_authorization: bool = False,
        worker_retries: int = 3,
        request_timeout: float = 0.0,
        observers: tuple[Observer, ...] = (),
        rand: Callable[[], float] | None = None,
        workload: Workload | None = None,
    ) -> None:
        """``workload``: the /route/ cost of a request sent without X-Serverless-Cost
        (default: the openai estimator)."""
        super().__init__()
        self._workload = workload or Workload("openai")
        self._router = router
        self._agent = agent
        self._clock = clock
        self._cooperator = cooperator
        self._tls = tls
        self._forward_authorization = forward_authorization
        self._worker_retries = worker_retries
        self._timeout = request_timeout
        self._observers = observers
        self._rand = rand or (lambda: 0.5)
        self.in_flight = 0
        self.served = 0
        self.failed = 0

    def render(self, request: Request) -> int | bytes:
        request.defaultContentType = None  # never invent a Content-Type for the worker's body
        if request.path.startswith(RESERVED_PREFIX):
            return self._own(request)
        started = self._clock.seconds()
        self.in_flight += 1
        # Assigned here, so that the proxy's log, the worker's and the backend share one id.
        request_id.assign(request)
        if not request.uri.startswith(b"/"):
            error = RouteError(400, "bad request target", "expected a path")
            self._done(self._refuse(request, error, started), request)
            return NOT_DONE_YET
        try:
            cost = parse_cost(request.requestHeaders.getRawHeaders(COST_HEADER))
        except ValueError as e:
            error = RouteError(400, "invalid X-Serverless-Cost", str(e))
            self._done(self._refuse(request, error, started), request)
            return NOT_DONE_YET
        form = RequestForm(request, self._cooperator, self._forward_authorization)
        if cost is None:  # the app did not say: estimated (WORKLOAD=cost: 1.0, as before)
            cost = 1.0 if self._workload.uses_cost else self._workload.of_payload(form.document)
        served = Deferred.fromCoroutine(self._serve(request, form, cost, started))
        served.addCallback(self._done, request, Routed(cost))
        return NOT_DONE_YET

    def _own(self, request: Request) -> bytes:
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"cache-control", b"no-store")
        if request.path != HEALTH_PATH:
            request.setResponseCode(404)
            return error_body("not found", "/.vespa/ paths are the proxy's own")
        status = {
            "status": "ok",
            "endpoint": self._router.endpoint,
            "in_flight": self.in_flight,
            "served": self.served,
            "failed": self.failed,
        }
        return json.dumps(status).encode()

    async def _serve(
        self, request: Request, form: RequestForm, cost: float, started: float
    ) -> RelayResult:
        pending = _Pending(request)
        request_idx: int | None = None
        try:
            for attempt in range(self._worker_retries + 1):
                route = await pending.wait(self._router.route(cost, request_idx))
                request_idx = route.request_idx
                if route.url.startswith("https:"):
                    await pending.wait(self._tls.ready())
                wrapped = form.wrap(route)
                last = attempt == self._worker_retries
                result = await ProxiedRequest(
                    self._agent,
                    self._clock,
                    request,
                    request.method,
                    wrapped.url,
                    wrapped.headers,
                    wrapped.body,
                    self._timeout,
                    retry_if=_unanswered if last else _worth_retrying,
                    upstream="worker",
                ).start()
                if not result.retry:
                    result.started = started
                    if result.outcome is Outcome.SERVED and result.status == 429:
                        # A busy worker's answer passed on: turned away (the worker logs its
                        # 429 rejected), not served. A 503 is not served already (a 5xx).
                        result.outcome = Outcome.REJECTED
                    return result
                if last:  # the relay's 502 would blame the worker's backend: name the worker
                    error = RouteError(
                        502,
                        "worker unavailable",
                        f"no answer from the worker at {route.url}: {result.reason} "
                        f"(re-routes used up: {attempt})",
                    )
                    return self._refuse(request, error, started, Outcome.ERRORED)
                delay = backoff(attempt, self._rand)
                self._log.info(
                    "worker {url} {why}; re-routing ({n} of {max}) in {delay:.1f} s",
                    url=route.url,
                    why=result.reason,
                    n=attempt + 1,
                    max=self._worker_retries,
                    delay=delay,
                )
                await pending.wait(deferLater(self._clock, delay))
        except CancelledError:
            return self._result(request, Outcome.CANCELLED, 0, started, "client disconnected")
        except RouteError as e:
            return self._refuse(request, e, started)
        except CertificateError as e:
            error = RouteError(502, "worker TLS unavailable", str(e))
            return self._refuse(request, error, started)
        except Exception:
            self._log.failure("client proxy failed on {path}", path=request.path)
            error = RouteError(500, "internal error", "see the vespa-client log")
            return self._refuse(request, error, started)
        raise AssertionError("unreachable: the last attempt always returns")

    def _refuse(
        self,
        request: Request,
        error: RouteError,
        started: float,
        outcome: Outcome = Outcome.REJECTED,
    ) -> RelayResult:
        self._log.warn(
            "{method} {path}: {code} {error}: {detail}",
            method=request.method,
            path=request.path,
            code=error.code,
            error=error.error,
            detail=error.detail,
        )
        write_error(request, error.code, error.error, error.detail, None, **error.extra)
        return self._result(request, outcome, error.code, started, error.error)

    def _result(
        self, request: Request, outcome: Outcome, code: int, started: float, reason: str
    ) -> RelayResult:
        """The result of an answer the proxy wrote itself: its bytes are the body it wrote
        (none when the app was gone), as the access line counts a worker's."""
        return RelayResult(
            outcome, code, request.sentLength, started, None, self._clock.seconds(), reason
        )

    def _done(self, result: RelayResult, request: Request, routed: Routed | None = None) -> None:
        self.in_flight -= 1
        if outcome_of(result) is Outcome.SERVED:  # a worker's 5xx is a failure, as elsewhere
            self.served += 1
        else:
            self.failed += 1
        notify(self._observers, request, result, routed)


def _unanswered(status: int | None) -> bool:
    """No answer at all (on the last attempt): the proxy answers itself, naming the worker."""
    return status is None


def _worth_retrying(status: int | None) -> bool:
    """Another worker may do better: this one is busy, unavailable or unreachable."""
    return status is None or status in RETRY_STATUSES
