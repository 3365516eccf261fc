"""Stage 11, RLVR: GRPO-style RL with verifiable rewards, from the DPO checkpoint.

python stages/rlvr.py                                  # params/rlvr.yaml
python stages/rlvr.py rlvr.loop.steps=60 rlvr.kl_coef=0.05   # any override, recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.post.rlvr import RLVR_STAGE
from flowpin.recipe_schema import register_schema
from flowpin.train.entry import run_training_stage

ROOT = Path(__file__).resolve().parents[1]
register_schema("rlvr")  # the structured config params/*.yaml compose onto (schema/rlvr)


@hydra.main(config_path="../params", config_name="rlvr", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_training_stage(cfg, RLVR_STAGE, root=ROOT)


if __name__ == "__main__":
    main()
