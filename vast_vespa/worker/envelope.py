# -*- test-case-name: tests.test_envelope -*-
"""
The request forms of the serverless protocol (PROTOCOL.md section 2), as a pure function:
which ``auth_data`` a request carries and what goes on to the backend.

In order of precedence:

1. header ``X-Serverless-Auth``: the auth_data object as JSON; the body passes byte for byte
   (any method; the form for multipart uploads, images, audio);
2. the JSON envelope ``{"auth_data": {...}, "payload": ...}`` on POST/PUT/PATCH: only the
   payload goes on, serialised once, as ``application/json``. An envelope larger than
   :data:`PEEK` that starts with ``auth_data`` (as every Vast client writes it) is read no
   further until its signature is checked (:func:`with_payload`): a forged envelope costs
   its first bytes, not a parse of its whole body (JSON takes up to 25 times its size in
   memory, and seconds of CPU per 10 MB). In any other order it is read whole, up to
   :data:`UNORDERED_LIMIT` (beyond it: 422 secured; unsecured, the body passes untouched,
   so that a large JSON body that merely mentions ``auth_data`` is never parsed in the event
   loop). Smaller envelopes are read whole at once (at most a few ms);
3. ``serverless_*`` query parameters on GET/DELETE/HEAD: removed from the query string, every
   other parameter passes unchanged and in order.

Numbers keep the int/float form they were sent with: the five-field signature covers ``cost``.
JSON nested more than :data:`MAX_DEPTH` levels deep is refused like JSON that does not parse,
on every Python (each one's parser stops at another depth, or none).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import unquote_to_bytes

import orjson

from vast_vespa.signing import AUTH_FIELDS
from vast_vespa.strict_json import STRICT, TOO_DEEP, loads, nested_deeper


def dump_json(value: Any) -> bytes:
    """The payload serialised once (orjson: several times faster on large payloads)."""
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, lone surrogates: the json module copes
        return json.dumps(value).encode("utf-8")


AUTH_HEADER = b"x-serverless-auth"
QUERY_PREFIX = "serverless_"
QUERY_FIELDS = {(QUERY_PREFIX + name).encode("ascii"): name for name in AUTH_FIELDS}
ENVELOPE_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
QUERY_METHODS = frozenset({b"GET", b"DELETE", b"HEAD"})
_INTEGER = re.compile(r"[+-]?\d+\Z")

# JSON types each auth field must have (bool is excluded separately: it is an int in Python).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "cost": (int, float),
    "endpoint": (str,),
    "reqnum": (int,),
    "request_idx": (int,),
    "signature": (str,),
    "url": (str,),
}


@dataclass
class AuthError(Exception):
    """The request's auth form is malformed: 400 (query/header) or 422 (envelope)."""

    code: int
    error: str
    detail: str
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class Unwrapped:
    """What a request carries: its auth_data (None: none at all) and what to forward. Never
    changed once made (:func:`with_payload` makes another), though not frozen: a frozen
    dataclass sets each field through ``object.__setattr__``, on CPython 3.11 a slow call per
    field, and one of these is made for every request."""

    auth: dict[str, Any] | None
    target: bytes  # path and query string for the backend
    body: bytes | None = None  # replacement body (the envelope's payload); None: the original
    form: str = "none"  # "header", "envelope", "query" or "none"
    # An envelope whose leading auth_data alone was read: its payload comes from with_payload.
    envelope: IO[bytes] | None = None
    # An envelope's payload as parsed (``body`` is it serialised): the workload estimate reads it.
    payload: Any = None
    session_id: str | None = None  # the envelope's top-level session_id (PROTOCOL.md 5.6)


