"""Pretraining-style stages -- pretrain, midtrain, long context -- and forks of them, as training specs.

``stages/train.py`` composes the ``model`` group and the ``train`` block (:class:`TrainingStageConfig`);
:func:`pretrain_spec` turns them, the tokenized dataset and, for midtrain and long context, the upstream run's
checkpoints into a :class:`~flowpin.train.spec.TrainSpec`:

* the model sized to the tokenizer's vocabulary (a context shorter than the data's sequences is refused);
* the batches of the exact data order (:func:`flowpin.data.order.order_for`: a pure function of the step);
* next-token cross entropy, padding masked (:func:`lm_loss`);
* weights from ``loop.seed`` (``init: scratch``) or the upstream run's last checkpoint (``init: checkpoint``;
  weights only: a new stage starts a new optimizer and schedule, as OLMo's stages do);
* the run key's stage parts: loop config, order seed, data digest, data-parallel engine;
* the probe loss (:func:`probe_loss`: fixed batches far past any run) before and after;
* a ``train.layout`` other than data parallel only refused (:func:`refuse_untrained_layout`): ``flowpin plan``
  plans it, the engine does not train it yet (issue 16).

:func:`fork_spec` (``flowpin fork``, :mod:`flowpin.replay.fork`) continues one of such a run's checkpoints --
weights, optimizer, RNG streams, data position -- under a possibly changed recipe, into a new run directory;
with the parent's recipe unchanged it reproduces the parent's later checkpoints bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flowpin.data.order import order_for
from flowpin.data.tokenized import TokenizedDataset, dataset_digest
from flowpin.errors import RecipeError
from flowpin.recipe import check_choice, check_int, to_plain
from flowpin.train.checkpoint import state_digest
from flowpin.train.layout import LayoutConfig
from flowpin.train.loop import BatchSource, LossFn, ScalarLossFn, TrainConfig, ordered_batches
from flowpin.train.megatron_ddp import DataParallelConfig, refuse_untrained_optimizer
from flowpin.train.spec import StageContext, TrainedRun, TrainingStage, TrainSpec
from flowpin.train.transformer import ModelConfig, effective_precision


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
    layout: LayoutConfig = dataclasses.field(default_factory=LayoutConfig)
    """Tensor, pipeline, sequence and context parallel sizes, micro-batches and recompute (``flowpin plan``
    plans any; the engine trains only the default, data parallel only: :func:`refuse_untrained_layout`)."""

    def __post_init__(self) -> None:
        check_int(self.order_seed, "train.order_seed", minimum=0, maximum=2**63 - 1)
        check_choice(self.init, ("scratch", "checkpoint"), "train.init")
        check_int(self.threads, "train.threads", minimum=1, maximum=1024)


def _refuse_untrained(cfg: TrainingStageConfig) -> None:
    """The training stages' preflight: what the engine does not train yet, refused in this process's world
    (the launcher's: ``torchrun``'s ``WORLD_SIZE``) before the tracker opens or anything is written."""
    from flowpin.train.launcher import process_rank

    refuse_untrained_layout(cfg, world_size=process_rank()[1])
    refuse_untrained_optimizer(cfg.data_parallel)


def refuse_untrained_layout(cfg: TrainingStageConfig, *, world_size: int) -> None:
    """Refuse a ``train.layout`` the engine does not train yet: the stage's preflight (:func:`_refuse_untrained`),
    before any data is read, the run key claimed, the tracker opened or a checkpoint, report or manifest written.

    ``flowpin plan`` accepts any valid layout; the engine trains data parallel only (tensor = pipeline =
    context = 1, no virtual pipeline, no sequence parallelism, nothing recomputed, the whole per-rank batch in
    one micro-batch) until issue 16 lands. A run never claims a layout it did not use: anything else raises
    :class:`RecipeError` naming each such key.
    """
    layout = cfg.layout
    wrong = [
        f"{name}={value}"
        for name, value, trained in (
            ("tensor", layout.tensor, 1),
            ("pipeline", layout.pipeline, 1),
            ("context", layout.context, 1),
            ("virtual_pipeline", layout.virtual_pipeline, None),
            ("sequence_parallel", layout.sequence_parallel, False),
            ("recompute", layout.recompute, "none"),
        )
        if value != trained
    ]
    micro = layout.micro_batch_size
    batch = cfg.loop.batch_size
    if micro is not None and (batch % world_size or micro != batch // world_size):
        per_rank = f"{batch // world_size}" if batch % world_size == 0 else f"{batch}/{world_size}"
        wrong.append(f"micro_batch_size={micro} (the per-rank batch is {per_rank}: gradient accumulation)")
    if wrong:
        raise RecipeError(
            f"train.layout: {', '.join(wrong)}: `flowpin plan` accepts this layout, but the training engine does "
            "not train it yet (data parallel only until issue 16 lands); set train.layout back to its defaults "
            "(tensor, pipeline, context 1, virtual_pipeline null, sequence_parallel false, recompute none, "
            "micro_batch_size null) to train"
        )


def lm_loss(pad_id: int) -> ScalarLossFn:
    """Next-token cross entropy over a batch ``[B, T]``, padding masked (what every pretraining stage trains on)."""

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, labels = batch[:, :-1], batch[:, 1:]
        positions = torch.arange(inputs.shape[1], dtype=torch.long).unsqueeze(0).expand_as(inputs)
        per_token: torch.Tensor = model(inputs, positions, None, labels=labels)  # megatron GPTModel: [B, T] losses
        mask = (labels != pad_id).to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)

    return loss_fn


PROBE_FIRST_STEP = 1_000_000
PROBE_BATCHES = 4


def probe_loss(model: torch.nn.Module, loss_fn: LossFn, batches: BatchSource) -> float:
    """Mean loss on fixed batches (steps far past any training run, from the same exact order).

    Single training batches are noisy (a code batch and a math batch differ by more than a stage's
    progress); the same batches before and after a stage show whether it learned. Forward only, no
    dropout: it draws no random numbers, so checkpoints and resumption are unaffected.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            values = []
            for i in range(PROBE_BATCHES):
                loss = loss_fn(model, batches(PROBE_FIRST_STEP + i))
                values.append(float(loss[0] if isinstance(loss, tuple) else loss))
    finally:
        model.train(was_training)
    return sum(values) / len(values)


