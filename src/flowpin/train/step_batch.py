"""Which data a training step saw: what ``flowpin batch`` answers for a training run.

Steps count as metrics, the tracker and checkpoint names count them: training step ``N`` is the ``N``-th
optimizer step (1-based), and checkpoint ``step-000050`` holds the state after 50 steps, its
``data.next_step`` the position of the next batch. The loop (:func:`flowpin.train.loop.train`) draws step
``N``'s batch at data position ``N - 1 + offset`` of its order, ``offset = data.next_step - step`` of any
checkpoint of the run: 0 for a run trained from its first step (a resume continues the position), the fork
step's negative for a fork that started a new order there (``_starting_state`` in the loop). A fork's steps
up to its fork step are its parent's, and are asked of the parent.

The order is the training recipe's, its one owner: ``train.order_seed`` and ``train.loop.batch_size`` over
the dataset ``paths.inputs.data.data`` (keyed by its sha256 directory digest, :mod:`flowpin.data.order`).

Data parallel: every rank draws the same global batch and trains on the rows
:func:`flowpin.train.loop.rank_rows` gives it. The world size is what the run's checkpoint records
(``determinism.data_parallel_world_size``; absent means one process). For step ``N`` the checkpoint read is
the first one at or after ``N``: a run resumes only from a checkpoint, so the process that wrote it is the
one that trained step ``N``, under the settings (world size included) that it recorded.

Trust: a training manifest is verified (signature by a trusted key) before anything is read; the dataset
digest it pins is checked against the directory (by :func:`flowpin.data.order.order_for`), and the
checkpoint ``state.json`` it reads must be the one the manifest pins. A checkpoint directory named directly
is no signed record: its ``state.json`` is read with the strict reader
(:func:`flowpin.train.checkpoint.read_state`) and reported UNVERIFIED unless a signed manifest
(``manifests/*.json``, or a fork's ``<run>/manifest.json``) pins that very file.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowpin.constants import CHECKPOINT_NAME, MANIFEST_DIR, RUN_MANIFEST
from flowpin.data.order import BatchTarget, batch_target, dataset_dir_target, manifest_dataset, order_digest
from flowpin.display import safe
from flowpin.errors import DataOrderError, FlowpinError
from flowpin.manifest.statement import entry_files

if TYPE_CHECKING:
    from flowpin.manifest.statement import Manifest
    from flowpin.train.checkpoint import TrainState

POST_TRAINING_STAGES = ("sft", "dpo", "rlvr")
"""Stages whose batches follow their own orders over tasks, pairs or prompts (not a tokenized dataset)."""
SUPPORTED = (
    "name a training manifest (manifests/pretrain.json, midtrain.json, longctx.json or a fork's manifest.json), "
    "one of its checkpoint directories (runs/pretrain/checkpoints/step-000050), a tokenize manifest or a "
    "tokenized dataset directory"
)
WORLD_SIZE_KEY = "data_parallel_world_size"
"""Where a checkpoint's ``determinism`` records the number of data-parallel ranks (absent: one)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunCheckpoint:
    """One checkpoint of a run, and the digest of its ``state.json`` that a signed manifest pins."""

    step: int
    """Optimizer steps done when it was saved."""
    path: Path
    """The checkpoint directory."""
    name: str
    """How it is shown (the manifest's subject name, or the directory as given)."""
    state_pin: tuple[str, str] | None
    """(algorithm, hex) of its ``state.json`` in a signed manifest; ``None``: nothing signed vouches for it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingTarget:
    """A training run as ``flowpin batch`` sees it: its dataset, its order and its checkpoints."""

    source: str
    """What was named: the manifest or the checkpoint directory."""
    kind: str
    """``training manifest`` or ``checkpoint``."""
    stage: str | None
    """The manifest's stage (``None`` for a checkpoint no signed manifest pins)."""
    trust: str
    """One line on what was verified (printed as it is, escaped)."""
    dataset: BatchTarget
    """The tokenized dataset the run trained on (with the digest a signed manifest pins for it, if any)."""
    order_seed: int
    """``train.order_seed``."""
    batch_size: int
    """``train.loop.batch_size``: the global batch (all ranks)."""
    steps: int
    """The last training step answered: ``train.loop.steps``, or a checkpoint's own step."""
    checkpoints: tuple[RunCheckpoint, ...]
    """The run's checkpoints (by step) that record its data position and world size."""
    root: Path
    """The project root the names are relative to."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepData:
    """Where one training step drew its batch from."""

    step: int
    """The training step (1-based)."""
    position: int
    """Its data position: the order's step (``step - 1 + offset``)."""
    offset: int
    """``data.next_step - step`` of the run's checkpoints."""
    first_step: int
    """The run's own first step (1, or a fork's fork step + 1)."""
    world_size: int
    """Data-parallel ranks that shared the batch."""
    world_size_from: str
    """Where the world size came from (a checkpoint's state.json, or ``--world-size``)."""
    dataset_digest: str
    """sha256 directory digest the run's order is keyed by (the checkpoint's; equal to any pinned one)."""
    checkpoint: str
    """The checkpoint whose state gave the offset and world size."""


