# -*- test-case-name: tests.test_client_tls -*-
"""
TLS to workers (PROTOCOL.md 8.3): workers present certificates issued by the Vast root CA, so
the client trusts the system CAs plus that root. The root is taken from ``--ca-file``, else from
the cache, else downloaded once from the console and cached. The Vast root carries a path length
constraint without ``keyCertSign``, which OpenSSL's strict X.509 mode rejects (Python >= 3.13's
``ssl.create_default_context`` turns that mode on); the contexts made here (Twisted's, through
pyOpenSSL) leave ``X509_V_FLAG_X509_STRICT`` off, so the chain verifies while hostname/IP checks
stay on. The system CAs are read once from the platform's bundle (``ssl.get_default_verify_paths``).
"""

from __future__ import annotations

import os
import ssl
from functools import cache
from typing import Any

from cryptography import x509
from OpenSSL.crypto import X509
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from vast_vespa.deadline import answer_within
from vast_vespa.outcome import describe_failure

VAST_ROOT_URL = "https://console.vast.ai/static/jvastai_root.cer"
DOWNLOAD_TIMEOUT = 30.0


class CertificateError(Exception):
    """The Vast root CA could not be loaded or downloaded."""


def load_certificates(data: bytes) -> list[X509]:
    """Certificates from PEM (one or more) or DER bytes."""
    try:
        if b"-----BEGIN" in data:
            certificates = x509.load_pem_x509_certificates(data)
        else:
            certificates = [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise CertificateError(f"not a certificate: {e}") from None
    return [X509.from_cryptography(c) for c in certificates]


@cache
def system_certificates() -> tuple[X509, ...]:
    """The platform's CA certificates (its PEM bundle), read once; none if there is no bundle."""
    paths = ssl.get_default_verify_paths()
    for bundle in (paths.cafile, paths.openssl_cafile):
        if bundle and os.path.isfile(bundle):
            try:
                with open(bundle, "rb") as f:
                    return tuple(load_certificates(f.read()))
            except (OSError, CertificateError):
                continue
    return ()


@implementer(IPolicyForHTTPS)
class WorkerTLSPolicy:
    """Twisted's HTTPS policy for worker connections: system CAs + the Vast root CA."""

    _log = Logger()

    def __init__(self, http: HTTPClient, clock: IReactorTime, ca_file: str, ca_cache: str) -> None:
        self._http = http
        self._clock = clock
        self._ca_file = ca_file
        self._ca_cache = ca_cache
        self._extra: list[X509] = []
        self._trust: Any = None  # system CAs plus the Vast root, made once they are loaded
        self._trust_for: list[X509] | None = None
        self._waiters: list[Deferred[None]] = []

    def ready(self) -> Deferred[None]:
        """Fires once the Vast root CA is loaded (downloading it at most once at a time). A
        failed download is not remembered: the next https request tries again."""
        if self._extra:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            Deferred.fromCoroutine(self._load()).addBoth(self._loaded)
        return waiter

    def _loaded(self, result: Failure | None) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)

    async def _load(self) -> None:
        if self._ca_file:
            self._extra = self._read(self._ca_file)
            return
        if os.path.exists(self._ca_cache):
            self._extra = self._read(self._ca_cache)
            return
        self._log.info("downloading the Vast root CA from {url}", url=VAST_ROOT_URL)
        try:
            downloading = self._http.get(VAST_ROOT_URL)
            response, data = await answer_within(downloading, DOWNLOAD_TIMEOUT, self._clock)
        except Exception as e:
            why = describe_failure(Failure(e))
            raise CertificateError(f"cannot download {VAST_ROOT_URL}: {why}") from None
        if response.code != 200:
            raise CertificateError(f"cannot download {VAST_ROOT_URL}: HTTP {response.code}")
        self._extra = load_certificates(data)
        self._keep(data)

    def _keep(self, data: bytes) -> None:
        """Cache the downloaded root for the next start. Written whole or not at all (a
        half-written cache would be read as a broken root); a cache that cannot be written is
        only a warning: the root is loaded, the next start downloads it again."""
        part = f"{self._ca_cache}.part"
        try:
            os.makedirs(os.path.dirname(self._ca_cache) or ".", exist_ok=True)
            with open(part, "wb") as f:
                f.write(data)
            os.replace(part, self._ca_cache)
        except OSError as e:
            self._log.warn(
                "cannot cache the Vast root CA at {path} ({why}); the next start downloads it "
                "again (set --ca-cache to a writable path)",
                path=self._ca_cache,
                why=e.strerror or e,
            )

    def _read(self, path: str) -> list[X509]:
        try:
            with open(path, "rb") as f:
                return load_certificates(f.read())
        except OSError as e:
            raise CertificateError(f"cannot read {path}: {e.strerror}") from None

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        if self._trust is None or self._trust_for is not self._extra:
            certificates = [*system_certificates(), *self._extra]
            self._trust = trustRootFromCertificates([Certificate(c) for c in certificates])
            self._trust_for = self._extra
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._trust)
