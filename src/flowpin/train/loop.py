"""The deterministic training loop (model-agnostic): resume equals an uninterrupted run, bitwise.

What makes two runs of the same recipe produce byte-identical checkpoints on one machine:

* **Batches** come only from a :class:`BatchSource`, a pure function of the step in a
  :class:`flowpin.data.order.DataOrder` (see :func:`ordered_batches`); nothing is iterated or shuffled here.
* **Seeds**: a fresh run calls :func:`seed_all` with ``cfg.seed`` before its first step; a resumed or forked
  run restores every generator from the checkpoint instead (dropout continues its stream).
* **LR** is :func:`flowpin.train.schedule.lr_at` of the step, set on every param group before each step
  (no scheduler state).
* **AdamW** from ``torch.optim`` with a pinned implementation. Measured on torch 2.13 CPU: the
  single-tensor ("for_loop", torch's CPU default) and ``foreach`` paths give bitwise-identical weights;
  ``fused=True`` gives different bits (each is deterministic run to run). The choice is recorded in the
  optimizer's param groups and in the config digest, so a resume can never switch paths silently.
* **Grad clipping** with ``torch.nn.utils.clip_grad_norm_`` (``grad_clip: 0`` only measures the norm). A
  non-finite loss or grad norm stops the run before the optimizer step, so the weights stay finite.
* **Checkpoints** every ``checkpoint_every`` steps and at the end, in ``run_dir/checkpoints/step-NNNNNN``
  (:mod:`flowpin.train.checkpoint`), each published atomically; resume picks the latest complete one.
* **Settings that change results bitwise** but are not in the recipe (thread counts, deterministic-
  algorithm flags, TF32, CPU kernel ISA, torch version -- :func:`determinism_settings`) are recorded in
  every checkpoint. A resume or fork that meets different values warns (:class:`DeterminismWarning`),
  logs them to the tracker and records them in ``determinism_changes`` of every later checkpoint -- never
  silently.

Data parallel: pass ``dist`` (a :class:`DataParallel`, e.g. the
:class:`flowpin.train.distributed.DistInfo` that ``init_distributed()`` returned under ``torchrun``). Every rank
draws the *same* global batch from the same pure :class:`BatchSource` and keeps a contiguous block of rows,
:func:`rank_rows` (rank ``r`` of ``W`` gets rows ``r*B/W .. (r+1)*B/W - 1``; ``cfg.batch_size`` stays the
global batch and must divide by ``W``). After the backward pass the gradients are averaged with
:func:`flowpin.train.distributed.average_gradients` -- flattened in optimizer parameter order into fixed
buckets, one ``all_reduce(SUM)`` each, divided by ``W`` -- so every rank holds the same bits and clips and
steps identically; the logged loss is the mean of the ranks' losses (= the global token mean, as every rank
sees the same number of tokens). Rank 0 (``is_main``) alone writes checkpoints and talks to the tracker and
``on_checkpoint``; the others wait at a barrier after each save. Before the first step and before every
save the ranks compare digests of their step, weights and generator states and raise
:class:`flowpin.errors.ReplicaDivergenceError` if any differs -- a checkpoint holds rank 0's state
only, so it is a checkpoint of every rank or none. Generators are the same on every rank (the same seed,
as megatron's default, and the same draws), so dropout masks repeat across ranks. Resume and fork work as
above; ``run_dir`` must be a directory every rank sees. A world of one is exactly the single-process loop.
The world size and backend are recorded with the determinism settings (only when the world is larger than
one, so single-process checkpoints are unchanged): the result depends on them bitwise, because the
per-rank gradients are summed in a different order than one process's backward pass sums them.

Forking: pass ``start_state`` (from :func:`flowpin.train.checkpoint.load_checkpoint`, with the model and
optimizer loaded from the same checkpoint) and a new ``run_dir``; the new run continues at
``start_state.step`` under the new config, records the parent checkpoint, continues the data order if it is
the same order and starts the new order at its step 0 if not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from flowpin.canonical import canonical_json
from flowpin.constants import CHECKPOINT_NAME, CHECKPOINTS_DIR
from flowpin.data.order import DataOrder, load_batch
from flowpin.errors import (
    DataError,
    DataOrderError,
    InternalError,
    RecipeError,
    ReplicaDivergenceError,
    TrainingDivergedError,
)
from flowpin.recipe import check_choice, check_float, check_int, to_plain
from flowpin.tracking import NullTracker, Tracker
from flowpin.train import distributed as collectives
from flowpin.train.checkpoint import (
    CheckpointRef,
    DataPosition,
    TrainState,
    capture_rng,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from flowpin.train.schedule import ScheduleConfig, lr_at

if TYPE_CHECKING:
    from flowpin.data.tokenized import TokenizedDataset

OPTIMIZER_IMPLEMENTATIONS = ("for_loop", "foreach", "fused")
"""AdamW code paths (see the module docstring for which agree bitwise)."""
MAX_STEPS = 2**53 - 1

_log = logging.getLogger(__name__)


class DeterminismWarning(RuntimeWarning):
    """A resume or fork runs under settings that differ from those the checkpoint was trained with."""


# --- config ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW and its LR schedule (the ``optim`` recipe group). Validated on construction."""

    schedule: ScheduleConfig
    """The LR schedule (``optim.schedule``)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW ``(beta1, beta2)``, each in ``[0, 1)``."""
    eps: float = 1e-8
    """AdamW epsilon, ``> 0``."""
    weight_decay: float = 0.1
    """Decoupled weight decay on parameters with two or more dimensions."""
    decay_1d: bool = False
    """Also decay 1-D parameters (biases, norm gains); OLMo and most LLM recipes do not."""
    implementation: str = "for_loop"
    """``for_loop`` (torch's CPU default), ``foreach`` or ``fused``; part of the identity of the results."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "optim") -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if not isinstance(self.betas, tuple | list) or len(self.betas) != 2:
            raise RecipeError(f"{where}.betas: {self.betas!r} must be a pair [beta1, beta2]")
        for i, beta in enumerate(self.betas):
            check_float(beta, f"{where}.betas[{i}]", minimum=0.0, maximum=0.999999999)
        if check_float(self.eps, f"{where}.eps", minimum=0.0) == 0.0:
            raise RecipeError(f"{where}.eps: must be > 0")
        check_float(self.weight_decay, f"{where}.weight_decay", minimum=0.0)
        if not isinstance(self.decay_1d, bool):
            raise RecipeError(f"{where}.decay_1d: {self.decay_1d!r} must be true or false")
        check_choice(self.implementation, OPTIMIZER_IMPLEMENTATIONS, f"{where}.implementation")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run (the ``train`` recipe group, plus ``optim``). Validated on construction."""

    steps: int
    """Optimizer steps of the run: it ends after step ``steps - 1`` (a fork continues up to it)."""
    batch_size: int
    """Sequences per step; must equal the data order's batch size."""
    seed: int
    """Seeds torch, Python and numpy before the first step of a fresh run."""
    optim: OptimConfig
    """Optimizer and schedule (keys ``optim.*``)."""
    grad_clip: float = 1.0
    """Clip the global grad L2 norm to this; 0 disables clipping (the norm is still logged)."""
    log_every: int = 10
    """Report metrics to the tracker every this many steps (and on the last)."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and after the last)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "train") -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.steps, f"{where}.steps", minimum=1, maximum=MAX_STEPS)
        check_int(self.batch_size, f"{where}.batch_size", minimum=1, maximum=MAX_STEPS)
        check_int(self.seed, f"{where}.seed", minimum=0, maximum=2**32 - 1)
        check_float(self.grad_clip, f"{where}.grad_clip", minimum=0.0)
        check_int(self.log_every, f"{where}.log_every", minimum=1)
        check_int(self.checkpoint_every, f"{where}.checkpoint_every", minimum=1)
        if not isinstance(self.optim, OptimConfig):
            raise RecipeError(f"{where}.optim: expected an OptimConfig, got {type(self.optim).__name__}")

    def to_json(self) -> dict[str, Any]:
        """The plain JSON form recorded in every checkpoint (its sha256 is the config digest)."""
        plain: dict[str, Any] = to_plain(self)
        plain["optim"]["betas"] = list(self.optim.betas)
        return plain


# --- data -----------------------------------------------------------------------------------------


class BatchSource(Protocol):
    """The loop's only source of data: the token batch of any step, as a pure function of the step."""

    @property
    def order(self) -> DataOrder:
        """The data order the batches follow (its digest, seed and batch size are checkpointed)."""
        ...

    def __call__(self, step: int) -> torch.Tensor:
        """The integer token tensor ``[batch_size, seq_len]`` of order step ``step``.

        Rows come first (data parallel splits them); a source may put more dimensions between rows and
        sequence (SFT's ``[B, 2, T]``: ids and loss mask), tokens counted as ``rows x seq_len``.
        """
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrderedBatches:
    """Batches of a tokenized dataset in its global order (:func:`flowpin.data.order.load_batch`), as int64."""

    dataset: TokenizedDataset
    order: DataOrder

    def __call__(self, step: int) -> torch.Tensor:
        return torch.from_numpy(load_batch(self.dataset, self.order, step)).long()


