"""``flowpin diff``: a semantic comparison of two manifests (or two flows' manifest directories).

Compares identity only (subjects and build definition) unless ``include_run`` is set: recipe keys
changed (old → new), overrides, outputs and inputs whose digests changed (with the files inside
directories that changed), code revision, and environment differences (each marked when it can change
numerics). Run metadata (times, hosts, durations) is ignored by default.

:func:`diff_paths` also checks each manifest's signature against the trust store (signed by a trusted
key: VERIFIED, else UNVERIFIED with the reason; artifact digests are not re-hashed -- ``flowpin verify``
does that) and says so per manifest; the verdict (identical or not) is about content either way.
Text output escapes every string taken from a manifest (:func:`flowpin.display.safe`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin.display import safe
from flowpin.environment import numerics_differences
from flowpin.errors import ManifestError, UnverifiedManifestError
from flowpin.manifest.model import Manifest, load_manifest
from flowpin.manifest.trust import check_signature, identity_digests, pinned


@dataclasses.dataclass
class Change:
    section: str
    """recipe | overrides | output | input | code | environment | run | stage"""
    key: str
    old: Any
    new: Any
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Trust:
    """Whether a manifest is signed by a trusted key (signature and trust only; digests not re-hashed)."""

    verified: bool
    detail: str
    """The signer's keyid when verified, else why not."""

    def label(self) -> str:
        return f"VERIFIED (signed by {self.detail[:16]}…)" if self.verified else "UNVERIFIED"

    def as_dict(self) -> dict[str, Any]:
        return {"verified": self.verified, ("signer" if self.verified else "reason"): self.detail}


def trust_of(m: Manifest, trusted: dict[str, Ed25519PublicKey]) -> Trust:
    try:
        return Trust(True, check_signature(m, trusted, purpose="call it signed"))
    except UnverifiedManifestError as exc:
        return Trust(False, str(exc))


@dataclasses.dataclass
class ManifestDiff:
    a: str
    b: str
    changes: list[Change]
    trust_a: Trust | None = None
    """Set by :func:`diff_paths` when given a trust store (None: not checked, or no manifest on that side)."""
    trust_b: Trust | None = None

    @property
    def identical(self) -> bool:
        return not self.changes

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "changes": [c.as_dict() for c in self.changes],
            "verified": {
                side: None if t is None else t.as_dict() for side, t in (("a", self.trust_a), ("b", self.trust_b))
            },
        }


