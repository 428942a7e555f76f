"""The emulator over real sockets: its API, its status page, its options and its twistd plugin."""

from __future__ import annotations

import json
import os
from typing import Any, cast

import treq
from cryptography.hazmat.primitives import serialization
from twisted.application.service import IServiceMaker, ServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from tests.emulator_fixtures import ACCOUNT_KEY, ENDPOINT_KEY, PRIVATE, report, start_emulator
from tests.helpers import http_client, spawn, twistd_command
from vast_vespa import signing
from vast_vespa.emulator import tap

BEARER = {"Authorization": f"Bearer {ENDPOINT_KEY}"}


class ApiTests(TestCase):
    def setUp(self) -> None:
        self.url, self.service = start_emulator(self)
        self.http = http_client(self)

    async def post(
        self, path: str, body: object, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        sent = Headers({name: [value] for name, value in (headers or {}).items()})
        response = await self.http.post(self.url + path, json=body, headers=sent)
        return response.code, json.loads(await treq.content(response))

    async def test_pubkey(self) -> None:
        """GET /pubkey/ serves the PEM public key that verifies the route replies."""
        response = await self.http.get(self.url + "/pubkey/")
        self.assertEqual(response.code, 200)
        pem = await treq.content(response)
        self.assertEqual(pem, signing.public_pem(PRIVATE))

    async def test_report_then_signed_route(self) -> None:
        """A conforming report gets 200; /route/ then answers a signed reply naming it."""
        self.assertEqual(await self.post("/worker_status/", report()), (200, {"ok": True}))
        code, reply = await self.post("/route/", {"endpoint": "my-endpoint", "cost": 10}, BEARER)
        self.assertEqual(code, 200)
        self.assertEqual(reply["url"], "http://203.0.113.7:43000")
        self.assertEqual(signing.verify(PRIVATE.public_key(), reply, ("url",)), "url")

    async def test_route_key_in_query_or_body(self) -> None:
        """The official client's api_key query parameter or body field is accepted as the key."""
        await self.post("/worker_status/", report())
        code, _ = await self.post(f"/route/?api_key={ENDPOINT_KEY}", {"endpoint": "my-endpoint"})
        self.assertEqual(code, 200)
        code, _ = await self.post("/route/", {"endpoint": "my-endpoint", "api_key": ENDPOINT_KEY})
        self.assertEqual(code, 200)

    async def test_waiting_form(self) -> None:
        """With no worker the reply has no url, a request_idx to replay, and a breakdown."""
        code, reply = await self.post("/route/", {"endpoint": "my-endpoint"}, BEARER)
        self.assertEqual(code, 200)
        self.assertNotIn("url", reply)
        self.assertEqual(reply["request_idx"], 1)
        self.assertEqual(reply["status"]["ready"], 0)

    async def test_route_401(self) -> None:
        """A wrong key is a 401 with a JSON error."""
        code, reply = await self.post(
            "/route/", {"endpoint": "my-endpoint"}, {"Authorization": "Bearer wrong"}
        )
        self.assertEqual(code, 401)
        self.assertEqual(reply["error"], "invalid endpoint API key")

    async def test_malformed_report_400_lists_problems(self) -> None:
        """A broken report gets a 400 naming every problem; it shows on the status page."""
        code, reply = await self.post("/worker_status/", report(cur_perf="fast", url=""))
        self.assertEqual(code, 400)
        self.assertEqual(
            reply["problems"],
            [
                'cur_perf: expected a number >= 0, got a string ("fast")',
                "url: expected the worker's public URL, http[s]://host:port with no path, "
                'got a string ("")',
            ],
        )
        self.assertTrue(reply["detail"].startswith("2 problem(s): cur_perf"))
        page = await treq.content(await self.http.get(self.url + "/"))
        self.assertIn(b"cur_perf: expected a number", page)

    async def test_not_json_is_400(self) -> None:
        """A body that is not JSON is a 400 saying so."""
        response = await self.http.post(self.url + "/delete_requests/", data=b"{oops")
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(await treq.content(response))["error"], "invalid JSON")

    async def test_deep_json_is_400_on_every_python(self) -> None:
        """JSON nested deeper than the worker accepts is the same 400 on every interpreter
        (3.13's parser would go on where 3.10's raises RecursionError)."""
        for depth in (600, 100_000):
            body = b"[" * depth + b"]" * depth
            response = await self.http.post(self.url + "/delete_requests/", data=body)
            self.assertEqual(response.code, 400)
            reply = json.loads(await treq.content(response))
            self.assertEqual(reply["error"], "invalid JSON")
            self.assertIn("levels deep", reply["detail"])

    async def test_delete_requests_both_forms(self) -> None:
        """Both /delete_requests/ forms are accepted; a broken one is a precise 400."""
        await self.post("/worker_status/", report())
        _, reply = await self.post("/route/", {"endpoint": "my-endpoint"}, BEARER)
        body = {
            "worker_id": 4242,
            "mtoken": "mtok-abcdefghijk",
            "request_idxs": [reply["request_idx"]],
            "success": True,
        }
        self.assertEqual((await self.post("/delete_requests/", body))[0], 200)
        item = {
            "request_idx": 99,
            "success": False,
            "status": "Rejected",
            "entered_queue_at": 1.0,
            "work_started_at": 0.0,
            "work_completed_at": 0.0,
        }
        listed = {"worker_id": 4242, "mtoken": "mtok-abcdefghijk", "requests": [item]}
        self.assertEqual((await self.post("/delete_requests/", listed))[0], 200)
        code, refused = await self.post("/delete_requests/", {"worker_id": "x"})
        self.assertEqual(code, 400)
        self.assertIn(
            'worker_id: expected an integer >= 0, got a string ("x")', refused["problems"]
        )

    async def test_endpoint_listing(self) -> None:
        """The account key lists endpoints with their keys; a wrong key is 401."""
        response = await self.http.get(
            self.url + "/api/v0/endptjobs/?autoscaler_instance=prod",
            headers=Headers({"Authorization": [f"Bearer {ACCOUNT_KEY}"]}),
        )
        listing = json.loads(await treq.content(response))
        self.assertEqual(listing["success"], True)
        self.assertEqual(listing["results"][0]["api_key"], ENDPOINT_KEY)
        self.assertEqual(listing["results"][0]["endpoint_name"], "my-endpoint")
        one = await self.http.get(
            self.url + f"/api/v0/endptjobs/7/?api_key={ACCOUNT_KEY}",
        )
        self.assertEqual(json.loads(await treq.content(one))["result"]["id"], 7)
        wrong = await self.http.get(
            self.url + "/api/v0/endptjobs/", headers=Headers({"Authorization": ["Bearer nope"]})
        )
        self.assertEqual(wrong.code, 401)
        await treq.content(wrong)
        endless = await self.http.get(
            self.url + f"/api/v0/endptjobs/{'9' * 5000}/?api_key={ACCOUNT_KEY}",
        )
        self.assertEqual(endless.code, 404)  # no such job, and not an int() of 5000 digits
        await treq.content(endless)

    async def test_get_endpoint_workers(self) -> None:
        """/get_endpoint_workers/ lists the endpoint's workers for the account key; refusals
        are 200 with error_msg, as the SDK expects."""
        await self.post("/worker_status/", report())
        code, workers = await self.post("/get_endpoint_workers/", {"id": 7, "api_key": ACCOUNT_KEY})
        self.assertEqual((code, workers[0]["id"], workers[0]["status"]), (200, 4242, "ready"))
        code, error = await self.post("/get_endpoint_workers/", {"id": 7, "api_key": "x"})
        self.assertEqual((code, error), (200, {"error_msg": "api_key: expected the account key"}))
        code, error = await self.post("/get_endpoint_workers/", {"id": 8, "api_key": ACCOUNT_KEY})
        self.assertEqual((code, error), (200, {"error_msg": "id: no endpoint with id 8"}))

    async def test_status_json_and_page(self) -> None:
        """/status and / show the endpoint, the worker with its state, and recent requests."""
        await self.post("/worker_status/", report(cur_load=50, max_perf=100))
        await self.post("/route/", {"endpoint": "my-endpoint", "cost": 5}, BEARER)
        status = json.loads(await treq.content(await self.http.get(self.url + "/status")))
        self.assertEqual(status["workers"][0]["state"], "ready")
        self.assertEqual(status["requests"][0]["state"], "routed")
        response = await self.http.get(self.url + "/")
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"]
        )
        page = (await treq.content(response)).decode()
        for text in (
            "my-endpoint",
            "http://203.0.113.7:43000",
            "ready",
            "never a production router",
        ):
            self.assertIn(text, page)
        self.assertNotIn("<script", page)

    async def test_wrong_method_and_path(self) -> None:
        """A wrong method is 405 and an unknown path 404, both JSON."""
        response = await self.http.get(self.url + "/route/")
        self.assertEqual(response.code, 405)
        await treq.content(response)
        response = await self.http.get(self.url + "/nope")
        self.assertEqual(response.code, 404)
        await treq.content(response)


