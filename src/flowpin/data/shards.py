"""Deterministic zstd-compressed JSONL shards: the on-disk form of every document corpus.

A shard ``shard-NNNNN.jsonl.zst`` is exactly one zstd frame whose content is one
``canonical_json(record) + b"\\n"`` line per record. The frame declares its content size and carries a
content checksum. This module owns writing shards byte-reproducibly and reading them back with bounded
memory; what the records mean belongs to the stage that writes them.

Identity is the *uncompressed* content: :class:`ShardInfo` pins the SHA-256 of the JSONL bytes, never of
the ``.zst`` file, because compressed bytes depend on the zstd library version, level and API used
(see FACTS: one-shot, streaming and multi-threaded compression give different bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import zstandard

from flowpin.atomic import atomic_open, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import INDEX_NAME
from flowpin.errors import InternalError, ShardError, StrictJSONError
from flowpin.failpoints import failpoint
from flowpin.jsonio import loads_strict
from flowpin.recipe import check_int
from flowpin.safeio import open_regular, read_regular

SHARD_SUFFIX = ".jsonl.zst"
"""File name suffix of every shard."""
SHARD_PREFIX = "shard-"
"""File name prefix of every shard; the index follows as five zero-padded digits."""
DEFAULT_MAX_CONTENT_SIZE = 1 << 30
"""Default cap on a shard's declared uncompressed size when reading (1 GiB)."""
MAX_SHARDS = 100_000
"""Shard indices are written with five digits."""

