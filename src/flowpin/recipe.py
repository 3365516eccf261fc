"""Recipes: Hydra-composed configs turned into frozen, typed dataclasses.

Library code never sees a ``DictConfig``: a stage script composes its recipe with Hydra (from
``params/``), calls :func:`to_config` to get the stage's dataclass (unknown keys and wrong types raise
:class:`RecipeError` naming the key), and :func:`hydra_sources` to learn which overrides were given and
which recipe files were composed, so that the manifest can pin them: every override given, Hydra's own
(``hydra.run.dir=...``) included. :func:`check_hydra_outputs` refuses Hydra settings that would write
outside the repository (run/sweep directories, ``.hydra/`` snapshot, log files) before Hydra writes.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowpin.errors import InternalError, PathError, RecipeError
from flowpin.frozen import FrozenDict
from flowpin.paths import check_output_path, find_root

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
        raise InternalError(f"to_config({cls!r}, ...): not a dataclass; pass the stage's config dataclass")
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
        return items if origin is list else tuple(items)  # a Sequence field gets the immutable one
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}; {FIX}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        built = {_build(key_tp, k, where): _build(val_tp, v, f"{where}.{k}") for k, v in value.items()}
        return built if origin is dict else FrozenDict(built)  # a Mapping field: immutable, hashable
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp in (int, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
    else:
        raise InternalError(f"{where}: the config dataclass declares {tp!r}, a type recipes cannot hold")
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
    """Every override given on the command line: the task's (``optim.lr=1e-3``) in the order given, then
    Hydra's own (``hydra.run.dir=...``, ``hydra/launcher=joblib``) in the order given, without the
    ``hydra.mode=...`` Hydra appends itself (:func:`user_hydra_overrides`)."""
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
    overrides = (*hc.overrides.task, *user_hydra_overrides(hc.overrides.hydra))
    return HydraSources(config_name=name, overrides=overrides, config_files=tuple(files))


def user_hydra_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """The Hydra overrides (``hydra.*``, ``hydra/<group>=``) a user gave, as Hydra keeps them apart from the
    task's (``HydraConfig.overrides.hydra``). ``hydra.mode=RUN|MULTIRUN`` is left out: Hydra appends it itself
    for every run (``-m`` or not), and a sweep job's manifest says it was one (its ``sweep-job`` note)."""
    return tuple(str(o) for o in overrides if not str(o).lstrip("+~").startswith("hydra.mode="))


# --- where Hydra writes -------------------------------------------------------------------------------


def hydra_fix(key: str) -> str:
    """How-to-fix suffix of a refused Hydra output location."""
    return (
        f"set {key} to a path inside the repository, relative to its root (the defaults are in "
        "params/common/hydra.yaml), and run the stage from the repository root"
    )


def check_hydra_location(key: str, location: str | os.PathLike[str], root: Path, *, value: object = None) -> str:
    """Refuse (:class:`PathError` naming ``key``) a place Hydra writes (``location``, absolute or relative to
    the working directory, as Hydra takes it) unless it lies inside ``root`` (:func:`check_output_path`'s
    rules: no symlink out, nothing under ``.git/``, ``.dvc/``, ``keys/``...); returns its artifact name."""
    given = location if value is None else value
    full = Path(os.path.abspath(location))
    real_root = root.resolve()
    for base in (root.absolute(), real_root):
        if full == base or base in full.parents:
            name = full.relative_to(base).as_posix()
            break
    else:
        raise PathError(
            f"{key}={str(given)!r}: Hydra would write to {full} (from the working directory {os.getcwd()}), "
            f"outside the repository {real_root}; {hydra_fix(key)}"
        )
    try:
        return check_output_path(name, root, what=key)
    except PathError as exc:
        raise PathError(f"{exc} (Hydra would write to {full}; {key} was {str(given)!r})") from exc


