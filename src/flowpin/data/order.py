"""Exact data order: which packed sequences make up the batch at any training step.

The order is a pure function of ``(dataset digest, order seed, batch size, step)`` and the number of
sequences, computable for any step without replaying the steps before it:

* sample ``i`` of step ``s`` sits at stream position ``p = s * batch_size + i``;
* its epoch is ``e = p // n_sequences`` and its offset in that epoch ``p % n_sequences``;
* epoch ``e`` visits the sequences in the order of :func:`epoch_permutation`, a permutation seeded by
  ``sha256(canonical_json({"dataset", "epoch", "scheme", "seed"}))`` -- so every epoch is a fresh
  shuffle, every sequence appears exactly once per epoch, and epochs wrap (no step is "out of range").

The permutation is ``argsort`` (stable) of ``n`` raw 64-bit outputs of numpy's ``PCG64`` bit generator
seeded through ``SeedSequence``. Both are covered by numpy's stream-compatibility promise (NEP 19),
whereas ``Generator.permutation``/``shuffle`` may change between numpy releases; the stable sort makes
even a (vanishingly rare) tie between two raw keys deterministic.

The dataset digest is the sha256 *directory digest* (:func:`flowpin.data.tokenized.dataset_digest`) of
the tokenize stage's output directory -- the digest its manifest pins as the subject -- so the order
changes whenever the data, the tokenizer or the packing does, and a batch can only be recovered against
the exact bytes it was drawn from. This module also answers "what is in this batch" (:func:`describe_batch`),
gives the training loop its token tensor (:func:`load_batch`), and resolves the *dataset* ``flowpin batch``
is pointed at (:func:`batch_target`: a tokenize manifest, a tokenize recipe or a tokenized directory). It
reads the dataset through :mod:`flowpin.data.tokenized`, which knows nothing of orders.

The order's parameters belong to the run that follows it: a training recipe's ``train.order_seed`` and
``train.loop.batch_size`` (the tokenize recipe fixes none). Which order step a *training* step drew, and on
which data-parallel rank, is :mod:`flowpin.train.step_batch`'s question.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flowpin.canonical import canonical_json
from flowpin.data.tokenized import DIGEST_ALGORITHM, TokenizedDataset, dataset_digest
from flowpin.errors import DataOrderError, FlowpinError, InternalError

if TYPE_CHECKING:
    from flowpin.manifest.statement import Manifest

ORDER_SCHEME = "flowpin.order/v1"
"""Names the seed-derivation and permutation rule; part of every epoch's seed."""
MAX_POSITION = 2**53 - 1
"""Largest stream position (``step * batch_size + i``) the order answers (canonical JSON integers)."""

