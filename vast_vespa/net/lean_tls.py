# -*- test-case-name: tests.test_net_lean_tls -*-
"""
TLS connections that cost less per connection and per response (the fast path; on stock
Twisted an ``ssl:`` listener is served by ``TLSMemoryBIOFactory`` as it is).

Twisted's TLS protocol, as ``TLSMemoryBIOFactory`` builds it (``BufferingTLSTransport``):

- ``makeConnection`` gives each connection's protocol the interfaces of its transport, with
  one ``directlyProvides`` call per interface and then one for them all (a new declaration
  per connection, each time). :class:`LeanTLSProtocol` provides a TCP connection's interfaces
  by its class, as Vespa's listeners are TCP ones, and gives an instance its transport's only
  when they are not all covered (one call). It also does not ask OpenSSL for a handshake step
  before the client's first bytes are in: a server has nothing to say until then.
- Small writes are gathered and encrypted one reactor turn later (``callLater(0)``): a timer
  per response, the response a turn late, and then its bytes and the ``close_notify`` of a
  closing connection sent apart. Here writes made while the reactor dispatches a turn's events
  wait in the fast path's :class:`~vast_vespa.net.dispatch.Outbox` and are encrypted together
  (one record for a head and a small body) when the turn is over; TLS output made during a
  turn (a handshake flight, a session ticket, a response, an alert) stays in OpenSSL's memory
  BIO until then and goes to the transport in one write. Writes made outside a turn (timers)
  are encrypted and sent at once. Closing sends what is held first, then the ``close_notify``.

Twisted private names it relies on (checked by :mod:`vast_vespa.net.guard`):
``TLSMemoryBIOFactory._creatorCallable``; ``TLSMemoryBIOProtocol``'s ``_tlsConnection``,
``_appSendBuffer``, ``_handshakeDone``, ``_lostTLSConnection``, ``_write``, ``_flushSendBIO``
(replaced here), ``_shutdownTLS`` and ``_tlsShutdownFinished`` (extended here).
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import WantReadError
from twisted.internet import tcp
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import classImplements, directlyProvides, implementedBy, providedBy

from vast_vespa.net.dispatch import OUTBOX

# What one read of OpenSSL's memory BIO asks for (Twisted's size); a read that fills it is
# followed by another.
BIO_READ = 2**15


# Transports' interface declarations, and whether LeanTLSProtocol's class covers them all.
_COVERED: dict[Any, bool] = {}


class LeanTLSProtocol(TLSMemoryBIOProtocol):
    """The server side of one TLS connection on the fast path (see the module docstring)."""

    _held: list[bytes] | None = None  # cleartext written during this turn, in order
    _waiting = False  # in the outbox: what this turn made is sent when it is over
    _encrypting = False  # encrypting what was held: the output is sent once, after
    _closing = False  # closing: output goes to the transport at once, before it closes

    def makeConnection(self, transport: ITransport) -> None:
        # TLSMemoryBIOProtocol.makeConnection without the interface copying and the first
        # handshake step (see the module docstring).
        provided = providedBy(transport)
        covered = _COVERED.get(provided)
        if covered is None:
            mine = implementedBy(LeanTLSProtocol)
            covered = _COVERED[provided] = all(mine.isOrExtends(i) for i in provided)
        if not covered:
            directlyProvides(self, provided)
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        elif OUTBOX.open and self._handshakeDone and not self.disconnecting:
            self._held = [data]
            self._wait()
        else:
            super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def send_held(self) -> None:
        """Encrypt what this turn's writes hold, and send all of this turn's TLS output in
        one write to the transport."""
        self._waiting = False
        self._encrypt_held()
        self._send_output()

    def _encrypt_held(self) -> None:
        """Encrypt what the writes hold; the output stays in the memory BIO."""
        held, self._held = self._held, None
        if held:
            self._encrypting = True
            try:
                self._write(b"".join(held))  # accepted when written, before any close
            finally:
                self._encrypting = False

    def _wait(self) -> None:
        if not self._waiting:
            self._waiting = True
            OUTBOX.waiting.append(self)

    def _flushSendBIO(self) -> None:
        if not self._closing and (OUTBOX.open or self._encrypting):
            if OUTBOX.open:
                self._wait()
            return  # sent by send_held
        self._send_output()

    def _send_output(self) -> None:
        """Write all the TLS output OpenSSL has made so far to the transport, at once."""
        connection = self._tlsConnection
        if connection is None:  # the connection is gone
            return
        try:
            output = connection.bio_read(BIO_READ)
        except WantReadError:  # nothing to send
            return
        if len(output) == BIO_READ:
            chunks = [output]
            while len(output) == BIO_READ:
                try:
                    output = connection.bio_read(BIO_READ)
                except WantReadError:
                    break
                chunks.append(output)
            output = b"".join(chunks)
        transport = self.transport
        assert transport is not None  # set in makeConnection
        transport.write(output)

    def abortConnection(self) -> None:
        self._held = None  # an aborted connection sends nothing more
        super().abortConnection()

    def _shutdownTLS(self) -> None:
        self._close_now()
        super()._shutdownTLS()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        self._close_now()
        super()._tlsShutdownFinished(reason)

    def _close_now(self) -> None:
        """Before the transport is told to close: what the writes hold is encrypted, and from
        now on TLS output goes to the transport as soon as it is made (the response and the
        close_notify in one write)."""
        self._encrypt_held()
        self._closing = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._held = None
        super().connectionLost(reason)


# A TCP connection's interfaces (mypy-zope cannot follow interfaces given as a list).
classImplements(LeanTLSProtocol, *implementedBy(tcp.Server))  # type: ignore[misc]


class LeanTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` whose connections are :class:`LeanTLSProtocol`."""

    protocol = LeanTLSProtocol
