"""Canonical JSON (RFC 8785) and the hashes built on it: properties and known vectors.

* key order, at any depth, does not change the text or the hash;
* a number is one number however it is spelled (``1``, ``1.0``, ``1e0``; ``-0.0`` and ``0``);
* the canonical text is JSON that ``json.loads`` reads back to an equal value;
* numbers are written as ECMAScript's ``Number.prototype.toString`` writes them (the RFC's
  vectors, and, when ``node`` is installed, a seeded batch of random doubles compared with
  ``JSON.stringify``);
* object keys sort by UTF-16 code units, not by code points;
* with ``nfc=True`` a composed ``é`` and ``e`` + combining accent are the same text; without
  it (the audit chain) they are not;
* NaN and the infinities have no JSON form and are refused.

No database is needed.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import struct
import subprocess
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from animus_core.values import canonical
from animus_core.values.canonical import canonical_hash, canonical_json, canonical_text

SAFE_INT = 2**53  # integers beyond +-2**53 are not exact as IEEE doubles (the RFC's numbers)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-SAFE_INT, max_value=SAFE_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=8)


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's insertion order permuted (lists keep theirs)."""
    if isinstance(value, dict):
        keys = list(value)
        rng.shuffle(keys)
        return {k: shuffled(value[k], rng) for k in keys}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


# -- key order ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(json_objects, st.randoms(use_true_random=False), st.booleans())
def test_key_order_does_not_change_the_hash(value: dict[str, Any], rng: random.Random,
                                            nfc: bool) -> None:
    other = shuffled(value, rng)
    assert canonical_json(other, nfc=nfc) == canonical_json(value, nfc=nfc)
    assert canonical_hash(other, nfc=nfc) == canonical_hash(value, nfc=nfc)


def test_nested_key_order_does_not_change_the_hash() -> None:
    a = {"b": {"y": [1, {"q": 1, "p": 2}], "x": None}, "a": {"d": True, "c": "text"}}
    b = {"a": {"c": "text", "d": True}, "b": {"x": None, "y": [1, {"p": 2, "q": 1}]}}
    assert canonical_json(a) == canonical_json(b) == (
        '{"a":{"c":"text","d":true},"b":{"x":null,"y":[1,{"p":2,"q":1}]}}')
    assert canonical_hash(a) == canonical_hash(b)
    # lists are ordered: a different order is a different value
    assert canonical_hash({"l": [1, 2]}) != canonical_hash({"l": [2, 1]})


def test_the_hash_is_sha256_of_the_canonical_text() -> None:
    import hashlib

    value = {"b": 1, "a": [True, None, "x"]}
    digest = hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
    assert canonical_hash(value) == f"sha256:{digest}"
    assert len(digest) == 64


# -- the fast path ---------------------------------------------------------------------------


def exact(value: Any, nfc: bool = False) -> str:
    """The reference encoder alone, without the msgspec fast path."""
    out: list[str] = []
    canonical._encode(value, nfc, out)
    return "".join(out)


