"""Stage 10, DPO: the SFT checkpoint prefers verified solutions over the pretrain checkpoint's wrong answers.

python stages/dpo.py                                   # params/dpo.yaml
python stages/dpo.py dpo.beta=0.5 dpo.pairs.sampling.temperature=0.8   # any override, recorded
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.post.dpo import DPO_STAGE
from flowpin.recipe_schema import register_schema
from flowpin.train.entry import run_training_stage

ROOT = Path(__file__).resolve().parents[1]
register_schema("dpo")  # the structured config params/*.yaml compose onto (schema/dpo)


@hydra.main(config_path="../params", config_name="dpo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_training_stage(cfg, DPO_STAGE, root=ROOT)


if __name__ == "__main__":
    main()
