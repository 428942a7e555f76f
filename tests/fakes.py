"""
In-process fake backends (twisted.web resources) for tests through real sockets.

``FakeBackend`` answers by path:

- ``/status/<code>``: that status, a JSON body, and a few custom headers;
- ``/sse?n=N&interval=S&first=F&end=E&length=1``: N server-sent events, S seconds apart, the
  first after F seconds (default at once: in the same write as the headers), the last followed
  by ``data: [DONE]``; the body ends E seconds after that (default at once; ``held``: when the
  test calls the request's entry in ``ends``), chunked unless ``length`` gives it a
  Content-Length;
- ``/firehose?total=N``: N bytes as fast as the connection takes them, as a push producer
  that records when it was paused (backpressure tests);
- ``/big?total=N&cut=M``: N bytes of :func:`big_body` with a Content-Length, written at once;
  with ``cut``, only the first M, then the connection is dropped;
- ``/slow?delay=S``: answers after S seconds (``cancelled`` fires if the proxy hangs up);
- ``/reset``: drops the connection before any response;
- ``/break``: sends headers and part of the body, then drops the connection;
- ``/garbage``: answers bytes that are not HTTP, then closes;
- ``/short``: announces a Content-Length larger than what it sends, then closes;
- ``/huge-head?size=N&count=C``: a 200 whose head carries one N-byte header value, or C
  headers (a backend that breaks the worker's response-head limits);
- ``/health``: 200 (or ``health_code``);
- ``/v1/chat/completions``: a tiny OpenAI-style chat completion (SSE chunks with ``stream``);
- anything else: echoes the request as JSON.

Every request is recorded in ``seen`` as a :class:`SeenRequest`; ``when(predicate)`` says when
something has happened (see :class:`Waiters`).
"""

from __future__ import annotations

import array
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer


@dataclass
class SeenRequest:
    method: bytes
    uri: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes
    client_port: int = 0  # which connection it came on


class WritesKept(StringTransport):
    """A StringTransport that also keeps each write apart (how many there were, and where
    one ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class Waiters:
    """
    ``when(predicate)``: a Deferred that fires once ``predicate()`` holds, checked at once and
    after each request the fake has handled. It fires on the clock's next turn, never in the
    middle of the fake's own work, so a test that goes on from there sees the fake at rest.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiters: list[tuple[Callable[[], object], Deferred[None]]] = []

    def when(self, predicate: Callable[[], object]) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        self._waiters.append((predicate, waiter))
        self.check()
        return waiter

    def check(self) -> None:
        """Fire the waiters whose predicate now holds."""
        for entry in list(self._waiters):
            predicate, waiter = entry
            if predicate():
                self._waiters.remove(entry)
                self._clock.callLater(0, waiter.callback, None)


class Watched(Resource):
    """Serves the resource tree ``root`` unchanged; ``when(predicate)`` is checked each time
    it has answered a request (for servers that are not fakes, such as the emulator: put it
    in place of a site's ``resource``)."""

    isLeaf = True

    def __init__(self, root: Resource, clock: IReactorTime) -> None:
        super().__init__()
        self._root = root
        self._waiters = Waiters(clock)

    def when(self, predicate: Callable[[], object]) -> Deferred[None]:
        return self._waiters.when(predicate)

    def render(self, request: Request) -> bytes | int:
        request.notifyFinish().addBoth(lambda _: self._waiters.check())
        answer: bytes | int = getChildForRequest(self._root, request).render(request)
        return answer


class WatchedClock(Clock):
    """A task.Clock that says when something is scheduled on it, for code that runs on the
    real reactor but sleeps on this clock (:meth:`scheduled`)."""

    def __init__(self, reactor: IReactorTime) -> None:
        super().__init__()
        self._reactor = reactor
        self._watching: list[Deferred[None]] = []

    def scheduled(self) -> Deferred[None]:
        """Fires (on the reactor's next turn) after the next call scheduled on this clock."""
        waiter: Deferred[None] = Deferred()
        self._watching.append(waiter)
        return waiter

    def callLater(self, delay: float, callable: Callable[..., object], *args, **kw):  # type: ignore[no-untyped-def]
        call = super().callLater(delay, callable, *args, **kw)
        watching, self._watching = self._watching, []
        for waiter in watching:
            self._reactor.callLater(0, _fire_once, waiter)
        return call


