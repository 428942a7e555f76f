# -*- test-case-name: tests.test_options,tests.test_settings,tests.test_readme -*-
"""
How an option is declared and read, for the worker's settings (:mod:`vast_vespa.settings`) and
the client's (:mod:`vast_vespa.client.settings`).

An option is declared once, as a field of a frozen settings dataclass made by :func:`option`:
its environment variable (and older spellings), its flag, its parser, its default (as text,
parsed into the field's default) and its help. The flags of the commands, their ``--help``, the
README's tables and the reading of flags and environment all derive from that declaration.

Precedence is flag > environment variable (first of its spellings that is set) > default. A bad
value raises :class:`SettingsError` whose message names the option, where the value came from,
and the value.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock

from vast_vespa.net.tls import server_tls


class SettingsError(ValueError):
    """A setting has a value Vespa cannot use; the message is meant for the user as is."""


# Parsers: text -> value; raise ValueError with a short "expected ..." text.


def parse_text(text: str) -> str:
    return text.strip()


TRUE_WORDS = ("1", "true", "yes", "y", "on", "t")
FALSE_WORDS = ("0", "false", "no", "n", "off", "f", "")


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError("expected true or false (also yes/no, on/off, 1/0)")


def parse_seconds(text: str) -> float:
    """A duration in seconds, >= 0 (0 usually means "off")."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a finite number of seconds >= 0")
    return value


def parse_positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a finite number > 0")
    return value


def parse_optional_positive_number(text: str) -> float | None:
    """A number > 0, or empty for "not set"."""
    return parse_positive_number(text) if text.strip() else None


def parse_count(text: str) -> int:
    """A whole number >= 0."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < 0:
        raise ValueError("expected a whole number >= 0")
    return value


def parse_optional_count(text: str) -> int | None:
    """A whole number >= 0, or empty for "the default derived from another option"."""
    return parse_count(text) if text.strip() else None


def parse_size(text: str) -> int:
    """A size in bytes: a whole number, optionally with a k/M/G suffix (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError("expected a size in bytes such as 1048576, 64k, 512M or 1G")
    return int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2)]


def parse_port(text: str) -> int:
    value = parse_count(text)
    if not 0 < value < 65536:
        raise ValueError("expected a TCP port between 1 and 65535")
    return value


def parse_http_url(text: str) -> str:
    """An absolute http(s) URL with a host, without a trailing slash."""
    value = text.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an absolute URL such as http://localhost:8000")
    if parts.query or parts.fragment:
        raise ValueError("expected a URL without query or fragment")
    return value.rstrip("/")


