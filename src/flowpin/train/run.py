"""A training stage (pretrain, midtrain, long context) as one library call.

The stage script composes ``model`` and the ``train`` block, and calls :func:`run_training` with the
tokenized dataset and, for midtrain/long context, the upstream run's checkpoints. This module owns what
lies between the engine pieces: building the Megatron model for the tokenizer's vocabulary, the loss
(next-token cross entropy, padding masked), the exact data order, determinism settings, starting from
a parent checkpoint (weights only: a new stage starts a new optimizer and schedule, as OLMo's stages
do), resuming a killed run, and refusing to resume checkpoints written under another recipe.

Checkpoints go to ``<run_dir>/checkpoints/step-NNNNNN`` (each published atomically; a killed run resumes
from the last one and ends with the same final checkpoint as an uninterrupted run).

**The run key.** ``<run_dir>/run-key.json`` names what the checkpoints were trained from: the key's
*parts* (canonical JSON: the model config, the init checkpoint, the thread count, the sha256 of each code
file, and the stage's own parts -- loop config, data digest, order seed...) and their digest. Checkpoints
are resumed only under the same key. :func:`open_run` (rank 0) compares the keys before training:

* the same key: the checkpoints are resumed;
* another key and no complete checkpoint: the directory is claimed under the new key;
* another key and checkpoints: refused with :class:`~flowpin.errors.StaleCheckpointsError`, which names
  each part that changed (``code: src/flowpin/train/loop.py changed; loop.steps: 150 -> 200``) and keeps
  the checkpoints. Nothing is deleted unless the user chooses, by running again with
  ``FLOWPIN_STALE_CHECKPOINTS=archive`` (the checkpoints, ``metrics.jsonl`` and the old ``run-key.json`` move
  to ``<run_dir>/stale/<first 12 hex of the old key>/``) or ``=discard`` (they are deleted); the report's
  ``removed_stale_checkpoints`` and ``stale_checkpoints`` say which, why and where. A ``run-key.json`` of an
  older flowpin holds the digest alone: its parts are unknown, and it is refused the same way.

The choice is an environment variable, read at the stage's edge (:meth:`RunClaim.from_env`), not a recipe
key: the recipe is the run's identity, and what becomes of an earlier run's checkpoints is not.

**Code.** The key's code part covers the code that can change the stage's outputs: a stage passes the
files of its ``dvc.yaml`` code deps, what its manifest pins (:meth:`flowpin.stage.StageRun.code_digests`),
so an edit to ``cli.py`` does not strand a killed run's checkpoints. A caller that names no code set (a
library or test call) gets every source file of the imported flowpin package (:func:`package_code_digests`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowpin import settings
from flowpin.atomic import atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import METRICS_FILE, MODEL_CONFIG, RUN_KEY_FILE
from flowpin.data.order import order_for
from flowpin.data.tokenize import TokenizedDataset
from flowpin.errors import (
    CheckpointCorruptError,
    CheckpointMissingError,
    RecipeError,
    StaleCheckpointsError,
    StrictJSONError,
)
from flowpin.hashing import hash_bytes
from flowpin.jsonio import loads_strict
from flowpin.recipe import check_choice, check_int, to_config, to_plain
from flowpin.safeio import read_regular
from flowpin.settings import Settings
from flowpin.tracking import FanoutTracker, JsonlTracker, NullTracker, Tracker
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
from flowpin.train.transformer import ModelConfig, build_model, check_precision, effective_precision


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


def package_code_digests() -> dict[str, str]:
    """sha256 of every source file of the imported flowpin package, by ``flowpin/<relative path>``.

    The run key's code part when the caller names no code set (:class:`RunClaim` ``code=None``).
    """
    import flowpin
    from flowpin.hashing import hash_file
    from flowpin.manifest.record import source_files

    package = Path(flowpin.__file__).resolve().parent
    return {f"flowpin/{rel}": hash_file(package / rel, "sha256") for rel in source_files(package)}


def run_key(parts: Mapping[str, Any]) -> str:
    """The digest of a run key's parts: sha256 of their canonical JSON."""
    return hash_bytes(canonical_json(dict(parts)))


