"""Stage 9, supervised fine-tuning: prompt -> worked solution, the loss on the response tokens only.

This module owns what SFT adds to the training engine (:mod:`flowpin.train.run`):

* **Examples.** Every training task of the recipe's kinds becomes ``[2, seq_len]`` ids + loss mask
  (:func:`flowpin.post.prompts.pack_example`: the prompt and a newline, the worked solution, EOS); an
  example longer than ``seq_len`` is refused, never truncated. The packed tensor's digest keys the data
  order (:func:`tensor_digest`), so the batch at any step is a pure function of the step
  (:class:`ExampleBatches`) and a killed run resumes through the loop like any other.
* **Loss.** Mean next-token cross entropy over the response tokens of the batch (:func:`sft_loss`):
  prompt and padding positions carry no gradient and no weight.
* **Held-out eval** (:func:`heldout_eval`), before (the long-context checkpoint) and after the stage, on
  the first tasks of each held-out kind: pass@1 of greedy decoding (temperature 0, stop at EOS or a
  newline) graded by :func:`flowpin.data.synth.verify_answer`, how many answers have the ``Answer: N``
  form, and the teacher-forced cross entropy of the reference solutions. DPO reports the same.

The run key (``runs/sft/run-key.json``, see :func:`flowpin.train.run.open_run`) names the loop config, the
examples' digest, the order seed, the initial weights' digest and the stage's code (``claim``): checkpoints
of any other setup are refused rather than resumed, unless the user chose to archive or discard them.

The pieces DPO reuses live here too (one place, one behaviour): the held-out eval, batches over packed
examples, the upstream checkpoint and tokenizer helpers, and the report fields both stages share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowpin.canonical import canonical_json
from flowpin.constants import METRICS_FILE
from flowpin.data.order import DataOrder
from flowpin.data.synth import Task, extract_answer, load_tasks, verify_answer
from flowpin.data.tokenize import TokenizedDataset
from flowpin.errors import CheckpointCorruptError, CheckpointMissingError, DataError, RecipeError
from flowpin.post.lm import SamplingConfig, generate, token_logprobs
from flowpin.post.prompts import Vocab, pack_example
from flowpin.recipe import check_int
from flowpin.tracking import Tracker
from flowpin.train.checkpoint import CheckpointRef, latest_checkpoint
from flowpin.train.distributed import DistInfo
from flowpin.train.loop import TrainConfig, TrainResult
from flowpin.train.run import OpenRun, RunClaim, open_run, read_metrics, read_model_config, train_loop
from flowpin.train.transformer import ModelConfig

TASK_KINDS = ("arithmetic", "word_problem")
"""The synth generators whose tasks post-training uses (:data:`flowpin.data.synth.GENERATORS`)."""


# --- config ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldoutEvalConfig:
    """Greedy pass@1 and solution loss on held-out tasks (the ``eval`` block of the SFT and DPO recipes)."""

    kinds: tuple[str, ...] = ("arithmetic",)
    """Held-out task kinds to grade, each reported on its own."""
    tasks: int = 100
    """The first this many held-out tasks of each kind."""
    max_new_tokens: int = 48
    """Tokens generated at most per answer (a worked solution is at most ~40)."""
    batch_size: int = 64
    """Prompts decoded together (speed only; part of the recipe since batching may move the last bits)."""

    def __post_init__(self) -> None:
        check_kinds(self.kinds, "eval.kinds")
        check_int(self.tasks, "eval.tasks", minimum=1)
        check_int(self.max_new_tokens, "eval.max_new_tokens", minimum=1, maximum=4096)
        check_int(self.batch_size, "eval.batch_size", minimum=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """The ``sft`` block of ``params/sft.yaml`` (the architecture comes from the init run's ``model.json``)."""

    loop: TrainConfig
    """Steps, batch size (examples per step), seed, optimizer and schedule, clipping, cadence."""
    order_seed: int
    """Seed of the example order (with the examples' digest and the batch size it fixes every batch)."""
    seq_len: int
    """Tokens per packed example; an example that does not fit is an error (raise it)."""
    kinds: tuple[str, ...] = TASK_KINDS
    """Training task kinds (all their train tasks are used)."""
    eval: HeldoutEvalConfig = dataclasses.field(default_factory=HeldoutEvalConfig)
    """Held-out pass@1 and solution loss before and after the stage."""
    threads: int = 2
    """torch intra-op threads (recorded: a different count can change results bitwise)."""

    def __post_init__(self) -> None:
        check_int(self.order_seed, "sft.order_seed", minimum=0, maximum=2**53 - 1)
        check_int(self.seq_len, "sft.seq_len", minimum=2, maximum=1 << 20)
        check_kinds(self.kinds, "sft.kinds")
        check_int(self.threads, "sft.threads", minimum=1, maximum=1024)


def check_kinds(kinds: Sequence[str], key: str) -> None:
    """Recipe validation: a non-empty list of distinct task kinds from :data:`TASK_KINDS`."""
    if not kinds:
        raise RecipeError(f"{key}: empty; name at least one of {', '.join(TASK_KINDS)}")
    for kind in kinds:
        if kind not in TASK_KINDS:
            raise RecipeError(f"{key}: {kind!r} is not one of {', '.join(TASK_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise RecipeError(f"{key}: {list(kinds)} names a kind twice; list each once")


# --- shared by the post-training stages -------------------------------------------------------------


def open_vocab(tokenizer_dir: Path) -> Vocab:
    """The pretraining tokenizer (``data/tokenize``) with its EOS and padding ids."""
    data = TokenizedDataset.open(tokenizer_dir)
    return Vocab(tokenizer=data.tokenizer(), eos_id=int(data.eos_id), pad_id=int(data.pad_id))


def tasks_of(split_dir: Path, kinds: Sequence[str]) -> list[Task]:
    """The tasks of ``split_dir`` whose kind is in ``kinds``, in dataset order (none: :class:`DataError`)."""
    tasks = [t for t in load_tasks(split_dir) if t.kind in kinds]
    if not tasks:
        raise DataError(f"{split_dir}: no task of kind {', '.join(kinds)}; rerun the synth stage or fix the kinds")
    return tasks


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
    path = checkpoint / "state.json"
    try:
        digest = json.loads(path.read_bytes())["files"]["model.safetensors"]["sha256"]
    except FileNotFoundError as exc:
        raise CheckpointMissingError(f"{path}: missing; the checkpoint is incomplete (rerun its stage)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointCorruptError(f"{path}: no model.safetensors digest ({exc!r}); rerun its stage") from exc
    if not isinstance(digest, str):
        raise CheckpointCorruptError(f"{path}: model.safetensors digest {digest!r} is not a string; rerun its stage")
    return digest


def check_fits(model_cfg: ModelConfig, vocab: Vocab, seq_len: int, where: Path) -> None:
    """Refuse a tokenizer the model was not sized for, or examples longer than its context."""
    size = vocab.tokenizer.get_vocab_size(with_added_tokens=True)
    if model_cfg.vocab_size != size:
        raise DataError(
            f"{where / 'model.json'}: vocab_size {model_cfg.vocab_size}, but the tokenizer has {size} tokens; "
            "post-train with the tokenizer the upstream run was trained with (paths.inputs.tokenizer)"
        )
    if seq_len > model_cfg.max_sequence_length:
        raise RecipeError(
            f"seq_len: {seq_len} exceeds the model's context {model_cfg.max_sequence_length} ({where}); lower it"
        )


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of an int64 tensor's shape and little-endian bytes (keys a data order over packed examples)."""
    t = tensor.detach().cpu().contiguous().to(torch.int64)
    h = hashlib.sha256(canonical_json({"dtype": "int64-le", "shape": list(t.shape)}))
    h.update(t.numpy().astype("<i8", copy=False).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ExampleBatches:
    """A :class:`~flowpin.train.loop.BatchSource` over packed examples ``[N, rows, T]``: step -> ``[B, rows, T]``."""

    examples: torch.Tensor
    order: DataOrder

    def __call__(self, step: int) -> torch.Tensor:
        return self.examples[torch.tensor(self.order.batch(step), dtype=torch.long)]


def example_batches(examples: torch.Tensor, *, order_seed: int, batch_size: int) -> ExampleBatches:
    """Seeded batches over ``examples`` (every example once per epoch, a fresh shuffle each epoch)."""
    order = DataOrder(
        n_sequences=int(examples.shape[0]),
        dataset_digest=tensor_digest(examples),
        order_seed=order_seed,
        batch_size=batch_size,
    )
    return ExampleBatches(examples=examples, order=order)


def used_width(ids_and_masks: torch.Tensor) -> int:
    """Columns up to the last response token of any row (``[B, rows, T]``, odd rows masks): the rest is padding.

    Cutting the trailing padding changes nothing a causal model computes for the earlier positions.
    """
    masks = ids_and_masks[:, 1::2]
    columns = masks.reshape(-1, masks.shape[-1]).any(dim=0).nonzero()
    return int(columns.max()) + 1 if columns.numel() else 1


def heldout_eval(
    model: torch.nn.Module, tasks: Sequence[Task], vocab: Vocab, cfg: HeldoutEvalConfig, *, max_len: int
) -> dict[str, Any]:
    """Per kind (first ``cfg.tasks`` of each): greedy pass@1, answers in the ``Answer: N`` format, and the
    teacher-forced cross entropy of the reference solutions' tokens (a smoother signal than pass@1)."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    stop = [vocab.eos_id, *vocab.newline_ids()]
    out: dict[str, Any] = {}
    for kind in cfg.kinds:
        chosen = [t for t in tasks if t.kind == kind][: cfg.tasks]
        if not chosen:
            raise DataError(f"eval.kinds: the held-out set has no {kind!r} task; rerun the synth stage")
        texts: list[str] = []
        for start in range(0, len(chosen), cfg.batch_size):
            part = chosen[start : start + cfg.batch_size]
            prompts = [vocab.prompt_ids(t.prompt) for t in part]
            rows = generate(model, prompts, cfg=sampling, stop_ids=stop, pad_id=vocab.pad_id, max_len=max_len)
            texts += [answer_text(vocab, row) for row in rows]
        correct = [verify_answer(t, text) for t, text in zip(chosen, texts, strict=True)]
        out[kind] = {
            "tasks": len(chosen),
            "correct": sum(correct),
            "pass_at_1": sum(correct) / len(chosen),
            "formatted": sum(extract_answer(text) is not None for text in texts),
            "response_loss": response_loss(model, chosen, vocab, max_len=max_len, batch_size=cfg.batch_size),
            "examples": [
                {"id": t.id, "output": text, "answer": t.answer, "correct": ok}
                for t, text, ok in list(zip(chosen, texts, correct, strict=True))[:3]
            ],
        }
    return out


def response_loss(
    model: torch.nn.Module, tasks: Sequence[Task], vocab: Vocab, *, max_len: int, batch_size: int
) -> float:
    """Mean cross entropy of the reference solutions' tokens (and EOS) after their prompts, teacher-forced."""
    width = max(len(vocab.prompt_ids(t.prompt)) + len(vocab.response_ids(t.solution)) for t in tasks)
    examples = sft_examples(tasks, vocab, seq_len=min(width, max_len))
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0.0
    try:
        with torch.no_grad():
            for start in range(0, examples.shape[0], batch_size):
                part = examples[start : start + batch_size]
                loss, metrics = sft_loss(model, part)
                total += float(loss) * metrics["response_tokens"]
                tokens += metrics["response_tokens"]
    finally:
        model.train(was_training)
    return total / tokens


def answer_text(vocab: Vocab, ids: Sequence[int]) -> str:
    """A generated answer as text: up to EOS, its first line, stripped."""
    return vocab.decode(ids).split("\n", 1)[0].strip()


# --- SFT ------------------------------------------------------------------------------------------


def sft_examples(tasks: Sequence[Task], vocab: Vocab, *, seq_len: int) -> torch.Tensor:
    """``[N, 2, seq_len]``: each task's prompt and worked solution packed, the mask on the solution and EOS."""
    rows = []
    for task in tasks:
        if not verify_answer(task, task.solution):
            raise DataError(f"{task.id}: its solution does not verify against its answer; rerun the synth stage")
        rows.append(
            pack_example(
                vocab.prompt_ids(task.prompt),
                vocab.response_ids(task.solution),
                seq_len=seq_len,
                pad_id=vocab.pad_id,
                where=f"sft.seq_len ({task.id})",
            )
        )
    return torch.stack(rows)


def sft_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross entropy over the response tokens of ``batch`` ``[B, 2, T]`` (ids, loss mask)."""
    batch = batch[..., : used_width(batch)]
    ids, mask = batch[:, 0], batch[:, 1]
    weights = mask[:, 1:].to(torch.float32)  # token t+1 is predicted at position t
    tokens = weights.sum()
    if float(tokens) == 0:
        raise DataError("sft: a batch without response tokens; every example needs a non-empty response")
    loss = -(token_logprobs(model, ids) * weights).sum() / tokens
    return loss, {"response_tokens": float(tokens)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PostResult:
    """What a post-training stage produced: its checkpoints, extra subjects and report."""

    checkpoints: tuple[CheckpointRef, ...]
    outputs: tuple[Path, ...]
    """Files besides the checkpoints that the manifest pins (DPO's pairs)."""
    report: dict[str, Any]


def run_sft(
    cfg: SFTConfig,
    *,
    synth_dir: Path,
    tokenizer_dir: Path,
    init_dir: Path,
    run_dir: Path,
    dist: DistInfo,
    tracker: Tracker | None = None,
    claim: RunClaim | None = None,
) -> PostResult:
    """Fine-tune the latest checkpoint of ``init_dir`` on ``synth_dir/train`` into ``run_dir``.

    ``claim``: the run key's code and the choice for stale checkpoints (:func:`flowpin.train.run.open_run`).
    """
    vocab = open_vocab(tokenizer_dir)
    model_cfg = read_model_config(init_dir)
    check_fits(model_cfg, vocab, cfg.seq_len, init_dir)
    examples = sft_examples(tasks_of(synth_dir / "train", cfg.kinds), vocab, seq_len=cfg.seq_len)
    heldout = tasks_of(synth_dir / "heldout", cfg.eval.kinds)
    batches = example_batches(examples, order_seed=cfg.order_seed, batch_size=cfg.loop.batch_size)
    init = init_checkpoint(init_dir, "init")
    opened = open_run(
        model_cfg=model_cfg,
        seed=cfg.loop.seed,
        threads=cfg.threads,
        run_dir=run_dir,
        init_dir=init_dir,
        dist=dist,
        claim=claim,
        key={
            "stage": "sft",
            "loop": cfg.loop.to_json(),
            "order_seed": cfg.order_seed,
            "examples": batches.order.dataset_digest,
            "init_weights": weights_digest(init.path),
        },
    )
    model, max_len = opened.model, model_cfg.max_sequence_length
    before = heldout_eval(model, heldout, vocab, cfg.eval, max_len=max_len)
    result = train_loop(model, cfg.loop, batches=batches, loss_fn=sft_loss, run_dir=run_dir, dist=dist, tracker=tracker)
    after = heldout_eval(model, heldout, vocab, cfg.eval, max_len=max_len)
    report = {
        **run_report(opened, result, run_dir, ("loss",)),
        "examples": {
            "count": int(examples.shape[0]),
            "packed_digest": batches.order.dataset_digest,
            "kinds": list(cfg.kinds),
        },
        "epochs": cfg.loop.steps * cfg.loop.batch_size / int(examples.shape[0]),
        "heldout": {"before": before, "after": after},
    }
    return PostResult(checkpoints=result.checkpoints, outputs=(), report=report)


def run_report(opened: OpenRun, result: TrainResult, run_dir: Path, curves: Sequence[str]) -> dict[str, Any]:
    """The part of a post-training report every stage shares (init, resume, steps, metric curves)."""
    rows = read_metrics(run_dir / METRICS_FILE)
    report: dict[str, Any] = {
        "init": None if opened.init is None else {"checkpoint": opened.init.path.name, "step": opened.init.step},
        "determinism": opened.determinism,
        "resumed_from": None if result.resumed_from is None else result.resumed_from.name,
        "removed_stale_checkpoints": opened.removed,
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
