# -*- test-case-name: tests.test_plugin -*-
"""What every Vespa command line shares: its version flag, and the reactor twistd installed."""

from __future__ import annotations

import platform
from typing import Any

from twisted.python import usage

import twisted
from vast_vespa import __version__


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


def option_help(option: Any) -> str:
    """An option's help text with its environment variable and default."""
    default = option.default or "unset"
    return f"{option.help} [env {option.env}; default {default}]"


def installed_reactor(reactor: Any = None) -> Any:
    """``reactor``, else the one twistd has installed by the time it calls makeService."""
    if reactor is None:
        from twisted.internet import reactor as installed

        reactor = installed
    return reactor
