"""DVC experiments of this flow (``flowpin exp``): Hydra overrides of one stage's recipe, as set-params DVC applies.

Every stage composes its own recipe at run time (``@hydra.main`` over ``params/<stage>.yaml`` and its
config groups), and ``dvc.yaml`` lists ``params/<stage>.yaml`` among the stage's ``params``. So an
experiment changes a stage's primary config file itself: DVC's per-file form
``dvc exp run -S 'params/pretrain.yaml:train.loop.steps=10' pretrain`` applies the Hydra override to that
file in the experiment (DVC's ``apply_overrides``: Hydra's override grammar on the file's own keys),
``dvc repro`` sees the changed params and reruns the stage, the stage composes the changed file like any
other run and writes its signed manifest, and ``dvc exp`` commits file, lock, report and manifest to
the experiment's ref. :func:`plan_experiment` turns the overrides you would give the stage script
(``python stages/train.py model=tiny_wide train.loop.steps=10``) into those ``-S`` values:

* a value the primary file holds: ``params/pretrain.yaml:train.loop.steps=10``;
* a config-group choice (``model=tiny_wide``) becomes the defaults-list entry DVC can edit:
  ``params/pretrain.yaml:defaults.2.model=tiny_wide``;
* a value that comes from a group (``model.hidden_size=256``) is added to the primary file
  (``+model.hidden_size=256``), which overrides the group exactly as the command line does (``_self_``
  comes after the groups in every primary config);
* and it checks, before DVC stashes anything, that the file DVC will write composes to exactly the
  recipe the command-line overrides compose to (an unknown key, a missing group option, or an edit that
  would mean something else is refused here, naming the key).

**Why not DVC's Hydra mode** (``dvc config hydra.enabled true``): DVC then composes *one* config
(``hydra.config_dir``/``hydra.config_name``) with the unprefixed ``-S`` overrides into ``params.yaml``
before every ``dvc exp run``. No stage of this flow reads ``params.yaml`` or lists it as a param (each
composes ``params/<stage>.yaml`` itself, and seventeen stages cannot share one primary config), so an
unprefixed ``-S`` would yield an experiment that reruns nothing and differs from its baseline only in
an unread file. Hence ``.dvc/config`` pins ``hydra.enabled = false`` and :func:`plan_experiment` refuses
to plan while it is on (``docs/experiments.md``).

``flowpin exp STAGE OVERRIDE... [--name N] [--temp | --queue] [--dry-run]`` (:mod:`flowpin.cli`) prints the
``dvc exp run`` command line (:meth:`ExpPlan.argv`) and runs it (:func:`run_experiment`). With
``--temp``/``--queue`` the run happens in a copy of the repository that lacks the gitignored signing key:
``-C .flowpin/keys`` copies it in (unless ``FLOWPIN_SIGNING_KEY`` names one). The flow's stages and their
params files come from :mod:`flowpin.dvcfile`.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from flowpin.dvcfile import DVC_YAML, read_flow
from flowpin.errors import InternalError, RecipeError
from flowpin.settings import Settings

PARAMS_DIR = "params"
KEYS_DIR = ".flowpin/keys"
"""Where ``flowpin key init`` puts the signing key (gitignored, so not in ``dvc exp`` copies)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpPlan:
    """A checked ``dvc exp run`` for one stage."""

    stage: str
    params_file: str
    """The stage's primary config, ``params/<stage>.yaml`` (what DVC edits)."""
    set_params: tuple[str, ...]
    """``-S`` values, each ``params/<stage>.yaml:<override>``."""
    sweep: bool
    """Some override lists several values: DVC queues one experiment per combination (needs ``--queue``)."""

    def argv(self, *, name: str | None = None, temp: bool = False, queue: bool = False) -> list[str]:
        """The ``dvc exp run`` command line (the stage as its target: it and what it needs, nothing after)."""
        if self.sweep and not queue:
            raise RecipeError(f"{', '.join(self.set_params)}: a sweep runs from DVC's queue; add --queue")
        cmd = ["dvc", "exp", "run"]
        if name:
            cmd += ["--name", name]
        if queue:
            cmd.append("--queue")
        elif temp:
            cmd.append("--temp")
        if (temp or queue) and not Settings.from_env().signing_key:
            cmd += ["--copy-paths", KEYS_DIR]  # a copy of the repository has no signing key of its own
        for value in self.set_params:
            cmd += ["--set-param", value]
        return [*cmd, self.stage]


def plan_experiment(stage: str, overrides: Sequence[str], *, root: Path) -> ExpPlan:
    """Translate ``overrides`` of ``stage`` into DVC ``-S`` values and check them (see the module docstring)."""
    params_file = f"{PARAMS_DIR}/{stage}.yaml"
    _check_stage(root, stage, params_file)
    _check_hydra_mode_off(root)
    primary = _load_yaml(root / params_file)
    parsed = _parse(overrides)
    translated = [_translate(o, primary, root, params_file) for o in parsed]
    sweep = any(o.is_sweep_override() for o in parsed)
    for job in _jobs(list(overrides)) if sweep else [list(overrides)]:
        job_translated = [_translate(o, primary, root, params_file) for o in _parse(job)]
        _check_same_recipe(root, stage, job, job_translated)
    return ExpPlan(
        stage=stage,
        params_file=params_file,
        set_params=tuple(f"{params_file}:{t}" for t in translated),
        sweep=sweep,
    )


