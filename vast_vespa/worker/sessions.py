# -*- test-case-name: tests.test_sessions -*-
"""
Sessions (PROTOCOL.md 2.5, 4.4, 5.6): a client reserves a worker with ``/session/create``,
sends requests carrying its ``session_id`` (each one extends its TTL), and ends it with
``/session/end`` (or lets it expire). ``/session/get`` and ``/session/health`` tell whether it
is still open. An open session counts in the reports like a request in flight (its
``request_idx`` and workload, its ``auth_data.cost``); closing it counts it as served.

Authenticated where the official worker is not (PROTOCOL B4, B5, B7): ``/session/create`` is
signed like any request, a request in a session is verified before the session is looked up
and must carry the session's own ``auth_data``, ``/session/end|get|health`` must echo it as
``session_auth``, and session ids come from :mod:`secrets`.
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Request

from vast_vespa.deadline import CallsInFlight, read_body, within
from vast_vespa.net.client import BytesProducer
from vast_vespa.outcome import JSON, Outcome, describe_failure, error_body
from vast_vespa.strict_json import loads
from vast_vespa.worker.envelope import Unwrapped
from vast_vespa.worker.metrics import WorkerMetrics
from vast_vespa.worker.resource import Forward, Rejection

CREATE = b"/session/create"
END = b"/session/end"
GET = b"/session/get"
HEALTH = b"/session/health"
PATHS = frozenset({CREATE, END, GET, HEALTH})
ON_CLOSE_TIMEOUT = 10.0  # seconds for the on_close_route call, as the official worker
SESSION_BODY_LIMIT = 1 << 14  # bytes: /session/end, /get, /health carry a small JSON object
CLOSED_REMEMBERED = 10_000  # ids of closed sessions kept, to say "closed" rather than "unknown"

PostToBackend = Callable[[bytes, bytes], "Deferred[object]"]


def backend_poster(agent: IAgent, backend_url: str) -> PostToBackend:
    """POST a JSON body to a path of the backend (the on_close_route call); the answer is
    read and dropped."""
    base = backend_url.rstrip("/").encode("ascii")

    def post(path: bytes, body: bytes) -> Deferred[object]:
        headers = Headers({b"content-type": [JSON]})
        sent = agent.request(b"POST", base + path, headers, BytesProducer(body))
        return sent.addCallback(read_body)

    return post


def session_body_too_large() -> Rejection:
    """The answer to a session management request whose body is over SESSION_BODY_LIMIT."""
    return Rejection(
        413,
        "request body too large",
        f"a session request's body is a small JSON object (at most {SESSION_BODY_LIMIT} bytes)",
    )


def _backend_path(route: object) -> bool:
    """Whether ``route`` can be the path of a request to the backend, as it is."""
    return (
        isinstance(route, str)
        and route.startswith("/")
        and route.isascii()
        and route.isprintable()
        and " " not in route
    )


def same_auth(given: object, stored: dict[str, Any]) -> bool:
    """Whether ``given`` is the session's auth_data (the signature compared in constant
    time: it is the secret part)."""
    if not isinstance(given, dict):
        return False
    signature = given.get("signature")
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which UTF-8 cannot encode.
    if not isinstance(signature, str) or not hmac.compare_digest(
        signature.encode("utf-8", "surrogatepass"), str(stored["signature"]).encode("utf-8")
    ):
        return False
    return given == stored


@dataclass(eq=False)
class Session:
    session_id: str
    auth: dict[str, Any]
    workload: float
    lifetime: float
    created_at: float
    expiration: float
    on_close_route: str | None
    on_close_payload: Any
    token: int  # the session's entry in the metrics' in-flight table
    requests: set[Request] = field(default_factory=set)
    timer: IDelayedCall | None = None

    def description(self) -> dict[str, Any]:
        """What /session/get answers."""
        return {
            "session_id": self.session_id,
            "auth_data": self.auth,
            "lifetime": self.lifetime,
            "expiration": self.expiration,
            "created_at": self.created_at,
            "on_close_route": self.on_close_route,
            "on_close_payload": self.on_close_payload,
        }


def _answer(code: int, document: Any, workload: float = 0.0) -> Forward:
    """A Forward the worker answers itself: nothing reaches the backend."""
    body = json.dumps(document).encode("utf-8")
    return Forward(b"", Headers(), None, workload, answer=(code, body))


class Sessions(Service):
    """The open sessions of this worker: at most ``max_sessions``, each closed when its TTL
    runs out with no request in flight, or when ended. Their workload (``load``) is in
    cur_load, but no request waits behind a session: admission leaves it out of the wait
    estimate, as the official worker does."""

    name = "sessions"
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        metrics: WorkerMetrics,
        max_sessions: int,
        default_ttl: float = 60.0,
        max_ttl: float = 3600.0,
        post_to_backend: PostToBackend | None = None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._max = max_sessions
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._post = post_to_backend
        self._calling = CallsInFlight()  # on_close_route calls
        self.open: dict[str, Session] = {}
        self.load = 0.0  # workload of the open sessions (read on every admission check)
        self._closed: OrderedDict[str, str] = OrderedDict()  # id -> why it closed

    def stopService(self) -> Deferred[Any]:
        """Wait for the on_close_route calls made (the worker's drain ended every session
        first: :meth:`end_all`), each bounded by ON_CLOSE_TIMEOUT, so that the backend hears
        of the sessions that ended before the worker stops."""
        super().stopService()
        return self._calling.ended()

    def end_all(self) -> None:
        """End every open session as /session/end does (the worker drains: their requests
        are over, or cut)."""
        for session in list(self.open.values()):
            self.close(session, "ended at shutdown")

    # /session/create (reached after the gate verified auth_data)

    def create(self, unwrapped: Unwrapped, work: float) -> Forward:
        """Open a session for a verified envelope (its payload parsed already): 201, or a
        Rejection."""
        auth, document = unwrapped.auth, unwrapped.payload
        if auth is None or unwrapped.form != "envelope":
            raise Rejection(
                422,
                "malformed envelope",
                'a session starts with {"auth_data": {...}, "payload": {"lifetime": seconds}}',
            )
        if not isinstance(document, dict):
            raise Rejection(422, "malformed session", "payload must be a JSON object")
        lifetime = self._lifetime(document.get("lifetime"))
        route = document.get("on_close_route")
        if route is not None and not _backend_path(route):
            raise Rejection(
                422,
                "malformed session",
                "on_close_route must be a path on the backend: /... (printable ASCII, no spaces)",
            )
        if len(self.open) >= self._max:
            self._metrics.reject(work, auth["request_idx"])
            raise Rejection(
                429,
                "too many sessions",
                f"this worker has {len(self.open)} open sessions, MAX_SESSIONS is {self._max}",
                {b"retry-after": b"%d" % math.ceil(min(lifetime, self._default_ttl))},
                workload=work,
            )
        now = self._clock.seconds()
        session_id = secrets.token_urlsafe(16)
        token = self._metrics.start(work, auth["request_idx"])
        self._metrics.working(token)
        session = Session(
            session_id,
            auth,
            work,
            lifetime,
            now,
            now + lifetime,
            route,
            document.get("on_close_payload") if route is not None else None,
            token,
        )
        session.timer = self._clock.callLater(lifetime, self._expired, session)
        self.open[session_id] = session
        self.load += work
        self._log.info(
            "session {id} opened for request_idx {idx} ({lifetime:g} s TTL, workload {work:g})",
            id=session_id,
            idx=auth["request_idx"],
            lifetime=lifetime,
            work=work,
        )
        return _answer(201, {"session_id": session_id, "expiration": session.expiration}, work)

    def _lifetime(self, value: object) -> float:
        if value is None:
            return self._default_ttl
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Rejection(422, "malformed session", "lifetime must be a number of seconds")
        try:
            lifetime = float(value)
        except OverflowError:  # an integer beyond any float
            lifetime = math.inf
        if not 0 < lifetime <= self._max_ttl:
            raise Rejection(
                422,
                "malformed session",
                f"lifetime must be > 0 and at most SESSION_MAX_TTL ({self._max_ttl:g} s), "
                f"got {lifetime:g}",
            )
        return lifetime

    # Requests in a session (reached after the gate verified auth_data)

    def use(self, session_id: str, auth: dict[str, Any] | None) -> Session:
        """The open session a request names, its TTL extended; 410 if it is not open, 401 if
        the request does not carry the session's auth_data."""
        session = self._find(session_id)
        if not same_auth(auth, session.auth):
            raise Rejection(
                401, "invalid session auth", "a session's requests carry its own auth_data"
            )
        self._extend(session)
        return session

    def began(self, session: Session, request: Request) -> None:
        """``request`` of ``session`` is in flight until it is answered (or its client goes):
        the session does not expire meanwhile, and its TTL runs again from then."""
        session.requests.add(request)

        def over(_: object) -> None:
            session.requests.discard(request)
            if self.open.get(session.session_id) is session:
                self._extend(session)

        request.notifyFinish().addBoth(over)

    def _find(self, session_id: str) -> Session:
        session = self.open.get(session_id)
        if session is not None:
            return session
        why = self._closed.get(session_id)
        detail = f"session {session_id} {why}" if why else f"no session {session_id} here"
        raise Rejection(410, "invalid session", detail)

    def _extend(self, session: Session) -> None:
        """The TTL runs again from now (not cumulatively, PROTOCOL B46)."""
        session.expiration = max(session.expiration, self._clock.seconds() + session.lifetime)
        if session.timer is not None and session.timer.active():
            session.timer.reset(session.expiration - self._clock.seconds())

    def _expired(self, session: Session) -> None:
        session.timer = None
        if session.requests:  # never cut a request at work; wait a TTL more
            session.timer = self._clock.callLater(session.lifetime, self._expired, session)
            return
        self.close(session, "expired")

    def close(self, session: Session, why: str) -> Deferred[object] | None:
        """Close ``session``: its requests still in flight are cut, it is reported served, and
        its on_close_route is called (best effort, bounded by ON_CLOSE_TIMEOUT)."""
        if self.open.pop(session.session_id, None) is None:
            return None
        self._closed[session.session_id] = why
        self.load = self.load - session.workload if self.open else 0.0  # no drift when none
        if len(self._closed) > CLOSED_REMEMBERED:
            self._closed.popitem(last=False)
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = None
        for request in list(session.requests):
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        self._metrics.finish(session.token, Outcome.SERVED)
        self._log.info(
            "session {id} {why} after {age:.1f} s",
            id=session.session_id,
            why=why,
            age=self._clock.seconds() - session.created_at,
        )
        return self._on_close(session)

    def _on_close(self, session: Session) -> Deferred[object] | None:
        if session.on_close_route is None or self._post is None:
            return None
        payload = session.on_close_payload
        body = dict(payload) if isinstance(payload, dict) else {}
        if payload is not None and not isinstance(payload, dict):
            body = {"payload": payload}
        body.setdefault("session_id", session.session_id)
        route = session.on_close_route

        def failed(failure: Failure) -> None:
            self._log.warn(
                "on_close_route {route} of session {id} failed: {reason}",
                route=route,
                id=session.session_id,
                reason=describe_failure(failure),
            )

        called = self._post(route.encode("utf-8"), json.dumps(body).encode("utf-8"))
        return self._calling.add(within(called, ON_CLOSE_TIMEOUT, self._clock).addErrback(failed))

    # /session/end, /session/get, /session/health: authenticated by session_auth

    def manage(self, request: Request) -> Forward:
        """Answer a session management request (anything but /session/create)."""
        if request.method != b"POST":
            raise Rejection(405, "method not allowed", "use POST", {b"allow": b"POST"})
        assert request.content is not None
        request.content.seek(0)
        text = request.content.read(SESSION_BODY_LIMIT + 1)
        if len(text) > SESSION_BODY_LIMIT:
            raise session_body_too_large()
        try:
            document = loads(text)
        except ValueError:
            raise Rejection(
                422, "invalid JSON", 'expected {"session_id": ..., "session_auth": {...}}'
            ) from None
        session_id = document.get("session_id") if isinstance(document, dict) else None
        if not isinstance(session_id, str) or not session_id:
            raise Rejection(422, "missing session_id", "expected a session_id string")
        given = document.get("session_auth")
        if request.path == HEALTH:
            session = self.open.get(session_id)
            if session is None:
                return _answer(200, {"ok": False})
            self._authenticate(given, session)
            return _answer(200, {"ok": True})
        session = self._find(session_id)
        self._authenticate(given, session)
        if request.path == GET:
            return _answer(200, session.description())
        self.close(session, "ended")
        return _answer(200, {"ended": True, "removed_session": session_id})

    def _authenticate(self, given: object, session: Session) -> None:
        if not same_auth(given, session.auth):
            raise Rejection(
                401,
                "session_auth is not valid",
                "session_auth must be the auth_data the session was created with",
            )


class SessionEndResource(Resource):
    """The plain-HTTP listener's one route (SESSION_LISTEN; the official worker's
    WORKER_HTTP_PORT): POST /session/end, for the model server to end a session from inside
    the instance. Authenticated like on the main listener, by session_auth."""

    isLeaf = True

    def __init__(self, sessions: Sessions) -> None:
        super().__init__()
        self._sessions = sessions

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", JSON)
        if request.path != END:
            request.setResponseCode(404)
            return error_body("not found", "this listener serves POST /session/end only")
        try:
            forward = self._sessions.manage(request)
        except Rejection as refused:
            request.setResponseCode(refused.code)
            for name, value in refused.headers.items():
                request.setHeader(name, value)
            return error_body(refused.error, refused.detail)
        assert forward.answer is not None
        code, body = forward.answer
        request.setResponseCode(code)
        return body
