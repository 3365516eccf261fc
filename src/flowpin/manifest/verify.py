"""``flowpin verify``: schema → signature → trusted key → re-hash every subject and dependency.

Verification never stops at the first bad artifact: it returns every finding, each a named
:class:`FlowpinError` tied to the artifact it concerns, so the CLI can list them all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin.canonical import canonical_json
from flowpin.constants import MANIFEST_DIR
from flowpin.errors import (
    ArtifactMissingError,
    DigestMismatchError,
    FlowpinError,
    ManifestError,
    ManifestParseError,
    UnsupportedAlgorithmError,
)
from flowpin.hashing import ArtifactDigest, Hasher, hash_bytes
from flowpin.manifest.digests import BYTES_KEYS, DIRHASH, IDENTITY_KEYS, SUBJECTS_KEYS
from flowpin.manifest.resolve import fileset_base
from flowpin.manifest.statement import Manifest, entry_files, entry_type, load_manifest
from flowpin.paths import resolve_inside
from flowpin.signing import decode_b64, verify_envelope


@dataclasses.dataclass(frozen=True)
class Finding:
    artifact: str
    """The artifact (or the manifest itself) that failed."""
    error: FlowpinError

    def __str__(self) -> str:
        return f"{self.artifact}: {type(self.error).__name__}: {self.error}"


@dataclasses.dataclass
class VerifyReport:
    manifest: Path
    stage: str | None = None
    keyid: str | None = None
    checked: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


def find_manifests(root: Path) -> list[Path]:
    """Every manifest under ``manifests/`` (recursively), sorted."""
    base = root / MANIFEST_DIR
    return sorted(p for p in base.rglob("*.json") if p.is_file()) if base.is_dir() else []


def verify_manifest(path: Path, *, root: Path, trusted: dict[str, Ed25519PublicKey], hasher: Hasher) -> VerifyReport:
    report = VerifyReport(manifest=path)
    try:
        manifest = load_manifest(path)
        report.stage = manifest.stage
        report.keyid = verify_envelope(manifest.envelope, trusted, str(path))
    except FlowpinError as exc:
        report.findings.append(Finding(str(path), exc))
        return report
    report.findings.extend(check_notes(manifest))
    report.findings.extend(check_subjects(manifest, root, hasher))
    report.checked = len(manifest.subjects) + len(manifest.dependencies)
    return report


def check_subjects(manifest: Manifest, root: Path, hasher: Hasher) -> list[Finding]:
    """Re-hash subjects and dependencies; one finding per artifact that is missing or differs.

    Every key of every digest set is checked (:mod:`flowpin.manifest.digests` says what each means): a set
    whose ``sha256`` matches cannot hide a wrong ``blake3`` beside it. A key flowpin cannot compute is refused
    (``UnsupportedAlgorithmError``), never skipped.
    """
    findings: list[Finding] = []
    needs: dict[str, set[str]] = {}  # entry name -> the algorithms its own digest set takes
    usable: list[dict[str, Any]] = []
    for entry in [*manifest.subjects, *manifest.dependencies]:
        if entry_type(entry) == "manifest":
            continue
        try:
            needs[entry["name"]] = _algorithms_needed(entry)
            usable.append(entry)
        except FlowpinError as exc:
            findings.append(Finding(entry["name"], exc))
    actual: dict[str, dict[str, ArtifactDigest | FlowpinError]] = {e["name"]: {} for e in usable}
    for algorithm in sorted(set().union(*needs.values())):
        by = (
            hasher
            if algorithm == hasher.algorithm
            else Hasher(root, algorithm, cache=hasher.cache, workers=hasher.workers)
        )
        wanted = [e for e in usable if algorithm in needs[e["name"]]]  # each artifact hashed only as it needs
        in_repo = [e["name"] for e in wanted if entry_type(e) != "fileset"]
        for name, result in by.digest_all(in_repo).items():
            actual[name][algorithm] = result
        for dep in (e for e in wanted if entry_type(e) == "fileset"):
            try:
                files = list(entry_files(dep))
                actual[dep["name"]][algorithm] = by.digest_fileset(dep["name"], fileset_base(dep, root), files)
            except FlowpinError as exc:
                actual[dep["name"]][algorithm] = exc
    for entry in usable:
        _compare(entry, actual[entry["name"]], findings)
    for dep in manifest.dependencies:
        if entry_type(dep) == "manifest":
            findings.extend(_check_parent(dep, root))
    return findings


def _algorithms_needed(entry: dict[str, Any]) -> set[str]:
    """The hash algorithms that re-deriving ``entry``'s digest set takes; refuses keys flowpin cannot check."""
    kind = entry_type(entry)
    needed: set[str] = set()
    for key in entry["digest"]:
        if key in IDENTITY_KEYS.values():
            needed.add(next(a for a, k in IDENTITY_KEYS.items() if k == key))
        elif key in BYTES_KEYS and kind == "file":
            needed.add(key)
        elif key == DIRHASH and kind in ("directory", "fileset"):
            needed.add("sha256")
        else:
            raise UnsupportedAlgorithmError(
                f"digest {key!r} cannot be checked on a {kind} by this flowpin (it checks "
                f"{sorted(IDENTITY_KEYS.values())} on every artifact, {list(BYTES_KEYS)} on files and {DIRHASH!r} on "
                "directories); a digest nobody checks proves nothing -- re-record the manifest with its stage"
            )
    if not any(key in IDENTITY_KEYS.values() for key in entry["digest"]):
        raise ManifestError(
            f"no flowpin identity digest ({' or '.join(IDENTITY_KEYS.values())}) pinned for {entry['name']}; "
            "the manifest was not written by this flowpin -- re-run its stage"
        )
    return needed