def open_tokenized(model_cfg: ModelConfig, data_dir: Path) -> tuple[TokenizedDataset, ModelConfig]:
    """Open the tokenized data and size the model to its tokenizer (refusing a context shorter than its sequences)."""
    data = TokenizedDataset.open(data_dir)
    index = data.index
    model_cfg = model_cfg.with_vocab(int(index["vocab_size"]))
    if model_cfg.max_sequence_length < int(index["seq_len"]):
        raise RecipeError(
            f"model.max_sequence_length: {model_cfg.max_sequence_length} is shorter than the data's sequences "
            f"({index['seq_len']}); raise it (with model.yarn for the long-context stage)"
        )
    return data, model_cfg


def pretrain_spec(
    cfg: TrainingStageConfig,
    model_cfg: ModelConfig,
    *,
    data_dir: Path,
    data_digest: str,
    init_dir: Path | None,
) -> TrainSpec:
    """The spec of one pretraining-style stage (see the module docstring)."""
    if (cfg.init == "checkpoint") != (init_dir is not None):
        raise RecipeError(
            "train.init: 'checkpoint' needs paths.inputs.init (the upstream run's checkpoints) and 'scratch' "
            "must not name one; make them agree"
        )
    return _spec(cfg, model_cfg, data_dir=data_dir, data_digest=data_digest, init_dir=init_dir)


def fork_spec(
    cfg: TrainingStageConfig, model_cfg: ModelConfig, *, checkpoint: Path, data_dir: Path, data_digest: str
) -> TrainSpec:
    """Continue ``checkpoint`` (weights, optimizer, RNG streams, data position) under ``cfg``, in a new run dir.

    The loop continues the same data order from the checkpoint's position (a changed order starts at its
    step 0); the checkpoints record the parent checkpoint. ``cfg.init`` is not used: the fork starts from
    ``checkpoint``, not from the upstream run's weights.
    """
    fork = {"checkpoint": checkpoint.name, "state": state_digest(checkpoint)}
    return _spec(cfg, model_cfg, data_dir=data_dir, data_digest=data_digest, start=checkpoint, fork=fork)


