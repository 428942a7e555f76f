"""perf/bench.py's extra targets: a --tls-target serves HTTPS in the TLS scenarios with the
certificate nginx and Vespa serve, a --target is left out of them, one name may be both, and
--floor adds the floor relay as both; and the floor relay itself relays, over plain TCP and
over TLS, through real sockets."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import ssl
import sys
import urllib.request
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.certs import self_signed
from tests.fakes import FakeBackend
from tests.helpers import listen, spawn

PERF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf")
sys.path.insert(0, PERF)
from bench import Bench, Build, Target, add_floor, watched  # noqa: E402  # perf/ holds scripts, not a package

PLAIN = "relay {port} {backend_url}"
TLS = "relay {port} {backend_url} --tls {cert} {key}"


class ExtraTargetTests(SynchronousTestCase):
    def setUp(self) -> None:
        args = argparse.Namespace(
            port_base=29080,
            target=[("floor", PLAIN)],
            tls_target=[("floor", TLS)],
            max_minutes=1,
            tls_key="rsa",
            scenarios=["S1", "FULL-TLS"],
        )
        self.bench = Bench(args, Path(self.mktemp()))
        self.addCleanup(shutil.rmtree, self.bench.work)
        self.bench.builds = [Build("vespa", sys.executable)]
        self.bench.tls_cert, self.bench.tls_key = Path("/my certs/c.pem"), Path("/my certs/k.pem")

    def test_tls_target_in_tls_scenarios(self) -> None:
        found = self.bench.proxies(tls=True)
        self.assertEqual([t.name for t in found], ["nginx", "vespa", "floor"])
        self.assertTrue(all(t.tls for t in found))
        floor = found[-1]
        command = "relay {port} {backend_url} --tls '/my certs/c.pem' '/my certs/k.pem'"
        self.assertEqual(floor.argv, ["bash", "-c", command])  # paths quoted for the shell
        self.assertEqual(len({t.port for t in found}), 3)

    def test_plain_target_in_plain_scenarios(self) -> None:
        found = self.bench.proxies(tls=False)
        self.assertEqual([t.name for t in found], ["nginx", "vespa", "floor"])
        self.assertEqual(found[-1].argv, ["bash", "-c", PLAIN])
        self.assertFalse(any(t.tls for t in found))

    def test_one_name_for_both(self) -> None:
        self.assertEqual(self.bench.target_names(), ["direct", "nginx", "vespa", "floor"])

    def test_both_keys(self) -> None:
        """--tls-key both: in the TLS scenarios, this build once more as vespa-ec, serving
        the P-256 certificate; the other targets keep the RSA one."""
        self.bench.args.tls_key = "both"
        self.bench.tls_ec_cert, self.bench.tls_ec_key = Path("/ec/c.pem"), Path("/ec/k.pem")
        self.assertEqual(
            self.bench.target_names(), ["direct", "nginx", "vespa", "vespa-ec", "floor"]
        )
        found = self.bench.proxies(tls=True)
        self.assertEqual([t.name for t in found], ["nginx", "vespa", "vespa-ec", "floor"])
        vespa, ec = found[1], found[2]
        assert vespa.argv is not None and ec.argv is not None
        self.assertIn("privateKey=/my certs/k.pem", vespa.argv[-1])
        self.assertIn("privateKey=/ec/k.pem:certKey=/ec/c.pem", ec.argv[-1])
        self.assertEqual(vespa.argv[:-1], ec.argv[:-1])
        self.assertTrue(ec.tls)
        self.assertEqual(len({t.port for t in found}), 4)
        self.assertNotIn("vespa-ec", [t.name for t in self.bench.proxies(tls=False)])
        self.bench.args.scenarios = ["S1"]  # no TLS scenario: no vespa-ec to report
        self.assertNotIn("vespa-ec", self.bench.target_names())


class WatchedTests(SynchronousTestCase):
    def test_backend_beside_a_proxy(self) -> None:
        """A load point samples a proxy and its backend apart (the SSE points once sampled
        the proxy alone and reported its CPU as the backend's); direct is the backend."""
        proxy = Target("vespa", 1, ["twistd"], pid=10)
        self.assertEqual(watched(proxy, 20), {"proxy": 10, "backend": 20})
        self.assertEqual(watched(Target("direct", 2, None, pid=20), 20), {"proxy": 20})


class FloorTests(SynchronousTestCase):
    def test_floor_is_both_targets(self) -> None:
        """--floor: the floor relay as a plain and a TLS target of one name."""
        args = argparse.Namespace(target=[], tls_target=[])
        add_floor(args)
        [(name, plain)] = args.target
        [(tls_name, tls)] = args.tls_target
        self.assertEqual((name, tls_name), ("floor", "floor"))
        self.assertTrue(plain.startswith("exec "))
        self.assertTrue(plain.endswith("floor_relay.py {port} {backend_url}"))
        self.assertEqual(tls, plain + " --tls {cert} {key}")


class FloorRelayTests(TestCase):
    """perf/floor_relay.py relays a request to its backend and the answer back, over plain TCP
    and over HTTPS (the fast path's TLS protocol)."""

    async def start(self, backend: FakeBackend, flags: list[str]) -> int:
        """The relay's port."""
        script = os.path.join(PERF, "floor_relay.py")
        relay = spawn(self, [sys.executable, script, "0", listen(self, backend), *flags])
        return int((await relay.wait_for(rb"floor relay on (\d+)")).group(1))

    async def relayed(self, scheme: str, flags: list[str], context: ssl.SSLContext | None) -> None:
        backend = FakeBackend(reactor)
        port = await self.start(backend, flags)

        def get() -> tuple[int, bytes]:
            url = f"{scheme}://127.0.0.1:{port}/echo?x=1"
            with urllib.request.urlopen(url, context=context, timeout=10) as answer:  # noqa: S310
                return answer.status, answer.read()

        status, body = await deferToThread(get)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["uri"], "/echo?x=1")
        self.assertEqual([seen.uri for seen in backend.seen], [b"/echo?x=1"])

    async def test_plain(self) -> None:
        await self.relayed("http", [], None)

    async def test_tls(self) -> None:
        cert, key, pem = self_signed(os.path.abspath(self.mktemp()))
        context = ssl.create_default_context(cadata=pem.decode("ascii"))
        await self.relayed("https", ["--tls", cert, key], context)

    async def test_connection_close(self) -> None:
        """As wrk's new-connection point asks (a POST with a body): each answer, saying so,
        then the client's connection closed by the relay; the header stops at the relay, so
        one backend connection serves every request (forwarded, it closed the backend's
        connection under the relay)."""
        backend = FakeBackend(reactor)
        port = await self.start(backend, [])

        def exchange() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                head = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                conn.sendall(head + b"Content-Length: 5\r\n\r\nhello")
                received = b""
                while chunk := conn.recv(65536):  # until the relay closes
                    received += chunk
                return received

        for _ in range(3):
            answer = await deferToThread(exchange)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
            self.assertIn(b"\r\nConnection: close\r\n", answer)
            self.assertTrue(answer.endswith(b"\r\n0\r\n\r\n"), answer)
        self.assertEqual([seen.body for seen in backend.seen], [b"hello"] * 3)
        self.assertEqual([seen.headers.get(b"connection") for seen in backend.seen], [None] * 3)
        self.assertEqual(len({seen.client_port for seen in backend.seen}), 1)