def _check_parent(dep: dict[str, Any], root: Path) -> list[Finding]:
    """A parent manifest must still exist and still pin the outputs this manifest consumed."""
    name = dep["name"]
    try:
        parent = load_manifest(resolve_inside(name, root))
    except FlowpinError as exc:
        missing = ArtifactMissingError(f"parent manifest cannot be read ({exc}); restore it or re-run {name}'s stage")
        return [Finding(name, missing if isinstance(exc, ManifestParseError) else exc)]
    findings: list[Finding] = []
    for key, pinned in dep["digest"].items():
        algorithm = next((a for a, k in SUBJECTS_KEYS.items() if k == key), None)
        if algorithm is None:
            findings.append(
                Finding(
                    name,
                    UnsupportedAlgorithmError(
                        f"a parent manifest is pinned by {' or '.join(SUBJECTS_KEYS.values())}, not {key!r}; "
                        "re-record the manifest with its stage"
                    ),
                )
            )
            continue
        actual = parent.outputs_digest(algorithm)
        if pinned != actual:
            findings.append(
                Finding(
                    name,
                    DigestMismatchError(
                        f"parent outputs digest ({key}) is {actual[:16]}…, this manifest pins {pinned[:16]}…: the "
                        "upstream stage now records different outputs — re-run this stage (dvc repro)"
                    ),
                )
            )
    return findings


def _compare(entry: dict[str, Any], actual: dict[str, ArtifactDigest | FlowpinError], out: list[Finding]) -> None:
    """Compare every key of ``entry``'s digest set with what was computed (``actual``: algorithm → digest)."""
    name = entry["name"]
    errors = [a for a in actual.values() if isinstance(a, FlowpinError)]
    if errors:
        out.append(Finding(name, errors[0]))
        return
    for key, pinned in sorted(entry["digest"].items()):
        if key in IDENTITY_KEYS.values():
            algorithm = next(a for a, k in IDENTITY_KEYS.items() if k == key)
            result = actual[algorithm]
            assert isinstance(result, ArtifactDigest)
            value = result.digest
        else:  # a bytes digest of a file, or dirHash of a directory (checked by _algorithms_needed)
            result = actual["sha256" if key == DIRHASH else key]
            assert isinstance(result, ArtifactDigest)
            value = result.raw
        if pinned == value:
            continue
        detail = _file_changes(entry_files(entry), result)
        out.append(
            Finding(
                name,
                DigestMismatchError(
                    f"{key} is {value[:16]}…, manifest pins {pinned[:16]}…{detail}; "
                    "the artifact changed since it was recorded — restore it (dvc checkout) or re-run the stage"
                ),
            )
        )
        return


def check_notes(manifest: Manifest) -> list[Finding]:
    """Byproducts that carry their ``content`` inline (run context, tracking, sweep job): its digest must be the
    sha256 of the content, and the content the canonical JSON of the annotations shown beside it."""
    findings: list[Finding] = []
    for bp in manifest.byproducts:
        if "content" not in bp:
            continue
        name = f"byproduct {bp['name']}"
        try:
            body = decode_b64(bp["content"], name)
        except FlowpinError as exc:
            findings.append(Finding(name, exc))
            continue
        for key, pinned in (bp.get("digest") or {}).items():
            if key not in BYTES_KEYS or hash_bytes(body, key) != pinned:
                findings.append(Finding(name, DigestMismatchError(f"{key} does not match its inline content")))
        if "annotations" in bp and canonical_json(bp["annotations"]) != body:
            findings.append(
                Finding(name, DigestMismatchError("annotations differ from the signed inline content they repeat"))
            )
    return findings


def _file_changes(pinned_files: dict[str, str], actual: ArtifactDigest) -> str:
    if not pinned_files and not actual.files:
        return ""
    old = pinned_files
    new = {f.path: f.digest for f in actual.files}
    changed = sorted(p for p in old.keys() & new.keys() if old[p] != new[p])
    parts = []
    for label, paths in (
        ("changed", changed),
        ("added", sorted(new.keys() - old.keys())),
        ("removed", sorted(old.keys() - new.keys())),
    ):
        if paths:
            shown = ", ".join(paths[:5]) + (f" (+{len(paths) - 5} more)" if len(paths) > 5 else "")
            parts.append(f"{label}: {shown}")
    return " (" + "; ".join(parts) + ")" if parts else ""
