"""Recipe schemas in Hydra's ConfigStore: a misspelt key or a wrong type fails when Hydra composes.

Every stage's primary config starts its defaults list with ``schema/<block>`` (in
``params/dedup.yaml``, ``- schema/dedup``): a structured config that the stage script stores in Hydra's ConfigStore
(:func:`register_schema`) before its ``@hydra.main`` composes. Hydra merges the recipe files and every
override onto it, so an unknown key (``dedup.fuzzy.treshold=0.8``, or a typo in a recipe file) or a value of
the wrong type (``train.loop.steps=abc``) is refused by Hydra itself, naming the full key, before the stage
function runs (in a sweep: as the launcher composes each job, before that job runs). The schema's defaults are
the config dataclass's, so the composed recipe (what the manifest records) holds every key the stage reads,
defaults included.

The schema is generated from the stage's frozen config dataclass (:func:`schema_of`) rather than being that
dataclass: OmegaConf marks the nodes of a frozen dataclass read-only as it creates them, so no recipe file
could be merged onto it. The mirror has the same fields, types and defaults, with containers as OmegaConf
holds them (lists and dicts); a type OmegaConf cannot hold (a union of dataclasses, a ``Literal``) is left
``Any`` there. :func:`flowpin.recipe.to_config` then builds the typed, frozen config from the composed recipe
with its strict checks (no int for a str) and runs each config's own validation (bounds, choices), which a
schema cannot express.

Which block has which config is :data:`STAGE_SCHEMAS`, one entry per recipe block (the ``train`` block, shared
by pretrain, midtrain and long context, also holds the ``model`` group). A stage script registers its own
block; whatever else composes a stage's recipe (``flowpin fork``, ``flowpin exp``, tests) registers the blocks
it composes the same way (:func:`register_schemas`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from flowpin.errors import InternalError, RecipeError

if TYPE_CHECKING:
    from omegaconf import DictConfig

SCHEMA_GROUP = "schema"
"""The ConfigStore group of the stage schemas: ``params/<stage>.yaml`` names ``schema/<block>`` first."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageSchema:
    """Which config dataclass types a recipe block (``module:Class``, imported when registered)."""

    block: str
    """The recipe block (``cfg.<block>``): the stage's own settings."""
    config: str
    """Its config dataclass, ``module:qualname``."""
    model: bool = False
    """Whether the recipe also holds a ``model`` block (:class:`flowpin.train.transformer.ModelConfig`)."""


STAGE_SCHEMAS: dict[str, StageSchema] = {
    s.block: s
    for s in (
        StageSchema(block="ingest", config="flowpin.data.ingest:IngestConfig"),
        StageSchema(block="dedup", config="flowpin.data.dedup:DedupConfig"),
        StageSchema(block="synth", config="flowpin.data.synth:SynthConfig"),
        StageSchema(block="decontaminate", config="flowpin.data.decontaminate:DecontaminateConfig"),
        StageSchema(block="mix", config="flowpin.data.mix_config:MixConfig"),
        StageSchema(block="tokenize", config="flowpin.data.tokenize:TokenizeConfig"),
        StageSchema(block="train", config="flowpin.train.pretrain:TrainingStageConfig", model=True),
        StageSchema(block="sft", config="flowpin.post.sft:SFTConfig"),
        StageSchema(block="dpo", config="flowpin.post.dpo:DPOConfig"),
        StageSchema(block="rlvr", config="flowpin.post.rlvr:RLVRConfig"),
        StageSchema(block="eval", config="flowpin.post.eval_config:EvalConfig"),
    )
}
"""Every recipe block and its config dataclass (a test checks each stage script passes the same class)."""

MODEL_CONFIG = "flowpin.train.transformer:ModelConfig"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProvenanceConfig:
    """The ``provenance`` block every stage composes (``params/common/provenance.yaml``)."""

    run_context: tuple[str, ...] = ()
    """Which run-context fields the manifest publishes (:func:`flowpin.stage.published_run_context`)."""


def config_class(path: str) -> type:
    """The dataclass named ``module:qualname``."""
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise InternalError(f"{path}: not a dataclass; STAGE_SCHEMAS names each block's config dataclass")
    return obj


