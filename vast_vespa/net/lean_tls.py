# -*- test-case-name: tests.test_net_lean_tls -*-
"""
TLS connections that cost less per connection and per response (the fast path; on stock
Twisted an ``ssl:`` listener is served by ``TLSMemoryBIOFactory`` as it is).

Twisted's TLS protocol (``TLSMemoryBIOProtocol``) drives OpenSSL through pyOpenSSL, whose
every call is Python around a C call, and whose "nothing more to read" and "nothing to send"
are exceptions raised from Python: a kept-alive request's read, response and send took about
twenty such calls. :class:`LeanTLSProtocol` does the same on Python's own ``ssl`` module (an
``SSLObject`` between two ``MemoryBIO``), in C: it asks the BIOs how many bytes they hold
instead of reading until an exception says there are none, and builds its context with the
listener's settings (:meth:`vast_vespa.net.tls.ServerTLS.stdlib_context`). Public APIs only.

What it does as Twisted's does: the wrapped protocol gets a TCP connection's interfaces (what a
protocol uses of its transport: ``ITCPTransport``, ``IPushProducer``, ``IConsumer``; every
method of them, each passed on to the TCP connection or done here) and TLS's, writes before
the handshake ends wait for it, ``loseConnection`` sends ``close_notify`` (once a producer is
unregistered) and closes the TCP connection when the client's arrives or the client closes,
a TLS error or an end without ``close_notify`` reaches the wrapped protocol's
``connectionLost`` as the reason (``ConnectionLost`` for the latter).

What it does differently:

- It is not a ``ProtocolWrapper``, whose ``__getattr__`` passes any attribute it lacks on to
  the TCP connection: with a ``__getattr__`` anywhere in its class's MRO, CPython reads every
  attribute of an object the slow way (its specialised attribute reads need the plain
  lookup), and a kept-alive request reads a few dozen attributes of this one. So the class
  says what it offers (Twisted's also declares the reactor's descriptor interfaces of the TCP
  connection, ``doRead`` and the like), the same for every connection: no interface is
  declared per connection.
- Writes made while the reactor dispatches a turn's events wait in the fast path's
  :class:`~vast_vespa.net.dispatch.Outbox` and are encrypted together (one record for a head
  and a small body) when the turn is over; TLS output made during a turn (a handshake flight,
  session tickets, a response, an alert) stays in the memory BIO until then and goes to the
  TCP connection in one write. Writes made outside a turn (timers) are encrypted and sent at
  once, and so is everything once a close has begun (the response, then ``close_notify``).
"""

from __future__ import annotations

import ssl
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    ILoggingContext,
    INegotiated,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ISystemHandle,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from vast_vespa.net.dispatch import OUTBOX
from vast_vespa.net.tls import Rotating, ServerTLS

# What one read of the TLS connection asks for; a read that leaves bytes behind is followed
# by another.
READ_SIZE = 2**16
# Why a connection that ended without close_notify is lost (ConnectionLost), after its
# handshake and before it was done.
CLOSED_WITHOUT_NOTIFY = "the client closed without close_notify"
LEFT_MID_HANDSHAKE = "the client left mid-handshake"


def _wrapped_prefix(wrapped: object, mark: str) -> str:
    """A log prefix: the wrapped object's own (or its class name), then ``mark`` in
    parentheses, as Twisted's wrappers make theirs."""
    if ILoggingContext.providedBy(wrapped):
        return f"{wrapped.logPrefix()} ({mark})"
    return f"{wrapped.__class__.__name__} ({mark})"


