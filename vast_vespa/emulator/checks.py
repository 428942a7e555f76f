# -*- test-case-name: tests.test_emulator_registry -*-
"""
Conformance checks of what a worker sends the autoscaler (PROTOCOL.md 4.2 and 4.6): every field,
its JSON type and range, and the few cross-field rules. Each check returns a list of precise
problems ("cur_load: expected a number >= 0, got -1"), empty when the body conforms. Pure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

# A check returns None when the value is acceptable, else what was expected ("a string").
Check = Callable[[Any], "str | None"]

# Status strings of the [CLI] /delete_requests/ list body, and the success flag each implies
# (PROTOCOL.md 4.4: cancelled counts as success; error and rejected do not).
FINAL_STATUSES = {"Success": True, "Cancelled": True, "Error": False, "Rejected": False}
STATUSES = (*FINAL_STATUSES, "Created", "Started", "SessionActive")


def describe(value: Any) -> str:
    """The JSON kind and a short rendering of ``value``, for a problem message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    kind = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    rendered = json.dumps(value)
    if len(rendered) > 60:
        rendered = rendered[:57] + "..."
    return f"{kind.get(type(value), type(value).__name__)} ({rendered})"


def _is_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def number(minimum: float | None = None) -> Check:
    """A finite JSON number (int or float: reference workers send both, PROTOCOL.md 4.2)."""
    expected = "a number" if minimum is None else f"a number >= {minimum:g}"

    def check(value: Any) -> str | None:
        if _is_number(value) and (minimum is None or value >= minimum):
            return None
        return expected

    return check


def whole(minimum: int = 0, strict: bool = False) -> Check:
    """A whole number >= ``minimum``; ``strict`` refuses integral floats such as ``3.0``."""
    expected = "an integer" + (f" >= {minimum}" if minimum else " >= 0")

    def check(value: Any) -> str | None:
        if not _is_number(value):
            return expected
        if isinstance(value, float) and (strict or not value.is_integer()):
            return expected
        return None if value >= minimum else expected

    return check


def text(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def worker_url(value: Any) -> str | None:
    """PROTOCOL.md 1.2: ``http[s]://host:port``, no path: the router signs it byte for byte."""
    expected = "the worker's public URL, http[s]://host:port with no path"
    if not isinstance(value, str) or not value:
        return expected
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return expected
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return expected
    if parts.path or parts.query or parts.fragment:
        return expected
    return None


def _check_fields(body: Mapping[str, Any], fields: tuple[tuple[str, Check], ...]) -> list[str]:
    problems = []
    for name, check in fields:
        if name not in body:
            problems.append(f"{name}: missing")
            continue
        expected = check(body[name])
        if expected is not None:
            problems.append(f"{name}: expected {expected}, got {describe(body[name])}")
    return problems


def _check_idx_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        return []  # the field check has reported it
    bad = whole(strict=True)
    return [
        f"{name}[{index}]: expected a request_idx (an integer >= 0), got {describe(item)}"
        for index, item in enumerate(value)
        if bad(item) is not None
    ]


def _list_of_ints(value: Any) -> str | None:
    return None if isinstance(value, list) else "a list of request_idx integers"


# PROTOCOL.md 4.2, in wire order.
REPORT_FIELDS: tuple[tuple[str, Check], ...] = (
    ("id", whole(strict=True)),
    ("mtoken", text),
    ("version", text),
    ("loadtime", number(0)),
    ("cur_load", number(0)),
    ("rej_load", number(0)),
    ("new_load", number(0)),
    ("error_msg", text),
    ("max_perf", number(0)),
    ("cur_perf", number(0)),
    ("cur_capacity", whole()),
    ("max_capacity", whole()),
    ("num_requests_working", whole()),
    ("num_requests_recieved", whole()),
    ("additional_disk_usage", number()),
    ("working_request_idxs", _list_of_ints),
    ("url", worker_url),
)


def report_problems(body: Any) -> list[str]:
    """Everything wrong with a ``/worker_status/`` body; empty when it conforms."""
    if not isinstance(body, dict):
        return [f"body: expected a JSON object, got {describe(body)}"]
    problems = _check_fields(body, REPORT_FIELDS)
    if "num_requests_received" in body and "num_requests_recieved" not in body:
        problems.append(
            "num_requests_received: the protocol spells this field num_requests_recieved"
        )
    idxs = body.get("working_request_idxs")
    problems += _check_idx_list("working_request_idxs", idxs)
    working = body.get("num_requests_working")
    if isinstance(idxs, list) and whole()(working) is None and working != len(idxs):
        problems.append(
            f"num_requests_working: {working} does not match the {len(idxs)} entries of "
            "working_request_idxs"
        )
    return problems


BATCH_FIELDS: tuple[tuple[str, Check], ...] = (
    ("worker_id", whole(strict=True)),
    ("mtoken", text),
    ("request_idxs", _list_of_ints),
    ("success", boolean),
)
LIST_FIELDS: tuple[tuple[str, Check], ...] = (
    ("worker_id", whole(strict=True)),
    ("mtoken", text),
    ("requests", lambda value: None if isinstance(value, list) else "a list of objects"),
)
ITEM_FIELDS: tuple[tuple[str, Check], ...] = (
    ("request_idx", whole(strict=True)),
    ("success", boolean),
    ("status", lambda value: None if value in STATUSES else "one of " + ", ".join(STATUSES)),
    ("entered_queue_at", number(0)),
    ("work_started_at", number(0)),
    ("work_completed_at", number(0)),
)


def delete_problems(body: Any) -> list[str]:
    """
    Everything wrong with a ``/delete_requests/`` body, in either form of PROTOCOL.md 4.6:
    ``{worker_id, mtoken, request_idxs, success}`` or ``{worker_id, mtoken, requests: [...]}``.
    """
    if not isinstance(body, dict):
        return [f"body: expected a JSON object, got {describe(body)}"]
    if "requests" in body and "request_idxs" in body:
        return ["body: has both request_idxs (batch form) and requests (list form); send one"]
    if "requests" not in body:
        problems = _check_fields(body, BATCH_FIELDS)
        return problems + _check_idx_list("request_idxs", body.get("request_idxs"))
    problems = _check_fields(body, LIST_FIELDS)
    requests = body.get("requests")
    for index, item in enumerate(requests if isinstance(requests, list) else []):
        where = f"requests[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected an object, got {describe(item)}")
            continue
        problems += [f"{where}.{problem}" for problem in _check_fields(item, ITEM_FIELDS)]
        implied = FINAL_STATUSES.get(item.get("status", ""))
        if implied is not None and isinstance(item.get("success"), bool):
            if item["success"] is not implied:
                problems.append(
                    f"{where}.success: status {item['status']} means success is "
                    f"{json.dumps(implied)}, got {json.dumps(item['success'])}"
                )
    return problems


def finished_requests(body: Mapping[str, Any]) -> list[tuple[int, bool]]:
    """(request_idx, success) pairs of a conforming ``/delete_requests/`` body, either form."""
    if "requests" in body:
        return [(item["request_idx"], item["success"]) for item in body["requests"]]
    return [(idx, body["success"]) for idx in body["request_idxs"]]
