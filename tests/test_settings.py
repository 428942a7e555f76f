"""Worker settings: flag > PYWORKER_ env > env > default, old spellings, clear errors."""

from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.options import SettingsError
from vast_vespa.settings import load_settings


class SettingsTests(SynchronousTestCase):
    def test_precedence(self):
        """A flag beats PYWORKER_X, which beats X, which beats the default."""
        env = {"MAX_WAIT_TIME": "5", "PYWORKER_MAX_WAIT_TIME": "6"}
        self.assertEqual(load_settings({}, env).max_wait_time, 6.0)
        self.assertEqual(load_settings({}, {"MAX_WAIT_TIME": "5"}).max_wait_time, 5.0)
        self.assertEqual(load_settings({"max_wait_time": "7"}, env).max_wait_time, 7.0)

    def test_old_spellings(self):
        """Older variable names of the reference workers are still read."""
        env = {"PYWORKER_READY_TIMEOUT_INITIAL": "60", "MODEL_SERVER_URL": "http://h:1"}
        settings = load_settings({}, env)
        self.assertEqual(settings.ready_timeout, 60.0)
        self.assertEqual(settings.backend_url, "http://h:1")

    def test_bad_values_name_option_source_and_value(self):
        """A bad value is one line naming the option, where it came from, and the value."""
        cases = [
            (
                {},
                {"MAX_WAIT_TIME": "abc"},
                "MAX_WAIT_TIME='abc' (from environment variable MAX_WAIT_TIME)",
            ),
            (
                {"backend_url": "localhost:8000"},
                {},
                "BACKEND_URL='localhost:8000' (from flag --backend-url)",
            ),
            (
                {},
                {"PYWORKER_UNSECURED": "maybe"},
                "UNSECURED='maybe' (from environment variable PYWORKER_UNSECURED)",
            ),
            ({}, {"WORKER_PORT": "70000"}, "WORKER_PORT='70000'"),
            ({"listen": "bogus:1"}, {}, "LISTEN='bogus:1'"),
            ({}, {"SIGNATURE_SHAPES": "url,md5"}, "SIGNATURE_SHAPES='url,md5'"),
            ({}, {"REPORT_ADDR": "run.vast.ai"}, "REPORT_ADDR='run.vast.ai'"),
            ({}, {"CONTAINER_ID": "x1"}, "CONTAINER_ID='x1'"),
        ]
        for flags, env, expected in cases:
            with self.assertRaises(SettingsError) as caught:
                load_settings(flags, env)
            self.assertIn(expected, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_booleans(self):
        """Booleans accept the usual spellings."""
        for text, value in [
            ("true", True),
            ("1", True),
            ("Yes", True),
            ("off", False),
            ("", False),
        ]:
            self.assertEqual(load_settings({}, {"UNSECURED": text}).unsecured, value)

    def test_listen_default_and_port(self):
        """--listen defaults to tcp:$WORKER_PORT, and a tcp: listener sets the port."""
        self.assertEqual(load_settings({}, {}).listen, ("tcp:3000:backlog=1024",))
        self.assertEqual(load_settings({}, {"LISTEN": " "}).listen, ("tcp:3000:backlog=1024",))
        self.assertEqual(
            load_settings({}, {"WORKER_PORT": "4000"}).listen, ("tcp:4000:backlog=1024",)
        )
        settings = load_settings({"listen": "tcp:5000:interface=127.0.0.1 unix:/tmp/x.sock"}, {})
        self.assertEqual(settings.listen, ("tcp:5000:interface=127.0.0.1", "unix:/tmp/x.sock"))
        self.assertEqual(settings.worker_port, 5000)

    def test_vast_environment(self):
        """The Vast variables give the byte-identical public URL and the report addresses."""
        env = {
            "PUBLIC_IPADDR": "203.0.113.7",
            "WORKER_PORT": "13000",
            "VAST_TCP_PORT_13000": "43000",
            "REPORT_ADDR": "https://run.vast.ai/, https://backup.example",
            "CONTAINER_ID": "4242",
            "MASTER_TOKEN": "secret ",
        }
        vast = load_settings({}, env).vast
        self.assertEqual(vast.public_url, "http://203.0.113.7:43000")
        self.assertEqual(vast.report_addrs, ("https://run.vast.ai", "https://backup.example"))
        self.assertEqual(vast.container_id, 4242)
        self.assertEqual(vast.master_token, "secret ")
        env.update(USE_SSL="true", LISTEN="tcp:13000")  # explicit listener: no cert files needed
        self.assertEqual(load_settings({}, env).vast.public_url, "https://203.0.113.7:43000")

    def test_backend_preset_picks_benchmark(self):
        """BACKEND=tgi picks the shipped TGI benchmark unless BENCHMARK is set."""
        self.assertEqual(
            load_settings({}, {"BACKEND": "tgi"}).benchmark_spec,
            "vast_vespa.benchmarks.tgi:benchmark",
        )
        env = {"BACKEND": "tgi", "BENCHMARK": "mine:bench"}
        self.assertEqual(load_settings({}, env).benchmark_spec, "mine:bench")
