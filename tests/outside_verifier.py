"""An outside verifier of flowpin's digests, written independently of flowpin: hashlib, zstandard and rfc8785
only (README "Digest rules"). Used by tests/manifest/test_interop_digests.py and tests/data/test_flow.py to
re-derive every digest a manifest records from the files alone."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import rfc8785
import zstandard

# --- the published rules, written independently of flowpin (README "Digest rules", manifest/digests.py) ---


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _content_sha256(path: Path) -> str:
    """flowpin's content rule for one file: a .zst file by its decompressed bytes."""
    data = path.read_bytes()
    if path.name.endswith(".zst"):
        data = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
    return hashlib.sha256(data).hexdigest()


def _tree(directory: Path, per_file: Any, listed: list[str] | None = None) -> str:
    """`find . -type f | cut -c3- | LC_ALL=C sort | xargs sha256sum | sha256sum`, with ``per_file`` per file;
    a file set applies the same rule to its listed files only."""
    found = listed if listed is not None else [p.relative_to(directory).as_posix() for p in directory.rglob("*")]
    rels = sorted((r for r in found if (directory / r).is_file()), key=str.encode)
    return hashlib.sha256("".join(f"{per_file(directory / rel)}  {rel}\n" for rel in rels).encode()).hexdigest()


def rederive(root: Path, entry: dict[str, Any], manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every key of ``entry``'s digest set, recomputed from the files by the published rules."""
    path = root / entry["name"]
    listed = list(entry["annotations"]["flowpin.files"]) if entry["annotations"]["flowpin.type"] == "fileset" else None
    out: dict[str, str] = {}
    for key in entry["digest"]:
        if key == "sha256":
            out[key] = _file_sha256(path)
        elif key == "dirHash":
            out[key] = _tree(path, _file_sha256, listed)
        elif key == "flowpinSha256":
            out[key] = _tree(path, _content_sha256, listed) if path.is_dir() else _content_sha256(path)
        elif key == "flowpinSubjectsSha256":
            out[key] = hashlib.sha256(rfc8785.dumps(manifests[entry["name"]]["subject"])).hexdigest()
        else:
            raise AssertionError(f"no published rule for digest {key!r}")
    return out


def statement_of(path: Path) -> dict[str, Any]:
    envelope = json.loads(path.read_text())
    return json.loads(base64.b64decode(envelope["payload"]))  # type: ignore[no-any-return]
