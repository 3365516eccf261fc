"""Stage 4, mix: topic x quality buckets, quality-aware upsampling to a token budget, seeded order.

python stages/mix.py                                  # the reference recipe, params/mix.yaml
python stages/mix.py --config-name mix_full           # the *_full flow
python stages/mix.py mix.upsampling.token_budget=1000000   # any Hydra override; recorded in the manifest
python stages/mix.py paths.inputs.corpus.data=data/ingest paths.inputs.corpus.manifest=manifests/ingest.json
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.mix import MixConfig, run_mix
from flowpin.errors import RecipeError
from flowpin.manifest import record
from flowpin.recipe import StagePaths, hydra_sources, to_config, to_plain

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="mix", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recipe = to_config(MixConfig, cfg.mix, where="mix")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    corpus = paths.inputs.get("corpus")
    if corpus is None:
        raise RecipeError("paths.inputs.corpus: missing; name the upstream dataset and its manifest")
    src = hydra_sources(ROOT / "params")
    with record(
        "mix",
        recipe=to_plain(cfg),
        overrides=src.overrides,
        config_files=src.config_files,
        root=ROOT,
        manifest=paths.manifest,
    ) as rec:
        rec.upstream(data=corpus.data, manifest=corpus.manifest)
        with atomic_directory(ROOT / paths.out) as tmp:
            run = run_mix(recipe, ROOT / corpus.data, tmp)
        atomic_write_bytes(ROOT / paths.report, canonical_json(run.report) + b"\n")
        rec.output(paths.out)
        rec.byproduct(paths.report)
    budget = run.report["budget"]
    print(
        f"mix: {run.records} records, ~{run.tokens} estimated tokens (budget {budget['token_budget']}, "
        f"delta {budget['delta']:+d}), {len(run.shards)} shards"
    )


if __name__ == "__main__":
    main()
