"""Release bundles: everything another lab needs to replay and verify the flow, in one directory.

``export_release`` refuses an incoherent release (uncommitted changes, outputs stale against
``dvc.lock``, a manifest that does not verify, a manifest pinning what neither git nor the store would
carry, a cache object missing or corrupt), then builds the directory aside and renames it into place::

    release.json                DSSE envelope (payloadType RELEASE_PAYLOAD_TYPE) over the canonical JSON
                                release statement: commit, producer versions, dvc.lock outs, and the
                                sha256 and size of every other file in the directory
    repo.bundle                 `git bundle` of HEAD (and its branch): `git clone repo.bundle flow`
    dvc.yaml, dvc.lock          the release record, byte for byte as committed at HEAD
    manifests/, keys/, params/
    store/files/md5/xx/yyyy     DVC 3 local-remote layout: exactly the objects of the cached dvc.lock
                                outs (``.dir`` listings and their files), each md5-checked on the way

``import_release`` runs in a fresh clone: the signature must verify against the clone's own committed
trust store (``keys/``), never the bundle's (whoever can change the bundle can change its keys too);
every listed file must match its digest and nothing unlisted may be present; the clone must be at the
released commit with the same record files; every cached out's objects must be in the store. Then the
store becomes the clone's default DVC remote in ``.dvc/config.local`` (untracked), so ``dvc pull`` and
``flowpin verify --all`` complete the replay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from flowpin import __version__
from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import MANIFEST_DIR
from flowpin.dvcfile import DVC_LOCK, DVC_YAML, LockedStage, parse_lock, read_flow
from flowpin.errors import (
    DvcFileError,
    FlowpinError,
    NotAReleaseError,
    PathError,
    ReleaseError,
    ReleaseIncoherentError,
    ReleaseMismatchError,
    ReleaseSignerError,
    ReleaseTamperedError,
    ReleaseTargetError,
    StoreObjectMissingError,
    StrictJSONError,
    UntrustedKeyError,
)
from flowpin.hashing import DEFAULT_ALGORITHM, Hasher
from flowpin.jsonio import loads_strict
from flowpin.manifest.statement import entry_type
from flowpin.manifest.trust import load_verified
from flowpin.manifest.verify import verify_manifest
from flowpin.paths import check_name
from flowpin.safeio import open_regular, read_regular
from flowpin.signing import TRUST_DIR, load_signer, load_trust_store, verify_envelope

RELEASE_PAYLOAD_TYPE = "application/vnd.flowpin.release+json"
RELEASE_TYPE = "https://flowpin.dev/release/v1"
RELEASE_VERSION = 1
RELEASE_FILE = "release.json"
BUNDLE_FILE = "repo.bundle"
STORE_DIR = "store"
REMOTE_NAME = "release"
"""The DVC remote ``import_release`` configures (in ``.dvc/config.local``)."""
RECORD_PATHS = (DVC_YAML, DVC_LOCK, MANIFEST_DIR, TRUST_DIR, "params")
"""What of the commit is copied beside the bundle as the release record (files, or trees)."""
_MD5 = re.compile(r"[0-9a-f]{32}")
_CHUNK = 1 << 20
MAX_RELEASE_JSON_BYTES = 256 << 20
"""Largest ``release.json`` (and DVC ``.dir`` object) read: one ~200-byte entry per file, so over a million files."""


# --- values ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LockedOut:
    """One output of a stage in ``dvc.lock``."""

    stage: str
    path: str
    md5: str
    """As dvc.lock writes it: 32 hex digits, with a ``.dir`` suffix for a directory."""
    carrier: str
    """``git`` (committed, e.g. a ``cache: false`` metric) or ``store`` (a DVC cache object)."""

    def as_json(self) -> dict[str, str]:
        return {"stage": self.stage, "path": self.path, "md5": self.md5, "carrier": self.carrier}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ListedFile:
    """A file of a release directory as release.json lists it."""

    path: str
    sha256: str
    size: int
    kind: str
    """``record`` (a committed file of the release record), ``git-bundle`` or ``store``."""

    def as_json(self) -> dict[str, str | int]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "kind": self.kind}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportResult:
    target: Path
    commit: str
    keyid: str
    files: int
    bytes: int
    store_objects: int
    stages: tuple[str, ...]
    unreleased: tuple[str, ...]
    """Stages of dvc.yaml absent from dvc.lock: never run, so not part of this release."""
    seconds: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImportResult:
    release: Path
    commit: str
    keyid: str
    files: int
    store_objects: int
    remote: str
    pull: tuple[str, ...]
    """The ``dvc pull`` command line: every stage when dvc.lock locks them all, else the released ones."""
    seconds: float


def object_name(md5: str) -> str:
    """A DVC 3 object's path under a cache or a local remote (``files/md5/xx/yyyy[.dir]``)."""
    return f"files/md5/{md5[:2]}/{md5[2:]}"


