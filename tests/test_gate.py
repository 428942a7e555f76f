"""Signed requests end to end: a secured worker on a real socket, in front of a fake backend,
reporting to a fake autoscaler that serves a real RSA key made in the test."""

from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeAutoscaler, FakeBackend
from tests.helpers import (
    RawClient,
    SignedWorker,
    http_client,
    listen,
    raw_connect,
    raw_request,
    spawn_worker,
    start_signed_worker,
    start_worker,
    until,
    worker_url,
)
from tests.test_admin import samples
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


class SignedRequestTests(TestCase):
    timeout = 30

    async def worker(self, **changes) -> tuple[SignedWorker, FakeBackend]:
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(self, listen(self, backend), **changes)
        return worker, backend

    async def post(self, worker: SignedWorker, path: str, document: object, **kwargs):
        http = http_client(self)
        return await http.post(worker.url + path, data=json.dumps(document).encode(), **kwargs)

    async def test_both_signature_shapes_reach_the_backend(self):
        """An envelope signed url-only or five-field is served; the backend gets the payload
        alone as JSON, never the auth."""
        worker, backend = await self.worker()
        for shape in ("url", "five-field"):
            envelope = {"auth_data": worker.auth(shape), "payload": {"prompt": "hi"}}
            response = await self.post(worker, "/v1/chat?stream=0", envelope)
            self.assertEqual(response.code, 200)
            answer = await response.json()
            self.assertEqual(answer["uri"], "/v1/chat?stream=0")
        seen = backend.seen[-1]
        self.assertEqual(json.loads(seen.body), {"prompt": "hi"})
        self.assertEqual(seen.headers[b"content-type"], [b"application/json"])

    async def test_bad_or_missing_signature_is_401(self):
        """A tampered or absent signature is 401 with a JSON error; nothing reaches the
        backend and no load figure moves (a forged cost must not move rej_load)."""
        worker, backend = await self.worker()
        forged = {**worker.auth(), "cost": 1e6}  # signature no longer matches (five-field)
        forged["url"] = "http://198.51.100.1:1"
        response = await self.post(worker, "/x", {"auth_data": forged, "payload": {}})
        self.assertEqual(response.code, 401)
        self.assertEqual((await response.json())["error"], "invalid signature")
        response = await http_client(self).get(worker.url + "/models")
        self.assertEqual(response.code, 401)
        self.assertEqual((await response.json())["error"], "signature required")
        self.assertEqual(backend.seen, [])
        await worker.service.reporter.send_now()
        last = worker.autoscaler.statuses[-1]
        self.assertEqual((last["rej_load"], last["num_requests_recieved"]), (0, 0))
        self.assertEqual(worker.autoscaler.deletes, [])

    async def test_malformed_requests(self):
        """422 for a body that is not JSON, a scalar, or an envelope missing fields (listed);
        400 for bad query auth; 422 for a negative cost or one beyond any float."""
        worker, backend = await self.worker()
        http = http_client(self)
        response = await http.post(worker.url + "/x", data=b"\x00binary")
        self.assertEqual(response.code, 422)
        response = await self.post(worker, "/x", 42)
        self.assertEqual(response.code, 422)
        response = await self.post(worker, "/x", {"payload": {}})
        self.assertEqual((response.code, (await response.json())["missing"]), (422, ["auth_data"]))
        auth = worker.auth()
        del auth["request_idx"]
        response = await self.post(worker, "/x", {"auth_data": auth, "payload": {}})
        body = await response.json()
        self.assertEqual((response.code, body["missing"]), (422, ["request_idx"]))
        bad_cost = query(worker.auth()).replace("serverless_cost=10.0", "serverless_cost=ten")
        response = await http.get(worker.url + "/x?" + bad_cost)
        self.assertEqual(response.code, 400)
        for cost in (-5.0, 10**400):
            bad = {"auth_data": worker.auth("five-field", cost=cost), "payload": {}}
            response = await self.post(worker, "/x", bad)
            error = (await response.json())["error"]
            self.assertEqual((response.code, error), (422, "invalid cost"))
        self.assertEqual(backend.seen, [])

    async def test_query_auth_for_get_with_repeated_params(self):
        """GET with serverless_* parameters: verified, removed; the other parameters, repeated
        ones too, reach the backend unchanged and in order."""
        worker, backend = await self.worker()
        uri = "/v1/models?a=1&" + query(worker.auth("five-field", cost=256)) + "&a=2&b=x%2By"
        response = await http_client(self).get(worker.url + uri)
        self.assertEqual(response.code, 200)
        self.assertEqual(backend.seen[-1].uri, b"/v1/models?a=1&a=2&b=x%2By")
        self.assertEqual(backend.seen[-1].method, b"GET")

    async def test_header_auth_binary_upload_byte_for_byte(self):
        """X-Serverless-Auth: a binary upload reaches the backend byte for byte, with its own
        Content-Type and without the auth header."""
        worker, backend = await self.worker()
        upload = bytes(range(256)) * 4000  # ~1 MB: spooled and streamed by the relay
        response = await http_client(self).post(
            worker.url + "/upload",
            data=upload,
            headers={
                b"Content-Type": [b"image/png"],
                b"X-Serverless-Auth": [json.dumps(worker.auth()).encode()],
            },
        )
        self.assertEqual(response.code, 200)
        answer = await response.json()
        self.assertEqual(answer["body_sha256"], hashlib.sha256(upload).hexdigest())
        seen = backend.seen[-1]
        self.assertEqual(seen.headers[b"content-type"], [b"image/png"])
        self.assertNotIn(b"x-serverless-auth", seen.headers)

    async def test_blocked_paths_403_whatever_the_spelling(self):
        """BLOCKED_PATHS matches the normalised, percent-decoded path."""
        worker, backend = await self.worker(blocked_paths=("/admin*",))
        auth = json.dumps(worker.auth()).encode()
        for path in (b"/admin", b"//admin/x", b"/a/../admin", b"/%61dmin", b"/x%2F..%2Fadmin"):
            raw = b"GET %s HTTP/1.1\r\nHost: w\r\nX-Serverless-Auth: %s\r\n" % (path, auth)
            answer = await raw_request(worker.url, raw + b"Connection: close\r\n\r\n")
            self.assertTrue(answer.startswith(b"HTTP/1.1 403"), (path, answer[:40]))
        self.assertEqual(backend.seen, [])

    async def test_no_key_yet_is_503(self):
        """While the public key cannot be fetched, signed requests get 503 + Retry-After."""
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(self, listen(self, backend), serve_key=False)
        envelope = {"auth_data": worker.auth(), "payload": {}}
        response = await self.post(worker, "/x", envelope)
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"5"])
        self.assertEqual(backend.seen, [])

    async def test_key_rotation(self):
        """A signature that fails with an old key makes the worker fetch the key again."""
        worker, _ = await self.worker()
        worker.key = generate_private_key()
        worker.autoscaler.pubkey = public_pem(worker.key)
        keys = worker.service.getServiceNamed("pubkey")
        keys._refresh_after = 0.0  # the key in use counts as old
        response = await self.post(worker, "/x", {"auth_data": worker.auth(), "payload": {}})
        self.assertEqual(response.code, 200)
        self.assertEqual(worker.autoscaler.pubkey_requests, 2)
        forged = {**worker.auth(), "signature": worker.auth(reqnum=9)["signature"][::-1]}
        response = await self.post(worker, "/x", {"auth_data": forged, "payload": {}})
        self.assertEqual(response.code, 401)  # fetched again, still not signed: refused
        self.assertEqual(worker.autoscaler.pubkey_requests, 3)

    async def test_hardening(self):
        """VERIFY_URL refuses a signature for another worker's URL; REPLAY_WINDOW refuses the
        same (reqnum, signature) twice."""
        worker, backend = await self.worker(verify_url=True, replay_window=10)
        other = {"auth_data": worker.auth(url="http://198.51.100.1:2"), "payload": {}}
        response = await self.post(worker, "/x", other)
        self.assertEqual((response.code, (await response.json())["error"]), (401, "wrong worker"))
        envelope = {"auth_data": worker.auth(reqnum=7), "payload": {}}
        self.assertEqual((await self.post(worker, "/x", envelope)).code, 200)
        response = await self.post(worker, "/x", envelope)
        self.assertEqual(
            (response.code, (await response.json())["error"]), (401, "replayed request")
        )
        self.assertEqual(len(backend.seen), 1)

    async def test_reports_add_up(self):
        """One at a time (ALLOW_PARALLEL=false): a held request, a queued one whose client
        leaves (never reaches the backend), a 429 with the estimate, a served one and a
        backend 500. The reports add up to exactly the workload served, rejected and
        cancelled, and every request_idx is deleted with its success flag."""
        worker, backend = await self.worker(allow_parallel=False, max_wait_time=5.0)
        worker.service.state.max_perf = 1.0
        metrics = worker.service.metrics
        http = http_client(self)
        held = Deferred.fromCoroutine(
            self.post(
                worker,
                "/slow?delay=0.5",
                {"auth_data": worker.auth(cost=2.0, request_idx=1), "payload": {}},
            )
        )
        await until(lambda: len(backend.seen) == 1)
        body = json.dumps({"auth_data": worker.auth(cost=30.0, request_idx=2), "payload": {}})
        raw = b"POST /queued HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body.encode(),
        )
        queued = await raw_connect(worker.url, RawClient(raw))
        await until(lambda: len(metrics.in_flight) == 2)
        response = await self.post(
            worker, "/x", {"auth_data": worker.auth(cost=40.0, request_idx=3), "payload": {}}
        )
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"27"])
        self.assertEqual((await response.json())["estimated_wait"], 32.0)
        queued.transport.loseConnection()
        await queued.closed
        await until(lambda: len(metrics.in_flight) == 1)
        self.assertEqual((await held).code, 200)
        ok = {"auth_data": worker.auth(cost=10.0, request_idx=4), "payload": {}}
        self.assertEqual((await self.post(worker, "/ok", ok)).code, 200)
        broken = {"auth_data": worker.auth(cost=20.0, request_idx=5), "payload": {}}
        self.assertEqual((await self.post(worker, "/status/500", broken)).code, 500)
        await http.get(worker.url + "/unsigned")  # 401: counts nowhere
        await until(lambda: not metrics.in_flight)
        await worker.service.reporter.send_now()
        statuses = worker.autoscaler.statuses
        self.assertEqual(sum(s["cur_perf"] for s in statuses), 2 + 10)
        self.assertEqual(sum(s["rej_load"] for s in statuses), 40)
        self.assertEqual(sum(s["new_load"] for s in statuses), 2 + 10 + 20)
        self.assertEqual(statuses[-1]["cur_load"], 0)
        self.assertEqual(statuses[-1]["num_requests_recieved"], 5)
        self.assertEqual(statuses[-1]["url"], worker.public_url)
        self.assertEqual(statuses[-1]["mtoken"], "mtok-secret-value")
        self.assertEqual(
            worker.autoscaler.deleted(), {1: True, 2: True, 3: False, 4: True, 5: False}
        )
        self.assertEqual(
            [s.uri for s in backend.seen], [b"/slow?delay=0.5", b"/ok", b"/status/500"]
        )