MAX_DESCRIBED_TOKENS = 1 << 24
"""Most tokens one :func:`describe_samples` call (``flowpin batch``) materialises: 16,777,216 tokens -- 64 MiB
of int32 ids plus as much of document indices, plus the decoded text -- e.g. 4,096 sequences of 4,096
tokens, a real pretraining step. A larger request is refused with :class:`DataOrderError` before any
work, instead of allocating batch_size x seq_len tokens and dying of a MemoryError."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


# --- the order ------------------------------------------------------------------------------------


def keyed_permutation(n: int, key: bytes) -> npt.NDArray[np.int64]:
    """A permutation of ``range(n)`` that depends only on ``n`` and ``key`` (see the module docstring)."""
    if n < 0:
        raise InternalError(f"keyed_permutation: n must be >= 0, got {n}")
    entropy = int.from_bytes(hashlib.sha256(key).digest(), "big")
    raw = np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(n)
    return np.argsort(raw, kind="stable").astype(np.int64, copy=False)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DataOrderError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise DataOrderError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_digest(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise DataOrderError(
            f"dataset digest {value!r} is not a lower-case hex sha256; pass the sha256 directory digest of the "
            "tokenize output (the subject digest in manifests/tokenize.json)"
        )
    return value


def _epoch_key(dataset_digest: str, order_seed: int, epoch: int) -> bytes:
    return canonical_json({"dataset": dataset_digest, "epoch": epoch, "scheme": ORDER_SCHEME, "seed": order_seed})


@functools.lru_cache(maxsize=8)
def _cached_permutation(n_sequences: int, dataset_digest: str, order_seed: int, epoch: int) -> npt.NDArray[np.int64]:
    perm = keyed_permutation(n_sequences, _epoch_key(dataset_digest, order_seed, epoch))
    perm.flags.writeable = False  # shared by the cache: nobody may shuffle it in place
    return perm


def epoch_permutation(*, n_sequences: int, dataset_digest: str, order_seed: int, epoch: int) -> npt.NDArray[np.int64]:
    """The order in which epoch ``epoch`` visits the ``n_sequences`` sequences (a read-only array)."""
    n = _check_int(n_sequences, "n_sequences", 1)
    seed = _check_int(order_seed, "order_seed", 0)
    e = _check_int(epoch, "epoch", 0)
    if seed > MAX_POSITION or e > MAX_POSITION:
        raise DataOrderError(f"order_seed and epoch must be at most {MAX_POSITION}")
    return _cached_permutation(n, _check_digest(dataset_digest), seed, e)


def batch_indices(*, n_sequences: int, dataset_digest: str, order_seed: int, batch_size: int, step: int) -> list[int]:
    """Sequence indices of the batch at ``step``: sample ``i`` is stream position ``step * batch_size + i``.

    Pure: the same arguments always give the same list, on any machine, without replaying earlier
    steps. Raises :class:`DataOrderError` for a negative step, ``batch_size < 1``, ``n_sequences < 1``
    or a digest that is not a sha256 hex string.
    """
    return _positions_to_sequences(
        n_sequences=n_sequences,
        dataset_digest=dataset_digest,
        order_seed=order_seed,
        batch_size=batch_size,
        step=step,
    )[0]


def _positions_to_sequences(
    *, n_sequences: int, dataset_digest: str, order_seed: int, batch_size: int, step: int
) -> tuple[list[int], list[int]]:
    """(sequence index, epoch) of every sample of ``step``."""
    n = _check_int(n_sequences, "n_sequences", 1)
    b = _check_int(batch_size, "batch_size", 1)
    s = _check_int(step, "step", 0)
    seed = _check_int(order_seed, "order_seed", 0)
    digest = _check_digest(dataset_digest)
    first = s * b
    if first + b - 1 > MAX_POSITION or seed > MAX_POSITION:
        raise DataOrderError(
            f"step {s} with batch_size {b} (or order seed {seed}) is beyond position {MAX_POSITION}; "
            "no training run is that long"
        )
    positions = np.arange(first, first + b, dtype=np.int64)
    epochs = positions // n
    offsets = positions % n
    out = np.empty(b, dtype=np.int64)
    for epoch in np.unique(epochs).tolist():
        mask = epochs == epoch
        out[mask] = _cached_permutation(n, digest, seed, int(epoch))[offsets[mask]]
    return [int(x) for x in out], [int(x) for x in epochs]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataOrder:
    """The global order over one tokenized dataset for one (seed, batch size). Validated on construction."""

    n_sequences: int
    """Packed sequences in the dataset (``index.json`` ``n_sequences``)."""
    dataset_digest: str
    """sha256 directory digest of the tokenized dataset (:func:`flowpin.data.tokenized.dataset_digest`)."""
    order_seed: int
    """The order seed (a training recipe's ``train.order_seed``)."""
    batch_size: int
    """Sequences per step."""

    def __post_init__(self) -> None:
        _check_int(self.n_sequences, "n_sequences", 1)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.order_seed, "order_seed", 0)
        _check_digest(self.dataset_digest)

    def batch(self, step: int) -> list[int]:
        """Sequence indices of the batch at ``step`` (see :func:`batch_indices`)."""
        return batch_indices(
            n_sequences=self.n_sequences,
            dataset_digest=self.dataset_digest,
            order_seed=self.order_seed,
            batch_size=self.batch_size,
            step=step,
        )

    def epoch(self, step: int) -> int:
        """The epoch of the first sample of ``step``."""
        return _check_int(step, "step", 0) * self.batch_size // self.n_sequences

    @property
    def steps_per_epoch(self) -> float:
        """``n_sequences / batch_size`` (an epoch need not end on a step boundary)."""
        return self.n_sequences / self.batch_size