# --- export ---------------------------------------------------------------------------------------


def export_release(root: Path, target: Path, *, force: bool = False, hash_workers: int = 1) -> ExportResult:
    """Check that the checkout is one coherent release, then write it to ``target`` atomically.

    ``hash_workers``: processes that hash the manifests' artifacts as they are verified (the caller's choice,
    :func:`flowpin.hashing.parallel_workers` for a command that only hashes; 1, in-process, by default)."""
    t0 = time.monotonic()
    target = Path(os.path.abspath(target))
    _check_target(root, target, force=force)
    commit = _head(root, ReleaseIncoherentError)
    _check_clean(root)
    signer = load_signer(root)
    trusted = load_trust_store(root)  # the tree is clean: these are exactly the committed keys
    if signer.keyid not in trusted:
        raise ReleaseIncoherentError(
            f"the signing key {signer.keyid[:16]}… is not in the committed trust store {TRUST_DIR}/: a receiving "
            f"lab could not check release.json; commit {TRUST_DIR}/{signer.keyid}.pub (flowpin key init trusts it)"
        )
    tree = _head_tree(root)
    record = {path: blob for path, blob in tree.items() if _in_record(path)}
    for required in (DVC_YAML, DVC_LOCK):
        if required not in record:
            raise ReleaseIncoherentError(
                f"{required} is not committed at HEAD {commit[:12]}; run the flow (dvc repro) and commit it"
            )
    manifests = sorted(p for p in record if p.startswith(f"{MANIFEST_DIR}/") and p.endswith(".json"))
    if not manifests:
        raise ReleaseIncoherentError(f"no manifest is committed under {MANIFEST_DIR}/; run the flow and commit them")
    outs = locked_outs(root, (root / DVC_LOCK).read_bytes(), tracked=tree.keys())
    stages = tuple(sorted({o.stage for o in outs} | _locked_stages((root / DVC_LOCK).read_bytes())))
    cache = Path(_run(root, [*_dvc_cmd(), "cache", "dir"], ReleaseIncoherentError).decode().strip())
    objects = _cache_objects(cache, outs)  # before `dvc status`, which would say "not in cache" less precisely
    _check_dvc_status(root, stages)
    _check_manifests(root, manifests, trusted, hash_workers=hash_workers)
    _check_carried(root, manifests, outs, tree.keys())
    unreleased = tuple(sorted(_dvc_yaml_stages(root) - set(stages)))

    listed: list[ListedFile] = []
    with atomic_directory(target) as tmp:
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep the other lab out of a shared directory
        for path, data in _read_blobs(root, record):
            listed.append(_publish(tmp / path, [data], kind="record", mode=0o644, path=path))
        bundle_refs = ["HEAD", *_branch_at_head(root)]
        _run(root, ["git", "bundle", "create", "-q", str(tmp / BUNDLE_FILE), *bundle_refs], ReleaseError)
        listed.append(_listing(tmp / BUNDLE_FILE, BUNDLE_FILE, kind="git-bundle"))
        for name, source in objects.items():
            listed.append(_copy_object(source, tmp / STORE_DIR / name, f"{STORE_DIR}/{name}"))
        statement = {
            "_type": RELEASE_TYPE,
            "releaseVersion": RELEASE_VERSION,
            "commit": commit,
            "producer": {"flowpin": __version__, "dvc": metadata.version("dvc")},
            "stages": list(stages),
            "outs": [o.as_json() for o in sorted(outs, key=lambda o: (o.path, o.stage))],
            "files": [f.as_json() for f in sorted(listed, key=lambda f: f.path)],
        }
        envelope = signer.sign(RELEASE_PAYLOAD_TYPE, canonical_json(statement))
        atomic_write_bytes(tmp / RELEASE_FILE, json.dumps(envelope, indent=2, sort_keys=True).encode() + b"\n")
    return ExportResult(
        target=target,
        commit=commit,
        keyid=signer.keyid,
        files=len(listed) + 1,
        bytes=sum(f.size for f in listed) + (target / RELEASE_FILE).stat().st_size,
        store_objects=len(objects),
        stages=stages,
        unreleased=unreleased,
        seconds=time.monotonic() - t0,
    )


