"""The verifier registry: exact integer answers, the answer-format check, lookup by name and by task kind."""

from __future__ import annotations

import pytest

from flowpin.data.synth import GENERATORS, Task
from flowpin.errors import DataError, RecipeError
from flowpin.post.verifiers import (
    GRADER,
    KIND_VERIFIERS,
    VERIFIERS,
    answer_format,
    exact_integer,
    get_verifier,
    verifier_for,
    verifiers_by_kind,
    verify,
)

ARITHMETIC = Task(
    id="synth/train/arithmetic/0", kind="arithmetic", prompt="What is 46 + 57?", solution="46 + 57 = 103. Answer: 103",
    answer="103",
)  # fmt: skip
WORD = Task(
    id="synth/train/word_problem/0",
    kind="word_problem",
    prompt="Ana has 12 pens and gives 5 to Ben. How many are left?",
    solution="12 - 5 = 7. Answer: 7",
    answer="7",
)
NEGATIVE = Task(id="t/neg", kind="arithmetic", prompt="What is 3 - 5?", solution="3 - 5 = -2. Answer: -2", answer="-2")


@pytest.mark.parametrize(
    ("task", "text"),
    [
        (ARITHMETIC, "46 + 57 = 103. Answer: 103"),
        (ARITHMETIC, "Answer: 103"),
        (ARITHMETIC, "46 + 57 = 103. Answer: 103.\n"),  # one trailing full stop, the rest of the output ignored
        (ARITHMETIC, "Answer: 5. No, wait. Answer: 103"),  # the last answer counts
        (WORD, "12 - 5 = 7. Answer: 7"),
        (NEGATIVE, "Answer: -2"),
    ],
)
def test_a_correct_answer_earns_the_full_reward(task: Task, text: str) -> None:
    assert exact_integer(task, text) == 1.0
    assert verify(task, text) is True
    assert answer_format(task, text) == 1.0


@pytest.mark.parametrize(
    ("task", "text", "formatted"),
    [
        (ARITHMETIC, "46 + 57 = 104. Answer: 104", True),  # wrong
        (ARITHMETIC, "Answer: 103. No, wait. Answer: 5", True),  # the last answer is wrong
        (WORD, "12 - 5 = 7. Answer: 8", True),
        (NEGATIVE, "Answer: 2", True),  # sign matters
        (ARITHMETIC, "46 + 57 = 103", False),  # no answer line
        (ARITHMETIC, "Answer: 0103", False),  # not canonical
        (ARITHMETIC, "Answer: 103.0", False),
        (ARITHMETIC, "Answer: 103 apples", False),
        (ARITHMETIC, "answer: 103", False),  # case matters
        (ARITHMETIC, "Answer:\n103", False),  # the answer must be on the Answer line
        (ARITHMETIC, "", False),
    ],
)
def test_a_wrong_or_malformed_answer_earns_nothing(task: Task, text: str, formatted: bool) -> None:
    assert exact_integer(task, text) == 0.0
    assert verify(task, text) is False
    assert answer_format(task, text) == (1.0 if formatted else 0.0)


def test_every_synth_kind_has_an_exact_integer_verifier() -> None:
    assert set(KIND_VERIFIERS) == set(GENERATORS)
    for kind in GENERATORS:
        assert KIND_VERIFIERS[kind] == "exact_integer"
        assert verifier_for(kind) is exact_integer


def test_verifiers_are_looked_up_by_name() -> None:
    assert sorted(VERIFIERS) == ["answer_format", "exact_integer"]
    assert get_verifier("exact_integer") is exact_integer
    assert get_verifier("answer_format") is answer_format


def test_an_unknown_verifier_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(
        RecipeError, match=r"rlvr\.verifier: unknown verifier 'regex'; known: answer_format, exact_integer"
    ):
        get_verifier("regex", where="rlvr.verifier")
    with pytest.raises(RecipeError, match="unknown verifier"):
        get_verifier(None)  # type: ignore[arg-type]


def test_a_task_kind_without_a_verifier_is_a_data_error() -> None:
    poem = Task(id="t/poem", kind="poetry", prompt="Write a poem.", solution="Roses.", answer="")
    with pytest.raises(
        DataError, match=r"task kind 'poetry' has no verifier \(kinds with one: arithmetic, word_problem\)"
    ):
        verify(poem, "Roses.")


def test_verifiers_by_kind_names_each_kinds_verifier_and_refuses_a_set_it_cannot_grade() -> None:
    assert verifiers_by_kind({"word_problem": 3, "arithmetic": 1}) == {
        "word_problem": "exact_integer",
        "arithmetic": "exact_integer",
    }
    assert list(verifiers_by_kind(["word_problem", "arithmetic"])) == ["word_problem", "arithmetic"]  # in order
    assert verifiers_by_kind([]) == {}
    with pytest.raises(DataError, match=r"task kind 'poetry' has no verifier"):
        verifiers_by_kind(["arithmetic", "poetry"])


def test_the_grader_name_reports_write_is_verifys_qualified_name() -> None:
    assert GRADER == f"{verify.__module__}.{verify.__qualname__}" == "flowpin.post.verifiers.verify"


def test_the_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        VERIFIERS["always"] = lambda task, text: 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        KIND_VERIFIERS["poetry"] = "exact_integer"  # type: ignore[index]
