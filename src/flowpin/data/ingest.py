"""Stage 1, ingest: snapshot an offline corpus into deterministic zstd JSONL shards plus ``index.json``.

This module owns *which* documents a recipe selects and *what* each record says about where it came
from. Two source kinds exist, both read from the Python standard library that is on every machine:

* ``python_stdlib`` -- ``.py`` files under the stdlib root, chosen by glob include/exclude patterns
  matched against the POSIX path relative to that root. ``site-packages``, ``dist-packages`` and
  ``__pycache__`` directories are never walked, symlinks are never followed or read, and every walk
  error is raised rather than silently skipped.
* ``pydoc_topics`` -- the ``topics`` dict of ``pydoc_data/topics.py``, parsed from the file's bytes with
  :mod:`ast` (``ast.literal_eval`` of the assigned dict literal; the file is never imported or executed),
  one document per topic key.

Order is part of the output's identity: sources in recipe order, files sorted by relative POSIX path,
topics sorted by key. Records, shards and the index hold no absolute path, time or host name. Files
that a recipe's limits reject are either an error or skipped *and reported*, as the recipe says.

The shard format is :mod:`flowpin.data.shards`. :func:`run_ingest` writes into a directory its caller
owns; a failure can leave some shards behind, so the stage wraps that directory in
:func:`flowpin.atomic.atomic_directory`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import platform
import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import INDEX_NAME
from flowpin.data.shards import ShardConfig, ShardInfo, write_shards
from flowpin.errors import (
    CorpusTooLargeError,
    DataError,
    DocumentEncodingError,
    DocumentTooLargeError,
    EmptyCorpusError,
    RecipeError,
    SourceFormatError,
)
from flowpin.manifest.resolve import python_stdlib_root
from flowpin.recipe import check_choice, check_int, check_str

KINDS = ("python_stdlib", "pydoc_topics")
"""Source kinds this module can read."""
POLICIES = ("error", "skip")
"""What to do with a document that breaks a limit."""
TOPICS_PATH = "pydoc_data/topics.py"
"""Stdlib-relative path of the pydoc topics file."""
INDEX_VERSION = 1
"""Version of the ``index.json`` layout."""

_PRUNED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAX_SKIP_EXAMPLES = 10
_MAX_TOPICS_FILE_BYTES = 64 << 20

T = TypeVar("T")


# --- configs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One source of documents (``ingest.sources[i]``); validated by :class:`IngestConfig`."""

    name: str
    """Short unique name; prefixes every document id (``<name>/<path or topic>``). ``[A-Za-z0-9_.-]``."""
    kind: str
    """``python_stdlib`` (``.py`` files chosen by globs) or ``pydoc_topics`` (one doc per pydoc topic)."""
    license: str
    """License note recorded in every document of this source, e.g. ``PSF-2.0``."""
    include: tuple[str, ...] = ()
    """python_stdlib only: globs over stdlib-relative POSIX paths. ``*``/``?``/``[..]`` stay within one
    path segment, a whole ``**`` segment spans any number of them (``json/**``, ``**/*.py``, ``*.py`` =
    top level only). Every pattern must match at least one ``.py`` file."""
    exclude: tuple[str, ...] = ()
    """python_stdlib only: globs (same syntax); a file matching any of them is not selected."""
    max_docs: int | None = None
    """If more documents match, keep a random subset of this size (seeded by ``ingest.seed`` and the
    source name), still in sorted order. ``None`` keeps all."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_str(self.name, f"{where}.name")
        if not _SOURCE_NAME.fullmatch(self.name):
            raise RecipeError(
                f"{where}.name: {self.name!r} must start with a letter or digit and use only "
                "letters, digits, '_', '.', '-'"
            )
        check_choice(self.kind, KINDS, f"{where}.kind")
        check_str(self.license, f"{where}.license")
        for key, patterns in (("include", self.include), ("exclude", self.exclude)):
            if not isinstance(patterns, tuple):
                raise RecipeError(f"{where}.{key}: must be a list of glob patterns")
            for j, pattern in enumerate(patterns):
                check_str(pattern, f"{where}.{key}[{j}]")
                try:
                    glob_regex(pattern)
                except ValueError as exc:
                    raise RecipeError(f"{where}.{key}[{j}]: {exc}") from exc
        if self.kind == "python_stdlib" and not self.include:
            raise RecipeError(
                f"{where}.include: a python_stdlib source needs at least one include pattern, e.g. '**/*.py'"
            )
        if self.kind == "pydoc_topics" and (self.include or self.exclude):
            raise RecipeError(
                f"{where}.include/exclude: a pydoc_topics source takes every topic; remove the patterns "
                "(use max_docs to take a subset)"
            )
        if self.max_docs is not None:
            check_int(self.max_docs, f"{where}.max_docs", minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    """Caps on document and corpus size (``ingest.limits``); validated by :class:`IngestConfig`."""

    max_doc_bytes: int
    """Largest document, in bytes (file size for code, UTF-8 length for topics)."""
    on_oversize: str
    """``error``: a document over ``max_doc_bytes`` fails the stage; ``skip``: it is left out and reported."""
    on_decode_error: str
    """``error``: bytes that are not UTF-8 fail the stage; ``skip``: the file is left out and reported."""
    max_total_bytes: int | None = None
    """Largest corpus (sum of document bytes); exceeding it fails the stage. ``None``: no cap."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.max_doc_bytes, f"{where}.max_doc_bytes", minimum=1)
        check_choice(self.on_oversize, POLICIES, f"{where}.on_oversize")
        check_choice(self.on_decode_error, POLICIES, f"{where}.on_decode_error")
        if self.max_total_bytes is not None:
            check_int(self.max_total_bytes, f"{where}.max_total_bytes", minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """The ingest recipe (``ingest`` in ``params/ingest.yaml``). Validated on construction."""

    sources: tuple[SourceConfig, ...]
    """Sources in output order; at least one, names unique."""
    limits: LimitsConfig
    """Per-document and total size caps and what to do with documents that break them."""
    shards: ShardConfig
    """Shard size and compression level."""
    seed: int
    """Seed for every random choice ingest makes (the ``max_docs`` subsets)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "ingest") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``ingest.limits.on_oversize`` ...)."""
        if not isinstance(self.sources, tuple) or not self.sources:
            raise RecipeError(f"{where}.sources: list at least one source")
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            if not isinstance(source, SourceConfig):
                raise RecipeError(f"{where}.sources[{i}]: expected a SourceConfig, got {type(source).__name__}")
            source.validate(f"{where}.sources[{i}]")
            if source.name in seen:
                raise RecipeError(
                    f"{where}.sources[{i}].name: {source.name!r} is already the name of "
                    f"{where}.sources[{seen[source.name]}]; source names must be unique"
                )
            seen[source.name] = i
        self.limits.validate(f"{where}.limits")
        self.shards.validate(f"{where}.shards")
        check_int(self.seed, f"{where}.seed", minimum=0)


# --- globs ----------------------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob (see :attr:`SourceConfig.include`) to a regex that must match a whole path.

    Raises ``ValueError`` for patterns that are absolute, use backslashes, contain ``..`` or empty
    segments, or use ``**`` inside a segment.
    """
    if not pattern:
        raise ValueError("empty pattern")
    if pattern.startswith("/"):
        raise ValueError(f"{pattern!r} is absolute; patterns are relative to the stdlib root")
    if "\\" in pattern:
        raise ValueError(f"{pattern!r} contains a backslash; use '/' between path segments")
    segments = pattern.split("/")
    out: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment in ("", ".", ".."):
            raise ValueError(f"{pattern!r} has an empty, '.' or '..' segment")
        if segment == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        if "**" in segment:
            raise ValueError(f"{pattern!r}: '**' must be a whole path segment (like 'a/**/b.py')")
        out.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(out), re.DOTALL)


def _segment_regex(segment: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = segment.find("]", i + 2 if segment[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = segment[i + 1 : end]
                negate = body.startswith("!")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


# --- running --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class IngestResult:
    """What :func:`run_ingest` did: counts, the stdlib it read, and the report (also in ``index.json``)."""

    documents: int
    """Documents written, over all sources."""
    total_bytes: int
    """Sum of the documents' UTF-8 byte lengths."""
    stdlib_root: Path
    """Absolute, resolved stdlib root that was read (an external input; never written to outputs)."""
    inputs_read: tuple[str, ...]
    """Sorted stdlib-relative POSIX paths of every file read, skipped ones and ``pydoc_data/topics.py``
    included: the stage's external dependencies."""
    shards: tuple[ShardInfo, ...]
    """The shards written, in order."""
    report: dict[str, Any]
    """Canonical-JSON-safe report: per source matched/selected/documents/bytes/skips, and totals."""


@dataclasses.dataclass(kw_only=True)
class _SourceStats:
    name: str
    kind: str
    origin: str
    license: str
    matched: int = 0
    selected: int = 0
    documents: int = 0
    bytes: int = 0
    empty_documents: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def skip(self, path: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < _MAX_SKIP_EXAMPLES:
            self.examples.append({"path": path, "reason": reason, "detail": detail})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "origin": self.origin,
            "license": self.license,
            "matched": self.matched,
            "selected": self.selected,
            "documents": self.documents,
            "bytes": self.bytes,
            "empty_documents": self.empty_documents,
            "skipped": {
                "count": sum(self.skipped.values()),
                "by_reason": dict(sorted(self.skipped.items())),
                "examples": list(self.examples),
            },
        }


@dataclasses.dataclass(kw_only=True)
class _Plan:
    """One source's selected items: stdlib-relative paths (code) or (key, text) pairs (topics)."""

    source: SourceConfig
    stats: _SourceStats
    paths: list[str] = dataclasses.field(default_factory=list)
    topics: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def default_stdlib_root() -> Path:
    """The running interpreter's standard library directory (``sysconfig`` ``stdlib`` path)."""
    return python_stdlib_root()


def run_ingest(
    cfg: IngestConfig,
    out_dir: Path,
    *,
    stdlib_root: Path | None = None,
    python_version: str | None = None,
) -> IngestResult:
    """Select, read and shard every source of ``cfg`` into ``out_dir`` and write ``out_dir/index.json``.

    ``stdlib_root`` defaults to :func:`default_stdlib_root`; ``python_version`` (recorded in each
    document's ``origin``) defaults to the running interpreter's ``X.Y.Z`` -- pass it when
    ``stdlib_root`` is another interpreter's tree. ``out_dir`` must hold no shards yet.
    """
    cfg.validate()
    root = (stdlib_root if stdlib_root is not None else default_stdlib_root()).resolve()
    if not root.is_dir():
        raise DataError(f"stdlib root {root} is not a directory; pass the root of a Python standard library")
    version = python_version if python_version is not None else platform.python_version()
    inputs: set[str] = set()
    listing: list[str] | None = None
    plans: list[_Plan] = []
    for i, source in enumerate(cfg.sources):
        where = f"ingest.sources[{i}]"
        if source.kind == "python_stdlib":
            if listing is None:
                listing = _list_py_files(root)
            plans.append(_plan_code(source, where, listing, root, version, cfg.seed))
        elif source.kind == "pydoc_topics":
            plans.append(_plan_topics(source, root, version, cfg.seed))
            inputs.add(TOPICS_PATH)
        else:  # unreachable after validate(); kept so a new kind cannot be silently ignored
            raise RecipeError(f"{where}.kind: {source.kind!r} is not one of {', '.join(KINDS)}")

    totals = {"documents": 0, "bytes": 0}
    records = _records(plans, root, cfg.limits, inputs, totals)
    shards = write_shards(records, out_dir, docs_per_shard=cfg.shards.docs_per_shard, level=cfg.shards.zstd_level)

    sources_report = [plan.stats.to_json() for plan in plans]
    if totals["documents"] == 0:
        summary = "; ".join(
            f"{s['name']}: matched {s['matched']}, selected {s['selected']}, skipped {s['skipped']['count']}"
            for s in sources_report
        )
        raise EmptyCorpusError(
            f"ingest.sources: the recipe selected no document ({summary}); widen the include patterns, "
            "narrow the excludes, or relax ingest.limits"
        )
    report: dict[str, Any] = {
        "sources": sources_report,
        "totals": {
            "documents": totals["documents"],
            "bytes": totals["bytes"],
            "skipped": sum(s["skipped"]["count"] for s in sources_report),
            "shards": len(shards),
        },
    }
    index = {
        "format": {"version": INDEX_VERSION, "records": "jsonl", "compression": "zstd"},
        "shards": [info.to_json() for info in shards],
        **report,
    }
    atomic_write_bytes(out_dir / INDEX_NAME, canonical_json(index))
    return IngestResult(
        documents=totals["documents"],
        total_bytes=totals["bytes"],
        stdlib_root=root,
        inputs_read=tuple(sorted(inputs)),
        shards=tuple(shards),
        report=report,
    )


def _list_py_files(root: Path) -> list[str]:
    """Every regular, non-symlink ``.py`` file under ``root`` as a sorted relative POSIX path."""

    def fail(exc: OSError) -> None:
        raise DataError(f"cannot list {exc.filename}: {exc.strerror or exc}; fix its permissions") from exc

    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = sorted(d for d in dirnames if d not in _PRUNED_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            full = Path(dirpath, filename)
            if full.is_symlink() or not full.is_file():
                continue
            found.append((rel_dir / filename).as_posix())
    return sorted(found)


def _subset(items: list[T], k: int | None, seed: int, source_name: str) -> list[T]:
    """A seeded random subset of ``k`` items, in the items' original order."""
    if k is None or len(items) <= k:
        return items
    digest = hashlib.sha256(f"flowpin.ingest.max_docs\0{seed}\0{source_name}".encode()).digest()
    # Not cryptographic: a reproducible choice. Random(int) seeding and sample() are stable across runs.
    rng = random.Random(int.from_bytes(digest[:8], "big"))  # noqa: S311
    chosen = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in chosen]


def _plan_code(source: SourceConfig, where: str, listing: list[str], root: Path, version: str, seed: int) -> _Plan:
    includes = [glob_regex(p) for p in source.include]
    excludes = [glob_regex(p) for p in source.exclude]
    for j, rx in enumerate(includes):
        if not any(rx.fullmatch(path) for path in listing):
            raise RecipeError(
                f"{where}.include[{j}]: {source.include[j]!r} matches no .py file under the stdlib root "
                f"{root}; fix the pattern or remove it"
            )
    matched = [
        path
        for path in listing
        if any(rx.fullmatch(path) for rx in includes) and not any(rx.fullmatch(path) for rx in excludes)
    ]
    stats = _SourceStats(name=source.name, kind=source.kind, origin=f"python-stdlib {version}", license=source.license)
    selected = _subset(matched, source.max_docs, seed, source.name)
    stats.matched, stats.selected = len(matched), len(selected)
    return _Plan(source=source, stats=stats, paths=selected)


def _plan_topics(source: SourceConfig, root: Path, version: str, seed: int) -> _Plan:
    topics = load_topics(root / TOPICS_PATH)
    items = sorted(topics.items())
    selected = _subset(items, source.max_docs, seed, source.name)
    stats = _SourceStats(
        name=source.name, kind=source.kind, origin=f"pydoc_data.topics {version}", license=source.license
    )
    stats.matched, stats.selected = len(items), len(selected)
    return _Plan(source=source, stats=stats, topics=selected)


def load_topics(path: Path) -> dict[str, str]:
    """Parse the ``topics`` dict literal of a ``pydoc_data/topics.py`` file without executing it."""
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_TOPICS_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        raise SourceFormatError(
            f"{path} does not exist; remove the pydoc_topics source or point stdlib_root at a full stdlib"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_TOPICS_FILE_BYTES:
        raise SourceFormatError(f"{path} is larger than {_MAX_TOPICS_FILE_BYTES} bytes; refusing to parse it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentEncodingError(
            f"{path} is not UTF-8 ({exc.reason} at byte {exc.start}); the topics file is parsed as a whole, "
            "so ingest.limits.on_decode_error cannot skip it -- remove the pydoc_topics source"
        ) from exc
    try:
        tree = ast.parse(text, filename=str(path))
    except (SyntaxError, ValueError) as exc:
        raise SourceFormatError(f"{path} is not valid Python: {exc}") from exc
    nodes = [value for value in map(_topics_value, tree.body) if value is not None]
    if len(nodes) != 1:
        raise SourceFormatError(
            f"{path}: expected exactly one module-level 'topics = {{...}}' assignment, found {len(nodes)}"
        )
    try:
        value = ast.literal_eval(nodes[0])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
        raise SourceFormatError(f"{path}: 'topics' is not a literal dict of strings ({exc})") from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise SourceFormatError(f"{path}: 'topics' must be a dict mapping non-empty str keys to str texts")
    return value


def _topics_value(stmt: ast.stmt) -> ast.expr | None:
    """The value assigned to the name ``topics`` by a module-level statement, if it is one."""
    if isinstance(stmt, ast.Assign):
        if any(isinstance(t, ast.Name) and t.id == "topics" for t in stmt.targets):
            return stmt.value
    elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == "topics":
        return stmt.value
    return None


def _records(
    plans: list[_Plan], root: Path, limits: LimitsConfig, inputs: set[str], totals: dict[str, int]
) -> Iterator[dict[str, Any]]:
    """Yield every admitted record in output order, updating stats, ``inputs`` and ``totals``."""
    for plan in plans:
        stats = plan.stats
        for suffix, path, text, raw in _admitted(plan, root, limits, inputs):
            totals["documents"] += 1
            totals["bytes"] += len(raw)
            if limits.max_total_bytes is not None and totals["bytes"] > limits.max_total_bytes:
                raise CorpusTooLargeError(
                    f"ingest.limits.max_total_bytes: the corpus reached {totals['bytes']} bytes at "
                    f"{stats.name}/{suffix}, above the cap of {limits.max_total_bytes}; raise the cap "
                    "or select fewer documents (include/exclude, max_docs)"
                )
            stats.documents += 1
            stats.bytes += len(raw)
            if not raw:
                stats.empty_documents += 1
            yield {
                "id": f"{stats.name}/{suffix}",
                "text": text,
                "source": {
                    "origin": stats.origin,
                    "path": path,
                    "license": stats.license,
                    "bytes": len(raw),
                    "sha256": hashlib.sha256(raw).hexdigest(),
                },
            }


def _admitted(plan: _Plan, root: Path, limits: LimitsConfig, inputs: set[str]) -> Iterator[tuple[str, str, str, bytes]]:
    """(id suffix, source path, text, UTF-8 bytes) of each document of ``plan`` that passes the limits."""
    for rel in plan.paths:
        doc = _read_code(root, rel, limits, plan.stats, inputs)
        if doc is not None:
            yield rel, rel, doc[0], doc[1]
    for key, text in plan.topics:
        path = f"{TOPICS_PATH}#{key}"
        doc = _admit_topic(path, text, limits, plan.stats)
        if doc is not None:
            yield key, path, doc[0], doc[1]


def _read_code(
    root: Path, rel: str, limits: LimitsConfig, stats: _SourceStats, inputs: set[str]
) -> tuple[str, bytes] | None:
    """Read one code file under the limits; ``None`` if the recipe says to skip it."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = rel.encode("utf-8", "backslashreplace").decode("utf-8")
        _decode_failure(shown, "file name is not UTF-8", limits, stats)
        return None
    path = root / rel
    try:
        with path.open("rb") as fh:
            raw = fh.read(limits.max_doc_bytes + 1)
            size = os.fstat(fh.fileno()).st_size if len(raw) > limits.max_doc_bytes else len(raw)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; fix its permissions or exclude it") from exc
    inputs.add(rel)
    if size > limits.max_doc_bytes:
        _oversize(rel, size, limits, stats)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _decode_failure(rel, f"{exc.reason} at byte {exc.start}", limits, stats)
        return None
    return text, raw


def _admit_topic(path: str, text: str, limits: LimitsConfig, stats: _SourceStats) -> tuple[str, bytes] | None:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate escaped in the literal
        _decode_failure(path, f"{exc.reason} at character {exc.start}", limits, stats)
        return None
    if len(raw) > limits.max_doc_bytes:
        _oversize(path, len(raw), limits, stats)
        return None
    return text, raw


def _oversize(path: str, size: int, limits: LimitsConfig, stats: _SourceStats) -> None:
    if limits.on_oversize == "error":
        raise DocumentTooLargeError(
            f"{path} (source {stats.name!r}) is {size} bytes, above ingest.limits.max_doc_bytes = "
            f"{limits.max_doc_bytes}; raise the cap, exclude the file, or set ingest.limits.on_oversize: skip"
        )
    stats.skip(path, "oversize", f"{size} bytes > max_doc_bytes {limits.max_doc_bytes}")


def _decode_failure(path: str, detail: str, limits: LimitsConfig, stats: _SourceStats) -> None:
    if limits.on_decode_error == "error":
        raise DocumentEncodingError(
            f"{path} (source {stats.name!r}) is not valid UTF-8 ({detail}); exclude the file or set "
            "ingest.limits.on_decode_error: skip"
        )
    stats.skip(path, "not_utf8", detail)