def _check_target(root: Path, target: Path, *, force: bool) -> None:
    real_root, real_target = root.resolve(), target.resolve()
    if real_target == real_root or real_root in real_target.parents:
        raise ReleaseTargetError(
            f"{target} is inside the repository {root}: DVC would read its dvc.yaml as part of the project; "
            "export to a directory outside the checkout"
        )
    if real_target in real_root.parents:
        raise ReleaseTargetError(f"{target} contains the repository {root}; export to a new, separate directory")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ReleaseTargetError(f"{target} exists and is not a directory; remove it or export elsewhere")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ReleaseTargetError(
            f"{target} exists and is not empty; export to a new directory, or pass --force to replace it whole"
        )


def _check_clean(root: Path) -> None:
    """No change to a tracked file, and no untracked file in the release record."""
    out = _run(root, ["git", "status", "--porcelain=v1", "-z", "--untracked-files=all"], ReleaseIncoherentError)
    entries = out.decode("utf-8", "surrogateescape").split("\0")
    problems: list[str] = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        if status[0] in "RC":
            i += 1  # the rename's source follows
        if status == "??":
            if _in_record(path):
                problems.append(f"untracked {path}")
        else:
            problems.append(f"changed {path}")
    if problems:
        shown = ", ".join(problems[:10]) + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        raise ReleaseIncoherentError(
            f"uncommitted changes in {root}: {shown}; a release is one commit — commit or discard them "
            "(git status), then export again"
        )


def _check_dvc_status(root: Path, stages: Sequence[str]) -> None:
    if not stages:
        raise ReleaseIncoherentError("dvc.lock locks no stage; run the flow (dvc repro) and commit dvc.lock")
    out = _run(root, [*_dvc_cmd(), "status", "--json", *stages], ReleaseIncoherentError)
    try:
        status = json.loads(out.decode() or "{}")
    except json.JSONDecodeError as exc:
        raise ReleaseIncoherentError(f"`dvc status --json` printed no JSON ({exc}): {out[:200]!r}") from exc
    if status:
        changes = []
        for stage, items in sorted(status.items()):
            described = []
            for item in items if isinstance(items, list) else [items]:
                if isinstance(item, dict):
                    for what, paths in item.items():
                        detail = ", ".join(f"{p} {s}" for p, s in paths.items()) if isinstance(paths, dict) else ""
                        described.append(f"{what}: {detail}" if detail else what)
                else:
                    described.append(str(item))
            changes.append(f"{stage} ({'; '.join(described)})")
        raise ReleaseIncoherentError(
            f"`dvc status` is not clean — the workspace does not hold what dvc.lock pins: {' | '.join(changes)}; "
            "run `dvc repro` (then commit dvc.lock and the manifests) or `dvc checkout`, then export again"
        )


def _check_manifests(
    root: Path, manifests: Sequence[str], trusted: dict[str, Ed25519PublicKey], *, hash_workers: int
) -> None:
    # Every file is read: the stat cache is a local speed-up anyone with write access to .flowpin/ can
    # edit, never evidence for a release (docs/hardening.md, "Trust model: the stat cache").
    hasher = Hasher(root, DEFAULT_ALGORITHM, cache=None, workers=hash_workers)
    failures: list[str] = []
    for name in manifests:
        report = verify_manifest(root / name, root=root, trusted=trusted, hasher=hasher)
        failures.extend(f"{name}: {finding}" for finding in report.findings)
    if failures:
        raise ReleaseIncoherentError(
            f"{len(failures)} finding(s) in the committed manifests: {'; '.join(failures[:5])}; "
            "a release must verify as it is (flowpin verify --all): re-run the stage or restore its outputs"
        )


def _check_carried(root: Path, manifests: Sequence[str], outs: Sequence[LockedOut], tracked: Iterable[str]) -> None:
    """Every artifact a manifest pins in the repository must reach a fresh clone: by git or by the store."""
    files = set(tracked)
    dirs = {str(parent) for f in files for parent in PurePosixPath(f).parents}
    stored = [o.path for o in outs if o.carrier == "store"]
    missing = []
    for name in manifests:
        # verified in full by _check_manifests just before; never read one that is not signed by a trusted key
        m = load_verified(root / name, root=root, check="signature", purpose="release it")
        entries = list(m.subjects) + [d for d in m.dependencies if entry_type(d) not in ("fileset", "manifest")]
        for entry in entries:
            art = entry["name"]
            if art in files or art in dirs or any(art == p or art.startswith(p + "/") for p in stored):
                continue
            missing.append(f"{name} pins {art}")
    if missing:
        raise ReleaseIncoherentError(
            f"{'; '.join(missing[:5])}{' …' if len(missing) > 5 else ''}: neither git nor a cached dvc.lock out "
            "carries it, so a fresh clone + dvc pull could not verify it; make it a DVC out of its stage or commit it"
        )


