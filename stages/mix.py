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

from flowpin.data.mix import run_mix
from flowpin.data.mix_config import MixConfig
from flowpin.recipe_schema import register_schema
from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]
register_schema("mix")  # the structured config params/*.yaml compose onto (schema/mix)


@hydra.main(config_path="../params", config_name="mix", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("mix", cfg, MixConfig, root=ROOT, inputs=("corpus",)) as run:
        result = run_mix(run.recipe, run.input_dir("corpus"), run.out_dir)
        run.report = result.report
    budget = result.report["budget"]
    print(
        f"mix: {result.records} records, ~{result.tokens} estimated tokens (budget {budget['token_budget']}, "
        f"delta {budget['delta']:+d}), {len(result.shards)} shards"
    )


if __name__ == "__main__":
    main()
