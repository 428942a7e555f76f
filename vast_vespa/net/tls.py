# -*- test-case-name: tests.test_net_tls -*-
"""
TLS listeners (``ssl:`` endpoint descriptions) set up as a current server is, so that a client
that comes back pays a resumed handshake (no certificate, no signature with its key) instead of
a full one. Public APIs only.

Twisted's own ``ssl:`` endpoint turns session resumption off (no tickets, no session cache):
every new connection was a full handshake. Here one :class:`ServerTLS` serves every connection
of a listener with one OpenSSL context, built once and then shared, which has:

- session tickets (TLS 1.3 and 1.2, stateless: the server keeps nothing per client) and a
  server-side session cache for TLS 1.2 clients that do not take tickets;
- its ticket keys replaced every :data:`TICKET_KEY_LIFETIME` seconds: OpenSSL makes them at
  random per context and pyOpenSSL has no public call to set them, so the context is rebuilt
  (with a new session cache): keys stolen later open no session older than that;
- TLS 1.2 at least, ECDHE key exchange with AEAD ciphers only (Mozilla's "intermediate"
  list; TLS 1.3's own suites are OpenSSL's), groups as OpenSSL orders them (X25519 first,
  then P-256), no compression, no renegotiation;
- ALPN answered from the listening site's ``acceptableProtocols`` (``IProtocolNegotiationFactory``).

The same settings are also made as Python's own ``ssl.SSLContext``
(:meth:`ServerTLS.stdlib_context`), for the fast path's TLS protocol
(:mod:`vast_vespa.net.lean_tls`), whose reads and writes then run in C; stock Twisted uses the
pyOpenSSL context. The fast path's TLS 1.3 tickets are stateful instead: each names a session
in the context's cache (see :meth:`ServerTLS.stdlib_context`).

:func:`server_tls` turns ``ssl:PORT:privateKey=...`` into the ``tcp:`` description with the
same port, interface and backlog and a :class:`ServerTLS`; the listener wraps its factory in
``TLSMemoryBIOFactory`` with it, which is what Twisted's ``listenSSL`` does: the listener is
then a TCP one, the fast path's included.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolNegotiationFactory,
    IReactorTime,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

# Ticket keys (and the session cache) are replaced this often; a session is resumable for as
# long, at most (a client resuming across a replacement does one full handshake).
TICKET_KEY_LIFETIME = 3600
# TLS 1.2 suites: ECDHE and AEAD only, AES-128 first (as fast as AES-256 is strong enough,
# and cheaper); Mozilla's "intermediate" configuration without its DHE suites.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# The session ID context: sessions are resumable only on listeners of this program.
SESSION_CONTEXT = b"vast-vespa"
# What Twisted's ssl: endpoint accepts and this one too; sslmethod and dhParameters are not:
# the versions and the key exchange are chosen here.
_KEYS = {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"}
_Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_T = TypeVar("_T")
# OpenSSL 3.0 and later: an end without close_notify read as one (see stdlib_context).
_IGNORE_UNEXPECTED_EOF: int | None = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", None)


class Rotating(Generic[_T]):
    """A value made once and then shared, made again once ``lifetime`` seconds have passed (a
    TLS context: new ticket keys and a new session cache)."""

    def __init__(self, make: Callable[[], _T], clock: IReactorTime, lifetime: float) -> None:
        self._make = make
        self._clock = clock
        self._lifetime = lifetime
        self.value = make()  # now: a key that does not fit fails start-up
        self._expires = clock.seconds() + lifetime

    def current(self) -> _T:
        now = self._clock.seconds()
        if now >= self._expires:
            self.value = self._make()
            self._expires = now + self._lifetime
        return self.value


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server side of every TLS connection of one listener (see the module docstring)."""

    def __init__(
        self,
        key: _Key,
        chain: Sequence[x509.Certificate],
        clock: IReactorTime,
        lifetime: float = TICKET_KEY_LIFETIME,
    ) -> None:
        self._key = key
        self._chain = tuple(chain)
        self.lifetime = lifetime
        self._contexts = Rotating(self._make_context, clock, lifetime)

    @property
    def context(self) -> SSL.Context:
        """The pyOpenSSL context new connections get now."""
        return self._contexts.value

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._contexts.current())
        connection.set_app_data(protocol)  # for ALPN: the site behind the protocol
        return connection

    def _make_context(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        # (types-pyOpenSSL lags pyOpenSSL here, and for cryptography's types below.)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)  # type: ignore[attr-defined]
        # An idle connection gives its buffers back (about 34 KiB), as with Twisted and nginx:
        # a worker may hold a thousand slow streams.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.set_cipher_list(TLS12_CIPHERS)
        context.use_certificate(self._chain[0])  # type: ignore[arg-type]
        for certificate in self._chain[1:]:
            context.add_extra_chain_cert(certificate)  # type: ignore[arg-type]
        context.use_privatekey(self._key)  # type: ignore[arg-type]
        context.check_privatekey()
        context.set_session_id(SESSION_CONTEXT)
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_timeout(int(self.lifetime))
        context.set_alpn_select_callback(_choose_protocol)  # type: ignore[arg-type]
        return context

    def stdlib_context(self, protocols: Sequence[bytes]) -> ssl.SSLContext:
        """These settings as Python's ``ssl.SSLContext``, with ``protocols`` (the site's,
        in its order of preference) offered for ALPN. Differences Python's ssl module leaves
        no say in: the session ID context is "Python" (one program's listeners still) and a
        session's timeout OpenSSL's two hours (the context, with its ticket keys and cache,
        is still replaced every ``lifetime`` seconds). Buffers are released when idle, as
        Python always sets it.

        TLS 1.3 tickets are stateful (``OP_NO_TICKET``): a ticket names a session kept in the
        context's cache instead of carrying it encoded and encrypted, so a resumed connection
        decodes no session and the tickets it issues encrypt none. The cache holds OpenSSL's
        default of 20,480 sessions at most (about 0.8 KiB each), and goes with the context.
        OpenSSL drops a connection's session when the connection ends without close_notify,
        as many clients end theirs (they close the socket) and as a connection Vespa aborts
        does: such an end counts as a close_notify (``OP_IGNORE_UNEXPECTED_EOF``), and
        :class:`~vast_vespa.net.lean_tls.LeanTLSProtocol` still tells its protocol that the
        connection was cut. With an OpenSSL older than 3.0, which has no such option, tickets
        stay stateless."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        if _IGNORE_UNEXPECTED_EOF is not None:
            context.options |= ssl.OP_NO_TICKET | _IGNORE_UNEXPECTED_EOF
        context.set_ciphers(TLS12_CIPHERS.decode("ascii"))
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pem += b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self._chain)
        # Python loads keys from files only: this one is in memory (memfd), never on a disk.
        fd = os.memfd_create("vespa-tls", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as file:
                file.write(pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if protocols:
            context.set_alpn_protocols([p.decode("ascii") for p in protocols])
        return context


def _choose_protocol(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
    """The first of the site's ``acceptableProtocols`` the client offers; no ALPN if none."""
    tls = connection.get_app_data()
    site = IProtocolNegotiationFactory(tls.factory.wrappedFactory, None)
    for protocol in site.acceptableProtocols() if site is not None else ():
        if protocol in offered:
            return protocol
    return SSL.NO_OVERLAPPING_PROTOCOLS


def server_tls(description: str, clock: IReactorTime) -> tuple[str, ServerTLS] | None:
    """None for a description that is not ``ssl:``; for one that is, the ``tcp:`` description
    with its port, interface and backlog, and the :class:`ServerTLS` made from its files.
    Raises ``ValueError`` (or ``OSError``) for one that cannot be used: a missing file, a key
    that does not fit the certificate, an option not supported."""
    fields = _fields(description)
    if fields[0] != (None, "ssl"):
        return None
    options = dict(_ssl_options(fields[1:]))
    unknown = set(options) - _KEYS
    if unknown:
        raise ValueError(
            f"ssl: {', '.join(sorted(unknown))} not supported (Vespa chooses the TLS versions "
            "and key exchange); use port, interface, backlog, privateKey, certKey, extraCertChain"
        )
    if "port" not in options:
        raise ValueError("ssl: needs a port (ssl:443:privateKey=key.pem:certKey=cert.pem)")
    key_file = options.get("privateKey", "server.pem")  # Twisted's defaults
    key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
    if not isinstance(key, _Key):
        raise ValueError(f"ssl: {key_file}: an RSA, EC or Ed25519 key is needed")
    chain = x509.load_pem_x509_certificates(Path(options.get("certKey", key_file)).read_bytes())
    if "extraCertChain" in options:
        chain += x509.load_pem_x509_certificates(Path(options["extraCertChain"]).read_bytes())
    try:
        tls = ServerTLS(key, chain, clock)
    except SSL.Error as e:
        raise ValueError(f"ssl: the certificate and key cannot be used together ({e})") from None
    tcp = f"tcp:{int(options['port'])}:backlog={int(options.get('backlog', 50))}"
    if options.get("interface"):
        tcp += ":interface=" + quoteStringArgument(options["interface"])
    return tcp, tls


def _fields(description: str) -> list[tuple[str | None, str]]:
    """An endpoint description's fields as ``(key or None, value)``: split at ``:`` and at the
    first ``=`` of a field, each unless escaped with a backslash (Twisted's syntax)."""
    fields: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    fields.append((key, "".join(current)))
    return fields


def _ssl_options(fields: list[tuple[str | None, str]]) -> list[tuple[str, str]]:
    """An ``ssl:`` description's options by name (the one positional field is the port)."""
    named = [(key or "port", value) for key, value in fields]
    if sum(1 for key, _ in fields if key is None) > 1:
        raise ValueError("ssl: one positional field only, the port")
    return named
