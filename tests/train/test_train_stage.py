"""Training stages end to end on the real tiny Megatron model, in a scratch project (slow: ~1-2 min).

pretrain via `stages/train.py` (short overrides), then: fresh runs agree bit for bit; a run killed with
SIGKILL resumes to the same final checkpoint; `flowpin fork` with no overrides reproduces the parent's
later checkpoint tensors, and with an override it branches while recording its parent (and, as every
training stage, a report, a tracker and a run key).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowpin.manifest.statement import EntryPoint, load_manifest
from helpers import BIN, checked, copy_project, scratch_env

SHORT = [
    "train.loop.steps=6",
    "train.loop.checkpoint_every=3",
    "train.loop.log_every=1",
    "train.loop.optim.schedule.warmup_steps=1",
    "train.loop.batch_size=4",
]
TENSORS = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def paths(name: str) -> list[str]:
    return [
        f"paths.out=runs/{name}/checkpoints",
        f"paths.report=reports/{name}.json",
        f"paths.manifest=manifests/{name}.json",
    ]


def subjects(root: Path, name: str) -> dict[str, str]:
    m = load_manifest(root / "manifests" / f"{name}.json")
    return {s["name"].rsplit("/", 1)[-1]: s["digest"]["flowpinSha256"] for s in m.subjects}


@pytest.fixture(scope="module")
def project(data_flow: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's replayed data flow (conftest.py ``data_flow``: tokenize and its upstream done by
    `dvc repro`), with a short pretrain run ``a``."""
    root = copy_project(data_flow, tmp_path_factory.mktemp("train") / "p")
    checked(root, sys.executable, "stages/train.py", *SHORT, *paths("a"))
    return root


@pytest.mark.slow
def test_pretrain_stage_records_every_checkpoint_and_learns(project: Path) -> None:
    assert sorted(subjects(project, "a")) == ["model.json", "step-000003", "step-000006"]
    checked(project, str(BIN / "flowpin"), "verify", "manifests/a.json")
    report = json.loads((project / "reports" / "a.json").read_text())
    assert report["probe_loss"]["after"] < report["probe_loss"]["before"]
    assert report["precision"] and report["cpu_patches"]