def resolve_target(path: Path, root: Path, *, data: Path | None = None) -> TrainingTarget | BatchTarget:
    """What ``path`` names: a training run (manifest or checkpoint directory) or a tokenized dataset.

    A manifest is verified (signature by a trusted key) before anything else is read; then its recipe
    decides: ``train.order_seed`` makes it a training manifest, ``tokenize`` a tokenize manifest, anything
    else (a post-training stage, a data stage) is refused with :class:`DataOrderError`. A directory holding
    ``state.json`` is a checkpoint; ``data`` names the dataset it was trained on when no signed manifest
    pins the checkpoint. Any other directory is a tokenized dataset, a ``.yaml`` a tokenize recipe.
    """
    from flowpin.manifest.trust import verify_loaded
    from flowpin.train.checkpoint import STATE_FILE

    if path.is_dir():
        if (path / STATE_FILE).exists():
            return checkpoint_target(path, root, data=data)
        if any((child / STATE_FILE).is_file() for child in path.glob("step-*")):
            raise DataOrderError(
                f"{safe(path)} holds a run's checkpoints; name one of them (step-NNNNNN) or the run's manifest"
            )
        return dataset_dir_target(path, root)
    if path.suffix in (".yaml", ".yml"):
        return batch_target(path, root)
    verified = verify_loaded(path, root=root, check="signature", purpose="read batches from it")
    m = verified.manifest
    if _training_plan(m) is not None:
        return manifest_target(m, keyid=verified.keyid, root=root)
    if isinstance(m.recipe, dict) and isinstance(m.recipe.get("tokenize"), dict):
        return manifest_dataset(m, root)
    raise DataOrderError(_unsupported(m))


def manifest_target(m: Manifest, *, keyid: str, root: Path) -> TrainingTarget:
    """The training run a verified training manifest records (signature checked by the caller)."""
    from flowpin.paths import resolve_inside
    from flowpin.train.checkpoint import STATE_FILE

    plan = _training_plan(m)
    if plan is None:
        raise DataOrderError(_unsupported(m))
    data_name, order_seed, batch_size, steps = plan
    dataset = _pinned_dataset(m, data_name, root)
    checkpoints = []
    for subject in m.subjects:
        match = CHECKPOINT_NAME.fullmatch(subject["name"].rsplit("/", 1)[-1])
        if match is None:
            continue
        files = entry_files(subject)
        pin = files.get(STATE_FILE) if isinstance(files, dict) else None
        checkpoints.append(
            RunCheckpoint(
                step=int(match.group(1)),
                path=resolve_inside(subject["name"], root),
                name=subject["name"],
                state_pin=(m.algorithm, pin) if isinstance(pin, str) else None,
            )
        )
    if not checkpoints:
        raise DataOrderError(
            f"{safe(m.path)}: pins no checkpoint (step-NNNNNN); its checkpoints record the run's data position "
            "and world size -- name a manifest of a finished training run"
        )
    return TrainingTarget(
        source=str(m.path),
        kind="training manifest",
        stage=m.stage,
        trust=f"VERIFIED: signed by {keyid[:16]}…, trusted in keys/; {data_name} is checked against the digest it pins",
        dataset=dataset,
        order_seed=order_seed,
        batch_size=batch_size,
        steps=steps,
        checkpoints=tuple(sorted(checkpoints, key=lambda c: c.step)),
        root=root,
    )


