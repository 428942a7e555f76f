"""
SSE load client (asyncio, stdlib): prints one JSON line with what it measured.

    stream: CONC workers open a stream each, read it to the end, and open the next, until
            DURATION s have passed; time to first event (TTFB) and total time per stream.
            TTFB is split where perf/backend.py stamps its first event: from the connect to
            the backend's handler ("to backend"), the handler itself, and from the backend's
            write to this client's read ("from backend"); a proxy's cost is in the first and
            the last, measured against the direct backend's.
            Worker i starts after STAGGER * i / CONC s, so streams begin steadily.
    hold:   open COUNT streams over RAMP s and hold them until they end or DEADLINE s;
            how many got their first event within 1 s and how many got "[DONE]".

With --tls every stream is a new TLS connection; with --resume too, each resumes the session
of the last stream that ended, as browsers, curl and wrk do (Python's clients, aiohttp,
requests and httpx, make a full handshake each time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import ssl
import time

PROMPT = json.dumps(
    {"model": "bench", "prompt": "Hello, streaming world", "max_tokens": 20, "stream": True}
).encode()


STAMPS = re.compile(rb'"t": \[([0-9.]+), ([0-9.]+)\]')


class ResumingContext(ssl.SSLContext):
    """A client context whose new connections resume ``session`` (asyncio has no way to
    pass one)."""

    session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session=self.session
        )


TLS: ResumingContext | None = None  # set by --tls
RESUME = False  # set by --resume
HANDSHAKES = [0, 0]  # with --tls: TLS handshakes made, and how many resumed a session


async def one_stream(
    port: int, path: str
) -> tuple[float, float, bool, tuple[float, float, float] | None]:
    """(ttfb, total, completed, TTFB split) for one stream over a fresh connection."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=TLS)
    if TLS is not None:
        HANDSHAKES[0] += 1
        HANDSHAKES[1] += writer.get_extra_info("ssl_object").session_reused
    try:
        # As the harness: a JSON prompt POSTed on a new connection per stream.
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(PROMPT), PROMPT)
        )
        seen = b""
        ttfb = -1.0
        split = None
        while True:
            data = await reader.read(65536)
            if not data:
                break
            seen = (seen + data)[-256:]
            if ttfb < 0 and b"data:" in seen:
                ttfb = time.perf_counter() - start
            if split is None and ttfb >= 0 and (stamps := STAMPS.search(seen)):
                rendered, written = float(stamps[1]), float(stamps[2])
                split = (rendered - start, written - rendered, start + ttfb - written)
            if b"[DONE]" in seen:
                break
        if RESUME and TLS is not None:
            TLS.session = writer.get_extra_info("ssl_object").session
        return ttfb, time.perf_counter() - start, b"[DONE]" in seen, split
    finally:
        writer.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return -1.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


async def stream_mode(args: argparse.Namespace) -> dict:
    ttfbs: list[float] = []
    totals: list[float] = []
    splits: list[tuple[float, float, float]] = []
    errors = 0
    stop = time.perf_counter() + args.duration

    async def worker(index: int) -> None:
        nonlocal errors
        await asyncio.sleep(args.stagger * index / args.conc)
        while time.perf_counter() < stop:
            try:
                ttfb, total, done, split = await asyncio.wait_for(
                    one_stream(args.port, args.path), args.duration + 10
                )
            except (OSError, asyncio.TimeoutError):
                errors += 1
                await asyncio.sleep(0.01)
                continue
            if done and ttfb >= 0:
                ttfbs.append(ttfb)
                totals.append(total)
                if split is not None:
                    splits.append(split)
            else:
                errors += 1

    await asyncio.gather(*(worker(index) for index in range(args.conc)))
    return {
        "streams": len(ttfbs),
        "errors": errors,
        "ttfb_p50_ms": pct(ttfbs, 50) * 1000,
        "ttfb_p90_ms": pct(ttfbs, 90) * 1000,
        "ttfb_p99_ms": pct(ttfbs, 99) * 1000,
        "total_p50_ms": pct(totals, 50) * 1000,
        "to_backend_p50_ms": pct([s[0] for s in splits], 50) * 1000,
        "backend_p50_ms": pct([s[1] for s in splits], 50) * 1000,
        "from_backend_p50_ms": pct([s[2] for s in splits], 50) * 1000,
    }


async def hold_mode(args: argparse.Namespace) -> dict:
    results: list[tuple[float, float, bool, object]] = []
    errors = 0

    async def holder(delay: float) -> None:
        nonlocal errors
        await asyncio.sleep(delay)
        try:
            results.append(await one_stream(args.port, args.path))
        except OSError:
            errors += 1

    tasks = [asyncio.ensure_future(holder(args.ramp * i / args.count)) for i in range(args.count)]
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    for task in pending:
        task.cancel()
    return {
        "opened": args.count,
        "completed": sum(1 for _, _, ok, _ in results if ok),
        "first_event_within_1s": sum(1 for ttfb, _, _, _ in results if 0 <= ttfb < 1.0),
        "errors": errors,
        "unfinished_at_deadline": len(pending),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["stream", "hold"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--conc", type=int, default=100)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--stagger", type=float, default=0, help="spread worker starts (s)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--ramp", type=float, default=2)
    parser.add_argument("--deadline", type=float, default=25)
    parser.add_argument("--tls", action="store_true", help="HTTPS (self-signed: not verified)")
    parser.add_argument("--resume", action="store_true", help="with --tls: resume sessions")
    args = parser.parse_args()
    if args.tls:
        global TLS, RESUME
        RESUME = args.resume
        TLS = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        TLS.check_hostname = False
        TLS.verify_mode = ssl.CERT_NONE
    run = stream_mode if args.mode == "stream" else hold_mode
    result = asyncio.run(run(args))
    if args.tls:  # whether sessions were really resumed, as perf/sse_load.c tells
        result.update(tls_handshakes=HANDSHAKES[0], tls_resumed=HANDSHAKES[1])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
