"""
start_server.sh (the Vast template entry point) against loopback fakes: a fake Vast console
signing certificates, fake autoscalers receiving beacons, and a fake virtualenv whose pip and
twistd only record how they were called. Fast and offline.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from tests.fakes import FakeAutoscaler
from tests.helpers import listen, spawn

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "start_server.sh"
)

FAKE_PYTHON = """#!/bin/sh
# fake venv python: records pip calls (but the check that pip is there)
if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = --version ]; then
    exit "${FAKE_NO_PIP:-0}"
fi
if [ "$1" = -m ] && [ "$2" = pip ]; then
    echo "pip $*" >> "$FAKE_LOG"
    exit "${FAKE_PIP_STATUS:-0}"
fi
exit 1
"""

FAKE_TWISTD = """#!/bin/sh
# fake twistd: records its arguments, one per line, then exits as told
printf '%s\\n' "$@" > "$FAKE_LOG.twistd"
echo "twistd ran" >> "$FAKE_LOG"
[ -n "$FAKE_TWISTD_ERROR" ] && echo "$FAKE_TWISTD_ERROR" >&2
[ -n "$FAKE_TWISTD_LOGGED" ] && echo "2026-01-01T00:00:00+0000 [stderr#error] $FAKE_TWISTD_LOGGED"
if [ -n "$FAKE_TWISTD_WAIT" ]; then
    trap 'echo "twistd stopped" >> "$FAKE_LOG"; exit 0' TERM
    echo "fake twistd waiting" >&2
    while :; do sleep 0.05; done