"""``<run_dir>/run-key.json``: the run key (digest and parts) the run's checkpoints were trained under."""
STALE_DIR = "stale"
"""``<run_dir>/stale/<old key>/``: where ``FLOWPIN_STALE_CHECKPOINTS=archive`` moves checkpoints of another key."""
STALE_CHECKPOINTS_ENV = settings.STALE_CHECKPOINTS
"""The user's choice for checkpoints of another run key: unset (refuse), ``archive`` or ``discard``."""
STALE_CHOICES = ("refuse", "archive", "discard")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunClaim:
    """How :func:`open_run` claims its run directory: what the run key's code part covers, and what becomes
    of checkpoints trained under another key (see the module docstring)."""

    code: Mapping[str, str] | None = None
    """sha256 of each code file the checkpoints depend on, by path. A stage passes its ``dvc.yaml`` code deps
    (``run.code_digests()``); ``None``: every source file of the imported flowpin package."""
    stale: str = "refuse"
    """Checkpoints of another run key: ``refuse`` (:class:`~flowpin.errors.StaleCheckpointsError`, nothing
    touched), ``archive`` (moved to ``<run_dir>/stale/<old key>/``) or ``discard`` (deleted)."""

    def __post_init__(self) -> None:
        if self.stale not in STALE_CHOICES:
            raise StaleCheckpointsError(f"stale: {self.stale!r} is not one of {', '.join(STALE_CHOICES)}")

    @classmethod
    def from_env(cls, code: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> RunClaim:
        """A claim of ``code`` whose choice is ``FLOWPIN_STALE_CHECKPOINTS`` in ``environ`` (default
        ``os.environ``; unset or empty: refuse). Raises :class:`~flowpin.errors.StaleCheckpointsError` for
        another value, before anything is trained."""
        raw = Settings.from_env(environ).stale_checkpoints or ""
        choice = raw.strip().lower() or "refuse"
        if choice not in STALE_CHOICES:
            raise StaleCheckpointsError(
                f"{STALE_CHECKPOINTS_ENV}={raw!r}: unknown; set it to 'archive' (move checkpoints of another run "
                "key aside) or 'discard' (delete them), or unset it to have them refused"
            )
        return cls(code=code, stale=choice)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StaleCheckpoints:
    """Checkpoints of another run key that a run took out of its directory, as the user chose."""

    choice: str
    """``archive`` or ``discard``."""
    checkpoints: tuple[str, ...]
    """Their names (``step-NNNNNN``)."""
    changed: tuple[str, ...]
    """What differed between their run key and this run's (:func:`key_changes`)."""
    archive: str | None
    """Where they went, relative to the run directory (``stale/<old key>``); ``None`` when discarded."""

    def to_json(self) -> dict[str, Any]:
        return {"choice": self.choice, "changed": list(self.changed), "archive": self.archive}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenRun:
    """A stage's model, ready to train into its run directory (:func:`open_run`)."""

    model: torch.nn.Module
    model_cfg: ModelConfig
    """The model's config with the tokenizer's vocabulary (also written to ``checkpoints/model.json``)."""
    init: CheckpointRef | None
    """The upstream checkpoint whose weights the model starts from (``None``: from ``loop.seed``)."""
    removed: list[str]
    """Checkpoints of another run key taken out of the run (archived or discarded, as the user chose)."""
    determinism: dict[str, Any]
    """What :func:`flowpin.train.distributed.set_deterministic` set."""
    stale: StaleCheckpoints | None = None
    """What became of those checkpoints and why (``None``: none were taken out)."""


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
    claim: RunClaim | None = None,
) -> OpenRun:
    """Set determinism, claim ``run_dir`` and build the model (from ``init_dir``'s last checkpoint, if given).

    ``key`` names everything else the checkpoints depend on (loop config, data digest and order, the
    stage's own recipe): with the model config, the init checkpoint, the thread count and the code of
    ``claim`` (default :class:`RunClaim`: the whole package, stale checkpoints refused) it forms the run
    key; checkpoints trained under another key are refused, archived or discarded as ``claim`` says (see
    the module docstring), never resumed. Rank 0 alone claims the directory; the other ranks wait for it.
    Every post-training stage (SFT, DPO, RLVR) opens its run through here, as the pretraining stages do.
    """
    check_precision(model_cfg, dist.device)
    determinism = set_deterministic(seed, cpu_threads=threads)
    init: CheckpointRef | None = None
    if init_dir is not None:
        init = latest_checkpoint(init_dir)
        if init is None:
            raise RecipeError(f"paths.inputs.init: {init_dir} holds no complete checkpoint; run the upstream stage")
    claim = RunClaim() if claim is None else claim
    clash = sorted(set(key) & {"model", "init", "threads", "code"})
    if clash:
        raise ValueError(f"open_run: key names {', '.join(clash)}, which open_run sets itself")
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
    removed = [] if stale is None else list(stale.checkpoints)
    return OpenRun(model=model, model_cfg=model_cfg, init=init, removed=removed, determinism=determinism, stale=stale)


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
    claim: RunClaim | None = None,
) -> TrainingResult:
    """Train one stage into ``run_dir``; see the module docstring. ``tracker``: see :func:`train_loop`;
    ``claim``: the run key's code and the choice for stale checkpoints (:func:`open_run`)."""
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
        claim=claim,
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
    losses = [m for m in read_metrics(run_dir / METRICS_FILE) if "loss" in m["metrics"]]
    report = {
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": model_cfg.vocab_size},
        "precision": effective_precision(model),
        "determinism": opened.determinism,
        "cpu_patches": list(dist.cpu_patches),
        "world_size": dist.world_size,
        "init": None if init is None else {"checkpoint": init.path.name, "step": init.step},
        "resumed_from": None if result.resumed_from is None else result.resumed_from.name,
        "removed_stale_checkpoints": opened.removed,
        "stale_checkpoints": None if opened.stale is None else opened.stale.to_json(),
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
                **kwargs,
            )
    finally:
        jsonl.close()


