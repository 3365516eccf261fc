"""flowpin.tracking.aim and .aim_server: the Aim tracker of every stage run (params are configuration,
metrics are measurements), its failure policy, the UI and the remote server.

Aim queries see new runs only after a reindex, and a run closed in this process is not readable here
again, so the logged runs are read back by a fresh process (:func:`read_runs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from flowpin.cli import main as flowpin_main
from flowpin.data.order import DataOrder
from flowpin.errors import InternalError
from flowpin.hashing import Hasher
from flowpin.manifest.statement import load_manifest
from flowpin.tracking import FanoutTracker, Tracker, read_jsonl
from flowpin.tracking.aim import (
    REPORT_PARAM,
    AimTracker,
    StageTracker,
    TrackingError,
    TrackingWarning,
    describe_note,
    numeric_leaves,
    open_stage_tracker,
    tracking_settings,
)
from flowpin.tracking.aim_server import AimProcess, free_port, group_members, reindex, start_server, start_ui
from flowpin.train import megatron_cpu
from flowpin.train.loop import OptimConfig, TrainConfig, seed_all
from flowpin.train.run import train_loop
from flowpin.train.schedule import ScheduleConfig
from helpers import Project

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HASH = 24  # hex digits of an Aim run hash

READER = textwrap.dedent(
    """
    import json, sys
    from aim.sdk.repo import Repo

    runs = {}
    for run in Repo.from_path(sys.argv[1]).iter_runs():
        metrics = []
        for m in run.metrics():
            steps, columns = m.data.items_list()
            metrics.append({"name": m.name, "context": m.context.to_dict(), "steps": steps, "values": columns[0]})
        runs[run.hash] = {"name": run.name, "experiment": run.experiment, "params": run[...], "metrics": metrics}
    print(json.dumps(runs))
    """
)


def read_runs(repo_root: Path) -> dict[str, dict[str, Any]]:
    """Every run of ``repo_root/.aim``, read by a fresh process after a reindex: hash -> name, params, metrics."""
    reindex(repo_root)
    proc = subprocess.run(
        [sys.executable, "-c", READER, str(repo_root)], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    runs: dict[str, dict[str, Any]] = json.loads(proc.stdout.splitlines()[-1])
    return runs


def metric(run: Mapping[str, Any], name: str, **context: str) -> dict[int, float]:
    """``name``'s values by step in the one context that includes ``context``."""
    found = [m for m in run["metrics"] if m["name"] == name and context.items() <= m["context"].items()]
    assert len(found) == 1, (name, context, [(m["name"], m["context"]) for m in run["metrics"]])
    return dict(zip(found[0]["steps"], found[0]["values"], strict=True))


# --- settings, values, fan-out --------------------------------------------------------------------


def test_settings_come_from_the_environment(tmp_path: Path) -> None:
    assert tracking_settings(tmp_path, {}) == tracking_settings(tmp_path, {"FLOWPIN_TRACKING": "AIM "})
    default = tracking_settings(tmp_path, {})
    assert (default.mode, default.repo, default.remote) == ("aim", str(tmp_path), False)
    assert tracking_settings(tmp_path, {"FLOWPIN_TRACKING": "off"}).mode == "off"
    relative = tracking_settings(tmp_path, {"FLOWPIN_AIM_REPO": "runs/aim"})
    assert relative.repo == str((tmp_path / "runs" / "aim").resolve())
    remote = tracking_settings(tmp_path, {"FLOWPIN_AIM_REPO": "aim://127.0.0.1:53800"})
    assert remote.remote and remote.repo == "aim://127.0.0.1:53800"
    with pytest.raises(TrackingError, match="FLOWPIN_TRACKING='yes please': unknown; set it to 'aim' or 'off'"):
        tracking_settings(tmp_path, {"FLOWPIN_TRACKING": "yes please"})


def test_numeric_leaves_flatten_numbers_only() -> None:
    report = {"a": 1, "b": {"c": 2.5, "d": {"e": -1}}, "flag": True, "curve": [1, 2], "name": "x", "none": None}
    assert numeric_leaves(report) == {"a": 1.0, "b.c": 2.5, "b.d.e": -1.0}
    assert len(numeric_leaves({f"k{i}": i for i in range(100)}, limit=7)) == 7


