"""Stages 6-8: pretrain, midtrain, long-context extension — one script, one recipe per stage.

python stages/train.py                                  # params/pretrain.yaml
python stages/train.py --config-name midtrain           # from pretrain's last checkpoint
python stages/train.py --config-name longctx            # 1024-token sequences, YaRN on full-attention layers
python stages/train.py model=tiny_wide train.loop.optim.schedule.peak_lr=1e-3   # any override, recorded
torchrun --nproc-per-node 2 stages/train.py             # data parallel; rank 0 writes checkpoints and manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.recipe import to_config
from flowpin.recipe_schema import register_schema
from flowpin.train.entry import run_training_stage
from flowpin.train.pretrain import pretrain_stage
from flowpin.train.transformer import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
register_schema("train")  # the structured config params/*.yaml compose onto (schema/train)


@hydra.main(config_path="../params", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model_cfg = to_config(ModelConfig, cfg.model, where="model")
    run_training_stage(cfg, pretrain_stage(model_cfg), root=ROOT)


if __name__ == "__main__":
    main()