ascii_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(max_codepoint=127), max_size=12)
)
ascii_values = st.recursive(
    ascii_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(st.text(st.characters(max_codepoint=127), max_size=8), children,
                      max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(ascii_values | json_values, st.booleans())
def test_the_fast_path_writes_exactly_what_the_reference_encoder_writes(value: Any,
                                                                        nfc: bool) -> None:
    assert canonical_json(value, nfc=nfc) == exact(value, nfc)


@pytest.mark.parametrize("value", [
    {"a": 1.0}, {"a": -0.0}, {"a": 10**15}, {"a": 2**53 + 1}, [1, (2, 3)], {"k": "\u00e9"},
    "\x00\x1f\x7f\"\\/", {"b": [True, False, None]}, {"\u00e9": 1, "e": 2},
])
def test_values_at_the_edge_of_the_fast_path(value: Any) -> None:
    assert canonical_json(value) == exact(value)


# the edges of the floats msgspec writes as RFC 8785 does (from 1e-4 to 1e16, not integral)
EDGE_FLOATS = [0.1, 0.2, -2.5, 1e-4, -1e-4, 9.999999999999999e-05, 1.0001e-4, 1e16, 1e16 - 2,
               9999999999999998.5, 1234.5678, 1e-7, 1e21, 1.5e300, 5e-324, 2.0, -0.0,
               float(2**53), float(2**53) + 2, 0.1 + 0.2]


@pytest.mark.parametrize("x", EDGE_FLOATS)
def test_floats_at_the_edge_of_the_fast_path(x: float) -> None:
    for value in (x, {"a": x}, [x, 1, "s"]):
        assert canonical_json(value) == exact(value)
        text = json.dumps(value)
        assert canonical_text(text) == exact(json.loads(text))
        assert canonical_text(text.replace("e-", "E-").replace("e+", "e")) == exact(value)


@settings(max_examples=500, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False)
       | st.floats(min_value=1e-5, max_value=1e17)
       | st.integers(min_value=-(2**60), max_value=2**60).map(float))
def test_every_float_takes_a_path_that_writes_it_exactly(x: float) -> None:
    assert canonical_json({"x": x, "y": [x]}) == exact({"x": x, "y": [x]})
    assert canonical_text(json.dumps({"x": x})) == exact({"x": x})


@pytest.mark.parametrize("value", [{"a": uuid.uuid4()}, {"a": {1, 2}}, {1: "x"}, b"bytes",
                                   {"a": float("nan")}])
def test_values_that_are_not_json_are_refused_by_both_paths(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        canonical_json(value)
    with pytest.raises((TypeError, ValueError)):
        exact(value)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_canonical_text_of_a_document_is_the_canonical_text_of_its_value(
        value: Any, spaced: bool) -> None:
    # spaced: as Postgres prints jsonb ({"a": 1, "b": [2, 3]}); otherwise compact
    text = json.dumps(value, ensure_ascii=False,
                      separators=(", ", ": ") if spaced else (",", ":"))
    assert canonical_text(text) == exact(json.loads(text))


@pytest.mark.parametrize("text", [
    '{"a": 1.0}', '{"a": 1e2}', '{"a": -0.0}', '{"a": 123456789012345678901}',
    '{"b": 1, "a": [1, 2.5, "\\u00e9"]}', '"\\u0000\\u001f"', "[]", "null",
])
def test_canonical_text_at_the_edge_of_the_fast_path(text: str) -> None:
    assert canonical_text(text) == canonical_json(json.loads(text))


# -- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [
    (1, 1.0), (1e2, 100), (-0.0, 0), (0.0, 0), (-0.0, 0.0), (1e0, 1), (2.50, 2.5),
    (-7, -7.0), (1e15, 10**15), (float(2**53), 2**53), (1e21, 10**21),
])
def test_a_number_is_one_number_however_it_is_spelled(a: float, b: float) -> None:
    assert canonical_json(a) == canonical_json(b)
    assert canonical_hash({"n": a}) == canonical_hash({"n": b})
    assert canonical_hash([a], nfc=True) == canonical_hash([b], nfc=True)


@given(st.integers(min_value=-SAFE_INT, max_value=SAFE_INT))
def test_every_exact_integer_hashes_as_its_float(n: int) -> None:
    assert canonical_json(n) == canonical_json(float(n)) == str(n)


def test_booleans_are_not_numbers() -> None:
    assert canonical_json([True, False, 1, 0]) == "[true,false,1,0]"
    assert canonical_hash(True) != canonical_hash(1)


