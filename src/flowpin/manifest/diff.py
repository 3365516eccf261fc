"""``flowpin diff``: a semantic comparison of two manifests (or two flows' manifest directories).

Compares identity only (subjects and build definition) unless ``include_run`` is set: recipe keys
changed (old → new), overrides, entry point, outputs and inputs whose digests changed (with the files
inside directories that changed), code revision, and environment differences (each marked when it can
change numerics). Run metadata (times, hosts, durations) is ignored by default.

**Verdict first.** :func:`verdict_of` sorts every pair into one of four outcomes and says so in one line
before the per-pair blocks (``--json``: the ``verdict`` object)::

    verdict: outputs identical in 16 of 17 (14 identical in identity); outputs identical but identity
    differs in 2: pretrain (code), sft (environment); outputs differ in 1: eval; all 34 manifests VERIFIED

* *identical*: no difference in identity;
* *identity differs*: every output has the same digest, but the recipe, entry point, inputs, code,
  environment (or, with ``include_run``, run metadata) differ;
* *outputs differ*: some output digest differs, an output exists on one side only, or the stages differ;
* *one side only*: a manifest in one directory has no counterpart in the other (counted with "outputs
  differ": one flow produced something the other did not).

Exit status (:attr:`Verdict.exit_code`, in :mod:`flowpin.errors`' policy; 2 stays "could not answer"): 0 every
pair identical in identity; 1 some outputs differ (or a manifest is on one side only), as ``flowpin rebuild``'s
1; 3 every output identical but some identity differs. ``--json`` prints :func:`render_json`.

:func:`diff_paths` also checks each manifest's signature against the trust store (signed by a trusted
key: VERIFIED, else UNVERIFIED with the reason; artifact digests are not re-hashed -- ``flowpin verify``
does that) and says so per manifest and in the verdict line, which names every UNVERIFIED manifest; the
outcome (and the exit status) is about content either way. Text output escapes every string taken from a
manifest (:func:`flowpin.display.safe`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin.display import safe
from flowpin.environment import numerics_differences
from flowpin.errors import (
    EXIT_FAILED,
    EXIT_IDENTITY_DIFFERS,
    EXIT_OK,
    FlowpinError,
    ManifestError,
    UnverifiedManifestError,
)
from flowpin.manifest.statement import EntryPoint, Manifest, entry_files, entry_kind, load_manifest
from flowpin.manifest.trust import check_signature, identity_digests, pinned


@dataclasses.dataclass
class Change:
    section: str
    """stage | recipe | overrides | entry | output | input | format | code | environment | run"""
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


OUTPUT_SECTIONS = ("output", "stage")
"""Sections whose change means the two manifests vouch for different outputs (not only a different identity)."""

IDENTICAL, IDENTITY_DIFFERS, OUTPUTS_DIFFER, ONE_SIDE = "identical", "identity-differs", "outputs-differ", "one-side"
"""The outcome of one pair (see the module docstring)."""


@dataclasses.dataclass
class ManifestDiff:
    a: str
    b: str
    changes: list[Change]
    trust_a: Trust | None = None
    """Set by :func:`diff_paths` when given a trust store (None: not checked, or no manifest on that side)."""
    trust_b: Trust | None = None
    name: str = ""
    """How the verdict names the pair: the manifest's path in its directory without ``.json``, or the stage."""
    only: str | None = None
    """``"a"`` or ``"b"``: the manifest exists on that side only."""

    @property
    def identical(self) -> bool:
        return not self.changes

    @property
    def outcome(self) -> str:
        """identical | identity-differs | outputs-differ | one-side (see the module docstring)."""
        if self.only is not None:
            return ONE_SIDE
        if any(c.section in OUTPUT_SECTIONS for c in self.changes):
            return OUTPUTS_DIFFER
        return IDENTITY_DIFFERS if self.changes else IDENTICAL

    @property
    def sections(self) -> list[str]:
        """The sections that differ, in report order."""
        return list(dict.fromkeys(c.section for c in self.changes))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "outcome": self.outcome,
            "changes": [c.as_dict() for c in self.changes],
            "verified": {
                side: None if t is None else t.as_dict() for side, t in (("a", self.trust_a), ("b", self.trust_b))
            },
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class Verdict:
    """The answer over every pair, said before the details (see the module docstring)."""

    pairs: int
    identical: tuple[str, ...]
    """Pairs identical in identity."""
    identity_differs: tuple[tuple[str, tuple[str, ...]], ...]
    """(pair, sections that differ) of the pairs whose outputs are identical but whose identity is not."""
    outputs_differ: tuple[str, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    label_a: str = "a"
    label_b: str = "b"
    checked: int = 0
    """Manifests whose signature was checked (0: no trust store given)."""
    unverified: tuple[str, ...] = ()
    """Paths of the checked manifests not signed by a trusted key."""

    @property
    def outputs_identical(self) -> int:
        return len(self.identical) + len(self.identity_differs)

    @property
    def status(self) -> str:
        """identical | identity-differs | outputs-differ: the worst outcome of any pair."""
        if self.outputs_differ or self.only_a or self.only_b:
            return OUTPUTS_DIFFER
        return IDENTITY_DIFFERS if self.identity_differs else IDENTICAL

    @property
    def exit_code(self) -> int:
        """``flowpin diff``'s exit status (:mod:`flowpin.errors`' policy; 2, a manifest that cannot be read, is
        raised before there is a verdict)."""
        return {IDENTICAL: EXIT_OK, IDENTITY_DIFFERS: EXIT_IDENTITY_DIFFERS, OUTPUTS_DIFFER: EXIT_FAILED}[self.status]

    def text(self) -> str:
        """One line (not escaped: :func:`render_text` escapes it)."""
        same = f"{len(self.identical)} identical in identity"
        parts = [f"outputs identical in {self.outputs_identical} of {self.pairs} ({same})"]
        if self.identity_differs:
            named = ", ".join(f"{name} ({', '.join(sections)})" for name, sections in self.identity_differs)
            parts.append(f"outputs identical but identity differs in {len(self.identity_differs)}: {named}")
        if self.outputs_differ:
            parts.append(f"outputs differ in {len(self.outputs_differ)}: {', '.join(self.outputs_differ)}")
        for label, names in ((self.label_a, self.only_a), (self.label_b, self.only_b)):
            if names:
                parts.append(f"only in {label}: {', '.join(names)}")
        if not self.checked:
            parts.append("signatures not checked")
        elif self.unverified:
            parts.append(f"UNVERIFIED {len(self.unverified)} of {self.checked} manifests: {', '.join(self.unverified)}")
        else:
            parts.append(f"all {self.checked} manifests VERIFIED")
        return "verdict: " + "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exitCode": self.exit_code,
            "pairs": self.pairs,
            "outputsIdentical": self.outputs_identical,
            "identical": list(self.identical),
            "identityDiffers": [{"name": n, "sections": list(s)} for n, s in self.identity_differs],
            "outputsDiffer": list(self.outputs_differ),
            "onlyIn": {"a": list(self.only_a), "b": list(self.only_b)},
            "signaturesChecked": self.checked,
            "unverified": list(self.unverified),
            "text": self.text(),
        }