def ordered_batches(dataset: TokenizedDataset, order: DataOrder) -> OrderedBatches:
    """The :class:`BatchSource` of ``dataset`` in ``order``."""
    return OrderedBatches(dataset=dataset, order=order)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtraRng:
    """Generators the loop cannot see, saved in every checkpoint and restored on resume or fork.

    For megatron: ``ExtraRng(capture=megatron_cpu.rng_tracker_states, restore=megatron_cpu.set_rng_tracker_states)``
    (its named model-parallel streams drive dropout inside ``GPTModel``).
    """

    capture: Callable[[], Mapping[str, torch.Tensor]]
    """Return the states (name -> tensor) as of now."""
    restore: Callable[[Mapping[str, torch.Tensor]], None]
    """Set the states :attr:`capture` returned."""


class DataParallel(Protocol):
    """Where this process sits among a run's data-parallel ranks (:class:`flowpin.train.distributed.DistInfo`)."""

    @property
    def rank(self) -> int:
        """This process's rank, ``0 .. world_size - 1`` (in the default process group)."""
        ...

    @property
    def world_size(self) -> int:
        """Number of data-parallel ranks (the default process group's size)."""
        ...

    @property
    def is_main(self) -> bool:
        """Whether this rank writes checkpoints and tracker events (rank 0)."""
        ...