class Recording:
    """A tracker that remembers every call."""

    def __init__(self, run_id: str = "rec") -> None:
        self._run_id = run_id
        self.events: list[tuple[Any, ...]] = []
        self.closed = False

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.events.append(("params", dict(params)))

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        self.events.append(("metrics", step, dict(metrics), dict(context or {})))

    def close(self) -> None:
        self.closed = True


def test_fanout_forwards_everything_in_order_and_closes_nothing() -> None:
    a, b = Recording("a"), Recording("b")
    fan = FanoutTracker(a, b)
    assert isinstance(fan, Tracker) and fan.run_id == "a"
    fan.log_params({"x": 1})
    fan.log_metrics(3, {"loss": 0.5}, {"subset": "train"})
    fan.close()
    assert a.events == b.events == [("params", {"x": 1}), ("metrics", 3, {"loss": 0.5}, {"subset": "train"})]
    assert not a.closed and not b.closed
    with pytest.raises(InternalError, match="at least one"):  # a programming error, not the user's input
        FanoutTracker()


# --- the Aim tracker ------------------------------------------------------------------------------


def test_aim_tracker_logs_params_and_metrics_in_context(tmp_path: Path) -> None:
    with AimTracker(tmp_path, experiment="pretrain", name="pretrain lr=1e-3", context={"stage": "pretrain"}) as t:
        assert isinstance(t, Tracker) and len(t.run_id) == HASH
        t.log_params({"recipe": {"lr": 1e-3, "layers": None, "sizes": (1, 2)}, "seed": 2**70, "bad": float("nan")})
        for step in (1, 2, 3):
            t.log_metrics(step, {"loss": 4.0 - step, "lr": 1e-3}, {"subset": "train"})
        t.log_metrics(3, {"reward": 0.75}, {"subset": "rl"})
    assert (tmp_path / ".aim" / ".gitignore").read_text() == "*\n"  # never dirties the project's git state
    runs = read_runs(tmp_path)
    run = runs[t.run_id]
    assert (run["name"], run["experiment"]) == ("pretrain lr=1e-3", "pretrain")
    assert run["params"]["recipe"] == {"lr": 1e-3, "layers": None, "sizes": [1, 2]}
    assert run["params"]["seed"] == str(2**70) and run["params"]["bad"] == "NaN"  # beyond int64 / non-finite
    assert metric(run, "loss", stage="pretrain", subset="train") == {1: 3.0, 2: 2.0, 3: 1.0}
    assert metric(run, "reward", stage="pretrain", subset="rl") == {3: 0.75}


def test_an_unopenable_tracker_fails_fast_with_a_named_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the repository should go")
    with pytest.raises(TrackingError, match=r"cannot create the Aim repository .*FLOWPIN_TRACKING=off"):
        AimTracker(tmp_path / "not-a-dir", experiment="x")
    port = free_port()  # nothing listens there
    with pytest.raises(TrackingError, match=rf"aim://127.0.0.1:{port} \(is `aim server` running there\?\)"):
        open_stage_tracker(tmp_path, stage="x", environ={"FLOWPIN_AIM_REPO": f"aim://127.0.0.1:{port}"})


@dataclasses.dataclass
class Breaking:
    """Stands in for an AimTracker whose repository goes away mid-run (disk full, repo deleted, locked)."""

    fail_after: int
    calls: int = 0
    closed: bool = False

    @property
    def run_id(self) -> str:
        return "0" * HASH

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.log_metrics(0, {})

    def log_metrics(self, step: int, metrics: Mapping[str, float], context: Mapping[str, Any] | None = None) -> None:
        self.calls += 1
        if self.calls > self.fail_after:
            raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.closed = True


