"""Access-log lines, JSON log lines, X-Request-ID and masking of secrets."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from typing import IO, cast

from twisted.application.service import Application, MultiService
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import provider

from tests.fakes import FakeBackend
from tests.helpers import (
    http_client,
    listen,
    raw_request,
    spawn_worker,
    start_worker,
    worker_url,
)
from vast_vespa.logs import (
    FLUSH_AFTER,
    PREFORMATTED,
    TextLogForTwistd,
    json_observer,
    log_access,
    log_client_access,
    mask,
    text_observer,
    twistd_writes_text_to_stdout,
    use_text_log,
)


def capture(test: SynchronousTestCase, namespace: str = "vespa.access") -> list[LogEvent]:
    """Log events of ``namespace`` emitted until the end of the test."""
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == namespace:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return events


class OwnRequestId(Resource):
    """A backend that sets its own X-Request-ID on the answer."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"x-request-id", b"backend-made")
        return b"ok"


class AccessLogTests(TestCase):
    def setUp(self) -> None:
        self.backend = FakeBackend(reactor)
        self.url, _ = start_worker(self, listen(self, self.backend))
        self.http = http_client(self)
        self.events = capture(self)

    async def test_access_line(self) -> None:
        """One line per request with method, path (no query string: it may carry a
        signature), status, outcome, workload, bytes, duration, TTFB and request id."""
        response = await self.http.get(
            self.url + "/status/404?signature=s3cret",
            headers=Headers({"X-Request-ID": ["trace-42"]}),
        )
        body = await response.content()
        [event] = self.events
        line = formatEvent(event)
        self.assertRegex(
            line,
            rf"^GET /status/404 404 served workload=0 {len(body)}B [\d.]+ms ttfb=[\d.]+ms "
            r"id=trace-42$",
        )
        self.assertNotIn("s3cret", line)

    async def test_backend_failure_line_has_no_query_string(self) -> None:
        """When the backend fails, the warning names the backend path, never the query string
        (it may carry a signature or an app's key)."""
        events = capture(self, "vast_vespa.relay.ProxiedRequest")
        for path in ("/reset", "/break"):
            response = await self.http.get(self.url + path + "?api_key=s3cret")
            try:
                await response.content()
            except ResponseFailed:
                pass  # /break: the truncated answer is the honest one
        lines = [formatEvent(event) for event in events]
        self.assertEqual(len(lines), 2)
        self.assertIn("/reset", lines[0])
        self.assertNotIn("s3cret", "".join(lines) + repr(events))

    async def test_backend_5xx_is_errored(self) -> None:
        """A backend 5xx answer is logged as errored, as /metrics and the reports count it."""
        response = await self.http.get(self.url + "/status/503")
        await response.content()
        [event] = self.events
        self.assertEqual(event["outcome"], "errored")
        self.assertRegex(formatEvent(event), r"^GET /status/503 503 errored ")

    async def test_request_id_round_trip(self) -> None:
        """A client's X-Request-ID reaches the backend and comes back; without one (or with
        an unusable one) Vespa makes a fresh id, sends it to the backend and returns it."""
        response = await self.http.get(
            self.url + "/echo", headers=Headers({"X-Request-ID": ["abc-123"]})
        )
        await response.content()
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"abc-123"])
        self.assertEqual(self.backend.seen[-1].headers[b"x-request-id"], [b"abc-123"])
        for sent in (None, "has space", "x" * 129):
            headers = Headers({"X-Request-ID": [sent]} if sent else {})
            response = await self.http.get(self.url + "/echo", headers=headers)
            await response.content()
            [returned] = response.headers.getRawHeaders(b"x-request-id")
            self.assertRegex(returned.decode(), r"^[0-9a-f]{32}$")
            self.assertEqual(self.backend.seen[-1].headers[b"x-request-id"], [returned])
            self.assertIn(f"id={returned.decode()}", formatEvent(self.events[-1]))

    async def test_backend_cannot_replace_request_id(self) -> None:
        """The id the client gets back is Vespa's, even if the backend sets its own."""
        url, _ = start_worker(self, listen(self, OwnRequestId()))
        response = await self.http.get(url + "/", headers=Headers({"X-Request-ID": ["mine"]}))
        await response.content()
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"mine"])

    async def test_rejected_request_has_id(self) -> None:
        """Requests Vespa refuses itself carry a request id too, and are logged as rejected."""
        answer = await raw_request(
            self.url, b"GET http://evil.example/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "))
        self.assertRegex(answer.lower(), rb"\r\nx-request-id: [0-9a-f]{32}\r\n")
        self.assertIn(" 400 rejected ", formatEvent(self.events[-1]))


