"""The one strict JSON reader for everything flowpin reads that is signed or could be hostile.

Manifests (envelope and statement), ``release.json`` and its payload, checkpoint ``state.json`` and
``model.json``, tokenized and corpus ``index.json``, every record line of a dataset shard, safetensors
headers (:mod:`flowpin.tensorfile`), model-signing bundles, DVC ``.dir`` objects: whatever a signature
covers or an attacker could have written is read by :func:`loads_strict`, which
refuses -- *before* anything acts on the value -- what Python's :func:`json.loads` quietly accepts:

* more than ``max_bytes`` bytes (:class:`~flowpin.errors.JSONTooLargeError`);
* bytes that are not UTF-8 (:class:`~flowpin.errors.JSONEncodingError`);
* arrays/objects nested deeper than ``max_depth`` (:class:`~flowpin.errors.JSONTooDeepError`), counted
  on the raw bytes before parsing, so a 100,000-deep document never reaches the recursive parser;
* an object that repeats a key (:class:`~flowpin.errors.JSONDuplicateKeyError`): Python keeps the last,
  other parsers the first -- a signed document must mean one thing to every verifier;
* ``NaN``, ``Infinity``, ``-Infinity`` and numbers that overflow to infinity such as ``1e999``
  (:class:`~flowpin.errors.JSONNonFiniteError`): not JSON (RFC 8259), and never in canonical JSON;
* anything else that is not one JSON value (:class:`~flowpin.errors.JSONSyntaxError`: malformed,
  truncated, trailing data, an integer of more than 4300 digits).

Every error is a :class:`~flowpin.errors.StrictJSONError` carrying ``where`` and ``reason``; callers
re-raise it as their domain error (``ManifestParseError``, ``ShardError``...) with the fix, chained with
``from``. Purely internal pipes (a child process's JSON on its stdout) do not need this reader.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flowpin.errors import (
    JSONDuplicateKeyError,
    JSONEncodingError,
    JSONNonFiniteError,
    JSONSyntaxError,
    JSONTooDeepError,
    JSONTooLargeError,
)

DEFAULT_MAX_DEPTH = 64
"""Nesting bound: the deepest document flowpin writes (a manifest, a checkpoint's state.json) is about 10
levels deep; 64 leaves room for recipes nested by hand and stays far below Python's recursion limit."""

# A JSON string: the "unrolled loop" form of "(?:[^"\\]|\\.)*+" (same matches, several times faster on long text).
_STRINGS = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NonFinite(ValueError):
    pass


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key given twice (Python keeps the last one, other parsers the first)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _refuse_constant(token: str) -> Any:
    raise _NonFinite(token)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def nesting_depth(data: bytes, limit: int) -> int:
    """The deepest array/object nesting of JSON ``data`` (strings skipped), counting stops above ``limit``."""
    brackets = _STRINGS.sub(b"", data).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for char in brackets:
        if char in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def loads_strict(data: bytes, *, where: str, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Parse ``data`` as one strict JSON value (see the module docstring); ``where`` names it in errors."""
    if len(data) > max_bytes:
        raise JSONTooLargeError(where, f"{len(data)} bytes, more than the {max_bytes} bytes allowed for it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONEncodingError(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    # Fewer brackets than the bound cannot nest deeper than it: only then are strings worth skipping.
    if len(data.translate(None, _NOT_BRACKETS)) > max_depth and nesting_depth(data, max_depth) > max_depth:
        raise JSONTooDeepError(where, f"arrays/objects nested more than {max_depth} deep, deeper than it can be")
    try:
        return json.loads(
            text, object_pairs_hook=unique_keys, parse_constant=_refuse_constant, parse_float=_finite_float
        )
    except _DuplicateKey as exc:
        raise JSONDuplicateKeyError(
            where, f"an object repeats the key {exc.key!r} (JSON parsers disagree on which one counts)", key=exc.key
        ) from exc
    except _NonFinite as exc:
        raise JSONNonFiniteError(
            where, f"holds the non-finite number {exc.args[0]} (NaN/Infinity are not JSON)"
        ) from exc
    except json.JSONDecodeError as exc:
        hint = "truncated?" if exc.pos >= len(text.rstrip()) - 1 else "malformed"
        raise JSONSyntaxError(
            where, f"invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}; {hint})"
        ) from exc
    except (ValueError, RecursionError) as exc:  # an integer of more than 4300 digits; depth is bounded above
        raise JSONSyntaxError(where, f"not JSON flowpin can read ({exc})") from exc


__all__ = ["DEFAULT_MAX_DEPTH", "loads_strict", "nesting_depth", "unique_keys"]
