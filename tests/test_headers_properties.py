"""Property tests for header filtering: whatever headers a client sends, no hop-by-hop header,
nothing the Connection header names, and no Host/Content-Length ever reaches the backend, and
every end-to-end header reaches it unchanged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from vast_vespa.headers import (
    HOP_BY_HOP,
    PUBLIC_HEADER_OPS,
    REQUEST_ONLY_DROPPED,
    connection_tokens,
    end_to_end,
    forwarded_request_headers,
)

TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
    min_size=1,
    max_size=20,
)
SPECIAL = st.sampled_from(
    sorted(
        n.decode()
        for n in HOP_BY_HOP | REQUEST_ONLY_DROPPED | {b"x-forwarded-for", b"x-forwarded-proto"}
    )
)
NAME = st.one_of(TOKEN, SPECIAL, SPECIAL.map(str.upper)).map(str.encode)
VALUE = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
HEADERS = st.lists(st.tuples(NAME, st.lists(VALUE, min_size=1, max_size=3)), max_size=12)
CONNECTION = st.lists(st.one_of(TOKEN, SPECIAL).map(str.encode), max_size=4).map(
    lambda names: b", ".join(names)
)


def build(pairs: list[tuple[bytes, list[bytes]]], connection: bytes) -> Headers:
    headers = Headers()
    for name, values in pairs:
        for value in values:
            headers.addRawHeader(name, value)
    if connection:
        headers.addRawHeader(b"Connection", connection)
    return headers


class HeaderProperties(SynchronousTestCase):
    @settings(max_examples=60, deadline=None)
    @given(HEADERS, CONNECTION)
    def test_nothing_hop_by_hop_crosses(
        self, pairs: list[tuple[bytes, list[bytes]]], connection: bytes
    ) -> None:
        """No hop-by-hop header, no header named by Connection, no Host or Content-Length is
        forwarded, whatever the client sent."""
        headers = build(pairs, connection)
        out = forwarded_request_headers(headers, "10.0.0.9", b"http")
        named = connection_tokens(headers.getRawHeaders(b"connection", ()))
        for name, _ in out.getAllRawHeaders():
            lower = name.lower()
            self.assertNotIn(lower, HOP_BY_HOP)
            self.assertNotIn(lower, REQUEST_ONLY_DROPPED)
            if lower not in (b"x-forwarded-for", b"x-forwarded-proto"):
                self.assertNotIn(lower, named)

    @settings(max_examples=60, deadline=None)
    @given(HEADERS, CONNECTION)
    def test_end_to_end_headers_pass_unchanged(
        self, pairs: list[tuple[bytes, list[bytes]]], connection: bytes
    ) -> None:
        """Every other header reaches the backend with all its values, in order."""
        headers = build(pairs, connection)
        named = connection_tokens(headers.getRawHeaders(b"connection", ()))
        kept = dict(
            (name.lower(), list(values))
            for name, values in end_to_end(PUBLIC_HEADER_OPS.table(headers), REQUEST_ONLY_DROPPED)
        )
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in REQUEST_ONLY_DROPPED or lower in named:
                self.assertNotIn(lower, kept)
            else:
                self.assertEqual(kept[lower], list(values))

    @settings(max_examples=60, deadline=None)
    @given(HEADERS, st.ip_addresses().map(str))
    def test_forwarded_for_ends_with_the_peer(
        self, pairs: list[tuple[bytes, list[bytes]]], ip: str
    ) -> None:
        """X-Forwarded-For always ends with the real peer address (a client cannot replace it),
        and X-Forwarded-Proto is the worker's own scheme."""
        out = forwarded_request_headers(build(pairs, b""), ip, b"https")
        chain = out.getRawHeaders(b"x-forwarded-for")
        assert chain is not None
        self.assertEqual(len(chain), 1)
        self.assertTrue(chain[0].endswith(ip.encode()))
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
