"""The sandbox: everything in one process, then requests through client -> emulator -> worker
-> sample backend with real signatures."""

from __future__ import annotations

import json
import socket
from typing import Any, cast

import treq
from twisted.application.service import IServiceMaker, ServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.emulator_fixtures import report
from tests.fakes import Watched
from tests.helpers import http_client
from vast_vespa import sandbox
from vast_vespa.sandbox import SandboxConfig, build_sandbox

CHAT = {"model": "vespa-sample", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def config(test: TestCase, **changes: Any) -> SandboxConfig:
    """A fast sandbox on free ports with its state in the test's directory."""
    values = dict(
        client_port=0,
        autoscaler_port=0,
        backend_port=0,
        worker_port=0,
        tokens_per_second=2000,
        max_tokens=16,
        stale_after=2,
        state_dir=test.mktemp(),
    )
    values.update(changes)
    return SandboxConfig(**values)


def start(test: TestCase, **changes: Any) -> sandbox.SandboxService:
    """A started sandbox on free ports. The sandbox picks its ports before it listens (a
    worker's signed URL must be known first), so another process may take one in between:
    then what did start is stopped and the sandbox is built again on new ports."""
    for attempt in range(3):
        service = build_sandbox(config(test, **changes), reactor)
        test.addCleanup(service.stopService)
        try:
            service.startService()
        except CannotListenError:
            if attempt == 2:
                raise
            continue
        return service
    raise AssertionError("unreachable")


class WiringTests(SynchronousTestCase):
    def test_worker_settings(self) -> None:
        """Each worker is signed-mode, benchmarks the backend, reports to the emulator under
        its own loopback URL and container id; its settings go through the same parsing as
        twistd's (the port comes from the listen string, the public URL from the Vast
        variables)."""
        settings = sandbox.worker_settings(
            SandboxConfig(state_dir="/s"), 2, 3002, "http://127.0.0.1:8001", "http://127.0.0.1:8080"
        )
        self.assertFalse(settings.unsecured)
        self.assertEqual(settings.signature_shapes, ("url",))
        self.assertEqual(settings.listen, ("tcp:3002:interface=127.0.0.1",))
        self.assertEqual(settings.benchmark_spec, "vast_vespa.benchmarks.openai:benchmark")
        self.assertEqual(settings.benchmark_cache, "/s/worker-2.has_benchmark")
        self.assertEqual(settings.vast.report_addrs, ("http://127.0.0.1:8080",))
        self.assertEqual(settings.vast.public_url, "http://127.0.0.1:3002")
        self.assertEqual(settings.vast.container_id, 2)
        self.assertEqual((settings.worker_port, settings.admin_listen), (3002, ""))
        self.assertIsNone(settings.systemd.notify_socket)  # never systemd's, even under it

    def test_instructions(self) -> None:
        """The start-up text names every piece and gives curl lines with and without
        streaming and the status page."""
        urls = {
            "backend": "http://127.0.0.1:8001",
            "autoscaler": "http://127.0.0.1:8080",
            "workers": ["http://127.0.0.1:3001", "http://127.0.0.1:3002"],
            "client": "http://127.0.0.1:8010",
        }
        text = sandbox.instructions(SandboxConfig(), urls)
        self.assertIn("curl http://127.0.0.1:8010/v1/chat/completions", text)
        self.assertIn("curl -N http://127.0.0.1:8010/v1/chat/completions", text)
        self.assertIn('"stream": true}', text)
        self.assertIn("status page http://127.0.0.1:8080/", text)
        self.assertIn("http://127.0.0.1:3001, http://127.0.0.1:3002", text)

    def test_options(self) -> None:
        """Flags set the sandbox; bad ones stop with one line naming the flag."""
        options = sandbox.Options()
        options.parseOptions(["--workers", "3", "--shape", "five-field", "--client-port", "9000"])
        self.assertEqual(
            (options.config.workers, options.config.shape, options.config.client_port),
            (3, "five-field", 9000),
        )
        for args in (["--workers", "0"], ["--shape", "nope"], ["--tokens-per-second", "fast"]):
            with self.assertRaises(SystemExit) as caught:
                sandbox.Options().parseOptions(args)
            self.assertIn(f"invalid {args[0]}", str(caught.exception.code))

    def test_plugin_listed(self) -> None:
        """twistd finds vespa-sandbox."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertEqual(cast(ServiceMaker, makers["vespa-sandbox"]).module, "vast_vespa.sandbox")


class SandboxTests(TestCase):
    timeout = 30

    async def test_everything_listens(self) -> None:
        """The sandbox brings up the backend, the emulator with its endpoint, and the workers."""
        service = start(self)
        http = http_client(self)
        response = await http.post(service.urls["backend"] + "/v1/chat/completions", json=CHAT)
        self.assertEqual(json.loads(await treq.content(response))["usage"]["completion_tokens"], 5)
        status = json.loads(
            await treq.content(await http.get(service.urls["autoscaler"] + "/status"))
        )
        self.assertEqual([e["name"] for e in status["endpoints"]], ["my-endpoint"])
        for url in service.urls["workers"]:
            response = await http.get(url + "/health")
            await treq.content(response)  # a worker answered (its verdict depends on the mode)
        self.assertEqual(len(service.workers), 2)

    async def test_malformed_report_gets_precise_400(self) -> None:
        """The sandbox's emulator rejects a malformed report with a 400 naming the problem."""
        service = start(self)
        http = http_client(self)
        response = await http.post(
            service.urls["autoscaler"] + "/worker_status/", json=report(max_perf="lots")
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(
            json.loads(await treq.content(response))["problems"],
            ['max_perf: expected a number >= 0, got a string ("lots")'],
        )


class SandboxEndToEndTests(TestCase):
    """client -> emulator -> worker -> sample backend, all real, signatures included."""

    timeout = 120

    async def ready(self, shape: str = "url", workers: int = 2) -> sandbox.SandboxService:
        service = start(self, shape=shape, workers=workers)
        assert service.autoscaler is not None
        registry = service.autoscaler.registry
        site = service.autoscaler.site
        self.emulator = site.resource = Watched(site.resource, reactor)

        def all_ready() -> bool:
            states = [w["state"] for w in registry.status()["workers"]]
            return states.count("ready") == workers

        await self.emulator.when(all_ready)  # reported by the workers
        return service

    async def chat(
        self, service: sandbox.SandboxService, stream: bool = False
    ) -> tuple[int, bytes]:
        http = http_client(self)
        response = await http.post(
            service.urls["client"] + "/v1/chat/completions", json={**CHAT, "stream": stream}
        )
        return response.code, await treq.content(response)

    async def plain_and_streaming(self, shape: str) -> None:
        service = await self.ready(shape)
        code, body = await self.chat(service)
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 5)
        code, body = await self.chat(service, stream=True)
        self.assertEqual(code, 200, body)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"), body)
        assert service.autoscaler is not None
        status = service.autoscaler.registry.status
        # The workers' /delete_requests/ say so.
        await self.emulator.when(
            lambda: [r["state"] for r in status()["requests"]] == ["success"] * 2
        )

    async def test_plain_and_streaming_url_shape(self) -> None:
        """Signed in the url shape (workers accept only that), a plain and a streamed chat
        completion come back through the client; the emulator sees both finish successfully."""
        await self.plain_and_streaming("url")

    async def test_plain_and_streaming_five_field_shape(self) -> None:
        """The same in the five-field shape."""
        await self.plain_and_streaming("five-field")

    async def test_two_workers_share_load(self) -> None:
        """Concurrent requests are spread over both workers."""
        service = await self.ready()
        results = await gatherResults(
            [Deferred.fromCoroutine(self.chat(service)) for _ in range(6)]
        )
        self.assertEqual([code for code, _ in results], [200] * 6)
        assert service.autoscaler is not None
        routed = [w["routed"] for w in service.autoscaler.registry.status()["workers"]]
        self.assertTrue(all(count > 0 for count in routed), routed)

    async def test_stopped_worker_is_routed_around(self) -> None:
        """After one worker stops, every request still succeeds: the client re-routes the same
        request_idx and the emulator avoids the worker it could not reach; once the stopped
        worker's reports stop, it gets no more requests at all."""
        service = await self.ready()
        await service.workers[0].stopService()
        for _ in range(4):
            code, body = await self.chat(service)
            self.assertEqual(code, 200, body)
        assert service.autoscaler is not None
        registry = service.autoscaler.registry
        stopped = registry.workers[1]
        silent_at = stopped.last_report + 2  # stale_after: 2 s without a report
        await deferLater(reactor, max(silent_at - reactor.seconds(), 0.0) + 0.01, lambda: None)
        self.assertNotEqual(stopped.state(reactor.seconds(), 2), "ready")
        code, _ = await self.chat(service)
        self.assertEqual(code, 200)
        self.assertEqual(registry.status()["requests"][0]["worker_id"], 2)


class PortTakenTests(TestCase):
    async def test_taken_port_stops_cleanly(self) -> None:
        """A sandbox whose worker port is taken fails to start with CannotListenError, saying
        which sandbox flag sets that port, and stopping it leaves nothing listening or
        scheduled (trial checks the reactor)."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        for _ in range(3):
            service = build_sandbox(config(self, worker_port=port), reactor)
            with self.assertRaises(CannotListenError) as caught:
                service.startService()
            await service.stopService()
            # Another process may take one of the free ports the sandbox picked before it
            # listens on it (see start()): then it fails on that port first; build again.
            if "(set --worker-port)" in str(caught.exception):
                break
        self.assertEqual(
            str(caught.exception),
            f"vespa-sandbox: cannot listen on tcp:{port}:interface=127.0.0.1: address already "
            "in use (set --worker-port)",
        )