class DrainReportTests(TestCase):
    async def test_drain_reports_before_exit(self):
        """Stopping the worker reports what the beat has not sent yet (here the beat is
        60 s): the served workload and the request_idx for /delete_requests/."""
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(self, listen(self, backend), report_interval=60.0)
        await until(lambda: len(worker.autoscaler.statuses) == 1)  # the report at start
        envelope = {"auth_data": worker.auth(cost=3.0, request_idx=42), "payload": {}}
        response = await http_client(self).post(
            worker.url + "/x", data=json.dumps(envelope).encode()
        )
        self.assertEqual(response.code, 200)
        await response.content()
        await worker.service.stopService()
        self.assertEqual(sum(s["cur_perf"] for s in worker.autoscaler.statuses), 3.0)
        self.assertEqual(worker.autoscaler.deleted(), {42: True})


class BlockedPathTests(SynchronousTestCase):
    def test_path_forms(self):
        """Raw, decoded and normalised forms of a path are all checked."""
        self.assertIn("/admin", path_forms(b"/x/%2e%2e/admin?q=1"))
        self.assertIn("/admin/x", path_forms(b"//admin//x"))
        self.assertIn("/admin", path_forms(b"/%2561dmin"))

    def test_blocked(self):
        """Patterns are fnmatch, case-sensitive; no patterns blocks nothing."""
        self.assertEqual(blocked(b"/debug/x", ("/admin*", "/debug/*")), "/debug/*")
        self.assertIsNone(blocked(b"/Admin", ("/admin*",)))
        self.assertIsNone(blocked(b"/admin", ()))


