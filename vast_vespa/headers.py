# -*- test-case-name: tests.test_headers -*-
"""
Which headers cross the proxy (RFC 9110 section 7.6.1): everything end-to-end passes,
hop-by-hop headers and the ones that name the connection stop here. Pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

from twisted.web.http_headers import Headers

# Lower-case names. The relay's agent writes its own Host and framing headers, so the client's
# Host/Content-Length must not be copied onto the backend request (they would go twice).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
REQUEST_ONLY_DROPPED = frozenset({b"host", b"content-length", b"expect"})
RESPONSE_ONLY_DROPPED = frozenset({b"content-length"})


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """Header names listed in Connection header values (they are hop-by-hop too)."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def end_to_end(headers: Headers, dropped: frozenset[bytes]) -> list[tuple[bytes, Sequence[bytes]]]:
    """The (name, values) pairs of ``headers`` that are neither hop-by-hop nor in ``dropped``."""
    stop = _union(HOP_BY_HOP, dropped)
    listed = headers.getRawHeaders(b"connection")
    if listed:
        stop = stop | connection_tokens(listed)
    return [
        (name, values) for name, values in headers.getAllRawHeaders() if name.lower() not in stop
    ]


@lru_cache(maxsize=64)
def _union(first: frozenset[bytes], second: frozenset[bytes]) -> frozenset[bytes]:
    """``first | second``, made once per pair (a few constant sets, used for every request)."""
    return first | second


def forwarded_request_headers(
    headers: Headers, client_ip: str | None, scheme: bytes, drop: frozenset[bytes] = frozenset()
) -> Headers:
    """
    Headers for the backend request: the client's end-to-end headers (minus ``drop``), plus
    ``X-Forwarded-For`` (appended to any the client sent) and ``X-Forwarded-Proto``.
    """
    out = Headers()
    for name, values in end_to_end(headers, _union(REQUEST_ONLY_DROPPED, drop)):
        out.setRawHeaders(name, values)
    if client_ip:
        client = client_ip.encode("ascii")
        previous = headers.getRawHeaders(b"x-forwarded-for")
        chain = b", ".join([*previous, client]) if previous else client
        out.setRawHeaders(b"x-forwarded-for", [chain])
    out.setRawHeaders(b"x-forwarded-proto", [scheme])
    return out
