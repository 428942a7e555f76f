"""VespaRequest.when_lost: a lost connection told without a Deferred per request."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyChannel

from vast_vespa.net.request import LeanRequest
from vast_vespa.site import VespaRequest


class WhenLostTests(SynchronousTestCase):
    def test_told_of_a_lost_connection_in_order(self) -> None:
        """Each callback hears the reason, in the order given; one that raises is logged and
        the next is still told; none is told twice. Both request classes."""
        for cls in (VespaRequest, LeanRequest):
            request = cls(cast(Any, DummyChannel()))
            first: list[Failure] = []
            last: list[Failure] = []
            request.when_lost(first.append)
            request.when_lost(_broken)
            request.when_lost(last.append)
            reason = Failure(ConnectionDone("gone"))
            request.connectionLost(reason)
            self.assertEqual((first, last), ([reason], [reason]))
            self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
            request.connectionLost(reason)  # a second loss tells no one again
            self.assertEqual((first, last), ([reason], [reason]))

    def test_not_told_after_the_answer(self) -> None:
        """A finished answer drops the callbacks: a loss after it tells no one, and the
        request holds no reference to them (no cycle with the relay that gave one)."""
        for cls, started in ((VespaRequest, False), (LeanRequest, False), (LeanRequest, True)):
            # (LeanRequest finishes an answer under way in a step of its own)
            channel = DummyChannel()
            request = cls(cast(Any, channel))
            request.method, request.clientproto = b"GET", b"HTTP/1.1"
            told: list[Failure] = []
            request.when_lost(told.append)
            if started:
                request.write(b"partial")
            request.finish()
            self.assertIsNone(request._when_lost)
            self.assertTrue(request.finished)
            request.connectionLost(Failure(ConnectionDone("gone")))
            self.assertEqual(told, [])
            written = channel.transport.written.getvalue()
            self.assertTrue(
                written.endswith(b"7\r\npartial\r\n0\r\n\r\n" if started else b"0\r\n\r\n"), written
            )


def _broken(reason: Failure) -> None:
    raise ValueError("observer bug")
