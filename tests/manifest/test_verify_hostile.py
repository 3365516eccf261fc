"""What a consumer of the record can be made to believe (issue #13, items 6a, 6c, 7, 9 and 10).

Each case was a bypass before its fix: a statement naming one artifact twice under two spellings, a
trusted key filed under a name that is not its keyid, two concurrent ``key init --if-missing`` both
"creating" a key, the printed OpenSSF command ignoring a dropped ``.gitignore``, a crafted tensor file
signed, and a forged stat-cache row fooling the checks a release relies on.
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from flowpin.canonical import canonical_json
from flowpin.cli import main
from flowpin.errors import DuplicateSubjectError, KeyFileError, ReleaseIncoherentError, SchemaError, TensorFileError
from flowpin.hashing import Hasher, default_cache
from flowpin.manifest.statement import load_manifest
from flowpin.manifest.verify import verify_manifest
from flowpin.signing import PAYLOAD_TYPE, init_key, load_signer, load_trust_store
from helpers import BIN, REPO, Project, one_step_state, scratch_env

FLOWPIN = str(BIN / "flowpin")
OPENSSF_CLI = BIN / "model_signing"
DIR_OUT = "artifacts/train/shards"
FILE_OUT = "artifacts/train/model.bin"


def resign(project: Project, path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Re-sign the statement at ``path`` with the project key after ``mutate``, bypassing flowpin's checks."""
    statement = copy.deepcopy(load_manifest(path).statement)
    mutate(statement)
    path.write_text(json.dumps(project.signer.sign(PAYLOAD_TYPE, canonical_json(statement)), indent=2))


# --- 6a: one artifact, two spellings -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [f"./{DIR_OUT}", f"{DIR_OUT}/", DIR_OUT.replace("/", "//", 1)],
    ids=["dot-slash", "trailing-slash", "empty-segment"],
)
def test_subject_named_twice_under_another_spelling_is_refused(project: Project, spelling: str) -> None:
    """``artifacts/train/shards`` and ``./artifacts/train/shards`` in one signed statement: one artifact, two pins."""
    manifest = project.record_stage("train")

    def twice(statement: dict[str, Any]) -> None:
        [entry] = [s for s in statement["subject"] if s["name"] == DIR_OUT]
        other = copy.deepcopy(entry)
        other["name"] = spelling
        other["digest"] = {"sha256": "0" * 64}  # the second copy may pin anything
        statement["subject"].append(other)

    resign(project, manifest, twice)
    with pytest.raises(DuplicateSubjectError, match=rf"{DIR_OUT!r} more than once .*{spelling!r}"):
        load_manifest(manifest)
    report = project.verify(manifest)
    assert not report.ok and isinstance(report.findings[0].error, DuplicateSubjectError)


def test_dependency_named_twice_under_another_spelling_is_refused(project: Project) -> None:
    (project.root / "data").mkdir()
    (project.root / "data" / "in.txt").write_text("input\n")
    manifest = project.record_stage("train", inputs=["data/in.txt"])

    def twice(statement: dict[str, Any]) -> None:
        deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        other = copy.deepcopy(deps[0])
        other["name"] = "./data/in.txt"
        deps.append(other)

    resign(project, manifest, twice)
    with pytest.raises(DuplicateSubjectError, match=r"resolvedDependencies names the artifact 'data/in\.txt'"):
        load_manifest(manifest)


def test_non_canonical_subject_name_is_refused(project: Project) -> None:
    """Alone, ``./artifacts/train/shards`` names no second artifact, but flowpin never writes it: refused by name."""
    manifest = project.record_stage("train")
    resign(project, manifest, lambda s: s["subject"][1].update(name=f"./{DIR_OUT}"))
    with pytest.raises(SchemaError, match=rf"not a canonical artifact name \(flowpin writes {DIR_OUT!r}"):
        load_manifest(manifest)


def test_files_map_key_listed_twice_under_another_spelling_is_refused(project: Project) -> None:
    manifest = project.record_stage("train")

    def twice(statement: dict[str, Any]) -> None:
        files = statement["subject"][1]["annotations"]["flowpin.files"]
        files["./a.txt"] = "0" * 64

    resign(project, manifest, twice)
    with pytest.raises(DuplicateSubjectError, match=r"flowpin.files names the artifact 'a.txt' more than once"):
        load_manifest(manifest)


def test_schema_refuses_non_canonical_names_for_other_verifiers() -> None:
    """The published schema says the same, for verifiers that are not flowpin."""
    import jsonschema

    schema = json.loads((REPO / "src" / "flowpin" / "manifest" / "schema" / "statement-v1.schema.json").read_text())
    names = jsonschema.Draft202012Validator(schema["$defs"]["artifactName"])
    assert names.is_valid("data/synth") and names.is_valid(".hidden/x")
    for bad in ("./data/synth", "data/synth/", "data//synth", "data/./synth", "."):
        assert not names.is_valid(bad), bad


