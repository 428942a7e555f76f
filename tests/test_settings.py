"""Worker settings: flag > PYWORKER_ env > env > default, old spellings, clear errors."""

from twisted.trial.unittest import SynchronousTestCase

from tests.certs import self_signed
from vast_vespa.options import SettingsError
from vast_vespa.settings import load_settings


class SettingsTests(SynchronousTestCase):
    def test_precedence(self) -> None:
        """A flag beats PYWORKER_X, which beats X, which beats the default."""
        env = {"MAX_WAIT_TIME": "5", "PYWORKER_MAX_WAIT_TIME": "6"}
        self.assertEqual(load_settings({}, env).max_wait_time, 6.0)
        self.assertEqual(load_settings({}, {"MAX_WAIT_TIME": "5"}).max_wait_time, 5.0)
        self.assertEqual(load_settings({"max_wait_time": "7"}, env).max_wait_time, 7.0)

    def test_old_spellings(self) -> None:
        """Older variable names of the reference workers are still read."""
        env = {"PYWORKER_READY_TIMEOUT_INITIAL": "60", "MODEL_SERVER_URL": "http://h:1"}
        settings = load_settings({}, env)
        self.assertEqual(settings.ready_timeout, 60.0)
        self.assertEqual(settings.backend_url, "http://h:1")

    def test_bad_values_name_option_source_and_value(self) -> None:
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

    def test_booleans(self) -> None:
        """Booleans accept the usual spellings."""
        for text, value in [
            ("true", True),
            ("1", True),
            ("Yes", True),
            ("off", False),
            ("", False),
        ]:
            self.assertEqual(load_settings({}, {"UNSECURED": text}).unsecured, value)

    def test_listen_default_and_port(self) -> None:
        """--listen defaults to tcp:$WORKER_PORT, and a tcp: listener sets the port."""
        self.assertEqual(load_settings({}, {}).listen, ("tcp:3000:backlog=1024",))
        self.assertEqual(load_settings({}, {"LISTEN": " "}).listen, ("tcp:3000:backlog=1024",))
        self.assertEqual(
            load_settings({}, {"WORKER_PORT": "4000"}).listen, ("tcp:4000:backlog=1024",)
        )
        settings = load_settings({"listen": "tcp:5000:interface=127.0.0.1 unix:/tmp/x.sock"}, {})
        self.assertEqual(settings.listen, ("tcp:5000:interface=127.0.0.1", "unix:/tmp/x.sock"))
        self.assertEqual(settings.worker_port, 5000)

    def test_vast_environment(self) -> None:
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

    def test_listener_decides_the_scheme(self) -> None:
        """With --listen, the listener on the worker port decides the URL's scheme: an ssl: one
        is https without USE_SSL, and USE_SSL with a plain tcp: one stops start-up (clients
        would be sent https:// to a port speaking HTTP). With no listener on that port (TLS
        ended in front of it on another port), USE_SSL decides, as without --listen."""
        cert, key, _ = self_signed(self.mktemp())
        env = {"PUBLIC_IPADDR": "203.0.113.7", "VAST_TCP_PORT_13000": "43000"}
        tls = f"ssl:13000:privateKey={key}:certKey={cert}"
        moved = f"ssl:interface=127.0.0.1:port=13000:privateKey={key}:certKey={cert}"
        for listen, use_ssl, url in [
            (tls, "", "https://203.0.113.7:43000"),
            (moved, "", "https://203.0.113.7:43000"),  # port= anywhere, the port derived
            (tls, "true", "https://203.0.113.7:43000"),
            (f"tcp:13000 {tls.replace('13000', '13443')}", "", "http://203.0.113.7:43000"),
            ("tcp:13000", "false", "http://203.0.113.7:43000"),
        ]:
            settings = load_settings({"listen": listen}, {**env, "USE_SSL": use_ssl})
            self.assertEqual(settings.vast.public_url, url, listen)
        with self.assertRaises(SettingsError):
            load_settings({"listen": "tcp:interface=0.0.0.0:port=13000"}, {**env, "USE_SSL": "1"})
        with self.assertRaises(SettingsError) as raised:
            load_settings({"listen": "tcp:13000"}, {**env, "USE_SSL": "true"})
        self.assertIn(
            "USE_SSL is true but the listener on port 13000 serves plain HTTP (tcp:13000)",
            str(raised.exception),
        )
        behind = {**env, "USE_SSL": "true", "WORKER_PORT": "13000"}
        settings = load_settings({"listen": "tcp:13001"}, behind)
        self.assertEqual(settings.vast.public_url, "https://203.0.113.7:43000")

    def test_backend_preset_picks_benchmark(self) -> None:
        """BACKEND=tgi picks the shipped TGI benchmark unless BENCHMARK is set."""
        self.assertEqual(
            load_settings({}, {"BACKEND": "tgi"}).benchmark_spec,
            "vast_vespa.benchmarks.tgi:benchmark",
        )
        env = {"BACKEND": "tgi", "BENCHMARK": "mine:bench"}
        self.assertEqual(load_settings({}, env).benchmark_spec, "mine:bench")


