"""Tables (markdown), the checks against issue 8's and issue 25's (TLS) targets, and the PNG
plot."""

from __future__ import annotations

import statistics
from pathlib import Path


def med(runs: list[dict], key: str) -> float:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def ratios(points: dict, target: str, base: str, key: str) -> list[float]:
    """Per-round ratios ``target / base`` (runs at the same index were measured together)."""
    mine, theirs = points.get(target, []), points.get(base, [])
    pairs = zip(mine, theirs, strict=False)
    return [a[key] / b[key] for a, b in pairs if key in a and key in b and b[key]]


def added_ttfb(runs: list[dict], direct: list[dict]) -> list[float]:
    """Per-round TTFB p50 minus the direct backend's (same round)."""
    pairs = zip(runs, direct, strict=False)
    return [a["ttfb_p50_ms"] - b["ttfb_p50_ms"] for a, b in pairs if "ttfb_p50_ms" in a]


# TTFB split at the backend's handler (perf/sse_load.py): a proxy adds to the first and last.
SPLIT_KEYS = ("to_backend_p50_ms", "backend_p50_ms", "from_backend_p50_ms")


def split_text(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs if r.get(key, -1) >= 0]
    return f"{statistics.median(values):.2f}" if values else "-"


def cpu_per_request(runs: list[dict]) -> str:
    """Proxy CPU time per request: far less sensitive to other tenants than req/s."""
    values = [
        r["proxy_cpu_pct"] * 1e4 / r["rps"] for r in runs if r.get("rps") and r.get("proxy_cpu_pct")
    ]
    return f"{statistics.median(values):.0f}" if values else "-"


def per_request_cpu_ratios(points: dict, target: str, base: str) -> list[float]:
    """Per-round ratios of proxy CPU time per request, ``target / base``."""

    def cost(run: dict) -> float | None:
        return run["proxy_cpu_pct"] / run["rps"] if run.get("rps") else None

    pairs = zip(points.get(target, []), points.get(base, []), strict=False)
    costs = [(cost(a), cost(b)) for a, b in pairs]
    return [a / b for a, b in costs if a is not None and b]


def cpu_per_gb(runs: list[dict]) -> str:
    """Proxy CPU seconds per GB moved: the cost, whoever limited the speed."""
    values = [r["proxy_cpu_pct"] * 10 / r["mb_per_s"] for r in runs if r.get("mb_per_s")]
    return f"{statistics.median(values):.2f}" if values else "-"


def ratio_text(values: list[float]) -> str:
    if not values:
        return "-"
    text = f"{statistics.median(values):.3f}"
    if len(values) > 1:
        text += f" ({min(values):.3f}-{max(values):.3f})"
    return text