def check_auth(auth: Any, code: int, where: str) -> dict[str, Any]:
    """``auth`` if it is an object carrying all six fields with their JSON types."""
    if not isinstance(auth, dict):
        raise AuthError(code, "malformed auth_data", f"{where} must be a JSON object")
    missing = [name for name in AUTH_FIELDS if name not in auth]
    if missing:
        raise AuthError(
            code,
            "malformed auth_data",
            f"{where} lacks: " + ", ".join(missing),
            {"missing": missing},
        )
    invalid = [
        name
        for name, types in FIELD_TYPES.items()
        if isinstance(auth[name], bool) or not isinstance(auth[name], types)
    ]
    if invalid:
        raise AuthError(
            code,
            "malformed auth_data",
            f"{where} has fields of the wrong type: " + ", ".join(invalid),
            {"invalid": invalid},
        )
    return auth


def from_header(value: bytes, uri: bytes) -> Unwrapped:
    try:
        auth = loads(value)
    except ValueError as e:
        raise AuthError(
            400,
            "malformed X-Serverless-Auth",
            "the header must hold the auth_data JSON object" + _why(e),
        ) from None
    return Unwrapped(check_auth(auth, 400, "X-Serverless-Auth"), uri, None, "header")


def _why(error: ValueError) -> str:
    """What to add to a JSON error's detail: the nesting depth, when that was the reason."""
    return f" ({TOO_DEEP})" if str(error) == TOO_DEEP else ""


ENVELOPE_SHAPE = 'expected {"auth_data": {...}, "payload": ...}'


def from_envelope(body: bytes, uri: bytes, verified: dict[str, Any] | None = None) -> Unwrapped:
    """The envelope ``body``; ``verified``: its leading auth_data, already read and checked,
    which any other auth_data in it must equal."""
    try:
        document = loads(body)
    except ValueError as e:
        raise AuthError(422, "invalid JSON", ENVELOPE_SHAPE + _why(e)) from None
    if not isinstance(document, dict):
        raise AuthError(
            422, "malformed envelope", 'expected a JSON object {"auth_data": ..., "payload": ...}'
        )
    missing = [name for name in ("auth_data", "payload") if name not in document]
    if missing:
        raise AuthError(
            422, "malformed envelope", "missing: " + ", ".join(missing), {"missing": missing}
        )
    if verified is None:
        auth = check_auth(document["auth_data"], 422, "auth_data")
    elif document["auth_data"] == verified:
        auth = verified
    else:
        raise AuthError(422, "malformed envelope", "auth_data is given twice, with two values")
    session_id = document.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        raise AuthError(422, "malformed envelope", "session_id must be a string or null")
    payload = document["payload"]
    return Unwrapped(
        auth, uri, dump_json(payload), "envelope", payload=payload, session_id=session_id
    )


PEEK = 1 << 16  # larger envelopes have their leading auth_data read alone, and verified first
UNORDERED_LIMIT = 1 << 20  # the largest envelope read whole before its signature is checked
_LEADING_AUTH = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"auth_data"[ \t\r\n]*:[ \t\r\n]*')
_DECODER = json.JSONDecoder(**STRICT)


def leading_auth(start: bytes) -> tuple[Any] | None:
    """The value of ``auth_data`` when it is the first key of the envelope ``start`` begins
    (in a 1-tuple), or None when it is not or cannot be read from ``start`` alone.

    @raise AuthError: 422 when ``start`` alone nests deeper than :data:`MAX_DEPTH`."""
    found = _LEADING_AUTH.match(start)
    if found is None:
        return None
    if nested_deeper(start):
        raise AuthError(422, "invalid JSON", f"{ENVELOPE_SHAPE} ({TOO_DEEP})")
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(start) - 3:  # not a character cut at the end of the peek
            return None  # the whole envelope is not UTF-8: read whole, it gets its 422
        text = start[: e.start].decode("utf-8")
    try:  # the prefix matched is ASCII: its byte length is its length in characters
        value, _ = _DECODER.raw_decode(text, found.end())
    except ValueError:
        return None
    return (value,)


def _size(body: IO[bytes]) -> int:
    body.seek(0, 2)
    return body.tell()


def with_payload(unwrapped: Unwrapped) -> Unwrapped:
    """``unwrapped`` with its envelope's payload, read now (its auth_data is verified).

    @raise AuthError: 422 for an envelope that is malformed past its auth_data, or that gives
        auth_data twice with another value."""
    envelope = unwrapped.envelope
    if envelope is None:
        return unwrapped
    envelope.seek(0)
    return from_envelope(envelope.read(), unwrapped.target, unwrapped.auth)