class CannedHTTP:
    """A stand-in for treq's ``HTTPClient`` whose every call answers ``code`` with ``body`` at
    once or, with ``body`` None, is never answered (a host that takes the request and says
    nothing). ``urls`` records what was asked."""

    def __init__(self, body: bytes | None, code: int = 200) -> None:
        self.body = body
        self.code = code
        self.urls: list[str] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self.request("GET", url)

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self.request("POST", url)

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.urls.append(url)
        body = self.body
        if body is None:
            return Deferred()

        def deliver(protocol: IProtocol) -> None:
            protocol.dataReceived(body)
            protocol.connectionLost(Failure(ResponseDone()))

        return succeed(SimpleNamespace(code=self.code, length=len(body), deliverBody=deliver))


def _fire_once(waiter: Deferred[None]) -> None:
    if not waiter.called:
        waiter.callback(None)


def big_body(total: int) -> bytes:
    """``total`` bytes in which each 4-byte word is its own index: a byte out of place shows."""
    return array.array("I", range((total + 3) // 4)).tobytes()[:total]


def _arg(request: Request, name: bytes, default: bytes) -> bytes:
    args = request.args or {}
    value: bytes = args.get(name, [default])[0]
    return value


def _transport(request: Request) -> ITCPTransport:
    """The connection a request came on: TCP (or iosim's in memory, which acts the same)."""
    return cast(ITCPTransport, request.channel.transport)


@implementer(IPushProducer)
class Firehose:
    """Writes ``total`` bytes as fast as the client takes them; remembers being paused."""

    CHUNK = b"x" * 65536

    def __init__(self, reactor: IReactorTime, request: Request, total: int) -> None:
        self._reactor = reactor
        self._request = request
        self.remaining = total
        self.sent = 0
        self.paused = False
        self.was_paused: Deferred[int] = Deferred()  # fires with bytes sent when first paused
        self.stopped = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._reactor.callLater(0, self._write)

    def _write(self) -> None:
        if self.paused or self.stopped:
            return
        while self.remaining > 0 and not self.paused and not self.stopped:
            chunk = self.CHUNK[: self.remaining]
            self.remaining -= len(chunk)
            self.sent += len(chunk)
            self._request.write(chunk)
        if self.remaining == 0 and not self.stopped:
            self.stopped = True
            self._request.unregisterProducer()
            self._request.finish()

    def pauseProducing(self) -> None:
        self.paused = True
        if not self.was_paused.called:
            self.was_paused.callback(self.sent)

    def resumeProducing(self) -> None:
        self.paused = False
        self._reactor.callLater(0, self._write)

    def stopProducing(self) -> None:
        self.stopped = True


class FakeBackend(Resource):
    """A backend that records what reached it; see the module docstring for its paths."""

    isLeaf = True

    def __init__(self, reactor: IReactorTime) -> None:
        super().__init__()
        self.reactor = reactor
        self.seen: list[SeenRequest] = []
        self.health_code = 200
        self.firehoses: list[Firehose] = []
        self.cancelled: list[Deferred[None]] = []  # one per /slow or /sse request
        self.ends: list[Callable[[], object]] = []  # one per /sse?end=held request
        self._waiters = Waiters(reactor)

    def when(self, predicate: Callable[[], object]) -> Deferred[None]:
        """Fires once ``predicate()`` holds (checked after each request the backend takes)."""
        return self._waiters.when(predicate)

    def arrived(self, count: int = 1) -> Deferred[None]:
        """Fires once ``count`` requests have reached the backend."""
        return self.when(lambda: len(self.seen) >= count)

    def render(self, request: Request) -> bytes | int:
        try:
            return self._render(request)
        finally:
            self._waiters.check()

    def _render(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        self.seen.append(
            SeenRequest(
                request.method,
                request.uri,
                {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
                body,
                getattr(request.getClientAddress(), "port", 0),
            )
        )
        path = request.path
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.split(b"/")[2]))
            request.setHeader(b"content-type", b"application/json; charset=utf-8")
            request.setHeader(b"x-custom", b"kept")
            request.setHeader(b"retry-after", b"7")
            request.setHeader(b"set-cookie", b"a=1")
            return json.dumps({"status": int(path.split(b"/")[2])}).encode()
        if path == b"/health":
            request.defaultContentType = None
            request.setResponseCode(self.health_code)
            return b"ok"
        if path == b"/sse":
            return self._sse(request)
        if path == b"/v1/chat/completions":
            return _chat_completion(request, json.loads(body))
        if path == b"/firehose":
            firehose = Firehose(self.reactor, request, int(_arg(request, b"total", b"1048576")))
            self.firehoses.append(firehose)
            request.setHeader(b"content-type", b"application/octet-stream")
            firehose.start()
            return NOT_DONE_YET
        if path == b"/big":
            total = int(_arg(request, b"total", b"1048576"))
            cut = int(_arg(request, b"cut", b"-1"))
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % total)
            if cut < 0:
                return big_body(total)
            request.write(big_body(total)[:cut])
            # Closed once what was written has gone (a producer still registered, here the
            # channel, paused while the proxy did not read, would keep it open).
            cast(IConsumer, _transport(request)).unregisterProducer()
            _transport(request).loseConnection()
            return NOT_DONE_YET
        if path == b"/slow":
            gone: Deferred[None] = Deferred()
            self.cancelled.append(gone)
            request.notifyFinish().addErrback(lambda _: gone.callback(None))
            delay = float(_arg(request, b"delay", b"1"))
            call = self.reactor.callLater(delay, self._finish_slow, request)
            request.notifyFinish().addErrback(lambda _: call.cancel())
            return NOT_DONE_YET
        if path == b"/reset":
            _transport(request).abortConnection()
            return NOT_DONE_YET
        if path == b"/break":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: one\n\n")
            self.reactor.callLater(0, _transport(request).loseConnection)
            return NOT_DONE_YET
        if path == b"/garbage":
            _transport(request).write(b"\x00\xffnot http at all\r\n\r\n")
            self.reactor.callLater(0, _transport(request).loseConnection)
            return NOT_DONE_YET
        if path == b"/huge-head":
            size = int(_arg(request, b"size", b"0"))
            count = int(_arg(request, b"count", b"0"))
            if size:
                request.setHeader(b"x-huge", b"h" * size)
            for number in range(count):
                request.setHeader(b"x-many-%d" % number, b"1")
            return b"ok"
        if path == b"/short":
            request.setHeader(b"content-length", b"1000")
            request.write(b"only this")
            self.reactor.callLater(0, _transport(request).loseConnection)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
            }
        ).encode()

    def _finish_slow(self, request: Request) -> None:
        request.write(b"slow done")
        request.finish()

    def _sse(self, request: Request) -> int:
        count = int(_arg(request, b"n", b"3"))
        interval = float(_arg(request, b"interval", b"0"))
        end = _arg(request, b"end", b"0")
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        if _arg(request, b"length", b""):
            events = b"".join(b"data: event %d\n\n" % index for index in range(count))
            request.setHeader(b"content-length", b"%d" % len(events + b"data: [DONE]\n\n"))
        request.write(b"")
        gone: Deferred[None] = Deferred()
        self.cancelled.append(gone)
        pending: list[IDelayedCall] = []

        def lost(_: object) -> None:
            for call in pending:
                if call.active():
                    call.cancel()
            gone.callback(None)

        request.notifyFinish().addErrback(lost)

        def send(index: int) -> None:
            request.write(b"data: event %d\n\n" % index)
            if index + 1 < count:
                pending.append(self.reactor.callLater(interval, send, index + 1))
            else:
                request.write(b"data: [DONE]\n\n")
                if end == b"held":
                    self.ends.append(request.finish)
                elif float(end):
                    pending.append(self.reactor.callLater(float(end), request.finish))
                else:
                    request.finish()

        first = float(_arg(request, b"first", b"0"))
        if first:
            pending.append(self.reactor.callLater(first, send, 0))
        else:
            send(0)
        return NOT_DONE_YET