def checkpoint_target(path: Path, root: Path, *, data: Path | None = None) -> TrainingTarget:
    """The run a checkpoint directory belongs to, up to that checkpoint's step.

    ``state.json`` is read with the strict reader. The dataset is the one named by the signed manifest
    that pins this checkpoint (``manifests/*.json``, or ``<run>/manifest.json`` for a fork), or ``data``.
    """
    from flowpin.train.checkpoint import STATE_FILE

    state, raw = _read_state(path)
    found = _pinning_manifest(path, root)
    stage: str | None = None
    pin: tuple[str, str] | None = None
    dataset: BatchTarget | None = None
    if isinstance(found, str):
        trust = f"UNVERIFIED: checkpoint state.json is not signed ({found})"
    else:
        m, keyid, subject = found
        stage = m.stage
        plan = _training_plan(m)
        if plan is None:
            raise DataOrderError(_unsupported(m, what=f"{safe(path)}, a checkpoint of {safe(_shown(m.path, root))},"))
        files = entry_files(subject)
        want = files.get(STATE_FILE) if isinstance(files, dict) else None
        if isinstance(want, str) and _hash(raw, m.algorithm) == want:
            pin = (m.algorithm, want)
            trust = (
                f"checkpoint state.json is not a signed record; it is the copy {_shown(m.path, root)} pins "
                f"(signed by {keyid[:16]}…, trusted in keys/)"
            )
        else:
            trust = (
                f"UNVERIFIED: checkpoint state.json is not signed, and it is not the copy {_shown(m.path, root)} pins "
                "(it changed since the run was recorded)"
            )
        dataset = _pinned_dataset(m, plan[0], root) if data is None else None
    if data is not None:
        dataset = dataset_dir_target(data, root)
    if dataset is None:
        raise DataOrderError(
            f"{safe(path)}: no signed manifest names the dataset this checkpoint was trained on; pass --data DIR, "
            f"the tokenized dataset (its digest must be the checkpoint's sha256:{safe(state.data.dataset_digest)})"
        )
    where = f"{safe(path)}/state.json"
    step = _int(state.step, f"{where}: step", 0)
    return TrainingTarget(
        source=str(path),
        kind="checkpoint",
        stage=stage,
        trust=trust,
        dataset=dataset,
        order_seed=_int(state.data.order_seed, f"{where}: data.order_seed", 0),
        batch_size=_int(state.data.batch_size, f"{where}: data.batch_size", 1),
        steps=step,
        checkpoints=(RunCheckpoint(step=step, path=path, name=str(path), state_pin=pin),),
        root=root,
    )


def step_data(target: TrainingTarget, step: int, *, world_size: int | None = None) -> StepData:
    """Where training step ``step`` (1-based) of ``target`` drew its batch; ``world_size`` overrides the
    recorded one. Refuses (:class:`DataOrderError`) a step outside the run, or one its parent trained."""
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= target.steps:
        if target.kind == "checkpoint":
            what, fix = f"it holds the state after {target.steps} steps", "; for a later one name a later checkpoint"
        else:
            what, fix = f"the run's train.loop.steps is {target.steps}", ""
        raise DataOrderError(
            f"--step {step}: training steps count from 1 (step N is the N-th optimizer step, as metrics and "
            f"checkpoint names count) and {safe(target.source)} answers steps 1..{target.steps} ({what}) -- pass a "
            f"step in that range{fix}"
        )
    ckpt = next((c for c in target.checkpoints if c.step >= step), None)
    if ckpt is None:
        raise DataOrderError(
            f"--step {step}: {safe(target.source)} pins no checkpoint at or after step {step}; its checkpoints "
            "record the run's data position -- name a manifest of a finished run"
        )
    state, raw = _read_state(ckpt.path)
    if ckpt.state_pin is not None:
        algorithm, want = ckpt.state_pin
        if _hash(raw, algorithm) != want:
            raise DataOrderError(
                f"{safe(ckpt.name)}/state.json is not the file the signed manifest pins ({algorithm} "
                f"{safe(want[:16])}…); the checkpoint changed since the run was recorded -- restore it (dvc "
                "checkout) or re-run the stage"
            )
    elif target.kind == "training manifest":  # a manifest that pins no digest of the file: re-hash the checkpoint
        from flowpin.manifest.trust import load_verified, require_digests

        m = load_verified(Path(target.source), root=target.root, check="signature", purpose="read batches from it")
        require_digests(m, [ckpt.name], root=target.root, purpose="read the run's data position from it")
    where = f"{safe(ckpt.name)}/state.json"
    done = _int(state.step, f"{where}: step", 0)
    next_step = _int(state.data.next_step, f"{where}: data.next_step", 0)
    order = (state.data.order_seed, state.data.batch_size)
    if order != (target.order_seed, target.batch_size):
        raise DataOrderError(
            f"{where}: trained on order seed {safe(order[0])}, batch size {safe(order[1])}, but "
            f"{safe(target.source)} gives seed {target.order_seed}, batch size {target.batch_size}; the checkpoint "
            "is not this run's -- restore the run's checkpoints"
        )
    pinned_digest = order_digest(target.dataset)
    if pinned_digest is not None and pinned_digest != state.data.dataset_digest:
        raise DataOrderError(
            f"{where}: trained on dataset sha256:{safe(state.data.dataset_digest)}, but {safe(target.source)} pins "
            f"{safe(target.dataset.name)} as sha256:{pinned_digest}; the checkpoint is not this run's -- restore "
            "the run's checkpoints"
        )
    first = 1
    if state.parent is not None:
        first = _int(state.parent.step, f"{where}: parent.step", 0) + 1
        if step < first:
            raise DataOrderError(
                f"--step {step}: {safe(target.source)} is a fork of a run at step {first - 1}; steps 1..{first - 1} "
                "were trained by the parent run -- ask the parent's manifest or checkpoint for them"
            )
    offset = next_step - done
    position = step - 1 + offset
    if position < 0:
        raise DataOrderError(
            f"{where}: step {done} at data position {next_step} puts training step {step} at position {position}; "
            "the state is inconsistent -- restore the checkpoint"
        )
    recorded = _recorded_world_size(state, where, step)
    if world_size is None and isinstance(recorded, str):
        raise DataOrderError(recorded)
    return StepData(
        step=step,
        position=position,
        offset=offset,
        first_step=first,
        world_size=world_size if world_size is not None else int(recorded),
        world_size_from="--world-size" if world_size is not None else f"recorded in {ckpt.name}/state.json",
        dataset_digest=state.data.dataset_digest,
        checkpoint=ckpt.name,
    )