_SHARD_NAME = re.compile(r"shard-\d{5}\.jsonl\.zst")
_REWRITE = "restore it (dvc checkout) or re-run the stage that wrote it"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """What the writer pins about one shard."""

    name: str
    """File name inside the output directory, e.g. ``shard-00000.jsonl.zst``."""
    records: int
    """Number of records (lines) in the shard."""
    uncompressed_bytes: int
    """Length of the JSONL content before compression."""
    sha256: str
    """Lower-case hex SHA-256 of the uncompressed JSONL content."""

    def to_json(self) -> dict[str, Any]:
        """A canonical-JSON-safe dict of this info (for ``index.json``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """How a stage cuts its JSONL dataset into shards (the ``shards`` block of a data stage's recipe)."""

    docs_per_shard: int
    """Most documents (records) in one shard."""
    zstd_level: int
    """zstd compression level, 1..22 (shards are compressed one-shot, single-threaded)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.docs_per_shard, f"{where}.docs_per_shard", minimum=1)
        check_int(self.zstd_level, f"{where}.zstd_level", minimum=1, maximum=zstandard.MAX_COMPRESSION_LEVEL)


def shard_name(index: int) -> str:
    """The file name of shard number ``index``."""
    if not 0 <= index < MAX_SHARDS:
        raise InternalError(f"shard_name: shard index {index} is outside 0..{MAX_SHARDS - 1}")
    return f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def write_shards(
    records: Iterable[Mapping[str, Any]],
    out_dir: Path,
    *,
    docs_per_shard: int,
    level: int,
) -> list[ShardInfo]:
    """Write ``records`` to ``out_dir/shard-00000.jsonl.zst``, ... and return one :class:`ShardInfo` each.

    Records are consumed lazily; at most ``docs_per_shard`` are held in memory at a time. Each shard is
    published with :func:`~flowpin.atomic.atomic_open`. No shard is written for zero records. ``out_dir``
    must not already hold shards (a stale ``shard-00009`` from a larger earlier run would otherwise sit
    next to the new ones unlisted). An exception from ``records`` propagates after the shards written so
    far were published: callers that need all-or-nothing wrap ``out_dir`` in ``atomic_directory``.
    """
    if docs_per_shard < 1:
        raise InternalError(f"write_shards: docs_per_shard must be >= 1, got {docs_per_shard}")
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise InternalError(f"write_shards: zstd level must be in 1..{zstandard.MAX_COMPRESSION_LEVEL}, got {level}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out_dir.iterdir() if _SHARD_NAME.fullmatch(p.name))
    if stale:
        raise ShardError(
            f"{out_dir} already holds shards ({', '.join(stale[:3])}...); write shards into an empty "
            "directory (wrap the stage output in atomic_directory)"
        )
    infos: list[ShardInfo] = []
    lines: list[bytes] = []
    for record in records:
        lines.append(canonical_json(record) + b"\n")
        if len(lines) == docs_per_shard:
            infos.append(_write_one(out_dir, len(infos), lines, level))
            lines = []
    if lines:
        infos.append(_write_one(out_dir, len(infos), lines, level))
    return infos


def compress_frame(data: bytes, level: int) -> bytes:
    """``data`` as one zstd frame in the reproducible form (every ``.zst`` file flowpin writes).

    One-shot ``compress()`` on a single-threaded compressor (threads left at its default 0): the same bytes
    at the same level give the same frame on every run, whereas multi-threaded (threads>=1) and
    streaming/compressobj APIs produce *different* (equally valid) bytes. ``write_content_size`` lets
    readers bound decompression before allocating; the checksum lets them detect corruption. Pins still
    use the SHA-256 of the uncompressed ``data``.
    """
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(data)


def _write_one(out_dir: Path, index: int, lines: list[bytes], level: int) -> ShardInfo:
    data = b"".join(lines)
    frame = compress_frame(data, level)
    name = shard_name(index)
    failpoint("shards.before-shard", str(out_dir / name))
    with atomic_open(out_dir / name) as fh:
        fh.write(frame)
    return ShardInfo(
        name=name,
        records=len(lines),
        uncompressed_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def read_shard_bytes(
    path: Path,
    *,
    max_content_size: int = DEFAULT_MAX_CONTENT_SIZE,
    expected_sha256: str | None = None,
) -> bytes:
    """Decompress one shard with bounded memory and return its uncompressed JSONL bytes.

    The frame must declare its content size and that size must be at most ``max_content_size``;
    otherwise (and on corrupt or truncated data, trailing data after the frame, or a SHA-256 of the
    content other than ``expected_sha256``) :class:`ShardError` names the file.
    """
    if max_content_size < 0:
        raise InternalError(f"read_shard_bytes: max_content_size must be >= 0, got {max_content_size}")
    # zstd never expands incompressible input by more than ~1/256 plus a small header; a larger file
    # cannot be a frame within the cap, so do not even read it into memory.
    max_file_size = max_content_size + (max_content_size >> 7) + (1 << 17)
    try:
        with open_regular(path, max_bytes=None, what="shard", fix=_REWRITE) as f:  # never a FIFO or a device
            frame = os.read(f.fd, min(f.size, max_file_size) + 1)
    except OSError as exc:
        raise ShardError(
            f"cannot read shard {path}: {exc.strerror or exc}; check that it exists and is readable"
        ) from exc
    if len(frame) > max_file_size:
        raise ShardError(
            f"shard {path} is larger than any zstd frame of at most {max_content_size} bytes could be; "
            "raise max_content_size if the shard is trusted"
        )
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise ShardError(f"shard {path} does not start with a zstd frame header ({exc}); {_REWRITE}") from exc
    size = params.content_size
    if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise ShardError(
            f"shard {path} does not declare its uncompressed size, so its decompression cannot be "
            "bounded; rewrite it with flowpin.data.shards.write_shards (one-shot, write_content_size=True)"
        )
    if size > max_content_size:
        raise ShardError(
            f"shard {path} declares {size} uncompressed bytes, above the cap of {max_content_size}; "
            f"{_REWRITE}, or raise max_content_size if the shard is trusted"
        )
    try:
        # The declared size was checked above, and the one-shot API decompresses into a buffer of
        # exactly that size, so a lying header cannot make it allocate more.
        data = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ShardError(f"shard {path} is corrupt or truncated ({exc}); {_REWRITE}") from exc
    if len(data) != size:
        raise ShardError(f"shard {path} decompressed to {len(data)} bytes but declares {size}; {_REWRITE}")
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ShardError(
                f"shard {path} content has sha256 {actual}, expected {expected_sha256}; "
                f"the shard was changed or replaced after it was pinned; {_REWRITE}"
            )
    return data


def read_shard(
    path: Path,
    *,
    max_content_size: int = DEFAULT_MAX_CONTENT_SIZE,
    expected_sha256: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the records (JSON objects) of one shard, in order.

    Decompression is bounded as in :func:`read_shard_bytes`. Each line is read by the strict JSON reader
    (:func:`flowpin.jsonio.loads_strict`): a line that is not UTF-8, not JSON, repeats a key, holds NaN or
    nests too deep, is not a JSON object, or a last line without its newline raises :class:`ShardError`
    naming the file and line number. Errors surface when iteration starts, not when this function is called.
    """
    data = read_shard_bytes(path, max_content_size=max_content_size, expected_sha256=expected_sha256)
    if not data:
        return
    if not data.endswith(b"\n"):
        raise ShardError(f"shard {path}: last line has no trailing newline, the shard is truncated; {_REWRITE}")
    # Split on b"\n" only: canonical JSON escapes control characters, but str.splitlines() would also
    # split on U+2028, U+0085 and friends, which may occur raw inside strings.
    for lineno, line in enumerate(data[:-1].split(b"\n"), start=1):
        try:  # flowpin's strict reader: a repeated key, NaN or deep nesting is refused, never guessed at
            obj = loads_strict(line, where=f"shard {path} line {lineno}", max_bytes=len(line))
        except StrictJSONError as exc:
            raise ShardError(f"shard {path} line {lineno} is not UTF-8 JSON ({exc.reason}); {_REWRITE}") from exc
        if not isinstance(obj, dict):
            raise ShardError(f"shard {path} line {lineno} is a JSON {type(obj).__name__}, not an object; {_REWRITE}")
        yield obj


INDEX_FORMAT = {"version": 1, "records": "jsonl", "compression": "zstd"}


def write_dataset(
    records: Iterable[Mapping[str, Any]],
    out_dir: Path,
    *,
    docs_per_shard: int,
    level: int,
    meta: Mapping[str, Any] | None = None,
) -> list[ShardInfo]:
    """Write ``records`` as shards plus ``index.json`` (``format``, ``shards``, and ``meta``'s keys).

    This is the layout every data stage reads and writes; :func:`read_dataset` reads it back.
    """
    infos = write_shards(records, out_dir, docs_per_shard=docs_per_shard, level=level)
    index: dict[str, Any] = {**(meta or {}), "format": INDEX_FORMAT, "shards": [i.to_json() for i in infos]}
    atomic_write_bytes(out_dir / INDEX_NAME, canonical_json(index) + b"\n")
    return infos


MAX_INDEX_BYTES = 64 << 20
"""Largest ``index.json`` read (one ~150-byte entry per shard)."""


def read_index(data_dir: Path) -> dict[str, Any]:
    """Load and sanity-check a dataset's ``index.json``."""
    path = data_dir / INDEX_NAME
    try:
        raw = read_regular(path, max_bytes=MAX_INDEX_BYTES, what="dataset index", fix="rerun the stage that writes it")
        index = loads_strict(raw, where=str(path), max_bytes=MAX_INDEX_BYTES)
    except FileNotFoundError as exc:
        raise ShardError(f"{path} is missing: {data_dir} is not a dataset; run the stage that writes it") from exc
    except (OSError, StrictJSONError) as exc:  # StrictJSONError: not JSON, a repeated key, NaN, nested too deep
        raise ShardError(f"{path} cannot be read as JSON ({exc}); rerun the stage that writes it") from exc
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and _SHARD_NAME.fullmatch(s["name"]) for s in shards
    ):
        raise ShardError(f"{path} has no valid 'shards' list; rerun the stage that writes it")
    return index  # type: ignore[no-any-return]


def read_dataset(data_dir: Path, *, max_content_size: int = DEFAULT_MAX_CONTENT_SIZE) -> Iterator[dict[str, Any]]:
    """Yield every record of a dataset directory in order, checking each shard against ``index.json``."""
    for shard in read_index(data_dir)["shards"]:
        declared = shard.get("uncompressed_bytes")
        if isinstance(declared, int) and not isinstance(declared, bool) and 0 <= declared < max_content_size:
            cap = declared  # what the index pins bounds decompression: a swapped shard cannot be larger
        else:
            cap = max_content_size
        yield from read_shard(data_dir / shard["name"], max_content_size=cap, expected_sha256=shard.get("sha256"))
