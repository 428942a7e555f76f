"""
A client that leaves: before the backend answered, mid-stream, or mid-upload. The backend
call is cancelled (the backend sees the disconnect), the request ends CANCELLED exactly once
(or never reaches the backend at all), no timer is left behind, and the next request works.
A client that leaves with the whole answer but the backend's end of the body (a chunked
body's last chunk) was served, if that end comes within END_GRACE. In memory
(tests/memory.py); tests/test_relay.py has the same through real sockets.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.memory import MemoryWorker
from vast_vespa.outcome import Outcome
from vast_vespa.relay import END_GRACE


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
        """A client that leaves mid-stream: the backend's next event shows the answer was not
        over, and the stream stops then (not END_GRACE later), the outcome cancelled with the
        bytes relayed so far, the stall timer gone. A body of known length stops at once:
        its end is its last byte, which the client never had."""
        client = self.worker.request("GET", "/sse?n=100&interval=0.05")
        self.worker.advance(0.05)
        self.assertIn(b"data: event 1", client.received)
        client.leave()
        self.worker.flush()
        self.assertEqual(self.worker.results, [])  # its end might still come
        self.worker.advance(0.05)
        self.successResultOf(self.worker.backend.cancelled[0])
        [result] = self.worker.results
        self.assertEqual(result.outcome, Outcome.CANCELLED)
        self.assertGreater(result.bytes_out, 0)
        self.assert_no_timers()

        known = self.worker.request("GET", "/sse?n=100&interval=0.05&length=1")
        known.leave()
        self.worker.flush()
        self.successResultOf(self.worker.backend.cancelled[-1])
        self.assertEqual(self.worker.results[-1].outcome, Outcome.CANCELLED)
        self.assert_no_timers()
        self.assert_serves_next()

    def leave_at_done(self, end: str) -> None:
        """A stream whose body ends ``end`` after its last event, and a client that leaves
        as soon as it has read that event (as the OpenAI SDK does at ``data: [DONE]``)."""
        client = self.worker.request("GET", f"/sse?n=2&end={end}")
        self.assertTrue(client.received.endswith(b"data: [DONE]\n\n\r\n"), client.received)
        client.leave()
        self.worker.flush()

    def test_leaving_just_before_the_end_of_the_body_is_served(self) -> None:
        """The backend's end of the body comes after the client left, within END_GRACE: the
        backend call is left to end, and the request was served, every byte relayed."""
        self.leave_at_done(str(END_GRACE / 2))
        self.assertEqual(self.worker.results, [])
        self.worker.advance(END_GRACE / 2)
        [result] = self.worker.results
        self.assertEqual(result.outcome, Outcome.SERVED)
        self.assertEqual(
            result.bytes_out, len(b"data: event 0\n\ndata: event 1\n\ndata: [DONE]\n\n")
        )
        self.assertNoResult(self.worker.backend.cancelled[0])  # never cut
        self.assert_no_timers()
        self.assert_serves_next()

    def test_an_end_that_does_not_come_within_the_grace_is_cancelled(self) -> None:
        """No end of the body within END_GRACE after the client left: the backend call is
        cut then, the request cancelled."""
        self.leave_at_done("60")
        self.worker.advance(END_GRACE - 0.01)
        self.assertEqual(self.worker.results, [])
        self.assertNoResult(self.worker.backend.cancelled[0])
        self.worker.advance(0.01)
        self.successResultOf(self.worker.backend.cancelled[0])
        self.assertEqual([r.outcome for r in self.worker.results], [Outcome.CANCELLED])
        self.assert_no_timers()
        self.assert_serves_next()

    def test_body_and_its_end_in_one_read_after_the_client_left(self) -> None:
        """The client left mid-stream; the rest of the body and its end then come in one read:
        the client never had that rest, so the request is cancelled, not served."""
        client = self.worker.request("GET", "/sse?n=3&interval=0.1")
        self.worker.advance(0.1)
        self.assertIn(b"data: event 1", client.received)
        self.assertNotIn(b"event 2", client.received)
        client.leave()
        self.worker.flush()
        self.worker.advance(0.1)  # event 2, [DONE] and the last chunk, together
        [result] = self.worker.results
        self.assertEqual(result.outcome, Outcome.CANCELLED)
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
