"""The tokenize stage: deterministic tokenizer and packed safetensors shards, read back with every check."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import numpy as np
import pytest
import yaml
import zstandard
from safetensors.numpy import save as st_save

from flowpin.canonical import canonical_json
from flowpin.cli import main as flowpin_main
from flowpin.constants import INDEX_NAME, MANIFEST_DIR
from flowpin.data.packing import encode_documents, pack_texts
from flowpin.data.shards import read_shard_bytes, write_dataset
from flowpin.data.tokenize import TokenizeConfig, check_tokenizer_source, run_tokenize
from flowpin.data.tokenized import DOCUMENTS_NAME, TOKENIZER_NAME, TokenizedDataset, dataset_digest
from flowpin.data.tokenizer import (
    PARALLELISM_ENV,
    load_tokenizer,
    tokenizer_bytes,
    tokenizers_single_threaded,
    train_tokenizer,
)
from flowpin.errors import DataError, EmptyCorpusError, InternalError, RecipeError, ShardError, TokenizerError
from flowpin.manifest.record import record
from flowpin.manifest.statement import load_manifest
from flowpin.recipe import to_config
from helpers import Project

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|pad|>"]

# Golden digest of the tokenized synthetic corpus (sha256 directory digest of the output). It changes
# when the tokenizer, packing, shard or index format changes -- or when tokenizers/safetensors change
# the bytes they write: then check the diff is intended and update it.
GOLDEN_DIGEST = "b96dcd28dfae77e5f196c00a9ea27c53214d55a467630f0264e7c68bc9ecd9ba"


def corpus_records() -> list[dict[str, Any]]:
    """Real prose (pydoc topics), an empty document, non-ASCII text and a literal special token."""
    docs: list[dict[str, Any]] = [
        {"id": f"topics/{key}", "text": topics[key][:1200], "source": {"topic": key}} for key in sorted(topics)[:30]
    ]
    docs.insert(3, {"id": "empty", "text": "", "source": {"kind": "edge"}})
    docs.insert(7, {"id": "unicode", "text": "naïve café — 東京 🚀 emoji\n" * 3, "source": {"kind": "edge"}})
    docs.insert(11, {"id": "inject", "text": "a<|endoftext|>b <|pad|> c", "source": {"kind": "edge"}})
    docs.append(dict(docs[5], mix={"repeat": 2}))  # a repeat is a distinct record with the same id
    return docs


def make_cfg(**changes: Any) -> TokenizeConfig:
    tok = {"vocab_size": 400, "min_frequency": 2, "special_tokens": list(SPECIALS), "seed": 7}
    tok.update(changes.pop("tokenizer", {}))
    tok = {k: v for k, v in tok.items() if v is not None}  # None: leave the key out
    packing = {"seq_len": 32, "tail": "pad", **changes.pop("packing", {})}
    shards = {"sequences_per_shard": 100, "zstd_level": 3, **changes.pop("shards", {})}
    assert not changes
    return to_config(
        TokenizeConfig,
        {"tokenizer": tok, "packing": packing, "shards": shards},
        where="tokenize",
    )


def write_corpus(path: Path, records: list[dict[str, Any]]) -> Path:
    write_dataset(records, path, docs_per_shard=8, level=3)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", corpus_records())


def tokenize(corpus: Path, out: Path, cfg: TokenizeConfig | None = None) -> dict[str, Any]:
    out.mkdir(parents=True)
    return run_tokenize(cfg or make_cfg(), corpus, out).report


@pytest.fixture(scope="module")
def tokenized(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "t"
    tokenize(corpus, out)
    return out


def content(directory: Path) -> dict[str, bytes]:
    """Every file's uncompressed content (``.zst`` decompressed)."""
    out = {}
    for p in sorted(directory.iterdir()):
        out[p.name] = read_shard_bytes(p) if p.name.endswith(".zst") else p.read_bytes()
    return out


# --- determinism ----------------------------------------------------------------------------------


def test_two_runs_give_byte_identical_outputs(corpus: Path, tokenized: Path, tmp_path: Path) -> None:
    tokenize(corpus, tmp_path / "again")
    a, b = content(tokenized), content(tmp_path / "again")
    assert {DOCUMENTS_NAME, INDEX_NAME, TOKENIZER_NAME, "seq-00000.safetensors.zst"} <= set(a)
    assert a == b
    assert dataset_digest(tokenized) == dataset_digest(tmp_path / "again")