def _cache_objects(cache: Path, outs: Sequence[LockedOut]) -> dict[str, Path]:
    """Object name → cache path for every object the cached outs need (``.dir`` listings included)."""
    objects: dict[str, Path] = {}
    for out in outs:
        if out.carrier != "store":
            continue
        name = object_name(out.md5)
        path = cache / name
        if not path.is_file():
            raise StoreObjectMissingError(
                f"{out.path} (stage {out.stage}, md5 {out.md5}) is not in the DVC cache {cache} ({name}); "
                f"run `dvc repro {out.stage}` or `dvc fetch` from a remote that has it, then export again"
            )
        objects[name] = path
        if out.md5.endswith(".dir"):
            listing = read_regular(path, max_bytes=MAX_RELEASE_JSON_BYTES, what="DVC cache object")
            for md5, relpath in _dir_entries(listing, f"{out.path} ({path})", ReleaseIncoherentError):
                entry = cache / object_name(md5)
                if not entry.is_file():
                    raise StoreObjectMissingError(
                        f"{out.path}/{relpath} (stage {out.stage}, md5 {md5}) is not in the DVC cache {cache}; "
                        f"run `dvc repro {out.stage}` or `dvc fetch`, then export again"
                    )
                objects[object_name(md5)] = entry
    return dict(sorted(objects.items()))


def _copy_object(source: Path, dest: Path, listed_path: str) -> ListedFile:
    """Copy a cache object, checking that its bytes still hash to the md5 it is named by."""
    want = listed_path.split("/files/md5/", 1)[1].replace("/", "").removesuffix(".dir")
    md5 = hashlib.md5(usedforsecurity=False)

    def chunks() -> Iterable[bytes]:
        with source.open("rb") as fh:
            while block := fh.read(_CHUNK):
                md5.update(block)
                yield block

    listed = _publish(dest, chunks(), kind="store", mode=0o444, path=listed_path)
    if md5.hexdigest() != want:
        raise ReleaseIncoherentError(
            f"cache object {source} is corrupt: its md5 is {md5.hexdigest()}, not {want}; "
            "remove it and re-create it (dvc repro --force the stage, or dvc fetch), then export again"
        )
    return listed


