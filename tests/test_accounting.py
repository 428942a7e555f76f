"""
Accounting, proved through what the autoscaler received: every request that passed
authentication ends in exactly one of served / errored / cancelled / rejected, its workload is
counted once, its request_idx reaches /delete_requests/ exactly once with the right success
flag, cur_load returns to 0, and traffic that did not pass authentication moves nothing.
In memory (tests/memory.py), then once through real sockets.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from tests.helpers import SignedWorker, http_client, listen_tcp, start_signed_worker
from tests.memory import Connection, MemoryWorker
from vast_vespa import request_id
from vast_vespa.outcome import Outcome, RelayResult
from vast_vespa.relay import END_GRACE

HELD = b"/slow?delay=1"

Seen = list[tuple[str, RelayResult]]


def observer(seen: Seen) -> Any:
    """An observer recording every (X-Request-ID, RelayResult) it is told about."""
    return lambda request, result, forward: seen.append((request_id.of(request), result))


def envelope(worker: MemoryWorker | SignedWorker, cost: float, idx: int, **auth: Any) -> bytes:
    """A signed envelope; reqnum follows request_idx so a replay window tells them apart."""
    signed = worker.auth(cost=cost, request_idx=idx, reqnum=idx, **auth)
    return json.dumps({"auth_data": signed, "payload": {"n": idx}}).encode()


def assert_once_each(test: SynchronousTestCase, seen: Seen, expected: dict) -> None:
    """Exactly one RelayResult per X-Request-ID, with the expected outcome."""
    counts = Counter(rid for rid, _ in seen)
    test.assertEqual({rid: n for rid, n in counts.items() if n != 1}, {})
    test.assertEqual({rid: r.outcome for rid, r in seen}, expected)


class AccountingTests(SynchronousTestCase):
    def worker(self, seen: Seen, **changes: Any) -> MemoryWorker:
        return MemoryWorker(self, observers=(observer(seen),), **changes)

    def post(self, worker: MemoryWorker, path: str, rid: str, body: bytes) -> int:
        return worker.call("POST", path, body, {"X-Request-ID": rid}).code

    def send(self, worker: MemoryWorker, path: str, rid: str, body: bytes) -> Connection:
        return worker.request("POST", path, body, {"X-Request-ID": rid})

    def test_every_outcome_counted_once(self) -> None:
        """Served, backend 5xx, reset before headers, broken mid-answer, cancelled mid-stream,
        cancelled while queued behind a slow request, 429 over MAX_WAIT_TIME, and beside them
        forged, unsigned, malformed, blocked and replayed requests: each authenticated
        request_idx is deleted exactly once with its flag, the workload sums are exactly the
        costs sent per outcome, cur_load is back to 0, and the refused traffic counts nowhere
        and never reaches the backend."""
        seen: Seen = []
        worker = self.worker(
            seen,
            max_concurrency=1,
            max_wait_time=5.0,
            blocked_paths=("/admin*",),
            replay_window=100,
        )
        metrics = worker.metrics
        self.assertEqual(self.post(worker, "/ok", "served", envelope(worker, 1, 1)), 200)
        self.assertEqual(self.post(worker, "/status/503", "5xx", envelope(worker, 2, 2)), 503)
        self.assertEqual(self.post(worker, "/reset", "reset", envelope(worker, 4, 3)), 502)
        broken = self.send(worker, "/break", "broken", envelope(worker, 8, 4))
        self.assertTrue(broken.closed)
        self.assertIn(b"data: one", broken.received)
        streaming = self.send(worker, "/sse?n=100&interval=0.05", "left", envelope(worker, 16, 5))
        while len(streaming.received) <= 200:
            worker.advance(0.05)
        streaming.leave()
        worker.advance(0.05)  # its next event: the answer was not over (relay.END_GRACE)
        self.assertEqual(metrics.in_flight, {})

        worker.state.max_perf = 32.0  # from here the wait estimate matters
        held = self.send(worker, HELD.decode(), "held", envelope(worker, 32, 6))
        self.assertEqual(len(metrics.in_flight), 1)
        queued = self.send(worker, "/queued", "queued", envelope(worker, 64, 7))
        self.assertEqual(len(metrics.in_flight), 2)  # waiting for the one slot
        # (32 + 64 + its own 128) / 32 = 7 s of estimated wait, over MAX_WAIT_TIME 5 s
        self.assertEqual(self.post(worker, "/x", "busy", envelope(worker, 128, 8)), 429)
        queued.leave()
        worker.advance(1)
        self.assertEqual(worker.answered(held).body, b"slow done")
        worker.state.max_perf = 100.0

        forged = json.loads(envelope(worker, 256, 1001))
        forged["auth_data"]["cost"] = 1e6  # no longer what was signed (url shape: url only)
        forged["auth_data"]["url"] = "http://198.51.100.1:1"
        refused = {
            "forged": ("/x", json.dumps(forged).encode(), 401),
            "unsigned": ("/x", b'{"payload": {}}', 422),
            "not-json": ("/x", b"\x00binary", 422),
            "blocked": ("/admin/x", envelope(worker, 512, 1002), 403),
            "replayed": ("/ok", envelope(worker, 1, 1), 401),
        }
        for rid, (path, body, code) in refused.items():
            self.assertEqual(self.post(worker, path, rid, body), code, rid)

        self.assertEqual(metrics.in_flight, {})
        worker.report()
        statuses = worker.autoscaler.statuses
        assert_once_each(
            self,
            seen,
            {
                "served": Outcome.SERVED,
                "5xx": Outcome.SERVED,  # the relay served it; the metrics count it errored
                "reset": Outcome.ERRORED,
                "broken": Outcome.ERRORED,
                "left": Outcome.CANCELLED,
                "held": Outcome.SERVED,
                "queued": Outcome.CANCELLED,
                "busy": Outcome.REJECTED,
                **dict.fromkeys(refused, Outcome.REJECTED),
            },
        )
        entries = worker.autoscaler.delete_entries()
        self.assertEqual(
            {idx: n for idx, n in Counter(idx for idx, _ in entries).items() if n != 1}, {}
        )
        self.assertEqual(
            dict(entries),
            {1: True, 2: False, 3: False, 4: False, 5: True, 6: True, 7: True, 8: False},
        )
        served, errored = 1 + 32, 2 + 4 + 8
        self.assertEqual(sum(s["cur_perf"] for s in statuses), served)
        self.assertEqual(sum(s["new_load"] for s in statuses), served + errored)
        self.assertEqual(sum(s["rej_load"] for s in statuses), 128)
        last = statuses[-1]
        self.assertEqual(last["cur_load"], 0)
        self.assertEqual((last["num_requests_working"], last["working_request_idxs"]), (0, []))
        self.assertEqual(last["num_requests_recieved"], 8)
        self.assertEqual(metrics.load, 0.0)
        self.assertEqual(
            [s.uri for s in worker.backend.seen],
            [b"/ok", b"/status/503", b"/reset", b"/break", b"/sse?n=100&interval=0.05", HELD],
        )

    def test_a_client_that_leaves_at_the_end_of_a_stream_was_served(self) -> None:
        """Clients that leave as soon as they have read a stream's last event (as the OpenAI
        SDK does at ``data: [DONE]``), before the backend's end of the body came: served, in
        cur_perf and new_load, when that end comes within END_GRACE; cancelled (out of both)
        when it does not. Both are deleted as successes."""
        seen: Seen = []
        worker = self.worker(seen)
        for rid, cost, idx, end in (("ended", 3, 1, END_GRACE / 2), ("endless", 5, 2, 60)):
            client = self.send(worker, f"/sse?n=2&end={end}", rid, envelope(worker, cost, idx))
            self.assertTrue(client.received.endswith(b"data: [DONE]\n\n\r\n"))
            client.leave()
        worker.advance(END_GRACE / 2)
        worker.advance(END_GRACE / 2)
        worker.report()
        assert_once_each(self, seen, {"ended": Outcome.SERVED, "endless": Outcome.CANCELLED})
        self.assertEqual(worker.autoscaler.delete_entries(), [(1, True), (2, True)])
        statuses = worker.autoscaler.statuses
        self.assertEqual(sum(s["cur_perf"] for s in statuses), 3)
        self.assertEqual(sum(s["new_load"] for s in statuses), 3)
        self.assertEqual(statuses[-1]["cur_load"], 0)

    def test_refused_traffic_moves_nothing(self) -> None:
        """A flood of forged, unsigned and blocked requests, some with huge costs and other
        workers' request_idx: every load figure the autoscaler receives stays 0 and nothing
        is deleted, while the requests were refused (and the load never moved meanwhile)."""
        seen: Seen = []
        worker = self.worker(seen, blocked_paths=("/admin*",))
        loads: list[float] = []
        for n in range(20):
            forged = json.loads(envelope(worker, 1e9, 5000 + n))
            forged["auth_data"]["signature"] = forged["auth_data"]["signature"][::-1]
            body = json.dumps(forged).encode()
            self.assertEqual(self.post(worker, "/x", f"f{n}", body), 401)
            blocked = envelope(worker, 1e9, 6000 + n)
            self.assertEqual(self.post(worker, "/admin", f"b{n}", blocked), 403)
            loads.append(worker.metrics.load)
        worker.report()
        self.assertEqual(len(seen), 40)
        self.assertEqual(set(loads), {0.0})
        for field in ("cur_load", "new_load", "rej_load", "cur_perf", "num_requests_recieved"):
            self.assertEqual({s[field] for s in worker.autoscaler.statuses}, {0}, field)
        self.assertEqual(worker.autoscaler.deletes, [])
        self.assertEqual(worker.backend.seen, [])


class AccountingEndToEndTests(TestCase):
    timeout = 30

    async def test_backend_unreachable_is_errored(self) -> None:
        """Through real sockets, a backend that refuses connections: 502 to the client, the
        request counts as errored (new_load, not cur_perf), its request_idx is deleted once
        as a failure."""
        closed = listen_tcp(Factory())
        port = closed.getHost().port
        await closed.stopListening()
        # One report window for the whole test (a beat at start, then send_now at the end).
        worker = await start_signed_worker(self, f"http://127.0.0.1:{port}", report_interval=60.0)
        seen: Seen = []
        resource = worker.service.site.resource
        resource._observers = (*resource._observers, observer(seen))
        response = await http_client(self).post(
            worker.url + "/x",
            data=envelope(worker, 5, 77),
            headers=Headers({b"x-request-id": [b"down"]}),
        )
        self.assertEqual(response.code, 502)
        await response.content()
        await worker.service.in_flight.idle()
        assert worker.service.reporter is not None
        await worker.service.reporter.send_now()
        statuses = worker.autoscaler.statuses
        assert_once_each(self, seen, {"down": Outcome.ERRORED})
        self.assertEqual(worker.autoscaler.delete_entries(), [(77, False)])
        self.assertEqual(sum(s["cur_perf"] for s in statuses), 0)
        self.assertEqual(sum(s["new_load"] for s in statuses), 5)
        self.assertEqual(statuses[-1]["cur_load"], 0)
