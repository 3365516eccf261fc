"""Tests for flowpin.data.synth: verified answers, seeded determinism, split disjointness, named errors."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from flowpin.canonical import canonical_json
from flowpin.data.decontaminate import EvalItem, NgramConfig, build_eval_table, detect, tokenize
from flowpin.data.shards import ShardConfig, read_dataset, read_index, write_dataset
from flowpin.data.synth import (
    GENERATORS,
    TEMPLATES,
    ArithmeticConfig,
    BinOp,
    Num,
    RangeConfig,
    SynthConfig,
    Task,
    WordProblemConfig,
    _spec_tree,
    evaluate,
    extract_answer,
    generate,
    load_tasks,
    parse_expression,
    render,
    run_synth,
    steps,
    task_record,
    verify_answer,
)
from flowpin.errors import DataError, RecipeError, ShardError
from flowpin.recipe import to_config

PARAMS = Path(__file__).resolve().parents[2] / "params"


def small(**changes: Any) -> SynthConfig:
    """A fast recipe: 60 arithmetic + 40 word problems in train, 20 + 10 held out."""
    base: dict[str, Any] = {
        "seed": 7,
        "max_attempts": 200,
        "arithmetic": {
            "train": 60,
            "heldout": 20,
            "operands": {"min": 0, "max": 30},
            "operations": {"min": 1, "max": 3},
            "operators": ["+", "-", "*", "/"],
            "max_value": 2000,
        },
        "word_problem": {"train": 40, "heldout": 10},
        "shards": {"docs_per_shard": 16, "zstd_level": 3},
    }
    for key, value in changes.items():
        node = base
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return to_config(SynthConfig, base, where="synth")


def all_tasks(cfg: SynthConfig) -> list[Task]:
    data = generate(cfg)
    return data.splits["heldout"] + data.splits["train"]


# --- expressions ----------------------------------------------------------------------------------


def test_render_uses_precedence_and_parses_back() -> None:
    tree = BinOp("+", Num(37), BinOp("*", Num(48), Num(2)))
    assert render(tree) == "37 + 48 * 2"
    assert evaluate(tree) == 133
    grouped = BinOp("*", BinOp("+", Num(10), Num(14)), Num(17))
    assert render(grouped) == "(10 + 14) * 17"
    right = BinOp("-", Num(9), BinOp("-", Num(5), Num(3)))
    assert render(right) == "9 - (5 - 3)"
    assert evaluate(right) == 7
    for t in (tree, grouped, right):
        assert parse_expression(render(t)) == t
    assert steps(tree) == ["48 * 2 = 96", "37 + 96 = 133"]


def test_parser_follows_precedence_not_left_to_right() -> None:
    assert evaluate(parse_expression("2 + 3 * 4")) == 14
    assert evaluate(parse_expression("(2 + 3) * 4")) == 20
    assert evaluate(parse_expression("20 - 6 - 4")) == 10  # left-associative
    assert evaluate(parse_expression("48 / 4 / 2")) == 6


@pytest.mark.parametrize("text", ["2 +", "2 + x", "(2 + 3", "2 3", "__import__('os')"])
def test_parser_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError):
        parse_expression(text)


def test_division_is_exact_or_refused() -> None:
    assert evaluate(BinOp("/", Num(12), Num(4))) == 3
    with pytest.raises(ValueError, match="not an integer"):
        evaluate(BinOp("/", Num(7), Num(2)))
    with pytest.raises(ValueError, match="division by zero"):
        evaluate(BinOp("/", Num(7), Num(0)))


# --- answers --------------------------------------------------------------------------------------


def test_verify_answer_is_exact() -> None:
    task = Task(id="t", kind="arithmetic", prompt="What is 12 + 15?", solution="12 + 15 = 27. Answer: 27", answer="27")
    assert verify_answer(task, task.solution)
    assert verify_answer(task, "I think 12 + 15 = 27.\nAnswer: 27.")
    assert verify_answer(task, "Answer: 26\nwait, no. Answer: 27")  # the final one counts
    for wrong in ("Answer: 26", "Answer: 027", "Answer: 27.5", "Answer: 27 apples", "27", "answer: 27", ""):
        assert not verify_answer(task, wrong), wrong
    assert extract_answer("x\nAnswer: -3") == "-3"


def test_every_answer_is_computed_and_verified() -> None:
    tasks = all_tasks(small())
    assert {t.kind for t in tasks} == set(GENERATORS)
    for t in tasks:
        assert verify_answer(t, t.solution), t
        assert t.text == f"{t.prompt}\n{t.solution}"
        if t.kind == "arithmetic":
            expr = re.fullmatch(r"What is (.+)\?", t.prompt)
            assert expr is not None
            assert str(evaluate(parse_expression(expr.group(1)))) == t.answer
            # each step's arithmetic is right, and the last step gives the answer
            for step in t.solution.split(". ")[:-1]:
                lhs, rhs = step.split(" = ")
                assert evaluate(parse_expression(lhs)) == int(rhs)
            assert t.solution.split(". ")[-2].endswith(f"= {t.answer}")
        else:
            lhs, rhs = t.solution.split(". Answer:")[0].split(" = ")
            assert str(evaluate(parse_expression(lhs))) == rhs == t.answer
            assert int(t.answer) >= 1


def test_arithmetic_respects_its_recipe() -> None:
    cfg = small(**{"arithmetic.operators": ["+", "*"], "arithmetic.operations": {"min": 2, "max": 2}})
    for t in all_tasks(cfg):
        if t.kind != "arithmetic":
            continue
        ops = re.findall(r" ([-+*/]) ", t.prompt)
        assert len(ops) == 2 and set(ops) <= {"+", "*"}
        assert all(0 <= int(n) <= 30 for n in re.findall(r"\d+", t.prompt))
        assert all(0 <= int(v) <= 2000 for v in re.findall(r"= (-?\d+)", t.solution))


# --- determinism and identity ---------------------------------------------------------------------


def _digest(tasks: list[Task]) -> str:
    return hashlib.sha256(canonical_json([task_record(t) for t in tasks])).hexdigest()


def test_golden_digest_of_the_small_recipe() -> None:
    """Pinned: a change here means every synth dataset changes; update only on purpose."""
    assert _digest(all_tasks(small())) == GOLDEN_SMALL


GOLDEN_SMALL = "f76caf8e356778829cc02bc551cb69c4242d71d4da31e47722a1130aa4427628"


def test_same_recipe_same_tasks_and_one_field_changes_them() -> None:
    assert all_tasks(small()) == all_tasks(small())
    assert _digest(all_tasks(small(seed=8))) != _digest(all_tasks(small()))
    assert _digest(all_tasks(small(**{"arithmetic.operands": {"min": 0, "max": 31}}))) != _digest(all_tasks(small()))


def test_streams_are_independent_per_split_and_kind() -> None:
    """Resizing one (split, kind) never changes another's problems (held-out is drawn first)."""
    base = generate(small())
    bigger = generate(small(**{"arithmetic.train": 90, "word_problem.train": 45}))
    assert bigger.splits["heldout"] == base.splits["heldout"]
    fewer_words = generate(small(**{"word_problem.heldout": 3}))
    arith = [t for t in fewer_words.splits["heldout"] if t.kind == "arithmetic"]
    assert arith == [t for t in base.splits["heldout"] if t.kind == "arithmetic"]


