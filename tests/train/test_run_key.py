"""The run key of a training run (flowpin.train.run_key): what a killed run may resume, and what it may not.

Fast: checkpoints here are directories with a ``state.json`` (what :func:`list_checkpoints` counts as
complete); no model is built. The end-to-end checks (a real stage under torchrun, an unrelated code change
that resumes) are in tests/post/test_dpo.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowpin.constants import RUN_KEY_FILE
from flowpin.errors import StaleCheckpointsError
from flowpin.stage import stage_code_digests
from flowpin.train.run_key import RunClaim, claim_run_dir, key_changes, run_key

REPO = Path(__file__).resolve().parents[2]
LOOP_PY = "src/flowpin/train/loop.py"


def parts(steps: int = 4, code: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "model": {"num_layers": 2, "hidden_size": 64},
        "init": None,
        "threads": 2,
        "code": {"stages/train.py": "a" * 64, LOOP_PY: "b" * 64, **(code or {})},
        "loop": {"steps": steps, "batch_size": 4, "optim": {"lr": 1e-3}},
        "data": "d" * 64,
    }


def trained(run_dir: Path, key_parts: dict[str, Any], steps: tuple[int, ...] = (2, 4)) -> dict[str, bytes]:
    """``run_dir`` as a run under ``key_parts`` leaves it (claimed, checkpoints, a metrics log); its files."""
    assert claim_run_dir(run_dir, key_parts, "refuse") is None
    for step in steps:
        ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text(json.dumps({"step": step}))
        (ckpt / "model.safetensors").write_bytes(bytes([step]) * 16)
    (run_dir / "metrics.jsonl").write_text('{"event": "metrics", "step": 2}\n')
    return files(run_dir)


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_same_key_resumes_and_run_key_json_holds_the_parts(tmp_path: Path) -> None:
    before = trained(tmp_path, parts())
    assert claim_run_dir(tmp_path, parts(), "refuse") is None
    assert files(tmp_path) == before
    stored = json.loads((tmp_path / RUN_KEY_FILE).read_text())
    assert stored == {"key": run_key(parts()), "parts": parts()}


def test_a_changed_recipe_value_and_code_file_are_refused_by_name_and_nothing_is_touched(tmp_path: Path) -> None:
    before = trained(tmp_path, parts())
    changed = parts(steps=6, code={LOOP_PY: "c" * 64})
    with pytest.raises(StaleCheckpointsError) as info:
        claim_run_dir(tmp_path, changed, "refuse")
    message = str(info.value)
    assert f"changed: code: {LOOP_PY} changed; loop.steps: 4 -> 6. They are kept" in message
    assert "2 checkpoint(s) (step-000002 .. step-000004)" in message
    prefix = run_key(parts())[:12]
    assert f"FLOWPIN_STALE_CHECKPOINTS=archive (moves them to {tmp_path / 'stale' / prefix}/)" in message
    assert "FLOWPIN_STALE_CHECKPOINTS=discard (deletes them)" in message
    assert files(tmp_path) == before  # checkpoints, log and the old key all intact


def test_discard_removes_them_and_says_so(tmp_path: Path) -> None:
    trained(tmp_path, parts())
    taken = claim_run_dir(tmp_path, parts(steps=6), "discard")
    assert taken is not None
    assert taken.to_json() == {"choice": "discard", "changed": ["loop.steps: 4 -> 6"], "archive": None}
    assert taken.checkpoints == ("step-000002", "step-000004")
    assert sorted(files(tmp_path)) == [RUN_KEY_FILE]  # the old checkpoints and their metrics log are gone
    assert json.loads((tmp_path / RUN_KEY_FILE).read_text())["key"] == run_key(parts(steps=6))


def test_archive_moves_them_aside_under_the_old_key(tmp_path: Path) -> None:
    before = trained(tmp_path, parts())
    taken = claim_run_dir(tmp_path, parts(steps=6), "archive")
    prefix = run_key(parts())[:12]
    assert taken is not None and taken.archive == f"stale/{prefix}" and taken.choice == "archive"
    assert files(tmp_path / "stale" / prefix) == before  # checkpoints, metrics log and old run key, unchanged
    assert not (tmp_path / "checkpoints").exists()
    trained_again = parts(steps=6)
    (tmp_path / "checkpoints" / "step-000006").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000006" / "state.json").write_text("{}")
    again = claim_run_dir(tmp_path, parts(), "archive")  # back to the first recipe: a second archive, never merged
    assert again is not None and again.archive == f"stale/{run_key(trained_again)[:12]}"
    assert sorted(p.name for p in (tmp_path / "stale").iterdir()) == sorted([prefix, run_key(trained_again)[:12]])


def test_a_key_file_of_an_older_flowpin_has_unknown_parts_and_is_refused(tmp_path: Path) -> None:
    trained(tmp_path, parts())
    (tmp_path / RUN_KEY_FILE).write_text(json.dumps({"key": "e" * 64}))
    with pytest.raises(StaleCheckpointsError, match=r"changed: unknown: run-key\.json was written by an older flowpin"):
        claim_run_dir(tmp_path, parts(), "refuse")
    assert (tmp_path / "checkpoints" / "step-000004" / "state.json").exists()
    taken = claim_run_dir(tmp_path, parts(), "archive")
    assert taken is not None and taken.archive == "stale/" + "e" * 12


def test_another_key_without_a_complete_checkpoint_is_claimed_quietly(tmp_path: Path) -> None:
    trained(tmp_path, parts(), steps=())
    assert claim_run_dir(tmp_path, parts(steps=6), "refuse") is None
    assert json.loads((tmp_path / RUN_KEY_FILE).read_text())["parts"] == parts(steps=6)


def test_key_changes_name_added_and_removed_code_and_cap_the_list() -> None:
    old, new = parts(), parts(code={"src/flowpin/post/sft.py": "f" * 64})
    del new["code"]["stages/train.py"]
    assert key_changes(old, new) == ["code: src/flowpin/post/sft.py added", "code: stages/train.py removed"]
    many = {**parts(), "loop": {f"k{i}": i for i in range(20)}}
    listed = key_changes(parts(), many, limit=3)
    assert len(listed) == 4 and listed[-1].endswith("more")
    assert key_changes({**old, "data": "x" * 64}, old) == [f'data: "{"x" * 35}... -> "{"d" * 35}...']


@pytest.mark.parametrize(
    ("value", "choice"), [(None, "refuse"), ("", "refuse"), ("archive", "archive"), (" Discard", "discard")]
)
def test_the_choice_comes_from_flowpin_stale_checkpoints(value: str | None, choice: str) -> None:
    environ = {} if value is None else {"FLOWPIN_STALE_CHECKPOINTS": value}
    assert RunClaim.from_env(environ=environ).stale == choice


def test_an_unknown_choice_is_refused_before_anything_runs() -> None:
    with pytest.raises(StaleCheckpointsError, match=r"FLOWPIN_STALE_CHECKPOINTS='yes': unknown; set it to 'archive'"):
        RunClaim.from_env(environ={"FLOWPIN_STALE_CHECKPOINTS": "yes"})


# --- the code part: a stage's dvc.yaml code deps, not the whole package ------------------------------


def test_the_reference_sft_stage_keys_its_own_code_only() -> None:
    code = stage_code_digests(REPO, "sft")
    assert code is not None
    assert {"stages/sft.py", "src/flowpin/post/sft.py", LOOP_PY} <= set(code)
    assert "src/flowpin/cli.py" not in code and not any(p.startswith("src/flowpin/manifest/") for p in code)


def test_an_edit_outside_the_stage_code_resumes_and_one_inside_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    for rel in ("stages/sft.py", LOOP_PY, "src/flowpin/cli.py", "src/flowpin/post/sft.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    deps = ["stages/sft.py", "src/flowpin/train", "src/flowpin/post/sft.py", "data/synth"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sft": {"cmd": "python stages/sft.py", "deps": deps}}}))
    code = stage_code_digests(root, "sft")
    assert code is not None and sorted(code) == ["src/flowpin/post/sft.py", LOOP_PY, "stages/sft.py"]
    run_dir = root / "runs" / "sft"
    before = trained(run_dir, {**parts(), "code": code})
    with (root / "src/flowpin/cli.py").open("a") as fh:
        fh.write("# an edit to the command line: no code dep of sft\n")
    assert claim_run_dir(run_dir, {**parts(), "code": stage_code_digests(root, "sft")}, "refuse") is None
    assert files(run_dir) == before
    with (root / LOOP_PY).open("a") as fh:
        fh.write("# an edit to the training loop\n")
    with pytest.raises(StaleCheckpointsError, match=f"changed: code: {LOOP_PY} changed. They are kept"):
        claim_run_dir(run_dir, {**parts(), "code": stage_code_digests(root, "sft")}, "refuse")
    assert stage_code_digests(root, "no-such-stage") is None  # no dvc.yaml entry: the libraries key the package
