# -*- test-case-name: tests.test_net_listen,tests.test_cli -*-
"""
Listeners and TCP connections that send at once (the fast path; :func:`listen_service` without
it is Twisted's own ``strports.service``).

A Twisted TCP transport queues every write and sends it on the next reactor turn, after asking
epoll to watch the socket for writability and then to stop: two ``epoll_ctl`` calls and one
more pass through the loop per write, and a proxy writes once per relayed chunk (an SSE event,
a response). Here a write goes straight to the socket when nothing is queued before it; only
what the socket does not take is queued, the Twisted way, so order, backpressure (producers
paused above ``bufferSize``), TLS and closing are unchanged.

New connections are accepted by :func:`_accept_quickly` in place of ``tcp.Port.doRead``, which
sets up a log-buffering context and a generator for every accept. Any error from ``accept`` is
left to Twisted's own loop, so running out of file descriptors is handled the Twisted way.

On Linux the listening socket is set up as nginx's ``listen ... deferred``: the kernel hands
over a connection once its first bytes are in (``TCP_DEFER_ACCEPT``; an HTTP client speaks
first), and those bytes are read in the same turn of the reactor that accepted it, instead of
one more turn (an ``epoll_wait``, often a wake-up) later. A client that connects and sends
nothing waits in the kernel, not in the worker. ``TCP_NODELAY`` is set on the listening socket
too: accepted sockets inherit it, which saves a system call per connection.

Twisted private names it relies on (checked by :mod:`vast_vespa.net.guard`): a TCP connection's
send queue (``_tempDataLen``, ``dataBuffer``, ``offset``) and closing state
(``_writeDisconnecting``, ``_writeDisconnected``); ``tcp.Port``'s ``_buildAddr``, ``transport``
and ``sessionno``, and its ``doRead`` replaced on the listening port; the epoll reactor's
``_reads`` (through :mod:`vast_vespa.net.dispatch`); ``StreamServerEndpointService``'s
``_raiseSynchronously`` (a bad port fails start-up, as ``strports.service`` does).

:func:`listen_service` starts every Vespa listener as ``strports.service`` does (on stock
Twisted, it is ``strports.service``), and tells a port that cannot be had in one line naming the
flag to change (:class:`ListenFailed`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from vast_vespa.net.dispatch import OUTBOX, read_ready
from vast_vespa.net.lean_tls import LeanTLSFactory
from vast_vespa.net.tls import server_tls

_log = Logger()
# Seconds the kernel holds a connection with no bytes from the client yet (Linux only).
DEFER_ACCEPT = 1
_TCP_DEFER_ACCEPT: int | None = getattr(socket, "TCP_DEFER_ACCEPT", None)


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending at once what the socket takes when ``transport`` is
    a plain TCP connection with nothing queued."""
    rest = _unsent(transport, data) if isinstance(transport, tcp.Connection) else data
    if rest:
        transport.write(rest)


def _unsent(connection: tcp.Connection, data: bytes) -> bytes:
    """What is left of ``data`` after sending what the socket takes, when nothing is queued
    before it (order is kept) and nothing is in the way (TLS, closing). A socket that would
    block, or a broken one, takes nothing: the queued rest reports the error."""
    if not (data and _clear(connection)):
        return data
    try:
        sent = connection.socket.send(data)  # Python retries EINTR (PEP 475)
    except OSError:
        return data
    return data[sent:] if sent < len(data) else b""


def _clear(connection: tcp.Connection) -> bool:
    """Whether a write on ``connection`` may skip Twisted's queue: it is open, plain TCP, not
    closing, and has nothing queued."""
    return bool(
        connection.connected
        and not connection.TLS
        and not connection.disconnecting
        and not connection._writeDisconnecting
        and not connection._writeDisconnected
        and not connection._tempDataLen
        and connection.offset == len(connection.dataBuffer)
    )