class AccessNamespaceTests(SynchronousTestCase):
    def test_worker_and_client_lines_told_apart(self) -> None:
        """The worker's access line is in ``vespa.access``, the client proxy's in
        ``vespa-client.access`` (in the sandbox both go to one stream); the same line else."""
        from twisted.web.test.requesthelper import DummyRequest

        from vast_vespa.outcome import Outcome, RelayResult

        worker_events = capture(self, "vespa.access")
        client_events = capture(self, "vespa-client.access")
        result = RelayResult(Outcome.SERVED, 200, 3, 1.0, 1.0, 1.5)
        for log in (log_access, log_client_access):
            request = cast(Request, DummyRequest([b"x"]))  # a stand-in for one
            request.path = b"/x"
            log(request, result, None)
        [worker_event], [client_event] = worker_events, client_events
        self.assertEqual(
            formatEvent(worker_event).split(" id=")[0], formatEvent(client_event).split(" id=")[0]
        )
        stream, clock = io.StringIO(), Clock()
        observe = text_observer(stream, clock)
        observe(dict(worker_event))
        observe(dict(client_event))
        clock.advance(FLUSH_AFTER)
        self.assertEqual(
            [line.split("] ")[0].split(" [")[1] for line in stream.getvalue().splitlines()],
            ["vespa.access#info", "vespa-client.access#info"],
        )

    def test_written_directly_while_a_text_log_service_runs(self) -> None:
        """While a service with a twistd text log runs, access lines are written to that log
        directly, as the event would have been (no event is published); before it starts and
        once it stops, they are published as events again."""
        from twisted.web.test.requesthelper import DummyRequest

        from vast_vespa.outcome import Outcome, RelayResult

        class Top(TextLogForTwistd, MultiService):
            pass

        events = capture(self, "vespa.access")
        stream, clock = io.StringIO(), Clock()
        top = Top()
        top.text_log = text_observer(stream, clock)  # type: ignore[assignment]
        request = cast(Request, DummyRequest([b"x"]))  # a stand-in for one
        request.path = b"/x"
        result = RelayResult(Outcome.SERVED, 200, 3, 1.0, 1.0, 1.5)
        top.startService()
        self.addCleanup(top.stopService)
        log_access(request, result, None)
        self.assertEqual(events, [])
        clock.advance(FLUSH_AFTER)
        [direct] = stream.getvalue().splitlines()
        top.stopService()
        log_access(request, result, None)
        [event] = events
        event_stream, event_clock = io.StringIO(), Clock()
        text_observer(event_stream, event_clock)(event)
        event_clock.advance(FLUSH_AFTER)
        [published] = event_stream.getvalue().splitlines()
        self.assertEqual(direct.split(" ", 1)[1], published.split(" ", 1)[1])
        self.assertRegex(direct, r"^\S+ \[vespa\.access#info\] GET /x 200 served ")

    def test_client_lines_batched_too(self) -> None:
        """The client's access lines wait for the batch's flush like the worker's."""
        clock = Clock()
        stream = FlushCounting()
        observe = text_observer(stream, clock)
        observe({**access_event("GET /a 200"), "log_namespace": "vespa-client.access"})
        self.assertEqual(stream.flushed, "")
        clock.advance(FLUSH_AFTER)
        self.assertIn("[vespa-client.access#info] GET /a 200", stream.flushed)


