"""The autoscaler client against fake autoscalers (in memory, then once on real sockets):
fail-over, bodies, timeouts, the public key and its store."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent

from tests.fakes import FakeAutoscaler
from tests.helpers import http_client, listen
from tests.memory import MemoryNetwork, memory_http
from vast_vespa.signing import generate_private_key, public_pem
from vast_vespa.worker.autoscaler import (
    ANSWER_SHOWN,
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


class ClientTests(SynchronousTestCase):
    """The client's decisions in memory: fake autoscalers on a MemoryNetwork, on a Clock."""

    def setUp(self) -> None:
        self.network = MemoryNetwork()
        self.clock = Clock()
        self.ports = itertools.count(9000)

    def serve(self, fake: FakeAutoscaler) -> str:
        return self.network.serve(f"http://127.0.0.1:{next(self.ports)}", fake)

    def client(self, addrs: Sequence[str], **kwargs: Any) -> AutoscalerClient:
        http = memory_http(self.network)
        return AutoscalerClient(http, self.clock, addrs, "secret-token-123", 4242, **kwargs)

    def result(self, sending: Deferred[Any]) -> Any:
        self.network.flush()
        return self.successResultOf(sending)

    def test_status_fails_over_in_order(self) -> None:
        """An address that errors or is unreachable is skipped; the first that takes the
        report is used and later ones are not called."""
        broken, good, spare = FakeAutoscaler(), FakeAutoscaler(), FakeAutoscaler()
        broken.codes[b"/worker_status/"] = 500
        addrs = [DEAD, self.serve(broken), self.serve(good) + "/", self.serve(spare)]
        used = self.result(self.client(addrs).post_status({"id": 1, "cur_load": 2.5}))
        self.assertEqual(used, addrs[2].rstrip("/"))
        self.assertEqual(good.statuses, [{"id": 1, "cur_load": 2.5}])
        self.assertEqual((broken.statuses, spare.statuses), ([], []))

    def test_all_down_fails(self) -> None:
        """When every address fails, the call fails naming each one."""
        broken = FakeAutoscaler()
        broken.codes[b"/worker_status/"] = 503
        url = self.serve(broken)
        sending = self.client([DEAD, url]).post_status({})
        self.network.flush()
        caught = self.failureResultOf(sending, AutoscalerError)
        self.assertIn(url + ": HTTP 503", str(caught.value))
        self.assertIn(DEAD, str(caught.value))

    def test_refusal_says_why(self) -> None:
        """A refused call's error carries the start of the autoscaler's answer, where it says
        why (on one line, at most ANSWER_SHOWN characters), with the token masked if the
        answer echoes it."""
        refusing = FakeAutoscaler()
        refusing.codes[b"/worker_status/"] = 422
        echo = '{"detail": "cur_load: not a number",\n "input": {"mtoken": "secret-token-123"}}'
        refusing.refusal = echo.encode() + b" " + b"y" * 300 + b"ZZZ"
        sending = self.client([self.serve(refusing)]).post_status({})
        self.network.flush()
        message = str(self.failureResultOf(sending, AutoscalerError).value)
        self.assertIn(
            ': HTTP 422: {"detail": "cur_load: not a number", "input": {"mtoken": "secr..."}}',
            message,
        )
        self.assertNotIn("secret-token-123", message)
        self.assertNotIn("ZZZ", message)
        # A token that the cut at ANSWER_SHOWN characters would split is masked all the same.
        refusing.refusal = b"x" * (ANSWER_SHOWN - 10) + b"secret-token-123 and more"
        sending = self.client([self.serve(refusing)]).post_status({})
        self.network.flush()
        message = str(self.failureResultOf(sending, AutoscalerError).value)
        self.assertNotIn("secret-tok", message)
        self.assertIn(b"x" * (ANSWER_SHOWN - 10) + b"secr...", message.encode())

    def test_hung_address_times_out_and_fails_over(self) -> None:
        """An address that never answers is abandoned after the timeout for the next one."""
        hung, good = FakeAutoscaler(), FakeAutoscaler()
        hung.hang.add(b"/worker_status/")
        client = self.client([self.serve(hung), self.serve(good)], timeout=5.0)
        sent = client.post_status({"n": 1})
        self.network.flush()
        self.assertEqual(len(hung.hung), 1)
        self.clock.advance(4.9)
        self.assertNoResult(sent)
        self.clock.advance(0.1)
        self.result(sent)
        self.assertEqual(good.statuses, [{"n": 1}])

    def test_delete_bodies_batches(self) -> None:
        """Batches form: one POST per success flag, successes first (PROTOCOL 4.6)."""
        fake = FakeAutoscaler()
        self.result(self.client([self.serve(fake)]).post_deletes(entries()))
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

    def test_deletes_skip_the_legacy_address(self) -> None:
        """/delete_requests/ never goes to the old https://cloud.vast.ai/api/v0 address;
        reports may."""
        client = self.client(["https://cloud.vast.ai/api/v0/", "http://b"])
        self.assertEqual(client.addrs, ("https://cloud.vast.ai/api/v0", "http://b"))
        self.assertEqual(client.delete_addrs, ("http://b",))

    def test_delete_bodies_list(self) -> None:
        """List form: one POST with every request, its status and timings."""
        fake = FakeAutoscaler()
        self.result(self.client([self.serve(fake)], delete_format="list").post_deletes(entries()))
        (body,) = fake.deletes
        self.assertEqual(body["worker_id"], 4242)
        self.assertEqual(
            [(r["request_idx"], r["success"], r["status"]) for r in body["requests"]],
            [(11, True, "Success"), (12, False, "Error"), (13, True, "Cancelled")],
        )
        self.assertEqual(body["requests"][0]["work_completed_at"], 3.0)
        self.assertEqual(fake.deleted(), {11: True, 12: False, 13: True})

    def test_pubkey_from_the_first_address_that_has_one(self) -> None:
        """/pubkey/ is asked from each address in order until one serves a key."""
        key = generate_private_key()
        empty, full = FakeAutoscaler(), FakeAutoscaler(public_pem(key))
        got = self.result(self.client([self.serve(empty), self.serve(full)]).fetch_pubkey())
        self.assertEqual(got.public_numbers(), key.public_key().public_numbers())
        self.assertEqual((empty.pubkey_requests, full.pubkey_requests), (1, 1))

    def test_lenient_pem_and_secret_logging(self) -> None:
        """A PEM sent as a JSON string is accepted; the token is never shown in full."""
        pem = b"-----BEGIN PUBLIC KEY-----\nAAA\n-----END PUBLIC KEY-----\n"
        self.assertEqual(pem_from(json.dumps(pem.decode()).encode()), pem.strip())
        self.assertEqual(pem_from(b"  " + pem), pem.strip())
        self.assertNotIn("token-123", self.client([DEAD]).describe())


class KeyStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.network = MemoryNetwork()
        self.clock = Clock()
        self.fake = FakeAutoscaler()
        url = self.network.serve("http://127.0.0.1:9000", self.fake)
        client = AutoscalerClient(memory_http(self.network), self.clock, [url], "", None)
        self.store = PublicKeyStore(self.clock, client, refresh_after=300)
        self.addCleanup(self.store.stopService)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.network.flush()

    def test_retries_with_backoff_until_the_key_is_served(self) -> None:
        """At start-up the key is fetched in the background, retried after 1 s, 2 s ...
        until the autoscaler serves it."""
        self.store.startService()
        self.advance(0)
        self.assertEqual(self.fake.pubkey_requests, 1)
        self.assertIsNone(self.store.key)
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [1.0])
        self.advance(1)
        self.assertEqual(self.fake.pubkey_requests, 2)
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [3.0])
        self.fake.pubkey = public_pem(generate_private_key())
        self.advance(2)
        self.assertIsNotNone(self.store.key)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refresh_only_when_stale(self) -> None:
        """A key older than refresh_after may be fetched again (rotation), once per period."""
        old, new = generate_private_key(), generate_private_key()
        self.fake.pubkey = public_pem(old)
        self.store.startService()
        self.advance(0)
        assert self.store.key is not None
        self.assertEqual(self.store.key.public_numbers(), old.public_key().public_numbers())
        self.assertFalse(self.store.stale())
        self.clock.advance(300)
        self.assertTrue(self.store.stale())
        self.fake.pubkey = public_pem(new)
        refreshed: Deferred[None] = self.store.refresh()
        self.assertFalse(self.store.stale())  # one attempt per period
        self.advance(0)
        self.successResultOf(refreshed)
        assert self.store.key is not None
        self.assertEqual(self.store.key.public_numbers(), new.public_key().public_numbers())


class ClientEndToEndTests(TestCase):
    async def test_fails_over_through_sockets(self) -> None:
        """Through real sockets: an address answering 500 is skipped for the next; the key
        comes from the first address that has one. (tests/test_gate.py's twistd test has an
        unreachable first address.)"""
        key = generate_private_key()
        broken, good = FakeAutoscaler(), FakeAutoscaler(public_pem(key))
        broken.codes[b"/worker_status/"] = 500
        addrs = [listen(self, broken), listen(self, good)]
        client = AutoscalerClient(http_client(self), reactor, addrs, "secret-token-123", 4242)
        self.assertEqual(await client.post_status({"id": 1}), addrs[1])
        self.assertEqual((broken.statuses, good.statuses), ([], [{"id": 1}]))
        got = await client.fetch_pubkey()
        self.assertEqual(got.public_numbers(), key.public_key().public_numbers())


class ConnectTimeoutTests(SynchronousTestCase):
    def test_timed_out_while_connecting_says_so(self) -> None:
        """An address that never takes the connection fails the call when its timeout runs
        out, with a reason a person can read (Twisted's own is the address itself)."""
        clock = MemoryReactorClock()
        http = HTTPClient(Agent(clock))
        client = AutoscalerClient(http, clock, ["http://192.0.2.1:8080"], "t", 4242, timeout=5)
        sending = client.post_status({"id": 1})
        self.assertEqual(len(clock.tcpClients), 1)  # connecting, never connected
        clock.advance(5)
        failure = self.failureResultOf(sending, AutoscalerError)
        self.assertEqual(str(failure.value), "http://192.0.2.1:8080: no answer within 5 s")

    def test_no_answer_says_so(self) -> None:
        """Connected, the report sent, no answer: the reason is the time limit (Twisted's own
        is the request's cancellation)."""
        clock = MemoryReactorClock()
        http = HTTPClient(Agent(clock))
        client = AutoscalerClient(http, clock, ["http://192.0.2.1:8080"], "t", 4242, timeout=5)
        sending = client.post_status({"id": 1})
        protocol = clock.tcpClients[0][2].buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"POST /worker_status/ HTTP/1.1", transport.value())
        clock.advance(5)
        failure = self.failureResultOf(sending, AutoscalerError)
        self.assertEqual(str(failure.value), "http://192.0.2.1:8080: no answer within 5 s")
