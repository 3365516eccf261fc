"""Canonical JSON: one byte string per value, so that anything hashed or signed is reproducible.

The form follows RFC 8785 (JSON Canonicalization Scheme): object keys sorted by their UTF-16 code
units, no insignificant whitespace, UTF-8 output, minimal string escaping, and numbers written the
way ECMAScript's ``Number.prototype.toString`` writes them (so ``1.0`` and ``1`` are the same
number). Values that have no canonical form are refused with :class:`CanonicalError` instead of
being coerced: NaN/Infinity, non-string keys, bytes, sets, lone surrogates, arbitrary objects, and
containers nested deeper than :data:`MAX_DEPTH` (or containing themselves).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from flowpin.errors import CanonicalError

_MAX_SAFE_INT = 2**53 - 1
MAX_DEPTH = 256
"""Deepest container nesting encoded; deeper values (or cycles) raise instead of exhausting the stack."""


def canonical_json(value: Any) -> bytes:
    """Return the canonical UTF-8 JSON encoding of ``value``."""
    parts: list[str] = []
    _encode(value, parts, "$", 0)
    text = "".join(parts)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogate in a string
        raise CanonicalError(f"string contains a lone surrogate ({exc.reason}); cannot encode as UTF-8") from exc


def canonical_dumps(value: Any) -> str:
    """Canonical JSON as ``str``."""
    return canonical_json(value).decode("utf-8")


def format_number(value: int | float, where: str = "$") -> str:
    """ECMAScript-style number formatting (RFC 8785 section 3.2.2.3)."""
    if isinstance(value, bool):
        raise CanonicalError(f"{where}: bool is not a number")
    if isinstance(value, int):
        if abs(value) <= _MAX_SAFE_INT:
            return int.__repr__(value)  # not str(): an int subclass may override __str__/__repr__
        # A larger integer is accepted only when it is the canonical form of a double (as 1e17 parsed
        # back from our own output is): then it round-trips. Anything else would be silently rounded.
        # One too large for a double is refused before int.__repr__, which raises ValueError past 4300 digits.
        try:
            text = format_number(float(value), where)
        except OverflowError as exc:
            raise CanonicalError(
                f"{where}: integer of {value.bit_length()} bits exceeds 2**53-1 and cannot round-trip through "
                "JSON; store it as a string"
            ) from exc
        if text != int.__repr__(value):
            raise CanonicalError(
                f"{where}: integer {value} exceeds 2**53-1 and cannot round-trip through JSON; store it as a string"
            )
        return text
    if not math.isfinite(value):
        raise CanonicalError(f"{where}: {value!r} has no JSON form; replace NaN/Infinity with null or a string")
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    digits, exponent = _shortest_digits(abs(value))
    k = len(digits)
    n = exponent + k  # position of the decimal point relative to the digit string
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        head = digits[0] + ("." + digits[1:] if k > 1 else "")
        out = f"{head}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out


def _shortest_digits(value: float) -> tuple[str, int]:
    """Return (digits, exponent) with value == int(digits) * 10**exponent, digits shortest, no trailing 0."""
    # float.__repr__, not repr(): numpy floats are float subclasses whose repr is "np.float64(...)".
    text = float.__repr__(value)  # the shortest string that round-trips (David Gay / Steele-White)
    mant, _, exp = text.partition("e")
    exponent = int(exp) if exp else 0
    if "." in mant:
        int_part, frac = mant.split(".")
    else:
        int_part, frac = mant, ""
    digits = (int_part + frac).lstrip("0")
    exponent -= len(frac)
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    return stripped or "0", exponent


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _encode(value: Any, out: list[str], where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CanonicalError(f"{where}: nested deeper than {MAX_DEPTH} levels (or contains itself); flatten the value")
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int | float):
        out.append(format_number(value, where))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalError(f"{where}: object key {key!r} is not a string; JSON keys must be strings")
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _encode(value[key], out, f"{where}.{key}", depth + 1)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray | memoryview):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out, f"{where}[{i}]", depth + 1)
        out.append("]")
    else:
        raise CanonicalError(
            f"{where}: {type(value).__name__} has no canonical JSON form; convert it to str/int/float/list/dict"
        )