def synthetic_records() -> list[dict[str, Any]]:
    """A corpus that depends on nothing installed (the pydoc topics differ between Python releases)."""
    line = "def f{i}(x):\n    return x * {i} + {j}  # the quick brown fox jumps over the lazy dog\n"
    return [{"id": f"syn/{i}", "text": line.format(i=i, j=i * i) * (i % 5 + 1)} for i in range(40)]


def test_golden_dataset_digest(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c", synthetic_records())
    tokenize(corpus, tmp_path / "o", make_cfg(tokenizer={"vocab_size": 300}, packing={"seq_len": 16}))
    assert dataset_digest(tmp_path / "o") == GOLDEN_DIGEST


def test_tokenizer_training_is_deterministic_and_thread_independent(tmp_path: Path) -> None:
    texts = [r["text"] for r in corpus_records()]
    cfg = make_cfg().tokenizer
    first = tokenizer_bytes(train_tokenizer(texts, cfg))
    assert tokenizer_bytes(train_tokenizer(texts, cfg)) == first
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = (
        "import json, sys\n"
        "from flowpin.data.tokenizer import TokenizerConfig, tokenizer_bytes, train_tokenizer\n"
        "from flowpin.recipe import to_config\n"
        "texts = json.load(open(sys.argv[1]))\n"
        "cfg = to_config(TokenizerConfig, json.loads(sys.argv[2]))\n"
        "sys.stdout.write(tokenizer_bytes(train_tokenizer(texts, cfg)).decode())\n"
    )
    # Another process (another Rust HashMap seed) with a different thread pool and parallelism allowed.
    env = {**os.environ, "RAYON_NUM_THREADS": "7", "TOKENIZERS_PARALLELISM": "true"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "texts.json"), json.dumps(dataclasses.asdict(cfg))],
        env=env,
        capture_output=True,
        check=True,
    ).stdout
    assert out == first


def test_training_leaves_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Library code takes values: whether HF tokenizers may use its pool is the entry point's to set."""
    monkeypatch.delenv(PARALLELISM_ENV, raising=False)
    before = dict(os.environ)
    train_tokenizer(["abc abc abd"], make_cfg().tokenizer)
    assert dict(os.environ) == before


