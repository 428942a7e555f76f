"""
A bounded soak: mixed traffic against a worker subprocess (twistd vespa) in front of the test
suite's fake backend, on 127.0.0.1 only, for ``--minutes`` (default 10); then a report of
requests by kind and outcome, the worker's RSS and open descriptors at start and end, and
latency percentiles. Exits non-zero when an invariant fails (an unexpected outcome, growth of
descriptors or memory beyond a small bound, a traceback in the worker's log, or a worker that
no longer answers).

Run: ``tox -e soak`` or ``python perf/soak.py --minutes 3`` (with vespa installed); with
``--tls`` the worker serves HTTPS (an ``ssl:`` listener, as ``USE_SSL`` makes) and every client
speaks TLS. A client-side failure is counted as an outcome and its first traceback of each
kind printed.
Each kind of traffic is one entry in ``KINDS``: a coroutine returning an outcome label, and the
labels that count as correct for it. The hostile mix (issue 23): every 30 s, a flood of idle
keep-alive connections from another address (127.0.0.2) while a legitimate request is made;
throughout, forged auth with
``Expect: 100-continue`` (header and envelope forms), answered 401 before the body, and backend
answers whose head is over the worker's limits (a 1 MiB header, 5,000 headers), answered 502.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import psutil
from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.web.server import Site  # noqa: E402

from tests.certs import self_signed  # noqa: E402
from tests.fakes import FakeAutoscaler, FakeBackend  # noqa: E402
from tests.helpers import (  # noqa: E402
    ProcessWatcher,
    RawClient,
    listen_tcp,
    raw_connect,
    raw_request,
    twistd_command,
)
from vast_vespa.net.server import RECLAIM_AFTER  # noqa: E402
from vast_vespa.signing import generate_private_key, public_pem, sign  # noqa: E402

MAX_CONNECTIONS = 300
PER_ADDRESS = 100  # MAX_CONNECTIONS_PER_ADDRESS: the flood's address is held to it
FLOOD_ADDRESS = "127.0.0.2"
UPLOAD = os.urandom(2 * 1024 * 1024)


@dataclass
class Soak:
    url: str
    http: HTTPClient
    latencies: dict[str, list[float]]
    signer: Signer | None = None
    tls: Any = None  # --tls: client TLS options for raw connections


async def json_call(s: Soak, auth: bytes) -> str:
    response = await s.http.post(
        s.url + "/v1/echo", json={"prompt": "hi", "n": 1}, headers=signed(auth)
    )
    body = await response.json()
    return "wrong body" if response.code == 200 and body["method"] != "POST" else str(response.code)


async def stream(s: Soak, auth: bytes) -> str:
    response = await s.http.get(s.url + "/sse?n=20&interval=0.01", headers=signed(auth))
    body = await response.content()
    done = body.endswith(b"data: [DONE]\n\n")
    return "truncated" if response.code == 200 and not done else str(response.code)


async def upload(s: Soak, auth: bytes) -> str:
    response = await s.http.post(s.url + "/upload", data=UPLOAD, headers=signed(auth))
    body = await response.json()
    short = body.get("body_length") != len(UPLOAD)
    return "wrong body" if response.code == 200 and short else str(response.code)


async def disconnect(s: Soak, auth: bytes) -> str:
    client = await raw_connect(
        s.url,
        RawClient(b"GET /slow?delay=5 HTTP/1.1\r\nHost: s\r\n%s\r\n" % raw_auth(auth)),
        s.tls,
    )
    await task.deferLater(reactor, random.uniform(0.01, 0.2), lambda: None)
    abort(client)
    await client.closed
    answered = client.received.startswith(b"HTTP/1.1 ")  # refused (429, 503) before leaving
    return client.received[9:12].decode() if answered else "left"


async def backend_reset(s: Soak, auth: bytes) -> str:
    response = await s.http.get(s.url + "/reset", headers=signed(auth))
    await response.content()
    return str(response.code)


async def backend_break(s: Soak, auth: bytes) -> str:
    raw = await raw_request(
        s.url, b"GET /break HTTP/1.1\r\nHost: s\r\n%s\r\n" % raw_auth(auth), s.tls
    )
    if raw.startswith((b"HTTP/1.1 503 ", b"HTTP/1.1 429 ")):
        return raw[9:12].decode()
    return "truncated" if raw and not raw.endswith(b"0\r\n\r\n") else "clean"


async def oversize_head(s: Soak, auth: bytes) -> str:
    """A backend answer whose head breaks BACKEND_MAX_HEADER_SIZE or BACKEND_MAX_HEADERS."""
    query = random.choice([b"size=%d" % (1 << 20), b"count=5000"])
    response = await s.http.get(s.url + "/huge-head?" + query.decode(), headers=signed(auth))
    await response.content()
    return str(response.code)


async def malformed(s: Soak, auth: bytes) -> str:
    payload = random.choice(
        [
            b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: s\r\nX-A: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: s\r\nX-A: a\r\n b\r\n\r\n",
            b"GET http://evil/ HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
        ]
    )
    raw = await raw_request(s.url, payload, s.tls)
    return raw.split(b" ", 2)[1].decode() if raw.startswith(b"HTTP/1.1 ") else "no answer"


async def burst(s: Soak) -> str:
    """Open more connections than MAX_CONNECTIONS at once, each with the start of a request
    (the listener hands a connection over once its client has spoken): the excess gets 503
    and closes."""
    clients = await gatherResults(
        [
            Deferred.fromCoroutine(raw_connect(s.url, RawClient(b"GET /burst HTTP/1.1\r\n"), s.tls))
            for _ in range(MAX_CONNECTIONS + 50)
        ]
    )
    await task.deferLater(reactor, 0.5, lambda: None)
    refused = sum(1 for c in clients if c.received.startswith(b"HTTP/1.1 503"))
    for client in clients:
        abort(client)
    await gatherResults([c.closed for c in clients])
    return "503s seen" if refused >= 50 else f"only {refused} 503s"


async def forged(s: Soak, auth: bytes) -> str:
    """A request whose signature does not match (its cost was raised after signing)."""
    tampered = json.loads(auth)
    tampered["cost"] = 1e6
    response = await s.http.post(
        s.url + "/v1/echo", json={"x": 1}, headers=signed(json.dumps(tampered).encode())
    )
    await response.content()
    return str(response.code)


async def over_capacity(s: Soak, auth: bytes) -> str:
    """Many heavy requests at once: the estimated wait passes MAX_WAIT_TIME, so most get 429."""
    assert s.signer is not None
    calls = [
        Deferred.fromCoroutine(slow_heavy(s, s.signer.issue("over capacity", HEAVY)))
        for _ in range(BURST)
    ]
    codes = await gatherResults(calls)
    rejected = codes.count("429")
    return "429s seen" if rejected >= BURST // 2 else f"only {rejected} 429s"


async def slow_heavy(s: Soak, auth: bytes) -> str:
    response = await s.http.get(s.url + "/slow?delay=1", headers=signed(auth))
    await response.content()
    s.signer.outcomes[json.loads(auth)["request_idx"]] = str(response.code)  # type: ignore[union-attr]
    return str(response.code)


async def idle_flood(s: Soak) -> str:
    """PER_ADDRESS keep-alive connections from another address, each answered once (an
    unsigned request: 401) and then idle for RECLAIM_AFTER, then as many again while a signed
    request is made from 127.0.0.1: "served" when that request is (200, or 429 at capacity)
    and the worker closed the first ones, oldest first, to make room for the second ones
    instead of refusing them. (Connections that send nothing at all wait in the kernel, not
    in the worker, for the listener's TCP_DEFER_ACCEPT second, then count the same way.)"""

    async def connect() -> list[RawClient]:
        flood = [RawClient(b"GET /flood HTTP/1.1\r\nHost: s\r\n\r\n") for _ in range(PER_ADDRESS)]
        await gatherResults(
            [
                Deferred.fromCoroutine(raw_connect(s.url, client, s.tls, (FLOOD_ADDRESS, 0)))
                for client in flood
            ]
        )
        await gatherResults([_answered_or_closed(client) for client in flood])
        return flood

    first = await connect()
    await task.deferLater(reactor, RECLAIM_AFTER + 0.5, lambda: None)
    second = await connect()
    auth = s.signer.issue("idle flood") if s.signer is not None else b""
    outcome = await json_call(s, auth)
    if s.signer is not None:
        s.signer.outcomes[json.loads(auth)["request_idx"]] = outcome
    await task.deferLater(reactor, 0.2, lambda: None)  # the worker's closes reach the flood
    reclaimed = sum(1 for client in first if client.closed.called)
    refused = sum(1 for client in second if b" 503 " in client.received)
    for client in first + second:
        abort(client)
    await gatherResults([client.closed for client in first + second])
    if outcome not in ("200", BUSY):
        return f"request got {outcome}"
    if reclaimed < PER_ADDRESS or refused:
        return f"{reclaimed} reclaimed, {refused} refused"
    return "served"


def abort(client: RawClient) -> None:
    """Abort a raw client's connection unless it is closed already (Twisted's TLS protocol
    cannot abort a connection that is gone)."""
    if not client.closed.called:
        cast(ITCPTransport, client.transport).abortConnection()


def _answered_or_closed(client: RawClient) -> Deferred[None]:
    answered = client.when(lambda: b"\r\n\r\n" in client.received)
    answered.addErrback(lambda _: None)  # closed first: reclaimed before its answer
    return answered


def forged_auth(auth: bytes) -> bytes:
    tampered = json.loads(auth)
    tampered["cost"] = 2.0  # the five-field signature no longer matches
    return json.dumps(tampered).encode()


async def forged_expect(s: Soak, auth: bytes) -> str:
    """Forged auth with Expect: 100-continue and an 8 MB body announced: 401 from the head
    (header form) or from the envelope's leading auth_data, without 100 Continue for the
    header form and with the rest of the body never sent."""
    envelope = random.random() < 0.5
    head = b"POST /v1/echo HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n" % (8 << 20)
    head += b"Expect: 100-continue\r\nConnection: close\r\n"
    if envelope:
        start = b'{"auth_data": %s, "payload": {"prompt": "' % forged_auth(auth)
        client = await raw_connect(s.url, RawClient(head + b"\r\n" + start + b"x" * 4096), s.tls)
    else:
        head += raw_auth(forged_auth(auth))
        client = await raw_connect(s.url, RawClient(head + b"\r\n"), s.tls)
    raw = await client.closed
    if raw.startswith(b"HTTP/1.1 100 ") and envelope:
        raw = raw.partition(b"\r\n\r\n")[2]
    if b"100 Continue" in raw:
        return "100 Continue sent"
    return raw[9:12].decode() if raw.startswith(b"HTTP/1.1 ") else "no answer"


def signed(auth: bytes) -> dict[bytes | str, list[bytes | str]]:
    return {b"X-Serverless-Auth": [auth]} if auth else {}


def raw_auth(auth: bytes) -> bytes:
    return b"X-Serverless-Auth: %s\r\n" % auth if auth else b""


class Signer:
    """Signs auth_data as the autoscaler would, one request_idx per request, and remembers
    what each request_idx cost and how it ended for the client (the accounting check)."""

    def __init__(self) -> None:
        self.key = generate_private_key()
        self.next_idx = itertools.count(1)
        self.costs: dict[int, float] = {}
        self.kinds: dict[int, str] = {}
        self.outcomes: dict[int, str] = {}

    def issue(self, kind: str, cost: float = 1.0) -> bytes:
        idx = next(self.next_idx)
        auth = {"cost": cost, "endpoint": "soak", "reqnum": idx, "request_idx": idx}
        auth["url"] = "http://127.0.0.1:1"
        auth["signature"] = sign(self.key, auth, "five-field")
        self.costs[idx] = cost
        self.kinds[idx] = kind
        return json.dumps(auth).encode()


Kind = Callable[[Soak, bytes], Awaitable[str]]
# During a burst any new connection may be refused: 503 is a correct outcome for every kind.
OVER = "503"
BUSY = "429"  # signed mode: during an over-capacity burst any signed request may get 429
HEAVY = 4000.0  # workload of an over-capacity request; max_perf is MAX_PERF
MAX_PERF = 1000.0  # workload units per second (a benchmark cache file, signed mode)
BURST = 20
# name: (coroutine, weight, acceptable outcomes)
KINDS: dict[str, tuple[Kind, int, frozenset[str]]] = {
    "json": (json_call, 50, frozenset({"200", OVER, BUSY})),
    "stream": (stream, 15, frozenset({"200", OVER, BUSY})),
    "upload": (upload, 5, frozenset({"200", OVER, BUSY})),
    "disconnect": (disconnect, 10, frozenset({"left", OVER, BUSY})),
    "backend reset": (backend_reset, 5, frozenset({"502", OVER, BUSY})),
    "backend break": (backend_break, 5, frozenset({"truncated", OVER, BUSY})),
    "oversize head": (oversize_head, 3, frozenset({"502", OVER, BUSY})),
    "malformed": (malformed, 10, frozenset({"400", OVER})),
}
SIGNED_KINDS: dict[str, tuple[Kind, int, frozenset[str]]] = {
    "forged": (forged, 5, frozenset({"401", OVER})),
    "forged expect": (forged_expect, 5, frozenset({"401", OVER})),
}
UNAUTHENTICATED = ("forged", "forged expect", "malformed")  # never counted by the worker


def measure(pid: int) -> tuple[float, int]:
    process = psutil.Process(pid)
    return process.memory_info().rss / 2**20, process.num_fds()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def run(minutes: float, concurrency: int, signed_mode: bool, tls: bool) -> int:
    backend, fake_backend = listen_backend()
    workdir = tempfile.mkdtemp(prefix="vespa-soak-")
    port = free_port()
    env = dict(os.environ)
    signer = autoscaler = None
    mode = ["--unsecured=true"]
    if signed_mode:
        signer = Signer()
        autoscaler = FakeAutoscaler(public_pem(signer.key))
        autoscaler_port = listen_tcp(Site(autoscaler)).getHost().port
        cache = os.path.join(workdir, "max_perf")
        with open(cache, "w") as f:
            f.write(f"{MAX_PERF}\n")
        mode = ["--unsecured=false", f"--benchmark-cache={cache}", "--max-wait-time=10"]
        env.update(
            MASTER_TOKEN="mtok-soak-secret",  # noqa: S106 (a throw-away token on loopback)
            REPORT_ADDR=f"http://127.0.0.1:{autoscaler_port}",
            CONTAINER_ID="7",
        )
    listen = f"tcp:{port}:interface=127.0.0.1:backlog=1024"
    scheme, client_tls, agent_tls = "http", None, {}
    if tls:  # as a Vast worker serves (USE_SSL), to clients that trust its certificate
        cert, key, pem = self_signed(workdir)
        listen = f"ssl:{port}:interface=127.0.0.1:backlog=1024:privateKey={key}:certKey={cert}"
        root = Certificate.loadPEM(pem)
        client_tls = optionsForClientTLS("127.0.0.1", trustRoot=root)
        agent_tls = {"contextFactory": BrowserLikePolicyForHTTPS(trustRoot=root)}
        scheme = "https"
    args = twistd_command(
        "-n",
        "--pidfile=",
        "vespa",
        f"--backend-url={backend}",
        *mode,
        "--access-log=false",
        # Twisted's default listen backlog (50) leaves a burst's excess connections half-open
        # in the kernel, never accepted (and so never refused cleanly): see README.
        f"--listen={listen}",
        f"--max-connections={MAX_CONNECTIONS}",
        f"--max-connections-per-address={PER_ADDRESS}",
        "--admin-listen=none",  # loopback-only soak; never collide with a real worker's 9090
        "--max-body-size=8M",
    )
    watcher = ProcessWatcher()
    process = reactor.spawnProcess(watcher, args[0], args, env=env, path=workdir)
    await watcher.wait_for(rb"worker loaded in")
    url = f"{scheme}://127.0.0.1:{port}"
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    http = HTTPClient(Agent(reactor, pool=pool, **agent_tls))
    soak = Soak(url, http, collections.defaultdict(list), signer, client_tls)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    kinds = {**KINDS, **(SIGNED_KINDS if signed_mode else {})}
    names = list(kinds)
    weights = [kinds[n][1] for n in names]
    specials: dict[str, Kind] = {
        "burst": lambda s, _: burst(s),
        "over capacity": over_capacity,
        "idle flood": lambda s, _: idle_flood(s),
    }

    async def one(name: str) -> None:
        started = time.monotonic()
        auth = signer.issue(name) if signer is not None and name in kinds else b""
        try:
            outcome = await (kinds[name][0] if name in kinds else specials[name])(soak, auth)
        except Exception as e:  # a client-side failure is an outcome to report, not a crash
            outcome = f"client error: {type(e).__name__}"
            if (name, outcome) not in counts:  # the first of its kind: why, on stderr
                traceback.print_exc()
        soak.latencies[name].append(time.monotonic() - started)
        counts[(name, outcome)] += 1
        if signer is not None and auth:
            signer.outcomes[json.loads(auth)["request_idx"]] = outcome

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
            if signer is not None and time.monotonic() < deadline:
                await one("over capacity")
            if time.monotonic() < deadline:
                await one("idle flood")
            rss, fds = measure(process.pid)
            samples.append((time.monotonic() - begin, rss, fds))
            fake_backend.seen.clear()  # it keeps every body (uploads): not the worker's memory

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
    await watcher.ended  # the drain sends the last report and deletes
    tracebacks = watcher.output.count(b"Traceback")

    print(f"\nsoak: {minutes:g} min, {concurrency} concurrent clients, worker on {url}")
    print(f"{'kind':16} {'outcome':22} {'count':>8}")
    failures = []
    for (name, outcome), count in sorted(counts.items()):
        expected = {"burst": "503s seen", "over capacity": "429s seen", "idle flood": "served"}
        good = outcome in kinds[name][2] if name in kinds else outcome == expected[name]
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
    if signer is not None and autoscaler is not None:
        failures += accounting(signer, autoscaler)
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


def accounting(signer: Signer, autoscaler: FakeAutoscaler) -> list[str]:
    """The invariant from what the autoscaler recorded: every request_idx that reached the
    gate is deleted exactly once with the flag its outcome calls for, forged ones never, and
    the reported workload adds up to the costs of what was served, errored and rejected."""
    problems = []
    entries = autoscaler.delete_entries()
    counts = collections.Counter(idx for idx, _ in entries)
    flags = dict(entries)
    twice = sum(1 for n in counts.values() if n > 1)
    success = {"200": True, "502": False, "truncated": False, "429": False}
    by_outcome: collections.Counter[str] = collections.Counter()
    cost: dict[str, float] = collections.defaultdict(float)
    missing = wrong = 0
    for idx, outcome in signer.outcomes.items():
        kind = signer.kinds[idx]
        if kind in UNAUTHENTICATED or outcome == "503":
            if idx in counts:
                wrong += 1  # refused before authentication: must count nowhere
            continue
        if outcome == "left":
            outcome = "cancelled" if idx in counts else "left before admission"
        by_outcome[outcome] += 1
        cost[outcome] += signer.costs[idx]
        if outcome in success and flags.get(idx) is not success[outcome]:
            missing += 1
        if outcome == "cancelled" and flags[idx] is not True:
            wrong += 1
    statuses = autoscaler.statuses
    perf = sum(s["cur_perf"] for s in statuses)
    rej = sum(s["rej_load"] for s in statuses)
    new = sum(s["new_load"] for s in statuses)
    served, errored = cost["200"], cost["502"] + cost["truncated"]
    print(
        f"accounting: {len(counts)} request_idx deleted ({twice} more than once), "
        f"outcomes {dict(by_outcome)}; cur_perf {perf:g} (served {served:g}), "
        f"rej_load {rej:g} (429s {cost['429']:g}), new_load {new:g} "
        f"(served+errored {served + errored:g}, +cancelled "
        f"{served + errored + cost['cancelled']:g}), "
        f"last cur_load {statuses[-1]['cur_load']}"
    )
    if twice:
        problems.append(f"{twice} request_idx deleted more than once")
    if missing or wrong:
        problems.append(
            f"{missing} request_idx missing or with a wrong flag, {wrong} wrongly deleted"
        )
    if abs(perf - served) > 1e-6 or abs(rej - cost["429"]) > 1e-6:
        problems.append("cur_perf or rej_load does not match the costs sent")
    if not served + errored - 1e-6 <= new <= served + errored + cost["cancelled"] + 1e-6:
        problems.append("new_load out of bounds")
    if statuses[-1]["cur_load"] != 0:
        problems.append("cur_load did not return to 0")
    return problems


async def one_more(soak: Soak) -> str:
    try:
        auth = soak.signer.issue("json") if soak.signer is not None else b""
        outcome = await json_call(soak, auth)
        if soak.signer is not None:
            soak.signer.outcomes[json.loads(auth)["request_idx"]] = outcome
        return outcome
    except Exception as e:
        return type(e).__name__


def listen_backend() -> tuple[str, FakeBackend]:
    backend = FakeBackend(reactor)
    port = listen_tcp(Site(backend))
    return f"http://127.0.0.1:{port.getHost().port}", backend


def free_port() -> int:
    port = listen_tcp(Site(FakeBackend(reactor)))
    number: int = port.getHost().port
    port.stopListening()
    return number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--signed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a secured worker reporting to an in-process fake autoscaler (default)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="the worker serves HTTPS (an ssl: listener)"
    )
    options = parser.parse_args()

    async def go(_: object) -> None:
        code = await run(options.minutes, options.concurrency, options.signed, options.tls)
        if code:
            raise SystemExit(code)

    task.react(lambda r: Deferred.fromCoroutine(go(r)))


if __name__ == "__main__":
    main()
