"""
Signed requests. The gate's decisions in memory (a worker's request path on a task.Clock, its
backend and autoscaler fakes reached in memory: tests/memory.py); then end to end: a secured
worker on a real socket, in front of a fake backend, reporting to a fake autoscaler that serves
a real RSA key made in the test, and `twistd vespa` with the Vast variables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from typing import Any, cast
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import (
    FAST_PATH,
    http_client,
    listen,
    secured_worker_env,
    spawn_worker,
    start_signed_worker,
    worker_url,
)
from tests.memory import BACKEND_URL, Connection, MemoryWorker, raw_http
from tests.test_admin import samples
from vast_vespa.logs import log_access
from vast_vespa.options import SettingsError
from vast_vespa.settings import Settings, VastEnvironment, check_protocol
from vast_vespa.signing import generate_private_key, public_pem, sign
from vast_vespa.worker.gate import blocked, path_forms
from vast_vespa.worker.tap import build_worker

AUTH = {
    "cost": 10.0,
    "endpoint": "my-endpoint",
    "reqnum": 3,
    "request_idx": 98765,
    "signature": "",
    "url": "",
}


def query(auth: dict) -> str:
    return "&".join(
        f"serverless_{k}={quote(str(v), safe='')}" for k, v in auth.items() if k != "__request_id"
    )


def envelope(auth: dict[str, Any], payload: object = None) -> dict[str, Any]:
    return {"auth_data": auth, "payload": {} if payload is None else payload}


class SignedRequestTests(SynchronousTestCase):
    def worker(self, **changes: Any) -> MemoryWorker:
        return MemoryWorker(self, **changes)

    def test_both_signature_shapes_reach_the_backend(self) -> None:
        """An envelope signed url-only or five-field is served; the backend gets the payload
        alone as JSON, never the auth."""
        worker = self.worker()
        for shape in ("url", "five-field"):
            answer = worker.post(
                "/v1/chat?stream=0", envelope(worker.auth(shape), {"prompt": "hi"})
            )
            self.assertEqual(answer.code, 200)
            self.assertEqual(answer.json()["uri"], "/v1/chat?stream=0")
        seen = worker.backend.seen[-1]
        self.assertEqual(json.loads(seen.body), {"prompt": "hi"})
        self.assertEqual(seen.headers[b"content-type"], [b"application/json"])

    def test_bad_or_missing_signature_is_401(self) -> None:
        """A tampered or absent signature is 401 with a JSON error; nothing reaches the
        backend and no load figure moves (a forged cost must not move rej_load)."""
        worker = self.worker()
        forged = {**worker.auth(), "cost": 1e6}  # signature no longer matches (five-field)
        forged["url"] = "http://198.51.100.1:1"
        answer = worker.post("/x", envelope(forged))
        self.assertEqual(answer.code, 401)
        self.assertEqual(answer.json()["error"], "invalid signature")
        answer = worker.get("/models")
        self.assertEqual(answer.code, 401)
        self.assertEqual(answer.json()["error"], "signature required")
        self.assertEqual(worker.backend.seen, [])
        worker.report()
        last = worker.autoscaler.statuses[-1]
        self.assertEqual((last["rej_load"], last["num_requests_recieved"]), (0, 0))
        self.assertEqual(worker.autoscaler.deletes, [])

    def test_malformed_requests(self) -> None:
        """422 for a body that is not JSON, a scalar, or an envelope missing fields (listed);
        400 for bad query auth; 422 for a negative cost or one beyond any float."""
        worker = self.worker()
        self.assertEqual(worker.post("/x", b"\x00binary").code, 422)
        self.assertEqual(worker.post("/x", 42).code, 422)
        answer = worker.post("/x", {"payload": {}})
        self.assertEqual((answer.code, answer.json()["missing"]), (422, ["auth_data"]))
        auth = worker.auth()
        del auth["request_idx"]
        answer = worker.post("/x", envelope(auth))
        self.assertEqual((answer.code, answer.json()["missing"]), (422, ["request_idx"]))
        bad_cost = query(worker.auth()).replace("serverless_cost=10.0", "serverless_cost=ten")
        self.assertEqual(worker.get("/x?" + bad_cost).code, 400)
        for cost in (-5.0, 10**400):
            answer = worker.post("/x", envelope(worker.auth("five-field", cost=cost)))
            self.assertEqual((answer.code, answer.json()["error"]), (422, "invalid cost"))
        self.assertEqual(worker.backend.seen, [])

    def test_query_auth_for_get_with_repeated_params(self) -> None:
        """GET with serverless_* parameters: verified, removed; the other parameters, repeated
        ones too, reach the backend unchanged and in order."""
        worker = self.worker()
        uri = "/v1/models?a=1&" + query(worker.auth("five-field", cost=256)) + "&a=2&b=x%2By"
        self.assertEqual(worker.get(uri).code, 200)
        self.assertEqual(worker.backend.seen[-1].uri, b"/v1/models?a=1&a=2&b=x%2By")
        self.assertEqual(worker.backend.seen[-1].method, b"GET")

    def test_header_auth_body_as_sent(self) -> None:
        """X-Serverless-Auth: the body reaches the backend as sent, with its own Content-Type
        and without the auth header."""
        worker = self.worker()
        upload = bytes(range(256)) * 4
        answer = worker.call(
            "POST",
            "/upload",
            upload,
            {"Content-Type": "image/png", "X-Serverless-Auth": json.dumps(worker.auth())},
        )
        self.assertEqual(answer.code, 200)
        self.assertEqual(answer.json()["body_sha256"], hashlib.sha256(upload).hexdigest())
        seen = worker.backend.seen[-1]
        self.assertEqual(seen.headers[b"content-type"], [b"image/png"])
        self.assertNotIn(b"x-serverless-auth", seen.headers)

    def test_blocked_paths_403_whatever_the_spelling(self) -> None:
        """BLOCKED_PATHS matches the normalised, percent-decoded path, without a fragment (a
        backend drops it)."""
        worker = self.worker(blocked_paths=("/admin*", "/v1/load_lora_adapter"))
        auth = json.dumps(worker.auth())
        spellings = ("/admin", "//admin/x", "/a/../admin", "/%61dmin", "/x%2F..%2Fadmin")
        for path in (*spellings, "/v1/load_lora_adapter#", "/v1/load_lora_adapter#x?y"):
            answer = worker.call("GET", path, headers={"X-Serverless-Auth": auth})
            self.assertEqual(answer.code, 403, path)
        self.assertEqual(worker.backend.seen, [])

    def test_no_key_yet_is_503(self) -> None:
        """While the public key cannot be fetched, signed requests get 503 + Retry-After."""
        worker = self.worker(serve_key=False)
        answer = worker.post("/x", envelope(worker.auth()))
        self.assertEqual(answer.code, 503)
        self.assertEqual(answer.header(b"retry-after"), [b"5"])
        self.assertEqual(worker.backend.seen, [])

    def test_key_rotation(self) -> None:
        """A signature that fails with a key older than 5 minutes makes the worker fetch the
        key again; a younger key is not fetched again."""
        worker = self.worker()
        worker.key = generate_private_key()
        worker.autoscaler.pubkey = public_pem(worker.key)
        self.assertEqual(worker.post("/x", envelope(worker.auth())).code, 401)
        self.assertEqual(worker.autoscaler.pubkey_requests, 1)  # the key is too young
        worker.advance(300)  # the key in use counts as old
        self.assertEqual(worker.post("/x", envelope(worker.auth())).code, 200)
        self.assertEqual(worker.autoscaler.pubkey_requests, 2)
        worker.advance(300)
        forged = {**worker.auth(), "signature": worker.auth(reqnum=9)["signature"][::-1]}
        self.assertEqual(worker.post("/x", envelope(forged)).code, 401)  # fetched, still bad
        self.assertEqual(worker.autoscaler.pubkey_requests, 3)

    def test_hardening(self) -> None:
        """VERIFY_URL refuses a signature for another worker's URL; REPLAY_WINDOW refuses the
        same (reqnum, signature) twice."""
        worker = self.worker(verify_url=True, replay_window=10)
        answer = worker.post("/x", envelope(worker.auth(url="http://198.51.100.1:2")))
        self.assertEqual((answer.code, answer.json()["error"]), (401, "wrong worker"))
        signed = envelope(worker.auth(reqnum=7))
        self.assertEqual(worker.post("/x", signed).code, 200)
        answer = worker.post("/x", signed)
        self.assertEqual((answer.code, answer.json()["error"]), (401, "replayed request"))
        # The same signature spelled otherwise (the last character's unused bits) too.
        auth = signed["auth_data"]
        body = auth["signature"].rstrip("=")
        alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
        last = alphabet[alphabet.index(body[-1]) ^ 1]
        respelled = body[:-1] + last + auth["signature"][len(body) :]
        answer = worker.post("/x", envelope({**auth, "signature": respelled}))
        self.assertEqual((answer.code, answer.json()["error"]), (401, "replayed request"))
        self.assertEqual(len(worker.backend.seen), 1)

    def test_forged_cost_is_clamped(self) -> None:
        """A url-shape signature does not cover cost: a request claiming 1e15 counts for what
        the worker serves within MAX_WAIT_TIME (max_perf 10 x 5 s), is served on an idle
        worker, and neither the 429 of the next request nor the report shows 1e15."""
        worker = self.worker(max_wait_time=5.0, max_perf=10.0)
        held = worker.envelope("/slow?delay=1", cost=1e15, request_idx=1)
        self.assertEqual(len(worker.backend.seen), 1)
        self.assertEqual(worker.metrics.load, 50.0)
        answer = worker.post("/x", envelope(worker.auth(cost=1e15, request_idx=2)))
        self.assertEqual(answer.code, 429)
        self.assertEqual(answer.header(b"retry-after"), [b"5"])
        self.assertEqual(answer.json()["estimated_wait"], 10.0)
        worker.report()
        status = worker.autoscaler.statuses[-1]
        self.assertEqual((status["cur_load"], status["rej_load"]), (50.0, 50.0))
        worker.advance(1)
        self.assertEqual(worker.answered(held).code, 200)

    def test_refusal_access_line_has_its_workload(self) -> None:
        """A 429's access line shows the workload the report counts as rejected (it said
        workload=0); a refusal with no workload (401) still says 0. Both count the bytes of
        their JSON answer (they said 0B)."""
        lines: list[str] = []
        logger = Logger(observer=cast(ILogObserver, lambda event: lines.append(event["line"])))
        worker = self.worker(
            max_wait_time=5.0,
            max_perf=10.0,
            observers=(
                lambda request, result, forward: log_access(request, result, forward, logger),
            ),
        )
        held = worker.envelope("/slow?delay=1", cost=50.0, request_idx=1)
        answer = worker.post("/x", envelope(worker.auth(cost=40.0, request_idx=2)))
        self.assertEqual(answer.code, 429)
        self.assertEqual(worker.get("/unsigned").code, 401)
        worker.report()
        self.assertEqual(worker.autoscaler.statuses[-1]["rej_load"], 40.0)
        self.assertRegex(lines[0], rf"^POST /x 429 rejected workload=40 {len(answer.body)}B ")
        self.assertRegex(lines[1], r"^GET /unsigned 401 rejected workload=0 [1-9]\d*B ")
        worker.advance(1)
        self.assertEqual(worker.answered(held).code, 200)

    def test_copied_request_idx_does_not_end_another_request(self) -> None:
        """A url-shape signature does not cover request_idx: a request bringing an idx in
        flight is served, but only the first request's end is reported under it."""
        worker = self.worker()
        held = worker.envelope("/slow?delay=1", request_idx=7)
        copy = envelope(worker.auth(request_idx=7))
        self.assertEqual(worker.post("/status/500", copy).code, 500)
        worker.report()
        self.assertEqual(worker.autoscaler.deleted(), {})
        worker.advance(1)
        self.assertEqual(worker.answered(held).code, 200)
        worker.report()
        self.assertEqual(worker.autoscaler.deleted(), {7: True})

    def test_reports_add_up(self) -> None:
        """One at a time (ALLOW_PARALLEL=false): a held request, a queued one whose client
        leaves (never reaches the backend), a 429 with the estimate, a served one and a
        backend 500. The reports add up to exactly the workload served, rejected and
        cancelled, and every request_idx is deleted with its success flag."""
        worker = self.worker(allow_parallel=False, max_wait_time=5.0, max_perf=10.0)
        metrics = worker.metrics
        held = worker.envelope("/slow?delay=0.5", cost=2.0, request_idx=1)
        self.assertEqual(len(worker.backend.seen), 1)
        queued = worker.envelope("/queued", cost=30.0, request_idx=2)
        self.assertEqual((len(metrics.in_flight), worker.admission.queued), (2, 1))
        answer = worker.post("/x", envelope(worker.auth(cost=40.0, request_idx=3)))
        self.assertEqual(answer.code, 429)
        self.assertEqual(answer.header(b"retry-after"), [b"3"])  # (2 + 30 + 40) / 10 - 5
        self.assertEqual(answer.json()["estimated_wait"], 7.2)
        queued.leave()
        self.assertEqual(len(metrics.in_flight), 1)
        worker.advance(0.5)
        self.assertEqual(worker.answered(held).code, 200)
        ok = envelope(worker.auth(cost=10.0, request_idx=4))
        self.assertEqual(worker.post("/ok", ok).code, 200)
        broken = envelope(worker.auth(cost=20.0, request_idx=5))
        self.assertEqual(worker.post("/status/500", broken).code, 500)
        self.assertEqual(worker.get("/unsigned").code, 401)  # counts nowhere
        self.assertEqual(metrics.in_flight, {})
        worker.report()
        statuses = worker.autoscaler.statuses
        self.assertEqual(sum(s["cur_perf"] for s in statuses), 2 + 10)
        self.assertEqual(sum(s["rej_load"] for s in statuses), 40)
        self.assertEqual(sum(s["new_load"] for s in statuses), 2 + 10 + 20)
        self.assertEqual(statuses[-1]["cur_load"], 0)
        self.assertEqual(statuses[-1]["num_requests_recieved"], 5)
        self.assertEqual(statuses[-1]["url"], "http://203.0.113.7:43000")
        self.assertEqual(statuses[-1]["mtoken"], "mtok-secret-value")
        self.assertEqual(
            worker.autoscaler.deleted(), {1: True, 2: True, 3: False, 4: True, 5: False}
        )
        self.assertEqual(
            [s.uri for s in worker.backend.seen], [b"/slow?delay=0.5", b"/ok", b"/status/500"]
        )


