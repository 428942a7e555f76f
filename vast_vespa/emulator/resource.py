# -*- test-case-name: tests.test_emulator_resource -*-
"""
The emulator's HTTP API (PROTOCOL.md 3.4, 4, 8): ``/pubkey/``, ``/route/``, ``/worker_status/``,
``/delete_requests/``, the endpoint listing ``/api/v0/endptjobs/``, ``/get_endpoint_workers/``,
and a status page (``/``, plain HTML that refreshes itself) with its JSON twin ``/status``.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from vast_vespa.emulator.registry import Registry, RouteError
from vast_vespa.outcome import error_body
from vast_vespa.strict_json import loads

JSON = b"application/json"


class BadRequest(Exception):
    """An API call refused before the registry saw it (not JSON, wrong method, bad key)."""

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__(code)
        self.code = code
        self.body = body


def _json_body(request: Request) -> Any:
    assert request.content is not None
    raw = request.content.read()
    try:
        return loads(raw)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        raise BadRequest(400, error_body("invalid JSON", f"the body is not JSON: {e}")) from None


def _query(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return value.decode("utf-8", "replace") if value is not None else None


class AutoscalerResource(Resource):
    """Every path of the emulated autoscaler; a development and test tool, not a router."""

    isLeaf = True
    _log = Logger()

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry
        self._routes: dict[tuple[bytes, str], Callable[[Request], tuple[int, Any]]] = {
            (b"GET", "/pubkey"): self._pubkey,
            (b"POST", "/route"): self._route,
            (b"POST", "/worker_status"): self._worker_status,
            (b"POST", "/delete_requests"): self._delete_requests,
            (b"POST", "/get_endpoint_workers"): self._endpoint_workers,
            (b"GET", "/api/v0/endptjobs"): self._endpoint_jobs,
            (b"GET", "/status"): lambda request: (200, self.registry.status()),
            (b"GET", "/"): self._page,
        }

    def render(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace").rstrip("/") or "/"
        method = b"GET" if request.method == b"HEAD" else request.method
        handler = self._routes.get((method, path))
        job = re.fullmatch(r"/api/v0/endptjobs/(\d{1,18})", path)  # int() caps digits
        if job and method == b"GET":
            handler = lambda request: self._endpoint_job(request, int(job.group(1)))  # noqa: E731
        try:
            if handler is None:
                raise self._not_found(path, method)
            code, answer = handler(request)
        except BadRequest as e:
            code, answer = e.code, e.body
        request.setResponseCode(code)
        if isinstance(answer, str):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return answer.encode("utf-8")
        if isinstance(answer, bytes):
            content_type = b"application/x-pem-file" if path == "/pubkey" else JSON
            request.setHeader(b"content-type", content_type)
            return answer
        request.setHeader(b"content-type", JSON)
        return json.dumps(answer).encode("utf-8")

    def _not_found(self, path: str, method: bytes) -> BadRequest:
        if any(known == path for _, known in self._routes):
            allowed = ", ".join(m.decode() for m, known in self._routes if known == path)
            return BadRequest(405, error_body("method not allowed", f"{path}/ accepts {allowed}"))
        return BadRequest(404, error_body("not found", f"the emulator has no {path!r}"))

    # PROTOCOL.md 3.4

    def _pubkey(self, request: Request) -> tuple[int, Any]:
        return 200, self.registry.public_pem

    # PROTOCOL.md 8.1

    def _route(self, request: Request) -> tuple[int, Any]:
        body = _json_body(request)
        key = _header(request, b"authorization") or _query(request, b"api_key")
        if not key and isinstance(body, dict) and isinstance(body.get("api_key"), str):
            key = body["api_key"]
        try:
            reply = self.registry.route(key, body)
        except RouteError as e:
            self._log.info("/route/ refused ({code}): {detail}", code=e.code, detail=e.detail)
            return e.code, error_body(e.error, e.detail)
        if "url" in reply:
            self._log.info(
                "routed request_idx {idx} (cost {cost}) to {url}",
                idx=reply["request_idx"],
                cost=reply["cost"],
                url=reply["url"],
            )
        return 200, reply

    # PROTOCOL.md 4.2 and 4.6

    def _worker_status(self, request: Request) -> tuple[int, Any]:
        return self._checked("/worker_status/", self.registry.report, _json_body(request))

    def _delete_requests(self, request: Request) -> tuple[int, Any]:
        return self._checked(
            "/delete_requests/", self.registry.delete_requests, _json_body(request)
        )

    def _checked(self, path: str, record: Callable[[Any], list[str]], body: Any) -> tuple[int, Any]:
        problems = record(body)
        if not problems:
            return 200, {"ok": True}
        self._log.warn(
            "refused a non-conforming {path} body: {problems}",
            path=path,
            problems="; ".join(problems),
        )
        detail = f"{len(problems)} problem(s): " + "; ".join(problems)
        return 400, {"error": f"non-conforming {path} body", "detail": detail, "problems": problems}

    # PROTOCOL.md 8.5

    def _account(self, request: Request) -> None:
        key = _header(request, b"authorization") or _query(request, b"api_key")
        if not self.registry.is_account_key(key):
            raise BadRequest(
                401,
                error_body(
                    "invalid account API key",
                    "send Authorization: Bearer <account key> (the emulator's --account-key)",
                    success=False,
                ),
            )

    def _endpoint_jobs(self, request: Request) -> tuple[int, Any]:
        self._account(request)
        return 200, {"success": True, "results": self.registry.endpoint_jobs()}

    def _endpoint_job(self, request: Request, endpoint_id: int) -> tuple[int, Any]:
        self._account(request)
        job = next((j for j in self.registry.endpoint_jobs() if j["id"] == endpoint_id), None)
        if job is None:
            return 404, error_body("not found", f"no endpoint with id {endpoint_id}")
        return 200, {"success": True, "result": job}

    def _endpoint_workers(self, request: Request) -> tuple[int, Any]:
        # Refusals are 200 {"error_msg": ...}: the SDK raises on any other status and reads
        # error_msg as "not ready or bad credentials" (vastai serverless client).
        body = _json_body(request)
        if not isinstance(body, dict) or not self.registry.is_account_key(body.get("api_key")):
            return 200, {"error_msg": "api_key: expected the account key"}
        endpoint_id = body.get("id")
        workers = (
            self.registry.endpoint_workers(endpoint_id) if isinstance(endpoint_id, int) else None
        )
        if workers is None:
            return 200, {"error_msg": f"id: no endpoint with id {endpoint_id!r}"}
        return 200, workers

    # The status page

    def _page(self, request: Request) -> tuple[int, Any]:
        return 200, status_page(self.registry.status())


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...], empty: str) -> str:
    if not rows:
        return f"<p><em>{html.escape(empty)}</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "; ".join(str(item) for item in value) or "-"
    return str(value)


def status_page(status: dict[str, Any]) -> str:
    """The status page: plain HTML, refreshed by the browser every 2 s (no script)."""
    endpoints = [{**e, "workers": e["workers"] or None} for e in status["endpoints"]]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='refresh' content='2'><title>Vespa autoscaler emulator</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>"
        "<h1>Vespa autoscaler emulator</h1>"
        f"<p>{html.escape(status['about'])}. Signature shape: <b>{html.escape(status['shape'])}"
        f"</b>. Up {status['uptime']:.0f} s. JSON: <a href='/status'>/status</a>.</p>"
        "<h2>Endpoints</h2>"
        + _table(endpoints, ("name", "id", "workers"), "no endpoint configured")
        + "<h2>Workers</h2>"
        + _table(
            status["workers"],
            (
                "id",
                "url",
                "state",
                "cur_load",
                "max_perf",
                "estimated_wait",
                "last_report_age",
                "routed",
                "num_requests_working",
                "version",
                "error_msg",
            ),
            "no worker has reported yet",
        )
        + "<h2>Recent requests</h2>"
        + _table(
            status["requests"],
            ("request_idx", "endpoint", "cost", "state", "worker_id", "reqnum", "age"),
            "no request routed yet",
        )
        + "<h2>Refused reports</h2>"
        + _table(
            status["refused_reports"],
            ("path", "worker_id", "age", "problems"),
            "every report so far conformed",
        )
        + "</body></html>"
    )
