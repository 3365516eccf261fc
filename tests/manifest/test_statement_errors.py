"""Every named way a manifest or its artifacts can be bad, each caught as its specific error class.

Crafted manifests are re-signed with the project's trusted key (unless the signature is the point), so
that each test breaks exactly one thing.
"""

from __future__ import annotations

import base64
import copy
import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flowpin.canonical import canonical_json
from flowpin.errors import (
    ArtifactMissingError,
    ArtifactUnreadableError,
    BadSignatureError,
    DigestMismatchError,
    DuplicateSubjectError,
    FlowpinError,
    ManifestError,
    ManifestParseError,
    MissingSignatureError,
    PathError,
    SchemaError,
    UnsupportedVersionError,
    UntrustedKeyError,
    WriteError,
)
from flowpin.manifest.record import record
from flowpin.manifest.statement import load_manifest
from flowpin.manifest.verify import VerifyReport
from flowpin.signing import PAYLOAD_TYPE, Signer, keyid_of
from helpers import Project, make_unreadable

FILE_OUT = "artifacts/train/model.bin"
DIR_OUT = "artifacts/train/shards"


def only_finding(report: VerifyReport) -> tuple[str, FlowpinError]:
    assert len(report.findings) == 1, [str(f) for f in report.findings]
    return report.findings[0].artifact, report.findings[0].error


def write_signed(path: Path, statement: dict[str, Any], signer: Signer) -> None:
    """Sign ``statement`` as flowpin does, but write it without flowpin's own validation."""
    envelope = signer.sign(PAYLOAD_TYPE, canonical_json(statement))
    path.write_text(json.dumps(envelope, indent=2))


def resign(project: Project, path: Path, mutate: Callable[[dict[str, Any]], None]) -> None:
    statement = copy.deepcopy(load_manifest(path).statement)
    mutate(statement)
    write_signed(path, statement, project.signer)


@pytest.fixture
def recorded(project: Project) -> Path:
    return project.record_stage("train")


# --- the baseline these tests break ---------------------------------------------------------------


def test_recorded_manifest_verifies(project: Project, recorded: Path) -> None:
    report = project.verify(recorded)
    assert report.ok, [str(f) for f in report.findings]
    assert report.stage == "train"
    assert report.keyid == project.signer.keyid
    assert report.checked == 2


def test_resigning_unchanged_statement_still_verifies(project: Project, recorded: Path) -> None:
    resign(project, recorded, lambda s: None)  # the helper itself breaks nothing
    assert project.verify(recorded).ok


# --- parse, schema, version -----------------------------------------------------------------------


def test_malformed_json(project: Project, recorded: Path) -> None:
    recorded.write_text('{"payloadType": "application/vnd.in-toto+json", "payload": ,}')
    with pytest.raises(ManifestParseError, match="invalid JSON"):
        load_manifest(recorded)
    assert isinstance(only_finding(project.verify(recorded))[1], ManifestParseError)


def test_truncated_envelope(project: Project, recorded: Path) -> None:
    data = recorded.read_bytes()
    recorded.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestParseError):
        load_manifest(recorded)
    assert isinstance(only_finding(project.verify(recorded))[1], ManifestParseError)


def test_payload_not_json(project: Project, recorded: Path) -> None:
    recorded.write_text(json.dumps(project.signer.sign(PAYLOAD_TYPE, b"not json")))
    with pytest.raises(ManifestParseError, match="payload"):
        load_manifest(recorded)


def test_payload_not_base64(project: Project, recorded: Path) -> None:
    envelope = json.loads(recorded.read_text())
    envelope["payload"] = "%%%not-base64%%%"
    recorded.write_text(json.dumps(envelope))
    with pytest.raises(ManifestParseError, match="base64"):
        load_manifest(recorded)


def test_envelope_schema_violation(project: Project, recorded: Path) -> None:
    envelope = json.loads(recorded.read_text())
    envelope["extra"] = 1
    recorded.write_text(json.dumps(envelope))
    with pytest.raises(SchemaError):
        load_manifest(recorded)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("predicate"),
        lambda s: s.update(_type="https://in-toto.io/Statement/v0.1"),
        lambda s: s.update(predicateType="https://slsa.dev/provenance/v0.2"),
        lambda s: s.update(subject=[]),
        lambda s: s["subject"][0]["digest"].update(flowpinSha256="ABC"),
        lambda s: s["predicate"]["buildDefinition"]["externalParameters"].update(stage="a b"),
        # Python's `$` also matches before a final newline; the schema's patterns must not accept one.
        lambda s: s["predicate"]["buildDefinition"]["externalParameters"].update(stage="train\n"),
        lambda s: s["subject"][0]["digest"].update(flowpinSha256=s["subject"][0]["digest"]["flowpinSha256"] + "\n"),
        lambda s: s["predicate"]["runDetails"]["metadata"].update(startedOn="2026-01-01T00:00:00Z\n"),
    ],
    ids=[
        "no-predicate",
        "wrong-_type",
        "wrong-predicateType",
        "no-subject",
        "bad-digest",
        "bad-stage",
        "stage-trailing-newline",
        "digest-trailing-newline",
        "timestamp-trailing-newline",
    ],
)
def test_statement_schema_violation(project: Project, recorded: Path, mutate: Callable[[Any], Any]) -> None:
    resign(project, recorded, mutate)
    with pytest.raises(SchemaError):
        load_manifest(recorded)
    assert isinstance(only_finding(project.verify(recorded))[1], SchemaError)


