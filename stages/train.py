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

from flowpin.constants import MODEL_CONFIG
from flowpin.data.order import dataset_digest
from flowpin.recipe import to_config
from flowpin.stage import stage_run
from flowpin.train.distributed import destroy, init_distributed
from flowpin.train.run import TrainingStageConfig, run_training
from flowpin.train.transformer import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model_cfg = to_config(ModelConfig, cfg.model, where="model")
    dist = init_distributed()
    try:
        with stage_run("train", cfg, TrainingStageConfig, root=ROOT, inputs=("data",), persistent_out=True) as run:
            init = run.paths.inputs.get("init")
            result = run_training(
                run.recipe,
                model_cfg,
                data_dir=run.input_dir("data"),
                data_digest=dataset_digest(run.input_dir("data")),
                run_dir=run.out_dir.parent,
                init_dir=None if init is None else ROOT / init.data,
                dist=dist,
                tracker=run.tracker,
                claim=run.run_claim(),  # the run key's code: this stage's dvc.yaml code deps
            )
            run.rec.output(run.out_dir / MODEL_CONFIG)  # the architecture the checkpoints load into
            for checkpoint in result.checkpoints:  # every checkpoint is a subject of the manifest
                run.rec.output(checkpoint.path)
            run.report = result.report
    finally:
        destroy()
    if not dist.is_main:
        return
    probe = result.report["probe_loss"]
    print(
        f"{run.paths.manifest}: {result.report['steps']} steps, probe loss {probe['before']:.3f} → {probe['after']:.3f}"
    )


if __name__ == "__main__":
    main()