class WorkloadTests(SynchronousTestCase):
    def new_load(self, worker: MemoryWorker) -> float:
        worker.report()
        total: float = sum(status["new_load"] for status in worker.autoscaler.statuses)
        return total

    def test_estimated_where_cost_is_not_signed(self) -> None:
        """WORKLOAD=openai: a url-only signature does not cover cost, so the payload decides
        the workload (max_tokens 50 + an 8-character prompt: 52), whatever cost says; a
        five-field signature covers it, and the signed cost counts."""
        payload = {"prompt": "12345678", "max_tokens": 50}
        worker = MemoryWorker(self, workload="openai")
        answer = worker.post("/v1/completions", envelope(worker.auth("url", cost=1e6), payload))
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.new_load(worker), 52)
        worker = MemoryWorker(self, workload="openai")
        worker.post("/v1/completions", envelope(worker.auth("five-field", cost=7.0), payload))
        self.assertEqual(self.new_load(worker), 7)

    def test_header_form_and_unsecured(self) -> None:
        """The header form's JSON body is estimated too, and so is an unsecured request that
        carries auth (its cost is no one's word); a non-JSON body counts the default."""
        worker = MemoryWorker(self, workload="tgi")
        auth = json.dumps(worker.auth("url", cost=1.0))
        body = b'{"inputs": "1234", "parameters": {"max_new_tokens": 9}}'
        answer = worker.call("POST", "/generate", body, {"x-serverless-auth": auth})
        self.assertEqual(answer.code, 200)
        worker.call("POST", "/upload", b"\x89PNG...", {"x-serverless-auth": auth})
        self.assertEqual(self.new_load(worker), 10 + 100)
        worker = MemoryWorker(self, signed=False, workload="openai")
        worker.post("/v1/completions", envelope(AUTH, {"max_tokens": 3}))
        self.assertEqual(self.new_load(worker), 3)

    def test_estimate_is_clamped_too(self) -> None:
        """The payload is the sender's as much as an unsigned cost: an estimate beyond what
        the worker serves within MAX_WAIT_TIME (max_perf 10 x 5 s) counts for that much."""
        worker = MemoryWorker(self, workload="openai", max_perf=10.0, max_wait_time=5.0)
        payload = {"prompt": "x", "max_tokens": 10**9}
        answer = worker.post("/v1/completions", envelope(worker.auth("url"), payload))
        self.assertEqual(answer.code, 200)
        self.assertEqual(self.new_load(worker), 50)

    def test_cost_mode_keeps_the_declared_cost(self) -> None:
        """WORKLOAD=cost (the default without BACKEND): the declared cost, as before."""
        worker = MemoryWorker(self)
        worker.post("/v1/completions", envelope(worker.auth("url", cost=12.0), {"max_tokens": 3}))
        self.assertEqual(self.new_load(worker), 12)


