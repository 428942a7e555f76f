# -*- test-case-name: tests.test_sendnow -*-
"""
TCP connections that send at once. A Twisted TCP transport queues every write and sends it
on the next reactor turn, after asking epoll to watch the socket for writability and then
to stop: two ``epoll_ctl`` calls and one more pass through the loop per write. A proxy
writes once per relayed chunk (an SSE event, a response), so that was a third of the
worker's CPU with 100 streams. Here a write goes straight to the socket when nothing is
queued before it; only what the socket does not take is queued, the Twisted way, so order,
backpressure (producers paused above ``bufferSize``), TLS and closing are unchanged.

New connections are accepted by :func:`_accept_quickly` in place of ``tcp.Port.doRead``, which
sets up a log-buffering context and a generator for every accept (3 % of the worker's CPU with
100 SSE streams, a new connection each, measured side by side). Any error from ``accept`` is
left to Twisted's own loop, so running out of file descriptors is handled the Twisted way.
"""

from __future__ import annotations

import socket
from types import MethodType
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

_log = Logger()


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending at once what the socket takes when ``transport`` is
    a plain TCP connection with nothing queued."""
    rest = _unsent(transport, data) if isinstance(transport, tcp.Connection) else data
    if rest:
        transport.write(rest)


def _unsent(connection: tcp.Connection, data: bytes) -> bytes:
    """What is left of ``data`` after sending what the socket takes, when nothing is queued
    before it (order is kept) and nothing is in the way (TLS, closing). A socket that would
    block, or a broken one, takes nothing: the queued rest reports the error. One function,
    not three: it runs for every relayed chunk."""
    if not (
        data
        and connection.connected
        and not connection.TLS
        and not connection.disconnecting
        and not connection._writeDisconnecting
        and not connection._writeDisconnected
        and not connection._tempDataLen
        and connection.offset == len(connection.dataBuffer)
    ):
        return data
    try:
        sent = connection.socket.send(data)  # Python retries EINTR (PEP 475)
    except OSError:
        return data
    return data[sent:] if sent < len(data) else b""


class SendNowServer(tcp.Server):
    """An accepted TCP connection whose writes go out at once (see the module docstring)."""

    def write(self, data: bytes) -> None:
        rest = _unsent(self, data)
        if rest:
            super().write(rest)

    def writeSequence(self, iovec: Any) -> None:
        if self._tempDataLen or self.offset != len(self.dataBuffer):
            super().writeSequence(iovec)  # queued behind earlier data: no copy into one string
            return
        self.write(b"".join(iovec))


@implementer(IStreamServerEndpoint)
class SendNowEndpoint:
    """Listens like ``endpoint``; a TCP listener's connections are :class:`SendNowServer`."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(factory).addCallback(_send_now)


def _send_now(port: IListeningPort) -> IListeningPort:
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = SendNowServer
        port.doRead = MethodType(_accept_quickly, port)  # type: ignore[method-assign]
    return port


def _accept_quickly(port: tcp.Port) -> None:
    """``tcp.Port.doRead`` for the usual case: accept up to ``numberAccepts`` connections
    (scaled the Twisted way) and connect each to a protocol from the port's factory."""
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
        _connect(port, client, address)
    if accepted == port.numberAccepts:
        port.numberAccepts += 20  # more may be waiting: take more next time
    else:
        port.numberAccepts = max(1, accepted)  # no useless accept (and EAGAIN) next time


def _connect(port: tcp.Port, client: socket.socket, address: Any) -> None:
    """A protocol and a transport for an accepted socket; one that fails is logged and
    closed, and the port keeps accepting."""
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
        return
    session = port.sessionno
    port.sessionno = session + 1
    transport = port.transport(client, protocol, address, port, session, port.reactor)
    try:
        protocol.makeConnection(transport)
    except Exception:
        _log.failure("could not set up the connection from {address}", address=address)
        transport.abortConnection()


def listen_service(description: str, factory: IProtocolFactory, reactor: Any) -> IService:
    """``strports.service(description, factory)`` with a :class:`SendNowEndpoint`."""
    service = StreamServerEndpointService(
        SendNowEndpoint(serverFromString(reactor, description)), factory
    )
    service._raiseSynchronously = True  # as strports.service: a bad port fails start-up
    return service
