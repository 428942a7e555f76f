# -*- test-case-name: tests.test_headers -*-
"""
Which headers cross the proxy (RFC 9110 section 7.6.1): everything end-to-end passes,
hop-by-hop headers and the ones that name the connection stop here. Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.web.http import Request
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


class HeaderOps:
    """
    How the request path reads and fills twisted.web Headers, here through their public
    methods. Every name it is given is canonical (``X-Request-Id``, as ``getAllRawHeaders``
    yields names) and every value clean: parsed by llhttp, which refuses line breaks in a
    value, or taken from another Headers. That is what lets the fast path's
    :class:`vast_vespa.net.header_table.RawHeaderOps` fill the dict behind a Headers without
    twisted.web's checks of each name and value, which the relay's per-request header work
    spent most of its time in.
    """

    def from_fields(self, fields: Sequence[tuple[bytes, bytes]]) -> Headers:
        """Headers holding parsed ``(name, value)`` fields in their order (names as sent)."""
        headers = Headers()
        for name, value in fields:
            headers.addRawHeader(name, value)
        return headers

    def build(self, table: dict[bytes, list[bytes]]) -> Headers:
        """Headers holding ``table`` (canonical names); the table is theirs afterwards."""
        return Headers(table)

    def table(self, headers: Headers) -> Mapping[bytes, Sequence[bytes]]:
        """``headers`` by canonical name, to read (changes go through :meth:`put`)."""
        return dict(headers.getAllRawHeaders())

    def put(self, headers: Headers, name: bytes, values: list[bytes]) -> None:
        """Set ``name`` (canonical) to ``values``, replacing any it had."""
        headers.setRawHeaders(name, values)

    def update(self, headers: Headers, table: dict[bytes, list[bytes]]) -> None:
        """:meth:`put` each name of ``table`` (canonical) and its values."""
        for name, values in table.items():
            headers.setRawHeaders(name, values)


PUBLIC_HEADER_OPS = HeaderOps()


def header_ops(request: Request) -> HeaderOps:
    """The HeaderOps for ``request``'s headers: its class's (the fast path's Request has its
    own), else the public one."""
    return getattr(request, "header_ops", PUBLIC_HEADER_OPS)


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """Header names listed in Connection header values (they are hop-by-hop too)."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def end_to_end(
    table: Mapping[bytes, Sequence[bytes]], dropped: frozenset[bytes]
) -> list[tuple[bytes, Sequence[bytes]]]:
    """The (name, values) pairs of a header ``table`` (:meth:`HeaderOps.table`) that are
    neither hop-by-hop nor in ``dropped``."""
    listed = table.get(b"Connection")
    stop = _stopped_names(dropped, tuple(listed) if listed else ())
    kept = []
    # A loop, not a comprehension: on CPython 3.11 a comprehension is a function, made and
    # called each time, and this runs twice for every request.
    for name, values in table.items():
        if name not in stop:  # (both as tables hold names: no lower() per header)
            kept.append((name, values))
    return kept


# An RFC 9110 token: what a method and a header name are made of. What a Connection header
# lists that is not one names no header.
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _as_in_tables(name: bytes) -> bytes:
    """A header name as header tables hold it (``Content-Length``, ``TE``): twisted.web's
    canonical form, which depends on the name's letters alone, not on their case."""
    return next(iter(Headers({name: [b""]}).getAllRawHeaders()))[0]


@lru_cache(maxsize=256)
def _stopped_names(dropped: frozenset[bytes], connection: tuple[bytes, ...]) -> frozenset[bytes]:
    """The names that stop here, as header tables hold them: hop-by-hop ones, ``dropped``
    (lower case), and those the ``connection`` header values name. Made once per distinct
    pair: a few in practice (a backend's ``Connection: keep-alive`` on every answer); a
    client's made-up values only replace the oldest of the 256 kept."""
    named = HOP_BY_HOP | dropped | connection_tokens(connection)
    return frozenset(_as_in_tables(name) for name in named if TOKEN.fullmatch(name))


@lru_cache(maxsize=64)
def _union(first: frozenset[bytes], second: frozenset[bytes]) -> frozenset[bytes]:
    """``first | second``, made once per pair (a few constant sets, used for every request)."""
    return first | second