@pytest.mark.parametrize("before", [None, "true", "false"])
def test_single_threaded_sets_the_parallelism_setting_and_restores_it(
    monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    if before is None:
        monkeypatch.delenv(PARALLELISM_ENV, raising=False)
    else:
        monkeypatch.setenv(PARALLELISM_ENV, before)
    with pytest.raises(KeyError), tokenizers_single_threaded():
        assert os.environ[PARALLELISM_ENV] == "false"
        raise KeyError("restored on the way out of an error too")
    assert os.environ.get(PARALLELISM_ENV) == before


def test_one_recipe_field_changes_the_output(corpus: Path, tokenized: Path, tmp_path: Path) -> None:
    tokenize(corpus, tmp_path / "v", make_cfg(tokenizer={"vocab_size": 420}))
    tokenize(corpus, tmp_path / "s", make_cfg(packing={"seq_len": 33}))
    digests = {dataset_digest(tokenized), dataset_digest(tmp_path / "v"), dataset_digest(tmp_path / "s")}
    assert len(digests) == 3


# --- what is written ------------------------------------------------------------------------------


def test_packing_round_trips_every_document(tokenized: Path) -> None:
    records = corpus_records()
    data = TokenizedDataset.open(tokenized)
    ids, docs = data.sequences(range(data.n_sequences))
    flat_ids, flat_docs = ids.reshape(-1), docs.reshape(-1)
    tok = data.tokenizer()
    table = data.documents()
    assert [d.id for d in table] == [r["id"] for r in records]
    assert table[-1].record["mix"] == {"repeat": 2}
    for i, rec in enumerate(records):
        span = flat_ids[flat_docs == i]
        assert len(span) == table[i].tokens
        assert int(span[-1]) == data.eos_id  # EOS closes every document ...
        assert data.eos_id not in span[:-1].tolist()  # ... and only there: literal "<|endoftext|>" is text
        assert tok.decode(span[:-1].tolist(), skip_special_tokens=False) == rec["text"]
        assert table[i].first_token == int(np.flatnonzero(flat_docs == i)[0])
    assert table[3].tokens == 1  # the empty document is just its EOS
    index = json.loads((tokenized / INDEX_NAME).read_bytes())
    assert (tokenized / INDEX_NAME).read_bytes() == canonical_json(index) + b"\n"
    pad = index["tail"]["pad_tokens"]
    assert pad > 0 and (flat_docs == -1).sum() == pad and (flat_ids[flat_docs == -1] == data.pad_id).all()
    assert index["n_tokens"] == index["total_tokens"] == data.n_sequences * data.seq_len - pad
    assert index["tokenizer"]["sha256"] == hashlib.sha256((tokenized / TOKENIZER_NAME).read_bytes()).hexdigest()
    assert (index["eos_id"], index["pad_id"]) == (0, 1)


def test_drop_tail_leaves_out_the_partial_sequence(corpus: Path, tokenized: Path, tmp_path: Path) -> None:
    report = tokenize(corpus, tmp_path / "d", make_cfg(packing={"tail": "drop"}))
    padded = json.loads((tokenized / INDEX_NAME).read_bytes())
    assert report["sequences"] == padded["n_sequences"] - 1
    assert report["tokens"]["dropped"] == padded["tail"]["tokens"] > 0
    assert report["tokens"]["in_sequences"] + report["tokens"]["dropped"] == report["tokens"]["total"]
    assert TokenizedDataset.open(tmp_path / "d").sequences([0])[1].min() >= 0


def test_shards_are_safetensors_in_single_threaded_one_shot_zstd(tokenized: Path) -> None:
    index = json.loads((tokenized / INDEX_NAME).read_bytes())
    assert len(index["shards"]) == 5 and [s["sequences"] for s in index["shards"]][:2] == [100, 100]
    for shard in index["shards"]:
        frame = (tokenized / shard["name"]).read_bytes()
        raw = zstandard.ZstdDecompressor().decompress(frame)
        assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
        assert zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True).compress(raw) == frame
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert header["input_ids"]["dtype"] == header["doc_index"]["dtype"] == "I32"
        assert header["input_ids"]["shape"] == [shard["sequences"], 32]


def test_report_counts(corpus: Path, tmp_path: Path) -> None:
    report = tokenize(corpus, tmp_path / "r")
    assert report["documents"] == len(corpus_records())
    assert report["tokens"]["eos"] == report["documents"]
    assert report["vocab_size"] == 400
    assert 1 < report["bytes_per_token"] < 10
    assert report["tokenizer"]["train_documents"] == report["documents"]


def test_the_report_is_a_pure_function_of_inputs_and_recipe(corpus: Path, tmp_path: Path) -> None:
    """The report is a DVC output pinned in dvc.lock: wall-clock timings there changed dvc.lock on every fresh
    clone (issue #14). They are run metadata now (the manifest's "timing" note)."""
    first, second = tokenize(corpus, tmp_path / "a"), tokenize(corpus, tmp_path / "b")
    assert "timing" not in first
    assert canonical_json(first) == canonical_json(second)


def test_train_max_bytes_trains_on_a_seeded_sample(corpus: Path, tmp_path: Path) -> None:
    capped = make_cfg(tokenizer={"train_max_bytes": 5000})
    a = tokenize(corpus, tmp_path / "a", capped)
    b = tokenize(corpus, tmp_path / "b", capped)
    c = tokenize(corpus, tmp_path / "c", make_cfg(tokenizer={"train_max_bytes": 5000, "seed": 8}))
    assert a["tokenizer"]["train_bytes"] == 5000 and a["tokenizer"]["train_documents"] < a["documents"]
    assert a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"] != c["tokenizer"]["sha256"]


def test_pack_texts_is_the_pure_core(tokenized: Path) -> None:
    data = TokenizedDataset.open(tokenized)
    texts = [r["text"] for r in corpus_records()]
    chunk, tail = pack_texts(data.tokenizer(), texts, seq_len=32, tail="pad", eos_id=0, pad_id=1)
    ids, docs = data.sequences(range(data.n_sequences))
    assert np.array_equal(chunk.input_ids, ids) and np.array_equal(chunk.doc_index, docs)
    assert tail == json.loads((tokenized / INDEX_NAME).read_bytes())["tail"]["tokens"]
    one = next(encode_documents(data.tokenizer(), ["hello"], eos_id=0))
    assert one.dtype == np.int32 and int(one[-1]) == 0


