"""``flowpin batch``'s question and answer: which sequences, documents and text one training step saw, and on
which data-parallel rank.

A :class:`BatchQuery` names a target (a training manifest or checkpoint directory, whose run fixes the data
order; or a tokenized dataset, with an order seed and batch size) and a step. :func:`answer_batch_query` resolves
the target (:func:`flowpin.train.step_batch.resolve_target`, which verifies what a signed manifest pins),
checks every bound before the dataset is read (:func:`flowpin.data.order.check_batch_request`), and describes
the step's samples (:func:`flowpin.data.order.describe_samples`). :func:`render_batch` and :func:`batch_json` are
its text and JSON forms. Errors are :class:`~flowpin.errors.DataOrderError` naming the command-line flag.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowpin.display import safe
from flowpin.errors import DataOrderError

if TYPE_CHECKING:
    from flowpin.data.order import Sample


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchQuery:
    """What ``flowpin batch`` was asked (its arguments)."""

    path: Path
    """A training manifest, checkpoint directory, tokenize manifest or recipe, or tokenized dataset directory."""
    step: int
    """A training step (1-based) for a run; the order's step (0-based) for a dataset."""
    rank: int | None = None
    """Describe only this data-parallel rank's rows."""
    world_size: int | None = None
    """Data-parallel ranks sharing the batch (default: what the run records; 1 for a dataset)."""
    order_seed: int | None = None
    """A dataset target's order seed (refused for a run, which fixes its own)."""
    batch_size: int | None = None
    """A dataset target's batch size (refused for a run)."""
    data: Path | None = None
    """The dataset a checkpoint directory was trained on, when no signed manifest names it."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchAnswer:
    """The samples one step saw, and where they come from."""

    query: BatchQuery
    head: dict[str, Any]
    """Everything but the samples, as the JSON form carries it (target, trust, dataset, order, ranks...)."""
    samples: list[Sample]
    ranks: list[int]
    """The data-parallel rank of each position of the batch."""
    run: bool
    """A training run's step (True) or a dataset order's step (False)."""


def answer_batch_query(query: BatchQuery, *, root: Path) -> BatchAnswer:
    """Answer ``query`` in the project at ``root`` (see the module docstring)."""
    from flowpin.data.order import (
        MAX_DESCRIBED_TOKENS,
        BatchTarget,
        check_batch_request,
        describe_samples,
        order_digest,
        order_for,
    )
    from flowpin.data.tokenized import TokenizedDataset
    from flowpin.train.step_batch import resolve_target, sample_ranks, step_data

    q = query
    # Bounds before anything is read (the training step's lower bound, 1, once the target is known).
    check_batch_request(
        step=q.step, batch_size=1 if q.batch_size is None else q.batch_size, names=("--step", "--batch-size")
    )
    for flag, value, minimum in (("--rank", q.rank, 0), ("--world-size", q.world_size, 1)):
        if value is not None and value < minimum:
            raise DataOrderError(f"{flag}: {value} must be >= {minimum}; pass a value of {minimum} or more")
    target = resolve_target(q.path, root, data=q.data)
    if isinstance(target, BatchTarget):
        missing = [f for f, v in (("--order-seed", q.order_seed), ("--batch-size", q.batch_size)) if v is None]
        if missing:
            raise DataOrderError(
                f"{safe(q.path)}: a tokenized dataset has no data order of its own (the training recipe owns it: "
                f"train.order_seed, train.loop.batch_size); pass {' and '.join(missing)}, or name a training "
                "manifest (flowpin batch manifests/pretrain.json --step N) to see what a training step saw"
            )
        if q.data is not None:
            raise DataOrderError("--data: only for a checkpoint directory; leave it out")
        assert q.order_seed is not None and q.batch_size is not None  # checked above (missing)
        dataset, seed, size, position = target, q.order_seed, q.batch_size, q.step
        world = 1 if q.world_size is None else q.world_size
        world_from = "--world-size" if q.world_size is not None else "default: one process"
        head: dict[str, Any] = {"kind": "dataset", "stage": None, "step_counting": "order step, 0-based"}
        trust = (
            f"VERIFIED: {q.path} is signed by a trusted key; {target.name} is checked against the digest it pins"
            if target.pinned is not None
            else f"UNPINNED: {target.name} is read as it is (no signed manifest named)"
        )
        where = None
    else:
        if q.data is not None and target.kind != "checkpoint":
            raise DataOrderError(
                f"--data: {safe(target.source)} names its dataset; --data is for a checkpoint directory"
            )
        for flag, value in (("--order-seed", q.order_seed), ("--batch-size", q.batch_size)):
            if value is not None:
                raise DataOrderError(
                    f"{flag}: {safe(target.source)} fixes the order (train.order_seed {target.order_seed}, "
                    f"train.loop.batch_size {target.batch_size}); leave it out, or name the tokenized dataset "
                    f"({safe(target.dataset.name)}) to see another order"
                )
        where = step_data(target, q.step, world_size=q.world_size)
        dataset, seed, size, position = target.dataset, target.order_seed, target.batch_size, where.position
        world, world_from, trust = where.world_size, where.world_size_from, target.trust
        head = {
            "kind": target.kind,
            "stage": target.stage,
            "step_counting": "training step, 1-based (the N-th optimizer step)",
            "offset": where.offset,
            "first_step": where.first_step,
            "last_step": target.steps,
            "checkpoint": where.checkpoint,
        }
    ranks = sample_ranks(size, world, world_from)
    rows = None
    if q.rank is not None:
        if q.rank >= world:
            raise DataOrderError(
                f"--rank {q.rank}: the run has {world} data-parallel rank(s), 0..{world - 1} ({world_from}); "
                "pass a rank in that range (or --world-size W to see how W ranks split the batch)"
            )
        rows = slice(ranks.index(q.rank), len(ranks) - ranks[::-1].index(q.rank))
    data = TokenizedDataset.open(dataset.data_dir)
    described = size if rows is None else rows.stop - rows.start
    if where is not None and described * data.seq_len > MAX_DESCRIBED_TOKENS:
        raise DataOrderError(
            f"step {q.step}: {described} sequences x {data.seq_len} tokens is more than the {MAX_DESCRIBED_TOKENS} "
            "tokens one batch description may hold; describe it in parts: --rank R (with --world-size W)"
        )
    names = ("--step", "--batch-size")
    check_batch_request(step=position, batch_size=described, seq_len=data.seq_len, names=names)  # before hashing
    order = order_for(
        data,
        order_seed=seed,
        batch_size=size,
        dataset_digest=order_digest(dataset) if where is None else where.dataset_digest,
    )
    samples = describe_samples(data, order, position, rows=rows)
    head = {
        "target": str(q.path),
        **head,
        "trust": trust,
        "dataset": dataset.name,
        "dataset_digest": order.dataset_digest,
        "n_sequences": data.n_sequences,
        "seq_len": data.seq_len,
        "order_seed": seed,
        "batch_size": size,
        "step": q.step,
        "position": position,
        "epoch": order.epoch(position),
        "world_size": world,
        "world_size_from": world_from,
        "rank": q.rank,
    }
    return BatchAnswer(query=q, head=head, samples=samples, ranks=ranks, run=where is not None)


def batch_json(answer: BatchAnswer) -> str:
    """The JSON form: the head, and every sample in full (untruncated text, the rank of each)."""
    shown = [{**s.to_json(), "rank": answer.ranks[s.position]} for s in answer.samples]
    return json.dumps({**answer.head, "samples": shown}, indent=2, sort_keys=True)


def render_batch(answer: BatchAnswer, *, width: int) -> str:
    """The text form: run, trust, dataset, order and ranks, then each sample (text cut at ``width``), escaped."""
    h = answer.head
    size, position, world = h["batch_size"], h["position"], h["world_size"]
    first = position * size
    lines = []
    if answer.run:
        lines.append(f"run      {answer.query.path} [{h['stage'] or 'no signed manifest names its stage'}]")
    lines += [
        f"trust    {h['trust']}",
        f"dataset  {h['dataset']}  sha256:{h['dataset_digest'][:16]}…  "
        f"({h['n_sequences']} sequences x {h['seq_len']} tokens)",
    ]
    span = f"positions {first}..{first + size - 1}, epoch {h['epoch']}"
    if not answer.run:
        lines.append(
            f"order    seed {h['order_seed']}, batch size {size}, step {position} (the order's, 0-based): {span}"
        )
    else:
        lines.append(
            f"order    seed {h['order_seed']}, batch size {size}: training step {h['step']} (1-based) = data position "
            f"{position} (offset {h['offset']}): {span}"
        )
    shown_ranks = "every row on rank 0" if world == 1 else f"{size // world} rows per rank"
    lines.append(f"ranks    world size {world} ({h['world_size_from']}): {shown_ranks}")
    if h["rank"] is not None:
        lines[-1] += f"; showing rank {h['rank']}'s rows"
    for s in answer.samples:
        lines.append(f"[{s.position}] sequence {s.sequence}  (epoch {s.epoch}, rank {answer.ranks[s.position]})")
        for d in s.documents:
            lines.append(
                f"     {d.id}  [doc {d.document}] tokens {d.doc_start}..{d.doc_end} -> positions {d.start}..{d.end}"
            )
        if s.pad_tokens:
            lines.append(f"     <pad> x {s.pad_tokens}")
        text = s.text if len(s.text) <= width else s.text[:width] + "…"
        lines.append(f"     text {json.dumps(text, ensure_ascii=False)}")
    return "\n".join(safe(line) for line in lines)


__all__ = ["BatchAnswer", "BatchQuery", "answer_batch_query", "batch_json", "render_batch"]
