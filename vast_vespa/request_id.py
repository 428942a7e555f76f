# -*- test-case-name: tests.test_request_id -*-
"""
``X-Request-ID``: one id per request, from the client when it sent a usable one (printable
ASCII, at most 128 characters), otherwise a fresh one. It goes to the backend, back to the
client and into the access log, so any request can be followed through the logs.

A fresh id is 32 hex digits: a random per-process prefix (16) and a counter (16), unique
within the process and, with 64 random bits, across processes and restarts. It is for tracing,
not a secret: uuid4 reads ``os.urandom`` (a system call) on every request.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets

from twisted.web.server import Request

from vast_vespa.headers import header_ops

HEADER = b"X-Request-Id"  # canonical, as HeaderOps takes names
MAX_LENGTH = 128
_USABLE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LENGTH)


class _Fresh:
    """Ids from a random prefix and a counter; a forked child draws its own prefix."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(8).encode("ascii")
        self._counter = itertools.count()

    def next(self) -> bytes:
        return b"%s%016x" % (self._prefix, next(self._counter))


_fresh = _Fresh()


def assign(request: Request) -> bytes:
    """Give ``request`` its id: set on the request headers (so they carry it to the backend)
    and on the response headers (so the client gets it back)."""
    ops = header_ops(request)
    given = ops.table(request.requestHeaders).get(HEADER)
    if given and len(given) == 1 and _USABLE.fullmatch(given[0]):
        rid = given[0]
    else:
        rid = _fresh.next()
    ops.put(request.requestHeaders, HEADER, [rid])
    ops.put(request.responseHeaders, HEADER, [rid])
    return rid


def of(request: Request) -> str:
    """The id :func:`assign` gave ``request`` ("-" if none)."""
    values = header_ops(request).table(request.responseHeaders).get(HEADER)
    return values[0].decode("ascii") if values else "-"
