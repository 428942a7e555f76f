"""The vespa-client plugin and console script: flags, settings, errors."""

from __future__ import annotations

import os

from twisted.application.service import IServiceMaker
from twisted.trial.unittest import SynchronousTestCase

import vespa
from vespa.client import tap
from vespa.settings import CLIENT_OPTIONS, ClientSettings, client_option_fields


class ClientPluginTests(SynchronousTestCase):
    def test_plugin_is_declared(self):
        """The dropin installed with this vespa declares vespa-client -> vespa.client.tap (read
        from the file: another vespa copy earlier on sys.path may shadow the module)."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(vespa.__file__)))
        namespace: dict[str, object] = {}
        with open(os.path.join(root, "twisted", "plugins", "vespa_plugins.py")) as f:
            exec(f.read(), namespace)  # noqa: S102 (our own dropin file)
        maker = namespace["vespa_client"]
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertEqual(maker.tapname, "vespa-client")  # type: ignore[attr-defined]
        self.assertEqual(maker.module, "vespa.client.tap")  # type: ignore[attr-defined]

    def test_table_matches_settings(self):
        """Every ClientSettings field comes from exactly one client option, and back."""
        names = [o.name for o in CLIENT_OPTIONS]
        self.assertEqual(len(names), len(set(names)))
        self.assertEqual(set(names), client_option_fields())

    def test_flags(self):
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

    def test_defaults(self):
        """By default the proxy listens on 127.0.0.1:8010 and routes through production."""
        settings = ClientSettings()
        self.assertEqual(settings.listen, ("tcp:8010:interface=127.0.0.1",))
        self.assertEqual(settings.route_base, "https://run.vast.ai")

    def test_autoscaler_url_wins(self):
        """--autoscaler-url overrides the instance's URL."""
        options = tap.Options()
        options.parseOptions(["--endpoint", "e", "--autoscaler-url", "http://127.0.0.1:9/"])
        self.assertEqual(options.settings.route_base, "http://127.0.0.1:9")

    def test_endpoint_required_under_twistd(self):
        """twistd vespa-client without an endpoint exits with one line saying what to pass."""
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions([])
        self.assertIn("--endpoint", str(caught.exception.code))

    def test_script_endpoint_optional(self):
        """The console script accepts no endpoint with --list or on a terminal (prompt)."""
        tap.ScriptOptions().parseOptions(["--list"])
        tap.ScriptOptions(interactive=True).parseOptions([])
        with self.assertRaises(SystemExit):
            tap.ScriptOptions(interactive=False).parseOptions([])

    def test_bad_value(self):
        """A bad flag value exits with one line naming it."""
        with self.assertRaises(SystemExit) as caught:
            tap.Options().parseOptions(["--endpoint", "e", "--instance", "staging"])
        self.assertIn("--instance", str(caught.exception.code))
