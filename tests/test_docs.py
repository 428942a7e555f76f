"""The documentation's commands are real: every Vespa command shown in a fenced code block of
README.md or docs/*.md parses, its flags (and twistd's, before the command name) exist."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from vast_vespa import sandbox
from vast_vespa.client import tap as client_tap
from vast_vespa.emulator import tap as emulator_tap
from vast_vespa.worker import tap as worker_tap

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
INLINE = re.compile(r"`([^`]+)`")
SEPARATORS = {"&&", "||", ";", "|"}


def parsed_only(options_class: type[usage.Options]) -> type[usage.Options]:
    """``options_class`` that parses its flags and stops there: no checks of the values, no
    settings loaded, nothing started (``postOptions`` is the part that does those)."""
    return type(options_class.__name__, (options_class,), {"postOptions": lambda self: None})


class TwistdFlags(ServerOptions):
    """twistd's own flags, given before the plugin's name; no plugin is looked up."""

    subCommands: list[object] = []

    def postOptions(self) -> None:
        pass


# What follows `twistd ... NAME`, and the commands run on their own.
TWISTD_COMMANDS: dict[str, Callable[[], usage.Options]] = {
    "vespa": parsed_only(worker_tap.Options),
    "vespa-client": parsed_only(client_tap.Options),
    "vespa-autoscaler": parsed_only(emulator_tap.Options),
    "vespa-sandbox": parsed_only(sandbox.Options),
}
SCRIPTS: dict[str, Callable[[], usage.Options]] = {
    "vespa-client": parsed_only(client_tap.ScriptOptions),
}
MARKDOWN_MODULES = {"vast_vespa.settings", "vast_vespa.client.settings"}


def fenced_lines(text: str) -> Iterator[str]:
    """Each logical line of each fenced block (``\\``-continued lines joined), then each
    command in a table row's inline code (the backends' table)."""
    for block in FENCE.findall(text):
        line = ""
        for physical in block.splitlines():
            if physical.rstrip().endswith("\\"):
                line += physical.rstrip()[:-1] + " "
                continue
            yield line + physical
            line = ""
        if line:
            yield line
    for row in re.findall(r"^\|.*\|$", FENCE.sub("", text), re.MULTILINE):
        yield from (span for span in INLINE.findall(row) if "..." not in span)


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``;``, ``|``), comments dropped,
    leading ``NAME=value`` assignments dropped."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell (Python, JSON): nothing to run here
        return
    command: list[str] = []
    for word in [*words, ";"]:
        if word in SEPARATORS:
            while command and ASSIGNMENT.match(command[0]):
                command.pop(0)
            if command:
                yield command
            command = []
        else:
            command.append(word)


def vespa_commands(text: str) -> Iterator[tuple[str, list[str]]]:
    """``(the command as written, its words)`` for each Vespa command in ``text``."""
    for line in fenced_lines(text):
        for words in simple_commands(line):
            program = Path(words[0]).name
            is_python = re.fullmatch(r"python[0-9.]*", program) is not None
            if program in ("twistd", *SCRIPTS) or (
                is_python
                and words[1:2] == ["-m"]
                and words[2:3][0:1] != []
                and words[2].startswith("vast_vespa")
            ):
                yield line.strip(), words


def check(words: list[str]) -> None:
    """Parse ``words`` (one Vespa command) as the command would; raise
    :class:`usage.UsageError` when a flag does not exist."""
    program = Path(words[0]).name
    if program == "twistd":
        names = [i for i, word in enumerate(words) if word in TWISTD_COMMANDS]
        if not names:
            raise usage.UsageError(f"twistd runs no Vespa command: {words}")
        at = names[0]
        TwistdFlags().parseOptions(words[1:at])
        TWISTD_COMMANDS[words[at]]().parseOptions(words[at + 1 :])
    elif program in SCRIPTS:
        SCRIPTS[program]().parseOptions(words[1:])
    else:  # python -m vast_vespa...
        module, argv = words[2], words[3:]
        if module not in MARKDOWN_MODULES:
            raise usage.UsageError(f"no such Vespa module to run: {module}")
        if argv != ["--markdown"]:
            raise usage.UsageError(f"python -m {module} takes --markdown only, not {argv}")


class DocumentedCommandsTests(SynchronousTestCase):
    def test_documented_commands_parse(self) -> None:
        """Every Vespa command in a fenced block of README.md and docs/*.md parses."""
        seen = 0
        wrong = []
        for document in DOCUMENTS:
            for shown, words in vespa_commands(document.read_text(encoding="utf-8")):
                seen += 1
                try:
                    check(words)
                except usage.UsageError as e:
                    wrong.append(f"{document.relative_to(ROOT)}: {shown}\n    {e}")
        self.assertEqual(wrong, [])
        self.assertGreater(seen, 12)  # the blocks were found at all

    def test_an_invented_flag_fails(self) -> None:
        """A flag that no command has is caught, for the worker, the client (both ways of
        running it), the emulator, the sandbox, and twistd's own flags."""
        for command in [
            "twistd -n --pidfile= vespa --backend-url http://localhost:8000 --no-such-flag",
            "twistd -n --pidfile= vespa --unsecured --no-such-flag true",
            "twistd vespa-client --endpoint e --no-such-flag x",
            "vespa-client --endpoint e --no-such-flag",
            "twistd -n vespa-autoscaler --no-such-flag",
            "twistd -n vespa-sandbox --workers 3 --no-such-flag",
            "twistd --no-such-flag -n vespa",
            "python -m vast_vespa.settings --no-such-flag",
        ]:
            text = f"```bash\nFOO=bar {command}\n```\n"
            [(_, words)] = list(vespa_commands(text))
            self.assertRaises(usage.UsageError, check, words)

    def test_continuations_and_prefixes(self) -> None:
        """A command continued over lines with ``\\`` and behind ``NAME=value`` assignments
        and ``pip install . &&`` is found whole; a comment is not part of it."""
        text = (
            "```bash\n"
            "pip install . && A=1 B='x y' \\\n"
            "  twistd -n --pidfile= vespa \\\n"
            "  --backend-url http://localhost:8000 --unsecured  # a comment --nope\n"
            "```\n"
        )
        [(_, words)] = list(vespa_commands(text))
        self.assertEqual(
            words,
            [
                "twistd",
                "-n",
                "--pidfile=",
                "vespa",
                "--backend-url",
                "http://localhost:8000",
                "--unsecured",
            ],
        )
        check(words)

    def test_other_commands_are_left_alone(self) -> None:
        """curl, pip, Python code and JSON in fenced blocks are not Vespa commands."""
        text = (
            "```bash\ncurl -N localhost:8010/v1 -d '{\"a\": 1}'\npip install tox && tox\n```\n"
            "```python\nprint('it''s')\n```\n"
        )
        self.assertEqual(list(vespa_commands(text)), [])