def test_reference_recipes_are_valid() -> None:
    for name in ("tokenize", "tokenize_full", "tokenize_midtrain", "tokenize_longctx"):
        doc = yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())
        cfg = to_config(TokenizeConfig, doc["tokenize"], where="tokenize")
        assert cfg.packing.seq_len >= 2 and "order" not in doc["tokenize"]  # the training recipe owns the order
        assert set(doc["paths"]) == {"inputs", "out", "report", "manifest"}
        check_tokenizer_source(cfg, has_input="tokenizer" in doc["paths"]["inputs"])


def test_later_stages_reuse_the_pretraining_tokenizer() -> None:
    """Mid-training and long-context data are tokenized with data/tokenize's tokenizer, not a new one."""

    def load(name: str) -> dict[str, Any]:
        doc: dict[str, Any] = yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())
        return doc

    pretrain = load("tokenize")
    for name, seq_len in (("tokenize_midtrain", 256), ("tokenize_longctx", 1024)):
        doc = load(name)
        assert doc["tokenize"]["tokenizer"]["source"] == "input"
        assert doc["paths"]["inputs"]["tokenizer"] == {"data": "data/tokenize", "manifest": "manifests/tokenize.json"}
        for key in ("vocab_size", "special_tokens", "eos_token", "pad_token"):
            assert doc["tokenize"]["tokenizer"][key] == pretrain["tokenize"]["tokenizer"][key]
        assert doc["tokenize"]["packing"]["seq_len"] == seq_len
    assert load("tokenize_longctx")["tokenize"]["packing"]["seq_len"] == 4 * pretrain["tokenize"]["packing"]["seq_len"]


# --- reusing a tokenizer --------------------------------------------------------------------------


def reuse_cfg(**tokenizer: Any) -> TokenizeConfig:
    """A recipe reusing a tokenizer: no training keys (``None`` drops a key)."""
    return make_cfg(tokenizer={"source": "input", "min_frequency": None, "seed": None, **tokenizer})


def test_reusing_the_tokenizer_copies_it_and_packs_like_training_did(
    corpus: Path, tokenized: Path, tmp_path: Path
) -> None:
    """Same corpus, reused tokenizer: the very same sequences; only the index says where it came from."""
    out = tmp_path / "reused"
    out.mkdir()
    report = run_tokenize(reuse_cfg(), corpus, out, tokenizer_dir=tokenized).report
    assert (out / TOKENIZER_NAME).read_bytes() == (tokenized / TOKENIZER_NAME).read_bytes()
    a, b = content(tokenized), content(out)
    assert {k: v for k, v in a.items() if k != INDEX_NAME} == {k: v for k, v in b.items() if k != INDEX_NAME}
    trained, reused = json.loads(a[INDEX_NAME]), json.loads(b[INDEX_NAME])
    assert reused["tokenizer"] == {**trained["tokenizer"], "source": "input"}
    sha256 = trained["tokenizer"]["sha256"]
    del reused["tokenizer"], trained["tokenizer"]
    assert reused == trained
    assert report["tokenizer"] == {"source": "input", "sha256": sha256}
    assert TokenizedDataset.open(out).tokenizer().get_vocab_size() == 400


def test_reused_tokenizer_packs_another_corpus(tokenized: Path, tmp_path: Path) -> None:
    records = synthetic_records()
    other = write_corpus(tmp_path / "c", records)
    out = tmp_path / "o"
    out.mkdir()
    run_tokenize(reuse_cfg(vocab_size=400), other, out, tokenizer_dir=tokenized)
    data = TokenizedDataset.open(out)
    assert data.tokenizer_json == TokenizedDataset.open(tokenized).tokenizer_json
    tok = TokenizedDataset.open(tokenized).tokenizer()
    ids, docs = data.sequences(range(data.n_sequences))
    for i, rec in enumerate(records):
        span = ids.reshape(-1)[docs.reshape(-1) == i]
        assert span[:-1].tolist() == tok.encode(rec["text"], add_special_tokens=False).ids
        assert tok.decode(span[:-1].tolist(), skip_special_tokens=False) == rec["text"]


