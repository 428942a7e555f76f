"""The access log: one line per request, batched into few log events, never lost on stop."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from vespa.logs import FLUSH_INTERVAL, MAX_BATCH, AccessLog
from vespa.relay import Outcome, RelayResult


def finished(path: bytes, status: int = 200) -> tuple[Any, RelayResult]:
    request = SimpleNamespace(method=b"POST", path=path)
    result = RelayResult(Outcome.SERVED, status, 312, started=1.0, finished=1.0042)
    return request, result


class AccessLogTests(TestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "vespa.access":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.clock = Clock()
        self.log = AccessLog(self.clock)

    def test_requests_in_one_interval_make_one_event(self) -> None:
        """Requests finished close together are logged together, one line each, in order."""
        for path in (b"/v1/a", b"/v1/b", b"/v1/c"):
            self.log(*finished(path), None)
        self.assertEqual(self.events, [])
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(self.events), 1)
        self.assertEqual(
            self.events[0]["lines"].split("\n"),
            [f"POST /v1/{x} 200 served 312B 4.2ms" for x in "abc"],
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_full_batch_is_logged_at_once(self) -> None:
        """Under heavy load lines do not pile up: a full batch goes out without waiting."""
        for _ in range(MAX_BATCH):
            self.log(*finished(b"/x"), None)
        self.assertEqual(len(self.events), 1)
        self.assertEqual(self.events[0]["count"], MAX_BATCH)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopping_flushes(self) -> None:
        """Lines still waiting when the worker stops are logged, and no timer is left behind."""
        self.log.startService()
        self.log(*finished(b"/last", 502), None)
        self.log.stopService()
        self.assertEqual(self.events[0]["lines"], "POST /last 502 served 312B 4.2ms")
        self.assertEqual(self.clock.getDelayedCalls(), [])
