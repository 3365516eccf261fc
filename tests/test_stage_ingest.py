"""End to end: the ingest stage under DVC in a scratch copy of the project.

These run the real stage script (`dvc repro` → `python stages/ingest.py`) on the real standard library,
so they take a few seconds each; they are the proof that `make run` does what the README says.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowpin.cli import main as flowpin_main
from flowpin.manifest.model import load_manifest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPY = ("dvc.yaml", "params", "stages", "src", "keys", ".dvcignore", ".gitignore")


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", FLOWPIN_ROOT=str(root))
    env.pop("FLOWPIN_SIGNING_KEY", None)
    return env


def _run(cmd: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, check=False)


def _checked(cmd: list[str], root: Path) -> str:
    proc = _run(cmd, root)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def make_project(dest: Path) -> Path:
    """A scratch flowpin project: the flow's files, a fresh git repo, DVC initialised, a new key."""
    dest.mkdir(parents=True)
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@flowpin.invalid"],
        ["git", "config", "user.name", "flowpin test"],
        [str(BIN / "dvc"), "init", "-q"],
        [str(BIN / "dvc"), "config", "core.analytics", "false"],
        [str(BIN / "flowpin"), "key", "init"],
    ):
        _checked(cmd, dest)
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_project(tmp_path_factory.mktemp("flow") / "p")
    _checked([str(BIN / "dvc"), "repro"], root)
    return root


def _subject_digests(manifest: Path) -> dict[str, str]:
    return {s["name"]: s["digest"]["sha256"] for s in load_manifest(manifest).subjects}


@pytest.mark.slow
def test_repro_writes_a_manifest_that_verifies(project: Path) -> None:
    manifest = project / "manifests" / "ingest.json"
    m = load_manifest(manifest)
    assert m.stage == "ingest"
    assert [s["name"] for s in m.subjects] == ["data/ingest"]
    kinds = {d["name"]: d["annotations"]["kind"] for d in m.dependencies}
    assert kinds["python-stdlib"] == "dataset"
    assert kinds["params/ingest.yaml"] == "config"
    assert kinds["src/flowpin/data/ingest.py"] == "code"
    stdlib = next(d for d in m.dependencies if d["name"] == "python-stdlib")
    assert "pydoc_data/topics.py" in stdlib["annotations"]["flowpin.files"]
    assert stdlib["uri"].startswith("python-stdlib:")
    assert "reports/ingest.json" in [b["name"] for b in m.run_details["byproducts"]]
    os.chdir(project)
    assert flowpin_main(["verify", "--all"]) == 0


@pytest.mark.slow
def test_second_repro_is_a_no_op_and_status_clean(project: Path) -> None:
    before = (project / "manifests" / "ingest.json").read_bytes()
    out = _checked([str(BIN / "dvc"), "repro"], project)
    assert "didn't change, skipping" in out
    assert (project / "manifests" / "ingest.json").read_bytes() == before  # the stage did not run again
    assert "up to date" in _checked([str(BIN / "dvc"), "status"], project)


@pytest.mark.slow
def test_param_change_makes_ingest_stale(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p2"
    shutil.copytree(project, root, symlinks=True)
    params = root / "params" / "ingest.yaml"
    doc = yaml.safe_load(params.read_text())
    doc["ingest"]["shards"]["zstd_level"] = 3
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    status = _checked([str(BIN / "dvc"), "status", "--json"], root)
    assert "ingest" in json.loads(status)


@pytest.mark.slow
def test_two_clean_runs_give_identical_digests(project: Path, tmp_path: Path) -> None:
    other = make_project(tmp_path / "again")
    _checked([str(BIN / "dvc"), "repro"], other)
    a, b = project / "manifests" / "ingest.json", other / "manifests" / "ingest.json"
    assert _subject_digests(a) == _subject_digests(b)
    assert (project / "reports" / "ingest.json").read_bytes() == (other / "reports" / "ingest.json").read_bytes()
    # Same recipe, code and environment: identical identity even though times, keys and paths differ.
    assert flowpin_main(["diff", str(a), str(b)]) == 0


@pytest.mark.slow
def test_override_is_recorded_and_changes_identity(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p3"
    shutil.copytree(project, root, symlinks=True)
    _checked([sys.executable, "stages/ingest.py", "ingest.shards.docs_per_shard=100"], root)
    m = load_manifest(root / "manifests" / "ingest.json")
    assert m.build["externalParameters"]["overrides"] == ["ingest.shards.docs_per_shard=100"]
    assert m.build["externalParameters"]["recipe"]["ingest"]["shards"]["docs_per_shard"] == 100
    shards = sorted(p.name for p in (root / "data" / "ingest").glob("shard-*.jsonl.zst"))
    assert len(shards) == 4  # 311 documents / 100 per shard
    os.chdir(root)
    assert (
        flowpin_main(["diff", str(project / "manifests" / "ingest.json"), str(root / "manifests" / "ingest.json")]) == 1
    )


@pytest.mark.slow
def test_invalid_recipe_fails_before_touching_anything(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p4"
    shutil.copytree(project, root, symlinks=True)
    proc = _run([sys.executable, "stages/ingest.py", "ingest.limits.on_oversize=explode"], root)
    assert proc.returncode != 0
    assert "ingest.limits.on_oversize" in proc.stderr
    os.chdir(root)  # nothing was replaced, so the previous manifest still vouches for intact outputs
    assert flowpin_main(["verify", "manifests/ingest.json"]) == 0


@pytest.mark.slow
def test_stage_failing_mid_run_leaves_no_manifest_and_old_outputs(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p5"
    shutil.copytree(project, root, symlinks=True)
    before = sorted(p.name for p in (root / "data" / "ingest").iterdir())
    proc = _run([sys.executable, "stages/ingest.py", "ingest.sources.0.include=[nomatch/**]"], root)
    assert proc.returncode != 0
    assert "ingest.sources[0].include" in proc.stderr
    assert not (root / "manifests" / "ingest.json").exists()
    assert sorted(p.name for p in (root / "data" / "ingest").iterdir()) == before  # swapped in whole or not at all
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".ingest.")]  # no temp dir left


def test_dvc_code_deps_cover_every_module_the_stage_imports(tmp_path: Path) -> None:
    """Every flowpin module the ingest stage imports is a DVC dep, except the recording machinery.

    If this fails, add the module to the stage's deps in dvc.yaml: otherwise a change to it would not
    make `dvc repro` rerun the stage, and `flowpin verify` would not see it either.
    """
    probe = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: print('MODULES', json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
        "if n.startswith('flowpin') and getattr(m, '__file__', None)))))\n"
        "sys.argv = ['stages/ingest.py', 'paths.out=" + str(tmp_path / "out") + "', "
        "'paths.report=" + str(tmp_path / "r.json") + "', 'paths.manifest=" + str(tmp_path / "m.json") + "']\n"
        "runpy.run_path('stages/ingest.py', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES")), None)
    assert line is not None, proc.stdout + proc.stderr
    modules = {Path(p).resolve().relative_to(REPO).as_posix() for p in json.loads(line[len("MODULES ") :])}
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    recording = (
        "src/flowpin/manifest/",
        "src/flowpin/environment.py",
        "src/flowpin/signing.py",
        "src/flowpin/hashing.py",
        "src/flowpin/paths.py",
        "src/flowpin/__init__.py",
    )
    uncovered = sorted(
        m
        for m in modules
        if not m.startswith(recording) and not any(m == d or m.startswith(d.rstrip("/") + "/") for d in deps)
    )
    assert uncovered == []
    assert "src/flowpin/data/ingest.py" in modules  # the probe really ran the stage
