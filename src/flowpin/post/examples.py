"""Packed examples: post-training data as one int64 tensor, its digest, seeded batches and the response loss.

A post-training stage packs what it trains on into ``[N, rows, T]`` int64 (ids and loss masks, rows in pairs:
:func:`flowpin.post.prompts.pack_example`): SFT's ``[N, 2, T]`` worked solutions (:func:`solution_examples`),
DPO's ``[N, 4, T]`` chosen and rejected sides (:func:`flowpin.post.dpo.pair_examples`). The tensor's digest
(:func:`tensor_digest`) keys a :class:`~flowpin.data.order.DataOrder` over it, so the batch at any step is a
pure function of the step (:class:`ExampleBatches`, a :class:`~flowpin.train.loop.BatchSource`) and a killed
run resumes through the loop like any other.

:func:`response_loss` is the mean next-token cross entropy over the response tokens of a ``[B, 2, T]``
batch: SFT's objective, and (teacher-forced, on held-out tasks) the solution loss every post-training stage
reports (:func:`flowpin.post.heldout.solution_loss`). Prompt and padding positions carry no weight and no
gradient; :func:`used_width` cuts the trailing padding first, which changes nothing a causal model computes
for the earlier positions.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import torch

from flowpin.canonical import canonical_json
from flowpin.data.order import DataOrder
from flowpin.data.synth import Task
from flowpin.errors import DataError
from flowpin.post.lm import token_logprobs
from flowpin.post.prompts import Vocab, pack_example
from flowpin.post.verifiers import verify


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


def solution_examples(tasks: Sequence[Task], vocab: Vocab, *, seq_len: int, key: str = "sft.seq_len") -> torch.Tensor:
    """``[N, 2, seq_len]``: each task's prompt and worked solution packed, the mask on the solution and EOS.

    A solution that does not verify (:func:`flowpin.post.verifiers.verify`) or does not fit ``seq_len`` (the
    recipe's ``key``) is refused, never truncated.
    """
    rows = []
    for task in tasks:
        if not verify(task, task.solution):
            raise DataError(f"{task.id}: its solution does not verify against its answer; rerun the synth stage")
        rows.append(
            pack_example(
                vocab.prompt_ids(task.prompt),
                vocab.response_ids(task.solution),
                seq_len=seq_len,
                pad_id=vocab.pad_id,
                where=f"{key} ({task.id})",
            )
        )
    return torch.stack(rows)


def response_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross entropy over the response tokens of ``batch`` ``[B, 2, T]`` (ids, loss mask), and their count.

    The training loop's ``loss_fn`` for SFT (:data:`flowpin.train.loop.LossFn`).
    """
    batch = batch[..., : used_width(batch)]
    ids, mask = batch[:, 0], batch[:, 1]
    weights = mask[:, 1:].to(torch.float32)  # token t+1 is predicted at position t
    tokens = weights.sum()
    if float(tokens) == 0:
        raise DataError("sft: a batch without response tokens; every example needs a non-empty response")
    loss = -(token_logprobs(model, ids) * weights).sum() / tokens
    return loss, {"response_tokens": float(tokens)}