class SendNowServer(tcp.Server):
    """An accepted TCP connection whose writes go out at once (see the module docstring), or,
    while the reactor dispatches a turn's events, together when the turn is over
    (:class:`vast_vespa.net.dispatch.Outbox`)."""

    # Writes waiting for the end of the turn: the first alone (most turns write once to a
    # connection, an SSE event), then a list of them in order.
    _held: bytes | list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None and OUTBOX.open and data and _clear(self):
            # Held only with nothing queued and no close begun: Twisted's own doWrite, later
            # in the same turn, then has nothing to send or close before this is sent.
            self._held = data
            OUTBOX.waiting.append(self)
        else:
            self.write_now(data)

    def write_now(self, data: bytes) -> None:
        """Write ``data`` without holding it for the end of the turn (behind writes held
        already, to keep their order): for a streamed body's chunks, which come one per turn
        (an SSE event per backend read), so that holding them would gather nothing."""
        held = self._held
        if held is not None:
            if held.__class__ is list:
                held.append(data)
            else:
                self._held = [cast(bytes, held), data]
        else:
            rest = _unsent(self, data)
            if rest:
                super().write(rest)

    def writeSequence(self, iovec: Any) -> None:
        if self._held is None and (self._tempDataLen or self.offset != len(self.dataBuffer)):
            super().writeSequence(iovec)  # queued behind earlier data: no copy into one string
            return
        self.write(b"".join(iovec))

    def send_held(self) -> None:
        """Send (or queue the Twisted way) what this connection's writes hold. Nothing was
        queued when the first was held and every write since joined it, so only a connection
        lost or shut for writing meanwhile keeps it from the socket (a close begun in the turn
        waits for the queue, which stays empty: the close follows the send)."""
        held, self._held = self._held, None
        if held is None:
            return
        data = b"".join(held) if held.__class__ is list else cast(bytes, held)
        if self.connected and not self._writeDisconnected:
            try:
                data = data[self.socket.send(data) :]
            except OSError:
                pass  # would block, or broken: the queued data reports the error
        if data:
            super().write(data)

    def abortConnection(self) -> None:
        self._held = None  # an aborted connection sends nothing more
        super().abortConnection()


class SendNowNoDelayServer(SendNowServer):
    """A :class:`SendNowServer` accepted from a listening socket with ``TCP_NODELAY``, which
    it has inherited (Linux)."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        if not enabled:
            super().setTcpNoDelay(enabled)


@implementer(IStreamServerEndpoint)
class SendNowEndpoint:
    """Listens like ``endpoint``; a TCP listener's connections are :class:`SendNowServer`."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(factory).addCallback(_send_now)


def _send_now(port: IListeningPort) -> IListeningPort:
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        deferred = _defer_accept(port.socket)
        port.transport = SendNowNoDelayServer if deferred else SendNowServer
        read_first = deferred and isinstance(port.reactor, EPollReactor)
        port.doRead = partial(_accept_quickly, port, read_first)  # type: ignore[method-assign]
    return port


def _defer_accept(listening: socket.socket) -> bool:
    """Set ``TCP_DEFER_ACCEPT`` and ``TCP_NODELAY`` on a listening socket; whether it could
    be (Linux)."""
    if _TCP_DEFER_ACCEPT is None:
        return False
    try:
        listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listening.setsockopt(socket.IPPROTO_TCP, _TCP_DEFER_ACCEPT, DEFER_ACCEPT)
    except OSError:
        return False
    return True


def _accept_quickly(port: tcp.Port, read_first: bool = False) -> None:
    """``tcp.Port.doRead`` for the usual case: accept up to ``numberAccepts`` connections
    (scaled the Twisted way) and connect each to a protocol from the port's factory; with
    ``read_first``, read what the client sent at once."""
    accepted = 0
    for _ in range(port.numberAccepts):
        try:
            client, address = port.socket.accept()
        except BlockingIOError:
            break
        except OSError:
            tcp.Port.doRead(port)  # EMFILE, EPERM, ...: Twisted's own handling and logging
            return
        accepted += 1
        transport = _connect(port, client, address)
        if read_first and transport is not None:
            reactor = cast(EPollReactor, port.reactor)
            if client.fileno() in reactor._reads:  # unless the protocol stopped reading
                read_ready(reactor, transport)
    if accepted == port.numberAccepts:
        port.numberAccepts += 20  # more may be waiting: take more next time
    else:
        port.numberAccepts = max(1, accepted)  # no useless accept (and EAGAIN) next time