class EndpointKeyTests(SynchronousTestCase):
    KEY = "endpoint-key-0123456789"

    def test_official_client_key_stays_here(self) -> None:
        """Secured: the official client's ?api_key=<endpoint key> and the Authorization
        header carrying the same key never reach the backend; the rest of the query does."""
        worker = MemoryWorker(self)
        bearer = {"authorization": f"Bearer {self.KEY}"}
        path = f"/v1/chat?api_key={self.KEY}&stream=0"
        answer = worker.post(path, envelope(worker.auth(), {"p": 1}), bearer)
        self.assertEqual(answer.code, 200)
        answer = worker.get(f"/v1/models?{query(worker.auth())}&api_key={self.KEY}", bearer)
        self.assertEqual(answer.code, 200)
        for seen, uri in zip(
            worker.backend.seen, (b"/v1/chat?stream=0", b"/v1/models"), strict=True
        ):
            self.assertEqual(seen.uri, uri)
            self.assertNotIn(b"authorization", seen.headers)
            self.assertNotIn(self.KEY.encode(), seen.uri)

    def test_other_authorization_passes(self) -> None:
        """An Authorization that is not the endpoint key (the app's own backend key) passes;
        so does everything unsecured, where no endpoint key is involved."""
        worker = MemoryWorker(self)
        own = {"authorization": "Bearer sk-backend"}
        worker.post(f"/v1/x?api_key={self.KEY}", envelope(worker.auth()), own)
        self.assertEqual(worker.backend.seen[-1].headers[b"authorization"], [b"Bearer sk-backend"])
        worker = MemoryWorker(self, signed=False)
        bearer = {"authorization": f"Bearer {self.KEY}"}
        worker.post(f"/v1/x?api_key={self.KEY}", envelope(AUTH), bearer)
        seen = worker.backend.seen[-1]
        self.assertEqual(seen.uri, f"/v1/x?api_key={self.KEY}".encode())
        self.assertEqual(seen.headers[b"authorization"], [bearer["authorization"].encode()])


