"""Hydra sweeps (flowpin.sweep): a directory per job, unique sweep directories, `flowpin sweep`, launchers.

Fast tests run a probe stage (``stage_run`` around a few bytes whose content depends on ``probe.lr``) in a
scratch project that uses the repository's ``params/common/hydra.yaml``; the slow test runs a real
two-job training sweep with the joblib launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowpin.cli import main
from flowpin.errors import RecipeError
from flowpin.manifest.diff import Change, diff_manifests
from flowpin.manifest.statement import Manifest, load_manifest
from flowpin.recipe import StagePaths
from flowpin.sweep import (
    JOB_FILE,
    SWEEP_FILE,
    SweepCallback,
    job_relative,
    read_sweep,
    register_resolvers,
    relocate,
    render_sweep,
    sweep_progress,
    unique_suffix,
)
from helpers import BIN, PROBE_RECIPE, PROBE_STAGE, REPO, checked, copy_project, run_in, scratch_env

JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


def build_probe_project(root: Path) -> Path:
    """A project with the repository's Hydra settings and launcher configs, the probe stage and a key."""
    (root / ".dvc").mkdir(parents=True)
    (root / "params" / "common").mkdir(parents=True)
    shutil.copy2(REPO / "params" / "common" / "hydra.yaml", root / "params" / "common" / "hydra.yaml")
    shutil.copytree(REPO / "params" / "hydra", root / "params" / "hydra")
    (root / "params" / "probe.yaml").write_text(PROBE_RECIPE)
    (root / "stages").mkdir()
    (root / "stages" / "probe.py").write_text(PROBE_STAGE)
    checked(root, str(BIN / "flowpin"), "key", "init")
    return root


def sweep_dirs(root: Path) -> set[Path]:
    return {p.parent for p in (root / "multirun").glob(f"*/*/{SWEEP_FILE}")}


def probe_sweep(root: Path, *overrides: str, check: bool = True) -> Path:
    """Run a probe sweep; return its (new) sweep directory."""
    before = sweep_dirs(root)
    proc = run_in(root, sys.executable, "stages/probe.py", "-m", *overrides)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    (new,) = sweep_dirs(root) - before
    return new


def manifest_of(job_dir: Path) -> Manifest:
    return load_manifest(job_dir / "manifests" / "probe.json")


def by_section(changes: list[Change]) -> dict[str, list[Change]]:
    out: dict[str, list[Change]] = {}
    for c in changes:
        out.setdefault(c.section, []).append(c)
    return out


@pytest.fixture(scope="module")
def probe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_probe_project(tmp_path_factory.mktemp("sweep") / "p")


@pytest.fixture(scope="module")
def lr_sweep(probe_root: Path) -> Path:
    """Two jobs in parallel (joblib): probe.lr=0.1,0.2."""
    return probe_sweep(probe_root, *JOBLIB, "probe.lr=0.1,0.2")