def test_a_tracker_failing_mid_run_warns_once_stops_and_the_note_says_degraded(tmp_path: Path) -> None:
    inner = Breaking(fail_after=2)
    tracker = StageTracker(cast(AimTracker, inner), tracking_settings(tmp_path, {}), root=tmp_path, stage="sft")
    assert tracker.note() == {
        "tracker": "aim",
        "runHash": "0" * HASH,
        "repo": ".aim",
        "experiment": "sft",
        "status": "ok",
    }
    tracker.log_params({"a": 1})
    tracker.log_metrics(1, {"loss": 1.0})
    with pytest.warns(TrackingWarning, match="stage sft: Aim tracking of run 0+ stopped .*the run goes on"):
        tracker.log_metrics(2, {"loss": 0.5})
    assert inner.closed and not tracker.active and inner.calls == 3
    tracker.log_metrics(3, {"loss": 0.25})  # dropped: no second warning, no exception
    tracker.close()
    assert inner.calls == 3
    note = tracker.note()
    assert note["status"] == "degraded" and note["runHash"] == "0" * HASH
    assert note["failure"] == "log_metrics failed: OSError: [Errno 28] No space left on device"
    assert "DEGRADED, stopped mid-run: log_metrics failed" in describe_note(note)


def test_tracking_off_records_nothing_and_imports_no_aim(tmp_path: Path) -> None:
    probe = (
        "import sys; from pathlib import Path; from flowpin.tracking.aim import open_stage_tracker\n"
        f"t = open_stage_tracker(Path({str(tmp_path)!r}), stage='x', environ={{'FLOWPIN_TRACKING': 'off'}})\n"
        "t.log_params({'a': 1}); t.log_metrics(1, {'loss': 1.0}); t.log_report({'b': 2}); t.close()\n"
        "print(t.run_id, t.active, t.note(), 'aim' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stdout.split(" ", 2)[:2] == ["off", "False"]
    assert proc.stdout.rstrip().endswith("{'tracker': 'off', 'switch': 'FLOWPIN_TRACKING=off'} False")
    assert not (tmp_path / ".aim").exists()


# --- the training loop ----------------------------------------------------------------------------

V, T, B = 16, 9, 2


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.embed(x))
        return out


def tiny_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
    return loss, {"reward": float(batch[0, 0])}  # an extra metric, as RLVR's loss returns its reward


@dataclasses.dataclass(frozen=True)
class Counting:
    order: DataOrder

    def __call__(self, step: int) -> torch.Tensor:
        rows = [(torch.arange(T) + i) % V for i in self.order.batch(step)]
        return torch.stack(rows)


def train_tiny(run_dir: Path, tracker: Tracker | None) -> Path:
    seed_all(0)
    schedule = ScheduleConfig(total_steps=6, warmup_steps=1, peak_lr=1e-2, min_lr=1e-3)
    optim = OptimConfig(schedule=schedule)
    cfg = TrainConfig(steps=6, batch_size=B, seed=1, optim=optim, checkpoint_every=3, log_every=1)
    order = DataOrder(n_sequences=10, dataset_digest=hashlib.sha256(b"c").hexdigest(), order_seed=0, batch_size=B)
    result = train_loop(TinyLM(), cfg, batches=Counting(order), loss_fn=tiny_loss, run_dir=run_dir, tracker=tracker)
    return result.checkpoints[-1].path


@pytest.fixture
def megatron_on_cpu() -> Iterator[None]:
    """megatron's CPU patches (a stage's entry point applies them; ``train_loop`` saves megatron's RNG streams),
    taken off again afterwards unless they were on before: the test does not depend on which file ran first."""
    before = megatron_cpu.applied()
    megatron_cpu.apply()
    yield
    if not before:
        megatron_cpu.restore()


