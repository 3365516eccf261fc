"""``flowpin rebuild``: real stages re-run in scratch workspaces from what their manifests pin.

One scratch project records ``ingest → dedup`` (real stage scripts) and ``salted``, a tiny stage added
here whose output also depends on two environment variables: ``FLOWPIN_TEST_SALT`` (fingerprinted, so
pinned and replayed) and ``REBUILD_TEST_SALT`` (not fingerprinted: a dependency the manifest cannot see).
Tests that change the project work on a copy of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import checked, make_project, scratch_env
from flowpin.cli import main
from flowpin.errors import FlowpinError
from flowpin.manifest.model import load_manifest
from flowpin.manifest.rebuild import (
    GitHistory,
    RebuildOptions,
    RebuildResult,
    SubjectDifference,
    dependency_order,
    exit_status,
    rebuild_manifest,
    subject_differences,
)

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
def flow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("rebuild") / "p")
    _add_salted_stage(root)
    _run_stage(root, "stages/ingest.py")
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