def parse_url_list(text: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs (Vast sets REPORT_ADDR this way)."""
    return tuple(parse_http_url(item) for item in text.split(",") if item.strip())


def parse_words(text: str) -> tuple[str, ...]:
    """Comma-separated words, whitespace trimmed, empty items dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_path(text: str) -> str:
    value = text.strip()
    if not value.startswith("/"):
        raise ValueError("expected a path starting with /")
    return value


def parse_listen(text: str) -> tuple[str, ...]:
    """
    One or more Twisted server endpoint strings separated by whitespace
    (``tcp:3000``, ``ssl:443:privateKey=...``, ``unix:/run/vespa.sock``, ``systemd:...``).
    """
    descriptions = tuple(text.split())
    if not descriptions:
        raise ValueError("expected an endpoint string such as tcp:3000")
    for description in descriptions:
        try:
            # No reactor: the endpoint parsers only keep it for listen(), never called on this
            # endpoint, which is thrown away. Importing the global reactor here would install
            # the default one before twistd installs the one asked for.
            if server_tls(description, Clock()) is None:  # an ssl: one as it will be served
                serverFromString(None, description)
        except Exception as e:  # parsers raise many kinds (OSError, OpenSSL errors, ...)
            raise ValueError(f"expected a Twisted endpoint string such as tcp:3000 ({e})") from None
    return descriptions


def choice(*allowed: str) -> Callable[[str], str]:
    def parse_choice(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return value

    return parse_choice


# Declaring options.

_OPTION = "vast_vespa.option"


@dataclass(frozen=True)
class Option:
    """Where one setting comes from and how its text becomes a value."""

    env: str
    flag: str
    parse: Callable[[str], Any]
    default: str
    help: str
    # Older spellings still read (after the main name), e.g. READY_TIMEOUT_INITIAL.
    old_env: tuple[str, ...] = ()
    # Also read with this prefix, first (the worker's PYWORKER_ alias that Vast templates set).
    env_prefix: str = ""
    # A flag given several times adds up (the parser takes whitespace-separated items).
    repeatable: bool = False

    def env_names(self) -> tuple[str, ...]:
        """Environment variables to look at, first match wins."""
        names: list[str] = []
        for env in (self.env, *self.old_env):
            names += [self.env_prefix + env, env] if self.env_prefix else [env]
        return tuple(names)

    @property
    def boolean(self) -> bool:
        """Whether the flag may be given bare, meaning true."""
        return self.parse is parse_bool

    @property
    def shown_default(self) -> str:
        """The default as the help and the README show it."""
        return self.default or "unset"

    @property
    def naming(self) -> str:
        """How to set it, for messages: ``--listen / LISTEN``."""
        return f"--{self.flag} / {self.env}"


def option(
    env: str,
    flag: str,
    parse: Callable[[str], Any],
    default: str,
    help: str,
    *,
    old_env: tuple[str, ...] = (),
    env_prefix: str = "",
    repeatable: bool = False,
) -> Any:
    """
    A dataclass field declaring an option; its default is ``parse(default)``, so the text that
    the help and the README show is the value a settings object gets.

    Typed ``Any`` as :func:`dataclasses.field` is, so that ``port: int = option(...)`` checks.
    """
    declaration = Option(env, flag, parse, default, help, old_env, env_prefix, repeatable)
    return field(default=parse(default), metadata={_OPTION: declaration})


def declared(settings_class: type) -> tuple[tuple[str, Option], ...]:
    """The options of a settings dataclass: (field name, declaration), in field order."""
    return tuple(
        (f.name, f.metadata[_OPTION]) for f in fields(settings_class) if _OPTION in f.metadata
    )


def declaration(settings_class: type, name: str) -> Option:
    """The declaration of the field ``name``."""
    return dict(declared(settings_class))[name]


def is_given(
    settings_class: type, name: str, flags: Mapping[str, str | None], environ: Mapping[str, str]
) -> bool:
    """Whether the option ``name`` is set by a flag or in the environment."""
    envs = declaration(settings_class, name).env_names()
    return flags.get(name) is not None or any(env in environ for env in envs)


def read_options(
    settings_class: type, flags: Mapping[str, str | None], environ: Mapping[str, str]
) -> dict[str, Any]:
    """
    Each option of ``settings_class`` parsed from its flag (field name -> text, or None when
    not given), else its environment variables, else its default.

    @raise SettingsError: for the first bad value, naming the option, its source and the value.
    """
    values: dict[str, Any] = {}
    for name, declared_option in declared(settings_class):
        text, source = declared_option.default, "default"
        for env in declared_option.env_names():
            if env in environ:
                text, source = environ[env], f"environment variable {env}"
                break
        if flags.get(name) is not None:
            text, source = str(flags[name]), f"flag --{declared_option.flag}"
        try:
            values[name] = declared_option.parse(text)
        except ValueError as e:
            raise SettingsError(
                f"invalid {declared_option.env}={text!r} (from {source}): {e}"
            ) from None
    return values


def markdown_table(settings_class: type) -> str:
    """The README's table of the options of ``settings_class``."""
    lines = ["| env var | flag | default | meaning |", "|---|---|---|---|"]
    for _, declared_option in declared(settings_class):
        env = f"`{declared_option.env}`"
        if declared_option.old_env:
            env += " (also " + ", ".join(f"`{old}`" for old in declared_option.old_env) + ")"
        default = f"`{declared_option.default}`" if declared_option.default else "unset"
        meaning = declared_option.help.replace("|", "\\|")
        lines.append(f"| {env} | `--{declared_option.flag}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def markdown_command(settings_class: type, program: str, argv: Sequence[str]) -> int:
    """``python -m <module> --markdown``: print the README table of ``settings_class``."""
    if list(argv) != ["--markdown"]:
        sys.stderr.write(f"usage: python -m {program} --markdown  (prints the README table)\n")
        return 2
    sys.stdout.write(markdown_table(settings_class))
    return 0


def load_function(setting: str, spec: str, module_name: Callable[[str], str] = str) -> Any:
    """
    The function a setting names as ``module.path:function`` (split on the last colon; the
    module's name passed through ``module_name`` first), imported now.

    @raise SettingsError: naming the setting, the spec and what went wrong (missing module,
        attribute, a module that raises on import, something not callable).
    """
    name, _, attribute = spec.rpartition(":")
    if not name or not attribute:
        raise SettingsError(f"invalid {setting}={spec!r}: expected module.path:function")
    try:
        module = importlib.import_module(module_name(name))
    except Exception as e:
        # Show where the user's module broke (their code), not our import machinery.
        where = traceback.format_exception_only(type(e), e)[-1].strip()
        raise SettingsError(f"cannot load {setting}={spec!r}: {where}") from None
    function: Any = module
    for part in attribute.split("."):
        try:
            function = getattr(function, part)
        except AttributeError:
            raise SettingsError(
                f"cannot load {setting}={spec!r}: {name} has no attribute {attribute!r}"
            ) from None
    if not callable(function):
        raise SettingsError(f"cannot load {setting}={spec!r}: {attribute} is not callable")
    return function
