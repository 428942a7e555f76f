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
from collections import OrderedDict
from fnmatch import fnmatchcase
from urllib.parse import unquote

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from vast_vespa.headers import forwarded_request_headers
from vast_vespa.outcome import Outcome, RelayResult
from vast_vespa.relay import BytesProducer
from vast_vespa.signing import VerifiedCache, verify
from vast_vespa.worker.admission import Admission, BadCost, Slot, TooBusy, workload
from vast_vespa.worker.autoscaler import PublicKeyStore
from vast_vespa.worker.envelope import AUTH_HEADER, AuthError, Unwrapped, unwrap, with_payload
from vast_vespa.worker.metrics import WorkerMetrics, outcome_of
from vast_vespa.worker.resource import Forward, Rejection, client_address, passthrough
from vast_vespa.worker.sessions import CREATE as SESSION_CREATE
from vast_vespa.worker.sessions import PATHS as SESSION_PATHS
from vast_vespa.worker.sessions import Sessions

KEY_RETRY_AFTER = b"5"  # seconds, for 503 while the public key is not there yet
JSON = b"application/json"


def path_forms(target: bytes) -> set[str]:
    """
    The path of ``target`` as the backend might understand it: raw, percent-decoded (until
    stable) and normalised (``//``, ``.``, ``..`` collapsed), so no spelling slips past a pattern.
    """
    raw = target.partition(b"?")[0].decode("latin-1")
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
        self._seen: OrderedDict[tuple[int, str], None] = OrderedDict()

    def seen_before(self, reqnum: int, signature: str) -> bool:
        """Whether the pair was seen; remembers it if not."""
        key = (reqnum, signature)
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return False


