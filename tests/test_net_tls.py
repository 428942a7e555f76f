"""TLS listeners: session resumption (through real sockets), ticket keys replaced on time, the
context's settings, and ``ssl:`` descriptions."""

from __future__ import annotations

import os
import socket
import ssl
import warnings
from collections.abc import Callable
from typing import cast

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.certs import self_signed
from tests.helpers import listen_tcp
from vast_vespa.net.tls import TICKET_KEY_LIFETIME, ServerTLS, server_tls
from vast_vespa.options import parse_listen


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"


class HTTP11Site(Site):
    def __init__(self) -> None:
        super().__init__(Hello())

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


def fetch(
    port: int, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool | None, ssl.SSLSession | None, str | None, bytes]:
    """GET / over a new TLS connection (blocking: run in a thread); (resumed, the session to
    resume next, the ALPN protocol, the response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := tls.recv(65536):  # TLS 1.3 tickets come in after the handshake
                response += chunk
            return tls.session_reused, tls.session, tls.selected_alpn_protocol(), response


class ResumptionTests(TestCase):
    """A client that comes back with its session resumes it, by ticket (TLS 1.3 and 1.2) or
    from the session cache (TLS 1.2 without tickets)."""

    def setUp(self) -> None:
        self.cert, self.key, pem = self_signed(os.path.abspath(self.mktemp()))
        self.clock = Clock()
        self.client = ssl.create_default_context(cadata=pem.decode("ascii"))
        self.client.set_alpn_protocols(["h2", "http/1.1"])

    def listen(self, description: str) -> int:
        found = server_tls(description, self.clock)
        assert found is not None
        _, tls = found
        site = HTTP11Site()
        port = listen_tcp(TLSMemoryBIOFactory(tls, False, site))
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    def description(self) -> str:
        return f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"

    async def resumes(self, port: int) -> tuple[bool | None, bool | None]:
        """Whether a first and a second connection resumed a session."""
        first, session, protocol, response = await deferToThread(fetch, port, self.client)
        self.assertTrue(response.endswith(b"hello"))
        self.assertEqual(protocol, "http/1.1")
        second, _, _, response = await deferToThread(fetch, port, self.client, session)
        self.assertTrue(response.endswith(b"hello"))
        return first, second

    async def test_tls13_ticket(self) -> None:
        self.assertEqual(await self.resumes(self.listen(self.description())), (False, True))

    async def test_tls12_ticket(self) -> None:
        self.client.maximum_version = ssl.TLSVersion.TLSv1_2
        self.assertEqual(await self.resumes(self.listen(self.description())), (False, True))

    async def test_tls12_session_cache(self) -> None:
        self.client.maximum_version = ssl.TLSVersion.TLSv1_2
        self.client.options |= ssl.OP_NO_TICKET
        self.assertEqual(await self.resumes(self.listen(self.description())), (False, True))

    async def test_new_ticket_keys_end_old_sessions(self) -> None:
        """Once the ticket keys are replaced, a ticket made with the old ones is not accepted
        (a full handshake); a new ticket resumes again."""
        port = self.listen(self.description())
        _, session, _, _ = await deferToThread(fetch, port, self.client)
        self.clock.advance(TICKET_KEY_LIFETIME)
        resumed, session, _, _ = await deferToThread(fetch, port, self.client, session)
        self.assertFalse(resumed)
        resumed, _, _, _ = await deferToThread(fetch, port, self.client, session)
        self.assertTrue(resumed)

    async def test_alpn_without_overlap(self) -> None:
        """A client offering only protocols the site does not speak still connects, with no
        protocol chosen."""
        self.client.set_alpn_protocols(["h2"])
        _, _, protocol, response = await deferToThread(
            fetch, self.listen(self.description()), self.client
        )
        self.assertIsNone(protocol)
        self.assertTrue(response.endswith(b"hello"))

    async def test_twisted_ssl_endpoint_does_not_resume(self) -> None:
        """What this module is for: Twisted's own ssl: listener makes a full handshake of
        every connection."""
        endpoint = serverFromString(reactor, self.description())
        port = await endpoint.listen(HTTP11Site())
        self.addCleanup(port.stopListening)
        self.assertEqual(await self.resumes(port.getHost().port), (False, False))

    async def test_old_protocol_refused(self) -> None:
        """TLS 1.1 and older are not spoken."""
        port = self.listen(self.description())
        with warnings.catch_warnings():  # the client side of this test is deprecated too
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client.minimum_version = ssl.TLSVersion.TLSv1
            self.client.maximum_version = ssl.TLSVersion.TLSv1_1
        self.client.set_ciphers("ALL:@SECLEVEL=0")
        with self.assertRaises(ssl.SSLError):
            await deferToThread(fetch, port, self.client)


class ContextTests(TestCase):
    def setUp(self) -> None:
        self.cert, self.key, _ = self_signed(os.path.abspath(self.mktemp()))
        self.clock = Clock()

    def server(self) -> ServerTLS:
        found = server_tls(f"ssl:443:privateKey={self.key}:certKey={self.cert}", self.clock)
        assert found is not None
        return found[1]

    def test_settings(self) -> None:
        """Tickets on, a server session cache as long as the ticket keys live, no compression,
        buffers released when idle; TLS 1.2 suites with ECDHE and AEAD only."""
        context = self.server().context
        self.assertEqual(context.get_session_cache_mode(), SSL.SESS_CACHE_SERVER)
        self.assertEqual(context.get_timeout(), TICKET_KEY_LIFETIME)
        # types-pyOpenSSL says None: pyOpenSSL returns the new option bitmask.
        set_options = cast(Callable[[int], int], context.set_options)
        options = set_options(0)  # the options as they are
        self.assertFalse(options & SSL.OP_NO_TICKET)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        self.assertTrue(context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)
        suites = SSL.Connection(context).get_cipher_list()
        tls12 = [name for name in suites if not name.startswith("TLS_")]
        self.assertTrue(tls12)
        for name in tls12:
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue("GCM" in name or "CHACHA20" in name, name)

    def test_one_context_until_the_keys_expire(self) -> None:
        """Every connection shares one context, until TICKET_KEY_LIFETIME has passed: then a
        new one (new ticket keys, a new cache) serves the next connections."""
        server = self.server()
        first = server.serverConnectionForTLS(None).get_context()  # type: ignore[arg-type]
        self.clock.advance(TICKET_KEY_LIFETIME - 1)
        self.assertIs(server.serverConnectionForTLS(None).get_context(), first)  # type: ignore[arg-type]
        self.clock.advance(1)
        second = server.serverConnectionForTLS(None).get_context()  # type: ignore[arg-type]
        self.assertIsNot(second, first)
        self.assertIs(server.serverConnectionForTLS(None).get_context(), second)  # type: ignore[arg-type]


class DescriptionTests(TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.cert, self.key, _ = self_signed(self.dir)

    def test_not_ssl(self) -> None:
        self.assertIsNone(server_tls("tcp:3000", Clock()))
        self.assertIsNone(server_tls("unix:/tmp/ssl", Clock()))

    def test_tcp_description(self) -> None:
        """Port, backlog and interface carry over (an IPv6 interface quoted); Twisted's
        defaults otherwise."""
        files = f"privateKey={self.key}:certKey={self.cert}"
        found = server_tls(f"ssl:port=8443:interface=\\:\\:1:backlog=1024:{files}", Clock())
        assert found is not None
        self.assertEqual(found[0], "tcp:8443:backlog=1024:interface=\\:\\:1")
        found = server_tls(f"ssl:443:{files}", Clock())
        assert found is not None
        self.assertEqual(found[0], "tcp:443:backlog=50")

    def test_escaped_file_names(self) -> None:
        """A file name with ``:`` and ``=`` escaped, as settings.py writes it."""
        odd = os.path.join(self.dir, "a:b=c")
        os.makedirs(odd)
        os.rename(self.cert, os.path.join(odd, "cert.pem"))
        os.rename(self.key, os.path.join(odd, "key.pem"))
        escaped = odd.replace(":", "\\:").replace("=", "\\=")
        description = f"ssl:443:privateKey={escaped}/key.pem:certKey={escaped}/cert.pem"
        self.assertIsNotNone(server_tls(description, Clock()))

    def test_refused(self) -> None:
        """An option Vespa chooses itself, no port, a key of another certificate, a missing
        file: each refused in words, and by --listen's parser too."""
        files = f"privateKey={self.key}:certKey={self.cert}"
        _, other_key, _ = self_signed(os.path.join(self.dir, "other"))
        for description, words in (
            (f"ssl:443:sslmethod=TLSv1_METHOD:{files}", "sslmethod not supported"),
            (f"ssl:443:dhParameters=dh.pem:{files}", "dhParameters not supported"),
            (f"ssl:{files}", "needs a port"),
            (f"ssl:443:privateKey={other_key}:certKey={self.cert}", "cannot be used together"),
        ):
            with self.assertRaises(ValueError) as caught:
                server_tls(description, Clock())
            self.assertIn(words, str(caught.exception))
            with self.assertRaises(ValueError):
                parse_listen(description)
        with self.assertRaises(OSError):
            server_tls(f"ssl:443:privateKey={self.dir}/missing.pem", Clock())
