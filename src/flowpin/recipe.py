"""Recipes: Hydra-composed configs turned into frozen, typed dataclasses.

Library code never sees a ``DictConfig``: a stage script composes its recipe with Hydra (from
``params/``), calls :func:`to_config` to get the stage's dataclass (unknown keys and wrong types raise
:class:`RecipeError` naming the key), and :func:`hydra_sources` to learn which overrides were given and
which recipe files were composed, so that the manifest can pin them.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowpin.errors import RecipeError

T = TypeVar("T")

FIX = "fix it in the recipe (params/*.yaml) or in the override"
"""How-to-fix suffix of every recipe value error."""


def to_config(cls: type[T], cfg: DictConfig | Mapping[str, Any], *, where: str = "recipe") -> T:
    """Validate ``cfg`` against the dataclass ``cls`` and return an instance of it.

    Interpolations are resolved, then the dataclass tree is built from the plain values with strict
    checks: unknown keys, missing required keys and wrong types raise :class:`RecipeError` naming the
    full key (``where`` prefixes it, e.g. ``ingest.limits.max_doc_bytes``). Built directly rather than by
    OmegaConf's structured merge, which marks nodes of frozen dataclasses read-only as it creates them
    (so a ``dict[str, FrozenDataclass]`` field could never be filled).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if isinstance(cfg, DictConfig):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            raise RecipeError(f"{where}.{key}: {str(exc).splitlines()[0]}; fix this key in params/") from exc
    else:
        plain = cfg
    return _build(cls, plain, where)  # type: ignore[no-any-return]


def _build(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _build(option, value, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}; {FIX}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}; {FIX}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise RecipeError(
                f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))}); fix the spelling or remove it"
            )
        kwargs: dict[str, Any] = {}
        for name, field in fields.items():
            if name in value:
                kwargs[name] = _build(hints[name], value[name], f"{where}.{name}")
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{where}.{name}: missing required key; add it to the recipe")
        return tp(**kwargs)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}; {FIX}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_build(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}; {FIX}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_build(key_tp, k, where): _build(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp in (int, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
    else:
        raise TypeError(f"{where}: unsupported recipe field type {tp!r}")
    raise RecipeError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}; {FIX}")


def check_int(value: object, key: str, *, minimum: int, maximum: int | None = None) -> int:
    """Recipe validation: an integer (not a bool) within bounds, else :class:`RecipeError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{key}: {value!r} must be an integer; {FIX}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise RecipeError(f"{key}: {value} must be {bound}; {FIX}")
    return value


def check_float(value: object, key: str, *, minimum: float, maximum: float = math.inf) -> float:
    """Recipe validation: a finite number within bounds, else :class:`RecipeError` naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecipeError(f"{key}: {value!r} must be a finite number; {FIX}")
    if not minimum <= value <= maximum:
        raise RecipeError(f"{key}: {value} must be within {minimum:g}..{maximum:g}; {FIX}")
    return float(value)


def check_choice(value: object, choices: Sequence[str], key: str) -> str:
    """Recipe validation: one of ``choices``, else :class:`RecipeError` naming ``key``."""
    if not isinstance(value, str) or value not in choices:
        raise RecipeError(f"{key}: {value!r} is not one of {', '.join(choices)}; {FIX}")
    return value


def check_str(value: object, key: str) -> str:
    """Recipe validation: a non-empty string, else :class:`RecipeError` naming ``key``."""
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{key}: {value!r} must be a non-empty string; {FIX}")
    return value


def to_plain(cfg: DictConfig | Any) -> Any:
    """A resolved, plain (dict/list/scalar) copy of a config or dataclass, for manifests."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return cfg


@dataclasses.dataclass(frozen=True, kw_only=True)
class HydraSources:
    """What Hydra composed for the running job."""

    config_name: str
    """Primary config name (``params/<config_name>.yaml``)."""
    overrides: tuple[str, ...]
    """Task overrides given on the command line (``optim.lr=1e-3``), in the order given."""
    config_files: tuple[Path, ...]
    """Absolute paths of every recipe file composed: the primary config and each chosen group option."""


def hydra_sources(config_dir: Path) -> HydraSources:
    """Read the running Hydra job's overrides and composed files (call inside ``@hydra.main``)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    name = hc.job.config_name or ""
    files: list[Path] = []
    primary = config_dir / f"{name}.yaml"
    if primary.is_file():
        files.append(primary)
    for group, option in sorted(hc.runtime.choices.items()):
        if group == "hydra" or group.startswith("hydra/") or option is None:
            continue
        candidate = config_dir / group / f"{option}.yaml"
        if candidate.is_file():
            files.append(candidate)
    return HydraSources(config_name=name, overrides=tuple(hc.overrides.task), config_files=tuple(files))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageInput:
    """An upstream stage's dataset a stage reads (repository-relative)."""

    data: str
    """The upstream output directory (a DVC dep of this stage)."""
    manifest: str
    """The upstream stage's signed manifest (recorded as this stage's parent)."""
    kind: str = "dataset"
    """What it is, as the manifest names the dependency: ``dataset`` or ``checkpoint`` (a training run's)."""

    def __post_init__(self) -> None:
        check_choice(self.kind, INPUT_KINDS, "paths.inputs.<role>.kind")


INPUT_KINDS = ("dataset", "checkpoint")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StagePaths:
    """Where a stage reads and writes (repository-relative); the ``paths`` block of its primary config."""

    inputs: dict[str, StageInput] = dataclasses.field(default_factory=dict)
    """Upstream datasets by role (e.g. ``corpus``, ``heldout``)."""

    out: str
    """The stage's main output (file or directory), a DVC ``out``."""
    report: str
    """The stage's JSON report, a DVC metrics file and a manifest byproduct."""
    manifest: str
    """The signed manifest, committed to git."""
