"""
The client proxy end to end, through real sockets: app -> vespa-client -> fake autoscaler
(/route/, signing with a key made here) -> fake secured worker (checks the signature of each
request form) -> FakeBackend.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.iweb import IAgent

from tests.fakes import CannedHTTP, FakeBackend, FakeRouter, FakeSecuredWorker, WatchedClock
from tests.helpers import RawClient, http_client, listen, raw_connect, start_signed_worker
from tests.memory import Recorder
from tests.test_logs import capture
from vast_vespa.client.routing import BACKOFF_CAP, ROUTE_CALL_TIMEOUT, RouteError, Router
from vast_vespa.client.service import ClientService, build_client
from vast_vespa.client.settings import ClientSettings
from vast_vespa.outcome import Outcome
from vast_vespa.signing import generate_private_key
from vast_vespa.strict_json import MAX_DEPTH

KEY = generate_private_key()  # one per test run: real RSA, made here


def _backoffs(clock: Clock) -> list[float]:
    """When the pending back-off timers fire (not the longer call timeouts)."""
    now = clock.seconds()
    times = [call.getTime() for call in clock.getDelayedCalls()]
    return [t for t in times if t - now <= BACKOFF_CAP]


async def pump(clock: WatchedClock, done: Deferred[Any]) -> None:
    """Advance ``clock`` whenever the client sleeps on it, until ``done`` has a result
    (``done.called`` is already true while it waits on an inner Deferred)."""
    finished: list[bool] = []
    wake: Deferred[None] = Deferred()

    def mark(result: object) -> object:
        finished.append(True)
        if not wake.called:
            wake.callback(None)
        return result

    done.addBoth(mark)
    while not finished:
        if _backoffs(clock):
            clock.advance(min(_backoffs(clock)) - clock.seconds())
            continue
        wake = clock.scheduled()  # a back-off (or a call timeout) scheduled, or the end
        await wake


class _FirstTimesOut:
    """An agent whose first connection attempt times out, then sends through ``agent``."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.calls = 0

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        if self.calls == 1:
            return fail(ConnectTimeout("connection timed out"))
        return cast(Deferred[Any], self.agent.request(*args, **kwargs))