def _publish(dest: Path, chunks: Iterable[bytes], *, kind: str, mode: int, path: str) -> ListedFile:
    """Write ``chunks`` to ``dest`` (inside the directory being built), fsynced; return its listing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sha, size = hashlib.sha256(), 0
    with dest.open("xb") as fh:
        for block in chunks:
            sha.update(block)
            size += len(block)
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    dest.chmod(mode)
    return ListedFile(path=path, sha256=sha.hexdigest(), size=size, kind=kind)


def _listing(path: Path, name: str, *, kind: str) -> ListedFile:
    sha, size = _sha256_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return ListedFile(path=name, sha256=sha, size=size, kind=kind)


# --- import ---------------------------------------------------------------------------------------


KEYID_PREFIX_MIN = 16
"""Shortest keyid prefix ``--expect-keyid`` accepts: 64 bits, what export and ``key list`` print."""


def check_keyid_prefix(value: str) -> str:
    """``value`` lower-cased if it is 16 to 64 hex digits (a keyid or a prefix of one); else ValueError."""
    value = value.strip().lower()
    if not re.fullmatch(rf"[0-9a-f]{{{KEYID_PREFIX_MIN},64}}", value):
        raise ValueError(
            f"{value!r} is not a keyid: give the {KEYID_PREFIX_MIN} to 64 hex digits the exporting lab published"
        )
    return value


def import_release(root: Path, release: Path, *, expect_keyid: str | None = None) -> ImportResult:
    """Check ``release`` against this clone and make its store the clone's default DVC remote.

    ``expect_keyid`` (a keyid or a prefix of at least 16 hex digits, published by the exporting lab out of
    band) anchors trust outside the clone: release.json must be signed by that key. Without it, a clone
    made from a rewritten bundle, with the rewriter's key committed, would be consistent with itself.
    """
    expected = None if expect_keyid is None else check_keyid_prefix(expect_keyid)
    t0 = time.monotonic()
    release = Path(os.path.abspath(release))
    where = str(release / RELEASE_FILE)
    envelope = _read_envelope(release / RELEASE_FILE)
    # Trust only the clone's committed keys/: the bundle's keys travel with the bundle, so whoever can
    # change the bundle could change them too.
    keys_status = _run(
        root, ["git", "status", "--porcelain=v1", "--untracked-files=all", "--", TRUST_DIR], ReleaseMismatchError
    )
    if keys_status.strip():
        raise ReleaseMismatchError(
            f"{root / TRUST_DIR} differs from the clone's commit ({keys_status.decode().strip()}); the release is "
            f"checked against the committed trust store only: restore it (git checkout -- {TRUST_DIR}; git clean)"
        )
    trusted = load_trust_store(root)
    if expected is not None:
        trusted = _expected_key(trusted, expected, root)
    try:
        keyid = verify_envelope(envelope, trusted, where)
    except UntrustedKeyError as exc:
        if expected is None:
            raise
        raise ReleaseSignerError(
            f"{where} is not signed by the expected key {expected[:16]}…: {exc}; do not use this release — it "
            "was not exported by the lab that published that keyid, or the keyid was copied wrongly"
        ) from exc
    statement = _parse_statement(envelope, where)
    listed = _listed_files(statement, where)
    _check_release_files(release, listed)

    commit = _head(root, ReleaseMismatchError)
    if commit != statement["commit"]:
        raise ReleaseMismatchError(
            f"this clone is at {commit[:12]}, the release at {statement['commit'][:12]}; "
            f"check it out first: git checkout {statement['commit']}"
        )
    _check_same_record(root, listed)
    lock = read_regular(root / DVC_LOCK, max_bytes=MAX_RELEASE_JSON_BYTES, what="lock file", follow_symlinks=False)
    outs = locked_outs(root, lock, tracked=_head_tree(root).keys())
    released = _locked_stages(lock)
    store = release / STORE_DIR
    needed = _store_needs(store, outs, {f.path for f in listed.values() if f.kind == "store"})
    url = str(store)
    _run(root, [*_dvc_cmd(), "remote", "add", "--local", "--default", "--force", REMOTE_NAME, url], ReleaseError)
    return ImportResult(
        release=release,
        commit=commit,
        keyid=keyid,
        files=len(listed) + 1,
        store_objects=needed,
        remote=url,
        pull=("dvc", "pull", *([] if _dvc_yaml_stages(root) <= released else sorted(released))),
        seconds=time.monotonic() - t0,
    )


def _expected_key(trusted: dict[str, Ed25519PublicKey], expected: str, root: Path) -> dict[str, Ed25519PublicKey]:
    matches = {k: v for k, v in trusted.items() if k.startswith(expected)}
    where = f"the clone's committed {root / TRUST_DIR}/"
    if not matches:
        raise ReleaseSignerError(
            f"no key in {where} matches the expected keyid {expected}; the clone does not hold the exporting "
            "lab's key: check the keyid (`flowpin key list` prints the clone's keys) or clone the lab's own "
            "repository"
        )
    if len(matches) > 1:
        raise ReleaseSignerError(
            f"{len(matches)} keys in {where} match the expected keyid {expected}; give more of its digits"
        )
    return matches


_AGAIN = "the release is corrupt or was tampered with: get it again from the exporting lab"


def _read_envelope(path: Path) -> dict[str, Any]:
    try:
        data = read_regular(
            path, max_bytes=MAX_RELEASE_JSON_BYTES, what="release file", follow_symlinks=False, fix=_AGAIN
        )
    except FileNotFoundError as exc:
        raise NotAReleaseError(
            f"{path.parent} is not a release directory: no {RELEASE_FILE}; "
            "name the directory `flowpin release export` wrote"
        ) from exc
    except OSError as exc:
        raise NotAReleaseError(f"cannot read {path} ({exc.strerror}); check the path and permissions") from exc
    try:
        envelope = loads_strict(data, where=str(path), max_bytes=MAX_RELEASE_JSON_BYTES)
    except StrictJSONError as exc:  # not JSON, a repeated key, NaN, too deep
        raise NotAReleaseError(f"{path} is not strict JSON ({exc.reason}); {_AGAIN}") from exc
    if not isinstance(envelope, dict) or envelope.get("payloadType") != RELEASE_PAYLOAD_TYPE:
        kind = envelope.get("payloadType") if isinstance(envelope, dict) else type(envelope).__name__
        raise NotAReleaseError(
            f"{path} is not a flowpin release envelope (payloadType {kind!r}, expected {RELEASE_PAYLOAD_TYPE}); "
            "name the directory `flowpin release export` wrote"
        )
    return envelope


def _parse_statement(envelope: dict[str, Any], where: str) -> dict[str, Any]:
    from flowpin.signing import decode_b64

    try:
        payload = decode_b64(envelope.get("payload"), f"{where}: payload")
        statement = loads_strict(payload, where=f"{where}: payload", max_bytes=MAX_RELEASE_JSON_BYTES)
    except StrictJSONError as exc:
        raise NotAReleaseError(f"{where}: the signed payload is not strict JSON ({exc.reason}); {_AGAIN}") from exc
    if not isinstance(statement, dict) or statement.get("_type") != RELEASE_TYPE:
        raise NotAReleaseError(f"{where}: the payload is not a flowpin release statement ({RELEASE_TYPE})")
    if statement.get("releaseVersion") != RELEASE_VERSION:
        raise NotAReleaseError(
            f"{where}: release format {statement.get('releaseVersion')!r}; this flowpin reads version "
            f"{RELEASE_VERSION} — upgrade flowpin"
        )
    if not isinstance(statement.get("commit"), str) or not re.fullmatch(r"[0-9a-f]{40,64}", statement["commit"]):
        raise NotAReleaseError(f"{where}: the payload's commit is not a git object id")
    return statement


def _listed_files(statement: dict[str, Any], where: str) -> dict[str, ListedFile]:
    files = statement.get("files")
    if not isinstance(files, list):
        raise NotAReleaseError(f"{where}: the payload lists no files")
    listed: dict[str, ListedFile] = {}
    for i, entry in enumerate(files):
        try:
            item = ListedFile(
                path=check_name(entry["path"]),
                sha256=str(entry["sha256"]),
                size=int(entry["size"]),
                kind=str(entry["kind"]),
            )
        except (KeyError, TypeError, ValueError, PathError) as exc:
            raise NotAReleaseError(f"{where}: files[{i}] is malformed ({exc})") from exc
        if item.path == RELEASE_FILE or item.path in listed:
            raise NotAReleaseError(f"{where}: files[{i}] ({item.path}) is listed twice")
        listed[item.path] = item
    return listed


def _check_release_files(release: Path, listed: dict[str, ListedFile]) -> None:
    present: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(release):
        base = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (base / d).is_symlink())]:
            rel = (base / name).relative_to(release).as_posix()
            if rel == RELEASE_FILE:
                continue
            if rel not in listed:
                raise ReleaseTamperedError(
                    f"{release / rel} is in the release but not listed in its signed {RELEASE_FILE}; the release "
                    "was changed after export — remove the file or ask the exporting lab for the release again"
                )
            if (base / name).is_symlink() or not (base / name).is_file():
                raise ReleaseTamperedError(
                    f"{release / rel} is not a regular file; the release was changed after export"
                )
            present.add(rel)
    for path, item in listed.items():
        file = release / path
        if path not in present:
            error = StoreObjectMissingError if item.kind == "store" else ReleaseTamperedError
            raise error(
                f"{file} is listed in {RELEASE_FILE} but missing from the release; copy the whole release "
                "directory again"
            )
        sha, size = _sha256_file(file)
        if (sha, size) != (item.sha256, item.size):
            raise ReleaseTamperedError(
                f"{file} was changed after export: sha256 {sha[:16]}… ({size} B), {RELEASE_FILE} signs "
                f"{item.sha256[:16]}… ({item.size} B); get the release again from the exporting lab"
            )


def _check_same_record(root: Path, listed: dict[str, ListedFile]) -> None:
    record = {path: f for path, f in listed.items() if f.kind == "record"}
    ours = {path for path in _head_tree(root) if _in_record(path)}
    differ = sorted(ours ^ record.keys())
    if differ:
        raise ReleaseMismatchError(
            f"the clone's committed release record differs from the release's: {', '.join(differ[:10])}; "
            "import into a clone of the released commit (git clone <release>/repo.bundle)"
        )
    for path, item in sorted(record.items()):
        try:
            sha, size = _sha256_file(root / path)
        except OSError as exc:
            raise ReleaseMismatchError(
                f"{root / path}: cannot read ({exc}); restore it: git checkout -- {path}"
            ) from exc
        if (sha, size) != (item.sha256, item.size):
            raise ReleaseMismatchError(
                f"{root / path} differs from the release's {path}; restore the committed file "
                f"(git checkout -- {path}) and import again"
            )


def _store_needs(store: Path, outs: Sequence[LockedOut], present: set[str]) -> int:
    """Check that every object of a cached dvc.lock out is in the (already verified) store."""
    needed: set[str] = set()
    for out in outs:
        if out.carrier != "store":
            continue
        name = object_name(out.md5)
        if f"{STORE_DIR}/{name}" not in present:
            raise StoreObjectMissingError(
                f"{out.path} (stage {out.stage}, md5 {out.md5}) has no object in {store} ({name}); "
                "the release is incomplete — ask the exporting lab to export it again"
            )
        needed.add(name)
        if out.md5.endswith(".dir"):
            listing = read_regular(
                store / name, max_bytes=MAX_RELEASE_JSON_BYTES, what="release store object", follow_symlinks=False
            )
            for md5, relpath in _dir_entries(listing, str(store / name), NotAReleaseError):
                if f"{STORE_DIR}/{object_name(md5)}" not in present:
                    raise StoreObjectMissingError(
                        f"{out.path}/{relpath} (md5 {md5}) has no object in {store}; the release is incomplete — "
                        "ask the exporting lab to export it again"
                    )
                needed.add(object_name(md5))
    return len(needed)


# --- after import, and what a person reads ----------------------------------------------------------------


def pull_release(root: Path, result: ImportResult) -> int:
    """``dvc pull`` from the release's store (the remote :func:`import_release` configured) into ``root``;
    returns dvc's exit status (its output goes to this process's stdout and stderr)."""
    return subprocess.run([*_dvc_cmd(), *result.pull[1:], "-r", REMOTE_NAME], cwd=root, check=False).returncode


def render_export(r: ExportResult) -> str:
    """``flowpin release export``'s report: what was written, and the keyid to publish out of band."""
    text = (
        f"release of {r.commit[:12]} written to {r.target}: {r.files} files, {r.bytes / 1e6:.1f} MB, "
        f"{r.store_objects} store objects, stages {', '.join(r.stages)}; signed by {r.keyid[:16]}… "
        f"({r.seconds:.1f} s)\n"
        f"publish this keyid out of band; importers check it with --expect-keyid: {r.keyid}"
    )
    if r.unreleased:
        text += f"\nnot in dvc.lock, so not released: {', '.join(r.unreleased)}"
    return text


