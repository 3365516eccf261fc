"""Release bundles (docs/release.md): export → fresh clone of the bundle → import → dvc pull → verify.

A scratch project replays `synth` (seconds) and commits it; `flowpin release export` writes the release;
a `git clone` of its `repo.bundle` — no DVC cache, no private key — imports it, pulls from its store and
verifies every manifest against its own committed keys. Each way a release can be wrong is refused by
name: a changed, missing or extra file in the bundle; a release.json re-signed by a key the clone does
not trust, or edited without re-signing; a clone at another commit; and, at export, uncommitted changes,
stale outputs, a manifest that does not verify, a missing or corrupt cache object, a non-empty target.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flowpin.canonical import canonical_json
from flowpin.replay.release import BUNDLE_FILE, RELEASE_FILE, RELEASE_PAYLOAD_TYPE, STORE_DIR, object_name
from flowpin.signing import Signer, keyid_of, load_signer, load_trust_store, verify_envelope
from helpers import BIN, checked, make_project, run_in

DVC = str(BIN / "dvc")
FLOWPIN = str(BIN / "flowpin")
STAGE = "synth"
OUT = "data/synth"
PROBE = "data/synth/train/index.json"
"""A plain (not zstd) file of the output; the tests change its copies."""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(project with `synth` run and committed, the release exported from it).

    Built here, not copied from conftest.py's ``synth_flow``: the corrupt-cache-object test needs DVC's state
    (kept outside the project, keyed by its path and by inode) to trust the cache objects this `dvc repro`
    wrote; in a copy DVC re-hashes them, and `dvc status` refuses the export before flowpin's own check runs.
    """
    base = tmp_path_factory.mktemp("release")
    root = make_project(base / "origin")
    checked(root, "git", "add", "-A")
    checked(root, "git", "commit", "-qm", "flow")
    checked(root, DVC, "repro", STAGE)
    checked(root, "git", "add", "-A")
    checked(root, "git", "commit", "-qm", "synth")
    export = base / "export"
    t0 = time.monotonic()
    out = checked(root, FLOWPIN, "release", "export", str(export))
    size = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    print(f"flowpin release export: {time.monotonic() - t0:.2f} s, {size / 1e6:.2f} MB\n{out}")
    return root, export


def _clone(export: Path, dest: Path) -> Path:
    checked(export.parent, "git", "clone", "-q", str(export / BUNDLE_FILE), str(dest))
    assert not (dest / ".flowpin").exists() and not (dest / ".dvc" / "cache").exists()
    assert not (dest / OUT).exists()
    return dest


def _copy(export: Path, dest: Path) -> Path:
    shutil.copytree(export, dest)
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # store objects are exported read-only
    return dest


def _statement(export: Path) -> dict[str, Any]:
    envelope = json.loads((export / RELEASE_FILE).read_bytes())
    statement: dict[str, Any] = json.loads(base64.b64decode(envelope["payload"]))
    return statement


