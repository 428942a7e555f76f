"""The request forms of the serverless protocol: which auth a request carries, what goes on."""

from __future__ import annotations

import io
import json
import tracemalloc
from typing import Any
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from vast_vespa import strict_json
from vast_vespa.signing import canonical_message
from vast_vespa.strict_json import loads
from vast_vespa.worker import envelope
from vast_vespa.worker.envelope import AuthError, unwrap, with_payload

AUTH = {
    "cost": 256.0,
    "endpoint": "my-endpoint",
    "reqnum": 1234,
    "request_idx": 98765,
    "signature": "c2ln",
    "url": "https://203.0.113.7:41234",
}


def body(data: object) -> io.BytesIO:
    return io.BytesIO(data if isinstance(data, bytes) else json.dumps(data).encode())


class Recording(io.BytesIO):
    """A body that notes the size of every read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.reads.append(len(data))
        return data


def query(auth: dict) -> bytes:
    return "&".join(f"serverless_{k}={quote(str(v), safe='')}" for k, v in auth.items()).encode()


class EnvelopeTests(SynchronousTestCase):
    def test_envelope_forwards_only_the_payload(self) -> None:
        """POST with {"auth_data", "payload"}: the auth is taken, the payload goes on as JSON;
        extra keys such as session_id are ignored."""
        envelope = {"auth_data": AUTH, "payload": {"prompt": "hi"}, "session_id": None}
        got = unwrap(b"POST", b"/v1/x?a=1", None, body(envelope))
        self.assertEqual(got.auth, AUTH)
        assert got.body is not None
        self.assertEqual(json.loads(got.body), {"prompt": "hi"})
        self.assertEqual(got.target, b"/v1/x?a=1")
        self.assertEqual(got.form, "envelope")

    def test_int_and_float_costs_are_kept(self) -> None:
        """cost 100 stays an int and 256.0 a float: the five-field signature covers them."""
        for text, expected in ((b"100", b'"cost": 100,'), (b"256.0", b'"cost": 256.0,')):
            raw = b'{"auth_data": {"cost": %s, "endpoint": "e", "reqnum": 1, "request_idx": 2, '
            raw += b'"signature": "s", "url": "u"}, "payload": {}}'
            got = unwrap(b"PUT", b"/", None, body(raw % text))
            assert got.auth is not None
            self.assertIn(expected, canonical_message(got.auth, "five-field"))

    def test_malformed_envelopes_are_422_with_the_missing_fields(self) -> None:
        """Not JSON, a scalar, missing keys, missing or mistyped auth fields: 422 naming them."""
        cases = [
            (b"not json", "invalid JSON", None),
            (b"42", "malformed envelope", None),
            (b'"x"', "malformed envelope", None),
            (b"{}", "malformed envelope", ["auth_data", "payload"]),
            (json.dumps({"auth_data": {"cost": 1}, "payload": 1}).encode(), None, None),
        ]
        for raw, error, missing in cases:
            with self.assertRaises(AuthError) as caught:
                unwrap(b"POST", b"/", None, body(raw))
            self.assertEqual(caught.exception.code, 422)
            if error:
                self.assertEqual(caught.exception.error, error)
            if missing:
                self.assertEqual(caught.exception.extra["missing"], missing)
        with self.assertRaises(AuthError) as caught:
            unwrap(b"POST", b"/", None, body({"auth_data": {"cost": 1}, "payload": 1}))
        self.assertEqual(
            caught.exception.extra["missing"],
            ["endpoint", "reqnum", "request_idx", "url", "signature"],
        )
        for name, bad in (("cost", "1"), ("reqnum", 1.5), ("request_idx", True), ("url", 3)):
            envelope = {"auth_data": {**AUTH, name: bad}, "payload": {}}
            with self.assertRaises(AuthError) as caught:
                unwrap(b"PATCH", b"/", None, body(envelope))
            self.assertEqual(caught.exception.extra["invalid"], [name])

    def test_json_nested_too_deeply_is_invalid_json(self) -> None:
        """JSON nested more than MAX_DEPTH levels is refused as JSON the worker cannot read,
        on every Python (each one's parser gives up at another depth, or raised
        RecursionError: a 500): 422 in an envelope, 400 in the header, and unsecured the
        request passes untouched."""
        deep = b"[" * 100_000 + b"]" * 100_000
        for raw in (
            b'{"auth_data": ' + deep + b', "payload": 1}',
            b'{"auth_data": {}, "payload": ' + deep + b"}",
            b'{"payload": ' + deep + b', "auth_data": {}}',
        ):
            with self.assertRaises(AuthError) as caught:
                unwrap(b"POST", b"/", None, body(raw))
            self.assertEqual((caught.exception.code, caught.exception.error), (422, "invalid JSON"))
            self.assertIn("nested more than 512 levels deep", caught.exception.detail)
        with self.assertRaises(AuthError) as caught:
            unwrap(b"POST", b"/", b"[" * 513 + b"]" * 513, body(b""))
        self.assertEqual(caught.exception.code, 400)
        self.assertIn("nested more than 512 levels deep", caught.exception.detail)
        unsecured = unwrap(b"POST", b"/", None, body(b'{"auth_data": ' + deep + b"}"), True)
        self.assertEqual((unsecured.auth, unsecured.body), (None, None))  # passes as it is

    def test_a_payload_as_deep_as_the_limit_is_forwarded(self) -> None:
        """A payload nested MAX_DEPTH - 1 levels (the envelope is one more) is written out
        again for the backend, arrays, objects or both; one level more is a 422."""
        lead = b'{"auth_data": ' + json.dumps(AUTH).encode() + b', "payload": '
        shapes = (
            lambda n: b"[" * n + b"]" * n,
            lambda n: b'{"a":' * n + b"0" + b"}" * n,
            lambda n: b"[" * (n % 2) + b'{"[":[' * (n // 2) + b"]}" * (n // 2) + b"]" * (n % 2),
        )
        self.assertEqual(strict_json.MAX_DEPTH, 512)
        for shape in shapes:
            payload = shape(strict_json.MAX_DEPTH - 1)
            got = unwrap(b"POST", b"/", None, body(lead + payload + b"}"))
            assert got.body is not None
            self.assertEqual(loads(got.body), json.loads(payload))
            with self.assertRaises(AuthError) as caught:
                unwrap(b"POST", b"/", None, body(lead + shape(strict_json.MAX_DEPTH) + b"}"))
            self.assertEqual((caught.exception.code, caught.exception.error), (422, "invalid JSON"))

    def test_a_large_envelope_nested_too_deeply_is_refused_from_its_start(self) -> None:
        """Secured, a large envelope whose first bytes already nest too deeply is refused from
        them (the same 422), before any parse."""
        raw = b'{"auth_data": ' + b"[" * 600 + b" " * envelope.PEEK * 2 + b"]" * 600 + b"}"
        with self.assertRaises(AuthError) as caught:
            unwrap(b"POST", b"/", None, body(raw))
        self.assertEqual((caught.exception.code, caught.exception.error), (422, "invalid JSON"))
        self.assertIn("nested more than 512 levels deep", caught.exception.detail)

    def test_nesting_is_counted_outside_strings(self) -> None:
        """Brackets inside strings, escaped quotes and escaped backslashes included, nest
        nothing; a truncated document counts as deep as it got."""
        deeper = strict_json.nested_deeper
        self.assertFalse(deeper(b"[" * 3 + b"]" * 3, 3))
        self.assertTrue(deeper(b"[" * 4 + b"]" * 4, 3))
        self.assertTrue(deeper(b'[{"a": [[', 3))
        self.assertFalse(deeper(b'["[[[[", "{{{{"]', 1))
        self.assertFalse(deeper(b'["\\\\[[[["]', 1))  # an escaped backslash ends no string
        self.assertFalse(deeper(b'["\\"[[[[\\"", 1]', 1))  # escaped quotes stay in the string
        self.assertTrue(deeper(b'["\\\\", [[]]]', 2))  # nor does it escape the closing quote
        self.assertTrue(deeper(b'["]]]]", [[[]]]]', 3))  # closers in a string hide nothing
        self.assertFalse(deeper(b"", 0))

    def test_a_leading_auth_data_is_read_alone_until_verified(self) -> None:
        """Secured, a large envelope that starts with auth_data is read no further than its
        first bytes until the signature is checked: a forged one with a huge payload costs
        neither the payload's parse (JSON can take 25 times its size in memory) nor its read.
        A small one is read whole at once."""
        payload = b"[" + b"{}," * 2_000_000 + b"{}]"  # 6 MB; parsed, about 150 MB
        raw = b'{"auth_data": ' + json.dumps(AUTH).encode() + b', "payload": ' + payload + b"}"
        recording = Recording(raw)
        tracemalloc.start()
        try:
            got = unwrap(b"POST", b"/", None, recording)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual((got.auth, got.body), (AUTH, None))
        self.assertEqual(recording.reads, [envelope.PEEK])
        self.assertLess(peak, 4 * envelope.PEEK)
        self.assertEqual(with_payload(got).body, payload.replace(b" ", b""))
        small = unwrap(b"POST", b"/", None, body({"auth_data": AUTH, "payload": [1]}))
        self.assertEqual((small.body, small.envelope), (b"[1]", None))

    def test_an_envelope_in_another_order_is_read_whole_up_to_a_limit(self) -> None:
        """auth_data after the payload: read whole as before up to UNORDERED_LIMIT bytes,
        refused with a 422 saying why above it (never parsed)."""
        small = {"payload": {"prompt": "x" * 1000}, "auth_data": AUTH}
        got = unwrap(b"POST", b"/", None, body(small))
        assert got.body is not None
        self.assertEqual((got.auth, json.loads(got.body)), (AUTH, small["payload"]))
        large = {"payload": {"prompt": "x" * envelope.UNORDERED_LIMIT}, "auth_data": AUTH}
        with self.assertRaises(AuthError) as caught:
            unwrap(b"POST", b"/", None, body(large))
        self.assertEqual(
            (caught.exception.code, caught.exception.error), (422, "malformed envelope")
        )
        self.assertIn("must start with auth_data", caught.exception.detail)

    def test_what_follows_a_leading_auth_data_is_checked_once_read(self) -> None:
        """After the auth_data is verified, the rest must be a well-formed envelope, and a
        second auth_data must not differ from the first (the one that was verified)."""
        lead = b'{"auth_data": ' + json.dumps(AUTH).encode()
        lead += b', "pad": "' + b"x" * envelope.PEEK + b'"'  # large enough to be read in two
        cases = [
            (lead + b', "payload": ', "invalid JSON"),
            (lead + b"}", "malformed envelope"),
            (
                lead
                + b', "payload": 1, "auth_data": '
                + json.dumps({**AUTH, "cost": 1}).encode()
                + b"}",
                "malformed envelope",
            ),
        ]
        for raw, error in cases:
            first = unwrap(b"POST", b"/", None, body(raw))
            self.assertEqual(first.auth, AUTH)
            with self.assertRaises(AuthError) as caught:
                with_payload(first)
            self.assertEqual((caught.exception.code, caught.exception.error), (422, error))
        twice = lead + b', "payload": 1, "auth_data": ' + json.dumps(AUTH).encode() + b"}"
        self.assertEqual(with_payload(unwrap(b"POST", b"/", None, body(twice))).body, b"1")

    def test_a_character_cut_by_the_peek_does_not_hide_the_auth_data(self) -> None:
        """The first PEEK bytes may end inside a UTF-8 character of the payload."""
        lead = b'{"auth_data": ' + json.dumps(AUTH).encode() + b', "payload": "'
        filler = b"x" * (envelope.PEEK - len(lead) - 1)
        raw = lead + filler + "é".encode() * 10 + b'"}'  # the peek ends inside the first é
        got = with_payload(unwrap(b"POST", b"/", None, body(raw)))
        self.assertEqual(got.auth, AUTH)
        assert got.body is not None
        self.assertEqual(json.loads(got.body), (filler + "é".encode() * 10).decode())

    def test_header_form_keeps_the_body(self) -> None:
        """X-Serverless-Auth: the auth comes from the header and the body is not touched (any
        method); a bad header is 400."""
        content = io.BytesIO(b"\x89PNG\r\n\x00binary")
        got = unwrap(b"POST", b"/upload", json.dumps(AUTH).encode(), content)
        self.assertEqual((got.auth, got.body, got.form), (AUTH, None, "header"))
        got = unwrap(b"GET", b"/x?serverless_cost=1", json.dumps(AUTH).encode(), body(b""))
        self.assertEqual(got.target, b"/x?serverless_cost=1")
        with self.assertRaises(AuthError) as caught:
            unwrap(b"POST", b"/", b"{nope", content)
        self.assertEqual(caught.exception.code, 400)

    def test_query_auth_is_removed_and_the_rest_kept_in_order(self) -> None:
        """GET/DELETE/HEAD: serverless_* parameters become the auth and are removed; others,
        repeated ones too, pass byte for byte and in order."""
        uri = b"/v1/models?b=2&" + query(AUTH) + b"&a=1&b=3&c=%2F+x"
        for method in (b"GET", b"DELETE", b"HEAD"):
            got = unwrap(method, uri, None, body(b""))
            self.assertEqual(got.auth, AUTH)
            self.assertEqual(got.target, b"/v1/models?b=2&a=1&b=3&c=%2F+x")
        got = unwrap(b"GET", b"/x?" + query(AUTH), None, body(b""))
        self.assertEqual(got.target, b"/x")

    def test_query_cost_forms(self) -> None:
        """serverless_cost: int when written as one, float otherwise (1e-05 too); a bad number
        or a missing field is 400."""
        for text, value in (("256", 256), ("256.0", 256.0), ("1e-05", 1e-05)):
            got = unwrap(b"GET", b"/?" + query({**AUTH, "cost": text}), None, body(b""))
            assert got.auth is not None
            self.assertEqual((got.auth["cost"], type(got.auth["cost"])), (value, type(value)))
        for bad in ("abc", "nan", "inf"):
            with self.assertRaises(AuthError) as caught:
                unwrap(b"GET", b"/?" + query({**AUTH, "cost": bad}), None, body(b""))
            self.assertEqual(caught.exception.code, 400)
        partial = {k: v for k, v in AUTH.items() if k != "url"}
        with self.assertRaises(AuthError) as caught:
            unwrap(b"GET", b"/?" + query(partial), None, body(b""))
        self.assertEqual(
            (caught.exception.code, caught.exception.extra), (400, {"missing": ["serverless_url"]})
        )

    def test_signature_plus_survives_query_encoding(self) -> None:
        """A base64 '+' sent as %2B stays a '+'."""
        got = unwrap(b"GET", b"/?" + query({**AUTH, "signature": "a+b/c=="}), None, body(b""))
        assert got.auth is not None
        self.assertEqual(got.auth["signature"], "a+b/c==")

    def test_no_auth(self) -> None:
        """Without any auth form: secured POST is 422; GET without serverless_* carries none."""
        self.assertIsNone(unwrap(b"GET", b"/x?a=1", None, body(b"")).auth)
        self.assertIsNone(unwrap(b"OPTIONS", b"/x", None, body(b"")).auth)
        with self.assertRaises(AuthError):
            unwrap(b"POST", b"/", None, body({"prompt": "x"}))

    def test_unsecured_unwraps_envelopes_and_passes_the_rest(self) -> None:
        """UNSECURED: an envelope is unwrapped; other bodies and malformed auth pass through."""
        got = unwrap(b"POST", b"/", None, body({"auth_data": AUTH, "payload": [1]}), True)
        self.assertEqual((got.auth, got.body), (AUTH, b"[1]"))
        for raw in (b'{"prompt": "x"}', b"\x00\x01binary", b"[1, 2]"):
            got = unwrap(b"POST", b"/", None, body(raw), True)
            self.assertEqual((got.auth, got.body, got.target), (None, None, b"/"))
        got = unwrap(b"GET", b"/x?serverless_cost=abc", None, body(b""), True)
        self.assertEqual((got.auth, got.target), (None, b"/x?serverless_cost=abc"))

    def test_unsecured_large_json_is_never_parsed_whole(self) -> None:
        """UNSECURED: a 20 MB JSON body that mentions "auth_data" (not leading) is passed
        through untouched: only its first bytes are read, nothing is parsed as JSON. One that
        leads with auth_data is an envelope, its payload read once it is needed."""
        self.patch(envelope, "loads", _never)
        for raw in (
            b'{"prompt": "' + b"x" * (20 << 20) + b'", "note": "auth_data"}',
            b'{"prompt": "' + b"x" * (20 << 20) + b'", "auth_data": {}}',
        ):
            recording = Recording(raw)
            got = unwrap(b"POST", b"/", None, recording, True)
            self.assertEqual((got.auth, got.body, got.envelope), (None, None, None))
            self.assertLessEqual(sum(recording.reads), envelope.PEEK + 1024)
        raw = json.dumps({"auth_data": AUTH, "payload": "y" * (2 << 20)}).encode()
        got = unwrap(b"POST", b"/", None, Recording(raw), True)
        self.assertEqual((got.auth, got.body, got.form), (AUTH, None, "envelope"))

    def test_unsecured_unordered_envelope_up_to_the_limit_is_unwrapped(self) -> None:
        raw = json.dumps({"payload": "y" * (envelope.PEEK * 2), "auth_data": AUTH}).encode()
        got = unwrap(b"POST", b"/", None, io.BytesIO(raw), True)
        self.assertEqual(got.auth, AUTH)


def _never(text: bytes) -> None:
    raise AssertionError("a large body was parsed whole")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def depth(value: object) -> int:
    """How deep arrays and objects nest in ``value`` (a list or dict alone: 1)."""
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


auth_values = st.fixed_dictionaries(
    {
        "cost": st.integers(0, 10**9) | st.floats(0, 1e9, allow_nan=False),
        "endpoint": st.text(),
        "reqnum": st.integers(-(2**63), 2**63),
        "request_idx": st.integers(-(2**63), 2**63),
        "signature": st.text(),
        "url": st.text(),
    }
)


class EnvelopePropertyTests(SynchronousTestCase):
    @given(auth_values, json_values)
    def test_envelope_round_trip(self, auth: dict[str, Any], payload: object) -> None:
        """Any valid envelope yields exactly its auth_data (types kept) and its payload."""
        raw = json.dumps({"auth_data": auth, "payload": payload}).encode()
        got = with_payload(unwrap(b"POST", b"/p", None, body(raw)))
        self.assertEqual(got.auth, auth)
        reordered = json.dumps({"payload": payload, "auth_data": auth}).encode()
        self.assertEqual(with_payload(unwrap(b"POST", b"/p", None, body(reordered))), got)
        assert got.auth is not None and got.body is not None
        self.assertEqual([type(v) for v in got.auth.values()], [type(v) for v in auth.values()])
        self.assertEqual(loads(got.body), payload)
        self.assertEqual(
            canonical_message(got.auth, "five-field"), canonical_message(auth, "five-field")
        )

    @given(json_values, st.integers(0, 6))
    def test_nesting_depth_is_the_values(self, value: object, limit: int) -> None:
        """nested_deeper tells exactly whether a JSON document nests deeper than the limit."""
        text = json.dumps(value, ensure_ascii=False).encode()
        self.assertEqual(strict_json.nested_deeper(text, limit), depth(value) > limit)

    @given(st.binary(max_size=64))
    def test_any_body_is_auth_or_a_clean_error(self, raw: bytes) -> None:
        """No body makes the parser fail other than with a 422 AuthError."""
        try:
            with_payload(unwrap(b"POST", b"/", None, body(raw)))
        except AuthError as e:
            self.assertEqual(e.code, 422)

    @given(
        auth_values,
        st.lists(st.tuples(st.sampled_from("abc"), st.text(max_size=5)), max_size=6),
    )
    def test_query_round_trip(self, auth: dict[str, Any], params: list[tuple[str, str]]) -> None:
        """Any signed query: the auth comes back with its values, and the other parameters
        come back byte for byte and in order."""
        others = [f"{quote(k)}={quote(v, safe='')}".encode() for k, v in params]
        uri = b"/q?" + b"&".join([*others, query(auth)])
        got = unwrap(b"GET", uri, None, body(b""))
        assert got.auth is not None
        self.assertEqual(got.auth["reqnum"], auth["reqnum"])
        self.assertEqual(got.auth["url"], auth["url"])
        self.assertEqual(got.auth["cost"], auth["cost"])
        self.assertEqual(got.target, b"/q" + (b"?" + b"&".join(others) if others else b""))
