"""
Big bodies moved by the kernel (vast_vespa.net.splice) through a worker on real sockets: every byte in
order, the backend connection kept, a backend that breaks, a client that leaves, a client
that reads slowly; small bodies go the usual way. The client-facing listener sends at once,
as the worker's does, so the client's transport is the TCP connection itself.
"""

from __future__ import annotations

import errno
import os
from typing import cast

from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory
from twisted.internet.task import Cooperator
from twisted.trial.unittest import TestCase
from twisted.web.server import Request

from tests.fakes import FakeBackend, big_body
from tests.helpers import RawClient, listen, listen_sending_now, listen_tcp, raw_connect
from tests.memory import Recorder
from vast_vespa.net import splice
from vast_vespa.net.client import backend_agent, backend_pool
from vast_vespa.outcome import Outcome
from vast_vespa.site import VespaSite
from vast_vespa.worker.resource import Forward, WorkerResource, passthrough

MIB = 1 << 20


def _open(names: set[str]) -> set[str]:
    """Which of ``names`` (``pipe:[inode]``) this process still has open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the descriptor listdir itself used
    return names & found


def _split(answer: bytes) -> tuple[bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


class SpliceTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.backend_url = listen(self, self.backend)
        pool = backend_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

        class Gate:
            def admit(self, request: Request) -> Forward:
                return passthrough(request, cooperator)

        self.recorder = Recorder()
        self.results = self.recorder.results
        self.resource = WorkerResource(
            Gate(),
            backend_agent(reactor, pool, 5, fast_path=True),
            reactor,
            self.backend_url,
            observers=(self.recorder,),
        )
        self.spliced = 0  # calls of splice(2)
        self.client_full = 0  # times the client's socket took nothing
        self.client_was_full: Deferred[None] = Deferred()  # ...the first time
        self.break_client = False  # splicing into the client's socket fails (EPIPE)
        self.unsupported = ""  # "backend" or "client": splicing from or to it gives EINVAL
        self.patch(splice, "_supported", True)
        real = splice._splice

        def counting(source: int, sink: int, count: int, flags: int = 0) -> int:
            self.spliced += 1
            into_client = sink not in pipe_ends
            if self.break_client and into_client:
                raise BrokenPipeError(32, "Broken pipe")
            if self.unsupported == ("client" if into_client else "backend"):
                raise OSError(errno.EINVAL, "Invalid argument")
            assert real is not None  # Linux
            try:
                return real(source, sink, count, flags=flags)
            except BlockingIOError:
                if sink not in pipe_ends:
                    self.client_full += 1
                    if not self.client_was_full.called:
                        self.client_was_full.callback(None)
                raise

        pipe_ends: set[int] = set()
        self.pipes: set[str] = set()  # the splices' pipes
        self.stopped: list[Deferred[None]] = []  # one per splice, fired when it stops
        stopped_for: dict[splice.Splice, Deferred[None]] = {}
        start, stop = splice.Splice.start, splice.Splice.stop

        def recording_start(self_: splice.Splice, length: int) -> None:
            start(self_, length)
            assert self_._pipe is not None
            pipe_ends.clear()
            pipe_ends.update(self_._pipe)
            self.pipes.update(os.readlink(f"/proc/self/fd/{end}") for end in self_._pipe)
            stopped_for[self_] = Deferred()
            self.stopped.append(stopped_for[self_])

        def recording_stop(self_: splice.Splice) -> None:
            stop(self_)
            stopped = stopped_for.get(self_)
            if stopped is not None and not stopped.called:
                stopped.callback(None)

        self.patch(splice, "_splice", counting)
        self.patch(splice.Splice, "start", recording_start)
        self.patch(splice.Splice, "stop", recording_stop)

    async def worker(self) -> str:
        return await listen_sending_now(self, VespaSite(self.resource, fast_path=True))

    async def get(self, url: str, path: str, read: bool = True) -> RawClient:
        request = b"GET %s HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n" % path.encode()
        return await raw_connect(url, RawClient(request, read))

    async def assert_no_pipe_left(self) -> None:
        self.assertTrue(self.pipes)
        await gatherResults(self.stopped).addTimeout(10, reactor)  # every splice stopped...
        self.assertEqual(_open(self.pipes), set())  # ...and closed its pipe

    async def test_a_big_body_goes_through_the_kernel(self) -> None:
        """A 4 MiB body of known length reaches the client byte for byte, moved by
        splice(2); the result counts every byte."""
        url = await self.worker()
        client = await self.get(url, f"/big?total={4 * MIB}")
        head, body = _split(await client.closed)
        self.assertIn(b"\r\nContent-Length: 4194304", head)
        self.assertEqual(len(body), 4 * MIB)
        self.assertTrue(body == big_body(4 * MIB), "the body differs")
        self.assertGreater(self.spliced, 1)
        [result] = self.results
        self.assertEqual(
            (result.outcome, result.status, result.bytes_out), (Outcome.SERVED, 200, 4 * MIB)
        )
        await self.assert_no_pipe_left()

    async def test_the_backend_connection_serves_on_after_a_splice(self) -> None:
        """After a spliced body the backend connection is kept, and the next answer on it
        (a small one, parsed as usual) is read right."""
        url = await self.worker()
        client = await self.get(url, f"/big?total={2 * MIB}")
        self.assertEqual(len(_split(await client.closed)[1]), 2 * MIB)
        client = await self.get(url, "/echo")
        self.assertIn(b'"uri": "/echo"', _split(await client.closed)[1])
        ports = [seen.client_port for seen in self.backend.seen]
        self.assertEqual(len(ports), 2)
        self.assertEqual(ports[0], ports[1])
        self.assertEqual([r.outcome for r in self.results], [Outcome.SERVED] * 2)

    async def test_small_bodies_go_the_usual_way(self) -> None:
        """A body under SPLICE_MIN is relayed through the worker as before."""
        url = await self.worker()
        total = splice.SPLICE_MIN - 1
        client = await self.get(url, f"/big?total={total}")
        self.assertTrue(_split(await client.closed)[1] == big_body(total))
        self.assertEqual(self.spliced, 0)

    async def test_a_backend_that_breaks_mid_body_cuts_the_client(self) -> None:
        """A backend that closes before the end of the body: the client's connection is
        closed short (never a clean short answer), the result is an error, and the next
        request is served."""
        url = await self.worker()
        client = await self.get(url, f"/big?total={4 * MIB}&cut={2 * MIB}")
        head, body = _split(await client.closed)
        self.assertIn(b"\r\nContent-Length: 4194304", head)
        self.assertLessEqual(len(body), 2 * MIB)
        self.assertTrue(body == big_body(4 * MIB)[: len(body)])
        self.assertGreater(self.spliced, 0)
        [result] = self.results
        self.assertEqual(result.outcome, Outcome.ERRORED)
        self.assertIn("backend broke mid-response", result.reason)
        client = await self.get(url, "/echo")
        self.assertIn(b'"uri": "/echo"', await client.closed)
        await self.assert_no_pipe_left()

    async def test_a_client_that_leaves_mid_body(self) -> None:
        """A client that hangs up during a spliced body: the backend call is cut, the
        result is cancelled, and the pipe is closed."""
        url = await self.worker()
        client = await self.get(url, f"/big?total={64 * MIB}")
        await client.when(lambda: client.count > MIB)
        client.tcp.abortConnection()
        await self.recorder.wait()
        [result] = self.results
        self.assertEqual(result.outcome, Outcome.CANCELLED)
        self.assertLess(result.bytes_out, 64 * MIB)
        await self.assert_no_pipe_left()

    async def test_a_client_that_reads_slowly_gets_every_byte(self) -> None:
        """A client that stops reading: the worker stops reading the backend until the
        client's socket has room again (nothing piles up in the worker), then every byte
        arrives in order."""
        url = await self.worker()
        total = 16 * MIB
        client = await self.get(url, f"/big?total={total}", read=False)
        await self.client_was_full
        client.producer.resumeProducing()
        body = _split(await client.closed)[1]
        self.assertEqual(len(body), total)
        self.assertTrue(body == big_body(total), "the body differs")
        self.assertEqual(self.results[0].bytes_out, total)
        await self.assert_no_pipe_left()

    async def test_without_a_pipe_the_body_goes_the_usual_way(self) -> None:
        """When no pipe can be made (out of file descriptors), the body is relayed through
        the worker as before, whole."""

        def no_pipe(flags: int) -> tuple[int, int]:
            raise OSError(24, "Too many open files")

        self.patch(splice.os, "pipe2", no_pipe)
        url = await self.worker()
        client = await self.get(url, f"/big?total={2 * MIB}")
        self.assertTrue(_split(await client.closed)[1] == big_body(2 * MIB))
        self.assertEqual(self.spliced, 0)
        self.assertEqual(self.results[0].outcome, Outcome.SERVED)

    async def test_a_client_socket_that_breaks_counts_as_a_client_that_left(self) -> None:
        """Splicing into the client's socket fails (EPIPE: it went away and the worker has
        not read that yet): its connection is closed, the backend call is cut, and the result
        is cancelled, as for any client that leaves, not a backend error."""
        self.break_client = True
        url = await self.worker()
        client = await self.get(url, f"/big?total={4 * MIB}")
        head, body = _split(await client.closed)
        self.assertIn(b"200 OK", head)
        self.assertLess(len(body), 4 * MIB)
        await self.recorder.wait()
        [result] = self.results
        self.assertEqual(
            (result.outcome, result.reason), (Outcome.CANCELLED, "client disconnected")
        )
        await self.assert_no_pipe_left()

    async def test_a_client_that_leaves_while_the_worker_waits_for_it(self) -> None:
        """A client that stops reading and then hangs up: the splice waiting for room in its
        socket is stopped, the backend call cut, the pipe closed."""
        url = await self.worker()
        client = await self.get(url, f"/big?total={64 * MIB}", read=False)
        await self.client_was_full
        client.tcp.abortConnection()
        await self.recorder.wait()
        self.assertEqual(self.results[0].outcome, Outcome.CANCELLED)
        await self.assert_no_pipe_left()

    async def assert_unsupported_falls_back(self, side: str) -> None:
        self.unsupported = side
        url = await self.worker()
        for _ in range(2):
            client = await self.get(url, f"/big?total={4 * MIB}")
            self.assertTrue(_split(await client.closed)[1] == big_body(4 * MIB))
        self.assertEqual(self.spliced, 1 if side == "backend" else 2)
        self.assertEqual([r.outcome for r in self.results], [Outcome.SERVED] * 2)
        self.assertEqual([r.bytes_out for r in self.results], [4 * MIB] * 2)
        self.assertFalse(splice._supported)
        await self.assert_no_pipe_left()

    async def test_where_splice_cannot_read_the_backend_bodies_go_the_usual_way(self) -> None:
        """splice(2) refusing the backend socket (EINVAL: gVisor, unusual kernels): the body
        is relayed whole the usual way, and later ones are not spliced at all."""
        await self.assert_unsupported_falls_back("backend")

    async def test_where_splice_cannot_write_the_client_bodies_go_the_usual_way(self) -> None:
        """splice(2) refusing the client socket after it took bytes from the backend: those
        bytes are read back out of the pipe and parsed as usual; nothing is lost."""
        await self.assert_unsupported_falls_back("client")


class CanSpliceTests(TestCase):
    async def test_only_plain_tcp_connections(self) -> None:
        """A connected TCP transport can be spliced into; one carrying TLS, one closing, or
        anything that is not a TCP connection (a TLS protocol, a test double) cannot."""
        server = RawClient(b"")
        port = listen_tcp(Factory.forProtocol(lambda: server))
        self.addCleanup(port.stopListening)
        client = await raw_connect(f"http://127.0.0.1:{port.getHost().port}", RawClient(b""))
        await server.made
        transport = cast(tcp.Server, server.transport)
        self.assertTrue(splice.can_splice(transport))
        self.assertFalse(splice.can_splice(object()))
        transport.TLS = True
        self.assertFalse(splice.can_splice(transport))
        transport.TLS = False
        transport.loseConnection()
        self.assertFalse(splice.can_splice(transport))
        await client.closed
