"""The safetensors file format, checked strictly before any byte reaches the safetensors library.

A safetensors file is ``N`` (8 bytes, little-endian unsigned), then an ``N``-byte UTF-8 JSON object
(the header), then the data region. The header maps each tensor name to exactly
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data region) and may hold
``"__metadata__"``, a str → str object. This module owns the rules flowpin holds every such file to
(checkpoints, tokenized shards), stricter than the library, so that a crafted file is refused with a
:class:`~flowpin.errors.TensorFileError` naming the file, the tensor and the fix:

* ``N`` is at most :data:`MAX_HEADER_BYTES` and at most the file size - 8;
* the header is UTF-8, starts with ``{`` and is one JSON object read by flowpin's strict JSON reader
  (:func:`flowpin.jsonio.loads_strict`: no duplicate key at any depth, no ``NaN``/``Infinity``, bounded
  nesting);
* every ``dtype`` is one of :data:`DTYPE_SIZES`; every ``shape`` a list of non-negative integers (not
  booleans, not floats); every ``data_offsets`` two integers with
  ``end - begin == prod(shape) * itemsize``;
* the tensors, sorted by offsets, tile the data region exactly: the first starts at 0, each starts where
  the previous one ends (no overlap, no gap) and the last ends at the end of the file (no trailing bytes).

Pure: takes bytes, returns the parsed header; reading the file is the caller's business.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping

from flowpin.errors import JSONDuplicateKeyError, JSONEncodingError, StrictJSONError, TensorFileError
from flowpin.jsonio import loads_strict

MAX_HEADER_BYTES = 100_000_000
"""Largest header accepted (the safetensors library's own limit)."""
METADATA_KEY = "__metadata__"

DTYPE_SIZES: Mapping[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
"""Bytes per element of every dtype flowpin reads (those the safetensors torch and numpy loaders map)."""

_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
DEFAULT_FIX = "the file is corrupt or was crafted; restore it or regenerate it by re-running the stage that wrote it"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """One tensor as the header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Offset of the first byte in the data region."""
    end: int
    """Offset one past the last byte in the data region."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetensorsHeader:
    """A validated header: the tensors by name, the metadata and where the data region starts."""

    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]
    data_start: int
    """Offset of the data region in the file (8 + header length)."""


def validate_safetensors(data: bytes, *, where: str, fix: str = DEFAULT_FIX) -> SafetensorsHeader:
    """Check ``data`` (a whole safetensors file) against the rules in the module docstring.

    ``where`` names the file in messages; ``fix`` says what to do about it. Raises
    :class:`~flowpin.errors.TensorFileError` on the first violation.
    """

    def bad(what: str, tensor: str | None = None) -> TensorFileError:
        at = f"tensor {tensor!r}: " if tensor is not None else ""
        return TensorFileError(f"{where} is not a valid safetensors file: {at}{what}; {fix}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise bad(f"header length {n} is above the limit of {MAX_HEADER_BYTES} bytes")
    if n > len(data) - 8:
        raise bad(f"header length {n} runs past the end of the file ({len(data) - 8} bytes follow the length)")
    raw = data[8 : 8 + n]
    if not raw.startswith(b"{"):
        raise bad("header does not start with '{' (not a JSON object)")
    try:
        header = loads_strict(raw, where=where, max_bytes=MAX_HEADER_BYTES)
    except JSONEncodingError as exc:
        raise bad(f"header is {exc.reason}") from exc
    except JSONDuplicateKeyError as exc:
        raise bad(f"header repeats the key {exc.key!r}") from exc
    except StrictJSONError as exc:  # malformed, NaN/Infinity, nested too deep
        raise bad(f"header is not valid JSON ({exc.reason})") from exc
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad(f"{METADATA_KEY} must be an object of strings, got {json.dumps(metadata)[:200]}")
    tensors = {name: _entry(name, value, bad) for name, value in header.items()}
    data_size = len(data) - 8 - n
    expected = 0
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end, kv[0])):
        if entry.begin < expected:
            raise bad(
                f"data_offsets [{entry.begin}, {entry.end}] overlap the previous tensor (ends at {expected})", name
            )
        if entry.begin > expected:
            raise bad(f"data_offsets [{entry.begin}, {entry.end}] leave a gap of unused bytes after {expected}", name)
        if entry.end > data_size:
            raise bad(f"data_offsets [{entry.begin}, {entry.end}] run past the data region ({data_size} bytes)", name)
        expected = entry.end
    if expected != data_size:
        raise bad(f"{data_size - expected} trailing bytes after the last tensor (data region is {data_size} bytes)")
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=8 + n)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, value: object, bad: Callable[[str, str], TensorFileError]) -> TensorEntry:
    if not isinstance(value, dict):
        raise bad(f"entry is a JSON {type(value).__name__}, not an object", name)
    if set(value) != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - set(value)), sorted(set(value) - _ENTRY_KEYS)
        raise bad(f"entry must have exactly dtype, shape, data_offsets (missing {missing}, unexpected {extra})", name)
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"dtype {dtype!r} is not one of {', '.join(DTYPE_SIZES)}", name)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] with non-negative integers", name)
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin", name)
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise bad(f"data_offsets [{begin}, {end}] span {end - begin} bytes, but {dtype}{shape} needs {nbytes}", name)
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)
