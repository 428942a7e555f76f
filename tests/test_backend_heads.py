"""
What a backend's response head may hold, end to end through real sockets: a worker (both
modes, FAST_PATH) in front of a raw backend that writes exact bytes. Oversized heads and
statuses below 100 are a 502 JSON error; a control byte in the reason phrase never reaches
the client; a body with a Transfer-Encoding other than chunked runs to the close and is
served whole; 1xx interim answers reach HTTP/1.1 clients.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import TestCase

from tests.helpers import listen, observed_worker, raw_request
from tests.test_net_client import Answer, ScriptedBackend, in_pieces, ok, response
from vast_vespa.outcome import Outcome

GET = b"GET /x HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"


class BackendHeadTests(TestCase):
    timeout = 20

    def worker(self, *answers: Answer) -> str:
        backend_url = listen(self, ScriptedBackend(answers))
        url, self.results = observed_worker(self, backend_url)
        return url

    async def fetch(self, url: str, request: bytes = GET) -> tuple[bytes, bytes]:
        """(head, body) of the one answer to ``request``."""
        answer = await raw_request(url, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        return head, body

    async def assert_502(self, answer: bytes, why: str) -> None:
        url = self.worker(answer)
        head, body = await self.fetch(url)
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        error = json.loads(body)
        self.assertEqual(error["error"], "backend unavailable")
        self.assertIn(why, error["detail"])
        result = self.results[-1]
        self.assertEqual((result.outcome, result.status), (Outcome.ERRORED, 502))

    async def test_oversized_head_is_502(self) -> None:
        await self.assert_502(ok(b"x", b"X-Big: " + b"a" * 40000), "response head over 16384")

    async def test_too_many_headers_is_502(self) -> None:
        headers = [b"X-%d: 1" % i for i in range(200)]
        await self.assert_502(ok(b"x", *headers), "more than 100 response headers")

    async def test_status_below_100_is_502(self) -> None:
        await self.assert_502(ok().replace(b"200 OK", b"099 Odd"), "status 99")

    async def test_control_bytes_in_the_phrase_are_not_relayed(self) -> None:
        url = self.worker(ok(b"fine").replace(b"200 OK", b"200 O\x01K\x1b"))
        head, body = await self.fetch(url)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertEqual(body, b"fine")

    async def test_identity_body_ends_at_close_and_is_served(self) -> None:
        """Transfer-Encoding: identity frames nothing: the body runs to the backend's close,
        reaches the client whole, and the request counts as served."""
        url = self.worker(
            in_pieces(
                response(b"200 OK", b"Transfer-Encoding: identity"),
                b"part one, ",
                b"part two",
                close=True,
            )
        )
        answer = await raw_request(url, GET.replace(b"HTTP/1.1", b"HTTP/1.0"))
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertEqual(body, b"part one, part two")
        self.assertEqual(self.results[-1].outcome, Outcome.SERVED)

    async def test_interim_answers_reach_http11_clients(self) -> None:
        """A 103 (with its Link header) goes to an HTTP/1.1 client before the answer; a 100
        (the worker's own business) and anything for an HTTP/1.0 client do not."""
        hints = response(b"103 Early Hints", b"Link: </style.css>; rel=preload")
        url = self.worker(response(b"100 Continue") + hints + ok(b"real"))
        answer = await raw_request(url, GET)
        self.assertTrue(
            answer.startswith(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\n"
            ),
            answer,
        )
        self.assertTrue(answer.endswith(b"\r\n\r\nreal"), answer)
        self.assertEqual(answer.count(b"HTTP/1.1 "), 2)
        old = await raw_request(url, GET.replace(b"HTTP/1.1", b"HTTP/1.0"))
        self.assertTrue(old.startswith(b"HTTP/1.0 200 OK\r\n"), old)
        self.assertEqual(self.results[-1].outcome, Outcome.SERVED)