class GradSync(Protocol):
    """A gradient engine that replaces the loop's own reduction (e.g. megatron's DDP,
    :class:`flowpin.train.megatron_ddp.MegatronGradSync`)."""

    def settings(self) -> dict[str, Any]:
        """Recorded with the determinism settings (the engine can change the bits)."""
        ...

    def before_backward(self) -> None:
        """Called after ``zero_grad`` and before the forward pass of every step."""
        ...

    def after_backward(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Reduce across ranks and leave each parameter's reduced gradient in ``param.grad``."""
        ...


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that ``rank`` of ``world_size`` trains on: a contiguous block of
    ``batch_size / world_size`` rows (rank 0 the first). Raises :class:`RecipeError` unless it divides."""
    check_int(world_size, "world_size", minimum=1)
    check_int(rank, "rank", minimum=0, maximum=world_size - 1)
    if batch_size % world_size:
        raise RecipeError(
            f"train.batch_size: {batch_size} does not divide over {world_size} data-parallel ranks; use a "
            f"multiple of {world_size} (the batch size is the global batch, split evenly over the ranks)"
        )
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Replicas:
    """The data-parallel side of :func:`train` (world size > 1): the only place it runs collectives."""

    rank: int
    world_size: int
    is_main: bool
    backend: str
    rows: slice

    @classmethod
    def of(cls, dist: DataParallel | None, batch_size: int) -> _Replicas | None:
        if dist is None:
            return None
        rows = rank_rows(batch_size, dist.rank, dist.world_size)
        if dist.world_size == 1:
            return None  # exactly the single-process loop (same bytes)
        backend = collectives.check_process_group(dist.rank, dist.world_size)
        return cls(rank=dist.rank, world_size=dist.world_size, is_main=dist.is_main, backend=backend, rows=rows)

    def settings(self) -> dict[str, Any]:
        return {"data_parallel_world_size": self.world_size, "data_parallel_backend": self.backend}

    def check(self, where: str, model: torch.nn.Module, step: int, position: int, extra_rng: ExtraRng | None) -> None:
        """Raise :class:`ReplicaDivergenceError` unless every rank has this rank's step, weights and generators."""
        parts = _replica_digests(model, step, position, extra_rng)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        gathered = collectives.gather_digests(b"".join(parts), world_size=self.world_size, device=device)
        size = len(parts[0])
        names = ("step and data position", "weights and buffers", "generator states")
        bad = [
            f"rank {r} has other {name}"
            for r, blob in enumerate(gathered)
            for i, name in enumerate(names)
            if blob[i * size : (i + 1) * size] != gathered[0][i * size : (i + 1) * size]
        ]
        if bad:
            raise ReplicaDivergenceError(
                f"{where}: data-parallel ranks are not replicas of rank 0 ({'; '.join(bad)}); a checkpoint holds "
                "rank 0's state alone. Build the model with the same seed on every rank, restore every rank from "
                "the same checkpoint, and draw random numbers the same way on every rank"
            )


def _replica_digests(
    model: torch.nn.Module, step: int, position: int, extra_rng: ExtraRng | None
) -> tuple[bytes, bytes, bytes]:
    """sha256 of (step and data position, model state_dict tensors, generator states) as this rank has them.

    Generators: torch's CPU one, the *current* CUDA device's (each rank drives its own device), Python's,
    numpy's and ``extra_rng``'s -- what a checkpoint saves, less the CUDA devices other ranks own.
    """

    def add(h: Any, name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    where = hashlib.sha256(canonical_json({"step": step, "position": position})).digest()
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            add(weights, name, tensor)
    rng = capture_rng(extra=extra_rng.capture() if extra_rng is not None else None)
    generators = hashlib.sha256(canonical_json({"python": rng.python, "numpy": rng.numpy}))
    add(generators, "torch/cpu", rng.torch_cpu)
    if torch.cuda.is_available():
        add(generators, "torch/cuda", torch.cuda.get_rng_state())
    for name, state in sorted(rng.extra.items()):
        add(generators, f"extra/{name}", state)
    return where, weights.digest(), generators.digest()


# --- determinism ----------------------------------------------------------------------------------


_REASONS = {
    "torch_version": "kernels differ between torch builds",
    "torch_num_threads": "intra-op thread count changes the order of parallel reductions",
    "torch_num_interop_threads": "inter-op thread count changes how parallel work is split",
    "cpu_capability": "torch picks different CPU kernels (AVX2/AVX512) per ISA",
    "deterministic_algorithms": "changes which kernels torch may use",
    "deterministic_warn_only": "changes which kernels torch may use",
    "float32_matmul_precision": "reduced-precision (TF32/bf16) matmuls round differently",
    "default_dtype": "changes the precision of new tensors",
    "cuda_devices": "a different accelerator runs different kernels",
    "cudnn_deterministic": "changes cuDNN kernel selection",
    "cudnn_benchmark": "cuDNN autotuning picks kernels by timing",
    "cuda_matmul_tf32": "TF32 matmuls round differently",
    "cudnn_tf32": "TF32 convolutions round differently",
    "data_parallel_world_size": "gradients are summed over another number of rank slices, in another order",
    "data_parallel_backend": "another collective backend reduces in another order",
}


def determinism_settings() -> dict[str, Any]:
    """The process settings (outside the recipe) that can change training results bitwise."""
    cuda = torch.cuda.is_available()
    return {
        "torch_version": str(torch.__version__),  # a str subclass: JSON gives back a plain str
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": str(torch.get_default_dtype()),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
    }


def determinism_report(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per setting that differs between ``recorded`` (a checkpoint's) and ``current``; sorted."""
    lines = []
    for key in sorted(recorded.keys() | current.keys()):
        old, new = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if old == new and type(old) is type(new):
            continue
        reason = _REASONS.get(key, "may change floating-point results")
        lines.append(
            f"{key}: the checkpoint was trained with {old!r}, this process has {new!r} ({reason}); "
            "results from here on may not be bitwise equal to an uninterrupted run"
        )
    return lines


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's ``random`` and numpy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# --- optimizer ------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters: group ``decay`` (>= 2-D, or all with ``decay_1d``) and ``no_decay``."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 or cfg.decay_1d else no_decay).append(param)
    groups: list[dict[str, Any]] = [{"params": decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "name": "no_decay"})
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.schedule.peak_lr,
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        foreach=cfg.implementation == "foreach",
        fused=cfg.implementation == "fused",
    )
    configure_optimizer(optimizer, cfg)
    return optimizer


def configure_optimizer(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Apply ``cfg``'s hyperparameters to every param group (after a checkpoint load restored the old ones).

    A group named ``no_decay`` gets weight decay 0; every other group gets ``cfg.weight_decay``.
    """
    for group in optimizer.param_groups:
        group["betas"] = (float(cfg.betas[0]), float(cfg.betas[1]))
        group["eps"] = float(cfg.eps)
        group["weight_decay"] = 0.0 if group.get("name") == "no_decay" else float(cfg.weight_decay)
        group["foreach"] = cfg.implementation == "foreach"
        group["fused"] = cfg.implementation == "fused"


# --- the loop -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What :func:`train` did."""

    checkpoints: tuple[CheckpointRef, ...]
    """Every complete checkpoint in ``run_dir``, by step (earlier runs' included)."""
    state: TrainState
    """The state after the last step (equal to the last checkpoint's)."""
    metrics: Mapping[str, float]
    """Metrics of the last step taken in this call (empty when there was nothing left to train)."""
    resumed_from: Path | None
    """The checkpoint this call resumed from, if any."""
    determinism_changes: tuple[str, ...]
    """What :func:`determinism_report` found on resume or fork (also warned and checkpointed)."""


LossFn = Callable[[torch.nn.Module, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]"]
"""``loss_fn(model, batch) -> scalar loss`` (mean over tokens), or ``(loss, metrics)``.

Extra ``metrics`` (e.g. RLVR's mean reward) are logged with the loss at every logged step (averaged over
data-parallel ranks) and kept in the checkpoint's ``metrics``. They must be deterministic (no timings).
"""
ScalarLossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
"""A :data:`LossFn` without extra metrics: ``loss_fn(model, batch) -> scalar loss`` (e.g.
:func:`flowpin.train.pretrain.lm_loss`)."""


def train(
    *,
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: BatchSource,
    cfg: TrainConfig,
    run_dir: Path,
    tracker: Tracker | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    resume_from: Path | None = None,
    start_state: TrainState | None = None,
    on_checkpoint: Callable[[Path, TrainState], None] | None = None,
    extra_rng: ExtraRng | None = None,
    dist: DataParallel | None = None,
    grad_sync: GradSync | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` steps, checkpointing into ``run_dir/checkpoints``.

    Where it starts, first match wins:

    1. ``resume_from``: a checkpoint of this run (refused if ``run_dir`` holds a later one, which resuming
       would overwrite);
    2. the latest complete checkpoint in ``run_dir`` (a killed run continues where it last saved);
    3. ``start_state``, a fork: ``model`` must already hold that checkpoint's weights, and ``optimizer`` its
       state to continue the AdamW moments (leave ``optimizer`` out to start fresh ones);
    4. a fresh start, seeded with ``cfg.seed``.

    A resume (1, 2) needs the config and data order it was trained with (else :class:`RecipeError` /
    :class:`DataOrderError`: fork into a new ``run_dir`` to change either). ``optimizer`` defaults to
    :func:`build_optimizer`; whichever it is, :func:`configure_optimizer` applies ``cfg.optim`` to it.
    ``on_checkpoint(path, state)`` runs after each checkpoint is published (e.g. to record a manifest).
    ``extra_rng`` adds generators the loop cannot see (megatron's RNG tracker). The tracker is the
    caller's to close.

    ``dist`` trains data parallel (see the module docstring): call this on every rank with the same
    arguments; only the main rank writes checkpoints, calls ``on_checkpoint`` and uses ``tracker``.
    ``grad_sync`` replaces the loop's own gradient reduction (at any world size, one included) and is
    recorded with the determinism settings.

    ``progress(step, cfg.steps)`` (main rank only) hears every finished step, e.g. a terminal bar from
    :func:`flowpin.progress.step_progress`; it only reads the step, so results are the same with or without.
    """
    if cfg.batch_size != data.order.batch_size:
        raise RecipeError(
            f"train.batch_size: {cfg.batch_size}, but the data order has batch size {data.order.batch_size}; "
            "build the order with the recipe's batch size"
        )
    replicas = _Replicas.of(dist, cfg.batch_size)
    main = replicas is None or replicas.is_main
    tracker = tracker if tracker is not None and main else NullTracker()
    optimizer = optimizer if optimizer is not None else build_optimizer(model, cfg.optim)
    config = cfg.to_json()
    checkpoints_dir = run_dir / CHECKPOINTS_DIR
    current = determinism_settings()
    if grad_sync is not None:
        current = {**current, **grad_sync.settings()}
    if replicas is not None:
        current = {**current, **replicas.settings()}
        if main:
            for stale in remove_stale_temporaries(checkpoints_dir):
                _log.warning("removed %s, left by a save that was killed", stale)
        collectives.barrier()  # every rank lists the checkpoints only once rank 0 has cleaned up

    state, resumed_from, changes = _starting_state(
        model=model,
        optimizer=optimizer,
        data=data,
        cfg=cfg,
        config=config,
        checkpoints_dir=checkpoints_dir,
        resume_from=resume_from,
        start_state=start_state,
        current=current,
        extra_rng=extra_rng,
        remove_stale=replicas is None,
    )
    configure_optimizer(optimizer, cfg.optim)
    if changes:
        message = "; ".join(changes)
        warnings.warn(
            f"resuming at step {state.step} under changed settings: {message}", DeterminismWarning, stacklevel=2
        )
    tracker.log_params(
        {
            "config": config,
            "start_step": state.step,
            "resumed_from": None if resumed_from is None else resumed_from.name,
            "determinism": current,
            "determinism_changes": list(changes),
        }
    )

    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    model.train()
    metrics: dict[str, float] = {}
    window_tokens, window_start = 0, time.perf_counter()
    step, tokens_seen, position, lr = state.step, state.tokens_seen, state.data.next_step, state.lr
    if replicas is not None:
        replicas.check(f"start (step {step})", model, step, position, extra_rng)
    while step < cfg.steps:
        batch = _checked_batch(data, position, cfg.batch_size)
        lr = lr_at(cfg.optim.schedule, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if grad_sync is not None:
            grad_sync.before_backward()
        loss, extra = _split_loss(loss_fn(model, batch if replicas is None else batch[replicas.rows]), position)
        torch.autograd.backward(loss)
        if grad_sync is not None:
            grad_sync.after_backward(params)
        elif replicas is not None:
            collectives.average_gradients(params, world_size=replicas.world_size)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, foreach=False))
        loss_value = float(loss.detach())
        if replicas is not None:
            loss_value = float(collectives.average(loss, world_size=replicas.world_size))
            extra = {
                k: float(collectives.average(torch.tensor(v, dtype=torch.float64), world_size=replicas.world_size))
                for k, v in extra.items()
            }
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise TrainingDivergedError(
                f"step {step}: loss {loss_value}, grad norm {grad_norm} -- training diverged; the weights were not "
                f"updated. Resume from the last checkpoint in {checkpoints_dir} with a lower optim.schedule.peak_lr "
                "or a smaller train.grad_clip (in a new run_dir)"
            )
        optimizer.step()
        step, position = step + 1, position + 1
        batch_tokens = batch.shape[0] * batch.shape[-1]  # rows x sequence length, whatever lies between
        tokens_seen += batch_tokens
        window_tokens += batch_tokens
        metrics = {"loss": loss_value, "grad_norm": grad_norm, "lr": lr, **extra}
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            tracker.log_metrics(
                step,
                {**metrics, "tokens_per_s": window_tokens / max(now - window_start, 1e-9), "tokens_seen": tokens_seen},
                {"subset": "train"},
            )
            window_tokens, window_start = 0, now
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = dataclasses.replace(
                state,
                step=step,
                tokens_seen=tokens_seen,
                data=dataclasses.replace(state.data, next_step=position),
                lr=lr,
                rng=capture_rng(extra=extra_rng.capture() if extra_rng is not None else None),
                metrics={"loss": loss_value, "grad_norm": grad_norm, **extra},
                determinism=current,
                source=None,
            )
            path = checkpoints_dir / checkpoint_name(step)
            if replicas is not None:
                replicas.check(f"checkpoint {path.name}", model, step, position, extra_rng)
            if main:
                save_checkpoint(path, state, model=model, optimizer=optimizer)
                if on_checkpoint is not None:
                    on_checkpoint(path, state)
            if replicas is not None:
                collectives.barrier()  # no rank reads or resumes past a checkpoint before it is published
        if progress is not None and main:
            progress(step, cfg.steps)
    return TrainResult(
        checkpoints=tuple(list_checkpoints(checkpoints_dir)),
        state=state,
        metrics=metrics,
        resumed_from=resumed_from,
        determinism_changes=tuple(changes),
    )


def _starting_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: BatchSource,
    cfg: TrainConfig,
    config: dict[str, Any],
    checkpoints_dir: Path,
    resume_from: Path | None,
    start_state: TrainState | None,
    current: Mapping[str, Any],
    extra_rng: ExtraRng | None,
    remove_stale: bool,
) -> tuple[TrainState, Path | None, list[str]]:
    """(state to continue from, checkpoint resumed from, determinism changes met)."""
    order = data.order
    here = DataPosition(
        dataset_digest=order.dataset_digest, order_seed=order.order_seed, batch_size=order.batch_size, next_step=0
    )
    if remove_stale:
        for stale in remove_stale_temporaries(checkpoints_dir):
            _log.warning("removed %s, left by a save that was killed", stale)
    latest = latest_checkpoint(checkpoints_dir)
    if resume_from is not None and latest is not None and latest.step > _step_of(resume_from):
        raise RecipeError(
            f"resume_from {resume_from.name}: {checkpoints_dir} already holds {latest.path.name}, a later checkpoint; "
            "resuming the earlier one would overwrite it -- fork into a new run_dir with start_state instead"
        )
    source = resume_from if resume_from is not None else (latest.path if latest is not None else None)
    if source is not None:
        state = load_checkpoint(source, model=model, optimizer=optimizer, restore_rng_state=False)
        _check_same_run(state, source, config, here, start_state)  # same config: state.step <= cfg.steps
        changes = _restore(state, extra_rng) + determinism_report(state.determinism, current)
        return _with_changes(state, changes), source, changes
    if start_state is not None:
        if start_state.step >= cfg.steps:
            raise RecipeError(f"train.steps: {cfg.steps} must exceed the start state's step {start_state.step}")
        position = start_state.data if start_state.data.same_order(here) else here
        changes = _restore(start_state, extra_rng) + determinism_report(start_state.determinism, current)
        state = dataclasses.replace(
            start_state,
            config=config,
            data=position,
            parent=start_state.source if start_state.source is not None else start_state.parent,
            determinism=current,
            source=None,
        )
        return _with_changes(state, changes), None, changes
    seed_all(cfg.seed)
    state = TrainState(
        step=0,
        tokens_seen=0,
        data=here,
        lr=0.0,
        config=config,
        rng=capture_rng(extra=extra_rng.capture() if extra_rng is not None else None),
        determinism=current,
    )
    return state, None, []


def _restore(state: TrainState, extra_rng: ExtraRng | None) -> list[str]:
    """Restore every generator from ``state``; what could not be restored, as determinism changes."""
    problems = restore_rng(state.rng)
    saved = sorted(state.rng.extra)
    if extra_rng is not None and saved:
        extra_rng.restore(state.rng.extra)
    elif extra_rng is not None:
        problems.append("extra_rng: the checkpoint holds no extra generator states; they continue from their seeds")
    elif saved:
        problems.append(f"extra_rng: the checkpoint holds generator states {saved}, but no extra_rng restores them")
    return problems


def _with_changes(state: TrainState, changes: list[str]) -> TrainState:
    if not changes:
        return state
    return dataclasses.replace(
        state, determinism_changes=(*state.determinism_changes, {"step": state.step, "changes": changes})
    )


def _step_of(path: Path) -> int:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def _check_same_run(
    state: TrainState, source: Path, config: Mapping[str, Any], here: DataPosition, start_state: TrainState | None
) -> None:
    if state.config != config:
        keys = _differing_keys(state.config, config)
        raise RecipeError(
            f"{', '.join(keys[:5])}: {source} was trained with a different config (digest {state.config_digest[:12]}); "
            "a run directory holds one run -- fork into a new run_dir with start_state to change the recipe"
        )
    if not state.data.same_order(here):
        raise DataOrderError(
            f"{source} was trained on order (dataset {state.data.dataset_digest[:12]}, seed {state.data.order_seed}, "
            f"batch {state.data.batch_size}); this data is (dataset {here.dataset_digest[:12]}, seed "
            f"{here.order_seed}, batch {here.batch_size}) -- resume with the same data or fork into a new run_dir"
        )
    if start_state is not None and start_state.source is not None and state.parent != start_state.source:
        raise RecipeError(
            f"{source} continues a run forked from {state.parent}, not from the start_state's checkpoint "
            f"{start_state.source}; use a new run_dir for a new fork"
        )


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(a.keys() | b.keys()):
            out += _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "config"]


def _split_loss(value: Any, position: int) -> tuple[torch.Tensor, dict[str, float]]:
    loss, extra = value if isinstance(value, tuple) else (value, {})
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        raise InternalError(
            f"data step {position}: loss_fn must return a scalar tensor (or (loss, metrics)), got {loss!r}"
        )
    clash = sorted(set(extra) & {"loss", "grad_norm", "lr", "tokens_per_s", "tokens_seen"})
    if clash:
        raise InternalError(f"loss_fn metrics must not reuse the loop's names {clash}")
    return loss, {str(k): float(v) for k, v in extra.items()}


def _checked_batch(data: BatchSource, position: int, batch_size: int) -> torch.Tensor:
    batch = data(position)
    if not isinstance(batch, torch.Tensor) or batch.ndim < 2 or batch.shape[0] != batch_size:
        shape = list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise DataError(
            f"data step {position}: expected a [{batch_size}, ..., seq_len] token tensor (rows first), got {shape}"
        )
    if batch.dtype.is_floating_point or batch.dtype.is_complex or batch.dtype == torch.bool:
        raise DataError(f"data step {position}: token tensor has dtype {batch.dtype}; token ids must be integers")
    return batch


__all__ = [
    "OPTIMIZER_IMPLEMENTATIONS",
    "BatchSource",
    "DataParallel",
    "DeterminismWarning",
    "ExtraRng",
    "GradSync",
    "LossFn",
    "OptimConfig",
    "OrderedBatches",
    "ScalarLossFn",
    "TrainConfig",
    "TrainResult",
    "build_optimizer",
    "configure_optimizer",
    "determinism_report",
    "determinism_settings",
    "ordered_batches",
    "rank_rows",
    "seed_all",
    "train",
]
