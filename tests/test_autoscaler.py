"""The autoscaler client against a fake autoscaler on real sockets: fail-over, bodies, pubkey."""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.fakes import FakeAutoscaler
from tests.helpers import http_client, listen, until
from vast_vespa.signing import generate_private_key, public_pem
from vast_vespa.worker.autoscaler import (
    AutoscalerClient,
    AutoscalerError,
    PublicKeyStore,
    pem_from,
)
from vast_vespa.worker.metrics import Finished

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


def entries() -> list[Finished]:
    return [
        Finished(1, 11, True, "Success", 1.0, 2.0, 3.0),
        Finished(2, 12, False, "Error", 1.0, 2.0, 3.0),
        Finished(3, 13, True, "Cancelled", 1.0, 0.0, 3.0),
    ]


class ClientTests(TestCase):
    def client(self, addrs, clock=None, **kwargs) -> AutoscalerClient:
        return AutoscalerClient(
            http_client(self), clock or reactor, addrs, "secret-token-123", 4242, **kwargs
        )

    async def test_status_fails_over_in_order(self):
        """An address that errors or is unreachable is skipped; the first that takes the
        report is used and later ones are not called."""
        broken, good, spare = FakeAutoscaler(), FakeAutoscaler(), FakeAutoscaler()
        broken.codes[b"/worker_status/"] = 500
        addrs = [DEAD, listen(self, broken), listen(self, good) + "/", listen(self, spare)]
        used = await self.client(addrs).post_status({"id": 1, "cur_load": 2.5})
        self.assertEqual(used, addrs[2].rstrip("/"))
        self.assertEqual(good.statuses, [{"id": 1, "cur_load": 2.5}])
        self.assertEqual((broken.statuses, spare.statuses), ([], []))

    async def test_all_down_fails(self):
        """When every address fails, the call fails naming each one."""
        broken = FakeAutoscaler()
        broken.codes[b"/worker_status/"] = 503
        url = listen(self, broken)
        with self.assertRaises(AutoscalerError) as caught:
            await self.client([DEAD, url]).post_status({})
        self.assertIn(url + ": HTTP 503", str(caught.exception))
        self.assertIn(DEAD, str(caught.exception))

    async def test_hung_address_times_out_and_fails_over(self):
        """An address that never answers is abandoned after the timeout for the next one."""
        hung, good = FakeAutoscaler(), FakeAutoscaler()
        hung.hang.add(b"/worker_status/")
        clock = Clock()
        client = self.client([listen(self, hung), listen(self, good)], clock, timeout=5.0)
        sent = client.post_status({"n": 1})
        await until(lambda: hung.hung)
        clock.advance(5)
        await sent
        self.assertEqual(good.statuses, [{"n": 1}])

    async def test_delete_bodies_batches(self):
        """Batches form: one POST per success flag, successes first (PROTOCOL 4.6)."""
        fake = FakeAutoscaler()
        await self.client([listen(self, fake)]).post_deletes(entries())
        self.assertEqual(
            fake.deletes,
            [
                {
                    "worker_id": 4242,
                    "mtoken": "secret-token-123",
                    "request_idxs": [11, 13],
                    "success": True,
                },
                {
                    "worker_id": 4242,
                    "mtoken": "secret-token-123",
                    "request_idxs": [12],
                    "success": False,
                },
            ],
        )

    def test_deletes_skip_the_legacy_address(self):
        """/delete_requests/ never goes to the old https://cloud.vast.ai/api/v0 address;
        reports may."""
        client = self.client(["https://cloud.vast.ai/api/v0/", "http://b"])
        self.assertEqual(client.addrs, ("https://cloud.vast.ai/api/v0", "http://b"))
        self.assertEqual(client.delete_addrs, ("http://b",))

    async def test_delete_bodies_list(self):
        """List form: one POST with every request, its status and timings."""
        fake = FakeAutoscaler()
        await self.client([listen(self, fake)], delete_format="list").post_deletes(entries())
        (body,) = fake.deletes
        self.assertEqual(body["worker_id"], 4242)
        self.assertEqual(
            [(r["request_idx"], r["success"], r["status"]) for r in body["requests"]],
            [(11, True, "Success"), (12, False, "Error"), (13, True, "Cancelled")],
        )
        self.assertEqual(body["requests"][0]["work_completed_at"], 3.0)
        self.assertEqual(fake.deleted(), {11: True, 12: False, 13: True})

    async def test_pubkey_from_the_first_address_that_has_one(self):
        """/pubkey/ is asked from each address in order until one serves a key."""
        key = generate_private_key()
        empty, full = FakeAutoscaler(), FakeAutoscaler(public_pem(key))
        got = await self.client([listen(self, empty), listen(self, full)]).fetch_pubkey()
        self.assertEqual(got.public_numbers(), key.public_key().public_numbers())
        self.assertEqual((empty.pubkey_requests, full.pubkey_requests), (1, 1))

    def test_lenient_pem_and_secret_logging(self):
        """A PEM sent as a JSON string is accepted; the token is never shown in full."""
        pem = b"-----BEGIN PUBLIC KEY-----\nAAA\n-----END PUBLIC KEY-----\n"
        self.assertEqual(pem_from(json.dumps(pem.decode()).encode()), pem.strip())
        self.assertEqual(pem_from(b"  " + pem), pem.strip())
        self.assertNotIn("token-123", self.client([DEAD]).describe())


class KeyStoreTests(TestCase):
    async def test_retries_with_backoff_until_the_key_is_served(self):
        """At start-up the key is fetched in the background, retried after 1 s, 2 s ...
        until the autoscaler serves it."""
        fake = FakeAutoscaler()
        clock = Clock()
        client = AutoscalerClient(http_client(self), clock, [listen(self, fake)], "", None)
        store = PublicKeyStore(clock, client)
        store.startService()
        self.addCleanup(store.stopService)
        await until(lambda: fake.pubkey_requests == 1 and store._retry is not None)
        self.assertIsNone(store.key)
        clock.advance(1)
        await until(lambda: fake.pubkey_requests == 2 and store._retry is not None)
        self.assertEqual(store._retry.getTime(), 3.0)  # backoff doubled
        fake.pubkey = public_pem(generate_private_key())
        clock.advance(2)
        await until(lambda: store.key is not None)
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_refresh_only_when_stale(self):
        """A key older than refresh_after may be fetched again (rotation), once per period."""
        old, new = generate_private_key(), generate_private_key()
        fake = FakeAutoscaler(public_pem(old))
        clock = Clock()
        client = AutoscalerClient(http_client(self), clock, [listen(self, fake)], "", None)
        store = PublicKeyStore(clock, client, refresh_after=300)
        store.startService()
        self.addCleanup(store.stopService)
        await until(lambda: store.key is not None)
        self.assertFalse(store.stale())
        clock.advance(300)
        self.assertTrue(store.stale())
        fake.pubkey = public_pem(new)
        refreshed: Deferred[None] = store.refresh()
        self.assertFalse(store.stale())  # one attempt per period
        await refreshed
        self.assertEqual(store.key.public_numbers(), new.public_key().public_numbers())
