"""Signatures: every vector verifies, every near miss does not, sign/verify round-trip."""

from __future__ import annotations

import json
import os
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import VECTORS
from vast_vespa import signing


def _read(name: str) -> bytes:
    with open(os.path.join(VECTORS, name), "rb") as f:
        return f.read()


VECTOR_DATA = json.loads(_read("vectors.json"))
PUBLIC = signing.load_public_key(_read("test_public_key.pem"))
PRIVATE = signing.load_private_key(_read("test_private_key.pem"))
SHAPE = {"url_only": "url"}


class VectorTests(SynchronousTestCase):
    def test_canonical_messages_match_vectors(self) -> None:
        """The canonical message of each vector is byte-identical to the signed bytes."""
        for vector in VECTOR_DATA["vectors"]:
            shape = SHAPE.get(vector["name"], "five-field")
            auth = vector["auth_data_as_sent_by_client"]
            self.assertEqual(
                signing.canonical_message(auth, shape),
                _read(vector["name"] + ".msg"),
                vector["name"],
            )

    @given(
        st.fixed_dictionaries(
            {
                name: st.one_of(
                    st.text(),
                    st.integers(),
                    st.floats(),
                    st.booleans(),
                    st.none(),
                    st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                )
                for name in signing.FIVE_FIELDS
            }
        )
    )
    def test_canonical_message_is_json_dumps(self, auth: dict[str, Any]) -> None:
        """For any values (unicode, big ints, floats, non-scalars), the message is exactly
        json.dumps(message, indent=4, sort_keys=True), the bytes the autoscaler signs."""
        for shape in ("url", "five-field"):
            expected = json.dumps(signing.message_object(auth, shape), indent=4, sort_keys=True)
            self.assertEqual(signing.canonical_message(auth, shape), expected.encode())

    def test_every_vector_verifies(self) -> None:
        """Each vector verifies with both PEM forms of the key, in its own shape."""
        pkcs1 = signing.load_public_key(_read("test_public_key_pkcs1.pem"))
        for vector in VECTOR_DATA["vectors"]:
            auth = vector["auth_data_as_sent_by_client"]
            expected = SHAPE.get(vector["name"], "five-field")
            for key in (PUBLIC, pkcs1):
                self.assertEqual(signing.verify(key, auth, ("url", "five-field")), expected)

    def test_shapes_are_configurable(self) -> None:
        """A signature in a shape that is not accepted does not verify."""
        for vector in VECTOR_DATA["vectors"]:
            auth = vector["auth_data_as_sent_by_client"]
            other = "five-field" if vector["name"] == "url_only" else "url"
            self.assertIsNone(signing.verify(PUBLIC, auth, (other,)))

    def test_near_misses_fail(self) -> None:
        """The near misses of vectors/README: int vs float cost, string cost, other fields."""
        legacy = next(v for v in VECTOR_DATA["vectors"] if v["name"] == "legacy_five_field")
        auth = dict(legacy["auth_data_as_sent_by_client"])
        for change in (
            {"cost": 256},
            {"cost": "256.0"},
            {"reqnum": 1235},
            {"endpoint": "x"},
            {"url": "https://203.0.113.7:41235"},
            {"request_idx": 1},
        ):
            self.assertIsNone(
                signing.verify(PUBLIC, {**auth, **change}, ("five-field", "url")), change
            )
        # Other serialisations of the same fields do not verify either.
        signature = auth["signature"]
        fields = {k: auth[k] for k in signing.FIVE_FIELDS}
        for text in (
            json.dumps(fields, indent=4),  # unsorted insertion order is sorted here; compact:
            json.dumps(fields, sort_keys=True, separators=(",", ":")),
            json.dumps(fields, sort_keys=True, indent=2),
            json.dumps({**fields, "__request_id": auth["__request_id"]}, sort_keys=True, indent=4),
        ):
            if text.encode() == signing.canonical_message(auth, "five-field"):
                continue
            import base64

            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            with self.assertRaises(InvalidSignature):
                PUBLIC.verify(
                    base64.b64decode(signature), text.encode(), padding.PKCS1v15(), hashes.SHA256()
                )

    def test_garbage_signatures(self) -> None:
        """Missing, empty, non-base64 or wrong-length signatures do not verify (no exception)."""
        auth = dict(VECTOR_DATA["vectors"][0]["auth_data_as_sent_by_client"])
        for signature in (None, "", "not base64!!", "QUJD", 42):
            self.assertIsNone(
                signing.verify(PUBLIC, {**auth, "signature": signature}, ("url", "five-field"))
            )
        del auth["url"]
        self.assertIsNone(signing.verify(PUBLIC, auth, ("url", "five-field")))