def test_unknown_manifest_version(project: Project, recorded: Path) -> None:
    resign(
        project,
        recorded,
        lambda s: s["predicate"]["buildDefinition"]["internalParameters"].update(manifestVersion=2),
    )
    with pytest.raises(UnsupportedVersionError, match="manifestVersion 2"):
        load_manifest(recorded)
    assert isinstance(only_finding(project.verify(recorded))[1], UnsupportedVersionError)


# --- signatures -----------------------------------------------------------------------------------


def test_payload_edited_after_signing(project: Project, recorded: Path) -> None:
    envelope = json.loads(recorded.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    digest = statement["subject"][0]["digest"]["flowpinSha256"]
    statement["subject"][0]["digest"]["flowpinSha256"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    envelope["payload"] = base64.b64encode(canonical_json(statement)).decode()  # old signature kept
    recorded.write_text(json.dumps(envelope))
    load_manifest(recorded)  # still well-formed: only the signature can tell
    assert isinstance(only_finding(project.verify(recorded))[1], BadSignatureError)


def test_signature_from_untrusted_key(project: Project, recorded: Path) -> None:
    key = Ed25519PrivateKey.generate()
    stranger = Signer(key, keyid_of(key.public_key()))
    write_signed(recorded, load_manifest(recorded).statement, stranger)
    assert isinstance(only_finding(project.verify(recorded))[1], UntrustedKeyError)


def test_no_signature(project: Project, recorded: Path) -> None:
    envelope = json.loads(recorded.read_text())
    envelope["signatures"] = []
    recorded.write_text(json.dumps(envelope))
    assert isinstance(only_finding(project.verify(recorded))[1], MissingSignatureError)


# --- subjects on disk -----------------------------------------------------------------------------


def test_subject_file_missing(project: Project, recorded: Path) -> None:
    (project.root / FILE_OUT).unlink()
    artifact, error = only_finding(project.verify(recorded))
    assert (artifact, type(error)) == (FILE_OUT, ArtifactMissingError)


def test_subject_file_changed_by_one_byte(project: Project, recorded: Path) -> None:
    path = project.root / FILE_OUT
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    artifact, error = only_finding(project.verify(recorded))
    assert (artifact, type(error)) == (FILE_OUT, DigestMismatchError)


def test_file_inside_directory_subject_changed_is_named(project: Project, recorded: Path) -> None:
    path = project.root / DIR_OUT / "sub" / "b.txt"
    path.write_text("bets\n")  # same size, one byte differs
    artifact, error = only_finding(project.verify(recorded))
    assert (artifact, type(error)) == (DIR_OUT, DigestMismatchError)
    assert "sub/b.txt" in str(error)
    assert "a.txt" not in str(error)


def test_file_added_to_directory_subject_is_named(project: Project, recorded: Path) -> None:
    (project.root / DIR_OUT / "new.txt").write_text("surprise\n")
    artifact, error = only_finding(project.verify(recorded))
    assert (artifact, type(error)) == (DIR_OUT, DigestMismatchError)
    assert "new.txt" in str(error)


def test_unreadable_subject_file(project: Project, recorded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_unreadable(project.root / DIR_OUT / "a.txt", monkeypatch)
    artifact, error = only_finding(project.verify(recorded))
    assert (artifact, type(error)) == (DIR_OUT, ArtifactUnreadableError)
    assert "a.txt" in str(error)


def test_all_findings_are_reported_not_only_the_first(project: Project, recorded: Path) -> None:
    (project.root / FILE_OUT).unlink()
    (project.root / DIR_OUT / "a.txt").write_text("changed\n")
    report = project.verify(recorded)
    assert {(f.artifact, type(f.error)) for f in report.findings} == {
        (FILE_OUT, ArtifactMissingError),
        (DIR_OUT, DigestMismatchError),
    }


# --- unsafe and duplicate names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x"])
def test_unsafe_output_name_is_refused(project: Project, name: str) -> None:
    project.write_outputs("train")
    with (
        pytest.raises(PathError),
        record("train", recipe={}, code=[], root=project.root, signer=project.signer) as rec,
    ):
        rec.output(name)
    assert not project.manifest_path("train").exists()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "a\\b"])
def test_crafted_unsafe_subject_name_is_a_schema_error(project: Project, recorded: Path, name: str) -> None:
    resign(project, recorded, lambda s: s["subject"][0].update(name=name))
    with pytest.raises(SchemaError):
        load_manifest(recorded)


def test_output_symlink_escaping_repository(project: Project, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not ours")
    (project.root / "artifacts").mkdir()
    (project.root / "artifacts" / "leak.bin").symlink_to(outside)
    with (
        pytest.raises(PathError, match="outside the repository"),
        record("train", recipe={}, code=[], root=project.root, signer=project.signer) as rec,
    ):
        rec.output("artifacts/leak.bin")
    assert not project.manifest_path("train").exists()


def test_output_missing_at_exit(project: Project) -> None:
    with (
        pytest.raises(ArtifactMissingError, match="artifacts/never"),
        record("train", recipe={}, code=[], root=project.root, signer=project.signer) as rec,
    ):
        rec.output("artifacts/never")
    assert not project.manifest_path("train").exists()


def test_output_declared_twice(project: Project) -> None:
    project.write_outputs("train")
    with (
        pytest.raises(DuplicateSubjectError),
        record("train", recipe={}, code=[], root=project.root, signer=project.signer) as rec,
    ):
        rec.output(FILE_OUT)
        rec.output("./" + FILE_OUT)  # the same artifact, spelled differently
    assert not project.manifest_path("train").exists()


def test_input_declared_twice(project: Project) -> None:
    project.write_outputs("train")
    with (
        pytest.raises(DuplicateSubjectError),
        record("train", recipe={}, code=[], root=project.root, signer=project.signer) as rec,
    ):
        rec.input(FILE_OUT)
        rec.input(FILE_OUT)


def test_crafted_duplicate_subject_names(project: Project, recorded: Path) -> None:
    resign(project, recorded, lambda s: s["subject"].append(copy.deepcopy(s["subject"][0])))
    with pytest.raises(DuplicateSubjectError):
        load_manifest(recorded)
    assert isinstance(only_finding(project.verify(recorded))[1], DuplicateSubjectError)


def test_no_outputs_is_an_error(project: Project) -> None:
    with (
        pytest.raises(ManifestError, match="declared no outputs"),
        record("train", recipe={}, code=[], root=project.root, signer=project.signer),
    ):
        pass
    assert not project.manifest_path("train").exists()


# --- failures leave no manifest -------------------------------------------------------------------


class StageFailed(Exception):
    pass


def test_failing_stage_leaves_no_manifest_and_removes_the_old_one(project: Project, recorded: Path) -> None:
    assert recorded.exists()
    with (
        pytest.raises(StageFailed),
        record("train", recipe={}, code=[], root=project.root, signer=project.signer) as rec,
    ):
        rec.output(FILE_OUT)
        raise StageFailed
    assert not recorded.exists()
    assert list((project.root / "manifests").iterdir()) == []


def test_failed_rename_publishes_nothing(project: Project, recorded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(dst) == str(recorded):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WriteError, match="nothing was published"):
        project.record_stage("train")
    assert list((project.root / "manifests").iterdir()) == []  # no manifest, no temp file


class _HalfWriter:
    """Wraps a file object: the first write writes half the bytes, then fails like a full disk."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def write(self, data: bytes) -> int:
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def test_write_failing_halfway_publishes_nothing(
    project: Project, recorded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _HalfWriter(real_fdopen(fd, *a, **k)))
    with pytest.raises(WriteError, match="No space left"):
        project.record_stage("train")
    assert list((project.root / "manifests").iterdir()) == []


_CRASH_SCRIPT = textwrap.dedent(
    """
    import importlib, os, sys
    from pathlib import Path

    from flowpin.signing import load_signer

    rec_mod = importlib.import_module("flowpin.manifest.record")  # the package re-exports record()

    root = Path(sys.argv[1])
    rec_mod.fingerprint = lambda root: {}  # the environment is not under test; skip importing torch
    real_fdopen = os.fdopen

    class Dies:
        def __init__(self, fh):
            self.fh = fh
        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            os._exit(137)  # killed mid-write: no exception handler, no cleanup runs
        def __getattr__(self, name):
            return getattr(self.fh, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.fh.close()

    os.fdopen = lambda fd, *a, **k: Dies(real_fdopen(fd, *a, **k))
    signer = load_signer(root, root / ".flowpin" / "keys" / "signing.key")
    with rec_mod.record("train", recipe={}, code=[], root=root, signer=signer) as rec:
        rec.output("artifacts/train/model.bin")
    """
)


def test_crash_mid_write_leaves_nothing_that_verifies(project: Project, recorded: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(project.root)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 137, proc.stderr
    assert not recorded.exists()  # the previous manifest was removed on entry; the new one never published
    leftovers = list((project.root / "manifests").iterdir())
    assert leftovers, "expected the crashed writer's temp file"
    assert all(not p.name.endswith(".json") for p in leftovers)  # `verify --all` does not pick them up
    for path in leftovers:
        assert path.stat().st_size > 0
        assert isinstance(only_finding(project.verify(path))[1], ManifestParseError)
