"""Digest sets: what each key of a manifest's ``digest`` object means, and which one flowpin compares.

An in-toto digest set maps an algorithm name to a value; a verifier outside flowpin hashes the artifact by
the name's published rule and compares. So every key here means exactly what its name says:

* ``sha256`` / ``blake3``: the hash of a single file's **bytes** (also for a ``.zst`` file: its compressed
  bytes, as ``sha256sum`` sees them).
* ``dirHash`` (in-toto's DigestSet v1): a directory or file set, by Go's directory Hash1 rule in lowercase
  hex — ``find . -type f | cut -c3- | LC_ALL=C sort | xargs -r sha256sum | sha256sum`` — over the files'
  bytes. Only with sha256 (the rule is sha256 by definition).
* ``flowpinSha256`` / ``flowpinBlake3``: flowpin's **content identity** (``hashing``'s rules: a ``.zst`` file by
  its decompressed content, directories by the directory rule over those digests). This is what diff,
  rebuild, lineage, the training data order and every other flowpin comparison use: it does not change with
  the zstd library's version or threading. For a directory without ``.zst`` files it has the same value as
  ``dirHash``; for a plain file, the same value as ``sha256``.
* ``flowpinSubjectsSha256`` / ``flowpinSubjectsBlake3``: on a parent-manifest dependency, the hash of the
  parent's canonical subject list (RFC 8785 JSON of ``subject``): what it produced, not its file.

A reader never picks "the first key" of a digest set: it asks :func:`pinned_identity` for flowpin's key.
"""

from __future__ import annotations

from typing import Any

from flowpin.errors import ManifestError, UnsupportedAlgorithmError
from flowpin.hashing import ArtifactDigest

DIRHASH = "dirHash"
IDENTITY_KEYS: dict[str, str] = {"sha256": "flowpinSha256", "blake3": "flowpinBlake3"}
SUBJECTS_KEYS: dict[str, str] = {"sha256": "flowpinSubjectsSha256", "blake3": "flowpinSubjectsBlake3"}
BYTES_KEYS: tuple[str, ...] = ("sha256", "blake3")
KNOWN_KEYS: frozenset[str] = frozenset({DIRHASH, *IDENTITY_KEYS.values(), *SUBJECTS_KEYS.values(), *BYTES_KEYS})


def identity_key(algorithm: str) -> str:
    """The digest-set key of flowpin's content identity under ``algorithm``."""
    try:
        return IDENTITY_KEYS[algorithm]
    except KeyError:
        raise UnsupportedAlgorithmError(
            f"digest algorithm {algorithm!r} is not supported; use one of {tuple(IDENTITY_KEYS)}"
        ) from None


def subjects_key(algorithm: str) -> str:
    """The digest-set key of a parent manifest's subject-list digest under ``algorithm``."""
    try:
        return SUBJECTS_KEYS[algorithm]
    except KeyError:
        raise UnsupportedAlgorithmError(
            f"digest algorithm {algorithm!r} is not supported; use one of {tuple(SUBJECTS_KEYS)}"
        ) from None


def is_manifest_entry(entry: dict[str, Any]) -> bool:
    return bool(entry.get("annotations", {}).get("flowpin.type") == "manifest")


def pinned_identity(entry: dict[str, Any], algorithm: str | None = None) -> tuple[str, str]:
    """``(algorithm, hex)`` of flowpin's identity digest in a subject, dependency or parent-manifest entry.

    With ``algorithm`` given, that algorithm's value (``ManifestError`` when it is not pinned); without, the
    first algorithm pinned in the order sha256, blake3.
    """
    keys = SUBJECTS_KEYS if is_manifest_entry(entry) else IDENTITY_KEYS
    digest = entry.get("digest") or {}
    wanted = (algorithm,) if algorithm is not None else tuple(keys)
    for algo in wanted:
        value = digest.get(keys.get(algo, ""))
        if isinstance(value, str):
            return algo, value
    name = entry.get("name", "?")
    want = " or ".join(keys[a] for a in wanted if a in keys) or repr(algorithm)
    raise ManifestError(
        f"{name!r}: no {want} digest pinned (has {sorted(digest)}); the manifest was not written by this flowpin "
        "-- re-run its stage to record it"
    )


def identity_value(entry: dict[str, Any], algorithm: str) -> str | None:
    """flowpin's identity digest of ``entry`` under ``algorithm``, or None when not pinned."""
    keys = SUBJECTS_KEYS if is_manifest_entry(entry) else IDENTITY_KEYS
    value = (entry.get("digest") or {}).get(keys.get(algorithm, ""))
    return value if isinstance(value, str) else None


def identity_view(entry: dict[str, Any]) -> dict[str, str]:
    """The flowpin identity keys of ``entry``'s digest set (what comparisons use)."""
    keys = set((SUBJECTS_KEYS if is_manifest_entry(entry) else IDENTITY_KEYS).values())
    return {k: v for k, v in (entry.get("digest") or {}).items() if k in keys}


def short(entry: dict[str, Any], width: int = 16) -> str:
    """``algo:hex…`` of the identity digest, for human output."""
    try:
        algo, value = pinned_identity(entry)
    except ManifestError:
        return "(no flowpin digest)"
    return f"{algo}:{value[:width]}…"


def digest_set(d: ArtifactDigest) -> dict[str, str]:
    """The digest set flowpin writes for a digested artifact (see the module docstring)."""
    out = {identity_key(d.algorithm): d.digest}
    if d.kind == "file":
        out[d.algorithm] = d.raw or d.digest
    elif d.algorithm == "sha256":
        out[DIRHASH] = d.raw or d.digest
    return out
