"""Stage 9, supervised fine-tuning: the long-context checkpoint on prompt -> worked solution.

python stages/sft.py                                   # params/sft.yaml
python stages/sft.py sft.loop.steps=300 sft.eval.tasks=300   # any override, recorded in the manifest
torchrun --nproc-per-node 2 stages/sft.py              # data parallel; rank 0 records the stage
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.constants import MODEL_CONFIG
from flowpin.post.sft import SFTConfig, run_sft
from flowpin.stage import stage_run
from flowpin.train.distributed import destroy, init_distributed

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    dist = init_distributed()
    try:
        inputs = ("synth", "tokenizer", "init")
        with stage_run("sft", cfg, SFTConfig, root=ROOT, inputs=inputs, persistent_out=True) as run:
            result = run_sft(
                run.recipe,
                synth_dir=run.input_dir("synth"),
                tokenizer_dir=run.input_dir("tokenizer"),
                init_dir=run.input_dir("init"),
                run_dir=run.out_dir.parent,
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
    if not dist.is_main:  # rank 0 recorded the stage and reports it
        return
    for kind, after in result.report["heldout"]["after"].items():
        before = result.report["heldout"]["before"][kind]
        print(
            f"{run.paths.manifest}: held-out {kind} pass@1 {before['pass_at_1']:.2f} → {after['pass_at_1']:.2f}, "
            f"solution loss {before['response_loss']:.3f} → {after['response_loss']:.3f}"
        )


if __name__ == "__main__":
    main()
