"""Recipe configs are deeply immutable: no list, dict or set anywhere below a stage's config class.

Two halves. The types: every dataclass reachable from a stage's config class (and ``StagePaths``,
``ModelConfig``) is frozen and declares only immutable containers (``tuple[X, ...]``, ``Mapping[K, V]``,
``frozenset``), walked from the annotations so that a new field cannot slip a ``list`` in. The instances:
:func:`flowpin.recipe.to_config` builds tuples and :class:`~flowpin.frozen.FrozenDict` mappings, so a built
config refuses in-place changes and hashes, while its plain form (``dataclasses.asdict``, JSON, canonical
JSON) is byte for byte what plain lists and dicts give.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from flowpin.canonical import canonical_json
from flowpin.data.decontaminate import DecontaminateConfig
from flowpin.data.dedup import DedupConfig
from flowpin.data.ingest import IngestConfig
from flowpin.data.mix_config import MixConfig, QualityConfig
from flowpin.data.synth import SynthConfig
from flowpin.data.tokenize import TokenizeConfig
from flowpin.errors import RecipeError
from flowpin.frozen import FrozenDict
from flowpin.post.dpo import DPOConfig
from flowpin.post.eval_config import EvalConfig
from flowpin.post.rlvr import RLVRConfig
from flowpin.post.sft import SFTConfig
from flowpin.recipe import StageInput, StagePaths, to_config, to_plain
from flowpin.train.pretrain import TrainingStageConfig
from flowpin.train.transformer import ModelConfig

PARAMS = Path(__file__).resolve().parents[1] / "params"

BLOCKS: dict[str, type] = {
    "ingest": IngestConfig,
    "dedup": DedupConfig,
    "synth": SynthConfig,
    "decontaminate": DecontaminateConfig,
    "mix": MixConfig,
    "tokenize": TokenizeConfig,
    "train": TrainingStageConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "rlvr": RLVRConfig,
    "eval": EvalConfig,
}
"""Every recipe block and the config class :func:`to_config` builds from it."""

ROOTS: tuple[type, ...] = (*BLOCKS.values(), StagePaths, StageInput, ModelConfig)

_LEAVES: frozenset[Any] = frozenset({int, float, str, bool, type(None), Any})
_IMMUTABLE: frozenset[Any] = frozenset({tuple, frozenset, collections.abc.Mapping, typing.Union, types.UnionType})


def mutable_annotations(root: type) -> Iterator[str]:
    """``Class.field: annotation`` for every annotation reachable from ``root`` that is not an immutable
    container, leaf or frozen dataclass (anything unknown counts as mutable), and every unfrozen dataclass."""
    seen: set[type] = set()

    def walk(tp: Any, where: str) -> Iterator[str]:
        origin = typing.get_origin(tp)
        if tp in _LEAVES or origin is typing.Literal:
            return
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if tp in seen:
                return
            seen.add(tp)
            if not tp.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                yield f"{tp.__qualname__}: not frozen"
            hints = typing.get_type_hints(tp)
            for f in dataclasses.fields(tp):
                yield from walk(hints[f.name], f"{tp.__qualname__}.{f.name}")
            return
        if origin not in _IMMUTABLE:
            yield f"{where}: {tp!r}"
            return
        for arg in typing.get_args(tp):
            if arg is not Ellipsis:
                yield from walk(arg, where)

    yield from walk(root, root.__qualname__)


@pytest.mark.parametrize("root", ROOTS, ids=lambda c: c.__name__)
def test_stage_configs_declare_no_mutable_container(root: type) -> None:
    assert list(mutable_annotations(root)) == []


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Leaf:
    names: tuple[str, ...] = ()
    weights: Mapping[str, list[float]] = dataclasses.field(default_factory=FrozenDict)


@dataclasses.dataclass(kw_only=True)
class _Loose:
    tags: set[str] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Root:
    leaves: tuple[_Leaf, ...] = ()
    by_name: Mapping[str, _Leaf | None] = dataclasses.field(default_factory=FrozenDict)
    loose: _Loose | None = None
    seq: Sequence[int] = ()
    fine: tuple[Mapping[str, frozenset[int]], ...] = ()


def test_the_type_walk_finds_a_mutable_container_however_deep() -> None:
    assert list(mutable_annotations(_Root)) == [
        "_Leaf.weights: list[float]",
        "_Loose: not frozen",
        "_Loose.tags: set[str]",
        f"_Root.seq: {Sequence[int]!r}",
    ]


# --- instances --------------------------------------------------------------------------------------


def load(path: Path) -> DictConfig:
    """A recipe file as written (not composed: the blocks need no defaults list)."""
    node = OmegaConf.load(path)
    assert isinstance(node, DictConfig), path
    return node


@functools.cache
def recipes() -> tuple[tuple[str, str], ...]:
    """(recipe file stem, block) of every stage recipe in ``params/``."""
    found = []
    for path in sorted(PARAMS.glob("*.yaml")):
        node = load(path)
        blocks = [b for b in BLOCKS if b in node]
        assert len(blocks) == 1, f"{path.name}: expected one recipe block, found {blocks}"
        found.append((path.stem, blocks[0]))
    return tuple(found)


@pytest.mark.parametrize(("name", "block"), recipes())
def test_every_recipe_builds_a_hashable_config(name: str, block: str) -> None:
    node = load(PARAMS / f"{name}.yaml")
    paths = to_config(StagePaths, node.paths, where="paths")
    assert isinstance(paths.inputs, FrozenDict)
    assert hash(paths) == hash(to_config(StagePaths, node.paths, where="paths"))
    try:
        cfg: object = to_config(BLOCKS[block], node[block], where=block)
    except RecipeError:  # a recipe its config's own checks refuse (planned, not trainable yet): nothing to hash
        return
    assert hash(cfg) == hash(to_config(BLOCKS[block], node[block], where=block))
    assert copy.deepcopy(cfg) == cfg and hash(copy.deepcopy(cfg)) == hash(cfg)


@pytest.mark.parametrize("block", BLOCKS)
def test_every_block_has_recipes_that_build(block: str) -> None:
    """The refusal above is the exception: every config class is hashed on at least one real recipe."""
    names = [name for name, b in recipes() if b == block]
    built: list[object] = []
    for name in names:
        with contextlib.suppress(RecipeError):
            built.append(to_config(BLOCKS[block], load(PARAMS / f"{name}.yaml")[block], where=block))
    assert built, f"no recipe of block {block!r} builds ({', '.join(names) or 'none in params/'})"
    assert all(isinstance(hash(cfg), int) for cfg in built)


@pytest.mark.parametrize("name", sorted(p.stem for p in (PARAMS / "model").glob("*.yaml")))
def test_every_model_config_is_hashable(name: str) -> None:
    hash(to_config(ModelConfig, load(PARAMS / "model" / f"{name}.yaml"), where="model"))


def reference_mix() -> MixConfig:
    return to_config(MixConfig, load(PARAMS / "mix.yaml").mix, where="mix")


def test_a_built_config_refuses_changes_in_place() -> None:
    cfg = reference_mix()
    with pytest.raises(AttributeError):
        cfg.quality.tiers.append(cfg.quality.tiers[0])  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        cfg.topics.rules[0] = cfg.topics.rules[-1]  # type: ignore[index]
    with pytest.raises(TypeError, match="FrozenDict"):
        cfg.upsampling.tier_max_factors["high"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError, match="FrozenDict"):
        cfg.upsampling.tier_max_factors.pop("high")  # type: ignore[attr-defined]
    paths = to_config(StagePaths, load(PARAMS / "mix.yaml").paths, where="paths")
    with pytest.raises(TypeError, match="FrozenDict"):
        paths.inputs["extra"] = paths.inputs["corpus"]  # type: ignore[index]
    assert reference_mix() == cfg


def test_nested_mappings_are_frozen_too() -> None:
    quality = to_config(
        QualityConfig,
        {**to_plain(reference_mix().quality), "topic_weights": {"code": {"comment_fraction": 2.0}}},
        where="mix.quality",
    )
    assert isinstance(quality.topic_weights, FrozenDict)
    assert isinstance(quality.topic_weights["code"], FrozenDict)
    with pytest.raises(TypeError, match="FrozenDict"):
        quality.topic_weights["code"]["alpha_fraction"] = 0.0
    assert hash(quality)


def test_stage_paths_built_in_code_holds_a_frozen_mapping() -> None:
    corpus = StageInput(data="data/corpus", manifest="manifests/corpus.json")
    paths = StagePaths(inputs={"corpus": corpus}, out="o", report="r.json", manifest="m.json")
    assert isinstance(paths.inputs, FrozenDict)
    assert paths == StagePaths(inputs=FrozenDict({"corpus": corpus}), out="o", report="r.json", manifest="m.json")
    assert hash(paths)
    assert dataclasses.replace(paths, out="p").inputs is paths.inputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Containers:
    items: Sequence[int]
    names: tuple[str, ...]
    table: Mapping[str, Mapping[str, float]]
    loose: dict[str, int]


def test_to_config_builds_immutable_containers_from_their_annotations() -> None:
    plain = {"items": [1, 2], "names": ["a"], "table": {"x": {"y": 1}}, "loose": {"k": 1}}
    built = to_config(_Containers, plain)
    assert built.items == (1, 2) and built.names == ("a",)
    assert type(built.table) is FrozenDict and type(built.table["x"]) is FrozenDict
    assert built.table == {"x": {"y": 1.0}}
    assert type(built.loose) is dict  # a dict annotation keeps its dict: no config declares one (see above)


# --- FrozenDict ---------------------------------------------------------------------------------------

_MUTATIONS: list[tuple[str, tuple[Any, ...]]] = [
    ("__setitem__", ("a", 9)),
    ("__delitem__", ("a",)),
    ("__ior__", ({"z": 0},)),
    ("clear", ()),
    ("pop", ("a",)),
    ("pop", ("missing", None)),
    ("popitem", ()),
    ("setdefault", ("z", 0)),
    ("update", ({"a": 9},)),
    ("update", ()),
]


@pytest.mark.parametrize(("method", "args"), _MUTATIONS, ids=[f"{m}{len(a)}" for m, a in _MUTATIONS])
def test_frozendict_refuses_every_mutation(method: str, args: tuple[Any, ...]) -> None:
    frozen: FrozenDict[str, int] = FrozenDict({"a": 1, "b": 2})
    with pytest.raises(TypeError, match=rf"FrozenDict is immutable: {method}\(\)"):
        getattr(frozen, method)(*args)
    assert frozen == {"a": 1, "b": 2} and list(frozen) == ["a", "b"]


def test_frozendict_operators_refuse_or_copy() -> None:
    frozen: FrozenDict[str, int] = FrozenDict(a=1)
    with pytest.raises(TypeError, match="FrozenDict"):
        frozen |= {"b": 2}
    with pytest.raises(TypeError, match="FrozenDict"):
        del frozen["a"]
    merged = frozen | {"b": 2}  # a new (plain) dict, as dict | dict gives
    assert merged == {"a": 1, "b": 2} and frozen == {"a": 1}


def test_frozendict_hashes_by_its_items() -> None:
    a: FrozenDict[str, Any] = FrozenDict({"x": 1, "y": FrozenDict({"z": (1.5, 2.5)})})
    b: FrozenDict[str, Any] = FrozenDict({"y": FrozenDict({"z": (1.5, 2.5)}), "x": 1})
    assert a == b and hash(a) == hash(b)
    assert len({a, b, FrozenDict({"x": 2})}) == 2
    with pytest.raises(TypeError, match="unhashable"):
        hash(FrozenDict({"x": [1]}))  # hashable only when the values are


def test_frozendict_copies() -> None:
    inner: FrozenDict[str, float] = FrozenDict({"z": 1.0})
    frozen: FrozenDict[str, Any] = FrozenDict({"x": 1, "y": inner})
    assert copy.copy(frozen) is frozen
    deep = copy.deepcopy(frozen)
    assert deep == frozen and type(deep) is FrozenDict and type(deep["y"]) is FrozenDict
    assert list(deep) == ["x", "y"]
    assert dict(frozen) == {"x": 1, "y": {"z": 1.0}} and type(dict(frozen)) is dict


def test_plain_form_is_byte_identical_to_plain_dicts() -> None:
    """asdict, JSON and canonical JSON of a config holding FrozenDicts are those of the same config holding
    dicts: the manifest's recipe and every digest of it stay the same."""
    up = reference_mix().upsampling
    shares = {"code": 0.5, "prose": 0.25, "math": 0.25}
    frozen = dataclasses.replace(
        up, target_shares=FrozenDict(shares), topic_bytes_per_token=FrozenDict({"math": 1.5, "code": 3.0})
    )
    thawed = dataclasses.replace(
        up,
        target_shares=dict(shares),
        topic_bytes_per_token={"math": 1.5, "code": 3.0},
        tier_max_factors=dict(up.tier_max_factors),
    )
    assert isinstance(frozen.tier_max_factors, FrozenDict) and not isinstance(thawed.tier_max_factors, FrozenDict)
    frozen_plain, thawed_plain = dataclasses.asdict(frozen), dataclasses.asdict(thawed)
    assert frozen_plain == thawed_plain
    assert canonical_json(frozen_plain) == canonical_json(thawed_plain)
    assert json.dumps(frozen_plain) == json.dumps(thawed_plain)  # insertion order kept, too
    assert canonical_json(to_plain(frozen)) == canonical_json(to_plain(thawed))
    nested: FrozenDict[str, Any] = FrozenDict({"b": FrozenDict({"y": 1, "x": [2.0]}), "a": (1, 2)})
    assert canonical_json(nested) == canonical_json({"b": {"y": 1, "x": [2.0]}, "a": [1, 2]})
    assert json.dumps(nested) == json.dumps({"b": {"y": 1, "x": [2.0]}, "a": [1, 2]})


def test_mix_config_digest_does_not_depend_on_frozen_containers() -> None:
    """The whole reference mix config: thawed back to lists and dicts by hand, the plain form is the same."""
    cfg = reference_mix()

    def thaw(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: thaw(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: thaw(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [thaw(v) for v in value]
        return value

    assert canonical_json(to_plain(cfg)) == canonical_json(thaw(cfg))
    assert json.dumps(to_plain(cfg)) == json.dumps(thaw(cfg))