def test_train_loop_fans_out_to_the_stage_tracker_and_tracking_changes_no_byte(
    tmp_path: Path, one_torch_thread: None, megatron_on_cpu: None
) -> None:
    rec = Recording()
    plain = train_tiny(tmp_path / "plain", None)
    recorded = train_tiny(tmp_path / "recorded", rec)
    with AimTracker(tmp_path / "aim", experiment="tiny", context={"stage": "tiny"}) as aim:
        tracked = train_tiny(tmp_path / "tracked", aim)
        assert aim.run_id  # still open: the loop does not close the stage's tracker
    assert not rec.closed
    lines = read_jsonl(tmp_path / "recorded" / "metrics.jsonl")
    assert [e[0] for e in rec.events] == [line["event"] for line in lines]  # the same events, in order
    assert rec.events[0][1] == lines[0]["params"]
    assert [(e[1], e[2], e[3]) for e in rec.events[1:]] == [(x["step"], x["metrics"], x["context"]) for x in lines[1:]]
    assert set(rec.events[1][2]) == {"loss", "grad_norm", "lr", "tokens_per_s", "tokens_seen", "reward"}

    def digest(checkpoint: Path) -> str:
        return Hasher(checkpoint.parent, workers=1).digest(checkpoint.name).digest

    assert digest(plain) == digest(recorded) == digest(tracked)  # weights, optimizer, RNG and state.json
    run = read_runs(tmp_path / "aim")[aim.run_id]
    losses = metric(run, "loss", stage="tiny", subset="train")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == {x["step"]: x["metrics"]["loss"] for x in read_jsonl(tmp_path / "tracked" / "metrics.jsonl")[1:]}
    assert set(metric(run, "reward", subset="train")) == set(losses)
    assert run["params"]["config"]["steps"] == 6 and run["params"]["start_step"] == 0


TRAINING_METRICS = {"loss", "grad_norm", "lr", "tokens_per_s", "tokens_seen", "reward"}
"""What the loop logs per step for :func:`tiny_loss` (``reward``: the extra a loss function returns)."""


def test_a_training_runs_metrics_are_its_curves_and_its_configuration_is_params(
    tmp_path: Path, one_torch_thread: None, megatron_on_cpu: None
) -> None:
    """A run page opens on loss, lr and grad norm: configuration -- the loop's config, its determinism settings,
    the report's seeds and thread counts -- is stored as params, never as one-point metric sequences."""
    tracker = open_stage_tracker(tmp_path, stage="tiny", environ={})
    train_tiny(tmp_path / "run", tracker)
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["params"]
    report = {
        "steps": 6,
        "loss": {"first": 2.75, "last": 2.5},
        "determinism": {"numInteropThreads": 2, "numThreads": 1, "seed": 1234},
        "order": {"seed": 0, "batch_size": B},
        "curve": [2.75, 2.5],
    }
    tracker.log_report(report)  # what stage_run does after the body
    tracker.close()
    assert tracker.note()["status"] == "ok"
    run = read_runs(tmp_path)[tracker.run_id]  # through Aim's SDK, in a fresh process

    names = {m["name"] for m in run["metrics"]}
    assert names == TRAINING_METRICS and {"loss", "lr", "grad_norm"} <= names
    assert all(m["context"] == {"stage": "tiny", "subset": "train"} for m in run["metrics"])
    assert all(m["steps"] == [1, 2, 3, 4, 5, 6] for m in run["metrics"])  # curves, not one-point charts
    params = run["params"]
    assert params[REPORT_PARAM] == report
    assert params["config"] == logged["config"] and params["config"]["steps"] == 6
    assert params["determinism"] == logged["determinism"] and params["determinism"]
    configuration = numeric_leaves({k: params[k] for k in ("config", "determinism", REPORT_PARAM)}, limit=10**6)
    assert {"report.determinism.numThreads", "report.order.seed", "config.steps"} <= set(configuration)
    leaf_names = {path.rsplit(".", 1)[-1] for path in configuration} | set(configuration)
    assert not names & (leaf_names - TRAINING_METRICS)  # no configuration scalar is charted


# --- stage_run: the manifest records the run, the run records the manifest ------------------------

