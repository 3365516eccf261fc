"""Stage 11, RLVR: GRPO-style RL with verifiable rewards, from the DPO checkpoint.

python stages/rlvr.py                                  # params/rlvr.yaml
python stages/rlvr.py rlvr.loop.steps=60 rlvr.kl_coef=0.05   # any override, recorded in the manifest
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from flowpin.constants import MODEL_CONFIG
from flowpin.post.rlvr import RLVRConfig, run_rlvr
from flowpin.stage import stage_run
from flowpin.train.distributed import destroy, init_distributed

ROOT = Path(__file__).resolve().parents[1]


@hydra.main(config_path="../params", config_name="rlvr", version_base="1.3")
def main(cfg: DictConfig) -> None:
    dist = init_distributed()
    try:
        inputs = ("synth", "tokenizer", "init")
        with stage_run("rlvr", cfg, RLVRConfig, root=ROOT, inputs=inputs, persistent_out=True) as run:
            result = run_rlvr(
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
    report = result.report
    quarters, passed = report["reward_quarters"], report["heldout"]
    print(f"{run.paths.manifest}: mean reward {quarters['first']:.3f} (first quarter) → {quarters['last']:.3f} (last)")
    for kind, after in passed["after"].items():
        print(f"  held-out {kind} pass@1 {passed['before'][kind]['pass_at_1']:.2f} → {after['pass_at_1']:.2f}")


if __name__ == "__main__":
    main()