@pytest.fixture
def in_root(probe_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FLOWPIN_ROOT", str(probe_root))
    monkeypatch.chdir(probe_root)
    yield probe_root


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- one directory per job ----------------------------------------------------------------------------


def test_relocate_moves_out_report_and_manifest_under_the_job_dir_only() -> None:
    declared = StagePaths(out="runs/pretrain/checkpoints", report="reports/pretrain.json", manifest="manifests/p.json")
    moved = relocate(declared, "multirun/2025-01-01/10-00-00-1-abcdef/3")
    assert moved.out == "multirun/2025-01-01/10-00-00-1-abcdef/3/runs/pretrain/checkpoints"
    assert moved.report == "multirun/2025-01-01/10-00-00-1-abcdef/3/reports/pretrain.json"
    assert moved.manifest == "multirun/2025-01-01/10-00-00-1-abcdef/3/manifests/p.json"
    assert moved.inputs == declared.inputs
    assert job_relative(moved.out, "multirun/2025-01-01/10-00-00-1-abcdef/3") == declared.out
    assert job_relative("data/tokenize", "multirun/x/3") == "data/tokenize"


def test_each_job_writes_its_own_outputs_report_and_signed_manifest(lr_sweep: Path, probe_root: Path) -> None:
    rel = lr_sweep.relative_to(probe_root).as_posix()
    assert (
        not (probe_root / "manifests").exists() and not (probe_root / "out").exists()
    )  # nothing at the declared paths
    for num, lr in ((0, "0.1"), (1, "0.2")):
        job = lr_sweep / str(num)
        assert yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) == [f"probe.lr={lr}"]
        assert (job / ".hydra" / "config.yaml").is_file()
        assert (job / "out" / "probe" / "weights.txt").read_text() == f"{float(lr) * 4}\n"
        assert json.loads((job / "reports" / "probe.json").read_text())["loss"]["last"] == 1 / float(lr)
        m = manifest_of(job)
        assert [s["name"] for s in m.subjects] == [f"{rel}/{num}/out/probe"]
        recipe = m.recipe
        declared = {"out": "out/probe", "report": "reports/probe.json", "manifest": "manifests/probe.json"}
        assert recipe["paths"] == declared  # identity: the declared paths
        assert m.note("sweep-job") == {
            "sweepDir": rel,
            "job": num,
            "jobDir": f"{rel}/{num}",
            "paths": {
                "out": {"declared": "out/probe", "actual": f"{rel}/{num}/out/probe"},
                "report": {"declared": "reports/probe.json", "actual": f"{rel}/{num}/reports/probe.json"},
                "manifest": {"declared": "manifests/probe.json", "actual": f"{rel}/{num}/manifests/probe.json"},
            },
        }
        assert json.loads((job / JOB_FILE).read_text())["state"] == "completed"
    out = checked(probe_root, str(BIN / "flowpin"), "verify", *(f"{rel}/{n}/manifests/probe.json" for n in (0, 1)))
    assert "2 verified, 0 failed" in out


def test_a_single_run_keeps_the_declared_paths_and_writes_no_hydra_snapshot(tmp_path: Path) -> None:
    root = build_probe_project(tmp_path / "single")
    checked(root, sys.executable, "stages/probe.py", "probe.lr=0.5")
    m = load_manifest(root / "manifests" / "probe.json")
    assert [s["name"] for s in m.subjects] == ["out/probe"]
    assert m.byproduct("sweep-job") is None
    assert not list(root.rglob(".hydra")) and not (root / "multirun").exists()
    assert not list(root.rglob(JOB_FILE)) and not list(root.rglob(SWEEP_FILE))


def test_a_sweep_directory_outside_the_project_is_refused(probe_root: Path, tmp_path: Path) -> None:
    """Refused before Hydra creates it (tests/test_hostile_paths.py has the other places Hydra writes)."""
    for outside in (f"{tmp_path}/outside", "../outside"):
        proc = run_in(probe_root, sys.executable, "stages/probe.py", "-m", f"hydra.sweep.dir={outside}")
        assert proc.returncode == 2  # an input error (flowpin.errors.exit_code)
        assert f"flowpin: PathError: hydra.sweep.dir={outside!r}" in proc.stderr
        assert not (tmp_path / "outside").exists() and not (probe_root.parent / "outside").exists()


def test_diff_between_two_jobs_shows_exactly_the_swept_keys(lr_sweep: Path, probe_root: Path) -> None:
    a, b = manifest_of(lr_sweep / "0"), manifest_of(lr_sweep / "1")
    sections = by_section(diff_manifests(a, b).changes)
    assert set(sections) == {"recipe", "overrides", "output"}  # no input, code, environment, format, stage
    assert [(c.key, c.old, c.new) for c in sections["recipe"]] == [("probe.lr", 0.1, 0.2)]
    (overrides,) = sections["overrides"]
    # the job's own override, then the sweep's Hydra overrides (recorded too; the same in every job)
    assert (overrides.old, overrides.new) == (["probe.lr=0.1", *JOBLIB], ["probe.lr=0.2", *JOBLIB])
    # Outputs pair up by their name inside the job directory; only the one whose content the lr changes differs:
    ja, jb = (f"{lr_sweep.relative_to(probe_root).as_posix()}/{n}" for n in (0, 1))
    (output,) = sections["output"]
    assert output.key == "out/probe" and output.note == "changed 1: weights.txt"
    files = [{s["name"]: s["annotations"]["flowpin.files"] for s in m.subjects} for m in (a, b)]
    fa, fb = files[0][f"{ja}/out/probe"], files[1][f"{jb}/out/probe"]
    assert [f for f in fa if fa[f] != fb[f]] == ["weights.txt"]
    proc = run_in(probe_root, str(BIN / "flowpin"), "diff", f"{ja}/manifests/probe.json", f"{jb}/manifests/probe.json")
    assert proc.returncode == 1
    assert "probe.lr: 0.1 → 0.2" in proc.stdout and "[environment]" not in proc.stdout and "[code]" not in proc.stdout


