# -*- test-case-name: tests.test_client_tap -*-
"""
``twistd vespa-client`` options and makeService, ``build_client`` (the one place the client's
objects are wired) and the ``vespa-client`` console script (same flags, plus ``--list`` and an
interactive endpoint prompt, without twistd's own flags).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any, TextIO

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from vast_vespa.cli import SettingsOptions, flag_parameters, installed_reactor
from vast_vespa.client.keys import (
    EndpointKey,
    KeyLookupError,
    choose_endpoint,
    list_endpoints,
    read_account_key,
)
from vast_vespa.client.service import build_client, control_client
from vast_vespa.client.settings import ClientSettings, load_client_settings
from vast_vespa.logs import use_text_log
from vast_vespa.net.guard import choose_fast_path
from vast_vespa.net.listen import ListenFailed
from vast_vespa.options import SettingsError
from vast_vespa.runtime import tune_once_running

_log = Logger()


class Options(SettingsOptions):
    """``twistd vespa-client`` options: one flag per client setting (see
    vast_vespa.client.settings)."""

    synopsis = "--endpoint NAME [--api-key KEY] [options]"
    longdesc = (
        "Run a local proxy to a Vast serverless endpoint: every request to it is routed through "
        "the autoscaler to a worker, signed, and its answer streamed back. Every flag also reads "
        "the environment variable shown in brackets; flags win. A true/false flag given alone "
        "means true (--forward-authorization is --forward-authorization=true)."
    )
    settings_class = ClientSettings
    optParameters = flag_parameters(ClientSettings)
    # Declared here too, so that under twistd `--list` is not taken for an abbreviated --listen.
    optFlags = [["list", None, "Print the account's endpoints and exit (vespa-client command)."]]

    def __init__(self) -> None:
        super().__init__()
        self.settings = ClientSettings()

    def endpoint_optional(self) -> bool:
        """twistd has no prompt: the endpoint must be named."""
        return False

    def postOptions(self) -> None:
        if self["list"] and not self.endpoint_optional():
            raise SystemExit(
                "vespa-client: --list only works with the vespa-client command: "
                "run `vespa-client --list`"
            )
        try:
            self.settings = load_client_settings(self.flags())
        except SettingsError as e:
            raise SystemExit(f"vespa-client: {e}") from None
        if not self.settings.endpoint and not self.endpoint_optional():
            raise SystemExit(
                "vespa-client: no endpoint: pass --endpoint NAME or set VAST_ENDPOINT "
                "(`vespa-client --list` shows your endpoints)"
            )
        if not self.endpoint_optional():
            try:
                has_key = bool(self.settings.api_key or read_account_key(self.settings))
            except KeyLookupError as e:
                raise SystemExit(f"vespa-client: {e}") from None
            if not has_key:
                raise SystemExit(
                    "vespa-client: no key: pass --api-key (the endpoint key) or an account key "
                    f"(--account-key, VAST_ACCOUNT_KEY or {self.settings.account_key_file})"
                )


def makeService(options: Options, reactor: Any = None) -> IService:
    """twistd's entry point: the proxy described by the parsed options."""
    reactor = installed_reactor(reactor)
    tune_once_running(reactor, choose_fast_path(options.settings.fast_path, reactor))
    try:
        service = build_client(options.settings, reactor)
    except SettingsError as e:  # a WORKLOAD function that cannot be loaded
        raise SystemExit(f"vespa-client: {e}") from None
    return use_text_log(service, options)


class ScriptOptions(Options):
    """``vespa-client``: the twistd flags; --list prints the endpoints, and on a terminal a
    prompt offers them when no endpoint is named."""

    synopsis = "Usage: vespa-client [options]"

    def __init__(self, interactive: bool = False) -> None:
        super().__init__()
        self._interactive = interactive

    def endpoint_optional(self) -> bool:
        """--list needs no endpoint; on a terminal, a prompt offers the account's endpoints."""
        return bool(self["list"]) or self._interactive


async def _script(
    reactor: Any, options: ScriptOptions, read: Callable[[str], str], out: TextIO
) -> None:
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogBeginner, textFileLogObserver

    settings = options.settings
    http, pool = control_client(reactor, choose_fast_path(settings.fast_path, reactor))
    try:
        if options["list"] or not settings.endpoint:
            account_key = read_account_key(settings)
            if not account_key:
                raise KeyLookupError(
                    "listing endpoints needs an account key: --account-key, VAST_ACCOUNT_KEY "
                    f"or {settings.account_key_file}"
                )
            endpoints = await list_endpoints(http, reactor, settings, account_key)
            if options["list"]:
                for endpoint in endpoints:
                    out.write(endpoint.name + "\n")
                return
            chosen = choose_endpoint(endpoints, read, out)
            options.settings = settings = dataclasses.replace(settings, endpoint=chosen.name)
        await EndpointKey(settings, http, reactor).get()  # fail now, not on the 1st request
    except KeyLookupError as e:
        out.write(f"vespa-client: {e}\n")
        raise SystemExit(1) from None  # react() exits with the code of a SystemExit only
    finally:
        await pool.closeCachedConnections()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(out)])
    service = build_client(settings, reactor)
    try:
        service.startService()
    except ListenFailed as e:
        # react() sees a SystemExit only when it is not also an Exception: say it here.
        out.write(f"{e}\n")
        raise SystemExit(1) from None
    _log.info(
        "vespa-client: endpoint {endpoint} on {listen}",
        endpoint=settings.endpoint,
        listen=" ".join(settings.listen),
    )
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    await Deferred()  # until the reactor stops (Ctrl-C)


def main(argv: list[str] | None = None) -> None:
    """The ``vespa-client`` console script."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    options = ScriptOptions(interactive=sys.stdin.isatty())
    try:
        options.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        raise SystemExit(f"vespa-client: {e}\n{options}") from None

    def run(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(_script(reactor, options, input, sys.stdout))

    react(run)