class FakeInferenceAPI(Resource):
    """
    The inference APIs the shipped benchmarks measure, answering at once:

    - ``GET /v1/models``: one model, ``model_id``;
    - ``POST /v1/chat/completions`` (OpenAI): ``usage.completion_tokens`` = ``max_tokens // 2``;
    - ``POST /v1/completions``, ``POST /v1/embeddings`` (OpenAI);
    - ``POST /generate`` (TGI): a ``generated_text``;
    - ``POST /generate/sync`` (ComfyUI JSON API wrapper): a completed job.

    ``payloads`` records every JSON body; with ``fail_status`` set, every ``fail_every``-th
    request (all of them by default) is answered with that status and ``fail_body`` instead. With ``context``
    (tokens; a word is a token), an OpenAI request whose prompt and ``max_tokens`` exceed it
    gets llama-cpp-python's 400; ``max_model_len`` is said in ``/v1/models`` (as vLLM does).
    """

    isLeaf = True

    def __init__(self, model_id: str = "org/model-7b") -> None:
        super().__init__()
        self.model_id = model_id
        self.payloads: list[tuple[bytes, dict]] = []
        self.fail_status: int | None = None
        self.fail_every = 1
        self.context: int | None = None
        self.max_model_len: int | None = None
        self.fail_body = b'{"error": "overloaded"}'

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path != b"/v1/models":
            request.setResponseCode(404)
            return b'{"error": "not found"}'
        model: dict[str, Any] = {"id": self.model_id}
        if self.max_model_len is not None:
            model["max_model_len"] = self.max_model_len
        return json.dumps({"object": "list", "data": [model]}).encode()

    def _too_long(self, payload: dict) -> bytes | None:
        """llama-cpp-python's answer to a request over ``context``, or None."""
        if self.context is None:
            return None
        texts = [m["content"] for m in payload.get("messages", [])]
        texts += [payload.get("prompt", ""), payload.get("input", "")]
        prompt = sum(len(text.split()) for text in texts)
        answer = payload.get("max_tokens", 0)
        if prompt + answer <= self.context:
            return None
        message = (
            f"This model's maximum context length is {self.context} tokens. However, you "
            f"requested {prompt + answer} tokens ({prompt} in the messages, {answer} in the "
            "completion). Please reduce the length of the messages or completion."
        )
        return json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        payload = json.loads(request.content.read())
        self.payloads.append((request.path, payload))
        request.setHeader(b"content-type", b"application/json")
        if self.fail_status is not None and len(self.payloads) % self.fail_every == 0:
            request.setResponseCode(self.fail_status)
            return self.fail_body
        too_long = self._too_long(payload) if request.path.startswith(b"/v1/") else None
        if too_long is not None:
            request.setResponseCode(400)
            return too_long
        if request.path in (b"/v1/chat/completions", b"/v1/completions"):
            tokens = payload["max_tokens"] // 2
            answer = {
                "object": "chat.completion",
                "model": payload["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": tokens},
            }
        elif request.path == b"/v1/embeddings":
            answer = {"object": "list", "data": [{"object": "embedding", "embedding": [0.5]}]}
        elif request.path == b"/generate":
            answer = {"generated_text": "ok"}
        elif request.path == b"/generate/sync":
            answer = {"id": payload["input"]["request_id"], "status": "completed", "output": []}
        else:
            request.setResponseCode(404)
            answer = {"error": "not found"}
        return json.dumps(answer).encode()