@pytest.mark.parametrize(
    ("source", "has_input", "key"),
    [("train", True, r"tokenize\.tokenizer\.source: 'train'"), ("input", False, r"paths\.inputs\.tokenizer: missing")],
)
def test_train_and_a_tokenizer_input_or_neither_is_refused(
    source: str, has_input: bool, key: str, corpus: Path, tokenized: Path, tmp_path: Path
) -> None:
    cfg = make_cfg() if source == "train" else reuse_cfg()
    with pytest.raises(RecipeError, match=key):
        check_tokenizer_source(cfg, has_input=has_input)
    (tmp_path / "o").mkdir()
    with pytest.raises(RecipeError, match=key):  # run_tokenize checks it too, before any work
        run_tokenize(cfg, corpus, tmp_path / "o", tokenizer_dir=tokenized if has_input else None)
    assert not any((tmp_path / "o").iterdir())
    check_tokenizer_source(cfg, has_input=not has_input)


@pytest.mark.parametrize(
    ("tokenizer", "key"),
    [
        ({"source": "file"}, r"tokenize\.tokenizer\.source: 'file' is not one of train, input"),
        ({"source": "input"}, r"tokenize\.tokenizer\.min_frequency: only used to train"),
        ({"source": "input", "min_frequency": None}, r"tokenize\.tokenizer\.seed: only used to train"),
        ({"source": "input", "min_frequency": None, "seed": None, "train_max_bytes": 10}, r"train_max_bytes: only"),
        ({"vocab_size": None}, r"tokenize\.tokenizer\.vocab_size: missing; required when .* 'train'"),
        ({"seed": None}, r"tokenize\.tokenizer\.seed: missing"),
    ],
)
def test_tokenizer_source_keys_are_checked(tokenizer: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        make_cfg(tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("tokenizer", "key"),
    [
        ({"special_tokens": ["<|endoftext|>", "<|pad|>", "<|im_start|>"]}, r"tokenize\.tokenizer\.special_tokens:"),
        (
            {"special_tokens": ["<|pad|>", "<|endoftext|>"]},
            r"tokenize\.tokenizer\.special_tokens: \['<\|pad\|>', '<\|endoftext\|>'\], but .*\(in id order\)",
        ),
        ({"eos_token": "<|pad|>", "pad_token": "<|endoftext|>"}, r"tokenize\.tokenizer\.eos_token: '<\|pad\|>', but"),
        ({"vocab_size": 8192}, r"tokenize\.tokenizer\.vocab_size: 8192, but the reused .* has 400 tokens"),
    ],
)
def test_reused_tokenizer_must_match_the_recipe(
    tokenizer: dict[str, Any], key: str, corpus: Path, tokenized: Path, tmp_path: Path
) -> None:
    (tmp_path / "o").mkdir()
    with pytest.raises(RecipeError, match=key):
        run_tokenize(reuse_cfg(**tokenizer), corpus, tmp_path / "o", tokenizer_dir=tokenized)


def test_reused_tokenizer_is_checked_against_its_index(corpus: Path, copy: Path, tmp_path: Path) -> None:
    other = tokenizer_bytes(train_tokenizer(["something else entirely"], make_cfg().tokenizer))
    (copy / TOKENIZER_NAME).write_bytes(other)
    (tmp_path / "o").mkdir()
    with pytest.raises(TokenizerError, match=r"tokenizer.json has sha256 .* does not belong"):
        run_tokenize(reuse_cfg(), corpus, tmp_path / "o", tokenizer_dir=copy)
    with pytest.raises(ShardError, match=r"index\.json is missing"):
        run_tokenize(reuse_cfg(), corpus, tmp_path / "o", tokenizer_dir=tmp_path / "nowhere")


def test_train_tokenizer_refuses_a_reuse_recipe() -> None:
    """A caller's mistake (the stage trains only for 'train'), not the recipe's: an internal error."""
    with pytest.raises(InternalError, match=r"'input' tokenizer recipe; only 'train' trains one"):
        train_tokenizer(["abc"], reuse_cfg().tokenizer)


# --- bad recipes and bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"tokenizer": {"vocab_size": 257}}, "tokenize.tokenizer.vocab_size"),
        ({"tokenizer": {"special_tokens": ["<|endoftext|>"]}}, "tokenize.tokenizer.pad_token"),
        ({"tokenizer": {"min_frequency": 0}}, "tokenize.tokenizer.min_frequency"),
        ({"tokenizer": {"train_max_bytes": 0}}, "tokenize.tokenizer.train_max_bytes"),
        ({"packing": {"seq_len": 1}}, "tokenize.packing.seq_len"),
        ({"packing": {"tail": "wrap"}}, "tokenize.packing.tail"),
        ({"shards": {"zstd_level": 23}}, "tokenize.shards.zstd_level"),
    ],
)
def test_bad_recipe_names_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        make_cfg(**change)


