"""Hostile output paths (issue #13, item 3): nothing outside the repository is written before a refusal.

Every case runs the real stage script (``stages/synth.py``, the cheapest stage: no inputs, tiny recipe
overrides) or ``flowpin fork`` in a scratch project, next to victim files outside it, and checks the exit
status, the named error, a message naming the key and the fix, and that nothing outside the project was
created, changed or removed -- nor the project's previous manifest, which a refused run must not delete.
Unit tests cover the rules of :func:`flowpin.paths.check_output_path` and
:func:`flowpin.stage.check_stage_paths` that a stage run cannot reach cheaply.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowpin.errors import PathError
from flowpin.manifest.statement import load_manifest
from flowpin.paths import check_output_path
from flowpin.recipe import StageInput, StagePaths, user_hydra_overrides
from flowpin.stage import check_stage_paths
from helpers import BIN, make_project, scratch_env

TINY = [
    "synth.arithmetic.train=20",
    "synth.arithmetic.heldout=5",
    "synth.word_problem.train=10",
    "synth.word_problem.heldout=5",
]
"""A synth recipe small enough that a run which is not refused finishes in about a second."""


def run(root: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**scratch_env(root), "FLOWPIN_TRACKING": "off"}
    return subprocess.run(
        list(args), cwd=cwd or root, env=env, capture_output=True, text=True, check=False, timeout=300
    )


def synth(
    root: Path, *overrides: str, cwd: Path | None = None, multirun: bool = False
) -> subprocess.CompletedProcess[str]:
    flags = ["-m"] if multirun else []
    return run(root, sys.executable, str(root / "stages" / "synth.py"), *flags, *TINY, *overrides, cwd=cwd)


def snapshot(base: Path, *, skip: Path) -> dict[str, object]:
    """Every entry under ``base`` except ``skip``: file bytes, symlink targets, directories."""
    seen: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if here / d != skip)
        for name in [*dirnames, *filenames]:
            path = here / name
            rel = path.relative_to(base).as_posix()
            if path.is_symlink():
                seen[rel] = ("symlink", os.readlink(path))
            elif path.is_dir():
                seen[rel] = "dir"
            else:
                seen[rel] = path.read_bytes()
    return seen


class Scene:
    """A scratch project ``<base>/p`` that has run synth once, and victims in ``<base>/outside``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = make_project(base / "p")
        proc = synth(self.root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self.outside = base / "outside"
        (self.outside / "outdir").mkdir(parents=True)
        (self.outside / "outdir" / "keep.txt").write_bytes(b"an existing file in the target directory\n")
        (self.outside / "victim.txt").write_bytes(b"victim: must not be overwritten\n")
        (self.outside / "report.json").write_bytes(b'{"victim": true}\n')
        (self.outside / "target").mkdir()
        (self.root / "data" / "link").symlink_to(self.outside / "target", target_is_directory=True)

    def state(self) -> tuple[dict[str, object], bytes]:
        """Everything outside the project, and the project's manifest of the last good run."""
        return snapshot(self.base, skip=self.root), (self.root / "manifests" / "synth.json").read_bytes()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    return Scene(tmp_path_factory.mktemp("hostile-paths"))


def assert_refused(proc: subprocess.CompletedProcess[str], key: str, *, status: int = 2) -> None:
    """Refused with a named error whose message names ``key`` and the fix; no traceback."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert f"flowpin: PathError: {key}=" in proc.stderr, proc.stderr
    assert f"set {key} to a path inside the repository" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def refused_untouched(scene: Scene, key: str, *overrides: str, cwd: Path | None = None, multirun: bool = False) -> str:
    before = scene.state()
    proc = synth(scene.root, *overrides, cwd=cwd, multirun=multirun)
    assert_refused(proc, key)
    assert scene.state() == before  # nothing outside created, changed or removed; the old manifest kept
    return proc.stderr


# --- stage paths ----------------------------------------------------------------------------------


def test_absolute_paths_out_is_refused_before_the_directory_is_replaced(scene: Scene) -> None:
    """Was: the existing file in the target directory deleted, then a failure."""
    err = refused_untouched(scene, "paths.out", f"paths.out={scene.outside}/outdir")
    assert "is absolute" in err


def test_absolute_paths_manifest_is_refused_before_the_file_is_overwritten(scene: Scene) -> None:
    """Was: the victim overwritten by a signed manifest, exit status 0."""
    err = refused_untouched(scene, "paths.manifest", f"paths.manifest={scene.outside}/victim.txt")
    assert "is absolute" in err


def test_absolute_paths_report_is_refused_before_the_file_is_overwritten(scene: Scene) -> None:
    """Was: the victim overwritten by the report, then a failure."""
    err = refused_untouched(scene, "paths.report", f"paths.report={scene.outside}/report.json")
    assert "is absolute" in err


def test_paths_out_escaping_with_dotdot_is_refused_before_shards_are_written(scene: Scene) -> None:
    """Was: shards written to ``<base>/x/relout``, then a failure."""
    err = refused_untouched(scene, "paths.out", "paths.out=../x/relout")
    assert "contains '..'" in err


def test_paths_out_through_a_symlink_leaving_the_repository_is_refused(scene: Scene) -> None:
    err = refused_untouched(scene, "paths.out", "paths.out=data/link/synth")
    assert f"resolves through a symlink to {scene.outside.resolve()}/target/synth" in err


def test_a_report_into_git_hooks_is_refused(scene: Scene) -> None:
    """A protected place inside the repository: a report written as a git hook would be run by git."""
    err = refused_untouched(scene, "paths.report", "paths.report=.git/hooks/post-checkout")
    assert "lies in .git/" in err
    assert not (scene.root / ".git" / "hooks" / "post-checkout").exists()


# --- where Hydra writes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "override", "multirun"),
    [
        ("hydra.run.dir", "hydra.run.dir={outside}/run", False),
        ("hydra.run.dir", "hydra.run.dir=../x/run", False),
        ("hydra.output_subdir", "hydra.output_subdir={outside}/snapshot", False),
        ("hydra.job_logging.handlers.file.filename", "hydra.job_logging.handlers.file.filename=../x/job.log", False),
        ("hydra.sweep.dir", "hydra.sweep.dir={outside}/sweep", True),
        ("hydra.sweep.subdir", "hydra.sweep.subdir=../../../../x/job", True),
    ],
    ids=["run-dir-absolute", "run-dir-dotdot", "output-subdir", "log-file", "sweep-dir", "sweep-subdir"],
)
def test_hydra_writing_outside_is_refused_before_hydra_writes(
    scene: Scene, key: str, override: str, multirun: bool
) -> None:
    """Was (``hydra.run.dir=/tmp/x``): Hydra's log written outside, and the override missing from the manifest."""
    refused_untouched(scene, key, override.format(outside=scene.outside), multirun=multirun)


def test_a_stage_run_from_outside_the_repository_is_refused_before_hydra_writes_there(scene: Scene) -> None:
    """The default ``hydra.run.dir`` is relative to the working directory: from outside it would log there."""
    err = refused_untouched(scene, "hydra.run.dir", cwd=scene.outside)
    assert f"from the working directory {scene.outside}" in err


@pytest.fixture(scope="module")
def hydra_recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose synth manifest was recorded with Hydra overrides (run dir inside the repository)."""
    root = make_project(tmp_path_factory.mktemp("hydra-recorded") / "p")
    proc = synth(root, "hydra.run.dir=.flowpin/hydra/custom", "hydra.job.chdir=true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def test_hydra_overrides_are_recorded_in_the_manifest(hydra_recorded: Path) -> None:
    m = load_manifest(hydra_recorded / "manifests" / "synth.json")
    overrides = m.build["externalParameters"]["overrides"]
    assert overrides == [*TINY, "hydra.run.dir=.flowpin/hydra/custom", "hydra.job.chdir=true"]  # no hydra.mode
    assert (hydra_recorded / ".flowpin" / "hydra" / "custom" / "synth.log").is_file()


@pytest.mark.slow
def test_rebuild_replays_recorded_hydra_overrides_inside_its_workspace(hydra_recorded: Path) -> None:
    before = snapshot(hydra_recorded, skip=hydra_recorded / ".git")
    proc = run(hydra_recorded, str(BIN / "flowpin"), "rebuild", "--json", "manifests/synth.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout)
    assert result["verdict"] == "identical" and result["causes"] == []  # same overrides recorded by the rebuild
    assert result["command"][-2:] == ["hydra.run.dir=.flowpin/hydra/custom", "hydra.job.chdir=true"]
    # the replayed run directory was the workspace's: not even a log line in the project
    assert snapshot(hydra_recorded, skip=hydra_recorded / ".git") == before


def test_only_the_run_mode_hydra_appends_itself_is_left_out_of_the_overrides() -> None:
    given = ["hydra.run.dir=x", "hydra/launcher=joblib", "hydra.mode=RUN", "+hydra.job.env_set.A=1"]
    assert user_hydra_overrides(given) == ("hydra.run.dir=x", "hydra/launcher=joblib", "+hydra.job.env_set.A=1")


# --- flowpin fork --out ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out", "problem"),
    [("{outside}/fork", "is absolute"), ("../x/fork", "contains '..'")],
    ids=["absolute", "dotdot"],
)
def test_fork_out_outside_is_a_named_error_before_anything_is_read_or_written(
    scene: Scene, out: str, problem: str
) -> None:
    """Was: ``--out /abs`` a ValueError traceback; ``--out ../x`` training outside, then a refusal. The parent
    named here does not even exist: ``--out`` is checked before the parent is read."""
    before = scene.state()
    proc = run(
        scene.root,
        str(BIN / "flowpin"),
        "fork",
        "manifests/pretrain.json",
        "--step",
        "3",
        "--out",
        out.format(outside=scene.outside),
    )
    assert_refused(proc, "--out", status=2)
    assert problem in proc.stderr
    assert scene.state() == before
    assert not (scene.root / "runs").exists()


# --- the rules, in process ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "is empty"),
        ("/etc/passwd", "is absolute"),
        ("data/../../x", "contains '..'"),
        ("data\\x", "backslash"),
        (".", "repository root itself"),
        ("./", "repository root itself"),
        (".git/config", "lies in .git/"),
        (".dvc/cache/x", "lies in .dvc/"),
        ("keys/evil.pub", "lies in keys/"),
        (".flowpin/keys/signing.key", "lies in .flowpin/keys/"),
        (".flowpin", "holds .flowpin/keys/"),
    ],
)
def test_check_output_path_refuses(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(PathError, match=r"^paths\.out=.*set paths\.out to a path inside the repository") as info:
        check_output_path(value, tmp_path, what="paths.out")
    assert problem in str(info.value)


def test_check_output_path_follows_symlinks_to_where_they_lead(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "data" / "to-root").symlink_to(root, target_is_directory=True)
    (root / "data" / "to-git").symlink_to(root / ".git", target_is_directory=True)
    with pytest.raises(PathError, match="repository root itself"):
        check_output_path("data/to-root", root, what="paths.out")
    with pytest.raises(PathError, match=r"lies in \.git/"):
        check_output_path("data/to-git/x", root, what="paths.out")
    assert check_output_path("./data/new/out/", root, what="paths.out") == "data/new/out"


def test_every_key_of_the_paths_block_is_checked(tmp_path: Path) -> None:
    good = StagePaths(
        inputs={"corpus": StageInput(data="data/in", manifest="manifests/in.json")},
        out="data/out",
        report="reports/r.json",
        manifest="manifests/m.json",
    )
    check_stage_paths(good, tmp_path, run_dir=True)
    bad_input = StageInput(data="/srv/corpus", manifest="manifests/in.json")
    cases = {
        "paths.out": StagePaths(out="/x", report="r.json", manifest="m.json"),
        "paths.report": StagePaths(out="o", report="../r.json", manifest="m.json"),
        "paths.manifest": StagePaths(out="o", report="r.json", manifest="keys/m.json"),
        "paths.inputs.corpus.data": StagePaths(inputs={"corpus": bad_input}, out="o", report="r", manifest="m"),
        "paths.inputs.corpus.manifest": StagePaths(
            inputs={"corpus": StageInput(data="d", manifest="/m.json")}, out="o", report="r", manifest="m"
        ),
    }
    for key, paths in cases.items():
        with pytest.raises(PathError, match=f"^{re.escape(key)}="):
            check_stage_paths(paths, tmp_path)
    # a training stage's run directory is the parent of paths.out: never the repository root
    with pytest.raises(PathError, match=r"^paths\.out='checkpoints': a training stage writes its run"):
        check_stage_paths(StagePaths(out="checkpoints", report="r", manifest="m"), tmp_path, run_dir=True)