TOY_STAGE = textwrap.dedent(
    '''
    """A toy stage: writes a file, logs a metric per step, and fails on request."""
    import dataclasses
    from pathlib import Path

    import hydra
    from omegaconf import DictConfig

    from flowpin.stage import stage_run

    ROOT = Path(__file__).resolve().parents[1]


    @dataclasses.dataclass(frozen=True, kw_only=True)
    class ToyConfig:
        size: int = 3
        fail: bool = False


    @hydra.main(config_path="../params", config_name="toy", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        with stage_run("toy", cfg, ToyConfig, root=ROOT) as run:
            (run.out_dir / "values.txt").write_text(" ".join(str(i) for i in range(run.recipe.size)))
            for step in range(1, run.recipe.size + 1):
                run.tracker.log_metrics(step, {"value": step / 2}, {"subset": "train"})
            if run.recipe.fail:
                raise RuntimeError("the toy stage failed on purpose")
            run.report = {"size": run.recipe.size, "nested": {"half": run.recipe.size / 2}, "curve": [1, 2]}


    if __name__ == "__main__":
        main()
    '''
)
TOY_RECIPE = textwrap.dedent(
    """
    hydra:
      run: {dir: .flowpin/hydra/toy}
      output_subdir: null
      job: {chdir: false}
    paths: {out: data/toy, report: reports/toy.json, manifest: manifests/toy.json}
    toy: {size: 3, fail: false}
    """
)


@pytest.fixture
def toy(project: Project) -> Iterator[Path]:
    root = project.root
    (root / "stages").mkdir()
    (root / "params").mkdir()
    (root / "stages" / "toy.py").write_text(TOY_STAGE)
    (root / "params" / "toy.yaml").write_text(TOY_RECIPE)
    yield root