def order_for(
    data: TokenizedDataset, *, order_seed: int, batch_size: int, dataset_digest: str | None = None
) -> DataOrder:
    """The :class:`DataOrder` of ``data``; a given ``dataset_digest`` (e.g. a manifest's) must match it."""
    digest = dataset_digest
    actual = data.digest()
    if digest is not None and _check_digest(digest) != actual:
        raise DataOrderError(
            f"{data.path} has directory digest sha256:{actual}, but the order was asked for dataset "
            f"sha256:{digest}; the data changed since it was pinned (rerun the tokenize stage or restore the "
            "data, e.g. dvc checkout)"
        )
    return DataOrder(n_sequences=data.n_sequences, dataset_digest=actual, order_seed=order_seed, batch_size=batch_size)


# --- reading batches ------------------------------------------------------------------------------


def load_batch(data: TokenizedDataset, order: DataOrder, step: int) -> npt.NDArray[np.int32]:
    """The ``int32 [batch_size, seq_len]`` token ids of ``step`` (``torch.from_numpy`` shares it).

    ``order`` must have been made for ``data``: its sequence count and digest are checked (the digest
    of ``data`` is computed once per :class:`TokenizedDataset`).
    """
    if order.n_sequences != data.n_sequences or order.dataset_digest != data.digest():
        raise DataOrderError(
            f"the order was made for {order.n_sequences} sequences of dataset sha256:{order.dataset_digest}, "
            f"but {data.path} holds {data.n_sequences} sequences with digest sha256:{data.digest()}; "
            "build the DataOrder from this dataset"
        )
    input_ids, _ = data.sequences(order.batch(step))
    return input_ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class DocumentSpan:
    """The tokens of one source document inside one packed sequence."""

    document: int
    """Index in the dataset's document table (``documents.jsonl.zst``)."""
    id: str
    """The document's id (as the upstream record gave it; repeats share an id, not an index)."""
    source: Any
    """The upstream record's ``source`` field (``None`` when it had none)."""
    start: int
    """First position of the span in the sequence."""
    end: int
    """One past its last position."""
    doc_start: int
    """Offset of the span's first token within the document's tokens (its EOS is the last token)."""
    doc_end: int
    """One past the offset of its last token within the document."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of this span."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """One sample of a batch: which sequence, from which documents, and what it says."""

    position: int
    """Index of the sample within its batch."""
    sequence: int
    """Index of the packed sequence in the dataset."""
    epoch: int
    """The epoch this sample belongs to."""
    documents: tuple[DocumentSpan, ...]
    """The documents whose tokens the sequence holds, in sequence order."""
    pad_tokens: int
    """Padding tokens at the end (only in the last sequence of a ``tail: pad`` dataset)."""
    text: str
    """The sequence's tokens decoded (special tokens such as EOS shown; padding left out)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of this sample."""
        return {**dataclasses.asdict(self), "documents": [d.to_json() for d in self.documents]}


def describe_batch(
    data_dir: Path, *, order_seed: int, batch_size: int, step: int, dataset_digest: str | None = None
) -> list[Sample]:
    """What the batch at ``step`` holds: sequence indices, their source documents (ids + token spans), text.

    ``dataset_digest`` (sha256) is the digest the order is keyed by; when given (e.g. from the manifest)
    the directory is checked against it and a mismatch raises :class:`DataOrderError`; when omitted it
    is computed from ``data_dir``.
    """
    data = TokenizedDataset.open(data_dir)
    order = order_for(data, order_seed=order_seed, batch_size=batch_size, dataset_digest=dataset_digest)
    return describe_samples(data, order, step)


