"""The official vastai SDK serverless client (`tox -e vastai`, in the default run) against the
emulator and a real Vespa worker in signed mode reporting to it: the SDK lists endpoints, polls
/route/ through a cold start, and completes a request that the worker verified with the
emulator's public key; and a session (endpoint.session()) created, used and ended on that
worker."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from tests.emulator_fixtures import ACCOUNT_KEY, start_emulator
from tests.fakes import Watched
from tests.helpers import HERE, ProcessWatcher, listen, spawn
from vast_vespa import sandbox
from vast_vespa.sample_backend import SampleBackend
from vast_vespa.worker.lifecycle import BenchmarkCache
from vast_vespa.worker.tap import build_worker


def signed_worker(test: TestCase, shape: str, backend_url: str, emulator_url: str) -> str:
    """A worker exactly as the sandbox runs it (signed mode, only ``shape`` accepted, reports
    to the emulator, fetches its public key from it) with a cached benchmark result of 100,
    so it goes through its real start-up without benchmarking; returns its URL."""
    config = sandbox.SandboxConfig(shape=shape, state_dir=os.path.abspath(test.mktemp()))
    os.makedirs(config.state_dir)
    BenchmarkCache(sandbox.benchmark_cache(config, 1)).write(100.0)
    port = sandbox._port(0)  # a free loopback port, as the sandbox picks them
    settings = sandbox.worker_settings(config, 1, port, backend_url, emulator_url)
    service = build_worker(settings, reactor)
    service.startService()
    test.addCleanup(service.stopService)
    assert settings.vast.public_url is not None
    return settings.vast.public_url


def sdk_client(test: TestCase, emulator_url: str, *mode: str) -> ProcessWatcher:
    """tests/vastai_client.py (the official SDK) calling ``my-endpoint`` at the emulator."""
    command = [sys.executable, os.path.join(HERE, "vastai_client.py"), emulator_url]
    return spawn(test, [*command, ACCOUNT_KEY, "my-endpoint", *mode])


class KeyWatch(Resource):
    """``inner``, recording the target and Authorization of each non-probe request."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render(self, request: Request) -> bytes | int:
        if request.path != b"/health":
            self.seen.append((request.uri, request.getHeader(b"authorization")))
        answer: bytes | int = self.inner.render(request)
        return answer


class VastaiClientTests(TestCase):
    timeout = 60
    if importlib.util.find_spec("vastai") is None:
        skip = "the vastai SDK is not installed (pip install vastai, or tox -e vastai)"

    async def sdk_request(self, shape: str) -> None:
        emulator_url, emulator = start_emulator(self, shape)
        watched = emulator.site.resource = Watched(emulator.site.resource, reactor)
        backend = KeyWatch(SampleBackend(reactor, tokens_per_second=2000))
        backend_url = listen(self, backend)
        watcher = sdk_client(self, emulator_url)
        registry = emulator.registry
        await watched.when(lambda: len(registry.recent) > 0)  # the SDK is polling
        self.assertEqual(registry.status()["requests"][0]["state"], "waiting")
        worker_url = signed_worker(self, shape, backend_url, emulator_url)
        match = await watcher.wait_for(rb"RESULT (.*)\n", timeout=40)
        result = json.loads(match.group(1))
        self.assertEqual((result["ok"], result["status"], result["url"]), (True, 200, worker_url))
        self.assertEqual(result["response"]["usage"]["completion_tokens"], 16)  # the default
        self.assertEqual(result["workers"], [[1, "ready", 100.0]])
        # The worker verified the signature (it accepts nothing else) and told the emulator
        # the request succeeded, through its own /delete_requests/.
        await watched.when(lambda: registry.status()["requests"][0]["state"] == "success")
        # The SDK sent the endpoint key as ?api_key= and as a Bearer: neither reached the
        # backend.
        self.assertEqual(backend.seen, [(b"/v1/chat/completions", None)])

    async def test_sdk_url_shape(self) -> None:
        """The SDK finds the endpoint with the account key, waits while no worker is ready,
        then gets a route signed in the url shape to a worker in signed mode, which verifies
        it and answers the chat request; the SDK lists the endpoint's worker as ready."""
        await self.sdk_request("url")

    async def test_sdk_five_field_shape(self) -> None:
        """The same with the older five-field signed message."""
        await self.sdk_request("five-field")


class VastaiSessionTests(TestCase):
    timeout = 60
    if importlib.util.find_spec("vastai") is None:
        skip = "the vastai SDK is not installed (pip install vastai, or tox -e vastai)"

    async def test_sdk_session(self) -> None:
        """endpoint.session() through the emulator and a signed worker: the worker creates
        the session (nothing reaches the backend), serves a request in it, says it is open,
        ends it, and answers 410 for a request after the end; the emulator hears of the
        session's request_idx as a success."""
        emulator_url, emulator = start_emulator(self, "url")
        watched = emulator.site.resource = Watched(emulator.site.resource, reactor)
        backend = SampleBackend(reactor, tokens_per_second=2000)
        backend_url = listen(self, backend)
        worker_url = signed_worker(self, "url", backend_url, emulator_url)
        registry = emulator.registry
        await watched.when(lambda: [w["state"] for w in registry.status()["workers"]] == ["ready"])
        watcher = sdk_client(self, emulator_url, "session")
        match = await watcher.wait_for(rb"SESSION (.*)\n", timeout=40)
        result = json.loads(match.group(1))
        self.assertEqual(result["request"], {"ok": True, "status": 200, "url": worker_url})
        self.assertEqual(result["completion_tokens"], 16)
        self.assertTrue(result["is_open"])
        self.assertFalse(result["open_after_close"])
        self.assertEqual(result["after_close"]["status"], 410)
        self.assertEqual(result["after_close"]["response"]["error"], "invalid session")
        # The one routed request is the session; the worker reported it done.
        await watched.when(lambda: registry.status()["requests"][0]["state"] == "success")
        self.assertEqual(len(registry.status()["requests"]), 1)
