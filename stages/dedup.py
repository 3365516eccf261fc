"""Stage 2, dedup: exact (normalised-text SHA-256), then fuzzy (MinHash LSH + exact Jaccard) dedup.

python stages/dedup.py                              # the reference recipe, params/dedup.yaml
python stages/dedup.py --config-name dedup_full     # over ingest_full's whole-stdlib corpus
python stages/dedup.py dedup.fuzzy.threshold=0.8    # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.data.dedup import DedupConfig, run_dedup
from flowpin.recipe_schema import register_schema
from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]
register_schema("dedup")  # the structured config params/*.yaml compose onto (schema/dedup)


@hydra.main(config_path="../params", config_name="dedup", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("dedup", cfg, DedupConfig, root=ROOT, inputs=("corpus",)) as run:
        result = run_dedup(run.recipe, run.input_dir("corpus"), run.out_dir)
        run.report = result.report
    print(
        f"dedup: {result.documents_in} documents in, {result.documents_out} out "
        f"({result.exact_duplicates} exact duplicates, {result.fuzzy_duplicates} near-duplicates "
        f"in {len(result.fuzzy_clusters)} clusters)"
    )


if __name__ == "__main__":
    main()
