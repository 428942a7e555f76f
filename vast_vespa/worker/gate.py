# -*- test-case-name: tests.test_gate -*-
"""
The serverless request gate (a RequestGate for WorkerResource): blocked paths -> auth form ->
signature -> optional hardening -> admission -> a Forward whose ``on_done`` records the outcome.

Accounting: only requests that passed every authentication check enter the metrics. Malformed
auth (400/422), bad signatures (401), replays and foreign URLs (401), blocked paths (403) and
requests while no key is available (503) move no load figure and are not sent to
/delete_requests/: their cost and request_idx are whatever the sender wrote, so counting them
would let anyone inflate ``rej_load`` or mark someone else's request as failed. (The reference
workers count 401s as rejected, PROTOCOL 4.4.) A 429 is counted as rejected with its workload.
"""

from __future__ import annotations

import posixpath
from base64 import b64decode
from collections import OrderedDict
from fnmatch import fnmatchcase
from functools import partial
from typing import Any, cast
from urllib.parse import unquote
from weakref import WeakKeyDictionary

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from vast_vespa.headers import (
    carries_key,
    forwarded_request_headers,
    header_ops,
    without_api_key,
)
from vast_vespa.outcome import Outcome, RelayResult
from vast_vespa.relay import BytesProducer
from vast_vespa.signing import VerifiedCache, verify
from vast_vespa.worker.admission import Admission, BadCost, Slot, TooBusy, workload
from vast_vespa.worker.autoscaler import PublicKeyStore
from vast_vespa.worker.envelope import (
    AUTH_HEADER,
    ENVELOPE_METHODS,
    QUERY_METHODS,
    AuthError,
    Unwrapped,
    check_auth,
    from_header,
    from_query,
    leading_auth,
    unwrap,
    with_payload,
)
from vast_vespa.worker.metrics import WorkerMetrics, outcome_of
from vast_vespa.worker.resource import Forward, Rejection, client_address, passthrough
from vast_vespa.worker.sessions import CREATE as SESSION_CREATE
from vast_vespa.worker.sessions import PATHS as SESSION_PATHS
from vast_vespa.worker.sessions import SESSION_BODY_LIMIT, Sessions, session_body_too_large
from vast_vespa.workload import PARSE_LIMIT, Workload

KEY_RETRY_AFTER = b"5"  # seconds, for 503 while the public key is not there yet
JSON = b"application/json"


def path_forms(target: bytes) -> set[str]:
    """
    The path of ``target`` as the backend might understand it: raw, percent-decoded (until
    stable) and normalised (``//``, ``.``, ``..`` collapsed), so no spelling slips past a pattern.
    """
    # Without a fragment (which no request should carry, but backends drop: "/admin#x" is
    # their "/admin") and the query.
    raw = target.partition(b"#")[0].partition(b"?")[0].decode("latin-1")
    forms = {raw}
    current = raw
    for _ in range(3):
        decoded = unquote(current, encoding="latin-1")
        forms.add(decoded)
        if decoded == current:
            break
        current = decoded
    for form in list(forms):
        normal = posixpath.normpath("/" + form.replace("\\", "/"))
        forms.add("/" + normal.lstrip("/"))
    return forms


def blocked(target: bytes, patterns: tuple[str, ...]) -> str | None:
    """The first BLOCKED_PATHS pattern matching any form of the path, or None."""
    if not patterns:
        return None
    forms = path_forms(target)
    for pattern in patterns:
        if any(fnmatchcase(form, pattern) for form in forms):
            return pattern
    return None


class ReplayWindow:
    """The last ``size`` (reqnum, signature) pairs accepted; a repeat is a replay."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: OrderedDict[tuple[int, bytes], None] = OrderedDict()

    def seen_before(self, reqnum: int, signature: str) -> bool:
        """Whether the pair was seen; remembers it if not. The signature counts by its bytes,
        not its base64 spelling: the unused bits of the last character can be set 16 ways for
        the same (verified) signature."""
        key = (reqnum, b64decode(signature))
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return False


def _path(target: bytes) -> bytes:
    """A request target's path, for the log."""
    return target.partition(b"?")[0]


