"""perf/request_path.py: both measures still run against the request path as it is (each
checks what the worker sent and answered, and stops with an error if the path changed under
it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf", "request_path.py"
)


class RequestPathTests(SynchronousTestCase):
    def run_script(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, SCRIPT, "--requests", "200", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_the_request_path_up_to_the_backend_call(self) -> None:
        out = self.run_script()
        self.assertRegex(out, r"^request path, warm: mean [\d.]+ µs, p50 [\d.]+ µs")

    def test_the_whole_request(self) -> None:
        """S1's request in, the backend's answer in, the client's answer out: the script
        checks both ends itself (the request line sent, the answer's body relayed)."""
        out = self.run_script("--cycle")
        mean = re.search(r"^whole request, warm: mean ([\d.]+) µs", out)
        self.assertIsNotNone(mean, out)
        assert mean is not None
        self.assertGreater(float(mean.group(1)), 0.0)

    def test_the_whole_request_over_tls(self) -> None:
        """The same over TLS, through the fast path's TLS protocol: the script decrypts the
        answer as the client and checks its body."""
        out = self.run_script("--cycle", "--tls")
        self.assertRegex(out, r"^whole request over TLS, warm: mean [\d.]+ µs")

    def test_the_whole_request_on_a_new_connection(self) -> None:
        """A new connection per request, which asks to close it: the script checks that the
        worker closed it, and both ends of the request."""
        out = self.run_script("--cycle", "--new")
        self.assertRegex(out, r"^whole request on a new connection, warm: mean [\d.]+ µs")

    def test_tls_and_new_go_with_the_cycle(self) -> None:
        for args, error in (
            (["--tls"], "--tls and --new go with --cycle"),
            (["--new"], "--tls and --new go with --cycle"),
            (["--cycle", "--new", "--tls"], "not allowed with argument"),
        ):
            done = subprocess.run(
                [sys.executable, SCRIPT, *args], capture_output=True, text=True, check=False
            )
            self.assertEqual(done.returncode, 2, args)
            self.assertIn(error, done.stderr)
