"""Conforming worker reports and a registry over the shared test key, for the emulator tests."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.helpers import VECTORS, listen
from vast_vespa import signing
from vast_vespa.emulator import tap
from vast_vespa.emulator.registry import Endpoint, Registry

with open(os.path.join(VECTORS, "test_private_key.pem"), "rb") as _f:
    PRIVATE = signing.load_private_key(_f.read())
PUBLIC = PRIVATE.public_key()

ENDPOINT_KEY = "endpoint-key-1"
ACCOUNT_KEY = "account-key-1"


def report(**changes: Any) -> dict[str, Any]:
    """The first report PROTOCOL.md 4.2 shows a [CL] worker sending, with ``changes``."""
    body: dict[str, Any] = {
        "id": 4242,
        "mtoken": "mtok-abcdefghijk",
        "version": "0.3.0",
        "loadtime": 0.5723,
        "cur_load": 0,
        "rej_load": 0.0,
        "new_load": 0.0,
        "error_msg": "",
        "max_perf": 90382.79,
        "cur_perf": 0.0,
        "cur_capacity": 0,
        "max_capacity": 0,
        "num_requests_working": 0,
        "num_requests_recieved": 0,
        "additional_disk_usage": 3.8e-06,
        "working_request_idxs": [],
        "url": "http://203.0.113.7:43000",
    }
    body.update(changes)
    return body


def registry(shape: str = "url", clock: Clock | None = None, **kwargs: Any) -> Registry:
    """A registry with one endpoint ``my-endpoint`` whose key is ENDPOINT_KEY."""
    clock = clock or Clock()
    return Registry(
        PRIVATE,
        [Endpoint("my-endpoint", ENDPOINT_KEY, 7)],
        shape,
        ACCOUNT_KEY,
        clock.seconds,
        **kwargs,
    )


def start_emulator(test: TestCase, shape: str = "url") -> tuple[str, tap.AutoscalerService]:
    """An emulator on 127.0.0.1 signing with the shared test key; returns (url, service)."""
    config = tap.EmulatorConfig(
        listen=(),
        endpoints=(Endpoint("my-endpoint", ENDPOINT_KEY, 7),),
        account_key=ACCOUNT_KEY,
        shape=shape,
        key=PRIVATE,
    )
    service = tap.build_autoscaler(config, reactor)
    return listen(test, service.site), service
