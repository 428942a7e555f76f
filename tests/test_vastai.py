"""The official vastai SDK serverless client (optional: `tox -e vastai`) against the emulator
and a Vespa worker: it lists endpoints, polls /route/ through a cold start, and completes a
request."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.emulator_fixtures import ACCOUNT_KEY, report, start_emulator
from tests.helpers import HERE, http_client, listen, spawn, start_worker, until
from vespa.sample_backend import SampleBackend


class VastaiClientTests(TestCase):
    timeout = 60
    if importlib.util.find_spec("vastai") is None:
        skip = "the vastai SDK is not installed (pip install vastai, or tox -e vastai)"

    async def test_sdk_routes_and_completes(self):
        """The SDK finds the endpoint with the account key, waits while no worker is ready,
        then gets a signed route to the worker and a completed chat answer; it lists the
        endpoint's workers."""
        emulator_url, emulator = start_emulator(self)
        backend_url = listen(self, SampleBackend(reactor, tokens_per_second=2000))
        worker_url, _ = start_worker(self, backend_url)
        watcher = spawn(
            self,
            [
                sys.executable,
                os.path.join(HERE, "vastai_client.py"),
                emulator_url,
                ACCOUNT_KEY,
                "my-endpoint",
            ],
        )
        registry = emulator.registry
        await until(lambda: len(registry.recent) > 0, timeout=30)  # the SDK is polling
        response = await http_client(self).post(
            emulator_url + "/worker_status/", json=report(id=1, url=worker_url, max_perf=100.0)
        )
        self.assertEqual(response.code, 200, await treq.content(response))
        match = await watcher.wait_for(rb"RESULT (.*)\n", timeout=40)
        result = json.loads(match.group(1))
        self.assertEqual((result["ok"], result["status"], result["url"]), (True, 200, worker_url))
        self.assertEqual(result["response"]["usage"]["completion_tokens"], 16)  # the default
        self.assertEqual(registry.status()["requests"][0]["state"], "routed")
        self.assertEqual(result["workers"], [[1, "ready", 100.0]])