def query_number(text: str) -> int | float:
    """``serverless_cost``: an int when written as one, else a finite float (PROTOCOL 2.3)."""
    if _INTEGER.match(text):
        return int(text)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def from_query(uri: bytes) -> Unwrapped | None:
    """The ``serverless_*`` parameters of ``uri`` (None if it has none) and the rest of it."""
    path, question, query = uri.partition(b"?")
    if not question:
        return None
    kept: list[bytes] = []
    found: dict[str, str] = {}
    for part in query.split(b"&"):
        raw_name = part.partition(b"=")[0]
        name = unquote_to_bytes(raw_name.replace(b"+", b" "))
        if name not in QUERY_FIELDS:
            kept.append(part)
            continue
        field_name = QUERY_FIELDS[name]
        if field_name in found:
            raise AuthError(400, "bad query auth", f"{name.decode()} is given more than once")
        value = part.partition(b"=")[2]
        found[field_name] = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8", "replace")
    if not found:
        return None
    missing = [QUERY_PREFIX + name for name in AUTH_FIELDS if name not in found]
    if missing:
        raise AuthError(
            400, "bad query auth", "missing: " + ", ".join(missing), {"missing": missing}
        )
    converters: dict[str, Callable[[str], Any]] = {
        "cost": query_number,
        "reqnum": int,
        "request_idx": int,
    }
    auth: dict[str, Any] = {}
    for key, text in found.items():
        try:
            auth[key] = converters.get(key, str)(text)
        except ValueError:
            raise AuthError(
                400, "bad query auth", f"{QUERY_PREFIX}{key}={text!r} is not a valid number"
            ) from None
    target = path + (b"?" + b"&".join(kept) if kept else b"")
    return Unwrapped(auth, target, None, "query")


ENVELOPE_KEY = b'"auth_data"'


def unwrap(
    method: bytes,
    uri: bytes,
    header: bytes | None,
    body: IO[bytes],
    unsecured: bool = False,
) -> Unwrapped:
    """
    The auth_data and forwarded form of a request (see the module docstring); ``body`` is read
    from its start only when the form needs it.

    Secured, a POST/PUT/PATCH without the header must be an envelope (422 otherwise).
    Unsecured, well-formed auth of any form is unwrapped (never checked) and anything else,
    malformed auth included, passes through untouched.

    @raise AuthError: for a malformed header, envelope or query (secured only).
    """
    try:
        if header is not None:
            return from_header(header, uri)
        if method in ENVELOPE_METHODS:
            body.seek(0)
            if unsecured and body.read(1024).lstrip()[:1] != b"{":
                return Unwrapped(None, uri)  # not JSON: never read a large upload whole
            if (size := _size(body)) > PEEK:
                body.seek(0)
                leading = leading_auth(body.read(PEEK))
                if leading is not None:
                    auth = check_auth(leading[0], 422, "auth_data")
                    return Unwrapped(auth, uri, None, "envelope", body)
                if size > UNORDERED_LIMIT:
                    if unsecured:
                        return Unwrapped(None, uri)  # not an envelope as clients write one
                    raise AuthError(
                        422,
                        "malformed envelope",
                        f"an envelope larger than {UNORDERED_LIMIT} bytes must start with "
                        f"auth_data, within its first {PEEK} bytes: "
                        '{"auth_data": {...}, "payload": ...}',
                    )
            body.seek(0)
            text = body.read()  # at most UNORDERED_LIMIT bytes, or an envelope in order
            # (find: a bytes ``in`` raises and clears a TypeError inside CPython first)
            if unsecured and text.find(ENVELOPE_KEY) == -1:
                return Unwrapped(None, uri)  # plain JSON: not parsed
            return from_envelope(text, uri)
        if method in QUERY_METHODS:
            found = from_query(uri)
            if found is not None:
                return found
    except AuthError:
        if not unsecured:
            raise
    return Unwrapped(None, uri)