def test_vocab_size_floor_counts_bytes_and_special_tokens() -> None:
    make_cfg(tokenizer={"vocab_size": 258})
    with pytest.raises(RecipeError, match="256 byte tokens"):
        make_cfg(tokenizer={"vocab_size": 257})


def test_empty_corpus(tmp_path: Path) -> None:
    empty = write_corpus(tmp_path / "c", [])
    with pytest.raises(EmptyCorpusError, match="no document"):
        tokenize(empty, tmp_path / "o")


def test_corpus_shorter_than_one_sequence_with_drop(tmp_path: Path) -> None:
    tiny = write_corpus(tmp_path / "c", [{"id": "a", "text": "tiny"}])
    with pytest.raises(EmptyCorpusError, match="seq_len"):
        tokenize(tiny, tmp_path / "o", make_cfg(packing={"tail": "drop"}))
    tokenize(tiny, tmp_path / "p")  # padded: one sequence
    assert TokenizedDataset.open(tmp_path / "p").n_sequences == 1


def test_record_without_text(tmp_path: Path) -> None:
    bad = write_corpus(tmp_path / "c", [{"id": "a", "body": "x"}])
    with pytest.raises(DataError, match="record 0 needs a string 'id' and 'text'"):
        tokenize(bad, tmp_path / "o")


