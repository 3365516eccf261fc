"""Packing: documents' token ids, each followed by EOS, concatenated and cut into fixed-length sequences.

Documents go in dataset order; the stream is cut into sequences of ``seq_len`` tokens, and the tail (the
tokens after the last full sequence) is dropped or padded (``<|pad|>``, document index
:data:`PAD_DOCUMENT`). Every token keeps the index of the document it came from (``doc_index``), so a
sequence can always be traced back to its documents. Pure: ids in, arrays out, no file is touched.

:mod:`flowpin.data.tokenizer` gives the ids, :mod:`flowpin.data.tokenized` writes the sequences to disk
and reads them back, :mod:`flowpin.data.tokenize` (the stage) runs the three in turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from flowpin.errors import DataError, InternalError, RecipeError
from flowpin.recipe import check_int

INT32_MAX = 2**31 - 1
"""Largest token id and document index: both are stored as int32."""
PAD_DOCUMENT = -1
"""``doc_index`` of a padding position."""
TAIL_POLICIES = ("drop", "pad")
"""What to do with the tokens after the last full sequence."""
ENCODE_BATCH_DOCS = 256
"""Documents encoded per ``encode_batch`` call while packing (output does not depend on it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackingConfig:
    """How token streams become sequences (``tokenize.packing``); validated by the stage's config."""

    seq_len: int
    """Tokens per sequence (>= 2: a model predicts token t+1 from tokens ..t)."""
    tail: str
    """``drop``: tokens after the last full sequence are left out; ``pad``: they form one more sequence
    filled up with ``pad_token`` (doc index -1). Either way the report counts them."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.seq_len, f"{where}.seq_len", minimum=2, maximum=INT32_MAX)
        if self.tail not in TAIL_POLICIES:
            raise RecipeError(f"{where}.tail: {self.tail!r} is not one of {', '.join(TAIL_POLICIES)}")


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], *, eos_id: int) -> Iterator[npt.NDArray[np.int32]]:
    """Token ids of each text followed by ``eos_id``, in order (encoded in batches of
    :data:`ENCODE_BATCH_DOCS`; the ids of a text do not depend on how texts are batched or on the
    tokenizer's thread count)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == ENCODE_BATCH_DOCS:
            yield from encode_batch(tokenizer, batch, eos_id=eos_id)
            batch = []
    if batch:
        yield from encode_batch(tokenizer, batch, eos_id=eos_id)


def encode_batch(tokenizer: Tokenizer, texts: list[str], *, eos_id: int) -> Iterator[npt.NDArray[np.int32]]:
    """Token ids of each of ``texts`` followed by ``eos_id`` (one ``encode_batch_fast`` call)."""
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
            raise InternalError(f"Packer: seq_len must be >= 2, got {seq_len}")
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
        if index > INT32_MAX:
            raise DataError(f"more than {INT32_MAX} documents; doc_index is int32")
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
            raise InternalError(f"Packer.take: cannot take {n} sequences, {self.pending_sequences} are ready")
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


__all__ = [
    "ENCODE_BATCH_DOCS",
    "INT32_MAX",
    "PAD_DOCUMENT",
    "TAIL_POLICIES",
    "PackedChunk",
    "Packer",
    "PackingConfig",
    "encode_batch",
    "encode_documents",
    "pack_texts",
]
