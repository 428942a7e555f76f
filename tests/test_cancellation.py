"""
A client that leaves: before the backend answered, mid-stream, or mid-upload. The backend
call is cancelled (the backend sees the disconnect), the request ends CANCELLED exactly once
(or never reaches the backend at all), no timer is left behind, and the next request works.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.fakes import FakeBackend
from tests.helpers import RawClient, http_client, listen, observed_worker, raw_connect, until
from vast_vespa.outcome import Outcome


class CancellationTests(TestCase):
    def setUp(self):
        self.backend = FakeBackend(reactor)
        self.url, self.results = observed_worker(
            self, listen(self, self.backend), first_byte_timeout=30.0, stall_timeout=30.0
        )

    async def leave(self, payload: bytes, after_bytes: int = 0) -> None:
        client = await raw_connect(self.url, RawClient(payload))
        if after_bytes:
            await until(lambda: client.count >= after_bytes)
        else:
            await until(lambda: self.backend.cancelled)
        client.transport.abortConnection()
        await client.closed

    async def assert_serves_next(self) -> None:
        response = await http_client(self).get(self.url + "/next")
        self.assertEqual(response.code, 200)
        await response.content()

    def assert_no_worker_timers(self) -> None:
        pending = [
            call for call in reactor.getDelayedCalls() if "ProxiedRequest" in repr(call.func)
        ]
        self.assertEqual(pending, [])

    async def test_leaving_before_headers_cancels_the_backend_call(self):
        """A client that leaves while the backend thinks: the backend sees the disconnect,
        the outcome is cancelled (once), the first-byte timer is gone."""
        await self.leave(b"GET /slow?delay=60 HTTP/1.1\r\nHost: w\r\n\r\n")
        await self.backend.cancelled[0]
        await until(lambda: self.results)
        self.assertEqual([r.outcome for r in self.results], [Outcome.CANCELLED])
        self.assert_no_worker_timers()
        await self.assert_serves_next()

    async def test_leaving_mid_stream_stops_the_stream(self):
        """A client that leaves mid-stream: the backend stream stops, the outcome is cancelled
        with the bytes relayed so far, the stall timer is gone."""
        await self.leave(
            b"GET /sse?n=100&interval=0.05 HTTP/1.1\r\nHost: w\r\n\r\n", after_bytes=40
        )
        await self.backend.cancelled[0]
        await until(lambda: self.results)
        [result] = self.results
        self.assertEqual(result.outcome, Outcome.CANCELLED)
        self.assertGreater(result.bytes_out, 0)
        self.assert_no_worker_timers()
        await self.assert_serves_next()

    async def test_leaving_mid_upload_never_reaches_the_backend(self):
        """A client that leaves before its body is complete: nothing reaches the backend and
        no outcome is recorded (the request never started)."""
        client = await raw_connect(
            self.url,
            RawClient(
                b"POST /upload HTTP/1.1\r\nHost: w\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000
            ),
        )
        client.transport.abortConnection()
        await client.closed
        await self.assert_serves_next()
        self.assertEqual([s.uri for s in self.backend.seen], [b"/next"])
        self.assertEqual([r.outcome for r in self.results], [Outcome.SERVED])
