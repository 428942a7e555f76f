"""Process control and /proc sampling for the benchmark: every child is ended by its PID."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class Children:
    """Every long-running process the benchmark starts; ``stop_all`` ends them by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            # Not the checkout: "python -c" puts the working directory first on sys.path, and
            # from the repository root every build would import ./vespa (the tree under test).
            cwd=self.logs,
            start_new_session=True,
        )
        log.close()
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.running):
            self.stop(proc)


def unverified() -> ssl.SSLContext:
    """A client context for the benchmark's self-signed certificate (loopback only)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def wait_healthy(
    port: int, what: str, logs: Path, seconds: float = 30.0, tls: bool = False
) -> None:
    """Until ``GET /health`` on 127.0.0.1:``port`` (over TLS with ``tls``) answers 200; exits
    the benchmark if it never does (its log is in ``logs``)."""
    stop = time.monotonic() + seconds
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/health"
    context = unverified() if tls else None
    while time.monotonic() < stop:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:  # noqa: S310 (loopback)
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"perf: {what} on port {port} never became healthy (see {logs})")


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx's workers, for instance)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, ()))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICK


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            continue
    return total * PAGE_KIB / 1024


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Probe:
    """CPU % (100 = one core) and peak RSS of some process trees while a load point runs."""

    def __init__(self, watched: dict[str, int], interval: float = 0.05) -> None:
        self.pids = {name: tree(pid) for name, pid in watched.items()}
        self.interval = interval
        self.peak: dict[str, float] = {}
        self.before: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for name, pids in self.pids.items():
                self.peak[name] = max(self.peak.get(name, 0.0), rss_mib(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> Probe:
        self.before = {name: rss_mib(pids) for name, pids in self.pids.items()}
        self._cpu0 = {name: cpu_seconds(pids) for name, pids in self.pids.items()}
        self._machine0 = machine_busy()
        self._children0 = os.times()
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self._t0
        self.wall = wall
        self.cpu_pct = {
            name: 100 * (cpu_seconds(pids) - self._cpu0[name]) / wall
            for name, pids in self.pids.items()
        }
        busy1, total1 = machine_busy()
        busy0, total0 = self._machine0
        cpus = os.cpu_count() or 1
        self.machine_pct = 100 * (busy1 - busy0) / max(1, total1 - total0) * cpus
        now = os.times()
        loadgen = (now.children_user - self._children0.children_user) + (
            now.children_system - self._children0.children_system
        )
        self.loadgen_pct = 100 * loadgen / wall
        # CPU used on this machine by anything the benchmark does not account for.
        self.other_pct = self.machine_pct - sum(self.cpu_pct.values()) - self.loadgen_pct
