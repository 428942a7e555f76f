"""Sessions (vast_vespa.worker.sessions), decided in memory on a Clock: create, use, TTL,
MAX_SESSIONS, end, get, health, on_close_route, what the reports say, and who may do what."""

from __future__ import annotations

import io
import json
from typing import Any, cast

from twisted.internet import reactor
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from tests.fakes import FakeBackend
from tests.helpers import http_client, listen, start_signed_worker
from tests.memory import Answer, MemoryWorker
from vast_vespa import sandbox
from vast_vespa.logs import log_access
from vast_vespa.worker.sessions import ON_CLOSE_TIMEOUT, SessionEndResource


def envelope(auth: dict[str, Any], payload: Any, session_id: str | None = None) -> dict[str, Any]:
    return {"auth_data": auth, "payload": payload, "session_id": session_id}


class SessionTests(SynchronousTestCase):
    def worker(self, **changes: Any) -> MemoryWorker:
        changes.setdefault("max_sessions", 2)
        return MemoryWorker(self, **changes)

    def create(
        self, worker: MemoryWorker, lifetime: float = 60, **fields: Any
    ) -> tuple[Answer, dict[str, Any]]:
        auth = worker.auth(**fields)
        answer = worker.post("/session/create", envelope(auth, {"lifetime": lifetime}))
        return answer, auth

    def test_create_use_end(self) -> None:
        """201 with an id and the expiration; the session's requests reach the backend as
        their payload alone; /session/end answers as the official worker and the session is
        reported served once, with its request_idx."""
        worker = self.worker()
        worker.advance(100)
        answer, auth = self.create(worker, lifetime=30, request_idx=7, cost=50.0)
        self.assertEqual(answer.code, 201)
        session_id = answer.json()["session_id"]
        self.assertEqual(answer.json()["expiration"], 130.0)
        self.assertGreaterEqual(len(session_id), 20)
        self.assertEqual(worker.backend.seen, [])  # the worker answered itself
        used = worker.post("/v1/echo", envelope(auth, {"prompt": "hi"}, session_id))
        self.assertEqual(used.code, 200)
        self.assertEqual(json.loads(worker.backend.seen[-1].body), {"prompt": "hi"})
        worker.report()
        status = worker.autoscaler.statuses[-1]
        self.assertEqual(status["working_request_idxs"], [7])
        self.assertEqual(status["cur_load"], 50.0)
        self.assertEqual(status["cur_perf"], 100.0)  # the session's request (WORKLOAD=cost)
        self.assertEqual(worker.autoscaler.deleted(), {})  # which has no request_idx of its own
        ended = worker.post("/session/end", {"session_id": session_id, "session_auth": auth})
        self.assertEqual(ended.code, 200)
        self.assertEqual(ended.json(), {"ended": True, "removed_session": session_id})
        worker.report()
        status = worker.autoscaler.statuses[-1]
        self.assertEqual((status["working_request_idxs"], status["cur_load"]), ([], 0))
        self.assertEqual(status["cur_perf"], 50.0)  # the session
        self.assertEqual(worker.autoscaler.deleted(), {7: True})

    def test_requests_in_a_session_count_their_own_workload(self) -> None:
        """A session's requests carry its auth_data, whose cost is the session's: each counts
        its payload's workload (100 with WORKLOAD=cost, as the official worker without a
        calculator), so a large session does not make its own second request wait (429)."""
        worker = self.worker(max_wait_time=10.0, max_perf=100.0)
        answer, auth = self.create(worker, cost=600.0)
        session_id = answer.json()["session_id"]
        body = json.dumps(envelope(auth, {}, session_id)).encode()
        slow = [worker.request("POST", "/slow?delay=5", body) for _ in range(2)]
        self.assertEqual([c.answer for c in slow], [None, None])  # both admitted
        worker.report()
        self.assertEqual(worker.autoscaler.statuses[-1]["cur_load"], 800.0)
        worker.advance(5)
        self.assertEqual([worker.answered(c).code for c in slow], [200, 200])
        worker.report()
        status = worker.autoscaler.statuses[-1]
        self.assertEqual((status["cur_load"], status["cur_perf"]), (600.0, 200.0))

    def test_a_session_counts_its_cost_whatever_workload(self) -> None:
        """With an estimating WORKLOAD, /session/create still counts its auth_data's cost
        (PROTOCOL 5.1: its payload holds no work), clamped like any cost, shown in its access
        line (a 429's too); a request in it counts WORKLOAD's estimate of its payload."""
        worker = self.worker(workload="openai", max_wait_time=10.0, observers=(log_access,))
        with capturedLogs() as events:
            answer, auth = self.create(worker, cost=600.0)
            self.create(worker, cost=5000.0, request_idx=2, reqnum=2)  # over 100/s x 10 s
            self.create(worker, cost=300.0, request_idx=3, reqnum=3)  # over MAX_SESSIONS
        lines = [formatEvent(event) for event in events]
        for shown in (
            "201 served workload=600 ",
            "201 served workload=1000 ",
            "429 rejected workload=300 ",
        ):
            self.assertTrue(any(f"/session/create {shown}" in x for x in lines), lines)
        payload = {"prompt": "four", "max_tokens": 7}  # 1 + 7 tokens
        used = worker.post("/x", envelope(auth, payload, answer.json()["session_id"]))
        self.assertEqual(used.code, 200)
        worker.report()
        status = worker.autoscaler.statuses[-1]
        self.assertEqual((status["cur_load"], status["cur_perf"]), (1600.0, 8.0))

    def test_gone_after_end(self) -> None:
        """After /session/end: 410 for a request in it, for /session/end and /session/get;
        /session/health says ok false. An id never issued is 410 too."""
        worker = self.worker()
        answer, auth = self.create(worker)
        session_id = answer.json()["session_id"]
        body = {"session_id": session_id, "session_auth": auth}
        self.assertEqual(worker.post("/session/end", body).code, 200)
        gone = worker.post("/x", envelope(auth, {}, session_id))
        self.assertEqual((gone.code, gone.json()["error"]), (410, "invalid session"))
        self.assertIn("ended", gone.json()["detail"])
        self.assertEqual(worker.post("/session/end", body).code, 410)
        self.assertEqual(worker.post("/session/get", body).code, 410)
        self.assertEqual(worker.post("/session/health", body).json(), {"ok": False})
        self.assertEqual(worker.post("/x", envelope(auth, {}, "never-issued")).code, 410)
        self.assertEqual(worker.backend.seen, [])

    def test_ttl_expiry_and_extension(self) -> None:
        """A session closes after its lifetime without a request; each request starts the
        TTL again from its end (not cumulatively); an expired session is reported served."""
        worker = self.worker()
        answer, auth = self.create(worker, lifetime=10, request_idx=3)
        session_id = answer.json()["session_id"]
        worker.advance(8)
        self.assertEqual(worker.post("/x", envelope(auth, {}, session_id)).code, 200)
        worker.advance(8)  # 16 s after creation, 8 s after the request
        got = worker.post("/session/get", {"session_id": session_id, "session_auth": auth})
        self.assertEqual(got.code, 200)
        self.assertEqual(got.json()["expiration"], 18.0)
        self.assertEqual(got.json()["lifetime"], 10.0)
        self.assertEqual(got.json()["auth_data"], auth)
        worker.advance(2)
        gone = worker.post("/x", envelope(auth, {}, session_id))
        self.assertEqual(gone.code, 410)
        self.assertIn("expired", gone.json()["detail"])
        worker.report()
        self.assertEqual(worker.autoscaler.deleted(), {3: True})

    def test_no_expiry_while_a_request_is_in_flight(self) -> None:
        """A session's request still at the backend when the TTL runs out keeps the session
        open; the TTL runs again from its end."""
        worker = self.worker()
        answer, auth = self.create(worker, lifetime=5)
        session_id = answer.json()["session_id"]
        body = json.dumps(envelope(auth, {}, session_id)).encode()
        slow = worker.request("POST", "/slow?delay=12", body)
        worker.advance(11)
        health = {"session_id": session_id, "session_auth": auth}
        self.assertEqual(worker.post("/session/health", health).json(), {"ok": True})
        worker.advance(1)
        self.assertEqual(worker.answered(slow).code, 200)
        worker.advance(4.5)
        self.assertEqual(worker.post("/session/health", health).json(), {"ok": True})
        worker.advance(1)
        self.assertEqual(worker.post("/session/health", health).json(), {"ok": False})

    def test_sessions_do_not_count_in_the_wait(self) -> None:
        """An open session's workload is not a queue: a request in it is admitted where
        the session's cost alone would exceed MAX_WAIT_TIME."""
        worker = self.worker(max_wait_time=1.0, max_perf=100.0)
        answer, auth = self.create(worker, cost=1000.0)
        session_id = answer.json()["session_id"]
        slow = worker.request("POST", "/slow?delay=5", json.dumps(envelope(auth, {})).encode())
        used = worker.post("/x", envelope(auth, {}, session_id))
        self.assertEqual(used.code, 429)  # the slow request (1000 over 100/s) is a queue
        worker.advance(5)
        self.assertEqual(worker.answered(slow).code, 200)
        self.assertEqual(worker.post("/x", envelope(auth, {}, session_id)).code, 200)

    def test_max_sessions_is_429(self) -> None:
        """Beyond MAX_SESSIONS, /session/create is 429 (counted as rejected with its cost);
        once one ends there is room again."""
        worker = self.worker(max_sessions=1)
        first, auth = self.create(worker)
        refused, _ = self.create(worker, request_idx=2, reqnum=2, cost=25.0)
        self.assertEqual((refused.code, refused.json()["error"]), (429, "too many sessions"))
        self.assertIsNotNone(refused.header(b"retry-after"))
        worker.report()
        self.assertEqual(worker.autoscaler.statuses[-1]["rej_load"], 25.0)
        self.assertEqual(worker.autoscaler.deleted(), {2: False})
        end = {"session_id": first.json()["session_id"], "session_auth": auth}
        self.assertEqual(worker.post("/session/end", end).code, 200)
        again, _ = self.create(worker, request_idx=4, reqnum=4)
        self.assertEqual(again.code, 201)

    def test_create_is_signed(self) -> None:
        """/session/create with a forged signature is 401 and opens nothing (the official
        worker does not check it, PROTOCOL B4)."""
        worker = self.worker(max_sessions=1)
        forged = {**worker.auth(), "signature": "AAAA"}
        answer = worker.post("/session/create", envelope(forged, {"lifetime": 60}))
        self.assertEqual(answer.code, 401)
        self.assertEqual(self.create(worker)[0].code, 201)  # the one slot is still free

    def test_session_requests_are_verified_first(self) -> None:
        """A request naming a live session with a bad signature is 401 (not 410, not served,
        no TTL extension: PROTOCOL B5); one signed for another request is 401 too."""
        worker = self.worker()
        answer, auth = self.create(worker, lifetime=10)
        session_id = answer.json()["session_id"]
        forged = {**auth, "signature": "AAAA"}
        refused = worker.post("/x", envelope(forged, {}, session_id))
        self.assertEqual((refused.code, refused.json()["error"]), (401, "invalid signature"))
        other = worker.auth(request_idx=9, reqnum=9)
        refused = worker.post("/x", envelope(other, {}, session_id))
        self.assertEqual((refused.code, refused.json()["error"]), (401, "invalid session auth"))
        self.assertEqual(worker.backend.seen, [])
        worker.advance(10)  # neither extended the TTL
        self.assertEqual(worker.post("/x", envelope(auth, {}, session_id)).code, 410)

    def test_management_needs_the_session_auth(self) -> None:
        """/session/end, /get and /health with another auth_data (or none) are 401 and end
        nothing; bad bodies are 422; other methods 405."""
        worker = self.worker()
        answer, auth = self.create(worker)
        session_id = answer.json()["session_id"]
        other = worker.auth(request_idx=9, reqnum=9)
        for path in ("/session/end", "/session/get", "/session/health"):
            forged = {**auth, "signature": auth["signature"][:-4] + "AAAA"}
            for given in (other, None, forged, {**auth, "signature": "\ud800"}):
                body = {"session_id": session_id, "session_auth": given}
                self.assertEqual(worker.post(path, body).code, 401, (path, given))
            self.assertEqual(worker.post(path, b"not json").code, 422)
            self.assertEqual(worker.post(path, {"session_auth": auth}).code, 422)
            self.assertEqual(worker.get(path).code, 405)
        self.assertEqual(worker.get("/session/create").code, 405)
        health = {"session_id": session_id, "session_auth": auth}
        self.assertEqual(worker.post("/session/health", health).json(), {"ok": True})

    def test_malformed_create(self) -> None:
        """A lifetime that is not a positive number within SESSION_MAX_TTL, or an
        on_close_route that is not a path, is 422 and opens nothing."""
        worker = self.worker(max_sessions=1)
        payloads: tuple[object, ...] = (
            {"lifetime": "long"},
            {"lifetime": 0},
            {"lifetime": 1e9},
            {"lifetime": 10**400},  # beyond any float
            {"on_close_route": "http://elsewhere/"},
            {"on_close_route": "/clean up"},
            {"on_close_route": "/x\r\nHost: elsewhere"},
            {"on_close_route": "/\ud800"},
            [],
        )
        for payload in payloads:
            answer = worker.post("/session/create", envelope(worker.auth(), payload))
            self.assertEqual(answer.code, 422, payload)
        self.assertEqual(self.create(worker)[0].code, 201)

    def test_on_close_route(self) -> None:
        """On end, on_close_payload (with the session_id added) is POSTed to on_close_route
        on the backend."""
        worker = self.worker()
        auth = worker.auth()
        payload = {"lifetime": 60, "on_close_route": "/cleanup", "on_close_payload": {"k": 1}}
        answer = worker.post("/session/create", envelope(auth, payload))
        session_id = answer.json()["session_id"]
        worker.post("/session/end", {"session_id": session_id, "session_auth": auth})
        seen = worker.backend.seen[-1]
        self.assertEqual((seen.method, seen.uri), (b"POST", b"/cleanup"))
        self.assertEqual(json.loads(seen.body), {"k": 1, "session_id": session_id})

    def test_on_close_route_unanswered(self) -> None:
        """An on_close_route call the backend does not answer is dropped after its limit (the
        backend's handler hears the hang-up) and logged with that reason; the session ended."""
        worker = self.worker()
        auth = worker.auth()
        payload = {"lifetime": 60, "on_close_route": "/slow?delay=60"}
        answer = worker.post("/session/create", envelope(auth, payload))
        session_id = answer.json()["session_id"]
        with capturedLogs() as events:
            ended = worker.post("/session/end", {"session_id": session_id, "session_auth": auth})
            self.assertEqual(ended.code, 200)
            worker.advance(ON_CLOSE_TIMEOUT)
        [hung_up] = worker.backend.cancelled
        self.assertTrue(hung_up.called)
        self.assertIn(
            f"on_close_route /slow?delay=60 of session {session_id} failed: no answer within 10 s",
            [formatEvent(event) for event in events],
        )
        gone = worker.post("/session/get", {"session_id": session_id, "session_auth": auth})
        self.assertEqual(gone.code, 410)

    def test_stop_waits_for_on_close_calls(self) -> None:
        """Stopping waits for the on_close_route calls already made (the backend hears of the
        sessions that ended), each at most ON_CLOSE_TIMEOUT."""
        worker = self.worker()
        payload = {"lifetime": 5, "on_close_route": "/slow?delay=60"}
        worker.post("/session/create", envelope(worker.auth(), payload))
        worker.advance(5)  # the session expires: its on_close_route call starts
        self.assertEqual(worker.backend.seen[-1].uri, b"/slow?delay=60")
        assert worker.sessions is not None
        stopped = worker.sessions.stopService()
        worker.advance(ON_CLOSE_TIMEOUT - 1)
        self.assertNoResult(stopped)
        worker.advance(1)
        self.successResultOf(stopped)
        self.assertTrue(worker.backend.cancelled[-1].called)  # the backend heard the hang-up
        self.successResultOf(worker.sessions.stopService())  # nothing left to wait for

    def test_replay_window_lets_session_requests_through(self) -> None:
        """With REPLAY_WINDOW on, a session's requests (all the same auth_data) are served;
        the same auth_data without the session is a replay."""
        worker = self.worker(replay_window=100)
        answer, auth = self.create(worker)
        session_id = answer.json()["session_id"]
        for _ in range(3):
            self.assertEqual(worker.post("/x", envelope(auth, {}, session_id)).code, 200)
        self.assertEqual(worker.post("/x", envelope(auth, {})).code, 401)
        # Opening a session is not one of its requests: its auth_data opens one session.
        again = worker.post("/session/create", envelope(auth, {"lifetime": 60}, "anything"))
        self.assertEqual((again.code, again.json()["error"]), (401, "replayed request"))
        self.assertEqual(len(worker.sessions.open), 1)  # type: ignore[union-attr]

    def test_sessions_off(self) -> None:
        """MAX_SESSIONS=0: /session/create goes to the backend like any path; a request
        naming a session is 410."""
        worker = MemoryWorker(self)
        auth = worker.auth()
        self.assertEqual(worker.post("/session/create", envelope(auth, {})).code, 200)
        self.assertEqual(worker.backend.seen[-1].uri, b"/session/create")
        self.assertEqual(worker.post("/x", envelope(auth, {}, "abc")).code, 410)

    def test_session_id_must_be_a_string(self) -> None:
        worker = self.worker()
        self.assertEqual(worker.post("/x", envelope(worker.auth(), {}, 5)).code, 422)  # type: ignore[arg-type]

    def test_plain_http_end_listener(self) -> None:
        """The SESSION_LISTEN resource ends a session with its session_auth, refuses another
        auth_data, and serves nothing else."""
        worker = self.worker()
        answer, auth = self.create(worker)
        session_id = answer.json()["session_id"]
        assert worker.sessions is not None
        resource = SessionEndResource(worker.sessions)

        def call(path: bytes, document: Any) -> tuple[int, Any]:
            request = DummyRequest([path.strip(b"/")])
            as_request = cast(Request, request)  # a stand-in for one
            request.method = b"POST"
            as_request.path = path
            as_request.content = io.BytesIO(json.dumps(document).encode())
            body = resource.render(as_request)
            return request.responseCode or 200, json.loads(body)

        body = {"session_id": session_id, "session_auth": worker.auth(request_idx=5)}
        self.assertEqual(call(b"/session/end", body)[0], 401)
        self.assertEqual(call(b"/session/get", body)[0], 404)
        code, answer_body = call(b"/session/end", {**body, "session_auth": auth})
        self.assertEqual((code, answer_body["ended"]), (200, True))
        self.assertEqual(worker.sessions.open, {})


