# -*- test-case-name: tests.test_emulator_resource -*-
"""
``twistd vespa-autoscaler``: options and wiring of the local autoscaler emulator. A development
and test tool, never a production router. Reads flags and an optional JSON config file only
(never the environment).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.application.service import MultiService
from twisted.logger import Logger

from vast_vespa import signing
from vast_vespa.cli import CommandOptions, installed_reactor
from vast_vespa.emulator.registry import Endpoint, Registry
from vast_vespa.emulator.resource import AutoscalerResource
from vast_vespa.net.listen import listen_service
from vast_vespa.options import parse_listen, parse_positive_number
from vast_vespa.settings import SIGNATURE_SHAPES
from vast_vespa.site import VespaSite

DEFAULT_ENDPOINT = Endpoint("my-endpoint", "local-endpoint-key", 1)
DEFAULT_ACCOUNT_KEY = "local-account-key"
KEY_FILE_NAME = "autoscaler_key.pem"
WARNING = "a development and test tool, never a production router"


class ConfigError(ValueError):
    """The emulator's flags or config file are unusable; the message is for the user."""


@dataclass(frozen=True)
class EmulatorConfig:
    """Everything the emulator needs, from flags and the config file (flags win)."""

    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    state_dir: str = ".vespa-autoscaler"
    key_file: str = ""
    endpoints: tuple[Endpoint, ...] = (DEFAULT_ENDPOINT,)
    account_key: str = DEFAULT_ACCOUNT_KEY
    shape: str = "url"
    stale_after: float = 30.0
    # A key object instead of a file (the sandbox and tests share one).
    key: rsa.RSAPrivateKey | None = field(default=None, compare=False)


def parse_endpoint(text: str, endpoint_id: int) -> Endpoint:
    """``NAME=KEY`` or ``NAME=KEY=MTOKEN`` (only workers with that mtoken serve it)."""
    name, sep, rest = text.partition("=")
    key, _, mtoken = rest.partition("=")
    if not sep or not name.strip() or not key.strip():
        raise ConfigError(f"invalid --endpoint {text!r}: expected NAME=KEY (or NAME=KEY=MTOKEN)")
    return Endpoint(name.strip(), key.strip(), endpoint_id, mtoken)


