"""The deterministic training loop: fresh runs agree bitwise, and so do killed-and-resumed and forked ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import flowpin.train.loop as loop
from flowpin.data.order import DataOrder, order_for
from flowpin.data.shards import write_dataset
from flowpin.data.tokenize import TokenizeConfig, run_tokenize
from flowpin.data.tokenized import TokenizedDataset
from flowpin.errors import DataError, DataOrderError, FlowpinError, InternalError, RecipeError
from flowpin.hashing import Hasher
from flowpin.recipe import to_config
from flowpin.tracking import JsonlTracker, NullTracker, Tracker, read_jsonl
from flowpin.train.checkpoint import ParentRef, TrainState, load_checkpoint, read_state, state_digest
from flowpin.train.loop import (
    DeterminismWarning,
    OptimConfig,
    TrainConfig,
    build_optimizer,
    determinism_report,
    determinism_settings,
    ordered_batches,
    seed_all,
    train,
)
from flowpin.train.schedule import ScheduleConfig

# The model, data and recipe live in one script so that subprocesses (the SIGKILL test) and this
# process train exactly the same thing.
SCRIPT = textwrap.dedent(
    '''
    """A tiny LM trained by flowpin's loop; argv: RUN_DIR [PAUSE_AT_STEP]."""
    import dataclasses, hashlib, os, sys, time
    from pathlib import Path

    import torch
    from torch import nn

    from flowpin.data.order import DataOrder
    from flowpin.train.loop import OptimConfig, TrainConfig, seed_all, train
    from flowpin.train.schedule import ScheduleConfig

    V, D, T, B = 32, 16, 12, 4

    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(V, D)
            self.norm = nn.LayerNorm(D)
            self.drop = nn.Dropout(0.1)
            self.mix = nn.Linear(D, D)
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.embed.weight  # tied

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.drop(self.mix(self.norm(self.embed(x))))) / D**0.5

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))

    @dataclasses.dataclass(frozen=True)
    class Counting:
        """Sequence i counts up mod V from a start drawn from i: learnable, and a pure function of the step."""

        order: DataOrder
        pause_at: int = -1
        marker: Path | None = None

        def __call__(self, step: int) -> torch.Tensor:
            if step == self.pause_at and self.marker is not None:
                self.marker.write_text(str(step))
                time.sleep(120)  # the test kills us here, between two checkpoints
            rows = []
            for i in self.order.batch(step):
                start = torch.randint(0, V, (1,), generator=torch.Generator().manual_seed(i))
                rows.append((start + torch.arange(T)) % V)
            return torch.stack(rows)

    DIGEST = hashlib.sha256(b"counting").hexdigest()
    ORDER = DataOrder(n_sequences=50, dataset_digest=DIGEST, order_seed=3, batch_size=B)

    def config(**changes: object) -> TrainConfig:
        schedule = ScheduleConfig(total_steps=40, warmup_steps=4, peak_lr=2e-2, min_lr=2e-3)
        fields = dict(steps=40, batch_size=B, seed=11, checkpoint_every=10, log_every=5)
        fields["optim"] = OptimConfig(schedule=schedule)
        fields.update(changes)
        return TrainConfig(**fields)

    def model() -> TinyLM:
        seed_all(0)
        return TinyLM()

    def main(run_dir: Path, pause_at: int = -1, **changes: object):
        data = Counting(ORDER, pause_at, run_dir / "paused")
        return train(model=model(), loss_fn=loss_fn, data=data, cfg=config(**changes), run_dir=run_dir)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else -1)
    '''
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "tiny_lm.py"
    path.write_text(SCRIPT)
    return path


@pytest.fixture(scope="module")
def lm(script: Path) -> dict[str, Any]:
    return runpy.run_path(str(script), run_name="tiny_lm")


def digest(checkpoint: Path) -> str:
    return Hasher(checkpoint.parent, workers=1).digest(checkpoint.name).digest


def final(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step-000040"


# --- determinism ----------------------------------------------------------------------------------


def test_two_fresh_runs_give_identical_checkpoints(lm: dict[str, Any], tmp_path: Path) -> None:
    a = lm["main"](tmp_path / "a")
    b = lm["main"](tmp_path / "b")
    assert [(c.path.name, c.step) for c in a.checkpoints] == [(f"step-{s:06d}", s) for s in (10, 20, 30, 40)]
    for ca, cb in zip(a.checkpoints, b.checkpoints, strict=True):
        assert digest(ca.path) == digest(cb.path)
    assert a.state == b.state and a.metrics == b.metrics
    c = lm["main"](tmp_path / "c", seed=12)  # one field changed -> other bytes
    assert digest(final(tmp_path / "c")) != digest(final(tmp_path / "a"))
    assert c.state.config_digest != a.state.config_digest


def test_interrupted_run_resumes_to_the_same_bytes(lm: dict[str, Any], tmp_path: Path) -> None:
    lm["main"](tmp_path / "ref")

    class Crash(Exception):
        pass

    @dataclasses.dataclass(frozen=True)
    class Crashing:
        order: DataOrder

        def __call__(self, step: int) -> torch.Tensor:
            if step == 25:
                raise Crash
            batch: torch.Tensor = lm["Counting"](self.order)(step)
            return batch

    with pytest.raises(Crash):
        train(
            model=lm["model"](),
            loss_fn=lm["loss_fn"],
            data=Crashing(lm["ORDER"]),
            cfg=lm["config"](),
            run_dir=tmp_path / "run",
        )
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-000010", "step-000020"]
    (tmp_path / "run" / "checkpoints" / ".step-000030.x1y2.tmp").mkdir()  # as a kill mid-save leaves it
    torch.manual_seed(999)  # a new process would start with other generator states
    result = lm["main"](tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints" / ".step-000030.x1y2.tmp").exists()
    assert result.resumed_from == tmp_path / "run" / "checkpoints" / "step-000020"
    assert digest(final(tmp_path / "run")) == digest(final(tmp_path / "ref"))
    again = lm["main"](tmp_path / "run")  # complete: nothing left to do
    assert again.metrics == {} and again.state == result.state and len(again.checkpoints) == 4


def test_sigkill_between_checkpoints_then_resume_equals_uninterrupted(
    script: Path, lm: dict[str, Any], tmp_path: Path
) -> None:
    run = [sys.executable, str(script)]
    victim = subprocess.Popen([*run, str(tmp_path / "run"), "25"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "paused").exists():  # it pauses inside step 25, after checkpoint 20
        assert victim.poll() is None, victim.communicate()[1].decode()
        assert time.monotonic() < deadline, "the run never reached step 25"
        time.sleep(0.02)
    assert (tmp_path / "run" / "checkpoints" / "step-000020" / "state.json").is_file()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000010", "step-000020"]
    resumed = subprocess.Popen([*run, str(tmp_path / "run")], stderr=subprocess.PIPE)
    # The uninterrupted reference: in this process when its settings match the subprocess's (cheaper),
    # else in a subprocess too (another test may have switched e.g. deterministic algorithms on here).
    if determinism_settings() == read_state(tmp_path / "run" / "checkpoints" / "step-000010").determinism:
        lm["main"](tmp_path / "ref")
    else:
        subprocess.run([*run, str(tmp_path / "ref")], check=True)
    assert resumed.wait() == 0, resumed.communicate()[1].decode()
    assert digest(final(tmp_path / "run")) == digest(final(tmp_path / "ref"))


def test_extra_generators_are_checkpointed_and_restored(lm: dict[str, Any], tmp_path: Path) -> None:
    """A generator the loop cannot see (megatron's RNG tracker) continues across a resume via ExtraRng."""

    def run(run_dir: Path, *, seed: int = 5, crash_at: int = -1, hook: bool = True) -> Any:
        gen = torch.Generator().manual_seed(seed)

        def weighted_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
            logits = model(batch[:, :-1])
            per_token = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            return (per_token.mean(1) * torch.rand(batch.shape[0], generator=gen)).mean()

        @dataclasses.dataclass(frozen=True)
        class Source:
            order: DataOrder

            def __call__(self, step: int) -> torch.Tensor:
                if step == crash_at:
                    raise KeyboardInterrupt
                batch: torch.Tensor = lm["Counting"](self.order)(step)
                return batch

        def restore(states: Mapping[str, torch.Tensor]) -> None:
            gen.set_state(states["weights"])

        extra = loop.ExtraRng(capture=lambda: {"weights": gen.get_state()}, restore=restore)
        return train(
            model=lm["model"](),
            loss_fn=weighted_loss,
            data=Source(lm["ORDER"]),
            cfg=lm["config"](steps=30),
            run_dir=run_dir,
            extra_rng=extra if hook else None,
        )

    run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", crash_at=15)
    run(tmp_path / "run", seed=99)  # a new process: its generator starts elsewhere until restored
    last = tmp_path / "run" / "checkpoints" / "step-000030"
    assert digest(last) == digest(tmp_path / "ref" / "checkpoints" / "step-000030")
    assert read_state(last).rng.extra.keys() == {"weights"}
    shutil.rmtree(last)
    with pytest.warns(DeterminismWarning, match=r"generator states \['weights'\], but no extra_rng restores them"):
        run(tmp_path / "run", seed=99, hook=False)


def test_adamw_for_loop_and_foreach_agree_bitwise_fused_does_not(lm: dict[str, Any], tmp_path: Path) -> None:
    """The measured finding behind OptimConfig.implementation (torch 2.13 CPU)."""
    finals = {}
    for impl in ("for_loop", "foreach", "fused"):
        cfg = lm["config"](
            steps=8, optim=OptimConfig(schedule=ScheduleConfig(total_steps=8, peak_lr=1e-2), implementation=impl)
        )
        model = lm["model"]()
        train(model=model, loss_fn=lm["loss_fn"], data=lm["Counting"](lm["ORDER"]), cfg=cfg, run_dir=tmp_path / impl)
        finals[impl] = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    assert finals["for_loop"] == finals["foreach"]
    assert finals["fused"] != finals["for_loop"]


# --- learning and reporting -----------------------------------------------------------------------


def test_loss_falls_and_the_tracker_hears_it(lm: dict[str, Any], tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    with JsonlTracker(log, run_id="r1") as tracker:
        assert isinstance(tracker, Tracker)
        model = lm["model"]()
        result = train(
            model=model,
            loss_fn=lm["loss_fn"],
            data=lm["Counting"](lm["ORDER"]),
            cfg=lm["config"](),
            run_dir=tmp_path,
            tracker=tracker,
        )
    lines = read_jsonl(log)
    params, metrics = lines[0], lines[1:]
    assert params["event"] == "params" and params["run"] == "r1"
    assert params["params"]["config"]["optim"]["schedule"]["peak_lr"] == 0.02 and params["params"]["start_step"] == 0
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(m["context"] == {"subset": "train"} for m in metrics)
    assert set(metrics[0]["metrics"]) == {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"}
    assert metrics[-1]["metrics"]["tokens_seen"] == 40 * 4 * 12 == result.state.tokens_seen
    losses = [m["metrics"]["loss"] for m in metrics]
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics[-1]["metrics"]["loss"] == result.metrics["loss"] == result.state.metrics["loss"]
    assert metrics[-1]["metrics"]["lr"] == result.state.lr


def test_loss_fn_metrics_and_batches_with_a_middle_dimension(lm: dict[str, Any], tmp_path: Path) -> None:
    """SFT-style batches ``[B, 2, T]`` (ids, loss mask) and RL-style extra metrics from the loss."""
    counting = lm["Counting"](lm["ORDER"])

    @dataclasses.dataclass(frozen=True)
    class Masked:
        order: DataOrder

        def __call__(self, step: int) -> torch.Tensor:
            ids = counting(step)
            return torch.stack([ids, (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids)], dim=1)

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = batch[:, 0], batch[:, 1]
        per_token = nn.functional.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:], reduction="none")
        kept = mask[:, 1:].float()
        return (per_token * kept).sum() / kept.sum(), {"masked_share": float(1 - kept.mean())}

    log = tmp_path / "metrics.jsonl"
    with JsonlTracker(log) as tracker:
        result = train(
            model=lm["model"](),
            loss_fn=loss_fn,
            data=Masked(lm["ORDER"]),
            cfg=lm["config"](steps=10, checkpoint_every=10),
            run_dir=tmp_path,
            tracker=tracker,
        )
    metrics = [row["metrics"] for row in read_jsonl(log)[1:]]
    assert metrics[-1]["masked_share"] == pytest.approx(3 / 11)  # 3 of the 11 predicted tokens are masked
    assert result.state.tokens_seen == 10 * 4 * 12  # rows x sequence length, not x 2
    assert read_state(result.checkpoints[-1].path).metrics["masked_share"] == metrics[-1]["masked_share"]

    def clashing(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return lm["loss_fn"](model, batch), {"lr": 1.0}

    with pytest.raises(InternalError, match="must not reuse the loop's names"):
        train(model=lm["model"](), loss_fn=clashing, data=counting, cfg=lm["config"](), run_dir=tmp_path / "x")


def test_jsonl_tracker_writes_nan_and_survives_a_torn_line(tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    tracker = JsonlTracker(log)
    tracker.log_metrics(1, {"loss": float("nan"), "x": float("-inf")})
    tracker.close()
    with open(log, "ab") as fh:
        fh.write(b'{"event": "metr')  # a writer killed mid-line
    (line,) = read_jsonl(log)
    assert line["metrics"] == {"loss": "NaN", "x": "-Infinity"} and len(line["run"]) == 32
    with JsonlTracker(log, run_id="again") as resumed:  # a resumed run drops the torn line, then appends
        resumed.log_metrics(2, {"loss": 1.5}, {"subset": "train"})
    assert [(x["step"], x["run"]) for x in read_jsonl(log)] == [(1, line["run"]), (2, "again")]
    null = NullTracker()
    null.log_params({"a": 1})
    null.log_metrics(1, {"loss": 1.0})
    assert isinstance(null, Tracker) and null.run_id == "null"


# --- resume and fork rules ------------------------------------------------------------------------


def test_resume_refuses_another_config_or_data(lm: dict[str, Any], tmp_path: Path) -> None:
    lm["main"](tmp_path, steps=20)  # checkpoints at 10 and 20
    changed = lm["config"](
        optim=OptimConfig(schedule=ScheduleConfig(total_steps=40, warmup_steps=4, peak_lr=1e-2, min_lr=2e-3))
    )
    with pytest.raises(RecipeError, match=r"optim\.schedule\.peak_lr, steps: .* different config"):
        train(
            model=lm["model"](), loss_fn=lm["loss_fn"], data=lm["Counting"](lm["ORDER"]), cfg=changed, run_dir=tmp_path
        )
    other = dataclasses.replace(lm["ORDER"], order_seed=4)
    with pytest.raises(DataOrderError, match="resume with the same data or fork"):
        train(
            model=lm["model"](),
            loss_fn=lm["loss_fn"],
            data=lm["Counting"](other),
            cfg=lm["config"](steps=20),
            run_dir=tmp_path,
        )
    older = tmp_path / "checkpoints" / "step-000010"
    with pytest.raises(RecipeError, match="would overwrite it"):
        train(
            model=lm["model"](),
            loss_fn=lm["loss_fn"],
            data=lm["Counting"](lm["ORDER"]),
            cfg=lm["config"](steps=20),
            run_dir=tmp_path,
            resume_from=older,
        )


def test_changed_settings_on_resume_warn_and_are_recorded(
    lm: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm["main"](tmp_path)
    for later in ("step-000030", "step-000040"):  # as if killed after checkpoint 20
        shutil.rmtree(tmp_path / "checkpoints" / later)
    real = determinism_settings()
    monkeypatch.setattr(loop, "determinism_settings", lambda: {**real, "torch_num_threads": 7})
    with pytest.warns(
        DeterminismWarning, match="torch_num_threads: the checkpoint was trained with 1, this process has 7"
    ):
        result = lm["main"](tmp_path)
    assert result.determinism_changes and "torch_num_threads" in result.determinism_changes[0]
    recorded = read_state(final(tmp_path)).determinism_changes
    assert len(recorded) == 1 and recorded[0]["step"] == 20 and "torch_num_threads" in recorded[0]["changes"][0]


def test_determinism_report() -> None:
    now = determinism_settings()
    assert determinism_report(now, dict(now)) == []
    lines = determinism_report(
        # recorded False explicitly: `now` holds whatever an earlier test in this process left set
        {**now, "torch_num_threads": 2, "deterministic_algorithms": False, "gone": 1},
        {**now, "torch_num_threads": 4, "deterministic_algorithms": 1},
    )
    assert [line.split(":")[0] for line in lines] == ["deterministic_algorithms", "gone", "torch_num_threads"]
    assert "reduction" in lines[2] and "<absent>" in lines[1]
    assert "bool" not in lines[0] and "True" not in lines[0]  # 1 vs True differ by type: reported


def test_fork_continues_from_a_checkpoint_into_a_new_run(lm: dict[str, Any], tmp_path: Path) -> None:
    lm["main"](tmp_path / "parent")
    at20 = tmp_path / "parent" / "checkpoints" / "step-000020"
    parent_bytes = digest(final(tmp_path / "parent"))

    def fork(run_dir: Path, **changes: Any) -> Any:
        model = lm["model"]()
        optimizer = build_optimizer(model, lm["config"](**changes).optim)
        start = load_checkpoint(at20, model=model, optimizer=optimizer)
        cfg = lm["config"](**changes)
        return train(
            model=model,
            loss_fn=lm["loss_fn"],
            data=lm["Counting"](lm["ORDER"]),
            cfg=cfg,
            run_dir=run_dir,
            optimizer=optimizer,
            start_state=start,
        )

    same = fork(tmp_path / "same")
    assert same.state.parent == ParentRef(state_sha256=state_digest(at20), step=20)
    assert [c.step for c in same.checkpoints] == [30, 40]
    parent_final = load_checkpoint(final(tmp_path / "parent"), model=lm["model"](), optimizer=None)
    assert same.state.metrics == parent_final.metrics and same.state.data == parent_final.data
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):  # same recipe: same bytes
        assert (final(tmp_path / "same") / name).read_bytes() == (final(tmp_path / "parent") / name).read_bytes()

    hot = fork(tmp_path / "hot", grad_clip=0.25)
    assert hot.state.parent == same.state.parent and hot.state.config["grad_clip"] == 0.25
    assert hot.state.metrics != same.state.metrics
    assert digest(final(tmp_path / "parent")) == parent_bytes  # the parent run is untouched

    again = fork(tmp_path / "hot", grad_clip=0.25)  # rerunning a finished fork resumes (nothing to do)
    assert again.metrics == {} and again.state == hot.state


def test_fork_onto_new_data_starts_its_order_at_zero(lm: dict[str, Any], tmp_path: Path) -> None:
    lm["main"](tmp_path / "parent", steps=10)
    model = lm["model"]()
    start = load_checkpoint(tmp_path / "parent" / "checkpoints" / "step-000010", model=model, optimizer=None)
    new_order = dataclasses.replace(lm["ORDER"], dataset_digest=hashlib.sha256(b"midtrain mix").hexdigest())
    seen: list[int] = []

    @dataclasses.dataclass(frozen=True)
    class Recording:
        order: DataOrder

        def __call__(self, step: int) -> torch.Tensor:
            seen.append(step)
            batch: torch.Tensor = lm["Counting"](self.order)(step)
            return batch

    cfg = lm["config"](steps=15)
    result = train(
        model=model,
        loss_fn=lm["loss_fn"],
        data=Recording(new_order),
        cfg=cfg,
        run_dir=tmp_path / "mid",
        start_state=start,
    )
    assert seen == [0, 1, 2, 3, 4]
    assert result.state.step == 15 and result.state.data.next_step == 5
    assert result.state.data.dataset_digest == new_order.dataset_digest


def test_bad_inputs(lm: dict[str, Any], tmp_path: Path) -> None:
    data = lm["Counting"](lm["ORDER"])
    with pytest.raises(RecipeError, match=r"train\.batch_size: 5, but the data order has batch size 4"):
        train(model=lm["model"](), loss_fn=lm["loss_fn"], data=data, cfg=lm["config"](batch_size=5), run_dir=tmp_path)

    @dataclasses.dataclass(frozen=True)
    class Floats:
        order: DataOrder

        def __call__(self, step: int) -> torch.Tensor:
            return torch.zeros(4, 12)

    with pytest.raises(DataError, match="token ids must be integers"):
        train(
            model=lm["model"](), loss_fn=lm["loss_fn"], data=Floats(lm["ORDER"]), cfg=lm["config"](), run_dir=tmp_path
        )

    def diverging(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = lm["loss_fn"](model, batch)
        return loss * float("nan") if batch.sum() % 2 == 0 else loss

    with pytest.raises(FlowpinError, match="training diverged; the weights were not updated"):
        train(model=lm["model"](), loss_fn=diverging, data=data, cfg=lm["config"](), run_dir=tmp_path / "nan")
    with pytest.raises(RecipeError, match=r"^train\.checkpoint_every: 0 must be >= 1"):
        lm["config"](checkpoint_every=0)
    with pytest.raises(RecipeError, match=r"^optim\.implementation: 'jit' is not one of"):
        OptimConfig(schedule=ScheduleConfig(total_steps=1, peak_lr=1.0), implementation="jit")
    with pytest.raises(RecipeError, match=r"^optim\.betas\[1\]: 1.5 must be within"):
        OptimConfig(schedule=ScheduleConfig(total_steps=1, peak_lr=1.0), betas=(0.9, 1.5))


def test_config_from_a_recipe_and_its_json() -> None:
    recipe = {
        "steps": 10,
        "batch_size": 2,
        "seed": 1,
        "optim": {"betas": [0.9, 0.95], "schedule": {"total_steps": 10, "peak_lr": 1e-3}},
    }
    cfg = to_config(TrainConfig, recipe, where="train")
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.implementation == "for_loop"
    plain = cfg.to_json()
    assert plain["optim"]["betas"] == [0.9, 0.95] and plain["optim"]["schedule"]["decay"] == "cosine"
    assert json.loads(json.dumps(plain)) == plain


# --- real data ------------------------------------------------------------------------------------


def test_trains_on_a_tokenized_dataset_in_its_global_order(lm: dict[str, Any], tmp_path: Path) -> None:
    records = [{"id": f"doc/{i}", "text": f"the number {i} follows {i - 1} and precedes {i + 1}."} for i in range(40)]
    write_dataset(records, tmp_path / "corpus", docs_per_shard=20, level=3)
    out = tmp_path / "tokenize"
    out.mkdir()
    recipe = {
        "tokenizer": {"vocab_size": 300, "min_frequency": 2, "special_tokens": ["<|endoftext|>", "<|pad|>"], "seed": 3},
        "packing": {"seq_len": 16, "tail": "pad"},
        "shards": {"sequences_per_shard": 8, "zstd_level": 3},
    }
    run_tokenize(to_config(TokenizeConfig, recipe, where="tokenize"), tmp_path / "corpus", out)
    dataset = TokenizedDataset.open(out)
    order = order_for(dataset, order_seed=11, batch_size=3)
    source = ordered_batches(dataset, order)
    assert source(2).dtype == torch.int64 and source(2).shape == (3, 16)
    seed_all(0)
    model = nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 300))

    def loss_fn(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[:, :-1]).reshape(-1, 300), b[:, 1:].reshape(-1))

    cfg = lm["config"](steps=6, batch_size=3, checkpoint_every=3)
    result = train(model=model, loss_fn=loss_fn, data=source, cfg=cfg, run_dir=tmp_path / "run")
    assert result.state.data.dataset_digest == dataset.digest() and result.state.data.next_step == 6
    assert isinstance(result.state, TrainState)
