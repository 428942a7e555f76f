"""vast_vespa.outcome: how a request ended, as the access line, /metrics and the reports name it."""

from __future__ import annotations

import copy

from twisted.trial.unittest import SynchronousTestCase

from vast_vespa import outcome
from vast_vespa.outcome import OUTCOME_NAMES, Outcome, RelayResult, outcome_of


class OutcomeTests(SynchronousTestCase):
    def test_every_outcome_is_named_by_its_value(self) -> None:
        """The names read per request (OUTCOME_NAMES) are the members' values, for all."""
        self.assertEqual(OUTCOME_NAMES, {outcome: outcome.value for outcome in Outcome})
        self.assertEqual(len(OUTCOME_NAMES), len(Outcome))

    def test_members_are_keys_by_identity(self) -> None:
        """Outcomes hash by identity (Enum's own hash is a Python call per dict lookup):
        each member is still its own key, found again however it was reached."""
        self.assertEqual(hash(Outcome.SERVED), object.__hash__(Outcome.SERVED))
        counts = dict.fromkeys(Outcome, 0)
        for reached in (Outcome("served"), Outcome["SERVED"], copy.deepcopy(Outcome.SERVED)):
            counts[reached] += 1
        self.assertEqual(counts, {**dict.fromkeys(Outcome, 0), Outcome.SERVED: 3})

    def test_a_relayed_5xx_counts_as_errored(self) -> None:
        self.assertIs(outcome_of(RelayResult(Outcome.SERVED, 503)), Outcome.ERRORED)
        self.assertIs(outcome_of(RelayResult(Outcome.SERVED, 404)), Outcome.SERVED)
        self.assertIs(outcome_of(RelayResult(Outcome.CANCELLED, 0)), Outcome.CANCELLED)

    def test_module_names_are_the_members(self) -> None:
        """The members the request path names as module names (a faster read on Python 3.11)
        are the members themselves: it compares outcomes with ``is``."""
        for name in ("SERVED", "ERRORED", "CANCELLED"):
            self.assertIs(getattr(outcome, name), Outcome[name])
