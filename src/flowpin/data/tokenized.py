"""The tokenized dataset format: packed sequences on disk, written byte-reproducibly and read back checked.

Layout of a tokenized dataset directory (everything pinned by its uncompressed content)::

    tokenizer.json              the tokenizer (HF JSON, as the library writes it)
    seq-00000.safetensors.zst   safetensors: input_ids int32 [n, seq_len], doc_index int32 [n, seq_len]
    documents.jsonl.zst         one canonical-JSON line per document: index, id, first_token, tokens,
                                bytes, record (the upstream record without its text)
    index.json                  canonical JSON: format, sizes, special ids, shards (first_sequence,
                                sequences, sha256 of the uncompressed safetensors), documents, tokenizer
                                (name, sha256, bytes; ``source: input`` when reused -- absent when trained
                                for this dataset, so datasets with a trained tokenizer keep their bytes)

``.zst`` files are one zstd frame each, compressed one-shot and single-threaded with the content size
declared (the reproducible form, :func:`flowpin.data.shards.compress_frame`), and read with decompression
bounded by the size ``index.json`` declares. :class:`TokenizedWriter` writes the format;
:class:`TokenizedDataset` reads it back, checking the tokenizer's sha256, each shard's sha256, and the
safetensors header (:mod:`flowpin.tensorfile`), dtypes, shapes and value ranges. A dataset is identified by
its directory digest (:func:`dataset_digest`), which also keys its data order (:mod:`flowpin.data.order`).

The sequences come from :mod:`flowpin.data.packing`, the tokenizer from :mod:`flowpin.data.tokenizer`; the
stage that writes a dataset is :mod:`flowpin.data.tokenize`.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from tokenizers import Tokenizer

from flowpin.atomic import atomic_open, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.constants import INDEX_NAME
from flowpin.data.packing import INT32_MAX, PAD_DOCUMENT, PackedChunk
from flowpin.data.shards import MAX_INDEX_BYTES, compress_frame, read_shard, read_shard_bytes
from flowpin.data.tokenizer import load_tokenizer
from flowpin.errors import (
    DataError,
    DataOrderError,
    FlowpinError,
    InternalError,
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
"""File name of the tokenizer in a tokenized dataset directory."""
DOCUMENTS_NAME = "documents.jsonl.zst"
"""File name of the document table."""
FORMAT = {"compression": "zstd", "layout": "packed-sequences", "tensors": "safetensors", "version": 1}
"""``index.json`` ``format``; readers refuse any other."""
TENSORS = ("doc_index", "input_ids")
"""The tensors of every shard (both int32, shape ``[sequences, seq_len]``)."""
DIGEST_ALGORITHM = "sha256"
"""The directory digest that identifies a tokenized dataset and keys its data order (whatever algorithm a
manifest was recorded with)."""

_SHARD_NAME = re.compile(r"seq-\d{5}\.safetensors\.zst")
_MAX_ZSTD_LEVEL = 22
_MAX_SHARDS = 100_000  # shard numbers are written with five digits
_RERUN = "restore it (dvc checkout) or rerun the tokenize stage"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceShardsConfig:
    """How sequences are cut into shards (``tokenize.shards``); validated by the stage's config."""

    sequences_per_shard: int
    """Most sequences in one ``seq-NNNNN.safetensors.zst``."""
    zstd_level: int
    """zstd level 1..22 (one-shot, single-threaded compression)."""

    def validate(self, where: str) -> None:
        """Raise :class:`RecipeError` naming ``where.<key>`` for the first invalid value."""
        check_int(self.sequences_per_shard, f"{where}.sequences_per_shard", minimum=1, maximum=INT32_MAX)
        check_int(self.zstd_level, f"{where}.zstd_level", minimum=1, maximum=_MAX_ZSTD_LEVEL)


# --- writing --------------------------------------------------------------------------------------


def sequence_shard_name(index: int) -> str:
    """File name of sequence shard number ``index``."""
    if not 0 <= index < _MAX_SHARDS:
        raise InternalError(f"sequence_shard_name: shard index {index} is outside 0..99999")
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


def _write_zst(path: Path, data: bytes, level: int) -> dict[str, Any]:
    with atomic_open(path) as fh:
        fh.write(compress_frame(data, level))
    return {"name": path.name, "sha256": hashlib.sha256(data).hexdigest(), "uncompressed_bytes": len(data)}


