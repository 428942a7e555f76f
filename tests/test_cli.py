"""The four command lines: bare boolean flags, --help naming each flag's variable and default,
and a port that cannot be had told in one line (real twistd processes)."""

from __future__ import annotations

import os
import re
import socket
import sys

from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import spawn, twistd_command
from vast_vespa import sandbox
from vast_vespa.client import tap as client_tap
from vast_vespa.client.settings import ClientSettings
from vast_vespa.emulator import tap as emulator_tap
from vast_vespa.options import declared
from vast_vespa.settings import Settings
from vast_vespa.worker import tap as worker_tap

CLIENT_ARGS = ["--endpoint", "e", "--api-key", "k"]


def worker(*args: str) -> Settings:
    options = worker_tap.Options()
    options.parseOptions(list(args))
    return options.settings


def client(*args: str) -> ClientSettings:
    options = client_tap.Options()
    options.parseOptions([*CLIENT_ARGS, *args])
    return options.settings


class BooleanFlagTests(SynchronousTestCase):
    def test_worker_forms(self) -> None:
        """A bare boolean flag means true; a value after it, with or without =, is read as
        before; a prefix works as getopt's do."""
        for args, unsecured in [
            (["--unsecured"], True),
            (["--unsecured", "--listen", "tcp:1"], True),
            (["--listen", "tcp:1", "--unsecured"], True),
            (["--unsecured", "true"], True),
            (["--unsecured", "yes", "--listen", "tcp:1"], True),
            (["--unsecured=false"], False),
            (["--unsecured=true"], True),
            (["--unsecured", "no"], False),
            (["--unsecured", "0"], False),
            (["--unsecured", ""], False),
            (["--unsec"], True),
            (["--unsec", "off"], False),
            ([], False),
        ]:
            self.assertEqual(worker(*args).unsecured, unsecured, args)

    def test_worker_default_true(self) -> None:
        """--access-log (true by default) given bare stays true; =false turns it off."""
        self.assertTrue(worker("--access-log").access_log)
        self.assertFalse(worker("--access-log=false").access_log)
        self.assertFalse(worker("--access-log", "off", "--fast-path").access_log)
        self.assertTrue(worker("--access-log", "off", "--fast-path").fast_path)

    def test_client_forms(self) -> None:
        """The same forms for vespa-client's booleans."""
        self.assertTrue(client("--forward-authorization").forward_authorization)
        self.assertTrue(client("--forward-authorization", "--access-log").client_access_log)
        self.assertFalse(client("--forward-authorization", "no").forward_authorization)
        self.assertFalse(client("--access-log=false").client_access_log)
        self.assertFalse(client("--access-log", "false").client_access_log)

    def test_bad_value_after_a_boolean(self) -> None:
        """A word after a boolean flag is its value: a bad one is the usual one-line error."""
        with self.assertRaises(SystemExit) as caught:
            worker("--unsecured", "maybe")
        self.assertIn("invalid UNSECURED='maybe' (from flag --unsecured)", str(caught.exception))

    def test_values_of_other_flags_untouched(self) -> None:
        """A flag's value that looks like a flag (or a boolean word) is still its value."""
        settings = worker("--benchmark-cache", "--unsecured", "--blocked-paths", "true")
        self.assertEqual(settings.benchmark_cache, "--unsecured")
        self.assertFalse(settings.unsecured)
        self.assertEqual(settings.blocked_paths, ("true",))

    def test_repeated_listen(self) -> None:
        """--listen adds up however it is written; other flags: the last one wins."""
        settings = worker("--listen=tcp:1", "--max-wait-time", "3", "--listen", "tcp:2")
        self.assertEqual(settings.listen, ("tcp:1", "tcp:2"))
        self.assertEqual(worker("--max-wait-time", "3", "--max-wait-time=4").max_wait_time, 4.0)
        self.assertEqual(
            client("--listen", "tcp:1", "--listen", "tcp:2").listen, ("tcp:1", "tcp:2")
        )

    def test_list_is_not_listen(self) -> None:
        """vespa-client's --list stays its own flag, and a prefix of both is ambiguous."""
        options = client_tap.ScriptOptions()
        options.parseOptions(["--list"])
        self.assertTrue(options["list"])
        self.assertRaises(UsageError, client_tap.ScriptOptions().parseOptions, ["--lis", "x"])

    def test_under_twistd(self) -> None:
        """twistd hands its sub-command's arguments to these options: a bare flag works there."""
        config = ServerOptions()
        config.parseOptions(["-n", "vespa", "--unsecured", "--listen", "tcp:1"])
        self.assertTrue(config.subOptions.settings.unsecured)
        self.assertEqual(config.subOptions.settings.listen, ("tcp:1",))
        config = ServerOptions()
        config.parseOptions(["vespa-client", *CLIENT_ARGS, "--forward-authorization"])
        self.assertTrue(config.subOptions.settings.forward_authorization)


def help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help in a usage text, on one line without spaces (usage wraps it
    anywhere, inside words too)."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        match = re.match(r"\s+(?:-\w, )?--([\w-]+)=?\s+(.*)", line)
        if match:
            flag = match.group(1)
            entries[flag] = match.group(2)
        elif flag and line.startswith(" " * 10):
            entries[flag] += line
        else:
            flag = None
    return {name: "".join(text.split()) for name, text in entries.items()}