class UnsecuredTests(SynchronousTestCase):
    def test_envelope_unwrapped_rest_passes(self) -> None:
        """UNSECURED: an envelope is unwrapped without a signature check; any other body
        and query string pass through untouched."""
        worker = MemoryWorker(self, signed=False)
        answer = worker.post("/a", envelope({**AUTH, "signature": "bogus"}, {"p": 1}))
        self.assertEqual(answer.code, 200)
        self.assertEqual(json.loads(worker.backend.seen[-1].body), {"p": 1})
        answer = worker.call("POST", "/b?serverless_cost=1", b'{"p": 2}')
        self.assertEqual(answer.code, 200)
        self.assertEqual(worker.backend.seen[-1].body, b'{"p": 2}')
        self.assertEqual(worker.backend.seen[-1].uri, b"/b?serverless_cost=1")

    def test_large_bodies_relayed_as_sent_or_unwrapped(self) -> None:
        """UNSECURED: a 20 MB JSON body mentioning auth_data (not leading) reaches the backend
        byte for byte; a large envelope leading with auth_data is unwrapped (its payload)."""
        worker = MemoryWorker(self, signed=False)
        raw = b'{"prompt": "' + b"x" * (20 << 20) + b'", "note": "auth_data"}'
        self.assertEqual(worker.call("POST", "/big", raw).code, 200)
        self.assertEqual(worker.backend.seen[-1].body, raw)
        payload = {"p": "y" * (1 << 17)}
        self.assertEqual(worker.post("/env", envelope(AUTH, payload)).code, 200)
        self.assertEqual(json.loads(worker.backend.seen[-1].body), payload)

    def test_nothing_reports_without_report_addr(self) -> None:
        """UNSECURED without REPORT_ADDR: the worker has no reporter."""
        settings = dataclasses.replace(Settings(), unsecured=True, listen=(), admin_listen="")
        self.assertIsNone(build_worker(settings, MemoryReactorClock()).reporter)


