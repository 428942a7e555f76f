"""
Two builds of the worker under the S3 load at the same time: CPU per SSE stream (B ÷ A) and
time to first byte (p50, B - A).

    python perf/side_by_side.py A_TREE B_TREE [--rounds 8] [--seconds 6] [--streams 100]

Each tree is a checkout (``git worktree add /tmp/base main``). Both workers run in front of
one backend (perf/backend.py) and get the same load in parallel (perf/sse_load.py, a JSON
prompt POSTed on a new connection per stream, 20 events 50 ms apart), the start order
alternating by round. CPU per stream comes from ``/proc/<pid>/schedstat``. Because both are
measured in the same seconds, the machine's drift cancels: two copies of one build give
about 1.00 per round. This is how most changes in docs/performance.md were judged.
``--prelude-b CODE`` runs Python
code in worker B before twistd starts (a monkeypatch, to measure an idea before writing it);
``--python-b PATH`` runs worker B on another interpreter (with Vespa's dependencies).

Run it on an interpreter that has Vespa's dependencies but not Vespa: where a build is
installed, its twistd plugin is the last one found, and both workers would run it (two
checkouts measured as the installed build, 1.00 whatever they hold). It refuses to.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from procs import Children, wait_healthy

HERE = Path(__file__).resolve().parent
SSE_PATH = "/sse/20/50"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def worker_argv(python: str, tree: str, port: int, backend: int, prelude: str = "") -> list[str]:
    code = (
        f"import sys; sys.path.insert(0, {tree!r}); {prelude}\n"
        "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    )
    return [
        python,
        "-c",
        code,
        "-n",
        "--pidfile=",
        "vespa",
        "--unsecured",
        "true",
        "--backend-url",
        f"http://127.0.0.1:{backend}",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1:backlog=1024",
    ]


def cpu_seconds(pid: int) -> float:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def load(port: int, seconds: float, streams: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / "sse_load.py"),
            "stream",
            "--port",
            str(port),
            "--path",
            SSE_PATH,
            "--conc",
            str(streams),
            "--duration",
            str(seconds),
            "--stagger",
            "0.95",
        ],
        stdout=subprocess.PIPE,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("a_tree")
    parser.add_argument("b_tree")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--streams", type=int, default=100, help="per worker")
    parser.add_argument("--prelude-b", default="", help="Python run in worker B first")
    parser.add_argument("--python-b", default=sys.executable, help="worker B's interpreter")
    args = parser.parse_args()
    for installed in ("vast_vespa", "vespa"):
        if importlib.util.find_spec(installed) is not None:
            raise SystemExit(
                f"side_by_side: {installed} is installed for {sys.executable}: its twistd plugin "
                "would run in place of the checkouts' (use a virtualenv without Vespa)"
            )
    logs = Path(tempfile.mkdtemp(prefix="vespa-side-by-side-"))
    children = Children(logs)
    try:
        backend = free_port()
        children.start("backend", [sys.executable, str(HERE / "backend.py"), str(backend)])
        ports = {"A": free_port(), "B": free_port()}
        env = {"ADMIN_LISTEN": "none"}
        pids = {
            "A": children.start(
                "a", worker_argv(sys.executable, args.a_tree, ports["A"], backend), env
            ).pid,
            "B": children.start(
                "b",
                worker_argv(args.python_b, args.b_tree, ports["B"], backend, args.prelude_b),
                env,
            ).pid,
        }
        for name, port in ports.items():
            wait_healthy(port, f"worker {name}", logs)
        ratios: list[float] = []
        per_stream: dict[str, list[float]] = {"A": [], "B": []}
        ttfb_gaps: list[float] = []
        for round_ in range(args.rounds):
            order = ("A", "B") if round_ % 2 == 0 else ("B", "A")
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            loads = {name: load(ports[name], args.seconds, args.streams) for name in order}
            results = {name: json.loads(proc.communicate()[0]) for name, proc in loads.items()}
            cost = {
                name: (cpu_seconds(pids[name]) - before[name]) / results[name]["streams"] * 1e6
                for name in pids
            }
            for name in pids:
                per_stream[name].append(cost[name])
            ratios.append(cost["B"] / cost["A"])
            ttfb_gaps.append(results["B"]["ttfb_p50_ms"] - results["A"]["ttfb_p50_ms"])
            print(
                f"round {round_}: A {cost['A']:.0f} µs/stream "
                f"(TTFB {results['A']['ttfb_p50_ms']:.2f} ms), B {cost['B']:.0f} µs/stream "
                f"(TTFB {results['B']['ttfb_p50_ms']:.2f} ms), B/A {ratios[-1]:.3f}",
                flush=True,
            )
        print(
            f"median B/A {statistics.median(ratios):.3f}: "
            f"A {statistics.median(per_stream['A']):.0f} µs, "
            f"B {statistics.median(per_stream['B']):.0f} µs per stream; "
            f"TTFB p50 B - A {statistics.median(ttfb_gaps):+.3f} ms (logs: {logs})"
        )
    finally:
        children.stop_all()


if __name__ == "__main__":
    main()