def claim_run_dir(run_dir: Path, parts: Mapping[str, Any], stale: str) -> StaleCheckpoints | None:
    """Claim ``run_dir`` for a run under the key of ``parts`` (rank 0, before training) and write its
    ``run-key.json``: checkpoints of the same key are kept to resume; those of another key are refused with
    :class:`~flowpin.errors.StaleCheckpointsError` naming what changed, or, as ``stale`` chooses (``archive``,
    ``discard``), set aside. Returns what was set aside, if anything. See the module docstring."""
    if stale not in STALE_CHOICES:
        raise ValueError(f"claim_run_dir: stale={stale!r} is not one of {', '.join(STALE_CHOICES)}")
    plain = json.loads(canonical_json(dict(parts)))  # compared as it is stored: lists, not tuples
    key = run_key(plain)
    ckpt_dir = run_dir / CHECKPOINTS_DIR
    previous = _read_run_key(run_dir / RUN_KEY_FILE)
    found = [] if previous is not None and previous.key == key else list_checkpoints(ckpt_dir)
    taken: StaleCheckpoints | None = None
    if found:
        if previous is None:
            changed = [f"unknown: no {RUN_KEY_FILE} beside them names what they were trained from"]
        elif previous.parts is None:
            changed = [f"unknown: {previous.unknown}"]
        else:
            changed = key_changes(previous.parts, plain) or [f"{RUN_KEY_FILE}: its digest does not match its parts"]
        prefix = "unknown" if previous is None or previous.key is None else previous.key[:12]
        if stale == "refuse":
            names = found[0].path.name + ("" if len(found) == 1 else f" .. {found[-1].path.name}")
            raise StaleCheckpointsError(
                f"{ckpt_dir}: {len(found)} checkpoint(s) ({names}) were trained under another run key; changed: "
                f"{'; '.join(changed)}. They are kept, not resumed. To resume them, restore the recipe, data and "
                f"code they were trained from; to start over, run again with {STALE_CHECKPOINTS_ENV}=archive "
                f"(moves them to {run_dir / STALE_DIR / prefix}/) or {STALE_CHECKPOINTS_ENV}=discard (deletes them)"
            )
        taken = _set_aside(run_dir, found, changed, stale, prefix)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / RUN_KEY_FILE, canonical_json({"key": key, "parts": plain}) + b"\n")
    return taken


