"""``flowpin fork``: continue a training stage from any of its checkpoints under a new recipe.

The parent's manifest says which recipe (its entry point's primary config + overrides) produced which
checkpoints and pins each checkpoint's digest. A fork first verifies the parent (signature by a trusted key,
then the digest of the checkpoint it continues from), recomposes that recipe with Hydra from the entry point
the parent records (``externalParameters.entryPoint``: never guessed from its pinned files; a parent
recorded without one is refused with :class:`~flowpin.errors.MissingEntryPointError`), applies the new
overrides on top, continues training into a new run directory, and records a signed manifest there whose
dependencies name the parent manifest and the checkpoint (kind ``checkpoint``), whose ``overrides`` hold the
parent's and the new ones and whose entry point is the parent's (the fork composes the parent's config).
Its ``fork`` note (run metadata) says it is a fork and the ``flowpin fork`` command that re-runs it. The
parent's run is never touched.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.utils import env_override
from omegaconf import open_dict

from flowpin.canonical import canonical_json
from flowpin.constants import CHECKPOINTS_DIR, MODEL_CONFIG, RUN_MANIFEST
from flowpin.data.order import dataset_digest
from flowpin.display import safe
from flowpin.errors import RecipeError
from flowpin.hashing import hash_bytes
from flowpin.manifest.record import record
from flowpin.manifest.trust import load_verified, require_digests
from flowpin.paths import check_output_path, resolve_inside, to_name
from flowpin.recipe import StagePaths, to_config, to_plain
from flowpin.train.checkpoint import checkpoint_name
from flowpin.train.distributed import destroy, init_distributed
from flowpin.train.run import TrainingStageConfig, fork_training
from flowpin.train.transformer import ModelConfig


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
    with initialize_config_dir(config_dir=str(resolve_inside(entry.config_dir, root).resolve()), version_base="1.3"):
        cfg = compose(config_name=entry.config_name, overrides=all_overrides, return_hydra_config=True)
    # The CPU kernel pins (hydra.job.env_set: ATEN_CPU_CAPABILITY, MKL_CBWR, ...) that a Hydra run of the stage
    # applies before its first computation; nothing here has computed yet, so they take effect the same way.
    env_set = {str(k): str(v) for k, v in (cfg.hydra.job.env_set or {}).items()}
    with open_dict(cfg):
        del cfg["hydra"]
    model_cfg = to_config(ModelConfig, cfg.model, where="model")
    recipe = to_config(TrainingStageConfig, cfg.train, where="train")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    checkpoint = resolve_inside(subject["name"], root)
    data = paths.inputs["data"]
    run_dir = root / run_dir_name
    manifest = run_dir / RUN_MANIFEST
    with env_override(env_set):  # before init_distributed: no computation may precede the pins
        dist = init_distributed()
        try:
            with record(
                parent.stage,
                recipe=to_plain(cfg),
                overrides=all_overrides,
                config_files=parent.dependency_names("config"),
                entry_point=entry,  # the fork composes the parent's config; the fork note says it is a fork
                root=root,
                manifest=manifest.relative_to(root),
            ) as rec:
                rec.parent(parent_manifest)
                rec.input(subject["name"], kind="checkpoint")
                rec.upstream(data=data.data, manifest=data.manifest)
                result = fork_training(
                    recipe,
                    model_cfg,
                    checkpoint=checkpoint,
                    data_dir=root / data.data,
                    data_digest=dataset_digest(root / data.data),
                    run_dir=run_dir,
                    dist=dist,
                )
                rec.output(run_dir / CHECKPOINTS_DIR / MODEL_CONFIG)
                for ref in result.checkpoints:
                    if ref.step > step:  # the fork's own checkpoints
                        rec.output(ref.path)
                again = ["flowpin", "fork", parent_name, "--step", str(step), "--out", run_dir_name, *overrides]
                rec.note("fork", parent=parent_name, step=step, new_overrides=overrides, command=again)
        finally:
            destroy()
    return manifest