def _spec(
    cfg: TrainingStageConfig,
    model_cfg: ModelConfig,
    *,
    data_dir: Path,
    data_digest: str,
    init_dir: Path | None = None,
    start: Path | None = None,
    fork: Mapping[str, Any] | None = None,
) -> TrainSpec:
    data, model_cfg = open_tokenized(model_cfg, data_dir)
    order = order_for(data, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size, dataset_digest=data_digest)
    batches = ordered_batches(data, order)
    loss_fn = lm_loss(int(data.index["pad_id"]))
    key: dict[str, Any] = {
        "loop": cfg.loop.to_json(),
        "order_seed": cfg.order_seed,
        "data": data_digest,
        "data_parallel": to_plain(cfg.data_parallel),
    }
    if fork is not None:
        key["fork"] = dict(fork)

    def evaluate(model: torch.nn.Module) -> float:
        return probe_loss(model, loss_fn, batches)

    def report(trained: TrainedRun) -> dict[str, Any]:
        fields = _report(trained)
        if start is not None and trained.start is not None:
            fields["forked_from"] = {"checkpoint": start.name, "step": trained.start.step}
        return fields

    return TrainSpec(
        model=model_cfg,
        loop=cfg.loop,
        threads=cfg.threads,
        batches=batches,
        loss=loss_fn,
        key=key,
        init_dir=init_dir,
        start=start,
        data_parallel=cfg.data_parallel,
        evaluate=evaluate,
        curves=("loss",),
        report=report,
        summary=_summary,
    )


def _report(trained: TrainedRun) -> dict[str, Any]:
    model = trained.model
    report: dict[str, Any] = {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": trained.model_cfg.vocab_size},
        "precision": effective_precision(model),
        "cpu_patches": list(trained.dist.cpu_patches),
        "world_size": trained.dist.world_size,
        "probe_loss": {
            "batches": [PROBE_FIRST_STEP + i for i in range(PROBE_BATCHES)],
            "before": trained.before,
            "after": trained.after,
        },
    }
    return report


def _summary(manifest: str, report: Mapping[str, Any]) -> tuple[str, ...]:
    probe = report["probe_loss"]
    return (f"{manifest}: {report['steps']} steps, probe loss {probe['before']:.3f} → {probe['after']:.3f}",)


def pretrain_stage(model_cfg: ModelConfig) -> TrainingStage[TrainingStageConfig]:
    """The pretraining-style stage of ``stages/train.py`` for the composed ``model`` group."""

    def build(cfg: TrainingStageConfig, ctx: StageContext) -> TrainSpec:
        data_dir = ctx.inputs["data"]
        return pretrain_spec(
            cfg, model_cfg, data_dir=data_dir, data_digest=dataset_digest(data_dir), init_dir=ctx.inputs.get("init")
        )

    return TrainingStage(
        block="train", config=TrainingStageConfig, inputs=("data",), build=build, preflight=_refuse_untrained
    )


def fork_stage(model_cfg: ModelConfig, checkpoint: Path) -> TrainingStage[TrainingStageConfig]:
    """The stage a fork records (``flowpin fork``): the parent's ``train`` block, continuing ``checkpoint``."""

    def build(cfg: TrainingStageConfig, ctx: StageContext) -> TrainSpec:
        data_dir = ctx.inputs["data"]
        return fork_spec(cfg, model_cfg, checkpoint=checkpoint, data_dir=data_dir, data_digest=dataset_digest(data_dir))

    return TrainingStage(
        block="train", config=TrainingStageConfig, inputs=("data",), build=build, preflight=_refuse_untrained
    )


__all__ = [
    "PROBE_BATCHES",
    "PROBE_FIRST_STEP",
    "TrainingStageConfig",
    "fork_spec",
    "fork_stage",
    "lm_loss",
    "open_tokenized",
    "pretrain_spec",
    "pretrain_stage",
    "probe_loss",
    "refuse_untrained_layout",
]