class HelpTests(SynchronousTestCase):
    def test_worker_and_client_flags(self) -> None:
        """Each declared flag is in --help with its variable and its default."""
        for options, settings_class in [
            (worker_tap.Options(), Settings),
            (client_tap.Options(), ClientSettings),
            (client_tap.ScriptOptions(), ClientSettings),
        ]:
            entries = help_entries(str(options))
            for _, option in declared(settings_class):
                expected = f"[env{option.env};default{option.shown_default}"
                self.assertIn(expected, entries[option.flag], option.flag)

    def test_every_flag_has_a_default(self) -> None:
        """On all four commands, each flag's help says its default (but --help, --version,
        vespa-client's --list)."""
        for options in [
            worker_tap.Options(),
            client_tap.Options(),
            emulator_tap.Options(),
            sandbox.Options(),
        ]:
            entries = help_entries(str(options))
            self.assertGreater(len(entries), 5)
            for flag, text in entries.items():
                if flag not in ("help", "version", "list"):
                    self.assertIn("default", text, f"{type(options).__module__} --{flag}")

    def test_script_usage_line(self) -> None:
        """vespa-client's --help starts with how to run it."""
        self.assertTrue(
            str(client_tap.ScriptOptions()).startswith("Usage: vespa-client [options]\n")
        )


class ScriptHelpTests(TestCase):
    timeout = 30

    async def test_console_script_help(self) -> None:
        """The installed vespa-client command's --help starts with its usage line and exits 0."""
        script = os.path.join(os.path.dirname(sys.executable), "vespa-client")
        process = spawn(self, [script, "--help"])
        self.assertEqual(await process.ended, 0)
        self.assertTrue(process.output.startswith(b"Usage: vespa-client [options]\n"))
        self.assertIn(b"--forward-authorization=", process.output)


class BusyPortTests(TestCase):
    """A port already taken: one line naming the listener and the flag to set, a non-zero exit,
    no traceback; run as the user runs them, with a port held open by this test."""

    timeout = 60

    def setUp(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        self.port = taken.getsockname()[1]
        self.busy = f"tcp:{self.port}:interface=127.0.0.1"

    async def assert_one_line(self, args: list[str], expected: str) -> None:
        process = spawn(self, args, {"HOME": self.mktemp()})
        self.assertNotEqual(await process.ended, 0)
        self.assertIn(expected.encode(), process.output)
        self.assertNotIn(b"Traceback", process.output)
        self.assertEqual(process.output.count(b"cannot listen"), 1)

    async def test_worker(self) -> None:
        """twistd vespa: the worker's own listener names --listen / LISTEN."""
        command = twistd_command(
            "-n",
            "--pidfile=",
            "vespa",
            "--unsecured",
            "--admin-listen",
            "none",
            "--listen",
            self.busy,
        )
        await self.assert_one_line(
            command,
            f"vespa: cannot listen on {self.busy}: address already in use (set --listen / LISTEN)",
        )

    async def test_worker_admin(self) -> None:
        """twistd vespa: the admin listener names --admin-listen / ADMIN_LISTEN."""
        command = twistd_command(
            "-n", "--pidfile=", "vespa", "--unsecured", "--listen", "tcp:0:interface=127.0.0.1"
        )
        await self.assert_one_line(
            [*command, "--admin-listen", self.busy],
            f"vespa: cannot listen on {self.busy}: address already in use "
            "(set --admin-listen / ADMIN_LISTEN)",
        )

    async def test_client_plugin(self) -> None:
        """twistd vespa-client names --listen / VESPA_CLIENT_LISTEN."""
        command = twistd_command("-n", "--pidfile=", "vespa-client", *CLIENT_ARGS)
        await self.assert_one_line(
            [*command, "--listen", self.busy],
            f"vespa-client: cannot listen on {self.busy}: address already in use "
            "(set --listen / VESPA_CLIENT_LISTEN)",
        )

    async def test_client_script(self) -> None:
        """The vespa-client command says the same."""
        script = os.path.join(os.path.dirname(sys.executable), "vespa-client")
        await self.assert_one_line(
            [script, *CLIENT_ARGS, "--listen", self.busy],
            f"vespa-client: cannot listen on {self.busy}: address already in use "
            "(set --listen / VESPA_CLIENT_LISTEN)",
        )

    async def test_emulator(self) -> None:
        """twistd vespa-autoscaler names --listen."""
        state = os.path.abspath(self.mktemp())
        command = twistd_command("-n", "--pidfile=", "vespa-autoscaler", "--state-dir", state)
        await self.assert_one_line(
            [*command, "--listen", self.busy],
            f"vespa-autoscaler: cannot listen on {self.busy}: address already in use "
            "(set --listen)",
        )

    async def test_sandbox(self) -> None:
        """twistd vespa-sandbox names its own flag for the port (the backend's listens first,
        so nothing else is taken from other tests)."""
        state = os.path.abspath(self.mktemp())
        command = twistd_command("-n", "--pidfile=", "vespa-sandbox", "--state-dir", state)
        await self.assert_one_line(
            [*command, "--backend-port", str(self.port)],
            f"vespa-sandbox: cannot listen on {self.busy}: address already in use "
            "(set --backend-port)",
        )