@dataclasses.dataclass(frozen=True)
class _StoredKey:
    key: str | None
    parts: dict[str, Any] | None
    unknown: str
    """Why ``parts`` is ``None``."""


def _read_run_key(path: Path) -> _StoredKey | None:
    """The run key stored in ``path`` (``None``: there is none); a regular file only (a FIFO would hang here)."""
    if not path.exists():
        return None
    raw = read_regular(path, max_bytes=MAX_STATE_BYTES, what="run key", fix="move it aside or delete it")
    try:
        doc = loads_strict(raw, where=str(path), max_bytes=MAX_STATE_BYTES)
    except StrictJSONError as exc:
        return _StoredKey(key=None, parts=None, unknown=f"{RUN_KEY_FILE} is unreadable ({exc})")
    key = doc.get("key") if isinstance(doc, dict) else None
    key = key if isinstance(key, str) else None
    parts = doc.get("parts") if isinstance(doc, dict) else None
    if isinstance(parts, dict):
        return _StoredKey(key=key, parts=parts, unknown="")
    if key is not None:
        older = f"{RUN_KEY_FILE} was written by an older flowpin: it holds the key's digest, not its parts"
        return _StoredKey(key=key, parts=None, unknown=older)
    return _StoredKey(key=None, parts=None, unknown=f"{RUN_KEY_FILE} holds no run key")


def _set_aside(
    run_dir: Path, found: Sequence[CheckpointRef], changed: Sequence[str], choice: str, prefix: str
) -> StaleCheckpoints:
    """Archive (move to ``stale/<prefix>/``) or discard the checkpoints directory, with the log and key file
    of the run that wrote it."""
    pieces = [run_dir / CHECKPOINTS_DIR, run_dir / METRICS_FILE, run_dir / RUN_KEY_FILE]
    archive: str | None = None
    if choice == "archive":
        target = run_dir / STALE_DIR / prefix
        n = 1
        while target.exists():
            n += 1
            target = run_dir / STALE_DIR / f"{prefix}-{n}"
        target.mkdir(parents=True)
        for piece in pieces:
            if piece.exists():
                os.replace(piece, target / piece.name)
        archive = target.relative_to(run_dir).as_posix()
    else:
        shutil.rmtree(pieces[0])
        for piece in pieces[1:]:
            piece.unlink(missing_ok=True)
    return StaleCheckpoints(
        choice=choice, checkpoints=tuple(c.path.name for c in found), changed=tuple(changed), archive=archive
    )


def key_changes(old: Mapping[str, Any], new: Mapping[str, Any], *, limit: int = 12) -> list[str]:
    """What differs between two run keys' parts, one phrase each, at most ``limit`` (then ``N more``).

    ``code: <path> changed`` (or ``added``, ``removed``) for each code file, then ``<dotted key>: <old> -> <new>``
    for every other leaf, in key order; long values are shortened.
    """
    changes: list[str] = []
    old_code, new_code = old.get("code"), new.get("code")
    if isinstance(old_code, Mapping) and isinstance(new_code, Mapping):
        for path in sorted(set(old_code) | set(new_code)):
            if path not in old_code:
                changes.append(f"code: {path} added")
            elif path not in new_code:
                changes.append(f"code: {path} removed")
            elif old_code[path] != new_code[path]:
                changes.append(f"code: {path} changed")
    elif old_code != new_code:
        changes.append("code: changed")
    before = _leaves({k: v for k, v in old.items() if k != "code"})
    after = _leaves({k: v for k, v in new.items() if k != "code"})
    for name in sorted(set(before) | set(after)):
        if before.get(name, _ABSENT) != after.get(name, _ABSENT):
            changes.append(f"{name}: {_shown(before.get(name, _ABSENT))} -> {_shown(after.get(name, _ABSENT))}")
    if len(changes) > limit:
        changes = [*changes[:limit], f"{len(changes) - limit} more"]
    return changes


_ABSENT = object()


def _leaves(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, item in value.items():
        if isinstance(item, Mapping) and item:
            out.update(_leaves(item, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = item
    return out


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "(none)"
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= 40 else text[:36] + "..."


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
    if (run_dir / CHECKPOINTS_DIR).exists() and list_checkpoints(run_dir / CHECKPOINTS_DIR):
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