def run_toy(root: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWPIN_", "AIM_"))}
    environ.update(FLOWPIN_ROOT=str(root), **env)
    return subprocess.run(
        [sys.executable, "stages/toy.py", *overrides],
        cwd=root,
        env=environ,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def note_of(manifest: Path) -> dict[str, Any]:
    byproducts = load_manifest(manifest).run_details["byproducts"]
    notes = [b["annotations"] for b in byproducts if b["name"] == "tracking"]
    assert len(notes) == 1, byproducts
    return cast(dict[str, Any], notes[0])


def test_a_stage_run_logs_to_aim_and_its_manifest_records_the_run(
    toy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = run_toy(toy, "toy.size=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "aim.sdk.reporter" not in proc.stdout + proc.stderr  # Aim's INFO chatter stays out of the log
    manifest = toy / "manifests" / "toy.json"
    note = note_of(manifest)
    assert note["tracker"] == "aim" and note["repo"] == ".aim" and note["experiment"] == "toy"
    assert note["status"] == "ok" and len(note["runHash"]) == HASH
    monkeypatch.setenv("FLOWPIN_ROOT", str(toy))  # show checks the signature against this project's keys/
    assert flowpin_main(["show", str(manifest)]) == 0
    assert f"tracking   aim run {note['runHash']} in .aim (experiment toy)\n" in capsys.readouterr().out

    failed = run_toy(toy, "toy.fail=true")
    assert failed.returncode != 0 and "failed on purpose" in failed.stderr
    assert not manifest.exists()  # as before tracking: a failed run leaves no manifest

    runs = read_runs(toy)
    assert len(runs) == 2
    run = runs[note["runHash"]]
    assert (run["name"], run["experiment"]) == ("toy toy.size=4", "toy")
    params = run["params"]
    assert params["stage"] == "toy" and params["overrides"] == ["toy.size=4"]
    assert params["recipe"]["toy"] == {"size": 4, "fail": False}  # the resolved recipe
    assert set(params["git"]) >= {"commit", "dirty"}
    assert params["hydra"] == {"mode": "RUN", "job": None, "id": None}  # a sweep job has its number and id
    # No manifest after the failed run: the manifest param describes the successful run's file, read then.
    assert params["manifest"]["path"] == "manifests/toy.json"
    assert len(params["manifest"]["sha256"]) == len(params["manifest"]["identity"]) == 64
    assert metric(run, "value", stage="toy", subset="train") == {1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0}
    # the report is a param, as written (lists too); none of its numbers is a one-point metric
    assert params[REPORT_PARAM] == {"size": 4, "nested": {"half": 2.0}, "curve": [1, 2]}
    assert [(m["name"], m["context"]) for m in run["metrics"]] == [("value", {"stage": "toy", "subset": "train"})]
    (other,) = (r for h, r in runs.items() if h != note["runHash"])
    assert other["params"]["failed"] == "RuntimeError: the toy stage failed on purpose"
    assert "manifest" not in other["params"]


def test_the_run_param_pins_the_manifest_file_it_names(toy: Path) -> None:
    proc = run_toy(toy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = toy / "manifests" / "toy.json"
    run = read_runs(toy)[note_of(manifest)["runHash"]]
    assert run["params"]["manifest"]["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert run["params"]["manifest"]["identity"] == load_manifest(manifest).identity_digest()


def test_an_unopenable_tracker_fails_the_stage_before_anything_is_recorded(toy: Path) -> None:
    assert run_toy(toy, FLOWPIN_TRACKING="off").returncode == 0
    manifest = toy / "manifests" / "toy.json"
    before = manifest.read_bytes()
    assert note_of(manifest) == {"tracker": "off", "switch": "FLOWPIN_TRACKING=off"}
    assert not (toy / ".aim").exists()
    down = run_toy(toy, "toy.size=5", FLOWPIN_AIM_REPO=f"aim://127.0.0.1:{free_port()}")
    assert down.returncode != 0 and "TrackingError" in down.stderr and "FLOWPIN_TRACKING=off" in down.stderr
    assert manifest.read_bytes() == before  # the previous manifest, outputs and report are untouched
    assert (toy / "data" / "toy" / "values.txt").read_text() == "0 1 2"


def test_the_tracking_switch_is_not_part_of_a_manifests_identity(toy: Path) -> None:
    on, off = toy / "on.json", toy / "off.json"
    assert run_toy(toy).returncode == 0
    shutil.copy(toy / "manifests" / "toy.json", on)
    assert run_toy(toy, FLOWPIN_TRACKING="off").returncode == 0
    shutil.copy(toy / "manifests" / "toy.json", off)
    assert load_manifest(on).subjects == load_manifest(off).subjects
    assert load_manifest(on).identity_digest() == load_manifest(off).identity_digest()


# --- the UI (headless Chromium) and the remote tracking server -------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--dump-dom",
)


def chromium() -> str:
    """The Debian ``chromium`` binary; the UI test is skipped without it only outside CI (.ci/run installs it)."""
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium before `make test`")
        pytest.skip("chromium not installed (apt-get install --no-install-recommends chromium)")
    return found


def dump_dom(url: str) -> str:
    with tempfile.TemporaryDirectory(prefix="flowpin-chromium-") as profile:
        proc = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            start_new_session=True,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
        return body


def stopped(server: AimProcess) -> None:
    pgid = server.pgid
    server.stop()
    assert server.process.poll() is not None and group_members(pgid) == []  # the uvicorn child too


def test_the_ui_lists_the_logged_run_and_its_page_opens_on_the_training_curves(tmp_path: Path) -> None:
    chromium()  # skip (outside CI) before starting anything
    t = open_stage_tracker(tmp_path, stage="pretrain", name="ui-probe-run", environ={})
    t.log_params({"stage": "pretrain", "determinism": {"numInteropThreads": 2, "numThreads": 2, "seed": 1234}})
    for step in (1, 2):
        t.log_metrics(step, {"loss": 2.5 / step, "lr": 1e-3, "grad_norm": 1.0 / step}, {"subset": "train"})
    t.log_report({"determinism": {"numInteropThreads": 2, "numThreads": 2, "seed": 1234}, "loss": {"last": 1.25}})
    t.close()
    server = start_ui(tmp_path, log=tmp_path / "aim-up.log")
    try:
        assert server.url.startswith("http://127.0.0.1:")
        info = json.loads(get(f"{server.url}/api/runs/{t.run_id}/info/"))  # the REST API knows the run
        assert info["props"]["name"] == "ui-probe-run" and info["props"]["experiment"]["name"] == "pretrain"
        assert t.run_id.encode() in get(f"{server.url}/api/runs/search/run/")  # and lists it
        dom = dump_dom(f"{server.url}/runs")  # the SPA renders the runs table from those calls
        assert f'href="/runs/{t.run_id}"' in dom and "ui-probe-run" in dom
        # The run page's charts, in page order: the training curves, no one-point configuration chart
        charts = re.findall(
            r'RunDetailMetricsTab__container__chartContainer" data-name="([^"]*)"',
            dump_dom(f"{server.url}/runs/{t.run_id}/metrics"),
        )
        assert charts == ["grad_norm", "loss", "lr"]
    finally:
        stopped(server)


def test_flowpin_ui_serves_until_interrupted_and_takes_its_children_along(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    env = {**os.environ, "FLOWPIN_ROOT": str(tmp_path)}
    ui = subprocess.Popen(
        [str(BIN / "flowpin"), "ui", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        # Started with SIGINT ignored (as a background job is, and as this test process may be): Ctrl-C
        # must still stop it -- flowpin ui installs its own handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    aim_pgids: list[int] = []
    try:
        assert ui.stdout is not None
        line = ui.stdout.readline()
        aim_pgids = _children_pgids(ui.pid)
        assert line.startswith(f"Aim UI of {tmp_path / '.aim'}: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].split()[0]
        assert b"<html" in get(url).lower()
        (aim_pgid,) = aim_pgids  # aim up, in a session of its own (with its uvicorn child) ...
        assert aim_pgid != ui.pid and len(group_members(aim_pgid)) >= 2
        ui.send_signal(signal.SIGINT)  # Ctrl-C
        assert ui.wait(timeout=120) == 0  # stop: SIGTERM, 15 s grace, SIGKILL
        assert group_members(aim_pgid) == []  # ... stopped as a whole when flowpin ui exits
    finally:  # whatever failed, leave no server behind: flowpin ui's own SIGTERM path, then SIGKILL
        if ui.poll() is None:
            ui.terminate()
            try:
                ui.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()
        for pgid in aim_pgids:
            if group_members(pgid):
                os.killpg(pgid, signal.SIGKILL)


def _children_pgids(pid: int) -> list[int]:
    """Process groups of ``pid``'s direct children (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid):
            out.append(int(fields[2]))
    return out


def test_remote_tracking_server_on_loopback_receives_a_stage_run(tmp_path: Path) -> None:
    server_root, project = tmp_path / "server", tmp_path / "project"
    project.mkdir()
    server = start_server(server_root, log=tmp_path / "aim-server.log")
    try:
        assert server.url.startswith("aim://127.0.0.1:")
        tracker = open_stage_tracker(project, stage="midtrain", environ={"FLOWPIN_AIM_REPO": server.url})
        tracker.log_params({"stage": "midtrain"})
        for step in (10, 20):
            tracker.log_metrics(step, {"loss": 100.0 / step}, {"subset": "train"})
        tracker.close()
        assert tracker.note() == {
            "tracker": "aim",
            "runHash": tracker.run_id,
            "repo": server.url,
            "experiment": "midtrain",
            "status": "ok",
        }
    finally:
        stopped(server)
    assert not (project / ".aim").exists()  # everything went to the server's repository
    run = read_runs(server_root)[tracker.run_id]
    assert run["name"] == "midtrain" and run["params"]["stage"] == "midtrain"
    assert metric(run, "loss", stage="midtrain", subset="train") == {10: 10.0, 20: 5.0}


# --- CI, benchmark --------------------------------------------------------------------------------


def test_ci_installs_chromium_for_the_ui_test() -> None:
    script = (REPO / ".ci" / "run").read_text()
    assert "apt-get install -y --no-install-recommends chromium" in script
    assert "command -v chromium" in script and "id -u" in script  # only when missing; sudo only if not root
    assert script.index("chromium") < script.index("make test")
    subprocess.run(["bash", "-n", str(REPO / ".ci" / "run")], check=True)


def test_tracking_benchmark_prints_the_three_modes() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/tracking.py",
            "--steps",
            "3",
            "--repeat",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("off", "jsonl", "jsonl+aim", "overhead"):
        assert row in proc.stdout
