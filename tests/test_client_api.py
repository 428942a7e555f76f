"""VastClient: the proxy inside a Python program, Twisted-native and blocking."""

from __future__ import annotations

import json
import threading
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.error import ReactorNotRestartable
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from tests.test_client_e2e import ClientTestCase
from vast_vespa.client import VastClient


class VastClientTests(ClientTestCase):
    def make_client(self, **options: Any) -> VastClient:
        client = VastClient(
            self.autoscaler.endpoint,
            self.autoscaler.api_key,
            reactor=reactor,
            environ={},
            autoscaler_url=self.autoscaler_url,
            instance="local",
            client_access_log=False,
            **options,
        )
        self.addCleanup(client.stop)
        return client

    async def test_twisted_native(self) -> None:
        """start() gives the proxy's URL; request() in the reactor thread returns a Deferred
        of the answer; the cost goes to /route/."""
        client = self.make_client()
        url = await client.start()
        self.assertTrue(url.startswith("http://127.0.0.1:"))
        response = await client.request("POST", "/v1/chat/completions", json={"a": 1}, cost=64)
        self.assertEqual(response.code, 200)
        answer = json.loads(await treq.content(response))
        self.assertEqual(answer["choices"][0]["message"]["content"], "Hello there")
        self.assertEqual(self.autoscaler.calls[0]["cost"], 64.0)
        await client.stop()
        self.assertEqual(client.url, "")

    async def test_blocking_calls_from_a_thread(self) -> None:
        """From a thread other than the reactor's, post/get block and return a response with
        status, headers, json() and text()."""
        client = self.make_client()
        payload = {"model": "m", "messages": []}
        response = await deferToThread(client.post, "/v1/chat/completions", json=payload)
        self.assertEqual(response.status, 200)
        self.assertTrue(response.ok)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "Hello there")
        response = await deferToThread(client.get, "/v1/models?a=1&a=2")
        self.assertIn('"uri": "/v1/models?a=1&a=2"', response.text())

    async def test_blocking_stream(self) -> None:
        """stream=True returns once the headers are in; the body is iterated as it arrives."""
        client = self.make_client()

        def read() -> list[bytes]:
            response = client.get("/sse?n=3&interval=0.02", stream=True)
            return [line for line in response.iter_lines() if line]

        lines = await deferToThread(read)
        self.assertEqual(
            lines, [b"data: event 0", b"data: event 1", b"data: event 2", b"data: [DONE]"]
        )


class _StoppedReactor:
    """A reactor that ran and stopped: Twisted's cannot run again in the same process."""

    running = False

    def callWhenRunning(self, f: Any) -> None:
        pass

    def run(self, installSignalHandlers: bool = True) -> None:
        raise ReactorNotRestartable()


class StoppedReactorTests(SynchronousTestCase):
    def test_blocking_call_after_the_reactor_stopped_says_so(self) -> None:
        """A blocking call once the reactor has stopped raises at once, naming the cause,
        instead of waiting for ever for a reactor that cannot start."""
        client = VastClient("e", "k", reactor=_StoppedReactor(), environ={})
        raised: list[BaseException] = []

        def call() -> None:
            try:
                client.get("/v1/models")
            except BaseException as e:
                raised.append(e)

        # In a thread, so that a call that waits for ever fails this test instead of hanging it.
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(timeout=10)
        self.assertFalse(caller.is_alive(), "the call still waits for the reactor")
        [error] = raised
        self.assertIsInstance(error, RuntimeError)
        self.assertIn("stopped and cannot run again", str(error))
        self.assertIsInstance(error.__cause__, ReactorNotRestartable)