# --- checks on the project ----------------------------------------------------------------------


def _check_stage(root: Path, stage: str, params_file: str) -> None:
    stages = read_flow(root)  # a malformed dvc.yaml: DvcFileError, a RecipeError
    if stages is None:
        raise RecipeError(f"{root / DVC_YAML}: no such file, so no flow to experiment on; run from the project root")
    if stage not in stages:
        raise RecipeError(f"stage {stage!r}: not in dvc.yaml; one of {', '.join(sorted(stages))}")
    params = stages[stage].params
    if params_file not in params:
        raise RecipeError(
            f"stage {stage}: {params_file} is not among its params in dvc.yaml ({', '.join(params) or 'none'}); "
            "DVC would not rerun it for a change there"
        )


def _check_hydra_mode_off(root: Path) -> None:
    from dvc.config import Config, ConfigError

    try:
        enabled = bool(Config(dvc_dir=str(root / ".dvc")).get("hydra", {}).get("enabled", False))
    except ConfigError as exc:
        raise RecipeError(f"{root / '.dvc' / 'config'}: DVC cannot read its config ({exc})") from exc
    if enabled:
        raise RecipeError(
            "DVC's Hydra mode is on (hydra.enabled): it composes one config into params.yaml, which no stage "
            "of this flow reads; turn it off with `dvc config hydra.enabled false` (see docs/experiments.md)"
        )


# --- overrides -----------------------------------------------------------------------------------


def _parse(overrides: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return list(OverridesParser.create().parse_overrides(overrides=list(overrides)))
    except OverrideParseException as exc:
        raise RecipeError(f"{' '.join(overrides)}: not Hydra override syntax ({exc})") from exc


def _jobs(overrides: list[str]) -> list[list[str]]:
    """Every combination a sweep stands for (as DVC's queue expands it)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    batches: list[list[list[str]]] = BasicSweeper.split_arguments(_parse(overrides), None)
    return [job for batch in batches for job in batch]


def _translate(override: Any, primary: Mapping[str, Any], root: Path, params_file: str) -> str:
    """One override as DVC can apply it to the primary file's own keys."""
    line: str = override.input_line
    key: str = override.key_or_group
    if override.package is not None:
        raise RecipeError(f"{line}: package overrides (@) cannot be written into {params_file}; edit the file")
    index = _defaults_index(primary, key)
    if index is not None or (root / PARAMS_DIR / key).is_dir():
        if index is None or override.is_delete() or override.is_add():
            raise RecipeError(
                f"{line}: the config group {key!r} can only be switched to another option in {params_file} "
                "(add or remove it in the file's defaults list)"
            )
        return f"defaults.{index}.{key}={line.split('=', 1)[1]}"
    if override.is_add() or override.is_force_add() or _has_key(primary, key):
        return line
    head = key.split(".", 1)[0]
    if not override.is_delete() and _defaults_index(primary, head) is not None:
        return f"+{line}"  # a key of a group's config: set it in the primary, after the group (``_self_`` last)
    return line  # unknown: the composition check names it


def _defaults_index(primary: Mapping[str, Any], group: str) -> int | None:
    for i, entry in enumerate(primary.get("defaults") or []):
        if isinstance(entry, dict) and group in entry:
            return i
    return None


def _has_key(node: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: not a mapping")
    return data


# --- the check: the edited file composes to the command line's recipe ----------------------------


def _compose(config_dir: Path, name: str, overrides: Sequence[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from flowpin.recipe_schema import compose_recipe

    cfg = compose_recipe(config_dir, name, overrides)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"{name}: {' '.join(overrides) or 'recipe'} does not resolve: {exc}") from exc
    if not isinstance(plain, dict):
        raise InternalError(f"{name}: Hydra composed a {type(plain).__name__}, not a mapping")
    return {str(k): v for k, v in plain.items()}


def _check_same_recipe(root: Path, stage: str, overrides: Sequence[str], translated: Sequence[str]) -> None:
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S file:override` calls
    from omegaconf.errors import OmegaConfBaseException

    wanted = _compose(root / PARAMS_DIR, stage, overrides)
    with tempfile.TemporaryDirectory(prefix="flowpin-exp-") as tmp:
        params = Path(tmp) / PARAMS_DIR
        shutil.copytree(root / PARAMS_DIR, params)
        try:
            apply_overrides(params / f"{stage}.yaml", list(translated))
        except (DvcException, OmegaConfBaseException) as exc:
            raise RecipeError(f"{' '.join(overrides)}: DVC cannot apply {' '.join(translated)}: {exc}") from exc
        got = _compose(params, stage, [])
    if got != wanted:
        keys = _differing(wanted, got)
        raise RecipeError(
            f"{', '.join(keys[:5])}: params/{stage}.yaml edited by DVC would compose another recipe than "
            f"`{' '.join(overrides)}` on the command line; set these in the file itself"
        )


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(a.keys() | b.keys()) for k in _differing(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".") or "recipe"]


# --- running it ----------------------------------------------------------------------------------------


def run_experiment(argv: Sequence[str], *, root: Path) -> int:
    """Run the ``dvc exp run`` command line :meth:`ExpPlan.argv` made, in ``root``; returns its exit status
    (its output goes to this process's stdout and stderr)."""
    return subprocess.run(list(argv), cwd=root, check=False).returncode


__all__ = ["ExpPlan", "plan_experiment", "run_experiment"]