# The auth header is Vespa's, never the backend's.
AUTH_ONLY = frozenset({AUTH_HEADER})


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
        self._sessions = sessions  # None: MAX_SESSIONS=0, /session/* goes to the backend

    def admit(self, request: Request) -> Forward | Deferred[Forward]:
        if self._sessions is not None and request.path in SESSION_PATHS:
            if request.path != SESSION_CREATE:  # authenticated by the session's auth_data
                return self._sessions.manage(request)
            if request.method != b"POST":
                raise Rejection(405, "method not allowed", "use POST", {b"allow": b"POST"})
        pattern = blocked(request.uri, self._blocked)
        if pattern is not None:
            self._log.info(
                "{path} refused: blocked by {pattern}", path=request.path, pattern=pattern
            )
            raise Rejection(403, "path blocked", f"this path matches BLOCKED_PATHS {pattern!r}")
        assert request.content is not None
        try:
            unwrapped = unwrap(
                request.method,
                request.uri,
                request.getHeader(AUTH_HEADER),
                request.content,
                self._keys is None,
            )
        except AuthError as e:
            raise self._malformed(request, e) from None
        keys = self._keys
        if keys is None:
            return self._admit(request, unwrapped)  # unsecured: nothing to check
        if unwrapped.auth is None:
            raise Rejection(
                401,
                "signature required",
                "send auth_data in the JSON envelope, the X-Serverless-Auth header "
                "or serverless_* query parameters",
            )
        return self._verified(request, unwrapped, keys)

    def _verified(
        self, request: Request, unwrapped: Unwrapped, keys: PublicKeyStore, refresh: bool = True
    ) -> Forward | Deferred[Forward]:
        auth = unwrapped.auth
        assert auth is not None
        if keys.key is None:
            raise Rejection(
                503,
                "not ready",
                "the autoscaler's public key has not been fetched yet",
                {b"retry-after": KEY_RETRY_AFTER},
            )
        if verify(keys.key, auth, self._shapes, self._signatures) is not None:
            return self._hardened(request, unwrapped)
        if refresh and keys.stale():
            # Maybe the key was rotated: fetch it again, then check once more.
            refreshed = keys.refresh()
            return refreshed.addCallback(
                lambda _: self._verified(request, unwrapped, keys, refresh=False)
            )
        raise self._bad_signature(request, auth)

    def _malformed(self, request: Request, error: AuthError) -> Rejection:
        self._log.info(
            "{path} refused: {error}: {detail}",
            path=request.path,
            error=error.error,
            detail=error.detail,
        )
        return Rejection(error.code, error.error, error.detail, extra=error.extra)

    def _bad_signature(self, request: Request, auth: dict[str, object]) -> Rejection:
        self._log.info(
            "{path} refused: signature does not verify (shapes {shapes}, url {url!r})",
            path=request.path,
            shapes=",".join(self._shapes),
            url=auth.get("url"),
        )
        return Rejection(401, "invalid signature", "auth_data is not signed by the autoscaler")

    def _hardened(self, request: Request, unwrapped: Unwrapped) -> Forward | Deferred[Forward]:
        auth = unwrapped.auth
        assert auth is not None
        if self._public_url is not None and auth["url"] != self._public_url:
            self._log.info("{path} refused: signed for {url!r}", path=request.path, url=auth["url"])
            raise Rejection(401, "wrong worker", "auth_data was signed for another worker URL")
        try:
            unwrapped = with_payload(unwrapped)  # read only now that auth_data is verified
        except AuthError as e:
            raise self._malformed(request, e) from None
        # A session's requests all carry the auth_data that opened it: not replays.
        if (
            self._replays is not None
            and unwrapped.session_id is None
            and self._replays.seen_before(auth["reqnum"], auth["signature"])
        ):
            self._log.info(
                "{path} refused: replayed reqnum {reqnum}", path=request.path, reqnum=auth["reqnum"]
            )
            raise Rejection(401, "replayed request", "this auth_data was used before")
        return self._admit(request, unwrapped)

    def _admit(self, request: Request, unwrapped: Unwrapped) -> Forward | Deferred[Forward]:
        auth = unwrapped.auth
        request_idx = None
        if auth is None:
            work = 0.0  # unsecured and not a serverless request: no workload to account
        else:
            request_idx = auth["request_idx"]
            try:
                work = workload(auth["cost"], self._default_cost)
            except BadCost as e:
                raise Rejection(422, "invalid cost", str(e)) from None
        session = None
        if self._sessions is not None and request.path == SESSION_CREATE:
            return self._sessions.create(auth, unwrapped.body, work)
        if unwrapped.session_id is not None:
            if self._sessions is None:
                raise Rejection(410, "invalid session", "sessions are off (MAX_SESSIONS=0)")
            session = self._sessions.use(unwrapped.session_id, auth)
            request_idx = None  # the session reports its request_idx, not its requests
        try:
            self._admission.check()
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
        slot.addErrback(self._left_queue, token)
        return slot.addCallback(self._admitted, forward, token)

    def _left_queue(self, failure: Failure, token: int) -> Failure:
        if failure.check(CancelledError):
            self._metrics.finish(token, Outcome.CANCELLED)
        return failure

    def _admitted(self, slot: Slot, forward: Forward, token: int) -> Forward:
        self._metrics.working(token)

        def done(result: RelayResult) -> None:
            slot.release()
            self._metrics.finish(token, outcome_of(result))

        forward.on_done = done
        return forward

    def _forward(self, request: Request, unwrapped: Unwrapped) -> Forward:
        """The backend request: the client's, minus the auth; an envelope's payload as body."""
        if unwrapped.body is None:
            return passthrough(request, self._cooperator, unwrapped.target, AUTH_ONLY)
        scheme = b"https" if request.isSecure() else b"http"
        headers = forwarded_request_headers(
            request.requestHeaders, client_address(request), scheme, AUTH_ONLY
        )
        headers.setRawHeaders(b"content-type", [JSON])
        return Forward(unwrapped.target, headers, BytesProducer(unwrapped.body))
