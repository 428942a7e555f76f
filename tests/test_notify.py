"""systemd integration: the notify protocol on a socket the test opens, settings, unit files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import provider

from tests.fakes import FakeBackend
from tests.helpers import listen, start_worker
from vast_vespa.notify import SystemdNotifier, SystemdService
from vast_vespa.options import SettingsError
from vast_vespa.settings import SystemdEnvironment, load_settings

UNITS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib", "systemd"
)


class NotifySocket:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, test: TestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(5)
        if abstract:
            name = "vespa-test-" + uuid.uuid4().hex
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="vespa-")  # short: AF_UNIX paths are limited
            test.addCleanup(shutil.rmtree, directory)
            self.address = os.path.join(directory, "notify")
            self.sock.bind(self.address)
        test.addCleanup(self.sock.close)

    def messages(self) -> list[list[str]]:
        """Every datagram received so far, split into its lines."""
        self.sock.setblocking(False)
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096).decode().split("\n"))
            except BlockingIOError:
                return received


class NotifierTests(TestCase):
    def test_ready_status_stopping(self) -> None:
        """READY=1, STATUS=... and STOPPING=1 arrive as one datagram each, in KEY=value lines."""
        systemd = NotifySocket(self)
        notifier = SystemdNotifier(systemd.address)
        self.addCleanup(notifier.close)
        notifier.ready()
        notifier.status("loading\nmodel  x")
        notifier.stopping()
        self.assertEqual(
            systemd.messages(),
            [
                ["READY=1", "STATUS=serving"],
                ["STATUS=loading model x"],
                ["STOPPING=1", "STATUS=draining"],
            ],
        )

    def test_failed(self) -> None:
        """A start-up failure says READY=1 (the worker stays up, reporting its error) with the
        error, on one line, as STATUS."""
        systemd = NotifySocket(self)
        notifier = SystemdNotifier(systemd.address)
        self.addCleanup(notifier.close)
        notifier.failed("worker failed to start:\nbackend not healthy")
        self.assertEqual(
            systemd.messages(),
            [["READY=1", "STATUS=worker failed to start: backend not healthy"]],
        )

    def test_abstract_namespace(self) -> None:
        """An '@name' NOTIFY_SOCKET is the abstract-namespace socket 'name'."""
        systemd = NotifySocket(self, abstract=True)
        notifier = SystemdNotifier(systemd.address)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.send("WATCHDOG=1"))
        self.assertEqual(systemd.messages(), [["WATCHDOG=1"]])

    def test_not_under_systemd(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        notifier = SystemdNotifier(None)
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.send("READY=1"))

    def test_unreachable_socket_warns_once(self) -> None:
        """A NOTIFY_SOCKET nobody listens on gives one warning, not an error per call."""
        events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace", "").startswith("vast_vespa.notify"):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        notifier = SystemdNotifier(os.path.abspath(self.mktemp()))
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.send("READY=1"))
        self.assertFalse(notifier.send("WATCHDOG=1"))
        self.assertEqual(len(events), 1)
        self.assertIn("cannot notify systemd", formatEvent(events[0]))


class SystemdServiceTests(TestCase):
    def test_watchdog_every_half_interval(self) -> None:
        """With WATCHDOG_USEC set, WATCHDOG=1 goes out every half of it from a timer on the
        reactor; stopping leaves no timer behind."""
        systemd = NotifySocket(self)
        clock = Clock()
        service = SystemdService(SystemdNotifier(systemd.address), clock, 4_000_000)
        service.startService()
        clock.advance(2)
        clock.advance(2)
        service.stopService()
        self.assertEqual(
            systemd.messages(),
            [
                ["WATCHDOG=1"],  # at start
                ["WATCHDOG=1"],
                ["WATCHDOG=1"],
            ],
        )
        self.assertEqual(clock.getDelayedCalls(), [])


class WorkerNotifyTests(TestCase):
    async def test_ready_when_loaded_stopping_when_draining(self) -> None:
        """Under systemd the worker says READY=1 once the lifecycle has loaded the backend
        (not before), and STOPPING=1 when its drain starts."""
        systemd = NotifySocket(self)
        backend = FakeBackend(reactor)
        backend.health_code = 503
        changes = {
            "systemd": SystemdEnvironment(systemd.address, 0),
            "healthcheck_retry_interval": 0.01,
        }
        _, service = start_worker(self, listen(self, backend), loaded=False, **changes)
        await backend.arrived()  # probing the backend: not ready yet
        backend.health_code = 200
        await service.getServiceNamed("lifecycle").when_loaded()
        messages = systemd.messages()
        # While starting: the phase, its time and the last probe's answer.
        self.assertIn(["STATUS=waiting for health for 0 s, last health probe: HTTP 503"], messages)
        self.assertEqual(messages[-1], ["READY=1", "STATUS=serving"])
        await service.stopService()
        self.assertEqual(systemd.messages(), [["STOPPING=1", "STATUS=draining"]])

    async def test_failed_start_is_ready_with_the_error_as_status(self) -> None:
        """A worker whose start-up fails tells systemd READY=1 with the error as STATUS=, so
        that `systemctl status` shows why and systemd neither kills it at TimeoutStartSec nor
        restarts it in a loop; it keeps running and reporting the error."""
        systemd = NotifySocket(self)
        backend = FakeBackend(reactor)
        changes = {
            "systemd": SystemdEnvironment(systemd.address, 0),
            "benchmark": "tests.test_lifecycle:broken_benchmark",
            "benchmark_cache": os.path.abspath(self.mktemp()),
        }
        _, service = start_worker(self, listen(self, backend), loaded=False, **changes)
        await service.getServiceNamed("lifecycle").when_failed()
        self.flushLoggedErrors(ValueError)
        self.assertEqual(
            systemd.messages()[-1:],
            [
                [
                    "READY=1",
                    "STATUS=worker failed to start: benchmark "
                    "tests.test_lifecycle:broken_benchmark failed: ValueError: no such model",
                ],
            ],
        )
        self.assertTrue(service.running)


class SettingsTests(TestCase):
    def test_systemd_environment(self) -> None:
        """NOTIFY_SOCKET and WATCHDOG_USEC are read by the settings; a watchdog meant for
        another process (WATCHDOG_PID) is ignored; a bad WATCHDOG_USEC is a clear error."""
        env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}
        systemd = load_settings({}, env).systemd
        self.assertEqual((systemd.notify_socket, systemd.watchdog_usec), ("@x", 30_000_000))
        env["WATCHDOG_PID"] = str(os.getpid())
        self.assertEqual(load_settings({}, env).systemd.watchdog_usec, 30_000_000)
        env["WATCHDOG_PID"] = "1"
        self.assertEqual(load_settings({}, env).systemd.watchdog_usec, 0)
        self.assertIsNone(load_settings({}, {}).systemd.notify_socket)
        error = self.assertRaises(SettingsError, load_settings, {}, {"WATCHDOG_USEC": "soon"})
        self.assertIn("WATCHDOG_USEC='soon'", str(error))


class UnitFileTests(TestCase):
    def test_units_verify(self) -> None:
        """systemd-analyze verify accepts vespa.service and vespa.socket."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed")
        units = [os.path.join(UNITS, name) for name in ("vespa.service", "vespa.socket")]
        result = subprocess.run(
            [analyze, "verify", *units], capture_output=True, text=True, timeout=60
        )
        problems = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if "vespa" in line and "Command /opt/vespa" not in line
        ]
        self.assertEqual(problems, [], result.stdout + result.stderr)
