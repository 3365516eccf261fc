"""A training spec: one training run as data -- what to run, not how (torchtitan's ``TrainSpec``, Marin's ``StepSpec``).

Every training stage is a *spec builder*: it reads its inputs and returns a :class:`TrainSpec` naming the
model, the loop config, the batches (a pure function of the step), the loss, the run key's stage parts, the
evaluation run before and after training, and the stage's own report fields. One runner,
:func:`flowpin.train.run.run_spec`, executes any spec the same way -- open the run (claim its run key, build
the model from its seed, the upstream weights or a fork's full state), write the spec's files, evaluate
before, train through the one loop (:func:`flowpin.train.run.train_loop`), evaluate after, build the report
-- and one stage body, :func:`flowpin.train.entry.run_training_stage`, records any of them as a stage.

The builders:

* pretrain, midtrain, long context: :func:`flowpin.train.pretrain.pretrain_spec`;
* a fork of any of them (``flowpin fork``): :func:`flowpin.train.pretrain.fork_spec`;
* SFT, DPO, RLVR: :func:`flowpin.post.sft.sft_spec`, :func:`flowpin.post.dpo.dpo_spec`,
  :func:`flowpin.post.rlvr.rlvr_spec`.

A :class:`TrainingStage` is what a stage script hands the stage body: its recipe block and config class, the
upstream roles it reads, and its spec builder.

The evaluation hook runs in eval mode and draws no random numbers, so evaluating before and after a run
changes none of its checkpoints; it runs at the same points of every run (after the model is opened,
before the first step; after the last).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from flowpin.train.loop import BatchSource, LossFn, TrainConfig, TrainResult
from flowpin.train.megatron_ddp import DataParallelConfig
from flowpin.train.transformer import ModelConfig

if TYPE_CHECKING:
    import torch

    from flowpin.train.checkpoint import TrainState
    from flowpin.train.distributed import DistInfo


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TrainedRun:
    """What the runner hands a spec's :attr:`TrainSpec.report` once training ended."""

    model: torch.nn.Module
    """The trained model (the last checkpoint's weights)."""
    model_cfg: ModelConfig
    dist: DistInfo
    run_dir: Path
    result: TrainResult
    """What the loop did (checkpoints, final state, resume, determinism changes)."""
    start: TrainState | None
    """A fork's starting state (the checkpoint it continued); ``None`` for any other run."""
    before: Any
    """The evaluation hook's result before the first step (``None`` without a hook)."""
    after: Any
    """The evaluation hook's result after the last step."""


EvalHook = Callable[["torch.nn.Module"], Any]
"""``evaluate(model) -> JSON-able result``: run before and after training; eval mode, no random draws."""
ReportFn = Callable[[TrainedRun], Mapping[str, Any]]
"""The stage's own report fields (added to the report every run shares: :func:`flowpin.train.run.run_report`)."""
SummaryFn = Callable[[str, Mapping[str, Any]], tuple[str, ...]]
"""``summary(manifest, report) -> lines``: what the stage prints once it is recorded (rank 0)."""


def _no_report(trained: TrainedRun) -> Mapping[str, Any]:
    return {}


def _no_summary(manifest: str, report: Mapping[str, Any]) -> tuple[str, ...]:
    return ()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TrainSpec:
    """One training run as data (see the module docstring). Built by a stage's spec builder, run by
    :func:`flowpin.train.run.run_spec`."""

    model: ModelConfig
    """The architecture, sized to the tokenizer (written to ``checkpoints/model.json``)."""
    loop: TrainConfig
    """Steps, batch size, seed, optimizer and schedule, clipping, logging and checkpoint cadence."""
    threads: int
    """torch intra-op threads the run is keyed by (set by :func:`flowpin.runtime.prepare_environment`)."""
    batches: BatchSource
    """The batch of every step, a pure function of the step."""
    loss: LossFn
    """``loss(model, batch) -> loss`` or ``(loss, metrics)``."""
    key: Mapping[str, Any]
    """The run key's stage parts (:mod:`flowpin.train.run_key`); :func:`~flowpin.train.run.open_run` adds the
    model, the init checkpoint, the threads and the code."""
    init_dir: Path | None = None
    """Start from the weights of this upstream run's latest checkpoint (weights only: a new optimizer)."""
    start: Path | None = None
    """A fork: continue this checkpoint (weights, optimizer, RNG streams, data position) in a new run dir."""
    data_parallel: DataParallelConfig = dataclasses.field(default_factory=DataParallelConfig)
    """The gradient engine across data-parallel ranks."""
    evaluate: EvalHook | None = None
    """Evaluation before and after training (probe loss; held-out pass@1)."""
    curves: tuple[str, ...] = ("loss",)
    """Logged metrics whose first, last and curve the report holds."""
    report: ReportFn = _no_report
    """The stage's own report fields."""
    files: tuple[tuple[str, bytes], ...] = ()
    """Files ``(name, bytes)`` written into the run directory (rank 0) once it is claimed; manifest subjects
    (DPO's ``pairs.jsonl``)."""
    summary: SummaryFn = _no_summary
    """What the stage prints once it is recorded."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", types.MappingProxyType(dict(self.key)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageContext:
    """What a spec builder gets besides its recipe: where the stage's inputs are, where it writes, which process."""

    inputs: Mapping[str, Path]
    """Upstream data directory of each ``paths.inputs`` role (absolute)."""
    run_dir: Path
    """The run directory (the parent of ``paths.out``, the checkpoints directory)."""
    dist: DistInfo
    """This process's place in the training world (:func:`flowpin.runtime.prepare_environment`)."""


class TrainingRecipe(Protocol):
    """What every training stage's recipe block has: the loop (its seed seeds the process) and the threads."""

    @property
    def loop(self) -> TrainConfig: ...

    @property
    def threads(self) -> int: ...


C = TypeVar("C", bound=TrainingRecipe)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingStage(Generic[C]):
    """A training stage for the one stage body (:func:`flowpin.train.entry.run_training_stage`)."""

    block: str
    """The recipe block (``cfg[block]``), also the stage's default name (:func:`flowpin.stage.stage_name`)."""
    config: type[C]
    """The block's typed config."""
    inputs: tuple[str, ...]
    """The ``paths.inputs`` roles the recipe must name."""
    build: Callable[[C, StageContext], TrainSpec]
    """The spec builder."""
    preflight: Callable[[C], None] | None = None
    """Checks of the typed recipe that the config alone cannot make (what the engine trains in this process's
    world), run by :func:`flowpin.stage.stage_run` on every rank before anything is opened or written."""