def verdict_of(diffs: list[ManifestDiff], *, label_a: str = "a", label_b: str = "b") -> Verdict:
    """Sort every pair by outcome (pairs keep their order); ``label_*`` name the two sides in "only in"."""
    by: dict[str, list[ManifestDiff]] = {IDENTICAL: [], IDENTITY_DIFFERS: [], OUTPUTS_DIFFER: [], ONE_SIDE: []}
    for d in diffs:
        by[d.outcome].append(d)
    trusts = [(path, t) for d in diffs for path, t in ((d.a, d.trust_a), (d.b, d.trust_b)) if t is not None]
    return Verdict(
        pairs=len(diffs),
        identical=tuple(d.name for d in by[IDENTICAL]),
        identity_differs=tuple((d.name, tuple(d.sections)) for d in by[IDENTITY_DIFFERS]),
        outputs_differ=tuple(d.name for d in by[OUTPUTS_DIFFER]),
        only_a=tuple(d.name for d in by[ONE_SIDE] if d.only == "a"),
        only_b=tuple(d.name for d in by[ONE_SIDE] if d.only == "b"),
        label_a=label_a,
        label_b=label_b,
        checked=len(trusts),
        unverified=tuple(path for path, t in trusts if not t.verified),
    )


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
        elif a.get("uri") != b.get("uri") or entry_kind(a) != entry_kind(b):
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
    fa, fb = entry_files(a), entry_files(b)
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
    note = m.note("sweep-job")
    if note is None:
        return list(m.subjects)
    prefix = str(note["jobDir"]).rstrip("/") + "/"
    return [{**s, "name": s["name"].removeprefix(prefix)} for s in m.subjects]


