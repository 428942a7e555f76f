"""The emulator's pure parts: report conformance checks, routing choice, signed replies."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.emulator_fixtures import ACCOUNT_KEY, ENDPOINT_KEY, PUBLIC, registry, report
from vast_vespa import signing
from vast_vespa.emulator.checks import delete_problems, report_problems
from vast_vespa.emulator.registry import RouteError

ROUTE = {"endpoint": "my-endpoint", "cost": 256}


class ReportCheckTests(SynchronousTestCase):
    def test_reference_report_conforms(self) -> None:
        """The report PROTOCOL.md 4.2 shows a reference worker sending has no problem."""
        self.assertEqual(report_problems(report()), [])

    def test_int_and_float_numbers_both_conform(self) -> None:
        """Load numbers flip between 0 and 0.0 in reference workers: both are fine."""
        self.assertEqual(report_problems(report(cur_load=0.0, rej_load=0, max_capacity=0.0)), [])

    def test_integer_beyond_any_float(self) -> None:
        """A load beyond any float is a problem named like any other, not an error."""
        [problem] = report_problems(report(cur_load=10**400))
        self.assertTrue(problem.startswith("cur_load: expected a number >= 0, got an integer"))

    def test_every_missing_field_is_named(self) -> None:
        """An empty object is told each of the 17 fields it lacks, in wire order."""
        problems = report_problems({})
        self.assertEqual(len(problems), 17)
        self.assertEqual(problems[0], "id: missing")
        self.assertEqual(problems[-1], "url: missing")

    def test_wrong_types_are_precise(self) -> None:
        """Each wrong value is reported with the field, what was expected, and what came."""
        problems = report_problems(
            report(
                id="4242",
                mtoken=None,
                cur_load=-1,
                max_perf=True,
                working_request_idxs=[1, "2"],
                num_requests_working=2,
                url="http://203.0.113.7:43000/",
            )
        )
        self.assertEqual(
            problems,
            [
                'id: expected an integer >= 0, got a string ("4242")',
                "mtoken: expected a string, got null",
                "cur_load: expected a number >= 0, got an integer (-1)",
                "max_perf: expected a number >= 0, got a boolean (true)",
                "url: expected the worker's public URL, http[s]://host:port with no path, "
                'got a string ("http://203.0.113.7:43000/")',
                'working_request_idxs[1]: expected a request_idx (an integer >= 0), got a string ("2")',
            ],
        )

    def test_cross_field_and_spelling(self) -> None:
        """A count that disagrees with the id list, and the 'received' spelling, are flagged."""
        body = report(num_requests_working=3, working_request_idxs=[5])
        body["num_requests_received"] = body.pop("num_requests_recieved")
        problems = report_problems(body)
        self.assertIn("num_requests_recieved: missing", problems)
        self.assertIn(
            "num_requests_received: the protocol spells this field num_requests_recieved", problems
        )
        self.assertIn(
            "num_requests_working: 3 does not match the 1 entries of working_request_idxs",
            problems,
        )

    def test_not_an_object(self) -> None:
        """A body that is not a JSON object says so."""
        self.assertEqual(report_problems([1]), ["body: expected a JSON object, got a list ([1])"])


class DeleteCheckTests(SynchronousTestCase):
    def test_batch_form_conforms(self) -> None:
        """The [CL]/[SDK] batch body conforms."""
        body = {"worker_id": 1, "mtoken": "m", "request_idxs": [5101, 5104], "success": True}
        self.assertEqual(delete_problems(body), [])

    def test_list_form_conforms(self) -> None:
        """The [CLI] list body with timings and statuses conforms."""
        item = {
            "request_idx": 5101,
            "success": True,
            "status": "Success",
            "entered_queue_at": 1795867103.84,
            "work_started_at": 1795867103.85,
            "work_completed_at": 0.0,
        }
        self.assertEqual(delete_problems({"worker_id": 1, "mtoken": "m", "requests": [item]}), [])

    def test_broken_bodies(self) -> None:
        """Missing fields, bad items, and a status contradicting success are each named."""
        self.assertEqual(
            delete_problems({"worker_id": 1, "request_idxs": [1, None], "success": "yes"}),
            [
                "mtoken: missing",
                'success: expected true or false, got a string ("yes")',
                "request_idxs[1]: expected a request_idx (an integer >= 0), got null",
            ],
        )
        item = {
            "request_idx": 1,
            "success": True,
            "status": "Error",
            "entered_queue_at": 0,
            "work_started_at": 0,
        }
        self.assertEqual(
            delete_problems({"worker_id": 1, "mtoken": "", "requests": [item, 3]}),
            [
                "requests[0].work_completed_at: missing",
                "requests[0].success: status Error means success is false, got true",
                "requests[1]: expected an object, got an integer (3)",
            ],
        )
        self.assertEqual(
            delete_problems({"worker_id": 1, "mtoken": "", "requests": [], "request_idxs": []}),
            ["body: has both request_idxs (batch form) and requests (list form); send one"],
        )


class RoutingTests(SynchronousTestCase):
    def test_signed_reply_verifies_in_each_shape(self) -> None:
        """The reply is signed in the configured shape, verifies only in it, cost a float."""
        for shape, other in (("url", "five-field"), ("five-field", "url")):
            reg = registry(shape)
            reg.report(report())
            reply = reg.route(f"Bearer {ENDPOINT_KEY}", ROUTE)
            self.assertEqual(
                set(reply),
                {"endpoint", "url", "cost", "reqnum", "request_idx", "signature", "__request_id"},
            )
            self.assertIsInstance(reply["cost"], float)
            self.assertEqual(reply["url"], "http://203.0.113.7:43000")
            self.assertEqual(signing.verify(PUBLIC, reply, (shape,)), shape)
            self.assertIsNone(signing.verify(PUBLIC, reply, (other,)))

    def test_waiting_form_then_replay(self) -> None:
        """With no worker ready the reply has no url but a request_idx; replaying it once a
        worker is ready routes that same request_idx."""
        clock = Clock()
        reg = registry(clock=clock)
        waiting = reg.route(ENDPOINT_KEY, ROUTE)
        self.assertNotIn("url", waiting)
        self.assertEqual(waiting["status"]["ready"], 0)
        reg.report(report(max_perf=0.0, loadtime=0.0))
        self.assertEqual(reg.route(ENDPOINT_KEY, ROUTE)["status"]["loading"], 1)
        reg.report(report())
        reply = reg.route(ENDPOINT_KEY, {**ROUTE, "request_idx": waiting["request_idx"]})
        self.assertEqual(reply["request_idx"], waiting["request_idx"])
        self.assertIn("url", reply)

    def test_errored_and_silent_workers_are_not_chosen(self) -> None:
        """Errored workers and workers that stopped reporting get no requests."""
        clock = Clock()
        reg = registry(clock=clock, stale_after=30)
        reg.report(report(id=1, url="http://10.0.0.1:1", error_msg="benchmark failed"))
        reg.report(report(id=2, url="http://10.0.0.2:1"))
        self.assertEqual(reg.route(ENDPOINT_KEY, ROUTE)["url"], "http://10.0.0.2:1")
        clock.advance(31)
        self.assertEqual(
            reg.route(ENDPOINT_KEY, ROUTE)["status"],
            {
                "ready": 0,
                "loading": 0,
                "errored": 1,
                "silent": 1,
                "detail": "no worker is ready yet; call /route/ again with this request_idx",
            },
        )

    def test_lowest_estimated_wait_wins_and_load_is_shared(self) -> None:
        """The worker with the lowest cur_load / max_perf is chosen, counting what was routed
        to it since its last report, so back-to-back requests alternate between equal workers."""
        reg = registry()
        reg.report(report(id=1, url="http://10.0.0.1:1", cur_load=500, max_perf=100))
        reg.report(report(id=2, url="http://10.0.0.2:1", cur_load=100, max_perf=10))
        self.assertEqual(reg.route(ENDPOINT_KEY, ROUTE)["url"], "http://10.0.0.1:1")  # 5 s < 10 s
        reg.report(report(id=1, url="http://10.0.0.1:1", cur_load=0, max_perf=100))
        reg.report(report(id=2, url="http://10.0.0.2:1", cur_load=0, max_perf=100))
        urls = [reg.route(ENDPOINT_KEY, ROUTE)["url"] for _ in range(4)]
        self.assertEqual(sorted(urls), ["http://10.0.0.1:1"] * 2 + ["http://10.0.0.2:1"] * 2)

    def test_reqnum_per_worker_request_idx_global(self) -> None:
        """reqnum counts per worker; request_idx grows across the whole emulator."""
        reg = registry()
        reg.report(report(id=1, url="http://10.0.0.1:1"))
        reg.report(report(id=2, url="http://10.0.0.2:1"))
        replies = [reg.route(ENDPOINT_KEY, ROUTE) for _ in range(4)]
        self.assertEqual([r["request_idx"] for r in replies], [1, 2, 3, 4])
        self.assertEqual([r["reqnum"] for r in replies], [1, 1, 2, 2])

    def test_replayed_request_avoids_its_last_worker(self) -> None:
        """A client re-routing the same request_idx (its worker was unreachable) is sent to
        another ready worker."""
        reg = registry()
        reg.report(report(id=1, url="http://10.0.0.1:1"))
        reg.report(report(id=2, url="http://10.0.0.2:1"))
        first = reg.route(ENDPOINT_KEY, ROUTE)
        again = reg.route(ENDPOINT_KEY, {**ROUTE, "request_idx": first["request_idx"]})
        self.assertEqual(again["request_idx"], first["request_idx"])
        self.assertNotEqual(again["url"], first["url"])

    def test_bad_keys_are_401(self) -> None:
        """No key, an unknown key, the account key and another endpoint's name are 401s."""
        reg = registry()
        for key, body, detail in (
            (None, ROUTE, "send Authorization: Bearer <endpoint api_key>"),
            ("nope", ROUTE, "no configured endpoint has this API key"),
            (ACCOUNT_KEY, ROUTE, "this is the account key; /route/ takes the endpoint's api_key"),
            (
                ENDPOINT_KEY,
                {"endpoint": "other"},
                "this key belongs to another endpoint, not 'other'",
            ),
        ):
            with self.assertRaises(RouteError) as caught:
                reg.route(key, body)
            self.assertEqual((caught.exception.code, caught.exception.detail), (401, detail))

    def test_bad_route_bodies_are_400(self) -> None:
        """A body without endpoint, or with a bad cost or request_idx, is a precise 400."""
        reg = registry()
        for body, detail in (
            ([], "expected a JSON object, got a list ([])"),
            ({"cost": 1}, "endpoint: expected the endpoint name"),
            ({**ROUTE, "cost": "9"}, 'cost: expected a number >= 0, got a string ("9")'),
            (
                {**ROUTE, "request_idx": 1.5},
                "request_idx: expected an integer >= 0, got a number (1.5)",
            ),
        ):
            with self.assertRaises(RouteError) as caught:
                reg.route(ENDPOINT_KEY, body)
            self.assertEqual((caught.exception.code, caught.exception.detail), (400, detail))

    def test_default_cost(self) -> None:
        """A route request without cost is priced 100.0 (PROTOCOL.md 8.1)."""
        reg = registry()
        reg.report(report())
        self.assertEqual(reg.route(ENDPOINT_KEY, {"endpoint": "my-endpoint"})["cost"], 100.0)


