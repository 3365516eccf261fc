"""A training stage (pretrain, midtrain, long context) as one library call.

The stage script composes ``model`` and the ``train`` block, and calls :func:`run_training` with the
tokenized dataset and, for midtrain/long context, the upstream run's checkpoints. This module owns what
lies between the engine pieces: building the Megatron model for the tokenizer's vocabulary, the loss
(next-token cross entropy, padding masked), the exact data order, determinism settings, starting from
a parent checkpoint (weights only: a new stage starts a new optimizer and schedule, as OLMo's stages
do), resuming a killed run, and refusing to resume checkpoints written under another recipe.

Checkpoints go to ``<run_dir>/checkpoints/step-NNNNNN`` (each published atomically; a killed run resumes
from the last one and ends with the same final checkpoint as an uninterrupted run). ``run-key.json``
next to them names what the checkpoints were trained from; when the recipe, data or parent differs,
the old checkpoints are removed first (and the report says so) instead of being resumed.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.order import order_for
from flowpin.data.tokenize import TokenizedDataset
from flowpin.errors import RecipeError
from flowpin.hashing import hash_bytes
from flowpin.recipe import check_choice, check_int, to_plain
from flowpin.tracking import JsonlTracker
from flowpin.train.checkpoint import CheckpointRef, latest_checkpoint, list_checkpoints, load_checkpoint
from flowpin.train.distributed import DistInfo, set_deterministic
from flowpin.train.loop import ExtraRng, TrainConfig, TrainResult, ordered_batches, train
from flowpin.train.model import ModelConfig, build_model, check_precision, effective_precision


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingStageConfig:
    """The ``train`` block of a training stage's recipe (the model is the ``model`` group)."""

    loop: TrainConfig
    """Steps, batch size, seed, optimizer and schedule, clipping, logging and checkpoint cadence."""
    order_seed: int
    """Seed of the global data order (with the dataset digest and batch size it fixes every batch)."""
    init: str = "scratch"
    """``scratch``: weights from ``loop.seed``; ``checkpoint``: weights from the upstream run's last checkpoint."""
    threads: int = 2
    """torch intra-op threads (recorded: a different count can change results bitwise)."""

    def __post_init__(self) -> None:
        check_int(self.order_seed, "train.order_seed", minimum=0, maximum=2**63 - 1)
        check_choice(self.init, ("scratch", "checkpoint"), "train.init")
        check_int(self.threads, "train.threads", minimum=1, maximum=1024)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingResult:
    checkpoints: tuple[CheckpointRef, ...]
    report: dict[str, Any]


def lm_loss(pad_id: int) -> Any:
    """Next-token cross entropy over a batch ``[B, T]``, padding masked (what every stage trains on)."""

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(inputs.shape[1], dtype=torch.long).unsqueeze(0).expand_as(inputs)
        per_token: torch.Tensor = model(inputs, positions, None, labels=labels)  # megatron GPTModel: [B, T] losses
        mask = (labels != pad_id).to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)

    return loss_fn


PROBE_FIRST_STEP = 1_000_000
PROBE_BATCHES = 4


