"""The ``train.layout`` recipe block (flowpin.train.layout): validation, the derived data-parallel size and
micro-batching, its place in the composed recipe, and the training stage's refusal of what it cannot train."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from flowpin.errors import RecipeError
from flowpin.recipe import to_config, to_plain
from flowpin.recipe_schema import STAGE_SCHEMAS, register_schemas
from flowpin.train.entry import run_training_stage
from flowpin.train.layout import DerivedLayout, LayoutConfig, derive_layout
from flowpin.train.pretrain import TrainingStageConfig, fork_stage, pretrain_stage, refuse_untrained_layout
from flowpin.train.transformer import ModelConfig
from helpers import REPO, Project


@pytest.fixture(scope="module", autouse=True)
def schemas() -> None:
    register_schemas(STAGE_SCHEMAS)


def _compose(name: str, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "params"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def _train(overrides: list[str] | None = None) -> TrainingStageConfig:
    return to_config(TrainingStageConfig, _compose("pretrain", overrides).train, where="train")


# --- the config ---------------------------------------------------------------------------------------------


def test_the_default_layout_is_what_the_engine_trains_today() -> None:
    layout = LayoutConfig()
    assert (layout.tensor, layout.pipeline, layout.context, layout.expert) == (1, 1, 1, 1)
    assert layout.virtual_pipeline is None and layout.micro_batch_size is None
    assert layout.sequence_parallel is False and layout.recompute == "none"
    derived = derive_layout(layout, world_size=2, global_batch=8)
    assert (derived.data, derived.micro_batch_size, derived.accumulation) == (
        2,
        4,
        1,
    )  # per-rank batch, no accumulation


@pytest.mark.parametrize(
    ("fields", "key", "words"),
    [
        ({"tensor": 0}, "train.layout.tensor", "must be in 1.."),
        ({"pipeline": True}, "train.layout.pipeline", "must be an integer"),
        ({"context": 2.0}, "train.layout.context", "must be an integer"),
        ({"expert": 2}, "train.layout.expert", "has none"),
        ({"virtual_pipeline": 2}, "train.layout.virtual_pipeline", "need a pipeline"),
        ({"virtual_pipeline": 1, "pipeline": 2}, "train.layout.virtual_pipeline", "must be in 2.."),
        ({"sequence_parallel": True}, "train.layout.sequence_parallel", "tensor is 1"),
        ({"sequence_parallel": "yes", "tensor": 2}, "train.layout.sequence_parallel", "true or false"),
        ({"micro_batch_size": 0}, "train.layout.micro_batch_size", "must be in 1.."),
        ({"recompute": "partial"}, "train.layout.recompute", "none, selective, full"),
    ],
)
def test_an_invalid_layout_is_refused_naming_its_key(fields: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(RecipeError) as info:
        LayoutConfig(**fields)
    assert str(info.value).startswith(f"{key}:") and words in str(info.value)


def test_a_valid_layout_is_accepted() -> None:
    layout = LayoutConfig(tensor=8, pipeline=4, virtual_pipeline=2, sequence_parallel=True, context=2, recompute="full")
    assert layout.model_parallel == 64


# --- derivation ------------------------------------------------------------------------------------------


def test_data_parallel_size_and_accumulation_are_derived() -> None:
    layout = LayoutConfig(tensor=2, pipeline=2, context=2, micro_batch_size=2)
    derived = derive_layout(layout, world_size=32, global_batch=64)
    assert derived == DerivedLayout(
        tensor=2,
        pipeline=2,
        virtual_pipeline=None,
        context=2,
        data=4,  # 32 / (2 x 2 x 2)
        micro_batch_size=2,
        accumulation=8,  # 64 = 2 x 8 x 4
        sequence_parallel=False,
        recompute="none",
    )
    assert derived.world_size == 32
    assert derived.as_dict()["data"] == 4 and set(derived.as_dict()) == {
        "tensor",
        "pipeline",
        "virtual_pipeline",
        "context",
        "data",
        "micro_batch_size",
        "accumulation",
        "sequence_parallel",
        "recompute",
    }


@pytest.mark.parametrize(
    ("layout", "world", "batch", "words"),
    [
        (LayoutConfig(tensor=2, pipeline=2), 6, 8, ["= 4 GPUs", "world size 6", "multiple of 4"]),
        (LayoutConfig(tensor=2), 8, 10, ["train.loop.batch_size: 10", "4 data-parallel ranks", "multiple of 4"]),
        (
            LayoutConfig(micro_batch_size=3),
            2,
            8,
            ["train.layout.micro_batch_size: 3", "the 4 sequences", "divisor of 4"],
        ),
    ],
)
def test_a_layout_that_does_not_divide_is_refused_with_its_numbers(
    layout: LayoutConfig, world: int, batch: int, words: list[str]
) -> None:
    with pytest.raises(RecipeError) as info:
        derive_layout(layout, world_size=world, global_batch=batch)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_a_world_size_must_be_positive() -> None:
    with pytest.raises(RecipeError, match="world size"):
        derive_layout(LayoutConfig(), world_size=0, global_batch=8)


# --- the recipe ---------------------------------------------------------------------------------------------


def test_the_recipe_gains_the_layout_keys_at_their_defaults() -> None:
    cfg = _compose("pretrain")
    assert to_plain(cfg.train.layout) == {
        "tensor": 1,
        "pipeline": 1,
        "virtual_pipeline": None,
        "sequence_parallel": False,
        "context": 1,
        "expert": 1,
        "micro_batch_size": None,
        "recompute": "none",
    }
    assert to_config(TrainingStageConfig, cfg.train, where="train").layout == LayoutConfig()


def test_layout_overrides_compose_and_a_misspelt_key_fails_at_composition() -> None:
    train = _train(["train.layout.tensor=2", "train.layout.recompute=selective"])
    assert train.layout == LayoutConfig(tensor=2, recompute="selective")  # the planner accepts it
    with pytest.raises(ConfigCompositionException):
        _compose("pretrain", ["train.layout.tensr=2"])
    with pytest.raises(RecipeError, match=r"train\.layout\.expert"):
        _train(["train.layout.expert=2"])


# --- the training stage refuses what it cannot train ------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.layout.tensor=2", "tensor=2"),
        ("train.layout.pipeline=2", "pipeline=2"),
        ("train.layout.context=2", "context=2"),
        ("train.layout.recompute=full", "recompute=full"),
        ("train.layout.micro_batch_size=2", "micro_batch_size=2"),  # per-rank batch 8: accumulation
    ],
)
def test_the_stage_refuses_a_layout_the_engine_does_not_train(override: str, named: str) -> None:
    with pytest.raises(RecipeError) as info:
        refuse_untrained_layout(_train([override]), world_size=1)
    message = str(info.value)
    assert message.startswith("train.layout:") and named in message and "issue 16" in message


def test_the_stage_trains_the_default_layout_and_a_micro_batch_equal_to_the_per_rank_batch() -> None:
    refuse_untrained_layout(_train(), world_size=1)
    refuse_untrained_layout(_train(["train.layout.micro_batch_size=4"]), world_size=2)  # 8 / 2 ranks
    with pytest.raises(RecipeError, match="micro_batch_size=8"):
        refuse_untrained_layout(_train(["train.layout.micro_batch_size=8"]), world_size=2)


@pytest.mark.parametrize("which", ["pretrain", "fork"])
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.layout.tensor=2", r"train\.layout: tensor=2: .*issue 16"),
        ("train.data_parallel.use_distributed_optimizer=true", r"use_distributed_optimizer: .*does not train it yet"),
    ],
)
def test_a_training_stage_refuses_what_it_cannot_train_before_it_opens_or_writes_anything(
    which: str, override: str, message: str, project: Project
) -> None:
    """The stage's preflight refuses first: no tracker, run directory, report or manifest; the data is never read."""
    root = project.root
    shutil.copytree(REPO / "params", root / "params")
    with initialize_config_dir(config_dir=str(root / "params"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[override, "train.data_parallel.engine=megatron"])
    model = to_config(ModelConfig, cfg.model, where="model")
    stage = pretrain_stage(model) if which == "pretrain" else fork_stage(model, root / "ckpt")
    before = sorted(root.rglob("*"))
    with pytest.raises(RecipeError, match=message):
        run_training_stage(cfg, stage, root=root)
    assert sorted(root.rglob("*")) == before
