"""The workload estimators (vast_vespa.workload): their formulas, and hostile payloads."""

from __future__ import annotations

import math
import sys
import types
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from vast_vespa.options import SettingsError
from vast_vespa.settings import Settings
from vast_vespa.workload import (
    DEFAULT_WORKLOAD,
    MAX_WORKLOAD,
    PARSE_LIMIT,
    Workload,
    comfyui_workload,
    openai_workload,
    parse_workload_spec,
    read_payload,
    tgi_workload,
    workload_spec,
)

HOSTILE: list[Any] = [
    None,
    True,
    0,
    -5,
    1e308,
    "text",
    [],
    [1, 2, 3],
    {},
    {"max_tokens": -1},
    {"max_tokens": True},
    {"max_tokens": "500"},
    {"max_tokens": 1e308, "n": 1e308},
    {"max_tokens": None, "n": -3},
    {"messages": "not a list", "prompt": 5, "input": {"a": 1}},
    {"messages": [None, 1, "x", {"content": 7}, {"content": [None, {"text": 5}]}]},
    {"parameters": "no", "inputs": 12},
    {"parameters": {"max_new_tokens": -10}, "inputs": ["a"]},
    {"prompt": [[[[[[[["deep"]]]]]]]]},
]
ESTIMATORS = (openai_workload, tgi_workload, comfyui_workload)


class FormulaTests(SynchronousTestCase):
    def test_openai_chat(self) -> None:
        """Chat: the messages' text (4 characters a token, rounded up) plus max_tokens."""
        payload = {
            "model": "m",
            "messages": [
                {"role": "system", "content": "12345678"},  # 2 tokens
                {"role": "user", "content": [{"type": "text", "text": "123"}]},  # 1
            ],
            "max_tokens": 500,
        }
        self.assertEqual(openai_workload(payload), 503)

    def test_openai_limits_in_order(self) -> None:
        """max_completion_tokens wins over max_tokens; max_output_tokens is the last resort;
        without any, DEFAULT_WORKLOAD (100, the official worker's default)."""
        self.assertEqual(openai_workload({"max_completion_tokens": 7, "max_tokens": 9}), 7)
        self.assertEqual(openai_workload({"max_output_tokens": 11}), 11)
        self.assertEqual(openai_workload({"prompt": "1234"}), 1 + DEFAULT_WORKLOAD)

    def test_openai_prompt_shapes(self) -> None:
        """prompt/input as a string, strings, token ids or lists of token ids."""
        self.assertEqual(openai_workload({"prompt": ["1234", "12345"], "max_tokens": 0}), 3)
        self.assertEqual(openai_workload({"prompt": [1, 2, 3], "max_tokens": 0}), 3)
        self.assertEqual(openai_workload({"input": [[1, 2], [3]], "max_tokens": 0}), 3)

    def test_openai_choices(self) -> None:
        """n answers cost n times max_tokens (n capped at 128)."""
        self.assertEqual(openai_workload({"max_tokens": 10, "n": 3}), 30)
        self.assertEqual(openai_workload({"max_tokens": 1, "n": 10**9}), 128)

    def test_tgi(self) -> None:
        """TGI: the inputs' tokens plus parameters.max_new_tokens (default 100)."""
        payload = {"inputs": "12345678", "parameters": {"max_new_tokens": 64}}
        self.assertEqual(tgi_workload(payload), 66)
        self.assertEqual(tgi_workload({"inputs": "1234"}), 1 + DEFAULT_WORKLOAD)

    def test_comfyui(self) -> None:
        """ComfyUI: every job is 100, whatever its workflow."""
        self.assertEqual(comfyui_workload({"input": {"workflow_json": {"1": {}}}}), 100)

    def test_not_json_is_the_default(self) -> None:
        """A body that is not JSON, empty, or too large to parse counts DEFAULT_WORKLOAD."""
        estimate = Workload("openai")
        for body in (None, b"", b"\xff\x00", b"{", b"[" * 100_000, b" " * (PARSE_LIMIT + 1)):
            self.assertEqual(estimate.of_body(body), DEFAULT_WORKLOAD)
        self.assertEqual(estimate.of_body(b'{"max_tokens": 5}'), 5)

    def test_spec_and_defaults(self) -> None:
        """WORKLOAD names are case-insensitive; unset, BACKEND picks (else cost)."""
        self.assertEqual(parse_workload_spec(" OpenAI "), "openai")
        self.assertEqual(parse_workload_spec("my.mod:calc"), "my.mod:calc")
        self.assertRaises(ValueError, parse_workload_spec, "tokens please")
        self.assertEqual(workload_spec("", "vllm"), "openai")
        self.assertEqual(workload_spec("", "tgi"), "tgi")
        self.assertEqual(workload_spec("", "comfyui"), "comfyui")
        self.assertEqual(workload_spec("", ""), "cost")
        self.assertEqual(workload_spec("cost", "vllm"), "cost")
        self.assertEqual(Settings(backend="ollama").workload_spec, "openai")


