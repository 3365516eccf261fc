"""Recipes: Hydra-composed configs turned into frozen, typed dataclasses.

Library code never sees a ``DictConfig``: a stage script composes its recipe with Hydra (from
``params/``), calls :func:`to_config` to get the stage's dataclass (unknown keys and wrong types raise
:class:`RecipeError` naming the key), and :func:`hydra_sources` to learn which overrides were given and
which recipe files were composed, so that the manifest can pin them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowpin.errors import RecipeError

T = TypeVar("T")


def to_config(cls: type[T], cfg: DictConfig | Mapping[str, Any], *, where: str = "recipe") -> T:
    """Validate ``cfg`` against the dataclass ``cls`` and return an instance of it.

    ``where`` prefixes key names in errors (e.g. ``ingest`` gives ``ingest.limits.max_doc_bytes``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    schema = OmegaConf.structured(cls)
    _make_writable(schema)  # frozen dataclasses make every node read-only; merge needs them writable
    try:
        merged = OmegaConf.merge(schema, cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise RecipeError(f"{where}.{key}: {msg}; fix this key in params/ or in your override") from exc
    assert isinstance(obj, cls)
    return obj


def _make_writable(node: Container) -> None:
    """Clear the read-only flag recursively (set_readonly only clears the node it is given)."""
    node._set_flag("readonly", False)
    keys: Iterable[Any] = node.keys() if isinstance(node, DictConfig) else range(len(node))  # type: ignore[arg-type]
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, Container):
            _make_writable(child)


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
class StagePaths:
    """Where a stage writes (repository-relative); the ``paths`` block of a stage's primary config."""

    out: str
    """The stage's main output (file or directory), a DVC ``out``."""
    report: str
    """The stage's JSON report, a DVC metrics file and a manifest byproduct."""
    manifest: str
    """The signed manifest, committed to git."""
