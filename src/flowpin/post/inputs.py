"""What a post-training stage reads before it trains: its verifiable tasks and the upstream checkpoint.

SFT, DPO and RLVR (:mod:`flowpin.post.sft`, :mod:`~flowpin.post.dpo`, :mod:`~flowpin.post.rlvr`) and eval
(:mod:`flowpin.post.eval`) share these, one definition each:

* **Tasks.** :data:`TASK_KINDS` (the synth generators post-training uses; :func:`check_kinds` validates a
  recipe's list), :func:`split_tasks` (the tasks of a synth split whose kind is listed, in dataset order) and
  :func:`first_per_kind` (the first ``n`` tasks of each kind: what held-out pass@1 grades). The other two
  selections belong to one stage each: DPO's seeded sample (:func:`flowpin.post.dpo.sample_tasks`) and RLVR's
  filter (:func:`flowpin.post.rlvr.admitted_tasks`).
* **The upstream checkpoint.** :func:`init_checkpoint` (the latest complete one of ``paths.inputs.<role>``),
  :func:`weights_digest` (the sha256 of its weights, as its ``state.json`` records it: run keys pin it) and
  :func:`check_fits` (the tokenizer and the sequences fit the model the upstream stage trained).

The tokenizer itself comes from :func:`flowpin.post.prompts.open_vocab`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from flowpin.constants import MODEL_CONFIG
from flowpin.data.synth import Task, load_tasks
from flowpin.errors import CheckpointCorruptError, CheckpointMissingError, DataError, RecipeError
from flowpin.post.prompts import Vocab
from flowpin.train.checkpoint import MODEL_FILE, STATE_FILE, CheckpointRef, latest_checkpoint
from flowpin.train.transformer import ModelConfig

TASK_KINDS = ("arithmetic", "word_problem")
"""The synth generators whose tasks post-training uses (:data:`flowpin.data.synth.GENERATORS`)."""


def check_kinds(kinds: Sequence[str], key: str) -> None:
    """Recipe validation: a non-empty list of distinct task kinds from :data:`TASK_KINDS`."""
    if not kinds:
        raise RecipeError(f"{key}: empty; name at least one of {', '.join(TASK_KINDS)}")
    for kind in kinds:
        if kind not in TASK_KINDS:
            raise RecipeError(f"{key}: {kind!r} is not one of {', '.join(TASK_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise RecipeError(f"{key}: {list(kinds)} names a kind twice; list each once")


def split_tasks(split_dir: Path, kinds: Sequence[str]) -> list[Task]:
    """The tasks of ``split_dir`` whose kind is in ``kinds``, in dataset order (none: :class:`DataError`)."""
    tasks = [t for t in load_tasks(split_dir) if t.kind in kinds]
    if not tasks:
        raise DataError(f"{split_dir}: no task of kind {', '.join(kinds)}; rerun the synth stage or fix the kinds")
    return tasks


def first_per_kind(tasks: Sequence[Task], per_kind: int | None) -> list[Task]:
    """The first ``per_kind`` tasks of each kind, in their order (all of them when ``None``)."""
    if per_kind is None:
        return list(tasks)
    taken: dict[str, int] = {}
    out: list[Task] = []
    for task in tasks:
        if taken.get(task.kind, 0) < per_kind:
            taken[task.kind] = taken.get(task.kind, 0) + 1
            out.append(task)
    return out


def init_checkpoint(checkpoints_dir: Path, role: str) -> CheckpointRef:
    """The latest complete checkpoint of an upstream run (``paths.inputs.<role>``)."""
    ref = latest_checkpoint(checkpoints_dir)
    if ref is None:
        raise CheckpointMissingError(
            f"paths.inputs.{role}: {checkpoints_dir} holds no complete checkpoint; run the upstream stage first"
        )
    return ref


def weights_digest(checkpoint: Path) -> str:
    """sha256 of a checkpoint's ``model.safetensors`` as its ``state.json`` records it (run keys pin it)."""
    path = checkpoint / STATE_FILE
    try:
        digest = json.loads(path.read_bytes())["files"][MODEL_FILE]["sha256"]
    except FileNotFoundError as exc:
        raise CheckpointMissingError(f"{path}: missing; the checkpoint is incomplete (rerun its stage)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorruptError(f"{path}: no {MODEL_FILE} digest ({exc!r}); rerun its stage") from exc
    if not isinstance(digest, str):
        raise CheckpointCorruptError(f"{path}: {MODEL_FILE} digest {digest!r} is not a string; rerun its stage")
    return digest


def check_fits(model_cfg: ModelConfig, vocab: Vocab, seq_len: int, where: Path) -> None:
    """Refuse a tokenizer the model was not sized for, or examples longer than its context."""
    size = vocab.tokenizer.get_vocab_size(with_added_tokens=True)
    if model_cfg.vocab_size != size:
        raise DataError(
            f"{where / MODEL_CONFIG}: vocab_size {model_cfg.vocab_size}, but the tokenizer has {size} tokens; "
            "post-train with the tokenizer the upstream run was trained with (paths.inputs.tokenizer)"
        )
    if seq_len > model_cfg.max_sequence_length:
        raise RecipeError(
            f"seq_len: {seq_len} exceeds the model's context {model_cfg.max_sequence_length} ({where}); lower it"
        )
