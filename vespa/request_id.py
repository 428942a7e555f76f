# -*- test-case-name: tests.test_request_id -*-
"""
``X-Request-ID``: one id per request, from the client when it sent a usable one (printable
ASCII, at most 128 characters), otherwise a fresh uuid4 hex. It goes to the backend, back to
the client and into the access log, so any request can be followed through the logs.
"""

from __future__ import annotations

import re
import uuid

from twisted.web.server import Request

HEADER = b"x-request-id"
MAX_LENGTH = 128
_USABLE = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_LENGTH)


def assign(request: Request) -> bytes:
    """Give ``request`` its id: set on the request headers (so they carry it to the backend)
    and on the response headers (so the client gets it back)."""
    given = request.requestHeaders.getRawHeaders(HEADER)
    if given and len(given) == 1 and _USABLE.fullmatch(given[0]):
        rid = given[0]
    else:
        rid = uuid.uuid4().hex.encode("ascii")
    request.requestHeaders.setRawHeaders(HEADER, [rid])
    request.responseHeaders.setRawHeaders(HEADER, [rid])
    return rid


def of(request: Request) -> str:
    """The id :func:`assign` gave ``request`` ("-" if none)."""
    values = request.responseHeaders.getRawHeaders(HEADER)
    return values[0].decode("ascii") if values else "-"
