"""Stage 2, dedup: exact (normalised-text SHA-256), then fuzzy (MinHash LSH + exact Jaccard) dedup.

python stages/dedup.py                              # the reference recipe, params/dedup.yaml
python stages/dedup.py --config-name dedup_full     # over ingest_full's whole-stdlib corpus
python stages/dedup.py dedup.fuzzy.threshold=0.8    # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.dedup import DedupConfig, run_dedup
from flowpin.errors import RecipeError
from flowpin.manifest import record
from flowpin.recipe import StagePaths, hydra_sources, to_config, to_plain

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="dedup", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recipe = to_config(DedupConfig, cfg.dedup, where="dedup")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    corpus = paths.inputs.get("corpus")
    if corpus is None:
        raise RecipeError("paths.inputs.corpus: missing; name the dataset to dedup (data: and manifest:)")
    src = hydra_sources(ROOT / "params")
    with record(
        "dedup",
        recipe=to_plain(cfg),
        overrides=src.overrides,
        config_files=src.config_files,
        root=ROOT,
        manifest=paths.manifest,
    ) as rec:
        rec.upstream(data=corpus.data, manifest=corpus.manifest)
        with atomic_directory(ROOT / paths.out) as tmp:
            result = run_dedup(recipe, ROOT / corpus.data, tmp)
        atomic_write_bytes(ROOT / paths.report, canonical_json(result.report) + b"\n")
        rec.output(paths.out)
        rec.byproduct(paths.report)
    print(
        f"dedup: {result.documents_in} documents in, {result.documents_out} out "
        f"({result.exact_duplicates} exact duplicates, {result.fuzzy_duplicates} near-duplicates "
        f"in {len(result.fuzzy_clusters)} clusters)"
    )


if __name__ == "__main__":
    main()
