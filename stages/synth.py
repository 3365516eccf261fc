"""Synthetic verifiable data: arithmetic and word problems with exact answers, from the recipe's seed.

python stages/synth.py                           # the reference recipe, params/synth.yaml
python stages/synth.py synth.arithmetic.train=100 # any Hydra override; recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.atomic import atomic_directory, atomic_write_bytes
from flowpin.canonical import canonical_json
from flowpin.data.synth import SynthConfig, run_synth
from flowpin.manifest import record
from flowpin.recipe import StagePaths, hydra_sources, to_config, to_plain

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="synth", version_base="1.3")
def main(cfg: DictConfig) -> None:
    recipe = to_config(SynthConfig, cfg.synth, where="synth")
    paths = to_config(StagePaths, cfg.paths, where="paths")
    src = hydra_sources(ROOT / "params")
    with record(
        "synth",
        recipe=to_plain(cfg),
        overrides=src.overrides,
        config_files=src.config_files,
        root=ROOT,
        manifest=paths.manifest,
    ) as rec:
        with atomic_directory(ROOT / paths.out) as tmp:
            result = run_synth(recipe, tmp)
        atomic_write_bytes(ROOT / paths.report, canonical_json(result.report) + b"\n")
        rec.output(paths.out)
        rec.byproduct(paths.report)
    sizes = ", ".join(f"{split} {n}" for split, n in result.tasks.items())
    avoided = result.report["collisions_avoided"]
    print(f"synth: {sizes} tasks; collisions avoided: {avoided['heldout']} held-out, {avoided['duplicates']} duplicate")


if __name__ == "__main__":
    main()