def diff_manifests(a: Manifest, b: Manifest, *, include_run: bool = False) -> ManifestDiff:
    changes: list[Change] = []
    if a.stage != b.stage:
        changes.append(Change("stage", "stage", a.stage, b.stage))
    changes += _dict_changes("recipe", a.recipe, b.recipe)
    if a.overrides != b.overrides:
        changes.append(Change("overrides", "overrides", a.overrides, b.overrides))
    ea, eb = a.entry_point, b.entry_point
    if ea != eb:
        changes.append(Change("entry", "entryPoint", _entry(ea), _entry(eb)))
    changes += _artifact_changes("output", _paired_subjects(a), _paired_subjects(b))
    changes += _artifact_changes("input", a.dependencies, b.dependencies)
    for key, va, vb in (
        ("manifestVersion", a.manifest_version, b.manifest_version),
        ("digestAlgorithm", a.algorithm, b.algorithm),
    ):
        if va != vb:
            changes.append(Change("format", key, va, vb))
    ga, gb = a.git, b.git
    changes += _dict_changes("code", {"git": ga} if ga else {}, {"git": gb} if gb else {})
    env_a = {k: v for k, v in a.environment.items() if k != "git"}
    env_b = {k: v for k, v in b.environment.items() if k != "git"}
    for d in numerics_differences(env_a, env_b):
        note = ("can change numerics: " + d.reason) if d.affects_numerics else d.reason
        changes.append(Change("environment", d.key, d.old, d.new, note))
    if include_run:
        changes += _dict_changes("run", a.run_details, b.run_details)
    name = a.stage if a.stage == b.stage else f"{a.stage}→{b.stage}"
    return ManifestDiff(str(a.path), str(b.path), changes, name=name)


def _entry(entry: EntryPoint | None) -> str:
    if entry is None:
        return _MISSING
    where = "" if entry.config_dir == "params" else f" (configs in {entry.config_dir}/)"
    return f"{entry.script} --config-name {entry.config_name}{where}"


def diff_paths(
    a: Path, b: Path, *, include_run: bool = False, trusted: dict[str, Ed25519PublicKey] | None = None
) -> list[ManifestDiff]:
    """Diff two manifests, or two directories of manifests paired by relative path.

    With ``trusted`` (a trust store), each manifest's signature is checked too (:class:`Trust`), a manifest
    present on one side only included (one that cannot even be read is UNVERIFIED, with the reason).
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
            name = rel.removesuffix(".json")
            if rel not in ra or rel not in rb:
                alone = ManifestDiff(
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
                    name=name,
                    only="a" if rel in ra else "b",
                )
                if trusted is not None:
                    trust = _trust_alone(ra[rel] if rel in ra else rb[rel], trusted)
                    alone.trust_a, alone.trust_b = (trust, None) if rel in ra else (None, trust)
                out.append(alone)
                continue
            out.append(dataclasses.replace(diff(ra[rel], rb[rel]), name=name))
        return out
    return [diff(a, b)]


def _trust_alone(path: Path, trusted: dict[str, Ed25519PublicKey]) -> Trust:
    """The trust of a manifest that has no counterpart: not compared, but still checked and reported."""
    try:
        return trust_of(load_manifest(path), trusted)
    except FlowpinError as exc:
        return Trust(False, f"{type(exc).__name__}: {exc}")


def render_json(diffs: list[ManifestDiff], verdict: Verdict) -> str:
    """``flowpin diff --json``: ``{"verdict": {...}, "diffs": [one object per pair]}``."""
    doc = {"verdict": verdict.as_dict(), "diffs": [d.as_dict() for d in diffs]}
    return json.dumps(doc, indent=2, sort_keys=True, default=str)


def render_text(diffs: list[ManifestDiff], verdict: Verdict | None = None) -> str:
    """Human form: the verdict line (:func:`verdict_of`), then one block per pair; every line is escaped
    (:func:`flowpin.display.safe`): keys and values come from manifests."""
    lines: list[str] = [(verdict or verdict_of(diffs)).text()]
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