def sse_client(results: dict) -> str:
    """Which load client measured the SSE scenarios (results before it was recorded: Python)."""
    if results.get("sse_client") == "c":
        return "Measured by the C SSE client (perf/sse_load.c)."
    return "Measured by the Python SSE client (perf/sse_load.py)."


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def render(results: dict) -> str:
    m = results["machine"]
    out = [
        f"# Vespa perf: {m['date']}, {m['cpus']} CPUs, Python {m['python']}, kernel {m['kernel']}",
        "",
    ]
    scenarios = results["scenarios"]
    targets = results["targets"]
    for name in ("S1", "S2"):
        if name not in scenarios:
            continue
        title = (
            "S1 small JSON POST"
            if name == "S1"
            else (
                "S2 signed-envelope POST (vespa-signed verifies it; the others relay it unsecured)"
            )
        )
        out += [f"## {title}", ""]
        rows = []
        for point, by_target in scenarios[name].items():
            for target in targets:
                runs = by_target.get(target)
                if not runs:
                    continue
                rows.append(
                    [
                        point,
                        target,
                        f"{med(runs, 'rps'):.0f}",
                        f"{med(runs, 'p50_ms'):.2f}",
                        f"{med(runs, 'p99_ms'):.2f}",
                        f"{med(runs, 'proxy_cpu_pct'):.0f}",
                        cpu_per_request(runs),
                        str(sum(r.get("errors", 0) for r in runs)),
                        ratio_text(ratios(by_target, target, "direct", "rps")),
                        ratio_text(ratios(by_target, target, "nginx", "rps")),
                        f"{max(r.get('other_cpu_pct', 0) for r in runs):.0f}",
                    ]
                )
        out += table(
            [
                "point",
                "target",
                "req/s",
                "p50 ms",
                "p99 ms",
                "proxy CPU %",
                "CPU µs/req",
                "errors",
                "÷ direct",
                "÷ nginx",
                "other CPU % (max)",
            ],
            rows,
        )
    if "S3" in scenarios:
        out += ["## S3 100 concurrent SSE streams (20 events, 50 ms apart)", ""]
        rows = []
        for by_target in scenarios["S3"].values():
            direct = by_target.get("direct", [])
            for target in targets:
                runs = by_target.get(target)
                if not runs:
                    continue
                added = added_ttfb(runs, direct)
                # The target is set against nginx in the same run (docs/performance.md): a ratio
                # drifts far less than the CPU % itself when the machine is busier.
                to_nginx = (
                    []
                    if target == "direct"
                    else ratios(by_target, target, "nginx", "proxy_cpu_pct")
                )
                rows.append(
                    [
                        target,
                        str(sum(r.get("streams", 0) for r in runs)),
                        str(sum(r.get("errors", 0) for r in runs)),
                        f"{med(runs, 'ttfb_p50_ms'):.2f}",
                        f"{med(runs, 'ttfb_p99_ms'):.2f}",
                        f"{statistics.median(added):.2f}" if added else "-",
                        *(split_text(runs, key) for key in SPLIT_KEYS),
                        f"{med(runs, 'proxy_cpu_pct'):.1f}",
                        f"{statistics.median(to_nginx):.2f}" if to_nginx else "-",
                        f"{max(r.get('other_cpu_pct', 0) for r in runs):.0f}",
                    ]
                )
        out += table(
            [
                "target",
                "streams",
                "errors",
                "TTFB p50 ms",
                "TTFB p99 ms",
                "added TTFB p50 ms",
                "to backend p50 ms",
                "in backend p50 ms",
                "from backend p50 ms",
                "proxy CPU %",
                "CPU ÷ nginx",
                "other CPU % (max)",
            ],
            rows,
        )
        out += [
            "",
            "TTFB split where the backend stamps its first event: from the client's connect to "
            "the backend's handler (to backend), the handler, and from its write to the client's "
            "read (from backend). The direct row is the floor of each part. " + sse_client(results),
            "",
        ]
    if "S4" in scenarios:
        out += ["## S4 big bodies", ""]
        rows = []
        for point, by_target in scenarios["S4"].items():
            for target in targets:
                runs = by_target.get(target)
                if not runs:
                    continue
                bad = sum(1 for r in runs if r.get("status") != 200)
                rows.append(
                    [
                        point,
                        target,
                        f"{med(runs, 'mb_per_s'):.0f}",
                        f"{max(r['rss_growth_mib'] for r in runs):.1f}"
                        if target != "direct"
                        else "-",
                        f"{med(runs, 'proxy_cpu_pct'):.0f}",
                        cpu_per_gb(runs) if target != "direct" else "-",
                        str(bad),
                        ratio_text(ratios(by_target, target, "direct", "mb_per_s")),
                        ratio_text(ratios(by_target, target, "nginx", "mb_per_s")),
                    ]
                )
        out += table(
            [
                "body",
                "target",
                "MB/s",
                "RSS growth MiB (max)",
                "proxy CPU %",
                "CPU s/GB",
                "non-200",
                "÷ direct",
                "÷ nginx",
            ],
            rows,
        )
    if "S5" in scenarios:
        out += ["## S5 concurrent slow SSE streams (an event per second)", ""]
        rows = []
        for by_target in scenarios["S5"].values():
            for target in targets:
                for r in by_target.get(target, []):
                    rows.append(
                        [
                            target,
                            f"{r.get('completed', 0)}/{r.get('opened', 0)}",
                            str(r.get("first_event_within_1s", 0)),
                            str(r.get("errors", 0)),
                            f"{r['rss_peak_mib']:.1f}" if target != "direct" else "-",
                            f"{r['proxy_cpu_pct']:.0f}" if target != "direct" else "-",
                        ]
                    )
        out += table(
            [
                "target",
                "completed/opened",
                "first event < 1 s",
                "errors",
                "peak RSS MiB",
                "proxy CPU %",
            ],
            rows,
        )
        out += [sse_client(results), ""]
    out += tls_tables(results)
    out += fast_path_parts(results)
    out += against_compared(results)
    out += check(results)
    out += tls_check(results)
    return "\n".join(out)