# From RFC 8785 (section 3.2.2.3 and appendix B) and the ES6 Number::toString rules.
ES6_VECTORS = [
    (0.0, "0"),
    (-0.0, "0"),
    (1.0, "1"),
    (-1.5, "-1.5"),
    (4.50, "4.5"),
    (2e-3, "0.002"),
    (0.000001, "0.000001"),
    (1e-7, "1e-7"),
    (1.5e-7, "1.5e-7"),
    (123e-20, "1.23e-18"),
    (1e21, "1e+21"),
    (1e20, "100000000000000000000"),
    (1e23, "1e+23"),
    (1e30, "1e+30"),
    (1e-27, "1e-27"),
    (333333333.33333329, "333333333.3333333"),
    (123456789012345680000.0, "123456789012345680000"),
    (295147905179352830000.0, "295147905179352830000"),
    (9007199254740992.0, "9007199254740992"),
    (9007199254740994.0, "9007199254740994"),
    (5e-324, "5e-324"),
    (-5e-324, "-5e-324"),
    (2.2250738585072014e-308, "2.2250738585072014e-308"),
    (1.7976931348623157e308, "1.7976931348623157e+308"),
    (-1.7976931348623157e308, "-1.7976931348623157e+308"),
    (0.1, "0.1"),
    (0.1 + 0.2, "0.30000000000000004"),
    (100.0, "100"),
    (1e-6, "0.000001"),
    (1.2e-6, "0.0000012"),
    (999999999999999900000.0, "999999999999999900000"),
    (1.2345e21, "1.2345e+21"),
]


@pytest.mark.parametrize(("number", "text"), ES6_VECTORS, ids=[t for _, t in ES6_VECTORS])
def test_numbers_are_written_as_ecmascript_writes_them(number: float, text: str) -> None:
    assert canonical_json(number) == text
    assert float(text) == number  # and they read back to the same double


def test_integers_beyond_2_53_are_the_doubles_they_round_to() -> None:
    # 2**53 + 1 is not a double: as JSON numbers (IEEE doubles) it is 2**53
    assert canonical_json(2**53 + 1) == "9007199254740992"
    assert canonical_json(123456789012345678901) == "123456789012345680000"
    assert canonical_json(10**21) == "1e+21"
    assert canonical_json(-(10**22)) == "-1e+22"


def test_the_rfc_8785_example() -> None:
    # RFC 8785 section 3.2.2 (the input as JSON text, read by Python's json)
    source = r'''{
        "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
        "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
        "literals": [null, true, false]
    }'''
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,'
                '1e-27],"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}')
    assert canonical_json(json.loads(source)) == expected


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_numbers_match_javascript_json_stringify() -> None:
    """A seeded batch of random doubles (every exponent range) against node's own output."""
    rng = random.Random(8785)
    numbers: list[float] = []
    while len(numbers) < 20_000:
        x = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        if math.isfinite(x):
            numbers.append(x)
    numbers += [float(rng.randrange(-(2**70), 2**70)) for _ in range(2_000)]
    numbers += [float(f"{m}e{e}") for e in range(-324, 308) for m in (1, 2.5, 9.999)]
    program = ("const xs = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
               "process.stdout.write(JSON.stringify(xs.map(x => JSON.stringify(x))));")
    proc = subprocess.run(["node", "-e", program], input=json.dumps(numbers),
                          capture_output=True, text=True, timeout=60, check=True)
    expected = json.loads(proc.stdout)
    wrong = [(x, canonical_json(x), js) for x, js in zip(numbers, expected, strict=True)
             if canonical_json(x) != js]
    assert not wrong, f"{len(wrong)} numbers differ from JavaScript, e.g. {wrong[:5]}"


@settings(max_examples=500)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_number_text_is_the_shortest_that_reads_back(x: float) -> None:
    text = canonical_json(x)
    assert float(text) == x
    assert text == text.strip()
    assert "+" not in text.split("e")[0]
    assert "E" not in text
    if "e" not in text:  # plain notation only between 1e-7 and 1e21 (exclusive)
        assert x == 0 or 1e-7 <= abs(x) < 1e21
    else:
        assert abs(x) < 1e-6 or abs(x) >= 1e21


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(bad: float) -> None:
    for value in (bad, [1, bad], {"a": {"b": bad}}):
        with pytest.raises(ValueError, match="no JSON form"):
            canonical_json(value)
        with pytest.raises(ValueError, match="no JSON form"):
            canonical_hash(value, nfc=True)


def test_non_json_values_are_refused() -> None:
    with pytest.raises(TypeError, match="keys must be strings"):
        canonical_json({1: "a"})
    with pytest.raises(TypeError, match="is not JSON"):
        canonical_json({"a": {1, 2}})
    with pytest.raises(TypeError, match="is not JSON"):
        canonical_json(b"bytes")


