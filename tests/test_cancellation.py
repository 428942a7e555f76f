"""
A client that leaves: before the backend answered, mid-stream, or mid-upload. The backend
call is cancelled (the backend sees the disconnect), the request ends CANCELLED exactly once
(or never reaches the backend at all), no timer is left behind, and the next request works.
In memory (tests/memory.py); tests/test_relay.py has the same through real sockets.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.memory import MemoryWorker
from vast_vespa.outcome import Outcome


class CancellationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.worker = MemoryWorker(self, signed=False, first_byte_timeout=30.0, stall_timeout=30.0)

    def assert_serves_next(self) -> None:
        self.assertEqual(self.worker.get("/next").code, 200)

    def assert_no_timers(self) -> None:
        """Nothing left on the clock: neither the worker's timers nor the backend's."""
        self.assertEqual(self.worker.clock.getDelayedCalls(), [])

    def test_leaving_before_headers_cancels_the_backend_call(self) -> None:
        """A client that leaves while the backend thinks: the backend sees the disconnect,
        the outcome is cancelled (once), the first-byte timer is gone."""
        client = self.worker.request("GET", "/slow?delay=60")
        self.assertEqual(len(self.worker.backend.cancelled), 1)
        client.leave()
        self.worker.flush()
        self.successResultOf(self.worker.backend.cancelled[0])
        self.assertEqual([r.outcome for r in self.worker.results], [Outcome.CANCELLED])
        self.assert_no_timers()
        self.assert_serves_next()

    def test_leaving_mid_stream_stops_the_stream(self) -> None:
        """A client that leaves mid-stream: the backend stream stops, the outcome is cancelled
        with the bytes relayed so far, the stall timer is gone."""
        client = self.worker.request("GET", "/sse?n=100&interval=0.05")
        self.worker.advance(0.05)
        self.assertIn(b"data: event 1", client.received)
        client.leave()
        self.worker.flush()
        self.successResultOf(self.worker.backend.cancelled[0])
        [result] = self.worker.results
        self.assertEqual(result.outcome, Outcome.CANCELLED)
        self.assertGreater(result.bytes_out, 0)
        self.assert_no_timers()
        self.assert_serves_next()

    def test_leaving_mid_upload_never_reaches_the_backend(self) -> None:
        """A client that leaves before its body is complete: nothing reaches the backend and
        no outcome is recorded (the request never started)."""
        client = self.worker.connect()
        client.send(b"POST /upload HTTP/1.1\r\nHost: w\r\nContent-Length: 100000\r\n\r\n")
        client.send(b"x" * 5000)
        client.leave()
        self.assert_serves_next()
        self.assertEqual([s.uri for s in self.worker.backend.seen], [b"/next"])
        self.assertEqual([r.outcome for r in self.worker.results], [Outcome.SERVED])
