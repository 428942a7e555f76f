"""Declaring options once: defaults parsed from their text, reading flags and environment,
the README table, and endpoint strings checked without a reactor."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, fields

from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.options import (
    SettingsError,
    declaration,
    declared,
    is_given,
    markdown_command,
    markdown_table,
    option,
    parse_bool,
    parse_listen,
    parse_size,
    parse_text,
    read_options,
)


@dataclass(frozen=True)
class Example:
    size: int = option("SIZE", "size", parse_size, "16k", "How big | how much.", old_env=("BULK",))
    name: str = option("NAME", "name", parse_text, "", "A name.", env_prefix="PRE_")
    loud: bool = option("LOUD", "loud", parse_bool, "false", "Shout.")
    not_an_option: int = 7


class DeclarationTests(SynchronousTestCase):
    def test_default_is_parsed_from_its_text(self) -> None:
        """The default a settings object gets is the declared text, parsed."""
        self.assertEqual(Example(), Example(size=16384, name="", loud=False))

    def test_declared_in_field_order(self) -> None:
        """declared() lists the options (not the other fields) in field order."""
        self.assertEqual([name for name, _ in declared(Example)], ["size", "name", "loud"])
        self.assertEqual(declaration(Example, "size").env, "SIZE")
        self.assertEqual(len(fields(Example)), 4)

    def test_names(self) -> None:
        """Environment names: the prefixed spelling first, then the plain one, then the old."""
        self.assertEqual(declaration(Example, "name").env_names(), ("PRE_NAME", "NAME"))
        self.assertEqual(declaration(Example, "size").env_names(), ("SIZE", "BULK"))
        self.assertEqual(declaration(Example, "size").naming, "--size / SIZE")
        self.assertTrue(declaration(Example, "loud").boolean)
        self.assertFalse(declaration(Example, "size").boolean)


class ReadTests(SynchronousTestCase):
    def test_precedence(self) -> None:
        """Flag > prefixed variable > variable > older spelling > default."""
        self.assertEqual(read_options(Example, {}, {})["size"], 16384)
        self.assertEqual(read_options(Example, {}, {"BULK": "1k"})["size"], 1024)
        self.assertEqual(read_options(Example, {}, {"BULK": "1k", "SIZE": "2k"})["size"], 2048)
        self.assertEqual(read_options(Example, {"size": "3k"}, {"SIZE": "2k"})["size"], 3072)
        self.assertEqual(read_options(Example, {}, {"NAME": "a", "PRE_NAME": "b"})["name"], "b")
        self.assertEqual(read_options(Example, {"name": None}, {"NAME": "a"})["name"], "a")

    def test_error_names_option_source_and_value(self) -> None:
        """A bad value is one line: the option, where the value came from, the value, why."""
        for flags, environ, expected in [
            ({"size": "big"}, {}, "invalid SIZE='big' (from flag --size): expected a size"),
            ({}, {"BULK": "x"}, "invalid SIZE='x' (from environment variable BULK): expected"),
            ({}, {"PRE_NAME": "a", "LOUD": "maybe"}, "invalid LOUD='maybe' (from environment"),
        ]:
            with self.assertRaises(SettingsError) as caught:
                read_options(Example, flags, environ)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_is_given(self) -> None:
        """An option is given by its flag or any of its variables, not by its default."""
        self.assertFalse(is_given(Example, "size", {"size": None}, {}))
        self.assertTrue(is_given(Example, "size", {"size": "1"}, {}))
        self.assertTrue(is_given(Example, "size", {}, {"BULK": "1"}))


class MarkdownTests(SynchronousTestCase):
    def test_table(self) -> None:
        """One row per option: variable (and older spellings), flag, default or unset, help."""
        self.assertEqual(
            markdown_table(Example),
            "| env var | flag | default | meaning |\n"
            "|---|---|---|---|\n"
            "| `SIZE` (also `BULK`) | `--size` | `16k` | How big \\| how much. |\n"
            "| `NAME` | `--name` | unset | A name. |\n"
            "| `LOUD` | `--loud` | `false` | Shout. |\n",
        )

    def test_command(self) -> None:
        """``--markdown`` prints the table; anything else prints a usage line, exit 2."""
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(markdown_command(Example, "example", ["--markdown"]), 0)
        self.assertEqual(out.getvalue(), markdown_table(Example))
        with redirect_stderr(err):
            self.assertEqual(markdown_command(Example, "example", []), 2)
        self.assertIn("python -m example --markdown", err.getvalue())

    def test_settings_modules_print_their_tables(self) -> None:
        """``python -m vast_vespa.settings --markdown`` (and the client's) print the tables,
        nothing else."""
        from vast_vespa.client.settings import ClientSettings
        from vast_vespa.settings import Settings

        for module, settings_class in [
            ("vast_vespa.settings", Settings),
            ("vast_vespa.client.settings", ClientSettings),
        ]:
            done = subprocess.run(
                [sys.executable, "-m", module, "--markdown"], capture_output=True, text=True
            )
            self.assertEqual((done.returncode, done.stderr), (0, ""))
            self.assertEqual(done.stdout, markdown_table(settings_class))


class ListenTests(SynchronousTestCase):
    def test_endpoint_strings(self) -> None:
        """Endpoint strings are parsed as twistd would; a bad one says why."""
        self.assertEqual(parse_listen(" tcp:1  unix:/tmp/s.sock "), ("tcp:1", "unix:/tmp/s.sock"))
        for text, why in [
            ("", "expected an endpoint string such as tcp:3000"),
            ("bogus:1", "expected a Twisted endpoint string such as tcp:3000"),
            ("tcp:x", "expected a Twisted endpoint string"),
            ("ssl:1:privateKey=/nonexistent.pem", "expected a Twisted endpoint string"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parse_listen(text)
            self.assertIn(why, str(caught.exception))

    def test_no_test_double_nor_reactor(self) -> None:
        """Checking endpoint strings (as loading the settings does) imports neither Twisted's
        test doubles nor the global reactor (twistd installs its own later)."""
        code = (
            "import sys\n"
            "from vast_vespa.settings import load_settings\n"
            "load_settings({'listen': 'tcp:1 unix:/tmp/x.sock'}, {})\n"
            "print(sorted(m for m in ('twisted.internet.testing', 'twisted.internet.reactor')"
            " if m in sys.modules))\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual((done.stdout, done.stderr), ("[]\n", ""))