@pytest.fixture
def copy(tokenized: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    dest.mkdir()
    for p in tokenized.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _rewrite_shard(directory: Path, tensors: dict[str, np.ndarray]) -> None:
    """Replace shard 0 with other tensors and re-pin its sha256 in index.json (a consistent forgery)."""
    raw = st_save(tensors)
    (directory / "seq-00000.safetensors.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    index = json.loads((directory / INDEX_NAME).read_bytes())
    index["shards"][0].update(sha256=hashlib.sha256(raw).hexdigest(), uncompressed_bytes=len(raw))
    (directory / INDEX_NAME).write_bytes(canonical_json(index))


def test_corrupt_shard_is_named(copy: Path) -> None:
    path = copy / "seq-00001.safetensors.zst"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="seq-00001"):
        TokenizedDataset.open(copy).sequences([150])


def test_wrong_dtype_is_refused(copy: Path) -> None:
    good = TokenizedDataset.open(copy).shard(0)
    _rewrite_shard(copy, {"input_ids": good.input_ids.astype(np.int64), "doc_index": good.doc_index})
    with pytest.raises(ShardError, match=r"seq-00000.*input_ids has dtype int64"):
        TokenizedDataset.open(copy).sequences([0])


def test_wrong_shape_is_refused(copy: Path) -> None:
    good = TokenizedDataset.open(copy).shard(0)
    _rewrite_shard(copy, {"input_ids": good.input_ids[:50], "doc_index": good.doc_index[:50]})
    with pytest.raises(ShardError, match=r"seq-00000.*shape \[50, 32\], index.json says \[100, 32\]"):
        TokenizedDataset.open(copy).sequences([0])


def test_out_of_vocabulary_ids_are_refused(copy: Path) -> None:
    good = TokenizedDataset.open(copy).shard(0)
    _rewrite_shard(copy, {"input_ids": good.input_ids + 1000, "doc_index": good.doc_index})
    with pytest.raises(ShardError, match=r"outside 0..399"):
        TokenizedDataset.open(copy).sequences([0])


def test_not_safetensors_is_refused(copy: Path) -> None:
    raw = b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all"
    (copy / "seq-00000.safetensors.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    index = json.loads((copy / INDEX_NAME).read_bytes())
    index["shards"][0].update(sha256=hashlib.sha256(raw).hexdigest(), uncompressed_bytes=len(raw))
    (copy / INDEX_NAME).write_bytes(canonical_json(index))
    with pytest.raises(ShardError, match=r"seq-00000.*not a valid safetensors"):
        TokenizedDataset.open(copy).sequences([0])


def test_decompression_is_bounded_by_the_index(copy: Path) -> None:
    index = json.loads((copy / INDEX_NAME).read_bytes())
    index["shards"][0]["uncompressed_bytes"] = 100
    (copy / INDEX_NAME).write_bytes(canonical_json(index))
    with pytest.raises(ShardError, match="above the cap of 100"):
        TokenizedDataset.open(copy).sequences([0])


def test_tokenizer_not_matching_the_index(copy: Path, tmp_path: Path) -> None:
    other = tokenizer_bytes(train_tokenizer(["something else entirely"], make_cfg().tokenizer))
    (copy / TOKENIZER_NAME).write_bytes(other)
    with pytest.raises(TokenizerError, match=r"tokenizer.json has sha256 .* does not belong"):
        TokenizedDataset.open(copy)


def test_garbage_tokenizer_json() -> None:
    with pytest.raises(TokenizerError, match="not a tokenizers JSON"):
        load_tokenizer(b"{not json", where="x/tokenizer.json")


def test_missing_or_malformed_index(copy: Path) -> None:
    (copy / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match=r"index.json is missing"):
        TokenizedDataset.open(copy)
    (copy / INDEX_NAME).write_bytes(b'{"format": {"version": 99}}')
    with pytest.raises(ShardError, match="format"):
        TokenizedDataset.open(copy)


def test_index_with_a_gap_between_shards(copy: Path) -> None:
    index = json.loads((copy / INDEX_NAME).read_bytes())
    index["shards"][1]["first_sequence"] += 1
    (copy / INDEX_NAME).write_bytes(canonical_json(index))
    with pytest.raises(ShardError, match=r"shards\[1\]: first_sequence"):
        TokenizedDataset.open(copy)


def test_document_table_is_checked(copy: Path) -> None:
    path = copy / DOCUMENTS_NAME
    raw = read_shard_bytes(path)
    path.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(raw.replace(b'"inject"', b'"injekt"')))
    with pytest.raises(ShardError, match=r"documents.jsonl.zst content has sha256"):
        TokenizedDataset.open(copy).documents()


# --- the stage script -----------------------------------------------------------------------------


def test_stage_runs_verifies_and_answers_batch(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python stages/tokenize_corpus.py` for real, then verify and batch."""
    root = project.root
    (root / "stages").mkdir()
    (root / "stages" / "tokenize_corpus.py").write_bytes((REPO / "stages" / "tokenize_corpus.py").read_bytes())
    shutil.copytree(REPO / "params", root / "params")
    write_corpus(root / "data" / "corpus", corpus_records())
    with record("mix", recipe={}, code=[], root=root, signer=project.signer) as rec:
        rec.output("data/corpus")
    overrides = [
        "paths.inputs.corpus.data=data/corpus",
        "paths.inputs.corpus.manifest=manifests/mix.json",
        "tokenize.tokenizer.vocab_size=300",
        "tokenize.packing.seq_len=16",
    ]
    env = {**os.environ, "FLOWPIN_ROOT": str(root)}
    env.pop("FLOWPIN_SIGNING_KEY", None)
    env.pop(PARALLELISM_ENV, None)  # as under dvc repro: the stage sets it for its library call only
    proc = subprocess.run(
        [sys.executable, "stages/tokenize_corpus.py", *overrides], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sequences of 16" in proc.stdout
    m = load_manifest(root / MANIFEST_DIR / "tokenize.json")
    assert [s["name"] for s in m.subjects] == ["data/tokenize"]
    assert m.subjects[0]["digest"]["flowpinSha256"] == dataset_digest(root / "data" / "tokenize")
    kinds = {d["name"]: d["annotations"]["kind"] for d in m.dependencies}
    assert kinds["data/corpus"] == "dataset" and kinds["manifests/mix.json"] == "manifest"
    assert kinds["stages/tokenize_corpus.py"] == "code" and kinds["params/tokenize.yaml"] == "config"
    assert m.build["externalParameters"]["overrides"] == overrides
    # The stage runs tokenizers single-threaded, but records the environment it was started with.
    assert PARALLELISM_ENV not in m.environment["envVars"]
    monkeypatch.chdir(root)
    monkeypatch.setenv("FLOWPIN_ROOT", str(root))
    assert flowpin_main(["verify", "manifests/tokenize.json"]) == 0
    order = ["--order-seed", "1", "--batch-size", "4"]  # a dataset has no order of its own
    assert flowpin_main(["batch", "manifests/tokenize.json", "--step", "12345", *order]) == 0
    assert "step 12345" in capsys.readouterr().out


def test_stage_reuses_a_pinned_tokenizer_and_refuses_train_plus_input(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--config-name tokenize_midtrain` for real: the tokenizer is a pinned input; a bad recipe records nothing."""
    root = project.root
    (root / "stages").mkdir()
    (root / "stages" / "tokenize_corpus.py").write_bytes((REPO / "stages" / "tokenize_corpus.py").read_bytes())
    shutil.copytree(REPO / "params", root / "params")
    write_corpus(root / "data" / "corpus", corpus_records())
    write_corpus(root / "data" / "other", synthetic_records())
    with record("mix", recipe={}, code=[], root=root, signer=project.signer) as rec:
        rec.output("data/corpus")
        rec.output("data/other")
    env = {**os.environ, "FLOWPIN_ROOT": str(root)}
    env.pop("FLOWPIN_SIGNING_KEY", None)

    def stage(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "stages/tokenize_corpus.py", *args]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)

    corpus = ["paths.inputs.corpus.data=data/corpus", "paths.inputs.corpus.manifest=manifests/mix.json"]
    trained = stage(*corpus, "tokenize.tokenizer.vocab_size=300", "tokenize.packing.seq_len=16")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    reuse = [
        "--config-name",
        "tokenize_midtrain",
        "paths.inputs.corpus.data=data/other",
        "paths.inputs.corpus.manifest=manifests/mix.json",
        "tokenize.tokenizer.vocab_size=300",
        "tokenize.packing.seq_len=64",
    ]
    proc = stage(*reuse)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = load_manifest(root / MANIFEST_DIR / "tokenize_midtrain.json")
    kinds = {d["name"]: d["annotations"]["kind"] for d in m.dependencies}
    assert kinds["data/tokenize"] == "dataset" and kinds["manifests/tokenize.json"] == "manifest"
    assert kinds["data/tokenize/tokenizer.json"] == "tokenizer" and kinds["params/tokenize_midtrain.yaml"] == "config"
    pretrain, midtrain = (TokenizedDataset.open(root / "data" / n) for n in ("tokenize", "tokenize_midtrain"))
    assert midtrain.tokenizer_json == pretrain.tokenizer_json and midtrain.seq_len == 64
    assert midtrain.index["tokenizer"]["source"] == "input"
    monkeypatch.chdir(root)
    monkeypatch.setenv("FLOWPIN_ROOT", str(root))
    assert flowpin_main(["verify", "manifests/tokenize_midtrain.json"]) == 0
    before = (root / MANIFEST_DIR / "tokenize_midtrain.json").read_bytes()
    # Train and a tokenizer input: refused before anything is recorded (the manifest stays as it was).
    train = ["tokenize.tokenizer.source=train", "+tokenize.tokenizer.min_frequency=2", "+tokenize.tokenizer.seed=1"]
    bad = stage(*reuse, *train)
    assert bad.returncode != 0
    assert "tokenize.tokenizer.source: 'train' trains a new tokenizer" in bad.stderr
    assert (root / MANIFEST_DIR / "tokenize_midtrain.json").read_bytes() == before
    # Reuse without a tokenizer input: refused, naming the missing input.
    bad = stage(*reuse, "~paths.inputs.tokenizer")
    assert bad.returncode != 0 and "paths.inputs.tokenizer: missing" in bad.stderr
    assert (root / MANIFEST_DIR / "tokenize_midtrain.json").read_bytes() == before