def probe_loss(model: torch.nn.Module, loss_fn: Any, batches: Any) -> float:
    """Mean loss on fixed batches (steps far past any training run, from the same exact order).

    Single training batches are noisy (a code batch and a math batch differ by more than a stage's
    progress); the same batches before and after a stage show whether it learned. Forward only, no
    dropout: it draws no random numbers, so checkpoints and resumption are unaffected.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            values = [float(loss_fn(model, batches(PROBE_FIRST_STEP + i))) for i in range(PROBE_BATCHES)]
    finally:
        model.train(was_training)
    return sum(values) / len(values)


def package_code_digest() -> str:
    """Digest of every flowpin source file (relative path + content).

    Part of the run key: after any code change a stage retrains instead of resuming checkpoints that
    older code wrote (its manifest would otherwise pin new code for old checkpoints).
    """
    import flowpin
    from flowpin.hashing import hash_file
    from flowpin.manifest.record import source_files

    package = Path(flowpin.__file__).resolve().parent
    return hash_bytes(canonical_json({rel: hash_file(package / rel) for rel in source_files(package)}))


def run_key(**parts: Any) -> str:
    return hash_bytes(canonical_json(parts))


def run_training(
    cfg: TrainingStageConfig,
    model_cfg: ModelConfig,
    *,
    data_dir: Path,
    data_digest: str,
    run_dir: Path,
    init_dir: Path | None,
    dist: DistInfo,
) -> TrainingResult:
    """Train one stage into ``run_dir``; see the module docstring."""
    if (cfg.init == "checkpoint") != (init_dir is not None):
        raise RecipeError(
            "train.init: 'checkpoint' needs paths.inputs.init (the upstream run's checkpoints) and 'scratch' "
            "must not name one; make them agree"
        )
    data, model_cfg, determinism = _prepare(cfg, model_cfg, data_dir, dist)
    index = data.index
    init: CheckpointRef | None = None
    if init_dir is not None:
        init = latest_checkpoint(init_dir)
        if init is None:
            raise RecipeError(f"paths.inputs.init: {init_dir} holds no complete checkpoint; run the upstream stage")

    key = run_key(
        model=to_plain(model_cfg),
        loop=cfg.loop.to_json(),
        order_seed=cfg.order_seed,
        data=data_digest,
        init=None if init is None else {"step": init.step, "name": init.path.name},
        threads=cfg.threads,
        code=package_code_digest(),
    )
    removed = _claim_run_dir(run_dir, key)

    model = build_model(model_cfg, device=dist.device, seed=cfg.loop.seed)
    if init is not None:
        load_checkpoint(init.path, model=model, optimizer=None, restore_rng_state=False)
    order = order_for(data, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size, dataset_digest=data_digest)
    batches = ordered_batches(data, order)
    loss_fn = lm_loss(int(index["pad_id"]))
    probe_before = probe_loss(model, loss_fn, batches)
    result = _loop(model, cfg, batches=batches, loss_fn=loss_fn, run_dir=run_dir)
    probe_after = probe_loss(model, loss_fn, batches)
    losses = [m for m in _read_metrics(run_dir / "metrics.jsonl") if "loss" in m["metrics"]]
    report = {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": model_cfg.vocab_size},
        "precision": effective_precision(model),
        "determinism": determinism,
        "cpu_patches": list(dist.cpu_patches),
        "init": None if init is None else {"checkpoint": init.path.name, "step": init.step},
        "resumed_from": None if result.resumed_from is None else result.resumed_from.name,
        "removed_stale_checkpoints": removed,
        "determinism_changes": list(result.determinism_changes),
        "steps": result.state.step,
        "tokens_seen": result.state.tokens_seen,
        "probe_loss": {
            "batches": [PROBE_FIRST_STEP + i for i in range(PROBE_BATCHES)],
            "before": probe_before,
            "after": probe_after,
        },
        "loss": {
            "first": losses[0]["metrics"]["loss"] if losses else None,
            "last": losses[-1]["metrics"]["loss"] if losses else None,
            "curve": [[m["step"], m["metrics"]["loss"]] for m in losses],
        },
        "checkpoints": [c.path.name for c in result.checkpoints],
    }
    return TrainingResult(checkpoints=result.checkpoints, report=report)


def _prepare(
    cfg: TrainingStageConfig, model_cfg: ModelConfig, data_dir: Path, dist: DistInfo
) -> tuple[TokenizedDataset, ModelConfig, dict[str, Any]]:
    """Open the data, size the model to its tokenizer, refuse what cannot run, set determinism."""
    data = TokenizedDataset.open(data_dir)
    index = data.index
    model_cfg = model_cfg.with_vocab(int(index["vocab_size"]))
    if model_cfg.max_sequence_length < int(index["seq_len"]):
        raise RecipeError(
            f"model.max_sequence_length: {model_cfg.max_sequence_length} is shorter than the data's sequences "
            f"({index['seq_len']}); raise it (with model.yarn for the long-context stage)"
        )
    check_precision(model_cfg, dist.device)
    return data, model_cfg, set_deterministic(cfg.loop.seed, cpu_threads=cfg.threads)


def _loop(
    model: torch.nn.Module, cfg: TrainingStageConfig, *, batches: Any, loss_fn: Any, run_dir: Path, **kwargs: Any
) -> TrainResult:
    """The training loop with the stage's tracker and megatron's RNG streams in the checkpoints."""
    from flowpin.train import megatron_cpu

    tracker = JsonlTracker(run_dir / "metrics.jsonl")
    try:
        return train(
            model=model,
            loss_fn=loss_fn,
            data=batches,
            cfg=cfg.loop,
            run_dir=run_dir,
            tracker=tracker,
            extra_rng=ExtraRng(capture=megatron_cpu.rng_tracker_states, restore=megatron_cpu.set_rng_tracker_states),
            **kwargs,
        )
    finally:
        tracker.close()


def _claim_run_dir(run_dir: Path, key: str) -> list[str]:
    """Keep checkpoints trained from this exact setup (to resume them); remove any others."""
    key_file = run_dir / "run-key.json"
    ckpt_dir = run_dir / "checkpoints"
    removed: list[str] = []
    previous = key_file.read_bytes() if key_file.exists() else None
    if previous != canonical_json({"key": key}) and ckpt_dir.exists():
        removed = [c.path.name for c in list_checkpoints(ckpt_dir)]
        shutil.rmtree(ckpt_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(key_file, canonical_json({"key": key}))
    return removed


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    from flowpin.tracking import read_jsonl

    rows = [r for r in read_jsonl(path) if r.get("event") == "metrics"]
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:  # after a resume the log repeats steps since the last checkpoint: keep the last
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def fork_training(
    cfg: TrainingStageConfig,
    model_cfg: ModelConfig,
    *,
    checkpoint: Path,
    data_dir: Path,
    data_digest: str,
    run_dir: Path,
    dist: DistInfo,
) -> TrainingResult:
    """Continue from ``checkpoint`` (weights, optimizer, RNG, data position) under ``cfg`` into ``run_dir``.

    With the parent's recipe unchanged this reproduces the parent's later checkpoints bit for bit (the
    loop continues the same data order from the checkpoint's position); with overrides it is a new
    branch whose checkpoints record the parent checkpoint.
    """
    from flowpin.train.loop import build_optimizer

    data, model_cfg, determinism = _prepare(cfg, model_cfg, data_dir, dist)
    if (run_dir / "checkpoints").exists() and list_checkpoints(run_dir / "checkpoints"):
        raise RecipeError(f"fork target {run_dir} already holds checkpoints; fork into a new directory")
    model = build_model(model_cfg, device=dist.device, seed=cfg.loop.seed)
    optimizer = build_optimizer(model, cfg.loop.optim)
    state = load_checkpoint(checkpoint, model=model, optimizer=optimizer)
    order = order_for(data, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size, dataset_digest=data_digest)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = _loop(
        model,
        cfg,
        batches=ordered_batches(data, order),
        loss_fn=lm_loss(int(data.index["pad_id"])),
        run_dir=run_dir,
        optimizer=optimizer,
        start_state=state,
    )
    report = {
        "forked_from": {"checkpoint": checkpoint.name, "step": state.step},
        "determinism": determinism,
        "determinism_changes": list(result.determinism_changes),
        "steps": result.state.step,
        "checkpoints": [c.path.name for c in result.checkpoints],
    }
    return TrainingResult(checkpoints=result.checkpoints, report=report)
