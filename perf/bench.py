"""
Vespa's load benchmark (issue 8): the direct backend, nginx as a streaming reverse proxy and
Vespa (one or two builds) measured side by side on 127.0.0.1, load points interleaved across
targets so that machine noise spreads over all of them; every figure is also given as a ratio
to the baselines measured in the same run. Run through ``perf/run.sh`` or ``tox -e perf``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from parts import PRELUDES
from procs import Children, Probe, wait_healthy
from report import plot, render

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's tests package
from tests.certs import self_signed

# twistd from a given interpreter (a venv made with --no-deps may have no twistd script)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


@dataclass
class Build:
    """A Vespa to measure: its interpreter, environment and code run before twistd."""

    name: str
    python: str
    env: dict[str, str] = field(default_factory=dict)
    prelude: str = ""

    def twistd(self) -> list[str]:
        return [self.python, "-c", self.prelude + TWISTD]

    def unsecured_worker(self, listen: str) -> list[str]:
        """This build's worker without signatures, on ``listen``, in front of {backend_url}."""
        argv = [*self.twistd(), "-n", "--pidfile=", "vespa", "--unsecured", "true"]
        return [*argv, "--backend-url", "{backend_url}", "--listen", listen]


HERE = Path(__file__).resolve().parent
# Loopback only, with the listen backlog of Vespa's default listener (--worker-port).
VESPA_LISTEN = "tcp:{port}:interface=127.0.0.1:backlog=1024"
# The same over TLS, as Vast runs a worker (USE_SSL): the ssl: listener USE_SSL makes.
VESPA_LISTEN_TLS = "ssl:{port}:interface=127.0.0.1:backlog=1024:privateKey={key}:certKey={cert}"
# The TLS scenarios (issue 25): S1 kept alive, a new connection per request, S3's streams
# resuming their TLS session, and S3's streams with a full handshake each.
TLS_SCENARIOS = ("S1-TLS", "NEW-TLS", "S3-TLS", "FULL-TLS")
REPO = HERE.parent
SMALL_JSON = (
    '{"id": "cmpl-7d1e", "object": "text_completion", "created": 1732800000, '
    '"model": "llama-3-8b", "choices": [{"index": 0, "text": " Paris is the capital of France.", '
    '"finish_reason": "stop"}], "usage": {"prompt_tokens": 12, "completion_tokens": 8, '
    '"total_tokens": 20}}'
)
PROMPT = {"model": "llama-3-8b", "prompt": "What is the capital of France?", "max_tokens": 64}
ENVELOPE = json.dumps(
    {
        "auth_data": {
            "cost": "256",
            "endpoint": "bench-endpoint",
            "reqnum": "REQNUM",
            "request_idx": "REQNUM",
            "signature": "A" * 344,
            "url": "http://127.0.0.1:3000",
        },
        "payload": PROMPT,
    }
).replace('"REQNUM"', "REQNUM")


@dataclass
class Target:
    """Something that answers HTTP on ``port``: the backend itself or a proxy in front of it."""

    name: str
    port: int
    argv: list[str] | None = None  # None: the backend itself (direct)
    pid: int = 0
    signed: bool = False  # signed mode: only the signed-envelope scenario (S2) can use it
    env: dict[str, str] = field(default_factory=dict)
    tls: bool = False  # serves HTTPS (the direct backend never does)

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"