def against_compared(results: dict) -> list[str]:
    """This build ("vespa") against each ``--compare`` build, round by round (the runs at one
    index were measured in the same round): in how many rounds it was ahead, and the median
    (range) of its ratio to the other, or of the difference for a time. Medians of rounds
    move with the machine from run to run; a change that is ahead in most rounds is one the
    machine's noise did not make."""
    others = [t for t in results["targets"] if t.startswith("vespa@")]
    rows = []
    for scenario, points in results["scenarios"].items():
        for point, by_target in points.items():
            mine = by_target.get("vespa", [])
            for other in [o for o in others if mine and by_target.get(o)]:
                for figure, median, ahead in _paired(by_target, other):
                    rows.append([scenario, point, other, figure, ahead, median])
    if not rows:
        return []
    header = ["scenario", "point", "against", "figure", "rounds ahead", "vespa to it, median"]
    return [
        "## This build against the compared builds, round by round",
        "",
        *table(header, rows),
        "Ratios are this build's figure over the other's in the same round (a difference for "
        "the time to first event); ahead means more req/s or MB/s, less CPU or time.",
        "",
    ]


def _paired(by_target: dict, other: str) -> list[tuple[str, str, str]]:
    """(figure, median (range), rounds ahead) of "vespa" against ``other`` at one point."""
    streams = not any("rps" in run for run in by_target["vespa"])  # S3, S5: no req/s
    figures = [
        ("req/s", ratios(by_target, "vespa", other, "rps"), True),
        ("CPU per request", per_request_cpu_ratios(by_target, "vespa", other), False),
        ("MB/s", ratios(by_target, "vespa", other, "mb_per_s"), True),
        ("TTFB p50", added_ttfb(by_target["vespa"], by_target[other]), False),
        ("proxy CPU", ratios(by_target, "vespa", other, "proxy_cpu_pct") if streams else [], False),
    ]
    found = []
    for figure, values, higher in figures:
        if not values:
            continue
        if figure == "TTFB p50":  # a difference in ms: ahead below 0
            ahead = sum(v < 0 for v in values)
            text = f"{statistics.median(values):+.2f} ms"
            if len(values) > 1:
                text += f" ({min(values):+.2f} to {max(values):+.2f})"
        else:  # a ratio: ahead above 1 when higher is better, below 1 otherwise
            ahead = sum((v > 1) if higher else (v < 1) for v in values)
            text = ratio_text(values)
        found.append((figure, text, f"{ahead} of {len(values)}"))
    return found


def tls_tables(results: dict) -> list[str]:
    """The TLS scenarios: nginx, Vespa (fast path) and Vespa stock over HTTPS with the same
    certificate; direct is the plain-TCP backend."""
    s = results["scenarios"]
    out: list[str] = []
    rows = []
    for name in ("S1-TLS", "NEW-TLS"):
        for point, by_target in s.get(name, {}).items():
            for target in results["targets"]:
                runs = by_target.get(target)
                if not runs:
                    continue
                rows.append(
                    [
                        point,
                        target + (" (plain TCP)" if target == "direct" else " TLS"),
                        f"{med(runs, 'rps'):.0f}",
                        f"{med(runs, 'p50_ms'):.2f}",
                        f"{med(runs, 'p99_ms'):.2f}",
                        cpu_per_request(runs) if target != "direct" else "-",
                        str(sum(r.get("errors", 0) for r in runs)),
                        ratio_text(ratios(by_target, target, "nginx", "rps")),
                        ratio_text(per_request_cpu_ratios(by_target, target, "nginx"))
                        if target != "direct"
                        else "-",
                    ]
                )
    if rows:
        out += ["## TLS: S1 small JSON POST over HTTPS", ""]
        header = ["point", "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors"]
        out += table([*header, "÷ nginx TLS", "CPU/req ÷ nginx TLS"], rows)
        out += [
            "A new connection per request: wrk with `Connection: close`, resuming its TLS "
            "session on each reconnect.",
            "",
        ]
    key = {
        "ec": "an EC P-256 key",
        "both": "an RSA-2048 key (vespa-ec: an EC P-256 one)",
    }.get(results["args"].get("tls_key"), "an RSA-2048 key")
    streams = [
        (
            "S3-TLS",
            "a new connection each",
            "Each stream is a new TLS connection resuming the session of the last stream that "
            "ended (--resume); the client's own TLS work is in every TLS row.",
        ),
        (
            "FULL-TLS",
            "a full handshake each",
            "Each stream is a new TLS connection with a full handshake (no session kept, as "
            f"Python's clients do), signed with {key}; the client's own TLS work is in "
            "every TLS row.",
        ),
    ]
    for scenario, what, caption in streams:
        rows = stream_rows(results, scenario)
        if rows:
            out += [f"## TLS: S3 100 SSE streams over HTTPS, {what}", ""]
            header = ["target", "streams", "errors", "TTFB p50 ms", "TTFB p99 ms"]
            header += ["added TTFB p50 ms (vs plain direct)", "vs nginx TLS"]
            out += table([*header, "proxy CPU %", "CPU ÷ nginx TLS", "resumed handshakes"], rows)
            out += [caption + " " + sse_client(results), ""]
    return out