class JsonLogTests(TestCase):
    def test_json_lines(self) -> None:
        """The JSON observer writes one parseable object per line, with the fields and the
        formatted text."""
        stream = io.StringIO()
        observe = json_observer(stream)
        observe(
            {
                "log_format": "{method} {path} id={request_id}",
                "method": "GET",
                "path": "/x",
                "request_id": "r1",
                "log_namespace": "vespa.access",
                "log_level": LogLevel.warn,
                "log_time": 1.0,
            }
        )
        observe({"log_format": "second", "log_time": 2.0})
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual((first["request_id"], first["text"]), ("r1", "GET /x id=r1"))
        self.assertEqual(first["level"], "warn")  # the name, for jq and Loki filters
        self.assertEqual(json.loads(lines[1])["text"], "second")
        self.assertNotIn("level", json.loads(lines[1]))  # an event without a level

    async def test_twistd_json_logger(self) -> None:
        """`twistd --logger vast_vespa.logs.json_stdout -n vespa` logs JSON lines on stdout; the
        access line carries the request id."""
        backend = listen(self, FakeBackend(reactor))
        process = spawn_worker(self, backend, twistd=("--logger", "vast_vespa.logs.json_stdout"))
        url = await worker_url(process)
        await process.wait_for(rb"worker loaded")
        response = await http_client(self).get(
            url + "/echo", headers=Headers({"X-Request-ID": ["json-1"]})
        )
        await response.content()
        await process.wait_for(rb"id=json-1")
        records = [json.loads(line) for line in process.output.decode().splitlines()]
        [access] = [r for r in records if r.get("log_namespace") == "vespa.access"]
        self.assertEqual((access["request_id"], access["status"]), ("json-1", 200))
        self.assertEqual(access["level"], "info")
        self.assertIsInstance(access["ttfb_ms"], float)  # a number, as duration_ms
        self.assertTrue(re.match(r"GET /echo 200 served", access["text"]))


class FlushCounting(io.StringIO):
    """A stream that remembers how much of it had been flushed."""

    flushed = ""

    def flush(self) -> None:
        super().flush()
        self.flushed = self.getvalue()


# A stream whose first write is interrupted by a "signal handler" that logs a line.
_LOGGED_WHILE_WRITING = """
import io
from twisted.internet.task import Clock
from vast_vespa.logs import text_observer

def event(text):
    return {"log_namespace": "vespa", "log_format": text, "log_time": 0.0}

class Interrupted(io.StringIO):
    handler = None
    def write(self, text):
        handler, self.handler = self.handler, None
        if handler is not None:
            handler()
        return super().write(text)

stream = Interrupted()
observe = text_observer(stream, Clock())
stream.handler = lambda: observe(event("Received SIGTERM"))
observe(event("worker loaded"))
print("\\n".join(line.split("] ")[-1] for line in stream.getvalue().splitlines()))
"""


def twistd_options(values: dict[str, object]) -> usage.Options:
    """twistd's own options (a dict, as its ServerOptions are) holding ``values``."""
    options = usage.Options()
    options.update(values)
    return options


def access_event(line: str, when: float = 1700000000.0) -> LogEvent:
    return {
        "log_namespace": "vespa.access",
        "log_level": LogLevel.info,
        "log_format": PREFORMATTED,
        "line": line,
        "log_time": when,
    }


