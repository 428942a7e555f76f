"""
A bounded soak: mixed traffic against a worker subprocess (twistd vespa) in front of the test
suite's fake backend, on 127.0.0.1 only, for ``--minutes`` (default 10); then a report of
requests by kind and outcome, the worker's RSS and open descriptors at start and end, and
latency percentiles. Exits non-zero when an invariant fails (an unexpected outcome, growth of
descriptors or memory beyond a small bound, a traceback in the worker's log, or a worker that
no longer answers).

Run: ``tox -e soak`` or ``python perf/soak.py --minutes 3`` (with vespa installed).
Each kind of traffic is one entry in ``KINDS``: a coroutine returning an outcome label, and the
labels that count as correct for it.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil
from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import Agent, HTTPConnectionPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.web.server import Site  # noqa: E402

from tests.fakes import FakeBackend  # noqa: E402
from tests.helpers import (  # noqa: E402
    ProcessWatcher,
    RawClient,
    raw_connect,
    raw_request,
    twistd_command,
)

MAX_CONNECTIONS = 300
UPLOAD = os.urandom(2 * 1024 * 1024)


@dataclass
class Soak:
    url: str
    http: HTTPClient
    latencies: dict[str, list[float]]


async def json_call(s: Soak) -> str:
    response = await s.http.post(s.url + "/v1/echo", json={"prompt": "hi", "n": 1})
    body = await response.json()
    return "wrong body" if response.code == 200 and body["method"] != "POST" else str(response.code)


async def stream(s: Soak) -> str:
    response = await s.http.get(s.url + "/sse?n=20&interval=0.01")
    body = await response.content()
    done = body.endswith(b"data: [DONE]\n\n")
    return "truncated" if response.code == 200 and not done else str(response.code)


async def upload(s: Soak) -> str:
    response = await s.http.post(s.url + "/upload", data=UPLOAD)
    body = await response.json()
    short = body.get("body_length") != len(UPLOAD)
    return "wrong body" if response.code == 200 and short else str(response.code)


async def disconnect(s: Soak) -> str:
    client = await raw_connect(s.url, RawClient(b"GET /slow?delay=5 HTTP/1.1\r\nHost: s\r\n\r\n"))
    await task.deferLater(reactor, random.uniform(0.01, 0.2), lambda: None)
    client.transport.abortConnection()
    await client.closed
    return "left"


async def backend_reset(s: Soak) -> str:
    response = await s.http.get(s.url + "/reset")
    await response.content()
    return str(response.code)


async def backend_break(s: Soak) -> str:
    raw = await raw_request(s.url, b"GET /break HTTP/1.1\r\nHost: s\r\n\r\n")
    if raw.startswith(b"HTTP/1.1 503 "):
        return "503"
    return "truncated" if raw and not raw.endswith(b"0\r\n\r\n") else "clean"


async def malformed(s: Soak) -> str:
    payload = random.choice(
        [
            b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: s\r\nX-A: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: s\r\nX-A: a\r\n b\r\n\r\n",
            b"GET http://evil/ HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
        ]
    )
    raw = await raw_request(s.url, payload)
    return raw.split(b" ", 2)[1].decode() if raw.startswith(b"HTTP/1.1 ") else "no answer"


async def burst(s: Soak) -> str:
    """Open more connections than MAX_CONNECTIONS at once: the excess gets 503 and closes."""
    clients = await gatherResults(
        [
            Deferred.fromCoroutine(raw_connect(s.url, RawClient(b"")))
            for _ in range(MAX_CONNECTIONS + 50)
        ]
    )
    await task.deferLater(reactor, 0.5, lambda: None)
    refused = sum(1 for c in clients if c.received.startswith(b"HTTP/1.1 503"))
    for client in clients:
        client.transport.abortConnection()
    await gatherResults([c.closed for c in clients])
    return "503s seen" if refused >= 50 else f"only {refused} 503s"


Kind = Callable[[Soak], Awaitable[str]]
# During a burst any new connection may be refused: 503 is a correct outcome for every kind.
OVER = "503"
# name: (coroutine, weight, acceptable outcomes)
KINDS: dict[str, tuple[Kind, int, frozenset[str]]] = {
    "json": (json_call, 50, frozenset({"200", OVER})),
    "stream": (stream, 15, frozenset({"200", OVER})),
    "upload": (upload, 5, frozenset({"200", OVER})),
    "disconnect": (disconnect, 10, frozenset({"left"})),
    "backend reset": (backend_reset, 5, frozenset({"502", OVER})),
    "backend break": (backend_break, 5, frozenset({"truncated", OVER})),
    "malformed": (malformed, 10, frozenset({"400", OVER})),
}


def measure(pid: int) -> tuple[float, int]:
    process = psutil.Process(pid)
    return process.memory_info().rss / 2**20, process.num_fds()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def run(minutes: float, concurrency: int) -> int:
    backend = listen_backend()
    workdir = tempfile.mkdtemp(prefix="vespa-soak-")
    port = free_port()
    args = twistd_command(
        "-n",
        "--pidfile=",
        "vespa",
        f"--backend-url={backend}",
        "--unsecured=true",
        "--access-log=false",
        # Twisted's default listen backlog (50) leaves a burst's excess connections half-open
        # in the kernel, never accepted (and so never refused cleanly): see README.
        f"--listen=tcp:{port}:interface=127.0.0.1:backlog=1024",
        f"--max-connections={MAX_CONNECTIONS}",
        "--admin-listen=none",  # loopback-only soak; never collide with a real worker's 9090
        "--max-body-size=8M",
    )
    watcher = ProcessWatcher()
    process = reactor.spawnProcess(watcher, args[0], args, env=dict(os.environ), path=workdir)
    await watcher.wait_for(rb"worker loaded in")
    url = f"http://127.0.0.1:{port}"
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    soak = Soak(url, HTTPClient(Agent(reactor, pool=pool)), collections.defaultdict(list))
    counts: collections.Counter[tuple[str, str]] = collections.Counter()

    names = list(KINDS)
    weights = [KINDS[n][1] for n in names]

    async def one(name: str) -> None:
        started = time.monotonic()
        try:
            outcome = await KINDS[name][0](soak) if name in KINDS else await burst(soak)
        except Exception as e:  # a client-side failure is an outcome to report, not a crash
            outcome = f"client error: {type(e).__name__}"
        soak.latencies[name].append(time.monotonic() - started)
        counts[(name, outcome)] += 1

    # Warm up, then take the baseline.
    for _ in range(200):
        await one("json")
    rss0, fds0 = measure(process.pid)
    samples = [(0.0, rss0, fds0)]
    deadline = time.monotonic() + minutes * 60
    begin = time.monotonic()

    async def loop() -> None:
        while time.monotonic() < deadline:
            await one(random.choices(names, weights)[0])

    async def bursts() -> None:
        while time.monotonic() < deadline:
            await task.deferLater(reactor, 30, lambda: None)
            if time.monotonic() < deadline:
                await one("burst")
            rss, fds = measure(process.pid)
            samples.append((time.monotonic() - begin, rss, fds))

    await gatherResults(
        [Deferred.fromCoroutine(loop()) for _ in range(concurrency)]
        + [Deferred.fromCoroutine(bursts())]
    )
    await pool.closeCachedConnections()
    # Let the worker see every close and drop its idle backend connections (kept 4 s).
    await task.deferLater(reactor, 6, lambda: None)
    rss1, fds1 = measure(process.pid)
    samples.append((time.monotonic() - begin, rss1, fds1))
    after = await one_more(soak)
    process.signalProcess("TERM")
    await watcher.ended
    tracebacks = watcher.output.count(b"Traceback")

    print(f"\nsoak: {minutes:g} min, {concurrency} concurrent clients, worker on {url}")
    print(f"{'kind':16} {'outcome':22} {'count':>8}")
    failures = []
    for (name, outcome), count in sorted(counts.items()):
        good = outcome in KINDS[name][2] if name in KINDS else outcome == "503s seen"
        print(f"{name:16} {outcome:22} {count:8d}{'' if good else '  <-- unexpected'}")
        if not good:
            failures.append(f"{count} x {name}: {outcome}")
    total = sum(counts.values())
    print(f"total requests: {total} ({total / (minutes * 60):.0f}/s)")
    for name in ("json", "stream", "upload"):
        values = soak.latencies[name]
        print(
            f"latency {name:7}: p50 {percentile(values, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(values, 0.99) * 1000:.1f} ms ({len(values)} requests)"
        )
    print("worker RSS / fds over time:")
    for at, rss, fds in samples:
        print(f"  t={at:6.0f}s rss={rss:7.1f} MiB fds={fds}")
    print(
        f"RSS: {rss0:.1f} -> {rss1:.1f} MiB; fds: {fds0} -> {fds1}; tracebacks in log: {tracebacks}"
    )
    if fds1 - fds0 > 10:
        failures.append(f"descriptors grew from {fds0} to {fds1}")
    if rss1 - rss0 > 64:
        failures.append(f"RSS grew by {rss1 - rss0:.1f} MiB")
    if tracebacks:
        failures.append(f"{tracebacks} tracebacks in the worker log ({workdir})")
    if after != "200":
        failures.append(f"worker did not answer after the soak: {after}")
    print("\nPASS" if not failures else "\nFAIL:\n  " + "\n  ".join(failures))
    with open(os.path.join(workdir, "worker.log"), "wb") as log:
        log.write(watcher.output)
    return 1 if failures else 0


async def one_more(soak: Soak) -> str:
    try:
        return await json_call(soak)
    except Exception as e:
        return type(e).__name__


def listen_backend() -> str:
    port = reactor.listenTCP(0, Site(FakeBackend(reactor)), interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}"


def free_port() -> int:
    port = reactor.listenTCP(0, Site(FakeBackend(reactor)), interface="127.0.0.1")
    number = port.getHost().port
    port.stopListening()
    return number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    options = parser.parse_args()

    async def go(_: object) -> None:
        code = await run(options.minutes, options.concurrency)
        if code:
            raise SystemExit(code)

    task.react(lambda r: Deferred.fromCoroutine(go(r)))


if __name__ == "__main__":
    main()