def check_hydra_outputs(config: DictConfig, *, multirun: bool, root: Path | None = None) -> None:
    """Refuse a run whose Hydra settings would write outside the repository, before Hydra writes anything.

    ``config`` is the composed config with its ``hydra`` node, as Hydra's callbacks get it in
    ``on_run_start`` / ``on_multirun_start`` (before the run or sweep directory is created, the log opened,
    ``.hydra/`` saved). Checked (:func:`check_hydra_location`): the run directory (``hydra.run.dir``), or the
    sweep directory and job 0's directory (``hydra.sweep.dir``, ``hydra.sweep.subdir``); the ``.hydra/``
    snapshot (``hydra.output_subdir``); the file of every logging handler (``hydra.job_logging`` and
    ``hydra.hydra_logging`` handlers' ``filename``); a launcher's ``submitit_folder``. A value given as an
    absolute path is refused even inside the repository: the manifest records the overrides as given and holds
    no absolute path. ``root`` defaults to the parent of the primary config directory (``<root>/params``).
    """
    root = root or config_root(config)
    probe = copy.deepcopy(config)
    OmegaConf.set_readonly(probe, False)
    OmegaConf.set_struct(probe, False)
    if multirun:  # the job's own values, as the launcher sets them: job 0 stands for every job
        probe.hydra.job.num = 0
        probe.hydra.job.id = "0"
    locations: list[tuple[str, str]] = []  # (key, location: absolute or relative to the working directory)
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(probe)  # for ${hydra:...} interpolations, as run_job sets it
        dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        job_dir = _resolved(probe, dir_key)
        locations.append((dir_key, job_dir))
        if multirun:
            job_dir = os.path.join(job_dir, _resolved(probe, "hydra.sweep.subdir"))
            locations.append(("hydra.sweep.subdir", job_dir))
        OmegaConf.set_readonly(probe.hydra, False)
        probe.hydra.runtime.output_dir = os.path.abspath(job_dir)  # what the log file names interpolate
        HydraConfig.instance().set_config(probe)
        subdir = _resolved(probe, "hydra.output_subdir", optional=True)
        if subdir is not None:
            locations.append(("hydra.output_subdir", os.path.join(job_dir, subdir)))
        for logging in ("hydra.job_logging", "hydra.hydra_logging"):
            for handler, spec in _raw_mapping(probe, f"{logging}.handlers").items():
                if isinstance(spec, Mapping) and spec.get("filename") is not None:
                    key = f"{logging}.handlers.{handler}.filename"
                    locations.append((key, str(_resolved(probe, key))))
        if multirun and _raw_mapping(probe, "hydra.launcher").get("submitit_folder") is not None:
            locations.append(("hydra.launcher.submitit_folder", _resolved(probe, "hydra.launcher.submitit_folder")))
    finally:
        HydraConfig.instance().cfg = saved
    for key, location in locations:
        parent, _, leaf = key.rpartition(".")
        raw = _raw_mapping(config, parent).get(leaf)
        if isinstance(raw, str) and "${" not in raw and os.path.isabs(raw):
            raise PathError(
                f"{key}={raw!r} is absolute; the manifest records every override as given and never holds an "
                f"absolute path; {hydra_fix(key)}"
            )
        check_hydra_location(key, location, root, value=raw)


def config_root(config: DictConfig) -> Path:
    """The project a Hydra app runs in: the parent of its primary config directory (``<root>/params``, the
    ``config_path`` of every stage script), else :func:`~flowpin.paths.find_root`."""
    for source in OmegaConf.select(config, "hydra.runtime.config_sources") or []:
        if source.get("provider") == "main" and source.get("schema") == "file" and source.get("path"):
            return Path(str(source["path"])).resolve().parent
    return find_root()


def _resolved(config: DictConfig, key: str, *, optional: bool = False) -> Any:
    try:
        value = OmegaConf.select(config, key, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{key}: cannot resolve ({str(exc).splitlines()[0]}); fix the override") from exc
    if value is None and not optional:
        raise RecipeError(f"{key}: not set; {hydra_fix(key)}")
    return None if value is None else str(value)


def _raw_mapping(config: DictConfig, key: str) -> Mapping[str, Any]:
    """The node at ``key`` as a plain mapping, interpolations unresolved ({} when absent or not a mapping)."""
    node = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
    if not isinstance(node, DictConfig):
        return {}
    plain = OmegaConf.to_container(node, resolve=False)
    return {str(k): v for k, v in plain.items()} if isinstance(plain, dict) else {}


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

    inputs: Mapping[str, StageInput] = dataclasses.field(default_factory=FrozenDict)
    """Upstream datasets by role (e.g. ``corpus``, ``heldout``)."""

    out: str
    """The stage's main output (file or directory), a DVC ``out``."""
    report: str
    """The stage's JSON report, a DVC metrics file and a manifest byproduct."""
    manifest: str
    """The signed manifest, committed to git."""

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, FrozenDict):  # built in code (a fork's, a test's): frozen all the same
            object.__setattr__(self, "inputs", FrozenDict(self.inputs))