# --- unique sweep directories ---------------------------------------------------------------------------


def test_unique_suffix_names_the_process_and_differs_every_time() -> None:
    a, b = unique_suffix(), unique_suffix()
    assert a != b and a.startswith(f"{os.getpid()}-") and b.startswith(f"{os.getpid()}-")


def test_the_callback_registers_the_resolvers_import_does_not() -> None:
    """Hydra instantiates SweepCallback before it resolves hydra.sweep.dir, and a launcher unpickles it in each
    worker before the job's directory is resolved: both register the resolvers; importing flowpin.sweep does not."""
    probe = (
        "import pickle\n"
        "from omegaconf import OmegaConf\n"
        "import flowpin.sweep as sweep\n"
        "names = ('flowpin.unique', 'flowpin.multirun_only')\n"
        "assert not any(OmegaConf.has_resolver(n) for n in names), 'registered at import'\n"
        "callback = sweep.SweepCallback()\n"
        "assert all(OmegaConf.has_resolver(n) for n in names)\n"
        "sweep.register_resolvers()  # idempotent\n"
        "data = pickle.dumps(callback)\n"
        "for n in names:\n"
        "    OmegaConf.clear_resolver(n)\n"
        "assert isinstance(pickle.loads(data), sweep.SweepCallback)\n"
        "assert all(OmegaConf.has_resolver(n) for n in names)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_two_sweeps_started_in_the_same_second_never_share_a_directory(probe_root: Path) -> None:
    """The timestamp part is pinned to one second for both, as two sweeps started together would have it."""
    same_second = "hydra.sweep.dir=multirun/2020-01-01/00-00-00-${flowpin.unique:}"
    env = scratch_env(probe_root)
    procs = [
        subprocess.Popen(
            [sys.executable, "stages/probe.py", "-m", same_second, *launcher, f"probe.width={w}1,{w}2"],
            cwd=probe_root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w, launcher in ((1, JOBLIB), (2, []))  # one parallel, one basic: each copies the name into its jobs
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    dirs = sorted((probe_root / "multirun" / "2020-01-01").iterdir())
    assert len(dirs) == 2
    widths = set()
    for sweep in dirs:
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
        jobs = [yaml.safe_load((sweep / n / ".hydra" / "overrides.yaml").read_text()) for n in ("0", "1")]
        widths.add(tuple(j[-1] for j in jobs))
        for n in ("0", "1"):
            note = manifest_of(sweep / n).note("sweep-job")
            assert note is not None and note["sweepDir"] == sweep.relative_to(probe_root).as_posix()
    assert widths == {("probe.width=11", "probe.width=12"), ("probe.width=21", "probe.width=22")}


# --- flowpin sweep --------------------------------------------------------------------------------------


def test_sweep_table_lists_jobs_swept_overrides_status_and_metrics(
    lr_sweep: Path, in_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rel = lr_sweep.relative_to(in_root)
    code, out, _ = cli(capsys, "sweep", rel)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"sweep {rel.as_posix()}: 2 job(s) of 2 planned: 2 ok"
    assert lines[1].split() == ["job", "probe.lr", "status", "steps", "loss.last"]
    assert lines[2].split() == ["0", "0.1", "ok", "4", "10"]  # canonical JSON reports: 10.0 is written 10
    assert lines[3].split() == ["1", "0.2", "ok", "4", "5"]
    code, out, _ = cli(capsys, "sweep", rel, "--json", "--metric", "loss.last", "--metric", "nope")
    table = json.loads(out)
    assert code == 0 and table["ok"] and table["swept"] == ["probe.lr"] and table["planned"] == 2
    assert table["metrics"] == ["loss.last", "nope"]
    assert [(j["num"], j["status"], j["metrics"]) for j in table["jobs"]] == [
        (0, "ok", {"loss.last": 10.0}),
        (1, "ok", {"loss.last": 5.0}),
    ]
    assert table["jobs"][1]["manifest"] == f"{rel.as_posix()}/1/manifests/probe.json"


def test_sweep_reports_a_failed_job_and_a_tampered_one_with_exit_1(
    probe_root: Path, in_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = probe_sweep(probe_root, "probe.fail=false,true", check=False)
    rel = sweep.relative_to(probe_root)
    code, out, _ = cli(capsys, "sweep", rel, "--json")
    table = json.loads(out)
    assert code == 1 and not table["ok"] and table["swept"] == ["probe.fail"]
    assert [(j["num"], j["status"]) for j in table["jobs"]] == [(0, "ok"), (1, "failed")]
    assert table["jobs"][1]["detail"] == "RuntimeError: probe asked to fail"
    assert sweep_progress(sweep).__dict__ == {"planned": 2, "running": 0, "completed": 1, "failed": 1}
    (sweep / "0" / "out" / "probe" / "weights.txt").write_text("tampered\n")
    code, out, _ = cli(capsys, "sweep", rel)
    assert code == 1
    assert out.splitlines()[2].split()[:3] == ["0", "False", "invalid"]  # as Hydra expanded the sweep
    assert f"job 0 ({rel.as_posix()}/0): invalid: " in out and "weights.txt" in out
    assert f"job 1 ({rel.as_posix()}/1): failed: RuntimeError: probe asked to fail" in out


def test_sweep_states_running_killed_missing_and_incomplete(tmp_path: Path) -> None:
    """Synthetic job directories (no Hydra run): what the table says for each state file."""
    sweep = tmp_path / "s"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    states: dict[str, dict[str, Any] | None] = {
        "0": {"state": "running", "pid": os.getpid(), "host": host},
        "1": {"state": "running", "pid": int(dead.stdout), "host": host},
        "2": {"state": "completed", "pid": 1, "host": host},
        "3": None,
    }
    for num, state in states.items():
        hydra_dir = sweep / num / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "overrides.yaml").write_text(f"- a=1\n- b={num}\n")
        (hydra_dir / "config.yaml").write_text("paths: {out: o, report: r.json, manifest: m.json}\n")
        if state is not None:
            (sweep / num / JOB_FILE).write_text(json.dumps({"job": int(num), **state}))
    (sweep / SWEEP_FILE).write_text(json.dumps({"jobs": 6}))
    table = read_sweep(sweep, verify=lambda p: None)
    assert table.swept == ("b",) and table.planned == 6 and not table.ok
    assert [j.status for j in table.jobs] == ["running", "killed", "missing", "missing"]
    assert table.jobs[2].detail == "no manifest at m.json"
    text = render_sweep(table).splitlines()
    assert text[0] == f"sweep {sweep.as_posix()}: 4 job(s) of 6 planned: 1 running, 1 killed, 2 missing"
    assert text[1].split() == ["job", "b", "status"]  # no report: no metric columns
    assert f"job 1 ({sweep.as_posix()}/1): killed: its process is gone" in "\n".join(text)


@pytest.mark.parametrize("target", ["missing", "job", "empty"])
def test_sweep_input_errors_exit_2_with_a_named_error(
    target: str, lr_sweep: Path, in_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = {"missing": tmp_path / "nope", "job": lr_sweep / "0", "empty": tmp_path}[target]
    code, _, err = cli(capsys, "sweep", path)
    assert code == 2
    assert err.startswith("flowpin: SweepError: ")
    if target == "job":
        assert "pass its sweep directory" in err


# --- launchers --------------------------------------------------------------------------------------------


def compose_hydra(root: Path, *overrides: str) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()  # what SweepCallback does when Hydra's app runs; compose() runs none
    with initialize_config_dir(config_dir=str(root / "params"), version_base="1.3"):
        cfg = compose(config_name="probe", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_slurm_launcher_config_composes_and_renders_a_valid_sbatch_script(
    probe_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compose `hydra/launcher=slurm`, run Hydra's submitit launcher up to the submission (no cluster here:
    a fake `srun` on PATH lets submitit build its executor) and check the sbatch script it would submit."""
    import submitit
    from hydra.utils import instantiate

    cfg = compose_hydra(probe_root, "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher_cfg.tasks_per_node, launcher_cfg.nodes, launcher_cfg.gpus_per_node) == (1, 1, 1)
    assert launcher_cfg.timeout_min == 240 and launcher_cfg.partition == "gpu"
    assert str(launcher_cfg.submitit_folder).startswith(str(cfg.hydra.sweep.dir) + "/.submitit/")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    captured: dict[str, Any] = {}

    class Submitted(Exception):
        pass

    def capture(self: Any, fn: Any, *args: Any) -> None:
        captured["executor"], captured["args"] = self, args
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["probe.lr=0.1"], ["probe.lr=0.2"]], initial_job_idx=0)
    script = captured["executor"]._executor._make_submission_file_text("python -m probe", "uid")
    for line in (
        "--partition=gpu",
        "--time=240",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--nodes=1",
        "--cpus-per-task=8",
        "--mem=64GB",
        "--job-name=flowpin-probe",
    ):
        assert f"#SBATCH {line}\n" in script, script
    assert captured["args"][2] == (0, 1)  # job numbers: one array task per job


def test_a_multi_task_launcher_is_refused_before_any_job(probe_root: Path) -> None:
    cfg = compose_hydra(probe_root, "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2")
    with pytest.raises(RecipeError, match="tasks_per_node"):
        SweepCallback().on_multirun_start(cfg)


# --- end to end: a real training sweep ------------------------------------------------------------------


@pytest.mark.slow
def test_training_sweep_with_joblib_end_to_end(data_flow: Path, tmp_path: Path) -> None:
    root = copy_project(data_flow, tmp_path / "p")  # tokenize and its upstream done by `dvc repro` (conftest.py)
    t0 = time.monotonic()
    checked(
        root,
        sys.executable,
        "stages/train.py",
        "-m",
        *JOBLIB,
        "hydra.sweep.dir=multirun/e2e",
        "train.threads=1",
        "train.loop.steps=3",
        "train.loop.checkpoint_every=3",
        "train.loop.batch_size=2",
        "train.loop.optim.schedule.warmup_steps=1",
        "train.loop.optim.schedule.peak_lr=1e-3,3e-4",
    )
    print(f"joblib sweep of 2 training jobs: {time.monotonic() - t0:.1f} s")
    sweep = root / "multirun" / "e2e"
    assert not (root / "manifests" / "pretrain.json").exists() and not (root / "runs" / "pretrain").exists()
    for n in ("0", "1"):
        assert (sweep / n / ".hydra" / "config.yaml").is_file() and (sweep / n / ".hydra" / "overrides.yaml").is_file()
        assert (sweep / n / "runs" / "pretrain" / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    jobs = [f"multirun/e2e/{n}/manifests/pretrain.json" for n in ("0", "1")]
    assert "2 verified, 0 failed" in checked(root, str(BIN / "flowpin"), "verify", *jobs)
    table = json.loads(checked(root, str(BIN / "flowpin"), "sweep", "multirun/e2e", "--json"))
    assert table["ok"] and table["swept"] == ["train.loop.optim.schedule.peak_lr"]
    assert [j["overrides"]["train.loop.optim.schedule.peak_lr"] for j in table["jobs"]] == ["0.001", "0.0003"]
    for job in table["jobs"]:
        probe = (job["metrics"]["probe_loss.before"], job["metrics"]["probe_loss.after"])
        assert probe[1] < probe[0] and job["metrics"]["steps"] == 3
    a, b = (load_manifest(root / j) for j in jobs)
    sections = by_section(diff_manifests(a, b).changes)
    assert set(sections) == {"recipe", "overrides", "output"}
    assert [(c.key, c.old, c.new) for c in sections["recipe"]] == [("train.loop.optim.schedule.peak_lr", 0.001, 0.0003)]
    # model.json is the same architecture in both jobs; the checkpoint trained at another lr differs:
    assert [c.key for c in sections["output"]] == ["runs/pretrain/checkpoints/step-000003"]
