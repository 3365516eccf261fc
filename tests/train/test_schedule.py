"""The LR schedule: a pure function of the step, validated like every recipe."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from flowpin.errors import InternalError, RecipeError
from flowpin.recipe import to_config
from flowpin.train.schedule import ScheduleConfig, lr_at

OLMO = {"total_steps": 110, "warmup_steps": 10, "peak_lr": 3e-4, "min_lr": 3e-5}
"""OLMo 3 7B's shape, shrunk: warmup, then peak 3e-4 down to 3e-5."""

# Pinned: the LR of every step of a run is part of its identity (a change would silently change
# every future run's weights while the recipe stays the same).
GOLDEN = {
    ("cosine", 0): 2.9999999999999997e-05,
    ("cosine", 60): 0.00016499999999999997,
    ("cosine", 85): 6.954058453981609e-05,
    ("cosine", 109): 3.0066614350626235e-05,
    ("linear", 85): 9.749999999999998e-05,
}


def cfg(**changes: Any) -> ScheduleConfig:
    return ScheduleConfig(**{**OLMO, **changes})


@pytest.mark.parametrize(("decay", "step"), sorted(GOLDEN))
def test_golden_values(decay: str, step: int) -> None:
    assert lr_at(cfg(decay=decay), step) == GOLDEN[(decay, step)]


def test_warmup_is_linear_from_near_zero_to_peak() -> None:
    c = cfg()
    warm = [lr_at(c, s) for s in range(10)]
    assert warm[0] == pytest.approx(3e-5) and warm[0] > 0
    assert all(b > a for a, b in itertools.pairwise(warm))
    steps = [b - a for a, b in itertools.pairwise(warm)]
    assert max(steps) == pytest.approx(min(steps))
    assert lr_at(c, 9) == 3e-4  # exactly peak at the last warmup step...
    assert lr_at(c, 10) == 3e-4  # ...and at the first decay step


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decay_reaches_min_at_total_steps_and_stays(decay: str) -> None:
    c = cfg(decay=decay)
    lrs = [lr_at(c, s) for s in range(10, 111)]
    assert all(b <= a for a, b in itertools.pairwise(lrs))  # monotone non-increasing
    assert lrs[-1] == 3e-5 == lr_at(c, 110)  # exactly min at total_steps
    assert lr_at(c, 109) > 3e-5
    assert lr_at(c, 10_000) == 3e-5
    assert lr_at(c, 60) == pytest.approx((3e-4 + 3e-5) / 2)  # both are symmetric about the midpoint


def test_cosine_and_linear_differ_between_the_ends() -> None:
    assert lr_at(cfg(decay="cosine"), 35) > lr_at(cfg(decay="linear"), 35)
    assert lr_at(cfg(decay="cosine"), 85) < lr_at(cfg(decay="linear"), 85)


def test_constant_and_no_warmup() -> None:
    c = cfg(decay="constant", warmup_steps=0)
    assert {lr_at(c, s) for s in (0, 1, 50, 110, 500)} == {3e-4}
    assert lr_at(cfg(warmup_steps=0), 0) == 3e-4


def test_warmup_as_long_as_the_run() -> None:
    c = cfg(warmup_steps=110)
    assert lr_at(c, 109) == 3e-4 and lr_at(c, 110) == 3e-5


def test_lr_at_is_pure_and_refuses_bad_steps() -> None:
    c = cfg()
    assert [lr_at(c, s) for s in (70, 3, 70)] == [lr_at(c, 70), lr_at(c, 3), lr_at(c, 70)]
    for bad in (-1, 1.0, True):
        with pytest.raises(InternalError, match="non-negative int"):
            lr_at(c, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": True}, "total_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"warmup_steps": 111}, "warmup_steps"),
        ({"peak_lr": 0.0}, "peak_lr"),
        ({"peak_lr": -1e-3}, "peak_lr"),
        ({"peak_lr": math.nan}, "peak_lr"),
        ({"min_lr": 1e-3}, "min_lr"),
        ({"min_lr": -1e-6}, "min_lr"),
        ({"decay": "exponential"}, "decay"),
    ],
)
def test_invalid_values_name_the_key(change: dict[str, Any], key: str) -> None:
    with pytest.raises(RecipeError, match=rf"^optim\.schedule\.{key}: "):
        cfg(**change)


def test_from_a_recipe() -> None:
    c = to_config(ScheduleConfig, {**OLMO, "decay": "linear"}, where="optim.schedule")
    assert c == cfg(decay="linear")
    with pytest.raises(RecipeError, match=r"optim\.schedule\.peak: unknown key"):
        to_config(ScheduleConfig, {**OLMO, "peak": 1.0}, where="optim.schedule")
    with pytest.raises(RecipeError, match=r"optim\.schedule\.peak_lr: missing required key"):
        to_config(ScheduleConfig, {"total_steps": 10}, where="optim.schedule")