class FakeAutoscaler(Resource):
    """
    The autoscaler's worker-facing side: ``/pubkey/`` serves ``pubkey`` (PEM bytes; None: 404),
    ``/worker_status/`` and ``/delete_requests/`` record their JSON bodies in ``statuses`` and
    ``deletes``. ``codes[path]`` overrides the answer's status; a path in ``hang`` does not
    answer until :meth:`release`; a path in ``garbage`` answers bytes that are not HTTP;
    ``refuse(body)`` true: that /delete_requests/ body gets a 500. ``when(predicate)`` says
    when something has happened (checked after each request; ``reactor`` runs its callbacks,
    by default the global one).
    """

    isLeaf = True

    def __init__(self, pubkey: bytes | None = None, reactor: IReactorTime | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default

            reactor = default
        self._waiters = Waiters(reactor)
        self.pubkey = pubkey
        self.codes: dict[bytes, int] = {}
        self.refusal = b"{}"  # the body of a refused report
        self.hang: set[bytes] = set()
        self.hung: list[Request] = []
        self._left: list[Request] = []  # hung requests whose client went away
        self.garbage: set[bytes] = set()
        self.refuse: Callable[[dict], bool] | None = None
        self.pubkey_requests = 0
        self.statuses: list[dict] = []
        self.deletes: list[dict] = []

    def when(self, predicate: Callable[[], object]) -> Deferred[None]:
        """Fires once ``predicate()`` holds (checked after each request the fake takes)."""
        return self._waiters.when(predicate)

    def render(self, request: Request) -> bytes | int:
        try:
            return self._render(request)
        finally:
            self._waiters.check()

    def _render(self, request: Request) -> bytes | int:
        path = request.path
        if path in self.hang:
            self.hung.append(request)
            request.notifyFinish().addErrback(lambda _: self._left.append(request))
            return NOT_DONE_YET
        if path in self.garbage:
            _transport(request).write(b"\x00\xffnot http\r\n\r\n")
            _transport(request).loseConnection()
            return NOT_DONE_YET
        request.setResponseCode(self.codes.get(path, 200))
        if path == b"/pubkey/":
            self.pubkey_requests += 1
            if self.codes.get(path, 200) >= 300:
                return self.refusal
            if self.pubkey is None:
                request.setResponseCode(404)
                return b"no key"
            return self.pubkey
        assert request.content is not None
        if self.codes.get(path, 200) >= 300:
            return self.refusal
        body = json.loads(request.content.read())
        if path == b"/worker_status/":
            self.statuses.append(body)
        elif path == b"/delete_requests/":
            if self.refuse is not None and self.refuse(body):
                request.setResponseCode(500)
                return b"{}"
            self.deletes.append(body)
        request.setHeader(b"content-type", b"application/json")
        return b'{"ok": true}'

    def release(self) -> None:
        """Stop hanging: answer the requests held so far as if they had just arrived."""
        self.hang.clear()
        hung, self.hung = self.hung, []
        for request in hung:
            if request not in self._left:
                request.write(self.render(request))
                request.finish()
        self._waiters.check()

    def deleted(self) -> dict[int, bool]:
        """request_idx -> success flag, from every /delete_requests/ body received."""
        return dict(self.delete_entries())

    def delete_entries(self) -> list[tuple[int, bool]]:
        """Every (request_idx, success) received, in order, repeats included."""
        entries: list[tuple[int, bool]] = []
        for body in self.deletes:
            if "requests" in body:
                entries.extend((r["request_idx"], r["success"]) for r in body["requests"])
            else:
                entries.extend((idx, body["success"]) for idx in body["request_idxs"])
        return entries


def _chat_completion(request: Request, body: dict) -> bytes:
    """An OpenAI-style answer "Hello there" (as SSE chunks when the request streams)."""
    base = {"id": "c1", "created": 1, "model": body.get("model", "m")}
    words = ["Hello", " there"]
    if body.get("stream"):
        request.setHeader(b"content-type", b"text/event-stream")
        chunks = [
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
            }
            for w in words
        ]
        events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
        return b"".join(events) + b"data: [DONE]\n\n"
    request.setHeader(b"content-type", b"application/json")
    message = {"role": "assistant", "content": "".join(words)}
    answer = {
        **base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
    return json.dumps(answer).encode()


class FakeRouter(Resource):
    """
    The autoscaler's client-facing side: ``POST /route/`` answers with ``auth_data`` signed by
    ``key`` (shape ``shape``) for the workers in ``worker_urls`` (round robin), and
    ``GET /api/v0/endptjobs/`` lists endpoints for ``account_key``. Knobs: ``waiting`` (answer
    that many "no worker ready" replies first), ``errors`` (statuses to answer first, one per
    call), ``int_cost`` (echo the cost as a JSON integer). ``calls`` records each /route/ body.
    """

    isLeaf = True

    def __init__(
        self,
        key: rsa.RSAPrivateKey,
        worker_urls: list[str],
        endpoint: str = "my-endpoint",
        api_key: str = "endpoint-key-0123456789",
        account_key: str = "account-key-0123456789",
        shape: str = "url",
    ) -> None:
        super().__init__()
        self.key = key
        self.worker_urls = worker_urls
        self.endpoint = endpoint
        self.api_key = api_key
        self.account_key = account_key
        self.shape = shape
        self.waiting = 0
        self.errors: list[int] = []
        self.int_cost = False
        self.calls: list[dict] = []
        self._reqnum = 0
        self._request_idx = 100

    def _bearer(self, request: Request) -> str:
        value = request.getHeader(b"authorization") or b""
        return value.decode().removeprefix("Bearer ")

    def _json(self, request: Request, code: int, body: object) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def render_GET(self, request: Request) -> bytes:
        if request.path != b"/api/v0/endptjobs/":
            return self._json(request, 404, {"error": "not found"})
        if self._bearer(request) != self.account_key:
            return self._json(request, 401, {"error": "bad account key"})
        results = [
            {"id": 7, "endpoint_name": self.endpoint, "api_key": self.api_key},
            {"id": 8, "endpoint_name": "another", "api_key": "another-key-0123456789"},
        ]
        return self._json(request, 200, {"success": True, "results": results})

    def render_POST(self, request: Request) -> bytes:
        from vast_vespa.signing import sign

        if request.path != b"/route/":
            return self._json(request, 404, {"error": "not found"})
        assert request.content is not None
        body = json.loads(request.content.read())
        self.calls.append(body)
        if self._bearer(request) != self.api_key:
            return self._json(request, 401, {"error": "invalid api key"})
        if self.errors:
            code = self.errors.pop(0)
            return self._json(request, code, {"error": f"fake error {code}"})
        request_idx = body.get("request_idx")
        if request_idx is None:
            self._request_idx += 1
            request_idx = self._request_idx
        if self.waiting:
            self.waiting -= 1
            reply = {
                "endpoint": self.endpoint,
                "status": {"loading": 1},
                "request_idx": request_idx,
                "__request_id": "wait",
            }
            return self._json(request, 200, reply)
        url = self.worker_urls[self._reqnum % len(self.worker_urls)]
        self._reqnum += 1
        cost = body["cost"]
        auth = {
            "__request_id": f"req-{self._reqnum}",
            "cost": int(cost) if self.int_cost else float(cost),
            "endpoint": self.endpoint,
            "reqnum": self._reqnum,
            "request_idx": request_idx,
            "url": url,
        }
        auth["signature"] = sign(self.key, auth, self.shape)
        return self._json(request, 200, auth)


@dataclass
class Verified:
    form: str  # "json", "query" or "header"
    auth_data: dict


class FakeSecuredWorker(Resource):
    """
    A worker that checks the signature of the three request forms with ``public_key``
    (401 otherwise), unwraps the request and hands it to ``backend`` (a FakeBackend) as the
    app sent it. ``busy`` answers that many requests with 429 first. ``verified`` records
    every accepted request.
    """

    isLeaf = True

    def __init__(
        self,
        public_key: rsa.RSAPublicKey,
        backend: FakeBackend,
        shapes: tuple[str, ...] = ("url", "five-field"),
    ) -> None:
        super().__init__()
        self.public_key = public_key
        self.backend = backend
        self.shapes = shapes
        self.busy = 0
        self.verified: list[Verified] = []
        self.refused = 0

    def render(self, request: Request) -> bytes | int:
        from urllib.parse import parse_qsl

        from vast_vespa.signing import verify

        assert request.content is not None
        if self.busy:
            self.busy -= 1
            request.setResponseCode(429)
            return b""
        body = request.content.read()
        header = request.getHeader(b"x-serverless-auth")
        path, _, query = request.uri.partition(b"?")
        params = query.split(b"&") if query else []
        signed = [p for p in params if p.startswith(b"serverless_")]
        if header is not None:
            form, auth = "header", json.loads(header)
            request.requestHeaders.removeHeader(b"x-serverless-auth")
        elif signed:
            form, auth = "query", {}
            for name, value in parse_qsl(b"&".join(signed).decode(), keep_blank_values=True):
                field = name.removeprefix("serverless_")
                if field == "cost":
                    auth[field] = float(value) if "." in value else int(value)
                elif field in ("reqnum", "request_idx"):
                    auth[field] = int(value)
                else:
                    auth[field] = value
            rest = [p for p in params if not p.startswith(b"serverless_")]
            request.uri = path + (b"?" + b"&".join(rest) if rest else b"")
        elif body.startswith(b'{"auth_data": '):
            form = "json"
            envelope = json.loads(body)
            auth = envelope["auth_data"]
            marker = b', "payload": '
            body = body[body.index(marker, len(b'{"auth_data": ')) + len(marker) : -1]
            assert json.loads(body) == envelope["payload"]
        else:
            form, auth = "none", {}
        if verify(self.public_key, auth, self.shapes) is None:
            self.refused += 1
            request.setResponseCode(401)
            return json.dumps({"error": "invalid signature", "form": form}).encode()
        self.verified.append(Verified(form, auth))
        request.content = io.BytesIO(body)
        if b"content-length" in [k.lower() for k, _ in request.requestHeaders.getAllRawHeaders()]:
            request.requestHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        return self.backend.render(request)