class Bench:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="vespa-perf-"))
        self.children = Children(self.logs)
        self.sse_argv: list[str] = []  # S3, S3-TLS and S5's load client (sse_client)
        self.results: dict = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "kernel": platform.release(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            },
            "args": vars(args),
            "targets": [],
            "scenarios": {},
        }
        self.deadline = time.monotonic() + args.max_minutes * 60

    # ---- processes -------------------------------------------------------------------

    def nginx(self, name: str, body: str) -> int:
        prefix = self.work / name
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"{user}worker_processes 1;\ndaemon off;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/logs/error.log warn;\n"
            "events { worker_connections 8192; }\n"
            f"http {{\naccess_log off;\nsendfile on;\ntcp_nopush on;\n"
            "keepalive_requests 10000000;\nclient_max_body_size 0;\n"
            f"{body}\n}}\n"
        )
        proc = self.children.start(name, ["nginx", "-p", str(prefix), "-c", str(conf)])
        return proc.pid

    def start_backends(self) -> None:
        files = self.work / "files"
        files.mkdir()
        for name in ("blob.bin", "blob.json"):
            with open(files / name, "wb") as f:
                f.truncate(self.args.big_mib << 20)  # sparse: served from the page cache
        with open(self.work / "upload.json", "wb") as f:
            f.truncate(self.args.upload_mib * 1000 * 1000)
        a = self.args
        self.backend_pid = self.nginx(
            "nginx-backend",
            "types { application/octet-stream bin; application/json json; }\n"
            f"server {{ listen 127.0.0.1:{a.port_base}; "
            f"location /files/ {{ alias {files}/; }}\n"
            f"location / {{ default_type application/json; return 200 '{SMALL_JSON}'; }} }}",
        )
        sse = self.children.start(
            "python-backend", [sys.executable, str(HERE / "backend.py"), str(a.port_base + 1)]
        )
        self.sse_backend_pid = sse.pid
        self.wait_healthy(a.port_base, "nginx backend")
        self.wait_healthy(a.port_base + 1, "python backend")

    def wait_healthy(self, port: int, what: str, tls: bool = False) -> None:
        wait_healthy(port, what, self.logs, tls=tls)

    def make_certificate(self) -> None:
        """The certificate nginx and Vespa share: self-signed for 127.0.0.1 (tests.certs), for
        an RSA-2048 key (what Vast's own scripts ask the console to sign) or, with --tls-key
        ec, a P-256 one (what start_server.sh asks for first). With --tls-key both, the RSA
        one, and a P-256 one for vespa-ec."""
        both = self.args.tls_key == "both"
        cert, key, _ = self_signed(str(self.work / "tls"), "rsa" if both else self.args.tls_key)
        self.tls_cert, self.tls_key = Path(cert), Path(key)
        if both:
            cert, key, _ = self_signed(str(self.work / "tls-ec"), "ec")
            self.tls_ec_cert, self.tls_ec_key = Path(cert), Path(key)

    def start_autoscaler(self) -> None:
        """Vespa's autoscaler emulator with our own key, so that envelopes we sign verify."""
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = self.work / "autoscaler-key.pem"
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        port = self.args.port_base + 5
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "vespa-autoscaler"]
        argv += ["--key", str(pem), "--endpoint", "bench=bench-key", "--shape", "url"]
        argv += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
        argv += ["--state-dir", str(self.work / "autoscaler")]
        self.children.start("autoscaler", argv)
        self.autoscaler_url = f"http://127.0.0.1:{port}"
        url = "http://127.0.0.1:3000"
        message = json.dumps({"url": url}, indent=4, sort_keys=True).encode()
        signature = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
        auth = {"cost": 256, "endpoint": "bench", "reqnum": "REQNUM", "request_idx": "REQNUM"}
        auth.update(url=url, signature=base64.b64encode(signature).decode())
        body = json.dumps({"auth_data": auth, "payload": PROMPT})
        self.signed_envelope = body.replace('"REQNUM"', "REQNUM")

    def vast_env(self, port: int) -> dict[str, str]:
        """What Vast gives a worker: its public address and where the autoscaler is."""
        return {
            "REPORT_ADDR": self.autoscaler_url,
            "PUBLIC_IPADDR": "127.0.0.1",
            "VAST_TCP_PORT_3000": str(port),
            f"VAST_TCP_PORT_{port}": str(port),
            "BENCHMARK": "perf_benchmark:benchmark",
            "PYTHONPATH": str(HERE / "signed"),
            "CONTAINER_ID": "1",
            "MASTER_TOKEN": "bench-master-token",
        }

    def wait_signed(self, target: Target) -> None:
        """A signed worker answers only signed requests: wait for one to get a 200."""
        body = self.signed_envelope.replace("REQNUM", "1").encode()
        stop = time.monotonic() + 60
        while time.monotonic() < stop:
            request = urllib.request.Request(
                f"http://127.0.0.1:{target.port}/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as r:  # noqa: S310 (loopback)
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise SystemExit(f"perf: {target.name} never accepted a signed request (see {self.logs})")

    def proxies(self, signed: bool = False, tls: bool = False) -> list[Target]:
        """The proxy targets (not yet started); direct is added by ``start_targets``. With
        ``tls``, nginx, Vespa and the --tls-target commands serve HTTPS with the same
        certificate (--target is skipped: it may not)."""
        base = self.args.port_base + 10
        found = [Target("nginx", base, [], tls=tls)]
        listen = tls_listen(self.tls_cert, self.tls_key) if tls else VESPA_LISTEN
        for index, build in enumerate(self.builds):
            argv = build.unsecured_worker(listen)
            found.append(Target(build.name, base + 1 + index, argv, env=build.env, tls=tls))
        if tls and self.args.tls_key == "both":
            # This build with the fast path ("vespa") again, serving the P-256 certificate.
            argv = self.builds[0].unsecured_worker(tls_listen(self.tls_ec_cert, self.tls_ec_key))
            found.append(Target("vespa-ec", base + 29, argv, tls=True))
        if tls:
            for index, (name, command) in enumerate(self.args.tls_target):
                command = command.replace("{cert}", shlex.quote(str(self.tls_cert)))
                command = command.replace("{key}", shlex.quote(str(self.tls_key)))
                found.append(Target(name, base + 30 + index, ["bash", "-c", command], tls=True))
            return found
        for index, (name, command) in enumerate(self.args.target):
            found.append(Target(name, base + 20 + index, ["bash", "-c", command]))
        if signed and self.signed_envelope:
            for index, build in enumerate(self.builds):
                argv = [*build.twistd(), "-n", "--pidfile=", "vespa"]
                argv += ["--backend-url", "{backend_url}"]
                argv += ["--listen", VESPA_LISTEN]
                signed_name = build.name.replace("vespa", "vespa-signed", 1)
                found.append(
                    Target(signed_name, base + 40 + index, argv, signed=True, env=build.env)
                )
        return found

    def target_names(self) -> list[str]:
        """Every target's name, in the report's order; a --target and a --tls-target may
        share one (one proxy, measured with and without TLS)."""
        a = self.args
        names = ["direct", "nginx", *(b.name for b in self.builds)]
        if a.tls_key == "both" and set(TLS_SCENARIOS) & set(a.scenarios):
            names.append("vespa-ec")
        return list(dict.fromkeys(names + [n for n, _ in a.target + a.tls_target]))

    def start_targets(
        self,
        backend_port: int,
        backend_pid: int,
        tag: str,
        signed: bool = False,
        tls: bool = False,
    ) -> list[Target]:
        backend_url = f"http://127.0.0.1:{backend_port}"
        targets = [Target("direct", backend_port, None, backend_pid)]
        for target in self.proxies(signed, tls):
            if target.name == "nginx":
                # TLS 1.2 and 1.3, the default of nginx 1.23.4 and later (1.22's default stops
                # at 1.2, whose resumption skips the key exchange that 1.3's makes); nginx's own
                # defaults otherwise (session tickets on, as wrk reuses them).
                ssl = (
                    f" ssl;\nssl_certificate {self.tls_cert};\n"
                    f"ssl_certificate_key {self.tls_key};\nssl_protocols TLSv1.2 TLSv1.3"
                    if tls
                    else ""
                )
                target.pid = self.nginx(
                    f"nginx-proxy-{tag}",
                    f"upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 512; }}\n"
                    f"server {{ listen 127.0.0.1:{target.port}{ssl};\nlocation / {{\n"
                    "proxy_pass http://backend; proxy_http_version 1.1;\n"
                    'proxy_set_header Connection ""; proxy_buffering off;\n'
                    "proxy_request_buffering off; proxy_read_timeout 300s; } }",
                )
            else:
                assert target.argv is not None
                argv = [
                    part.format(backend_url=backend_url, port=target.port) for part in target.argv
                ]
                # Each build its own admin port (older builds ignore the variable).
                env = {"ADMIN_LISTEN": f"tcp:{target.port + 100}:interface=127.0.0.1"}
                env.update(target.env)
                if target.signed:
                    env.update(self.vast_env(target.port))
                proc = self.children.start(f"{target.name}-{tag}", argv, env)
                target.pid = proc.pid
            targets.append(target)
        for target in targets:
            if target.signed:
                self.wait_signed(target)
            else:
                self.wait_healthy(target.port, target.name, target.tls)
        time.sleep(0.5)
        return targets

    def stop_targets(self, targets: list[Target]) -> None:
        for proc in list(self.children.running):
            if proc.pid in {t.pid for t in targets if t.argv is not None}:
                self.children.stop(proc)

    # ---- load generators ---------------------------------------------------------------

    def wrk(
        self,
        target: Target,
        conc: int,
        duration: float,
        body: str,
        unique: bool,
        close: bool = False,
    ) -> dict:
        """A wrk load point; with ``close``, a new connection per request (wrk reconnects,
        resuming its TLS session as browsers do)."""
        body_file = self.work / f"body-{target.name}-{unique}.json"
        body_file.write_text(body)
        argv = ["wrk", "-t1", f"-c{conc}", f"-d{duration:g}s", "--timeout", "10s"]
        if close:
            argv += ["-H", "Connection: close"]
        argv += ["-s", str(HERE / "post.lua"), target.url("/v1/completions")]
        env = {**os.environ, "PERF_BODY_FILE": str(body_file), "PERF_UNIQUE": "1" if unique else ""}
        with Probe(watched(target, self.backend_pid)) as probe:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=duration + 60
            )
        line = next((x for x in done.stdout.splitlines() if x.startswith("PERF_JSON ")), None)
        if line is None:
            return {"error": done.stdout[-500:] + done.stderr[-500:]}
        raw = json.loads(line[len("PERF_JSON ") :])
        return {
            "rps": raw["requests"] / (raw["duration_us"] / 1e6),
            "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "errors": raw["socket_errors"] + raw["non2xx"],
            "requests": raw["requests"],
            **self.usage(probe, target),
        }

    def usage(self, probe: Probe, target: Target) -> dict:
        return {
            "proxy_cpu_pct": probe.cpu_pct["proxy"] if target.argv is not None else 0.0,
            # (direct: the target is the backend)
            "backend_cpu_pct": probe.cpu_pct.get("backend", probe.cpu_pct["proxy"]),
            "loadgen_cpu_pct": probe.loadgen_pct,
            "other_cpu_pct": probe.other_pct,
            "rss_before_mib": probe.before["proxy"],
            "rss_peak_mib": probe.peak.get("proxy", probe.before["proxy"]),
        }

    def curl(self, target: Target, path: str, upload: Path | None = None) -> dict:
        argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", "120", "-w"]
        argv.append("%{http_code} %{size_download} %{size_upload} %{time_total}")
        if upload is not None:
            argv += ["-T", str(upload), "-X", "POST", "-H", "Expect:"]
            argv += ["-H", "Content-Type: application/json"]
        argv.append(f"http://127.0.0.1:{target.port}{path}")
        with Probe({"proxy": target.pid}, interval=0.02) as probe:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        code, down, up, took = done.stdout.split()
        moved = float(up if upload is not None else down)
        return {
            "status": int(code),
            "bytes": moved,
            "mb_per_s": moved / float(took) / 1e6,
            "rss_growth_mib": probe.peak.get("proxy", 0) - probe.before["proxy"],
            **self.usage(probe, target),
        }

    def sse_client(self) -> list[str]:
        """The SSE load client for S3, S3-TLS and S5, the same for every target of the run:
        the C one (perf/sse_load.c) unless it did not compile or --sse-client python."""
        a = self.args
        if a.sse_client != "python":
            built, why = compile_sse_client(self.work)
            if built is not None:
                self.results["sse_client"] = "c"
                return [str(built)]
            if a.sse_client == "c":
                raise SystemExit(f"perf: --sse-client c: {why}")
            print(f"perf: measuring SSE with perf/sse_load.py (Python): {why}", flush=True)
        self.results["sse_client"] = "python"
        return [sys.executable, str(HERE / "sse_load.py")]

    def sse(
        self, target: Target, mode: str, options: list[str], timeout: float, resume: bool = True
    ) -> dict:
        argv = [*self.sse_argv, mode, "--port", str(target.port)]
        if target.tls:
            argv.append("--tls")
            if resume:  # as wrk does: a client that comes back resumes
                argv.append("--resume")
        with Probe(watched(target, self.sse_backend_pid), interval=0.2) as probe:
            done = subprocess.run(argv + options, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            return {"error": done.stderr[-500:]}
        return {**json.loads(done.stdout), **self.usage(probe, target)}

    # ---- scenarios ---------------------------------------------------------------------

    def record(self, scenario: str, point: str, target: str, value: dict) -> None:
        points = self.results["scenarios"].setdefault(scenario, {}).setdefault(point, {})
        points.setdefault(target, []).append(value)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in value.items()}
        print(f"  {scenario} {point} {target}: {shown}", flush=True)

    def rounds(self, targets: list[Target], count: int) -> Iterator[list[Target]]:
        """``count`` rounds over the targets, each round in a rotated order."""
        for index in range(count):
            if time.monotonic() > self.deadline:
                print("perf: --max-minutes reached, skipping the rest", flush=True)
                return
            shift = index % len(targets)
            yield targets[shift:] + targets[:shift]

    def s1_s2(self, targets: list[Target]) -> None:
        a = self.args
        for target in targets:  # warm-up: connections, pools, code paths
            self.wrk(target, 64, 2, *self.s2_body(target))
        plain = [t for t in targets if not t.signed]
        if "S1" in a.scenarios:
            for conc in a.s1_conc:
                repeat = a.repeat if conc == 64 else 1
                for order in self.rounds(plain, repeat):
                    for target in order:
                        self.record(
                            "S1",
                            f"c={conc}",
                            target.name,
                            self.wrk(target, conc, a.duration, SMALL_JSON, False),
                        )
        if "S2" in a.scenarios:
            for order in self.rounds(targets, a.repeat):
                for target in order:
                    result = self.wrk(target, 64, a.duration, *self.s2_body(target))
                    self.record("S2", "c=64", target.name, result)

    def s2_body(self, target: Target) -> tuple[str, bool]:
        """The envelope (really signed for a signed worker) and "number each request"."""
        return (self.signed_envelope if target.signed else ENVELOPE), True

    def tls_s1(self, targets: list[Target]) -> None:
        """S1 over TLS kept alive (c=64) and a new TLS connection per request (c=16); direct
        is the plain-TCP backend, for reference."""
        a = self.args
        for target in targets:  # warm-up
            self.wrk(target, 64, 2, SMALL_JSON, False)
        points = [("S1-TLS", "c=64 kept alive", 64, False), ("NEW-TLS", "c=16 new conn", 16, True)]
        for scenario, point, conc, close in points:
            if scenario not in a.scenarios:
                continue
            for order in self.rounds(targets, a.repeat):
                for target in order:
                    result = self.wrk(target, conc, a.duration, SMALL_JSON, False, close)
                    self.record(scenario, point, target.name, result)

    def s3_tls(self, targets: list[Target]) -> None:
        """S3 over TLS: each stream a new connection resuming the session of the last (S3-TLS),
        and each a full handshake (FULL-TLS: Python's clients, aiohttp, requests and httpx,
        keep no session for a new connection)."""
        if "S3-TLS" in self.args.scenarios:
            self.s3(targets, "S3-TLS")
        if "FULL-TLS" in self.args.scenarios:
            self.s3(targets, "FULL-TLS", resume=False)

    def s3(self, targets: list[Target], scenario: str = "S3", resume: bool = True) -> None:
        a = self.args
        options = [
            "--path",
            f"/sse/{a.sse_events}/50",
            "--conc",
            "100",
            "--duration",
            str(a.duration),
            # As the issue's harness: the 100 clients start evenly over one stream's length,
            # so new streams arrive steadily instead of 100 at once every second.
            "--stagger",
            str((a.sse_events - 1) * 50 / 1000),
        ]
        for order in self.rounds(targets, a.repeat):
            for target in order:
                self.record(
                    scenario,
                    "100 streams",
                    target.name,
                    self.sse(target, "stream", options, a.duration + 60, resume),
                )

    def s4(self, targets: list[Target], paths: list[tuple[str, str]], upload: bool) -> None:
        for order in self.rounds(targets, self.args.s4_runs):
            for point, path in paths:
                for target in order:
                    self.record("S4", point, target.name, self.curl(target, path))
            if upload:
                for target in order:
                    self.record(
                        "S4",
                        "upload",
                        target.name,
                        self.curl(target, "/upload", self.work / "upload.json"),
                    )

    def s5(self, targets: list[Target]) -> None:
        a = self.args
        options = ["--path", f"/sse/{a.s5_events}/1000", "--count", str(a.s5_streams)]
        options += ["--ramp", "2", "--deadline", str(a.s5_events + 12)]
        for target in targets:
            self.record(
                "S5",
                f"{a.s5_streams} streams",
                target.name,
                self.sse(target, "hold", options, a.s5_events + 60),
            )

    def run(self) -> None:
        a = self.args
        self.builds = [Build("vespa", sys.executable)]
        if a.stock:
            self.builds.append(Build("vespa-stock", sys.executable, {"FAST_PATH": "false"}))
        for part in a.parts:
            self.builds.append(Build(f"vespa-no-{part}", sys.executable, prelude=PRELUDES[part]))
        for ref in a.compare:
            self.builds.append(Build(f"vespa@{ref}", self.build_ref(ref)))
        self.results["targets"] = self.target_names()
        if {"S3", "S3-TLS", "FULL-TLS", "S5"} & set(a.scenarios):
            self.sse_argv = self.sse_client()
        self.start_backends()
        self.signed_envelope = ""
        if "S2" in a.scenarios and a.signed:
            self.start_autoscaler()
            self.results["targets"] += [
                b.name.replace("vespa", "vespa-signed", 1) for b in self.builds
            ]
        nginx_backend = (a.port_base, self.backend_pid)
        python_backend = (a.port_base + 1, self.sse_backend_pid)
        big = "/files/blob.bin"
        plan = [
            ("S1/S2", {"S1", "S2"}, nginx_backend, self.s1_s2),
            ("S3", {"S3"}, python_backend, self.s3),
            (
                "S4",
                {"S4"},
                nginx_backend,
                lambda t: self.s4(t, [("octet-stream", big), ("json", "/files/blob.json")], True),
            ),
            (
                "S4c",
                {"S4"},
                python_backend,
                lambda t: self.s4(t, [("chunked", f"/chunked/{a.big_mib}")], False),
            ),
            ("S5", {"S5"}, python_backend, self.s5),
            ("S1-TLS/NEW-TLS", {"S1-TLS", "NEW-TLS"}, nginx_backend, self.tls_s1),
            ("S3-TLS/FULL-TLS", {"S3-TLS", "FULL-TLS"}, python_backend, self.s3_tls),
        ]
        if set(TLS_SCENARIOS) & set(a.scenarios):
            self.make_certificate()
        for tag, wanted, (port, pid), scenario in plan:
            if not wanted & set(a.scenarios):
                continue
            print(f"== {tag}", flush=True)
            tls = "TLS" in tag
            name = tag.replace("/", "")
            targets = self.start_targets(port, pid, name, tag == "S1/S2", tls)
            try:
                scenario(targets)
            finally:
                self.stop_targets(targets)

    def build_ref(self, ref: str) -> str:
        """Install ``ref`` of this repository into its own venv; its Python."""
        source = self.work / f"src-{ref.replace('/', '_')}"
        venv = self.work / f"venv-{ref.replace('/', '_')}"
        source.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
        )
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(source)], check=True)
        return str(venv / "bin" / "python")


