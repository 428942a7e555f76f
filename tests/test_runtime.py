"""Process-wide settings of the twistd processes: the garbage collector after start-up."""

from __future__ import annotations

import subprocess
import sys

from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from vespa.runtime import YOUNG_THRESHOLD, settle_gc, settle_gc_once_running


class SettleGCTests(SynchronousTestCase):
    def test_freezes_and_raises_threshold(self) -> None:
        """In a fresh interpreter (not this test process): start-up objects are frozen and
        young collections come less often; collection still works."""
        code = (
            "import gc; from vespa.runtime import settle_gc; settle_gc(); "
            "a = []; a.append(a); del a; "
            "print(gc.get_threshold()[0], gc.get_freeze_count() > 0, gc.collect() >= 1)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(out.stdout.split(), [str(YOUNG_THRESHOLD), "True", "True"], out.stderr)

    def test_once_running(self) -> None:
        """The worker and client ask for it when the reactor starts, after twistd built them."""
        reactor = MemoryReactor()
        settle_gc_once_running(reactor)
        self.assertEqual([hook[0] for hook in reactor.whenRunningHooks], [settle_gc])


class TwistdWiringTests(SynchronousTestCase):
    def test_worker_make_service(self) -> None:
        """twistd's entry point asks for the settled collector once running, and gives twistd
        Vespa's text observer when twistd would log text to stdout."""
        from twisted.internet.testing import MemoryReactorClock

        from vespa import tap

        options = tap.Options()
        options.parseOptions(["--unsecured", "true"])
        options.parent = {"nodaemon": True, "logfile": None}
        reactor = MemoryReactorClock()
        service = tap.makeService(options, reactor)
        self.assertIn(settle_gc, [hook[0] for hook in reactor.whenRunningHooks])
        self.assertIsNotNone(service.text_log)