def stage_schema(block: str) -> type:
    """The structured config Hydra composes block ``block``'s recipes onto: ``provenance``, ``paths``, the
    block itself and, for ``train``, ``model``."""
    try:
        entry = STAGE_SCHEMAS[block]
    except KeyError:
        raise InternalError(f"no recipe schema for block {block!r}; add it to STAGE_SCHEMAS") from None
    from flowpin.recipe import StagePaths

    parts: dict[str, type] = {"provenance": ProvenanceConfig, "paths": StagePaths, block: config_class(entry.config)}
    if entry.model:
        parts["model"] = config_class(MODEL_CONFIG)
    fields = [(name, schema_of(cls), dataclasses.field(default_factory=schema_of(cls))) for name, cls in parts.items()]
    return dataclasses.make_dataclass(f"{block.title()}Recipe", fields, kw_only=True)


def register_schemas(blocks: Iterable[str]) -> None:
    """Store the schema of each recipe block in Hydra's ConfigStore (``schema/<block>``, at the root).

    Call it before Hydra composes: at the top of a stage script, before ``@hydra.main`` runs, or before
    ``hydra.compose``. Storing the same block again replaces it with an identical schema.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for block in blocks:
        store.store(group=SCHEMA_GROUP, name=block, node=stage_schema(block), package="_global_")


def register_schema(block: str) -> None:
    """:func:`register_schemas` for one block: what a stage script calls for its own."""
    register_schemas((block,))


def compose_recipe(
    config_dir: Path, name: str, overrides: Sequence[str] = (), *, with_hydra: bool = False
) -> DictConfig:
    """Compose ``config_dir/<name>.yaml`` with ``overrides`` as the stage script would (every block's schema
    registered first), outside a Hydra app: what ``flowpin fork``, ``flowpin exp`` and ``flowpin plan`` read.

    ``with_hydra`` keeps the ``hydra`` node (``hydra.job.env_set``...). A recipe that does not compose (a bad
    key or type, an unknown group option) raises :class:`RecipeError` with Hydra's reason.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas(STAGE_SCHEMAS)
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise RecipeError(
            f"params/{name}.yaml: {' '.join(overrides) or 'the recipe'} does not compose: {exc}{cause}"
        ) from exc


# --- the mirror -----------------------------------------------------------------------------------


@functools.cache
def schema_of(cls: type) -> type:
    """A mutable dataclass with ``cls``'s fields, types (as OmegaConf holds them) and defaults.

    A field without default is OmegaConf's ``MISSING`` (``???``): a recipe that leaves it unset fails when
    the config is read (:func:`flowpin.recipe.to_config`), naming the key.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise InternalError(f"schema_of({cls!r}): not a dataclass")
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _schema_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = _plain(f.default)
            if default is None:
                tp = typing.Optional[tp]  # noqa: UP045 -- a runtime type expression for OmegaConf
            fields.append((f.name, tp, _default(default)))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, tp, _default(_plain(f.default_factory()))))
        else:
            fields.append((f.name, tp, dataclasses.field(default=MISSING)))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields, kw_only=True)


_PRIMITIVES = (int, float, str, bool)


def _schema_type(tp: Any) -> Any:
    """``tp`` as a structured-config annotation OmegaConf accepts (``Any`` where it has none)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp in _PRIMITIVES or tp is Any:
        return tp
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return schema_of(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        optional = len(options) < len(args)
        if len(options) == 1:
            inner = _schema_type(options[0])
        elif all(o in _PRIMITIVES for o in options):
            inner = typing.Union[tuple(options)]  # noqa: UP007 -- built at run time
        else:
            inner = Any
        return typing.Optional[inner] if optional and inner is not Any else inner  # noqa: UP045
    if origin in (list, tuple, collections.abc.Sequence):
        items = [a for a in args if a is not Ellipsis]
        item = _schema_type(items[0]) if len(set(items)) == 1 else Any
        return types.GenericAlias(list, (item,))  # list[item], built at run time
    if origin in (dict, collections.abc.Mapping):
        key, value = args or (str, Any)
        return types.GenericAlias(dict, (key if key in _PRIMITIVES else str, _schema_type(value)))
    return Any  # Literal, a union of dataclasses, ...: to_config checks these


def _plain(value: Any) -> Any:
    """A default as the schema holds it: dataclass instances as their schema's, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        schema = schema_of(type(value))
        return schema(**{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, collections.abc.Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default(value: Any) -> Any:
    """A dataclass field default for ``value`` (a factory for anything mutable)."""
    if isinstance(value, list | dict) or dataclasses.is_dataclass(value):
        import copy

        return dataclasses.field(default_factory=lambda: copy.deepcopy(value))
    return dataclasses.field(default=value)