# --- disjointness ---------------------------------------------------------------------------------


def test_train_and_heldout_are_disjoint_and_collisions_are_reported() -> None:
    # 0..3 + 0..3 has exactly 16 problems: held-out takes 6, so train must avoid them to find its 10.
    cfg = small(
        **{
            "arithmetic.operands": {"min": 0, "max": 3},
            "arithmetic.operations": {"min": 1, "max": 1},
            "arithmetic.operators": ["+"],
            "arithmetic.heldout": 6,
            "arithmetic.train": 10,
            "arithmetic.max_value": None,
            "max_attempts": 5000,
        }
    )
    data = generate(cfg)
    train = {t.prompt for t in data.splits["train"] if t.kind == "arithmetic"}
    held = {t.prompt for t in data.splits["heldout"] if t.kind == "arithmetic"}
    assert len(train) == 10 and len(held) == 6
    assert not train & held
    assert len(train | held) == 16
    stats = data.report["splits"]["train"]["by_kind"]["arithmetic"]
    assert stats["heldout_collisions_avoided"] > 0 and stats["duplicates_avoided"] > 0
    assert data.report["collisions_avoided"]["heldout"] >= stats["heldout_collisions_avoided"]


def _math_key(prompt: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """(template, numbers) of a word problem, recovered from its text: the names and items left out."""
    for name, tpl in TEMPLATES.items():
        pattern = re.escape(tpl.text)
        for slot in ("name", "friend", "item", "items"):
            pattern = pattern.replace(re.escape("{" + slot + "}"), r"\w+")
        for var in tpl.ranges:
            pattern = pattern.replace(re.escape("{" + var + "}"), f"(?P<{var}>\\d+)", 1)
            pattern = pattern.replace(re.escape("{" + var + "}"), f"(?P={var})")
        m = re.fullmatch(pattern, prompt)
        if m:
            return name, tuple(sorted((k, int(v)) for k, v in m.groupdict().items()))
    raise AssertionError(f"no template matches {prompt!r}")


def test_word_problem_keys_ignore_names_so_renamed_heldout_problems_stay_out_of_train() -> None:
    # one two-number template (about 2,000 distinct problems), so train draws do hit held-out keys
    data = generate(
        small(**{"word_problem.train": 400, "word_problem.heldout": 100, "word_problem.templates": ["give_away"]})
    )
    held = [_math_key(t.prompt) for t in data.splits["heldout"] if t.kind == "word_problem"]
    train = [_math_key(t.prompt) for t in data.splits["train"] if t.kind == "word_problem"]
    assert len(set(held)) == 100 and len(set(train)) == 400
    assert not set(held) & set(train)
    assert data.report["splits"]["train"]["by_kind"]["word_problem"]["heldout_collisions_avoided"] > 0


def test_every_template_window_of_13_words_holds_all_its_numbers() -> None:
    """Why the reference synth data has no 13-gram shared between train and held-out: a 13-word window
    holding every number of a problem determines the problem, and keys are disjoint."""
    for name, tpl in TEMPLATES.items():
        values = {v: 1000 + i for i, v in enumerate(sorted(tpl.ranges))}
        text = tpl.text.format(name="Ana", friend="Ben", item="apple", items="apples", **values)
        tokens = tokenize(f"{text}\n{render(_spec_tree(tpl.expr, values))} = 9999. Answer: 9999")
        for var, value in values.items():
            at = [-1] + [i for i, tok in enumerate(tokens) if tok == str(value)] + [len(tokens)]
            longest_gap = max(b - a - 1 for a, b in itertools.pairwise(at))
            assert longest_gap <= 12, (name, var, longest_gap)


def test_reference_recipe_train_shares_no_13_gram_with_heldout() -> None:
    cfg = to_config(SynthConfig, OmegaConf.load(PARAMS / "synth.yaml").synth, where="synth")
    data = generate(cfg)
    ngram = NgramConfig(n=13, short_eval_policy="whole")
    table = build_eval_table({"heldout": [EvalItem(id=t.id, text=t.text) for t in data.splits["heldout"]]}, ngram)
    assert table.stats[0]["ngrams"] > 1000
    assert detect([t.text for t in data.splits["train"]], table, ngram) == []


# --- recipes and errors ---------------------------------------------------------------------------


def test_params_file_builds_the_config() -> None:
    cfg = to_config(SynthConfig, OmegaConf.load(PARAMS / "synth.yaml").synth, where="synth")
    assert cfg.arithmetic.train > 1000 and cfg.word_problem.heldout > 0
    assert cfg.arithmetic.operators == ("+", "-", "*", "/")


def test_unknown_key_names_the_key() -> None:
    node = OmegaConf.load(PARAMS / "synth.yaml").synth
    node.arithmetic.operand = {"min": 0, "max": 9}
    with pytest.raises(RecipeError, match=r"synth\.arithmetic\.operand: unknown key"):
        to_config(SynthConfig, node, where="synth")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"arithmetic.operators": ["+", "^"]}, r"synth\.arithmetic\.operators\[1\]"),
        ({"arithmetic.operators": []}, r"synth\.arithmetic\.operators"),
        ({"arithmetic.operands": {"min": -1, "max": 9}}, r"synth\.arithmetic\.operands\.min"),
        ({"arithmetic.operands": {"min": 5, "max": 4}}, r"synth\.arithmetic\.operands\.max"),
        ({"arithmetic.operations": {"min": 1, "max": 9}}, r"synth\.arithmetic\.operations\.max"),
        ({"arithmetic.max_value": 3}, r"synth\.arithmetic\.max_value"),
        ({"word_problem.templates": ["nope"]}, r"synth\.word_problem\.templates\[0\]"),
        ({"word_problem.heldout": -1}, r"synth\.word_problem\.heldout"),
        ({"arithmetic.train": 0, "word_problem.train": 0}, r"synth\.<kind>\.train"),
        ({"shards": {"docs_per_shard": 0, "zstd_level": 3}}, r"synth\.shards\.docs_per_shard"),
        ({"max_attempts": 0}, r"synth\.max_attempts"),
    ],
)
def test_invalid_recipe_names_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        small(**change)


