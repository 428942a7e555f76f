"""The vespa-client plugin and console script: flags, settings, errors."""

from __future__ import annotations

import os
import sys

from twisted.application.service import IServiceMaker
from twisted.trial.unittest import SynchronousTestCase, TestCase

import vast_vespa
from tests.fakes import FakeRouter
from tests.helpers import ProcessWatcher, listen, spawn
from vast_vespa.client import tap
from vast_vespa.client.settings import ClientSettings
from vast_vespa.signing import generate_private_key


class ClientPluginTests(SynchronousTestCase):
    def test_plugin_is_declared(self) -> None:
        """The dropin installed with this vespa declares vespa-client -> vast_vespa.client.tap (read
        from the file: another vespa copy earlier on sys.path may shadow the module)."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(vast_vespa.__file__)))
        namespace: dict[str, object] = {}
        with open(os.path.join(root, "twisted", "plugins", "vespa_plugins.py")) as f:
            exec(f.read(), namespace)  # noqa: S102 (our own dropin file)
        maker = namespace["vespa_client"]
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertEqual(maker.tapname, "vespa-client")  # type: ignore[attr-defined]
        self.assertEqual(maker.module, "vast_vespa.client.tap")  # type: ignore[attr-defined]

    def test_flags(self) -> None:
        """Flags become settings; --instance picks the default URLs; --listen is repeatable."""
        options = tap.Options()
        options.parseOptions(
            ["--endpoint", "e", "--api-key", "k", "--instance", "alpha", "--listen", "tcp:1"]
        )
        settings = options.settings
        self.assertEqual((settings.endpoint, settings.api_key), ("e", "k"))
        self.assertEqual(settings.route_base, "https://run-alpha.vast.ai")
        self.assertEqual(settings.console_base, "https://alpha.vast.ai")
        self.assertEqual(settings.listen, ("tcp:1",))

    def test_defaults(self) -> None:
        """By default the proxy listens on 127.0.0.1:8010 and routes through production."""
        settings = ClientSettings()
        self.assertEqual(settings.listen, ("tcp:8010:interface=127.0.0.1",))
        self.assertEqual(settings.route_base, "https://run.vast.ai")

    def test_autoscaler_url_wins(self) -> None:
        """--autoscaler-url overrides the instance's URL."""
        options = tap.Options()
        options.parseOptions(
            ["--endpoint", "e", "--api-key", "k", "--autoscaler-url", "http://127.0.0.1:9/"]
        )
        self.assertEqual(options.settings.route_base, "http://127.0.0.1:9")

    def test_key_required_under_twistd(self) -> None:
        """twistd vespa-client with no key anywhere exits with one line naming the key sources,
        instead of starting and answering every request 401."""
        missing = self.mktemp()
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--endpoint", "e", "--account-key-file", missing])
        self.assertIn("vespa-client: no key: pass --api-key", str(caught.exception))

    def test_endpoint_required_under_twistd(self) -> None:
        """twistd vespa-client without an endpoint exits with one line saying what to pass."""
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions([])
        self.assertIn("--endpoint", str(caught.exception.code))

    def test_list_under_twistd(self) -> None:
        """twistd vespa-client --list (not taken for --listen) says to use the vespa-client
        command, in one line."""
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--list"])
        self.assertEqual(
            caught.exception.code,
            "vespa-client: --list only works with the vespa-client command: "
            "run `vespa-client --list`",
        )

    def test_script_endpoint_optional(self) -> None:
        """The console script accepts no endpoint with --list or on a terminal (prompt)."""
        tap.ScriptOptions().parseOptions(["--list"])
        tap.ScriptOptions(interactive=True).parseOptions([])
        with self.assertRaises(SystemExit):
            tap.ScriptOptions(interactive=False).parseOptions([])

    def test_bad_value(self) -> None:
        """A bad flag value exits with one line naming it."""
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--endpoint", "e", "--instance", "staging"])
        self.assertIn("--instance", str(caught.exception.code))


class ConsoleScriptTests(TestCase):
    """The vespa-client console script, run as a real process (the installed package)."""

    timeout = 60

    def setUp(self) -> None:
        self.router = FakeRouter(generate_private_key(), ["http://127.0.0.1:1"])
        self.router_url = listen(self, self.router)

    def script(self, *args: str, **env: str) -> ProcessWatcher:
        command = [sys.executable, "-c", "from vast_vespa.client.tap import main; main()", *args]
        return spawn(self, command, {"HOME": self.mktemp(), **env})

    async def test_list(self) -> None:
        """--list prints the account's endpoints (account key from VAST_ACCOUNT_KEY)."""
        watcher = self.script(
            "--list", "--console-url", self.router_url, VAST_ACCOUNT_KEY=self.router.account_key
        )
        self.assertEqual(await watcher.ended, 0)
        self.assertEqual(watcher.output.split(), [b"another", b"my-endpoint"])

    async def test_runs_the_proxy(self) -> None:
        """With an endpoint and an account key the script looks the endpoint key up, listens,
        and proxies; the keys never appear in its output."""
        watcher = self.script(
            "--endpoint",
            "my-endpoint",
            "--instance",
            "local",
            "--console-url",
            self.router_url,
            "--autoscaler-url",
            self.router_url,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            VAST_ACCOUNT_KEY=self.router.account_key,
        )
        await watcher.wait_for(rb"client proxy starting on (\d+)")
        await watcher.wait_for(rb"vespa-client: endpoint my-endpoint on tcp:0")
        self.assertNotIn(self.router.account_key.encode(), watcher.output)
        self.assertNotIn(self.router.api_key.encode(), watcher.output)

    async def test_no_key_exits_with_one_line(self) -> None:
        """No key at all: exit 1 with a line saying which flags and variables to use."""
        watcher = self.script("--endpoint", "my-endpoint", "--console-url", self.router_url)
        self.assertEqual(await watcher.ended, 1)
        self.assertIn(b"--api-key", watcher.output)
