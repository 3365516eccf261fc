"""``flowpin fork``: continue a training stage from any of its checkpoints under a new recipe.

The parent's manifest says which recipe (primary config + overrides) produced which checkpoints and
pins each checkpoint's digest. A fork first verifies the parent (signature by a trusted key, then the
digest of the checkpoint it continues from), recomposes that recipe with Hydra, applies the new
overrides on top, continues training into a new run directory, and records a signed manifest there
whose dependencies name the parent manifest and the checkpoint (kind ``checkpoint``) and whose
``overrides`` hold the parent's and the new ones. The parent's run is never touched.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from flowpin.canonical import canonical_json
from flowpin.data.order import dataset_digest
from flowpin.display import safe
from flowpin.errors import RecipeError
from flowpin.hashing import hash_bytes
from flowpin.manifest.record import record
from flowpin.manifest.trust import load_verified, require_digests
from flowpin.paths import check_output_path, resolve_inside
from flowpin.recipe import StagePaths, to_config, to_plain
from flowpin.train.checkpoint import checkpoint_name
from flowpin.train.distributed import destroy, init_distributed
from flowpin.train.model import ModelConfig
from flowpin.train.run import MODEL_CONFIG, TrainingStageConfig, fork_training


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
    external = parent.build["externalParameters"]
    config_name = _config_name(parent.dependencies)
    subject = next((s for s in parent.subjects if s["name"].endswith("/" + checkpoint_name(step))), None)
    if subject is None:
        steps = sorted(safe(s["name"].rsplit("-", 1)[-1]) for s in parent.subjects)
        raise RecipeError(f"{parent_manifest}: no checkpoint at step {step} (it pins steps {', '.join(steps)})")
    require_digests(parent, [subject["name"]], root=root, purpose=purpose)
    all_overrides = [*external["overrides"], *overrides]
    tag = hash_bytes(canonical_json(all_overrides))[:8]
    run_dir_name = out or f"runs/forks/{parent.stage}-step{step}-{tag}"
    with initialize_config_dir(config_dir=str(root / "params"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=all_overrides)
    model_cfg = to_config(ModelConfig, cfg.model, where="model")
    recipe = to_config(TrainingStageConfig, cfg.train, where="train")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    checkpoint = resolve_inside(subject["name"], root)
    data = paths.inputs["data"]
    run_dir = root / run_dir_name
    manifest = run_dir / "manifest.json"
    dist = init_distributed()
    try:
        with record(
            parent.stage,
            recipe=to_plain(cfg),
            overrides=all_overrides,
            config_files=[d["name"] for d in parent.dependencies if d["annotations"]["kind"] == "config"],
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
            rec.output(run_dir / "checkpoints" / MODEL_CONFIG)
            for ref in result.checkpoints:
                if ref.step > step:  # the fork's own checkpoints
                    rec.output(ref.path)
            rec.note("fork", parent=str(parent_manifest), step=step, new_overrides=overrides)
    finally:
        destroy()
    return manifest


def _config_name(dependencies: list[dict[str, object]]) -> str:
    for dep in dependencies:
        name = str(dep["name"])
        if name.startswith("params/") and name.count("/") == 1 and name.endswith(".yaml"):
            return name.removeprefix("params/").removesuffix(".yaml")
    raise RecipeError("the parent manifest pins no primary recipe (params/<name>.yaml); cannot recompose it")
