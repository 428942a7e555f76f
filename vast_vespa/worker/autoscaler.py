# -*- test-case-name: tests.test_autoscaler -*-
"""
Talking to the Vast autoscaler (PROTOCOL.md 3.4, 4.1, 4.6): its public key, /worker_status/ and
/delete_requests/. Each ``REPORT_ADDR`` entry is tried in order (fail-over, not fan-out); any
2xx is success and the answer is otherwise ignored, so odd headers or bodies cannot break
reporting (B45). ``MASTER_TOKEN`` goes in the bodies and never into a log line in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from vast_vespa.deadline import answer_within
from vast_vespa.logs import mask
from vast_vespa.outcome import describe_failure
from vast_vespa.signing import load_public_key
from vast_vespa.strict_json import loads
from vast_vespa.worker.envelope import dump_json
from vast_vespa.worker.metrics import Finished

# The old Redis-backed address: reports may go there, /delete_requests/ never (PROTOCOL 4.6).
LEGACY_ADDR = "https://cloud.vast.ai/api/v0"
JSON_HEADERS = Headers({b"Content-Type": [b"application/json"]})
# How much of a refusal's body goes into the log line.
ANSWER_SHOWN = 200


class AutoscalerError(Exception):
    """No address accepted the call; the message says what each one answered."""


def pem_from(body: bytes) -> bytes:
    """The PEM text of a /pubkey/ answer, also when it comes as a JSON string."""
    text = body.strip()
    if text.startswith(b'"'):
        decoded = loads(text)
        if isinstance(decoded, str):
            text = decoded.encode("ascii", "replace").strip()
    return text


class AutoscalerClient:
    """The worker's calls to the autoscaler, with fail-over across ``addrs`` in order."""

    _log = Logger()

    def __init__(
        self,
        http: HTTPClient,
        clock: IReactorTime,
        addrs: Sequence[str],
        master_token: str,
        worker_id: int | None,
        timeout: float = 5.0,
        delete_format: str = "batches",
    ) -> None:
        self._http = http
        self._clock = clock
        self.addrs = tuple(addr.rstrip("/") for addr in addrs)
        self.delete_addrs = tuple(addr for addr in self.addrs if addr != LEGACY_ADDR)
        self._token = master_token
        self._worker_id = worker_id or 0
        self._timeout = timeout
        self._delete_format = delete_format

    def describe(self) -> str:
        """For the start-up log line: addresses and the masked token."""
        return f"{', '.join(self.addrs)} (mtoken {mask(self._token)})"

    async def _call(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        """One attempt, bounded by the timeout (headers and body both)."""
        if body is None:
            sent = self._http.request(method, url)
        else:
            sent = self._http.request(method, url, data=body, headers=JSON_HEADERS)
        response, content = await answer_within(sent, self._timeout, self._clock)
        return response.code, content

    def _refused(self, code: int, answer: bytes) -> AutoscalerError:
        """A non-2xx answer, with the start of its body: the autoscaler says there why it
        refused (a 400's list of problems). The token is masked if the body echoes it."""
        text = answer[: ANSWER_SHOWN * 4].decode("utf-8", "replace")
        if self._token:  # before cutting: a token cut in two would no longer match
            text = text.replace(self._token, mask(self._token))
        text = " ".join(text.split())[:ANSWER_SHOWN]
        return AutoscalerError(f"HTTP {code}: {text}" if text else f"HTTP {code}")

    async def _first_ok(
        self, method: str, path: str, bodies: Sequence[bytes | None], addrs: Sequence[str]
    ) -> str:
        """Send ``bodies`` (all of them) to the first of ``addrs`` that takes every one."""
        problems = []
        for addr in addrs:
            try:
                for body in bodies:
                    code, answer = await self._call(method, addr + path, body)
                    if not 200 <= code < 300:
                        raise self._refused(code, answer)
            except CancelledError:
                raise
            except Exception as e:  # any failure of one address: try the next one
                problems.append(f"{addr}: {describe_failure(Failure(e))}")
                continue
            return addr
        raise AutoscalerError("; ".join(problems) or "no REPORT_ADDR")

    def post_status(self, body: dict[str, Any]) -> Deferred[str]:
        """POST /worker_status/; fires with the address that took it."""
        return Deferred.fromCoroutine(
            self._first_ok("POST", "/worker_status/", [dump_json(body)], self.addrs)
        )

    def delete_groups(self, entries: Sequence[Finished]) -> list[list[Finished]]:
        """``entries`` split as the /delete_requests/ bodies carry them: all in one (``list``)
        or one group per success flag (``batches``)."""
        if self._delete_format == "list":
            return [list(entries)] if entries else []
        groups = [[e for e in entries if e.success is success] for success in (True, False)]
        return [group for group in groups if group]

    def delete_bodies(self, entries: Sequence[Finished]) -> list[bytes]:
        """The /delete_requests/ bodies for ``entries`` in the configured form (PROTOCOL 4.6)."""
        return [self._delete_body(group) for group in self.delete_groups(entries)]

    def _delete_body(self, entries: Sequence[Finished]) -> bytes:
        head = {"worker_id": self._worker_id, "mtoken": self._token}
        if self._delete_format == "list":
            requests = [
                {
                    "request_idx": e.request_idx,
                    "success": e.success,
                    "status": e.status,
                    "entered_queue_at": e.entered_queue_at,
                    "work_started_at": e.work_started_at,
                    "work_completed_at": e.work_completed_at,
                }
                for e in entries
            ]
            return dump_json({**head, "requests": requests})
        idxs = [e.request_idx for e in entries]
        return dump_json({**head, "request_idxs": idxs, "success": entries[0].success})

    def post_deletes(self, entries: Sequence[Finished]) -> Deferred[str]:
        """POST /delete_requests/ for ``entries``, all bodies to the same address."""
        bodies: list[bytes | None] = list(self.delete_bodies(entries))
        sending = self._first_ok("POST", "/delete_requests/", bodies, self.delete_addrs)
        return Deferred.fromCoroutine(sending)

    async def _pubkey(self) -> rsa.RSAPublicKey:
        problems = []
        for addr in self.addrs:
            url = addr + "/pubkey/"
            try:
                code, body = await self._call("GET", url, None)
                if not 200 <= code < 300:
                    raise self._refused(code, body)
                return load_public_key(pem_from(body))
            except CancelledError:
                raise
            except Exception as e:  # unreachable, HTTP error or not a key: next address
                problems.append(f"{url}: {describe_failure(Failure(e))}")
        raise AutoscalerError("; ".join(problems) or "no REPORT_ADDR")

    def fetch_pubkey(self) -> Deferred[rsa.RSAPublicKey]:
        """GET /pubkey/ from each address in order until one answers with an RSA key."""
        return Deferred.fromCoroutine(self._pubkey())


class PublicKeyStore(Service):
    """
    The autoscaler's public key: fetched at start-up in the background with retries and
    backoff (requests meanwhile get 503, never a silent accept; the worker is not loaded
    without it), and re-fetched on demand when a signature fails to verify with a key older
    than ``refresh_after`` (key rotation).
    """

    name = "pubkey"
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client: AutoscalerClient,
        first_delay: float = 1.0,
        max_delay: float = 60.0,
        refresh_after: float = 300.0,
    ) -> None:
        self._clock = clock
        self._client = client
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._refresh_after = refresh_after
        self.key: rsa.RSAPublicKey | None = None
        self.problem = "no answer yet"  # why the last fetch failed: "http://a/pubkey/: HTTP 500"
        self._waiters: list[Deferred[None]] = []
        self._attempted = 0.0
        self._delay = first_delay
        self._retry: IDelayedCall | None = None
        self._fetching: Deferred[rsa.RSAPublicKey] | None = None

    def startService(self) -> None:
        super().startService()
        self.refresh()

    def stopService(self) -> None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._fetching is not None:
            self._fetching.cancel()

    def stale(self) -> bool:
        """A failed verification justifies fetching the key again (at most once per
        ``refresh_after``, so forged requests cannot make the worker hammer the autoscaler)."""
        return (
            self.key is not None and self._clock.seconds() - self._attempted >= self._refresh_after
        )

    def when_key(self) -> Deferred[None]:
        """Fires once there is a key (at once if there is); cancelling it ends only this wait."""
        if self.key is not None:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def refresh(self) -> Deferred[None]:
        """Fetch the key now (one fetch at a time); fires when that attempt is over."""
        fetching = self._fetching
        if fetching is None:
            self._retry = None
            self._attempted = self._clock.seconds()
            fetching = self._fetching = self._client.fetch_pubkey()
            fetching.addCallbacks(self._got, self._failed)
        waiter: Deferred[None] = Deferred()
        fetching.addBoth(_fire, waiter)
        return waiter

    def _got(self, key: rsa.RSAPublicKey) -> None:
        self._fetching = None
        changed = self.key is not None and key.public_numbers() != self.key.public_numbers()
        self.key = key
        self._delay = self._first_delay
        self._log.info("autoscaler public key {what}", what="rotated" if changed else "loaded")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _failed(self, failure: Failure) -> None:
        self._fetching = None
        if failure.check(CancelledError) or not self.running:
            return
        self.problem = failure.getErrorMessage()
        self._log.warn(
            "cannot fetch the autoscaler public key ({reason}); retrying in {delay:g} s",
            reason=self.problem,
            delay=self._delay,
        )
        if self.key is None:
            self._retry = self._clock.callLater(self._delay, self.refresh)
            self._delay = min(self._delay * 2, self._max_delay)


def _fire(result: None, waiter: Deferred[None]) -> None:
    waiter.callback(None)
