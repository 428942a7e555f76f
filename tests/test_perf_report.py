"""The perf report's TLS verdicts (issue 25: "tox -e perf prints the TLS rows with their ratios
and the targets' verdicts") and its resumed-handshakes column, from a made-up results file."""

from __future__ import annotations

import os
import sys

from twisted.trial.unittest import SynchronousTestCase

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "perf"))
import report  # perf/ holds scripts, not a package


def results(vespa_rps: float, new_rps: float, vespa_ttfb: float) -> dict:
    """Two rounds of each TLS point: nginx TLS and vespa, and S3-TLS with direct."""
    return {
        "targets": ["direct", "nginx", "vespa"],
        "scenarios": {
            "S1-TLS": {
                "c=64 kept alive": {
                    "nginx": [{"rps": 1000.0}] * 2,
                    "vespa": [{"rps": vespa_rps}] * 2,
                }
            },
            "NEW-TLS": {
                "c=16 new conn": {"nginx": [{"rps": 1000.0}] * 2, "vespa": [{"rps": new_rps}] * 2}
            },
            "S3-TLS": {
                "100 streams": {
                    "direct": [{"ttfb_p50_ms": 0.5}] * 2,
                    "vespa": [
                        {"ttfb_p50_ms": vespa_ttfb, "tls_handshakes": 400, "tls_resumed": 300}
                    ]
                    * 2,
                }
            },
        },
    }


class TLSVerdictTests(SynchronousTestCase):
    def verdicts(self, data: dict) -> list[list[str]]:
        lines = report.tls_check(data)
        rows = [line.strip("|").split("|") for line in lines if line.startswith("| vespa")]
        return [[cell.strip() for cell in row] for row in rows]

    def test_targets_met(self) -> None:
        rows = self.verdicts(results(160.0, 400.0, 1.5))
        self.assertEqual(
            [row[2:] for row in rows],
            [
                ["0.160", ">= 0.15", "yes"],
                ["0.400", ">= 0.4", "yes"],
                ["1.00 ms", "<= 1 ms", "yes"],
            ],
        )

    def test_targets_missed(self) -> None:
        rows = self.verdicts(results(149.0, 399.0, 1.51))
        self.assertEqual([row[-1] for row in rows], ["NO", "NO", "NO"])

    def test_resumed_handshakes_column(self) -> None:
        runs = results(1, 1, 1)["scenarios"]["S3-TLS"]["100 streams"]
        self.assertEqual(report.resumed(runs["vespa"]), "600/800")
        self.assertEqual(report.resumed(runs["direct"]), "-")  # plain TCP: nothing to count


class FullHandshakeTableTests(SynchronousTestCase):
    """FULL-TLS (S3's streams, a full handshake each) gets its own table, which names the
    certificate's key: it decides what a full handshake costs."""

    def data(self, tls_key: str | None) -> dict:
        streams = {
            "direct": [{"ttfb_p50_ms": 0.5}],
            "nginx": [{"ttfb_p50_ms": 1.5, "proxy_cpu_pct": 10.0, "tls_handshakes": 800}],
            "vespa": [
                {
                    "streams": 800,
                    "ttfb_p50_ms": 2.0,
                    "ttfb_p99_ms": 4.0,
                    "proxy_cpu_pct": 15.0,
                    "tls_handshakes": 800,
                }
            ],
        }
        args = {} if tls_key is None else {"tls_key": tls_key}
        return {
            "args": args,
            "targets": ["direct", "nginx", "vespa"],
            "scenarios": {"FULL-TLS": {"100 streams": streams}},
        }

    def test_table(self) -> None:
        lines = report.tls_tables(self.data("ec"))
        self.assertIn("## TLS: S3 100 SSE streams over HTTPS, a full handshake each", lines)
        [vespa] = [line for line in lines if line.startswith("| vespa TLS")]
        cells = [cell.strip() for cell in vespa.strip("|").split("|")]
        # streams, errors, TTFB p50 and p99, added over plain direct and over nginx TLS, CPU,
        # CPU ÷ nginx TLS, resumed handshakes
        expected = ["800", "0", "2.00", "4.00", "1.50", "0.50", "15.0", "1.50", "0/800"]
        self.assertEqual(cells[1:], expected)
        self.assertTrue(any("signed with an EC P-256 key" in line for line in lines))
        self.assertFalse(any("a new connection each" in line for line in lines))

    def test_both_keys(self) -> None:
        """--tls-key both: vespa-ec serves the P-256 key in the same rounds."""
        lines = report.tls_tables(self.data("both"))
        caption = "signed with an RSA-2048 key (vespa-ec: an EC P-256 one)"
        self.assertTrue(any(caption in line for line in lines))

    def test_rsa_by_default(self) -> None:
        """Results from before --tls-key were made with the RSA-2048 certificate."""
        lines = report.tls_tables(self.data(None))
        self.assertTrue(any("signed with an RSA-2048 key" in line for line in lines))


