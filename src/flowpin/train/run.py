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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.order import order_for
from flowpin.data.tokenize import TokenizedDataset
from flowpin.errors import CheckpointCorruptError, CheckpointMissingError, RecipeError, StrictJSONError
from flowpin.hashing import hash_bytes
from flowpin.jsonio import loads_strict
from flowpin.recipe import check_choice, check_int, to_config, to_plain
from flowpin.safeio import read_regular
from flowpin.tracking import FanoutTracker, JsonlTracker, Tracker
from flowpin.train.checkpoint import (
    MAX_STATE_BYTES,
    CheckpointRef,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    state_digest,
)
from flowpin.train.distributed import DistInfo, barrier, set_deterministic
from flowpin.train.loop import (
    CHECKPOINTS_DIR,
    BatchSource,
    ExtraRng,
    GradSync,
    LossFn,
    TrainConfig,
    TrainResult,
    ordered_batches,
    train,
)
from flowpin.train.megatron_ddp import DataParallelConfig, MegatronGradSync
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
    data_parallel: DataParallelConfig = dataclasses.field(default_factory=DataParallelConfig)
    """Gradient engine across data-parallel ranks: flowpin's all-reduce or megatron's DDP."""

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenRun:
    """A stage's model, ready to train into its run directory (:func:`open_run`)."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    """The model's config with the tokenizer's vocabulary (also written to ``checkpoints/model.json``)."""
    init: CheckpointRef | None
    """The upstream checkpoint whose weights the model starts from (``None``: from ``loop.seed``)."""
    removed: list[str]
    """Checkpoints of an earlier, different setup that were removed instead of resumed."""
    determinism: dict[str, Any]
    """What :func:`flowpin.train.distributed.set_deterministic` set."""


MODEL_CONFIG = "model.json"
"""``<run_dir>/checkpoints/model.json``: the architecture the checkpoints load into (:func:`load_weights`)."""


def open_run(
    *,
    model_cfg: ModelConfig,
    seed: int,
    threads: int,
    run_dir: Path,
    init_dir: Path | None,
    dist: DistInfo,
    key: Mapping[str, Any],
) -> OpenRun:
    """Set determinism, claim ``run_dir`` and build the model (from ``init_dir``'s last checkpoint, if given).

    ``key`` names everything else the checkpoints depend on (loop config, data digest and order, the
    stage's own recipe): with the model config, the init checkpoint, the thread count and flowpin's code it
    forms the run key; checkpoints written under another key are removed rather than resumed. Rank 0
    alone claims the directory; the other ranks wait for it. Every post-training stage (SFT, DPO, RLVR)
    opens its run through here, as the pretraining stages do.
    """
    check_precision(model_cfg, dist.device)
    determinism = set_deterministic(seed, cpu_threads=threads)
    init: CheckpointRef | None = None
    if init_dir is not None:
        init = latest_checkpoint(init_dir)
        if init is None:
            raise RecipeError(f"paths.inputs.init: {init_dir} holds no complete checkpoint; run the upstream stage")
    run = run_key(
        model=to_plain(model_cfg),
        # the init checkpoint by content: a retrained upstream with the same step names is a new start
        init=None if init is None else {"step": init.step, "name": init.path.name, "state": state_digest(init.path)},
        threads=threads,
        code=package_code_digest(),
        **key,
    )
    removed: list[str] = []
    if dist.is_main:
        removed = _claim_run_dir(run_dir, run)
        atomic_write_bytes(run_dir / CHECKPOINTS_DIR / MODEL_CONFIG, canonical_json(to_plain(model_cfg)) + b"\n")
    if dist.world_size > 1:
        barrier()
    model = build_model(model_cfg, device=dist.device, seed=seed)
    if init is not None:
        load_checkpoint(init.path, model=model, optimizer=None, restore_rng_state=False)
    return OpenRun(model=model, model_cfg=model_cfg, init=init, removed=removed, determinism=determinism)


def read_model_config(checkpoints_dir: Path) -> ModelConfig:
    """The :class:`ModelConfig` a stage wrote next to its checkpoints (``model.json``)."""
    path = checkpoints_dir / MODEL_CONFIG
    try:
        raw = read_regular(path, max_bytes=MAX_STATE_BYTES, what="model config", fix="rerun the stage")
        plain = loads_strict(raw, where=str(path), max_bytes=MAX_STATE_BYTES)
    except FileNotFoundError as exc:
        raise CheckpointMissingError(f"{path}: missing; the checkpoints' model config (rerun the stage)") from exc
    except (OSError, StrictJSONError) as exc:
        raise CheckpointCorruptError(f"{path}: unreadable model config ({exc}); rerun the stage") from exc
    return to_config(ModelConfig, plain, where=str(path))


def load_weights(checkpoint: Path, *, device: str = "cpu", seed: int = 0) -> tuple[torch.nn.Module, ModelConfig]:
    """A model holding ``checkpoint``'s weights, built from ``model.json`` beside it (eval, references, samplers).

    ``seed`` only seeds the throwaway initialisation that the checkpoint overwrites. The model is in
    eval mode with gradients off.
    """
    model_cfg = read_model_config(checkpoint.parent)
    model = build_model(model_cfg, device=device, seed=seed)
    load_checkpoint(checkpoint, model=model, optimizer=None, restore_rng_state=False)
    model.eval()
    model.requires_grad_(False)
    return model, model_cfg


def run_training(
    cfg: TrainingStageConfig,
    model_cfg: ModelConfig,
    *,
    data_dir: Path,
    data_digest: str,
    run_dir: Path,
    init_dir: Path | None,
    dist: DistInfo,
    tracker: Tracker | None = None,
) -> TrainingResult:
    """Train one stage into ``run_dir``; see the module docstring. ``tracker``: see :func:`train_loop`."""
    if (cfg.init == "checkpoint") != (init_dir is not None):
        raise RecipeError(
            "train.init: 'checkpoint' needs paths.inputs.init (the upstream run's checkpoints) and 'scratch' "
            "must not name one; make them agree"
        )
    data, model_cfg = _prepare(model_cfg, data_dir)
    index = data.index
    opened = open_run(
        model_cfg=model_cfg,
        seed=cfg.loop.seed,
        threads=cfg.threads,
        run_dir=run_dir,
        init_dir=init_dir,
        dist=dist,
        key={
            "loop": cfg.loop.to_json(),
            "order_seed": cfg.order_seed,
            "data": data_digest,
            "data_parallel": to_plain(cfg.data_parallel),
        },
    )
    model, init = opened.model, opened.init
    order = order_for(data, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size, dataset_digest=data_digest)
    batches = ordered_batches(data, order)
    loss_fn = lm_loss(int(index["pad_id"]))
    probe_before = probe_loss(model, loss_fn, batches)
    result = train_loop(
        model,
        cfg.loop,
        batches=batches,
        loss_fn=loss_fn,
        run_dir=run_dir,
        dist=dist,
        grad_sync=grad_sync_for(model, cfg.data_parallel),
        tracker=tracker,
    )
    probe_after = probe_loss(model, loss_fn, batches)
    losses = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m["metrics"]]
    report = {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": model_cfg.vocab_size},
        "precision": effective_precision(model),
        "determinism": opened.determinism,
        "cpu_patches": list(dist.cpu_patches),
        "world_size": dist.world_size,
        "init": None if init is None else {"checkpoint": init.path.name, "step": init.step},
        "resumed_from": None if result.resumed_from is None else result.resumed_from.name,
        "removed_stale_checkpoints": opened.removed,
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


def grad_sync_for(model: torch.nn.Module, cfg: DataParallelConfig) -> GradSync | None:
    """The loop's gradient engine for ``cfg``: ``None`` (flowpin's own reduction) or megatron's DDP."""
    return MegatronGradSync(model, cfg) if cfg.engine == "megatron" else None


def _prepare(model_cfg: ModelConfig, data_dir: Path) -> tuple[TokenizedDataset, ModelConfig]:
    """Open the data and size the model to its tokenizer (refusing a context shorter than its sequences)."""
    data = TokenizedDataset.open(data_dir)
    index = data.index
    model_cfg = model_cfg.with_vocab(int(index["vocab_size"]))
    if model_cfg.max_sequence_length < int(index["seq_len"]):
        raise RecipeError(
            f"model.max_sequence_length: {model_cfg.max_sequence_length} is shorter than the data's sequences "
            f"({index['seq_len']}); raise it (with model.yarn for the long-context stage)"
        )
    return data, model_cfg


def train_loop(
    model: torch.nn.Module,
    loop: TrainConfig,
    *,
    batches: BatchSource,
    loss_fn: LossFn,
    run_dir: Path,
    dist: DistInfo | None = None,
    tracker: Tracker | None = None,
    **kwargs: Any,
) -> TrainResult:
    """:func:`flowpin.train.loop.train` logging to ``metrics.jsonl``, with megatron's RNG streams.

    ``tracker`` (the stage's, ``run.tracker``: its Aim run) hears every event too; it is the caller's to
    close. Neither tracker changes what is trained: they only receive metadata.
    """
    from flowpin.progress import step_progress
    from flowpin.train import megatron_cpu

    main = dist is None or dist.is_main
    jsonl = JsonlTracker(run_dir / "metrics.jsonl")
    try:
        # a bar over the steps on a terminal (main rank only); it only draws, nothing it sees is hashed
        with step_progress(run_dir.name, force=None if main else False) as progress:
            return train(
                model=model,
                loss_fn=loss_fn,
                data=batches,
                cfg=loop,
                run_dir=run_dir,
                tracker=jsonl if tracker is None else FanoutTracker(jsonl, tracker),
                dist=None if dist is None or dist.world_size == 1 else dist,
                extra_rng=ExtraRng(
                    capture=megatron_cpu.rng_tracker_states, restore=megatron_cpu.set_rng_tracker_states
                ),
                progress=progress,
                **kwargs,
            )
    finally:
        jsonl.close()


def _claim_run_dir(run_dir: Path, key: str) -> list[str]:
    """Keep checkpoints trained from this exact setup (to resume them); remove any others."""
    key_file = run_dir / "run-key.json"
    ckpt_dir = run_dir / "checkpoints"
    removed: list[str] = []
    # compared as bytes, never parsed; a regular file only (a FIFO here would hang the run's start)
    previous = read_regular(key_file, max_bytes=1 << 20, what="run key") if key_file.exists() else None
    if previous != canonical_json({"key": key}) and ckpt_dir.exists():
        removed = [c.path.name for c in list_checkpoints(ckpt_dir)]
        shutil.rmtree(ckpt_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(key_file, canonical_json({"key": key}))
    return removed


def read_metrics(path: Path) -> list[dict[str, Any]]:
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

    data, model_cfg = _prepare(model_cfg, data_dir)
    check_precision(model_cfg, dist.device)
    determinism = set_deterministic(cfg.loop.seed, cpu_threads=cfg.threads)
    if (run_dir / "checkpoints").exists() and list_checkpoints(run_dir / "checkpoints"):
        raise RecipeError(f"fork target {run_dir} already holds checkpoints; fork into a new directory")
    model = build_model(model_cfg, device=dist.device, seed=cfg.loop.seed)
    optimizer = build_optimizer(model, cfg.loop.optim)
    state = load_checkpoint(checkpoint, model=model, optimizer=optimizer)
    order = order_for(data, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size, dataset_digest=data_digest)
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / CHECKPOINTS_DIR / MODEL_CONFIG, canonical_json(to_plain(model_cfg)) + b"\n")
    result = train_loop(
        model,
        cfg.loop,
        dist=dist,
        grad_sync=grad_sync_for(model, cfg.data_parallel),
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