def render_import(r: ImportResult, *, expected_key: bool) -> str:
    """``flowpin release import``'s report; ``expected_key``: ``--expect-keyid`` was given (and matched)."""
    return (
        f"release {r.release} verified: commit {r.commit[:12]}, signed by {r.keyid[:16]}… "
        f"({'the expected key' if expected_key else 'trusted in keys/; no --expect-keyid given'}), "
        f"{r.files} files, {r.store_objects} store objects ({r.seconds:.1f} s)\n"
        f"DVC remote '{REMOTE_NAME}' -> {r.remote} is the default in .dvc/config.local"
    )


# --- shared helpers -------------------------------------------------------------------------------


def locked_outs(root: Path, lock: bytes, *, tracked: Iterable[str]) -> list[LockedOut]:
    """Every out of ``dvc.lock``; committed ones are carried by git, the others by the DVC store."""
    files = set(tracked)
    outs: list[LockedOut] = []
    for stage, locked in sorted(_parse_lock(lock, root / DVC_LOCK).items()):
        for i, out in enumerate(locked.outs):
            where = f"{root / DVC_LOCK}: stages.{stage}.outs[{i}]"
            if not isinstance(out, dict) or not isinstance(out.get("path"), str):
                raise ReleaseIncoherentError(f"{where} has no path; regenerate dvc.lock with `dvc repro`")
            path = check_name(out["path"])
            in_git = path in files or any(f.startswith(path + "/") for f in files)
            md5 = out.get("md5")
            if in_git:
                outs.append(LockedOut(stage=stage, path=path, md5=str(md5), carrier="git"))
                continue
            if out.get("hash") != "md5" or not isinstance(md5, str):
                raise ReleaseIncoherentError(
                    f"{where} ({path}) has no DVC 3 md5 (hash: md5); it is a DVC 2 entry or not cached — "
                    "run `dvc cache migrate --dvc-files` or `dvc repro`, commit dvc.lock, and export again"
                )
            if not _MD5.fullmatch(md5.removesuffix(".dir")):
                raise ReleaseIncoherentError(f"{where} ({path}): md5 {md5!r} is not 32 hex digits")
            outs.append(LockedOut(stage=stage, path=path, md5=md5, carrier="store"))
    return outs