def _config_endpoints(value: Any) -> tuple[Endpoint, ...]:
    """The config file's ``endpoints``: ``{"name": "key"}`` or a list of objects."""
    if isinstance(value, dict):
        value = [{"name": name, "api_key": key} for name, key in value.items()]
    if not isinstance(value, list):
        raise ConfigError("endpoints: expected {name: api_key} or a list of objects")
    endpoints = []
    for index, item in enumerate(value, 1):
        try:
            endpoints.append(
                Endpoint(
                    str(item["name"]),
                    str(item["api_key"]),
                    int(item.get("id", index)),
                    str(item.get("mtoken", "")),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            raise ConfigError(
                f"endpoints[{index - 1}]: expected {{name, api_key[, id][, mtoken]}}"
            ) from None
    return tuple(endpoints)


def load_config_file(path: str) -> dict[str, Any]:
    """The JSON config file as EmulatorConfig field values (see the README for its keys)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read --config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a JSON object")
    known = {"listen", "state_dir", "key_file", "endpoints", "account_key", "shape", "stale_after"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name == "endpoints":
            values[name] = _config_endpoints(value)
        elif name == "listen":
            values[name] = tuple(map(str, value)) if isinstance(value, list) else (str(value),)
        else:
            values[name] = str(value)
    return values


def make_config(values: dict[str, Any]) -> EmulatorConfig:
    """Validate field values (text as given by flags or the file) into an EmulatorConfig."""
    values = dict(values)
    if values.get("shape") is not None and values["shape"] not in SIGNATURE_SHAPES:
        raise ConfigError(f"invalid shape {values['shape']!r}: expected url or five-field")
    try:
        if "stale_after" in values:
            values["stale_after"] = parse_positive_number(values["stale_after"])
        if "listen" in values:
            values["listen"] = parse_listen(" ".join(values["listen"]))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    names = [e.name for e in values.get("endpoints", ())]
    if len(set(names)) != len(names):
        raise ConfigError(f"endpoint names must be unique, got {names}")
    return replace(EmulatorConfig(), **values)


def load_key(config: EmulatorConfig) -> rsa.RSAPrivateKey:
    """The signing key: given, from --key, or kept in the state directory (made on first start)."""
    if config.key is not None:
        return config.key
    path = config.key_file or os.path.join(config.state_dir, KEY_FILE_NAME)
    if config.key_file or os.path.exists(path):
        try:
            with open(path, "rb") as f:
                return signing.load_private_key(f.read())
        except (OSError, ValueError, TypeError) as e:  # TypeError: encrypted, no password
            raise ConfigError(f"cannot load the signing key {path}: {e}") from None
    key = signing.generate_private_key()
    os.makedirs(config.state_dir, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(signing.private_pem(key))
    return key


class AutoscalerService(MultiService):
    """The emulator: its registry, its site, one listener per --listen."""

    _log = Logger()

    def __init__(self, config: EmulatorConfig, registry: Registry) -> None:
        super().__init__()
        self.config = config
        self.registry = registry
        self.site = VespaSite(
            AutoscalerResource(registry), name="autoscaler emulator"
        )  # routes and refusals are logged

    def startService(self) -> None:
        self._log.info(
            "Vespa autoscaler emulator ({caveat}); signing {shape} shape; account key "
            "{account_key}; endpoints: {endpoints}",
            caveat=WARNING,
            shape=self.config.shape,
            account_key=self.config.account_key,
            endpoints=", ".join(f"{e.name} (key {e.api_key})" for e in self.config.endpoints),
        )
        super().startService()


def build_autoscaler(config: EmulatorConfig, reactor: Any) -> AutoscalerService:
    """Wire the emulator (tests and the sandbox call this directly)."""
    registry = Registry(
        load_key(config),
        config.endpoints,
        config.shape,
        config.account_key,
        reactor.seconds,
        config.stale_after,
    )
    service = AutoscalerService(config, registry)
    for index, description in enumerate(config.listen):
        listener = listen_service(
            description, service.site, reactor, "vespa-autoscaler", "--listen", fast_path=False
        )
        listener.setName(f"listen-{index}")
        listener.setServiceParent(service)
    return service


class Options(CommandOptions):
    """``twistd vespa-autoscaler`` options."""

    synopsis = "[options]"
    longdesc = (
        "A local emulator of the Vast.ai autoscaler: /pubkey/, /route/ (signed replies), "
        "/worker_status/ and /delete_requests/ (checked field by field: 400 lists what is "
        "wrong), the endpoint listing API, /get_endpoint_workers/, and a status page at /. "
        f"It is {WARNING}."
    )
    optParameters = [
        ["state-dir", None, None, "Directory keeping the signing key [default .vespa-autoscaler]."],
        ["key", None, None, "PEM private key to sign with [default: made in --state-dir]."],
        ["account-key", None, None, f"Account API key [default {DEFAULT_ACCOUNT_KEY}]."],
        ["shape", None, None, "Signed message shape: url or five-field [default url]."],
        [
            "stale-after",
            None,
            None,
            "Seconds without a report before a worker gets no requests [default 30].",
        ],
        [
            "config",
            None,
            None,
            "JSON file with any of: listen, state_dir, key_file, "
            "endpoints, account_key, shape, stale_after (flags win) [default none].",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["endpoint"] = []
        self.config = EmulatorConfig()

    def opt_listen(self, description: str) -> None:
        """Listen here; repeatable [default tcp:8080:interface=127.0.0.1]"""
        self["listen"].append(description)

    def opt_endpoint(self, text: str) -> None:
        """NAME=KEY (or NAME=KEY=MTOKEN); repeatable [default my-endpoint=local-endpoint-key]"""
        self["endpoint"].append(text)

    def postOptions(self) -> None:
        try:
            values = load_config_file(self["config"]) if self["config"] else {}
            flags = {
                "listen": self["listen"] or None,
                "state_dir": self["state-dir"],
                "key_file": self["key"],
                "account_key": self["account-key"],
                "shape": self["shape"],
                "stale_after": self["stale-after"],
            }
            values.update({name: value for name, value in flags.items() if value is not None})
            if self["endpoint"]:
                values["endpoints"] = tuple(
                    parse_endpoint(text, index) for index, text in enumerate(self["endpoint"], 1)
                )
            self.config = make_config(values)
        except ConfigError as e:
            raise SystemExit(f"vespa-autoscaler: {e}") from None


def makeService(options: Options, reactor: Any = None) -> AutoscalerService:
    """twistd's entry point."""
    try:
        return build_autoscaler(options.config, installed_reactor(reactor))
    except ConfigError as e:
        raise SystemExit(f"vespa-autoscaler: {e}") from None