def stream_rows(results: dict, scenario: str) -> list[list[str]]:
    """S3-TLS's or FULL-TLS's rows: every target's time to first event over plain-TCP
    direct's and nginx TLS's, and its CPU against nginx TLS's."""
    rows = []
    for by_target in results["scenarios"].get(scenario, {}).values():
        direct = by_target.get("direct", [])
        for target in results["targets"]:
            runs = by_target.get(target)
            if not runs:
                continue
            added = added_ttfb(runs, direct)
            over_nginx = added_ttfb(runs, by_target.get("nginx", []))
            to_nginx = (
                [] if target == "direct" else ratios(by_target, target, "nginx", "proxy_cpu_pct")
            )
            rows.append(
                [
                    target + (" (plain TCP)" if target == "direct" else " TLS"),
                    str(sum(r.get("streams", 0) for r in runs)),
                    str(sum(r.get("errors", 0) for r in runs)),
                    f"{med(runs, 'ttfb_p50_ms'):.2f}",
                    f"{med(runs, 'ttfb_p99_ms'):.2f}",
                    f"{statistics.median(added):.2f}" if added else "-",
                    f"{statistics.median(over_nginx):.2f}" if over_nginx else "-",
                    f"{med(runs, 'proxy_cpu_pct'):.1f}" if target != "direct" else "-",
                    f"{statistics.median(to_nginx):.2f}" if to_nginx else "-",
                    resumed(runs),
                ]
            )
    return rows


def resumed(runs: list[dict]) -> str:
    """ "resumed/handshakes" over a target's rounds ("-" where the client did not count them:
    plain TCP, or a results file from before it did). The first streams of a round have no
    session to resume yet."""
    handshakes = sum(r.get("tls_handshakes", 0) for r in runs)
    if not handshakes:
        return "-"
    return f"{sum(r.get('tls_resumed', 0) for r in runs)}/{handshakes}"


def tls_check(results: dict) -> list[str]:
    """Every Vespa build against issue 25's TLS targets (they apply to the fast path, "vespa";
    the others are shown beside)."""
    s = results["scenarios"]
    rows = []
    for target in [t for t in results["targets"] if t.startswith("vespa")]:
        for name, point, goal in (
            ("S1-TLS", "c=64 kept alive", 0.15),
            ("NEW-TLS", "c=16 new conn", 0.40),
        ):
            values = ratios(s.get(name, {}).get(point, {}), target, "nginx", "rps")
            if values:
                v = statistics.median(values)
                ok = "yes" if v >= goal else "NO"
                rows.append(
                    [target, f"{name} {point} req/s ÷ nginx TLS", f"{v:.3f}", f">= {goal}", ok]
                )
        for by_target in s.get("S3-TLS", {}).values():
            added = added_ttfb(by_target.get(target, []), by_target.get("direct", []))
            if added:
                v = statistics.median(added)
                ok = "yes" if v <= 1.0 else "NO"
                rows.append(
                    [target, "S3-TLS added TTFB p50 vs plain direct", f"{v:.2f} ms", "<= 1 ms", ok]
                )
    if not rows:
        return []
    out = ["", '## Issue 25 targets (TLS; the fast path is "vespa")', ""]
    return out + table(["build", "figure", "value", "target", "met"], rows)


def fast_path_parts(results: dict) -> list[str]:
    """Each other Vespa variant of this build (vespa-stock, vespa-no-<part>) against "vespa"
    (the fast path whole), measured in the same rounds: what the fast path and each part buy."""
    s = results["scenarios"]
    variants = [t for t in results["targets"] if t == "vespa-stock" or t.startswith("vespa-no-")]
    if not variants:
        return []
    rows = []
    for target in variants:
        s1 = ratios(s.get("S1", {}).get("c=64", {}), target, "vespa", "rps")
        s1_cpu = per_request_cpu_ratios(s.get("S1", {}).get("c=64", {}), target, "vespa")
        ttfb, s3_cpu = [], []
        for by_target in s.get("S3", {}).values():
            mine, whole = by_target.get(target, []), by_target.get("vespa", [])
            direct = by_target.get("direct", [])
            ttfb += [
                b - a
                for a, b in zip(added_ttfb(whole, direct), added_ttfb(mine, direct), strict=False)
            ]
            s3_cpu += ratios(by_target, target, "vespa", "proxy_cpu_pct")
        s4 = []
        for point, by_target in s.get("S4", {}).items():
            if point != "upload":
                s4 += ratios(by_target, target, "vespa", "mb_per_s")
        row = [
            ratio_text(s1),
            ratio_text(s1_cpu),
            f"{statistics.median(ttfb):+.2f} ms" if ttfb else "-",
            ratio_text(s3_cpu),
            ratio_text(s4),
        ]
        if set(row) != {"-"}:  # not measured in these scenarios (the TLS ones only)
            rows.append([target, *row])
    if not rows:
        return []
    header = [
        "variant (÷ vespa, same rounds)",
        "S1 c=64 req/s",
        "S1 CPU/request",
        "S3 TTFB p50",
        "S3 proxy CPU",
        "S4 download MB/s",
    ]
    intro = [
        "## The fast path, whole and part by part",
        "",
        "vespa-stock runs with FAST_PATH=false; vespa-no-<part> turns one part off alone "
        "(perf/parts.py). Each figure is the variant's over the whole fast path's: req/s below 1, "
        "CPU above 1 and TTFB above +0 ms are what the fast path (or that part) buys.",
        "",
    ]
    return intro + table(header, rows)