class AdminGaugeTests(SynchronousTestCase):
    def test_serverless_gauges(self) -> None:
        """/metrics shows the workload in flight, the queue, the wait estimate and the
        request ids waiting for /delete_requests/ (the worker as build_worker wires it, on a
        memory reactor where the backend never answers: its clients leave)."""
        key = generate_private_key()
        vast = VastEnvironment("mtok-secret-value", ("http://autoscaler",), 4242, "http://w")
        settings = dataclasses.replace(
            Settings(),
            backend_url=BACKEND_URL,
            listen=(),
            admin_listen="tcp:0:interface=127.0.0.1",
            allow_parallel=False,
            fast_path=FAST_PATH,
            vast=vast,
        )
        service = build_worker(settings, MemoryReactorClock())
        service.state.mark_loaded(0.0, 100.0)
        service.getServiceNamed("pubkey").key = key.public_key()
        admin = service.getServiceNamed("admin").listening.factory

        def request(site: Any, data: bytes) -> Connection:
            connection = Connection(site, 50000)
            self.addCleanup(connection.close)
            connection.send(data)
            return connection

        def scrape() -> dict:
            answer = request(admin, raw_http("GET", "/metrics")).answer
            assert answer is not None
            return samples(answer.body.decode())

        auth = {**AUTH, "cost": 50.0, "request_idx": 5, "url": "http://w"}
        auth["signature"] = sign(key, auth, "url")
        body = json.dumps(envelope(auth)).encode()
        other = json.dumps(envelope({**auth, "request_idx": 6})).encode()
        held = request(service.site, raw_http("POST", "/held", body))
        queued = request(service.site, raw_http("POST", "/queued", other))
        metrics = scrape()
        self.assertEqual(metrics[("vespa_workload_in_flight", ())], 100.0)
        self.assertEqual(metrics[("vespa_requests_queued", ())], 1)
        self.assertEqual(metrics[("vespa_estimated_wait_seconds", ())], 1.0)  # 100 / max_perf 100
        held.leave()
        queued.leave()
        metrics = scrape()
        self.assertEqual(metrics[("vespa_workload_in_flight", ())], 0.0)
        self.assertEqual(metrics[("vespa_requests_queued", ())], 0)
        self.assertEqual(metrics[("vespa_pending_deletes", ())], 2)


