"""End to end: the ingest stage under DVC in a scratch copy of the project.

These run the real stage script (`dvc repro` → `python stages/ingest.py`) on the real standard library,
so they take a few seconds each; they are the proof that `make run` does what the README says.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from flowpin.cli import main as flowpin_main
from flowpin.constants import MANIFEST_DIR
from flowpin.manifest.statement import load_manifest
from helpers import BIN, checked, copy_project, run_in


@pytest.fixture(scope="module")
def project(ingest_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's scratch project after `dvc repro ingest` (conftest.py ``ingest_flow``)."""
    return copy_project(ingest_flow, tmp_path_factory.mktemp("flow") / "p")


def _subject_digests(manifest: Path) -> dict[str, str]:
    return {s["name"]: s["digest"]["flowpinSha256"] for s in load_manifest(manifest).subjects}


@pytest.mark.slow
def test_repro_writes_a_manifest_that_verifies(project: Path) -> None:
    manifest = project / MANIFEST_DIR / "ingest.json"
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
    before = (project / MANIFEST_DIR / "ingest.json").read_bytes()
    out = checked(project, str(BIN / "dvc"), "repro", "ingest")
    assert "didn't change, skipping" in out
    assert (project / MANIFEST_DIR / "ingest.json").read_bytes() == before  # the stage did not run again
    assert "up to date" in checked(project, str(BIN / "dvc"), "status", "ingest")


@pytest.mark.slow
def test_param_change_makes_ingest_stale(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p2"
    shutil.copytree(project, root, symlinks=True)
    params = root / "params" / "ingest.yaml"
    doc = yaml.safe_load(params.read_text())
    doc["ingest"]["shards"]["zstd_level"] = 3
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    status = checked(root, str(BIN / "dvc"), "status", "--json")
    assert "ingest" in json.loads(status)


@pytest.mark.slow
def test_override_is_recorded_and_changes_identity(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p3"
    shutil.copytree(project, root, symlinks=True)
    checked(root, sys.executable, "stages/ingest.py", "ingest.shards.docs_per_shard=100")
    m = load_manifest(root / MANIFEST_DIR / "ingest.json")
    assert m.build["externalParameters"]["overrides"] == ["ingest.shards.docs_per_shard=100"]
    assert m.build["externalParameters"]["recipe"]["ingest"]["shards"]["docs_per_shard"] == 100
    shards = sorted(p.name for p in (root / "data" / "ingest").glob("shard-*.jsonl.zst"))
    assert len(shards) == 4  # 311 documents / 100 per shard
    os.chdir(root)
    ours, theirs = project / MANIFEST_DIR / "ingest.json", root / MANIFEST_DIR / "ingest.json"
    assert flowpin_main(["diff", str(ours), str(theirs)]) == 1


@pytest.mark.slow
def test_invalid_recipe_fails_before_touching_anything(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p4"
    shutil.copytree(project, root, symlinks=True)
    proc = run_in(root, sys.executable, "stages/ingest.py", "ingest.limits.on_oversize=explode")
    assert proc.returncode != 0
    assert "ingest.limits.on_oversize" in proc.stderr
    os.chdir(root)  # nothing was replaced, so the previous manifest still vouches for intact outputs
    assert flowpin_main(["verify", "manifests/ingest.json"]) == 0


@pytest.mark.slow
def test_stage_failing_mid_run_leaves_no_manifest_and_old_outputs(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "p5"
    shutil.copytree(project, root, symlinks=True)
    before = sorted(p.name for p in (root / "data" / "ingest").iterdir())
    proc = run_in(root, sys.executable, "stages/ingest.py", "ingest.sources.0.include=[nomatch/**]")
    assert proc.returncode != 0
    assert "ingest.sources[0].include" in proc.stderr
    assert not (root / MANIFEST_DIR / "ingest.json").exists()
    assert sorted(p.name for p in (root / "data" / "ingest").iterdir()) == before  # swapped in whole or not at all
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".ingest.")]  # no temp dir left
