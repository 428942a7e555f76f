"""
The fast path's start-up check (vast_vespa.net.guard): on the installed Twisted every private
name it relies on is there; one that is missing or has changed shape turns the fast path off
with one warning line naming it, and the worker is then wired from stock Twisted only.
"""

from __future__ import annotations

from typing import cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server

from vast_vespa.net import guard
from vast_vespa.net.listen import SendNowEndpoint, _Listener
from vast_vespa.net.request import LeanRequest
from vast_vespa.site import VespaRequest
from vast_vespa.worker import tap
from vast_vespa.worker.service import WorkerService


def listening_on(service: WorkerService) -> IStreamServerEndpoint:
    """The endpoint of the worker's (first) client listener."""
    listener = cast(_Listener, service.getServiceNamed("listen-0"))
    endpoint: IStreamServerEndpoint = cast(StreamServerEndpointService, listener.listening).endpoint
    return endpoint


class GuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(guard, "_chosen", {})  # decided once per process: start afresh
        self.events: list[dict] = []
        observer = cast(ILogObserver, self.events.append)  # any callable taking the event
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def guard_lines(self) -> list[dict]:
        return [e for e in self.events if e.get("log_namespace") == guard.__name__]

    def test_installed_twisted_meets_every_need(self) -> None:
        """The Twisted this runs on has every private name the fast path uses, with its shape
        (on the running reactor too): the fast path runs."""
        self.assertEqual(guard.missing(reactor), [])
        self.assertTrue(guard.choose_fast_path(True, reactor))
        self.assertEqual(self.guard_lines(), [])

    def test_a_missing_name_turns_the_fast_path_off(self) -> None:
        """A name Twisted no longer has: stock Twisted, and one warning naming it."""
        self.patch(tcp.Port, "_buildAddr", None)
        self.assertFalse(guard.choose_fast_path(True, reactor))
        [line] = self.guard_lines()
        self.assertEqual(line["log_level"], LogLevel.warn)
        text = line["log_format"].format(**line)
        self.assertIn("twisted.internet.tcp.Port._buildAddr", text)
        self.assertIn("running on stock Twisted", text)
        self.assertFalse(guard.choose_fast_path(True, reactor))  # decided once
        self.assertEqual(len(self.guard_lines()), 1)

    def test_a_changed_shape_turns_the_fast_path_off(self) -> None:
        """A name that is there but no longer what the fast path expects counts as missing."""
        self.patch(server.Request, "_encoder", "no")
        self.patch(server.Request, "_inFakeHead", "no")
        unmet = {str(need) for need in guard.missing(reactor)}
        self.assertEqual(
            unmet,
            {
                "twisted.web.server.Request._encoder (None)",
                "twisted.web.server.Request._inFakeHead (a bool)",
            },
        )

    def test_a_request_constructor_that_sets_more_turns_the_fast_path_off(self) -> None:
        """LeanRequest sets up a request with the attributes twisted.web's constructor sets:
        a Twisted whose constructor sets another one (that LeanRequest would not) is a
        changed shape."""
        from twisted.web import http

        original = http.Request.__init__

        def setting_more(request: http.Request, *args: object, **kwargs: object) -> None:
            original(request, *args, **kwargs)  # type: ignore[arg-type]
            request.newer = True  # type: ignore[attr-defined]

        self.assertEqual(guard.missing(reactor), [])
        self.patch(http.Request, "__init__", setting_more)
        unmet = [str(need) for need in guard.missing(reactor)]
        self.assertEqual(
            unmet, ["twisted.web.server.Request.__dict__ (the attributes LeanRequest sets)"]
        )

    def test_reactor_needs_apply_to_the_epoll_reactor_only(self) -> None:
        """Another reactor is left alone by the parts that need epoll's internals."""
        self.assertEqual(guard.missing(MemoryReactorClock()), [])

    def test_turned_off_by_hand(self) -> None:
        """FAST_PATH=false: stock Twisted, said once at info level."""
        self.assertFalse(guard.choose_fast_path(False, reactor))
        [line] = self.guard_lines()
        self.assertEqual(line["log_level"], LogLevel.info)

    def test_worker_on_stock_twisted(self) -> None:
        """With a need unmet, the worker's site makes twisted.web's Requests and its listeners
        are Twisted's own; with every need met, the fast path's."""
        options = tap.Options()
        options.parseOptions(
            ["--unsecured", "true", "--admin-listen", "none", "--fast-path", "true"]
        )
        fast = cast(WorkerService, tap.makeService(options, MemoryReactorClock()))
        self.assertIs(fast.site.requestFactory, LeanRequest)
        self.assertIsInstance(listening_on(fast), SendNowEndpoint)

        self.patch(guard, "_chosen", {})
        self.patch(tcp.Connection, "_writeDisconnected", None)
        stock = cast(WorkerService, tap.makeService(options, MemoryReactorClock()))
        self.assertIs(stock.site.requestFactory, VespaRequest)
        self.assertNotIsInstance(listening_on(stock), SendNowEndpoint)