@pytest.mark.slow
def test_two_fresh_runs_give_identical_checkpoints(project: Path) -> None:
    checked(project, sys.executable, "stages/train.py", *SHORT, *paths("b"))
    assert subjects(project, "b") == subjects(project, "a")


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run(project: Path) -> None:
    longer = [*SHORT[:1], "train.loop.steps=12", *SHORT[1:]][1:]
    checked(project, sys.executable, "stages/train.py", *longer, *paths("whole"))
    proc = subprocess.Popen(
        [sys.executable, "stages/train.py", *longer, *paths("killed")],
        cwd=project,
        env=scratch_env(project),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = project / "runs" / "killed" / "checkpoints" / "step-000006"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = max(p.name for p in target.parent.glob("step-*"))  # the last checkpoint published before the kill
    assert not (project / "manifests" / "killed.json").exists()
    checked(project, sys.executable, "stages/train.py", *longer, *paths("killed"))
    report = json.loads((project / "reports" / "killed.json").read_text())
    assert report["resumed_from"] == last
    assert subjects(project, "killed")["step-000012"] == subjects(project, "whole")["step-000012"]


@pytest.mark.slow
def test_fork_without_overrides_reproduces_the_parent(project: Path) -> None:
    # Started without the CPU kernel pins in its environment (unlike pytest's), as `flowpin fork` typically is:
    # the fork applies the recipe's hydra.job.env_set itself, as a Hydra run of the stage does.
    pins = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
    env = {k: v for k, v in scratch_env(project).items() if k not in pins}
    argv = [str(BIN / "flowpin"), "fork", "manifests/a.json", "--step", "3", "--out", "runs/fork-same"]
    proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parent = project / "runs" / "a" / "checkpoints" / "step-000006"
    child = project / "runs" / "fork-same" / "checkpoints" / "step-000006"
    for name in TENSORS:  # weights, optimizer state and RNG streams continue bit for bit
        assert (child / name).read_bytes() == (parent / name).read_bytes(), name
    state = json.loads((child / "state.json").read_text())
    parent_state = json.loads((parent / "state.json").read_text())
    branch = project / "runs" / "a" / "checkpoints" / "step-000003" / "state.json"
    assert state.pop("parent") == {"step": 3, "state_sha256": hashlib.sha256(branch.read_bytes()).hexdigest()}
    assert parent_state.pop("parent") is None
    assert state == parent_state  # the pointer to where it branched is the only difference in the checkpoint
    m = load_manifest(project / "runs" / "fork-same" / "manifest.json")
    kinds = {d["name"]: d["annotations"]["kind"] for d in m.dependencies}
    assert kinds["manifests/a.json"] == "manifest"
    assert kinds["runs/a/checkpoints/step-000003"] == "checkpoint"
    parent_env = load_manifest(project / "manifests" / "a.json").environment
    assert {k: m.environment["envVars"].get(k) for k in pins} == {k: parent_env["envVars"][k] for k in pins}
    assert m.environment["torch"]["cpuCapability"] == parent_env["torch"]["cpuCapability"]
    checked(project, str(BIN / "flowpin"), "verify", "runs/fork-same/manifest.json")


@pytest.mark.slow
def test_fork_with_an_override_branches_and_records_it(project: Path) -> None:
    override = "train.loop.optim.schedule.peak_lr=1.0e-2"
    checked(project, str(BIN / "flowpin"), "fork", "manifests/a.json", "--step", "3", "--out", "runs/fork-lr", override)
    m = load_manifest(project / "runs" / "fork-lr" / "manifest.json")
    assert m.overrides[-1] == override
    recorded = load_manifest(project / "manifests" / "a.json").entry_point
    assert recorded == EntryPoint(script="stages/train.py", config_name="pretrain", config_dir="params")
    assert m.entry_point == recorded  # a fork composes its parent's config
    assert m.note("fork") == {
        "parent": "manifests/a.json",
        "step": 3,
        "new_overrides": [override],
        "command": ["flowpin", "fork", "manifests/a.json", "--step", "3", "--out", "runs/fork-lr", override],
    }
    parent = project / "runs" / "a" / "checkpoints" / "step-000006" / "model.safetensors"
    child = project / "runs" / "fork-lr" / "checkpoints" / "step-000006" / "model.safetensors"
    assert child.read_bytes() != parent.read_bytes()
    # recorded as every training stage is: a report beside the manifest, a tracker, a run key
    report = json.loads((project / "runs" / "fork-lr" / "report.json").read_text())
    assert report["forked_from"] == {"checkpoint": "step-000003", "step": 3} and report["steps"] == 6
    assert report["checkpoints"] == ["step-000006"] and report["probe_loss"]["after"] is not None
    assert m.byproduct("runs/fork-lr/report.json") is not None and m.note("tracking") is not None
    assert json.loads((project / "runs" / "fork-lr" / "run-key.json").read_text())["parts"]["fork"] == {
        "checkpoint": "step-000003",
        "state": hashlib.sha256(
            (project / "runs" / "a" / "checkpoints" / "step-000003" / "state.json").read_bytes()
        ).hexdigest(),
    }


@pytest.mark.slow
def test_torchrun_two_ranks_train_the_stage_and_rank_0_records_it(project: Path) -> None:
    torchrun = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--rdzv-backend", "c10d"]
    launch = [*torchrun, "--rdzv-endpoint", "127.0.0.1:0", "stages/train.py", *SHORT, *paths("dp")]
    env = {**scratch_env(project), "GLOO_SOCKET_IFNAME": "lo"}
    for name in ("dp", "dp-again"):
        argv = launch if name == "dp" else [*launch[:-3], *paths(name)]
        subprocess.run(argv, cwd=project, env=env, check=True, capture_output=True, timeout=600)
    checked(project, str(BIN / "flowpin"), "verify", "manifests/dp.json")
    report = json.loads((project / "reports" / "dp.json").read_text())
    assert report["world_size"] == 2
    assert report["probe_loss"]["after"] < report["probe_loss"]["before"]
    state = json.loads((project / "runs" / "dp" / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["determinism"]["data_parallel_world_size"] == 2  # recorded: DP=2 sums in another order
    assert subjects(project, "dp-again") == subjects(project, "dp")  # DP=2 is bitwise reproducible as a stage
