"""Stage 5, tokenize: train a byte-level BPE tokenizer (or reuse one) and pack the corpus into sequences.

The stage composes three modules, one concept each: :mod:`flowpin.data.tokenizer` (the BPE tokenizer),
:mod:`flowpin.data.packing` (documents -> fixed-length sequences) and :mod:`flowpin.data.tokenized` (the
on-disk format, its writer and reader). What this module adds is the stage's own decisions:

* **Recipe.** :class:`TokenizeConfig` (``tokenize`` in ``params/tokenize.yaml``) holds the three
  components' configs and validates them on construction.
* **Training sample.** The tokenizer is trained on the corpus, or on a seeded sample of at most
  ``train_max_bytes`` of it: documents in the order of :func:`~flowpin.data.order.keyed_permutation`
  of the recipe's seed until the cap (the last one cut at a character boundary).
* **Reuse** (``tokenizer.source: input``). Later stages (mid-training, long-context) must share the
  pretraining vocabulary: instead of training, the stage copies ``tokenizer.json`` byte for byte from the
  tokenized dataset named by the stage input ``paths.inputs.tokenizer`` (pinned, with its manifest as a
  parent), after checking it against that dataset's ``index.json`` (sha256, vocab size, EOS/PAD ids) and
  against the recipe (special tokens in id order, EOS/PAD, ``vocab_size`` when given).
  :func:`check_tokenizer_source` refuses a recipe that trains *and* names a tokenizer input, or neither.
* **Report.** Counts and sizes (a DVC output, pure function of inputs and recipe) apart from wall-clock
  timing (run metadata).

The stage script (``stages/tokenize_corpus.py``) runs :func:`run_tokenize` single-threaded
(:func:`flowpin.data.tokenizer.tokenizers_single_threaded`); this module does not touch the environment.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from flowpin.canonical import canonical_json
from flowpin.constants import INDEX_NAME
from flowpin.data.order import keyed_permutation
from flowpin.data.packing import ENCODE_BATCH_DOCS, Packer, PackingConfig, encode_batch
from flowpin.data.shards import read_dataset
from flowpin.data.tokenized import TOKENIZER_NAME, SequenceShardsConfig, TokenizedDataset, TokenizedWriter
from flowpin.data.tokenizer import (
    TOKENIZER_ROLE,
    TokenizerConfig,
    special_id,
    special_tokens,
    tokenizer_bytes,
    train_tokenizer,
)
from flowpin.errors import DataError, EmptyCorpusError, RecipeError


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """The tokenize recipe (``tokenize`` in ``params/tokenize.yaml``). Validated on construction."""

    tokenizer: TokenizerConfig
    """The tokenizer to train or reuse."""
    packing: PackingConfig
    """Sequence length and tail policy."""
    shards: SequenceShardsConfig
    """Shard size and compression. (No data order here: the training recipe owns it, ``train.order_seed``
    and ``train.loop.batch_size``.)"""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "tokenize") -> None:
        """Raise :class:`RecipeError` naming the first invalid key (``tokenize.packing.seq_len`` ...)."""
        self.tokenizer.validate(f"{where}.tokenizer")
        self.packing.validate(f"{where}.packing")
        self.shards.validate(f"{where}.shards")


def check_tokenizer_source(cfg: TokenizeConfig, *, has_input: bool) -> None:
    """Refuse a recipe whose ``tokenizer.source`` disagrees with whether a tokenizer input is named.

    ``has_input``: the stage has the input role ``paths.inputs.tokenizer``. Train *and* an input, or
    reuse without one, is a :class:`RecipeError` naming the key to change.
    """
    source = cfg.tokenizer.source
    if source == "train" and has_input:
        raise RecipeError(
            f"tokenize.tokenizer.source: 'train' trains a new tokenizer, but paths.inputs.{TOKENIZER_ROLE} names "
            f"one to reuse; set tokenize.tokenizer.source: input to reuse it, or remove paths.inputs.{TOKENIZER_ROLE}"
        )
    if source == "input" and not has_input:
        raise RecipeError(
            f"paths.inputs.{TOKENIZER_ROLE}: missing, but tokenize.tokenizer.source is 'input'; name the tokenized "
            "dataset whose tokenizer to reuse ({data: data/tokenize, manifest: manifests/tokenize.json}) "
            "or set tokenize.tokenizer.source: train"
        )


def reuse_tokenizer(data_dir: Path, cfg: TokenizerConfig) -> tuple[Tokenizer, bytes]:
    """The tokenizer of the tokenized dataset ``data_dir`` and its exact ``tokenizer.json`` bytes.

    The file is checked against the dataset's ``index.json`` (sha256, vocab size, EOS/PAD ids:
    :class:`TokenizerError`/:class:`ShardError`) and against the recipe ``cfg`` (special tokens in id
    order, EOS/PAD tokens, ``vocab_size`` when given: :class:`RecipeError` naming the key).
    """
    data = TokenizedDataset.open(data_dir)
    tokenizer = data.tokenizer()
    where, at = "tokenize.tokenizer", data_dir / TOKENIZER_NAME
    actual = special_tokens(tokenizer)
    if actual != list(cfg.special_tokens):
        raise RecipeError(
            f"{where}.special_tokens: {list(cfg.special_tokens)}, but the reused {at} has {actual} (in id order); "
            "list exactly those: a model trained on that vocabulary knows no other"
        )
    for key, wanted, pinned in (
        ("eos_token", cfg.eos_token, data.index["eos_token"]),
        ("pad_token", cfg.pad_token, data.index["pad_token"]),
    ):
        if wanted != pinned:
            raise RecipeError(f"{where}.{key}: {wanted!r}, but {data_dir / INDEX_NAME} uses {pinned!r}; use it")
    if cfg.vocab_size is not None and cfg.vocab_size != data.vocab_size:
        raise RecipeError(
            f"{where}.vocab_size: {cfg.vocab_size}, but the reused {at} has {data.vocab_size} tokens; "
            "set it to that or leave it out"
        )
    return tokenizer, data.tokenizer_json


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeResult:
    """What :func:`run_tokenize` wrote."""

    documents: int
    """Documents read and packed."""
    tokens: int
    """Tokens produced (EOS included)."""
    sequences: int
    """Packed sequences written."""
    shards: int
    """Sequence shards written."""
    report: dict[str, Any]
    """The stage report (counts, sizes): a pure function of the inputs and the recipe."""
    timing: dict[str, Any]
    """Wall-clock seconds of tokenizer training and packing: run metadata (they vary between runs)."""


def _texts(corpus_dir: Path) -> Iterator[tuple[dict[str, Any], str]]:
    for i, record in enumerate(read_dataset(corpus_dir)):
        text, doc_id = record.get("text"), record.get("id")
        if not isinstance(text, str) or not isinstance(doc_id, str):
            raise DataError(
                f"{corpus_dir}: record {i} needs a string 'id' and 'text' (got id {doc_id!r}, text of type "
                f"{type(text).__name__}); the upstream stage wrote a malformed dataset"
            )
        yield record, text


def _training_sample(sizes: Sequence[int], cfg: TokenizerConfig) -> dict[int, int | None]:
    """Documents to train on → byte cap for each (``None``: all of it)."""
    if cfg.train_max_bytes is None or sum(sizes) <= cfg.train_max_bytes:
        return dict.fromkeys(range(len(sizes)))
    key = canonical_json({"purpose": "tokenizer-training-sample", "seed": cfg.seed})
    chosen: dict[int, int | None] = {}
    budget = cfg.train_max_bytes
    for i in keyed_permutation(len(sizes), key).tolist():
        if budget <= 0:
            break
        chosen[i] = None if sizes[i] <= budget else budget
        budget -= sizes[i]
    return chosen


def _training_texts(corpus_dir: Path, sample: dict[int, int | None]) -> Iterator[str]:
    for i, (_, text) in enumerate(_texts(corpus_dir)):
        if i in sample:
            cap = sample[i]
            # a capped document is cut at a character boundary (a split character is left out)
            yield text if cap is None else text.encode("utf-8")[:cap].decode("utf-8", errors="ignore")


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def run_tokenize(
    cfg: TokenizeConfig, corpus_dir: Path, out_dir: Path, *, tokenizer_dir: Path | None = None
) -> TokenizeResult:
    """Train the tokenizer on ``corpus_dir`` (a JSONL dataset), pack it, and write the dataset to ``out_dir``.

    With ``tokenizer.source: input`` the tokenizer of the tokenized dataset ``tokenizer_dir`` is reused
    instead (:func:`reuse_tokenizer`); ``tokenizer_dir`` must be given exactly then
    (:func:`check_tokenizer_source`). ``out_dir`` must be empty (the stage wraps it in
    :func:`~flowpin.atomic.atomic_directory`). Reads the corpus up to three times (sizes, training sample,
    packing) so memory stays bounded by one input shard, one output shard and the document table.
    """
    cfg.validate()
    check_tokenizer_source(cfg, has_input=tokenizer_dir is not None)
    if any(out_dir.iterdir()):
        raise DataError(f"{out_dir} is not empty; write the tokenized dataset into a fresh directory")
    sizes = [len(text.encode("utf-8")) for _, text in _texts(corpus_dir)]
    if not sizes:
        raise EmptyCorpusError(
            f"{corpus_dir} holds no document; check the upstream stage's report (did its recipe drop everything?)"
        )
    tcfg, pcfg = cfg.tokenizer, cfg.packing

    t0 = time.perf_counter()
    if tokenizer_dir is not None:
        tokenizer, tok_json = reuse_tokenizer(tokenizer_dir, tcfg)
        tok_report: dict[str, Any] = {"source": "input"}
    else:
        sample = _training_sample(sizes, tcfg)
        train_bytes = sum(sizes[i] if cap is None else min(cap, sizes[i]) for i, cap in sample.items())
        tokenizer = train_tokenizer(_training_texts(corpus_dir, sample), tcfg)
        tok_json = tokenizer_bytes(tokenizer)
        tok_report = {"source": "train", "train_documents": len(sample), "train_bytes": train_bytes}
    train_seconds = time.perf_counter() - t0
    writer = TokenizedWriter(out_dir, cfg.shards, seq_len=pcfg.seq_len)
    writer.write_tokenizer(tok_json, reused=tokenizer_dir is not None)
    eos_id, pad_id = special_id(tokenizer, tcfg.eos_token), special_id(tokenizer, tcfg.pad_token)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    n_documents = len(sizes)

    t0 = time.perf_counter()
    packer = Packer(seq_len=pcfg.seq_len, pad_id=pad_id)
    per_shard = cfg.shards.sequences_per_shard
    text_bytes = 0
    for batch in _batched(_texts(corpus_dir), ENCODE_BATCH_DOCS):
        encoded = encode_batch(tokenizer, [text for _, text in batch], eos_id=eos_id)
        for (record, text), ids in zip(batch, encoded, strict=True):
            first_token = packer.tokens
            number = packer.add(ids)
            nbytes = len(text.encode("utf-8"))
            text_bytes += nbytes
            writer.add_document(record, index=number, first_token=first_token, tokens=len(ids), nbytes=nbytes)
        if packer.pending_sequences >= per_shard:
            writer.add_sequences(packer.take(packer.pending_sequences // per_shard * per_shard))
    last, tail_tokens = packer.finish(pcfg.tail)
    writer.add_sequences(last)
    pack_seconds = time.perf_counter() - t0
    if packer.documents != n_documents:
        raise DataError(f"{corpus_dir} changed while it was read ({n_documents} then {packer.documents} documents)")
    sequences = writer.sequences
    if sequences == 0:
        raise EmptyCorpusError(
            f"{corpus_dir}: {n_documents} documents give {packer.tokens} tokens, fewer than one sequence of "
            f"tokenize.packing.seq_len={pcfg.seq_len}; lower seq_len or set tokenize.packing.tail=pad"
        )

    index = writer.finish(
        vocab_size=vocab_size,
        eos_id=eos_id,
        pad_id=pad_id,
        eos_token=tcfg.eos_token,
        pad_token=tcfg.pad_token,
        total_tokens=packer.tokens,
        tail=pcfg.tail,
        tail_tokens=tail_tokens,
    )
    text_tokens = packer.tokens - n_documents
    report: dict[str, Any] = {
        "documents": n_documents,
        "bytes": text_bytes,
        "tokens": {
            "total": packer.tokens,
            "eos": n_documents,
            "in_sequences": index["n_tokens"],
            "tail": tail_tokens,
            "tail_policy": pcfg.tail,
            "dropped": tail_tokens if pcfg.tail == "drop" else 0,
            "pad": index["tail"]["pad_tokens"],
        },
        "sequences": sequences,
        "seq_len": pcfg.seq_len,
        "shards": writer.shards,
        "vocab_size": vocab_size,
        "bytes_per_token": round(text_bytes / text_tokens, 4) if text_tokens else None,
        "tokenizer": {**tok_report, "sha256": index["tokenizer"]["sha256"]},
    }
    # Wall-clock measurements differ between runs: run metadata (the manifest's runDetails), never part of the
    # report, which is a DVC output whose digest dvc.lock pins.
    timing = {
        "tokenizer_train_seconds": round(train_seconds, 3),
        "pack_seconds": round(pack_seconds, 3),
        "pack_tokens_per_second": round(packer.tokens / pack_seconds) if pack_seconds > 0 else None,
    }
    return TokenizeResult(
        documents=n_documents,
        tokens=packer.tokens,
        sequences=sequences,
        shards=writer.shards,
        report=report,
        timing=timing,
    )


__all__ = [
    "TokenizeConfig",
    "TokenizeResult",
    "check_tokenizer_source",
    "reuse_tokenizer",
    "run_tokenize",
]