_MISSING = "<absent>"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested dicts (lists are leaves)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(flatten(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _dict_changes(section: str, old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    fo, fn = flatten(old), flatten(new)
    return [
        Change(section, k, fo.get(k, _MISSING), fn.get(k, _MISSING))
        for k in sorted(fo.keys() | fn.keys())
        if fo.get(k, _MISSING) != fn.get(k, _MISSING)
    ]


def _artifact_changes(section: str, old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[Change]:
    o = {e["name"]: e for e in old}
    n = {e["name"]: e for e in new}
    changes: list[Change] = []
    for name in sorted(o.keys() | n.keys()):
        a, b = o.get(name), n.get(name)
        if a is None or b is None:
            changes.append(Change(section, name, _digest(a), _digest(b), "added" if a is None else "removed"))
        elif identity_digests(a) != identity_digests(b):
            changes.append(Change(section, name, _digest(a), _digest(b), _files_note(a, b)))
        elif a.get("uri") != b.get("uri") or a["annotations"].get("kind") != b["annotations"].get("kind"):
            changes.append(Change(section, name, a.get("uri"), b.get("uri"), "same content, different origin/kind"))
    return changes


def _digest(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return _MISSING
    try:
        algo, value = pinned(entry)
    except ManifestError:
        return "(no flowpin digest)"
    return f"{algo}:{value}"


def _files_note(a: dict[str, Any], b: dict[str, Any]) -> str:
    fa: dict[str, str] = a["annotations"].get("flowpin.files", {})
    fb: dict[str, str] = b["annotations"].get("flowpin.files", {})
    if not fa and not fb:
        return ""
    changed = sorted(p for p in fa.keys() & fb.keys() if fa[p] != fb[p])
    added, removed = sorted(fb.keys() - fa.keys()), sorted(fa.keys() - fb.keys())
    parts = [
        f"{label} {len(ps)}: {', '.join(ps[:3])}{' …' if len(ps) > 3 else ''}"
        for label, ps in (("changed", changed), ("added", added), ("removed", removed))
        if ps
    ]
    return "; ".join(parts)


def _paired_subjects(m: Manifest) -> list[dict[str, Any]]:
    """``m``'s subjects, named as declared: a sweep job's outputs lie under its job directory
    (``runDetails`` note ``sweep-job``, :mod:`flowpin.sweep`), which is where it ran, not what it is --
    so two jobs' outputs pair up by their name inside the job directory."""
    note = next((b for b in m.run_details.get("byproducts", []) if b.get("name") == "sweep-job"), None)
    if note is None:
        return list(m.subjects)
    prefix = str(note["annotations"]["jobDir"]).rstrip("/") + "/"
    return [{**s, "name": s["name"].removeprefix(prefix)} for s in m.subjects]


def diff_manifests(a: Manifest, b: Manifest, *, include_run: bool = False) -> ManifestDiff:
    ba, bb = a.build, b.build
    changes: list[Change] = []
    if a.stage != b.stage:
        changes.append(Change("stage", "stage", a.stage, b.stage))
    changes += _dict_changes("recipe", ba["externalParameters"]["recipe"], bb["externalParameters"]["recipe"])
    oa, ob = ba["externalParameters"]["overrides"], bb["externalParameters"]["overrides"]
    if oa != ob:
        changes.append(Change("overrides", "overrides", oa, ob))
    changes += _artifact_changes("output", _paired_subjects(a), _paired_subjects(b))
    changes += _artifact_changes("input", a.dependencies, b.dependencies)
    ia, ib = ba["internalParameters"], bb["internalParameters"]
    for key in ("manifestVersion", "digestAlgorithm"):
        if ia[key] != ib[key]:
            changes.append(Change("format", key, ia[key], ib[key]))
    ea, eb = dict(ia["environment"]), dict(ib["environment"])
    ga, gb = ea.pop("git", None), eb.pop("git", None)
    changes += _dict_changes("code", {"git": ga} if ga else {}, {"git": gb} if gb else {})
    for d in numerics_differences(ea, eb):
        note = ("can change numerics: " + d.reason) if d.affects_numerics else d.reason
        changes.append(Change("environment", d.key, d.old, d.new, note))
    if include_run:
        changes += _dict_changes("run", a.run_details, b.run_details)
    return ManifestDiff(str(a.path), str(b.path), changes)


def diff_paths(
    a: Path, b: Path, *, include_run: bool = False, trusted: dict[str, Ed25519PublicKey] | None = None
) -> list[ManifestDiff]:
    """Diff two manifests, or two directories of manifests paired by relative path.

    With ``trusted`` (a trust store), each manifest's signature is checked too (:class:`Trust`).
    """

    def diff(pa: Path, pb: Path) -> ManifestDiff:
        ma, mb = load_manifest(pa), load_manifest(pb)
        d = diff_manifests(ma, mb, include_run=include_run)
        if trusted is not None:
            d.trust_a, d.trust_b = trust_of(ma, trusted), trust_of(mb, trusted)
        return d

    if a.is_dir() and b.is_dir():
        ra = {p.relative_to(a).as_posix(): p for p in a.rglob("*.json")}
        rb = {p.relative_to(b).as_posix(): p for p in b.rglob("*.json")}
        out: list[ManifestDiff] = []
        for rel in sorted(ra.keys() | rb.keys()):
            if rel not in ra or rel not in rb:
                out.append(
                    ManifestDiff(
                        str(ra.get(rel, _MISSING)),
                        str(rb.get(rel, _MISSING)),
                        [
                            Change(
                                "stage",
                                rel,
                                "present" if rel in ra else _MISSING,
                                "present" if rel in rb else _MISSING,
                                "manifest only on one side",
                            )
                        ],
                    )
                )
                continue
            out.append(diff(ra[rel], rb[rel]))
        return out
    return [diff(a, b)]


def render_text(diffs: list[ManifestDiff]) -> str:
    """Human form; every line is escaped (:func:`flowpin.display.safe`): keys and values come from manifests."""
    lines: list[str] = []
    for d in diffs:
        a, b = (f"{path}{'' if t is None else ' ' + t.label()}" for path, t in ((d.a, d.trust_a), (d.b, d.trust_b)))
        unverified = [f"  UNVERIFIED {t.detail}" for t in (d.trust_a, d.trust_b) if t is not None and not t.verified]
        if d.identical:
            lines.append(f"= {a} ≡ {b}: identical in identity")
            lines.extend(unverified)
            continue
        lines.append(f"≠ {a} → {b}: {len(d.changes)} difference(s)")
        lines.extend(unverified)
        section = None
        for c in d.changes:
            if c.section != section:
                section = c.section
                lines.append(f"  [{section}]")
            note = f"  ({c.note})" if c.note else ""
            lines.append(f"    {c.key}: {_short(c.old)} → {_short(c.new)}{note}")
    return "\n".join(safe(line) for line in lines)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "…"