class ClientTestCase(TestCase):
    """A client proxy in front of a fake autoscaler and ``workers`` fake secured workers."""

    workers = 1

    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.fake_workers = [
            FakeSecuredWorker(KEY.public_key(), self.backend) for _ in range(self.workers)
        ]
        worker_urls = [listen(self, worker) for worker in self.fake_workers]
        self.autoscaler = FakeRouter(KEY, worker_urls)
        self.autoscaler_url = listen(self, self.autoscaler)
        self.clock = WatchedClock(reactor)
        self.http = http_client(self)

    def start_client(self, **changes: Any) -> str:
        values: dict[str, Any] = {
            "endpoint": self.autoscaler.endpoint,
            "api_key": self.autoscaler.api_key,
            "autoscaler_url": self.autoscaler_url,
            "instance": "local",
            "listen": (),
            "client_access_log": False,
        }
        values.update(changes)
        self.service: ClientService = build_client(
            ClientSettings(**values), reactor, clock=self.clock, rand=lambda: 0.5
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return listen(self, self.service.site)

    def recorder(self) -> Recorder:
        """Records what the client proxy's observers are told from now on."""
        recorder = Recorder()
        resource = self.service.resource
        resource._observers = (*resource._observers, recorder)
        return recorder

    async def hang_up_during_slow_request(self, url: str) -> None:
        """Start a slow request through the client, hang up, wait for the backend to see it."""
        client = await raw_connect(
            url, RawClient(b"GET /slow?delay=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        await self.backend.arrived()
        client.tcp.loseConnection()
        await self.backend.cancelled[0]

    async def call(self, method: str, url: str, **kwargs: Any) -> tuple[Any, bytes]:
        """A request whose back-off timers are driven by the test clock."""
        pending = self.http.request(method, url, **kwargs)
        await pump(self.clock, pending)
        response = await pending
        body = await response.content()
        return response, body


class FormsTests(ClientTestCase):
    async def test_json_body_in_envelope_byte_for_byte(self) -> None:
        """A JSON POST reaches the backend byte for byte, wrapped in a signed envelope; the
        status, headers and body come back; the app's Authorization header stays behind."""
        url = self.start_client()
        payload = b'{"model": "m",  "x": 1.50, "s": "caf\xc3\xa9"}'
        response, body = await self.call(
            "POST",
            url + "/v1/echo?keep=1",
            data=payload,
            headers={
                b"content-type": [b"application/json"],
                b"authorization": [b"Bearer sk-app-secret"],
                b"x-app": [b"yes"],
            },
        )
        self.assertEqual(response.code, 200)
        echoed = json.loads(body)
        self.assertEqual(echoed["body_sha256"], hashlib.sha256(payload).hexdigest())
        self.assertEqual(self.fake_workers[0].verified[0].form, "json")
        seen = self.backend.seen[0]
        self.assertEqual(seen.body, payload)
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.uri, b"/v1/echo?keep=1")
        self.assertEqual(seen.headers[b"x-app"], [b"yes"])
        self.assertNotIn(b"authorization", seen.headers)
        auth = self.fake_workers[0].verified[0].auth_data
        self.assertEqual(auth["__request_id"], "req-1")  # route reply passed verbatim
        # No X-Serverless-Cost and no max_tokens: the openai estimate's default, 100.
        self.assertEqual(self.autoscaler.calls[0], {"endpoint": "my-endpoint", "cost": 100.0})

    async def test_forward_authorization_when_asked(self) -> None:
        """With --forward-authorization the app's Authorization header reaches the worker."""
        url = self.start_client(forward_authorization=True)
        await self.call("GET", url + "/x", headers={b"authorization": [b"Bearer app"]})
        self.assertEqual(self.backend.seen[0].headers[b"authorization"], [b"Bearer app"])

    async def test_get_with_query_auth_keeps_repeated_params(self) -> None:
        """A GET carries the signature in serverless_* parameters after the app's own query
        string, whose repeated parameters arrive intact; + in signatures survives (%2B)."""
        url = self.start_client()
        for _ in range(4):  # several signatures: some contain + and /
            await self.call("GET", url + "/v1/models?a=1&a=2&b=x%20y")
        for seen in self.backend.seen:
            self.assertEqual(seen.uri, b"/v1/models?a=1&a=2&b=x%20y")
            self.assertEqual(seen.method, b"GET")
        self.assertEqual([v.form for v in self.fake_workers[0].verified], ["query"] * 4)
        self.assertEqual(self.fake_workers[0].refused, 0)

    async def test_head_stays_head(self) -> None:
        """HEAD goes to the worker as HEAD (query form), and its answer carries no body."""
        url = self.start_client()
        response, body = await self.call("HEAD", url + "/v1/models?a=1")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(self.backend.seen[0].method, b"HEAD")
        self.assertEqual(self.fake_workers[0].verified[0].form, "query")

    async def test_int_cost_stays_int_in_five_field_signature(self) -> None:
        """A route reply with an integer cost is sent as serverless_cost=1 (str of the int), so a
        five-field signature over the int still verifies at the worker."""
        self.autoscaler.shape = "five-field"
        self.autoscaler.int_cost = True
        self.fake_workers[0].shapes = ("five-field",)
        url = self.start_client()
        response, _ = await self.call("DELETE", url + "/items/3")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.fake_workers[0].verified[0].auth_data["cost"], 100)

    async def test_binary_upload_byte_for_byte(self) -> None:
        """A binary upload (not JSON) goes with the X-Serverless-Auth header form, byte for
        byte, including bodies large enough to be spooled to disk."""
        url = self.start_client()
        data = os.urandom(300_000)
        response, body = await self.call(
            "POST",
            url + "/upload",
            data=data,
            headers={b"content-type": [b"application/octet-stream"]},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["body_sha256"], hashlib.sha256(data).hexdigest())
        self.assertEqual(self.fake_workers[0].verified[0].form, "header")
        self.assertNotIn(b"x-serverless-auth", self.backend.seen[0].headers)

    async def test_invalid_json_with_json_type_goes_byte_for_byte(self) -> None:
        """A body labelled JSON that does not parse is not re-encoded: it goes in the header
        form, untouched, and the backend decides."""
        url = self.start_client()
        data = b'{"broken": '
        await self.call(
            "POST", url + "/v1/x", data=data, headers={b"content-type": [b"application/json"]}
        )
        self.assertEqual(self.backend.seen[0].body, data)
        self.assertEqual(self.fake_workers[0].verified[0].form, "header")

    async def test_json_nested_too_deeply_goes_byte_for_byte(self) -> None:
        """JSON nested deeper than a worker reads in an envelope (MAX_DEPTH - 1 levels: the
        envelope is one more) goes in the header form, untouched, as JSON that does not parse
        does, on every Python (it raised RecursionError: a 500 from the client); JSON as deep
        as that goes in the envelope."""
        url = self.start_client()
        deepest = MAX_DEPTH - 1
        for depth, form in ((deepest, "json"), (deepest + 1, "header"), (100_000, "header")):
            data = b"[" * depth + b"]" * depth
            response, _ = await self.call(
                "POST", url + "/v1/x", data=data, headers={b"content-type": [b"application/json"]}
            )
            self.assertEqual(response.code, 200)
            self.assertEqual(self.backend.seen[-1].body, data)
            self.assertEqual(self.fake_workers[0].verified[-1].form, form)

    async def test_sse_streams(self) -> None:
        """Server-sent events stream through: headers first, each event as the worker sends
        it, then the end of the stream."""
        url = self.start_client()
        pending = self.http.get(url + "/sse?n=3&interval=0.05", unbuffered=True)
        await pump(self.clock, pending)
        response = await pending
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        body = await response.content()
        self.assertEqual(
            body, b"data: event 0\n\ndata: event 1\n\ndata: event 2\n\ndata: [DONE]\n\n"
        )

    async def test_reserved_health_path(self) -> None:
        """/.vespa/health is the proxy's own: answered without routing."""
        url = self.start_client()
        response, body = await self.call("GET", url + "/.vespa/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["endpoint"], "my-endpoint")
        response, _ = await self.call("GET", url + "/.vespa/other")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.autoscaler.calls, [])

    async def test_health_counts_like_the_metrics(self) -> None:
        """/.vespa/health counts a worker's 5xx answer as failed, a 4xx as served (as the
        access log and the worker's metrics do)."""
        url = self.start_client()
        for path in ("/status/500", "/status/404"):
            await self.call("GET", url + path)
        _, body = await self.call("GET", url + "/.vespa/health")
        self.assertEqual((json.loads(body)["served"], json.loads(body)["failed"]), (1, 1))

    async def test_malformed_cost_is_400(self) -> None:
        """A malformed X-Serverless-Cost is a 400 to the app, not silently 1.0."""
        url = self.start_client()
        response, body = await self.call(
            "POST", url + "/v1/x", json={"a": 1}, headers={b"x-serverless-cost": [b"lots"]}
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["error"], "invalid X-Serverless-Cost")
        self.assertEqual(self.autoscaler.calls, [])

    async def test_cost_header_is_routed(self) -> None:
        """X-Serverless-Cost is the workload sent to /route/."""
        url = self.start_client()
        await self.call("POST", url + "/v1/x", json={}, headers={b"x-serverless-cost": [b"256"]})
        self.assertEqual(self.autoscaler.calls[0]["cost"], 256.0)

    async def test_access_line_has_the_routed_workload(self) -> None:
        """The access line shows the cost the request was routed with, given or estimated, as
        the worker's line shows it (it said workload=0)."""
        events = capture(self, "vespa-client.access")
        url = self.start_client(client_access_log=True)
        await self.call("POST", url + "/v1/x", json={}, headers={b"x-serverless-cost": [b"23"]})
        await self.call("POST", url + "/v1/completions", json={"prompt": "hi", "max_tokens": 9})
        routed = [call["cost"] for call in self.autoscaler.calls]
        self.assertEqual(routed[0], 23)
        self.assertGreater(routed[1], 9)
        self.assertEqual([event["workload"] for event in events], routed)
        self.assertRegex(events[0]["line"], r"^POST /v1/x 200 served workload=23 ")


class RoutingTests(ClientTestCase):
    async def test_cold_start_polls_with_request_idx(self) -> None:
        """While no worker is ready the client keeps asking, re-sending the request_idx it was
        given, and the request is served once a worker is there."""
        self.autoscaler.waiting = 3
        url = self.start_client()
        response, _ = await self.call("POST", url + "/v1/x", json={"a": 1})
        self.assertEqual(response.code, 200)
        calls = self.autoscaler.calls
        self.assertEqual(len(calls), 4)
        self.assertNotIn("request_idx", calls[0])
        self.assertEqual({c["request_idx"] for c in calls[1:]}, {101})
        self.assertEqual(self.fake_workers[0].verified[0].auth_data["request_idx"], 101)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_cold_start_deadline(self) -> None:
        """A worker that never comes: 503 with a clear error once the deadline passed."""
        self.autoscaler.waiting = 10_000
        url = self.start_client(cold_start_timeout=20)
        response, body = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 503)
        error = json.loads(body)
        self.assertEqual(error["error"], "no worker ready")
        self.assertIn("20 s", error["detail"])
        self.assertEqual(error["autoscaler_status"], {"loading": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_route_5xx_is_retried(self) -> None:
        """Autoscaler 5xx answers are retried with back-off, then the request is served."""
        self.autoscaler.errors = [500, 502]
        url = self.start_client()
        response, _ = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.autoscaler.calls), 3)

    async def test_route_5xx_retries_are_bounded(self) -> None:
        """An autoscaler that keeps failing: a 502 JSON error after the bounded retries."""
        self.autoscaler.errors = [500] * 10
        url = self.start_client(route_retries=2)
        response, body = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"], "autoscaler unavailable")
        self.assertEqual(len(self.autoscaler.calls), 3)

    async def test_route_unreachable(self) -> None:
        """An autoscaler that cannot be reached: retried, then 502 naming it."""
        url = self.start_client(autoscaler_url="http://127.0.0.1:1", route_retries=1)
        response, body = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 502)
        self.assertIn("127.0.0.1:1/route/", json.loads(body)["detail"])

    async def test_wrong_key_401_explains(self) -> None:
        """A rejected key is a 401 at once (no retry) saying an endpoint key is needed; the key
        itself appears only masked."""
        url = self.start_client(api_key="wrong-key-0123456789abcdef")
        response, body = await self.call("POST", url + "/v1/x", json={})
        self.assertEqual(response.code, 401)
        error = json.loads(body)
        self.assertEqual(error["error"], "endpoint key rejected")
        self.assertIn("endpoint's API key", error["detail"])
        self.assertNotIn("wrong-key-0123456789abcdef", body.decode())
        self.assertEqual(len(self.autoscaler.calls), 1)

    async def test_route_4xx_not_retried(self) -> None:
        """Other 4xx answers reach the app as they are, with the autoscaler's reason."""
        self.autoscaler.errors = [400]
        url = self.start_client()
        response, body = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 400)
        self.assertIn("fake error 400", json.loads(body)["detail"])
        self.assertEqual(len(self.autoscaler.calls), 1)


