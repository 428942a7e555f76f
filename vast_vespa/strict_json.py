# -*- test-case-name: tests.test_envelope -*-
"""
Strict JSON, read the same way on every Python: numbers keep their int/float form, NaN and
Infinity are refused, and so is JSON nested more than :data:`MAX_DEPTH` levels deep (each
interpreter's parser stops at another depth, or none). The worker reads envelopes with it, the
client proxy checks what it may wrap, the emulator and the client read the autoscaler's JSON.
"""

from __future__ import annotations

import json
import math
from array import array
from itertools import accumulate
from typing import Any


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


# How deep arrays and objects may nest (the envelope is one level): more than real payloads
# need, and little enough for every Python to parse and write again from within a request
# (the parsers of 3.10 and 3.11 stop near 1000 levels, 3.12's near 1500, 3.13's near 10000).
MAX_DEPTH = 512
TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
_UNSTRUCTURED = bytes(set(range(256)) - set(b'[]{}"'))  # deleted: all but brackets and quotes
_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 and -1 as signed bytes


def nested_deeper(text: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON ``text``, or the start of one, nests arrays and objects more than
    ``limit`` levels deep (brackets within strings do not count). A scan of the bytes, done
    before any parse and without recursion: Python's parser recurses once per level."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False  # too few to nest deeper: most bodies end here
    # Escaped backslashes, then escaped quotes, go: every quote left opens or closes a string.
    unescaped = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.translate(None, _UNSTRUCTURED).split(b'"')[::2])
    return max(accumulate(array("b", brackets.translate(_STEPS))), default=0) > limit


# Every number keeps its int/float form, no NaN or Infinity (loads, the envelope's auth_data).
STRICT: dict[str, Any] = {"parse_float": _finite, "parse_int": int, "parse_constant": _no_constant}


def loads(text: bytes) -> Any:
    """
    Strict JSON with ints kept as ints and floats as floats (``256`` and ``256.0`` sign
    differently); NaN, Infinity and numbers that overflow to infinity are refused, and so is
    JSON nested more than :data:`MAX_DEPTH` deep (a ValueError, as for any other JSON it
    cannot read).
    """
    if nested_deeper(text):
        raise ValueError(TOO_DEEP)
    return json.loads(text, **STRICT)
