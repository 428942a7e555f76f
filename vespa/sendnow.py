# -*- test-case-name: tests.test_sendnow -*-
"""
TCP connections that send at once. A Twisted TCP transport queues every write and sends it
on the next reactor turn, after asking epoll to watch the socket for writability and then
to stop: two ``epoll_ctl`` calls and one more pass through the loop per write. A proxy
writes once per relayed chunk (an SSE event, a response), so that was a third of the
worker's CPU with 100 streams. Here a write goes straight to the socket when nothing is
queued before it; only what the socket does not take is queued, the Twisted way, so order,
backpressure (producers paused above ``bufferSize``), TLS and closing are unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer


def send_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending at once what the socket takes when ``transport`` is
    a plain TCP connection with nothing queued."""
    rest = _unsent(transport, data) if isinstance(transport, tcp.Connection) else data
    if rest:
        transport.write(rest)


def _can_send_now(connection: tcp.Connection) -> bool:
    """Nothing queued before (order is kept) and nothing in the way (TLS, closing)."""
    return bool(
        connection.connected
        and not connection.TLS
        and not connection.disconnecting
        and not connection._writeDisconnecting
        and not connection._writeDisconnected
        and not connection._tempDataLen
        and connection.offset == len(connection.dataBuffer)
    )


def _unsent(connection: tcp.Connection, data: bytes) -> bytes:
    """What is left of ``data`` after sending what the socket takes, if it can send now."""
    if data and _can_send_now(connection):
        return _send_some(connection, data)
    return data


def _send_some(connection: tcp.Connection, data: bytes) -> bytes:
    """Send what the socket takes of ``data`` (nothing may be queued); what is left. A socket
    that would block, or a broken one, takes nothing: the queued rest reports the error."""
    try:
        sent = connection.socket.send(data)  # Python retries EINTR (PEP 475)
    except OSError:
        return data
    return data[sent:] if sent < len(data) else b""


class SendNowServer(tcp.Server):
    """An accepted TCP connection whose writes go out at once (see the module docstring)."""

    def write(self, data: bytes) -> None:
        if data and _can_send_now(self):
            data = _send_some(self, data)
        if data:
            super().write(data)

    def writeSequence(self, iovec: Any) -> None:
        if not _can_send_now(self):
            super().writeSequence(iovec)  # queued behind earlier data: no copy into one string
            return
        rest = _send_some(self, b"".join(iovec))
        if rest:
            super().write(rest)


@implementer(IStreamServerEndpoint)
class SendNowEndpoint:
    """Listens like ``endpoint``; a TCP listener's connections are :class:`SendNowServer`."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(factory).addCallback(_send_now)


def _send_now(port: IListeningPort) -> IListeningPort:
    if getattr(port, "transport", None) is tcp.Server:
        port.transport = SendNowServer  # type: ignore[attr-defined]
    return port


def listen_service(description: str, factory: IProtocolFactory, reactor: Any) -> IService:
    """``strports.service(description, factory)`` with a :class:`SendNowEndpoint`."""
    service = StreamServerEndpointService(
        SendNowEndpoint(serverFromString(reactor, description)), factory
    )
    service._raiseSynchronously = True  # as strports.service: a bad port fails start-up
    return service