def forwarded_request_headers(
    headers: Headers,
    client_ip: str | None,
    scheme: bytes,
    drop: frozenset[bytes] = frozenset(),
    forwarded_host: bool = False,
    ops: HeaderOps = PUBLIC_HEADER_OPS,
) -> Headers:
    """
    Headers for the backend request: the client's end-to-end headers (minus ``drop``), plus
    ``X-Forwarded-For`` (appended to any the client sent) and ``X-Forwarded-Proto``; with
    ``forwarded_host``, ``X-Forwarded-Host`` and ``X-Forwarded-Port`` (the Host the client
    asked for, replacing any it sent: this proxy is the edge), so that a backend that builds
    absolute URLs can build ones the client reaches. ``ops``: how to read and build them
    (:func:`header_ops` of the request).
    """
    given = ops.table(headers)
    dropped = _union(REQUEST_ONLY_DROPPED, drop)
    table = {}
    for name, values in end_to_end(given, dropped):  # (see end_to_end: not a comprehension)
        table[name] = list(values)
    if client_ip:
        client = client_ip.encode("ascii")
        previous = given.get(b"X-Forwarded-For")
        table[b"X-Forwarded-For"] = [b", ".join([*previous, client]) if previous else client]
    table[b"X-Forwarded-Proto"] = [scheme]
    if forwarded_host:
        host = given.get(b"Host")
        if host:
            table[b"X-Forwarded-Host"] = [host[0]]
            table[b"X-Forwarded-Port"] = [host_port(host[0], scheme)]
        else:
            table.pop(b"X-Forwarded-Host", None)
            table.pop(b"X-Forwarded-Port", None)
    return ops.build(table)


DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}


def host_port(host: bytes, scheme: bytes) -> bytes:
    """The port a Host header names (``[::1]:3000`` too), else the scheme's default."""
    name, colon, port = host.rpartition(b":")
    if colon and port.isdigit() and (not name.startswith(b"[") or name.endswith(b"]")):
        return port
    return DEFAULT_PORTS.get(scheme, b"80")


API_KEY_PARAMETER = b"api_key"


def without_api_key(target: bytes) -> tuple[bytes, frozenset[bytes]]:
    """``target`` without its ``api_key`` query parameters (the official client appends the
    endpoint key to every worker URL), and their decoded values."""
    path, question, query = target.partition(b"?")
    if not question or API_KEY_PARAMETER not in query:
        return target, frozenset()
    kept: list[bytes] = []
    keys: set[bytes] = set()
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == API_KEY_PARAMETER:
            keys.add(unquote_to_bytes(value.replace(b"+", b" ")))
        else:
            kept.append(part)
    if not keys:
        return target, frozenset()
    return path + (b"?" + b"&".join(kept) if kept else b""), frozenset(keys)


def carries_key(headers: Headers, keys: frozenset[bytes]) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <one of keys>``."""
    for value in headers.getRawHeaders(b"authorization") or ():
        scheme, _, credentials = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip() in keys:
            return True
    return False


class LocationRewriter:
    """
    ``Location`` and ``Content-Location`` values that point at the backend (an absolute URL
    under BACKEND_URL: unreachable for the client) rewritten to the same path under the URL the
    client used, as nginx's default ``proxy_redirect`` does. Scheme and host compare without
    case, the default port written or not.
    """

    NAMES = frozenset({b"Location", b"Content-Location"})  # canonical, as in header tables

    def __init__(self, backend_url: str, public_url: str | None = None) -> None:
        """``public_url``: where clients reach the proxy; without it, the scheme and Host
        each client used."""
        self._public = public_url.encode("ascii") if public_url else None
        parts = urlsplit(backend_url)
        scheme = parts.scheme.lower().encode("ascii")
        host = (parts.hostname or "").lower().encode("idna")
        if b":" in host:
            host = b"[" + host + b"]"
        port = parts.port
        default = int(DEFAULT_PORTS.get(scheme, b"80"))
        authorities = {host + b":%d" % (port or default)}
        if port in (None, default):
            authorities.add(host)
        self._origins = tuple(scheme + b"://" + authority for authority in authorities)
        self._path = parts.path.rstrip("/").encode("ascii")

    def __call__(self, request: Request, value: bytes) -> bytes:
        """``value``, a header of the answer to ``request``, rewritten."""
        public = self._public
        if public is None:
            host = request.getHeader(b"host")
            if not host:
                return value
            public = (b"https://" if request.isSecure() else b"http://") + host
        return self.rewrite(value, public)

    def rewrite(self, value: bytes, public: bytes) -> bytes:
        """``value`` with the backend's origin and base path replaced by ``public``."""
        lowered = value[:300].lower()
        for origin in self._origins:
            if not lowered.startswith(origin):
                continue
            rest = value[len(origin) :]
            if rest[:1] not in (b"", b"/", b"?", b"#") or not rest.startswith(self._path):
                continue
            rest = rest[len(self._path) :]
            if rest[:1] not in (b"", b"/", b"?", b"#"):
                continue
            return public.rstrip(b"/") + (rest if rest[:1] == b"/" else b"/" + rest)
        return value
