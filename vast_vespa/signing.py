# -*- test-case-name: tests.test_signing -*-
"""
Vast request signatures (PROTOCOL.md section 3): RSASSA-PKCS1-v1_5 with SHA-256, standard
base64, over Python's ``json.dumps(message, indent=4, sort_keys=True)`` of one of two message
shapes. Pure: used by the worker to verify and by the local autoscaler emulator to sign.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

# Fields of the five-field shape, and every auth_data field a request must carry.
FIVE_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "url")
AUTH_FIELDS = (*FIVE_FIELDS, "signature")


def message_object(auth_data: Mapping[str, Any], shape: str) -> dict[str, Any]:
    """The object that is signed for ``shape`` ("url" or "five-field")."""
    if shape == "url":
        return {"url": auth_data["url"]}
    if shape == "five-field":
        return {name: auth_data[name] for name in FIVE_FIELDS}
    raise ValueError(f"unknown signature shape {shape!r}")


_SCALARS = (str, int, float, type(None))  # bool is an int
_DUMPS = json.JSONEncoder().encode  # the C encoder json.dumps uses without an indent


def canonical_message(auth_data: Mapping[str, Any], shape: str) -> bytes:
    """
    The exact bytes signed for ``shape``: ``json.dumps(message, indent=4, sort_keys=True)``.
    Numbers keep the int/float form they were parsed with (``256`` and ``256.0`` sign
    differently), as Python's json module writes them.

    Every secured request needs this message (twice when its auth is judged from the head), and
    json.dumps with an indent runs json's pure-Python encoder: the fields (already in sorted
    order) are written one by one with json's C encoder instead, which gives the same bytes
    for the scalar values auth_data holds; anything else takes json.dumps itself.
    """
    message = message_object(auth_data, shape)
    if not all(isinstance(value, _SCALARS) for value in message.values()):
        return json.dumps(message, indent=4, sort_keys=True).encode("utf-8")
    fields = ",\n".join(f"    {_DUMPS(name)}: {_DUMPS(value)}" for name, value in message.items())
    return f"{{\n{fields}\n}}".encode()


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """Load a PEM public key, ``BEGIN PUBLIC KEY`` or ``BEGIN RSA PUBLIC KEY``."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the autoscaler's public key is not an RSA key")
    return key


def load_private_key(pem: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def generate_private_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit key, as the production autoscaler uses."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def sign(key: rsa.RSAPrivateKey, auth_data: Mapping[str, Any], shape: str) -> str:
    """The base64 signature of ``auth_data`` in ``shape``."""
    signature = key.sign(canonical_message(auth_data, shape), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


class VerifiedCache:
    """
    The last ``size`` (shape, message, signature) triples that verified with one key. With the
    ``url`` shape every request to a worker carries the same signed message, so a hit saves the
    RSA check on all but the first. Bound to the key object it was filled with: a different key
    (a rotation) empties it, so nothing verified with an old key is accepted under a new one.
    Only successes are stored; replay checks happen after verification and are unaffected.
    """

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._key: rsa.RSAPublicKey | None = None
        self._verified: OrderedDict[tuple[str, bytes, bytes], None] = OrderedDict()

    def hit(self, key: rsa.RSAPublicKey, entry: tuple[str, bytes, bytes]) -> bool:
        if key is not self._key or entry not in self._verified:
            return False
        self._verified.move_to_end(entry)
        return True

    def add(self, key: rsa.RSAPublicKey, entry: tuple[str, bytes, bytes]) -> None:
        if key is not self._key:
            self._key = key
            self._verified.clear()
        self._verified[entry] = None
        if len(self._verified) > self._size:
            self._verified.popitem(last=False)


def verify(
    key: rsa.RSAPublicKey,
    auth_data: Mapping[str, Any],
    shapes: Iterable[str],
    cache: VerifiedCache | None = None,
) -> str | None:
    """
    The first shape in ``shapes`` whose message the signature verifies, or None. Any decoding
    problem (bad base64, missing field, wrong type) counts as "does not verify". With ``cache``,
    a (shape, message, signature) that verified before with this same key is not checked again.
    """
    signature_text = auth_data.get("signature")
    if not isinstance(signature_text, str) or not signature_text:
        return None
    try:
        signature = base64.b64decode(signature_text, validate=True)
    except (binascii.Error, ValueError):
        return None
    for shape in shapes:
        try:
            message = canonical_message(auth_data, shape)
        except (KeyError, TypeError, ValueError):
            continue
        entry = (shape, message, signature)
        if cache is not None and cache.hit(key, entry):
            return shape
        try:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        if cache is not None:
            cache.add(key, entry)
        return shape
    return None
