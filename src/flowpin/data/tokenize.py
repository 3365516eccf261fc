"""Stage 5, tokenize: train a byte-level BPE tokenizer (or reuse one) and pack the corpus into sequences.

This module owns the tokenized dataset format -- writing it byte-reproducibly and reading it back with
every check -- and the two computations behind it:

* **Tokenizer.** A byte-level BPE (HF ``tokenizers``) trained on the corpus, or on a seeded sample of
  at most ``train_max_bytes`` of it. The BPE trainer draws no random numbers: word and pair counts are
  exact and ties are broken by token id, so the result depends only on the training text. Measured with
  tokenizers 0.23.3: ``RAYON_NUM_THREADS`` 1/2/8/16 and ``TOKENIZERS_PARALLELISM`` on/off gave
  byte-identical ``tokenizer.json`` at every vocab size tried; training still runs single-threaded
  (``TOKENIZERS_PARALLELISM=false`` for the call only) so the result cannot hinge on that finding.
  Special tokens come first (ids ``0..k-1``, recipe order). Documents are encoded with
  ``encode_special_tokens`` on, so a literal ``<|endoftext|>`` inside a document is encoded as text and
  can never fake a document boundary.
* **Reuse** (``tokenizer.source: input``). Later stages (mid-training, long-context) must share the
  pretraining vocabulary: instead of training, the stage copies ``tokenizer.json`` byte for byte from the
  tokenized dataset named by the stage input ``paths.inputs.tokenizer`` (pinned, with its manifest as a
  parent), after checking it against that dataset's ``index.json`` (sha256, vocab size, EOS/PAD ids) and
  against the recipe (special tokens in id order, EOS/PAD, ``vocab_size`` when given).
  :func:`check_tokenizer_source` refuses a recipe that trains *and* names a tokenizer input, or neither.
* **Packing.** Documents in dataset order, each followed by EOS, concatenated and cut into sequences of
  ``seq_len`` tokens; the tail is dropped or padded (``<|pad|>``, document index ``-1``).

Layout of the output directory (everything pinned by its uncompressed content)::

    tokenizer.json              the trained tokenizer (HF JSON, as the library writes it)
    seq-00000.safetensors.zst   safetensors: input_ids int32 [n, seq_len], doc_index int32 [n, seq_len]
    documents.jsonl.zst         one canonical-JSON line per document: index, id, first_token, tokens,
                                bytes, record (the upstream record without its text)
    index.json                  canonical JSON: format, sizes, special ids, shards (first_sequence,
                                sequences, sha256 of the uncompressed safetensors), documents, tokenizer
                                (name, sha256, bytes; ``source: input`` when reused -- absent when trained
                                here, so datasets with a trained tokenizer keep their bytes)

``.zst`` files are one zstd frame each, compressed one-shot and single-threaded with the content size
declared (the reproducible form, see :mod:`flowpin.data.shards`), and read with decompression bounded
by the size ``index.json`` declares. :class:`TokenizedDataset` reads the format back, checking the
tokenizer's sha256, each shard's sha256, and the safetensors dtypes, shapes and value ranges.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flowpin.atomic import atomic_open, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import INDEX_NAME
from flowpin.data.order import keyed_permutation
from flowpin.data.shards import read_dataset, read_shard, read_shard_bytes
from flowpin.errors import (
    DataError,
    EmptyCorpusError,
    RecipeError,
    ShardError,
    StrictJSONError,
    TensorFileError,
    TokenizerError,
)
from flowpin.jsonio import loads_strict
from flowpin.recipe import check_int
from flowpin.safeio import open_regular, read_regular
from flowpin.tensorfile import validate_safetensors

TOKENIZER_NAME = "tokenizer.json"
"""File name of the trained tokenizer in the output directory."""
DOCUMENTS_NAME = "documents.jsonl.zst"
"""File name of the document table."""
FORMAT = {"compression": "zstd", "layout": "packed-sequences", "tensors": "safetensors", "version": 1}
"""``index.json`` ``format``; readers refuse any other."""
TENSORS = ("doc_index", "input_ids")
"""The tensors of every shard (both int32, shape ``[sequences, seq_len]``)."""
PAD_DOCUMENT = -1
"""``doc_index`` of a padding position."""
TAIL_POLICIES = ("drop", "pad")
"""What to do with the tokens after the last full sequence."""
TOKENIZER_SOURCES = ("train", "input")
"""Where the tokenizer comes from: trained on the corpus, or reused from the stage input ``tokenizer``."""
TOKENIZER_ROLE = "tokenizer"
"""The stage input role (``paths.inputs.tokenizer``) naming the tokenized dataset whose tokenizer is reused."""
TRAINING_KEYS = ("min_frequency", "train_max_bytes", "seed")
"""``tokenize.tokenizer`` keys that only mean something when the tokenizer is trained here."""
BYTE_ALPHABET = 256
"""Tokens a byte-level BPE needs before any merge: one per byte."""
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"
"""The variable HF tokenizers reads (on every parallel call) to decide whether to use its thread pool."""
ENCODE_BATCH_DOCS = 256
"""Documents encoded per ``encode_batch`` call while packing (output does not depend on it)."""

_SHARD_NAME = re.compile(r"seq-\d{5}\.safetensors\.zst")
_MAX_ZSTD_LEVEL = 22
_INT32_MAX = 2**31 - 1


# --- configs --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """The BPE tokenizer to train or reuse (``tokenize.tokenizer``); validated by :class:`TokenizeConfig`."""

    source: str = "train"
    """``train``: train a byte-level BPE on the corpus (``vocab_size``, ``min_frequency`` and ``seed``
    required). ``input``: reuse the tokenizer of the tokenized dataset ``paths.inputs.tokenizer`` names
    (the training keys must then be left out; ``vocab_size``, when given, must be its size)."""
    vocab_size: int | None = None
    """Target vocabulary size including special tokens; at least 256 (bytes) + the special tokens. The
    trainer stops early when no pair reaches ``min_frequency`` (``index.json`` records the real size).
    With ``source: input``: optional, the size the reused tokenizer must have."""
    min_frequency: int | None = None
    """A pair is merged only if it occurs at least this often in the training text (>= 1)."""
    special_tokens: list[str]
    """Special tokens, given ids ``0..k-1`` in this order; must contain ``eos_token`` and ``pad_token``.
    With ``source: input``: exactly the reused tokenizer's special tokens, in id order."""
    eos_token: str = "<|endoftext|>"  # noqa: S105 (a token, not a password)
    """Appended after every document."""
    pad_token: str = "<|pad|>"  # noqa: S105
    """Fills the last sequence when ``packing.tail`` is ``pad``."""
    train_max_bytes: int | None = None
    """Train on at most this many UTF-8 bytes: documents are taken in a seeded random order until the cap
    (the last one cut at a character boundary). ``None`` trains on the whole corpus."""
    seed: int | None = None
    """Seeds the training sample (the BPE trainer itself draws no random numbers)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        if self.source not in TOKENIZER_SOURCES:
            raise RecipeError(
                f"{where}.source: {self.source!r} is not one of {', '.join(TOKENIZER_SOURCES)} "
                f"(train: train one on the corpus; input: reuse paths.inputs.{TOKENIZER_ROLE}'s)"
            )
        if not isinstance(self.special_tokens, list) or not all(isinstance(t, str) and t for t in self.special_tokens):
            raise RecipeError(f"{where}.special_tokens: must be a list of non-empty strings")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise RecipeError(f"{where}.special_tokens: {self.special_tokens} lists a token twice")
        for key, token in (("eos_token", self.eos_token), ("pad_token", self.pad_token)):
            if token not in self.special_tokens:
                raise RecipeError(f"{where}.{key}: {token!r} must be one of {where}.special_tokens")
        if self.eos_token == self.pad_token:
            raise RecipeError(f"{where}.pad_token: must differ from eos_token (padding must stay distinguishable)")
        if self.source == "input":
            for key in TRAINING_KEYS:
                if getattr(self, key) is not None:
                    raise RecipeError(
                        f"{where}.{key}: only used to train a tokenizer, but {where}.source is 'input' (the "
                        f"tokenizer is reused from paths.inputs.{TOKENIZER_ROLE}); remove the key"
                    )
        else:
            for key in ("vocab_size", "min_frequency", "seed"):
                if getattr(self, key) is None:
                    raise RecipeError(f"{where}.{key}: missing; required when {where}.source is 'train'")
        floor = BYTE_ALPHABET + len(self.special_tokens)
        if self.vocab_size is not None:
            check_int(self.vocab_size, f"{where}.vocab_size", minimum=0, maximum=_INT32_MAX)
            if self.vocab_size < floor:
                raise RecipeError(
                    f"{where}.vocab_size: {self.vocab_size} is too small: a byte-level BPE needs {BYTE_ALPHABET} "
                    f"byte tokens + {len(self.special_tokens)} special tokens = {floor} before its first merge; "
                    "raise it"
                )
        if self.min_frequency is not None:
            check_int(self.min_frequency, f"{where}.min_frequency", minimum=1, maximum=_INT32_MAX)
        if self.train_max_bytes is not None:
            check_int(self.train_max_bytes, f"{where}.train_max_bytes", minimum=1, maximum=2**53 - 1)
        if self.seed is not None:
            check_int(self.seed, f"{where}.seed", minimum=0, maximum=2**53 - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackingConfig:
    """How token streams become sequences (``tokenize.packing``); validated by :class:`TokenizeConfig`."""

    seq_len: int
    """Tokens per sequence (>= 2: a model predicts token t+1 from tokens ..t)."""
    tail: str
    """``drop``: tokens after the last full sequence are left out; ``pad``: they form one more sequence
    filled up with ``pad_token`` (doc index -1). Either way the report counts them."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.seq_len, f"{where}.seq_len", minimum=2, maximum=_INT32_MAX)
        if self.tail not in TAIL_POLICIES:
            raise RecipeError(f"{where}.tail: {self.tail!r} is not one of {', '.join(TAIL_POLICIES)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceShardsConfig:
    """How sequences are cut into shards (``tokenize.shards``); validated by :class:`TokenizeConfig`."""

    sequences_per_shard: int
    """Most sequences in one ``seq-NNNNN.safetensors.zst``."""
    zstd_level: int
    """zstd level 1..22 (one-shot, single-threaded compression)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.sequences_per_shard, f"{where}.sequences_per_shard", minimum=1, maximum=_INT32_MAX)
        check_int(self.zstd_level, f"{where}.zstd_level", minimum=1, maximum=_MAX_ZSTD_LEVEL)


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


# --- tokenizer ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tokenizers_single_threaded() -> Iterator[None]:
    """Run HF tokenizers without its thread pool inside the block (it reads the variable per call)."""
    old = os.environ.get(PARALLELISM_ENV)
    os.environ[PARALLELISM_ENV] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PARALLELISM_ENV, None)
        else:
            os.environ[PARALLELISM_ENV] = old


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (single-threaded; deterministic) and return it.

    The returned tokenizer has ``encode_special_tokens`` on (see the module docstring).
    """
    cfg.validate("tokenize.tokenizer")
    if cfg.source != "train" or cfg.vocab_size is None or cfg.min_frequency is None:  # set when 'train' (validate)
        raise RecipeError(f"tokenize.tokenizer.source: {cfg.source!r}; only a 'train' recipe trains a tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _tokenizers_single_threaded():
        tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(cfg.special_tokens):
        if tok.token_to_id(token) != i:  # an internal invariant of the trainer we rely on
            raise TokenizerError(f"special token {token!r} did not get id {i}; the tokenizers library changed")
    tok.encode_special_tokens = True
    return tok


def tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    """The ``tokenizer.json`` bytes of ``tokenizer`` (HF's own serialisation, deterministic)."""
    return tokenizer.to_str().encode("utf-8")


def load_tokenizer(data: bytes, *, where: str) -> Tokenizer:
    """Parse ``tokenizer.json`` bytes (``where`` names the file in errors); special tokens in text stay text."""
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON; also UnicodeDecodeError
        raise TokenizerError(f"{where} is not a tokenizers JSON file ({exc}); rerun the tokenize stage") from exc
    tok.encode_special_tokens = True
    return tok


def special_tokens(tokenizer: Tokenizer) -> list[str]:
    """The tokenizer's special tokens in id order."""
    added = tokenizer.get_added_tokens_decoder()
    return [added[i].content for i in sorted(added) if added[i].special]


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
    if actual != cfg.special_tokens:
        raise RecipeError(
            f"{where}.special_tokens: {cfg.special_tokens}, but the reused {at} has {actual} (in id order); "
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


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of ``token``; :class:`TokenizerError` if the tokenizer does not know it."""
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise TokenizerError(f"the tokenizer has no token {token!r}; retrain it with it in special_tokens")
    return int(tid)


# --- packing (pure) -------------------------------------------------------------------------------


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], *, eos_id: int) -> Iterator[npt.NDArray[np.int32]]:
    """Token ids of each text followed by ``eos_id``, in order (encoded in batches on the tokenizer's pool;
    the ids of a text do not depend on how texts are batched or on the thread count)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH_DOCS:
            yield from _encode_batch(tokenizer, batch, eos_id)
            batch = []
    if batch:
        yield from _encode_batch(tokenizer, batch, eos_id)


def _encode_batch(tokenizer: Tokenizer, texts: list[str], eos_id: int) -> Iterator[npt.NDArray[np.int32]]:
    for enc in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
        ids = np.empty(len(enc.ids) + 1, dtype=np.int32)
        ids[:-1] = enc.ids
        ids[-1] = eos_id
        yield ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackedChunk:
    """Consecutive packed sequences."""

    input_ids: npt.NDArray[np.int32]
    """Token ids, ``[n, seq_len]``."""
    doc_index: npt.NDArray[np.int32]
    """Document index of each token (-1 = padding), ``[n, seq_len]``."""


class Packer:
    """Concatenates documents' tokens and cuts them into sequences of ``seq_len`` (no I/O)."""

    def __init__(self, *, seq_len: int, pad_id: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.tokens = 0
        """Tokens added so far (EOS included)."""
        self.documents = 0
        """Documents added so far; the next one gets this index."""
        self._ids: list[npt.NDArray[np.int32]] = []
        self._docs: list[npt.NDArray[np.int32]] = []
        self._pending = 0

    def add(self, ids: npt.NDArray[np.int32]) -> int:
        """Append one document's tokens (EOS included); returns the document's index."""
        index = self.documents
        if index > _INT32_MAX:
            raise DataError(f"more than {_INT32_MAX} documents; doc_index is int32")
        self._ids.append(ids)
        self._docs.append(np.full(len(ids), index, dtype=np.int32))
        self._pending += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        return index

    @property
    def pending_sequences(self) -> int:
        """Full sequences ready to :meth:`take`."""
        return self._pending // self.seq_len

    def take(self, n: int) -> PackedChunk:
        """Remove and return the next ``n`` full sequences (``n <= pending_sequences``)."""
        if not 0 <= n <= self.pending_sequences:
            raise ValueError(f"cannot take {n} sequences, {self.pending_sequences} are ready")
        ids = np.concatenate(self._ids) if self._ids else np.empty(0, np.int32)
        docs = np.concatenate(self._docs) if self._docs else np.empty(0, np.int32)
        cut = n * self.seq_len
        self._ids, self._docs = [ids[cut:]], [docs[cut:]]
        self._pending -= cut
        return PackedChunk(input_ids=ids[:cut].reshape(n, self.seq_len), doc_index=docs[:cut].reshape(n, self.seq_len))

    def finish(self, tail: str) -> tuple[PackedChunk, int]:
        """Take what is left: every full sequence, plus the tail padded (``pad``) or left out (``drop``).

        Returns the chunk and the number of tail tokens (real tokens after the last full sequence).
        """
        full = self.take(self.pending_sequences)
        rest = self._pending
        if tail == "drop" or rest == 0:
            self._ids, self._docs, self._pending = [], [], 0
            return full, rest
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int32)
        docs = np.full(self.seq_len, PAD_DOCUMENT, dtype=np.int32)
        ids[:rest] = np.concatenate(self._ids)
        docs[:rest] = np.concatenate(self._docs)
        self._ids, self._docs, self._pending = [], [], 0
        return (
            PackedChunk(
                input_ids=np.concatenate([full.input_ids, ids[None, :]]),
                doc_index=np.concatenate([full.doc_index, docs[None, :]]),
            ),
            rest,
        )


def pack_texts(
    tokenizer: Tokenizer, texts: Iterable[str], *, seq_len: int, tail: str, eos_id: int, pad_id: int
) -> tuple[PackedChunk, int]:
    """Encode ``texts`` and pack them in memory: (all sequences, tail tokens). Pure; what the benchmark times."""
    packer = Packer(seq_len=seq_len, pad_id=pad_id)
    for ids in encode_documents(tokenizer, texts, eos_id=eos_id):
        packer.add(ids)
    return packer.finish(tail)


# --- writing --------------------------------------------------------------------------------------


def _compress(data: bytes, level: int) -> bytes:
    # One-shot, single-threaded, content size declared: the reproducible form (see flowpin.data.shards).
    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True).compress(data)


def _write_zst(path: Path, data: bytes, level: int) -> dict[str, Any]:
    with atomic_open(path) as fh:
        fh.write(_compress(data, level))
    return {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "uncompressed_bytes": len(data)}


def shard_name(index: int) -> str:
    """File name of sequence shard number ``index``."""
    if not 0 <= index < 100_000:
        raise ValueError(f"shard index {index} is outside 0..99999")
    return f"seq-{index:05d}.safetensors.zst"


def encode_shard(chunk: PackedChunk) -> bytes:
    """The (uncompressed) safetensors bytes of one shard."""
    return bytes(
        st_save(
            {
                "doc_index": np.ascontiguousarray(chunk.doc_index, dtype="<i4"),
                "input_ids": np.ascontiguousarray(chunk.input_ids, dtype="<i4"),
            }
        )
    )


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
    tok_entry: dict[str, Any] = {}
    if tokenizer_dir is not None:
        tokenizer, tok_json = reuse_tokenizer(tokenizer_dir, tcfg)
        tok_entry["source"] = "input"
        tok_report: dict[str, Any] = {"source": "input"}
    else:
        sample = _training_sample(sizes, tcfg)
        train_bytes = sum(sizes[i] if cap is None else min(cap, sizes[i]) for i, cap in sample.items())
        tokenizer = train_tokenizer(_training_texts(corpus_dir, sample), tcfg)
        tok_json = tokenizer_bytes(tokenizer)
        tok_report = {"source": "train", "train_documents": len(sample), "train_bytes": train_bytes}
    train_seconds = time.perf_counter() - t0
    atomic_write_bytes(out_dir / TOKENIZER_NAME, tok_json)
    eos_id, pad_id = special_id(tokenizer, tcfg.eos_token), special_id(tokenizer, tcfg.pad_token)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    n_documents = len(sizes)

    t0 = time.perf_counter()
    packer = Packer(seq_len=pcfg.seq_len, pad_id=pad_id)
    per_shard = cfg.shards.sequences_per_shard
    shards: list[dict[str, Any]] = []
    table: list[bytes] = []
    text_bytes = 0

    def emit(chunk: PackedChunk) -> None:
        first = shards[-1]["first_sequence"] + shards[-1]["sequences"] if shards else 0
        for start in range(0, len(chunk.input_ids), per_shard):
            part = PackedChunk(
                input_ids=chunk.input_ids[start : start + per_shard],
                doc_index=chunk.doc_index[start : start + per_shard],
            )
            entry = _write_zst(out_dir / shard_name(len(shards)), encode_shard(part), cfg.shards.zstd_level)
            shards.append({**entry, "first_sequence": first, "sequences": len(part.input_ids)})
            first += len(part.input_ids)

    for batch in _batched(_texts(corpus_dir), ENCODE_BATCH_DOCS):
        encoded = _encode_batch(tokenizer, [text for _, text in batch], eos_id)
        for (record, text), ids in zip(batch, encoded, strict=True):
            first_token = packer.tokens
            number = packer.add(ids)
            nbytes = len(text.encode("utf-8"))
            text_bytes += nbytes
            entry = {"bytes": nbytes, "first_token": first_token, "id": record["id"], "index": number}
            entry |= {"record": {k: v for k, v in record.items() if k != "text"}, "tokens": len(ids)}
            table.append(canonical_json(entry) + b"\n")
        if packer.pending_sequences >= per_shard:
            emit(packer.take(packer.pending_sequences // per_shard * per_shard))
    last, tail_tokens = packer.finish(pcfg.tail)
    emit(last)
    pack_seconds = time.perf_counter() - t0
    if packer.documents != n_documents:
        raise DataError(f"{corpus_dir} changed while it was read ({n_documents} then {packer.documents} documents)")
    sequences = sum(s["sequences"] for s in shards)
    if sequences == 0:
        raise EmptyCorpusError(
            f"{corpus_dir}: {n_documents} documents give {packer.tokens} tokens, fewer than one sequence of "
            f"tokenize.packing.seq_len={pcfg.seq_len}; lower seq_len or set tokenize.packing.tail=pad"
        )

    pad_tokens = (pcfg.seq_len - tail_tokens) if pcfg.tail == "pad" and tail_tokens else 0
    n_tokens = sequences * pcfg.seq_len - pad_tokens
    documents = _write_zst(out_dir / DOCUMENTS_NAME, b"".join(table), cfg.shards.zstd_level)
    index: dict[str, Any] = {
        "format": FORMAT,
        "seq_len": pcfg.seq_len,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "pad_id": pad_id,
        "eos_token": tcfg.eos_token,
        "pad_token": tcfg.pad_token,
        "n_documents": n_documents,
        "n_sequences": sequences,
        "n_tokens": n_tokens,
        "total_tokens": packer.tokens,
        "tail": {"policy": pcfg.tail, "tokens": tail_tokens, "pad_tokens": pad_tokens},
        "tensors": {name: {"dtype": "int32", "shape": ["sequences", "seq_len"]} for name in TENSORS},
        "shards": shards,
        "documents": {**documents, "records": n_documents},
        "tokenizer": {
            "name": TOKENIZER_NAME,
            "sha256": hashlib.sha256(tok_json).hexdigest(),
            "bytes": len(tok_json),
            **tok_entry,
        },
    }
    atomic_write_bytes(out_dir / INDEX_NAME, canonical_json(index) + b"\n")

    text_tokens = packer.tokens - n_documents
    report: dict[str, Any] = {
        "documents": n_documents,
        "bytes": text_bytes,
        "tokens": {
            "total": packer.tokens,
            "eos": n_documents,
            "in_sequences": n_tokens,
            "tail": tail_tokens,
            "tail_policy": pcfg.tail,
            "dropped": tail_tokens if pcfg.tail == "drop" else 0,
            "pad": pad_tokens,
        },
        "sequences": sequences,
        "seq_len": pcfg.seq_len,
        "shards": len(shards),
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
        shards=len(shards),
        report=report,
        timing=timing,
    )


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --- reading --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DocumentEntry:
    """One row of the document table."""

    index: int
    """Position in the dataset (what ``doc_index`` holds)."""
    id: str
    """The upstream record's id."""
    first_token: int
    """Offset of the document's first token in the concatenated token stream."""
    tokens: int
    """Its token count, EOS included."""
    bytes: int
    """UTF-8 length of its text."""
    record: dict[str, Any]
    """The upstream record without its text (``id``, ``source``, ``mix``...)."""


def _field(mapping: Any, key: str, kind: type, where: str) -> Any:
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ShardError(f"{where}: '{key}' is missing or not a {kind.__name__}; rerun the tokenize stage")
    return value


class TokenizedDataset:
    """A tokenize output directory, opened for reading (see the module docstring for what is checked).

    Opening reads and checks ``index.json`` and the tokenizer's sha256; shards and the document table are
    read on first use (shards through a small LRU cache), each checked against ``index.json``.
    """

    def __init__(self, path: Path, index: dict[str, Any], *, max_cached_shards: int = 16) -> None:
        self.path = path
        self.index = index
        self.seq_len: int = index["seq_len"]
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.pad_id: int = index["pad_id"]
        self.n_sequences: int = index["n_sequences"]
        self.n_documents: int = index["n_documents"]
        self.n_tokens: int = index["n_tokens"]
        self._firsts = [s["first_sequence"] for s in index["shards"]]
        self._cache: collections.OrderedDict[int, PackedChunk] = collections.OrderedDict()
        self._max_cached = max(1, max_cached_shards)
        self._tokenizer: Tokenizer | None = None
        self._documents: list[DocumentEntry] | None = None
        self._digest: str | None = None
        self._tokenizer_json = self._read_tokenizer_json()

    @classmethod
    def open(cls, data_dir: Path, *, max_cached_shards: int = 16) -> TokenizedDataset:
        """Open ``data_dir``; :class:`ShardError` for a missing or malformed index, :class:`TokenizerError`
        when ``tokenizer.json`` is not the one the index pins."""
        return cls(data_dir, read_tokenized_index(data_dir), max_cached_shards=max_cached_shards)

    def _read_tokenizer_json(self) -> bytes:
        entry = self.index["tokenizer"]
        path = self.path / TOKENIZER_NAME
        try:
            with open_regular(path, max_bytes=None, what="tokenizer", fix=_RERUN) as f:
                data = os.read(f.fd, min(f.size, max(entry["bytes"], 0)) + 1)  # a bigger file fails the sha256
        except OSError as exc:
            raise TokenizerError(f"cannot read {path}: {exc.strerror or exc}; rerun the tokenize stage") from exc
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry["sha256"]:
            raise TokenizerError(
                f"{path} has sha256 {actual}, but {self.path / INDEX_NAME} pins {entry['sha256']}: the tokenizer "
                "does not belong to these sequences; restore it (dvc checkout) or rerun the tokenize stage"
            )
        return data

    @property
    def tokenizer_json(self) -> bytes:
        """The pinned ``tokenizer.json`` bytes (sha256-checked against the index on opening)."""
        return self._tokenizer_json

    def digest(self) -> str:
        """The sha256 directory digest of the dataset (computed once; keys the data order)."""
        if self._digest is None:
            from flowpin.data.order import dataset_digest

            self._digest = dataset_digest(self.path)
        return self._digest

    def tokenizer(self) -> Tokenizer:
        """The pinned tokenizer (checked against the index's vocab size and special ids)."""
        if self._tokenizer is None:
            where = str(self.path / TOKENIZER_NAME)
            tok = load_tokenizer(self._tokenizer_json, where=where)
            size = tok.get_vocab_size(with_added_tokens=True)
            eos, pad = tok.token_to_id(self.index["eos_token"]), tok.token_to_id(self.index["pad_token"])
            if (size, eos, pad) != (self.vocab_size, self.eos_id, self.pad_id):
                raise TokenizerError(
                    f"{where}: vocab size {size}, eos id {eos}, pad id {pad} differ from index.json "
                    f"({self.vocab_size}, {self.eos_id}, {self.pad_id}); rerun the tokenize stage"
                )
            self._tokenizer = tok
        return self._tokenizer

    def documents(self) -> list[DocumentEntry]:
        """The document table, in dataset order."""
        if self._documents is None:
            entry = self.index["documents"]
            path = self.path / DOCUMENTS_NAME
            rows: list[DocumentEntry] = []
            for i, row in enumerate(
                read_shard(path, max_content_size=entry["uncompressed_bytes"], expected_sha256=entry["sha256"])
            ):
                where = f"{path} line {i + 1}"
                doc = DocumentEntry(
                    index=_field(row, "index", int, where),
                    id=_field(row, "id", str, where),
                    first_token=_field(row, "first_token", int, where),
                    tokens=_field(row, "tokens", int, where),
                    bytes=_field(row, "bytes", int, where),
                    record=_field(row, "record", dict, where),
                )
                if doc.index != i:
                    raise ShardError(f"{where}: index {doc.index}, expected {i}; rerun the tokenize stage")
                rows.append(doc)
            if len(rows) != self.n_documents:
                raise ShardError(f"{path} holds {len(rows)} documents, index.json says {self.n_documents}")
            self._documents = rows
        return self._documents

    def shard(self, number: int) -> PackedChunk:
        """Shard ``number``, decompressed (bounded), sha256-checked and validated."""
        chunk = self._cache.get(number)
        if chunk is not None:
            self._cache.move_to_end(number)
            return chunk
        chunk = self._load_shard(self.index["shards"][number])
        self._cache[number] = chunk
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return chunk

    def _load_shard(self, entry: dict[str, Any]) -> PackedChunk:
        path = self.path / entry["name"]
        data = read_shard_bytes(path, max_content_size=entry["uncompressed_bytes"], expected_sha256=entry["sha256"])
        try:  # index.json is not signed: a re-pinned shard passes the sha256, so check its header first
            validate_safetensors(data, where=str(path), fix="rerun the tokenize stage")
        except TensorFileError as exc:
            raise ShardError(str(exc)) from exc
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, TypeError) as exc:
            raise ShardError(f"{path} is not a valid safetensors file ({exc}); rerun the tokenize stage") from exc
        if sorted(tensors) != sorted(TENSORS):
            raise ShardError(f"{path} holds tensors {sorted(tensors)}, expected {list(TENSORS)}")
        shape = (entry["sequences"], self.seq_len)
        for name, arr in tensors.items():
            if arr.dtype != np.dtype("<i4"):
                raise ShardError(f"{path}: tensor {name} has dtype {arr.dtype}, index.json says int32")
            if arr.shape != shape:
                raise ShardError(f"{path}: tensor {name} has shape {list(arr.shape)}, index.json says {list(shape)}")
        ids, docs = tensors["input_ids"], tensors["doc_index"]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ShardError(f"{path}: input_ids outside 0..{self.vocab_size - 1} (the vocabulary)")
        if docs.size and (int(docs.min()) < PAD_DOCUMENT or int(docs.max()) >= self.n_documents):
            raise ShardError(f"{path}: doc_index outside -1..{self.n_documents - 1}")
        ids.flags.writeable = False
        docs.flags.writeable = False
        return PackedChunk(input_ids=ids, doc_index=docs)

    def sequences(self, indices: Sequence[int]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """``(input_ids, doc_index)`` of the given sequences, each ``int32 [len(indices), seq_len]``."""
        ids = np.empty((len(indices), self.seq_len), dtype=np.int32)
        docs = np.empty((len(indices), self.seq_len), dtype=np.int32)
        for row, seq in enumerate(indices):
            if not 0 <= seq < self.n_sequences:
                raise DataError(f"sequence {seq} is outside 0..{self.n_sequences - 1} of {self.path}")
            number = bisect.bisect_right(self._firsts, seq) - 1
            chunk = self.shard(number)
            local = seq - self._firsts[number]
            ids[row] = chunk.input_ids[local]
            docs[row] = chunk.doc_index[local]
        return ids, docs


MAX_INDEX_BYTES = 64 << 20
"""Largest ``index.json`` read (one ~150-byte entry per shard)."""
_RERUN = "restore it (dvc checkout) or rerun the tokenize stage"


def read_tokenized_index(data_dir: Path) -> dict[str, Any]:
    """Load and check a tokenized dataset's ``index.json`` (:class:`ShardError` naming the file)."""
    path = data_dir / INDEX_NAME
    try:
        raw = read_regular(path, max_bytes=MAX_INDEX_BYTES, what="dataset index", fix=_RERUN)
        index = loads_strict(raw, where=str(path), max_bytes=MAX_INDEX_BYTES)
    except FileNotFoundError as exc:
        raise ShardError(f"{path} is missing: {data_dir} is not a tokenized dataset; run the tokenize stage") from exc
    except (OSError, StrictJSONError) as exc:  # StrictJSONError: not JSON, a repeated key, NaN, nested too deep
        raise ShardError(f"{path} cannot be read as JSON ({exc}); rerun the tokenize stage") from exc
    where = str(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else None
        raise ShardError(f"{where}: format {got!r} is not {FORMAT}; this flowpin cannot read it")
    for key in ("seq_len", "vocab_size", "eos_id", "pad_id", "n_documents", "n_sequences", "n_tokens"):
        if _field(index, key, int, where) < 0:
            raise ShardError(f"{where}: '{key}' is negative")
    for key in ("eos_token", "pad_token"):
        _field(index, key, str, where)
    if index["seq_len"] < 2 or index["n_sequences"] < 1:
        raise ShardError(f"{where}: seq_len must be >= 2 and n_sequences >= 1")
    shards = _field(index, "shards", list, where)
    expected = 0
    for i, shard in enumerate(shards):
        at = f"{where} shards[{i}]"
        name = _field(shard, "name", str, at)
        if not _SHARD_NAME.fullmatch(name):
            raise ShardError(f"{at}: name {name!r} is not seq-NNNNN.safetensors.zst")
        _field(shard, "sha256", str, at)
        if _field(shard, "first_sequence", int, at) != expected:
            raise ShardError(f"{at}: first_sequence {shard['first_sequence']}, expected {expected}")
        count = _field(shard, "sequences", int, at)
        if count < 1 or _field(shard, "uncompressed_bytes", int, at) < 0:
            raise ShardError(f"{at}: sequences must be >= 1 and uncompressed_bytes >= 0")
        expected += count
    if expected != index["n_sequences"]:
        raise ShardError(f"{where}: shards hold {expected} sequences, n_sequences says {index['n_sequences']}")
    for key, name in (("documents", DOCUMENTS_NAME), ("tokenizer", TOKENIZER_NAME)):
        entry = _field(index, key, dict, where)
        if _field(entry, "name", str, f"{where} {key}") != name:
            raise ShardError(f"{where}: {key}.name must be {name!r}")
        _field(entry, "sha256", str, f"{where} {key}")
    _field(index["documents"], "uncompressed_bytes", int, f"{where} documents")
    _field(index["tokenizer"], "bytes", int, f"{where} tokenizer")
    return index


__all__ = [
    "FORMAT",
    "DocumentEntry",
    "PackedChunk",
    "Packer",
    "PackingConfig",
    "SequenceShardsConfig",
    "TokenizeConfig",
    "TokenizeResult",
    "TokenizedDataset",
    "TokenizerConfig",
    "check_tokenizer_source",
    "encode_documents",
    "encode_shard",
    "load_tokenizer",
    "pack_texts",
    "read_tokenized_index",
    "reuse_tokenizer",
    "run_tokenize",
    "special_id",
    "special_tokens",
    "tokenizer_bytes",
    "train_tokenizer",
]
