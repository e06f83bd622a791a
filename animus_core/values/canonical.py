"""Canonical JSON (RFC 8785, JCS) and the hashes built on it.

Two values that mean the same JSON hash the same: object key order, whitespace, and number
spelling (``1``, ``1.0`` and ``1e0`` are one number) do not matter. Strings are hashed as
given unless ``nfc=True``, which first brings every string (keys too) to Unicode NFC, so
that a composed ``é`` and ``e`` + combining accent are the same text; execution records use
NFC, the audit chain hashes exactly what was stored.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["canonical_hash", "canonical_json", "canonical_string", "canonical_text"]

# json.dumps(s, ensure_ascii=False) without building an encoder per call
_string = json.encoder.encode_basestring


def canonical_string(s: str) -> str:
    """The canonical text of the JSON string ``s`` (quoted, escaped as RFC 8785 says)."""
    return _string(s)


def _number(x: float) -> str:
    if not math.isfinite(x):
        raise ValueError(f"{x} has no JSON form")
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 2**53:  # exact; larger ones take the shortest digits
        return str(int(x))
    # ECMAScript Number::toString over Python's shortest round-trip digits.
    sign = "-" if x < 0 else ""
    mantissa, _, exp = repr(abs(x)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    point = len(int_part) + (int(exp) if exp else 0)  # value = 0.digits x 10^point, before strip
    point -= len(int_part + frac_part) - len((int_part + frac_part).lstrip("0"))
    digits = digits.rstrip("0") or "0"
    k, n = len(digits), point
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        out = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e > 0 else "-")
        out += str(abs(e))
    return sign + out


def _encode(value: Any, nfc: bool, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(unicodedata.normalize("NFC", value) if nfc else value))
    elif isinstance(value, int):
        if abs(value) < 2**53:
            out.append(str(value))
        elif abs(value) < 2**1024:
            out.append(_number(float(value)))
        else:
            raise ValueError("an integer beyond the range of a double has no RFC 8785 form")
    elif isinstance(value, float):
        out.append(_number(value))
    elif isinstance(value, Mapping):
        items = [(unicodedata.normalize("NFC", k) if nfc else k, v) for k, v in value.items()]
        if not all(isinstance(k, str) for k, _ in items):
            raise TypeError("JSON object keys must be strings")
        items.sort(key=lambda kv: kv[0].encode("utf-16-be"))
        if nfc and len({k for k, _ in items}) < len(items):
            # keys that differ only in normalisation: order them by value, not by insertion
            items.sort(key=lambda kv: (kv[0].encode("utf-16-be"), canonical_json(kv[1], nfc=True)))
        out.append("{")
        for i, (k, v) in enumerate(items):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _encode(v, nfc, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(",")
            _encode(v, nfc, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} is not JSON")


class _HasFloat(Exception):
    pass


def _plain_float(text: str) -> float:
    """A float msgspec writes as RFC 8785 does: shortest round-trip digits, no exponent.
    That holds from 1e-4 to 1e16 in magnitude except for integral values (msgspec writes
    ``2.0``, RFC 8785 ``2``); any other float takes the exact encoder."""
    x = float(text)
    if x.is_integer() or not 1e-4 <= abs(x) < 1e16:
        raise _HasFloat
    return x


def _plain_number(text: str) -> float | int:
    """As :func:`_plain_float`, and an integral value within 2**53 (``2.0``, ``1e2``) as the
    int it is: in a decoded document a number has no other spelling to keep."""
    x = float(text)
    if x.is_integer() and abs(x) < 2**53:
        return int(x)
    return _plain_float(text)


# The fast path: msgspec's sorted-key encoding *is* the canonical text when the value is plain
# JSON (dicts with str keys, lists, str, int, bool, None, plain floats as above) in ASCII with
# no integer of 16 digits or more. ASCII makes NFC a no-op and UTF-16 key order equal to
# code-point order; decoding the text back (refusing other floats) and comparing proves no
# tuple, set, UUID or other non-JSON value was encoded on the way. Anything else takes the
# exact encoder below.
_fast_encode = msgspec.json.Encoder(order="sorted").encode
_fast_decode = msgspec.json.Decoder(float_hook=_plain_float).decode
_text_decode = msgspec.json.Decoder(float_hook=_plain_number).decode
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_SIXTEEN_DIGITS = b"0" * 16


def _fast(value: Any) -> str | None:
    try:
        raw = _fast_encode(value)
    except (TypeError, ValueError, msgspec.EncodeError):
        return None
    if not raw.isascii() or _SIXTEEN_DIGITS in raw.translate(_DIGITS_AS_ZERO):
        return None
    try:
        same = _fast_decode(raw) == value
    except _HasFloat:
        # an integral float (msgspec wrote 2.0, RFC 8785 writes 2): written again as the
        # int it equals, if every float is integral within 2**53 or plain
        try:
            ints = _text_decode(raw)
        except _HasFloat:
            return None
        if ints != value:
            return None
        raw = _fast_encode(ints)
        if _SIXTEEN_DIGITS in raw.translate(_DIGITS_AS_ZERO):
            return None
        return raw.decode("ascii")
    return raw.decode("ascii") if same else None


def canonical_json(value: Any, *, nfc: bool = False) -> str:
    """The RFC 8785 canonical text of ``value``."""
    fast = _fast(value)
    if fast is not None:
        return fast
    out: list[str] = []
    _encode(value, nfc, out)
    return "".join(out)


def canonical_text(text: str) -> str:
    """The RFC 8785 canonical text of the JSON document ``text`` (such as Postgres prints a
    jsonb value); the same as ``canonical_json`` of the decoded value."""
    try:
        value = _text_decode(text)
    except _HasFloat:
        return canonical_json(msgspec.json.decode(text))
    # decoded JSON holds only JSON types, so no comparison is needed as in _fast
    raw = _fast_encode(value)
    if raw.isascii() and _SIXTEEN_DIGITS not in raw.translate(_DIGITS_AS_ZERO):
        return raw.decode("ascii")
    out: list[str] = []
    _encode(value, False, out)
    return "".join(out)


def canonical_hash(value: Any, *, nfc: bool = False) -> str:
    """``sha256:<hex>`` of the canonical text of ``value``."""
    digest = hashlib.sha256(canonical_json(value, nfc=nfc).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"