class TokenizedWriter:
    """Writes one tokenized dataset into an empty directory (see the module docstring for the layout).

    In order: :meth:`write_tokenizer`, then :meth:`add_sequences` and :meth:`add_document` as packing
    proceeds (shards are written as they fill), then :meth:`finish`, which writes the document table and,
    last, ``index.json``. The caller wraps the directory in :func:`~flowpin.atomic.atomic_directory`.
    """

    def __init__(self, out_dir: Path, shards: SequenceShardsConfig, *, seq_len: int) -> None:
        self.out_dir = out_dir
        self.seq_len = seq_len
        self._per_shard = shards.sequences_per_shard
        self._level = shards.zstd_level
        self._shards: list[dict[str, Any]] = []
        self._table: list[bytes] = []
        self._tokenizer: dict[str, Any] | None = None

    @property
    def sequences(self) -> int:
        """Sequences written so far."""
        return self._shards[-1]["first_sequence"] + self._shards[-1]["sequences"] if self._shards else 0

    @property
    def shards(self) -> int:
        """Sequence shards written so far."""
        return len(self._shards)

    def write_tokenizer(self, data: bytes, *, reused: bool) -> None:
        """Write ``tokenizer.json`` (``reused``: taken from another dataset, recorded as ``source: input``)."""
        atomic_write_bytes(self.out_dir / TOKENIZER_NAME, data)
        self._tokenizer = {"name": TOKENIZER_NAME, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if reused:
            self._tokenizer["source"] = "input"

    def add_sequences(self, chunk: PackedChunk) -> None:
        """Write ``chunk`` as shards of ``sequences_per_shard`` sequences (the last one may hold fewer)."""
        first = self.sequences
        for start in range(0, len(chunk.input_ids), self._per_shard):
            part = PackedChunk(
                input_ids=chunk.input_ids[start : start + self._per_shard],
                doc_index=chunk.doc_index[start : start + self._per_shard],
            )
            entry = _write_zst(self.out_dir / sequence_shard_name(len(self._shards)), encode_shard(part), self._level)
            self._shards.append({**entry, "first_sequence": first, "sequences": len(part.input_ids)})
            first += len(part.input_ids)

    def add_document(self, record: dict[str, Any], *, index: int, first_token: int, tokens: int, nbytes: int) -> None:
        """Append document ``index`` to the document table: its tokens' place in the stream, its UTF-8 length
        ``nbytes`` and the upstream ``record`` (its ``id``; stored without its text)."""
        entry = {"bytes": nbytes, "first_token": first_token, "id": record["id"], "index": index}
        entry |= {"record": {k: v for k, v in record.items() if k != "text"}, "tokens": tokens}
        self._table.append(canonical_json(entry) + b"\n")

    def finish(
        self,
        *,
        vocab_size: int,
        eos_id: int,
        pad_id: int,
        eos_token: str,
        pad_token: str,
        total_tokens: int,
        tail: str,
        tail_tokens: int,
    ) -> dict[str, Any]:
        """Write the document table and ``index.json``; return the index.

        ``total_tokens``: every token packed (EOS included); ``tail``/``tail_tokens``: the tail policy and the
        real tokens after the last full sequence (padded into the last sequence when ``tail`` is ``pad``).
        """
        if self._tokenizer is None:
            raise InternalError("TokenizedWriter.finish: write_tokenizer was never called")
        pad_tokens = (self.seq_len - tail_tokens) if tail == "pad" and tail_tokens else 0
        n_documents = len(self._table)
        documents = _write_zst(self.out_dir / DOCUMENTS_NAME, b"".join(self._table), self._level)
        index: dict[str, Any] = {
            "format": FORMAT,
            "seq_len": self.seq_len,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
            "pad_id": pad_id,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "n_documents": n_documents,
            "n_sequences": self.sequences,
            "n_tokens": self.sequences * self.seq_len - pad_tokens,
            "total_tokens": total_tokens,
            "tail": {"policy": tail, "tokens": tail_tokens, "pad_tokens": pad_tokens},
            "tensors": {name: {"dtype": "int32", "shape": ["sequences", "seq_len"]} for name in TENSORS},
            "shards": self._shards,
            "documents": {**documents, "records": n_documents},
            "tokenizer": self._tokenizer,
        }
        atomic_write_bytes(self.out_dir / INDEX_NAME, canonical_json(index) + b"\n")
        return index


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
    """A tokenized dataset directory, opened for reading (see the module docstring for what is checked).

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


def dataset_digest(data_dir: Path, *, algorithm: str = DIGEST_ALGORITHM) -> str:
    """The directory digest of ``data_dir`` by flowpin's hashing rule (what a manifest pins for it).

    :class:`DataOrderError` when it is no directory or cannot be digested: the digest keys the data order.
    """
    from flowpin.hashing import Hasher

    path = data_dir.resolve()
    if not path.is_dir():
        raise DataOrderError(f"{data_dir} is not a directory; run the tokenize stage or name its output directory")
    try:
        return Hasher(path.parent, algorithm).digest(path.name).digest
    except FlowpinError as exc:
        raise DataOrderError(f"cannot digest {data_dir}: {exc}") from exc


__all__ = [
    "DIGEST_ALGORITHM",
    "DOCUMENTS_NAME",
    "FORMAT",
    "TENSORS",
    "TOKENIZER_NAME",
    "DocumentEntry",
    "SequenceShardsConfig",
    "TokenizedDataset",
    "TokenizedWriter",
    "dataset_digest",
    "encode_shard",
    "read_tokenized_index",
    "sequence_shard_name",
]
