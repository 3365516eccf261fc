"""The one runner: any :class:`~flowpin.train.spec.TrainSpec` into its run directory, the same way every time.

:func:`run_spec` executes a spec in a fixed order -- the order every training stage (pretrain, midtrain, long
context, SFT, DPO, RLVR, a fork) has always run in, so their checkpoints stay byte for byte what they were:

1. :func:`open_run`: claim the run directory under the run key (:mod:`flowpin.train.run_key`; rank 0, the
   other ranks wait), write ``checkpoints/model.json``, build the model from ``loop.seed`` and load the
   upstream weights (``spec.init_dir``); a fork (``spec.start``) then loads its checkpoint's weights, optimizer
   and RNG streams;
2. the spec's files (DPO's pairs), rank 0;
3. the evaluation hook, before the first step;
4. :func:`train_loop`: :func:`flowpin.train.loop.train` logging to ``metrics.jsonl`` and the stage's tracker,
   with megatron's RNG streams in every checkpoint; a killed run resumes from its last checkpoint and ends
   with the same final checkpoint as an uninterrupted run;
5. the evaluation hook, after the last step;
6. the report: :func:`run_report` (what every run reports) and the spec's own fields.

Checkpoints go to ``<run_dir>/checkpoints/step-NNNNNN`` (each published atomically).

The runner changes no process-wide state: seeds, threads, deterministic kernels, the process group and
megatron's CPU patches are the entry point's (:func:`flowpin.runtime.prepare_environment`), whose
determinism record the runner only copies into the report. :func:`load_weights` and
:func:`read_model_config` open a finished run's checkpoint as a model (eval, references, samplers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import CHECKPOINTS_DIR, METRICS_FILE, MODEL_CONFIG
from flowpin.errors import CheckpointCorruptError, CheckpointMissingError, InternalError, RecipeError, StrictJSONError
from flowpin.jsonio import loads_strict
from flowpin.recipe import to_config, to_plain
from flowpin.safeio import read_regular
from flowpin.tracking import FanoutTracker, JsonlTracker, NullTracker, Tracker
from flowpin.train.checkpoint import (
    MAX_STATE_BYTES,
    CheckpointRef,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    state_digest,
)
from flowpin.train.distributed import DistInfo, barrier
from flowpin.train.loop import (
    BatchSource,
    ExtraRng,
    GradSync,
    LossFn,
    TrainConfig,
    TrainResult,
    build_optimizer,
    train,
)
from flowpin.train.megatron_ddp import DataParallelConfig, MegatronGradSync, refuse_untrained_optimizer
from flowpin.train.run_key import RunClaim, StaleCheckpoints, claim_run_dir, package_code_digests
from flowpin.train.spec import TrainedRun, TrainSpec
from flowpin.train.transformer import ModelConfig, build_model, check_precision

KEY_PARTS_OF_OPEN_RUN = ("model", "init", "threads", "code")
"""The run key's parts :func:`open_run` sets itself (a spec's ``key`` must not name them)."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class OpenRun:
    """A stage's model, ready to train into its run directory (:func:`open_run`)."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    """The model's config with the tokenizer's vocabulary (also written to ``checkpoints/model.json``)."""
    init: CheckpointRef | None
    """The upstream checkpoint whose weights the model starts from (``None``: from ``loop.seed``)."""
    removed: tuple[str, ...]
    """Checkpoints of another run key taken out of the run (archived or discarded, as the user chose)."""
    stale: StaleCheckpoints | None = None
    """What became of those checkpoints and why (``None``: none were taken out)."""


def open_run(
    *,
    model_cfg: ModelConfig,
    seed: int,
    threads: int,
    run_dir: Path,
    init_dir: Path | None,
    dist: DistInfo,
    key: Mapping[str, Any],
    claim: RunClaim | None = None,
) -> OpenRun:
    """Claim ``run_dir`` and build the model (from ``init_dir``'s last checkpoint, if given).

    ``key`` names everything else the checkpoints depend on (loop config, data digest and order, the
    stage's own recipe): with the model config, the init checkpoint, the thread count and the code of
    ``claim`` (default :class:`~flowpin.train.run_key.RunClaim`: the whole package, stale checkpoints
    refused) it forms the run key; checkpoints trained under another key are refused, archived or discarded
    as ``claim`` says (:mod:`flowpin.train.run_key`), never resumed. Rank 0 alone claims the directory; the
    other ranks wait for it. Sets no process state: the entry point prepared it
    (:func:`flowpin.runtime.prepare_environment`).
    """
    check_precision(model_cfg, dist.device)
    init: CheckpointRef | None = None
    if init_dir is not None:
        init = latest_checkpoint(init_dir)
        if init is None:
            raise RecipeError(f"paths.inputs.init: {init_dir} holds no complete checkpoint; run the upstream stage")
    claim = RunClaim() if claim is None else claim
    clash = sorted(set(key) & set(KEY_PARTS_OF_OPEN_RUN))
    if clash:
        raise InternalError(f"open_run: key names {', '.join(clash)}, which open_run sets itself")
    parts = {
        "model": to_plain(model_cfg),
        # the init checkpoint by content: a retrained upstream with the same step names is a new start
        "init": None if init is None else {"step": init.step, "name": init.path.name, "state": state_digest(init.path)},
        "threads": threads,
        "code": package_code_digests() if claim.code is None else dict(claim.code),
        **key,
    }
    stale: StaleCheckpoints | None = None
    if dist.is_main:
        stale = claim_run_dir(run_dir, parts, claim.stale)
        atomic_write_bytes(run_dir / CHECKPOINTS_DIR / MODEL_CONFIG, canonical_json(to_plain(model_cfg)) + b"\n")
    if dist.world_size > 1:
        barrier()
    model = build_model(model_cfg, device=dist.device, seed=seed)
    if init is not None:
        load_checkpoint(init.path, model=model, optimizer=None, restore_rng_state=False)
    removed = () if stale is None else stale.checkpoints
    return OpenRun(model=model, model_cfg=model_cfg, init=init, removed=removed, stale=stale)


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingResult:
    """What a training stage produced: its checkpoints, its other files and its report."""

    checkpoints: tuple[CheckpointRef, ...]
    """Every complete checkpoint of the run, by step (a resumed run's earlier ones included)."""
    outputs: tuple[Path, ...]
    """Files besides the checkpoints that the manifest pins (the spec's files: DPO's pairs)."""
    report: Mapping[str, Any]
    """The stage's report (``paths.report``)."""


def run_spec(
    spec: TrainSpec,
    *,
    run_dir: Path,
    dist: DistInfo,
    determinism: Mapping[str, Any],
    tracker: Tracker | None = None,
    claim: RunClaim | None = None,
) -> TrainingResult:
    """Train ``spec`` into ``run_dir``: see the module docstring for the order.

    ``determinism`` is what the entry point's :func:`flowpin.runtime.prepare_environment` set (the report's
    ``determinism``); ``tracker``: see :func:`train_loop`; ``claim``: the run key's code and the choice for
    stale checkpoints (:func:`open_run`). A fork (``spec.start``) refuses a run directory that holds
    checkpoints: it is a new run, never a resume.
    """
    if spec.start is not None and latest_checkpoint(run_dir / CHECKPOINTS_DIR) is not None:
        raise RecipeError(f"fork target {run_dir} already holds checkpoints; fork into a new directory")
    opened = open_run(
        model_cfg=spec.model,
        seed=spec.loop.seed,
        threads=spec.threads,
        run_dir=run_dir,
        init_dir=spec.init_dir,
        dist=dist,
        key=spec.key,
        claim=claim,
    )
    model = opened.model
    optimizer: torch.optim.Optimizer | None = None
    start: TrainState | None = None
    if spec.start is not None:  # weights, AdamW moments, RNG streams and data position of the checkpoint
        optimizer = build_optimizer(model, spec.loop.optim)
        start = load_checkpoint(spec.start, model=model, optimizer=optimizer)
    outputs = tuple(run_dir / name for name, _ in spec.files)
    if dist.is_main:
        for path, (_, data) in zip(outputs, spec.files, strict=True):
            atomic_write_bytes(path, data)
    before = None if spec.evaluate is None else spec.evaluate(model)
    result = train_loop(
        model,
        spec.loop,
        batches=spec.batches,
        loss_fn=spec.loss,
        run_dir=run_dir,
        dist=dist,
        tracker=tracker,
        grad_sync=grad_sync_for(model, spec.data_parallel),
        optimizer=optimizer,
        start_state=start,
    )
    after = None if spec.evaluate is None else spec.evaluate(model)
    trained = TrainedRun(
        model=model,
        model_cfg=opened.model_cfg,
        dist=dist,
        run_dir=run_dir,
        result=result,
        start=start,
        before=before,
        after=after,
    )
    report = {**run_report(opened, result, run_dir, spec.curves, determinism), **spec.report(trained)}
    return TrainingResult(checkpoints=result.checkpoints, outputs=outputs, report=report)


def run_report(
    opened: OpenRun, result: TrainResult, run_dir: Path, curves: Sequence[str], determinism: Mapping[str, Any]
) -> dict[str, Any]:
    """The part of a training report every stage shares (init, determinism, resume, steps, metric curves)."""
    rows = read_metrics(run_dir / METRICS_FILE)
    report: dict[str, Any] = {
        "init": None if opened.init is None else {"checkpoint": opened.init.path.name, "step": opened.init.step},
        "determinism": dict(determinism),
        "resumed_from": None if result.resumed_from is None else result.resumed_from.name,
        "removed_stale_checkpoints": list(opened.removed),
        "stale_checkpoints": None if opened.stale is None else opened.stale.to_json(),
        "determinism_changes": list(result.determinism_changes),
        "steps": result.state.step,
        "tokens_seen": result.state.tokens_seen,
        "checkpoints": [c.path.name for c in result.checkpoints],
    }
    for name in curves:
        points = [[m["step"], m["metrics"][name]] for m in rows if name in m["metrics"]]
        report[name] = {
            "first": points[0][1] if points else None,
            "last": points[-1][1] if points else None,
            "curve": points,
        }
    return report


def grad_sync_for(model: torch.nn.Module, cfg: DataParallelConfig) -> GradSync | None:
    """The loop's gradient engine for ``cfg``: ``None`` (flowpin's own reduction) or megatron's DDP."""
    refuse_untrained_optimizer(cfg)  # whatever the stage checked before: never train without a setting
    return MegatronGradSync(model, cfg) if cfg.engine == "megatron" else None


def train_loop(
    model: torch.nn.Module,
    loop: TrainConfig,
    *,
    batches: BatchSource,
    loss_fn: LossFn,
    run_dir: Path,
    dist: DistInfo | None = None,
    tracker: Tracker | None = None,
    grad_sync: GradSync | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_state: TrainState | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """:func:`flowpin.train.loop.train` logging to ``metrics.jsonl``, with megatron's RNG streams.

    ``tracker`` (the stage's, ``run.tracker``: its Aim run) hears every event too; it is the caller's to
    close. Neither tracker changes what is trained: they only receive metadata. ``grad_sync``,
    ``optimizer``, ``start_state`` (a fork) and ``resume_from``: see :func:`flowpin.train.loop.train`.
    """
    from flowpin.progress import step_progress
    from flowpin.train import megatron_cpu

    main = dist is None or dist.is_main
    # rank 0 alone logs (the loop hands other ranks no tracker): another rank opening the shared log would
    # race rank 0's appends when it trims a torn tail
    jsonl: Tracker = JsonlTracker(run_dir / METRICS_FILE) if main else NullTracker()
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
                grad_sync=grad_sync,
                optimizer=optimizer,
                start_state=start_state,
                resume_from=resume_from,
            )
    finally:
        jsonl.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The ``metrics`` events of a run's ``metrics.jsonl``, one per step (after a resume, the last logged)."""
    from flowpin.tracking import read_jsonl

    rows = [r for r in read_jsonl(path) if r.get("event") == "metrics"]
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:  # after a resume the log repeats steps since the last checkpoint: keep the last
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]
