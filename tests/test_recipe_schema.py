"""Recipe schemas in Hydra's ConfigStore (flowpin.recipe_schema): bad keys and types fail at composition."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from flowpin.canonical import canonical_json
from flowpin.recipe import StagePaths, to_config, to_plain
from flowpin.recipe_schema import (
    MODEL_CONFIG,
    SCHEMA_GROUP,
    STAGE_SCHEMAS,
    config_class,
    register_schemas,
    schema_of,
)
from helpers import BIN, REPO

PRIMARY = sorted(p.stem for p in (REPO / "params").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def schemas() -> None:
    register_schemas(STAGE_SCHEMAS)


@pytest.fixture
def params_dir(tmp_path: Path) -> Path:
    """A copy of the project's recipes, for recipes edited by a test."""
    return Path(shutil.copytree(REPO / "params", tmp_path / "params"))


def _compose(params: Path, name: str, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(params), version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def _block(cfg: DictConfig) -> str:
    (block,) = (k for k in cfg if k not in ("provenance", "paths", "model"))
    return str(block)


def _typed(cfg: DictConfig) -> dict[str, Any]:
    """Everything a stage reads from its composed recipe, as the typed configs' plain form."""
    block = _block(cfg)
    typed = {
        block: to_config(config_class(STAGE_SCHEMAS[block].config), cfg[block], where=block),
        "paths": to_config(StagePaths, cfg.paths, where="paths"),
    }
    if "model" in cfg:
        typed["model"] = to_config(config_class(MODEL_CONFIG), cfg.model, where="model")
    return {k: to_plain(v) for k, v in typed.items()}


def _defaults(name: str) -> list[Any]:
    return list(yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text("utf-8"))["defaults"])


@pytest.mark.parametrize("name", PRIMARY)
def test_every_recipe_composes_onto_its_block_schema_first(name: str) -> None:
    block = _block(_compose(REPO / "params", name))
    assert _defaults(name)[0] == f"{SCHEMA_GROUP}/{block}"


@pytest.mark.parametrize("name", PRIMARY)
def test_the_schema_changes_no_typed_recipe(name: str, params_dir: Path) -> None:
    """A stage reads the same config with the schema as without it: the schema adds checks, not values."""
    with_schema = _typed(_compose(params_dir, name))
    path = params_dir / f"{name}.yaml"
    lines = path.read_text("utf-8").splitlines(keepends=True)
    path.write_text("".join(ln for ln in lines if not ln.strip().startswith(f"- {SCHEMA_GROUP}/")), "utf-8")
    without = _typed(_compose(params_dir, name))
    assert canonical_json(with_schema) == canonical_json(without)


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("dedup", "dedup.fuzzy.treshold=0.8", "Key 'treshold' not in 'FuzzyConfigSchema'"),
        ("pretrain", "train.loop.optim.sheduel.decay=linear", "Key 'sheduel' not in"),
        ("pretrain", "model.hiden_size=64", "Key 'hiden_size' not in 'ModelConfigSchema'"),
        ("sft", "paths.inputs.synth.manfest=x.json", "Key 'manfest' not in"),
        ("pretrain", "train.loop.steps=abc", "could not be converted to Integer"),
        ("mix", "mix.seed=[1,2]", "mix.seed"),
        ("eval", "provenance.run_context=hostname", "provenance.run_context"),
    ],
)
def test_a_bad_override_fails_at_composition_naming_the_key(name: str, override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        _compose(REPO / "params", name, [override])
    assert message in f"{info.value} {info.value.__cause__}"


@pytest.mark.parametrize("block", sorted(STAGE_SCHEMAS))
def test_a_misspelt_key_in_a_recipe_file_fails_at_composition(block: str, params_dir: Path) -> None:
    name = next(n for n in PRIMARY if _block(_compose(REPO / "params", n)) == block)
    path = params_dir / f"{name}.yaml"
    recipe = yaml.safe_load(path.read_text("utf-8"))
    recipe[block]["stpes"] = 3
    path.write_text(yaml.safe_dump(recipe), "utf-8")
    with pytest.raises(ConfigCompositionException) as info:
        _compose(params_dir, name)
    assert "Key 'stpes' not in" in str(info.value.__cause__ or info.value)
    assert f"full_key: {block}.stpes" in str(info.value.__cause__ or info.value)


def test_a_stage_script_refuses_a_bad_key_before_it_runs(tmp_path: Path) -> None:
    """``stages/dedup.py`` stores its schema at import, so its ``@hydra.main`` refuses the typo itself."""
    done = subprocess.run(
        [BIN / "python", REPO / "stages" / "dedup.py", "dedup.fuzzy.treshold=0.8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Key 'treshold' not in 'FuzzyConfigSchema'" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written: not even Hydra's run directory


def _stage_run_configs() -> Iterator[tuple[str, str]]:
    """(block, config class name) of every ``stage_run("<block>", cfg, <Config>, ...)`` in ``stages/``."""
    for script in sorted((REPO / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text("utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "stage_run":
                block, _cfg, config = node.args[:3]
                assert isinstance(block, ast.Constant) and isinstance(config, ast.Name)
                yield str(block.value), config.id


def test_each_schema_is_the_config_its_stage_reads() -> None:
    from flowpin.post.dpo import DPO_STAGE
    from flowpin.post.rlvr import RLVR_STAGE
    from flowpin.post.sft import SFT_STAGE
    from flowpin.train.pretrain import fork_stage, pretrain_stage
    from flowpin.train.transformer import ModelConfig

    model = ModelConfig(
        num_layers=1,
        hidden_size=8,
        ffn_hidden_size=8,
        num_attention_heads=1,
        num_query_groups=1,
        vocab_size=8,
        max_sequence_length=8,
    )
    reads = {name: cls for name, cls in _stage_run_configs()}
    training = (SFT_STAGE, DPO_STAGE, RLVR_STAGE, pretrain_stage(model), fork_stage(model, Path("x")))
    reads |= {stage.block: stage.config.__name__ for stage in training}
    assert {b: config_class(s.config).__name__ for b, s in STAGE_SCHEMAS.items()} == reads
    for stage in training:
        assert config_class(STAGE_SCHEMAS[stage.block].config) is stage.config


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Inner:
    band: tuple[float, ...] = (0.5, 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer:
    name: str
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    limit: int | None = None
    table: dict[str, _Inner] = dataclasses.field(default_factory=dict)


def test_the_mirror_has_every_field_with_its_default() -> None:
    schema = schema_of(_Outer)
    assert [f.name for f in dataclasses.fields(schema)] == ["name", "inner", "limit", "table"]
    one, two = schema(), schema()
    assert one.name == "???" and one.limit is None and one.table == {}
    assert one.inner.band == [0.5, 1.0] and one.inner is not two.inner  # a fresh default per instance
    assert not schema.__dataclass_params__.frozen  # type: ignore[attr-defined]