class BackendDefaultsTests(SynchronousTestCase):
    def test_health_path_per_backend(self) -> None:
        """BACKEND picks the health path; HEALTHCHECK_ENDPOINT (or its old spelling) wins."""
        expected = {
            "": "/health",
            "vllm": "/health",
            "tgi": "/health",
            "llama.cpp": "/health",
            "ollama": "/api/version",
            "comfyui": "/system_stats",
            "llama-cpp-python": "/openapi.json",
        }
        for backend, path in expected.items():
            self.assertEqual(load_settings({}, {"BACKEND": backend}).health_path, path, backend)
        for env in ("HEALTHCHECK_ENDPOINT", "PYWORKER_HEALTHCHECK_ENDPOINT"):
            settings = load_settings({}, {"BACKEND": "ollama", env: "/ping"})
            self.assertEqual(settings.health_path, "/ping")
        settings = load_settings({"backend": "comfyui"}, {"MODEL_HEALTH_ENDPOINT": "/ready"})
        self.assertEqual(settings.health_path, "/ready")
        with self.assertRaises(SettingsError):
            load_settings({}, {"HEALTHCHECK_ENDPOINT": "health"})

    def test_llama_cpp_python_uses_the_openai_benchmark(self) -> None:
        """llama-cpp-python speaks the OpenAI API: the shipped OpenAI benchmark."""
        settings = load_settings({}, {"BACKEND": "llama-cpp-python"})
        self.assertEqual(settings.benchmark_spec, "vast_vespa.benchmarks.openai:benchmark")

    def test_model_log_options(self) -> None:
        """MODEL_LOG (or MODEL_LOG_FILE, or PYWORKER_MODEL_LOG) names the file; the three
        lists are newline-separated substrings (stripped), BACKEND's when unset, nothing with
        "none"."""
        self.assertEqual(load_settings({}, {}).model_log, "")
        for env in ("MODEL_LOG", "MODEL_LOG_FILE", "PYWORKER_MODEL_LOG"):
            self.assertEqual(load_settings({}, {env: "/var/log/x.log"}).model_log, "/var/log/x.log")
        vllm = load_settings({}, {"BACKEND": "vllm"}).model_log_lines
        self.assertEqual(vllm.load, ("Application startup complete.",))
        self.assertIn("CUDA out of memory", vllm.error)
        environment = {
            "BACKEND": "vllm",
            "PYWORKER_MODEL_LOAD_LOG_MSG": "  ready to roll\n\n  all good  \n",
            "MODEL_ERROR_LOG_MSGS": "none",
        }
        lines = load_settings({}, environment).model_log_lines
        self.assertEqual(lines.load, ("ready to roll", "all good"))
        self.assertEqual(lines.error, ())
        self.assertEqual(lines.info, vllm.info)
        self.assertEqual(load_settings({}, {}).model_log_lines.load, ())
