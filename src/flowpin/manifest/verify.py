"""``flowpin verify``: schema → signature → trusted key → re-hash every subject and dependency.

Verification never stops at the first bad artifact: it returns every finding, each a named
:class:`FlowpinError` tied to the artifact it concerns, so the CLI can list them all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin.errors import (
    ArtifactMissingError,
    DigestMismatchError,
    FlowpinError,
    ManifestError,
    ManifestParseError,
)
from flowpin.hashing import ArtifactDigest, Hasher
from flowpin.manifest.model import MANIFEST_DIR, Manifest, load_manifest
from flowpin.manifest.resolve import fileset_base
from flowpin.paths import resolve_inside
from flowpin.signing import verify_envelope


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
    if manifest.algorithm != hasher.algorithm:
        hasher = Hasher(root, manifest.algorithm, cache=hasher.cache, workers=hasher.workers)
    report.findings.extend(check_subjects(manifest, root, hasher))
    report.checked = len(manifest.subjects) + len(manifest.dependencies)
    return report


def check_subjects(manifest: Manifest, root: Path, hasher: Hasher) -> list[Finding]:
    """Re-hash subjects and dependencies; one finding per artifact that is missing or differs."""
    findings: list[Finding] = []
    in_repo = [s for s in manifest.subjects] + [
        d for d in manifest.dependencies if d["annotations"]["flowpin.type"] not in ("fileset", "manifest")
    ]
    actual = hasher.digest_all([e["name"] for e in in_repo])
    for entry in in_repo:
        _compare(entry, actual[entry["name"]], hasher.algorithm, findings)
    for dep in manifest.dependencies:
        kind = dep["annotations"]["flowpin.type"]
        if kind == "manifest":
            findings.extend(_check_parent(dep, root, hasher.algorithm))
            continue
        if kind != "fileset":
            continue
        result: ArtifactDigest | FlowpinError
        try:
            base = fileset_base(dep, root)
            files = list(dep["annotations"].get("flowpin.files", {}))
            result = hasher.digest_fileset(dep["name"], base, files)
        except FlowpinError as exc:
            result = exc
        _compare(dep, result, hasher.algorithm, findings)
    return findings


def _check_parent(dep: dict[str, Any], root: Path, algorithm: str) -> list[Finding]:
    """A parent manifest must still exist and still pin the outputs this manifest consumed."""
    name = dep["name"]
    try:
        parent = load_manifest(resolve_inside(name, root))
    except FlowpinError as exc:
        missing = ArtifactMissingError(f"parent manifest cannot be read ({exc}); restore it or re-run {name}'s stage")
        return [Finding(name, missing if isinstance(exc, ManifestParseError) else exc)]
    pinned = dep["digest"].get(algorithm)
    actual = parent.outputs_digest(algorithm)
    if pinned == actual:
        return []
    return [
        Finding(
            name,
            DigestMismatchError(
                f"parent outputs digest is {actual[:16]}…, this manifest pins {pinned and pinned[:16]}…: the upstream "
                "stage now records different outputs — re-run this stage (dvc repro)"
            ),
        )
    ]


def _compare(entry: dict[str, Any], actual: ArtifactDigest | FlowpinError, algorithm: str, out: list[Finding]) -> None:
    name = entry["name"]
    if isinstance(actual, FlowpinError):
        out.append(Finding(name, actual))
        return
    pinned = entry["digest"].get(algorithm)
    if pinned is None:
        out.append(Finding(name, ManifestError(f"no {algorithm} digest pinned for {name}")))
        return
    if pinned == actual.digest:
        return
    detail = _file_changes(entry["annotations"].get("flowpin.files", {}), actual)
    out.append(
        Finding(
            name,
            DigestMismatchError(
                f"{algorithm} is {actual.digest[:16]}…, manifest pins {pinned[:16]}…{detail}; "
                "the artifact changed since it was recorded — restore it (dvc checkout) or re-run the stage"
            ),
        )
    )


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