class SessionSocketTests(TestCase):
    async def test_wired_by_build_worker(self) -> None:
        """Through real sockets, as build_worker wires it: a signed worker opens a session,
        relays a request in it, and SESSION_LISTEN's plain-HTTP listener ends it; the stop
        ends the session still open (its on_close_route called), both reported closed."""
        backend = FakeBackend(reactor)
        backend_url = listen(self, backend)
        port = sandbox._port(0)
        worker = await start_signed_worker(
            self, backend_url, session_listen=f"tcp:{port}:interface=127.0.0.1"
        )
        client = http_client(self)
        auth = worker.auth(request_idx=5)

        async def post(url: str, document: Any) -> tuple[int, Any]:
            response = await client.post(url, json=document)
            return response.code, await response.json()

        code, created = await post(worker.url + "/session/create", envelope(auth, {}))
        self.assertEqual(code, 201)
        session_id = created["session_id"]
        code, echoed = await post(worker.url + "/v1/x", envelope(auth, {"a": 1}, session_id))
        self.assertEqual((code, echoed["uri"]), (200, "/v1/x"))
        end = {"session_id": session_id, "session_auth": auth}
        code, ended = await post(f"http://127.0.0.1:{port}/session/end", end)
        self.assertEqual((code, ended["ended"]), (200, True))
        code, _ = await post(worker.url + "/v1/x", envelope(auth, {}, session_id))
        self.assertEqual(code, 410)
        closing = {"on_close_route": "/v1/closing"}
        opened = envelope(worker.auth(request_idx=6, reqnum=6), closing)
        self.assertEqual((await post(worker.url + "/session/create", opened))[0], 201)
        await worker.service.stopService()
        self.assertEqual(worker.autoscaler.deleted(), {5: True, 6: True})
        self.assertEqual(backend.seen[-1].uri, b"/v1/closing")
