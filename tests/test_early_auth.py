"""
Authentication from the head (issue 23, item 3): secured, a request whose header or query
auth fails is answered before any body byte is read and before ``100 Continue``; an envelope
as soon as its leading auth_data has arrived. The rest of the body is never kept.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import IO, TYPE_CHECKING
from urllib.parse import urlencode

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.fakes import FakeBackend
from tests.helpers import listen, raw_request, signed_auth, start_signed_worker
from tests.memory import Connection, MemoryWorker

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

EXPECT = b"Expect: 100-continue\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def bare_head(method: bytes, path: bytes, length: int) -> bytes:
    """A request head without auth, announcing a body of ``length`` bytes and asking
    ``100 Continue`` for it."""
    return b"%s %s HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n%s\r\n" % (
        method,
        path,
        length,
        EXPECT,
    )


class _CountedBody(BytesIO):
    """A request body as the site keeps it, counting what was written to it."""

    written = 0

    def write(self, data: ReadableBuffer, /) -> int:
        self.written += memoryview(data).nbytes
        return super().write(data)


class EarlyAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.worker = MemoryWorker(self)
        self.bodies: list[_CountedBody] = []
        self.worker.site.getContentFile = self.content_file  # type: ignore[method-assign]

    def content_file(self, length: int | None) -> IO[bytes]:
        body = _CountedBody()
        self.bodies.append(body)
        return body

    def kept(self) -> int:
        """Body bytes kept by the worker (memory or temporary files) for all requests."""
        return sum(body.written for body in self.bodies)

    def forged(self) -> dict[str, object]:
        auth = self.worker.auth()
        auth["signature"] = self.worker.auth(reqnum=9, url="http://elsewhere:1")["signature"]
        return auth

    def head(self, auth: str, length: int = 64 << 20, path: str = "/x") -> bytes:
        return (
            b"POST %s HTTP/1.1\r\nHost: w\r\nX-Serverless-Auth: %s\r\nContent-Length: %d\r\n%s\r\n"
            % (path.encode(), auth.encode(), length, EXPECT)
        )

    def assert_refused_before_body(self, connection: Connection, code: int) -> None:
        """Answered ``code`` with the connection closing, no 100 Continue (since the test
        cleared what it read), nothing reached the backend, at most 64 KiB of body kept."""
        answer = self.worker.answered(connection)
        self.assertEqual(answer.code, code, connection.received[:300])
        self.assertNotIn(b"100 Continue", connection.received)
        self.assertTrue(connection.closed)
        self.assertEqual(answer.header(b"connection"), [b"close"])  # a client's pool drops it
        self.assertEqual(self.worker.backend.seen, [])
        # What the client sends on is read and dropped, never kept.
        if not connection.lost:
            connection.send(b"x" * (1 << 20))
        self.assertLessEqual(self.kept(), 1 << 16)

    def test_forged_header_is_refused_before_100_continue(self) -> None:
        """A forged X-Serverless-Auth with Expect: 100-continue: 401 from the head, no 100
        Continue, no body byte read; nothing reaches the backend or the load figures."""
        connection = self.worker.send(self.head(json.dumps(self.forged())))
        self.assert_refused_before_body(connection, 401)
        self.assertEqual(self.kept(), 0)
        self.assertEqual(self.worker.metrics.load, 0)
        self.assertEqual([r.status for r in self.worker.results], [401])

    def test_forged_header_without_expect_is_refused_before_the_body(self) -> None:
        """Without Expect, the body that follows the head in the same read is not kept."""
        raw = self.head(json.dumps(self.forged())).replace(EXPECT, b"") + b"y" * 50000
        connection = self.worker.send(raw)
        self.assert_refused_before_body(connection, 401)
        self.assertEqual(self.kept(), 0)

    def test_malformed_header_is_refused_from_the_head(self) -> None:
        connection = self.worker.send(self.head("{not json"))
        self.assert_refused_before_body(connection, 400)

    def test_forged_query_auth_is_refused_from_the_head(self) -> None:
        query = urlencode({"serverless_" + k: v for k, v in self.forged().items()})
        raw = b"GET /x?%s HTTP/1.1\r\nHost: w\r\nContent-Length: 100000\r\n%s\r\n" % (
            query.encode(),
            EXPECT,
        )
        connection = self.worker.send(raw)
        self.assert_refused_before_body(connection, 401)

    def test_no_auth_is_refused_from_the_head(self) -> None:
        """A request that carries no auth in any form its method allows is refused from its
        head: its body could not change that (an envelope is only read for POST/PUT/PATCH)."""
        for method in (b"GET", b"DELETE", b"OPTIONS"):
            connection = self.worker.send(bare_head(method, b"/x", 1_000_000_000))
            self.assert_refused_before_body(connection, 401)
        self.assertEqual(self.kept(), 0)

    def test_large_session_body_is_refused(self) -> None:
        """/session/end, /get and /health are answered before any auth, from a small JSON
        body: a larger one is refused from its head, or once that much of it came."""
        self.worker = MemoryWorker(self, max_sessions=2)
        self.worker.site.getContentFile = self.content_file  # type: ignore[method-assign]
        for path in (b"/session/end", b"/session/get", b"/session/health"):
            connection = self.worker.send(bare_head(b"POST", path, 30_000_000))
            self.assert_refused_before_body(connection, 413)
        chunked_head = b"POST /session/%s HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"4000\r\n" + b"[" * 0x4000 + b"\r\n"
        connection = self.worker.send(chunked_head % b"end" + chunk)
        connection.send(chunk)
        self.assert_refused_before_body(connection, 413)
        # A small one, chunked, is answered when it ends (its size is only known then).
        small = b'{"session_id": "unknown"}'
        connection = self.worker.send(
            chunked_head % b"health" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(small), small)
        )
        answer = self.worker.answered(connection)
        self.assertEqual((answer.code, answer.json()), (200, {"ok": False}))

    def test_blocked_path_is_refused_from_the_head(self) -> None:
        self.worker = MemoryWorker(self, blocked_paths=("/admin*",))
        self.worker.site.getContentFile = self.content_file  # type: ignore[method-assign]
        connection = self.worker.send(self.head(json.dumps(self.worker.auth()), path="/admin"))
        self.assert_refused_before_body(connection, 403)

    def test_no_key_yet_is_503_from_the_head(self) -> None:
        self.worker = MemoryWorker(self, serve_key=False)
        self.worker.site.getContentFile = self.content_file  # type: ignore[method-assign]
        connection = self.worker.send(self.head(json.dumps(self.worker.auth())))
        self.assert_refused_before_body(connection, 503)

    def test_signed_header_gets_100_continue_and_is_relayed(self) -> None:
        body = b"z" * 3000
        connection = self.worker.send(self.head(json.dumps(self.worker.auth()), len(body)))
        self.assertEqual(connection.received, CONTINUE)
        connection.send(body)
        self.worker.flush()
        self.assertTrue(connection.received.startswith(CONTINUE + b"HTTP/1.1 200 "))
        self.assertEqual([seen.body for seen in self.worker.backend.seen], [body])

    def envelope_start(
        self, auth: dict[str, object], length: int = 64 << 20
    ) -> tuple[bytes, bytes]:
        start = b'{"auth_data": %s, "payload": {"prompt": "' % json.dumps(auth).encode()
        head = b"POST /x HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n%s\r\n" % (length, EXPECT)
        return head, start + b"a" * 2000

    def test_forged_envelope_is_refused_once_its_auth_data_has_arrived(self) -> None:
        """A forged envelope of 64 MiB: 401 as soon as its leading auth_data is read, the
        rest of its body never kept."""
        head, start = self.envelope_start(self.forged())
        connection = self.worker.send(head)
        self.assertEqual(connection.received, CONTINUE)
        connection.transport.clear()
        connection.send(start)
        self.worker.flush()
        self.assert_refused_before_body(connection, 401)

    def test_forged_envelope_in_small_pieces(self) -> None:
        """Its auth_data arriving a few bytes at a time, it is refused once complete."""
        head, start = self.envelope_start(self.forged())
        connection = self.worker.send(head)
        connection.transport.clear()
        for offset in range(0, len(start), 7):
            if connection.closed:
                break
            connection.send(start[offset : offset + 7])
        self.worker.flush()
        self.assert_refused_before_body(connection, 401)

    def test_malformed_leading_auth_data_is_422_at_once(self) -> None:
        auth = self.forged()
        del auth["reqnum"]
        head, start = self.envelope_start(auth)
        connection = self.worker.send(head.replace(EXPECT, b"") + start)
        self.assert_refused_before_body(connection, 422)

    def test_signed_large_envelope_is_relayed(self) -> None:
        """A signed envelope larger than the bytes the early verdict looks at is read whole
        and relayed (its payload only)."""
        payload = {"prompt": "b" * 200000}
        body = json.dumps({"auth_data": self.worker.auth(), "payload": payload}).encode()
        head, _ = self.envelope_start(self.worker.auth(), len(body))
        connection = self.worker.send(head.replace(EXPECT, b"") + body)
        self.assertEqual(self.worker.answered(connection).code, 200)
        self.assertEqual(json.loads(self.worker.backend.seen[0].body), payload)

    def test_unsecured_worker_has_no_early_verdict(self) -> None:
        """Unsecured, auth is never checked: a forged header goes on with its body."""
        worker = MemoryWorker(self, signed=False)
        raw = self.head(json.dumps(self.forged()), 5).replace(EXPECT, b"") + b"hello"
        self.assertEqual(worker.answered(worker.send(raw)).code, 200)
        self.assertEqual([seen.body for seen in worker.backend.seen], [b"hello"])


class EarlyAuthSocketTests(TestCase):
    async def test_forged_header_with_expect_gets_401_before_sending_its_body(self) -> None:
        """A real secured worker (as built for twistd): a forged X-Serverless-Auth with
        Expect: 100-continue and a 64 MiB Content-Length is answered 401 while the client
        has sent only the head, and the connection is closed."""
        backend = FakeBackend(reactor)
        worker = await start_signed_worker(self, listen(self, backend))
        auth = signed_auth(worker.key, "http://elsewhere:1", "url")
        head = (
            b"POST /x HTTP/1.1\r\nHost: w\r\nX-Serverless-Auth: %s\r\nContent-Length: %d\r\n%s\r\n"
            % (json.dumps({**auth, "url": worker.public_url}).encode(), 64 << 20, EXPECT)
        )
        raw = await raw_request(worker.url, head)
        self.assertTrue(raw.startswith(b"HTTP/1.1 401 "), raw[:200])
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(backend.seen, [])