class SignedEndToEndTests(TestCase):
    timeout = 30

    async def test_signed_requests_served_and_reported(self) -> None:
        """Through real sockets: an envelope (payload alone to the backend) and a binary
        upload with X-Serverless-Auth (~1 MB, spooled and streamed, byte for byte, with its
        own Content-Type and without the auth header) are served, and the autoscaler gets
        their workload and their request_idx."""
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(self, listen(self, backend), report_interval=60.0)
        http = http_client(self)
        signed = envelope(worker.auth(cost=3.0, request_idx=1), {"prompt": "hi"})
        response = await http.post(worker.url + "/v1/chat", data=json.dumps(signed).encode())
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(json.loads(backend.seen[-1].body), {"prompt": "hi"})
        upload = bytes(range(256)) * 4000
        response = await http.post(
            worker.url + "/upload",
            data=upload,
            headers=Headers(
                {
                    b"Content-Type": [b"image/png"],
                    b"X-Serverless-Auth": [
                        json.dumps(worker.auth(cost=4.0, request_idx=2)).encode()
                    ],
                }
            ),
        )
        self.assertEqual(response.code, 200)
        answer = await response.json()
        self.assertEqual(answer["body_sha256"], hashlib.sha256(upload).hexdigest())
        seen = backend.seen[-1]
        self.assertEqual(seen.headers[b"content-type"], [b"image/png"])
        self.assertNotIn(b"x-serverless-auth", seen.headers)
        await worker.service.in_flight.idle()
        assert worker.service.reporter is not None
        await worker.service.reporter.send_now()
        self.assertEqual(sum(s["cur_perf"] for s in worker.autoscaler.statuses), 7.0)
        self.assertEqual(worker.autoscaler.deleted(), {1: True, 2: True})


