# -*- test-case-name: tests.test_net_dispatch -*-
"""
Socket events dispatched without a logging context each (the fast path).

Twisted's epoll reactor calls every ready socket inside ``log.callWithLogger``, which builds a
logging context (a dict copy and five nested calls) so that legacy ``log.msg`` lines written
during the call carry the connection as their system. A proxy handles a socket event per
relayed chunk; :func:`lean_event_dispatch` dispatches without that context. Errors are still
logged, with the same tracebacks; only legacy log lines lose their ``[Protocol,fd,peer]``
prefix (Vespa's own lines use ``twisted.logger`` namespaces and are unchanged).

While it dispatches a turn's events, writes on the fast path's connections (to clients and to
backends) wait in :data:`OUTBOX` and leave when the turn is over (see :class:`Outbox`).

Twisted private names it relies on (checked by :mod:`vast_vespa.net.guard`): the epoll
reactor's ``_poller``, ``_selectables``, ``_doReadOrWrite`` and ``_disconnectSelectable``, and
``posixbase._NO_FILEDESC``; its ``doIteration`` is replaced on the running reactor.
"""

from __future__ import annotations

import errno
from select import EPOLLERR, EPOLLHUP, EPOLLIN
from types import MethodType
from typing import Any, Protocol

from twisted.internet import tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger

_log = Logger()
# An event that says the other end hung up or the connection failed.
_HUNG_UP = EPOLLHUP | EPOLLERR


class Holding(Protocol):
    """A connection that holds its writes while :data:`OUTBOX` is open."""

    def send_held(self) -> None: ...


class Outbox:
    """
    Writes held while the reactor dispatches one turn's events, sent when the turn is over.

    A connection that writes several times in a turn (a head and a body, a chunked body's end,
    the answers to pipelined requests) then makes one system call, and the answers of a busy
    turn leave together, as Twisted's queued writes do, but without asking epoll to watch each
    socket for writability and then to stop. The requests a turn makes to backends wait too
    (``vast_vespa.net.client``): sent together, they are answered together. Writes made
    outside a turn (timers) leave at once, and so do a streamed body's chunks once its head is
    out (``SendNowServer.write_now``: they come one per turn, so holding them would gather
    nothing).
    """

    def __init__(self) -> None:
        self.open = False
        self.waiting: list[Holding] = []

    def send_all(self) -> None:
        """Close the outbox and send what every waiting connection holds."""
        self.open = False
        waiting, self.waiting = self.waiting, []
        for connection in waiting:
            try:
                connection.send_held()
            except Exception:
                _log.failure("error sending to {connection!r}", connection=connection)


OUTBOX = Outbox()


def lean_event_dispatch(reactor: Any) -> bool:
    """Make ``reactor`` (Twisted's epoll reactor; others are left alone) dispatch socket
    events without a logging context per event. Returns whether it did."""
    if not isinstance(reactor, EPollReactor):
        return False
    reactor.doIteration = MethodType(_poll_and_dispatch, reactor)  # type: ignore[method-assign]
    return True


def _poll_and_dispatch(self: EPollReactor, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` without ``log.callWithLogger`` around each event; input alone
    (nearly every event: a relayed chunk, a request) goes straight to ``doRead``. Writes made
    meanwhile leave when all the events are dispatched (:class:`Outbox`); then the clients'
    connections that ended in the turn are torn down (:func:`_end_client_connections`)."""
    try:
        ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    dispatch = self._doReadOrWrite  # catches and logs what a protocol raises
    selectables = self._selectables
    ended: list[tuple[int, Any, int, Any]] | None = None
    OUTBOX.open = True
    try:
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                if event == EPOLLIN:
                    why = _read(selectable)
                    if not why:
                        continue
                elif event & _HUNG_UP:
                    why = None
                else:
                    dispatch(selectable, fd, event)
                    continue
                if isinstance(selectable, tcp.Server):  # a client's: after the turn's sends
                    if ended is None:
                        ended = []
                    ended.append((fd, selectable, event, why))
                else:
                    _end(self, fd, selectable, event, why)
            except Exception:
                _log.failure("error dispatching an event for {selectable!r}", selectable=selectable)
    finally:
        if OUTBOX.waiting:
            OUTBOX.send_all()
        else:  # most turns of a streaming worker: a chunk relayed at once, nothing held
            OUTBOX.open = False
    if ended is not None:
        _end_client_connections(self, ended)


def _end_client_connections(reactor: EPollReactor, ended: list[tuple[int, Any, int, Any]]) -> None:
    """Tear down the clients' connections that ended in this turn, after its other events and
    its sends: a closed connection's teardown is the longest step of a connection's life
    (its protocol, the request's bookkeeping, the socket), and a client that ends one stream
    and opens the next has both in one turn, where the new request would wait for it. Each
    is an ``(fd, connection, event, why)``: a read that said the connection is over (``why``),
    or an event that says the client hung up, dispatched now. A connection no longer
    registered under its descriptor was dropped meanwhile (aborted: its end is on its way)
    or stopped reading (paused: the end is seen again when it reads again), and is left."""
    selectables = reactor._selectables
    for fd, selectable, event, why in ended:
        if selectables.get(fd) is not selectable:
            continue
        try:
            _end(reactor, fd, selectable, event, why)
        except Exception:
            _log.failure("error ending {selectable!r}", selectable=selectable)


def _end(reactor: EPollReactor, fd: int, selectable: Any, event: int, why: Any) -> None:
    """End a connection as its event said: disconnect it for what its read returned
    (``why``), or have Twisted's dispatch read what a hang-up event left and end it."""
    if why:
        reactor._disconnectSelectable(selectable, why, True)
    else:
        reactor._doReadOrWrite(selectable, fd, event)


def read_ready(reactor: EPollReactor, selectable: Any) -> None:
    """What ``_doReadOrWrite`` does for an input event, in one call: read, and disconnect the
    selectable when the read says it is over or raises (logged with its traceback)."""
    why = _read(selectable)
    if why:
        reactor._disconnectSelectable(selectable, why, True)


def _read(selectable: Any) -> Any:
    """``selectable.doRead()`` as ``_doReadOrWrite`` calls it: what says the connection is
    over (what the read returned or raised, or that its descriptor is gone), None if not."""
    try:
        return _NO_FILEDESC if selectable.fileno() == -1 else selectable.doRead()
    except BaseException as error:  # as Twisted: whatever a protocol raises drops its connection
        _log.failure("error reading from {selectable!r}", selectable=selectable)
        return error