_AUTH_HEADER_NAME = b"X-Serverless-Auth"  # AUTH_HEADER as a header table names it


def _auth_header(request: Request) -> bytes | None:
    """The request's X-Serverless-Auth (its last value, as ``getHeader``), read from its
    header table."""
    values = header_ops(request).table(request.requestHeaders).get(_AUTH_HEADER_NAME)
    return values[-1] if values else None


def _signature_required() -> Rejection:
    return Rejection(
        401,
        "signature required",
        "send auth_data in the JSON envelope, the X-Serverless-Auth header "
        "or serverless_* query parameters",
    )


def _declared_length(request: Request) -> int | None:
    """The request's Content-Length (the channel checked it is one number), if it has one."""
    values = header_ops(request).table(request.requestHeaders).get(b"Content-Length")
    try:
        return int(values[-1]) if values else None
    except ValueError:
        return None


def _not_ready() -> Rejection:
    return Rejection(
        503,
        "not ready",
        "the autoscaler's public key has not been fetched yet",
        {b"retry-after": KEY_RETRY_AFTER},
    )


# Signature shapes that cover ``cost`` (PROTOCOL.md 3.2): with the others (url-only) and
# unsecured, the declared cost is anyone's guess and WORKLOAD estimates the request instead.
COST_SIGNED = frozenset({"five-field"})

# The auth header is Vespa's, never the backend's; nor is the endpoint key (secured: the
# official client sends it as ?api_key= and as Authorization: Bearer), which would land in the
# backend's access log, and make a backend started with its own --api-key answer 401.
AUTH_ONLY = frozenset({AUTH_HEADER})
AUTH_AND_KEY = frozenset({AUTH_HEADER, b"authorization"})