def check(results: dict) -> list[str]:
    """Every Vespa build against issue 8's targets."""
    s = results["scenarios"]
    rows = []
    for target in [t for t in results["targets"] if t.startswith("vespa")]:

        def add(
            what: str, value: float, goal: str, ok: bool, unit: str = "", build: str = target
        ) -> None:
            rows.append([build, what, f"{value:.3f}{unit}", goal, "yes" if ok else "NO"])

        for scen, point, goal in (("S1", "c=64", 0.055), ("S2", "c=64", 0.045)):
            values = ratios(s.get(scen, {}).get(point, {}), target, "nginx", "rps")
            if values:
                v = statistics.median(values)
                add(f"{scen} {point} req/s ÷ nginx", v, f">= {goal}", v >= goal)
        for by_target in s.get("S3", {}).values():
            runs, direct = by_target.get(target, []), by_target.get("direct", [])
            added = added_ttfb(runs, direct)
            if added:
                v = statistics.median(added)
                add("S3 added TTFB p50", v, "<= 0.5 ms", v <= 0.5, " ms")
                cpu = med(runs, "proxy_cpu_pct")
                add("S3 proxy CPU", cpu, "<= 15 %", cpu <= 15, " %")
        for point, by_target in s.get("S4", {}).items():
            runs = by_target.get(target, [])
            if not runs:
                continue
            speed = med(runs, "mb_per_s") / 1000
            goal = 0.3 if point == "upload" else 1.0
            add(
                f"S4 {point} GB/s",
                speed,
                f">= {goal}",
                speed >= goal and all(r.get("status") == 200 for r in runs),
            )
            growth = max(r["rss_growth_mib"] for r in runs)
            add(f"S4 {point} RSS growth", growth, "<= 32 MiB", growth <= 32, " MiB")
        for by_target in s.get("S5", {}).values():
            for r in by_target.get(target, []):
                served = r.get("completed", 0) == r.get("opened", -1)
                add("S5 streams completed", r.get("completed", 0), f"all {r.get('opened')}", served)
                mb = r["rss_peak_mib"] * 1.048576
                add("S5 total RSS", mb, "<= 100 MB", mb <= 100, " MB")
    if not rows:
        return []
    out = ["## Issue 8 targets", "", *table(["build", "figure", "value", "target", "met"], rows)]
    if results.get("args", {}).get("quick"):
        out += [
            "",
            "A --quick run has fewer, shorter points: S3's added time to first byte moves by about "
            "0.1 ms from run to run, and more so here. Judge the targets on a full run.",
        ]
    return out


def plot(results: dict, path: Path) -> bool:
    """req/s and p99 latency by concurrency (S1), one line per target; whether it was drawn."""
    points = results["scenarios"].get("S1")
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("perf: matplotlib is not installed (tox -e perf installs it), no plot")
        return False
    concs = sorted(int(p.split("=")[1]) for p in points)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in results["targets"]:
        xs, rps, p99 = [], [], []
        for c in concs:
            runs = points[f"c={c}"].get(target)
            if runs:
                xs.append(c)
                rps.append(med(runs, "rps"))
                p99.append(med(runs, "p99_ms"))
        if xs:
            left.plot(xs, rps, marker="o", label=target)
            right.plot(xs, p99, marker="o", label=target)
    for ax, label in ((left, "requests/s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    left.legend()
    fig.suptitle(
        f"S1 small JSON POST, {results['machine']['date']}, {results['machine']['cpus']} CPUs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
