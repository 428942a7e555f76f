# -*- test-case-name: tests.test_net_splice -*-
"""
Big bodies moved from socket to socket inside the kernel (Linux ``splice(2)`` through a
pipe), never copied into the worker.

Relaying a big download, the worker spends its CPU on two copies per byte, into Python from
the backend socket and back out to the client socket. Spliced, the kernel hands the same pages
from one socket to the other. :class:`Splice` does this for the
rest of a body of known length between two plain TCP transports, reading only while the
pipe can be emptied into the client (so backpressure is the kernel's: nothing is buffered
in the worker), and gives both transports back to Twisted when the body has gone.

While it runs, the two transports' ``doRead`` (backend) and ``doWrite`` (client) are this
splice's; an error on the backend socket is returned to Twisted as a lost connection, so
the backend connection ends the usual way. Where ``splice(2)`` turns out not to work between
sockets (EINVAL, ENOSYS or EOPNOTSUPP before the first byte went: gVisor, unusual kernels),
it is logged once, that body and every later one go the usual way, and nothing is lost.

Twisted private names it relies on (checked by :mod:`vast_vespa.net.guard`): a TCP connection's
send queue (``_tempDataLen``, ``dataBuffer``, ``offset``), and its ``doRead`` and ``doWrite``,
replaced on the two live transports while a body is spliced. Used with the fast path only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import main, tcp
from twisted.logger import Logger

from vast_vespa.net.listen import SendNowServer

# Bodies with at least this much still to come are spliced (a pipe costs a few system calls).
SPLICE_MIN = 256 * 1024
PIPE_SIZE = 1 << 20  # asked for; Linux's default limit for an unprivileged process
_F_SETPIPE_SZ = 1031
_splice: Callable[..., int] | None = getattr(os, "splice", None)  # Linux, Python 3.10+
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
# What splice(2) answers where it cannot join two sockets; after one, no body is spliced.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_supported = True
_log = Logger()


def _give_up(error: OSError) -> None:
    global _supported
    if _supported:
        _supported = False
        _log.warn(
            "splice(2) does not work between sockets here ({error}): big bodies are copied "
            "through the worker instead",
            error=error,
        )


def can_splice(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP connection (no TLS) on a system with splice."""
    return bool(
        _splice is not None
        and _supported
        and isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
    )


def has_unsent(transport: tcp.Connection) -> bool:
    """Whether Twisted still holds bytes to send on ``transport`` (they must go first), once
    what its writes hold for the end of the reactor's turn is sent."""
    if isinstance(transport, SendNowServer):
        transport.send_held()
    return bool(transport._tempDataLen or transport.offset != len(transport.dataBuffer))


class Splice:
    """
    Moves ``length`` bytes (given to :meth:`start`) from ``source`` to ``sink`` (plain TCP
    transports, see :func:`can_splice`), calling ``moved(n)`` as bytes reach the sink and
    ``done()`` once all have. If the sink fails (the client went away), its connection is
    aborted, so that it ends the way any client that leaves does (the caller hears of it from
    the client's side, and cuts the backend call). Where splice does not work,
    ``unsupported(taken)`` is called instead, with the bytes already taken from the source
    (none, or what was in the pipe), and the transports are Twisted's again. :meth:`stop`
    gives the transports back at any time, without calls.
    """

    def __init__(
        self,
        source: tcp.Connection,
        sink: tcp.Connection,
        moved: Callable[[int], object],
        done: Callable[[], object],
        unsupported: Callable[[bytes], object],
    ) -> None:
        self._source = source
        self.sink = sink
        self._left = 0  # still to read from the source
        self._in_pipe = 0
        self._moved = moved
        self._done = done
        self._unsupported = unsupported
        self._length = 0
        self._waiting_for_sink = False
        self._pipe: tuple[int, int] | None = None
        self.started = False

    def start(self, length: int) -> None:
        """Move ``length`` bytes (once: a splice that has started is never started again)."""
        self._left = self._length = length
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.started = True
        self._pipe = (read_end, write_end)
        with contextlib.suppress(OSError):  # a smaller pipe only means more system calls
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        self._source.doRead = self._readable  # type: ignore[method-assign]
        self._source.startReading()

    def stop(self) -> None:
        """Give both transports back to Twisted and close the pipe (idempotent)."""
        if self._pipe is None:
            return
        for end in self._pipe:
            os.close(end)
        self._pipe = None
        if self._source.__dict__.get("doRead") == self._readable:
            del self._source.doRead
        if self.sink.__dict__.get("doWrite") == self._writable:
            del self.sink.doWrite
            if self.sink.connected:
                self.sink.stopWriting()

    def _readable(self) -> Any:
        """The backend socket has data: into the pipe, and on into the client socket."""
        assert self._pipe is not None and _splice is not None
        try:
            count = _splice(
                self._source.fileno(), self._pipe[1], min(self._left, PIPE_SIZE), flags=_FLAGS
            )
        except BlockingIOError:
            return None
        except OSError as error:
            if error.errno in _UNSUPPORTED and self._left == self._length:
                self._fall_back(error, b"")
                return None
            return main.CONNECTION_LOST  # as Twisted's doRead: the connection ends as lost
        if count == 0:
            return main.CONNECTION_DONE  # the backend closed before the end of the body
        self._left -= count
        self._in_pipe += count
        self._drain()
        return None

    def _writable(self) -> None:
        """The client socket has room again."""
        self._drain()

    def _drain(self) -> None:
        while self._in_pipe:
            assert self._pipe is not None and _splice is not None
            try:
                count = _splice(self._pipe[0], self.sink.fileno(), self._in_pipe, flags=_FLAGS)
            except BlockingIOError:
                if not self._waiting_for_sink:  # read no more until the client takes this
                    self._waiting_for_sink = True
                    self._source.stopReading()
                    self.sink.doWrite = self._writable  # type: ignore[method-assign]
                    self.sink.startWriting()
                return
            except OSError as error:
                if error.errno in _UNSUPPORTED and self._left + self._in_pipe == self._length:
                    self._fall_back(error, self._empty_pipe())
                    return
                # EPIPE, ECONNRESET: the client is gone
                self.stop()
                self._source.stopReading()  # nothing more to read for it
                self.sink.abortConnection()
                return
            self._in_pipe -= count
            self._moved(count)
        if self._waiting_for_sink:
            self._waiting_for_sink = False
            del self.sink.doWrite
            self.sink.stopWriting()
            self._source.startReading()
        if not self._left:
            self.stop()
            self._done()

    def _empty_pipe(self) -> bytes:
        """What is in the pipe, read out of it."""
        assert self._pipe is not None
        taken = b""
        while len(taken) < self._in_pipe:
            taken += os.read(self._pipe[0], self._in_pipe - len(taken))
        return taken

    def _fall_back(self, error: OSError, taken: bytes) -> None:
        _give_up(error)
        waiting = self._waiting_for_sink
        self.stop()
        if waiting:
            self._source.startReading()
        self._unsupported(taken)
