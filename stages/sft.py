"""Stage 9, supervised fine-tuning: the long-context checkpoint on prompt -> worked solution.

python stages/sft.py                                   # params/sft.yaml
python stages/sft.py sft.loop.steps=300 sft.eval.tasks=300   # any override, recorded in the manifest
torchrun --nproc-per-node 2 stages/sft.py              # data parallel; rank 0 records the stage
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.post.sft import SFT_STAGE
from flowpin.recipe_schema import register_schema
from flowpin.train.entry import run_training_stage

ROOT = Path(__file__).resolve().parents[1]
register_schema("sft")  # the structured config params/*.yaml compose onto (schema/sft)


@hydra.main(config_path="../params", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_training_stage(cfg, SFT_STAGE, root=ROOT)


if __name__ == "__main__":
    main()