@implementer(ISSLTransport, ISystemHandle, INegotiated, IPushProducer, IConsumer)
class LeanTLSProtocol(Protocol):
    """The server side of one TLS connection on the fast path (see the module docstring)."""

    disconnecting = False
    _tls: ssl.SSLObject | None = None  # None once the connection is lost
    _handshake_done = False
    _lost_tls = False  # the TLS session is over (closed or failed): nothing more goes through
    _aborted = False  # abortConnection: nothing more reaches the wrapped protocol
    _reason: Failure | None = None  # why the TLS session failed, for connectionLost
    _producer: Any = None
    _early: list[bytes] | None = None  # written before the handshake ended
    _held: list[bytes] | None = None  # cleartext written during this turn, in order
    _waiting = False  # in the outbox: what this turn made is sent when it is over
    _closing = False  # closing: output goes to the transport at once, before it closes

    def __init__(self, factory: LeanTLSFactory, wrappedProtocol: IProtocol) -> None:
        self.factory = factory
        self.wrappedProtocol = wrappedProtocol

    def makeConnection(self, transport: ITransport) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = self.factory.context().wrap_bio(
            self._incoming, self._outgoing, server_side=True
        )
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)

    # -- from the client

    def dataReceived(self, data: bytes) -> None:
        self._incoming.write(data)
        if not self._handshake_done and not self._handshake():
            self._flush()
            return
        self._read()
        self._flush()

    def _handshake(self) -> bool:
        """Take the handshake as far as the bytes in allow; whether it is done."""
        assert self._tls is not None  # the connection is not lost while bytes come in
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError:
            self._end_tls(Failure())
            return False
        self._handshake_done = True
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()
        early, self._early = self._early, None
        if early:
            self._encrypt(b"".join(early))
            self._after_writes()
        return True

    def _read(self) -> None:
        """Hand the wrapped protocol all the cleartext the bytes in make; a close_notify
        from the client ends the TLS session, an error fails it."""
        tls, incoming = self._tls, self._incoming
        assert tls is not None
        while not self._lost_tls:
            try:
                data = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:  # part of a record: the rest is still to come
                return
            except ssl.SSLZeroReturnError:  # close_notify, after ours
                data = b""
            except ssl.SSLError:
                self._end_tls(Failure())
                return
            if not data:  # close_notify: answered, then the TCP connection closes
                self._shutdown_tls()
                self._end_tls(None)
                return
            if not self._aborted:
                self.wrappedProtocol.dataReceived(data)
            # A read shorter than asked for took the rest of its record (a record holds 16
            # KiB at most), so only a full one may leave cleartext in OpenSSL: pending() is
            # asked then alone, not after every request's read.
            if not (incoming.pending or (len(data) == READ_SIZE and tls.pending())):
                return

    # -- to the client

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
        elif self.disconnecting and self._producer is None:
            return  # as Twisted: nothing is written after loseConnection
        elif not self._handshake_done:
            if self._early is None:
                self._early = []
            self._early.append(data)
        elif OUTBOX.open and not self._closing:
            self._held = [data]
            self._wait()
        else:
            self._encrypt(data)
            self._send_output()

    def writeSequence(self, iovec: Any) -> None:
        self.write(b"".join(iovec))

    def send_held(self) -> None:
        """Encrypt what this turn's writes hold, and send all of this turn's TLS output in
        one write to the transport (the outbox calls this when the turn is over)."""
        self._waiting = False
        self._encrypt_held()
        self._send_output()

    def _encrypt_held(self) -> None:
        held, self._held = self._held, None
        if held:
            self._encrypt(b"".join(held))

    def _encrypt(self, data: bytes) -> None:
        """Encrypt ``data``; the output stays in the memory BIO."""
        if self._lost_tls or self._tls is None:
            return
        try:
            self._tls.write(data)  # the memory BIO takes it all
        except ssl.SSLError:
            self._end_tls(Failure())

    def _flush(self) -> None:
        """Send what handling the bytes in made (a handshake flight, tickets, an alert):
        when the turn is over, or now outside a turn or once closing."""
        if self._outgoing.pending:
            if OUTBOX.open and not self._closing:
                self._wait()
            else:
                self._send_output()

    def _wait(self) -> None:
        if not self._waiting:
            self._waiting = True
            OUTBOX.waiting.append(self)

    def _send_output(self) -> None:
        """Write all the TLS output made so far to the transport, at once."""
        if self._outgoing.pending and not self._aborted and self.transport is not None:
            self.transport.write(self._outgoing.read())

    # -- closing

    def loseConnection(self) -> None:
        if self.disconnecting or not self.connected:
            return
        if not self._handshake_done and not self._early:
            # As Twisted: OpenSSL would not send close_notify before the handshake ends.
            self.abortConnection()
            return
        self.disconnecting = True
        if not self._early and self._producer is None:
            self._shutdown_tls()

    def abortConnection(self) -> None:
        self._aborted = True
        self.disconnecting = True
        self._held = self._early = None  # an aborted connection sends nothing more
        self._tcp().abortConnection()

    def _after_writes(self) -> None:
        """Once the writes before the handshake ended are encrypted: a close asked for since
        goes ahead."""
        if self.disconnecting and self._producer is None:
            self._shutdown_tls()
        else:
            self._flush()

    def _shutdown_tls(self) -> None:
        """Send close_notify after what the writes hold, and close the TCP connection once
        the client's close_notify has come too (or at once if it came first)."""
        self._encrypt_held()
        self._closing = True
        done = False
        if self._tls is not None:
            try:
                self._tls.unwrap()
                done = True
            except ssl.SSLError:  # close_notify sent, the client's still to come
                pass
        self._send_output()
        if done:
            assert self.transport is not None
            self.transport.loseConnection()

    def _end_tls(self, reason: Failure | None) -> None:
        """The TLS session is over, closed or failed: send what is left (an alert, a
        close_notify) and close. ``reason`` is for the wrapped protocol's connectionLost (None:
        the TCP connection's own)."""
        if reason is not None and isinstance(reason.value, ssl.SSLEOFError):
            reason = Failure(ConnectionLost(CLOSED_WITHOUT_NOTIFY))
        if self._reason is None:
            self._reason = reason
        self._lost_tls = True
        self._closing = True
        self._held = None
        self._send_output()
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._lost_tls and self._tls is not None:
            # What came before the end is still delivered, and the end fails the connection:
            # a close_notify would have ended the TLS session already. (The context reads
            # such an end as a close_notify, so that OpenSSL keeps the session resumable:
            # see ServerTLS.stdlib_context.)
            self._incoming.write_eof()
            if self._handshake_done:
                self._read()
            if self._reason is None:
                why = CLOSED_WITHOUT_NOTIFY if self._handshake_done else LEFT_MID_HANDSHAKE
                self._reason = Failure(ConnectionLost(why))
            self._lost_tls = True
        reason = self._reason or reason
        self._reason = None
        self._held = self._early = None
        self.connected = False
        self._tls = None
        self.factory.unregisterProtocol(self)
        self.wrappedProtocol.connectionLost(reason)
        # No reference cycle left between the two: they are freed without the collector.
        self.wrappedProtocol = None  # type: ignore[assignment]

    # -- producers, as the transport's own

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._lost_tls:
            producer.stopProducing()
            return
        self._tcp().registerProducer(producer, streaming)  # raises if one already is
        self._producer = producer

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        self._tcp().unregisterProducer()
        if self.disconnecting and not self._early:
            self._shutdown_tls()

    # -- what the connection is, and the TCP connection's own, passed on

    def _tcp(self) -> tcp.Connection:
        return cast(tcp.Connection, self.transport)

    def logPrefix(self) -> str:
        return _wrapped_prefix(self.wrappedProtocol, "TLS")

    def getPeer(self) -> Any:
        return self._tcp().getPeer()

    def getHost(self) -> Any:
        return self._tcp().getHost()

    def pauseProducing(self) -> None:
        """Stop reading from the client (the TCP connection's)."""
        self._tcp().pauseProducing()

    def resumeProducing(self) -> None:
        self._tcp().resumeProducing()

    def stopProducing(self) -> None:
        self._tcp().stopProducing()

    def getTcpNoDelay(self) -> bool:
        return bool(self._tcp().getTcpNoDelay())

    def setTcpNoDelay(self, enabled: bool) -> None:
        self._tcp().setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return bool(self._tcp().getTcpKeepAlive())

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self._tcp().setTcpKeepAlive(enabled)

    def loseWriteConnection(self) -> None:
        """The TCP connection's, as Twisted's TLS transport passes it on (it half-closes the
        TCP connection under TLS: nothing in Vespa half-closes)."""
        self._tcp().loseWriteConnection()

    def getHandle(self) -> ssl.SSLObject | None:
        """The ``ssl.SSLObject`` (Twisted's gives pyOpenSSL's ``Connection``)."""
        return self._tls

    def getPeerCertificate(self) -> bytes | None:
        """The client's certificate in DER (never asked for: None)."""
        return None if self._tls is None else self._tls.getpeercert(binary_form=True)

    @property
    def negotiatedProtocol(self) -> bytes | None:
        protocol = None if self._tls is None else self._tls.selected_alpn_protocol()
        return protocol.encode("ascii") if protocol else None


class LeanTLSFactory(WrappingFactory):
    """Wraps a listener's factory: its connections are :class:`LeanTLSProtocol`, with
    ``tls``'s settings in a Python ``ssl`` context, replaced as often as ``tls``'s (new
    ticket keys), and the wrapped factory's ALPN protocols."""

    protocol = LeanTLSProtocol  # type: ignore[assignment]  # a wrapper, not a ProtocolWrapper

    def __init__(
        self, tls: ServerTLS, wrappedFactory: IProtocolFactory, clock: IReactorTime
    ) -> None:
        super().__init__(cast(Factory, wrappedFactory))
        site = IProtocolNegotiationFactory(wrappedFactory, None)
        protocols = list(site.acceptableProtocols()) if site is not None else []
        self._contexts = Rotating(lambda: tls.stdlib_context(protocols), clock, tls.lifetime)

    def context(self) -> ssl.SSLContext:
        """The context new connections get now."""
        return self._contexts.current()

    def logPrefix(self) -> str:
        # As TLSMemoryBIOFactory: the wrapped factory's, marked (TLS).
        return _wrapped_prefix(self.wrappedFactory, "TLS")