class AdminGaugeTests(TestCase):
    async def test_serverless_gauges(self):
        """/metrics shows the workload in flight, the queue, the wait estimate and the
        request ids waiting for /delete_requests/."""
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(
            self,
            listen(self, backend),
            admin_listen="tcp:0:interface=127.0.0.1",
            allow_parallel=False,
            report_interval=60.0,
        )
        admin = listen(self, worker.service.getServiceNamed("admin").listening.factory)
        http = http_client(self)
        envelope = {"auth_data": worker.auth(cost=50.0, request_idx=5), "payload": {}}
        held = http.post(worker.url + "/slow?delay=0.3", data=json.dumps(envelope).encode())
        await until(lambda: len(backend.seen) == 1)
        queued = http.post(worker.url + "/x", data=json.dumps(envelope).encode())
        await until(lambda: len(worker.service.metrics.in_flight) == 2)
        metrics = samples((await (await http.get(admin + "/metrics")).content()).decode())
        self.assertEqual(metrics[("vespa_workload_in_flight", ())], 100.0)
        self.assertEqual(metrics[("vespa_requests_queued", ())], 1)
        self.assertEqual(metrics[("vespa_estimated_wait_seconds", ())], 1.0)  # 100 / max_perf 100
        await (await held).content()
        await (await queued).content()
        metrics = samples((await (await http.get(admin + "/metrics")).content()).decode())
        self.assertEqual(metrics[("vespa_workload_in_flight", ())], 0.0)
        self.assertEqual(metrics[("vespa_pending_deletes", ())], 2)


