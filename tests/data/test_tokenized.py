"""The tokenized dataset format on its own (flowpin.data.tokenized): the writer, read back by the reader.

The whole tokenize stage (tokenizer, packing and this format together, golden digest included) is tested in
test_tokenize.py; here the writer gets hand-made sequences and an opaque tokenizer file, so the format's own
rules are checked without training anything.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flowpin.canonical import canonical_json
from flowpin.constants import INDEX_NAME
from flowpin.data.packing import PAD_DOCUMENT, PackedChunk
from flowpin.data.tokenized import (
    DOCUMENTS_NAME,
    FORMAT,
    TOKENIZER_NAME,
    SequenceShardsConfig,
    TokenizedDataset,
    TokenizedWriter,
    read_tokenized_index,
    sequence_shard_name,
)
from flowpin.errors import InternalError

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 4
TOKENIZER = b'{"not": "parsed by the writer"}'


def chunk(first: int, n: int) -> PackedChunk:
    """``n`` sequences whose ids count up from ``first * SEQ_LEN``; each sequence is one document."""
    ids = np.arange(first * SEQ_LEN, (first + n) * SEQ_LEN, dtype=np.int32).reshape(n, SEQ_LEN)
    docs = np.repeat(np.arange(first, first + n, dtype=np.int32), SEQ_LEN).reshape(n, SEQ_LEN)
    return PackedChunk(input_ids=ids, doc_index=docs)


def write(out: Path, *, per_shard: int, chunks: list[tuple[int, int]], tail_tokens: int = 0) -> dict[str, Any]:
    writer = TokenizedWriter(out, SequenceShardsConfig(sequences_per_shard=per_shard, zstd_level=3), seq_len=SEQ_LEN)
    writer.write_tokenizer(TOKENIZER, reused=False)
    for first, n in chunks:
        writer.add_sequences(chunk(first, n))
        for doc in range(first, first + n):
            record = {"id": f"d{doc}", "text": "x" * doc, "source": {"n": doc}}
            writer.add_document(record, index=doc, first_token=doc * SEQ_LEN, tokens=SEQ_LEN, nbytes=doc)
    return writer.finish(
        vocab_size=1000,
        eos_id=0,
        pad_id=1,
        eos_token="<e>",
        pad_token="<p>",
        total_tokens=writer.sequences * SEQ_LEN,
        tail="pad",
        tail_tokens=tail_tokens,
    )


def test_the_writer_cuts_shards_and_the_reader_reads_them_back(tmp_path: Path) -> None:
    index = write(tmp_path, per_shard=2, chunks=[(0, 4), (4, 1)])
    assert [(s["name"], s["first_sequence"], s["sequences"]) for s in index["shards"]] == [
        (sequence_shard_name(0), 0, 2),
        (sequence_shard_name(1), 2, 2),
        (sequence_shard_name(2), 4, 1),
    ]
    assert (tmp_path / INDEX_NAME).read_bytes() == canonical_json(index) + b"\n"
    assert read_tokenized_index(tmp_path) == index and index["format"] == FORMAT
    data = TokenizedDataset.open(tmp_path)
    assert data.tokenizer_json == TOKENIZER and data.n_sequences == 5 and data.n_tokens == 5 * SEQ_LEN
    ids, docs = data.sequences([4, 0, 3])
    assert ids.tolist() == [list(range(16, 20)), [0, 1, 2, 3], list(range(12, 16))]
    assert docs.tolist() == [[4] * SEQ_LEN, [0] * SEQ_LEN, [3] * SEQ_LEN]
    table = data.documents()
    assert [d.id for d in table] == [f"d{i}" for i in range(5)]
    assert table[2].record == {"id": "d2", "source": {"n": 2}} and table[2].bytes == 2  # stored without its text
    entry = index["tokenizer"]
    assert entry == {"name": TOKENIZER_NAME, "sha256": hashlib.sha256(TOKENIZER).hexdigest(), "bytes": len(TOKENIZER)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [INDEX_NAME, TOKENIZER_NAME, DOCUMENTS_NAME, *(sequence_shard_name(i) for i in range(3))]
    )


def test_a_reused_tokenizer_is_recorded_as_input_and_padding_is_counted(tmp_path: Path) -> None:
    writer = TokenizedWriter(tmp_path, SequenceShardsConfig(sequences_per_shard=8, zstd_level=1), seq_len=SEQ_LEN)
    writer.write_tokenizer(TOKENIZER, reused=True)
    padded = chunk(0, 1)
    padded.doc_index[0, 3] = PAD_DOCUMENT
    writer.add_sequences(padded)
    writer.add_document({"id": "d0", "text": "abc"}, index=0, first_token=0, tokens=3, nbytes=3)
    index = writer.finish(
        vocab_size=1000,
        eos_id=0,
        pad_id=1,
        eos_token="<e>",
        pad_token="<p>",
        total_tokens=3,
        tail="pad",
        tail_tokens=3,
    )
    assert index["tokenizer"]["source"] == "input"
    assert index["tail"] == {"policy": "pad", "tokens": 3, "pad_tokens": 1} and index["n_tokens"] == 3


def test_finishing_without_a_tokenizer_is_a_programming_error(tmp_path: Path) -> None:
    writer = TokenizedWriter(tmp_path, SequenceShardsConfig(sequences_per_shard=1, zstd_level=1), seq_len=SEQ_LEN)
    writer.add_sequences(chunk(0, 1))
    with pytest.raises(InternalError, match="write_tokenizer was never called"):
        writer.finish(
            vocab_size=1000,
            eos_id=0,
            pad_id=1,
            eos_token="<e>",
            pad_token="<p>",
            total_tokens=4,
            tail="drop",
            tail_tokens=0,
        )
    assert not (tmp_path / INDEX_NAME).exists()


def _data_imports(module: Path) -> set[str]:
    """The ``flowpin.data`` modules ``module`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(module.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowpin.data."):
            found.add(node.module.removeprefix("flowpin.data."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("flowpin.data.") for a in node.names if a.name.startswith("flowpin.data.")}
    return found


def test_the_data_package_has_no_import_cycle() -> None:
    """Each data module builds on the ones below it (tokenized never on order, tokenizer never on tokenized)."""
    graph = {p.stem: _data_imports(p) for p in (REPO / "src" / "flowpin" / "data").glob("*.py")}
    assert "tokenized" in graph["order"] and "order" not in graph["tokenized"]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
