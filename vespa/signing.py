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


def canonical_message(auth_data: Mapping[str, Any], shape: str) -> bytes:
    """
    The exact bytes signed for ``shape``. Numbers keep the int/float form they were parsed
    with (``256`` and ``256.0`` sign differently), as Python's json module writes them.
    """
    text = json.dumps(message_object(auth_data, shape), indent=4, sort_keys=True)
    return text.encode("utf-8")


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


def verify(
    key: rsa.RSAPublicKey, auth_data: Mapping[str, Any], shapes: Iterable[str]
) -> str | None:
    """
    The first shape in ``shapes`` whose message the signature verifies, or None. Any decoding
    problem (bad base64, missing field, wrong type) counts as "does not verify".
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
        try:
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return shape
    return None