# -- round trip ---------------------------------------------------------------------------------


def read_back(text: str) -> Any:
    """``json.loads``, reading a JSON number as the double it is (Python would read
    ``36680481761380770`` as an int, exactly, and no double equals that int)."""
    return json.loads(text, parse_int=lambda s: int(s) if abs(int(s)) <= SAFE_INT else float(s))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_the_canonical_text_reads_back_to_an_equal_value(value: Any) -> None:
    text = canonical_json(value)
    assert read_back(text) == value
    # and it is already canonical: a fixed point
    assert canonical_json(read_back(text)) == text
    # no whitespace between tokens (strings may hold any, escaped or not)
    between = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert "\n" not in between
    assert ": " not in between
    assert ", " not in between


# -- strings and keys ---------------------------------------------------------------------------


def test_keys_sort_by_utf16_code_units() -> None:
    # RFC 8785 section 3.2.3: the emoji (surrogates D83D DE00) sorts before U+FB33, though its
    # code point is larger; code-point order would put it last.
    keys = ["\u20ac", "\r", "\ufb33", "1", "\U0001F600", "\u0080", "\u00f6"]
    text = canonical_json(dict.fromkeys(keys, 0))
    assert list(json.loads(text)) == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001F600",
                                      "\ufb33"]
    # an astral character against the last BMP one
    assert list(json.loads(canonical_json({"\uffff": 1, "\U0001F600": 2}))) == [
        "\U0001F600", "\uffff"]
    assert sorted(["\uffff", "\U0001F600"]) == ["\uffff", "\U0001F600"]  # code points differ


@given(st.lists(st.text(max_size=4), max_size=10, unique=True))
def test_keys_are_in_utf16_order(keys: list[str]) -> None:
    out = list(json.loads(canonical_json(dict.fromkeys(keys, None))))
    assert out == sorted(keys, key=lambda k: k.encode("utf-16-be"))


def test_strings_are_escaped_minimally() -> None:
    assert canonical_json("\u00e9\U0001F600/\t\x7f\x1f\"\\") == '"\u00e9\U0001F600/\\t\x7f\\u001f\\"\\\\"'


COMPOSED = "caf\u00e9"  # é as one code point
DECOMPOSED = "cafe\u0301"  # e + COMBINING ACUTE ACCENT


def test_nfc_makes_composed_and_decomposed_text_one() -> None:
    assert COMPOSED != DECOMPOSED
    for a, b in ((COMPOSED, DECOMPOSED), ({"k": COMPOSED}, {"k": DECOMPOSED}),
                 ({COMPOSED: 1}, {DECOMPOSED: 1}), ([{"x": [COMPOSED]}], [{"x": [DECOMPOSED]}])):
        assert canonical_hash(a, nfc=True) == canonical_hash(b, nfc=True)
        # the audit chain hashes exactly what was stored
        assert canonical_hash(a) != canonical_hash(b)
        assert canonical_hash(a, nfc=False) != canonical_hash(b, nfc=False)
    assert canonical_json(DECOMPOSED, nfc=True) == f'"{COMPOSED}"'


@given(st.text(max_size=12))
def test_nfc_hash_is_the_hash_of_the_normalised_text(text: str) -> None:
    import unicodedata

    for form in ("NFD", "NFC"):
        other = unicodedata.normalize(form, text)
        assert canonical_hash({text: text}, nfc=True) == canonical_hash({other: other}, nfc=True)


def test_keys_equal_after_nfc_do_not_make_the_hash_depend_on_insertion_order() -> None:
    a = {COMPOSED: 1, DECOMPOSED: 2}
    b = {DECOMPOSED: 2, COMPOSED: 1}
    assert canonical_hash(a, nfc=True) == canonical_hash(b, nfc=True)
    c = {COMPOSED: 2, DECOMPOSED: 1}  # the values swapped: another object
    assert canonical_hash(a) != canonical_hash(c)
