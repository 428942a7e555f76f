"""The installed twistd plugin, end to end: a real twistd process in front of a real backend."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from importlib import metadata
from typing import cast

from twisted.application.service import IServiceMaker, ServiceMaker
from twisted.internet import reactor
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeBackend
from tests.helpers import http_client, listen, spawn, spawn_worker, twistd_command, worker_url
from vast_vespa import __version__
from vast_vespa.worker import tap


class PluginDiscoveryTests(SynchronousTestCase):
    def test_vespa_plugin_is_listed(self) -> None:
        """twistd finds the vespa plugin, pointing at vast_vespa.worker.tap."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("vespa", makers)
        self.assertEqual(cast(ServiceMaker, makers["vespa"]).module, "vast_vespa.worker.tap")

    def test_options_flags(self) -> None:
        """Flags become settings; --listen is repeatable."""
        options = tap.Options()
        options.parseOptions(
            [
                "--backend-url",
                "http://127.0.0.1:9",
                "--listen",
                "tcp:1",
                "--listen",
                "tcp:2",
                "--unsecured",
                "true",
            ]
        )
        self.assertEqual(options.settings.backend_url, "http://127.0.0.1:9")
        self.assertEqual(options.settings.listen, ("tcp:1", "tcp:2"))
        self.assertTrue(options.settings.unsecured)

    def test_bad_flag_value_exits(self) -> None:
        """A bad flag value exits with one line naming it."""
        options = tap.Options()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--max-wait-time", "soon"])
        self.assertIn("--max-wait-time", str(caught.exception.code))

    def test_version(self) -> None:
        """--version prints Vespa's version (not Twisted's) and exits 0, on every command."""
        from vast_vespa.client import tap as client_tap
        from vast_vespa.emulator import tap as emulator_tap

        for options in (tap.Options(), client_tap.Options(), emulator_tap.Options()):
            output = io.StringIO()
            with self.assertRaises(SystemExit) as caught, redirect_stdout(output):
                options.parseOptions(["--version"])
            self.assertEqual(caught.exception.code, 0)
            self.assertTrue(output.getvalue().startswith(f"vast-vespa {__version__} (Twisted "))

    def test_unknown_flag(self) -> None:
        """An unknown flag is a usage error."""
        self.assertRaises(UsageError, tap.Options().parseOptions, ["--nope", "1"])


class PackageTests(SynchronousTestCase):
    def test_installs_only_vast_vespa(self) -> None:
        """The installed distribution holds the ``vast_vespa`` package, the twistd dropin and
        the licence: nothing else at top level (no ``vespa``, no ``benchmarks``)."""
        # The installed wheel's RECORD (a checkout's egg-info, also on sys.path, has none).
        [record] = [
            text
            for dist in metadata.distributions(name="vast-vespa")
            if (text := dist.read_text("RECORD")) is not None
        ]
        names = {line.split(",")[0] for line in record.splitlines() if line}
        tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
        tops -= {".."}  # the console script, in the environment's bin/
        self.assertEqual(tops, {"vast_vespa", "twisted"})
        self.assertEqual(
            {name for name in names if name.startswith("twisted/") and ".pyc" not in name},
            {"twisted/plugins/vespa_plugins.py"},
        )
        self.assertIn("vast_vespa/benchmarks/words.txt", names)
        self.assertTrue(any(name.endswith("LICENSE") for name in names), names)
        self.assertIn(f"vast_vespa-{__version__}.dist-info/METADATA", names)


class TwistdTests(TestCase):
    timeout = 60

    async def test_twistd_relays(self) -> None:
        """`twistd -n vespa --backend-url URL` from the installed package relays requests."""
        backend = FakeBackend(reactor)
        backend_url = listen(self, backend)
        process = spawn_worker(self, backend_url)
        url = await worker_url(process)
        await process.wait_for(rb"worker loaded")
        http = http_client(self)
        response = await http.post(url + "/v1/echo?q=1", json={"prompt": "hi"})
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["uri"], "/v1/echo?q=1")
        response = await http.get(url + "/sse?n=2")
        self.assertEqual(
            await response.content(), b"data: event 0\n\ndata: event 1\n\ndata: [DONE]\n\n"
        )
        await process.wait_for(rb"POST /v1/echo 200 served")  # the access-log line

    async def test_version_from_twistd(self) -> None:
        """``twistd vespa --version`` prints Vespa's version."""
        process = spawn(self, twistd_command("-n", "--pidfile=", "vespa", "--version"))
        self.assertEqual(await process.ended, 0)
        self.assertIn(f"vast-vespa {__version__} ".encode(), process.output)

    async def test_bad_setting_exits_before_listening(self) -> None:
        """A bad environment value stops twistd with one clear line and a non-zero exit."""
        process = spawn(self, twistd_command("-n", "--pidfile=", "vespa"), {"MAX_WAIT_TIME": "abc"})
        code = await process.ended
        self.assertNotEqual(code, 0)
        self.assertIn(
            b"vespa: invalid MAX_WAIT_TIME='abc' (from environment variable MAX_WAIT_TIME)",
            process.output,
        )
        self.assertNotIn(b"starting on", process.output)
