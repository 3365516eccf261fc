"""Tests for flowpin.data.dedup: exact and fuzzy dedup, order, report, named errors, determinism, recipes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf

from flowpin.canonical import canonical_json
from flowpin.data.dedup import (
    DedupConfig,
    FuzzyConfig,
    NormalizeConfig,
    ReportConfig,
    Shingler,
    dedup_records,
    jaccard,
    normalize,
    run_dedup,
)
from flowpin.data.shards import ShardConfig, read_dataset, read_index, write_dataset
from flowpin.errors import DataError, EmptyCorpusError, RecipeError
from flowpin.recipe import to_config

PARAMS = Path(__file__).resolve().parents[2] / "params"


def fuzzy(**kw: Any) -> FuzzyConfig:
    args: dict[str, Any] = {
        "enabled": True,
        "shingle": "word",
        "shingle_size": 1,
        "num_perm": 128,
        "threshold": 0.8,
        "seed": 7,
        "min_tokens": 0,
        "bands": 32,
        "rows": 4,
    }
    args.update(kw)
    return FuzzyConfig(**args)


def config(*, norm: tuple[bool, bool, bool] = (True, True, True), max_examples: int = 10, **kw: Any) -> DedupConfig:
    lowercase, collapse, strip = norm
    return DedupConfig(
        normalize=NormalizeConfig(lowercase=lowercase, collapse_whitespace=collapse, strip=strip),
        fuzzy=fuzzy(**kw),
        shards=ShardConfig(docs_per_shard=2, zstd_level=3),
        report=ReportConfig(max_examples=max_examples),
    )


def doc(rid: str, text: str) -> dict[str, Any]:
    return {"id": rid, "text": text, "source": {"origin": "test", "path": rid}}


def words(lo: int, hi: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(lo, hi))


def ids(records: Any) -> list[str]:
    return [r["id"] for r in records]


# --- exact ----------------------------------------------------------------------------------------


def test_exact_duplicates_keep_the_first_and_record_the_group() -> None:
    records = [doc("a/1", "alpha beta"), doc("a/2", "gamma"), doc("b/3", "alpha beta"), doc("b/4", "alpha beta")]
    result = dedup_records(records, config(enabled=False))
    assert ids(result.records) == ["a/1", "a/2"]
    assert result.exact_duplicates == 2 and result.fuzzy_duplicates == 0
    (group,) = result.exact_groups
    assert (group.kept, group.duplicates) == ("a/1", ("b/3", "b/4"))
    assert group.sha256 == hashlib.sha256(b"alpha beta").hexdigest()
    assert result.records[0] == records[0]  # survivors are the records, unchanged


@pytest.mark.parametrize(
    ("norm", "dup"),
    [
        ((True, True, True), True),
        ((False, True, True), False),
        ((True, False, True), False),
        ((True, True, False), False),
    ],
)
def test_normalisation_decides_what_is_an_exact_duplicate(norm: tuple[bool, bool, bool], dup: bool) -> None:
    records = [doc("s/a", "Hello  World\n"), doc("s/b", "  hello world")]
    result = dedup_records(records, config(norm=norm, enabled=False))
    assert result.exact_duplicates == (1 if dup else 0)


def test_normalize_order_and_unicode_whitespace() -> None:
    cfg = NormalizeConfig(lowercase=True, collapse_whitespace=True, strip=True)
    assert normalize("\u2003 A\t\u00a0B\n\nC  ", cfg) == "a b c"
    assert normalize(" A ", NormalizeConfig(lowercase=False, collapse_whitespace=False, strip=False)) == " A "


# --- fuzzy ----------------------------------------------------------------------------------------


def test_near_duplicate_above_threshold_is_dropped_with_its_exact_jaccard() -> None:
    base = words(0, 100)
    near = words(0, 90) + " " + words(0, 10, "x")  # 90 shared of 110 distinct: J = 0.8181...
    records = [doc("s/base", base), doc("s/other", words(500, 600)), doc("s/near", near)]
    result = dedup_records(records, config(threshold=0.8))
    assert ids(result.records) == ["s/base", "s/other"]
    (cluster,) = result.fuzzy_clusters
    assert cluster.kept == "s/base"
    assert [(m.id, m.jaccard) for m in cluster.members] == [("s/near", 90 / 110)]
    example = result.report["fuzzy"]["examples"][0]
    assert example == {"kept": "s/base", "size": 2, "members": [{"id": "s/near", "jaccard": round(90 / 110, 6)}]}


def test_near_duplicate_below_threshold_is_kept() -> None:
    records = [doc("s/base", words(0, 100)), doc("s/near", words(0, 90) + " " + words(0, 10, "x"))]
    result = dedup_records(records, config(threshold=0.85))
    assert ids(result.records) == ["s/base", "s/near"]
    assert result.fuzzy_clusters == ()
    fz = result.report["fuzzy"]
    assert fz["candidates_checked"] == 1 and fz["kept_below_threshold"] == 1  # LSH proposed, Jaccard refused


def test_first_occurrence_wins_and_order_is_stable() -> None:
    a, b, c = doc("s/a", words(0, 100)), doc("s/b", words(1000, 1100)), doc("s/c", words(0, 95))
    forward = dedup_records([a, b, c], config())
    backward = dedup_records([c, b, a], config())
    assert ids(forward.records) == ["s/a", "s/b"]
    assert ids(backward.records) == ["s/c", "s/b"]


def test_clusters_do_not_chain_through_dropped_documents() -> None:
    # J(a,b) = J(b,c) = 80/100 >= 0.75, but J(a,c) = 60/100 < 0.75: b joins a's cluster; c is kept.
    a, b, c = doc("s/a", words(0, 90)), doc("s/b", words(10, 100)), doc("s/c", words(20, 110))
    result = dedup_records([a, b, c], config(threshold=0.75))
    assert ids(result.records) == ["s/a", "s/c"]
    assert [(cl.kept, [m.id for m in cl.members]) for cl in result.fuzzy_clusters] == [("s/a", ["s/b"])]


def test_short_documents_skip_the_fuzzy_pass() -> None:
    records = [doc("s/a", "from x import y"), doc("s/b", "from x import z")]  # J = 3/5 on words
    assert ids(dedup_records(records, config(threshold=0.5, min_tokens=0)).records) == ["s/a"]
    kept = dedup_records(records, config(threshold=0.5, min_tokens=5))
    assert ids(kept.records) == ["s/a", "s/b"]
    assert kept.report["fuzzy"]["skipped_short"] == 2
    # Fewer tokens than the shingle size: no shingles, so also skipped rather than compared.
    assert dedup_records(records, config(shingle_size=5)).report["fuzzy"]["skipped_short"] == 2


def test_char_shingles_find_near_duplicate_code() -> None:
    code = "def add(left, right):\n    return left + right\n" * 3
    edited = code.replace("left + right", "left+right")
    records = [doc("s/a", code), doc("s/b", edited), doc("s/c", "class Parser:\n    pass\n" * 3)]
    result = dedup_records(records, config(shingle="char", shingle_size=5, threshold=0.7))
    assert ids(result.records) == ["s/a", "s/c"]
    assert 0.7 <= result.fuzzy_clusters[0].members[0].jaccard < 1


def test_threshold_one_with_a_pinned_layout_drops_equal_shingle_sets() -> None:
    records = [doc("s/a", "alpha, beta; gamma delta"), doc("s/b", "alpha beta gamma (delta)")]
    result = dedup_records(records, config(threshold=1.0))
    assert result.exact_duplicates == 0 and ids(result.records) == ["s/a"]
    assert result.fuzzy_clusters[0].members[0].jaccard == 1.0


def test_fuzzy_can_be_disabled() -> None:
    records = [doc("s/a", words(0, 100)), doc("s/b", words(0, 99))]
    result = dedup_records(records, config(enabled=False))
    assert len(result.records) == 2 and result.report["fuzzy"] == {"enabled": False}


def test_jaccard_and_shingles() -> None:
    sh = Shingler(fuzzy(shingle_size=2))
    a = sh.shingles(sh.tokens("a b c a b"))  # bigrams {ab, bc, ca}
    b = sh.shingles(sh.tokens("a b c d"))  # {ab, bc, cd}
    assert len(a) == 3 and len(b) == 3
    assert jaccard(a, b) == 2 / 4
    assert jaccard(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)) == 0.0


def test_shingle_hashes_are_pinned() -> None:
    # Golden: shingle hashes are content-derived (BLAKE2b-64 words, splitmix64 chars, n-gram polynomial),
    # never Python's salted hash(); a change here changes which pairs the LSH proposes.
    word = Shingler(fuzzy(shingle="word", shingle_size=3))
    char = Shingler(fuzzy(shingle="char", shingle_size=4))
    text = "the quick brown fox jumps over the lazy dog"
    le = "<u8"  # little-endian bytes: the same golden on every platform
    digest = hashlib.sha256(
        word.shingles(word.tokens(text)).astype(le).tobytes() + char.shingles(char.tokens(text)).astype(le).tobytes()
    )
    assert digest.hexdigest() == "d232621983e4ebc46ad5afc7986e30fde39de7950b1a3a66f75d4b9de1f064dd"
    assert not np.array_equal(word.shingles(word.tokens(text + " again")), word.shingles(word.tokens(text)))


# --- report ---------------------------------------------------------------------------------------


def test_report_counts_per_source_and_examples_are_capped() -> None:
    records = [doc("code/x", "same"), *[doc(f"prose/{i}", "same") for i in range(5)], doc("prose/y", "other")]
    records += [doc("code/base", words(0, 100)), doc("code/near", words(0, 98))]
    report = dedup_records(records, config(max_examples=2)).report
    assert report["totals"]["documents_in"] == 9 and report["totals"]["documents_out"] == 3
    assert report["sources"]["code"] == {
        "documents_in": 3,
        "documents_out": 2,
        "exact_duplicates": 0,
        "fuzzy_duplicates": 1,
        "bytes_in": 4 + len(words(0, 100)) + len(words(0, 98)),
        "bytes_out": 4 + len(words(0, 100)),
    }
    assert report["sources"]["prose"]["exact_duplicates"] == 5
    (group,) = report["exact"]["examples"]
    assert group["count"] == 5 and group["duplicates"] == ["prose/0", "prose/1"]  # capped at max_examples
    assert report["fuzzy"]["cluster_sizes"] == {"2": 1}
    assert report["fuzzy"]["lsh"] == {"bands": 32, "rows": 4}
    assert report["params"]["fuzzy"]["threshold"] == 0.8
    canonical_json(report)  # canonical-JSON-safe


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"threshold": 0.0}, "dedup.fuzzy.threshold"),
        ({"threshold": 1.5}, "dedup.fuzzy.threshold"),
        ({"threshold": float("nan")}, "dedup.fuzzy.threshold"),
        ({"num_perm": 8}, "dedup.fuzzy.num_perm"),
        ({"num_perm": 1_000_000}, "dedup.fuzzy.num_perm"),
        ({"shingle_size": 0}, "dedup.fuzzy.shingle_size"),
        ({"shingle": "line"}, "dedup.fuzzy.shingle"),
        ({"seed": 2**32}, "dedup.fuzzy.seed"),
        ({"min_tokens": -1}, "dedup.fuzzy.min_tokens"),
        ({"bands": 4, "rows": None}, "dedup.fuzzy.bands/rows"),
        ({"bands": 64, "rows": 4}, "dedup.fuzzy.bands"),
        ({"bands": 1, "rows": 4}, "dedup.fuzzy.bands"),
    ],
)
def test_bad_recipe_values_name_the_key(kw: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match=rf"^{key}: "):
        config(**kw)


def test_unreachable_lsh_layout_names_the_threshold() -> None:
    # datasketch derives a single band (b < 2) for threshold 1.0, which it refuses.
    with pytest.raises(RecipeError, match=r"^dedup\.fuzzy\.threshold: .*bands"):
        dedup_records([doc("s/a", "x")], config(threshold=1.0, bands=None, rows=None))


def test_empty_input_is_an_empty_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(EmptyCorpusError, match="no document"):
        dedup_records([], config())
    write_dataset([], tmp_path / "in", docs_per_shard=2, level=3)
    with pytest.raises(EmptyCorpusError):
        run_dedup(config(), tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize(
    ("records", "match"),
    [
        ([{"text": "no id"}], "record 0 has no non-empty string 'id'"),
        ([{"id": "s/a", "text": 3}], "'s/a'.*no string 'text'"),
        ([doc("s/a", "x"), doc("s/a", "y")], "record 1: id 's/a' occurs twice"),
    ],
)
def test_malformed_records_are_data_errors(records: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(DataError, match=match):
        dedup_records(records, config())


# --- I/O and determinism --------------------------------------------------------------------------


CORPUS = [
    doc("code/a", words(0, 100)),
    doc("code/b", "Same text"),
    doc("prose/c", "same   text\n"),
    doc("code/d", words(0, 97)),
    doc("prose/e", words(300, 400)),
]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_run_dedup_writes_survivors_and_index_meta(tmp_path: Path) -> None:
    write_dataset(CORPUS, tmp_path / "in", docs_per_shard=2, level=3)
    result = run_dedup(config(), tmp_path / "in", tmp_path / "out")
    assert list(read_dataset(tmp_path / "out")) == [CORPUS[0], CORPUS[1], CORPUS[4]]
    meta = read_index(tmp_path / "out")["dedup"]
    assert meta["totals"] == result.report["totals"]
    assert meta["totals"]["exact_duplicates"] == 1 and meta["totals"]["fuzzy_duplicates"] == 1
    assert [s.name for s in result.shards] == ["shard-00000.jsonl.zst", "shard-00001.jsonl.zst"]


def test_two_runs_are_byte_identical_and_pinned(tmp_path: Path) -> None:
    write_dataset(CORPUS, tmp_path / "in", docs_per_shard=2, level=3)
    one = run_dedup(config(), tmp_path / "in", tmp_path / "one")
    two = run_dedup(config(), tmp_path / "in", tmp_path / "two")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert canonical_json(one.report) == canonical_json(two.report)
    # Golden: the survivors' content. One recipe field changed (a stricter threshold) changes it.
    assert [s.sha256 for s in one.shards] == [
        "8dbbf22a6badb79e3521d2c69aa8bb540a60e274cf8e2406811c52b0d2569b53",
        "ced7a004d3b1312319c2052fcf3a8c6524f37f589b29701ba55b764f43e52f8a",
    ]
    stricter = run_dedup(config(threshold=0.99), tmp_path / "in", tmp_path / "three")
    assert [s.sha256 for s in stricter.shards] != [s.sha256 for s in one.shards]


# --- recipes --------------------------------------------------------------------------------------


def test_reference_recipes_build_and_share_the_method() -> None:
    ref = OmegaConf.load(PARAMS / "dedup.yaml")
    full = OmegaConf.load(PARAMS / "dedup_full.yaml")
    cfg = to_config(DedupConfig, ref.dedup, where="dedup")
    assert cfg.fuzzy.shingle == "word" and 0 < cfg.fuzzy.threshold <= 1
    assert to_config(DedupConfig, full.dedup, where="dedup") == cfg
    assert ref.paths.inputs.corpus.data == "data/ingest" and full.paths.inputs.corpus.data == "data/full/ingest"


def test_unknown_recipe_key_is_a_recipe_error() -> None:
    node = OmegaConf.load(PARAMS / "dedup.yaml").dedup
    node.fuzzy.treshold = 0.5
    with pytest.raises(RecipeError, match=r"^dedup\.fuzzy\.treshold: unknown key"):
        to_config(DedupConfig, node, where="dedup")


def test_config_is_frozen_and_serialisable() -> None:
    cfg = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fuzzy.threshold = 0.5  # type: ignore[misc]
    assert json.loads(canonical_json(dataclasses.asdict(cfg)))["fuzzy"]["bands"] == 32
