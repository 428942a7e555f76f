# -*- test-case-name: tests.test_plugin,tests.test_cli -*-
"""
What every Vespa command line shares: its version flag, flags made from declared options
(:mod:`vast_vespa.options`), and the reactor twistd installed.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

from twisted.python import usage

import twisted
from vast_vespa import __version__
from vast_vespa.options import Option, declared


def version_line() -> str:
    """What ``--version`` prints: Vespa's version first, then what it runs on."""
    return (
        f"vast-vespa {__version__} (Twisted {twisted.__version__}, "
        f"Python {platform.python_version()})"
    )


class CommandOptions(usage.Options):
    """``usage.Options`` whose ``--version`` prints Vespa's version (twistd's own prints
    Twisted's)."""

    def opt_version(self) -> None:
        """Print Vespa's version and exit."""
        print(version_line())
        raise SystemExit(0)


def option_help(option: Option) -> str:
    """An option's help text with its environment variable and default."""
    more = "; repeatable" if option.repeatable else ""
    return f"{option.help} [env {option.env}; default {option.shown_default}{more}]"


def flag_parameters(settings_class: type) -> list[list[Any]]:
    """``optParameters`` for the options declared on ``settings_class``."""
    return [[o.flag, None, None, option_help(o)] for _, o in declared(settings_class)]


class SettingsOptions(CommandOptions):
    """
    Options whose flags are the options declared on ``settings_class`` (set ``optParameters``
    to ``flag_parameters(settings_class)``). A boolean flag given bare means true
    (``--unsecured``, as well as ``--unsecured true`` and ``--unsecured=false``); a repeatable
    flag given several times adds up (``--listen a --listen b``).
    """

    settings_class: ClassVar[type]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        if options is None:
            options = sys.argv[1:]
        super().parseOptions(self._normalized(options))

    def flags(self) -> dict[str, str | None]:
        """The declared options' flags as given: field name -> text, or None."""
        return {name: self[o.flag] for name, o in declared(self.settings_class)}

    def _normalized(self, args: Sequence[str]) -> list[str]:
        """``args`` with every declared flag written ``--flag=value`` (what getopt needs for
        a bare boolean), and the values of a repeated repeatable flag joined into one."""
        takes_value = {name.rstrip("="): name.endswith("=") for name in self.longOpt}
        options = {o.flag: o for _, o in declared(self.settings_class)}
        normalized: list[str] = []
        first: dict[str, int] = {}
        rest = list(args)
        while rest:
            arg = rest.pop(0)
            if arg in ("-", "--") or not arg.startswith("-"):
                normalized += [arg, *rest]  # getopt stops here too
                break
            written, equals, value = arg[2:].partition("=")
            name = _long_option(written, takes_value) if arg.startswith("--") else None
            declared_option = options.get(name) if name else None
            if name is None or declared_option is None:
                normalized.append(arg)  # not ours (or unknown, ambiguous): getopt judges it
                continue
            if not equals:
                if declared_option.boolean and (not rest or rest[0].startswith("-")):
                    value = "true"
                elif rest:
                    value = rest.pop(0)
                else:
                    normalized.append(arg)  # getopt says the value is missing
                    continue
            if declared_option.repeatable and name in first:
                normalized[first[name]] += " " + value
                continue
            first[name] = len(normalized)
            normalized.append(f"--{name}={value}")
        return normalized


def _long_option(written: str, takes_value: dict[str, bool]) -> str | None:
    """The long option that getopt takes ``--written`` for: itself, or the one it is an
    unambiguous prefix of."""
    if written in takes_value:
        return written
    matches = [name for name in takes_value if name.startswith(written)]
    return matches[0] if written and len(matches) == 1 else None


def installed_reactor(reactor: Any = None) -> Any:
    """``reactor``, else the one twistd has installed by the time it calls makeService."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    return reactor