class UnsecuredTests(TestCase):
    async def test_envelope_unwrapped_rest_passes(self):
        """UNSECURED: an envelope is unwrapped without a signature check; any other body
        and query string pass through untouched; nothing reports without REPORT_ADDR."""
        backend = FakeBackend(reactor)
        url, service = start_worker(self, listen(self, backend))
        self.assertIsNone(service.reporter)
        http = http_client(self)
        envelope = {"auth_data": {**AUTH, "signature": "bogus"}, "payload": {"p": 1}}
        response = await http.post(url + "/a", data=json.dumps(envelope).encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(backend.seen[-1].body), {"p": 1})
        response = await http.post(url + "/b?serverless_cost=1", data=b'{"p": 2}')
        self.assertEqual(response.code, 200)
        self.assertEqual(backend.seen[-1].body, b'{"p": 2}')
        self.assertEqual(backend.seen[-1].uri, b"/b?serverless_cost=1")


class StartupTests(SynchronousTestCase):
    def test_secured_without_report_addr_stops(self):
        """A secured worker without REPORT_ADDR refuses to start with one clear line."""
        with self.assertRaises(SettingsError) as caught:
            check_protocol(Settings())
        self.assertIn("set REPORT_ADDR, or UNSECURED=true", str(caught.exception))
        self.assertRaises(SettingsError, build_worker, Settings(), reactor)
        check_protocol(Settings(unsecured=True))

    def test_verify_url_needs_the_public_url(self):
        """VERIFY_URL without PUBLIC_IPADDR/VAST_TCP_PORT_<port> is a settings error."""
        vast = VastEnvironment(report_addrs=("http://a",))
        with self.assertRaises(SettingsError) as caught:
            check_protocol(Settings(verify_url=True, vast=vast))
        self.assertIn("VAST_TCP_PORT_3000", str(caught.exception))


class TwistdTests(TestCase):
    timeout = 60

    async def test_vast_environment_end_to_end(self):
        """`twistd vespa` with the Vast variables: fetches the key from REPORT_ADDR (the
        second of two), loads, accepts only signed requests, and reports its URL, id and
        max_perf."""
        key = generate_private_key()
        autoscaler = FakeAutoscaler(public_pem(key))
        backend = FakeBackend(reactor)
        cache = os.path.abspath(self.mktemp())
        with open(cache, "w") as f:
            f.write("1000.0\n")  # a cached benchmark result: no benchmark run needed
        env = {
            "BENCHMARK_CACHE_FILE": cache,
            "UNSECURED": "false",
            "REPORT_ADDR": "http://127.0.0.1:9," + listen(self, autoscaler),
            "MASTER_TOKEN": "mtok-0123456789",
            "CONTAINER_ID": "4242",
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
        response = await http.post(
            url + "/x", data=json.dumps({"auth_data": auth, "payload": {}}).encode()
        )
        self.assertEqual(response.code, 200)
        response = await http.post(url + "/x", data=b'{"payload": {}}')
        self.assertEqual(response.code, 422)
        self.assertEqual([seen.uri for seen in backend.seen if seen.uri != b"/health"], [b"/x"])
        await until(lambda: autoscaler.deleted() == {AUTH["request_idx"]: True})
        status = autoscaler.statuses[-1]
        self.assertEqual((status["id"], status["url"]), (4242, "http://203.0.113.7:43000"))
        self.assertEqual(status["max_perf"], 1000.0)
        await process.wait_for(rb"reporting to the autoscaler at .* \(mtoken mtok\.\.\.\)")
        self.assertNotIn(b"0123456789", process.output)  # the token is never logged
