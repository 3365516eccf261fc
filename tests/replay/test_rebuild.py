"""``flowpin rebuild``: real stages re-run in scratch workspaces from what their manifests pin.

One scratch project records ``ingest → dedup`` (real stage scripts; ingest by `dvc repro`, in a copy of the
session's conftest.py ``ingest_flow``) and ``salted``, a tiny stage added here whose output also depends on
two environment variables: ``FLOWPIN_TEST_SALT`` (fingerprinted, so pinned and replayed) and
``REBUILD_TEST_SALT`` (not fingerprinted: a dependency the manifest cannot see).
Tests that change the project work on a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowpin.canonical import canonical_json
from flowpin.cli import main
from flowpin.errors import EntryPointError, FlowpinError, MissingEntryPointError, SchemaError
from flowpin.manifest.record import entry_script, record
from flowpin.manifest.statement import EntryPoint, load_manifest, write_manifest
from flowpin.replay.rebuild import (
    GitHistory,
    RebuildError,
    RebuildOptions,
    RebuildResult,
    SubjectDifference,
    dependency_order,
    exit_status,
    rebuild_command,
    rebuild_manifest,
    subject_differences,
)
from flowpin.signing import PAYLOAD_TYPE, load_signer
from helpers import Project, checked, copy_project, scratch_env

SALTED_SCRIPT = '''"""A test stage whose output depends on its recipe and two environment variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaltedConfig:
    text: str


