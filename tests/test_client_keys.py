"""Keys: which key the client routes with, the endpoint look-up, --list, masking."""

from __future__ import annotations

import io
import os
from typing import cast

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import CannedHTTP, FakeRouter
from tests.helpers import http_client, listen
from vast_vespa.client.keys import (
    EndpointInfo,
    EndpointKey,
    KeyLookupError,
    choose_endpoint,
    list_endpoints,
    read_account_key,
)
from vast_vespa.client.settings import ClientSettings, load_client_settings
from vast_vespa.signing import generate_private_key


class MaskTests(SynchronousTestCase):
    def test_settings_repr_hides_keys(self) -> None:
        """Settings never show keys in their repr (tracebacks, logs)."""
        settings = ClientSettings(api_key="secret-endpoint-key", account_key="secret-account")
        self.assertNotIn("secret", repr(settings))


class PrecedenceTests(SynchronousTestCase):
    def test_flag_beats_environment(self) -> None:
        """--api-key beats VAST_API_KEY; VAST_API_KEY is read when no flag is given."""
        env = {"VAST_API_KEY": "from-env"}
        self.assertEqual(load_client_settings({}, env).api_key, "from-env")
        self.assertEqual(load_client_settings({"api_key": "from-flag"}, env).api_key, "from-flag")

    def test_account_key_file(self) -> None:
        """Without --account-key/VAST_ACCOUNT_KEY the ~/.vast_api_key file is read, stripped."""
        home = self.mktemp()
        os.makedirs(home)
        with open(os.path.join(home, ".vast_api_key"), "w") as f:
            f.write("file-account-key\n")
        settings = load_client_settings({}, {"HOME": home})
        self.assertEqual(read_account_key(settings), "file-account-key")
        settings = load_client_settings({}, {"HOME": home, "VAST_ACCOUNT_KEY": "env-key"})
        self.assertEqual(read_account_key(settings), "env-key")
        self.assertEqual(read_account_key(load_client_settings({}, {"HOME": "/nonexistent"})), "")

    def test_account_key_file_not_text(self) -> None:
        """A key file that is not UTF-8 text is a KeyLookupError naming it, not a traceback."""
        home = self.mktemp()
        os.makedirs(home)
        path = os.path.join(home, ".vast_api_key")
        with open(path, "wb") as f:
            f.write(b"\xff\xfe key")
        with self.assertRaises(KeyLookupError) as caught:
            read_account_key(load_client_settings({}, {"HOME": home}))
        self.assertEqual(
            str(caught.exception), f"cannot read {path}: not text (a Vast API key is plain text)"
        )

    def test_choose_endpoint(self) -> None:
        """The prompt takes a number or a name, and asks again after a wrong answer."""
        endpoints = [EndpointInfo("a"), EndpointInfo("b")]
        answers = iter(["9", "\u00b2", "b"])  # "²" is a digit to str.isdigit, not to int()
        out = io.StringIO()
        self.assertEqual(choose_endpoint(endpoints, lambda _: next(answers), out).name, "b")
        self.assertIn("  1  a", out.getvalue())
        self.assertIn("no endpoint '9'", out.getvalue())
        self.assertIn("no endpoint '\u00b2'", out.getvalue())
        self.assertEqual(choose_endpoint(endpoints, lambda _: "1", out).name, "a")


class LookupCancelTests(SynchronousTestCase):
    def test_cancelled(self) -> None:
        """A look-up cancelled (the app hung up) fails with CancelledError: neither a
        KeyLookupError (the app would be told its key is wrong) nor a retry."""
        settings = ClientSettings(endpoint="e", account_key="acct", account_key_file="/nonexistent")
        stand_in = cast(HTTPClient, CannedHTTP(None))  # get is all a look-up calls
        looking = EndpointKey(settings, stand_in, Clock()).get()
        looking.cancel()
        self.failureResultOf(looking, CancelledError)


class LookupTests(TestCase):
    def setUp(self) -> None:
        self.autoscaler = FakeRouter(generate_private_key(), ["http://127.0.0.1:1"])
        self.url = listen(self, self.autoscaler)
        self.http = http_client(self)

    def settings(self, **changes: object) -> ClientSettings:
        values: dict[str, object] = {
            "endpoint": "my-endpoint",
            "instance": "local",
            "console_url": self.url,
            "account_key_file": "/nonexistent",
        }
        values.update(changes)
        return ClientSettings(**values)  # type: ignore[arg-type]

    async def test_endpoint_key_from_account_key(self) -> None:
        """With only an account key, the endpoint's key is looked up by endpoint name."""
        settings = self.settings(account_key=self.autoscaler.account_key)
        key = await EndpointKey(settings, self.http, reactor).get()
        self.assertEqual(key, self.autoscaler.api_key)

    async def test_api_key_wins(self) -> None:
        """An endpoint key given directly is used without asking the console."""
        settings = self.settings(api_key="direct-key", console_url="http://127.0.0.1:1")
        self.assertEqual(await EndpointKey(settings, self.http, reactor).get(), "direct-key")

    async def test_unknown_endpoint(self) -> None:
        """An endpoint the account does not have: the error lists the ones it has."""
        settings = self.settings(endpoint="nope", account_key=self.autoscaler.account_key)
        with self.assertRaises(KeyLookupError) as caught:
            await EndpointKey(settings, self.http, reactor).get()
        self.assertIn("another, my-endpoint", str(caught.exception))

    async def test_bad_account_key_masked(self) -> None:
        """A refused account key is named masked in the error, never in full."""
        settings = self.settings(account_key="bad-account-key-0123456789")
        with self.assertRaises(KeyLookupError) as caught:
            await EndpointKey(settings, self.http, reactor).get()
        self.assertIn("bad-...", str(caught.exception))
        self.assertNotIn("bad-account-key-0123456789", str(caught.exception))

    async def test_no_key_at_all(self) -> None:
        """No key anywhere: the error says which flags and variables to use."""
        with self.assertRaises(KeyLookupError) as caught:
            await EndpointKey(self.settings(), self.http, reactor).get()
        self.assertIn("--api-key", str(caught.exception))
        self.assertIn("VAST_ACCOUNT_KEY", str(caught.exception))

    async def test_list_endpoints(self) -> None:
        """The endpoints API lists the account's endpoints, sorted by name."""
        endpoints = await list_endpoints(
            self.http, reactor, self.settings(), self.autoscaler.account_key
        )
        self.assertEqual([e.name for e in endpoints], ["another", "my-endpoint"])
        self.assertEqual(endpoints[1].id, 7)
