"""The release record comes from a clean commit (issue #14, item 2).

`make release-record` refuses a tree with uncommitted changes before it runs anything, and the committed
record itself was made from a clean tree: no committed manifest says `git.dirty`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flowpin.manifest.statement import load_manifest
from helpers import REPO


def test_every_committed_manifest_was_recorded_from_a_clean_commit() -> None:
    manifests = sorted((REPO / "manifests").glob("*.json"))
    assert len(manifests) == 17
    for path in manifests:
        git = load_manifest(path).git
        assert git["dirty"] is False, f"{path.name} was recorded from a dirty tree"
        assert len(git["commit"]) == 40


def _scratch(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(REPO / "Makefile", root / "Makefile")
    (root / "tracked.txt").write_text("a\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "-c", "user.email=t@flowpin.invalid", "-c", "user.name=t", "add", "-A"],
        ["git", "-c", "user.email=t@flowpin.invalid", "-c", "user.name=t", "commit", "-qm", "init"],
    ):
        subprocess.run(cmd, cwd=root, check=True)
    return root


def _release_record(root: Path) -> subprocess.CompletedProcess[str]:
    # -o: take the venv as installed; with no venv in the scratch repo, a run past the guard fails at its first tool
    return subprocess.run(
        ["make", "-o", ".venv/.installed", "release-record"], cwd=root, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("change", ["modified", "untracked"])
def test_release_record_refuses_a_dirty_tree_before_running_anything(tmp_path: Path, change: str) -> None:
    root = _scratch(tmp_path)
    if change == "modified":
        (root / "tracked.txt").write_text("b\n")
    else:
        (root / "new.py").write_text("x = 1\n")
    proc = _release_record(root)
    assert proc.returncode != 0
    assert "uncommitted changes" in proc.stderr and "commit" in proc.stderr
    assert "flowpin key init" not in proc.stdout  # nothing after the guard ran


def test_release_record_passes_its_guard_on_a_clean_tree(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    (root / "manifests").mkdir()
    (root / "manifests" / "x.json").write_text("{}\n")  # the record itself may change: that is what it writes
    proc = _release_record(root)
    assert "uncommitted changes" not in proc.stderr
    assert "flowpin key init" in proc.stdout  # went on to the flow (which fails here: no venv in the scratch repo)