fi
exit "${FAKE_TWISTD_STATUS:-0}"
"""

# fake interpreter used to create the virtualenv: `python3 -m venv DIR`
FAKE_CREATOR = """#!/bin/sh
echo "venv $3" >> "$FAKE_LOG"
mkdir -p "$3/bin"
cp "$FAKE_DIR/python" "$3/bin/python"
cp "$FAKE_DIR/twistd" "$3/bin/twistd"
"""


def _script(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


class Recorder(Resource):
    """Answers every POST with a fixed reply and remembers (path, query args, body)."""

    isLeaf = True

    def __init__(self, code: int = 200, reply: bytes = b"{}") -> None:
        super().__init__()
        self.code = code
        self.reply = reply
        self.seen: list[tuple[bytes, dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((request.path, dict(request.args or {}), request.content.read()))
        request.setResponseCode(self.code)
        return self.reply


class Signer(Recorder):
    """A fake Vast console that signs each CSR with its own CA key, for the CSR's key; with
    ``refuse_ec`` it answers an EC key's CSR with an error, with ``other_key`` it certifies
    a key of its own instead."""

    def __init__(self, refuse_ec: bool = False, other_key: bool = False) -> None:
        super().__init__()
        self.refuse_ec = refuse_ec
        self.other_key = other_key
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.issued: list[bytes] = []

    def render_POST(self, request: Request) -> bytes:
        super().render_POST(request)
        csr = x509.load_pem_x509_csr(self.seen[-1][2])
        public = csr.public_key()
        if self.refuse_ec and isinstance(public, ec.EllipticCurvePublicKey):
            request.setResponseCode(400)
            return b'{"error": "unsupported key type"}'
        if self.other_key:
            public = ec.generate_private_key(ec.SECP256R1()).public_key()
        ca = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake Vast CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(ca)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.ca_key, hashes.SHA256())
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        self.issued.append(pem)
        return pem


class StartServerTests(TestCase):
    def setUp(self) -> None:
        if not shutil.which("bash") or not shutil.which("curl") or not shutil.which("openssl"):
            raise SkipTest("needs bash, curl and openssl")
        self.dir = os.path.abspath(self.mktemp())
        fakes = os.path.join(self.dir, "fakes")
        os.makedirs(fakes)
        _script(os.path.join(fakes, "python"), FAKE_PYTHON)
        _script(os.path.join(fakes, "twistd"), FAKE_TWISTD)
        _script(os.path.join(fakes, "creator"), FAKE_CREATOR)
        self.log = os.path.join(self.dir, "calls.log")
        self.venv = os.path.join(self.dir, "workspace", "venv")
        self.reports = [Recorder(), Recorder()]
        self.env = {
            "FAKE_LOG": self.log,
            "FAKE_DIR": fakes,
            "WORKSPACE_DIR": os.path.join(self.dir, "workspace"),
            "VESPA_VENV": self.venv,
            "VESPA_PYTHON": os.path.join(fakes, "creator"),
            "VESPA_SPEC": "/src/vespa",
            "REPORT_ADDR": ",".join(listen(self, r) + "/" for r in self.reports),
            "CONTAINER_ID": "4242",
            "MASTER_TOKEN": "mtok-secret",
            "PUBLIC_IPADDR": "203.0.113.7",
            "WORKER_PORT": "3000",
            "VAST_TCP_PORT_3000": "43000",
            "USE_SSL": "false",
            "SSL_CERT": os.path.join(self.dir, "etc", "instance.crt"),
            "SSL_KEY": os.path.join(self.dir, "etc", "instance.key"),
        }

    async def start(self, **env: str) -> tuple[int, str]:
        self.env.update(env)
        watcher = spawn(self, ["bash", SCRIPT], self.env)
        code = await watcher.ended
        return code, watcher.output.decode()

    def calls(self) -> list[str]:
        with open(self.log) as f:
            return f.read().splitlines()

    def twistd_args(self) -> list[str]:
        with open(self.log + ".twistd") as f:
            return f.read().splitlines()

    def beacons(self) -> list[list[dict[str, Any]]]:
        """The JSON bodies each fake autoscaler received on /worker_status/."""
        result = []
        for recorder in self.reports:
            assert all(path == b"/worker_status/" for path, _, _ in recorder.seen)
            result.append([json.loads(body) for _, _, body in recorder.seen])
        return result

    async def test_plain_start(self) -> None:
        """Without TLS the script creates the virtualenv, installs VESPA_SPEC and runs
        twistd in the foreground on tcp:WORKER_PORT; a clean exit sends no beacon."""
        code, output = await self.start()
        self.assertEqual(code, 0, output)
        self.assertEqual(
            self.calls(), [f"venv {self.venv}", "pip -m pip install -q /src/vespa", "twistd ran"]
        )
        self.assertEqual(
            self.twistd_args(), ["-n", "--pidfile=", "vespa", "--listen", "tcp:3000:backlog=1024"]
        )
        self.assertEqual(self.beacons(), [[], []])

    async def test_reuses_virtualenv(self) -> None:
        """A second start reuses the virtualenv instead of creating a new one."""
        await self.start()
        os.remove(self.log)
        code, output = await self.start(VESPA_ARGS="--max-wait-time 5")
        self.assertEqual(code, 0, output)
        self.assertIn("reusing the virtualenv", output)
        self.assertEqual(self.calls(), ["pip -m pip install -q /src/vespa", "twistd ran"])
        self.assertEqual(self.twistd_args()[-2:], ["--max-wait-time", "5"])

    async def tls_start(self, console: Resource, **env: str) -> tuple[int, str]:
        signer = listen(self, console) + "/api/v0/sign_cert/?instance_id=4242"
        return await self.start(**{"USE_SSL": "true", "SIGN_CERT_URL": signer, **env})

    def assert_served(self, console: Signer, key_type: type) -> None:
        """The key and certificate saved are the pair the console signed last (a key of
        ``key_type``, readable by its owner alone), and twistd serves them on ssl:."""
        key, cert = self.env["SSL_KEY"], self.env["SSL_CERT"]
        with open(key, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), password=None)
        self.assertIsInstance(private, key_type)
        with open(cert, "rb") as f:
            self.assertEqual(f.read(), console.issued[-1])
        self.assertEqual(
            x509.load_pem_x509_certificate(console.issued[-1]).public_key(),
            private.public_key(),
        )
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        self.assertEqual(
            self.twistd_args()[-1], f"ssl:3000:backlog=1024:privateKey={key}:certKey={cert}"
        )
        self.assertEqual(self.beacons(), [[], []])

    async def test_tls_certificate_signed(self) -> None:
        """With USE_SSL=true the script sends the signer a CSR for an EC P-256 key (a full
        handshake signs with it: a tenth of an RSA signature's CPU), saves the key and the
        signed certificate, and runs twistd on an ssl: endpoint with them."""
        console = Signer()
        code, output = await self.tls_start(console)
        self.assertEqual(code, 0, output)
        [(path, args, csr)] = console.seen
        self.assertEqual(path, b"/api/v0/sign_cert/")
        self.assertEqual(args, {b"instance_id": [b"4242"]})
        request = x509.load_pem_x509_csr(csr)
        self.assertTrue(request.is_signature_valid)
        public = request.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        self.assertEqual(public.curve.name, "secp256r1")
        usage = request.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.digital_signature)
        self.assertFalse(usage.key_encipherment)  # an EC key signs; it enciphers no key
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("0.0.0.0")])
        self.assert_served(console, ec.EllipticCurvePrivateKey)

    async def test_rsa_when_ec_refused(self) -> None:
        """A signer that does not sign the EC key's CSR gets one for an RSA-2048 key, as Vast's
        own scripts send; the log says why."""
        console = Signer(refuse_ec=True)
        code, output = await self.tls_start(console)
        self.assertEqual(code, 0, output)
        keys = [x509.load_pem_x509_csr(csr).public_key() for _, _, csr in console.seen]
        self.assertEqual(len(keys), 2)
        self.assertIsInstance(keys[0], ec.EllipticCurvePublicKey)
        assert isinstance(keys[1], rsa.RSAPublicKey)
        self.assertEqual(keys[1].key_size, 2048)
        self.assertIn(
            "did not sign an EC P-256 key (the certificate signer answered HTTP 400 without a "
            'PEM certificate: {"error": "unsupported key type"}); asking for an RSA-2048 one',
            output,
        )
        self.assert_served(console, rsa.RSAPrivateKey)

    async def test_rsa_only(self) -> None:
        """SSL_KEY_TYPE=rsa asks for an RSA-2048 key's certificate alone."""
        console = Signer()
        code, output = await self.tls_start(console, SSL_KEY_TYPE="rsa")
        self.assertEqual(code, 0, output)
        [(_, _, csr)] = console.seen
        request = x509.load_pem_x509_csr(csr)
        public = request.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        self.assertEqual(public.key_size, 2048)
        usage = request.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.digital_signature and usage.key_encipherment)
        self.assert_served(console, rsa.RSAPrivateKey)

    async def test_certificate_for_another_key_is_fatal(self) -> None:
        """A certificate that is not for the key sent (Vespa could not serve it) is never
        saved: after the RSA attempt too, the start stops with a beacon saying so."""
        console = Signer(other_key=True)
        code, output = await self.tls_start(console)
        self.assertNotEqual(code, 0)
        self.assertEqual(len(console.seen), 2)
        self.assertIn(
            "ERROR: the certificate signer answered with a certificate for another key", output
        )
        self.assertFalse(os.path.exists(self.env["SSL_CERT"]))
        self.assertFalse(os.path.exists(self.env["SSL_KEY"]))
        self.assertNotIn("twistd ran", self.calls())
        for beacons in self.beacons():
            [beacon] = beacons
            self.assertIn("a certificate for another key", beacon["error_msg"])

    async def test_unknown_key_type(self) -> None:
        """An SSL_KEY_TYPE other than ec or rsa stops the start before anything is made."""
        code, output = await self.tls_start(Signer(), SSL_KEY_TYPE="dsa")
        self.assertNotEqual(code, 0)
        self.assertIn("SSL_KEY_TYPE=dsa is not ec or rsa", output)
        self.assertFalse(os.path.exists(self.log))  # no virtualenv, no pip, no twistd

    async def test_signer_error_is_fatal(self) -> None:
        """An HTML error from the signer is never saved as the certificate: the start stops
        with a clear message, Vespa is not started, and every autoscaler gets a beacon."""
        console = Recorder(500, b"<html><body>Internal Server Error</body></html>")
        code, output = await self.start(
            USE_SSL="true",
            SIGN_CERT_URL=listen(self, console) + "/sign_cert/",
            SIGN_CERT_RETRIES="0",
        )
        self.assertNotEqual(code, 0)
        self.assertIn("HTTP 500 without a PEM certificate", output)
        self.assertFalse(os.path.exists(self.env["SSL_CERT"]))
        self.assertNotIn("twistd ran", self.calls())
        for beacons in self.beacons():
            [beacon] = beacons
            self.assertIn("Internal Server Error", beacon["error_msg"])
            self.assertEqual(beacon["url"], "https://203.0.113.7:43000")

    async def test_vespa_error_beacon(self) -> None:
        """When Vespa exits with an error, EVERY report address gets a valid JSON beacon with
        the worker's real url, id, token and Vespa's last error line, and the script exits
        with Vespa's code."""
        error = "vespa: invalid MAX_WAIT_TIME='abc' (from environment variable MAX_WAIT_TIME)"
        code, output = await self.start(FAKE_TWISTD_STATUS="3", FAKE_TWISTD_ERROR=error)
        self.assertEqual(code, 3, output)
        for beacons in self.beacons():
            [beacon] = beacons
            self.assertEqual(beacon["url"], "http://203.0.113.7:43000")
            self.assertEqual(beacon["id"], 4242)
            self.assertEqual(beacon["mtoken"], "mtok-secret")
            self.assertIn("exited with code 3: " + error, beacon["error_msg"])

    async def test_error_logged_by_twistd_reaches_the_beacon(self) -> None:
        """An error twistd logs instead of printing (what Vespa writes to stderr once twistd
        runs: a port already in use) goes into the beacon, without the log's prefix; the log
        still reaches the script's output."""
        error = "vespa: cannot listen on tcp:3000: address already in use (set --listen / LISTEN)"
        code, output = await self.start(FAKE_TWISTD_STATUS="1", FAKE_TWISTD_LOGGED=error)
        self.assertEqual(code, 1, output)
        self.assertIn("[stderr#error] " + error, output)
        for beacons in self.beacons():
            [beacon] = beacons
            self.assertTrue(beacon["error_msg"].endswith("exited with code 1: " + error))

    async def test_default_spec_is_this_checkout(self) -> None:
        """Without VESPA_SPEC, a script inside a Vespa checkout installs that checkout; a
        script elsewhere refuses to guess (the PyPI name "vespa" is another project)."""
        del self.env["VESPA_SPEC"]
        code, output = await self.start()
        self.assertEqual(code, 0, output)
        self.assertIn(f"pip -m pip install -q {os.path.dirname(SCRIPT)}", self.calls())
        elsewhere = os.path.join(self.dir, "start_server.sh")
        shutil.copy(SCRIPT, elsewhere)
        watcher = spawn(self, ["bash", elsewhere], self.env)
        self.assertEqual(await watcher.ended, 1)
        self.assertIn(b"missing environment variable(s): VESPA_SPEC", watcher.output)

    async def test_stop_is_passed_on(self) -> None:
        """SIGTERM to the script (a container stop) reaches Vespa, which drains and exits
        cleanly: the script exits 0 and sends no beacon."""
        self.env["FAKE_TWISTD_WAIT"] = "1"
        watcher = spawn(self, ["bash", SCRIPT], self.env)
        await watcher.wait_for(rb"fake twistd waiting")
        watcher.transport_.signalProcess("TERM")  # type: ignore[attr-defined]
        self.assertEqual(await watcher.ended, 0)
        self.assertEqual(self.calls()[-2:], ["twistd ran", "twistd stopped"])
        self.assertEqual(self.beacons(), [[], []])

    async def test_beacon_escapes_message(self) -> None:
        """Quotes and backslashes in the error message still give valid JSON beacons."""
        spec = 'bad"spec\\ {"x": 1}'
        code, _ = await self.start(FAKE_PIP_STATUS="1", VESPA_SPEC=spec)
        self.assertEqual(code, 1)
        for beacons in self.beacons():
            [beacon] = beacons
            self.assertIn(spec, beacon["error_msg"])

    async def test_missing_variables(self) -> None:
        """Missing Vast variables are all named in one message, and nothing is installed."""
        del self.env["MASTER_TOKEN"], self.env["VAST_TCP_PORT_3000"]
        code, output = await self.start()
        self.assertEqual(code, 1)
        self.assertIn("MASTER_TOKEN VAST_TCP_PORT_3000", output)
        self.assertFalse(os.path.exists(self.log))
        self.assertEqual([len(b) for b in self.beacons()], [1, 1])

    async def test_alone_installs_from_pyworker_repo_and_ref(self) -> None:
        """The script downloaded alone (no checkout around it) installs Vespa from
        PYWORKER_REPO at PYWORKER_REF, as a Vast template sets them; without a ref, the
        repository's default branch."""
        del self.env["VESPA_SPEC"]
        alone = os.path.join(self.dir, "start_server.sh")
        shutil.copy(SCRIPT, alone)
        repo = "https://example.org/me/vespa.git"
        self.env.update(PYWORKER_REPO=repo, PYWORKER_REF="v1.2")
        watcher = spawn(self, ["bash", alone], self.env)
        self.assertEqual(await watcher.ended, 0, watcher.output)
        self.assertIn(f"pip -m pip install -q git+{repo}@v1.2", self.calls())
        del self.env["PYWORKER_REF"]
        watcher = spawn(self, ["bash", alone], self.env)
        self.assertEqual(await watcher.ended, 0, watcher.output)
        # The virtualenv is reused: the branch is installed again even at the same version.
        self.assertEqual(
            self.calls()[-3:],
            [
                f"pip -m pip install -q git+{repo}",
                f"pip -m pip install -q --force-reinstall --no-deps git+{repo}",
                "twistd ran",
            ],
        )

    async def test_incomplete_virtualenv_is_made_again(self) -> None:
        """A virtualenv left without pip (a stop while it was being made) is made again, not
        reused for ever."""
        await self.start()
        os.remove(self.log)
        with open(os.path.join(self.venv, "pyvenv.cfg"), "w"):
            pass
        code, output = await self.start(FAKE_NO_PIP="1")
        self.assertEqual(code, 0, output)
        self.assertIn("is incomplete (no pip); making it again", output)
        self.assertEqual(self.calls()[0], f"venv {self.venv}")

    async def test_use_ssl_as_vespa_reads_it(self) -> None:
        """USE_SSL=True (or yes, on, 1) is TLS, as Vespa reads it: plain HTTP on a port the
        worker advertises as https would fail every request. Neither true nor false stops."""
        code, output = await self.tls_start(Signer(), USE_SSL="True")
        self.assertEqual(code, 0, output)
        self.assertTrue(self.twistd_args()[-1].startswith("ssl:3000:"))
        code, output = await self.start(USE_SSL="maybe")
        self.assertEqual(code, 1, output)
        self.assertIn("USE_SSL=maybe is neither true nor false", output)

    async def test_bad_worker_port_is_said_with_a_beacon(self) -> None:
        code, output = await self.start(WORKER_PORT="abc-1")
        self.assertEqual(code, 1, output)
        self.assertIn("WORKER_PORT=abc-1 is not a port number", output)
        self.assertEqual([len(b) for b in self.beacons()], [1, 1])

    async def test_quoted_extra_arguments_are_refused(self) -> None:
        """VESPA_ARGS and VESPA_PIP_ARGS are split at spaces: a quote would reach twistd or pip
        as a character and fail there with an error that does not say why, so it stops the
        start first. A backslash (a Twisted endpoint's escape) passes as it is."""
        code, output = await self.start(VESPA_ARGS="--listen 'tcp:4000'")
        self.assertEqual(code, 1, output)
        self.assertIn("VESPA_ARGS is split at spaces and takes no quotes", output)
        self.assertEqual([len(b) for b in self.beacons()], [1, 1])
        code, output = await self.start(
            VESPA_ARGS="", VESPA_PIP_ARGS='--index-url "https://me:S3CRET@pypi.example/simple"'
        )
        self.assertEqual(code, 1, output)
        self.assertIn("VESPA_PIP_ARGS is split at spaces and takes no quotes", output)
        self.assertNotIn("S3CRET", output + json.dumps(self.beacons()))  # never shown
        code, output = await self.start(
            VESPA_PIP_ARGS="", VESPA_ARGS=r"--max-wait-time 5  --listen tcp:4000:a\:b"
        )
        self.assertEqual(code, 0, output)
        self.assertEqual(
            self.twistd_args()[-6:],
            [
                "--listen",
                "tcp:3000:backlog=1024",
                "--max-wait-time",
                "5",
                "--listen",
                r"tcp:4000:a\:b",
            ],
        )

    async def test_listen_of_the_user_is_kept(self) -> None:
        code, output = await self.start(LISTEN="tcp:4000")
        self.assertEqual(code, 0, output)
        self.assertNotIn("--listen", self.twistd_args())
        self.assertIn("starting Vespa on tcp:4000 (LISTEN)", output)

    async def test_token_in_the_repository_url_is_not_logged(self) -> None:
        code, output = await self.start(
            VESPA_SPEC="git+https://oauth2:ghp_SECRET@example.org/me/vespa.git", FAKE_PIP_STATUS="1"
        )
        self.assertEqual(code, 1, output)
        self.assertNotIn("ghp_SECRET", output)
        self.assertIn("git+https://***@example.org/me/vespa.git", output)
        self.assertNotIn("ghp_SECRET", json.dumps(self.beacons()))

    async def test_model_log_rotated_on_start(self) -> None:
        """MODEL_LOG's lines from an earlier run are appended to MODEL_LOG.old and the log is
        emptied before Vespa starts, so that they do not decide this start."""
        model_log = os.path.join(self.dir, "vllm.log")
        with open(model_log + ".old", "w") as f:
            f.write("run 1\n")
        with open(model_log, "w") as f:
            f.write("run 2: Application startup complete.\n")
        code, output = await self.start(MODEL_LOG=model_log)
        self.assertEqual(code, 0, output)
        with open(model_log) as f:
            self.assertEqual(f.read(), "")
        with open(model_log + ".old") as f:
            self.assertEqual(f.read(), "run 1\nrun 2: Application startup complete.\n")
        self.assertLess(  # rotated before the install, which may take minutes
            output.index("model log"), output.index("installing Vespa")
        )

    def test_shellcheck(self) -> None:
        """The script is shellcheck-clean, and so are the repository's other shell scripts
        (.ci/run installs shellcheck)."""
        if not shutil.which("shellcheck"):
            raise SkipTest("shellcheck is not installed")
        root = os.path.dirname(SCRIPT)
        scripts = [SCRIPT, os.path.join(root, ".ci", "run"), os.path.join(root, "perf", "run.sh")]
        result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout)


