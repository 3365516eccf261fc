"""Verified loading: the one way a command that *consumes* a manifest reads it.

A schema-valid manifest says nothing until its signature is checked: anyone can write one. Every consumer
that produces or judges something from a manifest (fork, rebuild, lineage, batch, a stage pinning its
parent, eval reading the decontamination record, release export) calls :func:`load_verified`, which runs
``flowpin verify``'s checks in its order:

1. schema (:func:`~flowpin.manifest.statement.load_manifest`; its named parse/schema errors propagate);
2. signature and trusted key (:func:`~flowpin.signing.verify_envelope` against ``keys/*.pub``), never skipped;
3. digests (:func:`~flowpin.manifest.verify.check_subjects`): ``check="all"`` re-hashes every subject and
   dependency (what ``flowpin verify`` does); a collection of names re-hashes only those entries -- the ones
   the consumer relies on (fork: the checkpoint it forks from); ``check="signature"`` none, for a consumer
   that checks the digests it relies on itself (rebuild re-hashes every input it copies) or relies on none.

A failure raises :class:`~flowpin.errors.UnverifiedManifestError` listing every finding (escaped: an
unverified manifest's strings are the attacker's) and how to fix it; nothing is written before it.

Pinned digests are read through :mod:`flowpin.manifest.digests` (:func:`pinned`, :func:`identity_digests`
and :func:`short_digest` are its accessors under the names consumers use).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin.display import safe
from flowpin.errors import FlowpinError, UnverifiedManifestError
from flowpin.hashing import Hasher
from flowpin.manifest import digests
from flowpin.manifest.statement import Manifest, load_manifest
from flowpin.manifest.verify import Finding, check_subjects
from flowpin.signing import TRUST_DIR, load_trust_store, verify_envelope

Check = Literal["all", "signature"] | Collection[str]
"""What :func:`load_verified` re-hashes: every entry, none, or the named subjects/dependencies."""

FIX_SIGNATURE = (
    f"restore the manifest from git or re-run its stage; if you trust its signer, add the signer's public key "
    f"to {TRUST_DIR}/ and check again with `flowpin verify`"
)
FIX_DIGESTS = (
    "restore the artifacts (dvc checkout, or dvc pull) or re-run the stage that produced them; "
    "`flowpin verify` lists every finding"
)


@dataclasses.dataclass(frozen=True)
class Verified:
    """A manifest that passed :func:`load_verified`, and the trusted key that signed it."""

    manifest: Manifest
    keyid: str


def load_verified(
    path: Path,
    *,
    root: Path,
    trusted: dict[str, Ed25519PublicKey] | None = None,
    hasher: Hasher | None = None,
    check: Check = "all",
    purpose: str = "use it",
) -> Manifest:
    """Load ``path`` and verify it (see the module docstring); ``purpose`` completes "refusing to …"."""
    return verify_loaded(path, root=root, trusted=trusted, hasher=hasher, check=check, purpose=purpose).manifest


def verify_loaded(
    path: Path,
    *,
    root: Path,
    trusted: dict[str, Ed25519PublicKey] | None = None,
    hasher: Hasher | None = None,
    check: Check = "all",
    purpose: str = "use it",
) -> Verified:
    """:func:`load_verified`, also returning the keyid that verified."""
    manifest = load_manifest(path)
    keyid = check_signature(manifest, load_trust_store(root) if trusted is None else trusted, purpose=purpose)
    if check != "signature":
        require_digests(manifest, None if check == "all" else check, root=root, hasher=hasher, purpose=purpose)
    return Verified(manifest=manifest, keyid=keyid)


def check_signature(manifest: Manifest, trusted: dict[str, Ed25519PublicKey], *, purpose: str = "use it") -> str:
    """The keyid of the trusted key that signed ``manifest``; :class:`UnverifiedManifestError` otherwise."""
    try:
        return verify_envelope(manifest.envelope, trusted, str(manifest.path))
    except FlowpinError as exc:
        raise UnverifiedManifestError(
            f"{safe(manifest.path)}: {type(exc).__name__}: {safe(exc)}; refusing to {purpose} -- {FIX_SIGNATURE}",
            (f"{manifest.path}: {type(exc).__name__}: {exc}",),
        ) from exc


def require_digests(
    manifest: Manifest,
    names: Collection[str] | None,
    *,
    root: Path,
    hasher: Hasher | None = None,
    purpose: str = "use it",
) -> None:
    """Re-hash ``names`` (subjects or dependencies of ``manifest``; all when None) against their pins.

    Call it only on a manifest whose signature verified (:func:`load_verified` with ``check="signature"``).
    A name the manifest does not pin is a finding too: the consumer relies on something nobody vouched for.
    ``hasher`` brings the caller's stat cache and hashing workers; without one, no cache and this process.
    """
    relied_on = manifest
    if names is not None:
        wanted = set(names)
        pinned = {e["name"] for e in manifest.subjects} | {d["name"] for d in manifest.dependencies}
        unknown = sorted(wanted - pinned)
        if unknown:
            raise UnverifiedManifestError(
                f"{safe(manifest.path)}: pins no {', '.join(safe(n) for n in unknown)}; refusing to {purpose} -- "
                "name an artifact the manifest records",
                tuple(f"{n}: not pinned" for n in unknown),
            )
        relied_on = manifest.restricted_to(wanted)
    hasher = hasher if hasher is not None else Hasher(root, manifest.algorithm)
    if hasher.algorithm != manifest.algorithm:
        hasher = Hasher(root, manifest.algorithm, cache=hasher.cache, workers=hasher.workers)
    findings = check_subjects(relied_on, root, hasher)
    if findings:
        raise _digest_error(manifest, findings, purpose) from findings[0].error


def _digest_error(manifest: Manifest, findings: list[Finding], purpose: str) -> UnverifiedManifestError:
    shown = "; ".join(safe(f) for f in findings[:5]) + (f" (+{len(findings) - 5} more)" if len(findings) > 5 else "")
    return UnverifiedManifestError(
        f"{safe(manifest.path)}: {len(findings)} pinned artifact(s) do not match: {shown}; refusing to {purpose} -- "
        f"{FIX_DIGESTS}",
        tuple(str(f) for f in findings),
    )


# --- reading pinned digests (through flowpin.manifest.digests) -------------------------------------


def pinned(entry: dict[str, Any], algorithm: str | None = None) -> tuple[str, str]:
    """``(algorithm, hex)`` of flowpin's identity digest of ``entry`` (:func:`digests.pinned_identity`)."""
    return digests.pinned_identity(entry, algorithm)


def identity_digests(entry: dict[str, Any]) -> dict[str, str]:
    """The identity part of ``entry``'s digest set, what comparisons use (:func:`digests.identity_view`)."""
    return digests.identity_view(entry)


def short_digest(entry: dict[str, Any], width: int = 16) -> str:
    """``algo:hex…`` of the identity digest for human output (:func:`digests.short`)."""
    return digests.short(entry, width)


__all__ = [
    "FIX_DIGESTS",
    "FIX_SIGNATURE",
    "Check",
    "Verified",
    "check_signature",
    "identity_digests",
    "load_verified",
    "pinned",
    "require_digests",
    "short_digest",
    "verify_loaded",
]