class BookkeepingTests(SynchronousTestCase):
    def test_delete_requests_close_routed_requests(self) -> None:
        """Both /delete_requests/ forms mark routed requests finished with their success flag;
        unknown ids are counted, not refused."""
        reg = registry()
        reg.report(report())
        idxs = [reg.route(ENDPOINT_KEY, ROUTE)["request_idx"] for _ in range(3)]
        self.assertEqual(
            reg.delete_requests(
                {
                    "worker_id": 4242,
                    "mtoken": "mtok-abcdefghijk",
                    "request_idxs": idxs[:2],
                    "success": True,
                }
            ),
            [],
        )
        item = {
            "request_idx": idxs[2],
            "success": False,
            "status": "Error",
            "entered_queue_at": 1.0,
            "work_started_at": 1.0,
            "work_completed_at": 2.0,
        }
        reg.delete_requests({"worker_id": 4242, "mtoken": "mtok-abcdefghijk", "requests": [item]})
        reg.delete_requests(
            {
                "worker_id": 4242,
                "mtoken": "mtok-abcdefghijk",
                "request_idxs": [999],
                "success": False,
            }
        )
        states = {r["request_idx"]: r["state"] for r in reg.status()["requests"]}
        self.assertEqual(states, {idxs[0]: "success", idxs[1]: "success", idxs[2]: "failed"})
        self.assertEqual(reg.status()["unknown_finished"], 1)
        self.assertEqual(reg.open, {})

    def test_mtoken_must_stay_the_same(self) -> None:
        """A worker whose mtoken changes between reports is refused and the refusal is shown."""
        reg = registry()
        reg.report(report())
        self.assertEqual(
            reg.report(report(mtoken="other")),
            ["mtoken: differs from the one worker 4242 reported before"],
        )
        refused = reg.status()["refused_reports"]
        self.assertEqual(refused[0]["path"], "/worker_status/")
        self.assertEqual(refused[0]["worker_id"], 4242)

    def test_status_and_listings(self) -> None:
        """The status view shows workers with state and wait, and no key or mtoken; the
        listing APIs show the endpoint with its key and its workers."""
        clock = Clock()
        reg = registry(clock=clock)
        reg.report(report(cur_load=1000, max_perf=100.0))
        clock.advance(2.5)
        status = reg.status()
        worker = status["workers"][0]
        self.assertEqual(
            (worker["state"], worker["estimated_wait"], worker["last_report_age"]),
            ("ready", 10.0, 2.5),
        )
        self.assertNotIn(ENDPOINT_KEY, repr(status))
        self.assertNotIn("mtok-abcdefghijk", repr(status))
        jobs = reg.endpoint_jobs()
        self.assertEqual(
            (jobs[0]["endpoint_name"], jobs[0]["api_key"], jobs[0]["id"]),
            ("my-endpoint", ENDPOINT_KEY, 7),
        )
        workers = reg.endpoint_workers(7)
        assert workers is not None
        self.assertEqual(
            (workers[0]["id"], workers[0]["status"], workers[0]["perf"]), (4242, "ready", 100.0)
        )
        self.assertIsNone(reg.endpoint_workers(8))

    def test_unknown_shape_is_refused(self) -> None:
        """A registry cannot be made with a shape no worker verifies."""
        self.assertRaises(ValueError, registry, "four-field")