auth_values = st.fixed_dictionaries(
    {
        "cost": st.one_of(
            st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False)
        ),
        "endpoint": st.text(max_size=30),
        "reqnum": st.integers(0, 2**40),
        "request_idx": st.integers(0, 2**40),
        "url": st.text(max_size=40),
    }
)


class RoundTripTests(SynchronousTestCase):
    @given(auth_values, st.sampled_from(["url", "five-field"]))
    def test_sign_then_verify(self, auth: dict[str, Any], shape: str) -> None:
        """Whatever the field values, a signature made in a shape verifies in that shape only
        when the signed fields are unchanged."""
        signed = {**auth, "signature": signing.sign(PRIVATE, auth, shape)}
        self.assertEqual(signing.verify(PUBLIC, signed, (shape,)), shape)
        self.assertIsNone(signing.verify(PUBLIC, {**signed, "url": signed["url"] + "x"}, (shape,)))


class CountingKey:
    """A public key that counts the RSA checks it is asked to do."""

    def __init__(self, key: rsa.RSAPublicKey) -> None:
        self.key = key
        self.checks = 0

    @property
    def public(self) -> rsa.RSAPublicKey:
        """Itself, standing in for the key (verify is all that signing calls)."""
        return cast(rsa.RSAPublicKey, self)

    def verify(self, *args: Any) -> None:
        self.checks += 1
        self.key.verify(*args)


URL_AUTH = {"cost": 1, "endpoint": "e", "reqnum": 1, "request_idx": 2, "url": "http://w:1"}


class VerifiedCacheTests(SynchronousTestCase):
    def signed(
        self, shape: str = "url", private: rsa.RSAPrivateKey = PRIVATE, **changes: object
    ) -> dict[str, Any]:
        auth = {**URL_AUTH, **changes}
        return {**auth, "signature": signing.sign(private, auth, shape)}

    def test_repeat_skips_rsa(self) -> None:
        """A url-shaped signature seen before is accepted without a second RSA check, even
        when the unsigned fields (reqnum, cost) differ."""
        key, cache = CountingKey(PUBLIC), signing.VerifiedCache()
        auth = self.signed()
        self.assertEqual(signing.verify(key.public, auth, ("url",), cache), "url")
        self.assertEqual(signing.verify(key.public, {**auth, "reqnum": 2}, ("url",), cache), "url")
        self.assertEqual(key.checks, 1)

    def test_other_message_is_checked(self) -> None:
        """The cached signature does not vouch for another message: a changed url is checked
        with RSA and refused."""
        key, cache = CountingKey(PUBLIC), signing.VerifiedCache()
        auth = self.signed()
        signing.verify(key.public, auth, ("url",), cache)
        self.assertIsNone(
            signing.verify(key.public, {**auth, "url": "http://x:1"}, ("url",), cache)
        )
        self.assertEqual(key.checks, 2)

    def test_failures_are_not_cached(self) -> None:
        """A signature that fails is checked again each time and never passes."""
        key, cache = CountingKey(PUBLIC), signing.VerifiedCache()
        forged = {**self.signed(), "url": "http://x:1"}
        for _ in range(3):
            self.assertIsNone(signing.verify(key.public, forged, ("url",), cache))
        self.assertEqual(key.checks, 3)

    def test_rotation_empties_the_cache(self) -> None:
        """After the key changes, a message signed with the old key is refused, although it
        was cached as verified under the old one."""
        cache = signing.VerifiedCache()
        old_private = signing.generate_private_key()
        auth = self.signed(private=old_private)
        self.assertEqual(signing.verify(old_private.public_key(), auth, ("url",), cache), "url")
        self.assertIsNone(signing.verify(PUBLIC, auth, ("url",), cache))

    def test_bounded(self) -> None:
        """Only the last ``size`` verified messages are remembered; older ones cost an RSA
        check again."""
        key, cache = CountingKey(PUBLIC), signing.VerifiedCache(size=2)
        first, second, third = (self.signed(url=f"http://w:{n}") for n in (1, 2, 3))
        for auth in (first, second, first, third, first, second):
            self.assertEqual(signing.verify(key.public, auth, ("url",), cache), "url")
        # first, second: checked; first: hit (now newest); third: checked, evicts second;
        # first: hit; second: checked again.
        self.assertEqual(key.checks, 4)

    def test_shape_in_entry(self) -> None:
        """A five-field signature is cached per message too (every reqnum is a new message)."""
        key, cache = CountingKey(PUBLIC), signing.VerifiedCache()
        for reqnum in (1, 1, 2):
            auth = self.signed("five-field", reqnum=reqnum)
            self.assertEqual(
                signing.verify(key.public, auth, ("url", "five-field"), cache), "five-field"
            )
        # reqnum 1: url fails + five-field passes; repeat: url fails again (failures are not
        # cached), five-field hit; reqnum 2: url fails + five-field passes.
        self.assertEqual(key.checks, 5)
