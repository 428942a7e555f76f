"""The README stays true: every option is documented with its env var and flag."""

import os

from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.settings import OPTIONS

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


class ReadmeTests(SynchronousTestCase):
    def test_every_option_is_documented(self):
        """Each setting's env var and flag appear in the README's options table."""
        with open(README, encoding="utf-8") as f:
            text = f.read()
        missing = [o.env for o in OPTIONS if f"`{o.env}` | `--{o.flag}`" not in text]
        self.assertEqual(missing, [])

    def test_two_setup_commands(self):
        """The README names the test command that .ci/run runs."""
        with open(README, encoding="utf-8") as f:
            self.assertIn("pip install tox && tox", f.read())
