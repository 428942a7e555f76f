"""
Secrets stay secret: MASTER_TOKEN, signatures and API keys never show up in the worker's logs
or in any error body it sends, whatever goes wrong; the emulator compares secrets in constant
time.
"""

from __future__ import annotations

import json
from typing import cast

from twisted.internet import reactor
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from tests.fakes import FakeBackend
from tests.helpers import http_client, listen, start_signed_worker
from vast_vespa.emulator.registry import same_secret

MASTER_TOKEN = "mtok-secret-value"  # what start_signed_worker sets


class LogSecretTests(TestCase):
    timeout = 30

    async def test_no_secret_in_logs_or_error_bodies(self) -> None:
        """Served, forged, replayed, malformed, and failing-backend
        requests, query-string auth, with the autoscaler answering 500 meanwhile: no log event (formatted or in
        its fields) and no error body contains the master token or any signature sent."""
        events: list[dict] = []
        observer = cast(ILogObserver, events.append)  # any callable taking the event
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(
            self, listen(self, backend), report_interval=0.05, replay_window=10
        )
        worker.autoscaler.codes[b"/worker_status/"] = 500
        http = http_client(self)
        signatures = []
        bodies = []

        async def send(path: str, auth: dict) -> None:
            signatures.append(auth["signature"])
            body = json.dumps({"auth_data": auth, "payload": {"p": 1}}).encode()
            response = await http.post(worker.url + path, data=body)
            bodies.append(await response.content())

        good = worker.auth("five-field", request_idx=1, reqnum=1)
        await send("/ok", good)
        await send("/ok", good)  # replayed
        await send("/status/500", worker.auth("five-field", request_idx=2, reqnum=2))
        await send("/reset", worker.auth("five-field", request_idx=3, reqnum=3))
        forged = worker.auth("five-field", request_idx=4, reqnum=4)
        await send("/ok", {**forged, "cost": 999.0})
        response = await http.get(
            worker.url + "/q?serverless_signature=" + good["signature"][:40] + "&serverless_cost=x"
        )
        bodies.append(await response.content())
        response = await http.post(
            worker.url + "/x",
            data=b"{}",
            headers=Headers({b"x-serverless-auth": [b"not json " + good["signature"].encode()]}),
        )
        bodies.append(await response.content())
        assert worker.service.reporter is not None
        await worker.service.reporter.send_now()
        await worker.service.stopService()
        self.assertTrue(any(b"invalid signature" in body for body in bodies))
        secrets = [MASTER_TOKEN, *{s for s in signatures if s}]
        texts = [formatEvent(event) for event in events] + [repr(event) for event in events]
        texts += [body.decode("utf-8", "replace") for body in bodies]
        self.assertTrue(any("autoscaler report failed" in text for text in texts))
        leaks = [
            (secret[:12], text[:200])
            for secret in secrets
            for text in texts
            if secret in text or secret[:40] in text
        ]
        self.assertEqual(leaks, [])


class ConstantTimeTests(SynchronousTestCase):
    def test_same_secret(self) -> None:
        """Equal secrets match, anything else does not (None only matches None)."""
        self.assertTrue(same_secret("k-123", "k-123"))
        self.assertFalse(same_secret("k-124", "k-123"))
        self.assertFalse(same_secret("k-12", "k-123"))
        self.assertFalse(same_secret(None, "k-123"))
        self.assertFalse(same_secret(42, "42"))
        self.assertTrue(same_secret(None, None))
        self.assertTrue(same_secret("ключ", "ключ"))