def _locked_stages(lock: bytes) -> set[str]:
    return set(_parse_lock(lock, Path(DVC_LOCK)))


def _parse_lock(lock: bytes, where: Path) -> dict[str, LockedStage]:
    """:func:`flowpin.dvcfile.parse_lock`; a malformed lock file makes the release incoherent."""
    try:
        return parse_lock(lock, str(where))
    except DvcFileError as exc:
        raise ReleaseIncoherentError(str(exc)) from exc


def _dvc_yaml_stages(root: Path) -> set[str]:
    """The stages of ``dvc.yaml`` (none when it is missing or unreadable: then no stage counts as unreleased)."""
    try:
        return set(read_flow(root) or {})
    except DvcFileError:
        return set()


def _dir_entries(data: bytes, where: str, error: type[FlowpinError]) -> list[tuple[str, str]]:
    """(md5, relpath) of every file a DVC ``.dir`` object lists."""
    try:
        entries = loads_strict(data, where=where, max_bytes=MAX_RELEASE_JSON_BYTES)
    except StrictJSONError as exc:
        raise error(f"{where}: the .dir object is not strict JSON ({exc.reason})") from exc
    result = []
    for entry in entries if isinstance(entries, list) else [None]:
        if not isinstance(entry, dict) or not isinstance(entry.get("md5"), str) or not _MD5.fullmatch(entry["md5"]):
            raise error(f"{where}: the .dir object holds a malformed entry {entry!r}")
        result.append((entry["md5"], str(entry.get("relpath"))))
    return result


