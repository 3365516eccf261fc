"""``flowpin fork``: continue a training stage from any of its checkpoints under a new recipe.

The parent's manifest says which recipe (its entry point's primary config + overrides) produced which
checkpoints and pins each checkpoint's digest. A fork first verifies the parent (signature by a trusted key,
then the digest of the checkpoint it continues from), recomposes that recipe with Hydra from the entry point
the parent records (``externalParameters.entryPoint``: never guessed from its pinned files; a parent
recorded without one is refused with :class:`~flowpin.errors.MissingEntryPointError`) and applies the new
overrides on top. It then runs as every training stage does -- :func:`flowpin.train.entry.run_training_stage`
with the fork's spec (:func:`flowpin.train.pretrain.fork_spec`: weights, optimizer, RNG streams and data
position of the checkpoint) -- so it has a prepared process, a tracker, a run key, a report
(``<run dir>/report.json``) and the same refusals. The :class:`~flowpin.stage.StageInvocation` says what a Hydra
run would: the stage (the parent's), the overrides (the parent's and the new ones), the config files (the
parent's), the entry point (the parent's: the fork composes the parent's config) and where it writes (a new
run directory; the recorded recipe keeps its paths). The manifest's dependencies name the parent manifest
and the checkpoint (kind ``checkpoint``), then the data; its ``fork`` note (run metadata) says it is a fork
and the ``flowpin fork`` command that re-runs it. The parent's run is never touched.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import open_dict

from flowpin.canonical import canonical_json
from flowpin.constants import CHECKPOINTS_DIR, RUN_MANIFEST
from flowpin.display import safe
from flowpin.errors import RecipeError
from flowpin.hashing import hash_bytes
from flowpin.manifest.record import StageRecorder
from flowpin.manifest.trust import load_verified, require_digests
from flowpin.paths import check_output_path, resolve_inside, to_name
from flowpin.recipe import HydraSources, StagePaths, to_config
from flowpin.recipe_schema import compose_recipe
from flowpin.stage import StageInvocation
from flowpin.train.checkpoint import checkpoint_name, latest_checkpoint
from flowpin.train.entry import run_training_stage
from flowpin.train.pretrain import fork_stage
from flowpin.train.transformer import ModelConfig

REPORT_NAME = "report.json"
"""``<fork run dir>/report.json``: the fork's report (its manifest sits beside it, ``manifest.json``)."""


def fork(parent_manifest: Path, *, step: int, overrides: list[str], root: Path, out: str | None = None) -> Path:
    """Fork ``parent_manifest``'s run at ``step``; returns the fork's manifest path.

    Nothing is composed, trained or written before the parent verifies: its signature by a trusted key
    (:func:`~flowpin.manifest.trust.load_verified`), then the digest of the checkpoint it forks from (the
    other checkpoints are not re-hashed). Either failing raises
    :class:`~flowpin.errors.UnverifiedManifestError`.
    """
    if out is not None:  # before anything is read, trained or written (PathError naming --out)
        out = check_output_path(out, root, what="--out")
    purpose = f"fork it at step {step}"
    parent = load_verified(parent_manifest, root=root, check="signature", purpose=purpose)
    subject = next((s for s in parent.subjects if s["name"].endswith("/" + checkpoint_name(step))), None)
    if subject is None:
        steps = sorted(safe(s["name"].rsplit("-", 1)[-1]) for s in parent.subjects)
        raise RecipeError(f"{parent_manifest}: no checkpoint at step {step} (it pins steps {', '.join(steps)})")
    require_digests(parent, [subject["name"]], root=root, purpose=purpose)
    entry = parent.require_entry_point(root=root, purpose=purpose)  # its script and primary config are pinned
    parent_name = to_name(parent_manifest, root)
    all_overrides = [*parent.overrides, *overrides]
    tag = hash_bytes(canonical_json(all_overrides))[:8]
    run_dir_name = out or f"runs/forks/{parent.stage}-step{step}-{tag}"
    config_dir = resolve_inside(entry.config_dir, root)
    cfg = compose_recipe(config_dir, entry.config_name, all_overrides, with_hydra=True)  # onto its block's schema
    # The CPU kernel pins (hydra.job.env_set: ATEN_CPU_CAPABILITY, MKL_CBWR, ...) that a Hydra run of the stage
    # applies before its first computation; nothing here has computed yet, so they take effect the same way.
    env_set = {str(k): str(v) for k, v in (cfg.hydra.job.env_set or {}).items()}
    with open_dict(cfg):
        del cfg["hydra"]
    model_cfg = to_config(ModelConfig, cfg.model, where="model")
    declared = to_config(StagePaths, cfg.paths, where="paths")
    if "data" not in declared.inputs:
        raise RecipeError(f"{parent_manifest}: its recipe names no paths.inputs.data; only a training stage forks")
    run_dir = root / run_dir_name
    if latest_checkpoint(run_dir / CHECKPOINTS_DIR) is not None:  # before anything is recorded
        raise RecipeError(f"fork target {run_dir} already holds checkpoints; fork into a new directory")
    checkpoint = resolve_inside(subject["name"], root)

    def declare(rec: StageRecorder) -> None:  # before the data, as the fork's dependencies have always been ordered
        rec.parent(parent_manifest)
        rec.input(subject["name"], kind="checkpoint")
        again = ["flowpin", "fork", parent_name, "--step", str(step), "--out", run_dir_name, *overrides]
        rec.note("fork", parent=parent_name, step=step, new_overrides=overrides, command=again)

    invocation = StageInvocation(
        stage=parent.stage,
        sources=HydraSources(
            config_name=entry.config_name,
            overrides=tuple(all_overrides),
            config_files=tuple(root / name for name in parent.dependency_names("config")),
        ),
        entry_point=entry,  # the fork composes the parent's config; the fork note says it is a fork
        paths=StagePaths(
            out=f"{run_dir_name}/{CHECKPOINTS_DIR}",
            report=f"{run_dir_name}/{REPORT_NAME}",
            manifest=f"{run_dir_name}/{RUN_MANIFEST}",
            inputs={"data": declared.inputs["data"]},
        ),
        declare=declare,
    )
    run_training_stage(cfg, fork_stage(model_cfg, checkpoint), root=root, invocation=invocation, env=env_set)
    return run_dir / RUN_MANIFEST