def watched(target: Target, backend_pid: int) -> dict[str, int]:
    """The process trees a load point samples: the target and, behind a proxy, its backend
    (``backend_pid``: nginx for wrk's points, the Python backend for the SSE ones). Direct is
    the backend itself, sampled once."""
    trees = {"proxy": target.pid}
    if target.argv is not None:
        trees["backend"] = backend_pid
    return trees


def tls_listen(cert: Path, key: Path) -> str:
    """Vespa's --listen for HTTPS with ``cert`` and ``key``."""
    return VESPA_LISTEN_TLS.replace("{key}", str(key)).replace("{cert}", str(cert))


def add_floor(args: argparse.Namespace) -> None:
    """--floor: perf/floor_relay.py as a --target and a --tls-target, both named "floor"."""
    relay = f"exec {shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'floor_relay.py'))}"
    relay += " {port} {backend_url}"
    args.target.append(("floor", relay))
    args.tls_target.append(("floor", relay + " --tls {cert} {key}"))


def compile_sse_client(work: Path) -> tuple[Path | None, str]:
    """perf/sse_load.c built into ``work``: (the binary, "") or (None, why not)."""
    binary = work / "sse_load"
    argv = ["cc", "-O2", "-Wall", "-Wextra", str(HERE / "sse_load.c"), "-o", str(binary)]
    argv += ["-lssl", "-lcrypto"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except OSError as e:
        return None, f"no C compiler (cc: {e.strerror}; apt-get install -y gcc libssl-dev)"
    if done.returncode:
        lines = done.stderr.strip().splitlines()[-3:]
        return None, "perf/sse_load.c did not compile (needs gcc and libssl-dev): " + " / ".join(
            lines
        )
    return binary, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a 2-3 minute run (fewer, shorter points)"
    )
    parser.add_argument(
        "--compare",
        metavar="REF",
        action="append",
        default=[],
        help="also run this git ref (e.g. main), in its own venv; repeatable",
    )
    parser.add_argument(
        "--target",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "CMD"),
        help="an extra proxy: shell command with {backend_url} and {port}",
    )
    parser.add_argument(
        "--tls-target",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "CMD"),
        help="an extra HTTPS proxy for the TLS scenarios: shell command with {backend_url}, "
        "{port}, and {cert} and {key} (the files nginx and Vespa serve)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure perf/floor_relay.py, the least a Twisted relay does (over TLS "
        "behind the fast path's TLS protocol): the floor under Vespa, in the same rounds",
    )
    parser.add_argument(
        "--no-stock",
        dest="stock",
        action="store_false",
        help="skip vespa-stock (this build with FAST_PATH=false, measured by default)",
    )
    parser.add_argument(
        "--parts",
        default="",
        help="also measure this build with each of these fast-path parts turned off alone "
        f"(comma-separated: {', '.join(PRELUDES)}, or all)",
    )
    parser.add_argument(
        "--scenarios",
        default="S1,S2,S3,S4,S5," + ",".join(TLS_SCENARIOS),
        help="comma-separated: S1..S5, " + ", ".join(TLS_SCENARIOS) + " (TLS: all four)",
    )
    parser.add_argument(
        "--tls-key",
        choices=["rsa", "ec", "both"],
        default="rsa",
        help="the TLS scenarios' certificate key: RSA-2048 (default) or EC P-256; it decides "
        "what a full handshake (FULL-TLS) costs. both: RSA-2048, and this build once more as "
        "vespa-ec with a P-256 key, in the same rounds",
    )
    parser.add_argument(
        "--no-signed",
        dest="signed",
        action="store_false",
        help="skip the signed-mode worker in S2 (it needs this build's vespa-autoscaler)",
    )
    parser.add_argument(
        "--sse-client",
        choices=["c", "python"],
        help="S3, S3-TLS and S5's load client: perf/sse_load.c (default when it compiles: its "
        "own cost stays out of the TLS figures) or perf/sse_load.py",
    )
    parser.add_argument("--s1-conc", default="1,16,64,256")
    parser.add_argument("--duration", type=float, default=10, help="seconds per load point")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the key points")
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--upload-mib", type=int, default=100, help="upload size in MB")
    parser.add_argument("--s4-runs", type=int, default=2)
    parser.add_argument("--sse-events", type=int, default=20)
    parser.add_argument("--s5-streams", type=int, default=1000)
    parser.add_argument("--s5-events", type=int, default=13)
    parser.add_argument("--port-base", type=int, default=29080)
    parser.add_argument(
        "--max-minutes", type=float, default=30, help="stop starting new points after this"
    )
    parser.add_argument("--out", type=Path, help="default: perf-results/<timestamp>")
    parser.add_argument(
        "--report", type=Path, metavar="RESULTS_JSON", help="only re-render a results.json"
    )
    if "--quick" in sys.argv[1:]:
        # Fewer, shorter points; explicit options still win.
        parser.set_defaults(s1_conc="16,64", duration=4, repeat=2, big_mib=256, s4_runs=1)
        parser.set_defaults(s5_events=6)
    args = parser.parse_args()
    if args.report:
        results = json.loads(args.report.read_text())
        print(render(results))
        return
    args.scenarios = [s.strip() for s in args.scenarios.split(",")]
    if "TLS" in args.scenarios:
        args.scenarios = [s for s in args.scenarios if s != "TLS"] + list(TLS_SCENARIOS)
    args.parts = list(PRELUDES) if args.parts == "all" else [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - set(PRELUDES)
    if unknown:
        parser.error(f"unknown --parts: {', '.join(sorted(unknown))}")
    args.s1_conc = [int(c) for c in args.s1_conc.split(",")]
    if args.floor:
        add_floor(args)
    out = args.out or Path("perf-results") / time.strftime("%Y%m%d-%H%M%S")
    bench = Bench(args, out)
    try:
        bench.run()
    finally:
        bench.children.stop_all()
        shutil.rmtree(bench.work, ignore_errors=True)  # big files, nginx prefixes, build venvs
    summary = render(bench.results)
    (out / "summary.md").write_text(summary)
    print(summary)
    drawn = plot(bench.results, out / "s1.png")
    print(f"perf: results in {out}/ (results.json, summary.md{', s1.png' if drawn else ''})")


if __name__ == "__main__":
    main()
