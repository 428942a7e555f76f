"""Process-wide settings of the twistd processes: the garbage collector after start-up, and
the event loop's dispatch."""

from __future__ import annotations

import subprocess
import sys
from select import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT
from typing import Any, cast

from twisted.internet import tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.net.dispatch import OUTBOX, _poll_and_dispatch, lean_event_dispatch, read_ready
from vast_vespa.runtime import YOUNG_THRESHOLD, settle_gc, tune_once_running


class SettleGCTests(SynchronousTestCase):
    def test_freezes_and_raises_threshold(self) -> None:
        """In a fresh interpreter (not this test process): start-up objects are frozen and
        young collections come less often; collection still works."""
        code = (
            "import gc; from vast_vespa.runtime import settle_gc; settle_gc(); "
            "a = []; a.append(a); del a; "
            "print(gc.get_threshold()[0], gc.get_freeze_count() > 0, gc.collect() >= 1)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(out.stdout.split(), [str(YOUNG_THRESHOLD), "True", "True"], out.stderr)

    def test_once_running(self) -> None:
        """The worker and client ask for it when the reactor starts, after twistd built them
        (and leave a reactor other than epoll's dispatching as it does)."""
        reactor = MemoryReactor()
        tune_once_running(reactor)
        self.assertEqual([hook[0] for hook in reactor.whenRunningHooks], [settle_gc])


_ECHO_WITH_A_BUG = """
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import protocol, reactor
from twisted.logger import globalLogBeginner
from vast_vespa.net.dispatch import lean_event_dispatch

errors = []
globalLogBeginner.beginLoggingTo(
    [lambda e: errors.append(e) if e.get("log_failure") or e.get("isError") else None], redirectStandardIO=False
)
applied = lean_event_dispatch(reactor)

class Echo(protocol.Protocol):
    def dataReceived(self, data):
        if data == b"boom":
            raise ValueError("a bug in a protocol")
        self.transport.write(data)

class Client(protocol.Protocol):
    got = b""
    def connectionMade(self):
        self.transport.write(b"ping")
    def dataReceived(self, data):
        Client.got += data
        self.transport.write(b"boom")
    def connectionLost(self, reason):
        reactor.stop()

port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", port.getHost().port)
reactor.callLater(10, reactor.stop)
reactor.run()
bug = [e for e in errors if "a bug in a protocol" in str(e.get("log_failure") or e.get("log_text"))]
print(applied, Client.got.decode(), len(bug))
"""


class LeanDispatchTests(SynchronousTestCase):
    def test_epoll_reactor_dispatches_and_logs_errors(self) -> None:
        """In a fresh interpreter running Twisted's epoll reactor with lean dispatch: data
        flows both ways, and a protocol that raises is logged and its connection dropped."""
        out = subprocess.run(
            [sys.executable, "-c", _ECHO_WITH_A_BUG], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(out.stdout.split(), ["True", "ping", "1"], out.stderr)

    def test_other_reactors_are_left_alone(self) -> None:
        reactor = MemoryReactor()
        self.assertFalse(lean_event_dispatch(reactor))
        self.assertNotIn("doIteration", vars(reactor))


class _Selectable:
    def __init__(self, fileno: int, read: object) -> None:
        self._fileno = fileno
        self._read = read

    def fileno(self) -> int:
        return self._fileno

    def doRead(self) -> Any:
        return self._read


class _Reactor:
    def __init__(self) -> None:
        self.disconnected: list[tuple[object, object, bool]] = []
        self.steps: list[str] = []  # what the turn did, in order

    def _disconnectSelectable(self, selectable: object, why: object, is_read: bool) -> None:
        self.disconnected.append((selectable, why, is_read))
        self.steps.append(f"disconnect {selectable} (outbox open: {OUTBOX.open})")

    def _doReadOrWrite(self, selectable: object, fd: int, event: int) -> None:
        self.steps.append(f"event {event:#x} of {selectable} (outbox open: {OUTBOX.open})")


class ReadEventTests(SynchronousTestCase):
    """An input event goes straight to doRead; the outcomes _doReadOrWrite gives it."""

    def test_read_that_goes_on(self) -> None:
        reactor, selectable = _Reactor(), _Selectable(7, None)
        read_ready(reactor, selectable)  # type: ignore[arg-type]
        self.assertEqual(reactor.disconnected, [])

    def test_read_that_ends_the_connection(self) -> None:
        reactor, selectable = _Reactor(), _Selectable(7, CONNECTION_DONE)
        read_ready(reactor, selectable)  # type: ignore[arg-type]
        self.assertEqual(reactor.disconnected, [(selectable, CONNECTION_DONE, True)])

    def test_descriptor_gone(self) -> None:
        reactor, selectable = _Reactor(), _Selectable(-1, None)
        read_ready(reactor, selectable)  # type: ignore[arg-type]
        self.assertEqual(reactor.disconnected, [(selectable, _NO_FILEDESC, True)])


class _Poller:
    def __init__(self, ready: list[tuple[int, int]]) -> None:
        self.ready = ready

    def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
        return self.ready


class _Holding:
    """A connection that writes during the turn (its read) and holds it, as the fast path's
    connections do while the outbox is open."""

    def __init__(self) -> None:
        self.sent: list[bool] = []  # whether the outbox was still open when it was sent

    def fileno(self) -> int:
        return 7

    def doRead(self) -> None:
        assert OUTBOX.open  # the read is dispatched with the outbox open
        OUTBOX.waiting.append(self)

    def send_held(self) -> None:
        self.sent.append(OUTBOX.open)


class _RecordingHolding(_Holding):
    """A :class:`_Holding` that notes its read and its send in the reactor's steps."""

    def __init__(self, reactor: _Reactor) -> None:
        super().__init__()
        self.steps = reactor.steps

    def doRead(self) -> None:
        self.steps.append("read of a request")
        super().doRead()

    def send_held(self) -> None:
        self.steps.append("the request's write sent")
        super().send_held()


class _ClientConnection(_Selectable, tcp.Server):
    """A client's connection (an accepted one, a ``tcp.Server``) whose read returns what it
    was given; nothing of a real connection is made."""

    def __str__(self) -> str:
        return f"client {self._fileno}"


class _BackendConnection(_Selectable):
    """A backend connection (not a ``tcp.Server``)."""

    def __str__(self) -> str:
        return f"backend {self._fileno}"


class TurnTests(SynchronousTestCase):
    """A turn of the fast path's loop: the outbox is open while its events are dispatched,
    and closed when it is over, with what was held sent then."""

    def turn(
        self,
        ready: list[tuple[int, int]],
        selectables: dict[int, object],
        reactor: _Reactor | None = None,
    ) -> _Reactor:
        self.addCleanup(OUTBOX.waiting.clear)
        self.addCleanup(setattr, OUTBOX, "open", False)
        reactor = reactor or _Reactor()
        reactor._poller = _Poller(ready)  # type: ignore[attr-defined]
        reactor._selectables = selectables  # type: ignore[attr-defined]
        _poll_and_dispatch(reactor, 0)  # type: ignore[arg-type]
        return reactor

    def test_what_a_turn_holds_is_sent_when_it_is_over(self) -> None:
        connection = _Holding()
        self.turn([(7, EPOLLIN)], {7: connection})
        self.assertEqual(connection.sent, [False])
        self.assertFalse(OUTBOX.open)
        self.assertEqual(OUTBOX.waiting, [])

    def test_a_turn_that_holds_nothing_closes_the_outbox(self) -> None:
        """Writes made after it (timers) then leave at once instead of waiting for a turn."""
        self.turn([(7, EPOLLIN)], {7: _Selectable(7, None)})
        self.assertFalse(OUTBOX.open)
        self.turn([], {})
        self.assertFalse(OUTBOX.open)

    def test_a_client_that_hung_up_is_ended_after_the_turns_sends(self) -> None:
        """A client's connection that hung up (an event with EPOLLHUP or EPOLLERR) comes
        first in the turn, but the request read after it is sent to its backend first, and the
        connection is torn down once the turn's writes are out (the outbox closed)."""
        reactor = _Reactor()
        gone = _ClientConnection(5, None)
        request = _RecordingHolding(reactor)
        event = EPOLLIN | EPOLLERR | EPOLLHUP
        self.turn([(5, event), (7, EPOLLIN)], {5: gone, 7: request}, reactor)
        self.assertEqual(
            reactor.steps,
            [
                "read of a request",
                "the request's write sent",
                f"event {event:#x} of client 5 (outbox open: False)",
            ],
        )

    def test_a_client_whose_read_ends_it_is_ended_after_the_turns_sends(self) -> None:
        """A client's connection whose read says it is over (the client closed) is
        disconnected after the turn's other events and sends, with the read's reason."""
        reactor = _Reactor()
        closed = _ClientConnection(5, CONNECTION_DONE)
        request = _RecordingHolding(reactor)
        self.turn([(5, EPOLLIN), (7, EPOLLIN)], {5: closed, 7: request}, reactor)
        self.assertEqual(
            reactor.steps,
            [
                "read of a request",
                "the request's write sent",
                "disconnect client 5 (outbox open: False)",
            ],
        )
        self.assertEqual(reactor.disconnected, [(closed, CONNECTION_DONE, True)])

    def test_a_backend_connection_that_ends_is_ended_at_once(self) -> None:
        """A backend connection's end is handled where its event comes, as Twisted does: the
        pool must not hand it to a request read later in the same turn."""
        reactor = _Reactor()
        closed, hung_up = _BackendConnection(5, CONNECTION_LOST), _BackendConnection(6, None)
        request = _RecordingHolding(reactor)
        event = EPOLLIN | EPOLLHUP
        self.turn(
            [(5, EPOLLIN), (6, event), (7, EPOLLIN)], {5: closed, 6: hung_up, 7: request}, reactor
        )
        self.assertEqual(
            reactor.steps,
            [
                "disconnect backend 5 (outbox open: True)",
                f"event {event:#x} of backend 6 (outbox open: True)",
                "read of a request",
                "the request's write sent",
            ],
        )

    def test_other_events_are_dispatched_where_they_come(self) -> None:
        """An event that is neither input alone nor a hang-up (a socket ready for writing) is
        Twisted's to dispatch, at once."""
        reactor = _Reactor()
        writable = _ClientConnection(5, None)
        request = _RecordingHolding(reactor)
        self.turn([(5, EPOLLOUT), (7, EPOLLIN)], {5: writable, 7: request}, reactor)
        self.assertEqual(
            reactor.steps,
            [
                f"event {EPOLLOUT:#x} of client 5 (outbox open: True)",
                "read of a request",
                "the request's write sent",
            ],
        )

    def test_a_connection_dropped_since_is_not_ended_again(self) -> None:
        """A client's connection that ended, then was dropped later in the turn (aborted, or
        paused: no longer registered under its descriptor, or another connection there now),
        is left to what dropped it."""
        reactor = _Reactor()
        closed, hung_up = _ClientConnection(5, CONNECTION_DONE), _ClientConnection(6, None)
        selectables: dict[int, object] = {5: closed, 6: hung_up}

        class Dropping(_RecordingHolding):
            def doRead(self) -> None:
                del selectables[5]  # aborted
                selectables[6] = _ClientConnection(6, None)  # a new connection under the same fd
                super().doRead()

        selectables[7] = Dropping(reactor)
        self.turn([(5, EPOLLIN), (6, EPOLLHUP), (7, EPOLLIN)], selectables, reactor)
        self.assertEqual(reactor.steps, ["read of a request", "the request's write sent"])
        self.assertEqual(reactor.disconnected, [])


class TwistdWiringTests(SynchronousTestCase):
    def test_worker_make_service(self) -> None:
        """twistd's entry point asks for the settled collector once running, and gives twistd
        Vespa's text observer when twistd would log text to stdout."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted.python import usage

        from vast_vespa.worker import tap
        from vast_vespa.worker.service import WorkerService

        options = tap.Options()
        options.parseOptions(["--unsecured", "true"])
        options.parent = usage.Options()  # twistd's options: a dict, as its ServerOptions are
        options.parent.update({"nodaemon": True, "logfile": None})
        reactor = MemoryReactorClock()
        service = cast(WorkerService, tap.makeService(options, reactor))
        self.assertIn(settle_gc, [hook[0] for hook in reactor.whenRunningHooks])
        self.assertIsNotNone(service.text_log)