class RealInstallTests(TestCase):
    """start_server.sh alone, installing Vespa for real (pip, git) into a fresh virtualenv from
    a local clone of this repository named by PYWORKER_REPO (file://) and PYWORKER_REF; about
    20 s with pip's cache warm."""

    async def test_install_from_local_repository_and_start(self) -> None:
        root = os.path.dirname(SCRIPT)
        if not shutil.which("git") or not shutil.which("bash"):
            raise SkipTest("needs git and bash")
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True
        )
        if head.returncode != 0:
            raise SkipTest("not a git checkout")
        ref = head.stdout.strip()
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        clone = os.path.join(work, "vespa.git")
        subprocess.run(["git", "clone", "-q", "--bare", root, clone], check=True)
        alone = os.path.join(work, "start_server.sh")
        shutil.copy(SCRIPT, alone)
        with socket.socket() as probe:  # a free port for the worker
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        venv = os.path.join(work, "venv")
        autoscaler = FakeAutoscaler()
        env = {
            "PYWORKER_REPO": "file://" + clone,
            "PYWORKER_REF": ref,
            "WORKSPACE_DIR": work,
            "VESPA_VENV": venv,
            "VESPA_PYTHON": sys.executable,
            "REPORT_ADDR": listen(self, autoscaler),
            "CONTAINER_ID": "4242",
            "MASTER_TOKEN": "mtok-secret",
            "PUBLIC_IPADDR": "127.0.0.1",
            "WORKER_PORT": str(port),
            f"VAST_TCP_PORT_{port}": str(port),
            "USE_SSL": "false",
            "ADMIN_LISTEN": "none",
            "BACKEND_URL": "http://127.0.0.1:9",
            # As on a Vast host: the test envs' deprecations-are-errors would fail pip itself.
            "PYTHONWARNINGS": "",
        }
        watcher = spawn(self, ["bash", alone], env)
        # A report comes once its reactor runs (and handles SIGTERM).
        await autoscaler.when(lambda: autoscaler.statuses).addTimeout(120.0, reactor)
        self.assertIn(b"worker starting on", watcher.output)
        watcher.transport_.signalProcess("TERM")  # type: ignore[attr-defined]
        self.assertEqual(await watcher.ended, 0, watcher.output)
        origin = subprocess.run(
            [
                os.path.join(venv, "bin", "python"),
                "-c",
                "from importlib.metadata import distribution; "
                "print(distribution('vast-vespa').read_text('direct_url.json'))",
            ],
            capture_output=True,
            text=True,
            check=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # only the venv
        )
        installed = json.loads(origin.stdout)
        self.assertEqual(installed["url"], "file://" + clone)
        self.assertEqual(installed["vcs_info"]["commit_id"], ref)