def check_batch_request(
    *, step: object, batch_size: object, seq_len: int | None = None, names: tuple[str, str] = ("step", "batch_size")
) -> None:
    """Refuse, before any work, a step or batch size that :func:`describe_samples` cannot answer.

    ``step`` must be an integer >= 0 and ``batch_size`` >= 1; with ``seq_len`` known, ``batch_size * seq_len``
    must be at most :data:`MAX_DESCRIBED_TOKENS`. ``names`` are what the messages call the two (e.g. the
    command line's ``--step``, ``--batch-size``). Raises :class:`DataOrderError`.
    """
    step_name, size_name = names
    for name, key, value, minimum in ((step_name, "step", step, 0), (size_name, "batch_size", batch_size, 1)):
        at = "" if name == key else f"{name}: "
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise DataOrderError(f"{at}{key} {value!r} is not an integer; pass a whole number")
        if value < minimum:
            what = "steps count from 0" if minimum == 0 else "a batch holds at least one sequence"
            raise DataOrderError(
                f"{at}{key} must be >= {minimum}, got {value} ({what}); pass a value of {minimum} or more"
            )
    assert isinstance(batch_size, int | np.integer)  # checked above
    if seq_len is not None and int(batch_size) * seq_len > MAX_DESCRIBED_TOKENS:
        most = max(1, MAX_DESCRIBED_TOKENS // max(seq_len, 1))
        raise DataOrderError(
            f"{size_name}: {batch_size} sequences x {seq_len} tokens is more than the {MAX_DESCRIBED_TOKENS} tokens "
            f"one batch description may hold; pass a batch size of at most {most} (describe a large batch in parts)"
        )


def describe_samples(data: TokenizedDataset, order: DataOrder, step: int, *, rows: slice | None = None) -> list[Sample]:
    """:func:`describe_batch` for an opened dataset and its order (see :func:`order_for`).

    ``rows`` describes only those samples of the batch (e.g. one data-parallel rank's block,
    :func:`flowpin.train.loop.rank_rows`); each :class:`Sample` keeps its position in the whole batch.

    Bounded: :func:`check_batch_request` refuses a negative step and more than :data:`MAX_DESCRIBED_TOKENS`
    tokens (the rows described x seq_len) before anything is read.
    """
    picked = range(_check_int(order.batch_size, "batch_size", 1))[rows if rows is not None else slice(None)]
    if picked.step != 1 or not picked:
        raise DataOrderError(f"rows {rows} select no contiguous samples of a batch of {order.batch_size}")
    check_batch_request(step=step, batch_size=len(picked), seq_len=data.seq_len)
    if order.n_sequences != data.n_sequences:
        raise DataOrderError(
            f"the order covers {order.n_sequences} sequences, {data.path} holds {data.n_sequences}; "
            "build it with order_for(data, ...)"
        )
    every, every_epoch = _positions_to_sequences(
        n_sequences=order.n_sequences,
        dataset_digest=order.dataset_digest,
        order_seed=order.order_seed,
        batch_size=order.batch_size,
        step=step,
    )
    sequences, epochs = every[picked.start : picked.stop], every_epoch[picked.start : picked.stop]
    input_ids, doc_index = data.sequences(sequences)
    table = data.documents()
    tokenizer = data.tokenizer()
    samples: list[Sample] = []
    for i, (position, seq, epoch) in enumerate(zip(picked, sequences, epochs, strict=True)):
        docs_row = doc_index[i]
        spans: list[DocumentSpan] = []
        change = np.flatnonzero(np.diff(docs_row)) + 1
        starts = [0, *change.tolist()]
        ends = [*change.tolist(), len(docs_row)]
        for start, end in zip(starts, ends, strict=True):
            doc = int(docs_row[start])
            if doc < 0:
                continue  # padding
            entry = table[doc]
            first = seq * data.seq_len + start - entry.first_token
            spans.append(
                DocumentSpan(
                    document=doc,
                    id=entry.id,
                    source=entry.record.get("source"),
                    start=start,
                    end=end,
                    doc_start=first,
                    doc_end=first + (end - start),
                )
            )
        real = docs_row >= 0
        text = tokenizer.decode(input_ids[i][real].tolist(), skip_special_tokens=False)
        samples.append(
            Sample(
                position=position,
                sequence=seq,
                epoch=epoch,
                documents=tuple(spans),
                pad_tokens=int((~real).sum()),
                text=text,
            )
        )
    return samples


# --- what `flowpin batch` is pointed at -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchTarget:
    """A tokenized dataset, as a tokenize manifest, a tokenize recipe or its directory names it.

    It carries no order: the order seed and batch size are a training run's (``train.order_seed``,
    ``train.loop.batch_size``), given by a training manifest or checkpoint, or on the command line.
    """

    data_dir: Path
    """The tokenized dataset directory (absolute)."""
    name: str
    """Its repository-relative name (e.g. ``data/tokenize``), or the path as given outside the repository."""
    pinned: tuple[str, str] | None
    """(algorithm, digest) a signed manifest pins for the directory; ``None`` for a recipe or a directory."""


def batch_target(path: Path, root: Path) -> BatchTarget:
    """The tokenized dataset named by a tokenize manifest, a tokenize recipe or a directory.

    A manifest (``manifests/tokenize.json``) must be signed by a trusted key (``UnverifiedManifestError``
    otherwise); it gives the directory as the subject named by its recipe's ``paths.out`` and pins its
    digest, which :func:`order_for` checks against the directory (see :func:`order_digest`). A recipe
    (``params/tokenize.yaml``) gives ``paths.out``, a directory names itself; for both the digest is
    computed from the directory as it is.
    """
    from flowpin.manifest.trust import load_verified

    if path.is_dir():
        return dataset_dir_target(path, root)
    if path.suffix in (".yaml", ".yml"):
        return _target_from_recipe(path, root)
    # Signed by a trusted key first; the one digest relied on (the directory's) is checked by order_for.
    m = load_verified(path, root=root, check="signature", purpose="read batches from it")
    return manifest_dataset(m, root)


def dataset_dir_target(path: Path, root: Path) -> BatchTarget:
    """A tokenized dataset directory named directly (nothing pins it: its digest is what it holds now)."""
    from flowpin.paths import to_name

    try:
        name = to_name(path.absolute(), root)
    except FlowpinError:  # outside the repository: named as given
        name = str(path)
    return BatchTarget(data_dir=path.absolute(), name=name, pinned=None)


def manifest_dataset(m: Manifest, root: Path) -> BatchTarget:
    """The tokenized directory a tokenize manifest produced, with the digest it pins.

    Call it only on a manifest whose signature verified (:func:`flowpin.manifest.trust.load_verified`).
    """
    from flowpin.display import safe
    from flowpin.manifest.trust import pinned
    from flowpin.paths import resolve_inside

    recipe = m.recipe
    if not isinstance(recipe, dict) or not isinstance(recipe.get("tokenize"), dict):
        raise DataOrderError(
            f"{safe(m.path)} is a {safe(m.stage)!r} manifest, not a tokenize manifest; name a tokenize manifest "
            "(manifests/tokenize.json) or a training manifest (manifests/pretrain.json)"
        )
    paths = recipe.get("paths")
    out = paths.get("out") if isinstance(paths, dict) else None
    subjects = {s["name"]: s for s in m.subjects}
    subject = subjects.get(out) if isinstance(out, str) else None
    if subject is None:
        if len(subjects) != 1:
            raise DataOrderError(
                f"{safe(m.path)}: no subject named by paths.out ({safe(repr(out))}); is this a tokenize manifest?"
            )
        subject = next(iter(subjects.values()))
    name = subject["name"]
    return BatchTarget(data_dir=resolve_inside(name, root), name=name, pinned=pinned(subject))


def _target_from_recipe(path: Path, root: Path) -> BatchTarget:
    import yaml

    from flowpin.paths import resolve_inside

    try:
        recipe = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise DataOrderError(f"{path}: no such recipe; name params/tokenize.yaml or a tokenize manifest") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataOrderError(f"{path}: cannot read it as YAML ({exc})") from exc
    paths = recipe.get("paths") if isinstance(recipe, dict) else None
    out = paths.get("out") if isinstance(paths, dict) else None
    if not isinstance(out, str) or "${" in out:
        raise DataOrderError(
            f"{path}: paths.out must be a plain repository-relative path, got {out!r}; name the tokenized "
            "directory itself (e.g. data/tokenize) or its manifest"
        )
    return BatchTarget(data_dir=resolve_inside(out, root), name=out, pinned=None)


def order_digest(target: BatchTarget) -> str | None:
    """The sha256 digest to key the order by: the manifest's (checked later by :func:`describe_batch`)
    when it pinned sha256; for another algorithm the directory is checked against the pin here and its
    sha256 computed; ``None`` for a recipe (computed from the directory)."""
    if target.pinned is None:
        return None
    algorithm, digest = target.pinned
    if algorithm == DIGEST_ALGORITHM:
        return digest
    actual = dataset_digest(target.data_dir, algorithm=algorithm)
    if actual != digest:
        raise DataOrderError(
            f"{target.name} has {algorithm} digest {actual}, but the manifest pins {digest}; the data changed "
            "since the stage ran (restore it with dvc checkout or rerun the tokenize stage)"
        )
    return dataset_digest(target.data_dir)


__all__ = [
    "ORDER_SCHEME",
    "BatchTarget",
    "DataOrder",
    "DocumentSpan",
    "Sample",
    "batch_indices",
    "batch_target",
    "dataset_dir_target",
    "describe_batch",
    "describe_samples",
    "epoch_permutation",
    "keyed_permutation",
    "load_batch",
    "manifest_dataset",
    "order_digest",
    "order_for",
]