# --- 6c: a trusted key filed under another name ----------------------------------------------------------


def test_trusted_key_whose_file_name_is_not_its_keyid_is_refused(project: Project) -> None:
    keyid = project.signer.keyid
    (project.root / "keys" / f"{keyid}.pub").rename(project.root / "keys" / "colleague.pub")
    with pytest.raises(
        KeyFileError,
        match=rf"colleague\.pub holds the Ed25519 key {keyid}.*`git mv keys/colleague\.pub keys/{keyid}\.pub`",
    ):
        load_trust_store(project.root)


# --- 7: concurrent key creation ---------------------------------------------------------------------------


def _race(tmp_path: Path, rounds: int, command: list[str]) -> Iterator[tuple[Path, list[str]]]:
    """``rounds`` fresh projects, each with two copies of ``command`` started at once; (root, outputs)."""
    for i in range(rounds):
        root = tmp_path / f"race-{i}"
        (root / ".dvc").mkdir(parents=True)
        env = scratch_env(root)
        env.pop("FLOWPIN_MODEL_SIGNING_KEY", None)
        procs = [
            subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, out + err
            outputs.append(out)
        yield root, outputs


def test_concurrent_key_init_if_missing_creates_and_trusts_exactly_one_key(tmp_path: Path) -> None:
    for root, outputs in _race(tmp_path, 8, [FLOWPIN, "key", "init", "--if-missing"]):
        created = [out for out in outputs if out.startswith("created signing key")]
        assert len(created) == 1, f"{root.name}: {outputs}"
        trusted = sorted((root / "keys").glob("*.pub"))
        signer = load_signer(root)  # the private key that remains...
        assert [p.name for p in trusted] == [f"{signer.keyid}.pub"], f"{root.name}: {outputs}"  # ...is the one trusted
        assert f"keyid {signer.keyid}" in created[0]
        assert not list((root / ".flowpin" / "keys").glob(".*.tmp"))  # no temporary left behind


def test_concurrent_model_sign_key_init_if_missing_creates_and_trusts_exactly_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ``model-sign key init --if-missing`` held at key generation until both got there: the race, every time."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from flowpin.modelsign import KEY_ENV, TRUST_DIR, load_private_key

    root = (tmp_path / "proj").resolve()
    (root / ".dvc").mkdir(parents=True)
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("FLOWPIN_ROOT", str(root))
    monkeypatch.chdir(root)
    both_checked = threading.Barrier(2, timeout=30)
    generate = ec.generate_private_key

    def held(curve: ec.EllipticCurve, backend: Any = None) -> ec.EllipticCurvePrivateKey:
        both_checked.wait()  # both callers found no key and are about to create one
        return generate(curve)

    monkeypatch.setattr(ec, "generate_private_key", held)
    codes: list[int] = []
    threads = [
        threading.Thread(target=lambda: codes.append(main(["model-sign", "key", "init", "--if-missing"])))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    out = capsys.readouterr().out
    assert codes == [0, 0], out
    assert out.count("created model-signing key") == 1 and out.count("model-signing key exists") == 1, out
    info, _ = load_private_key(root)
    assert sorted(p.name for p in (root / TRUST_DIR).iterdir()) == [f"{info.keyid}.pem"], out


# --- 9: OpenSSF model signing -------------------------------------------------------------------------------


@pytest.fixture
def signing_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root (cwd, ``FLOWPIN_ROOT``) with a model-signing key and a real tiny checkpoint."""
    from flowpin.modelsign import KEY_ENV, init_key
    from flowpin.train.checkpoint import save_checkpoint

    for var in ("FLOWPIN_SIGNING_KEY", KEY_ENV):
        monkeypatch.delenv(var, raising=False)
    root = (tmp_path / "proj").resolve()
    (root / ".dvc").mkdir(parents=True)
    monkeypatch.setenv("FLOWPIN_ROOT", str(root))
    monkeypatch.chdir(root)
    init_key(root)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(
        root / "runs" / "tiny" / "checkpoints" / "step-000001",
        one_step_state(model, opt, torch.ones(2, 4)),
        model=model,
        optimizer=opt,
    )
    return root


CHECKPOINT = "runs/tiny/checkpoints/step-000001"


def test_printed_openssf_command_does_not_ignore_git_paths(
    signing_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model-sign", "sign", CHECKPOINT]) == 0
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[:3] == ["model_signing", "verify", "key"] and "--no-ignore-git-paths" in command

    def openssf() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(OPENSSF_CLI), *command[1:]], capture_output=True, text=True, timeout=120, check=False
        )

    assert openssf().returncode == 0
    (signing_root / CHECKPOINT / ".gitignore").write_text("*\n")
    result = openssf()
    assert result.returncode == 1, "the printed command passed a checkpoint with a .gitignore dropped into it"
    assert ".gitignore" in result.stderr


def test_model_sign_refuses_tensor_file_whose_header_runs_past_eof(
    signing_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The header length points past the end; the file is re-pinned in (unsigned) state.json."""
    import hashlib

    from flowpin.modelsign import default_signature_path, sign_checkpoint

    ck = signing_root / CHECKPOINT
    path = ck / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) + 100).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    state = json.loads((ck / "state.json").read_bytes())
    state["files"]["model.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ck / "state.json").write_text(json.dumps(state, sort_keys=True))
    with pytest.raises(TensorFileError, match=r"model\.safetensors .*runs past the end of the file"):
        sign_checkpoint(ck, root=signing_root)
    assert main(["model-sign", "sign", CHECKPOINT]) == 2
    assert "TensorFileError" in capsys.readouterr().err
    assert not default_signature_path(ck).exists()


# --- 10: a forged stat-cache row ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose output ``model.bin`` was edited after signing, with its stat-cache row forged to match.

    The proof that the forgery works: a verify through the cache still says OK, one without it does not.
    """
    root = (tmp_path_factory.mktemp("forged") / "proj").resolve()
    (root / ".dvc").mkdir(parents=True)
    project = Project(root=root, signer=init_key(root, key_path=root / ".flowpin" / "keys" / "signing.key"))
    manifest = project.record_stage("train")
    time.sleep(2.1)  # files modified within the racy window (2 s) are never cached
    assert _verify(root, manifest, cached=True)
    target = root / FILE_OUT
    target.write_bytes(target.read_bytes().upper())  # same size, other bytes
    st = target.stat()
    with sqlite3.connect(root / ".flowpin" / "cache" / "digests.sqlite") as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'digests%'")
        [table] = [row[0] for row in tables]
        changed = db.execute(
            f"UPDATE {table} SET dev = ?, ino = ?, size = ?, mtime_ns = ?, ctime_ns = ? WHERE path = ?",
            (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, str(target.resolve())),
        ).rowcount
    assert changed >= 1
    assert _verify(root, manifest, cached=True), "the forged row does not fool the cached verify"
    assert not _verify(root, manifest, cached=False)
    return root


def _verify(root: Path, manifest: Path, *, cached: bool) -> bool:
    cache = default_cache(root) if cached else None
    try:
        hasher = Hasher(root, cache=cache, workers=1)
        return verify_manifest(manifest, root=root, trusted=load_trust_store(root), hasher=hasher).ok
    finally:
        if cache is not None:
            cache.close()


def test_forged_cache_row_does_not_fool_release_export(forged: Path) -> None:
    from flowpin.replay.release import _check_manifests

    with pytest.raises(ReleaseIncoherentError, match=r"manifests/train\.json: .*model\.bin"):
        _check_manifests(forged, ["manifests/train.json"], load_trust_store(forged), hash_workers=1)


def test_forged_cache_row_does_not_fool_release_import_verify(
    forged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``flowpin release import --verify``: the import itself is stubbed, the verify it then runs is real."""
    import flowpin.replay.release
    from flowpin.replay.release import ImportResult

    def imported(root: Path, release: Path, *, expect_keyid: str | None = None) -> ImportResult:
        return ImportResult(
            release=release, commit="0" * 40, keyid="0" * 64, files=1, store_objects=0, remote="", pull=(), seconds=0.0
        )

    monkeypatch.setattr(flowpin.replay.release, "import_release", imported)
    monkeypatch.setenv("FLOWPIN_ROOT", str(forged))
    monkeypatch.chdir(forged)
    assert main(["release", "import", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "0 verified, 1 failed" in out and "0 from the stat cache" in out and FILE_OUT in out


def test_forged_cache_row_does_not_fool_make_release_check_verify(forged: Path) -> None:
    """The verify line of ``make release-check``, run as make would run it, in the forged project."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    recipe = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.installed", "release-check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [line] = [line for line in recipe.splitlines() if " verify " in line and not line.startswith("#")]
    proc = subprocess.run(
        ["sh", "-c", line],  # as make's shell runs it (the manifests/*.json glob included)
        cwd=forged,
        env=scratch_env(forged),
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL manifests/train.json" in proc.stdout
    assert "0 from the stat cache" in proc.stdout