class TextLogTests(TestCase):
    def lines(
        self, observer_for: Callable[[IO[str]], ILogObserver], *events: LogEvent
    ) -> list[str]:
        stream = io.StringIO()
        observe = observer_for(stream)
        for event in events:
            observe(dict(event))
        return stream.getvalue().splitlines()

    def test_access_lines_flushed_in_batches(self) -> None:
        """Access lines wait in the stream's buffer for at most FLUSH_AFTER seconds (one
        flush for all of them); any other line is flushed at once, after the lines before
        it."""
        clock = Clock()
        stream = FlushCounting()
        observe = text_observer(stream, clock)
        observe(access_event("GET /a 200"))
        observe(access_event("GET /b 200"))
        self.assertEqual(stream.flushed, "")
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # one timer for the batch
        clock.advance(FLUSH_AFTER)
        self.assertEqual(stream.flushed.count("\n"), 2)
        observe(access_event("GET /c 200"))
        observe(
            {
                **access_event("-"),
                "log_namespace": "vast_vespa.worker.lifecycle",
                "log_level": LogLevel.warn,
                "log_format": "backend {state}",
                "state": "down",
            }
        )
        self.assertRegex(
            stream.flushed, r"GET /c 200\n.*\[vast_vespa.worker.lifecycle#warn\] backend down\n$"
        )
        clock.advance(FLUSH_AFTER)  # the pending timer finds nothing new
        self.assertEqual(stream.flushed, stream.getvalue())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_line_logged_while_writing_is_not_a_deadlock(self) -> None:
        """A signal handler runs in the main thread between any two steps, possibly while
        the text log writes, and logs (twistd's "Received SIGTERM, shutting down."): the log
        takes that line too instead of waiting for itself for ever, so the process goes on
        to stop. (In a child process: a regression times out instead of hanging the tests.)"""
        out = subprocess.run(
            [sys.executable, "-c", _LOGGED_WHILE_WRITING],
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(out.stdout.splitlines()[-2:], ["Received SIGTERM", "worker loaded"])

    def test_same_text_as_twisted(self) -> None:
        """Vespa's text observer writes exactly the lines of twistd's default observer, for
        pre-formatted lines (the access log) and any other event."""
        base = {"log_namespace": "vespa.access", "log_level": LogLevel.info}
        events = [
            {**base, "log_format": PREFORMATTED, "line": "GET /x 200", "log_time": 1700000000.25},
            {**base, "log_format": PREFORMATTED, "line": "GET /y 200", "log_time": 1700000000.75},
            {**base, "log_format": PREFORMATTED, "line": "GET /z 200", "log_time": 1700000001.5},
            {**base, "log_format": "{n} done", "n": 3, "log_time": 1700000002.0},
            {**base, "log_format": PREFORMATTED, "line": "x", "log_system": "sys", "log_time": 5.0},
            {"log_format": "no level", "log_time": 1700000003.0},
        ]
        ours = self.lines(lambda stream: text_observer(stream, Clock()), *events)
        self.assertEqual(ours, self.lines(textFileLogObserver, *events))
        self.assertEqual(len(ours), 6)
        self.assertTrue(ours[2].endswith(" [vespa.access#info] GET /z 200"))

    def test_only_where_twistd_writes_text_to_stdout(self) -> None:
        """The worker replaces twistd's observer only for text on stdout: never with
        --logger, --syslog, a log file, or when daemonized."""

        def given(**twistd: object) -> bool:
            options = usage.Options()
            options.parent = twistd_options({"nodaemon": True, "logfile": None, **twistd})
            return twistd_writes_text_to_stdout(options)

        self.assertTrue(given())
        self.assertTrue(given(logfile="-"))
        self.assertFalse(given(logger="vast_vespa.logs.json_stdout"))
        self.assertFalse(given(syslog=True))
        self.assertFalse(given(logfile="worker.log"))
        self.assertFalse(given(nodaemon=False))
        self.assertFalse(twistd_writes_text_to_stdout(usage.Options()))  # not under twistd

    def test_given_to_twistd(self) -> None:
        """The service hands the observer to twistd's application as its ILogObserver (what
        twistd logs to), and leaves the application alone otherwise."""

        class Top(TextLogForTwistd, MultiService):
            pass

        options = usage.Options()
        options.parent = twistd_options({"nodaemon": True, "logfile": None})
        application = Application("vespa")
        top = use_text_log(Top(), options)
        top.setServiceParent(application)
        ours = type(text_observer(io.StringIO(), Clock()))
        self.assertIsInstance(application.getComponent(ILogObserver), ours)
        options.parent["logfile"] = "worker.log"
        application = Application("vespa")
        use_text_log(Top(), options).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver))

    async def test_twistd_text_log(self) -> None:
        """Under `twistd -n vespa` the access line reaches stdout through Vespa's observer,
        in twistd's text format, next to the other lines."""
        backend = listen(self, FakeBackend(reactor))
        process = spawn_worker(self, backend)
        url = await worker_url(process)
        await process.wait_for(rb"worker loaded")
        response = await http_client(self).get(
            url + "/echo", headers=Headers({"X-Request-ID": ["text-1"]})
        )
        await response.content()
        await process.wait_for(rb"id=text-1")
        self.assertRegex(
            process.output.decode(),
            r"\n\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[vespa\.access#info\] "
            r"GET /echo 200 served .* id=text-1\n",
        )


class MaskTests(SynchronousTestCase):
    def test_mask(self) -> None:
        """A masked secret keeps its first 4 characters; short or empty ones show nothing."""
        self.assertEqual(mask("secret-token-123456"), "secr...")
        self.assertEqual(mask("short-secret"), "****")
        self.assertEqual(mask(""), "(none)")