@hydra.main(config_path="../params", config_name="salted", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("salted", cfg, SaltedConfig, root=ROOT) as run:
        salt = os.environ.get("FLOWPIN_TEST_SALT", "") + os.environ.get("REBUILD_TEST_SALT", "")
        (run.out_dir / "out.txt").write_text(run.recipe.text + salt + "\\n")
        (run.out_dir / "same.txt").write_text("constant\\n")
        run.report = {"chars": len(run.recipe.text + salt)}


if __name__ == "__main__":
    main()
'''

SALTED_RECIPE = """defaults:
  - common/hydra
  - _self_
paths:
  out: data/salted
  report: reports/salted.json
  manifest: manifests/salted.json
salted:
  text: hello
"""


def _add_salted_stage(root: Path) -> None:
    (root / "stages" / "salted.py").write_text(SALTED_SCRIPT)
    (root / "params" / "salted.yaml").write_text(SALTED_RECIPE)
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc["stages"]["salted"] = {
        "cmd": "python stages/salted.py",
        "deps": ["stages/salted.py", "src/flowpin/stage.py", "src/flowpin/recipe.py"],
        "outs": ["data/salted"],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))


def _run_stage(root: Path, script: str, *args: str, **env: str) -> None:
    full = {**scratch_env(root), **env}
    for name in ("FLOWPIN_TEST_SALT", "REBUILD_TEST_SALT"):
        if name not in env:
            full.pop(name, None)
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=root, env=full, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def flow(ingest_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_project(ingest_flow, tmp_path_factory.mktemp("rebuild") / "p")  # ingest run by `dvc repro`
    _add_salted_stage(root)
    _run_stage(root, "stages/dedup.py")
    _run_stage(root, "stages/salted.py", FLOWPIN_TEST_SALT="pinned")
    return root


@pytest.fixture
def copy(flow: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(flow, root, symlinks=True)
    return root


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWPIN_TEST_SALT", "REBUILD_TEST_SALT", "FLOWPIN_SIGNING_KEY", "FLOWPIN_DIGEST_ALGORITHM"):
        monkeypatch.delenv(name, raising=False)


def rebuild(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setenv("FLOWPIN_ROOT", str(root))
    monkeypatch.chdir(root)
    code = main(["rebuild", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


# --- real stages -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_rebuilding_dedup_is_identical_and_leaves_the_project_alone(
    flow: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(flow)
    code, out, err = rebuild(flow, monkeypatch, capsys, "manifests/dedup.json")
    assert code == 0, out + err
    assert out.startswith("identical: dedup (1 subject(s), ")
    assert "recorded differences" not in out  # same recipe, inputs and environment, git state aside
    assert "rebuild: 1 identical, 0 differ, 0 could not be rebuilt" in out
    assert _snapshot(flow) == before


@pytest.mark.slow
def test_a_tampered_output_does_not_matter_the_rebuild_starts_from_the_inputs(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = copy / "data" / "salted" / "out.txt"
    out_file.write_text("tampered\n")
    code, out, err = rebuild(copy, monkeypatch, capsys, "manifests/salted.json")
    assert code == 0, out + err
    assert out.startswith("identical: salted (1 subject(s), 2 file(s))")
    assert out_file.read_text() == "tampered\n"  # the project's outputs are not repaired either


def test_a_tampered_input_is_a_named_error_before_anything_runs(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    index = copy / "data" / "ingest" / "index.json"
    index.write_text(index.read_text() + " ")
    code, out, _ = rebuild(copy, monkeypatch, capsys, "manifests/dedup.json")
    assert code == 2
    assert "ERROR: dedup: PinnedInputError" in out
    assert "data/ingest: sha256 " in out and "(changed: index.json)" in out
    assert "dvc checkout" in out and "dvc pull" in out


def test_a_missing_input_is_a_named_error(copy: Path) -> None:
    shutil.rmtree(copy / "data" / "ingest")
    with pytest.raises(Exception, match="data/ingest: missing") as info:
        rebuild_manifest(copy / "manifests" / "dedup.json", root=copy)
    assert type(info.value).__name__ == "PinnedInputError"


@pytest.mark.slow
def test_recipe_drift_is_refused_then_rebuilt_and_explained_with_allow_code_drift(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = copy / "params" / "dedup.yaml"
    doc = yaml.safe_load(recipe.read_text())
    doc["dedup"]["shards"]["docs_per_shard"] = 50
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))

    code, out, _ = rebuild(copy, monkeypatch, capsys, "manifests/dedup.json")
    assert code == 2
    assert "ERROR: dedup: CodeDriftError" in out
    assert "params/dedup.yaml" in out and "--allow-code-drift" in out

    code, out, _ = rebuild(copy, monkeypatch, capsys, "--allow-code-drift", "manifests/dedup.json")
    assert code == 1, out
    assert "DIFFERS: dedup: data/dedup (" in out
    assert "added: shard-00002.jsonl.zst" in out
    assert "[recipe] dedup.shards.docs_per_shard: 256 → 50" in out
    assert "[input] params/dedup.yaml" in out and "code drift" in out


@pytest.mark.slow
def test_a_failing_stage_is_an_error_with_the_tail_of_its_log(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = copy / "stages" / "salted.py"
    script.write_text(
        script.read_text().replace(
            "salt = os.environ", 'raise SystemExit("salt mine closed")\n        salt = os.environ'
        )
    )
    work = tmp_path / "work"
    code, out, _ = rebuild(
        copy, monkeypatch, capsys, "--allow-code-drift", "--workdir", str(work), "manifests/salted.json"
    )
    assert code == 2
    assert "ERROR: salted: RebuildError: the stage exited with status 1" in out
    assert "salt mine closed" in out
    assert f"workspace kept: {work.resolve()}" in out
    assert "salt mine closed" in (work / "rebuild.log").read_text()


@pytest.mark.slow
def test_pinned_config_is_recovered_from_git_history(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checked(copy, "git", "add", "params/salted.yaml")
    checked(copy, "git", "commit", "-q", "-m", "the recipe salted was recorded with")
    commit = checked(copy, "git", "rev-parse", "HEAD").strip()
    recipe = copy / "params" / "salted.yaml"
    recipe.write_text(recipe.read_text().replace("text: hello", "text: changed later"))
    code, out, err = rebuild(copy, monkeypatch, capsys, "manifests/salted.json")
    assert code == 0, out + err
    assert out.startswith("identical: salted")
    assert f"pinned code/config from: git {commit[:12]} (1)" in out
    assert "text: changed later" in recipe.read_text()  # the checkout is left as it is


@pytest.mark.slow
def test_an_unpinned_dependency_makes_a_difference_named_file_by_file(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_stage(copy, "stages/salted.py", FLOWPIN_TEST_SALT="pinned", REBUILD_TEST_SALT="only-the-first-time")
    code, out, err = rebuild(copy, monkeypatch, capsys, "manifests/salted.json")
    assert code == 1, out + err
    assert "DIFFERS: salted: data/salted (out.txt)" in out
    assert "1 of 1 subject(s) differ" in out
    assert "nothing the manifest records differs" in out


@pytest.mark.slow
def test_pinned_environment_variables_are_replayed(
    flow: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLOWPIN_TEST_SALT", "something else")  # the manifest pins "pinned"
    code, out, err = rebuild(flow, monkeypatch, capsys, "--json", "manifests/salted.json")
    assert code == 0, out + err
    assert '"verdict": "identical"' in out


@pytest.mark.slow
def test_all_rebuilds_parents_first_and_keeps_workdirs(
    flow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    code, out, err = rebuild(flow, monkeypatch, capsys, "--all", "--workdir", str(work))
    assert code == 0, out + err
    verdicts = [line.split(" (")[0] for line in out.splitlines() if line.startswith("identical: ")]
    assert verdicts == ["identical: ingest", "identical: salted", "identical: dedup"]
    assert "rebuild: 3 identical, 0 differ, 0 could not be rebuilt" in out
    kept = work / "dedup"
    assert (kept / "rebuild.log").is_file()
    assert (
        load_manifest(kept / "manifests" / "dedup.json").subjects
        == load_manifest(flow / "manifests" / "dedup.json").subjects
    )
    assert (kept / "data" / "ingest").is_dir()  # its pinned input, copied
    # --stage narrows --all; a kept workspace can be reused
    code, out, _ = rebuild(flow, monkeypatch, capsys, "--all", "--stage", "salted", "--workdir", str(work / "salted"))
    assert code == 0 and out.count("identical: ") == 1


def test_workdir_must_be_outside_the_project_and_empty_or_a_rebuild(
    flow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = rebuild(flow, monkeypatch, capsys, "--workdir", str(flow / "scratch"), "manifests/salted.json")
    assert code == 2 and "overlaps the project" in out
    assert not (flow / "scratch").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep-me.txt").write_text("mine")
    code, out, _ = rebuild(flow, monkeypatch, capsys, "--workdir", str(foreign), "manifests/salted.json")
    assert code == 2 and "not empty" in out
    assert (foreign / "keep-me.txt").read_text() == "mine"


def test_usage_errors(flow: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = rebuild(flow, monkeypatch, capsys)
    assert code == 2 and "nothing to rebuild" in err
    code, _, err = rebuild(flow, monkeypatch, capsys, "--all", "--stage", "nope")
    assert code == 2 and "RebuildError" in err and "nope" in err


def test_an_untrusted_manifest_is_not_rebuilt(copy: Path) -> None:
    for pub in (copy / "keys").glob("*.pub"):
        pub.unlink()
    with pytest.raises(Exception, match="trust store") as info:
        rebuild_manifest(copy / "manifests" / "salted.json", root=copy)
    assert type(info.value).__name__ == "UnverifiedManifestError"
    assert type(info.value.__cause__).__name__ == "UntrustedKeyError"


# --- the entry point the manifest records (issue #14 item 8) -----------------------------------------

VARIANT_RECIPE = (
    SALTED_RECIPE.replace("  - _self_", "  - salt: extra\n  - _self_")
    .replace("salted.json", "salted_variant.json")
    .replace("data/salted", "data/salted_variant")
)
"""A variant of the salted recipe (run with ``--config-name salted_variant``) that also composes a group option."""


@pytest.mark.slow
def test_a_variant_run_records_its_entry_point_and_is_rebuilt_from_it_not_from_the_pinned_files(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config-name salted_variant`` is recorded as the entry point; a manifest whose first pinned config is
    not the primary one (the old guess took the first) is rebuilt from what it records, identically."""
    assert load_manifest(copy / "manifests" / "dedup.json").entry_point == EntryPoint(
        script="stages/dedup.py", config_name="dedup", config_dir="params"
    )
    (copy / "params" / "salted_variant.yaml").write_text(VARIANT_RECIPE)
    (copy / "params" / "salt").mkdir()
    (copy / "params" / "salt" / "extra.yaml").write_text("note: a group option\n")
    _run_stage(copy, "stages/salted.py", "--config-name", "salted_variant")
    path = copy / "manifests" / "salted_variant.json"
    m = load_manifest(path)
    assert m.stage == "salted"  # the block's stage and dvc.yaml entry: a variant run outside DVC
    assert m.entry_point == EntryPoint(script="stages/salted.py", config_name="salted_variant", config_dir="params")
    assert m.build["externalParameters"]["entryPoint"] == {
        "script": "stages/salted.py",
        "configName": "salted_variant",
        "configDir": "params",
    }
    configs = m.dependency_names("config")
    assert configs == ["params/salted_variant.yaml", "params/salt/extra.yaml"]
    # the order of the pinned files says nothing: put another config first and sign it with the project's key
    statement = copy_statement(m)
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    deps.sort(key=lambda d: d["name"] != "params/salt/extra.yaml")
    write_manifest(path, statement, load_signer(copy))
    assert load_manifest(path).dependency_names("config")[0] == "params/salt/extra.yaml"

    code, out, err = rebuild(copy, monkeypatch, capsys, "--json", "manifests/salted_variant.json")
    assert code == 0, out + err
    (result,) = json.loads(out)
    assert result["verdict"] == "identical"
    assert result["command"] == ["python", "stages/salted.py", "--config-name", "salted_variant"]


def test_the_entry_script_of_a_launcher_worker_is_the_task_function_s_file(tmp_path: Path) -> None:
    """In a joblib/submitit worker ``__main__`` is the launcher's; the stage script's function, pickled by
    value, keeps its file and ``__name__ == "__main__"``: that is the script recorded. A caller that is not a
    script (this test) records none."""
    root = tmp_path / "repo"
    (root / "stages").mkdir(parents=True)
    script = root / "stages" / "job.py"
    code = compile("found = entry_script(root)", str(script), "exec")
    space: dict[str, Any] = {"__name__": "__main__", "entry_script": entry_script, "root": root}
    exec(code, space)
    assert space["found"] == "stages/job.py"
    space = {"__name__": "stages.job", "entry_script": entry_script, "root": root}
    exec(code, space)
    assert space["found"] is None
    assert entry_script(root) is None


def _entry_project(p: Project) -> None:
    """Files a hand-built manifest pins: one stage script, its primary config and a group config."""
    for name, text in (
        ("stages/salted.py", "print('salted')\n"),
        ("stages/other.py", "print('other')\n"),
        ("params/salted.yaml", "salted: {text: hi}\n"),
        ("params/other.yaml", "other: {}\n"),
        ("params/common/hydra.yaml", "hydra: {}\n"),
    ):
        (p.root / name).parent.mkdir(parents=True, exist_ok=True)
        (p.root / name).write_text(text)


def _entry_manifest(p: Project, entry: EntryPoint | None, **note: Any) -> Path:
    """A signed manifest (no stage run) pinning stages/salted.py as code and two configs, with ``entry``."""
    _entry_project(p)
    p.write_outputs("salted")
    with record(
        "salted",
        recipe={"salted": {"text": "hi"}},
        config_files=["params/common/hydra.yaml", "params/salted.yaml"],
        code=["stages/salted.py"],
        root=p.root,
        signer=p.signer,
        entry_point=entry,
    ) as rec:
        rec.output("artifacts/salted/model.bin")
        if note:
            rec.note("fork", **note)
    return p.manifest_path("salted")


SALTED_ENTRY = EntryPoint(script="stages/salted.py", config_name="salted")


def test_the_rebuild_command_is_the_recorded_entry_point(project: Project) -> None:
    m = load_manifest(_entry_manifest(project, SALTED_ENTRY))
    assert m.entry_point == SALTED_ENTRY
    assert m.require_entry_point(root=project.root, purpose="rebuild it") == SALTED_ENTRY
    assert rebuild_command(m, project.root) == ["python", "stages/salted.py", "--config-name", "salted"]


def test_a_manifest_without_an_entry_point_is_refused_by_name(project: Project, tmp_path: Path) -> None:
    path = _entry_manifest(project, None)
    work = tmp_path / "ws"
    with pytest.raises(MissingEntryPointError) as info:
        rebuild_manifest(path, root=project.root, options=RebuildOptions(workdir=work))
    message = str(info.value)
    assert str(path) in message and "recorded before manifests pinned their entry point" in message
    assert "re-run stage salted" in message and "dvc repro salted" in message
    assert not work.exists()


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("script", "stages/other.py", "'stages/other.py', which is not a code file the manifest pins"),
        ("configName", "other", "'params/other.yaml', which is not a config file the manifest pins"),
        ("configDir", "stages", "'stages/salted.yaml', which is not a config file the manifest pins"),
        ("script", "stages/link.py", "outside the repository"),
    ],
    ids=["unpinned-script", "unpinned-config", "other-config-dir", "symlink-out"],
)
def test_a_signed_entry_point_that_names_what_is_not_pinned_is_refused(
    project: Project, tmp_path: Path, field: str, value: str, problem: str
) -> None:
    """Signed by the project's own key (a signature proves who, not what): the script that would run must be
    one the manifest pins, inside the repository."""
    path = _entry_manifest(project, SALTED_ENTRY)
    outside = tmp_path / "outside.py"
    outside.write_text("raise SystemExit('ran the script outside')\n")
    (project.root / "stages" / "link.py").symlink_to(outside)
    statement = copy_statement(load_manifest(path))
    statement["predicate"]["buildDefinition"]["externalParameters"]["entryPoint"][field] = value
    write_manifest(path, statement, project.signer)
    work = tmp_path / "ws"
    with pytest.raises(EntryPointError) as info:
        rebuild_manifest(path, root=project.root, options=RebuildOptions(workdir=work))
    assert type(info.value) is EntryPointError
    assert problem in str(info.value)
    assert "re-run stage salted" in str(info.value)
    assert not work.exists()


@pytest.mark.parametrize("script", ["../outside.py", "/tmp/outside.py", "stages/../../outside.py"])
def test_a_signed_entry_point_outside_the_repository_is_refused_before_anything_runs(
    project: Project, tmp_path: Path, script: str
) -> None:
    """The writer refuses such a statement; one signed around it (the hostile tests' re-signing) fails the
    schema when read, before the rebuild looks at it."""
    path = _entry_manifest(project, SALTED_ENTRY)
    statement = copy_statement(load_manifest(path))
    statement["predicate"]["buildDefinition"]["externalParameters"]["entryPoint"]["script"] = script
    with pytest.raises(SchemaError):
        write_manifest(path, statement, project.signer)
    envelope = project.signer.sign(PAYLOAD_TYPE, canonical_json(statement))
    path.write_text(json.dumps(envelope, indent=2, sort_keys=True))
    work = tmp_path / "ws"
    with pytest.raises(SchemaError, match="entryPoint/script"):
        rebuild_manifest(path, root=project.root, options=RebuildOptions(workdir=work))
    assert not work.exists()


def test_a_fork_record_is_not_rebuilt_from_scratch(project: Project, tmp_path: Path) -> None:
    again = ["flowpin", "fork", "manifests/pretrain.json", "--step", "3", "--out", "runs/f", "a=1"]
    path = _entry_manifest(project, SALTED_ENTRY, parent="manifests/pretrain.json", step=3, command=again)
    with pytest.raises(RebuildError) as info:
        rebuild_manifest(path, root=project.root, options=RebuildOptions(workdir=tmp_path / "ws"))
    assert "records a `flowpin fork` of manifests/pretrain.json at step 3" in str(info.value)
    assert "re-run it with: flowpin fork manifests/pretrain.json --step 3 --out runs/f a=1" in str(info.value)
    assert not (tmp_path / "ws").exists()


def copy_statement(m: Any) -> dict[str, Any]:
    return json.loads(json.dumps(m.statement))  # type: ignore[no-any-return]


# --- the pieces ------------------------------------------------------------------------------------


def test_subject_differences_name_changed_added_and_removed_files() -> None:
    def subject(name: str, digest: str, files: dict[str, str] | None = None) -> dict[str, object]:
        ann: dict[str, object] = {"flowpin.type": "directory" if files else "file", "flowpin.size": 1}
        if files:
            ann["flowpin.files"] = files
        return {"name": name, "digest": {"flowpinSha256": digest}, "annotations": ann}

    pinned = [subject("d", "1", {"a": "x", "b": "y", "gone": "z"}), subject("f", "2"), subject("same", "3")]
    rebuilt = [subject("d", "9", {"a": "x", "b": "Y", "new": "n"}), subject("same", "3"), subject("extra", "4")]
    diffs = subject_differences(pinned, rebuilt)
    assert diffs == [
        SubjectDifference(
            name="d", pinned="sha256:1", rebuilt="sha256:9", changed=("b",), added=("new",), removed=("gone",)
        ),
        SubjectDifference(name="extra", pinned=None, rebuilt="sha256:4"),
        SubjectDifference(name="f", pinned="sha256:2", rebuilt=None),
    ]
    assert diffs[0].describe() == "d (b; added: new; removed: gone)"
    assert diffs[1].describe() == "extra (produced by the rebuild, not pinned by the manifest)"
    assert diffs[2].describe() == "f (not produced by the rebuild)"
    assert subject_differences(pinned, pinned) == []


def test_exit_status_errors_beat_differences_beat_identical() -> None:
    same = RebuildResult(manifest="a")
    differs = RebuildResult(manifest="b", differences=[SubjectDifference(name="x", pinned="1", rebuilt="2")])
    failed = RebuildResult(manifest="c", error=FlowpinError("boom"))
    assert exit_status([same, same]) == 0
    assert exit_status([same, differs]) == 1
    assert exit_status([differs, failed, same]) == 2
    assert exit_status([]) == 0


def test_dependency_order_puts_parents_first(flow: Path) -> None:
    paths = sorted((flow / "manifests").glob("*.json"), reverse=True)
    order = [m.stage for m in dependency_order([load_manifest(p) for p in paths], flow)]
    assert order == ["ingest", "salted", "dedup"]


def test_git_history_finds_an_earlier_version_by_content(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@x"
    for text in ("one\n", "two\n", "three\n"):
        (repo / "f.txt").write_text(text)
        for cmd in (["git", "init", "-q"], ["git", "add", "f.txt"], ["git", "commit", "-q", "-m", text]):
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    found = GitHistory(repo).find("f.txt", None, lambda data: data == b"one\n")
    assert found is not None and found[1] == b"one\n"
    assert GitHistory(repo).find("f.txt", None, lambda data: data == b"never\n") is None
    assert GitHistory(tmp_path / "not-a-repo").find("f.txt", None, lambda data: True) is None


@pytest.mark.slow
def test_the_temporary_workspace_is_removed_unless_kept(
    flow: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = rebuild_manifest(flow / "manifests" / "salted.json", root=flow)
    assert result.identical and result.workdir is None
    assert list(tmp_path.iterdir()) == []
    kept = rebuild_manifest(flow / "manifests" / "salted.json", root=flow, options=RebuildOptions(keep=True))
    assert kept.workdir is not None and kept.workdir.parent == tmp_path.resolve()
    assert "stages/salted.py --config-name salted\n" in (kept.workdir / "rebuild.log").read_text()