def _in_record(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in RECORD_PATHS)


def _head(root: Path, error: type[FlowpinError]) -> str:
    return _run(root, ["git", "rev-parse", "--verify", "HEAD^{commit}"], error).decode().strip()


def _branch_at_head(root: Path) -> list[str]:
    """The current branch, when HEAD is on one (so that `git clone repo.bundle` checks it out)."""
    proc = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    return [proc.stdout.strip()] if proc.returncode == 0 and proc.stdout.strip() else []


def _head_tree(root: Path) -> dict[str, str]:
    """path → blob id of every file committed at HEAD; symlinks and submodules in the record are refused."""
    out = _run(root, ["git", "ls-tree", "-r", "-z", "--full-tree", "HEAD"], ReleaseError)
    tree: dict[str, str] = {}
    for line in out.decode("utf-8", "surrogateescape").split("\0"):
        if not line:
            continue
        meta, path = line.split("\t", 1)
        mode, kind, blob = meta.split()
        if _in_record(path) and (kind != "blob" or mode == "120000"):
            raise ReleaseIncoherentError(
                f"{path} is committed as a {'symlink' if mode == '120000' else kind}; the release record holds "
                "regular files only — commit the file itself"
            )
        tree[path] = blob
    return tree


def _read_blobs(root: Path, record: dict[str, str]) -> Iterable[tuple[str, bytes]]:
    """(path, bytes) of committed files, through one `git cat-file --batch`."""
    paths = sorted(record)
    request = "".join(f"{record[p]}\n" for p in paths).encode()
    out = _run(root, ["git", "cat-file", "--batch"], ReleaseError, stdin=request)
    pos = 0
    for path in paths:
        end = out.index(b"\n", pos)
        blob, kind, size = out[pos:end].decode().split()
        if blob != record[path] or kind != "blob":
            raise ReleaseError(f"git cat-file answered {blob} {kind} for {path}; the repository is corrupt (git fsck)")
        start = end + 1
        yield path, out[start : start + int(size)]
        pos = start + int(size) + 1


def _dvc_cmd() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def _run(root: Path, cmd: Sequence[str], error: type[FlowpinError], *, stdin: bytes | None = None) -> bytes:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    try:
        proc = subprocess.run(list(cmd), cwd=root, env=env, input=stdin, capture_output=True, check=False)
    except OSError as exc:
        raise error(f"cannot run {cmd[0]} ({exc.strerror}); is it installed?") from exc
    if proc.returncode != 0:
        shown = " ".join(c if c != sys.executable else "python" for c in cmd[:6])
        message = proc.stderr.decode(errors="replace").strip()[-600:]
        raise error(f"`{shown}` failed in {root} (exit {proc.returncode}): {message}")
    return proc.stdout


def _sha256_file(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with open_regular(path, max_bytes=None, what="release file", follow_symlinks=False, fix=_AGAIN) as f:
        while block := os.read(f.fd, _CHUNK):
            sha.update(block)
            size += len(block)
    return sha.hexdigest(), size