def sample_ranks(batch_size: int, world_size: int, where: str) -> list[int]:
    """The data-parallel rank that trained each sample of a global batch (:func:`flowpin.train.loop.rank_rows`)."""
    if batch_size % world_size:
        raise DataOrderError(
            f"world size {world_size} ({where}) does not divide the batch of {batch_size} sequences; the loop "
            f"splits the global batch evenly -- pass a --world-size that divides {batch_size}"
        )
    if world_size == 1:  # rank_rows(B, 0, 1) is every row; and no need to import torch for it
        return [0] * batch_size
    from flowpin.train.loop import rank_rows

    ranks = [0] * batch_size
    for rank in range(world_size):
        for i in range(batch_size)[rank_rows(batch_size, rank, world_size)]:
            ranks[i] = rank
    return ranks


# --- helpers ---------------------------------------------------------------------------------------


def _training_plan(m: Manifest) -> tuple[str, int, int, int] | None:
    """(dataset name, order seed, batch size, steps) of a training recipe; ``None`` if it is none."""
    recipe = m.recipe
    train = recipe.get("train") if isinstance(recipe, dict) else None
    if not isinstance(train, dict) or "order_seed" not in train:
        return None
    where = f"{safe(m.path)}: recipe"
    loop = train.get("loop")
    paths = recipe.get("paths")
    inputs = paths.get("inputs") if isinstance(paths, dict) else None
    data = inputs.get("data") if isinstance(inputs, dict) else None
    name = data.get("data") if isinstance(data, dict) else None
    if not isinstance(loop, dict) or not isinstance(name, str):
        raise DataOrderError(
            f"{where} has no train.loop or paths.inputs.data.data; it is not a training recipe flowpin batch "
            f"can follow -- {SUPPORTED}"
        )
    return (
        name,
        _int(train["order_seed"], f"{where} train.order_seed", 0),
        _int(loop.get("batch_size"), f"{where} train.loop.batch_size", 1),
        _int(loop.get("steps"), f"{where} train.loop.steps", 1),
    )


def _pinned_dataset(m: Manifest, name: str, root: Path) -> BatchTarget:
    """The dataset ``name`` with the digest ``m`` pins for it (a dependency of kind ``dataset``)."""
    from flowpin.manifest.trust import pinned
    from flowpin.paths import resolve_inside

    dep = next((d for d in m.dependencies_of("dataset") if d["name"] == name), None)
    if dep is None:
        raise DataOrderError(
            f"{safe(m.path)}: pins no dataset {safe(name)} (its recipe's paths.inputs.data.data); the run's data "
            "cannot be checked -- re-run the stage to record it"
        )
    return BatchTarget(data_dir=resolve_inside(name, root), name=name, pinned=pinned(dep))


