# -*- test-case-name: tests.test_net_dispatch -*-
"""
Process-wide settings for a twistd server process (the worker, the client proxy), applied by
:func:`tune_once_running` from each twistd entry point.

The garbage collector: Python runs a young collection every 700 new container objects and now
and then walks every object alive, including the tens of thousands made at start-up (Twisted,
the settings, the imported modules) that live until exit. Once the service is built,
:func:`settle_gc` moves those objects out of the collector's sight (``gc.freeze``, meant for
this) and lets young collections come less often; cycles are still collected, a little later.
"""

from __future__ import annotations

import gc
from typing import Any

YOUNG_THRESHOLD = 10_000  # Python's default is 700


def settle_gc() -> None:
    """Freeze what exists now (start-up objects) and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def tune_once_running(reactor: Any, fast_path: bool = True) -> None:
    """With the fast path, the lean event dispatch (:mod:`vast_vespa.net.dispatch`) now; and
    :func:`settle_gc` once the reactor runs (after twistd has built everything)."""
    if fast_path:
        from vast_vespa.net.dispatch import lean_event_dispatch

        lean_event_dispatch(reactor)
    reactor.callWhenRunning(settle_gc)
