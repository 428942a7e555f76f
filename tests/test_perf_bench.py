"""perf/bench.py's extra targets: a --tls-target serves HTTPS in the TLS scenarios with the
certificate nginx and Vespa serve, a --target is left out of them, one name may be both, and
--floor adds the floor relay as both."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
sys.path.insert(0, PERF)
from bench import Bench, Build, add_floor  # noqa: E402  # perf/ holds scripts, not a package

PLAIN = "relay {port} {backend_url}"
TLS = "relay {port} {backend_url} --tls {cert} {key}"


class ExtraTargetTests(SynchronousTestCase):
    def setUp(self) -> None:
        args = argparse.Namespace(
            port_base=29080, target=[("floor", PLAIN)], tls_target=[("floor", TLS)], max_minutes=1
        )
        self.bench = Bench(args, Path(self.mktemp()))
        self.addCleanup(shutil.rmtree, self.bench.work)
        self.bench.builds = [Build("vespa", sys.executable)]
        self.bench.tls_cert, self.bench.tls_key = Path("/certs/c.pem"), Path("/certs/k.pem")

    def test_tls_target_in_tls_scenarios(self) -> None:
        found = self.bench.proxies(tls=True)
        self.assertEqual([t.name for t in found], ["nginx", "vespa", "floor"])
        self.assertTrue(all(t.tls for t in found))
        floor = found[-1]
        self.assertEqual(
            floor.argv, ["bash", "-c", "relay {port} {backend_url} --tls /certs/c.pem /certs/k.pem"]
        )
        self.assertEqual(len({t.port for t in found}), 3)

    def test_plain_target_in_plain_scenarios(self) -> None:
        found = self.bench.proxies(tls=False)
        self.assertEqual([t.name for t in found], ["nginx", "vespa", "floor"])
        self.assertEqual(found[-1].argv, ["bash", "-c", PLAIN])
        self.assertFalse(any(t.tls for t in found))

    def test_one_name_for_both(self) -> None:
        self.assertEqual(self.bench.target_names(), ["direct", "nginx", "vespa", "floor"])


class FloorTests(SynchronousTestCase):
    def test_floor_is_both_targets(self) -> None:
        """--floor: the floor relay as a plain and a TLS target of one name."""
        args = argparse.Namespace(target=[], tls_target=[])
        add_floor(args)
        [(name, plain)] = args.target
        [(tls_name, tls)] = args.tls_target
        self.assertEqual((name, tls_name), ("floor", "floor"))
        self.assertTrue(plain.startswith("exec "))
        self.assertTrue(plain.endswith("floor_relay.py {port} {backend_url}"))
        self.assertEqual(tls, plain + " --tls {cert} {key}")
