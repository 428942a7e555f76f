"""Whatever a client sends, a worker answers with a status it chose (or relays the request):
never a 500, never a traceback in the log. Requests are made of the pieces the parsers care
about (methods, targets, every auth form, auth values of any JSON type and size, signed or
not) and fed to a real worker's site in process; trial fails a test that logs an error."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.fakes import FakeBackend
from tests.helpers import listen, start_signed_worker, start_worker
from vast_vespa.signing import sign

PEER = IPv4Address("TCP", "127.0.0.1", 50000)
HOST = IPv4Address("TCP", "127.0.0.1", 3000)

NUMBER = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=False, allow_infinity=False),
)
TEXT = st.text(max_size=12)
ANY = st.one_of(NUMBER, TEXT, st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
INTEGER = st.integers(min_value=-(10**30), max_value=10**30)
AUTH = st.one_of(
    st.fixed_dictionaries({name: ANY for name in ("cost", "endpoint", "reqnum")}),
    st.fixed_dictionaries(
        {
            "cost": NUMBER,
            "endpoint": TEXT,
            "reqnum": INTEGER,
            "request_idx": INTEGER,
            "signature": TEXT,
            "url": TEXT,
        }
    ),
)
METHOD = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PROPFIND", b"BREW"]
)
TARGET = st.sampled_from(
    [
        b"/",
        b"/v1/x",
        b"/admin/x",
        b"/%61dmin//x",
        b"*",
        b"http://h/x",
        b"/x?a=%zz&b",
        b"/x?serverless_cost=1&serverless_reqnum=2",
        b"/x?serverless_cost=1e999&serverless_request_idx=" + b"9" * 50,
    ]
)
FORM = st.sampled_from(["envelope", "header", "query", "raw", "none"])


class AnyInputTests(TestCase):
    timeout = 120

    def answers(self, site: Any, key: Any, public_url: str) -> None:
        """Feed generated requests to ``site``; each is answered at once with a status that
        is not 500, or relayed (nothing written yet; the client then leaves)."""

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
        @given(METHOD, TARGET, FORM, AUTH, st.binary(max_size=30), st.booleans())
        def one(
            method: bytes,
            target: bytes,
            form: str,
            auth: dict[str, Any],
            raw: bytes,
            signed: bool,
        ) -> None:
            if signed and key is not None and isinstance(auth.get("url"), str):
                auth = {**auth, "url": public_url}
                auth["signature"] = sign(key, auth, "url")
            head = [method + b" " + target + b" HTTP/1.1", b"Host: w"]
            body = raw if form == "raw" else b""
            if form == "envelope":
                body = json.dumps({"auth_data": auth, "payload": {"p": raw.hex()}}).encode()
            elif form == "header":
                head.append(b"X-Serverless-Auth: " + json.dumps(auth).encode())
            elif form == "query":
                head[0] = head[0].replace(b" HTTP/1.1", b"?serverless_cost=%r HTTP/1.1" % raw)
            if body:
                head.append(b"Content-Length: %d" % len(body))
            channel = site.buildProtocol(PEER)
            transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
            channel.makeConnection(transport)
            channel.dataReceived(b"\r\n".join(head) + b"\r\n\r\n" + body)
            status = transport.value().split(b"\r\n", 1)[0]
            channel.connectionLost(Failure(ConnectionDone()))
            self.assertNotIn(b" 500 ", status)
            self.assertTrue(status == b"" or status.startswith(b"HTTP/1.1 "), status)

        one()

    async def test_a_signed_worker_answers_whatever_it_is_sent(self) -> None:
        backend = listen(self, FakeBackend(reactor))
        worker = await start_signed_worker(
            self, backend, blocked_paths=("/admin/*",), replay_window=100
        )
        self.answers(worker.service.site, worker.key, worker.public_url)

    def test_an_unsecured_worker_answers_whatever_it_is_sent(self) -> None:
        backend = listen(self, FakeBackend(reactor))
        _, service = start_worker(self, backend, blocked_paths=("/admin/*",))
        self.answers(service.site, None, "")