def test_too_small_problem_space_names_the_key_to_change() -> None:
    cfg = small(
        **{
            "arithmetic.operands": {"min": 0, "max": 2},
            "arithmetic.operations": {"min": 1, "max": 1},
            "arithmetic.operators": ["+"],
            "arithmetic.heldout": 4,
            "arithmetic.train": 6,  # only 9 problems exist, 4 of them held out
        }
    )
    with pytest.raises(RecipeError, match=r"synth\.arithmetic\.train"):
        generate(cfg)


def test_word_templates_can_be_chosen() -> None:
    tasks = all_tasks(small(**{"word_problem.templates": ["share"]}))
    words = [t for t in tasks if t.kind == "word_problem"]
    assert words and all("shares" in t.prompt and " / " in t.solution for t in words)


# --- on disk --------------------------------------------------------------------------------------


def test_run_synth_writes_two_datasets_that_load_back(tmp_path: Path) -> None:
    cfg = small()
    result = run_synth(cfg, tmp_path / "a")
    data = generate(cfg)
    for split in ("train", "heldout"):
        assert load_tasks(tmp_path / "a" / split) == data.splits[split]
        assert read_index(tmp_path / "a" / split)["split"] == split
        records = list(read_dataset(tmp_path / "a" / split))
        rec = records[0]
        assert rec["id"].startswith(f"synth/{split}/")
        assert rec["source"]["origin"] == "flowpin-synth" and rec["source"]["license"] == "CC0-1.0"
        assert rec["source"]["sha256"] == hashlib.sha256(rec["text"].encode()).hexdigest()
        assert set(rec["task"]) == {"kind", "prompt", "solution", "answer"}
    assert result.tasks == {"heldout": 30, "train": 100}
    assert result.report["splits"]["train"]["shards"] == 7  # 100 records / 16 per shard
    run_synth(cfg, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_load_tasks_refuses_a_dataset_without_tasks(tmp_path: Path) -> None:
    write_dataset([{"id": "x", "text": "hello"}], tmp_path / "d", docs_per_shard=4, level=3)
    with pytest.raises(DataError, match=r"has no valid 'task'"):
        load_tasks(tmp_path / "d")
    with pytest.raises(ShardError, match="not a dataset"):
        load_tasks(tmp_path / "missing")


def test_config_is_frozen_and_keyword_only() -> None:
    cfg = small()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        RangeConfig(0, 1)  # type: ignore[call-arg]
    assert isinstance(cfg.arithmetic, ArithmeticConfig) and isinstance(cfg.word_problem, WordProblemConfig)
    assert isinstance(cfg.shards, ShardConfig)
