"""The fast path's HeaderOps (the dict behind Headers, filled directly) give the same Headers as
the public ones, whatever the headers; and the premise that lets them skip twisted.web's
checks (llhttp lets no line break into a value) holds for both of Vespa's parsers."""

from __future__ import annotations

from typing import cast

from httptools import HttpParserError, HttpRequestParser, HttpResponseParser
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from vast_vespa.headers import (
    HOP_BY_HOP,
    PUBLIC_HEADER_OPS,
    REQUEST_ONLY_DROPPED,
    end_to_end,
    forwarded_request_headers,
    header_ops,
)
from vast_vespa.net import header_table
from vast_vespa.net.header_table import RAW_HEADER_OPS
from vast_vespa.net.request import LeanRequest
from vast_vespa.site import VespaRequest

SPECIAL = sorted(
    n.decode()
    for n in HOP_BY_HOP | REQUEST_ONLY_DROPPED | {b"host", b"x-forwarded-for", b"x-request-id"}
)
TOKEN = st.text(alphabet="abcdefgXYZ0123456789-", min_size=1, max_size=12)
# The same names in several spellings, so that fields of one name arrive in different cases.
NAME = (
    st.one_of(TOKEN, st.sampled_from(SPECIAL))
    .flatmap(lambda name: st.sampled_from([name, name.upper(), name.title()]))
    .map(str.encode)
)
VALUE = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
FIELDS = st.lists(st.tuples(NAME, VALUE), max_size=14)


def canonical_table(fields: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """A table as HeaderOps.build takes it, made through the public API."""
    made = PUBLIC_HEADER_OPS.from_fields(fields)  # Headers.addRawHeader, field by field
    return {name: list(values) for name, values in made.getAllRawHeaders()}


class SameHeadersTests(SynchronousTestCase):
    @settings(max_examples=80, deadline=None)
    @given(FIELDS)
    def test_from_fields(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Parsed fields, repeated names in any case included, make the same Headers."""
        raw, public = RAW_HEADER_OPS.from_fields(fields), PUBLIC_HEADER_OPS.from_fields(fields)
        self.assertEqual(raw, public)
        self.assertEqual(list(raw.getAllRawHeaders()), list(public.getAllRawHeaders()))

    @settings(max_examples=80, deadline=None)
    @given(FIELDS, st.sampled_from([None, "10.0.0.9", "::1"]), st.booleans())
    def test_forwarded_request_headers(
        self, fields: list[tuple[bytes, bytes]], client: str | None, forwarded_host: bool
    ) -> None:
        """The backend request's headers are the same with either."""
        drop = frozenset({b"authorization"})
        made = [
            forwarded_request_headers(
                ops.from_fields(fields), client, b"https", drop, forwarded_host, ops=ops
            )
            for ops in (RAW_HEADER_OPS, PUBLIC_HEADER_OPS)
        ]
        self.assertEqual(made[0], made[1])

    @settings(max_examples=40, deadline=None)
    @given(FIELDS)
    def test_build_table_and_put(self, fields: list[tuple[bytes, bytes]]) -> None:
        """A table builds the same Headers, reads back the same, and a put or an update
        replaces the same values."""
        for_raw, for_public = canonical_table(fields), canonical_table(fields)
        raw, public = RAW_HEADER_OPS.build(for_raw), PUBLIC_HEADER_OPS.build(for_public)
        self.assertEqual(raw, public)
        self.assertEqual(dict(RAW_HEADER_OPS.table(raw)), dict(PUBLIC_HEADER_OPS.table(public)))
        for ops, headers in ((RAW_HEADER_OPS, raw), (PUBLIC_HEADER_OPS, public)):
            ops.put(headers, b"X-Request-Id", [b"id"])
            ops.put(headers, b"Content-Length", [b"12"])
            ops.update(headers, {b"Content-Type": [b"text/plain"], b"X-New": [b"1", b"2"]})
        self.assertEqual(raw, public)
        self.assertEqual(raw.getRawHeaders(b"x-new"), [b"1", b"2"])
        self.assertEqual(raw.getRawHeaders(b"x-request-id"), [b"id"])
        kept = end_to_end(RAW_HEADER_OPS.table(raw), REQUEST_ONLY_DROPPED)
        self.assertEqual(kept, end_to_end(PUBLIC_HEADER_OPS.table(public), REQUEST_ONLY_DROPPED))

    def test_table_is_a_copy_only_in_public(self) -> None:
        """The public table is a snapshot (changes go through put); the raw one is the
        Headers' own dict, so a put shows in it."""
        raw, public = RAW_HEADER_OPS.build({}), PUBLIC_HEADER_OPS.build({})
        raw_table, public_table = RAW_HEADER_OPS.table(raw), PUBLIC_HEADER_OPS.table(public)
        RAW_HEADER_OPS.put(raw, b"X-A", [b"1"])
        PUBLIC_HEADER_OPS.put(public, b"X-A", [b"1"])
        self.assertEqual(dict(raw_table), {b"X-A": [b"1"]})
        self.assertEqual(dict(public_table), {})

    def test_each_request_class_has_its_own(self) -> None:
        """The fast path's Request uses the raw ones; anything else the public ones."""
        self.assertIs(LeanRequest.header_ops, RAW_HEADER_OPS)
        self.assertIs(VespaRequest.header_ops, PUBLIC_HEADER_OPS)
        other = cast(Request, object())  # stands in for a request of another class
        self.assertIs(header_ops(other), PUBLIC_HEADER_OPS)

    def test_canonical_names_are_remembered_up_to_a_bound(self) -> None:
        """Endless distinct names (an attacker's) do not grow the cache past its bound, and
        are still canonicalised."""
        self.patch(header_table, "_CANONICAL", {})
        self.patch(header_table, "_MAX_CANONICAL", 3)
        fields = [(b"x-name-%d" % i, b"v") for i in range(10)]
        headers = RAW_HEADER_OPS.from_fields(fields)
        self.assertEqual(len(header_table._CANONICAL), 3)
        self.assertEqual(headers.getRawHeaders(b"X-Name-9"), [b"v"])
        self.assertEqual(headers, PUBLIC_HEADER_OPS.from_fields(fields))


class _Heads:
    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


class CleanValuesTests(SynchronousTestCase):
    """What RawHeaderOps.from_fields leaves out, twisted.web's split of a value at line
    breaks, can never apply: llhttp refuses every line break in a value, in requests (the
    worker's and client proxy's channel) and responses (their backend client)."""

    BREAKS = (b"a\r\n b", b"a\rb", b"a\nb", b"a\r\n\tb")

    def test_requests(self) -> None:
        for value in self.BREAKS:
            heads = _Heads()
            head = b"POST / HTTP/1.1\r\nHost: h\r\nX-A: " + value + b"\r\nContent-Length: 0\r\n\r\n"
            self.assertRaises(HttpParserError, HttpRequestParser(heads).feed_data, head)
            self.assertNotIn(b"X-A", [name for name, _ in heads.fields])

    def test_responses(self) -> None:
        for value in self.BREAKS:
            heads = _Heads()
            head = b"HTTP/1.1 200 OK\r\nX-A: " + value + b"\r\nContent-Length: 0\r\n\r\n"
            self.assertRaises(HttpParserError, HttpResponseParser(heads).feed_data, head)
            self.assertEqual(heads.fields, [])
