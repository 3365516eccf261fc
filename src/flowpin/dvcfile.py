"""The flow's DVC files, read in one place: ``dvc.yaml`` (the stages) and ``dvc.lock`` (what they produced).

``dvc.yaml`` says, per stage, what DVC runs and watches: its deps (code under ``stages/`` and ``src/``, data),
its params files (``params/<stage>.yaml``) and its outs. flowpin reads it to pin exactly the code DVC watches
(:func:`dvc_code_deps`, used by :mod:`flowpin.stage` and :mod:`flowpin.manifest.record`), to know whether a
rebuild's stage is part of the flow (:mod:`flowpin.replay.rebuild`), which params file ``flowpin exp`` may edit
(:mod:`flowpin.experiment`) and which stages a release leaves out (:mod:`flowpin.replay.release`).
``dvc.lock`` pins every out's content; :func:`parse_lock` hands its stages and raw out entries to the release,
which checks them against the DVC store.

Every malformation (unreadable, not YAML, not the shape DVC writes) is a
:class:`~flowpin.errors.DvcFileError` naming the file and the key; a missing ``dvc.yaml`` is not an error
(:func:`read_flow` returns None: a project outside DVC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from flowpin.errors import DvcFileError

DVC_YAML = "dvc.yaml"
"""The flow: ``<root>/dvc.yaml``."""
DVC_LOCK = "dvc.lock"
"""What the flow produced: ``<root>/dvc.lock``."""
CODE_PREFIXES = ("stages/", "src/")
"""A dep under one of these is code: the manifest pins it (a stage's code deps)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DvcStage:
    """One stage of ``dvc.yaml``: what DVC watches and writes for it, paths as written there."""

    name: str
    deps: tuple[str, ...]
    """Every dep, in order (a dep written as a mapping counts by its path)."""
    params: tuple[str, ...]
    """The params files (an entry ``{file: [keys]}`` counts by its file; a bare key by itself)."""
    outs: tuple[str, ...]
    """Every out, in order (an out written as a mapping counts by its path)."""

    @property
    def code_deps(self) -> list[str]:
        """The deps under ``stages/`` or ``src/``, in order, without a trailing ``/``."""
        return [dep.rstrip("/") for dep in self.deps if dep.startswith(CODE_PREFIXES)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LockedStage:
    """One stage of ``dvc.lock``."""

    name: str
    outs: tuple[Any, ...]
    """Its out entries as DVC wrote them (``path``, ``hash``, ``md5``...), unchecked: the consumer checks the
    fields it relies on."""


def read_flow(root: Path) -> dict[str, DvcStage] | None:
    """The stages of ``<root>/dvc.yaml`` by name, in file order; None when there is no ``dvc.yaml``."""
    path = root / DVC_YAML
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DvcFileError(f"{path}: cannot read ({exc.strerror or exc}); check permissions") from exc
    doc = _load(data, path, fix="fix dvc.yaml")
    stages = _mapping(doc.get("stages"), f"{path}: stages", fix="fix dvc.yaml")
    return {str(name): _stage(str(name), body, path) for name, body in stages.items()}


def flow_stage(root: Path, stage: str) -> DvcStage | None:
    """``stage`` of ``<root>/dvc.yaml``; None when there is no ``dvc.yaml`` or no such stage in it."""
    return (read_flow(root) or {}).get(stage)


def dvc_code_deps(root: Path, stage: str) -> list[str] | None:
    """The code deps (paths under ``stages/`` or ``src/``) of ``stage`` in ``dvc.yaml``, or None (no such stage,
    or no ``dvc.yaml``).

    The manifest pins exactly the code DVC watches, so ``flowpin verify`` and ``dvc repro`` agree about when a
    stage is stale (a test checks these deps cover every module the stage imports).
    """
    found = flow_stage(root, stage)
    return None if found is None else found.code_deps


def parse_lock(data: bytes, where: str) -> dict[str, LockedStage]:
    """The stages of a ``dvc.lock`` (its bytes; ``where`` names it in errors), by name."""
    fix = "regenerate it with `dvc repro`"
    doc = _load(data, where, fix=fix, what="a DVC lock file", empty_ok=False)
    stages = _mapping(doc.get("stages"), f"{where}: stages", fix=fix)
    locked: dict[str, LockedStage] = {}
    for name, body in stages.items():
        entry = _mapping(body, f"{where}: stages.{name}", fix=fix)
        outs = entry.get("outs") or []
        if not isinstance(outs, list):
            raise DvcFileError(f"{where}: stages.{name}.outs is not a list; {fix}")
        locked[str(name)] = LockedStage(name=str(name), outs=tuple(outs))
    return locked


def write_flow(root: Path, stages: Mapping[str, Mapping[str, Any]]) -> None:
    """Write ``<root>/dvc.yaml`` holding ``stages`` (each ``{"cmd": ..., "deps": [...]}``), in the given order:
    the one-stage flow of a rebuild workspace."""
    (root / DVC_YAML).write_text(yaml.safe_dump({"stages": dict(stages)}, sort_keys=False), "utf-8")


# --- shapes -----------------------------------------------------------------------------------------------


def _load(data: bytes, where: object, *, fix: str, what: str = "a mapping", empty_ok: bool = True) -> Mapping[str, Any]:
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise DvcFileError(f"{where}: not valid YAML ({exc}); {fix}") from exc
    if doc is None and empty_ok:
        return {}
    if not isinstance(doc, dict):
        raise DvcFileError(f"{where}: not {what} ({type(doc).__name__}); {fix}")
    return doc


def _mapping(value: object, where: str, *, fix: str) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DvcFileError(f"{where} is not a mapping ({type(value).__name__}); {fix}")
    return value


def _stage(name: str, body: object, path: Path) -> DvcStage:
    where = f"{path}: stages.{name}"
    entry = _mapping(body, where, fix="fix dvc.yaml")
    return DvcStage(
        name=name,
        deps=_paths(entry.get("deps"), f"{where}.deps"),
        params=_paths(entry.get("params"), f"{where}.params"),
        outs=_paths(entry.get("outs"), f"{where}.outs"),
    )


def _paths(entries: object, where: str) -> tuple[str, ...]:
    """The path of each entry of a deps/params/outs list: a string, or a mapping's first key."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise DvcFileError(f"{where} is not a list ({type(entries).__name__}); fix dvc.yaml")
    paths: list[str] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, dict) and entry and isinstance(next(iter(entry)), str):
            paths.append(next(iter(entry)))
        else:
            raise DvcFileError(f"{where}[{i}]: {entry!r} is neither a path nor a {{path: options}} entry; fix dvc.yaml")
    return tuple(paths)


__all__ = [
    "CODE_PREFIXES",
    "DVC_LOCK",
    "DVC_YAML",
    "DvcStage",
    "LockedStage",
    "dvc_code_deps",
    "flow_stage",
    "parse_lock",
    "read_flow",
    "write_flow",
]