def _connect(port: tcp.Port, client: socket.socket, address: Any) -> tcp.Server | None:
    """A protocol and a transport for an accepted socket, which is returned; one that fails
    is logged and closed, and the port keeps accepting."""
    if len(address) == 4:  # IPv6: the host with its scope id, as Twisted writes it
        host, _ = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        address = (host, *address[1:])
    factory = port.factory
    assert factory is not None  # set while the port listens
    try:
        protocol = factory.buildProtocol(port._buildAddr(address))
    except Exception:
        _log.failure("could not build a protocol for {address}", address=address)
        protocol = None
    if protocol is None:
        client.close()
        return None
    session = port.sessionno
    port.sessionno = session + 1
    transport = port.transport(client, protocol, address, port, session, port.reactor)
    try:
        protocol.makeConnection(transport)
    except Exception:
        _log.failure("could not set up the connection from {address}", address=address)
        transport.abortConnection()
        return None
    return transport


class ListenFailed(SystemExit, CannotListenError):
    """
    A listener could not start, in one line for the user: ``vespa: cannot listen on tcp:3000:
    address already in use (set --listen / LISTEN)``.

    A :class:`SystemExit`, so that the process ends with that line and no traceback (twistd,
    ``react``), and a :class:`CannotListenError`, so that what cleans up after an ``Exception``
    still does (twistd's pid file and a daemon's start-up report; the sandbox's stop).
    """

    def __init__(self, program: str, description: str, reason: str, setting: str) -> None:
        CannotListenError.__init__(self, None, description, reason)
        self.program = program
        self.description = description
        self.reason = reason
        self.setting = setting
        self.code = f"{program}: cannot listen on {description}: {reason} (set {setting})"
        self.args = (self.code,)

    def __str__(self) -> str:
        return str(self.code)


class _Listener(Service):
    """Starts the listening service it wraps, turning a port that cannot be had into
    :class:`ListenFailed`."""

    def __init__(self, listening: IService, description: str, program: str, setting: str) -> None:
        self.listening = listening
        self.description = description
        self.program = program
        self.setting = setting

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._start(self.listening.privilegedStartService)

    def startService(self) -> None:
        super().startService()
        self._start(self.listening.startService)

    def _start(self, start: Callable[[], None]) -> None:
        try:
            start()
        except CannotListenError as e:
            raise ListenFailed(
                self.program, self.description, _reason(e.socketError), self.setting
            ) from None

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        stopped: Deferred[None] | None = self.listening.stopService()
        return stopped


def _reason(error: object) -> str:
    """Why a socket could not listen, in a few words: ``address already in use``."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return str(error)


def listen_service(
    description: str,
    factory: IProtocolFactory,
    reactor: Any,
    program: str,
    setting: str,
    *,
    fast_path: bool,
) -> IService:
    """
    ``strports.service(description, factory)``; with the fast path, through a
    :class:`SendNowEndpoint`. An ``ssl:`` description is served by
    :func:`vast_vespa.net.tls.server_tls` (session resumption, current ciphers), with the fast
    path through :class:`vast_vespa.net.lean_tls.LeanTLSFactory`. If it cannot
    listen, starting it raises :class:`ListenFailed` naming ``program`` and the ``setting`` to
    change (``--listen / LISTEN``).
    """
    endpoint = description
    tls = server_tls(description, reactor)
    if tls is not None:
        endpoint, creator = tls
        if fast_path:
            factory = LeanTLSFactory(creator, factory, reactor)
        else:
            factory = TLSMemoryBIOFactory(creator, False, factory, reactor)
    if fast_path:
        listening = StreamServerEndpointService(
            SendNowEndpoint(serverFromString(reactor, endpoint)), factory
        )
        listening._raiseSynchronously = True  # as strports.service: a bad port fails start-up
    else:
        listening = strports.service(endpoint, factory, reactor=reactor)
    return _Listener(listening, description, program, setting)
