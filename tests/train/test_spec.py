"""The one runner (flowpin.train.run.run_spec) on a tiny megatron model: where a spec's hooks run, what it writes.

Fast (seconds): one layer, four steps. The stages' own specs run end to end in test_train_stage.py (pretrain,
fork) and test_post_{sft,dpo,rlvr}.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flowpin.constants import CHECKPOINTS_DIR, RUN_KEY_FILE
from flowpin.data.order import DataOrder
from flowpin.errors import InternalError, RecipeError
from flowpin.runtime import Runtime, prepare_environment
from flowpin.train.loop import OptimConfig, TrainConfig
from flowpin.train.pretrain import lm_loss
from flowpin.train.run import TrainingResult, run_spec
from flowpin.train.schedule import ScheduleConfig
from flowpin.train.spec import TrainedRun, TrainSpec
from flowpin.train.transformer import ModelConfig, build_model

TINY = ModelConfig(
    num_layers=1,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=2,
    num_query_groups=1,
    vocab_size=64,
    max_sequence_length=8,
)
ORDER = DataOrder(n_sequences=16, dataset_digest=hashlib.sha256(b"counting").hexdigest(), order_seed=3, batch_size=2)


@dataclasses.dataclass(frozen=True)
class Counting:
    """Sequence i counts up from i (mod 64): a pure function of the step."""

    order: DataOrder

    def __call__(self, step: int) -> torch.Tensor:
        return torch.stack([(torch.arange(9) + i) % 64 for i in self.order.batch(step)])


def weights(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode() + b"\0" + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with prepare_environment(seed=5, threads=1) as prepared:
        yield prepared


def loop(steps: int = 4) -> TrainConfig:
    schedule = ScheduleConfig(total_steps=steps, warmup_steps=1, peak_lr=1e-2)
    return TrainConfig(
        steps=steps, batch_size=2, seed=5, log_every=1, checkpoint_every=2, optim=OptimConfig(schedule=schedule)
    )


def spec(seen: list[tuple[bool, str]] | None = None, **changes: Any) -> TrainSpec:
    def evaluate(model: torch.nn.Module) -> str:
        if seen is not None:
            seen.append((model.training, weights(model)))
        return weights(model)

    def report(trained: TrainedRun) -> dict[str, Any]:
        return {"own": {"before": trained.before, "after": trained.after, "forked": trained.start is not None}}

    fields: dict[str, Any] = {
        "model": TINY,
        "loop": loop(),
        "threads": 1,
        "batches": Counting(ORDER),
        "loss": lm_loss(pad_id=-1),
        "key": {"data": ORDER.dataset_digest},
        "evaluate": evaluate,
        "report": report,
        "files": (("notes.txt", b"written once the run is claimed\n"),),
        "summary": lambda manifest, report: (f"{manifest}: {report['steps']} steps",),
    }
    return TrainSpec(**{**fields, **changes})


def run(spec: TrainSpec, run_dir: Path, runtime: Runtime) -> TrainingResult:
    return run_spec(spec, run_dir=run_dir, dist=runtime.dist, determinism=runtime.determinism)


def test_the_runner_evaluates_before_and_after_and_reports_what_every_run_reports(
    runtime: Runtime, tmp_path: Path
) -> None:
    seen: list[tuple[bool, str]] = []
    result = run(spec(seen), tmp_path, runtime)
    fresh = weights(build_model(TINY, device=runtime.dist.device, seed=5))
    last = result.checkpoints[-1].path
    assert [c.step for c in result.checkpoints] == [2, 4]
    assert seen[0] == (True, fresh)  # before the first step: the model as built from loop.seed
    assert seen[1][1] != fresh and len(seen) == 2
    assert (tmp_path / "notes.txt").read_bytes() == b"written once the run is claimed\n"
    assert result.outputs == (tmp_path / "notes.txt",)
    report = result.report
    assert report["own"] == {"before": fresh, "after": seen[1][1], "forked": False}
    assert report["determinism"] == dict(runtime.determinism)
    assert (report["steps"], report["init"], report["resumed_from"], report["checkpoints"]) == (
        4,
        None,
        None,
        ["step-000002", "step-000004"],
    )
    assert [p[0] for p in report["loss"]["curve"]] == [1, 2, 3, 4]
    parts = json.loads((tmp_path / RUN_KEY_FILE).read_text())["parts"]
    assert parts["data"] == ORDER.dataset_digest and {"model", "init", "threads", "code"} <= set(parts)
    assert spec().summary("m.json", report) == ("m.json: 4 steps",)
    again = run(spec(), tmp_path, runtime)  # the same key: resumed, nothing left to train
    assert again.report["resumed_from"] == "step-000004" and again.report["steps"] == 4
    assert (last / "model.safetensors").read_bytes() == (again.checkpoints[-1].path / "model.safetensors").read_bytes()


def test_a_fork_continues_a_checkpoint_bit_for_bit_and_refuses_a_used_directory(
    runtime: Runtime, tmp_path: Path
) -> None:
    whole = run(spec(), tmp_path / "whole", runtime)
    branch = whole.checkpoints[0].path  # step 2
    fork = run(spec(start=branch, key={"data": ORDER.dataset_digest, "fork": branch.name}), tmp_path / "fork", runtime)
    assert [c.step for c in fork.checkpoints] == [4]
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert (fork.checkpoints[0].path / name).read_bytes() == (whole.checkpoints[1].path / name).read_bytes()
    assert fork.report["own"]["forked"] is True
    with pytest.raises(RecipeError, match="already holds checkpoints; fork into a new directory"):
        run(spec(start=branch), tmp_path / "fork", runtime)


def test_a_spec_key_may_not_name_the_parts_the_runner_sets(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(InternalError, match="open_run: key names code, model"):
        run(spec(key={"model": "mine", "code": {}}), tmp_path, runtime)
    assert not (tmp_path / CHECKPOINTS_DIR).exists()
    with pytest.raises(TypeError):
        spec().key["data"] = "changed"  # type: ignore[index]  # the spec is a value
