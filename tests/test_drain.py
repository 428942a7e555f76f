"""Graceful drain on shutdown: in-flight requests and streams finish, new ones are refused;
what outlasts DRAIN_TIMEOUT is cut, and reported errored. In memory (tests/memory.py), then
`twistd vespa` and SIGTERM."""

from __future__ import annotations

import json
import re

from twisted.internet import reactor
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseNeverReceived

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import (
    http_client,
    listen,
    secured_worker_env,
    signed_auth,
    spawn_worker,
    worker_url,
)
from tests.memory import Answer, MemoryWorker, raw_http
from vast_vespa.logs import log_access
from vast_vespa.outcome import Outcome
from vast_vespa.signing import generate_private_key, public_pem
from vast_vespa.site import VespaRequest


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.worker = MemoryWorker(self, signed=False)

    def test_a_request_whose_client_left_is_not_cut(self) -> None:
        """A client that read a stream to its [DONE] and left, whose backend's end comes within
        END_GRACE after the drain timeout passed: nothing of it was cut by the worker (it had
        no connection left to cut), so it is served, not errored "cut at the drain timeout"."""
        worker = self.worker
        service = worker.service(drain_timeout=0.1)
        client = worker.request("GET", "/sse?n=2&end=0.2")
        self.assertTrue(client.received.endswith(b"data: [DONE]\n\n\r\n"))
        client.leave()
        worker.flush()
        stopped = service.stopService()
        for _ in range(3):
            worker.advance(0.1)
        self.successResultOf(stopped)
        [result] = worker.results
        self.assertEqual((result.outcome, result.reason), (Outcome.SERVED, ""))

    def test_stream_in_flight_finishes(self) -> None:
        """On stop, a stream in flight runs to its end, the drain hooks run first with the
        worker marked draining, new requests get 503 "draining", and the stop waits for it."""
        worker = self.worker
        service = worker.service(drain_timeout=10.0)
        seen: list[bool | Answer] = []

        def hook() -> None:
            seen.append(worker.state.draining)
            seen.append(worker.get("/v1/late"))

        service.add_drain_hook(hook)
        stream = worker.request("GET", "/sse?n=4&interval=0.1")
        stopped = service.stopService()
        self.assertEqual(seen[0], True)
        late = seen[1]
        assert isinstance(late, Answer)
        self.assertEqual(late.code, 503)
        self.assertEqual(late.header(b"retry-after"), [b"1"])
        self.assertEqual(late.json()["error"], "draining")
        worker.advance(0.1)
        worker.advance(0.1)
        self.assertNoResult(stopped)
        worker.advance(0.1)
        body = worker.answered(stream).body
        self.assertEqual(body.count(b"data: event"), 4)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.successResultOf(stopped)
        self.assertEqual(service.in_flight.requests, {})

    def test_idle_keep_alive_connections_are_closed(self) -> None:
        """Once the requests in flight are done, the idle keep-alive connections are closed
        (a request on one would only be refused), with one log line; a connection answered
        during the drain is closed too."""
        worker = self.worker
        service = worker.service(drain_timeout=10.0)
        idle = worker.request("GET", "/v1/first")
        self.assertEqual(worker.answered(idle).code, 200)
        answering = worker.request("GET", "/slow?delay=1")
        with capturedLogs() as events:
            stopped = service.stopService()
            self.assertFalse(idle.closed)  # not before the requests in flight are done
            worker.advance(1)
            self.successResultOf(stopped)
        self.assertTrue(idle.closed)
        self.assertEqual(worker.answered(answering).code, 200)
        self.assertTrue(answering.closed)
        self.assertIn(
            "worker: closed 2 idle client connection(s)", [formatEvent(e) for e in events]
        )

    def test_drain_timeout_aborts_the_rest(self) -> None:
        """A request still in flight when DRAIN_TIMEOUT ends is cut, and its backend call
        cancelled; the stop completes once it has ended, errored, its access line written."""
        worker = MemoryWorker(self, signed=False, observers=(log_access,))
        service = worker.service(drain_timeout=0.2)
        pending = worker.request("GET", "/slow?delay=30")
        stopped = service.stopService()
        worker.advance(0.19)
        self.assertNoResult(stopped)
        self.assertFalse(pending.closed)
        with capturedLogs() as events:
            worker.advance(0.01)
            self.successResultOf(stopped)
        self.successResultOf(worker.backend.cancelled[0])
        self.assertTrue(pending.closed)
        self.assertIsNone(pending.answer)
        lines = [formatEvent(e) for e in events]
        access = [line for line in lines if line.startswith("GET /slow 0 errored ")]
        self.assertEqual(len(access), 1, lines)
        self.assertLess(lines.index(access[0]), lines.index("drained"))

    def test_requests_cut_at_the_drain_timeout_are_reported_errored(self) -> None:
        """The requests cut at DRAIN_TIMEOUT (a stream, one waiting for the backend's answer,
        two queued for a slot) end before the reporter's last send, which carries them: none
        left working, each a failure in /delete_requests/; errored, and logged as cut (their
        clients did not leave: cancelled would report them served)."""
        worker = MemoryWorker(self, max_concurrency=2)
        service = worker.service(drain_timeout=0.2, reporter=True)
        # The connections close in the order they opened: 43's first, so it leaves the queue;
        # 42 gets the slot 41 frees before its own loss reaches it.
        last_queued = worker.connect()
        paths = {40: "/sse?n=3&interval=10", 41: "/slow?delay=30", 42: "/x"}
        for idx, path in paths.items():
            worker.envelope(path, request_idx=idx, reqnum=idx)
        envelope = {"auth_data": worker.auth(request_idx=43, reqnum=43), "payload": {}}
        last_queued.send(raw_http("POST", "/y", json.dumps(envelope).encode()))
        worker.flush()
        self.assertEqual(worker.autoscaler.statuses[-1]["working_request_idxs"], [])  # at start
        with capturedLogs() as events:
            stopped = service.stopService()
            worker.advance(0.2)
            self.successResultOf(stopped)
        last = worker.autoscaler.statuses[-1]
        self.assertEqual((last["working_request_idxs"], last["cur_load"]), ([], 0))
        self.assertEqual(last["new_load"], 40.0)  # cancelled requests would be subtracted
        self.assertEqual(worker.autoscaler.deleted(), dict.fromkeys([40, 41, 42, 43], False))
        # Nor is a queued request sent to the backend once it was cut.
        seen = [seen.uri for seen in worker.backend.seen]
        self.assertEqual(seen, [b"/sse?n=3&interval=10", b"/slow?delay=30"])
        ended = [(r.outcome, r.reason) for r in worker.results]
        self.assertEqual(ended, [(Outcome.ERRORED, "cut at the drain timeout")] * 4)
        lines = [formatEvent(e) for e in events]
        cut = [line for line in lines if line.endswith(": cut at the drain timeout")]
        self.assertEqual(len(cut), 4, lines)
        self.assertLess(max(map(lines.index, cut)), lines.index("drained"))

    def test_open_sessions_end_before_the_last_report(self) -> None:
        """The drain refuses a session's new requests (503) and, once the requests in flight
        are over (one in a session cut at the drain timeout), ends each open session as
        /session/end does: its on_close_route called (the stop waits for it), and the
        reporter's last send has none working and each session served."""
        worker = MemoryWorker(self, max_sessions=2)
        service = worker.service(drain_timeout=0.2, reporter=True)
        auth = worker.auth(request_idx=7, reqnum=7, cost=50.0)
        closing = {"on_close_route": "/slow?delay=1", "on_close_payload": {"k": 1}}
        opened = worker.post("/session/create", {"auth_data": auth, "payload": closing})
        session_id = opened.json()["session_id"]
        other = worker.auth(request_idx=8, reqnum=8, cost=100.0)
        worker.post("/session/create", {"auth_data": other, "payload": {}})
        in_session = {"auth_data": auth, "payload": {}, "session_id": session_id}
        pending = worker.request("POST", "/slow?delay=30", json.dumps(in_session).encode())
        stopped = service.stopService()
        for path, document in (("/x", in_session), ("/session/create", in_session)):
            late = worker.post(path, document)
            self.assertEqual((late.code, late.json()["error"]), (503, "draining"))
        worker.advance(0.2)
        self.assertTrue(pending.closed)
        last = worker.autoscaler.statuses[-1]
        self.assertEqual((last["working_request_idxs"], last["cur_load"]), ([], 0))
        self.assertEqual(last["cur_perf"], 150.0)  # the two sessions (the cut request errored)
        self.assertEqual(worker.autoscaler.deleted(), {7: True, 8: True})
        on_close = worker.backend.seen[-1]
        self.assertEqual(on_close.uri, b"/slow?delay=1")
        self.assertEqual(json.loads(on_close.body), {"k": 1, "session_id": session_id})
        self.assertNoResult(stopped)
        worker.advance(1)
        self.successResultOf(stopped)

    def test_an_answer_relayed_after_the_cut_is_errored(self) -> None:
        """An answer that reaches the worker just after the drain timeout cut its request
        goes to a cut connection (a real client gets none of it): errored, not served."""
        worker = self.worker
        service = worker.service(drain_timeout=0.2)
        worker.request("GET", "/slow?delay=0.2")  # its timer runs first, then the drain's
        stopped = service.stopService()
        worker.advance(0.2)
        self.successResultOf(stopped)
        ended = [(r.outcome, r.status, r.reason) for r in worker.results]
        self.assertEqual(ended, [(Outcome.ERRORED, 200, "cut at the drain timeout")])

    def test_a_cut_request_that_does_not_end_holds_the_stop_one_second(self) -> None:
        """A request that has not ended a second after it was cut no longer holds up the
        stop; the log says so."""
        worker = self.worker
        service = worker.service(drain_timeout=0.2)
        # A request its connection's loss does not reach (none of the channel's): it never ends.
        stuck = VespaRequest(worker.connect().channel)
        service.in_flight.add(stuck)
        with capturedLogs() as events:
            stopped = service.stopService()
            worker.advance(0.2)
            worker.advance(0.99)
            self.assertNoResult(stopped)
            worker.advance(0.01)
            self.successResultOf(stopped)
        self.assertIn(
            "1 aborted request(s) had not ended 1 s after the drain timeout; stopping anyway",
            [formatEvent(e) for e in events],
        )
        self.assertEqual(worker.clock.getDelayedCalls(), [])

    def test_failing_hook_does_not_block_the_drain(self) -> None:
        """A drain hook that fails is logged; the shutdown goes on."""
        service = self.worker.service()

        def failing() -> None:
            raise ZeroDivisionError("drain hook")

        service.add_drain_hook(failing)
        self.successResultOf(service.stopService())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class TwistdDrainTests(TestCase):
    timeout = 60

    async def test_sigterm_with_a_stream_in_flight(self) -> None:
        """`twistd -n vespa` gets SIGTERM while streaming: it stops listening at once, the
        stream completes, and the process exits 0."""
        backend = FakeBackend(reactor)
        backend_url = listen(self, backend)
        process = spawn_worker(self, backend_url, "--healthcheck-retry-interval", "0.1")
        url = await worker_url(process)
        await process.wait_for(rb"worker loaded")
        http = http_client(self)
        response = await http.get(url + "/sse?n=5&interval=0.3")
        self.assertEqual(response.code, 200)
        process.transport_.signalProcess("TERM")  # type: ignore[attr-defined]
        await process.wait_for(rb"Port \d+ Closed")
        # Twisted logs the port's closing just before it closes the socket: a connection made
        # in between is accepted by the kernel into the backlog and reset by the close, never
        # served. Either way, no new request reaches the worker.
        try:
            await http_client(self).get(url + "/v1/echo")
        except ConnectionRefusedError:
            pass
        except ResponseNeverReceived as never:
            self.assertTrue(never.reasons[0].check(ConnectionLost), never.reasons)
        else:
            self.fail("a request was served after the port closed")
        body = await response.content()
        self.assertEqual(body.count(b"data: event"), 5)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(await process.ended, 0)
        self.assertIn(b"draining: 1 request(s) in flight", process.output)
        self.assertIn(b"drained", process.output)

    async def test_sigterm_past_the_drain_timeout(self) -> None:
        """`twistd -n vespa` gets SIGTERM with a stream and a slow request that outlast
        DRAIN_TIMEOUT: both are cut and end before the last report, which has none working
        and both as failures in /delete_requests/; each has its access line (errored) and a
        line saying it was cut, before "drained"."""
        key = generate_private_key()
        autoscaler = FakeAutoscaler(public_pem(key))
        backend = FakeBackend(reactor)
        env = secured_worker_env(self, listen(self, autoscaler))
        process = spawn_worker(self, listen(self, backend), "--drain-timeout", "0.5", env=env)
        url = await worker_url(process)
        await process.wait_for(rb"autoscaler public key loaded")
        await process.wait_for(rb"worker loaded")
        http = http_client(self)

        def signed(idx: int) -> bytes:
            auth = signed_auth(key, "", "url", request_idx=idx, reqnum=idx)  # no public URL
            return json.dumps({"auth_data": auth, "payload": {}}).encode()

        stream = await http.post(url + "/sse?n=100&interval=0.3", data=signed(40))
        self.assertEqual(stream.code, 200)
        slow = http.post(url + "/slow?delay=30", data=signed(41))
        await backend.when(lambda: b"/slow?delay=30" in [seen.uri for seen in backend.seen])
        process.transport_.signalProcess("TERM")  # type: ignore[attr-defined]
        self.assertEqual(await process.ended, 0)
        with self.assertRaises(ResponseNeverReceived):
            await slow
        last = autoscaler.statuses[-1]
        self.assertEqual((last["working_request_idxs"], last["cur_load"]), ([], 0))
        self.assertEqual(autoscaler.deleted(), {40: False, 41: False})
        output = process.output.decode()
        for path in ("/sse", "/slow"):
            access = re.search(rf"POST {path} \d+ (\w+) .*\n", output)
            assert access is not None, output
            self.assertEqual(access.group(1), "errored")
            cut = re.search(rf"POST {path} \(id \w+\): cut at the drain timeout\n", output)
            assert cut is not None, output
            self.assertLess(max(access.end(), cut.end()), output.index("drained"))
