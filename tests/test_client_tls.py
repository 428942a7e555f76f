"""TLS to workers: a Vast-like root CA (path length, no keyCertSign) is trusted, over real TLS."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL.crypto import X509Store, X509StoreContext, X509StoreContextError, X509StoreFlags
from treq.client import HTTPClient
from twisted.internet import reactor, tcp
from twisted.internet.interfaces import IReactorSSL
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from tests.certs import private_key
from tests.fakes import CannedHTTP, FakeBackend, FakeRouter, FakeSecuredWorker
from tests.helpers import http_client, listen
from vast_vespa.client.service import build_client
from vast_vespa.client.settings import ClientSettings
from vast_vespa.client.tls import (
    DOWNLOAD_TIMEOUT,
    VAST_ROOT_URL,
    CertificateError,
    WorkerTLSPolicy,
    load_certificates,
)
from vast_vespa.signing import generate_private_key


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def vast_like_chain(leaf_key_type: str = "rsa") -> tuple[bytes, bytes, bytes]:
    """(root CA PEM, worker certificate PEM, worker key PEM). The root has a path length
    constraint and no keyUsage (so no keyCertSign), like the Vast root (PROTOCOL.md 8.3); the
    worker's key is RSA-2048 or, with ``leaf_key_type`` "ec", P-256 (start_server.sh's first
    choice)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("Test Vast Root"))
        .issuer_name(_name("Test Vast Root"))
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    leaf_key = private_key(leaf_key_type)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(root.subject)
        .public_key(leaf_key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return root.public_bytes(pem), leaf.public_bytes(pem), key_pem


CHAIN = vast_like_chain()


class DownloadTests(SynchronousTestCase):
    """The Vast root CA downloaded when neither --ca-file nor the cache has it."""

    def policy(self, http: CannedHTTP, ca_cache: str) -> tuple[WorkerTLSPolicy, Clock]:
        clock = Clock()
        stand_in = cast(HTTPClient, http)  # get is all the policy calls
        return WorkerTLSPolicy(stand_in, clock, "", ca_cache), clock

    def test_downloaded_and_cached(self) -> None:
        http = CannedHTTP(CHAIN[0])
        cache = os.path.join(self.mktemp(), "vast", "root.cer")
        policy, _ = self.policy(http, cache)
        self.successResultOf(policy.ready())
        self.assertEqual(http.urls, [VAST_ROOT_URL])
        with open(cache, "rb") as f:
            self.assertEqual(f.read(), CHAIN[0])
        again, _ = self.policy(http, cache)  # the next start reads the cache
        self.successResultOf(again.ready())
        self.assertEqual(http.urls, [VAST_ROOT_URL])

    def test_unwritable_cache_is_a_warning(self) -> None:
        """A cache that cannot be written leaves the root loaded (requests go on) and says so;
        nothing half-written is left to be read as a broken root."""
        blocker = self.mktemp()
        with open(blocker, "wb"):
            pass
        cache = os.path.join(blocker, "root.cer")  # its directory is a file
        policy, _ = self.policy(CannedHTTP(CHAIN[0]), cache)
        with capturedLogs() as events:
            self.successResultOf(policy.ready())
        [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn(f"cannot cache the Vast root CA at {cache}", warning)
        self.assertFalse(os.path.exists(cache + ".part"))

    def test_no_answer(self) -> None:
        """A download that gets no answer fails at its limit and says so; the next request
        tries again."""
        http = CannedHTTP(None)
        policy, clock = self.policy(http, os.path.join(self.mktemp(), "root.cer"))
        ready = policy.ready()
        clock.advance(DOWNLOAD_TIMEOUT)
        failure = self.failureResultOf(ready, CertificateError)
        self.assertEqual(
            str(failure.value), f"cannot download {VAST_ROOT_URL}: no answer within 30 s"
        )
        policy.ready()
        self.assertEqual(len(http.urls), 2)

    def test_refused(self) -> None:
        policy, _ = self.policy(CannedHTTP(b"gone", code=404), os.path.join(self.mktemp(), "c"))
        failure = self.failureResultOf(policy.ready(), CertificateError)
        self.assertEqual(str(failure.value), f"cannot download {VAST_ROOT_URL}: HTTP 404")


class StrictFlagTests(SynchronousTestCase):
    def test_strict_mode_rejects_the_root_and_default_mode_accepts_it(self) -> None:
        """The Vast-like chain fails under X509_STRICT and verifies without it: the reason the
        client's contexts leave the strict flag off."""
        root, leaf = load_certificates(CHAIN[0])[0], load_certificates(CHAIN[1])[0]
        store = X509Store()
        store.add_cert(root)
        X509StoreContext(store, leaf).verify_certificate()
        strict = X509Store()
        strict.add_cert(root)
        strict.set_flags(X509StoreFlags.X509_STRICT)
        with self.assertRaises(X509StoreContextError):
            X509StoreContext(strict, leaf).verify_certificate()

    def test_der_and_garbage(self) -> None:
        """A DER root loads too; anything else is a clear CertificateError."""
        der = x509.load_pem_x509_certificate(CHAIN[0]).public_bytes(serialization.Encoding.DER)
        self.assertEqual(len(load_certificates(der)), 1)
        with self.assertRaises(CertificateError):
            load_certificates(b"not a certificate")


class TLSWorkerTests(TestCase):
    async def through_https_worker(
        self, root_pem: bytes, chain: tuple[bytes, bytes, bytes] = CHAIN
    ) -> tuple[int, bytes]:
        """Status and body of a GET through the client to an https worker serving ``chain``'s
        certificate, trusting ``root_pem``."""
        _, cert_pem, key_pem = chain
        ca_file = self.mktemp()
        with open(ca_file, "wb") as f:
            f.write(root_pem)
        key = generate_private_key()
        backend = FakeBackend(reactor)
        worker = FakeSecuredWorker(key.public_key(), backend)
        options = PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        listening = cast(IReactorSSL, reactor).listenSSL(
            0, Site(worker), options, interface="127.0.0.1"
        )
        port = cast(tcp.Port, listening)
        self.addCleanup(port.stopListening)
        router = FakeRouter(key, [f"https://127.0.0.1:{port.getHost().port}"])
        settings = ClientSettings(
            endpoint=router.endpoint,
            api_key=router.api_key,
            autoscaler_url=listen(self, router),
            listen=(),
            ca_file=ca_file,
            ca_cache=os.path.join(self.mktemp(), "never-written.cer"),
            client_access_log=False,
            worker_retries=0,
        )
        self.worker = worker
        self.settings = settings
        service = build_client(settings, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        url = listen(self, service.site)
        response = await http_client(self).get(url + "/v1/models")
        return response.code, await response.content()

    async def test_https_worker_with_vast_like_root(self) -> None:
        """A request reaches an https:// worker whose certificate chains to a Vast-like root
        given with --ca-file (nothing downloaded, nothing cached)."""
        code, body = await self.through_https_worker(CHAIN[0])
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["uri"], "/v1/models")
        self.assertEqual(self.worker.verified[0].form, "query")
        self.assertFalse(os.path.exists(self.settings.ca_cache))

    async def test_ec_worker_certificate(self) -> None:
        """A worker certificate for an EC P-256 key, under the same RSA root, is trusted too."""
        chain = vast_like_chain("ec")
        code, body = await self.through_https_worker(chain[0], chain)
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["uri"], "/v1/models")

    async def test_untrusted_worker_refused(self) -> None:
        """A worker certificate from another root is refused: the request never reaches it."""
        code, body = await self.through_https_worker(vast_like_chain()[0])
        self.assertEqual(code, 502, body)
        self.assertEqual(self.worker.verified, [])
