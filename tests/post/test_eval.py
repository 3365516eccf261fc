"""Tests for the eval stage's library: flowpin.post.eval (run_eval) and its parts eval_config, eval_inputs,
eval_metrics and eval_report: bits-per-byte, pass@1, the table, and every refusal.

Bits-per-byte is checked on stub models whose probabilities are known (uniform: exactly log2(V) bits per
token; bigram: the NLL does not depend on the window or batch size, since every token is predicted once
from the token before it); greedy decoding and grading on a scripted model that writes a right answer;
the whole library path (checkpoint -> table) on a real tiny Megatron model, twice, byte for byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from torch import nn

from flowpin.canonical import canonical_json
from flowpin.data.shards import write_dataset
from flowpin.data.synth import Task, task_record
from flowpin.data.tokenizer import TokenizerConfig, train_tokenizer
from flowpin.errors import (
    ArtifactMissingError,
    CheckpointMissingError,
    DataError,
    DecontaminationReportError,
    HeldoutOverlapError,
    InternalError,
    RecipeError,
)
from flowpin.manifest.record import record
from flowpin.post.eval import run_eval
from flowpin.post.eval_config import EvalConfig
from flowpin.post.eval_inputs import (
    Decontamination,
    EvalInputs,
    check_heldout_disjoint,
    check_inputs,
    load_decontamination,
    read_heldout_text,
)
from flowpin.post.eval_metrics import bits_per_byte, greedy_responses, pass_at_1, token_windows
from flowpin.post.eval_report import (
    DECONTAMINATION_NAME,
    MARKDOWN_NAME,
    RESPONSES_NAME,
    TABLE_NAME,
    render_markdown,
)
from flowpin.post.inputs import first_per_kind
from flowpin.post.prompts import Vocab
from flowpin.post.verifiers import verify
from flowpin.recipe import StagePaths, to_config, to_plain
from flowpin.train.checkpoint import (
    CheckpointRef,
    DataPosition,
    TrainState,
    capture_rng,
    latest_checkpoint,
    save_checkpoint,
)
from flowpin.train.distributed import destroy, init_distributed, set_deterministic
from flowpin.train.transformer import ModelConfig, build_model
from helpers import Project

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- stub models (the megatron GPT call: model(ids, positions, attention_mask) -> [B, T, V] logits) ---


class Uniform(nn.Module):
    """Equal logits for all ``vocab`` tokens; remembers the longest input it was given."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.longest = 0

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: None) -> torch.Tensor:
        self.longest = max(self.longest, ids.shape[1])
        return torch.zeros(*ids.shape, self.vocab)