class OptionsTests(SynchronousTestCase):
    def test_flags(self) -> None:
        """Flags set endpoints (repeatable), account key, shape and listeners."""
        options = tap.Options()
        options.parseOptions(
            [
                "--endpoint", "a=ka",
                "--endpoint", "b=kb=mt",
                "--account-key", "acct",
                "--shape", "five-field",
                "--listen", "tcp:1",
            ]
        )  # fmt: skip
        config = options.config
        self.assertEqual(
            config.endpoints, (tap.Endpoint("a", "ka", 1), tap.Endpoint("b", "kb", 2, "mt"))
        )
        self.assertEqual(
            (config.account_key, config.shape, config.listen), ("acct", "five-field", ("tcp:1",))
        )

    def test_defaults(self) -> None:
        """Without flags: one endpoint with a documented local key, url shape, loopback 8080."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options.config.listen, ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(options.config.endpoints, (tap.DEFAULT_ENDPOINT,))
        self.assertEqual(options.config.shape, "url")

    def test_config_file_and_flag_precedence(self) -> None:
        """The JSON config file sets values; flags win over it."""
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(
                {
                    "endpoints": {"x": "kx"},
                    "shape": "five-field",
                    "account_key": "a",
                    "stale_after": 5,
                },
                f,
            )
        options = tap.Options()
        options.parseOptions(["--config", path, "--shape", "url"])
        self.assertEqual(options.config.endpoints, (tap.Endpoint("x", "kx", 1),))
        self.assertEqual((options.config.shape, options.config.stale_after), ("url", 5.0))

    def config_file(self, text: str) -> str:
        path: str = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_bad_values_exit_with_one_line(self) -> None:
        """A bad shape, endpoint or config file stops with one clear line."""
        endless_id = '{"endpoints": [{"name": "x", "api_key": "k", "id": Infinity}]}'
        for args, text in (
            (["--shape", "four"], "invalid shape 'four'"),
            (["--endpoint", "nokey"], "expected NAME=KEY"),
            (["--config", self.config_file('{"colour": 1}')], "unknown keys ['colour']"),
            (["--config", self.config_file(endless_id)], "endpoints[0]: expected {name, api_key"),
            (["--config", self.config_file('{"listen": [8080]}')], "such as tcp:3000"),
            (["--stale-after", "-1"], "expected a finite number > 0"),
        ):
            with self.assertRaises(SystemExit) as caught:
                tap.Options().parseOptions(args)
            self.assertIn(text, str(caught.exception.code))

    def test_key_made_once_in_state_dir(self) -> None:
        """The signing key is generated on first start, kept private, and reused."""
        state = self.mktemp()
        config = tap.EmulatorConfig(state_dir=state)
        first = tap.load_key(config)
        path = os.path.join(state, tap.KEY_FILE_NAME)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(signing.public_pem(tap.load_key(config)), signing.public_pem(first))

    def test_key_file(self) -> None:
        """--key loads the given PEM; an unreadable one is a clear error."""
        config = tap.EmulatorConfig(
            key_file=os.path.join(os.path.dirname(__file__), "vectors", "test_private_key.pem")
        )
        self.assertEqual(signing.public_pem(tap.load_key(config)), signing.public_pem(PRIVATE))
        with self.assertRaises(tap.ConfigError):
            tap.load_key(tap.EmulatorConfig(key_file=self.mktemp()))
        encrypted = PRIVATE.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        path = self.config_file(encrypted.decode("ascii"))
        with self.assertRaises(tap.ConfigError) as caught:
            tap.load_key(tap.EmulatorConfig(key_file=path))
        self.assertIn("encrypted", str(caught.exception))

    def test_plugin_listed(self) -> None:
        """twistd finds vespa-autoscaler, and its help says it is not a production router."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        maker = cast(ServiceMaker, makers["vespa-autoscaler"])
        self.assertEqual(maker.module, "vast_vespa.emulator.tap")
        self.assertIn("never a production router", str(tap.Options()))


class TwistdTests(TestCase):
    timeout = 60

    async def test_twistd_serves_pubkey(self) -> None:
        """`twistd -n vespa-autoscaler` from the installed package serves its key and
        announces that it is a development tool."""
        watcher = spawn(
            self,
            twistd_command(
                "-n", "--pidfile=", "vespa-autoscaler", "--listen", "tcp:0:interface=127.0.0.1"
            ),
        )
        match = await watcher.wait_for(rb"autoscaler emulator starting on (\d+)")
        await watcher.wait_for(rb"never a production router")
        http = http_client(self)
        response = await http.get(f"http://127.0.0.1:{int(match.group(1))}/pubkey/")
        self.assertIn(b"BEGIN PUBLIC KEY", await treq.content(response))
