"""The JSON values animus accepts, checked once where they come in.

animus keeps JSON in Postgres (``jsonb``) and hashes it as RFC 8785 canonical JSON, which
reads every number as an IEEE-754 double. One value model therefore holds at every edge
(params, outcomes, hook output, memory metadata), the I-JSON profile of RFC 7493:

* integers from -(2**53 - 1) to 2**53 - 1: beyond that a double cannot tell neighbouring
  integers apart, so a bigger number must travel as a string;
* finite floating-point numbers (no NaN, no infinities);
* text without the NUL character and without lone surrogates (Postgres stores neither);
* objects with string keys, and arrays, nested at most :data:`MAX_DEPTH` levels deep.

A value outside the model is refused with :class:`~animus_core.values.errors.InvalidInput` naming
where it is (``params.n: integer too large (320 digits) ...``), never echoing the value
itself, which may be a secret.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import msgspec

from animus_core.values.errors import InvalidInput

__all__ = ["MAX_DEPTH", "MAX_SAFE_INTEGER", "Unreadable", "check", "decode", "encode", "read_stored"]

MAX_SAFE_INTEGER: Final = 2**53 - 1
MAX_DEPTH: Final = 64

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_SIXTEEN_DIGITS = b"0" * 16
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Unreadable(dict[str, str]):
    """Stands for a stored JSON value that animus cannot read (written around animus, by hand
    with SQL: nested too deeply, a number beyond a double): ``{"unreadable_json": why}``.
    Reading it never fails; the engine dead-letters an item whose params are unreadable."""

    def __init__(self, reason: str) -> None:
        super().__init__(unreadable_json=reason)

    @property
    def reason(self) -> str:
        return self["unreadable_json"]


def read_stored(text: str) -> Any:
    """The value of JSON text that Postgres stored, or :class:`Unreadable`; never raises."""
    try:
        return _decode(text)
    except RecursionError:
        return Unreadable("nested too deeply to read")
    except msgspec.DecodeError as e:
        return Unreadable(str(e).replace("Number out of range",
                                         "a number beyond the range of a double"))


def encode(value: Any, where: str, *, limit: int | None = None,
           setting: str | None = None) -> str:
    """The compact JSON text of ``value``, after :func:`check`; with ``limit``, refuse text
    longer than ``limit`` bytes (``setting`` names the variable that sets it)."""
    raw = _fast(value)
    if raw is None:
        check(value, where)
        raw = _encode(value)
    if limit is not None and len(raw) > limit:
        raise InvalidInput(
            f"{where} is {_size(len(raw))} of JSON, over the limit of {_size(limit)}"
            + (f" ({setting})" if setting else "")
            + ": store large data elsewhere (a file, memory) and pass a reference to it")
    return raw.decode("utf-8")


def decode(data: bytes | str, where: str, *, limit: int | None = None,
           setting: str | None = None) -> Any:
    """The value of the JSON document ``data``, which must be within the model (and within
    ``limit`` bytes)."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if limit is not None and size > limit:
        raise InvalidInput(f"{where} is {_size(size)}, over the limit of {_size(limit)}"
                           + (f" ({setting})" if setting else ""))
    try:
        value = _decode(data)
    except RecursionError:
        raise InvalidInput(f"{where} is nested more than {MAX_DEPTH} levels deep") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        if "out of range" in str(e):
            raise InvalidInput(f"{where} is not valid JSON: a number beyond the range of a "
                               "double") from None
        value = _decode_slowly(data, where)  # for a precise location, or a lone surrogate
    check(value, where)
    return value


def _decode_slowly(data: bytes | str, where: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(data, parse_constant=refuse)
    except RecursionError:
        raise InvalidInput(f"{where} is nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column "
                           f"{e.colno}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{where} is not valid JSON: {e}") from None


def check(value: Any, where: str) -> None:
    """Raise :class:`InvalidInput`, naming the path below ``where``, for the first part of
    ``value`` outside the model."""
    _check(value, where, 0)


def _fast(value: Any) -> bytes | None:
    """The encoding of ``value`` when plainly inside the model (no long digit runs, no NUL
    escape, fewer brackets than the depth limit, and read back equal), else ``None``."""
    try:
        raw = _encode(value)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
        return None
    if (b"\\u0000" in raw or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
            or _SIXTEEN_DIGITS in raw.translate(_DIGITS_AS_ZERO)):
        return None
    try:  # NaN and infinities encode as null; tuples, sets and the like read back as lists
        return raw if _decode(raw) == value else None
    except (msgspec.DecodeError, RecursionError):
        return None


def _check(value: Any, path: str, depth: int) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            digits = len(str(abs(value))) if abs(value) < 10**4000 else "thousands of"
            raise InvalidInput(
                f"{path}: integer too large ({digits} digits): animus keeps numbers as "
                f"IEEE-754 doubles, exact only within ±{MAX_SAFE_INTEGER}; send it as a string")
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidInput(f"{path}: {value} is not a JSON number; use null or a string")
    elif isinstance(value, dict | list | tuple):
        if depth >= MAX_DEPTH:
            raise InvalidInput(
                f"{path}: nested more than {MAX_DEPTH} levels deep; flatten the value")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise InvalidInput(f"{path}: an object key is a {type(k).__name__}; "
                                       "JSON object keys are strings")
                _check_text(k, f"{path} (a key)")
                _check(v, _member(path, k), depth + 1)
        else:
            for i, v in enumerate(value):
                _check(v, f"{path}[{i}]", depth + 1)
    else:
        raise InvalidInput(f"{path}: a {type(value).__name__} is not JSON; use an object, "
                           "array, string, number, true, false or null")


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise InvalidInput(f"{path}: contains a NUL character (\\u0000), which Postgres "
                           "cannot store; remove it, or encode binary data (base64)")
    bad = _SURROGATE.search(text)
    if bad:
        raise InvalidInput(
            f"{path}: contains a lone surrogate (\\u{ord(bad.group()):04x} at character "
            f"{bad.start()}), which is not Unicode text; fix the encoding of the text")


def _member(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    shown = key if len(key) <= 40 else key[:40] + "..."
    return f"{path}[{_encode(shown).decode()}]"


def _size(n: int) -> str:
    if n < 10_000:
        return f"{n} bytes"
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.1f}".removesuffix(".0") + " MiB"