def _unsupported(m: Manifest, *, what: str | None = None) -> str:
    """Why ``flowpin batch`` refuses ``m`` (or ``what``, something ``m`` records), and what it takes."""
    stage, what = m.stage, what if what is not None else safe(m.path)
    if stage in POST_TRAINING_STAGES:
        return (
            f"{what} is of the post-training stage {safe(stage)!r}: its batches follow its own order over tasks, "
            f"preference pairs or prompts, not a tokenized dataset, and flowpin batch does not describe them -- "
            f"{SUPPORTED}"
        )
    return f"{what} is of a {safe(stage)!r} stage, neither a training nor a tokenize one -- {SUPPORTED}"


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the project root when it lies inside (as a user names it)."""
    try:
        return path.absolute().relative_to(root.absolute()).as_posix()
    except ValueError:
        return str(path)


def _read_state(path: Path) -> tuple[TrainState, bytes]:
    """A checkpoint's state (the strict reader) and the very bytes it was parsed from."""
    from flowpin.safeio import read_regular
    from flowpin.train.checkpoint import MAX_STATE_BYTES, STATE_FILE, read_state

    fix = "restore the checkpoint (dvc checkout) or re-run the stage"
    try:
        raw = read_regular(path / STATE_FILE, max_bytes=MAX_STATE_BYTES, what="checkpoint state", fix=fix)
    except FileNotFoundError as exc:
        raise DataOrderError(
            f"{safe(path)}/{STATE_FILE}: missing; the run's checkpoints record its data position and world size "
            f"-- {fix}"
        ) from exc
    except OSError as exc:
        raise DataOrderError(f"{safe(path)}/{STATE_FILE}: cannot read ({exc.strerror or exc}) -- {fix}") from exc
    state = read_state(path, verify_files=False)
    if state.source is None or state.source.state_sha256 != hashlib.sha256(raw).hexdigest():
        raise DataOrderError(f"{safe(path)}/{STATE_FILE} changed while it was read; run the command again")
    return state, raw


def _pinning_manifest(path: Path, root: Path) -> tuple[Manifest, str, dict[str, Any]] | str:
    """The signed manifest that pins checkpoint ``path`` (with its keyid and subject), or why there is none."""
    from flowpin.manifest.statement import load_manifest
    from flowpin.manifest.trust import check_signature
    from flowpin.paths import to_name
    from flowpin.signing import load_trust_store

    try:
        name = to_name(path.absolute(), root)
    except FlowpinError:
        return "it lies outside the repository, where no manifest pins it"
    candidates = [path.parent.parent / RUN_MANIFEST, *sorted((root / MANIFEST_DIR).glob("*.json"))]
    unsigned: list[str] = []
    trusted = None
    for candidate in candidates:
        if not candidate.is_file():
            continue
        try:
            m = load_manifest(candidate)
        except FlowpinError:
            continue  # not a manifest flowpin can read: it pins nothing
        subject = next((s for s in m.subjects if s["name"] == name), None)
        if subject is None:
            continue
        trusted = load_trust_store(root) if trusted is None else trusted
        try:
            keyid = check_signature(m, trusted, purpose="rely on it for this checkpoint")
        except FlowpinError:
            unsigned.append(_shown(candidate, root))
            continue
        return m, keyid, subject
    if unsigned:
        return f"{', '.join(unsigned)} names it but is not signed by a trusted key"
    return "no signed manifest in manifests/ pins this checkpoint"


def _recorded_world_size(state: TrainState, where: str, step: int) -> int | str:
    """The world size the state records for ``step``, or why it cannot say."""
    value = state.determinism.get(WORLD_SIZE_KEY, 1) if isinstance(state.determinism, dict) else 1
    world = _int(value, f"{where}: determinism.{WORLD_SIZE_KEY}", 1)
    for entry in state.determinism_changes:
        at = entry.get("step") if isinstance(entry, dict) else None
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(at, int) or at < step or not isinstance(changes, list):
            continue
        if any(isinstance(c, str) and c.startswith(WORLD_SIZE_KEY + ":") for c in changes):
            return (
                f"{where}: the run was resumed at step {at} under another data-parallel world size, so step {step} "
                f"ran under a world size this checkpoint does not record -- name the run's manifest or its first "
                f"checkpoint at or after step {step}, or pass --world-size"
            )
    return world


def _int(value: object, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataOrderError(
            f"{where}: {safe(repr(value))} is not an integer >= {minimum}; the record is damaged -- restore it"
        )
    return value


def _hash(raw: bytes, algorithm: str) -> str:
    from flowpin.hashing import hash_bytes

    return hash_bytes(raw, algorithm)


__all__ = [
    "POST_TRAINING_STAGES",
    "RunCheckpoint",
    "StepData",
    "TrainingTarget",
    "checkpoint_target",
    "manifest_target",
    "resolve_target",
    "sample_ranks",
    "step_data",
]