class HostileTests(SynchronousTestCase):
    def test_hostile_payloads(self) -> None:
        """Every estimator answers a bounded number >= 0 for payloads of any shape."""
        for estimate in ESTIMATORS:
            for payload in HOSTILE:
                value = estimate(payload)
                self.assertTrue(0 <= value < math.inf, (estimate.__name__, payload, value))

    def test_bounded(self) -> None:
        """Through Workload, an estimate is at most MAX_WORKLOAD."""
        for spec in ("openai", "tgi"):
            huge = Workload(spec).of_payload(
                {"max_tokens": 1e300, "parameters": {"max_new_tokens": 1e300}}
            )
            self.assertEqual(huge, MAX_WORKLOAD)

    def test_deep_nesting(self) -> None:
        """JSON nested as deep as the parser allows is estimated, never a RecursionError."""
        for depth in (10, 500, 1000):
            body = b'{"max_tokens": 1, "prompt": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}"
            value = Workload("openai").of_body(body)
            self.assertGreaterEqual(value, 1)

    @settings(max_examples=300, deadline=None)
    @given(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False)
            | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=5)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "messages",
                            "prompt",
                            "input",
                            "inputs",
                            "content",
                            "text",
                            "max_tokens",
                            "n",
                            "parameters",
                            "max_new_tokens",
                        ]
                    ),
                    children,
                    max_size=5,
                )
            ),
            max_leaves=30,
        )
    )
    def test_any_json(self, payload: Any) -> None:
        """Any JSON value: a number in [0, MAX_WORKLOAD], no exception."""
        for spec in ("openai", "tgi", "comfyui"):
            value = Workload(spec).of_payload(payload)
            self.assertTrue(0 <= value <= MAX_WORKLOAD, (spec, payload, value))


class UserFunctionTests(SynchronousTestCase):
    def module(self, **functions: Any) -> str:
        module = types.ModuleType("workload_test_module")
        for name, function in functions.items():
            setattr(module, name, function)
        self.patch(sys, "modules", {**sys.modules, "workload_test_module": module})
        return "workload_test_module"

    def test_user_function(self) -> None:
        """module:function gets the parsed payload; its number is the workload."""
        name = self.module(calc=lambda payload: payload["steps"] * 10)
        self.assertEqual(Workload(f"{name}:calc").of_body(b'{"steps": 3}'), 30)

    def test_failing_function(self) -> None:
        """A function that raises or returns a non-number counts DEFAULT_WORKLOAD, and says so
        in the log once."""

        def broken(payload: Any) -> Any:
            raise KeyError("steps")

        name = self.module(broken=broken, text=lambda payload: "many", nan=lambda p: math.nan)
        for function in ("broken", "text", "nan"):
            estimate = Workload(f"{name}:{function}")
            with capturedLogs() as events:
                self.assertEqual(estimate.of_payload({}), DEFAULT_WORKLOAD)
                self.assertEqual(estimate.of_payload({}), DEFAULT_WORKLOAD)
            self.assertEqual(len(events), 1)
            self.assertIn(f"WORKLOAD={name}:{function}", formatEvent(events[0]))

    def test_cannot_load(self) -> None:
        """A module or function that does not exist stops start-up with the spec named."""
        with self.assertRaises(SettingsError) as caught:
            Workload("no_such_module_here:calc")
        self.assertIn("WORKLOAD='no_such_module_here:calc'", str(caught.exception))
        name = self.module(value=3)
        with self.assertRaises(SettingsError) as caught:
            Workload(f"{name}:value")
        self.assertIn("not callable", str(caught.exception))

    def test_read_payload(self) -> None:
        self.assertEqual(read_payload(b'{"a": [1]}'), {"a": [1]})
        self.assertIsNone(read_payload(b"NaN"))