class SignedGate:
    """
    Secured (``keys`` given): only requests signed by the autoscaler reach the backend.
    Unsecured (``keys`` None): auth is unwrapped when present but never checked.
    """

    _log = Logger()

    def __init__(
        self,
        keys: PublicKeyStore | None,
        admission: Admission,
        metrics: WorkerMetrics,
        cooperator: Cooperator,
        shapes: tuple[str, ...] = ("url", "five-field"),
        default_cost: float | None = None,
        blocked_paths: tuple[str, ...] = (),
        public_url: str | None = None,
        replay_window: int = 0,
        workload_estimator: Workload | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self._keys = keys
        self._admission = admission
        self._metrics = metrics
        self._cooperator = cooperator
        self._shapes = shapes
        self._default_cost = default_cost
        self._blocked = blocked_paths
        self._public_url = public_url
        self._replays = ReplayWindow(replay_window) if replay_window > 0 else None
        self._signatures = VerifiedCache()
        self._workload = workload_estimator or Workload("cost")
        self._sessions = sessions  # None: MAX_SESSIONS=0, /session/* goes to the backend
        # Requests refused by the early verdict (from their head or their body's first
        # bytes), until admit answers them.
        self._refused_early: WeakKeyDictionary[Request, Rejection] = WeakKeyDictionary()

    # The early verdict (vast_vespa.net.server.EarlyVerdict), secured only: a request whose
    # auth fails is refused before its body is read, and before 100 Continue (RFC 9110
    # 10.1.1). Only what is decided without waiting is decided here (a signature that fails
    # while the key may have been rotated waits for the key, in admit); the replay window is
    # left to admit, which records what it sees.

    def refuses_head(self, request: Request, method: bytes, target: bytes) -> bool:
        path = _path(target)
        if self._keys is None or self._is_create(path):
            return False
        if self._manages_session(path):
            length = _declared_length(request)
            if length is None or length <= SESSION_BODY_LIMIT:
                return False
            rejection: Rejection | None = session_body_too_large()
        else:
            rejection = self._blocked_path(target)
        if rejection is None:
            header = _auth_header(request)
            try:
                if header is not None:
                    unwrapped: Unwrapped | None = from_header(header, target)
                elif method in QUERY_METHODS:
                    unwrapped = from_query(target)
                elif method in ENVELOPE_METHODS:
                    return False  # an envelope: see refuses_body_start
                else:
                    unwrapped = None  # no form of auth this method can carry
            except AuthError as e:
                rejection = self._malformed(target, e)
            else:
                if unwrapped is None:
                    # No auth at all: refused now, not after a body that cannot change that.
                    rejection = _signature_required()
                else:
                    rejection = self._forged(target, cast(dict[str, Any], unwrapped.auth))
        if rejection is None:
            return False
        self._refused_early[request] = rejection
        return True

    def refuses_body_start(
        self, request: Request, method: bytes, target: bytes, start: bytes
    ) -> bool | None:
        path = _path(target)
        if self._keys is None or self._is_create(path):
            return False
        if self._manages_session(path):
            if len(start) <= SESSION_BODY_LIMIT:
                return None  # ask again with more (the whole body, if it is small, ends it)
            self._refused_early[request] = session_body_too_large()
            return True
        if method not in ENVELOPE_METHODS or _auth_header(request) is not None:
            return False
        try:
            leading = leading_auth(start)
            if leading is None:
                return None  # not there yet, or not leading: admit reads the whole envelope
            rejection = self._forged(target, check_auth(leading[0], 422, "auth_data"))
        except AuthError as e:
            rejection = self._malformed(target, e)
        if rejection is None:
            return False
        self._refused_early[request] = rejection
        return True

    def _forged(self, target: bytes, auth: dict[str, Any]) -> Rejection | None:
        """The refusal of ``auth`` if it is known now not to pass (no key yet, a signature
        that does not verify with a fresh key, signed for another worker)."""
        keys = self._keys
        assert keys is not None
        if keys.key is None:
            return _not_ready()
        if verify(keys.key, auth, self._shapes, self._signatures) is None:
            return None if keys.stale() else self._bad_signature(target, auth)
        if self._public_url is not None and auth["url"] != self._public_url:
            return self._wrong_worker(target, auth)
        return None

    def _blocked_path(self, target: bytes) -> Rejection | None:
        pattern = blocked(target, self._blocked)
        if pattern is None:
            return None
        self._log.info("{path} refused: blocked by {pattern}", path=_path(target), pattern=pattern)
        return Rejection(403, "path blocked", f"this path matches BLOCKED_PATHS {pattern!r}")

    def _is_create(self, path: bytes) -> bool:
        """Whether ``path`` opens one of the worker's own sessions (MAX_SESSIONS > 0): a
        signed request like any other."""
        return self._sessions is not None and path == SESSION_CREATE

    def _manages_session(self, path: bytes) -> bool:
        """Whether ``path`` is /session/end, /get or /health (MAX_SESSIONS > 0): answered by
        the sessions before any signature is checked (the session's auth_data is asked for),
        from a body of at most SESSION_BODY_LIMIT bytes."""
        return self._sessions is not None and path in SESSION_PATHS and path != SESSION_CREATE

    def admit(self, request: Request) -> Forward | Deferred[Forward]:
        # (the early verdict refuses only when secured)
        rejection = self._refused_early.pop(request, None) if self._keys is not None else None
        if rejection is None and self._manages_session(request.path):
            assert self._sessions is not None
            return self._sessions.manage(request)
        if rejection is None and self._is_create(request.path) and request.method != b"POST":
            raise Rejection(405, "method not allowed", "use POST", {b"allow": b"POST"})
        if rejection is None and self._blocked:
            rejection = self._blocked_path(request.uri)
        if rejection is not None:
            raise rejection
        assert request.content is not None
        try:
            unwrapped = unwrap(
                request.method,
                request.uri,
                _auth_header(request),
                request.content,
                self._keys is None,
            )
        except AuthError as e:
            raise self._malformed(request.uri, e) from None
        keys = self._keys
        if keys is None:  # unsecured: nothing to check
            try:
                unwrapped = with_payload(unwrapped)
            except AuthError:
                unwrapped = Unwrapped(None, request.uri)  # malformed: passes untouched
            return self._admit(request, unwrapped)
        if unwrapped.auth is None:
            raise _signature_required()
        return self._verified(request, unwrapped, keys)

    def _verified(
        self, request: Request, unwrapped: Unwrapped, keys: PublicKeyStore, refresh: bool = True
    ) -> Forward | Deferred[Forward]:
        auth = unwrapped.auth
        assert auth is not None
        if keys.key is None:
            raise _not_ready()
        shape = verify(keys.key, auth, self._shapes, self._signatures)
        if shape is not None:
            return self._hardened(request, unwrapped, shape in COST_SIGNED)
        if refresh and keys.stale():
            # Maybe the key was rotated: fetch it again, then check once more.
            refreshed = keys.refresh()
            return refreshed.addCallback(
                lambda _: self._verified(request, unwrapped, keys, refresh=False)
            )
        raise self._bad_signature(request.uri, auth)

    def _malformed(self, target: bytes, error: AuthError) -> Rejection:
        self._log.info(
            "{path} refused: {error}: {detail}",
            path=_path(target),
            error=error.error,
            detail=error.detail,
        )
        return Rejection(error.code, error.error, error.detail, extra=error.extra)

    def _bad_signature(self, target: bytes, auth: dict[str, object]) -> Rejection:
        self._log.info(
            "{path} refused: signature does not verify (shapes {shapes}, url {url!r})",
            path=_path(target),
            shapes=",".join(self._shapes),
            url=auth.get("url"),
        )
        return Rejection(401, "invalid signature", "auth_data is not signed by the autoscaler")

    def _wrong_worker(self, target: bytes, auth: dict[str, Any]) -> Rejection:
        self._log.info("{path} refused: signed for {url!r}", path=_path(target), url=auth["url"])
        return Rejection(401, "wrong worker", "auth_data was signed for another worker URL")

    def _hardened(
        self, request: Request, unwrapped: Unwrapped, cost_signed: bool
    ) -> Forward | Deferred[Forward]:
        auth = unwrapped.auth
        assert auth is not None
        if self._public_url is not None and auth["url"] != self._public_url:
            raise self._wrong_worker(request.uri, auth)
        try:
            unwrapped = with_payload(unwrapped)  # read only now that auth_data is verified
        except AuthError as e:
            raise self._malformed(request.uri, e) from None
        # A session's requests all carry the auth_data that opened it: not replays. Opening
        # one is a request like any other, whatever its envelope says.
        session_use = unwrapped.session_id is not None and not self._is_create(request.path)
        if (
            self._replays is not None
            and not session_use
            and self._replays.seen_before(auth["reqnum"], auth["signature"])
        ):
            self._log.info(
                "{path} refused: replayed reqnum {reqnum}", path=request.path, reqnum=auth["reqnum"]
            )
            raise Rejection(401, "replayed request", "this auth_data was used before")
        return self._admit(request, unwrapped, cost_signed)

    def _admit(
        self, request: Request, unwrapped: Unwrapped, cost_signed: bool = False
    ) -> Forward | Deferred[Forward]:
        auth = unwrapped.auth
        request_idx = None if auth is None else auth["request_idx"]
        session = None
        sessions = self._sessions  # (not _is_create: a call for every request)
        if sessions is not None and request.path == SESSION_CREATE:
            # Its cost, whatever WORKLOAD (PROTOCOL 5.1): a create's payload (lifetime,
            # on_close_route) says nothing of the work the session reserves.
            return sessions.create(unwrapped, self._work_of(request, unwrapped, by_cost=True))
        if unwrapped.session_id is None:
            work = self._work_of(request, unwrapped, cost_signed)
        else:
            if sessions is None:
                raise Rejection(410, "invalid session", "sessions are off (MAX_SESSIONS=0)")
            session = sessions.use(unwrapped.session_id, auth)
            request_idx = None  # the session reports its request_idx, not its requests
            # Its auth_data (and cost) is the session's: WORKLOAD's estimate of the payload
            # (DEFAULT_WORKLOAD with WORKLOAD=cost), as the official worker counts it.
            work = self._admission.bound(self._estimate(request, unwrapped))
        try:
            self._admission.check(work)
        except TooBusy as busy:
            self._metrics.reject(work, request_idx)
            raise Rejection(
                429,
                "too busy",
                f"estimated wait {busy.wait:.1f} s is over MAX_WAIT_TIME {busy.limit:g} s",
                {b"retry-after": b"%d" % busy.retry_after},
                {"estimated_wait": round(busy.wait, 3), "max_wait_time": busy.limit},
                work,
            ) from None
        forward = self._forward(request, unwrapped)
        forward.workload = work
        token = self._metrics.start(work, request_idx)
        if session is not None:
            assert self._sessions is not None
            self._sessions.began(session, request)
        slot = self._admission.acquire()
        if isinstance(slot, Slot):
            return self._admitted(slot, forward, token)
        slot.addErrback(self._left_queue, token, request)
        return slot.addCallback(self._admitted, forward, token)

    def _work_of(self, request: Request, unwrapped: Unwrapped, by_cost: bool) -> float:
        """The workload of this request (or session; not of a request in one, see _admit):
        its ``cost`` (with the DEFAULT_COST rule) where ``by_cost`` (signed, or a session's)
        or WORKLOAD=cost, else WORKLOAD's estimate, bounded by what the worker serves within
        MAX_WAIT_TIME so a forged cost cannot block the queue.

        @raise Rejection: 422 for a cost that cannot be a workload."""
        if unwrapped.auth is None:
            return 0.0  # unsecured and not a serverless request: no workload to account
        try:
            work = workload(unwrapped.auth["cost"], self._default_cost)
        except BadCost as e:
            raise Rejection(422, "invalid cost", str(e)) from None
        if not by_cost and not self._workload.uses_cost:
            work = self._estimate(request, unwrapped)
        return self._admission.bound(work)

    def _estimate(self, request: Request, unwrapped: Unwrapped) -> float:
        """WORKLOAD's estimate of what the backend gets: an envelope's payload (parsed
        already), else the request's own body when it can be JSON."""
        if unwrapped.body is not None:
            return self._workload.of_payload(unwrapped.payload)
        return self._workload.of_body(self._json_body(request))

    @staticmethod
    def _json_body(request: Request) -> bytes | None:
        """The request's body when it can be a JSON payload worth estimating."""
        content = request.content
        if content is None or request.method not in ENVELOPE_METHODS:
            return None
        content.seek(0, 2)
        if content.tell() > PARSE_LIMIT:
            return None  # never read a large upload into memory to estimate it
        content.seek(0)
        if content.read(64).lstrip()[:1] not in (b"{", b"["):
            return None  # not JSON: an upload, an image
        content.seek(0)
        body: bytes = content.read()
        return body

    def _left_queue(self, failure: Failure, token: int, request: Request) -> Failure:
        if failure.check(CancelledError):  # its client left, or the worker cut it
            cut = getattr(request, "cut_reason", "")  # (a VespaRequest's)
            self._metrics.finish(token, Outcome.ERRORED if cut else Outcome.CANCELLED)
        return failure

    def _admitted(self, slot: Slot, forward: Forward, token: int) -> Forward:
        self._metrics.working(token)
        forward.on_done = partial(self._done, slot, token)  # (cheaper to make than a closure)
        return forward

    def _done(self, slot: Slot, token: int, result: RelayResult) -> None:
        slot.release()
        self._metrics.finish(token, outcome_of(result))

    def _forward(self, request: Request, unwrapped: Unwrapped) -> Forward:
        """The backend request: the client's, minus the auth (and, secured, the endpoint key
        the official client adds to every request); an envelope's payload as body."""
        target, drop = unwrapped.target, AUTH_ONLY
        if self._keys is not None:
            target, keys = without_api_key(target)
            if keys and carries_key(request.requestHeaders, keys):
                drop = AUTH_AND_KEY
        if unwrapped.body is None:
            return passthrough(request, self._cooperator, target, drop)
        scheme = b"https" if request.isSecure() else b"http"
        ops = header_ops(request)
        headers = forwarded_request_headers(
            request.requestHeaders,
            client_address(request),
            scheme,
            drop,
            forwarded_host=True,
            ops=ops,
        )
        ops.put(headers, b"Content-Type", [JSON])
        return Forward(target, headers, BytesProducer(unwrapped.body))
