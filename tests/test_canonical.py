"""Tests for flowpin.canonical: RFC 8785 canonical JSON, and what it refuses."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowpin.canonical import canonical_dumps, canonical_json, format_number
from flowpin.errors import CanonicalError

# --- golden value ---------------------------------------------------------------------------------

GOLDEN_VALUE = {"stage": "train", "recipe": {"lr": 0.001, "layers": 2, "tags": ["a", "b"]}, "seed": None}
GOLDEN_BYTES = b'{"recipe":{"layers":2,"lr":0.001,"tags":["a","b"]},"seed":null,"stage":"train"}'
GOLDEN_SHA256 = "32ae11d1e073117ae18ecdd208a5a419b8dad10e50ae7ce1d4aaf190990d47ed"


def test_golden_bytes_and_digest_are_pinned() -> None:
    out = canonical_json(GOLDEN_VALUE)
    assert out == GOLDEN_BYTES
    assert hashlib.sha256(out).hexdigest() == GOLDEN_SHA256


def test_one_changed_field_changes_the_bytes() -> None:
    changed = {**GOLDEN_VALUE, "recipe": {**GOLDEN_VALUE["recipe"], "lr": 0.002}}  # type: ignore[dict-item]
    assert hashlib.sha256(canonical_json(changed)).hexdigest() != GOLDEN_SHA256


def test_insertion_order_does_not_matter() -> None:
    a = OrderedDict([("b", 1), ("a", 2)])
    b = {"a": 2, "b": 1}
    assert canonical_json(a) == canonical_json(b) == b'{"a":2,"b":1}'


# --- key order and whitespace ---------------------------------------------------------------------


def test_keys_sorted_by_utf16_code_units_not_code_points() -> None:
    # U+E000 (one UTF-16 unit 0xE000) sorts AFTER U+1F600 (surrogates 0xD83D 0xDE00) in UTF-16 order,
    # although its code point is smaller. RFC 8785 section 3.2.3 mandates UTF-16 order.
    value = {"\ue000": 1, "\U0001f600": 2, "a": 3}
    assert sorted(value) == ["a", "\ue000", "\U0001f600"]  # code point order, for contrast
    assert canonical_dumps(value) == '{"a":3,"\U0001f600":2,"\ue000":1}'


def test_nested_keys_sorted_and_no_whitespace() -> None:
    out = canonical_json({"z": [1, {"y": True, "x": False}], "a": {"c": None, "b": "s p"}})
    assert out == b'{"a":{"b":"s p","c":null},"z":[1,{"x":false,"y":true}]}'


def test_strings_minimal_escaping_and_utf8() -> None:
    out = canonical_json(["é€😀", '\n\t"\\', "\x01", "/", "\x7f"])
    assert out == '["é€😀","\\n\\t\\"\\\\","\\u0001","/","\x7f"]'.encode()


# --- numbers (RFC 8785 section 3.2.2.3, ECMAScript Number.prototype.toString) ---------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1"),
        (0.1, "0.1"),
        (-0.0, "0"),
        (0.0, "0"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1e-7, "1e-7"),
        (1e-6, "0.000001"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (123.456, "123.456"),
        (-1.5, "-1.5"),
        (333333333.33333329, "333333333.3333333"),
        (2**53 - 1, "9007199254740991"),
        (-(2**53 - 1), "-9007199254740991"),
        (0, "0"),
    ],
)
def test_number_forms(value: float, expected: str) -> None:
    assert format_number(value) == expected
    assert canonical_json([value]) == f"[{expected}]".encode()


def test_large_integral_values_round_trip() -> None:
    # 1e17 is written as integer digits (ECMAScript form); json.loads gives back an int > 2**53-1 that
    # is exactly that double, so it must canonicalise to the same bytes (manifests are re-canonicalised
    # after loading, e.g. for the identity digest).
    out = canonical_json({"n": 1e17, "m": 2.0**53, "k": 5.654763085067141e16})
    assert out == b'{"k":56547630850671410,"m":9007199254740992,"n":100000000000000000}'
    assert canonical_json(json.loads(out)) == out


def test_float_subclass_uses_the_float_value() -> None:
    # numpy floats are float subclasses with a different repr(); they must format like the float.
    assert canonical_json([np.float64(0.1), np.float64(1e21)]) == b"[0.1,1e+21]"


# --- refusals -------------------------------------------------------------------------------------


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        b"bytes",
        bytearray(b"x"),
        {1, 2},
        {1: "non-str key"},
        {("a",): 1},
        2**53 + 1,
        -(2**53 + 1),
        10**400,
        "lone \ud800 surrogate",
        {"lone \udfff key": 1},
        _Opaque(),
        np.int64(3),
        {"nested": [1, {"deep": float("nan")}]},
    ],
    ids=[
        "nan",
        "inf",
        "-inf",
        "bytes",
        "bytearray",
        "set",
        "int-key",
        "tuple-key",
        "int>2**53-1-inexact",
        "int<-(2**53-1)-inexact",
        "int-overflows-double",
        "lone-surrogate",
        "lone-surrogate-key",
        "object",
        "numpy-int",
        "nested-nan",
    ],
)
def test_refuses_values_without_canonical_form(value: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical_json(value)


def test_refusal_names_where() -> None:
    with pytest.raises(CanonicalError, match=r"\$\.a\[1\]"):
        canonical_json({"a": [0, float("nan")]})


# --- property: canonical form is a fixed point of parse → canonicalise ----------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53 - 1), max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_canonical_json_is_idempotent(value: Any) -> None:
    once = canonical_json(value)
    assert canonical_json(json.loads(once)) == once
