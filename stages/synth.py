"""Synthetic verifiable data: arithmetic and word problems with exact answers, from the recipe's seed.

python stages/synth.py                           # the reference recipe, params/synth.yaml
python stages/synth.py synth.arithmetic.train=100 # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.data.synth import SynthConfig, run_synth
from flowpin.recipe_schema import register_schema
from flowpin.stage import stage_run

ROOT = Path(__file__).resolve().parents[1]
register_schema("synth")  # the structured config params/*.yaml compose onto (schema/synth)


@hydra.main(config_path="../params", config_name="synth", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stage_run("synth", cfg, SynthConfig, root=ROOT) as run:
        result = run_synth(run.recipe, run.out_dir)
        run.report = result.report
    sizes = ", ".join(f"{split} {n}" for split, n in result.tasks.items())
    avoided = result.report["collisions_avoided"]
    print(f"synth: {sizes} tasks; collisions avoided: {avoided['heldout']} held-out, {avoided['duplicates']} duplicate")


if __name__ == "__main__":
    main()
