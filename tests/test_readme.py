"""The README stays true: its option tables are the ones the declarations print."""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.client.settings import ClientSettings
from vast_vespa.options import declared, markdown_table
from vast_vespa.settings import Settings

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# (README marker, settings class, the command that prints its table)
TABLES = [
    ("options-table", Settings, "python -m vast_vespa.settings --markdown"),
    ("client-options-table", ClientSettings, "python -m vast_vespa.client.settings --markdown"),
]


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def readme_table(marker: str) -> str:
    """What README.md holds between ``<!-- marker -->`` and ``<!-- /marker -->``."""
    match = re.search(f"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", readme(), re.DOTALL)
    assert match is not None, f"README.md has no <!-- {marker} --> ... <!-- /{marker} -->"
    return match.group(1)


class ReadmeTests(SynchronousTestCase):
    def test_tables_are_generated(self) -> None:
        """Each options table in README.md is exactly what its command prints."""
        for marker, settings_class, command in TABLES:
            self.assertEqual(
                readme_table(marker),
                markdown_table(settings_class),
                f"README.md's {marker} is out of date: replace it with the output of `{command}`",
            )

    def test_every_option_is_documented(self) -> None:
        """Each option's env var and flag appear in a row of its README table."""
        for marker, settings_class, _ in TABLES:
            rows = readme_table(marker).splitlines()
            missing = [
                o.env
                for _, o in declared(settings_class)
                if not any(
                    row.startswith(f"| `{o.env}`") and f"| `--{o.flag}` |" in row for row in rows
                )
            ]
            self.assertEqual(missing, [], marker)

    def test_start_server_variables_are_documented(self) -> None:
        """Each variable start_server.sh's header says a template may set is in the README."""
        script = os.path.join(os.path.dirname(README), "start_server.sh")
        with open(script, encoding="utf-8") as f:
            header = f.read().split("# Overridable", 1)[1].split("\nset -", 1)[0]
        names = re.findall(r"\b([A-Z][A-Z0-9_]+) \(", header)
        self.assertIn("SSL_KEY_TYPE", names)  # the header's syntax is what is parsed here
        self.assertEqual([n for n in names if f"`{n}`" not in readme()], [])

    def test_two_setup_commands(self) -> None:
        """The README names the test command that .ci/run runs."""
        self.assertIn("pip install tox && tox", readme())