class RerouteTests(ClientTestCase):
    workers = 2

    async def test_worker_connect_timeout_rerouted(self) -> None:
        """A worker whose connection times out before it opens (its instance gone, SYNs
        dropped) is replaced like one that refuses: the request never left, even a POST."""
        url = self.start_client()
        resource = self.service.resource
        resource._agent = cast(IAgent, _FirstTimesOut(resource._agent))
        response, body = await self.call("POST", url + "/v1/x", json={"a": 1})
        self.assertEqual(response.code, 200, body)
        self.assertEqual(len(self.autoscaler.calls), 2)
        self.assertEqual(len(self.backend.seen), 1)

    async def test_busy_worker_rerouted(self) -> None:
        """A worker answering 429 before any byte: the request is routed again (same
        request_idx) and served by another worker; the app never sees the 429."""
        self.fake_workers[0].busy = 1
        url = self.start_client()
        response, _ = await self.call("POST", url + "/v1/x", json={"a": 1})
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.fake_workers[1].verified), 1)
        calls = self.autoscaler.calls
        self.assertEqual(calls[1]["request_idx"], 101)
        self.assertEqual(len(self.backend.seen), 1)

    async def test_reroute_is_bounded(self) -> None:
        """When every attempt is busy, the last worker's 429 reaches the app."""
        for worker in self.fake_workers:
            worker.busy = 10
        url = self.start_client(worker_retries=2)
        response, _ = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 429)
        self.assertEqual(len(self.autoscaler.calls), 3)

    async def test_busy_answer_passed_on_is_rejected(self) -> None:
        """A worker's 429 passed on once the re-routes are used up is a refusal, as the worker
        logs it: rejected, and failed in /.vespa/health (it was served); a 404 stays served."""
        for worker in self.fake_workers:
            worker.busy = 10
        url = self.start_client(worker_retries=1)
        recorded = self.recorder()
        response, _ = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 429)
        for worker in self.fake_workers:
            worker.busy = 0
        await self.call("GET", url + "/status/404")
        _, body = await self.call("GET", url + "/.vespa/health")
        self.assertEqual((json.loads(body)["served"], json.loads(body)["failed"]), (1, 1))
        outcomes = [(result.status, result.outcome) for result in recorded.results]
        self.assertEqual(outcomes, [(429, Outcome.REJECTED), (404, Outcome.SERVED)])

    async def test_unreachable_worker_rerouted(self) -> None:
        """A worker that refuses connections: routed again to one that works."""
        self.autoscaler.worker_urls[0] = "http://127.0.0.1:1"
        url = self.start_client()
        response, _ = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.autoscaler.calls), 2)

    async def test_no_worker_reachable_is_named(self) -> None:
        """When no worker can be reached, the 502 says a worker (which one, and why) is
        unavailable, not the worker's backend; the access line counts the bytes it sent."""
        self.autoscaler.worker_urls[:] = ["http://127.0.0.1:1"] * 2
        events = capture(self, "vespa-client.access")
        url = self.start_client(worker_retries=1, client_access_log=True)
        response, body = await self.call("GET", url + "/v1/models")
        self.assertEqual(response.code, 502)
        error = json.loads(body)
        self.assertEqual(error["error"], "worker unavailable")
        self.assertIn("http://127.0.0.1:1", error["detail"])
        self.assertIn("refused", error["detail"])
        self.assertEqual(len(self.autoscaler.calls), 2)
        [event] = events
        self.assertEqual((event["outcome"], event["bytes_out"]), ("errored", len(body)))

    async def test_unreachable_worker_rerouted_for_a_post(self) -> None:
        """A POST that could not reach its worker at all is routed again: it never left."""
        self.autoscaler.worker_urls[0] = "http://127.0.0.1:1"
        url = self.start_client()
        response, _ = await self.call("POST", url + "/v1/x", json={"a": 1})
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.backend.seen), 1)

    async def test_post_lost_after_it_left_is_not_sent_again(self) -> None:
        """A POST whose connection drops after it was sent (the worker ran it, or not) gets
        502 `worker unavailable` (the worker, not its backend, is what the proxy could not
        hear from) and is not sent elsewhere: a second copy could charge or generate twice. A
        GET in the same case is routed again."""
        url = self.start_client()
        ended = self.recorder().wait()
        response, body = await self.call("POST", url + "/reset", json={"charge": 1})
        self.assertEqual((response.code, json.loads(body)["error"]), (502, "worker unavailable"))
        [result] = await ended
        self.assertEqual(result.bytes_out, len(body))  # its own answer counted
        self.assertEqual(len(self.backend.seen), 1)
        self.assertEqual(len(self.autoscaler.calls), 1)
        response, _ = await self.call("GET", url + "/reset")
        self.assertEqual(len(self.autoscaler.calls), 1 + 1 + 3)  # worker_retries (3) more

    async def test_no_retry_after_bytes(self) -> None:
        """A worker that breaks mid-answer is not retried: the app sees a broken response,
        never a second copy."""
        url = self.start_client()
        client = await raw_connect(
            url, RawClient(b"GET /break HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
        received = await client.closed
        self.assertIn(b"data: one", received)
        self.assertEqual(len(self.autoscaler.calls), 1)


class DisconnectTests(ClientTestCase):
    timeout = 10

    async def test_app_disconnect_cancels_worker_request(self) -> None:
        """When the app hangs up, the worker's (and so the backend's) request is cancelled."""
        url = self.start_client()
        ended = self.recorder().wait()
        await self.hang_up_during_slow_request(url)
        [result] = await ended
        self.assertEqual(result.outcome, Outcome.CANCELLED)
        self.assertEqual(self.service.resource.in_flight, 0)

    async def test_app_disconnect_while_waiting_for_a_worker(self) -> None:
        """An app that hangs up during a cold start stops the polling."""
        self.autoscaler.waiting = 10_000
        url = self.start_client()
        ended = self.recorder().wait()
        client = await raw_connect(url, RawClient(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"))
        while not _backoffs(self.clock):  # until it waits before asking for a worker again
            await self.clock.scheduled()
        client.tcp.loseConnection()
        [result] = await ended
        self.assertEqual(result.outcome, Outcome.CANCELLED)
        self.assertEqual(self.service.resource.in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StopTests(ClientTestCase):
    timeout = 10

    async def test_stop_closes_idle_app_connections(self) -> None:
        """Stopping the proxy closes the app's idle keep-alive connections: a request on one
        would reach a stopped proxy."""
        url = self.start_client()
        client = await raw_connect(url, RawClient(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"))
        await client.when(lambda: b"\r\n\r\n" in b"".join(client.chunks))
        await pump(self.clock, self.service.stopService())
        self.assertIn(b"HTTP/1.1 200", await client.closed)


class ResolvingHTTP:
    """An HTTP client whose calls never end unless cancelled, and then fail as Twisted's
    HostnameEndpoint does when cancelled during its name look-up: DNSLookupError."""

    def __init__(self) -> None:
        self.calls: list[Deferred[Any]] = []

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        call: Deferred[Any] = Deferred(lambda d: d.errback(DNSLookupError("no address")))
        self.calls.append(call)
        return call


class RouteCancelTests(TestCase):
    def test_cancelled_while_connecting_stops(self) -> None:
        """A /route/ call cancelled while it connects (the app hung up) ends the routing with
        CancelledError, whatever error the HTTP stack reports for it: no retry is scheduled."""
        clock = Clock()
        http = ResolvingHTTP()
        stand_in = cast(HTTPClient, http)  # post is all a Router calls
        router = Router(stand_in, clock, "http://127.0.0.1:1", "e", lambda: succeed("key"))
        routed = router.route(1.0)
        self.assertEqual(len(http.calls), 1)
        routed.cancel()
        self.failureResultOf(routed, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(http.calls), 1)


class RouteReplyTests(TestCase):
    def test_no_answer(self) -> None:
        """A /route/ call not answered within its limit is retried, and the app's error says
        why: "no answer within 10 s"."""
        clock = Clock()
        stand_in = cast(HTTPClient, CannedHTTP(None))  # post is all a Router calls
        router = Router(stand_in, clock, "http://a", "e", lambda: succeed("key"), retries=1)
        routed = router.route(1.0)
        clock.advance(ROUTE_CALL_TIMEOUT)
        clock.advance(BACKOFF_CAP)  # backing off, then the second try
        self.assertNoResult(routed)
        clock.advance(ROUTE_CALL_TIMEOUT)
        failure = self.failureResultOf(routed, RouteError)
        self.assertEqual(
            str(failure.value),
            "502 autoscaler unavailable: http://a/route/ failed 2 times; last: no answer within 10 s",
        )

    def test_deep_reply_is_not_json(self) -> None:
        """A /route/ reply nested deeper than any JSON Vespa reads is "not JSON" on every
        Python (a retryable failure, then a 502), never a RecursionError."""
        for depth in (600, 100_000):
            http = CannedHTTP(b"[" * depth + b"]" * depth)
            stand_in = cast(HTTPClient, http)  # post is all a Router calls
            router = Router(stand_in, Clock(), "http://a", "e", lambda: succeed("key"), retries=0)
            failure = self.failureResultOf(router.route(1.0), RouteError)
            self.assertEqual(failure.value.code, 502)
            self.assertIn("reply is not JSON", str(failure.value))


class RealWorkerTests(ClientTestCase):
    """The same client in front of a real secured Vespa worker (signature checked by
    vast_vespa.worker), itself in front of FakeBackend."""

    # trial waits for a Deferred that setUp returns (unittest's annotation says None).
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self._set_up())

    async def _set_up(self) -> None:
        self.backend = FakeBackend(reactor)
        backend_url = listen(self, self.backend)
        signed = await start_signed_worker(self, backend_url)
        self.autoscaler = FakeRouter(signed.key, [signed.url])
        self.autoscaler_url = listen(self, self.autoscaler)
        self.clock = WatchedClock(reactor)
        self.http = http_client(self)

    async def test_three_forms_through_a_real_worker(self) -> None:
        """JSON, query-auth GET (repeated parameters) and a binary upload all pass the real
        worker's signature check and reach the backend (query and upload byte for byte)."""
        url = self.start_client()
        payload = b'{"model": "m", "x": 1.50}'
        response, _ = await self.call(
            "POST", url + "/v1/echo", data=payload, headers={b"content-type": [b"application/json"]}
        )
        self.assertEqual(response.code, 200)
        response, _ = await self.call("GET", url + "/v1/models?a=1&a=2")
        self.assertEqual(response.code, 200)
        data = os.urandom(200_000)
        response, body = await self.call(
            "PUT", url + "/upload", data=data, headers={b"content-type": [b"image/png"]}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["body_sha256"], hashlib.sha256(data).hexdigest())
        seen = self.backend.seen
        # The worker re-encodes envelope payloads (the client sends them byte for byte: see
        # FormsTests); the JSON value is what must arrive here.
        self.assertEqual(json.loads(seen[0].body), json.loads(payload))
        self.assertEqual([s.body for s in seen[1:]], [b"", data])
        self.assertEqual(seen[1].uri, b"/v1/models?a=1&a=2")

    async def test_json_the_worker_opens_no_envelope_for(self) -> None:
        """JSON in a method the worker reads no envelope for (DELETE, GET, OPTIONS), or JSON
        the worker's strict reading refuses (NaN, 1e400, a BOM, UTF-16), goes byte for byte
        with the auth in a header: served, and the backend gets the app's body."""
        url = self.start_client()
        json_type = {b"content-type": [b"application/json"]}
        sent = [(method, b'{"ids": [1, 2]}') for method in ("DELETE", "GET", "OPTIONS")]
        loose = (
            b'{"t": NaN}',
            b'{"x": 1e400}',
            b'\xef\xbb\xbf{"a": 1}',
            '{"a": 1}'.encode("utf-16"),
        )
        sent += [("POST", body) for body in loose]
        for method, body in sent:
            response, answer = await self.call(method, url + "/v1/x", data=body, headers=json_type)
            self.assertEqual(response.code, 200, (method, body, answer))
        self.assertEqual([(s.method.decode(), s.body) for s in self.backend.seen], sent)

    async def test_json_as_deep_as_the_limit_through_a_real_worker(self) -> None:
        """JSON nested MAX_DEPTH - 1 levels, arrays and objects, goes in an envelope through a
        real worker, parsed and written again there from within a request, on every Python."""
        url = self.start_client()
        half = (MAX_DEPTH - 2) // 2
        payload = b"[" + b'{"a":[' * half + b"]}" * half + b"]"
        response, _ = await self.call(
            "POST", url + "/v1/x", data=payload, headers={b"content-type": [b"application/json"]}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(self.backend.seen[0].body), json.loads(payload))
        self.assertEqual(self.backend.seen[0].headers[b"content-type"], [b"application/json"])

    async def test_request_id_shared_with_the_worker(self) -> None:
        """The proxy gives each request an X-Request-ID (or keeps the app's), and the worker
        and backend see the same one, so one id follows a request through every log; a
        refusal by the proxy itself carries one too."""
        url = self.start_client()
        response, _ = await self.call("GET", url + "/echo", headers={b"x-request-id": [b"app-7"]})
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"app-7"])
        self.assertEqual(self.backend.seen[-1].headers[b"x-request-id"], [b"app-7"])
        response, _ = await self.call("GET", url + "/echo")
        [made] = response.headers.getRawHeaders(b"x-request-id")
        self.assertEqual(len(made), 32)
        self.assertEqual(self.backend.seen[-1].headers[b"x-request-id"], [made])
        response, _ = await self.call("GET", url + "/x", headers={b"x-serverless-cost": [b"?"]})
        self.assertEqual(response.code, 400)
        self.assertEqual(len(response.headers.getRawHeaders(b"x-request-id", [])), 1)

    async def test_sse_through_a_real_worker(self) -> None:
        """Server-sent events stream through client and worker."""
        url = self.start_client()
        _, body = await self.call("GET", url + "/sse?n=2")
        self.assertEqual(body, b"data: event 0\n\ndata: event 1\n\ndata: [DONE]\n\n")

    async def test_disconnect_through_a_real_worker(self) -> None:
        """An app that hangs up cancels the backend request behind the real worker too."""
        await self.hang_up_during_slow_request(self.start_client())
