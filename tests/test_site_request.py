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
        request = VespaRequest(DummyChannel())
        told: list[Failure] = []
        request.when_lost(told.append)
        request.finish()
        self.assertIsNone(request._when_lost)
        request.connectionLost(Failure(ConnectionDone("gone")))
        self.assertEqual(told, [])


def _broken(reason: Failure) -> None:
    raise ValueError("observer bug")
