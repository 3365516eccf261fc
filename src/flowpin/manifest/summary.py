"""What a person reads about a manifest: ``flowpin show``'s page and ``flowpin verify``'s verdict lines.

The statement's fields come from :class:`~flowpin.manifest.statement.Manifest`'s accessors, the signature
verdict from :mod:`flowpin.manifest.trust`, the per-manifest verification from :mod:`flowpin.manifest.verify`.
Every line is text a manifest controls, so each is escaped (:func:`flowpin.display.safe`) before it is
returned: the command line prints what it gets.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin.display import safe
from flowpin.errors import UnverifiedManifestError
from flowpin.manifest.statement import Manifest, entry_files, entry_kind, entry_size
from flowpin.manifest.trust import check_signature, require_digests, short_digest
from flowpin.manifest.verify import VerifyReport


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShowStatus:
    """Whether ``flowpin show`` may call a manifest VERIFIED, and the words it says so with."""

    keyid: str | None
    """The trusted key that signed it; None when it is UNVERIFIED."""
    text: str
    """``VERIFIED (signed by …)`` or ``UNVERIFIED: <why>``."""

    @property
    def verified(self) -> bool:
        return self.keyid is not None


def show_status(m: Manifest, trusted: dict[str, Ed25519PublicKey], *, digests: Path | None = None) -> ShowStatus:
    """Check ``m``'s signature against ``trusted`` and, when ``digests`` names the project root, re-hash every
    subject and dependency there. A failed check is an UNVERIFIED :class:`ShowStatus`, never an exception."""
    try:
        keyid = check_signature(m, trusted, purpose="show it as signed")
        if digests is not None:
            require_digests(m, None, root=digests, purpose="show it as verified")
    except UnverifiedManifestError as exc:
        return ShowStatus(keyid=None, text=f"UNVERIFIED: {exc}")
    scope = "every digest re-hashed" if digests is not None else "digests not re-hashed: add --digests"
    return ShowStatus(keyid=keyid, text=f"VERIFIED (signed by {keyid[:16]}…, trusted in keys/; {scope})")


def render_summary(m: Manifest, status: ShowStatus) -> str:
    """``flowpin show``'s page: stage, identity, signature, run, code, environment, entry point, overrides,
    outputs, inputs and byproducts, one escaped line each."""
    lines: list[str] = []
    out = lines.append
    env, git, meta = m.environment, m.git, m.metadata
    out(f"manifest   {m.path}")
    out(f"stage      {m.stage}")
    out(f"identity   sha256:{m.identity_digest()}")
    out(f"signature  {status.text}")
    out(f"run        {meta['invocationId']}  {meta['startedOn']} → {meta['finishedOn']}")
    tracking = m.note("tracking")
    if tracking is not None:  # the Aim run of this stage run (open it with `flowpin ui`)
        from flowpin.tracking.aim import describe_note

        out(f"tracking   {describe_note(tracking)}")
    dirty = f" + uncommitted changes {git.get('dirtyDigest')}" if git.get("dirty") else ""
    out(f"code       git {git.get('commit') or '(none)'}{dirty}")
    torch = env.get("torch") or {}
    out(
        f"env        python {env.get('python', {}).get('version')}, torch {torch.get('version')}, "
        f"threads {torch.get('numThreads')}, deterministic {torch.get('deterministicAlgorithms')}"
    )
    entry = m.entry_point
    rerun = shlex.join(entry.command([])) if entry else "(not recorded: re-run the stage to record it)"
    out(f"entry      {rerun}")
    overrides = m.overrides
    out(f"overrides  {' '.join(overrides) if overrides else '(none)'}")
    out("outputs")
    for s in m.subjects:
        n = len(entry_files(s))
        out(f"  {s['name']}  {short_digest(s)}  {entry_size(s)} B" + (f", {n} files" if n else ""))
    out("inputs")
    for d in m.dependencies:
        uri = f"  ({d['uri']})" if "uri" in d else ""
        out(f"  [{entry_kind(d)}] {d['name']}  {short_digest(d)}{uri}")
    for bp in m.byproducts:
        if "digest" in bp:
            out(f"byproduct  {bp['name']}  {short_digest(bp)}")
        else:
            out(f"byproduct  {bp['name']}  {json.dumps(bp.get('annotations', {}), sort_keys=True)[:100]}")
    return "\n".join(safe(line) for line in lines)


def render_verification(path: Path, report: VerifyReport) -> str:
    """``flowpin verify``'s lines for one manifest: ``OK …``, or ``FAIL …`` and each finding indented."""
    if report.ok:
        signer = (report.keyid or "?")[:16]
        return safe(f"OK   {path} [{report.stage}] {report.checked} artifacts, signed by {signer}…")
    return "\n".join([safe(f"FAIL {path} [{report.stage or '?'}]"), *(f"     {safe(f)}" for f in report.findings)])


def render_verify_totals(*, verified: int, failed: int, hashed: int, cache_hits: int) -> str:
    """``flowpin verify``'s last line: how many manifests verified, and how many files were hashed (``hashed``)
    or taken from the stat cache (``cache_hits``)."""
    return f"{verified} verified, {failed} failed ({hashed} files hashed, {cache_hits} from the stat cache)"


__all__ = ["ShowStatus", "render_summary", "render_verification", "render_verify_totals", "show_status"]