class DrainReportTests(TestCase):
    async def test_drain_reports_before_exit(self) -> None:
        """Stopping the worker reports what the beat has not sent yet (here the beat is
        60 s): the served workload and the request_idx for /delete_requests/."""
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(self, listen(self, backend), report_interval=60.0)
        statuses = worker.autoscaler.statuses
        await worker.autoscaler.when(lambda: len(statuses) == 1)  # the report at start
        signed = envelope(worker.auth(cost=3.0, request_idx=42))
        response = await http_client(self).post(worker.url + "/x", data=json.dumps(signed).encode())
        self.assertEqual(response.code, 200)
        await response.content()
        await worker.service.stopService()
        self.assertEqual(sum(s["cur_perf"] for s in statuses), 3.0)
        self.assertEqual(worker.autoscaler.deleted(), {42: True})


class BlockedPathTests(SynchronousTestCase):
    def test_path_forms(self) -> None:
        """Raw, decoded and normalised forms of a path are all checked."""
        self.assertIn("/admin", path_forms(b"/x/%2e%2e/admin?q=1"))
        self.assertIn("/admin/x", path_forms(b"//admin//x"))
        self.assertIn("/admin", path_forms(b"/%2561dmin"))
        self.assertIn("/admin", path_forms(b"/admin#?x"))

    def test_blocked(self) -> None:
        """Patterns are fnmatch, case-sensitive; no patterns blocks nothing."""
        self.assertEqual(blocked(b"/debug/x", ("/admin*", "/debug/*")), "/debug/*")
        self.assertIsNone(blocked(b"/Admin", ("/admin*",)))
        self.assertIsNone(blocked(b"/admin", ()))


class StartupTests(SynchronousTestCase):
    def test_secured_without_report_addr_stops(self) -> None:
        """A secured worker without REPORT_ADDR refuses to start with one clear line."""
        with self.assertRaises(SettingsError) as caught:
            check_protocol(Settings())
        self.assertIn("set REPORT_ADDR, or UNSECURED=true", str(caught.exception))
        self.assertRaises(SettingsError, build_worker, Settings(), reactor)
        check_protocol(Settings(unsecured=True))

    def test_verify_url_needs_the_public_url(self) -> None:
        """VERIFY_URL without PUBLIC_IPADDR/VAST_TCP_PORT_<port> is a settings error."""
        vast = VastEnvironment(report_addrs=("http://a",))
        with self.assertRaises(SettingsError) as caught:
            check_protocol(Settings(verify_url=True, vast=vast))
        self.assertIn("VAST_TCP_PORT_3000", str(caught.exception))


class TwistdTests(TestCase):
    timeout = 60

    async def test_vast_environment_end_to_end(self) -> None:
        """`twistd vespa` with the Vast variables: fetches the key from REPORT_ADDR (the
        second of two), loads, accepts only signed requests, and reports its URL, id and
        max_perf."""
        key = generate_private_key()
        autoscaler = FakeAutoscaler(public_pem(key))
        backend = FakeBackend(reactor)
        env = {
            **secured_worker_env(self, "http://127.0.0.1:9," + listen(self, autoscaler)),
            "PUBLIC_IPADDR": "203.0.113.7",
            "WORKER_PORT": "3000",
            "VAST_TCP_PORT_3000": "43000",
        }
        process = spawn_worker(self, listen(self, backend), env=env)
        url = await worker_url(process)
        await process.wait_for(rb"autoscaler public key loaded")
        await process.wait_for(rb"worker loaded")
        auth = {**AUTH, "url": "http://203.0.113.7:43000"}
        auth["signature"] = sign(key, auth, "url")
        http = http_client(self)
        response = await http.post(url + "/x", data=json.dumps(envelope(auth)).encode())
        self.assertEqual(response.code, 200)
        response = await http.post(url + "/x", data=b'{"payload": {}}')
        self.assertEqual(response.code, 422)
        self.assertEqual([seen.uri for seen in backend.seen if seen.uri != b"/health"], [b"/x"])
        await autoscaler.when(lambda: autoscaler.deleted() == {AUTH["request_idx"]: True})
        # A report built just before the worker loaded can arrive after the deletion (its
        # first address refuses it, the second takes it): the next report carries max_perf.
        statuses = autoscaler.statuses
        await autoscaler.when(lambda: statuses and statuses[-1]["max_perf"] == 1000.0)
        status = statuses[-1]
        self.assertEqual((status["id"], status["url"]), (4242, "http://203.0.113.7:43000"))
        await process.wait_for(rb"reporting to the autoscaler at .* \(mtoken mtok\.\.\.\)")
        self.assertNotIn(b"0123456789", process.output)  # the token is never logged
