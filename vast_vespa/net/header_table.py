# -*- test-case-name: tests.test_header_table -*-
"""
The fast path's :class:`~vast_vespa.headers.HeaderOps`: headers are read and filled through
the dict a twisted.web Headers keeps them in, canonical name to list of values.

twisted.web's ``setRawHeaders`` and ``addRawHeader`` canonicalise each name and split each
value at line breaks, a few Python calls per header; a relayed request's headers went through
them about twenty times (parsed, forwarded, answered, copied back). Names the request path
uses are canonical already and its values clean (see HeaderOps), so here the same dict is
filled directly. The result is the same Headers: ``tests.test_header_table`` compares both
kinds of HeaderOps on generated headers.

Twisted private names it relies on (checked at start-up by :mod:`vast_vespa.net.guard`):
``Headers._rawHeaders`` (the dict) and ``twisted.web.http_headers._nameEncoder`` (its
canonical names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.web.http_headers import Headers, _nameEncoder

from vast_vespa.headers import HeaderOps

# Parsed names to canonical ones. twisted.web keeps a cache of its own behind a method call;
# this one is a dict lookup inline, bounded as twisted.web bounds its own (an attacker may send
# endless names: past the bound they are canonicalised every time).
_CANONICAL: dict[bytes, bytes] = {}
_MAX_CANONICAL = 1000


def _canonical(name: bytes) -> bytes:
    canonical = _nameEncoder.encode(name)
    if len(_CANONICAL) < _MAX_CANONICAL:
        _CANONICAL[name] = canonical
    return canonical


class RawHeaderOps(HeaderOps):
    """HeaderOps on the dict behind each Headers (see the module docstring)."""

    def from_fields(self, fields: Sequence[tuple[bytes, bytes]]) -> Headers:
        known = _CANONICAL
        table: dict[bytes, list[bytes]] = {}
        for name, value in fields:  # (not a comprehension: see headers.end_to_end)
            canonical = known.get(name) or _canonical(name)
            values = table.get(canonical)
            if values is None:
                table[canonical] = [value]
            else:  # a name given more than once: all its values, in order
                values.append(value)
        return self.build(table)

    def build(self, table: dict[bytes, list[bytes]]) -> Headers:
        headers = Headers()  # (whatever else a later Twisted's __init__ sets up)
        headers._rawHeaders = table
        return headers

    def table(self, headers: Headers) -> Mapping[bytes, Sequence[bytes]]:
        return headers._rawHeaders

    def put(self, headers: Headers, name: bytes, values: list[bytes]) -> None:
        headers._rawHeaders[name] = values

    def update(self, headers: Headers, table: dict[bytes, list[bytes]]) -> None:
        headers._rawHeaders.update(table)


RAW_HEADER_OPS = RawHeaderOps()