class AgainstComparedTests(SynchronousTestCase):
    """With ``--compare``, the report sets this build against each compared build round by
    round: how many rounds it was ahead in, and the median of its ratios (or differences)."""

    def data(self) -> dict:
        return {
            "targets": ["direct", "nginx", "vespa", "vespa@abc1234"],
            "scenarios": {
                "NEW-TLS": {
                    "c=16 new conn": {
                        "nginx": [{"rps": 1000.0, "proxy_cpu_pct": 90.0}] * 3,
                        "vespa": [
                            {"rps": 110.0, "proxy_cpu_pct": 99.0},
                            {"rps": 90.0, "proxy_cpu_pct": 99.0},
                            {"rps": 120.0, "proxy_cpu_pct": 96.0},
                        ],
                        "vespa@abc1234": [{"rps": 100.0, "proxy_cpu_pct": 100.0}] * 3,
                    }
                },
                "S3-TLS": {
                    "100 streams": {
                        "vespa": [
                            {"ttfb_p50_ms": 2.0, "proxy_cpu_pct": 20.0},
                            {"ttfb_p50_ms": 2.3, "proxy_cpu_pct": 22.0},
                        ],
                        "vespa@abc1234": [
                            {"ttfb_p50_ms": 2.2, "proxy_cpu_pct": 21.0},
                            {"ttfb_p50_ms": 2.2, "proxy_cpu_pct": 21.0},
                        ],
                    }
                },
            },
        }

    def rows(self, data: dict) -> list[list[str]]:
        lines = report.against_compared(data)
        rows = [
            line.strip("|").split("|") for line in lines if line.startswith("| ") and "@" in line
        ]
        return [[cell.strip() for cell in row] for row in rows]

    def test_rounds_ahead_and_medians(self) -> None:
        self.assertEqual(
            self.rows(self.data()),
            [
                [
                    "NEW-TLS",
                    "c=16 new conn",
                    "vespa@abc1234",
                    "req/s",
                    "2 of 3",
                    "1.100 (0.900-1.200)",
                ],
                # CPU per request: 0.9, 1.1, 0.8 of the other's
                [
                    "NEW-TLS",
                    "c=16 new conn",
                    "vespa@abc1234",
                    "CPU per request",
                    "2 of 3",
                    "0.900 (0.800-1.100)",
                ],
                [
                    "S3-TLS",
                    "100 streams",
                    "vespa@abc1234",
                    "TTFB p50",
                    "1 of 2",
                    "-0.05 ms (-0.20 to +0.10)",
                ],
                [
                    "S3-TLS",
                    "100 streams",
                    "vespa@abc1234",
                    "proxy CPU",
                    "1 of 2",
                    "1.000 (0.952-1.048)",
                ],
            ],
        )

    def test_nothing_without_a_compared_build(self) -> None:
        data = self.data()
        data["targets"].remove("vespa@abc1234")
        self.assertEqual(report.against_compared(data), [])
        self.assertNotIn("round by round", report.render({**data, "machine": MACHINE, "args": {}}))


MACHINE = {"date": "2026-12-06", "cpus": 2, "python": "3.11", "kernel": "6"}