class Bigram(nn.Module):
    """Logits that depend on the current token only (a fixed random table)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: None) -> torch.Tensor:
        return self.table[ids]


class Scripted(nn.Module):
    """Always continues token ``a`` with ``follow[a]`` (argmax); other tokens continue with ``default``."""

    def __init__(self, vocab: int, follow: Mapping[int, int], default: int) -> None:
        super().__init__()
        self.table = torch.zeros(vocab, vocab)
        self.table[:, default] = 1.0
        for a, b in follow.items():
            self.table[a] = 0.0
            self.table[a, b] = 10.0

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: None) -> torch.Tensor:
        return self.table[ids]


# --- bits per byte ----------------------------------------------------------------------------------


def test_token_windows_predict_every_token_once_with_the_context_token_first() -> None:
    assert token_windows([1, 2, 3, 4, 5], window=2, context_id=0) == [[0, 1, 2], [2, 3, 4], [4, 5]]
    assert token_windows([7], window=256, context_id=0) == [[0, 7]]
    predicted = [t for w in token_windows(list(range(1, 11)), window=3, context_id=0) for t in w[1:]]
    assert predicted == list(range(1, 11))


def test_a_uniform_model_scores_log2_v_bits_per_token() -> None:
    model = Uniform(16)
    docs = [list(range(1, 11)), [3, 4, 5]]
    result = bits_per_byte(model, docs, n_bytes=40, window=4, context_id=0, pad_id=15, batch_size=3)
    assert result.tokens == 13
    assert result.windows == 3 + 1
    assert result.nats == pytest.approx(13 * math.log(16), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(13 * 4 / 40, rel=1e-6)  # tokens * log2(V) / bytes
    assert result.nats_per_token == pytest.approx(math.log(16), rel=1e-6)
    assert model.longest <= 4  # the model never sees more than one window


def test_bits_per_byte_does_not_depend_on_window_or_batch_for_a_bigram_model() -> None:
    model = Bigram(12)
    docs = [[5, 3, 9, 9, 1, 4, 7, 2, 8], [6, 6, 10]]
    expected = 0.0
    for doc in docs:
        seq = [0, *doc]
        logp = torch.log_softmax(model.table, dim=-1)
        expected -= sum(float(logp[a, b]) for a, b in itertools.pairwise(seq))
    for window in (1, 2, 5, 100):
        for batch in (1, 4):
            got = bits_per_byte(model, docs, n_bytes=30, window=window, context_id=0, pad_id=11, batch_size=batch)
            assert got.tokens == 12
            assert got.nats == pytest.approx(expected, rel=1e-6)
            assert got.bits_per_byte == pytest.approx(expected / (math.log(2) * 30), rel=1e-6)


def test_bits_per_byte_refuses_empty_text() -> None:
    with pytest.raises(DataError, match="byte"):
        bits_per_byte(Uniform(4), [[1]], n_bytes=0, window=4, context_id=0, pad_id=3, batch_size=1)


# --- tasks, greedy decoding, pass@1 -------------------------------------------------------------------


def task(kind: str, n: int, answer: str = "7") -> Task:
    return Task(
        id=f"synth/heldout/{kind}/{n}",
        kind=kind,
        prompt=f"What is {answer} + 0?",
        solution=f"Answer: {answer}",
        answer=answer,
    )


def test_first_per_kind_takes_the_first_n_of_each_kind_in_order() -> None:
    tasks = [task("arithmetic", i) for i in range(3)] + [task("word_problem", i) for i in range(2)]
    assert [t.id for t in first_per_kind(tasks, 2)] == [
        "synth/heldout/arithmetic/0",
        "synth/heldout/arithmetic/1",
        "synth/heldout/word_problem/0",
        "synth/heldout/word_problem/1",
    ]
    assert first_per_kind(tasks, None) == tasks
    assert first_per_kind(tasks, 5) == tasks
    mixed = [task("word_problem", 0), task("arithmetic", 0), task("word_problem", 1), task("arithmetic", 1)]
    assert first_per_kind(mixed, 1) == mixed[:2]  # kinds stay interleaved as in the held-out order


def test_pass_at_1_per_kind_and_micro_averaged() -> None:
    tasks = [task("word_problem", 0), task("arithmetic", 0), task("arithmetic", 1), task("arithmetic", 2)]
    scores = pass_at_1(tasks, [False, True, False, True])
    assert list(scores["by_kind"]) == ["word_problem", "arithmetic"]  # order of first appearance
    assert scores["by_kind"]["arithmetic"] == {"n": 3, "passed": 2, "pass_at_1": 2 / 3}
    assert scores["by_kind"]["word_problem"] == {"n": 1, "passed": 0, "pass_at_1": 0.0}
    assert scores["overall"] == {"n": 4, "passed": 2, "pass_at_1": 0.5}
    with pytest.raises(InternalError, match="grades"):  # a caller's bug, not the recipe's
        pass_at_1(tasks, [True])


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    texts = [f"What is {a} + {b}?\n{a} + {b} = {a + b}. Answer: {a + b}" for a in range(20) for b in range(5)]
    texts += ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20
    cfg = TokenizerConfig(vocab_size=320, min_frequency=2, special_tokens=("<|endoftext|>", "<|pad|>"), seed=0)
    tok: Tokenizer = train_tokenizer(texts, cfg)
    return Vocab(tokenizer=tok, eos_id=0, pad_id=1)


def test_greedy_decoding_of_a_right_answer_passes_and_a_runaway_does_not(vocab: Vocab) -> None:
    tasks = [task("arithmetic", 0, "7"), task("word_problem", 0, "7")]
    answer = vocab.tokenizer.encode("Answer: 7").ids
    newline = vocab.tokenizer.encode("\n").ids[0]
    prompt_ends = {vocab.prompt_ids(t.prompt)[-1] for t in tasks}
    chain = dict(zip(answer, [*answer[1:], newline], strict=True))
    assert len(chain) == len(answer) and not prompt_ends & set(chain)  # a well-defined script
    follow = {end: answer[0] for end in prompt_ends} | chain
    model = Scripted(vocab.tokenizer.get_vocab_size(), follow, default=answer[0])
    out = greedy_responses(model, vocab, [t.prompt for t in tasks], max_new_tokens=20, batch_size=1, max_len=64)
    assert [r.text for r in out] == ["Answer: 7\n", "Answer: 7\n"]
    assert all(r.stopped and r.tokens == len(answer) + 1 for r in out)
    assert pass_at_1(tasks, [verify(t, r.text) for t, r in zip(tasks, out, strict=True)])["overall"][
        "pass_at_1"
    ] == pytest.approx(1.0)
    # A model that never writes a stop token runs to max_new_tokens and is reported as not stopped.
    loop = Scripted(vocab.tokenizer.get_vocab_size(), {}, default=answer[0])
    out = greedy_responses(loop, vocab, [tasks[0].prompt], max_new_tokens=5, batch_size=4, max_len=64)
    assert out[0].tokens == 5 and not out[0].stopped and not verify(tasks[0], out[0].text)


# --- the table ----------------------------------------------------------------------------------------


DECON_SUMMARY: dict[str, Any] = {  # what load_decontamination returns; the table adds the name of its copy
    "source": "reports/decontaminate.json",
    "sha256": "ab" * 32,
    "ngram": {"n": 13, "tokenizer": "lower_alnum"},
    "heldout_sets": ["synth-heldout"],
    "evals": [
        {"name": "humaneval", "items": 164, "documents_removed": 3, "eval_items_hit": 2},
        {"name": "synth-heldout", "items": 500, "documents_removed": 0, "eval_items_hit": 0},
    ],
    "documents_in": 6307,
    "documents_out": 6304,
    "removed_ngram": 3,
    "removed_expansion": 0,
}


def test_markdown_has_one_row_per_checkpoint_and_the_decontamination_summary() -> None:
    scores = pass_at_1([task("arithmetic", 0), task("arithmetic", 1), task("word_problem", 0)], [True, False, False])
    table = {
        "text": {
            "bytes": 100,
            "tokens": 30,
            "source": "python-stdlib:3.11.7",
            "files": [{"path": "a/b.py"}],
            "window": 8,
        },
        "tasks": {
            "kinds": {"arithmetic": 2, "word_problem": 1},
            "max_new_tokens": 40,
            "verifier": {"function": "v.verify", "by_kind": {"arithmetic": "exact", "word_problem": "exact"}},
            "per_kind": 2,
        },
        "decontamination": {"file": DECONTAMINATION_NAME, **DECON_SUMMARY},
        "rows": [
            {"stage": "pretrain", "checkpoint": {"step": 150}, "bits_per_byte": 2.28651, "pass_at_1": scores},
            {"stage": "sft", "checkpoint": {"step": 40}, "bits_per_byte": 2.5, "pass_at_1": pass_at_1([], [])},
        ],
    }
    md = render_markdown(table)
    assert md.endswith("\n")
    lines = md.splitlines()
    assert lines[-4:] == [
        "| stage | checkpoint step | bits/byte | pass@1 arithmetic | pass@1 word_problem | pass@1 overall | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| pretrain | 150 | 2.2865 | 0.500 (1/2) | 0.000 (0/1) | 0.333 (1/3) | 3 |",
        "| sft | 40 | 2.5000 | - | - | - | 0 |",
    ]
    assert "100 UTF-8 bytes (30 tokens)" in md and "windows of 8 predicted tokens" in md
    assert "humaneval (164 items): 3 removed; synth-heldout (500 items): 0 removed" in md
    assert "the first 2 held-out tasks of each kind (arithmetic: 2, word_problem: 1)" in md
    assert "graded by `v.verify` (arithmetic: exact, word_problem: exact)" in md


# --- held-out text ------------------------------------------------------------------------------------


def write_stdlib(root: Path) -> Path:
    lib = root / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "a.py").write_text("x = 1\n")
    (lib / "pkg" / "b.py").write_text("def f():\n    return 2\n")
    (lib / "latin.py").write_bytes(b"# caf\xe9\n")
    (lib / "empty.py").write_bytes(b"")
    return lib


def ingest_record(path: str, raw: bytes, origin: str = "python-stdlib 3.11.7") -> dict[str, Any]:
    return {
        "id": f"stdlib/{path}",
        "text": raw.decode(),
        "source": {
            "origin": origin,
            "path": path,
            "license": "PSF-2.0",
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
    }


def write_ingest(root: Path, records: list[dict[str, Any]]) -> Path:
    write_dataset(records, root / "ingest", docs_per_shard=8, level=3)
    return root / "ingest"


def test_held_out_text_disjoint_from_the_ingest_records_passes(tmp_path: Path) -> None:
    lib = write_stdlib(tmp_path)
    docs = read_heldout_text(lib, ["pkg/a.py", "pkg/b.py"])
    assert [(d.path, d.bytes) for d in docs] == [("pkg/a.py", 6), ("pkg/b.py", 22)]
    assert docs[0].sha256 == hashlib.sha256(b"x = 1\n").hexdigest()
    ingest = write_ingest(tmp_path, [ingest_record("os.py", b"import sys\n"), ingest_record("json/x.py", b"y = 2\n")])
    assert check_heldout_disjoint(docs, ingest) == 2


def test_held_out_text_the_corpus_ingested_is_refused(tmp_path: Path) -> None:
    lib = write_stdlib(tmp_path)
    docs = read_heldout_text(lib, ["pkg/a.py", "pkg/b.py"])
    same_bytes = write_ingest(tmp_path / "one", [ingest_record("other/copy.py", b"def f():\n    return 2\n")])
    with pytest.raises(HeldoutOverlapError, match=r"pkg/b\.py is ingest record 'stdlib/other/copy\.py'"):
        check_heldout_disjoint(docs, same_bytes)
    same_path = write_ingest(tmp_path / "two", [ingest_record("pkg/a.py", b"x = 1  # another Python\n")])
    with pytest.raises(HeldoutOverlapError, match=r"pkg/a\.py"):
        check_heldout_disjoint(docs, same_path)
    topic = write_ingest(tmp_path / "three", [ingest_record("pkg/a.py", b"prose\n", origin="pydoc_data.topics 3.11")])
    assert check_heldout_disjoint(docs, topic) == 1  # a pydoc topic's path is not a stdlib file's


def test_held_out_text_must_exist_and_be_utf8(tmp_path: Path) -> None:
    lib = write_stdlib(tmp_path)
    with pytest.raises(ArtifactMissingError, match=r"eval\.text\.files\[1\]: pkg/missing\.py"):
        read_heldout_text(lib, ["pkg/a.py", "pkg/missing.py"])
    with pytest.raises(DataError, match="not UTF-8"):
        read_heldout_text(lib, ["latin.py"])
    with pytest.raises(DataError, match="empty"):
        read_heldout_text(lib, ["empty.py"])


# --- recipe and inputs --------------------------------------------------------------------------------


def base_recipe() -> dict[str, Any]:
    plain = OmegaConf.to_container(OmegaConf.load(REPO / "params" / "eval.yaml"))
    assert isinstance(plain, dict)
    return {str(k): v for k, v in plain.items()}


def eval_config(**changes: Any) -> EvalConfig:
    block = base_recipe()["eval"]
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = block
        for p in parents:
            node = node[p]
        node[last] = value
    return to_config(EvalConfig, block, where="eval")


def test_the_reference_recipe_names_all_six_stages_and_their_roles() -> None:
    plain = base_recipe()
    cfg = to_config(EvalConfig, plain["eval"], where="eval")
    paths = to_config(StagePaths, plain["paths"], where="paths")
    assert cfg.stages == ("pretrain", "midtrain", "longctx", "sft", "dpo", "rlvr")
    assert set(paths.inputs) == {*cfg.stages, "synth", "tokenizer", "decontaminate", "ingest"}
    assert cfg.text.window <= 256


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"stages": []}, r"eval\.stages"),
        ({"stages": ["pretrain", "pretrain"]}, r"eval\.stages: .* twice"),
        ({"stages": ["synth"]}, r"eval\.stages\[0\]: 'synth' is a data input role"),
        ({"stages": ["Pre train"]}, r"eval\.stages\[0\]"),
        ({"text__window": 0}, r"eval\.text\.window"),
        ({"text__batch_size": 0}, r"eval\.text\.batch_size"),
        ({"text__files": []}, r"eval\.text\.files"),
        ({"text__files": ["/usr/lib/python3.11/os.py"]}, r"eval\.text\.files\[0\]"),
        ({"text__files": ["../secrets.py"]}, r"eval\.text\.files\[0\]"),
        ({"text__files": ["a//b.py"]}, r"eval\.text\.files\[0\]"),
        ({"text__files": ["a.py", "a.py"]}, r"eval\.text\.files: .* twice"),
        ({"tasks__per_kind": 0}, r"eval\.tasks\.per_kind"),
        ({"tasks__max_new_tokens": 0}, r"eval\.tasks\.max_new_tokens"),
        ({"tasks__batch_size": -1}, r"eval\.tasks\.batch_size"),
        ({"decontamination_report": "/reports/decontaminate.json"}, r"eval\.decontamination_report"),
        ({"threads": 0}, r"eval\.threads"),
        ({"temperature": 0.7}, r"eval\.temperature: unknown key"),
        ({"tasks__temperature": 0.7}, r"eval\.tasks\.temperature: unknown key"),
    ],
)
def test_invalid_recipes_name_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        eval_config(**changes)


MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=320,
    max_sequence_length=64,
    sliding_window=8,
)


def fake_run(root: Path, stage: str, *, steps: tuple[int, ...] = (10,), context: int = 64) -> None:
    """A checkpoints directory with complete-looking checkpoints (state.json) and model.json, and a manifest."""
    ckpts = root / "runs" / stage / "checkpoints"
    for step in steps:
        (ckpts / f"step-{step:06d}").mkdir(parents=True)
        (ckpts / f"step-{step:06d}" / "state.json").write_text("{}")
    cfg = dataclasses.replace(MODEL, max_sequence_length=context)
    (ckpts / "model.json").write_bytes(canonical_json(to_plain(cfg)))
    (root / "manifests").mkdir(exist_ok=True)
    (root / "manifests" / f"{stage}.json").write_text("{}")


def stage_paths(root: Path, stages: list[str]) -> StagePaths:
    inputs = {
        role: {"data": f"data/{role}", "manifest": f"manifests/{name}.json"}
        for role, name in (
            ("synth", "synth"),
            ("tokenizer", "tokenize"),
            ("decontaminate", "decontaminate"),
            ("ingest", "ingest"),
        )
    }
    for role in inputs.values():
        (root / "manifests").mkdir(exist_ok=True)
        (root / role["manifest"]).write_text("{}")
    inputs |= {s: {"data": f"runs/{s}/checkpoints", "manifest": f"manifests/{s}.json"} for s in stages}
    return to_config(StagePaths, {"inputs": inputs, "out": "data/eval", "report": "r.json", "manifest": "m.json"})


def test_check_inputs_finds_the_latest_checkpoint_of_each_stage(tmp_path: Path) -> None:
    fake_run(tmp_path, "pretrain", steps=(50, 150, 100))
    fake_run(tmp_path, "sft", steps=(7,))
    cfg = eval_config(stages=["pretrain", "sft"], text__window=64)
    refs = check_inputs(cfg, stage_paths(tmp_path, ["pretrain", "sft"]), tmp_path)
    assert list(refs) == ["pretrain", "sft"]
    assert (refs["pretrain"].step, refs["sft"].step) == (150, 7)


def test_a_stage_that_has_not_run_is_refused_naming_it(tmp_path: Path) -> None:
    fake_run(tmp_path, "pretrain")
    paths = stage_paths(tmp_path, ["pretrain", "sft"])
    cfg = eval_config(stages=["pretrain", "sft"], text__window=64)
    with pytest.raises(CheckpointMissingError, match=r"manifests/sft\.json is missing; .*dvc repro sft"):
        check_inputs(cfg, paths, tmp_path)
    (tmp_path / "manifests" / "sft.json").write_text("{}")
    with pytest.raises(
        CheckpointMissingError, match=r"paths\.inputs\.sft\.data: .* no complete checkpoint.*dvc repro sft"
    ):
        check_inputs(cfg, paths, tmp_path)
    (tmp_path / "runs" / "sft" / "checkpoints" / ".step-000003.tmp").mkdir(parents=True)  # an interrupted save
    assert latest_checkpoint(tmp_path / "runs" / "sft" / "checkpoints") is None
    with pytest.raises(CheckpointMissingError, match="dvc repro sft"):
        check_inputs(cfg, paths, tmp_path)


def test_stages_and_checkpoint_roles_must_agree(tmp_path: Path) -> None:
    fake_run(tmp_path, "pretrain")
    fake_run(tmp_path, "midtrain")
    with pytest.raises(RecipeError, match=r"eval\.stages\[1\]: 'midtrain' has no paths\.inputs\.midtrain"):
        check_inputs(
            eval_config(stages=["pretrain", "midtrain"], text__window=64), stage_paths(tmp_path, ["pretrain"]), tmp_path
        )
    with pytest.raises(RecipeError, match=r"paths\.inputs\.midtrain: .*~paths\.inputs\.midtrain"):
        check_inputs(
            eval_config(stages=["pretrain"], text__window=64), stage_paths(tmp_path, ["pretrain", "midtrain"]), tmp_path
        )


def test_a_window_longer_than_a_models_context_is_refused(tmp_path: Path) -> None:
    fake_run(tmp_path, "pretrain", context=32)
    with pytest.raises(
        RecipeError, match=r"eval\.text\.window: 64 tokens is longer than the pretrain model's context \(32\)"
    ):
        check_inputs(eval_config(stages=["pretrain"], text__window=64), stage_paths(tmp_path, ["pretrain"]), tmp_path)


# --- the decontamination report -----------------------------------------------------------------------

REPORT = {
    "evals": [{"name": "synth-heldout", "items": 5}, {"name": "humaneval", "items": 164}],
    "detection": [
        {"name": "synth-heldout", "documents_removed": 1, "eval_items_hit": 1, "ngrams_matched": 2, "documents": []},
        {"name": "humaneval", "documents_removed": 0, "eval_items_hit": 0, "ngrams_matched": 0, "documents": []},
    ],
    "ngram": {"n": 13, "tokenizer": "lower_alnum", "min_matches": 1},
    "expansion": {"documents_removed": 0},
    "totals": {"documents_in": 10, "documents_out": 9, "removed_ngram": 1, "removed_expansion": 0},
}


def record_decontaminate(project: Project, evals: list[dict[str, str]]) -> dict[str, str]:
    """A signed decontaminate manifest that read data/synth and wrote reports/decontaminate.json."""
    root = project.root
    (root / "data" / "synth" / "heldout").mkdir(parents=True, exist_ok=True)
    (root / "data" / "synth" / "heldout" / "t.txt").write_text("What is 1 + 1?\n")
    (root / "data" / "decontaminate").mkdir(parents=True, exist_ok=True)
    (root / "data" / "decontaminate" / "x.txt").write_text("kept\n")
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports" / "decontaminate.json").write_bytes(canonical_json(REPORT) + b"\n")
    recipe = {"decontaminate": {"evals": evals}}
    with record("decontaminate", recipe=recipe, code=[], root=root, signer=project.signer) as rec:
        synth = rec.input("data/synth")
        rec.output("data/decontaminate")
        rec.byproduct("reports/decontaminate.json")
    return {synth.algorithm: synth.digest}


def load(project: Project, synth: Mapping[str, str]) -> Decontamination:
    return load_decontamination(
        project.root / "reports" / "decontaminate.json",
        report_name="reports/decontaminate.json",
        manifest=project.manifest_path("decontaminate"),
        synth_name="data/synth",
        synth_digest=synth,
    )


def test_the_decontamination_report_is_checked_against_its_manifest(project: Project) -> None:
    synth = record_decontaminate(project, [{"name": "synth-heldout", "kind": "synth_heldout"}])
    got = load(project, synth)
    assert got.raw == (project.root / "reports" / "decontaminate.json").read_bytes()
    assert got.summary["sha256"] == hashlib.sha256(got.raw).hexdigest()
    assert got.summary["heldout_sets"] == ["synth-heldout"]
    assert got.summary["evals"][0] == {"name": "synth-heldout", "items": 5, "documents_removed": 1, "eval_items_hit": 1}
    assert (got.summary["documents_in"], got.summary["documents_out"], got.summary["ngram"]["n"]) == (10, 9, 13)

    with pytest.raises(DecontaminationReportError, match="did not read the synth data"):
        load(project, {"sha256": "0" * 64})
    (project.root / "reports" / "decontaminate.json").write_text(json.dumps(REPORT))  # same content, other bytes
    with pytest.raises(DecontaminationReportError, match=r"not the report decontaminate\.json vouches for"):
        load(project, synth)


def test_a_decontamination_without_the_held_out_set_is_refused(project: Project) -> None:
    synth = record_decontaminate(project, [{"name": "humaneval", "kind": "humaneval"}])
    with pytest.raises(DecontaminationReportError, match="no synth_heldout evaluation set"):
        load(project, synth)


# --- the library end to end on a real tiny Megatron model -----------------------------------------------


@pytest.fixture(scope="module")
def megatron() -> Iterator[None]:
    init_distributed()
    yield
    destroy()


def tiny_checkpoint(root: Path, vocab_size: int) -> Path:
    cfg = dataclasses.replace(MODEL, vocab_size=vocab_size)
    model = build_model(cfg, device="cpu", seed=3)
    state = TrainState(
        step=4,
        tokens_seen=0,
        data=DataPosition(dataset_digest="d" * 64, order_seed=1, batch_size=1, next_step=4),
        lr=0.0,
        config={},
        rng=capture_rng(),
    )
    ckpts = root / "runs" / "tiny" / "checkpoints"
    save_checkpoint(ckpts / "step-000004", state, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    (ckpts / "model.json").write_bytes(canonical_json(to_plain(cfg)))
    return ckpts


def heldout_inputs(root: Path, vocab: Vocab, checkpoints: Mapping[str, CheckpointRef]) -> tuple[EvalInputs, list[Task]]:
    """EvalInputs over a scratch stdlib, held-out split and ingest dataset; the held-out tasks written."""
    lib = write_stdlib(root)
    tasks = [task("arithmetic", i, str(i)) for i in range(3)] + [task("word_problem", 0, "4")]
    write_dataset([task_record(t) for t in tasks], root / "synth" / "heldout", docs_per_shard=8, level=3)
    inputs = EvalInputs(
        checkpoints=checkpoints,
        vocab=vocab,
        synth_dir=root / "synth",
        ingest_dir=write_ingest(root, [ingest_record("os.py", b"import sys\n")]),
        stdlib_root=lib,
        stdlib_uri="python-stdlib:test",
        decontamination=Decontamination(raw=b'{"report": 1}\n', summary=DECON_SUMMARY),
    )
    return inputs, tasks


def tiny_eval_config(**changes: Any) -> EvalConfig:
    return eval_config(
        **{
            "stages": ["tiny"],
            "text__files": ["pkg/a.py", "pkg/b.py"],
            "text__window": 8,
            "tasks__per_kind": 2,
            "tasks__max_new_tokens": 3,
            "threads": 1,
            **changes,
        }
    )


def test_run_eval_writes_the_same_table_twice(tmp_path: Path, vocab: Vocab, megatron: None) -> None:
    ref = latest_checkpoint(tiny_checkpoint(tmp_path, vocab.tokenizer.get_vocab_size()))
    assert ref is not None
    inputs, tasks = heldout_inputs(tmp_path, vocab, {"tiny": ref})
    cfg = tiny_eval_config()
    outs = [tmp_path / "out1", tmp_path / "out2"]
    results = []
    for out in outs:
        out.mkdir()
        determinism = set_deterministic(cfg.seed, cpu_threads=cfg.threads)  # what stages/eval.py does first
        results.append(run_eval(cfg, inputs, out, determinism=determinism))
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted([TABLE_NAME, MARKDOWN_NAME, RESPONSES_NAME, DECONTAMINATION_NAME])
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert (outs[0] / DECONTAMINATION_NAME).read_bytes() == inputs.decontamination.raw
    table = json.loads((outs[0] / TABLE_NAME).read_bytes())
    assert table == results[0].table
    (row,) = table["rows"]
    assert row["stage"] == "tiny" and row["checkpoint"]["step"] == 4 and row["context"] == 64
    assert 0 < row["bits_per_byte"] < 64
    assert row["pass_at_1"]["overall"]["n"] == 3  # two arithmetic tasks, one word problem
    assert table["tasks"]["ids"] == [t.id for t in (tasks[0], tasks[1], tasks[3])]
    assert table["tasks"]["verifier"] == {
        "function": "flowpin.post.verifiers.verify",
        "by_kind": {"arithmetic": "exact_integer", "word_problem": "exact_integer"},
    }
    assert table["text"]["bytes"] == 6 + 22 and [f["path"] for f in table["text"]["files"]] == ["pkg/a.py", "pkg/b.py"]
    assert table["text"]["ingest_records_checked"] == 1
    assert table["decontamination"] == {"file": DECONTAMINATION_NAME, **DECON_SUMMARY}
    responses = json.loads((outs[0] / RESPONSES_NAME).read_bytes())
    assert [r["id"] for r in responses["tiny"]] == table["tasks"]["ids"]
    assert "| tiny | 4 |" in (outs[0] / MARKDOWN_NAME).read_text()
    report = results[0].report
    assert report["determinism"] == determinism and report["determinism"]["numThreads"] == 1
    assert report["tasks"] == 3 and report["text"] == {"bytes": 28, "tokens": table["text"]["tokens"], "window": 8}
    assert report["stages"]["tiny"]["bits_per_byte"] == row["bits_per_byte"]


def test_run_eval_leaves_seeds_threads_and_kernels_to_the_entry_point(tmp_path: Path, vocab: Vocab) -> None:
    """The library takes the determinism report as a value; it seeds nothing and sets no thread count."""
    inputs, _ = heldout_inputs(tmp_path, vocab, {})  # no checkpoint: every input read and checked, no model
    cfg = tiny_eval_config(threads=2, seed=7)
    threads, torch_rng, py_rng = torch.get_num_threads(), torch.get_rng_state(), random.getstate()
    deterministic = torch.are_deterministic_algorithms_enabled()
    determinism = {"seed": 7, "numThreads": 2, "set by": "the entry point"}
    (tmp_path / "out").mkdir()
    result = run_eval(cfg, inputs, tmp_path / "out", determinism=determinism)
    assert result.report["determinism"] == determinism and result.table["rows"] == []
    assert torch.get_num_threads() == threads == 1
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == py_rng
    assert torch.are_deterministic_algorithms_enabled() == deterministic