def _refused(clone: Path, export: Path, *extra: str) -> str:
    proc = run_in(clone, FLOWPIN, "release", "import", str(export), *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not (clone / ".dvc" / "config.local").exists()  # nothing configured from a refused release
    return proc.stderr


def _files(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


# --- the round trip -------------------------------------------------------------------------------


def test_release_round_trip_fresh_clone_import_pull_verify(origin: tuple[Path, Path], tmp_path: Path) -> None:
    root, export = origin
    clone = _clone(export, tmp_path / "clone")
    t0 = time.monotonic()
    out = checked(clone, FLOWPIN, "release", "import", str(export))
    t_import = time.monotonic() - t0
    assert f"next: dvc pull {STAGE} && flowpin verify --all" in out  # only synth is in dvc.lock
    checked(clone, DVC, "pull", STAGE)
    t_pull = time.monotonic() - t0 - t_import
    verified = checked(clone, FLOWPIN, "verify", "--all")
    print(f"import {t_import:.2f} s, dvc pull {t_pull:.2f} s, verify {time.monotonic() - t0 - t_import - t_pull:.2f} s")
    assert "1 verified, 0 failed" in verified

    assert _files(clone / OUT) == _files(root / OUT) and len(_files(root / OUT)) == 6
    assert (clone / "manifests" / "synth.json").read_bytes() == (root / "manifests" / "synth.json").read_bytes()
    # The store is the default remote in the untracked config.local; the committed config is untouched.
    assert "url = " + str(export / STORE_DIR) in (clone / ".dvc" / "config.local").read_text()
    assert checked(clone, "git", "status", "--porcelain") == ""


def test_release_contents_are_exactly_the_record_and_the_outs_objects(origin: tuple[Path, Path]) -> None:
    root, export = origin
    statement = _statement(export)
    head = checked(root, "git", "rev-parse", "HEAD").strip()
    assert statement["commit"] == head and statement["stages"] == [STAGE]
    listed = {f["path"]: f for f in statement["files"]}
    on_disk = _files(export)
    assert set(on_disk) == set(listed) | {RELEASE_FILE}
    for path, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256(on_disk[path]).hexdigest() and entry["size"] == len(on_disk[path])
    # the record: every committed file of dvc.yaml, dvc.lock, manifests/, keys/, params/ — byte for byte
    committed = checked(root, "git", "ls-files", "dvc.yaml", "dvc.lock", "manifests", "keys", "params").split()
    assert sorted(p for p, f in listed.items() if f["kind"] == "record") == sorted(committed)
    assert all(on_disk[p] == (root / p).read_bytes() for p in committed)
    # the store: the .dir listing of data/synth and one object per file, nothing else (reports/synth.json
    # is a committed `cache: false` metric: git carries it)
    outs = {o["path"]: o for o in statement["outs"]}
    assert outs["reports/synth.json"]["carrier"] == "git" and outs[OUT]["carrier"] == "store"
    want = {f"{STORE_DIR}/{object_name(outs[OUT]['md5'])}"} | {
        f"{STORE_DIR}/{object_name(hashlib.md5(data, usedforsecurity=False).hexdigest())}"
        for data in _files(root / OUT).values()
    }
    assert {p for p, f in listed.items() if f["kind"] == "store"} == want
    # signed by the origin's key, which the committed keys/ trusts
    verify_envelope(json.loads(on_disk[RELEASE_FILE]), load_trust_store(root), RELEASE_FILE)


def test_import_with_pull_and_verify(origin: tuple[Path, Path], tmp_path: Path) -> None:
    root, export = origin
    clone = _clone(export, tmp_path / "clone")
    out = checked(clone, FLOWPIN, "release", "import", str(export), "--pull", "--verify")
    assert "1 verified, 0 failed" in out
    assert (clone / PROBE).read_bytes() == (root / PROBE).read_bytes()


# --- import refuses ------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["store-object", "manifest", "bundle"])
def test_a_tampered_release_file_is_named(origin: tuple[Path, Path], tmp_path: Path, victim: str) -> None:
    root, export = origin
    bad = _copy(export, tmp_path / "bad")
    if victim == "store-object":
        md5 = hashlib.md5((root / PROBE).read_bytes(), usedforsecurity=False).hexdigest()
        path = bad / STORE_DIR / object_name(md5)
        path.write_bytes(b'{"tampered": true}\n')
        name = f"{STORE_DIR}/{object_name(md5)}"
    elif victim == "manifest":
        name = "manifests/synth.json"
        (bad / name).write_bytes((bad / name).read_bytes().replace(b'"sig"', b'"sig" ', 1))
    else:
        name = BUNDLE_FILE
        with (bad / name).open("ab") as fh:
            fh.write(b"\0")
    clone = _clone(export, tmp_path / "clone")
    err = _refused(clone, bad)
    assert "ReleaseTamperedError" in err and str(bad / name) in err


def test_an_unlisted_or_missing_file_is_refused(origin: tuple[Path, Path], tmp_path: Path) -> None:
    root, export = origin
    clone = _clone(export, tmp_path / "clone")
    extra = _copy(export, tmp_path / "extra")
    (extra / "manifests" / "smuggled.json").write_text("{}\n")
    err = _refused(clone, extra)
    assert "ReleaseTamperedError" in err and "smuggled.json" in err and "not listed" in err

    missing = _copy(export, tmp_path / "missing")
    md5 = hashlib.md5((root / PROBE).read_bytes(), usedforsecurity=False).hexdigest()
    (missing / STORE_DIR / object_name(md5)).unlink()
    err = _refused(clone, missing)
    assert "StoreObjectMissingError" in err and object_name(md5) in err

    assert "NotAReleaseError" in _refused(clone, tmp_path / "empty")


def test_a_release_resigned_by_an_untrusted_key_is_refused(origin: tuple[Path, Path], tmp_path: Path) -> None:
    """The realistic attack: change an object, fix its listing, re-sign with one's own key, and put that
    key in the bundle's keys/ too. The clone trusts its own committed keys/, so this is refused."""
    root, export = origin
    clone = _clone(export, tmp_path / "clone")
    bad = _copy(export, tmp_path / "bad")
    md5 = hashlib.md5((root / PROBE).read_bytes(), usedforsecurity=False).hexdigest()
    name = f"{STORE_DIR}/{object_name(md5)}"
    (bad / name).write_bytes(b'{"tampered": true}\n')
    statement = _statement(bad)
    for entry in statement["files"]:
        if entry["path"] == name:
            entry.update(sha256=hashlib.sha256(b'{"tampered": true}\n').hexdigest(), size=19)
    private = Ed25519PrivateKey.generate()
    attacker = Signer(private, keyid_of(private.public_key()))
    (bad / "keys" / f"{attacker.keyid}.pub").write_bytes(attacker.public_pem())
    envelope = attacker.sign(RELEASE_PAYLOAD_TYPE, canonical_json(statement))
    (bad / RELEASE_FILE).write_text(json.dumps(envelope))
    err = _refused(clone, bad)
    assert "UntrustedKeyError" in err and attacker.keyid[:16] in err

    # Edited without re-signing: the trusted signature no longer verifies.
    envelope = json.loads((export / RELEASE_FILE).read_bytes())
    envelope["payload"] = base64.b64encode(canonical_json(statement)).decode()
    (bad / RELEASE_FILE).write_text(json.dumps(envelope))
    assert "BadSignatureError" in _refused(clone, bad)


def test_expect_keyid_refuses_a_self_consistent_rewritten_release(origin: tuple[Path, Path], tmp_path: Path) -> None:
    """The attack the clone's own keys/ cannot stop: the clone came from a rewritten bundle whose commit
    trusts the attacker's key. Only the keyid the exporting lab published out of band refuses it."""
    root, export = origin
    real = load_signer(root).keyid
    assert f"--expect-keyid: {real}" in checked(root, FLOWPIN, "release", "export", str(tmp_path / "again"))

    good = _clone(export, tmp_path / "good")
    for expected in (real, real[:16], real[:16].upper()):
        out = checked(good, FLOWPIN, "release", "import", str(export), "--expect-keyid", expected)
        assert f"signed by {real[:16]}… (the expected key)" in out
        (good / ".dvc" / "config.local").unlink()

    private = Ed25519PrivateKey.generate()
    attacker = Signer(private, keyid_of(private.public_key()))
    err = _refused(good, export, "--expect-keyid", attacker.keyid)  # a keyid the clone does not hold
    assert "ReleaseSignerError" in err and "no key in the clone's committed" in err

    # The rewritten history: the attacker's key is committed in the clone, the release names that commit,
    # lists the key and is signed by it. Everything agrees with everything else.
    clone = _clone(export, tmp_path / "rewritten")
    pem = attacker.public_pem()
    (clone / "keys" / f"{attacker.keyid}.pub").write_bytes(pem)
    checked(clone, "git", "add", "keys")
    checked(clone, "git", "-c", "user.name=m", "-c", "user.email=m@m.invalid", "commit", "-qm", "trust me")
    bad = _copy(export, tmp_path / "bad")
    (bad / "keys" / f"{attacker.keyid}.pub").write_bytes(pem)
    statement = _statement(bad)
    statement["commit"] = checked(clone, "git", "rev-parse", "HEAD").strip()
    statement["files"].append(
        {
            "path": f"keys/{attacker.keyid}.pub",
            "sha256": hashlib.sha256(pem).hexdigest(),
            "size": len(pem),
            "kind": "record",
        }
    )
    statement["files"].sort(key=lambda f: f["path"])
    (bad / RELEASE_FILE).write_text(json.dumps(attacker.sign(RELEASE_PAYLOAD_TYPE, canonical_json(statement))))
    accepted = checked(clone, FLOWPIN, "release", "import", str(bad))  # self-consistent: accepted
    assert f"signed by {attacker.keyid[:16]}… (trusted in keys/; no --expect-keyid given)" in accepted
    (clone / ".dvc" / "config.local").unlink()
    err = _refused(clone, bad, "--expect-keyid", real[:16])
    assert "ReleaseSignerError" in err and f"not signed by the expected key {real[:16]}" in err

    proc = run_in(good, FLOWPIN, "release", "import", str(export), "--expect-keyid", "abc123")
    assert proc.returncode == 2 and "is not a keyid" in proc.stderr


def test_import_into_a_clone_at_another_commit_or_with_another_record_is_refused(
    origin: tuple[Path, Path], tmp_path: Path
) -> None:
    _, export = origin
    clone = _clone(export, tmp_path / "moved")
    (clone / "NOTES").write_text("local work\n")
    checked(clone, "git", "add", "NOTES")
    checked(clone, "git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "local")
    err = _refused(clone, export)
    assert "ReleaseMismatchError" in err and "git checkout" in err

    clone = _clone(export, tmp_path / "edited")
    lock = clone / "dvc.lock"
    lock.write_bytes(lock.read_bytes() + b"\n")
    err = _refused(clone, export)
    assert "ReleaseMismatchError" in err and "dvc.lock" in err


# --- export refuses ------------------------------------------------------------------------------


@pytest.fixture
def restore(origin: tuple[Path, Path]) -> Iterator[list[tuple[Path, bytes]]]:
    """Files a test changes in the shared origin: (path, original bytes), written back afterwards."""
    saved: list[tuple[Path, bytes]] = []
    yield saved
    for path, data in reversed(saved):
        if path.exists():
            path.chmod(0o644)
        path.write_bytes(data)
        path.chmod(0o444 if ".dvc/cache" in path.as_posix() else 0o644)
    root, _ = origin
    assert checked(root, "git", "status", "--porcelain") == ""


def _export_refused(root: Path, target: Path, *extra: str) -> str:
    proc = run_in(root, FLOWPIN, "release", "export", str(target), *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    assert leftovers == []  # the temporary sibling is gone
    return proc.stderr


def _change(path: Path, data: bytes, saved: list[tuple[Path, bytes]]) -> None:
    saved.append((path, path.read_bytes()))
    path.chmod(0o644)
    path.write_bytes(data)


def test_export_refuses_uncommitted_changes(
    origin: tuple[Path, Path], tmp_path: Path, restore: list[tuple[Path, bytes]]
) -> None:
    root, _ = origin
    recipe = root / "params" / "synth.yaml"
    _change(recipe, recipe.read_bytes() + b"# edited\n", restore)
    err = _export_refused(root, tmp_path / "out")
    assert "ReleaseIncoherentError" in err and "changed params/synth.yaml" in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_outputs_stale_against_dvc_lock(
    origin: tuple[Path, Path], tmp_path: Path, restore: list[tuple[Path, bytes]]
) -> None:
    root, _ = origin
    _change(root / PROBE, b'{"edited": true}\n', restore)  # git ignores it; DVC does not
    err = _export_refused(root, tmp_path / "out")
    assert "ReleaseIncoherentError" in err and "dvc status" in err and f"{OUT} modified" in err


def test_export_refuses_a_missing_or_corrupt_cache_object(
    origin: tuple[Path, Path], tmp_path: Path, restore: list[tuple[Path, bytes]]
) -> None:
    root, _ = origin
    md5 = hashlib.md5((root / PROBE).read_bytes(), usedforsecurity=False).hexdigest()
    cached = root / ".dvc" / "cache" / object_name(md5)
    aside = cached.with_name("aside")
    cached.rename(aside)
    try:
        err = _export_refused(root, tmp_path / "out")
    finally:
        aside.rename(cached)
    assert "StoreObjectMissingError" in err and f"{OUT}/train/index.json" in err

    # Corrupt, same size and mtime, so DVC's state cache still trusts it and `dvc status` is clean: the
    # md5 check while copying finds it, inside the atomic build, and the half-built release is not published.
    stat = cached.stat()
    _change(cached, b"X" * stat.st_size, restore)
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    err = _export_refused(root, tmp_path / "out")
    assert "ReleaseIncoherentError" in err and "corrupt" in err and md5 in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_manifest_that_does_not_verify(origin: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = origin
    manifest = root / "manifests" / "synth.json"
    envelope = json.loads(manifest.read_bytes())
    envelope["signatures"][0]["sig"] = base64.b64encode(b"\0" * 64).decode()
    manifest.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
    checked(root, "git", "commit", "-qam", "a broken signature, committed")
    try:
        err = _export_refused(root, tmp_path / "out")
    finally:
        checked(root, "git", "reset", "-q", "--hard", "HEAD~1")
    assert "ReleaseIncoherentError" in err and "manifests/synth.json" in err and "BadSignatureError" in err


def test_export_refuses_a_non_empty_target_unless_forced(origin: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = origin
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("someone's file\n")
    err = _export_refused(root, target)
    assert "ReleaseTargetError" in err and "not empty" in err and (target / "keep.txt").exists()
    assert "ReleaseTargetError" in _export_refused(root, root / "release")  # inside the repository

    checked(root, FLOWPIN, "release", "export", str(target), "--force")
    assert not (target / "keep.txt").exists() and (target / RELEASE_FILE).is_file()
