"""TLS: USE_SSL=true serves https on the certificate files, end to end through the worker."""

from __future__ import annotations

import dataclasses
import os
from typing import cast

from treq.client import HTTPClient
from twisted.internet import reactor, tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tests.certs import self_signed
from tests.fakes import FakeBackend
from tests.helpers import listen
from vast_vespa.net.listen import SendNowEndpoint
from vast_vespa.options import SettingsError
from vast_vespa.settings import load_settings
from vast_vespa.worker.tap import build_worker


@implementer(IPolicyForHTTPS)
class TrustOnly:
    """A client policy trusting exactly one certificate."""

    def __init__(self, pem: bytes) -> None:
        self._root = Certificate.loadPEM(pem)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self._root)


class TLSTests(TestCase):
    def setUp(self) -> None:
        self.cert, self.key, self.pem = self_signed(os.path.abspath(self.mktemp()))

    def test_default_listener_is_ssl(self) -> None:
        """With USE_SSL=true and no --listen, the worker listens with TLS on WORKER_PORT using
        SSL_CERT/SSL_KEY, and advertises an https URL."""
        env = {
            "USE_SSL": "true",
            "SSL_CERT": self.cert,
            "SSL_KEY": self.key,
            "WORKER_PORT": "3443",
            "PUBLIC_IPADDR": "203.0.113.7",
            "VAST_TCP_PORT_3443": "43443",
        }
        settings = load_settings({}, env)
        self.assertEqual(
            settings.listen, (f"ssl:3443:backlog=1024:privateKey={self.key}:certKey={self.cert}",)
        )
        self.assertEqual(settings.vast.public_url, "https://203.0.113.7:43443")

    def test_missing_certificate(self) -> None:
        """A missing certificate or key is one clear start-up error naming the file."""
        env = {"USE_SSL": "true", "SSL_CERT": "/nonexistent/instance.crt", "SSL_KEY": self.key}
        error = self.assertRaises(SettingsError, load_settings, {}, env)
        self.assertIn("SSL_CERT='/nonexistent/instance.crt' is not a file", str(error))

    def test_bad_certificate(self) -> None:
        """A certificate file that is not PEM (an HTML error page, say) is one clear start-up
        error, whether it comes from USE_SSL or from an explicit ssl: listener."""
        with open(self.cert, "w") as f:
            f.write("<html>502 Bad Gateway</html>")
        env = {"USE_SSL": "true", "SSL_CERT": self.cert, "SSL_KEY": self.key}
        error = self.assertRaises(SettingsError, load_settings, {}, env)
        self.assertIn("USE_SSL is true but SSL_CERT/SSL_KEY cannot be used", str(error))
        listen = f"ssl:3443:privateKey={self.key}:certKey=/nonexistent.crt"
        error = self.assertRaises(SettingsError, load_settings, {"listen": listen}, {})
        self.assertIn("No such file or directory", str(error))

    async def test_https_end_to_end(self) -> None:
        """An https request through the worker (certificate made in the test, client trusting
        only it) reaches the backend and its answer comes back."""
        backend = FakeBackend(reactor)
        env = {"USE_SSL": "true", "SSL_CERT": self.cert, "SSL_KEY": self.key, "UNSECURED": "1"}
        settings = load_settings({}, env)
        [description] = settings.listen
        local = description.replace("ssl:3000:", "ssl:0:interface=127.0.0.1:", 1)
        settings = dataclasses.replace(
            settings, backend_url=listen(self, backend), listen=(), admin_listen=""
        )
        service = build_worker(settings, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        await service.getServiceNamed("lifecycle").when_loaded()  # else a 503 "not ready"
        # As the worker listens: TLS over a connection that sends at once.
        listening = await SendNowEndpoint(serverFromString(reactor, local)).listen(service.site)
        port = cast(tcp.Port, listening)
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, TrustOnly(self.pem), pool=pool))
        url = f"https://127.0.0.1:{port.getHost().port}/v1/echo"
        response = await http.post(url, json={"prompt": "hi"})
        self.assertEqual(response.code, 200)
        echoed = await response.json()
        self.assertEqual(echoed["uri"], "/v1/echo")
        self.assertEqual(backend.seen[-1].headers[b"x-forwarded-proto"], [b"https"])
